//! The `ssh` fence method: the OpenSSH client runs `fencing.ssh.command`
//! on the peer (by default an immediate reboot through sysrq), the way
//! Pacemaker's `external/ssh` STONITH plugin does, but never on trust: a
//! peer that cannot be reached is a failed fence, and even a delivered
//! command counts only once the peer then stays silent on every ring
//! ([`crate::core::fence::ssh_silence`], checked by the caller).
//!
//! What "delivered" means. ssh runs with `LogLevel=DEBUG2` and `-E FILE`:
//! its own log goes to a private file, whose lines say how far the session
//! got ([`Session::read`]):
//!
//! - no `Authenticated to …`: it never logged in (connection refused or
//!   timed out, host key unknown or changed, key refused). Failed.
//! - logged in, and `exec request accepted`: sshd on the peer started the
//!   command. Then `Exit status 0` (the command returned, as a command
//!   that stops only hadb does), or no exit status at all because the
//!   connection dropped (`Connection … closed`, or `Timeout, server not
//!   responding` from the keepalives: the peer rebooted under its own
//!   session) — both are delivered. A non-zero exit status, or an exit by
//!   a signal, is a command that failed on the peer: failed.
//! - logged in but the request was never accepted (the connection dropped
//!   in between): the command may or may not have started, so the fence
//!   failed. Failing safe costs a takeover that waits for the operator;
//!   the other way could cost a second primary.
//!
//! ssh's own exit code cannot tell these apart (255 is both "could not
//! connect" and "the connection dropped after the command"), which is why
//! the verbose transcript is read instead.
//!
//! Why a file and not ssh's stderr: the peer writes to that stderr too,
//! before any login (sshd's `Banner`) and after (the command's own
//! stderr), so a banner reading "Authenticated to …", "exec request
//! accepted" and "Exit status 0" would have passed for a delivered fence.
//! `-E` sends only ssh's log to the file; what arrives on stderr is kept
//! as the peer's words for messages, never as evidence.

use std::fmt;
use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::SshConfig;

/// Lines of ssh's transcript kept (DEBUG2 says a lot before the part
/// that matters, which comes last).
const MAX_LINES: usize = 4000;

/// Keepalives: a peer that rebooted under its session is noticed after
/// about three seconds of silence rather than TCP's minutes.
const ALIVE_INTERVAL_S: u32 = 1;
const ALIVE_COUNT: u32 = 3;

/// How long `hadb fence test` gives `true` to run once logged in.
const TEST_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub enum SshError {
    /// The ssh client is not installed.
    NoClient,
    /// A configured file is missing, unreadable or too open.
    File {
        what: &'static str,
        path: PathBuf,
        problem: String,
    },
    /// ssh could not be started.
    Start(std::io::Error),
    /// It never logged in.
    NotConnected { target: String, detail: String },
    /// It logged in, but the peer never said it started the command.
    NotStarted { target: String, detail: String },
    /// The command ran and failed on the peer.
    CommandFailed {
        target: String,
        status: String,
        detail: String,
    },
    /// The command neither ended nor dropped the connection in time.
    Hung { target: String, after: Duration },
}

impl fmt::Display for SshError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SshError::NoClient => write!(
                f,
                "ssh fence: the OpenSSH client (`ssh`) is not installed: apt-get install openssh-client"
            ),
            SshError::File {
                what,
                path,
                problem,
            } => write!(
                f,
                "ssh fence: cannot use the {what} {}: {problem}; fix the file or fencing.ssh in the config",
                path.display()
            ),
            SshError::Start(e) => write!(f, "ssh fence: cannot run ssh: {e}"),
            SshError::NotConnected { target, detail } => write!(
                f,
                "ssh fence: cannot log in to {target}: {detail}; check that sshd runs there and is reachable (fencing.ssh.port, the node's ssh_address), that its host key is in known_hosts_file, and that identity_file's public key is in the user's authorized_keys there (`hadb fence test` tries it)"
            ),
            SshError::NotStarted { target, detail } => write!(
                f,
                "ssh fence: logged in to {target}, but the connection ended before the peer said it started the command ({detail}); it may or may not have run, so this is no proof"
            ),
            SshError::CommandFailed {
                target,
                status,
                detail,
            } => write!(
                f,
                "ssh fence: the command failed on {target} ({status}){}; check fencing.ssh.command and the user's rights there",
                if detail.is_empty() {
                    String::new()
                } else {
                    format!(": {detail}")
                }
            ),
            SshError::Hung { target, after } => write!(
                f,
                "ssh fence: the command on {target} neither ended nor took the peer down within {}s; it was stopped here",
                after.as_secs()
            ),
        }
    }
}

