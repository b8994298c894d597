//! Deterministic simulation of the whole pair: on each of two nodes the
//! real pure cores (the volume's `Replica`, the heartbeat's `Membership`,
//! the `Manager`) as the daemon wires them, on a simulated clock; a
//! replication link that drops; two heartbeat rings whose datagrams are
//! lost, delayed, duplicated, replayed, and cut per ring and per direction;
//! disks whose cache loses unflushed writes on a crash; crashes and
//! restarts; wall clocks that step back and forth, or read 0 as on a VM
//! whose clock is not set yet (only the incarnation reads them, through
//! `core::incarnation`, from the last one each node kept on disk); an
//! operator who toggles standby, asks for switchovers, and
//! confirms fences only after powering the fenced node off (what
//! `hadb fence confirm` asks of a human); a client writing on whichever
//! node is primary.
//!
//! Checked at every step: never two nodes primary at once (promise 2).
//! After every promotion: every write acknowledged after a flush is on the
//! new primary (promise 1). Once the faults stop: within a bounded
//! simulated time the pair is one primary plus an up-to-date secondary
//! with identical copies (promise 3).
//!
//! Half the seeds add a witness (a third, diskless voter, the real
//! `quorum::Witness` behind its own heartbeats) and the `watchdog` fence
//! method: a node without quorum for the grace stops petting its
//! watchdog and goes down a watchdog timeout later; a vote holder counts
//! its peer fenced after twice that timeout of silence. Checked on top:
//! a watchdog fence is confirmed only when the peer is down or has
//! fenced itself.
//!
//! `HADB_SIM_SEEDS=N` runs N seeds (default 30000); `HADB_SIM_SEED=S`
//! replays one with its trace.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod simkit;

use std::collections::{HashMap, VecDeque};

use hadb::config::Mode;
use hadb::core::heartbeat::{
    FLAG_OUTDATE_REQUEST, FLAG_STANDBY, FLAG_WANTS_VOTE, FLAG_WITNESS, Membership, NodeReport,
};
use hadb::core::incarnation;
use hadb::core::manager::{self, Fence, Inputs, Manager, PeerView, VolumeView};
use hadb::core::quorum::{Vote, VoterView, WatchdogProof, Witness, WitnessConfig, watchdog_proof};
use hadb::core::replica::{Action, DiskState, Frame, Replica, Request, Role};
use hadb::core::settings;
use simkit::{DATA, Oracle, Rng, SimVolume, Step};

const KEY: &[u8] = b"simulated cluster key, 32 bytes!";
const RINGS: usize = 2;
const HB_INTERVAL_US: u64 = 200_000;
const HB_TIMEOUT_US: u64 = 1_000_000;
const TICK_US: u64 = 100_000;
const FENCE_DELAY_US: u64 = 2_000_000;
const ACK_TIMEOUT_US: u64 = 500_000;
/// After the faults stop, the pair must be whole within this.
const HEAL_US: u64 = 120_000_000;
/// The nodes' watchdog timeout, with a witness (what `config` asks: the
/// self-fence grace plus two heartbeat timeouts).
const WATCHDOG_US: u64 = 6_000_000;
const SELF_FENCE_AFTER_US: u64 = 4 * HB_TIMEOUT_US;
/// The witness's index in datagrams.
const W: usize = 2;
/// The wall clocks' reading at simulated time 0 (2025-01-01), in µs
/// since the epoch.
const WALL_BASE_US: u64 = 1_735_689_600_000_000;
const HOUR_US: u64 = 3_600_000_000;

/// A machine's wall clock, off the simulated time by what it was stepped,
/// and the incarnation it last took, which survives crashes (the daemon
/// keeps it in `state_dir`).
#[derive(Default)]
struct Wall {
    offset_us: i128,
    last_incarnation: Option<u64>,
}

impl Wall {
    fn reads(&self, now_us: u64) -> u64 {
        (i128::from(WALL_BASE_US) + i128::from(now_us) + self.offset_us)
            .clamp(0, i128::from(u64::MAX)) as u64
    }

    /// This run's incarnation, as `run::incarnation::take` chooses it.
    fn take(&mut self, now_us: u64, parity: u64) -> u64 {
        let inc = incarnation::next(self.last_incarnation, self.reads(now_us), parity)
            .expect("simulated incarnations stay far below u64::MAX");
        self.last_incarnation = Some(inc);
        inc
    }
}

/// The third, diskless voter.
struct SimWitness {
    up: bool,
    core: Option<Witness>,
    /// Its heartbeat with each node.
    members: Option<[Membership; 2]>,
    next_hb_us: u64,
    /// wcut[n]: datagrams between node n and the witness are lost.
    cut: [bool; 2],
    wall: Wall,
}

struct Node {
    name: &'static str,
    up: bool,
    replica: Option<Replica>,
    membership: Option<Membership>,
    manager: Option<Manager>,
    vol: SimVolume,
    app: HashMap<u64, Option<usize>>,
    next_hb_us: u64,
    next_tick_us: u64,
    /// mysqld failed here (restarted too often), until the operator's
    /// `hadb mysql reset` or a restart of hadb.
    service_failed: bool,
    /// With a witness: this node's heartbeat with it.
    wmember: Option<Membership>,
    /// Stopped petting its watchdog: goes down at this time.
    watchdog_fires_us: Option<u64>,
    /// A `watchdog` fence under way since.
    watchdog_fence_since_us: Option<u64>,
    /// With a witness: `watchdog` is among this node's fence methods, so
    /// it fences itself without quorum and fences its peer by waiting.
    /// Some seeds leave it off one node: settings that differ.
    watchdog_method: bool,
    wall: Wall,
}

struct Datagram {
    at_us: u64,
    from: usize,
    to: usize,
    ring: usize,
    bytes: Vec<u8>,
}

