//! A small harness that boots test VMs under qemu (TCG) and drives them
//! through their serial console. See tests/vm/README.md.
//!
//! Use it from an integration test with
//! `#[path = "support/vm.rs"] mod vm;`.
//!
//! Every VM gets its own temporary directory (`$TMPDIR/hadb-vm-…`) holding
//! its disks, the serial console socket and log, and the monitor socket. The
//! directory is removed and qemu killed when the [`Vm`] is dropped, also when
//! the test panics (set `HADB_VM_KEEP=1` to keep the directory).
//!
//! Networking between VMs uses `-netdev dgram` on 127.0.0.1 UDP ports only
//! (see [`udp_port_pair`]); the guests' own addresses (10.10.10.x) exist only
//! inside the guests.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

/// The start of every test pair's `hadb.toml`: the cluster, its key and
/// the two nodes at the addresses the VM tests give them. A macro rather
/// than a const so that a test's `concat!(pair_nodes!(), r#"..."#)` is
/// still one literal. Include this file with `#[macro_use]` to use it.
#[allow(unused_macros)]
macro_rules! pair_nodes {
    () => {
        r#"cluster = "hadb-test"
key_file = "/etc/hadb/authkey"

[nodes.hadb01]
address = "10.10.10.4"

[nodes.hadb02]
address = "10.10.10.5"
"#
    };
}

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Default time allowed for one command run with [`Vm::run`].
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// Default time from starting qemu until the guest's command loop is ready.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(90);

const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
const READY_MARKER: &str = "@@HADB-READY@@";
/// Length of one base64 chunk sent to the guest per console line.
const CHUNK: usize = 512;

// ------------------------------------------------------------------ assets --

/// The kernel and initramfs that every VM of this test process boots.
#[derive(Debug, Clone)]
pub struct Assets {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The static hadb binary installed in the initramfs as /usr/sbin/hadb.
    pub hadb: PathBuf,
}

/// Builds the static hadb binary and the initramfs once per test process
/// (running `tests/vm/prepare`), and returns their paths. Panics with the
/// reason (a missing host tool, a failed build) when that is not possible.
pub fn assets() -> &'static Assets {
    static ASSETS: OnceLock<Assets> = OnceLock::new();
    ASSETS.get_or_init(|| {
        let hadb = static_hadb_binary();
        prepare(&hadb)
    })
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                repo_root().join(dir)
            }
        }
        None => repo_root().join("target"),
    }
}

/// The static (musl) hadb binary: `$HADB_STATIC_BIN` if set, else built here
/// with `cargo build --release --target x86_64-unknown-linux-musl`.
pub fn static_hadb_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("HADB_STATIC_BIN") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "HADB_STATIC_BIN={} is not a file; unset it to let the test build the binary",
            path.display()
        );
        return path;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let started = Instant::now();
    let out = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "--bin",
            "hadb",
            "--target",
            MUSL_TARGET,
        ])
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo:?} build: {e}"));
    assert!(
        out.status.success(),
        "`cargo build --release --target {MUSL_TARGET}` failed ({}); if the target is missing: \
         rustup target add {MUSL_TARGET}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = target_dir().join(MUSL_TARGET).join("release").join("hadb");
    assert!(
        bin.is_file(),
        "cargo build succeeded but {} is missing",
        bin.display()
    );
    eprintln!(
        "vm: static hadb built in {:.1?}: {}",
        started.elapsed(),
        bin.display()
    );
    bin
}

/// Runs `tests/vm/prepare BIN` and parses the paths it prints.
pub fn prepare(hadb: &Path) -> Assets {
    let script = repo_root().join("tests/vm/prepare");
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .arg(hadb)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} failed ({}):\n{stderr}{stdout}",
        script.display(),
        out.status
    );
    let field = |key: &str| -> PathBuf {
        stdout
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(key))
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                panic!(
                    "{} printed no {key} line:\n{stdout}{stderr}",
                    script.display()
                )
            })
    };
    let assets = Assets {
        kernel: field("KERNEL="),
        initrd: field("INITRD="),
        hadb: hadb.to_owned(),
    };
    eprintln!("vm: prepared in {:.1?}: {assets:?}", started.elapsed());
    assets
}

/// The sha256 of a host file, as `sha256sum` prints it.
pub fn host_sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum on the host");
    assert!(out.status.success(), "sha256sum {} failed", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum printed a hash")
        .to_owned()
}

/// Two free UDP ports on 127.0.0.1, for a link between two VMs: give
/// `NetLink { local: a, remote: b }` to one and `{ local: b, remote: a }` to
/// the other.
pub fn udp_port_pair() -> (u16, u16) {
    let a = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP port on 127.0.0.1");
    let b = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP port on 127.0.0.1");
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

// ------------------------------------------------------------------ config --

/// One network link of a VM: a virtio NIC whose frames go as UDP datagrams
/// from 127.0.0.1:`local` to 127.0.0.1:`remote`.
#[derive(Debug, Clone, Copy)]
pub struct NetLink {
    pub local: u16,
    pub remote: u16,
}

#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Short name used in messages and the temp dir (`vm1`).
    pub name: String,
    /// `hadb_test.hostname=` (the guest's host name).
    pub hostname: String,
    /// `hadb_test.ip=`: address of eth0 with prefix length (`10.10.10.4/24`).
    pub ip: Option<String>,
    pub memory_mib: u32,
    /// The data disk (`/dev/vdb`): an existing raw file (kept after the VM
    /// ends), or `None` to create a sparse one of `data_disk_size` bytes in
    /// the VM's temp dir.
    pub data_disk: Option<PathBuf>,
    pub data_disk_size: u64,
    /// Network links; the first is eth0, the next eth1, ...
    pub links: Vec<NetLink>,
    /// Extra kernel command line words (e.g. `hadb.volume.port=7789`).
    pub append: Vec<String>,
    /// Files written into the guest right after boot: (guest path, mode, contents).
    pub files: Vec<(String, u32, Vec<u8>)>,
    /// Files packed into this VM's initramfs: (guest path, mode, host file).
    /// For binaries, which would take long through the console.
    pub initrd_files: Vec<(String, u32, PathBuf)>,
    /// Let the guest reboot (a watchdog reset reboots); otherwise qemu exits.
    pub allow_reboot: bool,
    pub boot_timeout: Duration,
}

