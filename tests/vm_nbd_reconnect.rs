//! The kernel's NBD device outlives the process serving it, in a VM with
//! the real driver (Debian's 6.1): `/dev/nbd0`, connected over netlink with
//! a dead-connection timeout, carries a mounted ext4 while a writer fsyncs
//! small files; the server is killed with SIGKILL mid-writes, and a new
//! server process reattaches. Not one write may fail, the files must all be
//! there afterwards and e2fsck must find the filesystem clean. The negative
//! control shows the same kill without the dead-connection timeout does
//! fail writes, so the mechanism is what saves them.
//!
//! The server is `examples/nbd_file_server.rs` (built static and packed into
//! the VM's initramfs), serving /dev/vdb; see that file and
//! `src/sys/nbd_netlink.rs`.

#[path = "support/vm.rs"]
mod vm;
#[path = "support/vm_writer.rs"]
mod vm_writer;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use vm::{Vm, VmConfig};
use vm_writer::{
    WRITER_PATH, Write, dmesg_errors, longest_write, stop_writer, wait_writes, writer_script,
    writes,
};

const SERVER: &str = "/usr/local/bin/nbd_file_server";

/// `/sys/block/nbd0/queue/io_timeout` for the reconnect test: how long the
/// write that is in flight at the kill waits, after the reconnect, to be
/// resent (with the kernel's 30 s it took 30.8 s).
const IO_TIMEOUT_MS: u64 = 5000;

fn server_binary() -> &'static std::path::Path {
    static BIN: OnceLock<std::path::PathBuf> = OnceLock::new();
    BIN.get_or_init(|| vm::static_example("nbd_file_server"))
}

/// Prints the guest's logs when the test fails.
struct Guest {
    vm: Vm,
}

impl Drop for Guest {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let report = self
            .vm
            .run_timeout(
                "for f in /tmp/server*.log /tmp/events.log; do echo \"--- $f\"; cat $f; done; \
                 echo '--- writer.log (tail)'; tail -n 20 /tmp/writer.log; \
                 echo '--- dmesg (tail)'; dmesg | tail -n 40",
                Duration::from_secs(20),
            )
            .map(|(out, _)| out)
            .unwrap_or_else(|e| format!("(no report: {e})"));
        eprintln!("===== {} =====\n{report}", self.vm.name());
    }
}

fn boot(name: &str, hostname: &str) -> Guest {
    let assets = vm::assets();
    let mut cfg = VmConfig::new(name, hostname, "10.10.10.9/24")
        .data_disk_size(64 << 20)
        .initrd_file(SERVER, 0o755, server_binary());
    cfg.ip = None;
    let vm = Vm::boot(assets, cfg).unwrap_or_else(|e| panic!("{e}"));
    Guest { vm }
}

/// Starts a server in the background (`args` after the backing device) and
/// waits until it serves. `n` numbers its log files.
fn start_server(vm: &mut Vm, n: u32, args: &str) {
    vm.run_ok(&format!(
        "{SERVER} /dev/vdb {args} > /tmp/server{n}.out 2> /tmp/server{n}.log &\n\
         echo $! > /tmp/server.pid\n\
         echo \"server{n} started $(cut -d' ' -f1 /proc/uptime)\" >> /tmp/events.log"
    ));
    let out = vm
        .wait_until(
            &format!(
                "cat /tmp/server{n}.out; kill -0 $(cat /tmp/server.pid) 2>/dev/null || \
                 {{ echo 'server exited:'; cat /tmp/server{n}.log; }}"
            ),
            Duration::from_secs(30),
            Duration::from_millis(200),
            |out, _| out.contains("serving /dev/nbd0") || out.contains("server exited"),
        )
        .unwrap_or_else(|e| panic!("server{n} did not start: {e}"));
    assert!(!out.contains("server exited"), "server{n} failed:\n{out}");
}

/// Kills server `n` with SIGKILL while the kernel has requests out on its
/// connection (the worst case: a server that dies holding unanswered
/// requests). The server was started with `--hold-when /tmp/hold`: once
/// that file exists it answers nothing, and it is killed as soon as it
/// holds a request. Returns the uptime of the kill and the requests held
/// (/sys/block/nbd0/inflight would miss flushes: they are not counted).
fn kill_server(vm: &mut Vm, n: u32) -> (f64, Vec<String>) {
    vm.run_ok("touch /tmp/hold");
    let log = format!("/tmp/server{n}.log");
    vm.wait_until(
        &format!("grep -c holding {log} || true"),
        Duration::from_secs(60),
        Duration::from_millis(200),
        |out, _| out.trim() != "0",
    )
    .unwrap_or_else(|e| panic!("server{n} got no request to hold: {e}"));
    let out = vm.run_ok(&format!(
        "t=$(cut -d' ' -f1 /proc/uptime); kill -9 $(cat /tmp/server.pid); rm /tmp/hold; \
         echo \"killed $t\" >> /tmp/events.log; echo $t; grep holding {log}"
    ));
    let mut lines = out.lines();
    let t = lines
        .next()
        .and_then(|t| t.trim().parse().ok())
        .expect("uptime");
    (t, lines.map(str::to_owned).collect())
}

