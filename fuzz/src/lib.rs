//! The checks behind hadb's fuzz targets, one function per target. Each
//! takes arbitrary bytes, feeds them to hadb's decoders of untrusted input
//! (only public, pure functions: no sockets, clocks or files) and panics
//! only when a decoder panics or one of the properties below fails.
//!
//! The same file serves two builds: the libFuzzer targets in
//! `fuzz/fuzz_targets/` (crate `hadb-fuzz`, `cargo fuzz run TARGET`) and
//! the deterministic smoke run on stable Rust in `tests/fuzz_smoke.rs`,
//! which includes it with `#[path]`. So it may use only what both have:
//! `hadb` and hadb's own dependencies `hmac` and `sha2`.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use hadb::core::heartbeat::{self, Event, Membership, NodeReport, Packet, Reject, Timing};
use hadb::core::nbd::{self, Command, Request};
use hadb::core::wire::{self, Header, Hello, NodeState, Sealer};
use hmac::{KeyInit, Mac};

/// The heartbeat key of every check: 32 bytes, as `/etc/hadb/authkey`.
pub const KEY: &[u8; 32] = b"hadb-fuzz-key-0123456789abcdef!!";
/// A key the packets were not signed with.
const OTHER_KEY: &[u8; 32] = &[0x5a; 32];
/// The frame session key of the replication checks.
pub const FRAME_KEY: [u8; 32] = [7; 32];

// Heartbeat layout, as src/core/heartbeat.rs exports it.
use heartbeat::{
    DOMAIN as HB_DOMAIN, FIXED as HB_FIXED, MAX_NAME as HB_MAX_NAME, WINDOW as HB_WINDOW,
};
const HB_TIMEOUT_US: u64 = 1_000_000;
/// The incarnation of the membership that `heartbeat_membership` drives;
/// its script's packets name it in `hears`.
const MEMBER_INCARNATION: u64 = 1;

/// Reads fields off the front of fuzzer bytes, big-endian; past the end it
/// reads zeros, so every input means something.
pub struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(b: &'a [u8]) -> Reader<'a> {
        Reader { b }
    }

    pub fn is_empty(&self) -> bool {
        self.b.is_empty()
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut w = [0u8; N];
        let t = self.take(N);
        w[..t.len()].copy_from_slice(t);
        w
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.array())
    }

    /// Up to `n` bytes.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, rest) = self.b.split_at(n.min(self.b.len()));
        self.b = rest;
        a
    }

    pub fn rest(&mut self) -> &'a [u8] {
        self.take(self.b.len())
    }
}

// ---- heartbeat_packet ---------------------------------------------------

/// `body` followed by its heartbeat MAC under [`KEY`]: what
/// `Packet::encode` appends, for bodies `encode` could never produce.
/// (Checked against `encode` on every use: see `heartbeat_signed_body`.)
pub fn sign_heartbeat(body: &[u8]) -> Vec<u8> {
    let mut m = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(KEY)
        .expect("HMAC takes any key length");
    m.update(HB_DOMAIN);
    m.update(body);
    let tag = m.finalize().into_bytes();
    let mut b = body.to_vec();
    b.extend_from_slice(&tag);
    b
}

/// A membership of node `a` in cluster `hadb` that hears peer `b`, in its
/// run `incarnation`.
fn hb_membership(links: usize, incarnation: u64) -> Membership {
    Membership::new("hadb", "a", "b", KEY, links, HB_TIMEOUT_US, incarnation)
}

/// How this hadb treats an authentic packet from the peer whose report
/// does not name the receiver's incarnation (`hears`): `None` if it is
/// taken like any other, else the refusal. (src/core/heartbeat.rs is
/// gaining such a rule; the checks hold with and without it, and send
/// packets that do name the receiver wherever they expect acceptance.)
pub fn unconfirmed_refusal() -> Option<Reject> {
    static PROBE: OnceLock<Option<Reject>> = OnceLock::new();
    *PROBE.get_or_init(|| {
        let p = Packet {
            link: 0,
            incarnation: 1,
            seq: 1,
            cluster: "hadb".into(),
            node: "b".into(),
            report: NodeReport {
                hears: 2,
                ..NodeReport::default()
            },
            timing: Timing::default(),
        };
        let refusal = hb_membership(1, 1).receive(0, &p.encode(KEY), 0).err();
        assert!(
            !matches!(
                refusal,
                Some(Reject::Malformed | Reject::Foreign | Reject::BadSignature | Reject::Replayed)
            ),
            "a good packet that does not hear us was refused as {refusal:?}"
        );
        refusal
    })
}

/// Target `heartbeat_packet`: the bytes as a datagram off the wire, as the
/// fields of a packet signed with [`KEY`], and as a packet body signed
/// with [`KEY`], so that what lies past the MAC check is reached too.
pub fn heartbeat_packet(data: &[u8]) {
    heartbeat_raw(data);
    heartbeat_signed_fields(data);
    heartbeat_signed_body(data);
    // The body signed with its framing fixed up (magic, version, lengths
    // that fit), so that even short or random inputs reach the names.
    let mut r = Reader::new(data);
    let (cl, nl) = (usize::from(r.u8()), usize::from(r.u8()));
    let mut body = r.array::<HB_FIXED>().to_vec();
    body[..8].copy_from_slice(&heartbeat::MAGIC);
    body[8] = heartbeat::VERSION;
    let names = r.rest();
    let cl = (cl % (HB_MAX_NAME + 1)).min(names.len());
    let nl = (nl % (HB_MAX_NAME + 1)).min(names.len() - cl);
    body[10] = cl as u8;
    body[11] = nl as u8;
    body.extend_from_slice(&names[..cl + nl]);
    heartbeat_signed_body(&body);
}

