//! "How is mysqld?", asked over its unix socket in the client protocol
//! itself (`core::mysql_wire`): connect, authenticate as the monitor user,
//! COM_PING, optionally run a write probe, COM_QUIT. No client binary or
//! library, so the answer does not depend on what else is installed, and
//! every way it can go wrong is told apart.
//!
//! One blocking call on the caller's thread (the supervisor runs it with
//! `smol::unblock`), bounded as a whole by `timeout`: every read, write
//! and the connect itself get only the time that is left.
//!
//! This is about the socket only. The supervisor combines the answer with
//! what it knows of the process (alive, just started, being stopped): a
//! `NotStarted` from a process that was started a second ago is normal, a
//! `NotStarted` from one that has run for an hour is not.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::core::mysql_wire::{self as wire, AuthReply, ErrPacket, Response, Step};

/// The largest payload the check accepts. Everything it expects (greeting,
/// OK, ERR, a probe's small result) is far below; a larger length is
/// garbage and is refused from its header, not waited for.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Authentication exchanges after the HandshakeResponse before we give
/// up: a plugin switch, a caching_sha2 round and the final OK need four.
const MAX_AUTH_ROUNDS: usize = 6;
/// How long to wait between connect attempts while mysqld's listen queue
/// is full.
const BACKLOG_RETRY: Duration = Duration::from_millis(10);

/// One health check of one mysqld.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    /// mysqld's `socket` (e.g. /run/mysqld/mysqld.sock).
    pub socket: PathBuf,
    /// The monitor account, `'user'@'localhost'` (docs/mysql.md).
    pub user: String,
    pub password: String,
    /// The whole check, connect to last answer.
    pub timeout: Duration,
    /// SQL run after the ping, e.g.
    /// `REPLACE INTO hadb.probe VALUES (1, NOW())`: proves that mysqld
    /// can commit, not only answer. One statement; a result it returns is
    /// read and discarded.
    pub write_probe: Option<String>,
}

/// What the socket said. Each case names what it saw, for status and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Nobody listens: no socket file, or a file that refuses connections
    /// (left behind by a mysqld that died). mysqld is not running, or has
    /// not yet opened its socket, which it does only once it is ready to
    /// serve, after crash recovery.
    NotStarted(String),
    /// mysqld is there but in transition: it accepted and then closed the
    /// connection without a word, or said it is shutting down (ERROR
    /// 1053), or our session was killed under us (MariaDB's 1927, from a
    /// KILL). Waiting is the right reaction: none of these lasts for a
    /// mysqld that is up, and the next check tells.
    Starting(String),
    /// Authenticated, answered the ping, and ran the write probe if there
    /// is one, all within the timeout.
    Healthy {
        server_version: String,
        elapsed: Duration,
    },
    /// Connected (or queued for a connection) but the greeting, an
    /// answer, or room in the listen queue did not come within the
    /// timeout: a stopped or wedged mysqld, or one whose commits are stuck
    /// (a full disk, a lock). Only a restart clears it.
    Hung(String),
    /// mysqld answered, with an error or with bytes that are not the
    /// protocol: the monitor account is missing or its password is wrong
    /// (1045), the write probe failed, "too many connections" (1040: to a
    /// new client, which is what the load balancer sends, mysqld is not
    /// serving), or the socket belongs to something else. The message says
    /// what to do. A restart does not fix a configuration error, so the
    /// supervisor should not count on one.
    Failing(String),
}

impl Health {
    pub fn is_healthy(&self) -> bool {
        matches!(self, Health::Healthy { .. })
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Health::NotStarted(why) => write!(f, "not started: {why}"),
            Health::Starting(why) => write!(f, "starting or stopping: {why}"),
            Health::Healthy {
                server_version,
                elapsed,
            } => write!(
                f,
                "healthy: {server_version}, answered in {} ms",
                elapsed.as_millis()
            ),
            Health::Hung(why) => write!(f, "hung: {why}"),
            Health::Failing(why) => write!(f, "failing: {why}"),
        }
    }
}

/// Where in the conversation an ERR packet came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// In place of the greeting (e.g. too many connections).
    Greeting,
    Authentication,
    Ping,
    WriteProbe,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Greeting => "in place of the greeting",
            Stage::Authentication => "to authentication",
            Stage::Ping => "to the ping",
            Stage::WriteProbe => "to the write probe",
        })
    }
}

