//! Where a replicated write's time goes inside the test VMs: boots a hadb
//! pair under qemu (TCG, one vCPU each), writes /dev/nbd0 with `dd` at
//! several block sizes (replicating, then with the primary alone), times the
//! same on the raw data disk, and profiles both nodes with `perf` during a
//! replicated run. Not a test: `tests/bench/vm-profile` runs it and says
//! how to read it.
//!
//! Needs HADB_PROFILE_PERF: a directory holding a `perf` binary and, in
//! `lib/`, the dynamic loader and every library it needs (the script
//! collects them from the host).

#[path = "../tests/support/vm.rs"]
#[macro_use]
mod vm;
#[path = "../tests/support/vm_pair.rs"]
mod vm_pair;

use std::path::PathBuf;
use std::time::Duration;

use vm::Vm;
use vm_pair::{Pair, boot_pair_with};

const CONFIG: &str = concat!(
    pair_nodes!(),
    r#"
[volume]
device = "/dev/vdb"
nbd_device = "/dev/nbd0"

# Roles move by hand: the profile must not be interrupted by a failover.
[manager]
maintenance = true
"#
);

/// 40 MiB at each block size, direct I/O; the CPU's ticks (USER_HZ) from
/// /proc/stat around each run.
const DD_LOOP: &str = r#"for bs in 4 64 256 1024 4096; do
  set -- $(head -1 /proc/stat); u0=$2; s0=$4; q0=$8
  t0=$(cut -d" " -f1 /proc/uptime)
  dd if=/dev/zero of="$DEV" bs=${bs}k count=$((40960 / bs)) oflag=direct 2>/dev/null || exit 1
  t1=$(cut -d" " -f1 /proc/uptime)
  set -- $(head -1 /proc/stat)
  echo "$bs $t0 $t1 $(($2 - u0)) $(($4 - s0)) $(($8 - q0))"
done
"#;

const PERF: &str = "/xp/lib/ld-linux-x86-64.so.2 --library-path /xp/lib /xp/perf";

fn table(what: &str, out: &str) {
    println!("\n{what}: 40 MiB of dd oflag=direct per block size");
    println!("  block    MiB/s   user   sys  softirq  (CPU ticks of 10 ms)");
    for line in out.lines() {
        let f: Vec<f64> = line
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        if let [bs, t0, t1, user, sys, softirq] = f[..] {
            println!(
                "  {:>5}k {:>8.1} {:>6} {:>5} {:>8}",
                bs,
                40.0 / (t1 - t0).max(0.01),
                user,
                sys,
                softirq
            );
        }
    }
}

