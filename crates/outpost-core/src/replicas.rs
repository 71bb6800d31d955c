//! Several hub replicas on one database (docs/postgres.md, "Replicas"): what a replica looks at
//! again, and when, so that a change committed through any replica wakes the long-polls held by
//! all of them.
//!
//! Every replica LISTENs on one channel; a commit that bumps node generations (or parks a relayed
//! request, or answers one) sends a NOTIFY that carries only a number. A notification is a hint,
//! never the data: on one, after every reconnect of the listener, and at least every
//! `fallback` (the slow poll), the replica re-reads the stored generations of the nodes whose
//! long-polls it holds and wakes those that moved past what it has seen ([`moved`]). So a lost
//! notification delays a wake-up by at most the fallback period; it never loses one.
//!
//! Contacts: a node holding a long-poll on one replica must read as Online on every replica. Each
//! replica writes the last contact of the nodes it holds, and of those that polled it, in one
//! batch every [`contact_every`] — a bounded write rate per replica, never a write per poll.

use std::collections::BTreeMap;

/// Why a replica looks at the database now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// A NOTIFY arrived (another replica, or this one, committed something).
    Notified,
    /// The listener (re)connected: notifications sent meanwhile are lost, so everything is
    /// looked at again.
    Reconnected,
    /// The fallback poll came due.
    Poll,
}

/// The held long-polls to wake: nodes whose stored generation is past the one this replica has
/// seen for them (a node not seen yet counts as seen at 0). Sorted by name.
pub fn moved(seen: &BTreeMap<String, u64>, stored: &[(String, u64)]) -> Vec<String> {
    let mut out: Vec<String> = stored
        .iter()
        .filter(|(n, g)| *g > seen.get(n).copied().unwrap_or(0))
        .map(|(n, _)| n.clone())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// How long to wait before rebuilding a listener after `failures` failed attempts in a row:
/// 100 ms doubling up to 5 s.
pub fn reconnect_backoff_ms(failures: u32) -> u64 {
    100u64.saturating_mul(1u64 << failures.min(6)).min(5_000)
}

/// How often a replica writes the contacts it holds, for nodes turning Offline after
/// `offline_after_ms` without one: a quarter of it (so a held node reads Online on every
/// replica with three periods to spare), between 250 ms and 10 s.
pub fn contact_every(offline_after_ms: u64) -> u64 {
    (offline_after_ms / 4).clamp(250, 10_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(n, g)| (n.to_string(), *g)).collect()
    }

    fn stored(pairs: &[(&str, u64)]) -> Vec<(String, u64)> {
        pairs.iter().map(|(n, g)| (n.to_string(), *g)).collect()
    }

    #[test]
    fn moved_wakes_exactly_the_nodes_past_what_was_seen() {
        #[allow(clippy::type_complexity)]
        let cases: &[(&[(&str, u64)], &[(&str, u64)], &[&str])] = &[
            // nothing stored, nothing to wake
            (&[("a", 3)], &[], &[]),
            // same generation: no wake
            (&[("a", 3)], &[("a", 3)], &[]),
            // moved on another replica
            (&[("a", 3), ("b", 5)], &[("a", 4), ("b", 5)], &["a"]),
            // a node never seen here counts from 0
            (&[], &[("c", 1)], &["c"]),
            // a stored generation below the seen one (a stale read) wakes nothing
            (&[("a", 9)], &[("a", 4)], &[]),
            // sorted, each once
            (&[], &[("z", 2), ("b", 1), ("z", 2)], &["b", "z"]),
        ];
        for (s, st, want) in cases {
            assert_eq!(moved(&seen(s), &stored(st)), *want, "seen {s:?} stored {st:?}");
        }
    }

    #[test]
    fn reconnect_backoff_and_contact_period() {
        let backoff: Vec<u64> = (0..9).map(reconnect_backoff_ms).collect();
        assert_eq!(backoff, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        let cases = [
            (3_000, 750),
            (90_000, 10_000),
            (100, 250),
            (40_000, 10_000),
            (8_000, 2_000),
        ];
        for (offline, want) in cases {
            assert_eq!(contact_every(offline), want, "offline after {offline} ms");
        }
    }
}
