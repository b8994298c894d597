//! The MySQL client/server protocol's bytes, as much of the client side as
//! a health check needs: packet framing, the connection phase (initial
//! handshake, HandshakeResponse41, the `mysql_native_password` and
//! `caching_sha2_password` exchanges, AuthSwitchRequest), OK / ERR / EOF,
//! COM_PING, COM_QUERY and skipping a text result set.
//!
//! No I/O here: `run::mysql_health` moves the bytes; this module says what
//! they mean. Field layouts follow the protocol pages of the MySQL source
//! documentation and MariaDB's client/server protocol reference, field by
//! field. Every parser takes untrusted bytes and answers an [`Error`],
//! never a panic: the socket may belong to something that is not mysqld.

use std::fmt;

use sha1::Sha1;
use sha2::{Digest, Sha256};

/// A packet's payload length is 3 bytes; a payload of this length or more
/// goes out as several packets, the last one shorter (possibly empty).
pub const MAX_CHUNK: usize = 0xFF_FFFF;
/// 3-byte little-endian payload length, then 1-byte sequence id.
pub const HEADER_LEN: usize = 4;

// Capability flags (client and server share one numbering).
pub const CLIENT_LONG_PASSWORD: u32 = 1;
pub const CLIENT_CONNECT_WITH_DB: u32 = 1 << 3;
pub const CLIENT_PROTOCOL_41: u32 = 1 << 9;
pub const CLIENT_SSL: u32 = 1 << 11;
pub const CLIENT_TRANSACTIONS: u32 = 1 << 13;
pub const CLIENT_SECURE_CONNECTION: u32 = 1 << 15;
pub const CLIENT_MULTI_RESULTS: u32 = 1 << 17;
pub const CLIENT_PLUGIN_AUTH: u32 = 1 << 19;
pub const CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA: u32 = 1 << 21;
pub const CLIENT_DEPRECATE_EOF: u32 = 1 << 24;

/// Status flag: another result follows this one.
pub const SERVER_MORE_RESULTS_EXISTS: u16 = 1 << 3;

// Commands (the first payload byte of a command-phase request).
pub const COM_QUIT: u8 = 0x01;
pub const COM_QUERY: u8 = 0x03;
pub const COM_PING: u8 = 0x0e;

// First payload bytes the server answers with.
pub const OK_HEADER: u8 = 0x00;
pub const AUTH_MORE_DATA: u8 = 0x01;
pub const LOCAL_INFILE: u8 = 0xfb;
pub const EOF_HEADER: u8 = 0xfe;
pub const ERR_HEADER: u8 = 0xff;

// `caching_sha2_password`'s answers inside AuthMoreData.
pub const FAST_AUTH_SUCCESS: u8 = 0x03;
pub const PERFORM_FULL_AUTHENTICATION: u8 = 0x04;

pub const NATIVE_PASSWORD: &str = "mysql_native_password";
pub const CACHING_SHA2_PASSWORD: &str = "caching_sha2_password";

/// utf8mb4_general_ci: every server since 5.5 knows it.
pub const CHARSET_UTF8MB4: u8 = 45;
/// What we tell the server is the largest packet we accept.
pub const CLIENT_MAX_PACKET: u32 = 16 << 20;
/// More columns than MySQL or MariaDB allow in a table: a count above
/// this is garbage, not a result set.
pub const MAX_COLUMNS: u64 = 4096;

// Server error codes a health check tells apart.
pub const ER_CON_COUNT_ERROR: u16 = 1040;
pub const ER_ACCESS_DENIED_ERROR: u16 = 1045;
pub const ER_SERVER_SHUTDOWN: u16 = 1053;
pub const ER_HOST_NOT_PRIVILEGED: u16 = 1130;
pub const ER_OPTION_PREVENTS_STATEMENT: u16 = 1290;
/// MariaDB: the session was killed (KILL CONNECTION).
pub const ER_CONNECTION_KILLED: u16 = 1927;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A field runs past the end of its packet.
    Truncated {
        what: &'static str,
        have: usize,
        need: usize,
    },
    /// A packet's sequence id is not the next one: the stream is out of
    /// step, or it is not the MySQL protocol at all.
    OutOfStep { expected: u8, got: u8 },
    /// A payload longer than the caller is prepared to hold.
    TooLarge { len: usize, max: usize },
    /// The first byte of a server greeting is not protocol version 10.
    ProtocolVersion(u8),
    /// A packet whose first byte has no meaning where it arrived.
    Unexpected { what: &'static str, header: u8 },
    /// Bytes that parse but make no sense (a field out of range, bytes
    /// left over, a value we cannot send).
    Malformed(String),
    /// The server lacks something this client needs.
    Unsupported(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Truncated { what, have, need } => {
                write!(f, "{what} truncated: {have} of {need} bytes")
            }
            Error::OutOfStep { expected, got } => write!(
                f,
                "packet sequence id {got}, expected {expected}: not the MySQL protocol, or the stream is out of step"
            ),
            Error::TooLarge { len, max } => write!(
                f,
                "packet payload of {len} bytes exceeds the {max}-byte limit"
            ),
            Error::ProtocolVersion(v) => write!(
                f,
                "greeting with protocol version {v}, expected 10: not a MySQL or MariaDB server (4.1 or newer)"
            ),
            Error::Unexpected { what, header } => {
                write!(f, "unexpected packet {header:#04x} {what}")
            }
            Error::Malformed(why) => write!(f, "malformed packet: {why}"),
            Error::Unsupported(why) => write!(f, "{why}"),
        }
    }
}

impl std::error::Error for Error {}

