//! HTTP on `[control] http`: `/probe` for a load balancer (200 only on the
//! primary that should take traffic, 503 with the reason otherwise) and
//! `/metrics` in Prometheus text format. GET only, one request per
//! connection; anything else gets a 4xx and the connection is closed.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::net::{TcpListener, TcpStream};

use crate::run::control::{Handler, Request};

/// Longest request head read; a probe's is a few dozen bytes.
const MAX_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn serve<H: Handler>(addr: SocketAddr, handler: Arc<H>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let handler = handler.clone();
        crate::run::spawn(async move {
            let _ = one(stream, &handler).await;
        })
        .detach();
    }
}

async fn respond(
    stream: &mut TcpStream,
    code: u16,
    reason: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.flush().await
}

/// The request line of a head, once the blank line that ends it arrived.
fn request_line(head: &[u8]) -> Option<Result<(String, String), ()>> {
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")?;
    let text = std::str::from_utf8(&head[..end]).map_err(|_| ());
    Some(text.and_then(|t| {
        let first = t.lines().next().ok_or(())?;
        let mut parts = first.split(' ');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(m), Some(p), Some(v), None) if v.starts_with("HTTP/1.") => {
                Ok((m.to_owned(), p.to_owned()))
            }
            _ => Err(()),
        }
    }))
}

async fn one<H: Handler>(mut stream: TcpStream, handler: &Arc<H>) -> std::io::Result<()> {
    use smol::future::FutureExt;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let parsed = loop {
        if let Some(r) = request_line(&head) {
            break r;
        }
        if head.len() > MAX_HEAD {
            return respond(
                &mut stream,
                431,
                "Request Header Fields Too Large",
                "request head too large\n",
            )
            .await;
        }
        let n = async { Some(stream.read(&mut buf).await) }
            .or(async {
                smol::Timer::after(READ_TIMEOUT).await;
                None
            })
            .await;
        match n {
            Some(Ok(0)) | None => return Ok(()),
            Some(Ok(n)) => head.extend_from_slice(&buf[..n]),
            Some(Err(e)) => return Err(e),
        }
    };
    let Ok((method, path)) = parsed else {
        return respond(&mut stream, 400, "Bad Request", "not an HTTP/1 request\n").await;
    };
    if method != "GET" && method != "HEAD" {
        return respond(&mut stream, 405, "Method Not Allowed", "GET only\n").await;
    }
    let status = handler
        .handle(Request {
            command: "status".into(),
            force: false,
            node: None,
            on: None,
        })
        .await;
    let Ok(status) = status else {
        return respond(
            &mut stream,
            503,
            "Service Unavailable",
            "the volume task does not answer\n",
        )
        .await;
    };
    match path.split('?').next().unwrap_or("") {
        "/probe" => match probe(&status) {
            Ok(why) => respond(&mut stream, 200, "OK", &why).await,
            Err(why) => respond(&mut stream, 503, "Service Unavailable", &why).await,
        },
        "/metrics" => respond(&mut stream, 200, "OK", &metrics(&status)).await,
        _ => respond(&mut stream, 404, "Not Found", "known: /probe, /metrics\n").await,
    }
}

/// Whether this node should take the load balancer's traffic: it is the
/// primary, its volume takes writes (not frozen), and the mysqld hadb
/// supervises is healthy.
pub fn probe(status: &Value) -> Result<String, String> {
    let v = &status["volume"];
    let role = v["role"].as_str().unwrap_or("?");
    if role != "primary" {
        return Err(format!("{role}: not the primary\n"));
    }
    if v["frozen"] == Value::Bool(true) {
        return Err("primary, but I/O is frozen waiting for the peer\n".into());
    }
    let m = &status["mysqld"];
    if m.is_object() && m["state"] != "healthy" {
        return Err(format!(
            "primary, but mysqld is {} ({})\n",
            m["state"].as_str().unwrap_or("?"),
            m["health"].as_str().unwrap_or("?")
        ));
    }
    Ok("primary\n".into())
}

