#![no_main]

use libfuzzer_sys::fuzz_target;

// With the replay model on: every accept or refusal must be what the
// documented window rule says (see `heartbeat_membership` in src/lib.rs).
fuzz_target!(|data: &[u8]| hadb_fuzz::heartbeat_membership(data, true));