/// A datagram as received: decoded alone and by a membership.
fn heartbeat_raw(data: &[u8]) {
    let decoded = Packet::decode(data, KEY);
    if let Ok(p) = &decoded {
        assert_eq!(
            Packet::decode(&p.encode(KEY), KEY).as_ref(),
            Ok(p),
            "a decoded packet does not survive encode and decode"
        );
    }
    let link = data.get(9).map_or(0, |&l| usize::from(l));
    let mut m = hb_membership(2, 1);
    let got = m.receive(link, data, 1);
    if let Err(e) = decoded {
        assert_eq!(got, Err(e), "the membership judged a packet otherwise");
        assert!(!m.peer_alive() && m.peer_report().is_none());
    }
    let received: u64 = m.links(2).iter().map(|l| l.counters.received).sum();
    assert_eq!(received, u64::from(got.is_ok()));
    m.tick(u64::MAX);
    assert!(!m.peer_alive());
}

/// A packet built from fields in the input and signed with
/// `Packet::encode`: decodes to itself, and any change to it is refused.
fn heartbeat_signed_fields(data: &[u8]) {
    let mut r = Reader::new(data);
    let flip = r.u16();
    let bit = r.u8() & 7;
    let cut = r.u16();
    let p = Packet {
        link: r.u8(),
        incarnation: r.u64(),
        seq: r.u64(),
        report: NodeReport {
            role: r.u8(),
            disk: r.u8(),
            current_gen: r.u64(),
            flags: r.u8(),
            volume_link: r.u8(),
            service: r.u8(),
            watchdog_timeout_ms: r.u32(),
            hears: r.u64(),
            vote: r.u64(),
            outdate_token: r.u64(),
            settings: hadb::core::settings::Settings {
                format: r.u8(),
                mode: r.u8(),
                self_fences: r.u8() & 1 != 0,
                witness: r.u32(),
                heartbeat_timeout_ms: r.u32(),
                fence_delay_ms: r.u32(),
                watchdog_timeout_ms: r.u32(),
            },
        },
        timing: Timing {
            sent_us: r.u64(),
            echo_us: r.u64(),
            echo_hold_us: r.u32(),
        },
        cluster: {
            let n = usize::from(r.u8());
            String::from_utf8_lossy(r.take(n)).into_owned()
        },
        node: String::from_utf8_lossy(r.rest()).into_owned(),
    };
    let b = p.encode(KEY);
    let kept = |s: &str| s.len().min(HB_MAX_NAME);
    assert_eq!(
        b.len(),
        HB_FIXED + kept(&p.cluster) + kept(&p.node) + heartbeat::MAC_LEN
    );
    let fits = p.cluster.len() <= HB_MAX_NAME && p.node.len() <= HB_MAX_NAME;
    let q = match Packet::decode(&b, KEY) {
        Ok(q) => q,
        Err(e) => {
            // encode cuts names at 64 bytes; only a cut through a UTF-8
            // character makes a name the decoder then refuses.
            let split = |s: &str| !s.is_char_boundary(kept(s));
            assert!(
                e == Reject::Malformed && (split(&p.cluster) || split(&p.node)),
                "Packet::decode refused what Packet::encode made: {e:?} for {p:?}"
            );
            return;
        }
    };
    if fits {
        assert_eq!(q, p, "a signed packet did not decode to itself");
    } else {
        // Names longer than 64 bytes are cut to 64; all else is kept.
        assert_eq!(
            q.cluster.as_bytes(),
            &p.cluster.as_bytes()[..kept(&p.cluster)]
        );
        assert_eq!(q.node.as_bytes(), &p.node.as_bytes()[..kept(&p.node)]);
        let named = Packet {
            cluster: p.cluster.clone(),
            node: p.node.clone(),
            ..q.clone()
        };
        assert_eq!(named, p);
    }
    assert_eq!(Packet::decode(&q.encode(KEY), KEY).as_ref(), Ok(&q));
    assert_eq!(Packet::decode(&b, OTHER_KEY), Err(Reject::BadSignature));

    // Any one bit changed, and any cut, is refused.
    let mut bad = b.clone();
    bad[usize::from(flip) % b.len()] ^= 1 << bit;
    assert!(
        Packet::decode(&bad, KEY).is_err(),
        "a packet with bit {bit} of byte {} flipped was accepted",
        usize::from(flip) % b.len()
    );
    let cut = usize::from(cut) % b.len();
    assert_eq!(Packet::decode(&b[..cut], KEY), Err(Reject::Malformed));
    let mut longer = b.clone();
    longer.push(0);
    assert_eq!(Packet::decode(&longer, KEY), Err(Reject::Malformed));

    // A membership that expects this peer takes it once, then calls it a
    // replay; one that expects another peer calls it foreign.
    let hears = q.report.hears;
    let mut m = Membership::new(
        &q.cluster,
        "fuzz-self",
        &q.node,
        KEY,
        2,
        HB_TIMEOUT_US,
        hears,
    );
    let link = usize::from(q.link);
    assert_eq!(
        m.receive(link, &b, 10),
        Ok(vec![
            Event::LinkUp(link.min(1)),
            Event::PeerFound { restarted: false }
        ])
    );
    assert_eq!(m.peer_report(), Some(q.report));
    assert_eq!(m.receive(link, &b, 11), Err(Reject::Replayed));
    let got = m.receive(link, &bad, 12);
    assert!(
        matches!(got, Err(Reject::Malformed | Reject::BadSignature)),
        "an altered packet got {got:?}"
    );
    assert!(m.peer_alive());
    assert_eq!(m.peer_report(), Some(q.report));
    let mut other = Membership::new(
        &q.cluster,
        &q.node,
        "fuzz-self",
        KEY,
        1,
        HB_TIMEOUT_US,
        hears,
    );
    if q.node != "fuzz-self" {
        assert_eq!(other.receive(0, &b, 10), Err(Reject::Foreign));
    }
}

