//! The replication protocol's bytes: the authenticating handshake and the
//! frames that follow it. `docs/wire.md` describes the same thing for
//! humans; keep them in step.
//!
//! Every frame carries a CRC32C of its payload (corruption on the path is
//! named as such) and a 16-byte keyed BLAKE3 MAC over a per-direction frame
//! counter, the header and the payload, keyed with a session key derived
//! from both nodes' nonces. (The handshake uses HMAC-SHA256; frames use
//! BLAKE3 because it authenticates several GB/s per core where SHA-256
//! managed two, and every replicated byte passes through it twice.)
//! A frame that is replayed, reordered, forged or cut short therefore fails the MAC, and the link is dropped without the
//! frame having any effect.

use std::fmt;

use hmac::{KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = hmac::Hmac<Sha256>;

pub const HANDSHAKE_MAGIC: [u8; 8] = *b"HADBREPL";
pub const PROTOCOL_VERSION: u32 = 1;
pub const FRAME_MAGIC: u32 = 0x4844_4252; // "HDBR"
pub const HEADER_LEN: usize = 32;
pub const MAC_LEN: usize = 16;
pub const NONCE_LEN: usize = 32;
/// The largest payload a frame may carry; larger lengths are refused before
/// any allocation.
pub const MAX_PAYLOAD: u32 = 32 << 20;
const MAX_NAME: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Not a hadb peer, or out of step: the link must be dropped.
    BadMagic(u32),
    Truncated {
        what: &'static str,
        have: usize,
        need: usize,
    },
    UnknownKind(u8),
    PayloadTooLarge(u32),
    Checksum {
        kind: &'static str,
        stored: u32,
        computed: u32,
    },
    Forged,
    Handshake(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadMagic(m) => write!(
                f,
                "frame magic {m:#010x} is wrong (not a hadb peer, or the stream is out of step)"
            ),
            Error::Truncated { what, have, need } => {
                write!(f, "{what} truncated: {have} of {need} bytes")
            }
            Error::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            Error::PayloadTooLarge(n) => write!(
                f,
                "frame payload of {n} bytes exceeds the {MAX_PAYLOAD}-byte maximum"
            ),
            Error::Checksum {
                kind,
                stored,
                computed,
            } => write!(
                f,
                "{kind} frame checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): data corrupted on the way"
            ),
            Error::Forged => write!(
                f,
                "frame authentication failed (forged, replayed or reordered frame, or a different key)"
            ),
            Error::Handshake(why) => write!(f, "handshake refused: {why}"),
        }
    }
}

impl std::error::Error for Error {}

/// What a frame asks of the receiver. The numbers are on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Both ways, first frame after the handshake and on every change: the
    /// sender's [`NodeState`] as payload.
    State = 1,
    /// Primary to secondary: write `payload` at `offset`; seq orders it.
    Data = 2,
    /// Primary to secondary: zero `length` bytes at `offset` (flag PUNCH:
    /// deallocate as well).
    Zeroes = 3,
    /// Primary to secondary: make everything before `seq` durable.
    Flush = 4,
    /// Secondary to primary: frame `seq` is written (durable for Flush and
    /// FUA frames).
    Ack = 5,
    /// Secondary to primary: frame `seq` failed on the peer's disk;
    /// `offset` holds the errno.
    Nack = 6,
    /// Resync source to target: block data at `offset`, ordered with Data.
    ResyncData = 7,
    /// Resync source to target: the resync is complete; payload is the
    /// source's NodeState (whose generation the target adopts).
    ResyncDone = 8,
    /// Either way: asks the peer to let the sender become primary.
    RoleRequest = 9,
    /// Answer to RoleRequest: `offset` 1 granted, 0 refused.
    RoleReply = 10,
    /// Keepalive; `seq` echoed in Pong.
    Ping = 11,
    Pong = 12,
    /// Online verify, primary to secondary: for the `length` bytes at
    /// `offset`, the payload holds an 8-byte digest per 4 KiB block of the
    /// primary's copy.
    VerifyRequest = 13,
    /// Answer to VerifyRequest (same `seq`, `offset`, `length`): payload
    /// is a 64-bit mask of the blocks whose digests differ.
    VerifyReply = 14,
    /// Semisync, primary to secondary: the peer did not acknowledge in
    /// time; mark your copy outdated (durably) and answer OutdateAck.
    OutdateRequest = 15,
    /// Secondary to primary: my copy is outdated on disk; I will not be
    /// promoted until resynchronised.
    OutdateAck = 16,
    /// Resync target to source, after a connect decided on a bitmap
    /// resync: the blocks the target itself has marked out of sync (its
    /// activity log after an unclean stop, its changes since a split
    /// brain), as runs of (first block, count), two little-endian u64
    /// each. The source resyncs the union of both bitmaps.
    Bitmap = 17,
    /// Resync target to source: the bitmap is complete.
    BitmapDone = 18,
}

