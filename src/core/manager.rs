//! The manager: who is primary. A pure decision core, Pacemaker's job in
//! the old stack: from this node's volume, what the heartbeat last heard of
//! the peer, the operator's wishes, the fence's state and the time, it
//! returns actions. No sockets, no clock, no processes: the driver
//! (`run::manager`) gathers the inputs, calls [`Manager::step`] and
//! carries the actions out; the cluster simulation drives it directly.
//!
//! The rules, each with its reason, are in `docs/manager.md`. The safety
//! argument in one paragraph: a node becomes primary only (a) through the
//! volume's role request while the replication link is up (the peer must
//! grant it), (b) with the peer heard and secondary, when this node is the
//! one the rules name, also through the role request (a heartbeat report
//! may predate a promotion, so it never decides alone), or
//! (c) with the peer lost on every heartbeat ring, after the peer was
//! fenced and the fence confirmed. And a primary goes on without a peer it
//! waits for only with proof that the peer cannot be promoted with older
//! data: it outdated itself, or it was fenced.

use crate::core::quorum::Vote;
use crate::core::replica::{DiskState, LinkState, Role};
use crate::core::settings::{self, Settings};

/// How long a switchover waits for the peer to take the role.
const HANDOVER_US: u64 = 30_000_000;

/// This node's volume, as the manager needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeView {
    pub role: Role,
    pub disk: DiskState,
    pub link: LinkState,
    /// Application I/O is held waiting for the peer.
    pub frozen: bool,
    /// The replication link is up and the peer holds every completed write.
    pub peer_up_to_date: bool,
    /// This node went on without its peer on the peer's word that its copy
    /// is outdated (remembered on disk): the peer cannot be promoted
    /// before a resync from here.
    pub peer_outdated: bool,
    /// The generation this copy holds, and the one the peer was left at
    /// when this node last went on without it (0: none).
    pub current_gen: u64,
    pub bitmap_gen: u64,
    /// A primary's token for its current spell without the replication
    /// link (what its "outdate yourself" names), and the token a
    /// secondary's copy was outdated for.
    pub outdate_token: u64,
    pub outdated_for: u64,
}

impl VolumeView {
    /// What the manager needs of a volume's state machine.
    pub fn of(r: &crate::core::replica::Replica) -> VolumeView {
        VolumeView {
            role: r.role(),
            disk: r.disk(),
            link: r.link(),
            frozen: r.frozen(),
            peer_up_to_date: r.peer_up_to_date(),
            peer_outdated: r.peer_outdated(),
            current_gen: r.generations().0,
            bitmap_gen: r.generations().1,
            outdate_token: r.outdate_tokens().0,
            outdated_for: r.outdate_tokens().1,
        }
    }
}

impl PeerView {
    /// The peer as a heartbeat report describes it.
    pub fn of(r: &crate::core::heartbeat::NodeReport) -> PeerView {
        use crate::core::heartbeat::{FLAG_OUTDATE_REQUEST, FLAG_RESTARTING, FLAG_STANDBY};
        PeerView {
            restarting: r.flags & FLAG_RESTARTING != 0,
            primary: r.role == 1,
            disk: crate::core::replica::disk_from_code(r.disk),
            standby: r.flags & FLAG_STANDBY != 0,
            asks_outdate: r.flags & FLAG_OUTDATE_REQUEST != 0,
            service_failed: r.service == crate::core::heartbeat::SERVICE_FAILED,
            current_gen: r.current_gen,
            outdate_token: r.outdate_token,
            settings: r.settings,
        }
    }
}

/// The peer, as its last heartbeat described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerView {
    pub primary: bool,
    pub disk: DiskState,
    /// The peer is in standby (or handing over): it will not be primary.
    pub standby: bool,
    /// The peer, a primary that cannot reach this node's volume, asks this
    /// node to mark its copy outdated.
    pub asks_outdate: bool,
    /// mysqld failed on the peer (restarted too often): it will not take
    /// the primary role.
    pub service_failed: bool,
    /// The peer's hadb is restarting in place: its silence is expected.
    pub restarting: bool,
    /// The generation the peer's copy holds.
    pub current_gen: u64,
    /// From a primary: the token its outdate request names; from a
    /// secondary whose copy is outdated: the token it answers.
    pub outdate_token: u64,
    /// Its settings that must agree with this node's (rule 16).
    pub settings: Settings,
}

/// Everything one step decides from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inputs {
    pub now_us: u64,
    pub volume: VolumeView,
    /// The peer is heard on at least one heartbeat ring.
    pub peer_alive: bool,
    /// Its last report (kept after it is lost).
    pub peer: Option<PeerView>,
    /// mysqld failed on this node (restarted too often); it stays down
    /// until the operator resets it.
    pub service_failed: bool,
    /// The witness's vote as this node sees it; None: no witness.
    pub vote: Option<Vote>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// This node's name sorts before the peer's: with both nodes alike,
    /// it is the one that becomes primary.
    pub me_first: bool,
    /// A secondary waits this long after losing its peer before fencing.
    pub fence_delay_us: u64,
    /// Least time between two attempts of the same volume action.
    pub retry_us: u64,
    /// After a start, a primary (restarted in place) waits this long to
    /// hear its peer before it counts it lost.
    pub start_grace_us: u64,
    /// A peer restarting in place is given this long before fence_delay
    /// starts to run.
    pub restart_grace_us: u64,
    /// With a witness: a node without quorum this long stops petting its
    /// watchdog (the peer's `watchdog` fence counts on it). None: never.
    pub self_fence_after_us: Option<u64>,
    /// A lost-peer fence whose methods all failed runs them again after
    /// this (Pacemaker retries too: a token still propagating, Azure
    /// throttling). None: no automatic method, the operator decides.
    pub fence_retry_us: Option<u64>,
    /// This node's settings that must agree with the peer's (rule 16).
    pub settings: Settings,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Make the volume primary (it asks the peer when connected).
    Promote,
    /// Make the volume secondary.
    Demote,
    /// Fence the peer (the method decides how); the manager waits for
    /// [`Manager::fence_confirmed`].
    Fence,
    /// The peer cannot be promoted with older data (fenced, or it said it
    /// is outdated: then true, and remembered on disk): the volume may stop
    /// waiting for it.
    PeerProvenOutdated(&'static str, bool),
    /// Mark this node's copy outdated: the primary goes on without it. The
    /// primary's token, echoed in this node's heartbeats once the mark is
    /// on disk.
    OutdateSelf(u64),
    /// No quorum for too long: stop petting the watchdog, so the node
    /// reboots (the peer fences it by waiting). Never undone.
    SelfFence,
    Log {
        warn: bool,
        message: String,
    },
}

/// A fence of the peer, as status shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Fence {
    None,
    /// Asked for; waiting for confirmation.
    Pending {
        since_us: u64,
        /// The operator's `hadb fence NODE`: it holds while the peer is
        /// heard, until the fence methods have run.
        by_operator: bool,
    },
    /// The peer is known to be off.
    Confirmed {
        at_us: u64,
    },
}