impl std::error::Error for SshError {}

/// How a delivered command showed it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// It ran and returned 0.
    Exited,
    /// It started, and the connection dropped without an exit status: the
    /// peer went down under its own session.
    Dropped,
}

impl fmt::Display for Delivered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Delivered::Exited => "it ran and exited 0",
            Delivered::Dropped => "it started and the connection dropped (the peer went down)",
        })
    }
}

/// A delivered command: how, and when the peer accepted it.
#[derive(Debug, Clone, Copy)]
pub struct Delivery {
    pub how: Delivered,
    pub at: Instant,
}

/// What ssh's verbose transcript says of a session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    pub authenticated: bool,
    /// sshd on the peer started the command.
    pub accepted: bool,
    /// The command's exit status, if the peer sent one.
    pub exit: Option<i32>,
    /// The command was ended by a signal on the peer.
    pub signalled: bool,
    /// The last lines that are not debugging chatter: what went wrong, in
    /// ssh's words.
    pub problem: String,
    /// The last lines the peer wrote on ssh's stderr (the command's error,
    /// a banner): for messages only, never evidence.
    pub peer_said: String,
}

impl Session {
    /// Reads ssh's own log (`-E`) of a run with `LogLevel=DEBUG2`. Each
    /// record is matched from its start: a record's later part may quote
    /// text the peer sent (a disconnect reason).
    pub fn read<'a>(lines: impl IntoIterator<Item = &'a str>) -> Session {
        let mut s = Session::default();
        let mut said: Vec<&str> = Vec::new();
        for line in lines {
            let line = line.trim_end();
            if line.starts_with("Authenticated to ")
                || line.starts_with("debug1: Authentication succeeded")
            {
                s.authenticated = true;
            } else if line.starts_with("debug2: exec request accepted on channel ") {
                s.accepted = true;
            } else if line.starts_with("debug1: client_input_channel_req: ")
                && line.contains(" rtype exit-signal ")
            {
                s.signalled = true;
            } else if let Some(n) = line.strip_prefix("debug1: Exit status ") {
                // -1: ssh had no exit status from the peer.
                s.exit = n.trim().parse().ok().filter(|n: &i32| *n >= 0);
            } else if !line.starts_with("debug")
                && !line.starts_with("Transferred: ")
                && !line.starts_with("Bytes per second")
                && !line.starts_with('@')
                && !line.trim().is_empty()
            {
                said.push(line.trim());
            }
        }
        let tail = said.len().saturating_sub(2);
        s.problem = said[tail..].join("; ");
        s
    }

    /// The verdict on a run of the fence command; `killed`: the run was
    /// stopped here at its deadline.
    pub fn verdict(&self, target: &str, killed: Option<Duration>) -> Result<Delivered, SshError> {
        let target = target.to_owned();
        let words = self.words();
        let detail = if words.is_empty() {
            "ssh said nothing more".to_owned()
        } else {
            words.clone()
        };
        if !self.authenticated {
            return Err(match killed {
                Some(after) => SshError::NotConnected {
                    target,
                    detail: format!("no session after {}s", after.as_secs()),
                },
                None => SshError::NotConnected { target, detail },
            });
        }
        if !self.accepted {
            return Err(SshError::NotStarted { target, detail });
        }
        if self.signalled {
            return Err(SshError::CommandFailed {
                target,
                status: "ended by a signal".into(),
                detail: words,
            });
        }
        match (self.exit, killed) {
            (Some(0), _) => Ok(Delivered::Exited),
            (Some(n), _) => Err(SshError::CommandFailed {
                target,
                status: format!("exit status {n}"),
                detail: words,
            }),
            (None, Some(after)) => Err(SshError::Hung { target, after }),
            (None, None) => Ok(Delivered::Dropped),
        }
    }
}

impl Session {
    /// What went wrong, in ssh's words and then the peer's.
    fn words(&self) -> String {
        match (self.problem.is_empty(), self.peer_said.is_empty()) {
            (_, true) => self.problem.clone(),
            (true, false) => format!("the peer said: {}", self.peer_said),
            (false, false) => format!("{}; the peer said: {}", self.problem, self.peer_said),
        }
    }
}