/// Reads fields front to back; every read says what it was reading so a
/// short packet is named in the error.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Error> {
        if self.left() < n {
            return Err(Error::Truncated {
                what,
                have: self.left(),
                need: n,
            });
        }
        let b = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(b)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, Error> {
        Ok(self.bytes(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, Error> {
        let b = self.bytes(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, Error> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A NUL-terminated string; `eof_ok` accepts the end of the packet as
    /// the terminator (some servers leave the last NUL out).
    fn nul(&mut self, what: &'static str, eof_ok: bool) -> Result<&'a [u8], Error> {
        let rest = &self.buf[self.pos..];
        match rest.iter().position(|&b| b == 0) {
            Some(n) => {
                self.pos += n + 1;
                Ok(&rest[..n])
            }
            None if eof_ok => {
                self.pos = self.buf.len();
                Ok(rest)
            }
            None => Err(Error::Truncated {
                what,
                have: rest.len(),
                need: rest.len() + 1,
            }),
        }
    }

    /// A length-encoded integer. 0xfb (NULL in a row) and 0xff are not
    /// integers; the caller that allows NULL checks for it first.
    fn lenenc(&mut self, what: &'static str) -> Result<u64, Error> {
        let first = self.u8(what)?;
        let wide = |b: &[u8]| {
            b.iter()
                .rev()
                .fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
        };
        match first {
            0..=0xfa => Ok(u64::from(first)),
            0xfc => Ok(wide(self.bytes(2, what)?)),
            0xfd => Ok(wide(self.bytes(3, what)?)),
            0xfe => Ok(wide(self.bytes(8, what)?)),
            _ => Err(Error::Malformed(format!(
                "{what}: {first:#04x} is not a length-encoded integer"
            ))),
        }
    }

    fn lenenc_bytes(&mut self, what: &'static str) -> Result<&'a [u8], Error> {
        let n = self.lenenc(what)?;
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        self.bytes(n, what)
    }

    fn rest(&mut self) -> &'a [u8] {
        let r = &self.buf[self.pos..];
        self.pos = self.buf.len();
        r
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn put_lenenc(out: &mut Vec<u8>, n: u64) {
    match n {
        0..=0xfa => out.push(n as u8),
        0xfb..=0xffff => {
            out.push(0xfc);
            out.extend_from_slice(&(n as u16).to_le_bytes());
        }
        0x1_0000..=0xff_ffff => {
            out.push(0xfd);
            out.extend_from_slice(&(n as u32).to_le_bytes()[..3]);
        }
        _ => {
            out.push(0xfe);
            out.extend_from_slice(&n.to_le_bytes());
        }
    }
}

// ---------------------------------------------------------------------
// Framing

/// Frames `payload` as packets numbered from `seq`, splitting it at
/// [`MAX_CHUNK`]; a payload that is an exact multiple of it (including
/// an empty one) ends with an empty packet, so the reader knows it ended.
/// Returns the bytes and the sequence id the next packet takes.
pub fn frame(payload: &[u8], mut seq: u8) -> (Vec<u8>, u8) {
    let mut out = Vec::with_capacity(payload.len() + HEADER_LEN * (1 + payload.len() / MAX_CHUNK));
    let mut rest = payload;
    loop {
        let n = rest.len().min(MAX_CHUNK);
        out.extend_from_slice(&(n as u32).to_le_bytes()[..3]);
        out.push(seq);
        out.extend_from_slice(&rest[..n]);
        seq = seq.wrapping_add(1);
        rest = &rest[n..];
        if n < MAX_CHUNK {
            return (out, seq);
        }
    }
}

/// One whole payload, joined from its packets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub payload: Vec<u8>,
    /// Bytes of the input it took, headers included.
    pub used: usize,
    /// The sequence id the next packet (either way) takes.
    pub next_seq: u8,
}

/// Takes one payload from the front of `buf`, whose first packet must
/// carry sequence id `seq`. `Ok(None)`: not all of it has arrived yet.
/// A length past `max` is refused as soon as its header is seen, before
/// waiting for (or holding) its bytes.
pub fn decode(buf: &[u8], seq: u8, max: usize) -> Result<Option<Decoded>, Error> {
    let mut payload = Vec::new();
    let mut pos = 0;
    let mut expected = seq;
    loop {
        let Some(head) = buf.get(pos..pos + HEADER_LEN) else {
            return Ok(None);
        };
        let len = usize::from(head[0]) | usize::from(head[1]) << 8 | usize::from(head[2]) << 16;
        if head[3] != expected {
            return Err(Error::OutOfStep {
                expected,
                got: head[3],
            });
        }
        if payload.len() + len > max {
            return Err(Error::TooLarge {
                len: payload.len() + len,
                max,
            });
        }
        let Some(body) = buf.get(pos + HEADER_LEN..pos + HEADER_LEN + len) else {
            return Ok(None);
        };
        payload.extend_from_slice(body);
        pos += HEADER_LEN + len;
        expected = expected.wrapping_add(1);
        if len < MAX_CHUNK {
            return Ok(Some(Decoded {
                payload,
                used: pos,
                next_seq: expected,
            }));
        }
    }
}

// ---------------------------------------------------------------------
// Connection phase

/// The server's greeting, Protocol::HandshakeV10.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    /// Human-readable, e.g. "10.11.6-MariaDB-0+deb12u1" (MariaDB before 11
    /// prefixes "5.5.5-" for old replication clients; we strip it).
    pub server_version: String,
    pub connection_id: u32,
    /// auth-plugin-data parts 1 and 2 joined, without the trailing NUL:
    /// the nonce the scrambles mix the password with (20 bytes for both
    /// password plugins).
    pub nonce: Vec<u8>,
    /// Both halves of the capability flags.
    pub capabilities: u32,
    pub charset: u8,
    pub status: u16,
    /// The plugin the nonce is meant for; `mysql_native_password` when the
    /// server does not name one.
    pub auth_plugin: String,
}

/// Parses Protocol::HandshakeV10. A server that does not offer the 4.1
/// protocol and secure (scrambled) authentication is refused: every
/// server of the last twenty years does.
pub fn parse_handshake(p: &[u8]) -> Result<Handshake, Error> {
    let mut r = Reader::new(p);
    let version = r.u8("protocol version")?;
    if version == ERR_HEADER {
        return Err(Error::Unexpected {
            what: "(ERR) where the greeting belongs; parse it with parse_err",
            header: version,
        });
    }
    if version != 10 {
        return Err(Error::ProtocolVersion(version));
    }
    let server_version = lossy(r.nul("server version", false)?);
    let server_version = server_version
        .strip_prefix("5.5.5-")
        .map(str::to_owned)
        .unwrap_or(server_version);
    let connection_id = r.u32("connection id")?;
    let part1 = r.bytes(8, "auth-plugin-data-part-1")?;
    r.u8("filler")?;
    let caps_low = r.u16("capability flags (lower)")?;
    let charset = r.u8("character set")?;
    let status = r.u16("status flags")?;
    let caps_high = r.u16("capability flags (upper)")?;
    let capabilities = u32::from(caps_low) | u32::from(caps_high) << 16;
    let auth_len = r.u8("auth-plugin-data length")?;
    // 10 reserved bytes (MariaDB keeps its extended capabilities in the
    // last 4); nothing here needs them.
    r.bytes(10, "reserved")?;
    for (flag, name) in [
        (CLIENT_PROTOCOL_41, "CLIENT_PROTOCOL_41"),
        (CLIENT_SECURE_CONNECTION, "CLIENT_SECURE_CONNECTION"),
    ] {
        if capabilities & flag == 0 {
            return Err(Error::Unsupported(format!(
                "server {server_version} does not offer {name}; hadb needs MySQL 4.1 or newer, or MariaDB"
            )));
        }
    }
    let part2_len = if capabilities & CLIENT_PLUGIN_AUTH != 0 {
        13.max(usize::from(auth_len).saturating_sub(8))
    } else {
        13
    };
    let part2 = r.bytes(part2_len, "auth-plugin-data-part-2")?;
    let mut nonce = [part1, part2].concat();
    if nonce.last() == Some(&0) {
        nonce.pop();
    }
    let auth_plugin = if capabilities & CLIENT_PLUGIN_AUTH != 0 {
        lossy(r.nul("auth plugin name", true)?)
    } else {
        NATIVE_PASSWORD.to_owned()
    };
    Ok(Handshake {
        server_version,
        connection_id,
        nonce,
        capabilities,
        charset,
        status,
        auth_plugin,
    })
}

/// What the client puts in its HandshakeResponse41.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeResponse<'a> {
    pub user: &'a str,
    /// The plugin's answer to the nonce (a scramble; empty for no
    /// password).
    pub auth_response: &'a [u8],
    /// The plugin `auth_response` was made by.
    pub auth_plugin: &'a str,
    /// Schema to start in (CLIENT_CONNECT_WITH_DB), if any.
    pub database: Option<&'a str>,
}

/// The capabilities this client asks for, given what the server offers:
/// the 4.1 protocol with plugin authentication, and EOF packets replaced
/// by OK when the server can (either way is understood).
pub fn client_capabilities(server: u32, with_db: bool) -> u32 {
    let wanted = CLIENT_LONG_PASSWORD
        | CLIENT_PROTOCOL_41
        | CLIENT_TRANSACTIONS
        | CLIENT_SECURE_CONNECTION
        | CLIENT_MULTI_RESULTS
        | CLIENT_PLUGIN_AUTH
        | CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
        | CLIENT_DEPRECATE_EOF
        | if with_db { CLIENT_CONNECT_WITH_DB } else { 0 };
    wanted & server
}

fn nul_free<'a>(s: &'a str, what: &str) -> Result<&'a [u8], Error> {
    if s.as_bytes().contains(&0) {
        return Err(Error::Malformed(format!("{what} contains a NUL byte")));
    }
    Ok(s.as_bytes())
}

/// Builds Protocol::HandshakeResponse41 for the capabilities `caps` (from
/// [`client_capabilities`]). Never asks for TLS: the health check talks
/// over mysqld's local unix socket, which the server counts as secure.
pub fn handshake_response(caps: u32, r: &HandshakeResponse<'_>) -> Result<Vec<u8>, Error> {
    let mut out = Vec::with_capacity(64 + r.user.len() + r.auth_response.len());
    out.extend_from_slice(&(caps & !CLIENT_SSL).to_le_bytes());
    out.extend_from_slice(&CLIENT_MAX_PACKET.to_le_bytes());
    out.push(CHARSET_UTF8MB4);
    out.extend_from_slice(&[0u8; 23]);
    out.extend_from_slice(nul_free(r.user, "user name")?);
    out.push(0);
    if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA != 0 {
        put_lenenc(&mut out, r.auth_response.len() as u64);
    } else {
        let n = u8::try_from(r.auth_response.len()).map_err(|_| {
            Error::Malformed(format!(
                "auth response of {} bytes does not fit a 1-byte length",
                r.auth_response.len()
            ))
        })?;
        out.push(n);
    }
    out.extend_from_slice(r.auth_response);
    if caps & CLIENT_CONNECT_WITH_DB != 0 {
        out.extend_from_slice(nul_free(r.database.unwrap_or(""), "database name")?);
        out.push(0);
    }
    if caps & CLIENT_PLUGIN_AUTH != 0 {
        out.extend_from_slice(nul_free(r.auth_plugin, "auth plugin name")?);
        out.push(0);
    }
    Ok(out)
}

fn xor(a: &[u8], b: &[u8]) -> Vec<u8> {
    a.iter().zip(b).map(|(x, y)| x ^ y).collect()
}

/// `mysql_native_password`: SHA1(password) XOR SHA1(nonce, SHA1(SHA1(password))).
/// The server stores SHA1(SHA1(password)) and can check this without ever
/// seeing the password. No password: an empty answer.
pub fn native_password_scramble(password: &[u8], nonce: &[u8]) -> Vec<u8> {
    if password.is_empty() {
        return Vec::new();
    }
    let stage1 = Sha1::digest(password);
    let stage2 = Sha1::digest(stage1);
    let mut h = Sha1::new();
    h.update(nonce);
    h.update(stage2);
    xor(&stage1, &h.finalize())
}

/// `caching_sha2_password`'s fast-path answer:
/// SHA256(password) XOR SHA256(SHA256(SHA256(password)), nonce) (note the
/// order: unlike the SHA1 plugin, the nonce comes last).
pub fn caching_sha2_scramble(password: &[u8], nonce: &[u8]) -> Vec<u8> {
    if password.is_empty() {
        return Vec::new();
    }
    let stage1 = Sha256::digest(password);
    let stage2 = Sha256::digest(stage1);
    let mut h = Sha256::new();
    h.update(stage2);
    h.update(nonce);
    xor(&stage1, &h.finalize())
}

/// `caching_sha2_password`'s full authentication on a secure transport
/// (TLS, or a unix socket, which is what this client uses): the password
/// itself, NUL-terminated.
pub fn clear_password(password: &[u8]) -> Vec<u8> {
    let mut out = password.to_vec();
    out.push(0);
    out
}

/// The scramble `plugin` expects for `nonce`; `None` for a plugin this
/// client does not speak.
pub fn scramble_for(plugin: &str, password: &[u8], nonce: &[u8]) -> Option<Vec<u8>> {
    match plugin {
        NATIVE_PASSWORD => Some(native_password_scramble(password, nonce)),
        CACHING_SHA2_PASSWORD => Some(caching_sha2_scramble(password, nonce)),
        _ => None,
    }
}

/// What the server says to an authentication packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthReply {
    /// Authenticated; the command phase starts.
    Ok(OkPacket),
    Err(ErrPacket),
    /// AuthSwitchRequest: answer `plugin`'s challenge `data` instead (the
    /// account uses another plugin than the greeting's).
    Switch {
        plugin: String,
        data: Vec<u8>,
    },
    /// AuthMoreData: plugin-specific bytes (the 0x01 tag removed).
    MoreData(Vec<u8>),
}

/// Parses the server's answer during authentication.
pub fn parse_auth_reply(p: &[u8], caps: u32) -> Result<AuthReply, Error> {
    match p.first() {
        None => Err(Error::Truncated {
            what: "authentication reply",
            have: 0,
            need: 1,
        }),
        Some(&OK_HEADER) => Ok(AuthReply::Ok(parse_ok(p, caps)?)),
        Some(&ERR_HEADER) => Ok(AuthReply::Err(parse_err(p)?)),
        Some(&AUTH_MORE_DATA) => Ok(AuthReply::MoreData(p[1..].to_vec())),
        Some(&EOF_HEADER) => {
            // A lone 0xfe is the pre-4.1 "switch to the old password
            // hash" request, which no supported server sends.
            if p.len() == 1 {
                return Err(Error::Unsupported(
                    "server asks for the pre-4.1 password hash (mysql_old_password); set a new password for the account".into(),
                ));
            }
            let mut r = Reader::new(&p[1..]);
            let plugin = lossy(r.nul("auth switch plugin name", false)?);
            let mut data = r.rest().to_vec();
            if data.last() == Some(&0) {
                data.pop();
            }
            Ok(AuthReply::Switch { plugin, data })
        }
        Some(&h) => Err(Error::Unexpected {
            what: "during authentication",
            header: h,
        }),
    }
}

// ---------------------------------------------------------------------
// Generic responses

/// OK_Packet (header 0x00, or 0xfe where it ends a result set under
/// CLIENT_DEPRECATE_EOF).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OkPacket {
    pub affected_rows: u64,
    pub last_insert_id: u64,
    pub status: u16,
    pub warnings: u16,
    /// Human-readable info and session-state changes, unparsed.
    pub info: Vec<u8>,
}

