//! The node's monitoring loop: sample vital signs every few seconds (`vitals`), keep a 24 h
//! history at one-minute resolution in the store, evaluate the node's alert policy with
//! `outpost_core::alerts::evaluate`, and queue every firing/resolution as an `AlertFiring` /
//! `AlertResolved` event in the durable outbox (with the node's timestamp), so alerts fire and
//! resolve with the hub unreachable and reach it, none lost, after the link is back.
//!
//! Also holds the node's effective [`NodePolicy`] (persisted in `meta.alert_policy`, replaced
//! when a sync answer carries a new one) and the [`MonitorLink`] the sync tasks use.
//!
//! Must never: send anything itself (the status reporter delivers the outbox), or act on a
//! policy before it is persisted.
//!
//! Tuning (environment, mostly for tests): `OUTPOST_VITALS_INTERVAL_MS` (sampling, default
//! 10000), `OUTPOST_VITALS_REPORT_SECS` (how often a status report may carry the vitals
//! summary, default 300), `OUTPOST_VITALS_MAX_SILENCE_SECS` (send it at least this often even
//! when nothing moved, default 3600).

use std::sync::Arc;
use std::time::Duration;

use outpost_api::{
    LogRequest, NodePolicy, Vitals, VitalsHistory, VitalsPoint, VitalsRequest, ALERT_FIRING, ALERT_RESOLVED,
    MAX_VITALS_POINTS,
};
use outpost_core::alerts::{evaluate, NodeAlerts};
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, warn};

use crate::reconcile::{now_ms, Snapshot};
use crate::store::{Store, StoreError};
use crate::vitals::{to_sample, Sampler};

/// How long the vital-sign history is kept.
pub const HISTORY_MS: i64 = 24 * 3600 * 1000;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[derive(Clone, Debug)]
pub struct MonitorConfig {
    pub sample_every: Duration,
    pub report_every: Duration,
    /// Send the vitals summary at least this often even when nothing moved.
    pub max_silence_ms: i64,
}

impl MonitorConfig {
    pub fn from_env() -> Self {
        Self {
            sample_every: Duration::from_millis(env_u64("OUTPOST_VITALS_INTERVAL_MS", 10_000).max(50)),
            report_every: Duration::from_secs(env_u64("OUTPOST_VITALS_REPORT_SECS", 300)),
            max_silence_ms: env_u64("OUTPOST_VITALS_MAX_SILENCE_SECS", 3600) as i64 * 1000,
        }
    }
}

/// What the sync and status tasks share with monitoring.
#[derive(Clone)]
pub struct MonitorLink {
    pub policy: Arc<watch::Sender<NodePolicy>>,
    pub vitals: watch::Receiver<Option<Vitals>>,
    /// Notified when the outbox got new events worth sending now.
    pub outbox: Arc<Notify>,
    pub log_requests: mpsc::UnboundedSender<LogRequest>,
    /// Requests for the vitals history from sync answers, for [`vitals_request_loop`].
    pub vitals_requests: mpsc::UnboundedSender<outpost_api::VitalsRequest>,
    /// Exec sessions from sync answers, for `crate::exec`.
    pub exec: mpsc::UnboundedSender<outpost_api::exec::ExecRequest>,
    /// Prefetch hints from sync answers, for `crate::prefetch`.
    pub prefetch: mpsc::UnboundedSender<Vec<outpost_api::WorkloadSpec>>,
    pub store: Arc<Store>,
    pub report_every: Duration,
    pub max_silence_ms: i64,
}

impl MonitorLink {
    pub fn policy_hash(&self) -> String {
        self.policy.borrow().hash()
    }

    /// Persist a new policy, then hand it to the monitoring and log loops.
    pub fn set_policy(&self, p: NodePolicy) -> Result<(), StoreError> {
        if *self.policy.borrow() == p {
            return Ok(());
        }
        let json = serde_json::to_string(&p).expect("serializable");
        self.store.set_meta("alert_policy", &json)?;
        info!(sources = ?p.sources, hash = %p.hash(), "new alert policy");
        self.policy.send_replace(p);
        Ok(())
    }
}

/// The policy held in the store, or outpost's defaults.
pub fn load_policy(store: &Store) -> NodePolicy {
    store
        .meta("alert_policy")
        .ok()
        .flatten()
        .and_then(|j| serde_json::from_str(&j).ok())
        .unwrap_or_default()
}

fn load_state(store: &Store) -> NodeAlerts {
    store
        .meta("alert_state")
        .ok()
        .flatten()
        .and_then(|j| serde_json::from_str(&j).ok())
        .unwrap_or_default()
}

