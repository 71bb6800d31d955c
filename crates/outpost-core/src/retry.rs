//! One retry policy for every loop that tries again after a failure: exponential backoff with
//! bounded, injected jitter, and an optional give-up deadline.
//!
//! ```text
//!   delay(attempt, draw) = min(base * 2^attempt, max) * (1 + jitter * draw)      draw in [0, 1]
//! ```
//!
//! `attempt` counts the failures so far (0 before the first retry). `draw` is a uniform random
//! number the caller supplies (`rand::random::<f64>()` in production, fixed values in tests),
//! so the whole policy is a pure function. Jitter only ever *adds* time: a fleet that lost its
//! hub at one instant spreads its reconnects over `[d, d * (1 + jitter)]` instead of arriving
//! in lockstep, and no retry comes sooner than the plain exponential schedule says.
//!
//! The presets name each use, so a policy is changed in one place:
//!
//! | preset | used by | schedule |
//! | --- | --- | --- |
//! | [`HUB_LINK`] | agent long-poll, status reports, error-line forwarding; the fleet simulator | 1 s doubling to 30 s, + up to 50 % |
//! | [`WEBHOOK`] / [`webhook`] | hub webhook delivery | 1 s doubling to 5 min (configurable), + up to 25 %; give up after 24 h |
//! | [`RUNTIME_PROBE`] | agent: asking the Docker Engine which containers it already runs | 2 s doubling to 60 s, no jitter |
//! | [`STATE_WRITE`] | agent: saving a new desired state that failed to save (disk full) | 1 s doubling to 10 s, + up to 20 % |
//!
//! Restarts of crashed workloads are *not* retries in this sense: they follow Kubernetes'
//! CrashLoopBackOff schedule in [`crate::supervise`], which resets after a long enough run.

use outpost_api::UnixMs;

/// How a loop retries after failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Delay before the first retry, ms.
    pub base_ms: u64,
    /// The exponential part never exceeds this, ms (jitter comes on top).
    pub max_ms: u64,
    /// Largest extra delay, in percent of the exponential part (0 = none).
    pub jitter_pct: u32,
    /// Stop retrying once the first failure is this old, ms (`None`: retry forever).
    pub give_up_after_ms: Option<i64>,
}

/// The agent's link to the hub (and the simulated agents of `outpost bench fleet`).
pub const HUB_LINK: Policy = Policy {
    base_ms: 1_000,
    max_ms: 30_000,
    jitter_pct: 50,
    give_up_after_ms: None,
};

/// Webhook delivery with the default longest pause (5 min); see [`webhook`].
pub const WEBHOOK: Policy = webhook(300_000);

/// Webhook delivery: 1 s doubling to `max_ms`, + up to 25 %, give up after 24 h.
pub const fn webhook(max_ms: u64) -> Policy {
    Policy {
        base_ms: 1_000,
        max_ms,
        jitter_pct: 25,
        give_up_after_ms: Some(86_400_000),
    }
}

/// Asking a container engine that does not answer yet (e.g. still starting at boot).
pub const RUNTIME_PROBE: Policy = Policy {
    base_ms: 2_000,
    max_ms: 60_000,
    jitter_pct: 0,
    give_up_after_ms: None,
};

/// Saving the desired state again after a local write failed (a full disk): the node should
/// catch up soon after space is freed, and the hub is not what is failing.
pub const STATE_WRITE: Policy = Policy {
    base_ms: 1_000,
    max_ms: 10_000,
    jitter_pct: 20,
    give_up_after_ms: None,
};

/// What to do after a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Try again after this many ms.
    RetryIn(u64),
    /// The give-up deadline has passed: stop (and say so).
    GiveUp,
}

impl Policy {
    /// Delay before retry number `attempt + 1`, ms. `draw` is clamped to `[0, 1]`.
    pub fn delay_ms(&self, attempt: u32, draw: f64) -> u64 {
        let exp = self.base_ms.saturating_mul(1u64 << attempt.min(32)).min(self.max_ms);
        let draw = if draw.is_nan() { 0.0 } else { draw.clamp(0.0, 1.0) };
        let extra = (exp as f64 * f64::from(self.jitter_pct) / 100.0 * draw).round() as u64;
        exp + extra
    }

