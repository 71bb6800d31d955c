//! Exec sessions across hub replicas (docs/exec.md, "Across replicas"): the pure rules of the
//! frame relay through the shared database.
//!
//! A session has two directions: output (node -> operator) and input (operator -> node). Each
//! direction is a run of stored batches numbered 1, 2, 3, ... by the database (one counter per
//! session and direction, bumped in the statement that stores the batch). A reader delivers
//! batches strictly in order, starting at the one after the last it acknowledged ([`take`]);
//! acknowledging a batch deletes it. A writer stores a batch only while fewer than a window of
//! batches are unacknowledged ([`may_send`]), so a stalled reader stalls the writer (and, through
//! the HTTP stream, the node or the operator) instead of growing the table.
//!
//! Each side beats on the session row while it lives: the operator's replica (which reads the
//! output) and the node's replica (which holds the node's streams). A side whose beat is older
//! than the lease is gone, and the session is dead for the other side ([`verdict`]), as it is
//! past its deadline or when its row is gone.
//!
//! Must never: deliver a batch twice, deliver one out of order, or skip one.

use outpost_api::UnixMs;

/// How often each side of a session writes its beat.
pub const BEAT_MS: i64 = 1_000;
/// A side whose last beat is older than this is gone (its replica died or lost the database).
pub const LEASE_MS: i64 = 5_000;
/// Batches stored and not yet acknowledged, per session and direction, before the writer waits.
pub const WINDOW: u64 = 32;
/// How often a side re-reads the session when no notification came (the fallback poll).
pub const POLL_MS: u64 = 250;

/// What a reader does with the batches it read (their sequence numbers, as stored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Take {
    /// How many of the batches, from the first read, to deliver now (a contiguous run starting
    /// right after `acked`).
    pub deliver: usize,
    /// The acknowledgement after delivering them (`acked` when nothing is delivered).
    pub acked: u64,
}

/// The batches to deliver: those read in ascending order, skipping any at or below `acked`
/// (already delivered), then the contiguous run from `acked + 1`; a gap stops the run (the
/// missing batch is not visible yet: it is delivered on a later read, never skipped).
/// Returns how many of `seqs`, counted from the start, are consumed (delivered or skipped
/// duplicates): `skip` leading duplicates then `deliver` fresh ones.
pub fn take(acked: u64, seqs: &[u64]) -> (usize, Take) {
    let skip = seqs.iter().take_while(|s| **s <= acked).count();
    let mut next = acked + 1;
    let mut deliver = 0;
    for s in &seqs[skip..] {
        if *s != next {
            break;
        }
        deliver += 1;
        next += 1;
    }
    (
        skip,
        Take {
            deliver,
            acked: next - 1,
        },
    )
}

/// Whether a writer may store another batch: fewer than `window` stored since the last
/// acknowledgement.
pub fn may_send(stored: u64, acked: u64, window: u64) -> bool {
    stored.saturating_sub(acked) < window
}

/// The session row as either side reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionView {
    /// The hub's deadline for the session.
    pub deadline: UnixMs,
    /// The last beat of the operator's replica.
    pub operator_beat: UnixMs,
    /// The last beat of the node's replica; None until the node attached.
    pub node_beat: Option<UnixMs>,
}

/// Why a session is over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dead {
    /// The row is gone: the other side ended the session.
    Ended,
    /// Past the hub's deadline.
    Deadline,
    /// The operator's replica stopped beating.
    OperatorGone,
    /// The node's replica stopped beating.
    NodeSideGone,
}

/// Whether a session (None: its row is gone) is alive at `now`, and if not, why.
pub fn verdict(row: Option<&SessionView>, now: UnixMs, lease: i64) -> Result<(), Dead> {
    let Some(s) = row else { return Err(Dead::Ended) };
    if now > s.deadline {
        return Err(Dead::Deadline);
    }
    if now - s.operator_beat > lease {
        return Err(Dead::OperatorGone);
    }
    if s.node_beat.is_some_and(|b| now - b > lease) {
        return Err(Dead::NodeSideGone);
    }
    Ok(())
}

impl Dead {
    /// Said to the operator (in the made-up exit) and in the hub's log.
    pub fn reason(self) -> &'static str {
        match self {
            Dead::Ended => "the session ended",
            Dead::Deadline => "the hub ended the session at its time limit",
            Dead::OperatorGone => "the hub replica serving the operator went away",
            Dead::NodeSideGone => "the hub replica holding the node's link went away before the command ended",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_delivered_once_in_order_and_a_gap_waits() {
        // (acked, seqs read) -> (skipped duplicates, deliver, new ack)
        let cases: &[(u64, &[u64], usize, usize, u64)] = &[
            (0, &[], 0, 0, 0),
            (0, &[1, 2, 3], 0, 3, 3),
            (0, &[2, 3], 0, 0, 0),    // batch 1 not visible yet: wait for it
            (3, &[2, 3, 4], 2, 1, 4), // already delivered ones skipped, never twice
            (3, &[4, 6, 7], 0, 1, 4), // a gap stops the run
            (5, &[1, 2], 2, 0, 5),    // all old
            (5, &[6], 0, 1, 6),
        ];
        for (acked, seqs, skip, deliver, new) in cases {
            let (s, t) = take(*acked, seqs);
            assert_eq!(
                (s, t.deliver, t.acked),
                (*skip, *deliver, *new),
                "acked {acked}, seqs {seqs:?}"
            );
        }
    }

    #[test]
    fn a_writer_waits_for_acknowledgements_past_its_window() {
        let cases: &[(u64, u64, u64, bool)] = &[
            (0, 0, 4, true),
            (3, 0, 4, true),
            (4, 0, 4, false),
            (10, 7, 4, true),
            (11, 7, 4, false),
            (7, 9, 4, true), // an ack ahead of what this writer saw
        ];
        for (stored, acked, window, ok) in cases {
            assert_eq!(may_send(*stored, *acked, *window), *ok, "{stored} {acked} {window}");
        }
    }

    #[test]
    fn a_session_is_dead_when_gone_late_or_either_side_stops_beating() {
        let v = |deadline, operator_beat, node_beat| SessionView {
            deadline,
            operator_beat,
            node_beat,
        };
        let cases: &[(Option<SessionView>, UnixMs, Result<(), Dead>)] = &[
            (None, 0, Err(Dead::Ended)),
            (Some(v(10_000, 1_000, None)), 2_000, Ok(())),
            (Some(v(10_000, 1_000, None)), 6_000, Ok(())),
            (Some(v(10_000, 1_000, None)), 6_001, Err(Dead::OperatorGone)),
            (Some(v(10_000, 5_000, Some(1_000))), 6_001, Err(Dead::NodeSideGone)),
            (Some(v(10_000, 5_000, Some(5_500))), 9_000, Ok(())),
            (Some(v(10_000, 9_000, Some(9_000))), 10_001, Err(Dead::Deadline)),
        ];
        for (row, now, want) in cases {
            assert_eq!(verdict(row.as_ref(), *now, 5_000), *want, "{row:?} at {now}");
        }
    }
}
