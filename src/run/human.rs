//! Status as text for people: the CLI's `hadb status` and the serial
//! console print the same.

use serde_json::{Value, json};

/// A JSON value as an operator reads it: strings bare, null as "-".
pub fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The witness: whom it hears, who asks, who holds its vote.
fn witness(st: &Value) -> String {
    let mut out = format!(
        "cluster {}  witness {}  (pid {})\nvote: {}\n",
        s(&st["cluster"]),
        s(&st["node"]),
        s(&st["pid"]),
        match &st["vote"] {
            Value::String(n) => format!("given to {n}"),
            _ => "nobody's (the pair hears itself, or nobody asks)".into(),
        }
    );
    for n in st["nodes"].as_array().into_iter().flatten() {
        out += &format!(
            "node {}: {}  {}{}  ({})\n",
            s(&n["node"]),
            if n["heard"] == json!(true) {
                "heard"
            } else {
                "NOT HEARD"
            },
            s(&n["role"]),
            if n["asks_for_vote"] == json!(true) {
                ", lost its peer and asks for the vote"
            } else {
                ""
            },
            s(&n["address"])
        );
    }
    for h in st["history"].as_array().into_iter().flatten() {
        out += &format!("  {}s ago: {}\n", s(&h["seconds_ago"]), s(&h["why"]));
    }
    out
}

