//! The replication link's transport: TCP, the authenticating handshake, and
//! a reader and a writer task per link that seal and open frames.
//!
//! Of the two nodes, the one whose name sorts first connects and the other
//! listens, so there is never a pair of crossing connections to choose
//! between. The listener takes a newer authenticated connection over an
//! older one: the peer restarted and knows better than a half-dead socket.
//!
//! A link can die without a word: a switch that drops everything sends no
//! RST, and TCP retransmits into the void for a quarter of an hour. So
//! every read and every send is bounded by `volume.link_timeout` (no byte
//! arriving, or a send not finishing, within it ends the link), each side
//! pings the other every fifth of it and the other answers, so an idle
//! live link always has something arriving, and the kernel gets the same
//! bound (`TCP_USER_TIMEOUT`, keepalives) in case hadb's own tasks stall.
//! The secondary only reads, so without the bound on reads it would stay
//! `connected` to a dead link and never outdate itself when asked.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use smol::channel::{Receiver, Sender};
use smol::future::FutureExt;
use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use smol::net::{TcpListener, TcpStream};

use crate::config::HumanDuration;

use crate::core::replica::Frame;
use crate::core::wire::{self, Hello, Kind, Sealer, Transcript};
use crate::run::secret::{SecretError, read_secret};
use crate::run::stats::Stats;
use crate::run::volume::{Event, Link, Shared};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY: Duration = Duration::from_secs(1);
/// Pings per link timeout: a live link has several chances to show it
/// before the timeout, even when a ping or its answer is retransmitted.
const PINGS_PER_TIMEOUT: u32 = 5;
/// Pongs owed to the peer that the writer has not sent yet; more are
/// dropped, since one answer proves as much as many.
const PONGS_OWED: usize = 4;

static NEXT_LINK: AtomicU64 = AtomicU64::new(1);

#[derive(Debug)]
pub enum KeyError {
    /// Missing, unreadable, or failing the rule of [`crate::run::secret`].
    File(SecretError),
    TooShort {
        path: std::path::PathBuf,
        len: usize,
    },
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyError::File(e) if e.is_missing() => write!(
                f,
                "{e}; create it with `head -c 32 /dev/urandom > {0}; chmod 600 {0}` and copy it to the peer",
                e.path().display()
            ),
            KeyError::File(e) => write!(f, "{e}"),
            KeyError::TooShort { path, len } => write!(
                f,
                "key file {} holds {len} bytes; use at least 16 random bytes (`head -c 32 /dev/urandom`)",
                path.display()
            ),
        }
    }
}

impl std::error::Error for KeyError {}

/// Reads the shared secret: a root-only file ([`read_secret`]) of at
/// least 16 bytes.
pub fn read_key(path: &Path) -> Result<Vec<u8>, KeyError> {
    let key = read_secret("key file", path).map_err(KeyError::File)?;
    if key.len() < 16 {
        return Err(KeyError::TooShort {
            path: path.to_owned(),
            len: key.len(),
        });
    }
    Ok(key)
}

/// What both ends of a link need to know.
#[derive(Clone)]
pub struct LinkSetup {
    pub cluster: String,
    pub me: String,
    pub peer: String,
    pub key: Arc<Vec<u8>>,
    pub listen: SocketAddr,
    pub peer_addr: SocketAddr,
    pub events: Sender<Event>,
    pub shared: Arc<Shared>,
    /// `volume.link_timeout`: nothing received for this long, or a send
    /// not finished within it, and the link is dead.
    pub timeout: Duration,
}

fn nonce() -> std::io::Result<[u8; wire::NONCE_LEN]> {
    let mut n = [0u8; wire::NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(n)
}

#[derive(Debug)]
enum HandshakeError {
    Io(std::io::Error),
    Refused(String),
    Auth(String),
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Io(e) => write!(f, "{e}"),
            HandshakeError::Refused(why) => write!(f, "{why}"),
            HandshakeError::Auth(why) => write!(f, "{why}"),
        }
    }
}

