//! The mysqld health check against a real MariaDB (from the distribution's
//! packages) and against fake servers on a unix socket that misbehave in
//! the ways a real one cannot be made to on demand: garbage, silence,
//! closing at once, caching_sha2_password, an ERR in place of the greeting.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::mariadb::{MONITOR_PASSWORD, MONITOR_USER, Mariadb, WRITE_PROBE};
use hadb::core::mysql_wire as wire;
use hadb::run::mysql_health::{Health, HealthCheck};
use rustix::process::Signal;

fn check(socket: PathBuf, password: &str, probe: Option<&str>) -> HealthCheck {
    HealthCheck {
        socket,
        user: MONITOR_USER.into(),
        password: password.into(),
        timeout: Duration::from_secs(1),
        write_probe: probe.map(str::to_owned),
    }
}

#[test]
fn a_running_mariadb_is_healthy_and_errors_are_named() {
    let m = Mariadb::start("answers");
    let socket = m.socket.clone();

    let h = check(socket.clone(), MONITOR_PASSWORD, None).check();
    let Health::Healthy {
        server_version,
        elapsed,
    } = &h
    else {
        panic!("expected healthy, got {h}\n{}", m.log());
    };
    assert!(
        server_version.starts_with(|c: char| c.is_ascii_digit())
            && server_version.contains("MariaDB"),
        "server version {server_version:?}"
    );
    assert!(*elapsed < Duration::from_secs(1), "{elapsed:?}");
    println!("ping: {h}");

    // The write probe commits a row, which root can read back.
    m.sql_ok("DELETE FROM hadb.probe");
    let h = check(socket.clone(), MONITOR_PASSWORD, Some(WRITE_PROBE)).check();
    assert!(h.is_healthy(), "{h}");
    println!("write probe: {h}");
    assert_eq!(m.sql_ok("SELECT COUNT(*) FROM hadb.probe").trim(), "1");

    // A probe that answers with a result set: read past it, still healthy.
    let h = check(
        socket.clone(),
        MONITOR_PASSWORD,
        Some("SELECT 1, NULL, 'x', REPEAT('y', 300)"),
    )
    .check();
    assert!(h.is_healthy(), "{h}");

    // A wrong password names the user and says how to create it.
    let h = check(socket.clone(), "not-the-password", None).check();
    match &h {
        Health::Failing(m) => {
            assert!(m.contains("'hadb_monitor'@'localhost'"), "{m}");
            assert!(m.contains("1045"), "{m}");
            assert!(m.contains("CREATE USER"), "{m}");
        }
        other => panic!("wrong password: {other}"),
    }
    // So does a user that does not exist.
    let mut nobody = check(socket.clone(), "x", None);
    nobody.user = "nobody_here".into();
    let h = nobody.check();
    assert!(
        matches!(&h, Health::Failing(m) if m.contains("'nobody_here'@'localhost'")),
        "{h}"
    );

    // A write probe on a table the user may not write (MariaDB says
    // that before it says whether the table exists).
    let h = check(
        socket.clone(),
        MONITOR_PASSWORD,
        Some("REPLACE INTO hadb.missing VALUES (1, NOW())"),
    )
    .check();
    match &h {
        Health::Failing(m) => {
            assert!(m.contains("write probe"), "{m}");
            assert!(m.contains("1142") && m.contains("docs/mysql.md"), "{m}");
        }
        other => panic!("probe on a table without grants: {other}"),
    }

    // A read-only server fails the write probe but still answers a ping.
    m.sql_ok("SET GLOBAL read_only = ON");
    let h = check(socket.clone(), MONITOR_PASSWORD, Some(WRITE_PROBE)).check();
    assert!(
        matches!(&h, Health::Failing(m) if m.contains("read-only") || m.contains("read_only")),
        "{h}"
    );
    assert!(
        check(socket.clone(), MONITOR_PASSWORD, None)
            .check()
            .is_healthy()
    );
    m.sql_ok("SET GLOBAL read_only = OFF");

    // The probe table dropped (its grants stay): the server names it.
    m.sql_ok("DROP TABLE hadb.probe");
    let h = check(socket.clone(), MONITOR_PASSWORD, Some(WRITE_PROBE)).check();
    assert!(
        matches!(&h, Health::Failing(m) if m.contains("1146") && m.contains("hadb.probe")),
        "{h}"
    );

    // An account on a plugin we do not speak (MariaDB's ed25519): the
    // server switches us to it, and we say so.
    m.sql_ok("INSTALL SONAME 'auth_ed25519'");
    m.sql_ok("CREATE USER 'hadb_ed'@'localhost' IDENTIFIED VIA ed25519 USING PASSWORD('pw')");
    let mut ed = check(socket.clone(), "pw", None);
    ed.user = "hadb_ed".into();
    let h = ed.check();
    assert!(
        matches!(&h, Health::Failing(m) if m.contains("ed25519")),
        "{h}"
    );

    // Every check said goodbye: no aborted connections in the log.
    std::thread::sleep(Duration::from_millis(200));
    let aborted = m.sql_ok("SHOW GLOBAL STATUS LIKE 'Aborted_clients'");
    assert!(aborted.trim().ends_with("\t0"), "{aborted}");
}

