//! The agent's supervision decisions, as pure functions of (desired units, unit states, now).
//!
//! A *unit* is one container of one workload on this node (`<workload key>/<container>`). The
//! agent keeps a [`Unit`] per unit it runs; [`decide`] says what to do next; the agent executes
//! the [`Action`]s and feeds process exits back through [`on_exit`].
//!
//! ```text
//!              Start                exit, policy restarts         now >= next_start_at
//!   (absent) -------> Running(pid) -------------------------> Backoff ------------------> Running
//!                       |   |                                    (CrashLoopBackOff once
//!                       |   | exit, policy says done              consecutive >= 3)
//!                       |   +------------------------> Succeeded / Failed
//!                       | spec changed or removed: Terminate (SIGTERM to the group)
//!                       v
//!                   Stopping --grace elapsed--> Kill (SIGKILL) --exit--> (absent or Start new)
//! ```
//!
//! Backoff doubles from [`BACKOFF_BASE_MS`] up to [`BACKOFF_MAX_MS`]; a process that ran for
//! [`BACKOFF_RESET_MS`] resets the count. Stopping a unit on purpose never counts as a restart.

use std::collections::BTreeMap;

use outpost_api::{Phase, RestartPolicy, UnixMs};

pub const BACKOFF_BASE_MS: i64 = 1_000;
pub const BACKOFF_MAX_MS: i64 = 300_000;
pub const BACKOFF_RESET_MS: i64 = 120_000;
/// Consecutive failed runs after which a unit is reported as CrashLoopBackOff.
pub const CRASH_LOOP_AFTER: u32 = 3;

/// What the node should run for one unit.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredUnit {
    pub hash: String,
    pub restart_policy: RestartPolicy,
    pub grace_ms: i64,
    /// False when the unit needs a runtime this agent lacks (reported, never started).
    pub runnable: bool,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Unit {
    pub hash: String,
    /// Grace period of the spec this unit runs: a stop waits this long before SIGKILL.
    pub grace_ms: i64,
    pub pid: Option<u32>,
    pub started_at: Option<UnixMs>,
    pub restarts: u32,
    pub consecutive_failures: u32,
    pub last_exit_code: Option<i32>,
    pub reason: Option<String>,
    pub next_start_at: Option<UnixMs>,
    pub done: Option<Phase>,
    /// Set once SIGTERM was sent: (SIGKILL deadline, SIGKILL sent).
    pub stopping: Option<(UnixMs, bool)>,
    /// A start is under way (a container runtime creating it, an image downloading): do not
    /// start again, and do not forget the unit, until the runtime reports back.
    pub starting: bool,
    /// Set when the agent stops the process because it is unhealthy (a failed liveness or
    /// startup probe): its exit then counts as a failure with this reason, not as a stop.
    pub kill_reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start the desired spec of this unit (fresh counters when its hash changed).
    Start { unit: String },
    /// SIGTERM the unit's process group; SIGKILL at `kill_at`.
    Terminate { unit: String, pid: u32, kill_at: UnixMs },
    /// SIGKILL the unit's process group.
    Kill { unit: String, pid: u32 },
    /// Drop the unit's state: it is neither desired nor running.
    Forget { unit: String },
}

