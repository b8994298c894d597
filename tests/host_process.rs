//! Process hygiene with real processes: hadb is a child subreaper that
//! reaps the orphans of what it starts, and it runs as PID 1 of a fresh
//! PID namespace, mounting the /proc it finds missing. The "mysqld" here
//! is a shell that leaves an orphan behind and then waits forever.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Pair, hadb_bin, require};

const SIZE: u64 = 16 << 20;

/// A `[mysql]` section whose command orphans a short `sleep`: the
/// subshell exits at once, so its child is reparented to the nearest
/// subreaper, and becomes a zombie there half a second later.
fn orphaning_mysql(p: &Pair) -> String {
    let dir = p.dir.join("datadir");
    // What hadb takes for an initialised database.
    std::fs::create_dir_all(dir.join("mysql")).unwrap();
    format!(
        r#"
[mysql]
datadir = "{d}"
on_volume = false
command = ["/bin/sh", "-c", "(sleep 0.5 &); exec sleep 1000"]
user = "root"
socket = "{d}/mysqld.sock"
start_timeout = "10m"
"#,
        d = dir.display()
    )
}

/// Zombie children of `pid`, as (pid, name).
fn zombies_of(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.first() == Some(&"Z") && f.get(1) == Some(&pid.to_string().as_str()) {
            out.push(head.to_owned());
        }
    }
    out
}

/// The pids whose parent is `pid`: the children of each of its threads
/// (hadb starts processes from its blocking threads).
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        out.extend(
            std::fs::read_to_string(task.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|s| s.parse::<u32>().ok()),
        );
    }
    out
}

fn wait_for(what: &str, p: &Pair, n: usize, pred: impl Fn(&str) -> bool) {
    let start = Instant::now();
    while !pred(&p.log(n)) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "never saw {what}:\n{}",
            p.log(n)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_subreaper_reaps_the_orphans_of_mysqld() {
    let mut p = Pair::new("subreaper", "sync", SIZE);
    let text = p.config_text(0, "sync") + &orphaning_mysql(&p);
    std::fs::write(p.config(0), text).unwrap();
    p.start(0);
    p.start(1);
    p.wait(0, "peer connected", |s| {
        s.is_some_and(|s| !s["volume"]["peer"].is_null())
    });
    p.primary(0);
    wait_for("the orphan reaped", &p, 0, |l| {
        l.contains("reaped orphan") && l.contains("(sleep)")
    });
    let hadb = p.procs[0].as_ref().unwrap().id();
    assert!(zombies_of(hadb).is_empty(), "{:?}", zombies_of(hadb));
    // The mysqld hadb started is its own, and not reaped by the reaper.
    let s = p.status(0).unwrap();
    assert_eq!(s["mysqld"]["state"], "starting", "{s}");
    let pid = s["mysqld"]["pid"].as_u64().unwrap() as u32;
    assert!(children_of(hadb).contains(&pid));
    // A clean stop ends it (SIGTERM) and sees its exit.
    assert!(p.stop(0), "{}", p.log(0));
    assert!(p.log(0).contains("mysqld: stopped"), "{}", p.log(0));
}

#[test]
fn hadb_runs_as_pid_1_and_mounts_a_missing_proc() {
    require("unshare", "util-linux");
    let mut p = Pair::new("pid1", "sync", SIZE);
    let text = p.config_text(0, "sync") + &orphaning_mysql(&p);
    std::fs::write(p.config(0), text).unwrap();
    // A new PID namespace whose first process is hadb, in a mount
    // namespace where /proc is gone.
    let log = std::fs::File::create(p.dir.join("a.log")).unwrap();
    let script = format!(
        "umount -l /proc && exec {} --config {} --cmdline none run",
        hadb_bin(),
        p.config(0).display()
    );
    let child = Command::new("unshare")
        .args(["--pid", "--fork", "--mount", "--propagation", "private"])
        .args(["/bin/sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    p.procs[0] = Some(child);
    p.wait(0, "control socket", |s| s.is_some());
    p.start(1);
    let s = p
        .wait(0, "peer connected", |s| {
            s.is_some_and(|s| !s["volume"]["peer"].is_null())
        })
        .unwrap();
    assert_eq!(s["pid"], 1, "{s}");
    let log = p.log(0);
    assert!(log.contains("running as PID 1"), "{log}");
    assert!(log.contains("mounted proc at /proc"), "{log}");
    p.primary(0);
    wait_for("the orphan reaped by PID 1", &p, 0, |l| {
        l.contains("reaped orphan") && l.contains("(sleep)")
    });
    let unshare = p.procs[0].as_ref().unwrap().id();
    let init = *children_of(unshare).first().expect("hadb under unshare");
    assert!(zombies_of(init).is_empty(), "{:?}", zombies_of(init));
    // SIGTERM from outside the namespace reaches PID 1 because hadb
    // handles it; the namespace ends with it.
    let ok = Command::new("kill")
        .args(["-TERM", &init.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let mut unshare = p.procs[0].take().unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(st) = unshare.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "hadb as PID 1 did not stop:\n{}",
            p.log(0)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}\n{}", p.log(0));
    assert!(p.log(0).contains("mysqld: stopped"), "{}", p.log(0));
}

#[test]
fn sighup_takes_what_can_change_and_names_what_cannot() {
    let mut p = Pair::new("sighup", "sync", SIZE);
    p.start(0);
    let hup = |p: &Pair| {
        let pid = p.procs[0].as_ref().unwrap().id().to_string();
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    assert_eq!(p.status(0).unwrap()["manager"]["maintenance"], true);
    // A file with an error changes nothing, and hadb goes on.
    std::fs::write(p.config(0), p.config_text(0, "sync") + "\n[volume2]\n").unwrap();
    hup(&p);
    wait_for("the refused reload", &p, 0, |l| {
        l.contains("reload: the configuration has errors; nothing changed")
    });
    assert!(
        p.procs[0].as_mut().unwrap().try_wait().unwrap().is_none(),
        "hadb exited on a bad reload:\n{}",
        p.log(0)
    );
    // Maintenance off is taken; a new volume mode waits for a restart.
    let text = p
        .config_text(0, "async")
        .replace("maintenance = true", "maintenance = false");
    std::fs::write(p.config(0), text).unwrap();
    hup(&p);
    wait_for("the reload", &p, 0, |l| {
        l.contains("reload: manager.maintenance = false")
    });
    let log = p.log(0);
    assert!(
        log.contains("reload: volume.mode changed but cannot change while hadb runs"),
        "{log}"
    );
    let s = p.status(0).unwrap();
    assert_eq!(s["manager"]["maintenance"], false, "{s}");
    assert_eq!(s["volume"]["mode"], "sync", "{s}");
    wait_for("the manager acting", &p, 0, |l| {
        l.contains("maintenance mode off: the manager acts again")
    });
}
