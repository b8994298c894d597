//! The watchdog's driver: arms `/dev/watchdog` at start (loading softdog
//! where the device is missing), pets it only while the volume task
//! answers, and disarms it on a clean stop. A hung or killed hadb stops
//! the pets, and the kernel reboots the node: it fences itself.

use std::sync::Mutex;
use std::time::Duration;

use crate::config::WatchdogConfig;
use crate::sys::watchdog::Watchdog;

pub struct Armed {
    dog: Mutex<Option<Watchdog>>,
    /// No quorum: never petted or disarmed again; the kernel reboots the
    /// node (the peer's `watchdog` fence counts on it).
    fenced: std::sync::atomic::AtomicBool,
    /// The timeout the device uses, advertised in the heartbeat.
    pub timeout: Duration,
}

/// Arms the watchdog when configured; None (logged) when it cannot.
pub fn arm(cfg: &WatchdogConfig) -> Option<Armed> {
    if !cfg.enabled {
        return None;
    }
    if !cfg.device.exists() && cfg.load_softdog {
        // A VM without a hardware watchdog: the kernel's software one.
        match crate::run::process::output(std::process::Command::new("modprobe").arg("softdog")) {
            Ok(o) if o.status.success() => log::info!("watchdog: loaded softdog"),
            Ok(o) => log::warn!(
                "watchdog: modprobe softdog failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => log::warn!("watchdog: cannot run modprobe: {e}"),
        }
    }
    let timeout_s = cfg.timeout.0.as_secs().max(1) as u32;
    match Watchdog::arm(&cfg.device, timeout_s) {
        Ok(dog) => {
            let timeout = Duration::from_secs(u64::from(dog.timeout_s));
            log::warn!(
                "watchdog: {} armed, timeout {} s: if hadb hangs, this node reboots",
                cfg.device.display(),
                dog.timeout_s
            );
            Some(Armed {
                dog: Mutex::new(Some(dog)),
                fenced: std::sync::atomic::AtomicBool::new(false),
                timeout,
            })
        }
        Err(e) => {
            log::error!("{e}; this node cannot fence itself");
            None
        }
    }
}

impl Armed {
    /// How often the main loop should pet it.
    pub fn interval(&self) -> Duration {
        self.timeout / 4
    }

    pub fn pet(&self) {
        if self.fenced.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if let Some(dog) = crate::run::manager::lock(&self.dog).as_mut()
            && let Err(e) = dog.pet()
        {
            log::error!("{e}");
        }
    }

    /// Stops petting for good: the node reboots within the timeout.
    pub fn self_fence(&self) {
        self.fenced.store(true, std::sync::atomic::Ordering::SeqCst);
        log::error!(
            "watchdog: SELF-FENCE: no longer petted; this node reboots within {} s",
            self.timeout.as_secs()
        );
    }

    /// The clean stop: magic close, no reboot.
    pub fn disarm(&self) {
        if self.fenced.load(std::sync::atomic::Ordering::SeqCst) {
            log::warn!("watchdog: not disarmed: this node fenced itself and reboots");
            return;
        }
        if let Some(dog) = crate::run::manager::lock(&self.dog).take() {
            match dog.disarm() {
                Ok(()) => log::info!("watchdog: disarmed (clean stop)"),
                Err(e) => log::error!("{e}"),
            }
        }
    }
}
