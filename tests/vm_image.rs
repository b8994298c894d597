//! The disk image: `image/build --distro debian` makes it (its root file
//! system cached, so a rerun redoes only the customising and the disk, or
//! nothing when nothing changed), and it boots under qemu TCG through
//! firmware and a real boot loader, with no -kernel: SeaBIOS and syslinux,
//! then OVMF and systemd-boot. Each VM gets its identity from a config disk
//! (label HADBCFG) and, on the BIOS boot, from a word typed at syslinux's
//! prompt. Over the serial console the test checks what the image promises
//! (image/README.md).

#[path = "support/vm.rs"]
mod vm;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vm::{DiskVmConfig, NetLink, Vm};

/// root's password on the test VMs (set through the config disk).
const PASSWORD: &str = "hadb-image-test";
/// `openssl passwd -6 -salt hadbimagetest hadb-image-test`
const PASSWORD_HASH: &str = "$6$hadbimagetest$KmgazzYZ7pXQKY2.xxqan5pzLKSfFptTbfixvQJBvFcIqXuTtzCseWNr3g3S78ywP26phVX6qaBAXPbqscxi8.";
const AUTHORIZED_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHadbImageTestKeyNotARealOneAtAll0000000000 test@hadb\n";
const DATA_DISK: u64 = 64 << 20;
/// The overlay is larger than the image: the root file system grows into it.
const SYSTEM_DISK: u64 = 3 << 30;
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";

/// A `hadb-` temp dir for the test's own files, removed on drop (also on
/// failure) unless HADB_VM_KEEP is set.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("hadb-image-test-{}-{nanos:x}", std::process::id()));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("HADB_VM_KEEP").is_some() {
            eprintln!("vm_image: keeping {}", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds (or finds up to date) the Debian image; returns the raw file.
fn build_image(hadb: &Path) -> PathBuf {
    let uid = fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    assert_eq!(
        uid, 0,
        "image/build needs root (mmdebstrap --mode=root); run this test as root"
    );
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(vm::repo_root().join("image/build"))
        .args(["--distro", "debian", "--formats", "raw", "--out"])
        .arg(vm::target_dir().join("vm-image"))
        .arg("--hadb")
        .arg(hadb)
        .current_dir(vm::repo_root())
        .stdin(Stdio::null())
        .output()
        .expect("run image/build");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "image/build --distro debian failed ({}):\n{stderr}",
        out.status
    );
    // The build's own timings, for the test log.
    eprint!("{stderr}");
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(PathBuf::from)
        .expect("image/build printed the image's path");
    assert!(path.is_file(), "{} is missing", path.display());
    eprintln!(
        "vm_image: image ready in {:.1?}: {}",
        started.elapsed(),
        path.display()
    );
    path
}

/// A config disk: a small FAT file system labelled HADBCFG holding `files`.
fn config_disk(dir: &Path, name: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let disk = dir.join(format!("{name}.vfat"));
    run(Command::new("mkfs.vfat")
        .args(["-n", "HADBCFG", "-C"])
        .arg(&disk)
        .arg("2048"));
    for (file, contents) in files {
        let src = dir.join(format!("{name}-{file}"));
        fs::write(&src, contents).expect("write a config disk file");
        run(Command::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(&disk)
            .arg(&src)
            .arg(format!("::/{file}")));
    }
    disk
}

fn hadb_toml(console: Option<&str>) -> String {
    let mut t = String::from(
        "cluster = \"lab\"\nkey_file = \"/etc/hadb/authkey\"\n\n\
         [nodes.hadb01]\naddress = \"10.10.10.4\"\n[nodes.hadb02]\naddress = \"10.10.10.5\"\n\n\
         [volume]\ndevice = \"/dev/vdb\"\nnbd_device = \"/dev/nbd0\"\n",
    );
    if let Some(c) = console {
        t += &format!("\n[control]\nconsole = \"{c}\"\n");
    }
    t
}

/// `vm.run(script)`'s output, trimmed, whatever its exit code.
fn out(vm: &mut Vm, script: &str) -> String {
    match vm.run(script) {
        Ok((out, _)) => out.trim().to_owned(),
        Err(e) => panic!("{e}"),
    }
}