/// Makes ext4 on /dev/nbd0, mounts it on /mnt and starts the writer; returns
/// once it has written `first` files.
fn mount_and_write(vm: &mut Vm, first: usize) {
    vm.run_ok(
        "set -e; mke2fs -q -t ext4 -E lazy_itable_init=0,lazy_journal_init=0 /dev/nbd0; \
         mkdir -p /mnt; mount -t ext4 /dev/nbd0 /mnt; mkdir /mnt/w; sync",
    );
    vm.write_file(WRITER_PATH, 0o755, writer_script("/mnt/w").as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    vm.run_ok("sh /tmp/writer.sh > /tmp/writer.out 2>&1 &");
    wait_writes(vm, first, Duration::from_secs(120));
}

fn nbd_dmesg(vm: &mut Vm) -> String {
    vm.run_ok("dmesg | grep -i -E 'nbd|ext4|jbd2' | tail -n 30")
}

#[test]
fn the_device_survives_a_killed_server() {
    let mut guest = boot("hadb-nbd-reconnect", "hadb-nbd1");
    let vm = &mut guest.vm;
    let started = Instant::now();

    start_server(
        vm,
        1,
        &format!(
            "--index 0 --dead-conn-timeout 30 --io-timeout-ms {IO_TIMEOUT_MS} \
             --hold-when /tmp/hold"
        ),
    );
    assert_eq!(
        vm.run_ok(&format!("{SERVER} --index 0 --status")).trim(),
        "Connected"
    );
    assert_eq!(
        vm.run_ok("cat /sys/block/nbd0/backend").trim(),
        "nbd_file_server:/dev/vdb"
    );
    let io_timeout = vm.run_ok("cat /sys/block/nbd0/queue/io_timeout");
    mount_and_write(vm, 40);

    // SIGKILL mid-writes: no Drop, no clean-up, the socket just closes.
    let (killed, held) = kill_server(vm, 1);
    std::thread::sleep(Duration::from_secs(2));
    let dead_for = vm.run_ok("cat /proc/uptime | cut -d' ' -f1");
    start_server(
        vm,
        2,
        &format!("--index 0 --reattach --io-timeout-ms {IO_TIMEOUT_MS}"),
    );
    let reattached: f64 = vm
        .run_ok("grep '^server2 started' /tmp/events.log | cut -d' ' -f3")
        .trim()
        .parse()
        .expect("uptime");

    // A second server cannot take a device whose connection is alive.
    let (out, rc) = vm
        .run(&format!("{SERVER} /dev/vdb --index 0 --reattach 2>&1"))
        .expect("run a third server");
    assert_ne!(rc, 0, "a second reattach was accepted: {out}");
    assert!(out.contains("still has a live connection"), "{out}");
    // Nor connect it afresh.
    let (out, rc) = vm
        .run(&format!("{SERVER} /dev/vdb --index 0 2>&1"))
        .expect("run a connecting server");
    assert_ne!(rc, 0, "a second connect was accepted: {out}");
    assert!(out.contains("/dev/nbd0 is in use"), "{out}");

    // Let the writer go on well past the resend of the requests that were in
    // flight at the kill (one io_timeout after the reconnect).
    let before = writes(vm).len();
    wait_writes(vm, before + 40, Duration::from_secs(120));
    let settle = Duration::from_secs(3);
    std::thread::sleep(settle);
    assert!(
        stop_writer(vm, Duration::from_secs(60)),
        "the writer did not stop"
    );
    let log = writes(vm);
    let failed: Vec<&Write> = log.iter().filter(|w| !w.ok).collect();
    let during: Vec<&Write> = log
        .iter()
        .filter(|w| w.start < reattached && w.end > killed)
        .collect();
    let longest = longest_write(&log);
    let last_before = log
        .iter()
        .filter(|w| w.end <= killed)
        .map(|w| w.end)
        .fold(0.0, f64::max);
    let first_after = log
        .iter()
        .filter(|w| w.end > killed)
        .map(|w| w.end)
        .fold(f64::INFINITY, f64::min);
    eprintln!(
        "vm_nbd_reconnect: io_timeout {} ms; {} writes, {} failed; killed at {killed:.2} \
         holding {held:?}, \
         new server at {reattached:.2} (uptime {}); writes spanning the outage: {:?}; \
         longest single write {longest:.2} s; no write completed from {last_before:.2} to \
         {first_after:.2} ({:.2} s)",
        io_timeout.trim(),
        log.len(),
        failed.len(),
        dead_for.trim(),
        during
            .iter()
            .map(|w| format!("#{} {:.2}..{:.2}", w.i, w.start, w.end))
            .collect::<Vec<_>>(),
        first_after - last_before
    );
    eprintln!(
        "vm_nbd_reconnect: server2: {}\nkernel:\n{}",
        vm.run_ok("cat /tmp/server2.log"),
        nbd_dmesg(vm)
    );
    assert!(failed.is_empty(), "writes failed: {failed:?}");
    // The write in flight at the kill waited for the reconnect and then at
    // most about one io_timeout, not the kernel's default 30 s.
    assert!(
        longest < (reattached - killed) + (IO_TIMEOUT_MS as f64 / 1000.0) + 8.0,
        "a write took {longest:.2} s: the in-flight request was not resent after one io_timeout"
    );
    let errors = dmesg_errors(vm);
    assert!(
        errors.is_empty(),
        "I/O errors in dmesg:\n{}",
        errors.join("\n")
    );
    assert!(
        log.iter().any(|w| w.start > reattached),
        "no write started after the reattach"
    );
    assert_eq!(
        vm.run_ok("grep -c ' /mnt ' /proc/mounts").trim(),
        "1",
        "/mnt is no longer mounted"
    );

    // Every write the writer saw succeed is there, read back through the
    // new server (the page cache dropped).
    let bad = vm.run_ok(
        "sync; echo 3 > /proc/sys/vm/drop_caches; n=0; \
         for i in $(awk '$1 == \"ok\" { print $2 }' /tmp/writer.log); do \
             yes \"hadb-$i\" | head -c 8192 | cmp -s - /mnt/w/f$i || echo \"bad f$i\"; n=$((n+1)); \
         done; echo \"checked $n\"",
    );
    assert!(!bad.contains("bad"), "files differ:\n{bad}");
    assert!(
        bad.contains(&format!("checked {}", log.len())),
        "not every file checked: {bad}"
    );

    vm.run_ok("umount /mnt");
    let (out, rc) = vm.run("e2fsck -fn /dev/nbd0").expect("run e2fsck");
    assert_eq!(rc, 0, "e2fsck -fn /dev/nbd0 found problems:\n{out}");

    // Disconnect: the device is free again and the server sees the end.
    vm.run_ok(&format!("{SERVER} --index 0 --disconnect"));
    vm.wait_until(
        &format!("{SERVER} --index 0 --status"),
        Duration::from_secs(20),
        Duration::from_millis(300),
        |out, rc| rc == 0 && out.trim() == "Free",
    )
    .unwrap_or_else(|e| panic!("/dev/nbd0 not free after disconnect: {e}"));
    vm.wait_until(
        "cat /tmp/server2.log",
        Duration::from_secs(20),
        Duration::from_millis(300),
        |out, _| out.contains("connection ended"),
    )
    .unwrap_or_else(|e| panic!("server2 did not see the disconnect: {e}"));
    // A disconnected device is no longer there to reattach.
    let (out, rc) = vm
        .run(&format!("{SERVER} /dev/vdb --index 0 --reattach 2>&1"))
        .expect("run a late server");
    assert_ne!(rc, 0, "reattached a disconnected device: {out}");
    assert!(out.contains("not connected over netlink"), "{out}");
    eprintln!("vm_nbd_reconnect: survived in {:.1?}", started.elapsed());
}

/// Without a dead-connection timeout the same kill fails writes: the test
/// above proves something.
#[test]
fn without_dead_conn_timeout_the_kill_fails_writes() {
    let mut guest = boot("hadb-nbd-control", "hadb-nbd2");
    let vm = &mut guest.vm;

    start_server(
        vm,
        1,
        "--index 0 --dead-conn-timeout 0 --hold-when /tmp/hold",
    );
    mount_and_write(vm, 20);
    let (killed, held) = kill_server(vm, 1);

    // Failures show up in the kernel's log (the journal's next commit fails)
    // and in the writer's, unless its own write is the one stuck in flight.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (failed, errors) = loop {
        let failed: Vec<Write> = writes(vm).into_iter().filter(|w| !w.ok).collect();
        let errors = dmesg_errors(vm);
        if !errors.is_empty() || !failed.is_empty() || Instant::now() > deadline {
            // A moment more for the rest of the story.
            std::thread::sleep(Duration::from_secs(3));
            let failed: Vec<Write> = writes(vm).into_iter().filter(|w| !w.ok).collect();
            break (failed, dmesg_errors(vm));
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let first_failure = failed.first().map(|w| w.end - killed);
    eprintln!(
        "vm_nbd_reconnect (control): killed at {killed:.2} holding {held:?}; \
         {} failed writes, first {:?} s \
         after the kill: {:?}\nkernel errors ({}):\n{}",
        failed.len(),
        first_failure,
        failed.iter().take(3).collect::<Vec<_>>(),
        errors.len(),
        errors
            .iter()
            .take(12)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        !failed.is_empty() || !errors.is_empty(),
        "killing the server without a dead-connection timeout failed nothing: the test of \
         the reconnect proves nothing"
    );
    // Unstick whatever still waits on the dead connection, so the writer ends.
    vm.run_ok(&format!("{SERVER} --index 0 --disconnect"));
    stop_writer(vm, Duration::from_secs(30));
}