/// Arbitrary bytes as a packet body, signed: the decoder's framing checks
/// alone decide, and what it accepts encodes back to the same bytes.
fn heartbeat_signed_body(body: &[u8]) {
    let signed = sign_heartbeat(body);
    let got = Packet::decode(&signed, KEY);
    assert_ne!(
        got,
        Err(Reject::BadSignature),
        "sign_heartbeat no longer signs as Packet::encode does (was the domain changed?)"
    );
    let framed = body.len() >= HB_FIXED
        && body[..8] == heartbeat::MAGIC
        && body[8] == heartbeat::VERSION
        && usize::from(body[10]) <= HB_MAX_NAME
        && usize::from(body[11]) <= HB_MAX_NAME
        && body.len() == HB_FIXED + usize::from(body[10]) + usize::from(body[11]);
    let utf8 = framed && {
        let names = &body[HB_FIXED..];
        let (c, n) = names.split_at(usize::from(body[10]));
        std::str::from_utf8(c).is_ok() && std::str::from_utf8(n).is_ok()
    };
    match got {
        Ok(p) => {
            assert!(framed && utf8, "accepted a malformed body: {body:02x?}");
            // Bytes 41..44 and 95 are padding, and of byte 94 only bit 0
            // is read; all else round-trips.
            let mut canonical = body.to_vec();
            canonical[41..44].fill(0);
            canonical[94] &= 1;
            canonical[95] = 0;
            assert_eq!(p.encode(KEY), sign_heartbeat(&canonical));
            let mut m = hb_membership(1, p.report.hears);
            let expect = if p.cluster == "hadb" && p.node == "b" {
                Ok(vec![
                    Event::LinkUp(0),
                    Event::PeerFound { restarted: false },
                ])
            } else {
                Err(Reject::Foreign)
            };
            assert_eq!(m.receive(0, &signed, 1), expect);
        }
        Err(e) => {
            assert_eq!(e, Reject::Malformed);
            assert!(
                !(framed && utf8),
                "refused a well-formed signed body: {body:02x?}"
            );
        }
    }
}

// ---- heartbeat_membership -----------------------------------------------

/// What the doc comments of `Membership` promise, kept the plain way: the
/// set of sequence numbers taken in the current incarnation.
struct Model {
    links: usize,
    /// (incarnation, highest seq, every seq taken in it)
    seen: Option<(u64, u64, BTreeSet<u64>)>,
    last: Vec<Option<u64>>,
    up: Vec<bool>,
    alive: bool,
    report: Option<NodeReport>,
}

impl Model {
    fn receive(&mut self, link: usize, p: &Packet, now: u64) -> Result<Vec<Event>, Reject> {
        // Only the newest packet of a run carries the state; a reordered
        // older one proves the link.
        let mut newest = true;
        let restarted = match &mut self.seen {
            None => {
                self.seen = Some((p.incarnation, p.seq, BTreeSet::from([p.seq])));
                false
            }
            Some((inc, _, _)) if p.incarnation > *inc => {
                self.seen = Some((p.incarnation, p.seq, BTreeSet::from([p.seq])));
                true
            }
            Some((inc, _, _)) if p.incarnation < *inc => return Err(Reject::Replayed),
            Some((_, high, taken)) => {
                // Newer than all, or at most WINDOW below the highest and
                // never taken: accepted, once.
                if taken.contains(&p.seq) || (p.seq < *high && *high - p.seq > HB_WINDOW) {
                    return Err(Reject::Replayed);
                }
                taken.insert(p.seq);
                newest = p.seq > *high;
                *high = (*high).max(p.seq);
                let floor = high.saturating_sub(HB_WINDOW);
                taken.retain(|&s| s >= floor);
                false
            }
        };
        let link = link.min(self.links - 1);
        let mut events = Vec::new();
        if newest {
            self.report = Some(p.report);
        }
        self.last[link] = Some(now);
        if !self.up[link] {
            self.up[link] = true;
            events.push(Event::LinkUp(link));
        }
        if !self.alive || restarted {
            self.alive = true;
            events.push(Event::PeerFound { restarted });
        }
        Ok(events)
    }