/// Prometheus text format of what status knows.
pub fn metrics(status: &Value) -> String {
    let mut out = String::new();
    let v = &status["volume"];
    let node = status["node"].as_str().unwrap_or("");
    let mut gauge = |name: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{{node=\"{node}\"{labels}}} {value}");
        }
    };
    let one_of = |value: &Value, all: &[&str], label: &str| -> Vec<(String, f64)> {
        all.iter()
            .map(|s| {
                (
                    format!(",{label}=\"{s}\""),
                    f64::from(u8::from(value == *s)),
                )
            })
            .collect()
    };
    let num = |x: &Value| x.as_f64().unwrap_or(0.0);
    gauge(
        "hadb_volume_role",
        "1 for the node's volume role",
        &one_of(&v["role"], &["primary", "secondary"], "role"),
    );
    gauge(
        "hadb_volume_disk",
        "1 for the state of this node's copy",
        &one_of(
            &v["disk"],
            &["up_to_date", "outdated", "inconsistent", "failed"],
            "disk",
        ),
    );
    gauge(
        "hadb_volume_link",
        "1 for the replication link's state",
        &one_of(
            &v["link"],
            &[
                "standalone",
                "connecting",
                "connected",
                "sync_source",
                "sync_target",
            ],
            "link",
        ),
    );
    gauge(
        "hadb_volume_frozen",
        "1 while application I/O waits for the peer",
        &[(
            String::new(),
            f64::from(u8::from(v["frozen"] == Value::Bool(true))),
        )],
    );
    gauge(
        "hadb_volume_out_of_sync_bytes",
        "bytes marked out of sync with the peer",
        &[(String::new(), num(&v["out_of_sync_bytes"]))],
    );
    gauge(
        "hadb_volume_resync_bytes_per_second",
        "rate of the running resync (0: none)",
        &[(String::new(), num(&v["resync"]["rate_bytes_per_s"]))],
    );
    gauge(
        "hadb_heartbeat_peer_alive",
        "1 while the peer is heard on some ring",
        &[(
            String::new(),
            f64::from(u8::from(
                status["heartbeat"]["peer_alive"] == Value::Bool(true),
            )),
        )],
    );
    let rings: Vec<(String, f64)> = status["heartbeat"]["links"]
        .as_array()
        .map(|ls| {
            ls.iter()
                .map(|l| {
                    (
                        format!(",ring=\"{}\"", l["ring"]),
                        f64::from(u8::from(l["up"] == Value::Bool(true))),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    gauge(
        "hadb_heartbeat_ring_up",
        "1 while the ring carries valid heartbeats",
        &rings,
    );
    // A ring with no round trip yet has no sample: 0 would read as a
    // perfect link.
    let rtts: Vec<(String, f64)> = status["heartbeat"]["links"]
        .as_array()
        .map(|ls| {
            ls.iter()
                .filter_map(|l| {
                    let us = l["rtt_us"].as_u64()?;
                    Some((format!(",ring=\"{}\"", l["ring"]), us as f64 / 1e6))
                })
                .collect()
        })
        .unwrap_or_default();
    gauge(
        "hadb_heartbeat_rtt_seconds",
        "The last heartbeat round trip measured on the ring",
        &rtts,
    );
    gauge(
        "hadb_fence_pending",
        "1 while a fence of the peer waits for confirmation",
        &[(
            String::new(),
            f64::from(u8::from(status["manager"]["fence"]["state"] == "pending")),
        )],
    );
    let mysqld = &status["mysqld"];
    if mysqld.is_object() {
        gauge(
            "hadb_mysqld_state",
            "1 for the state of the mysqld hadb supervises",
            &one_of(
                &mysqld["state"],
                &[
                    "stopped",
                    "waiting",
                    "starting",
                    "healthy",
                    "unhealthy",
                    "stopping",
                    "failed",
                ],
                "state",
            ),
        );
    }
    let mut counter = |name: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{{node=\"{node}\"{labels}}} {value}");
        }
    };
    let c = &v["counters"];
    for (key, name, help) in [
        ("writes", "hadb_volume_writes_total", "application writes"),
        (
            "written_bytes",
            "hadb_volume_written_bytes_total",
            "application bytes written",
        ),
        (
            "replicated_bytes",
            "hadb_volume_replicated_bytes_total",
            "bytes sent to the peer",
        ),
        (
            "flushes",
            "hadb_volume_flushes_total",
            "application flushes",
        ),
        (
            "resync_blocks_sent",
            "hadb_volume_resync_blocks_sent_total",
            "4 KiB blocks sent by resyncs",
        ),
        (
            "resyncs_started",
            "hadb_volume_resyncs_total",
            "resyncs started",
        ),
        (
            "write_errors",
            "hadb_volume_write_errors_total",
            "local disk write errors",
        ),
        (
            "al_transactions",
            "hadb_volume_activity_log_transactions_total",
            "activity-log transactions",
        ),
    ] {
        counter(name, help, &[(String::new(), num(&c[key]))]);
    }
    if let Some(s) = v["semisync"].as_object() {
        for (key, name, help) in [
            (
                "yes_tx",
                "hadb_semisync_yes_tx_total",
                "writes that waited for the peer",
            ),
            (
                "no_tx",
                "hadb_semisync_no_tx_total",
                "writes that did not wait for the peer",
            ),
            (
                "no_times",
                "hadb_semisync_no_times_total",
                "times the volume went on without the peer",
            ),
        ] {
            counter(name, help, &[(String::new(), num(&s[key]))]);
        }
    }
    let bad: Vec<(String, f64)> = v["bad_input"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, n)| (format!(",kind=\"{k}\""), num(n)))
                .collect()
        })
        .unwrap_or_default();
    counter(
        "hadb_refused_input_total",
        "bad input refused, by kind",
        &bad,
    );
    counter(
        "hadb_promotions_total",
        "times this node became primary since hadb started",
        &[(String::new(), num(&v["promotions"]))],
    );
    let m = &status["manager"];
    counter(
        "hadb_fences_requested_total",
        "fences of the peer asked for",
        &[(String::new(), num(&m["fences_requested"]))],
    );
    counter(
        "hadb_fences_confirmed_total",
        "fences of the peer confirmed",
        &[(String::new(), num(&m["fences_confirmed"]))],
    );
    // Every attempt of every fence method, by how it ended; with the
    // seconds they took, an average per method and result.
    let totals = m["fence_attempt_totals"].as_array();
    let by = |key: &str| -> Vec<(String, f64)> {
        totals
            .into_iter()
            .flatten()
            .map(|t| {
                (
                    format!(
                        ",method=\"{}\",result=\"{}\"",
                        t["method"].as_str().unwrap_or("?"),
                        t["result"].as_str().unwrap_or("?")
                    ),
                    num(&t[key]),
                )
            })
            .collect()
    };
    counter(
        "hadb_fence_attempts_total",
        "fence method attempts, by method and result",
        &by("count"),
    );
    counter(
        "hadb_fence_attempt_seconds_total",
        "time spent in fence method attempts, by method and result",
        &by("seconds"),
    );
    if mysqld.is_object() {
        counter(
            "hadb_mysqld_restarts_total",
            "mysqld restarts after a crash, a failed start or failed checks",
            &[(String::new(), num(&mysqld["restarts_total"]))],
        );
    }
    if let Some(counts) = v["write_latency"]["counts"].as_array() {
        let _ = writeln!(
            out,
            "# HELP hadb_volume_write_latency_seconds application write acknowledge latency\n# TYPE hadb_volume_write_latency_seconds histogram"
        );
        let mut total = 0.0;
        for (i, c) in counts.iter().enumerate() {
            total += num(c);
            let le = match crate::run::stats::LATENCY_BOUNDS_US.get(i) {
                Some(b) => format!("{}", *b as f64 / 1e6),
                None => "+Inf".into(),
            };
            let _ = writeln!(
                out,
                "hadb_volume_write_latency_seconds_bucket{{node=\"{node}\",le=\"{le}\"}} {total}"
            );
        }
        let _ = writeln!(
            out,
            "hadb_volume_write_latency_seconds_sum{{node=\"{node}\"}} {}\nhadb_volume_write_latency_seconds_count{{node=\"{node}\"}} {total}",
            num(&v["write_latency"]["sum_us"]) / 1e6
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn request_lines() {
        assert_eq!(
            request_line(b"GET /probe HTTP/1.1\r\nHost: x"),
            None,
            "head not complete"
        );
        assert_eq!(
            request_line(b"GET /probe HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Ok(("GET".into(), "/probe".into())))
        );
        assert_eq!(request_line(b"\x16\x03\x01garbage\r\n\r\n"), Some(Err(())));
        assert_eq!(request_line(b"GET / HTTP/1.1 extra\r\n\r\n"), Some(Err(())));
    }

    #[test]
    fn probe_and_metrics_from_status() {
        let st = json!({"node": "a", "volume": {"role": "primary", "disk": "up_to_date",
            "link": "connected", "frozen": false, "counters": {"writes": 3}},
            "heartbeat": {"peer_alive": true, "links": [{"ring": 0, "up": true}]},
            "manager": {"fence": {"state": "none"}}});
        assert!(probe(&st).is_ok());
        let m = metrics(&st);
        assert!(
            m.contains("hadb_volume_role{node=\"a\",role=\"primary\"} 1"),
            "{m}"
        );
        assert!(m.contains("hadb_volume_writes_total{node=\"a\"} 3"), "{m}");
        assert!(
            m.contains("hadb_heartbeat_ring_up{node=\"a\",ring=\"0\"} 1"),
            "{m}"
        );
        let mut sec = st.clone();
        sec["volume"]["role"] = json!("secondary");
        assert!(probe(&sec).unwrap_err().contains("not the primary"));
        let mut frozen = st.clone();
        frozen["volume"]["frozen"] = json!(true);
        assert!(probe(&frozen).unwrap_err().contains("frozen"));
        let mut starting = st;
        starting["mysqld"] = json!({"state": "starting", "health": "not started (no socket)",
            "restarts_total": 2});
        assert!(probe(&starting).unwrap_err().contains("mysqld is starting"));
        assert!(
            metrics(&starting).contains("hadb_mysqld_restarts_total{node=\"a\"} 2"),
            "{}",
            metrics(&starting)
        );
        starting["mysqld"]["state"] = json!("healthy");
        assert!(probe(&starting).is_ok());
        starting["manager"]["fence_attempt_totals"] = json!([
            {"method": "azure", "result": "failed", "count": 1, "seconds": 0.25},
            {"method": "ssh", "result": "confirmed", "count": 1, "seconds": 2.5},
        ]);
        let m = metrics(&starting);
        assert!(
            m.contains(
                "hadb_fence_attempts_total{node=\"a\",method=\"azure\",result=\"failed\"} 1"
            ),
            "{m}"
        );
        assert!(
            m.contains(
                "hadb_fence_attempt_seconds_total{node=\"a\",method=\"ssh\",result=\"confirmed\"} 2.5"
            ),
            "{m}"
        );
    }
}
