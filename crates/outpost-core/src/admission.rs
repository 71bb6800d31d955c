//! Admission control for reconnect storms (docs/protocol.md §6, "Busy hub").
//!
//! After every hub restarts, every agent reconnects within seconds and asks for its desired
//! state at once. The hub lets a bounded number of joins and syncs work at the same time
//! ([`limit`]); a request beyond that is not queued without bound but answered `503` with
//! `Retry-After: N` ([`admit`]). N is how long the requests already turned away need to get
//! through at the rate the hub is admitting them, spread by a random draw so the refused
//! agents do not all come back in the same second, and capped. An agent waits at least N
//! before its next try ([`agent_wait`]) and never gives up; an agent that predates this treats
//! a 503 as a failed try (its own backoff).
//!
//! A long-poll counts only while the hub works on it (authorization, contact, reading the
//! desired state): it leaves the count when it starts waiting for a change. A poll from a node
//! already holding the newest generation the hub knows for it (the poll again after every
//! answer) is not counted at all (`outpost_hub::server`, docs/protocol.md §6).

use std::time::Duration;

/// Requests in flight per CPU the hub lets work at once, by default. (32 per CPU turned the
/// burst of re-polls that follows every change at 5,000 agents into 503s: BENCHMARKS.md §4.)
pub const PER_CPU: usize = 128;
/// Fewest requests in flight allowed, whatever the CPU count.
pub const MIN_LIMIT: usize = 16;
/// Longest `Retry-After` the hub sends, seconds.
pub const MAX_RETRY_AFTER_SECS: u64 = 30;

/// How many joins and syncs may work at once: `configured` when set (at least 1), else
/// [`PER_CPU`] per CPU, at least [`MIN_LIMIT`].
pub fn limit(cpus: usize, configured: Option<usize>) -> usize {
    match configured {
        Some(n) => n.max(1),
        None => (cpus.max(1) * PER_CPU).max(MIN_LIMIT),
    }
}

/// What the hub knows when a request arrives.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Load {
    /// Joins and syncs working now.
    pub in_flight: usize,
    /// [`limit`].
    pub limit: usize,
    /// Requests turned away in the last second (they come back).
    pub refused_recently: u64,
    /// Requests admitted per second, recently (at least the last second's count).
    pub admitted_per_sec: f64,
}

/// The hub's answer to one join or sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Let it work.
    Enter,
    /// Answer `503` with `Retry-After: retry_after_secs`.
    Later { retry_after_secs: u64 },
}

/// Admit a request, or say after how many seconds to come back. `draw` is a uniform random
/// number in `[0, 1)` (the jitter; fixed in tests).
///
/// N = ceil(base x (1 + draw)), from 1 to [`MAX_RETRY_AFTER_SECS`], where base is how long
/// the backlog (this request and the ones refused in the last second) takes at the rate the
/// hub admits (at least `limit` per second is assumed when it has not measured more: a request
/// works for well under a second), at most half the cap: the draw spreads the refused over
/// base..2 x base, and the cap never squeezes them back into one instant.
pub fn admit(load: &Load, draw: f64) -> Admit {
    if load.in_flight < load.limit {
        return Admit::Enter;
    }
    let rate = load.admitted_per_sec.max(load.limit.max(1) as f64);
    let backlog = load.refused_recently.saturating_add(1) as f64;
    let spread = 1.0 + draw.clamp(0.0, 1.0);
    let base = (backlog / rate).min(MAX_RETRY_AFTER_SECS as f64 / 2.0);
    let secs = (base * spread).ceil() as u64;
    Admit::Later {
        retry_after_secs: secs.clamp(1, MAX_RETRY_AFTER_SECS),
    }
}

/// Least `Retry-After` of a request the hub's database could not take (no pooled connection
/// came free within the pool's wait), seconds: the draw spreads it over this to twice this.
pub const STORE_BUSY_RETRY_AFTER_SECS: u64 = 5;

/// `Retry-After` of a request answered `503` because the database is saturated: it already
/// waited the pool's timeout, so it comes back after [`STORE_BUSY_RETRY_AFTER_SECS`] x (1 +
/// `draw`), never sooner (a `500` made agents retry after their own short backoff and added
/// to the load that caused it). `draw` as in [`admit`].
pub fn store_busy_retry_after(draw: f64) -> u64 {
    let secs = (STORE_BUSY_RETRY_AFTER_SECS as f64 * (1.0 + draw.clamp(0.0, 1.0))).ceil() as u64;
    secs.clamp(STORE_BUSY_RETRY_AFTER_SECS, 2 * STORE_BUSY_RETRY_AFTER_SECS)
}

/// Whether a sync skips admission: the poll of a node already holding (`since`) at least the
/// newest generation this hub process knows for it (`known`: none after a restart until the
/// node's first poll or change there). That is the poll again after every answer; refused, the
/// agent held no poll for `Retry-After` and the next change reached it that late.
pub fn skips_admission(since: Option<u64>, known: Option<u64>) -> bool {
    matches!((since, known), (Some(s), Some(k)) if k > 0 && s >= k)
}

