//! The NBD server: on a unix socket for userspace tools, and on one end of
//! a socket pair for the kernel's NBD driver (transmission phase only).
//! Reads go straight to the backing store; writes, zeroes and flushes go
//! through the volume task so they are replicated in order.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use smol::channel::Sender;
use smol::future::FutureExt;
use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};

use crate::core::nbd::{self, Command};
use crate::core::replica;
use crate::run::stats::Stats;
use crate::run::volume::{Event, Shared};

/// Export names a client may ask for: the default one and "volume".
fn known_export(name: &str) -> bool {
    name.is_empty() || name == "volume"
}

pub struct Server {
    pub events: Sender<Event>,
    pub shared: Arc<Shared>,
    pub reader: Arc<File>,
}

/// One reply for the connection's writer; the volume task sends these
/// directly for the requests it completes.
pub struct Reply {
    pub cookie: u64,
    pub error: u32,
    pub data: Option<Vec<u8>>,
}

#[derive(Debug)]
enum Stop {
    Io(std::io::Error),
    Protocol(String),
    Done,
    /// A client of the primary, and the node is no longer primary.
    Demoted,
}

/// How often a userspace client's connection checks that the node it
/// connected to is still the same primary.
const PRIMACY_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

impl From<std::io::Error> for Stop {
    fn from(e: std::io::Error) -> Self {
        Stop::Io(e)
    }
}

/// Reads and throws away `n` bytes so the stream stays in step.
async fn drain<R: AsyncRead + Unpin>(r: &mut R, mut n: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    while n > 0 {
        let chunk = n.min(buf.len() as u64) as usize;
        r.read_exact(&mut buf[..chunk]).await?;
        n -= chunk as u64;
    }
    Ok(())
}

impl Server {
    fn writable(&self) -> bool {
        self.shared.writable.load(Ordering::SeqCst)
    }

    /// This node's current term as primary (the promotion count), if it
    /// is primary.
    fn primacy(&self) -> Option<u64> {
        let term = self.shared.promotions.load(Ordering::SeqCst);
        self.writable().then_some(term)
    }

    /// Resolves once the node is no longer primary in `term` (demoted, or
    /// demoted and promoted again in between).
    async fn demoted(&self, term: u64) {
        while self.primacy() == Some(term) {
            smol::Timer::after(PRIMACY_CHECK).await;
        }
    }

