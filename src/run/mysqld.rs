//! mysqld's driver: carries out what the supervision core
//! (`core::service`) decides. It starts mysqld as its own user with the
//! configured command line, copies its stderr into hadb's log, runs the
//! health checks off the event loop, signals it, and reports its exit.

use std::io::{BufRead, BufReader};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smol::channel::{Receiver, Sender};

use crate::config::MysqlConfig;
use crate::core::service::{Action, Health, Policy, Signal, Supervisor, View};
use crate::run::mysql_health::{self, HealthCheck};

const TICK: Duration = Duration::from_millis(100);

enum Msg {
    Start,
    /// Adopt a running mysqld, else start.
    Resume,
    /// Answered once nothing of mysqld runs.
    Stop(Sender<()>),
    Reset,
    /// A reloaded configuration (SIGHUP).
    Config(Box<MysqlConfig>),
    /// `hadb mysql init`, and its end.
    Init(Sender<Result<String, String>>),
    InitDone(Result<String, String>, Sender<Result<String, String>>),
    Spawned(Result<u32, String>),
    Exited(u32, String),
    Health(u32, Health),
}

/// The handle the rest of hadb holds.
pub struct Mysqld {
    tx: Sender<Msg>,
    view: Arc<Mutex<View>>,
}

impl Mysqld {
    /// What status, the probe, the heartbeat and the manager see.
    pub fn view(&self) -> View {
        crate::run::manager::lock(&self.view).clone()
    }

    /// Run mysqld (the filesystem is mounted).
    pub fn start(&self) {
        let _ = self.tx.try_send(Msg::Start);
    }

    /// Run mysqld after hadb restarted in place: adopt the one still
    /// running on the datadir, or start one if there is none.
    pub fn resume(&self) {
        let _ = self.tx.try_send(Msg::Resume);
    }

    /// Stop mysqld and wait until it is gone (SIGKILL after
    /// `stop_timeout`), so the filesystem can be unmounted.
    pub async fn stop(&self) {
        let (tx, rx) = smol::channel::bounded(1);
        if self.tx.send(Msg::Stop(tx)).await.is_ok() {
            let _ = rx.recv().await;
        }
    }

    /// Takes the reloadable settings of a reloaded configuration: the
    /// health check and the restart policy.
    pub fn reconfigure(&self, cfg: MysqlConfig) {
        let _ = self.tx.try_send(Msg::Config(Box::new(cfg)));
    }

    /// `hadb mysql init`: makes the database in an empty datadir, then
    /// starts mysqld.
    pub async fn init(&self) -> Result<String, String> {
        let (tx, rx) = smol::channel::bounded(1);
        self.tx
            .send(Msg::Init(tx))
            .await
            .map_err(|_| "the mysqld task has stopped".to_string())?;
        rx.recv()
            .await
            .map_err(|_| "the mysqld task has stopped".to_string())?
    }

    /// The operator fixed what made mysqld fail here.
    pub fn reset(&self) {
        let _ = self.tx.try_send(Msg::Reset);
    }
}

fn policy(cfg: &MysqlConfig) -> Policy {
    let us = |d: Duration| d.as_micros() as u64;
    Policy {
        start_timeout_us: us(cfg.start_timeout.0),
        stop_timeout_us: us(cfg.stop_timeout.0),
        health_interval_us: us(cfg.health_interval.0),
        health_failures: cfg.health_failures,
        max_restarts: cfg.max_restarts,
        restart_window_us: us(cfg.restart_window.0),
    }
}

/// Starts the supervision task; mysqld itself starts on [`Mysqld::start`].
pub fn spawn(cfg: MysqlConfig) -> Arc<Mysqld> {
    let (tx, rx) = smol::channel::unbounded();
    let sup = Supervisor::new(policy(&cfg));
    let view = Arc::new(Mutex::new(sup.view()));
    let m = Arc::new(Mysqld {
        tx: tx.clone(),
        view: view.clone(),
    });
    crate::run::spawn(run(cfg, sup, rx, tx, view)).detach();
    m
}