/// Block size of online verify's digests.
pub const VERIFY_BLOCK: u32 = 4096;
/// Bytes of one block digest.
pub const DIGEST_LEN: usize = 8;

impl Kind {
    fn from_u8(k: u8) -> Result<Kind, Error> {
        Ok(match k {
            1 => Kind::State,
            2 => Kind::Data,
            3 => Kind::Zeroes,
            4 => Kind::Flush,
            5 => Kind::Ack,
            6 => Kind::Nack,
            7 => Kind::ResyncData,
            8 => Kind::ResyncDone,
            9 => Kind::RoleRequest,
            10 => Kind::RoleReply,
            11 => Kind::Ping,
            12 => Kind::Pong,
            13 => Kind::VerifyRequest,
            14 => Kind::VerifyReply,
            15 => Kind::OutdateRequest,
            16 => Kind::OutdateAck,
            17 => Kind::Bitmap,
            18 => Kind::BitmapDone,
            other => return Err(Error::UnknownKind(other)),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::State => "state",
            Kind::Data => "data",
            Kind::Zeroes => "zeroes",
            Kind::Flush => "flush",
            Kind::Ack => "ack",
            Kind::Nack => "nack",
            Kind::ResyncData => "resync-data",
            Kind::ResyncDone => "resync-done",
            Kind::RoleRequest => "role-request",
            Kind::RoleReply => "role-reply",
            Kind::Ping => "ping",
            Kind::Pong => "pong",
            Kind::VerifyRequest => "verify-request",
            Kind::VerifyReply => "verify-reply",
            Kind::OutdateRequest => "outdate-request",
            Kind::OutdateAck => "outdate-ack",
            Kind::Bitmap => "bitmap",
            Kind::BitmapDone => "bitmap-done",
        }
    }
}

pub const FLAG_FUA: u8 = 1 << 0;
pub const FLAG_PUNCH: u8 = 1 << 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub flags: u8,
    pub seq: u64,
    pub offset: u64,
    /// Bytes of data the frame stands for (the payload length, or the
    /// length to zero).
    pub length: u32,
    pub payload_len: u32,
    pub payload_crc: u32,
}

impl Header {
    pub fn new(kind: Kind, seq: u64, offset: u64, length: u32) -> Header {
        Header {
            kind,
            flags: 0,
            seq,
            offset,
            length,
            payload_len: 0,
            payload_crc: 0,
        }
    }
}

/// Header layout, big-endian: 0 magic u32 | 4 kind u8 | 5 flags u8 |
/// 6 reserved u16 | 8 seq u64 | 16 offset u64 | 24 length u32 |
/// 28 payload CRC32C u32.
fn encode_header(h: &Header) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..4].copy_from_slice(&FRAME_MAGIC.to_be_bytes());
    b[4] = h.kind as u8;
    b[5] = h.flags;
    // 6..8 reserved, zero.
    b[8..16].copy_from_slice(&h.seq.to_be_bytes());
    b[16..24].copy_from_slice(&h.offset.to_be_bytes());
    b[24..28].copy_from_slice(&h.length.to_be_bytes());
    b[28..32].copy_from_slice(&h.payload_crc.to_be_bytes());
    b
}

