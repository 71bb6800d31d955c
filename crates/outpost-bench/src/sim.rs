//! Simulated agents that behave like today's agent on the wire (docs/protocol.md §4, §5, §12):
//! one HTTP/2 connection per agent for its whole life (ALPN `h2` over rustls, mTLS with its own
//! node certificate), on which the sync long-poll (`wait=3600&ka=100`) and the status reports
//! are multiplexed; the socket probes itself with TCP keepalive like the agent's (100 s idle,
//! 10 s apart, 2 retries); status only on change (a delta after a new generation, 250 ms
//! debounce) plus an hourly heartbeat +-20 %; reconnects with `outpost_core::retry::HUB_LINK`;
//! the real protocol header value (`outpost_api::PROTOCOL`).
//!
//! A [`Sim`] holds the agents of one process. `bench fleet` runs several such processes
//! (shards, [`crate::shard`]) because this machine caps a process at 20,000 descriptors.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use outpost_api::{
    JoinRequest, JoinResponse, JoinToken, StatusReport, SyncResponse, WorkloadStatus, PROTOCOL, PROTOCOL_HEADER,
};
use rustls_pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::net::TcpSocket;
use tokio::sync::{Notify, Semaphore};
use tokio_rustls::TlsConnector;

/// The agent's link settings the simulator copies (docs/protocol.md §12).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LinkModel {
    /// `wait=` on every sync: how long the hub holds the long-poll (the agent asks 3600 s).
    pub wait_secs: u64,
    /// TCP keepalive idle time, announced as `ka=` (the agent's 100 s).
    pub ka_secs: u64,
    /// Heartbeat report period, +-20 % jitter (the agent's hourly heartbeat).
    pub heartbeat_secs: u64,
}

impl Default for LinkModel {
    fn default() -> Self {
        LinkModel {
            wait_secs: outpost_api::AGENT_LONG_POLL_SECS,
            ka_secs: 100,
            heartbeat_secs: 3600,
        }
    }
}

impl LinkModel {
    /// The socket's keepalive: probes after `ka_secs` idle, 10 s apart (at most the idle
    /// time), two unanswered ones end the connection: what the agent sets through reqwest.
    pub fn keepalive(&self) -> socket2::TcpKeepalive {
        let idle = Duration::from_secs(self.ka_secs.max(1));
        socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(Duration::from_secs(10).min(idle))
            .with_retries(2)
    }

    /// The next heartbeat delay for a uniform `draw` in [0, 1): the period +-20 %.
    pub fn heartbeat(&self, draw: f64) -> Duration {
        Duration::from_secs(self.heartbeat_secs).mul_f64(0.8 + 0.4 * draw.clamp(0.0, 1.0))
    }

    /// The sync query after `generation`.
    pub fn sync_query(&self, generation: u64) -> Vec<(&'static str, String)> {
        vec![
            ("generation", generation.to_string()),
            ("wait", self.wait_secs.to_string()),
            ("ka", self.ka_secs.to_string()),
        ]
    }
}

/// Source address of agent `local` (0-based within its shard) of shard `shard`:
/// 127.(10+shard).y.z, 250 agents per /24, so a shard of 15,000 agents uses 60 of them and
/// ephemeral ports never run out.
pub fn source_addr(shard: u32, local: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        127,
        (10 + shard).min(254) as u8,
        ((local / 250) % 250) as u8,
        (local % 250 + 1) as u8,
    )
}

/// Milliseconds since the Unix epoch (shared by every shard process on the machine, so the
/// parent can compare times across processes).
pub fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Join,
    JoinErr,
    /// A TLS connection (with ALPN h2) established.
    Connect,
    ConnectErr,
    /// First sync of a new agent (generation 0): answered at once.
    SyncFirst,
    /// A held long-poll answered by a change.
    SyncChange,
    /// A long-poll that timed out with 204.
    Sync204,
    Status,
    SyncErr,
    StatusErr,
    /// A join, sync or status answered `503` + `Retry-After` by a busy hub (admission
    /// control); the agent waits at least that long.
    Busy,
}

