//! The hub's controllers, registered in one place ([`all`]). Each is a loop of
//! *load -> `outpost_core` decide(state, now) -> execute* through the [`Service`], run on a
//! timer and woken early by the events it cares about, and only while this hub process holds
//! the controller's lease (below):
//!
//! | controller | decides with | runs | fenced writes |
//! |---|---|---|---|
//! | `alert-rules` | `outpost_core::alerts::{fleet_alerts, condition_alerts, diff_hub_alerts}` | every `OUTPOST_ALERT_EVAL_MS` (5 s), or ten times its last run when that is longer (it reads every node and status) | alert transitions and their webhook rows |
//! | `reschedule` (no lease: in every replica) | `crate::scheduler::plan_join` for the nodes back online (alone when nothing else can change, as a join), `crate::scheduler::plan` (the whole fleet) after a failed change | when nodes came back online to this replica, or a change's reschedule failed here: one run for all of them (a wake-up right after a run waits four times that run's length), again every second while it fails | none (a plan from the current state, idempotent, under the replicas' write lock) |
//! | `rollouts` | `outpost_core::waves::{start, decide}` | on gate results and nodes coming back (a wake-up right after a run waits four times that run's length: wake-ups coalesce), at bake ends and window openings, every 1 s while a rollout is active (10 s otherwise) | each rollout with its events and alert |
//! | `webhooks` | `outpost_core::retry::webhook` | when an alert or rollout event is queued here, a retry is due, or every 2 s (another replica may have queued one) | claiming due rows, marking them delivered or retried |
//! | `retention` | resolved alerts kept 7 days; `outpost_core::retention::revisions_to_prune` | hourly (`OUTPOST_RETENTION_MS`); events, error lines and webhook rows are capped where they are written | every delete |
//! | `gitops` | `outpost_core::gitops::{next_fetch, decide_commit, placement_terms, combine}` | when a GitRepo's fetch is due (poll interval, backoff), on its webhook, `outpost gitops sync` or a GitRepo apply | none (an apply of one commit is idempotent) |
//! | `data-retention` | pipeline records kept for their hub sink's `retention` (default 7 days) | every minute | none (a delete by age) |
//!
//! **Leases.** Several hub replicas may share one database; work that must happen once runs
//! in one of them. Every controller but `reschedule` (asked for by the replica a node came back
//! to, so it runs where it was asked) has a lease row of its own name (`leases` table: holder,
//! expiry, fencing token). One keeper task per process takes or renews all of them every
//! `OUTPOST_LEASE_RENEW_MS` (5 s) for `OUTPOST_LEASE_MS` (15 s) with a conditional UPDATE
//! (`outpost_core::lease::claim`); a controller runs only while its lease is held by this
//! process and stops a fifth of the period before the lease would end without a renewal
//! (`outpost_core::lease::acting_until`). The fenced writes above carry the token, and the
//! store refuses them in the same transaction when it is no longer current, so a replica that
//! stalled past its lease and comes back cannot act twice. On SQLite (one process) every lease
//! is simply held by that process, through the same code. `outpost_hub_lease_held{lease}` says
//! which leases a replica holds; a change is logged.
//!
//! The scheduler is not a loop: every command that changes objects or nodes reschedules under
//! the write lock before it answers (`Service::reschedule_locked`), and a node back from
//! Offline, or a rollout step that changes some node's revision, triggers one. Applies and
//! undos start their rollouts (and open the first wave) before they reschedule.
//!
//! Must never: hold the write lock while waiting on anything but the store, stop on an error
//! (a failed run is logged and retried at the next tick), or act for a lease it does not hold.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use outpost_api::UnixMs;
use outpost_core::lease::{self, Fence, Timing};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::service::{now_ms, Service};

/// How often expired pipeline records are pruned.
const DATA_RETENTION_EVERY: Duration = Duration::from_secs(60);