pub struct Manager {
    cfg: Config,
    /// Fences asked for and confirmed since hadb started, for /metrics.
    pub fences_requested: u64,
    pub fences_confirmed: u64,
    /// The peer has been heard since this node started (wait-for-all).
    heard_once: bool,
    /// The operator said to go on without ever hearing the peer.
    forced: bool,
    standby: bool,
    /// A switchover: this primary hands over, then clears it once the peer
    /// is primary (or gives up after `HANDOVER_US`).
    handing_over: bool,
    handover_since_us: Option<u64>,
    lost_since_us: Option<u64>,
    fence: Fence,
    /// Whether this node's heartbeats ask the peer to outdate itself.
    asks_outdate: bool,
    /// The peer was last heard, without the replication link, up to date
    /// at this generation, which this copy neither holds nor left it at:
    /// it may hold writes this copy lacks (rule 14).
    peer_may_be_newer: Option<u64>,
    last_attempt: Option<(Action, u64)>,
    /// When this run's first step was.
    started_us: Option<u64>,
    /// Since when this node has had no quorum (peer lost, vote not its).
    no_quorum_since_us: Option<u64>,
    self_fenced: bool,
    /// What differs between this node's settings and the peer's last
    /// report (rule 16), in words; logged once per change.
    settings_mismatch: Option<String>,
    /// When the last run of the fence methods failed.
    fence_failed_us: Option<u64>,
    reason: String,
    /// The last reasons, newest last, with when they began (status's "last
    /// transitions and why").
    history: std::collections::VecDeque<(u64, String)>,
    now_us: u64,
}

/// Transitions kept for status.
const HISTORY: usize = 10;

impl Manager {
    pub fn new(cfg: Config) -> Manager {
        Manager {
            cfg,
            fences_requested: 0,
            fences_confirmed: 0,
            heard_once: false,
            forced: false,
            standby: false,
            handing_over: false,
            handover_since_us: None,
            lost_since_us: None,
            fence: Fence::None,
            asks_outdate: false,
            peer_may_be_newer: None,
            last_attempt: None,
            started_us: None,
            no_quorum_since_us: None,
            self_fenced: false,
            settings_mismatch: None,
            fence_failed_us: None,
            reason: "starting".into(),
            history: std::collections::VecDeque::new(),
            now_us: 0,
        }
    }

    /// Why this node is as it is (status).
    pub fn reason(&self) -> &str {
        &self.reason
    }
    pub fn fence(&self) -> Fence {
        self.fence
    }
    pub fn standby(&self) -> bool {
        self.standby
    }
    /// This node stopped petting its watchdog for want of quorum.
    pub fn self_fenced(&self) -> bool {
        self.self_fenced
    }

    /// The settings that differ from the peer's, in words (rule 16).
    pub fn settings_mismatch(&self) -> Option<&str> {
        self.settings_mismatch.as_deref()
    }
    /// What this node's heartbeats say: standby (or handing over), and
    /// whether they ask the peer to outdate itself.
    pub fn flags(&self) -> (bool, bool) {
        (self.standby || self.handing_over, self.asks_outdate)
    }

    /// A reloaded configuration (SIGHUP).
    pub fn set_fence_delay(&mut self, us: u64) {
        self.cfg.fence_delay_us = us;
    }

    /// `hadb standby on|off`.
    pub fn set_standby(&mut self, on: bool) {
        self.standby = on;
    }

    /// `hadb switchover`: the primary hands the role to its peer.
    pub fn switchover(&mut self, v: &VolumeView) -> Result<(), String> {
        if v.role != Role::Primary {
            return Err("this node is not primary; run switchover on the primary".into());
        }
        if !v.peer_up_to_date {
            return Err(
                "the peer is not connected and up to date: a switchover now would lose writes or leave no primary"
                    .into(),
            );
        }
        self.handing_over = true;
        Ok(())
    }

    /// The operator's word that this node may start without having heard
    /// its peer (`hadb volume primary --force` also says it).
    pub fn force_start(&mut self) {
        self.forced = true;
    }

    /// `hadb fence NODE`: fence the peer now, heard or not. A lost-peer
    /// fence already pending becomes the operator's (its methods run
    /// again); a confirmed one needs nothing more.
    pub fn fence_by_operator(&mut self, now_us: u64) -> Result<(), String> {
        match self.fence {
            Fence::None => {
                self.fences_requested += 1;
                self.fence = Fence::Pending {
                    since_us: now_us,
                    by_operator: true,
                };
                Ok(())
            }
            Fence::Pending { since_us, .. } => {
                self.fence = Fence::Pending {
                    since_us,
                    by_operator: true,
                };
                Ok(())
            }
            Fence::Confirmed { .. } => {
                Err("the peer's fence is confirmed already; nothing to do".into())
            }
        }
    }

    /// Every fence method failed. The operator's fence ends with its run:
    /// a heard peer clears it at the next step; a lost one leaves it
    /// pending for `hadb fence confirm`, as a lost-peer fence always is.
    pub fn fence_failed(&mut self) {
        self.fence_failed_us = Some(self.now_us);
        if let Fence::Pending {
            since_us,
            by_operator: true,
        } = self.fence
        {
            self.fence = Fence::Pending {
                since_us,
                by_operator: false,
            };
        }
    }

    /// The operator (or a fence method) confirms the peer is off.
    pub fn fence_confirmed(&mut self, now_us: u64) -> Result<(), String> {
        match self.fence {
            Fence::Pending { .. } => {
                self.fence = Fence::Confirmed { at_us: now_us };
                self.fences_confirmed += 1;
                Ok(())
            }
            Fence::Confirmed { .. } => Ok(()),
            Fence::None => Err("no fence is pending; nothing to confirm".into()),
        }
    }

    /// An action is due; at most once per `retry_us` the same one, so a
    /// refused promotion is retried, not hammered.
    fn attempt(&mut self, a: Action, now: u64, out: &mut Vec<Action>) {
        if let Some((last, at)) = &self.last_attempt
            && *last == a
            && now.saturating_sub(*at) < self.cfg.retry_us
        {
            return;
        }
        self.last_attempt = Some((a.clone(), now));
        out.push(a);
    }

    fn because(&mut self, why: impl Into<String>, out: &mut Vec<Action>) {
        let why = why.into();
        if why != self.reason {
            out.push(Action::Log {
                warn: false,
                message: format!("manager: {why}"),
            });
            if self.history.len() == HISTORY {
                self.history.pop_front();
            }
            self.history.push_back((self.now_us, why.clone()));
            self.reason = why;
        }
    }

    /// The last transitions, oldest first: (when, in the driver's
    /// microseconds, and why).
    pub fn history(&self) -> impl Iterator<Item = &(u64, String)> {
        self.history.iter()
    }

    /// Asks for a fence, or says where it stands; true once confirmed.
    fn fenced(&mut self, now: u64, out: &mut Vec<Action>) -> bool {
        match self.fence {
            Fence::Confirmed { .. } => true,
            Fence::Pending { .. } => {
                if let (Some(failed), Some(retry)) = (self.fence_failed_us, self.cfg.fence_retry_us)
                    && now.saturating_sub(failed) >= retry
                {
                    self.fence_failed_us = None;
                    out.push(Action::Log {
                        warn: true,
                        message: format!(
                            "manager: every fence method failed {} s ago; trying them again",
                            retry / 1_000_000
                        ),
                    });
                    out.push(Action::Fence);
                }
                false
            }
            Fence::None => {
                self.fence = Fence::Pending {
                    since_us: now,
                    by_operator: false,
                };
                self.fences_requested += 1;
                out.push(Action::Log {
                    warn: true,
                    message: "manager: the peer is lost on every ring: fencing it before going on"
                        .into(),
                });
                out.push(Action::Fence);
                false
            }
        }
    }

