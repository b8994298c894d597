//! Configuration: `/etc/hadb/hadb.toml`, overridden key by key from the
//! kernel command line (`hadb.<dotted.key>=value`), validated into [`Config`].
//!
//! One image serves both nodes, so the kernel command line must be able to
//! change any key; that is why overrides are applied to the parsed TOML tree
//! before it becomes typed configuration, and why every error remembers
//! whether a key came from the file (with its line) or from the command line.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const DEFAULT_PATH: &str = "/etc/hadb/hadb.toml";
pub const DEFAULT_CMDLINE: &str = "/proc/cmdline";
const CMDLINE_PREFIX: &str = "hadb.";

/// Where a key's value came from, for error messages an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File {
        path: PathBuf,
        line: usize,
    },
    Cmdline {
        path: PathBuf,
    },
    /// The key is absent; its default (or its absence) is what is wrong.
    Default {
        path: PathBuf,
    },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, line } => write!(f, "{}:{line}", path.display()),
            Origin::Cmdline { path } => write!(f, "kernel command line ({})", path.display()),
            Origin::Default { path } => write!(f, "{} (key not set)", path.display()),
        }
    }
}

#[derive(Debug)]
pub enum Error {
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    Cmdline {
        path: PathBuf,
        word: String,
        message: String,
    },
    Key {
        origin: Origin,
        key: String,
        message: String,
    },
    /// Several independent problems, all reported at once so an operator
    /// fixes the file in one go.
    Many(Vec<Error>),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Read { path, source } => write!(
                f,
                "cannot read config {}: {source}; create it (see docs/config.md) or pass --config PATH",
                path.display()
            ),
            Error::Syntax {
                path,
                line,
                message,
            } => write!(f, "{}:{line}: not valid TOML: {message}", path.display()),
            Error::Cmdline {
                path,
                word,
                message,
            } => write!(
                f,
                "kernel command line ({}): `{word}`: {message}",
                path.display()
            ),
            Error::Key {
                origin,
                key,
                message,
            } => write!(f, "{origin}: key `{key}`: {message}"),
            Error::Many(errors) => {
                for (i, e) in errors.iter().enumerate() {
                    if i > 0 {
                        writeln!(f)?;
                    }
                    write!(f, "{e}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for Error {}

/// What the volume's replication waits for before it acknowledges a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Protocol C: a write completes once it is on both nodes.
    Sync,
    /// Like sync, but goes on alone after `ack_timeout` once the peer is
    /// known not to be promotable.
    Semisync,
    /// Protocol A: a write completes once it is local; failover can lose
    /// writes.
    Async,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Sync => "sync",
            Mode::Semisync => "semisync",
            Mode::Async => "async",
        })
    }
}

/// A duration written the way operators write them: `200ms`, `10s`, `2m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let n: u64 = number.parse().map_err(|_| {
            format!("`{text}` is not a duration; write e.g. \"200ms\", \"10s\", \"2m\"")
        })?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            _ => {
                return Err(format!(
                    "`{text}` has no known unit; write a whole number followed by ms, s, m or h"
                ));
            }
        };
        Ok(HumanDuration(d))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HumanDuration::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// Bytes per second written the way operators write them: `100M`, `1G`,
/// `512K`, `0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRate(pub u64);

impl ByteRate {
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let (num, mult) = match t.char_indices().last() {
            Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
            Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
            Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
            _ => (t, 1),
        };
        num.parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(mult))
            .map(ByteRate)
            .ok_or_else(|| format!("`{text}` is not a rate; write bytes per second like \"100M\", \"512K\" or \"0\" (no limit)"))
    }
}

impl<'de> Deserialize<'de> for ByteRate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ByteRate::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for ByteRate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let v = self.0;
        let text = if v != 0 && v.is_multiple_of(1 << 30) {
            format!("{}G", v >> 30)
        } else if v != 0 && v.is_multiple_of(1 << 20) {
            format!("{}M", v >> 20)
        } else if v != 0 && v.is_multiple_of(1 << 10) {
            format!("{}K", v >> 10)
        } else {
            v.to_string()
        };
        s.serialize_str(&text)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The node's address on the private network (ring0).
    pub address: IpAddr,
    /// Replication port of this node; defaults to `volume.port`. Lets two
    /// nodes share one host in tests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// More heartbeat links (ring1, ring2, ...): this node's address on
    /// each; `address` is ring0. Both nodes list the same number.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<IpAddr>,
    /// Heartbeat port of this node; defaults to `heartbeat.port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_port: Option<u16>,
    /// The node's virtual machine name in Azure, for the `azure` fence
    /// method; defaults to the node's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure_vm: Option<String>,
    /// Where the `ssh` fence method reaches this node; defaults to
    /// `address`. A management network that a heartbeat partition does
    /// not cut lets the fence through where the rings are down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_address: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    /// The backing store: a block device, or a regular file for tests.
    /// Required on a node (a witness has none).
    #[serde(default)]
    pub device: PathBuf,
    #[serde(default = "default_volume_port")]
    pub port: u16,
    #[serde(default = "default_mode")]
    pub mode: Mode,
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout: HumanDuration,
    /// Nothing received on the replication link for this long, or a send
    /// that does not finish within it, and the link is dead; the idle
    /// link is pinged often enough that a live one never is.
    #[serde(default = "default_link_timeout")]
    pub link_timeout: HumanDuration,
    /// Where the primary attaches the volume to its own kernel; none: no
    /// kernel block device (tests, hosts without nbd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_device: Option<PathBuf>,
    /// NBD server for userspace tools, on the primary.
    #[serde(default = "default_nbd_socket")]
    pub nbd_socket: PathBuf,
    /// Most bytes per second a resync may send ("0": no fixed limit; the
    /// resync still yields to application writes).
    #[serde(default = "default_resync_rate")]
    pub resync_rate: ByteRate,
    /// Resync bytes per second while the application writes (DRBD's
    /// c-min-rate); "0": only the one-read window.
    #[serde(default = "default_resync_min_rate")]
    pub resync_min_rate: ByteRate,
    /// What to do when both copies changed since they parted.
    #[serde(default = "default_after_split_brain")]
    pub after_split_brain: crate::core::replica::AfterSplitBrain,
    /// Extents (4 MiB each) the activity log keeps: after an unclean stop
    /// at most this much data is resynced for it; fewer means more log
    /// writes while the application moves around the volume.
    #[serde(default = "default_al_extents")]
    pub al_extents: u32,
}

impl Default for VolumeConfig {
    fn default() -> Self {
        VolumeConfig {
            device: PathBuf::new(),
            port: default_volume_port(),
            mode: default_mode(),
            ack_timeout: default_ack_timeout(),
            link_timeout: default_link_timeout(),
            nbd_device: None,
            nbd_socket: default_nbd_socket(),
            resync_rate: default_resync_rate(),
            resync_min_rate: default_resync_min_rate(),
            after_split_brain: default_after_split_brain(),
            al_extents: default_al_extents(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatConfig {
    #[serde(default = "default_heartbeat_port")]
    pub port: u16,
    /// How often a heartbeat goes out on every link.
    #[serde(default = "default_heartbeat_interval")]
    pub interval: HumanDuration,
    /// A link with nothing valid heard for this long is down; the peer is
    /// lost when every link is down.
    #[serde(default = "default_heartbeat_timeout")]
    pub timeout: HumanDuration,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            port: default_heartbeat_port(),
            interval: default_heartbeat_interval(),
            timeout: default_heartbeat_timeout(),
        }
    }
}

/// How a lost peer is fenced before this node takes over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FenceMethod {
    /// The operator powers the peer off and says so with
    /// `hadb fence confirm NODE`.
    Manual,
    /// Azure Resource Manager powers the peer's VM off; confirmed once its
    /// instance view says stopped or deallocated (`[fencing.azure]`).
    Azure,
    /// OpenSSH runs a command on the peer that stops it at once; confirmed
    /// once the peer then stays silent (`[fencing.ssh]`).
    Ssh,
    /// Waits: a peer that advertised an armed watchdog and has been
    /// silent for twice its timeout, while this node holds the witness's
    /// vote, has rebooted (a node without quorum stops petting). Needs
    /// `[witness]` and `[watchdog] enabled` on both nodes.
    Watchdog,
}

impl FenceMethod {
    pub fn name(self) -> &'static str {
        match self {
            FenceMethod::Manual => "manual",
            FenceMethod::Azure => "azure",
            FenceMethod::Ssh => "ssh",
            FenceMethod::Watchdog => "watchdog",
        }
    }
}

