#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| hadb_fuzz::mysql_server_bytes(data));
