//! A minimal NBD server for one file or block device, served to the local
//! kernel through `hadb::sys::nbd_netlink` (or the ioctl interface), to
//! test the kernel side on its own: that `/dev/nbdN` survives the death of
//! the process serving it, and that a new process can take it over.
//! `tests/vm_nbd_reconnect.rs` runs it inside a VM; it is not part of hadb.
//!
//! ```text
//! nbd_file_server /dev/vdb --index 0 --dead-conn-timeout 30   # connect, serve
//! kill -9 <pid>                                               # the device waits
//! nbd_file_server /dev/vdb --index 0 --reattach               # serve it again
//! nbd_file_server --index 0 --disconnect
//! ```
//!
//! One request at a time, blocking I/O, no replication: the protocol pieces
//! are hadb's own (`hadb::core::nbd`). It prints `serving /dev/nbdN` on
//! stdout once the kernel has the connection, and logs one line per event
//! on stderr.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use argh::FromArgs;
use hadb::core::nbd as proto;
use hadb::sys::nbd_kernel::KernelNbd;
use hadb::sys::nbd_netlink::{self, NetlinkNbd, Settings};

/// Serve a file or block device as /dev/nbdN (a test tool for the kernel side).
#[derive(FromArgs)]
struct Args {
    /// the file or block device to serve
    #[argh(positional)]
    backing: Option<PathBuf>,
    /// index N of /dev/nbdN to use (default: any free one)
    #[argh(option)]
    index: Option<u32>,
    /// seconds the kernel lets requests wait for a new server once this one
    /// is gone (0: they fail at once)
    #[argh(option, default = "0")]
    dead_conn_timeout: u64,
    /// milliseconds for /sys/block/nbdN/queue/io_timeout: how long a request
    /// in flight when the server died waits, after a reconnect, to be resent
    /// (netlink only; default: leave the device's value, 30 s when new)
    #[argh(option)]
    io_timeout_ms: Option<u64>,
    /// take over a device whose server died instead of connecting a new one
    #[argh(switch)]
    reattach: bool,
    /// use the ioctl interface (NBD_DO_IT) instead of netlink
    #[argh(switch)]
    ioctl: bool,
    /// disconnect the device and exit
    #[argh(switch)]
    disconnect: bool,
    /// print what NBD_CMD_STATUS says about the device and exit
    #[argh(switch)]
    status: bool,
    /// once this file exists, read requests but answer none (logging each
    /// one): a server that dies holding unanswered requests
    #[argh(option)]
    hold_when: Option<PathBuf>,
}

/// The backend identifier this tool gives its devices; a reattach must
/// name the same.
fn backend_id(backing: &Path) -> String {
    format!("nbd_file_server:{}", backing.display())
}

fn log(msg: &str) {
    eprintln!("nbd_file_server[{}]: {msg}", std::process::id());
}

