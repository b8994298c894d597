//! Serving a block device to the local kernel through its NBD driver.
//!
//! [`KernelNbd::attach`] hands one end of a connected socket (a unix
//! socketpair: the other end is hadb's own NBD server, speaking only the
//! transmission phase) to the kernel with the ioctl interface of
//! `include/uapi/linux/nbd.h`, and parks a dedicated thread in `NBD_DO_IT`,
//! where the kernel keeps it for as long as the device is connected. From
//! then on `/dev/nbdN` is a block device whose every request arrives on the
//! server's end of the socket.
//!
//! The device lives only as long as that thread: when the serving process
//! dies, the device goes down under whatever is mounted on it. For a device
//! that outlives its server, see [`crate::sys::nbd_netlink`].
//!
//! Facts about the kernel driver (Linux 6.1) this module relies on:
//!
//! - Setting the socket records the calling thread as the one setting the
//!   device up; a device already being set up or served by another task
//!   answers `EBUSY`. `NBD_DO_IT` may be called from another thread.
//! - `NBD_DO_IT` returns when the connection ends: the server closed its end,
//!   `NBD_DISCONNECT` (the kernel sends `NBD_CMD_DISC`, the server closes) or
//!   `NBD_CLEAR_SOCK` (the kernel shuts the socket down). It also shuts the
//!   connection down when its thread is interrupted by a signal: that is why
//!   the thread blocks every signal it can. A stop signal (SIGSTOP, SIGTSTP
//!   from a terminal, a debugger or strace attaching) cannot be blocked: it
//!   ends the connection (seen on 6.1: the server reads EOF, and the
//!   restarted `NBD_DO_IT` then fails with `EBUSY`).
//! - The device's state outlives a crashed server while anything keeps the
//!   device open (a mounted filesystem); a fresh attach first clears what a
//!   dead process left behind.
//! - With a timeout of 0 a request never fails for being slow (the block
//!   layer only logs it): hadb's server answers every request itself, after
//!   its own peer timeouts, so the kernel must not give up first.

#![allow(unsafe_code)]

use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::ioctl::{Getter, IntegerSetter, NoArg, Opcode, ioctl, opcode};

/// Major number of NBD block devices (`NBD_MAJOR`).
const NBD_MAJOR: u32 = 43;

// The ioctls of include/uapi/linux/nbd.h, all `_IO(0xab, n)`: the argument,
// if any, is an integer passed by value.
const NBD_SET_SOCK: Opcode = opcode::none(0xab, 0);
const NBD_SET_BLKSIZE: Opcode = opcode::none(0xab, 1);
const NBD_SET_SIZE: Opcode = opcode::none(0xab, 2);
const NBD_DO_IT: Opcode = opcode::none(0xab, 3);
const NBD_CLEAR_SOCK: Opcode = opcode::none(0xab, 4);
const NBD_DISCONNECT: Opcode = opcode::none(0xab, 8);
const NBD_SET_TIMEOUT: Opcode = opcode::none(0xab, 9);
const NBD_SET_FLAGS: Opcode = opcode::none(0xab, 10);
/// `BLKGETSIZE64`, `_IOR(0x12, 114, size_t)`: the device's size in bytes.
const BLKGETSIZE64: Opcode = opcode::read::<u64>(0x12, 114);

/// Request timeout given to the kernel: none (see the module docs).
const REQUEST_TIMEOUT_SECS: usize = 0;
/// How long `attach` waits for the kernel to start the device.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `detach` waits for the server to close after `NBD_DISCONNECT`,
/// and then again after forcing the socket down.
const DISCONNECT_GRACE: Duration = Duration::from_secs(5);
/// Stack of the thread parked in `NBD_DO_IT`: it only makes that one call,
/// and with `mlockall(MCL_FUTURE)` every stack page is locked in memory.
const DO_IT_STACK: usize = 64 * 1024;