pub fn parse_ok(p: &[u8], caps: u32) -> Result<OkPacket, Error> {
    let mut r = Reader::new(p);
    let h = r.u8("OK header")?;
    if h != OK_HEADER && h != EOF_HEADER {
        return Err(Error::Unexpected {
            what: "where an OK packet belongs",
            header: h,
        });
    }
    let affected_rows = r.lenenc("affected rows")?;
    let last_insert_id = r.lenenc("last insert id")?;
    let (status, warnings) = if caps & CLIENT_PROTOCOL_41 != 0 {
        (r.u16("status flags")?, r.u16("warnings")?)
    } else if caps & CLIENT_TRANSACTIONS != 0 {
        (r.u16("status flags")?, 0)
    } else {
        (0, 0)
    };
    Ok(OkPacket {
        affected_rows,
        last_insert_id,
        status,
        warnings,
        info: r.rest().to_vec(),
    })
}

/// ERR_Packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrPacket {
    pub code: u16,
    /// Five characters, e.g. "28000"; absent in errors sent before the
    /// client said it speaks 4.1 (such as "too many connections" in place
    /// of the greeting).
    pub sql_state: Option<String>,
    pub message: String,
}

impl fmt::Display for ErrPacket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.sql_state {
            Some(s) => write!(f, "ERROR {} ({s}): {}", self.code, self.message),
            None => write!(f, "ERROR {}: {}", self.code, self.message),
        }
    }
}

