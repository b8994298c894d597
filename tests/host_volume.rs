//! Host integration: two real `hadb run` processes on loopback, driven by
//! NBD clients nobody here wrote (nbdinfo, nbdcopy, qemu-io, fio) and by
//! hand-made bad input.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Pair, qemu_io, qemu_io_spawn, require, run};
use hadb::core::nbd;
use hadb::core::wire::{self, Hello, Kind, Sealer, Transcript};

const SIZE: u64 = 32 << 20;
/// The key `Pair` writes for both nodes.
const KEY: [u8; 32] = {
    let mut k = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        k[i] = (i * 7 + 3) as u8;
        i += 1;
    }
    k
};

#[test]
fn nbdinfo_reports_size_and_flags() {
    require("nbdinfo", "libnbd-bin");
    let p = Pair::up("nbdinfo", "sync", SIZE);
    let out = run(Command::new("nbdinfo").args(["--json", &p.uri(0)]));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"].as_u64().unwrap(), p.data_size());
    assert!(p.data_size() < SIZE && p.data_size() > SIZE - (1 << 20));
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(
            export[flag],
            serde_json::Value::Bool(true),
            "{flag}: {export}"
        );
    }
    assert_eq!(export["is_read_only"], serde_json::Value::Bool(false));
    // The secondary refuses clients: its copy cannot be written.
    let out = Command::new("nbdinfo").arg(p.uri(1)).output().unwrap();
    assert!(
        !out.status.success(),
        "the secondary must not serve the volume"
    );
}

#[test]
fn nbdcopy_roundtrip_and_secondary_identical() {
    require("nbdcopy", "libnbd-bin");
    let p = Pair::up("nbdcopy", "sync", SIZE);
    let size = p.data_size();
    let src = p.dir.join("random.bin");
    std::fs::write(&src, common::random_bytes(size as usize, 11)).unwrap();
    run(Command::new("nbdcopy").args(["--flush", src.to_str().unwrap(), &p.uri(0)]));
    let back = p.dir.join("back.bin");
    run(Command::new("nbdcopy").args([&p.uri(0), back.to_str().unwrap()]));
    let want = std::fs::read(&src).unwrap();
    assert!(std::fs::read(&back).unwrap() == want, "read back differs");
    // After the flush, the secondary's data area is byte-identical.
    assert!(
        p.data(1, size) == want,
        "secondary's data area differs after flush"
    );
    assert!(p.data(0, size) == want, "primary's data area differs");
}

#[test]
fn qemu_io_fua_flush_zeroes_discard() {
    require("qemu-io", "qemu-utils");
    let p = Pair::up("qemuio", "sync", SIZE);
    let size = p.data_size();
    let out = qemu_io(
        &p.uri(0),
        &[
            "write -P 0xab 0 192k",
            "write -P 0xcd -f 4096 4096",
            "flush",
            "write -z 64k 64k",
            "discard 128k 64k",
            "read -P 0xab 0 4096",
            "read -P 0xcd 4096 4096",
            "read -P 0xab 8192 56k",
            "read -P 0 64k 128k",
            "flush",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("Pattern verification failed"), "{text}");
    let a = p.data(0, size);
    let b = p.data(1, size);
    assert_eq!(&b[4096..8192], &[0xcd; 4096][..]);
    assert_eq!(&b[65536..196608], &vec![0u8; 131072][..]);
    assert!(a == b, "copies differ after flush");
}

#[test]
fn fio_nbd_engine_verifies() {
    require("fio", "fio");
    let p = Pair::up("fio", "sync", SIZE);
    let size = p.data_size();
    // fio leaves a verify state file in its working directory.
    let out = run(Command::new("fio").current_dir(&p.dir).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", p.uri(0)),
        "--rw=randwrite",
        "--bs=4k",
        "--size=16m",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--output-format=json",
    ]));
    // fio may print notes before its JSON.
    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap()..]).unwrap();
    assert_eq!(report["jobs"][0]["error"], 0, "{report}");
    qemu_io(&p.uri(0), &["flush"]);
    assert!(
        p.data(0, size) == p.data(1, size),
        "copies differ after fio and a flush"
    );
}

