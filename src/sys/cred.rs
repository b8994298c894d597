//! Who is at the other end of a unix socket.
//!
//! rustix's `socket_peercred` reads the kernel's `struct ucred` into a type
//! whose pid may not be zero; the kernel reports pid 0 for a peer outside
//! our PID namespace (hadb as PID 1 of a container, the operator's CLI on
//! the host), so this reads it into libc's plain integers instead.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// The peer's effective uid, as of its connect.
pub fn peer_uid(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `fd` is a valid open descriptor for the call's duration;
    // `cred` and `len` are live, writable, and `len` is `cred`'s size, so
    // the kernel writes at most that many bytes into plain integers.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}