    fn tick(&mut self, now: u64) -> Vec<Event> {
        let mut events = Vec::new();
        for i in 0..self.links {
            let quiet = self.last[i].is_none_or(|t| now.saturating_sub(t) >= HB_TIMEOUT_US);
            if self.up[i] && quiet {
                self.up[i] = false;
                events.push(Event::LinkDown(i));
            }
        }
        if self.alive && self.up.iter().all(|u| !u) {
            self.alive = false;
            events.push(Event::PeerLost);
        }
        events
    }
}

/// Target `heartbeat_membership`: the input as a script of signed packets
/// (new, replayed, reordered, restarted, foreign, altered, not hearing
/// this run) and clock ticks given to one `Membership`. Never panics; with
/// `model`, every answer, event and state must match [`Model`], the window
/// rule as documented: a sequence number is taken at most once per
/// incarnation, and one at most 64 below the highest seen is still taken
/// if it never was; and a packet that does not name this run in `hears` is
/// refused if this hadb has that rule ([`unconfirmed_refusal`]).
pub fn heartbeat_membership(data: &[u8], model: bool) {
    let mut r = Reader::new(data);
    let links = 1 + usize::from(r.u8() % 3);
    let mut m = hb_membership(links, MEMBER_INCARNATION);
    let mut want = Model {
        links,
        seen: None,
        last: vec![None; links],
        up: vec![false; links],
        alive: false,
        report: None,
    };
    let mut sent: Vec<(Packet, Vec<u8>)> = Vec::new();
    let mut now = 0u64;
    let mut steps = 0;
    while !r.is_empty() && steps < 512 {
        steps += 1;
        let op = r.u8();
        now += u64::from(r.u8()) << 14; // up to ~4 s a step
        match op % 6 {
            0 => {
                let events = m.tick(now);
                let expected = want.tick(now);
                if model {
                    assert_eq!(events, expected, "tick at {now}");
                }
            }
            1..=3 => {
                // A packet: op 1 a new one, op 2 a replay of one sent
                // before, op 3 one sent before with a bit flipped.
                let link = usize::from(r.u8());
                let (p, b) = match (op % 6, sent.len()) {
                    (2, n) if n > 0 => sent[usize::from(r.u16()) % n].clone(),
                    (3, n) if n > 0 => {
                        let (p, mut b) = sent[usize::from(r.u16()) % n].clone();
                        let at = usize::from(r.u16()) % b.len();
                        b[at] ^= 1 << (r.u8() & 7);
                        let got = m.receive(link, &b, now);
                        assert!(
                            matches!(got, Err(Reject::Malformed | Reject::BadSignature)),
                            "an altered packet got {got:?}: {p:?}"
                        );
                        continue;
                    }
                    _ => {
                        let p = Packet {
                            link: link as u8,
                            incarnation: 1000 + u64::from(r.u8() % 4),
                            seq: u64::from(r.u16() & 0x3ff),
                            cluster: "hadb".into(),
                            node: "b".into(),
                            report: NodeReport {
                                current_gen: u64::from(r.u16()),
                                hears: MEMBER_INCARNATION,
                                ..NodeReport::default()
                            },
                            timing: Timing::default(),
                        };
                        let b = p.encode(KEY);
                        sent.push((p.clone(), b.clone()));
                        (p, b)
                    }
                };
                let got = m.receive(link, &b, now);
                let expected = want.receive(link, &p, now);
                if model {
                    assert_eq!(
                        got, expected,
                        "packet incarnation {} seq {} at {now}",
                        p.incarnation, p.seq
                    );
                } else if let Ok(events) = &got {
                    assert!(m.peer_alive() && events.len() <= 2);
                }
            }
            4 if op & 0xc0 == 0x40 => {
                // The peer, authentic, but not (yet) hearing this run.
                let p = Packet {
                    link: 0,
                    incarnation: 1003,
                    seq: r.u64() & 0x3ff,
                    cluster: "hadb".into(),
                    node: "b".into(),
                    report: NodeReport::default(),
                    timing: Timing::default(),
                };
                let link = usize::from(r.u8());
                let got = m.receive(link, &p.encode(KEY), now);
                let expected = match unconfirmed_refusal() {
                    Some(refusal) => Err(refusal),
                    None => want.receive(link, &p, now),
                };
                if model {
                    assert_eq!(got, expected, "unconfirmed seq {} at {now}", p.seq);
                }
            }
            4 => {
                // Another node, or another cluster, with the right key.
                let p = Packet {
                    link: 0,
                    incarnation: u64::MAX,
                    seq: r.u64(),
                    cluster: if op & 0x80 != 0 { "hadb" } else { "other" }.into(),
                    node: if op & 0x80 != 0 { "c" } else { "b" }.into(),
                    report: NodeReport::default(),
                    timing: Timing::default(),
                };
                let got = m.receive(usize::from(r.u8()), &p.encode(KEY), now);
                assert_eq!(got, Err(Reject::Foreign));
            }
            _ => {
                // Garbage of some length.
                let n = usize::from(r.u8());
                let got = m.receive(usize::from(r.u8()), r.take(n), now);
                assert!(got.is_err());
            }
        }
        if model {
            assert_eq!(m.peer_alive(), want.alive);
            assert_eq!(m.peer_report(), want.report);
            assert_eq!(m.last_heard_us(), want.last.iter().flatten().copied().max());
            let up: Vec<bool> = m.links(now).iter().map(|l| l.up).collect();
            assert_eq!(up, want.up);
        }
    }
    m.tick(u64::MAX);
    assert!(!m.peer_alive());
}