/// Negotiates NBD_OPT_GO by hand and returns the connection.
fn nbd_connect(path: &std::path::Path) -> UnixStream {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[0..8], b"NBDMAGIC");
    s.write_all(&(nbd::CLIENT_FIXED_NEWSTYLE | nbd::CLIENT_NO_ZEROES).to_be_bytes())
        .unwrap();
    let mut opt = Vec::new();
    opt.extend_from_slice(&nbd::IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&nbd::OPT_GO.to_be_bytes());
    opt.extend_from_slice(&6u32.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt).unwrap();
    loop {
        let mut hdr = [0u8; 20];
        s.read_exact(&mut hdr).unwrap();
        let reply = u32::from_be_bytes(hdr[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(hdr[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).unwrap();
        if reply == nbd::REP_ACK {
            return s;
        }
        assert_eq!(reply, nbd::REP_INFO, "GO refused");
    }
}

fn nbd_request(
    s: &mut UnixStream,
    command: u16,
    cookie: u64,
    offset: u64,
    length: u32,
    payload: &[u8],
) -> u32 {
    let r = nbd::Request {
        flags: 0,
        command,
        cookie,
        offset,
        length,
    };
    s.write_all(&nbd::encode_request(&r)).unwrap();
    s.write_all(payload).unwrap();
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(u64::from_be_bytes(reply[8..16].try_into().unwrap()), cookie);
    let error = u32::from_be_bytes(reply[4..8].try_into().unwrap());
    if command == nbd::CMD_READ && error == 0 {
        let mut data = vec![0u8; length as usize];
        s.read_exact(&mut data).unwrap();
    }
    error
}

#[test]
fn bad_nbd_requests_are_refused_and_the_connection_lives_on() {
    let p = Pair::up("nbdbad", "sync", SIZE);
    let size = p.data_size();
    let before = p.data(0, size);
    let mut s = nbd_connect(&p.nbd_socket(0));
    // Read past the end.
    assert_eq!(
        nbd_request(&mut s, nbd::CMD_READ, 1, size - 512, 4096, &[]),
        nbd::EINVAL
    );
    // Write past the end: the payload is drained, nothing is written.
    assert_eq!(
        nbd_request(&mut s, nbd::CMD_WRITE, 2, size - 512, 4096, &[0xee; 4096]),
        nbd::ENOSPC
    );
    // Larger than the advertised maximum: drained, refused.
    let big = vec![0xee; nbd::MAX_REQUEST as usize + 4096];
    assert_eq!(
        nbd_request(&mut s, nbd::CMD_WRITE, 3, 0, big.len() as u32, &big),
        nbd::EINVAL
    );
    // An unknown command.
    assert_eq!(nbd_request(&mut s, 99, 4, 0, 0, &[]), nbd::EINVAL);
    // The connection still serves valid requests.
    assert_eq!(
        nbd_request(&mut s, nbd::CMD_WRITE, 5, 8192, 4096, &[0x42; 4096]),
        0
    );
    assert_eq!(nbd_request(&mut s, nbd::CMD_FLUSH, 6, 0, 0, &[]), 0);
    assert_eq!(nbd_request(&mut s, nbd::CMD_READ, 7, 8192, 4096, &[]), 0);
    let after = p.data(0, size);
    assert_eq!(&after[8192..12288], &[0x42; 4096][..]);
    let mut expected = before.clone();
    expected[8192..12288].fill(0x42);
    assert!(after == expected, "a refused request changed the data");
    assert!(p.data(1, size) == expected, "the secondary differs");
    assert_eq!(p.counter(0, "bad_input", "nbd_refused_requests"), 4);
    // A request with a broken magic ends that connection, not the server.
    s.write_all(&[0u8; 28]).unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(
        s.read(&mut buf).unwrap_or(0),
        0,
        "connection should be closed"
    );
    nbd_connect(&p.nbd_socket(0));
    assert_eq!(p.counter(0, "bad_input", "nbd_bad_streams"), 1);
}

#[test]
fn wrong_key_is_refused_on_both_sides() {
    let mut p = Pair::new("wrongkey", "sync", SIZE);
    p.write_key(1, b"a different key of 32 bytes long");
    p.start(0);
    p.start(1);
    // a connects; b's proof fails a's check, so a refuses and b only sees
    // a handshake that ended early.
    p.wait(1, "handshake failure counted", |s| {
        s.is_some_and(|s| {
            s["volume"]["bad_input"]["repl_handshake_failures"]
                .as_u64()
                .unwrap_or(0)
                > 0
        })
    });
    p.wait(0, "auth failure counted", |s| {
        s.is_some_and(|s| {
            s["volume"]["bad_input"]["repl_auth_failures"]
                .as_u64()
                .unwrap_or(0)
                > 0
        })
    });
    let s = p.status(0).unwrap();
    assert!(
        s["volume"]["peer"].is_null(),
        "linked despite a wrong key: {s}"
    );
    assert!(
        p.log(0).contains("could not prove it holds our key"),
        "{}",
        p.log(0)
    );
    // The listener's side of a wrong key: a connector with another key.
    let (s, _) = impersonate_a(&p, b"yet another key, not the one b has");
    drop(s);
    p.wait(1, "auth failure counted", |s| {
        s.is_some_and(|s| {
            s["volume"]["bad_input"]["repl_auth_failures"]
                .as_u64()
                .unwrap_or(0)
                > 0
        })
    });
    assert!(p.log(1).contains("failed the challenge"), "{}", p.log(1));
}

#[test]
fn garbage_on_the_replication_port_is_refused() {
    let p = Pair::up("garbage", "sync", SIZE);
    let mut s = TcpStream::connect(("127.0.0.1", p.ports[1])).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 64];
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0, "garbage got an answer");
    p.wait(1, "handshake failure counted", |s| {
        s.is_some_and(|s| {
            s["volume"]["bad_input"]["repl_handshake_failures"]
                .as_u64()
                .unwrap_or(0)
                >= 1
        })
    });
    // The real link is untouched: replication still works.
    qemu_io(&p.uri(0), &["write -P 0x17 0 4096", "flush"]);
    assert_eq!(&p.data(1, 4096)[..], &[0x17; 4096][..]);
}