pub fn parse_err(p: &[u8]) -> Result<ErrPacket, Error> {
    let mut r = Reader::new(p);
    let h = r.u8("ERR header")?;
    if h != ERR_HEADER {
        return Err(Error::Unexpected {
            what: "where an ERR packet belongs",
            header: h,
        });
    }
    let code = r.u16("error code")?;
    let sql_state = if r.buf.get(r.pos) == Some(&b'#') {
        r.u8("SQL state marker")?;
        Some(lossy(r.bytes(5, "SQL state")?))
    } else {
        None
    };
    Ok(ErrPacket {
        code,
        sql_state,
        message: lossy(r.rest()),
    })
}

/// EOF_Packet (4.1 form).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EofPacket {
    pub warnings: u16,
    pub status: u16,
}

/// An EOF packet is 0xfe and shorter than 9 bytes: a longer packet that
/// starts with 0xfe is a row whose first value is 2^24 bytes or longer.
pub fn is_eof(p: &[u8]) -> bool {
    p.first() == Some(&EOF_HEADER) && p.len() < 9
}

pub fn parse_eof(p: &[u8]) -> Result<EofPacket, Error> {
    if !is_eof(p) {
        return Err(Error::Unexpected {
            what: "where an EOF packet belongs",
            header: p.first().copied().unwrap_or(0),
        });
    }
    let mut r = Reader::new(&p[1..]);
    Ok(EofPacket {
        warnings: r.u16("EOF warnings")?,
        status: r.u16("EOF status flags")?,
    })
}

// ---------------------------------------------------------------------
// Command phase

pub fn com_ping() -> Vec<u8> {
    vec![COM_PING]
}

pub fn com_quit() -> Vec<u8> {
    vec![COM_QUIT]
}

pub fn com_query(sql: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + sql.len());
    out.push(COM_QUERY);
    out.extend_from_slice(sql.as_bytes());
    out
}

/// The first payload answering a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Ok(OkPacket),
    Err(ErrPacket),
    /// A text result set of this many columns follows; feed its packets
    /// to a [`ResultSetSkipper`].
    ResultSet {
        columns: u64,
    },
}