// ---- replication_frame --------------------------------------------------

/// Target `replication_frame`: the bytes as a frame off the replication
/// stream (header, payload, MAC), as the fields of a frame sealed with
/// [`FRAME_KEY`], as a `NodeState` and as a handshake `Hello`.
pub fn replication_frame(data: &[u8]) {
    frame_raw(data);
    frame_sealed(data);
    node_state(data);
    if data.len() > NodeState::LEN {
        node_state(&data[..NodeState::LEN]);
    }
    hello(data);
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// A frame as the reader in `run::peer` takes it: 32 header bytes,
/// `payload_len` payload bytes, a 16-byte MAC.
fn frame_raw(data: &[u8]) {
    let h = match wire::decode_header(data) {
        Ok(h) => h,
        Err(e) => {
            let _ = e.to_string();
            match e {
                wire::Error::Truncated { have, need, .. } => {
                    assert!(have == data.len() && need == wire::HEADER_LEN && have < need)
                }
                wire::Error::BadMagic(m) => assert!(m == be32(data) && m != wire::FRAME_MAGIC),
                wire::Error::UnknownKind(k) => assert_eq!(k, data[4]),
                wire::Error::PayloadTooLarge(n) => assert!(n > wire::MAX_PAYLOAD),
                other => panic!("decode_header answered {other:?}"),
            }
            return;
        }
    };
    assert_eq!(h.kind as u8, data[4]);
    assert_eq!(
        (h.flags, h.seq, h.offset, h.length, h.payload_crc),
        (
            data[5],
            be64(&data[8..]),
            be64(&data[16..]),
            be32(&data[24..]),
            be32(&data[28..])
        )
    );
    assert!(h.payload_len <= wire::MAX_PAYLOAD);
    let _ = h.kind.name();
    let rest = &data[wire::HEADER_LEN..];
    let pl = h.payload_len as usize;
    if rest.len() >= pl + wire::MAC_LEN {
        let (payload, tag) = rest.split_at(pl);
        let mut rx = Sealer::new(&FRAME_KEY);
        match rx.open(
            &data[..wire::HEADER_LEN],
            &h,
            payload,
            &tag[..wire::MAC_LEN],
        ) {
            // A frame sealed with the key (the smoke run's corpus has
            // some): it opens once only.
            Ok(()) => assert_eq!(
                rx.open(
                    &data[..wire::HEADER_LEN],
                    &h,
                    payload,
                    &tag[..wire::MAC_LEN]
                ),
                Err(wire::Error::Forged)
            ),
            Err(wire::Error::Checksum { kind, stored, .. }) => {
                assert!(kind == h.kind.name() && stored == h.payload_crc)
            }
            Err(wire::Error::Forged) => {}
            Err(other) => panic!("Sealer::open answered {other:?}"),
        }
        if matches!(h.kind, wire::Kind::State | wire::Kind::ResyncDone) {
            assert!(
                NodeState::decode(payload).is_ok(),
                "a state frame's payload is not a NodeState"
            );
        }
    }
}

/// A frame sealed from fields in the input: it decodes to its fields and
/// opens once; replayed, reordered, under another key or with any one bit
/// changed it does not.
fn frame_sealed(data: &[u8]) {
    let mut r = Reader::new(data);
    let kind = r.u8() % 20;
    let flags = r.u8();
    let seq = r.u64();
    let offset = r.u64();
    let length = r.u32();
    let flip = r.u32();
    let source = r.rest();
    let raw = |length: u32| {
        let mut b = [0u8; wire::HEADER_LEN];
        b[0..4].copy_from_slice(&wire::FRAME_MAGIC.to_be_bytes());
        b[4] = kind;
        b[5] = flags;
        b[8..16].copy_from_slice(&seq.to_be_bytes());
        b[16..24].copy_from_slice(&offset.to_be_bytes());
        b[24..28].copy_from_slice(&length.to_be_bytes());
        wire::decode_header(&b)
    };
    // Payload-carrying kinds get a length whose payload stays small.
    let h = match raw(length) {
        Ok(h) if h.payload_len <= 1 << 13 => h,
        Ok(_) | Err(wire::Error::PayloadTooLarge(_)) => match raw(length % (1 << 13)) {
            Ok(h) => h,
            Err(e) => panic!("a small length was refused: {e:?}"),
        },
        Err(wire::Error::UnknownKind(k)) => {
            assert!(k == 0 || k > 18);
            return;
        }
        Err(e) => panic!("decode_header refused a well-formed header: {e:?}"),
    };
    let payload: Vec<u8> = if source.is_empty() {
        vec![0; h.payload_len as usize]
    } else {
        source
            .iter()
            .copied()
            .cycle()
            .take(h.payload_len as usize)
            .collect()
    };
    let (mut tx, mut rx) = (Sealer::new(&FRAME_KEY), Sealer::new(&FRAME_KEY));
    let (hb, tag) = tx.seal(h, &payload);
    let got = match wire::decode_header(&hb) {
        Ok(g) => g,
        Err(e) => panic!("a sealed header does not decode: {e:?}"),
    };
    assert_eq!(
        got,
        Header {
            payload_crc: got.payload_crc,
            ..h
        }
    );
    if let Err(e) = rx.open(&hb, &got, &payload, &tag) {
        panic!("a sealed frame does not open: {e:?}");
    }
    if matches!(got.kind, wire::Kind::State | wire::Kind::ResyncDone) {
        match NodeState::decode(&payload) {
            Ok(s) => assert_eq!(s.encode(), payload),
            Err(e) => panic!("a state payload does not decode: {e:?}"),
        }
    }
    // Replayed: the receiver's counter moved on.
    assert_eq!(rx.open(&hb, &got, &payload, &tag), Err(wire::Error::Forged));
    // Another key.
    let mut stranger = Sealer::new(&[8; 32]);
    assert_eq!(
        stranger.open(&hb, &got, &payload, &tag),
        Err(wire::Error::Forged)
    );
    // Reordered: the second frame offered first.
    let (hb2, tag2) = tx.seal(h, &payload);
    let mut fresh = Sealer::new(&FRAME_KEY);
    assert_eq!(
        fresh.open(&hb2, &got, &payload, &tag2),
        Err(wire::Error::Forged)
    );
    // One bit flipped anywhere in header, payload or MAC, read back as the
    // reader would: refused, or the stream stops short.
    let mut frame = [&hb[..], &payload, &tag].concat();
    let at = (flip as usize >> 3) % frame.len();
    frame[at] ^= 1 << (flip & 7);
    let Ok(fh) = wire::decode_header(&frame) else {
        return;
    };
    let pl = fh.payload_len as usize;
    let rest = &frame[wire::HEADER_LEN..];
    if rest.len() < pl + wire::MAC_LEN {
        return;
    }
    let mut fresh = Sealer::new(&FRAME_KEY);
    let opened = fresh.open(
        &frame[..wire::HEADER_LEN],
        &fh,
        &rest[..pl],
        &rest[pl..pl + wire::MAC_LEN],
    );
    assert!(
        opened.is_err(),
        "a frame with bit {} of byte {at} flipped was opened",
        flip & 7
    );
}

fn node_state(data: &[u8]) {
    match NodeState::decode(data) {
        Ok(s) => assert_eq!(s.encode(), data, "NodeState does not round-trip"),
        Err(e) => {
            assert_ne!(data.len(), NodeState::LEN);
            let _ = e.to_string();
        }
    }
}

/// The handshake's Hello, read from the front of a stream.
fn hello(data: &[u8]) {
    match Hello::decode(data) {
        Ok(None) => assert!(
            data.len() < wire::HELLO_MAX,
            "{} bytes and still short",
            data.len()
        ),
        Ok(Some((h, used))) => {
            assert!(used <= data.len() && used <= wire::HELLO_MAX);
            // Every shorter prefix asks for more bytes, as a stream reader
            // needs.
            for k in 0..used {
                assert_eq!(Hello::decode(&data[..k]), Ok(None), "prefix of {k} bytes");
            }
            // Bytes after it change nothing.
            assert_eq!(Hello::decode(&data[..used]), Ok(Some((h.clone(), used))));
            let e = h.encode();
            let again = Hello::decode(&e);
            if h.cluster.len() <= 64 && h.node.len() <= 64 {
                assert_eq!(again, Ok(Some((h.clone(), e.len()))));
                let valid = |at: usize| {
                    let n = usize::from(data[at]);
                    std::str::from_utf8(&data[at + 1..at + 1 + n]).is_ok()
                };
                if valid(12) && valid(13 + usize::from(data[12])) {
                    assert_eq!(e, &data[..used]);
                }
            } else {
                assert!(matches!(again, Ok(Some(_))));
            }
        }
        Err(e) => {
            assert!(data.len() >= 12);
            let _ = e.to_string();
        }
    }
}

// ---- nbd_request --------------------------------------------------------

/// Target `nbd_request`: the bytes as the client's side of an NBD session
/// (an option header and its body, then a stream of requests and write
/// payloads), again with the magics put right so that the parsers past
/// them are reached, and as the fields of an `NBD_OPT_GO` body.
pub fn nbd_request(data: &[u8]) {
    nbd_option(data, false);
    nbd_option(data, true);
    nbd_go(data);
    go_structured(data);
    let mut r = Reader::new(data);
    let size = r.u64();
    let writable = r.u8() & 1 != 0;
    let stream = r.rest();
    nbd_transmission(stream, size, writable, false);
    nbd_transmission(stream, size, writable, true);
}

fn nbd_option(data: &[u8], fix_magic: bool) {
    let mut r = Reader::new(data);
    let mut hdr: [u8; 16] = r.array();
    if fix_magic {
        hdr[..8].copy_from_slice(&nbd::IHAVEOPT.to_be_bytes());
    } else if data.len() < 16 {
        return;
    }
    let o = match nbd::parse_option_header(&hdr) {
        Ok(o) => o,
        Err(why) => {
            assert!(be64(&hdr) != nbd::IHAVEOPT && !why.is_empty());
            return;
        }
    };
    assert_eq!(be64(&hdr), nbd::IHAVEOPT);
    assert_eq!((o.option, o.length), (be32(&hdr[8..]), be32(&hdr[12..])));
    // The server reads bodies of up to 64 KiB whole.
    let body = r.rest();
    if o.length <= 64 * 1024 && body.len() >= o.length as usize {
        let body = &body[..o.length as usize];
        if matches!(o.option, nbd::OPT_GO | nbd::OPT_INFO) {
            nbd_go(body);
        }
    }
}

/// NBD_OPT_GO / NBD_OPT_INFO body: accepted exactly when its lengths add
/// up, and then it says what the bytes say.
fn nbd_go(body: &[u8]) {
    match nbd::parse_go(body) {
        Ok(g) => {
            let nl = be32(body) as usize;
            let name = &body[4..4 + nl];
            let mut e = body[..4 + nl].to_vec();
            e.extend_from_slice(&(g.infos.len() as u16).to_be_bytes());
            for i in &g.infos {
                e.extend_from_slice(&i.to_be_bytes());
            }
            assert_eq!(e, body, "parse_go ignored bytes");
            assert_eq!(g.name, String::from_utf8_lossy(name));
        }
        Err(why) => {
            assert!(!why.is_empty());
            let well_formed = body.len() >= 6 && {
                let nl = be32(body) as usize;
                body.len().checked_sub(4 + 2).is_some_and(|r| r >= nl) && {
                    let rest = &body[4 + nl..];
                    let n = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                    rest.len() == 2 + 2 * n
                }
            };
            assert!(!well_formed, "parse_go refused a well-formed body: {why}");
        }
    }
}

/// A GO body built from fields in the input parses to those fields.
fn go_structured(data: &[u8]) {
    let mut r = Reader::new(data);
    let nl = usize::from(r.u8());
    let name = r.take(nl);
    let infos: Vec<u16> = r
        .rest()
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]))
        .collect();
    let mut body = (name.len() as u32).to_be_bytes().to_vec();
    body.extend_from_slice(name);
    body.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in &infos {
        body.extend_from_slice(&i.to_be_bytes());
    }
    match nbd::parse_go(&body) {
        Ok(g) => assert_eq!(
            g,
            nbd::GoRequest {
                name: String::from_utf8_lossy(name).into_owned(),
                infos
            }
        ),
        Err(why) => panic!("parse_go refused a well-formed body: {why}"),
    }
    body.push(0);
    assert!(
        nbd::parse_go(&body).is_err(),
        "a trailing byte was accepted"
    );
}

