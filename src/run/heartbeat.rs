//! The heartbeat's driver: one UDP socket per link, a packet to the peer
//! on every link each interval, and every datagram that arrives handed to
//! the pure [`Membership`].

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use smol::net::UdpSocket;

use crate::config::Config;
use crate::core::heartbeat::{Event, FLAG_WANTS_VOTE, Membership, NodeReport};
use crate::core::quorum::Vote;

/// What the rest of the daemon reads: the membership, and the clock its
/// times are on.
pub struct Heartbeat {
    pub membership: Mutex<Membership>,
    started: Instant,
    /// (this node's address, the peer's address) per link.
    pub links: Vec<(SocketAddr, SocketAddr)>,
    /// The witness, if there is one: what is heard of it, its name and
    /// address (reached from ring0's socket).
    pub witness: Option<(Mutex<Membership>, String, SocketAddr)>,
}

impl Heartbeat {
    pub fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// The witness's vote as this node sees it; None: no witness.
    pub fn vote(&self) -> Option<Vote> {
        let (m, _, _) = self.witness.as_ref()?;
        let m = lock(m);
        let vote = m.peer_report().map_or(0, |r| r.vote);
        Some(Vote::of(m.peer_alive(), vote, m.incarnation()))
    }

    pub fn status(&self) -> serde_json::Value {
        let now = self.now_us();
        let m = lock(&self.membership);
        let links: Vec<serde_json::Value> = m
            .links(now)
            .iter()
            .zip(&self.links)
            .enumerate()
            .map(|(i, (v, (mine, peer)))| {
                json!({
                    "ring": i,
                    "local": mine.to_string(),
                    "peer": peer.to_string(),
                    "up": v.up,
                    "silent_ms": v.silent_us.map(|us| us / 1000),
                    "rtt_us": v.rtt_us,
                    "longest_gap_ms": v.longest_gap_us / 1000,
                    "counters": v.counters,
                })
            })
            .collect();
        let witness = self.witness.as_ref().map(|(w, name, addr)| {
            let w = lock(w);
            json!({
                "node": name,
                "address": addr.to_string(),
                "heard": w.peer_alive(),
                "silent_ms": w.last_heard_us().map(|t| now.saturating_sub(t) / 1000),
                "vote": Vote::of(w.peer_alive(), w.peer_report().map_or(0, |r| r.vote), w.incarnation()),
            })
        });
        json!({
            "witness": witness,
            "peer_alive": m.peer_alive(),
            "peer_hears_me": m.peer_hears_me(),
            "peer_report": m.peer_report(),
            "incarnation": m.incarnation(),
            "peer_incarnation": m.peer_incarnation(),
            "links": links,
        })
    }
}

/// A poisoned lock means a panic elsewhere already ended the daemon's
/// usefulness; the data is still the best there is.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Each node's address on each link, ring0 first.
fn addresses(config: &Config) -> Vec<(SocketAddr, SocketAddr)> {
    let me = config.me();
    let (_, peer) = config.peer();
    let port = |n: &crate::config::NodeConfig| n.heartbeat_port.unwrap_or(config.heartbeat.port);
    let ring = |n: &crate::config::NodeConfig| -> Vec<IpAddr> {
        std::iter::once(n.address)
            .chain(n.links.iter().copied())
            .collect()
    };
    ring(me)
        .into_iter()
        .zip(ring(peer))
        .map(|(a, b)| (SocketAddr::new(a, port(me)), SocketAddr::new(b, port(peer))))
        .collect()
}

/// `incarnation`: this run's, from [`crate::run::incarnation::take`]
/// (higher than any earlier run's, whatever the clock did).
pub fn new(config: &Config, key: &[u8], incarnation: u64) -> Arc<Heartbeat> {
    let links = addresses(config);
    let (peer, _) = config.peer();
    let timeout_us = config.heartbeat.timeout.0.as_micros() as u64;
    let witness = config.witness.as_ref().map(|w| {
        (
            Mutex::new(Membership::new(
                &config.cluster,
                &config.node,
                &w.node,
                key,
                1,
                timeout_us,
                incarnation,
            )),
            w.node.clone(),
            SocketAddr::new(w.address, w.port.unwrap_or(config.heartbeat.port)),
        )
    });
    Arc::new(Heartbeat {
        membership: Mutex::new(Membership::new(
            &config.cluster,
            &config.node,
            peer,
            key,
            links.len(),
            timeout_us,
            incarnation,
        )),
        started: Instant::now(),
        links,
        witness,
    })
}

