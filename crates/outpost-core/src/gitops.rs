//! GitOps decisions (issue 12), pure: which rendered variant a node gets, when a repository is
//! fetched next, and whether a fetched commit is applied.
//!
//! ```text
//!   idle --(poll interval | webhook)--> fetch --ok--> render every target --all ok--> apply commit
//!     ^                                   |                    |                         |
//!     |                                 error              any error                     |
//!     |                                   v                    v                         |
//!     +------------- backoff (capped, jitter) <---- reject the whole commit, alert       |
//!     +----------------------------------------------------------------------------------+
//! ```
//!
//! Invariants: a commit is applied only when every target renders (a commit that fails for one
//! site changes no site); the running commit stays until a later commit renders everywhere; a
//! repository in error is never fetched more often than its poll interval, and less and less
//! often as failures repeat (doubling to [`FETCH_RETRY`]'s cap of 10 min, with jitter), so a
//! broken remote is not hammered; a webhook fetches at
//! once, even during a backoff, because a push is what usually repairs a repository.

use std::collections::BTreeSet;

use outpost_api::{Labels, UnixMs};

use crate::retry::Policy;
use crate::schedule::selector_matches;

/// After fetch failures: 5 s doubling to 10 min, + up to 20 %.
pub const FETCH_RETRY: Policy = Policy {
    base_ms: 5_000,
    max_ms: 600_000,
    jitter_pct: 20,
    give_up_after_ms: None,
};

/// An explicit target: nodes matching `node_selector` get the render of `path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub path: String,
    pub node_selector: Labels,
}

/// How a repository's directories map to nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Targets {
    /// First match wins; a node no target matches gets nothing from this repository.
    Explicit(Vec<Target>),
    /// `overlays/<value of label>/` for nodes carrying `label`, when that overlay exists;
    /// `base/` for every other node.
    OverlaysBy { label: String },
}

/// The directory (relative to the repository's path) a node's variant renders from, and the
/// target's name; `None` when no target applies. `overlays` lists the overlay directory names
/// present in the commit.
pub fn target_for(targets: &Targets, node_labels: &Labels, overlays: &BTreeSet<String>) -> Option<(String, String)> {
    match targets {
        Targets::Explicit(list) => list
            .iter()
            .find(|t| selector_matches(&t.node_selector, node_labels))
            .map(|t| (t.name.clone(), t.path.clone())),
        Targets::OverlaysBy { label } => match node_labels.get(label) {
            Some(v) if overlays.contains(v) => Some((v.clone(), format!("overlays/{v}"))),
            _ => Some(("base".into(), "base".into())),
        },
    }
}

/// What the fetcher remembers between runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FetchState {
    /// When the last fetch finished (successfully or not).
    pub last_fetch: Option<UnixMs>,
    /// Failed fetches since the last good one.
    pub failures: u32,
    /// A webhook asked for a fetch that has not happened yet.
    pub webhook_pending: bool,
}

/// When the next fetch is due (`<= now`: fetch now). `draw` in `[0, 1]` is the jitter draw.
pub fn next_fetch(state: &FetchState, poll_every_ms: u64, now: UnixMs, draw: f64) -> UnixMs {
    let Some(last) = state.last_fetch else { return now };
    if state.webhook_pending {
        return now;
    }
    let wait = if state.failures == 0 {
        poll_every_ms
    } else {
        FETCH_RETRY.delay_ms(state.failures - 1, draw).max(poll_every_ms)
    };
    last.saturating_add(i64::try_from(wait).unwrap_or(i64::MAX))
}

/// The render of one target for a fetched commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetRender {
    pub target: String,
    /// `Err(reason)` naming file and field.
    pub result: Result<(), String>,
}

/// What to do with a fetched commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommitDecision {
    /// The commit already runs (or was already rejected): nothing to do.
    Nothing,
    /// Every target rendered: apply the commit as one command (one rollout).
    Apply,
    /// Some target failed: nothing of the commit is applied, the running commit stays, an
    /// alert fires with these (target, reason) pairs.
    Reject(Vec<(String, String)>),
}

