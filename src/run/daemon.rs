//! `hadb run`: opens the volume, starts the replication link, the NBD
//! servers and the control socket, and follows role changes with the
//! kernel block device.

use std::fmt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use smol::channel::Sender;

use crate::config::Config;
use crate::core::nbd as proto;
use crate::core::replica::Role;

/// How long a peer that said it restarts in place is given, beyond
/// `fence_delay`, before it counts as lost: an exec and a start.
const RESTART_GRACE: Duration = Duration::from_secs(30);
/// A lost-peer fence whose methods all failed is tried again after this.
const FENCE_RETRY: Duration = Duration::from_secs(30);
use crate::run::control::{self, Request};
use crate::run::nbd::Server;
use crate::run::peer::{self, LinkSetup};
use crate::run::stats::Stats;
use crate::run::store::{self, Store};
use crate::run::volume::{Command, Event, Volume};
use crate::sys::nbd_netlink::{self, NetlinkNbd};

#[derive(Debug)]
pub enum Error {
    Key(peer::KeyError),
    Incarnation(crate::run::incarnation::Error),
    Store(store::Error),
    Start {
        what: &'static str,
        source: std::io::Error,
    },
    Signals(std::io::Error),
    Fence(Box<crate::run::fence::Error>),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Key(e) => write!(f, "{e}"),
            Error::Incarnation(e) => write!(f, "{e}"),
            Error::Store(e) => write!(f, "{e}"),
            Error::Start { what, source } => write!(f, "cannot start {what}: {source}"),
            Error::Signals(e) => write!(f, "cannot install signal handlers: {e}"),
            Error::Fence(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {}

struct Daemon {
    config: Config,
    events: Sender<Event>,
    heartbeat: Arc<crate::run::heartbeat::Heartbeat>,
    manager: Arc<std::sync::Mutex<crate::core::manager::Manager>>,
    shared: Arc<crate::run::volume::Shared>,
    resources: crate::run::resources::Resources,
    /// `manager.maintenance`, as reloaded.
    maintenance: Arc<std::sync::atomic::AtomicBool>,
    fencer: Arc<crate::run::fence::Fencer>,
    /// Where the configuration came from, for SIGHUP.
    sources: crate::config::Sources,
    watchdog: Option<Arc<crate::run::watchdog::Armed>>,
    /// `hadb restart-in-place` asked: the main loop re-executes hadb.
    restart: Sender<()>,
}

impl Daemon {
    fn manager_status(&self) -> serde_json::Value {
        let mut fences = self.fencer.status();
        let m = crate::run::manager::lock(&self.manager);
        let now = self.heartbeat.now_us();
        let history: Vec<serde_json::Value> = m
            .history()
            .map(
                |(at, why)| json!({"seconds_ago": now.saturating_sub(*at) / 1_000_000, "why": why}),
            )
            .collect();
        let mut v = json!({
            "maintenance": self.maintenance.load(std::sync::atomic::Ordering::Relaxed),
            "reason": m.reason(),
            // Rule 16: the settings that differ from the peer's, or null.
            "settings_mismatch": m.settings_mismatch(),
            "transitions": history,
            "standby": m.standby(),
            "fence": m.fence(),
            "fences_requested": m.fences_requested,
            "fences_confirmed": m.fences_confirmed,
        });
        if let (Some(v), Some(f)) = (v.as_object_mut(), fences.as_object_mut()) {
            v.append(f);
        }
        v
    }
}

impl Daemon {
    /// SIGHUP: reads the configuration again and takes what can change at
    /// run time; names every other change, which waits for a restart.
    fn reload(&self) {
        let new = match crate::config::load(&self.sources) {
            Ok(c) => c,
            Err(e) => {
                log::error!("reload: the configuration has errors; nothing changed:\n{e}");
                return;
            }
        };
        let changes = crate::config::changed_keys(&self.config, &new);
        if changes.is_empty() {
            log::info!("reload: the configuration is unchanged");
            return;
        }
        let mut later = Vec::new();
        for (key, old, value) in &changes {
            if crate::config::RELOADABLE.contains(&key.as_str()) {
                log::info!("reload: {key} = {value} (was {old})");
            } else {
                later.push(key.as_str());
            }
        }
        self.maintenance.store(
            new.manager.maintenance,
            std::sync::atomic::Ordering::Relaxed,
        );
        crate::run::manager::lock(&self.manager)
            .set_fence_delay(new.fencing.fence_delay.0.as_micros() as u64);
        if let (Some(m), Some(running), Some(cfg)) =
            (&self.resources.mysqld, &self.config.mysql, &new.mysql)
        {
            // The reloadable keys from the new file; the rest as running.
            m.reconfigure(crate::config::MysqlConfig {
                monitor_user: cfg.monitor_user.clone(),
                monitor_password_file: cfg.monitor_password_file.clone(),
                write_probe: cfg.write_probe.clone(),
                health_interval: cfg.health_interval,
                health_timeout: cfg.health_timeout,
                health_failures: cfg.health_failures,
                start_timeout: cfg.start_timeout,
                stop_timeout: cfg.stop_timeout,
                max_restarts: cfg.max_restarts,
                restart_window: cfg.restart_window,
                ..running.clone()
            });
        }
        if !later.is_empty() {
            log::warn!(
                "reload: {} changed but cannot change while hadb runs; the running values stay until hadb restarts",
                later.join(", ")
            );
        }
    }

    async fn ask(&self, command: Command) -> Result<serde_json::Value, String> {
        crate::run::volume::ask(&self.events, command).await
    }

    /// The peer's name, if `node` names it: fence commands are for the
    /// peer only.
    fn peer_named(&self, node: Option<&str>, cli: &str) -> Result<&str, String> {
        let (peer, _) = self.config.peer();
        match node {
            Some(n) if n == peer => Ok(peer),
            Some(n) => Err(format!(
                "`{n}` is not this node's peer; the peer is `{peer}`"
            )),
            None => Err(format!("say which node: `{cli} {peer}`")),
        }
    }
}

/// The attempts of a fence run in one line: "azure failed (...); ssh ...".
fn summary(attempts: &serde_json::Value) -> String {
    let parts: Vec<String> = attempts
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            format!(
                "{} {} after {:.1}s ({})",
                a["method"].as_str().unwrap_or("?"),
                a["result"].as_str().unwrap_or("?"),
                a["duration_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
                a["detail"].as_str().unwrap_or("")
            )
        })
        .collect();
    if parts.is_empty() {
        "no method was tried".into()
    } else {
        parts.join("; ")
    }
}

impl control::Handler for Daemon {
    async fn handle(&self, request: Request) -> Result<serde_json::Value, String> {
        match request.command.as_str() {
            "status" => {
                let volume = self.ask(Command::Status).await?;
                Ok(json!({
                    "cluster": self.config.cluster,
                    "node": self.config.node,
                    "pid": std::process::id(),
                    "heartbeat": self.heartbeat.status(),
                    "manager": self.manager_status(),
                    "volume": volume,
                    "mysqld": self.resources.mysqld.as_ref().map(|m| m.view()),
                    "watchdog": self.watchdog.as_ref().map(|w| json!({"armed": true, "timeout_ms": w.timeout.as_millis() as u64})),
                    "nbd_device": self.config.volume.nbd_device,
                    "nbd_socket": self.config.volume.nbd_socket,
                }))
            }
            "volume.primary" => {
                if request.force {
                    log::warn!(
                        "manager: the operator forces this node to start without hearing its peer"
                    );
                    crate::run::manager::lock(&self.manager).force_start();
                }
                self.ask(Command::Primary {
                    force: request.force,
                })
                .await
            }
            "fence.confirm" => {
                let peer = self.peer_named(request.node.as_deref(), "hadb fence confirm")?;
                let now = self.heartbeat.now_us();
                crate::run::manager::lock(&self.manager).fence_confirmed(now)?;
                log::warn!("fence: the operator confirms that {peer} is off");
                Ok(json!({"fence": "confirmed"}))
            }
            "fence" => {
                let peer = self.peer_named(request.node.as_deref(), "hadb fence")?;
                if !self.fencer.automatic() {
                    return Err(format!(
                        "no fence method runs by itself here (fencing.methods = [\"manual\"]): power {peer} off yourself, then `hadb fence confirm {peer}`"
                    ));
                }
                let now = self.heartbeat.now_us();
                crate::run::manager::lock(&self.manager).fence_by_operator(now)?;
                log::warn!("fence: the operator fences {peer} now");
                let done = self.fencer.start(crate::core::fence::Trigger::Operator)?;
                let end = done.recv().await.map_err(|_| {
                    format!("the fence of {peer} ended without a word; see `hadb log`")
                })?;
                let attempts = self.fencer.status()["fence_attempts"].clone();
                match end {
                    crate::run::fence::RunEnd::Confirmed(method) => Ok(json!({
                        "fence": "confirmed",
                        "method": method,
                        "attempts": attempts,
                    })),
                    crate::run::fence::RunEnd::Failed => Err(format!(
                        "the fence of {peer} FAILED: {}; {peer} is not known to be off",
                        summary(&attempts)
                    )),
                    crate::run::fence::RunEnd::Stopped => Err(format!(
                        "the fence of {peer} stopped: {}",
                        summary(&attempts)
                    )),
                }
            }
            "fence.unfence" => {
                let peer = self.peer_named(request.node.as_deref(), "hadb fence unfence")?;
                log::warn!("fence: the operator starts {peer} again (unfence)");
                let fencer = self.fencer.clone();
                smol::unblock(move || fencer.unfence()).await
            }
            "fence.test" => {
                let fencer = self.fencer.clone();
                let checks = smol::unblock(move || fencer.test()).await;
                Ok(json!({"methods": checks}))
            }
            "standby" => {
                let on = request
                    .on
                    .ok_or("say `hadb standby on` or `hadb standby off`")?;
                crate::run::manager::lock(&self.manager).set_standby(on);
                log::info!("manager: standby {}", if on { "on" } else { "off" });
                Ok(json!({"standby": on}))
            }
            "log" => Ok(json!({"lines": crate::logging::recent(200)})),
            "switchover" => {
                let v = *crate::run::manager::lock(&self.shared.view);
                crate::run::manager::lock(&self.manager).switchover(&v)?;
                log::info!("manager: switchover asked: handing the primary role to the peer");
                Ok(json!({"switchover": "started"}))
            }
            "volume.secondary" if self.config.mysql.is_some() => {
                self.resources.demote(&self.events).await
            }
            "mysql.init" => {
                let m = self
                    .resources
                    .mysqld
                    .as_ref()
                    .ok_or("hadb does not supervise mysqld here ([mysql] supervise is off)")?;
                let v = self.ask(Command::Status).await?;
                if v["role"] != "primary" {
                    return Err(
                        "mysql init runs on the primary, where the datadir is mounted".into(),
                    );
                }
                let out = m.init().await?;
                Ok(json!({"mysql_init": "done", "output": out}))
            }
            "mysql.reset" => {
                let m = self
                    .resources
                    .mysqld
                    .as_ref()
                    .ok_or("hadb does not supervise mysqld here ([mysql] supervise is off)")?;
                m.reset();
                log::info!("mysqld: the operator resets its failures");
                Ok(json!({"mysqld": "reset"}))
            }
            "volume.mkfs" => {
                let Some((device, cfg)) = crate::run::filesystem::managed(&self.config) else {
                    return Err("no [mysql] section with a volume.nbd_device: hadb manages no filesystem here".into());
                };
                let v = self.ask(Command::Status).await?;
                if v["role"] != "primary" {
                    return Err("mkfs runs on the primary, where the volume is attached".into());
                }
                let force = request.force;
                smol::unblock(move || {
                    crate::run::filesystem::mkfs(&device, &cfg, force)?;
                    crate::run::filesystem::mount(&device, &cfg)
                })
                .await?;
                log::info!("filesystem: made and mounted");
                // The mount at promotion failed (no filesystem yet), so
                // nothing asked for mysqld: ask now. On an empty datadir it
                // waits as uninitialised until `hadb mysql init`.
                if let Some(m) = &self.resources.mysqld {
                    m.start();
                }
                Ok(json!({"mkfs": "done"}))
            }
            "volume.secondary" => {
                if let Some(dev) = &self.config.volume.nbd_device
                    && let Some(at) = crate::run::filesystem::mounted_at(dev)
                {
                    return Err(format!(
                        "{} is mounted at {at}; unmount it first (the filesystem must be clean before the volume stops taking writes)",
                        dev.display()
                    ));
                }
                self.ask(Command::Secondary).await
            }
            "restart-in-place" => {
                self.restart
                    .try_send(())
                    .map_err(|_| "a restart or stop is already under way".to_string())?;
                log::info!(
                    "restart in place asked: the volume is parked and hadb re-executes itself; mysqld and the filesystem stay"
                );
                Ok(json!({"restart": "started"}))
            }
            "volume.go-alone" => self.ask(Command::GoAlone).await,
            "volume.down" => self.ask(Command::Down).await,
            "volume.up" => self.ask(Command::Up { by_watchdog: false }).await,
            "volume.discard-my-data" => self.ask(Command::DiscardMyData).await,
            "volume.verify" => self.ask(Command::Verify).await,
            other => Err(format!(
                "unknown command `{other}`; known: status, volume.primary, volume.secondary, volume.go-alone, volume.down, volume.up, volume.discard-my-data, volume.verify, volume.mkfs, fence, fence.test, fence.confirm, fence.unfence, standby, switchover, restart-in-place, mysql.init, mysql.reset, log"
            )),
        }
    }
}

pub fn run(config: Config, sources: crate::config::Sources) -> Result<(), Error> {
    crate::run::process::become_subreaper();
    let key = peer::read_key(&config.key_file).map_err(Error::Key)?;
    // Name order, as `me_first`: the two nodes never share a number.
    let parity = u64::from(config.node.as_str() > config.peer().0);
    // Taken (and on disk) before anything is opened or sent: a node that
    // cannot prove its run is newer than the last does not start.
    let incarnation =
        crate::run::incarnation::take(&config.state_dir, parity).map_err(Error::Incarnation)?;
    if config.volume.nbd_device.is_some() {
        // Before any thread starts: the flag is inherited, not shared.
        if let Err(e) = crate::sys::memory::protect_from_writeback_deadlock() {
            log::warn!("{e}");
        }
    }
    let store = Store::open(&config.volume.device).map_err(Error::Store)?;
    let nbd_settings = nbd_settings(store.layout.data_size, &store.superblock.volume_id);
    let resumed = config
        .volume
        .nbd_device
        .as_deref()
        .and_then(|device| take_over(device, &nbd_settings, &store.superblock));
    let reader = Arc::new(store.reader().map_err(Error::Store)?);
    log::info!(
        "volume: {} opened, {} data bytes, generation {:016x}",
        config.volume.device.display(),
        store.layout.data_size,
        store.superblock.current_gen
    );
    let (role_tx, role_rx) = smol::channel::unbounded();
    let (volume, events, shared) =
        Volume::open(&config, store, Stats::default(), role_tx, resumed.is_some()).map_err(
            |source| Error::Start {
                what: "the volume",
                source,
            },
        )?;
    let peer_name = config.peer().0.to_owned();
    let setup = LinkSetup {
        cluster: config.cluster.clone(),
        me: config.node.clone(),
        peer: peer_name.clone(),
        key: Arc::new(key.clone()),
        listen: config.listen_addr(),
        peer_addr: config.peer_addr(),
        events: events.clone(),
        shared: shared.clone(),
        timeout: config.volume.link_timeout.0,
    };
    let nbd_server = Arc::new(Server {
        events: events.clone(),
        shared: shared.clone(),
        reader,
    });
    let heartbeat = crate::run::heartbeat::new(&config, &key, incarnation);
    log::info!("heartbeat: this run is incarnation {incarnation}");
    let peer_name_s = config.peer().0.to_owned();
    let manager = Arc::new(std::sync::Mutex::new(crate::core::manager::Manager::new(
        crate::core::manager::Config {
            me_first: config.node < peer_name_s,
            fence_delay_us: config.fencing.fence_delay.0.as_micros() as u64,
            retry_us: 1_000_000,
            start_grace_us: 2 * config.heartbeat.timeout.0.as_micros() as u64,
            restart_grace_us: RESTART_GRACE.as_micros() as u64,
            self_fence_after_us: config
                .self_fences()
                .then(|| crate::config::self_fence_after(&config.heartbeat).as_micros() as u64),
            settings: config.settings(),
            fence_retry_us: config
                .fencing
                .methods
                .iter()
                .any(|m| *m != crate::config::FenceMethod::Manual)
                .then_some(FENCE_RETRY.as_micros() as u64),
        },
    )));
    // Built now so that an unreadable key or secret stops the start, not a
    // fence.
    let fencer = Arc::new(
        crate::run::fence::Fencer::new(&config, manager.clone(), heartbeat.clone())
            .map_err(|e| Error::Fence(Box::new(e)))?,
    );
    let signals = async_signal::Signals::new([
        async_signal::Signal::Term,
        async_signal::Signal::Int,
        async_signal::Signal::Hup,
    ])
    .map_err(Error::Signals)?;
    // Armed last: a start that fails after it would exit without the
    // magic close, and the node would reboot for a typo in a key file.
    let watchdog = crate::run::watchdog::arm(&config.watchdog).map(Arc::new);
    let resources = crate::run::resources::Resources::new(&config);
    let maintenance = Arc::new(std::sync::atomic::AtomicBool::new(
        config.manager.maintenance,
    ));
    let (restart_tx, restart_rx) = smol::channel::bounded(1);
    let restarting = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let daemon = Arc::new(Daemon {
        restart: restart_tx,
        config: config.clone(),
        events: events.clone(),
        heartbeat: heartbeat.clone(),
        manager: manager.clone(),
        shared: shared.clone(),
        resources: resources.clone(),
        maintenance: maintenance.clone(),
        fencer: fencer.clone(),
        sources,
        watchdog: watchdog.clone(),
    });
    let nbd_settings_stop = nbd_settings.clone();
    crate::run::block_on(0, async move {
        let _volume = crate::run::spawn(volume.run());
        let _reaper = crate::run::spawn(crate::run::process::reaper());
        let _link = if config.node < peer_name {
            crate::run::spawn(peer::connect_loop(setup))
        } else {
            crate::run::spawn(peer::listen_loop(setup))
        };
        let _manager = crate::run::spawn(crate::run::manager::run(crate::run::manager::Driver {
            manager: manager.clone(),
            hb: heartbeat.clone(),
            shared: shared.clone(),
            events: events.clone(),
            peer_name: peer_name_s.clone(),
            resources: resources.clone(),
            fencer: fencer.clone(),
            maintenance: maintenance.clone(),
            watchdog: watchdog.clone(),
        }));
        let _heartbeat = {
            let shared = shared.clone();
            let manager = manager.clone();
            let interval = config.heartbeat.interval.0;
            let mysqld = resources.mysqld.clone();
            let restarting = restarting.clone();
            // Armed is said only by a node that fences itself: the
            // peer's `watchdog` fence counts on it (issue 13, finding 8).
            let settings = config.settings();
            let (watchdog_flag, watchdog_ms) = crate::core::settings::watchdog_advert(
                config.self_fences(),
                watchdog
                    .as_ref()
                    .map(|w| u32::try_from(w.timeout.as_millis()).unwrap_or(u32::MAX)),
            );
            crate::run::spawn(async move {
                let report = || {
                    let mut r = *shared.report.lock().unwrap_or_else(|e| e.into_inner());
                    r.watchdog_timeout_ms = watchdog_ms;
                    r.flags |= watchdog_flag;
                    r.settings = settings;
                    r.service = match mysqld.as_ref().map(|m| m.view()) {
                        Some(v) if v.failed() => crate::core::heartbeat::SERVICE_FAILED,
                        Some(v) if v.healthy() => crate::core::heartbeat::SERVICE_HEALTHY,
                        _ => crate::core::heartbeat::SERVICE_UNKNOWN,
                    };
                    if restarting.load(std::sync::atomic::Ordering::Relaxed) {
                        r.flags |= crate::core::heartbeat::FLAG_RESTARTING;
                    }
                    let (standby, ask) = crate::run::manager::lock(&manager).flags();
                    r.flags = (r.flags
                        & !(crate::core::heartbeat::FLAG_STANDBY
                            | crate::core::heartbeat::FLAG_OUTDATE_REQUEST))
                        | if standby {
                            crate::core::heartbeat::FLAG_STANDBY
                        } else {
                            0
                        }
                        | if ask {
                            crate::core::heartbeat::FLAG_OUTDATE_REQUEST
                        } else {
                            0
                        };
                    r
                };
                if let Err(e) = crate::run::heartbeat::run(heartbeat, interval, report).await {
                    log::error!("heartbeat: {e}; the peer cannot hear this node");
                }
            })
        };
        let nbd_path = config.volume.nbd_socket.clone();
        let _nbd = {
            let server = nbd_server.clone();
            crate::run::spawn(async move {
                if let Err(e) = crate::run::nbd::listen(&nbd_path, server).await {
                    log::error!("nbd: cannot serve on {}: {e}", nbd_path.display());
                }
            })
        };
        let control_path = config.control.socket.clone();
        let _control = {
            let daemon = daemon.clone();
            let shared = shared.clone();
            crate::run::spawn(async move {
                let refused: control::OnRefused =
                    Arc::new(move || crate::run::stats::Stats::bump(&shared.stats.control_refused));
                if let Err(e) = control::listen(&control_path, daemon, refused).await {
                    log::error!("control: cannot listen on {}: {e}", control_path.display());
                }
            })
        };
        let _roles = crate::run::spawn(follow_roles(
            resources.clone(),
            config.volume.nbd_device.clone(),
            nbd_settings.clone(),
            resumed,
            role_rx,
            nbd_server,
        ));
        log::info!(
            "hadb {} running as node {} of cluster {}",
            env!("CARGO_PKG_VERSION"),
            config.node,
            config.cluster
        );
        let _console = config.control.console.clone().map(|path| {
            let daemon = daemon.clone();
            log::info!("console: serving the command prompt on {}", path.display());
            crate::run::spawn(async move { crate::run::console::serve(&path, daemon).await })
        });
        let _http = config.control.http.map(|addr| {
            let daemon = daemon.clone();
            crate::run::spawn(async move {
                log::info!("http: /probe and /metrics on {addr}");
                if let Err(e) = crate::run::http::serve(addr, daemon).await {
                    log::error!("http: cannot serve on {addr}: {e}; the load balancer will see this node as down");
                }
            })
        });
        let _keep_up = crate::run::spawn(keep_volume_up(daemon.clone()));
        let _watchdog = watchdog
            .clone()
            .map(|w| crate::run::spawn(pet_watchdog(w, daemon.clone())));
        let notifier = Arc::new(crate::run::systemd::Notifier::from_env());
        let _systemd = notifier.enabled().then(|| {
            notifier.notify("READY=1\nSTATUS=running");
            crate::run::spawn(tell_systemd(notifier.clone(), daemon.clone()))
        });
        use smol::future::FutureExt;
        use smol::stream::StreamExt;
        let mut signals = signals;
        enum Wake {
            Signal(Option<std::io::Result<async_signal::Signal>>),
            Restart,
        }
        let mut restart = false;
        loop {
            let next = async { Wake::Signal(signals.next().await) }
                .or(async {
                    match restart_rx.recv().await {
                        Ok(()) => Wake::Restart,
                        Err(_) => std::future::pending().await,
                    }
                })
                .await;
            match next {
                Wake::Signal(Some(Ok(async_signal::Signal::Hup))) => daemon.reload(),
                Wake::Signal(Some(Ok(sig))) => {
                    log::info!("received {sig:?}: stopping");
                    break;
                }
                Wake::Signal(_) => break,
                Wake::Restart => {
                    restart = true;
                    break;
                }
            }
        }
        if restart {
            notifier.notify("STATUS=restarting in place");
            // The peer hears that a successor is coming (every ring, at
            // least once) before the heartbeats stop; the answer to the
            // control request goes out meanwhile.
            restarting.store(true, std::sync::atomic::Ordering::Relaxed);
            smol::Timer::after(2 * config.heartbeat.interval.0 + Duration::from_millis(100)).await;
            let stopped = async { Some(daemon.ask(Command::Stop { restart: true }).await) }
                .or(async {
                    smol::Timer::after(Duration::from_secs(30)).await;
                    None
                })
                .await;
            if !matches!(stopped, Some(Ok(_))) {
                log::warn!(
                    "volume: no clean stop before the restart; the next process treats it as a crash"
                );
            }
            let _ = std::fs::remove_file(&config.control.socket);
            let _ = std::fs::remove_file(&config.volume.nbd_socket);
            // The watchdog stays armed: the next process opens it again.
            let e = reexec();
            log::error!(
                "restart in place: {e}; stopping instead (mysqld, the filesystem, the volume)"
            );
        }
        notifier.notify("STOPPING=1\nSTATUS=stopping: mysqld, the filesystem, then the volume");
        // The reverse of the start order: nothing may hold the volume's
        // filesystem when the volume stops.
        let down = resources.down().await;
        if let Err(e) = &down {
            log::warn!("stop: {e}");
        }
        // A clean stop spares the next start a crash's resync; a second
        // signal, or a disk that does not answer, ends it anyway.
        let stopped = async { Some(daemon.ask(Command::Stop { restart: false }).await) }
            .or(async {
                signals.next().await;
                None
            })
            .or(async {
                smol::Timer::after(Duration::from_secs(30)).await;
                None
            })
            .await;
        if !matches!(stopped, Some(Ok(_))) {
            log::warn!("volume: no clean stop; the next start treats this one as a crash");
        }
        // Nothing of the service holds the kernel device any more: let it
        // go. (With the filesystem still mounted it stays, waiting for the
        // next hadb process, as after a crash.)
        if down.is_ok()
            && let Some(device) = &config.volume.nbd_device
        {
            detach_ours(device, &nbd_settings_stop);
        }
        if let Some(w) = &watchdog {
            w.disarm();
        }
        let _ = std::fs::remove_file(&config.control.socket);
        let _ = std::fs::remove_file(&config.volume.nbd_socket);
    });
    Ok(())
}

/// Replaces this process with the binary now at /proc/self/exe (an
/// upgraded hadb, if the file was replaced), same arguments and
/// environment, same pid (so systemd and mysqld's parent link do not
/// notice). Every descriptor hadb opens is close-on-exec (std, rustix and
/// async-io all open them so): the old sockets close, and the kernel
/// device's dead connection is replaced by the next process. Returns only
/// on failure.
fn reexec() -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    log::info!("restart in place: executing /proc/self/exe again");
    std::process::Command::new("/proc/self/exe")
        .arg0(std::env::args_os().next().unwrap_or_else(|| "hadb".into()))
        .args(args)
        .exec()
}

