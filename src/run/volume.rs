//! The volume's driver: one task owns the [`Replica`] state machine and
//! carries out its actions; one thread does the disk I/O in order.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde_json::json;
use smol::channel::{Receiver, Sender};

use crate::core::gate::MetaGate;
use crate::core::meta::{self, Superblock, flags};
use crate::core::replica::{self, Action, DiskOp, DiskTag, Frame, Payload, Replica, ReqId, Role};
use crate::core::wire;
use crate::run::stats::Stats;
use crate::run::store::{self, Store};

/// Everything that reaches the volume task.
pub enum Event {
    /// An application write, zero or flush from an NBD connection.
    Request {
        req: replica::Request,
        reply: Completions,
        cookie: u64,
    },
    Disk {
        tag: DiskTag,
        result: Result<Option<Payload>, u32>,
    },
    /// A new authenticated link to the peer; replaces any older one.
    LinkUp(Link),
    Frame {
        link: u64,
        header: wire::Header,
        payload: Option<Payload>,
    },
    /// The disk thread wrote metadata (superblock, bitmap pages or an
    /// activity-log transaction); false: it failed, and the disk with it.
    Persisted {
        ok: bool,
    },
    LinkLost {
        link: u64,
        reason: String,
    },
    Command {
        command: Command,
        reply: Sender<Result<serde_json::Value, String>>,
    },
}

pub enum Command {
    Status,
    Primary {
        force: bool,
    },
    Secondary,
    GoAlone,
    DiscardMyData,
    Verify,
    /// A clean stop: the answer comes once the bitmap, activity log and
    /// superblock say so on disk. `restart`: hadb re-executes itself
    /// afterwards with the kernel device left attached (`hadb
    /// restart-in-place`): application requests that arrive meanwhile are
    /// left unanswered rather than failed; the kernel sends them again on
    /// the next process's connection.
    Stop {
        restart: bool,
    },
    /// The manager's proof that the peer cannot be promoted with older
    /// data (fenced, or outdated by its own word).
    PeerProvenOutdated(String, bool),
    /// The manager, on the primary's word over the heartbeat (its outdate
    /// token).
    OutdateSelf(u64),
    /// `hadb volume down` (on a secondary): the replication link goes and
    /// stays down until `Up`.
    Down,
    /// The volume comes back up; `by_watchdog` when hadb's own
    /// enforcement did it.
    Up {
        by_watchdog: bool,
    },
}

/// Sends a command to the volume task and waits for its answer.
pub async fn ask(events: &Sender<Event>, command: Command) -> Result<serde_json::Value, String> {
    let (tx, rx) = smol::channel::bounded(1);
    events
        .send(Event::Command { command, reply: tx })
        .await
        .map_err(|_| "the volume task has stopped".to_string())?;
    rx.recv()
        .await
        .map_err(|_| "the volume task has stopped".to_string())?
}

/// A live replication link, owned by the volume task: dropping it stops
/// its reader and writer.
pub struct Link {
    pub id: u64,
    pub peer: String,
    pub frames: Sender<Frame>,
    pub tasks: Vec<smol::Task<()>>,
    /// Dropped with the link; whoever made the link waits on it to know
    /// when to make a new one.
    pub alive: Sender<()>,
}

/// Things other tasks may read without asking the volume task.
pub struct Shared {
    /// Whether NBD writes are accepted (this node is primary).
    pub writable: AtomicBool,
    /// The local disk is failed (detached): reads of it would return
    /// what it held before the failure, not what was acknowledged since.
    pub disk_failed: AtomicBool,
    pub data_size: u64,
    pub stats: Stats,
    /// This node as its heartbeats describe it; kept current by the
    /// volume task.
    pub report: std::sync::Mutex<crate::core::heartbeat::NodeReport>,
    /// This node's volume as the manager sees it; kept current too.
    pub view: std::sync::Mutex<crate::core::manager::VolumeView>,
    /// Write-acknowledge latencies, for /metrics.
    pub write_latency: crate::run::stats::Latency,
    /// Times this node became primary since hadb started.
    pub promotions: std::sync::atomic::AtomicU64,
}

enum Job {
    Op(DiskTag, DiskOp),
    Persist(Superblock),
    Bitmap(Vec<(u64, Vec<u8>)>),
    ActivityLog(Vec<u64>),
    /// Answered once everything before it is done.
    Barrier(Sender<()>),
}

