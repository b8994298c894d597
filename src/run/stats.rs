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