async fn run(
    mut cfg: MysqlConfig,
    mut sup: Supervisor,
    rx: Receiver<Msg>,
    tx: Sender<Msg>,
    view: Arc<Mutex<View>>,
) {
    use smol::future::FutureExt;
    let epoch = Instant::now();
    let now = || epoch.elapsed().as_micros() as u64;
    let mut waiting_stop: Vec<Sender<()>> = Vec::new();
    loop {
        let msg = async { rx.recv().await.ok() }
            .or(async {
                smol::Timer::after(TICK).await;
                None
            })
            .await;
        let t = now();
        let actions = match msg {
            Some(Msg::Start) => sup.start(t),
            Some(Msg::Resume) => match find_running(&cfg) {
                Some(pid) => {
                    watch_adopted(pid, &tx);
                    sup.adopt(pid, t)
                }
                None => {
                    log::info!(
                        "mysqld: none is running on {}; starting one",
                        cfg.datadir.display()
                    );
                    sup.start(t)
                }
            },
            Some(Msg::Stop(reply)) => {
                waiting_stop.push(reply);
                sup.stop(t)
            }
            Some(Msg::Reset) => sup.reset(t),
            Some(Msg::Init(reply)) => {
                match initialised_off_loop(&cfg).await {
                    Ok(true) => {
                        let _ = reply.try_send(Err(format!(
                            "{} already holds a database; nothing to do",
                            cfg.datadir.display()
                        )));
                    }
                    Err(e) => {
                        let _ = reply.try_send(Err(e));
                    }
                    Ok(false) => {
                        let (cfg, tx) = (cfg.clone(), tx.clone());
                        crate::run::spawn(async move {
                            let r = smol::unblock(move || init_database(&cfg)).await;
                            let _ = tx.send(Msg::InitDone(r, reply)).await;
                        })
                        .detach();
                    }
                }
                Vec::new()
            }
            Some(Msg::InitDone(r, reply)) => {
                let ok = r.is_ok();
                let _ = reply.try_send(r);
                if ok {
                    log::info!("mysqld: the database is made in {}", cfg.datadir.display());
                    sup.initialised(t)
                } else {
                    Vec::new()
                }
            }
            Some(Msg::Config(new)) => {
                cfg = *new;
                sup.set_policy(policy(&cfg));
                Vec::new()
            }
            Some(Msg::Spawned(Ok(pid))) => sup.spawned(pid, t),
            Some(Msg::Spawned(Err(e))) => sup.spawn_failed(&e, t),
            Some(Msg::Exited(pid, how)) => sup.exited(pid, &how, t),
            Some(Msg::Health(pid, h)) => sup.health(pid, h, t),
            None => sup.tick(t),
        };
        for a in actions {
            match a {
                // The datadir is looked at and prepared off the event loop
                // (see `initialised_off_loop`).
                Action::Spawn => match initialised_off_loop(&cfg).await {
                    Ok(false) => {
                        let why = format!(
                            "{} holds no database yet; `hadb mysql init` on the primary makes one",
                            cfg.datadir.display()
                        );
                        for a in sup.uninitialised(&why) {
                            if let Action::Log { message, .. } = a {
                                log::warn!("{message}");
                            }
                        }
                    }
                    _ => {
                        let (c, t) = (cfg.clone(), tx.clone());
                        let r = smol::unblock(move || start_mysqld(&c, &t)).await;
                        let _ = tx.send(Msg::Spawned(r)).await;
                    }
                },
                Action::Signal(pid, s) => signal(pid, s),
                Action::Check(pid) => {
                    let check = health_check(&cfg);
                    let tx = tx.clone();
                    crate::run::spawn(async move {
                        let h = smol::unblock(move || {
                            check.map_or_else(Health::Failing, |c| from_check(c.check()))
                        })
                        .await;
                        let _ = tx.send(Msg::Health(pid, h)).await;
                    })
                    .detach();
                }
                Action::Stopped => {
                    for reply in waiting_stop.drain(..) {
                        let _ = reply.try_send(());
                    }
                }
                Action::Log {
                    warn: true,
                    message,
                } => log::warn!("{message}"),
                Action::Log {
                    warn: false,
                    message,
                } => log::info!("{message}"),
            }
        }
        *crate::run::manager::lock(&view) = sup.view();
    }
}

fn from_check(h: mysql_health::Health) -> Health {
    match h {
        mysql_health::Health::NotStarted(_) => Health::NotStarted,
        mysql_health::Health::Starting(_) => Health::Starting,
        mysql_health::Health::Healthy { .. } => Health::Healthy,
        mysql_health::Health::Hung(why) => {
            log::debug!("mysqld health: {why}");
            Health::Hung
        }
        mysql_health::Health::Failing(why) => Health::Failing(why),
    }
}