/// Which payload length a kind carries on the wire, given its header.
fn payload_len_of(kind: Kind, length: u32) -> u32 {
    match kind {
        Kind::Data | Kind::ResyncData | Kind::Bitmap => length,
        Kind::State | Kind::ResyncDone => NodeState::LEN as u32,
        Kind::VerifyRequest => length.div_ceil(VERIFY_BLOCK) * DIGEST_LEN as u32,
        Kind::VerifyReply => 8,
        _ => 0,
    }
}

/// Parses a header; the payload length follows from it.
pub fn decode_header(b: &[u8]) -> Result<Header, Error> {
    if b.len() < HEADER_LEN {
        return Err(Error::Truncated {
            what: "frame header",
            have: b.len(),
            need: HEADER_LEN,
        });
    }
    let magic = u32::from_be_bytes(b[0..4].try_into().expect("4"));
    if magic != FRAME_MAGIC {
        return Err(Error::BadMagic(magic));
    }
    let kind = Kind::from_u8(b[4])?;
    let length = u32::from_be_bytes(b[24..28].try_into().expect("4"));
    let payload_len = payload_len_of(kind, length);
    if payload_len > MAX_PAYLOAD {
        return Err(Error::PayloadTooLarge(payload_len));
    }
    Ok(Header {
        kind,
        flags: b[5],
        seq: u64::from_be_bytes(b[8..16].try_into().expect("8")),
        offset: u64::from_be_bytes(b[16..24].try_into().expect("8")),
        length,
        payload_len,
        payload_crc: u32::from_be_bytes(b[28..32].try_into().expect("4")),
    })
}

/// One direction of an authenticated session: seals outgoing frames or
/// opens incoming ones, counting frames so a replay cannot pass.
pub struct Sealer {
    key: [u8; 32],
    counter: u64,
}

impl Sealer {
    pub fn new(key: &[u8; 32]) -> Sealer {
        Sealer {
            key: *key,
            counter: 0,
        }
    }

    fn tag(&self, header: &[u8], payload: &[u8]) -> [u8; MAC_LEN] {
        let mut m = blake3::Hasher::new_keyed(&self.key);
        m.update(&self.counter.to_be_bytes());
        m.update(header);
        m.update(payload);
        let mut t = [0u8; MAC_LEN];
        m.finalize_xof().fill(&mut t);
        t
    }

    /// Header bytes and trailing MAC for a frame; the caller sends
    /// header, payload, mac.
    pub fn seal(&mut self, mut h: Header, payload: &[u8]) -> ([u8; HEADER_LEN], [u8; MAC_LEN]) {
        debug_assert_eq!(payload.len() as u32, payload_len_of(h.kind, h.length));
        h.payload_crc = crc32c::crc32c(payload);
        let header = encode_header(&h);
        let tag = self.tag(&header, payload);
        self.counter += 1;
        (header, tag)
    }

    /// Checks a received frame: CRC first (to name corruption), then the MAC.
    pub fn open(
        &mut self,
        header_bytes: &[u8],
        h: &Header,
        payload: &[u8],
        tag: &[u8],
    ) -> Result<(), Error> {
        if header_bytes.len() < HEADER_LEN {
            return Err(Error::Truncated {
                what: "frame header",
                have: header_bytes.len(),
                need: HEADER_LEN,
            });
        }
        let computed = crc32c::crc32c(payload);
        if computed != h.payload_crc {
            return Err(Error::Checksum {
                kind: h.kind.name(),
                stored: h.payload_crc,
                computed,
            });
        }
        let expected = self.tag(&header_bytes[..HEADER_LEN], payload);
        // Constant-time compare: a timing oracle on the MAC is the classic
        // way such checks fail.
        let diff = expected
            .iter()
            .zip(tag)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if tag.len() != MAC_LEN || diff != 0 {
            return Err(Error::Forged);
        }
        self.counter += 1;
        Ok(())
    }
}

