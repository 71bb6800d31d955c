//! The agent's link to the hub: desired-state long-poll, status reports, certificate renewal.
//! Everything here is optional for the node's operation: when the hub is unreachable the
//! reconciler keeps running the last persisted desired state, and this module retries with
//! `outpost_core::retry::HUB_LINK` (exponential backoff and jitter, docs/protocol.md §6).
//!
//! Several hubs (protocol 1.4): the client holds the hub endpoints the hubs advertise
//! (persisted in identity.json) and talks to one at a time. The sync loop drives the choice
//! (`outpost_core::hubs`): it starts at the node's preferred endpoint, moves to the next one
//! after a failure (a short hop while the round has untried endpoints, `HUB_LINK`'s backoff once
//! all failed in a row), and stays where it is answered. Every other exchange (status, logs,
//! pipeline records, downloads) uses the current endpoint; the status loop retries at once when
//! the endpoint changes, so what the node held back reaches the new hub without waiting out its
//! own backoff.
//!
//! Certificate renewal (docs/protocol.md §2) is driven by the sync loop: before each long-poll,
//! and when the renewal time (`outpost_core::link::renewal`: a third of the validity left)
//! arrives during one, the agent renews; a certificate that expired while the node was offline
//! is renewed the same way (the hub's renew route accepts it), so the node comes back by
//! itself. The renewed certificate is saved before it is used; until the hub has seen it used,
//! the old one keeps working, so a lost answer or a failed save never locks the node out. When
//! renewal fails for a reason retrying cannot fix, the agent logs what to do at error level.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use outpost_api::{ApiError, StatusAck, StatusReport, SyncResponse, PROTOCOL, PROTOCOL_HEADER};
use outpost_api::{StatusWithVitals, SyncAnswer};
use outpost_core::link::Renewal;
use outpost_core::retry::{self, Backoff};
use rand::Rng;
use tokio::sync::{watch, RwLock};
use tracing::{debug, error, info, warn};

use crate::identity::Identity;
use crate::reconcile::Snapshot;
use crate::store::{Desired, Store};

/// Failures talking to the hub. None of them stop the node's workloads.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("hub unreachable: {}", transport_text(.0))]
    Transport(#[from] reqwest::Error),
    #[error("hub answered {status} {code}: {message}")]
    Hub {
        status: u16,
        code: String,
        message: String,
        /// `Retry-After` of a busy hub's `503`, seconds (docs/protocol.md §6).
        retry_after: Option<u64>,
    },
    #[error("{0}")]
    Local(String),
}

impl LinkError {
    /// The hub's error code, when it answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            LinkError::Hub { code, .. } => Some(code),
            _ => None,
        }
    }

    /// How long a busy hub asked us to wait before the next try (`Retry-After`), seconds.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            LinkError::Hub { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The hub no longer knows this node: retrying quickly will not help. (An expired
    /// certificate is not fatal: the agent renews it.)
    fn is_fatal(&self) -> bool {
        matches!(self, LinkError::Hub { status: 401, code, .. } if code != CERTIFICATE_EXPIRED)
    }
}

/// The hub's code for a request made with an expired node certificate.
const CERTIFICATE_EXPIRED: &str = "certificate_expired";

/// A transport error with its whole cause chain (reqwest's own text names only the URL), and
/// what to do when the cause is this node's clock: a hub certificate "not valid yet" or
/// "expired" by the node's clock means the clock is wrong, not the hub.
pub fn transport_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = err.source();
    }
    let mut out = parts.join(": ");
    // The rustls error arrives re-wrapped by the HTTP layers (it cannot be downcast); its text
    // is stable: "invalid peer certificate: certificate not valid yet|expired: ...".
    if out.contains("certificate not valid yet") || out.contains("invalid peer certificate: certificate expired") {
        out.push_str(&format!(
            "; this node's clock reads {} (Unix seconds, UTC): if that is wrong, fix the clock (NTP, or `date -s`); the hub's certificate is fine",
            outpost_api::now_ms() / 1000
        ));
    }
    out
}

