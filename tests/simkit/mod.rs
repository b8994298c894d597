//! Pieces both deterministic simulations share: the random source, a disk
//! with a volatile cache, the disk work queue's items, block patterns, and
//! the oracle that knows which writes are guaranteed (promise 1).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};

use hadb::core::replica::{DiskOp, DiskTag};

pub const BLOCK: usize = 4096;
/// A simulated volume: small, so writes collide and everything is
/// resynced often.
pub const BLOCKS: usize = 32;
pub const DATA: usize = BLOCK * BLOCKS;
/// Blocks per activity-log extent, and extents kept: small, so writes
/// move extents in and out of the log all the time.
pub const AL_EXTENT_BLOCKS: u64 = 4;
pub const AL_EXTENTS: usize = 3;

pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    /// splitmix64: good enough bits in every position (xorshift's low
    /// bits fell into cycles that starved some events).
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// A disk with a volatile cache: writes land in `cache` and reach `durable`
/// on a flush; a crash keeps any subset of the cached writes.
#[derive(Clone)]
pub struct Disk {
    pub durable: Vec<u8>,
    pub cache: Vec<(usize, Vec<u8>)>,
}

impl Disk {
    pub fn new(size: usize) -> Disk {
        Disk {
            durable: vec![0; size],
            cache: Vec::new(),
        }
    }
    pub fn view(&self) -> Vec<u8> {
        let mut v = self.durable.clone();
        for (off, data) in &self.cache {
            v[*off..*off + data.len()].copy_from_slice(data);
        }
        v
    }
    pub fn flush(&mut self) {
        for (off, data) in std::mem::take(&mut self.cache) {
            self.durable[off..off + data.len()].copy_from_slice(&data);
        }
    }
    pub fn crash(&mut self, rng: &mut Rng) {
        for (off, data) in std::mem::take(&mut self.cache) {
            if rng.chance(500) {
                self.durable[off..off + data.len()].copy_from_slice(&data);
            }
        }
    }
}

/// Work for a simulated disk, in order.
pub enum Op {
    Io(DiskTag, DiskOp),
    /// The superblock: written durably (after a flush of what came
    /// before, as the store's fdatasync of the one file does). Two slots
    /// on disk, so a crash keeps the old or the new one, never a mix.
    Meta(MetaUpdate),
    /// Bitmap pages: written durably (after a flush of what came before).
    Bitmap(Vec<(u64, Vec<u8>)>),
    /// An activity-log transaction: a flush, then the log durably.
    Log(Vec<u64>),
}

/// A block's content tells which write put it there.
pub fn pattern(id: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK];
    v[..8].copy_from_slice(&id.to_le_bytes());
    v[8..16].copy_from_slice(&(!id).to_le_bytes());
    v
}

pub fn block_tag(data: &[u8]) -> Option<u64> {
    let id = u64::from_le_bytes(data[..8].try_into().unwrap());
    let check = u64::from_le_bytes(data[8..16].try_into().unwrap());
    (check == !id && id != 0).then_some(id)
}

/// What the client knows: for each block, the writes to it in issue order
/// and which of them were made durable by a completed flush.
///
/// A write is guaranteed once a flush issued after its acknowledgement
/// completes (or at once for FUA), unless the node that acknowledged it
/// crashed before that flush: an unflushed write may die with its node's
/// cache, and a flush after the restart cannot revive it.
#[derive(Default)]
pub struct Oracle {
    /// block -> [write id], in the order issued
    pub history: BTreeMap<usize, Vec<u64>>,
    /// Writes acknowledged and not yet known durable, with the node that
    /// acknowledged them.
    pub completed: Vec<(u64, usize)>,
    pub guaranteed: BTreeSet<u64>,
    /// Writes completed, per outstanding flush id.
    pub flush_covers: HashMap<u64, Vec<(u64, usize)>>,
    pub fua: BTreeSet<u64>,
}

