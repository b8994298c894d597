//! The `azure` fence method: Azure Resource Manager powers the peer's VM
//! off, and the fence counts only once the VM's instance view says it is
//! stopped or deallocated.
//!
//! The calls, in the order a fence makes them:
//!
//! 1. A token for the management endpoint: from the instance metadata
//!    service (managed identity; `GET /metadata/identity/oauth2/token`,
//!    header `Metadata: true`) or from the login endpoint (service
//!    principal; client-credentials grant, `POST /{tenant}/oauth2/v2.0/token`
//!    with a secret or a certificate-signed assertion). Cached until near
//!    expiry.
//! 2. Subscription and resource group, when not configured: this VM's own,
//!    from `GET /metadata/instance/compute`.
//! 3. `GET …/virtualMachines/{vm}/instanceView`: the VM exists, the
//!    identity can read it, and whether it is off already.
//! 4. `GET …/virtualMachines/{own vm}/instanceView`: whether this node's
//!    own VM is being powered off. If it is, the peer (or an operator)
//!    fences this node, and the fence stops here: powering the peer off
//!    as well would leave both off (see [`AzureError::BeingFenced`]).
//! 5. `POST …/virtualMachines/{vm}/powerOff?skipShutdown=true`: 200 (done)
//!    or 202 with `Azure-AsyncOperation` (poll it until `status` is
//!    terminal) or else `Location` (poll it while it answers 202), each
//!    poll after `Retry-After` seconds.
//! 6. The instance view again, until `PowerState/stopped` or
//!    `PowerState/deallocated`.
//!
//! Everything runs within `power_timeout`; a 429 waits its `Retry-After`
//! inside that budget. The calls block: the manager's driver runs them on
//! a thread of their own.
//!
//! The decisions that need no network (reading an instance view, an
//! operation's status, a token reply, `Retry-After`, and turning an HTTP
//! status and ARM error body into an [`AzureError`]) are plain functions,
//! tested below.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::config::{AzureAuth, AzureConfig};

/// The instance metadata service's api-versions for the token and the
/// compute metadata (both long stable).
const IMDS_TOKEN_API: &str = "2018-02-01";
const IMDS_COMPUTE_API: &str = "2021-02-01";
/// No single request may take longer than this, whatever the budget left.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How often to poll when Azure does not say (`Retry-After` absent).
const DEFAULT_POLL: Duration = Duration::from_secs(1);
/// A 429 without `Retry-After`: wait this long before trying again.
const DEFAULT_THROTTLE_WAIT: Duration = Duration::from_secs(5);
/// A token is renewed this long before it expires (or at half its life,
/// if that is sooner), so a fence never starts with one about to lapse.
const TOKEN_MARGIN: Duration = Duration::from_secs(300);
/// Replies larger than this are not Azure's.
const BODY_LIMIT: u64 = 1 << 20;

/// A VM's power state, from the `PowerState/…` status of its instance view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PowerState {
    Starting,
    Running,
    /// Powering off; still running code as far as fencing is concerned.
    Stopping,
    /// Off; the VM keeps its host (and is still billed).
    Stopped,
    Deallocating,
    /// Off and released from its host.
    Deallocated,
    /// A state this code does not know, or none reported (e.g. while the
    /// VM is being created); never counts as off.
    Unknown(String),
}

impl PowerState {
    /// Whether the VM can no longer run anything: what a fence waits for.
    pub fn is_off(&self) -> bool {
        matches!(self, PowerState::Stopped | PowerState::Deallocated)
    }

    fn from_code(code: &str) -> PowerState {
        match code {
            "starting" => PowerState::Starting,
            "running" => PowerState::Running,
            "stopping" => PowerState::Stopping,
            "stopped" => PowerState::Stopped,
            "deallocating" => PowerState::Deallocating,
            "deallocated" => PowerState::Deallocated,
            other => PowerState::Unknown(other.to_owned()),
        }
    }
}

impl fmt::Display for PowerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PowerState::Starting => f.write_str("starting"),
            PowerState::Running => f.write_str("running"),
            PowerState::Stopping => f.write_str("stopping"),
            PowerState::Stopped => f.write_str("stopped"),
            PowerState::Deallocating => f.write_str("deallocating"),
            PowerState::Deallocated => f.write_str("deallocated"),
            PowerState::Unknown(s) if s.is_empty() => f.write_str("unknown (none reported)"),
            PowerState::Unknown(s) => write!(f, "unknown ({s})"),
        }
    }
}

/// What a call was for, in the words of the errors and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    PowerOff,
    Start,
}

impl Op {
    fn verb(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::PowerOff => "power off",
            Op::Start => "start",
        }
    }

    /// The Azure RBAC action the call needs.
    fn action(self) -> &'static str {
        match self {
            Op::Read => "Microsoft.Compute/virtualMachines/read",
            Op::PowerOff => "Microsoft.Compute/virtualMachines/powerOff/action",
            Op::Start => "Microsoft.Compute/virtualMachines/start/action",
        }
    }
}

/// Which VM a call was about, for messages that name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub subscription: String,
    pub resource_group: String,
    pub vm: String,
}

#[derive(Debug)]
pub enum AzureError {
    /// Something local is missing; nothing was sent to Azure.
    Setup(String),
    /// The fence was no longer wanted before the power-off was sent (the
    /// peer is heard again); nothing was powered off.
    Abandoned(String),
    /// A configured file could not be used; nothing was sent to Azure.
    File {
        what: &'static str,
        path: PathBuf,
        problem: String,
    },
    /// The secret or key file can be read by others than root.
    /// A secret file failed [`crate::run::secret::read_secret`].
    Secret(crate::run::secret::SecretError),
    /// No token from the instance metadata service.
    NoManagedIdentity { endpoint: String, detail: String },
    /// The login endpoint refused the service principal.
    LoginRefused {
        tenant: String,
        client_id: String,
        status: u16,
        error: String,
        description: String,
    },
    /// This VM's subscription or resource group could not be learnt.
    Metadata { endpoint: String, detail: String },
    /// An endpoint could not be reached or answered nonsense.
    Unreachable { url: String, detail: String },
    /// The management endpoint refused the token itself (401).
    Unauthenticated {
        target: Target,
        /// `code: message` of the ARM error body.
        reason: String,
    },
    /// The identity lacks the role for the call (403).
    Forbidden {
        op: Op,
        target: Target,
        /// `code: message` of the ARM error body.
        reason: String,
    },
    /// The VM, its resource group or the subscription does not exist (404).
    NotFound {
        target: Target,
        /// `code: message` of the ARM error body.
        reason: String,
    },
    /// Still throttled (429) when the budget ran out.
    Throttled { target: Target, waited: Duration },
    /// Azure ran the operation and says it failed or was cancelled.
    OperationFailed {
        op: Op,
        target: Target,
        /// The terminal status and the error, e.g. `Failed (Code: message)`.
        outcome: String,
    },
    /// Any other answer from the management endpoint.
    Api {
        op: Op,
        target: Target,
        status: u16,
        reason: String,
    },
    /// This node's own VM is being powered off (or is off): the peer is
    /// fencing this node. Nothing was asked of the peer's VM. A fence race
    /// (both nodes lost each other, both fence) ends with one survivor
    /// only if the loser does not power the winner off in turn: the
    /// winner's power-off takes seconds (tens of seconds on Azure) to
    /// complete, and until it does the loser still runs its fence.
    BeingFenced {
        /// This node's VM.
        vm: String,
        state: PowerState,
    },
    /// `power_timeout` passed before the VM reached the state asked for.
    Timeout {
        op: Op,
        target: Target,
        after_secs: u64,
        last: Option<PowerState>,
        requested: bool,
    },
}

