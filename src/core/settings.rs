//! What one node may count on in the other's settings. Two nodes whose
//! hadb.toml differ in a setting the rules of one rely on in the other
//! can end with two primaries: the `watchdog` fence counts a peer fenced
//! because it would have fenced itself, and a peer configured without
//! the self-fence never does. So a node says in its heartbeats only
//! what it really does, and (see `Settings`) the settings that must
//! agree are compared whenever the nodes meet.

use crate::core::heartbeat::{FLAG_WATCHDOG, NodeReport};

/// Whether this node fences itself (stops petting its watchdog) once it
/// has lost quorum, as the manager's self-fence rule does: it needs a
/// witness (without one a node cannot know it is the minority), the
/// `watchdog` method among its own fence methods (the self-fence is that
/// method's other half, and only a node configured for it does it), and
/// the watchdog enabled. The daemon, the manager's config and the
/// simulation all take it from here.
pub fn self_fences(witness: bool, watchdog_method: bool, watchdog_enabled: bool) -> bool {
    witness && watchdog_method && watchdog_enabled
}

/// What this node's heartbeats say of its watchdog: the flag and the
/// timeout. Only a node that will fence itself, and whose watchdog is
/// open (`armed_ms`), says it is armed: the peer's `watchdog` fence
/// counts on exactly that. A watchdog that only guards against a hung
/// hadb is not advertised (its node keeps petting when cut off).
pub fn watchdog_advert(self_fences: bool, armed_ms: Option<u32>) -> (u8, u32) {
    match armed_ms {
        Some(ms) if self_fences && ms > 0 => (FLAG_WATCHDOG, ms),
        _ => (0, 0),
    }
}

/// The watchdog timeout within which the peer, by its last report,
/// fences itself; None: it said it does not.
pub fn peer_self_fences(r: &NodeReport) -> Option<u32> {
    (r.flags & FLAG_WATCHDOG != 0 && r.watchdog_timeout_ms > 0).then_some(r.watchdog_timeout_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_node_that_fences_itself_says_it_is_armed() {
        // Every precondition is needed.
        assert!(self_fences(true, true, true));
        assert!(!self_fences(false, true, true), "no witness");
        assert!(!self_fences(true, false, true), "no watchdog method");
        assert!(!self_fences(true, true, false), "watchdog off");
        assert_eq!(watchdog_advert(true, Some(6000)), (FLAG_WATCHDOG, 6000));
        // The watchdog is open but the node will never stop petting it
        // for want of quorum: the old rule advertised it, and the peer's
        // `watchdog` fence counted a live node fenced.
        assert_eq!(watchdog_advert(false, Some(6000)), (0, 0));
        // Configured to fence itself, but the device could not be armed.
        assert_eq!(watchdog_advert(true, None), (0, 0));
        assert_eq!(watchdog_advert(true, Some(0)), (0, 0));
    }

    #[test]
    fn the_peer_is_believed_only_with_flag_and_timeout() {
        let r = |flags, ms| NodeReport {
            flags,
            watchdog_timeout_ms: ms,
            ..NodeReport::default()
        };
        assert_eq!(peer_self_fences(&r(FLAG_WATCHDOG, 6000)), Some(6000));
        assert_eq!(peer_self_fences(&r(0, 6000)), None);
        assert_eq!(peer_self_fences(&r(FLAG_WATCHDOG, 0)), None);
    }
}