/// Parses the first answer to COM_PING or COM_QUERY. A LOCAL INFILE
/// request is refused: this client never sends files.
pub fn parse_response(p: &[u8], caps: u32) -> Result<Response, Error> {
    match p.first() {
        None => Err(Error::Truncated {
            what: "command response",
            have: 0,
            need: 1,
        }),
        Some(&OK_HEADER) => Ok(Response::Ok(parse_ok(p, caps)?)),
        Some(&ERR_HEADER) => Ok(Response::Err(parse_err(p)?)),
        Some(&LOCAL_INFILE) => Err(Error::Unsupported(
            "server asks for a LOCAL INFILE; the health check sends no files (use a plain INSERT/REPLACE as the write probe)".into(),
        )),
        Some(_) => {
            let mut r = Reader::new(p);
            let columns = r.lenenc("column count")?;
            if r.left() != 0 {
                return Err(Error::Malformed(format!(
                    "{} bytes after the column count",
                    r.left()
                )));
            }
            if columns == 0 || columns > MAX_COLUMNS {
                return Err(Error::Malformed(format!(
                    "result set of {columns} columns"
                )));
            }
            Ok(Response::ResultSet { columns })
        }
    }
}

/// Where a [`ResultSetSkipper`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RsState {
    Columns {
        seen: u64,
    },
    /// Column definitions done; an EOF packet marks their end (without
    /// CLIENT_DEPRECATE_EOF).
    ColumnsEof,
    Rows,
    Done,
}

/// What feeding one packet to a skipper led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Give it the next packet.
    More,
    /// The result set ended. If `more_results`, another response follows
    /// (parse it with [`parse_response`]).
    Done { rows: u64, more_results: bool },
    /// The server failed part-way (a row could not be produced).
    Err(ErrPacket),
}

/// Reads past a text result set packet by packet, checking each is what
/// the protocol says comes next: column definitions, an EOF (unless
/// CLIENT_DEPRECATE_EOF), rows, then an EOF or OK (or an ERR).
#[derive(Debug, Clone)]
pub struct ResultSetSkipper {
    columns: u64,
    caps: u32,
    state: RsState,
    rows: u64,
}

impl ResultSetSkipper {
    pub fn new(columns: u64, caps: u32) -> Self {
        ResultSetSkipper {
            columns,
            caps,
            state: RsState::Columns { seen: 0 },
            rows: 0,
        }
    }

    fn deprecate_eof(&self) -> bool {
        self.caps & CLIENT_DEPRECATE_EOF != 0
    }

    pub fn feed(&mut self, p: &[u8]) -> Result<Step, Error> {
        if p.first() == Some(&ERR_HEADER) && self.state != RsState::Done {
            self.state = RsState::Done;
            return Ok(Step::Err(parse_err(p)?));
        }
        match self.state {
            RsState::Columns { seen } => {
                check_column_definition(p)?;
                let seen = seen + 1;
                self.state = if seen < self.columns {
                    RsState::Columns { seen }
                } else if self.deprecate_eof() {
                    RsState::Rows
                } else {
                    RsState::ColumnsEof
                };
                Ok(Step::More)
            }
            RsState::ColumnsEof => {
                parse_eof(p)?;
                self.state = RsState::Rows;
                Ok(Step::More)
            }
            RsState::Rows => {
                // Under CLIENT_DEPRECATE_EOF the end is an OK packet with
                // the 0xfe header, which may carry info past 9 bytes; a
                // row that starts with 0xfe is at least 2^24 bytes long.
                let end = p.first() == Some(&EOF_HEADER)
                    && if self.deprecate_eof() {
                        p.len() < MAX_CHUNK
                    } else {
                        p.len() < 9
                    };
                if !end {
                    check_row(p, self.columns)?;
                    self.rows += 1;
                    return Ok(Step::More);
                }
                let status = if self.deprecate_eof() {
                    parse_ok(p, self.caps)?.status
                } else {
                    parse_eof(p)?.status
                };
                self.state = RsState::Done;
                Ok(Step::Done {
                    rows: self.rows,
                    more_results: status & SERVER_MORE_RESULTS_EXISTS != 0,
                })
            }
            RsState::Done => Err(Error::Malformed(
                "packet after the end of the result set".into(),
            )),
        }
    }
}

/// Protocol::ColumnDefinition41: six length-encoded strings (catalog,
/// schema, table, original table, name, original name), then the
/// length of the fixed-size fields (0x0c) and those fields.
fn check_column_definition(p: &[u8]) -> Result<(), Error> {
    let mut r = Reader::new(p);
    for what in [
        "column catalog",
        "column schema",
        "column table",
        "column original table",
        "column name",
        "column original name",
    ] {
        r.lenenc_bytes(what)?;
    }
    let fixed = r.lenenc("column fixed-length fields")?;
    let fixed = usize::try_from(fixed).unwrap_or(usize::MAX);
    r.bytes(fixed, "column fixed-length fields")?;
    Ok(())
}