impl fmt::Display for AzureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "azure fence: ")?;
        match self {
            AzureError::Setup(problem) => f.write_str(problem),
            AzureError::Abandoned(why) => {
                write!(f, "{why}: the power-off was not sent")
            }
            AzureError::File {
                what,
                path,
                problem,
            } => write!(
                f,
                "cannot use the {what} {}: {problem}; fix the file or fencing.azure in the config",
                path.display()
            ),
            AzureError::Secret(e) => write!(f, "{e}; nothing was fenced"),
            AzureError::NoManagedIdentity { endpoint, detail } => write!(
                f,
                "no token from the instance metadata service at {endpoint} ({detail}); give this VM a managed identity (a user-assigned one needs fencing.azure.client_id) or set auth = \"service-principal\""
            ),
            AzureError::LoginRefused {
                tenant,
                client_id,
                status,
                error,
                description,
            } => write!(
                f,
                "the login endpoint refused service principal {client_id} in tenant {tenant} ({status} {error}: {description}); check tenant_id, client_id and the secret or certificate (it may have expired)"
            ),
            AzureError::Metadata { endpoint, detail } => write!(
                f,
                "cannot learn this VM's subscription and resource group from the instance metadata service at {endpoint} ({detail}); set fencing.azure.subscription_id and resource_group"
            ),
            AzureError::Unreachable { url, detail } => write!(
                f,
                "no usable answer from {url} ({detail}); check the endpoint in fencing.azure, the network and, for a private CA, ca_file"
            ),
            AzureError::Unauthenticated { target, reason } => write!(
                f,
                "the management endpoint refused the token for VM {} (401 {reason}); check that management_endpoint and the identity belong to the same cloud and tenant",
                target.vm
            ),
            AzureError::Forbidden { op, target, reason } => write!(
                f,
                "the identity has no permission to {} VM {} in resource group {} (403 {reason}); give it a role with {} on the VM or its resource group (docs/fencing.md has a least-privilege one)",
                op.verb(),
                target.vm,
                target.resource_group,
                op.action()
            ),
            AzureError::NotFound { target, reason } => write!(
                f,
                "VM {} not found in resource group {} of subscription {} (404 {reason}); check the peer's azure_vm in [nodes] and fencing.azure.resource_group and subscription_id",
                target.vm, target.resource_group, target.subscription
            ),
            AzureError::Throttled { target, waited } => write!(
                f,
                "Azure kept throttling the requests about VM {} (429 Too Many Requests) for {}s, past power_timeout; try again later, or raise power_timeout",
                target.vm,
                waited.as_secs()
            ),
            AzureError::OperationFailed {
                op,
                target,
                outcome,
            } => write!(
                f,
                "Azure reports that the {} of VM {} ended {outcome}; the VM may still be running",
                match op {
                    Op::Start => "start",
                    _ => "power-off",
                },
                target.vm
            ),
            AzureError::Api {
                op,
                target,
                status,
                reason,
            } => write!(
                f,
                "cannot {} VM {}: the management endpoint answered {status} ({reason})",
                op.verb(),
                target.vm
            ),
            AzureError::BeingFenced { vm, state } => write!(
                f,
                "this node's own VM {vm} is {state}: the peer (or an operator) is powering this node off, so it does not power the peer off in turn (that would leave both off); nothing was asked of the peer's VM"
            ),
            AzureError::Timeout {
                op,
                target,
                after_secs,
                last,
                requested,
            } => {
                let goal = match op {
                    Op::Start => "running",
                    Op::PowerOff => "stopped or deallocated",
                    Op::Read => "read",
                };
                write!(
                    f,
                    "VM {} was not confirmed {goal} within {}s",
                    target.vm, after_secs
                )?;
                if let Some(last) = last {
                    write!(f, " (last power state: {last})")?;
                }
                if *requested {
                    write!(
                        f,
                        "; the request was accepted, so Azure may still finish it"
                    )?;
                } else {
                    write!(f, "; nothing was requested")?;
                }
                write!(f, "; raise fencing.azure.power_timeout if Azure is slow")
            }
        }
    }
}

impl std::error::Error for AzureError {}

/// An HTTP reply, with the headers the protocol needs.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub retry_after: Option<Duration>,
    pub async_operation: Option<String>,
    pub location: Option<String>,
}

/// An access token and when to stop using it.
#[derive(Debug, Clone)]
struct Token {
    value: String,
    renew_at: Instant,
}

enum Credential {
    ManagedIdentity {
        client_id: Option<String>,
    },
    Secret {
        tenant: String,
        client_id: String,
        secret: String,
    },
    Certificate {
        tenant: String,
        client_id: String,
        cert: Box<assertion::Signer>,
    },
}

/// The `azure` fence of one peer VM.
pub struct AzureFence {
    vm: String,
    /// This node's own VM, looked at before the power-off (step 4 above);
    /// in the peer's subscription and resource group.
    own_vm: Option<String>,
    subscription: Option<String>,
    resource_group: Option<String>,
    credential: Credential,
    metadata: String,
    login: String,
    management: String,
    /// The token audience: the management endpoint itself, so that a
    /// sovereign cloud's endpoint brings its own audience.
    resource: String,
    api_version: String,
    power_timeout: Duration,
    /// For the login and management endpoints: TLS with the built-in
    /// roots and `ca_file`.
    agent: ureq::Agent,
    /// For the metadata service: link-local, never through a proxy.
    imds: ureq::Agent,
    token: Mutex<Option<Token>>,
    located: Mutex<Option<(String, String)>>,
}

/// How long a call may take, and whether passing trouble (a refused
/// connection, a 5xx) is retried or reported at once.
#[derive(Debug, Clone, Copy)]
struct Budget {
    start: Instant,
    deadline: Instant,
    retry: bool,
}

impl Budget {
    fn new(total: Duration, retry: bool) -> Budget {
        let start = Instant::now();
        Budget {
            start,
            deadline: start + total,
            retry,
        }
    }