#[derive(Debug)]
pub enum Error {
    /// The device node cannot be opened.
    Open { device: PathBuf, source: io::Error },
    /// The path is not an NBD block device.
    NotNbd { device: PathBuf },
    /// Another process (or another attachment) serves the device.
    InUse { device: PathBuf, pid: Option<u32> },
    /// Size or block size the kernel cannot take.
    Geometry {
        device: PathBuf,
        size: u64,
        block_size: u32,
        problem: &'static str,
    },
    /// An ioctl failed.
    Ioctl {
        device: PathBuf,
        request: &'static str,
        errno: Errno,
    },
    /// The thread for `NBD_DO_IT` could not be started.
    Thread { device: PathBuf, source: io::Error },
    /// The kernel did not start the device in time.
    StartTimeout { device: PathBuf },
    /// `NBD_DO_IT` did not return after the disconnect and a forced
    /// shutdown of the socket.
    DetachTimeout { device: PathBuf },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Open { device, source } => {
                let d = device.display();
                match source.kind() {
                    io::ErrorKind::NotFound => write!(
                        f,
                        "cannot open {d}: {source}; the kernel NBD driver is not loaded: \
                         run `modprobe nbd` (and add `nbd` to /etc/modules-load.d/ so it loads at boot)"
                    ),
                    io::ErrorKind::PermissionDenied => {
                        write!(
                            f,
                            "cannot open {d}: {source}; attaching an NBD device needs root"
                        )
                    }
                    _ => write!(f, "cannot open {d}: {source}"),
                }
            }
            Error::NotNbd { device } => write!(
                f,
                "{} is not an NBD device (block device of major {NBD_MAJOR}); \
                 set volume.nbd_device to one of /dev/nbd0 .. /dev/nbd15",
                device.display()
            ),
            Error::InUse {
                device,
                pid: Some(pid),
            } => write!(
                f,
                "{} is already served by process {pid}; stop that process (or pick another \
                 /dev/nbdN in volume.nbd_device)",
                device.display()
            ),
            Error::InUse { device, pid: None } => write!(
                f,
                "{} is still in use by an earlier attachment; unmount any filesystem on it \
                 (grep {} /proc/mounts) and try again",
                device.display(),
                device.display()
            ),
            Error::Geometry {
                device,
                size,
                block_size,
                problem,
            } => write!(
                f,
                "cannot attach {} with size {size} bytes and block size {block_size}: {problem}",
                device.display()
            ),
            Error::Ioctl {
                device,
                request,
                errno,
            } => {
                write!(f, "{request} on {} failed: {errno}", device.display())?;
                if *errno == Errno::BUSY {
                    write!(
                        f,
                        "; the device is in use (by another process, or a filesystem is still mounted on it)"
                    )?;
                } else if *errno == Errno::NOTTY
                    || (*errno == Errno::INVAL && *request == "NBD_SET_SOCK")
                {
                    write!(
                        f,
                        "; is it an NBD device, and the socket a connected stream socket?"
                    )?;
                }
                Ok(())
            }
            Error::Thread { device, source } => {
                write!(
                    f,
                    "cannot start the thread serving {}: {source}",
                    device.display()
                )
            }
            Error::StartTimeout { device } => write!(
                f,
                "the kernel did not start {} within {START_TIMEOUT:?}; see dmesg",
                device.display()
            ),
            Error::DetachTimeout { device } => write!(
                f,
                "{} did not disconnect within {:?} even after its socket was shut down; \
                 see dmesg; the device may stay unusable until reboot",
                device.display(),
                DISCONNECT_GRACE * 2
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Open { source, .. } | Error::Thread { source, .. } => Some(source),
            Error::Ioctl { errno, .. } => Some(errno),
            _ => None,
        }
    }
}

/// An NBD device attached to a socket; the kernel serves it until
/// [`KernelNbd::detach`] (or until the server closes its end of the socket).
///
/// Dropping it without `detach` tears the device down forcibly (pending
/// requests fail) and does not wait long for the kernel.
#[derive(Debug)]
pub struct KernelNbd {
    device: PathBuf,
    fd: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
    /// `NBD_DO_IT`'s result, sent by its thread as it ends.
    done: mpsc::Receiver<Result<(), Errno>>,
}

// ------------------------------------------------------------------ ioctls --

/// An NBD ioctl whose argument is an integer passed by value.
fn ioctl_int<const OP: Opcode>(fd: BorrowedFd<'_>, arg: usize) -> Result<(), Errno> {
    // SAFETY: every OP this is used with is an NBD ioctl defined as
    // `_IO(0xab, n)` that takes its argument as a plain integer (a size, a
    // flag word, a number of seconds, or a file descriptor number that the
    // kernel looks up itself); the kernel dereferences no pointer from it,
    // and `fd` is a valid open descriptor for the duration of the call.
    unsafe { ioctl(fd, IntegerSetter::<OP>::new_usize(arg)) }
}