impl fmt::Display for FenceMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `methods = ["azure", "ssh"]`, or the older one-method spelling
/// `method = "azure"`, which reads as a list of one.
fn one_or_many_methods<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<FenceMethod>, D::Error> {
    struct Methods;
    impl<'de> serde::de::Visitor<'de> for Methods {
        type Value = Vec<FenceMethod>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of fence methods, e.g. [\"azure\", \"ssh\"]")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            use serde::de::IntoDeserializer;
            Ok(vec![FenceMethod::deserialize(v.into_deserializer())?])
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(m) = seq.next_element()? {
                out.push(m);
            }
            Ok(out)
        }
    }
    d.deserialize_any(Methods)
}

/// `[fencing.ssh]`: how the `ssh` method logs in to the peer and what it
/// runs there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshConfig {
    /// The account on the peer; the command needs root's rights.
    #[serde(default = "default_ssh_user")]
    pub user: String,
    /// The private key (mode 0600); its public half is in the peer's
    /// `authorized_keys` for `user`.
    #[serde(default = "default_ssh_identity_file")]
    pub identity_file: PathBuf,
    /// The peer's host key, as `ssh-keyscan` prints it; nothing else is
    /// trusted.
    #[serde(default = "default_ssh_known_hosts_file")]
    pub known_hosts_file: PathBuf,
    #[serde(default = "default_ssh_port")]
    pub port: u16,
    /// From starting ssh to a logged-in session.
    #[serde(default = "default_ssh_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// What runs on the peer: it must stop it at once.
    #[serde(default = "default_ssh_command")]
    pub command: String,
    /// After the command, the peer must fall silent on every ring within
    /// this, or the fence failed.
    #[serde(default = "default_ssh_confirm_timeout")]
    pub confirm_timeout: HumanDuration,
}

fn default_ssh_user() -> String {
    "root".into()
}
fn default_ssh_identity_file() -> PathBuf {
    PathBuf::from("/etc/hadb/fence_ssh_key")
}
fn default_ssh_known_hosts_file() -> PathBuf {
    PathBuf::from("/etc/hadb/fence_ssh_known_hosts")
}
fn default_ssh_port() -> u16 {
    22
}
fn default_ssh_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
fn default_ssh_command() -> String {
    // sysrq `b`: reboot at once, no sync, no unmount, no shutdown scripts:
    // the peer stops writing the instant it runs. Root may write the
    // trigger whatever kernel.sysrq says.
    "echo b > /proc/sysrq-trigger".into()
}
fn default_ssh_confirm_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

/// How the `azure` fence method gets its Azure AD token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AzureAuth {
    /// The VM's own identity, through the instance metadata service: no
    /// secret on disk.
    ManagedIdentity,
    /// An app registration: tenant, client id and a secret or certificate.
    ServicePrincipal,
}

/// `[fencing.azure]`: where the peer's VM lives and how to reach Azure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureConfig {
    #[serde(default = "default_azure_auth")]
    pub auth: AzureAuth,
    /// Defaults to this VM's subscription, from the instance metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscription_id: Option<String>,
    /// Defaults to this VM's resource group, from the instance metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_group: Option<String>,
    /// The directory (tenant) of a service principal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// A service principal's application id, or a user-assigned managed
    /// identity's client id (unset: the system-assigned identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// A service principal's client secret, alone in a file of mode 0600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<PathBuf>,
    /// A service principal's certificate and its private key (PEM, one
    /// file of mode 0600), instead of a secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate_file: Option<PathBuf>,
    #[serde(default = "default_azure_metadata")]
    pub metadata_endpoint: String,
    #[serde(default = "default_azure_login")]
    pub login_endpoint: String,
    #[serde(default = "default_azure_management")]
    pub management_endpoint: String,
    /// The Microsoft.Compute api-version of every management request.
    #[serde(default = "default_azure_api_version")]
    pub api_version: String,
    /// The whole fence (token, power-off, confirmation) must finish within
    /// this, or it failed.
    #[serde(default = "default_azure_power_timeout")]
    pub power_timeout: HumanDuration,
    /// More CA certificates (PEM) to trust for the login and management
    /// endpoints, beside the built-in public roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

fn default_azure_auth() -> AzureAuth {
    AzureAuth::ManagedIdentity
}
fn default_azure_metadata() -> String {
    "http://169.254.169.254".into()
}
fn default_azure_login() -> String {
    "https://login.microsoftonline.com".into()
}
fn default_azure_management() -> String {
    "https://management.azure.com".into()
}
fn default_azure_api_version() -> String {
    "2024-07-01".into()
}
fn default_azure_power_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(120))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FencingConfig {
    /// Tried in order until one confirms the fence (levels); after the
    /// last, or at `manual`, the operator's `hadb fence confirm`.
    #[serde(
        default = "default_fence_methods",
        alias = "method",
        deserialize_with = "one_or_many_methods"
    )]
    pub methods: Vec<FenceMethod>,
    /// A secondary that lost its peer waits this long before fencing, so a
    /// primary that lost its peer at the same moment fences first.
    #[serde(default = "default_fence_delay")]
    pub fence_delay: HumanDuration,
    /// Required by the `azure` method; may be set beforehand, to try it
    /// before relying on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure: Option<AzureConfig>,
    /// Required by the `ssh` method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<SshConfig>,
}

impl Default for FencingConfig {
    fn default() -> Self {
        FencingConfig {
            methods: default_fence_methods(),
            fence_delay: default_fence_delay(),
            azure: None,
            ssh: None,
        }
    }
}

/// mysqld on the volume: where the primary mounts it, and how hadb runs
/// and checks mysqld there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MysqlConfig {
    /// Where the primary mounts the volume's kernel device.
    #[serde(default = "default_datadir")]
    pub datadir: PathBuf,
    #[serde(default = "default_fstype")]
    pub fstype: String,
    /// Filesystem-specific mount options (noatime is always set).
    #[serde(default)]
    pub mount_options: String,
    /// The datadir is the volume's filesystem, mounted by hadb. false: a
    /// plain directory (hosts without nbd; tests), nothing is mounted.
    #[serde(default = "yes")]
    pub on_volume: bool,
    /// hadb starts, checks and stops mysqld on the primary. false: only
    /// the filesystem follows the primary.
    #[serde(default = "yes")]
    pub supervise: bool,
    /// mysqld's command line; `{datadir}` and `{socket}` are replaced.
    #[serde(default = "default_mysqld_command")]
    pub command: Vec<String>,
    /// What `hadb mysql init` runs on an empty datadir; none: the
    /// installed server's own (`mariadb-install-db`, else `mysqld
    /// --initialize-insecure`). `{datadir}` and `{user}` are replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_command: Option<Vec<String>>,
    /// The account mysqld runs as (hadb drops to it before exec).
    #[serde(default = "default_mysql_user")]
    pub user: String,
    /// mysqld's unix socket, where the health check connects.
    #[serde(default = "default_mysql_socket")]
    pub socket: PathBuf,
    /// The account the health check logs in as.
    #[serde(default = "default_monitor_user")]
    pub monitor_user: String,
    /// Its password (mode 0600); none: an empty password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor_password_file: Option<PathBuf>,
    /// A statement each check runs after the ping, e.g.
    /// "REPLACE INTO hadb.probe VALUES (1, NOW())": proves mysqld can write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_probe: Option<String>,
    #[serde(default = "default_health_interval")]
    pub health_interval: HumanDuration,
    /// A check that gets no answer within this is "hung".
    #[serde(default = "default_health_timeout")]
    pub health_timeout: HumanDuration,
    /// Bad checks in a row before mysqld is restarted.
    #[serde(default = "default_health_failures")]
    pub health_failures: u32,
    /// From start to healthy; InnoDB recovery after a crash counts.
    #[serde(default = "default_start_timeout")]
    pub start_timeout: HumanDuration,
    /// From SIGTERM to SIGKILL.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout: HumanDuration,
    /// Restarts allowed within `restart_window`; one more failure and
    /// mysqld is failed on this node and the primary role moves.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    #[serde(default = "default_restart_window")]
    pub restart_window: HumanDuration,
}

