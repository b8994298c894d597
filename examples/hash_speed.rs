//! How fast this CPU checksums, authenticates and copies replicated data:
//! the per-byte work hadb does for every replicated block. Run inside the
//! test VMs by `tests/bench/vm-profile`, where TCG emulates the CPU and
//! vector instructions cost far more than they do on real hardware.

use std::time::Instant;

fn rate(bytes: usize, since: Instant) -> f64 {
    bytes as f64 / since.elapsed().as_secs_f64() / (1 << 20) as f64
}

fn main() {
    let n = 8 << 20;
    let src: Vec<u8> = (0..n).map(|i| (i * 7 + 3) as u8).collect();
    let mut dst = vec![0u8; n];
    let key = [7u8; 32];
    // The first round pays the page faults of `dst`; the second is the
    // steady state.
    for round in ["cold", "warm"] {
        let t = Instant::now();
        let crc = crc32c::crc32c(&src);
        let crc_rate = rate(n, t);
        let t = Instant::now();
        let mut mac = blake3::Hasher::new_keyed(&key);
        mac.update(&src);
        let tag = mac.finalize();
        let mac_rate = rate(n, t);
        let t = Instant::now();
        dst.copy_from_slice(&src);
        let copy_rate = rate(n, t);
        // Printing the results keeps the work from being optimised away.
        println!(
            "{round}: crc32c {crc_rate:.0} MiB/s  keyed blake3 {mac_rate:.0} MiB/s  copy {copy_rate:.0} MiB/s  (crc {crc:08x} tag {:02x} byte {:02x})",
            tag.as_bytes()[0],
            dst[n / 2]
        );
    }
}
