//! Supervision of the local service (mysqld), as a pure state machine: it
//! decides when to start, check, signal and restart the process, and when
//! to give up so the manager hands the primary role over. It never spawns,
//! signals or reads a clock itself: the driver (`run::mysqld`) reports
//! spawns, exits and health-check results with the time, and carries out
//! the actions. Pacemaker's resource agent and fail-count in the old stack.

/// What one health check over mysqld's socket found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// No socket, or nobody accepts on it: mysqld is not (yet) serving.
    NotStarted,
    /// mysqld answers but says it is starting or stopping.
    Starting,
    Healthy,
    /// A connection, but no answer within the check's timeout.
    Hung,
    /// An answer that is an error (authentication, the write probe, a
    /// malformed packet): mysqld runs but is not serving as it should.
    Failing(String),
}

/// How the supervisor is tuned (`[mysql]` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// From spawn to the first healthy check (InnoDB recovery may take
    /// minutes); past it the start failed.
    pub start_timeout_us: u64,
    /// From SIGTERM to SIGKILL.
    pub stop_timeout_us: u64,
    /// Between two health checks.
    pub health_interval_us: u64,
    /// This many bad checks in a row on a running mysqld count as a crash.
    pub health_failures: u32,
    /// At most this many restarts within `restart_window_us`; one more
    /// failure and the service is failed here.
    pub max_restarts: u32,
    pub restart_window_us: u64,
}

/// Where the service is, one doc line per state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Not wanted (this node is not primary) and not running.
    Stopped,
    /// Wanted; waiting out the back-off before the next start.
    Waiting { until_us: u64 },
    /// Spawned, not yet healthy: recovery may be running.
    Starting { pid: u32, since_us: u64 },
    /// Healthy at its first check; `bad` checks in a row since the last
    /// good one.
    Running { pid: u32, since_us: u64, bad: u32 },
    /// SIGTERM sent at `since_us`; SIGKILL too once `killed`. The
    /// filesystem is unmounted only after the exit.
    Stopping {
        pid: u32,
        since_us: u64,
        killed: bool,
    },
    /// Failed too often here: left down until the operator resets it. The
    /// manager hands the primary role to the peer.
    Failed { why: String },
    /// Wanted, but the datadir holds no database yet: not a failure, it
    /// waits for `hadb mysql init`.
    Uninitialised,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Term,
    Kill,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start mysqld; answer with [`Supervisor::spawned`] or
    /// [`Supervisor::spawn_failed`].
    Spawn,
    Signal(u32, Signal),
    /// Run one health check against mysqld; answer with
    /// [`Supervisor::health`].
    Check(u32),
    /// The service is down, nothing of it runs: the filesystem may go.
    Stopped,
    Log {
        warn: bool,
        message: String,
    },
}

/// The service as status, the probe, the heartbeat and the manager see it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct View {
    /// stopped, waiting, starting, healthy, unhealthy, stopping, failed.
    pub state: &'static str,
    pub pid: Option<u32>,
    /// The last health check's finding, in words.
    pub health: String,
    /// Restarts after a crash or a failed check within the window.
    pub restarts: u32,
    /// Restarts since hadb started.
    pub restarts_total: u64,
    /// Why it is failed, or what the last failure was.
    pub last_failure: Option<String>,
}

impl View {
    pub fn healthy(&self) -> bool {
        self.state == "healthy"
    }
    pub fn failed(&self) -> bool {
        self.state == "failed"
    }
}

/// Whether a running process (its command line, `/proc/PID/cmdline`
/// split at NULs) is the service hadb would run with `command` on
/// `datadir`: the same command line, or the same program (by file name,
/// so a changed install path still matches) with `--datadir=DATADIR`.
/// What a new hadb process adopts after a restart in place.
pub fn is_service(cmdline: &[String], command: &[String], datadir: &str) -> bool {
    if cmdline.is_empty() {
        return false;
    }
    if cmdline == command {
        return true;
    }
    let name = |p: &str| p.rsplit('/').next().unwrap_or(p).to_owned();
    let (Some(program), Some(theirs)) = (command.first(), cmdline.first()) else {
        return false;
    };
    let datadir = datadir.trim_end_matches('/');
    name(program) == name(theirs)
        && cmdline[1..].iter().any(|a| {
            a.strip_prefix("--datadir=")
                .is_some_and(|d| d.trim_end_matches('/') == datadir)
        })
}

