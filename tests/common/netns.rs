//! Two network namespaces, node `a` and node `b`, joined by veth pairs
//! ("links"), for host tests that need a network they can break: take a
//! link down, lose or delay packets on it, and run `hadb run` on each side
//! of it. Everything is removed when the `Net` is dropped, even if the test
//! panics.
//!
//! Names. Each `Net` gets a tag, the process id and a per-process sequence
//! number packed into at most 7 base-36 characters, so no two `Net`s alive
//! on the host share it: not two tests in one binary running in parallel,
//! not two test binaries. From it:
//!
//! - namespaces `hadb-<test>-<tag>-a` and `hadb-<test>-<tag>-b`, `<test>`
//!   being the first 8 letters and digits of the test's name;
//! - link `l`'s veth ends `hadb<tag><l>a` in `a` and `hadb<tag><l>b` in `b`
//!   (at most 13 characters; Linux allows 15). The pair is created inside
//!   the namespaces, never in the host's, so it cannot clash with the
//!   host's interfaces either.
//!
//! Addresses. Link `l` is 10.(200+l).T.0/24, `a` is .1 and `b` is .2, T
//! being derived from the tag. Namespaces do not see each other's
//! addresses, so the same subnet in two `Net`s cannot collide; T only
//! keeps captures and logs of parallel tests apart.
//!
//! Leftovers. A test binary killed with SIGKILL (a CI timeout) runs no
//! `Drop`. `Net::new` therefore deletes namespaces of this naming scheme
//! whose process is gone, and any with its own names (a process id that
//! came round again).
//!
//! Processes started with [`Net::cmd`] keep a namespace alive after its
//! name is deleted: kill them before the `Net` drops (declare the `Net`
//! first, so that it drops last).
//!
//! Test binaries include this file with `#[path = "common/netns.rs"] mod
//! netns;` rather than through `common`, which every host test binary
//! includes; each uses only part of it, hence `dead_code`.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
// setns(2) has no safe wrapper among the crate's dependencies (rustix's
// `thread` feature is off); one call, in `enter`.
#![allow(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const NODES: [&str; 2] = ["a", "b"];

/// One decimal digit of link number in the interface names.
pub const MAX_LINKS: usize = 10;

/// How long a single echo waits for its reply. A veth answers in
/// microseconds; the first echo also waits for ARP.
const PING_TIMEOUT: Duration = Duration::from_millis(1000);

/// How long `new` and `link_up` wait for a link to carry packets.
const LINK_TIMEOUT: Duration = Duration::from_secs(5);

const NETNS_DIR: &str = "/run/netns";

/// Bits of the tag holding the per-process sequence number.
const SEQ_BITS: u32 = 10;

pub struct Net {
    tag: String,
    ns: [String; 2],
    links: usize,
    octet: u8,
    /// Whether a netem qdisc is on the link, so that `link_up` does not
    /// wait for pings that netem is there to drop.
    netem: Vec<AtomicBool>,
    /// A third namespace `w` for a witness, joined to each node by a veth
    /// of its own (`add_witness`).
    witness: Option<String>,
}

impl Net {
    /// hadb.toml for node `n` (`a` or `b`) of a pair whose daemons run in
    /// these namespaces, files under `dir` as `common::Pair` lays them out:
    /// ring0 carries replication and heartbeats, the other links
    /// heartbeats only; the manager on, fencing after 2 s. `extra` is
    /// appended (a `[mysql]` section, say).
    pub fn pair_config(&self, dir: &std::path::Path, n: usize, extra: &str) -> String {
        let d = dir.display();
        let me = ["a", "b"][n];
        let node = |m: usize| {
            let links: Vec<String> = (1..self.links)
                .map(|l| format!("\"{}\"", self.addr(m, l)))
                .collect();
            format!(
                "[nodes.{}]\naddress = \"{}\"\nlinks = [{}]\n",
                ["a", "b"][m],
                self.addr(m, 0),
                links.join(", ")
            )
        };
        format!(
            r#"cluster = "test"
node = "{me}"
key_file = "{d}/{me}.key"
# Each node its own, as on two machines.
state_dir = "{d}/{me}.state"

{a}
{b}
[volume]
device = "{d}/{me}.img"
mode = "sync"
ack_timeout = "1s"
nbd_socket = "{d}/{me}.nbd"

[fencing]
fence_delay = "2s"

[control]
socket = "{d}/{me}.ctl"
{extra}"#,
            a = node(0),
            b = node(1),
        )
    }

