//! The hub's controllers, registered in one place ([`all`]). Each is a loop of
//! *load -> `outpost_core` decide(state, now) -> execute* through the [`Service`], run on a
//! timer and woken early by the events it cares about:
//!
//! | controller | decides with | runs |
//! |---|---|---|
//! | `alert-rules` | `outpost_core::alerts::{fleet_alerts, condition_alerts, diff_hub_alerts}` | every `OUTPOST_ALERT_EVAL_MS` (5 s) |
//! | `reschedule` | `crate::scheduler::plan` (the whole fleet) | when nodes came back online: one run for every node that came back meanwhile |
//! | `rollouts` | `outpost_core::waves::{start, decide}` | on gate results and nodes coming back, at bake ends and window openings, every 1 s while a rollout is active (10 s otherwise) |
//! | `webhooks` | `outpost_core::retry::webhook` | when an alert or rollout event is queued, or a retry is due |
//! | `retention` | resolved alerts kept 7 days | hourly (events, error lines and webhook rows are capped where they are written) |
//! | `gitops` | `outpost_core::gitops::{next_fetch, decide_commit, placement_terms, combine}` | when a GitRepo's fetch is due (poll interval, backoff), on its webhook, `outpost gitops sync` or a GitRepo apply |
//! | `data-retention` | pipeline records kept for their hub sink's `retention` (default 7 days) | every minute |
//!
//! The scheduler is not a loop: every command that changes objects or nodes reschedules under
//! the write lock before it answers (`Service::reschedule_locked`), and a node back from
//! Offline, or a rollout step that changes some node's revision, triggers one. Applies and
//! undos start their rollouts (and open the first wave) before they reschedule.
//!
//! Must never: hold the write lock while waiting on anything but the store, or stop on an
//! error (a failed run is logged and retried at the next tick).

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::service::{now_ms, Service};

/// How often the retention controller runs.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);
/// How often expired pipeline records are pruned.
const DATA_RETENTION_EVERY: Duration = Duration::from_secs(60);

/// Runs once; returns the longest wait before the next run.
type Run = Box<dyn Fn(Arc<Service>) -> BoxFuture<'static, Duration> + Send + Sync>;

/// One registered controller.
pub struct Controller {
    pub name: &'static str,
    run: Run,
    /// Wakes the controller before its wait is over.
    wake: Option<fn(&Service) -> &Notify>,
}

/// Every controller of the hub.
pub fn all(svc: &Service) -> Vec<Controller> {
    let started = now_ms();
    let eval_every = svc.settings.monitor.eval_every;
    let http = crate::webhook::client();
    vec![
        Controller {
            name: "alert-rules",
            run: Box::new(move |svc| {
                Box::pin(async move {
                    if let Err(e) = crate::alerts::evaluate_once(&svc, started, now_ms()).await {
                        tracing::warn!(error = %e, "alert rules failed; retrying");
                    }
                    eval_every
                })
            }),
            wake: None,
        },
        Controller {
            name: "reschedule",
            run: Box::new(|svc| {
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
        },
        Controller {
            name: "rollouts",
            run: Box::new(|svc| Box::pin(async move { svc.rollouts_tick(now_ms()).await })),
            wake: Some(|s| &s.wake.rollouts),
        },
        Controller {
            name: "retention",
            run: Box::new(|svc| {
                Box::pin(async move {
                    match svc.mdb(|m| m.prune(now_ms())).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(alerts = n, "forgot resolved alerts older than 7 days"),
                        Err(e) => tracing::warn!(error = %e, "pruning resolved alerts failed; retrying in an hour"),
                    }
                    RETENTION_EVERY
                })
            }),
            wake: None,
        },
        Controller {
            name: "data-retention",
            run: Box::new(|svc| {
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
        },
        Controller {
            name: "gitops",
            run: Box::new(|svc| Box::pin(async move { crate::gitops::tick(&svc, now_ms()).await })),
            wake: Some(|s| &s.wake.gitops),
        },
        Controller {
            name: "webhooks",
            run: Box::new(move |svc| {
                let http = http.clone();
                Box::pin(async move { crate::webhook::deliver_due(&svc, &http, now_ms()).await })
            }),
            wake: Some(|s| &s.wake.webhooks),
        },
    ]
}

/// Start every controller; each stops when `stop` flips.
pub fn spawn_all(svc: &Arc<Service>, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    all(svc)
        .into_iter()
        .map(|c| {
            let (svc, mut stop) = (svc.clone(), stop.clone());
            tokio::spawn(async move {
                tracing::debug!(controller = c.name, "controller started");
                loop {
                    let wait = (c.run)(svc.clone()).await;
                    let woken = async {
                        match c.wake {
                            Some(w) => w(&svc).notified().await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = tokio::time::sleep(wait.max(Duration::from_millis(1))) => {}
                        _ = woken => {}
                        _ = stop.changed() => return,
                    }
                }
            })
        })
        .collect()
}
