//! Keeping the process that serves a block device to its own kernel out of
//! the writeback deadlock: when memory is short the kernel writes dirty pages
//! of /dev/nbdN back, which waits for this process; if this process then
//! waits for memory (a page fault on swapped-out or dropped memory, an
//! allocation that enters reclaim and writes back to /dev/nbdN), neither
//! moves again.
//!
//! - `PR_SET_IO_FLUSHER` (Linux 5.6+) makes the kernel treat this thread's
//!   (and its later children's) allocations like those of a block driver (`PF_MEMALLOC_NOIO` and
//!   `PF_LOCAL_THROTTLE`): reclaim never does I/O for it and it is not
//!   throttled behind the writeback it is needed to finish.
//! - `mlockall(MCL_CURRENT | MCL_FUTURE)` keeps every page of the process,
//!   present and future, in memory, so serving a request never faults.

use std::fmt;

use rustix::io::Errno;
use rustix::mm::{MlockAllFlags, mlockall};
use rustix::process::configure_io_flusher_behavior;

#[derive(Debug)]
pub enum Error {
    /// `prctl(PR_SET_IO_FLUSHER, 1)` failed.
    IoFlusher(Errno),
    /// `mlockall(MCL_CURRENT | MCL_FUTURE)` failed.
    Mlockall(Errno),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::IoFlusher(e) if *e == Errno::PERM => write!(
                f,
                "cannot mark hadb as an I/O flusher (prctl PR_SET_IO_FLUSHER): {e}; \
                 it needs CAP_SYS_RESOURCE: run hadb as root"
            ),
            Error::IoFlusher(e) if *e == Errno::INVAL => write!(
                f,
                "cannot mark hadb as an I/O flusher (prctl PR_SET_IO_FLUSHER): {e}; \
                 the kernel is older than Linux 5.6, which hadb needs to serve /dev/nbdN safely"
            ),
            Error::IoFlusher(e) => {
                write!(
                    f,
                    "cannot mark hadb as an I/O flusher (prctl PR_SET_IO_FLUSHER): {e}"
                )
            }
            Error::Mlockall(e) if *e == Errno::NOMEM || *e == Errno::PERM || *e == Errno::AGAIN => {
                write!(
                    f,
                    "cannot lock hadb's memory (mlockall MCL_CURRENT|MCL_FUTURE): {e}; \
                 run hadb as root or raise its locked-memory limit \
                 (ulimit -l unlimited, or LimitMEMLOCK=infinity in the systemd unit)"
                )
            }
            Error::Mlockall(e) => {
                write!(
                    f,
                    "cannot lock hadb's memory (mlockall MCL_CURRENT|MCL_FUTURE): {e}"
                )
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::IoFlusher(e) | Error::Mlockall(e) => Some(e),
        }
    }
}

/// Marks this process as an I/O flusher and locks all its memory, present
/// and future.
///
/// Call it first thing in `main`, before any other thread starts (the async
/// executor, the blocking pool, the NBD_DO_IT thread): the I/O flusher state
/// is a flag of the calling thread, inherited by the threads and processes it
/// starts afterwards but not given to threads that already run. The memory
/// lock covers the whole process.
pub fn protect_from_writeback_deadlock() -> Result<(), Error> {
    configure_io_flusher_behavior(true).map_err(Error::IoFlusher)?;
    mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE).map_err(Error::Mlockall)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_to_do() {
        assert!(Error::IoFlusher(Errno::PERM).to_string().contains("root"));
        assert!(Error::IoFlusher(Errno::INVAL).to_string().contains("5.6"));
        assert!(
            Error::Mlockall(Errno::NOMEM)
                .to_string()
                .contains("LimitMEMLOCK")
        );
    }
}
