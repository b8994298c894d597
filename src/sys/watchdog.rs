//! The kernel watchdog device (`/dev/watchdog`, softdog where there is no
//! hardware one), as `include/uapi/linux/watchdog.h` and the kernel's
//! `Documentation/watchdog/watchdog-api.rst` describe it:
//!
//! - Opening the device arms it; from then on the machine reboots unless
//!   something is written to it (or `WDIOC_KEEPALIVE`) within the timeout.
//! - `WDIOC_SETTIMEOUT` sets the timeout in seconds; the driver may round
//!   it and answers with the one it uses.
//! - Writing the magic character `V` just before closing disarms it (unless
//!   the driver was built or loaded with `nowayout`); closing without it,
//!   which is what a crash does, leaves it counting down.

#![allow(unsafe_code)]

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

// `_IOWR('W', 6, int)` and `_IOR('W', 7, int)`.
const WDIOC_SETTIMEOUT: libc::c_ulong = 0xc004_5706;
const WDIOC_GETTIMEOUT: libc::c_ulong = 0x8004_5707;

#[derive(Debug)]
pub enum Error {
    Open {
        device: PathBuf,
        source: std::io::Error,
    },
    Timeout {
        device: PathBuf,
        source: std::io::Error,
    },
    Pet {
        device: PathBuf,
        source: std::io::Error,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Open { device, source } => write!(
                f,
                "watchdog: cannot open {}: {source}; load softdog (`modprobe softdog`) where there is no hardware watchdog, or set watchdog.enabled = false",
                device.display()
            ),
            Error::Timeout { device, source } => write!(
                f,
                "watchdog: {} refused its timeout: {source}",
                device.display()
            ),
            Error::Pet { device, source } => write!(
                f,
                "watchdog: cannot pet {}: {source}; the node reboots when the timeout runs out",
                device.display()
            ),
        }
    }
}

impl std::error::Error for Error {}

/// An armed watchdog: pet it, or the node reboots.
pub struct Watchdog {
    device: PathBuf,
    file: File,
    /// The timeout the driver uses, in seconds.
    pub timeout_s: u32,
}

impl Watchdog {
    /// Opens (arms) the device and asks for `timeout_s`.
    pub fn arm(device: &Path, timeout_s: u32) -> Result<Watchdog, Error> {
        let file = OpenOptions::new()
            .write(true)
            .open(device)
            .map_err(|source| Error::Open {
                device: device.to_owned(),
                source,
            })?;
        let mut t: libc::c_int = timeout_s as libc::c_int;
        // SAFETY: the descriptor is open for the call; WDIOC_SETTIMEOUT
        // reads and writes one int through the pointer, which points to a
        // live local int.
        let r = unsafe { libc::ioctl(file.as_fd().as_raw_fd(), WDIOC_SETTIMEOUT as _, &mut t) };
        if r != 0 {
            // Some drivers have a fixed timeout; use what it says.
            // SAFETY: as above; WDIOC_GETTIMEOUT writes one int.
            let r = unsafe { libc::ioctl(file.as_fd().as_raw_fd(), WDIOC_GETTIMEOUT as _, &mut t) };
            if r != 0 {
                return Err(Error::Timeout {
                    device: device.to_owned(),
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        Ok(Watchdog {
            device: device.to_owned(),
            file,
            timeout_s: t.max(1) as u32,
        })
    }

    pub fn pet(&mut self) -> Result<(), Error> {
        self.file.write_all(b"\0").map_err(|source| Error::Pet {
            device: self.device.clone(),
            source,
        })
    }

    /// A clean stop: the magic close disarms it.
    pub fn disarm(mut self) -> Result<(), Error> {
        self.file.write_all(b"V").map_err(|source| Error::Pet {
            device: self.device.clone(),
            source,
        })
    }
}