pub struct Supervisor {
    policy: Policy,
    state: State,
    /// This node wants the service running (it is primary).
    wanted: bool,
    /// A check is out; one at a time.
    checking: bool,
    next_check_us: u64,
    /// When each recent restart was decided, for the window.
    restarts: Vec<u64>,
    restarts_total: u64,
    health: String,
    last_failure: Option<String>,
    /// Given up while the last process was still being killed: failed
    /// once it is gone.
    failed_after_stop: Option<String>,
}

/// Back-off before restart number `n` (0-based) in the window: 1 s, 2 s,
/// 4 s … capped at 30 s, so a crash loop does not spin but a single crash
/// comes back at once.
fn backoff_us(n: usize) -> u64 {
    (1_000_000u64 << n.min(5)).min(30_000_000)
}

impl Supervisor {
    pub fn new(policy: Policy) -> Supervisor {
        Supervisor {
            policy,
            state: State::Stopped,
            wanted: false,
            checking: false,
            next_check_us: 0,
            restarts: Vec::new(),
            restarts_total: 0,
            health: "not checked".into(),
            last_failure: None,
            failed_after_stop: None,
        }
    }

    /// A reloaded configuration: from the next decision on.
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn view(&self) -> View {
        let (state, pid) = match &self.state {
            State::Stopped => ("stopped", None),
            State::Waiting { .. } => ("waiting", None),
            State::Starting { pid, .. } => ("starting", Some(*pid)),
            State::Running { pid, bad: 0, .. } => ("healthy", Some(*pid)),
            State::Running { pid, .. } => ("unhealthy", Some(*pid)),
            State::Stopping { pid, .. } => ("stopping", Some(*pid)),
            State::Failed { .. } => ("failed", None),
            State::Uninitialised => ("uninitialised", None),
        };
        let state = if self.failed_after_stop.is_some() {
            "failed"
        } else {
            state
        };
        View {
            state,
            pid,
            health: self.health.clone(),
            restarts: self.restarts.len() as u32,
            restarts_total: self.restarts_total,
            last_failure: self.last_failure.clone(),
        }
    }

    /// This node became primary with the filesystem mounted: run mysqld.
    pub fn start(&mut self, now_us: u64) -> Vec<Action> {
        self.wanted = true;
        let mut out = Vec::new();
        match &self.state {
            State::Stopped => {
                self.state = State::Waiting { until_us: now_us };
                self.tick_into(now_us, &mut out);
            }
            State::Failed { why } => out.push(Action::Log {
                warn: true,
                message: format!(
                    "mysqld: not started: it failed here ({why}); `hadb mysql reset` once the cause is fixed"
                ),
            }),
            // Already on its way, or stopping: the stop ends, then the
            // start follows (see `exited`).
            _ => {}
        }
        out
    }

    /// This node steps down: stop mysqld; [`Action::Stopped`] says when
    /// nothing of it runs any more.
    pub fn stop(&mut self, now_us: u64) -> Vec<Action> {
        self.wanted = false;
        let mut out = Vec::new();
        match self.state.clone() {
            State::Stopped | State::Failed { .. } => out.push(Action::Stopped),
            State::Uninitialised => {
                self.state = State::Stopped;
                out.push(Action::Stopped);
            }
            State::Waiting { .. } => {
                self.state = State::Stopped;
                out.push(Action::Stopped);
            }
            State::Starting { pid, .. } | State::Running { pid, .. } => {
                out.push(Action::Log {
                    warn: false,
                    message: format!("mysqld: stopping (SIGTERM to {pid})"),
                });
                out.push(Action::Signal(pid, Signal::Term));
                self.state = State::Stopping {
                    pid,
                    since_us: now_us,
                    killed: false,
                };
            }
            State::Stopping { .. } => {}
        }
        out
    }