/// Connections that never speak cannot fill the daemon: a few wait in
/// the handshake, the rest are closed at once and counted; the real link,
/// status and the log go on as before.
#[test]
fn a_flood_of_silent_connections_is_shed_and_the_pair_goes_on() {
    let p = Pair::up("flood", "sync", SIZE);
    let mut conns: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(("127.0.0.1", p.ports[1])).unwrap())
        .collect();
    p.wait(1, "shed connections counted", |s| {
        s.is_some_and(|s| {
            s["volume"]["bad_input"]["repl_handshakes_shed"]
                .as_u64()
                .unwrap_or(0)
                >= 30
        })
    });
    // Shed means closed at once, not after the 5 s handshake timeout.
    let mut closed = 0;
    for c in &mut conns {
        c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        if matches!(c.read(&mut [0u8; 1]), Ok(0)) {
            closed += 1;
        }
    }
    assert!(
        closed >= 30,
        "only {closed} of 40 silent connections closed"
    );
    // While the rest still hang in the handshake: replication and status.
    qemu_io(&p.uri(0), &["write -P 0x29 0 4096", "flush"]);
    assert_eq!(&p.data(1, 4096)[..], &[0x29; 4096][..]);
    assert!(p.status(1).is_some(), "b stopped answering status");
    // The handshakes that were let in time out; one line says so, not
    // one per connection.
    std::thread::sleep(Duration::from_secs(6));
    let log = p.log(1);
    let refused = log.matches("refused a connection from").count();
    assert_eq!(refused, 1, "{log}");
    assert!(
        log.matches("closed at once").count() <= 1,
        "one line per shed connection: {log}"
    );
    drop(conns);
}