/// The status heartbeat: 1 h with ±20 % jitter (so a fleet that changed at one instant does
/// not report in lockstep ever after). Liveness comes from the held long-poll, and every
/// change, probe or gate transition and alert event is reported at once, so the heartbeat is
/// only a safety net: a shorter one costs link budget for nothing (BENCHMARKS.md, bandwidth).
pub fn heartbeat_interval() -> Duration {
    Duration::from_millis(rand::rng().random_range(2_880_000..=4_320_000))
}

/// Idle time before the agent probes its connection to the hub (docs/protocol.md §12).
fn link_keepalive() -> Duration {
    Duration::from_secs(
        std::env::var("OUTPOST_LINK_KEEPALIVE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|s| *s >= 1)
            .unwrap_or(100),
    )
}

/// How long the agent asks the hub to hold each long-poll: `OUTPOST_LONG_POLL_SECS`, default
/// [`outpost_api::AGENT_LONG_POLL_SECS`] (a change still arrives at once; a shorter hold only
/// costs link budget, e.g. behind a proxy that cuts idle requests sooner).
pub fn long_poll_secs() -> u64 {
    std::env::var("OUTPOST_LONG_POLL_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|s| *s >= 1)
        .unwrap_or(outpost_api::AGENT_LONG_POLL_SECS)
}

/// An mTLS client for one identity; rebuilt when the certificate is renewed.
pub struct HubClient {
    pub identity: RwLock<Identity>,
    http: RwLock<reqwest::Client>,
    data_dir: PathBuf,
    /// One renewal at a time.
    renewing: tokio::sync::Mutex<()>,
    /// Which hub endpoint is in use.
    link: std::sync::Mutex<Endpoints>,
    /// Bumped whenever the endpoint in use changes.
    moved: watch::Sender<u64>,
    /// The minor protocol version the hub named in its last answer (`x-outpost-protocol`; 0
    /// when it named none): from 4 on it takes zstd request bodies.
    hub_minor: std::sync::atomic::AtomicU32,
}

/// The minor version of a `1.N` protocol header; 0 for none, another major or garbage.
fn hub_minor(named: Option<&str>) -> u32 {
    named
        .and_then(|v| v.trim().split_once('.'))
        .filter(|(major, _)| *major == "1")
        .and_then(|(_, minor)| minor.parse().ok())
        .unwrap_or(0)
}

/// Status bodies at least this large go zstd-compressed to a hub that takes them (a vitals
/// summary with ten workloads is ~1.1 KB of JSON, ~0.4 KB compressed).
const COMPRESS_FROM: usize = 512;

/// The hub endpoints and the one in use.
struct Endpoints {
    list: Vec<String>,
    current: usize,
    /// Failures in a row (the sync loop's), across endpoints.
    failures: u32,
}

impl Endpoints {
    fn url(&self) -> String {
        self.list
            .get(self.current)
            .or(self.list.first())
            .cloned()
            .unwrap_or_default()
    }
}

fn build_http(id: &Identity) -> Result<reqwest::Client, LinkError> {
    let tls = outpost_pki::client_config(&id.ca_pem, Some((&id.cert_pem, &id.key_pem)))
        .map_err(|e| LinkError::Local(e.to_string()))?;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(long_poll_secs() + 30))
        // One HTTP/2 connection for the node's whole life, never dropped for being idle: the
        // pool counts an HTTP/2 connection idle from when it was last put back, even while a
        // long-poll runs on it, so any idle timeout closed it at the end of every hold and the
        // next poll paid a new TCP and TLS handshake (~2 KB a cycle, BENCHMARKS.md §5).
        // Dead connections are found by keepalive below.
        .pool_idle_timeout(None)
        // During a long hold only keepalive finds a dead hub or path (a link that went down
        // and came back: the hub has closed its end by then): probes after
        // `OUTPOST_LINK_KEEPALIVE_SECS` (100 s) idle, two unanswered 10 s apart end it, and the
        // agent polls again on a new connection. The hub counts these probes as the node's
        // sign of life and sends none of its own (`ka=` on sync, docs/protocol.md §12).
        .tcp_keepalive(link_keepalive())
        .tcp_keepalive_interval(Duration::from_secs(10).min(link_keepalive()))
        .tcp_keepalive_retries(2)
        .build()
        .map_err(|e| LinkError::Local(e.to_string()))
}

async fn check(resp: reqwest::Response) -> Result<reqwest::Response, LinkError> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status().as_u16();
    let retry_after = (status == 503)
        .then(|| resp.headers().get(reqwest::header::RETRY_AFTER))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .and_then(outpost_core::admission::parse_retry_after);
    let err: ApiError = resp.json().await.unwrap_or(ApiError {
        code: "http".into(),
        message: format!("HTTP {status}"),
        details: vec![],
    });
    Err(LinkError::Hub {
        status,
        code: err.code,
        message: err.message,
        retry_after,
    })
}

