//! The network-namespace harness itself: links that carry packets, break
//! and heal; processes and sockets on either side; netem or a clear
//! refusal; nothing left behind. Needs root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/netns.rs"]
mod netns;

use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};

use netns::Net;

fn netns_list() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Kills the receiver if the test fails before it exits, so that it does
/// not hold the namespace.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn links_break_and_heal() {
    let net = Net::new("links_break_and_heal", 2);
    let names = [net.ns(0).to_string(), net.ns(1).to_string()];
    assert!(netns_list().contains(&names[0]));

    for link in 0..2 {
        assert!(net.ping(0, link), "a -> b over link {link}");
        assert!(net.ping(1, link), "b -> a over link {link}");
    }

    net.link_down(0);
    assert!(!net.ping(0, 0), "link 0 is down, yet a ping crossed it");
    assert!(net.ping(0, 1), "link 1 stopped with link 0");
    net.link_up(0);
    assert!(net.ping(0, 0), "link 0 did not come back");

    // A process in b (via `cmd`: it binds b's address, which exists only
    // there) receives a datagram a socket in a sends.
    let python = Command::new("sh")
        .args(["-c", "command -v python3"])
        .output()
        .unwrap();
    assert!(
        python.status.success(),
        "`python3` is not installed: apt-get install python3-minimal"
    );
    let port = 7000;
    let receiver = net
        .cmd(1, "python3")
        .args([
            "-u",
            "-c",
            "import socket, sys\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.bind((sys.argv[1], int(sys.argv[2])))\n\
             s.settimeout(5)\n\
             print('ready')\n\
             data, peer = s.recvfrom(100)\n\
             print(data.decode(), peer[0])\n",
            &net.addr(1, 1).to_string(),
            &port.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut receiver = Reaped(receiver);
    let mut lines = BufReader::new(receiver.0.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    let (from, to) = (net.addr(0, 1), net.addr(1, 1));
    net.in_ns(0, || {
        let s = UdpSocket::bind((from, 0)).unwrap();
        s.send_to(b"hello", (to, port)).unwrap();
    });
    assert_eq!(lines.next().unwrap().unwrap(), format!("hello {from}"));
    assert!(receiver.0.wait().unwrap().success());

    match net.netem_available() {
        Ok(()) => {
            net.loss(1, 100.0, 0, 0);
            assert!(!net.ping(0, 1), "100% loss on link 1, yet a ping crossed");
            assert!(net.ping(0, 0), "loss on link 1 reached link 0");
            net.clear_loss(1);
            assert!(net.ping(0, 1), "link 1 still lossy after clear_loss");
        }
        Err(why) => {
            // No netem: `loss` must refuse and say what is missing.
            eprintln!("host_netns: no netem on this host, checking the refusal: {why}");
            let refused =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| net.loss(1, 100.0, 0, 0)))
                    .expect_err("loss succeeded where netem is unavailable");
            let msg = refused
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_default();
            assert!(msg.contains("sch_netem"), "unhelpful refusal: {msg}");
        }
    }

    drop(receiver);
    drop(net);
    let left = netns_list();
    for name in &names {
        assert!(!left.contains(name.as_str()), "{name} outlived its Net");
    }
}

#[test]
fn nets_side_by_side_are_apart() {
    // Left by a crashed run: process 4194305 cannot exist (Linux's pid
    // limit is 2^22), so the next Net must sweep it away.
    let stale = "hadb-stale-1z142rk-a";
    let out = Command::new("ip")
        .args(["netns", "add", stale])
        .output()
        .unwrap();
    assert!(
        out.status.success() || String::from_utf8_lossy(&out.stderr).contains("File exists"),
        "ip netns add {stale}: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The same test name twice in one process, alive together.
    let one = Net::new("side_by_side", 1);
    let two = Net::new("side_by_side", 1);
    assert!(!netns_list().contains(stale), "stale namespace not swept");
    assert_ne!(one.ns(0), two.ns(0));
    assert_ne!(one.iface(0, 0), two.iface(0, 0));
    for net in [&one, &two] {
        assert!(net.iface(0, 0).len() <= 15, "{}", net.iface(0, 0));
        assert!(net.ping(0, 0));
    }
    // Breaking one leaves the other alone.
    one.link_down(0);
    assert!(!one.ping(0, 0));
    assert!(two.ping(0, 0));
}

#[test]
fn a_failing_test_leaves_nothing() {
    let mut names = Vec::new();
    let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let net = Net::new("failing", 1);
        names.extend([net.ns(0).to_string(), net.ns(1).to_string()]);
        panic!("the test fails with its Net alive");
    }));
    assert!(failed.is_err());
    assert_eq!(
        names.len(),
        2,
        "Net::new itself failed: see the panic above"
    );
    let left = netns_list();
    for name in &names {
        assert!(
            !left.contains(name.as_str()),
            "{name} outlived a failed test"
        );
    }
}