/// An NBD ioctl without argument.
fn ioctl_none<const OP: Opcode>(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: every OP this is used with is an NBD ioctl defined as
    // `_IO(0xab, n)` that ignores its argument (NBD_DO_IT, NBD_CLEAR_SOCK,
    // NBD_DISCONNECT); no memory is passed to the kernel, and `fd` is a valid
    // open descriptor for the duration of the call.
    unsafe { ioctl(fd, NoArg::<OP>::new()) }
}

/// The size of a block device in bytes.
fn block_device_size(fd: BorrowedFd<'_>) -> Result<u64, Errno> {
    // SAFETY: BLKGETSIZE64 is `_IOR(0x12, 114, size_t)`: the kernel writes one
    // u64 (size_t on the 64-bit targets hadb builds for; see the assertion
    // below) to the pointer, which `Getter` provides as a properly aligned
    // `MaybeUninit<u64>` and reads only after the call succeeded.
    unsafe { ioctl(fd, Getter::<BLKGETSIZE64, u64>::new()) }
}
const _: () = assert!(std::mem::size_of::<usize>() == std::mem::size_of::<u64>());

/// Blocks every signal that can be blocked in the calling thread (libc keeps
/// its own internal signals out of a full set). A signal delivered to the
/// thread parked in `NBD_DO_IT` would make the kernel shut the connection
/// down.
fn block_signals_in_this_thread() {
    // SAFETY: `set` is a local sigset_t that sigfillset fully initialises
    // before pthread_sigmask reads it; a null old-set pointer is allowed. The
    // mask only affects the calling thread, which runs nothing but NBD_DO_IT.
    unsafe {
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigfillset(set.as_mut_ptr());
        libc::pthread_sigmask(libc::SIG_BLOCK, set.as_ptr(), std::ptr::null_mut());
    }
}

// ------------------------------------------------------------------ helpers --

fn open_device(device: &Path) -> Result<OwnedFd, Error> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .map_err(|source| Error::Open {
            device: device.to_owned(),
            source,
        })?;
    let stat = rustix::fs::fstat(&file).map_err(|e| Error::Open {
        device: device.to_owned(),
        source: e.into(),
    })?;
    let is_block =
        rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::BlockDevice;
    if !is_block || rustix::fs::major(stat.st_rdev) != NBD_MAJOR {
        return Err(Error::NotNbd {
            device: device.to_owned(),
        });
    }
    Ok(file.into())
}