fn env_ms(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Lease period and renew interval: `OUTPOST_LEASE_MS` (15000), `OUTPOST_LEASE_RENEW_MS` (5000).
pub fn lease_timing() -> Timing {
    let d = Timing::default();
    Timing::new(
        env_ms("OUTPOST_LEASE_MS", d.period_ms as u64) as i64,
        env_ms("OUTPOST_LEASE_RENEW_MS", d.renew_every_ms as u64) as i64,
    )
}

/// How often the retention controller runs: `OUTPOST_RETENTION_MS` (an hour).
fn retention_every() -> Duration {
    Duration::from_millis(env_ms("OUTPOST_RETENTION_MS", 3_600_000).max(100))
}

/// Object revisions kept per object beyond those in use: `OUTPOST_REVISIONS_KEPT` (50).
fn revisions_kept() -> usize {
    env_ms("OUTPOST_REVISIONS_KEPT", outpost_core::retention::REVISIONS_KEPT as u64) as usize
}

/// Runs once as the holder of `fence`; returns the longest wait before the next run.
type Run = Box<dyn Fn(Arc<Service>, Fence) -> BoxFuture<'static, Duration> + Send + Sync>;

/// One registered controller.
pub struct Controller {
    pub name: &'static str,
    run: Run,
    /// Wakes the controller before its wait is over.
    wake: Option<fn(&Service) -> &Notify>,
    /// Runs only in the replica holding its lease (work that must happen once); false: in every
    /// replica, for work asked for in that replica that is safe to do in several at once.
    leased: bool,
    /// A wake-up right after a run waits this many times the run's length first (0: none); for
    /// runs that read the whole fleet under the write lock ([`until_next_run`]).
    wake_gap: u32,
}

/// Every controller of the hub.
pub fn all(svc: &Service) -> Vec<Controller> {
    let started = now_ms();
    let eval_every = svc.settings.monitor.eval_every;
    let http = crate::webhook::client();
    vec![
        Controller {
            name: "alert-rules",
            run: Box::new(move |svc, fence| {
                Box::pin(async move {
                    let run = std::time::Instant::now();
                    if let Err(e) = crate::alerts::evaluate_once(&svc, started, Some(&fence), now_ms()).await {
                        tracing::warn!(error = %e, "alert rules failed; retrying");
                    }
                    paced(eval_every, run.elapsed())
                })
            }),
            wake: None,
            leased: true,
            wake_gap: 0,
        },
        Controller {
            name: "reschedule",
            run: Box::new(|svc, _| {
                Box::pin(async move {
                    svc.reschedule_requested(now_ms()).await;
                    // a failed run asked again: retry soon; otherwise only a wake-up runs it
                    if svc.wake.reschedule_pending.load(std::sync::atomic::Ordering::SeqCst) {
                        Duration::from_secs(1)
                    } else {
                        Duration::from_secs(3600)
                    }
                })
            }),
            wake: Some(|s| &s.wake.reschedule),
            leased: false,
            wake_gap: WAKE_GAP_RUNS,
        },
        Controller {
            name: "rollouts",
            run: Box::new(|svc, fence| Box::pin(async move { svc.rollouts_tick(now_ms(), Some(&fence)).await })),
            wake: Some(|s| &s.wake.rollouts),
            leased: true,
            wake_gap: WAKE_GAP_RUNS,
        },
        Controller {
            name: "retention",
            run: Box::new(|svc, fence| Box::pin(async move { retention(&svc, &fence, now_ms()).await })),
            wake: None,
            leased: true,
            wake_gap: 0,
        },
        Controller {
            name: "data-retention",
            run: Box::new(|svc, _| {
                Box::pin(async move {
                    match svc.data.prune(now_ms()).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(records = n, "pruned pipeline records past their retention"),
                        Err(e) => tracing::warn!(error = %e, "pruning pipeline records failed; retrying in a minute"),
                    }
                    DATA_RETENTION_EVERY
                })
            }),
            wake: None,
            leased: true,
            wake_gap: 0,
        },
        Controller {
            name: "gitops",
            run: Box::new(|svc, _| Box::pin(async move { crate::gitops::tick(&svc, now_ms()).await })),
            wake: Some(|s| &s.wake.gitops),
            leased: true,
            wake_gap: 0,
        },
        Controller {
            name: "webhooks",
            run: Box::new(move |svc, fence| {
                let http = http.clone();
                Box::pin(async move { crate::webhook::deliver_due(&svc, &http, Some(&fence), now_ms()).await })
            }),
            wake: Some(|s| &s.wake.webhooks),
            leased: true,
            wake_gap: 0,
        },
    ]
}

/// One retention run (under the `retention` lease): resolved alerts past 7 days, object
/// revisions past the last `OUTPOST_REVISIONS_KEPT` that nothing uses, then compaction.
async fn retention(svc: &Service, fence: &Fence, now: UnixMs) -> Duration {
    match svc.monitor.prune(Some(fence), now).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(alerts = n, "forgot resolved alerts older than 7 days"),
        Err(e) => tracing::warn!(error = %e, "pruning resolved alerts failed; retrying at the next run"),
    }
    match svc.monitor.prune_revisions(revisions_kept(), Some(fence)).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(revisions = n, "pruned object revisions nothing uses any more"),
        Err(e) => tracing::warn!(error = %e, "pruning object revisions failed; retrying at the next run"),
    }
    if let Err(e) = svc.monitor.compact().await {
        tracing::warn!(error = %e, "database compaction failed");
    }
    retention_every()
}

