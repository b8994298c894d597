//! The manager's driver: every tick it gathers the inputs (this node's
//! volume, the heartbeat's view of the peer, the time), asks the pure
//! [`Manager`] and carries out what it returns.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use smol::channel::Sender;

use crate::core::manager::{Action, Inputs, Manager, PeerView};
use crate::run::fence::Fencer;
use crate::run::heartbeat::Heartbeat;
use crate::run::volume::{Command, Event, Shared, ask};

const TICK: Duration = Duration::from_millis(100);

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The inputs as they are now.
pub fn inputs(hb: &Heartbeat, shared: &Shared, service_failed: bool) -> Inputs {
    let (alive, report) = {
        let m = lock(&hb.membership);
        (m.peer_alive(), m.peer_report())
    };
    Inputs {
        now_us: hb.now_us(),
        volume: *lock(&shared.view),
        peer_alive: alive,
        peer: report.as_ref().map(PeerView::of),
        service_failed,
        vote: hb.vote(),
    }
}

/// What the manager's driver works with.
pub struct Driver {
    pub manager: Arc<Mutex<Manager>>,
    pub hb: Arc<Heartbeat>,
    pub shared: Arc<Shared>,
    pub events: Sender<Event>,
    pub peer_name: String,
    pub resources: crate::run::resources::Resources,
    /// The fence methods, tried in order when the manager asks.
    pub fencer: Arc<Fencer>,
    /// `manager.maintenance`, as reloaded: watch, never act.
    pub maintenance: Arc<std::sync::atomic::AtomicBool>,
    pub watchdog: Option<Arc<crate::run::watchdog::Armed>>,
}

pub async fn run(d: Driver) {
    let Driver {
        manager,
        hb,
        shared,
        events,
        peer_name,
        resources,
        fencer,
        maintenance,
        watchdog,
    } = d;
    let mut was_maintenance = None;
    loop {
        smol::Timer::after(TICK).await;
        let now_maintenance = maintenance.load(std::sync::atomic::Ordering::Relaxed);
        if was_maintenance != Some(now_maintenance) {
            if now_maintenance {
                log::warn!("manager: maintenance mode: watching only; roles change by hand");
            } else if was_maintenance.is_some() {
                log::info!("manager: maintenance mode off: the manager acts again");
            }
            was_maintenance = Some(now_maintenance);
        }
        if now_maintenance {
            continue;
        }
        let failed = resources.mysqld.as_ref().is_some_and(|m| m.view().failed());
        let i = inputs(&hb, &shared, failed);
        let actions = lock(&manager).step(&i);
        for a in actions {
            let result = match a {
                Action::Log {
                    warn: true,
                    message,
                } => {
                    log::warn!("{message}");
                    continue;
                }
                Action::Log {
                    warn: false,
                    message,
                } => {
                    log::info!("{message}");
                    continue;
                }
                Action::Fence => {
                    // Runs on a thread of its own and confirms through the
                    // manager, as `hadb fence confirm` does; a failure
                    // leaves the fence pending, and this node waits.
                    if let Err(e) = fencer.start(crate::core::fence::Trigger::PeerLost) {
                        log::warn!("fence: {peer_name}: {e}");
                    }
                    continue;
                }
                Action::Promote => ask(&events, Command::Primary { force: false }).await,
                Action::Demote => resources.demote(&events).await,
                Action::PeerProvenOutdated(why, on_disk) => {
                    ask(
                        &events,
                        Command::PeerProvenOutdated(why.to_owned(), on_disk),
                    )
                    .await
                }
                Action::OutdateSelf(token) => ask(&events, Command::OutdateSelf(token)).await,
                Action::SelfFence => {
                    match &watchdog {
                        Some(w) => w.self_fence(),
                        None => log::error!(
                            "manager: self-fence asked, but no watchdog is armed here: this node cannot fence itself"
                        ),
                    }
                    continue;
                }
            };
            if let Err(e) = result {
                log::info!("manager: not done now: {e}");
            }
        }
    }
}
