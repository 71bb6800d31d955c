//! The outpost agent: joins a hub, keeps the node's desired state on local disk, and runs it
//! whether or not the hub is reachable.
//!
//! Owns: the node's identity (`identity`), its durable state (`store`), the process runtime
//! (`runtime`), the reconcile loop that executes `outpost-core`'s supervision decisions
//! (`reconcile`), the link to the hub (`sync`), image prefetch before maintenance windows
//! (`prefetch`), and monitoring: vital signs (`vitals`), alerts
//! evaluated on the node (`alerts`), workload log rotation, error forwarding and log requests
//! (`logs`), and the edge data pipeline: MQTT broker, HTTP ingest, stream rules, sinks
//! (`pipeline`) over the durable spool (`spool`).
//!
//! Must never: need the hub to start, restart or keep a workload; open a port to the WAN (agents
//! dial out; the pipeline's listeners bind to loopback unless told otherwise); acknowledge a
//! pipeline record before it is in the spool; act on a desired state before it is persisted;
//! run two processes for one unit.
//!
//! Start-up order (`run`): open the store (quarantine it if corrupt, restore a new one from its
//! export; see `store`) -> load the last desired state -> bind the pipeline's listeners
//! (loopback by default; workloads are told where they are) -> adopt processes that survived an
//! agent restart -> start what is missing -> only then try the hub. When the store is new and
//! nothing could be restored, adopted processes and containers are kept running, not stopped,
//! until the hub's first answer says what should run.

pub mod alerts;
pub mod docker;
pub mod exec;
pub mod identity;
pub mod images;
pub mod inference;
pub mod jobs;
pub mod local;
pub mod lock;
pub mod logs;
pub mod pipeline;
pub mod prefetch;
pub mod probe;
pub mod reconcile;
pub mod runtime;
pub mod security;
pub mod selfupdate;
pub mod site;
pub mod spool;
pub mod store;
pub mod sync;
pub mod vitals;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;
use tracing::info;

use outpost_api::now_ms;

pub use identity::{join, Identity, JoinError, JoinOptions};

pub struct RunOptions {
    pub data_dir: PathBuf,
    /// Override the hub URL stored at join time.
    pub hub: Option<String>,
    /// The Docker Engine's (or podman's) API socket; default `/var/run/docker.sock`.
    pub docker_socket: Option<String>,
    /// Stop every workload when the agent exits (the demo). Normally workloads keep running
    /// and the next agent start re-adopts them.
    pub stop_workloads_on_exit: bool,
    /// Single-box mode: also run the workloads of this manifest directory (`local`); with no
    /// hub joined, run only these.
    pub manifests: Option<PathBuf>,
    /// The node's name when it has not joined a hub (default: the host name).
    pub name: Option<String>,
    /// The node's labels when it has not joined a hub (local workloads select by them).
    pub labels: outpost_api::Labels,
    /// The edge data pipeline's listeners and spool budget.
    pub pipeline: pipeline::Options,
}