/// What one node tells the other about itself (State and ResyncDone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeState {
    pub role: u8,
    pub disk: u8,
    pub data_size: u64,
    pub volume_id: [u8; 16],
    pub current_gen: u64,
    pub bitmap_gen: u64,
    /// Blocks this node knows the peer lacks (its dirty bitmap), or
    /// u64::MAX when it has no bitmap and a full resync would be needed.
    pub dirty_blocks: u64,
    /// STATE_* bits.
    pub flags: u8,
}

/// NodeState flag: the node stopped while primary and has not been
/// resynchronised since (it may hold writes its peer never saw).
pub const STATE_CRASHED_PRIMARY: u8 = 1 << 0;
/// NodeState flag: the operator asked to discard this node's copy at the
/// next split-brain connect.
pub const STATE_DISCARD_MY_DATA: u8 = 1 << 1;
/// The sender stopped uncleanly (its cache may have lost writes it had
/// acknowledged) and has not been resynchronised since.
pub const STATE_LOST_CACHE: u8 = 1 << 2;

impl NodeState {
    pub const LEN: usize = 1 + 1 + 8 + 16 + 8 + 8 + 8 + 1;

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::LEN);
        b.push(self.role);
        b.push(self.disk);
        b.extend_from_slice(&self.data_size.to_be_bytes());
        b.extend_from_slice(&self.volume_id);
        b.extend_from_slice(&self.current_gen.to_be_bytes());
        b.extend_from_slice(&self.bitmap_gen.to_be_bytes());
        b.extend_from_slice(&self.dirty_blocks.to_be_bytes());
        b.push(self.flags);
        b
    }

    pub fn decode(b: &[u8]) -> Result<NodeState, Error> {
        if b.len() != Self::LEN {
            return Err(Error::Truncated {
                what: "node state",
                have: b.len(),
                need: Self::LEN,
            });
        }
        let mut volume_id = [0u8; 16];
        volume_id.copy_from_slice(&b[10..26]);
        Ok(NodeState {
            role: b[0],
            disk: b[1],
            data_size: u64::from_be_bytes(b[2..10].try_into().expect("8")),
            volume_id,
            current_gen: u64::from_be_bytes(b[26..34].try_into().expect("8")),
            bitmap_gen: u64::from_be_bytes(b[34..42].try_into().expect("8")),
            dirty_blocks: u64::from_be_bytes(b[42..50].try_into().expect("8")),
            flags: b[50],
        })
    }
}

// ---- Handshake ----------------------------------------------------------
//
// connector -> listener: Hello(cluster, node, nonce_c)
// listener -> connector: Hello(cluster, node, nonce_l) + proof_l
// connector -> listener: proof_c
// listener -> connector: one status byte (0 = accepted)
//
// proof_l = HMAC(key, "hadb listener" | nonce_c | nonce_l | cluster | connector | listener)
// proof_c = HMAC(key, "hadb connector" | nonce_l | nonce_c | cluster | connector | listener)
// session keys: HMAC(key, "hadb c2l" | nonce_c | nonce_l), HMAC(key, "hadb l2c" | ...)
// The secret itself never crosses the wire; each side proves it knows it
// over the other side's fresh nonce, so a recorded handshake replays
// nowhere.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    pub cluster: String,
    pub node: String,
    pub nonce: [u8; NONCE_LEN],
}

