//! systemd's notify protocol (`Type=notify`): READY=1 once the daemon runs,
//! STATUS= with what an operator wants in `systemctl status`, WATCHDOG=1
//! at half of `WATCHDOG_USEC` while the daemon is healthy, STOPPING=1 on
//! the way out. Without NOTIFY_SOCKET (not under systemd) it does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

pub struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID. An address
    /// that cannot be used is logged and ignored: systemd then times the
    /// start out and says so, which is the clearer report.
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let path = path.to_string_lossy().into_owned();
            let addr = if let Some(name) = path.strip_prefix('@') {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            } else {
                std::os::unix::net::SocketAddr::from_pathname(&path)
            };
            match (UnixDatagram::unbound(), addr) {
                (Ok(s), Ok(a)) => Some((s, a)),
                (Err(e), _) | (_, Err(e)) => {
                    log::warn!("systemd: cannot use NOTIFY_SOCKET {path}: {e}");
                    None
                }
            }
        });
        // WATCHDOG_PID, when set, names the process meant to ping.
        let ours = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|p| p == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|&u| u > 0 && ours)
            .map(Duration::from_micros);
        Notifier { socket, watchdog }
    }

    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// How often to send WATCHDOG=1: half the configured timeout.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }

    pub fn notify(&self, message: &str) {
        if let Some((s, addr)) = &self.socket
            && let Err(e) = s.send_to_addr(message.as_bytes(), addr)
        {
            log::warn!("systemd: notify failed: {e}");
        }
    }
}
