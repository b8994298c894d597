//! The volume's replication state machine, free of sockets, disks and
//! clocks. The driver (`run::volume`) feeds it events (an application
//! request, a local disk completion, a frame from the peer, the link coming
//! or going, an operator command) and carries out the [`Action`]s it
//! returns, in order.
//!
//! Ordering is the whole game. Every operation that must reach the peer gets
//! a sequence number; the driver hands local disk operations to one FIFO
//! worker in the order they are returned, frames go out in the order they
//! are returned, and the peer applies frames in arrival order on its own
//! FIFO worker. Both copies therefore see overlapping writes in the same
//! order, the order in which the primary issued them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use crate::config::Mode;
use crate::core::al::{ActivityLog, Admit};
use crate::core::bitmap::{self, Bitmap};
use crate::core::wire::{self, Kind, NodeState};

pub type Payload = Arc<Vec<u8>>;
/// The driver's name for an application request.
pub type ReqId = u64;
pub type Seq = u64;

/// Granularity of the in-memory dirty bitmap and of resync.
pub const BLOCK: u64 = 4096;
/// Largest run of dirty blocks one resync read covers.
const RESYNC_RUN: u64 = 256;
/// Blocks one online-verify request covers: its answer is a 64-bit mask.
const VERIFY_CHUNK: u64 = 64;
/// Resync reads in flight at once.
const RESYNC_WINDOW: usize = 8;
/// Runs of a bitmap one frame carries (16 bytes each).
const BITMAP_FRAME_RUNS: usize = 65536;
/// Resync reads in flight, and blocks per read, while the application
/// writes: 64 KiB in the pipe ahead of any application write.
const RESYNC_WINDOW_BUSY: usize = 1;
const RESYNC_RUN_BUSY: u64 = 16;
/// Resync reads that may fail in a row before the disk counts as failed,
/// and the first back-off between them (doubled at each failure).
const RESYNC_READ_ATTEMPTS: u32 = 5;
const RESYNC_RETRY_US: u64 = 100_000;
/// How long after an application write the application counts as active.
const APP_ACTIVE_US: u64 = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Primary,
    Secondary,
}

/// The state of this node's copy of the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskState {
    /// Holds the newest data (or data no other copy is known to beat).
    UpToDate,
    /// Known to be older than the peer's; must not be promoted.
    Outdated,
    /// Partly written by a resync that has not finished; never promotable.
    Inconsistent,
    /// The backing store fails I/O.
    Failed,
}

/// The replication link as an operator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    /// Not trying to reach the peer (refused: split brain, unrelated data).
    Standalone,
    /// Trying to reach the peer.
    Connecting,
    /// Connected, copies in sync.
    Connected,
    /// Connected, sending the peer the blocks it lacks.
    SyncSource,
    /// Connected, receiving the blocks this node lacks.
    SyncTarget,
}

impl std::fmt::Display for DiskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DiskState::UpToDate => "up_to_date",
            DiskState::Outdated => "outdated",
            DiskState::Inconsistent => "inconsistent",
            DiskState::Failed => "failed",
        })
    }
}

fn role_code(r: Role) -> u8 {
    match r {
        Role::Primary => 1,
        Role::Secondary => 0,
    }
}
fn disk_code(d: DiskState) -> u8 {
    match d {
        DiskState::UpToDate => 0,
        DiskState::Outdated => 1,
        DiskState::Inconsistent => 2,
        DiskState::Failed => 3,
    }
}
pub fn disk_from_code(c: u8) -> DiskState {
    match c {
        0 => DiskState::UpToDate,
        1 => DiskState::Outdated,
        2 => DiskState::Inconsistent,
        _ => DiskState::Failed,
    }
}

/// An operation on a backing store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskOp {
    Write {
        offset: u64,
        data: Payload,
        fua: bool,
    },
    Zeroes {
        offset: u64,
        length: u64,
        punch: bool,
        fua: bool,
    },
    Flush,
    Read {
        offset: u64,
        length: u64,
    },
}

/// Who a disk completion belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskTag {
    /// An application request on the primary, by sequence.
    Local(Seq),
    /// A frame from the peer being applied, by the peer's sequence and the
    /// link session it came on.
    FromPeer(Seq, u64),
    /// A resync read, by its first block and the session that asked.
    ResyncRead(u64, u64),
    /// Making the resync durable before acknowledging ResyncDone.
    ResyncFlush(Seq, u64),
    /// Online verify: the primary reading a chunk, by its first block.
    VerifyRead(u64, u64),
    /// Online verify: the secondary reading the chunk of request `seq`.
    VerifyPeer(Seq, u64),
}

/// A frame to send; the driver seals it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: wire::Header,
    pub payload: Option<Payload>,
}

/// What the metadata must say before anything that depends on it happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaUpdate {
    pub current_gen: u64,
    pub bitmap_gen: u64,
    pub volume_id: [u8; 16],
    pub consistent: bool,
    pub primary: bool,
    /// The copy is known older than the peer's (semisync outdated it).
    pub outdated: bool,
    /// The peer said its copy is outdated and this one went on without it.
    pub peer_outdated: bool,
    /// This copy stopped uncleanly since its last resync and may have lost
    /// acknowledged writes from its disk's cache (see `NodeState`).
    pub lost_cache: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Persist (and flush) the metadata now, before the actions after it:
    /// frames and completions after it leave only once it is on disk
    /// (`core::gate::MetaGate`), and so does any heartbeat that reports it.
    Persist(MetaUpdate),
    /// Write these pages of the on-disk bitmap, (page, 4 KiB image),
    /// durably, after everything before and before everything after.
    PersistBitmap(Vec<(u64, Vec<u8>)>),
    /// Flush the disk, then write this activity-log transaction (the
    /// extents it holds) durably, before everything after it, frames
    /// included: a frame sent after it goes out only once it is on disk
    /// (and is dropped with the link if the link goes first; see
    /// `core::gate::MetaGate`). Otherwise
    /// the peer could apply a write that a crash keeps out of both the
    /// local disk and the local log.
    PersistActivityLog(Vec<u64>),
    Disk {
        tag: DiskTag,
        op: DiskOp,
    },
    Send(Frame),
    /// The application request is done; Err carries an NBD errno.
    Complete {
        id: ReqId,
        result: Result<(), u32>,
    },
    /// The link is unusable (protocol violation); the driver closes it and
    /// reports `link_lost` later.
    DropLink(String),
    /// The role changed (for the driver to attach or detach the kernel
    /// device and open or close the NBD server).
    RoleChanged(Role),
    Log {
        warn: bool,
        message: String,
    },
}

/// An application request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Write {
        offset: u64,
        data: Payload,
        fua: bool,
    },
    Zeroes {
        offset: u64,
        length: u64,
        punch: bool,
        fua: bool,
    },
    Flush,
}

impl Request {
    fn blocks(&self) -> Option<(u64, u64)> {
        match self {
            Request::Write { offset, data, .. } => Some(block_range(*offset, data.len() as u64)),
            Request::Zeroes { offset, length, .. } => Some(block_range(*offset, *length)),
            Request::Flush => None,
        }
    }
}

/// The bitmap pages that hold any of the marked blocks.
fn pages_of(d: &Bitmap) -> BTreeSet<u64> {
    d.runs()
        .iter()
        .flat_map(|&(f, c)| f / bitmap::PAGE_BLOCKS..=(f + c - 1) / bitmap::PAGE_BLOCKS)
        .collect()
}

/// splitmix64's finalizer: every input bit reaches every output bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn block_range(offset: u64, length: u64) -> (u64, u64) {
    let first = offset / BLOCK;
    let end = (offset + length.max(1)).div_ceil(BLOCK);
    (first, end)
}

#[derive(Debug)]
struct Pending {
    id: ReqId,
    /// When it was issued (driver clock, µs).
    issued_us: u64,
    blocks: Option<(u64, u64)>,
    local_done: bool,
    /// None: the peer is not needed (async, alone).
    peer_done: Option<bool>,
    error: Option<u32>,
    /// The local disk failed this request (or was failed already): it
    /// succeeds only if the peer acknowledges it, which then holds it.
    local_error: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromoteError {
    AlreadyPrimary,
    PeerIsPrimary,
    NotUpToDate(DiskState),
    FreshVolume,
    RequestPending,
    LinkStarting,
}

impl std::fmt::Display for PromoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PromoteError::AlreadyPrimary => write!(f, "this node is already primary"),
            PromoteError::PeerIsPrimary => write!(
                f,
                "the peer is primary; demote it first (`hadb volume secondary` there)"
            ),
            PromoteError::NotUpToDate(d) => write!(
                f,
                "the local disk is {d:?}, not up to date; wait for the resync, or use --force if you know this copy is the one to keep"
            ),
            PromoteError::FreshVolume => write!(
                f,
                "this volume has never been primary and the peer is not connected to agree; use --force to make this copy the source of the initial sync"
            ),
            PromoteError::RequestPending => write!(
                f,
                "a role request to the peer is already under way; try again in a moment"
            ),
            PromoteError::LinkStarting => write!(
                f,
                "the link to the peer is coming up and its state has not arrived; try again in a moment"
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DemoteError {
    NotPrimary,
    Busy { pending: usize },
}

impl std::fmt::Display for DemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DemoteError::NotPrimary => write!(f, "this node is not primary"),
            DemoteError::Busy { pending } => write!(
                f,
                "{pending} write(s) are still waiting for the peer; `hadb volume go-alone` releases them, or wait for the peer"
            ),
        }
    }
}

/// Semisync's counters, as MySQL's Rpl_semi_sync_master_* variables give
/// them.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SemisyncCounters {
    /// Writes completed after the peer acknowledged them (yes_tx).
    pub waited: u64,
    /// Writes completed without waiting for the peer (no_tx).
    pub not_waited: u64,
    /// Times the volume went on without the peer (no_times).
    pub went_alone: u64,
    /// Sum of the waits, for the average (tx_avg_wait_time).
    pub wait_us_total: u64,
}

/// Counters an operator reads in status.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Counters {
    pub writes: u64,
    pub written_bytes: u64,
    pub replicated_bytes: u64,
    pub flushes: u64,
    pub peer_acks: u64,
    pub held_requests: u64,
    pub resync_blocks_sent: u64,
    pub resync_blocks_received: u64,
    pub resyncs_started: u64,
    pub write_errors: u64,
    pub protocol_errors: u64,
    /// Activity-log transactions written (an extent entered the log).
    pub al_transactions: u64,
    /// Bitmap pages written.
    pub bitmap_page_writes: u64,
    /// Online verifies that ended (finished, or abandoned with the link):
    /// how `hadb volume verify --wait` tells a new result from the last
    /// one, which may be identical.
    pub verifies_ended: u64,
}

/// The outcome of comparing generations at connect time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncDecision {
    /// Same data; only the primary's in-memory dirty blocks, if any, move.
    InSync,
    /// Neither copy has ever been primary: nothing moves until one is.
    BothFresh,
    SourceBitmap,
    SourceFull,
    TargetBitmap,
    TargetFull,
    SplitBrain,
    Unrelated,
}

impl SyncDecision {
    pub fn rule(self) -> &'static str {
        match self {
            SyncDecision::InSync => "same generation: in sync",
            SyncDecision::BothFresh => "both copies fresh: waiting for a first primary",
            SyncDecision::SourceBitmap => {
                "the peer's copy is older or blocks are marked out of sync: resync the blocks either bitmap marks to it"
            }
            SyncDecision::SourceFull => "peer is fresh or my bitmap is gone: full resync to it",
            SyncDecision::TargetBitmap => {
                "my copy is older or blocks are marked out of sync: receive the blocks either bitmap marks"
            }
            SyncDecision::TargetFull => {
                "I am fresh or the peer's bitmap is gone: receive a full resync"
            }
            SyncDecision::SplitBrain => {
                "both copies changed since they parted: split brain, refusing to connect"
            }
            SyncDecision::Unrelated => {
                "the copies share no generation: unrelated data, refusing to connect"
            }
        }
    }
}

/// What to do when both copies changed since they parted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AfterSplitBrain {
    /// Refuse to connect and wait for `hadb volume discard-my-data` on
    /// one node.
    Disconnect,
    /// If one side wrote nothing since the split, discard it.
    DiscardZeroChanges,
    /// Discard the side that changed fewer blocks (ties: disconnect).
    DiscardLeastChanges,
}

/// A split brain as status reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SplitBrainReport {
    /// The generation both copies had when they parted.
    pub since_gen: u64,
    /// Blocks changed here since then (None: unknown, hadb restarted).
    pub my_changes: Option<u64>,
    pub peer_changes: Option<u64>,
}

/// Which side a split brain is resolved against: Some(true) means this
/// node's copy is discarded. Pure and symmetric: both nodes reach the same
/// answer from the same facts.
pub fn resolve_split_brain(me: GenView, peer: GenView, policy: AfterSplitBrain) -> Option<bool> {
    if me.discard != peer.discard {
        return Some(me.discard);
    }
    if me.discard {
        // Both asked to discard: nothing to keep; wait for the operator.
        return None;
    }
    let (Some(mine), Some(theirs)) = (me.changes, peer.changes) else {
        return None;
    };
    match policy {
        AfterSplitBrain::Disconnect => None,
        AfterSplitBrain::DiscardZeroChanges => match (mine, theirs) {
            (0, 0) => Some(!me.first),
            (0, _) => Some(true),
            (_, 0) => Some(false),
            _ => None,
        },
        AfterSplitBrain::DiscardLeastChanges => (mine != theirs).then_some(mine < theirs),
    }
}

/// What a node knows of itself for the connect decision.
#[derive(Debug, Clone, Copy)]
pub struct GenView {
    pub current: u64,
    pub bitmap_gen: u64,
    /// Whether this node holds a bitmap valid since `bitmap_gen`.
    pub has_bitmap: bool,
    /// The node stopped while primary and has not resynchronised since.
    pub crashed_primary: bool,
    /// The node stopped uncleanly (in any role) and has not been
    /// resynchronised since: writes it acknowledged may be gone.
    pub lost_cache: bool,
    /// The node has blocks marked out of sync (or has lost its bitmap).
    pub dirty: bool,
    /// The node's copy is half-written by an unfinished resync.
    pub inconsistent: bool,
    /// The operator said `hadb volume discard-my-data` on this node.
    pub discard: bool,
    /// Blocks changed since the peer left (None: unknown).
    pub changes: Option<u64>,
    /// Tie-break: this node's name sorts first.
    pub first: bool,
    /// The node is primary now.
    pub primary: bool,
    /// The node's copy is outdated (it agreed the other went on without it).
    pub outdated: bool,
}

/// Compares generations. Pure and symmetric: the two nodes reach mirror
/// decisions from the same facts.
pub fn decide(me: GenView, peer: GenView) -> SyncDecision {
    use SyncDecision::*;
    let bitmaps = me.has_bitmap && peer.has_bitmap;
    let gens = decide_generations(me, peer);
    // A half-written copy is never a source. It resumes from the bitmaps
    // when the other copy's bitmap covers it (same generation, or the
    // other's bitmap starts at it); otherwise it is rewritten in full.
    if me.inconsistent != peer.inconsistent && me.current != 0 && peer.current != 0 {
        return if me.inconsistent {
            if bitmaps && matches!(gens, InSync | TargetBitmap) {
                TargetBitmap
            } else {
                TargetFull
            }
        } else if bitmaps && matches!(gens, InSync | SourceBitmap) {
            SourceBitmap
        } else {
            SourceFull
        };
    }
    // Blocks marked on either side (changes the peer missed, the activity
    // log of an unclean stop) may differ: the two bitmaps are exchanged
    // and their union is resynced.
    let me_odd = me.crashed_primary || me.dirty;
    let peer_odd = peer.crashed_primary || peer.dirty;
    match gens {
        InSync if me_odd || peer_odd => {
            // The primary's copy is the application's; else not a copy
            // that agreed it is outdated; else not the copy that crashed
            // while primary (what only it holds was never
            // acknowledged); else the one with marks; else by name.
            let me_source = if me.primary != peer.primary {
                me.primary
            } else if me.outdated != peer.outdated {
                peer.outdated
            } else if me.lost_cache != peer.lost_cache {
                // A copy whose cache survived holds every write it
                // acknowledged; the other may not.
                peer.lost_cache
            } else if me.crashed_primary != peer.crashed_primary {
                peer.crashed_primary
            } else if me.dirty != peer.dirty {
                me.dirty
            } else {
                me.first
            };
            match (me_source, bitmaps) {
                (true, true) => SourceBitmap,
                (true, false) => SourceFull,
                (false, true) => TargetBitmap,
                (false, false) => TargetFull,
            }
        }
        SourceBitmap if !bitmaps => SourceFull,
        TargetBitmap if !bitmaps => TargetFull,
        d => d,
    }
}