/// ProtocolText::ResultsetRow: one length-encoded string or 0xfb (NULL)
/// per column, and nothing after the last.
fn check_row(p: &[u8], columns: u64) -> Result<(), Error> {
    let mut r = Reader::new(p);
    for _ in 0..columns {
        if r.buf.get(r.pos) == Some(&LOCAL_INFILE) {
            r.u8("NULL")?;
        } else {
            r.lenenc_bytes("row value")?;
        }
    }
    if r.left() != 0 {
        return Err(Error::Malformed(format!(
            "{} bytes after the last value of a {columns}-column row",
            r.left()
        )));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    const CAPS41: u32 = CLIENT_PROTOCOL_41 | CLIENT_TRANSACTIONS;

    // --- framing

    #[test]
    fn frames_a_small_payload_with_its_sequence_id() {
        let (b, next) = frame(&[COM_PING], 0);
        assert_eq!(b, hex("01 00 00 00 0e"));
        assert_eq!(next, 1);
        let (b, next) = frame(b"", 255);
        assert_eq!(b, hex("00 00 00 ff"));
        assert_eq!(next, 0, "sequence ids wrap");
    }

    #[test]
    fn splits_payloads_of_16_mib_and_more() {
        let payload = vec![7u8; MAX_CHUNK + 5];
        let (b, next) = frame(&payload, 3);
        assert_eq!(b.len(), payload.len() + 2 * HEADER_LEN);
        assert_eq!(&b[..4], &hex("ff ff ff 03")[..]);
        assert_eq!(&b[4 + MAX_CHUNK..8 + MAX_CHUNK], &hex("05 00 00 04")[..]);
        assert_eq!(next, 5);
        let d = decode(&b, 3, 32 << 20).unwrap().unwrap();
        assert_eq!(d.payload, payload);
        assert_eq!(d.used, b.len());
        assert_eq!(d.next_seq, 5);

        // Exactly one chunk long: an empty packet says it ended.
        let payload = vec![1u8; MAX_CHUNK];
        let (b, next) = frame(&payload, 0);
        assert_eq!(b.len(), MAX_CHUNK + 2 * HEADER_LEN);
        assert_eq!(&b[b.len() - 4..], &hex("00 00 00 01")[..]);
        assert_eq!(next, 2);
        let d = decode(&b, 0, 32 << 20).unwrap().unwrap();
        assert_eq!(d.payload.len(), MAX_CHUNK);
        // Without the empty packet, it is not complete yet.
        assert_eq!(decode(&b[..b.len() - 4], 0, 32 << 20).unwrap(), None);
    }

    #[test]
    fn decode_waits_for_whole_packets_and_leaves_the_rest() {
        let mut b = hex("03 00 00 01 00 00 00");
        b.extend_from_slice(&hex("01 00 00 02 0e"));
        for cut in 0..7 {
            assert_eq!(decode(&b[..cut], 1, 100).unwrap(), None, "cut at {cut}");
        }
        let d = decode(&b, 1, 100).unwrap().unwrap();
        assert_eq!(d.payload, vec![0, 0, 0]);
        assert_eq!(d.used, 7);
        assert_eq!(d.next_seq, 2);
        let d2 = decode(&b[d.used..], d.next_seq, 100).unwrap().unwrap();
        assert_eq!(d2.payload, vec![0x0e]);
    }

    #[test]
    fn decode_refuses_a_wrong_sequence_id_and_oversized_lengths_early() {
        assert_eq!(
            decode(&hex("01 00 00 05 00"), 1, 100),
            Err(Error::OutOfStep {
                expected: 1,
                got: 5
            })
        );
        // "HTTP/1.1 ..." read as a header: the sequence id is 'P'.
        assert!(matches!(
            decode(b"HTTP/1.1 400", 0, 1 << 20),
            Err(Error::OutOfStep { got: b'P', .. })
        ));
        // Refused from the header alone, before the 1 MiB arrives.
        assert_eq!(
            decode(&hex("00 00 10 00"), 0, 1000),
            Err(Error::TooLarge {
                len: 1 << 20,
                max: 1000
            })
        );
    }

    // --- greeting

    /// A MariaDB 10.11 greeting as sent on its unix socket (nonce bytes
    /// replaced by a recognisable pattern).
    fn mariadb_greeting() -> Vec<u8> {
        let mut p = vec![10];
        p.extend_from_slice(b"5.5.5-10.11.6-MariaDB-0+deb12u1\0");
        p.extend_from_slice(&42u32.to_le_bytes());
        p.extend_from_slice(b"ABCDEFGH");
        p.push(0);
        p.extend_from_slice(&0xf7feu16.to_le_bytes());
        p.push(45);
        p.extend_from_slice(&2u16.to_le_bytes());
        p.extend_from_slice(&0x81ffu16.to_le_bytes());
        p.push(21);
        p.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x1d, 0, 0, 0]);
        p.extend_from_slice(b"IJKLMNOPQRST\0");
        p.extend_from_slice(b"mysql_native_password\0");
        p
    }

    #[test]
    fn parses_a_mariadb_greeting() {
        let h = parse_handshake(&mariadb_greeting()).unwrap();
        assert_eq!(h.server_version, "10.11.6-MariaDB-0+deb12u1");
        assert_eq!(h.connection_id, 42);
        assert_eq!(h.nonce, b"ABCDEFGHIJKLMNOPQRST");
        assert_eq!(h.capabilities, 0x81ff_f7fe);
        assert_eq!(h.charset, 45);
        assert_eq!(h.status, 2);
        assert_eq!(h.auth_plugin, NATIVE_PASSWORD);
        assert_ne!(h.capabilities & CLIENT_PLUGIN_AUTH, 0);
    }

    #[test]
    fn parses_a_greeting_without_the_plugin_names_nul() {
        let mut p = mariadb_greeting();
        p.pop();
        assert_eq!(parse_handshake(&p).unwrap().auth_plugin, NATIVE_PASSWORD);
    }

    #[test]
    fn a_greeting_without_plugin_auth_implies_native_password() {
        let mut p = mariadb_greeting();
        let caps_high = 1 + p.iter().position(|&b| b == 0).unwrap() + 4 + 8 + 1 + 2 + 1 + 2;
        p[caps_high..caps_high + 2].copy_from_slice(&0x8177u16.to_le_bytes()); // no PLUGIN_AUTH
        p[caps_high + 2] = 0;
        let end = p.len() - b"mysql_native_password\0".len();
        p.truncate(end);
        let h = parse_handshake(&p).unwrap();
        assert_eq!(h.auth_plugin, NATIVE_PASSWORD);
        assert_eq!(h.nonce.len(), 20);
    }

    #[test]
    fn every_truncated_greeting_is_an_error() {
        let p = mariadb_greeting();
        // Up to (not including) the last byte of part 2's NUL, a cut is
        // an error; past it, only the plugin name is shortened.
        let part2_end = p.len() - b"mysql_native_password\0".len();
        for cut in 0..part2_end {
            assert!(
                parse_handshake(&p[..cut]).is_err(),
                "a greeting cut at {cut} bytes was accepted"
            );
        }
    }

    #[test]
    fn refuses_other_protocol_versions_and_old_servers() {
        let mut p = mariadb_greeting();
        p[0] = 9;
        assert_eq!(parse_handshake(&p), Err(Error::ProtocolVersion(9)));
        assert!(matches!(
            parse_handshake(b"\xff\x10\x04Too many connections"),
            Err(Error::Unexpected { header: 0xff, .. })
        ));
        let mut p = mariadb_greeting();
        let caps_low = 1 + p.iter().position(|&b| b == 0).unwrap() + 4 + 8 + 1;
        p[caps_low + 1] &= !((CLIENT_SECURE_CONNECTION >> 8) as u8);
        assert!(matches!(
            parse_handshake(&p),
            Err(Error::Unsupported(m)) if m.contains("CLIENT_SECURE_CONNECTION")
        ));
    }

    // --- handshake response

    #[test]
    fn builds_a_handshake_response41() {
        let server = 0x81ff_f7fe | CLIENT_DEPRECATE_EOF;
        let caps = client_capabilities(server, false);
        assert_eq!(caps & CLIENT_CONNECT_WITH_DB, 0);
        assert_ne!(caps & CLIENT_DEPRECATE_EOF, 0);
        let p = handshake_response(
            caps,
            &HandshakeResponse {
                user: "mon",
                auth_response: &[0xaa; 20],
                auth_plugin: NATIVE_PASSWORD,
                database: None,
            },
        )
        .unwrap();
        let mut want = caps.to_le_bytes().to_vec();
        want.extend_from_slice(&hex("00 00 00 01 2d"));
        want.extend_from_slice(&[0; 23]);
        want.extend_from_slice(b"mon\0");
        want.push(20);
        want.extend_from_slice(&[0xaa; 20]);
        want.extend_from_slice(b"mysql_native_password\0");
        assert_eq!(p, want);
    }

    #[test]
    fn handshake_response_with_a_database_and_a_one_byte_length() {
        let caps = CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION | CLIENT_CONNECT_WITH_DB;
        let p = handshake_response(
            caps,
            &HandshakeResponse {
                user: "u",
                auth_response: b"xy",
                auth_plugin: NATIVE_PASSWORD,
                database: Some("hadb"),
            },
        )
        .unwrap();
        assert_eq!(
            &p[32..],
            b"u\0\x02xyhadb\0",
            "no plugin name without PLUGIN_AUTH"
        );
        let too_long = vec![0u8; 300];
        assert!(
            handshake_response(
                caps,
                &HandshakeResponse {
                    user: "u",
                    auth_response: &too_long,
                    auth_plugin: NATIVE_PASSWORD,
                    database: None,
                },
            )
            .is_err()
        );
        assert!(
            handshake_response(
                caps,
                &HandshakeResponse {
                    user: "a\0b",
                    auth_response: b"",
                    auth_plugin: NATIVE_PASSWORD,
                    database: None,
                },
            )
            .is_err()
        );
    }

    // --- scrambles

    #[test]
    fn native_password_scramble_matches_a_known_vector() {
        // SHA1("secret") XOR SHA1("ABCDEFGHIJKLMNOPQRST" + SHA1(SHA1("secret"))),
        // computed independently (Python hashlib).
        assert_eq!(
            native_password_scramble(b"secret", b"ABCDEFGHIJKLMNOPQRST"),
            hex("28441590674285e7d03cae7af237504797f70e91")
        );
        assert!(native_password_scramble(b"", b"ABCDEFGHIJKLMNOPQRST").is_empty());
    }

    #[test]
    fn caching_sha2_scramble_matches_mysqls_own_test_vector() {
        // The vector MySQL's unit tests check generate_sha256_scramble with.
        assert_eq!(
            caching_sha2_scramble(b"Ab12#$Cd56&*", b"eF!@34gH%^78"),
            hex("6a4537966b296359248d64860ad6cc2a06478c26eaaa3b02694c8502f55bc8dc")
        );
        assert!(caching_sha2_scramble(b"", b"x").is_empty());
        assert_eq!(clear_password(b"pw"), b"pw\0");
        assert_eq!(scramble_for("client_ed25519", b"pw", b"n"), None);
    }

    // --- authentication replies

    #[test]
    fn parses_auth_switch_and_more_data() {
        let mut p = vec![0xfe];
        p.extend_from_slice(b"mysql_native_password\0");
        p.extend_from_slice(b"ABCDEFGHIJKLMNOPQRST\0");
        assert_eq!(
            parse_auth_reply(&p, CAPS41).unwrap(),
            AuthReply::Switch {
                plugin: NATIVE_PASSWORD.into(),
                data: b"ABCDEFGHIJKLMNOPQRST".to_vec()
            }
        );
        assert_eq!(
            parse_auth_reply(&[0x01, FAST_AUTH_SUCCESS], CAPS41).unwrap(),
            AuthReply::MoreData(vec![FAST_AUTH_SUCCESS])
        );
        assert_eq!(
            parse_auth_reply(&[0x01, PERFORM_FULL_AUTHENTICATION], CAPS41).unwrap(),
            AuthReply::MoreData(vec![PERFORM_FULL_AUTHENTICATION])
        );
        assert!(matches!(
            parse_auth_reply(&[0xfe], CAPS41),
            Err(Error::Unsupported(_))
        ));
        assert!(parse_auth_reply(b"\xfeno-nul-plugin", CAPS41).is_err());
        assert!(parse_auth_reply(&[], CAPS41).is_err());
        assert!(matches!(
            parse_auth_reply(&[0x42], CAPS41),
            Err(Error::Unexpected { header: 0x42, .. })
        ));
    }

    // --- OK / ERR / EOF

    #[test]
    fn parses_ok_packets() {
        let ok = parse_ok(&hex("00 00 00 02 00 00 00"), CAPS41).unwrap();
        assert_eq!(ok.status, 2);
        assert_eq!(ok.affected_rows, 0);
        let ok = parse_ok(
            &hex("00 fc 00 01 fd 01 00 01 02 00 01 00 69 6e 66 6f"),
            CAPS41,
        )
        .unwrap();
        assert_eq!(ok.affected_rows, 256);
        assert_eq!(ok.last_insert_id, 0x01_0001);
        assert_eq!(ok.warnings, 1);
        assert_eq!(ok.info, b"info");
        for cut in 1..7 {
            assert!(
                parse_ok(&hex("00 00 00 02 00 00 00")[..cut], CAPS41).is_err(),
                "{cut}"
            );
        }
        assert!(
            parse_ok(&hex("00 ff"), CAPS41).is_err(),
            "0xff is not lenenc"
        );
        assert!(parse_ok(&hex("00 fe 01 02"), CAPS41).is_err());
    }

    #[test]
    fn parses_err_packets_with_and_without_sql_state() {
        let mut p = hex("ff 15 04 23");
        p.extend_from_slice(b"28000Access denied for user 'x'@'localhost'");
        let e = parse_err(&p).unwrap();
        assert_eq!(e.code, ER_ACCESS_DENIED_ERROR);
        assert_eq!(e.sql_state.as_deref(), Some("28000"));
        assert_eq!(e.message, "Access denied for user 'x'@'localhost'");
        assert_eq!(
            e.to_string(),
            "ERROR 1045 (28000): Access denied for user 'x'@'localhost'"
        );
        let e = parse_err(b"\xff\x10\x04Too many connections").unwrap();
        assert_eq!(e.code, ER_CON_COUNT_ERROR);
        assert_eq!(e.sql_state, None);
        assert_eq!(e.to_string(), "ERROR 1040: Too many connections");
        assert!(parse_err(&hex("ff 15")).is_err());
        assert!(parse_err(&hex("ff 15 04 23 32 38")).is_err());
        assert!(parse_err(&hex("00 15 04")).is_err());
    }

    #[test]
    fn parses_eof_packets() {
        assert_eq!(
            parse_eof(&hex("fe 00 00 02 00")).unwrap(),
            EofPacket {
                warnings: 0,
                status: 2
            }
        );
        assert!(parse_eof(&hex("fe 00")).is_err());
        assert!(parse_eof(&hex("fe 00 00 00 00 00 00 00 00 00")).is_err());
        assert!(parse_eof(&[]).is_err());
    }

    // --- commands and results

    #[test]
    fn builds_commands() {
        assert_eq!(com_ping(), vec![0x0e]);
        assert_eq!(com_quit(), vec![0x01]);
        assert_eq!(com_query("SELECT 1"), b"\x03SELECT 1");
    }

    #[test]
    fn parses_command_responses() {
        assert!(matches!(
            parse_response(&hex("00 01 00 02 00 00 00"), CAPS41).unwrap(),
            Response::Ok(OkPacket {
                affected_rows: 1,
                ..
            })
        ));
        assert!(matches!(
            parse_response(
                b"\xff\x7a\x04#42S02Table 'hadb.probe' doesn't exist",
                CAPS41
            )
            .unwrap(),
            Response::Err(ErrPacket { code: 1146, .. })
        ));
        assert_eq!(
            parse_response(&[2], CAPS41).unwrap(),
            Response::ResultSet { columns: 2 }
        );
        assert!(parse_response(&[], CAPS41).is_err());
        assert!(parse_response(&[0xfb], CAPS41).is_err());
        assert!(parse_response(&[2, 0], CAPS41).is_err());
        assert!(
            parse_response(&hex("fc 01 20"), CAPS41).is_err(),
            "8193 columns"
        );
        assert!(parse_response(&hex("fd 01"), CAPS41).is_err());
    }

    fn column(name: &str) -> Vec<u8> {
        let mut p = Vec::new();
        for s in ["def", "", "", "", name, ""] {
            p.push(s.len() as u8);
            p.extend_from_slice(s.as_bytes());
        }
        p.push(0x0c);
        p.extend_from_slice(&hex("2d 00 04 00 00 00 fd 00 00 1f 00 00"));
        p
    }

    fn row(values: &[Option<&str>]) -> Vec<u8> {
        let mut p = Vec::new();
        for v in values {
            match v {
                None => p.push(0xfb),
                Some(s) => {
                    p.push(s.len() as u8);
                    p.extend_from_slice(s.as_bytes());
                }
            }
        }
        p
    }

    #[test]
    fn skips_a_result_set_with_eof_packets() {
        let mut s = ResultSetSkipper::new(2, CAPS41);
        assert_eq!(s.feed(&column("a")).unwrap(), Step::More);
        assert_eq!(s.feed(&column("b")).unwrap(), Step::More);
        assert_eq!(s.feed(&hex("fe 00 00 02 00")).unwrap(), Step::More);
        assert_eq!(s.feed(&row(&[Some("1"), None])).unwrap(), Step::More);
        assert_eq!(s.feed(&row(&[Some(""), Some("x")])).unwrap(), Step::More);
        assert_eq!(
            s.feed(&hex("fe 00 00 0a 00")).unwrap(),
            Step::Done {
                rows: 2,
                more_results: true
            }
        );
        assert!(s.feed(&hex("fe 00 00 02 00")).is_err());
    }

    #[test]
    fn skips_a_result_set_ending_in_ok_under_deprecate_eof() {
        let caps = CAPS41 | CLIENT_DEPRECATE_EOF;
        let mut s = ResultSetSkipper::new(1, caps);
        assert_eq!(s.feed(&column("now()")).unwrap(), Step::More);
        assert_eq!(
            s.feed(&row(&[Some("2024-01-01 00:00:00")])).unwrap(),
            Step::More
        );
        // An OK with the 0xfe header, longer than an EOF packet.
        let mut end = hex("fe 00 00 02 00 00 00");
        end.extend_from_slice(b"\x05hello");
        assert_eq!(
            s.feed(&end).unwrap(),
            Step::Done {
                rows: 1,
                more_results: false
            }
        );
    }

    #[test]
    fn a_result_set_may_end_in_an_error() {
        let mut s = ResultSetSkipper::new(1, CAPS41);
        s.feed(&column("a")).unwrap();
        s.feed(&hex("fe 00 00 02 00")).unwrap();
        let step = s.feed(b"\xff\x0c\x05#HY000Lock wait timeout").unwrap();
        assert!(matches!(step, Step::Err(ErrPacket { code: 1292, .. })));
    }

    #[test]
    fn malformed_result_set_packets_are_errors() {
        // A column definition cut short.
        let c = column("a");
        for cut in 0..c.len() {
            let mut s = ResultSetSkipper::new(1, CAPS41);
            assert!(s.feed(&c[..cut]).is_err(), "column cut at {cut}");
        }
        // Something else where the EOF after the columns belongs.
        let mut s = ResultSetSkipper::new(1, CAPS41);
        s.feed(&column("a")).unwrap();
        assert!(s.feed(&row(&[Some("1")])).is_err());
        // Rows with too few or too many values, or a cut value.
        let mut s = ResultSetSkipper::new(2, CAPS41 | CLIENT_DEPRECATE_EOF);
        s.feed(&column("a")).unwrap();
        s.feed(&column("b")).unwrap();
        assert!(s.feed(&row(&[Some("1")])).is_err());
        assert!(s.feed(&row(&[Some("1"), None, None])).is_err());
        assert!(s.feed(&hex("05 61 62")).is_err());
        assert!(s.feed(&hex("fc ff")).is_err());
    }
}