/// The `ssh` fence of one peer.
#[derive(Debug)]
pub struct SshFence {
    client: PathBuf,
    user: String,
    address: IpAddr,
    port: u16,
    identity_file: PathBuf,
    known_hosts_file: PathBuf,
    connect_timeout: Duration,
    command: String,
    confirm_timeout: Duration,
    /// For messages: `root@10.10.10.5:22 (hadb02)`.
    target: String,
}

impl SshFence {
    /// Checks the client, the key (mode 0600) and the known hosts; runs
    /// nothing.
    pub fn new(cfg: &SshConfig, peer: &str, address: IpAddr) -> Result<SshFence, SshError> {
        let client = find_client().ok_or(SshError::NoClient)?;
        check_private_key(&cfg.identity_file)?;
        check_known_hosts(&cfg.known_hosts_file, address, cfg.port)?;
        Ok(SshFence {
            client,
            user: cfg.user.clone(),
            address,
            port: cfg.port,
            identity_file: cfg.identity_file.clone(),
            known_hosts_file: cfg.known_hosts_file.clone(),
            connect_timeout: cfg.connect_timeout.0,
            command: cfg.command.clone(),
            confirm_timeout: cfg.confirm_timeout.0,
            target: format!("{}@{}:{} ({peer})", cfg.user, address, cfg.port),
        })
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    pub fn confirm_timeout(&self) -> Duration {
        self.confirm_timeout
    }

    /// ssh's arguments for running `remote` on the peer: no configuration
    /// file, agent, password or prompt; only the configured key and host
    /// key; bounded connection and keepalives.
    /// `log`: where ssh writes its own log (`-E`).
    pub fn argv(&self, remote: &str, log: &Path) -> Vec<String> {
        let connect = self.connect_timeout.as_secs_f64().ceil().max(1.0) as u64;
        let mut a: Vec<String> = vec!["-F".into(), "none".into()];
        for o in [
            "BatchMode=yes".to_owned(),
            "PasswordAuthentication=no".into(),
            "KbdInteractiveAuthentication=no".into(),
            "PreferredAuthentications=publickey".into(),
            "IdentitiesOnly=yes".into(),
            "IdentityAgent=none".into(),
            format!("IdentityFile={}", self.identity_file.display()),
            format!("UserKnownHostsFile={}", self.known_hosts_file.display()),
            "GlobalKnownHostsFile=/dev/null".into(),
            "StrictHostKeyChecking=yes".into(),
            "UpdateHostKeys=no".into(),
            "CheckHostIP=no".into(),
            format!("ConnectTimeout={connect}"),
            "ConnectionAttempts=1".into(),
            format!("ServerAliveInterval={ALIVE_INTERVAL_S}"),
            format!("ServerAliveCountMax={ALIVE_COUNT}"),
            "ControlMaster=no".into(),
            "ControlPath=none".into(),
            "ForwardAgent=no".into(),
            "ForwardX11=no".into(),
            "RequestTTY=no".into(),
            "LogLevel=DEBUG2".into(),
        ] {
            a.push("-o".into());
            a.push(o);
        }
        a.extend([
            "-E".into(),
            log.display().to_string(),
            "-n".into(),
            "-T".into(),
            "-p".into(),
            self.port.to_string(),
            "-l".into(),
            self.user.clone(),
            "--".into(),
            self.address.to_string(),
            remote.into(),
        ]);
        a
    }

    /// Runs the fence command on the peer; Ok once it is delivered (see the
    /// module doc). Blocks for up to `connect_timeout + confirm_timeout`.
    pub fn deliver(&self) -> Result<Delivery, SshError> {
        let limit = self.connect_timeout + self.confirm_timeout;
        let (session, accepted_at, killed) = self.run(&self.command, limit)?;
        let how = session.verdict(&self.target, killed)?;
        Ok(Delivery {
            how,
            at: accepted_at.unwrap_or_else(Instant::now),
        })
    }

    /// `hadb fence test`: logs in with the same options and runs `true`,
    /// which must exit 0. Fences nothing.
    pub fn test(&self) -> Result<(), SshError> {
        let (session, _, killed) = self.run("true", self.connect_timeout + TEST_GRACE)?;
        match session.verdict(&self.target, killed)? {
            Delivered::Exited => Ok(()),
            Delivered::Dropped => Err(SshError::NotStarted {
                target: self.target.clone(),
                detail: "`true` never returned an exit status".into(),
            }),
        }
    }

    /// Runs ssh with `remote`, reading its log as it comes; kills it at
    /// `limit`. Returns the session, when the peer accepted the command,
    /// and, if it was killed, after how long.
    fn run(
        &self,
        remote: &str,
        limit: Duration,
    ) -> Result<(Session, Option<Instant>, Option<Duration>), SshError> {
        let log_file = PrivateLog::create().map_err(SshError::Start)?;
        let mut cmd = Command::new(&self.client);
        cmd.args(self.argv(remote, &log_file.path))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = crate::run::process::spawn(&mut cmd).map_err(SshError::Start)?;
        let pid = child.id();
        let Some(stderr) = child.stderr.take() else {
            let _ = child.kill();
            let _ = child.wait();
            crate::run::process::release(pid);
            return Err(SshError::Start(std::io::Error::other("no pipe from ssh")));
        };
        // The deadline: a thread that kills ssh unless told it ended. The
        // child is waited for only after this thread is joined, so the pid
        // cannot belong to another process when it is killed.
        let (ended, deadline) = std::sync::mpsc::channel::<()>();
        let killer = std::thread::Builder::new()
            .name("hadb-fence-ssh".into())
            .spawn(move || {
                if deadline.recv_timeout(limit) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
                        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                    }
                    return true;
                }
                false
            });
        let killer = match killer {
            Ok(k) => k,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                crate::run::process::release(pid);
                return Err(SshError::Start(e));
            }
        };
        // The peer's stderr, read to the end whatever it holds (it may not
        // be UTF-8) on a thread of its own: a pipe left unread would stall
        // ssh. Its end is ssh's end.
        let (drained, peer_done) = std::sync::mpsc::channel::<()>();
        let drainer = std::thread::Builder::new()
            .name("hadb-fence-ssh-err".into())
            .spawn(move || {
                let mut tail = std::collections::VecDeque::new();
                let mut stderr = BufReader::new(stderr);
                let mut raw = Vec::new();
                while matches!(stderr.read_until(b'\n', &mut raw), Ok(n) if n > 0) {
                    let line = String::from_utf8_lossy(&raw).trim().to_owned();
                    raw.clear();
                    if line.is_empty() {
                        continue;
                    }
                    log::debug!("ssh fence: the peer said: {line}");
                    if tail.len() == PEER_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
                drop(drained);
                Vec::from(tail).join("; ")
            });
        let started = Instant::now();
        let mut log = Transcript::default();
        let peer_said = match drainer {
            Ok(drainer) => {
                // ssh's log, as it grows, until ssh is gone: the moment
                // the peer accepted the command is when the fence was
                // delivered (read a few ms late at most, which only makes
                // the silence that follows count for less).
                while peer_done.recv_timeout(LOG_POLL)
                    == Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                {
                    log.read_more(&log_file.file);
                }
                drainer.join().unwrap_or_default()
            }
            Err(e) => {
                let _ = child.kill();
                drop(ended);
                let _ = killer.join();
                let _ = child.wait();
                crate::run::process::release(pid);
                return Err(SshError::Start(e));
            }
        };
        drop(ended);
        let killed = killer.join().unwrap_or(false);
        let _ = child.wait();
        crate::run::process::release(pid);
        log.read_more(&log_file.file);
        let mut session = Session::read(log.lines.iter().map(String::as_str));
        session.peer_said = peer_said;
        Ok((session, log.accepted_at, killed.then(|| started.elapsed())))
    }
}