fn decide_generations(me: GenView, peer: GenView) -> SyncDecision {
    use SyncDecision::*;
    if me.current == peer.current {
        return if me.current == 0 { BothFresh } else { InSync };
    }
    if peer.current == 0 {
        return SourceFull;
    }
    if me.current == 0 {
        return TargetFull;
    }
    if me.bitmap_gen != 0 && me.bitmap_gen == peer.current {
        return if me.has_bitmap {
            SourceBitmap
        } else {
            SourceFull
        };
    }
    if peer.bitmap_gen != 0 && peer.bitmap_gen == me.current {
        return if peer.has_bitmap {
            TargetBitmap
        } else {
            TargetFull
        };
    }
    if me.bitmap_gen != 0 && me.bitmap_gen == peer.bitmap_gen {
        return SplitBrain;
    }
    Unrelated
}

/// Static facts the state machine needs.
#[derive(Debug, Clone)]
pub struct Setup {
    pub mode: Mode,
    pub data_size: u64,
    pub volume_id: [u8; 16],
    pub current_gen: u64,
    pub bitmap_gen: u64,
    pub consistent: bool,
    /// The metadata says the copy was outdated (semisync went on without it).
    pub outdated: bool,
    /// The metadata says the peer's copy is outdated (see `MetaUpdate`).
    pub peer_outdated: bool,
    /// The metadata says this copy lost its cache since its last resync.
    pub lost_cache: bool,
    /// How long semisync waits for the peer before it may go on alone.
    pub ack_timeout_us: u64,
    /// Most resync bytes per second; 0: no limit but the busy window.
    pub resync_rate: u64,
    /// Resync bytes per second while the application writes; 0: only the
    /// busy window.
    pub resync_min_rate: u64,
    /// The metadata says the node stopped while primary.
    pub crashed_primary: bool,
    pub after_split_brain: AfterSplitBrain,
    /// Seeds new generation identifiers; the driver passes randomness.
    pub gen_seed: u64,
    /// Our name and the peer's, for tie-breaks.
    pub me: String,
    pub peer: String,
    /// The on-disk bitmap as found at start.
    pub out_of_sync: Bitmap,
    /// The activity log as found at start.
    pub activity_log: Vec<u64>,
    /// The last stop was not clean (a crash, a power-off, kill -9): the
    /// regions in the activity log may differ from the peer's copy.
    pub unclean: bool,
    /// Extents the activity log keeps, and blocks per extent.
    pub al_extents: usize,
    pub al_extent_blocks: u64,
    /// A new hadb process takes over from one that died (or re-executed
    /// itself) while primary, on the same running machine: the kernel
    /// device it served is still attached and the filesystem on it still
    /// mounted. The copy starts as primary, not as a crashed primary
    /// demoted to secondary. The activity log's regions are still marked
    /// (this copy is the source that resyncs them to the peer), but no
    /// cache was lost: a process's death keeps the page cache and the
    /// disk's cache, only the machine's does not. Only the driver knows
    /// that the device is still there; it must not set this otherwise.
    pub resume_primary: bool,
}

/// A write's hold on the activity log, on the node that issued it: kept
/// until the write is on the local disk and the peer has it or it is
/// marked out of sync.
#[derive(Debug, Clone, Copy)]
struct AlHold {
    blocks: (u64, u64),
    local_done: bool,
    peer_done: bool,
}

pub struct Replica {
    mode: Mode,
    data_size: u64,
    volume_id: [u8; 16],
    current_gen: u64,
    bitmap_gen: u64,
    gen_state: u64,
    /// A primary's name for the current spell without the replication
    /// link: new at every link loss. Its heartbeats ask the peer to outdate
    /// itself for this token, and only an "outdated" that echoes it is
    /// proof: one given before the link last came up may be stale (a
    /// short resync may have made the peer up to date since).
    outdate_token: u64,
    /// On a secondary: the primary's token this copy was outdated for
    /// (echoed in its heartbeats while outdated).
    outdated_for: u64,
    me_first: bool,
    crashed_primary: bool,
    /// Counts link sessions, so that answers to one are not taken for
    /// answers to the next.
    session: u64,
    /// The first sequence number sent in this session: acks below it are
    /// stale.
    session_first_seq: Seq,
    /// The operator's word that this copy is to be thrown away at the next
    /// split-brain or unrelated-data connect.
    discard_my_data: bool,
    after_split_brain: AfterSplitBrain,
    split_brain: Option<SplitBrainReport>,
    split_brain_logged: Option<SyncDecision>,
    verify: Option<VerifyState>,
    /// Last verify's result: (blocks checked, blocks that differed).
    verify_result: Option<(u64, u64)>,
    /// Whether that verify covered the whole volume.
    verify_complete: bool,
    /// Secondary: verify requests waiting for the local read.
    verify_asked: BTreeMap<Seq, (u64, u32, Payload)>,
    /// The rule the last connect decided by, for status.
    last_rule: Option<&'static str>,
    /// Microseconds on the driver's monotonic clock (set_now).
    now_us: u64,
    ack_timeout_us: u64,
    resync_rate: u64,
    resync_min_rate: u64,
    /// Semisync asked the connected peer to outdate itself.
    outdate_asked: bool,
    pub semisync: SemisyncCounters,
    /// Blocks written to the peer since the last flush sent to it.
    peer_volatile: BTreeSet<u64>,
    /// Flushes sent to the peer and not yet acknowledged, with the blocks
    /// they make durable.
    peer_flushes: BTreeMap<Seq, BTreeSet<u64>>,

    role: Role,
    disk: DiskState,
    link: LinkState,
    peer: Option<NodeState>,
    /// The peer acknowledged our State since the link came up.
    peer_ready: bool,
    /// The operator released held I/O: go on without the peer.
    alone: bool,

    next_seq: Seq,
    pending: BTreeMap<Seq, Pending>,
    /// Writes that reached only our disk while the peer could not have them;
    /// completed once a resync has carried them over.
    awaiting_resync: BTreeSet<Seq>,
    held: VecDeque<(ReqId, Request)>,

    /// Blocks that may differ from the peer's copy; None: unknown (a full
    /// resync is due). On disk as a superset (see `write_pages`).
    dirty: Option<Bitmap>,
    /// Bitmap pages whose on-disk image may hold bits: rewritten at the
    /// points where bits are cleared for good.
    disk_pages: BTreeSet<u64>,
    al: ActivityLog,
    /// Primary: holds of issued writes, by sequence.
    al_writes: BTreeMap<Seq, AlHold>,
    /// Secondary: holds of the primary's writes being applied, by (the
    /// primary's sequence, link session).
    al_applied: BTreeMap<(Seq, u64), (u64, u64)>,
    /// The last stop was unclean; `started` persists what that implies.
    unclean: bool,
    /// A resync source waiting for the target's bitmap.
    awaiting_bitmap: bool,
    /// Where the next run of that bitmap may start: runs come sorted and
    /// apart, across all its frames.
    bitmap_next: u64,
    /// A write waits in `held` because the activity log is full.
    al_full: bool,
    /// Resync target: the primary outdated this copy during the resync.
    outdated_at_resync_end: bool,
    /// The source's state from its ResyncDone, adopted only once the
    /// flush that makes the resync durable here has succeeded.
    adopt_at_resync_end: Option<NodeState>,
    /// A resync's ResyncDone went out with this generation and its
    /// acknowledgement did not come back before the link dropped: the peer
    /// may hold it.
    peer_may_hold: Option<u64>,
    /// After an unclean stop: the activity-log extents found at start.
    marked_at_start: Option<usize>,
    /// The peer outdated its copy on its disk and this node went on
    /// without it; persisted until the peer is current again.
    peer_outdated: bool,
    /// Stopped uncleanly and not resynchronised since (see GenView).
    lost_cache: bool,
    /// When the last application write was issued (driver clock, µs).
    last_app_write_us: u64,
    resync: Option<ResyncState>,
    /// Target side: frames applied but not yet acknowledged are acked in
    /// order by the disk completions; nothing to track but the final flush.
    role_request: Option<bool>,

    pub counters: Counters,
}

/// Online verify in progress (on the primary).
#[derive(Debug, Default)]
struct VerifyState {
    cursor: u64,
    /// Reads in flight: first block -> invalidated by a write.
    reads: BTreeMap<u64, bool>,
    /// Requests sent: seq -> first block.
    asked: BTreeMap<Seq, u64>,
    /// Chunks to compare again (a write raced with their read).
    redo: Vec<u64>,
    checked: u64,
    differing: u64,
}

/// 8-byte digests of each 4 KiB block of `data`.
pub fn block_digests(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len().div_ceil(BLOCK as usize) * wire::DIGEST_LEN);
    for chunk in data.chunks(BLOCK as usize) {
        out.extend_from_slice(&blake3::hash(chunk).as_bytes()[..wire::DIGEST_LEN]);
    }
    out
}

#[derive(Debug, Default)]
struct ResyncState {
    cursor: u64,
    full: bool,
    /// Reads in flight: first block -> (count, invalidated by a write).
    reads: BTreeMap<u64, (u64, bool)>,
    /// Resync frames sent, awaiting the peer's ack: seq -> (first block,
    /// count), so a lost link can mark them out of sync again.
    unacked: BTreeMap<Seq, (u64, u64)>,
    done_sent: bool,
    /// The generation the ResyncDone carried.
    done_gen: Option<u64>,
    total_blocks: u64,
    sent_blocks: u64,
    started_us: u64,
    /// Bytes the rate limit still allows now (token bucket).
    budget: u64,
    last_refill_us: u64,
    /// Resync reads that failed in a row, and when the next may start.
    read_errors: u32,
    retry_at_us: u64,
}

impl ResyncState {
    /// Runs read or sent and not yet acknowledged: (first block, count).
    fn in_flight(&self) -> Vec<(u64, u64)> {
        self.reads
            .iter()
            .map(|(f, (c, _))| (*f, *c))
            .chain(self.unacked.values().copied())
            .collect()
    }
}

impl Replica {
    pub fn new(s: Setup) -> Replica {
        let blocks = s.data_size.div_ceil(BLOCK);
        let mut dirty: Bitmap = s
            .out_of_sync
            .runs()
            .into_iter()
            .flat_map(|(f, c)| f..(f + c).min(blocks))
            .collect();
        let disk_pages = pages_of(&dirty);
        if s.unclean {
            // Whatever was being written at the stop may be on one copy
            // and not the other.
            let e = s.al_extent_blocks.max(1);
            for x in &s.activity_log {
                dirty.extend(x * e..((x + 1) * e).min(blocks));
            }
            if !s.consistent && s.current_gen != 0 {
                // Resync writes are not logged: a half-written copy that
                // lost its cache may lack anything.
                dirty = (0..blocks).collect();
            }
        }
        let disk = match (s.consistent, s.outdated) {
            (true, false) => DiskState::UpToDate,
            (true, true) => DiskState::Outdated,
            (false, _) => DiskState::Inconsistent,
        };
        // Only an up-to-date copy that says it was primary resumes as one.
        let resume_primary = s.resume_primary
            && s.crashed_primary
            && s.current_gen != 0
            && disk == DiskState::UpToDate;
        Replica {
            mode: s.mode,
            data_size: s.data_size,
            volume_id: s.volume_id,
            current_gen: s.current_gen,
            bitmap_gen: s.bitmap_gen,
            gen_state: s.gen_seed | 1,
            // Never 0 (what a secondary that outdated for nobody echoes),
            // and new at every start.
            outdate_token: mix(s.gen_seed ^ 0x6f75_7464_6174_6564) | 1,
            outdated_for: 0,
            me_first: s.me < s.peer,
            // A resumed primary is primary: what it wrote is the data.
            crashed_primary: s.crashed_primary
                && s.unclean
                && s.current_gen != 0
                && !resume_primary,
            session: 0,
            session_first_seq: 1,
            discard_my_data: false,
            after_split_brain: s.after_split_brain,
            split_brain: None,
            split_brain_logged: None,
            verify: None,
            verify_result: None,
            verify_complete: false,
            verify_asked: BTreeMap::new(),
            last_rule: None,
            now_us: 0,
            ack_timeout_us: s.ack_timeout_us,
            resync_rate: s.resync_rate,
            resync_min_rate: s.resync_min_rate,
            outdate_asked: false,
            semisync: SemisyncCounters::default(),
            peer_volatile: BTreeSet::new(),
            peer_flushes: BTreeMap::new(),
            role: if resume_primary {
                Role::Primary
            } else {
                Role::Secondary
            },
            disk,
            link: LinkState::Connecting,
            peer: None,
            peer_ready: false,
            alone: false,
            next_seq: 1,
            pending: BTreeMap::new(),
            awaiting_resync: BTreeSet::new(),
            held: VecDeque::new(),
            dirty: Some(dirty),
            disk_pages,
            al: ActivityLog::new(s.al_extent_blocks, s.al_extents, &s.activity_log),
            al_writes: BTreeMap::new(),
            al_applied: BTreeMap::new(),
            unclean: s.unclean,
            awaiting_bitmap: false,
            bitmap_next: 0,
            al_full: false,
            outdated_at_resync_end: false,
            adopt_at_resync_end: None,
            peer_may_hold: None,
            marked_at_start: s.unclean.then_some(s.activity_log.len()),
            peer_outdated: s.peer_outdated,
            lost_cache: s.lost_cache || (s.unclean && s.current_gen != 0 && !resume_primary),
            last_app_write_us: 0,
            resync: None,
            role_request: None,
            counters: Counters::default(),
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }
    /// (extents in the activity log now, extents it keeps, blocks per
    /// extent, extents marked out of sync at start after an unclean stop)
    pub fn activity_log(&self) -> (usize, usize, u64, Option<usize>) {
        (
            self.al.snapshot().len(),
            self.al.capacity(),
            self.al.extent_blocks(),
            self.marked_at_start,
        )
    }
    pub fn disk(&self) -> DiskState {
        self.disk
    }
    pub fn link(&self) -> LinkState {
        self.link
    }
    pub fn peer_state(&self) -> Option<NodeState> {
        self.peer
    }
    pub fn alone(&self) -> bool {
        self.alone
    }
    /// What this node's heartbeats carry as the outdate token: a primary's
    /// request token, or the token a secondary's outdated copy answers.
    pub fn report_token(&self) -> u64 {
        match (self.role, self.disk) {
            (Role::Primary, _) => self.outdate_token,
            (Role::Secondary, DiskState::Outdated) => self.outdated_for,
            _ => 0,
        }
    }

    /// The token a primary asks with (see `outdate_token`), and the one a
    /// secondary's copy was outdated for.
    pub fn outdate_tokens(&self) -> (u64, u64) {
        (self.outdate_token, self.outdated_for)
    }

    pub fn generations(&self) -> (u64, u64) {
        (self.current_gen, self.bitmap_gen)
    }
    /// A promotion waits for the peer's answer.
    pub fn role_request_pending(&self) -> bool {
        self.role_request.is_some()
    }
    pub fn held(&self) -> usize {
        self.held.len()
    }
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
    /// Blocks the peer lacks, None when unknown (full resync due).
    pub fn out_of_sync_blocks(&self) -> Option<u64> {
        self.dirty.as_ref().map(|d| d.len())
    }
    /// (blocks sent, blocks to send, whether the whole volume is resent,
    /// bytes per second so far)
    pub fn resync_progress(&self) -> Option<(u64, u64, bool, u64)> {
        self.resync.as_ref().map(|r| {
            let secs = self.now_us.saturating_sub(r.started_us) as f64 / 1e6;
            let rate = if secs > 0.0 {
                (r.sent_blocks * BLOCK) as f64 / secs
            } else {
                0.0
            };
            (r.sent_blocks, r.total_blocks, r.full, rate as u64)
        })
    }

    /// What the rate limit lets through at once: a tenth of a second's worth,
    /// at least one resync read.
    fn resync_burst(&self) -> u64 {
        (self.resync_rate / 10).max(RESYNC_RUN * BLOCK)
    }
    /// The peer said its copy is outdated and this node went on without
    /// it: no fence is needed to take over from it.
    pub fn peer_outdated(&self) -> bool {
        self.peer_outdated
    }
    /// Whether the peer is connected and holds every completed write.
    pub fn peer_up_to_date(&self) -> bool {
        self.link == LinkState::Connected
            && self
                .peer
                .is_some_and(|p| disk_from_code(p.disk) == DiskState::UpToDate)
    }
    /// Whether application I/O is frozen waiting for the peer.
    pub fn frozen(&self) -> bool {
        self.role == Role::Primary && self.must_hold()
    }

    fn must_hold(&self) -> bool {
        self.mode != Mode::Async && !self.alone && !self.peer_ready
    }

    fn blocks_total(&self) -> u64 {
        self.data_size.div_ceil(BLOCK)
    }

    fn next_gen(&mut self) -> u64 {
        // splitmix64: deterministic from the driver's seed.
        self.gen_state = self.gen_state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.gen_state) | 1
    }