#[test]
fn a_stopped_mariadb_is_hung_within_the_timeout_and_a_killed_one_not_started() {
    let mut m = Mariadb::start("stopped");
    let socket = m.socket.clone();
    assert!(
        check(socket.clone(), MONITOR_PASSWORD, None)
            .check()
            .is_healthy()
    );

    m.signal(Signal::STOP);
    for probe in [None, Some(WRITE_PROBE)] {
        let start = Instant::now();
        let h = check(socket.clone(), MONITOR_PASSWORD, probe).check();
        let took = start.elapsed();
        println!("SIGSTOPped, probe {probe:?}: {h} after {took:?}");
        assert!(
            matches!(&h, Health::Hung(m) if m.contains("greeting")),
            "{h}"
        );
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_millis(1300),
            "hung detected after {took:?} with a 1 s timeout"
        );
    }
    m.signal(Signal::CONT);
    // The connections queued while it was stopped are served, then closed
    // by us long ago; the next check is healthy.
    let start = Instant::now();
    let h = loop {
        let h = check(socket.clone(), MONITOR_PASSWORD, Some(WRITE_PROBE)).check();
        if h.is_healthy() || start.elapsed() > Duration::from_secs(10) {
            break h;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(h.is_healthy(), "after SIGCONT: {h}\n{}", m.log());

    // Killed: its socket file stays, and refuses connections.
    m.kill();
    assert!(m.socket.exists());
    let h = check(socket.clone(), MONITOR_PASSWORD, None).check();
    assert!(
        matches!(&h, Health::NotStarted(m) if m.contains("refused")),
        "{h}"
    );

    // Restarted on the same data, and stopped cleanly: the socket goes.
    m.spawn();
    assert!(
        check(socket.clone(), MONITOR_PASSWORD, None)
            .check()
            .is_healthy()
    );
    assert!(m.stop(), "mariadbd did not stop cleanly:\n{}", m.log());
    let h = check(socket, MONITOR_PASSWORD, None).check();
    assert!(matches!(h, Health::NotStarted(_)), "{h}");
}

#[test]
fn no_socket_is_not_started() {
    let h = check(
        PathBuf::from("/tmp/hadb-mysql-no-such-dir/mysqld.sock"),
        "x",
        None,
    )
    .check();
    assert!(
        matches!(&h, Health::NotStarted(m) if m.contains("/tmp/hadb-mysql-no-such-dir/mysqld.sock")),
        "{h}"
    );
}

// ---------------------------------------------------------------------
// Fake servers

/// A unix socket in its own directory, served by `script` on a thread
/// (one connection); the directory goes when this is dropped.
struct Fake {
    dir: PathBuf,
    socket: PathBuf,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Fake {
    fn new(name: &str, script: impl FnOnce(UnixStream) + Send + 'static) -> Fake {
        let dir = PathBuf::from(format!("/tmp/hadb-fake-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("s.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let thread = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            script(stream);
        });
        Fake {
            dir,
            socket,
            thread: Some(thread),
        }
    }

    fn check(&self, password: &str) -> Health {
        check(self.socket.clone(), password, None).check()
    }

    /// Waits for the script, failing the test if it panicked (it asserts
    /// what the client sent).
    fn join(mut self) {
        if let Some(t) = self.thread.take() {
            t.join().expect("the fake server's script failed");
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn send(s: &mut UnixStream, payload: &[u8], seq: u8) {
    s.write_all(&wire::frame(payload, seq).0).unwrap();
}

fn recv(s: &mut UnixStream, seq: u8) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(d) = wire::decode(&buf, seq, 1 << 20).unwrap() {
            return d.payload;
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "client closed early");
        buf.extend_from_slice(&chunk[..n]);
    }
}

const NONCE: &[u8; 20] = b"abcdefghij0123456789";

fn greeting(plugin: &str) -> Vec<u8> {
    let caps = wire::CLIENT_PROTOCOL_41
        | wire::CLIENT_SECURE_CONNECTION
        | wire::CLIENT_PLUGIN_AUTH
        | wire::CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
        | wire::CLIENT_TRANSACTIONS;
    let mut p = vec![10];
    p.extend_from_slice(b"8.4.0-fake\0");
    p.extend_from_slice(&7u32.to_le_bytes());
    p.extend_from_slice(&NONCE[..8]);
    p.push(0);
    p.extend_from_slice(&(caps as u16).to_le_bytes());
    p.push(45);
    p.extend_from_slice(&2u16.to_le_bytes());
    p.extend_from_slice(&((caps >> 16) as u16).to_le_bytes());
    p.push(21);
    p.extend_from_slice(&[0; 10]);
    p.extend_from_slice(&NONCE[8..]);
    p.push(0);
    p.extend_from_slice(plugin.as_bytes());
    p.push(0);
    p
}

const OK: &[u8] = &[0, 0, 0, 2, 0, 0, 0];

/// The auth response inside a HandshakeResponse41 built by our client
/// (lenenc length, as the fake offers PLUGIN_AUTH_LENENC_CLIENT_DATA).
fn auth_response(p: &[u8]) -> (String, Vec<u8>) {
    let rest = &p[32..];
    let nul = rest.iter().position(|&b| b == 0).unwrap();
    let user = String::from_utf8(rest[..nul].to_vec()).unwrap();
    let len = rest[nul + 1] as usize;
    (user, rest[nul + 2..nul + 2 + len].to_vec())
}

/// Answers the ping, then expects COM_QUIT.
fn serve_ping(s: &mut UnixStream) {
    assert_eq!(recv(s, 0), vec![wire::COM_PING]);
    send(s, OK, 1);
    assert_eq!(recv(s, 0), vec![wire::COM_QUIT]);
}

#[test]
fn caching_sha2_fast_and_full_authentication() {
    // Fast: the server has the account's hash cached.
    let fast = Fake::new("sha2-fast", |mut s| {
        send(&mut s, &greeting(wire::CACHING_SHA2_PASSWORD), 0);
        let (user, scramble) = auth_response(&recv(&mut s, 1));
        assert_eq!(user, MONITOR_USER);
        assert_eq!(scramble, wire::caching_sha2_scramble(b"pw", NONCE));
        send(&mut s, &[wire::AUTH_MORE_DATA, wire::FAST_AUTH_SUCCESS], 2);
        send(&mut s, OK, 3);
        serve_ping(&mut s);
    });
    let h = fast.check("pw");
    assert!(
        matches!(&h, Health::Healthy { server_version, .. } if server_version == "8.4.0-fake"),
        "{h}"
    );
    fast.join();

    // Full: not cached; over a unix socket the password goes in clear.
    let full = Fake::new("sha2-full", |mut s| {
        send(&mut s, &greeting(wire::CACHING_SHA2_PASSWORD), 0);
        recv(&mut s, 1);
        send(
            &mut s,
            &[wire::AUTH_MORE_DATA, wire::PERFORM_FULL_AUTHENTICATION],
            2,
        );
        assert_eq!(recv(&mut s, 3), b"pw\0");
        send(&mut s, OK, 4);
        serve_ping(&mut s);
    });
    let h = full.check("pw");
    assert!(h.is_healthy(), "{h}");
    full.join();
}

#[test]
fn auth_switch_to_native_password() {
    let f = Fake::new("switch", |mut s| {
        send(&mut s, &greeting(wire::CACHING_SHA2_PASSWORD), 0);
        recv(&mut s, 1);
        let new_nonce = b"ZYXWVUTSRQPONMLKJIHG";
        let mut switch = vec![0xfe];
        switch.extend_from_slice(b"mysql_native_password\0");
        switch.extend_from_slice(new_nonce);
        switch.push(0);
        send(&mut s, &switch, 2);
        assert_eq!(
            recv(&mut s, 3),
            wire::native_password_scramble(b"pw", new_nonce)
        );
        send(&mut s, OK, 4);
        serve_ping(&mut s);
    });
    let h = f.check("pw");
    assert!(h.is_healthy(), "{h}");
    f.join();
}

#[test]
fn garbage_is_failing_never_a_panic() {
    // Not the MySQL protocol at all.
    let f = Fake::new("http", |mut s| {
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
    });
    let h = f.check("pw");
    assert!(
        matches!(&h, Health::Failing(m) if m.contains("not the MySQL protocol")),
        "{h}"
    );
    f.join();

    // Well framed, but not a greeting.
    let f = Fake::new("framed", |mut s| send(&mut s, &[0x42; 40], 0));
    let h = f.check("pw");
    assert!(
        matches!(&h, Health::Failing(m) if m.contains("protocol version 66")),
        "{h}"
    );
    f.join();

    // A greeting cut short by the connection closing.
    let f = Fake::new("cut", |mut s| {
        let g = wire::frame(&greeting(wire::NATIVE_PASSWORD), 0).0;
        s.write_all(&g[..30]).unwrap();
    });
    let h = f.check("pw");
    assert!(
        matches!(&h, Health::Failing(m) if m.contains("part-way")),
        "{h}"
    );
    f.join();

    // Random bytes, many times over: whatever they are, an answer.
    for seed in 0..20u64 {
        let bytes = common::random_bytes(200, seed + 1);
        let f = Fake::new(&format!("random{seed}"), move |mut s| {
            let _ = s.write_all(&bytes);
        });
        let h = f.check("pw");
        assert!(!h.is_healthy(), "random bytes (seed {seed}) were healthy");
        f.join();
    }
}

#[test]
fn closing_at_once_is_starting_and_silence_is_hung() {
    let f = Fake::new("close", drop);
    let h = f.check("pw");
    assert!(matches!(h, Health::Starting(_)), "{h}");
    f.join();

    let f = Fake::new("silent", |mut s| {
        // Hold the connection, saying nothing, until the client gives up.
        let mut b = [0u8; 16];
        let _ = s.read(&mut b);
    });
    let start = Instant::now();
    let h = f.check("pw");
    let took = start.elapsed();
    assert!(
        matches!(&h, Health::Hung(m) if m.contains("greeting")),
        "{h}"
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_millis(1300),
        "{took:?}"
    );
    f.join();
}

#[test]
fn server_errors_in_place_of_the_greeting_and_at_the_ping() {
    let f = Fake::new("too-many", |mut s| {
        send(&mut s, b"\xff\x10\x04Too many connections", 0);
    });
    let h = f.check("pw");
    assert!(
        matches!(&h, Health::Failing(m) if m.contains("1040") && m.contains("max_connections")),
        "{h}"
    );
    f.join();

    let f = Fake::new("shutdown", |mut s| {
        send(&mut s, &greeting(wire::NATIVE_PASSWORD), 0);
        recv(&mut s, 1);
        send(&mut s, OK, 2);
        assert_eq!(recv(&mut s, 0), vec![wire::COM_PING]);
        send(&mut s, b"\xff\x1d\x04#08S01Server shutdown in progress", 1);
    });
    let h = f.check("pw");
    assert!(
        matches!(&h, Health::Starting(m) if m.contains("1053")),
        "{h}"
    );
    f.join();
}