/// The "drbdadm up on every node" rule: a volume taken down on a node
/// (`hadb volume down`) comes back up by itself within seconds, in every
/// role, so a standby keeps receiving every write.
async fn keep_volume_up(daemon: Arc<Daemon>) {
    const GRACE_S: u64 = 3;
    loop {
        smol::Timer::after(Duration::from_secs(1)).await;
        let Ok(v) = daemon.ask(Command::Status).await else {
            continue;
        };
        if v["down_seconds"].as_u64().is_some_and(|s| s >= GRACE_S)
            && let Err(e) = daemon.ask(Command::Up { by_watchdog: true }).await
        {
            log::error!("watchdog: cannot bring the volume back up: {e}");
        }
    }
}

/// Pets the watchdog while the volume task answers: a hung volume task
/// (or a hung hadb) stops the pets and the kernel reboots the node.
async fn pet_watchdog(w: Arc<crate::run::watchdog::Armed>, daemon: Arc<Daemon>) {
    use smol::future::FutureExt;
    loop {
        smol::Timer::after(w.interval()).await;
        let answer = async { Some(daemon.ask(Command::Status).await) }
            .or(async {
                smol::Timer::after(w.interval()).await;
                None
            })
            .await;
        if matches!(answer, Some(Ok(_))) {
            w.pet();
        } else {
            log::warn!("watchdog: the volume task does not answer; not petting the watchdog");
        }
    }
}

