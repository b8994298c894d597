//! Fence levels and what counts as a confirmed fence. Pure: the driver
//! (`run::fence`) runs the methods, reads the clock and the heartbeat, and
//! passes what it saw in; these functions decide.
//!
//! A run of the levels tries `fencing.methods` in order. The first method
//! that confirms ends it; a method that fails hands over to the next; after
//! the last (or at `manual`) the run ends and the fence stays pending for
//! the operator's `hadb fence confirm` (or a retry, `hadb fence NODE`).
//! Every attempt is kept, with its times and result, for status, the log
//! and the metrics.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::FenceMethod;

/// How an attempt ended, or that it has not yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Under way.
    Running,
    /// The method proved the peer off: the fence is confirmed.
    Confirmed,
    /// The method could not prove the peer off; the next one is tried.
    Failed,
    /// Stopped before it ended: the fence was no longer wanted (the peer
    /// is heard again, or the operator confirmed it meanwhile).
    Abandoned,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Running => "running",
            Outcome::Confirmed => "confirmed",
            Outcome::Failed => "failed",
            Outcome::Abandoned => "abandoned",
        }
    }
}

/// One method tried once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub method: FenceMethod,
    /// On the driver's clock, in microseconds.
    pub started_us: u64,
    pub ended_us: Option<u64>,
    pub outcome: Outcome,
    /// The proof of a confirmation, or the reason of a failure, in words.
    pub detail: String,
}

impl Attempt {
    /// How long it took, or has taken so far.
    pub fn duration_us(&self, now_us: u64) -> u64 {
        self.ended_us
            .unwrap_or(now_us)
            .saturating_sub(self.started_us)
    }
}

/// Why a run of the levels started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// The manager: the peer is lost on every ring.
    PeerLost,
    /// `hadb fence NODE`: the operator's word, heard peer or not.
    Operator,
}

/// What the driver does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// No run is under way.
    Idle,
    /// Try this method now.
    Try(FenceMethod),
    /// An attempt is under way.
    Wait,
    /// This method confirmed the fence; the run is over.
    Confirmed(FenceMethod),
    /// No method is left: the operator confirms (or retries).
    Operator,
    /// The run was abandoned.
    Stopped,
}

/// The levels, the current (or last) run's attempts, and totals.
#[derive(Debug, Clone)]
pub struct FencePlan {
    methods: Vec<FenceMethod>,
    attempts: Vec<Attempt>,
    /// The current (or last) run: why and when it started, and whether it
    /// is over.
    run: Option<(Trigger, u64, bool)>,
    /// Since start, per method and outcome: attempts and their total
    /// duration in microseconds.
    totals: BTreeMap<(FenceMethod, Outcome), (u64, u64)>,
}

impl FencePlan {
    pub fn new(methods: &[FenceMethod]) -> FencePlan {
        FencePlan {
            methods: methods.to_vec(),
            attempts: Vec::new(),
            run: None,
            totals: BTreeMap::new(),
        }
    }

