//! The `ssh` fence method and fence levels with real daemons and a real
//! OpenSSH server (tests/common/sshd.rs). The fence command stands in for
//! sysrq's reboot — never run here — by killing the peer's `hadb run`
//! through a pid file: its effect is a process the test sees die by
//! SIGKILL. The peer's "partition" is a SIGSTOP: alive, silent on every
//! ring, reachable by ssh (its sshd is another process).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/netns.rs"]
mod netns;
#[path = "common/sshd.rs"]
mod sshd;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{NAMES, Pair, free_port, qemu_io, qemu_io_spawn, require};
use netns::Net;
use serde_json::Value;
use sshd::Sshd;

const SIZE: u64 = 16 << 20;

/// The fence's key pair and the peer's host key, in the pair's directory.
struct Keys {
    key: PathBuf,
    authorized: PathBuf,
    known_hosts: PathBuf,
}

fn keys(p: &Pair) -> Keys {
    sshd::require_openssh();
    let key = p.dir.join("fence_key");
    sshd::keygen(&key);
    let authorized = p.dir.join("authorized_keys");
    std::fs::copy(key.with_extension("pub"), &authorized).unwrap();
    Keys {
        key,
        authorized,
        known_hosts: p.dir.join("known_hosts"),
    }
}

/// Node `n`'s `[fencing]` tables: `methods`, ssh to `port` running
/// `command`, and `more` (another table) after them.
fn fencing(k: &Keys, methods: &str, port: u16, command: &str, more: &str) -> String {
    format!(
        r#"[fencing]
methods = {methods}
fence_delay = "2s"
[fencing.ssh]
identity_file = "{key}"
known_hosts_file = "{known}"
port = {port}
connect_timeout = "3s"
confirm_timeout = "3s"
command = "{command}"
{more}
"#,
        key = k.key.display(),
        known = k.known_hosts.display(),
    )
}

/// Node `n` of a loopback pair with the manager on, fencing by `tables`.
fn configure(p: &Pair, n: usize, tables: &str) {
    let text = p
        .config_text(n, "sync")
        .replace("[manager]\nmaintenance = true\n", tables);
    std::fs::write(p.config(n), text).unwrap();
}

/// The peer's sshd on a loopback port, its host key the one known.
fn loopback_sshd(p: &Pair, k: &Keys) -> Sshd {
    let sshd = Sshd::start(
        &p.dir,
        "peer",
        "127.0.0.1".parse().unwrap(),
        free_port(),
        None,
        &k.authorized,
    );
    std::fs::write(&k.known_hosts, sshd.known_host()).unwrap();
    sshd
}

/// Starts both, makes `a` primary, writes each daemon's pid file.
fn up(p: &mut Pair) {
    p.start(0);
    p.start(1);
    p.wait(0, "peer connected", |s| {
        s.is_some_and(|s| !s["volume"]["peer"].is_null())
    });
    p.primary(0);
    p.wait_in_sync(0);
    for n in 0..2 {
        let pid = p.procs[n].as_ref().unwrap().id();
        std::fs::write(pid_file(p, n), pid.to_string()).unwrap();
    }
}

fn pid_file(p: &Pair, n: usize) -> PathBuf {
    p.dir.join(format!("{}.pid", NAMES[n]))
}

/// The stand-in for sysrq's reboot: node `n`'s daemon dies at once.
fn kill_command(p: &Pair, n: usize) -> String {
    format!("kill -9 $(cat {})", pid_file(p, n).display())
}

fn signal(p: &Pair, n: usize, sig: &str) {
    let pid = p.procs[n].as_ref().unwrap().id().to_string();
    common::run(Command::new("kill").args([sig, &pid]));
}

