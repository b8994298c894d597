//! A client that writes rows over TCP in the MySQL protocol (hadb's own
//! `core::mysql_wire`, no client library) and records which commits were
//! acknowledged, for the end-to-end tests' promise "no acknowledged write
//! is lost".
//!
//! Each row is one autocommit `INSERT` of a new id; the OK packet is the
//! acknowledgement (InnoDB answers it after the commit's flush). A row
//! whose answer never came (the connection broke, or timed out) is
//! "in doubt": it may or may not be there, and is never counted as lost.
//! After any error the connection is dropped and a new one is made, as an
//! application behind a load balancer does, so the writer also measures
//! how long clients could not commit.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hadb::core::mysql_wire::{self as wire, AuthReply, Response};

/// Ids are unique across every writer of a test binary.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// One logged-in connection.
pub struct Conn {
    stream: TcpStream,
    caps: u32,
    buf: Vec<u8>,
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl Conn {
    pub fn connect(
        addr: SocketAddr,
        user: &str,
        password: &str,
        timeout: Duration,
    ) -> io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        let mut c = Conn {
            stream,
            caps: 0,
            buf: Vec::new(),
        };
        let (greeting, _) = c.read(0)?;
        if greeting.first() == Some(&wire::ERR_HEADER) {
            return Err(other(wire::parse_err(&greeting).map_err(other)?));
        }
        let hs = wire::parse_handshake(&greeting).map_err(other)?;
        c.caps = wire::client_capabilities(hs.capabilities, false);
        let pw = password.as_bytes();
        let (plugin, first) = match wire::scramble_for(&hs.auth_plugin, pw, &hs.nonce) {
            Some(s) => (hs.auth_plugin.clone(), s),
            None => (
                wire::NATIVE_PASSWORD.to_owned(),
                wire::native_password_scramble(pw, &hs.nonce),
            ),
        };
        let response = wire::handshake_response(
            c.caps,
            &wire::HandshakeResponse {
                user,
                auth_response: &first,
                auth_plugin: &plugin,
                database: None,
            },
        )
        .map_err(other)?;
        let mut seq = c.send(&response, 1)?;
        for _ in 0..4 {
            let (p, next) = c.read(seq)?;
            seq = next;
            match wire::parse_auth_reply(&p, c.caps).map_err(other)? {
                AuthReply::Ok(_) => return Ok(c),
                AuthReply::Err(e) => return Err(other(format!("login refused: {e}"))),
                AuthReply::Switch { plugin, data } => {
                    let answer = wire::scramble_for(&plugin, pw, &data)
                        .ok_or_else(|| other(format!("cannot speak auth plugin {plugin}")))?;
                    seq = c.send(&answer, seq)?;
                }
                AuthReply::MoreData(d) => {
                    return Err(other(format!("unexpected AuthMoreData {d:02x?}")));
                }
            }
        }
        Err(other("authentication did not end"))
    }

    fn send(&mut self, payload: &[u8], seq: u8) -> io::Result<u8> {
        let (bytes, next) = wire::frame(payload, seq);
        self.stream.write_all(&bytes)?;
        Ok(next)
    }

    fn read(&mut self, seq: u8) -> io::Result<(Vec<u8>, u8)> {
        loop {
            if let Some(d) = wire::decode(&self.buf, seq, 1 << 20).map_err(other)? {
                self.buf.drain(..d.used);
                return Ok((d.payload, d.next_seq));
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// A statement that returns no rows. `Ok(Err(..))`: the server's ERR
    /// packet (the statement did not take effect).
    pub fn execute(&mut self, sql: &str) -> io::Result<Result<(), String>> {
        let seq = self.send(&wire::com_query(sql), 0)?;
        let (p, _) = self.read(seq)?;
        match wire::parse_response(&p, self.caps).map_err(other)? {
            Response::Ok(_) => Ok(Ok(())),
            Response::Err(e) => Ok(Err(e.to_string())),
            Response::ResultSet { .. } => Err(other("a result set where none was expected")),
        }
    }
}

/// What a writer saw, once stopped.
#[derive(Debug, Default, Clone)]
pub struct Record {
    /// Acknowledged ids, with when the acknowledgement arrived.
    pub acked: Vec<(u64, Instant)>,
    /// Ids sent whose answer never came: may or may not be committed.
    pub in_doubt: Vec<u64>,
    /// Ids the server refused with an error: not committed.
    pub refused: Vec<(u64, String)>,
    /// Connection attempts that failed, and the last error.
    pub failed_connects: u64,
    pub last_error: Option<String>,
}

impl Record {
    /// The longest time between two acknowledgements at or after `from`
    /// (the first gap runs from `from` itself): how long clients could not
    /// commit across a fault that happened at `from`.
    pub fn longest_gap_after(&self, from: Instant) -> Duration {
        let mut last = from;
        let mut gap = Duration::ZERO;
        for &(_, at) in self.acked.iter().filter(|(_, at)| *at >= from) {
            gap = gap.max(at - last);
            last = at;
        }
        gap
    }

    pub fn acked_after(&self, from: Instant) -> usize {
        self.acked.iter().filter(|(_, at)| *at >= from).count()
    }
}

/// A thread writing rows until stopped.
pub struct Writer {
    stop: Arc<AtomicBool>,
    record: Arc<Mutex<Record>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Writes `INSERT INTO {table} (id) VALUES (n)` through `addr`, one
    /// row at a time with `pause` between them.
    pub fn start(
        addr: SocketAddr,
        user: &str,
        password: &str,
        table: &str,
        pause: Duration,
    ) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let record = Arc::new(Mutex::new(Record::default()));
        let (user, password, table) = (user.to_owned(), password.to_owned(), table.to_owned());
        let (s, r) = (stop.clone(), record.clone());
        let thread = std::thread::spawn(move || {
            let mut conn: Option<Conn> = None;
            while !s.load(Ordering::Relaxed) {
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => match Conn::connect(addr, &user, &password, Duration::from_secs(10)) {
                        Ok(c) => conn.insert(c),
                        Err(e) => {
                            let mut rec = r.lock().unwrap();
                            rec.failed_connects += 1;
                            rec.last_error = Some(format!("connect: {e}"));
                            drop(rec);
                            std::thread::sleep(Duration::from_millis(250));
                            continue;
                        }
                    },
                };
                let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
                let result = c.execute(&format!("INSERT INTO {table} (id) VALUES ({id})"));
                let now = Instant::now();
                let mut rec = r.lock().unwrap();
                match result {
                    Ok(Ok(())) => rec.acked.push((id, now)),
                    Ok(Err(e)) => {
                        rec.last_error = Some(format!("row {id}: {e}"));
                        rec.refused.push((id, e));
                        conn = None;
                    }
                    Err(e) => {
                        rec.last_error = Some(format!("row {id}: {e}"));
                        rec.in_doubt.push(id);
                        conn = None;
                    }
                }
                drop(rec);
                std::thread::sleep(pause);
            }
        });
        Writer {
            stop,
            record,
            thread: Some(thread),
        }
    }

    /// What it saw so far.
    pub fn snapshot(&self) -> Record {
        self.record.lock().unwrap().clone()
    }

    /// Stops it (after the statement under way, bounded by the 10 s
    /// socket timeout) and returns what it saw.
    pub fn stop(mut self) -> Record {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.snapshot()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