struct Sim {
    rng: Rng,
    nodes: [Node; 2],
    now_us: u64,
    mode: Mode,
    repl_up: bool,
    /// A story cut the replication link alone (silently, heartbeats
    /// still flow): it stays down until healed.
    repl_cut: bool,
    wire: [VecDeque<Frame>; 2],
    /// cut[ring][from]: datagrams from `from` on `ring` are lost.
    cut: [[bool; 2]; RINGS],
    air: Vec<Datagram>,
    /// Old datagrams an attacker (or a confused switch) replays.
    recorded: Vec<Datagram>,
    oracle: Oracle,
    next_id: u64,
    trace: Vec<String>,
    verbose: bool,
    witness: Option<SimWitness>,
    /// Requests the client saw fail.
    app_errors: u64,
    /// The nodes' heartbeats carry their settings (always, but in a story
    /// that says `settings not compared`).
    compare_settings: bool,
}

impl Sim {
    fn new(seed: u64, verbose: bool) -> Sim {
        let mode = if seed.is_multiple_of(2) {
            Mode::Sync
        } else {
            Mode::Semisync
        };
        Sim::with_mode(seed, verbose, mode)
    }

    fn with_mode(seed: u64, verbose: bool, mode: Mode) -> Sim {
        // A quarter of the witness seeds: one node without the `watchdog`
        // method (it never fences itself), the other with it.
        let lacking = (seed % 8 >= 6).then_some((seed % 2) as usize);
        Sim::with_settings(seed, verbose, mode, lacking)
    }

    /// `without_watchdog_method`: that node's fence methods lack
    /// `watchdog` (with a witness: settings that differ).
    fn with_settings(
        seed: u64,
        verbose: bool,
        mode: Mode,
        without_watchdog_method: Option<usize>,
    ) -> Sim {
        let node = |name| Node {
            name,
            up: false,
            replica: None,
            membership: None,
            manager: None,
            vol: SimVolume::new(DATA),
            app: HashMap::new(),
            next_hb_us: 0,
            next_tick_us: 0,
            service_failed: false,
            wmember: None,
            watchdog_fires_us: None,
            watchdog_fence_since_us: None,
            watchdog_method: true,
            wall: Wall::default(),
        };
        let mut sim = Sim {
            rng: Rng::new(seed),
            nodes: [node("a"), node("b")],
            now_us: 0,
            mode,
            repl_up: false,
            repl_cut: false,
            wire: [VecDeque::new(), VecDeque::new()],
            cut: [[false; 2]; RINGS],
            air: Vec::new(),
            recorded: Vec::new(),
            oracle: Oracle::default(),
            next_id: 1,
            trace: Vec::new(),
            verbose,
            app_errors: 0,
            witness: (seed % 4 >= 2).then_some(SimWitness {
                up: false,
                core: None,
                members: None,
                next_hb_us: 0,
                cut: [false; 2],
                wall: Wall::default(),
            }),
            compare_settings: true,
        };
        if sim.witness.is_some() {
            sim.start_witness();
        }
        if let Some(n) = without_watchdog_method {
            sim.nodes[n].watchdog_method = false;
        }
        sim.start(0);
        sim.start(1);
        sim
    }

    fn log(&mut self, s: String) {
        let line = format!("{:>9.3} {s}", self.now_us as f64 / 1e6);
        if self.verbose {
            eprintln!("{line}");
        }
        self.trace.push(line);
        if self.trace.len() > 600 {
            self.trace.drain(..200);
        }
    }

    fn r(&mut self, n: usize) -> &mut Replica {
        self.nodes[n].replica.as_mut().unwrap()
    }

    fn primaries(&self) -> Vec<usize> {
        (0..2)
            .filter(|&n| {
                self.nodes[n]
                    .replica
                    .as_ref()
                    .is_some_and(|r| r.role() == Role::Primary)
            })
            .collect()
    }

    fn start(&mut self, n: usize) {
        let seed = self.rng.next();
        // Parity by name order, as the daemon's.
        let incarnation = self.nodes[n].wall.take(self.now_us, n as u64);
        let mode = self.mode;
        let node = &mut self.nodes[n];
        let peer = if n == 0 { "b" } else { "a" };
        let setup = node.vol.setup(mode, node.name, peer, seed, ACK_TIMEOUT_US);
        node.replica = Some(Replica::new(setup));
        node.membership = Some(Membership::new(
            "sim",
            node.name,
            peer,
            KEY,
            RINGS,
            HB_TIMEOUT_US,
            incarnation,
        ));
        let with_witness = self.witness.is_some();
        let settings = Sim::settings(with_witness, node.watchdog_method, mode);
        node.manager = Some(Manager::new(manager::Config {
            me_first: n == 0,
            fence_delay_us: FENCE_DELAY_US,
            retry_us: 1_000_000,
            start_grace_us: 2 * HB_TIMEOUT_US,
            restart_grace_us: 30_000_000,
            self_fence_after_us: (with_witness && node.watchdog_method)
                .then_some(SELF_FENCE_AFTER_US),
            fence_retry_us: with_witness.then_some(30_000_000),
            settings,
        }));
        node.wmember = with_witness
            .then(|| Membership::new("sim", node.name, "w", KEY, 1, HB_TIMEOUT_US, incarnation));
        node.watchdog_fires_us = None;
        node.watchdog_fence_since_us = None;
        node.up = true;
        // A new hadb process: its supervisor has counted nothing yet.
        node.service_failed = false;
        node.next_hb_us = self.now_us;
        node.next_tick_us = self.now_us;
        let meta = node.vol.meta;
        self.log(format!("START {} {meta:?}", self.nodes[n].name));
        let a = self.r(n).started();
        self.apply(n, a);
    }

    fn crash(&mut self, n: usize) {
        if !self.nodes[n].up {
            return;
        }
        self.log(format!("CRASH {}", self.nodes[n].name));
        self.drop_link();
        let node = &mut self.nodes[n];
        node.up = false;
        node.replica = None;
        node.membership = None;
        node.manager = None;
        node.wmember = None;
        node.watchdog_fires_us = None;
        node.watchdog_fence_since_us = None;
        node.app.clear();
        node.vol.crash(&mut self.rng);
        self.oracle.crashed(n);
    }

