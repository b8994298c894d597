//! The replicated volume end to end, in two VMs: hadb01 makes an ext4
//! filesystem on /dev/nbd0 and writes files; after a switchover hadb02 mounts
//! its own /dev/nbd0 and finds the same files, and e2fsck finds the
//! filesystem clean.

#[path = "support/vm.rs"]
mod vm;

use std::time::Duration;

use serde_json::Value;
use vm::{Vm, VmConfig};

const DATA_DISK: u64 = 64 << 20;

const CONFIG: &str = r#"# hadb test pair; `node` defaults to the host name (hadb01 / hadb02)
cluster = "hadb-test"
key_file = "/etc/hadb/authkey"

[nodes.hadb01]
address = "10.10.10.4"

[nodes.hadb02]
address = "10.10.10.5"

[volume]
device = "/dev/vdb"
port = 7789
nbd_device = "/dev/nbd0"

# This test moves the volume by hand.
[manager]
maintenance = true
"#;

/// The files written on the first primary and checked on the second.
const FILES: &[&str] = &["big.bin", "small.txt", "dir/nested.txt", "dir/empty"];

/// Both VMs; when the test fails, prints each one's hadb log and kernel log.
struct Pair {
    vm1: Vm,
    vm2: Vm,
}

impl Drop for Pair {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for vm in [&mut self.vm1, &mut self.vm2] {
            let report = vm
                .run_timeout(
                    "echo '--- hadb status'; hadb status 2>&1; \
                     echo '--- /tmp/hadb.log (tail)'; tail -n 80 /tmp/hadb.log; \
                     echo '--- dmesg (tail)'; dmesg | tail -n 30",
                    Duration::from_secs(20),
                )
                .map(|(out, _)| out)
                .unwrap_or_else(|e| format!("(no report: {e})"));
            eprintln!("===== {} =====\n{report}", vm.name());
        }
    }
}

fn status(vm: &mut Vm) -> Option<Value> {
    match vm.run("hadb status --json") {
        Ok((out, 0)) => serde_json::from_str(out.trim()).ok(),
        _ => None,
    }
}

fn volume_field<'a>(st: &'a Value, key: &str) -> &'a Value {
    &st["volume"][key]
}

/// Primary (or secondary), connected to its peer, and the peer up to date
/// with nothing left to resynchronise.
fn replicating_as(st: &Value, role: &str) -> bool {
    let link = volume_field(st, "link").as_str().unwrap_or("");
    volume_field(st, "role") == role
        && link == "connected"
        && !volume_field(st, "peer").is_null()
        && volume_field(st, "peer_up_to_date") == &Value::Bool(true)
        && volume_field(st, "resync").is_null()
}

fn wait_status(vm: &mut Vm, what: &str, timeout: Duration, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Some(st) = status(vm) {
            if want(&st) {
                return st;
            }
            last = Some(st);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}: not {what} after {timeout:?}; last status: {}",
            vm.name(),
            last.map(|s| s.to_string())
                .unwrap_or_else(|| "none (daemon not answering)".into())
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Waits until /dev/nbd0 is attached (has a size) or detached (size 0).
fn wait_nbd(vm: &mut Vm, attached: bool) {
    let want = if attached { "attached" } else { "detached" };
    vm.wait_until(
        "blockdev --getsize64 /dev/nbd0",
        Duration::from_secs(60),
        Duration::from_millis(300),
        |out, rc| rc == 0 && (out.trim() != "0") == attached,
    )
    .unwrap_or_else(|e| panic!("/dev/nbd0 not {want}: {e}"));
}

fn md5sums(vm: &mut Vm) -> String {
    let files = FILES.join(" ");
    vm.run_ok(&format!("cd /mnt && md5sum {files}"))
}

/// Two VMs from the test image with `config` as /etc/hadb/hadb.toml:
/// metadata created, `hadb run` started on both, hadb01 made primary and
/// its peer caught up, /dev/nbd0 attached on hadb01.
fn boot_pair(config: &str) -> Pair {
    let assets = vm::assets();
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).expect("random bytes for the auth key");
    let (p1, p2) = vm::udp_port_pair();
    let vm_config = |name, host, addr, link: (u16, u16)| {
        VmConfig::new(name, host, addr)
            .link(link.0, link.1)
            .data_disk_size(DATA_DISK)
            .file("/etc/hadb/hadb.toml", 0o644, config.as_bytes())
            .file("/etc/hadb/authkey", 0o600, &key)
    };
    let mut vms = vm::boot_all(
        assets,
        vec![
            vm_config("vm1", "hadb01", "10.10.10.4/24", (p1, p2)),
            vm_config("vm2", "hadb02", "10.10.10.5/24", (p2, p1)),
        ],
    );
    let vm2 = vms.pop().expect("two VMs");
    let vm1 = vms.pop().expect("two VMs");
    let mut pair = Pair { vm1, vm2 };
    let Pair { vm1, vm2 } = &mut pair;
    for vm in [&mut *vm1, &mut *vm2] {
        assert_eq!(vm.run_ok("stat -c %a /etc/hadb/authkey"), "600\n");
        vm.run_ok("hadb config check");
        vm.run_ok("hadb volume create-md");
        vm.run_ok("mkdir -p /run/hadb; hadb run >/tmp/hadb.log 2>&1 &");
    }
    for vm in [&mut *vm1, &mut *vm2] {
        wait_status(vm, "answering", Duration::from_secs(30), |_| true);
    }
    vm1.wait_until(
        "hadb volume primary",
        Duration::from_secs(60),
        Duration::from_secs(1),
        |_, rc| rc == 0,
    )
    .expect("hadb volume primary on hadb01");
    wait_status(
        vm1,
        "primary and replicating",
        Duration::from_secs(180),
        |st| replicating_as(st, "primary"),
    );
    wait_status(
        vm2,
        "secondary and replicating",
        Duration::from_secs(60),
        |st| replicating_as(st, "secondary"),
    );
    wait_nbd(vm1, true);
    pair
}

