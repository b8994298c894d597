//! The serial console, on a pseudo-terminal standing in for /dev/ttyS0:
//! the prompt answers the CLI's commands, and line noise runs nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::Pair;

/// Reads from the console until `want` shows (or panics after 10 s).
fn read_until(port: &mut std::fs::File, want: &str, seen: &mut String) {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while !seen.contains(want) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the console never said {want:?}; it said:\n{seen}"
        );
        match port.read(&mut buf) {
            Ok(n) if n > 0 => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[test]
fn the_console_answers_commands_and_ignores_noise() {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    let tty = ptsname(&master, Vec::new()).unwrap();
    let tty = tty.to_str().unwrap().to_owned();
    let mut port = std::fs::File::from(master);

    let mut p = Pair::new("console", "sync", 16 << 20);
    let config = p
        .config_text(0, "sync")
        .replace("[control]\n", &format!("[control]\nconsole = \"{tty}\"\n"));
    std::fs::write(p.config(0), config).unwrap();
    p.start(0);

    let mut seen = String::new();
    read_until(&mut port, "hadb> ", &mut seen);
    port.write_all(b"status\r").unwrap();
    read_until(&mut port, "volume: secondary", &mut seen);
    read_until(&mut port, "manager:", &mut seen);

    // Line noise and escape sequences, then a line of garbage: nothing
    // runs, the prompt stays usable.
    seen.clear();
    port.write_all(b"\x00\xff\x1b[A\x1b[B\x07standby on\x15")
        .unwrap();
    port.write_all(b"rm -rf /\r").unwrap();
    read_until(&mut port, "unknown command", &mut seen);
    let s = p.status(0).unwrap();
    assert_eq!(s["manager"]["standby"], false, "noise ran a command");

    seen.clear();
    port.write_all(b"standby on\r").unwrap();
    read_until(&mut port, "hadb> ", &mut seen);
    p.wait(0, "standby on", |s| {
        s.is_some_and(|s| s["manager"]["standby"] == true)
    });
    seen.clear();
    port.write_all(b"help\r").unwrap();
    read_until(&mut port, "fence confirm NODE", &mut seen);
    p.kill(0);
}