    fn apply(&mut self, n: usize, actions: Vec<Action>) {
        let after = self.nodes[n]
            .replica
            .as_ref()
            .map(hadb::core::replica::Replica::node_state);
        for a in actions {
            let after = after.expect("actions come from a live replica");
            let Some(a) = self.nodes[n].vol.take(a, after) else {
                continue;
            };
            match a {
                Action::Send(f) if self.repl_up => self.wire[n].push_back(f),
                Action::Complete { id, result } => {
                    let Some(op) = self.nodes[n].app.remove(&id) else {
                        continue;
                    };
                    match (op, result) {
                        (_, Err(_)) => self.app_errors += 1,
                        (Some(_), Ok(())) => self.oracle.write_completed(id, n),
                        (None, Ok(())) => self.oracle.flush_completed(id),
                    }
                }
                Action::DropLink(why) => {
                    self.log(format!("{} drops the link: {why}", self.nodes[n].name));
                    self.drop_link();
                }
                Action::Log { message, .. } => {
                    self.log(format!("  {}: {message}", self.nodes[n].name))
                }
                _ => {}
            }
        }
    }

    fn drop_link(&mut self) {
        if !self.repl_up {
            return;
        }
        self.repl_up = false;
        self.wire = [VecDeque::new(), VecDeque::new()];
        for n in 0..2 {
            self.nodes[n].vol.link_lost();
            if self.nodes[n].up {
                let a = self.r(n).link_lost();
                self.apply(n, a);
            }
        }
    }

    /// Whether the replication link can be up: both nodes up, ring0
    /// carrying both ways, and no story holding it cut.
    fn repl_path(&self) -> bool {
        self.nodes[0].up && self.nodes[1].up && !self.cut[0][0] && !self.cut[0][1] && !self.repl_cut
    }

    /// The replication link runs over ring0: it comes up when both nodes
    /// are up and ring0 carries both ways, and breaks when it does not.
    fn link_weather(&mut self) {
        let path = self.repl_path();
        if self.repl_up && !path && self.rng.chance(300) {
            self.log("replication link breaks".into());
            self.drop_link();
        } else if !self.repl_up && path && self.rng.chance(100) {
            self.repl_up = true;
            self.log("replication link up".into());
            let first = self.rng.below(2) as usize;
            for n in [first, 1 - first] {
                let a = self.r(n).link_up();
                self.apply(n, a);
            }
        }
    }

    fn disk_step(&mut self, n: usize) {
        match self.nodes[n].vol.step() {
            Step::Idle => {}
            Step::Meta(released) => self.apply(n, released),
            Step::Done(tag, result) => {
                let a = self.r(n).disk_done(tag, result);
                self.apply(n, a);
            }
        }
    }

    fn deliver_frame(&mut self, from: usize) {
        let Some(f) = self.wire[from].pop_front() else {
            return;
        };
        let a = self.r(1 - from).frame(f.header, f.payload);
        self.apply(1 - from, a);
    }

    /// This node's heartbeat report, as the daemon builds it.
    fn report(&mut self, n: usize) -> NodeReport {
        let now = self.nodes[n].replica.as_ref().unwrap().node_state();
        let s = self.nodes[n].vol.report(now);
        let node = &self.nodes[n];
        let token = node.replica.as_ref().unwrap().report_token();
        let (standby, ask) = node.manager.as_ref().unwrap().flags();
        // As the daemon: every node's watchdog is open with a witness,
        // but only one that fences itself says so.
        let with_witness = self.witness.is_some();
        let (watchdog_flag, watchdog_ms) = settings::watchdog_advert(
            settings::self_fences(with_witness, node.watchdog_method, true),
            with_witness.then_some((WATCHDOG_US / 1000) as u32),
        );
        NodeReport {
            role: s.role,
            disk: s.disk,
            current_gen: s.current_gen,
            flags: if standby { FLAG_STANDBY } else { 0 }
                | if ask { FLAG_OUTDATE_REQUEST } else { 0 }
                | watchdog_flag,
            volume_link: 0,
            service: if node.service_failed {
                hadb::core::heartbeat::SERVICE_FAILED
            } else {
                0
            },
            watchdog_timeout_ms: watchdog_ms,
            hears: 0,
            vote: 0,
            outdate_token: token,
            // A story may leave them out, so that the watchdog fence's own
            // check is seen to hold without the comparison (rule 16).
            settings: if self.compare_settings {
                Sim::settings(with_witness, node.watchdog_method, self.mode)
            } else {
                settings::Settings::default()
            },
        }
    }

    /// A node's settings that must agree, as the daemon takes them from
    /// its config.
    fn settings(with_witness: bool, watchdog_method: bool, mode: Mode) -> settings::Settings {
        settings::Settings::new(
            mode,
            settings::self_fences(with_witness, watchdog_method, true),
            with_witness.then_some("w"),
            HB_TIMEOUT_US,
            FENCE_DELAY_US,
            WATCHDOG_US,
        )
    }

    fn send_heartbeats(&mut self, n: usize, faults: bool) {
        let report = self.report(n);
        for ring in 0..RINGS {
            let bytes =
                self.nodes[n]
                    .membership
                    .as_mut()
                    .unwrap()
                    .outgoing(ring, report, self.now_us);
            if self.cut[ring][n] || (faults && self.rng.chance(10)) {
                continue;
            }
            // Usually a few ms; now and then 200 ms of jitter.
            let delay = if self.rng.chance(50) {
                self.rng.below(200_000)
            } else {
                self.rng.below(5_000)
            };
            let copies = if self.rng.chance(10) { 2 } else { 1 };
            for _ in 0..copies {
                self.air.push(Datagram {
                    at_us: self.now_us + delay,
                    from: n,
                    to: 1 - n,
                    ring,
                    bytes: bytes.clone(),
                });
            }
            if self.rng.chance(5) {
                self.recorded.push(Datagram {
                    at_us: 0,
                    from: n,
                    to: 1 - n,
                    ring,
                    bytes,
                });
            }
        }
    }