impl HubClient {
    pub fn new(identity: Identity, data_dir: PathBuf) -> Result<Self, LinkError> {
        let http = build_http(&identity)?;
        let list = identity.endpoints();
        let current = outpost_core::hubs::preferred(&identity.node, list.len());
        Ok(Self {
            identity: RwLock::new(identity),
            http: RwLock::new(http),
            data_dir,
            renewing: tokio::sync::Mutex::new(()),
            link: std::sync::Mutex::new(Endpoints {
                list,
                current,
                failures: 0,
            }),
            moved: watch::channel(0).0,
            hub_minor: std::sync::atomic::AtomicU32::new(0),
        })
    }

    fn endpoints(&self) -> std::sync::MutexGuard<'_, Endpoints> {
        self.link.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The hub endpoint in use (e.g. `https://hub-a.example.com:8443`).
    pub fn hub_url(&self) -> String {
        self.endpoints().url()
    }

    /// Every hub endpoint this node knows.
    pub fn hub_urls(&self) -> Vec<String> {
        self.endpoints().list.clone()
    }

    /// Changes whenever the endpoint in use changes.
    pub fn moved(&self) -> watch::Receiver<u64> {
        self.moved.subscribe()
    }

    /// An exchange with the current endpoint failed: move on (`outpost_core::hubs`) and say
    /// how long to wait before trying.
    pub fn link_failed(&self) -> Duration {
        let mut e = self.endpoints();
        e.failures = e.failures.saturating_add(1);
        let step = outpost_core::hubs::after_failure(
            e.list.len(),
            e.current,
            e.failures,
            crate::reconcile::now_ms(),
            rand::random(),
        );
        if step.endpoint != e.current {
            let from = e.url();
            e.current = step.endpoint;
            info!(from = %from, to = %e.url(), failures = e.failures, retry_in_ms = step.wait_ms,
                "hub endpoint failed; trying the next one");
            self.moved.send_modify(|n| *n += 1);
        }
        Duration::from_millis(step.wait_ms)
    }

    /// The current endpoint answered.
    pub fn link_ok(&self) {
        self.endpoints().failures = 0;
    }

    /// A hub sent the endpoint list: persist it (identity.json) and use it. The endpoint in use
    /// stays if the list holds it.
    pub async fn set_hubs(&self, hubs: Vec<String>) {
        if hubs.is_empty() || self.endpoints().list == hubs || self.identity.read().await.pinned {
            return;
        }
        let mut id = self.identity.write().await;
        let mut next = id.clone();
        next.hubs = hubs.clone();
        if let Err(e) = next.save(&self.data_dir) {
            // Used anyway for this run; the hub sends it again (its hash differs) on a later poll.
            warn!(error = %e, dir = %self.data_dir.display(), "cannot save the hub endpoints; using them until restart");
        }
        *id = next;
        let node = id.node.clone();
        drop(id);
        let mut e = self.endpoints();
        let before = e.url();
        e.current = outpost_core::hubs::after_new_list(Some(&before), &hubs, &node);
        e.list = hubs;
        e.failures = 0;
        info!(hubs = ?e.list, using = %e.url(), "hub endpoints updated");
        if e.url() != before {
            self.moved.send_modify(|n| *n += 1);
        }
    }

