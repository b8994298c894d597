//! systemd's notify protocol, against a notify socket of our own as
//! systemd would hold it: READY=1 once running, STATUS= with the role,
//! WATCHDOG=1 at half of WATCHDOG_USEC, STOPPING=1 on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Pair, hadb_bin, run};

/// Every message that arrives within `for_`.
fn collect(sock: &UnixDatagram, for_: Duration) -> Vec<String> {
    let end = Instant::now() + for_;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        sock.set_read_timeout(Some(
            end.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))
        .unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    got
}

#[test]
fn ready_status_watchdog_and_stopping() {
    let p = Pair::new("systemd", "sync", 16 << 20);
    let path = p.dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let config = p.config(0);
    let log = std::fs::File::create(p.dir.join("a.log")).unwrap();
    let mut child = Command::new(hadb_bin())
        .args([
            "--config",
            config.to_str().unwrap(),
            "--cmdline",
            "none",
            "run",
        ])
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "600000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let got = collect(&sock, Duration::from_millis(2000));
    let all = got.join("|");
    assert!(
        got.first().is_some_and(|m| m.starts_with("READY=1")),
        "{all}"
    );
    assert!(
        got.iter().any(|m| m.contains("STATUS=secondary")),
        "STATUS says the role: {all}"
    );
    // Every 300 ms (half of 600 ms) while the volume answers: about six in
    // two seconds.
    let pings = got.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!((3..=9).contains(&pings), "{pings} watchdog pings: {all}");

    // A hung daemon stops pinging: SIGSTOP it, nothing arrives.
    let pid = child.id().to_string();
    run(Command::new("kill").args(["-STOP", &pid]));
    let quiet = collect(&sock, Duration::from_millis(900));
    assert!(quiet.is_empty(), "pings from a stopped daemon: {quiet:?}");
    run(Command::new("kill").args(["-CONT", &pid]));

    run(Command::new("kill").args(["-TERM", &pid]));
    let got = collect(&sock, Duration::from_millis(1500));
    assert!(
        got.iter().any(|m| m.starts_with("STOPPING=1")),
        "no STOPPING=1 on SIGTERM: {}",
        got.join("|")
    );
    assert!(child.wait().unwrap().success());
}