    pub fn step(&mut self, i: &Inputs) -> Vec<Action> {
        let mut out = Vec::new();
        let now = i.now_us;
        self.now_us = now;
        let v = &i.volume;
        if i.peer_alive {
            self.heard_once = true;
            self.lost_since_us = None;
            let operators = matches!(
                self.fence,
                Fence::Pending {
                    by_operator: true,
                    ..
                }
            );
            self.fence_failed_us = None;
            if self.fence != Fence::None && !operators {
                // It is back (rebooted): the fence is history. Not the
                // operator's, which fences a peer that is heard.
                out.push(Action::Log {
                    warn: false,
                    message: "manager: the peer is heard again; fence cleared".into(),
                });
                self.fence = Fence::None;
            }
        } else if self.lost_since_us.is_none() {
            self.lost_since_us = Some(now);
        }
        let peer = if i.peer_alive { i.peer } else { None };
        self.started_us.get_or_insert(now);
        let quorate = i.peer_alive || i.vote.is_none_or(|v| v == Vote::Mine);
        if quorate {
            self.no_quorum_since_us = None;
        } else {
            let since = *self.no_quorum_since_us.get_or_insert(now);
            // Only a node the peer may count on: a primary, or a
            // secondary that has heard its peer in this run (before, it
            // never promotes, and a reboot loop at boot helps nobody).
            let exposed = v.role == Role::Primary || self.heard_once;
            if let Some(after) = self.cfg.self_fence_after_us
                && exposed
                && !self.self_fenced
                && now.saturating_sub(since) >= after
            {
                self.self_fenced = true;
                out.push(Action::Log {
                    warn: true,
                    message: format!(
                        "manager: SELF-FENCE: no quorum for {} ms (peer lost; {}): the watchdog is no longer petted and reboots this node",
                        after / 1000,
                        i.vote.map_or("no witness", Vote::name)
                    ),
                });
                out.push(Action::SelfFence);
            }
        }
        if self.self_fenced {
            self.because(
                "self-fenced for want of quorum: waiting for the watchdog to reboot this node",
                &mut out,
            );
            return out;
        }
        if self.handing_over {
            let since = *self.handover_since_us.get_or_insert(now);
            if peer.is_some_and(|p| p.primary) {
                self.handing_over = false;
                self.handover_since_us = None;
            } else if now.saturating_sub(since) > HANDOVER_US {
                out.push(Action::Log {
                    warn: true,
                    message:
                        "manager: switchover abandoned: the peer did not become primary in time"
                            .into(),
                });
                self.handing_over = false;
                self.handover_since_us = None;
            }
        }
        // Asked anew at every step, where a rule still wants it.
        self.asks_outdate = false;
        // Rule 16: the peer's last report, heard now or before it was
        // lost, carries settings this node's rules rely on in it.
        let mismatch = i
            .peer
            .and_then(|p| settings::mismatch(&self.cfg.settings, &p.settings));
        if mismatch != self.settings_mismatch {
            out.push(Action::Log {
                warn: mismatch.is_some(),
                message: match &mismatch {
                    Some(m) => format!("manager: {m}"),
                    None => "manager: the peer's settings agree with this node's again".into(),
                },
            });
            self.settings_mismatch = mismatch;
        }
        if let Some(m) = &self.settings_mismatch {
            let why = format!(
                "{m}. Until they do, this node neither promotes, goes on alone nor fences: staying {} (rule 16)",
                if v.role == Role::Primary {
                    "primary"
                } else {
                    "secondary"
                }
            );
            self.because(why, &mut out);
            return out;
        }
        if let Some(p) = peer.filter(|_| i.peer_alive) {
            let linked = !matches!(v.link, LinkState::Standalone | LinkState::Connecting);
            let older_or_same = p.current_gen == v.current_gen
                || (v.bitmap_gen != 0 && p.current_gen == v.bitmap_gen)
                || p.disk != DiskState::UpToDate;
            self.peer_may_be_newer = (!linked && !older_or_same).then_some(p.current_gen);
        }
        match v.role {
            Role::Primary => self.as_primary(i, peer, &mut out),
            Role::Secondary => self.as_secondary(i, peer, &mut out),
        }
        out
    }