    fn deliver_datagrams(&mut self) {
        let now = self.now_us;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.air)
            .into_iter()
            .partition(|d| d.at_us <= now);
        self.air = later;
        for d in due {
            self.receive(d.from, d.to, d.ring, &d.bytes);
        }
    }

    fn replay_old_datagram(&mut self) {
        if self.recorded.is_empty() {
            return;
        }
        let i = self.rng.below(self.recorded.len() as u64) as usize;
        let d = &self.recorded[i];
        let (from, to, ring, bytes) = (d.from, d.to, d.ring, d.bytes.clone());
        self.receive(from, to, ring, &bytes);
    }

    fn receive(&mut self, from: usize, to: usize, ring: usize, bytes: &[u8]) {
        let now = self.now_us;
        if to == W {
            if let Some(w) = self.witness.as_mut().filter(|w| w.up)
                && let Some(m) = w.members.as_mut()
            {
                let _ = m[from].receive(0, bytes, now);
            }
        } else if from == W {
            if let Some(m) = self.nodes[to].wmember.as_mut() {
                let _ = m.receive(0, bytes, now);
            }
        } else if let Some(m) = self.nodes[to].membership.as_mut() {
            let _ = m.receive(ring, bytes, now);
        }
    }

    fn start_witness(&mut self) {
        let now = self.now_us;
        let incarnation = self.witness.as_mut().unwrap().wall.take(now, 0);
        let member = |name| Membership::new("sim", "w", name, KEY, 1, HB_TIMEOUT_US, incarnation);
        let w = self.witness.as_mut().unwrap();
        w.up = true;
        w.core = Some(Witness::new(WitnessConfig::from_timeout(HB_TIMEOUT_US)));
        w.members = Some([member("a"), member("b")]);
        w.next_hb_us = now;
        self.log("START witness".into());
    }

    /// Steps the wall clock of node `who` (or the witness, W): back or
    /// forward by up to an hour, or to 0 (a clock not set yet).
    fn step_clock(&mut self, who: usize) {
        let now = self.now_us;
        let kind = self.rng.below(3);
        let by = i128::from(1 + self.rng.below(HOUR_US));
        let (wall, name) = if who == W {
            (&mut self.witness.as_mut().unwrap().wall, "witness")
        } else {
            (&mut self.nodes[who].wall, self.nodes[who].name)
        };
        let before = wall.reads(now);
        match kind {
            0 => wall.offset_us -= by,
            1 => wall.offset_us += by,
            _ => wall.offset_us = -(i128::from(WALL_BASE_US) + i128::from(now)),
        }
        let after = wall.reads(now);
        self.log(format!("clock of {name} stepped from {before} to {after}"));
    }

    fn crash_witness(&mut self) {
        let w = self.witness.as_mut().unwrap();
        if w.up {
            w.up = false;
            w.core = None;
            w.members = None;
            self.log("CRASH witness".into());
        }
    }

    /// A datagram between a node and the witness, unless that path is
    /// cut (or, with faults, lost).
    fn witness_send(&mut self, from: usize, to: usize, bytes: Vec<u8>, faults: bool) {
        let n = if from == W { to } else { from };
        if self.witness.as_ref().unwrap().cut[n] || (faults && self.rng.chance(10)) {
            return;
        }
        let delay = self.rng.below(5_000);
        self.air.push(Datagram {
            at_us: self.now_us + delay,
            from,
            to,
            ring: 0,
            bytes,
        });
    }

    /// The witness's timers: its heartbeats, its vote.
    fn witness_timers(&mut self, faults: bool) {
        let now = self.now_us;
        let Some(w) = self.witness.as_mut().filter(|w| w.up) else {
            return;
        };
        let members = w.members.as_mut().unwrap();
        for m in members.iter_mut() {
            m.tick(now);
        }
        if now < w.next_hb_us {
            return;
        }
        w.next_hb_us = now + HB_INTERVAL_US;
        let views: [VoterView; 2] = std::array::from_fn(|n| VoterView::of(&members[n]));
        let changes = w.core.as_mut().unwrap().step(now, &views);
        let vote = w.core.as_ref().unwrap().vote().map_or(0, |(_, inc)| inc);
        let report = NodeReport {
            disk: 255,
            flags: FLAG_WITNESS,
            vote,
            ..NodeReport::default()
        };
        let packets: Vec<Vec<u8>> = (0..2)
            .map(|n| members[n].outgoing(0, report, now))
            .collect();
        for c in changes {
            self.log(format!("  witness: {c}"));
        }
        for (n, p) in packets.into_iter().enumerate() {
            self.witness_send(W, n, p, faults);
        }
    }

    fn vote(&self, n: usize) -> Option<Vote> {
        let m = self.nodes[n].wmember.as_ref()?;
        let vote = m.peer_report().map_or(0, |r| r.vote);
        Some(Vote::of(m.peer_alive(), vote, m.incarnation()))
    }

    /// The watchdog: a node that stopped petting goes down on time; a
    /// `watchdog` fence under way is confirmed by the real proof, and the
    /// check that it is true.
    fn watchdogs(&mut self) -> Result<(), String> {
        let now = self.now_us;
        for n in 0..2 {
            if self.nodes[n].up && self.nodes[n].watchdog_fires_us.is_some_and(|t| now >= t) {
                self.log(format!("WATCHDOG resets {}", self.nodes[n].name));
                self.crash(n);
            }
        }
        for n in 0..2 {
            let Some(since) = self.nodes[n].watchdog_fence_since_us else {
                continue;
            };
            let pending = self.nodes[n]
                .manager
                .as_ref()
                .is_some_and(|m| matches!(m.fence(), Fence::Pending { .. }));
            if !pending || self.vote(n) != Some(Vote::Mine) {
                // No longer wanted, or the vote is gone: the method fails
                // and the fence waits for the operator.
                self.nodes[n].watchdog_fence_since_us = None;
                if pending {
                    self.log(format!(
                        "  {}: watchdog fence FAILED: the vote is not mine",
                        self.nodes[n].name
                    ));
                    self.nodes[n].manager.as_mut().unwrap().fence_failed();
                }
                continue;
            }
            let m = self.nodes[n].membership.as_ref().unwrap();
            let (alive, last) = (m.peer_alive(), m.last_heard_us());
            let advertised = m
                .peer_report()
                .as_ref()
                .and_then(settings::peer_self_fences);
            if let WatchdogProof::Confirmed { .. } =
                watchdog_proof(advertised, since, last, alive, now)
            {
                let peer = &self.nodes[1 - n];
                let self_fenced = peer.manager.as_ref().is_some_and(|m| m.self_fenced());
                if peer.up && !self_fenced {
                    return Err(format!(
                        "{} confirmed a watchdog fence of {}, which is up and has not fenced itself",
                        self.nodes[n].name, peer.name
                    ));
                }
                self.log(format!(
                    "  {}: watchdog fence confirmed",
                    self.nodes[n].name
                ));
                self.nodes[n].watchdog_fence_since_us = None;
                let _ = self.nodes[n].manager.as_mut().unwrap().fence_confirmed(now);
            }
        }
        Ok(())
    }

    fn inputs(&self, n: usize) -> Inputs {
        let node = &self.nodes[n];
        let r = node.replica.as_ref().unwrap();
        let m = node.membership.as_ref().unwrap();
        Inputs {
            now_us: self.now_us,
            volume: VolumeView::of(r),
            peer_alive: m.peer_alive(),
            peer: m.peer_report().as_ref().map(PeerView::of),
            service_failed: node.service_failed,
            vote: self.vote(n),
        }
    }

    /// The daemon's timers: heartbeats, membership and manager ticks, the
    /// volume's timers.
    fn timers(&mut self, faults: bool) -> Result<(), String> {
        self.witness_timers(faults);
        self.watchdogs()?;
        for n in 0..2 {
            if !self.nodes[n].up {
                continue;
            }
            let now = self.now_us;
            self.r(n).set_now(now);
            self.nodes[n].membership.as_mut().unwrap().tick(now);
            if now >= self.nodes[n].next_hb_us {
                self.nodes[n].next_hb_us = now + HB_INTERVAL_US;
                self.send_heartbeats(n, faults);
                if self.witness.is_some() {
                    let mut report = self.report(n);
                    if !self.nodes[n].membership.as_ref().unwrap().peer_alive() {
                        report.flags |= FLAG_WANTS_VOTE;
                    }
                    let wm = self.nodes[n].wmember.as_mut().unwrap();
                    wm.tick(now);
                    let bytes = wm.outgoing(0, report, now);
                    self.witness_send(n, W, bytes, faults);
                }
            }
            if now >= self.nodes[n].next_tick_us {
                self.nodes[n].next_tick_us = now + TICK_US;
                let a = self.r(n).tick();
                self.apply(n, a);
                self.manager_tick(n)?;
            }
        }
        Ok(())
    }

    fn manager_tick(&mut self, n: usize) -> Result<(), String> {
        let inputs = self.inputs(n);
        let actions = self.nodes[n].manager.as_mut().unwrap().step(&inputs);
        for a in actions {
            let name = self.nodes[n].name;
            match a {
                manager::Action::Log { message, .. } => self.log(format!("  {name}: {message}")),
                manager::Action::Fence => {
                    self.log(format!("  {name}: FENCE requested"));
                    // With a witness, the `watchdog` method runs first;
                    // the operator is the last level either way.
                    if self.witness.is_some()
                        && self.nodes[n].watchdog_method
                        && self.vote(n) == Some(Vote::Mine)
                    {
                        self.nodes[n].watchdog_fence_since_us = Some(self.now_us);
                    }
                }
                manager::Action::SelfFence => {
                    self.log(format!(
                        "  {name}: SELF-FENCE: the watchdog is no longer petted"
                    ));
                    self.nodes[n].watchdog_fires_us = Some(self.now_us + WATCHDOG_US);
                }
                manager::Action::Promote => {
                    if let Ok(a) = self.r(n).promote(false) {
                        self.apply(n, a);
                    }
                    self.check_promotion(n)?;
                }
                manager::Action::Demote => {
                    if let Ok(a) = self.r(n).demote() {
                        self.apply(n, a);
                    }
                }
                manager::Action::PeerProvenOutdated(why, on_disk) => {
                    let a = self.r(n).peer_proven_outdated(why, on_disk);
                    self.apply(n, a);
                }
                manager::Action::OutdateSelf(token) => {
                    if let Ok(a) = self.r(n).outdate_self(token) {
                        self.apply(n, a);
                    }
                }
            }
        }
        Ok(())
    }

    /// Promise 1 on a node that just became primary.
    fn check_promotion(&mut self, n: usize) -> Result<(), String> {
        if self.nodes[n]
            .replica
            .as_ref()
            .is_some_and(|r| r.role() == Role::Primary)
        {
            self.oracle.check(
                &self.nodes[n].vol.disk.view(),
                self.nodes[n].name,
                "after promotion",
            )?;
        }
        Ok(())
    }

    /// The operator: confirms a pending fence only after making sure the
    /// peer is off (powering it off if it is not).
    fn operator_fences(&mut self) {
        for n in 0..2 {
            let pending = self.nodes[n]
                .manager
                .as_ref()
                .is_some_and(|m| matches!(m.fence(), Fence::Pending { .. }));
            if !pending || !self.rng.chance(20) {
                continue;
            }
            if self.nodes[1 - n].up {
                self.log(format!(
                    "operator powers {} off (fence)",
                    self.nodes[1 - n].name
                ));
                self.crash(1 - n);
            }
            self.log(format!(
                "operator confirms the fence on {}",
                self.nodes[n].name
            ));
            let now = self.now_us;
            let _ = self.nodes[n].manager.as_mut().unwrap().fence_confirmed(now);
        }
    }

    fn client(&mut self) {
        let ps = self.primaries();
        let [p] = ps[..] else { return };
        if self.nodes[p].app.len() >= 8 {
            return;
        }
        let (id, req, block) =
            simkit::next_request(&mut self.rng, &mut self.oracle, &mut self.next_id);
        self.nodes[p].app.insert(id, block);
        let a = self.r(p).request(id, req);
        self.apply(p, a);
    }

    fn step(&mut self, faults: bool) -> Result<(), String> {
        self.now_us += 1 + self.rng.below(10_000);
        self.deliver_datagrams();
        self.timers(faults)?;
        self.link_weather();
        let x = self.rng.below(1000);
        match x {
            0..=299 => {
                let from = self.rng.below(2) as usize;
                if self.nodes[1 - from].up {
                    self.deliver_frame(from);
                }
            }
            300..=599 => {
                let n = self.rng.below(2) as usize;
                if self.nodes[n].up {
                    self.disk_step(n);
                }
            }
            600..=799 if faults => self.client(),
            800..=809 => self.operator_fences(),
            810..=812 if faults => {
                let n = self.rng.below(2) as usize;
                if let Some(m) = self.nodes[n].manager.as_mut() {
                    let on = !m.standby();
                    m.set_standby(on);
                    let name = self.nodes[n].name;
                    self.log(format!("operator: standby {on} on {name}"));
                }
            }
            813..=814 if faults => {
                if let [p] = self.primaries()[..] {
                    let v = self.inputs(p).volume;
                    let name = self.nodes[p].name;
                    if self.nodes[p]
                        .manager
                        .as_mut()
                        .unwrap()
                        .switchover(&v)
                        .is_ok()
                    {
                        self.log(format!("operator: switchover on {name}"));
                    }
                }
            }
            815..=824 if faults => {
                let ring = self.rng.below(RINGS as u64) as usize;
                let dir = self.rng.below(3) as usize;
                let cut = self.rng.chance(500);
                for from in 0..2 {
                    if dir == 2 || dir == from {
                        self.cut[ring][from] = cut;
                    }
                }
                self.log(format!(
                    "ring{ring} {} {}",
                    if cut { "cut" } else { "healed" },
                    ["a->b", "b->a", "both ways"][dir]
                ));
            }
            825..=827 if faults => {
                let n = self.rng.below(2) as usize;
                if self.rng.chance(300) {
                    self.crash(n);
                }
            }
            828..=839 if faults => {
                let n = self.rng.below(2) as usize;
                if !self.nodes[n].up {
                    // Often the clock is wrong at boot: the case that
                    // matters, a restart under a clock behind the last run.
                    if self.rng.chance(300) {
                        self.step_clock(n);
                    }
                    self.start(n);
                }
            }
            868..=869 if faults => {
                let who = self.rng.below(3) as usize;
                if who != W || self.witness.is_some() {
                    self.step_clock(who);
                }
            }
            840..=844 => self.replay_old_datagram(),
            // The witness's paths cut and healed, the witness down and up.
            862..=866 if faults && self.witness.is_some() => {
                let n = self.rng.below(2) as usize;
                let cut = self.rng.chance(500);
                self.witness.as_mut().unwrap().cut[n] = cut;
                let name = self.nodes[n].name;
                self.log(format!(
                    "witness path to {name} {}",
                    if cut { "cut" } else { "healed" }
                ));
            }
            867 if faults && self.witness.is_some() => {
                if self.witness.as_ref().unwrap().up {
                    if self.rng.chance(200) {
                        self.crash_witness();
                    }
                } else {
                    self.start_witness();
                }
            }
            // mysqld gives up on a node (its supervisor's verdict), or the
            // operator resets it.
            860..=861 if faults => {
                let n = self.rng.below(2) as usize;
                if self.nodes[n].up && self.rng.chance(300) {
                    let on = !self.nodes[n].service_failed;
                    self.nodes[n].service_failed = on;
                    let name = self.nodes[n].name;
                    self.log(if on {
                        format!("mysqld FAILED on {name}")
                    } else {
                        format!("operator: mysql reset on {name}")
                    });
                }
            }
            // Once the faults stop, a fenced (powered-off) node boots again,
            // as a VM does.
            845..=859 if !faults => {
                let n = self.rng.below(2) as usize;
                if !self.nodes[n].up {
                    self.start(n);
                }
            }
            _ => {}
        }
        let ps = self.primaries();
        if ps.len() > 1 {
            return Err("TWO PRIMARIES".into());
        }
        Ok(())
    }

    /// A fresh pair's first primary is the operator's: a, once connected;
    /// faults start once b holds a full copy.
    fn establish(&mut self) -> Result<(), String> {
        for _ in 0..20_000 {
            self.step(false)?;
            if self.primaries() == [0] && self.r(0).peer_up_to_date() {
                return Ok(());
            }
            if self.primaries().is_empty()
                && !self.r(0).role_request_pending()
                && self.r(0).peer_state().is_some()
                && let Ok(a) = self.r(0).promote(false)
            {
                self.apply(0, a);
            }
        }
        Err("the first primary and its initial sync never completed".into())
    }

    /// One millisecond of a scripted story: no random faults, every frame
    /// and disk operation carried out, the link following ring0 at once.
    fn scripted_tick(&mut self) -> Result<(), String> {
        self.now_us += 1_000;
        self.deliver_datagrams();
        self.timers(false)?;
        let path = self.repl_path();
        if self.repl_up && !path {
            self.log("replication link breaks".into());
            self.drop_link();
        } else if !self.repl_up && path {
            self.repl_up = true;
            self.log("replication link up".into());
            for n in 0..2 {
                let a = self.r(n).link_up();
                self.apply(n, a);
            }
        }
        for _ in 0..1000 {
            let mut busy = false;
            for n in 0..2 {
                if self.nodes[1 - n].up && !self.wire[n].is_empty() {
                    self.deliver_frame(n);
                    busy = true;
                }
                if self.nodes[n].up && !self.nodes[n].vol.queue.is_empty() {
                    self.disk_step(n);
                    busy = true;
                }
            }
            if !busy {
                break;
            }
        }
        if self.primaries().len() > 1 {
            return Err("TWO PRIMARIES".into());
        }
        Ok(())
    }

    /// Whether the pair is one primary plus an up-to-date secondary.
    fn whole(&mut self) -> bool {
        let [p] = self.primaries()[..] else {
            return false;
        };
        self.quiet()
            && self.nodes[1 - p].up
            && self.r(p).peer_up_to_date()
            && self.r(1 - p).disk() == DiskState::UpToDate
    }

    fn quiet(&self) -> bool {
        self.wire.iter().all(|w| w.is_empty())
            && self
                .nodes
                .iter()
                .all(|n| n.vol.queue.is_empty() && n.app.is_empty())
    }

    fn run(&mut self, steps: usize) -> Result<(), String> {
        for _ in 0..steps {
            self.step(true)?;
        }
        self.log(
            "--- faults stop: every node up, every ring whole, standby off, mysqld reset".into(),
        );
        self.cut = [[false; 2]; RINGS];
        if let Some(w) = self.witness.as_mut() {
            w.cut = [false; 2];
            if !w.up {
                self.start_witness();
            }
        }
        for n in 0..2 {
            self.nodes[n].vol.failing_writes = 0;
            let failed = self.nodes[n]
                .replica
                .as_ref()
                .is_some_and(|r| r.disk() == DiskState::Failed);
            if !self.nodes[n].watchdog_method {
                // Rule 16 held the pair as it was while the settings
                // differed; the operator makes them the same.
                self.log(format!(
                    "operator: adds `watchdog` to fencing.methods on {} and restarts it",
                    self.nodes[n].name
                ));
                self.nodes[n].watchdog_method = true;
                self.crash(n);
            }
            if !self.nodes[n].up || self.nodes[n].watchdog_fires_us.is_some() || failed {
                // A self-fenced node reboots: the watchdog does it. A
                // failed disk is repaired by the operator, who restarts
                // hadb on it.
                self.crash(n);
                self.start(n);
            }
            self.nodes[n].manager.as_mut().unwrap().set_standby(false);
            self.nodes[n].service_failed = false;
        }
        let deadline = self.now_us + HEAL_US;
        while self.now_us < deadline {
            self.step(false)?;
            if let [p] = self.primaries()[..]
                && self.quiet()
                && self.nodes[p].replica.as_ref().unwrap().peer_up_to_date()
            {
                let s = 1 - p;
                if self.nodes[s].replica.as_ref().unwrap().disk() != DiskState::UpToDate {
                    continue;
                }
                let a = self.nodes[0].vol.disk.view();
                let b = self.nodes[1].vol.disk.view();
                if a != b {
                    return Err(format!(
                        "converged but the copies differ: {}",
                        simkit::differing_blocks(&a, &b)
                    ));
                }
                return self.oracle.check(
                    &self.nodes[p].vol.disk.view(),
                    self.nodes[p].name,
                    "after healing",
                );
            }
        }
        let state: Vec<String> = (0..2)
            .map(|n| {
                let node = &self.nodes[n];
                match (&node.replica, &node.manager) {
                    (Some(r), Some(m)) => format!(
                        "{}: {:?} {:?} {:?}, manager: {}",
                        node.name,
                        r.role(),
                        r.disk(),
                        r.link(),
                        m.reason()
                    ),
                    _ => format!("{}: down", node.name),
                }
            })
            .collect();
        Err(format!(
            "not whole {} s after the faults stopped: {}",
            HEAL_US / 1_000_000,
            state.join("; ")
        ))
    }
}

