//! Fence methods: ways to make sure the peer is powered off before this
//! node takes over from it, and the driver that tries them in order
//! (`fencing.methods`, the levels of [`crate::core::fence::FencePlan`]) on
//! a thread of its own, confirming the manager's fence the way the
//! operator's `hadb fence confirm` does.

pub mod azure;
pub mod ssh;

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::config::{Config, FenceMethod};
use crate::core::fence::{FencePlan, Next, Outcome, Silence, Trigger, ssh_silence};
use crate::core::manager::{Fence, Manager};
use crate::core::quorum::{Vote, WatchdogProof, watchdog_proof};
use crate::core::settings::peer_self_fences;
use crate::run::fence::azure::AzureFence;
use crate::run::fence::ssh::SshFence;
use crate::run::heartbeat::Heartbeat;
use crate::run::manager::lock;

/// How often the ssh method looks at the heartbeat while it waits for the
/// peer's silence.
const POLL: Duration = Duration::from_millis(100);

/// A fence method that cannot be set up: hadb does not start.
#[derive(Debug)]
pub enum Error {
    Azure(Box<azure::AzureError>),
    Ssh(ssh::SshError),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Azure(e) => write!(f, "{e}"),
            Error::Ssh(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {}

/// How a run of the levels ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    Confirmed(FenceMethod),
    /// Every automatic method failed (or there is none): the operator
    /// decides.
    Failed,
    /// The fence was no longer wanted.
    Stopped,
}

/// One method's check, for `hadb fence test`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub method: FenceMethod,
    pub ok: bool,
    pub detail: String,
    pub ms: u64,
}

/// The fence methods of this node's peer and the record of their runs.
pub struct Fencer {
    peer: String,
    methods: Vec<FenceMethod>,
    azure: Option<AzureFence>,
    ssh: Option<SshFence>,
    /// The silence the ssh method asks of the peer after its command: the
    /// heartbeat's timeout, what takes a ring down.
    settle_us: u64,
    plan: Mutex<FencePlan>,
    manager: Arc<Mutex<Manager>>,
    hb: Arc<Heartbeat>,
}

impl Fencer {
    /// Builds every configured method now, so that an unreadable key or
    /// secret stops the start rather than a fence.
    pub fn new(
        config: &Config,
        manager: Arc<Mutex<Manager>>,
        hb: Arc<Heartbeat>,
    ) -> Result<Fencer, Error> {
        let (peer, _) = config.peer();
        let methods = config.fencing.methods.clone();
        let azure = match (&config.fencing.azure, methods.contains(&FenceMethod::Azure)) {
            (Some(az), true) => Some(
                AzureFence::new(az, config.azure_vm(peer))
                    .map_err(|e| Error::Azure(Box::new(e)))?
                    .with_own_vm(config.azure_vm(&config.node)),
            ),
            _ => None,
        };
        let ssh = match (
            &config.fencing.ssh,
            methods.contains(&FenceMethod::Ssh),
            config.ssh_address(peer),
        ) {
            (Some(cfg), true, Some(address)) => {
                Some(SshFence::new(cfg, peer, address).map_err(Error::Ssh)?)
            }
            _ => None,
        };
        Ok(Fencer {
            peer: peer.to_owned(),
            plan: Mutex::new(FencePlan::new(&methods)),
            methods,
            azure,
            ssh,
            settle_us: config.heartbeat.timeout.0.as_micros() as u64,
            manager,
            hb,
        })
    }

    pub fn methods(&self) -> &[FenceMethod] {
        &self.methods
    }

    /// Whether any method runs by itself (else the operator fences).
    pub fn automatic(&self) -> bool {
        lock(&self.plan).automatic().next().is_some()
    }

