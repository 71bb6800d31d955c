//! The edge data pipeline on the node (docs/pipeline.md): sources (the MQTT broker inside the
//! agent, [`mqtt`]; HTTP ingest, [`http`]; a site broker the agent subscribes to), one worker
//! per stream that runs the stream's rules (`outpost_core::pipeline`) and writes the results
//! into the stream's durable spool ([`crate::spool`]) before anything is acknowledged, and one
//! sender per (stream, sink) that forwards from the spool ([`sinks`]).
//!
//! Durability: a QoS 1 PUBACK or an HTTP 200 is sent only after the record, or the state it
//! changed, is in the spool and fsynced (group commit). Streams with state (windows, deadband,
//! rate of change, sampling) also spool the records that changed it; every spool segment starts
//! with a checkpoint of the state, so a restart restores the newest checkpoint and replays the
//! records after it: nothing acknowledged is lost to a `kill -9`, and nothing is emitted twice.
//!
//! Listeners bind to loopback by default (`OUTPOST_MQTT_LISTEN`, `OUTPOST_INGEST_LISTEN`); the
//! addresses actually bound are written to `<data-dir>/pipeline/listen.json` and given to
//! workloads as `OUTPOST_MQTT_URL` and `OUTPOST_INGEST_URL`.
//!
//! Configuration (environment): `OUTPOST_MQTT_LISTEN` (default `127.0.0.1:1883`, `off` to
//! disable), `OUTPOST_INGEST_LISTEN` (default `127.0.0.1:7878`, `off`), `OUTPOST_MQTT_USERNAME` +
//! `OUTPOST_MQTT_PASSWORD` (required from clients when set), `OUTPOST_INGEST_TOKEN` (bearer token
//! required when set), `OUTPOST_SITE_MQTT` (`host:port` of a site broker to subscribe to),
//! `OUTPOST_SPOOL_MAX_BYTES` (the node's spool budget, default 1 GiB),
//! `OUTPOST_SPOOL_SEGMENT_BYTES` (default 4 MiB), `OUTPOST_LISTEN_TLS_CERT` +
//! `OUTPOST_LISTEN_TLS_KEY` (TLS only on both listeners).

pub mod http;
pub mod mqtt;
pub mod sinks;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use outpost_api::pipeline::{NodePipeline, NodePipelines, StreamSpec, WhenFull};
use outpost_api::{UnixMs, ALERT_FIRING, ALERT_RESOLVED};
use outpost_core::pipeline::{Applied, Counters, Out, StreamRules};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tracing::{info, warn};

use crate::spool::{Read1, SegmentReader, Spool};
use crate::store::Store;

/// Entry kinds in a stream's spool.
pub const KIND_DATA: u8 = 1;
pub const KIND_CHECKPOINT: u8 = 2;

/// Alert names this module raises through the node's event outbox (webhooks follow).
pub const SPOOL_FULL_ALERT: &str = "PipelineSpoolFull";
pub const ANOMALY_ALERT: &str = "DataAnomaly";
pub const SPOOL_CORRUPT_EVENT: &str = "PipelineSpoolCorrupt";

/// A data entry: the record that changed the stream's state (stateful streams only), a window
/// tick, and the results to forward.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DataEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tick: Option<UnixMs>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outs: Vec<Out>,
}

fn env_str(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|s| !s.trim().is_empty())
}

fn env_addr(name: &str, default: &str) -> Option<SocketAddr> {
    let v = env_str(name).unwrap_or_else(|| default.to_string());
    if v == "off" {
        return None;
    }
    match v.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            warn!(var = name, value = %v, "not an address like 127.0.0.1:1883; listener disabled");
            None
        }
    }
}

/// Node-side settings of the pipeline.
#[derive(Clone, Debug)]
pub struct Options {
    pub mqtt_listen: Option<SocketAddr>,
    pub ingest_listen: Option<SocketAddr>,
    pub mqtt_login: Option<(String, String)>,
    pub ingest_token: Option<String>,
    pub site_mqtt: Option<String>,
    pub spool_max_bytes: u64,
    pub segment_bytes: u64,
    /// TLS for both listeners: PEM certificate chain and key files
    /// (`OUTPOST_LISTEN_TLS_CERT`, `OUTPOST_LISTEN_TLS_KEY`).
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl Options {
    pub fn from_env() -> Self {
        let num = |n: &str, d: u64| {
            env_str(n)
                .and_then(|v| outpost_api::parse_memory(&Value::String(v)).ok())
                .unwrap_or(d)
        };
        Self {
            mqtt_listen: env_addr("OUTPOST_MQTT_LISTEN", "127.0.0.1:1883"),
            ingest_listen: env_addr("OUTPOST_INGEST_LISTEN", "127.0.0.1:7878"),
            mqtt_login: env_str("OUTPOST_MQTT_USERNAME").zip(env_str("OUTPOST_MQTT_PASSWORD")),
            ingest_token: env_str("OUTPOST_INGEST_TOKEN"),
            site_mqtt: env_str("OUTPOST_SITE_MQTT"),
            spool_max_bytes: num("OUTPOST_SPOOL_MAX_BYTES", 1 << 30),
            segment_bytes: num("OUTPOST_SPOOL_SEGMENT_BYTES", 4 << 20),
            tls: env_str("OUTPOST_LISTEN_TLS_CERT")
                .map(PathBuf::from)
                .zip(env_str("OUTPOST_LISTEN_TLS_KEY").map(PathBuf::from)),
        }
    }
}

/// The listeners' TLS acceptor, from the certificate and key files.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("OUTPOST_LISTEN_TLS_CERT {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("OUTPOST_LISTEN_TLS_CERT {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "OUTPOST_LISTEN_TLS_CERT {}: no certificate in it",
            cert.display()
        ));
    }
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("OUTPOST_LISTEN_TLS_KEY {}: {e}", key.display()))?;
    let cfg = rustls::ServerConfig::builder_with_provider(outpost_pki::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("the listener certificate and key do not fit together: {e}"))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// Why an input was not taken.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Rejected {
    #[error("stream {0}: spool budget reached and its policy is rejectNewest; retry later")]
    Full(String),
    #[error("stream {0} is not running on this node")]
    NoStream(String),
    #[error("stream {0}: cannot write to the spool: {1}")]
    Spool(String, String),
    #[error("stream {0}: the model stage cannot take the record: {1}")]
    Unpredictable(String, String),
    #[error("stream {0}: the model stage is not answering: {1}; retry")]
    Model(String, String),
}