/// Next actions, and the earliest time `decide` must run again even if nothing else happens.
pub fn decide(
    desired: &BTreeMap<String, DesiredUnit>,
    units: &BTreeMap<String, Unit>,
    now: UnixMs,
) -> (Vec<Action>, Option<UnixMs>) {
    let mut actions = Vec::new();
    let mut wake: Option<UnixMs> = None;
    let mut wake_at = |t: UnixMs| wake = Some(wake.map_or(t, |w| w.min(t)));
    for (id, u) in units {
        // A stop in progress (spec change, removal, or a failed probe): SIGKILL after the grace.
        if let (Some(pid), Some((deadline, killed))) = (u.pid, u.stopping) {
            if !killed && now >= deadline {
                actions.push(Action::Kill { unit: id.clone(), pid });
            } else if !killed {
                wake_at(deadline);
            }
            continue;
        }
        if desired.get(id).is_some_and(|d| d.runnable && d.hash == u.hash) {
            continue;
        }
        if u.starting {
            continue; // stopped once the runtime reports the start
        }
        match u.pid {
            Some(pid) => {
                actions.push(Action::Terminate {
                    unit: id.clone(),
                    pid,
                    kill_at: now + u.grace_ms,
                });
                wake_at(now + u.grace_ms);
            }
            None => {
                if !desired.get(id).is_some_and(|d| d.runnable) {
                    actions.push(Action::Forget { unit: id.clone() });
                }
            }
        }
    }
    for (id, d) in desired {
        if !d.runnable {
            continue;
        }
        match units.get(id) {
            None => actions.push(Action::Start { unit: id.clone() }),
            Some(u) if u.starting => {}
            Some(u) if u.hash != d.hash => {
                if u.pid.is_none() {
                    actions.push(Action::Start { unit: id.clone() });
                }
            }
            Some(u) => {
                if u.pid.is_none() && u.done.is_none() {
                    match u.next_start_at {
                        Some(t) if t > now => wake_at(t),
                        _ => actions.push(Action::Start { unit: id.clone() }),
                    }
                }
            }
        }
    }
    (actions, wake)
}

/// A unit's process exited. `code` is the exit code, `None` when killed by a signal.
pub fn on_exit(u: &mut Unit, code: Option<i32>, signal: Option<i32>, policy: RestartPolicy, now: UnixMs) {
    u.pid = None;
    u.last_exit_code = code;
    let mut forced = None;
    if u.stopping.take().is_some() {
        forced = u.kill_reason.take();
        if forced.is_none() {
            u.reason = Some("Stopped".into());
            u.next_start_at = None;
            return;
        }
    }
    let ran = u.started_at.map_or(0, |s| now - s);
    if ran >= BACKOFF_RESET_MS {
        u.consecutive_failures = 0;
    }
    let success = code == Some(0) && forced.is_none();
    u.reason = Some(match (code, signal) {
        _ if forced.is_some() => format!("Unhealthy: {}", forced.unwrap_or_default()),
        (Some(0), _) => "Completed".into(),
        (Some(c), _) => format!("Error: exited with code {c}"),
        (None, Some(s)) => format!("Killed by signal {s}"),
        (None, None) => "Exited".into(),
    });
    let restart = match policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => !success,
        RestartPolicy::Never => false,
    };
    if restart {
        u.consecutive_failures += 1;
        u.restarts += 1;
        let shift = (u.consecutive_failures - 1).min(20);
        u.next_start_at = Some(now + (BACKOFF_BASE_MS << shift).min(BACKOFF_MAX_MS));
    } else {
        u.next_start_at = None;
        u.done = Some(if success { Phase::Succeeded } else { Phase::Failed });
    }
}

/// The unit could not be started at all (missing executable, bad working dir, ...).
pub fn on_start_failed(u: &mut Unit, reason: String, policy: RestartPolicy, now: UnixMs) {
    u.started_at = Some(now);
    on_exit(u, None, None, policy, now);
    u.reason = Some(format!("StartError: {reason}"));
}

/// Has this unit shown that its spec is broken (for the update gate)? A crash loop, or a
/// permanent failure under restartPolicy Never/OnFailure.
pub fn broken(u: &Unit) -> bool {
    u.consecutive_failures >= CRASH_LOOP_AFTER || u.done == Some(Phase::Failed)
}

/// A unit's phase as reported in status.
pub fn phase(u: &Unit) -> Phase {
    if let Some(p) = u.done {
        p
    } else if u.pid.is_some() {
        Phase::Running
    } else if u.next_start_at.is_some() {
        if u.consecutive_failures >= CRASH_LOOP_AFTER {
            Phase::CrashLoopBackOff
        } else {
            Phase::Backoff
        }
    } else {
        Phase::Pending
    }
}