/// Whether node `n`'s daemon died by SIGKILL, waiting up to 5 s.
fn killed(p: &mut Pair, n: usize) -> bool {
    let child = p.procs[n].as_mut().unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.signal() == Some(9);
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn still_running(p: &mut Pair, n: usize) -> bool {
    p.procs[n].as_mut().unwrap().try_wait().unwrap().is_none()
}

fn attempts(s: &Value) -> Vec<(String, String)> {
    s["manager"]["fence_attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["method"].as_str().unwrap().to_owned(),
                a["result"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Positions of `needles` in the log, which must appear in that order.
fn in_order(log: &str, needles: &[&str]) {
    let mut last = 0;
    for n in needles {
        let at = log
            .find(n)
            .unwrap_or_else(|| panic!("`{n}` is not in the log:\n{log}"));
        assert!(at >= last, "`{n}` came before what precedes it:\n{log}");
        last = at;
    }
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn an_ssh_fence_stops_a_silent_primary_and_the_survivor_takes_over_with_its_writes() {
    require("qemu-io", "qemu-utils");
    let mut p = Pair::new("sshfence", "sync", SIZE);
    let k = keys(&p);
    let sshd = loopback_sshd(&p, &k);
    for n in 0..2 {
        // As after sysrq's reboot, the session dies with the peer: the
        // shell's parent is the session's sshd. No exit status comes back.
        let command = format!("{}; kill -9 $PPID", kill_command(&p, 1 - n));
        configure(&p, n, &fencing(&k, "[\"ssh\"]", sshd.port, &command, ""));
    }
    up(&mut p);
    qemu_io(&p.uri(0), &["write -P 0x5a 0 1m", "flush"]);
    // a goes silent on every ring, alive: b waits fence_delay, logs in to
    // a's sshd, and the command kills a; only then does b take over.
    signal(&p, 0, "-STOP");
    let t0 = Instant::now();
    p.wait(1, "primary", |s| {
        s.is_some_and(|s| s["volume"]["role"] == "primary")
    });
    let took = t0.elapsed();
    assert!(killed(&mut p, 0), "the fence command did not kill a");
    let log = p.log(1);
    in_order(
        &log,
        &[
            "fence: a: trying ssh",
            "ssh delivered the command",
            "ssh confirmed after",
            "fence confirmed",
            "volume: promoted to primary",
        ],
    );
    let s = p.status(1).unwrap();
    assert_eq!(attempts(&s), [("ssh".into(), "confirmed".into())], "{s}");
    let a = &s["manager"]["fence_attempts"][0];
    // The confirmation waited for a second of silence after the command.
    assert!(a["duration_ms"].as_u64().unwrap() >= 1000, "{a}");
    let detail = a["detail"].as_str().unwrap();
    assert!(
        detail.contains("connection dropped") && detail.contains("silent on every ring"),
        "{a}"
    );
    assert!(sshd.log().contains("Accepted publickey for root"));
    qemu_io(&p.uri(1), &["read -P 0x5a 0 1m"]);
    eprintln!(
        "ssh fence: a silent at 0, b primary after {:.1}s (fence_delay 2s, heartbeat timeout 1s); the attempt took {} ms",
        took.as_secs_f64(),
        a["duration_ms"]
    );
}

#[test]
fn hadb_fence_node_asks_first_and_counts_only_a_peer_that_falls_silent() {
    let mut p = Pair::new("sshnow", "sync", SIZE);
    let k = keys(&p);
    let sshd = loopback_sshd(&p, &k);
    // The command kills a only once the test arms it: first it does
    // nothing, and exits 0.
    let armed = p.dir.join("armed");
    for n in 0..2 {
        let command = format!(
            "if test -e {}; then {}; fi",
            armed.display(),
            kill_command(&p, 1 - n)
        );
        configure(&p, n, &fencing(&k, "[\"ssh\"]", sshd.port, &command, ""));
    }
    up(&mut p);

    // No terminal to ask on, no --yes: nothing is done.
    let out = p.hadb(1, &["fence", "a"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--yes"), "{}", text(&out));
    assert_eq!(p.status(1).unwrap()["manager"]["fences_requested"], 0);
    let out = p.hadb(1, &["fence", "b", "--yes"]);
    assert!(
        text(&out).contains("not this node's peer"),
        "{}",
        text(&out)
    );

    // The command runs and exits 0, but a goes on heartbeating: no proof.
    let t0 = Instant::now();
    let out = p.hadb(1, &["fence", "a", "--yes"]);
    let took = t0.elapsed();
    assert!(!out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("FAILED") && said.contains("still heard"),
        "{said}"
    );
    assert!(
        took >= Duration::from_secs(3),
        "it waited confirm_timeout: {took:?}"
    );
    assert!(still_running(&mut p, 0));
    let s = p.wait(1, "the operator's failed fence cleared", |s| {
        s.is_some_and(|s| s["manager"]["fence"]["state"] == "none")
    });
    let s = s.unwrap();
    assert_eq!(attempts(&s), [("ssh".into(), "failed".into())], "{s}");
    assert_eq!(s["volume"]["role"], "secondary");
    assert_eq!(p.status(0).unwrap()["volume"]["role"], "primary");

    // Armed: a dies, falls silent, and b takes over on the operator's word
    // without waiting fence_delay.
    std::fs::write(&armed, "").unwrap();
    let out = p.hadb(1, &["fence", "a", "--yes"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("a is fenced (confirmed by ssh)"),
        "{}",
        text(&out)
    );
    assert!(killed(&mut p, 0));
    p.wait(1, "primary", |s| {
        s.is_some_and(|s| s["volume"]["role"] == "primary")
    });
    let s = p.status(1).unwrap();
    assert_eq!(attempts(&s), [("ssh".into(), "confirmed".into())], "{s}");
    assert_eq!(s["manager"]["fences_requested"], 2, "{s}");
}

#[test]
fn an_unreachable_peer_is_a_failed_ssh_fence_and_nobody_is_promoted() {
    let dead_port = free_port();
    let mut p = Pair::new("sshdown", "sync", SIZE);
    let k = keys(&p);
    // A host key for the peer, but no sshd behind the port.
    let other = p.dir.join("other_host_key");
    sshd::keygen(&other);
    let key = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let key: Vec<&str> = key.split_whitespace().take(2).collect();
    std::fs::write(
        &k.known_hosts,
        format!("[127.0.0.1]:{dead_port} {}\n", key.join(" ")),
    )
    .unwrap();
    for n in 0..2 {
        let command = kill_command(&p, 1 - n);
        configure(&p, n, &fencing(&k, "[\"ssh\"]", dead_port, &command, ""));
    }
    up(&mut p);
    signal(&p, 0, "-STOP");
    let s = p
        .wait(1, "the ssh attempt failed", |s| {
            s.is_some_and(|s| {
                s["manager"]["fence_attempts"][0]["result"] == "failed"
                    && s["manager"]["fence_running"] == false
            })
        })
        .unwrap();
    let a = &s["manager"]["fence_attempts"][0];
    assert_eq!(a["method"], "ssh");
    assert!(
        a["detail"].as_str().unwrap().contains("Connection refused"),
        "{a}"
    );
    assert!(a["duration_ms"].as_u64().unwrap() < 3000, "{a}");
    assert_eq!(s["manager"]["fence"]["state"], "pending", "{s}");
    // However long: no promotion without a confirmed fence.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        assert_eq!(p.status(1).unwrap()["volume"]["role"], "secondary");
        std::thread::sleep(Duration::from_millis(200));
    }
    let human = text(&p.hadb(1, &["status"]));
    assert!(
        human.contains("FENCE PENDING of a") && human.contains("fence ssh FAILED"),
        "{human}"
    );
    assert!(p.log(1).contains("every method failed to fence a"));
    let counted = &s["manager"]["fence_attempt_totals"][0];
    assert_eq!(
        (&counted["method"], &counted["result"], &counted["count"]),
        (&Value::from("ssh"), &Value::from("failed"), &Value::from(1))
    );
}

#[test]
fn fence_test_checks_each_method_without_fencing_and_fails_loudly() {
    let mut p = Pair::new("sshtest", "sync", SIZE);
    let k = keys(&p);
    let sshd = loopback_sshd(&p, &k);
    let dead_port = free_port();
    std::fs::write(
        &k.known_hosts,
        sshd.known_host()
            + &sshd
                .known_host()
                .replace(&sshd.port.to_string(), &dead_port.to_string()),
    )
    .unwrap();
    // a reaches the peer's sshd; b is pointed at a port nobody serves.
    // Both keep the manager in maintenance: nothing else happens.
    for (n, (methods, port)) in [
        ("[\"ssh\", \"manual\"]", sshd.port),
        ("[\"ssh\"]", dead_port),
    ]
    .into_iter()
    .enumerate()
    {
        let command = kill_command(&p, 1 - n);
        let tables = fencing(&k, methods, port, &command, "");
        configure(&p, n, &format!("[manager]\nmaintenance = true\n{tables}"));
    }
    p.start(0);
    p.start(1);
    for n in 0..2 {
        let pid = p.procs[n].as_ref().unwrap().id();
        std::fs::write(pid_file(&p, n), pid.to_string()).unwrap();
    }
    let out = p.hadb(0, &["fence", "test"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    let lines: Vec<&str> = said.lines().collect();
    assert!(
        lines[0].starts_with("ssh: ok") && lines[0].contains("ran `true`"),
        "{said}"
    );
    assert!(lines[1].starts_with("manual: ok"), "{said}");
    assert!(sshd.log().contains("Accepted publickey for root"));
    assert!(still_running(&mut p, 1), "the test fenced the peer");

    let out = p.hadb(1, &["fence", "test"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("ssh: FAILED") && said.contains("Connection refused"),
        "{said}"
    );
    assert!(said.contains("manual: ok"), "{said}");
    assert!(said.contains("1 fence method(s) failed the test"), "{said}");
    assert!(still_running(&mut p, 0));
}

/// The Azure stand-in (tests/support/azure_standin.py): its process, and
/// the `[fencing.azure]` table that points at it.
fn azure_standin(dir: &Path, args: &[&str]) -> (Child, String) {
    require("python3", "python3");
    require("openssl", "openssl");
    let dir = dir.join("azure");
    std::fs::create_dir_all(&dir).unwrap();
    let child = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/support/azure_standin.py"
        ))
        .arg("--dir")
        .arg(&dir)
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Some(child);
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(dir.join("ready.json")) {
            let v: Value = serde_json::from_str(&text).unwrap();
            let table = format!(
                "[fencing.azure]\nmetadata_endpoint = \"http://127.0.0.1:{}\"\nlogin_endpoint = \"https://127.0.0.1:{arm}\"\nmanagement_endpoint = \"https://127.0.0.1:{arm}\"\nca_file = \"{}\"\npower_timeout = \"10s\"\n",
                v["imds"],
                v["ca"].as_str().unwrap(),
                arm = v["arm"],
            );
            return (child.take().unwrap(), table);
        }
        if let Some(status) = child.as_mut().unwrap().try_wait().unwrap() {
            panic!("the stand-in exited before it was ready: {status}");
        }
        assert!(Instant::now() < end, "the stand-in is not ready after 30s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills a child process when dropped.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn levels_an_azure_refusal_falls_through_to_ssh() {
    let mut p = Pair::new("levels", "sync", SIZE);
    let k = keys(&p);
    let sshd = loopback_sshd(&p, &k);
    // The managed identity may read but not power off: 403.
    let (standin, azure) = azure_standin(&p.dir, &["--vm", "a", "--vm", "b", "--read-only", "msi"]);
    let _standin = Reap(standin);
    for n in 0..2 {
        let command = kill_command(&p, 1 - n);
        let tables = fencing(&k, "[\"azure\", \"ssh\"]", sshd.port, &command, &azure);
        configure(&p, n, &tables);
    }
    up(&mut p);
    signal(&p, 0, "-STOP");
    p.wait(1, "primary", |s| {
        s.is_some_and(|s| s["volume"]["role"] == "primary")
    });
    assert!(killed(&mut p, 0), "ssh's command did not kill a");
    let s = p.status(1).unwrap();
    assert_eq!(
        attempts(&s),
        [
            ("azure".into(), "failed".into()),
            ("ssh".into(), "confirmed".into())
        ],
        "{s}"
    );
    let refused = s["manager"]["fence_attempts"][0]["detail"]
        .as_str()
        .unwrap();
    assert!(refused.contains("403"), "{refused}");
    in_order(
        &p.log(1),
        &[
            "trying azure (level 1 of 2)",
            "azure FAILED after",
            "trying ssh (level 2 of 2)",
            "ssh confirmed after",
            "volume: promoted to primary",
        ],
    );
}

/// The fence race. Two nodes in network namespaces, both alive, joined by
/// ring0 (replication and heartbeats) and ring1 (heartbeats), and a third
/// link that carries only ssh: a management network, which is what lets
/// an ssh fence through a partition of the rings at all (over the rings'
/// own network both fences would fail, and nobody would promote — safe,
/// but no race to see). Each node's sshd listens in its own namespace on
/// that link, port 22. Both rings are cut at once: each node loses the
/// other, and each fences the other over ssh. The primary fences at once;
/// the secondary only after fence_delay, by which time it is dead.
#[test]
fn a_fence_race_over_ssh_leaves_exactly_the_primary_standing() {
    require("qemu-io", "qemu-utils");
    let net = Net::new("sshrace", 3);
    let mut p = Pair::new("sshrace", "sync", SIZE);
    let k = keys(&p);
    let sshds: Vec<Sshd> = (0..2)
        .map(|n| {
            Sshd::start(
                &p.dir,
                NAMES[n],
                net.addr(n, 2),
                22,
                Some(net.ns(n)),
                &k.authorized,
            )
        })
        .collect();
    let known: String = sshds.iter().map(Sshd::known_host).collect();
    std::fs::write(&k.known_hosts, known).unwrap();
    for (n, me) in NAMES.iter().enumerate() {
        let d = p.dir.display().to_string();
        let text = format!(
            r#"cluster = "test"
node = "{me}"
key_file = "{d}/{me}.key"
# Each node its own, as on two machines.
state_dir = "{d}/{me}.state"

[nodes.a]
address = "{a0}"
links = ["{a1}"]
ssh_address = "{a2}"

[nodes.b]
address = "{b0}"
links = ["{b1}"]
ssh_address = "{b2}"

[volume]
device = "{d}/{me}.img"
mode = "sync"
ack_timeout = "1s"
nbd_socket = "{d}/{me}.nbd"

[control]
socket = "{d}/{me}.ctl"

[fencing]
methods = ["ssh"]
fence_delay = "3s"
[fencing.ssh]
identity_file = "{key}"
known_hosts_file = "{known}"
command = "{command}"
"#,
            a0 = net.addr(0, 0),
            a1 = net.addr(0, 1),
            a2 = net.addr(0, 2),
            b0 = net.addr(1, 0),
            b1 = net.addr(1, 1),
            b2 = net.addr(1, 2),
            key = k.key.display(),
            known = k.known_hosts.display(),
            command = kill_command(&p, 1 - n),
        );
        std::fs::write(p.config(n), text).unwrap();
        p.netns[n] = Some(net.ns(n).to_owned());
    }
    up(&mut p);
    qemu_io(&p.uri(0), &["write -P 0x11 0 2m", "flush"]);

    net.link_down(0);
    net.link_down(1);
    let t0 = Instant::now();
    // A write issued now waits for the peer, then for the fence.
    let mut writer = qemu_io_spawn(&p.uri(0), &["write -P 0x22 4m 1m", "flush"]);
    assert!(killed(&mut p, 1), "a's fence did not kill b");
    let b_dead = t0.elapsed();
    let s = p
        .wait(0, "the fence confirmed", |s| {
            s.is_some_and(|s| s["manager"]["fence"]["state"] == "confirmed")
        })
        .unwrap();
    assert_eq!(attempts(&s), [("ssh".into(), "confirmed".into())], "{s}");
    assert!(writer.wait().unwrap().success(), "the held write failed");
    let acked = t0.elapsed();
    assert_eq!(p.status(0).unwrap()["volume"]["role"], "primary");
    assert!(
        !p.log(1).contains("promoted to primary"),
        "b became primary:\n{}",
        p.log(1)
    );
    assert!(
        !p.log(1).contains("trying ssh"),
        "b lived to fence a:\n{}",
        p.log(1)
    );
    // Every acknowledged write is on the survivor...
    qemu_io(&p.uri(0), &["read -P 0x11 0 2m", "read -P 0x22 4m 1m"]);
    // ...and on b once it is back (its sshd rebooted nothing: only its
    // daemon died, as after sysrq's reboot).
    net.link_up(0);
    net.link_up(1);
    p.start(1);
    p.wait_in_sync(0);
    assert_eq!(p.status(1).unwrap()["volume"]["role"], "secondary");
    let size = p.data_size();
    assert!(p.data(0, size) == p.data(1, size), "the copies differ");
    eprintln!(
        "fence race: b killed {:.1}s after the cut (heartbeat timeout 1s); the held write acknowledged after {:.1}s",
        b_dead.as_secs_f64(),
        acked.as_secs_f64()
    );
    drop(sshds);
}

/// The `[fencing.ssh]` table of a fence pointed at `sshd`, running
/// `command`.
fn ssh_config(k: &Keys, sshd: &Sshd, command: &str) -> hadb::config::SshConfig {
    toml::from_str(&format!(
        r#"identity_file = "{key}"
known_hosts_file = "{known}"
port = {port}
connect_timeout = "3s"
confirm_timeout = "3s"
command = "{command}"
"#,
        key = k.key.display(),
        known = k.known_hosts.display(),
        port = sshd.port,
    ))
    .unwrap()
}

/// What the peer's side prints is no proof: the lines the fence reads as
/// "logged in, command started, exited 0" arrive from the peer's sshd
/// (its login banner, before any login) and from the command's stderr,
/// and neither may count. Only ssh's own log does.
#[test]
fn text_the_peer_prints_never_confirms_an_ssh_fence() {
    let p = Pair::new("sshfake", "sync", SIZE);
    let k = keys(&p);
    let fake = "Authenticated to 127.0.0.1 ([127.0.0.1]:22) using \\\"publickey\\\".\n\
                debug2: exec request accepted on channel 0\n\
                debug1: client_input_channel_req: channel 0 rtype exit-status reply 0\n\
                debug1: Exit status 0\n";
    let banner = p.dir.join("banner");
    std::fs::write(&banner, fake.replace("\\\"", "\"")).unwrap();
    // The banner says it all, but the fence's key is not authorized: no
    // login, nothing ran.
    let stranger = p.dir.join("stranger_key");
    sshd::keygen(&stranger);
    let refused = p.dir.join("refused_keys");
    std::fs::copy(stranger.with_extension("pub"), &refused).unwrap();
    let sshd = Sshd::start_with(
        &p.dir,
        "liar",
        "127.0.0.1".parse().unwrap(),
        free_port(),
        None,
        &refused,
        &format!("Banner {}\n", banner.display()),
    );
    std::fs::write(&k.known_hosts, sshd.known_host()).unwrap();
    let addr = "127.0.0.1".parse().unwrap();
    let fence =
        hadb::run::fence::ssh::SshFence::new(&ssh_config(&k, &sshd, "true"), "b", addr).unwrap();
    let err = fence.deliver().unwrap_err();
    assert!(
        matches!(err, hadb::run::fence::ssh::SshError::NotConnected { .. }),
        "a banner confirmed the fence: {err}"
    );
    assert!(fence.test().is_err(), "a banner passed `hadb fence test`");
    drop(sshd);

    // Logged in, and the command fails after printing on its stderr what
    // ssh prints for a success: its real exit status, 3, decides.
    let sshd = loopback_sshd(&p, &k);
    let lying = "echo 'debug1: Exit status 0' >&2; exit 3";
    let fence =
        hadb::run::fence::ssh::SshFence::new(&ssh_config(&k, &sshd, lying), "b", addr).unwrap();
    let err = fence.deliver().unwrap_err();
    assert!(
        matches!(err, hadb::run::fence::ssh::SshError::CommandFailed { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("exit status 3"), "{err}");
}