fn run_seed(seed: u64, verbose: bool) -> Result<(), (String, Vec<String>)> {
    let mut sim = Sim::new(seed, verbose);
    sim.establish()
        .and_then(|()| sim.run(3000))
        .map_err(|e| (e, sim.trace.clone()))
}

#[test]
fn simulated_cluster_keeps_every_promise() {
    simkit::run_seeds("sim_cluster", "", run_seed);
}

/// A story's node by name.
fn node_of(word: &str) -> Result<usize, String> {
    match word {
        "a" => Ok(0),
        "b" => Ok(1),
        other => Err(format!("no node `{other}` (a or b)")),
    }
}

fn duration_us(word: &str) -> Result<u64, String> {
    let bad = || format!("`{word}`: expected a duration like 300ms or 2.5s");
    if let Some(ms) = word.strip_suffix("ms") {
        ms.parse::<u64>().map(|v| v * 1000).map_err(|_| bad())
    } else if let Some(s) = word.strip_suffix('s') {
        s.parse::<f64>()
            .map(|v| (v * 1e6) as u64)
            .map_err(|_| bad())
    } else {
        Err(bad())
    }
}

impl Sim {
    fn run_for(&mut self, us: u64) -> Result<(), String> {
        let end = self.now_us + us;
        while self.now_us < end {
            self.scripted_tick()?;
        }
        Ok(())
    }

