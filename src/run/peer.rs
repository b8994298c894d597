//! The replication link's transport: TCP, the authenticating handshake, and
//! a reader and a writer task per link that seal and open frames.
//!
//! Of the two nodes, the one whose name sorts first connects and the other
//! listens, so there is never a pair of crossing connections to choose
//! between. The listener takes a newer authenticated connection over an
//! older one: the peer restarted and knows better than a half-dead socket.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use smol::channel::Sender;
use smol::future::FutureExt;
use smol::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use smol::net::{TcpListener, TcpStream};

use crate::core::replica::Frame;
use crate::core::wire::{self, Hello, Kind, Sealer, Transcript};
use crate::run::stats::Stats;
use crate::run::volume::{Event, Link, Shared};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const PING_INTERVAL: Duration = Duration::from_secs(1);
/// No frame at all for this long and the link is dead.
const DEAD_AFTER: Duration = Duration::from_secs(5);
const RETRY: Duration = Duration::from_secs(1);

static NEXT_LINK: AtomicU64 = AtomicU64::new(1);

#[derive(Debug)]
pub enum KeyError {
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    Mode {
        path: std::path::PathBuf,
        mode: u32,
    },
    TooShort {
        path: std::path::PathBuf,
        len: usize,
    },
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyError::Read { path, source } => write!(
                f,
                "cannot read key file {}: {source}; create it with `head -c 32 /dev/urandom > {0}; chmod 600 {0}` and copy it to the peer",
                path.display()
            ),
            KeyError::Mode { path, mode } => write!(
                f,
                "key file {} has mode {mode:03o}; it must be readable by root only: `chmod 600 {}`",
                path.display(),
                path.display()
            ),
            KeyError::TooShort { path, len } => write!(
                f,
                "key file {} holds {len} bytes; use at least 16 random bytes (`head -c 32 /dev/urandom`)",
                path.display()
            ),
        }
    }
}

impl std::error::Error for KeyError {}

/// Reads the shared secret, refusing a file others could read.
pub fn read_key(path: &Path) -> Result<Vec<u8>, KeyError> {
    let meta = std::fs::metadata(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Mode {
            path: path.to_owned(),
            mode,
        });
    }
    let key = std::fs::read(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })?;
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

/// Starts reader and writer tasks on an authenticated stream and hands the
/// link to the volume. Returns a receiver that fails once the link is gone.
async fn start_link(
    stream: TcpStream,
    setup: &LinkSetup,
    tx: Sealer,
    rx: Sealer,
) -> smol::channel::Receiver<()> {
    let _ = stream.set_nodelay(true);
    let id = NEXT_LINK.fetch_add(1, Ordering::Relaxed);
    let (frames_tx, frames_rx) = smol::channel::unbounded::<Frame>();
    let (alive_tx, alive_rx) = smol::channel::bounded::<()>(1);
    let writer = {
        let stream = stream.clone();
        let events = setup.events.clone();
        crate::run::spawn(async move {
            let reason = write_frames(stream, tx, frames_rx).await;
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
        crate::run::spawn(async move {
            if go_rx.recv().await.is_err() {
                return;
            }
            let reason = read_frames(stream, rx, id, &events, &shared).await;
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

async fn write_frames(
    stream: TcpStream,
    mut sealer: Sealer,
    frames: smol::channel::Receiver<Frame>,
) -> String {
    let mut out = BufWriter::with_capacity(256 * 1024, stream);
    let mut ping_seq = 0u64;
    let mut fair = crate::run::Fair::default();
    loop {
        let next = async { frames.recv().await.ok() }
            .or(async {
                smol::Timer::after(PING_INTERVAL).await;
                None
            })
            .await;
        let frame = match next {
            Some(f) => f,
            None if frames.is_closed() => return "link closed".into(),
            None => {
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
            out.write_all(&header).await?;
            out.write_all(payload).await?;
            out.write_all(&mac).await?;
            if frames.is_empty() {
                out.flush().await?;
            }
            Ok::<(), std::io::Error>(())
        }
        .await;
        if let Err(e) = res {
            return format!("sending failed: {e}");
        }
        fair.done(wire::HEADER_LEN + payload.len()).await;
    }
}

async fn read_frames(
    stream: TcpStream,
    mut sealer: Sealer,
    id: u64,
    events: &Sender<Event>,
    shared: &Shared,
) -> String {
    let mut input = BufReader::with_capacity(256 * 1024, stream);
    let mut header_bytes = [0u8; wire::HEADER_LEN];
    let mut mac = [0u8; wire::MAC_LEN];
    let mut fair = crate::run::Fair::default();
    loop {
        let got = async { Some(input.read_exact(&mut header_bytes).await) }
            .or(async {
                smol::Timer::after(DEAD_AFTER).await;
                None
            })
            .await;
        match got {
            None => return format!("no frame from the peer for {}s", DEAD_AFTER.as_secs()),
            Some(Err(e)) => return format!("connection closed: {e}"),
            Some(Ok(())) => {}
        }
        let header = match wire::decode_header(&header_bytes) {
            Ok(h) => h,
            Err(e) => {
                Stats::bump(&shared.stats.repl_bad_frames);
                log::warn!("replication: refused a frame: {e}");
                return format!("bad frame: {e}");
            }
        };
        fair.done(wire::HEADER_LEN + header.payload_len as usize)
            .await;
        let mut payload = vec![0u8; header.payload_len as usize];
        if let Err(e) = input.read_exact(&mut payload).await {
            Stats::bump(&shared.stats.repl_bad_frames);
            return format!("frame truncated: {e}");
        }
        if let Err(e) = input.read_exact(&mut mac).await {
            Stats::bump(&shared.stats.repl_bad_frames);
            return format!("frame truncated: {e}");
        }
        if let Err(e) = sealer.open(&header_bytes, &header, &payload, &mac) {
            Stats::bump(&shared.stats.repl_bad_frames);
            log::warn!("replication: refused a frame: {e}");
            return format!("bad frame: {e}");
        }
        if matches!(header.kind, Kind::Ping | Kind::Pong) {
            continue;
        }
        let payload = (header.payload_len > 0
            || matches!(header.kind, Kind::Data | Kind::ResyncData))
        .then(|| Arc::new(payload));
        if events
            .send(Event::Frame {
                link: id,
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
    loop {
        let (mut stream, from) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                log::warn!("replication: accept failed: {e}");
                smol::Timer::after(Duration::from_millis(100)).await;
                continue;
            }
        };
        let setup = setup.clone();
        crate::run::spawn(async move {
            let result = handshake_accept(&mut stream, &setup)
                .or(async {
                    smol::Timer::after(HANDSHAKE_TIMEOUT).await;
                    Err(HandshakeError::Refused("handshake timed out".into()))
                })
                .await;
            match result {
                Ok((tx, rx)) => {
                    let _alive = start_link(stream, &setup, tx, rx).await;
                }
                Err(e) => {
                    count_handshake_error(&setup.shared.stats, &e);
                    log::warn!("replication: refused a connection from {from}: {e}");
                }
            }
        })
        .detach();
    }
}