/// Where a stream worker answers: once the record is durable, or why it was refused.
pub type Done = oneshot::Sender<Result<(), Rejected>>;

/// One record for a stream worker; `done` is answered once it is durable.
pub struct Input {
    pub value: Value,
    pub topic: Option<String>,
    pub at: UnixMs,
    pub done: Option<Done>,
}

/// Counters of one stream, for `/v1/stats` and the alerts.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StreamStats {
    pub pipeline: String,
    pub stream: String,
    pub revision: u64,
    #[serde(flatten)]
    pub rules: Counters,
    pub spool_bytes: u64,
    pub spool_entries: u64,
    /// Bytes appended to the spool since the stream started (entries with their headers).
    pub written_bytes: u64,
    /// Entries dropped by the dropOldest policy (with everything they held).
    pub dropped_entries: u64,
    /// Records refused by the rejectNewest policy.
    pub rejected: u64,
    /// Bytes skipped as corrupt (start-up and readers), and how many damaged spots.
    pub corrupt_bytes: u64,
    pub corrupt_spots: u64,
    /// Per sink: entries delivered (cursor) and the newest entry written.
    pub sinks: BTreeMap<String, SinkStats>,
    pub committed: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SinkStats {
    pub acked: u64,
    pub delivered_records: u64,
    pub last_error: Option<String>,
}

/// Where node events go (the status reporter delivers them; alerts reach webhooks).
#[derive(Clone)]
pub struct Events {
    pub store: Arc<Store>,
    pub outbox: Arc<Notify>,
}

impl Events {
    fn push(&self, subject: &str, reason: &str, message: &str) {
        if let Err(e) = self
            .store
            .push_event(crate::reconcile::now_ms(), Some(subject), reason, message)
        {
            warn!(error = %e, "cannot record pipeline event");
        }
        self.outbox.notify_one();
    }
}

/// A running stream: where to send its inputs, and its counters.
#[derive(Clone)]
pub struct StreamHandle {
    pub name: String,
    pub pipeline: String,
    pub mqtt: Vec<String>,
    pub tx: mpsc::Sender<Input>,
    pub stats: Arc<Mutex<StreamStats>>,
}

/// Routes inputs to streams; replaced whenever the node's pipelines change.
#[derive(Default)]
pub struct Routes {
    pub streams: BTreeMap<String, StreamHandle>,
}

impl Routes {
    /// Streams whose MQTT filters match a topic.
    pub fn for_topic<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = &'a StreamHandle> + 'a {
        self.streams
            .values()
            .filter(move |s| s.mqtt.iter().any(|f| outpost_api::pipeline::topic_matches(f, topic)))
    }
}

/// Shared by sources, workers and the sync link.
pub struct Shared {
    pub routes: RwLock<Arc<Routes>>,
    pub node: String,
    pub data_dir: PathBuf,
    pub opts: Options,
    /// Bytes in every stream's spool together.
    pub node_bytes: AtomicU64,
    /// The pipelines the node's desired state holds (persisted with it; the reconciler sets them).
    pub config: watch::Sender<NodePipelines>,
    /// What the manager made of each pipeline's revision (`namespace/name`), for its gate.
    pub applied: watch::Sender<BTreeMap<String, Applied>>,
    pub events: Option<Events>,
    pub hub: Option<Arc<crate::sync::HubClient>>,
    /// Bound listener addresses (written to listen.json).
    pub listening: Mutex<BTreeMap<String, String>>,
}