    /// A mysqld that outlived an earlier hadb (restart in place): watch it
    /// as if this process had started it.
    pub fn adopt(&mut self, pid: u32, now_us: u64) -> Vec<Action> {
        self.wanted = true;
        self.state = State::Starting {
            pid,
            since_us: now_us,
        };
        self.next_check_us = now_us;
        vec![Action::Log {
            warn: false,
            message: format!("mysqld: adopted the running mysqld (pid {pid})"),
        }]
    }

    /// The operator says the cause of the failures is fixed.
    pub fn reset(&mut self, now_us: u64) -> Vec<Action> {
        self.restarts.clear();
        self.last_failure = None;
        self.failed_after_stop = None;
        if matches!(self.state, State::Failed { .. }) {
            self.state = State::Stopped;
            if self.wanted {
                return self.start(now_us);
            }
        }
        Vec::new()
    }

    pub fn spawned(&mut self, pid: u32, now_us: u64) -> Vec<Action> {
        self.state = State::Starting {
            pid,
            since_us: now_us,
        };
        // Recovery takes a moment at least; the first check after one
        // interval.
        self.next_check_us = now_us + self.policy.health_interval_us;
        vec![Action::Log {
            warn: false,
            message: format!("mysqld: started (pid {pid}); waiting for it to answer"),
        }]
    }

    /// The datadir holds no database: wait for `hadb mysql init` rather
    /// than count failures that a restart cannot fix.
    pub fn uninitialised(&mut self, why: &str) -> Vec<Action> {
        self.state = State::Uninitialised;
        self.health = why.to_owned();
        vec![Action::Log {
            warn: true,
            message: format!("mysqld: not started: {why}"),
        }]
    }

    /// `hadb mysql init` made the database: start it if wanted.
    pub fn initialised(&mut self, now_us: u64) -> Vec<Action> {
        if self.state == State::Uninitialised {
            self.state = State::Stopped;
            if self.wanted {
                return self.start(now_us);
            }
        }
        Vec::new()
    }

    pub fn spawn_failed(&mut self, error: &str, now_us: u64) -> Vec<Action> {
        let mut out = Vec::new();
        self.failure(format!("cannot start it: {error}"), now_us, &mut out);
        out
    }

    /// The process `pid` ended; `how` says how, in words.
    pub fn exited(&mut self, pid: u32, how: &str, now_us: u64) -> Vec<Action> {
        let mut out = Vec::new();
        match self.state.clone() {
            State::Stopping { pid: p, .. } if p == pid => {
                out.push(Action::Log {
                    warn: false,
                    message: format!("mysqld: stopped ({how})"),
                });
                self.state = State::Stopped;
                self.checking = false;
                if let Some(why) = self.failed_after_stop.take() {
                    self.state = State::Failed { why };
                    if !self.wanted {
                        out.push(Action::Stopped);
                    }
                } else if self.wanted {
                    // A restart after a failed check, or a start that
                    // came while stopping.
                    self.state = State::Waiting {
                        until_us: self.restart_at(now_us),
                    };
                    self.tick_into(now_us, &mut out);
                } else {
                    out.push(Action::Stopped);
                }
            }
            State::Starting { pid: p, .. } | State::Running { pid: p, .. } if p == pid => {
                self.checking = false;
                self.failure(format!("it exited unexpectedly ({how})"), now_us, &mut out);
            }
            _ => {}
        }
        out
    }

