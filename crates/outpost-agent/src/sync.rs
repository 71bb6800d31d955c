//! The agent's link to the hub: desired-state long-poll, status reports, certificate renewal.
//! Everything here is optional for the node's operation: when the hub is unreachable the
//! reconciler keeps running the last persisted desired state, and this module retries with
//! exponential backoff and jitter (docs/protocol.md §6).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use outpost_api::{ApiError, StatusAck, StatusReport, SyncResponse, PROTOCOL_HEADER, PROTOCOL_VERSION};
use outpost_api::{StatusWithVitals, SyncAnswer};
use rand::Rng;
use tokio::sync::{watch, RwLock};
use tracing::{debug, info, warn};

use crate::identity::Identity;
use crate::reconcile::Snapshot;
use crate::store::{Desired, Store};

/// Failures talking to the hub. None of them stop the node's workloads.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("hub unreachable: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("hub answered {status} {code}: {message}")]
    Hub { status: u16, code: String, message: String },
    #[error("{0}")]
    Local(String),
}

impl LinkError {
    /// The hub no longer knows this node: retrying quickly will not help.
    fn is_fatal(&self) -> bool {
        matches!(self, LinkError::Hub { status: 401, .. })
    }
}

/// Exponential backoff with jitter: 1 s doubling to 30 s, plus up to 50 %.
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    pub fn new() -> Self {
        Self { attempt: 0 }
    }
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
    /// Failures since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
    pub fn next_delay(&mut self) -> Duration {
        let base = (1000u64 << self.attempt.min(5)).min(30_000);
        self.attempt += 1;
        let jitter = rand::rng().random_range(0..=base / 2);
        Duration::from_millis(base + jitter)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// The status heartbeat: 5 min with ±20 % jitter (so a fleet that changed at one instant does
/// not report in lockstep ever after). Liveness comes from the long-poll, and every change,
/// probe or gate transition and alert event is reported at once, so the heartbeat is only a
/// safety net: a shorter one costs link budget for nothing (BENCHMARKS.md, bandwidth).
pub fn heartbeat_interval() -> Duration {
    Duration::from_millis(rand::rng().random_range(240_000..=360_000))
}

/// An mTLS client for one identity; rebuilt when the certificate is renewed.
pub struct HubClient {
    pub identity: RwLock<Identity>,
    http: RwLock<reqwest::Client>,
    data_dir: PathBuf,
}

fn build_http(id: &Identity) -> Result<reqwest::Client, LinkError> {
    let tls = outpost_pki::client_config(&id.ca_pem, Some((&id.cert_pem, &id.key_pem)))
        .map_err(|e| LinkError::Local(e.to_string()))?;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(outpost_api::LONG_POLL_SECS + 30))
        .pool_idle_timeout(Duration::from_secs(120))
        .tcp_keepalive(Duration::from_secs(60))
        .build()
        .map_err(|e| LinkError::Local(e.to_string()))
}

async fn check(resp: reqwest::Response) -> Result<reqwest::Response, LinkError> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status().as_u16();
    let err: ApiError = resp.json().await.unwrap_or(ApiError {
        code: "http".into(),
        message: format!("HTTP {status}"),
        details: vec![],
    });
    Err(LinkError::Hub {
        status,
        code: err.code,
        message: err.message,
    })
}

impl HubClient {
    pub fn new(identity: Identity, data_dir: PathBuf) -> Result<Self, LinkError> {
        let http = build_http(&identity)?;
        Ok(Self {
            identity: RwLock::new(identity),
            http: RwLock::new(http),
            data_dir,
        })
    }

    async fn url(&self, path: &str) -> String {
        let id = self.identity.read().await;
        format!("{}/v1/nodes/{}/{path}", id.hub, id.node)
    }

    pub async fn report(&self, r: &StatusReport) -> Result<StatusAck, LinkError> {
        let url = self.url("status").await;
        let http = self.http.read().await.clone();
        let resp = http
            .post(url)
            .header(PROTOCOL_HEADER, PROTOCOL_VERSION.to_string())
            .timeout(Duration::from_secs(30))
            .json(r)
            .send()
            .await?;
        Ok(check(resp).await?.json().await?)
    }

