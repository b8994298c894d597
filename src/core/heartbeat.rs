//! The heartbeat: signed unicast UDP packets between the two nodes, on one
//! or more links, saying "I am alive, and this is my state". Pure: the
//! driver (`run::heartbeat`) owns the sockets and the clock and passes
//! both in.
//!
//! A packet is accepted only if it has the right magic and version, names
//! this cluster and the peer, carries a valid HMAC-SHA256 over everything
//! before it, and is newer than what was heard: a lower incarnation (an
//! earlier run of the peer) or a sequence number already seen is a replay.
//! A packet that fails any check changes nothing but a counter.

use hmac::{KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = hmac::Hmac<Sha256>;

pub const MAGIC: [u8; 8] = *b"HADBBEAT";
/// 2 added the witness's vote and the round-trip echo, 3 the outdate
/// token; a pair runs one version (a node refuses the other's packets as
/// malformed), 4 the settings that must agree.
pub const VERSION: u8 = 4;
pub const MAC_LEN: usize = 32;
/// Fixed part before the two names.
pub const FIXED: usize = 112;
pub const MAX_NAME: usize = 64;
/// Sequence numbers below the highest seen that are still accepted once
/// (UDP may reorder).
pub const WINDOW: u64 = 64;
/// Mixed into every MAC, so a heartbeat can never pass for anything else
/// signed with the same key.
pub const DOMAIN: &[u8] = b"hadb heartbeat v4\0";

pub const FLAG_STANDBY: u8 = 1 << 0;
pub const FLAG_WATCHDOG: u8 = 1 << 1;
pub const FLAG_WITNESS: u8 = 1 << 2;
/// From a primary whose replication link is down: "mark your copy
/// outdated; I go on without you once you say you have".
pub const FLAG_OUTDATE_REQUEST: u8 = 1 << 3;
/// From a node that has lost its peer on every ring: "give me your vote"
/// (to the witness).
pub const FLAG_WANTS_VOTE: u8 = 1 << 4;
/// From a node whose hadb is restarting in place (`hadb restart-in-place`):
/// silence for a few seconds is its successor starting, not a death.
pub const FLAG_RESTARTING: u8 = 1 << 5;

/// The service byte: no service here, or it is starting, stopping, or
/// between checks.
pub const SERVICE_UNKNOWN: u8 = 0;
pub const SERVICE_HEALTHY: u8 = 1;
/// mysqld failed here (restarted too often): this node will not take the
/// primary role until the operator resets it.
pub const SERVICE_FAILED: u8 = 2;

/// What a node says of itself in every heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct NodeReport {
    /// 0 secondary, 1 primary.
    pub role: u8,
    /// The volume's disk state code (see `replica::disk_from_code`); 255
    /// for a witness, which has none.
    pub disk: u8,
    pub current_gen: u64,
    /// FLAG_* bits.
    pub flags: u8,
    /// The volume link state code (0 standalone .. 4 sync_target).
    pub volume_link: u8,
    /// Local service health: SERVICE_UNKNOWN, SERVICE_HEALTHY or
    /// SERVICE_FAILED.
    pub service: u8,
    pub watchdog_timeout_ms: u32,
    /// The incarnation of the peer this node heard within the timeout
    /// (0: none), so a node can tell whether it is heard in return.
    pub hears: u64,
    /// From the witness: the incarnation of the node it gives its vote to
    /// (0: nobody). Nodes send 0.
    pub vote: u64,
    /// From a primary that asks (FLAG_OUTDATE_REQUEST): the token of its
    /// current spell without the replication link. From a secondary whose
    /// copy is outdated: the token it outdated itself for. An "outdated"
    /// counts as proof only when it echoes the token the primary asks
    /// with now, so a report that predates the link's last session is
    /// never taken for one that follows it.
    pub outdate_token: u64,
    /// The sender's settings that must agree with this node's (none from
    /// the witness); compared by the manager (rule 16).
    pub settings: crate::core::settings::Settings,
}

/// Timing carried by every packet, for the round trip per link: the
/// sender's clock, and the echo of the last packet it heard on this link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timing {
    /// The sender's clock at sending, in microseconds (its own epoch).
    pub sent_us: u64,
    /// `sent_us` of the receiver's last packet heard on this link (0:
    /// none), and how long the sender held it before this packet.
    pub echo_us: u64,
    pub echo_hold_us: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub link: u8,
    pub incarnation: u64,
    pub seq: u64,
    pub cluster: String,
    pub node: String,
    pub report: NodeReport,
    pub timing: Timing,
}

