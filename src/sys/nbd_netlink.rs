//! Serving a block device to the local kernel through the NBD driver's
//! generic-netlink interface (`include/uapi/linux/nbd-netlink.h`, family
//! `"nbd"`, version 1), so that `/dev/nbdN` outlives the process serving it.
//!
//! With the ioctl interface ([`crate::sys::nbd_kernel`]) the device lives
//! exactly as long as a thread of the serving process sits in `NBD_DO_IT`:
//! when that process dies, the device goes down and the mounted filesystem
//! on it sees I/O errors. A device connected over netlink instead belongs to
//! the kernel until someone disconnects it, and a new process can hand it a
//! new connection ([`NetlinkNbd::reattach`]). That is what lets hadb be
//! restarted (or crash) under a mounted MySQL filesystem.
//!
//! Facts about the driver this module relies on, read from Linux 6.1
//! (Debian's 6.1.192, `drivers/block/nbd.c`) and checked in VMs by
//! `tests/vm_nbd_reconnect.rs`:
//!
//! - `NBD_CMD_CONNECT` takes the sockets (`NBD_ATTR_SOCKETS`, nested
//!   `NBD_SOCK_ITEM`/`NBD_SOCK_FD`, descriptor numbers in the calling
//!   process; the kernel takes its own reference), the size, the block size,
//!   the transmission flags and the timeouts, starts one receive worker per
//!   socket and answers with the index it used. The configuration keeps a
//!   reference of its own until `NBD_CMD_DISCONNECT`: nothing in the calling
//!   process needs to stay alive (no `NBD_DO_IT`). Client flag
//!   `NBD_CFLAG_DISCONNECT_ON_CLOSE` would undo that; this module always
//!   sends client flags 0.
//! - When the server's end of a socket closes (the process died), the
//!   receive worker reads EOF, marks the connection dead, shuts it down and
//!   multicasts `NBD_CMD_LINK_DEAD`. Then:
//!   - with `dead_conn_timeout` 0 (the default), every new request fails at
//!     once with an I/O error;
//!   - with `dead_conn_timeout` T > 0, a new request waits (its dispatch
//!     blocks) up to T for a live connection and is sent on it as soon as one
//!     appears; after T it fails with an I/O error and the device is marked
//!     disconnected (a later reconfigure still revives it).
//! - Requests already sent on the connection that died are neither failed
//!   nor resent when it dies: they stay in flight until the block layer's
//!   request timer fires for them (`/sys/block/nbdN/queue/io_timeout`: 30 s
//!   on a new device; `NBD_ATTR_TIMEOUT` and the ioctl `NBD_SET_TIMEOUT` set
//!   it, a connect without them leaves it as it was). With
//!   `NBD_ATTR_TIMEOUT` unset the timer then only re-arms ("Possible stuck
//!   request" in dmesg, once per request and period) while the connection is
//!   the same one, and requeues the request once the connection was
//!   replaced: it is resent on the new connection. So after a reconnect the
//!   requests that were in flight complete within one `io_timeout` of being
//!   sent ([`Settings::io_timeout`] shortens that). In the VM test a write in
//!   flight at the kill took 30.8 s with the default 30 s (the new server
//!   was up after 2.1 s), and 5.1 s with `io_timeout` 5 s. Without a
//!   dead-connection timeout such a request never ends at all until
//!   `NBD_CMD_DISCONNECT` fails it, while the next ones fail at once (ext4
//!   aborted its journal at its next commit).
//! - With `NBD_ATTR_TIMEOUT` set and one connection, a request older than the
//!   timeout is requeued *and the connection is declared dead* if it was sent
//!   on the current one: a live server that is merely slow (hadb waiting for
//!   its peer) would lose its connection. hadb therefore leaves it unset
//!   ([`Settings::request_timeout`] `None`).
//! - `NBD_CMD_RECONFIGURE` with a socket replaces the first *dead*
//!   connection, starts a receive worker on the new socket and wakes the
//!   waiting requests. It is refused (`EINVAL`) for a device that was not
//!   connected over netlink (an ioctl attachment) or was disconnected, and,
//!   when `NBD_ATTR_BACKEND_IDENTIFIER` was given at connect, unless the same
//!   identifier comes with it. If no connection is dead, the kernel drops the
//!   socket *and still answers success*: [`NetlinkNbd::reconnect`] checks
//!   that the kernel kept the new socket and says so when it did not.
//! - `NBD_CMD_STATUS` reports a device as connected when it has a
//!   configuration at all: while served, while its connection is dead but not
//!   disconnected, and also while some process merely holds `/dev/nbdN`
//!   open. It does not say whether a server is alive.
//! - Opening `/dev/nbdN` gives the device an empty configuration: while
//!   anything holds it open (blkid, udev, `blockdev`), `NBD_CMD_CONNECT` to
//!   that index fails with `EBUSY`.
//! - `NBD_CMD_DISCONNECT` sends `NBD_CMD_DISC` to the server, shuts the
//!   sockets down, fails the requests in flight and drops the
//!   configuration's reference; the device is gone once nothing holds it
//!   open. It answers success for a device that is not connected.
//! - The module has no alias for its netlink family, so asking for the
//!   family does not load it: without `modprobe nbd` the family is unknown.
//! - Sockets must be TCP or unix stream sockets; `/sys/block/nbdN/pid` keeps
//!   the pid of the process that connected, also after a reconnect by
//!   another one, and `/sys/block/nbdN/backend` shows the backend
//!   identifier.
//!
//! Everything here is safe code: rustix speaks netlink sockets.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use rustix::io::Errno;
use rustix::net::netlink::{self, SocketAddrNetlink};
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

// ------------------------------------------------------------ wire format --