struct Sample {
    kind: Kind,
    at_ms: f64,
    lat_ms: f64,
}

/// One hub endpoint the agents dial.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub base: String,
    pub addr: SocketAddr,
    pub server_name: ServerName<'static>,
}

impl Endpoint {
    pub async fn parse(url: &str) -> Result<Endpoint> {
        let u = url::Url::parse(url).with_context(|| format!("hub URL {url:?} is not a URL"))?;
        let host = u
            .host_str()
            .context("hub URL has no host")?
            .trim_matches(['[', ']'])
            .to_string();
        let port = u.port_or_known_default().unwrap_or(443);
        let addr = tokio::net::lookup_host((host.as_str(), port))
            .await?
            .find(|a| a.is_ipv4())
            .with_context(|| format!("{host} has no IPv4 address"))?;
        let server_name = ServerName::try_from(host.clone()).context("hub host is not a TLS server name")?;
        Ok(Endpoint {
            base: url.trim_end_matches('/').to_string(),
            addr,
            server_name,
        })
    }
}

type H2 = SendRequest<Full<Bytes>>;

pub struct SimAgent {
    pub name: String,
    hub: Endpoint,
    tls: TlsConnector,
    src: Ipv4Addr,
    pub generation: AtomicU64,
    /// Unix ms of the last sync answer with a new generation.
    pub synced_at: Mutex<f64>,
    /// Unix ms of the last connection established (0: never).
    pub connected_at: Mutex<f64>,
    /// Unix ms of the last acknowledged status report (0: never).
    pub reported_at: Mutex<f64>,
    /// key -> (revision, hash) of the desired state held.
    pub workloads: Mutex<BTreeMap<String, (u64, String)>>,
    changed: Notify,
    /// The one HTTP/2 connection, shared by the sync and status loops.
    link: tokio::sync::Mutex<Option<H2>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct Sim {
    pub model: LinkModel,
    samples: Mutex<Vec<Sample>>,
    pub stop: AtomicBool,
}

impl Sim {
    pub fn new(model: LinkModel) -> Arc<Sim> {
        Arc::new(Sim {
            model,
            samples: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        })
    }

    fn record(&self, kind: Kind, started: Instant) {
        let s = Sample {
            kind,
            at_ms: unix_ms(),
            lat_ms: started.elapsed().as_secs_f64() * 1000.0,
        };
        lock(&self.samples).push(s);
    }

    /// Latencies (ms) of `kind` recorded in [from, to) (Unix ms).
    pub fn latencies(&self, kind: Kind, from: f64, to: f64) -> Vec<f64> {
        lock(&self.samples)
            .iter()
            .filter(|s| s.kind == kind && s.at_ms >= from && s.at_ms < to)
            .map(|s| s.lat_ms)
            .collect()
    }

    /// Samples per kind recorded in [from, to).
    pub fn counts(&self, from: f64, to: f64) -> BTreeMap<Kind, usize> {
        let mut m = BTreeMap::new();
        for s in lock(&self.samples).iter().filter(|s| s.at_ms >= from && s.at_ms < to) {
            *m.entry(s.kind).or_insert(0) += 1;
        }
        m
    }