impl MysqlConfig {
    /// `hadb mysql init`'s command line, placeholders filled in.
    pub fn init_command_line(&self) -> Vec<String> {
        let default = if Path::new("/usr/bin/mariadb-install-db").exists() {
            vec![
                "/usr/bin/mariadb-install-db".to_owned(),
                "--datadir={datadir}".into(),
                "--user={user}".into(),
            ]
        } else {
            vec![
                "/usr/sbin/mysqld".to_owned(),
                "--initialize-insecure".into(),
                "--datadir={datadir}".into(),
                "--user={user}".into(),
            ]
        };
        self.init_command
            .clone()
            .unwrap_or(default)
            .iter()
            .map(|a| {
                a.replace("{datadir}", &self.datadir.to_string_lossy())
                    .replace("{user}", &self.user)
            })
            .collect()
    }

    /// The command line with the placeholders filled in.
    pub fn command_line(&self) -> Vec<String> {
        self.command
            .iter()
            .map(|a| {
                a.replace("{datadir}", &self.datadir.to_string_lossy())
                    .replace("{socket}", &self.socket.to_string_lossy())
            })
            .collect()
    }
}

fn yes() -> bool {
    true
}
fn default_mysqld_command() -> Vec<String> {
    // /usr/sbin/mysqld is MySQL's server on Ubuntu and MariaDB's (a link
    // to mariadbd) on Debian; the packaged /etc/mysql/my.cnf is read.
    [
        "/usr/sbin/mysqld",
        "--datadir={datadir}",
        "--socket={socket}",
    ]
    .map(String::from)
    .to_vec()
}
fn default_mysql_user() -> String {
    "mysql".into()
}
fn default_mysql_socket() -> PathBuf {
    PathBuf::from("/run/mysqld/mysqld.sock")
}
fn default_monitor_user() -> String {
    "hadb_monitor".into()
}
fn default_health_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(2))
}
fn default_health_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
fn default_health_failures() -> u32 {
    3
}
fn default_start_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(600))
}
fn default_stop_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(120))
}
fn default_max_restarts() -> u32 {
    3
}
fn default_restart_window() -> HumanDuration {
    HumanDuration(Duration::from_secs(600))
}

fn default_datadir() -> PathBuf {
    PathBuf::from("/var/lib/mysql")
}
fn default_fstype() -> String {
    "ext4".into()
}

/// Self-fencing: a hung hadb reboots its node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchdogConfig {
    /// Open (arm) the watchdog device and pet it while hadb is healthy.
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "default_watchdog_device")]
    pub device: PathBuf,
    /// A hung hadb reboots the node this long after its last pet.
    #[serde(default = "default_watchdog_timeout")]
    pub timeout: HumanDuration,
    /// Load softdog when the device is missing (no hardware watchdog).
    #[serde(default = "yes")]
    pub load_softdog: bool,
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        WatchdogConfig {
            enabled: false,
            device: default_watchdog_device(),
            timeout: default_watchdog_timeout(),
            load_softdog: true,
        }
    }
}

fn default_watchdog_device() -> PathBuf {
    PathBuf::from("/dev/watchdog")
}
fn default_watchdog_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

/// What this hadb is: one of the pair, or the witness that only votes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum NodeRole {
    #[default]
    Node,
    Witness,
}

/// `[witness]`: a third, diskless hadb that gives its vote to one side of
/// a cut pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessConfig {
    /// The witness's node name (what its own `node` is).
    pub node: String,
    /// Its address, reached from both nodes' ring0.
    pub address: IpAddr,
    /// Its heartbeat port; defaults to `heartbeat.port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ManagerConfig {
    /// Pacemaker's maintenance-mode: the manager watches and reports but
    /// never acts; roles change only by hand (`hadb volume primary`).
    #[serde(default)]
    pub maintenance: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    #[serde(default = "default_control_socket")]
    pub socket: PathBuf,
    /// A serial port (e.g. /dev/ttyS0) to run the command prompt on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<PathBuf>,
    /// Where to serve /probe and /metrics over HTTP (e.g. 0.0.0.0:9200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<SocketAddr>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            socket: default_control_socket(),
            console: None,
            http: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub cluster: String,
    /// This node's name; defaults to the host name.
    #[serde(default)]
    pub node: String,
    #[serde(default = "default_key_file")]
    pub key_file: PathBuf,
    /// Where hadb keeps what must outlive a run: the last heartbeat
    /// incarnation (`run::incarnation`), so the next run's is higher even
    /// when the wall clock went back.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// `witness` on the third machine of a pair with a witness.
    #[serde(default)]
    pub role: NodeRole,
    pub nodes: BTreeMap<String, NodeConfig>,
    /// A witness has no volume: none needed there.
    #[serde(default)]
    pub volume: VolumeConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub witness: Option<WitnessConfig>,
    #[serde(default)]
    pub heartbeat: HeartbeatConfig,
    #[serde(default)]
    pub fencing: FencingConfig,
    #[serde(default)]
    pub manager: ManagerConfig,
    #[serde(default)]
    pub watchdog: WatchdogConfig,
    /// Present: the primary mounts the volume at `mysql.datadir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mysql: Option<MysqlConfig>,
    #[serde(default)]
    pub control: ControlConfig,
}

fn default_volume_port() -> u16 {
    7789
}
fn default_heartbeat_port() -> u16 {
    5405
}
fn default_heartbeat_interval() -> HumanDuration {
    HumanDuration(Duration::from_millis(200))
}
fn default_heartbeat_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_fence_methods() -> Vec<FenceMethod> {
    vec![FenceMethod::Manual]
}
fn default_fence_delay() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
fn default_mode() -> Mode {
    Mode::Sync
}
fn default_ack_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
/// Long enough for a few TCP retransmissions on a lossy link (the first
/// waits 200 ms at least, and each doubles), short enough that a dead
/// link is noticed well before semisync's `ack_timeout` of 10 s.
fn default_link_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
fn default_resync_rate() -> ByteRate {
    ByteRate(0)
}
fn default_resync_min_rate() -> ByteRate {
    ByteRate(32 << 20)
}
fn default_al_extents() -> u32 {
    1237
}
fn default_after_split_brain() -> crate::core::replica::AfterSplitBrain {
    crate::core::replica::AfterSplitBrain::Disconnect
}
fn default_nbd_socket() -> PathBuf {
    PathBuf::from("/run/hadb/volume.sock")
}
fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/hadb/control.sock")
}
fn default_key_file() -> PathBuf {
    PathBuf::from("/etc/hadb/authkey")
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/hadb")
}

impl Config {
    /// The peer of a two-node pair: the one node that is not us.
    pub fn peer(&self) -> (&str, &NodeConfig) {
        // validate() guarantees exactly one other node.
        self.nodes
            .iter()
            .find(|(name, _)| **name != self.node)
            .map(|(n, c)| (n.as_str(), c))
            .expect("validated config has a peer")
    }

    pub fn me(&self) -> &NodeConfig {
        &self.nodes[&self.node]
    }

    /// Where the `ssh` fence method reaches a node: `ssh_address`, or its
    /// ring0 address.
    pub fn ssh_address(&self, node: &str) -> Option<IpAddr> {
        self.nodes
            .get(node)
            .map(|n| n.ssh_address.unwrap_or(n.address))
    }

    /// A node's VM name in Azure: `azure_vm`, or the node's own name.
    pub fn azure_vm<'a>(&'a self, node: &'a str) -> &'a str {
        self.nodes
            .get(node)
            .and_then(|n| n.azure_vm.as_deref())
            .unwrap_or(node)
    }

    pub fn replication_port(&self, node: &NodeConfig) -> u16 {
        node.port.unwrap_or(self.volume.port)
    }

    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.me().address, self.replication_port(self.me()))
    }

    pub fn peer_addr(&self) -> SocketAddr {
        let (_, peer) = self.peer();
        SocketAddr::new(peer.address, self.replication_port(peer))
    }
}

/// Where to read from. Tests point both at temporary files.
#[derive(Debug, Clone)]
pub struct Sources {
    pub file: PathBuf,
    /// None: no kernel command line overrides (e.g. `--cmdline none`).
    pub cmdline: Option<PathBuf>,
}