/// Stop every workload the agent of `data_dir` runs (processes: SIGTERM, SIGKILL after 10 s;
/// its Docker containers: stopped and removed). For `outpost agent uninstall`, after the
/// service stopped the agent alone. Returns how many were stopped.
pub async fn stop_all_workloads(data_dir: &std::path::Path) -> usize {
    use nix::sys::signal::Signal;
    let rt = runtime::Runtime::new(data_dir, "");
    let owned = runtime::scan_owned(&rt.agent_id);
    for p in &owned {
        runtime::signal_group(p.pid, Signal::SIGTERM);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while owned.iter().any(|p| runtime::alive(p.pid, p.start_ticks)) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for p in owned.iter().filter(|p| runtime::alive(p.pid, p.start_ticks)) {
        runtime::signal_group(p.pid, Signal::SIGKILL);
    }
    let mut n = owned.len();
    if let Ok(engine) = docker::Engine::connect(docker::DEFAULT_SOCKET, &rt.agent_id).await {
        for c in engine.list_owned().await.unwrap_or_default() {
            engine.stop(&c.id, 10).await;
            let _ = engine.remove(&c.id).await;
            n += 1;
        }
    }
    n
}

/// This host's name, for a node that has not joined a hub.
pub fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .map(|h| h.to_ascii_lowercase())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The next delay of a retry loop, with a fresh random jitter draw (the policy itself is the
/// pure `outpost_core::retry`).
pub(crate) fn retry_delay(b: &mut outpost_core::retry::Backoff) -> std::time::Duration {
    std::time::Duration::from_millis(b.next_delay_ms(rand::random()))
}

/// Say how the store was recovered: a log line (from `store`) and a node event for the hub.
fn report_recovery(store: &store::Store, r: &store::Recovery, desired: &store::Desired) {
    let source = match (r.restored, &r.export_error) {
        (Some(g), _) => format!(
            "the desired state (generation {g}, {} workloads) and update gates were restored from {}",
            desired.workloads.len(),
            store::EXPORT_FILE
        ),
        (None, Some(e)) => format!("the export is unusable ({e}); the desired state comes from the hub"),
        (None, None) => "no export exists; the desired state comes from the hub".to_string(),
    };
    let mut event = None;
    if let Some((moved, why)) = &r.quarantined {
        event = Some((
            store::EVENT_QUARANTINED,
            format!(
                "state.db was corrupt ({why}); moved to {} and a new one started; {source}; running \
                 workloads were adopted, not restarted",
                moved.display()
            ),
        ));
    } else if r.restored.is_some() || r.export_error.is_some() {
        event = Some((
            store::EVENT_RESTORED,
            format!("state.db was missing or empty; {source}; running workloads were adopted, not restarted"),
        ));
    }
    if let Some((reason, message)) = event {
        tracing::warn!(%reason, "{message}");
        if let Err(e) = store.push_event(now_ms(), None, reason, &message) {
            tracing::error!(error = %e, "cannot record the recovery event; it is held in memory");
        }
    }
}

/// Run the agent until `shutdown` resolves.
pub async fn run(o: RunOptions, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    // Before anything else: no second agent here, and no child of a killed one still between
    // fork and exec, where the scan for our processes could not see it (see `lock`).
    std::fs::create_dir_all(&o.data_dir)
        .with_context(|| format!("cannot create the data dir {}", o.data_dir.display()))?;
    let data_dir = o.data_dir.clone();
    let _lock = tokio::task::spawn_blocking(move || lock::acquire(&data_dir, lock::WAIT))
        .await
        .context("the agent lock task failed")?
        .map_err(anyhow::Error::msg)?;
    let identity = if Identity::exists(&o.data_dir) || o.manifests.is_none() {
        let mut identity = Identity::load(&o.data_dir).map_err(anyhow::Error::msg)?;
        if let Some(h) = &o.hub {
            identity.hub = h.trim_end_matches('/').to_string();
            // An explicit hub URL is the only one used (lists the hubs advertise are ignored).
            identity.pinned = true;
        }
        Some(identity)
    } else {
        None
    };
    let node = identity
        .as_ref()
        .map(|i| i.node.clone())
        .or_else(|| o.name.clone())
        .unwrap_or_else(host_name);
    let labels = identity.as_ref().map_or_else(|| o.labels.clone(), |i| i.labels.clone());
    let (store, recovery) = store::Store::open_or_recover(&o.data_dir.join("state.db"), now_ms())?;
    let store = Arc::new(store);
    let outbox = Arc::new(tokio::sync::Notify::new());
    store.set_notify(outbox.clone());
    let desired = Arc::new(store.load_desired().context("loading the local desired state")?);
    info!(node = %node, generation = desired.generation, workloads = desired.workloads.len(),
        hub = identity.is_some(), manifests = ?o.manifests, "agent starting from local state");
    report_recovery(&store, &recovery, &desired);
    selfupdate::at_start(&o.data_dir, &store);
    // Nothing says what should run: keep what runs until the hub does.
    let hold = identity.is_some() && recovery.fresh && recovery.restored.is_none();

    let (desired_tx, desired_rx) = watch::channel(desired.clone());
    let (status_tx, status_rx) = watch::channel(reconcile::Snapshot::new());
    let (stop_tx, stop_rx) = watch::channel(false);

    let rt = runtime::Runtime::new(&o.data_dir, &node);
    let agent_id = rt.agent_id.clone();
    let agent_id_for_prefetch = agent_id.clone();
    let client = match identity {
        Some(id) => Some(Arc::new(sync::HubClient::new(id, o.data_dir.clone())?)),
        None => None,
    };
    let socket = o
        .docker_socket
        .clone()
        .unwrap_or_else(|| docker::DEFAULT_SOCKET.to_string());
    let socket_for_prefetch = socket.clone();
    // The edge data pipeline: listeners on loopback by default, streams of the pipelines in
    // the desired state, which the reconciler hands over (docs/pipeline.md).
    let pipelines = pipeline::start(
        o.data_dir.clone(),
        node.clone(),
        o.pipeline.clone(),
        Some(pipeline::Events {
            store: store.clone(),
            outbox: outbox.clone(),
        }),
        client.clone(),
        stop_rx.clone(),
    )
    .await;
    // The model servers' counters, read every second while models are served (vitals, alerts,
    // the model gate; docs/inference.md).
    let models = inference::stats::Board::default();
    let stats_every = std::time::Duration::from_millis(
        std::env::var("OUTPOST_MODEL_STATS_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000u64)
            .max(50),
    );
    tokio::spawn(inference::stats::scrape_loop(
        models.clone(),
        stats_every,
        stop_rx.clone(),
    ));
    let mut reconciler = reconcile::Reconciler::new(rt, store.clone(), desired, status_tx, client.clone(), socket)
        .hold_until_synced(hold)
        .with_pipelines(pipelines)
        .with_models(models.clone());
    if let Some(dir) = &o.manifests {
        let src = local::Source {
            dir: dir.clone(),
            node: node.clone(),
            labels: local::node_labels(&node, &labels),
            revisions_file: o.data_dir.join("local-revisions.json"),
        };
        let (first, fingerprint) = src.initial();
        let (local_tx, local_rx) = watch::channel(first);
        reconciler = reconciler.with_local(local_rx);
        tokio::spawn(src.watch(fingerprint, local_tx, stop_rx.clone()));
    }
    // Site failover (docs/site-ha.md): the peer link decides which failover copies run here.
    if let Some(c) = client.as_ref() {
        let running = site::running_copies(&store, &runtime::scan_owned(&agent_id_for_prefetch));
        let (roles_tx, roles_rx) = watch::channel(running.clone());
        reconciler = reconciler.with_site_roles(roles_rx);
        let id = c.identity.read().await.clone();
        let link = site::SiteLink {
            node: node.clone(),
            client: Some(c.clone()),
            running,
            ca_pem: id.ca_pem.clone(),
            cert_pem: id.cert_pem.clone(),
            key_pem: id.key_pem.clone(),
            store: store.clone(),
            deadline_ms: std::env::var("OUTPOST_SITE_DEADLINE_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(outpost_core::site_ha::DEADLINE_MS),
        };
        tokio::spawn(link.run(desired_rx.clone(), roles_tx, stop_rx.clone()));
    }
    let (lookup_tx, lookup_rx) = tokio::sync::mpsc::unbounded_channel();
    reconciler = reconciler.with_exec(lookup_rx);
    let rec = tokio::spawn(reconciler.run(desired_rx.clone(), stop_rx.clone(), o.stop_workloads_on_exit));

    // Monitoring: vital signs and node alerts, log rotation and error forwarding, log requests.
    store.init_monitoring()?;
    let (policy_tx, policy_rx) = watch::channel(alerts::load_policy(&store));
    let (vitals_tx, vitals_rx) = watch::channel(None);
    let (logreq_tx, logreq_rx) = tokio::sync::mpsc::unbounded_channel();
    let (vitalsreq_tx, vitalsreq_rx) = tokio::sync::mpsc::unbounded_channel();
    let (exec_tx, exec_rx) = tokio::sync::mpsc::unbounded_channel();
    let (prefetch_tx, prefetch_rx) = tokio::sync::mpsc::unbounded_channel();
    let errors_ready = Arc::new(tokio::sync::Notify::new());
    let mon_cfg = alerts::MonitorConfig::from_env();
    let monitor = alerts::MonitorLink {
        policy: Arc::new(policy_tx),
        vitals: vitals_rx,
        outbox: outbox.clone(),
        log_requests: logreq_tx,
        vitals_requests: vitalsreq_tx,
        exec: exec_tx,
        prefetch: prefetch_tx,
        store: store.clone(),
        report_every: mon_cfg.report_every,
        max_silence_ms: mon_cfg.max_silence_ms,
    };
    let m1 = tokio::spawn(alerts::monitor_loop(
        store.clone(),
        o.data_dir.clone(),
        agent_id,
        policy_rx.clone(),
        status_rx.clone(),
        vitals_tx,
        outbox,
        mon_cfg,
        models,
        stop_rx.clone(),
    ));
    let m2 = tokio::spawn(logs::log_loop(
        o.data_dir.clone(),
        store.clone(),
        policy_rx,
        logs::LogConfig::from_env(),
        errors_ready.clone(),
        stop_rx.clone(),
    ));
    let mut tasks = vec![m1, m2];
    // Without a hub nothing sends a desired state, but the reconciler's channel stays open.
    let mut _hub_desired = None;
    match client {
        Some(client) => {
            tasks.push(tokio::spawn(logs::forward_loop(
                client.clone(),
                store.clone(),
                errors_ready,
                stop_rx.clone(),
            )));
            tasks.push(tokio::spawn(logs::request_loop(
                client.clone(),
                o.data_dir.clone(),
                logreq_rx,
            )));
            tasks.push(tokio::spawn(alerts::vitals_request_loop(
                client.clone(),
                store.clone(),
                vitalsreq_rx,
            )));
            tasks.push(tokio::spawn(exec::request_loop(client.clone(), lookup_tx, exec_rx)));
            tasks.push(tokio::spawn(prefetch::prefetch_loop(
                client.clone(),
                o.data_dir.clone(),
                socket_for_prefetch,
                agent_id_for_prefetch,
                prefetch_rx,
            )));
            tasks.push(tokio::spawn(selfupdate::update_loop(
                client.clone(),
                o.data_dir.clone(),
                store.clone(),
                desired_rx.clone(),
                stop_rx.clone(),
            )));
            tasks.push(tokio::spawn(sync::sync_loop(
                client.clone(),
                store.clone(),
                desired_tx,
                monitor.clone(),
                stop_rx.clone(),
            )));
            tasks.push(tokio::spawn(sync::status_loop(
                client, store, status_rx, desired_rx, started, monitor, stop_rx,
            )));
        }
        None => {
            // No hub: the status is kept on the node, in <data-dir>/status.json; the desired
            // state (and its pipelines) persisted from an earlier hub keeps running.
            _hub_desired = Some(desired_tx);
            drop((
                logreq_rx,
                vitalsreq_rx,
                prefetch_rx,
                errors_ready,
                monitor,
                started,
                desired_rx,
            ));
            tasks.push(tokio::spawn(local_status_loop(
                o.data_dir.join("status.json"),
                status_rx,
                stop_rx,
            )));
        }
    }

    shutdown.await;
    info!("agent shutting down");
    let _ = stop_tx.send(true);
    let _ = rec.await;
    for t in tasks {
        t.abort();
    }
    Ok(())
}

/// Hub-less mode: write each status snapshot to `path` (JSON, by workload key) for the
/// operator on the box (`cat`, `jq`) and for scripts.
async fn local_status_loop(
    path: PathBuf,
    mut status: watch::Receiver<reconcile::Snapshot>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let snap = status.borrow_and_update().clone();
        if let Ok(b) = serde_json::to_vec_pretty(&snap) {
            if let Err(e) = identity::write_atomic(&path, &b, 0o644) {
                tracing::warn!(error = %e, "cannot write {}", path.display());
            }
        }
        tokio::select! {
            r = status.changed() => if r.is_err() { return },
            _ = stop.changed() => return,
        }
    }
}
