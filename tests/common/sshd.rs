//! A real OpenSSH server (Debian's openssh-server) for the `ssh` fence
//! method's tests: its own host key and configuration, a test key in its
//! authorized keys, in the foreground with a log file, on a loopback port
//! or inside a network namespace. Killed when dropped, even if the test
//! panics; it never touches the host's own sshd or its configuration.
//!
//! Test binaries include it with `#[path = "common/sshd.rs"] mod sshd;`.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SSHD: &str = "/usr/sbin/sshd";

/// Fails the test loudly when OpenSSH is missing.
pub fn require_openssh() {
    assert!(
        Path::new(SSHD).is_file(),
        "{SSHD} is not installed: apt-get install openssh-server (see .ci/run)"
    );
    for tool in ["ssh", "ssh-keygen"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        assert!(
            found,
            "`{tool}` is not installed: apt-get install openssh-client (see .ci/run)"
        );
    }
}

/// A new ed25519 key pair at `path` and `path.pub`, no passphrase, the
/// private half mode 0600 (ssh-keygen makes it so).
pub fn keygen(path: &Path) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(path.with_extension("pub"));
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "hadb-test", "-f"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ssh-keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct Sshd {
    child: Option<Child>,
    pub addr: IpAddr,
    pub port: u16,
    host_key: PathBuf,
    log: PathBuf,
}

impl Sshd {
    /// Starts sshd on `addr:port` (inside namespace `netns` if given),
    /// letting in root with the keys in `authorized_keys`. Its files are
    /// `dir/<name>.*`. Returns once it listens.
    pub fn start(
        dir: &Path,
        name: &str,
        addr: IpAddr,
        port: u16,
        netns: Option<&str>,
        authorized_keys: &Path,
    ) -> Sshd {
        Sshd::start_with(dir, name, addr, port, netns, authorized_keys, "")
    }

    /// [`Sshd::start`] with `extra` lines appended to its configuration.
    pub fn start_with(
        dir: &Path,
        name: &str,
        addr: IpAddr,
        port: u16,
        netns: Option<&str>,
        authorized_keys: &Path,
        extra: &str,
    ) -> Sshd {
        require_openssh();
        // sshd's privilege separation needs it; the host's sshd (if any)
        // uses the same one.
        std::fs::create_dir_all("/run/sshd").unwrap();
        let host_key = dir.join(format!("{name}_host_key"));
        keygen(&host_key);
        let config = dir.join(format!("{name}_sshd_config"));
        let log = dir.join(format!("{name}_sshd.log"));
        std::fs::write(
            &config,
            format!(
                "Port {port}
ListenAddress {addr}
HostKey {host_key}
AuthorizedKeysFile {authorized}
PidFile none
# No PAM: root logs in with its key alone, as the fence does.
UsePAM no
# The test directory is under /tmp, which is world-writable.
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
LogLevel VERBOSE
{extra}",
                host_key = host_key.display(),
                authorized = authorized_keys.display(),
            ),
        )
        .unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, SSHD]);
                c
            }
            None => Command::new(SSHD),
        };
        // -D: foreground, so the test owns the process; -E: log to a file.
        let child = cmd
            .arg("-D")
            .arg("-f")
            .arg(&config)
            .arg("-E")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut sshd = Sshd {
            child: Some(child),
            addr,
            port,
            host_key,
            log,
        };
        let listening = format!("Server listening on {addr} port {port}");
        let start = Instant::now();
        while !sshd.log().contains(&listening) {
            if let Some(status) = sshd.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("sshd exited ({status}) before listening:\n{}", sshd.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "sshd does not listen after 10 s:\n{}",
                sshd.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        sshd
    }

    /// Its line for a known_hosts file, as `ssh-keyscan` would print it.
    pub fn known_host(&self) -> String {
        let key = std::fs::read_to_string(self.host_key.with_extension("pub")).unwrap();
        let key: Vec<&str> = key.split_whitespace().take(2).collect();
        let host = if self.port == 22 {
            self.addr.to_string()
        } else {
            format!("[{}]:{}", self.addr, self.port)
        };
        format!("{host} {}\n", key.join(" "))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}
