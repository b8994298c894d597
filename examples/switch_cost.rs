//! What one wake-up round trip costs on this CPU: a byte sent back and forth
//! over pipes between two threads of one process, then between two
//! processes (the NBD hop's kind: application, hadb, the kernel's NBD
//! worker take turns). Under qemu TCG a switch between address spaces
//! empties the emulated TLB, which real CPUs do not pay for. Run inside
//! the test VMs by `tests/bench/vm-profile`, and on the host to compare.
//!
//!   switch_cost [ROUND_TRIPS]

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

fn echo(mut input: impl Read, mut output: impl Write) {
    let mut b = [0u8; 1];
    while input.read_exact(&mut b).is_ok() {
        if output.write_all(&b).and_then(|()| output.flush()).is_err() {
            return;
        }
    }
}

fn ping(n: u32, mut to: impl Write, mut from: impl Read) -> f64 {
    let mut b = [7u8; 1];
    let t = Instant::now();
    for _ in 0..n {
        to.write_all(&b).expect("switch_cost: write");
        to.flush().expect("switch_cost: flush");
        from.read_exact(&mut b).expect("switch_cost: read");
    }
    t.elapsed().as_secs_f64() * 1e6 / f64::from(n)
}

fn main() {
    let arg = std::env::args().nth(1);
    if arg.as_deref() == Some("echo") {
        echo(std::io::stdin().lock(), std::io::stdout().lock());
        return;
    }
    let n: u32 = arg.and_then(|a| a.parse().ok()).unwrap_or(2000);

    let (to_r, to_w) = std::io::pipe().expect("switch_cost: pipe");
    let (back_r, back_w) = std::io::pipe().expect("switch_cost: pipe");
    let echoer = std::thread::spawn(move || echo(to_r, back_w));
    let threads = ping(n, &to_w, &back_r);
    drop(to_w);
    let _ = echoer.join();

    let exe = std::env::current_exe().expect("switch_cost: own path");
    let mut child = Command::new(exe)
        .arg("echo")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("switch_cost: start the echo process");
    let to = child.stdin.take().expect("piped stdin");
    let from = child.stdout.take().expect("piped stdout");
    let processes = ping(n, to, from);
    let _ = child.wait();

    println!(
        "{n} round trips: {threads:.1} µs between two threads, {processes:.1} µs between two processes"
    );
}
