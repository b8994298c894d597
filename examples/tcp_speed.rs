//! How fast one TCP stream crosses the link between the test VMs, with
//! nothing of hadb's in the way: the ceiling for any mirror there. Run
//! inside the VMs by `tests/bench/vm-profile`.
//!
//!   tcp_speed listen PORT        # receives one stream, prints MiB/s
//!   tcp_speed send HOST:PORT MIB # sends MIB MiB in 1 MiB writes

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("listen") => {
            let port = args.get(2).map_or("9000", String::as_str);
            let listener = TcpListener::bind(("0.0.0.0", port.parse().expect("a port")))
                .expect("tcp_speed: bind");
            let (mut conn, _) = listener.accept().expect("tcp_speed: accept");
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0usize;
            let t = Instant::now();
            loop {
                match conn.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => total += n,
                    Err(e) => panic!("tcp_speed: read: {e}"),
                }
            }
            let secs = t.elapsed().as_secs_f64();
            println!(
                "received {} MiB in {secs:.2} s: {:.1} MiB/s",
                total >> 20,
                total as f64 / secs / (1 << 20) as f64
            );
        }
        Some("send") => {
            let to = args.get(2).expect("tcp_speed send HOST:PORT MIB");
            let mib: usize = args.get(3).map_or(Ok(40), |m| m.parse()).expect("MiB");
            let mut conn = TcpStream::connect(to).expect("tcp_speed: connect");
            let _ = conn.set_nodelay(true);
            let buf = vec![0x5au8; 1 << 20];
            let t = Instant::now();
            for _ in 0..mib {
                conn.write_all(&buf).expect("tcp_speed: write");
            }
            conn.shutdown(std::net::Shutdown::Write)
                .expect("tcp_speed: shutdown");
            // Waits for the listener to close: every byte has arrived.
            let _ = conn.read(&mut [0u8; 1]);
            let secs = t.elapsed().as_secs_f64();
            println!(
                "sent {mib} MiB in {secs:.2} s: {:.1} MiB/s",
                mib as f64 / secs
            );
        }
        _ => eprintln!("usage: tcp_speed listen PORT | tcp_speed send HOST:PORT MIB"),
    }
}