/// Why a packet was refused; each has a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Too short, bad magic or version, bad lengths.
    Malformed,
    /// Another cluster, or a node name that is not the peer.
    Foreign,
    /// The MAC does not match (wrong key, or altered).
    BadSignature,
    /// An earlier incarnation or an already seen sequence number.
    Replayed,
    /// Authentic, but the sender has not yet heard this run of us: it may
    /// be a recording from before our start, so it is not believed (it
    /// will say it hears us within an interval or two).
    Unconfirmed,
}

fn mac(key: &[u8], bytes: &[u8]) -> [u8; MAC_LEN] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(DOMAIN);
    m.update(bytes);
    m.finalize().into_bytes().into()
}

impl Packet {
    pub fn encode(&self, key: &[u8]) -> Vec<u8> {
        let c = self.cluster.as_bytes();
        let n = self.node.as_bytes();
        let (c, n) = (&c[..c.len().min(MAX_NAME)], &n[..n.len().min(MAX_NAME)]);
        let mut b = vec![0u8; FIXED];
        b[0..8].copy_from_slice(&MAGIC);
        b[8] = VERSION;
        b[9] = self.link;
        b[10] = c.len() as u8;
        b[11] = n.len() as u8;
        b[12..20].copy_from_slice(&self.incarnation.to_be_bytes());
        b[20..28].copy_from_slice(&self.seq.to_be_bytes());
        let r = &self.report;
        b[28] = r.role;
        b[29] = r.disk;
        b[30..38].copy_from_slice(&r.current_gen.to_be_bytes());
        b[38] = r.flags;
        b[39] = r.volume_link;
        b[40] = r.service;
        b[44..48].copy_from_slice(&r.watchdog_timeout_ms.to_be_bytes());
        b[48..56].copy_from_slice(&r.hears.to_be_bytes());
        b[56..64].copy_from_slice(&r.vote.to_be_bytes());
        let t = &self.timing;
        b[64..72].copy_from_slice(&t.sent_us.to_be_bytes());
        b[72..80].copy_from_slice(&t.echo_us.to_be_bytes());
        b[80..84].copy_from_slice(&t.echo_hold_us.to_be_bytes());
        b[84..92].copy_from_slice(&r.outdate_token.to_be_bytes());
        b[92..112].copy_from_slice(&r.settings.encode());
        b.extend_from_slice(c);
        b.extend_from_slice(n);
        let tag = mac(key, &b);
        b.extend_from_slice(&tag);
        b
    }

    /// Parses and authenticates a packet; checks nothing about freshness.
    pub fn decode(b: &[u8], key: &[u8]) -> Result<Packet, Reject> {
        if b.len() < FIXED + MAC_LEN || b[0..8] != MAGIC || b[8] != VERSION {
            return Err(Reject::Malformed);
        }
        let (cl, nl) = (b[10] as usize, b[11] as usize);
        if cl > MAX_NAME || nl > MAX_NAME || b.len() != FIXED + cl + nl + MAC_LEN {
            return Err(Reject::Malformed);
        }
        let body = &b[..FIXED + cl + nl];
        let tag = &b[FIXED + cl + nl..];
        let good = mac(key, body);
        // Constant time: a forger learns nothing from how long it took.
        if tag
            .iter()
            .zip(good.iter())
            .fold(0u8, |a, (x, y)| a | (x ^ y))
            != 0
        {
            return Err(Reject::BadSignature);
        }
        let u64_at = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[at..at + 8]);
            u64::from_be_bytes(w)
        };
        let name = |at: usize, len: usize| {
            std::str::from_utf8(&b[at..at + len])
                .map(str::to_owned)
                .map_err(|_| Reject::Malformed)
        };
        Ok(Packet {
            link: b[9],
            incarnation: u64_at(12),
            seq: u64_at(20),
            cluster: name(FIXED, cl)?,
            node: name(FIXED + cl, nl)?,
            report: NodeReport {
                role: b[28],
                disk: b[29],
                current_gen: u64_at(30),
                flags: b[38],
                volume_link: b[39],
                service: b[40],
                watchdog_timeout_ms: u32::from_be_bytes([b[44], b[45], b[46], b[47]]),
                hears: u64_at(48),
                vote: u64_at(56),
                outdate_token: u64_at(84),
                settings: {
                    let mut w = [0u8; crate::core::settings::WIRE_LEN];
                    w.copy_from_slice(&b[92..112]);
                    crate::core::settings::Settings::decode(&w)
                },
            },
            timing: Timing {
                sent_us: u64_at(64),
                echo_us: u64_at(72),
                echo_hold_us: u32::from_be_bytes([b[80], b[81], b[82], b[83]]),
            },
        })
    }
}

