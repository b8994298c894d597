//! Boots two VMs on a private network and checks the test bed itself: the
//! devices hadb needs exist, the data disk has its size, the VMs reach each
//! other, and the static hadb binary runs inside.

#[path = "support/vm.rs"]
mod vm;

use std::time::{Duration, Instant};

use vm::VmConfig;

const DATA_DISK: u64 = 64 << 20;

#[test]
fn two_vms_boot_and_talk() {
    let started = Instant::now();
    let assets = vm::assets();
    let prepared = started.elapsed();
    let hadb_sha = vm::host_sha256(&assets.hadb);

    let (p1, p2) = vm::udp_port_pair();
    let mut vms = vm::boot_all(
        assets,
        vec![
            VmConfig::new("vm1", "hadb01", "10.10.10.4/24")
                .link(p1, p2)
                .data_disk_size(DATA_DISK),
            VmConfig::new("vm2", "hadb02", "10.10.10.5/24")
                .link(p2, p1)
                .data_disk_size(DATA_DISK),
        ],
    );
    let booted = started.elapsed();
    let mut vm2 = vms.pop().unwrap();
    let mut vm1 = vms.pop().unwrap();

    // The harness itself: exact output, exit codes, multi-line scripts.
    assert_eq!(vm1.run("printf 'a\\nb'").unwrap(), ("a\nb".to_owned(), 0));
    assert_eq!(
        vm1.run("echo out; echo err >&2; exit 3").unwrap(),
        ("out\nerr\n".to_owned(), 3)
    );
    let (out, rc) = vm1
        .run("cat <<'EOF'\nline with $dollar and 'quotes'\nEOF\nfalse || echo fallback")
        .unwrap();
    assert_eq!(
        (out.as_str(), rc),
        ("line with $dollar and 'quotes'\nfallback\n", 0)
    );
    vm1.write_file("/etc/hadb/probe", 0o600, &[0, 1, 2, 255, b'\n', b'x'])
        .unwrap();
    assert_eq!(
        vm1.run_ok("od -An -tx1 /etc/hadb/probe | tr -s ' \\n' ' '"),
        " 00 01 02 ff 0a 78 "
    );
    assert_eq!(vm1.run_ok("stat -c %a /etc/hadb/probe"), "600\n");
    let t = Instant::now();
    let (out, rc) = vm1.run_timeout("sleep 30", Duration::from_secs(2)).unwrap();
    assert_eq!(
        rc, 137,
        "the guest kills a script at its time limit:\n{out}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "killed after {:.1?}",
        t.elapsed()
    );

    for (vm, hostname, peer) in [
        (&mut vm1, "hadb01", "10.10.10.5"),
        (&mut vm2, "hadb02", "10.10.10.4"),
    ] {
        let name = vm.name().to_owned();
        assert_eq!(
            vm.run_ok("hostname"),
            format!("{hostname}\n"),
            "{name}: host name"
        );

        // The kernel NBD driver and the watchdog are loaded.
        vm.run_ok("test -b /dev/nbd0");
        vm.run_ok("test -c /dev/watchdog");

        // The data disk is the second virtio disk and has its size.
        assert_eq!(
            vm.run_ok("blockdev --getsize64 /dev/vdb"),
            format!("{DATA_DISK}\n"),
            "{name}: /dev/vdb size"
        );
        assert_eq!(
            vm.run_ok("cat /sys/block/vdb/size"),
            format!("{}\n", DATA_DISK / 512)
        );

        // ext4 tools from the host work inside (the volume test needs them).
        vm.run_ok("mke2fs -t ext4 -q -F /dev/vdb && e2fsck -fn /dev/vdb");

        // The peer answers.
        let (out, rc) = vm
            .run_timeout(&format!("ping -c 3 -w 20 {peer}"), Duration::from_secs(30))
            .unwrap();
        assert_eq!(rc, 0, "{name}: ping {peer} failed:\n{out}");
        assert!(
            out.contains(&format!("bytes from {peer}")),
            "{name}: no reply from {peer}:\n{out}"
        );

        // The static hadb binary is the one just built, and it runs.
        assert_eq!(
            vm.run_ok("sha256sum /usr/sbin/hadb | cut -d' ' -f1"),
            format!("{hadb_sha}\n")
        );
        let (out, rc) = vm.run("hadb --help").unwrap();
        assert_eq!(rc, 0, "{name}: hadb --help exited {rc}:\n{out}");
    }

    // A TCP connection across the link (replication runs over TCP).
    vm2.run_ok("(nc -l -p 7789 > /tmp/received; echo done >> /tmp/received) >/dev/null 2>&1 &");
    let out = vm1
        .wait_until(
            "echo hello-over-tcp | nc -w 3 10.10.10.5 7789",
            Duration::from_secs(30),
            Duration::from_millis(500),
            |_, rc| rc == 0,
        )
        .unwrap();
    assert_eq!(out, "");
    let received = vm2
        .wait_until(
            "cat /tmp/received",
            Duration::from_secs(20),
            Duration::from_millis(300),
            |out, _| out.contains("done"),
        )
        .unwrap();
    assert_eq!(received, "hello-over-tcp\ndone\n");

    // The monitor answers (tests use it for hard power-offs).
    let info = vm1.monitor("info status").unwrap();
    assert!(info.contains("VM status: running"), "monitor said: {info}");

    let dir = vm1.dir().to_owned();
    drop(vm1);
    drop(vm2);
    assert!(
        !dir.exists(),
        "the VM's temp dir {} is removed",
        dir.display()
    );
    eprintln!(
        "vm_smoke: prepare {prepared:.1?}, boot {:.1?}, total {:.1?}",
        booted - prepared,
        started.elapsed()
    );
}