/// Plays node `a` against a lone node `b`: authenticates with the real key,
/// then sends what the test wants.
fn impersonate_a(p: &Pair, key: &[u8]) -> (TcpStream, Sealer) {
    let mut s = TcpStream::connect(("127.0.0.1", p.ports[1])).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let nonce_c = [5u8; 32];
    let hello = Hello {
        version: wire::PROTOCOL_VERSION,
        cluster: "test".into(),
        node: "a".into(),
        nonce: nonce_c,
    };
    s.write_all(&hello.encode()).unwrap();
    let mut buf = Vec::new();
    let theirs = loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        buf.push(b[0]);
        if let Some((h, _)) = Hello::decode(&buf).unwrap() {
            break h;
        }
    };
    let mut proof = [0u8; 32];
    s.read_exact(&mut proof).unwrap();
    let t = Transcript {
        cluster: "test",
        connector: "a",
        listener: "b",
        nonce_c: &nonce_c,
        nonce_l: &theirs.nonce,
    };
    s.write_all(&t.connector_proof(key)).unwrap();
    let mut status = [0u8; 1];
    s.read_exact(&mut status).unwrap();
    assert_eq!(
        status[0] == 0,
        proof == t.listener_proof(key),
        "the listener accepted a wrong key"
    );
    let (c2l, _) = t.session_keys(key);
    (s, Sealer::new(&c2l))
}

fn wait_closed(s: &mut TcpStream) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
    panic!("the link was not dropped");
}

#[test]
fn forged_corrupt_and_truncated_frames_write_nothing() {
    let mut p = Pair::new("frames", "sync", SIZE);
    p.start(1);
    let size = p.data_size();
    let before = p.data(1, size);
    let data = vec![0x66u8; 4096];

    // A frame sealed with another session key (a forgery).
    let (mut s, _) = impersonate_a(&p, &KEY);
    let mut other = Sealer::new(&[9; 32]);
    let (h, mac) = other.seal(wire::Header::new(Kind::Data, 1, 0, 4096), &data);
    s.write_all(&h).unwrap();
    s.write_all(&data).unwrap();
    s.write_all(&mac).unwrap();
    wait_closed(&mut s);

    // A correctly sealed frame whose payload is corrupted on the way.
    let (mut s, mut sealer) = impersonate_a(&p, &KEY);
    let (h, mac) = sealer.seal(wire::Header::new(Kind::Data, 1, 0, 4096), &data);
    let mut bad = data.clone();
    bad[100] ^= 0x01;
    s.write_all(&h).unwrap();
    s.write_all(&bad).unwrap();
    s.write_all(&mac).unwrap();
    wait_closed(&mut s);

    // A truncated frame: header and half the payload, then the end.
    let (mut s, mut sealer) = impersonate_a(&p, &KEY);
    let (h, _) = sealer.seal(wire::Header::new(Kind::Data, 1, 0, 4096), &data);
    s.write_all(&h).unwrap();
    s.write_all(&data[..2048]).unwrap();
    drop(s);

    // A frame that claims an absurd payload length.
    let (mut s, _) = impersonate_a(&p, &KEY);
    let mut h = [0u8; wire::HEADER_LEN];
    h[0..4].copy_from_slice(&wire::FRAME_MAGIC.to_be_bytes());
    h[4] = Kind::Data as u8;
    h[24..28].copy_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&h).unwrap();
    wait_closed(&mut s);

    p.wait(1, "four bad frames counted", |s| {
        s.is_some_and(|s| {
            s["volume"]["bad_input"]["repl_bad_frames"]
                .as_u64()
                .unwrap_or(0)
                >= 4
        })
    });
    assert!(p.data(1, size) == before, "a refused frame wrote data");
    assert!(p.status(1).is_some(), "the daemon must keep serving");
}

#[test]
fn sync_write_waits_for_the_peer_and_go_alone_releases_it() {
    require("qemu-io", "qemu-utils");
    let mut p = Pair::up("goalone", "sync", SIZE);
    let size = p.data_size();
    // With the peer there, nothing is held: go-alone refuses rather than
    // claim it did something, and so does the secondary.
    for node in [0, 1] {
        let out = p.hadb(node, &["volume", "go-alone"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "go-alone on node {node} succeeded");
        let want = ["nothing to release", "not primary"][node];
        assert!(err.contains(want), "node {node}: {err}");
    }
    assert_eq!(p.status(0).unwrap()["volume"]["alone"], false);
    p.kill(1);
    p.wait_link_lost(0);
    let mut writer = qemu_io_spawn(&p.uri(0), &["write -P 0x5a 1m 64k", "flush"]);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        writer.try_wait().unwrap().is_none(),
        "a sync write completed without the peer"
    );
    let s = p.status(0).unwrap();
    assert_eq!(s["volume"]["frozen"], serde_json::Value::Bool(true), "{s}");
    let out = p.hadb(0, &["volume", "go-alone"]);
    assert!(out.status.success());
    let status = writer.wait().unwrap();
    assert!(status.success(), "the held write failed after go-alone");
    // The peer comes back: only what changed moves.
    let sent_before = p.counter(0, "counters", "resync_blocks_sent");
    p.start(1);
    p.wait_in_sync(0);
    let sent = p.counter(0, "counters", "resync_blocks_sent") - sent_before;
    assert!(
        (16..=18).contains(&sent),
        "resynced {sent} blocks for a 64 KiB change"
    );
    qemu_io(&p.uri(0), &["flush"]);
    assert!(
        p.data(0, size) == p.data(1, size),
        "copies differ after the resync"
    );
}