    /// The automatic methods, in order: what a run may try.
    pub fn automatic(&self) -> impl Iterator<Item = FenceMethod> + '_ {
        self.methods
            .iter()
            .copied()
            .take_while(|m| *m != FenceMethod::Manual)
    }

    /// Starts a run; refused while one is under way. The last run's
    /// attempts make room for the new one's (the totals keep them).
    pub fn begin(&mut self, trigger: Trigger, now_us: u64) -> Result<(), String> {
        if self.active() {
            return Err(
                "a fence of the peer is under way; `hadb status` shows its attempts".into(),
            );
        }
        self.attempts.clear();
        self.run = Some((trigger, now_us, false));
        Ok(())
    }

    /// Whether a run is under way.
    pub fn active(&self) -> bool {
        matches!(self.run, Some((_, _, false)))
    }

    pub fn trigger(&self) -> Option<Trigger> {
        self.run.map(|(t, _, _)| t)
    }

    /// What to do now.
    pub fn next(&self) -> Next {
        if !self.active() {
            return Next::Idle;
        }
        match self.attempts.last() {
            Some(a) if a.outcome == Outcome::Running => Next::Wait,
            Some(a) if a.outcome == Outcome::Confirmed => Next::Confirmed(a.method),
            Some(a) if a.outcome == Outcome::Abandoned => Next::Stopped,
            // None tried yet, or the last failed: the next level.
            _ => match self.automatic().nth(self.attempts.len()) {
                Some(m) => Next::Try(m),
                None => Next::Operator,
            },
        }
    }

    /// The driver starts `method` (what [`FencePlan::next`] said).
    pub fn started(&mut self, method: FenceMethod, now_us: u64) {
        self.attempts.push(Attempt {
            method,
            started_us: now_us,
            ended_us: None,
            outcome: Outcome::Running,
            detail: String::new(),
        });
    }

    /// The attempt under way ended.
    pub fn ended(&mut self, outcome: Outcome, detail: String, now_us: u64) {
        let Some(a) = self.attempts.last_mut() else {
            return;
        };
        if a.outcome != Outcome::Running {
            return;
        }
        a.outcome = outcome;
        a.detail = detail;
        a.ended_us = Some(now_us);
        let total = self.totals.entry((a.method, outcome)).or_default();
        total.0 += 1;
        total.1 += a.duration_us(now_us);
    }

    /// The run is over (confirmed, every method failed, or stopped).
    pub fn finish(&mut self) {
        if let Some((_, _, over)) = &mut self.run {
            *over = true;
        }
    }

    /// The current (or last) run's attempts, in order.
    pub fn attempts(&self) -> &[Attempt] {
        &self.attempts
    }

    /// Per (method, outcome): attempts since start and their total
    /// duration in microseconds.
    pub fn totals(&self) -> impl Iterator<Item = (FenceMethod, Outcome, u64, u64)> + '_ {
        self.totals
            .iter()
            .map(|((m, o), (n, us))| (*m, *o, *n, *us))
    }
}

/// Where an `ssh` fence stands once the command was delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Silence {
    /// The peer has been silent on every ring for the settle time since
    /// the command ran (or since it was last heard, if later).
    Confirmed { silent_us: u64 },
    /// Not yet.
    Wait,
    /// `confirm_timeout` passed without that silence.
    TimedOut {
        /// Whether the peer was heard after the command.
        heard_after: bool,
    },
}

/// The `ssh` method's confirmation. The fence is asked for because the
/// peer is not heard already, so silence alone proves nothing; what counts
/// is that the command was delivered to a peer that then — from the
/// moment it ran — says nothing on any ring for `settle_us` (the
/// heartbeat's timeout: a ring is down after that much silence). A peer
/// heard after the command is still running: the silence starts over from
/// that packet, and if it does not last `settle_us` before
/// `delivered_us + timeout_us` the fence failed.
pub fn ssh_silence(
    delivered_us: u64,
    last_heard_us: Option<u64>,
    peer_alive: bool,
    now_us: u64,
    settle_us: u64,
    timeout_us: u64,
) -> Silence {
    let heard_after = last_heard_us.is_some_and(|t| t > delivered_us);
    let since = last_heard_us.map_or(delivered_us, |t| t.max(delivered_us));
    let silent_us = now_us.saturating_sub(since);
    if !peer_alive && silent_us >= settle_us {
        return Silence::Confirmed { silent_us };
    }
    if now_us.saturating_sub(delivered_us) >= timeout_us {
        return Silence::TimedOut { heard_after };
    }
    Silence::Wait
}

#[cfg(test)]
mod tests {
    use super::*;
    use FenceMethod::{Azure, Manual, Ssh};

    const S: u64 = 1_000_000;