/// A workload's phase from its containers': the most alarming one wins.
pub fn workload_phase(phases: impl IntoIterator<Item = Phase>) -> Phase {
    let rank = |p: &Phase| match p {
        Phase::WaitingForRuntime => 7,
        Phase::CrashLoopBackOff => 6,
        Phase::Failed => 5,
        Phase::Backoff => 4,
        Phase::Pending => 3,
        Phase::Running => 2,
        Phase::Succeeded => 1,
    };
    phases.into_iter().max_by_key(rank).unwrap_or(Phase::Pending)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::*;

    fn d(hash: &str) -> DesiredUnit {
        DesiredUnit {
            hash: hash.into(),
            restart_policy: RestartPolicy::Always,
            grace_ms: 5_000,
            runnable: true,
        }
    }
    fn running(hash: &str, pid: u32) -> Unit {
        Unit {
            hash: hash.into(),
            grace_ms: 5_000,
            pid: Some(pid),
            started_at: Some(0),
            ..Default::default()
        }
    }
    fn check(
        desired: &[(&str, DesiredUnit)],
        units: &[(&str, Unit)],
        now: UnixMs,
        want: &[Action],
        want_wake: Option<UnixMs>,
    ) {
        let desired = desired.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        let units = units.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        let (got, wake) = decide(&desired, &units, now);
        assert_eq!(got, want);
        assert_eq!(wake, want_wake);
    }

    #[test]
    fn decide_table() {
        let u = |s: &str| s.to_string();
        // new unit starts
        check(&[("a", d("h1"))], &[], 0, &[Start { unit: u("a") }], None);
        // running with the same hash: nothing
        check(&[("a", d("h1"))], &[("a", running("h1", 7))], 0, &[], None);
        // spec changed: terminate old first, start new only after it exited
        check(
            &[("a", d("h2"))],
            &[("a", running("h1", 7))],
            100,
            &[Terminate {
                unit: u("a"),
                pid: 7,
                kill_at: 5_100,
            }],
            Some(5_100),
        );
        let stopping = Unit {
            stopping: Some((5_100, false)),
            ..running("h1", 7)
        };
        check(&[("a", d("h2"))], &[("a", stopping.clone())], 1_000, &[], Some(5_100));
        check(
            &[("a", d("h2"))],
            &[("a", stopping)],
            5_100,
            &[Kill { unit: u("a"), pid: 7 }],
            None,
        );
        let exited_old = Unit {
            hash: u("h1"),
            ..Default::default()
        };
        check(
            &[("a", d("h2"))],
            &[("a", exited_old.clone())],
            6_000,
            &[Start { unit: u("a") }],
            None,
        );
        // removed: terminate with the running spec's grace, then forget
        check(
            &[],
            &[("a", running("h1", 7))],
            0,
            &[Terminate {
                unit: u("a"),
                pid: 7,
                kill_at: 5_000,
            }],
            Some(5_000),
        );
        check(&[], &[("a", exited_old)], 0, &[Forget { unit: u("a") }], None);
        // backoff: wait until next_start_at, then start
        let backing = Unit {
            hash: u("h1"),
            next_start_at: Some(2_000),
            ..Default::default()
        };
        check(&[("a", d("h1"))], &[("a", backing.clone())], 1_000, &[], Some(2_000));
        check(
            &[("a", d("h1"))],
            &[("a", backing)],
            2_000,
            &[Start { unit: u("a") }],
            None,
        );
        // done units stay done
        let done = Unit {
            hash: u("h1"),
            done: Some(Phase::Succeeded),
            ..Default::default()
        };
        check(&[("a", d("h1"))], &[("a", done)], 0, &[], None);
        // unrunnable units are never started
        check(
            &[(
                "a",
                DesiredUnit {
                    runnable: false,
                    ..d("h1")
                },
            )],
            &[],
            0,
            &[],
            None,
        );
    }

    #[test]
    fn backoff_doubles_caps_and_becomes_crash_loop() {
        let mut u = running("h", 1);
        let mut delays = Vec::new();
        let mut now = 0;
        for i in 0..12 {
            u.pid = Some(i);
            u.started_at = Some(now);
            now += 10;
            on_exit(&mut u, Some(1), None, RestartPolicy::Always, now);
            delays.push(u.next_start_at.unwrap() - now);
            if i == 1 {
                assert_eq!(phase(&u), Phase::Backoff);
            }
            now = u.next_start_at.unwrap();
        }
        assert_eq!(&delays[..4], &[1_000, 2_000, 4_000, 8_000]);
        assert_eq!(*delays.last().unwrap(), BACKOFF_MAX_MS);
        assert_eq!(phase(&u), Phase::CrashLoopBackOff);
        assert_eq!(u.restarts, 12);
        assert_eq!(u.reason.as_deref(), Some("Error: exited with code 1"));
        // a long healthy run resets the backoff
        u.pid = Some(99);
        u.started_at = Some(now);
        on_exit(&mut u, None, Some(9), RestartPolicy::Always, now + BACKOFF_RESET_MS);
        assert_eq!(u.next_start_at.unwrap() - (now + BACKOFF_RESET_MS), BACKOFF_BASE_MS);
        assert_eq!(u.reason.as_deref(), Some("Killed by signal 9"));
    }

    #[test]
    fn restart_policies() {
        for (policy, code, restarts, done) in [
            (RestartPolicy::Always, 0, true, None),
            (RestartPolicy::OnFailure, 0, false, Some(Phase::Succeeded)),
            (RestartPolicy::OnFailure, 3, true, None),
            (RestartPolicy::Never, 3, false, Some(Phase::Failed)),
        ] {
            let mut u = running("h", 1);
            on_exit(&mut u, Some(code), None, policy, 50);
            assert_eq!(u.next_start_at.is_some(), restarts, "{policy:?} {code}");
            assert_eq!(u.done, done);
        }
    }

    #[test]
    fn intentional_stop_is_not_a_restart() {
        let mut u = Unit {
            stopping: Some((10, false)),
            ..running("h", 1)
        };
        on_exit(&mut u, None, Some(15), RestartPolicy::Always, 5);
        assert_eq!(u.restarts, 0);
        assert_eq!(u.next_start_at, None);
        assert_eq!(u.stopping, None);
    }

    #[test]
    fn unhealthy_kill_counts_as_a_failure() {
        let mut u = Unit {
            stopping: Some((10, false)),
            kill_reason: Some("liveness probe failed 3 times: HTTP 500".into()),
            ..running("h", 1)
        };
        on_exit(&mut u, None, Some(15), RestartPolicy::Always, 5);
        assert_eq!(u.restarts, 1);
        assert_eq!(u.next_start_at, Some(5 + BACKOFF_BASE_MS));
        assert_eq!(
            u.reason.as_deref(),
            Some("Unhealthy: liveness probe failed 3 times: HTTP 500")
        );
        // while a wanted unit is being stopped for being unhealthy, the grace period still applies
        let desired = [("a".to_string(), d("h"))].into_iter().collect();
        let stopping = [(
            "a".to_string(),
            Unit {
                stopping: Some((100, false)),
                ..running("h", 7)
            },
        )]
        .into_iter()
        .collect();
        assert_eq!(decide(&desired, &stopping, 50), (vec![], Some(100)));
        assert_eq!(
            decide(&desired, &stopping, 100).0,
            vec![Action::Kill {
                unit: "a".into(),
                pid: 7
            }]
        );
    }

    #[test]
    fn a_start_under_way_is_neither_repeated_nor_forgotten() {
        let starting = Unit {
            hash: "h1".into(),
            starting: true,
            ..Default::default()
        };
        check(&[("a", d("h1"))], &[("a", starting.clone())], 0, &[], None);
        check(&[("a", d("h2"))], &[("a", starting.clone())], 0, &[], None);
        check(&[], &[("a", starting)], 0, &[], None);
    }

    #[test]
    fn broken_means_crash_loop_or_permanent_failure() {
        let mut u = running("h", 1);
        assert!(!broken(&u));
        for _ in 0..CRASH_LOOP_AFTER {
            u.pid = Some(1);
            on_exit(&mut u, Some(1), None, RestartPolicy::Always, 10);
        }
        assert!(broken(&u));
        let mut once = running("h", 1);
        on_exit(&mut once, Some(1), None, RestartPolicy::Never, 10);
        assert!(broken(&once), "exited for good under Never");
        let mut done = running("h", 1);
        on_exit(&mut done, Some(0), None, RestartPolicy::OnFailure, 10);
        assert!(!broken(&done), "Succeeded is not broken");
    }

    #[test]
    fn workload_phase_takes_the_worst() {
        assert_eq!(
            workload_phase([Phase::Running, Phase::CrashLoopBackOff]),
            Phase::CrashLoopBackOff
        );
        assert_eq!(workload_phase([Phase::Running, Phase::Running]), Phase::Running);
        assert_eq!(workload_phase([]), Phase::Pending);
    }
}