    async fn url(&self, path: &str) -> String {
        let node = self.identity.read().await.node.clone();
        format!("{}/v1/nodes/{node}/{path}", self.hub_url())
    }

    pub async fn report(&self, r: &StatusReport) -> Result<StatusAck, LinkError> {
        let url = self.url("status").await;
        let http = self.http.read().await.clone();
        let resp = http
            .post(url)
            .header(PROTOCOL_HEADER, PROTOCOL)
            .timeout(Duration::from_secs(30))
            .json(r)
            .send()
            .await?;
        Ok(check(resp).await?.json().await?)
    }

    /// One long-poll carrying the hash of the alert policy the node holds; the answer may add
    /// a new policy and log requests (`SyncAnswer`, docs/protocol.md §9).
    pub async fn sync_with(&self, generation: u64, policy_hash: &str) -> Result<Option<SyncAnswer>, LinkError> {
        let url = self.url("sync").await;
        let generation = generation.to_string();
        let wait = long_poll_secs().to_string();
        // Tell the hub how often this agent probes the connection, so it does not probe too
        // (docs/protocol.md §12); an older hub ignores it.
        let ka = link_keepalive().as_secs().to_string();
        // A pinned agent (`--hub`) asks for no list.
        let hubs = (!self.identity.read().await.pinned).then(|| outpost_api::hubs_hash(&self.hub_urls()));
        let mut query = vec![
            ("generation", generation.as_str()),
            ("policy", policy_hash),
            ("wait", wait.as_str()),
            ("ka", ka.as_str()),
        ];
        if let Some(h) = &hubs {
            query.push(("hubs", h.as_str()));
        }
        let http = self.http.read().await.clone();
        let resp = http
            .get(url)
            .query(&query)
            .header(PROTOCOL_HEADER, PROTOCOL)
            .send()
            .await?;
        self.note_hub(&resp);
        let resp = check(resp).await?;
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
            .header(PROTOCOL_HEADER, PROTOCOL)
            .timeout(Duration::from_secs(30))
            .json(body)
            .send()
            .await?;
        self.note_hub(&resp);
        Ok(check(resp).await?.json().await?)
    }

    /// Remember which protocol the hub answering now speaks (an answer without the header is
    /// from a hub older than 1.4).
    fn note_hub(&self, resp: &reqwest::Response) {
        let named = resp.headers().get(PROTOCOL_HEADER).and_then(|v| v.to_str().ok());
        self.hub_minor
            .store(hub_minor(named), std::sync::atomic::Ordering::Relaxed);
    }