/// Lines of the peer's stderr kept for messages.
const PEER_LINES: usize = 2;

/// How often ssh's log is read while it runs.
const LOG_POLL: Duration = Duration::from_millis(10);

/// ssh's log file (`-E`): created empty, mode 0600, in a directory of its
/// own (mode 0700) so nobody else can read it, swap it or write to it
/// first; both are removed when dropped.
struct PrivateLog {
    dir: PathBuf,
    path: PathBuf,
    /// Opened for reading before ssh appends to it.
    file: std::fs::File,
}

impl PrivateLog {
    fn create() -> std::io::Result<PrivateLog> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let base = std::env::temp_dir();
        let mut tries = 0;
        let dir = loop {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = base.join(format!("hadb-fence-ssh.{}.{n}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => break dir,
                // Left by an earlier hadb with the same pid, or planted:
                // never reused, another name is taken.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 100 => {
                    tries += 1
                }
                Err(e) => {
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!(
                            "cannot make a private directory for ssh's log in {}: {e}",
                            base.display()
                        ),
                    ));
                }
            }
        };
        let path = dir.join("ssh.log");
        let made = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path);
        match made {
            Ok(file) => Ok(PrivateLog { dir, path, file }),
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                Err(std::io::Error::new(
                    e.kind(),
                    format!("cannot make ssh's log file {}: {e}", path.display()),
                ))
            }
        }
    }
}