    /// Starts a run of the levels on a thread of its own (methods block
    /// for seconds to minutes); the receiver hears how it ended. With no
    /// automatic method it ends at once: the operator fences.
    pub fn start(
        self: &Arc<Self>,
        trigger: Trigger,
    ) -> Result<smol::channel::Receiver<RunEnd>, String> {
        let (tx, rx) = smol::channel::bounded(1);
        {
            let mut plan = lock(&self.plan);
            plan.begin(trigger, self.hb.now_us())?;
            if plan.next() == Next::Operator {
                plan.finish();
                drop(plan);
                self.all_failed(trigger);
                let _ = tx.try_send(RunEnd::Failed);
                return Ok(rx);
            }
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("hadb-fence".into())
            .spawn(move || {
                let end = me.run(trigger);
                let _ = tx.try_send(end);
            });
        if let Err(e) = spawned {
            lock(&self.plan).finish();
            return Err(format!(
                "cannot start the fence ({e}); make sure {} is off, then run `hadb fence confirm {}`",
                self.peer, self.peer
            ));
        }
        Ok(rx)
    }

    /// The levels, one attempt after another, until one confirms, all
    /// failed, or the fence is no longer wanted.
    fn run(&self, trigger: Trigger) -> RunEnd {
        let peer = &self.peer;
        loop {
            let next = lock(&self.plan).next();
            match next {
                Next::Try(method) => {
                    if let Some(why) = self.unwanted() {
                        log::warn!("fence: {why}: {method} not tried");
                        lock(&self.plan).finish();
                        return RunEnd::Stopped;
                    }
                    let n = lock(&self.plan).attempts().len() + 1;
                    log::warn!(
                        "fence: {peer}: trying {method} (level {n} of {})",
                        lock(&self.plan).automatic().count()
                    );
                    lock(&self.plan).started(method, self.hb.now_us());
                    let started = Instant::now();
                    let (outcome, detail) = match method {
                        FenceMethod::Azure => self.by_azure(),
                        FenceMethod::Ssh => self.by_ssh(),
                        FenceMethod::Watchdog => self.by_watchdog(),
                        // The plan never offers manual: it is the operator.
                        FenceMethod::Manual => (Outcome::Failed, "manual is the operator's".into()),
                    };
                    let took = started.elapsed().as_secs_f64();
                    match outcome {
                        Outcome::Confirmed => {
                            log::warn!(
                                "fence: {peer}: {method} confirmed after {took:.1}s: {detail}"
                            )
                        }
                        Outcome::Failed => {
                            log::error!("fence: {peer}: {method} FAILED after {took:.1}s: {detail}")
                        }
                        _ => log::warn!(
                            "fence: {peer}: {method} abandoned after {took:.1}s: {detail}"
                        ),
                    }
                    lock(&self.plan).ended(outcome, detail, self.hb.now_us());
                }
                Next::Confirmed(method) => {
                    lock(&self.plan).finish();
                    match lock(&self.manager).fence_confirmed(self.hb.now_us()) {
                        Ok(()) => log::warn!("fence: {peer} is off ({method}): fence confirmed"),
                        // Heard again meanwhile: nothing is pending.
                        Err(e) => log::warn!("fence: {peer} is off ({method}); {e}"),
                    }
                    return RunEnd::Confirmed(method);
                }
                Next::Operator => {
                    lock(&self.plan).finish();
                    self.all_failed(trigger);
                    return RunEnd::Failed;
                }
                Next::Stopped | Next::Idle | Next::Wait => {
                    lock(&self.plan).finish();
                    return RunEnd::Stopped;
                }
            }
        }
    }

    fn all_failed(&self, trigger: Trigger) {
        let peer = &self.peer;
        lock(&self.manager).fence_failed();
        if self.automatic() {
            log::error!(
                "fence: every method failed to fence {peer}: this node does not take over; make sure {peer} is off, then run `hadb fence confirm {peer}` (or retry: `hadb fence {peer}`)"
            );
        } else if trigger == Trigger::PeerLost {
            log::warn!(
                "fence: {peer} must be powered off before this node goes on; make sure it is off, then run `hadb fence confirm {peer}`"
            );
        }
    }

    /// Why the fence is no longer wanted, if it is not: the manager's
    /// fence is not pending any more.
    fn unwanted(&self) -> Option<&'static str> {
        match lock(&self.manager).fence() {
            Fence::Pending { .. } => None,
            Fence::Confirmed { .. } => Some("the fence was confirmed meanwhile"),
            Fence::None => Some("the peer is heard again"),
        }
    }