pub const HELLO_MAX: usize = 8 + 4 + 1 + MAX_NAME + 1 + MAX_NAME + NONCE_LEN;

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&HANDSHAKE_MAGIC);
        b.extend_from_slice(&self.version.to_be_bytes());
        for s in [&self.cluster, &self.node] {
            let s = &s.as_bytes()[..s.len().min(MAX_NAME)];
            b.push(s.len() as u8);
            b.extend_from_slice(s);
        }
        b.extend_from_slice(&self.nonce);
        b
    }

    /// Decodes from the front of `b`; returns the hello and bytes used, or
    /// Ok(None) if more bytes are needed.
    pub fn decode(b: &[u8]) -> Result<Option<(Hello, usize)>, Error> {
        if b.len() < 12 {
            return Ok(None);
        }
        if b[..8] != HANDSHAKE_MAGIC {
            return Err(Error::Handshake(
                "not a hadb replication peer (bad magic)".into(),
            ));
        }
        let version = u32::from_be_bytes(b[8..12].try_into().expect("4"));
        let mut at = 12;
        let mut names = Vec::new();
        for _ in 0..2 {
            let Some(&n) = b.get(at) else { return Ok(None) };
            let n = n as usize;
            if n > MAX_NAME {
                return Err(Error::Handshake(format!("name of {n} bytes is too long")));
            }
            let Some(s) = b.get(at + 1..at + 1 + n) else {
                return Ok(None);
            };
            names.push(String::from_utf8_lossy(s).into_owned());
            at += 1 + n;
        }
        let Some(nonce) = b.get(at..at + NONCE_LEN) else {
            return Ok(None);
        };
        let mut n = [0u8; NONCE_LEN];
        n.copy_from_slice(nonce);
        let node = names.pop().expect("two names");
        let cluster = names.pop().expect("two names");
        Ok(Some((
            Hello {
                version,
                cluster,
                node,
                nonce: n,
            },
            at + NONCE_LEN,
        )))
    }
}

fn hmac_parts(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(&(p.len() as u32).to_be_bytes());
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// The facts both proofs and the session keys are bound to.
pub struct Transcript<'a> {
    pub cluster: &'a str,
    pub connector: &'a str,
    pub listener: &'a str,
    pub nonce_c: &'a [u8; NONCE_LEN],
    pub nonce_l: &'a [u8; NONCE_LEN],
}

impl Transcript<'_> {
    pub fn listener_proof(&self, key: &[u8]) -> [u8; 32] {
        hmac_parts(
            key,
            &[
                b"hadb listener",
                self.nonce_c,
                self.nonce_l,
                self.cluster.as_bytes(),
                self.connector.as_bytes(),
                self.listener.as_bytes(),
            ],
        )
    }
    pub fn connector_proof(&self, key: &[u8]) -> [u8; 32] {
        hmac_parts(
            key,
            &[
                b"hadb connector",
                self.nonce_l,
                self.nonce_c,
                self.cluster.as_bytes(),
                self.connector.as_bytes(),
                self.listener.as_bytes(),
            ],
        )
    }
    /// (connector-to-listener key, listener-to-connector key)
    pub fn session_keys(&self, key: &[u8]) -> ([u8; 32], [u8; 32]) {
        (
            hmac_parts(key, &[b"hadb c2l", self.nonce_c, self.nonce_l]),
            hmac_parts(key, &[b"hadb l2c", self.nonce_c, self.nonce_l]),
        )
    }
}