impl Default for Sources {
    fn default() -> Self {
        Sources {
            file: PathBuf::from(DEFAULT_PATH),
            cmdline: Some(PathBuf::from(DEFAULT_CMDLINE)),
        }
    }
}

/// Keys a running daemon takes on SIGHUP; every other change waits for
/// a restart of hadb.
pub const RELOADABLE: &[&str] = &[
    "manager.maintenance",
    "fencing.fence_delay",
    "mysql.monitor_user",
    "mysql.monitor_password_file",
    "mysql.write_probe",
    "mysql.health_interval",
    "mysql.health_timeout",
    "mysql.health_failures",
    "mysql.start_timeout",
    "mysql.stop_timeout",
    "mysql.max_restarts",
    "mysql.restart_window",
];

/// The dotted keys whose values differ between two configurations, as
/// (key, old, new), in key order.
pub fn changed_keys(old: &Config, new: &Config) -> Vec<(String, String, String)> {
    fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_owned(), other.to_string());
            }
        }
    }
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", &serde_json::to_value(old).unwrap_or_default(), &mut a);
    flatten("", &serde_json::to_value(new).unwrap_or_default(), &mut b);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |m: &BTreeMap<String, String>| m.get(k).cloned().unwrap_or("(unset)".into());
            (k.clone(), show(&a), show(&b))
        })
        .collect()
}

/// Reads, merges and validates the configuration.
pub fn load(sources: &Sources) -> Result<Config, Error> {
    let text = std::fs::read_to_string(&sources.file).map_err(|source| Error::Read {
        path: sources.file.clone(),
        source,
    })?;
    let cmdline = match &sources.cmdline {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => Some((path.clone(), text)),
            // A missing /proc (a chroot, a test) simply means no overrides.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(Error::Read {
                    path: path.clone(),
                    source,
                });
            }
        },
        None => None,
    };
    let hostname = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    parse(
        &sources.file,
        &text,
        cmdline.as_ref().map(|(p, t)| (p.as_path(), t.as_str())),
        &hostname,
    )
}

/// The pure part of [`load`]: text in, validated config or every error out.
pub fn parse(
    file: &Path,
    text: &str,
    cmdline: Option<(&Path, &str)>,
    hostname: &str,
) -> Result<Config, Error> {
    let lines = KeyLines::new(text);
    let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| Error::Syntax {
        path: file.to_owned(),
        line: e.span().map(|s| line_of(text, s.start)).unwrap_or(1),
        message: e.message().trim().to_owned(),
    })?;

    let mut overridden: Vec<String> = Vec::new();
    if let Some((cmdline_path, cmdline_text)) = cmdline {
        let mut errors = Vec::new();
        for word in split_cmdline(cmdline_text) {
            let Some(rest) = word.strip_prefix(CMDLINE_PREFIX) else {
                continue;
            };
            match apply_override(&mut table, rest) {
                Ok(key) => overridden.push(key),
                Err(message) => errors.push(Error::Cmdline {
                    path: cmdline_path.to_owned(),
                    word: word.clone(),
                    message,
                }),
            }
        }
        if !errors.is_empty() {
            return Err(Error::Many(errors));
        }
    }

    let origin_of = |key: &str| -> Origin {
        if overridden
            .iter()
            .any(|k| k == key || key.starts_with(&format!("{k}.")))
        {
            Origin::Cmdline {
                path: cmdline.map(|(p, _)| p.to_owned()).unwrap_or_default(),
            }
        } else if let Some(line) = lines.line_of_key(key) {
            Origin::File {
                path: file.to_owned(),
                line,
            }
        } else {
            Origin::Default {
                path: file.to_owned(),
            }
        }
    };

    let mut config: Config =
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." { String::new() } else { key };
            let message = e.inner().message().trim().to_owned();
            // serde_path_to_error already ends the path with an unknown
            // field's name; only a top-level one arrives without it.
            let key = match unknown_field(&message) {
                Some(field) if key.is_empty() => field.to_owned(),
                _ => key,
            };
            Error::Key {
                origin: origin_of(&key),
                key,
                message: explain(&message),
            }
        })?;

    if config.node.is_empty() {
        config.node = hostname.to_owned();
    }
    let errors = validate(&config, &origin_of);
    match errors.len() {
        0 => Ok(config),
        1 => Err(errors.into_iter().next().expect("one error")),
        _ => Err(Error::Many(errors)),
    }
}

fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

fn explain(message: &str) -> String {
    if message.starts_with("unknown field") {
        format!("{message}; remove it or check its spelling in docs/config.md")
    } else if message.starts_with("missing field") {
        format!("{message}; it has no default, set it (see docs/config.md)")
    } else {
        message.to_owned()
    }
}

fn validate(config: &Config, origin_of: &dyn Fn(&str) -> Origin) -> Vec<Error> {
    let mut errors = Vec::new();
    let mut bad = |key: &str, message: String| {
        errors.push(Error::Key {
            origin: origin_of(key),
            key: key.to_owned(),
            message,
        })
    };
    // 64: what a heartbeat carries of each name.
    if config.cluster.is_empty()
        || config.cluster.len() > 64
        || !config.cluster.chars().all(name_char)
    {
        bad(
            "cluster",
            "expected a name of 1 to 64 letters, digits, '-' or '_'".into(),
        );
    }
    for name in config.nodes.keys() {
        if name.is_empty() || name.len() > 64 || !name.chars().all(name_char) {
            bad(
                &format!("nodes.{name}"),
                "a node name must be 1 to 64 letters, digits, '-' or '_'".into(),
            );
        }
    }
    if config.nodes.len() != 2 {
        bad(
            "nodes",
            format!(
                "expected exactly two nodes (a pair), found {}: {:?}",
                config.nodes.len(),
                config.nodes.keys().collect::<Vec<_>>()
            ),
        );
    }
    let witness_name = config.witness.as_ref().map(|w| w.node.as_str());
    match (config.role, witness_name) {
        (NodeRole::Witness, None) => bad(
            "role",
            "`witness` needs a [witness] section naming this node and its address (the same section the two nodes have)".into(),
        ),
        (NodeRole::Witness, Some(w)) if w != config.node => bad(
            "node",
            format!("this witness is `{}` but [witness] node is `{w}`; they must be the same name", config.node),
        ),
        (NodeRole::Node, Some(w)) if w == config.node => bad(
            "role",
            format!("`{w}` is the [witness]: set role = \"witness\" on it"),
        ),
        _ => {}
    }
    if let Some(w) = witness_name
        && (config.nodes.contains_key(w)
            || w.is_empty()
            || w.len() > 64
            || !w.chars().all(name_char))
    {
        bad(
            "witness.node",
            format!(
                "`{w}` must be a name of 1 to 64 letters, digits, '-' or '_', not one of the pair's [nodes]"
            ),
        );
    }
    if config.role == NodeRole::Node && config.volume.device.as_os_str().is_empty() {
        bad(
            "volume.device",
            "required: the block device (or file) that holds this node's copy of the volume".into(),
        );
    }
    if config.role == NodeRole::Node && !config.nodes.contains_key(&config.node) {
        bad(
            "node",
            format!(
                "this node is `{}` but [nodes] has only {:?}; set `node` (or hadb.node= on the kernel command line) to one of them",
                config.node,
                config.nodes.keys().collect::<Vec<_>>()
            ),
        );
    }
    if config.volume.port == 0 {
        bad("volume.port", "expected a port from 1 to 65535".into());
    }
    for (name, node) in &config.nodes {
        if node.port == Some(0) {
            bad(
                &format!("nodes.{name}.port"),
                "expected a port from 1 to 65535".into(),
            );
        }
    }
    if config.volume.ack_timeout.0 < Duration::from_millis(100) {
        bad(
            "volume.ack_timeout",
            "expected at least 100ms; shorter timeouts make the volume go alone on ordinary jitter"
                .into(),
        );
    }
    if config.volume.link_timeout.0 < Duration::from_secs(1)
        || config.volume.link_timeout.0 > Duration::from_secs(3600)
    {
        bad(
            "volume.link_timeout",
            "expected 1s to 1h; a TCP retransmission waits 200ms at least, so a shorter timeout drops a live link on ordinary packet loss".into(),
        );
    }
    let hb = &config.heartbeat;
    if hb.port == 0 {
        bad("heartbeat.port", "expected a port from 1 to 65535".into());
    }
    if hb.interval.0 < Duration::from_millis(10) {
        bad(
            "heartbeat.interval",
            "expected at least 10ms; faster only burns CPU".into(),
        );
    }
    if hb.timeout.0 < hb.interval.0 * 3 {
        bad(
            "heartbeat.timeout",
            format!(
                "expected at least three intervals ({}), or one lost packet marks the link down",
                HumanDuration(hb.interval.0 * 3)
            ),
        );
    }
    let link_counts: Vec<usize> = config.nodes.values().map(|n| n.links.len()).collect();
    if link_counts.windows(2).any(|w| w[0] != w[1]) {
        bad(
            "nodes",
            "every node must list the same number of heartbeat `links` (one address per extra ring)"
                .into(),
        );
    }
    let al_max = crate::core::al::MAX_EXTENTS as u32;
    if !(7..=al_max).contains(&config.volume.al_extents) {
        bad(
            "volume.al_extents",
            format!("expected 7 to {al_max} extents of 4 MiB"),
        );
    }
    if config.watchdog.timeout.0 < Duration::from_secs(2)
        || config.watchdog.timeout.0 > Duration::from_secs(3600)
    {
        bad(
            "watchdog.timeout",
            "expected 2s to 1h; the watchdog counts whole seconds, and hadb pets it four times per timeout".into(),
        );
    }
    if let Some(m) = &config.mysql {
        if m.on_volume && config.volume.nbd_device.is_none() {
            bad(
                "mysql.on_volume",
                "the datadir is on the volume, but volume.nbd_device is not set: set it (e.g. \"/dev/nbd0\"), or set mysql.on_volume = false for a datadir on a plain directory".into(),
            );
        }
        if m.supervise && m.command.is_empty() {
            bad(
                "mysql.command",
                "expected mysqld's command line, e.g. [\"/usr/sbin/mysqld\", \"--datadir={datadir}\", \"--socket={socket}\"]".into(),
            );
        }
        if m.health_timeout.0 >= m.health_interval.0 * 10 || m.health_timeout.0.is_zero() {
            bad(
                "mysql.health_timeout",
                "expected more than 0 and less than ten health intervals".into(),
            );
        }
        if m.health_failures == 0 {
            bad(
                "mysql.health_failures",
                "expected at least 1 bad check before a restart".into(),
            );
        }
        for (key, path) in [
            ("mysql.datadir", Some(&m.datadir)),
            ("mysql.socket", Some(&m.socket)),
            (
                "mysql.monitor_password_file",
                m.monitor_password_file.as_ref(),
            ),
        ] {
            if let Some(path) = path
                && !path.is_absolute()
            {
                bad(
                    key,
                    format!("expected an absolute path, got `{}`", path.display()),
                );
            }
        }
    }
    validate_methods(config, &mut bad);
    validate_azure(config, &mut bad);
    validate_ssh(config, &mut bad);
    validate_watchdog_method(config, &mut bad);
    let device =
        (config.role == NodeRole::Node).then_some(("volume.device", &config.volume.device));
    for (key, path) in device.into_iter().chain([
        ("volume.nbd_socket", &config.volume.nbd_socket),
        ("control.socket", &config.control.socket),
        ("key_file", &config.key_file),
        ("state_dir", &config.state_dir),
    ]) {
        if !path.is_absolute() {
            bad(
                key,
                format!("expected an absolute path, got `{}`", path.display()),
            );
        }
    }
    errors
}