/// The disk thread: executes jobs strictly in order.
fn disk_thread(mut store: Store, jobs: std::sync::mpsc::Receiver<Job>, events: Sender<Event>) {
    let mut broken = false;
    while let Ok(job) = jobs.recv() {
        match job {
            // What comes after a metadata write relies on it: if it
            // failed, so does every later operation, and the copy is
            // failed until repaired. Never reported as done: a frame or
            // completion waiting for it would claim what the disk lacks.
            Job::Persist(_) | Job::Bitmap(_) | Job::ActivityLog(_) => {
                let (what, result) = match job {
                    _ if broken => ("metadata", Ok(())),
                    Job::Persist(sb) => (
                        "superblock",
                        store
                            .write_superblock(sb)
                            .map_err(|e| std::io::Error::other(e.to_string())),
                    ),
                    Job::Bitmap(pages) => ("bitmap", store.write_bitmap_pages(&pages)),
                    Job::ActivityLog(extents) => {
                        ("activity log", store.write_activity_log(&extents))
                    }
                    _ => unreachable!("matched above"),
                };
                if let Err(e) = result {
                    log::error!(
                        "volume: writing the {what} of {}: {e}; the local disk is failed: all further I/O on it fails",
                        store.path().display()
                    );
                    broken = true;
                }
                if events
                    .send_blocking(Event::Persisted { ok: !broken })
                    .is_err()
                {
                    return;
                }
            }
            Job::Barrier(done) => {
                let _ = done.send_blocking(());
            }
            Job::Op(tag, _) if broken => {
                if events
                    .send_blocking(Event::Disk {
                        tag,
                        result: Err(crate::core::nbd::EIO),
                    })
                    .is_err()
                {
                    return;
                }
            }
            Job::Op(tag, op) => {
                let result = match op {
                    DiskOp::Write { offset, data, fua } => {
                        store.write(offset, &data, fua).map(|()| None)
                    }
                    DiskOp::Zeroes {
                        offset,
                        length,
                        punch,
                        fua,
                    } => store.zero(offset, length, punch, fua).map(|()| None),
                    DiskOp::Flush => store.flush().map(|()| None),
                    DiskOp::Read { offset, length } => {
                        store.read(offset, length).map(|d| Some(Arc::new(d)))
                    }
                };
                let result = result.map_err(|e| {
                    log::error!("volume: disk I/O on {} failed: {e}", store.path().display());
                    store::errno_of(&e)
                });
                if events.send_blocking(Event::Disk { tag, result }).is_err() {
                    return;
                }
            }
        }
    }
}

/// Where an NBD connection wants (cookie, result) of its requests.
pub type Completions = Sender<crate::run::nbd::Reply>;

pub struct Volume {
    replica: Replica,
    superblock: Superblock,
    jobs: std::sync::mpsc::Sender<Job>,
    /// Jobs handed to the disk thread and not yet finished.
    queued: usize,
    /// The backing store, for the I/O done inline.
    inline: File,
    events: Receiver<Event>,
    link: Option<Link>,
    next_req: ReqId,
    /// Open application requests: where to answer, the NBD cookie, and
    /// for writes when they arrived.
    waiting: HashMap<ReqId, (Completions, u64, Option<Instant>)>,
    shared: Arc<Shared>,
    peer_name: String,
    mode: crate::config::Mode,
    started: Instant,
    /// Tells the daemon to attach or detach the kernel device and to open
    /// or close NBD service.
    role_tx: Sender<Role>,
    last_link_event: Option<String>,
    /// Since when `hadb volume down` holds the link down.
    down_since: Option<Instant>,
    /// Times hadb brought a downed volume back up by itself.
    restored: u64,
    /// An operator's promotion waiting for the peer's consent.
    promote_waiter: Option<Sender<Result<serde_json::Value, String>>>,
    /// A metadata write failed: no more inline I/O.
    meta_broken: bool,
    /// Frames and completions waiting for metadata to be on disk.
    gate: MetaGate,
    /// Disk work that comes after a frame in the same batch: done once the
    /// link's writer has had its turn, so the peer's copy is under way
    /// before the local one (see `apply`).
    deferred: VecDeque<Action>,
    /// A clean stop asked for, waiting for the disk queue to drain.
    stopping: Option<Sender<Result<serde_json::Value, String>>>,
    /// That stop is for a restart in place (see `Command::Stop`).
    restarting: bool,
    /// Application requests left for the next process, and the ones open
    /// when the stop was asked.
    parked: u64,
}