/// Requests as the transmission loop reads them: 28-byte headers, each
/// write followed by its payload (or as much of it as is left).
fn nbd_transmission(stream: &[u8], size: u64, writable: bool, fix_magic: bool) {
    let mut r = Reader::new(stream);
    for _ in 0..64 {
        if r.is_empty() {
            return;
        }
        let mut hdr: [u8; nbd::REQUEST_LEN] = r.array();
        if fix_magic {
            hdr[..4].copy_from_slice(&nbd::REQUEST_MAGIC.to_be_bytes());
        }
        let req = match nbd::parse_request(&hdr) {
            Ok(req) => req,
            Err(why) => {
                // The connection is dropped: nothing after it is read.
                assert!(be32(&hdr) != nbd::REQUEST_MAGIC && !why.is_empty());
                return;
            }
        };
        assert_eq!(nbd::encode_request(&req), hdr, "parse_request lost bytes");
        let drain = check_validate(&req, size, writable);
        r.take(usize::try_from(drain).unwrap_or(usize::MAX));
    }
}

/// `validate` against the rule it documents; returns the payload bytes
/// that follow the request on the stream.
fn check_validate(req: &Request, size: u64, writable: bool) -> u64 {
    let in_bounds = req
        .offset
        .checked_add(u64::from(req.length))
        .is_some_and(|end| end <= size);
    let small = req.length <= nbd::MAX_REQUEST;
    let acceptable = match req.command {
        nbd::CMD_READ => in_bounds && small,
        nbd::CMD_WRITE => in_bounds && small && writable,
        nbd::CMD_TRIM | nbd::CMD_WRITE_ZEROES => in_bounds && writable,
        nbd::CMD_FLUSH => writable,
        nbd::CMD_DISC => true,
        _ => false,
    };
    let payload = if req.command == nbd::CMD_WRITE {
        u64::from(req.length)
    } else {
        0
    };
    let fua = req.flags & nbd::CMD_FLAG_FUA != 0;
    let (offset, length) = (req.offset, req.length);
    match nbd::validate(req, size, writable) {
        Ok(c) => {
            assert!(
                acceptable,
                "validate accepted {req:?} (size {size}, writable {writable})"
            );
            let expected = match req.command {
                nbd::CMD_READ => Command::Read { offset, length },
                nbd::CMD_WRITE => Command::Write {
                    offset,
                    length,
                    fua,
                },
                nbd::CMD_TRIM => Command::Trim {
                    offset,
                    length,
                    fua,
                },
                nbd::CMD_WRITE_ZEROES => Command::WriteZeroes {
                    offset,
                    length,
                    fua,
                    punch: req.flags & nbd::CMD_FLAG_NO_HOLE == 0,
                },
                nbd::CMD_FLUSH => Command::Flush,
                _ => Command::Disconnect,
            };
            assert_eq!(c, expected);
        }
        Err(f) => {
            assert!(
                !acceptable,
                "validate refused {req:?} (size {size}, writable {writable}): {f:?}"
            );
            assert_eq!(f.drain, payload, "the stream would fall out of step");
            assert!(
                [nbd::EINVAL, nbd::ENOSPC, nbd::EPERM].contains(&f.errno) && !f.reason.is_empty()
            );
        }
    }
    payload
}

