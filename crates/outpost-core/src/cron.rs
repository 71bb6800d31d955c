//! When a CronJob runs on its node: pure functions of the schedule, the time zone, the
//! CronJob's last scheduled time and `now`, so the node decides on its own clock, offline too.
//!
//! Schedules are evaluated on the wall clock of the time zone (`spec.timeZone`, else the
//! node's). Across daylight-saving changes:
//! - a wall time that does not exist (the hour skipped in spring) fires once, at the same
//!   distance after the jump (`02:30` becomes `03:30`), as jiff's "compatible" rule and
//!   Vixie cron do;
//! - a wall time that happens twice (the hour repeated in autumn) fires once, at its first
//!   occurrence.
//!
//! [`decide`] is the controller step: given the last scheduled time it returns whether to
//! start a run now, skip it (concurrency policy Forbid, a missed start past
//! `startingDeadlineSeconds`, suspension), or replace the running one. Only the most recent
//! missed time is ever run (as Kubernetes does after downtime), so a node back from a long
//! outage runs a job once, not once per missed minute.

use jiff::civil::DateTime;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use outpost_api::cron::{parse_schedule, CronSchedule};
use outpost_api::{ConcurrencyPolicy, CronRunSpec, UnixMs};

/// The time zone of a schedule: the named zone, or `local` when none is named.
pub fn zone(name: Option<&str>, local: &TimeZone) -> Result<TimeZone, String> {
    match name {
        Some(n) => TimeZone::get(n).map_err(|e| format!("time zone {n:?}: {e}")),
        None => Ok(local.clone()),
    }
}

/// The first fire time strictly after `after` (Unix ms), or None within the next 5 years.
pub fn next_after(s: &CronSchedule, tz: &TimeZone, after: UnixMs) -> Option<UnixMs> {
    let start = Timestamp::from_millisecond(after).ok()?;
    // Start at the minute after `after` on the wall clock; a repeated hour is walked again, and
    // its wall times map to their first occurrence, which is before `after` and so skipped.
    let mut dt: DateTime = start.to_zoned(tz.clone()).datetime();
    dt = dt.with().second(0).subsec_nanosecond(0).build().ok()?;
    dt = dt.checked_add(1.minute()).ok()?;
    let limit = dt.checked_add(5.years()).ok()?;
    while dt < limit {
        let weekday = dt.weekday().to_sunday_zero_offset() as u32;
        if !s.day_matches(dt.month() as u32, dt.day() as u32, weekday) {
            dt = dt.date().tomorrow().ok()?.to_datetime(jiff::civil::Time::midnight());
            continue;
        }
        if !s.hour_matches(dt.hour() as u32) {
            dt = dt.with().minute(0).build().ok()?.checked_add(1.hour()).ok()?;
            continue;
        }
        if !s.minute_matches(dt.minute() as u32) {
            dt = dt.checked_add(1.minute()).ok()?;
            continue;
        }
        let at = tz
            .to_ambiguous_zoned(dt)
            .compatible()
            .ok()?
            .timestamp()
            .as_millisecond();
        if at > after {
            return Some(at);
        }
        dt = dt.checked_add(1.minute()).ok()?;
    }
    None
}

/// The most recent fire time in `(after, now]`, if any.
pub fn last_due(s: &CronSchedule, tz: &TimeZone, after: UnixMs, now: UnixMs) -> Option<UnixMs> {
    let mut due = None;
    let mut t = after;
    // Bounded: at most one fire per minute, and `now - after` is bounded by the caller's
    // outage; cap the walk so a years-long outage costs at most ~1M steps.
    for _ in 0..1_000_000 {
        match next_after(s, tz, t) {
            Some(n) if n <= now => {
                due = Some(n);
                t = n;
            }
            _ => break,
        }
    }
    due
}

/// What the node knows about a CronJob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CronState {
    /// The last schedule time handled (run, skipped or replaced); the CronJob's creation on
    /// the node when none yet.
    pub last_scheduled: UnixMs,
    /// A run is in progress.
    pub running: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CronAction {
    /// Nothing due; check again at `next` (None: never).
    Wait { next: Option<UnixMs> },
    /// Start a run for `scheduled`.
    Start { scheduled: UnixMs },
    /// Stop the running run, then start one for `scheduled` (concurrencyPolicy Replace).
    Replace { scheduled: UnixMs },
    /// `scheduled` is not run, for `reason`; it counts as handled.
    Skip { scheduled: UnixMs, reason: String },
}

