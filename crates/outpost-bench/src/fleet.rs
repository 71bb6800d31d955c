//! Fleet simulator: thousands of simulated agents in this process, each speaking the real
//! protocol against one real hub process: its own key and CSR, a real join with a shared
//! token, its own node certificate and mTLS connections (one held for the sync long-poll, one
//! for status reports, like the real agent's HTTP pool), long-polls with the generation it holds,
//! a status report after each new generation and a heartbeat every ~60 s with jitter, and
//! reconnects with the agent's backoff (`outpost_core::retry::HUB_LINK`: 1 s doubling to 30 s,
//! +50 % jitter).
//!
//! The hub runs as its own process so its CPU, memory and descriptors are read from `/proc`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use outpost_api::{
    ApplyRequest, JoinRequest, JoinResponse, JoinToken, ManifestFile, StatusReport, SyncResponse, WorkloadStatus,
    PROTOCOL_HEADER,
};
use rand::Rng;
use rustls_pki_types::ServerName;
use tokio::net::TcpSocket;
use tokio::sync::{Notify, Semaphore};
use tokio_rustls::TlsConnector;

use crate::harness::{self, HubProc};
use crate::procfs::{self, Meter};
use crate::stats::{bytes, ms, Summary};
use crate::table;

#[derive(clap::Args, Clone, Debug)]
pub struct FleetArgs {
    /// Fleet sizes to step through, e.g. 1000,5000,10000 (agents are added, never removed).
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    pub agents: Vec<usize>,
    /// Steady-state window per size, seconds (CPU, RSS and status latency are taken over it).
    #[arg(long, default_value_t = 60)]
    pub window_secs: u64,
    /// Status heartbeat interval, seconds (the real agent's is 60 s); +-10 % jitter is added.
    #[arg(long, default_value_t = 60)]
    pub heartbeat_secs: u64,
    /// Joins in flight at once.
    #[arg(long, default_value_t = 8)]
    pub join_concurrency: usize,
    /// Changes timed per size (one DaemonSet on every node, new command each time).
    #[arg(long, default_value_t = 3)]
    pub changes: usize,
    /// Skip the reconnect storm (SIGKILL + restart of the hub) after the largest size.
    #[arg(long)]
    pub no_storm: bool,
    /// Skip the three-wave rollout (10 %, 50 %, 100 % of the rest, zero bake) measured per size
    /// against an all-at-once change.
    #[arg(long)]
    pub no_rollout: bool,
    /// Keep the fleet DaemonSet while agents join. Each join reschedules every node, so joins
    /// slow down as the fleet grows; by default the DaemonSet is deleted before a join wave and
    /// applied again after it, which keeps setup time linear.
    #[arg(long)]
    pub keep_workloads_during_join: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Join,
    /// First sync of a new agent (generation 0): answered at once.
    SyncFirst,
    /// A held long-poll answered by a change.
    SyncChange,
    /// A long-poll that timed out with 204.
    Sync204,
    Status,
    ConnectErr,
    SyncErr,
    StatusErr,
}

struct Sample {
    kind: Kind,
    at_ms: u64,
    lat_us: u64,
}

struct Fleet {
    addr: SocketAddr,
    server_name: ServerName<'static>,
    t0: Instant,
    heartbeat: Duration,
    samples: Mutex<Vec<Sample>>,
    stop: AtomicBool,
}

impl Fleet {
    fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }
    fn record(&self, kind: Kind, started: Instant) {
        let s = Sample {
            kind,
            at_ms: self.now_ms(),
            lat_us: started.elapsed().as_micros() as u64,
        };
        self.samples.lock().unwrap_or_else(|p| p.into_inner()).push(s);
    }
    /// Latencies (ms) of `kind` recorded at or after `from_ms` (and before `to_ms`), and the count.
    fn latencies(&self, kind: Kind, from_ms: u64, to_ms: u64) -> Vec<f64> {
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|s| s.kind == kind && s.at_ms >= from_ms && s.at_ms < to_ms)
            .map(|s| s.lat_us as f64 / 1000.0)
            .collect()
    }
}

