//! A writer inside a test VM that logs every write it makes, for the tests
//! that kill or restart what sits under a mounted volume and must show that
//! no write failed and none hung for long.
//!
//! Each VM test binary includes it and uses part of it, hence `dead_code`.

#![allow(dead_code)]

use std::time::Duration;

use crate::vm::Vm;

/// Where the writer script goes in the guest.
pub const WRITER_PATH: &str = "/tmp/writer.sh";

/// Writes one file after another in `dir` (8 KiB each, `dd conv=fsync`),
/// logging `ok I START END` (uptime seconds) or `FAIL I START END ERROR`
/// to /tmp/writer.log, until /tmp/writer.stop exists. The log is on tmpfs,
/// not on the device under test.
pub fn writer_script(dir: &str) -> String {
    format!(
        r#"i=0
mkdir -p {dir}
: > /tmp/writer.log
while [ ! -e /tmp/writer.stop ]; do
    i=$((i+1))
    t0=$(cut -d' ' -f1 /proc/uptime)
    if out=$(yes "hadb-$i" | head -c 8192 | dd of={dir}/f$i bs=4096 conv=fsync 2>&1); then
        echo "ok $i $t0 $(cut -d' ' -f1 /proc/uptime)" >> /tmp/writer.log
    else
        echo "FAIL $i $t0 $(cut -d' ' -f1 /proc/uptime) $(echo $out | tr '\n' ' ')" >> /tmp/writer.log
    fi
done
echo "stopped $i" >> /tmp/writer.log
"#
    )
}

/// Kernel messages that mean an I/O failed.
pub const IO_ERRORS: &[&str] = &[
    "I/O error",
    "blk_update_request",
    "Buffer I/O error",
    "EXT4-fs error",
    "Aborting journal",
    "Remounting filesystem read-only",
];

/// One line of the writer's log.
#[derive(Debug, Clone)]
pub struct Write {
    pub ok: bool,
    pub i: u64,
    pub start: f64,
    pub end: f64,
    pub line: String,
}

pub fn writes(vm: &mut Vm) -> Vec<Write> {
    vm.run_ok("cat /tmp/writer.log")
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let ok = match *f.first()? {
                "ok" => true,
                "FAIL" => false,
                _ => return None,
            };
            Some(Write {
                ok,
                i: f.get(1)?.parse().ok()?,
                start: f.get(2)?.parse().ok()?,
                end: f.get(3)?.parse().ok()?,
                line: l.to_owned(),
            })
        })
        .collect()
}

/// The longest a single successful write took, in seconds.
pub fn longest_write(log: &[Write]) -> f64 {
    log.iter()
        .filter(|w| w.ok)
        .map(|w| w.end - w.start)
        .fold(0.0, f64::max)
}

/// Waits until the writer has logged `n` writes (ok or failed).
pub fn wait_writes(vm: &mut Vm, n: usize, timeout: Duration) {
    vm.wait_until(
        "grep -c -E '^(ok|FAIL) ' /tmp/writer.log || true",
        timeout,
        Duration::from_millis(300),
        |out, _| out.trim().parse::<usize>().unwrap_or(0) >= n,
    )
    .unwrap_or_else(|e| panic!("the writer did not get to {n} writes: {e}"));
}

/// Asks the writer to stop; whether it did within `timeout`.
pub fn stop_writer(vm: &mut Vm, timeout: Duration) -> bool {
    vm.run_ok("touch /tmp/writer.stop");
    vm.wait_until(
        "grep -c '^stopped' /tmp/writer.log || true",
        timeout,
        Duration::from_millis(500),
        |out, _| out.trim() == "1",
    )
    .is_ok()
}

/// The kernel's messages that name a failed I/O.
pub fn dmesg_errors(vm: &mut Vm) -> Vec<String> {
    vm.run_ok("dmesg")
        .lines()
        .filter(|l| IO_ERRORS.iter().any(|e| l.contains(e)))
        .map(str::to_owned)
        .collect()
}
