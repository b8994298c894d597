//! Quorum with a witness: a third, diskless hadb (`role = "witness"`) that
//! only votes, so that a pair cut in two has a majority on one side and
//! the other side knows it has none. Pure: the drivers pass in what the
//! heartbeats heard and the time.
//!
//! A node has quorum while it hears its peer, or while it holds the
//! witness's vote. It asks for the vote (`FLAG_WANTS_VOTE`) only once it
//! has lost its peer on every ring. The witness gives its one vote to one
//! node at a time, naming that node's incarnation in every heartbeat, and
//! prefers the primary: when both ask, or when the primary is heard but
//! has not asked yet, the secondary waits (`prefer_primary_us`).
//!
//! A holder keeps the vote while it asks and the witness hears it. The
//! witness takes it back at once when the holder stops asking (it hears
//! its peer again) or restarts (a new incarnation), and only after
//! `release_us` of silence when it is no longer heard: the holder still
//! counts the vote for up to two heartbeat timeouts after the witness
//! last heard it (one while the witness's packets still say they hear it,
//! one while the holder's membership of the witness is alive), and the
//! release waits longer than that, so two nodes never both count it.

/// What the witness heard of one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VoterView {
    /// Heard within the heartbeat timeout.
    pub heard: bool,
    pub incarnation: u64,
    /// Its heartbeats ask for the vote.
    pub asks: bool,
    pub primary: bool,
    pub up_to_date: bool,
}

