//! The rule that metadata comes first: nothing leaves a node — a frame to
//! the peer, a completion to the application, the state its heartbeats
//! report — before every metadata write queued ahead of it is on disk.
//!
//! The replica returns its metadata writes (`Persist`, `PersistBitmap`,
//! `PersistActivityLog`) in line with the frames and completions that rely
//! on them, and the driver queues them for one ordered disk worker. Without
//! this gate a frame or completion that follows them in the same batch
//! would leave at once, and a power loss in the window between would break
//! what it claimed:
//!
//! - a secondary's `OutdateAck` (or its heartbeat's "outdated") reaches
//!   the primary, which goes on alone; the secondary's "outdated" never
//!   reaches its disk, it comes back up to date at the old generation and
//!   a later failover to it loses what the primary wrote alone;
//! - a primary going on alone completes held writes before its new
//!   generation and `peer_outdated` are on disk; after a crash it cannot
//!   tell its copy from the peer's;
//! - a frame sent after an activity-log transaction is applied on the
//!   peer while a crash keeps its write out of both the local disk and
//!   the local log, and no resync covers it;
//! - a resync target reports "up to date" (and acknowledges the end of
//!   the resync) before the adopted generation and the cleared bitmap are
//!   on its disk.
//!
//! One type, so that the daemon (`run::volume`) and the simulation
//! (`tests/simkit`) keep the rule with the same code.

use std::collections::VecDeque;

use crate::core::replica::Action;
use crate::core::wire::NodeState;

/// What waits behind metadata: frames and completions, in order.
#[derive(Debug, Default)]
pub struct MetaGate {
    /// Metadata writes queued and not yet answered by the disk, each with
    /// the node's state once it is written (what it makes durable).
    pending: VecDeque<NodeState>,
    held: VecDeque<Action>,
    /// The node's state as of the last moment nothing was pending: what
    /// its heartbeats may say.
    published: Option<NodeState>,
}

impl MetaGate {
    /// A metadata write was queued for the disk; `after` is the node's
    /// state once it is written (the state the replica returned it with).
    pub fn queued(&mut self, after: NodeState) {
        self.pending.push_back(after);
    }

    /// Whether a metadata write is queued and not yet on disk.
    pub fn pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The action if it may be carried out now; otherwise it is held.
    /// Only frames and completions are held: every other action passes.
    pub fn pass(&mut self, action: Action) -> Option<Action> {
        match action {
            Action::Send(_) | Action::Complete { .. } if !self.pending.is_empty() => {
                self.held.push_back(action);
                None
            }
            action => Some(action),
        }
    }

    /// The oldest metadata write was answered: `ok`, it is on disk. Returns
    /// what may go now, in order: everything held once nothing is pending.
    ///
    /// A failed metadata write breaks the promise of everything held
    /// behind it (the disk is failed from here): frames are dropped, since
    /// they would tell the peer something this disk does not hold, and
    /// completions fail with EIO, since the data they acknowledge may not
    /// be recoverable from this disk.
    pub fn done(&mut self, ok: bool) -> Vec<Action> {
        let written = self.pending.pop_front();
        // The state this write made durable may be reported once no
        // later write of the same batch (the same state) is still due:
        // reports advance under a steady stream of metadata writes.
        if let Some(state) = written
            && ok
            && self.pending.front() != Some(&state)
        {
            self.published = Some(state);
        }
        if !ok {
            return std::mem::take(&mut self.held)
                .into_iter()
                .filter_map(|a| match a {
                    Action::Complete { id, .. } => Some(Action::Complete {
                        id,
                        result: Err(crate::core::nbd::EIO),
                    }),
                    _ => None,
                })
                .collect();
        }
        if self.pending.is_empty() {
            self.held.drain(..).collect()
        } else {
            Vec::new()
        }
    }

    /// The link went: the frames held for it go with it (the replica
    /// marks what they carried out of sync); completions stay held.
    pub fn link_lost(&mut self) {
        self.held.retain(|a| !matches!(a, Action::Send(_)));
    }

