//! `hadb run` with `role = "witness"`: no volume, no mysqld; one UDP
//! socket, a heartbeat with each node of the pair, and the pure
//! [`Witness`] deciding which of them holds its vote. The control socket
//! answers `status` (and `log`), so `hadb status` works here too.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use smol::net::UdpSocket;
use smol::stream::StreamExt;

use crate::config::Config;
use crate::core::heartbeat::{FLAG_WITNESS, Membership, NodeReport};
use crate::core::quorum::{VoterView, Witness, WitnessConfig};
use crate::run::control::{self, Handler, Request};
use crate::run::manager::lock;

/// The witness's disk code in its heartbeats: it has none.
const NO_DISK: u8 = 255;
/// Vote changes kept for status.
const HISTORY: usize = 20;

#[derive(Debug)]
pub enum Error {
    Key(crate::run::peer::KeyError),
    Incarnation(crate::run::incarnation::Error),
    Bind(SocketAddr, std::io::Error),
    Signals(std::io::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Key(e) => write!(f, "witness: {e}"),
            Error::Incarnation(e) => write!(f, "witness: {e}"),
            Error::Bind(a, e) => write!(
                f,
                "witness: cannot bind the heartbeat socket {a}: {e}; [witness] address must be an address of this machine"
            ),
            Error::Signals(e) => write!(f, "witness: cannot catch signals: {e}"),
        }
    }
}

impl std::error::Error for Error {}

struct Voter {
    name: String,
    addr: SocketAddr,
    membership: Mutex<Membership>,
}

struct State {
    config: Config,
    started: Instant,
    voters: [Voter; 2],
    witness: Mutex<Witness>,
    history: Mutex<std::collections::VecDeque<(u64, String)>>,
}

impl State {
    fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    fn views(&self) -> [VoterView; 2] {
        let view = |v: &Voter| VoterView::of(&lock(&v.membership));
        [view(&self.voters[0]), view(&self.voters[1])]
    }

    fn status(&self) -> serde_json::Value {
        let now = self.now_us();
        let vote = lock(&self.witness).vote();
        let views = self.views();
        let nodes: Vec<serde_json::Value> = self
            .voters
            .iter()
            .zip(views)
            .enumerate()
            .map(|(i, (v, view))| {
                let m = lock(&v.membership);
                json!({
                    "node": v.name,
                    "address": v.addr.to_string(),
                    "heard": view.heard,
                    "silent_ms": m.last_heard_us().map(|t| now.saturating_sub(t) / 1000),
                    "asks_for_vote": view.asks,
                    "role": if view.primary { "primary" } else { "secondary" },
                    "up_to_date": view.up_to_date,
                    "holds_vote": vote.is_some_and(|(n, _)| n == i),
                    "counters": m.links(now).first().map(|l| l.counters),
                })
            })
            .collect();
        let history: Vec<serde_json::Value> = lock(&self.history)
            .iter()
            .map(
                |(at, why)| json!({"seconds_ago": now.saturating_sub(*at) / 1_000_000, "why": why}),
            )
            .collect();
        json!({
            "role": "witness",
            "cluster": self.config.cluster,
            "node": self.config.node,
            "pid": std::process::id(),
            "vote": vote.map(|(n, _)| self.voters[n].name.clone()),
            "nodes": nodes,
            "history": history,
        })
    }
}

struct Control(Arc<State>);

impl Handler for Control {
    async fn handle(&self, request: Request) -> Result<serde_json::Value, String> {
        match request.command.as_str() {
            "status" => Ok(self.0.status()),
            "log" => Ok(json!({"history": self.0.status()["history"]})),
            other => Err(format!(
                "`{other}`: this is the witness; it only votes (known here: status, log); run it on a node of the pair"
            )),
        }
    }
}

