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
use crate::run::control::{self, Request};
use crate::run::nbd::Server;
use crate::run::peer::{self, LinkSetup};
use crate::run::stats::Stats;
use crate::run::store::{self, Store};
use crate::run::volume::{Command, Event, Volume};
use crate::sys::nbd_kernel::KernelNbd;

#[derive(Debug)]
pub enum Error {
    Key(peer::KeyError),
    Store(store::Error),
    Start {
        what: &'static str,
        source: std::io::Error,
    },
    Signals(std::io::Error),
    Fence(Box<crate::run::fence::azure::AzureError>),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Key(e) => write!(f, "{e}"),
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
    /// Where the configuration came from, for SIGHUP.
    sources: crate::config::Sources,
    watchdog: Option<Arc<crate::run::watchdog::Armed>>,
}

impl Daemon {
    fn manager_status(&self) -> serde_json::Value {
        let m = crate::run::manager::lock(&self.manager);
        let now = self.heartbeat.now_us();
        let history: Vec<serde_json::Value> = m
            .history()
            .map(
                |(at, why)| json!({"seconds_ago": now.saturating_sub(*at) / 1_000_000, "why": why}),
            )
            .collect();
        json!({
            "maintenance": self.maintenance.load(std::sync::atomic::Ordering::Relaxed),
            "reason": m.reason(),
            "transitions": history,
            "standby": m.standby(),
            "fence": m.fence(),
            "fences_requested": m.fences_requested,
            "fences_confirmed": m.fences_confirmed,
            "fence_method": self.config.fencing.method,
        })
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
                let (peer, _) = self.config.peer();
                match request.node.as_deref() {
                    Some(n) if n == peer => {}
                    Some(n) => {
                        return Err(format!(
                            "`{n}` is not this node's peer; the peer is `{peer}`"
                        ));
                    }
                    None => return Err(format!("say which node: `hadb fence confirm {peer}`")),
                }
                let now = self.heartbeat.now_us();
                crate::run::manager::lock(&self.manager).fence_confirmed(now)?;
                log::warn!("fence: the operator confirms that {peer} is off");
                Ok(json!({"fence": "confirmed"}))
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
            "volume.go-alone" => self.ask(Command::GoAlone).await,
            "volume.down" => self.ask(Command::Down).await,
            "volume.up" => self.ask(Command::Up { by_watchdog: false }).await,
            "volume.discard-my-data" => self.ask(Command::DiscardMyData).await,
            "volume.verify" => self.ask(Command::Verify).await,
            other => Err(format!(
                "unknown command `{other}`; known: status, volume.primary, volume.secondary, volume.go-alone, volume.down, volume.up, volume.discard-my-data, volume.verify, volume.mkfs, fence.confirm, standby, switchover, mysql.init, mysql.reset, log"
            )),
        }
    }
}