// include/uapi/linux/netlink.h: struct nlmsghdr (host byte order):
// u32 length (header included), u16 type, u16 flags, u32 seq, u32 port id.
const NLMSG_HDRLEN: usize = 16;
const NLM_F_REQUEST: u16 = 0x01;
const NLM_F_ACK: u16 = 0x04;
const NLMSG_NOOP: u16 = 0x1;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_DONE: u16 = 0x3;
// struct nlattr: u16 length (header included), u16 type; payload padded to 4.
const NLA_HDRLEN: usize = 4;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);

// include/uapi/linux/genetlink.h: struct genlmsghdr: u8 cmd, u8 version,
// u16 reserved. The controller family resolves family names to ids.
const GENL_HDRLEN: usize = 4;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_VERSION: u8 = 2;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

// include/uapi/linux/nbd-netlink.h.
const NBD_GENL_FAMILY_NAME: &str = "nbd";
const NBD_GENL_VERSION: u8 = 1;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_ATTR_DEVICE_LIST: u16 = 9;
const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;
const NBD_DEVICE_ITEM: u16 = 1;
const NBD_DEVICE_INDEX: u16 = 1;
const NBD_DEVICE_CONNECTED: u16 = 2;
const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_CMD_RECONFIGURE: u8 = 3;
const NBD_CMD_STATUS: u8 = 5;

/// How long to wait for the kernel's answer. It answers at once; this only
/// keeps a wedged kernel from hanging the caller forever.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest backend identifier accepted (the kernel takes any string; this
/// keeps the message small and the attribute length in range).
const MAX_BACKEND_LEN: usize = 256;

/// A generic-netlink request under construction.
struct Message {
    buf: Vec<u8>,
}

fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

impl Message {
    fn new(family: u16, flags: u16, seq: u32, cmd: u8, version: u8) -> Message {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish()
        buf.extend_from_slice(&family.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: 0 is the kernel
        buf.push(cmd);
        buf.push(version);
        buf.extend_from_slice(&0u16.to_ne_bytes());
        Message { buf }
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) {
        let len = u16::try_from(NLA_HDRLEN + payload.len())
            .expect("attribute payloads built here are far below 64 KiB");
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(pad4(self.buf.len()), 0);
    }

    fn u32(&mut self, kind: u16, v: u32) {
        self.attr(kind, &v.to_ne_bytes());
    }

    fn u64(&mut self, kind: u16, v: u64) {
        self.attr(kind, &v.to_ne_bytes());
    }

    /// A NUL-terminated string (`NLA_STRING`/`NLA_NUL_STRING`).
    fn string(&mut self, kind: u16, s: &str) {
        let mut b = Vec::with_capacity(s.len() + 1);
        b.extend_from_slice(s.as_bytes());
        b.push(0);
        self.attr(kind, &b);
    }

    /// Opens a nested attribute; returns where its header is.
    fn nest_start(&mut self, kind: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        at
    }

    fn nest_end(&mut self, at: usize) {
        let len = u16::try_from(self.buf.len() - at)
            .expect("nested attributes built here are far below 64 KiB");
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).expect("messages built here are small");
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// One netlink message out of a datagram.
#[derive(Debug, PartialEq, Eq)]
struct Received<'a> {
    kind: u16,
    seq: u32,
    payload: &'a [u8],
}

fn ne_u16(b: &[u8]) -> u16 {
    u16::from_ne_bytes([b[0], b[1]])
}

fn ne_u32(b: &[u8]) -> u32 {
    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}

/// Splits a datagram into its messages; a length that does not fit is a
/// malformed answer.
fn split_messages(mut b: &[u8]) -> Result<Vec<Received<'_>>, &'static str> {
    let mut out = Vec::new();
    while !b.is_empty() {
        if b.len() < NLMSG_HDRLEN {
            return Err("a message shorter than its header");
        }
        let len = ne_u32(&b[0..4]) as usize;
        if len < NLMSG_HDRLEN || len > b.len() {
            return Err("a message length out of bounds");
        }
        out.push(Received {
            kind: ne_u16(&b[4..6]),
            seq: ne_u32(&b[8..12]),
            payload: &b[NLMSG_HDRLEN..len],
        });
        b = &b[pad4(len).min(b.len())..];
    }
    Ok(out)
}

/// The attributes in `b` as (type without flags, payload).
fn attributes(mut b: &[u8]) -> Result<Vec<(u16, &[u8])>, &'static str> {
    let mut out = Vec::new();
    while b.len() >= NLA_HDRLEN {
        let len = ne_u16(&b[0..2]) as usize;
        if len < NLA_HDRLEN || len > b.len() {
            return Err("an attribute length out of bounds");
        }
        out.push((ne_u16(&b[2..4]) & NLA_TYPE_MASK, &b[NLA_HDRLEN..len]));
        b = &b[pad4(len).min(b.len())..];
    }
    Ok(out)
}

fn attr_u32(payload: &[u8]) -> Result<u32, &'static str> {
    if payload.len() < 4 {
        return Err("a u32 attribute shorter than 4 bytes");
    }
    Ok(ne_u32(payload))
}

/// The generic-netlink payload of a family message: the attributes after
/// the genl header.
fn genl_attributes(payload: &[u8]) -> Result<Vec<(u16, &[u8])>, &'static str> {
    if payload.len() < GENL_HDRLEN {
        return Err("a message shorter than the generic netlink header");
    }
    attributes(&payload[GENL_HDRLEN..])
}

/// The family id in a `CTRL_CMD_GETFAMILY` answer.
fn parse_family_id(payload: &[u8]) -> Result<u16, &'static str> {
    genl_attributes(payload)?
        .into_iter()
        .find(|(k, _)| *k == CTRL_ATTR_FAMILY_ID)
        .and_then(|(_, v)| (v.len() >= 2).then(|| ne_u16(v)))
        .ok_or("no family id in the controller's answer")
}