impl VmConfig {
    pub fn new(name: &str, hostname: &str, ip: &str) -> VmConfig {
        VmConfig {
            name: name.to_owned(),
            hostname: hostname.to_owned(),
            ip: Some(ip.to_owned()),
            memory_mib: 512,
            data_disk: None,
            data_disk_size: 64 << 20,
            links: Vec::new(),
            append: Vec::new(),
            files: Vec::new(),
            initrd_files: Vec::new(),
            allow_reboot: false,
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
        }
    }

    pub fn link(mut self, local: u16, remote: u16) -> VmConfig {
        self.links.push(NetLink { local, remote });
        self
    }

    pub fn data_disk_size(mut self, bytes: u64) -> VmConfig {
        self.data_disk_size = bytes;
        self
    }

    pub fn data_disk(mut self, path: &Path) -> VmConfig {
        self.data_disk = Some(path.to_owned());
        self
    }

    pub fn append(mut self, word: &str) -> VmConfig {
        self.append.push(word.to_owned());
        self
    }

    pub fn file(mut self, path: &str, mode: u32, contents: &[u8]) -> VmConfig {
        self.files.push((path.to_owned(), mode, contents.to_vec()));
        self
    }

    /// Puts the host file `host` at `path` in the guest, through the
    /// initramfs (fast, for binaries such as [`static_example`]).
    pub fn initrd_file(mut self, path: &str, mode: u32, host: &Path) -> VmConfig {
        self.initrd_files
            .push((path.to_owned(), mode, host.to_owned()));
        self
    }
}

/// A VM booted from a disk image ([`Vm::boot_disk`]).
#[derive(Debug, Clone)]
pub struct DiskVmConfig {
    /// Short name used in messages and the temp dir.
    pub name: String,
    /// The raw image; the VM writes to a qcow2 overlay of it.
    pub image: PathBuf,
    /// The overlay's size in bytes, when larger than the image.
    pub system_disk_size: Option<u64>,
    /// Further raw disks (vdb, vdc, ...), e.g. a config disk.
    pub disks: Vec<PathBuf>,
    pub memory_mib: u32,
    /// eth0 on qemu's user network (slirp: DHCP, 10.0.2.15).
    pub user_net: bool,
    /// Network links after it (eth1, ... with `user_net`).
    pub links: Vec<NetLink>,
    /// A second serial port (ttyS1) on `serial1.sock` in the VM's dir,
    /// logged to `serial1.log`.
    pub second_serial: bool,
    /// Boot through UEFI with this OVMF code file (its VARS file beside it
    /// is copied); `None`: SeaBIOS.
    pub uefi_code: Option<PathBuf>,
    /// Kernel command line words typed at syslinux's `boot:` prompt (as
    /// `hadb WORDS`): how a BIOS boot of the image gets per-boot words
    /// without -kernel.
    pub boot_words: Option<String>,
    /// Who logs in on the serial console.
    pub user: String,
    pub password: String,
    pub allow_reboot: bool,
    /// From qemu's start to the command loop.
    pub boot_timeout: Duration,
}

impl DiskVmConfig {
    pub fn new(name: &str, image: &Path, password: &str) -> DiskVmConfig {
        DiskVmConfig {
            name: name.to_owned(),
            image: image.to_owned(),
            system_disk_size: None,
            disks: Vec::new(),
            memory_mib: 2048,
            user_net: false,
            links: Vec::new(),
            second_serial: false,
            uefi_code: None,
            boot_words: None,
            user: "root".to_owned(),
            password: password.to_owned(),
            allow_reboot: false,
            boot_timeout: Duration::from_secs(300),
        }
    }
}

/// The console command loop for VMs booted from a disk: the protocol of
/// tests/vm/init, run by root's login shell on ttyS0 (bash; the guest's
/// kernel messages are kept off the console, as there).
const DISK_LOOP: &str = r#"stty -echo
dmesg -n 1
run_script() {
    id=$1 secs=$2
    script=/tmp/.hadb-cmd.$id
    out=/tmp/.hadb-out.$id
    if [ -f "$script.b64" ]; then
        base64 -d "$script.b64" >"$script" 2>/dev/null
    else
        : >"$script"
    fi
    case "$secs" in ''|*[!0-9]*) secs=600 ;; esac
    timeout -s KILL "$secs" bash "$script" </dev/null >"$out" 2>&1
    rc=$?
    printf '\n@@HADB-BEGIN %s@@\n' "$id"
    cat "$out"
    printf '\n@@HADB-END %s %s@@\n' "$id" "$rc"
    rm -f "$script" "$script.b64" "$out"
}
cd /
echo "@@HADB-READY@@"
while IFS= read -r line; do
    case "$line" in
        "@@C "*) set -- $line; printf '%s' "$3" >>"/tmp/.hadb-cmd.$2.b64" ;;
        "@@R "*) set -- $line; run_script "$2" "$3" ;;
        "") ;;
        *) ( eval "$line" ) </dev/null 2>&1 ;;
    esac
done
"#;