impl Oracle {
    pub fn write_issued(&mut self, id: u64, block: usize, fua: bool) {
        self.history.entry(block).or_default().push(id);
        if fua {
            self.fua.insert(id);
        }
    }
    pub fn flush_issued(&mut self, id: u64) {
        self.flush_covers.insert(id, self.completed.clone());
    }
    pub fn write_completed(&mut self, id: u64, node: usize) {
        self.completed.push((id, node));
        if self.fua.contains(&id) {
            self.guaranteed.insert(id);
        }
    }
    pub fn flush_completed(&mut self, id: u64) {
        if let Some(covered) = self.flush_covers.remove(&id) {
            self.guaranteed.extend(covered.into_iter().map(|(w, _)| w));
        }
    }
    /// `node` crashed: what it acknowledged and did not flush may be gone.
    pub fn crashed(&mut self, node: usize) {
        self.completed.retain(|(_, on)| *on != node);
        for covered in self.flush_covers.values_mut() {
            covered.retain(|(_, on)| *on != node);
        }
    }
    /// Promise 1: on `view` every block holds its newest guaranteed write
    /// or a write issued after it.
    pub fn check(&self, view: &[u8], name: &str, when: &str) -> Result<(), String> {
        for (block, writes) in &self.history {
            let last_g = writes.iter().rposition(|w| self.guaranteed.contains(w));
            let Some(i) = last_g else { continue };
            let got = block_tag(&view[block * BLOCK..(block + 1) * BLOCK]);
            let ok = got.is_some_and(|g| writes[i..].contains(&g));
            if !ok {
                return Err(format!(
                    "{when}: block {block} on {name} holds {got:?}, but write {} was acknowledged after a flush (later writes: {:?})",
                    writes[i],
                    &writes[i + 1..]
                ));
            }
        }
        Ok(())
    }
}

use std::collections::VecDeque;
use std::sync::Arc;

use hadb::core::bitmap::{Bitmap, PAGE_BYTES};
use hadb::core::gate::MetaGate;
use hadb::core::replica::{Action, MetaUpdate, Payload};
use hadb::core::wire::NodeState;

/// A simulated node's volume below the state machine: what survives a
/// crash (the disk, the metadata, the bitmap, the activity log, whether
/// the last stop was clean) and the ordered disk queue.
pub struct SimVolume {
    pub disk: Disk,
    pub meta: MetaUpdate,
    /// The on-disk bitmap (one page covers a simulated volume).
    pub bitmap: Vec<u8>,
    pub activity_log: Vec<u64>,
    /// Set while running; cleared only by a clean stop.
    pub active: bool,
    pub queue: VecDeque<Op>,
    /// Metadata queued and not yet on disk; frames and completions wait
    /// for it, as in the daemon.
    gate: MetaGate,
    /// The disk does nothing until resumed (a story's slow disk).
    pub stalled: bool,
    /// The next this many flushes fail with EIO, and, as fsync does on
    /// Linux, the cached writes they were to make durable are gone.
    pub failing_flushes: u32,
    /// The next this many data writes fail with EIO and leave nothing.
    pub failing_writes: u32,
}

/// What one disk step did.
pub enum Step {
    Idle,
    /// An I/O finished: hand it to the state machine.
    Done(DiskTag, Result<Option<Payload>, u32>),
    /// Metadata written; frames and completions that waited for it may go
    /// now.
    Meta(Vec<Action>),
}

impl SimVolume {
    pub fn new(size: usize) -> SimVolume {
        SimVolume {
            disk: Disk::new(size),
            meta: MetaUpdate {
                current_gen: 0,
                bitmap_gen: 0,
                volume_id: [1; 16],
                consistent: false,
                primary: false,
                outdated: false,
                peer_outdated: false,
                lost_cache: false,
            },
            bitmap: vec![0; PAGE_BYTES],
            activity_log: Vec::new(),
            active: false,
            queue: VecDeque::new(),
            gate: MetaGate::default(),
            stalled: false,
            failing_flushes: 0,
            failing_writes: 0,
        }
    }