impl Volume {
    /// Opens the store and starts the disk thread. Returns the volume (to
    /// be run) and the sender other tasks use to reach it.
    pub fn open(
        config: &crate::config::Config,
        mut store: Store,
        shared_stats: Stats,
        role_tx: Sender<Role>,
        resume_primary: bool,
    ) -> Result<(Volume, Sender<Event>, Arc<Shared>), std::io::Error> {
        let (tx, rx) = smol::channel::unbounded();
        let unclean = store.superblock.has(flags::ACTIVE);
        let io = |e: store::Error| std::io::Error::other(e.to_string());
        let out_of_sync = store.read_bitmap().map_err(io)?;
        let activity_log = store.read_activity_log().map_err(io)?;
        // From here until a clean stop, a restart must assume a crash.
        let mut active = store.superblock.clone();
        active.flags |= flags::ACTIVE;
        store.write_superblock(active).map_err(io)?;
        let sb = store.superblock.clone();
        if unclean {
            log::warn!(
                "volume: the last stop was not clean; {} activity-log extent(s) of {} MiB are marked out of sync",
                activity_log.len(),
                (crate::core::al::EXTENT_BLOCKS * meta::BLOCK) >> 20
            );
        }
        let inline = store
            .reader()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let (peer_name, _) = config.peer();
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).map_err(|e| std::io::Error::other(e.to_string()))?;
        let replica = Replica::new(replica::Setup {
            mode: config.volume.mode,
            data_size: store.layout.data_size,
            volume_id: sb.volume_id,
            current_gen: sb.current_gen,
            bitmap_gen: sb.bitmap_gen,
            consistent: sb.has(flags::CONSISTENT),
            outdated: sb.has(flags::OUTDATED),
            peer_outdated: sb.has(flags::PEER_OUTDATED),
            lost_cache: sb.has(flags::LOST_CACHE),
            ack_timeout_us: config.volume.ack_timeout.0.as_micros() as u64,
            resync_rate: config.volume.resync_rate.0,
            resync_min_rate: config.volume.resync_min_rate.0,
            crashed_primary: sb.has(flags::PRIMARY),
            after_split_brain: config.volume.after_split_brain,
            out_of_sync,
            activity_log,
            unclean,
            al_extents: config.volume.al_extents as usize,
            al_extent_blocks: crate::core::al::EXTENT_BLOCKS,
            resume_primary,
            gen_seed: u64::from_le_bytes(seed),
            me: config.node.clone(),
            peer: peer_name.to_owned(),
        });
        let shared = Arc::new(Shared {
            writable: AtomicBool::new(false),
            disk_failed: AtomicBool::new(false),
            data_size: store.layout.data_size,
            stats: shared_stats,
            write_latency: Default::default(),
            promotions: Default::default(),
            report: std::sync::Mutex::new(Default::default()),
            view: std::sync::Mutex::new(crate::core::manager::VolumeView {
                role: Role::Secondary,
                disk: replica::DiskState::Inconsistent,
                link: replica::LinkState::Connecting,
                frozen: false,
                peer_up_to_date: false,
                peer_outdated: false,
                current_gen: 0,
                bitmap_gen: 0,
                outdate_token: 0,
                outdated_for: 0,
            }),
        });
        let (jobs_tx, jobs_rx) = std::sync::mpsc::channel();
        let events = tx.clone();
        std::thread::Builder::new()
            .name("hadb-disk".into())
            .spawn(move || disk_thread(store, jobs_rx, events))?;
        if sb.has(flags::PRIMARY) && resume_primary {
            log::info!(
                "volume: this node was primary and its kernel device is still attached (hadb restarted in place): resuming as primary"
            );
        } else if sb.has(flags::PRIMARY) && unclean {
            log::warn!(
                "volume: the metadata says this node was primary when it stopped (a crash or power-off?); starting as secondary"
            );
        }
        Ok((
            Volume {
                replica,
                superblock: sb,
                jobs: jobs_tx,
                queued: 0,
                inline,
                events: rx,
                link: None,
                next_req: 1,
                waiting: HashMap::new(),
                shared: shared.clone(),
                peer_name: peer_name.to_owned(),
                mode: config.volume.mode,
                started: Instant::now(),
                role_tx,
                last_link_event: None,
                down_since: None,
                restored: 0,
                promote_waiter: None,
                meta_broken: false,
                gate: MetaGate::default(),
                deferred: VecDeque::new(),
                stopping: None,
                restarting: false,
                parked: 0,
            },
            tx,
            shared,
        ))
    }

    pub async fn run(mut self) {
        use smol::future::FutureExt;
        let mut next_tick = Instant::now() + TICK;
        let actions = self.replica.started();
        self.apply(actions);
        let mut fair = crate::run::Fair::default();
        loop {
            fair.done(0).await;
            let event = async { self.events.recv().await.ok() }
                .or(async {
                    smol::Timer::at(next_tick).await;
                    None
                })
                .await;
            self.replica
                .set_now(self.started.elapsed().as_micros() as u64);
            match event {
                Some(event) => self.handle(event),
                None if self.events.is_closed() => return,
                None => {}
            }
            if Instant::now() >= next_tick {
                next_tick = Instant::now() + TICK;
                let actions = self.replica.tick();
                self.apply(actions);
            }
            while !self.deferred.is_empty() {
                // The link's writer (woken by the frames just queued) runs
                // first: the executor is first come, first served.
                smol::future::yield_now().await;
                let later: Vec<Action> = self.deferred.drain(..).collect();
                self.apply(later);
            }
            self.answer_promotion();
            self.publish_report();
            if self.stopping.is_some() && self.queued == 0 {
                self.finish_stop().await;
                return;
            }
        }
    }

    fn publish_report(&mut self) {
        let n = self.gate.report(self.replica.node_state());
        let link = match self.replica.link() {
            replica::LinkState::Standalone => 0,
            replica::LinkState::Connecting => 1,
            replica::LinkState::Connected => 2,
            replica::LinkState::SyncSource => 3,
            replica::LinkState::SyncTarget => 4,
        };
        {
            let mut r = self.shared.report.lock().unwrap_or_else(|e| e.into_inner());
            r.role = n.role;
            r.disk = n.disk;
            r.current_gen = n.current_gen;
            r.volume_link = link;
            r.outdate_token = self.replica.report_token();
        }
        self.shared.disk_failed.store(
            self.replica.disk() == replica::DiskState::Failed,
            Ordering::SeqCst,
        );
        *self.shared.view.lock().unwrap_or_else(|e| e.into_inner()) =
            crate::core::manager::VolumeView::of(&self.replica);
    }

    /// The disk queue is empty: write the bitmap and activity log, and
    /// mark the stop clean if nothing is left unfinished.
    async fn finish_stop(&mut self) {
        let (actions, clean) = self.replica.stop();
        self.apply(actions);
        while !self.deferred.is_empty() {
            let later: Vec<Action> = self.deferred.drain(..).collect();
            self.apply(later);
        }
        let mut sb = self.superblock.clone();
        if clean {
            sb.flags &= !flags::ACTIVE;
        }
        self.queued += 1;
        let _ = self.jobs.send(Job::Persist(sb));
        let (tx, rx) = smol::channel::bounded(1);
        let _ = self.jobs.send(Job::Barrier(tx));
        let _ = rx.recv().await;
        let open = self.waiting.len() as u64;
        if self.restarting && open + self.parked > 0 {
            log::info!(
                "volume: {} application request(s) left for the next hadb process (the kernel sends them again)",
                open + self.parked
            );
        }
        let answer = if clean {
            log::info!("volume: stopped cleanly; bitmap and activity log written");
            Ok(json!({"stopped": "clean"}))
        } else {
            log::warn!(
                "volume: stopped with writes unfinished; the next start treats it as a crash"
            );
            Ok(json!({"stopped": "unclean"}))
        };
        if let Some(reply) = self.stopping.take() {
            let _ = reply.try_send(answer);
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Request { .. } if self.stopping.is_some() && self.restarting => {
                self.parked += 1;
            }
            Event::Request { reply, cookie, .. } if self.stopping.is_some() => {
                let _ = reply.try_send(crate::run::nbd::Reply {
                    cookie,
                    error: crate::core::nbd::ESHUTDOWN,
                    data: None,
                });
            }
            Event::LinkUp(_) | Event::Frame { .. } if self.stopping.is_some() => {}
            Event::Command {
                command: Command::Stop { restart },
                reply,
            } => {
                log::info!("volume: stopping: the link goes down, then the disk queue drains");
                self.restarting = restart;
                if self.link.take().is_some() {
                    let actions = self.lose_link();
                    self.apply(actions);
                }
                self.stopping = Some(reply);
            }
            Event::Request { req, reply, cookie } => {
                let id = self.next_req;
                self.next_req += 1;
                let arrived = (!matches!(req, replica::Request::Flush)).then(Instant::now);
                self.waiting.insert(id, (reply, cookie, arrived));
                let actions = self.replica.request(id, req);
                self.apply(actions);
            }
            Event::Persisted { ok } => {
                self.queued -= 1;
                let released = self.gate.done(ok);
                for action in released {
                    self.emit(action);
                }
                if !ok && !self.meta_broken {
                    // Everything goes through the disk thread now, which
                    // fails it; the replica and the peer learn the copy
                    // is failed.
                    self.meta_broken = true;
                    let actions = self.replica.disk_failed();
                    self.apply(actions);
                }
            }
            Event::Disk { tag, result } => {
                self.queued -= 1;
                let actions = self.replica.disk_done(tag, result);
                self.apply(actions);
            }
            Event::LinkUp(link) if self.down_since.is_some() => {
                log::info!(
                    "volume: refused a link from {}: the volume is down (`hadb volume down`)",
                    link.peer
                );
            }
            Event::LinkUp(link) => {
                if self.link.is_some() {
                    log::info!("volume: a new link to {} replaces the old one", link.peer);
                    self.link = None;
                    let actions = self.lose_link();
                    self.apply(actions);
                }
                log::info!("volume: replication link to {} is up", link.peer);
                self.last_link_event =
                    Some(format!("link up at +{}s", self.started.elapsed().as_secs()));
                self.link = Some(link);
                let actions = self.replica.link_up();
                self.apply(actions);
            }
            Event::Frame {
                link,
                header,
                payload,
            } => {
                if self.link.as_ref().is_some_and(|l| l.id == link) {
                    let actions = self.replica.frame(header, payload);
                    self.apply(actions);
                }
            }
            Event::LinkLost { link, reason } => {
                if self.link.as_ref().is_some_and(|l| l.id == link) {
                    log::warn!(
                        "volume: replication link to {} lost: {reason}",
                        self.peer_name
                    );
                    self.last_link_event = Some(format!(
                        "link lost at +{}s: {reason}",
                        self.started.elapsed().as_secs()
                    ));
                    self.link = None;
                    let actions = self.lose_link();
                    self.apply(actions);
                }
            }
            Event::Command {
                command: Command::Primary { force },
                reply,
            } => match self.command(Command::Primary { force }) {
                Ok(_) if self.replica.role_request_pending() => self.promote_waiter = Some(reply),
                answer => {
                    let _ = reply.try_send(answer);
                }
            },
            Event::Command { command, reply } => {
                let answer = self.command(command);
                let _ = reply.try_send(answer);
            }
        }
    }

    /// The link is gone (already taken out of `self.link`): the frames held
    /// for it go with it, and the replica says what follows.
    fn lose_link(&mut self) -> Vec<Action> {
        self.gate.link_lost();
        self.replica.link_lost()
    }

    /// Sends a frame or answers a request, once the gate let it through;
    /// true when a frame was queued for the link.
    fn emit(&mut self, action: Action) -> bool {
        match action {
            Action::Send(frame) => self.send(frame),
            Action::Complete { id, result } => {
                if let Some((reply, cookie, arrived)) = self.waiting.remove(&id) {
                    if let (Some(t), Ok(())) = (arrived, &result) {
                        self.shared
                            .write_latency
                            .record(t.elapsed().as_micros() as u64);
                    }
                    let _ = reply.try_send(crate::run::nbd::Reply {
                        cookie,
                        error: result.err().unwrap_or(0),
                        data: None,
                    });
                }
                false
            }
            _ => false,
        }
    }

    /// Queues a frame for the link's writer; false when there is no link.
    fn send(&self, frame: Frame) -> bool {
        self.link
            .as_ref()
            .is_some_and(|link| link.frames.try_send(frame).is_ok())
    }

    fn answer_promotion(&mut self) {
        if self.promote_waiter.is_none() || self.replica.role_request_pending() {
            return;
        }
        let reply = self.promote_waiter.take().expect("checked");
        let answer = if self.replica.role() == Role::Primary {
            Ok(json!({"role": self.replica.role()}))
        } else {
            Err("the peer refused: it is primary, or asked to be primary first, or the link dropped; see `hadb status`".to_string())
        };
        let _ = reply.try_send(answer);
    }

    fn command(&mut self, command: Command) -> Result<serde_json::Value, String> {
        match command {
            Command::Status => Ok(self.status()),
            Command::Primary { force } => {
                if force {
                    log::warn!(
                        "volume: operator forces promotion (--force): this copy becomes the one others follow"
                    );
                }
                let actions = self.replica.promote(force).map_err(|e| e.to_string())?;
                self.apply(actions);
                Ok(json!({"role": self.replica.role()}))
            }
            Command::Secondary => {
                // Stop taking writes first; what is in flight drains.
                let actions = self.replica.demote().map_err(|e| e.to_string())?;
                self.apply(actions);
                Ok(json!({"role": self.replica.role()}))
            }
            Command::Verify => {
                let actions = self.replica.verify_start()?;
                self.apply(actions);
                Ok(json!({"verify": "started"}))
            }
            Command::DiscardMyData => {
                let actions = self.replica.discard_my_data()?;
                self.apply(actions);
                Ok(json!({"discard_my_data": true}))
            }
            Command::GoAlone => {
                let actions = self.replica.go_alone()?;
                self.apply(actions);
                Ok(json!({"alone": self.replica.alone()}))
            }
            Command::Stop { .. } => Err("stop is handled by the event loop".into()),
            Command::Down => {
                if self.replica.role() == Role::Primary {
                    return Err("the primary's volume holds the filesystem and takes the writes; make this node secondary first (`hadb standby on` or `hadb switchover`)".into());
                }
                if self.down_since.is_none() {
                    self.down_since = Some(Instant::now());
                    log::warn!(
                        "volume: down on the operator's word; hadb brings it back up within seconds (the volume stays up on every node)"
                    );
                    if let Some(link) = self.link.take() {
                        log::info!("volume: dropping the link to {}", link.peer);
                        let actions = self.lose_link();
                        self.apply(actions);
                    }
                }
                Ok(json!({"down": true}))
            }
            Command::Up { by_watchdog } => {
                if let Some(since) = self.down_since.take() {
                    if by_watchdog {
                        self.restored += 1;
                        log::warn!(
                            "watchdog: the volume was down for {} s; brought it back up",
                            since.elapsed().as_secs()
                        );
                    } else {
                        log::info!("volume: up again on the operator's word");
                    }
                }
                Ok(json!({"down": false}))
            }
            Command::PeerProvenOutdated(why, on_disk) => {
                let actions = self.replica.peer_proven_outdated(&why, on_disk);
                self.apply(actions);
                Ok(json!({"alone": self.replica.alone()}))
            }
            Command::OutdateSelf(token) => {
                let actions = self.replica.outdate_self(token)?;
                self.apply(actions);
                Ok(json!({"disk": self.replica.disk()}))
            }
        }
    }

    /// Carries out actions in order. Small writes and reads are done right
    /// here when nothing is queued for the disk thread (so order is kept)
    /// and no other event waits (so a busy loop keeps its parallelism):
    /// handing a 4 KiB page-cache write to another thread and back costs
    /// two wake-ups, more than the write. Flushes, FUA and large I/O go to
    /// the disk thread, which keeps the event loop free while they block.
    ///
    /// A write or flush that goes to the peer too is sent before the local
    /// disk is touched: disk work after a frame waits in `deferred` until
    /// the event loop has let the link's writer run. Otherwise the local
    /// write (inline, or a disk thread that takes the only CPU when woken)
    /// comes first, and the peer's round trip, the longer of the two, waits
    /// behind it. Metadata work keeps its place: it takes the deferred
    /// disk work with it.
    fn apply(&mut self, actions: Vec<Action>) {
        // What the metadata written here makes durable: the state the
        // replica returned these actions in.
        let after = self.replica.node_state();
        let mut todo: VecDeque<Action> = actions.into();
        let mut frame_out = false;
        while let Some(action) = todo.pop_front() {
            let action = match action {
                // Behind deferred disk work too, from this batch or an
                // earlier one of the same turn: disk work keeps its order.
                Action::Disk { .. } if frame_out || !self.deferred.is_empty() => {
                    self.deferred.push_back(action);
                    continue;
                }
                Action::Persist(_) | Action::PersistBitmap(_) | Action::PersistActivityLog(_)
                    if !self.deferred.is_empty() =>
                {
                    todo.push_front(action);
                    while let Some(later) = self.deferred.pop_back() {
                        todo.push_front(later);
                    }
                    frame_out = false;
                    continue;
                }
                action => action,
            };
            match action {
                Action::Persist(m) => {
                    let mut sb = self.superblock.clone();
                    sb.current_gen = m.current_gen;
                    sb.bitmap_gen = m.bitmap_gen;
                    sb.volume_id = m.volume_id;
                    sb.flags = (sb.flags
                        & !(flags::CONSISTENT
                            | flags::PRIMARY
                            | flags::OUTDATED
                            | flags::PEER_OUTDATED
                            | flags::LOST_CACHE))
                        | if m.peer_outdated {
                            flags::PEER_OUTDATED
                        } else {
                            0
                        }
                        | if m.lost_cache { flags::LOST_CACHE } else { 0 }
                        | if m.consistent { flags::CONSISTENT } else { 0 }
                        | if m.primary { flags::PRIMARY } else { 0 }
                        | if m.outdated { flags::OUTDATED } else { 0 };
                    if m.current_gen != self.superblock.current_gen
                        && self.superblock.current_gen != 0
                    {
                        sb.history.rotate_right(1);
                        sb.history[0] = self.superblock.current_gen;
                    }
                    sb.seq = self.superblock.seq;
                    self.superblock = sb.clone();
                    self.superblock.seq += 1;
                    self.queued += 1;
                    self.gate.queued(after);
                    let _ = self.jobs.send(Job::Persist(sb));
                }
                Action::PersistBitmap(pages) => {
                    self.queued += 1;
                    self.gate.queued(after);
                    let _ = self.jobs.send(Job::Bitmap(pages));
                }
                Action::PersistActivityLog(extents) => {
                    self.queued += 1;
                    self.gate.queued(after);
                    let _ = self.jobs.send(Job::ActivityLog(extents));
                }
                Action::Disk { tag, op } => {
                    if self.queued == 0
                        && !self.meta_broken
                        && self.events.is_empty()
                        && inline_ok(&op)
                    {
                        let result = do_inline(&self.inline, op).map_err(|e| {
                            log::error!("volume: disk I/O failed: {e}");
                            store::errno_of(&e)
                        });
                        todo.extend(self.replica.disk_done(tag, result));
                    } else {
                        self.queued += 1;
                        let _ = self.jobs.send(Job::Op(tag, op));
                    }
                }
                action @ (Action::Send(_) | Action::Complete { .. }) => {
                    if let Some(action) = self.gate.pass(action) {
                        frame_out |= self.emit(action);
                    }
                }
                Action::DropLink(why) => {
                    if let Some(link) = self.link.take() {
                        log::warn!("volume: dropping the link to {}: {why}", link.peer);
                        self.shared
                            .stats
                            .repl_protocol_errors
                            .fetch_add(1, Ordering::Relaxed);
                        todo.extend(self.lose_link());
                    }
                }
                Action::RoleChanged(role) => {
                    if role == Role::Primary {
                        self.shared.promotions.fetch_add(1, Ordering::Relaxed);
                    }
                    self.shared
                        .writable
                        .store(role == Role::Primary, Ordering::SeqCst);
                    let _ = self.role_tx.try_send(role);
                }
                Action::Log {
                    warn: true,
                    message,
                } => log::warn!("volume: {message}"),
                Action::Log {
                    warn: false,
                    message,
                } => log::info!("volume: {message}"),
            }
        }
    }

    fn status(&self) -> serde_json::Value {
        let r = &self.replica;
        let peer = r.peer_state().map(|p| {
            json!({
                "name": self.peer_name,
                "role": if p.role == 1 { "primary" } else { "secondary" },
                "disk": replica::disk_from_code(p.disk),
            })
        });
        let (current_gen, bitmap_gen) = r.generations();
        let resync = r.resync_progress().map(|(done, total, full, rate)| {
            let left = total.saturating_sub(done) * replica::BLOCK;
            json!({"done_blocks": done, "total_blocks": total, "full": full,
                   "percent": if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 },
                   "rate_bytes_per_s": rate,
                   "seconds_left": (rate > 0).then(|| left / rate)})
        });
        let (al_now, al_capacity, al_blocks, marked) = r.activity_log();
        json!({
            "role": r.role(),
            "disk": r.disk(),
            "link": r.link(),
            "mode": self.mode,
            "peer": peer,
            "peer_name": self.peer_name,
            "peer_up_to_date": r.peer_up_to_date(),
            "frozen": r.frozen(),
            "alone": r.alone(),
            "held_requests": r.held(),
            "pending_requests": r.pending(),
            "out_of_sync_bytes": r.out_of_sync_blocks().map(|b| b * replica::BLOCK),
            "resync": resync,
            "data_size": self.shared.data_size,
            "current_gen": format!("{current_gen:016x}"),
            "bitmap_gen": format!("{bitmap_gen:016x}"),
            "last_link_event": self.last_link_event,
            "down_seconds": self.down_since.map(|t| t.elapsed().as_secs()),
            "restored_by_watchdog": self.restored,
            "last_connect_rule": r.last_rule(),
            "verify": r.verify_progress().map(|(checked, total, differing)| json!({
                "checked_blocks": checked, "total_blocks": total, "differing_blocks": differing,
                "percent": if total == 0 { 100.0 } else { checked as f64 * 100.0 / total as f64 },
            })),
            "last_verify": r.verify_result().map(|(checked, differing, complete)| json!({
                "checked_blocks": checked, "differing_blocks": differing, "complete": complete,
            })),
            "split_brain": r.split_brain().map(|sb| json!({
                "since_gen": format!("{:016x}", sb.since_gen),
                "my_changed_bytes": sb.my_changes.map(|b| b * replica::BLOCK),
                "peer_changed_bytes": sb.peer_changes.map(|b| b * replica::BLOCK),
            })),
            "activity_log": {
                "extents": al_now,
                "capacity": al_capacity,
                "extent_bytes": al_blocks * replica::BLOCK,
                "last_stop": if marked.is_some() { "unclean" } else { "clean" },
                "extents_marked_at_start": marked,
            },
            "counters": r.counters,
            "write_latency": self.shared.write_latency.snapshot(),
            "promotions": self.shared.promotions.load(Ordering::Relaxed),
            "semisync": (self.mode == crate::config::Mode::Semisync).then(|| json!({
                "status": if r.semisync_on() { "ON" } else { "OFF" },
                "yes_tx": r.semisync.waited,
                "no_tx": r.semisync.not_waited,
                "no_times": r.semisync.went_alone,
                "avg_wait_us": r.semisync.wait_us_total.checked_div(r.semisync.waited).unwrap_or(0),
            })),
            "bad_input": self.shared.stats.snapshot(),
        })
    }
}

/// How often the state machine's timers (semisync's ack timeout) run.
const TICK: std::time::Duration = std::time::Duration::from_millis(100);

/// Largest write or read done inline on the event loop.
const INLINE_MAX: u64 = 128 * 1024;

fn inline_ok(op: &DiskOp) -> bool {
    match op {
        DiskOp::Write { data, fua, .. } => !fua && data.len() as u64 <= INLINE_MAX,
        DiskOp::Read { length, .. } => *length <= INLINE_MAX,
        DiskOp::Zeroes { .. } | DiskOp::Flush => false,
    }
}

fn do_inline(file: &File, op: DiskOp) -> std::io::Result<Option<Payload>> {
    match op {
        DiskOp::Write { offset, data, .. } => file.write_all_at(&data, offset).map(|()| None),
        DiskOp::Read { offset, length } => {
            let mut buf = vec![0u8; length as usize];
            file.read_exact_at(&mut buf, offset)?;
            Ok(Some(Arc::new(buf)))
        }
        DiskOp::Zeroes { .. } | DiskOp::Flush => unreachable!("never inline"),
    }
}
