//! How long a 4 KiB write and the flush after it take on a block device,
//! each timed on its own: InnoDB's commit (`innodb_flush_log_at_trx_commit
//! = 1`) is exactly this pair. Run inside the test VMs by
//! `tests/bench/vm-profile`, on /dev/nbd0 (replicating and alone) and on the
//! raw disk.
//!
//!   sync_latency DEVICE COUNT

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::Instant;

fn quantiles(name: &str, mut us: Vec<u64>) {
    us.sort_unstable();
    let q = |f: f64| us[((us.len() - 1) as f64 * f) as usize];
    println!(
        "{name:>14}: median {:>6} µs  p90 {:>6}  p99 {:>6}  max {:>6}",
        q(0.5),
        q(0.9),
        q(0.99),
        q(1.0)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(dev), Some(count)) = (args.get(1), args.get(2).and_then(|c| c.parse::<u64>().ok()))
    else {
        eprintln!("usage: sync_latency DEVICE COUNT");
        std::process::exit(2);
    };
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(dev)
        .unwrap_or_else(|e| panic!("sync_latency: opening {dev}: {e}"));
    // O_DIRECT wants the memory aligned too: the aligned 4 KiB inside 8.
    let mut block = vec![0x5au8; 8192];
    let start = block.as_ptr().align_offset(4096);
    let buf = &mut block[start..start + 4096];
    let (mut writes, mut flushes, mut both) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..count {
        // Spread over the first 32 MiB (the test volumes are 64 MiB), as a
        // log that wraps would be.
        let offset = (i * 7919 % 8192) * 4096;
        let t0 = Instant::now();
        file.write_all_at(buf, offset)
            .unwrap_or_else(|e| panic!("sync_latency: write: {e}"));
        let t1 = Instant::now();
        file.sync_data()
            .unwrap_or_else(|e| panic!("sync_latency: flush: {e}"));
        writes.push((t1 - t0).as_micros() as u64);
        flushes.push(t1.elapsed().as_micros() as u64);
        both.push(t0.elapsed().as_micros() as u64);
    }
    println!("{count} × 4 KiB write + flush on {dev}");
    quantiles("write", writes);
    quantiles("flush", flushes);
    quantiles("write + flush", both);
}
