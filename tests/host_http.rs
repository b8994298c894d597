//! /probe and /metrics over HTTP from real daemons, and what happens to
//! requests that are not HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Pair, free_port};

fn get(port: u16, raw: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, out)
}

#[test]
fn probe_is_200_only_on_the_primary_and_metrics_say_why() {
    common::require("qemu-io", "qemu-utils");
    let mut p = Pair::new("http", "sync", 16 << 20);
    let ports = [free_port(), free_port()];
    for (n, port) in ports.iter().enumerate() {
        let text = p.config_text(n, "sync").replace(
            "[control]\n",
            &format!("[control]\nhttp = \"127.0.0.1:{port}\"\n"),
        );
        std::fs::write(p.config(n), text).unwrap();
    }
    p.start(0);
    p.start(1);
    p.wait(0, "peer", |s| {
        s.is_some_and(|s| !s["volume"]["peer"].is_null())
    });
    p.primary(0);
    p.wait_in_sync(0);

    let (code, body) = get(ports[0], b"GET /probe HTTP/1.1\r\nHost: lb\r\n\r\n");
    assert_eq!(code, 200, "{body}");
    let (code, body) = get(ports[1], b"GET /probe HTTP/1.1\r\nHost: lb\r\n\r\n");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("not the primary"), "{body}");

    common::qemu_io(&p.uri(0), &["write -P 0x11 0 64k", "write -P 0x12 64k 64k"]);
    let (code, body) = get(ports[0], b"GET /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(code, 200);
    // Prometheus's own text-format parser (the Python client's) reads
    // every family, and the histogram counts the two writes.
    let metrics = p.dir.join("metrics.txt");
    let text = body
        .split_once("\r\n\r\n")
        .map_or(body.as_str(), |(_, b)| b);
    std::fs::write(&metrics, text).unwrap();
    let parsed = std::process::Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import sys\n\
             from prometheus_client.parser import text_string_to_metric_families as f\n\
             for fam in f(open(sys.argv[1]).read()):\n\
             \x20   for s in fam.samples:\n\
             \x20       print(fam.type, s.name, s.labels.get('le', ''), s.value)\n",
        ])
        .arg(&metrics)
        .output()
        .expect("run /usr/bin/python3 (apt-get install python3-prometheus-client)");
    let out = String::from_utf8_lossy(&parsed.stdout).to_string();
    assert!(
        parsed.status.success(),
        "the Prometheus parser refused /metrics: {}\n{body}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    for sample in [
        "histogram hadb_volume_write_latency_seconds_count  2.0",
        "histogram hadb_volume_write_latency_seconds_bucket +Inf 2.0",
        "counter hadb_promotions_total  1.0",
        "counter hadb_fences_requested_total  0.0",
    ] {
        assert!(out.contains(sample), "no `{sample}` in:\n{out}");
    }
    for line in [
        "hadb_volume_role{node=\"a\",role=\"primary\"} 1",
        "hadb_volume_link{node=\"a\",link=\"connected\"} 1",
        "hadb_heartbeat_peer_alive{node=\"a\"} 1",
        "# TYPE hadb_volume_replicated_bytes_total counter",
    ] {
        assert!(body.contains(line), "missing {line}:\n{body}");
    }
    // A heartbeat round trip on loopback: measured, and well under a
    // second.
    let rtt = body
        .lines()
        .find_map(|l| l.strip_prefix("hadb_heartbeat_rtt_seconds{node=\"a\",ring=\"0\"} "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no ring0 round trip in:\n{body}"));
    assert!((0.0..1.0).contains(&rtt), "ring0 round trip {rtt} s");

    // Not HTTP, a method that is not GET, an unknown path, a head that
    // never ends: refused, the daemon unharmed.
    assert_eq!(get(ports[0], b"\x16\x03\x01\x02\x00garbage\r\n\r\n").0, 400);
    assert_eq!(get(ports[0], b"POST /probe HTTP/1.1\r\n\r\n").0, 405);
    assert_eq!(get(ports[0], b"GET /etc/passwd HTTP/1.1\r\n\r\n").0, 404);
    let mut long = b"GET /probe HTTP/1.1\r\n".to_vec();
    long.extend(std::iter::repeat_n(b'x', 20_000));
    assert_eq!(get(ports[0], &long).0, 431);
    assert_eq!(get(ports[0], b"GET /probe HTTP/1.1\r\n\r\n").0, 200);

    // The primary's I/O frozen (peer gone, sync): no longer a target.
    p.kill(1);
    p.wait_link_lost(0);
    let mut w = common::qemu_io_spawn(&p.uri(0), &["write -P 0x01 0 4k"]);
    p.wait(0, "frozen", |s| {
        s.is_some_and(|s| s["volume"]["frozen"] == true)
    });
    let (code, body) = get(ports[0], b"GET /probe HTTP/1.1\r\n\r\n");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("frozen"), "{body}");
    assert!(p.hadb(0, &["volume", "go-alone"]).status.success());
    let _ = w.wait();
}