/// Keeps systemd's STATUS= current and pings its watchdog, but only while
/// the volume task answers: a hung volume stops the pings and systemd
/// restarts hadb.
async fn tell_systemd(notifier: Arc<crate::run::systemd::Notifier>, daemon: Arc<Daemon>) {
    use smol::future::FutureExt;
    let every = notifier
        .watchdog_interval()
        .unwrap_or(Duration::from_secs(1))
        .min(Duration::from_secs(1));
    let mut last_status = String::new();
    loop {
        smol::Timer::after(every).await;
        let answer = async { Some(daemon.ask(Command::Status).await) }
            .or(async {
                smol::Timer::after(Duration::from_secs(2)).await;
                None
            })
            .await;
        let Some(Ok(v)) = answer else {
            log::warn!("systemd: the volume task does not answer; not pinging the watchdog");
            continue;
        };
        let status = format!(
            "{} {}, link {}, {}",
            v["role"].as_str().unwrap_or("?"),
            v["disk"].as_str().unwrap_or("?"),
            v["link"].as_str().unwrap_or("?"),
            crate::run::manager::lock(&daemon.manager).reason()
        );
        let mut msg = String::new();
        if notifier.watchdog_interval().is_some() {
            msg += "WATCHDOG=1\n";
        }
        if status != last_status {
            msg += &format!("STATUS={status}\n");
            last_status = status;
        }
        if !msg.is_empty() {
            notifier.notify(msg.trim_end());
        }
    }
}