/// Why a check did not end healthy; [`HealthCheck::classify`] turns it
/// into a [`Health`].
#[derive(Debug)]
pub enum MysqlHealthError {
    /// connect() found no socket, or nothing listening on it.
    NoServer {
        socket: PathBuf,
        source: std::io::Error,
    },
    /// connect() failed otherwise (permissions, a path too long).
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    /// Nothing came (or could be sent) within the time left.
    TimedOut {
        waiting_for: &'static str,
        timeout: Duration,
    },
    /// The server closed the connection between packets.
    Closed { waiting_for: &'static str },
    /// The connection closed part-way through a packet.
    CutShort {
        waiting_for: &'static str,
        have: usize,
    },
    Io {
        waiting_for: &'static str,
        source: std::io::Error,
    },
    /// Bytes that are not the MySQL protocol.
    Protocol {
        waiting_for: &'static str,
        source: wire::Error,
    },
    /// The server answered with an ERR packet.
    Server { stage: Stage, err: ErrPacket },
    /// The account uses an authentication plugin this client does not
    /// speak.
    Plugin(String),
    /// What we were asked to send cannot be sent (a NUL in the user name).
    Config(String),
}

impl std::fmt::Display for MysqlHealthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MysqlHealthError::NoServer { socket, source } => {
                write!(f, "nothing listens at {}: {source}", socket.display())
            }
            MysqlHealthError::Connect { socket, source } => write!(
                f,
                "cannot connect to {}: {source}; check mysql's socket path and that hadb runs as root",
                socket.display()
            ),
            MysqlHealthError::TimedOut {
                waiting_for,
                timeout,
            } => write!(
                f,
                "nothing within {} ms while waiting for {waiting_for}",
                timeout.as_millis()
            ),
            MysqlHealthError::Closed { waiting_for } => {
                write!(
                    f,
                    "mysqld closed the connection while we waited for {waiting_for}"
                )
            }
            MysqlHealthError::CutShort { waiting_for, have } => write!(
                f,
                "the connection closed part-way through {waiting_for} ({have} bytes of a packet)"
            ),
            MysqlHealthError::Io {
                waiting_for,
                source,
            } => write!(
                f,
                "connection failed while waiting for {waiting_for}: {source}"
            ),
            MysqlHealthError::Protocol {
                waiting_for,
                source,
            } => write!(
                f,
                "{waiting_for} is not the MySQL protocol ({source}); is the socket path mysqld's?"
            ),
            MysqlHealthError::Server { stage, err } => {
                write!(f, "mysqld answered {stage} with {err}")
            }
            MysqlHealthError::Plugin(plugin) => write!(
                f,
                "the account authenticates with {plugin}, which hadb does not speak; use mysql_native_password or caching_sha2_password (docs/mysql.md)"
            ),
            MysqlHealthError::Config(why) => write!(f, "{why}"),
        }
    }
}

impl std::error::Error for MysqlHealthError {}

impl HealthCheck {
    /// Runs the check. Never panics and never takes much longer than
    /// `timeout` (a few milliseconds of scheduling).
    pub fn check(&self) -> Health {
        let start = Instant::now();
        match self.run(start + self.timeout) {
            Ok(server_version) => Health::Healthy {
                server_version,
                elapsed: start.elapsed(),
            },
            Err(e) => self.classify(e),
        }
    }

    /// Why each error lands where it does is in the [`Health`] docs.
    pub fn classify(&self, e: MysqlHealthError) -> Health {
        use MysqlHealthError as E;
        match e {
            E::NoServer { .. } => Health::NotStarted(e.to_string()),
            E::TimedOut { .. } => Health::Hung(e.to_string()),
            E::Closed { .. } => {
                Health::Starting(format!("{e} (it is starting up or shutting down)"))
            }
            E::Server { stage, err } => self.classify_err(stage, err),
            E::Connect { .. }
            | E::CutShort { .. }
            | E::Io { .. }
            | E::Protocol { .. }
            | E::Plugin(_)
            | E::Config(_) => Health::Failing(e.to_string()),
        }
    }

