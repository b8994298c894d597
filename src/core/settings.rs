//! What one node may count on in the other's settings. Two nodes whose
//! hadb.toml differ in a setting the rules of one rely on in the other
//! can end with two primaries: the `watchdog` fence counts a peer fenced
//! because it would have fenced itself, and a peer configured without
//! the self-fence never does. So a node says in its heartbeats only
//! what it really does, and (see `Settings`) the settings that must
//! agree are compared whenever the nodes meet.

use crate::core::heartbeat::{FLAG_WATCHDOG, NodeReport};

/// Whether this node fences itself (stops petting its watchdog) once it
/// has lost quorum, as the manager's self-fence rule does: it needs a
/// witness (without one a node cannot know it is the minority), the
/// `watchdog` method among its own fence methods (the self-fence is that
/// method's other half, and only a node configured for it does it), and
/// the watchdog enabled. The daemon, the manager's config and the
/// simulation all take it from here.
pub fn self_fences(witness: bool, watchdog_method: bool, watchdog_enabled: bool) -> bool {
    witness && watchdog_method && watchdog_enabled
}

/// What this node's heartbeats say of its watchdog: the flag and the
/// timeout. Only a node that will fence itself, and whose watchdog is
/// open (`armed_ms`), says it is armed: the peer's `watchdog` fence
/// counts on exactly that. A watchdog that only guards against a hung
/// hadb is not advertised (its node keeps petting when cut off).
pub fn watchdog_advert(self_fences: bool, armed_ms: Option<u32>) -> (u8, u32) {
    match armed_ms {
        Some(ms) if self_fences && ms > 0 => (FLAG_WATCHDOG, ms),
        _ => (0, 0),
    }
}

/// The watchdog timeout within which the peer, by its last report,
/// fences itself; None: it said it does not.
pub fn peer_self_fences(r: &NodeReport) -> Option<u32> {
    (r.flags & FLAG_WATCHDOG != 0 && r.watchdog_timeout_ms > 0).then_some(r.watchdog_timeout_ms)
}

/// The settings that must agree between the two nodes, as every
/// heartbeat carries them (`docs/wire.md`, offset 92). Each is one that
/// a rule on one node relies on in the other:
///
/// - `volume.mode`: what the primary's acknowledgement means, and
///   whether a secondary may be left behind;
/// - whether the node fences itself (`fencing.methods` holds
///   `watchdog`, with a witness and the watchdog on): the peer's
///   `watchdog` fence counts on it;
/// - the witness, present or not, and which: quorum means a majority of
///   the same three;
/// - `heartbeat.timeout`: the self-fence grace and the vote's release
///   are counted in the peer's timeouts;
/// - `fencing.fence_delay`: the secondary's head start rule (the primary
///   must fence first);
/// - `watchdog.timeout`, where the node fences itself: the peer's fence
///   waits twice it.
///
/// `format` 0 means "not carried" (the witness's heartbeats): nothing to
/// compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Settings {
    pub format: u8,
    /// 0 sync, 1 semisync, 2 async.
    pub mode: u8,
    pub self_fences: bool,
    /// A digest of the witness's node name (never 0); 0: no witness.
    pub witness: u32,
    pub heartbeat_timeout_ms: u32,
    pub fence_delay_ms: u32,
    /// The configured watchdog timeout if the node fences itself, else 0
    /// (a watchdog that only guards against a hung hadb may differ).
    pub watchdog_timeout_ms: u32,
}

/// The one format there is.
pub const FORMAT: u8 = 1;
/// Bytes on the wire.
pub const WIRE_LEN: usize = 20;

fn ms(us: u64) -> u32 {
    u32::try_from(us / 1000).unwrap_or(u32::MAX)
}

/// A short digest of the witness's name: enough to tell two different
/// witnesses apart, never 0 (which means none).
fn witness_digest(name: &str) -> u32 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(name.as_bytes());
    u32::from_be_bytes([d[0], d[1], d[2], d[3]]).max(1)
}

impl Settings {
    pub fn new(
        mode: crate::config::Mode,
        self_fences: bool,
        witness: Option<&str>,
        heartbeat_timeout_us: u64,
        fence_delay_us: u64,
        watchdog_timeout_us: u64,
    ) -> Settings {
        use crate::config::Mode;
        Settings {
            format: FORMAT,
            mode: match mode {
                Mode::Sync => 0,
                Mode::Semisync => 1,
                Mode::Async => 2,
            },
            self_fences,
            witness: witness.map_or(0, witness_digest),
            heartbeat_timeout_ms: ms(heartbeat_timeout_us),
            fence_delay_ms: ms(fence_delay_us),
            watchdog_timeout_ms: if self_fences {
                ms(watchdog_timeout_us)
            } else {
                0
            },
        }
    }

