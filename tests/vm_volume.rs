//! The replicated volume end to end, in two VMs: hadb01 makes an ext4
//! filesystem on /dev/nbd0 and writes files; after a switchover hadb02 mounts
//! its own /dev/nbd0 and finds the same files, and e2fsck finds the
//! filesystem clean.

#[path = "support/vm.rs"]
#[macro_use]
mod vm;
#[path = "support/vm_pair.rs"]
mod vm_pair;

use std::time::Duration;

use vm::Vm;
use vm_pair::{Pair, boot_pair, replicating_as, wait_nbd, wait_status};

// `node` is not set: it defaults to the host name (hadb01 / hadb02).
const CONFIG: &str = concat!(
    pair_nodes!(),
    r#"
[volume]
device = "/dev/vdb"
port = 7789
nbd_device = "/dev/nbd0"

# This test moves the volume by hand.
[manager]
maintenance = true
"#
);

/// The files written on the first primary and checked on the second.
const FILES: &[&str] = &["big.bin", "small.txt", "dir/nested.txt", "dir/empty"];

fn md5sums(vm: &mut Vm) -> String {
    let files = FILES.join(" ");
    vm.run_ok(&format!("cd /mnt && md5sum {files}"))
}

pub fn volume_failover_scenario() {
    let mut pair = boot_pair("vm", CONFIG, &[]);
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
    vm_pair::make_primary(vm2);
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

const FS_CONFIG: &str = concat!(
    pair_nodes!(),
    r#"
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
"#
);

fn mounted(vm: &mut Vm) -> bool {
    vm.run_ok("grep -c ' /data ' /proc/mounts || true").trim() != "0"
}

/// The filesystem follows the primary: made once by `hadb volume mkfs`,
/// mounted by hadb on promotion, unmounted by hadb before demotion (and
/// the demotion refused, naming the holder, while something uses it).
#[test]
fn the_filesystem_follows_the_primary() {
    let mut pair = boot_pair("vm", FS_CONFIG, &[]);
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
    vm_pair::make_primary(vm2);
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