/// How long an agent waits before its next try: its own backoff, and at least the hub's
/// `Retry-After` when it sent one (capped at an hour, whatever the hub says).
pub fn agent_wait(backoff: Duration, retry_after_secs: Option<u64>) -> Duration {
    match retry_after_secs {
        Some(n) => backoff.max(Duration::from_secs(n.min(3600))),
        None => backoff,
    }
}

/// `Retry-After` as this protocol sends it: whole seconds (an HTTP date is not used by hubs
/// and is ignored). None for anything else.
pub fn parse_retry_after(value: &str) -> Option<u64> {
    let v = value.trim();
    (!v.is_empty() && v.len() <= 10 && v.bytes().all(|b| b.is_ascii_digit()))
        .then(|| v.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(in_flight: usize, limit: usize, refused: u64, rate: f64) -> Load {
        Load {
            in_flight,
            limit,
            refused_recently: refused,
            admitted_per_sec: rate,
        }
    }

    #[test]
    fn only_a_poll_holding_the_newest_known_generation_skips_admission() {
        for (since, known, skips) in [
            (Some(7), Some(7), true),  // the poll again after an answer
            (Some(8), Some(7), true),  // another replica committed newer; the read finds it
            (Some(6), Some(7), false), // behind: it needs an answer
            (Some(7), None, false),    // unknown here (a restarted hub): a storm is admitted
            (Some(0), Some(0), false), // nothing known yet
            (None, Some(7), false),    // no generation in the query
        ] {
            assert_eq!(skips_admission(since, known), skips, "since {since:?}, known {known:?}");
        }
    }

    #[test]
    fn limit_from_cpus_or_config() {
        for (cpus, configured, want) in [
            (2, None, 256),
            (0, None, 128),
            (1, None, 128),
            (16, None, 2048),
            (2, Some(3), 3),
            (2, Some(0), 1),
        ] {
            assert_eq!(limit(cpus, configured), want, "{cpus} cpus, {configured:?}");
        }
    }

    #[test]
    fn admit_below_the_limit_else_retry_after_from_backlog_and_rate() {
        // (load, draw) -> answer
        let cases: &[(Load, f64, Admit)] = &[
            (load(0, 64, 0, 0.0), 0.5, Admit::Enter),
            (load(63, 64, 10_000, 1.0), 0.9, Admit::Enter),
            // at the limit, nothing refused yet: come back in a second
            (load(64, 64, 0, 0.0), 0.0, Admit::Later { retry_after_secs: 1 }),
            // 640 refused at 64/s: 10 s, spread up to 20 s by the draw
            (load(64, 64, 639, 64.0), 0.0, Admit::Later { retry_after_secs: 10 }),
            (load(64, 64, 639, 64.0), 0.5, Admit::Later { retry_after_secs: 15 }),
            (load(64, 64, 639, 64.0), 0.999, Admit::Later { retry_after_secs: 20 }),
            // a measured rate above the limit shortens it
            (load(64, 64, 639, 320.0), 0.0, Admit::Later { retry_after_secs: 2 }),
            // a huge backlog: base at half the cap, still spread by the draw up to the cap
            (
                load(64, 64, 1_000_000, 64.0),
                0.0,
                Admit::Later { retry_after_secs: 15 },
            ),
            (
                load(64, 64, 1_000_000, 64.0),
                0.5,
                Admit::Later { retry_after_secs: 23 },
            ),
            (
                load(64, 64, 1_000_000, 64.0),
                0.999,
                Admit::Later {
                    retry_after_secs: MAX_RETRY_AFTER_SECS,
                },
            ),
            // a tiny limit with no measured rate: one per second assumed
            (load(1, 1, 4, 0.0), 0.0, Admit::Later { retry_after_secs: 5 }),
            // a draw out of range is clamped
            (load(1, 1, 4, 0.0), 7.0, Admit::Later { retry_after_secs: 10 }),
        ];
        for (l, draw, want) in cases {
            assert_eq!(admit(l, *draw), *want, "{l:?} draw {draw}");
        }
    }

    #[test]
    fn an_agent_waits_at_least_retry_after() {
        let s = Duration::from_secs;
        assert_eq!(agent_wait(s(2), None), s(2));
        assert_eq!(agent_wait(s(2), Some(7)), s(7));
        assert_eq!(agent_wait(s(20), Some(7)), s(20));
        assert_eq!(agent_wait(s(1), Some(1_000_000)), s(3600));
        for (v, want) in [
            ("7", Some(7)),
            (" 12 ", Some(12)),
            ("", None),
            ("-1", None),
            ("1.5", None),
            ("Wed, 21 Oct 2015 07:28:00 GMT", None),
            ("99999999999", None),
        ] {
            assert_eq!(parse_retry_after(v), want, "{v:?}");
        }
    }

    #[test]
    fn a_saturated_store_spreads_its_retries_over_five_to_ten_seconds() {
        for (draw, want) in [
            (0.0, 5),
            (0.5, 8),
            (0.99, 10),
            (1.0, 10),
            (-3.0, 5),
            (7.0, 10),
            (f64::NAN, 5),
        ] {
            assert_eq!(store_busy_retry_after(draw), want, "draw {draw}");
        }
    }
}