    fn meta(&self) -> MetaUpdate {
        MetaUpdate {
            current_gen: self.current_gen,
            bitmap_gen: self.bitmap_gen,
            volume_id: self.volume_id,
            consistent: self.disk == DiskState::UpToDate || self.disk == DiskState::Outdated,
            primary: self.role == Role::Primary,
            outdated: self.disk == DiskState::Outdated,
            peer_outdated: self.peer_outdated,
            lost_cache: self.lost_cache,
        }
    }

    pub fn node_state(&self) -> NodeState {
        NodeState {
            role: role_code(self.role),
            disk: disk_code(self.disk),
            data_size: self.data_size,
            volume_id: self.volume_id,
            current_gen: self.current_gen,
            bitmap_gen: self.bitmap_gen,
            dirty_blocks: self.dirty.as_ref().map_or(u64::MAX, |d| d.len()),
            flags: if self.crashed_primary {
                wire::STATE_CRASHED_PRIMARY
            } else {
                0
            } | if self.discard_my_data {
                wire::STATE_DISCARD_MY_DATA
            } else {
                0
            } | if self.lost_cache {
                wire::STATE_LOST_CACHE
            } else {
                0
            },
        }
    }

    fn gen_views(&self, peer: &NodeState) -> (GenView, GenView) {
        (
            GenView {
                current: self.current_gen,
                bitmap_gen: self.bitmap_gen,
                // A failed copy's bitmap does not say what it lacks (the
                // writes it failed, and those that went on without it):
                // it is rewritten in full.
                has_bitmap: self.dirty.is_some() && self.disk != DiskState::Failed,
                crashed_primary: self.crashed_primary,
                lost_cache: self.lost_cache,
                dirty: self.dirty.as_ref().is_none_or(|d| !d.is_empty()),
                // A failed copy is no source either: what it holds may
                // lack writes it failed.
                inconsistent: matches!(self.disk, DiskState::Inconsistent | DiskState::Failed),
                discard: self.discard_my_data,
                changes: self.dirty.as_ref().map(|d| d.len()),
                first: self.me_first,
                primary: self.role == Role::Primary,
                outdated: self.disk == DiskState::Outdated,
            },
            GenView {
                current: peer.current_gen,
                bitmap_gen: peer.bitmap_gen,
                has_bitmap: peer.dirty_blocks != u64::MAX
                    && disk_from_code(peer.disk) != DiskState::Failed,
                crashed_primary: peer.flags & wire::STATE_CRASHED_PRIMARY != 0,
                lost_cache: peer.flags & wire::STATE_LOST_CACHE != 0,
                dirty: peer.dirty_blocks != 0,
                inconsistent: matches!(
                    disk_from_code(peer.disk),
                    DiskState::Inconsistent | DiskState::Failed
                ),
                discard: peer.flags & wire::STATE_DISCARD_MY_DATA != 0,
                changes: (peer.dirty_blocks != u64::MAX).then_some(peer.dirty_blocks),
                first: !self.me_first,
                primary: peer.role == 1,
                outdated: disk_from_code(peer.disk) == DiskState::Outdated,
            },
        )
    }

    fn state_frame(&self, kind: Kind) -> Action {
        Action::Send(Frame {
            header: wire::Header::new(kind, 0, 0, 0),
            payload: Some(Arc::new(self.node_state().encode())),
        })
    }

    fn mark_dirty(&mut self, range: (u64, u64)) {
        if let Some(d) = &mut self.dirty {
            d.extend(range.0..range.1);
        }
    }

    /// Every block may differ from the peer's: a full resync, and the
    /// bitmap on disk says so too, so a crash cannot shrink it.
    fn mark_all_dirty(&mut self, out: &mut Vec<Action>) {
        self.dirty = Some((0..self.blocks_total()).collect());
        self.sync_bitmap(out);
    }

    /// The on-disk image of a bitmap page: the marked blocks, plus resync
    /// runs in flight (cleared in memory, not yet safe on the peer). With
    /// no bitmap at all, every bit.
    fn page_image(&self, page: u64) -> Vec<u8> {
        let Some(d) = &self.dirty else {
            return vec![0xff; bitmap::PAGE_BYTES];
        };
        let mut img = d.page(page);
        if let Some(rs) = &self.resync {
            let (lo, hi) = (page * bitmap::PAGE_BLOCKS, (page + 1) * bitmap::PAGE_BLOCKS);
            for (f, c) in rs.in_flight() {
                for b in f.max(lo)..(f + c).min(hi) {
                    let i = (b - lo) as usize;
                    img[i / 8] |= 1 << (i % 8);
                }
            }
        }
        img
    }

    /// Writes bitmap pages whose image differs in substance from what the
    /// disk may hold: a page with bits, or one the disk may hold bits in.
    fn write_pages(&mut self, pages: impl IntoIterator<Item = u64>, out: &mut Vec<Action>) {
        let mut writes = Vec::new();
        for p in pages {
            let img = self.page_image(p);
            if img.iter().all(|&b| b == 0) {
                if !self.disk_pages.remove(&p) {
                    continue;
                }
            } else {
                self.disk_pages.insert(p);
            }
            writes.push((p, img));
        }
        if !writes.is_empty() {
            self.counters.bitmap_page_writes += writes.len() as u64;
            out.push(Action::PersistBitmap(writes));
        }
    }

    /// Brings the whole on-disk bitmap up to the one in memory.
    fn sync_bitmap(&mut self, out: &mut Vec<Action>) {
        let mut pages = self.disk_pages.clone();
        match &self.dirty {
            Some(d) => pages.extend(pages_of(d)),
            None => pages.extend(0..self.blocks_total().div_ceil(bitmap::PAGE_BLOCKS)),
        }
        if let Some(rs) = &self.resync {
            for (f, c) in rs.in_flight() {
                pages.extend(f / bitmap::PAGE_BLOCKS..=(f + c.max(1) - 1) / bitmap::PAGE_BLOCKS);
            }
        }
        self.write_pages(pages, out);
    }

    /// Takes the activity log's hold for a write about to be issued; when
    /// extents enter the log, the bitmap of those leaving it and then the
    /// transaction go to disk first. False: the log is full, wait.
    fn al_begin(&mut self, blocks: (u64, u64), out: &mut Vec<Action>) -> bool {
        match self.al.begin(blocks) {
            Admit::Ready => true,
            Admit::Transaction { evicted } => {
                let pb = bitmap::PAGE_BLOCKS;
                let pages: BTreeSet<u64> = evicted
                    .iter()
                    .flat_map(|&e| {
                        let (f, end) = self.al.blocks_of(e);
                        f / pb..=(end - 1) / pb
                    })
                    .collect();
                self.write_pages(pages, out);
                self.counters.al_transactions += 1;
                out.push(Action::PersistActivityLog(self.al.snapshot()));
                true
            }
            Admit::Full => false,
        }
    }

    /// A write of ours reached the local disk (`local`) or is on the peer
    /// or marked out of sync (`peer`): once both, its hold is released.
    fn al_progress(&mut self, seq: Seq, local: bool, peer: bool, out: &mut Vec<Action>) {
        let Some(h) = self.al_writes.get_mut(&seq) else {
            return;
        };
        h.local_done |= local;
        h.peer_done |= peer;
        if h.local_done && h.peer_done {
            let blocks = h.blocks;
            self.al_writes.remove(&seq);
            self.al.end(blocks);
            if std::mem::take(&mut self.al_full) {
                self.release_held(out);
            }
        }
    }

    /// The peer's side of every write is settled (it is there or marked).
    fn release_peer_holds(&mut self, out: &mut Vec<Action>) {
        let seqs: Vec<Seq> = self.al_writes.keys().copied().collect();
        for seq in seqs {
            self.al_progress(seq, false, true, out);
        }
    }

    /// Called once before anything else: after an unclean stop, the
    /// regions of the activity log are now marked; put that on disk.
    pub fn started(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        if std::mem::take(&mut self.unclean) {
            // Remembered through a clean stop before the next resync.
            if self.lost_cache {
                out.push(Action::Persist(self.meta()));
            }
            self.sync_bitmap(&mut out);
        }
        if self.role == Role::Primary {
            // Resumed (see `Setup::resume_primary`): the kernel device is
            // served again; writes wait for the peer as after any link loss.
            out.push(Action::Persist(self.meta()));
            out.push(Action::Log {
                warn: false,
                message: "resumed as primary: the kernel device was still attached".into(),
            });
            out.push(Action::RoleChanged(Role::Primary));
        }
        out
    }

    /// A clean stop, called once no disk work is outstanding: writes not
    /// known to be on the peer are marked, the bitmap is written and the
    /// activity log emptied. Returns the actions and whether the stop is
    /// clean (nothing left that the next start must treat as a crash).
    pub fn stop(&mut self) -> (Vec<Action>, bool) {
        let mut out = Vec::new();
        // A write still on its way to the local disk keeps its extent in
        // the log (and the stop unclean).
        for (_, h) in self.al_writes.iter().filter(|(_, h)| h.local_done) {
            if !h.peer_done {
                let blocks = h.blocks;
                if let Some(d) = &mut self.dirty {
                    d.extend(blocks.0..blocks.1);
                }
            }
        }
        let done: Vec<Seq> = self
            .al_writes
            .iter()
            .filter(|(_, h)| h.local_done)
            .map(|(s, _)| *s)
            .collect();
        for seq in done {
            if let Some(h) = self.al_writes.remove(&seq) {
                self.al.end(h.blocks);
            }
        }
        self.sync_bitmap(&mut out);
        let left = self.al.drop_idle();
        let clean = left.is_empty();
        out.push(Action::PersistActivityLog(left));
        (out, clean)
    }

    /// Starts writing without the peer: a new generation, so that the peer's
    /// copy can later be recognised as older (the bitmap starts at its gen).
    fn begin_alone_writes(&mut self, out: &mut Vec<Action>) {
        // A resync that ended on the peer (it adopted our generation) but
        // whose acknowledgement was lost leaves our bitmap generation set:
        // writing on at the generation the peer now holds would make two
        // different copies look the same. So a new generation, with the
        // bitmap counted from the one the peer may hold (a peer that did
        // not adopt it is half-written and gets a full resync).
        let shared = std::mem::take(&mut self.peer_may_hold) == Some(self.current_gen);
        if self.bitmap_gen == 0 || shared {
            self.bitmap_gen = self.current_gen;
            self.current_gen = self.next_gen();
            out.push(Action::Persist(self.meta()));
            out.push(Action::Log {
                warn: true,
                message: format!(
                    "writing without the peer: new generation {:016x}, peer's copy stays at {:016x}",
                    self.current_gen, self.bitmap_gen
                ),
            });
        }
    }

    // ---- application requests (primary) --------------------------------

    pub fn request(&mut self, id: ReqId, req: Request) -> Vec<Action> {
        let mut out = Vec::new();
        if self.role != Role::Primary {
            out.push(Action::Complete {
                id,
                result: Err(crate::core::nbd::EPERM),
            });
            return out;
        }
        if self.disk == DiskState::Failed && !self.peer_ready {
            // Detached, and no peer to serve it: the error is the truth.
            out.push(Action::Complete {
                id,
                result: Err(crate::core::nbd::EIO),
            });
            return out;
        }
        if self.must_hold() || !self.held.is_empty() {
            if self.held.is_empty() && !self.al_full {
                out.push(Action::Log {
                    warn: true,
                    message: "I/O frozen: the peer is not connected and the mode is sync; it resumes when the peer is back or after `hadb volume go-alone`".into(),
                });
            }
            self.counters.held_requests += 1;
            self.held.push_back((id, req));
            return out;
        }
        self.issue(id, req, &mut out);
        out
    }