/// Target `mysql_server_bytes`: the bytes as what a "mysqld" sends the
/// health check (`core::mysql_wire`): (1) a packet stream, split as
/// `decode` splits it, each packet's sequence id taken as right so the
/// payloads are reached; (2) each payload, and the whole input, through
/// every parser of server packets; (3) the payloads fed to a result-set
/// skipper, with and without CLIENT_DEPRECATE_EOF; (4) the input framed
/// by `frame` and read back.
pub fn mysql_server_bytes(data: &[u8]) {
    use hadb::core::mysql_wire as my;
    let mut payloads = vec![data.to_vec()];
    let mut rest = data;
    while rest.len() >= my::HEADER_LEN {
        let seq = rest[3];
        match my::decode(rest, seq, 1 << 20) {
            Ok(Some(d)) => {
                assert!(d.used >= my::HEADER_LEN && d.used <= rest.len());
                assert_eq!(d.next_seq, seq.wrapping_add(1), "one short packet");
                assert_eq!(d.payload, rest[my::HEADER_LEN..d.used]);
                payloads.push(d.payload);
                rest = &rest[d.used..];
            }
            Ok(None) => {
                let len =
                    usize::from(rest[0]) | usize::from(rest[1]) << 8 | usize::from(rest[2]) << 16;
                assert!(
                    rest.len() < my::HEADER_LEN + len,
                    "decode waits for bytes it has"
                );
                break;
            }
            Err(e) => {
                assert!(matches!(e, my::Error::TooLarge { .. }), "{e}");
                break;
            }
        }
    }
    let caps41 = my::CLIENT_PROTOCOL_41 | my::CLIENT_TRANSACTIONS;
    for p in &payloads {
        mysql_payload(p, caps41);
        mysql_payload(p, caps41 | my::CLIENT_DEPRECATE_EOF);
    }
    for caps in [caps41, caps41 | my::CLIENT_DEPRECATE_EOF] {
        let columns = u64::from(data.first().copied().unwrap_or(0) % 4) + 1;
        let mut rs = my::ResultSetSkipper::new(columns, caps);
        for p in &payloads[1..] {
            match rs.feed(p) {
                Ok(my::Step::More) => {}
                Ok(my::Step::Done { .. } | my::Step::Err(_)) => {
                    assert!(rs.feed(p).is_err(), "fed past the end");
                    break;
                }
                Err(e) => assert!(!e.to_string().is_empty()),
            }
        }
    }
    let (framed, next) = my::frame(data, 7);
    match my::decode(&framed, 7, data.len()) {
        Ok(Some(d)) => assert_eq!(
            (d.payload.as_slice(), d.used, next),
            (data, framed.len(), d.next_seq)
        ),
        other => panic!("a framed payload does not decode: {other:?}"),
    }
}