    /// After the failure of attempt `attempt` (0-based) of something first tried at
    /// `first_try_at`: give up, or retry after how long.
    pub fn next(&self, attempt: u32, first_try_at: UnixMs, now: UnixMs, draw: f64) -> Next {
        match self.give_up_after_ms {
            Some(limit) if now.saturating_sub(first_try_at) > limit => Next::GiveUp,
            _ => Next::RetryIn(self.delay_ms(attempt, draw)),
        }
    }
}

/// A failure counter over a [`Policy`], for loops that keep their state in memory.
#[derive(Clone, Debug)]
pub struct Backoff {
    policy: Policy,
    attempt: u32,
}

impl Backoff {
    pub fn new(policy: Policy) -> Self {
        Self { policy, attempt: 0 }
    }

    /// The call succeeded: the next failure starts from the base delay again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.attempt
    }

    /// Another failure: the delay before the next try, ms.
    pub fn next_delay_ms(&mut self, draw: f64) -> u64 {
        let d = self.policy.delay_ms(self.attempt, draw);
        self.attempt = self.attempt.saturating_add(1);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(p: Policy, cases: &[(u32, f64, u64)]) {
        for &(attempt, draw, want) in cases {
            assert_eq!(p.delay_ms(attempt, draw), want, "attempt {attempt}, draw {draw}");
        }
    }

    #[test]
    fn hub_link_doubles_caps_at_30s_and_adds_up_to_half() {
        check(
            HUB_LINK,
            &[
                (0, 0.0, 1_000),
                (0, 1.0, 1_500),
                (0, 0.5, 1_250),
                (1, 0.0, 2_000),
                (2, 0.0, 4_000),
                (4, 0.0, 16_000),
                (5, 0.0, 30_000),
                (5, 1.0, 45_000),
                (6, 0.0, 30_000),
                (40, 1.0, 45_000),
                (u32::MAX, 0.0, 30_000),
                // out-of-range draws are clamped, never shorten the delay
                (0, -3.0, 1_000),
                (0, 7.0, 1_500),
                (0, f64::NAN, 1_000),
            ],
        );
    }

    #[test]
    fn webhook_caps_at_its_configured_max_with_quarter_jitter() {
        check(
            WEBHOOK,
            &[
                (0, 0.0, 1_000),
                (0, 1.0, 1_250),
                (8, 0.0, 256_000),
                (9, 0.0, 300_000),
                (9, 1.0, 375_000),
            ],
        );
        check(webhook(200), &[(0, 0.0, 200), (3, 1.0, 250)]);
    }

    #[test]
    fn state_write_retries_within_ten_seconds() {
        check(
            STATE_WRITE,
            &[(0, 0.0, 1_000), (3, 0.0, 8_000), (4, 0.0, 10_000), (9, 1.0, 12_000)],
        );
    }

    #[test]
    fn runtime_probe_has_no_jitter() {
        check(
            RUNTIME_PROBE,
            &[(0, 1.0, 2_000), (1, 1.0, 4_000), (4, 1.0, 32_000), (5, 1.0, 60_000)],
        );
    }

    #[test]
    fn give_up_only_after_the_deadline() {
        let day = 86_400_000;
        let cases = [
            // (attempt, first_try_at, now, expected)
            (0, 0, 0, Next::RetryIn(1_000)),
            (3, 0, day, Next::RetryIn(8_000)),
            (3, 0, day + 1, Next::GiveUp),
            (30, 5, day + 5, Next::RetryIn(300_000)),
            (30, 5, day + 6, Next::GiveUp),
            // a clock that went backwards never gives up early
            (1, 1_000, 0, Next::RetryIn(2_000)),
        ];
        for (attempt, first, now, want) in cases {
            assert_eq!(WEBHOOK.next(attempt, first, now, 0.0), want, "{attempt} {first} {now}");
        }
        assert_eq!(
            HUB_LINK.next(100, 0, i64::MAX, 0.0),
            Next::RetryIn(30_000),
            "never gives up"
        );
    }

    #[test]
    fn backoff_counts_failures_and_resets() {
        let mut b = Backoff::new(HUB_LINK);
        let d: Vec<u64> = (0..7).map(|_| b.next_delay_ms(0.0)).collect();
        assert_eq!(d, [1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000]);
        assert_eq!(b.failures(), 7);
        b.reset();
        assert_eq!((b.failures(), b.next_delay_ms(1.0)), (0, 1_500));
    }
}
