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
//!
//! Certificates: each replica remembers which node a certificate fingerprint belongs to. A
//! certificate retired through one replica (a renewed one promoted, a node deleted) is a row
//! in the database stamped with the database's clock; every look reads the rows since its last
//! read, less an overlap for late commits, and drops those nodes' fingerprints ([`RetiredCerts`]).

use std::collections::{BTreeMap, BTreeSet};

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

/// How far back every look reads retired certificates again, in the database's clock: a
/// retirement stamped before one look's read but committed after it is found by a later look,
/// when it commits within this time.
pub const RETIRED_OVERLAP_MS: i64 = 120_000;

/// How long the database keeps a retired certificate's row (`cert_retired`). A replica whose
/// last read is older than this drops every certificate it remembers ([`Retired::All`]).
pub const RETIRED_KEPT_MS: i64 = 86_400_000;

/// What a replica's certificate cache must drop after one read of the retired certificates.
#[derive(Debug, PartialEq, Eq)]
pub enum Retired {
    /// These nodes' certificates (each retirement reported once).
    Nodes(Vec<String>),
    /// Everything: the last read was so long ago that rows since may be gone.
    All,
}

/// Certificates retired through any replica (a renewed one promoted, a node deleted), as one
/// replica's looks read them from the database: which nodes' cached fingerprints to drop, each
/// retirement once. Times are the database's clock, so replicas' clocks never matter.
#[derive(Debug, Default)]
pub struct RetiredCerts {
    /// Database time of the last read.
    last_read: Option<i64>,
    /// (node, retired at) already reported, kept while inside the overlap.
    handled: BTreeSet<(String, i64)>,
}

impl RetiredCerts {
    /// The lower bound of the next read (rows retired at or after it); None: the first read,
    /// which reads the last [`RETIRED_OVERLAP_MS`] before the database's now.
    pub fn since(&self) -> Option<i64> {
        self.last_read.map(|t| t - RETIRED_OVERLAP_MS)
    }

    /// A read at database time `now` returned `rows` (node, retired at), every row at or after
    /// [`RetiredCerts::since`]: what to drop.
    pub fn read(&mut self, now: i64, rows: Vec<(String, i64)>) -> Retired {
        let gap = self
            .last_read
            .is_some_and(|t| now - t > RETIRED_KEPT_MS - RETIRED_OVERLAP_MS);
        // A clock that stepped back never moves the window back.
        let last = self.last_read.map_or(now, |t| t.max(now));
        self.last_read = Some(last);
        let mut out: Vec<String> = rows
            .into_iter()
            .filter(|r| self.handled.insert(r.clone()))
            .map(|(n, _)| n)
            .collect();
        let floor = last - RETIRED_OVERLAP_MS;
        self.handled.retain(|(_, at)| *at >= floor);
        if gap {
            return Retired::All;
        }
        out.sort();
        out.dedup();
        Retired::Nodes(out)
    }
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

    fn rows(pairs: &[(&str, i64)]) -> Vec<(String, i64)> {
        pairs.iter().map(|(n, t)| (n.to_string(), *t)).collect()
    }

    #[test]
    fn retired_certificates_are_dropped_once_each_and_late_commits_are_still_found() {
        let mut r = RetiredCerts::default();
        assert_eq!(r.since(), None, "the first read covers the overlap before now");
        let t0 = 10_000_000;
        assert_eq!(r.read(t0, rows(&[("a", t0 - 5_000)])), Retired::Nodes(vec!["a".into()]));
        assert_eq!(r.since(), Some(t0 - RETIRED_OVERLAP_MS));
        // The next look reads the same row again (overlap): not reported twice.
        let t1 = t0 + 1_000;
        assert_eq!(r.read(t1, rows(&[("a", t0 - 5_000)])), Retired::Nodes(vec![]));
        // A promotion stamped before the last read but committed after it: found now.
        let t2 = t1 + 1_000;
        assert_eq!(
            r.read(
                t2,
                rows(&[("a", t0 - 5_000), ("b", t1 - 500), ("c", t2 - 10), ("c", t2 - 10)])
            ),
            Retired::Nodes(vec!["b".into(), "c".into()])
        );
        // The same node retired again later (renewed twice, or deleted and joined again).
        let t3 = t2 + 1_000;
        assert_eq!(r.read(t3, rows(&[("a", t3 - 1)])), Retired::Nodes(vec!["a".into()]));
        // Handled rows older than the overlap are forgotten (the read no longer returns them).
        let t4 = t3 + 2 * RETIRED_OVERLAP_MS;
        assert_eq!(r.read(t4, vec![]), Retired::Nodes(vec![]));
        assert!(r.handled.is_empty(), "{:?}", r.handled);
        // A database clock that stepped back does not move the window back.
        assert_eq!(r.read(t4 - 60_000, vec![]), Retired::Nodes(vec![]));
        assert_eq!(r.since(), Some(t4 - RETIRED_OVERLAP_MS));
        // No read for longer than the rows are kept: drop everything.
        let t5 = t4 + RETIRED_KEPT_MS;
        assert_eq!(r.read(t5, rows(&[("d", t5 - 1)])), Retired::All);
        assert_eq!(r.read(t5 + 1_000, rows(&[("d", t5 - 1)])), Retired::Nodes(vec![]));
    }
}