/// The process serving the device now, according to sysfs: the pid the
/// kernel shows in /sys/block/nbdN/pid while the device is started, if that
/// process still lives. `None` when no live process serves it (or sysfs has
/// no answer).
fn live_server_pid(device: &Path) -> Option<u32> {
    let real = std::fs::canonicalize(device).ok()?;
    let name = real.file_name()?.to_str()?;
    let pid: u32 = std::fs::read_to_string(format!("/sys/block/{name}/pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

fn ioctl_error<'a>(device: &'a Path, request: &'static str) -> impl FnOnce(Errno) -> Error + 'a {
    move |errno| Error::Ioctl {
        device: device.to_owned(),
        request,
        errno,
    }
}

impl KernelNbd {
    /// Attaches `sock` (one end of a connected stream socket; the other end
    /// is served by hadb's NBD server, transmission phase only) to `device`
    /// and returns once the kernel serves the device.
    ///
    /// `size` is in bytes and must be a multiple of `block_size`, a power of
    /// two from 512 to 4096. `flags` are the NBD transmission flags
    /// (`NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | ...`);
    /// without `SEND_FLUSH` the kernel assumes there is no write cache and
    /// never sends FLUSH.
    pub fn attach(
        device: &Path,
        sock: OwnedFd,
        size: u64,
        block_size: u32,
        flags: u16,
    ) -> Result<KernelNbd, Error> {
        let geometry = |problem| Error::Geometry {
            device: device.to_owned(),
            size,
            block_size,
            problem,
        };
        if !(512..=4096).contains(&block_size) || !block_size.is_power_of_two() {
            return Err(geometry(
                "the block size must be a power of two from 512 to 4096",
            ));
        }
        if size == 0 {
            return Err(geometry("the size must not be zero"));
        }
        if !size.is_multiple_of(u64::from(block_size)) {
            return Err(geometry("the size must be a multiple of the block size"));
        }
        let size_arg = usize::try_from(size)
            .map_err(|_| geometry("the size does not fit this platform's ioctl argument"))?;

        // A device with a size is started: served by a live process, or left
        // behind by a dead one while something (a mount) keeps it open.
        // Either way it is not ours to take.
        {
            let fd = open_device(device)?;
            if matches!(block_device_size(fd.as_fd()), Ok(n) if n > 0) {
                return Err(Error::InUse {
                    device: device.to_owned(),
                    pid: live_server_pid(device),
                });
            }
            // Clear what a process that died while serving or setting up
            // this device left behind (its dead socket, its "being set up"
            // mark): NBD_CLEAR_SOCK drops the state's extra reference, and
            // closing this descriptor the last one.
            let _ = ioctl_none::<NBD_CLEAR_SOCK>(fd.as_fd());
        }

        let fd = Arc::new(open_device(device)?);
        let configure = || -> Result<(), Error> {
            ioctl_int::<NBD_SET_BLKSIZE>(fd.as_fd(), block_size as usize)
                .map_err(ioctl_error(device, "NBD_SET_BLKSIZE"))?;
            ioctl_int::<NBD_SET_SIZE>(fd.as_fd(), size_arg)
                .map_err(ioctl_error(device, "NBD_SET_SIZE"))?;
            ioctl_int::<NBD_SET_FLAGS>(fd.as_fd(), usize::from(flags))
                .map_err(ioctl_error(device, "NBD_SET_FLAGS"))?;
            ioctl_int::<NBD_SET_TIMEOUT>(fd.as_fd(), REQUEST_TIMEOUT_SECS)
                .map_err(ioctl_error(device, "NBD_SET_TIMEOUT"))?;
            // The kernel takes its own reference to the socket.
            let sock_fd =
                usize::try_from(sock.as_raw_fd()).expect("an open descriptor is not negative");
            ioctl_int::<NBD_SET_SOCK>(fd.as_fd(), sock_fd)
                .map_err(ioctl_error(device, "NBD_SET_SOCK"))?;
            Ok(())
        };
        if let Err(e) = configure() {
            let _ = ioctl_none::<NBD_CLEAR_SOCK>(fd.as_fd());
            return Err(match e {
                Error::Ioctl { errno, .. } if errno == Errno::BUSY => Error::InUse {
                    device: device.to_owned(),
                    pid: live_server_pid(device),
                },
                e => e,
            });
        }
        drop(sock);

        let (tx, done) = mpsc::channel();
        let thread_fd = fd.clone();
        let name = device
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-do-it"))
            .stack_size(DO_IT_STACK)
            .spawn(move || {
                block_signals_in_this_thread();
                let result = ioctl_none::<NBD_DO_IT>(thread_fd.as_fd());
                let _ = tx.send(result);
            });
        let thread = match thread {
            Ok(t) => t,
            Err(source) => {
                let _ = ioctl_none::<NBD_CLEAR_SOCK>(fd.as_fd());
                return Err(Error::Thread {
                    device: device.to_owned(),
                    source,
                });
            }
        };
        let mut nbd = KernelNbd {
            device: device.to_owned(),
            fd,
            thread: Some(thread),
            done,
        };

        // NBD_DO_IT either fails at once or sets the device's size and
        // blocks: wait for one or the other.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match nbd.done.recv_timeout(Duration::from_millis(5)) {
                Ok(result) => {
                    let errno = result.err().unwrap_or(Errno::PIPE);
                    nbd.join();
                    let _ = ioctl_none::<NBD_CLEAR_SOCK>(nbd.fd.as_fd());
                    nbd.thread = None;
                    return Err(if errno == Errno::BUSY {
                        Error::InUse {
                            device: device.to_owned(),
                            pid: live_server_pid(device),
                        }
                    } else {
                        Error::Ioctl {
                            device: device.to_owned(),
                            request: "NBD_DO_IT",
                            errno,
                        }
                    });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    unreachable!("the NBD_DO_IT thread always sends")
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if matches!(block_device_size(nbd.fd.as_fd()), Ok(n) if n > 0) {
                return Ok(nbd);
            }
            if Instant::now() > deadline {
                // Drop forces the device down.
                return Err(Error::StartTimeout {
                    device: device.to_owned(),
                });
            }
        }
    }

    /// Clean detach: `NBD_DISCONNECT` (the kernel sends `NBD_CMD_DISC` after
    /// the requests in flight; the server then closes its end), wait for the
    /// `NBD_DO_IT` thread, `NBD_CLEAR_SOCK`. If the server does not close
    /// within a few seconds the socket is shut down from the kernel side.
    ///
    /// Also the way to clean up after the connection ended by itself
    /// ([`KernelNbd::is_connected`] false); how it ended is not an error of
    /// the detach.
    pub fn detach(mut self) -> Result<(), Error> {
        let device = self.device.clone();
        let was_connected = self.is_connected();
        let disconnect = ioctl_none::<NBD_DISCONNECT>(self.fd.as_fd());
        let ended = match self.done.recv_timeout(DISCONNECT_GRACE) {
            Ok(_) => true,
            Err(_) => {
                // The server did not close: force the socket down.
                let _ = ioctl_none::<NBD_CLEAR_SOCK>(self.fd.as_fd());
                self.done.recv_timeout(DISCONNECT_GRACE).is_ok()
            }
        };
        if !ended {
            // Leave the thread parked; Drop must not wait for it again.
            self.thread = None;
            return Err(Error::DetachTimeout { device });
        }
        self.join();
        let clear = ioctl_none::<NBD_CLEAR_SOCK>(self.fd.as_fd());
        if was_connected {
            disconnect.map_err(ioctl_error(&device, "NBD_DISCONNECT"))?;
        }
        clear.map_err(ioctl_error(&device, "NBD_CLEAR_SOCK"))?;
        Ok(())
    }

    /// The device path given to [`KernelNbd::attach`].
    pub fn device(&self) -> &Path {
        &self.device
    }

    /// Whether the kernel still serves the device (`NBD_DO_IT` has not
    /// returned: the connection has not ended).
    pub fn is_connected(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for KernelNbd {
    fn drop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        // Forced teardown: the kernel shuts the socket down and fails what
        // is pending; NBD_DO_IT then returns.
        let _ = ioctl_none::<NBD_DISCONNECT>(self.fd.as_fd());
        let _ = ioctl_none::<NBD_CLEAR_SOCK>(self.fd.as_fd());
        if self.done.recv_timeout(DISCONNECT_GRACE).is_ok() {
            let _ = thread.join();
            let _ = ioctl_none::<NBD_CLEAR_SOCK>(self.fd.as_fd());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opcodes_match_nbd_h() {
        // _IO(0xab, n) == 0xab00 | n; _IOR(0x12, 114, u64) == 0x80081272.
        assert_eq!(NBD_SET_SOCK, 0xab00);
        assert_eq!(NBD_SET_BLKSIZE, 0xab01);
        assert_eq!(NBD_SET_SIZE, 0xab02);
        assert_eq!(NBD_DO_IT, 0xab03);
        assert_eq!(NBD_CLEAR_SOCK, 0xab04);
        assert_eq!(NBD_DISCONNECT, 0xab08);
        assert_eq!(NBD_SET_TIMEOUT, 0xab09);
        assert_eq!(NBD_SET_FLAGS, 0xab0a);
        assert_eq!(BLKGETSIZE64, 0x8008_1272);
    }

    fn socketpair() -> (OwnedFd, OwnedFd) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        (a.into(), b.into())
    }

    #[test]
    fn rejects_bad_geometry_before_touching_the_device() {
        let dev = Path::new("/nonexistent/nbd0");
        for (size, bs) in [
            (0, 512),
            (1 << 20, 1000),
            (1 << 20, 256),
            (1 << 20, 8192),
            ((1 << 20) + 512, 4096),
        ] {
            let (a, _b) = socketpair();
            match KernelNbd::attach(dev, a, size, bs, 1) {
                Err(Error::Geometry { .. }) => {}
                other => panic!("size {size} block {bs}: {other:?}"),
            }
        }
    }

    #[test]
    fn missing_device_says_modprobe() {
        let (a, _b) = socketpair();
        let err =
            KernelNbd::attach(Path::new("/nonexistent/nbd0"), a, 1 << 20, 4096, 1).unwrap_err();
        assert!(err.to_string().contains("modprobe nbd"), "{err}");
    }

    #[test]
    fn refuses_a_device_that_is_not_nbd() {
        let (a, _b) = socketpair();
        // /dev/null is a character device: not NBD, and no ioctl reaches it.
        match KernelNbd::attach(Path::new("/dev/null"), a, 1 << 20, 4096, 1) {
            Err(Error::NotNbd { .. }) => {}
            other => panic!("{other:?}"),
        }
    }
}
