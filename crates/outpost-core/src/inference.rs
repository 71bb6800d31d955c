//! Model-serving figures, as pure functions: what a sampling interval saw of a model server
//! ([`window`]: requests, errors, p99 from the fixed latency buckets), and the model part of a
//! node's update gate ([`gate_verdict`]).
//!
//! Owns: the arithmetic on [`ModelCounters`] (counter resets, histogram quantiles) and the
//! gate's thresholds. Must never: read the clock (`now` is an argument), or talk to a model
//! server; the agent reads the counters and acts on the verdict.

use outpost_api::{ModelCounters, ModelGate, UnixMs, MODEL_LATENCY_BUCKETS};

/// Counters older than this are not judged by the gate (the model server stopped answering
/// its stats, or the agent fell behind).
pub const STALE_MS: i64 = 5_000;

/// What happened between two readings of the same model server. A reading lower than the
/// previous one means the server restarted: everything it counted since is new.
pub fn delta(prev: Option<&ModelCounters>, cur: &ModelCounters) -> ModelCounters {
    let Some(p) = prev else { return cur.clone() };
    let reset = cur.requests < p.requests
        || cur.errors < p.errors
        || cur.buckets.len() != p.buckets.len()
        || cur.buckets.iter().zip(&p.buckets).any(|(c, p)| c < p);
    if reset {
        return cur.clone();
    }
    ModelCounters {
        requests: cur.requests - p.requests,
        errors: cur.errors - p.errors,
        buckets: cur.buckets.iter().zip(&p.buckets).map(|(c, p)| c - p).collect(),
        latency_sum_s: (cur.latency_sum_s - p.latency_sum_s).max(0.0),
    }
}

/// The `q` quantile (0..1) of the latencies counted in `buckets` (per bucket, not cumulative,
/// bounds [`MODEL_LATENCY_BUCKETS`] then one open bucket), in seconds, interpolated linearly
/// inside its bucket as Prometheus' `histogram_quantile` does. A quantile in the open bucket is
/// its lower bound (the last finite bound). None without observations.
pub fn quantile(buckets: &[u64], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut below = 0u64;
    for (i, &n) in buckets.iter().enumerate() {
        if n > 0 && (below + n) as f64 >= rank {
            let Some(&upper) = MODEL_LATENCY_BUCKETS.get(i) else {
                return MODEL_LATENCY_BUCKETS.last().copied();
            };
            let lower = if i == 0 { 0.0 } else { MODEL_LATENCY_BUCKETS[i - 1] };
            return Some(lower + (upper - lower) * ((rank - below as f64) / n as f64).clamp(0.0, 1.0));
        }
        below += n;
    }
    MODEL_LATENCY_BUCKETS.last().copied()
}

/// One interval of a model's traffic.
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    pub requests: u64,
    pub errors: u64,
    /// p99 latency, ms; None without requests.
    pub p99_ms: Option<f64>,
    /// Percent of requests that failed; None without requests.
    pub error_pct: Option<f64>,
}

/// The interval between two readings (see [`delta`]).
pub fn window(prev: Option<&ModelCounters>, cur: &ModelCounters) -> Window {
    let d = delta(prev, cur);
    Window {
        requests: d.requests,
        errors: d.errors,
        p99_ms: quantile(&d.buckets, 0.99).map(|s| s * 1000.0),
        error_pct: (d.requests > 0).then(|| d.errors as f64 / d.requests as f64 * 100.0),
    }
}

