//! hadb: two VMs, one highly available MySQL. See docs/design.md.

#![deny(unsafe_code)]

use hadb::{config, core, logging, run};

/// Reuses large freed buffers (see sys::alloc): musl's malloc maps and
/// unmaps each one.
#[global_allocator]
static ALLOCATOR: hadb::sys::alloc::CachingAlloc = hadb::sys::alloc::CachingAlloc::new();

use std::path::PathBuf;
use std::process::ExitCode;

use argh::FromArgs;
use serde_json::{Value, json};

/// hadb: a replicated volume, heartbeat and manager for a two-node MySQL pair.
#[derive(FromArgs)]
struct Cli {
    /// configuration file (default /etc/hadb/hadb.toml)
    #[argh(option, default = "PathBuf::from(config::DEFAULT_PATH)")]
    config: PathBuf,
    /// kernel command line to take hadb.* overrides from (default
    /// /proc/cmdline; "none" for no overrides)
    #[argh(option, default = "String::from(config::DEFAULT_CMDLINE)")]
    cmdline: String,
    /// log debug messages too
    #[argh(switch, short = 'v')]
    verbose: bool,
    #[argh(subcommand)]
    command: Top,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Top {
    Run(RunCmd),
    Status(StatusCmd),
    Volume(VolumeCmd),
    Config(ConfigCmd),
    Fence(FenceCmd),
    Standby(StandbyCmd),
    Switchover(SwitchoverCmd),
    Version(VersionCmd),
}

/// fencing of the peer
#[derive(FromArgs)]
#[argh(subcommand, name = "fence")]
struct FenceCmd {
    #[argh(subcommand)]
    command: FenceSub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum FenceSub {
    Confirm(FenceConfirmCmd),
}

/// confirm that NODE is powered off (after making sure of it), so a
/// pending fence succeeds and this node may take over
#[derive(FromArgs)]
#[argh(subcommand, name = "confirm")]
struct FenceConfirmCmd {
    /// the peer's name
    #[argh(positional)]
    node: String,
}

/// standby on: hand the primary role to the peer and stay secondary,
/// replicating; off: may be primary again
#[derive(FromArgs)]
#[argh(subcommand, name = "standby")]
struct StandbyCmd {
    /// on or off
    #[argh(positional)]
    state: String,
}

/// move the primary role to the peer, losing no write
#[derive(FromArgs)]
#[argh(subcommand, name = "switchover")]
struct SwitchoverCmd {}

/// run the daemon in the foreground
#[derive(FromArgs)]
#[argh(subcommand, name = "run")]
struct RunCmd {}

/// show the state of the pair
#[derive(FromArgs)]
#[argh(subcommand, name = "status")]
struct StatusCmd {
    /// print JSON
    #[argh(switch)]
    json: bool,
}

/// print the version
#[derive(FromArgs)]
#[argh(subcommand, name = "version")]
struct VersionCmd {}

/// the replicated volume
#[derive(FromArgs)]
#[argh(subcommand, name = "volume")]
struct VolumeCmd {
    #[argh(subcommand)]
    command: VolumeSub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum VolumeSub {
    CreateMd(CreateMdCmd),
    ShowMd(ShowMdCmd),
    Primary(PrimaryCmd),
    Secondary(SecondaryCmd),
    GoAlone(GoAloneCmd),
    DiscardMyData(DiscardMyDataCmd),
    Verify(VerifyCmd),
}

/// compare both copies block by block while the volume is in use; blocks
/// that differ are marked out of sync and resent
#[derive(FromArgs)]
#[argh(subcommand, name = "verify")]
struct VerifyCmd {
    /// wait until it finishes; exit 1 if any block differed
    #[argh(switch)]
    wait: bool,
}

/// end a split brain by throwing away this node's changes (at the next
/// connect, a full resync from the peer replaces them)
#[derive(FromArgs)]
#[argh(subcommand, name = "discard-my-data")]
struct DiscardMyDataCmd {}

/// write fresh metadata at the end of the backing device
#[derive(FromArgs)]
#[argh(subcommand, name = "create-md")]
struct CreateMdCmd {
    /// overwrite existing metadata or a recognised filesystem
    #[argh(switch)]
    force: bool,
}

/// print the metadata of the backing device
#[derive(FromArgs)]
#[argh(subcommand, name = "show-md")]
struct ShowMdCmd {
    /// print JSON
    #[argh(switch)]
    json: bool,
}

/// make this node primary (the peer must be secondary)
#[derive(FromArgs)]
#[argh(subcommand, name = "primary")]
struct PrimaryCmd {
    /// promote even if this copy is not known to be up to date
    #[argh(switch)]
    force: bool,
}

/// make this node secondary
#[derive(FromArgs)]
#[argh(subcommand, name = "secondary")]
struct SecondaryCmd {}

/// let a primary whose peer is away go on writing alone
#[derive(FromArgs)]
#[argh(subcommand, name = "go-alone")]
struct GoAloneCmd {}

/// configuration
#[derive(FromArgs)]
#[argh(subcommand, name = "config")]
struct ConfigCmd {
    #[argh(subcommand)]
    command: ConfigSub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum ConfigSub {
    Check(CheckCmd),
}

/// check the configuration and print it as hadb sees it
#[derive(FromArgs)]
#[argh(subcommand, name = "check")]
struct CheckCmd {}

fn main() -> ExitCode {
    let cli: Cli = argh::from_env();
    logging::init(cli.verbose);
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hadb: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(cli: &Cli) -> Result<config::Config, config::Error> {
    config::load(&config::Sources {
        file: cli.config.clone(),
        cmdline: (cli.cmdline != "none").then(|| PathBuf::from(&cli.cmdline)),
    })
}

fn dispatch(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match &cli.command {
        Top::Version(_) => {
            println!("hadb {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Top::Config(ConfigCmd {
            command: ConfigSub::Check(_),
        }) => {
            let config = load_config(&cli)?;
            print!("{}", toml::to_string_pretty(&config)?);
            eprintln!("config: ok");
            Ok(())
        }
        Top::Run(_) => {
            let config = load_config(&cli)?;
            run::daemon::run(config)?;
            Ok(())
        }
        Top::Status(s) => {
            let config = load_config(&cli)?;
            let status = run::control::call(&config.control.socket, json!({"command": "status"}))?;
            if s.json {
                println!("{status}");
            } else {
                print!("{}", human_status(&status));
            }
            Ok(())
        }
        Top::Volume(v) => {
            let config = load_config(&cli)?;
            volume_command(&config, &v.command)
        }
        Top::Fence(FenceCmd {
            command: FenceSub::Confirm(c),
        }) => {
            let config = load_config(&cli)?;
            run::control::call(
                &config.control.socket,
                json!({"command": "fence.confirm", "node": c.node}),
            )?;
            println!("fence of {} confirmed", c.node);
            Ok(())
        }
        Top::Standby(c) => {
            let on = match c.state.as_str() {
                "on" => true,
                "off" => false,
                other => {
                    return Err(
                        format!("`{other}`: say `hadb standby on` or `hadb standby off`").into(),
                    );
                }
            };
            let config = load_config(&cli)?;
            run::control::call(
                &config.control.socket,
                json!({"command": "standby", "on": on}),
            )?;
            println!("standby {}", c.state);
            Ok(())
        }
        Top::Switchover(_) => {
            let config = load_config(&cli)?;
            run::control::call(&config.control.socket, json!({"command": "switchover"}))?;
            println!("switchover started; `hadb status` shows when the peer is primary");
            Ok(())
        }
    }
}

fn volume_command(
    config: &config::Config,
    command: &VolumeSub,
) -> Result<(), Box<dyn std::error::Error>> {
    let socket = &config.control.socket;
    match command {
        VolumeSub::CreateMd(c) => {
            let mut id = [0u8; 16];
            getrandom::fill(&mut id)
                .map_err(|e| format!("no randomness for the volume id: {e}"))?;
            let store = run::store::Store::create(&config.volume.device, id, c.force)?;
            println!(
                "metadata written on {}: {} data bytes usable; start `hadb run` on both nodes, then `hadb volume primary` on one",
                config.volume.device.display(),
                store.layout.data_size
            );
            Ok(())
        }
        VolumeSub::ShowMd(c) => {
            let store = run::store::Store::open(&config.volume.device)?;
            let sb = &store.superblock;
            let l = &store.layout;
            let v = json!({
                "device": config.volume.device,
                "version": core::meta::VERSION,
                "seq": sb.seq,
                "volume_id": sb.volume_id_hex(),
                "device_size": l.device_size,
                "data_size": l.data_size,
                "bitmap_offset": l.bitmap_offset,
                "bitmap_bytes": l.bitmap_bytes,
                "al_offset": l.al_offset,
                "al_bytes": l.al_bytes,
                "consistent": sb.has(core::meta::flags::CONSISTENT),
                "was_primary": sb.has(core::meta::flags::PRIMARY),
                "current_gen": format!("{:016x}", sb.current_gen),
                "bitmap_gen": format!("{:016x}", sb.bitmap_gen),
                "history": sb.history.iter().map(|h| format!("{h:016x}")).collect::<Vec<_>>(),
            });
            if c.json {
                println!("{v}");
            } else if let Value::Object(m) = v {
                for (k, v) in m {
                    println!(
                        "{k:>14}: {}",
                        v.as_str().map_or_else(|| v.to_string(), str::to_owned)
                    );
                }
            }
            Ok(())
        }
        VolumeSub::Primary(p) => {
            let r = run::control::call(
                socket,
                json!({"command": "volume.primary", "force": p.force}),
            )?;
            println!("{}", r["role"].as_str().unwrap_or("?"));
            Ok(())
        }
        VolumeSub::Secondary(_) => {
            let r = run::control::call(socket, json!({"command": "volume.secondary"}))?;
            println!("{}", r["role"].as_str().unwrap_or("?"));
            Ok(())
        }
        VolumeSub::Verify(v) => {
            let before = run::control::call(socket, json!({"command": "status"}))?;
            let before = before["volume"]["last_verify"].clone();
            run::control::call(socket, json!({"command": "volume.verify"}))?;
            if !v.wait {
                println!("verify started; `hadb status` shows its progress");
                return Ok(());
            }
            loop {
                std::thread::sleep(std::time::Duration::from_millis(200));
                let st = run::control::call(socket, json!({"command": "status"}))?;
                let last = &st["volume"]["last_verify"];
                if st["volume"]["verify"].is_null() && *last != before && !last.is_null() {
                    if last["complete"] != json!(true) {
                        return Err("the link to the peer dropped; the verify was abandoned (start it again)".into());
                    }
                    let differing = last["differing_blocks"].as_u64().unwrap_or(0);
                    println!(
                        "verify finished: {} blocks checked, {differing} differ{}",
                        s(&last["checked_blocks"]),
                        if differing > 0 {
                            " (marked out of sync and resent)"
                        } else {
                            ""
                        }
                    );
                    return if differing == 0 {
                        Ok(())
                    } else {
                        Err("copies differed".into())
                    };
                }
            }
        }
        VolumeSub::DiscardMyData(_) => {
            run::control::call(socket, json!({"command": "volume.discard-my-data"}))?;
            println!("this node's copy will be replaced by the peer's at the next connect");
            Ok(())
        }
        VolumeSub::GoAlone(_) => {
            run::control::call(socket, json!({"command": "volume.go-alone"}))?;
            println!("going on without the peer");
            Ok(())
        }
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// crm_mon-like text: what an operator scans for first comes first.
fn human_status(st: &Value) -> String {
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
                "FENCE PENDING of {}: make sure it is powered off, then `hadb fence confirm {}`\n",
                s(&st["volume"]["peer_name"]),
                s(&st["volume"]["peer_name"])
            );
        }
    }
    let hb = &st["heartbeat"];
    if let Some(links) = hb["links"].as_array() {
        let rings: Vec<String> = links
            .iter()
            .map(|l| {
                format!(
                    "ring{} {} ({} -> {}{})",
                    s(&l["ring"]),
                    if l["up"] == json!(true) { "up" } else { "DOWN" },
                    s(&l["local"]),
                    s(&l["peer"]),
                    match l["silent_ms"].as_u64() {
                        Some(ms) => format!(", heard {ms} ms ago"),
                        None => ", never heard".into(),
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
