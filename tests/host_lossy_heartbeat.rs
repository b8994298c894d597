//! The default heartbeat (interval 200 ms, timeout 1 s) on a bad network:
//! 1% of the datagrams lost and every one delayed by 200 ± 200 ms (netem's
//! `delay 200ms 200ms`, uniform), so they also arrive out of order. This host kernel has no netem, so a small
//! UDP relay between the two daemons does the damage. The pair must not
//! flap: no ring down, no peer lost, for the whole run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Pair, free_port};

const SIZE: u64 = 16 << 20;
/// Long enough for about 500 datagrams each way.
const RUN: Duration = Duration::from_secs(50);

#[derive(Default)]
struct RelayStats {
    forwarded: AtomicU64,
    dropped: AtomicU64,
    /// Datagrams sent after one that arrived later than them.
    reordered: AtomicU64,
}

/// Relays datagrams arriving on `listen` to `to`: drops every 100th (1%),
/// holds each other one for a pseudo-random 0..400 ms.
fn relay(listen: u16, to: u16, stop: Arc<AtomicBool>, stats: Arc<RelayStats>) {
    let sock = UdpSocket::bind(("127.0.0.1", listen)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let out = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
    let to: SocketAddr = ([127, 0, 0, 1], to).into();
    std::thread::spawn(move || {
        let mut n: u64 = 0;
        let mut rng: u64 = u64::from(listen).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut last_due = Instant::now();
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            let Ok(len) = sock.recv(&mut buf) else {
                continue;
            };
            n += 1;
            if n.is_multiple_of(100) {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let due = Instant::now() + Duration::from_millis(rng % 400);
            if due < last_due {
                stats.reordered.fetch_add(1, Ordering::Relaxed);
            }
            last_due = last_due.max(due);
            let (out, data, stats) = (out.clone(), buf[..len].to_vec(), stats.clone());
            std::thread::spawn(move || {
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                let _ = out.send_to(&data, to);
                stats.forwarded.fetch_add(1, Ordering::Relaxed);
            });
        }
    });
}

#[test]
fn one_percent_loss_and_200_ms_jitter_never_flap_the_default_heartbeat() {
    let mut p = Pair::new("lossyhb", "sync", SIZE);
    // Each node listens on its own port and sends to the relay in front
    // of the other; the relay sends from 127.0.0.1, the peer's address.
    let real = [free_port(), free_port()];
    let relays = [free_port(), free_port()];
    for n in 0..2 {
        let peer = 1 - n;
        // This node binds its real port and sends to the relay in front
        // of its peer.
        let mut text = p.config_text(n, "sync");
        for m in 0..2 {
            let port = if m == n { real[m] } else { relays[m] };
            text = text.replace(
                &format!("heartbeat_port = {}\n", p.ports[m]),
                &format!("heartbeat_port = {port}\n"),
            );
        }
        assert!(
            text.contains(&format!("heartbeat_port = {}", relays[peer])),
            "config template changed:\n{text}"
        );
        std::fs::write(p.config(n), text).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let stats = [
        Arc::new(RelayStats::default()),
        Arc::new(RelayStats::default()),
    ];
    for n in 0..2 {
        relay(relays[n], real[n], stop.clone(), stats[n].clone());
    }
    p.start(0);
    p.start(1);
    for n in 0..2 {
        p.wait(n, "peer heard through the relay", |s| {
            s.is_some_and(|s| s["heartbeat"]["peer_alive"] == true)
        });
    }
    let start = Instant::now();
    let mut polls = 0;
    while start.elapsed() < RUN {
        for n in 0..2 {
            let s = p.status(n).unwrap();
            assert_eq!(
                s["heartbeat"]["links"][0]["up"],
                true,
                "node {n}'s ring went down after {:?}: {}\n{}",
                start.elapsed(),
                s["heartbeat"],
                p.log(n)
            );
        }
        polls += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    stop.store(true, Ordering::Relaxed);
    for n in 0..2 {
        let log = p.log(n);
        assert!(!log.contains("ring0 down"), "flapped:\n{log}");
        assert!(!log.contains("PEER LOST"), "flapped:\n{log}");
        // Reordered datagrams inside the window are not replays.
        let c = &p.status(n).unwrap()["heartbeat"]["links"][0]["counters"];
        assert_eq!(c["bad_signature"], 0, "{c}");
        assert_eq!(c["malformed"], 0, "{c}");
    }
    // The damage was really done, in both directions.
    for s in &stats {
        let (f, d, r) = (
            s.forwarded.load(Ordering::Relaxed),
            s.dropped.load(Ordering::Relaxed),
            s.reordered.load(Ordering::Relaxed),
        );
        assert!(f > 200, "only {f} datagrams relayed");
        assert!(d >= 2, "only {d} dropped of {f}");
        assert!(r > f / 20, "only {r} of {f} reordered");
    }
    assert!(polls > 100);
}