/// Each ring's longest silence while up, from `hadb status`: how close the
/// heartbeat came to its timeout while the writes ran.
fn heartbeat_gaps(vm: &mut Vm) -> String {
    let st = vm_pair::status(vm).expect("hadb answers");
    st["heartbeat"]["links"]
        .as_array()
        .map(|links| {
            links
                .iter()
                .map(|l| format!("ring{} longest gap {} ms", l["ring"], l["longest_gap_ms"]))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_else(|| format!("no heartbeat links in status: {}", st["heartbeat"]))
}

/// One TCP stream of 40 MiB from `from` to `to` over the pair's link, with
/// nothing of hadb's in the way: the ceiling any mirror has in these VMs.
fn link_speed(from: &mut Vm, to: &mut Vm) -> String {
    to.run_ok("tcp_speed listen 9000 >/tmp/tcp_speed.out 2>&1 &");
    std::thread::sleep(Duration::from_millis(500));
    let sent = from.run_ok("tcp_speed send 10.10.10.5:9000 40 2>&1");
    let received = to.run_ok("sleep 1; cat /tmp/tcp_speed.out");
    format!("{} / {}", sent.trim(), received.trim())
}

/// 4 KiB write + flush pairs per latency run.
const SYNCS: u32 = 300;

/// Runs `cmd` every second until it succeeds, for at most a minute.
fn until_ok(vm: &mut Vm, cmd: &str, what: &str) {
    vm.wait_until(
        cmd,
        Duration::from_secs(60),
        Duration::from_secs(1),
        |_, rc| rc == 0,
    )
    .unwrap_or_else(|e| panic!("{what}: {e}"));
}

/// Waits for a `perf record` started in the background to have written
/// its data.
fn wait_perf(vm: &mut Vm) {
    until_ok(
        vm,
        "grep -q 'perf record: Captured' /tmp/perf.log",
        "perf on the secondary done",
    );
}

/// Both nodes profiled while hadb01 runs `work`; hadb02's perf records for
/// 8 s from before the work began.
fn profile_both(vm1: &mut Vm, vm2: &mut Vm, work: &str, what: &str) {
    vm2.run_ok(&format!(
        "{PERF} record -e cpu-clock -a -o /tmp/perf.data -- sleep 8 >/tmp/perf.log 2>&1 &"
    ));
    vm1.run_ok(&format!(
        "{PERF} record -e cpu-clock -a -o /tmp/perf.data -- {work} >/tmp/perf.log 2>&1"
    ));
    println!("\nperf on hadb01 (primary), {what}:\n{}", profile(vm1));
    std::thread::sleep(Duration::from_secs(8));
    wait_perf(vm2);
    println!(
        "perf on hadb02 (secondary), the same seconds:\n{}",
        profile(vm2)
    );
}

fn profile(vm: &mut Vm) -> String {
    vm.run_ok(&format!(
        "{PERF} report --stdio --no-children --sort comm,dso,sym -i /tmp/perf.data 2>/dev/null \
         | grep -v '^#' | grep -v '^$' | head -30"
    ))
}

fn main() {
    let perf_dir = PathBuf::from(std::env::var_os("HADB_PROFILE_PERF").expect(
        "HADB_PROFILE_PERF: the directory with perf and lib/ (tests/bench/vm-profile sets it)",
    ));
    let hash_speed = vm::static_example("hash_speed");
    let mut initrd = vec![
        ("/usr/sbin/hash_speed".to_owned(), hash_speed),
        (
            "/usr/sbin/tcp_speed".to_owned(),
            vm::static_example("tcp_speed"),
        ),
        (
            "/usr/sbin/sync_latency".to_owned(),
            vm::static_example("sync_latency"),
        ),
        (
            "/usr/sbin/switch_cost".to_owned(),
            vm::static_example("switch_cost"),
        ),
        ("/xp/perf".to_owned(), perf_dir.join("perf")),
    ];
    for entry in std::fs::read_dir(perf_dir.join("lib")).expect("HADB_PROFILE_PERF/lib") {
        let entry = entry.expect("a directory entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        initrd.push((format!("/xp/lib/{name}"), entry.path()));
    }
    // Through the initramfs: perf and its libraries are tens of MiB, too
    // much for the serial line that small files take.
    let mut pair = boot_pair_with("hadb-prof", CONFIG, &[], &initrd);
    let Pair { vm1, vm2 } = &mut pair;
    for vm in [&mut *vm1, &mut *vm2] {
        vm.write_file("/tmp/ddloop.sh", 0o755, DD_LOOP.as_bytes())
            .expect("the dd loop written");
        vm.run_ok("echo 0 > /proc/sys/kernel/kptr_restrict");
    }

    println!(
        "cpu model {}\nhash_speed in the VM:\n{}",
        std::env::var("HADB_VM_CPU").unwrap_or_else(|_| "qemu64 (default)".into()),
        vm1.run_ok("hash_speed")
    );
    println!("\nwake-ups in the VM: {}", vm1.run_ok("switch_cost 2000"));
    println!("\nthe link alone (tcp_speed: one TCP stream, hadb01 to hadb02):");
    for _ in 0..2 {
        println!("  {}", link_speed(vm1, vm2));
    }
    println!(
        "\nreplicating (hadb01 primary, hadb02 secondary): {}",
        vm1.run_ok(&format!("sync_latency /dev/nbd0 {SYNCS}"))
    );
    // Both nodes profiled during the same commits.
    profile_both(
        vm1,
        vm2,
        &format!("sync_latency /dev/nbd0 {SYNCS}"),
        &format!("{SYNCS} × 4 KiB write + flush"),
    );
    table(
        "replicating (hadb01 primary, hadb02 secondary)",
        &vm1.run_ok("DEV=/dev/nbd0 sh /tmp/ddloop.sh"),
    );

    profile_both(
        vm1,
        vm2,
        "dd if=/dev/zero of=/dev/nbd0 bs=1M count=60 oflag=direct",
        "60 MiB in 1 MiB writes",
    );

    println!(
        "\nheartbeat (timeout 1 s) after the runs at depth 1: hadb01 {}; hadb02 {}",
        heartbeat_gaps(vm1),
        heartbeat_gaps(vm2)
    );
    // Depth 4: four writers at once keep frames queued on both nodes, the
    // load under which a busy loop could starve the heartbeat.
    let out = vm1.run_ok(
        "t0=$(cut -d' ' -f1 /proc/uptime)\n\
         for i in 0 1 2 3; do dd if=/dev/zero of=/dev/nbd0 bs=1M count=12 seek=$((i * 12)) oflag=direct 2>/dev/null & done; wait\n\
         echo $t0 $(cut -d' ' -f1 /proc/uptime)",
    );
    let t: Vec<f64> = out
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    if let [t0, t1] = t[..] {
        println!(
            "four writers, 48 MiB in 1 MiB writes: {:.1} MiB/s",
            48.0 / (t1 - t0).max(0.01)
        );
    }
    println!(
        "heartbeat after the four writers: hadb01 {}; hadb02 {}",
        heartbeat_gaps(vm1),
        heartbeat_gaps(vm2)
    );
    let pid = vm_pair::status(vm2)
        .and_then(|st| st["pid"].as_u64())
        .expect("hadb02's pid");
    vm2.run_ok(&format!("kill -9 {pid}"));
    // go-alone is refused while the link is still up.
    until_ok(
        vm1,
        "hadb volume go-alone",
        "hadb volume go-alone on hadb01",
    );
    println!(
        "\nalone (hadb01 primary, no peer): {}",
        vm1.run_ok(&format!("sync_latency /dev/nbd0 {SYNCS}"))
    );
    table(
        "alone (hadb01 primary, no peer)",
        &vm1.run_ok("DEV=/dev/nbd0 sh /tmp/ddloop.sh"),
    );
    vm1.run_ok(&format!(
        "{PERF} record -e cpu-clock -a -o /tmp/perf.data -- \
         dd if=/dev/zero of=/dev/nbd0 bs=1M count=60 oflag=direct >/tmp/perf.log 2>&1"
    ));
    println!(
        "\nperf on hadb01 alone, 60 MiB in 1 MiB writes:\n{}",
        profile(vm1)
    );
    println!(
        "\nthe raw data disk (hadb02's /dev/vdb, hadb stopped): {}",
        vm2.run_ok(&format!("sync_latency /dev/vdb {SYNCS}"))
    );
    table(
        "the raw data disk (hadb02's /dev/vdb, hadb stopped)",
        &vm2.run_ok("DEV=/dev/vdb sh /tmp/ddloop.sh"),
    );
}