/// Counters of one link, as status shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LinkCounters {
    pub sent: u64,
    pub received: u64,
    pub malformed: u64,
    pub foreign: u64,
    pub bad_signature: u64,
    pub replayed: u64,
    /// Authentic packets not (yet) saying they hear this run of us.
    pub unconfirmed: u64,
}

/// A link as status shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LinkView {
    pub up: bool,
    /// Microseconds since a valid packet arrived on it (None: never).
    pub silent_us: Option<u64>,
    /// The last round trip measured on it (None: not yet).
    pub rtt_us: Option<u64>,
    /// The longest silence between two believed packets while the link
    /// stayed up: how close it came to the timeout (under load, a busy
    /// link or CPU shows here long before the link is lost).
    pub longest_gap_us: u64,
    pub counters: LinkCounters,
}

/// Something that changed, for the log and the manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    LinkUp(usize),
    LinkDown(usize),
    /// The peer is heard again (on any link); `restarted` if it came back
    /// with a new incarnation.
    PeerFound {
        restarted: bool,
    },
    /// Every link is silent for the timeout.
    PeerLost,
}

/// What this node knows of its peer from heartbeats.
pub struct Membership {
    cluster: String,
    me: String,
    peer: String,
    key: Vec<u8>,
    timeout_us: u64,
    incarnation: u64,
    next_seq: u64,
    /// Per link: when a valid packet last arrived, and whether it counts
    /// as up.
    heard: Vec<(Option<u64>, bool)>,
    counters: Vec<LinkCounters>,
    /// The peer's incarnation, highest sequence and the window below it,
    /// of the packets believed.
    seen: Option<(u64, u64, u64)>,
    /// The highest incarnation of the peer in any authentic packet: what
    /// our packets echo, so the peer can believe them.
    peer_incarnation: u64,
    /// When an authentic packet (believed or not) last arrived: our
    /// packets say we hear the peer only within the timeout of it, so a
    /// link that fails one way is lost on both sides.
    last_authentic_us: Option<u64>,
    authentic_high: (u64, u64),
    report: Option<NodeReport>,
    alive: bool,
    /// Per link: the peer's `sent_us` of its last believed packet and when
    /// it arrived (the echo we send back), and the last round trip.
    echo: Vec<Option<(u64, u64)>>,
    rtt_us: Vec<Option<u64>>,
    longest_gap_us: Vec<u64>,
}

