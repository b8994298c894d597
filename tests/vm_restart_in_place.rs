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
mod vm;
#[path = "support/vm_pair.rs"]
mod vm_pair;

use std::time::{Duration, Instant};

use vm::Vm;
use vm_pair::{Pair, replicating_as, status, wait_status};

const CONFIG: &str = r#"cluster = "hadb-test"
key_file = "/etc/hadb/authkey"

[nodes.hadb01]
address = "10.10.10.4"

[nodes.hadb02]
address = "10.10.10.5"

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
"#;

/// Writes one file after another (8 KiB each, `dd conv=fsync`) on /data,
/// logging `ok I START END` or `FAIL I START END ERROR` to /tmp (tmpfs),
/// until /tmp/writer.stop exists.
const WRITER: &str = r#"i=0
mkdir -p /data/w
: > /tmp/writer.log
while [ ! -e /tmp/writer.stop ]; do
    i=$((i+1))
    t0=$(cut -d' ' -f1 /proc/uptime)
    if out=$(yes "hadb-$i" | head -c 8192 | dd of=/data/w/f$i bs=4096 conv=fsync 2>&1); then
        echo "ok $i $t0 $(cut -d' ' -f1 /proc/uptime)" >> /tmp/writer.log
    else
        echo "FAIL $i $t0 $(cut -d' ' -f1 /proc/uptime) $(echo $out | tr '\n' ' ')" >> /tmp/writer.log
    fi
done
echo "stopped $i" >> /tmp/writer.log
"#;

/// Kernel messages that mean an I/O failed.
const IO_ERRORS: &[&str] = &[
    "I/O error",
    "blk_update_request",
    "Buffer I/O error",
    "EXT4-fs error",
    "Aborting journal",
    "Remounting filesystem read-only",
];

fn boot_pair() -> Pair {
    let mut pair = vm_pair::boot_pair(
        "hadb-rip",
        CONFIG,
        &[("/tmp/writer.sh", 0o755, WRITER.as_bytes())],
    );
    let Pair { vm1, vm2 } = &mut pair;
    // A filesystem and a database directory, then down and up again so
    // hadb mounts it and starts the stand-in itself.
    vm1.run_ok("hadb volume mkfs");
    vm1.run_ok("mkdir -p /data/mysql && sync");
    assert_eq!(vm1.run_ok("hadb volume secondary").trim(), "secondary");
    vm1.wait_until(
        "hadb volume primary",
        Duration::from_secs(60),
        Duration::from_secs(1),
        |_, rc| rc == 0,
    )
    .expect("hadb volume primary on hadb01, again");
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

fn writes(vm: &mut Vm) -> (usize, Vec<String>) {
    let log = vm.run_ok("cat /tmp/writer.log");
    let ok = log.lines().filter(|l| l.starts_with("ok ")).count();
    let failed = log
        .lines()
        .filter(|l| l.starts_with("FAIL "))
        .map(str::to_owned)
        .collect();
    (ok, failed)
}

fn wait_writes(vm: &mut Vm, n: usize, timeout: Duration) {
    vm.wait_until(
        "grep -c -E '^(ok|FAIL) ' /tmp/writer.log || true",
        timeout,
        Duration::from_millis(300),
        |out, _| out.trim().parse::<usize>().unwrap_or(0) >= n,
    )
    .unwrap_or_else(|e| panic!("the writer did not get to {n} writes: {e}"));
}

/// The longest a single write took, in seconds.
fn longest_write(vm: &mut Vm) -> f64 {
    vm.run_ok("cat /tmp/writer.log")
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&"ok")).then(|| {
                let s: f64 = f.get(2)?.parse().ok()?;
                let e: f64 = f.get(3)?.parse().ok()?;
                Some(e - s)
            })?
        })
        .fold(0.0, f64::max)
}

fn dmesg_errors(vm: &mut Vm) -> Vec<String> {
    vm.run_ok("dmesg")
        .lines()
        .filter(|l| IO_ERRORS.iter().any(|e| l.contains(e)))
        .map(str::to_owned)
        .collect()
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
    let (ok, _) = writes(vm1);
    wait_writes(vm1, ok + 10, Duration::from_secs(120));
    let (ok, failed) = writes(vm1);
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
        longest_write(vm1)
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