fn mysql_payload(p: &[u8], caps: u32) {
    use hadb::core::mysql_wire as my;
    if let Ok(h) = my::parse_handshake(p) {
        assert_eq!(p[0], 10);
        assert!(!h.server_version.contains('\0'));
        assert!(h.nonce.len() >= 20 && h.nonce.len() < p.len());
        assert_ne!(h.capabilities & my::CLIENT_PROTOCOL_41, 0);
        assert_ne!(h.capabilities & my::CLIENT_SECURE_CONNECTION, 0);
    }
    if let Ok(e) = my::parse_err(p) {
        assert_eq!((p[0], e.code), (0xff, u16::from_le_bytes([p[1], p[2]])));
        assert!(
            e.sql_state
                .as_ref()
                .is_none_or(|s| p[3] == b'#' && s.len() <= 5 * 3)
        );
    }
    assert_eq!(
        my::parse_eof(p).is_ok(),
        my::is_eof(p) && p.len() >= 5,
        "an EOF packet is 0xfe and 5 to 8 bytes"
    );
    if let Ok(ok) = my::parse_ok(p, caps) {
        assert!(p[0] == 0 || p[0] == 0xfe);
        assert!(ok.info.len() + 7 <= p.len());
    }
    match my::parse_response(p, caps) {
        Ok(my::Response::ResultSet { columns }) => {
            assert!((1..=my::MAX_COLUMNS).contains(&columns))
        }
        Ok(my::Response::Ok(_)) => assert_eq!(p[0], 0),
        Ok(my::Response::Err(_)) => assert_eq!(p[0], 0xff),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    match my::parse_auth_reply(p, caps) {
        Ok(my::AuthReply::MoreData(d)) => assert_eq!((p[0], &p[1..]), (1, d.as_slice())),
        Ok(my::AuthReply::Switch { plugin, .. }) => {
            assert_eq!(p[0], 0xfe);
            assert!(!plugin.contains('\0'));
        }
        Ok(_) => assert!(p[0] == 0 || p[0] == 0xff),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}
