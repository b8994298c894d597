//! A replication link that dies without a word: a `semisync` pair in two
//! network namespaces, replicating 1 MiB writes, loses every packet on
//! ring0 (a blackhole route: no RST, no ICMP, no error on any socket)
//! while ring1 keeps carrying heartbeats. Both nodes must declare the link
//! lost within `volume.link_timeout`; then the primary asks the peer over
//! the heartbeat to outdate itself, goes on alone, and once ring0 is back
//! the pair resynchronises to identical copies.
//!
//! Before hadb bounded the whole frame read and every send, the secondary
//! sat in the middle of a frame's payload forever, `connected` and
//! `up_to_date`, so it never outdated itself and the primary stayed frozen.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::process::Child;
use std::time::{Duration, Instant};

use common::{Pair, qemu_io, qemu_io_spawn, require};
use netns::Net;

const SIZE: u64 = 64 << 20;
/// Writers at once, each over a region of its own.
const WRITERS: u64 = 4;
/// The region each writer cycles over, in MiB.
const REGION_MIB: u64 = 8;
/// Writes of 1 MiB per writer: enough that they still run when the link
/// dies.
const WRITES: u64 = 128;
/// `volume.link_timeout`'s default, which the pair runs with.
const LINK_TIMEOUT: Duration = Duration::from_secs(5);
/// Status is polled, and the nodes' last frames crossed a little before
/// the cut; this covers both on a loaded two-core host.
const MARGIN: Duration = Duration::from_secs(3);

fn pattern(writer: u64, i: u64) -> u64 {
    (writer * 64 + i) % 251 + 1
}

fn offset_mib(writer: u64, i: u64) -> u64 {
    writer * REGION_MIB + i % REGION_MIB
}

/// Waits for `child` to exit, killing it and failing the test after
/// `limit`.
fn wait_exit(child: &mut Child, limit: Duration, what: &str, p: &Pair) -> bool {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.success();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} still running after {limit:?}\n--- a.log\n{}\n--- b.log\n{}",
                p.log(0),
                p.log(1)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until both nodes have declared the replication link lost, and
/// fails unless both did within the link timeout (and a margin) of `cut`,
/// each saying what happened and naming the peer.
fn both_declare_the_link_lost(p: &Pair, cut: Instant) {
    let mut lost = [false, false];
    while lost.contains(&false) && cut.elapsed() < LINK_TIMEOUT + MARGIN {
        for (n, gone) in lost.iter_mut().enumerate() {
            *gone = *gone || p.status(n).is_some_and(|s| s["volume"]["peer"].is_null());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for (n, gone) in lost.into_iter().enumerate() {
        assert!(
            gone,
            "node {} still holds the link {:?} after ring0 went silent (limit {:?}): {}\n--- a.log\n{}\n--- b.log\n{}",
            common::NAMES[n],
            cut.elapsed(),
            LINK_TIMEOUT + MARGIN,
            p.status(n).unwrap()["volume"],
            p.log(0),
            p.log(1)
        );
    }
    for n in 0..2 {
        let event = p.status(n).unwrap()["volume"]["last_link_event"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let peer = common::NAMES[1 - n];
        assert!(
            event.contains(&format!("nothing received from {peer} for 5s"))
                || event.contains(&format!("a send to {peer} did not finish within 5s"))
                || event.contains(&format!("{peer} acknowledged nothing for 5s")),
            "node {}: {event}",
            common::NAMES[n]
        );
    }
}

#[test]
fn a_silently_dropped_link_is_noticed_on_both_sides_and_the_pair_goes_on() {
    require("qemu-io", "qemu-utils");
    // Declared first so that it drops last, after the daemons are killed.
    let net = Net::new("deadlink", 2);
    // Throttled, so that a 1 MiB frame takes about 40 ms to cross: on a
    // veth a frame crosses in far less time than the writers take between
    // frames, and the cut would almost always fall between two frames.
    net.rate(0, 200);
    let mut p = Pair::new("deadlink", "semisync", SIZE);
    for n in 0..2 {
        let text = net
            .pair_config(&p.dir, n, "")
            .replace("mode = \"sync\"", "mode = \"semisync\"");
        assert!(text.contains("mode = \"semisync\""), "{text}");
        std::fs::write(p.config(n), text).unwrap();
        p.netns[n] = Some(net.ns(n).to_owned());
    }
    p.start_connected();

    // Several writers at once keep the link busy, so the cut lands in the
    // middle of a frame (one writer leaves the link idle between its
    // writes, while it waits for each acknowledgement).
    let mut writers: Vec<Child> = (0..WRITERS)
        .map(|k| {
            let cmds: Vec<String> = (0..WRITES)
                .map(|i| format!("write -P {} {}m 1m", pattern(k, i), offset_mib(k, i)))
                .chain(["flush".to_string()])
                .collect();
            let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
            qemu_io_spawn(&p.uri(0), &cmds)
        })
        .collect();
    // Replication under way: frames of 1 MiB are on the wire.
    let before = p.counter(0, "counters", "replicated_bytes");
    let flowing = Instant::now();
    while p.counter(0, "counters", "replicated_bytes") < before + (8 << 20) {
        assert!(
            flowing.elapsed() < Duration::from_secs(20),
            "writes do not replicate\n{}",
            p.log(0)
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    net.blackhole(0);
    let cut = Instant::now();
    for w in &mut writers {
        assert!(
            w.try_wait().unwrap().is_none(),
            "the writes ended before the link was cut; raise WRITES"
        );
    }
    both_declare_the_link_lost(&p, cut);
    // The heartbeat still carries the nodes' states: the primary asks
    // the peer to outdate itself, it does, and the held writes go on.
    p.wait(1, "outdated", |s| {
        s.is_some_and(|s| s["volume"]["disk"] == "outdated")
    });
    for w in &mut writers {
        assert!(
            wait_exit(w, Duration::from_secs(60), "a writer", &p),
            "a write failed\n{}",
            p.log(0)
        );
    }
    let s = p.status(0).unwrap();
    assert_eq!(s["volume"]["role"], "primary", "{s}");
    assert_eq!(s["volume"]["alone"], true, "{s}");
    assert_eq!(
        s["manager"]["fence"]["state"], "none",
        "no fence while heard: {s}"
    );

    // Ring0 back: the link returns, the peer catches up, both copies equal.
    net.clear_blackhole(0);
    p.wait_in_sync(0);
    let s = p.status(1).unwrap();
    assert_eq!(s["volume"]["role"], "secondary", "{s}");
    assert_eq!(s["volume"]["disk"], "up_to_date", "{s}");
    let last: Vec<String> = (0..WRITERS)
        .flat_map(|k| (WRITES - REGION_MIB..WRITES).map(move |i| (k, i)))
        .map(|(k, i)| format!("read -P {} {}m 1m", pattern(k, i), offset_mib(k, i)))
        .collect();
    let last: Vec<&str> = last.iter().map(String::as_str).collect();
    qemu_io(&p.uri(0), &last);
    let out = p.hadb(0, &["volume", "verify", "--wait"]);
    assert!(
        out.status.success(),
        "the copies differ after the resync: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // An idle link dies as silently: nothing to send, so only the pings
    // and their answers stop.
    net.blackhole(0);
    both_declare_the_link_lost(&p, Instant::now());
    p.wait(1, "outdated", |s| {
        s.is_some_and(|s| s["volume"]["disk"] == "outdated")
    });
    p.wait(0, "alone", |s| {
        s.is_some_and(|s| s["volume"]["alone"] == true)
    });
    net.clear_blackhole(0);
    p.wait_in_sync(0);
}
