//! Two VMs booted from the test image as a hadb pair, shared by the VM
//! tests: hadb01 primary and hadb02 an up-to-date secondary, with helpers to
//! read and wait for `hadb status`, and a report of both nodes when a test
//! fails.
//!
//! Each VM test binary includes it and uses part of it, hence `dead_code`.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::vm::{self, Vm, VmConfig};

/// Each node's data disk.
const DATA_DISK: u64 = 64 << 20;

pub struct Pair {
    pub vm1: Vm,
    pub vm2: Vm,
}

impl Drop for Pair {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for vm in [&mut self.vm1, &mut self.vm2] {
            // One command each: a report cut short by the OOM killer still
            // says the rest.
            let mut report = String::new();
            for cmd in [
                "dmesg | tail -n 60",
                "tail -n 100 /tmp/hadb.log",
                "tail -n 20 /tmp/writer.log",
                "ps; free",
                "hadb status 2>&1",
            ] {
                let out = vm
                    .run_timeout(cmd, Duration::from_secs(20))
                    .map(|(out, rc)| format!("{out}(rc {rc})"))
                    .unwrap_or_else(|e| format!("(no answer: {e})"));
                report += &format!("--- {cmd}\n{out}\n");
            }
            eprintln!("===== {} =====\n{report}", vm.name());
        }
    }
}

pub fn status(vm: &mut Vm) -> Option<Value> {
    match vm.run("hadb status --json") {
        Ok((out, 0)) => serde_json::from_str(out.trim()).ok(),
        _ => None,
    }
}

pub fn replicating_as(st: &Value, role: &str) -> bool {
    let v = &st["volume"];
    v["role"] == role
        && v["link"] == "connected"
        && !v["peer"].is_null()
        && v["peer_up_to_date"] == Value::Bool(true)
        && v["resync"].is_null()
}

pub fn wait_status(
    vm: &mut Vm,
    what: &str,
    timeout: Duration,
    want: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Some(st) = status(vm) {
            if want(&st) {
                return st;
            }
            last = Some(st);
        }
        assert!(
            Instant::now() < deadline,
            "{}: not {what} after {timeout:?}; last status: {}",
            vm.name(),
            last.map(|s| s.to_string())
                .unwrap_or_else(|| "none (daemon not answering)".into())
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `hadb volume primary` on `vm`, asked again every second for up to a
/// minute: at start the peer's answer (or the link) may not be there yet.
pub fn make_primary(vm: &mut Vm) {
    if let Err(e) = vm.wait_until(
        "hadb volume primary",
        Duration::from_secs(60),
        Duration::from_secs(1),
        |_, rc| rc == 0,
    ) {
        panic!("hadb volume primary on {}: {e}", vm.name());
    }
}

/// Waits until /dev/nbd0 is attached (has a size) or detached (size 0).
pub fn wait_nbd(vm: &mut Vm, attached: bool) {
    let want = if attached { "attached" } else { "detached" };
    vm.wait_until(
        "blockdev --getsize64 /dev/nbd0",
        Duration::from_secs(60),
        Duration::from_millis(300),
        |out, rc| rc == 0 && (out.trim() != "0") == attached,
    )
    .unwrap_or_else(|e| panic!("/dev/nbd0 not {want}: {e}"));
}

/// Two VMs from the test image with `config` as /etc/hadb/hadb.toml:
/// metadata created, `hadb run` started on both, hadb01 made primary and
/// its peer caught up, /dev/nbd0 attached on hadb01.
pub fn boot_pair(name: &str, config: &str, files: &[(&str, u32, &[u8])]) -> Pair {
    boot_pair_with(name, config, files, &[])
}

/// [`boot_pair`], with host files put in both VMs through the initramfs
/// (guest path, host path; mode 0755): large ones, such as binaries.
pub fn boot_pair_with(
    name: &str,
    config: &str,
    files: &[(&str, u32, &[u8])],
    initrd_files: &[(String, std::path::PathBuf)],
) -> Pair {
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
    let with_files = |mut c: VmConfig| {
        for (path, mode, data) in files {
            c = c.file(path, *mode, data);
        }
        for (path, host) in initrd_files {
            c = c.initrd_file(path, 0o755, host);
        }
        c
    };
    let mut vms = vm::boot_all(
        assets,
        vec![
            with_files(vm_config(
                &format!("{name}1"),
                "hadb01",
                "10.10.10.4/24",
                (p1, p2),
            )),
            with_files(vm_config(
                &format!("{name}2"),
                "hadb02",
                "10.10.10.5/24",
                (p2, p1),
            )),
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
    make_primary(vm1);
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