    fn by_azure(&self) -> (Outcome, String) {
        let Some(azure) = &self.azure else {
            return (Outcome::Failed, "not set up".into());
        };
        match azure.power_off_unless(&|| self.unwanted()) {
            Ok(state) => (Outcome::Confirmed, format!("Azure reports the VM {state}")),
            Err(e @ azure::AzureError::Abandoned(_)) => (Outcome::Abandoned, e.to_string()),
            // This node is being fenced: no further level may power the
            // peer off either (an ssh reboot of the winner would end the
            // race with both down). The fence stays pending; this node
            // goes down with its VM.
            Err(e @ azure::AzureError::BeingFenced { .. }) => {
                log::error!("fence: {}: {e}", self.peer);
                (Outcome::Abandoned, e.to_string())
            }
            Err(e) => (Outcome::Failed, e.to_string()),
        }
    }

    /// The command, then the silence (see `ssh_silence`).
    fn by_ssh(&self) -> (Outcome, String) {
        let Some(ssh) = &self.ssh else {
            return (Outcome::Failed, "not set up".into());
        };
        let delivery = match ssh.deliver() {
            Ok(d) => d,
            Err(e) => return (Outcome::Failed, e.to_string()),
        };
        let delivered_us = self
            .hb
            .now_us()
            .saturating_sub(delivery.at.elapsed().as_micros() as u64);
        log::warn!(
            "fence: {}: ssh delivered the command to {} ({}); waiting for its silence",
            self.peer,
            ssh.target(),
            delivery.how
        );
        let timeout_us = ssh.confirm_timeout().as_micros() as u64;
        loop {
            if let Some(why) = self.unwanted() {
                return (Outcome::Abandoned, why.into());
            }
            let (alive, last) = {
                let m = lock(&self.hb.membership);
                (m.peer_alive(), m.last_heard_us())
            };
            let now = self.hb.now_us();
            match ssh_silence(delivered_us, last, alive, now, self.settle_us, timeout_us) {
                Silence::Confirmed { silent_us } => {
                    return (
                        Outcome::Confirmed,
                        format!(
                            "the command was delivered ({}) and {} has been silent on every ring for {:.1}s since",
                            delivery.how,
                            self.peer,
                            silent_us as f64 / 1e6
                        ),
                    );
                }
                Silence::TimedOut { heard_after } => {
                    return (
                        Outcome::Failed,
                        format!(
                            "the command was delivered ({}), but {} {} within confirm_timeout ({}s): it did not stop; check fencing.ssh.command",
                            delivery.how,
                            self.peer,
                            if heard_after {
                                "was still heard after it"
                            } else {
                                "did not fall silent"
                            },
                            ssh.confirm_timeout().as_secs()
                        ),
                    );
                }
                Silence::Wait => std::thread::sleep(POLL),
            }
        }
    }

    /// Waits out twice the peer's advertised watchdog timeout of silence
    /// while this node holds the witness's vote (see `watchdog_proof`).
    fn by_watchdog(&self) -> (Outcome, String) {
        let started_us = self.hb.now_us();
        loop {
            if let Some(why) = self.unwanted() {
                return (Outcome::Abandoned, why.into());
            }
            if self.hb.vote() != Some(Vote::Mine) {
                return (
                    Outcome::Failed,
                    format!(
                        "this node does not hold the witness's vote ({}): the peer may have quorum and no reason to reboot",
                        self.hb.vote().map_or("no witness", Vote::name)
                    ),
                );
            }
            let (report, alive, last) = {
                let m = lock(&self.hb.membership);
                (m.peer_report(), m.peer_alive(), m.last_heard_us())
            };
            let advertised = report.as_ref().and_then(peer_self_fences);
            let ms = advertised.unwrap_or(0);
            let now = self.hb.now_us();
            match watchdog_proof(advertised, started_us, last, alive, now) {
                WatchdogProof::NotArmed => {
                    return (
                        Outcome::Failed,
                        format!(
                            "{} never said it fences itself (an armed watchdog, a witness and the `watchdog` method in its own fencing.methods): it would not reboot itself",
                            self.peer
                        ),
                    );
                }
                WatchdogProof::Confirmed { silent_us } => {
                    return (
                        Outcome::Confirmed,
                        format!(
                            "{} (watchdog {} s) silent on every ring for {:.1}s, twice its watchdog since this node won the witness's vote: it has rebooted",
                            self.peer,
                            ms / 1000,
                            silent_us as f64 / 1e6
                        ),
                    );
                }
                WatchdogProof::Wait { .. } => std::thread::sleep(POLL),
            }
        }
    }