/// Adds one virtio NIC per link, at PCI slots from `first_addr` on.
fn add_links(cmd: &mut Command, links: &[NetLink], first_addr: usize) {
    let vm_index = VM_COUNTER.fetch_add(1, Ordering::Relaxed) & 0xff;
    for (i, link) in links.iter().enumerate() {
        cmd.arg("-netdev").arg(format!(
            "dgram,id=n{i},local.type=inet,local.host=127.0.0.1,local.port={},\
             remote.type=inet,remote.host=127.0.0.1,remote.port={}",
            link.local, link.remote
        ));
        cmd.arg("-device").arg(format!(
            "virtio-net-pci,netdev=n{i},mac=52:54:00:{:02x}:{:02x}:{:02x},addr=0x{:x}",
            (std::process::id() & 0xff) as u8,
            vm_index,
            i,
            first_addr + i
        ));
    }
}

// ------------------------------------------------------------------- error --

#[derive(Debug)]
pub enum VmError {
    Io {
        vm: String,
        what: String,
        source: io::Error,
    },
    /// A wait ran out of time.
    Timeout {
        vm: String,
        what: String,
        after: Duration,
        log_tail: String,
    },
    /// qemu is gone.
    Exited {
        vm: String,
        what: String,
        status: Option<ExitStatus>,
        log_tail: String,
    },
}

impl fmt::Display for VmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmError::Io { vm, what, source } => write!(f, "{vm}: {what}: {source}"),
            VmError::Timeout {
                vm,
                what,
                after,
                log_tail,
            } => {
                write!(
                    f,
                    "{vm}: timed out after {after:.1?} {what}\n--- serial console (tail) ---\n{log_tail}"
                )
            }
            VmError::Exited {
                vm,
                what,
                status,
                log_tail,
            } => {
                let status = status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "unknown status".into());
                write!(
                    f,
                    "{vm}: qemu exited ({status}) {what}\n--- serial console (tail) ---\n{log_tail}"
                )
            }
        }
    }
}

impl std::error::Error for VmError {}

// ---------------------------------------------------------------------- vm --

/// Bytes received from the serial console socket.
struct Console {
    buf: Mutex<ConsoleBuf>,
    cond: Condvar,
}

struct ConsoleBuf {
    data: Vec<u8>,
    closed: bool,
}

/// A running qemu VM.
pub struct Vm {
    name: String,
    dir: PathBuf,
    data_disk: PathBuf,
    child: Option<Child>,
    serial: Option<UnixStream>,
    console: Arc<Console>,
    reader: Option<JoinHandle<()>>,
    /// Console output before this offset has been consumed by earlier commands.
    cursor: usize,
    nonce: String,
    next_id: u64,
    boot_times: Vec<(&'static str, Duration)>,
}

static VM_COUNTER: AtomicU32 = AtomicU32::new(0);

fn make_temp_dir(name: &str) -> io::Result<PathBuf> {
    let base = std::env::temp_dir();
    let pid = std::process::id();
    loop {
        let n = VM_COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("hadb-vm-{name}-{pid}-{n}"));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Removes terminal escape sequences (busybox sh asks `ESC[6n`, and so on)
/// and carriage returns.
pub fn strip_terminal_noise(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => match chars.next() {
                // CSI: parameters and intermediates, then one final byte.
                Some('[') => {
                    while let Some(&n) = chars.peek() {
                        chars.next();
                        if ('\x40'..='\x7e').contains(&n) {
                            break;
                        }
                    }
                }
                // OSC: up to BEL or ESC \.
                Some(']') => {
                    while let Some(n) = chars.next() {
                        if n == '\x07' {
                            break;
                        }
                        if n == '\x1b' {
                            chars.next();
                            break;
                        }
                    }
                }
                // Two-byte sequences (ESC c, ESC 7, ESC ( B ...).
                Some('(') | Some(')') => {
                    chars.next();
                }
                _ => {}
            },
            '\r' | '\x07' | '\0' => {}
            c => out.push(c),
        }
    }
    out
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

/// A cpio archive ("newc" format, as the kernel's initramfs unpacker reads
/// it) holding `files` (guest path, mode, contents) and their parent
/// directories.
fn newc_archive(files: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
        let fields = [
            ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.resize(out.len().next_multiple_of(4), 0);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    let mut out = Vec::new();
    let mut ino = 1;
    let mut dirs: Vec<String> = Vec::new();
    for (path, mode, data) in files {
        let name = path.trim_start_matches('/');
        let mut parent = String::new();
        for part in name
            .split('/')
            .collect::<Vec<_>>()
            .iter()
            .rev()
            .skip(1)
            .rev()
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            if !dirs.contains(&parent) {
                dirs.push(parent.clone());
                entry(&mut out, ino, &parent, 0o040755, &[]);
                ino += 1;
            }
        }
        entry(&mut out, ino, name, 0o100000 | (mode & 0o7777), data);
        ino += 1;
    }
    entry(&mut out, 0, "TRAILER!!!", 0, &[]);
    out.resize(out.len().next_multiple_of(512), 0);
    out
}

/// Builds a static (musl) example of this crate (`examples/NAME.rs`) for use
/// inside the VMs, and returns its path.
pub fn static_example(name: &str) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "--example",
            name,
            "--target",
            MUSL_TARGET,
        ])
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo:?} build: {e}"));
    assert!(
        out.status.success(),
        "`cargo build --release --example {name} --target {MUSL_TARGET}` failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = target_dir()
        .join(MUSL_TARGET)
        .join("release")
        .join("examples")
        .join(name);
    assert!(
        bin.is_file(),
        "cargo build succeeded but {} is missing",
        bin.display()
    );
    bin
}

/// Quotes a string for sh.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