    /// What the state machine starts from, as the driver reads it off
    /// the disk; marks the volume active from here.
    pub fn setup(
        &mut self,
        mode: hadb::config::Mode,
        me: &str,
        peer: &str,
        gen_seed: u64,
        ack_timeout_us: u64,
    ) -> hadb::core::replica::Setup {
        let mut out_of_sync = Bitmap::default();
        out_of_sync.merge_page(0, &self.bitmap, BLOCKS as u64);
        let unclean = std::mem::replace(&mut self.active, true);
        let m = self.meta;
        hadb::core::replica::Setup {
            mode,
            data_size: DATA as u64,
            volume_id: m.volume_id,
            current_gen: m.current_gen,
            bitmap_gen: m.bitmap_gen,
            consistent: m.consistent,
            outdated: m.outdated,
            peer_outdated: m.peer_outdated,
            lost_cache: m.lost_cache,
            ack_timeout_us,
            resync_rate: 0,
            // Paced while the client writes, as deployed.
            resync_min_rate: 64 << 20,
            crashed_primary: m.primary,
            after_split_brain: hadb::core::replica::AfterSplitBrain::Disconnect,
            gen_seed,
            me: me.into(),
            peer: peer.into(),
            out_of_sync,
            activity_log: self.activity_log.clone(),
            unclean,
            al_extents: AL_EXTENTS,
            al_extent_blocks: AL_EXTENT_BLOCKS,
            resume_primary: false,
        }
    }

    /// Takes the actions that concern the disk (and frames and
    /// completions that must wait for metadata); returns the rest for the
    /// simulation.
    /// `after`: the node's state as the replica returned the action.
    pub fn take(&mut self, a: Action, after: NodeState) -> Option<Action> {
        match a {
            Action::Persist(m) => {
                self.gate.queued(after);
                self.queue.push_back(Op::Meta(m));
            }
            Action::Disk { tag, op } => self.queue.push_back(Op::Io(tag, op)),
            Action::PersistBitmap(pages) => {
                self.gate.queued(after);
                self.queue.push_back(Op::Bitmap(pages));
            }
            Action::PersistActivityLog(x) => {
                self.gate.queued(after);
                self.queue.push_back(Op::Log(x));
            }
            other => return self.gate.pass(other),
        }
        None
    }

    /// What this node's heartbeats say of it: only what is on disk.
    pub fn report(&mut self, now: NodeState) -> NodeState {
        self.gate.report(now)
    }

    /// The link went: frames held for it go too.
    pub fn link_lost(&mut self) {
        self.gate.link_lost();
    }

    /// The node crashed: the queue is lost and the cache loses any part.
    pub fn crash(&mut self, rng: &mut Rng) {
        self.queue.clear();
        self.gate.reset();
        self.disk.crash(rng);
    }