pub fn run(config: Config, sources: crate::config::Sources) -> Result<(), Error> {
    crate::run::process::become_subreaper();
    let key = peer::read_key(&config.key_file).map_err(Error::Key)?;
    if config.volume.nbd_device.is_some() {
        // Before any thread starts: the flag is inherited, not shared.
        if let Err(e) = crate::sys::memory::protect_from_writeback_deadlock() {
            log::warn!("{e}");
        }
    }
    let store = Store::open(&config.volume.device).map_err(Error::Store)?;
    let reader = Arc::new(store.reader().map_err(Error::Store)?);
    log::info!(
        "volume: {} opened, {} data bytes, generation {:016x}",
        config.volume.device.display(),
        store.layout.data_size,
        store.superblock.current_gen
    );
    let (role_tx, role_rx) = smol::channel::unbounded();
    let (volume, events, shared) = Volume::open(&config, store, Stats::default(), role_tx)
        .map_err(|source| Error::Start {
            what: "the volume",
            source,
        })?;
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
    };
    let nbd_server = Arc::new(Server {
        events: events.clone(),
        shared: shared.clone(),
        reader,
    });
    let heartbeat = crate::run::heartbeat::new(&config, &key);
    let peer_name_s = config.peer().0.to_owned();
    // Built now so that an unreadable secret stops the start, not a fence.
    let azure = match (&config.fencing.method, &config.fencing.azure) {
        (crate::config::FenceMethod::Azure, Some(az)) => Some(Arc::new(
            crate::run::fence::azure::AzureFence::new(az, config.azure_vm(&peer_name_s))
                .map_err(|e| Error::Fence(Box::new(e)))?,
        )),
        _ => None,
    };
    let manager = Arc::new(std::sync::Mutex::new(crate::core::manager::Manager::new(
        crate::core::manager::Config {
            me_first: config.node < peer_name_s,
            fence_delay_us: config.fencing.fence_delay.0.as_micros() as u64,
            retry_us: 1_000_000,
        },
    )));
    let watchdog = crate::run::watchdog::arm(&config.watchdog).map(Arc::new);
    let resources = crate::run::resources::Resources::new(&config);
    let maintenance = Arc::new(std::sync::atomic::AtomicBool::new(
        config.manager.maintenance,
    ));
    let daemon = Arc::new(Daemon {
        config: config.clone(),
        events: events.clone(),
        heartbeat: heartbeat.clone(),
        manager: manager.clone(),
        shared: shared.clone(),
        resources: resources.clone(),
        maintenance: maintenance.clone(),
        sources,
        watchdog: watchdog.clone(),
    });
    let signals = async_signal::Signals::new([
        async_signal::Signal::Term,
        async_signal::Signal::Int,
        async_signal::Signal::Hup,
    ])
    .map_err(Error::Signals)?;

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
            azure: azure.clone(),
            maintenance: maintenance.clone(),
        }));
        let _heartbeat = {
            let shared = shared.clone();
            let manager = manager.clone();
            let interval = config.heartbeat.interval.0;
            let mysqld = resources.mysqld.clone();
            let watchdog_ms = watchdog
                .as_ref()
                .map_or(0, |w| w.timeout.as_millis() as u32);
            crate::run::spawn(async move {
                let report = || {
                    let mut r = *shared.report.lock().unwrap_or_else(|e| e.into_inner());
                    r.watchdog_timeout_ms = watchdog_ms;
                    if watchdog_ms > 0 {
                        r.flags |= crate::core::heartbeat::FLAG_WATCHDOG;
                    }
                    r.service = match mysqld.as_ref().map(|m| m.view()) {
                        Some(v) if v.failed() => crate::core::heartbeat::SERVICE_FAILED,
                        Some(v) if v.healthy() => crate::core::heartbeat::SERVICE_HEALTHY,
                        _ => crate::core::heartbeat::SERVICE_UNKNOWN,
                    };
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
                if let Err(e) = control::listen(&control_path, daemon, shared).await {
                    log::error!("control: cannot listen on {}: {e}", control_path.display());
                }
            })
        };
        let _roles = crate::run::spawn(follow_roles(
            resources.clone(),
            config.volume.nbd_device.clone(),
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
        use smol::stream::StreamExt;
        let mut signals = signals;
        while let Some(Ok(sig)) = signals.next().await {
            if sig == async_signal::Signal::Hup {
                daemon.reload();
                continue;
            }
            log::info!("received {sig:?}: stopping");
            break;
        }
        notifier.notify("STOPPING=1\nSTATUS=stopping: mysqld, the filesystem, then the volume");
        // The reverse of the start order: nothing may hold the volume's
        // filesystem when the volume stops.
        if let Err(e) = resources.down().await {
            log::warn!("stop: {e}");
        }
        // A clean stop spares the next start a crash's resync; a second
        // signal, or a disk that does not answer, ends it anyway.
        use smol::future::FutureExt;
        let stopped = async { Some(daemon.ask(Command::Stop).await) }
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
        if let Some(w) = &watchdog {
            w.disarm();
        }
        let _ = std::fs::remove_file(&config.control.socket);
        let _ = std::fs::remove_file(&config.volume.nbd_socket);
    });
    Ok(())
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

/// Attaches the kernel block device while primary, then brings up the
/// filesystem and mysqld; detaches it when secondary (they came down
/// before the volume stepped down).
async fn follow_roles(
    resources: crate::run::resources::Resources,
    device: Option<PathBuf>,
    roles: smol::channel::Receiver<Role>,
    server: Arc<Server>,
) {
    let mut attached: Option<KernelNbd> = None;
    let mut up = false;
    while let Ok(role) = roles.recv().await {
        match role {
            Role::Primary if !up => {
                if let Some(device) = &device {
                    match attach(device, server.clone()).await {
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

async fn attach(device: &Path, server: Arc<Server>) -> Result<KernelNbd, String> {
    let (ours, kernels) = StdUnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    let ours = smol::Async::new(ours).map_err(|e| e.to_string())?;
    let ours = smol::net::unix::UnixStream::from(ours);
    crate::run::spawn(server.clone().serve_kernel(ours)).detach();
    let size = server.shared.data_size;
    let device = device.to_owned();
    smol::unblock(move || {
        KernelNbd::attach(&device, kernels.into(), size, 4096, proto::VOLUME_FLAGS)
            .map_err(|e| e.to_string())
    })
    .await
}