pub fn proofs_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Sealer, Sealer) {
        (Sealer::new(&[3; 32]), Sealer::new(&[3; 32]))
    }

    #[test]
    fn sealed_frame_opens() {
        let (mut tx, mut rx) = pair();
        let payload = vec![0xab; 4096];
        let mut h = Header::new(Kind::Data, 7, 8192, 4096);
        h.flags = FLAG_FUA;
        let (hb, tag) = tx.seal(h, &payload);
        let got = decode_header(&hb).unwrap();
        assert_eq!(
            (
                got.kind,
                got.seq,
                got.offset,
                got.length,
                got.payload_len,
                got.flags
            ),
            (Kind::Data, 7, 8192, 4096, 4096, FLAG_FUA)
        );
        rx.open(&hb, &got, &payload, &tag).unwrap();
    }

    #[test]
    fn corruption_replay_and_forgery_fail() {
        let (mut tx, mut rx) = pair();
        let payload = vec![1u8; 512];
        let (hb, tag) = tx.seal(Header::new(Kind::Data, 1, 0, 512), &payload);
        let h = decode_header(&hb).unwrap();
        let mut bad = payload.clone();
        bad[3] ^= 1;
        assert!(matches!(
            rx.open(&hb, &h, &bad, &tag),
            Err(Error::Checksum { .. })
        ));
        rx.open(&hb, &h, &payload, &tag).unwrap();
        // The same frame again is a replay: the counter moved on.
        assert_eq!(rx.open(&hb, &h, &payload, &tag), Err(Error::Forged));
        // A header altered in a field the CRC does not cover.
        let (hb2, tag2) = tx.seal(Header::new(Kind::Data, 2, 0, 512), &payload);
        let mut forged = hb2;
        forged[16] ^= 1; // offset
        let fh = decode_header(&forged).unwrap();
        assert_eq!(rx.open(&forged, &fh, &payload, &tag2), Err(Error::Forged));
        // Another key.
        let mut other = Sealer::new(&[4; 32]);
        assert_eq!(other.open(&hb, &h, &payload, &tag), Err(Error::Forged));
    }

    #[test]
    fn header_refusals() {
        assert!(matches!(
            decode_header(&[0u8; 10]),
            Err(Error::Truncated { .. })
        ));
        assert!(matches!(
            decode_header(&[0u8; HEADER_LEN]),
            Err(Error::BadMagic(0))
        ));
        let (mut tx, _) = pair();
        let (mut hb, _) = tx.seal(Header::new(Kind::Ack, 1, 0, 0), &[]);
        hb[4] = 99;
        assert_eq!(decode_header(&hb), Err(Error::UnknownKind(99)));
        let mut h = Header::new(Kind::Data, 1, 0, 0);
        h.length = MAX_PAYLOAD + 1;
        let hb = encode_header(&h);
        assert_eq!(
            decode_header(&hb),
            Err(Error::PayloadTooLarge(MAX_PAYLOAD + 1))
        );
        // Zeroes carries a length but no payload, so a large one is fine.
        h.kind = Kind::Zeroes;
        assert_eq!(decode_header(&encode_header(&h)).unwrap().payload_len, 0);
    }

    #[test]
    fn hello_roundtrip_and_partial() {
        let h = Hello {
            version: 1,
            cluster: "hadb".into(),
            node: "hadb01".into(),
            nonce: [9; 32],
        };
        let b = h.encode();
        assert_eq!(Hello::decode(&b).unwrap(), Some((h, b.len())));
        assert_eq!(Hello::decode(&b[..b.len() - 1]).unwrap(), None);
        assert!(Hello::decode(b"GET / HTTP/1.1\r\n").is_err());
    }

    #[test]
    fn proofs_bind_to_key_and_nonces() {
        let t = Transcript {
            cluster: "c",
            connector: "a",
            listener: "b",
            nonce_c: &[1; 32],
            nonce_l: &[2; 32],
        };
        assert_ne!(t.listener_proof(b"k"), t.connector_proof(b"k"));
        assert_ne!(t.listener_proof(b"k"), t.listener_proof(b"j"));
        let (c2l, l2c) = t.session_keys(b"k");
        assert_ne!(c2l, l2c);
        let t2 = Transcript {
            nonce_l: &[3; 32],
            ..t
        };
        assert_ne!(t.session_keys(b"k"), t2.session_keys(b"k"));
    }

    #[test]
    fn node_state_roundtrip() {
        let s = NodeState {
            role: 1,
            disk: 0,
            data_size: 1 << 30,
            volume_id: [5; 16],
            current_gen: 77,
            bitmap_gen: 66,
            dirty_blocks: 3,
            flags: STATE_CRASHED_PRIMARY,
        };
        assert_eq!(NodeState::decode(&s.encode()).unwrap(), s);
        assert!(NodeState::decode(&s.encode()[1..]).is_err());
    }
}
