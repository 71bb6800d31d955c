//! The update gate and automatic rollback on a node, per workload, as a pure function.
//!
//! The hub asks a node to run a *target* spec (revision + content hash). The node keeps, durably,
//! its *last-known-good* spec (LKG) and the set of specs that failed on it (*bad*). [`step`] is
//! called whenever anything changes and decides which spec runs:
//!
//! ```text
//!                    target == LKG
//!   ┌──────────────────────────────────────────────► Complete (run target)
//!   │
//!   │ new target            Ready for minReadySeconds
//!   ├──────────► Progressing ─────────────────────────► Complete: target becomes the LKG
//!   │            (run target)│
//!   │                        │ crash loop, a failed probe that restarts it, a permanent
//!   │                        │ failure, or not Ready within progressDeadlineSeconds
//!   │                        ▼
//!   │                  mark target bad ──► LKG exists? ── yes ──► RolledBack (run LKG)
//!   │                                                  └─ no ───► Failed (keep running target,
//!   │                                                             with backoff: nothing better)
//!   │                                       Failed, then Ready for minReadySeconds with no
//!   │                                       crash: unmark, target becomes the LKG ─► Complete
//!   │ target already bad here
//!   └──────────────────────────────────────────────► RolledBack / Failed, without retrying it
//! ```
//!
//! A target is identified by `revision:hash`, so a newer revision is always tried, even with the
//! same content as one that failed: a failed revision never blocks the next one.
//!
//! Crash invariants: the agent persists the state returned with `persist: true` *before* it acts
//! on the decision. After a `kill -9` mid-update the agent reloads the state: a Progressing
//! target keeps its original start time, so the deadline still holds and the gate either
//! finishes or rolls back; readiness is re-observed (`ready_since` is not trusted across a
//! restart). A bad mark is written before the switch to the LKG, so a restarted agent never goes
//! back to a bad revision, and the LKG is written before anything depends on it, so a good
//! revision always exists to return to once one has passed.

use std::collections::BTreeSet;

use outpost_api::{RolloutState, RolloutStatus, UnixMs, WorkloadSpec};
use serde::{Deserialize, Serialize};

/// What the node remembers about one workload's updates (persisted as JSON).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeRollout {
    /// Last-known-good spec.
    pub good: Option<WorkloadSpec>,
    /// `revision:hash` of every spec that failed its gate here.
    pub bad: BTreeSet<String>,
    pub progress: Option<Progress>,
    /// Why the last target failed.
    pub reason: Option<String>,
    /// When the state last changed.
    pub since: UnixMs,
    /// `revision:hash` of a failed target that runs for lack of a good one, and since when it
    /// has been Ready (memory only: re-observed after a restart).
    #[serde(skip)]
    pub late_ready_since: Option<(String, UnixMs)>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub target: String,
    pub started_at: UnixMs,
    /// Not persisted meaningfully: reset when the agent restarts.
    pub ready_since: Option<UnixMs>,
}

/// Health of the target's processes, as the agent observes it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Health {
    /// Every container running and ready.
    pub ready: bool,
    /// Set when the target has shown it is broken: crash loop, exits under restartPolicy Never,
    /// a start failure. The text says why (exit code, probe message, last log lines).
    pub failing: Option<String>,
    /// The latest probe failure, quoted when the deadline passes.
    pub last_probe_failure: Option<String>,
}

/// Which spec runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Run {
    Target,
    Good,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub run: Run,
    /// Call `step` again by then even if nothing else happens.
    pub wake: Option<UnixMs>,
    /// The state changed in a way that must be persisted before acting.
    pub persist: bool,
    /// A notable transition: (reason, message), for the event outbox.
    pub event: Option<(String, String)>,
}

pub fn spec_id(s: &WorkloadSpec) -> String {
    format!("{}:{}", s.revision, s.hash)
}

