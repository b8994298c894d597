//! A pair of real `hadb run` processes on loopback, with file-backed
//! volumes in a `/tmp/hadb-*` directory that is removed (and the processes
//! killed) when the pair is dropped, even if the test fails.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod mariadb;

pub const NAMES: [&str; 2] = ["a", "b"];

pub fn hadb_bin() -> &'static str {
    env!("CARGO_BIN_EXE_hadb")
}

/// Fails the test loudly when a needed tool is missing.
pub fn require(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is not installed: apt-get install {package} (see .ci/run)"
    );
}

/// Ports handed out in sequence within this test process, so two tests
/// running in parallel never pick the same one (asking the kernel for port
/// 0 and closing it again lets another test be given it too).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 20_000) as u16;
    let _ = NEXT.compare_exchange(0, base, Ordering::SeqCst, Ordering::SeqCst);
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub struct Pair {
    pub dir: PathBuf,
    pub procs: [Option<Child>; 2],
    pub ports: [u16; 2],
    pub size: u64,
    /// Network namespace each daemon runs in (None: the host's).
    pub netns: [Option<String>; 2],
}

impl Pair {
    /// Writes configs, keys and metadata; starts nothing.
    pub fn new(test: &str, mode: &str, size: u64) -> Pair {
        let dir = PathBuf::from(format!("/tmp/hadb-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ports = [free_port(), free_port()];
        let pair = Pair {
            dir,
            procs: [None, None],
            ports,
            size,
            netns: [None, None],
        };
        let key: Vec<u8> = (0..32).map(|i| (i * 7 + 3) as u8).collect();
        for n in 0..2 {
            pair.write_key(n, &key);
            std::fs::write(pair.config(n), pair.config_text(n, mode)).unwrap();
            let f = std::fs::File::create(pair.image(n)).unwrap();
            f.set_len(size).unwrap();
            let out = pair.hadb(n, &["volume", "create-md"]);
            assert!(
                out.status.success(),
                "create-md: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        pair
    }

    pub fn write_key(&self, n: usize, key: &[u8]) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.join(format!("{}.key", NAMES[n]));
        std::fs::write(&path, key).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    pub fn config_text(&self, n: usize, mode: &str) -> String {
        let d = self.dir.display();
        let me = NAMES[n];
        format!(
            r#"cluster = "test"
node = "{me}"
key_file = "{d}/{me}.key"
# Each node its own, as on two machines.
state_dir = "{d}/{me}.state"

[nodes.a]
address = "127.0.0.1"
port = {pa}
# UDP: the same number as the TCP port is free for it.
heartbeat_port = {pa}

[nodes.b]
address = "127.0.0.1"
port = {pb}
heartbeat_port = {pb}

[volume]
device = "{d}/{me}.img"
mode = "{mode}"
ack_timeout = "1s"
nbd_socket = "{d}/{me}.nbd"

[control]
socket = "{d}/{me}.ctl"

# The volume tests move roles by hand; the manager's tests turn it on.
[manager]
maintenance = true
"#,
            pa = self.ports[0],
            pb = self.ports[1]
        )
    }

    pub fn config(&self, n: usize) -> PathBuf {
        self.dir.join(format!("{}.toml", NAMES[n]))
    }
    pub fn image(&self, n: usize) -> PathBuf {
        self.dir.join(format!("{}.img", NAMES[n]))
    }
    pub fn nbd_socket(&self, n: usize) -> PathBuf {
        self.dir.join(format!("{}.nbd", NAMES[n]))
    }
    pub fn uri(&self, n: usize) -> String {
        format!("nbd+unix:///?socket={}", self.nbd_socket(n).display())
    }
    pub fn log(&self, n: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.log", NAMES[n]))).unwrap_or_default()
    }

    pub fn hadb(&self, n: usize, args: &[&str]) -> Output {
        let config = self.config(n);
        let mut full = vec!["--config", config.to_str().unwrap(), "--cmdline", "none"];
        full.extend_from_slice(args);
        Command::new(hadb_bin()).args(&full).output().unwrap()
    }

    pub fn start(&mut self, n: usize) {
        let config = self.config(n);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", NAMES[n])))
            .unwrap();
        self.procs[n] = Some(spawn_hadb_run(self.netns[n].as_deref(), &config, log));
        self.wait(n, "control socket", |s| s.is_some());
    }

    pub fn kill(&mut self, n: usize) {
        if let Some(mut c) = self.procs[n].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A clean stop (SIGTERM), as systemd does it; returns whether the
    /// daemon exited successfully.
    pub fn stop(&mut self, n: usize) -> bool {
        let Some(mut c) = self.procs[n].take() else {
            return false;
        };
        let pid = c.id().to_string();
        run(Command::new("kill").args(["-TERM", &pid]));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status.success();
            }
            if std::time::Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn status(&self, n: usize) -> Option<Value> {
        let out = self.hadb(n, &["status", "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Polls status until `pred` holds; panics with both logs after 20 s.
    pub fn wait(
        &self,
        n: usize,
        what: &str,
        pred: impl Fn(Option<&Value>) -> bool,
    ) -> Option<Value> {
        let start = Instant::now();
        loop {
            let s = self.status(n);
            if pred(s.as_ref()) {
                return s;
            }
            if start.elapsed() > Duration::from_secs(20) {
                panic!(
                    "node {} never reached `{what}`; last status {s:?}\n--- a.log\n{}\n--- b.log\n{}",
                    NAMES[n],
                    self.log(0),
                    self.log(1)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn primary(&self, n: usize) {
        let out = self.hadb(n, &["volume", "primary"]);
        assert!(
            out.status.success(),
            "primary on {}: {}{}",
            NAMES[n],
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Both nodes running, `a` primary, `b` an up-to-date secondary.
    pub fn up(test: &str, mode: &str, size: u64) -> Pair {
        let mut p = Pair::new(test, mode, size);
        p.start(0);
        p.start(1);
        p.wait(0, "peer connected", |s| {
            s.is_some_and(|s| !s["volume"]["peer"].is_null())
        });
        p.primary(0);
        p.wait_in_sync(0);
        p
    }

    /// Starts both daemons of configs already written, waits until each
    /// hears the other and the volume is connected, then makes `a` the
    /// first primary (the operator's choice, as DRBD's first
    /// `primary --force`) and waits until `b` holds a full copy.
    pub fn start_connected(&mut self) {
        self.start(0);
        self.start(1);
        for n in 0..2 {
            self.wait(n, "peer heard and volume connected", |s| {
                s.is_some_and(|s| {
                    s["heartbeat"]["peer_alive"] == true && !s["volume"]["peer"].is_null()
                })
            });
        }
        self.primary(0);
        self.wait_in_sync(0);
    }

    pub fn wait_link_lost(&self, n: usize) {
        self.wait(n, "link lost", |s| {
            s.is_some_and(|s| s["volume"]["peer"].is_null())
        });
    }

    pub fn wait_in_sync(&self, primary: usize) {
        self.wait(primary, "peer up to date", |s| {
            s.is_some_and(|s| s["volume"]["peer_up_to_date"] == Value::Bool(true))
        });
    }

    pub fn data_size(&self) -> u64 {
        self.status(0).or_else(|| self.status(1)).unwrap()["volume"]["data_size"]
            .as_u64()
            .unwrap()
    }

    /// The data area of a node's backing file.
    pub fn data(&self, n: usize, data_size: u64) -> Vec<u8> {
        let mut d = std::fs::read(self.image(n)).unwrap();
        d.truncate(data_size as usize);
        d
    }

    pub fn counter(&self, n: usize, group: &str, name: &str) -> u64 {
        self.status(n).unwrap()["volume"][group][name]
            .as_u64()
            .unwrap()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.kill(0);
        self.kill(1);
        // Logs that matter were printed in the panic message already.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs qemu-io commands against an NBD URI and fails the test if any fails.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    run(&mut c)
}

/// The same in the background, for writes that are to be held.
pub fn qemu_io_spawn(uri: &str, cmds: &[&str]) -> Child {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// `hadb run` with `config`, in network namespace `netns` if given, its
/// log (stderr) to `log`.
pub fn spawn_hadb_run(netns: Option<&str>, config: &Path, log: std::fs::File) -> Child {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, hadb_bin()]);
            c
        }
        None => Command::new(hadb_bin()),
    };
    cmd.args([
        "--config",
        config.to_str().unwrap(),
        "--cmdline",
        "none",
        "run",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(log)
    .spawn()
    .unwrap()
}

pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}