/// The index in an `NBD_CMD_CONNECT` answer.
fn parse_connect_reply(payload: &[u8]) -> Result<u32, &'static str> {
    let (_, v) = genl_attributes(payload)?
        .into_iter()
        .find(|(k, _)| *k == NBD_ATTR_INDEX)
        .ok_or("no device index in the answer")?;
    attr_u32(v)
}

/// The devices in an `NBD_CMD_STATUS` answer: (index, connected).
fn parse_status_reply(payload: &[u8]) -> Result<Vec<(u32, bool)>, &'static str> {
    let mut out = Vec::new();
    for (kind, list) in genl_attributes(payload)? {
        if kind != NBD_ATTR_DEVICE_LIST {
            continue;
        }
        for (kind, item) in attributes(list)? {
            if kind != NBD_DEVICE_ITEM {
                continue;
            }
            let mut index = None;
            let mut connected = None;
            for (kind, v) in attributes(item)? {
                match kind {
                    NBD_DEVICE_INDEX => index = Some(attr_u32(v)?),
                    NBD_DEVICE_CONNECTED => {
                        connected = Some(*v.first().ok_or("an empty u8 attribute")? != 0)
                    }
                    _ => {}
                }
            }
            match (index, connected) {
                (Some(i), Some(c)) => out.push((i, c)),
                _ => return Err("a device item without index or state"),
            }
        }
    }
    Ok(out)
}

/// The errno of an `NLMSG_ERROR` message (`struct nlmsgerr`: a negative
/// errno, or 0 for an acknowledgement, then the request's header).
fn parse_error(payload: &[u8]) -> Result<i32, &'static str> {
    if payload.len() < 4 {
        return Err("an error message shorter than its code");
    }
    Ok(ne_u32(payload) as i32)
}

// ------------------------------------------------------------------ errors --

/// Which request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Resolving the `"nbd"` family (`CTRL_CMD_GETFAMILY`).
    Family,
    Connect,
    Reconfigure,
    Disconnect,
    Status,
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Request::Family => "resolving the netlink family \"nbd\"",
            Request::Connect => "NBD_CMD_CONNECT",
            Request::Reconfigure => "NBD_CMD_RECONFIGURE",
            Request::Disconnect => "NBD_CMD_DISCONNECT",
            Request::Status => "NBD_CMD_STATUS",
        })
    }
}

#[derive(Debug)]
pub enum Error {
    /// The kernel has no `"nbd"` netlink family: the module is not loaded.
    NotLoaded,
    /// The netlink socket itself failed (creating, sending, receiving).
    Netlink {
        request: Request,
        what: &'static str,
        errno: Errno,
    },
    /// The kernel refused the request.
    Refused {
        request: Request,
        index: Option<u32>,
        errno: Errno,
    },
    /// The kernel's answer made no sense.
    BadReply {
        request: Request,
        problem: &'static str,
    },
    /// Settings refused before asking the kernel.
    Settings { problem: String },
    /// The kernel accepted a reconfigure but kept its old connection, which
    /// is still alive: another process serves the device.
    StillServed { index: u32 },
    /// No socket pair for the new connection.
    SocketPair(io::Error),
    /// `/sys/block/nbdN/queue/io_timeout` could not be written.
    IoTimeout { index: u32, source: io::Error },
}

fn device_name(index: Option<u32>) -> String {
    match index {
        Some(i) => format!("/dev/nbd{i}"),
        None => "the NBD device".to_owned(),
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotLoaded => write!(
                f,
                "the kernel NBD driver is not loaded (no netlink family \"nbd\"): run \
                 `modprobe nbd` (and add `nbd` to /etc/modules-load.d/ so it loads at boot)"
            ),
            Error::Netlink {
                request,
                what,
                errno,
            } => {
                write!(f, "{request}: {what} on the netlink socket failed: {errno}")?;
                if *errno == Errno::AGAIN {
                    write!(
                        f,
                        "; the kernel did not answer within {REPLY_TIMEOUT:?}; see dmesg"
                    )?;
                }
                Ok(())
            }
            Error::Refused {
                request,
                index,
                errno,
            } => {
                let dev = device_name(*index);
                write!(f, "{request} for {dev} refused by the kernel: {errno}; ")?;
                match (*request, *errno) {
                    (_, Errno::PERM) => {
                        write!(f, "configuring NBD devices needs root (CAP_SYS_ADMIN)")
                    }
                    (Request::Connect, Errno::BUSY) => write!(
                        f,
                        "{dev} is in use: already connected, or held open by some process \
                         (a mount, blkid, udev; see `fuser -v {dev}`); nothing was changed; \
                         disconnect it or pick another index"
                    ),
                    (Request::Connect, _) => write!(
                        f,
                        "the kernel took none of it (size, block size, or a socket that is not \
                         a TCP or unix stream socket); see dmesg"
                    ),
                    (Request::Reconfigure, Errno::INVAL) => write!(
                        f,
                        "{dev} is not connected over netlink (never connected, disconnected, or \
                         attached with the ioctl interface), or its backend identifier differs \
                         (cat /sys/block/nbdN/backend); nothing was changed; see dmesg"
                    ),
                    (Request::Disconnect, Errno::INVAL) => {
                        write!(f, "there is no device {dev}")
                    }
                    _ => write!(f, "nothing was changed; see dmesg"),
                }
            }
            Error::BadReply { request, problem } => write!(
                f,
                "{request}: the kernel's answer is malformed ({problem}); the request may \
                 have taken effect: check with `cat /sys/block/nbd*/pid`"
            ),
            Error::Settings { problem } => {
                write!(
                    f,
                    "NBD device settings refused: {problem}; nothing was changed"
                )
            }
            Error::StillServed { index } => write!(
                f,
                "/dev/nbd{index} still has a live connection (another process serves it); the \
                 kernel kept it and dropped the new one; stop that process first"
            ),
            Error::SocketPair(e) => write!(
                f,
                "cannot make a socket pair for the NBD connection: {e}; nothing was changed"
            ),
            Error::IoTimeout { index, source } => write!(
                f,
                "cannot set /sys/block/nbd{index}/queue/io_timeout: {source}; is /sys mounted \
                 and are we root? /dev/nbd{index} was left as it was"
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Netlink { errno, .. } | Error::Refused { errno, .. } => Some(errno),
            Error::SocketPair(e) | Error::IoTimeout { source: e, .. } => Some(e),
            _ => None,
        }
    }
}