/// Decide which spec runs for `target` (see the module doc).
pub fn step(st: &mut NodeRollout, target: &WorkloadSpec, health: &Health, now: UnixMs) -> Step {
    let id = spec_id(target);
    let good_runs = |st: &NodeRollout| if st.good.is_some() { Run::Good } else { Run::Target };
    if st.good.as_ref().is_some_and(|g| g.hash == target.hash) {
        // Already good here (also after `rollout undo` to the LKG's content).
        let persist = st.progress.take().is_some() || st.good.as_ref().is_some_and(|g| g.revision != target.revision);
        if persist {
            st.good = Some(target.clone());
            st.since = now;
        }
        return Step {
            run: Run::Target,
            wake: None,
            persist,
            event: None,
        };
    }
    if st.bad.contains(&id) {
        if st.good.is_none() {
            return failed_but_running(st, target, health, now);
        }
        return Step {
            run: good_runs(st),
            wake: None,
            persist: false,
            event: None,
        };
    }
    let mut persist = false;
    let mut event = None;
    if st.progress.as_ref().is_none_or(|p| p.target != id) {
        st.progress = Some(Progress {
            target: id.clone(),
            started_at: now,
            ready_since: None,
        });
        st.reason = None;
        st.since = now;
        persist = true;
        event = Some((
            "Progressing".to_string(),
            format!(
                "revision {} started; gate: Ready for {} s within {} s",
                target.revision, target.min_ready_seconds, target.progress_deadline_seconds
            ),
        ));
    }
    let p = st.progress.as_mut().expect("set above");
    let deadline = p.started_at + (target.progress_deadline_seconds * 1000) as i64;
    let failure = if let Some(why) = &health.failing {
        Some(why.clone())
    } else if now >= deadline {
        Some(format!(
            "not Ready within progressDeadlineSeconds ({} s){}",
            target.progress_deadline_seconds,
            health
                .last_probe_failure
                .as_ref()
                .map(|f| format!(": {f}"))
                .unwrap_or_default()
        ))
    } else {
        None
    };
    if let Some(reason) = failure {
        st.bad.insert(id);
        st.progress = None;
        st.reason = Some(reason.clone());
        st.since = now;
        let run = good_runs(st);
        let msg = match (&st.good, run) {
            (Some(g), Run::Good) => format!(
                "revision {} failed: {reason}; rolled back to revision {}",
                target.revision, g.revision
            ),
            _ => format!(
                "revision {} failed: {reason}; no earlier good revision on this node to roll back to",
                target.revision
            ),
        };
        return Step {
            run,
            wake: None,
            persist: true,
            event: Some(("RolledBack".into(), msg)),
        };
    }
    let min_ready = (target.min_ready_seconds * 1000) as i64;
    if health.ready {
        let since = *p.ready_since.get_or_insert(now);
        if now - since >= min_ready {
            st.good = Some(target.clone());
            st.progress = None;
            st.reason = None;
            st.since = now;
            return Step {
                run: Run::Target,
                wake: None,
                persist: true,
                event: Some((
                    "RolloutComplete".into(),
                    format!(
                        "revision {} passed its health gate and is now the last-known-good",
                        target.revision
                    ),
                )),
            };
        }
        Step {
            run: Run::Target,
            wake: Some((since + min_ready).min(deadline)),
            persist,
            event,
        }
    } else {
        p.ready_since = None;
        Step {
            run: Run::Target,
            wake: Some(deadline),
            persist,
            event,
        }
    }
}

/// A target that failed its gate with no last-known-good to return to keeps running (there is
/// nothing better). If it then shows it is healthy after all (Ready for `minReadySeconds`
/// without a crash: it was only slow, e.g. a long image download or a short
/// `progressDeadlineSeconds`), it becomes the last-known-good, so a later bad revision has
/// something to roll back to. Readiness is observed in memory (`late_ready_since`) and the
/// promotion is persisted before the agent acts on it.
fn failed_but_running(st: &mut NodeRollout, target: &WorkloadSpec, health: &Health, now: UnixMs) -> Step {
    let id = spec_id(target);
    let idle = Step {
        run: Run::Target,
        wake: None,
        persist: false,
        event: None,
    };
    if !health.ready || health.failing.is_some() {
        st.late_ready_since = None;
        return idle;
    }
    let since = match st.late_ready_since {
        Some((ref t, at)) if *t == id => at,
        _ => {
            st.late_ready_since = Some((id.clone(), now));
            now
        }
    };
    let min_ready = (target.min_ready_seconds * 1000) as i64;
    if now - since < min_ready {
        return Step {
            wake: Some(since + min_ready),
            ..idle
        };
    }
    st.bad.remove(&id);
    st.good = Some(target.clone());
    st.reason = None;
    st.late_ready_since = None;
    st.since = now;
    Step {
        run: Run::Target,
        wake: None,
        persist: true,
        event: Some((
            "RolloutComplete".into(),
            format!(
                "revision {} missed its progress deadline but has been Ready for {} s with no earlier good revision \
                 on this node: it is now the last-known-good",
                target.revision, target.min_ready_seconds
            ),
        )),
    }
}

/// The status a node reports for a workload.
pub fn status(st: &NodeRollout, target: &WorkloadSpec) -> RolloutStatus {
    let id = spec_id(target);
    let state = if st.good.as_ref().is_some_and(|g| g.hash == target.hash) {
        RolloutState::Complete
    } else if st.bad.contains(&id) {
        if st.good.is_some() {
            RolloutState::RolledBack
        } else {
            RolloutState::Failed
        }
    } else {
        RolloutState::Progressing
    };
    RolloutStatus {
        state,
        target_revision: target.revision,
        target_hash: target.hash.clone(),
        good_revision: st.good.as_ref().map(|g| g.revision),
        reason: st.reason.clone().filter(|_| state != RolloutState::Complete),
        since: st.since,
    }
}