impl From<std::io::Error> for HandshakeError {
    fn from(e: std::io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

async fn read_hello(stream: &mut TcpStream) -> Result<Hello, HandshakeError> {
    let mut buf = Vec::with_capacity(wire::HELLO_MAX);
    let mut byte = [0u8; 1];
    loop {
        match Hello::decode(&buf).map_err(|e| HandshakeError::Refused(e.to_string()))? {
            Some((hello, used)) if used == buf.len() => return Ok(hello),
            Some(_) => return Err(HandshakeError::Refused("extra bytes after hello".into())),
            None => {}
        }
        if buf.len() >= wire::HELLO_MAX {
            return Err(HandshakeError::Refused("hello too long".into()));
        }
        // Byte by byte: a hello is small and must not swallow what follows.
        stream.read_exact(&mut byte).await?;
        buf.push(byte[0]);
    }
}

fn check_hello(setup: &LinkSetup, hello: &Hello) -> Result<(), HandshakeError> {
    if hello.version != wire::PROTOCOL_VERSION {
        return Err(HandshakeError::Refused(format!(
            "peer speaks protocol version {}, this hadb {}; run the same hadb version on both nodes",
            hello.version,
            wire::PROTOCOL_VERSION
        )));
    }
    if hello.cluster != setup.cluster {
        return Err(HandshakeError::Refused(format!(
            "peer belongs to cluster `{}`, this node to `{}`; check `cluster` in both configs",
            hello.cluster, setup.cluster
        )));
    }
    if hello.node != setup.peer {
        return Err(HandshakeError::Refused(format!(
            "peer calls itself `{}` but the configured peer is `{}`",
            hello.node, setup.peer
        )));
    }
    Ok(())
}

/// Connector side. Returns (send sealer, receive sealer).
async fn handshake_connect(
    stream: &mut TcpStream,
    setup: &LinkSetup,
) -> Result<(Sealer, Sealer), HandshakeError> {
    let nonce_c = nonce()?;
    let hello = Hello {
        version: wire::PROTOCOL_VERSION,
        cluster: setup.cluster.clone(),
        node: setup.me.clone(),
        nonce: nonce_c,
    };
    stream.write_all(&hello.encode()).await?;
    let theirs = read_hello(stream).await?;
    check_hello(setup, &theirs)?;
    let mut proof = [0u8; 32];
    stream.read_exact(&mut proof).await?;
    let t = Transcript {
        cluster: &setup.cluster,
        connector: &setup.me,
        listener: &setup.peer,
        nonce_c: &nonce_c,
        nonce_l: &theirs.nonce,
    };
    if !wire::proofs_equal(&proof, &t.listener_proof(&setup.key)) {
        return Err(HandshakeError::Auth(
            "the peer could not prove it holds our key (different key_file contents?)".into(),
        ));
    }
    stream.write_all(&t.connector_proof(&setup.key)).await?;
    let mut status = [0u8; 1];
    stream.read_exact(&mut status).await?;
    if status[0] != 0 {
        return Err(HandshakeError::Auth(
            "the peer refused our proof (different key_file contents?)".into(),
        ));
    }
    let (c2l, l2c) = t.session_keys(&setup.key);
    Ok((Sealer::new(&c2l), Sealer::new(&l2c)))
}

/// Listener side. Returns (send sealer, receive sealer).
async fn handshake_accept(
    stream: &mut TcpStream,
    setup: &LinkSetup,
) -> Result<(Sealer, Sealer), HandshakeError> {
    let theirs = read_hello(stream).await?;
    check_hello(setup, &theirs)?;
    let nonce_l = nonce()?;
    let t = Transcript {
        cluster: &setup.cluster,
        connector: &setup.peer,
        listener: &setup.me,
        nonce_c: &theirs.nonce,
        nonce_l: &nonce_l,
    };
    let hello = Hello {
        version: wire::PROTOCOL_VERSION,
        cluster: setup.cluster.clone(),
        node: setup.me.clone(),
        nonce: nonce_l,
    };
    stream.write_all(&hello.encode()).await?;
    stream.write_all(&t.listener_proof(&setup.key)).await?;
    let mut proof = [0u8; 32];
    stream.read_exact(&mut proof).await?;
    if !wire::proofs_equal(&proof, &t.connector_proof(&setup.key)) {
        let _ = stream.write_all(&[1]).await;
        return Err(HandshakeError::Auth(
            "the connecting peer failed the challenge (wrong key)".into(),
        ));
    }
    stream.write_all(&[0]).await?;
    let (c2l, l2c) = t.session_keys(&setup.key);
    Ok((Sealer::new(&l2c), Sealer::new(&c2l)))
}

fn count_handshake_error(stats: &Stats, e: &HandshakeError) {
    match e {
        HandshakeError::Auth(_) => Stats::bump(&stats.repl_auth_failures),
        _ => Stats::bump(&stats.repl_handshake_failures),
    }
}

/// How an operation on the link failed.
enum Failure {
    /// It did not finish within the link timeout.
    Stalled,
    Io(std::io::Error),
}

/// `op`, unless it is still pending after `limit`. Whatever is ready at
/// once (most reads and sends) costs no timer.
async fn within<T>(
    limit: Duration,
    op: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, Failure> {
    let mut op = std::pin::pin!(op);
    if let Some(done) = smol::future::poll_once(op.as_mut()).await {
        return done.map_err(Failure::Io);
    }
    async { Some(op.as_mut().await) }
        .or(async {
            smol::Timer::after(limit).await;
            None
        })
        .await
        .ok_or(Failure::Stalled)?
        .map_err(Failure::Io)
}

/// Fills `buf`, failing when no byte arrives for `limit`: a large frame
/// on a slow link may take longer than that as a whole, but a live
/// link never goes that long without a byte.
async fn read_full(
    input: &mut (impl AsyncRead + Unpin),
    buf: &mut [u8],
    limit: Duration,
) -> Result<(), Failure> {
    let mut filled = 0;
    while filled < buf.len() {
        match within(limit, input.read(&mut buf[filled..])).await? {
            0 => {
                return Err(Failure::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection",
                )));
            }
            n => filled += n,
        }
    }
    Ok(())
}

/// Sends all of `buf`, failing when one send does not finish within
/// `limit`. Each send returns as soon as the socket takes some bytes, so
/// a slow link is not mistaken for a dead one.
async fn write_full(
    out: &mut (impl AsyncWrite + Unpin),
    buf: &[u8],
    limit: Duration,
) -> Result<(), Failure> {
    let mut sent = 0;
    while sent < buf.len() {
        match within(limit, out.write(&buf[sent..])).await? {
            0 => return Err(Failure::Io(std::io::ErrorKind::WriteZero.into())),
            n => sent += n,
        }
    }
    Ok(())
}

/// What an I/O error on the link means, in words an operator can act on.
fn io_reason(what: &str, e: &std::io::Error, peer: &str, timeout: Duration) -> String {
    if e.raw_os_error() == Some(rustix::io::Errno::TIMEDOUT.raw_os_error()) {
        // TCP_USER_TIMEOUT or the keepalives below ran out.
        format!(
            "{what}: {peer} acknowledged nothing for {} (the kernel gave up on the connection)",
            HumanDuration(timeout)
        )
    } else {
        format!("{what}: {e}")
    }
}

/// Gives the kernel the link's timeout too: data unacknowledged for that
/// long ends the connection (`TCP_USER_TIMEOUT`, else TCP retries for
/// about 15 minutes), and an idle connection is probed so that it ends
/// within about the same time. hadb's own pings keep a healthy link from
/// ever being idle that long; these catch a dead link even while hadb's
/// tasks are stuck.
fn bound_socket(stream: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    use rustix::net::sockopt;
    let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
    sockopt::set_tcp_user_timeout(stream, ms)?;
    // Idle for two fifths, then three probes a fifth apart: the whole
    // timeout. Keepalive counts whole seconds.
    let fifth = (timeout / PINGS_PER_TIMEOUT).max(Duration::from_secs(1));
    sockopt::set_socket_keepalive(stream, true)?;
    sockopt::set_tcp_keepidle(stream, fifth * 2)?;
    sockopt::set_tcp_keepintvl(stream, fifth)?;
    sockopt::set_tcp_keepcnt(stream, PINGS_PER_TIMEOUT - 2)?;
    Ok(())
}

/// Starts reader and writer tasks on an authenticated stream and hands the
/// link to the volume. Returns a receiver that fails once the link is gone.
async fn start_link(
    stream: TcpStream,
    setup: &LinkSetup,
    tx: Sealer,
    rx: Sealer,
) -> smol::channel::Receiver<()> {
    let _ = stream.set_nodelay(true);
    if let Err(e) = bound_socket(&stream, setup.timeout) {
        log::warn!(
            "replication: cannot set TCP_USER_TIMEOUT and keepalives on the link to {}: {e}; hadb's own {} timeout still finds a dead link",
            setup.peer,
            HumanDuration(setup.timeout)
        );
    }
    let id = NEXT_LINK.fetch_add(1, Ordering::Relaxed);
    let (frames_tx, frames_rx) = smol::channel::unbounded::<Frame>();
    let (pongs_tx, pongs_rx) = smol::channel::bounded::<u64>(PONGS_OWED);
    let (alive_tx, alive_rx) = smol::channel::bounded::<()>(1);
    let writer = {
        let stream = stream.clone();
        let events = setup.events.clone();
        let (peer, timeout) = (setup.peer.clone(), setup.timeout);
        crate::run::spawn(async move {
            let reason = write_frames(stream, tx, frames_rx, pongs_rx, &peer, timeout).await;
            let _ = events.send(Event::LinkLost { link: id, reason }).await;
        })
    };
    // The reader must not report a frame before the volume has the link,
    // or the volume drops it as coming from an unknown link: it waits for
    // the go-ahead sent after LinkUp.
    let (go_tx, go_rx) = smol::channel::bounded::<()>(1);
    let reader = {
        let events = setup.events.clone();
        let shared = setup.shared.clone();
        let (peer, timeout) = (setup.peer.clone(), setup.timeout);
        crate::run::spawn(async move {
            if go_rx.recv().await.is_err() {
                return;
            }
            let link = Reader {
                id,
                peer: &peer,
                timeout,
                events: &events,
                shared: &shared,
                pongs: pongs_tx,
            };
            let reason = link.read_frames(stream, rx).await;
            let _ = events.send(Event::LinkLost { link: id, reason }).await;
        })
    };
    let link = Link {
        id,
        peer: setup.peer.clone(),
        frames: frames_tx,
        tasks: vec![writer, reader],
        alive: alive_tx,
    };
    let _ = setup.events.send(Event::LinkUp(link)).await;
    let _ = go_tx.send(()).await;
    alive_rx
}

/// What the writer does next.
enum Next {
    Frame(Frame),
    Pong(u64),
    Ping,
    Closed,
}

async fn write_frames(
    stream: TcpStream,
    mut sealer: Sealer,
    frames: Receiver<Frame>,
    pongs: Receiver<u64>,
    peer: &str,
    timeout: Duration,
) -> String {
    let mut out = BufWriter::with_capacity(256 * 1024, stream);
    let interval = timeout / PINGS_PER_TIMEOUT;
    let mut ping_seq = 0u64;
    // Pings go out on a fixed beat, busy or not, ahead of queued frames:
    // each node then hears its own pings answered within its own
    // timeout, whatever the traffic and whatever the peer's timeout.
    let mut last_ping = Instant::now();
    let mut fair = crate::run::Fair::default();
    loop {
        // Answers first: they are small, and the peer is timing them.
        let next = if let Ok(seq) = pongs.try_recv() {
            Next::Pong(seq)
        } else if last_ping.elapsed() >= interval {
            Next::Ping
        } else {
            async { frames.recv().await.map_or(Next::Closed, Next::Frame) }
                .or(async {
                    match pongs.recv().await {
                        Ok(seq) => Next::Pong(seq),
                        // The reader ended and reports why; "closed" here
                        // could overtake its reason.
                        Err(_) => smol::future::pending().await,
                    }
                })
                .or(async {
                    smol::Timer::at(last_ping + interval).await;
                    Next::Ping
                })
                .await
        };
        let frame = match next {
            Next::Frame(f) => f,
            Next::Closed => return "link closed".into(),
            Next::Pong(seq) => Frame {
                header: wire::Header::new(Kind::Pong, seq, 0, 0),
                payload: None,
            },
            Next::Ping => {
                last_ping = Instant::now();
                ping_seq += 1;
                Frame {
                    header: wire::Header::new(Kind::Ping, ping_seq, 0, 0),
                    payload: None,
                }
            }
        };
        let payload: &[u8] = frame.payload.as_deref().map_or(&[], |p| p.as_slice());
        let (header, mac) = sealer.seal(frame.header, payload);
        let res = async {
            write_full(&mut out, &header, timeout).await?;
            write_full(&mut out, payload, timeout).await?;
            write_full(&mut out, &mac, timeout).await?;
            if frames.is_empty() {
                within(timeout, out.flush()).await?;
            }
            Ok(())
        }
        .await;
        match res {
            Ok(()) => {}
            Err(Failure::Stalled) => {
                return format!(
                    "a send to {peer} did not finish within {}",
                    HumanDuration(timeout)
                );
            }
            Err(Failure::Io(e)) => return io_reason("sending failed", &e, peer, timeout),
        }
        fair.done(wire::HEADER_LEN + payload.len()).await;
    }
}

/// The reading half of a link.
struct Reader<'a> {
    id: u64,
    peer: &'a str,
    timeout: Duration,
    events: &'a Sender<Event>,
    shared: &'a Shared,
    /// Pings to answer, to the writer.
    pongs: Sender<u64>,
}