    fn as_primary(&mut self, i: &Inputs, peer: Option<PeerView>, out: &mut Vec<Action>) {
        let now = i.now_us;
        let v = &i.volume;
        if self.standby || self.handing_over {
            let why = if self.standby {
                "standby"
            } else {
                "switchover"
            };
            if v.peer_up_to_date
                && peer.is_some_and(|p| p.disk == DiskState::UpToDate && !p.standby)
            {
                self.because(format!("{why}: handing the primary role to the peer"), out);
                self.attempt(Action::Demote, now, out);
            } else {
                self.because(
                    format!("{why} asked, but the peer cannot take over (not connected, not up to date, or in standby): staying primary"),
                    out,
                );
            }
            return;
        }
        if v.disk == DiskState::Failed {
            // Rule 15: the local disk is detached; the peer holds the good
            // copy. Hand it the role; never fence it.
            if v.peer_up_to_date && peer.is_some_and(|p| p.disk == DiskState::UpToDate) {
                self.because(
                    "local disk failed: handing the primary role to the peer, which holds every acknowledged write (rule 15)",
                    out,
                );
                self.attempt(Action::Demote, now, out);
            } else {
                self.because(
                    "local disk failed and the peer cannot take over (not connected or not up to date): staying as is, not fencing the peer that may hold the good copy (rule 15)",
                    out,
                );
            }
            return;
        }
        if i.service_failed {
            if v.peer_up_to_date
                && peer.is_some_and(|p| {
                    p.disk == DiskState::UpToDate && !p.standby && !p.service_failed
                })
            {
                self.because(
                    "mysqld failed here: handing the primary role to the peer",
                    out,
                );
                self.attempt(Action::Demote, now, out);
            } else {
                self.because(
                    "mysqld failed here, but the peer cannot take over (not connected, not up to date, in standby, or its mysqld failed too): staying primary; `hadb mysql reset` retries",
                    out,
                );
            }
            return;
        }
        match peer {
            Some(p) if p.primary => {
                // The volume refuses to connect two primaries; no rule
                // here can choose which writes to keep.
                self.because(
                    "BOTH NODES PRIMARY: the volumes refuse to connect; demote one (its writes since are discarded at reconnect)",
                    out,
                );
            }
            Some(p) => {
                let linked = matches!(v.link, LinkState::Connected | LinkState::SyncSource);
                // Rule 5: an "outdated" is proof only when it answers the
                // token of this spell without the link: one given before
                // the link last came up may be stale.
                let proof = p.disk == DiskState::Outdated && p.outdate_token == v.outdate_token;
                if linked {
                    self.because("primary", out);
                } else if proof && v.frozen {
                    // The replication link is down but the peer is heard:
                    // it outdated itself on our word, over the heartbeat.
                    self.because("the peer outdated its copy: going on without it", out);
                    self.attempt(
                        Action::PeerProvenOutdated(
                            "the peer said over the heartbeat that its copy is outdated",
                            true,
                        ),
                        now,
                        out,
                    );
                } else if proof {
                    self.because(
                        "primary; replication link down; the peer's copy is outdated",
                        out,
                    );
                } else if v.frozen {
                    self.asks_outdate = true;
                    self.because(
                        "replication link down, peer heard: asking it to outdate its copy (rule 5)",
                        out,
                    );
                } else {
                    // Rule 12: a primary that writes without the peer
                    // keeps asking a peer it hears to outdate itself, so
                    // the peer is never promoted with older data.
                    self.asks_outdate = true;
                    self.because(
                        "primary; replication link down, peer heard: asking it to outdate its copy (rule 12)",
                        out,
                    );
                }
            }
            // Just started (restarted in place): the peer has not had
            // time to be heard; it is not lost.
            None if !self.heard_once
                && now.saturating_sub(self.started_us.unwrap_or(now)) < self.cfg.start_grace_us =>
            {
                self.because("primary; started: listening for the peer", out);
            }
            // The peer said its copy is outdated (on disk here): it never
            // takes over before a resync from here, so it fences nobody.
            None if v.peer_outdated => self.because(
                "primary; peer lost; its copy is outdated by its own word: no fence needed",
                out,
            ),
            None if i.vote.is_some_and(|v| v != Vote::Mine) => {
                let vote = i.vote.map_or("", Vote::name);
                self.because(
                    format!(
                        "primary; peer lost and no quorum ({vote}): not fencing, not going on alone{}",
                        if v.frozen { "; I/O held" } else { "" }
                    ),
                    out,
                );
            }
            None if v.frozen => {
                if self.fenced(now, out) {
                    self.because("the peer is fenced: going on without it", out);
                    self.attempt(
                        Action::PeerProvenOutdated("the peer was fenced (confirmed)", false),
                        now,
                        out,
                    );
                } else {
                    self.because(
                        "peer lost, I/O held: waiting for the fence to be confirmed (`hadb fence confirm PEER` once it is off)",
                        out,
                    );
                }
            }
            // Not frozen (yet: the replication link takes a few seconds
            // to time out, or the mode is async). The peer may be alive
            // behind a partition, and a secondary that lost this node
            // fences it after fence_delay: fencing it now, first, is what
            // keeps the role here, which is what the delay is for.
            None => {
                if self.fenced(now, out) {
                    self.because("primary; the peer is fenced", out);
                } else {
                    self.because(
                        "primary; peer lost: fencing it first (`hadb fence confirm PEER` once it is off)",
                        out,
                    );
                }
            }
        }
    }

    fn as_secondary(&mut self, i: &Inputs, peer: Option<PeerView>, out: &mut Vec<Action>) {
        let now = i.now_us;
        let v = &i.volume;
        match peer {
            Some(p) if p.primary => {
                let linked = matches!(v.link, LinkState::Connected | LinkState::SyncTarget);
                let asked = p.asks_outdate
                    && (v.disk == DiskState::UpToDate
                        || (v.disk == DiskState::Outdated && v.outdated_for != p.outdate_token));
                // Rule 13: a primary at another generation than this
                // copy, without the link, writes what this copy lacks.
                let ahead = p.current_gen != v.current_gen && v.disk == DiskState::UpToDate;
                if !linked && asked {
                    self.because(
                        "the primary cannot reach this volume and asks it to step aside: marking the copy outdated",
                        out,
                    );
                    self.attempt(Action::OutdateSelf(p.outdate_token), now, out);
                } else if !linked && ahead {
                    self.because(
                        format!(
                            "the primary writes at generation {:016x}, which this copy does not hold: marking the copy outdated (rule 13)",
                            p.current_gen
                        ),
                        out,
                    );
                    self.attempt(Action::OutdateSelf(p.outdate_token), now, out);
                } else if i.service_failed {
                    self.because(
                        "secondary; the peer is primary; mysqld failed here (`hadb mysql reset` once fixed)",
                        out,
                    );
                } else {
                    self.because("secondary; the peer is primary", out);
                }
            }
            Some(p) => {
                // Nobody is primary. The rules name one node, so the two
                // never both promote while they hear each other.
                let mine = v.disk == DiskState::UpToDate
                    && !self.standby
                    && !self.handing_over
                    && !i.service_failed
                    && (p.standby
                        || p.service_failed
                        || p.disk != DiskState::UpToDate
                        || self.cfg.me_first);
                // A heartbeat report may predate the peer's promotion: only
                // the volume's role request, over the replication link, is
                // authoritative. Without that link, no promotion while the
                // peer is heard.
                let linked = matches!(v.link, LinkState::Connected | LinkState::SyncSource);
                if mine && linked {
                    self.because("no primary: this node takes the role", out);
                    self.attempt(Action::Promote, now, out);
                } else if mine {
                    self.because(
                        "no primary, but the replication link is down: waiting for it before promoting (the peer is heard and may have just become primary)",
                        out,
                    );
                } else if self.standby {
                    self.because("standby: secondary, replicating", out);
                } else if i.service_failed {
                    self.because(
                        "secondary; mysqld failed here, so the peer takes the role (`hadb mysql reset` once fixed)",
                        out,
                    );
                } else if v.disk != DiskState::UpToDate {
                    self.because(
                        format!("secondary; this copy is {}", disk_name(v.disk)),
                        out,
                    );
                } else {
                    self.because("no primary: the peer takes the role", out);
                }
            }
            None => {
                // This node went on without the peer on the peer's own
                // word (on its disk) that its copy is outdated: the peer
                // can never be promoted before a resync from here, so
                // neither the start-up wait nor a fence is needed.
                if v.peer_outdated && v.disk == DiskState::UpToDate && !self.standby {
                    self.because(
                        "peer lost; its copy is outdated by its own word: taking over without a fence",
                        out,
                    );
                    self.attempt(Action::Promote, now, out);
                    return;
                }
                if !self.heard_once && !self.forced {
                    self.because(
                        "waiting to hear the peer once before any promotion (`hadb volume primary --force` to start without it)",
                        out,
                    );
                    return;
                }
                if v.disk != DiskState::UpToDate {
                    self.because(
                        format!(
                            "peer lost, but this copy is {}: not promoting",
                            disk_name(v.disk)
                        ),
                        out,
                    );
                    return;
                }
                if let Some(g) = self.peer_may_be_newer {
                    self.because(
                        format!(
                            "peer lost; it was last heard up to date at generation {g:016x}, which this copy does not hold: promoting could lose its writes, so not promoting (rule 14; `hadb volume primary --force` if its data may go)"
                        ),
                        out,
                    );
                    return;
                }
                if self.standby {
                    self.because("peer lost; standby: not promoting", out);
                    return;
                }
                if let Some(vote) = i.vote.filter(|v| *v != Vote::Mine) {
                    self.because(
                        format!("peer lost and no quorum ({}): not promoting", vote.name()),
                        out,
                    );
                    return;
                }
                let lost_for = now.saturating_sub(self.lost_since_us.unwrap_or(now));
                // The peer said it restarts in place: its successor gets
                // restart_grace before the usual delay runs.
                let restarting = i.peer.is_some_and(|p| p.restarting);
                let delay = if i.vote.is_some() {
                    // The witness chose this side: no race to give the
                    // primary a head start in.
                    0
                } else if restarting {
                    self.cfg.restart_grace_us + self.cfg.fence_delay_us
                } else {
                    self.cfg.fence_delay_us
                };
                if restarting && lost_for < delay && self.fence == Fence::None {
                    self.because(
                        "peer lost while restarting in place: waiting restart_grace for its successor",
                        out,
                    );
                    return;
                }
                if lost_for < delay && self.fence == Fence::None {
                    self.because(
                        "peer lost: waiting fence_delay before fencing it, so a surviving primary fences first",
                        out,
                    );
                    return;
                }
                if self.fenced(now, out) {
                    self.because("the peer is fenced: taking over", out);
                    self.attempt(Action::Promote, now, out);
                } else {
                    self.because(
                        "peer lost: waiting for the fence to be confirmed (`hadb fence confirm PEER` once it is off)",
                        out,
                    );
                }
            }
        }
    }
}