    /// `hadb fence unfence`: starts the peer again where a method can
    /// (azure); says what to do where none can. Blocks.
    pub fn unfence(&self) -> Result<serde_json::Value, String> {
        let peer = &self.peer;
        match &self.azure {
            Some(azure) => {
                let state = azure.start().map_err(|e| e.to_string())?;
                log::warn!("fence: {peer} started again through Azure: {state}");
                Ok(json!({"method": "azure", "state": state.to_string()}))
            }
            None => Err(format!(
                "no method here starts {peer} again: `ssh` and `watchdog` reboot it (it comes back by itself); otherwise power it on yourself"
            )),
        }
    }

    /// The watchdog method's preconditions, as they stand now.
    fn watchdog_test(&self) -> (bool, String) {
        let report = lock(&self.hb.membership).peer_report();
        let armed = report.as_ref().and_then(peer_self_fences);
        match (armed, self.hb.vote()) {
            (None, _) => (
                false,
                format!(
                    "{} has not said it fences itself (it needs an armed watchdog, a [witness] and `watchdog` in its own fencing.methods)",
                    self.peer
                ),
            ),
            (_, None | Some(Vote::Unheard)) => (false, "the witness is not heard".into()),
            (Some(ms), Some(_)) => (
                true,
                format!(
                    "{} advertises an armed watchdog of {} s and the witness is heard: a fence would wait {} s",
                    self.peer,
                    ms / 1000,
                    2 * ms / 1000
                ),
            ),
        }
    }

    /// `hadb fence test`: each configured method checked without fencing,
    /// the operator's last. Blocks.
    pub fn test(&self) -> Vec<Check> {
        let mut out = Vec::new();
        for &method in &self.methods {
            if method == FenceMethod::Manual {
                continue;
            }
            let t = Instant::now();
            let (ok, detail) = match method {
                FenceMethod::Azure => match self.azure.as_ref().map(|a| a.test()) {
                    Some(Ok(state)) => {
                        (true, format!("got a token and read the peer's VM: {state}"))
                    }
                    Some(Err(e)) => (false, e.to_string()),
                    None => (false, "not set up".into()),
                },
                FenceMethod::Ssh => match self.ssh.as_ref().map(|s| (s.target(), s.test())) {
                    Some((target, Ok(()))) => {
                        (true, format!("logged in to {target} and ran `true`"))
                    }
                    Some((_, Err(e))) => (false, e.to_string()),
                    None => (false, "not set up".into()),
                },
                FenceMethod::Watchdog => self.watchdog_test(),
                FenceMethod::Manual => continue,
            };
            out.push(Check {
                method,
                ok,
                detail,
                ms: t.elapsed().as_millis() as u64,
            });
        }
        out.push(Check {
            method: FenceMethod::Manual,
            ok: true,
            detail: format!(
                "always available: make sure {} is off, then `hadb fence confirm {}`",
                self.peer, self.peer
            ),
            ms: 0,
        });
        out
    }

    /// For status: the methods, the current (or last) run's attempts and
    /// the totals since start.
    pub fn status(&self) -> serde_json::Value {
        let plan = lock(&self.plan);
        let now = self.hb.now_us();
        let attempts: Vec<serde_json::Value> = plan
            .attempts()
            .iter()
            .map(|a| {
                json!({
                    "method": a.method,
                    "result": a.outcome,
                    "detail": a.detail,
                    "started_ms_ago": now.saturating_sub(a.started_us) / 1000,
                    "duration_ms": a.duration_us(now) / 1000,
                })
            })
            .collect();
        let totals: Vec<serde_json::Value> = plan
            .totals()
            .map(|(method, outcome, n, us)| {
                json!({
                    "method": method,
                    "result": outcome,
                    "count": n,
                    "seconds": us as f64 / 1e6,
                })
            })
            .collect();
        json!({
            "fence_methods": self.methods,
            "fence_running": plan.active(),
            "fence_trigger": plan.trigger(),
            "fence_attempts": attempts,
            "fence_attempt_totals": totals,
        })
    }
}