/// This process's hold on each controller lease: the fence and until when it may act.
#[derive(Default)]
pub struct Held {
    map: Mutex<BTreeMap<&'static str, (Fence, UnixMs)>>,
    /// Woken when a lease is newly taken, so its controller runs at once.
    taken: BTreeMap<&'static str, Notify>,
}

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, (Fence, UnixMs)>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fence to act under at `now`, if this process holds the lease.
    pub fn fence(&self, name: &str, now: UnixMs) -> Option<Fence> {
        self.lock()
            .get(name)
            .filter(|(_, until)| lease::may_act(Some(*until), now))
            .map(|(f, _)| f.clone())
    }
}

/// A holder id unique to this process: host, pid and a random part (the pid lets an operator,
/// or a test, tell which process holds what).
pub fn holder_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}:{}:{:08x}", host.trim(), std::process::id(), rand::random::<u32>())
}

/// One keeper round: take or renew every lease; record what is held.
async fn keep_leases(svc: &Service, held: &Held, me: &str, t: &Timing) {
    for name in held.taken.keys() {
        let sent = now_ms();
        let was = held.fence(name, sent);
        match svc.monitor.lease_acquire(name, me, sent, t).await {
            Ok(Some(l)) => {
                let fence = Fence {
                    lease: name.to_string(),
                    holder: l.holder,
                    token: l.token,
                };
                if was.as_ref() != Some(&fence) {
                    tracing::info!(
                        lease = name,
                        token = fence.token,
                        holder = me,
                        "lease taken: this replica runs the controller"
                    );
                    held.lock().insert(name, (fence, lease::acting_until(sent, t)));
                    if let Some(n) = held.taken.get(name) {
                        n.notify_one();
                    }
                } else {
                    held.lock().insert(name, (fence, lease::acting_until(sent, t)));
                }
                svc.metrics.lease_held(name, true);
            }
            Ok(None) => {
                if held.lock().remove(name).is_some() {
                    tracing::warn!(
                        lease = name,
                        "lease held by another replica now; this one stops acting for it"
                    );
                }
                svc.metrics.lease_held(name, false);
            }
            // Keep acting until the last good renewal runs out; the next round tries again.
            Err(e) => {
                tracing::warn!(lease = name, error = %e, "cannot renew the lease");
                svc.metrics.lease_held(name, held.fence(name, now_ms()).is_some());
            }
        }
    }
}

/// Start the lease keeper and every controller; each stops when `stop` flips.
pub fn spawn_all(svc: &Arc<Service>, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    let controllers = all(svc);
    let timing = lease_timing();
    let me = holder_id();
    let held = Arc::new(Held {
        map: Mutex::default(),
        taken: controllers
            .iter()
            .filter(|c| c.leased)
            .map(|c| (c.name, Notify::new()))
            .collect(),
    });
    tracing::info!(holder = %me, lease_ms = timing.period_ms, renew_ms = timing.renew_every_ms, "controller leases");
    let mut tasks = Vec::new();
    {
        let (svc, held, mut stop, me) = (svc.clone(), held.clone(), stop.clone(), me.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                keep_leases(&svc, &held, &me, &timing).await;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(timing.renew_every_ms as u64)) => {}
                    _ = stop.changed() => return,
                }
            }
        }));
    }
    for c in controllers {
        let (svc, held, mut stop, me_run) = (svc.clone(), held.clone(), stop.clone(), me.clone());
        tasks.push(tokio::spawn(async move {
            tracing::debug!(controller = c.name, "controller started");
            loop {
                let fence = match c.leased {
                    true => held.fence(c.name, now_ms()),
                    // Not a lease of the database: this process's own, with no token.
                    false => Some(Fence {
                        lease: c.name.to_string(),
                        holder: me_run.clone(),
                        token: 0,
                    }),
                };
                let started = tokio::time::Instant::now();
                let wait = match fence {
                    Some(fence) => (c.run)(svc.clone(), fence).await,
                    // Not ours: look again when the keeper takes it (or at the next renewal).
                    None => Duration::from_millis(timing.renew_every_ms as u64),
                };
                let ran = started.elapsed();
                let woken = async {
                    match c.wake {
                        Some(w) => w(&svc).notified().await,
                        None => std::future::pending().await,
                    }
                };
                let taken = held.taken.get(c.name).map(|n| n.notified());
                let taken = async {
                    match taken {
                        Some(t) => t.await,
                        None => std::future::pending().await,
                    }
                };
                if !until_next_run(wait, ran * c.wake_gap, woken, taken, &mut stop).await {
                    return;
                }
            }
        }));
    }
    tasks
}