fn log_events(events: &[Event], hb: &Heartbeat) {
    for e in events {
        match e {
            Event::LinkUp(i) => log::info!(
                "heartbeat: ring{i} up ({} <-> {})",
                hb.links[*i].0,
                hb.links[*i].1
            ),
            Event::LinkDown(i) => log::warn!(
                "heartbeat: ring{i} down: nothing heard from {} for the timeout",
                hb.links[*i].1
            ),
            Event::PeerFound { restarted: true } => {
                log::info!("heartbeat: peer heard again, restarted since (new incarnation)")
            }
            Event::PeerFound { restarted: false } => log::info!("heartbeat: peer heard"),
            Event::PeerLost => log::warn!("heartbeat: PEER LOST: silent on every link"),
        }
    }
}

fn log_witness_events(events: &[Event], name: &str) {
    for e in events {
        match e {
            Event::PeerFound { .. } => log::info!("heartbeat: witness {name} heard"),
            Event::PeerLost => log::warn!("heartbeat: witness {name} lost"),
            Event::LinkUp(_) | Event::LinkDown(_) => {}
        }
    }
}

/// Binds every link and runs until the daemon stops; `report` says what
/// this node is now.
pub async fn run(
    hb: Arc<Heartbeat>,
    interval: Duration,
    report: impl Fn() -> NodeReport,
) -> std::io::Result<()> {
    let mut sockets = Vec::new();
    for (mine, _) in &hb.links {
        let s = UdpSocket::bind(mine)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("binding heartbeat {mine}: {e}")))?;
        sockets.push(Arc::new(s));
    }
    let mut receivers = Vec::new();
    for (i, s) in sockets.iter().enumerate() {
        let (hb, s) = (hb.clone(), s.clone());
        receivers.push(crate::run::spawn(async move {
            let mut buf = vec![0u8; 2048];
            loop {
                let Ok((n, from)) = s.recv_from(&mut buf).await else {
                    smol::Timer::after(Duration::from_millis(10)).await;
                    continue;
                };
                let now = hb.now_us();
                if let Some((w, name, addr)) = &hb.witness
                    && i == 0
                    && from == *addr
                {
                    match lock(w).receive(0, &buf[..n], now) {
                        Ok(events) => log_witness_events(&events, name),
                        Err(why) => log::debug!(
                            "heartbeat: refused a datagram from the witness {from}: {why:?}"
                        ),
                    }
                    continue;
                }
                let result = {
                    let mut m = lock(&hb.membership);
                    if from.ip() == hb.links[i].1.ip() {
                        m.receive(i, &buf[..n], now)
                    } else {
                        m.refuse_foreign(i);
                        Err(crate::core::heartbeat::Reject::Foreign)
                    }
                };
                match result {
                    Ok(events) => log_events(&events, &hb),
                    Err(why) => {
                        log::debug!("heartbeat: ring{i}: refused a datagram from {from}: {why:?}")
                    }
                }
            }
        }));
    }
    loop {
        let report = report();
        for (i, s) in sockets.iter().enumerate() {
            let now = hb.now_us();
            let pkt = lock(&hb.membership).outgoing(i, report, now);
            // A send error (the link's interface is down) is the same as a
            // lost packet: the peer's timeout tells.
            let _ = s.send_to(&pkt, hb.links[i].1).await;
        }
        if let Some((w, name, addr)) = &hb.witness {
            // Lost the peer: ask the witness for its vote.
            let mut to_witness = report;
            if !lock(&hb.membership).peer_alive() {
                to_witness.flags |= FLAG_WANTS_VOTE;
            }
            let now = hb.now_us();
            let pkt = lock(w).outgoing(0, to_witness, now);
            let _ = sockets[0].send_to(&pkt, addr).await;
            let events = lock(w).tick(now);
            log_witness_events(&events, name);
        }
        let now = hb.now_us();
        let events = lock(&hb.membership).tick(now);
        log_events(&events, &hb);
        smol::Timer::after(interval).await;
    }
}