    /// Namespaces `a` and `b` with `links` working links between them.
    pub fn new(test: &str, links: usize) -> Net {
        assert!(
            (1..=MAX_LINKS).contains(&links),
            "Net::new: 1 to {MAX_LINKS} links, not {links}"
        );
        require_ip();
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        assert!(
            seq < 1 << SEQ_BITS,
            "Net::new: more than {} Nets in one process",
            1u32 << SEQ_BITS
        );
        let id = (u64::from(std::process::id()) << SEQ_BITS) | u64::from(seq);
        let tag = base36(id);
        let short: String = test
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(8)
            .collect::<String>()
            .to_ascii_lowercase();
        let short = if short.is_empty() { "t".into() } else { short };
        let ns = NODES.map(|n| format!("hadb-{short}-{tag}-{n}"));
        let net = Net {
            octet: (id % 250) as u8 + 1,
            tag,
            ns,
            links,
            netem: (0..links).map(|_| AtomicBool::new(false)).collect(),
            witness: None,
        };
        sweep_leftovers(&net.ns);
        // From here on a panic drops `net`, which deletes what was made.
        for ns in &net.ns {
            let out = ip(&["netns", "add", ns]);
            assert!(
                out.status.success(),
                "cannot create network namespace {ns}: {}; \
                 these tests need root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and a \
                 kernel with network namespaces and veth (CONFIG_NET_NS, CONFIG_VETH)",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            ip_ok(&["-n", ns, "link", "set", "dev", "lo", "up"]);
        }
        for link in 0..links {
            let [ia, ib] = [net.iface(0, link), net.iface(1, link)];
            ip_ok(&[
                "-n", &net.ns[0], "link", "add", &ia, "type", "veth", "peer", "name", &ib, "netns",
                &net.ns[1],
            ]);
            for (node, iface) in [(0, &ia), (1, &ib)] {
                let cidr = format!("{}/24", net.addr(node, link));
                ip_ok(&["-n", &net.ns[node], "addr", "add", &cidr, "dev", iface]);
                ip_ok(&["-n", &net.ns[node], "link", "set", "dev", iface, "up"]);
            }
        }
        for link in 0..links {
            net.wait_ping(link, "Net::new");
        }
        net
    }

    /// A third namespace, `w`, for a witness: its own veth to each node
    /// (10.220+n.T.0/24, the node .1 or .2, `w` .3), and the witness's
    /// address, 10.222.T.3 on `w`'s loopback, routed from both nodes (and
    /// the nodes' ring0 addresses routed back), so a node's heartbeat
    /// socket on ring0 reaches it. Returns that address.
    pub fn add_witness(&mut self) -> IpAddr {
        // `hadb-<test>-<tag>-a` -> `hadb-<test>-<tag>-w`.
        let w = format!("{}-w", &self.ns[0][..self.ns[0].len() - 2]);
        sweep_leftovers(&[w.clone(), w.clone()]);
        let out = ip(&["netns", "add", &w]);
        assert!(
            out.status.success(),
            "cannot create network namespace {w}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        self.witness = Some(w.clone());
        ip_ok(&["-n", &w, "link", "set", "dev", "lo", "up"]);
        let t = self.octet;
        let me = format!("10.222.{t}.3");
        ip_ok(&["-n", &w, "addr", "add", &format!("{me}/32"), "dev", "lo"]);
        for node in 0..2 {
            let (in_node, in_w) = self.witness_ifaces(node);
            ip_ok(&[
                "-n",
                &self.ns[node],
                "link",
                "add",
                &in_node,
                "type",
                "veth",
                "peer",
                "name",
                &in_w,
                "netns",
                &w,
            ]);
            let subnet = 220 + node;
            let node_addr = format!("10.{subnet}.{t}.{}/24", node + 1);
            ip_ok(&[
                "-n",
                &self.ns[node],
                "addr",
                "add",
                &node_addr,
                "dev",
                &in_node,
            ]);
            ip_ok(&[
                "-n",
                &w,
                "addr",
                "add",
                &format!("10.{subnet}.{t}.3/24"),
                "dev",
                &in_w,
            ]);
            ip_ok(&["-n", &self.ns[node], "link", "set", "dev", &in_node, "up"]);
            ip_ok(&["-n", &w, "link", "set", "dev", &in_w, "up"]);
            ip_ok(&[
                "-n",
                &self.ns[node],
                "route",
                "add",
                &format!("{me}/32"),
                "dev",
                &in_node,
            ]);
            let ring0 = format!("{}/32", self.addr(node, 0));
            ip_ok(&["-n", &w, "route", "add", &ring0, "dev", &in_w]);
        }
        me.parse().unwrap()
    }

    /// Node `node`'s veth to the witness, and the witness's end of it.
    fn witness_ifaces(&self, node: usize) -> (String, String) {
        (
            format!("hadb{}w{}", self.tag, NODES[node]),
            format!("hadb{}{}w", self.tag, NODES[node]),
        )
    }

    /// The witness's namespace (after `add_witness`).
    pub fn witness_ns(&self) -> &str {
        self.witness.as_deref().expect("add_witness first")
    }

    /// Cuts (or restores) the path between node `node` and the witness.
    pub fn witness_link(&self, node: usize, up: bool) {
        let (in_node, in_w) = self.witness_ifaces(node);
        let state = if up { "up" } else { "down" };
        ip_ok(&["-n", &self.ns[node], "link", "set", "dev", &in_node, state]);
        ip_ok(&["-n", self.witness_ns(), "link", "set", "dev", &in_w, state]);
        if up {
            // The routes over it went with the link.
            let me = format!("10.222.{}.3/32", self.octet);
            let _ = ip(&[
                "-n",
                &self.ns[node],
                "route",
                "replace",
                &me,
                "dev",
                &in_node,
            ]);
            let ring0 = format!("{}/32", self.addr(node, 0));
            let _ = ip(&[
                "-n",
                self.witness_ns(),
                "route",
                "replace",
                &ring0,
                "dev",
                &in_w,
            ]);
        }
    }

    /// Node `node`'s address on link `link` (node 0 is `a`, 1 is `b`).
    pub fn addr(&self, node: usize, link: usize) -> IpAddr {
        IpAddr::V4(self.addr4(node, link))
    }

    fn addr4(&self, node: usize, link: usize) -> Ipv4Addr {
        assert!(node < 2, "node {node}: there are two, 0 (a) and 1 (b)");
        assert!(
            link < self.links,
            "link {link}: this Net has {}",
            self.links
        );
        Ipv4Addr::new(10, 200 + link as u8, self.octet, node as u8 + 1)
    }

    /// The namespace's name, for `ip -n`, `tc -n` and messages.
    pub fn ns(&self, node: usize) -> &str {
        &self.ns[node]
    }

    /// Node `node`'s end of link `link`.
    pub fn iface(&self, node: usize, link: usize) -> String {
        assert!(
            link < self.links,
            "link {link}: this Net has {}",
            self.links
        );
        format!("hadb{}{link}{}", self.tag, NODES[node])
    }

    /// Both ends down: packets on the link fail at once (no route) rather
    /// than vanish.
    pub fn link_down(&self, link: usize) {
        self.set_link(link, "down");
    }

    fn set_link(&self, link: usize, state: &str) {
        for node in 0..2 {
            let iface = self.iface(node, link);
            ip_ok(&["-n", &self.ns[node], "link", "set", "dev", &iface, state]);
        }
    }

    /// Limits what leaves each end of the link to `mbit` megabits per
    /// second (a token bucket, `tbf`, which hosts without netem have), so
    /// that a large frame spends a while on the wire, as on a real network.
    pub fn rate(&self, link: usize, mbit: u32) {
        let rate = format!("{mbit}mbit");
        for node in 0..2 {
            let out = Command::new("tc")
                .args([
                    "-n",
                    &self.ns[node],
                    "qdisc",
                    "replace",
                    "dev",
                    &self.iface(node, link),
                    "root",
                    "tbf",
                    "rate",
                    &rate,
                    // At least one GSO segment, or tbf splits every one.
                    "burst",
                    "64kb",
                    "latency",
                    "200ms",
                ])
                .output()
                .unwrap_or_else(|e| panic!("cannot run tc: {e} (apt-get install iproute2)"));
            assert!(
                out.status.success(),
                "cannot limit link {link}'s rate: tc said {}; this needs the kernel's \
                 token bucket qdisc (CONFIG_NET_SCH_TBF, `modprobe sch_tbf`)",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }

    /// Every packet either node sends to the other's address on `link`
    /// vanishes: a blackhole route, in each namespace, for the peer's
    /// address. Unlike `link_down`, nothing tells the sockets (no
    /// unreachable error, no RST, no ICMP): TCP keeps retransmitting into
    /// the void, as behind a switch that died.
    pub fn blackhole(&self, link: usize) {
        for node in 0..2 {
            let peer = format!("{}/32", self.addr(1 - node, link));
            ip_ok(&["-n", &self.ns[node], "route", "add", "blackhole", &peer]);
        }
    }

    /// Removes what `blackhole` added.
    pub fn clear_blackhole(&self, link: usize) {
        for node in 0..2 {
            let peer = format!("{}/32", self.addr(1 - node, link));
            ip_ok(&["-n", &self.ns[node], "route", "del", "blackhole", &peer]);
        }
    }

    /// Both ends up again; returns once a ping crosses the link (unless a
    /// netem qdisc is on it, which may be there to drop them).
    pub fn link_up(&self, link: usize) {
        self.set_link(link, "up");
        if !self.netem[link].load(Ordering::SeqCst) {
            self.wait_ping(link, "link_up");
        }
    }

    /// Loses `percent` of the packets leaving each end of the link and
    /// delays the rest by `delay_ms` ± `jitter_ms`. Each direction is
    /// affected: a round trip crosses two lossy ends. Replaces an earlier
    /// setting. Panics, naming what is missing, if the kernel has no netem.
    pub fn loss(&self, link: usize, percent: f64, delay_ms: u32, jitter_ms: u32) {
        assert!(
            (0.0..=100.0).contains(&percent),
            "loss: {percent}% is not a percentage"
        );
        let spec = [
            "loss".to_string(),
            format!("{percent}%"),
            "delay".into(),
            format!("{delay_ms}ms"),
            format!("{jitter_ms}ms"),
        ];
        let spec: Vec<&str> = spec.iter().map(String::as_str).collect();
        for node in 0..2 {
            if let Err(e) = netem(&self.ns[node], &self.iface(node, link), &spec) {
                panic!("{e}");
            }
        }
        self.netem[link].store(true, Ordering::SeqCst);
    }

    /// Removes what `loss` set on the link.
    pub fn clear_loss(&self, link: usize) {
        if !self.netem[link].swap(false, Ordering::SeqCst) {
            return;
        }
        for node in 0..2 {
            run_ok(Command::new("tc").args([
                "-n",
                &self.ns[node],
                "qdisc",
                "del",
                "dev",
                &self.iface(node, link),
                "root",
            ]));
        }
    }

    /// Whether `loss` can work here: `Err` holds the message it would
    /// panic with. For tests that check something else when it cannot.
    pub fn netem_available(&self) -> Result<(), String> {
        netem(&self.ns[0], "lo", &["delay", "0ms"])?;
        run_ok(Command::new("tc").args(["-n", &self.ns[0], "qdisc", "del", "dev", "lo", "root"]));
        Ok(())
    }

    /// `program` run inside node `node`'s namespace; add arguments, spawn.
    pub fn cmd(&self, node: usize, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns[node], program]);
        c
    }

    /// Runs `f` on a thread inside node `node`'s namespace: sockets it
    /// opens (std::net or anything else) are that node's.
    pub fn in_ns<T: Send>(&self, node: usize, f: impl FnOnce() -> T + Send) -> T {
        let ns = &self.ns[node];
        std::thread::scope(|s| {
            let thread = s.spawn(|| {
                enter(ns);
                f()
            });
            // The thread ends here, so no later code runs in the namespace.
            match thread.join() {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// One ICMP echo from node `from` to the other node over `link`:
    /// whether the reply came within a second. Needs no `ping` binary.
    pub fn ping(&self, from: usize, link: usize) -> bool {
        let to = self.addr4(1 - from, link);
        self.in_ns(from, || echo(to, PING_TIMEOUT))
    }

    fn wait_ping(&self, link: usize, what: &str) {
        let start = Instant::now();
        while !self.ping(0, link) {
            assert!(
                start.elapsed() < LINK_TIMEOUT,
                "{what}: link {link} ({} <-> {}) carries no ping after {LINK_TIMEOUT:?}",
                self.addr(0, link),
                self.addr(1, link)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth ends in it, and with one
        // end gone the pair goes.
        // Not `ip()`: a panic while the test is already panicking aborts
        // the whole binary.
        for ns in self.ns.iter().chain(&self.witness) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Deletes namespaces this scheme left behind: ours by name, others whose
/// process no longer runs. The process ids are those of this pid
/// namespace; a container sharing /run/netns with the host could see
/// another's as dead, which is why only exact matches of the scheme go.
fn sweep_leftovers(ours: &[String; 2]) {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = ours.contains(&name) || leftover_pid(&name).is_some_and(|pid| !pid_alive(pid));
        if stale {
            // Another test binary may be sweeping the same one.
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

/// The process id in a name of the form `hadb-<test>-<tag>-<a|b>`.
fn leftover_pid(name: &str) -> Option<u32> {
    let parts: Vec<&str> = name.split('-').collect();
    let [hadb, test, tag, side] = parts.as_slice() else {
        return None;
    };
    let plain = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    if *hadb != "hadb"
        || !(NODES.contains(side) || *side == "w")
        || !plain(test)
        || !plain(tag)
        || tag.len() > 7
    {
        return None;
    }
    let id = u64::from_str_radix(tag, 36).ok()?;
    u32::try_from(id >> SEQ_BITS).ok()
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn base36(mut v: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(v % 36) as usize]);
        v /= 36;
        if v == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

/// Moves the calling thread into a network namespace.
fn enter(ns: &str) {
    use std::os::fd::AsRawFd;
    let path = format!("{NETNS_DIR}/{ns}");
    let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
    // SAFETY: setns(2) takes a file descriptor, kept open by `f` for the
    // call, and a flag; it touches no memory of ours. A network namespace
    // may be entered by one thread of a multithreaded process.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        panic!(
            "cannot enter network namespace {ns}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// An ICMP echo over a raw socket, in whatever namespace the calling
/// thread is in. Unreachable (no route, link down) is `false`.
fn echo(to: Ipv4Addr, timeout: Duration) -> bool {
    use rustix::net::{
        AddressFamily, RecvFlags, SendFlags, SocketType, ipproto, recvfrom, sendto, socket, sockopt,
    };
    // Every echo of this process has its own sequence number, and the
    // identifier is the process's: a raw socket sees all the namespace's
    // replies, those of other tests' pings included.
    static SEQ: AtomicU16 = AtomicU16::new(0);
    let ident = std::process::id() as u16;
    let seq = SEQ.fetch_add(1, Ordering::SeqCst);
    let fd = socket(AddressFamily::INET, SocketType::RAW, Some(ipproto::ICMP))
        .unwrap_or_else(|e| panic!("cannot open a raw ICMP socket (needs CAP_NET_RAW): {e}"));
    let mut packet = [0u8; 16];
    packet[0] = 8; // echo request
    packet[4..6].copy_from_slice(&ident.to_be_bytes());
    packet[6..8].copy_from_slice(&seq.to_be_bytes());
    packet[8..].copy_from_slice(b"hadbping");
    let sum = checksum(&packet);
    packet[2..4].copy_from_slice(&sum.to_be_bytes());
    if sendto(&fd, &packet, SendFlags::empty(), &SocketAddrV4::new(to, 0)).is_err() {
        return false;
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        // A zero timeout would mean none at all.
        let left = left.max(Duration::from_millis(1));
        if sockopt::set_socket_timeout(&fd, sockopt::Timeout::Recv, Some(left)).is_err() {
            return false;
        }
        let Ok((n, _, _)) = recvfrom(&fd, &mut buf[..], RecvFlags::empty()) else {
            continue;
        };
        // A raw IPv4 socket receives the IP header too.
        let data = &buf[..n];
        let Some(&first) = data.first() else {
            continue;
        };
        let header = usize::from(first & 0x0f) * 4;
        if data.len() < header + 8 || data[12..16] != to.octets() {
            continue;
        }
        let icmp = &data[header..];
        if icmp[0] == 0 && icmp[4..6] == ident.to_be_bytes() && icmp[6..8] == seq.to_be_bytes() {
            return true;
        }
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Adds or replaces a netem qdisc; `Err` says what the host lacks.
fn netem(ns: &str, dev: &str, spec: &[&str]) -> Result<(), String> {
    let mut args = vec!["-n", ns, "qdisc", "replace", "dev", dev, "root", "netem"];
    args.extend_from_slice(spec);
    let attempt = || match Command::new("tc").args(&args).output() {
        Ok(out) => Ok(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err("`tc` is not installed: apt-get install iproute2".to_string())
        }
        Err(e) => Err(format!("cannot run tc: {e}")),
    };
    let out = attempt()?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !stderr.contains("qdisc kind is unknown") {
        return Err(format!("tc {}: {stderr}", args.join(" ")));
    }
    // The kernel may have it as a module not loaded yet.
    let modprobe = match Command::new("modprobe").arg("sch_netem").output() {
        Ok(m) if m.status.success() => {
            let retry = attempt()?;
            if retry.status.success() {
                return Ok(());
            }
            String::from_utf8_lossy(&retry.stderr).trim().to_string()
        }
        Ok(m) => String::from_utf8_lossy(&m.stderr).trim().to_string(),
        Err(e) => format!("cannot run modprobe: {e} (apt-get install kmod)"),
    };
    Err(format!(
        "netem (packet loss and delay) is not available: this kernel has no \
         sch_netem (CONFIG_NET_SCH_NETEM). tc said: {}; modprobe sch_netem: \
         {modprobe}. Debian's kernel packages (linux-image-amd64) include it as \
         a module; Ubuntu's is in linux-modules-extra-$(uname -r); minimal \
         cloud and microVM kernels often leave it out.",
        stderr.trim()
    ))
}

fn require_ip() {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("ip").is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`ip` is not installed: apt-get install iproute2 (network namespace tests)"
    );
}

fn ip(args: &[&str]) -> Output {
    Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip {}: {e}", args.join(" ")))
}

fn ip_ok(args: &[&str]) {
    run_ok(Command::new("ip").args(args));
}

fn run_ok(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