// --------------------------------------------------------------- transport --

/// A generic-netlink socket with the `"nbd"` family resolved.
struct Genl {
    fd: OwnedFd,
    family: u16,
    seq: u32,
}

/// How one request ended.
enum Failure {
    Socket(&'static str, Errno),
    Kernel(Errno),
    Bad(&'static str),
}

impl Genl {
    fn open(request: Request) -> Result<Genl, Error> {
        let socket_error = |what| {
            move |errno| Error::Netlink {
                request,
                what,
                errno,
            }
        };
        let fd = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            Some(netlink::GENERIC),
        )
        .map_err(socket_error("creating"))?;
        // Port id 0: the kernel picks a unique one for this socket.
        rustix::net::bind(&fd, &SocketAddrNetlink::new(0, 0)).map_err(socket_error("binding"))?;
        rustix::net::sockopt::set_socket_timeout(
            &fd,
            rustix::net::sockopt::Timeout::Recv,
            Some(REPLY_TIMEOUT),
        )
        .map_err(socket_error("setting the receive timeout"))?;
        let mut genl = Genl {
            fd,
            family: GENL_ID_CTRL,
            seq: 0,
        };
        let mut msg = genl.message(CTRL_CMD_GETFAMILY, CTRL_VERSION);
        msg.string(CTRL_ATTR_FAMILY_NAME, NBD_GENL_FAMILY_NAME);
        let replies = match genl.transact(msg) {
            Ok(r) => r,
            // The controller answers ENOENT for a family nobody registered.
            Err(Failure::Kernel(Errno::NOENT)) => return Err(Error::NotLoaded),
            Err(f) => return Err(failure(request, None, f)),
        };
        let reply = replies.first().ok_or(Error::BadReply {
            request,
            problem: "no answer from the controller",
        })?;
        genl.family =
            parse_family_id(reply).map_err(|problem| Error::BadReply { request, problem })?;
        Ok(genl)
    }

    fn message(&mut self, cmd: u8, version: u8) -> Message {
        self.seq = self.seq.wrapping_add(1);
        Message::new(
            self.family,
            NLM_F_REQUEST | NLM_F_ACK,
            self.seq,
            cmd,
            version,
        )
    }

    /// Sends one request and returns the payloads of the kernel's answers to
    /// it, up to its acknowledgement.
    fn transact(&mut self, msg: Message) -> Result<Vec<Vec<u8>>, Failure> {
        let bytes = msg.finish();
        let seq = self.seq;
        let sent = rustix::net::sendto(
            &self.fd,
            &bytes,
            SendFlags::empty(),
            &SocketAddrNetlink::new(0, 0),
        )
        .map_err(|e| Failure::Socket("sending", e))?;
        if sent != bytes.len() {
            return Err(Failure::Socket("sending", Errno::MSGSIZE));
        }
        let mut replies = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let (n, _) = match rustix::net::recv(&self.fd, &mut buf[..], RecvFlags::empty()) {
                Ok(r) => r,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(Failure::Socket("receiving", e)),
            };
            for m in split_messages(&buf[..n]).map_err(Failure::Bad)? {
                // Answers to an earlier request that timed out are not ours.
                if m.seq != seq {
                    continue;
                }
                match m.kind {
                    NLMSG_ERROR => {
                        let code = parse_error(m.payload).map_err(Failure::Bad)?;
                        return if code == 0 {
                            Ok(replies)
                        } else {
                            Err(Failure::Kernel(Errno::from_raw_os_error(
                                code.saturating_neg(),
                            )))
                        };
                    }
                    NLMSG_DONE => return Ok(replies),
                    NLMSG_NOOP => {}
                    kind if kind == self.family => replies.push(m.payload.to_vec()),
                    _ => {}
                }
            }
        }
    }
}

fn failure(request: Request, index: Option<u32>, f: Failure) -> Error {
    match f {
        Failure::Socket(what, errno) => Error::Netlink {
            request,
            what,
            errno,
        },
        Failure::Kernel(errno) => Error::Refused {
            request,
            index,
            errno,
        },
        Failure::Bad(problem) => Error::BadReply { request, problem },
    }
}