struct SimAgent {
    name: String,
    tls: TlsConnector,
    src: Ipv4Addr,
    generation: AtomicU64,
    /// ms since fleet start of the last TLS connection that succeeded.
    connected_at: AtomicU64,
    /// ms since fleet start of the last successful status report.
    reported_at: AtomicU64,
    /// ms since fleet start of the last sync answer with a new generation.
    synced_at: AtomicU64,
    /// key -> (revision, hash) of the desired state held.
    workloads: Mutex<BTreeMap<String, (u64, String)>>,
    changed: Notify,
}

type Sender = SendRequest<Full<Bytes>>;

async fn connect(f: &Fleet, a: &SimAgent) -> Result<Sender> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::from((a.src, 0)))?;
    let tcp = sock.connect(f.addr).await?;
    tcp.set_nodelay(true)?;
    let tls = a.tls.connect(f.server_name.clone(), tcp).await?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    a.connected_at.store(f.now_ms(), Ordering::Relaxed);
    Ok(send)
}

async fn request(send: &mut Sender, method: &str, path: &str, body: Vec<u8>) -> Result<(u16, Bytes)> {
    send.ready().await?;
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1")
        .header(PROTOCOL_HEADER, "1")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let resp = send.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// `/v1/nodes/<node>/<route>?<query>`, each part encoded by the `url` crate.
fn node_path(node: &str, route: &str, query: &[(&str, &str)]) -> String {
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

async fn ensure(conn: &mut Option<Sender>, f: &Fleet, a: &SimAgent) -> Option<()> {
    if conn.as_ref().is_none_or(|c| c.is_closed()) {
        let t = Instant::now();
        match tokio::time::timeout(Duration::from_secs(10), connect(f, a)).await {
            Ok(Ok(c)) => *conn = Some(c),
            _ => {
                f.record(Kind::ConnectErr, t);
                *conn = None;
                return None;
            }
        }
    }
    Some(())
}

async fn sync_loop(f: Arc<Fleet>, a: Arc<SimAgent>) {
    let mut conn: Option<Sender> = None;
    let mut attempt = 0u32;
    while !f.stop.load(Ordering::Relaxed) {
        if ensure(&mut conn, &f, &a).await.is_none() {
            tokio::time::sleep(backoff(&mut attempt)).await;
            continue;
        }
        let Some(c) = conn.as_mut() else { continue };
        let g = a.generation.load(Ordering::Relaxed);
        let path = node_path(&a.name, "sync", &[("generation", &g.to_string())]);
        let t = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(60), request(c, "GET", &path, Vec::new())).await;
        match r {
            Ok(Ok((200, body))) => match serde_json::from_slice::<SyncResponse>(&body) {
                Ok(resp) => {
                    {
                        let mut w = a.workloads.lock().unwrap_or_else(|p| p.into_inner());
                        if resp.full {
                            w.clear();
                        }
                        for k in &resp.remove {
                            w.remove(k);
                        }
                        for s in &resp.upsert {
                            w.insert(s.key.clone(), (s.revision, s.hash.clone()));
                        }
                    }
                    a.generation.store(resp.generation, Ordering::Relaxed);
                    a.synced_at.store(f.now_ms(), Ordering::Relaxed);
                    f.record(if g == 0 { Kind::SyncFirst } else { Kind::SyncChange }, t);
                    a.changed.notify_one();
                    attempt = 0;
                }
                Err(_) => {
                    f.record(Kind::SyncErr, t);
                    tokio::time::sleep(backoff(&mut attempt)).await;
                }
            },
            Ok(Ok((204, _))) => {
                f.record(Kind::Sync204, t);
                attempt = 0;
            }
            _ => {
                f.record(Kind::SyncErr, t);
                conn = None;
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

async fn status_loop(f: Arc<Fleet>, a: Arc<SimAgent>) {
    let mut conn: Option<Sender> = None;
    let mut attempt = 0u32;
    let mut acked: Option<BTreeMap<String, (u64, String)>> = None;
    let started = Instant::now();
    // like the real agent, the first report goes out at start (here: once the first sync landed)
    let _ = tokio::time::timeout(Duration::from_secs(10), a.changed.notified()).await;
    while !f.stop.load(Ordering::Relaxed) {
        let now = a.workloads.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (workloads, removed, full) = match &acked {
            None => (now.iter().map(|(k, (r, h))| running(k, *r, h)).collect(), vec![], true),
            Some(prev) => (
                now.iter()
                    .filter(|(k, v)| prev.get(*k) != Some(*v))
                    .map(|(k, (r, h))| running(k, *r, h))
                    .collect(),
                prev.keys().filter(|k| !now.contains_key(*k)).cloned().collect(),
                false,
            ),
        };
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
        let path = node_path(&a.name, "status", &[]);
        let mut ok = false;
        // a pooled connection the hub closed is replaced at once (as reqwest does) before the
        // attempt counts as failed
        for _ in 0..2 {
            if ensure(&mut conn, &f, &a).await.is_none() {
                break;
            }
            let Some(c) = conn.as_mut() else { break };
            let t = Instant::now();
            match tokio::time::timeout(Duration::from_secs(30), request(c, "POST", &path, body.clone())).await {
                Ok(Ok((200, _))) => {
                    f.record(Kind::Status, t);
                    ok = true;
                    break;
                }
                Ok(Ok(_)) => {
                    f.record(Kind::StatusErr, t);
                    break;
                }
                _ => {
                    let was_closed = conn.as_ref().is_some_and(|c| c.is_closed());
                    conn = None;
                    if !was_closed {
                        f.record(Kind::StatusErr, t);
                        break;
                    }
                }
            }
        }
        let wait = if ok {
            acked = Some(now);
            attempt = 0;
            a.reported_at.store(f.now_ms(), Ordering::Relaxed);
            let j = rand::rng().random_range(0.9..1.1);
            f.heartbeat.mul_f64(j)
        } else {
            acked = None;
            backoff(&mut attempt)
        };
        tokio::select! {
            _ = a.changed.notified(), if ok => tokio::time::sleep(Duration::from_millis(250)).await,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

struct Joiner {
    http: reqwest::Client,
    url: String,
    token: JoinToken,
    ca_pem: String,
}

async fn join_one(j: &Joiner, name: String, idx: usize, extra: BTreeMap<String, String>) -> Result<SimAgent> {
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
        token_id: j.token.id.clone(),
        token_secret: j.token.secret.clone(),
        name: name.clone(),
        labels,
        csr_pem: key.csr_pem.clone(),
    };
    let resp = j
        .http
        .post(format!("{}/v1/join", j.url))
        .header(PROTOCOL_HEADER, "1")
        .json(&req)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!(
            "join {name}: {} {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        );
    }
    let jr: JoinResponse = resp.json().await?;
    let cfg = outpost_pki::client_config(&j.ca_pem, Some((&jr.cert_pem, &key.key_pem)))?;
    // 127.1.0.1 .. : spread source addresses so 2 connections per agent never run out of ports
    let src = Ipv4Addr::new(
        127,
        1 + (idx / 60_000) as u8,
        ((idx / 250) % 240) as u8,
        (idx % 250 + 1) as u8,
    );
    Ok(SimAgent {
        name,
        tls: TlsConnector::from(Arc::new(cfg)),
        src,
        generation: AtomicU64::new(0),
        connected_at: AtomicU64::new(0),
        reported_at: AtomicU64::new(0),
        synced_at: AtomicU64::new(0),
        workloads: Mutex::new(BTreeMap::new()),
        changed: Notify::new(),
    })
}

fn ds(arg: u64) -> String {
    format!(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: fleet-app, labels: {{app: fleet-app}}}}\nspec:\n  template:\n    spec:\n      runtimeClassName: process\n      containers:\n      - {{name: main, image: 'app:{arg}', command: [/bin/sleep, '{arg}']}}\n"
    )
}

/// The RolloutPolicy of the fleet app: every change at once (the timed changes measure the
/// link, not waves), or three waves of 10 %, 50 % and 100 % of the rest with zero bake.
fn policy(three_waves: bool) -> String {
    let waves = if three_waves {
        "  waves:\n  - {percent: 10}\n  - {percent: 50}\n  - {percent: 100}\n"
    } else {
        "  waves:\n  - {percent: 100}\n"
    };
    format!(
        "apiVersion: outpost.dev/v1\nkind: RolloutPolicy\nmetadata: {{name: fleet-app}}\nspec:\n  selector: {{app: fleet-app}}\n{waves}  bake: 0s\n  tinyFleet: 1\n  failureThreshold: {{percent: 100, minSample: 1}}\n"
    )
}

const APP_KEY: &str = "daemonset/default/fleet-app";

struct Admin {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl Admin {
    async fn rollout(&self) -> Result<outpost_api::RolloutInfo> {
        let r = self
            .http
            .get(format!("{}/v1/objects/daemonset/default/fleet-app/rollout", self.url))
            .bearer_auth(&self.token)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!(
                "rollout status failed: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            );
        }
        Ok(r.json().await?)
    }

    async fn apply(&self, yaml: String) -> Result<()> {
        let req = ApplyRequest {
            files: vec![ManifestFile {
                name: "fleet.yaml".into(),
                content: yaml,
            }],
        };
        let r = self
            .http
            .post(format!("{}/v1/apply", self.url))
            .bearer_auth(&self.token)
            .json(&req)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("apply failed: {} {}", r.status(), r.text().await.unwrap_or_default());
        }
        Ok(())
    }

    async fn delete_app(&self) -> Result<()> {
        let r = self
            .http
            .delete(format!("{}/v1/objects/daemonset/default/fleet-app", self.url))
            .bearer_auth(&self.token)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("delete failed: {} {}", r.status(), r.text().await.unwrap_or_default());
        }
        Ok(())
    }
}

/// Wait until every agent holds `revision` of the fleet app.
async fn wait_all_on(agents: &[Arc<SimAgent>], revision: u64, limit: Duration) -> Result<()> {
    let t = Instant::now();
    loop {
        let on = agents
            .iter()
            .filter(|a| {
                a.workloads
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(APP_KEY)
                    .is_some_and(|(r, _)| *r == revision)
            })
            .count();
        if on == agents.len() {
            return Ok(());
        }
        if t.elapsed() > limit {
            bail!(
                "only {on} of {} agents hold revision {revision} after {limit:?}",
                agents.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The fleet app's revision as the hub has it now.
async fn app_revision(admin: &Admin) -> Result<u64> {
    Ok(admin.rollout().await?.revision)
}

/// One all-at-once change and one three-wave rollout (zero bake), each timed and with the hub's
/// CPU time over it; returns the table row.
async fn rollout_row(admin: &Admin, agents: &[Arc<SimAgent>], hub_pid: u32, arg: &mut u64) -> Result<Vec<String>> {
    // all at once
    *arg += 1;
    let meter = Meter::start(hub_pid).context("hub exited")?;
    let t = Instant::now();
    admin.apply(ds(*arg)).await?;
    let rev = app_revision(admin).await?;
    wait_all_on(agents, rev, Duration::from_secs(600)).await?;
    let all_at_once = t.elapsed();
    while admin.rollout().await?.phase != outpost_api::RolloutPhase::Complete {
        if t.elapsed() > Duration::from_secs(600) {
            bail!("the all-at-once rollout did not complete");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let once = meter.finish().context("hub exited")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // three waves, zero bake
    admin.apply(policy(true)).await?;
    *arg += 1;
    let meter = Meter::start(hub_pid).context("hub exited")?;
    let t = Instant::now();
    admin.apply(ds(*arg)).await?;
    let rev = app_revision(admin).await?;
    wait_all_on(agents, rev, Duration::from_secs(900)).await?;
    let to_all = t.elapsed();
    let info = loop {
        let i = admin.rollout().await?;
        if i.phase == outpost_api::RolloutPhase::Complete || t.elapsed() > Duration::from_secs(900) {
            break i;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let complete = t.elapsed();
    let waves = meter.finish().context("hub exited")?;
    admin.apply(policy(false)).await?;
    let per_wave: Vec<String> = info
        .waves
        .iter()
        .filter_map(|w| {
            let d = w.completed_at? - w.opened_at?;
            Some(format!("{} nodes {}", w.nodes, ms(d as f64)))
        })
        .collect();
    let cpu = |u: &procfs::Usage| u.cpu_pct / 100.0 * u.secs;
    Ok(vec![
        agents.len().to_string(),
        format!("{} / {:.2} s", ms(all_at_once.as_secs_f64() * 1000.0), cpu(&once)),
        per_wave.join("; "),
        format!(
            "{} / {}",
            ms(to_all.as_secs_f64() * 1000.0),
            ms(complete.as_secs_f64() * 1000.0)
        ),
        format!("{:.2} s ({:.0} % of 1 core)", cpu(&waves), waves.cpu_pct),
        info.phase.as_str().to_string(),
    ])
}

/// Wait until every agent holds a generation above its entry in `before`; per-agent arrival
/// times (ms after `t`) in arrival order.
async fn wait_all_past(agents: &[Arc<SimAgent>], before: &[u64], t: Instant, limit: Duration) -> Result<Vec<f64>> {
    let mut arrived = vec![false; agents.len()];
    let mut times = Vec::with_capacity(agents.len());
    loop {
        let now = t.elapsed().as_secs_f64() * 1000.0;
        for (i, a) in agents.iter().enumerate() {
            if !arrived[i] && a.generation.load(Ordering::Relaxed) > before[i] {
                arrived[i] = true;
                times.push(now);
            }
        }
        if times.len() == agents.len() {
            return Ok(times);
        }
        if t.elapsed() > limit {
            bail!(
                "only {} of {} agents got the change within {limit:?}",
                times.len(),
                agents.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn gens(agents: &[Arc<SimAgent>]) -> Vec<u64> {
    agents.iter().map(|a| a.generation.load(Ordering::Relaxed)).collect()
}

pub async fn fleet(a: FleetArgs, work: &std::path::Path) -> Result<String> {
    let max = a.agents.iter().copied().max().unwrap_or(0);
    let nofile = harness::raise_nofile(1 << 20);
    eprintln!("fleet: RLIMIT_NOFILE {nofile} (inherited by the hub)");
    let mut hub = HubProc::start(work).await?;
    let ca_pem = hub.ca_pem()?;
    let token =
        JoinToken::parse(&hub.join_token(u32::try_from(max).unwrap_or(u32::MAX)).await?).map_err(anyhow::Error::msg)?;
    let ca_cfg = outpost_pki::client_config(&ca_pem, None)?;
    let http = reqwest::Client::builder().use_preconfigured_tls(ca_cfg).build()?;
    let admin = Admin {
        http: http.clone(),
        url: hub.url.clone(),
        token: hub.token.clone(),
    };
    let joiner = Arc::new(Joiner {
        http,
        url: hub.url.clone(),
        token,
        ca_pem,
    });
    let f = Arc::new(Fleet {
        addr: SocketAddr::from(([127, 0, 0, 1], hub.port)),
        server_name: ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into()),
        t0: Instant::now(),
        heartbeat: Duration::from_secs(a.heartbeat_secs),
        samples: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
    });
    let mut arg = crate::marker_base() + 900;
    // Timed changes go to every node at once; the rollout rows switch to three waves.
    admin.apply(policy(false)).await?;
    if a.keep_workloads_during_join {
        admin.apply(ds(arg)).await?;
    }
    let mut rollout_rows = Vec::new();
    let mut agents: Vec<Arc<SimAgent>> = Vec::new();
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for &n in &a.agents {
        if n <= agents.len() {
            continue;
        }
        // ---- join up to n
        if !a.keep_workloads_during_join && !agents.is_empty() {
            admin.delete_app().await?;
        }
        let jt0 = Instant::now();
        let jms0 = f.now_ms();
        let sem = Arc::new(Semaphore::new(a.join_concurrency));
        let mut set = tokio::task::JoinSet::new();
        for idx in agents.len()..n {
            let (j, f2, sem) = (joiner.clone(), f.clone(), sem.clone());
            set.spawn(async move {
                let _p = sem.acquire_owned().await;
                let t = Instant::now();
                let r = join_one(&j, format!("sim-{idx:05}"), idx, BTreeMap::new()).await;
                if r.is_ok() {
                    f2.record(Kind::Join, t);
                }
                (idx, r)
            });
        }
        let mut joined = Vec::new();
        let mut join_errors = 0usize;
        while let Some(r) = set.join_next().await {
            match r {
                Ok((idx, Ok(ag))) => {
                    let ag = Arc::new(ag);
                    tokio::spawn(sync_loop(f.clone(), ag.clone()));
                    tokio::spawn(status_loop(f.clone(), ag.clone()));
                    joined.push((idx, ag));
                }
                Ok((_, Err(e))) => {
                    join_errors += 1;
                    if join_errors <= 3 {
                        eprintln!("fleet: {e:#}");
                    }
                }
                Err(e) => eprintln!("fleet: join task failed: {e}"),
            }
        }
        joined.sort_by_key(|(i, _)| *i);
        agents.extend(joined.into_iter().map(|(_, a)| a));
        let join_secs = jt0.elapsed().as_secs_f64();
        if !a.keep_workloads_during_join {
            arg += 1;
            admin.apply(ds(arg)).await?;
        }
        let joins = Summary::of(&f.latencies(Kind::Join, jms0, u64::MAX));
        eprintln!(
            "fleet: {} agents joined ({} new in {join_secs:.1} s, {join_errors} errors); waiting for first sync and report",
            agents.len(),
            joins.n
        );
        let all = agents.clone();
        harness::wait_for(
            "every agent synced and reported",
            Duration::from_secs(600),
            Duration::from_millis(200),
            || {
                all.iter()
                    .all(|a| a.generation.load(Ordering::Relaxed) > 0 && a.reported_at.load(Ordering::Relaxed) > 0)
                    .then_some(())
            },
        )
        .await?;
        let first_sync = Summary::of(&f.latencies(Kind::SyncFirst, jms0, u64::MAX));
        // ---- steady window
        let hub_pid = hub.pid().context("hub not running")?;
        let w0 = f.now_ms();
        let mut meters = vec![
            Meter::start(hub_pid).context("hub exited")?,
            Meter::start(std::process::id()).context("self")?,
        ];
        eprintln!("fleet: {} agents: steady window {} s", agents.len(), a.window_secs);
        procfs::watch(&mut meters, Duration::from_secs(a.window_secs)).await;
        let w1 = f.now_ms();
        let hub_fds = procfs::fd_count(hub_pid).unwrap_or(0);
        let hub_threads = procfs::threads(hub_pid).unwrap_or(0);
        let mut it = meters.into_iter();
        let hub_u = it.next().and_then(Meter::finish).context("hub exited")?;
        let self_u = it.next().and_then(Meter::finish).context("self")?;
        let status = Summary::of(&f.latencies(Kind::Status, w0, w1));
        let errs = |k| f.latencies(k, w0, w1).len();
        let (status_err, sync_err, conn_err) = (errs(Kind::StatusErr), errs(Kind::SyncErr), errs(Kind::ConnectErr));
        let polls = errs(Kind::Sync204);
        // ---- changes
        let mut to_all = Vec::new();
        let mut per_agent = Vec::new();
        for _ in 0..a.changes {
            arg += 1;
            let before = gens(&agents);
            let t = Instant::now();
            admin.apply(ds(arg)).await?;
            let times = wait_all_past(&agents, &before, t, Duration::from_secs(600)).await?;
            to_all.push(*times.last().unwrap_or(&0.0));
            per_agent.extend(times);
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        let all_s = Summary::of(&to_all);
        let per_s = Summary::of(&per_agent);
        rows.push(vec![
            agents.len().to_string(),
            format!("{:.0}/s", joins.n as f64 / join_secs),
            ms(joins.p99),
            ms(first_sync.p99),
            format!("{:.1} %", hub_u.cpu_pct),
            bytes(hub_u.rss_max as f64),
            format!("{hub_fds} / {hub_threads}"),
            format!("{} / {}", ms(status.p50), ms(status.p99)),
            format!("{}", status.n),
            format!("{polls}"),
            format!("{status_err}/{sync_err}/{conn_err}"),
            format!("{} / {} / {}", ms(per_s.p50), ms(per_s.p99), ms(all_s.max)),
            format!("{:.0} % / {:.0} %", self_u.cpu_pct, hub_u.machine_busy_pct),
        ]);
        eprintln!("fleet: {:?}", rows.last());
        if !a.no_rollout {
            eprintln!(
                "fleet: {} agents: all-at-once change, then a three-wave rollout",
                agents.len()
            );
            let row = rollout_row(&admin, &agents, hub_pid, &mut arg).await?;
            eprintln!("fleet: {row:?}");
            rollout_rows.push(row);
        }
        if join_errors > 0 {
            notes.push(format!("{join_errors} joins failed at the {n} step"));
        }
    }
    // ---- reconnect storm
    let mut storm = String::new();
    if !a.no_storm && !agents.is_empty() {
        eprintln!("fleet: reconnect storm with {} agents", agents.len());
        let before = gens(&agents);
        let s0 = f.now_ms();
        let t = Instant::now();
        hub.kill9();
        hub.launch().await?;
        let up = t.elapsed();
        let meter = Meter::start(hub.pid().context("hub not running")?);
        arg += 1;
        admin.apply(ds(arg)).await?;
        let times = wait_all_past(&agents, &before, t, Duration::from_secs(900)).await?;
        let all_connected = agents
            .iter()
            .map(|a| a.connected_at.load(Ordering::Relaxed).saturating_sub(s0))
            .max()
            .unwrap_or(0);
        let hub_u = meter.and_then(Meter::finish).unwrap_or_default();
        let ps = Summary::of(&times);
        let conn_errs = f.latencies(Kind::ConnectErr, s0, u64::MAX).len();
        storm = format!(
            "Reconnect storm, {} agents: SIGKILL the hub, restart it, apply one change as soon as it answers; \
             time from the kill\n\n{}",
            agents.len(),
            table(
                &[
                    "hub back (answers CLI)",
                    "all agents reconnected (TLS)",
                    "all agents re-synced (hold the new generation)",
                    "p50 agent re-synced",
                    "failed connects during storm",
                    "hub CPU during recovery",
                    "hub RSS max",
                ],
                &[vec![
                    ms(up.as_secs_f64() * 1000.0),
                    ms(all_connected as f64),
                    ms(ps.max),
                    ms(ps.p50),
                    conn_errs.to_string(),
                    format!("{:.0} %", hub_u.cpu_pct),
                    bytes(hub_u.rss_max as f64),
                ]]
            )
        );
    }
    f.stop.store(true, Ordering::Relaxed);
    let mut out = format!(
        "Fleet simulator: {} simulated agents max, heartbeat {} s +-10 %, long-poll {} s, window {} s, {} changes per size, RLIMIT_NOFILE {nofile}\n\n",
        agents.len(),
        a.heartbeat_secs,
        outpost_api::LONG_POLL_SECS,
        a.window_secs,
        a.changes
    );
    out.push_str(&table(
        &[
            "agents",
            "join rate",
            "join p99",
            "first sync p99",
            "hub CPU (% of 1 core)",
            "hub RSS max",
            "hub fds / threads",
            "status p50 / p99",
            "status reports",
            "long-polls done",
            "errors status/sync/connect",
            "change -> agent p50 / p99 / all agents (max)",
            "bench CPU / machine busy",
        ],
        &rows,
    ));
    if !rollout_rows.is_empty() {
        out.push_str(&format!(
            "\nRollouts (process DaemonSet on every node; simulated nodes pass their gate at once): an all-at-once \
             change, then three waves of 10 %, 50 % and 100 % of the rest with zero bake; hub CPU time over each\n\n{}",
            table(
                &[
                    "agents",
                    "all at once: to every agent / hub CPU",
                    "per wave: nodes, open -> complete (hub clock)",
                    "three waves: every agent holds it / rollout Complete",
                    "three waves: hub CPU",
                    "phase",
                ],
                &rollout_rows,
            )
        ));
    }
    if !storm.is_empty() {
        out.push('\n');
        out.push_str(&storm);
    }
    for n in notes {
        out.push_str(&format!("\nnote: {n}\n"));
    }
    Ok(out)
}

/// Simulated agents for other benches (`bench gitops`): joined through the real protocol with
/// extra labels each, syncing and reporting as in `bench fleet` until dropped.
pub(crate) struct SimFleet {
    f: Arc<Fleet>,
    agents: Vec<Arc<SimAgent>>,
}

impl SimFleet {
    /// Join `n` agents `sim-NNNNN` with `token` (which must allow the keys of `labels`), at
    /// most `concurrency` joins at once, and wait until each has synced and reported.
    pub(crate) async fn start(
        hub: &HubProc,
        token: &str,
        n: usize,
        concurrency: usize,
        labels: impl Fn(usize) -> BTreeMap<String, String>,
    ) -> Result<SimFleet> {
        let ca_pem = hub.ca_pem()?;
        let ca_cfg = outpost_pki::client_config(&ca_pem, None)?;
        let joiner = Arc::new(Joiner {
            http: reqwest::Client::builder().use_preconfigured_tls(ca_cfg).build()?,
            url: hub.url.clone(),
            token: JoinToken::parse(token).map_err(anyhow::Error::msg)?,
            ca_pem,
        });
        let f = Arc::new(Fleet {
            addr: SocketAddr::from(([127, 0, 0, 1], hub.port)),
            server_name: ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into()),
            t0: Instant::now(),
            heartbeat: Duration::from_secs(60),
            samples: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let sem = Arc::new(Semaphore::new(concurrency.max(1)));
        let mut set = tokio::task::JoinSet::new();
        for idx in 0..n {
            let (j, sem, extra) = (joiner.clone(), sem.clone(), labels(idx));
            set.spawn(async move {
                let _p = sem.acquire_owned().await;
                (idx, join_one(&j, format!("sim-{idx:05}"), idx, extra).await)
            });
        }
        let mut agents = Vec::new();
        while let Some(r) = set.join_next().await {
            let (idx, ag) = r?;
            let ag = Arc::new(ag?);
            tokio::spawn(sync_loop(f.clone(), ag.clone()));
            tokio::spawn(status_loop(f.clone(), ag.clone()));
            agents.push((idx, ag));
        }
        agents.sort_by_key(|(i, _)| *i);
        let fleet = SimFleet {
            f,
            agents: agents.into_iter().map(|(_, a)| a).collect(),
        };
        let all = fleet.agents.clone();
        harness::wait_for(
            "every simulated agent synced and reported",
            Duration::from_secs(600),
            Duration::from_millis(200),
            || {
                all.iter()
                    .all(|a| a.generation.load(Ordering::Relaxed) > 0 && a.reported_at.load(Ordering::Relaxed) > 0)
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
            .map(|a| {
                a.workloads
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(key)
                    .map(|(_, h)| h.clone())
            })
            .collect()
    }
}

impl Drop for SimFleet {
    fn drop(&mut self) {
        self.f.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::node_path;

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
}