/// The check as configured; the password file is read each time, so a
/// changed password needs no restart.
fn health_check(cfg: &MysqlConfig) -> Result<HealthCheck, String> {
    let password = match &cfg.monitor_password_file {
        Some(path) => read_password(path)?,
        None => String::new(),
    };
    Ok(HealthCheck {
        socket: cfg.socket.clone(),
        user: cfg.monitor_user.clone(),
        password,
        timeout: cfg.health_timeout.0,
        write_probe: cfg.write_probe.clone(),
    })
}

/// The monitor's password, from a root-only file
/// ([`crate::run::secret`]).
fn read_password(path: &Path) -> Result<String, String> {
    let bytes = crate::run::secret::read_secret("mysql.monitor_password_file", path)
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8(bytes).map_err(|_| {
        format!(
            "mysql.monitor_password_file {} is not UTF-8 text; write the password alone in it",
            path.display()
        )
    })?;
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
}

fn signal(pid: u32, s: Signal) {
    let Some(p) = rustix::process::Pid::from_raw(pid as i32) else {
        return;
    };
    let sig = match s {
        Signal::Term => rustix::process::Signal::TERM,
        Signal::Kill => rustix::process::Signal::KILL,
    };
    if let Err(e) = rustix::process::kill_process(p, sig) {
        log::warn!("mysqld: cannot signal pid {pid}: {e}");
    }
}

/// The account's uid and gid, from /etc/passwd.
fn lookup_user(name: &str) -> Result<(u32, u32), String> {
    let passwd = std::fs::read_to_string("/etc/passwd")
        .map_err(|e| format!("cannot read /etc/passwd: {e}"))?;
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        })
        .flatten()
        .ok_or_else(|| {
            format!("no user `{name}` in /etc/passwd; install the MySQL server package or set mysql.user")
        })
}

/// mysqld (or its initialiser) in the datadir, with no stdin, and without
/// systemd's notify socket, which is hadb's: a mysqld built with systemd
/// support would report to it as if it were hadb (the lab saw systemd
/// warn about it).
fn server_command(program: &str, rest: &[String], datadir: &std::path::Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(rest)
        .current_dir(datadir)
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null());
    cmd
}

/// Spawns mysqld; a thread copies its output into the log and another
/// waits for its exit.
fn start_mysqld(cfg: &MysqlConfig, tx: &Sender<Msg>) -> Result<u32, String> {
    let args = cfg.command_line();
    let (program, rest) = args
        .split_first()
        .ok_or("mysql.command is empty; set mysqld's command line")?;
    let (uid, gid) = lookup_user(&cfg.user)?;
    // mysqld creates its socket but not the directory it lives in
    // (/run is a fresh tmpfs at each boot), and a new filesystem's top
    // directory belongs to root.
    for dir in [cfg.socket.parent(), Some(cfg.datadir.as_path())]
        .into_iter()
        .flatten()
    {
        prepare_dir(dir, uid, gid)?;
    }
    let mut cmd = server_command(program, rest, &cfg.datadir);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    if uid != 0 {
        // std drops the supplementary groups when root sets a uid.
        cmd.uid(uid).gid(gid);
    }
    let mut child =
        crate::run::process::spawn(&mut cmd).map_err(|e| format!("cannot run {program}: {e}"))?;
    let pid = child.id();
    for out in [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let _ = std::thread::Builder::new()
            .name("hadb-mysqld-log".into())
            .spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    log::info!("mysqld[{pid}]: {line}");
                }
            });
    }
    let tx = tx.clone();
    std::thread::Builder::new()
        .name("hadb-mysqld-wait".into())
        .spawn(move || {
            let how = match child.wait() {
                Ok(s) => match (s.code(), s.signal()) {
                    (Some(c), _) => format!("exit status {c}"),
                    (_, Some(sig)) => format!("killed by signal {sig}"),
                    _ => s.to_string(),
                },
                Err(e) => format!("lost track of it: {e}"),
            };
            crate::run::process::release(pid);
            let _ = tx.send_blocking(Msg::Exited(pid, how));
        })
        .map_err(|e| format!("cannot start the thread that waits for mysqld: {e}"))?;
    Ok(pid)
}

/// The command line of process `pid`, split at NULs.
fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Process `pid`'s state letter and start time (clock ticks since boot)
/// from `/proc/PID/stat`; None once it is gone.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name in parentheses may hold spaces and parentheses itself.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    // Field 22 (starttime) is the 20th after the name.
    let start = f.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// A running (not zombie) process that is the configured mysqld on this