    /// One long-poll carrying the hash of the alert policy the node holds; the answer may add
    /// a new policy and log requests (`SyncAnswer`, docs/protocol.md §9).
    pub async fn sync_with(
        &self,
        generation: u64,
        policy_hash: &str,
        pipelines_hash: Option<&str>,
    ) -> Result<Option<SyncAnswer>, LinkError> {
        let mut url = format!(
            "{}?generation={generation}&policy={policy_hash}",
            self.url("sync").await
        );
        if let Some(h) = pipelines_hash {
            url.push_str(&format!("&pipelines={h}"));
        }
        let http = self.http.read().await.clone();
        let resp = check(
            http.get(url)
                .header(PROTOCOL_HEADER, PROTOCOL_VERSION.to_string())
                .send()
                .await?,
        )
        .await?;
        if resp.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(None);
        }
        Ok(Some(resp.json().await?))
    }

    /// POST JSON to one of this node's routes (`/v1/nodes/<me>/<path>`).
    pub async fn post_json<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, LinkError> {
        let url = self.url(path).await;
        let http = self.http.read().await.clone();
        let resp = http
            .post(url)
            .header(PROTOCOL_HEADER, PROTOCOL_VERSION.to_string())
            .timeout(Duration::from_secs(30))
            .json(body)
            .send()
            .await?;
        Ok(check(resp).await?.json().await?)
    }

    /// POST a zstd-compressed JSON body to one of this node's routes (pipeline records).
    pub async fn post_compressed<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: Vec<u8>,
    ) -> Result<T, LinkError> {
        let url = self.url(path).await;
        let http = self.http.read().await.clone();
        let resp = http
            .post(url)
            .header(PROTOCOL_HEADER, PROTOCOL_VERSION.to_string())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::CONTENT_ENCODING, "zstd")
            .timeout(Duration::from_secs(60))
            .body(body)
            .send()
            .await?;
        Ok(check(resp).await?.json().await?)
    }

    /// GET a hub path (e.g. `/v1/images/blobs/...`) over mTLS, optionally from a byte offset.
    /// No overall timeout: large downloads are bounded by the connect timeout and progress.
    pub async fn get(&self, path: &str, from: Option<u64>) -> Result<reqwest::Response, LinkError> {
        let url = format!("{}{path}", self.identity.read().await.hub);
        let http = self.http.read().await.clone();
        let mut req = http
            .get(url)
            .header(PROTOCOL_HEADER, PROTOCOL_VERSION.to_string())
            .timeout(Duration::from_secs(3600));
        if let Some(n) = from.filter(|n| *n > 0) {
            req = req.header(reqwest::header::RANGE, format!("bytes={n}-"));
        }
        check(req.send().await?).await
    }

    /// Renew the node certificate when less than a third of its validity is left.
    pub async fn renew_if_due(&self) -> Result<bool, LinkError> {
        let (cert, key, node) = {
            let id = self.identity.read().await;
            (id.cert_pem.clone(), id.key_pem.clone(), id.node.clone())
        };
        let expires = outpost_pki::not_after_unix(&cert).map_err(|e| LinkError::Local(e.to_string()))?;
        let now = crate::reconcile::now_ms() / 1000;
        if expires - now > outpost_pki::NODE_CERT_DAYS * 86400 / 3 {
            return Ok(false);
        }
        let csr = outpost_pki::NodeKey::csr_for(&key, &node).map_err(|e| LinkError::Local(e.to_string()))?;
        let url = self.url("renew").await;
        let http = self.http.read().await.clone();
        let resp = http
            .post(url)
            .header(PROTOCOL_HEADER, PROTOCOL_VERSION.to_string())
            .json(&outpost_api::RenewRequest { csr_pem: csr })
            .send()
            .await?;
        let rr: outpost_api::RenewResponse = check(resp).await?.json().await?;
        let mut id = self.identity.write().await;
        id.cert_pem = rr.cert_pem;
        id.save(&self.data_dir)
            .map_err(|e| LinkError::Local(format!("cannot save renewed certificate: {e}")))?;
        *self.http.write().await = build_http(&id)?;
        info!(node = %id.node, "node certificate renewed");
        Ok(true)
    }
}

/// Apply a sync answer to the held desired state.
pub fn apply_sync(held: &Desired, r: SyncResponse) -> Desired {
    let mut workloads = if r.full {
        BTreeMap::new()
    } else {
        held.workloads.clone()
    };
    for k in &r.remove {
        workloads.remove(k);
    }
    for w in r.upsert {
        workloads.insert(w.key.clone(), w);
    }
    Desired {
        generation: r.generation,
        workloads,
    }
}

