//! Which hub endpoint an agent talks to, and how long it waits after a failure
//! (docs/protocol.md §6, "Several hubs").
//!
//! A hub tells its agents the public endpoints of every hub replica (`outpost hub --advertise`,
//! one URL or several; one load-balancer name is a list of one). The agent:
//!
//! 1. starts at a stable per-node choice, [`preferred`] (a hash of the node name modulo the
//!    number of endpoints), so a fleet spreads itself evenly over the replicas and a node comes
//!    back to the same replica after a restart;
//! 2. on a failure moves on to the next endpoint in the list. While the current round through
//!    the list still has endpoints it has not tried, it waits only a short hop ([`HOP`]: a
//!    dead replica is left within a second); once every endpoint has failed in a row, it waits
//!    [`crate::retry::HUB_LINK`]'s exponential delay with jitter for the number of whole rounds
//!    that failed, so an agent whose every hub is down never loops tightly;
//! 3. stays on the endpoint that answers (no fail-back: moving a healthy link costs a
//!    reconnect and buys nothing);
//! 4. when a hub sends a new list, keeps its current endpoint if the list still holds it, and
//!    otherwise starts again at [`preferred`] in the new list ([`after_new_list`]).
//!
//! With one endpoint the schedule is exactly [`crate::retry::HUB_LINK`]: the agent behaves as
//! it always did.

use outpost_api::UnixMs;

use crate::retry::{Policy, HUB_LINK};

/// The wait before trying the next endpoint of a round that still has untried ones: 250 ms,
/// plus up to 100 % jitter (so agents leaving a dead replica do not arrive at the next one in
/// the same instant).
pub const HOP: Policy = Policy {
    base_ms: 250,
    max_ms: 250,
    jitter_pct: 100,
    give_up_after_ms: None,
};

/// The endpoint a node starts at: FNV-1a of its name modulo `endpoints` (stable across
/// restarts, versions and platforms). 0 when there are no endpoints.
pub fn preferred(node: &str, endpoints: usize) -> usize {
    if endpoints == 0 {
        return 0;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % endpoints as u64) as usize
}

/// What to do after a failed exchange with a hub.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failover {
    /// Index of the endpoint to try next.
    pub endpoint: usize,
    /// How long to wait before trying it, ms.
    pub wait_ms: u64,
    /// When to try it (`now + wait_ms`).
    pub at: UnixMs,
}

/// After failure number `failures` in a row (1 for the first) on endpoint `current` of
/// `endpoints`, at `now`: which endpoint next and when. `draw` is a uniform random number in
/// `[0, 1]` (the jitter; fixed in tests).
pub fn after_failure(endpoints: usize, current: usize, failures: u32, now: UnixMs, draw: f64) -> Failover {
    let n = endpoints.max(1);
    let failures = failures.max(1);
    let endpoint = (current % n + 1) % n;
    let round_done = (failures as usize).is_multiple_of(n);
    let wait_ms = if round_done {
        let rounds = (failures as usize / n) as u32;
        HUB_LINK.delay_ms(rounds - 1, draw)
    } else {
        HOP.delay_ms(0, draw)
    };
    Failover {
        endpoint,
        wait_ms,
        at: now.saturating_add(wait_ms as i64),
    }
}

/// The endpoint to use once a hub sent `new` (replacing the list the agent held): the current
/// one if `new` still holds it, else the node's [`preferred`] one in `new`.
pub fn after_new_list(current: Option<&str>, new: &[String], node: &str) -> usize {
    current
        .and_then(|c| new.iter().position(|e| e == c))
        .unwrap_or_else(|| preferred(node, new.len()))
}