impl Shared {
    pub fn routes(&self) -> Arc<Routes> {
        self.routes.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Counters of every stream.
    pub fn stats(&self) -> Vec<StreamStats> {
        self.routes()
            .streams
            .values()
            .map(|s| s.stats.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect()
    }

    /// Send one record to a stream and wait until it is durable (or refused).
    pub async fn submit(&self, stream: &StreamHandle, value: Value, topic: Option<String>) -> Result<(), Rejected> {
        let (tx, rx) = oneshot::channel();
        let input = Input {
            value,
            topic,
            at: crate::reconcile::now_ms(),
            done: Some(tx),
        };
        if stream.tx.send(input).await.is_err() {
            return Err(Rejected::NoStream(stream.name.clone()));
        }
        rx.await
            .unwrap_or_else(|_| Err(Rejected::NoStream(stream.name.clone())))
    }

    fn write_listening(&self, tls: bool) {
        let mut l = self.listening.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if tls {
            l.insert("tls".into(), "true".into());
        }
        let path = self.data_dir.join("pipeline").join("listen.json");
        let _ = std::fs::create_dir_all(path.parent().expect("has a parent"));
        let _ = crate::spool::write_atomic(
            &path,
            serde_json::to_string_pretty(&l).unwrap_or_default().as_bytes(),
            false,
        );
    }
}

/// Environment variables for workloads: where to publish.
pub fn workload_env(data_dir: &Path) -> Vec<(String, String)> {
    let path = data_dir.join("pipeline").join("listen.json");
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let Ok(l) = serde_json::from_str::<BTreeMap<String, String>>(&text) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let tls = l.contains_key("tls");
    if let Some(a) = l.get("mqtt") {
        out.push((
            "OUTPOST_MQTT_URL".into(),
            format!("{}://{a}", if tls { "mqtts" } else { "mqtt" }),
        ));
    }
    if let Some(a) = l.get("ingest") {
        out.push((
            "OUTPOST_INGEST_URL".into(),
            format!("{}://{a}/v1/streams", if tls { "https" } else { "http" }),
        ));
    }
    out
}

/// The same for a Docker container, whose loopback is not the node's: only listeners bound to a
/// specific non-loopback address (e.g. the bridge's 172.17.0.1, or the site LAN address) are
/// reachable from it. Variables the container spec sets itself win.
pub fn add_container_env(data_dir: &Path, env: &mut Vec<(String, String)>) {
    for (k, v) in workload_env(data_dir) {
        let host = v.split("://").nth(1).and_then(|r| r.split('/').next()).unwrap_or("");
        let reachable = host
            .parse::<SocketAddr>()
            .is_ok_and(|a| !a.ip().is_loopback() && !a.ip().is_unspecified());
        if reachable && !env.iter().any(|(n, _)| *n == k) {
            env.push((k, v));
        }
    }
}

/// Each pipeline's last good revision on this node, kept across restarts so a revision that
/// fails after a restart still falls back.
fn good_path(data_dir: &Path) -> PathBuf {
    data_dir.join("pipeline").join("good.json")
}

fn load_good(data_dir: &Path) -> BTreeMap<String, NodePipeline> {
    std::fs::read(good_path(data_dir))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn save_good(data_dir: &Path, good: &BTreeMap<String, NodePipeline>) {
    let path = good_path(data_dir);
    let r = std::fs::create_dir_all(path.parent().expect("has a parent"))
        .and_then(|_| crate::spool::write_atomic(&path, &serde_json::to_vec(good).expect("serializable"), true));
    if let Err(e) = r {
        warn!(error = %e, path = %path.display(), "cannot keep the pipelines' last good revisions; a restart forgets them");
    }
}

/// How the reconciler drives the pipeline: it sets the pipelines of the node's desired state
/// (already persisted there) and reads back what became of each revision.
#[derive(Clone)]
pub struct PipelineLink {
    shared: Arc<Shared>,
}

impl PipelineLink {
    /// Run these pipelines (no-op when they are the ones running).
    pub fn set(&self, p: NodePipelines) {
        self.shared.config.send_if_modified(|cur| {
            if *cur == p {
                return false;
            }
            info!(pipelines = p.pipelines.len(), "new pipelines");
            *cur = p;
            true
        });
    }

    /// Per pipeline (`namespace/name`): the revision given, whether it started, what runs.
    pub fn applied(&self) -> watch::Receiver<BTreeMap<String, Applied>> {
        self.shared.applied.subscribe()
    }
}

/// `namespace/name` of a pipeline, as [`PipelineLink::applied`] keys it.
pub fn pipeline_id(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// Start the pipeline: listeners, and a manager that runs the streams of the pipelines the
/// reconciler sets (none until it does).
pub async fn start(
    data_dir: PathBuf,
    node: String,
    opts: Options,
    events: Option<Events>,
    hub: Option<Arc<crate::sync::HubClient>>,
    stop: watch::Receiver<bool>,
) -> PipelineLink {
    let (config, config_rx) = watch::channel(NodePipelines::default());
    let tls = match &opts.tls {
        None => None,
        Some((c, k)) => match tls_acceptor(c, k) {
            Ok(a) => Some(a),
            Err(e) => {
                // Never fall back to plain text when TLS was asked for: keep the listeners off.
                warn!(error = %e, "pipeline listeners stay off until their TLS certificate loads");
                return start_without_listeners(data_dir, node, opts, events, hub, stop);
            }
        },
    };
    let shared = Arc::new(Shared {
        routes: RwLock::new(Arc::new(Routes::default())),
        node,
        data_dir,
        opts: opts.clone(),
        node_bytes: AtomicU64::new(0),
        config,
        applied: watch::Sender::new(BTreeMap::new()),
        events,
        hub,
        listening: Mutex::new(BTreeMap::new()),
    });
    if let Some(addr) = opts.mqtt_listen {
        match mqtt::Broker::bind(addr, shared.clone(), tls.clone()).await {
            Ok(b) => {
                shared
                    .listening
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert("mqtt".into(), b.addr.to_string());
                info!(addr = %b.addr, "MQTT broker listening");
                tokio::spawn(b.run(stop.clone()));
            }
            Err(e) => {
                warn!(addr = %addr, error = %e, "cannot start the MQTT broker; MQTT sources are off (set OUTPOST_MQTT_LISTEN)")
            }
        }
    }
    if let Some(addr) = opts.ingest_listen {
        match http::bind(addr).await {
            Ok(l) => {
                let a = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
                shared
                    .listening
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert("ingest".into(), a.clone());
                info!(addr = %a, "HTTP ingest listening");
                tokio::spawn(http::serve(l, shared.clone(), tls.clone(), stop.clone()));
            }
            Err(e) => warn!(addr = %addr, error = %e, "cannot start HTTP ingest; set OUTPOST_INGEST_LISTEN"),
        }
    }
    shared.write_listening(tls.is_some());
    if let Some(site) = opts.site_mqtt.clone() {
        tokio::spawn(mqtt::site_client(site, shared.clone(), stop.clone()));
    }
    tokio::spawn(manage(shared.clone(), config_rx, stop));
    PipelineLink { shared }
}

/// The pipeline with its streams and sinks but no listeners (their TLS setup failed).
fn start_without_listeners(
    data_dir: PathBuf,
    node: String,
    opts: Options,
    events: Option<Events>,
    hub: Option<Arc<crate::sync::HubClient>>,
    stop: watch::Receiver<bool>,
) -> PipelineLink {
    let (config, config_rx) = watch::channel(NodePipelines::default());
    let shared = Arc::new(Shared {
        routes: RwLock::new(Arc::new(Routes::default())),
        node,
        data_dir,
        opts,
        node_bytes: AtomicU64::new(0),
        config,
        applied: watch::Sender::new(BTreeMap::new()),
        events,
        hub,
        listening: Mutex::new(BTreeMap::new()),
    });
    shared.write_listening(false);
    tokio::spawn(manage(shared.clone(), config_rx, stop));
    PipelineLink { shared }
}

/// One running stream: its task handles.
struct Running {
    spec_hash: String,
    handle: StreamHandle,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn stream_dir(data_dir: &Path, p: &NodePipeline, stream: &str) -> PathBuf {
    data_dir
        .join("spool")
        .join(format!("{}.{}.{}", p.namespace, p.name, stream))
}

/// Run the streams of the current pipelines; restart a stream when its spec changes. A
/// revision some stream of which cannot start is replaced by the pipeline's last good revision
/// on this node (`outpost_core::pipeline::effective`), and its gate says so.
async fn manage(shared: Arc<Shared>, mut config: watch::Receiver<NodePipelines>, mut stop: watch::Receiver<bool>) {
    let mut running: BTreeMap<String, Running> = BTreeMap::new();
    // Per pipeline id: the last revision all of whose streams started, and a revision that failed.
    let mut good = load_good(&shared.data_dir);
    let mut failed: BTreeMap<String, (u64, String)> = BTreeMap::new();
    loop {
        let want = config.borrow_and_update().clone();
        let mut errors: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut next: BTreeMap<String, (NodePipeline, StreamSpec)> = BTreeMap::new();
        let mut runs: BTreeMap<String, u64> = BTreeMap::new();
        for w in &want.pipelines {
            let id = pipeline_id(&w.namespace, &w.name);
            let p = outpost_core::pipeline::effective(w, good.get(&id), failed.get(&id).map(|f| f.0));
            runs.insert(id.clone(), p.revision);
            for s in &p.spec.streams {
                if let Some((other, _)) = next.get(&s.name) {
                    let e = format!(
                        "stream {} also belongs to pipeline {}; stream names are unique on a node",
                        s.name, other.name
                    );
                    warn!(pipeline = %p.name, stream = %s.name, "{e}");
                    errors.entry(id.clone()).or_default().push(e);
                    continue;
                }
                next.insert(s.name.clone(), (p.clone(), s.clone()));
            }
        }
        // Stop streams that went away or changed, then start the new ones.
        let hashes: BTreeMap<String, String> = next
            .iter()
            .map(|(k, (p, s))| (k.clone(), outpost_api::content_hash(&(s, &p.spec.sinks, &p.name))))
            .collect();
        let stale: Vec<String> = running
            .iter()
            .filter(|(k, r)| hashes.get(*k) != Some(&r.spec_hash))
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            if let Some(r) = running.remove(&k) {
                let _ = r.stop.send(true);
                drop(r.handle);
                for t in r.tasks {
                    let _ = t.await;
                }
                info!(stream = %k, "stream stopped");
            }
        }
        for (k, (p, s)) in &next {
            if running.contains_key(k) {
                continue;
            }
            match start_stream(&shared, p, s).await {
                Ok(r) => {
                    running.insert(
                        k.clone(),
                        Running {
                            spec_hash: hashes[k].clone(),
                            ..r
                        },
                    );
                }
                Err(e) => {
                    warn!(pipeline = %p.name, stream = %s.name, error = %e, "cannot start stream");
                    errors
                        .entry(pipeline_id(&p.namespace, &p.name))
                        .or_default()
                        .push(format!("stream {}: {e}", s.name));
                }
            }
        }
        let routes = Routes {
            streams: running.iter().map(|(k, r)| (k.clone(), r.handle.clone())).collect(),
        };
        *shared.routes.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(routes);
        // Judge each pipeline's revision; a failed one falls back to its good one at once.
        let before_judging = good.clone();
        let mut again = false;
        let mut applied = BTreeMap::new();
        for w in &want.pipelines {
            let id = pipeline_id(&w.namespace, &w.name);
            let ran = runs[&id];
            match errors.remove(&id) {
                None => {
                    if let Some(p) = want.pipelines.iter().chain(good.get(&id)).find(|p| p.revision == ran) {
                        good.insert(id.clone(), p.clone());
                    }
                }
                Some(e) if ran == w.revision => {
                    let why = e.join("; ");
                    let back = good.get(&id).is_some_and(|g| g.revision != w.revision);
                    if failed.get(&id).map(|f| f.0) != Some(w.revision) {
                        warn!(pipeline = %id, revision = w.revision, reason = %why,
                            back_to = good.get(&id).map(|g| g.revision), "pipeline revision failed on this node");
                    }
                    failed.insert(id.clone(), (w.revision, why));
                    again |= back;
                }
                // The good revision failed too (the disk, the spool): nothing better to run.
                Some(e) => {
                    warn!(pipeline = %id, revision = ran, reason = %e.join("; "), "the pipeline's last good revision fails too")
                }
            }
            let error = failed.get(&id).filter(|f| f.0 == w.revision).map(|f| f.1.clone());
            let running = match (&error, good.get(&id)) {
                (None, _) => Some(w.revision),
                (Some(_), Some(g)) if g.revision != w.revision => Some(g.revision),
                _ => None,
            };
            let mut a = Applied {
                revision: w.revision,
                error,
                running,
                since: crate::reconcile::now_ms(),
            };
            if let Some(prev) = shared.applied.borrow().get(&id).filter(|p| {
                Applied {
                    since: a.since,
                    ..(*p).clone()
                } == a
            }) {
                a.since = prev.since;
            }
            applied.insert(id, a);
        }
        good.retain(|id, _| applied.contains_key(id));
        failed.retain(|id, _| applied.contains_key(id));
        if good != before_judging {
            save_good(&shared.data_dir, &good);
        }
        shared.applied.send_if_modified(|cur| {
            let changed = *cur != applied;
            *cur = applied;
            changed
        });
        if again {
            continue;
        }
        tokio::select! {
            r = config.changed() => if r.is_err() { return },
            _ = stop.changed() => {
                for (_, r) in running {
                    let _ = r.stop.send(true);
                }
                return;
            }
        }
    }
}

async fn start_stream(shared: &Arc<Shared>, p: &NodePipeline, s: &StreamSpec) -> Result<Running, String> {
    let rules = StreamRules::new(s)?;
    let dir = stream_dir(&shared.data_dir, p, &s.name);
    let seg = shared.opts.segment_bytes;
    let d = dir.clone();
    let (spool, rec) = tokio::task::spawn_blocking(move || Spool::open(&d, seg))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let stats = Arc::new(Mutex::new(StreamStats {
        pipeline: p.name.clone(),
        stream: s.name.clone(),
        revision: p.revision,
        ..Default::default()
    }));
    let (tx, rx) = mpsc::channel(8192);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (committed_tx, committed_rx) = watch::channel(spool.next_seq().saturating_sub(1));
    let mut acked = Vec::new();
    let mut tasks = Vec::new();
    for sink_name in &s.sinks {
        let Some(sink) = p.spec.sinks.iter().find(|k| &k.name == sink_name) else {
            continue;
        };
        let a = Arc::new(AtomicU64::new(crate::spool::read_cursor(&dir, sink_name)));
        acked.push(a.clone());
        let ctx = sinks::SinkCtx {
            dir: dir.clone(),
            spool_id: spool.id().to_string(),
            node: shared.node.clone(),
            pipeline: p.name.clone(),
            stream: s.name.clone(),
            spec: sink.clone(),
            acked: a,
            committed: committed_rx.clone(),
            stats: stats.clone(),
            hub: shared.hub.clone(),
            stop: stop_rx.clone(),
        };
        tasks.push(tokio::spawn(sinks::run(ctx)));
    }
    if rec.skipped_bytes > 0 {
        warn!(stream = %s.name, skipped_bytes = rec.skipped_bytes, "spool: the newest segment ended in a torn or corrupt entry; skipped it and started a new segment");
        if let Some(ev) = &shared.events {
            ev.push(
                &s.name,
                SPOOL_CORRUPT_EVENT,
                &format!(
                    "stream {}: skipped {} damaged bytes at the end of the spool",
                    s.name, rec.skipped_bytes
                ),
            );
        }
        let mut st = stats.lock().unwrap_or_else(|p| p.into_inner());
        st.corrupt_bytes += rec.skipped_bytes;
        st.corrupt_spots += 1;
    }
    let worker = Worker {
        name: s.name.clone(),
        budget: s.budget_bytes(),
        when_full: s.when_full(),
        rules,
        spool,
        stats: stats.clone(),
        acked,
        committed: committed_tx,
        shared: shared.clone(),
        counted_bytes: 0,
        full_alert: false,
        written: 0,
        keep_topic: serde_json::to_string(s).unwrap_or_default().contains("$topic"),
        anomaly_alerts: BTreeMap::new(),
        infer: s.infer.as_ref().map(crate::inference::stage::Stage::new),
    };
    tasks.push(tokio::spawn(worker.run(rx, stop_rx)));
    info!(pipeline = %p.name, stream = %s.name, revision = p.revision, "stream started");
    Ok(Running {
        spec_hash: String::new(),
        handle: StreamHandle {
            name: s.name.clone(),
            pipeline: p.name.clone(),
            mqtt: s.mqtt.clone(),
            tx,
            stats,
        },
        stop: stop_tx,
        tasks,
    })
}

/// Inputs taken in one group commit at most.
const BATCH: usize = 4096;

struct Worker {
    name: String,
    budget: u64,
    when_full: WhenFull,
    rules: StreamRules,
    spool: Spool,
    stats: Arc<Mutex<StreamStats>>,
    acked: Vec<Arc<AtomicU64>>,
    committed: watch::Sender<u64>,
    shared: Arc<Shared>,
    /// This stream's bytes as counted in `shared.node_bytes`.
    counted_bytes: u64,
    full_alert: bool,
    written: u64,
    /// The rules read `$topic`: spool it with the record for replays.
    keep_topic: bool,
    /// Anomaly alerts firing: rule -> last match.
    anomaly_alerts: BTreeMap<String, UnixMs>,
    /// The stream's model stage (docs/inference.md), run before the rules.
    infer: Option<crate::inference::stage::Stage>,
}

/// Anomaly alerts resolve after this long without a match.
const ANOMALY_CLEAR_MS: i64 = 60_000;

impl Worker {
    /// Restore the newest checkpoint and replay the entries written after it.
    fn recover(&mut self) {
        let sealed = self.spool.sealed_paths_newest_first();
        // The newest sealed segment that starts with a readable checkpoint.
        let mut start: Option<usize> = None;
        for (i, (_, path)) in sealed.iter().enumerate() {
            let Ok(mut r) = SegmentReader::open(path) else { continue };
            if let Read1::Entry(e) = r.next_entry() {
                if e.kind == KIND_CHECKPOINT {
                    if let Ok(v) = serde_json::from_slice::<Value>(&e.payload) {
                        if let Err(err) = self.rules.restore(v) {
                            warn!(stream = %self.name, error = %err, "spool checkpoint does not fit the stream's rules; starting them afresh");
                        }
                        start = Some(i);
                        break;
                    }
                }
            }
        }
        let Some(start) = start else { return };
        let mut replayed = 0u64;
        for (_, path) in sealed[..=start].iter().rev() {
            let Ok(mut r) = SegmentReader::open(path) else { continue };
            loop {
                match r.next_entry() {
                    Read1::Entry(e) if e.kind == KIND_DATA => {
                        let Ok(d) = serde_json::from_slice::<DataEntry>(&e.payload) else {
                            continue;
                        };
                        if let Some(t) = d.tick {
                            self.rules.tick(t);
                        }
                        if let Some(raw) = &d.raw {
                            self.rules.ingest(raw, d.topic.as_deref(), e.at);
                            replayed += 1;
                        }
                    }
                    Read1::Entry(_) => {}
                    Read1::End | Read1::Corrupt { .. } => break,
                }
            }
        }
        if replayed > 0 {
            info!(stream = %self.name, replayed, "stream state restored from the spool");
        }
    }

    fn checkpoint(&mut self, now: UnixMs) -> Result<(), crate::spool::SpoolError> {
        let cp = serde_json::to_vec(&self.rules.checkpoint()).expect("serializable");
        self.spool.append(now, KIND_CHECKPOINT, &cp)?;
        Ok(())
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Input>, mut stop: watch::Receiver<bool>) {
        tokio::task::block_in_place(|| {
            self.recover();
            let now = crate::reconcile::now_ms();
            if let Err(e) = self.checkpoint(now).and_then(|_| self.spool.sync()) {
                warn!(stream = %self.name, error = %e, "cannot write the spool checkpoint");
            }
        });
        self.account();
        let _ = self.committed.send(self.spool.next_seq() - 1);
        let mut batch: Vec<Input> = Vec::with_capacity(BATCH);
        loop {
            let now = crate::reconcile::now_ms();
            let wait = self
                .rules
                .next_deadline()
                .map(|d| (d - now).clamp(0, 1000))
                .unwrap_or(1000) as u64;
            tokio::select! {
                n = rx.recv_many(&mut batch, BATCH) => {
                    if n == 0 { return; }
                }
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                _ = stop.changed() => return,
            }
            let mut inputs = std::mem::take(&mut batch);
            if let Some(stage) = &self.infer {
                inputs = self.predict(stage, inputs).await;
            }
            tokio::task::block_in_place(|| self.process(inputs));
        }
    }

    /// The model stage: each record becomes its prediction; one the model cannot take is
    /// refused to its publisher with the reason.
    async fn predict(&self, stage: &crate::inference::stage::Stage, inputs: Vec<Input>) -> Vec<Input> {
        let records: Vec<(Value, Option<String>)> = inputs.iter().map(|i| (i.value.clone(), i.topic.clone())).collect();
        let predictions = stage.run(&records).await;
        let mut kept = Vec::with_capacity(inputs.len());
        for (mut input, p) in inputs.into_iter().zip(predictions) {
            match p {
                Ok(v) => {
                    input.value = v;
                    kept.push(input);
                }
                Err(why) => {
                    let r = match why {
                        crate::inference::stage::StageError::Record(w) => Rejected::Unpredictable(self.name.clone(), w),
                        crate::inference::stage::StageError::Model(w) => Rejected::Model(self.name.clone(), w),
                    };
                    warn!(stream = %self.name, reason = %r, "model stage refused a record");
                    if let Some(d) = input.done.take() {
                        let _ = d.send(Err(r));
                    }
                }
            }
        }
        kept
    }

    /// Keep `shared.node_bytes` in step with this spool.
    fn account(&mut self) {
        let b = self.spool.bytes();
        if b >= self.counted_bytes {
            self.shared
                .node_bytes
                .fetch_add(b - self.counted_bytes, Ordering::Relaxed);
        } else {
            self.shared
                .node_bytes
                .fetch_sub(self.counted_bytes - b, Ordering::Relaxed);
        }
        self.counted_bytes = b;
    }

    fn over_budget(&self, extra: u64) -> bool {
        self.spool.bytes() + extra > self.budget
            || self.shared.node_bytes.load(Ordering::Relaxed) + extra > self.shared.opts.spool_max_bytes
    }

    /// Make room for `extra` bytes by the dropOldest policy. False when impossible.
    fn make_room(&mut self, extra: u64) -> bool {
        let mut dropped = 0u64;
        while self.over_budget(extra) {
            if self.spool.drop_oldest().map(|(a, b, _)| dropped += b - a).is_none() {
                // Only the newest segment is left: seal it so it can go too, keeping the
                // checkpoint at the start of the new one.
                if self.spool.active_base() == self.spool.next_seq() || self.spool.roll().is_err() {
                    break;
                }
                let _ = self.checkpoint(crate::reconcile::now_ms());
                if self.spool.drop_oldest().map(|(a, b, _)| dropped += b - a).is_none() {
                    break;
                }
            }
            self.account();
        }
        self.account();
        if dropped > 0 {
            self.stats.lock().unwrap_or_else(|p| p.into_inner()).dropped_entries += dropped;
            warn!(stream = %self.name, dropped_entries = dropped, budget = self.budget, "spool budget reached: dropped the oldest entries (policy dropOldest)");
            self.raise_full(&format!(
                "stream {}: spool budget reached, dropped {dropped} oldest entries (dropOldest)",
                self.name
            ));
        }
        !self.over_budget(extra)
    }

    fn raise_full(&mut self, summary: &str) {
        if self.full_alert {
            return;
        }
        self.full_alert = true;
        if let Some(ev) = &self.shared.events {
            ev.push(&self.name, ALERT_FIRING, &format!("{SPOOL_FULL_ALERT}: {summary}"));
        }
    }

    fn process(&mut self, inputs: Vec<Input>) {
        let now = crate::reconcile::now_ms();
        if self.spool.should_roll() {
            if let Err(e) = self.spool.roll().and_then(|_| self.checkpoint(now)) {
                warn!(stream = %self.name, error = %e, "cannot start a new spool segment");
            }
        }
        let stateful = self.rules.stateful();
        let mut acks: Vec<(Done, Result<(), Rejected>)> = Vec::new();
        let mut err: Option<String> = None;
        let mut rejected = 0u64;
        let mut alerts: Vec<(String, String)> = Vec::new();
        // Windows that ended while nothing arrived.
        let ticked = self.rules.tick(now);
        if !ticked.is_empty() {
            let entry = DataEntry {
                tick: Some(now),
                outs: ticked,
                ..Default::default()
            };
            if let Err(e) = self.write(now, &entry) {
                err = Some(e);
            }
        }
        for input in inputs {
            // What the entry will take, from the average so far (serializing twice is costly).
            let estimate = 64
                + self
                    .written
                    .checked_div(self.spool.next_seq().max(2) - 1)
                    .unwrap_or(256)
                    .max(64);
            let room =
                !self.over_budget(estimate) || (self.when_full == WhenFull::DropOldest && self.make_room(estimate));
            if !room || err.is_some() {
                let why = match &err {
                    Some(e) => Rejected::Spool(self.name.clone(), e.clone()),
                    None => {
                        rejected += 1;
                        Rejected::Full(self.name.clone())
                    }
                };
                if let Some(d) = input.done {
                    acks.push((d, Err(why)));
                }
                continue;
            }
            let filtered_before = self.rules.state.counters.filtered;
            let outs = self.rules.ingest(&input.value, input.topic.as_deref(), input.at);
            let changed_state = stateful && self.rules.state.counters.filtered == filtered_before;
            let Input {
                value, topic, at, done, ..
            } = input;
            for o in &outs {
                for a in &o.alerts {
                    alerts.push((a.clone(), format!("{}", o.data)));
                }
            }
            if !outs.is_empty() || changed_state {
                let entry = DataEntry {
                    raw: changed_state.then_some(value),
                    topic: if changed_state && self.keep_topic { topic } else { None },
                    tick: None,
                    outs,
                };
                if let Err(e) = self.write(at, &entry) {
                    err = Some(e.clone());
                    if let Some(d) = done {
                        acks.push((d, Err(Rejected::Spool(self.name.clone(), e))));
                    }
                    continue;
                }
            }
            if let Some(d) = done {
                acks.push((d, Ok(())));
            }
        }
        if let Err(e) = self.spool.sync() {
            let e = e.to_string();
            warn!(stream = %self.name, error = %e, "spool fsync failed; refusing this batch");
            for (_, r) in acks.iter_mut() {
                if r.is_ok() {
                    *r = Err(Rejected::Spool(self.name.clone(), e.clone()));
                }
            }
        } else {
            let _ = self.committed.send(self.spool.next_seq() - 1);
        }
        for (d, r) in acks {
            let _ = d.send(r);
        }
        // Collect what every sink has delivered.
        let min_acked = self.acked.iter().map(|a| a.load(Ordering::Relaxed)).min().unwrap_or(0);
        self.spool.gc(min_acked);
        self.account();
        if rejected > 0 {
            warn!(stream = %self.name, rejected, budget = self.budget, "spool budget reached: refusing new records (policy rejectNewest)");
            self.raise_full(&format!(
                "stream {}: spool budget reached, refusing new records (rejectNewest)",
                self.name
            ));
        }
        // Resolved once the sinks have drained the spool under half its budget (with dropOldest
        // the spool stays near its budget while the sink is away: the alert stays too).
        let drained = self.spool.bytes() < self.budget / 2
            && self.shared.node_bytes.load(Ordering::Relaxed) < self.shared.opts.spool_max_bytes / 2;
        if self.full_alert && drained {
            self.full_alert = false;
            if let Some(ev) = &self.shared.events {
                ev.push(
                    &self.name,
                    ALERT_RESOLVED,
                    &format!(
                        "{SPOOL_FULL_ALERT}: stream {}: the spool is under half its budget again",
                        self.name
                    ),
                );
            }
        }
        for (rule, data) in alerts {
            let first = !self.anomaly_alerts.contains_key(&rule);
            self.anomaly_alerts.insert(rule.clone(), now);
            if first {
                if let Some(ev) = &self.shared.events {
                    let mut d = data;
                    d.truncate(200);
                    ev.push(
                        &format!("{}/{rule}", self.name),
                        ALERT_FIRING,
                        &format!("{ANOMALY_ALERT}: stream {} rule {rule} matched: {d}", self.name),
                    );
                }
            }
        }
        let cleared: Vec<String> = self
            .anomaly_alerts
            .iter()
            .filter(|(_, t)| now - **t > ANOMALY_CLEAR_MS)
            .map(|(r, _)| r.clone())
            .collect();
        for rule in cleared {
            self.anomaly_alerts.remove(&rule);
            if let Some(ev) = &self.shared.events {
                ev.push(
                    &format!("{}/{rule}", self.name),
                    ALERT_RESOLVED,
                    &format!(
                        "{ANOMALY_ALERT}: stream {} rule {rule}: no match for a minute",
                        self.name
                    ),
                );
            }
        }
        let mut st = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        st.rules = self.rules.state.counters.clone();
        st.rejected += rejected;
        st.spool_bytes = self.spool.bytes();
        st.spool_entries = self.spool.next_seq() - self.spool.first_seq();
        st.committed = self.spool.next_seq() - 1;
        st.written_bytes = self.written;
    }

    fn write(&mut self, at: UnixMs, entry: &DataEntry) -> Result<(), String> {
        let bytes = serde_json::to_vec(entry).expect("serializable");
        self.written += bytes.len() as u64 + 25;
        self.spool
            .append(at, KIND_DATA, &bytes)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containers_get_only_listeners_they_can_reach() {
        let tmp = tempfile::tempdir().unwrap();
        let write = |m: &str, i: &str| {
            std::fs::create_dir_all(tmp.path().join("pipeline")).unwrap();
            let l: BTreeMap<&str, &str> = [("mqtt", m), ("ingest", i)].into();
            std::fs::write(
                tmp.path().join("pipeline/listen.json"),
                serde_json::to_string(&l).unwrap(),
            )
            .unwrap();
        };
        write("127.0.0.1:1883", "172.17.0.1:7878");
        let mut env = vec![("A".to_string(), "1".to_string())];
        add_container_env(tmp.path(), &mut env);
        assert_eq!(
            env,
            vec![
                ("A".into(), "1".into()),
                ("OUTPOST_INGEST_URL".into(), "http://172.17.0.1:7878/v1/streams".into())
            ]
        );
        assert_eq!(workload_env(tmp.path()).len(), 2, "processes get both");
        write("0.0.0.0:1883", "192.168.1.5:7878");
        let mut env = vec![("OUTPOST_INGEST_URL".to_string(), "mine".to_string())];
        add_container_env(tmp.path(), &mut env);
        assert_eq!(
            env,
            vec![("OUTPOST_INGEST_URL".into(), "mine".into())],
            "the spec's own value wins"
        );
    }
}