impl Drop for PrivateLog {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// ssh's log read so far: its complete lines (the last [`MAX_LINES`]),
/// and when the peer's acceptance of the command was first seen.
#[derive(Default)]
struct Transcript {
    lines: std::collections::VecDeque<String>,
    partial: Vec<u8>,
    accepted_at: Option<Instant>,
}

impl Transcript {
    /// Reads what ssh appended since the last call.
    fn read_more(&mut self, mut file: &std::fs::File) {
        use std::io::Read;
        let mut buf = [0u8; 8192];
        while let Ok(n @ 1..) = file.read(&mut buf) {
            self.partial.extend_from_slice(&buf[..n]);
        }
        while let Some(at) = self.partial.iter().position(|b| *b == b'\n') {
            let raw: Vec<u8> = self.partial.drain(..=at).collect();
            let line = String::from_utf8_lossy(&raw).trim_end().to_owned();
            if line.starts_with("debug2: exec request accepted on channel ") {
                self.accepted_at.get_or_insert_with(Instant::now);
            }
            log::debug!("ssh fence: {line}");
            if self.lines.len() == MAX_LINES {
                self.lines.pop_front();
            }
            self.lines.push_back(line);
        }
    }
}

/// The ssh client on PATH (or where Debian and Ubuntu put it: hadb may run
/// as PID 1 with no PATH).
fn find_client() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join("ssh"))
        .find(|p| p.is_file())
}

/// The key must pass [`crate::run::secret::read_secret`] (ssh checks
/// only its mode; the owner matters as much). Read here only to check.
fn check_private_key(path: &Path) -> Result<(), SshError> {
    match crate::run::secret::read_secret("identity file", path) {
        Ok(_) => Ok(()),
        Err(e) => Err(SshError::File {
            what: "identity file",
            path: path.to_owned(),
            problem: if e.is_missing() {
                format!(
                    "{e}; make a key with `ssh-keygen -t ed25519 -N '' -f {}` and put its .pub in the peer's authorized_keys",
                    path.display()
                )
            } else {
                e.to_string()
            },
        }),
    }
}