impl Reader<'_> {
    fn failed(&self, mid_frame: bool, e: Failure) -> String {
        match e {
            Failure::Stalled => format!(
                "nothing received from {} for {}{}",
                self.peer,
                HumanDuration(self.timeout),
                if mid_frame {
                    " (in the middle of a frame)"
                } else {
                    ""
                }
            ),
            Failure::Io(e) if mid_frame => {
                Stats::bump(&self.shared.stats.repl_bad_frames);
                io_reason("frame truncated", &e, self.peer, self.timeout)
            }
            Failure::Io(e) => io_reason("connection closed", &e, self.peer, self.timeout),
        }
    }

    async fn read_frames(self, stream: TcpStream, mut sealer: Sealer) -> String {
        let mut input = BufReader::with_capacity(256 * 1024, stream);
        let mut header_bytes = [0u8; wire::HEADER_LEN];
        let mut mac = [0u8; wire::MAC_LEN];
        let mut fair = crate::run::Fair::default();
        loop {
            if let Err(e) = read_full(&mut input, &mut header_bytes, self.timeout).await {
                return self.failed(false, e);
            }
            let header = match wire::decode_header(&header_bytes) {
                Ok(h) => h,
                Err(e) => {
                    Stats::bump(&self.shared.stats.repl_bad_frames);
                    log::warn!("replication: refused a frame: {e}");
                    return format!("bad frame: {e}");
                }
            };
            fair.done(wire::HEADER_LEN + header.payload_len as usize)
                .await;
            let mut payload = vec![0u8; header.payload_len as usize];
            for part in [&mut payload[..], &mut mac[..]] {
                if let Err(e) = read_full(&mut input, part, self.timeout).await {
                    return self.failed(true, e);
                }
            }
            if let Err(e) = sealer.open(&header_bytes, &header, &payload, &mac) {
                Stats::bump(&self.shared.stats.repl_bad_frames);
                log::warn!("replication: refused a frame: {e}");
                return format!("bad frame: {e}");
            }
            match header.kind {
                // A full queue of answers already proves the link alive.
                Kind::Ping => {
                    let _ = self.pongs.try_send(header.seq);
                    continue;
                }
                // Its bytes arriving was the point.
                Kind::Pong => continue,
                _ => {}
            }
            let payload = (header.payload_len > 0
                || matches!(header.kind, Kind::Data | Kind::ResyncData))
            .then(|| Arc::new(payload));
            if self
                .events
                .send(Event::Frame {
                    link: self.id,
                    header,
                    payload,
                })
                .await
                .is_err()
            {
                return "volume stopped".into();
            }
        }
    }
}