/// How long the kernel holds application I/O for a new hadb process after
/// this one dies (a crash, `kill -9`, `hadb restart-in-place`) before it
/// fails it: long enough for systemd's restart (RestartSec) and a volume
/// open, short enough that a hadb that never comes back does not hang the
/// filesystem for ever. See `sys::nbd_netlink` for what the driver does.
pub const NBD_DEAD_CONN_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a request that was in flight on the dead connection waits,
/// after the new process reconnected, before the kernel resends it
/// (the block layer's request timer; 30 s on a fresh device).
pub const NBD_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The backend identifier of this volume's kernel device
/// (`/sys/block/nbdN/backend`): a new hadb process reattaches only a device
/// that names its own volume.
pub fn backend_id(volume_id: &[u8; 16]) -> String {
    let hex: String = volume_id.iter().map(|b| format!("{b:02x}")).collect();
    format!("hadb:{hex}")
}

/// The index N of `/dev/nbdN`.
pub fn nbd_index(device: &Path) -> Result<u32, String> {
    device
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("nbd"))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            format!(
                "volume.nbd_device {} is not an NBD device path; use /dev/nbdN",
                device.display()
            )
        })
}

/// What the kernel is told about the volume's device.
pub fn nbd_settings(data_size: u64, volume_id: &[u8; 16]) -> nbd_netlink::Settings {
    nbd_netlink::Settings {
        size: data_size,
        block_size: 4096,
        flags: proto::VOLUME_FLAGS,
        dead_conn_timeout: NBD_DEAD_CONN_TIMEOUT,
        // A slow peer must never cost the connection: see the module docs.
        request_timeout: None,
        io_timeout: Some(NBD_IO_TIMEOUT),
        backend: Some(backend_id(volume_id)),
    }
}