    fn classify_err(&self, stage: Stage, err: ErrPacket) -> Health {
        let user = &self.user;
        match err.code {
            wire::ER_SERVER_SHUTDOWN | wire::ER_CONNECTION_KILLED => Health::Starting(format!(
                "mysqld is shutting down or killed our session: {err}"
            )),
            wire::ER_CON_COUNT_ERROR => Health::Failing(format!(
                "mysqld refuses new connections: {err}; max_connections is reached (granting the monitor user CONNECTION ADMIN, CONNECTION_ADMIN on MySQL, lets it past the limit: docs/mysql.md)"
            )),
            wire::ER_ACCESS_DENIED_ERROR | wire::ER_HOST_NOT_PRIVILEGED
                if stage == Stage::Authentication || stage == Stage::Greeting =>
            {
                Health::Failing(format!(
                    "mysqld refused the monitor user '{user}'@'localhost': {err}; create it with CREATE USER '{user}'@'localhost' IDENTIFIED BY '<password>' (docs/mysql.md), or set the password hadb is configured with"
                ))
            }
            _ => match stage {
                Stage::Greeting => Health::Failing(format!("mysqld refused the connection: {err}")),
                Stage::Authentication => Health::Failing(format!(
                    "mysqld refused the monitor user '{user}'@'localhost': {err}"
                )),
                Stage::Ping => Health::Failing(format!("mysqld answered the ping with {err}")),
                Stage::WriteProbe => Health::Failing(format!(
                    "the write probe `{}` failed: {err}; docs/mysql.md says how to create the probe table and grant the monitor user access",
                    self.write_probe.as_deref().unwrap_or("")
                )),
            },
        }
    }

    fn run(&self, deadline: Instant) -> Result<String, MysqlHealthError> {
        let stream = connect(&self.socket, deadline, self.timeout)?;
        let mut c = Conn {
            stream,
            buf: Vec::new(),
            deadline,
            timeout: self.timeout,
        };
        let waiting_for = "the server greeting";
        let (greeting, _) = c.read(waiting_for, 0)?;
        if greeting.first() == Some(&wire::ERR_HEADER) {
            let err = wire::parse_err(&greeting).map_err(protocol(waiting_for))?;
            return Err(MysqlHealthError::Server {
                stage: Stage::Greeting,
                err,
            });
        }
        let hs = wire::parse_handshake(&greeting).map_err(protocol(waiting_for))?;
        let caps = wire::client_capabilities(hs.capabilities, false);
        self.authenticate(&mut c, &hs, caps)?;
        let result = self.commands(&mut c, caps);
        // Said goodbye, mysqld does not log an aborted connection.
        let _ = c.send(&wire::com_quit(), 0);
        result?;
        Ok(hs.server_version)
    }

    fn authenticate(
        &self,
        c: &mut Conn,
        hs: &wire::Handshake,
        caps: u32,
    ) -> Result<(), MysqlHealthError> {
        let password = self.password.as_bytes();
        // Answer in the greeting's plugin when we speak it; otherwise
        // offer native_password, and the server switches us to the
        // account's plugin if that differs.
        let (mut plugin, first) = match wire::scramble_for(&hs.auth_plugin, password, &hs.nonce) {
            Some(s) => (hs.auth_plugin.clone(), s),
            None => (
                wire::NATIVE_PASSWORD.to_owned(),
                wire::native_password_scramble(password, &hs.nonce),
            ),
        };
        let waiting_for = "the authentication result";
        let response = wire::handshake_response(
            caps,
            &wire::HandshakeResponse {
                user: &self.user,
                auth_response: &first,
                auth_plugin: &plugin,
                database: None,
            },
        )
        .map_err(|e| MysqlHealthError::Config(format!("cannot log in as '{}': {e}", self.user)))?;
        let mut seq = c.send(&response, 1)?;
        for _ in 0..MAX_AUTH_ROUNDS {
            let (p, next) = c.read(waiting_for, seq)?;
            seq = next;
            match wire::parse_auth_reply(&p, caps).map_err(protocol(waiting_for))? {
                AuthReply::Ok(_) => return Ok(()),
                AuthReply::Err(err) => {
                    return Err(MysqlHealthError::Server {
                        stage: Stage::Authentication,
                        err,
                    });
                }
                AuthReply::Switch { plugin: to, data } => {
                    let answer = wire::scramble_for(&to, password, &data)
                        .ok_or_else(|| MysqlHealthError::Plugin(to.clone()))?;
                    plugin = to;
                    seq = c.send(&answer, seq)?;
                }
                AuthReply::MoreData(d) if plugin == wire::CACHING_SHA2_PASSWORD => {
                    match d.as_slice() {
                        // The server knew the account's hash: an OK follows.
                        [wire::FAST_AUTH_SUCCESS] => {}
                        // It did not (first login since mysqld started):
                        // the password itself, which a unix socket may
                        // carry because nobody else can read it.
                        [wire::PERFORM_FULL_AUTHENTICATION] => {
                            seq = c.send(&wire::clear_password(password), seq)?;
                        }
                        _ => {
                            return Err(protocol(waiting_for)(wire::Error::Malformed(format!(
                                "caching_sha2_password sent {d:02x?}"
                            ))));
                        }
                    }
                }
                AuthReply::MoreData(_) => {
                    return Err(protocol(waiting_for)(wire::Error::Unexpected {
                        what: "(AuthMoreData) for mysql_native_password",
                        header: wire::AUTH_MORE_DATA,
                    }));
                }
            }
        }
        Err(protocol(waiting_for)(wire::Error::Malformed(format!(
            "authentication did not end after {MAX_AUTH_ROUNDS} exchanges"
        ))))
    }