    /// Serves a userspace client: negotiation, then transmission.
    pub async fn serve_client<S>(self: Arc<Self>, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Clone + Send + 'static,
    {
        let mut input = BufReader::new(stream.clone());
        let mut output = stream;
        match self.negotiate(&mut input, &mut output).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                Stats::bump(&self.shared.stats.nbd_bad_handshakes);
                log::warn!("nbd: client refused during negotiation: {e:?}");
                return;
            }
        }
        // Negotiation lets a client in only while primary. It is served
        // for that term only: once the node is secondary its copy no
        // longer follows the primary's writes, and reading on would
        // return stale data as if current.
        let Some(term) = self.primacy() else {
            log::info!("nbd: closed a client connection: this node is no longer primary");
            return;
        };
        self.transmission(input, output, Some(term)).await;
    }

    /// Serves the kernel's end of a socket pair: transmission only.
    pub async fn serve_kernel<S>(self: Arc<Self>, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Clone + Send + 'static,
    {
        let input = BufReader::new(stream.clone());
        // The kernel's device stays attached in every role; its writes
        // are refused on a secondary request by request.
        self.transmission(input, stream, None).await;
    }

    /// Returns Ok(true) when the client entered transmission.
    async fn negotiate<R, W>(&self, input: &mut R, output: &mut W) -> Result<bool, Stop>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        output.write_all(&nbd::greeting()).await?;
        output.flush().await?;
        let mut flags = [0u8; 4];
        input.read_exact(&mut flags).await?;
        let client_flags = u32::from_be_bytes(flags);
        if client_flags & nbd::CLIENT_FIXED_NEWSTYLE == 0 {
            return Err(Stop::Protocol(
                "client does not speak fixed newstyle".into(),
            ));
        }
        let no_zeroes = client_flags & nbd::CLIENT_NO_ZEROES != 0;
        loop {
            let mut hdr = [0u8; 16];
            input.read_exact(&mut hdr).await?;
            let opt = nbd::parse_option_header(&hdr).map_err(Stop::Protocol)?;
            if opt.length > 64 * 1024 {
                // No option we know is this long: skip it and say so.
                drain(input, opt.length as u64).await?;
                output
                    .write_all(&nbd::option_reply(
                        opt.option,
                        nbd::REP_ERR_INVALID,
                        b"option too long",
                    ))
                    .await?;
                output.flush().await?;
                Stats::bump(&self.shared.stats.nbd_bad_handshakes);
                continue;
            }
            let mut data = vec![0u8; opt.length as usize];
            input.read_exact(&mut data).await?;
            let size = self.shared.data_size;
            match opt.option {
                nbd::OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data);
                    if !known_export(&name) || !self.writable() {
                        // This option has no error reply: closing is all
                        // the protocol allows.
                        return Err(Stop::Protocol(format!(
                            "export `{name}` refused (unknown, or not primary)"
                        )));
                    }
                    let mut b = Vec::with_capacity(134);
                    b.extend_from_slice(&size.to_be_bytes());
                    b.extend_from_slice(&nbd::VOLUME_FLAGS.to_be_bytes());
                    if !no_zeroes {
                        b.extend_from_slice(&[0u8; 124]);
                    }
                    output.write_all(&b).await?;
                    output.flush().await?;
                    return Ok(true);
                }
                nbd::OPT_ABORT => {
                    let _ = output
                        .write_all(&nbd::option_reply(opt.option, nbd::REP_ACK, &[]))
                        .await;
                    let _ = output.flush().await;
                    return Ok(false);
                }
                nbd::OPT_LIST => {
                    let mut d = Vec::new();
                    d.extend_from_slice(&0u32.to_be_bytes());
                    output
                        .write_all(&nbd::option_reply(opt.option, nbd::REP_SERVER, &d))
                        .await?;
                    output
                        .write_all(&nbd::option_reply(opt.option, nbd::REP_ACK, &[]))
                        .await?;
                }
                nbd::OPT_INFO | nbd::OPT_GO => {
                    let reply = match nbd::parse_go(&data) {
                        Err(why) => {
                            Stats::bump(&self.shared.stats.nbd_bad_handshakes);
                            nbd::option_reply(opt.option, nbd::REP_ERR_INVALID, why.as_bytes())
                        }
                        Ok(go) if !known_export(&go.name) => nbd::option_reply(
                            opt.option,
                            nbd::REP_ERR_UNKNOWN,
                            format!("no export `{}`; use the default export", go.name).as_bytes(),
                        ),
                        Ok(_) if !self.writable() => nbd::option_reply(
                            opt.option,
                            nbd::REP_ERR_POLICY,
                            b"the volume is secondary on this node; connect to the primary",
                        ),
                        Ok(_) => {
                            let mut r = nbd::info_export(opt.option, size, nbd::VOLUME_FLAGS);
                            r.extend_from_slice(&nbd::info_block_size(opt.option));
                            r.extend_from_slice(&nbd::option_reply(opt.option, nbd::REP_ACK, &[]));
                            output.write_all(&r).await?;
                            output.flush().await?;
                            if opt.option == nbd::OPT_GO {
                                return Ok(true);
                            }
                            continue;
                        }
                    };
                    output.write_all(&reply).await?;
                }
                nbd::OPT_STARTTLS => {
                    output
                        .write_all(&nbd::option_reply(
                            opt.option,
                            nbd::REP_ERR_POLICY,
                            b"TLS is not offered; use the unix socket",
                        ))
                        .await?;
                }
                _ => {
                    output
                        .write_all(&nbd::option_reply(opt.option, nbd::REP_ERR_UNSUP, &[]))
                        .await?;
                }
            }
            output.flush().await?;
        }
    }

    /// `term`: a client of the primary's term, closed when it ends.
    async fn transmission<R, W>(self: Arc<Self>, mut input: R, output: W, term: Option<u64>)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (reply_tx, reply_rx) = smol::channel::unbounded::<Reply>();
        let writer = crate::run::spawn(write_replies(output, reply_rx));
        let result = self.requests(&mut input, &reply_tx, term).await;
        drop(reply_tx);
        match result {
            Stop::Done => {}
            Stop::Demoted => {
                log::info!("nbd: closed a client connection: this node is no longer primary")
            }
            Stop::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
            Stop::Io(e) => log::info!("nbd: connection ended: {e}"),
            Stop::Protocol(why) => {
                Stats::bump(&self.shared.stats.nbd_bad_streams);
                log::warn!("nbd: closing a connection: {why}");
            }
        }
        // Outstanding replies are still written: a disconnect waits for them.
        writer.await;
    }

    async fn requests<R: AsyncRead + Unpin>(
        &self,
        input: &mut R,
        replies: &Sender<Reply>,
        term: Option<u64>,
    ) -> Stop {
        let mut fair = crate::run::Fair::default();
        let stop = loop {
            let mut hdr = [0u8; nbd::REQUEST_LEN];
            let read = async { Some(input.read_exact(&mut hdr).await) };
            let read = match term {
                // An idle client is closed too, not only at its next
                // request.
                Some(t) => {
                    read.or(async {
                        self.demoted(t).await;
                        None
                    })
                    .await
                }
                None => read.await,
            };
            match read {
                Some(Ok(())) => {}
                Some(Err(e)) => break Stop::Io(e),
                None => break Stop::Demoted,
            }
            // A request that raced the demotion is not served either.
            if term.is_some_and(|t| self.primacy() != Some(t)) {
                break Stop::Demoted;
            }
            let req = match nbd::parse_request(&hdr) {
                Ok(r) => r,
                Err(why) => break Stop::Protocol(why),
            };
            fair.done(req.length as usize).await;
            let command = match nbd::validate(&req, self.shared.data_size, self.writable()) {
                Ok(c) => c,
                Err(refusal) => {
                    Stats::bump(&self.shared.stats.nbd_refused_requests);
                    log::warn!(
                        "nbd: refused request (command {}, offset {}, length {}): {}",
                        req.command,
                        req.offset,
                        req.length,
                        refusal.reason
                    );
                    if let Err(e) = drain(input, refusal.drain).await {
                        break Stop::Io(e);
                    }
                    let _ = replies
                        .send(Reply {
                            cookie: req.cookie,
                            error: refusal.errno,
                            data: None,
                        })
                        .await;
                    continue;
                }
            };
            let volume_req = match command {
                Command::Disconnect => break Stop::Done,
                Command::Read { .. } if self.shared.disk_failed.load(Ordering::SeqCst) => {
                    // The detached disk may hold data older than what was
                    // acknowledged (its writes failed): an error, never a
                    // stale block. Reads through the peer are not built yet.
                    let _ = replies
                        .send(Reply {
                            cookie: req.cookie,
                            error: crate::core::nbd::EIO,
                            data: None,
                        })
                        .await;
                    continue;
                }
                Command::Read { offset, length } => {
                    let file = self.reader.clone();
                    let replies = replies.clone();
                    let cookie = req.cookie;
                    crate::run::spawn(async move {
                        let result = smol::unblock(move || {
                            let mut buf = vec![0u8; length as usize];
                            file.read_exact_at(&mut buf, offset).map(|()| buf)
                        })
                        .await;
                        let reply = match result {
                            Ok(buf) => Reply {
                                cookie,
                                error: 0,
                                data: Some(buf),
                            },
                            Err(e) => Reply {
                                cookie,
                                error: crate::run::store::errno_of(&e),
                                data: None,
                            },
                        };
                        let _ = replies.send(reply).await;
                    })
                    .detach();
                    continue;
                }
                Command::Write {
                    offset,
                    length,
                    fua,
                } => {
                    let mut data = vec![0u8; length as usize];
                    if let Err(e) = input.read_exact(&mut data).await {
                        break Stop::Io(e);
                    }
                    replica::Request::Write {
                        offset,
                        data: Arc::new(data),
                        fua,
                    }
                }
                Command::Flush => replica::Request::Flush,
                Command::Trim {
                    offset,
                    length,
                    fua,
                } => replica::Request::Zeroes {
                    offset,
                    length: length as u64,
                    punch: true,
                    fua,
                },
                Command::WriteZeroes {
                    offset,
                    length,
                    fua,
                    punch,
                } => replica::Request::Zeroes {
                    offset,
                    length: length as u64,
                    punch,
                    fua,
                },
            };
            if self
                .events
                .send(Event::Request {
                    req: volume_req,
                    reply: replies.clone(),
                    cookie: req.cookie,
                })
                .await
                .is_err()
            {
                break Stop::Protocol("the volume stopped".into());
            }
        };
        // The reply writer ends once every pending request has completed:
        // the volume task holds a sender for each.
        stop
    }
}

async fn write_replies<W: AsyncWrite + Unpin>(output: W, replies: smol::channel::Receiver<Reply>) {
    let mut out = BufWriter::with_capacity(256 * 1024, output);
    while let Ok(r) = replies.recv().await {
        let res = async {
            out.write_all(&nbd::simple_reply(r.error, r.cookie)).await?;
            if let Some(d) = &r.data {
                out.write_all(d).await?;
            }
            if replies.is_empty() {
                out.flush().await?;
            }
            Ok::<(), std::io::Error>(())
        }
        .await;
        if res.is_err() {
            return;
        }
    }
    let _ = out.flush().await;
}

/// Accepts userspace clients on the unix socket.
pub async fn listen(path: &Path, server: Arc<Server>) -> std::io::Result<()> {
    // Anyone who can reach the socket can write the volume: root only.
    let listener = crate::run::bind_private_socket(path)?;
    log::info!("nbd: serving the volume on {}", path.display());
    loop {
        let (stream, _) = listener.accept().await?;
        crate::run::spawn(server.clone().serve_client(stream)).detach();
    }
}