fn whole_seconds(d: Duration) -> u64 {
    // Round up: a timeout asked for must not become shorter (or 0 = none).
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn check_backend(backend: Option<&str>) -> Result<(), Error> {
    match backend {
        Some(b) if b.is_empty() || b.len() > MAX_BACKEND_LEN || b.contains('\0') => {
            Err(Error::Settings {
                problem: format!(
                    "the backend identifier must be 1 to {MAX_BACKEND_LEN} bytes without NUL"
                ),
            })
        }
        _ => Ok(()),
    }
}

fn check_fd(fd: BorrowedFd<'_>) -> Result<u32, Error> {
    u32::try_from(fd.as_raw_fd()).map_err(|_| Error::Settings {
        problem: "a socket descriptor is negative".into(),
    })
}

// -------------------------------------------------------------- requests --

/// What `NBD_CMD_CONNECT` is told.
#[derive(Debug, Clone, Copy)]
pub struct Connect<'a> {
    /// `/dev/nbdN` to use, or `None` for any free one (the kernel creates a
    /// new device when none is free).
    pub index: Option<u32>,
    /// The connected sockets (TCP or unix stream), one per connection; more
    /// than one needs `NBD_FLAG_CAN_MULTI_CONN` in `server_flags`.
    pub sockets: &'a [BorrowedFd<'a>],
    /// Size in bytes, a multiple of `block_size`.
    pub size: u64,
    /// A power of two from 512 to 4096.
    pub block_size: u32,
    /// NBD transmission flags (`NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH |
    /// ...`).
    pub server_flags: u16,
    /// `NBD_ATTR_TIMEOUT`: see the module docs before setting it.
    pub request_timeout: Option<Duration>,
    /// `NBD_ATTR_DEAD_CONN_TIMEOUT`: how long requests wait for a new
    /// connection after the server's died (whole seconds, rounded up).
    pub dead_conn_timeout: Option<Duration>,
    /// `NBD_ATTR_BACKEND_IDENTIFIER`: names the backend; a reconfigure must
    /// then give the same one.
    pub backend: Option<&'a str>,
}

fn check_geometry(size: u64, block_size: u32) -> Result<(), Error> {
    let problem = if !(512..=4096).contains(&block_size) || !block_size.is_power_of_two() {
        "the block size must be a power of two from 512 to 4096"
    } else if size == 0 {
        "the size must not be zero"
    } else if !size.is_multiple_of(u64::from(block_size)) {
        "the size must be a multiple of the block size"
    } else if i64::try_from(size).is_err() {
        "the size is beyond what the kernel takes"
    } else {
        return Ok(());
    };
    Err(Error::Settings {
        problem: format!("size {size} bytes, block size {block_size}: {problem}"),
    })
}

/// `NBD_CMD_CONNECT`: serves a device from the given sockets and returns
/// its index. The kernel takes its own reference to each socket; the caller
/// may close its descriptors afterwards.
pub fn connect(c: &Connect<'_>) -> Result<u32, Error> {
    check_geometry(c.size, c.block_size)?;
    check_backend(c.backend)?;
    if c.sockets.is_empty() {
        return Err(Error::Settings {
            problem: "at least one socket is needed".into(),
        });
    }
    let fds = c
        .sockets
        .iter()
        .map(|fd| check_fd(*fd))
        .collect::<Result<Vec<_>, _>>()?;
    let request = Request::Connect;
    let mut genl = Genl::open(request)?;
    let mut msg = genl.message(NBD_CMD_CONNECT, NBD_GENL_VERSION);
    if let Some(i) = c.index {
        msg.u32(NBD_ATTR_INDEX, i);
    }
    msg.u64(NBD_ATTR_SIZE_BYTES, c.size);
    msg.u64(NBD_ATTR_BLOCK_SIZE_BYTES, u64::from(c.block_size));
    msg.u64(NBD_ATTR_SERVER_FLAGS, u64::from(c.server_flags));
    // Neither destroy-on-disconnect nor disconnect-on-close: the device
    // must outlive this process and any descriptor of it.
    msg.u64(NBD_ATTR_CLIENT_FLAGS, 0);
    if let Some(t) = c.request_timeout {
        msg.u64(NBD_ATTR_TIMEOUT, whole_seconds(t));
    }
    if let Some(t) = c.dead_conn_timeout {
        msg.u64(NBD_ATTR_DEAD_CONN_TIMEOUT, whole_seconds(t));
    }
    if let Some(b) = c.backend {
        msg.string(NBD_ATTR_BACKEND_IDENTIFIER, b);
    }
    let socks = msg.nest_start(NBD_ATTR_SOCKETS);
    for fd in fds {
        let item = msg.nest_start(NBD_SOCK_ITEM);
        msg.u32(NBD_SOCK_FD, fd);
        msg.nest_end(item);
    }
    msg.nest_end(socks);
    let replies = genl
        .transact(msg)
        .map_err(|f| failure(request, c.index, f))?;
    let reply = replies.first().ok_or(Error::BadReply {
        request,
        problem: "no device index in the answer",
    })?;
    parse_connect_reply(reply).map_err(|problem| Error::BadReply { request, problem })
}

/// `NBD_CMD_RECONFIGURE`: gives device `index` a new connection in place of
/// its dead one (the kernel then sends the waiting requests on it), and/or a
/// new dead-connection timeout.
///
/// The kernel answers success but ignores the socket when no connection of
/// the device is dead (see the module docs); [`NetlinkNbd::reconnect`]
/// detects that.
pub fn reconfigure(
    index: u32,
    socket: Option<BorrowedFd<'_>>,
    dead_conn_timeout: Option<Duration>,
    backend: Option<&str>,
) -> Result<(), Error> {
    check_backend(backend)?;
    let fd = socket.map(check_fd).transpose()?;
    let request = Request::Reconfigure;
    let mut genl = Genl::open(request)?;
    let mut msg = genl.message(NBD_CMD_RECONFIGURE, NBD_GENL_VERSION);
    msg.u32(NBD_ATTR_INDEX, index);
    // Also clears a disconnect-on-close someone else may have set.
    msg.u64(NBD_ATTR_CLIENT_FLAGS, 0);
    if let Some(t) = dead_conn_timeout {
        msg.u64(NBD_ATTR_DEAD_CONN_TIMEOUT, whole_seconds(t));
    }
    if let Some(b) = backend {
        msg.string(NBD_ATTR_BACKEND_IDENTIFIER, b);
    }
    if let Some(fd) = fd {
        let socks = msg.nest_start(NBD_ATTR_SOCKETS);
        let item = msg.nest_start(NBD_SOCK_ITEM);
        msg.u32(NBD_SOCK_FD, fd);
        msg.nest_end(item);
        msg.nest_end(socks);
    }
    genl.transact(msg)
        .map(drop)
        .map_err(|f| failure(request, Some(index), f))
}