    fn issue(&mut self, id: ReqId, req: Request, out: &mut Vec<Action>) {
        let blocks = req.blocks();
        if let Some(r) = blocks
            && !self.al_begin(r, out)
        {
            // Every extent of the log is busy: wait for a write to finish.
            self.al_full = true;
            self.held.push_front((id, req));
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.last_app_write_us = self.now_us;
        let to_peer = self.peer_ready;
        if !to_peer {
            self.begin_alone_writes(out);
            if let Some(r) = blocks {
                self.mark_dirty(r);
            }
        }
        if let (Some(r), Some(v)) = (blocks, &mut self.verify) {
            // A verify read of these blocks may predate this write, which
            // the peer will apply before it reads: compare them again.
            for (_, invalid) in v.reads.range_mut(r.0.saturating_sub(VERIFY_CHUNK)..r.1) {
                *invalid = true;
            }
        }
        if let (Some(r), Some(rs)) = (blocks, &mut self.resync) {
            // A resync read of these blocks may have seen older data; its
            // frame would overwrite this write on the peer.
            for (_, (count, invalid)) in rs.reads.range_mut(r.0.saturating_sub(RESYNC_RUN)..r.1) {
                let _ = count;
                *invalid = true;
            }
        }
        let (op, header) = match &req {
            Request::Write { offset, data, fua } => {
                self.counters.writes += 1;
                self.counters.written_bytes += data.len() as u64;
                let mut h = wire::Header::new(Kind::Data, seq, *offset, data.len() as u32);
                if *fua {
                    h.flags |= wire::FLAG_FUA;
                }
                (
                    DiskOp::Write {
                        offset: *offset,
                        data: data.clone(),
                        fua: *fua,
                    },
                    h,
                )
            }
            Request::Zeroes {
                offset,
                length,
                punch,
                fua,
            } => {
                self.counters.writes += 1;
                let mut h = wire::Header::new(Kind::Zeroes, seq, *offset, *length as u32);
                if *punch {
                    h.flags |= wire::FLAG_PUNCH;
                }
                if *fua {
                    h.flags |= wire::FLAG_FUA;
                }
                (
                    DiskOp::Zeroes {
                        offset: *offset,
                        length: *length,
                        punch: *punch,
                        fua: *fua,
                    },
                    h,
                )
            }
            Request::Flush => {
                self.counters.flushes += 1;
                (DiskOp::Flush, wire::Header::new(Kind::Flush, seq, 0, 0))
            }
        };
        let peer_done = match (to_peer, self.mode) {
            (true, Mode::Async) => None,
            (true, _) => Some(false),
            (false, _) => None,
        };
        if to_peer {
            // The peer may hold these blocks only in a volatile cache until
            // a flush: remember them, so a peer that goes away (and may have
            // lost its cache) gets them again.
            match (&req, blocks) {
                (Request::Flush, _) => {
                    let since = std::mem::take(&mut self.peer_volatile);
                    self.peer_flushes.insert(seq, since);
                }
                (_, Some(r)) => self.peer_volatile.extend(r.0..r.1),
                _ => {}
            }
            let payload = match &req {
                Request::Write { data, .. } => {
                    self.counters.replicated_bytes += data.len() as u64;
                    Some(data.clone())
                }
                _ => None,
            };
            out.push(Action::Send(Frame { header, payload }));
        }
        // A failed disk is detached (DRBD's `on-io-error detach`): the
        // write goes to the peer alone and completes on its word.
        let diskless = self.disk == DiskState::Failed;
        if !diskless {
            out.push(Action::Disk {
                tag: DiskTag::Local(seq),
                op,
            });
        }
        self.pending.insert(
            seq,
            Pending {
                id,
                issued_us: self.now_us,
                blocks,
                local_done: diskless,
                peer_done,
                error: None,
                local_error: diskless.then_some(crate::core::nbd::EIO),
            },
        );
        if let Some(r) = blocks {
            self.al_writes.insert(
                seq,
                AlHold {
                    blocks: r,
                    local_done: diskless,
                    // Not sent: marked out of sync above.
                    peer_done: !to_peer,
                },
            );
        }
    }

    pub fn disk_done(&mut self, tag: DiskTag, result: Result<Option<Payload>, u32>) -> Vec<Action> {
        let mut out = Vec::new();
        if let DiskTag::FromPeer(seq, session) = tag
            && let Some(blocks) = self.al_applied.remove(&(seq, session))
        {
            // On the local disk (or failed, and the copy with it): the
            // primary's own log covers the rest.
            self.al.end(blocks);
        }
        match tag {
            DiskTag::Local(seq) => {
                self.al_progress(seq, true, false, &mut out);
                if let Some(p) = self.pending.get_mut(&seq) {
                    p.local_done = true;
                    if let Err(e) = result {
                        p.local_error = Some(e);
                        self.counters.write_errors += 1;
                        let blocks = p.blocks;
                        if let Some(r) = blocks {
                            // The copies differ here: the peer may hold it.
                            self.mark_dirty(r);
                        }
                        self.local_disk_failed(
                            &format!("a write or flush failed with errno {e}"),
                            &mut out,
                        );
                    }
                }
                self.try_complete(seq, &mut out);
            }
            // Work asked for by an earlier link session: its answer would
            // be taken for one of this session's (sequence numbers and
            // blocks repeat), so it is dropped; the resync that follows a
            // reconnect covers it.
            DiskTag::FromPeer(_, session)
            | DiskTag::ResyncRead(_, session)
            | DiskTag::ResyncFlush(_, session)
            | DiskTag::VerifyRead(_, session)
            | DiskTag::VerifyPeer(_, session)
                if session != self.session => {}
            DiskTag::VerifyRead(first, _) => self.verify_read_done(first, result, &mut out),
            DiskTag::VerifyPeer(seq, _) => self.verify_peer_read_done(seq, result, &mut out),
            DiskTag::FromPeer(seq, _) => match result {
                Ok(_) => out.push(Action::Send(Frame {
                    header: wire::Header::new(Kind::Ack, seq, 0, 0),
                    payload: None,
                })),
                Err(e) => {
                    self.counters.write_errors += 1;
                    out.push(Action::Send(Frame {
                        header: wire::Header::new(Kind::Nack, seq, e as u64, 0),
                        payload: None,
                    }));
                    if self.disk != DiskState::Failed {
                        // A copy that cannot be written is no copy: say so,
                        // so the primary stops counting on it, and on disk
                        // where it can still be written, so a restart
                        // never finds it promotable.
                        self.disk = DiskState::Failed;
                        out.push(Action::Persist(self.meta()));
                        out.push(Action::Log {
                            warn: true,
                            message: format!("local disk failed (errno {e}) while applying the primary's writes: this copy is failed until repaired"),
                        });
                        out.push(self.state_frame(Kind::State));
                    }
                }
            },
            DiskTag::ResyncRead(first, _) => self.resync_read_done(first, result, &mut out),
            DiskTag::ResyncFlush(seq, _) => {
                // The whole resync is durable here: adopt the source's
                // generation, then tell it.
                let adopt = self.adopt_at_resync_end.take();
                if let (Ok(_), Some(s)) = (&result, adopt) {
                    self.volume_id = s.volume_id;
                    self.current_gen = s.current_gen;
                    self.bitmap_gen = 0;
                    self.dirty = Some(Bitmap::default());
                    self.disk = if std::mem::take(&mut self.outdated_at_resync_end) {
                        DiskState::Outdated
                    } else {
                        DiskState::UpToDate
                    };
                    self.crashed_primary = false;
                    self.lost_cache = false;
                    self.link = LinkState::Connected;
                    out.push(Action::Persist(self.meta()));
                    self.sync_bitmap(&mut out);
                    out.push(Action::Log {
                        warn: false,
                        message: format!("resync finished: local disk {}", self.disk),
                    });
                    out.push(Action::Send(Frame {
                        header: wire::Header::new(Kind::Ack, seq, 0, 0),
                        payload: None,
                    }));
                    out.push(self.state_frame(Kind::State));
                } else if result.is_ok() {
                    // No ResyncDone of this session to adopt: nothing to do.
                } else {
                    // Never adopted: this copy stays inconsistent on disk
                    // (never promotable) and failed here; the source sends
                    // everything again at the next resync.
                    self.counters.write_errors += 1;
                    self.disk = DiskState::Failed;
                    out.push(Action::Persist(self.meta()));
                    out.push(Action::Log {
                        warn: true,
                        message: "the flush that ends the resync failed: local disk failed; the resync is not finished (this copy stays inconsistent until a resync succeeds)".into(),
                    });
                    out.push(Action::Send(Frame {
                        header: wire::Header::new(Kind::Nack, seq, crate::core::nbd::EIO as u64, 0),
                        payload: None,
                    }));
                    out.push(self.state_frame(Kind::State));
                }
            }
        }
        out
    }

    fn try_complete(&mut self, seq: Seq, out: &mut Vec<Action>) {
        let Some(p) = self.pending.get(&seq) else {
            return;
        };
        if !p.local_done || p.peer_done == Some(false) {
            return;
        }
        let p = self.pending.remove(&seq).expect("present");
        if self.mode == Mode::Semisync && p.blocks.is_some() {
            match p.peer_done {
                Some(true) => {
                    self.semisync.waited += 1;
                    self.semisync.wait_us_total += self.now_us.saturating_sub(p.issued_us);
                }
                _ => self.semisync.not_waited += 1,
            }
        }
        // A request the local disk failed stands on the peer's copy alone.
        let error = p
            .error
            .or(p.local_error.filter(|_| p.peer_done != Some(true)));
        out.push(Action::Complete {
            id: p.id,
            result: error.map_or(Ok(()), Err),
        });
        // A paced resync goes on as the application's writes complete.
        if self.resync.is_some() {
            self.resync_pump(out);
        }
    }

    // ---- the link -------------------------------------------------------

    /// The link is authenticated and up: say who we are.
    pub fn link_up(&mut self) -> Vec<Action> {
        self.session += 1;
        // A promise to end a resync outdated holds for the session it
        // was made in.
        self.outdated_at_resync_end = false;
        self.session_first_seq = self.next_seq;
        self.link = LinkState::Connected;
        self.peer = None;
        self.peer_ready = false;
        vec![self.state_frame(Kind::State)]
    }

    pub fn link_lost(&mut self) -> Vec<Action> {
        self.session += 1;
        self.adopt_at_resync_end = None;
        self.outdate_token = self.next_gen();
        let mut out = Vec::new();
        let was = self.link;
        // A refusal (split brain, unrelated data, sizes) stays visible while
        // the transport keeps retrying underneath.
        if was != LinkState::Standalone {
            self.link = LinkState::Connecting;
        }
        self.peer = None;
        self.peer_ready = false;
        self.role_request = None;
        if let Some(v) = self.verify.take() {
            out.push(Action::Log {
                warn: true,
                message: format!(
                    "link lost: online verify abandoned after {} block(s) ({} differed); start it again",
                    v.checked, v.differing
                ),
            });
            self.verify_result = Some((v.checked, v.differing));
            self.verify_complete = false;
            self.counters.verifies_ended += 1;
        }
        self.verify_asked.clear();
        if let Some(rs) = self.resync.take() {
            out.push(Action::Log {
                warn: true,
                message: "link lost during resync; it resumes on reconnect".into(),
            });
            // The peer may have finished and adopted the generation its
            // ResyncDone carried.
            self.peer_may_hold = rs.done_gen;
            if rs.done_gen.is_some() && self.alone {
                // A peer that finished is up to date and promotable: the
                // proof that let us go on alone (its outdated mark, or the
                // operator's word) died with the resync that ended it. Wait
                // for the peer again until a new proof.
                self.alone = false;
                if std::mem::take(&mut self.peer_outdated) {
                    out.push(Action::Persist(self.meta()));
                }
                out.push(Action::Log {
                    warn: true,
                    message: "the peer may have finished its resync and be up to date: waiting for it again (I/O holds until it is back, or it acknowledges outdated, or `hadb volume go-alone`)".into(),
                });
            }
            // What was read or sent but not acknowledged is still missing
            // on the peer.
            for (first, count) in rs.in_flight() {
                self.mark_dirty((first, first + count));
            }
        }
        if was == LinkState::SyncTarget {
            // Half-written: stays inconsistent until a resync finishes.
            self.disk = DiskState::Inconsistent;
        }
        // What the peer held only in its cache may be gone with it.
        let volatile: Vec<u64> = std::mem::take(&mut self.peer_volatile)
            .into_iter()
            .chain(
                std::mem::take(&mut self.peer_flushes)
                    .into_values()
                    .flatten(),
            )
            .collect();
        if let Some(d) = &mut self.dirty {
            d.extend(volatile);
        }
        // Everything the peer did not acknowledge may be missing there.
        let unacked: Vec<Seq> = self
            .pending
            .iter()
            .filter(|(_, p)| p.peer_done == Some(false))
            .map(|(s, _)| *s)
            .collect();
        for seq in unacked {
            let blocks = self.pending[&seq].blocks;
            if let Some(r) = blocks {
                self.mark_dirty(r);
            }
            if self.alone || self.mode == Mode::Async {
                if let Some(p) = self.pending.get_mut(&seq) {
                    p.peer_done = None;
                }
                self.try_complete(seq, &mut out);
            } else {
                self.awaiting_resync.insert(seq);
            }
        }
        // Every write sent is now on the peer or marked above.
        self.release_peer_holds(&mut out);
        self.awaiting_bitmap = false;
        if self.role == Role::Primary && !self.pending.is_empty() && self.must_hold() {
            out.push(Action::Log {
                warn: true,
                message: format!(
                    "replication link lost with {} write(s) unacknowledged: I/O frozen until the peer is back or `hadb volume go-alone`",
                    self.pending.len()
                ),
            });
        }
        out
    }

    pub fn frame(&mut self, h: wire::Header, payload: Option<Payload>) -> Vec<Action> {
        let mut out = Vec::new();
        match h.kind {
            Kind::State => match payload.as_deref().map(|p| NodeState::decode(p)) {
                Some(Ok(s)) => self.peer_state_changed(s, &mut out),
                _ => self.violation("state frame without a valid node state", &mut out),
            },
            Kind::Data | Kind::Zeroes | Kind::Flush | Kind::ResyncData => {
                if self.role == Role::Primary {
                    self.violation("the peer sent writes while this node is primary", &mut out);
                    return out;
                }
                let op = match h.kind {
                    Kind::Data | Kind::ResyncData => match payload {
                        Some(data) => {
                            if h.offset
                                .checked_add(data.len() as u64)
                                .is_none_or(|end| end > self.data_size)
                            {
                                self.violation("write past the end of the volume", &mut out);
                                return out;
                            }
                            if h.kind == Kind::ResyncData {
                                self.counters.resync_blocks_received +=
                                    (data.len() as u64).div_ceil(BLOCK);
                            } else {
                                self.counters.writes += 1;
                                self.counters.written_bytes += data.len() as u64;
                            }
                            DiskOp::Write {
                                offset: h.offset,
                                data,
                                fua: h.flags & wire::FLAG_FUA != 0,
                            }
                        }
                        None => {
                            self.violation("data frame without payload", &mut out);
                            return out;
                        }
                    },
                    Kind::Zeroes => {
                        if h.offset
                            .checked_add(h.length as u64)
                            .is_none_or(|end| end > self.data_size)
                        {
                            self.violation("zeroes past the end of the volume", &mut out);
                            return out;
                        }
                        DiskOp::Zeroes {
                            offset: h.offset,
                            length: h.length as u64,
                            punch: h.flags & wire::FLAG_PUNCH != 0,
                            fua: h.flags & wire::FLAG_FUA != 0,
                        }
                    }
                    _ => DiskOp::Flush,
                };
                let logged = match (&op, h.kind) {
                    (DiskOp::Write { offset, data, .. }, Kind::Data) => {
                        Some(block_range(*offset, data.len() as u64))
                    }
                    (DiskOp::Zeroes { offset, length, .. }, _) => {
                        Some(block_range(*offset, *length))
                    }
                    _ => None,
                };
                if let Some(r) = logged {
                    if !self.al_begin(r, &mut out) {
                        // Beyond reach: the primary's own log is as big.
                        self.violation("the activity log is full", &mut out);
                        return out;
                    }
                    self.al_applied.insert((h.seq, self.session), r);
                }
                out.push(Action::Disk {
                    tag: DiskTag::FromPeer(h.seq, self.session),
                    op,
                });
            }
            Kind::ResyncDone => match payload.as_deref().map(|p| NodeState::decode(p)) {
                Some(Ok(s)) => {
                    // Not clearing `outdated_at_resync_end`: a ResyncDone
                    // that follows our OutdateAck in this session was sent
                    // before the source went alone, and its generation is
                    // already behind.
                    // Adopted once the flush below succeeds: a failed
                    // flush may have lost resync writes (the kernel drops
                    // the pages it could not write back), and a copy that
                    // claims the source's generation would never get them
                    // again.
                    self.adopt_at_resync_end = Some(s);
                    out.push(Action::Disk {
                        tag: DiskTag::ResyncFlush(h.seq, self.session),
                        op: DiskOp::Flush,
                    });
                }
                _ => self.violation("resync-done without a valid node state", &mut out),
            },
            Kind::Bitmap => match payload {
                Some(p) if self.awaiting_bitmap && p.len() % 16 == 0 => {
                    let total = self.blocks_total();
                    let runs: Vec<(u64, u64)> = p
                        .chunks_exact(16)
                        .map(|c| {
                            let word = |i: usize| {
                                u64::from_le_bytes(c[i..i + 8].try_into().unwrap_or([0xff; 8]))
                            };
                            (word(0), word(8))
                        })
                        .collect();
                    // As `Bitmap::runs` makes them: each inside the
                    // volume, sorted and apart, also across the frames of
                    // one bitmap. Anything else is a peer off the protocol,
                    // and none of this frame is marked.
                    let mut next = self.bitmap_next;
                    let mut marked: u64 = 0;
                    for &(f, n) in &runs {
                        let Some(end) = f.checked_add(n).filter(|&e| n != 0 && e <= total) else {
                            self.violation("bitmap run past the end of the volume", &mut out);
                            return out;
                        };
                        if f < next {
                            self.violation("bitmap runs overlap or are out of order", &mut out);
                            return out;
                        }
                        // Implied by the two checks above; kept so that no
                        // change to them lets a frame mark more than the
                        // volume holds.
                        marked = match marked.checked_add(n).filter(|&m| m <= total) {
                            Some(m) => m,
                            None => {
                                self.violation(
                                    "bitmap runs add up to more than the volume",
                                    &mut out,
                                );
                                return out;
                            }
                        };
                        next = end;
                    }
                    self.bitmap_next = next;
                    for (f, n) in runs {
                        self.mark_dirty((f, f + n));
                    }
                }
                _ => self.violation("unexpected or malformed bitmap frame", &mut out),
            },
            Kind::BitmapDone if self.awaiting_bitmap => {
                self.awaiting_bitmap = false;
                self.start_resync(false, &mut out);
            }
            Kind::BitmapDone => self.violation("unexpected bitmap-done frame", &mut out),
            Kind::Ack => self.ack(h.seq, None, &mut out),
            Kind::Nack => self.ack(h.seq, Some(h.offset as u32), &mut out),
            Kind::RoleRequest => {
                // The asker's copy must be one a primary may have: up to
                // date at our generation (not one we are still resyncing),
                // or both fresh. Its own check was made before it asked,
                // and things may have moved since (we were promoted and
                // demoted meanwhile, say).
                let asker_current = self.peer.is_some_and(|p| {
                    (p.current_gen == 0 && self.current_gen == 0)
                        || (disk_from_code(p.disk) == DiskState::UpToDate
                            && p.current_gen == self.current_gen
                            && self.resync.is_none()
                            && !self.awaiting_bitmap)
                });
                let grant = self.role == Role::Secondary
                    && (self.role_request.is_none() || !self.me_first)
                    && asker_current;
                if grant {
                    self.role_request = None;
                }
                out.push(Action::Send(Frame {
                    header: wire::Header::new(Kind::RoleReply, 0, grant as u64, 0),
                    payload: None,
                }));
            }
            Kind::RoleReply => {
                if self.role_request.take().is_some() {
                    if h.offset == 1 {
                        self.become_primary(&mut out);
                    } else {
                        out.push(Action::Log { warn: true, message: "the peer refused to let this node become primary (it is primary, asked first, or does not hold this copy as up to date)".into() });
                    }
                }
            }
            Kind::Ping => out.push(Action::Send(Frame {
                header: wire::Header::new(Kind::Pong, h.seq, 0, 0),
                payload: None,
            })),
            Kind::Pong => {}
            Kind::VerifyRequest => {
                let end = h.offset.checked_add(h.length as u64);
                if self.role == Role::Primary
                    || end.is_none_or(|e| e > self.data_size)
                    || h.length > (VERIFY_CHUNK * BLOCK) as u32
                {
                    self.violation("verify request out of place or out of bounds", &mut out);
                    return out;
                }
                let digests = payload.unwrap_or_default();
                self.verify_asked
                    .insert(h.seq, (h.offset, h.length, digests));
                out.push(Action::Disk {
                    tag: DiskTag::VerifyPeer(h.seq, self.session),
                    op: DiskOp::Read {
                        offset: h.offset,
                        length: h.length as u64,
                    },
                });
            }
            Kind::VerifyReply => self.verify_reply(h, payload, &mut out),
            Kind::OutdateRequest => {
                if self.role == Role::Primary {
                    self.violation("the peer asked the primary to outdate itself", &mut out);
                    return out;
                }
                if self.disk == DiskState::Inconsistent {
                    // A resync finishing now (its flush under way) ends
                    // outdated, not up to date.
                    self.outdated_at_resync_end = true;
                }
                if self.disk == DiskState::UpToDate {
                    self.disk = DiskState::Outdated;
                    out.push(Action::Log {
                        warn: true,
                        message: "the primary went on without this node (semisync): local copy marked outdated".into(),
                    });
                }
                // Persisted before the answer: the Ack is the promise.
                out.push(Action::Persist(self.meta()));
                out.push(Action::Send(Frame {
                    header: wire::Header::new(Kind::OutdateAck, 0, 0, 0),
                    payload: None,
                }));
            }
            Kind::OutdateAck => {
                if self.role == Role::Primary
                    && self.mode == Mode::Semisync
                    && !self.alone
                    && self.outdate_asked
                {
                    // The peer is outdated on disk: stop waiting for it, and
                    // drop the slow link; it comes back as a resync target.
                    self.peer_outdated = true;
                    self.go_alone_because(
                        "semisync: the peer acknowledged that its copy is outdated",
                        &mut out,
                    );
                    out.push(Action::DropLink("semisync: peer too slow, outdated".into()));
                } else {
                    // The peer outdated itself but this node no longer
                    // needs that (demoted, or the acks came after all):
                    // reconnect, and the connect rules find its copy
                    // current again.
                    out.push(Action::DropLink(
                        "the peer outdated itself needlessly; reconnecting".into(),
                    ));
                }
            }
        }
        out
    }

    fn violation(&mut self, what: &str, out: &mut Vec<Action>) {
        self.counters.protocol_errors += 1;
        out.push(Action::DropLink(format!("protocol violation: {what}")));
    }

    fn ack(&mut self, seq: Seq, error: Option<u32>, out: &mut Vec<Action>) {
        if seq < self.session_first_seq {
            // For a frame of an earlier session; what it covered was marked
            // out of sync when that session ended.
            return;
        }
        self.counters.peer_acks += 1;
        if let Some(e) = error {
            // The peer could not write it. The write still waits: the
            // peer's next frame says its disk failed (the proof that lets
            // the primary go on), or the link drops and it is held as for
            // any lost peer.
            out.push(Action::Log {
                warn: true,
                message: format!(
                    "the peer failed to write (errno {e}); its copy is now out of date"
                ),
            });
            if let Some(blocks) = self
                .pending
                .get(&seq)
                .and_then(|p| p.blocks)
                .or(self.al_writes.get(&seq).map(|h| h.blocks))
            {
                self.mark_dirty(blocks);
            }
            self.al_progress(seq, false, true, out);
            let mut resend_all = false;
            if let Some(rs) = &mut self.resync
                && let Some((first, count)) = rs.unacked.remove(&seq)
            {
                if rs.done_sent && count == 0 {
                    // The peer could not make the resync durable: what it
                    // acknowledged may be gone from its disk. Nothing of
                    // this resync counts; it starts again, whole.
                    rs.done_sent = false;
                    rs.done_gen = None;
                    rs.cursor = 0;
                    resend_all = true;
                } else if let Some(d) = &mut self.dirty {
                    d.extend(first..first + count);
                }
            }
            if resend_all {
                out.push(Action::Log {
                    warn: true,
                    message: "the peer failed to flush the end of the resync: it is not finished; every block is sent again".into(),
                });
                self.mark_all_dirty(out);
            }
            return;
        }
        if let Some(rs) = &mut self.resync
            && rs.unacked.remove(&seq).is_some()
        {
            self.resync_pump(out);
            return;
        }
        if error.is_none() {
            // Durable on the peer now.
            self.peer_flushes.remove(&seq);
        }
        self.al_progress(seq, false, true, out);
        if let Some(p) = self.pending.get_mut(&seq) {
            p.peer_done = Some(true);
            self.try_complete(seq, out);
        }
    }

    fn peer_state_changed(&mut self, s: NodeState, out: &mut Vec<Action>) {
        let first = self.peer.is_none();
        self.peer = Some(s);
        if disk_from_code(s.disk) == DiskState::Failed && self.role == Role::Primary {
            self.peer_disk_failed(out);
            return;
        }
        if !first {
            return;
        }
        if s.data_size != self.data_size {
            out.push(Action::Log {
                warn: true,
                message: format!(
                    "the peer's volume has {} data bytes, this one {}: refusing to replicate; make both backing devices the same size",
                    s.data_size, self.data_size
                ),
            });
            self.link = LinkState::Standalone;
            out.push(Action::DropLink("data sizes differ".into()));
            return;
        }
        if s.role == 1 && self.role == Role::Primary {
            out.push(Action::Log {
                warn: true,
                message: "both nodes are primary: refusing to connect (split brain); demote one"
                    .into(),
            });
            self.link = LinkState::Standalone;
            out.push(Action::DropLink("both primary".into()));
            return;
        }
        if self.role == Role::Primary && self.disk == DiskState::Failed {
            self.connect_detached(s, out);
            return;
        }
        if s.role == 1 && disk_from_code(s.disk) == DiskState::Failed {
            // The mirror image: the primary's disk is detached. This copy
            // is the only one; it serves the primary if it is current, and
            // never takes a resync from a disk that failed.
            if self.disk == DiskState::UpToDate && s.current_gen == self.current_gen {
                self.last_rule = Some("the primary's disk is detached: this copy serves it");
                out.push(Action::Log {
                    warn: true,
                    message: "connected to peer: its disk is detached; this copy serves its reads and writes".into(),
                });
                self.link = LinkState::Connected;
            } else {
                self.last_rule =
                    Some("the primary's disk is detached and this copy is not current");
                out.push(Action::Log {
                    warn: true,
                    message: "refusing to connect: the primary's disk is detached (failed) and this copy is not up to date at its generation; nothing can bring it up to date from a failed disk".into(),
                });
                self.link = LinkState::Standalone;
                out.push(Action::DropLink(
                    "detached primary, this copy not current".into(),
                ));
            }
            return;
        }
        let (me, peer) = self.gen_views(&s);
        let d = decide(me, peer);
        self.last_rule = Some(d.rule());
        out.push(Action::Log {
            warn: matches!(d, SyncDecision::SplitBrain | SyncDecision::Unrelated),
            message: format!("connected to peer: {}", d.rule()),
        });
        match d {
            SyncDecision::InSync => {
                if self.disk == DiskState::Outdated {
                    // Outdated, but nothing was written without us since:
                    // the copy is current after all; the peer must hear it.
                    self.disk = DiskState::UpToDate;
                    out.push(Action::Persist(self.meta()));
                    out.push(self.state_frame(Kind::State));
                }
                self.link = LinkState::Connected;
                self.dirty = Some(Bitmap::default());
                self.peer_is_current(out);
            }
            SyncDecision::BothFresh => {
                self.link = LinkState::Connected;
                if self.role == Role::Primary {
                    // Only reachable via --force before the peer was seen.
                    self.start_resync(true, out);
                }
            }
            SyncDecision::SourceBitmap => self.await_bitmap(),
            SyncDecision::SourceFull => self.start_resync(true, out),
            SyncDecision::TargetBitmap | SyncDecision::TargetFull => {
                self.become_sync_target(d == SyncDecision::TargetBitmap, out)
            }
            SyncDecision::SplitBrain | SyncDecision::Unrelated => {
                if d == SyncDecision::SplitBrain {
                    self.split_brain = Some(SplitBrainReport {
                        since_gen: self.bitmap_gen,
                        my_changes: me.changes,
                        peer_changes: peer.changes,
                    });
                }
                let verdict = match d {
                    SyncDecision::SplitBrain => {
                        resolve_split_brain(me, peer, self.after_split_brain)
                    }
                    // Unrelated data is resolved only by the operator's word.
                    _ => (me.discard != peer.discard).then_some(me.discard),
                };
                match verdict {
                    Some(true) if self.role == Role::Primary => {
                        out.push(Action::Log {
                            warn: true,
                            message: "split brain: this node's copy would be discarded, but it is primary; demote it first".into(),
                        });
                        self.link = LinkState::Standalone;
                        out.push(Action::DropLink(d.rule().into()));
                    }
                    Some(true) => {
                        out.push(Action::Log {
                            warn: true,
                            message: format!(
                                "{}: discarding this node's copy ({}); receiving a resync from the peer",
                                d.rule(),
                                if self.discard_my_data { "operator's discard-my-data" } else { "after_split_brain policy" }
                            ),
                        });
                        self.split_brain = None;
                        self.discard_my_data = false;
                        // Both bitmaps since the parting cover every block
                        // either side changed.
                        let bitmaps =
                            d == SyncDecision::SplitBrain && me.has_bitmap && peer.has_bitmap;
                        self.become_sync_target(bitmaps, out);
                    }
                    Some(false) => {
                        out.push(Action::Log {
                            warn: true,
                            message: format!(
                                "{}: the peer's copy is discarded; resync to it",
                                d.rule()
                            ),
                        });
                        self.split_brain = None;
                        if d == SyncDecision::SplitBrain && me.has_bitmap && peer.has_bitmap {
                            self.await_bitmap();
                        } else {
                            self.start_resync(true, out);
                        }
                    }
                    None => {
                        if self.split_brain_logged != Some(d) {
                            out.push(Action::Log {
                                warn: true,
                                message: "not resolved by itself: run `hadb volume discard-my-data` on the node whose changes are to be thrown away".into(),
                            });
                            self.split_brain_logged = Some(d);
                        }
                        self.link = LinkState::Standalone;
                        out.push(Action::DropLink(d.rule().into()));
                    }
                }
            }
        }
    }

    /// A bitmap resync from here: the target sends its own marks first.
    fn await_bitmap(&mut self) {
        // Not Connected: the peer is not up to date until the resync ends.
        self.link = LinkState::SyncSource;
        self.awaiting_bitmap = true;
        self.bitmap_next = 0;
    }

    /// This copy is rewritten from the peer's; with `bitmap`, only the
    /// union of both bitmaps, so send ours.
    fn become_sync_target(&mut self, bitmap: bool, out: &mut Vec<Action>) {
        self.link = LinkState::SyncTarget;
        self.disk = DiskState::Inconsistent;
        out.push(Action::Persist(self.meta()));
        if !bitmap {
            return;
        }
        let runs = self.dirty.as_ref().map(|d| d.runs()).unwrap_or_default();
        for chunk in runs.chunks(BITMAP_FRAME_RUNS) {
            let mut payload = Vec::with_capacity(chunk.len() * 16);
            for (f, c) in chunk {
                payload.extend_from_slice(&f.to_le_bytes());
                payload.extend_from_slice(&c.to_le_bytes());
            }
            out.push(Action::Send(Frame {
                header: wire::Header::new(Kind::Bitmap, 0, 0, payload.len() as u32),
                payload: Some(Arc::new(payload)),
            }));
        }
        out.push(Action::Send(Frame {
            header: wire::Header::new(Kind::BitmapDone, 0, 0, 0),
            payload: None,
        }));
    }

    /// The peer holds everything we completed: replicate from here on, and
    /// release what waited for it.
    fn peer_is_current(&mut self, out: &mut Vec<Action>) {
        self.peer_ready = true;
        // Caught up: back to waiting for the peer (semisync's return to
        // ON; the end of go-alone).
        self.alone = false;
        self.outdate_asked = false;
        self.peer_may_hold = None;
        if self.bitmap_gen != 0 || self.peer_outdated {
            self.bitmap_gen = 0;
            self.peer_outdated = false;
            out.push(Action::Persist(self.meta()));
        }
        for seq in std::mem::take(&mut self.awaiting_resync) {
            if let Some(p) = self.pending.get_mut(&seq) {
                p.peer_done = Some(true);
            }
            self.try_complete(seq, out);
        }
        self.release_held(out);
    }

    /// A primary whose disk is detached meets its peer: it has no copy to
    /// resync from or to, so it goes on through the peer only if the peer
    /// holds everything this node acknowledged (up to date at this node's
    /// generation). Writes that waited for a peer that never acknowledged
    /// them are on no good copy: they fail.
    fn connect_detached(&mut self, s: NodeState, out: &mut Vec<Action>) {
        self.fail_unreplicated(out);
        if disk_from_code(s.disk) == DiskState::UpToDate && s.current_gen == self.current_gen {
            self.last_rule = Some("this node's disk is detached: going on through the peer");
            out.push(Action::Log {
                warn: true,
                message: "connected to peer: this node's disk is detached; reads and writes go on through the peer, which is up to date".into(),
            });
            self.link = LinkState::Connected;
            self.peer_is_current(out);
        } else {
            self.last_rule = Some("this node's disk is detached and the peer is not current");
            out.push(Action::Log {
                warn: true,
                message: "refusing to connect: this node's disk is detached (failed) and the peer's copy is not up to date at this node's generation, so no copy here can bring it up to date; repair this disk, or make the peer primary (`hadb volume primary --force` there) if its data is to be kept".into(),
            });
            self.link = LinkState::Standalone;
            out.push(Action::DropLink(
                "detached primary, peer not current".into(),
            ));
        }
    }

    /// The local disk is detached and the peer never acknowledged these
    /// writes: no good copy holds them, so they fail (EIO) rather than
    /// wait for a resync that has nothing to send.
    fn fail_unreplicated(&mut self, out: &mut Vec<Action>) {
        for seq in std::mem::take(&mut self.awaiting_resync) {
            if let Some(p) = self.pending.get_mut(&seq) {
                p.peer_done = None;
                p.error = Some(crate::core::nbd::EIO);
            }
            self.try_complete(seq, out);
        }
        for (id, _) in std::mem::take(&mut self.held) {
            out.push(Action::Complete {
                id,
                result: Err(crate::core::nbd::EIO),
            });
        }
    }

    fn release_held(&mut self, out: &mut Vec<Action>) {
        while !self.must_hold() && !self.al_full {
            let Some((id, req)) = self.held.pop_front() else {
                break;
            };
            self.issue(id, req, out);
        }
    }

    fn start_resync(&mut self, full: bool, out: &mut Vec<Action>) {
        if full || self.dirty.is_none() {
            self.mark_all_dirty(out);
        }
        let total = self.dirty.as_ref().map_or(0, |d| d.len());
        self.counters.resyncs_started += 1;
        self.link = LinkState::SyncSource;
        // The peer applies application writes in order with the resync, so
        // it takes them from now on; it becomes up to date at the end.
        self.peer_ready = true;
        self.release_held(out);
        out.push(Action::Log {
            warn: false,
            message: format!("resync to the peer: {total} block(s) of {BLOCK} bytes"),
        });
        self.resync = Some(ResyncState {
            full,
            total_blocks: total,
            started_us: self.now_us,
            last_refill_us: self.now_us,
            budget: self.resync_burst(),
            ..Default::default()
        });
        self.resync_pump(out);
    }

    /// Keeps the resync window full; finishes when nothing is left.
    fn resync_pump(&mut self, out: &mut Vec<Action>) {
        let Some(rs) = &mut self.resync else { return };
        let Some(dirty) = &mut self.dirty else { return };
        if self.now_us < rs.retry_at_us {
            // Backing off after a failed read; the tick comes back.
            return;
        }
        // Application writes first: while any wait, the resync keeps only a
        // couple of reads in flight (the fill-target idea: a little resync
        // traffic in the pipe, never a wall of it).
        // A client writing at queue depth 1 leaves nothing pending between
        // its writes: recent writes count too, or each would wait behind
        // a full window of resync data.
        let app_waiting = !self.pending.is_empty()
            || self.now_us.saturating_sub(self.last_app_write_us) < APP_ACTIVE_US;
        let (window, run) = if app_waiting {
            (RESYNC_WINDOW_BUSY, RESYNC_RUN_BUSY)
        } else {
            (RESYNC_WINDOW, RESYNC_RUN)
        };
        // While the application writes, the resync also slows to
        // `resync_min_rate` (DRBD's c-min-rate), in bursts of one read.
        let rate = match (app_waiting, self.resync_min_rate, self.resync_rate) {
            (true, min, 0) if min > 0 => min,
            (true, min, max) if min > 0 => min.min(max),
            (_, _, max) => max,
        };
        let limited = rate > 0;
        let dt = self.now_us.saturating_sub(rs.last_refill_us);
        rs.last_refill_us = self.now_us;
        if limited {
            let burst = if app_waiting {
                run * BLOCK
            } else {
                (rate / 10).max(RESYNC_RUN * BLOCK)
            };
            rs.budget = (rs.budget + rate * dt / 1_000_000).min(burst);
        }
        while rs.reads.len() + rs.unacked.len() < window && (!limited || rs.budget >= run * BLOCK) {
            let Some(first) = dirty.first_from(rs.cursor) else {
                break;
            };
            let mut count = 1;
            while count < run && dirty.contains(&(first + count)) {
                count += 1;
            }
            for b in first..first + count {
                dirty.remove(&b);
            }
            rs.cursor = first + count;
            if limited {
                rs.budget -= count * BLOCK;
            }
            rs.reads.insert(first, (count, false));
            let offset = first * BLOCK;
            let length = (count * BLOCK).min(self.data_size - offset);
            out.push(Action::Disk {
                tag: DiskTag::ResyncRead(first, self.session),
                op: DiskOp::Read { offset, length },
            });
        }
        if dirty.is_empty() && rs.reads.is_empty() && rs.unacked.is_empty() && !rs.done_sent {
            rs.done_sent = true;
            rs.done_gen = Some(self.current_gen);
            let seq = self.next_seq;
            self.next_seq += 1;
            rs.unacked.insert(seq, (0, 0));
            let state = self.node_state();
            out.push(Action::Send(Frame {
                header: wire::Header::new(Kind::ResyncDone, seq, 0, 0),
                payload: Some(Arc::new(
                    NodeState {
                        disk: disk_code(DiskState::UpToDate),
                        dirty_blocks: 0,
                        ..state
                    }
                    .encode(),
                )),
            }));
        } else if rs.done_sent && rs.unacked.is_empty() {
            self.resync_finished(out);
        }
    }

    fn resync_read_done(
        &mut self,
        first: u64,
        result: Result<Option<Payload>, u32>,
        out: &mut Vec<Action>,
    ) {
        let Some(rs) = &mut self.resync else { return };
        let Some((count, invalid)) = rs.reads.remove(&first) else {
            return;
        };
        match result {
            Ok(Some(data)) if !invalid => {
                let seq = self.next_seq;
                self.next_seq += 1;
                rs.unacked.insert(seq, (first, count));
                rs.sent_blocks += count;
                self.counters.resync_blocks_sent += count;
                out.push(Action::Send(Frame {
                    header: wire::Header::new(
                        Kind::ResyncData,
                        seq,
                        first * BLOCK,
                        data.len() as u32,
                    ),
                    payload: Some(data),
                }));
            }
            Ok(_) => {
                // Raced with a write: read these blocks again.
                if let Some(d) = &mut self.dirty {
                    d.extend(first..first + count);
                }
            }
            Err(e) => {
                if let Some(d) = &mut self.dirty {
                    d.extend(first..first + count);
                }
                rs.read_errors += 1;
                if rs.read_errors >= RESYNC_READ_ATTEMPTS {
                    // The disk cannot give what the peer lacks: it is
                    // failed, and the resync waits for a repaired disk
                    // (or for the peer to take over with its own copy
                    // where that is up to date).
                    let rs = self.resync.take();
                    for (f, c) in rs.map(|r| r.in_flight()).unwrap_or_default() {
                        self.mark_dirty((f, f + c));
                    }
                    self.local_disk_failed(
                        &format!("resync reads failed {RESYNC_READ_ATTEMPTS} times in a row, last with errno {e}"),
                        out,
                    );
                    return;
                }
                // Back off, doubling: a disk that fails fast must not be
                // hammered at full speed.
                let wait = RESYNC_RETRY_US << (rs.read_errors - 1).min(6);
                rs.retry_at_us = self.now_us + wait;
                out.push(Action::Log {
                    warn: true,
                    message: format!(
                        "resync read failed (errno {e}); retrying those blocks in {} ms ({} of {RESYNC_READ_ATTEMPTS})",
                        wait / 1000,
                        rs.read_errors
                    ),
                });
                return;
            }
        }
        if let Some(rs) = &mut self.resync {
            rs.read_errors = 0;
        }
        self.resync_pump(out);
    }

    fn resync_finished(&mut self, out: &mut Vec<Action>) {
        let Some(rs) = self.resync.take() else { return };
        out.push(Action::Log {
            warn: false,
            message: format!("resync finished: {} block(s) sent", rs.sent_blocks),
        });
        self.link = LinkState::Connected;
        self.crashed_primary = false;
        let lost_cache = std::mem::take(&mut self.lost_cache);
        if self.disk == DiskState::Outdated || lost_cache {
            // This copy was the reference and the peer now holds it too:
            // whatever outdated it, or the cache it lost, is history.
            self.disk = DiskState::UpToDate;
            out.push(Action::Persist(self.meta()));
        }
        // The peer has flushed it all: the marks are gone for good.
        self.sync_bitmap(out);
        self.peer_is_current(out);
    }

    // ---- operator commands ----------------------------------------------

    pub fn promote(&mut self, force: bool) -> Result<Vec<Action>, PromoteError> {
        if self.role == Role::Primary {
            return Err(PromoteError::AlreadyPrimary);
        }
        if self.role_request.is_some() {
            return Err(PromoteError::RequestPending);
        }
        if self.peer.is_some_and(|p| p.role == 1) {
            return Err(PromoteError::PeerIsPrimary);
        }
        if self.peer.is_none() && self.link == LinkState::Connected {
            // The link is up and the peer's state not yet here: it may be
            // asking for the role itself, and the connect decision must
            // see the roles both sides announced.
            return Err(PromoteError::LinkStarting);
        }
        let connected = self.peer.is_some();
        if !force {
            if self.current_gen == 0
                && !(connected && self.peer.is_some_and(|p| p.current_gen == 0))
            {
                return Err(PromoteError::FreshVolume);
            }
            if self.current_gen != 0 && self.disk != DiskState::UpToDate {
                return Err(PromoteError::NotUpToDate(self.disk));
            }
        }
        let mut out = Vec::new();
        if connected {
            self.role_request = Some(force);
            out.push(Action::Send(Frame {
                header: wire::Header::new(Kind::RoleRequest, 0, 0, 0),
                payload: None,
            }));
        } else {
            self.become_primary(&mut out);
        }
        Ok(out)
    }

    fn become_primary(&mut self, out: &mut Vec<Action>) {
        if self.current_gen == 0 || self.disk != DiskState::UpToDate {
            // First primary of a fresh pair, or forced: this copy becomes the
            // reference the peer is synchronised from.
            self.current_gen = self.next_gen();
            self.bitmap_gen = 0;
            self.disk = DiskState::UpToDate;
            self.mark_all_dirty(out);
        }
        // Whatever this copy wrote before a crash is now the data; its
        // activity log, marked at the start, covers what the peer may lack.
        self.crashed_primary = false;
        self.role = Role::Primary;
        out.push(Action::Persist(self.meta()));
        out.push(Action::Log {
            warn: false,
            message: "promoted to primary".into(),
        });
        out.push(Action::RoleChanged(Role::Primary));
        if self.resync.is_some() {
            // Already the resync source: it goes on, and writes from now on
            // replicate alongside it.
            out.push(self.state_frame(Kind::State));
        } else if self.peer.is_some() {
            out.push(self.state_frame(Kind::State));
            let peer = self.peer.expect("connected");
            let (me, peer) = self.gen_views(&peer);
            let d = decide(me, peer);
            match d {
                SyncDecision::InSync => self.peer_is_current(out),
                // The peer decided without our promotion and sends no
                // bitmap: to be safe, everything.
                SyncDecision::SourceFull | SyncDecision::SourceBitmap => {
                    self.start_resync(true, out)
                }
                _ => {}
            }
        }
    }

    pub fn demote(&mut self) -> Result<Vec<Action>, DemoteError> {
        if self.role != Role::Primary {
            return Err(DemoteError::NotPrimary);
        }
        if !self.pending.is_empty() || !self.held.is_empty() {
            return Err(DemoteError::Busy {
                pending: self.pending.len() + self.held.len(),
            });
        }
        self.role = Role::Secondary;
        self.alone = false;
        let mut out = vec![
            Action::Persist(self.meta()),
            Action::Log {
                warn: false,
                message: "demoted to secondary".into(),
            },
            Action::RoleChanged(Role::Secondary),
        ];
        if self.peer.is_some() {
            out.push(self.state_frame(Kind::State));
        }
        Ok(out)
    }

    /// The operator's word that this node's copy may be thrown away to end
    /// a split brain (DRBD's `--discard-my-data`). Takes effect at the next
    /// connect; refused on a primary.
    pub fn discard_my_data(&mut self) -> Result<Vec<Action>, String> {
        if self.role == Role::Primary {
            return Err("this node is primary; its copy is the one in use. Demote it first (`hadb volume secondary`)".into());
        }
        self.discard_my_data = true;
        Ok(vec![Action::Log {
            warn: true,
            message: "operator: this node's changes since the split will be discarded at the next connect".into(),
        }])
    }

    /// Starts online verify: every block of both copies compared by digest
    /// while the volume is in use; differing blocks are marked out of sync
    /// and resent when it ends.
    pub fn verify_start(&mut self) -> Result<Vec<Action>, String> {
        if self.role != Role::Primary {
            return Err("verify runs on the primary".into());
        }
        if !self.peer_up_to_date() {
            return Err("the peer is not connected and up to date; verify compares two copies in sync (wait for the resync)".into());
        }
        if self.verify.is_some() {
            return Err("a verify is already running; see `hadb status`".into());
        }
        self.verify = Some(VerifyState::default());
        let mut out = vec![Action::Log {
            warn: false,
            message: "online verify started".into(),
        }];
        self.verify_pump(&mut out);
        Ok(out)
    }

    /// (blocks checked, blocks total, blocks differing) of a running verify.
    pub fn verify_progress(&self) -> Option<(u64, u64, u64)> {
        self.verify
            .as_ref()
            .map(|v| (v.checked, self.blocks_total(), v.differing))
    }

    /// (blocks checked, blocks differing, whether it covered everything)
    /// of the last verify that ended.
    pub fn verify_result(&self) -> Option<(u64, u64, bool)> {
        self.verify_result
            .map(|(c, d)| (c, d, self.verify_complete))
    }

    fn verify_pump(&mut self, out: &mut Vec<Action>) {
        let total = self.blocks_total();
        let Some(v) = &mut self.verify else { return };
        while v.reads.len() + v.asked.len() < 4 {
            let first = match v.redo.pop() {
                Some(first) => first,
                None if v.cursor < total => {
                    let first = v.cursor;
                    v.cursor += VERIFY_CHUNK.min(total - first);
                    first
                }
                None => break,
            };
            let count = VERIFY_CHUNK.min(total - first);
            v.reads.insert(first, false);
            let offset = first * BLOCK;
            let length = (count * BLOCK).min(self.data_size - offset);
            out.push(Action::Disk {
                tag: DiskTag::VerifyRead(first, self.session),
                op: DiskOp::Read { offset, length },
            });
        }
        if v.cursor >= total && v.redo.is_empty() && v.reads.is_empty() && v.asked.is_empty() {
            let v = self.verify.take().expect("checked");
            self.verify_result = Some((v.checked, v.differing));
            self.verify_complete = true;
            self.counters.verifies_ended += 1;
            out.push(Action::Log {
                warn: v.differing > 0,
                message: format!(
                    "online verify finished: {} block(s) checked, {} differ",
                    v.checked, v.differing
                ),
            });
            if v.differing > 0 && self.peer_ready && self.resync.is_none() {
                self.start_resync(false, out);
            }
        }
    }

    fn verify_read_done(
        &mut self,
        first: u64,
        result: Result<Option<Payload>, u32>,
        out: &mut Vec<Action>,
    ) {
        let Some(v) = &mut self.verify else { return };
        let Some(invalid) = v.reads.remove(&first) else {
            return;
        };
        match result {
            Ok(Some(data)) if !invalid && self.peer_ready => {
                let seq = self.next_seq;
                self.next_seq += 1;
                v.asked.insert(seq, first);
                let digests = block_digests(&data);
                out.push(Action::Send(Frame {
                    header: wire::Header::new(
                        Kind::VerifyRequest,
                        seq,
                        first * BLOCK,
                        data.len() as u32,
                    ),
                    payload: Some(Arc::new(digests)),
                }));
            }
            Ok(_) if invalid => v.redo.push(first),
            _ => {}
        }
        self.verify_pump(out);
    }

    fn verify_peer_read_done(
        &mut self,
        seq: Seq,
        result: Result<Option<Payload>, u32>,
        out: &mut Vec<Action>,
    ) {
        let Some((offset, length, theirs)) = self.verify_asked.remove(&seq) else {
            return;
        };
        let mut mask = 0u64;
        if let Ok(Some(data)) = result {
            let mine = block_digests(&data);
            for (i, (a, b)) in mine
                .chunks(wire::DIGEST_LEN)
                .zip(theirs.chunks(wire::DIGEST_LEN))
                .enumerate()
            {
                if a != b {
                    mask |= 1 << i;
                }
            }
        } else {
            mask = u64::MAX;
        }
        out.push(Action::Send(Frame {
            header: wire::Header::new(Kind::VerifyReply, seq, offset, length),
            payload: Some(Arc::new(mask.to_be_bytes().to_vec())),
        }));
    }

    fn verify_reply(&mut self, h: wire::Header, payload: Option<Payload>, out: &mut Vec<Action>) {
        let Some(v) = &mut self.verify else { return };
        let Some(first) = v.asked.remove(&h.seq) else {
            return;
        };
        let mask = payload
            .as_deref()
            .and_then(|p| p.get(..8))
            .map_or(u64::MAX, |b| u64::from_be_bytes(b.try_into().expect("8")));
        let count = (h.length as u64).div_ceil(BLOCK);
        v.checked += count;
        let mut differing = Vec::new();
        for i in 0..count {
            if mask & (1 << i) != 0 {
                differing.push(first + i);
            }
        }
        v.differing += differing.len() as u64;
        if !differing.is_empty() {
            out.push(Action::Log {
                warn: true,
                message: format!(
                    "verify: {} block(s) differ from block {first}; marked out of sync",
                    differing.len()
                ),
            });
            let pages: BTreeSet<u64> = differing.iter().map(|b| b / bitmap::PAGE_BLOCKS).collect();
            if let Some(d) = &mut self.dirty {
                d.extend(differing);
            }
            self.write_pages(pages, out);
        }
        self.verify_pump(out);
    }

    /// The generation rule the last connect was decided by.
    pub fn last_rule(&self) -> Option<&'static str> {
        self.last_rule
    }