impl Membership {
    /// `incarnation`: new at every start and higher than the last one
    /// (`core::incarnation::next`, from the last one kept on disk and the
    /// wall clock), so packets of an earlier run are recognised as old.
    /// Nothing here reads a clock: `now_us` in every call is the driver's
    /// monotonic clock, so a wall-clock step within a run changes
    /// nothing.
    pub fn new(
        cluster: &str,
        me: &str,
        peer: &str,
        key: &[u8],
        links: usize,
        timeout_us: u64,
        incarnation: u64,
    ) -> Membership {
        Membership {
            cluster: cluster.to_owned(),
            me: me.to_owned(),
            peer: peer.to_owned(),
            key: key.to_vec(),
            timeout_us,
            incarnation,
            next_seq: 1,
            heard: vec![(None, false); links.max(1)],
            counters: vec![LinkCounters::default(); links.max(1)],
            seen: None,
            peer_incarnation: 0,
            last_authentic_us: None,
            authentic_high: (0, 0),
            report: None,
            alive: false,
            echo: vec![None; links.max(1)],
            rtt_us: vec![None; links.max(1)],
            longest_gap_us: vec![0; links.max(1)],
        }
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The packet to send on `link` at `now_us`.
    pub fn outgoing(&mut self, link: usize, mut report: NodeReport, now_us: u64) -> Vec<u8> {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(c) = self.counters.get_mut(link) {
            c.sent += 1;
        }
        let hearing = self
            .last_authentic_us
            .is_some_and(|t| now_us.saturating_sub(t) < self.timeout_us);
        report.hears = if hearing { self.peer_incarnation } else { 0 };
        let (echo_us, echo_hold_us) = match self.echo.get(link).copied().flatten() {
            Some((sent, at)) => (sent, now_us.saturating_sub(at).min(u32::MAX as u64) as u32),
            None => (0, 0),
        };
        Packet {
            link: link as u8,
            incarnation: self.incarnation,
            seq,
            cluster: self.cluster.clone(),
            node: self.me.clone(),
            report,
            // 0 means "no echo": the clock starts at 0 in the simulation.
            timing: Timing {
                sent_us: now_us.max(1),
                echo_us,
                echo_hold_us,
            },
        }
        .encode(&self.key)
    }

    /// A datagram arrived on `link`.
    pub fn receive(
        &mut self,
        link: usize,
        bytes: &[u8],
        now_us: u64,
    ) -> Result<Vec<Event>, Reject> {
        let link = link.min(self.heard.len() - 1);
        let result = self.check(bytes, now_us);
        let c = &mut self.counters[link];
        match result {
            Err(Reject::Malformed) => c.malformed += 1,
            Err(Reject::Foreign) => c.foreign += 1,
            Err(Reject::BadSignature) => c.bad_signature += 1,
            Err(Reject::Replayed) => c.replayed += 1,
            Err(Reject::Unconfirmed) => c.unconfirmed += 1,
            Ok(_) => c.received += 1,
        }
        let (p, restarted, newest) = result?;
        let mut events = Vec::new();
        // A reordered older packet proves the link, not the state.
        if newest {
            self.report = Some(p.report);
        }
        self.echo[link] = Some((p.timing.sent_us, now_us));
        if p.timing.echo_us != 0 {
            let rtt = now_us
                .saturating_sub(p.timing.echo_us)
                .saturating_sub(p.timing.echo_hold_us as u64);
            self.rtt_us[link] = Some(rtt);
        }
        if let (Some(last), true) = self.heard[link] {
            let gap = now_us.saturating_sub(last);
            self.longest_gap_us[link] = self.longest_gap_us[link].max(gap);
        }
        self.heard[link].0 = Some(now_us);
        if !self.heard[link].1 {
            self.heard[link].1 = true;
            events.push(Event::LinkUp(link));
        }
        if !self.alive || restarted {
            self.alive = true;
            events.push(Event::PeerFound { restarted });
        }
        Ok(events)
    }

    /// Authenticates and checks freshness; on success records the
    /// sequence. Returns the packet and whether it starts a new
    /// incarnation of a peer heard before.
    fn check(&mut self, bytes: &[u8], now_us: u64) -> Result<(Packet, bool, bool), Reject> {
        let p = Packet::decode(bytes, &self.key)?;
        if p.cluster != self.cluster || p.node != self.peer {
            return Err(Reject::Foreign);
        }
        // Only a packet newer than any authentic one so far: a replayed
        // recording must not make us say we hear the peer.
        if (p.incarnation, p.seq) > self.authentic_high {
            self.authentic_high = (p.incarnation, p.seq);
            self.last_authentic_us = Some(now_us);
        }
        // Only a packet that names our incarnation was sent after we
        // started: anything else may be a recording of the peer's past
        // (a node that just started would otherwise take any of those).
        self.peer_incarnation = self.peer_incarnation.max(p.incarnation);
        if p.report.hears != self.incarnation {
            return Err(Reject::Unconfirmed);
        }
        let mut newest = true;
        let restarted = match self.seen {
            None => {
                self.seen = Some((p.incarnation, p.seq, 0));
                false
            }
            Some((inc, _, _)) if p.incarnation > inc => {
                self.seen = Some((p.incarnation, p.seq, 0));
                true
            }
            Some((inc, _, _)) if p.incarnation < inc => return Err(Reject::Replayed),
            Some((inc, high, window)) => {
                if p.seq > high {
                    // Bit i-1 stands for `high - i`; the old highest moves
                    // to bit shift-1, which exists up to shift == WINDOW
                    // (a fuzzer found it lost at exactly 64).
                    let shift = p.seq - high;
                    let window = match shift {
                        s if s > WINDOW => 0,
                        WINDOW => 1 << (WINDOW - 1),
                        s => (window << s) | (1 << (s - 1)),
                    };
                    self.seen = Some((inc, p.seq, window));
                } else {
                    let back = high - p.seq;
                    if back == 0 || back > WINDOW || window & (1 << (back - 1)) != 0 {
                        return Err(Reject::Replayed);
                    }
                    self.seen = Some((inc, high, window | (1 << (back - 1))));
                    newest = false;
                }
                false
            }
        };
        Ok((p, restarted, newest))
    }

    /// A datagram on `link` from an address that is not the peer's there.
    pub fn refuse_foreign(&mut self, link: usize) {
        if let Some(c) = self.counters.get_mut(link) {
            c.foreign += 1;
        }
    }

    /// Time passes: links and the peer time out.
    pub fn tick(&mut self, now_us: u64) -> Vec<Event> {
        let mut events = Vec::new();
        for (i, (last, up)) in self.heard.iter_mut().enumerate() {
            if *up && last.is_none_or(|t| now_us.saturating_sub(t) >= self.timeout_us) {
                *up = false;
                events.push(Event::LinkDown(i));
            }
        }
        if self.alive && self.heard.iter().all(|(_, up)| !up) {
            self.alive = false;
            events.push(Event::PeerLost);
        }
        events
    }

    /// The incarnation of the peer's run that is believed (None: none yet).
    pub fn peer_incarnation(&self) -> Option<u64> {
        self.seen.map(|(inc, _, _)| inc)
    }

    /// Whether the peer is heard on some link.
    pub fn peer_alive(&self) -> bool {
        self.alive
    }

    /// The peer's last report (kept after it is lost, for status).
    pub fn peer_report(&self) -> Option<NodeReport> {
        self.report
    }

    /// When the peer was last heard on any link.
    pub fn last_heard_us(&self) -> Option<u64> {
        self.heard.iter().filter_map(|(t, _)| *t).max()
    }

    /// Whether the peer's last report says it hears this run of us.
    pub fn peer_hears_me(&self) -> bool {
        self.report.is_some_and(|r| r.hears == self.incarnation)
    }

    pub fn links(&self, now_us: u64) -> Vec<LinkView> {
        self.heard
            .iter()
            .zip(&self.counters)
            .zip(&self.rtt_us)
            .zip(&self.longest_gap_us)
            .map(|((((last, up), c), rtt), gap)| LinkView {
                up: *up,
                silent_us: last.map(|t| now_us.saturating_sub(t)),
                rtt_us: *rtt,
                longest_gap_us: *gap,
                counters: *c,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn pair() -> (Membership, Membership) {
        (
            Membership::new("hadb", "a", "b", KEY, 2, 1_000_000, 100),
            Membership::new("hadb", "b", "a", KEY, 2, 1_000_000, 200),
        )
    }

    /// b says it hears a: it must have heard a first.
    fn confirmed(a: &mut Membership, b: &mut Membership) {
        let _ = b.receive(0, &a.outgoing(0, NodeReport::default(), 0), 0);
    }

    #[test]
    fn roundtrip_and_every_byte_is_covered() {
        let p = Packet {
            link: 1,
            incarnation: 7,
            seq: 9,
            cluster: "hadb".into(),
            node: "hadb01".into(),
            report: NodeReport {
                role: 1,
                disk: 0,
                current_gen: 0xfeed,
                flags: FLAG_WATCHDOG,
                volume_link: 2,
                service: 1,
                watchdog_timeout_ms: 10_000,
                hears: 5,
                vote: 11,
                outdate_token: 0xdead,
                settings: crate::core::settings::Settings::new(
                    crate::config::Mode::Semisync,
                    true,
                    Some("hadbw"),
                    1_000_000,
                    5_000_000,
                    10_000_000,
                ),
            },
            timing: Timing {
                sent_us: 1,
                echo_us: 2,
                echo_hold_us: 3,
            },
        };
        let b = p.encode(KEY);
        assert_eq!(Packet::decode(&b, KEY), Ok(p));
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 0x01;
            assert!(
                Packet::decode(&bad, KEY).is_err(),
                "byte {i} is not covered"
            );
        }
        assert_eq!(
            Packet::decode(&b, b"another key"),
            Err(Reject::BadSignature)
        );
        for cut in [0, 10, FIXED, b.len() - 1] {
            assert_eq!(Packet::decode(&b[..cut], KEY), Err(Reject::Malformed));
        }
    }

    #[test]
    fn peer_found_lost_and_links_counted() {
        let (mut a, mut b) = pair();
        // b has not heard a yet: its packet could be a recording.
        let early = b.outgoing(0, NodeReport::default(), 0);
        assert_eq!(a.receive(0, &early, 500), Err(Reject::Unconfirmed));
        assert!(!a.peer_alive());
        confirmed(&mut a, &mut b);
        let pkt = b.outgoing(0, NodeReport::default(), 0);
        let ev = a.receive(0, &pkt, 1_000).unwrap();
        assert_eq!(
            ev,
            vec![Event::LinkUp(0), Event::PeerFound { restarted: false }]
        );
        assert!(a.peer_alive() && a.peer_hears_me());
        // Link 1 never heard: stays down; link 0 times out after 1 s.
        assert_eq!(a.tick(900_000), vec![]);
        assert_eq!(a.tick(1_001_000), vec![Event::LinkDown(0), Event::PeerLost]);
        let pkt = b.outgoing(1, NodeReport::default(), 0);
        let ev = a.receive(1, &pkt, 1_100_000).unwrap();
        assert_eq!(
            ev,
            vec![Event::LinkUp(1), Event::PeerFound { restarted: false }]
        );
        let links = a.links(1_200_000);
        assert_eq!((links[0].up, links[1].up), (false, true));
        assert_eq!(links[1].counters.received, 1);
        assert_eq!(links[0].counters.unconfirmed, 1);
        assert_eq!(links[1].silent_us, Some(100_000));
        // Link 1 came up with that packet: no gap yet; link 0's silence
        // before it went down is not a gap while up.
        assert_eq!((links[0].longest_gap_us, links[1].longest_gap_us), (0, 0));
        let pkt = b.outgoing(1, NodeReport::default(), 0);
        a.receive(1, &pkt, 1_400_000).unwrap();
        let pkt = b.outgoing(1, NodeReport::default(), 0);
        a.receive(1, &pkt, 1_500_000).unwrap();
        assert_eq!(a.links(1_500_000)[1].longest_gap_us, 300_000);
    }

    #[test]
    fn replays_old_incarnations_and_foreign_packets_change_nothing() {
        let (mut a, mut b) = pair();
        confirmed(&mut a, &mut b);
        let p1 = b.outgoing(0, NodeReport::default(), 0);
        let p2 = b.outgoing(0, NodeReport::default(), 0);
        let p3 = b.outgoing(0, NodeReport::default(), 0);
        a.receive(0, &p1, 1).unwrap();
        a.receive(0, &p3, 2).unwrap();
        assert_eq!(a.receive(0, &p3, 3), Err(Reject::Replayed));
        // Reordered but unseen: accepted once.
        a.receive(0, &p2, 4).unwrap();
        assert_eq!(a.receive(0, &p2, 5), Err(Reject::Replayed));
        // b restarts with a higher incarnation: once it hears a, accepted,
        // and its old packets are replays from now on.
        let mut b2 = Membership::new("hadb", "b", "a", KEY, 2, 1_000_000, 300);
        confirmed(&mut a, &mut b2);
        let q = b2.outgoing(0, NodeReport::default(), 0);
        assert_eq!(
            a.receive(0, &q, 6).unwrap(),
            vec![Event::PeerFound { restarted: true }]
        );
        assert_eq!(a.receive(0, &p1, 7), Err(Reject::Replayed));
        // Another cluster, or a third node, with the right key: foreign.
        let mut other = Membership::new("other", "b", "a", KEY, 2, 1_000_000, 400);
        let o = other.outgoing(0, NodeReport::default(), 0);
        assert_eq!(a.receive(0, &o, 8), Err(Reject::Foreign));
        let mut c = Membership::new("hadb", "c", "a", KEY, 2, 1_000_000, 400);
        assert_eq!(
            a.receive(0, &c.outgoing(0, NodeReport::default(), 0), 9),
            Err(Reject::Foreign)
        );
        let c0 = a.links(10)[0].counters;
        assert_eq!((c0.received, c0.replayed, c0.foreign), (4, 3, 2));
    }

    #[test]
    fn the_window_edge_and_reordered_reports() {
        let (mut a, mut b) = pair();
        confirmed(&mut a, &mut b);
        let mut sent: Vec<Vec<u8>> = Vec::new();
        for i in 0..=64u8 {
            sent.push(b.outgoing(
                0,
                NodeReport {
                    service: i,
                    ..NodeReport::default()
                },
                0,
            ));
        }
        a.receive(0, &sent[0], 1).unwrap();
        a.receive(0, &sent[64], 2).unwrap();
        // Exactly 64 below the highest, already seen: a replay.
        assert_eq!(a.receive(0, &sent[0], 3), Err(Reject::Replayed));
        // Unseen and older: accepted for the link, not for the state.
        a.receive(0, &sent[10], 4).unwrap();
        assert_eq!(a.peer_report().unwrap().service, 64);
    }

    #[test]
    fn a_recording_from_before_a_start_is_not_believed() {
        let (mut a, mut b) = pair();
        confirmed(&mut a, &mut b);
        let primary = NodeReport {
            role: 1,
            ..NodeReport::default()
        };
        let old = b.outgoing(0, primary, 0);
        a.receive(0, &old, 1).unwrap();
        // a restarts; the recording arrives first: not believed.
        let mut a2 = Membership::new("hadb", "a", "b", KEY, 2, 1_000_000, 150);
        assert_eq!(a2.receive(0, &old, 2), Err(Reject::Unconfirmed));
        assert_eq!(a2.peer_report(), None);
        assert!(!a2.peer_alive());
    }

    /// b restarts with its wall clock an hour behind, or not set at all
    /// (a VM that booted before its clock was): its next incarnation,
    /// taken from its last one and the clock as the driver does, still
    /// rises, and a hears a restart, not a replay. With the clock alone
    /// a would drop every packet of b's new run, lose it, and fence it.
    #[test]
    fn a_restart_with_the_clock_gone_back_is_heard_as_a_restart() {
        use crate::core::incarnation;
        const NOW_US: u64 = 1_735_689_600_000_000;
        for wall_at_restart in [NOW_US - 3_600_000_000, 0] {
            let a_inc = incarnation::next(None, NOW_US, 0).unwrap();
            let b_first = incarnation::next(None, NOW_US, 1).unwrap();
            let mut a = Membership::new("hadb", "a", "b", KEY, 2, 1_000_000, a_inc);
            let mut b = Membership::new("hadb", "b", "a", KEY, 2, 1_000_000, b_first);
            confirmed(&mut a, &mut b);
            a.receive(0, &b.outgoing(0, NodeReport::default(), 0), 1)
                .unwrap();
            assert_eq!(a.peer_incarnation(), Some(b_first));

            // b restarts; the driver kept b_first on disk.
            let b_next = incarnation::next(Some(b_first), wall_at_restart, 1).unwrap();
            let mut b2 = Membership::new("hadb", "b", "a", KEY, 2, 1_000_000, b_next);
            confirmed(&mut a, &mut b2);
            let primary = NodeReport {
                role: 1,
                ..NodeReport::default()
            };
            assert_eq!(
                a.receive(0, &b2.outgoing(0, primary, 0), 2),
                Ok(vec![Event::PeerFound { restarted: true }]),
                "clock at {wall_at_restart}: b's new run ({b_next}) after {b_first}"
            );
            assert!(b_next > b_first);
            assert_eq!(a.peer_incarnation(), Some(b_next));
            assert_eq!(a.peer_report().map(|r| r.role), Some(1));
            // And the other way: b's new run hears a, and a hears it back.
            b2.receive(0, &a.outgoing(0, NodeReport::default(), 3), 3)
                .unwrap();
            assert!(b2.peer_alive() && a.peer_hears_me());
        }
    }

    /// Packets that arrive late are refused as replays and change no
    /// state: one delayed past the window behind newer ones, and one of
    /// an earlier run delivered after the peer's new run was heard. Time
    /// plays no part: only the incarnation and the sequence decide.
    #[test]
    fn late_packets_are_refused() {
        let (mut a, mut b) = pair();
        confirmed(&mut a, &mut b);
        let primary = NodeReport {
            role: 1,
            ..NodeReport::default()
        };
        // Held back in the network while 65 newer ones are sent.
        let delayed = b.outgoing(0, primary, 0);
        let mut last = Vec::new();
        for _ in 0..WINDOW + 1 {
            last = b.outgoing(0, NodeReport::default(), 0);
        }
        a.receive(0, &last, 10).unwrap();
        assert_eq!(a.receive(0, &delayed, 11), Err(Reject::Replayed));
        assert_eq!(a.peer_report().map(|r| r.role), Some(0));

        // One of b's packets, never delivered, then b restarts.
        let from_the_last_run = b.outgoing(0, primary, 0);
        let mut b2 = Membership::new("hadb", "b", "a", KEY, 2, 1_000_000, 300);
        confirmed(&mut a, &mut b2);
        a.receive(0, &b2.outgoing(0, NodeReport::default(), 0), 12)
            .unwrap();
        assert_eq!(a.receive(0, &from_the_last_run, 13), Err(Reject::Replayed));
        assert_eq!(a.peer_report().map(|r| r.role), Some(0));
        assert_eq!(a.peer_incarnation(), Some(300));
        assert_eq!(a.links(14)[0].counters.replayed, 2);
    }

    /// The defaults (200 ms interval, 1 s timeout) under 1% loss and up
    /// to 200 ms of jitter, for a simulated hour: not one ring goes down.
    #[test]
    fn defaults_do_not_flap_under_loss_and_jitter() {
        let (mut a, mut b) = pair();
        confirmed(&mut a, &mut b);
        let mut rng = 0x1234_5678_u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        // Both ways: a node says it hears its peer only while it does.
        let mut in_flight: Vec<(u64, bool, Vec<u8>)> = Vec::new();
        let (mut lost, mut events) = (0, Vec::new());
        for i in 0..(3600 * 5) {
            let sent_at = i * 200_000;
            for to_a in [true, false] {
                let from = if to_a { &mut b } else { &mut a };
                let pkt = from.outgoing(0, NodeReport::default(), sent_at);
                if next() % 100 == 0 {
                    lost += 1;
                } else {
                    in_flight.push((sent_at + next() % 200_000, to_a, pkt));
                }
            }
            in_flight.sort_by_key(|(t, _, _)| *t);
            let now = sent_at + 199_999;
            while in_flight.first().is_some_and(|(t, _, _)| *t <= now) {
                let (t, to_a, p) = in_flight.remove(0);
                let to = if to_a { &mut a } else { &mut b };
                let _ = to.receive(0, &p, t);
                events.extend(to.tick(t));
            }
            events.extend(a.tick(now));
            events.extend(b.tick(now));
        }
        let rtt = a.links(0)[0].rtt_us.expect("a round trip was measured");
        assert!(rtt <= 400_000, "round trip {rtt} us above the jitter");
        assert!(lost > 200, "the loss was simulated ({lost} packets)");
        let downs: Vec<_> = events
            .iter()
            .filter(|e| matches!(e, Event::LinkDown(_) | Event::PeerLost))
            .collect();
        assert!(downs.is_empty(), "flapped: {downs:?}");
    }

    #[test]
    fn a_node_knows_whether_it_is_heard() {
        let (mut a, mut b) = pair();
        confirmed(&mut a, &mut b);
        confirmed(&mut b, &mut a);
        assert!(a.peer_hears_me());
        assert!(!b.peer_hears_me(), "a's packet went before a heard b");
    }

    /// A link that fails one way is lost on both sides: the side that
    /// still hears stops being believed once the other says it hears
    /// nothing.
    #[test]
    fn one_way_loss_is_lost_both_ways() {
        let (mut a, mut b) = pair();
        confirmed(&mut a, &mut b);
        for t in 0..5u64 {
            let now = t * 200_000;
            b.receive(0, &a.outgoing(0, NodeReport::default(), now), now)
                .ok();
            a.receive(0, &b.outgoing(0, NodeReport::default(), now), now)
                .ok();
        }
        assert!(a.peer_alive() && b.peer_alive());
        // a -> b is cut; b -> a still flows.
        let mut events = Vec::new();
        for t in 5..20u64 {
            let now = t * 200_000;
            let _ = a.outgoing(0, NodeReport::default(), now);
            let _ = a.receive(0, &b.outgoing(0, NodeReport::default(), now), now);
            events.extend(a.tick(now));
            b.tick(now);
        }
        assert!(!b.peer_alive(), "b hears nothing from a");
        assert!(
            !a.peer_alive(),
            "a must stop believing b once b says it does not hear a"
        );
        assert!(events.contains(&Event::PeerLost), "{events:?}");
        assert!(a.links(0)[0].counters.unconfirmed > 0);
    }

    #[test]
    fn the_round_trip_subtracts_the_time_the_peer_held_the_echo() {
        let (mut a, mut b) = pair();
        confirmed(&mut a, &mut b);
        confirmed(&mut b, &mut a);
        // a sends at 1000; b gets it at 1500 (0.5 ms one way), answers at
        // 9500 (held 8 ms); a gets that at 10_000: round trip 1 ms.
        let p = a.outgoing(0, NodeReport::default(), 1_000);
        b.receive(0, &p, 1_500).unwrap();
        let q = b.outgoing(0, NodeReport::default(), 9_500);
        a.receive(0, &q, 10_000).unwrap();
        assert_eq!(a.links(10_000)[0].rtt_us, Some(1_000));
    }
}