/// The connecting side: keeps one link up, forever.
pub async fn connect_loop(setup: LinkSetup) {
    // The same failure every second is noise; a different one is news.
    let mut last_error = String::new();
    loop {
        let attempt = async {
            let mut stream = TcpStream::connect(setup.peer_addr)
                .await
                .map_err(HandshakeError::Io)?;
            let sealers = handshake_connect(&mut stream, &setup).await?;
            Ok::<_, HandshakeError>((stream, sealers))
        }
        .or(async {
            smol::Timer::after(HANDSHAKE_TIMEOUT).await;
            Err(HandshakeError::Refused("timed out".into()))
        })
        .await;
        match attempt {
            Ok((stream, (tx, rx))) => {
                last_error.clear();
                let alive = start_link(stream, &setup, tx, rx).await;
                let _ = alive.recv().await;
            }
            Err(e) => {
                if !matches!(e, HandshakeError::Io(_)) {
                    count_handshake_error(&setup.shared.stats, &e);
                }
                let text = e.to_string();
                if text != last_error {
                    log::warn!(
                        "replication: cannot connect to {} at {}: {text}; retrying every {}s",
                        setup.peer,
                        setup.peer_addr,
                        RETRY.as_secs()
                    );
                    last_error = text;
                }
            }
        }
        smol::Timer::after(RETRY).await;
    }
}