/// Decides on `fetched` given the commit that runs and the last one rejected.
pub fn decide_commit(
    running: Option<&str>,
    rejected: Option<&str>,
    fetched: &str,
    renders: &[TargetRender],
) -> CommitDecision {
    if running == Some(fetched) || rejected == Some(fetched) {
        return CommitDecision::Nothing;
    }
    let failures: Vec<(String, String)> = renders
        .iter()
        .filter_map(|r| r.result.as_ref().err().map(|e| (r.target.clone(), e.clone())))
        .collect();
    if failures.is_empty() {
        CommitDecision::Apply
    } else {
        CommitDecision::Reject(failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn targets_table() {
        let overlays: BTreeSet<String> = ["factory-berlin", "factory-shanghai"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let by = Targets::OverlaysBy { label: "site".into() };
        let explicit = Targets::Explicit(vec![
            Target {
                name: "gpu".into(),
                path: "gpu".into(),
                node_selector: labels(&[("gpu", "true")]),
            },
            Target {
                name: "berlin".into(),
                path: "overlays/berlin".into(),
                node_selector: labels(&[("site", "berlin")]),
            },
            Target {
                name: "rest".into(),
                path: "base".into(),
                node_selector: labels(&[]),
            },
        ]);
        let only_gpu = Targets::Explicit(vec![Target {
            name: "gpu".into(),
            path: "gpu".into(),
            node_selector: labels(&[("gpu", "true")]),
        }]);
        type Case<'a> = (&'a Targets, Labels, Option<(&'a str, &'a str)>);
        let cases: Vec<Case> = vec![
            (
                &by,
                labels(&[("site", "factory-berlin")]),
                Some(("factory-berlin", "overlays/factory-berlin")),
            ),
            (&by, labels(&[("site", "factory-paris")]), Some(("base", "base"))),
            (&by, labels(&[]), Some(("base", "base"))),
            (
                &explicit,
                labels(&[("site", "berlin"), ("gpu", "true")]),
                Some(("gpu", "gpu")),
            ),
            (
                &explicit,
                labels(&[("site", "berlin")]),
                Some(("berlin", "overlays/berlin")),
            ),
            (&explicit, labels(&[("site", "paris")]), Some(("rest", "base"))),
            (&only_gpu, labels(&[("site", "paris")]), None),
        ];
        for (t, l, want) in cases {
            let got = target_for(t, &l, &overlays);
            assert_eq!(got.as_ref().map(|(a, b)| (a.as_str(), b.as_str())), want, "{l:?}");
        }
    }

    #[test]
    fn fetch_schedule_table() {
        let poll = 60_000;
        let st = |last: Option<i64>, failures: u32, webhook: bool| FetchState {
            last_fetch: last,
            failures,
            webhook_pending: webhook,
        };
        for (state, draw, want) in [
            (st(None, 0, false), 0.0, 1_000_000),             // never fetched: now
            (st(Some(1_000_000), 0, false), 0.0, 1_060_000),  // healthy: the poll interval
            (st(Some(1_000_000), 0, true), 0.0, 1_000_000),   // webhook: now
            (st(Some(1_000_000), 3, true), 0.0, 1_000_000),   // webhook during a backoff: now
            (st(Some(1_000_000), 1, false), 0.0, 1_060_000),  // backoff never below the interval
            (st(Some(1_000_000), 5, false), 0.0, 1_080_000),  // 5 s * 2^4
            (st(Some(1_000_000), 5, false), 1.0, 1_096_000),  // + 20 % jitter
            (st(Some(1_000_000), 30, false), 0.0, 1_600_000), // capped at 10 min
            (st(Some(1_000_000), 30, false), 1.0, 1_720_000), // cap + jitter
        ] {
            assert_eq!(next_fetch(&state, poll, 1_000_000, draw), want, "{state:?} draw {draw}");
        }
    }

    #[test]
    fn commit_decisions() {
        let ok = |t: &str| TargetRender {
            target: t.into(),
            result: Ok(()),
        };
        let bad = |t: &str, e: &str| TargetRender {
            target: t.into(),
            result: Err(e.into()),
        };
        assert_eq!(
            decide_commit(Some("a"), None, "a", &[ok("base")]),
            CommitDecision::Nothing
        );
        assert_eq!(
            decide_commit(Some("a"), Some("b"), "b", &[bad("x", "y")]),
            CommitDecision::Nothing
        );
        assert_eq!(
            decide_commit(Some("a"), None, "b", &[ok("base"), ok("berlin")]),
            CommitDecision::Apply
        );
        assert_eq!(decide_commit(None, None, "b", &[ok("base")]), CommitDecision::Apply);
        assert_eq!(
            decide_commit(
                Some("a"),
                None,
                "c",
                &[
                    ok("base"),
                    bad("berlin", "overlays/berlin/kustomization.yaml: field `helmCharts` ...")
                ]
            ),
            CommitDecision::Reject(vec![(
                "berlin".into(),
                "overlays/berlin/kustomization.yaml: field `helmCharts` ...".into()
            )])
        );
        // A later good commit after a rejected one goes through.
        assert_eq!(
            decide_commit(Some("a"), Some("c"), "d", &[ok("base"), ok("berlin")]),
            CommitDecision::Apply
        );
    }
}