/// The wake-up gap of the controllers whose runs read the whole fleet under the write lock
/// (`rollouts`, `reschedule`), in lengths of their last run.
const WAKE_GAP_RUNS: u32 = 4;

/// Wait for a controller's next run: `wait` after the last one, or sooner on a wake-up or when
/// its lease is taken; false when the hub stops.
///
/// The wait after a run of a controller on a timer that reads the whole fleet (`alert-rules`:
/// every node and status): its period, or [`PACED_RUNS`] times the run, whichever is longer,
/// so it takes at most a tenth of a core's time however large the fleet. At 100,000 nodes a
/// run reads ~200,000 rows; every 5 s that was a large share of the tier's CPU.
fn paced(every: Duration, run: Duration) -> Duration {
    every.max(run * PACED_RUNS)
}

/// See [`paced`].
const PACED_RUNS: u32 = 10;

/// A wake-up runs it only `gap` after the last run ended (wake-ups meanwhile are one run). The
/// rollout controller reads every node and status and is woken by each gate result; with 5,000
/// agents reporting a change it ran back to back, a fifth of the hub's CPU, with the write lock
/// held. With a gap of [`WAKE_GAP_RUNS`] runs it holds the lock at most a fifth of the time, and
/// a run of a few milliseconds (small fleets) still follows its wake-up at once.
async fn until_next_run(
    wait: Duration,
    gap: Duration,
    woken: impl std::future::Future<Output = ()>,
    taken: impl std::future::Future<Output = ()>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait.max(Duration::from_millis(1))) => true,
        _ = woken => tokio::select! {
            _ = tokio::time::sleep(gap) => true,
            _ = stop.changed() => false,
        },
        _ = taken => true,
        _ = stop.changed() => false,
    }
}

#[cfg(test)]
mod wake_tests {
    use super::*;

    #[test]
    fn a_timer_controller_that_reads_the_fleet_waits_ten_runs_at_least() {
        let five = Duration::from_secs(5);
        assert_eq!(
            paced(five, Duration::from_millis(20)),
            five,
            "a small fleet: the period"
        );
        assert_eq!(paced(five, Duration::from_millis(1_500)), Duration::from_secs(15));
    }
    use tokio::time::Instant;

    /// How long until the next run when a wake-up comes `after` the last run, which took `ran`
    /// and asked to run again in a minute.
    async fn next_run_after_wake(ran: Duration, after: Duration) -> Duration {
        let (_tx, mut stop) = watch::channel(false);
        let start = Instant::now();
        let woken = tokio::time::sleep(after);
        let gap = ran * WAKE_GAP_RUNS;
        assert!(until_next_run(Duration::from_secs(60), gap, woken, std::future::pending(), &mut stop).await);
        start.elapsed()
    }

    #[tokio::test]
    async fn a_wake_up_after_a_long_run_waits_four_runs_and_after_a_short_run_comes_at_once() {
        let long = next_run_after_wake(Duration::from_millis(250), Duration::ZERO).await;
        assert!(long >= Duration::from_millis(1000), "{long:?}");
        assert!(long < Duration::from_secs(30), "{long:?}: the wake-up was lost");
        let short = next_run_after_wake(Duration::from_millis(1), Duration::from_millis(50)).await;
        assert!(short >= Duration::from_millis(54), "{short:?}");
        assert!(short < Duration::from_secs(5), "{short:?}");
    }

    #[tokio::test]
    async fn without_a_wake_up_the_run_waits_what_it_asked_for() {
        let (_tx, mut stop) = watch::channel(false);
        let start = Instant::now();
        let never = std::future::pending::<()>();
        assert!(
            until_next_run(
                Duration::from_millis(300),
                Duration::from_secs(5),
                never,
                std::future::pending(),
                &mut stop
            )
            .await
        );
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(5),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn the_hub_stopping_ends_the_gap() {
        let (tx, mut stop) = watch::channel(false);
        let start = Instant::now();
        let waiting = tokio::spawn(async move {
            until_next_run(
                Duration::from_secs(600),
                Duration::from_secs(60),
                async {},
                std::future::pending(),
                &mut stop,
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send(true).expect("the waiter listens");
        assert!(!waiting.await.expect("no panic"), "stopped during the 60 s gap");
        assert!(start.elapsed() < Duration::from_secs(60));
    }
}
