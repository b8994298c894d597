//! The volume stays up on every node, in every role ("drbdadm up" on
//! every node): a secondary's volume taken down comes back by itself
//! within seconds, and a node in standby keeps receiving every write of a
//! write-heavy run, ending byte-identical to the primary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Pair, qemu_io, qemu_io_spawn, require};

const SIZE: u64 = 32 << 20;

#[test]
fn a_downed_volume_comes_back_and_a_standby_node_keeps_every_write() {
    require("qemu-io", "qemu-utils");
    let mut p = Pair::new("volup", "sync", SIZE);
    for n in 0..2 {
        let text = p
            .config_text(n, "sync")
            .replace("maintenance = true", "maintenance = false");
        std::fs::write(p.config(n), text).unwrap();
    }
    p.start(0);
    p.start(1);
    p.wait(0, "peer connected", |s| {
        s.is_some_and(|s| !s["volume"]["peer"].is_null())
    });
    p.primary(0);
    p.wait_in_sync(0);

    // Not on the primary: it holds the filesystem.
    let out = p.hadb(0, &["volume", "down"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("make this node secondary first"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // b in standby, under a steady stream of writes on a.
    assert!(p.hadb(1, &["standby", "on"]).status.success());
    let mut writer = qemu_io_spawn(
        &p.uri(0),
        &(0..1500)
            .map(|i| format!("write -P {} {}k 64k", i % 250 + 1, (i * 97 % 480) * 64))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    // Down on the secondary: back within seconds, by itself.
    let out = p.hadb(1, &["volume", "down"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = Instant::now();
    p.wait(1, "the link dropped", |s| {
        s.is_some_and(|s| s["volume"]["down_seconds"].is_u64())
    });
    p.wait(1, "the volume back up", |s| {
        s.is_some_and(|s| {
            s["volume"]["restored_by_watchdog"] == 1 && !s["volume"]["peer"].is_null()
        })
    });
    let back = t.elapsed();
    assert!(back < Duration::from_secs(10), "back only after {back:?}");
    assert!(
        p.log(1).contains("watchdog: the volume was down"),
        "{}",
        p.log(1)
    );
    let status = writer.wait().unwrap();
    assert!(status.success(), "a write failed during the standby run");
    qemu_io(&p.uri(0), &["flush"]);
    p.wait_in_sync(0);
    let s = p.status(1).unwrap();
    assert_eq!(s["volume"]["role"], "secondary", "{s}");
    assert_eq!(s["volume"]["disk"], "up_to_date", "{s}");
    assert_eq!(s["manager"]["standby"], true, "{s}");
    let data_size = p.data_size();
    // Clean stops, so the images are what the volumes hold.
    assert!(p.stop(0) && p.stop(1));
    assert!(
        p.data(0, data_size) == p.data(1, data_size),
        "the standby's copy differs from the primary's"
    );
}
