//! A throwaway MariaDB server from the distribution's packages, for host
//! tests: its own data directory and socket under `/tmp/hadb-mysql-*`,
//! no TCP, no config files read, running as root. The data directory is
//! bootstrapped with the monitor user and the probe table that
//! docs/mysql.md describes, so a test (or a hadb that supervises mysqld
//! itself) can start mariadbd on it and check it at once.
//!
//! Dropping a `Mariadb` kills the server and removes the directory, even
//! when the test panicked.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const MONITOR_USER: &str = "hadb_monitor";
pub const MONITOR_PASSWORD: &str = "hadb-monitor-secret";
/// The write probe docs/mysql.md suggests, on the table it creates.
pub const WRITE_PROBE: &str = "REPLACE INTO hadb.probe VALUES (1, NOW())";

/// Applied to a fresh data directory (mariadbd --bootstrap). FLUSH
/// PRIVILEGES first: bootstrap mode starts without the grant tables
/// loaded, and CREATE USER needs them.
fn bootstrap_sql() -> String {
    format!(
        "FLUSH PRIVILEGES;
CREATE USER '{MONITOR_USER}'@'localhost' IDENTIFIED BY '{MONITOR_PASSWORD}';
CREATE DATABASE hadb;
CREATE TABLE hadb.probe (id INT PRIMARY KEY, at DATETIME NOT NULL);
GRANT INSERT, DELETE ON hadb.probe TO '{MONITOR_USER}'@'localhost';
"
    )
}

/// Small enough that several servers fit beside each other in /tmp and
/// memory and start in a second or two.
const SMALL: [&str; 3] = [
    "--innodb-log-file-size=8M",
    "--innodb-buffer-pool-size=32M",
    "--skip-log-bin",
];

/// A distribution binary, wherever the package put it; fails the test
/// with what to install when it is missing.
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/usr/libexec"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed: apt-get install mariadb-server mariadb-client (see .ci/run)"
            )
        })
}

pub struct Mariadb {
    /// Everything of this server: datadir, socket, logs.
    pub dir: PathBuf,
    pub datadir: PathBuf,
    pub socket: PathBuf,
    child: Option<Child>,
}

impl Mariadb {
    /// A data directory installed and bootstrapped; no server running.
    pub fn install(test: &str) -> Mariadb {
        let dir = PathBuf::from(format!("/tmp/hadb-mysql-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let m = Mariadb {
            datadir: dir.join("data"),
            socket: dir.join("mysqld.sock"),
            dir,
            child: None,
        };
        let out = Command::new(tool("mariadb-install-db"))
            .arg("--no-defaults")
            .arg(format!("--datadir={}", m.datadir.display()))
            .arg(m.tmpdir_arg())
            .args([
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ])
            .args(SMALL)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mariadb-install-db failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        m.bootstrap(&bootstrap_sql());
        m
    }

    /// Installed and running, its socket answering.
    pub fn start(test: &str) -> Mariadb {
        let mut m = Mariadb::install(test);
        m.spawn();
        m
    }

    /// Runs SQL on the data directory with no server running (as root,
    /// no grants checked); fails the test if any statement fails.
    pub fn bootstrap(&self, sql: &str) {
        use std::io::Write;
        let log = self.dir.join("bootstrap.log");
        let mut child = Command::new(tool("mariadbd"))
            .args(["--no-defaults", "--bootstrap", "--user=root"])
            .arg(format!("--datadir={}", self.datadir.display()))
            .arg(self.tmpdir_arg())
            .arg(format!("--log-error={}", log.display()))
            .args(SMALL)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(sql.as_bytes())
            .unwrap();
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "mariadbd --bootstrap failed on\n{sql}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// The server's command line (program first), for a test that wants
    /// hadb to start it.
    pub fn command_line(&self) -> Vec<String> {
        let mut args = vec![
            tool("mariadbd").display().to_string(),
            "--no-defaults".into(),
            format!("--datadir={}", self.datadir.display()),
            format!("--socket={}", self.socket.display()),
            self.tmpdir_arg(),
            format!("--pid-file={}", self.dir.join("mysqld.pid").display()),
            format!("--log-error={}", self.error_log().display()),
            "--skip-networking".into(),
            "--user=root".into(),
        ];
        args.extend(SMALL.map(String::from));
        args
    }

    /// Temporary tables go here, not to the shared /tmp, where servers
    /// installed side by side trip over each other's files.
    fn tmpdir_arg(&self) -> String {
        format!("--tmpdir={}", self.dir.join("tmp").display())
    }

    pub fn error_log(&self) -> PathBuf {
        self.dir.join("error.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.error_log()).unwrap_or_default()
    }

    /// Starts mariadbd and waits (up to 60 s) until its socket accepts.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "mariadbd is already running");
        let args = self.command_line();
        let child = Command::new(&args[0])
            .args(&args[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "mariadbd exited ({status}) before it served:\n{}",
                    self.log()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "mariadbd did not open {} within 60 s:\n{}",
                self.socket.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends a signal to the running server (SIGSTOP to hang it, SIGCONT
    /// to let it go on).
    pub fn signal(&self, signal: rustix::process::Signal) {
        let pid = self.pid().expect("mariadbd is not running");
        let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
    }

    /// A clean shutdown (SIGTERM), waiting up to 60 s before SIGKILL;
    /// returns whether it exited by itself, successfully.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::CONT);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash: the socket file stays behind.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Runs SQL as root through the `mariadb` client on the socket.
    pub fn sql(&self, sql: &str) -> Output {
        Command::new(tool("mariadb"))
            .args([
                "--no-defaults",
                "--user=root",
                "--batch",
                "--skip-column-names",
            ])
            .arg(format!("--socket={}", self.socket.display()))
            .args(["--execute", sql])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Like [`Mariadb::sql`], failing the test if the statement fails;
    /// returns what it printed.
    pub fn sql_ok(&self, sql: &str) -> String {
        let out = self.sql(sql);
        assert!(
            out.status.success(),
            "`{sql}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