    /// POST a status report: zstd-compressed when it is large and the hub takes it (1.4).
    pub async fn post_status(&self, body: &StatusWithVitals) -> Result<StatusAck, LinkError> {
        let json = serde_json::to_vec(body).map_err(|e| LinkError::Local(e.to_string()))?;
        if json.len() >= COMPRESS_FROM && self.hub_minor.load(std::sync::atomic::Ordering::Relaxed) >= 4 {
            if let Ok(packed) = zstd::bulk::compress(&json, 3) {
                return self.post_compressed("status", packed).await;
            }
        }
        self.post_json("status", body).await
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
            .header(PROTOCOL_HEADER, PROTOCOL)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::CONTENT_ENCODING, "zstd")
            .timeout(Duration::from_secs(60))
            .body(body)
            .send()
            .await?;
        self.note_hub(&resp);
        Ok(check(resp).await?.json().await?)
    }

    /// GET a hub path (e.g. `/v1/images/blobs/...`) over mTLS, optionally from a byte offset.
    /// No overall timeout: large downloads are bounded by the connect timeout and progress.
    /// POST a streamed body to `path` under the node's URL (exec output), allowed `timeout`.
    pub async fn post_stream(&self, path: &str, body: reqwest::Body, timeout: Duration) -> Result<(), LinkError> {
        let url = self.url(path).await;
        let http = self.http.read().await.clone();
        let resp = http
            .post(url)
            .header(PROTOCOL_HEADER, PROTOCOL)
            .header(reqwest::header::CONTENT_TYPE, outpost_api::exec::EXEC_MEDIA_TYPE)
            .timeout(timeout)
            .body(body)
            .send()
            .await?;
        check(resp).await?;
        Ok(())
    }

    /// GET a stream from `path` under the node's URL (exec input), allowed `timeout`.
    pub async fn get_stream(&self, path: &str, timeout: Duration) -> Result<reqwest::Response, LinkError> {
        let url = self.url(path).await;
        let http = self.http.read().await.clone();
        let resp = http
            .get(url)
            .header(PROTOCOL_HEADER, PROTOCOL)
            .timeout(timeout)
            .send()
            .await?;
        check(resp).await
    }

    pub async fn get(&self, path: &str, from: Option<u64>) -> Result<reqwest::Response, LinkError> {
        self.get_query(path, &[], from).await
    }

    /// [`HubClient::get`] with query parameters (encoded by reqwest).
    pub async fn get_query(
        &self,
        path: &str,
        query: &[(&str, &str)],
        from: Option<u64>,
    ) -> Result<reqwest::Response, LinkError> {
        let url = format!("{}{path}", self.hub_url());
        let http = self.http.read().await.clone();
        let mut req = http
            .get(url)
            .query(query)
            .header(PROTOCOL_HEADER, PROTOCOL)
            .timeout(Duration::from_secs(3600));
        if let Some(n) = from.filter(|n| *n > 0) {
            req = req.header(reqwest::header::RANGE, format!("bytes={n}-"));
        }
        check(req.send().await?).await
    }

    /// Where the node certificate stands at `now` (Unix seconds).
    pub async fn certificate(&self, now: i64) -> Result<(Renewal, i64), LinkError> {
        let cert = self.identity.read().await.cert_pem.clone();
        let (not_before, not_after) =
            outpost_pki::validity_unix(&cert).map_err(|e| LinkError::Local(format!("identity.json: {e}")))?;
        Ok((outpost_core::link::renewal(not_before, not_after, now), not_after))
    }

    /// Renew the node certificate with the same key. The new certificate is saved before it is
    /// used; if saving fails, the old one stays in use (the hub accepts it until the new one is
    /// used). Returns the new certificate's expiry (Unix seconds).
    pub async fn renew(&self) -> Result<i64, LinkError> {
        let _one_at_a_time = self.renewing.lock().await;
        let (key, node) = {
            let id = self.identity.read().await;
            (id.key_pem.clone(), id.node.clone())
        };
        let csr = outpost_pki::NodeKey::csr_for(&key, &node).map_err(|e| LinkError::Local(e.to_string()))?;
        let url = self.url("renew").await;
        let http = self.http.read().await.clone();
        let resp = http
            .post(url)
            .header(PROTOCOL_HEADER, PROTOCOL)
            .timeout(Duration::from_secs(30))
            .json(&outpost_api::RenewRequest { csr_pem: csr })
            .send()
            .await?;
        let rr: outpost_api::RenewResponse = check(resp).await?.json().await?;
        let not_after = outpost_pki::not_after_unix(&rr.cert_pem)
            .map_err(|e| LinkError::Local(format!("the hub's renewed certificate is unreadable: {e}")))?;
        let mut id = self.identity.write().await;
        let mut next = id.clone();
        next.cert_pem = rr.cert_pem;
        let http = build_http(&next)?;
        next.save(&self.data_dir).map_err(|e| {
            LinkError::Local(format!(
                "cannot save the renewed certificate in {}: {e}; the current one keeps working",
                self.data_dir.display()
            ))
        })?;
        *id = next;
        *self.http.write().await = http;
        Ok(not_after)
    }
}