fn main() -> ExitCode {
    let args: Args = argh::from_env();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log(&format!("error: {e}"));
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    if args.status || args.disconnect {
        let index = args.index.ok_or("--status and --disconnect need --index")?;
        if args.disconnect {
            nbd_netlink::disconnect(index).map_err(|e| e.to_string())?;
            log(&format!("/dev/nbd{index} disconnected"));
        } else {
            let st = nbd_netlink::status(index).map_err(|e| e.to_string())?;
            println!("{st:?}");
        }
        return Ok(());
    }
    let backing = args.backing.clone().ok_or("name the file to serve")?;
    // As hadb does: this process serves the kernel's own block device, so
    // it must not wait for that device's writeback to free memory.
    hadb::sys::memory::protect_from_writeback_deadlock().map_err(|e| e.to_string())?;

    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&backing)
        .map_err(|e| format!("cannot open {}: {e}", backing.display()))?;
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(|e| format!("cannot find the size of {}: {e}", backing.display()))?;
    let size = size - size % 4096;
    let flags = proto::TFLAG_HAS_FLAGS | proto::TFLAG_SEND_FLUSH | proto::TFLAG_SEND_FUA;

    // Kept alive while serving: with the ioctl interface, its thread in
    // NBD_DO_IT is what keeps the device up.
    let mut _ioctl_device = None;
    let (index, sock) = if args.ioctl {
        let index = args.index.ok_or("--ioctl needs --index")?;
        let device = PathBuf::from(format!("/dev/nbd{index}"));
        let (server, kernel) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
        let k = KernelNbd::attach(&device, kernel.into(), size, 4096, flags)
            .map_err(|e| e.to_string())?;
        _ioctl_device = Some(k);
        (index, server)
    } else {
        let settings = Settings {
            size,
            block_size: 4096,
            flags,
            dead_conn_timeout: Duration::from_secs(args.dead_conn_timeout),
            request_timeout: None,
            io_timeout: args.io_timeout_ms.map(Duration::from_millis),
            backend: Some(backend_id(&backing)),
        };
        let (nbd, sock) = if args.reattach {
            let index = args.index.ok_or("--reattach needs --index")?;
            NetlinkNbd::reattach(index, &settings)
        } else {
            NetlinkNbd::attach(args.index, &settings)
        }
        .map_err(|e| e.to_string())?;
        (nbd.index(), sock)
    };
    let how = match (args.ioctl, args.reattach) {
        (true, _) => "ioctl",
        (false, true) => "netlink, reattached",
        (false, false) => "netlink",
    };
    log(&format!(
        "serving {} ({size} bytes) as /dev/nbd{index} ({how})",
        backing.display()
    ));
    println!("serving /dev/nbd{index}");
    let _ = io::stdout().flush();
    let served = serve(&mut file, size, sock, args.hold_when.as_deref())
        .map_err(|e| format!("serving: {e}"))?;
    log(&format!("connection ended after {served} requests"));
    Ok(())
}

/// Answers the kernel's requests until it disconnects; returns how many.
/// Once `hold_when` exists, requests are read and logged but not answered.
fn serve(
    file: &mut File,
    size: u64,
    sock: UnixStream,
    hold_when: Option<&Path>,
) -> io::Result<u64> {
    let mut input = io::BufReader::new(sock.try_clone()?);
    let mut output = sock;
    let mut buf = Vec::new();
    let mut served = 0u64;
    let started = Instant::now();
    loop {
        let mut hdr = [0u8; proto::REQUEST_LEN];
        match input.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(served),
            Err(e) => return Err(e),
        }
        let req = proto::parse_request(&hdr).map_err(io::Error::other)?;
        if served == 0 {
            log(&format!(
                "first request after {:?}: command {} offset {} length {}",
                started.elapsed(),
                req.command,
                req.offset,
                req.length
            ));
        }
        served += 1;
        if hold_when.is_some_and(Path::exists) {
            if req.command == proto::CMD_WRITE {
                io::copy(
                    &mut (&mut input).take(u64::from(req.length)),
                    &mut io::sink(),
                )?;
            }
            log(&format!(
                "holding request: command {} offset {} length {}",
                req.command, req.offset, req.length
            ));
            continue;
        }
        let error = match proto::validate(&req, size, true) {
            Err(refusal) => {
                io::copy(&mut (&mut input).take(refusal.drain), &mut io::sink())?;
                log(&format!("refused a request: {}", refusal.reason));
                refusal.errno
            }
            Ok(proto::Command::Disconnect) => return Ok(served),
            Ok(proto::Command::Read { offset, length }) => {
                buf.resize(length as usize, 0);
                match file.read_exact_at(&mut buf, offset) {
                    Ok(()) => {
                        output.write_all(&proto::simple_reply(0, req.cookie))?;
                        output.write_all(&buf)?;
                        continue;
                    }
                    Err(_) => proto::EIO,
                }
            }
            Ok(proto::Command::Write {
                offset,
                length,
                fua,
            }) => {
                buf.resize(length as usize, 0);
                input.read_exact(&mut buf)?;
                match file
                    .write_all_at(&buf, offset)
                    .and_then(|()| if fua { file.sync_data() } else { Ok(()) })
                {
                    Ok(()) => 0,
                    Err(_) => proto::EIO,
                }
            }
            Ok(proto::Command::Flush) => match file.sync_data() {
                Ok(()) => 0,
                Err(_) => proto::EIO,
            },
            // Not offered (no SEND_TRIM / SEND_WRITE_ZEROES flag).
            Ok(proto::Command::Trim { .. } | proto::Command::WriteZeroes { .. }) => proto::ENOTSUP,
        };
        output.write_all(&proto::simple_reply(error, req.cookie))?;
    }
}
