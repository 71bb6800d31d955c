//! Agent self-update on a node: a pure decision over what the node wants (the AgentUpdate in
//! its desired state), what it runs (its own binary's digest), what an update in progress
//! left on disk, and `now`.
//!
//! ```text
//!  desired digest D != own digest, D not marked failed
//!        │ download D (resumable, digest-checked), keep the old binary as `previous`,
//!        │ write `pending` {from, to: D, deadline}, start the watchdog (old binary),
//!        ▼ rename D over the executable, exec it (same pid: workloads stay children)
//!  new agent (D) starts ── reports to the hub ──► marks `healthy-D` ──► watchdog clears pending
//!        │ no mark by the deadline (D exits at once, hangs, cannot reach the hub)
//!        ▼
//!  watchdog (old binary): rename `previous` back, mark D failed, kill the new agent, start the
//!  old one (or let systemd restart it); the node never tries D again, later digests are tried.
//! ```
//!
//! Crash invariants: the executable path always holds a complete binary (rename is atomic);
//! `pending` is written before the swap, so a crash after the swap is resolved by the watchdog
//! or, if the watchdog died too, by the next agent start ([`on_start`]).

use outpost_api::{AgentUpdateRun, RolloutState, UnixMs};

/// An update in progress, as `update/pending.json` records it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pending {
    pub from: String,
    pub to: String,
    pub deadline: UnixMs,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpdateAction {
    Nothing,
    /// Download and switch to this binary.
    Update {
        digest: String,
        deadline_ms: u64,
    },
}

/// What the running agent should do about the desired AgentUpdate.
pub fn decide(own: &str, want: Option<&AgentUpdateRun>, failed: &[String], pending: Option<&Pending>) -> UpdateAction {
    let Some(w) = want else { return UpdateAction::Nothing };
    if w.digest == own || failed.contains(&w.digest) || pending.is_some() {
        return UpdateAction::Nothing;
    }
    UpdateAction::Update {
        digest: w.digest.clone(),
        deadline_ms: w.health_deadline_seconds * 1000,
    }
}

/// The node's update gate for a desired AgentUpdate, as the fleet rollout reads it: `Complete`
/// once this agent runs the wanted binary (the report carrying it is the new agent's first, which
/// also ends its trial), `RolledBack` once the watchdog marked it failed and restored the
/// previous binary, `Progressing` while it is fetched and swapped.
pub fn gate(own: &str, want: &AgentUpdateRun, failed: &[String]) -> RolloutState {
    if own == want.digest {
        RolloutState::Complete
    } else if failed.contains(&want.digest) {
        RolloutState::RolledBack
    } else {
        RolloutState::Progressing
    }
}

/// What an agent does at start about an update in progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartAction {
    /// No update in progress.
    Nothing,
    /// This is the new binary on trial: mark it healthy once it has reported to the hub.
    Trial,
    /// The trial's deadline passed with no mark and no watchdog acted: restore `from`.
    Restore,
    /// The previous binary runs again (restored): the update failed; clear it.
    Failed,
}

pub fn on_start(own: &str, pending: Option<&Pending>, healthy: bool, now: UnixMs) -> StartAction {
    match pending {
        None => StartAction::Nothing,
        Some(p) if own == p.to && healthy => StartAction::Nothing,
        Some(p) if own == p.to && now > p.deadline => StartAction::Restore,
        Some(p) if own == p.to => StartAction::Trial,
        Some(_) => StartAction::Failed,
    }
}

/// The watchdog's check: restore unless the new binary marked itself healthy in time.
pub fn watchdog(healthy: bool, agent_alive: bool, now: UnixMs, deadline: UnixMs) -> Option<bool> {
    if healthy {
        Some(false) // done, keep the new binary
    } else if !agent_alive || now >= deadline {
        Some(true) // restore
    } else {
        None // keep waiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(d: &str) -> AgentUpdateRun {
        AgentUpdateRun {
            digest: d.into(),
            version: None,
            health_deadline_seconds: 60,
        }
    }

    #[test]
    fn gate_of_a_desired_update() {
        let failed = vec!["sha256:bad".to_string()];
        for (own, want_digest, state) in [
            ("sha256:new", "sha256:new", RolloutState::Complete),
            ("sha256:old", "sha256:bad", RolloutState::RolledBack),
            ("sha256:old", "sha256:new", RolloutState::Progressing),
            // a binary that failed here once and is wanted again while the node runs it
            ("sha256:bad", "sha256:bad", RolloutState::Complete),
        ] {
            assert_eq!(
                gate(own, &want(want_digest), &failed),
                state,
                "own {own}, want {want_digest}"
            );
        }
    }

    #[test]
    fn decide_table() {
        let p = Pending {
            from: "a".into(),
            to: "b".into(),
            deadline: 10,
        };
        type Case = (
            &'static str,
            Option<AgentUpdateRun>,
            Vec<String>,
            Option<Pending>,
            UpdateAction,
        );
        let cases: Vec<Case> = vec![
            ("a", None, vec![], None, UpdateAction::Nothing),
            ("a", Some(want("a")), vec![], None, UpdateAction::Nothing),
            (
                "a",
                Some(want("b")),
                vec![],
                None,
                UpdateAction::Update {
                    digest: "b".into(),
                    deadline_ms: 60_000,
                },
            ),
            ("a", Some(want("b")), vec!["b".into()], None, UpdateAction::Nothing),
            (
                "a",
                Some(want("c")),
                vec!["b".into()],
                None,
                UpdateAction::Update {
                    digest: "c".into(),
                    deadline_ms: 60_000,
                },
            ),
            ("a", Some(want("c")), vec![], Some(p), UpdateAction::Nothing),
        ];
        for (i, (own, w, failed, pending, expect)) in cases.into_iter().enumerate() {
            assert_eq!(decide(own, w.as_ref(), &failed, pending.as_ref()), expect, "case {i}");
        }
    }

    #[test]
    fn start_and_watchdog_table() {
        let p = Pending {
            from: "a".into(),
            to: "b".into(),
            deadline: 100,
        };
        assert_eq!(on_start("a", None, false, 0), StartAction::Nothing);
        assert_eq!(on_start("b", Some(&p), false, 50), StartAction::Trial);
        assert_eq!(on_start("b", Some(&p), true, 50), StartAction::Nothing);
        assert_eq!(on_start("b", Some(&p), false, 101), StartAction::Restore);
        assert_eq!(on_start("a", Some(&p), false, 50), StartAction::Failed);
        assert_eq!(watchdog(true, true, 0, 100), Some(false));
        assert_eq!(watchdog(false, true, 50, 100), None);
        assert_eq!(watchdog(false, false, 50, 100), Some(true));
        assert_eq!(watchdog(false, true, 100, 100), Some(true));
    }
}