    /// Start the sync and status loops of a joined agent.
    pub fn run(self: &Arc<Sim>, a: Arc<SimAgent>) {
        tokio::spawn(sync_loop(self.clone(), a.clone()));
        tokio::spawn(status_loop(self.clone(), a));
    }
}

/// The agent's one connection: reused while open, otherwise dialled again (TCP with the
/// agent's keepalive, TLS with ALPN h2, an HTTP/2 handshake). Both loops share it, so a
/// reconnect is one connection whichever loop noticed first.
async fn link(s: &Sim, a: &SimAgent) -> Option<H2> {
    let mut g = a.link.lock().await;
    if let Some(c) = g.as_ref() {
        if !c.is_closed() {
            return Some(c.clone());
        }
    }
    *g = None;
    let t = Instant::now();
    match tokio::time::timeout(Duration::from_secs(10), dial(s, a)).await {
        Ok(Ok(c)) => {
            s.record(Kind::Connect, t);
            *lock(&a.connected_at) = unix_ms();
            *g = Some(c.clone());
            Some(c)
        }
        _ => {
            s.record(Kind::ConnectErr, t);
            None
        }
    }
}

async fn dial(s: &Sim, a: &SimAgent) -> Result<H2> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::from((a.src, 0)))?;
    socket2::SockRef::from(&sock).set_tcp_keepalive(&s.model.keepalive())?;
    let tcp = sock.connect(a.hub.addr).await?;
    tcp.set_nodelay(true)?;
    let tls = a.tls.connect(a.hub.server_name.clone(), tcp).await?;
    if tls.get_ref().1.alpn_protocol() != Some(&b"h2"[..]) {
        bail!("the hub did not negotiate HTTP/2 (ALPN h2)");
    }
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tls))
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// An answer: status, body, and `Retry-After` (seconds) when a busy hub sent one.
type Answer = (u16, Bytes, Option<u64>);

async fn request(mut send: H2, method: &str, uri: String, body: Vec<u8>) -> Result<Answer> {
    send.ready().await?;
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(uri)
        .header(PROTOCOL_HEADER, PROTOCOL);
    if !body.is_empty() {
        req = req.header("content-type", "application/json");
    }
    let resp = send.send_request(req.body(Full::new(Bytes::from(body)))?).await?;
    let status = resp.status().as_u16();
    let retry_after = retry_after(status, resp.headers());
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body, retry_after))
}

/// A `503`'s `Retry-After`, as the agent reads it.
fn retry_after(status: u16, headers: &hyper::HeaderMap) -> Option<u64> {
    (status == 503)
        .then(|| headers.get(hyper::header::RETRY_AFTER))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .and_then(outpost_core::admission::parse_retry_after)
}

/// `/v1/nodes/<node>/<route>?<query>`, each part encoded by the `url` crate.
pub fn node_path(node: &str, route: &str, query: &[(&str, &str)]) -> String {
    let mut u = url::Url::parse("https://hub/").expect("static URL");
    u.path_segments_mut()
        .expect("https URLs have a path")
        .extend(["v1", "nodes", node, route]);
    if !query.is_empty() {
        u.query_pairs_mut().extend_pairs(query);
    }
    u[url::Position::BeforePath..].to_string()
}

/// The agent's reconnect delay (`outpost_core::retry::HUB_LINK`).
fn backoff(attempt: &mut u32) -> Duration {
    let d = outpost_core::retry::HUB_LINK.delay_ms(*attempt, rand::random());
    *attempt = attempt.saturating_add(1);
    Duration::from_millis(d)
}