/// Sample, record, evaluate; until shutdown.
#[allow(clippy::too_many_arguments)]
pub async fn monitor_loop(
    store: Arc<Store>,
    data_dir: std::path::PathBuf,
    agent_id: String,
    policy: watch::Receiver<NodePolicy>,
    status: watch::Receiver<Snapshot>,
    vitals_tx: watch::Sender<Option<Vitals>>,
    outbox: Arc<Notify>,
    cfg: MonitorConfig,
    models: crate::inference::stats::Board,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut sampler = Sampler::new(&data_dir);
    let mut state = load_state(&store);
    let mut saved_minute = 0i64;
    loop {
        let now = now_ms();
        let snap = status.borrow().clone();
        let owned = crate::runtime::scan_owned(&agent_id);
        let mut v = sampler.sample(now, &owned, &snap);
        v.log_dropped_lines = store.dropped_lines();
        v.models = sampler.models(&models.readings());
        if now / 60_000 != saved_minute {
            let json = serde_json::to_string(&v).expect("serializable");
            match store.save_vitals(now, &json, now - HISTORY_MS) {
                Ok(()) => saved_minute = now / 60_000,
                // tried again with the next sample; the store reports the failure
                Err(e) => warn!(error = %e, "cannot store vital-sign history"),
            }
        }
        let before = state.clone();
        let transitions = evaluate(&policy.borrow(), &mut state, &to_sample(&v, &snap), now);
        if state != before {
            let events: Vec<_> = transitions
                .iter()
                .map(|t| {
                    (
                        t.at,
                        t.subject.clone(),
                        if t.firing { ALERT_FIRING } else { ALERT_RESOLVED },
                        format!("{}: {}", t.name, t.summary),
                    )
                })
                .collect();
            let json = serde_json::to_string(&state).expect("serializable");
            match store.record_alerts(&json, &events) {
                Ok(()) => {
                    for t in &transitions {
                        info!(alert = %t.name, subject = ?t.subject, firing = t.firing, summary = %t.summary, "node alert");
                    }
                    if !transitions.is_empty() {
                        outbox.notify_one();
                    }
                }
                Err(e) => {
                    // Not on disk: forget the transitions and evaluate again next time.
                    warn!(error = %e, "cannot record alert state; retrying");
                    state = before;
                }
            }
        }
        vitals_tx.send_replace(Some(v));
        tokio::select! {
            _ = tokio::time::sleep(cfg.sample_every) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// The stored history as an operator asked for it: the samples since `req.since`, downsampled
/// by `outpost_core::vitals::history`.
pub fn read_history(store: &Store, req: &VitalsRequest) -> VitalsHistory {
    let rows = match store.vitals_history() {
        Ok(r) => r,
        Err(e) => {
            return VitalsHistory {
                error: Some(format!("cannot read the node's vitals history: {e}")),
                ..Default::default()
            }
        }
    };
    let samples: Vec<VitalsPoint> = rows
        .iter()
        .filter_map(|j| serde_json::from_str::<Vitals>(j).ok())
        .map(|v| VitalsPoint::of(&v))
        .collect();
    let max = req.max_points.clamp(1, MAX_VITALS_POINTS) as usize;
    let from = samples.partition_point(|p| p.at < req.since);
    VitalsHistory {
        points: outpost_core::vitals::history(&samples, req.since, max),
        samples: (samples.len() - from) as u32,
        error: None,
    }
}

/// Answer the operator's vitals history requests that arrive with sync answers, over the
/// node's own link (`POST /v1/nodes/{node}/vitals/{id}`).
pub async fn vitals_request_loop(
    client: Arc<crate::sync::HubClient>,
    store: Arc<Store>,
    mut rx: mpsc::UnboundedReceiver<VitalsRequest>,
) {
    while let Some(req) = rx.recv().await {
        let (client, store) = (client.clone(), store.clone());
        tokio::spawn(async move {
            let r = req.clone();
            let answer = tokio::task::spawn_blocking(move || read_history(&store, &r))
                .await
                .unwrap_or_else(|e| VitalsHistory {
                    error: Some(format!("reading the vitals history failed: {e}")),
                    ..Default::default()
                });
            match client
                .post_json::<_, serde_json::Value>(&format!("vitals/{}", req.id), &answer)
                .await
            {
                Ok(_) => debug!(request = %req.id, points = answer.points.len(), "vitals request answered"),
                Err(e) => warn!(request = %req.id, error = %e, "cannot answer a vitals request"),
            }
        });
    }
}
