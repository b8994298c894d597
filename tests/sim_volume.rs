//! Deterministic simulation of the volume protocol: two real `Replica` state
//! machines, a simulated network (FIFO per direction, random delays, links
//! that drop and come back), simulated disks whose volatile cache loses any
//! subset of unflushed writes on a crash, crashes and clean stops and
//! restarts at any step, the on-disk bitmap and activity log written in
//! disk order (small extents, so the log evicts all the time),
//! and an operator who promotes only what hadb's rules allow. Even seeds
//! run `sync`, odd seeds `semisync` with a short ack timeout and simulated
//! time, so the outdate-then-go-alone path runs in every odd seed.
//!
//! Checked after every promotion: every write acknowledged after a flush is
//! on the new primary (promise 1). Checked after the faults stop: the pair
//! converges to identical copies with an up-to-date secondary (promise 3).
//! Checked at every step: never two primaries (promise 2).
//!
//! `HADB_SIM_SEEDS=N` runs N seeds (default 30000, about 20 s) from
//! `HADB_SIM_FIRST` (default 0);
//! `HADB_SIM_SEED=S` replays one seed and prints its trace, and
//! `HADB_SIM_WATCH=BLOCK` adds every write of that block to it.
//!
//! The oracle: a write is guaranteed once a flush issued after its
//! acknowledgement completes (or at once for FUA), unless the node that
//! acknowledged it crashed before that flush: an unflushed write may die
//! with its node's cache, and a flush after the restart cannot revive it.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// The step table reads best as one arm per event with its own guard.
#![allow(clippy::collapsible_if, clippy::collapsible_match)]

mod simkit;

use std::collections::{HashMap, VecDeque};

use simkit::{BLOCK, DATA, Op, Oracle, Rng, SimVolume, Step, block_tag};

use hadb::config::Mode;
use hadb::core::replica::{Action, DiskOp, DiskState, DiskTag, Frame, Replica, Role};

/// Short, so semisync's timeout fires often in a run.
const ACK_TIMEOUT_US: u64 = 200_000;

struct Node {
    name: &'static str,
    replica: Option<Replica>,
    vol: SimVolume,
    /// Application requests waiting on this node: id -> write (None: flush).
    app: HashMap<u64, Option<(usize, u64)>>,
}

struct Sim {
    rng: Rng,
    nodes: [Node; 2],
    link_up: bool,
    wire: [VecDeque<Frame>; 2],
    oracle: Oracle,
    next_id: u64,
    /// The operator's knowledge: this node's copy is older than the other's
    /// (the other went alone while it was away), until a resync completes.
    outdated: [bool; 2],
    trace: Vec<String>,
    /// Even seeds run `sync`, odd ones `semisync`.
    mode: Mode,
    /// Simulated time, µs.
    now_us: u64,
    verbose: bool,
    last_state: [String; 2],
}

impl Sim {
    fn new(seed: u64, verbose: bool) -> Sim {
        let node = |name| Node {
            name,
            replica: None,
            vol: SimVolume::new(DATA),
            app: HashMap::new(),
        };
        let mut sim = Sim {
            rng: Rng::new(seed),
            nodes: [node("a"), node("b")],
            link_up: false,
            wire: [VecDeque::new(), VecDeque::new()],
            oracle: Oracle::default(),
            next_id: 1,
            outdated: [false, false],
            trace: Vec::new(),
            verbose,
            mode: if seed.is_multiple_of(2) {
                Mode::Sync
            } else {
                Mode::Semisync
            },
            now_us: 0,
            last_state: Default::default(),
        };
        sim.start(0);
        sim.start(1);
        sim
    }

    fn log(&mut self, s: String) {
        if self.verbose {
            eprintln!("{s}");
        }
        self.trace.push(s);
        if self.trace.len() > 400 {
            self.trace.drain(..100);
        }
    }

    fn start(&mut self, n: usize) {
        let seed = self.rng.next();
        let (mode, node) = (self.mode, &mut self.nodes[n]);
        let m = node.vol.meta;
        let peer = if n == 0 { "b" } else { "a" };
        let setup = node.vol.setup(mode, node.name, peer, seed, ACK_TIMEOUT_US);
        let unclean = setup.unclean;
        node.replica = Some(Replica::new(setup));
        self.log(format!(
            "start {} meta {:?} unclean {unclean} log {:?}",
            self.nodes[n].name, m, self.nodes[n].vol.activity_log
        ));
        let a = self.r(n).started();
        self.apply(n, a);
    }