/// A userspace NBD client connected while this node was primary is cut
/// off when it stops being primary: it could otherwise go on reading a
/// copy that no longer follows the primary's writes.
#[test]
fn an_nbd_client_is_closed_when_the_node_stops_being_primary() {
    let p = Pair::up("nbdcut", "sync", SIZE);
    let mut s = nbd_connect(&p.nbd_socket(0));
    assert_eq!(nbd_request(&mut s, nbd::CMD_READ, 1, 0, 4096, &[]), 0);
    let out = p.hadb(0, &["volume", "secondary"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Closed by the server within a moment, without the client sending
    // anything more.
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = [0u8; 1];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(_) => panic!("the server sent something unasked"),
        Err(e) => panic!("the connection is still open after the demotion: {e}"),
    }
    assert!(
        p.log(0).contains("no longer primary"),
        "the log does not say why: {}",
        p.log(0)
    );
}

#[test]
fn switch_primary_between_nodes() {
    require("qemu-io", "qemu-utils");
    let p = Pair::up("switch", "sync", SIZE);
    let size = p.data_size();
    qemu_io(&p.uri(0), &["write -P 0x11 0 1m", "flush"]);
    // Only one primary: b cannot be promoted while a is.
    let out = p.hadb(1, &["volume", "primary"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("the peer is primary"));
    let out = p.hadb(0, &["volume", "secondary"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    p.primary(1);
    p.wait_in_sync(1);
    qemu_io(
        &p.uri(1),
        &["read -P 0x11 0 1m", "write -P 0x22 1m 1m", "flush"],
    );
    assert!(
        Command::new("nbdinfo")
            .arg(p.uri(0))
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
    );
    assert!(p.data(0, size) == p.data(1, size));
    assert_eq!(
        &p.data(0, size)[1 << 20..(1 << 20) + 4096],
        &[0x22; 4096][..]
    );
}

#[test]
fn config_check_reports_file_line_and_key() {
    let p = Pair::new("configcheck", "sync", SIZE);
    let out = p.hadb(0, &["config", "check"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("node = \"a\""));
    let text = p
        .config_text(0, "sync")
        .replace("mode = \"sync\"", "mode = \"sync\"\nspeed = 3");
    let line = text.lines().position(|l| l == "speed = 3").unwrap() + 1;
    std::fs::write(p.config(0), text).unwrap();
    let out = p.hadb(0, &["config", "check"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("a.toml:{line}: key `volume.speed`: unknown field")),
        "{err}"
    );
}

#[test]
fn create_md_refuses_to_overwrite() {
    let p = Pair::new("createmd", "sync", SIZE);
    let out = p.hadb(0, &["volume", "create-md"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds hadb metadata"));
    let out = p.hadb(0, &["volume", "show-md", "--json"]);
    assert!(out.status.success());
    let md: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(md["device_size"].as_u64().unwrap(), SIZE);
    assert!(md["data_size"].as_u64().unwrap() < SIZE);
}

#[test]
fn async_goes_on_without_the_peer_and_says_it_is_behind() {
    require("qemu-io", "qemu-utils");
    let mut p = Pair::up("async", "async", SIZE);
    let size = p.data_size();
    p.kill(1);
    p.wait_link_lost(0);
    // No go-alone needed: async writes complete locally.
    qemu_io(&p.uri(0), &["write -P 0x33 2m 128k", "flush"]);
    let s = p.status(0).unwrap();
    assert_eq!(
        s["volume"]["out_of_sync_bytes"].as_u64(),
        Some(128 << 10),
        "{s}"
    );
    assert_eq!(s["volume"]["frozen"], serde_json::Value::Bool(false));
    let human = String::from_utf8_lossy(&p.hadb(0, &["status"]).stdout).into_owned();
    assert!(human.contains("PEER BEHIND: 131072 bytes"), "{human}");
    p.start(1);
    p.wait_in_sync(0);
    qemu_io(&p.uri(0), &["flush"]);
    assert!(
        p.data(0, size) == p.data(1, size),
        "copies differ after the resync"
    );
}

#[test]
fn split_brain_is_reported_and_resolved_by_discard_my_data() {
    require("qemu-io", "qemu-utils");
    let mut p = Pair::up("splitbrain", "sync", SIZE);
    let size = p.data_size();
    // The link goes; a goes on alone and writes.
    p.kill(1);
    p.wait_link_lost(0);
    assert!(p.hadb(0, &["volume", "go-alone"]).status.success());
    qemu_io(&p.uri(0), &["write -P 0xa1 0 64k", "flush"]);
    assert!(p.hadb(0, &["volume", "secondary"]).status.success());
    // b comes back without a and is made primary by hand: it writes too.
    p.kill(0);
    p.start(1);
    p.primary(1);
    assert!(p.hadb(1, &["volume", "go-alone"]).status.success());
    qemu_io(&p.uri(1), &["write -P 0xb2 1m 64k", "flush"]);
    // Both come together: split brain, reported, never resolved silently.
    p.start(0);
    for n in [0, 1] {
        p.wait(n, "split brain reported, standalone", |s| {
            s.is_some_and(|s| {
                !s["volume"]["split_brain"].is_null() && s["volume"]["link"] == "standalone"
            })
        });
    }
    let human = String::from_utf8_lossy(&p.hadb(0, &["status"]).stdout).into_owned();
    assert!(human.contains("SPLIT BRAIN since generation"), "{human}");
    // Status quotes the rule the connect was decided by.
    assert!(
        human.contains("last connect: both copies changed since they parted"),
        "{human}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_ne!(
        &p.data(0, size)[..4096],
        &p.data(1, size)[..4096],
        "something was resolved silently"
    );
    // A primary's copy cannot be discarded.
    assert!(!p.hadb(1, &["volume", "discard-my-data"]).status.success());
    // The operator throws a's changes away.
    let out = p.hadb(0, &["volume", "discard-my-data"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    p.wait_in_sync(1);
    qemu_io(&p.uri(1), &["flush"]);
    assert!(
        p.data(0, size) == p.data(1, size),
        "copies differ after the resolution"
    );
    assert_eq!(
        &p.data(0, size)[1 << 20..(1 << 20) + 4096],
        &[0xb2; 4096][..]
    );
    assert!(
        p.log(0).contains("discarding this node's copy"),
        "{}",
        p.log(0)
    );
}

#[test]
fn online_verify_finds_a_difference_and_the_resync_repairs_it() {
    require("qemu-io", "qemu-utils");
    let p = Pair::up("verify", "sync", SIZE);
    let size = p.data_size();
    qemu_io(&p.uri(0), &["write -P 0x3c 0 4m", "flush"]);
    let out = p.hadb(0, &["volume", "verify", "--wait"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(" 0 differ"));
    // Behind hadb's back, three blocks of the secondary's copy change.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(p.image(1))
            .unwrap();
        for off in [8192u64, 1 << 20, 3 << 20] {
            f.write_all_at(b"bit rot", off + 100).unwrap();
        }
    }
    // The volume stays in use while it runs.
    let mut writer = qemu_io_spawn(&p.uri(0), &["write -P 0x77 8m 2m", "flush"]);
    let out = p.hadb(0, &["volume", "verify", "--wait"]);
    assert!(!out.status.success(), "verify missed the difference");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("3 differ"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(writer.wait().unwrap().success());
    p.wait_in_sync(0);
    qemu_io(&p.uri(0), &["flush"]);
    assert!(
        p.data(0, size) == p.data(1, size),
        "the resync after verify did not repair the copy"
    );
    let out = p.hadb(0, &["volume", "verify", "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