    /// `expect NODE WHAT`: true if it holds now.
    fn holds(&mut self, n: usize, what: &[&str]) -> Result<bool, String> {
        let node = &self.nodes[n];
        if what == ["down"] {
            return Ok(!node.up);
        }
        let (Some(r), Some(m), Some(hb)) = (&node.replica, &node.manager, &node.membership) else {
            return Ok(false);
        };
        Ok(match what {
            ["primary"] => r.role() == Role::Primary,
            ["secondary"] => r.role() == Role::Secondary,
            ["up"] => true,
            ["fence", "pending"] => matches!(m.fence(), Fence::Pending { .. }),
            ["fence", "none"] => m.fence() == Fence::None,
            ["fence", "confirmed"] => matches!(m.fence(), Fence::Confirmed { .. }),
            ["holds", "vote"] => self.vote(n) == Some(Vote::Mine),
            ["self-fenced"] => m.self_fenced(),
            ["says", words @ ..] => m.reason().contains(&words.join(" ")),
            ["peer", "lost"] => !hb.peer_alive(),
            ["peer", "alive"] => hb.peer_alive(),
            ["disk", d] => r.disk().to_string() == *d,
            ["frozen"] => r.frozen(),
            ["not", "frozen"] => !r.frozen(),
            ["saw", "no", "errors"] => self.app_errors == 0,
            ["flushed", "writes"] => {
                let view = node.vol.disk.view();
                self.oracle.check(&view, node.name, "story").is_ok()
            }
            other => return Err(format!("cannot check `{}`", other.join(" "))),
        })
    }