pub fn volume_failover_scenario() {
    let mut pair = boot_pair(CONFIG);
    let Pair { vm1, vm2 } = &mut pair;

    // A filesystem and some files on hadb01.
    vm1.run_ok("mke2fs -t ext4 -q /dev/nbd0");
    vm1.run_ok("mount /dev/nbd0 /mnt");
    vm1.run_ok(
        "set -e\n\
         dd if=/dev/urandom of=/mnt/big.bin bs=1M count=5 2>/dev/null\n\
         echo 'the quick brown fox' > /mnt/small.txt\n\
         mkdir /mnt/dir\n\
         seq 1 1000 > /mnt/dir/nested.txt\n\
         : > /mnt/dir/empty\n",
    );
    let sums1 = md5sums(vm1);
    assert_eq!(sums1.lines().count(), FILES.len(), "{sums1}");
    vm1.run_ok("sync && umount /mnt");

    // Switchover: hadb01 steps down, hadb02 takes over.
    assert_eq!(vm1.run_ok("hadb volume secondary").trim(), "secondary");
    wait_nbd(vm1, false);
    wait_status(
        vm2,
        "connected to a secondary peer",
        Duration::from_secs(60),
        |st| st["volume"]["peer"]["role"] == "secondary",
    );
    vm2.wait_until(
        "hadb volume primary",
        Duration::from_secs(60),
        Duration::from_secs(1),
        |_, rc| rc == 0,
    )
    .expect("hadb volume primary on hadb02");
    wait_status(
        vm2,
        "primary and replicating",
        Duration::from_secs(60),
        |st| replicating_as(st, "primary"),
    );
    wait_nbd(vm2, true);

    // hadb02 has the same files, and a clean filesystem.
    vm2.run_ok("mount /dev/nbd0 /mnt");
    let sums2 = md5sums(vm2);
    vm2.run_ok("umount /mnt");
    assert_eq!(sums1, sums2, "files differ after the switchover");
    let (out, rc) = vm2.run("e2fsck -fn /dev/nbd0").expect("run e2fsck");
    assert_eq!(
        rc, 0,
        "e2fsck -fn /dev/nbd0 on hadb02 found problems:\n{out}"
    );

    // And hadb01 follows as an up-to-date secondary.
    wait_status(
        vm1,
        "secondary and replicating",
        Duration::from_secs(60),
        |st| replicating_as(st, "secondary"),
    );
}

#[test]
fn volume_failover() {
    volume_failover_scenario();
}

const FS_CONFIG: &str = r#"cluster = "hadb-test"
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
# No mysqld in this VM: the filesystem alone follows the primary.
supervise = false

# Roles move by hand here; the filesystem follows them.
[manager]
maintenance = true
"#;

fn mounted(vm: &mut Vm) -> bool {
    vm.run_ok("grep -c ' /data ' /proc/mounts || true").trim() != "0"
}

/// The filesystem follows the primary: made once by `hadb volume mkfs`,
/// mounted by hadb on promotion, unmounted by hadb before demotion (and
/// the demotion refused, naming the holder, while something uses it).
#[test]
fn the_filesystem_follows_the_primary() {
    let mut pair = boot_pair(FS_CONFIG);
    let Pair { vm1, vm2 } = &mut pair;
    assert!(!mounted(vm1), "mounted before there was a filesystem");

    vm1.run_ok("hadb volume mkfs");
    assert!(mounted(vm1), "mkfs did not mount /data");
    vm1.run_ok("echo 'kept across the move' > /data/kept.txt && sync");
    let (out, rc) = vm1.run("hadb volume mkfs").expect("run mkfs again");
    assert_ne!(rc, 0, "mkfs over a filesystem was not refused: {out}");
    assert!(out.contains("already holds"), "{out}");

    // Something holds /data: the demotion is refused and names it.
    vm1.run_ok("cd /data && (sleep 300 &) && cd /");
    let (out, rc) = vm1.run("hadb volume secondary").expect("run secondary");
    assert_ne!(rc, 0, "demoted with /data busy: {out}");
    assert!(out.contains("busy") && out.contains("sleep"), "{out}");
    assert!(mounted(vm1));
    vm1.run_ok("pkill sleep || killall sleep; sleep 1");

    // hadb unmounts, steps down; the peer takes over and hadb mounts there.
    assert_eq!(vm1.run_ok("hadb volume secondary").trim(), "secondary");
    assert!(!mounted(vm1), "/data still mounted on the secondary");
    wait_nbd(vm1, false);
    wait_status(
        vm2,
        "connected to a secondary peer",
        Duration::from_secs(60),
        |st| st["volume"]["peer"]["role"] == "secondary",
    );
    vm2.wait_until(
        "hadb volume primary",
        Duration::from_secs(60),
        Duration::from_secs(1),
        |_, rc| rc == 0,
    )
    .expect("hadb volume primary on hadb02");
    vm2.wait_until(
        "grep -c ' /data ' /proc/mounts",
        Duration::from_secs(60),
        Duration::from_millis(300),
        |out, rc| rc == 0 && out.trim() != "0",
    )
    .expect("hadb02 mounted /data after its promotion");
    assert_eq!(
        vm2.run_ok("cat /data/kept.txt").trim(),
        "kept across the move"
    );
}