fn validate_azure(config: &Config, bad: &mut dyn FnMut(&str, String)) {
    // Names go into management URLs: a character that could change the
    // path is refused here rather than escaped into a different resource.
    let azure_name = |s: &str| {
        !s.is_empty()
            && s.len() <= 90
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.()".contains(c))
    };
    for (name, node) in &config.nodes {
        if let Some(vm) = &node.azure_vm
            && !azure_name(vm)
        {
            bad(
                &format!("nodes.{name}.azure_vm"),
                format!("`{vm}` is not an Azure VM name; expected letters, digits, '-', '_', '.'"),
            );
        }
    }
    let Some(az) = &config.fencing.azure else {
        if config.fencing.methods.contains(&FenceMethod::Azure) {
            bad(
                "fencing.methods",
                "method `azure` needs a [fencing.azure] table (see docs/config.md)".into(),
            );
        }
        return;
    };
    for (key, value) in [
        ("fencing.azure.subscription_id", &az.subscription_id),
        ("fencing.azure.resource_group", &az.resource_group),
    ] {
        if let Some(v) = value
            && !azure_name(v)
        {
            bad(
                key,
                format!(
                    "`{v}` is not an Azure name; expected letters, digits, '-', '_', '.', '(', ')'"
                ),
            );
        }
    }
    match az.auth {
        AzureAuth::ServicePrincipal => {
            for (key, value) in [
                ("fencing.azure.tenant_id", &az.tenant_id),
                ("fencing.azure.client_id", &az.client_id),
            ] {
                if value.as_deref().is_none_or(|v| !azure_name(v)) {
                    bad(
                        key,
                        "auth `service-principal` needs it: the directory (tenant) id and the application (client) id from the app registration".into(),
                    );
                }
            }
            if az.client_secret_file.is_some() == az.client_certificate_file.is_some() {
                bad(
                    "fencing.azure.client_secret_file",
                    "auth `service-principal` needs exactly one of client_secret_file and client_certificate_file".into(),
                );
            }
        }
        AzureAuth::ManagedIdentity => {
            if az.client_secret_file.is_some() || az.client_certificate_file.is_some() {
                bad(
                    "fencing.azure.auth",
                    "a client secret or certificate is for auth `service-principal`; a managed identity needs none".into(),
                );
            }
            if let Some(id) = &az.client_id
                && !azure_name(id)
            {
                bad(
                    "fencing.azure.client_id",
                    format!("`{id}` is not a client id"),
                );
            }
        }
    }
    // A bearer token or a client secret must never cross the network in
    // the clear; the metadata service is link-local and plain HTTP.
    for (key, url, schemes) in [
        (
            "fencing.azure.metadata_endpoint",
            &az.metadata_endpoint,
            &["http://", "https://"][..],
        ),
        (
            "fencing.azure.login_endpoint",
            &az.login_endpoint,
            &["https://"][..],
        ),
        (
            "fencing.azure.management_endpoint",
            &az.management_endpoint,
            &["https://"][..],
        ),
    ] {
        let host = schemes.iter().find_map(|s| url.strip_prefix(s));
        if host.is_none_or(|h| h.trim_end_matches('/').is_empty() || h.contains(['?', '#', ' '])) {
            bad(
                key,
                format!(
                    "`{url}` is not a base URL; expected {} followed by a host",
                    schemes.join(" or ")
                ),
            );
        }
    }
    if az.api_version.is_empty()
        || !az
            .api_version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        bad(
            "fencing.azure.api_version",
            format!(
                "`{}` is not an api-version; expected e.g. \"2024-07-01\"",
                az.api_version
            ),
        );
    }
    if az.power_timeout.0 < Duration::from_secs(1) {
        bad(
            "fencing.azure.power_timeout",
            "expected at least 1s; Azure takes seconds to power a VM off".into(),
        );
    }
    for (key, path) in [
        ("fencing.azure.client_secret_file", &az.client_secret_file),
        (
            "fencing.azure.client_certificate_file",
            &az.client_certificate_file,
        ),
        ("fencing.azure.ca_file", &az.ca_file),
    ] {
        if let Some(path) = path
            && !path.is_absolute()
        {
            bad(
                key,
                format!("expected an absolute path, got `{}`", path.display()),
            );
        }
    }
}

/// The `watchdog` method is safe only where the peer reboots itself when
/// it loses quorum: a witness, an armed watchdog, and a timeout long
/// enough that the self-fence happens within the wait.
fn validate_watchdog_method(config: &Config, bad: &mut dyn FnMut(&str, String)) {
    if !config.fencing.methods.contains(&FenceMethod::Watchdog) {
        return;
    }
    if config.witness.is_none() {
        bad(
            "fencing.methods",
            "`watchdog` needs a [witness]: without one, a peer cut off but alive keeps its quorum and never reboots".into(),
        );
    }
    if !config.watchdog.enabled {
        bad(
            "fencing.methods",
            "`watchdog` needs [watchdog] enabled = true on both nodes: the peer reboots itself through it".into(),
        );
    }
    let least = self_fence_after(&config.heartbeat) + 2 * config.heartbeat.timeout.0;
    if config.watchdog.timeout.0 < least {
        bad(
            "watchdog.timeout",
            format!(
                "with the `watchdog` fence method it must be at least {} s (the self-fence grace, 4 heartbeat timeouts, and two more for the peer to notice)",
                least.as_secs_f64()
            ),
        );
    }
}

