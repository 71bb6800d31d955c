//! Shared hub state: the store, the long-poll wake-ups, and the write path that keeps objects,
//! nodes and desired state consistent (one writer at a time, reschedule after each change).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_api::{ObjectId, UnixMs};
use outpost_pki::CaMaterial;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::error::HubError;
use crate::scheduler;
use crate::store::{Store, StoreError};

pub struct HubState {
    pub store: Arc<dyn Store>,
    pub ca: CaMaterial,
    pub ca_fingerprint: String,
    pub admin_token_sha256: [u8; 32],
    pub offline_after: Duration,
    pub long_poll: Duration,
    /// Serializes every change to objects and nodes together with the reschedule that follows,
    /// so validation, write and placement see one consistent state.
    pub write_lock: tokio::sync::Mutex<()>,
    /// Per node: the latest generation, to wake waiting long-polls.
    watchers: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// Why workloads are short of replicas, from the last reschedule.
    notes: Mutex<BTreeMap<ObjectId, String>>,
    /// Where pushed image archives live (`<data-dir>/images`).
    pub images_dir: std::path::PathBuf,
    /// Which host paths an apply may mount (set by `Hub::start` from `HubConfig`).
    pub host_paths: crate::validate::HostPathPolicy,
    /// How long the node certificates the hub signs are valid.
    pub node_cert_lifetime: Duration,
    /// Alerts, vitals, forwarded errors, webhooks, log requests (replaced by `Hub::start`).
    pub monitor: Arc<crate::alerts::Monitor>,
    /// Pipeline records and the pipelines nodes get (replaced by `Hub::start`).
    pub data: Arc<crate::data::DataStore>,
    /// Status reports waiting for the group-commit writer.
    status_tx: tokio::sync::mpsc::UnboundedSender<StatusJob>,
    status_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<StatusJob>>>,
}

/// One status report for the group-commit writer, with where to send the outcome.
struct StatusJob {
    node: String,
    report: outpost_api::StatusReport,
    now: outpost_api::UnixMs,
    reply: tokio::sync::oneshot::Sender<Result<u64, HubError>>,
}

/// Reports committed in one transaction at most.
const STATUS_BATCH: usize = 512;

pub fn sha256(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

pub fn sha256_hex(s: &str) -> String {
    hex::encode(sha256(s))
}

impl HubState {
    pub fn new(
        store: Arc<dyn Store>,
        ca: CaMaterial,
        ca_fingerprint: String,
        admin_token: &str,
        offline_after: Duration,
        long_poll: Duration,
    ) -> Self {
        let (status_tx, status_rx) = tokio::sync::mpsc::unbounded_channel();
        Self {
            store,
            ca,
            ca_fingerprint,
            admin_token_sha256: sha256(admin_token),
            offline_after,
            long_poll,
            write_lock: tokio::sync::Mutex::new(()),
            watchers: Mutex::new(HashMap::new()),
            notes: Mutex::new(BTreeMap::new()),
            images_dir: std::path::PathBuf::from("images"),
            host_paths: Default::default(),
            node_cert_lifetime: outpost_pki::NODE_CERT_LIFETIME,
            monitor: Arc::new(crate::alerts::Monitor::in_memory()),
            data: Arc::new(crate::data::DataStore::in_memory()),
            status_tx,
            status_rx: Mutex::new(Some(status_rx)),
        }
    }

    /// Store a status report. Reports that arrive while a commit is under way are committed
    /// together in the next transaction (group commit): one fsync for many nodes.
    pub async fn record_status(
        &self,
        node: String,
        report: outpost_api::StatusReport,
        now: outpost_api::UnixMs,
    ) -> Result<u64, HubError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.status_tx
            .send(StatusJob {
                node,
                report,
                now,
                reply,
            })
            .map_err(|_| HubError::Internal("the status writer stopped".into()))?;
        rx.await
            .map_err(|_| HubError::Internal("the status writer stopped".into()))?
    }

    /// Start the group-commit writer (once, from `Hub::start`).
    pub fn spawn_status_writer(self: &Arc<Self>) {
        let Some(mut rx) = self.status_rx.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let st = self.clone();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut jobs = vec![first];
                while jobs.len() < STATUS_BATCH {
                    match rx.try_recv() {
                        Ok(j) => jobs.push(j),
                        Err(_) => break,
                    }
                }
                let (items, replies): (Vec<_>, Vec<_>) =
                    jobs.into_iter().map(|j| ((j.node, j.report, j.now), j.reply)).unzip();
                let n = items.len();
                match st.db(move |s| s.record_statuses(&items)).await {
                    Ok(results) => {
                        for (reply, r) in replies.into_iter().zip(results) {
                            let _ = reply.send(r.map_err(HubError::Internal));
                        }
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        for reply in replies {
                            let _ = reply.send(Err(HubError::Internal(msg.clone())));
                        }
                    }
                }
                tracing::trace!(reports = n, "status batch committed");
            }
        });
    }

    /// Wake a node's waiting long-poll without a generation change (log requests).
    pub fn wake(&self, node: &str) {
        let w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = w.get(node) {
            tx.send_modify(|_| {});
        }
    }

    /// Wake every waiting long-poll (a new alert policy).
    pub fn wake_all(&self) {
        let w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        for tx in w.values() {
            tx.send_modify(|_| {});
        }
    }

    /// Run a short store operation on the blocking pool.
    pub async fn db<T, F>(&self, f: F) -> Result<T, HubError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&*store))
            .await
            .map_err(|e| HubError::Internal(format!("database task failed: {e}")))?
            .map_err(HubError::from)
    }

    /// A receiver that wakes when the node's generation changes.
    pub fn subscribe(&self, node: &str) -> watch::Receiver<u64> {
        let mut w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        w.entry(node.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    fn notify(&self, bumped: &BTreeMap<String, u64>) {
        let mut w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        for (node, gen) in bumped {
            w.entry(node.clone())
                .or_insert_with(|| watch::channel(0).0)
                .send_replace(*gen);
        }
    }

    /// Wake and forget a deleted node's long-polls (their receivers see the sender dropped).
    pub fn forget_node(&self, node: &str) {
        let mut w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        w.remove(node);
    }

    pub fn note(&self, id: &ObjectId) -> Option<String> {
        self.notes.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    /// Recompute every node's desired state and wake the nodes whose generation moved.
    /// Callers hold `write_lock`.
    pub async fn reschedule_locked(&self, now: UnixMs) -> Result<(), HubError> {
        let offline_after = self.offline_after;
        let (bumped, notes) = self
            .db(move |s| {
                let inputs = s.schedule_inputs()?;
                let plan = scheduler::plan(&inputs, offline_after, now);
                let bumped = s.commit_plan(&plan)?;
                Ok((bumped, plan.notes))
            })
            .await?;
        for (node, generation) in &bumped {
            tracing::info!(node = %node, generation, "desired state changed");
        }
        *self.notes.lock().unwrap_or_else(|p| p.into_inner()) = notes;
        self.notify(&bumped);
        // AlertPolicy objects or node labels may have changed: refresh effective policies.
        if let Err(e) = crate::alerts::refresh_policies(self).await {
            tracing::warn!(error = %e, "cannot refresh alert policies; nodes keep their last one");
        }
        if let Err(e) = crate::data::refresh_pipelines(self).await {
            tracing::warn!(error = %e, "cannot refresh pipelines; nodes keep their last ones");
        }
        Ok(())
    }

    pub async fn reschedule(&self, now: UnixMs) -> Result<(), HubError> {
        let _guard = self.write_lock.lock().await;
        self.reschedule_locked(now).await
    }
}
