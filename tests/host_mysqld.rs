//! hadb supervising a real MariaDB (from Debian's packages) whose datadir
//! is a plain directory (`mysql.on_volume = false`: this host has no nbd
//! module): started on promotion and checked over its socket with the
//! MySQL protocol; a hung mysqld (SIGSTOP) is seen as hung and restarted;
//! kill -9 is restarted; past `max_restarts` the manager hands the primary
//! role to the peer, whose own MariaDB starts; a stop runs in order.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Pair;
use common::mariadb::{self, Mariadb};
use netns::Net;
use serde_json::Value;

const SIZE: u64 = 16 << 20;

/// Kills whatever still runs on a datadir when the test ends: hadb leaves
/// mysqld running when hadb itself is killed (so that a restart in place
/// keeps it), so a failed test would leak servers otherwise.
struct Reaper(Vec<PathBuf>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in pids_on(&self.0) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// Processes whose command line names one of `dirs`.
fn pids_on(dirs: &[PathBuf]) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if dirs
            .iter()
            .any(|d| cmdline.contains(&d.display().to_string()))
        {
            out.push(pid);
        }
    }
    out
}

/// The `[mysql]` section for a MariaDB installed by the test helper.
fn mysql_section(m: &Mariadb, dir: &Path, node: &str) -> String {
    let password = dir.join(format!("{node}.monitor"));
    std::fs::write(&password, mariadb::MONITOR_PASSWORD).unwrap();
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600)).unwrap();
    let command: Vec<String> = m
        .command_line()
        .into_iter()
        .map(|a| format!("{a:?}"))
        .collect();
    format!(
        r#"
[mysql]
datadir = "{datadir}"
on_volume = false
command = [{command}]
user = "root"
socket = "{socket}"
monitor_user = "{user}"
monitor_password_file = "{password}"
write_probe = "{probe}"
health_interval = "300ms"
health_timeout = "1s"
health_failures = 2
start_timeout = "60s"
stop_timeout = "20s"
max_restarts = 2
restart_window = "5m"
"#,
        datadir = m.datadir.display(),
        command = command.join(", "),
        socket = m.socket.display(),
        user = mariadb::MONITOR_USER,
        password = password.display(),
        probe = mariadb::WRITE_PROBE,
    )
}

fn mysqld(s: &Value) -> &Value {
    &s["mysqld"]
}