impl Config {
    /// Whether this node fences itself without quorum (and so may say
    /// so in its heartbeats): `core::settings::self_fences` on its keys.
    pub fn self_fences(&self) -> bool {
        crate::core::settings::self_fences(
            self.witness.is_some(),
            self.fencing.methods.contains(&FenceMethod::Watchdog),
            self.watchdog.enabled,
        )
    }

    /// The settings that must agree with the peer's, as this node's
    /// heartbeats carry them (manager rule 16).
    pub fn settings(&self) -> crate::core::settings::Settings {
        crate::core::settings::Settings::new(
            self.volume.mode,
            self.self_fences(),
            self.witness.as_ref().map(|w| w.node.as_str()),
            self.heartbeat.timeout.0.as_micros() as u64,
            self.fencing.fence_delay.0.as_micros() as u64,
            self.watchdog.timeout.0.as_micros() as u64,
        )
    }
}

/// How long a node without quorum goes on before it stops petting its
/// watchdog: time for the witness to give its vote (it may wait two
/// timeouts for the primary) and for the vote to arrive.
pub fn self_fence_after(hb: &HeartbeatConfig) -> Duration {
    4 * hb.timeout.0
}

fn validate_methods(config: &Config, bad: &mut dyn FnMut(&str, String)) {
    let methods = &config.fencing.methods;
    if methods.is_empty() {
        bad(
            "fencing.methods",
            "expected at least one method, e.g. [\"manual\"] (the operator confirms) or [\"azure\", \"ssh\"]".into(),
        );
    }
    for (i, m) in methods.iter().enumerate() {
        if methods[..i].contains(m) {
            bad(
                "fencing.methods",
                format!("`{m}` is listed twice; each method is tried once, in order"),
            );
        }
        if *m == FenceMethod::Manual && i + 1 != methods.len() {
            bad(
                "fencing.methods",
                "`manual` (the operator's `hadb fence confirm`) ends the list: no method after it would ever be tried".into(),
            );
        }
    }
}

fn validate_ssh(config: &Config, bad: &mut dyn FnMut(&str, String)) {
    let Some(ssh) = &config.fencing.ssh else {
        if config.fencing.methods.contains(&FenceMethod::Ssh) {
            bad(
                "fencing.methods",
                "method `ssh` needs a [fencing.ssh] table (see docs/config.md)".into(),
            );
        }
        return;
    };
    // The user goes on ssh's command line: a leading '-' would be read as
    // an option.
    if ssh.user.is_empty()
        || ssh.user.starts_with('-')
        || !ssh
            .user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        bad(
            "fencing.ssh.user",
            format!(
                "`{}` is not a user name; expected letters, digits, '.', '_', '-' (e.g. \"root\")",
                ssh.user
            ),
        );
    }
    for (key, path) in [
        ("fencing.ssh.identity_file", &ssh.identity_file),
        ("fencing.ssh.known_hosts_file", &ssh.known_hosts_file),
    ] {
        if !path.is_absolute() {
            bad(
                key,
                format!("expected an absolute path, got `{}`", path.display()),
            );
        }
    }
    if ssh.port == 0 {
        bad("fencing.ssh.port", "expected a port from 1 to 65535".into());
    }
    if ssh.connect_timeout.0 < Duration::from_secs(1) {
        bad(
            "fencing.ssh.connect_timeout",
            "expected at least 1s (ssh counts it in whole seconds)".into(),
        );
    }
    if ssh.command.trim().is_empty() {
        bad(
            "fencing.ssh.command",
            "expected the command that stops the peer at once, e.g. \"echo b > /proc/sysrq-trigger\"".into(),
        );
    }
    let hb = config.heartbeat.timeout.0;
    if ssh.confirm_timeout.0 < hb * 2 {
        bad(
            "fencing.ssh.confirm_timeout",
            format!(
                "expected at least {} (two heartbeat timeouts): the fence counts only once the peer stayed silent for heartbeat.timeout after the command",
                HumanDuration(hb * 2)
            ),
        );
    }
}

fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// Splits a kernel command line the way the kernel does: on spaces, with
/// double quotes grouping.
fn split_cmdline(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in text.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    words.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            c => {
                word.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(word);
    }
    words
}

/// Applies `dotted.key=value` to the tree; returns the dotted key.
fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<String, String> {
    let Some((key, raw)) = assignment.split_once('=') else {
        return Err("expected hadb.<dotted.key>=value".into());
    };
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(format!("`{key}` is not a dotted key"));
    }
    // A value that reads as TOML (a number, a boolean, a quoted string, an
    // array) is taken as that; anything else is a bare string, so that
    // `hadb.node=hadb01` works without quotes.
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()));
    let mut cursor = table;
    for part in &parts[..parts.len() - 1] {
        let entry = cursor
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cursor = match entry {
            toml::Value::Table(t) => t,
            _ => return Err(format!("`{part}` in `{key}` is a value, not a table")),
        };
    }
    cursor.insert(parts[parts.len() - 1].to_owned(), value);
    Ok(key.to_owned())
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Dotted key -> line in the file, from the spanned parse.
struct KeyLines {
    lines: BTreeMap<String, usize>,
}

impl KeyLines {
    fn new(text: &str) -> Self {
        let mut lines = BTreeMap::new();
        if let Ok(doc) = toml::de::DeTable::parse(text) {
            collect_lines(text, "", doc.get_ref(), &mut lines);
        }
        KeyLines { lines }
    }

    /// The line of the key or, failing that, of its nearest parent.
    fn line_of_key(&self, key: &str) -> Option<usize> {
        let mut key = key;
        loop {
            if let Some(line) = self.lines.get(key) {
                return Some(*line);
            }
            key = &key[..key.rfind('.')?];
        }
    }
}