    /// Carries out one line of a story.
    fn story_line(&mut self, line: &str) -> Result<(), String> {
        let w: Vec<&str> = line.split_whitespace().collect();
        self.log(format!("STORY: {line}"));
        match &w[..] {
            ["run", d] => self.run_for(duration_us(d)?),
            ["crash", n] => {
                self.crash(node_of(n)?);
                Ok(())
            }
            ["start", n] => {
                self.start(node_of(n)?);
                Ok(())
            }
            [verb @ ("cut" | "heal"), "witness", n] => {
                let n = node_of(n)?;
                let w = self.witness.as_mut().ok_or("this story has no witness")?;
                w.cut[n] = *verb == "cut";
                Ok(())
            }
            [verb @ ("cut" | "heal"), ring, dir] => {
                let ring: usize = ring
                    .strip_prefix("ring")
                    .and_then(|r| r.parse().ok())
                    .filter(|r| *r < RINGS)
                    .ok_or(format!("`{ring}`: expected ring0 or ring1"))?;
                let from: &[usize] = match *dir {
                    "a->b" => &[0],
                    "b->a" => &[1],
                    "both" => &[0, 1],
                    other => return Err(format!("`{other}`: expected a->b, b->a or both")),
                };
                for f in from {
                    self.cut[ring][*f] = *verb == "cut";
                }
                Ok(())
            }
            [verb @ ("cut" | "heal"), "replication"] => {
                self.repl_cut = *verb == "cut";
                Ok(())
            }
            ["fail", "next", "flush", "on", n] => {
                let n = node_of(n)?;
                self.nodes[n].vol.failing_flushes += 1;
                Ok(())
            }
            ["fail", "next", "write", "on", n] => {
                let n = node_of(n)?;
                self.nodes[n].vol.failing_writes += 1;
                Ok(())
            }
            [verb @ ("stall" | "resume"), "disk", n] => {
                let n = node_of(n)?;
                self.nodes[n].vol.stalled = *verb == "stall";
                Ok(())
            }
            ["issue", count] => {
                // Writes handed to the primary and not waited for.
                let count: usize = count.parse().map_err(|_| format!("`{count}`: a number"))?;
                for _ in 0..count {
                    self.client();
                    self.scripted_tick()?;
                }
                Ok(())
            }
            ["standby", n, on @ ("on" | "off")] => {
                let n = node_of(n)?;
                self.nodes[n]
                    .manager
                    .as_mut()
                    .unwrap()
                    .set_standby(*on == "on");
                Ok(())
            }
            ["switchover"] => {
                let [p] = self.primaries()[..] else {
                    return Err("switchover: no single primary".into());
                };
                let v = self.inputs(p).volume;
                self.nodes[p].manager.as_mut().unwrap().switchover(&v)
            }
            ["confirm", "fence", "on", n] => {
                let n = node_of(n)?;
                let now = self.now_us;
                self.nodes[n].manager.as_mut().unwrap().fence_confirmed(now)
            }
            ["write", count] => {
                let count: usize = count.parse().map_err(|_| format!("`{count}`: a number"))?;
                for _ in 0..count {
                    self.client();
                    self.scripted_tick()?;
                }
                // And a flush that must complete: what the stories later
                // check as "flushed writes".
                let [p] = self.primaries()[..] else {
                    return Err("write: no single primary".into());
                };
                let id = self.next_id;
                self.next_id += 1;
                self.oracle.flush_issued(id);
                self.nodes[p].app.insert(id, None);
                let a = self.r(p).request(id, Request::Flush);
                self.apply(p, a);
                for _ in 0..10_000 {
                    self.scripted_tick()?;
                    if self.nodes[p].app.is_empty() {
                        return Ok(());
                    }
                }
                Err("write: the writes and their flush did not complete in 10 s".into())
            }
            ["expect", n, what @ ..] => {
                let n = node_of(n)?;
                if self.holds(n, what)? {
                    Ok(())
                } else {
                    Err(format!(
                        "expected {} {}",
                        self.nodes[n].name,
                        what.join(" ")
                    ))
                }
            }
            ["within", d, "whole"] => {
                let end = self.now_us + duration_us(d)?;
                while self.now_us < end {
                    if self.whole() {
                        let a = self.nodes[0].vol.disk.view();
                        return if a == self.nodes[1].vol.disk.view() {
                            Ok(())
                        } else {
                            Err("whole, but the copies differ".into())
                        };
                    }
                    self.scripted_tick()?;
                }
                Err(format!(
                    "not one primary plus an up-to-date secondary within {d}"
                ))
            }
            ["within", d, n, what @ ..] => {
                let n = node_of(n)?;
                let end = self.now_us + duration_us(d)?;
                while self.now_us < end {
                    if self.holds(n, what)? {
                        return Ok(());
                    }
                    self.scripted_tick()?;
                }
                Err(format!(
                    "{} not {} within {d}",
                    self.nodes[n].name,
                    what.join(" ")
                ))
            }
            _ => Err(format!("cannot read `{line}`")),
        }
    }
}

