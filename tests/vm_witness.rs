//! The `watchdog` fence method on real kernels: three VMs, the pair and a
//! witness (`role = "witness"`, from the kernel command line), each node
//! joined to the witness by a link of its own. Softdog armed with a 6 s
//! timeout on both nodes. hadb on the primary is SIGSTOPped: it stops
//! petting and the kernel resets the VM (qemu exits under -no-reboot);
//! the secondary wins the witness's vote, fences the old primary through
//! `watchdog` (twice its advertised timeout of silence) and takes over
//! with every byte written before.

#[path = "support/vm.rs"]
#[macro_use]
mod vm;
#[path = "support/vm_pair.rs"]
mod vm_pair;

use std::time::{Duration, Instant};

use vm::{Vm, VmConfig};
use vm_pair::{status, wait_nbd, wait_status};

const CONFIG: &str = concat!(
    pair_nodes!(),
    r#"
[witness]
node = "hadbw"
address = "10.10.30.6"

[volume]
device = "/dev/vdb"
nbd_device = "/dev/nbd0"

[fencing]
methods = ["watchdog"]

[watchdog]
enabled = true
timeout = "6s"
"#
);

/// Each VM's report when the test fails.
struct Report<'a>(&'a mut [Vm]);

impl Drop for Report<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for vm in self.0.iter_mut() {
            let mut report = String::new();
            for cmd in ["tail -n 60 /tmp/hadb.log", "hadb status 2>&1"] {
                let out = vm
                    .run_timeout(cmd, Duration::from_secs(10))
                    .map(|(out, rc)| format!("{out}(rc {rc})"))
                    .unwrap_or_else(|e| format!("(no answer: {e})"));
                report += &format!("--- {cmd}\n{out}\n");
            }
            eprintln!("===== {} =====\n{report}", vm.name());
        }
    }
}

#[test]
fn a_hung_primary_resets_itself_and_the_vote_holder_fences_it_by_waiting() {
    let assets = vm::assets();
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).expect("random bytes for the auth key");
    let (p1, p2) = vm::udp_port_pair();
    let (p3, p4) = vm::udp_port_pair();
    let (p5, p6) = vm::udp_port_pair();
    let common = |c: VmConfig| {
        c.file("/etc/hadb/hadb.toml", 0o644, CONFIG.as_bytes())
            .file("/etc/hadb/authkey", 0o600, &key)
            .data_disk_size(32 << 20)
    };
    let mut vms = vm::boot_all(
        assets,
        vec![
            common(
                VmConfig::new("wit1", "hadb01", "10.10.10.4/24")
                    .link(p1, p2)
                    .link(p3, p4),
            ),
            common(
                VmConfig::new("wit2", "hadb02", "10.10.10.5/24")
                    .link(p2, p1)
                    .link(p5, p6),
            ),
            common(
                VmConfig::new("witw", "hadbw", "10.10.20.6/24")
                    .link(p4, p3)
                    .link(p6, p5)
                    .append("hadb.role=witness"),
            ),
        ],
    );
    let report = Report(&mut vms);
    let [vm1, vm2, w] = &mut *report.0 else {
        panic!("three VMs");
    };
    // Each node reaches the witness's address over its own link; the
    // witness routes back to the nodes' ring0 addresses.
    vm1.run_ok(
        "ip link set eth1 up && ip addr add 10.10.20.4/24 dev eth1 && ip route add 10.10.30.6/32 via 10.10.20.6",
    );
    vm2.run_ok(
        "ip link set eth1 up && ip addr add 10.10.21.5/24 dev eth1 && ip route add 10.10.30.6/32 via 10.10.21.6",
    );
    w.run_ok(
        "ip link set eth1 up && ip addr add 10.10.21.6/24 dev eth1 && ip addr add 10.10.30.6/32 dev lo \
         && ip route add 10.10.10.4/32 via 10.10.20.4 && ip route add 10.10.10.5/32 via 10.10.21.5",
    );
    w.run_ok("hadb config check >/dev/null && mkdir -p /run/hadb; hadb run >/tmp/hadb.log 2>&1 &");
    wait_status(
        w,
        "answering as the witness",
        Duration::from_secs(30),
        |s| s["role"] == "witness",
    );
    for vm in [&mut *vm1, &mut *vm2] {
        vm.run_ok("hadb volume create-md");
        vm.run_ok("mkdir -p /run/hadb; hadb run >/tmp/hadb.log 2>&1 &");
    }
    for vm in [&mut *vm1, &mut *vm2] {
        wait_status(
            vm,
            "hearing the witness, watchdog armed",
            Duration::from_secs(60),
            |s| s["heartbeat"]["witness"]["heard"] == true && s["watchdog"]["armed"] == true,
        );
    }
    vm_pair::make_primary(vm1);
    wait_status(
        vm1,
        "primary, the peer up to date",
        Duration::from_secs(180),
        |s| {
            s["volume"]["role"] == "primary"
                && s["volume"]["peer_up_to_date"] == true
                && s["volume"]["resync"].is_null()
        },
    );
    let test = vm1.run_ok("hadb fence test; echo rc=$?");
    assert!(
        test.contains("advertises an armed watchdog of 6 s") && test.contains("rc=0"),
        "{test}"
    );

    // 8 MiB written through the kernel device and flushed.
    wait_nbd(vm1, true);
    let written = vm1.run_ok(
        "dd if=/dev/urandom of=/tmp/pat bs=1M count=8 2>/dev/null && \
         dd if=/tmp/pat of=/dev/nbd0 bs=1M oflag=direct conv=fsync 2>/dev/null && sha256sum </tmp/pat",
    );

    // hadb hangs on the primary: no more pets, no more heartbeats.
    vm1.run_ok("kill -STOP $(pidof hadb)");
    let hung = Instant::now();
    while !vm1.has_exited() {
        assert!(
            hung.elapsed() < Duration::from_secs(60),
            "hadb01 was not reset by its watchdog:\n{}",
            vm1.console_output()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let reset_after = hung.elapsed();

    let st = wait_status(vm2, "primary", Duration::from_secs(120), |s| {
        s["volume"]["role"] == "primary"
    });
    let took_over = hung.elapsed();
    let attempts = st["manager"]["fence_attempts"].to_string();
    assert!(
        attempts.contains("\"watchdog\"") && attempts.contains("confirmed"),
        "hadb02 fenced hadb01 through the watchdog method: {attempts}"
    );
    assert_eq!(st["heartbeat"]["witness"]["vote"], "mine", "{st}");
    let ws = status(w).expect("the witness answers");
    assert_eq!(ws["vote"], "hadb02", "{ws}");
    // Not before the old primary's reset: the fence waited twice its
    // watchdog timeout.
    assert!(
        took_over > reset_after,
        "took over at {took_over:?}, reset at {reset_after:?}"
    );
    wait_nbd(vm2, true);
    let read = vm2.run_ok("dd if=/dev/nbd0 bs=1M count=8 iflag=direct 2>/dev/null | sha256sum");
    assert_eq!(read, written, "hadb02 holds every byte hadb01 wrote");
    eprintln!(
        "vm_witness: hadb01 reset {reset_after:?} after its hadb hung; hadb02 primary after {took_over:?}"
    );
}
