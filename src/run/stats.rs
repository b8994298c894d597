//! Counters of refused input, shared by the tasks that refuse it. Plain
//! atomics: each is written by whoever saw the bad input and read only by
//! status, so no state machine hides behind them.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($name:ident: $doc:literal,)*) => {
        #[derive(Default)]
        pub struct Stats {
            $(#[doc = $doc] pub $name: AtomicU64,)*
        }

        impl Stats {
            pub fn snapshot(&self) -> serde_json::Value {
                let mut m = serde_json::Map::new();
                $(m.insert(stringify!($name).into(), self.$name.load(Ordering::Relaxed).into());)*
                serde_json::Value::Object(m)
            }
        }
    };
}

counters! {
    repl_handshake_failures: "Replication connections refused in the handshake (not a hadb peer, wrong cluster, unknown node, timeout).",
    repl_handshakes_shed: "Replication connections closed at once because too many others were still in the handshake.",
    repl_auth_failures: "Replication peers that failed the challenge-response (wrong key).",
    repl_bad_frames: "Frames refused after the handshake (bad magic, checksum, MAC, truncation, size); each drops the link.",
    repl_protocol_errors: "Well-formed frames that broke the protocol's rules; each drops the link.",
    nbd_bad_handshakes: "NBD clients refused during negotiation.",
    nbd_refused_requests: "NBD requests answered with an error (past the end, too large, unknown command, not primary).",
    nbd_bad_streams: "NBD connections closed because the request stream was out of step (bad magic, truncated).",
    control_refused: "Control socket connections refused (not root, malformed request).",
}

impl Stats {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Upper bounds of the write-acknowledge latency buckets, in µs: from a
/// page-cache write on one host to a peer that barely keeps up.
pub const LATENCY_BOUNDS_US: [u64; 14] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
    10_000_000,
];

/// Write-acknowledge latencies: from the request's arrival to its
/// completion (local disk and, when replicating, the peer).
#[derive(Default)]
pub struct Latency {
    /// One per bound, then one for everything slower.
    counts: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Latency {
    pub fn record(&self, us: u64) {
        let i = LATENCY_BOUNDS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Per-bucket counts (not cumulative), the last one unbounded.
    pub fn snapshot(&self) -> serde_json::Value {
        serde_json::json!({
            "bounds_us": LATENCY_BOUNDS_US,
            "counts": self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect::<Vec<_>>(),
            "sum_us": self.sum_us.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_land_in_their_buckets() {
        let l = Latency::default();
        for us in [1, 50, 51, 999, 20_000_000] {
            l.record(us);
        }
        let s = l.snapshot();
        let counts: Vec<u64> = serde_json::from_value(s["counts"].clone()).unwrap();
        assert_eq!(counts[0], 2, "{s}");
        assert_eq!(counts[1], 1, "{s}");
        assert_eq!(counts[4], 1, "{s}");
        assert_eq!(counts[LATENCY_BOUNDS_US.len()], 1, "{s}");
        assert_eq!(s["sum_us"], 1 + 50 + 51 + 999 + 20_000_000);
    }
}