    fn commands(&self, c: &mut Conn, caps: u32) -> Result<(), MysqlHealthError> {
        let waiting_for = "the answer to COM_PING";
        let seq = c.send(&wire::com_ping(), 0)?;
        let (p, _) = c.read(waiting_for, seq)?;
        match wire::parse_response(&p, caps).map_err(protocol(waiting_for))? {
            Response::Ok(_) => {}
            Response::Err(err) => {
                return Err(MysqlHealthError::Server {
                    stage: Stage::Ping,
                    err,
                });
            }
            Response::ResultSet { .. } => {
                return Err(protocol(waiting_for)(wire::Error::Malformed(
                    "a result set in answer to a ping".into(),
                )));
            }
        }
        let Some(sql) = &self.write_probe else {
            return Ok(());
        };
        let waiting_for = "the answer to the write probe";
        let probe_err = |err| MysqlHealthError::Server {
            stage: Stage::WriteProbe,
            err,
        };
        let mut seq = c.send(&wire::com_query(sql), 0)?;
        // A statement may answer with several results (a CALL does);
        // each says whether another follows.
        loop {
            let (p, next) = c.read(waiting_for, seq)?;
            seq = next;
            let more = match wire::parse_response(&p, caps).map_err(protocol(waiting_for))? {
                Response::Ok(ok) => ok.status & wire::SERVER_MORE_RESULTS_EXISTS != 0,
                Response::Err(err) => return Err(probe_err(err)),
                Response::ResultSet { columns } => {
                    let mut rs = wire::ResultSetSkipper::new(columns, caps);
                    loop {
                        let (p, next) = c.read(waiting_for, seq)?;
                        seq = next;
                        match rs.feed(&p).map_err(protocol(waiting_for))? {
                            Step::More => {}
                            Step::Done { more_results, .. } => break more_results,
                            Step::Err(err) => return Err(probe_err(err)),
                        }
                    }
                }
            };
            if !more {
                return Ok(());
            }
        }
    }
}

fn protocol(waiting_for: &'static str) -> impl Fn(wire::Error) -> MysqlHealthError {
    move |source| MysqlHealthError::Protocol {
        waiting_for,
        source,
    }
}

/// Connects without blocking past `deadline`. A blocking connect() to a
/// unix socket whose listen queue is full waits until mysqld accepts,
/// which a hung mysqld never does; non-blocking, the kernel says EAGAIN
/// and we try again until the deadline.
fn connect(
    socket: &Path,
    deadline: Instant,
    timeout: Duration,
) -> Result<UnixStream, MysqlHealthError> {
    use rustix::io::Errno;
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let failed = |e: Errno| MysqlHealthError::Connect {
        socket: socket.to_owned(),
        source: e.into(),
    };
    let addr = SocketAddrUnix::new(socket).map_err(failed)?;
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(failed)?;
    loop {
        match rustix::net::connect(&fd, &addr) {
            Ok(()) => break,
            Err(Errno::INTR) => {}
            Err(Errno::AGAIN) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(MysqlHealthError::TimedOut {
                        waiting_for: "room in mysqld's listen queue",
                        timeout,
                    });
                }
                std::thread::sleep(left.min(BACKLOG_RETRY));
            }
            Err(e @ (Errno::NOENT | Errno::CONNREFUSED)) => {
                return Err(MysqlHealthError::NoServer {
                    socket: socket.to_owned(),
                    source: e.into(),
                });
            }
            Err(e) => return Err(failed(e)),
        }
    }
    rustix::io::ioctl_fionbio(&fd, false).map_err(failed)?;
    Ok(UnixStream::from(fd))
}