    pub fn split_brain(&self) -> Option<SplitBrainReport> {
        self.split_brain
    }

    /// The peer says its disk failed: it can never be promoted with this
    /// data, which is the proof that lets even `sync` go on without it.
    /// Replication stops until it reconnects with a working disk; what is
    /// written meanwhile is marked out of sync.
    fn peer_disk_failed(&mut self, out: &mut Vec<Action>) {
        if let Some(rs) = self.resync.take() {
            for (first, count) in rs.in_flight() {
                self.mark_dirty((first, first + count));
            }
        }
        // Nothing sent is known to be on the failed copy.
        let sent: Vec<(u64, u64)> = self.al_writes.values().map(|h| h.blocks).collect();
        for r in sent {
            self.mark_dirty(r);
        }
        self.release_peer_holds(out);
        self.verify = None;
        self.link = LinkState::Connected;
        self.peer_ready = false;
        if !self.alone {
            self.go_alone_because("the peer's disk failed; it cannot be promoted", out);
        }
        // Writes sent and not yet acknowledged will never be: they stay
        // out of sync and complete locally.
        let waiting: Vec<Seq> = self
            .pending
            .iter()
            .filter(|(_, p)| p.peer_done == Some(false))
            .map(|(s, _)| *s)
            .collect();
        for seq in waiting {
            if let Some(r) = self.pending[&seq].blocks {
                self.mark_dirty(r);
            }
            if let Some(p) = self.pending.get_mut(&seq) {
                p.peer_done = None;
            }
            self.try_complete(seq, out);
        }
    }