    fn left(&self) -> Option<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Sleeps `d`, or until the deadline if sooner; false if the deadline
    /// is reached.
    fn sleep(&self, d: Duration) -> bool {
        match self.left() {
            Some(left) if d < left => {
                std::thread::sleep(d);
                true
            }
            Some(left) => {
                std::thread::sleep(left);
                false
            }
            None => false,
        }
    }

    fn request_timeout(&self) -> Duration {
        self.left()
            .unwrap_or(Duration::from_millis(1))
            .min(REQUEST_TIMEOUT)
    }
}

impl AzureFence {
    /// Reads the configured secret, certificate and CA files; sends nothing.
    pub fn new(cfg: &AzureConfig, peer_vm: &str) -> Result<Self, AzureError> {
        let credential = match cfg.auth {
            AzureAuth::ManagedIdentity => Credential::ManagedIdentity {
                client_id: cfg.client_id.clone(),
            },
            AzureAuth::ServicePrincipal => {
                let tenant = cfg.tenant_id.clone().unwrap_or_default();
                let client_id = cfg.client_id.clone().unwrap_or_default();
                match (&cfg.client_secret_file, &cfg.client_certificate_file) {
                    (Some(path), _) => {
                        let bytes = read_private("client secret file", path)?;
                        let secret = String::from_utf8(bytes)
                            .map_err(|_| AzureError::File {
                                what: "client secret file",
                                path: path.clone(),
                                problem: "not UTF-8 text".into(),
                            })?
                            .trim()
                            .to_owned();
                        if secret.is_empty() {
                            return Err(AzureError::File {
                                what: "client secret file",
                                path: path.clone(),
                                problem: "it is empty".into(),
                            });
                        }
                        Credential::Secret {
                            tenant,
                            client_id,
                            secret,
                        }
                    }
                    (None, Some(path)) => {
                        let pem = read_private("client certificate file", path)?;
                        let cert = assertion::Signer::from_pem(&pem).map_err(|problem| {
                            AzureError::File {
                                what: "client certificate file",
                                path: path.clone(),
                                problem,
                            }
                        })?;
                        Credential::Certificate {
                            tenant,
                            client_id,
                            cert: Box::new(cert),
                        }
                    }
                    (None, None) => {
                        return Err(AzureError::Setup(
                            "auth = \"service-principal\" needs client_secret_file or client_certificate_file in [fencing.azure]".into(),
                        ));
                    }
                }
            }
        };
        let mut roots: Vec<ureq::tls::Certificate<'static>> =
            webpki_root_certs::TLS_SERVER_ROOT_CERTS
                .iter()
                .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
                .collect();
        if let Some(path) = &cfg.ca_file {
            roots.extend(read_ca_file(path)?);
        }
        let tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            // ring rather than aws-lc-rs: no cmake or Go to build, and it
            // links into the static musl binary. (ureq marks this setter
            // outside its semver promise; Cargo.lock pins the pair.)
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .root_certs(ureq::tls::RootCerts::new_with_certs(&roots))
            .build();
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            // A redirect would carry the request (and, were ureq to keep
            // it, the token) somewhere not configured.
            .max_redirects(0)
            .user_agent(concat!("hadb/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        let imds = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .proxy(None)
            .user_agent(concat!("hadb/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        let management = cfg.management_endpoint.trim_end_matches('/').to_owned();
        Ok(AzureFence {
            vm: peer_vm.to_owned(),
            own_vm: None,
            subscription: cfg.subscription_id.clone(),
            resource_group: cfg.resource_group.clone(),
            credential,
            metadata: cfg.metadata_endpoint.trim_end_matches('/').to_owned(),
            login: cfg.login_endpoint.trim_end_matches('/').to_owned(),
            resource: format!("{management}/"),
            management,
            api_version: cfg.api_version.clone(),
            power_timeout: cfg.power_timeout.0,
            agent,
            imds,
            token: Mutex::new(None),
            located: Mutex::new(None),
        })
    }

    /// Before each power-off, look at this node's own VM (`own_vm`, in
    /// the peer's subscription and resource group) and give up if it is
    /// being powered off: see [`AzureError::BeingFenced`].
    pub fn with_own_vm(mut self, own_vm: &str) -> Self {
        self.own_vm = Some(own_vm.to_owned());
        self
    }

    /// Powers the VM off without a shutdown and waits until Azure says it
    /// is stopped or deallocated, within `power_timeout`. Refuses, asking
    /// nothing of the peer's VM, when this node's own VM is being powered
    /// off.
    pub fn power_off(&self) -> Result<PowerState, AzureError> {
        self.power_off_unless(&|| None)
    }

    /// `power_off`, but asks `unwanted` just before the one call that
    /// cannot be taken back: a peer heard again while the token and the
    /// instance view were fetched is not powered off (the lab's comparison
    /// runs saw a healthy secondary powered off 0.3 s after its fence had
    /// been called off).
    pub fn power_off_unless(
        &self,
        unwanted: &dyn Fn() -> Option<&'static str>,
    ) -> Result<PowerState, AzureError> {
        let budget = Budget::new(self.power_timeout, true);
        let target = self.target(&budget)?;
        let state = self.instance_view(&target, &budget)?;
        if state.is_off() {
            log::warn!(
                "azure fence: VM {} is {state} already; nothing to power off",
                target.vm
            );
            return Ok(state);
        }
        if let Some(why) = unwanted() {
            return Err(AzureError::Abandoned(why.to_owned()));
        }
        // As late as possible: the peer's power-off of this VM may have
        // been accepted a moment ago.
        self.not_being_fenced(&target, &budget)?;
        log::warn!(
            "azure fence: powering off VM {} in resource group {} without shutdown (it is {state})",
            target.vm,
            target.resource_group
        );
        self.act(Op::PowerOff, &target, &budget)?;
        let state = self.wait_for(Op::PowerOff, &target, &budget, PowerState::is_off)?;
        log::warn!(
            "azure fence: VM {} is {state} after {:.1}s",
            target.vm,
            budget.start.elapsed().as_secs_f64()
        );
        Ok(state)
    }

    /// Starts the VM again (unfence) and waits until it is running.
    pub fn start(&self) -> Result<PowerState, AzureError> {
        let budget = Budget::new(self.power_timeout, true);
        let target = self.target(&budget)?;
        let state = self.instance_view(&target, &budget)?;
        if state == PowerState::Running {
            log::info!("azure fence: VM {} is running already", target.vm);
            return Ok(state);
        }
        log::info!("azure fence: starting VM {} (it is {state})", target.vm);
        self.act(Op::Start, &target, &budget)?;
        let state = self.wait_for(Op::Start, &target, &budget, |s| *s == PowerState::Running)?;
        log::info!(
            "azure fence: VM {} is running after {:.1}s",
            target.vm,
            budget.start.elapsed().as_secs_f64()
        );
        Ok(state)
    }

    /// What `hadb fence test` checks: a token, then the VM's instance view.
    /// Changes nothing; reports trouble at once instead of retrying it.
    pub fn test(&self) -> Result<PowerState, AzureError> {
        let budget = Budget::new(self.power_timeout, false);
        self.token(&budget)?;
        log::info!("azure fence: test: got a token for {}", self.resource);
        let target = self.target(&budget)?;
        let state = self.instance_view(&target, &budget)?;
        log::info!(
            "azure fence: test: VM {} in resource group {} is {state}",
            target.vm,
            target.resource_group
        );
        Ok(state)
    }

    /// Err([`AzureError::BeingFenced`]) when this node's own VM is going
    /// down or down. When its state cannot be read (no read permission on
    /// it, another resource group), the fence goes on as it did without
    /// this check, and says so.
    fn not_being_fenced(&self, peer: &Target, budget: &Budget) -> Result<(), AzureError> {
        let Some(vm) = &self.own_vm else {
            return Ok(());
        };
        let me = Target {
            vm: vm.clone(),
            ..peer.clone()
        };
        match self.instance_view(&me, budget) {
            Ok(state) if going_down(&state) => Err(AzureError::BeingFenced {
                vm: vm.clone(),
                state,
            }),
            Ok(_) => Ok(()),
            Err(e) => {
                log::warn!(
                    "azure fence: cannot read this node's own VM {vm} ({e}); fencing the peer without knowing whether this node is being fenced itself"
                );
                Ok(())
            }
        }
    }

    /// The VM's power state now.
    pub fn power_state(&self) -> Result<PowerState, AzureError> {
        let budget = Budget::new(self.power_timeout, false);
        let target = self.target(&budget)?;
        self.instance_view(&target, &budget)
    }

    fn vm_url(&self, target: &Target, suffix: &str) -> String {
        format!(
            "{}/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines/{}/{suffix}?api-version={}",
            self.management,
            enc(&target.subscription),
            enc(&target.resource_group),
            enc(&target.vm),
            enc(&self.api_version)
        )
    }

    fn instance_view(&self, target: &Target, budget: &Budget) -> Result<PowerState, AzureError> {
        let url = self.vm_url(target, "instanceView");
        let reply = self.arm(Op::Read, "GET", &url, target, budget, false)?;
        if reply.status != 200 {
            return Err(classify(reply.status, &reply.body, Op::Read, target));
        }
        parse_power_state(&reply.body).map_err(|detail| AzureError::Unreachable { url, detail })
    }

    /// Sends the power-off or start and follows it until Azure says it is
    /// done.
    fn act(&self, op: Op, target: &Target, budget: &Budget) -> Result<(), AzureError> {
        let url = match op {
            Op::PowerOff => format!("{}&skipShutdown=true", self.vm_url(target, "powerOff")),
            _ => self.vm_url(target, "start"),
        };
        let reply = self.arm(op, "POST", &url, target, budget, true)?;
        match reply.status {
            200 | 204 => Ok(()),
            201 | 202 => self.follow(op, target, budget, &reply),
            status => Err(classify(status, &reply.body, op, target)),
        }
    }

    /// Polls an accepted operation until it ends.
    fn follow(
        &self,
        op: Op,
        target: &Target,
        budget: &Budget,
        accepted: &Reply,
    ) -> Result<(), AzureError> {
        let (url, by_status) = match (&accepted.async_operation, &accepted.location) {
            (Some(url), _) => (url.clone(), true),
            (None, Some(url)) => (url.clone(), false),
            // Nothing to follow: the instance view will tell.
            (None, None) => return Ok(()),
        };
        if !same_origin(&self.management, &url) {
            return Err(AzureError::Unreachable {
                url,
                detail: format!(
                    "the operation to follow is not on the management endpoint {}; the token is not sent elsewhere",
                    self.management
                ),
            });
        }
        log::info!(
            "azure fence: Azure accepted the {} of VM {}; following the operation",
            op.verb(),
            target.vm
        );
        let mut wait = accepted.retry_after.unwrap_or(DEFAULT_POLL);
        loop {
            if !budget.sleep(wait) {
                return Err(self.timeout(op, target, budget, None, true));
            }
            let reply = self.arm(op, "GET", &url, target, budget, true)?;
            wait = reply.retry_after.unwrap_or(DEFAULT_POLL);
            match (by_status, reply.status) {
                (true, 200) => match parse_operation(&reply.body) {
                    Operation::InProgress => {}
                    Operation::Succeeded => return Ok(()),
                    Operation::Ended { status, reason } => {
                        return Err(AzureError::OperationFailed {
                            op,
                            target: target.clone(),
                            outcome: format!("{status} ({reason})"),
                        });
                    }
                },
                (false, 202) => {}
                (false, 200 | 204) => return Ok(()),
                // Azure took the power-off; only following it is refused
                // (a role scoped to the VM lacks the operation read). The
                // instance view, which the fence waits for anyway, tells.
                (_, 401 | 403 | 404) => {
                    log::warn!(
                        "azure fence: cannot follow the {} of VM {} ({}: {}); watching the VM's instance view instead (give the role Microsoft.Compute/locations/operations/read on the subscription to follow it)",
                        op.verb(),
                        target.vm,
                        reply.status,
                        arm_error_in(&serde_json::from_str(&reply.body).unwrap_or(Value::Null))
                    );
                    return Ok(());
                }
                (_, status) => return Err(classify(status, &reply.body, op, target)),
            }
        }
    }

    /// Reads the instance view until `done` says so, or the budget ends.
    fn wait_for(
        &self,
        op: Op,
        target: &Target,
        budget: &Budget,
        done: impl Fn(&PowerState) -> bool,
    ) -> Result<PowerState, AzureError> {
        let mut last: Option<PowerState> = None;
        loop {
            let state = match self.instance_view(target, budget) {
                Ok(s) => s,
                Err(AzureError::Timeout { .. }) => {
                    return Err(self.timeout(op, target, budget, last, true));
                }
                Err(e) => return Err(e),
            };
            if done(&state) {
                return Ok(state);
            }
            if last.as_ref() != Some(&state) {
                log::info!("azure fence: VM {} is {state}; waiting", target.vm);
            }
            last = Some(state);
            if !budget.sleep(DEFAULT_POLL) {
                return Err(self.timeout(op, target, budget, last, true));
            }
        }
    }

    fn timeout(
        &self,
        op: Op,
        target: &Target,
        budget: &Budget,
        last: Option<PowerState>,
        requested: bool,
    ) -> AzureError {
        AzureError::Timeout {
            op,
            target: target.clone(),
            after_secs: (budget.deadline - budget.start).as_secs(),
            last,
            requested,
        }
    }

    /// One management request with a token: a 401 renews the token once,
    /// a 429 waits its `Retry-After`, and with `budget.retry` passing
    /// trouble is retried; all within the budget. `requested`: whether a
    /// change has been asked for already (for the timeout's message).
    fn arm(
        &self,
        op: Op,
        method: &str,
        url: &str,
        target: &Target,
        budget: &Budget,
        requested: bool,
    ) -> Result<Reply, AzureError> {
        let mut renewed = false;
        let mut throttled = Duration::ZERO;
        let mut backoff = Duration::from_millis(500);
        loop {
            let token = self.token(budget)?;
            if budget.left().is_none() {
                return Err(self.timeout(op, target, budget, None, requested));
            }
            let auth = format!("Bearer {token}");
            let sent = exchange(
                &self.agent,
                method,
                url,
                &[("Authorization", &auth)],
                &[],
                budget.request_timeout(),
            );
            let reply = match sent {
                Ok(r) => r,
                Err(detail) if budget.retry => {
                    log::warn!("azure fence: {url}: {detail}; trying again");
                    if !budget.sleep(backoff) {
                        return Err(self.timeout(op, target, budget, None, requested));
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
                Err(detail) => {
                    return Err(AzureError::Unreachable {
                        url: url.to_owned(),
                        detail,
                    });
                }
            };
            match reply.status {
                401 if !renewed => {
                    log::warn!("azure fence: the token was refused (401); getting a new one");
                    *crate::run::manager::lock(&self.token) = None;
                    renewed = true;
                }
                429 => {
                    let wait = reply.retry_after.unwrap_or(DEFAULT_THROTTLE_WAIT);
                    if budget.left().is_none_or(|left| left <= wait) {
                        return Err(AzureError::Throttled {
                            target: target.clone(),
                            waited: throttled,
                        });
                    }
                    log::warn!(
                        "azure fence: Azure throttles requests (429); waiting {}s as its Retry-After says",
                        wait.as_secs_f64()
                    );
                    std::thread::sleep(wait);
                    throttled += wait;
                }
                500 | 502 | 503 | 504 if budget.retry => {
                    log::warn!("azure fence: {url} answered {}; trying again", reply.status);
                    if !budget.sleep(reply.retry_after.unwrap_or(backoff)) {
                        return Err(self.timeout(op, target, budget, None, requested));
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                _ => return Ok(reply),
            }
        }
    }

    /// The subscription and resource group: configured, or this VM's own.
    fn target(&self, budget: &Budget) -> Result<Target, AzureError> {
        let (subscription, resource_group) = match (&self.subscription, &self.resource_group) {
            (Some(s), Some(r)) => (s.clone(), r.clone()),
            (s, r) => {
                let (meta_s, meta_r) = self.located(budget)?;
                (s.clone().unwrap_or(meta_s), r.clone().unwrap_or(meta_r))
            }
        };
        Ok(Target {
            subscription,
            resource_group,
            vm: self.vm.clone(),
        })
    }

    fn located(&self, budget: &Budget) -> Result<(String, String), AzureError> {
        if let Some(found) = crate::run::manager::lock(&self.located).clone() {
            return Ok(found);
        }
        let url = format!(
            "{}/metadata/instance/compute?api-version={IMDS_COMPUTE_API}",
            self.metadata
        );
        let fail = |detail: String| AzureError::Metadata {
            endpoint: self.metadata.clone(),
            detail,
        };
        let reply = self
            .imds_get(&url, budget)
            .map_err(|(status, detail)| fail(http_detail(status, &detail)))?;
        let found = parse_compute(&reply.body).map_err(fail)?;
        log::info!(
            "azure fence: this VM is in subscription {} and resource group {} (instance metadata); the peer's VM is looked for there",
            found.0,
            found.1
        );
        *crate::run::manager::lock(&self.located) = Some(found.clone());
        Ok(found)
    }

    /// A GET on the metadata service; the error is (status, detail), status
    /// 0 when nothing answered. Retries what the service says is passing.
    fn imds_get(&self, url: &str, budget: &Budget) -> Result<Reply, (u16, String)> {
        let mut backoff = Duration::from_millis(500);
        loop {
            let sent = exchange(
                &self.imds,
                "GET",
                url,
                &[("Metadata", "true")],
                &[],
                budget.request_timeout(),
            );
            let passing = match &sent {
                Ok(r) if r.status == 200 => return sent.map_err(|d| (0, d)),
                // The identity may be being assigned right now (404, 410),
                // or the service is busy.
                Ok(r) => matches!(r.status, 404 | 410 | 429 | 500..=599),
                Err(_) => true,
            };
            let wait = match &sent {
                Ok(r) => r.retry_after.unwrap_or(backoff),
                Err(_) => backoff,
            };
            if !(passing && budget.retry && budget.sleep(wait)) {
                return match sent {
                    Ok(r) => Err((r.status, r.body)),
                    Err(d) => Err((0, d)),
                };
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// A token for the management endpoint, from the cache if still good.
    fn token(&self, budget: &Budget) -> Result<String, AzureError> {
        if let Some(t) = &*crate::run::manager::lock(&self.token)
            && Instant::now() < t.renew_at
        {
            return Ok(t.value.clone());
        }
        let (value, lifetime) = match &self.credential {
            Credential::ManagedIdentity { client_id } => {
                let mut url = format!(
                    "{}/metadata/identity/oauth2/token?api-version={IMDS_TOKEN_API}&resource={}",
                    self.metadata,
                    enc(&self.resource)
                );
                if let Some(id) = client_id {
                    url.push_str(&format!("&client_id={}", enc(id)));
                }
                let reply = self.imds_get(&url, budget).map_err(|(status, body)| {
                    AzureError::NoManagedIdentity {
                        endpoint: self.metadata.clone(),
                        detail: http_detail(status, &body),
                    }
                })?;
                parse_token(&reply.body).map_err(|detail| AzureError::NoManagedIdentity {
                    endpoint: self.metadata.clone(),
                    detail,
                })?
            }
            Credential::Secret {
                tenant,
                client_id,
                secret,
            } => self.login_token(tenant, client_id, &[("client_secret", secret)], budget)?,
            Credential::Certificate {
                tenant,
                client_id,
                cert,
            } => {
                let token_url = self.login_url(tenant);
                let jwt = cert
                    .assertion(client_id, &token_url, unix_now())
                    .map_err(AzureError::Setup)?;
                self.login_token(
                    tenant,
                    client_id,
                    &[
                        (
                            "client_assertion_type",
                            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                        ),
                        ("client_assertion", &jwt),
                    ],
                    budget,
                )?
            }
        };
        let margin = TOKEN_MARGIN.min(lifetime / 2);
        *crate::run::manager::lock(&self.token) = Some(Token {
            value: value.clone(),
            renew_at: Instant::now() + lifetime - margin,
        });
        Ok(value)
    }

    fn login_url(&self, tenant: &str) -> String {
        format!("{}/{}/oauth2/v2.0/token", self.login, enc(tenant))
    }

    fn login_token(
        &self,
        tenant: &str,
        client_id: &str,
        proof: &[(&str, &str)],
        budget: &Budget,
    ) -> Result<(String, Duration), AzureError> {
        let url = self.login_url(tenant);
        let scope = format!("{}.default", self.resource);
        let mut form: Vec<(&str, &str)> = vec![
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("scope", &scope),
        ];
        form.extend_from_slice(proof);
        let mut backoff = Duration::from_millis(500);
        loop {
            let sent = exchange(
                &self.agent,
                "POST",
                &url,
                &[],
                &form,
                budget.request_timeout(),
            );
            match sent {
                Ok(r) if r.status == 200 => {
                    return parse_token(&r.body).map_err(|detail| AzureError::Unreachable {
                        url: url.clone(),
                        detail,
                    });
                }
                Ok(r) if !(r.status == 429 || r.status >= 500) || !budget.retry => {
                    let (error, description) = parse_login_error(&r.body);
                    return Err(AzureError::LoginRefused {
                        tenant: tenant.to_owned(),
                        client_id: client_id.to_owned(),
                        status: r.status,
                        error,
                        description,
                    });
                }
                Err(detail) if !budget.retry => {
                    return Err(AzureError::Unreachable { url, detail });
                }
                Ok(r) => {
                    log::warn!("azure fence: {url} answered {}; trying again", r.status);
                    if !budget.sleep(r.retry_after.unwrap_or(backoff)) {
                        return Err(AzureError::Unreachable {
                            url,
                            detail: format!("still {} at power_timeout", r.status),
                        });
                    }
                }
                Err(detail) => {
                    log::warn!("azure fence: {url}: {detail}; trying again");
                    if !budget.sleep(backoff) {
                        return Err(AzureError::Unreachable { url, detail });
                    }
                }
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

/// Sends one request; a transport failure comes back as text.
fn exchange(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    form: &[(&str, &str)],
    timeout: Duration,
) -> Result<Reply, String> {
    let sent = if method == "GET" {
        let mut req = agent
            .get(url)
            .config()
            .timeout_global(Some(timeout))
            .build();
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.call()
    } else {
        let mut req = agent
            .post(url)
            .config()
            .timeout_global(Some(timeout))
            .build();
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if form.is_empty() {
            req.send_empty()
        } else {
            req.send_form(form.iter().copied())
        }
    };
    let mut response = sent.map_err(|e| match e {
        ureq::Error::Timeout(what) => {
            format!("no answer within {}s ({what})", timeout.as_secs_f64())
        }
        other => other.to_string(),
    })?;
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let retry_after = header("retry-after").and_then(|v| parse_retry_after(&v));
    let async_operation = header("azure-asyncoperation");
    let location = header("location");
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(BODY_LIMIT)
        .read_to_string()
        .map_err(|e| format!("reading the {status} reply: {e}"))?;
    Ok(Reply {
        status,
        body,
        retry_after,
        async_operation,
        location,
    })
}

/// Reads a file that holds a secret ([`crate::run::secret`]).
fn read_private(what: &'static str, path: &Path) -> Result<Vec<u8>, AzureError> {
    crate::run::secret::read_secret(what, path).map_err(AzureError::Secret)
}

fn read_ca_file(path: &Path) -> Result<Vec<ureq::tls::Certificate<'static>>, AzureError> {
    let fail = |problem: String| AzureError::File {
        what: "CA file",
        path: path.to_owned(),
        problem,
    };
    let pem = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c),
            Ok(_) => {}
            Err(e) => return Err(fail(e.to_string())),
        }
    }
    if certs.is_empty() {
        return Err(fail("no PEM certificate in it".into()));
    }
    Ok(certs)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn http_detail(status: u16, body: &str) -> String {
    if status == 0 {
        return body.to_owned();
    }
    let (error, description) = parse_login_error(body);
    if error.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status} {error}: {description}")
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters, for
/// path segments and query values alike.
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether `url` is on the same scheme, host and port as `base`.
pub fn same_origin(base: &str, url: &str) -> bool {
    fn origin(u: &str) -> Option<(&str, &str)> {
        let (scheme, rest) = u.split_once("://")?;
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        Some((scheme, &rest[..end]))
    }
    match (origin(base), origin(url)) {
        (Some((s1, h1)), Some((s2, h2))) => {
            s1.eq_ignore_ascii_case(s2) && h1.eq_ignore_ascii_case(h2)
        }
        _ => false,
    }
}

/// `Retry-After` as ARM sends it: whole seconds. (The HTTP-date form is
/// not used by Azure; it reads as absent, and the default wait applies.)
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let secs: u64 = value.trim().parse().ok()?;
    Some(Duration::from_secs(secs.min(3600)))
}

/// The power state in an instance view (`statuses[].code` =
/// `PowerState/…`).
/// A power state that means the VM is being (or has been) powered off:
/// for this node's own VM, that someone is fencing it.
pub fn going_down(state: &PowerState) -> bool {
    matches!(
        state,
        PowerState::Stopping
            | PowerState::Stopped
            | PowerState::Deallocating
            | PowerState::Deallocated
    )
}

pub fn parse_power_state(body: &str) -> Result<PowerState, String> {
    let v: Value =
        serde_json::from_str(body).map_err(|e| format!("the instance view is not JSON: {e}"))?;
    let Some(statuses) = v.get("statuses").and_then(Value::as_array) else {
        return Err("the instance view has no `statuses`".into());
    };
    Ok(statuses
        .iter()
        .filter_map(|s| s.get("code").and_then(Value::as_str))
        .find_map(|c| c.strip_prefix("PowerState/"))
        .map(PowerState::from_code)
        .unwrap_or(PowerState::Unknown(String::new())))
}

/// An asynchronous operation's `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    InProgress,
    Succeeded,
    /// `Failed`, `Canceled`: terminal, and not what was asked.
    Ended {
        status: String,
        reason: String,
    },
}

/// Reads an `Azure-AsyncOperation` status body. Only `Succeeded`,
/// `Failed` and `Canceled` are terminal; anything else is still running.
pub fn parse_operation(body: &str) -> Operation {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let status = v.get("status").and_then(Value::as_str).unwrap_or("");
    match status {
        s if s.eq_ignore_ascii_case("Succeeded") => Operation::Succeeded,
        s if s.eq_ignore_ascii_case("Failed") || s.eq_ignore_ascii_case("Canceled") => {
            let reason = arm_error_in(&v);
            Operation::Ended {
                status: s.to_owned(),
                reason,
            }
        }
        _ => Operation::InProgress,
    }
}

/// An access token and its lifetime from a token reply. The metadata
/// service writes `expires_in` as a string, the login endpoint as a
/// number.
pub fn parse_token(body: &str) -> Result<(String, Duration), String> {
    let v: Value =
        serde_json::from_str(body).map_err(|e| format!("the token reply is not JSON: {e}"))?;
    let token = v
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or("the token reply has no access_token")?;
    let secs = match v.get("expires_in") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    }
    .ok_or("the token reply has no expires_in")?;
    Ok((token.to_owned(), Duration::from_secs(secs)))
}

/// `subscriptionId` and `resourceGroupName` from the compute metadata.
pub fn parse_compute(body: &str) -> Result<(String, String), String> {
    let v: Value =
        serde_json::from_str(body).map_err(|e| format!("the compute metadata is not JSON: {e}"))?;
    let field = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or(format!("the compute metadata has no {k}"))
    };
    Ok((field("subscriptionId")?, field("resourceGroupName")?))
}

/// `error` and `error_description` of an OAuth error reply (login
/// endpoint, metadata service).
fn parse_login_error(body: &str) -> (String, String) {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let description = s("error_description");
    // The description runs on with a trace and a timestamp; its first
    // line says what is wrong.
    let description = description.lines().next().unwrap_or("").to_owned();
    (s("error"), description)
}

/// `code: message` from an ARM error body's `error`.
fn arm_error_in(v: &Value) -> String {
    let e = v.get("error");
    let s = |k: &str| {
        e.and_then(|e| e.get(k))
            .and_then(Value::as_str)
            .unwrap_or("")
    };
    match (s("code"), s("message")) {
        ("", "") => "no error details".into(),
        (code, "") => code.to_owned(),
        ("", message) => message.to_owned(),
        (code, message) => format!("{code}: {message}"),
    }
}

/// Turns a management endpoint's answer that is not a success into the
/// error an operator can act on.
pub fn classify(status: u16, body: &str, op: Op, target: &Target) -> AzureError {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let reason = arm_error_in(&v);
    let target = target.clone();
    match status {
        401 => AzureError::Unauthenticated { target, reason },
        403 => AzureError::Forbidden { op, target, reason },
        404 => AzureError::NotFound { target, reason },
        429 => AzureError::Throttled {
            target,
            waited: Duration::ZERO,
        },
        _ => AzureError::Api {
            op,
            target,
            status,
            reason,
        },
    }
}

/// The client assertion of a certificate credential: a JWT signed RS256
/// with the certificate's key, naming the certificate by its thumbprint.
mod assertion {
    use ring::rand::SystemRandom;
    use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    pub struct Signer {
        key: RsaKeyPair,
        /// base64url SHA-1 and SHA-256 of the certificate's DER.
        x5t: String,
        x5t_s256: String,
    }

    impl Signer {
        /// From a PEM file holding the certificate and its RSA key.
        pub fn from_pem(pem: &[u8]) -> Result<Signer, String> {
            let cert = CertificateDer::pem_slice_iter(pem)
                .next()
                .ok_or("no CERTIFICATE in it")?
                .map_err(|e| format!("its certificate: {e}"))?;
            let key = PrivateKeyDer::from_pem_slice(pem)
                .map_err(|e| format!("no usable private key in it: {e}"))?;
            let key = match &key {
                PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
                PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
                _ => return Err("the private key must be RSA (PKCS#8 or PKCS#1)".into()),
            }
            .map_err(|e| format!("the private key is not a usable RSA key: {e}"))?;
            let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &cert);
            let sha256 = ring::digest::digest(&ring::digest::SHA256, &cert);
            Ok(Signer {
                key,
                x5t: b64url(sha1.as_ref()),
                x5t_s256: b64url(sha256.as_ref()),
            })
        }

        /// A fresh assertion for `audience` (the token URL), valid ten
        /// minutes from `now` (Unix seconds).
        pub fn assertion(
            &self,
            client_id: &str,
            audience: &str,
            now: u64,
        ) -> Result<String, String> {
            let rng = SystemRandom::new();
            let mut jti = [0u8; 16];
            ring::rand::SecureRandom::fill(&rng, &mut jti)
                .map_err(|_| "no randomness for the assertion's id".to_owned())?;
            let header = serde_json::json!({
                "alg": "RS256",
                "typ": "JWT",
                "x5t": self.x5t,
                "x5t#S256": self.x5t_s256,
            });
            let claims = serde_json::json!({
                "aud": audience,
                "iss": client_id,
                "sub": client_id,
                "jti": b64url(&jti),
                "nbf": now,
                "iat": now,
                "exp": now + 600,
            });
            let signing_input = format!(
                "{}.{}",
                b64url(header.to_string().as_bytes()),
                b64url(claims.to_string().as_bytes())
            );
            let mut sig = vec![0u8; self.key.public().modulus_len()];
            self.key
                .sign(&RSA_PKCS1_SHA256, &rng, signing_input.as_bytes(), &mut sig)
                .map_err(|_| "cannot sign the assertion with the certificate's key".to_owned())?;
            Ok(format!("{signing_input}.{}", b64url(&sig)))
        }
    }

    /// base64url without padding (RFC 7515 §2).
    pub fn b64url(data: &[u8]) -> String {
        const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
        for chunk in data.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn base64url_matches_rfc4648_vectors() {
            assert_eq!(b64url(b""), "");
            assert_eq!(b64url(b"f"), "Zg");
            assert_eq!(b64url(b"fo"), "Zm8");
            assert_eq!(b64url(b"foo"), "Zm9v");
            assert_eq!(b64url(b"foob"), "Zm9vYg");
            assert_eq!(b64url(b"fooba"), "Zm9vYmE");
            assert_eq!(b64url(b"foobar"), "Zm9vYmFy");
            assert_eq!(b64url(&[0xfb, 0xff]), "-_8");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            subscription: "sub-1".into(),
            resource_group: "rg".into(),
            vm: "hadb02".into(),
        }
    }

    #[test]
    fn power_state_is_read_from_the_power_status_whatever_its_position() {
        let body = r#"{"computerName":"hadb02","statuses":[
            {"code":"ProvisioningState/succeeded","level":"Info","displayStatus":"Provisioning succeeded"},
            {"code":"PowerState/deallocated","level":"Info","displayStatus":"VM deallocated"}]}"#;
        assert_eq!(parse_power_state(body), Ok(PowerState::Deallocated));
        let body = r#"{"statuses":[{"code":"PowerState/stopping"},{"code":"ProvisioningState/updating"}]}"#;
        let s = parse_power_state(body).unwrap();
        assert_eq!(s, PowerState::Stopping);
        assert!(!s.is_off(), "stopping still runs code");
        assert!(PowerState::Stopped.is_off());
    }

    #[test]
    fn no_or_an_unknown_power_state_never_counts_as_off() {
        let s =
            parse_power_state(r#"{"statuses":[{"code":"ProvisioningState/creating"}]}"#).unwrap();
        assert_eq!(s, PowerState::Unknown(String::new()));
        assert!(!s.is_off());
        let s = parse_power_state(r#"{"statuses":[{"code":"PowerState/hibernated"}]}"#).unwrap();
        assert_eq!(s, PowerState::Unknown("hibernated".into()));
        assert!(!s.is_off());
        assert!(parse_power_state("<html>").is_err());
        assert!(parse_power_state(r#"{"error":{}}"#).is_err());
    }

    #[test]
    fn a_vm_stopping_counts_as_being_fenced_but_not_as_off() {
        for (code, down, off) in [
            ("running", false, false),
            ("starting", false, false),
            ("stopping", true, false),
            ("stopped", true, true),
            ("deallocating", true, false),
            ("deallocated", true, true),
            ("hibernated", false, false),
        ] {
            let body = format!(r#"{{"statuses":[{{"code":"PowerState/{code}"}}]}}"#);
            let s = parse_power_state(&body).unwrap();
            assert_eq!(going_down(&s), down, "{code}");
            assert_eq!(s.is_off(), off, "{code}");
        }
    }

    #[test]
    fn operation_status_is_terminal_only_when_azure_says_so() {
        assert_eq!(
            parse_operation(r#"{"status":"InProgress"}"#),
            Operation::InProgress
        );
        assert_eq!(
            parse_operation(r#"{"status":"Succeeded","endTime":"x"}"#),
            Operation::Succeeded
        );
        assert_eq!(
            parse_operation(r#"{"status":"Running"}"#),
            Operation::InProgress,
            "an unknown status is not terminal"
        );
        assert_eq!(
            parse_operation(
                r#"{"status":"Failed","error":{"code":"InternalExecutionError","message":"boom"}}"#
            ),
            Operation::Ended {
                status: "Failed".into(),
                reason: "InternalExecutionError: boom".into()
            }
        );
        assert!(matches!(
            parse_operation(r#"{"status":"Canceled"}"#),
            Operation::Ended { .. }
        ));
    }

    #[test]
    fn retry_after_is_whole_seconds() {
        assert_eq!(parse_retry_after("17"), Some(Duration::from_secs(17)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(
            parse_retry_after("999999"),
            Some(Duration::from_secs(3600)),
            "bounded"
        );
    }

    #[test]
    fn tokens_from_both_issuers() {
        let imds = r#"{"access_token":"eyJ0","refresh_token":"","expires_in":"3599","expires_on":"1506484173","resource":"https://management.azure.com/","token_type":"Bearer"}"#;
        assert_eq!(
            parse_token(imds),
            Ok(("eyJ0".into(), Duration::from_secs(3599)))
        );
        let login = r#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"eyJ1"}"#;
        assert_eq!(
            parse_token(login),
            Ok(("eyJ1".into(), Duration::from_secs(3599)))
        );
        assert!(parse_token(r#"{"access_token":"","expires_in":1}"#).is_err());
        assert!(parse_token(r#"{"access_token":"x"}"#).is_err());
    }

    #[test]
    fn a_403_names_the_role_and_the_action() {
        let body = r#"{"error":{"code":"AuthorizationFailed","message":"The client 'x' does not have authorization to perform action 'Microsoft.Compute/virtualMachines/powerOff/action'"}}"#;
        let e = classify(403, body, Op::PowerOff, &target());
        assert!(matches!(e, AzureError::Forbidden { .. }));
        let text = e.to_string();
        assert!(
            text.contains("Microsoft.Compute/virtualMachines/powerOff/action"),
            "{text}"
        );
        assert!(
            text.contains("power off VM hadb02 in resource group rg"),
            "{text}"
        );
        assert!(text.contains("403 AuthorizationFailed"), "{text}");
    }

    #[test]
    fn a_404_says_where_it_looked() {
        let body = r#"{"error":{"code":"ResourceNotFound","message":"The Resource 'Microsoft.Compute/virtualMachines/hadb02' under resource group 'rg' was not found."}}"#;
        let text = classify(404, body, Op::Read, &target()).to_string();
        assert!(text.contains("VM hadb02 not found in resource group rg of subscription sub-1"));
        assert!(text.contains("azure_vm"), "{text}");
        let e = classify(
            401,
            r#"{"error":{"code":"InvalidAuthenticationToken","message":"m"}}"#,
            Op::Read,
            &target(),
        );
        assert!(matches!(e, AzureError::Unauthenticated { .. }));
        let e = classify(409, "not json", Op::Start, &target());
        assert!(matches!(e, AzureError::Api { status: 409, .. }), "{e}");
    }

    #[test]
    fn a_timeout_says_whether_anything_was_asked() {
        let e = AzureError::Timeout {
            op: Op::PowerOff,
            target: target(),
            after_secs: 120,
            last: Some(PowerState::Stopping),
            requested: true,
        };
        let text = e.to_string();
        assert!(
            text.contains("not confirmed stopped or deallocated within 120s"),
            "{text}"
        );
        assert!(text.contains("last power state: stopping"), "{text}");
        assert!(text.contains("may still finish"), "{text}");
    }

    #[test]
    fn the_token_goes_only_to_the_management_endpoint() {
        let base = "https://management.azure.com";
        assert!(same_origin(
            base,
            "https://management.azure.com/subscriptions/s/providers/Microsoft.Compute/locations/westeurope/operations/1?api-version=2024-07-01"
        ));
        assert!(same_origin(
            "https://127.0.0.1:8443",
            "https://127.0.0.1:8443/x"
        ));
        assert!(!same_origin(
            base,
            "https://management.azure.com.evil.example/x"
        ));
        assert!(!same_origin(base, "http://management.azure.com/x"));
        assert!(!same_origin(
            "https://127.0.0.1:8443",
            "https://127.0.0.1:9443/x"
        ));
        assert!(!same_origin(base, "/relative"));
    }

    #[test]
    fn names_are_escaped_in_urls() {
        assert_eq!(enc("rg-1_a.b~"), "rg-1_a.b~");
        assert_eq!(enc("rg (x)/y"), "rg%20%28x%29%2Fy");
        assert_eq!(
            enc("https://management.azure.com/"),
            "https%3A%2F%2Fmanagement.azure.com%2F"
        );
    }

    #[test]
    fn compute_metadata_gives_subscription_and_group() {
        let body = r#"{"location":"westeurope","name":"hadb01","resourceGroupName":"rg","subscriptionId":"sub-1","vmId":"x"}"#;
        assert_eq!(parse_compute(body), Ok(("sub-1".into(), "rg".into())));
        assert!(parse_compute(r#"{"name":"hadb01"}"#).is_err());
    }

    #[test]
    fn login_errors_keep_the_first_line() {
        let body = r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.\r\nTrace ID: 1\r\nTimestamp: t","error_codes":[7000215]}"#;
        assert_eq!(
            parse_login_error(body),
            (
                "invalid_client".into(),
                "AADSTS7000215: Invalid client secret provided.".into()
            )
        );
    }
}