/// crm_mon-like text: what an operator scans for first comes first.
pub fn status(st: &Value) -> String {
    if st["role"] == json!("witness") {
        return witness(st);
    }
    let v = &st["volume"];
    let mut out = String::new();
    out += &format!(
        "cluster {}  node {}  (pid {})\n",
        s(&st["cluster"]),
        s(&st["node"]),
        s(&st["pid"])
    );
    let m = &st["manager"];
    if m.is_object() {
        out += &format!(
            "manager: {}{}{}\n",
            if m["maintenance"] == json!(true) {
                "MAINTENANCE (watching only)  "
            } else {
                ""
            },
            if m["standby"] == json!(true) {
                "STANDBY  "
            } else {
                ""
            },
            s(&m["reason"])
        );
        if let Some(t) = m["transitions"].as_array() {
            // The last few, newest first: how it got here.
            for e in t.iter().rev().skip(1).take(4) {
                out += &format!("  {:>6} s ago: {}\n", s(&e["seconds_ago"]), s(&e["why"]));
            }
        }
        if m["fence"]["state"] == json!("pending") {
            out += &format!(
                "FENCE PENDING of {}: {}\n",
                s(&st["volume"]["peer_name"]),
                if m["fence_running"] == json!(true) {
                    "its methods are running".to_owned()
                } else {
                    format!(
                        "make sure it is powered off, then `hadb fence confirm {}`",
                        s(&st["volume"]["peer_name"])
                    )
                }
            );
        }
        // The last run of the fence methods, in order.
        for a in m["fence_attempts"].as_array().into_iter().flatten() {
            let result = s(&a["result"]);
            out += &format!(
                "  fence {} {} ({:.1}s, {} s ago): {}\n",
                s(&a["method"]),
                if result == "failed" {
                    "FAILED".to_owned()
                } else {
                    result
                },
                a["duration_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
                a["started_ms_ago"].as_u64().unwrap_or(0) / 1000,
                s(&a["detail"])
            );
        }
    }
    let hb = &st["heartbeat"];
    if let Some(links) = hb["links"].as_array() {
        let rings: Vec<String> = links
            .iter()
            .map(|l| {
                format!(
                    "ring{} {} ({} -> {}{}{})",
                    s(&l["ring"]),
                    if l["up"] == json!(true) { "up" } else { "DOWN" },
                    s(&l["local"]),
                    s(&l["peer"]),
                    match l["silent_ms"].as_u64() {
                        Some(ms) => format!(", heard {ms} ms ago"),
                        None => ", never heard".into(),
                    },
                    match l["rtt_us"].as_u64() {
                        Some(us) => format!(", rtt {:.1} ms", us as f64 / 1000.0),
                        None => String::new(),
                    }
                )
            })
            .collect();
        out += &format!(
            "heartbeat: peer {}  {}\n",
            if hb["peer_alive"] == json!(true) {
                if hb["peer_hears_me"] == json!(true) {
                    "alive"
                } else {
                    "alive (does not hear this node yet)"
                }
            } else {
                "LOST"
            },
            rings.join("  ")
        );
        let w = &hb["witness"];
        if w.is_object() {
            out += &format!(
                "witness {}: {}  vote: {}\n",
                s(&w["node"]),
                if w["heard"] == json!(true) {
                    "heard"
                } else {
                    "NOT HEARD"
                },
                s(&w["vote"])
            );
        }
    }
    out += &format!(
        "volume: {} {}  link {}  mode {}{}{}\n",
        s(&v["role"]),
        s(&v["disk"]),
        s(&v["link"]),
        s(&v["mode"]),
        if v["frozen"] == json!(true) {
            "  I/O FROZEN (peer away; `hadb volume go-alone` to release)"
        } else {
            ""
        },
        if v["alone"] == json!(true) {
            "  ALONE (peer behind)"
        } else {
            ""
        },
    );
    let my = &st["mysqld"];
    if my.is_object() {
        out += &format!(
            "mysqld: {}{}  health: {}  restarts {} in the window, {} in all{}\n",
            if my["state"] == json!("failed") {
                "FAILED (`hadb mysql reset` once fixed)".to_owned()
            } else {
                s(&my["state"])
            },
            match my["pid"].as_u64() {
                Some(pid) => format!(" (pid {pid})"),
                None => String::new(),
            },
            s(&my["health"]),
            s(&my["restarts"]),
            s(&my["restarts_total"]),
            match my["last_failure"].as_str() {
                Some(f) => format!("; last failure: {f}"),
                None => String::new(),
            }
        );
    }
    match st["watchdog"]["timeout_ms"].as_u64() {
        Some(ms) => out += &format!("watchdog: armed, {} s\n", ms / 1000),
        None if st.get("watchdog").is_some() => out += "watchdog: off\n",
        None => {}
    }
    let peer = &v["peer"];
    if peer.is_null() {
        out += &format!("peer {}: not connected\n", s(&v["peer_name"]));
    } else {
        out += &format!(
            "peer {}: {} {}{}\n",
            s(&peer["name"]),
            s(&peer["role"]),
            s(&peer["disk"]),
            if v["peer_up_to_date"] == json!(true) {
                ", replicating"
            } else {
                ""
            }
        );
    }
    if let Some(r) = v["resync"].as_object() {
        out += &format!(
            "resync{}: {:.1}% ({} of {} blocks), {:.1} MiB/s, {} s left\n",
            if r["full"] == json!(true) {
                " (full)"
            } else {
                ""
            },
            r["percent"].as_f64().unwrap_or(0.0),
            s(&r["done_blocks"]),
            s(&r["total_blocks"]),
            r["rate_bytes_per_s"].as_f64().unwrap_or(0.0) / 1048576.0,
            s(&r["seconds_left"])
        );
    }
    if v["mode"] == json!("async")
        && v["role"] == json!("primary")
        && v["out_of_sync_bytes"].as_u64() != Some(0)
    {
        out += &format!(
            "PEER BEHIND: {} bytes not on the peer (async: a failover now would lose them)\n",
            s(&v["out_of_sync_bytes"])
        );
    }
    out += &format!(
        "out of sync: {} bytes   pending {}  held {}\n",
        s(&v["out_of_sync_bytes"]),
        s(&v["pending_requests"]),
        s(&v["held_requests"])
    );
    out += &format!(
        "generation {}  (bitmap from {})\n",
        s(&v["current_gen"]),
        s(&v["bitmap_gen"])
    );
    if let Some(sb) = v["split_brain"].as_object() {
        out += &format!(
            "SPLIT BRAIN since generation {}: changed here {} bytes, on the peer {} bytes; `hadb volume discard-my-data` on the node whose changes are to go\n",
            s(&sb["since_gen"]),
            s(&sb["my_changed_bytes"]),
            s(&sb["peer_changed_bytes"])
        );
    }
    if let Some(vf) = v["verify"].as_object() {
        out += &format!(
            "verify: {:.1}% ({} of {} blocks), {} differ so far\n",
            vf["percent"].as_f64().unwrap_or(0.0),
            s(&vf["checked_blocks"]),
            s(&vf["total_blocks"]),
            s(&vf["differing_blocks"])
        );
    } else if let Some(lv) = v["last_verify"].as_object() {
        out += &format!(
            "last verify: {} blocks checked, {} differed\n",
            s(&lv["checked_blocks"]),
            s(&lv["differing_blocks"])
        );
    }
    if !v["last_connect_rule"].is_null() {
        out += &format!("last connect: {}\n", s(&v["last_connect_rule"]));
    }
    if !v["last_link_event"].is_null() {
        out += &format!("last link event: {}\n", s(&v["last_link_event"]));
    }
    if let Some(bad) = v["bad_input"].as_object() {
        let nonzero: Vec<String> = bad
            .iter()
            .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
            .map(|(k, n)| format!("{k}={n}"))
            .collect();
        if !nonzero.is_empty() {
            out += &format!("refused input: {}\n", nonzero.join(" "));
        }
    }
    out
}