    pub fn encode(&self) -> [u8; WIRE_LEN] {
        let mut b = [0u8; WIRE_LEN];
        b[0] = self.format;
        b[1] = self.mode;
        b[2] = u8::from(self.self_fences);
        b[4..8].copy_from_slice(&self.witness.to_be_bytes());
        b[8..12].copy_from_slice(&self.heartbeat_timeout_ms.to_be_bytes());
        b[12..16].copy_from_slice(&self.fence_delay_ms.to_be_bytes());
        b[16..20].copy_from_slice(&self.watchdog_timeout_ms.to_be_bytes());
        b
    }

    /// Any bytes decode; what they mean is checked by `differences`.
    pub fn decode(b: &[u8; WIRE_LEN]) -> Settings {
        let u32_at = |at: usize| u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        Settings {
            format: b[0],
            mode: b[1],
            self_fences: b[2] & 1 != 0,
            witness: u32_at(4),
            heartbeat_timeout_ms: u32_at(8),
            fence_delay_ms: u32_at(12),
            watchdog_timeout_ms: u32_at(16),
        }
    }
}

fn mode_name(m: u8) -> String {
    match m {
        0 => "sync".into(),
        1 => "semisync".into(),
        2 => "async".into(),
        other => format!("mode {other}"),
    }
}

fn duration(ms: u32) -> String {
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// One setting that differs: the key, and its value here and on the
/// peer, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub key: &'static str,
    pub here: String,
    pub peer: String,
}

/// The settings that differ between this node and the peer's last
/// report, in a fixed order. Empty when they agree, or when the peer's
/// report carries none (format 0: a witness).
pub fn differences(here: &Settings, peer: &Settings) -> Vec<Difference> {
    let mut out = Vec::new();
    if peer.format == 0 || here.format == 0 {
        return out;
    }
    if peer.format != here.format {
        out.push(Difference {
            key: "settings format",
            here: here.format.to_string(),
            peer: peer.format.to_string(),
        });
        return out;
    }
    let mut add = |key, differ: bool, here: String, peer: String| {
        if differ {
            out.push(Difference { key, here, peer });
        }
    };
    add(
        "volume.mode",
        here.mode != peer.mode,
        mode_name(here.mode),
        mode_name(peer.mode),
    );
    let witness = |w: u32, other: u32| match (w, other) {
        (0, _) => "none".to_string(),
        (_, 0) => "configured".to_string(),
        _ => format!("another witness.node ({w:08x})"),
    };
    add(
        "witness",
        here.witness != peer.witness,
        witness(here.witness, peer.witness),
        witness(peer.witness, here.witness),
    );
    let fences = |f: bool| {
        if f {
            "with `watchdog` (fences itself without quorum)".to_string()
        } else {
            "without `watchdog` (never fences itself)".to_string()
        }
    };
    add(
        "fencing.methods",
        here.self_fences != peer.self_fences,
        fences(here.self_fences),
        fences(peer.self_fences),
    );
    add(
        "heartbeat.timeout",
        here.heartbeat_timeout_ms != peer.heartbeat_timeout_ms,
        duration(here.heartbeat_timeout_ms),
        duration(peer.heartbeat_timeout_ms),
    );
    add(
        "fencing.fence_delay",
        here.fence_delay_ms != peer.fence_delay_ms,
        duration(here.fence_delay_ms),
        duration(peer.fence_delay_ms),
    );
    // Compared only where both fence themselves: otherwise the
    // fencing.methods line says all there is.
    add(
        "watchdog.timeout",
        here.self_fences
            && peer.self_fences
            && here.watchdog_timeout_ms != peer.watchdog_timeout_ms,
        duration(here.watchdog_timeout_ms),
        duration(peer.watchdog_timeout_ms),
    );
    out
}