    #[test]
    fn levels_are_tried_in_order_until_one_confirms() {
        let mut p = FencePlan::new(&[Azure, Ssh]);
        assert_eq!(p.next(), Next::Idle);
        p.begin(Trigger::PeerLost, 0).unwrap();
        assert_eq!(p.next(), Next::Try(Azure));
        p.started(Azure, 0);
        assert_eq!(p.next(), Next::Wait);
        assert!(p.begin(Trigger::Operator, 1).is_err(), "one run at a time");
        p.ended(Outcome::Failed, "403 AuthorizationFailed".into(), S / 2);
        assert_eq!(p.next(), Next::Try(Ssh));
        p.started(Ssh, S);
        p.ended(Outcome::Confirmed, "silent".into(), 3 * S);
        assert_eq!(p.next(), Next::Confirmed(Ssh));
        p.finish();
        assert_eq!(p.next(), Next::Idle);
        let a = p.attempts();
        assert_eq!(
            a.iter().map(|a| (a.method, a.outcome)).collect::<Vec<_>>(),
            [(Azure, Outcome::Failed), (Ssh, Outcome::Confirmed)]
        );
        assert_eq!(a[0].duration_us(10 * S), S / 2);
        assert_eq!(a[1].duration_us(10 * S), 2 * S);
    }

    #[test]
    fn when_every_method_fails_the_operator_decides() {
        let mut p = FencePlan::new(&[Ssh, Manual]);
        assert_eq!(p.automatic().collect::<Vec<_>>(), [Ssh]);
        p.begin(Trigger::PeerLost, 0).unwrap();
        p.started(Ssh, 0);
        p.ended(Outcome::Failed, "refused".into(), 10);
        assert_eq!(
            p.next(),
            Next::Operator,
            "manual: never tried, it is the operator"
        );
        p.finish();
        // The operator retries: a new run, the same levels, totals kept.
        p.begin(Trigger::Operator, 100).unwrap();
        assert!(p.attempts().is_empty());
        assert_eq!(p.next(), Next::Try(Ssh));
        p.started(Ssh, 100);
        p.ended(Outcome::Failed, "refused".into(), 130);
        assert_eq!(
            p.totals().collect::<Vec<_>>(),
            [(Ssh, Outcome::Failed, 2, 40)]
        );
        // Only manual: nothing to run at all.
        let mut m = FencePlan::new(&[Manual]);
        m.begin(Trigger::PeerLost, 0).unwrap();
        assert_eq!(m.next(), Next::Operator);
    }

    #[test]
    fn an_abandoned_attempt_stops_the_run() {
        let mut p = FencePlan::new(&[Azure, Ssh]);
        p.begin(Trigger::PeerLost, 0).unwrap();
        p.started(Azure, 0);
        p.ended(Outcome::Abandoned, "the peer is heard again".into(), 5);
        assert_eq!(p.next(), Next::Stopped, "ssh is not tried");
        // A late second end of the same attempt changes nothing.
        p.ended(Outcome::Confirmed, "late".into(), 9);
        assert_eq!(p.attempts()[0].outcome, Outcome::Abandoned);
    }

    #[test]
    fn ssh_counts_only_silence_after_the_command() {
        let (settle, timeout) = (S, 10 * S);
        // Lost long before the command (a partition): silent from the
        // command on, for the settle time.
        let at = |now, heard, alive| ssh_silence(20 * S, heard, alive, now, settle, timeout);
        assert_eq!(at(20 * S, Some(5 * S), false), Silence::Wait);
        assert_eq!(
            at(21 * S, Some(5 * S), false),
            Silence::Confirmed { silent_us: S }
        );
        // Heard after the command: it ran, but the peer did not stop; the
        // silence counts from that packet.
        assert_eq!(at(22 * S, Some(21 * S + 1), false), Silence::Wait);
        assert_eq!(
            at(23 * S, Some(21 * S), false),
            Silence::Confirmed { silent_us: 2 * S }
        );
        // Still heard (alive) however long ago the last packet: no.
        assert_eq!(at(25 * S, Some(20 * S), true), Silence::Wait);
        assert_eq!(
            at(30 * S, Some(29 * S + S / 2), true),
            Silence::TimedOut { heard_after: true }
        );
        assert_eq!(
            at(30 * S, Some(29 * S + S / 2), false),
            Silence::TimedOut { heard_after: true },
            "half a second of silence is not enough"
        );
        // Never heard at all (a peer this node never heard since start).
        assert_eq!(at(21 * S, None, false), Silence::Confirmed { silent_us: S });
    }
}