/// `NBD_CMD_DISCONNECT`: the kernel sends `NBD_CMD_DISC`, shuts the
/// connections down and fails what is in flight. Success also when the
/// device was not connected.
pub fn disconnect(index: u32) -> Result<(), Error> {
    let request = Request::Disconnect;
    let mut genl = Genl::open(request)?;
    let mut msg = genl.message(NBD_CMD_DISCONNECT, NBD_GENL_VERSION);
    msg.u32(NBD_ATTR_INDEX, index);
    genl.transact(msg)
        .map(drop)
        .map_err(|f| failure(request, Some(index), f))
}

/// What `NBD_CMD_STATUS` says about one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// No `/dev/nbdN` with that index.
    NoDevice,
    /// The device has no configuration: free to connect.
    Free,
    /// The device has a configuration: connected, or its connection died
    /// and it waits for a new one, or something holds it open. Not proof of
    /// a live server (see the module docs).
    Connected,
}

/// `NBD_CMD_STATUS` for one device.
pub fn status(index: u32) -> Result<Status, Error> {
    let request = Request::Status;
    let mut genl = Genl::open(request)?;
    let mut msg = genl.message(NBD_CMD_STATUS, NBD_GENL_VERSION);
    msg.u32(NBD_ATTR_INDEX, index);
    let replies = genl
        .transact(msg)
        .map_err(|f| failure(request, Some(index), f))?;
    let mut state = Status::NoDevice;
    for reply in &replies {
        let devices =
            parse_status_reply(reply).map_err(|problem| Error::BadReply { request, problem })?;
        for (i, connected) in devices {
            if i == index {
                state = if connected {
                    Status::Connected
                } else {
                    Status::Free
                };
            }
        }
    }
    Ok(state)
}

/// Sets how long the block layer lets a request of `/dev/nbdN` run before
/// the driver looks at it again (`/sys/block/nbdN/queue/io_timeout`, in
/// milliseconds). With no `NBD_ATTR_TIMEOUT` this fails and cuts off
/// nothing: it bounds how long a request that was in flight when the server
/// died waits, after a reconnect, before it is resent; a request that is
/// merely slow costs one "Possible stuck request" line in dmesg per period.
pub fn set_io_timeout(index: u32, timeout: Duration) -> Result<(), Error> {
    let ms = timeout.as_millis().max(1);
    std::fs::write(
        format!("/sys/block/nbd{index}/queue/io_timeout"),
        format!("{ms}\n"),
    )
    .map_err(|source| Error::IoTimeout { index, source })
}

// ------------------------------------------------------------- the device --

/// What the kernel is told about a device served through a unix socket
/// pair, at attach and at every reconnect.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Size in bytes, a multiple of `block_size`.
    pub size: u64,
    /// A power of two from 512 to 4096.
    pub block_size: u32,
    /// NBD transmission flags.
    pub flags: u16,
    /// How long requests wait for a new connection when the server's died
    /// before they fail. Zero: they fail at once.
    pub dead_conn_timeout: Duration,
    /// `NBD_ATTR_TIMEOUT`; `None` (no request ever fails for being slow) is
    /// what hadb wants: see the module docs.
    pub request_timeout: Option<Duration>,
    /// How long a request that was in flight when the server died waits,
    /// after a reconnect, before the kernel resends it (see
    /// [`set_io_timeout`]); set at attach and at every reconnect. `None`
    /// leaves the device's current value (30 s on a fresh device).
    pub io_timeout: Option<Duration>,
    /// Names the backend (e.g. `hadb:/dev/sdc1`) in
    /// `/sys/block/nbdN/backend`; reconnects must give the same one, so no
    /// other tool's server is reattached by mistake, nor ours to theirs.
    pub backend: Option<String>,
}

/// An NBD device connected over netlink, served through unix socket pairs
/// whose other ends this module hands back to the caller.
///
/// Dropping it changes nothing in the kernel: the device stays connected
/// (and, once its server is gone, waits for a new connection for
/// `dead_conn_timeout`). Only [`NetlinkNbd::detach`] disconnects it.
#[derive(Debug)]
pub struct NetlinkNbd {
    index: u32,
    settings: Settings,
}

impl NetlinkNbd {
    /// Connects a device (`index`, or any free one) to a new socket pair and
    /// returns it with the server's end, on which the kernel's requests
    /// (transmission phase only) arrive.
    pub fn attach(
        index: Option<u32>,
        settings: &Settings,
    ) -> Result<(NetlinkNbd, UnixStream), Error> {
        let (server, kernel) = UnixStream::pair().map_err(Error::SocketPair)?;
        let kernel = OwnedFd::from(kernel);
        let index = connect(&Connect {
            index,
            sockets: &[kernel.as_fd()],
            size: settings.size,
            block_size: settings.block_size,
            server_flags: settings.flags,
            request_timeout: settings.request_timeout,
            dead_conn_timeout: Some(settings.dead_conn_timeout),
            backend: settings.backend.as_deref(),
        })?;
        if let Some(t) = settings.io_timeout {
            // Only now is the index known (with `index` None). Undo the
            // connect rather than hand back a device set up half-way.
            if let Err(e) = set_io_timeout(index, t) {
                let _ = disconnect(index);
                return Err(e);
            }
        }
        Ok((
            NetlinkNbd {
                index,
                settings: settings.clone(),
            },
            server,
        ))
    }

    /// Takes over device `index`, whose server died (an earlier process of
    /// ours), and gives it a new connection: the waiting requests go out on
    /// the returned server end.
    pub fn reattach(index: u32, settings: &Settings) -> Result<(NetlinkNbd, UnixStream), Error> {
        let nbd = NetlinkNbd {
            index,
            settings: settings.clone(),
        };
        let server = nbd.reconnect()?;
        Ok((nbd, server))
    }