pub fn run(config: Config) -> Result<(), Error> {
    crate::run::process::become_subreaper();
    let key = crate::run::peer::read_key(&config.key_file).map_err(Error::Key)?;
    let Some(w) = config.witness.clone() else {
        // validate() refuses a witness without [witness].
        return Ok(());
    };
    let me = SocketAddr::new(w.address, w.port.unwrap_or(config.heartbeat.port));
    let timeout_us = config.heartbeat.timeout.0.as_micros() as u64;
    // The nodes drop a witness whose incarnation went back, as they drop
    // each other. Parity 0: no vote ever names the witness's number.
    let incarnation =
        crate::run::incarnation::take(&config.state_dir, 0).map_err(Error::Incarnation)?;
    // Name order: node 0 is the first name, as everywhere in hadb.
    let mut names = config.nodes.iter();
    let mut voter = || {
        let (name, n) = names.next().expect("validated config has two nodes");
        Voter {
            name: name.clone(),
            addr: SocketAddr::new(n.address, n.heartbeat_port.unwrap_or(config.heartbeat.port)),
            membership: Mutex::new(Membership::new(
                &config.cluster,
                &config.node,
                name,
                &key,
                1,
                timeout_us,
                incarnation,
            )),
        }
    };
    let voters = [voter(), voter()];
    let state = Arc::new(State {
        witness: Mutex::new(Witness::new(WitnessConfig::from_timeout(timeout_us))),
        started: Instant::now(),
        voters,
        history: Mutex::new(Default::default()),
        config: config.clone(),
    });
    let mut signals =
        async_signal::Signals::new([async_signal::Signal::Term, async_signal::Signal::Int])
            .map_err(Error::Signals)?;
    crate::run::block_on(0, async move {
        let socket = match UdpSocket::bind(me).await {
            Ok(s) => Arc::new(s),
            Err(e) => return Err(Error::Bind(me, e)),
        };
        log::info!(
            "hadb {} running as the witness {} of cluster {} on {me}, voting between {} and {}",
            env!("CARGO_PKG_VERSION"),
            config.node,
            config.cluster,
            state.voters[0].name,
            state.voters[1].name
        );
        let _receiver = {
            let (state, socket) = (state.clone(), socket.clone());
            crate::run::spawn(async move {
                let mut buf = vec![0u8; 2048];
                loop {
                    let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                        smol::Timer::after(Duration::from_millis(10)).await;
                        continue;
                    };
                    let now = state.now_us();
                    let Some(v) = state.voters.iter().find(|v| v.addr == from) else {
                        log::debug!("witness: a datagram from {from}, not a node of the pair");
                        continue;
                    };
                    match lock(&v.membership).receive(0, &buf[..n], now) {
                        Ok(events) => {
                            for e in events {
                                if let crate::core::heartbeat::Event::PeerFound { .. } = e {
                                    log::info!("witness: {} heard", v.name);
                                }
                            }
                        }
                        Err(why) => log::debug!("witness: refused a datagram from {from}: {why:?}"),
                    }
                }
            })
        };
        let _control = {
            let state = state.clone();
            let path = config.control.socket.clone();
            crate::run::spawn(async move {
                let refused: control::OnRefused = Arc::new(|| {});
                if let Err(e) = control::listen(&path, Arc::new(Control(state)), refused).await {
                    log::error!("control: cannot listen on {}: {e}", path.display());
                }
            })
        };
        let _sender = {
            let (state, socket) = (state.clone(), socket.clone());
            let interval = config.heartbeat.interval.0;
            crate::run::spawn(async move {
                loop {
                    let now = state.now_us();
                    for v in &state.voters {
                        for e in lock(&v.membership).tick(now) {
                            if e == crate::core::heartbeat::Event::PeerLost {
                                log::warn!("witness: {} lost", v.name);
                            }
                        }
                    }
                    let views = state.views();
                    let changes = lock(&state.witness).step(now, &views);
                    for c in changes {
                        let c = c
                            .replace("node 0", &state.voters[0].name)
                            .replace("node 1", &state.voters[1].name);
                        log::warn!("witness: {c}");
                        let mut h = lock(&state.history);
                        if h.len() == HISTORY {
                            h.pop_front();
                        }
                        h.push_back((now, c));
                    }
                    let vote = lock(&state.witness).vote().map_or(0, |(_, inc)| inc);
                    let report = NodeReport {
                        disk: NO_DISK,
                        flags: FLAG_WITNESS,
                        vote,
                        ..NodeReport::default()
                    };
                    for v in &state.voters {
                        let pkt = lock(&v.membership).outgoing(0, report, now);
                        let _ = socket.send_to(&pkt, v.addr).await;
                    }
                    smol::Timer::after(interval).await;
                }
            })
        };
        signals.next().await;
        log::info!("witness: stopping");
        let _ = std::fs::remove_file(&config.control.socket);
        Ok(())
    })
}