async fn sync_loop(s: Arc<Sim>, a: Arc<SimAgent>) {
    let mut attempt = 0u32;
    while !s.stop.load(Ordering::Relaxed) {
        let Some(c) = link(&s, &a).await else {
            tokio::time::sleep(backoff(&mut attempt)).await;
            continue;
        };
        let g = a.generation.load(Ordering::Relaxed);
        let q = s.model.sync_query(g);
        let q: Vec<(&str, &str)> = q.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let uri = format!("{}{}", a.hub.base, node_path(&a.name, "sync", &q));
        let t = Instant::now();
        let limit = Duration::from_secs(s.model.wait_secs + 30);
        match tokio::time::timeout(limit, request(c, "GET", uri, Vec::new())).await {
            Ok(Ok((200, body, _))) => match serde_json::from_slice::<SyncResponse>(&body) {
                Ok(resp) => {
                    {
                        let mut w = lock(&a.workloads);
                        if resp.full {
                            w.clear();
                        }
                        for k in &resp.remove {
                            w.remove(k);
                        }
                        for u in &resp.upsert {
                            w.insert(u.key.clone(), (u.revision, u.hash.clone()));
                        }
                    }
                    *lock(&a.synced_at) = unix_ms();
                    a.generation.store(resp.generation, Ordering::Relaxed);
                    s.record(if g == 0 { Kind::SyncFirst } else { Kind::SyncChange }, t);
                    a.changed.notify_one();
                    attempt = 0;
                }
                Err(_) => {
                    s.record(Kind::SyncErr, t);
                    tokio::time::sleep(backoff(&mut attempt)).await;
                }
            },
            Ok(Ok((204, _, _))) => {
                s.record(Kind::Sync204, t);
                attempt = 0;
            }
            Ok(Ok((503, _, Some(n)))) => {
                s.record(Kind::Busy, t);
                let wait = outpost_core::admission::agent_wait(backoff(&mut attempt), Some(n));
                tokio::time::sleep(wait).await;
            }
            _ => {
                s.record(Kind::SyncErr, t);
                tokio::time::sleep(backoff(&mut attempt)).await;
            }
        }
    }
}

/// A healthy workload's status, with its update gate passed (a simulated node passes its gate
/// at once, so fleet rollouts move on as with healthy real agents). Built from JSON so fields
/// added to the protocol later (all optional, docs/protocol.md §8) take their defaults.
fn running(key: &str, rev: u64, hash: &str) -> WorkloadStatus {
    let v = serde_json::json!({
        "key": key, "revision": rev, "hash": hash, "phase": "Running", "ready": true,
        "containers": [{"name": "main", "phase": "Running", "pid": 4242, "restarts": 0,
                        "started_at": 0, "ready": true}],
        "rollout": {"state": "Complete", "target_revision": rev, "target_hash": hash,
                    "good_revision": rev, "reason": null, "since": 0},
    });
    serde_json::from_value(v).expect("a Running WorkloadStatus is valid protocol JSON")
}

/// The report to send when the agent holds `now` and the hub acknowledged `acked` (`None`:
/// nothing yet, or the last report failed: a full report), or `None` when there is nothing
/// to say and no heartbeat is due.
pub fn next_report(
    now: &BTreeMap<String, (u64, String)>,
    acked: Option<&BTreeMap<String, (u64, String)>>,
    heartbeat_due: bool,
) -> Option<(Vec<WorkloadStatus>, Vec<String>, bool)> {
    match acked {
        None => Some((now.iter().map(|(k, (r, h))| running(k, *r, h)).collect(), vec![], true)),
        Some(prev) => {
            let changed: Vec<WorkloadStatus> = now
                .iter()
                .filter(|(k, v)| prev.get(*k) != Some(*v))
                .map(|(k, (r, h))| running(k, *r, h))
                .collect();
            let removed: Vec<String> = prev.keys().filter(|k| !now.contains_key(*k)).cloned().collect();
            (heartbeat_due || !changed.is_empty() || !removed.is_empty()).then_some((changed, removed, false))
        }
    }
}