/// The listening side: accepts the peer, refusing everyone else.
pub async fn listen_loop(setup: LinkSetup) {
    let listener = loop {
        match TcpListener::bind(setup.listen).await {
            Ok(l) => break l,
            Err(e) => {
                log::error!(
                    "replication: cannot listen on {}: {e}; check nodes.{}.address and volume.port; retrying",
                    setup.listen,
                    setup.me
                );
                smol::Timer::after(Duration::from_secs(5)).await;
            }
        }
    };
    log::info!(
        "replication: listening on {} for {}",
        setup.listen,
        setup.peer
    );
    let mut gate = HandshakeGate::new(setup.peer_addr.ip(), Instant::now());
    let (done_tx, done_rx) = smol::channel::unbounded::<(IpAddr, Option<Refusal>)>();
    enum Next {
        Accepted(std::io::Result<(TcpStream, SocketAddr)>),
        /// A handshake ended: who, and why it was refused (None: a link).
        Done(IpAddr, Option<Refusal>),
        Tick,
    }
    loop {
        let next = async { Next::Accepted(listener.accept().await) }
            .or(async {
                match done_rx.recv().await {
                    Ok((ip, refused)) => Next::Done(ip, refused),
                    // Cannot happen: this loop holds a sender.
                    Err(_) => smol::future::pending().await,
                }
            })
            .or(async {
                smol::Timer::after(LOG_SUMMARY_EVERY).await;
                Next::Tick
            })
            .await;
        let (mut stream, from) = match next {
            Next::Accepted(Ok(x)) => x,
            Next::Accepted(Err(e)) => {
                log::warn!("replication: accept failed: {e}");
                smol::Timer::after(Duration::from_millis(100)).await;
                continue;
            }
            Next::Done(ip, refused) => {
                if let Some(line) = gate.ended(ip, refused, Instant::now()) {
                    log::warn!("{line}");
                }
                continue;
            }
            Next::Tick => {
                if let Some(line) = gate.summary(Instant::now()) {
                    log::warn!("{line}");
                }
                continue;
            }
        };
        if let Some(line) = gate.admit(from.ip()) {
            // Dropped here: closed at once, before any byte is read.
            Stats::bump(&setup.shared.stats.repl_handshakes_shed);
            if let Some(line) = line {
                log::warn!("{line}");
            }
            continue;
        }
        let setup = setup.clone();
        let done = done_tx.clone();
        crate::run::spawn(async move {
            let result = handshake_accept(&mut stream, &setup)
                .or(async {
                    smol::Timer::after(HANDSHAKE_TIMEOUT).await;
                    Err(HandshakeError::Refused("handshake timed out".into()))
                })
                .await;
            match result {
                Ok((tx, rx)) => {
                    // Authenticated: its slot is free before the link
                    // runs, for as long as it runs.
                    let _ = done.send((from.ip(), None)).await;
                    let _alive = start_link(stream, &setup, tx, rx).await;
                }
                Err(e) => {
                    count_handshake_error(&setup.shared.stats, &e);
                    let refusal = Refusal {
                        auth: matches!(e, HandshakeError::Auth(_)),
                        why: format!("from {from}: {e}"),
                    };
                    let _ = done.send((from.ip(), Some(refusal))).await;
                }
            }
        })
        .detach();
    }
}