/// The controller step for one CronJob at `now`. The caller records `last_scheduled` of a
/// Start/Replace/Skip before acting, so a crash never runs one schedule time twice.
pub fn decide(spec: &CronRunSpec, st: &CronState, tz: &TimeZone, now: UnixMs) -> CronAction {
    let Ok(s) = parse_schedule(&spec.schedule) else {
        return CronAction::Wait { next: None };
    };
    let Some(due) = last_due(&s, tz, st.last_scheduled, now) else {
        return CronAction::Wait {
            next: next_after(&s, tz, st.last_scheduled.max(now)),
        };
    };
    if spec.suspend {
        return CronAction::Skip {
            scheduled: due,
            reason: "suspended".into(),
        };
    }
    if let Some(d) = spec.starting_deadline_seconds {
        if now - due > d as i64 * 1000 {
            return CronAction::Skip {
                scheduled: due,
                reason: format!("missed its start by more than startingDeadlineSeconds ({d} s)"),
            };
        }
    }
    match (st.running, spec.concurrency) {
        (false, _) => CronAction::Start { scheduled: due },
        (true, ConcurrencyPolicy::Replace) => CronAction::Replace { scheduled: due },
        (true, ConcurrencyPolicy::Forbid) => CronAction::Skip {
            scheduled: due,
            reason: "the previous run is still running (concurrencyPolicy: Forbid)".into(),
        },
        // One run per CronJob at a time on a node: Allow waits for the running one.
        (true, ConcurrencyPolicy::Allow) => CronAction::Skip {
            scheduled: due,
            reason: "the previous run is still running (outpost runs one run of a CronJob at a time)".into(),
        },
    }
}