/// Disconnects `/dev/nbdN` if it is this volume's (at a clean stop; a
/// secondary has none).
fn detach_ours(device: &Path, settings: &nbd_netlink::Settings) {
    let Ok(index) = nbd_index(device) else { return };
    if backend_of(index).as_deref() != settings.backend.as_deref() {
        return;
    }
    match nbd_netlink::disconnect(index) {
        Ok(()) => log::info!("nbd: {} detached", device.display()),
        Err(e) => log::error!("nbd: detaching {} failed: {e}", device.display()),
    }
}

/// What `/sys/block/nbdN/backend` says, if anything.
fn backend_of(index: u32) -> Option<String> {
    std::fs::read_to_string(format!("/sys/block/nbd{index}/backend"))
        .ok()
        .map(|s| s.trim_end().to_owned())
        .filter(|s| !s.is_empty())
}

/// At start: a kernel device that an earlier hadb process left attached
/// for this volume (it died, or re-executed itself, while primary). If the
/// metadata says this node was primary, it gets a new connection here and
/// the node resumes as primary, the filesystem on it still mounted; the
/// requests the kernel held for it flow on the returned socket once the
/// volume is primary. A device of ours on a node that was not primary is
/// disconnected: nothing may write through it.
fn take_over(
    device: &Path,
    settings: &nbd_netlink::Settings,
    sb: &crate::core::meta::Superblock,
) -> Option<(NetlinkNbd, StdUnixStream)> {
    let index = nbd_index(device).ok()?;
    let ours = settings.backend.as_deref()?;
    if backend_of(index).as_deref() != Some(ours) {
        return None;
    }
    match nbd_netlink::status(index) {
        Ok(nbd_netlink::Status::Connected) => {}
        _ => return None,
    }
    if !sb.has(crate::core::meta::flags::PRIMARY) {
        log::warn!(
            "nbd: {} is still attached for this volume but the metadata says this node was not primary; disconnecting it",
            device.display()
        );
        if let Err(e) = nbd_netlink::disconnect(index) {
            log::error!("nbd: {e}");
        }
        return None;
    }
    // The old process's end may close a moment after its death is seen
    // here (a restart in place is quick): the kernel keeps the live-looking
    // connection until its receive worker reads EOF.
    let mut tries = 0;
    let reattached = loop {
        match NetlinkNbd::reattach(index, settings) {
            Err(nbd_netlink::Error::StillServed { .. }) if tries < 20 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            r => break r,
        }
    };
    match reattached {
        Ok(r) => {
            log::info!(
                "nbd: {} was left attached by an earlier hadb process; reconnected to it",
                device.display()
            );
            Some(r)
        }
        Err(e) => {
            log::error!(
                "nbd: {} is still attached for this volume but cannot be reconnected: {e}; starting as after a crash",
                device.display()
            );
            None
        }
    }
}