    /// The driver's monotonic clock, in microseconds; set before each event
    /// so waits can be measured without the core reading a clock.
    pub fn set_now(&mut self, now_us: u64) {
        self.now_us = now_us;
    }

    /// Whether semisync is waiting for the peer right now (MySQL's
    /// Rpl_semi_sync_master_status: ON).
    pub fn semisync_on(&self) -> bool {
        self.mode == Mode::Semisync && self.role == Role::Primary && !self.alone
    }

    /// Called periodically. In semisync, a write the peer has not
    /// acknowledged within `ack_timeout` makes the primary ask the peer,
    /// over the link, to mark itself outdated; once it has (OutdateAck),
    /// the primary goes on without it. With the link down it waits for
    /// [`Replica::peer_proven_outdated`] (the heartbeat's word or a
    /// confirmed fence).
    pub fn tick(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        if self.resync.is_some() {
            self.resync_pump(&mut out);
        }
        if self.mode != Mode::Semisync || self.role != Role::Primary || self.alone {
            return out;
        }
        let oldest = self
            .pending
            .values()
            .filter(|p| p.peer_done == Some(false))
            .map(|p| p.issued_us)
            .min();
        let late = oldest.is_some_and(|t| self.now_us.saturating_sub(t) >= self.ack_timeout_us);
        // A detached primary has nothing to go on alone with: the peer
        // stays the copy, however slow.
        let detached = self.disk == DiskState::Failed;
        if late && !detached && self.peer.is_some() && !self.outdate_asked {
            self.outdate_asked = true;
            out.push(Action::Log {
                warn: true,
                message: format!(
                    "semisync: the peer has not acknowledged a write for {} ms; asking it to mark its copy outdated",
                    self.ack_timeout_us / 1000
                ),
            });
            out.push(Action::Send(Frame {
                header: wire::Header::new(Kind::OutdateRequest, 0, 0, 0),
                payload: None,
            }));
        }
        out
    }