    fn alive(&self, n: usize) -> bool {
        self.nodes[n].replica.is_some()
    }

    fn r(&mut self, n: usize) -> &mut Replica {
        self.nodes[n].replica.as_mut().unwrap()
    }

    fn primary(&self) -> Option<usize> {
        (0..2).find(|&n| {
            self.nodes[n]
                .replica
                .as_ref()
                .is_some_and(|r| r.role() == Role::Primary)
        })
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
                Action::Send(f) => {
                    if self.link_up {
                        self.wire[n].push_back(f);
                    }
                }
                Action::Complete { id, result } => self.complete(n, id, result),
                Action::DropLink(why) => {
                    self.log(format!("{} drops link: {why}", self.nodes[n].name));
                    self.drop_link();
                }
                Action::Log { message, .. } => {
                    self.log(format!("  {}: {message}", self.nodes[n].name))
                }
                _ => {}
            }
        }
    }

    fn complete(&mut self, n: usize, id: u64, result: Result<(), u32>) {
        let Some(op) = self.nodes[n].app.remove(&id) else {
            return;
        };
        if result.is_err() {
            return;
        }
        match op {
            Some((block, _)) => {
                if self.verbose {
                    let name = self.nodes[n].name;
                    self.log(format!(
                        "    write {id} (block {block}) completed on {name}"
                    ));
                }
                self.oracle.write_completed(id, n)
            }
            None => {
                if self.verbose {
                    let name = self.nodes[n].name;
                    self.log(format!("    flush {id} completed on {name}"));
                }
                self.oracle.flush_completed(id);
            }
        }
    }

    fn drop_link(&mut self) {
        if !self.link_up {
            return;
        }
        self.link_up = false;
        self.wire = [VecDeque::new(), VecDeque::new()];
        for node in &mut self.nodes {
            node.vol.link_lost();
        }
        for n in 0..2 {
            if self.alive(n) {
                let a = self.r(n).link_lost();
                self.apply(n, a);
            }
        }
    }

    fn connect(&mut self) {
        if self.link_up || !self.alive(0) || !self.alive(1) {
            return;
        }
        self.link_up = true;
        self.log("link up".into());
        let first = self.rng.below(2) as usize;
        for n in [first, 1 - first] {
            let a = self.r(n).link_up();
            self.apply(n, a);
        }
    }

    fn crash(&mut self, n: usize) {
        if !self.alive(n) {
            return;
        }
        self.log(format!("CRASH {}", self.nodes[n].name));
        self.drop_link();
        let node = &mut self.nodes[n];
        node.replica = None;
        node.app.clear();
        node.vol.crash(&mut self.rng);
        self.oracle.crashed(n);
    }

    /// A clean stop, as the driver does it: the link goes, the disk queue
    /// drains, then the bitmap and log are written.
    fn stop(&mut self, n: usize) {
        if !self.alive(n) {
            return;
        }
        self.log(format!("STOP {}", self.nodes[n].name));
        self.drop_link();
        while !self.nodes[n].vol.queue.is_empty() {
            self.disk_step(n);
        }
        let (a, clean) = self.r(n).stop();
        self.apply(n, a);
        while !self.nodes[n].vol.queue.is_empty() {
            self.disk_step(n);
        }
        let node = &mut self.nodes[n];
        node.replica = None;
        node.vol.active = !clean;
        // Requests still open get an error; what completed was flushed by
        // the log transaction.
        node.app.clear();
    }

    fn disk_step(&mut self, n: usize) {
        if self.verbose
            && let Some(Op::Io(tag, DiskOp::Write { offset, data, .. })) =
                self.nodes[n].vol.queue.front()
        {
            let (tag, first, data) = (*tag, *offset as usize / BLOCK, data.clone());
            for (i, chunk) in data.chunks(BLOCK).enumerate() {
                self.trace_write(n, first + i, chunk, tag);
            }
        }
        match self.nodes[n].vol.step() {
            Step::Idle => {}
            Step::Meta(released) => self.apply(n, released),
            Step::Done(tag, result) => {
                let a = self.r(n).disk_done(tag, result);
                self.apply(n, a);
            }
        }
    }

    /// With HADB_SIM_WATCH=BLOCK, a replay logs every write of that block.
    fn trace_write(&mut self, n: usize, block: usize, data: &[u8], tag: DiskTag) {
        let watched = std::env::var("HADB_SIM_WATCH")
            .ok()
            .and_then(|w| w.parse::<usize>().ok());
        if watched == Some(block) {
            let value = block_tag(data);
            self.log(format!(
                "    {} writes block {block} = {value:?} ({tag:?})",
                self.nodes[n].name
            ));
        }
    }

    fn deliver(&mut self, from: usize) {
        let Some(f) = self.wire[from].pop_front() else {
            return;
        };
        let to = 1 - from;
        let a = self.r(to).frame(f.header, f.payload);
        self.apply(to, a);
    }

    fn client(&mut self) {
        let Some(p) = self.primary() else { return };
        if self.nodes[p].app.len() >= 8 {
            return;
        }
        let (id, req, block) =
            simkit::next_request(&mut self.rng, &mut self.oracle, &mut self.next_id);
        self.nodes[p].app.insert(id, block.map(|b| (b, id)));
        let a = self.r(p).request(id, req);
        self.apply(p, a);
    }

    /// Promise 1: on `n`'s copy every block holds its newest guaranteed
    /// write or a write issued after it.
    fn check_durable(&self, n: usize, when: &str) -> Result<(), String> {
        self.oracle
            .check(&self.nodes[n].vol.disk.view(), self.nodes[n].name, when)
    }

    fn try_promote(&mut self, n: usize) -> Result<(), String> {
        if !self.alive(n) || self.outdated[n] || self.primary().is_some() {
            return Ok(());
        }
        let other_alive = self.alive(1 - n);
        // Without fencing the operator promotes only when the other node is
        // known down, or both are connected (the role request decides).
        if other_alive && !self.link_up {
            return Ok(());
        }
        let fresh =
            self.nodes[0].vol.meta.current_gen == 0 && self.nodes[1].vol.meta.current_gen == 0;
        let disk = self.r(n).disk();
        if disk != DiskState::UpToDate && !fresh {
            return Ok(());
        }
        match self.r(n).promote(false) {
            Ok(a) => {
                self.log(format!("promote {}", self.nodes[n].name));
                self.apply(n, a);
                if self.primary() == Some(n) {
                    self.check_durable(n, "after promotion")?;
                }
            }
            Err(e) => self.log(format!("promote {} refused: {e}", self.nodes[n].name)),
        }
        Ok(())
    }

    fn go_alone(&mut self) {
        let Some(p) = self.primary() else { return };
        if self.alive(1 - p) || !self.r(p).frozen() {
            return;
        }
        self.log(format!("go-alone on {}", self.nodes[p].name));
        self.outdated[1 - p] = true;
        // Refused (nothing done) where the peer is still taking writes.
        let a = self.r(p).go_alone().unwrap_or_default();
        self.apply(p, a);
    }

    fn check_one_primary(&self) -> Result<(), String> {
        let n = (0..2)
            .filter(|&n| {
                self.nodes[n]
                    .replica
                    .as_ref()
                    .is_some_and(|r| r.role() == Role::Primary)
            })
            .count();
        if n > 1 {
            Err("two primaries".into())
        } else {
            Ok(())
        }
    }

    fn step(&mut self, faults: bool) -> Result<(), String> {
        // Time passes; now and then a node's timers run.
        self.now_us += self.rng.below(20_000);
        for n in 0..2 {
            let now = self.now_us;
            if let Some(r) = self.nodes[n].replica.as_mut() {
                r.set_now(now);
            }
        }
        if self.rng.chance(100) {
            let n = self.rng.below(2) as usize;
            if self.alive(n) {
                let a = self.r(n).tick();
                self.apply(n, a);
            }
        }
        let x = self.rng.below(1000);
        match x {
            0..=249 => {
                let from = self.rng.below(2) as usize;
                self.deliver(from);
            }
            250..=549 => {
                let n = self.rng.below(2) as usize;
                if self.alive(n) {
                    self.disk_step(n);
                }
            }
            // Once faults stop, so does the client, so the pair can settle.
            550..=799 if faults => self.client(),
            800..=849 => self.connect(),
            850..=879 => {
                let n = self.rng.below(2) as usize;
                self.try_promote(n)?;
            }
            880..=889 => self.go_alone(),
            890..=899 => {
                if let Some(p) = self.primary()
                    && self.r(p).pending() == 0
                    && self.rng.chance(300)
                {
                    if let Ok(a) = self.r(p).demote() {
                        self.log(format!("demote {}", self.nodes[p].name));
                        self.apply(p, a);
                    }
                }
            }
            900..=929 if faults => {
                let n = self.rng.below(2) as usize;
                if !self.alive(n) {
                    self.start(n);
                }
            }
            930..=939 if faults => {
                if self.rng.chance(300) {
                    self.log("link down".into());
                    self.drop_link();
                }
            }
            940..=944 if faults => {
                let n = self.rng.below(2) as usize;
                if self.rng.chance(300) {
                    self.crash(n);
                }
            }
            945..=947 if faults => {
                let n = self.rng.below(2) as usize;
                if self.rng.chance(300) {
                    self.stop(n);
                }
            }
            _ => {}
        }
        if self.verbose {
            for n in 0..2 {
                if let Some(r) = self.nodes[n].replica.as_ref() {
                    let st = format!("{:?}/{:?}/{:?}", r.role(), r.disk(), r.link());
                    if self.last_state[n] != st {
                        self.log(format!("  [{} is {st}]", self.nodes[n].name));
                        self.last_state[n] = st;
                    }
                }
            }
        }
        // The operator clears "outdated" once the primary sees its peer caught up.
        if let Some(p) = self.primary()
            && self.r(p).peer_up_to_date()
        {
            self.outdated[1 - p] = false;
        }
        self.check_one_primary()
    }

    fn quiet(&self) -> bool {
        self.wire.iter().all(|w| w.is_empty()) && self.nodes.iter().all(|n| n.vol.queue.is_empty())
    }

    fn run(&mut self, steps: usize) -> Result<(), String> {
        for _ in 0..steps {
            self.step(true)?;
        }
        // Faults stop: everything comes back.
        self.log("--- heal".into());
        for n in 0..2 {
            if !self.alive(n) {
                self.start(n);
            }
        }
        for _ in 0..20_000 {
            if !self.link_up {
                self.connect();
            }
            self.step(false)?;
            if self.primary().is_none() {
                let n = self.rng.below(2) as usize;
                self.try_promote(n)?;
            }
            if let Some(p) = self.primary()
                && self.quiet()
                && self.nodes[p].app.is_empty()
                && self.r(p).peer_up_to_date()
            {
                let a = self.nodes[0].vol.disk.view();
                let b = self.nodes[1].vol.disk.view();
                if a != b {
                    return Err(format!(
                        "converged but the copies differ: {}",
                        simkit::differing_blocks(&a, &b)
                    ));
                }
                let s = 1 - p;
                if self.r(s).disk() != DiskState::UpToDate {
                    return Err(format!("secondary is {:?} after healing", self.r(s).disk()));
                }
                return self.check_durable(p, "after healing");
            }
        }
        Err(format!(
            "did not converge: wire {:?} diskq {:?} pending/held {:?}; primary {:?}, link {}, quiet {}, app pending {:?}, peer up to date {:?}, disks {:?}",
            self.wire
                .iter()
                .map(|w| w.iter().map(|f| f.header.kind.name()).collect::<Vec<_>>())
                .collect::<Vec<_>>(),
            self.nodes
                .iter()
                .map(|n| n.vol.queue.len())
                .collect::<Vec<_>>(),
            self.nodes
                .iter()
                .map(|n| n.replica.as_ref().map(|r| (r.pending(), r.held())))
                .collect::<Vec<_>>(),
            self.primary().map(|p| self.nodes[p].name),
            self.link_up,
            self.quiet(),
            (0..2).map(|n| self.nodes[n].app.len()).collect::<Vec<_>>(),
            self.primary()
                .map(|p| self.nodes[p].replica.as_ref().unwrap().peer_up_to_date()),
            (0..2)
                .map(|n| self.nodes[n]
                    .replica
                    .as_ref()
                    .map(|r| (r.role(), r.disk(), r.link())))
                .collect::<Vec<_>>()
        ))
    }
}

fn run_seed(seed: u64, verbose: bool) -> Result<(), (String, Vec<String>)> {
    let mut sim = Sim::new(seed, verbose);
    sim.run(3000).map_err(|e| (e, sim.trace.clone()))
}

#[test]
fn simulated_pair_keeps_every_promise() {
    simkit::run_seeds("sim_volume", "HADB_SIM_WATCH=BLOCK ", run_seed);
}