/// Renewal bookkeeping for the sync loop.
#[derive(Default)]
struct CertUpkeep {
    /// Do not renew again before this (after a failure, or when this node's clock still finds
    /// a fresh certificate due), unless the hub says the certificate expired.
    retry_after: Option<std::time::Instant>,
    /// The hub said the certificate expired (its clock may differ from ours): renew now.
    forced: bool,
    /// When the last failure was logged at warn/error level.
    logged: Option<std::time::Instant>,
}

/// A failed renewal of a valid certificate is retried after this.
const RENEW_RETRY: Duration = Duration::from_secs(300);
/// A failed renewal of a certificate this node's clock finds expired is retried after this
/// (at once when the hub says it expired).
const RENEW_RETRY_EXPIRED: Duration = Duration::from_secs(30);
/// A renewal failure that needs a person is logged at most this often.
const RENEW_LOG_EVERY: Duration = Duration::from_secs(600);

fn until_secs(at: i64, now: i64) -> Duration {
    Duration::from_secs((at - now).max(1) as u64)
}

/// Renew the certificate when it is due, expired, or the hub said so. Returns how long until
/// the next renewal is due (None: unknown, the sync loop's next round decides).
async fn keep_certificate(client: &HubClient, upkeep: &mut CertUpkeep) -> Option<Duration> {
    let now = crate::reconcile::now_ms() / 1000;
    let (state, not_after) = match client.certificate(now).await {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot read the node certificate; re-join this node (`outpost agent join`)");
            return None;
        }
    };
    if !upkeep.forced {
        if let Renewal::NotYet { at } = state {
            return Some(until_secs(at, now));
        }
        if let Some(wait) = upkeep
            .retry_after
            .and_then(|t| t.checked_duration_since(std::time::Instant::now()))
        {
            return Some(wait);
        }
    }
    let expired = state == Renewal::Expired || upkeep.forced;
    if state == Renewal::Expired {
        info!(
            expired_for_secs = now - not_after,
            "the node certificate expired (the node was offline); renewing it"
        );
    }
    match client.renew().await {
        Ok(new_not_after) => {
            info!(
                expires_in_secs = new_not_after - now,
                was_expired = expired,
                "node certificate renewed"
            );
            *upkeep = CertUpkeep::default();
            match client.certificate(now).await.ok()?.0 {
                Renewal::NotYet { at } => Some(until_secs(at, now)),
                // Even the fresh certificate is due by this node's clock: the clock is off.
                // Do not renew on every poll.
                _ => {
                    warn!("this node's clock finds its fresh certificate due or expired; check the clock (NTP)");
                    upkeep.retry_after = Some(std::time::Instant::now() + RENEW_RETRY);
                    Some(RENEW_RETRY)
                }
            }
        }
        Err(e) => {
            upkeep.forced = false;
            let wait = if expired { RENEW_RETRY_EXPIRED } else { RENEW_RETRY };
            upkeep.retry_after = Some(std::time::Instant::now() + wait);
            let needs_a_person = matches!(&e, LinkError::Hub { .. } | LinkError::Local(_));
            let log_now = upkeep.logged.is_none_or(|t| t.elapsed() >= RENEW_LOG_EVERY);
            if !needs_a_person {
                // The hub is unreachable: the sync loop reports that and retries.
                debug!(error = %e, "certificate renewal: hub unreachable");
            } else if log_now {
                upkeep.logged = Some(std::time::Instant::now());
                let node = client.identity.read().await.node.clone();
                let what = match e.code() {
                    Some("unknown_node") => format!(
                        "the hub no longer knows node {node} (it was deleted, or re-joined elsewhere), so its certificate \
                         cannot be renewed. Workloads keep running from local state. To bring the node back, create a \
                         token (`outpost token create`), move identity.json and node.key out of the agent's data \
                         directory and run `outpost agent --hub URL --token T --name {node}`"
                    ),
                    _ => format!(
                        "renewing the certificate of node {node} failed; workloads keep running from local state. \
                         Check the hub's log; if this persists, re-join the node (`outpost delete node {node}` on the \
                         hub, then `outpost agent --hub URL --token T` with a fresh data directory)"
                    ),
                };
                if expired {
                    error!(error = %e, expired_for_secs = now - not_after, "{what}");
                } else {
                    warn!(error = %e, expires_in_secs = not_after - now, "{what}");
                }
            }
            Some(wait)
        }
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
    mut shutdown: watch::Receiver<bool>,
) {
    // Local save failures (a full disk) retry on their own, shorter schedule.
    let mut save_backoff = Backoff::new(retry::STATE_WRITE);
    let mut connected = false;
    let mut last_warned: Option<std::time::Instant> = None;
    let mut upkeep = CertUpkeep::default();
    loop {
        let renew_in = keep_certificate(&client, &mut upkeep).await.unwrap_or(Duration::MAX);
        let held = desired_tx.borrow().clone();
        let policy_hash = monitor.policy_hash();
        let result = tokio::select! {
            r = client.sync_with(held.generation, &policy_hash) => r,
            // Renewal is due during the long-poll: renew, then poll again.
            _ = tokio::time::sleep(renew_in.min(Duration::from_secs(86_400))), if renew_in < Duration::MAX => continue,
            _ = shutdown.changed() => return,
        };
        // Monitoring additions first: a new alert policy is persisted before it is used, log
        // requests are answered by `logs::request_loop`.
        let mut hubs: Option<Vec<String>> = None;
        let result = result.map(|answer| {
            answer.and_then(|a| {
                for r in a.log_requests {
                    let _ = monitor.log_requests.send(r);
                }
                for r in a.exec {
                    let _ = monitor.exec.send(r);
                }
                for r in a.vitals_requests {
                    let _ = monitor.vitals_requests.send(r);
                }
                if !a.prefetch.is_empty() {
                    let _ = monitor.prefetch.send(a.prefetch);
                }
                if let Some(p) = a.alert_policy {
                    if let Err(e) = monitor.set_policy(p) {
                        warn!(error = %e, "cannot persist the new alert policy; keeping the old one");
                    }
                }
                if !a.hubs.is_empty() {
                    hubs = Some(a.hubs);
                }
                let s = a.sync;
                let unchanged =
                    s.generation == held.generation && !s.full && s.upsert.is_empty() && s.remove.is_empty();
                (!unchanged).then_some(s)
            })
        });
        if let Some(h) = hubs.take() {
            client.set_hubs(h).await;
        }
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
                        save_backoff.reset();
                        None
                    }
                    Err(e) => {
                        let d = crate::retry_delay(&mut save_backoff);
                        warn!(error = %e, generation = next.generation, retry_in = ?d,
                            "cannot persist desired state; not applying it (reported to the hub)");
                        Some(d)
                    }
                }
            }
            Err(e) => {
                if e.code() == Some(CERTIFICATE_EXPIRED) {
                    upkeep.forced = true;
                }
                let d = if e.is_fatal() {
                    Duration::from_secs(60)
                } else {
                    // a busy hub's Retry-After is the least we wait (never giving up)
                    outpost_core::admission::agent_wait(client.link_failed(), e.retry_after())
                };
                // Said at warn level when the link is lost, when the hub has not been reached since
                // the agent started, and every 10 minutes while it stays unreachable.
                let due = last_warned.is_none_or(|t: std::time::Instant| t.elapsed() >= Duration::from_secs(600));
                if connected || e.is_fatal() || due {
                    let what = if connected {
                        "lost the hub; workloads keep running from local state"
                    } else {
                        "cannot reach the hub; workloads keep running from local state"
                    };
                    warn!(error = %e, retry_in = ?d, "{what}");
                    last_warned = Some(std::time::Instant::now());
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
                    info!(hub = %client.hub_url(), "connected to hub");
                }
                connected = true;
                client.link_ok();
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
/// the vitals summary when it is due, and otherwise only a heartbeat ([`heartbeat_interval`]);
/// a wake-up with nothing to say sends nothing (`outpost_core::link::status_due`).
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
    let mut backoff = Backoff::new(retry::HUB_LINK);
    // The node conditions the hub has (store write failures, kept in memory): sent when they
    // change and with every full report.
    let mut conditions_sent: Option<Vec<outpost_api::NodeCondition>> = None;
    // When the hub last acknowledged a report, the generation it carried, and the heartbeat
    // drawn for the next quiet stretch.
    let mut last_ack = std::time::Instant::now();
    let mut generation_sent: Option<u64> = None;
    let mut heartbeat = heartbeat_interval();
    let mut moved = client.moved();
    loop {
        let snap = status_rx.borrow_and_update().clone();
        let events = store.events_to_send(500).unwrap_or_default();
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
            agent_version: crate::selfupdate::version(),
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
        let now_conditions = store.conditions();
        let conditions =
            (acked.is_none() || conditions_sent.as_ref() != Some(&now_conditions)).then_some(now_conditions);
        let pending = outpost_core::link::PendingStatus {
            needs_full: acked.is_none(),
            changes: !report.workloads.is_empty()
                || !report.removed.is_empty()
                || !report.events.is_empty()
                || conditions.is_some()
                || generation_sent != Some(report.generation),
            vitals: vitals.is_some(),
        };
        let since_ack = last_ack.elapsed();
        if !outpost_core::link::status_due(pending, since_ack.as_millis() as i64, heartbeat.as_millis() as i64) {
            // nothing to say: wait for a change, the vitals pace or the heartbeat
            let wait = heartbeat
                .saturating_sub(since_ack)
                .min(monitor.report_every.max(Duration::from_secs(1)));
            tokio::select! {
                r = status_rx.changed() => {
                    if r.is_err() { return; }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                _ = monitor.outbox.notified() => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
            continue;
        }
        let with_vitals = StatusWithVitals {
            vitals,
            report,
            conditions,
        };
        let wait = match client.post_status(&with_vitals).await {
            Ok(ack) => {
                if let Some(v) = &with_vitals.vitals {
                    vitals_sent = Some((std::time::Instant::now(), v.clone()));
                }
                let report = &with_vitals.report;
                // the first answer after a new state database confirms its event sequence
                let more = store.ack_events(ack.events_acked).unwrap_or(false);
                if let Some(c) = &with_vitals.conditions {
                    conditions_sent = Some(c.clone());
                }
                acked = Some(snap);
                generation_sent = Some(report.generation);
                last_ack = std::time::Instant::now();
                heartbeat = heartbeat_interval();
                backoff.reset();
                crate::selfupdate::on_reported(&store);
                // more queued events than one report carries: send again at once
                if report.events.len() >= 500 || more {
                    continue;
                }
                heartbeat_interval()
            }
            Err(e) => {
                debug!(error = %e, "status report failed; will resend in full");
                acked = None;
                outpost_core::admission::agent_wait(crate::retry_delay(&mut backoff), e.retry_after())
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
            // The sync loop moved to another hub: resend there now.
            _ = moved.changed(), if failed => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::hub_minor;

    #[test]
    fn the_hubs_protocol_header_gives_its_minor_version() {
        for (named, want) in [
            (Some("1.4"), 4),
            (Some(" 1.12 "), 12),
            (Some("1.3"), 3),
            (Some("2.0"), 0),
            (Some("1"), 0),
            (Some("x.y"), 0),
            (None, 0),
        ] {
            assert_eq!(hub_minor(named), want, "{named:?}");
        }
    }
}