    /// The proof that lets a primary go on without a peer it cannot
    /// reach, in `semisync` and in `sync` alike: the peer said (over the
    /// heartbeat) that its copy is outdated, or it was fenced and the
    /// fence confirmed. The manager calls this; nothing else may.
    /// `outdated_on_disk`: the proof is the peer's own word that its copy
    /// is outdated (not a fence), which is remembered on disk.
    pub fn peer_proven_outdated(&mut self, why: &str, outdated_on_disk: bool) -> Vec<Action> {
        let mut out = Vec::new();
        if self.mode == Mode::Async || self.role != Role::Primary || self.alone || self.peer_ready {
            return out;
        }
        self.peer_outdated |= outdated_on_disk;
        self.go_alone_because(why, &mut out);
        out
    }

    /// The primary cannot reach this copy and goes on without it (it
    /// asked over the heartbeat): mark it outdated on disk, so it is never
    /// promoted before a resync.
    pub fn outdate_self(&mut self, token: u64) -> Result<Vec<Action>, String> {
        if self.role == Role::Primary {
            return Err("this node is primary; only a secondary outdates its copy".into());
        }
        if self.peer_ready || self.link == LinkState::Connected && self.peer.is_some() {
            return Err(
                "the replication link is up; the primary outdates this copy over it if it must"
                    .into(),
            );
        }
        let mut out = Vec::new();
        // Echoed only while the copy is outdated on disk: the heartbeat
        // report waits for the Persist below (MetaGate).
        self.outdated_for = token;
        if self.disk == DiskState::UpToDate {
            self.disk = DiskState::Outdated;
            out.push(Action::Persist(self.meta()));
            out.push(Action::Log {
                warn: true,
                message: "the primary goes on without this node (asked over the heartbeat): local copy marked outdated".into(),
            });
        }
        Ok(out)
    }

    /// Goes on without the peer on a proof (counted as semisync's
    /// `no_times`).
    fn go_alone_because(&mut self, why: &str, out: &mut Vec<Action>) {
        self.semisync.went_alone += u64::from(self.mode == Mode::Semisync);
        self.stop_waiting_for_peer(why, out);
    }

    /// Releases everything that waits for the peer; writes from here on
    /// are local and marked out of sync.
    fn stop_waiting_for_peer(&mut self, why: &str, out: &mut Vec<Action>) {
        if self.disk == DiskState::Failed {
            // Detached: there is no copy here to go on alone with.
            out.push(Action::Log {
                warn: true,
                message: format!(
                    "not going on without the peer ({why}): this node's disk is detached (failed), so the writes waiting for the peer fail"
                ),
            });
            self.fail_unreplicated(out);
            return;
        }
        self.alone = true;
        out.push(Action::Log {
            warn: true,
            message: format!(
                "going on without the peer ({why}): writes are on this node only until it is back"
            ),
        });
        // What completes from here may be missing on the peer: a new
        // generation first, so the peer's copy is known older even if this
        // node stops before its next write.
        self.begin_alone_writes(out);
        if self.peer_outdated {
            // Remembered before anything completes alone.
            out.push(Action::Persist(self.meta()));
        }
        for seq in std::mem::take(&mut self.awaiting_resync) {
            if let Some(p) = self.pending.get_mut(&seq) {
                p.peer_done = None;
            }
            self.try_complete(seq, out);
        }
        self.release_held(out);
    }

    /// The operator's word that the primary may go on without its peer.
    /// Refused where it would change nothing: saying "going on alone" then
    /// would send the operator on with a wrong picture of the pair.
    pub fn go_alone(&mut self) -> Result<Vec<Action>, String> {
        if self.role != Role::Primary {
            return Err("this node is not primary: go-alone releases a primary's writes held for an absent peer; run it on the primary".into());
        }
        if self.peer_ready {
            return Err("the peer is connected and acknowledging writes: nothing is held, so there is nothing to release (go-alone is for a peer that is away)".into());
        }
        let mut out = Vec::new();
        self.stop_waiting_for_peer("operator's go-alone", &mut out);
        Ok(out)
    }

    /// A local disk failure the driver saw outside a request (a metadata
    /// write that failed).
    pub fn disk_failed(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        if self.disk != DiskState::Failed {
            self.disk = DiskState::Failed;
            out.push(Action::Log {
                warn: true,
                message: "local disk failed (its metadata cannot be written): this copy is failed until repaired".into(),
            });
            if self.peer.is_some() {
                out.push(self.state_frame(Kind::State));
            }
        }
        out
    }