/// The refusal, in words, naming every key that differs; None when the
/// settings agree.
pub fn mismatch(here: &Settings, peer: &Settings) -> Option<String> {
    let d = differences(here, peer);
    if d.is_empty() {
        return None;
    }
    let keys: Vec<String> = d
        .iter()
        .map(|d| format!("{} differs: here {}, on the peer {}", d.key, d.here, d.peer))
        .collect();
    Some(format!(
        "SETTINGS DIFFER from the peer's: {}; make them the same on both nodes",
        keys.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;

    const S: u64 = 1_000_000;

    fn base() -> Settings {
        Settings::new(Mode::Sync, true, Some("hadbw"), S, 5 * S, 10 * S)
    }

    #[test]
    fn equal_settings_agree_and_survive_the_wire() {
        let a = base();
        assert_eq!(Settings::decode(&a.encode()), a);
        assert_eq!(mismatch(&a, &a), None);
        // The witness's heartbeats carry none: nothing to compare.
        assert_eq!(mismatch(&a, &Settings::default()), None);
    }

    #[test]
    fn each_key_that_differs_is_named_with_both_values() {
        let a = base();
        let b = Settings {
            mode: 2,
            heartbeat_timeout_ms: 2000,
            ..a
        };
        let m = mismatch(&a, &b).unwrap();
        assert!(
            m.contains("volume.mode differs: here sync, on the peer async"),
            "{m}"
        );
        assert!(
            m.contains("heartbeat.timeout differs: here 1s, on the peer 2s"),
            "{m}"
        );
        assert!(!m.contains("fence_delay"), "{m}");
        let keys =
            |b: Settings| -> Vec<&str> { differences(&a, &b).iter().map(|d| d.key).collect() };
        assert_eq!(
            keys(Settings::new(
                Mode::Sync,
                false,
                Some("hadbw"),
                S,
                5 * S,
                10 * S
            )),
            ["fencing.methods"],
            "one without the self-fence: its watchdog timeout does not count"
        );
        assert_eq!(
            keys(Settings::new(
                Mode::Sync,
                true,
                Some("other"),
                S,
                5 * S,
                10 * S
            )),
            ["witness"]
        );
        assert_eq!(
            keys(Settings::new(Mode::Sync, false, None, S, 5 * S, 10 * S)),
            ["witness", "fencing.methods"]
        );
        assert_eq!(
            keys(Settings::new(
                Mode::Sync,
                true,
                Some("hadbw"),
                S,
                3 * S,
                10 * S
            )),
            ["fencing.fence_delay"]
        );
        assert_eq!(
            keys(Settings::new(
                Mode::Sync,
                true,
                Some("hadbw"),
                S,
                5 * S,
                20 * S
            )),
            ["watchdog.timeout"]
        );
        // Watchdog timeouts of nodes that never fence themselves may
        // differ: nothing relies on them.
        let plain = |w| Settings::new(Mode::Async, false, None, S, 5 * S, w);
        assert_eq!(mismatch(&plain(10 * S), &plain(60 * S)), None);
    }

    #[test]
    fn any_bytes_decode_and_an_unknown_format_is_refused() {
        let b = Settings::decode(&[0xff; WIRE_LEN]);
        let m = mismatch(&base(), &b).unwrap();
        assert!(m.contains("settings format"), "{m}");
    }

    #[test]
    fn only_a_node_that_fences_itself_says_it_is_armed() {
        // Every precondition is needed.
        assert!(self_fences(true, true, true));
        assert!(!self_fences(false, true, true), "no witness");
        assert!(!self_fences(true, false, true), "no watchdog method");
        assert!(!self_fences(true, true, false), "watchdog off");
        assert_eq!(watchdog_advert(true, Some(6000)), (FLAG_WATCHDOG, 6000));
        // The watchdog is open but the node will never stop petting it
        // for want of quorum: the old rule advertised it, and the peer's
        // `watchdog` fence counted a live node fenced.
        assert_eq!(watchdog_advert(false, Some(6000)), (0, 0));
        // Configured to fence itself, but the device could not be armed.
        assert_eq!(watchdog_advert(true, None), (0, 0));
        assert_eq!(watchdog_advert(true, Some(0)), (0, 0));
    }

    #[test]
    fn the_peer_is_believed_only_with_flag_and_timeout() {
        let r = |flags, ms| NodeReport {
            flags,
            watchdog_timeout_ms: ms,
            ..NodeReport::default()
        };
        assert_eq!(peer_self_fences(&r(FLAG_WATCHDOG, 6000)), Some(6000));
        assert_eq!(peer_self_fences(&r(0, 6000)), None);
        assert_eq!(peer_self_fences(&r(FLAG_WATCHDOG, 0)), None);
    }
}