fn disk_name(d: DiskState) -> &'static str {
    match d {
        DiskState::UpToDate => "up_to_date",
        DiskState::Outdated => "outdated",
        DiskState::Inconsistent => "inconsistent",
        DiskState::Failed => "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;
    /// The generation both copies hold, and a primary's outdate token.
    const GEN: u64 = 0x6e;
    const TOKEN: u64 = 0x70;

    fn cfg(me_first: bool) -> Config {
        Config {
            me_first,
            fence_delay_us: 5 * S,
            retry_us: S,
            start_grace_us: 0,
            restart_grace_us: 30 * S,
            self_fence_after_us: None,
            fence_retry_us: Some(30 * S),
            settings: Settings::default(),
        }
    }

    fn vol(role: Role) -> VolumeView {
        VolumeView {
            role,
            disk: DiskState::UpToDate,
            link: LinkState::Connected,
            frozen: false,
            peer_up_to_date: role == Role::Primary,
            peer_outdated: false,
            current_gen: GEN,
            bitmap_gen: 0,
            outdate_token: TOKEN,
            outdated_for: 0,
        }
    }

    fn peer(primary: bool) -> PeerView {
        PeerView {
            primary,
            disk: DiskState::UpToDate,
            standby: false,
            asks_outdate: false,
            service_failed: false,
            restarting: false,
            current_gen: GEN,
            outdate_token: 0,
            settings: Settings::default(),
        }
    }

    fn at(now_s: u64, volume: VolumeView, peer: Option<PeerView>) -> Inputs {
        Inputs {
            now_us: now_s * S,
            volume,
            peer_alive: peer.is_some(),
            peer,
            service_failed: false,
            vote: None,
        }
    }

    fn acts(a: &[Action]) -> Vec<Action> {
        a.iter()
            .filter(|x| !matches!(x, Action::Log { .. }))
            .cloned()
            .collect()
    }

    #[test]
    fn start_up_waits_for_the_peer_then_the_first_name_promotes() {
        let mut a = Manager::new(cfg(true));
        let mut b = Manager::new(cfg(false));
        let sec = vol(Role::Secondary);
        assert!(acts(&a.step(&at(0, sec, None))).is_empty());
        assert!(a.reason().contains("waiting to hear the peer"));
        assert_eq!(a.history().count(), 1, "one transition so far");
        assert_eq!(
            acts(&a.step(&at(1, sec, Some(peer(false))))),
            vec![Action::Promote]
        );
        assert!(acts(&b.step(&at(1, sec, Some(peer(false))))).is_empty());
        // Refused (say, the role request lost a race): retried, not hammered.
        assert!(acts(&a.step(&at(1, sec, Some(peer(false))))).is_empty());
        assert_eq!(
            acts(&a.step(&at(2, sec, Some(peer(false))))),
            vec![Action::Promote]
        );
        // A standby first node leaves the role to the other.
        let mut b2 = Manager::new(cfg(false));
        let standby_peer = PeerView {
            standby: true,
            ..peer(false)
        };
        assert_eq!(
            acts(&b2.step(&at(1, sec, Some(standby_peer)))),
            vec![Action::Promote]
        );
    }

    #[test]
    fn a_failed_mysqld_hands_the_primary_role_to_the_peer_and_stays_out() {
        let mut a = Manager::new(cfg(true));
        let pri = vol(Role::Primary);
        let failed = |i: Inputs| Inputs {
            service_failed: true,
            ..i
        };
        assert_eq!(
            acts(&a.step(&failed(at(1, pri, Some(peer(false)))))),
            vec![Action::Demote]
        );
        // Not while the peer cannot take over: a primary with a failed
        // mysqld is still the only copy that takes writes.
        let mut a2 = Manager::new(cfg(true));
        let behind = PeerView {
            disk: DiskState::Inconsistent,
            ..peer(false)
        };
        assert!(acts(&a2.step(&failed(at(1, pri, Some(behind))))).is_empty());
        assert!(a2.reason().contains("cannot take over"), "{}", a2.reason());
        let dead_too = PeerView {
            service_failed: true,
            ..peer(false)
        };
        assert!(acts(&a2.step(&failed(at(2, pri, Some(dead_too))))).is_empty());
        // Secondary now: the first name does not take the role back while
        // its mysqld is failed; the other node does.
        let sec = vol(Role::Secondary);
        assert!(acts(&a.step(&failed(at(3, sec, Some(peer(false)))))).is_empty());
        assert!(a.reason().contains("mysqld failed here"), "{}", a.reason());
        let mut b = Manager::new(cfg(false));
        let failed_peer = PeerView {
            service_failed: true,
            ..peer(false)
        };
        assert_eq!(
            acts(&b.step(&at(3, sec, Some(failed_peer)))),
            vec![Action::Promote]
        );
    }

    #[test]
    fn a_heard_peer_never_lets_a_node_promote_without_the_replication_link() {
        let mut b = Manager::new(cfg(false));
        let sec = VolumeView {
            link: LinkState::Connecting,
            ..vol(Role::Secondary)
        };
        // The peer's last report says secondary and not up to date (it was
        // sent just before it became primary): no promotion.
        let stale = PeerView {
            disk: DiskState::Inconsistent,
            ..peer(false)
        };
        for t in 0..5 {
            assert!(acts(&b.step(&at(t, sec, Some(stale)))).is_empty());
        }
        assert!(
            b.reason().contains("replication link is down"),
            "{}",
            b.reason()
        );
        let linked = VolumeView {
            link: LinkState::Connected,
            ..sec
        };
        assert_eq!(
            acts(&b.step(&at(6, linked, Some(stale)))),
            vec![Action::Promote]
        );
    }

    #[test]
    fn a_lost_primary_is_fenced_after_the_delay_then_the_secondary_takes_over() {
        let mut b = Manager::new(cfg(false));
        let sec = vol(Role::Secondary);
        b.step(&at(0, sec, Some(peer(true))));
        assert!(
            acts(&b.step(&at(10, sec, None))).is_empty(),
            "fence_delay first"
        );
        assert!(acts(&b.step(&at(14, sec, None))).is_empty());
        assert_eq!(acts(&b.step(&at(15, sec, None))), vec![Action::Fence]);
        assert!(
            acts(&b.step(&at(20, sec, None))).is_empty(),
            "not confirmed yet"
        );
        assert!(matches!(b.fence(), Fence::Pending { .. }));
        b.fence_confirmed(21 * S).unwrap();
        assert_eq!(acts(&b.step(&at(21, sec, None))), vec![Action::Promote]);
        // Primary now, I/O held for the fenced peer: released.
        let pri = VolumeView {
            frozen: true,
            peer_up_to_date: false,
            link: LinkState::Connecting,
            ..vol(Role::Primary)
        };
        assert_eq!(
            acts(&b.step(&at(22, pri, None))),
            vec![Action::PeerProvenOutdated(
                "the peer was fenced (confirmed)",
                false
            )]
        );
        // The old primary comes back: the fence is history.
        b.step(&at(30, pri, Some(peer(false))));
        assert_eq!(b.fence(), Fence::None);
    }

    #[test]
    fn a_primary_fences_a_lost_peer_at_once_so_it_wins_the_race() {
        let mut a = Manager::new(cfg(true));
        let pri = vol(Role::Primary);
        a.step(&at(0, pri, Some(peer(false))));
        // Lost on every ring; the replication link has not timed out, so
        // I/O is not frozen yet: the primary fences anyway, without the
        // delay the secondary waits.
        assert_eq!(acts(&a.step(&at(1, pri, None))), vec![Action::Fence]);
        assert!(a.reason().contains("fencing it first"), "{}", a.reason());
        a.fence_confirmed(2 * S).unwrap();
        a.step(&at(2, pri, None));
        assert_eq!(a.reason(), "primary; the peer is fenced");
        // A peer that outdated itself takes over from nobody: no fence.
        let mut a2 = Manager::new(cfg(true));
        let alone = VolumeView {
            peer_outdated: true,
            peer_up_to_date: false,
            link: LinkState::Connecting,
            ..pri
        };
        a2.step(&at(0, alone, Some(peer(false))));
        assert!(acts(&a2.step(&at(1, alone, None))).is_empty());
        assert_eq!(a2.fence(), Fence::None);
    }

    #[test]
    fn the_operators_fence_holds_while_the_peer_is_heard_until_its_methods_ran() {
        let mut b = Manager::new(cfg(false));
        let sec = vol(Role::Secondary);
        b.step(&at(0, sec, Some(peer(true))));
        b.fence_by_operator(S).unwrap();
        assert_eq!(b.fences_requested, 1);
        // Heard: a lost-peer fence would be cleared; this one is not.
        assert!(acts(&b.step(&at(2, sec, Some(peer(true))))).is_empty());
        assert!(matches!(
            b.fence(),
            Fence::Pending {
                by_operator: true,
                ..
            }
        ));
        // Its methods failed: the peer is heard, so it is over.
        b.fence_failed();
        b.step(&at(3, sec, Some(peer(true))));
        assert_eq!(b.fence(), Fence::None);
        // Again, and this time it works: the peer goes silent and this
        // node takes over at once, without waiting fence_delay, and
        // without a second fence.
        b.fence_by_operator(4 * S).unwrap();
        b.fence_confirmed(5 * S).unwrap();
        assert_eq!(acts(&b.step(&at(5, sec, None))), vec![Action::Promote]);
        assert!(b.fence_by_operator(6 * S).is_err(), "confirmed already");
        // The methods failing leaves a lost peer's fence pending for the
        // operator's confirmation.
        let mut c = Manager::new(cfg(false));
        c.step(&at(0, sec, Some(peer(true))));
        c.step(&at(6, sec, None));
        assert_eq!(acts(&c.step(&at(11, sec, None))), vec![Action::Fence]);
        c.fence_by_operator(12 * S).unwrap();
        assert_eq!(c.fences_requested, 1, "the same fence, retried");
        c.fence_failed();
        c.step(&at(13, sec, None));
        assert!(matches!(
            c.fence(),
            Fence::Pending {
                by_operator: false,
                ..
            }
        ));
    }

    #[test]
    fn no_promotion_with_a_copy_that_is_not_up_to_date_or_without_ever_hearing_the_peer() {
        let mut b = Manager::new(cfg(false));
        b.step(&at(0, vol(Role::Secondary), Some(peer(true))));
        let outdated = VolumeView {
            disk: DiskState::Outdated,
            ..vol(Role::Secondary)
        };
        for t in [10, 20, 30] {
            assert!(acts(&b.step(&at(t, outdated, None))).is_empty());
        }
        assert_eq!(b.fence(), Fence::None);
        let mut fresh = Manager::new(cfg(true));
        for t in [0, 10, 20] {
            assert!(acts(&fresh.step(&at(t, vol(Role::Secondary), None))).is_empty());
        }
        // Forced: it has not heard the peer for longer than fence_delay,
        // so it fences at once.
        fresh.force_start();
        assert_eq!(
            acts(&fresh.step(&at(21, vol(Role::Secondary), None))),
            vec![Action::Fence]
        );
    }

    #[test]
    fn a_node_whose_peer_outdated_itself_starts_and_takes_over_without_a_fence() {
        let mut a = Manager::new(cfg(true));
        let sec = VolumeView {
            peer_outdated: true,
            link: LinkState::Connecting,
            ..vol(Role::Secondary)
        };
        // Just started, the peer never heard: no wait, no fence.
        assert_eq!(acts(&a.step(&at(0, sec, None))), vec![Action::Promote]);
        assert_eq!(a.fence(), Fence::None);
        // Without that proof it waits, as rule 1 says.
        let mut b = Manager::new(cfg(true));
        assert!(acts(&b.step(&at(0, vol(Role::Secondary), None))).is_empty());
    }

    #[test]
    fn a_primary_whose_disk_failed_hands_over_and_never_fences() {
        let mut a = Manager::new(cfg(true));
        let failed = VolumeView {
            disk: DiskState::Failed,
            ..vol(Role::Primary)
        };
        assert_eq!(
            acts(&a.step(&at(0, failed, Some(peer(false))))),
            vec![Action::Demote],
            "rule 15"
        );
        let mut b = Manager::new(cfg(true));
        let cut_off = VolumeView {
            link: LinkState::Connecting,
            peer_up_to_date: false,
            ..failed
        };
        b.step(&at(0, cut_off, Some(peer(false))));
        for t in [1, 10, 60] {
            let lost = Inputs {
                peer_alive: false,
                ..at(t, cut_off, Some(peer(false)))
            };
            assert!(acts(&b.step(&lost)).is_empty());
        }
        assert_eq!(b.fence(), Fence::None);
        assert!(b.reason().contains("rule 15"), "{}", b.reason());
    }

    #[test]
    fn a_primary_alone_keeps_asking_a_peer_it_hears_to_outdate_itself() {
        let mut a = Manager::new(cfg(true));
        let alone = VolumeView {
            link: LinkState::Connecting,
            peer_up_to_date: false,
            current_gen: GEN + 1,
            bitmap_gen: GEN,
            ..vol(Role::Primary)
        };
        assert!(acts(&a.step(&at(0, alone, Some(peer(false))))).is_empty());
        assert_eq!(a.flags(), (false, true), "rule 12");
        let linked = VolumeView {
            link: LinkState::SyncSource,
            ..alone
        };
        a.step(&at(1, linked, Some(peer(false))));
        assert_eq!(a.flags(), (false, false), "the link settles it");
    }

    #[test]
    fn a_secondary_outdates_itself_when_it_hears_a_primary_at_another_generation() {
        let mut b = Manager::new(cfg(false));
        let sec = VolumeView {
            link: LinkState::Connecting,
            ..vol(Role::Secondary)
        };
        let ahead = PeerView {
            current_gen: GEN + 1,
            outdate_token: 9,
            ..peer(true)
        };
        assert_eq!(
            acts(&b.step(&at(0, sec, Some(ahead)))),
            vec![Action::OutdateSelf(9)],
            "rule 13"
        );
        // Already outdated, asked again for a new spell: answers it.
        let outdated = VolumeView {
            disk: DiskState::Outdated,
            outdated_for: 9,
            ..sec
        };
        let asking = PeerView {
            asks_outdate: true,
            outdate_token: 10,
            ..ahead
        };
        assert_eq!(
            acts(&b.step(&at(5, outdated, Some(asking)))),
            vec![Action::OutdateSelf(10)]
        );
        let answered = VolumeView {
            outdated_for: 10,
            ..outdated
        };
        assert!(acts(&b.step(&at(10, answered, Some(asking)))).is_empty());
    }

    #[test]
    fn a_secondary_never_promotes_over_a_peer_last_heard_at_a_generation_it_lacks() {
        let mut b = Manager::new(cfg(false));
        let sec = VolumeView {
            link: LinkState::Connecting,
            ..vol(Role::Secondary)
        };
        // The peer, back from a crash as secondary, holds a generation
        // this copy does not (it wrote alone before it crashed).
        let newer = PeerView {
            current_gen: GEN + 1,
            ..peer(false)
        };
        b.step(&at(0, sec, Some(newer)));
        let lost = |t| Inputs {
            peer_alive: false,
            ..at(t, sec, Some(newer))
        };
        for t in [1, 10, 60] {
            let a = acts(&b.step(&lost(t)));
            assert!(
                !a.contains(&Action::Promote) && !a.contains(&Action::Fence),
                "{a:?}"
            );
        }
        assert!(b.reason().contains("rule 14"), "{}", b.reason());
        // A peer left behind at this copy's bitmap generation is older:
        // the usual fence and takeover.
        let mut c = Manager::new(cfg(false));
        let ahead_here = VolumeView {
            current_gen: GEN + 1,
            bitmap_gen: GEN,
            ..sec
        };
        c.step(&at(0, ahead_here, Some(peer(false))));
        let gone = |t| Inputs {
            peer_alive: false,
            ..at(t, ahead_here, Some(peer(false)))
        };
        assert!(acts(&c.step(&gone(1))).is_empty(), "fence_delay first");
        assert_eq!(acts(&c.step(&gone(10))), vec![Action::Fence]);
    }

    #[test]
    fn link_down_heartbeat_up_goes_alone_only_after_the_peer_outdates_itself() {
        let mut a = Manager::new(cfg(true));
        let mut b = Manager::new(cfg(false));
        let pri = VolumeView {
            frozen: true,
            peer_up_to_date: false,
            link: LinkState::Connecting,
            ..vol(Role::Primary)
        };
        assert!(acts(&a.step(&at(0, pri, Some(peer(false))))).is_empty());
        assert_eq!(
            a.flags(),
            (false, true),
            "heartbeats ask the peer to outdate"
        );
        let sec = VolumeView {
            link: LinkState::Connecting,
            ..vol(Role::Secondary)
        };
        let asking = PeerView {
            asks_outdate: true,
            outdate_token: TOKEN,
            ..peer(true)
        };
        assert_eq!(
            acts(&b.step(&at(0, sec, Some(asking)))),
            vec![Action::OutdateSelf(TOKEN)]
        );
        // An "outdated" that answers another spell without the link (the
        // link came up and went since) is no proof: asked again.
        let stale = PeerView {
            disk: DiskState::Outdated,
            outdate_token: TOKEN - 1,
            ..peer(false)
        };
        assert!(acts(&a.step(&at(1, pri, Some(stale)))).is_empty());
        assert_eq!(a.flags(), (false, true), "asked again");
        let outdated_peer = PeerView {
            disk: DiskState::Outdated,
            outdate_token: TOKEN,
            ..peer(false)
        };
        assert_eq!(
            acts(&a.step(&at(1, pri, Some(outdated_peer)))),
            vec![Action::PeerProvenOutdated(
                "the peer said over the heartbeat that its copy is outdated",
                true
            )]
        );
        // Never a fence while the peer is heard.
        assert_eq!(a.fence(), Fence::None);
    }

    #[test]
    fn standby_and_switchover_hand_over_only_to_a_peer_that_can_take_it() {
        let mut a = Manager::new(cfg(true));
        let pri = vol(Role::Primary);
        a.set_standby(true);
        assert_eq!(
            acts(&a.step(&at(0, pri, Some(peer(false))))),
            vec![Action::Demote]
        );
        let behind = VolumeView {
            peer_up_to_date: false,
            ..pri
        };
        let mut a2 = Manager::new(cfg(true));
        a2.set_standby(true);
        assert!(acts(&a2.step(&at(0, behind, Some(peer(false))))).is_empty());
        assert!(a2.reason().contains("cannot take over"));
        let mut a3 = Manager::new(cfg(true));
        assert!(a3.switchover(&vol(Role::Secondary)).is_err());
        a3.switchover(&pri).unwrap();
        assert_eq!(a3.flags(), (true, false), "heartbeats say: handing over");
        assert_eq!(
            acts(&a3.step(&at(0, pri, Some(peer(false))))),
            vec![Action::Demote]
        );
        // Demoted, it does not take the role back while handing over...
        assert!(acts(&a3.step(&at(1, vol(Role::Secondary), Some(peer(false))))).is_empty());
        // ...and once the peer is primary the handover is done.
        a3.step(&at(2, vol(Role::Secondary), Some(peer(true))));
        assert_eq!(a3.flags(), (false, false));
    }

    fn lost(now_s: u64, volume: VolumeView, last: PeerView, vote: Option<Vote>) -> Inputs {
        Inputs {
            peer_alive: false,
            peer: Some(last),
            vote,
            ..at(now_s, volume, None)
        }
    }

    #[test]
    fn a_primary_just_started_listens_before_it_fences() {
        let mut m = Manager::new(Config {
            start_grace_us: 2 * S,
            ..cfg(true)
        });
        let v = vol(Role::Primary);
        assert_eq!(acts(&m.step(&at(0, v, None))), vec![]);
        assert_eq!(acts(&m.step(&at(1, v, None))), vec![]);
        assert!(m.reason().contains("listening"), "{}", m.reason());
        // Still unheard after the grace: lost, fenced first.
        assert_eq!(acts(&m.step(&at(2, v, None))), vec![Action::Fence]);
    }

    #[test]
    fn a_peer_restarting_in_place_gets_restart_grace() {
        let mut m = Manager::new(cfg(false));
        let v = vol(Role::Secondary);
        let restarting = PeerView {
            restarting: true,
            ..peer(true)
        };
        m.step(&at(0, v, Some(restarting)));
        for t in [1, 6, 34] {
            assert_eq!(acts(&m.step(&lost(t, v, restarting, None))), vec![]);
        }
        assert!(m.reason().contains("restarting"), "{}", m.reason());
        assert_eq!(
            acts(&m.step(&lost(36, v, restarting, None))),
            vec![Action::Fence]
        );
    }

    #[test]
    fn with_a_witness_only_the_vote_holder_fences_and_at_once() {
        let v = vol(Role::Secondary);
        // The vote went to the peer (the primary): never fence, never
        // promote, however long.
        let mut m = Manager::new(cfg(false));
        m.step(&at(0, v, Some(peer(true))));
        for t in [1, 10, 100] {
            assert_eq!(
                acts(&m.step(&lost(t, v, peer(true), Some(Vote::Peers)))),
                vec![]
            );
        }
        assert!(m.reason().contains("no quorum"), "{}", m.reason());
        // The vote is this node's: no fence_delay (the witness chose).
        let mut m = Manager::new(cfg(false));
        m.step(&at(0, v, Some(peer(true))));
        assert_eq!(
            acts(&m.step(&lost(1, v, peer(true), Some(Vote::Mine)))),
            vec![Action::Fence]
        );
        m.fence_confirmed(2 * S).unwrap();
        assert_eq!(
            acts(&m.step(&lost(2, v, peer(true), Some(Vote::Mine)))),
            vec![Action::Promote]
        );
    }

    #[test]
    fn a_primary_without_the_vote_holds_and_fences_itself_after_the_grace() {
        let mut m = Manager::new(Config {
            self_fence_after_us: Some(4 * S),
            ..cfg(true)
        });
        let v = VolumeView {
            frozen: true,
            link: LinkState::Standalone,
            ..vol(Role::Primary)
        };
        m.step(&at(0, vol(Role::Primary), Some(peer(false))));
        for t in [1, 4] {
            let a = acts(&m.step(&lost(t, v, peer(false), Some(Vote::Unheard))));
            assert_eq!(a, vec![], "no fence, no going alone without quorum");
        }
        assert_eq!(
            acts(&m.step(&lost(5, v, peer(false), Some(Vote::Unheard)))),
            vec![Action::SelfFence]
        );
        assert!(m.self_fenced());
        // Never undone: quorum back, still fenced, nothing else done.
        assert_eq!(acts(&m.step(&at(6, v, Some(peer(false))))), vec![]);
        assert!(m.reason().contains("self-fenced"), "{}", m.reason());
    }

    #[test]
    fn a_secondary_that_never_heard_its_peer_does_not_fence_itself() {
        let mut m = Manager::new(Config {
            self_fence_after_us: Some(4 * S),
            ..cfg(true)
        });
        let v = vol(Role::Secondary);
        for t in [0, 5, 50] {
            let i = Inputs {
                vote: Some(Vote::Unheard),
                ..at(t, v, None)
            };
            assert_eq!(acts(&m.step(&i)), vec![]);
        }
        assert!(!m.self_fenced());
    }

    #[test]
    fn a_failed_fence_is_tried_again_after_the_retry_time() {
        let mut m = Manager::new(cfg(true));
        let v = vol(Role::Primary);
        m.step(&at(0, v, Some(peer(false))));
        assert_eq!(acts(&m.step(&at(1, v, None))), vec![Action::Fence]);
        m.fence_failed();
        for t in [2, 20, 30] {
            assert_eq!(acts(&m.step(&at(t, v, None))), vec![], "at {t} s");
        }
        assert_eq!(acts(&m.step(&at(31, v, None))), vec![Action::Fence]);
        // Without an automatic method, nothing is retried.
        let mut m = Manager::new(Config {
            fence_retry_us: None,
            ..cfg(true)
        });
        m.step(&at(0, v, Some(peer(false))));
        m.step(&at(1, v, None));
        m.fence_failed();
        assert_eq!(acts(&m.step(&at(100, v, None))), vec![]);
    }

    #[test]
    fn settings_that_differ_stop_every_takeover_and_say_which() {
        use crate::config::Mode;
        let mine = Settings::new(Mode::Sync, true, Some("w"), S, 5 * S, 6 * S);
        let theirs = Settings::new(Mode::Sync, false, Some("w"), S, 5 * S, 6 * S);
        let mut m = Manager::new(Config {
            settings: mine,
            ..cfg(true)
        });
        let differs = PeerView {
            settings: theirs,
            ..peer(false)
        };
        // Heard, nobody primary, this node first by name: it would take
        // the role; the settings differ, so it stays as it is.
        let linked = VolumeView {
            link: LinkState::Connected,
            ..vol(Role::Secondary)
        };
        let a = m.step(&at(1, linked, Some(differs)));
        assert!(!a.contains(&Action::Promote), "{a:?}");
        assert!(m.reason().contains("rule 16"), "{}", m.reason());
        assert!(
            m.settings_mismatch()
                .is_some_and(|s| s.contains("fencing.methods differs")),
            "{:?}",
            m.settings_mismatch()
        );
        let warned = |a: &[Action]| {
            a.iter()
                .filter(|a| matches!(a, Action::Log { warn: true, .. }))
                .count()
        };
        assert_eq!(warned(&a), 1, "logged once");
        // Lost: no fence, no promotion, however long; logged no more.
        for s in 2..60 {
            let mut i = at(s, vol(Role::Secondary), Some(differs));
            i.peer_alive = false;
            let a = m.step(&i);
            assert!(
                !a.iter()
                    .any(|a| matches!(a, Action::Fence | Action::Promote)),
                "{a:?}"
            );
            assert_eq!(warned(&a), 0, "{a:?}");
        }
        assert_eq!(m.fence(), Fence::None);
        // A primary whose peer is lost neither fences nor goes on alone.
        let mut p = Manager::new(Config {
            settings: mine,
            ..cfg(true)
        });
        let frozen = VolumeView {
            frozen: true,
            ..vol(Role::Primary)
        };
        p.step(&at(1, frozen, Some(differs)));
        for s in 2..30 {
            let mut i = at(s, frozen, Some(differs));
            i.peer_alive = false;
            let a = p.step(&i);
            assert!(
                !a.iter().any(|a| matches!(
                    a,
                    Action::Fence | Action::PeerProvenOutdated(..) | Action::Demote
                )),
                "{a:?}"
            );
        }
        // The peer comes back with the same settings: the rules run again.
        let same = PeerView {
            settings: mine,
            ..peer(false)
        };
        let a = m.step(&at(61, linked, Some(same)));
        assert!(a.contains(&Action::Promote), "{a:?}");
        assert_eq!(m.settings_mismatch(), None);
    }
}