/// The stories in tests/scenarios/: each reads as what happens to the
/// pair, line by line; a line that does not hold fails with the story's
/// trace.
#[test]
fn scenario_stories() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 4,
        "the stories are missing from {}",
        dir.display()
    );
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        // A story's first lines may say `with witness` (seed 2 has one),
        // `mode semisync` (the default is sync) and `without watchdog
        // method on NODE`.
        let header: Vec<&str> = text
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .filter(|l| !l.is_empty())
            .take_while(|l| {
                *l == "with witness"
                    || l.starts_with("mode ")
                    || l.starts_with("without watchdog method on ")
                    || *l == "settings not compared"
            })
            .collect();
        let with_witness = header.contains(&"with witness");
        let mode = match header.iter().find_map(|l| l.strip_prefix("mode ")) {
            None | Some("sync") => Mode::Sync,
            Some("semisync") => Mode::Semisync,
            Some(other) => panic!("{}: no mode `{other}` (sync or semisync)", file.display()),
        };
        let seed = if with_witness { 2 } else { 1 };
        let verbose = std::env::var_os("HADB_SIM_VERBOSE").is_some();
        let lacking = header
            .iter()
            .find_map(|l| l.strip_prefix("without watchdog method on "))
            .map(|n| node_of(n).unwrap_or_else(|e| panic!("{}: {e}", file.display())));
        let mut sim = Sim::with_settings(seed, verbose, mode, lacking);
        sim.compare_settings = !header.contains(&"settings not compared");
        sim.establish().unwrap();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() || header.contains(&line) {
                continue;
            }
            if let Err(e) = sim.story_line(line) {
                let tail = sim.trace[sim.trace.len().saturating_sub(60)..].join("\n");
                panic!(
                    "{}:{}: `{line}`: {e}\n--- last steps:\n{tail}",
                    file.display(),
                    i + 1
                );
            }
        }
    }
}