/// The known hosts file must exist and name the peer, or every fence would
/// fail at the host key check.
fn check_known_hosts(path: &Path, address: IpAddr, port: u16) -> Result<(), SshError> {
    let text = std::fs::read_to_string(path).map_err(|e| SshError::File {
        what: "known hosts file",
        path: path.to_owned(),
        problem: format!(
            "{e}; add the peer's host key: ssh-keyscan -p {port} {address} > {}",
            path.display()
        ),
    })?;
    let useful = text
        .lines()
        .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    if !useful {
        return Err(SshError::File {
            what: "known hosts file",
            path: path.to_owned(),
            problem: format!(
                "it holds no host key; add the peer's: ssh-keyscan -p {port} {address} > {}",
                path.display()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What OpenSSH 9.2 printed in each case (the debug chatter before the
    /// login cut short).
    const LOGIN: &str = "debug1: Connecting to 127.0.0.1 [127.0.0.1] port 22999.
debug1: Connection established.
debug1: Server accepts key: client ED25519 SHA256:NnUU explicit
Authenticated to 127.0.0.1 ([127.0.0.1]:22999) using \"publickey\".
debug1: channel 0: new session [client-session] (inactive timeout: 0)
debug1: Sending command: CMD
debug2: channel 0: request exec confirm 1
";

    fn read(tail: &str) -> Session {
        let text = format!("{LOGIN}{tail}");
        Session::read(text.lines())
    }

    #[test]
    fn a_command_that_exits_0_is_delivered() {
        let s = read(
            "debug2: exec request accepted on channel 0
debug1: client_input_channel_req: channel 0 rtype exit-status reply 0
Transferred: sent 3472, received 3296 bytes, in 0.2 seconds
Bytes per second: sent 15963.7, received 15154.5
debug1: Exit status 0
",
        );
        assert!(s.authenticated && s.accepted);
        assert_eq!(s.exit, Some(0));
        assert_eq!(s.verdict("t", None).unwrap(), Delivered::Exited);
    }

    #[test]
    fn a_peer_that_goes_down_under_its_session_is_delivered() {
        for tail in [
            // The reboot: the keepalives go unanswered.
            "debug2: exec request accepted on channel 0
Timeout, server 127.0.0.1 not responding.
",
            // The session's sshd died with it.
            "debug2: exec request accepted on channel 0
Connection to 127.0.0.1 closed by remote host.
Transferred: sent 3496, received 3232 bytes, in 0.4 seconds
debug1: Exit status -1
",
        ] {
            let s = read(tail);
            assert_eq!(s.exit, None, "{tail}");
            assert_eq!(s.verdict("t", None).unwrap(), Delivered::Dropped);
        }
    }

    #[test]
    fn never_logged_in_or_never_started_is_a_failed_fence() {
        let refused = Session::read(
            "debug1: Connecting to 127.0.0.1 [127.0.0.1] port 22998.
ssh: connect to host 127.0.0.1 port 22998: Connection refused
"
            .lines(),
        );
        let err = refused
            .verdict("root@127.0.0.1:22998 (a)", None)
            .unwrap_err();
        assert!(matches!(err, SshError::NotConnected { .. }), "{err}");
        assert!(err.to_string().contains("Connection refused"), "{err}");
        let host_key = Session::read(
            "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @
Offending ED25519 key in bad_known:1
Host key for [127.0.0.1]:22999 has changed and you have requested strict checking.
Host key verification failed.
"
            .lines(),
        );
        let err = host_key.verdict("t", None).unwrap_err().to_string();
        assert!(err.contains("Host key verification failed"), "{err}");
        let silent = Session::read("debug1: Connecting to 10.0.0.9 port 22.\n".lines());
        let err = silent
            .verdict("t", Some(Duration::from_secs(7)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no session after 7s"), "{err}");
        // Logged in, then the connection went before sshd said it started
        // the command: no proof that it ran.
        let dropped = read("Connection to 127.0.0.1 closed by remote host.\n");
        let err = dropped.verdict("t", None).unwrap_err();
        assert!(matches!(err, SshError::NotStarted { .. }), "{err}");
    }

    #[test]
    fn a_command_that_fails_or_hangs_is_a_failed_fence() {
        let failed = read(
            "debug2: exec request accepted on channel 0
debug1: client_input_channel_req: channel 0 rtype exit-status reply 0
sh: 1: cannot create /proc/sysrq-trigger: Permission denied
debug1: Exit status 2
",
        );
        let err = failed.verdict("t", None).unwrap_err().to_string();
        assert!(
            err.contains("exit status 2") && err.contains("Permission denied"),
            "{err}"
        );
        let signalled = read(
            "debug2: exec request accepted on channel 0
debug1: client_input_channel_req: channel 0 rtype exit-signal reply 0
debug1: Exit status -1
",
        );
        let err = signalled.verdict("t", None).unwrap_err().to_string();
        assert!(err.contains("signal"), "{err}");
        let hung = read("debug2: exec request accepted on channel 0\n");
        let err = hung
            .verdict("t", Some(Duration::from_secs(15)))
            .unwrap_err();
        assert!(matches!(err, SshError::Hung { .. }), "{err}");
    }

    #[test]
    fn the_command_line_trusts_nothing_but_the_configured_key_and_host() {
        let f = SshFence {
            client: "/usr/bin/ssh".into(),
            user: "root".into(),
            address: "10.10.10.5".parse().unwrap(),
            port: 22,
            identity_file: "/etc/hadb/fence_ssh_key".into(),
            known_hosts_file: "/etc/hadb/fence_ssh_known_hosts".into(),
            connect_timeout: Duration::from_millis(4500),
            command: "echo b > /proc/sysrq-trigger".into(),
            confirm_timeout: Duration::from_secs(10),
            target: "root@10.10.10.5:22 (hadb02)".into(),
        };
        let a = f.argv(
            "echo b > /proc/sysrq-trigger",
            Path::new("/tmp/hadb-fence-ssh.1.0/ssh.log"),
        );
        let joined = a.join(" ");
        for want in [
            "-F none",
            "BatchMode=yes",
            "IdentitiesOnly=yes",
            "IdentityAgent=none",
            "IdentityFile=/etc/hadb/fence_ssh_key",
            "UserKnownHostsFile=/etc/hadb/fence_ssh_known_hosts",
            "StrictHostKeyChecking=yes",
            "ConnectTimeout=5",
            "LogLevel=DEBUG2",
            "-E /tmp/hadb-fence-ssh.1.0/ssh.log",
            "-p 22 -l root -- 10.10.10.5",
        ] {
            assert!(joined.contains(want), "{want} missing: {joined}");
        }
        assert_eq!(
            a.last().map(String::as_str),
            Some("echo b > /proc/sysrq-trigger"),
            "the command is one argument, after the host"
        );
    }
}
