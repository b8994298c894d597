//! The manager with real daemons in two network namespaces joined by two
//! veth links (ring0 carries replication and heartbeats, ring1 heartbeats
//! only): a killed primary is fenced (by the operator's confirmation) and
//! its writes are on the survivor; one ring down changes nothing but a
//! status line; both rings down never makes a second primary; standby and
//! switchover move the role with no write lost.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::time::{Duration, Instant};

use common::{Pair, qemu_io, require};
use netns::Net;

const SIZE: u64 = 32 << 20;

/// A pair whose daemons run in `net`'s namespaces with the manager on.
fn pair(test: &str, net: &Net) -> Pair {
    let mut p = Pair::new(test, "sync", SIZE);
    for n in 0..2 {
        let text = net.pair_config(&p.dir, n, "");
        std::fs::write(p.config(n), text).unwrap();
        p.netns[n] = Some(net.ns(n).to_owned());
    }
    // From the first primary on, the manager decides.
    p.start_connected();
    p
}

fn role(p: &Pair, n: usize) -> String {
    p.status(n).unwrap()["volume"]["role"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn a_killed_primary_is_fenced_and_the_survivor_has_every_flushed_write() {
    require("qemu-io", "qemu-utils");
    let net = Net::new("mgrkill", 2);
    let mut p = pair("mgrkill", &net);
    qemu_io(&p.uri(0), &["write -P 0x5a 0 4m", "flush"]);
    p.kill(0);
    // b waits fence_delay, then asks for the fence and waits for it.
    p.wait(1, "fence pending", |s| {
        s.is_some_and(|s| s["manager"]["fence"]["state"] == "pending")
    });
    assert_eq!(
        role(&p, 1),
        "secondary",
        "promoted before the fence:\n{}",
        p.log(1)
    );
    let human = String::from_utf8_lossy(&p.hadb(1, &["status"]).stdout).to_string();
    assert!(human.contains("FENCE PENDING of a"), "{human}");
    let wrong = p.hadb(1, &["fence", "confirm", "b"]);
    assert!(!wrong.status.success(), "confirmed a fence of itself");
    let ok = p.hadb(1, &["fence", "confirm", "a"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    p.wait(1, "primary", |s| {
        s.is_some_and(|s| s["volume"]["role"] == "primary")
    });
    qemu_io(
        &p.uri(1),
        &["read -P 0x5a 0 4m", "write -P 0x6b 8m 1m", "flush"],
    );
    // The old primary comes back as secondary and catches up.
    p.start(0);
    p.wait_in_sync(1);
    assert_eq!(role(&p, 0), "secondary");
    // Once a is heard again, the fence is history.
    p.wait(1, "fence cleared", |s| {
        s.is_some_and(|s| s["manager"]["fence"]["state"] == "none")
    });
}

#[test]
fn one_ring_down_changes_nothing_and_both_down_never_makes_a_second_primary() {
    let net = Net::new("mgrrings", 2);
    let p = pair("mgrrings", &net);
    net.link_down(1);
    p.wait(0, "ring1 down", |s| {
        s.is_some_and(|s| s["heartbeat"]["links"][1]["up"] == false)
    });
    std::thread::sleep(Duration::from_secs(3));
    for n in 0..2 {
        let s = p.status(n).unwrap();
        assert_eq!(s["heartbeat"]["peer_alive"], true, "{s}");
        assert_eq!(s["manager"]["fence"]["state"], "none", "{s}");
    }
    assert_eq!(
        (role(&p, 0), role(&p, 1)),
        ("primary".into(), "secondary".into())
    );
    assert!(
        String::from_utf8_lossy(&p.hadb(0, &["status"]).stdout).contains("ring1 DOWN"),
        "status shows the ring down"
    );
    net.link_up(1);

    // Both rings down, both nodes alive: each loses the other. The
    // secondary asks for a fence nobody confirms; it never promotes.
    net.link_down(0);
    net.link_down(1);
    let t0 = Instant::now();
    p.wait(1, "fence pending", |s| {
        s.is_some_and(|s| s["manager"]["fence"]["state"] == "pending")
    });
    while t0.elapsed() < Duration::from_secs(5) {
        assert_eq!(role(&p, 1), "secondary", "a second primary without a fence");
        assert_eq!(role(&p, 0), "primary");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The rings come back: the fence request is dropped, the pair is whole.
    net.link_up(0);
    net.link_up(1);
    p.wait(1, "fence cleared", |s| {
        s.is_some_and(|s| s["manager"]["fence"]["state"] == "none")
    });
    p.wait_in_sync(0);
    assert_eq!(role(&p, 1), "secondary");
}

#[test]
fn standby_and_switchover_move_the_role_with_no_write_lost() {
    require("qemu-io", "qemu-utils");
    let net = Net::new("mgrswitch", 2);
    let p = pair("mgrswitch", &net);
    qemu_io(&p.uri(0), &["write -P 0x11 0 2m", "flush"]);
    // Standby on a: it hands over, b takes the role.
    assert!(p.hadb(0, &["standby", "on"]).status.success());
    p.wait(1, "b primary", |s| {
        s.is_some_and(|s| s["volume"]["role"] == "primary")
    });
    p.wait_in_sync(1);
    assert_eq!(role(&p, 0), "secondary");
    qemu_io(
        &p.uri(1),
        &["read -P 0x11 0 2m", "write -P 0x22 2m 2m", "flush"],
    );
    // a stays secondary while in standby, though its name sorts first.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(role(&p, 0), "secondary");
    assert!(p.hadb(0, &["standby", "off"]).status.success());
    // A switchover back: b hands over, a takes the role.
    let refused = p.hadb(0, &["switchover"]);
    assert!(!refused.status.success(), "switchover on the secondary");
    let out = p.hadb(1, &["switchover"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    p.wait(0, "a primary", |s| {
        s.is_some_and(|s| s["volume"]["role"] == "primary")
    });
    p.wait_in_sync(0);
    qemu_io(&p.uri(0), &["read -P 0x11 0 2m", "read -P 0x22 2m 2m"]);
    // The switchover is over: b does not take the role back.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(role(&p, 1), "secondary");
}

#[test]
fn replication_down_heartbeat_up_outdates_the_peer_and_goes_on() {
    require("qemu-io", "qemu-utils");
    let net = Net::new("mgroutd", 2);
    let p = pair("mgroutd", &net);
    qemu_io(&p.uri(0), &["write -P 0x31 0 1m", "flush"]);
    // ring0 carries the replication link: down, it breaks; ring1 still
    // carries heartbeats, so the nodes hear each other.
    net.link_down(0);
    p.wait(0, "replication link lost", |s| {
        s.is_some_and(|s| s["volume"]["peer"].is_null())
    });
    assert_eq!(p.status(0).unwrap()["heartbeat"]["peer_alive"], true);
    // A write now waits for the peer; the primary asks it, over the
    // heartbeat, to outdate itself; it does, and the write completes.
    let mut w = common::qemu_io_spawn(&p.uri(0), &["write -P 0x32 2m 64k", "flush"]);
    p.wait(1, "outdated", |s| {
        s.is_some_and(|s| s["volume"]["disk"] == "outdated")
    });
    assert!(w.wait().unwrap().success(), "the write never completed");
    let s = p.status(0).unwrap();
    assert_eq!(
        s["manager"]["fence"]["state"], "none",
        "no fence while heard: {s}"
    );
    assert_eq!(s["volume"]["alone"], true, "{s}");
    // The outdated secondary never takes over, even once the primary dies.
    let mut p = p;
    p.kill(0);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(role(&p, 1), "secondary", "an outdated copy was promoted");
    assert_eq!(p.status(1).unwrap()["manager"]["fence"]["state"], "none");
    net.link_up(0);
}