    /// Gives the device a new connection in place of its dead one and
    /// returns the server's end. Fails with [`Error::StillServed`] (and
    /// changes nothing) when the old connection is still alive.
    pub fn reconnect(&self) -> Result<UnixStream, Error> {
        let (server, kernel) = UnixStream::pair().map_err(Error::SocketPair)?;
        // Before the new connection: the requests stuck on the dead one are
        // resent when their timer fires after it.
        if let Some(t) = self.settings.io_timeout {
            set_io_timeout(self.index, t)?;
        }
        let kernel = OwnedFd::from(kernel);
        reconfigure(
            self.index,
            Some(kernel.as_fd()),
            Some(self.settings.dead_conn_timeout),
            self.settings.backend.as_deref(),
        )?;
        // Whether the kernel kept its end: with ours closed, a socket the
        // kernel dropped has no holder left, and the server's end reads EOF
        // at once; one the kernel kept has nothing to read yet, or already
        // a request.
        drop(kernel);
        let mut probe = [0u8; 1];
        match rustix::net::recv(
            &server,
            &mut probe[..],
            RecvFlags::PEEK | RecvFlags::DONTWAIT,
        ) {
            Ok((0, _)) => Err(Error::StillServed { index: self.index }),
            Ok(_) | Err(Errno::AGAIN) => Ok(server),
            Err(errno) => Err(Error::Netlink {
                request: Request::Reconfigure,
                what: "checking the new connection",
                errno,
            }),
        }
    }

    /// Disconnects the device (see [`disconnect`]): requests in flight
    /// fail, a filesystem still mounted on it sees I/O errors.
    pub fn detach(self) -> Result<(), Error> {
        disconnect(self.index)
    }

    /// What the kernel says about the device.
    pub fn status(&self) -> Result<Status, Error> {
        status(self.index)
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    /// `/dev/nbdN`.
    pub fn device(&self) -> PathBuf {
        PathBuf::from(format!("/dev/nbd{}", self.index))
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs_of(msg: &[u8]) -> Vec<(u16, Vec<u8>)> {
        attributes(&msg[NLMSG_HDRLEN + GENL_HDRLEN..])
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.to_vec()))
            .collect()
    }