    /// The local disk failed an application write or flush: it is
    /// detached. Its copy is failed (on disk too, where the metadata can
    /// still be written: not consistent, so never promotable); with an
    /// up-to-date peer, writes go on through it and the application sees
    /// no error, and the manager hands the primary role over.
    fn local_disk_failed(&mut self, why: &str, out: &mut Vec<Action>) {
        if self.disk == DiskState::Failed {
            return;
        }
        self.disk = DiskState::Failed;
        out.push(Action::Persist(self.meta()));
        out.push(Action::Log {
            warn: true,
            message: format!(
                "local disk failed ({why}): detached; {}",
                if self.peer_ready {
                    "writes go on through the peer, which holds every acknowledged write"
                } else {
                    "no peer to go on through: I/O fails"
                }
            ),
        });
        if self.peer.is_some() {
            out.push(self.state_frame(Kind::State));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bitmap frame of `runs` (first block, count).
    fn bitmap_frame(runs: &[(u64, u64)]) -> (wire::Header, Option<Payload>) {
        let mut p = Vec::new();
        for (f, n) in runs {
            p.extend_from_slice(&f.to_le_bytes());
            p.extend_from_slice(&n.to_le_bytes());
        }
        (
            wire::Header::new(Kind::Bitmap, 0, 0, p.len() as u32),
            Some(Arc::new(p)),
        )
    }

    #[test]
    fn a_bitmap_with_runs_out_of_order_overlapping_or_too_many_marks_nothing() {
        let bad: &[&[&[(u64, u64)]]] = &[
            // Unsorted within a frame.
            &[&[(10, 2), (4, 2)]],
            // Overlapping within a frame.
            &[&[(4, 4), (6, 2)]],
            // The same run twice.
            &[&[(4, 4), (4, 4)]],
            // Out of order across two frames of one bitmap.
            &[&[(10, 2)], &[(5, 1)]],
            // Overlapping across frames.
            &[&[(0, 32)], &[(31, 33)]],
            // More than the volume's 64 blocks.
            &[&[(0, 65)]],
            &[&[(60, u64::MAX)]],
        ];
        for frames in bad {
            let mut r = Replica::new(setup("a", "b", 5));
            r.await_bitmap();
            let before = r.out_of_sync_blocks();
            let (last, first) = frames.split_last().unwrap();
            for f in first {
                let (h, p) = bitmap_frame(f);
                let out = r.frame(h, p);
                assert!(
                    !out.iter().any(|a| matches!(a, Action::DropLink(_))),
                    "{frames:?}: a good frame dropped the link"
                );
            }
            let marked_before = r.out_of_sync_blocks();
            let (h, p) = bitmap_frame(last);
            let out = r.frame(h, p);
            assert!(
                out.iter()
                    .any(|a| matches!(a, Action::DropLink(w) if w.contains("protocol violation"))),
                "{frames:?}: accepted: {out:?}"
            );
            assert_eq!(r.counters.protocol_errors, 1, "{frames:?}");
            assert_eq!(
                r.out_of_sync_blocks(),
                marked_before,
                "{frames:?}: the bad frame marked blocks"
            );
            assert!(before.is_some());
        }

        // Sorted, apart (adjacent is fine), over two frames: all marked.
        let mut r = Replica::new(setup("a", "b", 5));
        r.await_bitmap();
        for f in [&[(1, 2), (3, 1)][..], &[(10, 4), (63, 1)][..]] {
            let (h, p) = bitmap_frame(f);
            let out = r.frame(h, p);
            assert!(out.is_empty(), "{out:?}");
        }
        assert_eq!(r.out_of_sync_blocks(), Some(8));
        assert_eq!(r.counters.protocol_errors, 0);
        // A new exchange starts from block 0 again.
        r.await_bitmap();
        let (h, p) = bitmap_frame(&[(0, 1)]);
        assert!(r.frame(h, p).is_empty());
    }

    fn setup(name: &str, peer: &str, generation: u64) -> Setup {
        Setup {
            mode: Mode::Sync,
            data_size: 64 * BLOCK,
            volume_id: [1; 16],
            current_gen: generation,
            bitmap_gen: 0,
            consistent: generation != 0,
            outdated: false,
            peer_outdated: false,
            lost_cache: false,
            ack_timeout_us: 1_000_000,
            resync_rate: 0,
            resync_min_rate: 0,
            crashed_primary: false,
            after_split_brain: AfterSplitBrain::Disconnect,
            gen_seed: 42,
            me: name.into(),
            peer: peer.into(),
            out_of_sync: Bitmap::default(),
            activity_log: Vec::new(),
            unclean: false,
            al_extents: 4,
            al_extent_blocks: 4,
            resume_primary: false,
        }
    }

    /// Two replicas joined by in-order queues and instant disks: enough to
    /// check the sequencing rules; the full simulation lives in tests/.
    struct Pair {
        nodes: [Replica; 2],
        disks: [Vec<u8>; 2],
        link: [VecDeque<Frame>; 2],
        completed: Vec<(ReqId, Result<(), u32>)>,
        connected: bool,
        /// The link breaks right after a frame of this kind is delivered.
        cut_after: Option<Kind>,
        /// The next this many reads on each node fail with EIO.
        failing_reads: [u32; 2],
    }

    impl Pair {
        fn new(generation: u64) -> Pair {
            Pair {
                nodes: [
                    Replica::new(setup("a", "b", generation)),
                    Replica::new(setup("b", "a", generation)),
                ],
                disks: [vec![0; 64 * 4096], vec![0; 64 * 4096]],
                link: [VecDeque::new(), VecDeque::new()],
                completed: Vec::new(),
                connected: false,
                cut_after: None,
                failing_reads: [0; 2],
            }
        }

        /// A pair whose first primary, a, lost its peer and went on alone
        /// on the operator's word.
        fn gone_alone() -> Pair {
            let mut p = Pair::new(0);
            p.connect();
            let a = p.nodes[0].promote(false).unwrap();
            p.run(0, a);
            p.disconnect();
            let a = p.nodes[0].go_alone().unwrap();
            p.run(0, a);
            p
        }

        fn run(&mut self, node: usize, actions: Vec<Action>) {
            self.run_many(actions.into_iter().map(|a| (node, a)).collect());
        }

        fn run_many(&mut self, mut queue: VecDeque<(usize, Action)>) {
            loop {
                while let Some((n, a)) = queue.pop_front() {
                    match a {
                        Action::Disk { tag, op } => {
                            let res = match op {
                                DiskOp::Write { offset, data, .. } => {
                                    self.disks[n][offset as usize..offset as usize + data.len()]
                                        .copy_from_slice(&data);
                                    None
                                }
                                DiskOp::Zeroes { offset, length, .. } => {
                                    self.disks[n][offset as usize..(offset + length) as usize]
                                        .fill(0);
                                    None
                                }
                                DiskOp::Flush => None,
                                DiskOp::Read { .. } if self.failing_reads[n] > 0 => {
                                    self.failing_reads[n] -= 1;
                                    let next =
                                        self.nodes[n].disk_done(tag, Err(crate::core::nbd::EIO));
                                    queue.extend(next.into_iter().map(|a| (n, a)));
                                    continue;
                                }
                                DiskOp::Read { offset, length } => Some(Arc::new(
                                    self.disks[n][offset as usize..(offset + length) as usize]
                                        .to_vec(),
                                )),
                            };
                            let next = self.nodes[n].disk_done(tag, Ok(res));
                            queue.extend(next.into_iter().map(|a| (n, a)));
                        }
                        Action::Send(f) if self.connected => self.link[n].push_back(f),
                        Action::Complete { id, result } => self.completed.push((id, result)),
                        Action::DropLink(why) => panic!("link dropped: {why}"),
                        _ => {}
                    }
                }
                // Deliver one frame at a time, alternating, until quiet.
                let mut any = false;
                for from in 0..2 {
                    if let Some(f) = self.link[from].pop_front() {
                        any = true;
                        if self.cut_after == Some(f.header.kind) {
                            self.connected = false;
                            self.link = [VecDeque::new(), VecDeque::new()];
                        }
                        let next = self.nodes[1 - from].frame(f.header, f.payload);
                        queue.extend(next.into_iter().map(|a| (1 - from, a)));
                    }
                }
                if !any && queue.is_empty() {
                    break;
                }
            }
        }

        fn connect(&mut self) {
            self.connected = true;
            let a = self.nodes[0].link_up();
            let b = self.nodes[1].link_up();
            // Both say who they are before either hears the other, as on
            // a real link.
            self.run_many(
                a.into_iter()
                    .map(|x| (0, x))
                    .chain(b.into_iter().map(|x| (1, x)))
                    .collect(),
            );
        }

        fn disconnect(&mut self) {
            self.connected = false;
            self.link = [VecDeque::new(), VecDeque::new()];
            let a = self.nodes[0].link_lost();
            let b = self.nodes[1].link_lost();
            self.run(0, a);
            self.run(1, b);
        }

        fn write(&mut self, id: ReqId, offset: u64, byte: u8, len: usize) {
            let a = self.nodes[0].request(
                id,
                Request::Write {
                    offset,
                    data: Arc::new(vec![byte; len]),
                    fua: false,
                },
            );
            self.run(0, a);
        }
    }

    #[test]
    fn fresh_pair_first_primary_full_syncs_then_mirrors() {
        let mut p = Pair::new(0);
        p.disks[0][0] = 7; // differing garbage must be overwritten
        p.connect();
        assert_eq!(p.nodes[0].link(), LinkState::Connected);
        let a = p.nodes[0].promote(false).unwrap();
        p.run(0, a);
        assert_eq!(p.nodes[0].role(), Role::Primary);
        assert_eq!(p.nodes[1].disk(), DiskState::UpToDate);
        assert_eq!(p.disks[0], p.disks[1]);
        p.write(1, 4096, 0xaa, 8192);
        assert_eq!(p.completed, vec![(1, Ok(()))]);
        assert_eq!(p.disks[0], p.disks[1]);
        assert!(p.nodes[0].peer_up_to_date());
    }

    /// A resync source whose reads fail backs off (doubling) instead of
    /// retrying at full speed, and after a bounded number of failures in a
    /// row counts its disk failed.
    #[test]
    fn resync_read_errors_back_off_then_fail_the_disk() {
        let alone_with_changes = |fail: u32| {
            let mut p = Pair::gone_alone();
            p.write(2, 8192, 2, 100);
            p.failing_reads[0] = fail;
            p.connect();
            p
        };
        let tick = |p: &mut Pair, t: u64| {
            p.nodes[0].set_now(t);
            let a = p.nodes[0].tick();
            p.run(0, a);
        };
        let mut p = alone_with_changes(2);
        assert_eq!(p.failing_reads[0], 1, "one read failed, then it waits");
        tick(&mut p, 50_000);
        assert_eq!(p.failing_reads[0], 1, "still backing off");
        for t in 1..40 {
            tick(&mut p, t * 100_000);
        }
        assert_eq!(p.failing_reads[0], 0);
        assert_eq!(p.disks[0], p.disks[1]);
        assert_eq!(p.nodes[1].disk(), DiskState::UpToDate);
        assert_eq!(p.nodes[0].disk(), DiskState::UpToDate);

        let mut p = alone_with_changes(100);
        for t in 1..200 {
            tick(&mut p, t * 100_000);
        }
        assert_eq!(
            100 - p.failing_reads[0],
            RESYNC_READ_ATTEMPTS,
            "bounded attempts"
        );
        assert_eq!(p.nodes[0].disk(), DiskState::Failed);
    }

    #[test]
    fn sync_mode_holds_writes_while_peer_away_and_resyncs_only_changes() {
        let mut p = Pair::new(0);
        p.connect();
        let a = p.nodes[0].promote(false).unwrap();
        p.run(0, a);
        p.disconnect();
        p.write(1, 0, 1, 4096);
        assert!(
            p.completed.is_empty(),
            "a sync write must wait for the peer"
        );
        assert!(p.nodes[0].frozen());
        p.connect();
        assert_eq!(p.completed, vec![(1, Ok(()))]);
        assert_eq!(p.disks[0], p.disks[1]);
        // A flush makes write 1 durable on the peer; otherwise a peer that
        // goes away might have lost it from its cache, and it is resent.
        let a = p.nodes[0].request(10, Request::Flush);
        p.run(0, a);
        // Go alone: writes complete locally, then only they are resynced.
        p.disconnect();
        let a = p.nodes[0].go_alone().unwrap();
        p.run(0, a);
        p.write(2, 8192, 2, 100);
        p.write(3, 40960, 3, 4096);
        assert_eq!(p.completed.len(), 4);
        assert_ne!(p.disks[0], p.disks[1]);
        let before = p.nodes[0].counters.resync_blocks_sent;
        p.connect();
        assert_eq!(p.nodes[0].counters.resync_blocks_sent - before, 2);
        assert_eq!(p.disks[0], p.disks[1]);
        assert_eq!(p.nodes[1].disk(), DiskState::UpToDate);
    }

    #[test]
    fn a_resync_that_may_have_ended_on_the_peer_ends_going_alone() {
        let mut p = Pair::gone_alone();
        p.write(1, 0, 1, 4096);
        assert_eq!(p.completed, vec![(1, Ok(()))]);
        // The peer finishes the resync, but its acknowledgement is lost
        // with the link: it is up to date, and the primary cannot know.
        p.cut_after = Some(Kind::ResyncDone);
        p.connect();
        p.disconnect();
        assert_eq!(p.nodes[1].disk(), DiskState::UpToDate);
        // The operator's go-alone was about a copy that is gone: the next
        // write waits for the peer (or a new go-alone).
        p.write(2, 4096, 2, 4096);
        assert_eq!(p.completed.len(), 1, "a write completed alone");
        assert!(p.nodes[0].frozen());
        let a = p.nodes[0].go_alone().unwrap();
        p.run(0, a);
        assert_eq!(p.completed.len(), 2);
    }

    /// hadb died (or re-executed itself) while primary and a new process
    /// takes over with the kernel device still attached: primary at once,
    /// no lost cache, and the activity log's regions go to the peer.
    #[test]
    fn a_resumed_primary_is_primary_and_resyncs_its_activity_log() {
        let mut a = setup("a", "b", 7);
        a.crashed_primary = true;
        a.unclean = true;
        // Extent 1 (blocks 4..8) was being written when the process died.
        a.activity_log = vec![1];
        a.resume_primary = true;
        let mut p = Pair::new(7);
        p.nodes[0] = Replica::new(a.clone());
        // A write that reached this disk but never the peer's.
        p.disks[0][5 * 4096] = 0xcc;
        let started = p.nodes[0].started();
        assert!(
            started.contains(&Action::RoleChanged(Role::Primary)),
            "{started:?}"
        );
        p.run(0, started);
        let r = &p.nodes[0];
        assert_eq!(r.role(), Role::Primary);
        assert_eq!(r.disk(), DiskState::UpToDate);
        assert_eq!(r.node_state().flags & wire::STATE_LOST_CACHE, 0);
        assert_eq!(r.out_of_sync_blocks(), Some(4));
        // Application writes wait for the peer, as after any link loss.
        p.write(1, 20 * 4096, 0xdd, 4096);
        assert!(p.completed.is_empty());
        assert!(p.nodes[0].frozen());
        p.connect();
        assert_eq!(p.completed, vec![(1, Ok(()))]);
        assert_eq!(p.nodes[0].role(), Role::Primary);
        assert_eq!(p.nodes[1].role(), Role::Secondary);
        assert!(p.nodes[0].peer_up_to_date());
        assert_eq!(p.nodes[0].out_of_sync_blocks(), Some(0));
        assert_eq!(p.disks[0], p.disks[1], "the peer's copy did not converge");
        p.write(2, 6 * 4096, 0xee, 4096);
        assert_eq!(p.completed.len(), 2);
        assert_eq!(p.disks[0], p.disks[1]);

        // Without the "was primary" mark, or on a copy not up to date,
        // there is nothing to resume: secondary, as after any crash.
        for change in [0, 1] {
            let mut s = a.clone();
            if change == 0 {
                s.crashed_primary = false;
            } else {
                s.outdated = true;
            }
            let mut r = Replica::new(s);
            let acts = r.started();
            assert_eq!(r.role(), Role::Secondary);
            assert!(!acts.contains(&Action::RoleChanged(Role::Primary)));
        }
    }

    #[test]
    fn a_lost_cache_is_remembered_until_a_resync_ends() {
        let mut s = setup("b", "a", 7);
        s.unclean = true;
        let mut r = Replica::new(s.clone());
        let persisted: Vec<_> = r
            .started()
            .into_iter()
            .filter_map(|a| match a {
                Action::Persist(m) => Some(m),
                _ => None,
            })
            .collect();
        assert!(persisted.iter().any(|m| m.lost_cache), "{persisted:?}");
        // A clean restart before any resync still knows.
        s.unclean = false;
        s.lost_cache = true;
        let r = Replica::new(s);
        assert!(r.node_state().flags & wire::STATE_LOST_CACHE != 0);
    }

    #[test]
    fn only_one_primary() {
        let mut p = Pair::new(0);
        p.connect();
        let a = p.nodes[0].promote(false).unwrap();
        p.run(0, a);
        assert_eq!(p.nodes[1].promote(false), Err(PromoteError::PeerIsPrimary));
        let a = p.nodes[0].demote().unwrap();
        p.run(0, a);
        let b = p.nodes[1].promote(false).unwrap();
        p.run(1, b);
        assert_eq!(p.nodes[1].role(), Role::Primary);
        assert_eq!(p.nodes[0].role(), Role::Secondary);
        let a = p.nodes[1].request(
            9,
            Request::Write {
                offset: 0,
                data: Arc::new(vec![5; 4096]),
                fua: true,
            },
        );
        p.run(1, a);
        assert_eq!(p.disks[0], p.disks[1]);
    }

    #[test]
    fn secondary_refuses_application_writes() {
        let mut r = Replica::new(setup("a", "b", 5));
        let out = r.request(1, Request::Flush);
        assert_eq!(
            out,
            vec![Action::Complete {
                id: 1,
                result: Err(crate::core::nbd::EPERM)
            }]
        );
    }

    #[test]
    fn resync_rate_limit_paces_reads() {
        let reads = |out: &[Action]| {
            out.iter()
                .filter(|a| {
                    matches!(
                        a,
                        Action::Disk {
                            op: DiskOp::Read { .. },
                            ..
                        }
                    )
                })
                .count()
        };
        let mut s = setup("a", "b", 0);
        s.data_size = 4 << 20;
        s.resync_rate = 1 << 20;
        let mut r = Replica::new(s);
        r.set_now(0);
        r.promote(true).unwrap();
        r.link_up();
        let fresh_peer = NodeState {
            role: 0,
            disk: 2,
            data_size: 4 << 20,
            volume_id: [1; 16],
            current_gen: 0,
            bitmap_gen: 0,
            dirty_blocks: 0,
            flags: 0,
        };
        let out = r.frame(
            wire::Header::new(Kind::State, 0, 0, 0),
            Some(Arc::new(fresh_peer.encode())),
        );
        // 1 MiB/s: a burst is at least one read (1 MiB), then a second
        // passes before the next.
        assert_eq!(reads(&out), 1, "{out:?}");
        r.set_now(500_000);
        assert_eq!(reads(&r.tick()), 0, "too early for more");
        r.set_now(3_000_000);
        assert_eq!(
            reads(&r.tick()),
            1,
            "the bucket never holds more than a burst"
        );
        let (_, total, full, _) = r.resync_progress().unwrap();
        assert_eq!((total, full), (1024, true));
    }

    #[test]
    fn verify_finds_and_repairs_a_difference() {
        let mut p = Pair::new(0);
        p.connect();
        let a = p.nodes[0].promote(false).unwrap();
        p.run(0, a);
        p.write(1, 0, 7, 64 * 4096);
        // Behind hadb's back: two blocks of the secondary change.
        p.disks[1][5 * 4096 + 17] ^= 0xff;
        p.disks[1][40 * 4096] ^= 0x01;
        let a = p.nodes[0].verify_start().unwrap();
        p.run(0, a);
        assert_eq!(p.nodes[0].verify_result(), Some((64, 2, true)));
        assert_eq!(
            p.disks[0], p.disks[1],
            "the resync after verify repairs them"
        );
        let a = p.nodes[0].verify_start().unwrap();
        p.run(0, a);
        assert_eq!(p.nodes[0].verify_result(), Some((64, 0, true)));
        // A third verify ends exactly as the second: only the count says
        // it ran (what `hadb volume verify --wait` waits for).
        let a = p.nodes[0].verify_start().unwrap();
        p.run(0, a);
        assert_eq!(p.nodes[0].verify_result(), Some((64, 0, true)));
        assert_eq!(p.nodes[0].counters.verifies_ended, 3);
        assert!(
            p.nodes[1].verify_start().is_err(),
            "verify runs on the primary"
        );
    }

    #[test]
    fn split_brain_resolution() {
        let v = |discard, changes, first| GenView {
            lost_cache: false,
            primary: false,
            outdated: false,
            current: 7,
            bitmap_gen: 5,
            has_bitmap: true,
            crashed_primary: false,
            dirty: true,
            inconsistent: false,
            discard,
            changes,
            first,
        };
        use AfterSplitBrain::*;
        // (mine, theirs, policy, expected): Some(true) = my copy goes.
        let cases = [
            // The operator's word wins over any policy, on both sides alike.
            (
                v(true, Some(1), true),
                v(false, Some(9), false),
                Disconnect,
                Some(true),
            ),
            (
                v(false, Some(9), false),
                v(true, Some(1), true),
                Disconnect,
                Some(false),
            ),
            (
                v(true, None, true),
                v(true, None, false),
                DiscardLeastChanges,
                None,
            ),
            (
                v(false, Some(0), true),
                v(false, Some(3), false),
                Disconnect,
                None,
            ),
            (
                v(false, Some(0), true),
                v(false, Some(3), false),
                DiscardZeroChanges,
                Some(true),
            ),
            (
                v(false, Some(2), true),
                v(false, Some(3), false),
                DiscardZeroChanges,
                None,
            ),
            (
                v(false, Some(2), true),
                v(false, Some(3), false),
                DiscardLeastChanges,
                Some(true),
            ),
            (
                v(false, Some(3), false),
                v(false, Some(2), true),
                DiscardLeastChanges,
                Some(false),
            ),
            (
                v(false, Some(3), true),
                v(false, Some(3), false),
                DiscardLeastChanges,
                None,
            ),
            // Unknown change counts (a restart lost the bitmap): no guessing.
            (
                v(false, None, true),
                v(false, Some(3), false),
                DiscardLeastChanges,
                None,
            ),
        ];
        for (i, (me, peer, policy, want)) in cases.into_iter().enumerate() {
            assert_eq!(resolve_split_brain(me, peer, policy), want, "case {i}");
            // Symmetry: the peer reaches the mirror verdict.
            assert_eq!(
                resolve_split_brain(peer, me, policy),
                want.map(|x| !x),
                "case {i} from the peer"
            );
        }
    }

    #[test]
    fn generation_rules() {
        let g = |current, bitmap_gen, has_bitmap| GenView {
            lost_cache: false,
            crashed_primary: false,
            dirty: false,
            inconsistent: false,
            discard: false,
            changes: Some(0),
            first: true,
            primary: false,
            outdated: false,
            current,
            bitmap_gen,
            has_bitmap,
        };
        use SyncDecision::*;
        let crashed = |mut v: GenView| {
            v.crashed_primary = true;
            v
        };
        let dirty = |mut v: GenView| {
            v.dirty = true;
            v
        };
        let inconsistent = |mut v: GenView| {
            v.inconsistent = true;
            v
        };
        let primary = |mut v: GenView| {
            v.primary = true;
            v
        };
        let cases = [
            (g(5, 0, true), g(5, 0, true), InSync),
            (g(0, 0, true), g(0, 0, true), BothFresh),
            (g(7, 5, true), g(5, 0, true), SourceBitmap),
            (g(7, 5, false), g(5, 0, true), SourceFull),
            (g(7, 5, true), g(8, 5, true), SplitBrain),
            (g(7, 1, true), g(8, 2, true), Unrelated),
            (g(7, 0, true), g(0, 0, true), SourceFull),
            // A copy that stopped while primary: the union of both
            // bitmaps (its activity log), from the other copy.
            (g(5, 0, true), crashed(g(5, 0, true)), SourceBitmap),
            (g(7, 5, true), crashed(g(5, 0, true)), SourceBitmap),
            (g(5, 0, false), crashed(g(5, 0, true)), SourceFull),
            // Marked blocks: the union, from the side that has marks...
            (dirty(g(5, 0, true)), g(5, 0, true), SourceBitmap),
            (g(7, 5, true), dirty(g(5, 0, true)), SourceBitmap),
            // ...unless the other is primary.
            (dirty(g(5, 0, true)), primary(g(5, 0, true)), TargetBitmap),
            // A half-written copy is never a source; it resumes from the
            // bitmaps when the other's covers it.
            (inconsistent(g(7, 5, true)), g(5, 0, true), TargetFull),
            (inconsistent(g(5, 0, true)), g(7, 5, true), TargetBitmap),
            (inconsistent(g(5, 0, true)), g(7, 5, false), TargetFull),
        ];
        let mirror = |d: SyncDecision| match d {
            SourceBitmap => TargetBitmap,
            SourceFull => TargetFull,
            TargetBitmap => SourceBitmap,
            TargetFull => SourceFull,
            other => other,
        };
        for (i, (me, peer, want)) in cases.into_iter().enumerate() {
            let peer = GenView {
                first: false,
                ..peer
            };
            assert_eq!(decide(me, peer), want, "case {i}");
            let me_from_peer = GenView { first: false, ..me };
            let peer_as_me = GenView {
                first: true,
                ..peer
            };
            assert_eq!(
                decide(peer_as_me, me_from_peer),
                mirror(want),
                "case {i} from the peer"
            );
        }
    }
}