/// Waits until `systemctl is-active UNIT` says active.
fn wait_active(vm: &mut Vm, unit: &str, timeout: Duration) {
    vm.wait_until(
        &format!("systemctl is-active {unit}"),
        timeout,
        Duration::from_secs(1),
        |out, _| out.trim() == "active",
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

/// Waits until `dev` has the IPv4 address `addr` (a prefix of `ip -o`'s
/// ADDR/LEN).
fn wait_address(vm: &mut Vm, dev: &str, addr: &str) {
    vm.wait_until(
        &format!("ip -4 -o addr show dev {dev}"),
        Duration::from_secs(60),
        Duration::from_secs(1),
        |out, _| out.contains(addr),
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

/// Talks to hadb's prompt on the VM's second serial port: sends `line`,
/// returns what came back up to the next prompt.
fn serial1_command(vm: &Vm, line: &str) -> String {
    let sock = vm.dir().join("serial1.sock");
    let mut s =
        UnixStream::connect(&sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .expect("set a read timeout on ttyS1's socket");
    s.write_all(format!("{line}\r").as_bytes())
        .expect("write to ttyS1's socket");
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        let text = vm::strip_terminal_noise(&String::from_utf8_lossy(&got));
        if let Some(i) = text.find(&format!("{line}\n"))
            && text[i..].contains("\nhadb> ")
        {
            return text[i..].to_owned();
        }
        if Instant::now() > deadline {
            panic!("no answer to `{line}` from hadb's prompt on ttyS1; got:\n{text}");
        }
    }
    panic!("ttyS1 closed");
}

#[test]
fn image_boots_through_bios_and_uefi() {
    let started = Instant::now();
    let hadb = vm::static_hadb_binary();
    let hadb_sha = vm::host_sha256(&hadb);
    let image = build_image(&hadb);
    let built = started.elapsed();
    let tmp = TempDir::new();
    let authkey = [0x5au8; 32];

    // ---------------------------------------------------------- BIOS ----
    // hadb01: its name and eth1's address from the kernel command line
    // (typed at syslinux's prompt), the rest from its config disk; hadb's
    // prompt on ttyS1.
    let toml = hadb_toml(Some("/dev/ttyS1"));
    let cfg_disk = config_disk(
        &tmp.0,
        "hadb01",
        &[
            ("hadb.toml", toml.as_bytes()),
            ("authkey", &authkey),
            ("root-password-hash", PASSWORD_HASH.as_bytes()),
            ("authorized_keys", AUTHORIZED_KEY.as_bytes()),
        ],
    );
    let data = tmp.0.join("hadb01-data.raw");
    fs::File::create(&data)
        .and_then(|f| f.set_len(DATA_DISK))
        .expect("create the data disk");
    let (p1, p2) = vm::udp_port_pair();
    let mut cfg = DiskVmConfig::new("hadb01", &image, PASSWORD);
    cfg.system_disk_size = Some(SYSTEM_DISK);
    cfg.disks = vec![data, cfg_disk];
    cfg.user_net = true;
    cfg.links = vec![NetLink {
        local: p1,
        remote: p2,
    }];
    cfg.second_serial = true;
    cfg.boot_words = Some("hadb.node=hadb01 ip=10.10.10.4:::255.255.255.0::eth1:none".to_owned());
    let boot_started = Instant::now();
    let mut vm = Vm::boot_disk(cfg).unwrap_or_else(|e| panic!("{e}"));
    let bios_times = vm.boot_times().to_vec();

    // Through SeaBIOS and syslinux, with the typed word.
    let log = vm.serial_log();
    assert!(log.contains("SYSLINUX"), "syslinux did not run:\n{log}");
    let cmdline = vm.run_ok("cat /proc/cmdline");
    for word in [
        "BOOT_IMAGE=/vmlinuz",
        "console=ttyS0",
        "net.ifnames=0",
        "hadb.node=hadb01",
    ] {
        assert!(cmdline.contains(word), "{word} missing from {cmdline}");
    }
    assert_ne!(
        vm.run("test -d /sys/firmware/efi").unwrap().1,
        0,
        "BIOS boot"
    );

    // systemd reached multi-user.
    wait_active(&mut vm, "multi-user.target", Duration::from_secs(180));
    let multi_user = boot_started.elapsed();

    // hadb: the binary just built, and its unit enabled.
    assert!(out(&mut vm, "/usr/sbin/hadb version").starts_with("hadb "));
    assert_eq!(
        out(&mut vm, "sha256sum /usr/sbin/hadb | cut -d' ' -f1"),
        hadb_sha
    );
    assert_eq!(out(&mut vm, "systemctl is-enabled hadb"), "enabled");

    // nbd and softdog loaded at boot.
    let lsmod = vm.run_ok("lsmod");
    for m in ["nbd", "softdog"] {
        assert!(
            lsmod
                .lines()
                .any(|l| l.split_whitespace().next() == Some(m)),
            "{m} not loaded:\n{lsmod}"
        );
    }
    vm.run_ok("test -b /dev/nbd0 && test -c /dev/watchdog");
    assert_eq!(
        out(&mut vm, "cat /sys/class/watchdog/watchdog0/timeout"),
        "10",
        "softdog's soft_margin from /etc/modprobe.d/hadb.conf"
    );

    // mysqld is hadb's: the packaged service masked, nothing running.
    vm.run_ok("test -x /usr/sbin/mariadbd");
    assert_eq!(
        out(&mut vm, "systemctl is-enabled mariadb.service"),
        "masked"
    );
    assert_eq!(
        out(&mut vm, "systemctl is-active mariadb.service"),
        "inactive"
    );
    assert_eq!(vm.run("pgrep -x mariadbd").unwrap().1, 1, "mariadbd runs");

    // OpenSSH with this VM's own host keys and the config disk's key.
    assert_eq!(out(&mut vm, "systemctl is-active ssh"), "active");
    vm.run_ok("test -s /etc/ssh/ssh_host_ed25519_key");
    assert_eq!(vm.run_ok("cat /root/.ssh/authorized_keys"), AUTHORIZED_KEY);

    // Identity: the name and eth1's address from the command line, the
    // rest from the disk.
    assert_eq!(out(&mut vm, "hostname"), "hadb01");
    let check = vm.run_ok("hadb config check");
    assert!(check.contains("node = \"hadb01\""), "{check}");
    assert!(check.contains("cluster = \"lab\""), "{check}");
    wait_address(&mut vm, "eth1", "10.10.10.4/24");
    wait_address(&mut vm, "eth0", "10.0.2.15/");

    // The root file system grew into the larger disk.
    let root_size: u64 = out(&mut vm, "findmnt -bno SIZE /").parse().unwrap();
    assert!(root_size > 2_500_000_000, "root is {root_size} bytes");

    // The serial login stays on ttyS0 because hadb's prompt is on ttyS1.
    assert_eq!(
        out(&mut vm, "systemctl is-active serial-getty@ttyS0"),
        "active"
    );
    assert_eq!(
        vm.run("/usr/lib/hadb-image/console-free ttyS1").unwrap().1,
        1
    );
    assert_eq!(
        vm.run("/usr/lib/hadb-image/console-free ttyS0").unwrap().1,
        0
    );

    // hadb runs from the config disk's configuration once the volume has
    // metadata, and serves its prompt on ttyS1.
    vm.run_ok("hadb volume create-md");
    vm.run_ok("systemctl reset-failed hadb; systemctl restart hadb");
    wait_active(&mut vm, "hadb", Duration::from_secs(90));
    let status = vm.run_ok("hadb status");
    assert!(status.contains("node hadb01"), "{status}");
    let answer = serial1_command(&vm, "status");
    assert!(answer.contains("cluster lab  node hadb01"), "{answer}");

    let failed = vm.run_ok("systemctl list-units --failed --no-legend --plain");
    assert_eq!(failed.trim(), "", "failed units");
    let cycles = out(
        &mut vm,
        "journalctl -b --no-pager | grep -i 'ordering cycle'",
    );
    assert_eq!(cycles, "", "systemd found ordering cycles");
    drop(vm);

    // ---------------------------------------------------------- UEFI ----
    // hadb02: everything from its config disk (the host name and eth0's
    // address too); no authkey, so hadb.service waits (skipped, not
    // failed).
    let network = "[Match]\nName=eth0\n\n[Network]\nAddress=10.10.10.5/24\n";
    assert!(
        Path::new(OVMF_CODE).is_file(),
        "{OVMF_CODE} is missing: apt-get install -y ovmf"
    );
    let cfg_disk = config_disk(
        &tmp.0,
        "hadb02",
        &[
            ("hadb.toml", hadb_toml(None).as_bytes()),
            ("hostname", b"hadb02\n"),
            ("root-password-hash", PASSWORD_HASH.as_bytes()),
            ("10-eth0.network", network.as_bytes()),
        ],
    );
    let mut cfg = DiskVmConfig::new("hadb02", &image, PASSWORD);
    cfg.disks = vec![cfg_disk];
    cfg.uefi_code = Some(PathBuf::from(OVMF_CODE));
    let (p3, p4) = vm::udp_port_pair();
    cfg.links = vec![NetLink {
        local: p3,
        remote: p4,
    }];
    let mut vm = Vm::boot_disk(cfg).unwrap_or_else(|e| panic!("{e}"));
    let uefi_times = vm.boot_times().to_vec();
    vm.run_ok("test -d /sys/firmware/efi");
    assert!(vm.run_ok("cat /proc/cmdline").contains("console=ttyS0"));
    assert_eq!(out(&mut vm, "hostname"), "hadb02");
    assert!(vm.run_ok("hadb config check").contains("node = \"hadb02\""));
    wait_address(&mut vm, "eth0", "10.10.10.5/24");
    wait_active(&mut vm, "multi-user.target", Duration::from_secs(180));
    assert_eq!(out(&mut vm, "systemctl is-active hadb"), "inactive");
    assert_eq!(out(&mut vm, "systemctl show -P ConditionResult hadb"), "no");
    drop(vm);

    eprintln!(
        "vm_image: image {built:.1?}; BIOS boot {bios_times:.1?}, multi-user after {multi_user:.1?}; \
         UEFI boot {uefi_times:.1?}; total {:.1?}",
        started.elapsed()
    );
}