impl Vm {
    /// Starts qemu and waits until the guest's command loop is ready.
    pub fn boot(assets: &Assets, cfg: VmConfig) -> Result<Vm, VmError> {
        // From here on, Drop cleans up (kills qemu, removes the dir).
        let mut vm = Vm::create(&cfg.name)?;
        let dir = vm.dir.clone();

        // The first disk (vda) stands in for the system disk of a real
        // deployment, so the data disk is /dev/vdb as there.
        let system = dir.join("system.raw");
        fs::File::create(&system)
            .and_then(|f| f.set_len(1 << 20))
            .map_err(|e| vm.io_err("creating system.raw", e))?;
        vm.data_disk = match &cfg.data_disk {
            Some(p) => p.clone(),
            None => {
                let p = dir.join("data.raw");
                fs::File::create(&p)
                    .and_then(|f| f.set_len(cfg.data_disk_size))
                    .map_err(|e| vm.io_err("creating data.raw", e))?;
                p
            }
        };

        let mut append = vec![
            "console=ttyS0".to_owned(),
            "quiet".to_owned(),
            "panic=-1".to_owned(),
            format!("hadb_test.hostname={}", cfg.hostname),
        ];
        if let Some(ip) = &cfg.ip {
            append.push(format!("hadb_test.ip={ip}"));
        }
        append.extend(cfg.append.iter().cloned());

        // Extra files travel as a second cpio archive after the shared
        // initramfs: the kernel unpacks the archives of an initrd in turn.
        let initrd = if cfg.initrd_files.is_empty() {
            assets.initrd.clone()
        } else {
            let mut image =
                fs::read(&assets.initrd).map_err(|e| vm.io_err("reading the initramfs", e))?;
            let mut files = Vec::new();
            for (path, mode, host) in &cfg.initrd_files {
                let data = fs::read(host).map_err(|e| {
                    vm.io_err(&format!("reading {} for the initramfs", host.display()), e)
                })?;
                files.push((path.as_str(), *mode, data));
            }
            // The kernel takes an uncompressed archive only at an offset
            // that is a multiple of 4 in the image, and skips zeros.
            image.resize(image.len().next_multiple_of(512), 0);
            image.extend_from_slice(&newc_archive(&files));
            let path = dir.join("initrd.img");
            fs::write(&path, image).map_err(|e| vm.io_err("writing initrd.img", e))?;
            path
        };

        let mut cmd = vm.qemu_command(cfg.memory_mib, cfg.allow_reboot);
        cmd.arg("-kernel")
            .arg(&assets.kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", &append.join(" ")])
            .arg("-drive")
            .arg(format!(
                "if=none,id=d0,format=raw,file={}",
                system.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=d0,addr=0x4"])
            .arg("-drive")
            .arg(format!(
                "if=none,id=d1,format=raw,file={}",
                vm.data_disk.display()
            ))
            .args([
                "-device",
                "virtio-blk-pci,drive=d1,addr=0x5,serial=hadb-data",
            ])
            .args(["-device", "virtio-rng-pci,addr=0x6"]);
        add_links(&mut cmd, &cfg.links, 0x8);
        vm.launch(cmd)?;
        vm.wait_ready(cfg.boot_timeout)?;

        for (path, mode, contents) in &cfg.files {
            vm.write_file(path, *mode, contents)?;
        }
        Ok(vm)
    }

    /// Boots a disk image through the firmware and its boot loader (no
    /// -kernel/-initrd): a qcow2 overlay of `cfg.image` in the VM's dir is
    /// its first disk, so the image itself is never written. Logs in as
    /// root on the serial console and starts the same command loop as the
    /// initramfs has (`DISK_LOOP`), so [`Vm::run`] works as for
    /// [`Vm::boot`].
    pub fn boot_disk(cfg: DiskVmConfig) -> Result<Vm, VmError> {
        let mut vm = Vm::create(&cfg.name)?;
        let dir = vm.dir.clone();
        let started = Instant::now();

        let overlay = dir.join("system.qcow2");
        let mut create = Command::new("qemu-img");
        create
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&cfg.image)
            .arg(&overlay);
        if let Some(size) = cfg.system_disk_size {
            create.arg(size.to_string());
        }
        let out = create
            .stdin(Stdio::null())
            .output()
            .map_err(|e| vm.io_err("running qemu-img (apt-get install -y qemu-utils)", e))?;
        if !out.status.success() {
            return Err(vm.io_err(
                "qemu-img create of the overlay",
                io::Error::other(String::from_utf8_lossy(&out.stderr).into_owned()),
            ));
        }
        vm.data_disk = cfg.disks.first().cloned().unwrap_or_default();

        let mut cmd = vm.qemu_command(cfg.memory_mib, cfg.allow_reboot);
        if let Some(code) = &cfg.uefi_code {
            // OVMF: its code read-only, a private copy of its variables.
            let vars_src = code.with_file_name(
                code.file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("")
                    .replace("CODE", "VARS"),
            );
            let vars = dir.join("efivars.fd");
            fs::copy(&vars_src, &vars).map_err(|e| {
                vm.io_err(
                    &format!("copying {} (apt-get install -y ovmf)", vars_src.display()),
                    e,
                )
            })?;
            cmd.arg("-drive")
                .arg(format!(
                    "if=pflash,format=raw,unit=0,readonly=on,file={}",
                    code.display()
                ))
                .arg("-drive")
                .arg(format!(
                    "if=pflash,format=raw,unit=1,file={}",
                    vars.display()
                ));
        }
        cmd.arg("-drive")
            .arg(format!(
                "if=none,id=d0,format=qcow2,file={}",
                overlay.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=d0,addr=0x4,bootindex=0"]);
        for (i, disk) in cfg.disks.iter().enumerate() {
            cmd.arg("-drive")
                .arg(format!(
                    "if=none,id=d{n},format=raw,file={}",
                    disk.display(),
                    n = i + 1
                ))
                .arg("-device")
                .arg(format!(
                    "virtio-blk-pci,drive=d{n},addr=0x{:x}",
                    0x5 + i,
                    n = i + 1
                ));
        }
        cmd.args(["-device", "virtio-rng-pci,addr=0xf"]);
        if cfg.second_serial {
            cmd.arg("-chardev")
                .arg(format!(
                    "socket,id=ser1,path={},server=on,wait=off,logfile={}",
                    dir.join("serial1.sock").display(),
                    dir.join("serial1.log").display()
                ))
                .args(["-serial", "chardev:ser1"]);
        }
        // NICs: the user network (DHCP, slirp) first if asked, so it is
        // eth0, then the links.
        let mut links_at = 0x10;
        if cfg.user_net {
            cmd.args(["-netdev", "user,id=u0"])
                .args(["-device", "virtio-net-pci,netdev=u0,addr=0x10"]);
            links_at += 1;
        }
        add_links(&mut cmd, &cfg.links, links_at);
        vm.launch(cmd)?;

        let deadline = started + cfg.boot_timeout;
        let mut at = 0;
        if let Some(words) = &cfg.boot_words {
            at = vm.wait_for_text("boot: ", 0, deadline, "waiting for syslinux's boot: prompt")?;
            vm.send(&format!("hadb {words}\r"))?;
        }
        let at = vm.wait_for_text("login: ", at, deadline, "waiting for the login prompt")?;
        vm.boot_times.push(("login prompt", started.elapsed()));
        vm.send(&format!("{}\n", cfg.user))?;
        let at = vm.wait_for_text(
            "Password: ",
            at,
            deadline,
            "waiting for the password prompt",
        )?;
        vm.send(&format!("{}\n", cfg.password))?;
        // The shell prompt ends in "# " (root); then the command loop,
        // sent as one line that carries the script in base64.
        vm.wait_for_text(
            "# ",
            at,
            deadline,
            "waiting for a root shell after logging in",
        )?;
        vm.boot_times.push(("root shell", started.elapsed()));
        vm.send(&format!(
            "stty -echo; echo {} | base64 -d > /tmp/.hadb-loop && exec bash /tmp/.hadb-loop\n",
            base64(DISK_LOOP.as_bytes())
        ))?;
        vm.wait_ready(deadline.saturating_duration_since(Instant::now()))?;
        vm.boot_times.push(("command loop", started.elapsed()));
        Ok(vm)
    }

    /// A VM with its temp dir and no qemu yet; Drop cleans up from here on.
    fn create(name: &str) -> Result<Vm, VmError> {
        let dir = make_temp_dir(name).map_err(|source| VmError::Io {
            vm: name.to_owned(),
            what: "creating its temp dir".into(),
            source,
        })?;
        Ok(Vm {
            name: name.to_owned(),
            dir,
            data_disk: PathBuf::new(),
            child: None,
            serial: None,
            console: Arc::new(Console {
                buf: Mutex::new(ConsoleBuf {
                    data: Vec::new(),
                    closed: false,
                }),
                cond: Condvar::new(),
            }),
            reader: None,
            cursor: 0,
            nonce: format!(
                "{:x}{:x}",
                std::process::id(),
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(0)
            ),
            next_id: 0,
            boot_times: Vec::new(),
        })
    }

    fn io_err(&self, what: &str, source: io::Error) -> VmError {
        VmError::Io {
            vm: self.name.clone(),
            what: what.to_owned(),
            source,
        }
    }

    /// qemu with what every VM has: TCG, no default devices, the serial
    /// console on a socket (and its log), the monitor on a socket.
    fn qemu_command(&self, memory_mib: u32, allow_reboot: bool) -> Command {
        let _ = fs::remove_file(self.dir.join("serial.log"));
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
            "-smp",
            "1",
        ])
        .args(["-m", &memory_mib.to_string()])
        // HADB_VM_CPU: a CPU model (e.g. `max`, with SSE4.2 and AVX2 as
        // Azure's VMs have); TCG's default, qemu64, has nothing past SSE2.
        .args(
            std::env::var("HADB_VM_CPU")
                .ok()
                .filter(|c| !c.is_empty())
                .map(|c| vec!["-cpu".to_owned(), c])
                .unwrap_or_default(),
        )
        .arg("-chardev")
        .arg(format!(
            "socket,id=ser0,path={},server=on,wait=off,logfile={}",
            self.dir.join("serial.sock").display(),
            self.dir.join("serial.log").display()
        ))
        .args(["-serial", "chardev:ser0"])
        .arg("-monitor")
        .arg(format!(
            "unix:{},server=on,wait=off",
            self.dir.join("monitor.sock").display()
        ));
        if !allow_reboot {
            cmd.arg("-no-reboot");
        }
        cmd
    }

    /// Starts qemu and connects to its serial console.
    fn launch(&mut self, mut cmd: Command) -> Result<(), VmError> {
        let dir = self.dir.clone();
        let serial_sock = dir.join("serial.sock");
        cmd.stdin(Stdio::null())
            .stdout(
                fs::File::create(dir.join("qemu.out"))
                    .map_err(|e| self.io_err("creating qemu.out", e))?,
            )
            .stderr(
                fs::File::create(dir.join("qemu.err"))
                    .map_err(|e| self.io_err("creating qemu.err", e))?,
            );
        fs::write(dir.join("qemu.cmdline"), format!("{cmd:?}\n"))
            .map_err(|e| self.io_err("writing qemu.cmdline", e))?;
        let child = cmd.spawn().map_err(|e| {
            self.io_err(
                "starting qemu-system-x86_64 (apt-get install -y qemu-system-x86)",
                e,
            )
        })?;
        self.child = Some(child);

        // Connect to the serial console as soon as qemu has made the socket.
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match UnixStream::connect(&serial_sock) {
                Ok(s) => break s,
                Err(e) => {
                    self.check_alive("while waiting for the serial console socket")?;
                    if Instant::now() > deadline {
                        return Err(self.io_err("connecting to the serial console socket", e));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let mut reader_stream = stream
            .try_clone()
            .map_err(|e| self.io_err("cloning the console socket", e))?;
        let console = self.console.clone();
        self.reader = Some(
            std::thread::Builder::new()
                .name(format!("{}-console", self.name))
                .spawn(move || {
                    let mut buf = [0u8; 4096];
                    loop {
                        let n = match reader_stream.read(&mut buf) {
                            Ok(0) | Err(_) => 0,
                            Ok(n) => n,
                        };
                        let mut c = console.buf.lock().unwrap();
                        if n == 0 {
                            c.closed = true;
                            console.cond.notify_all();
                            return;
                        }
                        c.data.extend_from_slice(&buf[..n]);
                        console.cond.notify_all();
                    }
                })
                .map_err(|e| self.io_err("starting the console reader thread", e))?,
        );
        self.serial = Some(stream);
        Ok(())
    }

    /// Waits for the guest's command loop to say it is ready.
    fn wait_ready(&mut self, timeout: Duration) -> Result<(), VmError> {
        // The marker may have been printed before we connected: the log
        // file has everything.
        let serial_log = self.dir.join("serial.log");
        let deadline = Instant::now() + timeout;
        loop {
            let in_socket = {
                let c = self.console.buf.lock().unwrap();
                find(&c.data, READY_MARKER.as_bytes(), self.cursor).map(|p| p + READY_MARKER.len())
            };
            if let Some(end) = in_socket {
                self.cursor = end;
                return Ok(());
            }
            if self.cursor == 0
                && fs::read(&serial_log)
                    .map(|l| find(&l, READY_MARKER.as_bytes(), 0).is_some())
                    .unwrap_or(false)
            {
                self.cursor = self.console.buf.lock().unwrap().data.len();
                return Ok(());
            }
            self.check_alive("while booting")?;
            if Instant::now() > deadline {
                return Err(VmError::Timeout {
                    vm: self.name.clone(),
                    what: "waiting for the guest to boot".into(),
                    after: timeout,
                    log_tail: self.log_tail(60),
                });
            }
            let c = self.console.buf.lock().unwrap();
            let _ = self
                .console
                .cond
                .wait_timeout(c, Duration::from_millis(100))
                .unwrap();
        }
    }

    /// Waits until `text` appears on the console at or after byte `from`;
    /// returns the offset just past it.
    fn wait_for_text(
        &mut self,
        text: &str,
        from: usize,
        deadline: Instant,
        what: &str,
    ) -> Result<usize, VmError> {
        let started = Instant::now();
        loop {
            {
                let c = self.console.buf.lock().unwrap();
                if let Some(p) = find(&c.data, text.as_bytes(), from) {
                    return Ok(p + text.len());
                }
                let _ = self
                    .console
                    .cond
                    .wait_timeout(c, Duration::from_millis(200))
                    .unwrap();
            }
            self.check_alive(what)?;
            if Instant::now() > deadline {
                return Err(VmError::Timeout {
                    vm: self.name.clone(),
                    what: what.to_owned(),
                    after: started.elapsed(),
                    log_tail: self.log_tail(60),
                });
            }
        }
    }

    /// Types `text` on the serial console.
    fn send(&mut self, text: &str) -> Result<(), VmError> {
        let name = self.name.clone();
        let serial = self.serial.as_mut().expect("serial console connected");
        serial
            .write_all(text.as_bytes())
            .map_err(|source| VmError::Io {
                vm: name,
                what: "writing to the serial console".into(),
                source,
            })
    }

    /// How long each stage of [`Vm::boot_disk`] took from qemu's start:
    /// the login prompt, the root shell, the command loop.
    pub fn boot_times(&self) -> &[(&'static str, Duration)] {
        &self.boot_times
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The VM's temporary directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The host file behind /dev/vdb.
    pub fn data_disk(&self) -> &Path {
        &self.data_disk
    }

    /// qemu's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Everything the serial console printed (qemu's log file, which also
    /// has what came before the host connected), cleaned of escape sequences.
    pub fn serial_log(&self) -> String {
        let raw = fs::read(self.dir.join("serial.log")).unwrap_or_default();
        strip_terminal_noise(&String::from_utf8_lossy(&raw))
    }

    /// What the host received on the serial console socket since it
    /// connected (right after qemu started), cleaned of escape sequences.
    /// More exact than [`Vm::serial_log`]: qemu's log file can repeat a
    /// character when a write to the socket had to be retried.
    pub fn console_output(&self) -> String {
        let c = self.console.buf.lock().unwrap();
        strip_terminal_noise(&String::from_utf8_lossy(&c.data))
    }

    fn log_tail(&self, lines: usize) -> String {
        let mut log = self.console_output();
        if log.trim().is_empty() {
            log = self.serial_log();
        }
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether qemu has exited (a power-off, or a reboot under
    /// `-no-reboot`).
    pub fn has_exited(&mut self) -> bool {
        match self.child.as_mut() {
            None => true,
            Some(child) => !matches!(child.try_wait(), Ok(None)),
        }
    }

    fn check_alive(&mut self, what: &str) -> Result<(), VmError> {
        let status = match self.child.as_mut() {
            None => None,
            Some(child) => match child.try_wait() {
                Ok(None) => return Ok(()),
                Ok(Some(status)) => Some(status),
                Err(_) => None,
            },
        };
        let qemu_err = fs::read_to_string(self.dir.join("qemu.err")).unwrap_or_default();
        Err(VmError::Exited {
            vm: self.name.clone(),
            what: format!(
                "{what}{}",
                if qemu_err.is_empty() {
                    String::new()
                } else {
                    format!("; qemu said: {qemu_err}")
                }
            ),
            status,
            log_tail: self.log_tail(60),
        })
    }

    /// Runs a shell script (any number of lines; here-documents work) in the
    /// guest and returns its output (stdout and stderr together) and exit
    /// code. The guest kills the script after [`DEFAULT_RUN_TIMEOUT`].
    pub fn run(&mut self, script: &str) -> Result<(String, i32), VmError> {
        self.run_timeout(script, DEFAULT_RUN_TIMEOUT)
    }

    /// Like [`Vm::run`] with its own time limit: the guest kills the script
    /// (exit code 137) after `timeout`, and the host gives up a little later.
    pub fn run_timeout(
        &mut self,
        script: &str,
        timeout: Duration,
    ) -> Result<(String, i32), VmError> {
        self.next_id += 1;
        let id = format!("{}-{}", self.nonce, self.next_id);
        let secs = timeout.as_secs().max(1);
        let encoded = base64(script.as_bytes());
        let mut msg = String::with_capacity(encoded.len() + 64);
        for chunk in encoded.as_bytes().chunks(CHUNK) {
            msg.push_str("@@C ");
            msg.push_str(&id);
            msg.push(' ');
            msg.push_str(std::str::from_utf8(chunk).unwrap());
            msg.push('\n');
        }
        msg.push_str(&format!("@@R {id} {secs}\n"));
        self.check_alive(&format!("before running {script:?}"))?;
        let name = self.name.clone();
        let serial = self.serial.as_mut().expect("serial console connected");
        serial
            .write_all(msg.as_bytes())
            .map_err(|source| VmError::Io {
                vm: name,
                what: "writing to the serial console".into(),
                source,
            })?;

        let begin = format!("@@HADB-BEGIN {id}@@");
        let end = format!("@@HADB-END {id} ");
        let host_timeout = Duration::from_secs(secs) + Duration::from_secs(15);
        let deadline = Instant::now() + host_timeout;
        let mut last_alive_check = Instant::now();
        loop {
            {
                let c = self.console.buf.lock().unwrap();
                let from = self.cursor.min(c.data.len());
                if let Some((next, body, rc)) = parse_result(&c.data, from, &begin, &end) {
                    self.cursor = next;
                    drop(c);
                    let mut out = strip_terminal_noise(&body);
                    // The guest frames the output with one newline on each side.
                    if out.starts_with('\n') {
                        out.remove(0);
                    }
                    if out.ends_with('\n') {
                        out.pop();
                    }
                    return Ok((out, rc));
                }
                if c.closed {
                    drop(c);
                    self.check_alive(&format!("while running {script:?}"))?;
                    return Err(VmError::Exited {
                        vm: self.name.clone(),
                        what: format!("console closed while running {script:?}"),
                        status: None,
                        log_tail: self.log_tail(60),
                    });
                }
                if Instant::now() > deadline {
                    drop(c);
                    return Err(VmError::Timeout {
                        vm: self.name.clone(),
                        what: format!("running {script:?}"),
                        after: host_timeout,
                        log_tail: self.log_tail(60),
                    });
                }
                let _ = self
                    .console
                    .cond
                    .wait_timeout(c, Duration::from_millis(200))
                    .unwrap();
            }
            if last_alive_check.elapsed() > Duration::from_secs(1) {
                last_alive_check = Instant::now();
                self.check_alive(&format!("while running {script:?}"))?;
            }
        }
    }

    /// Runs a script and panics (with its output and the console tail) unless
    /// it exits 0. Returns the output.
    pub fn run_ok(&mut self, script: &str) -> String {
        match self.run(script) {
            Ok((out, 0)) => out,
            Ok((out, rc)) => panic!("{}: `{script}` exited {rc}:\n{out}", self.name),
            Err(e) => panic!("{e}"),
        }
    }

    /// Runs `script` every `interval` until `done(output, exit code)` says
    /// yes; an error after `timeout`, with the last output.
    pub fn wait_until(
        &mut self,
        script: &str,
        timeout: Duration,
        interval: Duration,
        mut done: impl FnMut(&str, i32) -> bool,
    ) -> Result<String, VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_secs(5));
            let (out, rc) = self.run_timeout(script, left.min(DEFAULT_RUN_TIMEOUT))?;
            if done(&out, rc) {
                return Ok(out);
            }
            if Instant::now() + interval > deadline {
                return Err(VmError::Timeout {
                    vm: self.name.clone(),
                    what: format!(
                        "waiting for `{script}` to succeed; last exit code {rc}, output:\n{out}"
                    ),
                    after: timeout,
                    log_tail: self.log_tail(20),
                });
            }
            std::thread::sleep(interval);
        }
    }

    /// Writes a file in the guest (through the console; meant for small
    /// files such as configs and keys).
    pub fn write_file(&mut self, path: &str, mode: u32, contents: &[u8]) -> Result<(), VmError> {
        let dir = Path::new(path)
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let script = format!(
            "set -e\nmkdir -p {dir}\nbase64 -d > {path}.tmp <<'__HADB_EOF__'\n{b64}\n__HADB_EOF__\nchmod {mode:o} {path}.tmp\nmv {path}.tmp {path}\n",
            dir = shell_quote(if dir.is_empty() { "/" } else { &dir }),
            path = shell_quote(path),
            b64 = base64(contents)
                .as_bytes()
                .chunks(76)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect::<Vec<_>>()
                .join("\n"),
        );
        let (out, rc) = self.run(&script)?;
        if rc != 0 {
            return Err(VmError::Io {
                vm: self.name.clone(),
                what: format!("writing {path} in the guest (exit {rc}): {out}"),
                source: io::Error::other("guest command failed"),
            });
        }
        Ok(())
    }

    /// Sends one command to the qemu monitor and returns what it printed.
    pub fn monitor(&self, command: &str) -> Result<String, VmError> {
        let io_err = |what: &str, source: io::Error| VmError::Io {
            vm: self.name.clone(),
            what: what.to_owned(),
            source,
        };
        let mut s = UnixStream::connect(self.dir.join("monitor.sock"))
            .map_err(|e| io_err("connecting to the monitor", e))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| io_err("monitor timeout", e))?;
        s.write_all(format!("{command}\n").as_bytes())
            .map_err(|e| io_err("writing to the monitor", e))?;
        // Read until the next prompt after our command, or until EOF (quit).
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    break;
                }
                Err(e) => return Err(io_err("reading from the monitor", e)),
            }
            let text = String::from_utf8_lossy(&out);
            if text.matches("(qemu)").count() >= 2 || Instant::now() > deadline {
                break;
            }
        }
        Ok(strip_terminal_noise(&String::from_utf8_lossy(&out)))
    }

    /// Hard power-off (SIGKILL to qemu), as when a host dies. The temp dir
    /// (and the data disk) stays until the `Vm` is dropped.
    pub fn power_off(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(s) = self.serial.take() {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        self.power_off();
        if panicking {
            eprintln!(
                "--- {}: serial console (tail), dir {} ---\n{}\n--- end of {} ---",
                self.name,
                self.dir.display(),
                self.log_tail(80),
                self.name
            );
        }
        if std::env::var_os("HADB_VM_KEEP").is_some() {
            eprintln!("vm: keeping {} (HADB_VM_KEEP is set)", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Finds `begin` … `end` RC `@@` in console output from `from` on; returns
/// the offset after it, the raw text between the markers and the exit code.
fn parse_result(data: &[u8], from: usize, begin: &str, end: &str) -> Option<(usize, String, i32)> {
    let b = find(data, begin.as_bytes(), from)?;
    let e = find(data, end.as_bytes(), b)?;
    let close = find(data, b"@@", e + end.len())?;
    let rc = String::from_utf8_lossy(&data[e + end.len()..close])
        .trim()
        .parse()
        .unwrap_or(-1);
    let body = String::from_utf8_lossy(&data[b + begin.len()..e]).into_owned();
    Some((close + 2, body, rc))
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if from > haystack.len() || needle.is_empty() {
        return None;
    }
    haystack[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// Boots several VMs at once (each boot takes a few seconds of one core).
pub fn boot_all(assets: &Assets, cfgs: Vec<VmConfig>) -> Vec<Vm> {
    let results: Vec<Result<Vm, VmError>> = std::thread::scope(|s| {
        let handles: Vec<_> = cfgs
            .into_iter()
            .map(|cfg| s.spawn(move || Vm::boot(assets, cfg)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("boot thread panicked"))
            .collect()
    });
    let mut vms = Vec::new();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(vm) => vms.push(vm),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if !errors.is_empty() {
        drop(vms);
        panic!("booting failed:\n{}", errors.join("\n\n"));
    }
    vms
}

#[cfg(test)]
mod harness_tests {
    use super::*;

    #[test]
    fn strips_escape_sequences() {
        assert_eq!(
            strip_terminal_noise("a\x1b[6nb\r\nc\x1b[0;32md\x1b]0;t\x07e"),
            "ab\ncde"
        );
    }

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn parses_a_framed_result() {
        let data = b"noise\r\n@@HADB-BEGIN x-1@@\r\nhello\r\n\r\n@@HADB-END x-1 7@@\r\nmore";
        let (next, body, rc) =
            parse_result(data, 0, "@@HADB-BEGIN x-1@@", "@@HADB-END x-1 ").unwrap();
        assert_eq!(
            (strip_terminal_noise(&body).as_str(), rc),
            ("\nhello\n\n", 7)
        );
        assert_eq!(&data[next..], b"\r\nmore");
        assert!(parse_result(data, next, "@@HADB-BEGIN x-1@@", "@@HADB-END x-1 ").is_none());
        assert!(
            parse_result(
                b"@@HADB-BEGIN x-1@@\nhal",
                0,
                "@@HADB-BEGIN x-1@@",
                "@@HADB-END x-1 "
            )
            .is_none()
        );
    }

    #[test]
    fn newc_archive_has_parents_padding_and_trailer() {
        let a = newc_archive(&[("/usr/local/bin/x", 0o755, b"hello".to_vec())]);
        assert_eq!(a.len() % 512, 0);
        let text = String::from_utf8_lossy(&a);
        for name in [
            "usr\0",
            "usr/local\0",
            "usr/local/bin\0",
            "usr/local/bin/x\0",
            "TRAILER!!!\0",
        ] {
            assert!(text.contains(name), "{name:?} missing");
        }
        // Header of the file: mode 0100755, size 5, name length 16.
        let at = find(&a, b"usr/local/bin/x\0", 0).unwrap() - 110;
        assert_eq!(&a[at..at + 6], b"070701");
        assert_eq!(&a[at + 14..at + 22], b"000081ed");
        assert_eq!(&a[at + 54..at + 62], b"00000005");
        assert_eq!(&a[at + 94..at + 102], b"00000010");
        let data = find(&a, b"hello", 0).unwrap();
        assert_eq!(data % 4, 0);
    }

    #[test]
    fn finds_from_offset() {
        assert_eq!(find(b"abcabc", b"bc", 0), Some(1));
        assert_eq!(find(b"abcabc", b"bc", 2), Some(4));
        assert_eq!(find(b"abc", b"bc", 9), None);
    }
}
