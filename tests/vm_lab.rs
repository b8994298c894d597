//! The two-VM lab (`image/lab`, image/README.md): `up` builds what is
//! missing, boots both nodes from the image, sets up a fresh pair and
//! waits until it is up; then one node is primary with mysqld healthy, the
//! other secondary and up to date, and the load balancer stand-in forwards
//! a MySQL connection to the primary. Then a hard power-off of the primary:
//! the survivor fences it through the Azure stand-in (which really ends its
//! qemu), becomes primary with mysqld healthy, and the load balancer
//! follows. `down` runs at the end, also on failure (a Drop guard).
//!
//! The lab lives in its own `hadb-lab-test` dir under the target dir, with
//! its ports moved (HADB_LAB_PORT_OFFSET) so a developer's lab is left alone.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const PORT_OFFSET: u16 = 100;
const LB_PORT: u16 = 13306 + PORT_OFFSET;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn lab_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    let target = if target.is_absolute() {
        target
    } else {
        repo().join(target)
    };
    target.join("hadb-lab-test")
}

fn lab(args: &[&str]) -> Output {
    Command::new(repo().join("image/lab"))
        .args(args)
        .env("HADB_LAB_DIR", lab_dir())
        .env("HADB_LAB_PORT_OFFSET", PORT_OFFSET.to_string())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run image/lab {args:?}: {e}"))
}

fn lab_ok(args: &[&str]) -> String {
    let out = lab(args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "image/lab {args:?} failed ({}):\n{text}",
        out.status
    );
    text
}

/// `hadb status --json` of a node, through the lab's ssh.
fn status(node: &str) -> Option<serde_json::Value> {
    let out = lab(&["ssh", node, "hadb status --json"]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn field<'a>(st: &'a serde_json::Value, a: &str, b: &str) -> &'a str {
    st[a][b].as_str().unwrap_or("")
}

/// `SELECT 1` through the load balancer stand-in as the monitor user;
/// returns the client's output, or None if the connection failed.
fn select_through_lb() -> Option<String> {
    let password = std::fs::read_to_string(lab_dir().join("monitor-password")).ok()?;
    let out = Command::new("mariadb")
        .args(["-h", "127.0.0.1", "-P", &LB_PORT.to_string()])
        .args(["-u", "hadb_monitor", &format!("-p{}", password.trim())])
        .args(["--connect-timeout=10", "-N", "-e", "SELECT 1, @@hostname"])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_secs(3));
    }
}

/// Takes the lab down when the test ends, however it ends.
struct Down;

impl Drop for Down {
    fn drop(&mut self) {
        if std::env::var_os("HADB_VM_KEEP").is_some() {
            eprintln!("vm_lab: keeping the lab in {}", lab_dir().display());
            return;
        }
        let out = lab(&["down"]);
        if !out.status.success() {
            eprintln!(
                "vm_lab: image/lab down failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn lab_up_pair_lb_and_fenced_failover() {
    // Leftovers of an earlier run go first.
    lab_ok(&["down"]);
    let _down = Down;

    let t0 = Instant::now();
    let up = lab_ok(&["up"]);
    eprintln!("vm_lab: image/lab up took {:?}\n{up}", t0.elapsed());

    let s1 = status("hadb01").expect("hadb01 answers hadb status");
    let s2 = status("hadb02").expect("hadb02 answers hadb status");
    let (primary, secondary) = if field(&s1, "volume", "role") == "primary" {
        (&s1, &s2)
    } else {
        (&s2, &s1)
    };
    assert_eq!(field(primary, "volume", "role"), "primary", "{s1}\n{s2}");
    assert_eq!(field(primary, "mysqld", "state"), "healthy", "{primary}");
    assert_eq!(
        field(secondary, "volume", "role"),
        "secondary",
        "{secondary}"
    );
    assert_eq!(
        field(secondary, "volume", "disk"),
        "up_to_date",
        "{secondary}"
    );
    let old = primary["node"].as_str().unwrap_or("").to_owned();
    let survivor = if old == "hadb01" { "hadb02" } else { "hadb01" };

    // The load balancer probes every 5 s; give it a few rounds.
    let row = wait_until(
        "a SELECT through the LB",
        Duration::from_secs(30),
        select_through_lb,
    );
    assert!(row.starts_with("1\t"), "{row}");
    assert!(
        row.contains(&old),
        "the LB forwards to the primary {old}: {row}"
    );

    // A hard power-off of the primary: the survivor fences it through the
    // Azure stand-in and takes over, and the LB follows.
    let t1 = Instant::now();
    lab_ok(&["poweroff", &old]);
    let st = wait_until(
        "the survivor primary with mysqld healthy",
        Duration::from_secs(300),
        || {
            status(survivor).filter(|s| {
                field(s, "volume", "role") == "primary" && field(s, "mysqld", "state") == "healthy"
            })
        },
    );
    let took_over = t1.elapsed();
    let log = std::fs::read_to_string(lab_dir().join("azure/log.jsonl")).unwrap_or_default();
    assert!(
        log.lines()
            .any(|l| l.contains("\"powerOff\"") || l.contains("powerOff")),
        "the survivor fenced {old} through the Azure stand-in:\n{log}\n{st}"
    );
    let row = wait_until(
        "a SELECT through the LB after the failover",
        Duration::from_secs(60),
        select_through_lb,
    );
    assert!(
        row.contains(survivor),
        "the LB switched to {survivor}: {row}"
    );
    eprintln!(
        "vm_lab: failover to {survivor} (fenced through the Azure stand-in) took {took_over:?}, \
         the LB followed after {:?}",
        t1.elapsed()
    );
}
