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
    RestartInPlace(RestartInPlaceCmd),
    Mysql(MysqlCmd),
    Log(LogCmd),
    Version(VersionCmd),
}

/// the daemon's recent events (the last 200 lines of information,
/// warnings and errors), with their reasons
#[derive(FromArgs)]
#[argh(subcommand, name = "log")]
struct LogCmd {}

/// fencing of the peer: `hadb fence NODE` powers it off now, through
/// the configured methods, after a confirmation prompt
#[derive(FromArgs)]
#[argh(subcommand, name = "fence")]
struct FenceCmd {
    /// fence without asking first
    #[argh(switch)]
    yes: bool,
    /// the peer to fence now, even if it is heard
    #[argh(positional)]
    node: Option<String>,
    #[argh(subcommand)]
    command: Option<FenceSub>,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum FenceSub {
    Confirm(FenceConfirmCmd),
    Test(FenceTestCmd),
    Unfence(FenceUnfenceCmd),
}

/// start the fenced peer again (`azure`: start its VM and wait until it
/// runs), once it may rejoin; Pacemaker's `stonith_admin --unfence`
#[derive(FromArgs)]
#[argh(subcommand, name = "unfence")]
struct FenceUnfenceCmd {
    /// the peer's name
    #[argh(positional)]
    node: String,
}

/// check each fence method without fencing: a token and the peer VM's
/// instance view (azure), a login running `true` (ssh); exit 1 if any
/// fails
#[derive(FromArgs)]
#[argh(subcommand, name = "test")]
struct FenceTestCmd {}

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

/// mysqld as hadb supervises it
#[derive(FromArgs)]
#[argh(subcommand, name = "mysql")]
struct MysqlCmd {
    #[argh(subcommand)]
    command: MysqlSub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum MysqlSub {
    Reset(MysqlResetCmd),
    Init(MysqlInitCmd),
}

/// make the database in the primary's empty datadir (mariadb-install-db,
/// or mysqld --initialize-insecure), then start mysqld
#[derive(FromArgs)]
#[argh(subcommand, name = "init")]
struct MysqlInitCmd {}

/// mysqld failed on this node (restarted too often); its cause is fixed:
/// forget the failures, start it again if this node is primary, and let
/// this node take the primary role again
#[derive(FromArgs)]
#[argh(subcommand, name = "reset")]
struct MysqlResetCmd {}

/// replace the running hadb by the binary now on disk (an upgrade) without
/// a failover: the volume is parked, hadb re-executes itself and takes the
/// kernel device back; mysqld and the filesystem stay up
#[derive(FromArgs)]
#[argh(subcommand, name = "restart-in-place")]
struct RestartInPlaceCmd {}

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
    Mkfs(MkfsCmd),
    Down(DownCmd),
    Up(UpCmd),
}

/// make a filesystem ([mysql] fstype) on the primary's volume and mount it
/// at [mysql] datadir; refused on a device that holds data
#[derive(FromArgs)]
#[argh(subcommand, name = "mkfs")]
struct MkfsCmd {
    /// make it even over existing data
    #[argh(switch)]
    force: bool,
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

/// take this secondary's volume down (its replication link drops); hadb
/// brings it back up within seconds, as the volume stays up on every node
#[derive(FromArgs)]
#[argh(subcommand, name = "down")]
struct DownCmd {}

/// bring a volume taken down with `hadb volume down` back up now
#[derive(FromArgs)]
#[argh(subcommand, name = "up")]
struct UpCmd {}

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

fn sources(cli: &Cli) -> config::Sources {
    config::Sources {
        file: cli.config.clone(),
        cmdline: (cli.cmdline != "none").then(|| PathBuf::from(&cli.cmdline)),
    }
}

fn load_config(cli: &Cli) -> Result<config::Config, config::Error> {
    config::load(&sources(cli))
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
            // Before the configuration: as PID 1 the kernel command line
            // is not readable until /proc is mounted.
            run::process::init_as_pid1();
            let config = load_config(&cli)?;
            if config.role == hadb::config::NodeRole::Witness {
                run::witness::run(config)?;
            } else {
                run::daemon::run(config, sources(&cli))?;
            }
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
        Top::Fence(f) => {
            let config = load_config(&cli)?;
            fence_command(&config, f)
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
        Top::Log(_) => {
            let config = load_config(&cli)?;
            let r = run::control::call(&config.control.socket, json!({"command": "log"}))?;
            for line in r["lines"].as_array().into_iter().flatten() {
                println!("{}", line.as_str().unwrap_or(""));
            }
            Ok(())
        }
        Top::Mysql(MysqlCmd {
            command: MysqlSub::Reset(_),
        }) => {
            let config = load_config(&cli)?;
            run::control::call(&config.control.socket, json!({"command": "mysql.reset"}))?;
            println!("mysqld failures reset");
            Ok(())
        }
        Top::Mysql(MysqlCmd {
            command: MysqlSub::Init(_),
        }) => {
            let config = load_config(&cli)?;
            let r = run::control::call(&config.control.socket, json!({"command": "mysql.init"}))?;
            print!("{}", r["output"].as_str().unwrap_or(""));
            println!("database made; mysqld starts");
            Ok(())
        }
        Top::RestartInPlace(_) => {
            let config = load_config(&cli)?;
            run::control::call(
                &config.control.socket,
                json!({"command": "restart-in-place"}),
            )?;
            println!("hadb restarts in place; `hadb status` answers again within seconds");
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

fn fence_command(config: &config::Config, f: &FenceCmd) -> Result<(), Box<dyn std::error::Error>> {
    let socket = &config.control.socket;
    match (&f.command, &f.node) {
        (Some(FenceSub::Confirm(c)), None) => {
            run::control::call(socket, json!({"command": "fence.confirm", "node": c.node}))?;
            println!("fence of {} confirmed", c.node);
            Ok(())
        }
        (Some(FenceSub::Unfence(u)), None) => {
            let r = run::control::call(socket, json!({"command": "fence.unfence", "node": u.node}))?;
            println!("{} is {} again ({})", u.node, s(&r["state"]), s(&r["method"]));
            Ok(())
        }
        (Some(FenceSub::Test(_)), None) => {
            let r = run::control::call(socket, json!({"command": "fence.test"}))?;
            let mut failed = 0;
            for c in r["methods"].as_array().into_iter().flatten() {
                let ok = c["ok"] == json!(true);
                failed += usize::from(!ok);
                println!(
                    "{}: {} ({} ms): {}",
                    s(&c["method"]),
                    if ok { "ok" } else { "FAILED" },
                    s(&c["ms"]),
                    s(&c["detail"])
                );
            }
            if failed > 0 {
                return Err(format!("{failed} fence method(s) failed the test").into());
            }
            Ok(())
        }
        (None, Some(node)) => {
            if !f.yes && !confirmed(&format!("Power off {node} now? [y/N] "))? {
                println!("nothing done");
                return Ok(());
            }
            let r = run::control::call(socket, json!({"command": "fence", "node": node}))?;
            for a in r["attempts"].as_array().into_iter().flatten() {
                println!(
                    "{}: {} after {:.1}s: {}",
                    s(&a["method"]),
                    s(&a["result"]),
                    a["duration_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
                    s(&a["detail"])
                );
            }
            println!("{node} is fenced (confirmed by {})", s(&r["method"]));
            Ok(())
        }
        _ => Err(
            "say `hadb fence NODE [--yes]`, `hadb fence test`, `hadb fence confirm NODE` or `hadb fence unfence NODE`".into(),
        ),
    }
}

/// Asks on the terminal; without one there is nobody to answer, so it
/// refuses rather than guess.
fn confirmed(question: &str) -> Result<bool, Box<dyn std::error::Error>> {
    use std::io::{BufRead, Write};
    if !rustix::termios::isatty(std::io::stdin()) {
        return Err("stdin is not a terminal, so nobody can answer the question; add --yes to fence without it".into());
    }
    print!("{question}");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
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
                "outdated": sb.has(core::meta::flags::OUTDATED),
                "active": sb.has(core::meta::flags::ACTIVE),
                "peer_outdated": sb.has(core::meta::flags::PEER_OUTDATED),
                "lost_cache": sb.has(core::meta::flags::LOST_CACHE),
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
            // A verify's result may equal the last one's (a clean pair
            // verified twice): the count of ended verifies tells them apart.
            let ended =
                |st: &serde_json::Value| st["volume"]["counters"]["verifies_ended"].as_u64();
            let before = run::control::call(socket, json!({"command": "status"}))?;
            let before = ended(&before);
            run::control::call(socket, json!({"command": "volume.verify"}))?;
            if !v.wait {
                println!("verify started; `hadb status` shows its progress");
                return Ok(());
            }
            loop {
                std::thread::sleep(std::time::Duration::from_millis(200));
                let st = run::control::call(socket, json!({"command": "status"}))?;
                let last = &st["volume"]["last_verify"];
                if st["volume"]["verify"].is_null() && ended(&st) != before && !last.is_null() {
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
        VolumeSub::Mkfs(m) => {
            run::control::call(socket, json!({"command": "volume.mkfs", "force": m.force}))?;
            println!("filesystem made and mounted");
            Ok(())
        }
        VolumeSub::GoAlone(_) => {
            run::control::call(socket, json!({"command": "volume.go-alone"}))?;
            println!("going on without the peer");
            Ok(())
        }
        VolumeSub::Down(_) => {
            run::control::call(socket, json!({"command": "volume.down"}))?;
            println!("volume down; hadb brings it back up within seconds");
            Ok(())
        }
        VolumeSub::Up(_) => {
            run::control::call(socket, json!({"command": "volume.up"}))?;
            println!("volume up");
            Ok(())
        }
    }
}

fn s(v: &Value) -> String {
    run::human::s(v)
}

fn human_status(st: &Value) -> String {
    run::human::status(st)
}