    pub fn health(&mut self, pid: u32, h: Health, now_us: u64) -> Vec<Action> {
        self.checking = false;
        self.next_check_us = now_us + self.policy.health_interval_us;
        self.health = match &h {
            Health::NotStarted => "not started (no socket)".into(),
            Health::Starting => "starting or recovering".into(),
            Health::Healthy => "healthy".into(),
            Health::Hung => "hung (no answer within the health timeout)".into(),
            Health::Failing(why) => format!("failing: {why}"),
        };
        let mut out = Vec::new();
        match self.state.clone() {
            State::Starting { pid: p, since_us } if p == pid && h == Health::Healthy => {
                out.push(Action::Log {
                    warn: false,
                    message: format!(
                        "mysqld: healthy after {:.1} s",
                        now_us.saturating_sub(since_us) as f64 / 1e6
                    ),
                });
                self.state = State::Running {
                    pid,
                    since_us: now_us,
                    bad: 0,
                };
            }
            State::Running {
                pid: p,
                since_us,
                bad,
            } if p == pid => {
                if h == Health::Healthy {
                    if bad > 0 {
                        out.push(Action::Log {
                            warn: false,
                            message: "mysqld: healthy again".into(),
                        });
                    }
                    self.state = State::Running {
                        pid,
                        since_us,
                        bad: 0,
                    };
                } else {
                    let bad = bad + 1;
                    out.push(Action::Log {
                        warn: true,
                        message: format!(
                            "mysqld: {} (check {bad} of {} before a restart)",
                            self.health, self.policy.health_failures
                        ),
                    });
                    if bad >= self.policy.health_failures {
                        let why = format!("{} on {bad} checks in a row", self.health);
                        self.restart(pid, why, h == Health::Hung, now_us, &mut out);
                    } else {
                        self.state = State::Running { pid, since_us, bad };
                    }
                }
            }
            _ => {}
        }
        out
    }

    /// Timers: back-off ended, start or stop took too long, a check is due.
    pub fn tick(&mut self, now_us: u64) -> Vec<Action> {
        let mut out = Vec::new();
        self.tick_into(now_us, &mut out);
        out
    }

    fn tick_into(&mut self, now_us: u64, out: &mut Vec<Action>) {
        self.restarts
            .retain(|&at| now_us.saturating_sub(at) < self.policy.restart_window_us);
        match self.state.clone() {
            State::Waiting { until_us } if now_us >= until_us && self.wanted => {
                out.push(Action::Spawn);
            }
            State::Starting { pid, since_us }
                if now_us.saturating_sub(since_us) > self.policy.start_timeout_us =>
            {
                let why = format!(
                    "not healthy {} s after its start (last check: {}); raise mysql.start_timeout if recovery needs longer",
                    self.policy.start_timeout_us / 1_000_000,
                    self.health
                );
                self.restart(pid, why, false, now_us, out);
            }
            State::Stopping {
                pid,
                since_us,
                killed: false,
            } if now_us.saturating_sub(since_us) > self.policy.stop_timeout_us => {
                out.push(Action::Log {
                    warn: true,
                    message: format!(
                        "mysqld: still running {} s after SIGTERM: SIGKILL",
                        self.policy.stop_timeout_us / 1_000_000
                    ),
                });
                out.push(Action::Signal(pid, Signal::Kill));
                self.state = State::Stopping {
                    pid,
                    since_us,
                    killed: true,
                };
            }
            _ => {}
        }
        if let State::Starting { pid, .. } | State::Running { pid, .. } = self.state
            && !self.checking
            && now_us >= self.next_check_us
        {
            self.checking = true;
            out.push(Action::Check(pid));
        }
    }

    /// Stops a mysqld that is not serving so it can start again, or gives
    /// up if it has been restarted too often.
    fn restart(&mut self, pid: u32, why: String, hung: bool, now_us: u64, out: &mut Vec<Action>) {
        if self.over_limit(now_us) {
            // Down for good: SIGKILL, a failing mysqld must not hold the
            // filesystem while the peer takes over.
            out.push(Action::Signal(pid, Signal::Kill));
            self.state = State::Stopping {
                pid,
                since_us: now_us,
                killed: true,
            };
            self.give_up(why, out);
            return;
        }
        self.restarts.push(now_us);
        self.restarts_total += 1;
        self.last_failure = Some(why.clone());
        out.push(Action::Log {
            warn: true,
            message: format!("mysqld: {why}: restarting it"),
        });
        // A hung process cannot act on SIGTERM (it may be stopped, or
        // stuck in the kernel); SIGKILL is the only thing it obeys.
        let (signal, killed) = if hung {
            (Signal::Kill, true)
        } else {
            (Signal::Term, false)
        };
        out.push(Action::Signal(pid, signal));
        self.state = State::Stopping {
            pid,
            since_us: now_us,
            killed,
        };
    }