/// An endpoint list as a hub advertises it: each an `https://` URL without a trailing slash;
/// sorted and without duplicates, so every replica given the same URLs sends the same list.
/// Errors name the bad entry and say what is wanted.
pub fn normalize(urls: &[String]) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for u in urls.iter().flat_map(|u| u.split(',')).map(str::trim) {
        if u.is_empty() {
            continue;
        }
        let rest = u
            .strip_prefix("https://")
            .ok_or_else(|| format!("hub endpoint {u:?} must be an https:// URL like https://hub-a.example.com:8443"))?;
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() || rest.contains('/') || rest.contains(char::is_whitespace) {
            return Err(format!(
                "hub endpoint {u:?} must be a scheme, host and optional port, like https://hub-a.example.com:8443 (no path)"
            ));
        }
        out.push(format!("https://{rest}"));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: UnixMs = 1_700_000_000_000;

    /// (endpoints, current, failures, draw) -> (next endpoint, wait ms)
    fn check(cases: &[(usize, usize, u32, f64, usize, u64)]) {
        for &(n, cur, f, draw, want_ep, want_wait) in cases {
            let got = after_failure(n, cur, f, NOW, draw);
            assert_eq!(
                (got.endpoint, got.wait_ms, got.at),
                (want_ep, want_wait, NOW + want_wait as i64),
                "endpoints {n}, current {cur}, failures {f}, draw {draw}"
            );
        }
    }

    #[test]
    fn one_endpoint_is_the_plain_hub_link_schedule() {
        check(&[
            (1, 0, 1, 0.0, 0, 1_000),
            (1, 0, 2, 0.0, 0, 2_000),
            (1, 0, 3, 1.0, 0, 6_000),
            (1, 0, 6, 0.0, 0, 30_000),
            (1, 0, 100, 1.0, 0, 45_000),
        ]);
    }

    #[test]
    fn several_endpoints_hop_quickly_within_a_round_and_back_off_per_round() {
        check(&[
            // two replicas: the first failure hops to the other at once (250-500 ms)
            (2, 0, 1, 0.0, 1, 250),
            (2, 0, 1, 1.0, 1, 500),
            (2, 1, 1, 0.5, 0, 375),
            // both failed in a row: a whole round, HUB_LINK's first delay
            (2, 1, 2, 0.0, 0, 1_000),
            (2, 0, 3, 0.0, 1, 250),
            (2, 1, 4, 0.0, 0, 2_000),
            (2, 1, 12, 0.0, 0, 30_000),
            (2, 1, 12, 1.0, 0, 45_000),
            // three replicas: two hops, then the round's delay
            (3, 2, 1, 0.0, 0, 250),
            (3, 0, 2, 0.0, 1, 250),
            (3, 1, 3, 0.0, 2, 1_000),
            (3, 1, 6, 0.0, 2, 2_000),
            // out-of-range inputs: no endpoints acts as one, index wraps, failures 0 counts as 1
            (0, 0, 1, 0.0, 0, 1_000),
            (2, 5, 1, 0.0, 0, 250),
            (2, 0, 0, 0.0, 1, 250),
        ]);
    }

    #[test]
    fn every_round_waits_at_least_as_long_as_the_last() {
        for n in 1..5usize {
            let mut last_round = 0;
            for f in 1..200u32 {
                let d = after_failure(n, 0, f, NOW, 0.0);
                if (f as usize).is_multiple_of(n) {
                    assert!(d.wait_ms >= last_round, "n {n} f {f}");
                    last_round = d.wait_ms;
                } else {
                    assert_eq!(d.wait_ms, 250);
                }
            }
        }
    }

    #[test]
    fn preferred_is_stable_and_spreads() {
        assert_eq!(preferred("anything", 0), 0);
        assert_eq!(preferred("anything", 1), 0);
        // stable: fixed values (FNV-1a), so a change of hash would show here
        assert_eq!(preferred("store-1", 2), preferred("store-1", 2));
        let mut counts = [0usize; 3];
        for i in 0..300 {
            counts[preferred(&format!("store-{i}"), 3)] += 1;
        }
        for c in counts {
            assert!((70..=130).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn preferred_values_are_fixed() {
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c
        assert_eq!(preferred("a", 1000), (0xaf63_dc4c_8601_ec8cu64 % 1000) as usize);
    }

    #[test]
    fn a_new_list_keeps_the_current_endpoint_or_starts_at_the_preferred_one() {
        let list: Vec<String> = vec!["https://a:1".into(), "https://b:1".into()];
        assert_eq!(after_new_list(Some("https://b:1"), &list, "n"), 1);
        assert_eq!(after_new_list(Some("https://gone:1"), &list, "n"), preferred("n", 2));
        assert_eq!(after_new_list(None, &list, "n"), preferred("n", 2));
    }

    #[test]
    fn endpoint_lists_are_normalized_and_checked() {
        let ok = |v: &[&str]| normalize(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            ok(&["https://b:8443/,https://a:8443", "https://a:8443"]).unwrap(),
            vec!["https://a:8443", "https://b:8443"]
        );
        assert_eq!(ok(&[]).unwrap(), Vec::<String>::new());
        assert!(ok(&["http://a:80"]).unwrap_err().contains("https://"));
        assert!(ok(&["https://a:1/x"]).unwrap_err().contains("no path"));
        assert!(ok(&["https://"]).unwrap_err().contains("\"https://\""));
    }
}