    pub fn step(&mut self) -> Step {
        if self.stalled {
            return Step::Idle;
        }
        let Some(op) = self.queue.pop_front() else {
            return Step::Idle;
        };
        let (tag, op) = match op {
            Op::Io(tag, op) => (tag, op),
            Op::Meta(m) => {
                self.disk.flush();
                self.meta = m;
                return Step::Meta(self.gate.done(true));
            }
            Op::Bitmap(pages) => {
                self.disk.flush();
                for (p, img) in pages {
                    assert_eq!(p, 0, "the simulated volume has one bitmap page");
                    self.bitmap = img;
                }
                return Step::Meta(self.gate.done(true));
            }
            Op::Log(extents) => {
                self.disk.flush();
                self.activity_log = extents;
                return Step::Meta(self.gate.done(true));
            }
        };
        if self.failing_writes > 0 && matches!(op, DiskOp::Write { .. } | DiskOp::Zeroes { .. }) {
            self.failing_writes -= 1;
            return Step::Done(tag, Err(hadb::core::nbd::EIO));
        }
        let disk = &mut self.disk;
        let result = match op {
            DiskOp::Write { offset, data, fua } => {
                disk.cache.push((offset as usize, data.to_vec()));
                if fua {
                    disk.flush();
                }
                None
            }
            DiskOp::Zeroes {
                offset,
                length,
                fua,
                ..
            } => {
                disk.cache.push((offset as usize, vec![0; length as usize]));
                if fua {
                    disk.flush();
                }
                None
            }
            DiskOp::Flush if self.failing_flushes > 0 => {
                self.failing_flushes -= 1;
                disk.cache.clear();
                return Step::Done(tag, Err(hadb::core::nbd::EIO));
            }
            DiskOp::Flush => {
                disk.flush();
                None
            }
            DiskOp::Read { offset, length } => Some(Arc::new(
                disk.view()[offset as usize..(offset + length) as usize].to_vec(),
            )),
        };
        Step::Done(tag, Ok(result))
    }
}

/// A simulation's seed loop: `HADB_SIM_SEED=S` replays one seed with its
/// trace printed as it goes; otherwise `HADB_SIM_SEEDS` seeds (default
/// 30,000) run and the first failure panics with the end of its trace and
/// the command that replays it.
pub fn run_seeds(
    test: &str,
    replay_hint: &str,
    run_seed: impl Fn(u64, bool) -> Result<(), (String, Vec<String>)>,
) {
    if let Ok(seed) = std::env::var("HADB_SIM_SEED") {
        let seed: u64 = seed.parse().expect("HADB_SIM_SEED is a number");
        if let Err((e, _)) = run_seed(seed, true) {
            panic!("seed {seed}: {e}");
        }
        return;
    }
    let seeds: u64 = std::env::var("HADB_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30_000);
    // HADB_SIM_FIRST lets a deeper search go on where an earlier one ended.
    let first: u64 = std::env::var("HADB_SIM_FIRST")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    for seed in first..first + seeds {
        if let Err((e, trace)) = run_seed(seed, false) {
            let tail = trace[trace.len().saturating_sub(80)..].join("\n");
            panic!(
                "seed {seed}: {e}\n--- last steps:\n{tail}\n--- replay: HADB_SIM_SEED={seed} {replay_hint}cargo test --release --test {test} -- --nocapture"
            );
        }
    }
}

/// The blocks two copies differ in, with which write each holds.
pub fn differing_blocks(a: &[u8], b: &[u8]) -> String {
    (0..a.len() / BLOCK)
        .filter(|&i| a[i * BLOCK..(i + 1) * BLOCK] != b[i * BLOCK..(i + 1) * BLOCK])
        .map(|i| {
            let at = |v: &[u8]| block_tag(&v[i * BLOCK..(i + 1) * BLOCK]);
            format!("{i}: a {:?} b {:?}", at(a), at(b))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The simulated client's next request, recorded in the oracle: a flush
/// one time in five, else a write (FUA one time in twenty) of a random
/// block. Returns its id, the request and the block written (None: a
/// flush).
pub fn next_request(
    rng: &mut Rng,
    oracle: &mut Oracle,
    next_id: &mut u64,
) -> (u64, hadb::core::replica::Request, Option<usize>) {
    use hadb::core::replica::Request;
    let id = *next_id;
    *next_id += 1;
    if rng.chance(200) {
        oracle.flush_issued(id);
        (id, Request::Flush, None)
    } else {
        let block = rng.below(BLOCKS as u64) as usize;
        let fua = rng.chance(50);
        oracle.write_issued(id, block, fua);
        let write = Request::Write {
            offset: (block * BLOCK) as u64,
            data: Arc::new(pattern(id)),
            fua,
        };
        (id, write, Some(block))
    }
}