    /// A crash or a failed start: try again after the back-off, or give up.
    fn failure(&mut self, why: String, now_us: u64, out: &mut Vec<Action>) {
        self.health = "not running".into();
        if self.over_limit(now_us) {
            self.state = State::Failed { why: why.clone() };
            self.give_up(why, out);
            return;
        }
        self.restarts.push(now_us);
        self.restarts_total += 1;
        let until_us = self.restart_at(now_us);
        self.last_failure = Some(why.clone());
        out.push(Action::Log {
            warn: true,
            message: format!(
                "mysqld: {why}; restart {} of {} in {:.0} s",
                self.restarts.len(),
                self.policy.max_restarts,
                until_us.saturating_sub(now_us) as f64 / 1e6
            ),
        });
        self.state = State::Waiting { until_us };
    }

    fn over_limit(&mut self, now_us: u64) -> bool {
        self.restarts
            .retain(|&at| now_us.saturating_sub(at) < self.policy.restart_window_us);
        self.restarts.len() as u32 >= self.policy.max_restarts
    }

    fn restart_at(&self, now_us: u64) -> u64 {
        // The newest restart is already counted; its back-off is by its
        // number in the window.
        now_us + backoff_us(self.restarts.len().saturating_sub(1))
    }

    fn give_up(&mut self, why: String, out: &mut Vec<Action>) {
        let message = format!(
            "mysqld: {why}, after {} restart(s) within {} s: giving up here; the primary role goes to the peer if it can take it (`hadb mysql reset` once fixed)",
            self.restarts.len(),
            self.policy.restart_window_us / 1_000_000
        );
        self.last_failure = Some(why.clone());
        out.push(Action::Log {
            warn: true,
            message,
        });
        if !matches!(self.state, State::Stopping { .. }) {
            self.state = State::Failed { why };
        } else {
            self.failed_after_stop = Some(why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;

    fn policy() -> Policy {
        Policy {
            start_timeout_us: 60 * S,
            stop_timeout_us: 10 * S,
            health_interval_us: S,
            health_failures: 3,
            max_restarts: 3,
            restart_window_us: 600 * S,
        }
    }

    fn has(out: &[Action], a: &Action) -> bool {
        out.contains(a)
    }

    /// Spawns, answers the spawn with `pid`, and checks it healthy.
    fn running(s: &mut Supervisor, pid: u32, now: u64) {
        let out = s.start(now);
        assert!(has(&out, &Action::Spawn), "{out:?}");
        s.spawned(pid, now);
        let out = s.tick(now + S);
        assert!(has(&out, &Action::Check(pid)), "{out:?}");
        s.health(pid, Health::Healthy, now + S);
        assert_eq!(s.view().state, "healthy");
    }

    #[test]
    fn starts_checks_and_stops_in_order() {
        let mut s = Supervisor::new(policy());
        assert_eq!(s.view().state, "stopped");
        s.start(0);
        s.spawned(10, 0);
        // Recovering: not healthy yet, no restart before start_timeout.
        let out = s.tick(S);
        assert!(has(&out, &Action::Check(10)));
        s.health(10, Health::NotStarted, S);
        assert_eq!(s.view().state, "starting");
        // One check at a time: nothing new while one is out.
        let out = s.tick(3 * S);
        assert!(has(&out, &Action::Check(10)));
        assert!(!has(&s.tick(4 * S), &Action::Check(10)));
        s.health(10, Health::Healthy, 4 * S);
        assert!(s.view().healthy());
        let out = s.stop(5 * S);
        assert!(has(&out, &Action::Signal(10, Signal::Term)));
        assert!(!has(&out, &Action::Stopped), "stopped before it exited");
        let out = s.exited(10, "exit status 0", 6 * S);
        assert!(has(&out, &Action::Stopped));
        assert_eq!(s.view().state, "stopped");
    }

    #[test]
    fn a_stop_that_takes_too_long_ends_with_sigkill() {
        let mut s = Supervisor::new(policy());
        running(&mut s, 10, 0);
        s.stop(2 * S);
        assert!(
            s.tick(11 * S)
                .iter()
                .all(|a| !matches!(a, Action::Signal(_, Signal::Kill)))
        );
        assert!(has(&s.tick(13 * S), &Action::Signal(10, Signal::Kill)));
        assert!(has(
            &s.exited(10, "killed by SIGKILL", 13 * S),
            &Action::Stopped
        ));
    }

    #[test]
    fn a_crash_restarts_with_back_off_then_gives_up() {
        let mut s = Supervisor::new(policy());
        running(&mut s, 10, 0);
        let mut now = 10 * S;
        for (n, pid) in [11u32, 12, 13].into_iter().enumerate() {
            s.exited(pid - 1, "killed by SIGKILL", now);
            assert_eq!(s.view().state, "waiting");
            assert_eq!(s.view().restarts, n as u32 + 1);
            // Back-off 1 s, 2 s, 4 s.
            let wait = S << n;
            assert!(!has(&s.tick(now + wait - 1), &Action::Spawn));
            assert!(has(&s.tick(now + wait), &Action::Spawn));
            s.spawned(pid, now + wait);
            now += wait + 10 * S;
        }
        let out = s.exited(13, "killed by SIGKILL", now);
        assert!(s.view().failed(), "{out:?}");
        assert!(!has(&s.tick(now + 100 * S), &Action::Spawn));
        // A failed service does not come back on its own, only on reset.
        assert!(!has(&s.start(now + 101 * S), &Action::Spawn));
        assert!(has(&s.reset(now + 102 * S), &Action::Spawn));
    }

    #[test]
    fn restarts_outside_the_window_are_forgotten() {
        let mut s = Supervisor::new(policy());
        running(&mut s, 10, 0);
        let mut now = 0;
        for pid in 10u32..20 {
            now += 700 * S;
            s.exited(pid, "exit status 1", now);
            assert_eq!(s.view().restarts, 1, "at pid {pid}");
            now += S;
            assert!(has(&s.tick(now), &Action::Spawn));
            s.spawned(pid + 1, now);
        }
        assert!(!s.view().failed());
    }

    #[test]
    fn a_hung_mysqld_is_killed_after_the_failure_threshold() {
        let mut s = Supervisor::new(policy());
        running(&mut s, 10, 0);
        let mut now = S;
        for n in 1..=3 {
            now += S;
            assert!(has(&s.tick(now), &Action::Check(10)));
            let out = s.health(10, Health::Hung, now);
            if n < 3 {
                assert_eq!(s.view().state, "unhealthy");
                assert!(out.iter().all(|a| !matches!(a, Action::Signal(..))));
            } else {
                // SIGKILL at once: a stopped process ignores SIGTERM.
                assert!(has(&out, &Action::Signal(10, Signal::Kill)), "{out:?}");
            }
        }
        let out = s.exited(10, "killed by SIGKILL", now);
        assert!(!has(&out, &Action::Stopped), "still wanted: {out:?}");
        assert!(has(&s.tick(now + S), &Action::Spawn));
        assert_eq!(s.view().restarts, 1);
    }

    #[test]
    fn one_good_check_clears_the_bad_ones() {
        let mut s = Supervisor::new(policy());
        running(&mut s, 10, 0);
        let mut now = S;
        for h in [Health::Hung, Health::Failing("x".into()), Health::Healthy] {
            now += S;
            s.tick(now);
            s.health(10, h, now);
        }
        for _ in 0..2 {
            now += S;
            s.tick(now);
            s.health(10, Health::Failing("x".into()), now);
        }
        assert_eq!(s.view().state, "unhealthy");
        assert_eq!(s.view().restarts, 0);
    }

    #[test]
    fn a_start_that_never_becomes_healthy_is_a_failure() {
        let mut s = Supervisor::new(policy());
        s.start(0);
        s.spawned(10, 0);
        let out = s.tick(61 * S);
        assert!(has(&out, &Action::Signal(10, Signal::Term)), "{out:?}");
        s.exited(10, "exit status 0", 62 * S);
        assert!(has(&s.tick(63 * S), &Action::Spawn));
    }

    #[test]
    fn an_uninitialised_datadir_waits_for_init_without_counting_failures() {
        let mut s = Supervisor::new(policy());
        assert!(has(&s.start(0), &Action::Spawn));
        s.uninitialised("no database in /var/lib/mysql");
        assert_eq!(s.view().state, "uninitialised");
        assert!(!has(&s.tick(100 * S), &Action::Spawn));
        assert_eq!(s.view().restarts, 0);
        assert!(has(&s.initialised(101 * S), &Action::Spawn));
        // Stepping down while uninitialised needs no process to stop.
        let mut s2 = Supervisor::new(policy());
        s2.start(0);
        s2.uninitialised("x");
        assert!(has(&s2.stop(S), &Action::Stopped));
        assert_eq!(s2.view().state, "stopped");
    }

    #[test]
    fn a_stop_while_waiting_or_failed_answers_at_once() {
        let mut s = Supervisor::new(policy());
        s.start(0);
        s.spawn_failed("no such file", 0);
        assert_eq!(s.view().state, "waiting");
        assert!(has(&s.stop(S), &Action::Stopped));
        assert!(!has(&s.tick(10 * S), &Action::Spawn));
    }

    #[test]
    fn giving_up_on_a_running_mysqld_kills_it_and_reports_failed() {
        let mut p = policy();
        p.max_restarts = 0;
        let mut s = Supervisor::new(p);
        running(&mut s, 10, 0);
        let mut now = S;
        for _ in 0..3 {
            now += S;
            s.tick(now);
            s.health(10, Health::Failing("Access denied".into()), now);
        }
        assert!(s.view().failed());
        // The manager demotes: the stop waits for the kill to land.
        assert!(!has(&s.stop(now), &Action::Stopped));
        assert!(has(
            &s.exited(10, "killed by SIGKILL", now),
            &Action::Stopped
        ));
        assert!(s.view().failed());
    }

    #[test]
    fn recognises_the_service_to_adopt() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let cmd = v(&[
            "/usr/sbin/mysqld",
            "--datadir=/var/lib/mysql",
            "--socket=/run/mysqld/mysqld.sock",
        ]);
        assert!(is_service(&cmd, &cmd, "/var/lib/mysql"));
        // Another path to the same program, other options, same datadir.
        assert!(is_service(
            &v(&[
                "/usr/local/sbin/mysqld",
                "--user=mysql",
                "--datadir=/var/lib/mysql/"
            ]),
            &cmd,
            "/var/lib/mysql"
        ));
        for other in [
            v(&["/usr/sbin/mysqld", "--datadir=/srv/other"]),
            v(&["/usr/sbin/mysqld"]),
            v(&["/bin/sh", "--datadir=/var/lib/mysql"]),
            v(&[]),
        ] {
            assert!(!is_service(&other, &cmd, "/var/lib/mysql"), "{other:?}");
        }
        // A stand-in without --datadir matches only by its whole command line.
        let sh = v(&["/bin/sh", "-c", "while :; do sleep 1; done"]);
        assert!(is_service(&sh, &sh, "/data"));
        assert!(!is_service(&v(&["/bin/sh", "-c", "other"]), &sh, "/data"));
    }
}