/// Connections let into the handshake at once, per pool (the peer's
/// configured address, everyone else): an unauthenticated stranger costs
/// a task, a socket and a timer for up to [`HANDSHAKE_TIMEOUT`], so a
/// flood of them is bounded; the peer's own pool keeps it able to connect
/// while strangers fill theirs.
const MAX_UNAUTHENTICATED: usize = 4;

/// How often suppressed refusals are summed up in the log.
const LOG_SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// Addresses remembered as "already logged"; past this, every refusal is
/// only summed up.
const MAX_LOGGED_ADDRESSES: usize = 1024;

/// Why a handshake was refused, for [`HandshakeGate::ended`].
struct Refusal {
    /// A wrong key, logged apart from the rest (a scan, a timeout): the
    /// one an operator must see even after a stranger was logged.
    auth: bool,
    why: String,
}

/// The listener's bounds on unauthenticated connections and on what their
/// refusals write to the log. Owned by the listen loop; time comes in.
/// The first refusal of each kind (key or other) from each address is
/// logged in full; later ones, and
/// connections shed because the handshake was full, are counted and said
/// in one line a minute.
struct HandshakeGate {
    peer: IpAddr,
    /// In the handshake now: [from the peer's address, from anyone else].
    open: [usize; 2],
    /// (address, whether it was an authentication failure) logged once.
    logged: std::collections::HashSet<(IpAddr, bool)>,
    /// Refusals not logged since the last summary.
    quiet_refused: u64,
    /// Connections shed since the last summary.
    quiet_shed: u64,
    /// Whether a shed was logged since the last summary.
    shed_logged: bool,
    last_summary: Instant,
}

