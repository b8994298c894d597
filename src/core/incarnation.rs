//! A run's incarnation: the number every heartbeat of one run of hadb
//! carries, which the peer (`core::heartbeat::Membership`) requires to be
//! higher than any it heard from this node before (a lower one is an
//! earlier run, so a replay), and which the witness names when it gives
//! its vote (`core::quorum::Vote`).
//!
//! It must therefore be higher at every start whatever the wall clock
//! does. The wall clock alone is not enough: a VM that boots before its
//! clock is set, or whose clock steps back (a bad RTC, NTP correcting a
//! clock that ran ahead), would start with a lower number, its peer would
//! drop every heartbeat as a replay, think it lost, and fence it — after
//! a reboot the same again. So the last incarnation is kept on disk
//! (`run::incarnation`) and the next is above both it and the clock: the
//! clock keeps the numbers fresh when the state file is new or lost, the
//! stored value keeps them rising when the clock goes back.
//!
//! Pure: the driver reads the file and the clock and passes both in.

/// The next incarnation after `last` (None: no earlier run is recorded)
/// when the wall clock reads `wall_us` microseconds since the epoch.
///
/// `parity` is the node's place in name order (0 or 1; the witness,
/// which no vote names, takes 0): the result has that parity, so the two
/// nodes of a pair never run under the same number, and a vote the
/// witness gives one of them (which names only an incarnation) can never
/// be taken by the other as its own.
///
/// None: `last` is so close to `u64::MAX` that no higher number of that
/// parity exists (only a damaged or forged state file gets there).
pub fn next(last: Option<u64>, wall_us: u64, parity: u64) -> Option<u64> {
    let after_last = match last {
        Some(l) => l.checked_add(1)?,
        None => 0,
    };
    // 0 means "none" in the heartbeat's `hears` and `vote` fields.
    let v = after_last.max(wall_us).max(1);
    if v % 2 == parity % 2 {
        Some(v)
    } else {
        v.checked_add(1)
    }
}

/// The state file's contents: the decimal number and a newline.
pub fn encode(incarnation: u64) -> String {
    format!("{incarnation}\n")
}

/// Reads what [`encode`] wrote; None for anything else (a damaged file
/// is not guessed at: a guess could be lower than the last run's).
pub fn decode(text: &str) -> Option<u64> {
    let digits = text.strip_suffix('\n').unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR_US: u64 = 3_600_000_000;
    /// 2025-01-01 in µs since the epoch: a plausible clock.
    const NOW_US: u64 = 1_735_689_600_000_000;

    #[test]
    fn a_first_start_takes_the_clock() {
        assert_eq!(next(None, NOW_US, 0), Some(NOW_US));
        assert_eq!(next(None, NOW_US, 1), Some(NOW_US + 1));
        // A clock not set at all still gives a usable (non-zero) number.
        assert_eq!(next(None, 0, 0), Some(2));
        assert_eq!(next(None, 0, 1), Some(1));
    }

    #[test]
    fn a_clock_that_went_back_still_gives_a_higher_number() {
        for parity in [0, 1] {
            let last = next(None, NOW_US, parity).unwrap();
            for wall in [NOW_US - HOUR_US, 0, last, last - 1] {
                let n = next(Some(last), wall, parity).unwrap();
                assert!(n > last, "{n} after {last} at clock {wall}");
                assert!(
                    n <= last + 2,
                    "a counter step, not a jump: {n} after {last}"
                );
                assert_eq!(n % 2, parity);
            }
            // A clock that went forward is taken: numbers stay near the
            // time, so a lost state file costs nothing once the clock is
            // right.
            assert_eq!(
                next(Some(last), NOW_US + HOUR_US, parity).map(|n| n / 2),
                Some((NOW_US + HOUR_US) / 2)
            );
        }
    }

    #[test]
    fn the_two_nodes_never_share_a_number() {
        for (a_last, b_last, wall) in [
            (None, None, NOW_US),
            (Some(NOW_US), Some(NOW_US - 1), 0),
            (Some(7), Some(7), 7),
        ] {
            assert_ne!(next(a_last, wall, 0), next(b_last, wall, 1));
        }
    }

    #[test]
    fn no_number_above_the_largest() {
        assert_eq!(next(Some(u64::MAX), NOW_US, 0), None);
        assert_eq!(next(Some(u64::MAX - 1), NOW_US, 0), None);
        assert_eq!(next(Some(u64::MAX - 1), NOW_US, 1), Some(u64::MAX));
        assert_eq!(next(None, u64::MAX, 0), None);
    }

    #[test]
    fn the_file_format_and_damage() {
        assert_eq!(decode(&encode(NOW_US)), Some(NOW_US));
        assert_eq!(decode("42"), Some(42));
        for bad in [
            "",
            "\n",
            "-1\n",
            "+1\n",
            " 1\n",
            "1 \n",
            "1\n\n",
            "0x10\n",
            "18446744073709551616\n",
            "\u{0}\u{0}\u{0}",
        ] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
    }
}