async fn status_loop(s: Arc<Sim>, a: Arc<SimAgent>) {
    let mut attempt = 0u32;
    let mut acked: Option<BTreeMap<String, (u64, String)>> = None;
    let started = Instant::now();
    let mut last_ok = Instant::now();
    let mut heartbeat = s.model.heartbeat(rand::random());
    // like the real agent, the first report goes out at start (here: once the first sync landed)
    let _ = tokio::time::timeout(Duration::from_secs(30), a.changed.notified()).await;
    while !s.stop.load(Ordering::Relaxed) {
        let now = lock(&a.workloads).clone();
        let due = last_ok.elapsed() >= heartbeat;
        let mut ok = true;
        let mut busy = None;
        if let Some((workloads, removed, full)) = next_report(&now, acked.as_ref(), due) {
            let report = StatusReport {
                agent_version: "sim".into(),
                uptime_secs: started.elapsed().as_secs(),
                generation: a.generation.load(Ordering::Relaxed),
                full,
                workloads,
                removed,
                events: vec![],
            };
            let body = serde_json::to_vec(&report).unwrap_or_default();
            let uri = format!("{}{}", a.hub.base, node_path(&a.name, "status", &[]));
            ok = false;
            if let Some(c) = link(&s, &a).await {
                let t = Instant::now();
                match tokio::time::timeout(Duration::from_secs(30), request(c, "POST", uri, body)).await {
                    Ok(Ok((200, _, _))) => {
                        s.record(Kind::Status, t);
                        ok = true;
                    }
                    Ok(Ok((503, _, Some(n)))) => {
                        s.record(Kind::Busy, t);
                        busy = Some(n);
                    }
                    _ => s.record(Kind::StatusErr, t),
                }
            }
            if ok {
                acked = Some(now);
                attempt = 0;
                last_ok = Instant::now();
                heartbeat = s.model.heartbeat(rand::random());
                *lock(&a.reported_at) = unix_ms();
            } else {
                acked = None;
            }
        }
        let wait = if ok {
            heartbeat.saturating_sub(last_ok.elapsed())
        } else {
            outpost_core::admission::agent_wait(backoff(&mut attempt), busy)
        };
        tokio::select! {
            _ = a.changed.notified(), if ok => tokio::time::sleep(Duration::from_millis(250)).await,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Joins agents through `POST /v1/join` with a shared token.
pub struct Joiner {
    http: reqwest::Client,
    hubs: Vec<Endpoint>,
    token: JoinToken,
    ca_pem: String,
    sem: Semaphore,
    /// Joins answered `503` + `Retry-After` (each retried after it).
    pub busy: AtomicU64,
}

impl Joiner {
    pub fn new(hubs: Vec<Endpoint>, token: &str, ca_pem: String, concurrency: usize) -> Result<Joiner> {
        if hubs.is_empty() {
            bail!("no hub URL to join");
        }
        let ca_cfg = outpost_pki::client_config(&ca_pem, None)?;
        Ok(Joiner {
            http: reqwest::Client::builder().use_preconfigured_tls(ca_cfg).build()?,
            hubs,
            token: JoinToken::parse(token).map_err(anyhow::Error::msg)?,
            ca_pem,
            sem: Semaphore::new(concurrency.max(1)),
            busy: AtomicU64::new(0),
        })
    }

    /// Join agent `sim-<idx>` (global index: it picks hub `idx % hubs`) with source address
    /// `src`; records the join latency.
    pub async fn join(&self, s: &Sim, idx: usize, src: Ipv4Addr, extra: BTreeMap<String, String>) -> Result<SimAgent> {
        let _p = self.sem.acquire().await?;
        let t = Instant::now();
        let r = self.join_inner(idx, src, extra).await;
        s.record(if r.is_ok() { Kind::Join } else { Kind::JoinErr }, t);
        r
    }

    async fn join_inner(&self, idx: usize, src: Ipv4Addr, extra: BTreeMap<String, String>) -> Result<SimAgent> {
        let name = format!("sim-{idx:06}");
        let hub = self.hubs[idx % self.hubs.len()].clone();
        let key = outpost_pki::NodeKey::generate(&name)?;
        let mut labels: BTreeMap<String, String> = [
            ("kubernetes.io/hostname", name.as_str()),
            ("kubernetes.io/os", "linux"),
            ("kubernetes.io/arch", std::env::consts::ARCH),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        labels.extend(extra);
        let req = JoinRequest {
            token_id: self.token.id.clone(),
            token_secret: self.token.secret.clone(),
            name: name.clone(),
            labels,
            csr_pem: key.csr_pem.clone(),
        };
        // A busy hub (503 + Retry-After): wait at least that long and again, as the agent does.
        let resp = loop {
            let resp = self
                .http
                .post(format!("{}/v1/join", hub.base))
                .header(PROTOCOL_HEADER, PROTOCOL)
                .json(&req)
                .send()
                .await?;
            match retry_after(resp.status().as_u16(), resp.headers()) {
                Some(n) => {
                    self.busy.fetch_add(1, Ordering::Relaxed);
                    let wait = outpost_core::admission::agent_wait(Duration::from_secs(1), Some(n));
                    tokio::time::sleep(wait).await;
                }
                None => break resp,
            }
        };
        if !resp.status().is_success() {
            bail!(
                "join {name}: {} {}",
                resp.status(),
                resp.text().await.unwrap_or_default()
            );
        }
        let jr: JoinResponse = resp.json().await?;
        let cfg = outpost_pki::client_config(&self.ca_pem, Some((&jr.cert_pem, &key.key_pem)))?;
        Ok(SimAgent {
            name,
            hub,
            tls: TlsConnector::from(Arc::new(cfg)),
            src,
            generation: AtomicU64::new(0),
            synced_at: Mutex::new(0.0),
            connected_at: Mutex::new(0.0),
            reported_at: Mutex::new(0.0),
            workloads: Mutex::new(BTreeMap::new()),
            changed: Notify::new(),
            link: tokio::sync::Mutex::new(None),
        })
    }
}

/// Simulated agents in this process for other benches (`bench gitops`): joined through the
/// real protocol with extra labels each, syncing and reporting as in `bench fleet` until
/// dropped.
pub(crate) struct SimFleet {
    sim: Arc<Sim>,
    agents: Vec<Arc<SimAgent>>,
}

impl SimFleet {
    /// Join `n` agents `sim-NNNNNN` with `token` (which must allow the keys of `labels`), at
    /// most `concurrency` joins at once, and wait until each has synced and reported.
    pub(crate) async fn start(
        hub: &crate::harness::HubProc,
        token: &str,
        n: usize,
        concurrency: usize,
        labels: impl Fn(usize) -> BTreeMap<String, String>,
    ) -> Result<SimFleet> {
        let joiner = Arc::new(Joiner::new(
            vec![Endpoint::parse(&hub.url).await?],
            token,
            hub.ca_pem()?,
            concurrency,
        )?);
        let sim = Sim::new(LinkModel::default());
        let mut set = tokio::task::JoinSet::new();
        for idx in 0..n {
            let (j, s, extra) = (joiner.clone(), sim.clone(), labels(idx));
            set.spawn(async move { (idx, j.join(&s, idx, source_addr(0, idx), extra).await) });
        }
        let mut agents = Vec::new();
        while let Some(r) = set.join_next().await {
            let (idx, ag) = r?;
            let ag = Arc::new(ag?);
            sim.run(ag.clone());
            agents.push((idx, ag));
        }
        agents.sort_by_key(|(i, _)| *i);
        let fleet = SimFleet {
            sim,
            agents: agents.into_iter().map(|(_, a)| a).collect(),
        };
        let all = fleet.agents.clone();
        crate::harness::wait_for(
            "every simulated agent synced and reported",
            Duration::from_secs(600),
            Duration::from_millis(200),
            || {
                all.iter()
                    .all(|a| a.generation.load(Ordering::Relaxed) > 0 && *lock(&a.reported_at) > 0.0)
                    .then_some(())
            },
        )
        .await?;
        Ok(fleet)
    }

    /// Times (ms since `t`) at which each agent first held `key` with a hash other than the
    /// one it held before (`before`, from [`SimFleet::hashes`]).
    pub(crate) async fn wait_changed(
        &self,
        key: &str,
        before: &[Option<String>],
        t: Instant,
        limit: Duration,
    ) -> Result<Vec<f64>> {
        let mut arrived = vec![false; self.agents.len()];
        let mut times = Vec::with_capacity(self.agents.len());
        loop {
            let now = t.elapsed().as_secs_f64() * 1000.0;
            for (i, h) in self.hashes(key).into_iter().enumerate() {
                if !arrived[i] && h.is_some() && h != before[i] {
                    arrived[i] = true;
                    times.push(now);
                }
            }
            if times.len() == self.agents.len() {
                return Ok(times);
            }
            if t.elapsed() > limit {
                bail!(
                    "only {} of {} simulated agents got the change within {limit:?}",
                    times.len(),
                    self.agents.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// The hash of `key` each agent holds.
    pub(crate) fn hashes(&self, key: &str) -> Vec<Option<String>> {
        self.agents
            .iter()
            .map(|a| lock(&a.workloads).get(key).map(|(_, h)| h.clone()))
            .collect()
    }
}

impl Drop for SimFleet {
    fn drop(&mut self) {
        self.sim.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_paths_are_encoded() {
        assert_eq!(
            node_path("sim-1", "sync", &[("generation", "7")]),
            "/v1/nodes/sim-1/sync?generation=7"
        );
        assert_eq!(node_path("sim-1", "status", &[]), "/v1/nodes/sim-1/status");
        assert_eq!(
            node_path("a/b?c", "sync", &[("g", "1 2")]),
            "/v1/nodes/a%2Fb%3Fc/sync?g=1+2"
        );
    }

    #[test]
    fn the_link_model_is_the_agents() {
        let m = LinkModel::default();
        assert_eq!((m.wait_secs, m.ka_secs, m.heartbeat_secs), (3600, 100, 3600));
        let q = m.sync_query(7);
        let q: Vec<(&str, &str)> = q.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(
            node_path("n", "sync", &q),
            "/v1/nodes/n/sync?generation=7&wait=3600&ka=100"
        );
        assert_eq!(m.heartbeat(0.0), Duration::from_secs(2880));
        assert_eq!(m.heartbeat(1.0), Duration::from_secs(4320));
        assert_eq!(m.heartbeat(0.5), Duration::from_secs(3600));
        let ka = LinkModel { ka_secs: 5, ..m };
        // a short keepalive probes no slower than its idle time
        assert!(format!("{:?}", ka.keepalive()).contains("5s"));
    }

    #[test]
    fn sources_spread_over_loopback_per_shard() {
        assert_eq!(source_addr(0, 0), Ipv4Addr::new(127, 10, 0, 1));
        assert_eq!(source_addr(0, 249), Ipv4Addr::new(127, 10, 0, 250));
        assert_eq!(source_addr(0, 250), Ipv4Addr::new(127, 10, 1, 1));
        assert_eq!(source_addr(3, 14_999), Ipv4Addr::new(127, 13, 59, 250));
        let all: std::collections::BTreeSet<_> = (0..15_000).map(|i| source_addr(1, i)).collect();
        assert_eq!(all.len(), 15_000, "every agent of a shard has its own source address");
    }

    #[test]
    fn status_goes_only_on_change_or_heartbeat() {
        let w = |pairs: &[(&str, u64)]| -> BTreeMap<String, (u64, String)> {
            pairs
                .iter()
                .map(|(k, r)| (k.to_string(), (*r, format!("h{r}"))))
                .collect()
        };
        // nothing acknowledged yet: a full report
        let r = next_report(&w(&[("a", 1)]), None, false).expect("full");
        assert!(r.2);
        assert_eq!(r.0.len(), 1);
        // nothing changed, no heartbeat: nothing is sent
        assert!(next_report(&w(&[("a", 1)]), Some(&w(&[("a", 1)])), false).is_none());
        // heartbeat: an empty delta
        let r = next_report(&w(&[("a", 1)]), Some(&w(&[("a", 1)])), true).expect("heartbeat");
        assert!(!r.2 && r.0.is_empty() && r.1.is_empty());
        // a new revision and a removal: only those
        let r = next_report(&w(&[("a", 2)]), Some(&w(&[("a", 1), ("b", 1)])), false).expect("delta");
        assert_eq!(r.0.iter().map(|s| s.revision).collect::<Vec<_>>(), vec![2]);
        assert_eq!(r.1, vec!["b".to_string()]);
    }
}