/// The model part of a node's update gate. `counters` are the new model server's, since it
/// started (it started with the revision under test), read at `read_at`. Returns why the model
/// fails the gate, or None: it passes, or there is not enough (or too old) evidence to judge, and
/// readiness alone decides.
pub fn gate_verdict(
    gate: &ModelGate,
    model: &str,
    counters: &ModelCounters,
    read_at: UnixMs,
    now: UnixMs,
) -> Option<String> {
    if now - read_at > STALE_MS || counters.requests < gate.min_requests.max(1) {
        return None;
    }
    let w = window(None, counters);
    if let (Some(max), Some(pct)) = (gate.max_error_rate, w.error_pct) {
        if pct / 100.0 > max {
            return Some(format!(
                "model {model}: {} of {} requests failed ({pct:.1} %), over the gate's modelErrorRate {max}",
                w.errors, w.requests
            ));
        }
    }
    if let (Some(max), Some(p99)) = (gate.max_p99_ms, w.p99_ms) {
        if p99 > max {
            return Some(format!(
                "model {model}: p99 latency {p99:.1} ms over {} requests, over the gate's modelP99 {max} ms",
                w.requests
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counters with `n` requests in bucket `i` (plus `errors`).
    fn counters(per_bucket: &[(usize, u64)], errors: u64) -> ModelCounters {
        let mut buckets = vec![0; MODEL_LATENCY_BUCKETS.len() + 1];
        for &(i, n) in per_bucket {
            buckets[i] += n;
        }
        let requests = buckets.iter().sum();
        ModelCounters {
            requests,
            errors,
            buckets,
            latency_sum_s: 0.0,
        }
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let check = |per: &[(usize, u64)], q: f64, want: Option<f64>| {
            let got = quantile(&counters(per, 0).buckets, q);
            match (got, want) {
                (Some(g), Some(w)) => assert!((g - w).abs() < 1e-9, "{per:?} q={q}: {g} != {w}"),
                _ => assert_eq!(got, want, "{per:?} q={q}"),
            }
        };
        check(&[], 0.99, None);
        // all in (50 us, 100 us]: p50 in the middle, p100 at the top
        check(&[(1, 100)], 0.5, Some(0.000_075));
        check(&[(1, 100)], 1.0, Some(0.000_1));
        // all in the first bucket: from 0
        check(&[(0, 10)], 0.5, Some(0.000_025));
        // 99 fast, 1 in (50 ms, 100 ms]: p99 is still at the top of the fast bucket
        check(&[(0, 99), (10, 1)], 0.99, Some(0.000_05));
        check(&[(0, 98), (10, 2)], 0.99, Some(0.075));
        // slower than the last bound: the last bound
        check(&[(12, 5)], 0.99, Some(0.5));
    }

    #[test]
    fn deltas_and_restarts() {
        let a = counters(&[(1, 10)], 1);
        let b = counters(&[(1, 15), (9, 5)], 3);
        let d = delta(Some(&a), &b);
        assert_eq!((d.requests, d.errors), (10, 2));
        assert_eq!(d.buckets[1], 5);
        assert_eq!(d.buckets[9], 5);
        // the server restarted: counters went down, all of `a2` is new
        let a2 = counters(&[(1, 3)], 0);
        assert_eq!(delta(Some(&b), &a2), a2);
        assert_eq!(delta(None, &a2), a2);
        let w = window(Some(&a), &b);
        assert_eq!(w.error_pct, Some(20.0));
        assert!((w.p99_ms.unwrap() - 49.5).abs() < 1e-6, "{w:?}"); // rank 9.9: in (25, 50] ms
        let idle = window(Some(&b), &b);
        assert_eq!((idle.requests, idle.p99_ms, idle.error_pct), (0, None, None));
    }

    #[test]
    fn the_model_gate() {
        let gate = ModelGate {
            max_error_rate: Some(0.05),
            max_p99_ms: Some(50.0),
            min_requests: 20,
        };
        let now: UnixMs = 1_000_000;
        let fast = |n: u64, errors: u64| counters(&[(1, n)], errors);
        let slow = counters(&[(1, 50), (11, 50)], 0); // half in (100, 500] ms
        let table: Vec<(&str, ModelCounters, UnixMs, Option<&str>)> = vec![
            ("healthy", fast(100, 0), now, None),
            ("errors at the limit pass", fast(100, 5), now, None),
            (
                "errors past it fail",
                fast(100, 6),
                now,
                Some("6 of 100 requests failed (6.0 %)"),
            ),
            (
                "every request refused",
                fast(40, 40),
                now,
                Some("40 of 40 requests failed"),
            ),
            ("too few requests to judge", fast(19, 19), now, None),
            (
                "slow",
                slow.clone(),
                now,
                Some("p99 latency 492.0 ms over 100 requests"),
            ),
            ("a stale reading is not judged", fast(40, 40), now - STALE_MS - 1, None),
            (
                "a reading just fresh enough is",
                fast(40, 40),
                now - STALE_MS,
                Some("40 of 40"),
            ),
        ];
        for (name, c, at, want) in table {
            let got = gate_verdict(&gate, "digits:v3", &c, at, now);
            match (got, want) {
                (Some(g), Some(w)) => assert!(g.contains(w) && g.starts_with("model digits:v3: "), "{name}: {g}"),
                (g, w) => assert_eq!(g.as_deref(), w, "{name}"),
            }
        }
        // one threshold only
        let p99_only = ModelGate {
            max_error_rate: None,
            max_p99_ms: Some(50.0),
            min_requests: 1,
        };
        assert_eq!(gate_verdict(&p99_only, "m", &fast(10, 10), now, now), None);
        assert!(gate_verdict(&p99_only, "m", &slow, now, now).is_some());
    }
}