    /// The disk queue is gone (a crash): nothing is pending any more.
    pub fn reset(&mut self) {
        *self = MetaGate::default();
    }

    /// Frames and completions held.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// What this node's heartbeats may say of it, given its state `now`:
    /// `now` once nothing is pending, else the last state that was. A
    /// peer acts on these reports (an "outdated" lets it go on alone), so
    /// they must not run ahead of the disk.
    pub fn report(&mut self, now: NodeState) -> NodeState {
        if self.pending.is_empty() || self.published.is_none() {
            self.published = Some(now);
        }
        self.published.unwrap_or(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::replica::Frame;
    use crate::core::wire::{self, Kind};

    fn ping(seq: u64) -> Action {
        Action::Send(Frame {
            header: wire::Header::new(Kind::Ping, seq, 0, 0),
            payload: None,
        })
    }

    fn complete(id: u64) -> Action {
        Action::Complete { id, result: Ok(()) }
    }

    fn state(disk: u8) -> NodeState {
        NodeState {
            role: 0,
            disk,
            data_size: 1 << 20,
            volume_id: [1; 16],
            current_gen: 5,
            bitmap_gen: 0,
            dirty_blocks: 0,
            flags: 0,
        }
    }

    fn seqs(actions: &[Action]) -> Vec<u64> {
        actions
            .iter()
            .map(|a| match a {
                Action::Send(f) => f.header.seq,
                Action::Complete { id, .. } => 1000 + id,
                _ => 0,
            })
            .collect()
    }

    #[test]
    fn frames_and_completions_wait_for_metadata_in_order() {
        let mut g = MetaGate::default();
        assert!(g.pass(ping(1)).is_some(), "nothing pending: goes at once");
        g.queued(state(0));
        assert!(g.pass(ping(2)).is_none());
        assert!(g.pass(complete(7)).is_none());
        g.queued(state(0));
        assert!(g.pass(ping(3)).is_none());
        assert!(g.done(true).is_empty(), "one write still pending");
        assert_eq!(seqs(&g.done(true)), vec![2, 1007, 3]);
        assert!(g.pass(ping(4)).is_some());
        g.queued(state(0));
        assert!(g.pass(ping(5)).is_none());
        assert!(g.pass(complete(8)).is_none());
        g.link_lost();
        assert_eq!(g.held(), 1, "the completion stays");
        assert_eq!(seqs(&g.done(true)), vec![1008]);
        g.queued(state(0));
        g.reset();
        assert!(g.pass(ping(6)).is_some(), "a crash empties the queue");
    }

    #[test]
    fn a_failed_metadata_write_drops_frames_and_fails_completions() {
        let mut g = MetaGate::default();
        g.queued(state(0));
        assert!(g.pass(ping(1)).is_none());
        assert!(g.pass(complete(2)).is_none());
        let out = g.done(false);
        assert_eq!(
            out,
            vec![Action::Complete {
                id: 2,
                result: Err(crate::core::nbd::EIO)
            }]
        );
        assert!(!g.pending());
    }

    #[test]
    fn heartbeats_say_only_what_is_on_disk() {
        let mut g = MetaGate::default();
        let (up, outdated) = (state(0), state(1));
        assert_eq!(g.report(up).disk, 0);
        g.queued(outdated);
        assert_eq!(g.report(outdated).disk, 0, "not yet on disk");
        g.done(true);
        assert_eq!(g.report(outdated).disk, 1);
    }

    #[test]
    fn reports_advance_under_a_steady_stream_of_metadata_writes() {
        let mut g = MetaGate::default();
        g.report(state(0));
        // Two writes of one batch (the same state): only the second
        // makes it all durable.
        g.queued(state(1));
        g.queued(state(1));
        g.done(true);
        assert_eq!(g.report(state(3)).disk, 0);
        // Each later write is queued before the one before it is done:
        // never a moment with nothing pending, yet the reports move on.
        g.queued(state(2));
        g.done(true);
        assert_eq!(g.report(state(3)).disk, 1);
        g.queued(state(3));
        g.done(true);
        assert_eq!(g.report(state(3)).disk, 2);
    }
}
