//! hadb on the primary is killed with SIGKILL, or restarts itself with
//! `hadb restart-in-place`, while a client writes to the mounted ext4 on
//! /dev/nbd0, in two VMs: the kernel holds the I/O for the new process,
//! which reconnects the device and resumes as primary. Not one write fails,
//! dmesg shows no I/O error, the filesystem stays mounted, the "mysqld" (a
//! stand-in shell loop holding a file open on the volume, as MariaDB is not
//! in the VM image) is the same process, adopted, and the peer ends up in
//! sync. The manager is on for the restarts (set up by hand first, then
//! turned on with a reload): the secondary never asks for a fence, and the
//! roles stay as they are.

#[path = "support/vm.rs"]
#[macro_use]
mod vm;
#[path = "support/vm_pair.rs"]
mod vm_pair;
#[path = "support/vm_writer.rs"]
mod vm_writer;

use std::time::{Duration, Instant};

use vm::Vm;
use vm_pair::{Pair, replicating_as, status, wait_status};
use vm_writer::{WRITER_PATH, dmesg_errors, longest_write, wait_writes, writer_script, writes};

const CONFIG: &str = concat!(
    pair_nodes!(),
    r#"
[volume]
device = "/dev/vdb"
nbd_device = "/dev/nbd0"

[mysql]
datadir = "/data"
user = "root"
# A stand-in for mysqld: keeps a file open on the volume.
command = ["/bin/sh", "-c", "exec 3>>/data/standin.log; while :; do echo tick >&3; sleep 1; done"]
# It never answers on a socket: no health verdict for an hour.
start_timeout = "1h"

# Roles move by hand while the pair is set up; the test then turns the
# manager on (SIGHUP).
[manager]
maintenance = true
"#
);

fn boot_pair() -> Pair {
    let mut pair = vm_pair::boot_pair(
        "hadb-rip",
        CONFIG,
        &[(WRITER_PATH, 0o755, writer_script("/data/w").as_bytes())],
    );
    let Pair { vm1, vm2 } = &mut pair;
    // A filesystem and a database directory, then down and up again so
    // hadb mounts it and starts the stand-in itself.
    vm1.run_ok("hadb volume mkfs");
    vm1.run_ok("mkdir -p /data/mysql && sync");
    assert_eq!(vm1.run_ok("hadb volume secondary").trim(), "secondary");
    vm_pair::make_primary(vm1);
    wait_status(vm1, "running the stand-in", Duration::from_secs(60), |st| {
        st["mysqld"]["pid"].as_u64().is_some()
    });
    wait_status(
        vm2,
        "secondary and replicating",
        Duration::from_secs(60),
        |st| replicating_as(st, "secondary"),
    );
    pair
}