/// A connection with its bytes read but not yet decoded, and the deadline
/// every operation is held to.
struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    deadline: Instant,
    timeout: Duration,
}

impl Conn {
    fn left(&self, waiting_for: &'static str) -> Result<Duration, MysqlHealthError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(MysqlHealthError::TimedOut {
                waiting_for,
                timeout: self.timeout,
            });
        }
        Ok(left)
    }

    fn io_error(&self, waiting_for: &'static str, e: std::io::Error) -> MysqlHealthError {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => MysqlHealthError::TimedOut {
                waiting_for,
                timeout: self.timeout,
            },
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
                MysqlHealthError::Closed { waiting_for }
            }
            _ => MysqlHealthError::Io {
                waiting_for,
                source: e,
            },
        }
    }

    /// Sends `payload` from sequence id `seq`; returns the id the answer
    /// takes.
    fn send(&mut self, payload: &[u8], seq: u8) -> Result<u8, MysqlHealthError> {
        let waiting_for = "room to send";
        let (bytes, next) = wire::frame(payload, seq);
        let left = self.left(waiting_for)?;
        self.stream
            .set_write_timeout(Some(left))
            .and_then(|()| self.stream.write_all(&bytes))
            .map_err(|e| self.io_error(waiting_for, e))?;
        Ok(next)
    }

    /// Reads one payload whose first packet has sequence id `seq`;
    /// returns it and the id of the next packet.
    fn read(
        &mut self,
        waiting_for: &'static str,
        seq: u8,
    ) -> Result<(Vec<u8>, u8), MysqlHealthError> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(d) =
                wire::decode(&self.buf, seq, MAX_PAYLOAD).map_err(protocol(waiting_for))?
            {
                self.buf.drain(..d.used);
                return Ok((d.payload, d.next_seq));
            }
            let left = self.left(waiting_for)?;
            let read = self
                .stream
                .set_read_timeout(Some(left))
                .and_then(|()| self.stream.read(&mut chunk));
            match read {
                Ok(0) if self.buf.is_empty() => {
                    return Err(MysqlHealthError::Closed { waiting_for });
                }
                Ok(0) => {
                    return Err(MysqlHealthError::CutShort {
                        waiting_for,
                        have: self.buf.len(),
                    });
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_error(waiting_for, e)),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn check(socket: PathBuf) -> HealthCheck {
        HealthCheck {
            socket,
            user: "hadb_monitor".into(),
            password: "pw".into(),
            timeout: Duration::from_millis(300),
            write_probe: None,
        }
    }

    #[test]
    fn errors_map_to_the_documented_cases() {
        let c = check("/nonexistent/hadb.sock".into());
        let err = |code, stage| MysqlHealthError::Server {
            stage,
            err: ErrPacket {
                code,
                sql_state: None,
                message: "m".into(),
            },
        };
        assert!(matches!(
            c.classify(err(1045, Stage::Authentication)),
            Health::Failing(m) if m.contains("'hadb_monitor'@'localhost'") && m.contains("CREATE USER")
        ));
        assert!(matches!(
            c.classify(err(1053, Stage::Ping)),
            Health::Starting(_)
        ));
        assert!(matches!(
            c.classify(err(1927, Stage::WriteProbe)),
            Health::Starting(_)
        ));
        assert!(matches!(
            c.classify(err(1040, Stage::Greeting)),
            Health::Failing(m) if m.contains("max_connections")
        ));
        assert!(matches!(
            c.classify(err(1146, Stage::WriteProbe)),
            Health::Failing(m) if m.contains("write probe")
        ));
        assert!(matches!(
            c.classify(MysqlHealthError::Closed { waiting_for: "x" }),
            Health::Starting(_)
        ));
        assert!(matches!(
            c.classify(MysqlHealthError::TimedOut {
                waiting_for: "x",
                timeout: Duration::from_secs(1)
            }),
            Health::Hung(_)
        ));
    }

    #[test]
    fn a_missing_socket_is_not_started() {
        let h = check("/nonexistent/hadb-mysql.sock".into()).check();
        assert!(matches!(h, Health::NotStarted(_)), "{h}");
    }

    #[test]
    fn a_socket_path_too_long_for_sun_path_is_failing() {
        let h = check(PathBuf::from(format!("/tmp/{}", "x".repeat(200)))).check();
        assert!(matches!(h, Health::Failing(_)), "{h}");
    }
}