impl HandshakeGate {
    fn new(peer: IpAddr, now: Instant) -> HandshakeGate {
        HandshakeGate {
            peer,
            open: [0, 0],
            logged: std::collections::HashSet::new(),
            quiet_refused: 0,
            quiet_shed: 0,
            shed_logged: false,
            last_summary: now,
        }
    }

    fn pool(&self, ip: IpAddr) -> usize {
        usize::from(ip != self.peer)
    }

    /// A new connection from `ip`: None lets it into the handshake;
    /// Some(line) sheds it, with a line to log (once per summary period).
    fn admit(&mut self, ip: IpAddr) -> Option<Option<String>> {
        let pool = self.pool(ip);
        if self.open[pool] < MAX_UNAUTHENTICATED {
            self.open[pool] += 1;
            return None;
        }
        if self.shed_logged {
            self.quiet_shed += 1;
            return Some(None);
        }
        self.shed_logged = true;
        Some(Some(format!(
            "replication: closed at once a connection from {ip}: {MAX_UNAUTHENTICATED} others from {} are still in the handshake (a scan or a flood?); more are counted in volume.bad_input.repl_handshakes_shed and summed up here once a minute",
            if pool == 0 {
                "the peer's address"
            } else {
                "addresses not the peer's"
            }
        )))
    }

    /// A handshake from `ip` ended, refused (`refused`: why) or not;
    /// returns a line to log.
    fn ended(&mut self, ip: IpAddr, refused: Option<Refusal>, now: Instant) -> Option<String> {
        let pool = self.pool(ip);
        self.open[pool] = self.open[pool].saturating_sub(1);
        let Refusal { auth, why } = refused?;
        if self.logged.contains(&(ip, auth)) || self.logged.len() >= MAX_LOGGED_ADDRESSES {
            self.quiet_refused += 1;
            return self.summary(now);
        }
        self.logged.insert((ip, auth));
        Some(format!(
            "replication: refused a connection {why} (further refusals like it from {ip} are summed up once a minute)"
        ))
    }