/// After a restart of either kind: hadb answers as primary, the peer
/// catches up, the writer goes on, the stand-in is the same process.
fn check_after(vm1: &mut Vm, vm2: &mut Vm, what: &str, mysqld_pid: u64, t0: Instant) {
    let st = wait_status(
        vm1,
        "primary and replicating",
        Duration::from_secs(120),
        |st| replicating_as(st, "primary"),
    );
    eprintln!(
        "{what}: primary and replicating again {:.1} s after the restart",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(
        st["mysqld"]["pid"].as_u64(),
        Some(mysqld_pid),
        "{what}: the stand-in mysqld is not the same process: {}",
        st["mysqld"]
    );
    assert_eq!(
        vm1.run_ok(&format!("test -d /proc/{mysqld_pid} && echo alive"))
            .trim(),
        "alive"
    );
    let log = vm1.run_ok("grep -E 'adopted|resum|reconnected' /tmp/hadb.log || true");
    assert!(
        log.contains("adopted the running mysqld"),
        "{what}: no adoption in the log:\n{log}"
    );
    assert!(
        log.contains("resumed as primary"),
        "{what}: no resume in the log:\n{log}"
    );
    wait_status(
        vm2,
        "secondary and replicating",
        Duration::from_secs(60),
        |st| replicating_as(st, "secondary"),
    );
    // The writer goes on past the restart.
    let before = writes(vm1).len();
    wait_writes(vm1, before + 10, Duration::from_secs(120));
    let log = writes(vm1);
    let ok = log.iter().filter(|w| w.ok).count();
    let failed: Vec<&str> = log
        .iter()
        .filter(|w| !w.ok)
        .map(|w| w.line.as_str())
        .collect();
    assert!(
        failed.is_empty(),
        "{what}: writes failed:\n{}",
        failed.join("\n")
    );
    let errors = dmesg_errors(vm1);
    assert!(
        errors.is_empty(),
        "{what}: I/O errors in dmesg:\n{}",
        errors.join("\n")
    );
    assert_eq!(
        vm1.run_ok("grep -c ' /data ' /proc/mounts").trim(),
        "1",
        "{what}: /data is no longer mounted"
    );
    eprintln!(
        "{what}: {ok} writes ok, none failed; the longest took {:.1} s",
        longest_write(&log)
    );
    // The secondary's verdict only means something once the heartbeat
    // timeout plus fence_delay (6 s) have passed since the restart; on a
    // fast run the checks above can finish sooner, so wait out the rest.
    let verdict_after = Duration::from_secs(8);
    if let Some(rest) = verdict_after.checked_sub(t0.elapsed()) {
        std::thread::sleep(rest);
    }
    let peer = status(vm2).expect("hadb02 answers");
    assert_eq!(
        peer["manager"]["fences_requested"], 0,
        "{what}: the secondary asked for a fence: {}",
        peer["manager"]
    );
    assert_eq!(peer["volume"]["role"], "secondary", "{what}: {peer}");
}

#[test]
fn mysql_survives_a_killed_and_a_restarted_hadb() {
    let mut pair = boot_pair();
    let Pair { vm1, vm2 } = &mut pair;
    let st = status(vm1).expect("status");
    let mysqld_pid = st["mysqld"]["pid"].as_u64().expect("the stand-in's pid");
    let hadb_pid = st["pid"].as_u64().expect("hadb's pid");

    // The manager on, on both nodes: the restarts must not look like a
    // death to the peer.
    for vm in [&mut *vm1, &mut *vm2] {
        vm.run_ok(
            "sed -i 's/^maintenance = true/maintenance = false/' /etc/hadb/hadb.toml && kill -HUP $(pidof hadb)",
        );
        wait_status(vm, "the manager on", Duration::from_secs(30), |st| {
            st["manager"]["maintenance"] == false
        });
    }
    vm1.run_ok("sh /tmp/writer.sh > /tmp/writer.out 2>&1 &");
    wait_writes(vm1, 20, Duration::from_secs(60));

    // kill -9 and start again at once.
    let t0 = Instant::now();
    vm1.run_ok(&format!(
        "kill -9 {hadb_pid}; sleep 1; hadb run >>/tmp/hadb.log 2>&1 &"
    ));
    check_after(vm1, vm2, "kill -9", mysqld_pid, t0);

    // A restart in place: the same pid, a new image.
    let hadb_pid = status(vm1).expect("status")["pid"].as_u64().expect("pid");
    let t0 = Instant::now();
    let out = vm1.run_ok("hadb restart-in-place");
    assert!(out.contains("restarts in place"), "{out}");
    check_after(vm1, vm2, "restart-in-place", mysqld_pid, t0);
    let st = status(vm1).expect("status");
    assert_eq!(
        st["pid"].as_u64(),
        Some(hadb_pid),
        "restart-in-place changed the pid"
    );
    let resumes = vm1.run_ok("grep -c 'resumed as primary' /tmp/hadb.log || true");
    assert_eq!(resumes.trim(), "2", "expected two resumes");

    // Every write the writer saw succeed is there.
    vm1.run_ok("touch /tmp/writer.stop");
    vm1.wait_until(
        "grep -c '^stopped' /tmp/writer.log || true",
        Duration::from_secs(60),
        Duration::from_millis(300),
        |out, _| out.trim() == "1",
    )
    .expect("the writer stops");
    let bad = vm1.run_ok(
        "sync; echo 3 > /proc/sys/vm/drop_caches; n=0; \
         for i in $(awk '$1 == \"ok\" { print $2 }' /tmp/writer.log); do \
             yes \"hadb-$i\" | head -c 8192 | cmp -s - /data/w/f$i || echo \"bad f$i\"; n=$((n+1)); \
         done; echo \"checked $n\"",
    );
    assert!(!bad.contains("bad"), "files differ:\n{bad}");
    eprintln!("files: {}", bad.trim());
}