/// Long-poll loop: persist every new desired state, then hand it to the reconciler.
pub async fn sync_loop(
    client: Arc<HubClient>,
    store: Arc<Store>,
    desired_tx: watch::Sender<Arc<Desired>>,
    monitor: crate::alerts::MonitorLink,
    pipelines: Option<crate::pipeline::SyncLink>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new();
    let mut connected = false;
    loop {
        let held = desired_tx.borrow().clone();
        let policy_hash = monitor.policy_hash();
        let pipelines_hash = pipelines.as_ref().map(|p| p.hash());
        let result = tokio::select! {
            r = client.sync_with(held.generation, &policy_hash, pipelines_hash.as_deref()) => r,
            _ = shutdown.changed() => return,
        };
        // Monitoring additions first: a new alert policy is persisted before it is used, log
        // requests are answered by `logs::request_loop`.
        let result = result.map(|answer| {
            answer.and_then(|a| {
                for r in a.log_requests {
                    let _ = monitor.log_requests.send(r);
                }
                // Pipelines are persisted before they run (pipeline::SyncLink::set).
                if let (Some(p), Some(link)) = (a.pipelines, &pipelines) {
                    if let Err(e) = link.set(p) {
                        warn!(error = %e, "cannot persist the new pipelines; keeping the old ones");
                    }
                }
                if let Some(p) = a.alert_policy {
                    if let Err(e) = monitor.set_policy(p) {
                        warn!(error = %e, "cannot persist the new alert policy; keeping the old one");
                    }
                }
                let s = a.sync;
                let unchanged =
                    s.generation == held.generation && !s.full && s.upsert.is_empty() && s.remove.is_empty();
                (!unchanged).then_some(s)
            })
        });
        let delay = match result {
            Ok(None) => None,
            Ok(Some(resp)) => {
                let next = apply_sync(&held, resp);
                match store.save_desired(&next) {
                    Ok(()) => {
                        info!(
                            generation = next.generation,
                            workloads = next.workloads.len(),
                            "new desired state"
                        );
                        desired_tx.send_replace(Arc::new(next));
                        None
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot persist desired state; not applying it");
                        Some(backoff.next_delay())
                    }
                }
            }
            Err(e) => {
                let d = if e.is_fatal() {
                    Duration::from_secs(60)
                } else {
                    backoff.next_delay()
                };
                if connected || e.is_fatal() {
                    warn!(error = %e, retry_in = ?d, "lost the hub; workloads keep running from local state");
                } else {
                    debug!(error = %e, retry_in = ?d, "hub still unreachable");
                }
                connected = false;
                Some(d)
            }
        };
        match delay {
            None => {
                if !connected {
                    info!("connected to hub");
                }
                connected = true;
                backoff.reset();
            }
            Some(d) => {
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
}

/// Status reporter: sends what changed (full after start and after failures), the event outbox,
/// and a heartbeat every 60 s.
pub async fn status_loop(
    client: Arc<HubClient>,
    store: Arc<Store>,
    mut status_rx: watch::Receiver<Snapshot>,
    desired_rx: watch::Receiver<Arc<Desired>>,
    started: std::time::Instant,
    monitor: crate::alerts::MonitorLink,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut acked: Option<Snapshot> = None;
    // The vitals summary last delivered, and when: it rides on a report at most every
    // `report_every`, and only when it moved enough or went stale (see
    // `outpost_core::alerts::vitals_worth_sending`).
    let mut vitals_sent: Option<(std::time::Instant, outpost_api::Vitals)> = None;
    let mut backoff = Backoff::new();
    let mut last_renew_check: Option<std::time::Instant> = None;
    loop {
        let snap = status_rx.borrow_and_update().clone();
        let events = store.pending_events(500).unwrap_or_default();
        let (workloads, removed, full) = match &acked {
            None => (snap.values().cloned().collect(), Vec::new(), true),
            Some(prev) => (
                snap.values()
                    .filter(|s| prev.get(&s.key) != Some(*s))
                    .cloned()
                    .collect(),
                prev.keys().filter(|k| !snap.contains_key(*k)).cloned().collect(),
                false,
            ),
        };
        let report = StatusReport {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_secs: started.elapsed().as_secs(),
            generation: desired_rx.borrow().generation,
            full,
            workloads,
            removed,
            events,
        };
        let current = monitor.vitals.borrow().clone();
        let vitals = current.filter(|v| match &vitals_sent {
            None => true,
            Some((t, last)) => {
                t.elapsed() >= monitor.report_every
                    && outpost_core::alerts::vitals_worth_sending(Some(last), v, monitor.max_silence_ms)
            }
        });
        let with_vitals = StatusWithVitals { vitals, report };
        let wait = match client.post_json::<_, StatusAck>("status", &with_vitals).await {
            Ok(ack) => {
                if let Some(v) = &with_vitals.vitals {
                    vitals_sent = Some((std::time::Instant::now(), v.clone()));
                }
                let report = &with_vitals.report;
                if ack.events_acked > 0 {
                    let _ = store.ack_events(ack.events_acked);
                }
                acked = Some(snap);
                backoff.reset();
                if last_renew_check.is_none_or(|t| t.elapsed() > Duration::from_secs(3600)) {
                    last_renew_check = Some(std::time::Instant::now());
                    if let Err(e) = client.renew_if_due().await {
                        warn!(error = %e, "certificate renewal failed; will retry in an hour");
                    }
                }
                // more queued events than one report carries: send again at once
                if report.events.len() >= 500 {
                    continue;
                }
                heartbeat_interval()
            }
            Err(e) => {
                debug!(error = %e, "status report failed; will resend in full");
                acked = None;
                backoff.next_delay()
            }
        };
        let failed = acked.is_none();
        tokio::select! {
            r = status_rx.changed(), if !failed => {
                if r.is_err() { return; }
                // debounce bursts of changes
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            _ = monitor.outbox.notified(), if !failed => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            _ = tokio::time::sleep(wait.min(monitor.report_every.max(Duration::from_secs(1)))) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let mut b = Backoff::new();
        let d: Vec<u64> = (0..8).map(|_| b.next_delay().as_millis() as u64).collect();
        assert!((1000..=1500).contains(&d[0]), "{d:?}");
        assert!((2000..=3000).contains(&d[1]), "{d:?}");
        assert!(d[7] >= 30_000 && d[7] <= 45_000, "{d:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(1500));
    }
}