/// Which finished runs to keep: the newest `successful` successes and `failed` failures.
/// `runs` are (scheduled time, succeeded), in any order; returns those to drop.
pub fn prune_history(runs: &[(UnixMs, bool)], successful: u32, failed: u32) -> Vec<UnixMs> {
    let mut sorted: Vec<_> = runs.to_vec();
    sorted.sort_by_key(|r| std::cmp::Reverse(r.0));
    let (mut ok, mut bad) = (0, 0);
    let mut drop = Vec::new();
    for (t, success) in sorted {
        let (count, limit) = if success {
            (&mut ok, successful)
        } else {
            (&mut bad, failed)
        };
        *count += 1;
        if *count > limit {
            drop.push(t);
        }
    }
    drop
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(tz: &str, civil: &str) -> UnixMs {
        let dt: DateTime = civil.parse().unwrap();
        TimeZone::get(tz)
            .unwrap()
            .to_ambiguous_zoned(dt)
            .compatible()
            .unwrap()
            .timestamp()
            .as_millisecond()
    }

    fn utc(civil: &str) -> UnixMs {
        ms("UTC", civil)
    }

    fn show(tz: &str, t: UnixMs) -> String {
        Timestamp::from_millisecond(t)
            .unwrap()
            .to_zoned(TimeZone::get(tz).unwrap())
            .strftime("%Y-%m-%dT%H:%M%:z")
            .to_string()
    }

    /// (schedule, zone, after (civil, in zone), expected next (formatted in zone))
    #[test]
    fn next_fire_table_across_dst() {
        let cases = [
            ("*/5 * * * *", "UTC", "2026-03-01T10:02", "2026-03-01T10:05+00:00"),
            ("0 * * * *", "UTC", "2026-03-01T10:00", "2026-03-01T11:00+00:00"),
            ("30 2 * * *", "UTC", "2026-02-28T03:00", "2026-03-01T02:30+00:00"),
            ("0 0 29 2 *", "UTC", "2026-03-01T00:00", "2028-02-29T00:00+00:00"),
            ("0 9 * * mon", "UTC", "2026-03-04T12:00", "2026-03-09T09:00+00:00"),
            // Europe/Berlin springs forward on 2026-03-29 02:00 -> 03:00: 02:30 does not exist.
            (
                "30 2 * * *",
                "Europe/Berlin",
                "2026-03-28T03:00",
                "2026-03-29T03:30+02:00",
            ),
            (
                "30 2 * * *",
                "Europe/Berlin",
                "2026-03-29T04:00",
                "2026-03-30T02:30+02:00",
            ),
            // Every 30 minutes through the jump: 01:30 +01, then 03:00 +02 (02:00, 02:30 absent
            // and mapped onto 03:00/03:30, each fired once).
            (
                "*/30 * * * *",
                "Europe/Berlin",
                "2026-03-29T01:30",
                "2026-03-29T03:00+02:00",
            ),
            // Berlin falls back on 2026-10-25 03:00 -> 02:00: 02:30 happens twice, runs once.
            (
                "30 2 * * *",
                "Europe/Berlin",
                "2026-10-25T01:00",
                "2026-10-25T02:30+02:00",
            ),
            // Hourly jobs run in both copies of the repeated hour (two real hours).
            (
                "0 * * * *",
                "America/New_York",
                "2026-11-01T01:30",
                "2026-11-01T02:00-05:00",
            ),
            (
                "0 12 * * *",
                "Asia/Shanghai",
                "2026-06-01T12:00",
                "2026-06-02T12:00+08:00",
            ),
        ];
        for (sched, tz, after, want) in cases {
            let s = parse_schedule(sched).unwrap();
            let z = TimeZone::get(tz).unwrap();
            let got = next_after(&s, &z, ms(tz, after)).map(|t| show(tz, t));
            assert_eq!(got.as_deref(), Some(want), "{sched} in {tz} after {after}");
        }
    }

    #[test]
    fn repeated_hour_fires_once() {
        let s = parse_schedule("30 2 * * *").unwrap();
        let z = TimeZone::get("Europe/Berlin").unwrap();
        let first = next_after(&s, &z, ms("Europe/Berlin", "2026-10-25T01:00")).unwrap();
        // after the first 02:30 (+02:00), the next one is the following day, not the second 02:30
        let next = next_after(&s, &z, first).unwrap();
        assert_eq!(show("Europe/Berlin", next), "2026-10-26T02:30+01:00");
    }

    fn spec(schedule: &str, concurrency: ConcurrencyPolicy) -> CronRunSpec {
        CronRunSpec {
            schedule: schedule.into(),
            time_zone: None,
            concurrency,
            suspend: false,
            successful_history: 3,
            failed_history: 1,
            starting_deadline_seconds: None,
        }
    }

    #[test]
    fn decide_table() {
        use ConcurrencyPolicy::*;
        let z = TimeZone::UTC;
        let t0 = utc("2026-05-01T10:00");
        let min = 60_000;
        let st = |last, running| CronState {
            last_scheduled: last,
            running,
        };
        let cases: Vec<(CronRunSpec, CronState, UnixMs, CronAction)> = vec![
            (
                spec("* * * * *", Allow),
                st(t0, false),
                t0 + 30_000,
                CronAction::Wait { next: Some(t0 + min) },
            ),
            (
                spec("* * * * *", Allow),
                st(t0, false),
                t0 + min,
                CronAction::Start { scheduled: t0 + min },
            ),
            // After an outage only the most recent missed time runs.
            (
                spec("* * * * *", Allow),
                st(t0, false),
                t0 + 10 * min + 5,
                CronAction::Start {
                    scheduled: t0 + 10 * min,
                },
            ),
            (
                spec("* * * * *", Forbid),
                st(t0, true),
                t0 + min,
                CronAction::Skip {
                    scheduled: t0 + min,
                    reason: "the previous run is still running (concurrencyPolicy: Forbid)".into(),
                },
            ),
            (
                spec("* * * * *", Replace),
                st(t0, true),
                t0 + min,
                CronAction::Replace { scheduled: t0 + min },
            ),
            (
                CronRunSpec {
                    suspend: true,
                    ..spec("* * * * *", Allow)
                },
                st(t0, false),
                t0 + min,
                CronAction::Skip {
                    scheduled: t0 + min,
                    reason: "suspended".into(),
                },
            ),
            (
                CronRunSpec {
                    starting_deadline_seconds: Some(30),
                    ..spec("* * * * *", Allow)
                },
                st(t0, false),
                t0 + min + 31_000,
                CronAction::Skip {
                    scheduled: t0 + min,
                    reason: "missed its start by more than startingDeadlineSeconds (30 s)".into(),
                },
            ),
            (
                CronRunSpec {
                    starting_deadline_seconds: Some(30),
                    ..spec("* * * * *", Allow)
                },
                st(t0, false),
                t0 + min + 29_000,
                CronAction::Start { scheduled: t0 + min },
            ),
        ];
        for (i, (sp, state, now, want)) in cases.into_iter().enumerate() {
            assert_eq!(decide(&sp, &state, &z, now), want, "case {i}");
        }
    }

    #[test]
    fn time_zone_of_the_spec_is_used() {
        let mut sp = spec("0 9 * * *", ConcurrencyPolicy::Forbid);
        sp.time_zone = Some("Asia/Shanghai".into());
        let z = zone(sp.time_zone.as_deref(), &TimeZone::UTC).unwrap();
        let after = utc("2026-05-01T00:00");
        // 09:00 in Shanghai is 01:00 UTC
        assert_eq!(
            decide(
                &sp,
                &CronState {
                    last_scheduled: after,
                    running: false
                },
                &z,
                utc("2026-05-01T01:00")
            ),
            CronAction::Start {
                scheduled: utc("2026-05-01T01:00")
            }
        );
        assert!(zone(Some("Mars/Olympus"), &TimeZone::UTC).is_err());
    }

    #[test]
    fn history_is_pruned_per_outcome() {
        let runs = [(1, true), (2, false), (3, true), (4, true), (5, false), (6, true)];
        let mut dropped = prune_history(&runs, 3, 1);
        dropped.sort();
        assert_eq!(dropped, vec![1, 2]);
        assert_eq!(prune_history(&runs, 0, 0).len(), 6);
    }
}