/// After a restart of the agent: readiness must be observed again.
pub fn after_restart(st: &mut NodeRollout) {
    if let Some(p) = st.progress.as_mut() {
        p.ready_since = None;
    }
    st.late_ready_since = None;
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_api::{Kind, RestartPolicy, Runtime};

    fn spec(rev: u64, hash: &str) -> WorkloadSpec {
        WorkloadSpec {
            key: "deployment/default/w".into(),
            kind: Kind::Deployment,
            namespace: "default".into(),
            name: "w".into(),
            revision: rev,
            hash: hash.into(),
            runtime: Runtime::Process,
            restart_policy: RestartPolicy::Always,
            grace_seconds: 1,
            containers: vec![],
            volumes: vec![],
            min_ready_seconds: 10,
            progress_deadline_seconds: 60,
            host_network: false,
            host_pid: false,
            job: None,
            agent_update: None,
            pipeline: None,
            failover: None,
        }
    }
    const READY: Health = Health {
        ready: true,
        failing: None,
        last_probe_failure: None,
    };
    const NOT_READY: Health = Health {
        ready: false,
        failing: None,
        last_probe_failure: None,
    };
    fn crashing() -> Health {
        Health {
            ready: false,
            failing: Some("container c exited with code 3 (3 restarts)".into()),
            last_probe_failure: None,
        }
    }

    /// Feed a sequence of (target, health, now) and check (run, state) after each.
    fn check(st: &mut NodeRollout, steps: &[(&WorkloadSpec, &Health, UnixMs, Run, RolloutState)]) {
        for (i, (t, h, now, run, state)) in steps.iter().enumerate() {
            let s = step(st, t, h, *now);
            assert_eq!(
                (s.run, status(st, t).state),
                (*run, *state),
                "step {i} at {now}: {st:?}"
            );
        }
    }

    #[test]
    fn first_revision_passes_the_gate_and_becomes_good() {
        let v1 = spec(1, "a");
        let mut st = NodeRollout::default();
        use RolloutState::*;
        check(
            &mut st,
            &[
                (&v1, &NOT_READY, 0, Run::Target, Progressing),
                (&v1, &READY, 1_000, Run::Target, Progressing),
                (&v1, &NOT_READY, 5_000, Run::Target, Progressing), // readiness lost: the clock restarts
                (&v1, &READY, 6_000, Run::Target, Progressing),
                (&v1, &READY, 15_999, Run::Target, Progressing),
                (&v1, &READY, 16_000, Run::Target, Complete),
            ],
        );
        assert_eq!(st.good.as_ref().unwrap().revision, 1);
    }

    #[test]
    fn crash_loop_rolls_back_to_good_and_is_not_retried() {
        let (v1, v2) = (spec(1, "a"), spec(2, "b"));
        let mut st = NodeRollout {
            good: Some(v1.clone()),
            ..Default::default()
        };
        use RolloutState::*;
        let s = step(&mut st, &v2, &NOT_READY, 0);
        assert!(s.persist && s.event.as_ref().unwrap().0 == "Progressing");
        let s = step(&mut st, &v2, &crashing(), 7_000);
        assert_eq!(s.run, Run::Good);
        assert!(s.persist, "the bad mark is persisted before the switch");
        assert!(s.event.unwrap().1.contains("rolled back to revision 1"));
        assert_eq!(
            status(&st, &v2).reason.as_deref(),
            Some("container c exited with code 3 (3 restarts)")
        );
        // the same target again, even once healthy-looking: stays rolled back
        check(
            &mut st,
            &[
                (&v2, &READY, 8_000, Run::Good, RolledBack),
                (&v2, &NOT_READY, 90_000, Run::Good, RolledBack),
            ],
        );
        // a newer revision is tried, even with the same content
        let v3 = spec(3, "b");
        check(&mut st, &[(&v3, &NOT_READY, 100_000, Run::Target, Progressing)]);
    }

    #[test]
    fn deadline_rolls_back_with_the_probe_message() {
        let (v1, v2) = (spec(1, "a"), spec(2, "b"));
        let mut st = NodeRollout {
            good: Some(v1),
            ..Default::default()
        };
        let h = Health {
            ready: false,
            failing: None,
            last_probe_failure: Some("readiness probe failed: HTTP 503".into()),
        };
        assert_eq!(step(&mut st, &v2, &h, 0).wake, Some(60_000));
        assert_eq!(step(&mut st, &v2, &h, 59_999).run, Run::Target);
        assert_eq!(step(&mut st, &v2, &h, 60_000).run, Run::Good);
        let r = status(&st, &v2).reason.unwrap();
        assert!(
            r.contains("progressDeadlineSeconds (60 s): readiness probe failed: HTTP 503"),
            "{r}"
        );
    }

    #[test]
    fn failure_without_a_good_revision_keeps_running_the_target() {
        let v1 = spec(1, "a");
        let mut st = NodeRollout::default();
        check(&mut st, &[(&v1, &crashing(), 0, Run::Target, RolloutState::Failed)]);
    }

    #[test]
    fn a_healthy_first_revision_that_missed_its_deadline_becomes_good() {
        // progressDeadlineSeconds 10 with a minReadySeconds of 10: Ready at 1 s, the deadline
        // passes first, so the first revision is Failed. It keeps running (nothing better) and,
        // once Ready for minReadySeconds, becomes the last-known-good: a crashing revision 2
        // then rolls back to it.
        let mut v1 = spec(1, "a");
        v1.min_ready_seconds = 10;
        v1.progress_deadline_seconds = 10;
        let mut st = NodeRollout::default();
        use RolloutState::*;
        check(
            &mut st,
            &[
                (&v1, &NOT_READY, 0, Run::Target, Progressing),
                (&v1, &READY, 1_000, Run::Target, Progressing),
                (&v1, &READY, 10_000, Run::Target, Failed),
                (&v1, &READY, 12_000, Run::Target, Failed),
                (&v1, &NOT_READY, 15_000, Run::Target, Failed), // readiness lost: counts again
                (&v1, &READY, 16_000, Run::Target, Failed),
                (&v1, &READY, 25_999, Run::Target, Failed),
            ],
        );
        let s = step(&mut st, &v1, &READY, 26_000);
        assert_eq!((s.run, s.persist), (Run::Target, true), "the promotion is persisted");
        assert_eq!(status(&st, &v1).state, Complete);
        assert_eq!(st.good.as_ref().map(|g| g.revision), Some(1));
        assert!(st.bad.is_empty());
        let v2 = spec(2, "b");
        check(
            &mut st,
            &[
                (&v2, &NOT_READY, 30_000, Run::Target, Progressing),
                (&v2, &crashing(), 31_000, Run::Good, RolledBack),
            ],
        );
        // a crash-looping first revision is never promoted
        let mut st = NodeRollout::default();
        check(
            &mut st,
            &[
                (&v1, &crashing(), 0, Run::Target, Failed),
                (&v1, &crashing(), 60_000, Run::Target, Failed),
            ],
        );
        assert!(st.good.is_none());
    }

    #[test]
    fn kill9_mid_update_resumes_with_the_original_deadline() {
        let (v1, v2) = (spec(1, "a"), spec(2, "b"));
        let mut st = NodeRollout {
            good: Some(v1),
            ..Default::default()
        };
        step(&mut st, &v2, &READY, 0);
        // persisted, agent killed and restarted 70 s later (past the 60 s deadline)
        let mut reloaded: NodeRollout = serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
        after_restart(&mut reloaded);
        assert_eq!(step(&mut reloaded, &v2, &NOT_READY, 70_000).run, Run::Good);
        // restarted within the deadline: the gate starts observing readiness again
        let mut st2 = NodeRollout {
            good: Some(spec(1, "a")),
            ..Default::default()
        };
        step(&mut st2, &v2, &READY, 0);
        step(&mut st2, &v2, &READY, 9_000);
        after_restart(&mut st2);
        assert_eq!(status(&st2, &v2).state, RolloutState::Progressing);
        let s = step(&mut st2, &v2, &READY, 20_000);
        assert_eq!(
            (s.run, s.wake),
            (Run::Target, Some(30_000)),
            "min ready counts from re-observation"
        );
        assert_eq!(step(&mut st2, &v2, &READY, 30_000).event.unwrap().0, "RolloutComplete");
    }

    #[test]
    fn undo_to_the_good_content_is_complete_at_once() {
        let (v1, v2) = (spec(1, "a"), spec(2, "b"));
        let mut st = NodeRollout {
            good: Some(v1),
            ..Default::default()
        };
        step(&mut st, &v2, &crashing(), 0);
        let undo = spec(3, "a");
        let s = step(&mut st, &undo, &NOT_READY, 1_000);
        assert_eq!((s.run, s.persist), (Run::Target, true));
        assert_eq!(status(&st, &undo).state, RolloutState::Complete);
        assert_eq!(st.good.as_ref().unwrap().revision, 3);
    }
}