/// datadir, left by an earlier hadb process; the oldest if several.
fn find_running(cfg: &MysqlConfig) -> Option<u32> {
    let me = std::process::id();
    let command = cfg.command_line();
    let datadir = cfg.datadir.to_string_lossy();
    let mut found: Option<(u64, u32)> = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Some(args) = cmdline(pid) else { continue };
        if !crate::core::service::is_service(&args, &command, &datadir) {
            continue;
        }
        if let Some((state, start)) = proc_stat(pid)
            && state != 'Z'
            && state != 'X'
            && found.is_none_or(|(s, _)| start < s)
        {
            found = Some((start, pid));
        }
    }
    found.map(|(_, pid)| pid)
}

/// An adopted mysqld is not this process's child (or was the child of
/// the image this process replaced): no `wait` for it. A thread looks at
/// /proc/PID until it is gone, a zombie, or another process with the same
/// number, and reports the exit.
fn watch_adopted(pid: u32, tx: &Sender<Msg>) {
    let Some((_, start)) = proc_stat(pid) else {
        let _ = tx.try_send(Msg::Exited(pid, "gone before it could be watched".into()));
        return;
    };
    let tx = tx.clone();
    let spawned = std::thread::Builder::new()
        .name("hadb-mysqld-watch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(200));
                match proc_stat(pid) {
                    Some((state, s)) if s == start && state != 'Z' && state != 'X' => {}
                    _ => break,
                }
            }
            let _ = tx.send_blocking(Msg::Exited(
                pid,
                "exited (adopted: its exit status went to its parent)".into(),
            ));
        });
    if let Err(e) = spawned {
        log::error!("mysqld: cannot start the thread that watches the adopted pid {pid}: {e}");
    }
}

/// [`initialised`] on a blocking thread: the datadir is on the volume this
/// process serves, and a look that misses the page cache must not stall
/// the event loop that answers the kernel's reads.
async fn initialised_off_loop(cfg: &MysqlConfig) -> Result<bool, String> {
    let datadir = cfg.datadir.clone();
    smol::unblock(move || initialised(&datadir)).await
}

/// Whether the datadir holds a database (its `mysql` system schema).
fn initialised(datadir: &Path) -> Result<bool, String> {
    match std::fs::metadata(datadir.join("mysql")) {
        Ok(m) => Ok(m.is_dir()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if datadir.is_dir() {
                Ok(false)
            } else {
                Err(format!(
                    "{} does not exist or is not a directory (is the volume mounted?)",
                    datadir.display()
                ))
            }
        }
        Err(e) => Err(format!("cannot look into {}: {e}", datadir.display())),
    }
}

/// Runs the configured (or the installed server's) initialisation on an
/// empty datadir.
fn init_database(cfg: &MysqlConfig) -> Result<String, String> {
    let (uid, gid) = lookup_user(&cfg.user)?;
    // ext4's lost+found makes MySQL 8's --initialize refuse the directory;
    // e2fsck makes a new one when it needs it.
    let lost = cfg.datadir.join("lost+found");
    if lost.is_dir() && std::fs::remove_dir(&lost).is_ok() {
        log::info!("mysqld: removed the empty {}", lost.display());
    }
    let extra: Vec<_> = std::fs::read_dir(&cfg.datadir)
        .map_err(|e| format!("cannot read {}: {e}", cfg.datadir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if !extra.is_empty() {
        return Err(format!(
            "{} is not empty ({}); hadb initialises only an empty datadir",
            cfg.datadir.display(),
            extra.join(", ")
        ));
    }
    prepare_dir(&cfg.datadir, uid, gid)?;
    let args = cfg.init_command_line();
    let (program, rest) = args.split_first().ok_or("mysql.init_command is empty")?;
    log::info!("mysqld: initialising the database: {}", args.join(" "));
    let out = crate::run::process::output(&mut server_command(program, rest, &cfg.datadir))
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(format!(
            "{program} failed ({}):\n{}",
            out.status,
            text.trim()
        ));
    }
    Ok(text)
}

fn prepare_dir(dir: &Path, uid: u32, gid: u32) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))
        .map_err(|e| format!("cannot give {} to uid {uid}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mysqld_does_not_inherit_the_notify_socket() {
        let cmd = server_command(
            "mysqld",
            &["--datadir=/d".into()],
            std::path::Path::new("/d"),
        );
        let removed: Vec<_> = cmd
            .get_envs()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k.to_owned())
            .collect();
        assert_eq!(removed, ["NOTIFY_SOCKET"]);
        assert_eq!(cmd.get_current_dir(), Some(std::path::Path::new("/d")));
    }
}