fn healthy_pid(p: &Pair, n: usize, what: &str) -> u32 {
    let s = p
        .wait(n, what, |s| {
            s.is_some_and(|s| mysqld(s)["state"] == "healthy")
        })
        .unwrap();
    mysqld(&s)["pid"].as_u64().unwrap() as u32
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// Polls for longer than `Pair::wait` allows: MariaDB's starts and
/// InnoDB's recovery take seconds each under TCG-less CI load.
fn wait_long(p: &Pair, n: usize, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        if let Some(s) = p.status(n)
            && pred(&s)
        {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "node {n} never reached `{what}`; status {:?}\n--- a.log\n{}\n--- b.log\n{}",
            p.status(n),
            p.log(0),
            p.log(1)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn hadb_starts_checks_restarts_and_stops_mysqld_in_order() {
    let m = Mariadb::install("hadbsup");
    let _reaper = Reaper(vec![m.dir.clone()]);
    let mut p = Pair::new("mysqldsup", "sync", SIZE);
    let text = p.config_text(0, "sync") + &mysql_section(&m, &p.dir, "a");
    std::fs::write(p.config(0), text).unwrap();
    p.start(0);
    p.start(1);
    p.wait(0, "peer connected", |s| {
        s.is_some_and(|s| !s["volume"]["peer"].is_null())
    });
    // Secondary: hadb does not run mysqld.
    let s = p.status(0).unwrap();
    assert_eq!(mysqld(&s)["state"], "stopped", "{s}");
    assert!(pids_on(std::slice::from_ref(&m.datadir)).is_empty());
    let probe_before = String::from_utf8_lossy(&p.hadb(0, &["status"]).stdout).to_string();
    assert!(probe_before.contains("mysqld: stopped"), "{probe_before}");

    p.primary(0);
    let first = healthy_pid(&p, 0, "mysqld healthy after promotion");
    assert!(
        p.log(0).contains(&format!("mysqld[{first}]:")),
        "mysqld's output is not in hadb's log:\n{}",
        p.log(0)
    );

    // Hung: stopped by SIGSTOP, it accepts nothing. Seen as hung within
    // an interval plus the timeout, then killed and started again.
    signal(first, "-STOP");
    let t = Instant::now();
    wait_long(&p, 0, "mysqld seen hung", |s| {
        mysqld(s)["health"]
            .as_str()
            .unwrap_or("")
            .starts_with("hung")
    });
    assert!(
        t.elapsed() < Duration::from_millis(300 + 1000 + 1500),
        "hung seen only after {:?}",
        t.elapsed()
    );
    let second = {
        let s = wait_long(&p, 0, "a new healthy mysqld", |s| {
            mysqld(s)["state"] == "healthy" && mysqld(s)["pid"].as_u64() != Some(first.into())
        });
        mysqld(&s)["pid"].as_u64().unwrap() as u32
    };
    assert!(
        !Path::new(&format!("/proc/{first}")).exists(),
        "the hung mysqld {first} still exists"
    );

    // kill -9: restarted.
    signal(second, "-KILL");
    let s = wait_long(&p, 0, "mysqld restarted after kill -9", |s| {
        mysqld(s)["state"] == "healthy" && mysqld(s)["pid"].as_u64() != Some(second.into())
    });
    assert_eq!(mysqld(&s)["restarts"], 2, "{s}");
    assert!(
        mysqld(&s)["last_failure"]
            .as_str()
            .unwrap()
            .contains("exited unexpectedly"),
        "{s}"
    );
    let third = mysqld(&s)["pid"].as_u64().unwrap() as u32;

    // A clean stop of hadb: mysqld goes first (SIGTERM, a clean
    // shutdown), then the volume.
    assert!(p.stop(0), "hadb did not exit cleanly:\n{}", p.log(0));
    assert!(
        !Path::new(&format!("/proc/{third}")).exists(),
        "mysqld {third} outlived hadb's stop"
    );
    let log = p.log(0);
    let stopped = log
        .find("mysqld: stopped")
        .expect("no `mysqld: stopped` in the log");
    let volume = log[stopped..].find("volume").is_some();
    assert!(volume, "the volume stopped before mysqld:\n{log}");
    assert!(
        m.log().contains("Shutdown complete"),
        "mysqld did not shut down cleanly:\n{}",
        m.log()
    );
}

#[test]
fn a_mysqld_that_keeps_failing_hands_the_primary_role_to_the_peer() {
    let net = Net::new("mysqlho", 1);
    let dbs = [Mariadb::install("hadbho-a"), Mariadb::install("hadbho-b")];
    let _reaper = Reaper(dbs.iter().map(|m| m.dir.clone()).collect());
    let mut p = Pair::new("mysqlho", "sync", SIZE);
    for n in 0..2 {
        let me = ["a", "b"][n];
        let text = net.pair_config(&p.dir, n, &mysql_section(&dbs[n], &p.dir, me));
        std::fs::write(p.config(n), text).unwrap();
        p.netns[n] = Some(net.ns(n).to_owned());
    }
    p.start_connected();
    let mut pid = healthy_pid(&p, 0, "a's mysqld healthy");
    // Two restarts are allowed; the third failure is one too many.
    for round in 1..=3 {
        signal(pid, "-KILL");
        if round == 3 {
            break;
        }
        let s = wait_long(&p, 0, "a's mysqld restarted", |s| {
            mysqld(s)["state"] == "healthy" && mysqld(s)["pid"].as_u64() != Some(pid.into())
        });
        pid = mysqld(&s)["pid"].as_u64().unwrap() as u32;
    }
    let s = wait_long(&p, 1, "b primary with a healthy mysqld", |s| {
        s["volume"]["role"] == "primary" && mysqld(s)["state"] == "healthy"
    });
    assert_eq!(s["volume"]["peer"]["role"], "secondary", "{s}");
    let a = wait_long(&p, 0, "a secondary", |s| s["volume"]["role"] == "secondary");
    assert_eq!(mysqld(&a)["state"], "failed", "{a}");
    assert!(
        a["manager"]["reason"]
            .as_str()
            .unwrap()
            .contains("mysqld failed here"),
        "{a}"
    );
    assert!(
        pids_on(std::slice::from_ref(&dbs[0].datadir)).is_empty(),
        "a's mysqld still runs after the handover"
    );
    let human = String::from_utf8_lossy(&p.hadb(0, &["status"]).stdout).to_string();
    assert!(human.contains("FAILED (`hadb mysql reset`"), "{human}");
    // The operator fixed it: a may be primary again, but b keeps the
    // role (no needless failback) and a's mysqld stays down.
    let out = p.hadb(0, &["mysql", "reset"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = wait_long(&p, 0, "a's failure forgotten", |s| {
        mysqld(s)["state"] == "stopped"
    });
    assert_eq!(a["volume"]["role"], "secondary", "{a}");
    assert_eq!(p.status(1).unwrap()["volume"]["role"], "primary");
}

#[test]
fn an_empty_datadir_waits_for_mysql_init_and_then_runs() {
    // A data directory made like a fresh volume's: empty but lost+found.
    let m = Mariadb::install("hadbinit");
    let _reaper = Reaper(vec![m.dir.clone()]);
    std::fs::remove_dir_all(&m.datadir).unwrap();
    std::fs::create_dir_all(m.datadir.join("lost+found")).unwrap();
    let mut p = Pair::new("mysqlinit", "sync", SIZE);
    let install = mariadb::tool("mariadb-install-db").display().to_string();
    let section = mysql_section(&m, &p.dir, "a")
        // Time enough to create the monitor account after the start.
        .replace("health_failures = 2", "health_failures = 30")
        + &format!(
            "init_command = [{install:?}, \"--no-defaults\", \"--datadir={{datadir}}\", \"--user={{user}}\", \"--auth-root-authentication-method=normal\", \"--skip-test-db\"]\n"
        );
    let text = p.config_text(0, "sync") + &section;
    std::fs::write(p.config(0), text).unwrap();
    p.start(0);
    p.start(1);
    p.wait(0, "peer connected", |s| {
        s.is_some_and(|s| !s["volume"]["peer"].is_null())
    });
    // Not initialised: a state of its own, not a failure to count.
    let early = p.hadb(0, &["mysql", "init"]);
    assert!(!early.status.success(), "init on a secondary");
    p.primary(0);
    let s = wait_long(&p, 0, "mysqld waiting for init", |s| {
        mysqld(s)["state"] == "uninitialised"
    });
    assert_eq!(mysqld(&s)["restarts"], 0, "{s}");
    assert!(
        mysqld(&s)["health"]
            .as_str()
            .unwrap()
            .contains("hadb mysql init"),
        "{s}"
    );
    let out = p.hadb(0, &["mysql", "init"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!m.datadir.join("lost+found").exists());
    // mysqld starts on the new database; the operator adds the monitor.
    wait_long(&p, 0, "mysqld started", |s| {
        mysqld(s)["state"] == "starting" || mysqld(s)["state"] == "unhealthy"
    });
    let start = Instant::now();
    loop {
        let out = m.sql(&format!(
            "CREATE USER '{}'@'localhost' IDENTIFIED BY '{}'; CREATE DATABASE hadb; CREATE TABLE hadb.probe (id INT PRIMARY KEY, at DATETIME NOT NULL); GRANT INSERT, DELETE ON hadb.probe TO '{}'@'localhost';",
            mariadb::MONITOR_USER,
            mariadb::MONITOR_PASSWORD,
            mariadb::MONITOR_USER
        ));
        if out.status.success() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "cannot create the monitor: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    healthy_pid(&p, 0, "mysqld healthy on the new database");
    // A second init refuses: the datadir holds a database now.
    let again = p.hadb(0, &["mysql", "init"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a database"));
}