/// Attaches the kernel block device while primary, then brings up the
/// filesystem and mysqld; detaches it when secondary (they came down
/// before the volume stepped down). `resumed`: the device an earlier hadb
/// process left attached, reconnected (see [`take_over`]); served at the
/// first promotion, which the volume reports at once.
async fn follow_roles(
    resources: crate::run::resources::Resources,
    device: Option<PathBuf>,
    settings: nbd_netlink::Settings,
    mut resumed: Option<(NetlinkNbd, StdUnixStream)>,
    roles: smol::channel::Receiver<Role>,
    server: Arc<Server>,
) {
    let mut attached: Option<NetlinkNbd> = None;
    let mut up = false;
    while let Ok(role) = roles.recv().await {
        match role {
            Role::Primary if !up => {
                if let Some((nbd, stream)) = resumed.take() {
                    if let Err(e) = serve(&server, stream) {
                        log::error!(
                            "nbd: cannot serve the reconnected {}: {e}",
                            nbd.device().display()
                        );
                    }
                    attached = Some(nbd);
                    up = true;
                    resources.resume().await;
                    continue;
                }
                if let Some(device) = &device {
                    match attach(device, &settings, server.clone()).await {
                        Ok(k) => {
                            log::info!(
                                "nbd: volume attached to the kernel as {}",
                                device.display()
                            );
                            attached = Some(k);
                        }
                        Err(e) => {
                            log::error!("nbd: cannot attach {}: {e}", device.display());
                            continue;
                        }
                    }
                }
                up = true;
                // Start order: volume primary, the filesystem, mysqld.
                resources.up().await;
            }
            Role::Secondary => {
                up = false;
                if let (Some(k), Some(device)) = (attached.take(), &device) {
                    match smol::unblock(move || k.detach()).await {
                        Ok(()) => log::info!("nbd: {} detached", device.display()),
                        Err(e) => log::error!("nbd: detaching {} failed: {e}", device.display()),
                    }
                }
            }
            _ => {}
        }
    }
}

