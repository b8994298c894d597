//! The watchdog on a real kernel (softdog in a VM under qemu with
//! `-no-reboot`, so a watchdog reset ends qemu): hadb arms it with a 5 s
//! timeout; a clean stop disarms it (the VM lives on); a SIGSTOPped hadb
//! stops petting and the VM resets within the timeout.

#[path = "support/vm.rs"]
#[macro_use]
mod vm;

use std::time::{Duration, Instant};

use vm::{Vm, VmConfig};

const CONFIG: &str = concat!(
    pair_nodes!(),
    r#"
[volume]
device = "/dev/vdb"

[manager]
maintenance = true

[watchdog]
enabled = true
timeout = "5s"
"#
);

fn start_hadb(vm: &mut Vm) {
    vm.run_ok("mkdir -p /run/hadb; hadb run >>/tmp/hadb.log 2>&1 &");
    vm.wait_until(
        "hadb status --json | grep -q '\"armed\":true'",
        Duration::from_secs(30),
        Duration::from_millis(500),
        |_, rc| rc == 0,
    )
    .unwrap_or_else(|e| panic!("watchdog never armed: {e}"));
}

#[test]
fn a_hung_hadb_resets_its_node_and_a_clean_stop_does_not() {
    let assets = vm::assets();
    let (p1, p2) = vm::udp_port_pair();
    let mut vm = Vm::boot(
        assets,
        VmConfig::new("wdog", "hadb01", "10.10.10.4/24")
            .link(p1, p2)
            .data_disk_size(16 << 20)
            .file("/etc/hadb/hadb.toml", 0o644, CONFIG.as_bytes())
            .file("/etc/hadb/authkey", 0o600, &[7u8; 32]),
    )
    .expect("boot");
    vm.run_ok("hadb volume create-md");
    start_hadb(&mut vm);
    let log = vm.run_ok("cat /tmp/hadb.log");
    assert!(log.contains("armed, timeout 5 s"), "{log}");

    // A clean stop: magic close, no reset, well past the timeout.
    vm.run_ok("kill -TERM $(pidof hadb); while pidof hadb >/dev/null; do sleep 0.2; done");
    let log = vm.run_ok("cat /tmp/hadb.log");
    assert!(log.contains("watchdog: disarmed (clean stop)"), "{log}");
    std::thread::sleep(Duration::from_secs(9));
    assert!(!vm.has_exited(), "the VM reset after a clean stop");
    vm.run_ok("true");

    // Hung: SIGSTOP; the pets stop, the kernel resets the VM.
    start_hadb(&mut vm);
    vm.run_ok("kill -STOP $(pidof hadb)");
    let stopped = Instant::now();
    while !vm.has_exited() {
        assert!(
            stopped.elapsed() < Duration::from_secs(30),
            "the VM did not reset with hadb stopped:\n{}",
            vm.console_output()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = stopped.elapsed();
    // The last pet came at most a quarter of the timeout before the stop.
    assert!(
        after >= Duration::from_millis(3500) && after <= Duration::from_secs(9),
        "reset {after:?} after the stop; expected about the 5 s timeout"
    );
    eprintln!("watchdog reset {after:?} after SIGSTOP");
}