    #[test]
    fn builds_a_connect_message_field_by_field() {
        let mut msg = Message::new(0x1234, NLM_F_REQUEST | NLM_F_ACK, 7, NBD_CMD_CONNECT, 1);
        msg.u32(NBD_ATTR_INDEX, 3);
        msg.u64(NBD_ATTR_SIZE_BYTES, 1 << 30);
        msg.string(NBD_ATTR_BACKEND_IDENTIFIER, "hadb");
        let socks = msg.nest_start(NBD_ATTR_SOCKETS);
        let item = msg.nest_start(NBD_SOCK_ITEM);
        msg.u32(NBD_SOCK_FD, 9);
        msg.nest_end(item);
        msg.nest_end(socks);
        let b = msg.finish();

        // nlmsghdr
        assert_eq!(ne_u32(&b[0..4]) as usize, b.len());
        assert_eq!(ne_u16(&b[4..6]), 0x1234);
        assert_eq!(ne_u16(&b[6..8]), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(ne_u32(&b[8..12]), 7);
        assert_eq!(ne_u32(&b[12..16]), 0);
        // genlmsghdr
        assert_eq!(&b[16..20], &[NBD_CMD_CONNECT, 1, 0, 0]);
        // Attributes: 8 + 12 + 12 (4 + "hadb\0", padded) + 16 (nest).
        assert_eq!(b.len(), 20 + 8 + 12 + 12 + 16);
        assert_eq!(
            (ne_u16(&b[20..22]), ne_u16(&b[22..24])),
            (8, NBD_ATTR_INDEX)
        );
        let a = attrs_of(&b);
        assert_eq!(a[0], (NBD_ATTR_INDEX, 3u32.to_ne_bytes().to_vec()));
        assert_eq!(
            a[1],
            (NBD_ATTR_SIZE_BYTES, (1u64 << 30).to_ne_bytes().to_vec())
        );
        assert_eq!(a[2], (NBD_ATTR_BACKEND_IDENTIFIER, b"hadb\0".to_vec()));
        assert_eq!(a[3].0, NBD_ATTR_SOCKETS);
        // The nest carries NLA_F_NESTED on the wire.
        assert_eq!(ne_u16(&b[54..56]), NBD_ATTR_SOCKETS | NLA_F_NESTED);
        let items = attributes(&a[3].1).unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].0, NBD_SOCK_ITEM);
        let fd = attributes(items[0].1).unwrap();
        assert_eq!(fd, vec![(NBD_SOCK_FD, &9u32.to_ne_bytes()[..])]);
    }

    /// A kernel answer: nlmsghdr + genl header + attributes.
    fn answer(kind: u16, seq: u32, cmd: u8, attrs: &[u8]) -> Vec<u8> {
        let mut m = Message::new(kind, 0, seq, cmd, 1);
        m.buf.extend_from_slice(attrs);
        m.finish()
    }

    fn ack(seq: u32, code: i32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&36u32.to_ne_bytes());
        b.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&code.to_ne_bytes());
        b.extend_from_slice(&[0u8; 16]); // the request's header
        b
    }

    #[test]
    fn parses_answers_and_acks_in_one_datagram() {
        let mut attrs = Message::new(0, 0, 0, 0, 0);
        attrs.u32(NBD_ATTR_INDEX, 5);
        let attrs = attrs.buf[NLMSG_HDRLEN + GENL_HDRLEN..].to_vec();
        let mut dgram = answer(0x20, 4, NBD_CMD_CONNECT, &attrs);
        dgram.extend_from_slice(&ack(4, 0));
        let msgs = split_messages(&dgram).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].kind, 0x20);
        assert_eq!(parse_connect_reply(msgs[0].payload), Ok(5));
        assert_eq!(msgs[1].kind, NLMSG_ERROR);
        assert_eq!(parse_error(msgs[1].payload), Ok(0));
        assert_eq!(parse_error(&ack(4, -16)[NLMSG_HDRLEN..]), Ok(-16));
    }

    #[test]
    fn parses_a_status_answer() {
        let mut m = Message::new(0, 0, 0, 0, 0);
        let list = m.nest_start(NBD_ATTR_DEVICE_LIST);
        for (i, c) in [(0u32, 1u8), (1, 0)] {
            let item = m.nest_start(NBD_DEVICE_ITEM);
            m.u32(NBD_DEVICE_INDEX, i);
            m.attr(NBD_DEVICE_CONNECTED, &[c]);
            m.nest_end(item);
        }
        m.nest_end(list);
        let payload = &m.buf[NLMSG_HDRLEN..];
        assert_eq!(parse_status_reply(payload), Ok(vec![(0, true), (1, false)]));
    }

    #[test]
    fn parses_the_family_id() {
        let mut m = Message::new(0, 0, 0, 0, 0);
        m.string(CTRL_ATTR_FAMILY_NAME, "nbd");
        m.attr(CTRL_ATTR_FAMILY_ID, &0x1au16.to_ne_bytes());
        assert_eq!(parse_family_id(&m.buf[NLMSG_HDRLEN..]), Ok(0x1a));
        let empty = Message::new(0, 0, 0, 0, 0);
        assert!(parse_family_id(&empty.buf[NLMSG_HDRLEN..]).is_err());
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        // Every truncation and every corrupted length of a real answer.
        let mut m = Message::new(0, 0, 0, 0, 0);
        let list = m.nest_start(NBD_ATTR_DEVICE_LIST);
        let item = m.nest_start(NBD_DEVICE_ITEM);
        m.u32(NBD_DEVICE_INDEX, 0);
        m.attr(NBD_DEVICE_CONNECTED, &[1]);
        m.nest_end(item);
        m.nest_end(list);
        let good = m.finish();
        for cut in 0..good.len() {
            let _ = split_messages(&good[..cut]);
            let _ = parse_status_reply(&good[NLMSG_HDRLEN.min(cut)..cut]);
            let _ = parse_connect_reply(&good[NLMSG_HDRLEN.min(cut)..cut]);
            let _ = parse_family_id(&good[NLMSG_HDRLEN.min(cut)..cut]);
            let _ = parse_error(&good[NLMSG_HDRLEN.min(cut)..cut]);
        }
        for at in 0..good.len() {
            for v in [0u8, 1, 3, 4, 0xff] {
                let mut bad = good.clone();
                bad[at] = v;
                if let Ok(msgs) = split_messages(&bad) {
                    for msg in msgs {
                        let _ = parse_status_reply(msg.payload);
                    }
                }
            }
        }
        assert!(split_messages(&good[..10]).is_err());
        let mut long = good.clone();
        long[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(split_messages(&long).is_err());
    }

    #[test]
    fn refuses_bad_settings_before_asking_the_kernel() {
        let (a, _b) = UnixStream::pair().unwrap();
        let fd = OwnedFd::from(a);
        for (size, bs) in [(0, 512), (1 << 20, 1000), (1 << 20, 8192), (4097, 4096)] {
            let c = Connect {
                index: Some(0),
                sockets: &[fd.as_fd()],
                size,
                block_size: bs,
                server_flags: 1,
                request_timeout: None,
                dead_conn_timeout: None,
                backend: None,
            };
            match connect(&c) {
                Err(Error::Settings { .. }) => {}
                other => panic!("size {size} block {bs}: {other:?}"),
            }
        }
        let c = Connect {
            index: None,
            sockets: &[],
            size: 1 << 20,
            block_size: 4096,
            server_flags: 1,
            request_timeout: None,
            dead_conn_timeout: None,
            backend: None,
        };
        assert!(matches!(connect(&c), Err(Error::Settings { .. })));
        assert!(matches!(
            reconfigure(0, None, None, Some("")),
            Err(Error::Settings { .. })
        ));
    }

    #[test]
    fn timeouts_round_up_to_whole_seconds() {
        assert_eq!(whole_seconds(Duration::ZERO), 0);
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_secs(30)), 30);
        assert_eq!(whole_seconds(Duration::from_millis(30_500)), 31);
    }

    /// Against the running kernel: without the nbd module (the build hosts
    /// have none) the answer must say `modprobe nbd`; with it, a status.
    #[test]
    fn asks_the_kernel_for_the_family() {
        match status(0) {
            Err(Error::NotLoaded) => {
                assert!(Error::NotLoaded.to_string().contains("modprobe nbd"));
            }
            Ok(_) => {}
            // A sandbox without netlink sockets: nothing to learn here.
            Err(Error::Netlink { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn messages_name_the_device_and_the_way_out() {
        let busy = Error::Refused {
            request: Request::Connect,
            index: Some(2),
            errno: Errno::BUSY,
        };
        let s = busy.to_string();
        assert!(s.contains("/dev/nbd2") && s.contains("in use"), "{s}");
        let inval = Error::Refused {
            request: Request::Reconfigure,
            index: Some(0),
            errno: Errno::INVAL,
        }
        .to_string();
        assert!(inval.contains("not connected over netlink"), "{inval}");
        let perm = Error::Refused {
            request: Request::Status,
            index: None,
            errno: Errno::PERM,
        }
        .to_string();
        assert!(perm.contains("root"), "{perm}");
    }
}