    /// The summary of what was not logged, once [`LOG_SUMMARY_EVERY`] has
    /// passed since the last.
    fn summary(&mut self, now: Instant) -> Option<String> {
        if now.duration_since(self.last_summary) < LOG_SUMMARY_EVERY {
            return None;
        }
        self.last_summary = now;
        self.shed_logged = false;
        let (refused, shed) = (self.quiet_refused, self.quiet_shed);
        self.quiet_refused = 0;
        self.quiet_shed = 0;
        if refused == 0 && shed == 0 {
            return None;
        }
        Some(format!(
            "replication: in the last minute or so, {refused} more connection(s) refused in the handshake and {shed} more closed at once (too many in the handshake); see volume.bad_input"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_millis(200);

    #[test]
    fn the_handshake_gate_bounds_strangers_apart_from_the_peer_and_logs_little() {
        let peer: IpAddr = "10.10.10.5".parse().unwrap();
        let stranger: IpAddr = "10.10.10.99".parse().unwrap();
        let t0 = Instant::now();
        let mut g = HandshakeGate::new(peer, t0);
        for _ in 0..MAX_UNAUTHENTICATED {
            assert!(g.admit(stranger).is_none());
        }
        // The fifth stranger is shed, logged once; the sixth only counted.
        assert!(matches!(g.admit(stranger), Some(Some(l)) if l.contains("closed at once")));
        assert!(matches!(g.admit(stranger), Some(None)));
        // The peer's own address still gets in.
        assert!(g.admit(peer).is_none());
        let refused = |why: &str| {
            Some(Refusal {
                auth: false,
                why: why.into(),
            })
        };
        // The first refusal from the stranger is logged, the next not.
        assert!(g.ended(stranger, refused("timed out"), t0).is_some());
        assert!(g.ended(stranger, refused("timed out"), t0).is_none());
        // A wrong key from the same address is a different story: logged.
        let wrong_key = Some(Refusal {
            auth: true,
            why: "wrong key".into(),
        });
        assert!(g.ended(stranger, wrong_key, t0).is_some());
        // A slot freed: the next stranger gets in again.
        assert!(g.admit(stranger).is_none());
        // A minute on: one line sums up what was not said.
        let later = t0 + LOG_SUMMARY_EVERY;
        let sum = g.summary(later).unwrap();
        assert!(
            sum.contains("1 more connection(s) refused") && sum.contains("1 more closed at once"),
            "{sum}"
        );
        assert!(g.summary(later + LOG_SUMMARY_EVERY).is_none());
    }

    /// A key file of mode 0600 that belongs to another account is
    /// refused: that account could have written a key it knows.
    #[test]
    fn a_key_file_owned_by_another_uid_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("hadb-peer-key-{}", std::process::id()));
        std::fs::write(&path, [7u8; 32]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read_key(&path).is_ok());
        // 65534: nobody. The tests run as root, which may give it away.
        std::os::unix::fs::chown(&path, Some(65534), Some(65534))
            .expect("chown needs root: run the tests as root");
        let err = read_key(&path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        let _ = std::fs::remove_file(&path);
        assert!(
            err.contains("uid 65534")
                && err.contains(&format!("chown root:root {}", path.display())),
            "a key file owned by uid 65534 was not refused as such: {err:?}"
        );
    }

    /// A connected pair of sockets on loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = smol::future::zip(TcpStream::connect(addr), listener.accept()).await;
        (a.unwrap(), b.unwrap().0)
    }

    #[test]
    fn a_slow_peer_keeps_the_read_alive_and_a_silent_one_ends_it() {
        smol::block_on(async {
            let (mut a, mut b) = pair().await;
            // Ten bytes over about a second, five limits: each arrives
            // within the limit, so the read goes on.
            let trickle = async {
                for i in 0..10u8 {
                    smol::Timer::after(LIMIT / 2).await;
                    a.write_all(&[i]).await.unwrap();
                }
            };
            let mut buf = [0u8; 10];
            let started = Instant::now();
            let (_, read) = smol::future::zip(trickle, read_full(&mut b, &mut buf, LIMIT)).await;
            assert!(read.is_ok(), "a live, slow peer ended the read");
            assert!(started.elapsed() > LIMIT * 4);
            assert_eq!(buf, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
            // Then silence.
            let started = Instant::now();
            let read = read_full(&mut b, &mut buf[..1], LIMIT).await;
            assert!(matches!(read, Err(Failure::Stalled)));
            assert!(started.elapsed() < LIMIT * 10);
        });
    }

    #[test]
    fn a_send_the_peer_never_takes_ends_within_the_limit() {
        smol::block_on(async {
            let (mut a, _b) = pair().await;
            // Far more than both sockets' buffers hold.
            let big = vec![0u8; 64 << 20];
            let started = Instant::now();
            let sent = write_full(&mut a, &big, LIMIT).await;
            assert!(matches!(sent, Err(Failure::Stalled)));
            assert!(started.elapsed() < Duration::from_secs(5));
        });
    }

    #[test]
    fn the_kernel_gets_the_same_bound() {
        smol::block_on(async {
            let (a, _b) = pair().await;
            bound_socket(&a, Duration::from_secs(5)).unwrap();
            use rustix::net::sockopt;
            assert_eq!(sockopt::tcp_user_timeout(&a).unwrap(), 5000);
            assert!(sockopt::socket_keepalive(&a).unwrap());
            let probing = sockopt::tcp_keepidle(&a).unwrap()
                + sockopt::tcp_keepintvl(&a).unwrap() * sockopt::tcp_keepcnt(&a).unwrap();
            assert_eq!(probing, Duration::from_secs(5));
        });
    }
}