impl VoterView {
    /// What the witness's heartbeat with one node says of it.
    pub fn of(m: &crate::core::heartbeat::Membership) -> VoterView {
        use crate::core::heartbeat::FLAG_WANTS_VOTE;
        use crate::core::replica::{DiskState, disk_from_code};
        let r = m.peer_report().unwrap_or_default();
        VoterView {
            heard: m.peer_alive(),
            incarnation: m.peer_incarnation().unwrap_or(0),
            asks: r.flags & FLAG_WANTS_VOTE != 0,
            primary: r.role == 1,
            up_to_date: disk_from_code(r.disk) == DiskState::UpToDate,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WitnessConfig {
    /// A holder the witness no longer hears keeps the vote this long;
    /// more than twice the heartbeat timeout (see the module's doc).
    pub release_us: u64,
    /// A secondary's request waits this long for the primary's, while
    /// the witness hears the primary.
    pub prefer_primary_us: u64,
}

impl WitnessConfig {
    /// From the heartbeat timeout: release after three, prefer the
    /// primary for two.
    pub fn from_timeout(timeout_us: u64) -> WitnessConfig {
        WitnessConfig {
            release_us: 3 * timeout_us,
            prefer_primary_us: 2 * timeout_us,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Holder {
    node: usize,
    incarnation: u64,
    silent_since_us: Option<u64>,
}

/// The witness's vote between nodes 0 and 1 (in name order).
pub struct Witness {
    cfg: WitnessConfig,
    holder: Option<Holder>,
    asking_since: [Option<u64>; 2],
}

impl Witness {
    pub fn new(cfg: WitnessConfig) -> Witness {
        Witness {
            cfg,
            holder: None,
            asking_since: [None, None],
        }
    }

    /// The node given the vote and its incarnation (what the heartbeats
    /// carry).
    pub fn vote(&self) -> Option<(usize, u64)> {
        self.holder.map(|h| (h.node, h.incarnation))
    }

    /// One step: returns what changed, in words, for the log.
    pub fn step(&mut self, now_us: u64, v: &[VoterView; 2]) -> Vec<String> {
        let mut log = Vec::new();
        for (n, view) in v.iter().enumerate() {
            if view.heard && view.asks {
                self.asking_since[n].get_or_insert(now_us);
            } else {
                self.asking_since[n] = None;
            }
        }
        if let Some(mut h) = self.holder {
            let view = v[h.node];
            if view.heard && view.incarnation != h.incarnation {
                log.push(format!("node {} restarted: its vote is taken back", h.node));
                self.holder = None;
            } else if view.heard && !view.asks {
                log.push(format!(
                    "node {} no longer asks (it hears its peer): vote released",
                    h.node
                ));
                self.holder = None;
            } else if view.heard {
                h.silent_since_us = None;
                self.holder = Some(h);
            } else {
                let since = *h.silent_since_us.get_or_insert(now_us);
                if now_us.saturating_sub(since) >= self.cfg.release_us {
                    log.push(format!(
                        "node {} silent for {} ms: vote released",
                        h.node,
                        self.cfg.release_us / 1000
                    ));
                    self.holder = None;
                } else {
                    self.holder = Some(h);
                }
            }
        }
        if self.holder.is_some() {
            return log;
        }
        let asking = |n: usize| self.asking_since[n].is_some();
        let chosen = match (asking(0), asking(1)) {
            (false, false) => None,
            (true, true) => Some(preferred(v)),
            (a, _) => {
                let (n, o) = if a { (0, 1) } else { (1, 0) };
                let other = v[o];
                let waited = now_us.saturating_sub(self.asking_since[n].unwrap_or(now_us));
                // The primary wins at once; a secondary waits a little for
                // a primary the witness still hears, which is about to
                // ask as well (it lost the same peer).
                let now_or_never = v[n].primary
                    || !other.heard
                    || !other.primary
                    || waited >= self.cfg.prefer_primary_us;
                now_or_never.then_some(n)
            }
        };
        if let Some(n) = chosen {
            log.push(format!(
                "node {n} lost its peer and asks: vote given (incarnation {})",
                v[n].incarnation
            ));
            self.holder = Some(Holder {
                node: n,
                incarnation: v[n].incarnation,
                silent_since_us: None,
            });
        }
        log
    }
}

/// Both ask at once: the primary, else the up-to-date copy, else the
/// first by name.
fn preferred(v: &[VoterView; 2]) -> usize {
    let score = |x: &VoterView| (x.primary, x.up_to_date);
    if score(&v[1]) > score(&v[0]) { 1 } else { 0 }
}

/// Where this node stands with the witness's vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Vote {
    /// The witness is not heard.
    Unheard,
    /// Heard, its vote is nobody's.
    Nobody,
    Mine,
    /// Given to the peer.
    Peers,
}

impl Vote {
    /// From the witness's last report, if it is heard.
    pub fn of(witness_heard: bool, vote: u64, my_incarnation: u64) -> Vote {
        match (witness_heard, vote) {
            (false, _) => Vote::Unheard,
            (true, 0) => Vote::Nobody,
            (true, v) if v == my_incarnation => Vote::Mine,
            (true, _) => Vote::Peers,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Vote::Unheard => "witness not heard",
            Vote::Nobody => "the witness's vote is nobody's",
            Vote::Mine => "the witness's vote is mine",
            Vote::Peers => "the witness gave its vote to the peer",
        }
    }
}

/// The `watchdog` fence method's proof: the peer advertised an armed
/// watchdog of `watchdog_ms`, and it has been silent on every ring for
/// twice that, counted from the later of its last sign and the start of
/// this attempt (which comes after this node won the vote: before, the
/// peer may have held quorum and had no reason to stop petting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchdogProof {
    /// The peer never said its watchdog is armed: this method cannot
    /// fence it.
    NotArmed,
    Wait {
        until_us: u64,
    },
    Confirmed {
        silent_us: u64,
    },
}

/// `advertised_ms`: the watchdog timeout the peer's last report says it
/// fences itself within (`settings::peer_self_fences`); None: it never
/// said so, and waiting proves nothing.
pub fn watchdog_proof(
    advertised_ms: Option<u32>,
    started_us: u64,
    last_heard_us: Option<u64>,
    peer_alive: bool,
    now_us: u64,
) -> WatchdogProof {
    let Some(watchdog_ms) = advertised_ms.filter(|ms| *ms > 0) else {
        return WatchdogProof::NotArmed;
    };
    let from = last_heard_us.map_or(started_us, |t| t.max(started_us));
    let until_us = from + 2 * u64::from(watchdog_ms) * 1000;
    if !peer_alive && now_us >= until_us {
        WatchdogProof::Confirmed {
            silent_us: now_us.saturating_sub(last_heard_us.unwrap_or(0)),
        }
    } else {
        WatchdogProof::Wait { until_us }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_000_000;

    fn node(heard: bool, asks: bool, primary: bool, inc: u64) -> VoterView {
        VoterView {
            heard,
            incarnation: inc,
            asks,
            primary,
            up_to_date: true,
        }
    }

    fn w() -> Witness {
        Witness::new(WitnessConfig::from_timeout(T))
    }

    #[test]
    fn the_primary_wins_when_both_ask() {
        let mut w = w();
        w.step(
            0,
            &[node(true, true, false, 10), node(true, true, true, 20)],
        );
        assert_eq!(w.vote(), Some((1, 20)));
        // Held while it asks and is heard, whatever the other does.
        w.step(
            T,
            &[node(true, true, false, 10), node(true, true, true, 20)],
        );
        assert_eq!(w.vote(), Some((1, 20)));
    }

    #[test]
    fn a_secondary_waits_for_a_heard_primary_then_gets_it() {
        let mut w = w();
        let v = [node(true, true, false, 10), node(true, false, true, 20)];
        w.step(0, &v);
        assert_eq!(w.vote(), None, "the primary is heard and may ask");
        w.step(T, &v);
        assert_eq!(w.vote(), None);
        w.step(2 * T, &v);
        assert_eq!(w.vote(), Some((0, 10)));
    }

    #[test]
    fn a_secondary_gets_it_at_once_when_the_primary_is_not_heard() {
        let mut w = w();
        w.step(
            0,
            &[node(true, true, false, 10), node(false, false, true, 20)],
        );
        assert_eq!(w.vote(), Some((0, 10)));
    }

    #[test]
    fn a_silent_holder_keeps_it_for_release_then_loses_it() {
        let mut w = w();
        w.step(
            0,
            &[node(true, true, true, 10), node(false, false, false, 20)],
        );
        assert_eq!(w.vote(), Some((0, 10)));
        // Cut from the witness too; the other node now asks.
        let v = [node(false, true, true, 10), node(true, true, false, 20)];
        w.step(T, &v);
        w.step(T + 3 * T - 1, &v);
        assert_eq!(w.vote(), Some((0, 10)), "not before release_us");
        w.step(4 * T, &v);
        assert_eq!(w.vote(), Some((1, 20)));
    }

    #[test]
    fn a_holder_that_hears_its_peer_again_or_restarts_releases_it() {
        let mut w = w();
        w.step(
            0,
            &[node(true, true, true, 10), node(false, false, false, 20)],
        );
        w.step(
            T,
            &[node(true, false, true, 10), node(true, false, false, 20)],
        );
        assert_eq!(w.vote(), None);
        w.step(
            2 * T,
            &[node(true, true, true, 10), node(false, false, false, 20)],
        );
        assert_eq!(w.vote(), Some((0, 10)));
        // A new run of the holder (the old one is dead): the vote names
        // the new incarnation, never the old one again.
        w.step(
            3 * T,
            &[node(true, true, true, 11), node(false, false, false, 20)],
        );
        assert_eq!(w.vote(), Some((0, 11)));
    }

    #[test]
    fn the_vote_as_a_node_sees_it() {
        assert_eq!(Vote::of(false, 5, 5), Vote::Unheard);
        assert_eq!(Vote::of(true, 0, 5), Vote::Nobody);
        assert_eq!(Vote::of(true, 5, 5), Vote::Mine);
        assert_eq!(Vote::of(true, 6, 5), Vote::Peers);
    }

    #[test]
    fn the_watchdog_proof_counts_from_the_later_of_silence_and_start() {
        use WatchdogProof::*;
        assert_eq!(watchdog_proof(None, 0, None, false, 99 * T), NotArmed);
        // Last heard at 1 s, the attempt started at 10 s: 10 + 2 * 5.
        let p = |now| watchdog_proof(Some(5000), 10 * T, Some(T), false, now);
        assert_eq!(p(19 * T), Wait { until_us: 20 * T });
        assert_eq!(p(20 * T), Confirmed { silent_us: 19 * T });
        // Heard again: never confirmed.
        assert!(matches!(
            watchdog_proof(Some(5000), 0, Some(T), true, 99 * T),
            Wait { .. }
        ));
    }
}