fn collect_lines(
    text: &str,
    prefix: &str,
    table: &toml::de::DeTable<'_>,
    out: &mut BTreeMap<String, usize>,
) {
    for (key, value) in table.iter() {
        let dotted = if prefix.is_empty() {
            key.get_ref().to_string()
        } else {
            format!("{prefix}.{}", key.get_ref())
        };
        out.insert(dotted.clone(), line_of(text, key.span().start));
        if let toml::de::DeValue::Table(t) = value.get_ref() {
            collect_lines(text, &dotted, t, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"
cluster = "hadb"
node = "hadb01"
key_file = "/etc/hadb/authkey"

[nodes.hadb01]
address = "10.10.10.4"
[nodes.hadb02]
address = "10.10.10.5"

[volume]
device = "/dev/sdc1"
port = 7789
mode = "sync"
ack_timeout = "10s"
nbd_device = "/dev/nbd0"
nbd_socket = "/run/hadb/volume.sock"

[control]
socket = "/run/hadb/control.sock"
"#;

    fn p(text: &str, cmdline: Option<&str>) -> Result<Config, Error> {
        parse(
            Path::new("/etc/hadb/hadb.toml"),
            text,
            cmdline.map(|c| (Path::new("/proc/cmdline"), c)),
            "myhost",
        )
    }

    #[test]
    fn seed_config_parses() {
        let c = p(SEED, None).unwrap();
        assert_eq!(c.node, "hadb01");
        assert_eq!(c.peer().0, "hadb02");
        assert_eq!(c.volume.mode, Mode::Sync);
        assert_eq!(c.volume.ack_timeout.0, Duration::from_secs(10));
        assert_eq!(c.peer_addr(), "10.10.10.5:7789".parse().unwrap());
        assert_eq!(c.volume.nbd_device.as_deref(), Some(Path::new("/dev/nbd0")));
        assert_eq!(c.state_dir, Path::new("/var/lib/hadb"));
    }

    #[test]
    fn the_state_dir_is_an_absolute_path() {
        let c = p(&format!("state_dir = \"/srv/hadb\"\n{SEED}"), None).unwrap();
        assert_eq!(c.state_dir, Path::new("/srv/hadb"));
        let err = p(SEED, Some("hadb.state_dir=var/lib/hadb"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("key `state_dir`") && err.contains("absolute"),
            "{err}"
        );
    }

    #[test]
    fn cmdline_overrides_any_key() {
        let c = p(
            SEED,
            Some("BOOT_IMAGE=/vmlinuz root=/dev/sda1 hadb.node=hadb02 hadb.volume.port=7790 hadb.volume.mode=\"async\" quiet\n"),
        )
        .unwrap();
        assert_eq!(c.node, "hadb02");
        assert_eq!(c.volume.port, 7790);
        assert_eq!(c.volume.mode, Mode::Async);
        assert_eq!(c.peer().0, "hadb01");
    }

    const WITNESS: &str = "\n[witness]\nnode = \"hadbw\"\naddress = \"10.10.10.6\"\n";

    #[test]
    fn a_witness_needs_no_volume_and_names_itself() {
        let text = format!(
            "cluster = \"hadb\"\nnode = \"hadbw\"\nrole = \"witness\"\n\n[nodes.hadb01]\naddress = \"10.10.10.4\"\n[nodes.hadb02]\naddress = \"10.10.10.5\"\n{WITNESS}"
        );
        let c = p(&text, None).unwrap();
        assert_eq!(c.role, NodeRole::Witness);
        let no_section = text.replace(WITNESS, "");
        let err = p(&no_section, None).unwrap_err().to_string();
        assert!(
            err.contains("key `role`") && err.contains("[witness]"),
            "{err}"
        );
        let other = text.replace("node = \"hadbw\"\nrole", "node = \"w2\"\nrole");
        let err = p(&other, None).unwrap_err().to_string();
        assert!(err.contains("must be the same name"), "{err}");
        // A node of the pair named as the witness is told to say so.
        let err = p(&format!("{SEED}{WITNESS}").replace("hadbw", "hadb01"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("witness.node"), "{err}");
        // A node of the pair still needs its volume.
        let err = p(&SEED.replace("device = \"/dev/sdc1\"", ""), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("volume.device") && err.contains("required"),
            "{err}"
        );
    }

    #[test]
    fn the_watchdog_method_needs_a_witness_an_armed_watchdog_and_a_long_timeout() {
        let methods = "\n[fencing]\nmethods = [\"watchdog\"]\n";
        let err = p(&format!("{SEED}{methods}"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs a [witness]"), "{err}");
        assert!(err.contains("[watchdog] enabled"), "{err}");
        let short = "\n[watchdog]\nenabled = true\ntimeout = \"5s\"\n";
        let err = p(&format!("{SEED}{methods}{WITNESS}{short}"), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("key `watchdog.timeout`") && err.contains("at least 6"),
            "{err}"
        );
        let ok = short.replace("5s", "6s");
        let c = p(&format!("{SEED}{methods}{WITNESS}{ok}"), None).unwrap();
        assert_eq!(c.fencing.methods, vec![FenceMethod::Watchdog]);
    }

    #[test]
    fn node_defaults_to_host_name() {
        let text = SEED.replace("node = \"hadb01\"\n", "");
        let err = p(&text, None).unwrap_err().to_string();
        assert!(err.contains("this node is `myhost`"), "{err}");
        assert!(err.contains("(key not set)"), "{err}");
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text = SEED.replace("port = 7789", "port = 7789\nmdoe = \"sync\"");
        let err = p(&text, None).unwrap_err().to_string();
        assert!(
            err.starts_with("/etc/hadb/hadb.toml:14: key `volume.mdoe`"),
            "{err}"
        );
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn wrong_type_names_line() {
        let text = SEED.replace("port = 7789", "port = \"seven\"");
        let err = p(&text, None).unwrap_err().to_string();
        assert!(
            err.starts_with("/etc/hadb/hadb.toml:13: key `volume.port`"),
            "{err}"
        );
    }

    #[test]
    fn changed_keys_name_each_difference() {
        let a = p(SEED, None).unwrap();
        let b = p(
            &(SEED.replace("mode = \"sync\"", "mode = \"async\"")
                + "\n[manager]\nmaintenance = true\n"),
            None,
        )
        .unwrap();
        let keys: Vec<String> = changed_keys(&a, &b).into_iter().map(|(k, ..)| k).collect();
        assert_eq!(keys, ["manager.maintenance", "volume.mode"]);
        assert!(RELOADABLE.contains(&"manager.maintenance"));
        assert!(!RELOADABLE.contains(&"volume.mode"));
        assert!(changed_keys(&a, &a).is_empty());
    }

    #[test]
    fn bad_mode_and_duration() {
        let err = p(&SEED.replace("mode = \"sync\"", "mode = \"fast\""), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("volume.mode") && err.contains("fast"), "{err}");
        let err = p(&SEED.replace("\"10s\"", "\"10 parsecs\""), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("volume.ack_timeout"), "{err}");
    }

    #[test]
    fn link_timeout_defaults_to_5s_and_refuses_what_would_flap() {
        assert_eq!(
            p(SEED, None).unwrap().volume.link_timeout.0,
            Duration::from_secs(5)
        );
        let with =
            |v: &str| SEED.replace("ack_timeout = \"10s\"", &format!("link_timeout = \"{v}\""));
        assert_eq!(
            p(&with("2s"), None).unwrap().volume.link_timeout.0,
            Duration::from_secs(2)
        );
        for bad in ["500ms", "2h"] {
            let err = p(&with(bad), None).unwrap_err().to_string();
            assert!(
                err.contains("key `volume.link_timeout`") && err.contains("expected 1s to 1h"),
                "{bad}: {err}"
            );
        }
        let c = p(SEED, Some("hadb.volume.link_timeout=3s")).unwrap();
        assert_eq!(c.volume.link_timeout.0, Duration::from_secs(3));
    }

    #[test]
    fn syntax_error_names_line() {
        let text = SEED.replace("[volume]", "[volume");
        let err = p(&text, None).unwrap_err().to_string();
        assert!(
            err.starts_with("/etc/hadb/hadb.toml:11: not valid TOML"),
            "{err}"
        );
    }

    #[test]
    fn cmdline_errors_are_reported_as_cmdline() {
        let err = p(SEED, Some("hadb.volume.prot=1")).unwrap_err().to_string();
        assert!(
            err.starts_with("kernel command line (/proc/cmdline)"),
            "{err}"
        );
        assert!(err.contains("volume.prot"), "{err}");
        let err = p(SEED, Some("hadb.cluster.x=1")).unwrap_err().to_string();
        assert!(err.contains("is a value, not a table"), "{err}");
    }

    #[test]
    fn every_validation_error_at_once() {
        let text = SEED
            .replace("port = 7789", "port = 0")
            .replace("\"/dev/sdc1\"", "\"sdc1\"");
        let err = p(&text, None).unwrap_err();
        let Error::Many(errors) = &err else {
            panic!("expected several errors, got {err}")
        };
        assert_eq!(errors.len(), 2, "{err}");
    }

    #[test]
    fn three_nodes_refused() {
        let text = format!("{SEED}\n[nodes.hadb03]\naddress = \"10.10.10.6\"\n");
        let err = p(&text, None).unwrap_err().to_string();
        assert!(err.contains("expected exactly two nodes"), "{err}");
    }

    #[test]
    fn byte_rates() {
        assert_eq!(ByteRate::parse("100M").unwrap().0, 100 << 20);
        assert_eq!(ByteRate::parse("0").unwrap().0, 0);
        assert_eq!(ByteRate::parse("512k").unwrap().0, 512 << 10);
        assert!(ByteRate::parse("fast").is_err());
        assert!(ByteRate::parse("M").is_err());
        let c = p(
            &SEED.replace("mode = \"sync\"", "mode = \"sync\"\nresync_rate = \"40M\""),
            None,
        )
        .unwrap();
        assert_eq!(c.volume.resync_rate.0, 40 << 20);
    }

    #[test]
    fn durations() {
        assert_eq!(
            HumanDuration::parse("200ms").unwrap().0,
            Duration::from_millis(200)
        );
        assert_eq!(
            HumanDuration::parse("2m").unwrap().0,
            Duration::from_secs(120)
        );
        assert!(HumanDuration::parse("2").is_err());
        assert!(HumanDuration::parse("ms").is_err());
        assert_eq!(
            HumanDuration(Duration::from_millis(1500)).to_string(),
            "1500ms"
        );
    }

    const AZURE: &str = r#"
[fencing]
method = "azure"
[fencing.azure]
auth = "service-principal"
tenant_id = "72f988bf-86f1-41af-91ab-2d7cd011db47"
client_id = "0b5d7c9e-1f0a-4c2b-9f3e-6a7d8e9f0a1b"
client_secret_file = "/etc/hadb/azure-secret"
power_timeout = "90s"
"#;

    #[test]
    fn azure_fencing_parses_with_defaults() {
        let text = format!(
            "{}\n{AZURE}",
            SEED.replace(
                "address = \"10.10.10.5\"",
                "address = \"10.10.10.5\"\nazure_vm = \"hadb02-vm\""
            )
        );
        let c = p(&text, None).unwrap();
        assert_eq!(
            c.fencing.methods,
            [FenceMethod::Azure],
            "`method = \"azure\"` reads as a list of one"
        );
        let az = c.fencing.azure.as_ref().unwrap();
        assert_eq!(az.auth, AzureAuth::ServicePrincipal);
        assert_eq!(az.power_timeout.0, Duration::from_secs(90));
        assert_eq!(az.management_endpoint, "https://management.azure.com");
        assert_eq!(az.metadata_endpoint, "http://169.254.169.254");
        assert_eq!(az.subscription_id, None, "left to the instance metadata");
        assert_eq!(c.azure_vm("hadb02"), "hadb02-vm");
        assert_eq!(c.azure_vm("hadb01"), "hadb01", "defaults to the node name");
    }

    #[test]
    fn azure_method_needs_its_table_and_a_complete_principal() {
        let err = p(&format!("{SEED}\n[fencing]\nmethod = \"azure\"\n"), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("fencing.method") && err.contains("[fencing.azure]"),
            "{err}"
        );
        let text = format!("{SEED}\n{AZURE}").replace("tenant_id = ", "# tenant_id = ");
        let err = p(&text, None).unwrap_err().to_string();
        assert!(err.contains("fencing.azure.tenant_id"), "{err}");
        let text = format!("{SEED}\n{AZURE}").replace(
            "power_timeout",
            "client_certificate_file = \"/etc/hadb/sp.pem\"\npower_timeout",
        );
        let err = p(&text, None).unwrap_err().to_string();
        assert!(err.contains("exactly one of"), "{err}");
    }

    #[test]
    fn azure_endpoints_must_not_send_secrets_in_the_clear() {
        let text =
            format!("{SEED}\n{AZURE}management_endpoint = \"http://management.azure.com\"\n");
        let err = p(&text, None).unwrap_err().to_string();
        assert!(
            err.contains("fencing.azure.management_endpoint") && err.contains("https://"),
            "{err}"
        );
        let text = format!("{SEED}\n{AZURE}metadata_endpoint = \"http://127.0.0.1:8080\"\n");
        assert!(
            p(&text, None).is_ok(),
            "plain HTTP is fine for the metadata service"
        );
    }

    #[test]
    fn azure_names_cannot_change_the_url_path() {
        let text = format!("{SEED}\n{AZURE}resource_group = \"rg/../other\"\n");
        let err = p(&text, None).unwrap_err().to_string();
        assert!(err.contains("fencing.azure.resource_group"), "{err}");
        let err = p(&format!("{SEED}\n{AZURE}unknown_key = 1\n"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("fencing.azure.unknown_key"), "{err}");
    }

    #[test]
    fn a_managed_identity_takes_no_secret() {
        let text = format!("{SEED}\n{AZURE}").replace("service-principal", "managed-identity");
        let err = p(&text, None).unwrap_err().to_string();
        assert!(err.contains("needs none"), "{err}");
    }

    const SSH: &str = r#"
[fencing]
methods = ["azure", "ssh"]
[fencing.azure]
[fencing.ssh]
identity_file = "/etc/hadb/fence_key"
port = 2222
"#;

    #[test]
    fn fence_levels_and_ssh_defaults() {
        let c = p(&format!("{SEED}\n{SSH}"), None).unwrap();
        assert_eq!(c.fencing.methods, [FenceMethod::Azure, FenceMethod::Ssh]);
        let ssh = c.fencing.ssh.as_ref().unwrap();
        assert_eq!(ssh.user, "root");
        assert_eq!(ssh.identity_file, Path::new("/etc/hadb/fence_key"));
        assert_eq!(
            ssh.known_hosts_file,
            Path::new("/etc/hadb/fence_ssh_known_hosts")
        );
        assert_eq!(ssh.port, 2222);
        assert_eq!(ssh.connect_timeout.0, Duration::from_secs(5));
        assert_eq!(ssh.confirm_timeout.0, Duration::from_secs(10));
        assert_eq!(ssh.command, "echo b > /proc/sysrq-trigger");
        assert_eq!(c.ssh_address("hadb02"), Some("10.10.10.5".parse().unwrap()));
        let text = format!("{SEED}\n{SSH}").replace(
            "address = \"10.10.10.5\"",
            "address = \"10.10.10.5\"\nssh_address = \"192.168.7.5\"",
        );
        let c = p(&text, None).unwrap();
        assert_eq!(
            c.ssh_address("hadb02"),
            Some("192.168.7.5".parse().unwrap())
        );
        // The default: the operator confirms.
        assert_eq!(
            p(SEED, None).unwrap().fencing.methods,
            [FenceMethod::Manual]
        );
        // The levels print back as a list, and read back the same.
        let again = toml::to_string(&c).unwrap();
        assert!(again.contains("methods = [\"azure\", \"ssh\"]"), "{again}");
    }

    #[test]
    fn fence_levels_are_refused_when_they_cannot_work() {
        let with = |methods: &str| {
            p(
                &format!("{SEED}\n{SSH}").replace("[\"azure\", \"ssh\"]", methods),
                None,
            )
            .map(|_| ())
            .unwrap_err()
            .to_string()
        };
        assert!(with("[]").contains("at least one method"));
        assert!(with("[\"ssh\", \"ssh\"]").contains("listed twice"));
        assert!(with("[\"manual\", \"ssh\"]").contains("ends the list"));
        let err = with("[\"ssh\", \"fax\"]");
        assert!(
            err.contains("fencing.methods") && err.contains("unknown variant `fax`"),
            "{err}"
        );
        assert!(
            p(
                &format!("{SEED}\n{SSH}").replace("[\"azure\", \"ssh\"]", "[\"ssh\", \"manual\"]"),
                None
            )
            .is_ok(),
            "manual last is fine"
        );
        let err = p(&format!("{SEED}\n[fencing]\nmethods = [\"ssh\"]\n"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[fencing.ssh]"), "{err}");
    }

    #[test]
    fn ssh_settings_that_cannot_work_are_refused() {
        let bad = |from: &str, to: &str| {
            p(&format!("{SEED}\n{SSH}").replace(from, to), None)
                .unwrap_err()
                .to_string()
        };
        let err = bad("port = 2222", "port = 2222\nuser = \"-oProxyCommand=x\"");
        assert!(err.contains("fencing.ssh.user"), "{err}");
        let err = bad("\"/etc/hadb/fence_key\"", "\"fence_key\"");
        assert!(
            err.contains("fencing.ssh.identity_file") && err.contains("absolute"),
            "{err}"
        );
        let err = bad("port = 2222", "port = 2222\nconfirm_timeout = \"1s\"");
        assert!(
            err.contains("fencing.ssh.confirm_timeout") && err.contains("2s"),
            "{err}"
        );
        let err = bad("port = 2222", "port = 2222\ncommand = \" \"");
        assert!(err.contains("fencing.ssh.command"), "{err}");
        let err = bad("port = 2222", "port = 2222\nconnect_timeout = \"500ms\"");
        assert!(err.contains("fencing.ssh.connect_timeout"), "{err}");
    }

    #[test]
    fn quoted_cmdline_words() {
        assert_eq!(
            split_cmdline("a \"b c\" hadb.x=\"y z\"  "),
            vec!["a", "b c", "hadb.x=y z"]
        );
    }
}
