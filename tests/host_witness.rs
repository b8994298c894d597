//! The witness with real daemons: the pair in two network namespaces
//! joined by two rings, a witness (`role = "witness"`) in a third joined
//! to each node by a link of its own. A partition of the pair with both
//! nodes reaching the witness: the witness's vote goes to the primary,
//! the secondary never asks for a fence (no fence race) and never
//! promotes; the primary's fence (manual here) settles it. The primary
//! cut off from both: the vote goes to the secondary, which fences at
//! once (no fence_delay: the witness chose), while the primary, without
//! quorum, neither fences nor goes on alone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{Pair, hadb_bin, qemu_io, require, spawn_hadb_run};
use netns::Net;
use serde_json::Value;

const SIZE: u64 = 32 << 20;

/// The witness daemon; killed when dropped (before the `Net`).
struct WitnessDaemon {
    child: Child,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl WitnessDaemon {
    fn start(p: &Pair, net: &Net, addr: std::net::IpAddr) -> WitnessDaemon {
        use std::os::unix::fs::PermissionsExt;
        let d = &p.dir;
        let key = d.join("w.key");
        std::fs::copy(d.join("a.key"), &key).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = d.join("w.toml");
        std::fs::write(
            &config,
            format!(
                r#"cluster = "test"
node = "w"
role = "witness"
key_file = "{key}"
state_dir = "{d}/w.state"

[nodes.a]
address = "{a}"

[nodes.b]
address = "{b}"

[witness]
node = "w"
address = "{addr}"

[control]
socket = "{d}/w.ctl"
"#,
                key = key.display(),
                a = net.addr(0, 0),
                b = net.addr(1, 0),
                d = d.display()
            ),
        )
        .unwrap();
        let log = d.join("w.log");
        let child = spawn_hadb_run(
            Some(net.witness_ns()),
            &config,
            std::fs::File::create(&log).unwrap(),
        );
        let w = WitnessDaemon { child, config, log };
        w.wait("its control socket", |s| s.is_some());
        w
    }

    fn status(&self) -> Option<Value> {
        let out = Command::new(hadb_bin())
            .args([
                "--config",
                self.config.to_str().unwrap(),
                "--cmdline",
                "none",
            ])
            .args(["status", "--json"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).ok()
    }

    fn human(&self) -> String {
        let out = Command::new(hadb_bin())
            .args([
                "--config",
                self.config.to_str().unwrap(),
                "--cmdline",
                "none",
            ])
            .arg("status")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait(&self, what: &str, pred: impl Fn(Option<&Value>) -> bool) -> Option<Value> {
        let start = Instant::now();
        loop {
            let s = self.status();
            if pred(s.as_ref()) {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the witness never reached `{what}`; last status {s:?}\n--- w.log\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for WitnessDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field(p: &Pair, n: usize, a: &str, b: &str) -> Value {
    p.status(n).map_or(Value::Null, |s| s[a][b].clone())
}

#[test]
fn a_witness_settles_a_partition_without_a_fence_race() {
    require("qemu-io", "qemu-utils");
    let mut net = Net::new("witness", 2);
    let waddr = net.add_witness();
    let mut p = Pair::new("witness", "sync", SIZE);
    let extra = format!("\n[witness]\nnode = \"w\"\naddress = \"{waddr}\"\n");
    for n in 0..2 {
        std::fs::write(p.config(n), net.pair_config(&p.dir, n, &extra)).unwrap();
        p.netns[n] = Some(net.ns(n).to_owned());
    }
    let w = WitnessDaemon::start(&p, &net, waddr);
    p.start_connected();
    for n in 0..2 {
        p.wait(n, "the witness heard", |s| {
            s.is_some_and(|s| s["heartbeat"]["witness"]["heard"] == true)
        });
    }
    w.wait("both nodes heard, the vote nobody's", |s| {
        s.is_some_and(|s| {
            s["nodes"][0]["heard"] == true && s["nodes"][1]["heard"] == true && s["vote"].is_null()
        })
    });
    assert!(w.human().contains("vote: nobody's"), "{}", w.human());
    qemu_io(&p.uri(0), &["write -P 0x5a 0 4m", "flush"]);

    // The pair cut in two, both reaching the witness: the primary gets
    // the vote, the secondary knows it.
    net.link_down(0);
    net.link_down(1);
    p.wait(0, "a holds the vote", |s| {
        s.is_some_and(|s| s["heartbeat"]["witness"]["vote"] == "mine")
    });
    p.wait(1, "b sees the vote is a's", |s| {
        s.is_some_and(|s| s["heartbeat"]["witness"]["vote"] == "peers")
    });
    // Well past fence_delay (2 s): b never asks for a fence and never
    // promotes; a keeps the role and fences b (manual: pending).
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(6) {
        assert_eq!(
            field(&p, 1, "manager", "fence")["state"],
            "none",
            "{}",
            p.log(1)
        );
        assert_eq!(field(&p, 1, "volume", "role"), "secondary");
        assert_eq!(field(&p, 0, "volume", "role"), "primary");
        std::thread::sleep(Duration::from_millis(200));
    }
    let reason = field(&p, 1, "manager", "reason");
    assert!(
        reason.as_str().unwrap_or("").contains("no quorum"),
        "{reason}"
    );
    p.wait(0, "a's fence of b pending", |s| {
        s.is_some_and(|s| s["manager"]["fence"]["state"] == "pending")
    });
    let ws = w.status().unwrap();
    assert_eq!(ws["vote"], "a", "{ws}");
    assert!(w.human().contains("vote: given to a"), "{}", w.human());
    assert!(
        String::from_utf8_lossy(&p.hadb(1, &["status"]).stdout).contains("vote: peers"),
        "b's status shows the vote"
    );
    // The operator powers b off and confirms: a goes on alone.
    p.kill(1);
    let ok = p.hadb(0, &["fence", "confirm", "b"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    qemu_io(
        &p.uri(0),
        &["read -P 0x5a 0 4m", "write -P 0x6b 8m 1m", "flush"],
    );

    // Healed and b back: whole, the vote released.
    net.link_up(0);
    net.link_up(1);
    p.start(1);
    p.wait_in_sync(0);
    w.wait("the vote released", |s| {
        s.is_some_and(|s| s["vote"].is_null())
    });

    // Now the primary is cut off from its peer and from the witness: the
    // vote goes to b, which fences at once; a, without quorum, neither
    // fences nor goes on alone.
    net.witness_link(0, false);
    net.link_down(0);
    net.link_down(1);
    p.wait(1, "b holds the vote", |s| {
        s.is_some_and(|s| s["heartbeat"]["witness"]["vote"] == "mine")
    });
    p.wait(1, "b's fence of a pending", |s| {
        s.is_some_and(|s| s["manager"]["fence"]["state"] == "pending")
    });
    p.wait(0, "a without quorum", |s| {
        s.is_some_and(|s| {
            s["manager"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("no quorum"))
        })
    });
    assert_eq!(
        field(&p, 0, "manager", "fence")["state"],
        "none",
        "{}",
        p.log(0)
    );
    assert_eq!(w.status().unwrap()["vote"], "b");
    p.kill(0);
    let ok = p.hadb(1, &["fence", "confirm", "a"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    p.wait(1, "b primary", |s| {
        s.is_some_and(|s| s["volume"]["role"] == "primary")
    });
    qemu_io(&p.uri(1), &["read -P 0x5a 0 4m", "read -P 0x6b 8m 1m"]);
    p.kill(1);
}