/// Serves the kernel's requests arriving on `stream`.
fn serve(server: &Arc<Server>, stream: StdUnixStream) -> Result<(), String> {
    let ours = smol::Async::new(stream).map_err(|e| e.to_string())?;
    let ours = smol::net::unix::UnixStream::from(ours);
    crate::run::spawn(server.clone().serve_kernel(ours)).detach();
    Ok(())
}

async fn attach(
    device: &Path,
    settings: &nbd_netlink::Settings,
    server: Arc<Server>,
) -> Result<NetlinkNbd, String> {
    let index = nbd_index(device)?;
    let settings = settings.clone();
    let (nbd, ours) = smol::unblock(move || NetlinkNbd::attach(Some(index), &settings))
        .await
        .map_err(|e| e.to_string())?;
    if let Err(e) = serve(&server, ours) {
        let _ = smol::unblock(move || nbd.detach()).await;
        return Err(e);
    }
    Ok(nbd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_backend_after_the_volume() {
        let mut id = [0u8; 16];
        id[0] = 0xab;
        id[15] = 0x01;
        assert_eq!(backend_id(&id), "hadb:ab000000000000000000000000000001");
    }

    #[test]
    fn takes_the_index_from_the_device_path() {
        assert_eq!(nbd_index(Path::new("/dev/nbd0")), Ok(0));
        assert_eq!(nbd_index(Path::new("/dev/nbd12")), Ok(12));
        for bad in ["/dev/sdc1", "/dev/nbd", "/dev/nbdx", "/"] {
            let e = nbd_index(Path::new(bad)).unwrap_err();
            assert!(e.contains("/dev/nbdN"), "{e}");
        }
    }
}
