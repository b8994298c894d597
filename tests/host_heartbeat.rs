//! The heartbeat between two real daemons on loopback: the peer is found,
//! bad datagrams are refused and counted without changing anything, and a
//! killed peer is declared lost within about the timeout.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use common::Pair;
use hadb::core::heartbeat::{NodeReport, Packet, Timing};

const SIZE: u64 = 16 << 20;

fn heartbeat(p: &Pair, n: usize) -> serde_json::Value {
    p.status(n).unwrap()["heartbeat"].clone()
}

#[test]
fn peers_hear_each_other_and_bad_datagrams_change_nothing() {
    let p = Pair::up("hb", "sync", SIZE);
    for n in [0, 1] {
        p.wait(n, "peer heard", |s| {
            s.is_some_and(|s| {
                s["heartbeat"]["peer_alive"] == true && s["heartbeat"]["peer_hears_me"] == true
            })
        });
    }
    let hb = heartbeat(&p, 0);
    assert_eq!(hb["links"][0]["up"], true, "{hb}");
    assert!(hb["links"][0]["counters"]["received"].as_u64().unwrap() > 0);
    assert_eq!(hb["peer_report"]["role"], 0, "b is secondary: {hb}");

    // Datagrams to a's heartbeat port, from 127.0.0.1 (b's address):
    // forged with another key, an earlier incarnation of b signed with the
    // right key, another cluster, cut short, garbage, and a later
    // incarnation that does not name a's (a recording, or a b that has not
    // heard a: not believed).
    let target = hb["links"][0]["local"].as_str().unwrap().to_owned();
    let key = std::fs::read(p.dir.join("a.key")).unwrap();
    // Naming a's incarnation, as b's packets do once b hears a: without
    // it a packet is not believed at all (it may predate a's start).
    let a_incarnation = hb["incarnation"].as_u64().unwrap();
    let packet = |cluster: &str, incarnation: u64| Packet {
        link: 0,
        incarnation,
        seq: 1,
        cluster: cluster.into(),
        node: "b".into(),
        report: NodeReport {
            role: 1,
            hears: a_incarnation,
            ..NodeReport::default()
        },
        timing: Timing::default(),
    };
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let before = heartbeat(&p, 0);
    let forged = packet("test", u64::MAX).encode(b"not the key");
    let replayed = packet("test", 1).encode(&key);
    let foreign = packet("other", u64::MAX).encode(&key);
    let cut = &replayed[..replayed.len() - 5];
    let unconfirmed = Packet {
        report: NodeReport {
            role: 1,
            ..NodeReport::default()
        },
        ..packet("test", u64::MAX)
    }
    .encode(&key);
    for d in [
        &forged[..],
        &replayed[..],
        &foreign[..],
        cut,
        b"garbage",
        &unconfirmed[..],
    ] {
        sock.send_to(d, &target).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let hb = heartbeat(&p, 0);
    let c = &hb["links"][0]["counters"];
    let before = &before["links"][0]["counters"];
    let grew = |k: &str| c[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    assert_eq!(grew("bad_signature"), 1, "{c}");
    assert_eq!(grew("replayed"), 1, "{c}");
    assert_eq!(grew("foreign"), 1, "{c}");
    assert_eq!(grew("malformed"), 2, "{c}");
    assert_eq!(grew("unconfirmed"), 1, "{c}");
    // Nothing changed: b is still heard, and as secondary (each forgery
    // claimed primary).
    assert_eq!(hb["peer_alive"], true);
    assert_eq!(hb["peer_report"]["role"], 0, "{hb}");
}

#[test]
fn a_killed_peer_is_lost_within_about_the_timeout() {
    let mut p = Pair::up("hblost", "sync", SIZE);
    p.wait(0, "peer heard", |s| {
        s.is_some_and(|s| s["heartbeat"]["peer_alive"] == true)
    });
    let t0 = Instant::now();
    p.kill(1);
    p.wait(0, "peer lost", |s| {
        s.is_some_and(|s| s["heartbeat"]["peer_alive"] == false)
    });
    let took = t0.elapsed();
    // The default timeout is 1 s; the status poll adds a little.
    assert!(
        took >= Duration::from_millis(700),
        "lost after {took:?}: too early"
    );
    assert!(p.log(0).contains("PEER LOST"), "{}", p.log(0));
    // The same event through the control socket, as an operator reads it.
    let out = p.hadb(0, &["log"]);
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && log.contains("PEER LOST"), "{log}");
    assert!(log.contains("running as node a"), "{log}");
    let hb = heartbeat(&p, 0);
    assert_eq!(hb["links"][0]["up"], false, "{hb}");
}

fn wall_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// b's last run had a clock an hour ahead of the clock it restarts with
/// (its state file says so, as a run whose clock was later stepped back
/// would have left it). b's incarnations still rise, and a hears b's
/// new run as a restart instead of dropping it as a replay (with the
/// wall clock alone, a would never hear b again, and would fence it).
#[test]
fn a_restart_after_the_clock_went_back_is_heard() {
    let mut p = Pair::new("hbclock", "sync", SIZE);
    let ahead = wall_us() + 3_600_000_000;
    let state = p.dir.join("b.state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("incarnation"), format!("{ahead}\n")).unwrap();
    p.start(0);
    p.start(1);
    let heard_both_ways = |s: Option<&serde_json::Value>| {
        s.is_some_and(|s| {
            s["heartbeat"]["peer_alive"] == true && s["heartbeat"]["peer_hears_me"] == true
        })
    };
    for n in [0, 1] {
        p.wait(n, "peer heard both ways", heard_both_ways);
    }
    let first = heartbeat(&p, 1)["incarnation"].as_u64().unwrap();
    assert!(
        first > ahead,
        "b's run {first} is not above its last ({ahead}): the state file was not read"
    );
    assert_eq!(heartbeat(&p, 0)["peer_incarnation"].as_u64(), Some(first));

    // Restarted with the clock an hour behind its last run's.
    assert!(p.stop(1), "b stopped cleanly");
    p.start(1);
    let second = heartbeat(&p, 1)["incarnation"].as_u64().unwrap();
    assert!(second > first, "{second} after {first}");
    assert_eq!(
        std::fs::read_to_string(state.join("incarnation")).unwrap(),
        format!("{second}\n"),
        "on disk before it was used"
    );
    p.wait(0, "b's new run heard", |s| {
        s.is_some_and(|s| {
            heard_both_ways(Some(s)) && s["heartbeat"]["peer_incarnation"].as_u64() == Some(second)
        })
    });
    p.wait(1, "a heard by b's new run", heard_both_ways);
    assert!(
        p.log(0).contains("restarted since (new incarnation)"),
        "{}",
        p.log(0)
    );
}

/// A damaged state file stops the start with a message that names it;
/// nothing is guessed, and the file is left for the operator.
#[test]
fn a_damaged_incarnation_file_stops_the_start() {
    let p = Pair::new("hbdamaged", "sync", SIZE);
    let file = p.dir.join("a.state").join("incarnation");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, "17356\0\0\0").unwrap();
    let config = p.config(0);
    let log = p.dir.join("a.damaged.log");
    let mut child = common::spawn_hadb_run(None, &config, std::fs::File::create(&log).unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("hadb run started with a damaged incarnation file");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&file.display().to_string()) && stderr.contains("damaged"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"17356\0\0\0");
    assert!(p.status(0).is_none(), "no control socket: nothing started");
}
