//! The hub's one command layer: every change an operator (or, later, GitOps and the dashboard)
//! can make is a [`Command`], every read a [`Query`], and [`Service::execute`] /
//! [`Service::query`] run them. HTTP handlers only decode a request into one of these, call the
//! service and encode the [`Reply`]; the controllers (`crate::controllers`) call the same
//! service. The node protocol (join, sync, status, renew, forwarded errors, log answers) is a
//! set of typed methods on the same service, authorized by the caller's certificate ([`Peer`]).
//!
//! The service owns the hub's state, split by concern: the desired-state [`Store`], the
//! monitoring tables ([`Monitor`]), the pipeline records and the Pipeline cache
//! ([`DataStore`]), the counters ([`Metrics`]), the CA and admin token ([`Authority`]),
//! settings ([`Settings`]), the node links (long-poll wake-ups and log relay, [`Links`]), the
//! alert-policy cache and the controllers' wake-ups ([`Wakeups`]).
//!
//! Every change to objects and nodes holds `write_lock` through validation, the write and the
//! reschedule that follows, so they see one consistent state.
//!
//! Must never: speak HTTP (status codes live in `crate::error` only), decide placement, a
//! rollout step or an alert itself (those are `outpost-core`'s pure functions), or block an
//! async task on SQLite (the store is async: `SqliteStore` runs its calls on the blocking pool;
//! the monitoring tables are the async [`MonitorStore`]; accounts and pipeline records go
//! through their async stores).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use outpost_api::{
    AlertInfo, AlertPolicySpec, ApplyResponse, ApplyResult, DeleteResponse, ErrorBatch, ImageTag, JoinRequest,
    JoinResponse, JoinToken, Kind, LogData, LogRequest, ManifestFile, NodeCondition, NodeEvent, NodeInfo, NodePolicy,
    Object, ObjectId, RenewRequest, RevisionInfo, StatusReport, StatusWithVitals, StoredErrorLine, SyncAnswer,
    TokenRequest, TokenResponse, UnixMs, Vitals, WorkloadInfo, WorkloadStatus, ALERT_FIRING, ALERT_RESOLVED,
};
use outpost_pki::CaMaterial;
use sha2::{Digest, Sha256};
use tokio::sync::{watch, Notify};

use crate::data::{DataQuery, DataStore};
use crate::error::{human_duration, HubError};
use crate::files::random_hex;
use crate::logs::LogBroker;
use crate::metrics::{FleetView, Metrics};
use crate::monitor::{MonitorConfig, MonitorStore};
use crate::scheduler::{self, is_online};
use crate::store::{check_token, NewNode, Store, TokenRow};
use crate::validate;
use crate::views::{self, View};
use outpost_api::pipeline::{DataBatch, PipelineInfo, RecordKind, StoredRecord};
use outpost_api::{RolloutActionResult, RolloutInfo, RolloutPhase};
use outpost_core::lease::Fence;
use outpost_core::render::workload_key;
use outpost_core::waves::{self, Decision, Rollout};

pub use outpost_api::now_ms;

pub fn sha256(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

pub fn sha256_hex(s: &str) -> String {
    hex::encode(sha256(s))
}

/// Who is on the other end of a connection: the SHA-256 of the client certificate, if one was
/// presented (it chains to the hub CA; whether the hub knows it is checked per call), and when
/// that certificate expires (the TLS layer lets expired ones through for renewal).
#[derive(Clone, Debug, Default)]
pub struct Peer {
    pub cert_fp: Option<String>,
    /// `notAfter` of the client certificate, Unix ms.
    pub cert_not_after: Option<UnixMs>,
    /// Cancelled when the peer's connection is gone (closed, or found dead by TCP keepalive),
    /// so a long-poll held on it ends and the node stops counting as connected.
    pub closed: Option<tokio_util::sync::CancellationToken>,
    /// The client's address (for the audit log).
    pub remote: Option<std::net::SocketAddr>,
    /// What the agent said about probing this connection (`crate::server::ConnLiveness`).
    pub liveness: Option<Arc<crate::server::ConnLiveness>>,
}

impl Peer {
    /// How long ago the client certificate expired, if it has at `now`.
    pub fn expired_for(&self, now: UnixMs) -> Option<i64> {
        self.cert_not_after.filter(|na| now > *na).map(|na| now - na)
    }
}

// ---------------------------------------------------------------------------------------------
// Commands, queries, replies

/// A change an operator asks for. The doc comment of each variant says what it does.
#[derive(Clone, Debug)]
pub enum Command {
    /// Create or update the objects of these manifest files, all or nothing. An object a
    /// GitRepo owns is refused unless `force` (then the GitRepo's next commit puts the
    /// repository's version back).
    Apply { files: Vec<ManifestFile>, force: bool },
    /// A GitRepo's commit (docs/gitops.md), all or nothing: every object gets the owner
    /// annotation; objects owned by someone else (by hand, another GitRepo) are refused; objects
    /// this owner held that the commit lacks are pruned.
    GitOpsApply { owner: String, file: ManifestFile },
    /// Fetch a GitRepo at once (`outpost gitops sync`, the webhook).
    GitOpsSync { namespace: String, name: String },
    /// Delete the objects named in these manifest files, all or nothing.
    Delete { files: Vec<ManifestFile> },
    /// Delete one object.
    DeleteObject { id: ObjectId },
    /// Make an earlier revision's pod template (the previous one by default) the newest.
    Undo { id: ObjectId, to_revision: Option<u64> },
    /// Create a join token.
    CreateToken(TokenRequest),
    /// Remove a node; its certificate stops working.
    DeleteNode { name: String },
    /// Point an image name at an uploaded archive.
    TagImage(ImageTag),
    /// Pause, resume, abort or undo a workload's rollout (docs/rollouts.md).
    Rollout { id: ObjectId, action: RolloutAction },
    /// Add an operator account with its first token (docs/accounts.md).
    AddUser(outpost_api::accounts::UserRequest),
    /// Remove an account, its tokens and its sessions.
    RemoveUser { name: String },
    /// A new token for an account.
    NewUserToken { name: String, expires_secs: Option<u64> },
    /// Revoke one token of an account (by id) or all of them.
    RevokeUserTokens { name: String, id: Option<String> },
}

/// Who applies: a person (`force` overrides a GitRepo's ownership) or a GitRepo (its owner
/// annotation value, `gitrepo/<namespace>/<name>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ownership {
    Hand { force: bool },
    GitOps(String),
}

/// What `outpost rollout pause|resume|abort|undo` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RolloutAction {
    /// No wave opens and no node gets the revision until `resume`.
    Pause,
    /// Go on where it stopped.
    Resume,
    /// Stop for good: updated nodes keep the revision, the others keep theirs.
    Abort,
    /// During a rollout: every updated node goes back to its previous revision. After it: the
    /// previous revision's template becomes a new revision, rolled out in one wave.
    Undo,
}

impl RolloutAction {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pause" => Self::Pause,
            "resume" => Self::Resume,
            "abort" => Self::Abort,
            "undo" => Self::Undo,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Abort => "abort",
            Self::Undo => "undo",
        }
    }
}

/// A read an operator asks for.
#[derive(Clone, Debug)]
pub enum Query {
    /// One object: a workload as [`WorkloadInfo`], anything else as its manifest.
    Object {
        id: ObjectId,
    },
    Workloads,
    Revisions {
        id: ObjectId,
    },
    Nodes,
    Node {
        name: String,
    },
    /// Alerts, firing first; resolved ones too with `all`.
    Alerts {
        all: bool,
    },
    /// Error lines nodes forwarded.
    Errors {
        node: Option<String>,
        workload: Option<String>,
        since_secs: Option<u64>,
        limit: Option<u32>,
    },
    /// A workload's log, fetched through the node's own link (waits for the node's answer).
    Logs {
        node: String,
        request: LogRequest,
    },
    ImageTag {
        name: String,
    },
    ImageTags,
    /// The fleet figures a `/metrics` scrape encodes.
    Fleet,
    /// A workload's current (or last) rollout, with every node.
    Rollout {
        id: ObjectId,
    },
    /// Every workload's current (or last) rollout, without the per-node lists.
    Rollouts,
    /// Every Pipeline with the nodes that run it.
    Pipelines,
    /// Pipeline records the hub stored, oldest first.
    Data(DataQuery),
    /// GitRepos with their fetch, render and rollout state (all, or one: namespace, name).
    GitRepos {
        only: Option<(String, String)>,
    },
    /// What applying a GitRepo's commit (default: the last fetched) would change.
    GitDiff {
        namespace: String,
        name: String,
        commit: Option<String>,
    },
    /// Every operator account with its tokens (no secrets).
    Users,
    /// The audit log, oldest first.
    Audit {
        since_secs: Option<u64>,
        user: Option<String>,
        limit: Option<u32>,
    },
}

/// What a command or query returns. Each variant is one answer type of the API.
#[derive(Debug)]
pub enum Reply {
    Applied(ApplyResponse),
    Deleted(DeleteResponse),
    Result(ApplyResult),
    Token(TokenResponse),
    Image(ImageTag),
    Images(Vec<ImageTag>),
    Manifest(serde_json::Value),
    Workload(Box<WorkloadInfo>),
    Workloads(Vec<WorkloadInfo>),
    Revisions(Vec<RevisionInfo>),
    Nodes(Vec<NodeInfo>),
    Node(Box<NodeInfo>),
    Alerts(Vec<AlertInfo>),
    Errors(Vec<StoredErrorLine>),
    Logs(LogData),
    Fleet(FleetView),
    Rollout(Box<RolloutInfo>),
    Rollouts(Vec<RolloutInfo>),
    RolloutAction(RolloutActionResult),
    Pipelines(Vec<PipelineInfo>),
    Records(Vec<StoredRecord>),
    GitRepos(Vec<outpost_api::gitops::GitRepoStatus>),
    GitRepo(Box<outpost_api::gitops::GitRepoStatus>),
    GitDiff(Box<outpost_api::gitops::GitDiff>),
    /// A request was queued (a GitOps fetch).
    Queued(serde_json::Value),
    UserToken(outpost_api::accounts::UserTokenResponse),
    Users(Vec<outpost_api::accounts::UserInfo>),
    Revoked(outpost_api::accounts::RevokeResponse),
    Audit(Vec<outpost_api::accounts::AuditEntry>),
}

impl Reply {
    /// The answer as JSON (every variant but [`Reply::Fleet`], which `/metrics` encodes).
    pub fn to_json(&self) -> Result<serde_json::Value, serde_json::Error> {
        use serde_json::to_value as j;
        match self {
            Reply::Applied(v) => j(v),
            Reply::Deleted(v) => j(v),
            Reply::Result(v) => j(v),
            Reply::Token(v) => j(v),
            Reply::Image(v) => j(v),
            Reply::Images(v) => j(v),
            Reply::Manifest(v) => Ok(v.clone()),
            Reply::Workload(v) => j(v),
            Reply::Workloads(v) => j(v),
            Reply::Revisions(v) => j(v),
            Reply::Nodes(v) => j(v),
            Reply::Node(v) => j(v),
            Reply::Alerts(v) => j(v),
            Reply::Errors(v) => j(v),
            Reply::Logs(v) => j(v),
            Reply::Rollout(v) => j(v),
            Reply::Rollouts(v) => j(v),
            Reply::RolloutAction(v) => j(v),
            Reply::Pipelines(v) => j(v),
            Reply::Records(v) => j(v),
            Reply::GitRepos(v) => j(v),
            Reply::GitRepo(v) => j(v),
            Reply::GitDiff(v) => j(v),
            Reply::Queued(v) => Ok(v.clone()),
            Reply::UserToken(v) => j(v),
            Reply::Users(v) => j(v),
            Reply::Revoked(v) => j(v),
            Reply::Audit(v) => j(v),
            Reply::Fleet(_) => Ok(serde_json::Value::Null),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// State, split by concern

/// The hub's CA and the admin token (its SHA-256 only).
pub struct Authority {
    pub ca: CaMaterial,
    pub ca_fingerprint: String,
    pub admin_token_sha256: [u8; 32],
    /// How long the node certificates the hub signs are valid.
    pub node_cert_lifetime: Duration,
}

/// Settings from `HubConfig`, fixed for the hub's life.
#[derive(Clone, Debug)]
pub struct Settings {
    /// A node is Offline when the hub has had no contact for this long.
    pub offline_after: Duration,
    /// How long a sync long-poll is held open without changes.
    pub long_poll: Duration,
    /// Where pushed image archives live (`<data-dir>/images`).
    pub images_dir: std::path::PathBuf,
    /// Which host paths an apply may mount.
    pub host_paths: validate::HostPathPolicy,
    pub monitor: MonitorConfig,
    /// The hub endpoints join and sync answers carry (`--advertise`, normalized; empty: none).
    pub hubs: Vec<String>,
}

/// The hub's side of the node links: long-poll wake-ups and operator log requests relayed
/// through them (which nodes hold a long-poll now is the store's: `Store::holding`).
#[derive(Default)]
pub struct Links {
    /// Per node: the latest generation, to wake waiting long-polls.
    watchers: Mutex<HashMap<String, watch::Sender<u64>>>,
    pub logs: LogBroker,
    pub exec: Arc<crate::exec::ExecBroker>,
    /// Requests for nodes' own vitals history (`crate::node_vitals`).
    pub vitals: crate::logs::VitalsBroker,
}

/// Counts a node's long-poll as open while it lives (`Store::hold`).
struct Connected {
    store: Arc<dyn Store>,
    node: String,
}

impl Connected {
    fn new(store: &Arc<dyn Store>, node: &str) -> Self {
        store.hold(node, true);
        Self {
            store: store.clone(),
            node: node.to_string(),
        }
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.store.hold(&self.node, false);
    }
}

/// Wake-ups of the controllers that react to events between their periodic runs.
#[derive(Default)]
pub struct Wakeups {
    /// New alert transitions or rollout events were queued for webhooks.
    pub webhooks: Notify,
    /// A workload changed or nodes reported: the rollout controller looks again.
    pub rollouts: Notify,
    /// Some rollout is Progressing or Paused (status reports wake the controller only then).
    pub rollouts_active: std::sync::atomic::AtomicBool,
    /// A GitRepo fetch was asked for (webhook, `outpost gitops sync`, a GitRepo applied).
    pub gitops: Notify,
    /// Nodes came back online, or a change's reschedule failed: the `reschedule` controller
    /// runs once for all of them.
    pub reschedule: Notify,
    pub reschedule_pending: std::sync::atomic::AtomicBool,
    /// A change's reschedule failed: the next run plans the whole fleet.
    pub reschedule_fleet: std::sync::atomic::AtomicBool,
    /// Nodes back online since the last run: it plans them alone when nothing else can change
    /// (as a join does), else the whole fleet.
    pub returned: Mutex<std::collections::BTreeSet<String>>,
}

pub struct Service {
    pub store: Arc<dyn Store>,
    pub monitor: Arc<dyn MonitorStore>,
    /// Pipeline records and the Pipeline objects nodes get.
    pub data: Arc<DataStore>,
    pub metrics: Arc<Metrics>,
    pub authority: Authority,
    pub settings: Settings,
    pub links: Links,
    pub wake: Wakeups,
    /// What the GitOps controller remembers per GitRepo.
    pub gitops: crate::gitops::Repos,
    /// AlertPolicy objects (namespace/name, spec), refreshed after each change.
    policies: RwLock<Vec<(String, AlertPolicySpec)>>,
    /// Operator accounts, their tokens, the audit log and sessions (`crate::store::accounts`).
    pub accounts: Arc<dyn crate::store::AccountStore>,
    /// Browser sessions (`crate::session`).
    pub sessions: crate::session::Sessions,
    /// Image and model blobs (`crate::store::blobs`).
    pub blobs: crate::store::blobs::BlobStore,
    /// What open dashboard pages listen to, and recent vitals (`crate::dashboard`).
    pub live: crate::dashboard::Live,
    /// Serializes every change to objects and nodes together with the reschedule that follows,
    /// across replicas where they share a PostgreSQL store (`crate::replicas::WriteLock`).
    pub write_lock: crate::replicas::WriteLock,
    /// Why workloads are short of replicas, from the last reschedule.
    notes: Mutex<BTreeMap<ObjectId, String>>,
    /// The site witness's leases (docs/site-ha.md).
    pub leases: crate::witness::Leases,
    /// Certificate fingerprint -> node, filled from the store ([`Service::forget_certs`]).
    certs: CertCache,
    /// Certificates retired through any replica, as this one's looks read them.
    retired: Mutex<outpost_core::replicas::RetiredCerts>,
    /// Status reports waiting for the group-commit writer.
    status_tx: tokio::sync::mpsc::UnboundedSender<StatusJob>,
    status_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<StatusJob>>>,
    /// Sync reads queued for the group readers (`crate::sync_reads`).
    reads: crate::sync_reads::SyncReads,
    /// Reports storing their monitoring additions at once at most ([`REPORT_PLACES`]).
    report_places: tokio::sync::Semaphore,
    /// Joins waiting for the join writer (`Service::join_group`).
    join_tx: tokio::sync::mpsc::UnboundedSender<JoinJob>,
    join_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<JoinJob>>>,
}

/// One checked and signed join for the join writer, with where to send the node's labels.
struct JoinJob {
    token_id: String,
    secret_sha: String,
    node: NewNode,
    now: UnixMs,
    reply: tokio::sync::oneshot::Sender<Result<outpost_api::Labels, HubError>>,
}

/// Status reports storing their vitals, conditions or alert events at once at most (the rest
/// wait in memory; the PostgreSQL pool holds 16 connections).
const REPORT_PLACES: usize = 4;
/// Joins stored and scheduled under one hold of the write lock at most.
const JOIN_GROUP: usize = 64;

/// One status report for the group-commit writer, with where to send the outcome.
struct StatusJob {
    node: String,
    report: StatusReport,
    now: UnixMs,
    reply: tokio::sync::oneshot::Sender<Result<u64, HubError>>,
}

/// Reports committed in one transaction at most.
const STATUS_BATCH: usize = 512;
/// Events returned by `Query::Node`.
const NODE_EVENTS: u32 = 50;

/// Log the nodes whose desired state changed: each at info when a few did, else a count (a
/// fleet-wide change is one line, not one per node).
fn changed_nodes(bumped: &BTreeMap<String, u64>) {
    if bumped.len() <= 10 {
        for (node, generation) in bumped {
            tracing::info!(node = %node, generation, "desired state changed");
        }
    } else {
        tracing::info!(nodes = bumped.len(), "desired state changed");
        for (node, generation) in bumped {
            tracing::debug!(node = %node, generation, "desired state changed");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Service {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn Store>,
        monitor: Arc<dyn MonitorStore>,
        data: Arc<DataStore>,
        authority: Authority,
        settings: Settings,
        accounts: Arc<dyn crate::store::AccountStore>,
        sessions: crate::session::SessionLimits,
        blobs: crate::store::blobs::BlobStore,
    ) -> Self {
        let (status_tx, status_rx) = tokio::sync::mpsc::unbounded_channel();
        let (join_tx, join_rx) = tokio::sync::mpsc::unbounded_channel();
        Self {
            store: store.clone(),
            monitor,
            data,
            metrics: Arc::new(Metrics::default()),
            authority,
            settings,
            links: Links::default(),
            wake: Wakeups::default(),
            gitops: crate::gitops::Repos::default(),
            policies: RwLock::new(Vec::new()),
            sessions: crate::session::Sessions::with_db(sessions, accounts.clone()),
            blobs,
            accounts,
            live: crate::dashboard::Live::default(),
            write_lock: crate::replicas::WriteLock::new(store.shared().cloned()),
            notes: Mutex::new(BTreeMap::new()),
            leases: Default::default(),
            certs: CertCache::default(),
            retired: Mutex::default(),
            status_tx,
            status_rx: Mutex::new(Some(status_rx)),
            reads: Default::default(),
            report_places: tokio::sync::Semaphore::new(REPORT_PLACES),
            join_tx,
            join_rx: Mutex::new(Some(join_rx)),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Plumbing

    /// Count committed alert transitions, log them, and wake the webhook sender.
    pub fn announce(&self, out: &[AlertInfo]) {
        for a in out {
            match a.state {
                outpost_api::AlertState::Firing => self.metrics.alerts_fired.inc(),
                outpost_api::AlertState::Resolved => self.metrics.alerts_resolved.inc(),
            };
            tracing::info!(alert = %a.name, node = %a.node, subject = %a.subject, state = ?a.state,
                source = %a.source, summary = %a.summary, "fleet alert");
        }
        if !out.is_empty() {
            self.wake.webhooks.notify_one();
        }
    }

    pub fn is_admin(&self, token: &str) -> bool {
        // Comparing digests keeps the comparison independent of where the strings differ.
        sha256(token) == self.authority.admin_token_sha256
    }

    /// Wake a node's waiting long-poll without a generation change (log requests).
    pub fn wake_node(&self, node: &str) {
        if let Some(tx) = lock(&self.links.watchers).get(node) {
            tx.send_modify(|_| {});
        }
    }

    /// Wake every waiting long-poll (new alert policies or pipelines).
    pub fn wake_all(&self) {
        for tx in lock(&self.links.watchers).values() {
            tx.send_modify(|_| {});
        }
    }

    /// A receiver that wakes when the node's generation changes.
    fn subscribe(&self, node: &str) -> watch::Receiver<u64> {
        lock(&self.links.watchers)
            .entry(node.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    fn notify(&self, bumped: &BTreeMap<String, u64>) {
        let mut w = lock(&self.links.watchers);
        for (node, gen) in bumped {
            w.entry(node.clone())
                .or_insert_with(|| watch::channel(0).0)
                .send_replace(*gen);
        }
    }

    /// Wake and forget a deleted node's long-polls (their receivers see the sender dropped).
    fn forget_node(&self, node: &str) {
        lock(&self.links.watchers).remove(node);
    }

    /// Record the generation a node's long-poll has read, without waking it (what the replica
    /// listener compares stored generations with).
    fn seen(&self, node: &str, generation: u64) {
        if let Some(tx) = lock(&self.links.watchers).get(node) {
            tx.send_if_modified(|v| {
                *v = (*v).max(generation);
                false
            });
        }
    }

    /// The newest generation this process committed or served for `node`: none (or 0) after a
    /// restart until the node's first poll or change here.
    pub fn known_generation(&self, node: &str) -> Option<u64> {
        lock(&self.links.watchers).get(node).map(|tx| *tx.borrow())
    }

    /// The nodes holding a long-poll here, with the generation each has seen.
    fn held_seen(&self) -> BTreeMap<String, u64> {
        lock(&self.links.watchers)
            .iter()
            .filter(|(_, tx)| tx.receiver_count() > 0)
            .map(|(n, tx)| (n.clone(), *tx.borrow()))
            .collect()
    }

    /// Tell the other replicas (and this one's listener) that something was committed. A lost
    /// notification only delays their wake-ups until their fallback poll.
    async fn notify_replicas(&self) {
        if let Some(s) = self.store.shared() {
            if let Err(e) = s.notify().await {
                tracing::warn!(error = %e, "cannot notify the other hub replicas; they see the change at their next fallback poll");
            }
        }
    }

    /// One look of the replica listener (`crate::replicas`): wake the long-polls held here whose
    /// node's generation moved through another replica, drop those of nodes deleted elsewhere,
    /// wake nodes with relayed requests pending, hand relayed answers to the operators waiting
    /// here, and refresh the caches ([`Service::remote_changes`]). Failures are logged: the
    /// next look (at the latest the fallback poll) tries again.
    pub async fn look(&self, trigger: outpost_core::replicas::Trigger) {
        let Some(shared) = self.store.shared() else { return };
        if let Err(e) = self.try_look(shared, trigger).await {
            tracing::warn!(error = %e, ?trigger, "replica look at PostgreSQL failed; the next one retries");
        }
    }

    async fn try_look(
        &self,
        shared: &crate::store::notify::Shared,
        trigger: outpost_core::replicas::Trigger,
    ) -> Result<(), HubError> {
        // Certificates retired through any replica (renewals promoted, nodes deleted): drop
        // them here before anything else is looked at.
        let since = lock(&self.retired).since();
        let (db_now, rows) = shared
            .retired_certs(since, outpost_core::replicas::RETIRED_OVERLAP_MS)
            .await?;
        match lock(&self.retired).read(db_now, rows) {
            outpost_core::replicas::Retired::All => self.forget_certs(None),
            outpost_core::replicas::Retired::Nodes(nodes) => {
                for n in &nodes {
                    self.forget_certs(Some(n));
                }
            }
        }
        let seen = self.held_seen();
        if !seen.is_empty() {
            let held: Vec<String> = seen.keys().cloned().collect();
            let stored = shared.generations(&held).await?;
            let moved = outpost_core::replicas::moved(&seen, &stored);
            let gens: HashMap<&str, u64> = stored.iter().map(|(n, g)| (n.as_str(), *g)).collect();
            let bumped: BTreeMap<String, u64> = moved.iter().map(|n| (n.clone(), gens[n.as_str()])).collect();
            if !bumped.is_empty() {
                tracing::debug!(
                    nodes = bumped.len(),
                    ?trigger,
                    "desired state changed through another replica"
                );
                self.notify(&bumped);
            }
            for n in held.iter().filter(|n| !gens.contains_key(n.as_str())) {
                tracing::info!(node = %n, "node deleted through another replica; ending its long-poll here");
                self.forget_node(n);
                self.live.forget(n);
                self.forget_certs(Some(n));
            }
            for n in shared.relay_pending(&held).await? {
                self.wake_node(&n);
            }
            for n in shared.exec_pending(&held).await? {
                self.wake_node(&n);
            }
        }
        self.deliver_relayed(shared, &self.links.logs).await?;
        self.deliver_relayed(shared, &self.links.vitals).await?;
        if trigger == outpost_core::replicas::Trigger::Reconnected {
            // Notifications naming exec sessions may have been lost too.
            self.links.exec.wakes.poke_all();
        }
        if trigger == outpost_core::replicas::Trigger::Poll {
            shared.relay_forget(&[], now_ms()).await?;
            shared.retired_forget(outpost_core::replicas::RETIRED_KEPT_MS).await?;
            shared
                .exec_expire(now_ms(), crate::exec::remote::EXPIRE_AFTER_MS)
                .await?;
        }
        self.remote_changes().await;
        Ok(())
    }

    /// Where this replica catches up with changes committed through other replicas, on every
    /// look of the replica listener (a notification, a reconnect, the fallback poll). Every
    /// per-process cache of state another replica can change is refreshed or invalidated here:
    /// today the alert policies and pipelines (`refresh_node_extras`, which wakes every
    /// long-poll here when the policies changed). The certificate cache is kept by the look
    /// itself (certificates retired through any replica, `Shared::retired_certs`).
    pub async fn remote_changes(&self) {
        if let Err(e) = self.refresh_node_extras().await {
            tracing::warn!(error = %e, "cannot refresh alert policies and pipelines from the store; nodes keep their last ones");
        }
    }

    /// Park a request relayed to `node` and wake whoever holds its long-poll: here (SQLite), or
    /// in the shared store for any replica (PostgreSQL). The receiver gets the node's answer.
    async fn relay_submit<Req, Ans>(
        &self,
        broker: &crate::logs::Broker<Req, Ans>,
        kind: &str,
        node: &str,
        req: Req,
    ) -> Result<tokio::sync::oneshot::Receiver<Ans>, HubError>
    where
        Req: crate::logs::Relayed + serde::Serialize,
    {
        let Some(shared) = self.store.shared() else {
            let rx = broker.submit(node, req);
            self.wake_node(node);
            return Ok(rx);
        };
        let id = req.id().to_string();
        let body = serde_json::to_string(&req).map_err(|e| HubError::Internal(e.to_string()))?;
        let rx = broker.expect(node, &id);
        if let Err(e) = shared.relay_put(kind, &id, node, &body, now_ms()).await {
            broker.cancel(node, &id);
            return Err(e.into());
        }
        self.notify_replicas().await;
        Ok(rx)
    }

    /// Relay a vitals-history request to `node` (`crate::node_vitals`).
    pub async fn relay_vitals(
        &self,
        node: &str,
        req: outpost_api::VitalsRequest,
    ) -> Result<tokio::sync::oneshot::Receiver<outpost_api::VitalsHistory>, HubError> {
        self.relay_submit(&self.links.vitals, RELAY_VITALS, node, req).await
    }

    /// Forget a vitals-history request whose operator stopped waiting.
    pub async fn cancel_vitals(&self, node: &str, id: &str) {
        self.relay_cancel(&self.links.vitals, node, id).await
    }

    /// Forget a relayed request whose operator stopped waiting.
    async fn relay_cancel<Req: crate::logs::Relayed, Ans>(
        &self,
        broker: &crate::logs::Broker<Req, Ans>,
        node: &str,
        id: &str,
    ) {
        broker.cancel(node, id);
        if let Some(s) = self.store.shared() {
            if let Err(e) = s.relay_forget(&[id.to_string()], now_ms()).await {
                tracing::debug!(error = %e, "cannot forget a relayed request; it expires by itself");
            }
        }
    }

    /// A node's answer to its request `id`: to the operator waiting here, or stored for the
    /// replica the operator waits on. False when no such request is addressed to this node.
    pub async fn relay_complete<Req: crate::logs::Relayed, Ans: serde::Serialize>(
        &self,
        broker: &crate::logs::Broker<Req, Ans>,
        kind: &str,
        node: &str,
        id: &str,
        answer: Ans,
    ) -> Result<bool, HubError> {
        let Some(shared) = self.store.shared() else {
            return Ok(broker.complete(node, id, answer));
        };
        if broker.is_waiting(node, id) {
            let done = broker.complete(node, id, answer);
            if let Err(e) = shared.relay_forget(&[id.to_string()], now_ms()).await {
                tracing::debug!(error = %e, "cannot forget a relayed request; it expires by itself");
            }
            return Ok(done);
        }
        let body = serde_json::to_string(&answer).map_err(|e| HubError::Internal(e.to_string()))?;
        let stored = shared.relay_answer(kind, node, id, &body).await?;
        if stored {
            self.notify_replicas().await;
        }
        Ok(stored)
    }

    /// Hand the answers other replicas stored to the operators waiting here.
    async fn deliver_relayed<Req: crate::logs::Relayed, Ans: serde::de::DeserializeOwned>(
        &self,
        shared: &crate::store::notify::Shared,
        broker: &crate::logs::Broker<Req, Ans>,
    ) -> Result<(), HubError> {
        let ids = broker.waiting_ids();
        if ids.is_empty() {
            return Ok(());
        }
        let answers = shared.relay_answers(&ids).await?;
        if answers.is_empty() {
            return Ok(());
        }
        let mut done = Vec::new();
        for (id, a) in answers {
            match serde_json::from_str::<Ans>(&a) {
                Ok(v) => {
                    broker.deliver(&id, v);
                }
                Err(e) => tracing::warn!(request = %id, error = %e, "a relayed answer is not valid; dropped"),
            }
            done.push(id);
        }
        shared.relay_forget(&done, now_ms()).await?;
        Ok(())
    }

    /// A node's pending relayed requests: those parked here, and (replicas) `shared`, the ones
    /// its group read took from the store.
    fn relay_take(&self, node: &str, shared: Vec<(String, String)>) -> Relayed {
        let mut out = Relayed {
            logs: self.links.logs.take(node),
            vitals: self.links.vitals.take(node),
        };
        for (kind, body) in shared {
            let bad = |e: serde_json::Error| tracing::warn!(node = %node, kind = %kind, error = %e, "a relayed request is not valid; dropped");
            match kind.as_str() {
                RELAY_LOGS => serde_json::from_str(&body)
                    .map(|r| out.logs.push(r))
                    .unwrap_or_else(bad),
                RELAY_VITALS => serde_json::from_str(&body)
                    .map(|r| out.vitals.push(r))
                    .unwrap_or_else(bad),
                _ => tracing::warn!(node = %node, kind = %kind, "a relayed request of an unknown kind; dropped"),
            }
        }
        out
    }

    pub fn note(&self, id: &ObjectId) -> Option<String> {
        lock(&self.notes).get(id).cloned()
    }

    /// Recompute every node's desired state and wake the nodes whose generation moved.
    /// Callers hold `write_lock`.
    pub async fn reschedule_locked(&self, now: UnixMs) -> Result<(), HubError> {
        let offline_after = self.settings.offline_after;
        let started = std::time::Instant::now();
        let inputs = self.store.schedule_inputs().await?;
        let read = started.elapsed();
        // Planning a large fleet is CPU work: keep it off the async workers.
        let plan = tokio::task::spawn_blocking(move || scheduler::plan(&inputs, offline_after, now))
            .await
            .map_err(|e| HubError::Internal(format!("scheduler task failed: {e}")))?;
        let planned = started.elapsed();
        let bumped = self.store.commit_plan(&plan).await?;
        let committed = started.elapsed();
        changed_nodes(&bumped);
        *lock(&self.notes) = plan.notes;
        self.notify(&bumped);
        // AlertPolicy or Pipeline objects or node labels may have changed: refresh the caches.
        if let Err(e) = self.refresh_node_extras().await {
            tracing::warn!(error = %e, "cannot refresh alert policies and pipelines; nodes keep their last ones");
        }
        // Other replicas wake their long-polls and refresh their caches.
        self.notify_replicas().await;
        if !bumped.is_empty() {
            let ms = |d: Duration| d.as_millis();
            tracing::info!(
                nodes = bumped.len(),
                read_ms = ms(read),
                plan_ms = ms(planned - read),
                commit_ms = ms(committed - planned),
                after_ms = ms(started.elapsed() - committed),
                "rescheduled the fleet"
            );
        }
        Ok(())
    }

    /// Nodes have joined (or came back online): plan only their desired state when nothing
    /// else can change (`scheduler::plan_join`), else the whole fleet. Callers hold
    /// `write_lock`.
    async fn schedule_joined(&self, nodes: Vec<String>, now: UnixMs) -> Result<(), HubError> {
        let offline_after = self.settings.offline_after;
        let nodes_len = nodes.len();
        let inputs = self.store.schedule_inputs_for(&nodes).await?;
        let planned = tokio::task::spawn_blocking(move || scheduler::plan_join(&inputs, &nodes, offline_after, now))
            .await
            .map_err(|e| HubError::Internal(format!("scheduler task failed: {e}")))?;
        let (plan, filled) = match planned {
            Ok(p) => p,
            Err(why) => {
                tracing::info!(
                    why,
                    nodes = nodes_len,
                    "joined or returned nodes: planning the whole fleet"
                );
                return self.reschedule_locked(now).await;
            }
        };
        let bumped = self.store.commit_plan(&plan).await?;
        changed_nodes(&bumped);
        // The Deployments the node filled are at their count now: no note.
        lock(&self.notes).retain(|id, _| !filled.contains(id));
        self.notify(&bumped);
        Ok(())
    }

    /// Ask the `reschedule` controller for a reschedule of the whole fleet; requests made
    /// while one runs are served by one more run.
    pub fn request_reschedule(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.wake.reschedule_fleet.store(true, SeqCst);
        self.wake.reschedule_pending.store(true, SeqCst);
        self.wake.reschedule.notify_one();
    }

    /// Ask the `reschedule` controller to plan `node`, back online (with every other node back
    /// by the time it runs).
    fn request_reschedule_of(&self, node: &str) {
        lock(&self.wake.returned).insert(node.to_string());
        self.wake
            .reschedule_pending
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.wake.reschedule.notify_one();
    }

    /// The `reschedule` controller's step: one run if any was asked for (the whole fleet after
    /// a failed change; else the nodes back online, planned alone when nothing else can
    /// change), then the rollout controller looks again (returning nodes count in their waves).
    pub async fn reschedule_requested(&self, now: UnixMs) {
        use std::sync::atomic::Ordering::SeqCst;
        if !self.wake.reschedule_pending.swap(false, SeqCst) {
            return;
        }
        let fleet = self.wake.reschedule_fleet.swap(false, SeqCst);
        let returned = std::mem::take(&mut *lock(&self.wake.returned));
        let result = if fleet {
            self.reschedule(now).await
        } else if returned.is_empty() {
            Ok(())
        } else {
            match self.write_lock.lock().await {
                Ok(_guard) => self.schedule_joined(returned.iter().cloned().collect(), now).await,
                Err(e) => Err(e),
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, nodes = returned.len(), fleet, "rescheduling for nodes back online failed; retrying");
            if fleet {
                self.wake.reschedule_fleet.store(true, SeqCst);
            }
            lock(&self.wake.returned).extend(returned);
            self.wake.reschedule_pending.store(true, SeqCst);
            return;
        }
        self.wake.rollouts.notify_one();
    }

    pub async fn reschedule(&self, now: UnixMs) -> Result<(), HubError> {
        let _guard = self.write_lock.lock().await?;
        self.reschedule_locked(now).await
    }

    /// Reschedule after a committed change. The change stands even if this fails, so the
    /// failure is logged, not returned, and the `reschedule` controller runs it again (every
    /// second while it fails).
    async fn reschedule_after_commit(&self, now: UnixMs) {
        if let Err(e) = self.reschedule_locked(now).await {
            tracing::error!(error = %e, "rescheduling after a change failed; the reschedule controller retries");
            self.request_reschedule();
        }
    }

    /// Reload AlertPolicy and Pipeline objects; wake every node's long-poll when the policies
    /// changed so each gets its new effective policy at once.
    async fn refresh_node_extras(&self) -> Result<(), HubError> {
        let objects = self.store.objects().await?;
        let mut policies: Vec<(String, AlertPolicySpec)> = Vec::new();
        let mut pipelines: Vec<(outpost_api::pipeline::Pipeline, u64)> = Vec::new();
        for o in objects {
            match o.object {
                Object::AlertPolicy(ap) => {
                    policies.push((format!("{}/{}", ap.metadata.ns(), ap.metadata.name), ap.spec))
                }
                Object::Pipeline(p) => pipelines.push((p, o.revision)),
                _ => {}
            }
        }
        policies.sort_by(|a, b| a.0.cmp(&b.0));
        pipelines.sort_by(|a, b| (a.0.metadata.ns(), &a.0.metadata.name).cmp(&(b.0.metadata.ns(), &b.0.metadata.name)));
        let policies_changed = {
            let mut cur = self.policies.write().unwrap_or_else(|e| e.into_inner());
            let changed = *cur != policies;
            *cur = policies;
            changed
        };
        // Pipelines reach nodes as revisions in their desired state (rolled out like
        // workloads); the data store only needs their retention.
        self.data.set_pipelines(pipelines);
        if policies_changed {
            tracing::info!("alert policies changed; waking every node");
            self.wake_all();
        }
        Ok(())
    }

    fn policy_for(&self, labels: &outpost_api::Labels) -> NodePolicy {
        outpost_core::alerts::effective_policy(&self.policies.read().unwrap_or_else(|e| e.into_inner()), labels)
    }

    // -----------------------------------------------------------------------------------------
    // Operator commands

    /// Run a command of the hub itself (controllers), audited as user `hub`. Requests run
    /// theirs with [`Service::execute_as`] (`crate::authz`), which checks the caller first.
    pub async fn execute(&self, cmd: Command) -> Result<Reply, HubError> {
        self.execute_as(&crate::accounts::Caller::hub(), cmd).await
    }

    /// Run a command already authorized and audited by `execute_as`. See [`Command`].
    pub(crate) async fn run(&self, _caller: &crate::accounts::Caller, cmd: Command) -> Result<Reply, HubError> {
        match cmd {
            Command::Apply { files, force } => self.apply(files, Ownership::Hand { force }).await.map(Reply::Applied),
            Command::GitOpsApply { owner, file } => self
                .apply(vec![file], Ownership::GitOps(owner))
                .await
                .map(Reply::Applied),
            Command::GitOpsSync { namespace, name } => {
                let (g, _) = crate::gitops::repo(self, &namespace, &name).await?;
                crate::gitops::request_sync(self, &g);
                Ok(Reply::Queued(
                    serde_json::json!({"gitrepo": format!("{namespace}/{name}"), "fetch": "queued"}),
                ))
            }
            Command::Delete { files } => {
                let (objects, _) = validate::parse_batch(&files).map_err(HubError::InvalidManifest)?;
                self.delete_ids(objects.iter().map(Object::id).collect())
                    .await
                    .map(Reply::Deleted)
            }
            Command::DeleteObject { id } => self.delete_ids(vec![id]).await.map(Reply::Deleted),
            Command::Undo { id, to_revision } => self.undo(id, to_revision).await.map(Reply::Result),
            Command::CreateToken(req) => self.create_token(req).await.map(Reply::Token),
            Command::DeleteNode { name } => {
                self.live.forget(&name);
                self.delete_node(name).await.map(Reply::Deleted)
            }
            Command::TagImage(t) => self.tag_image(t).await.map(Reply::Image),
            Command::Rollout { id, action } => self.rollout_action(id, action).await.map(Reply::RolloutAction),
            Command::AddUser(req) => self.add_user(req).await,
            Command::RemoveUser { name } => self.remove_user(name).await,
            Command::NewUserToken { name, expires_secs } => self.new_user_token(name, expires_secs).await,
            Command::RevokeUserTokens { name, id } => self.revoke_user_tokens(name, id).await,
        }
    }

    async fn apply(&self, files: Vec<ManifestFile>, who: Ownership) -> Result<ApplyResponse, HubError> {
        let (mut objects, warnings) =
            validate::parse_apply_batch(&files, &self.settings.host_paths).map_err(HubError::InvalidManifest)?;
        let _guard = self.write_lock.lock().await?;
        let stored = self.store.objects().await?;
        let before: BTreeMap<ObjectId, u64> = stored.iter().map(|o| (o.object.id(), o.revision)).collect();
        let stored: Vec<Object> = stored.into_iter().map(|o| o.object).collect();
        let prune = validate::ownership(&mut objects, &stored, &who).map_err(HubError::Conflict)?;
        if let Some((object, workload)) = validate::in_use(
            stored
                .iter()
                .filter(|o| !objects.iter().any(|n| n.id() == o.id()))
                .chain(objects.iter()),
            &prune,
        ) {
            return Err(HubError::InUse {
                object: object.to_string(),
                workload: workload.to_string(),
            });
        }
        let has_gitrepo = objects.iter().any(|o| matches!(o, Object::GitRepo(_)));
        let kept: Vec<Object> = stored.into_iter().filter(|o| !prune.contains(&o.id())).collect();
        let mut errors = outpost_core::render::assign_node_ports(&mut objects, &kept);
        errors.extend(validate::check_references(&objects, kept));
        if !errors.is_empty() {
            return Err(HubError::InvalidManifest(errors));
        }
        let ids: Vec<ObjectId> = objects.iter().map(Object::id).collect();
        let now = now_ms();
        let pruning = prune.clone();
        let mut results = self.store.apply(&objects, now).await?;
        let pruned = if pruning.is_empty() {
            Vec::new()
        } else {
            self.store.delete_objects(&pruning).await?.0
        };
        for id in &pruned {
            tracing::info!(object = %id, "object pruned: its GitRepo's commit no longer has it");
        }
        let mut changed = false;
        let mut started = Vec::new();
        for (id, r) in ids.into_iter().zip(&results) {
            if r.action == "unchanged" {
                continue;
            }
            changed = true;
            tracing::info!(object = %r.object, action = %r.action, revision = ?r.revision, "object applied");
            if id.kind.is_rolled_out() && r.revision != before.get(&id).copied() {
                started.push(id);
            }
        }
        if changed || !pruned.is_empty() {
            // New revisions start their rollouts (the first wave opens now) before nodes are
            // told anything; a RolloutPolicy change moves running rollouts.
            self.advance_rollouts_locked(&started, false, now).await;
            self.reschedule_after_commit(now).await;
        }
        if has_gitrepo && changed {
            self.wake.gitops.notify_one();
        }
        results.extend(pruned.iter().map(|id| ApplyResult {
            object: id.to_string(),
            action: "pruned".into(),
            revision: None,
        }));
        Ok(ApplyResponse { results, warnings })
    }

    async fn delete_ids(&self, ids: Vec<ObjectId>) -> Result<DeleteResponse, HubError> {
        let _guard = self.write_lock.lock().await?;
        let stored = self.store.objects().await?;
        if let Some((object, workload)) = validate::in_use(stored.iter().map(|o| &o.object), &ids) {
            return Err(HubError::InUse {
                object: object.to_string(),
                workload: workload.to_string(),
            });
        }
        let (deleted, not_found) = self.store.delete_objects(&ids).await?;
        for id in &deleted {
            tracing::info!(object = %id, "object deleted");
        }
        if !deleted.is_empty() {
            self.reschedule_after_commit(now_ms()).await;
        }
        Ok(DeleteResponse {
            deleted: deleted.iter().map(ToString::to_string).collect(),
            not_found: not_found.iter().map(ToString::to_string).collect(),
        })
    }

    /// `outpost rollout undo`: the pod template of an earlier revision becomes a new revision,
    /// as in Kubernetes. Goes through the same checks as an apply.
    async fn undo(&self, id: ObjectId, to_revision: Option<u64>) -> Result<ApplyResult, HubError> {
        let _guard = self.write_lock.lock().await?;
        let lookup = id.clone();
        let (obj, revs) = (self.store.object(&lookup).await?, self.store.revisions(&lookup).await?);
        let obj = obj.ok_or_else(|| HubError::NotFound(id.to_string()))?;
        let current_hash = obj.template_hash.clone().unwrap_or_default();
        let target = match to_revision {
            Some(n) => revs.iter().find(|r| r.revision == n).ok_or_else(|| {
                HubError::BadRequest(format!(
                    "{id} has no revision {n}; see `outpost rollout history {} {}`",
                    id.kind.as_str().to_ascii_lowercase(),
                    id.name
                ))
            })?,
            None => revs
                .iter()
                .rev()
                .find(|r| r.revision < obj.revision && r.template_hash != current_hash)
                .ok_or_else(|| HubError::BadRequest(format!("{id} has no earlier revision to go back to")))?,
        };
        if !id.kind.is_rolled_out() {
            return Err(HubError::BadRequest(format!("{id} is not a workload")));
        }
        let object = crate::scheduler::at_revision(&obj.object, &target.template)
            .map_err(|e| HubError::Internal(format!("stored revision {} of {id}: {e}", target.revision)))?;
        let stored = self.store.objects().await?;
        let errors = validate::check_references(std::slice::from_ref(&object), stored.into_iter().map(|o| o.object));
        if !errors.is_empty() {
            return Err(HubError::InvalidManifest(errors));
        }
        let now = now_ms();
        let from = target.revision;
        let mut results = self.store.apply(&[object], now).await?;
        let result = results
            .pop()
            .ok_or_else(|| HubError::Internal("apply returned nothing".into()))?;
        tracing::info!(object = %id, from_revision = from, revision = ?result.revision, "rollout undone");
        if result.action != "unchanged" {
            // A revision the fleet ran before: every node gets it in one (gated) wave.
            self.advance_rollouts_locked(std::slice::from_ref(&id), true, now).await;
            self.reschedule_after_commit(now).await;
        }
        Ok(result)
    }

    async fn create_token(&self, req: TokenRequest) -> Result<TokenResponse, HubError> {
        req.validate().map_err(|e| HubError::BadRequest(e.to_string()))?;
        let now = now_ms();
        for k in &req.node_labels {
            outpost_core::link::grantable(k, &req.labels)
                .map_err(|why| HubError::BadRequest(format!("node_labels: {k:?} cannot be left to nodes: {why}")))?;
        }
        let secret = random_hex(16);
        let row = TokenRow {
            id: random_hex(4),
            secret_sha256: sha256_hex(&secret),
            node_labels: req.node_labels.clone(),
            labels: req.labels,
            expires_at: req
                .ttl_secs
                .map(|t| now.saturating_add(i64::try_from(t).unwrap_or(i64::MAX).saturating_mul(1000))),
            uses_left: req.uses.map(u64::from),
            used: 0,
            created_at: now,
        };
        let token = JoinToken {
            ca_fingerprint: self.authority.ca_fingerprint.clone(),
            id: row.id.clone(),
            secret,
        }
        .encode();
        let resp = TokenResponse {
            token,
            id: row.id.clone(),
            expires_at: row.expires_at,
            uses: req.uses,
        };
        let (id, expires_at) = (row.id.clone(), row.expires_at);
        self.store.create_token(&row).await?;
        tracing::info!(token = %id, expires_at = ?expires_at, uses = ?req.uses, "join token created");
        Ok(resp)
    }

    async fn delete_node(&self, name: String) -> Result<DeleteResponse, HubError> {
        let _guard = self.write_lock.lock().await?;
        let n = name.clone();
        let deleted = self.store.delete_node(&n).await;
        // Its certificate stops working at once, here (other replicas: `forget_certs`).
        self.certs.forget(&name);
        if !deleted? {
            return Err(HubError::NotFound(format!("node {name}")));
        }
        self.forget_node(&name);
        let n = name.clone();
        self.monitor.forget_node(&n).await?;
        tracing::info!(node = %name, "node deleted; its certificate no longer works");
        self.reschedule_after_commit(now_ms()).await;
        Ok(DeleteResponse {
            deleted: vec![format!("node/{name}")],
            not_found: vec![],
        })
    }

    async fn tag_image(&self, mut t: ImageTag) -> Result<ImageTag, HubError> {
        t.validate().map_err(|e| HubError::BadRequest(e.to_string()))?;
        t.size = self
            .blobs
            .size(&t.digest)
            .await?
            .ok_or_else(|| HubError::BadRequest(format!("no archive {} on the hub: upload it first", t.digest)))?;
        t.pushed_at = now_ms();
        let row = t.clone();
        self.store.put_image_tag(&row).await?;
        tracing::info!(image = %t.name, digest = %t.digest, size = t.size, "image pushed");
        Ok(t)
    }

    // -----------------------------------------------------------------------------------------
    // Operator queries

    /// Run a query. See [`Query`].
    pub async fn query(&self, q: Query) -> Result<Reply, HubError> {
        match q {
            Query::Object { id } => self.object(id).await,
            Query::Workloads => {
                let objects = self.store.objects().await?;
                let view = self.read_view().await?;
                let now = now_ms();
                let mut out: Vec<WorkloadInfo> = objects
                    .iter()
                    .filter_map(|o| {
                        views::workload_info(o, &view, self.note(&o.object.id()), self.settings.offline_after, now)
                    })
                    .collect();
                out.sort_by(|a, b| (a.kind, &a.namespace, &a.name).cmp(&(b.kind, &b.namespace, &b.name)));
                Ok(Reply::Workloads(out))
            }
            Query::Revisions { id } => self.revisions(id).await.map(Reply::Revisions),
            Query::Nodes => {
                let (nodes, statuses) = (self.store.nodes().await?, self.store.statuses(None).await?);
                let mut by_node: HashMap<String, Vec<WorkloadStatus>> = HashMap::new();
                for (n, w) in statuses {
                    by_node.entry(n).or_default().push(w);
                }
                let now = now_ms();
                let out = nodes
                    .into_iter()
                    .map(|n| {
                        let w = by_node.remove(&n.name).unwrap_or_default();
                        views::node_info(n, w, self.settings.offline_after, now)
                    })
                    .collect();
                Ok(Reply::Nodes(out))
            }
            Query::Node { name } => self.node(name).await.map(|n| Reply::Node(Box::new(n))),
            Query::Alerts { all } => Ok(Reply::Alerts(self.monitor.alerts(all).await?)),
            Query::Errors {
                node,
                workload,
                since_secs,
                limit,
            } => {
                let since = since_secs.map_or(0, |s| outpost_api::ms_before(now_ms(), s));
                let limit = limit.unwrap_or(1000).min(10_000);
                let lines = self
                    .monitor
                    .errors(node.as_deref(), workload.as_deref(), since, limit)
                    .await?;
                Ok(Reply::Errors(lines))
            }
            Query::Logs { node, request } => self.logs(node, request).await.map(Reply::Logs),
            Query::ImageTag { name } => {
                let n = name.clone();
                let t = self.store.image_tag(&n).await?;
                let t = t.ok_or_else(|| {
                    HubError::NotFound(format!("image {name} (push it with `outpost image push {name}`)"))
                })?;
                Ok(Reply::Image(t))
            }
            Query::ImageTags => Ok(Reply::Images(self.store.image_tags().await?)),
            Query::Fleet => self.fleet().await.map(Reply::Fleet),
            Query::Rollout { id } => self.rollout(id).await.map(|r| Reply::Rollout(Box::new(r))),
            Query::Rollouts => {
                let l = crate::rollouts::load(&*self.store).await?;
                let now = now_ms();
                let out = l
                    .objects
                    .iter()
                    .filter_map(|o| {
                        let r = l.rollouts.get(&workload_key(&o.object.id()))?;
                        Some(views::rollout_info(
                            r,
                            &l,
                            &o.object,
                            self.settings.offline_after,
                            now,
                            false,
                        ))
                    })
                    .collect();
                Ok(Reply::Rollouts(out))
            }
            Query::Pipelines => {
                let objects = self.store.objects().await?;
                Ok(Reply::Pipelines(views::pipeline_infos(
                    &objects,
                    &self.read_view().await?,
                )))
            }
            Query::GitRepos { only } => crate::gitops::status(self, only).await.map(Reply::GitRepos),
            Query::GitDiff {
                namespace,
                name,
                commit,
            } => crate::gitops::diff(self, &namespace, &name, commit)
                .await
                .map(|d| Reply::GitDiff(Box::new(d))),
            Query::Users => Ok(Reply::Users(self.accounts.users().await?)),
            Query::Audit {
                since_secs,
                user,
                limit,
            } => self.audit_entries(since_secs, user, limit).await,
            Query::Data(q) => {
                if let Some(k) = q.kind.as_deref().filter(|k| RecordKind::parse(k).is_none()) {
                    return Err(HubError::BadRequest(format!(
                        "kind {k:?} is not one of record, anomaly, aggregate, sample"
                    )));
                }
                let now = now_ms();
                Ok(Reply::Records(self.data.query(&q, now).await?))
            }
        }
    }

    async fn rollout(&self, id: ObjectId) -> Result<RolloutInfo, HubError> {
        rolled_out(&id)?;
        let l = crate::rollouts::load(&*self.store).await?;
        let obj = l
            .objects
            .iter()
            .find(|o| o.object.id() == id)
            .ok_or_else(|| HubError::NotFound(id.to_string()))?;
        let key = workload_key(&id);
        let r = l.rollouts.get(&key).ok_or_else(|| {
            HubError::NotFound(format!(
                "rollout of {id} (none recorded yet: the hub starts one with the next change, within a second)"
            ))
        })?;
        Ok(views::rollout_info(
            r,
            &l,
            &obj.object,
            self.settings.offline_after,
            now_ms(),
            true,
        ))
    }

    // -----------------------------------------------------------------------------------------
    // Rollouts

    /// Start rollouts for `started` and move every rollout on (see `crate::rollouts`); the
    /// caller holds the write lock and reschedules when it returns true. Failures are logged:
    /// the controller retries within a second.
    pub async fn advance_rollouts_locked(&self, started: &[ObjectId], one_wave: bool, now: UnixMs) -> bool {
        match self.try_advance_rollouts(started, one_wave, None, now).await {
            Ok(o) => o.pins_changed,
            Err(e) => {
                tracing::warn!(error = %e, "rollout step failed; the rollout controller retries");
                false
            }
        }
    }

    async fn try_advance_rollouts(
        &self,
        started: &[ObjectId],
        one_wave: bool,
        fence: Option<&Fence>,
        now: UnixMs,
    ) -> Result<crate::rollouts::Outcome, HubError> {
        let l = crate::rollouts::load(&*self.store).await?;
        let (changes, outcome) = crate::rollouts::step(&l, started, one_wave, self.settings.offline_after, now);
        self.wake
            .rollouts_active
            .store(outcome.active, std::sync::atomic::Ordering::Relaxed);
        for (r, decisions) in changes {
            self.record_rollout(&r, &decisions, fence).await?;
        }
        Ok(outcome)
    }

    /// Store a rollout with the events and the alert change of the decisions that led to it
    /// (their webhook rows), in one transaction; as the rollout controller, under its lease's
    /// `fence` (a stale fence changes nothing: `MonitorError::Fenced`).
    async fn record_rollout(
        &self,
        stored: &Rollout,
        decisions: &[Decision],
        fence: Option<&Fence>,
    ) -> Result<(), HubError> {
        let events: Vec<_> = decisions.iter().flat_map(|d| d.events.iter().cloned()).collect();
        let alert = decisions.iter().rev().find_map(|d| d.alert.clone());
        let alerts = self
            .monitor
            .record_rollout(stored, &events, alert.as_ref(), fence, now_ms())
            .await?;
        for e in &events {
            self.metrics.rollout_event(&e.reason);
            tracing::info!(workload = %stored.workload, revision = stored.revision, reason = %e.reason,
                phase = stored.phase.as_str(), "rollout: {}", e.message);
        }
        if events.is_empty() && alert.is_none() {
            return Ok(());
        }
        self.announce(&alerts);
        self.wake.webhooks.notify_one();
        Ok(())
    }

    /// One run of the rollout controller; returns when to look again.
    pub async fn rollouts_tick(&self, now: UnixMs, fence: Option<&Fence>) -> Duration {
        let _guard = match self.write_lock.lock().await {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(error = %e, "rollout controller cannot take the write lock; retrying");
                return crate::rollouts::ACTIVE_TICK;
            }
        };
        let outcome = match self.try_advance_rollouts(&[], false, fence, now).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, "rollout controller failed; retrying");
                return crate::rollouts::ACTIVE_TICK;
            }
        };
        if outcome.pins_changed {
            self.reschedule_after_commit(now).await;
        }
        let tick = if outcome.active {
            crate::rollouts::ACTIVE_TICK
        } else {
            crate::rollouts::IDLE_TICK
        };
        match outcome.wake_at {
            Some(t) => Duration::from_millis(u64::try_from(t - now).unwrap_or(0)).min(tick),
            None => tick,
        }
    }

    async fn rollout_action(&self, id: ObjectId, action: RolloutAction) -> Result<RolloutActionResult, HubError> {
        rolled_out(&id)?;
        let key = workload_key(&id);
        let guard = self.write_lock.lock().await?;
        let (obj, current) = {
            let (lookup, k) = (id.clone(), key.clone());
            (self.store.object(&lookup).await?, self.store.rollout(&k).await?)
        };
        let obj = obj.ok_or_else(|| HubError::NotFound(id.to_string()))?;
        let now = now_ms();
        let r = current.filter(|r| r.revision == obj.revision);
        let undo_by_revision = match (&r, action) {
            (Some(r), RolloutAction::Undo) => !(r.phase.is_active() || r.phase == RolloutPhase::Aborted),
            (None, RolloutAction::Undo) => true,
            _ => false,
        };
        if undo_by_revision {
            drop(guard);
            let res = self.undo(id, None).await?;
            return Ok(RolloutActionResult {
                workload: key,
                action: action.as_str().into(),
                phase: RolloutPhase::Progressing,
                message: format!(
                    "no rollout in progress: revision {} makes the previous template current again and goes to every node in one wave",
                    res.revision.unwrap_or_default()
                ),
                revision: res.revision,
            });
        }
        let r = r.ok_or_else(|| {
            HubError::NotFound(format!(
                "rollout of {id} (none recorded for revision {} yet; retry in a second)",
                obj.revision
            ))
        })?;
        let decided = match action {
            RolloutAction::Pause => waves::pause(&r, now),
            RolloutAction::Resume => waves::resume(&r, now),
            RolloutAction::Abort => waves::abort(&r, now),
            RolloutAction::Undo => waves::undo(&r, now),
        }
        .map_err(|e| HubError::Conflict(e.0))?;
        let message = decided.events.last().map(|e| e.message.clone()).unwrap_or_default();
        let phase = decided.rollout.phase;
        self.record_rollout(&decided.rollout, std::slice::from_ref(&decided), None)
            .await?;
        // Move it on at once (a resume opens the next wave now) and tell the nodes.
        self.advance_rollouts_locked(&[], false, now).await;
        self.reschedule_after_commit(now).await;
        self.wake.rollouts.notify_one();
        Ok(RolloutActionResult {
            workload: key,
            action: action.as_str().into(),
            phase,
            message,
            revision: None,
        })
    }

    async fn read_view(&self) -> Result<View, HubError> {
        let s = &self.store;
        {
            let nodes = s.nodes().await?.into_iter().map(|n| (n.name.clone(), n)).collect();
            let desired = s.desired().await?;
            let statuses = s
                .statuses(None)
                .await?
                .into_iter()
                .map(|(n, w)| ((n, w.key.clone()), w))
                .collect();
            Ok(View {
                nodes,
                desired,
                statuses,
            })
        }
    }

    async fn object(&self, id: ObjectId) -> Result<Reply, HubError> {
        let lookup = id.clone();
        let obj = self
            .store
            .object(&lookup)
            .await?
            .ok_or_else(|| HubError::NotFound(id.to_string()))?;
        if !id.kind.is_workload() {
            return Ok(Reply::Manifest(
                serde_json::to_value(&obj.object).map_err(|e| HubError::Internal(e.to_string()))?,
            ));
        }
        let view = self.read_view().await?;
        let info = views::workload_info(&obj, &view, self.note(&id), self.settings.offline_after, now_ms())
            .ok_or_else(|| HubError::Internal(format!("{id} has no pod template")))?;
        Ok(Reply::Workload(Box::new(info)))
    }

    async fn revisions(&self, id: ObjectId) -> Result<Vec<RevisionInfo>, HubError> {
        let lookup = id.clone();
        let (obj, revs) = (self.store.object(&lookup).await?, self.store.revisions(&lookup).await?);
        let obj = obj.ok_or_else(|| HubError::NotFound(id.to_string()))?;
        Ok(revs
            .into_iter()
            .map(|r| RevisionInfo {
                revision: r.revision,
                current: r.revision == obj.revision,
                images: revision_images(&r.template),
                template_hash: r.template_hash,
                created_at: r.created_at,
            })
            .collect())
    }

    async fn node(&self, name: String) -> Result<NodeInfo, HubError> {
        let n = name.clone();
        let found = match self.store.node(&n).await? {
            None => None,
            Some(row) => {
                let statuses = self
                    .store
                    .statuses(Some(&n))
                    .await?
                    .into_iter()
                    .map(|(_, w)| w)
                    .collect();
                Some((row, statuses, self.store.events(&n, NODE_EVENTS).await?))
            }
        };
        let (row, statuses, events) = found.ok_or_else(|| HubError::NotFound(format!("node {name}")))?;
        let n = name.clone();
        let conditions = self
            .monitor
            .conditions(Some(&n))
            .await?
            .remove(&name)
            .unwrap_or_default();
        Ok(NodeInfo {
            events,
            conditions,
            ..views::node_info(row, statuses, self.settings.offline_after, now_ms())
        })
    }

    /// Relay a log request to the node through its long-poll and wait for its answer.
    async fn logs(&self, node: String, request: LogRequest) -> Result<LogData, HubError> {
        let n = node.clone();
        let row = self
            .store
            .node(&n)
            .await?
            .ok_or_else(|| HubError::NotFound(format!("node {node}")))?;
        let now = now_ms();
        let failed = || self.metrics.log_requests_failed.inc();
        if !is_online(&row, self.settings.offline_after, now) {
            failed();
            return Err(HubError::NodeOffline(format!(
                "node {node} is offline (last contact {} ago): logs travel over the node's own link, so try again once it is back (`outpost get nodes`); forwarded errors are here already: `outpost logs --errors {node}`",
                human_duration(now - row.last_contact()),
            )));
        }
        let request = LogRequest {
            id: random_hex(8),
            ..request
        };
        let (id, workload) = (request.id.clone(), request.workload.clone());
        let rx = self.relay_submit(&self.links.logs, RELAY_LOGS, &node, request).await?;
        match tokio::time::timeout(self.settings.monitor.log_wait, rx).await {
            Ok(Ok(data)) => {
                self.metrics.log_requests_ok.inc();
                tracing::debug!(node = %node, workload = %workload, bytes = data.text.len(), "log request answered");
                Ok(data)
            }
            _ => {
                self.relay_cancel(&self.links.logs, &node, &id).await;
                failed();
                tracing::warn!(node = %node, workload = %workload, "log request not answered in time");
                Err(HubError::NodeUnreachable(format!(
                    "node {node} did not answer within {}s; its link may be slow or just dropped: retry, and check `outpost describe node {node}`",
                    self.settings.monitor.log_wait.as_secs(),
                )))
            }
        }
    }

    /// Open an exec session on `node` (docs/exec.md): park it for the node, wake the node's
    /// long-poll and wait until the node takes it. `owner` names the caller (only they may send
    /// input). Returns the session id, the operator's side and the hub's deadline for it.
    pub async fn exec(
        &self,
        caller: &crate::accounts::Caller,
        node: &str,
        owner: &str,
        start: outpost_api::exec::ExecStart,
    ) -> Result<(String, crate::exec::Opened, Duration), HubError> {
        use outpost_api::exec::{ExecRequest, DEFAULT_EXEC_TIMEOUT_SECS};
        use outpost_core::access::Action;
        let action = if start.node_shell {
            Action::NodeShell
        } else {
            Action::Exec
        };
        // Audited before it runs, with the command line (a session's end is in the hub's log);
        // a refusal by role or scope is audited as denied.
        let what = match (&start.workload, start.node_shell) {
            (Some(w), _) => format!("{node} {}/{w}", start.namespace),
            (None, _) => format!("{node} (node shell)"),
        };
        let cmdline = start.command.join(" ");
        if let Err(e) = caller.require_role(action) {
            self.audit(caller, "exec", &what, &cmdline, Err(&e)).await;
            return Err(e);
        }
        start.validate().map_err(HubError::BadRequest)?;
        let n = node.to_string();
        let row = self
            .store
            .node(&n)
            .await?
            .ok_or_else(|| HubError::NotFound(format!("node {node}")))?;
        if !caller.sees_node(&row.labels) {
            let denied = HubError::NotAllowed(format!("{}: node {node} is outside the account's scope", caller.name));
            self.audit(caller, "exec", &what, &cmdline, Err(&denied)).await;
            return Err(HubError::NotFound(format!("node {node}")));
        }
        if let Err(e) = caller.require_node(action, &row.labels) {
            self.audit(caller, "exec", &what, &cmdline, Err(&e)).await;
            return Err(e);
        }
        self.audit(caller, "exec", &what, &cmdline, Ok(())).await;
        let now = now_ms();
        if !is_online(&row, self.settings.offline_after, now) {
            return Err(HubError::NodeOffline(format!(
                "node {node} is offline since {} (last contact {} ago): exec travels over the node's own link, so try again once it is back (`outpost get nodes`)",
                outpost_api::utc_time(row.last_contact()),
                human_duration(now - row.last_contact()),
            )));
        }
        let id = random_hex(16);
        let limit = Duration::from_secs(start.timeout_secs.unwrap_or(DEFAULT_EXEC_TIMEOUT_SECS));
        tracing::info!(node = %node, session = %id, workload = ?start.workload, node_shell = start.node_shell,
            tty = start.tty, command = ?start.command, "exec session opened");
        let req = ExecRequest { id: id.clone(), start };
        let (opened, attached) = match self.store.shared() {
            // Replicas: the session is parked in the store for whichever replica holds the node.
            Some(shared) => {
                let r = crate::exec::remote::open(
                    &self.links.exec,
                    shared,
                    node,
                    owner,
                    req,
                    limit + Duration::from_secs(30),
                )
                .await?;
                self.notify_replicas().await;
                r
            }
            None => {
                let r = self.links.exec.open(node, owner, req);
                self.wake_node(node);
                r
            }
        };
        match tokio::time::timeout(self.settings.monitor.log_wait, attached).await {
            // The node's own limit ends the command first; the hub's is a backstop.
            Ok(Ok(())) => Ok((id, opened, limit + Duration::from_secs(30))),
            _ => {
                tracing::warn!(node = %node, session = %id, "exec session not taken by the node in time");
                Err(HubError::NodeUnreachable(format!(
                    "node {node} did not take the exec session within {}s; its link may be slow or just dropped, or its agent predates exec (protocol 1.3): retry, and check `outpost describe node {node}`",
                    self.settings.monitor.log_wait.as_secs(),
                )))
            }
        }
    }

    /// The node opens the output stream of its session `id`.
    pub async fn exec_output(
        &self,
        peer: &Peer,
        node: &str,
        id: &str,
    ) -> Result<tokio::sync::mpsc::Sender<outpost_api::exec::Frame>, HubError> {
        self.authorize_node(peer, node).await?;
        if let Some(shared) = self.store.shared() {
            return crate::exec::remote::attach_output(&self.links.exec, shared, node, id)
                .await?
                .map_err(exec_session_error);
        }
        self.links.exec.attach_output(node, id).map_err(exec_session_error)
    }

    /// The node opens the input stream of its session `id`.
    pub async fn exec_input(
        &self,
        peer: &Peer,
        node: &str,
        id: &str,
    ) -> Result<tokio::sync::mpsc::Receiver<outpost_api::exec::Frame>, HubError> {
        self.authorize_node(peer, node).await?;
        if let Some(shared) = self.store.shared() {
            return crate::exec::remote::attach_input(&self.links.exec, shared, node, id)
                .await?
                .map_err(exec_session_error);
        }
        self.links.exec.attach_input(node, id).map_err(exec_session_error)
    }

    /// What a `/metrics` scrape reads.
    async fn fleet(&self) -> Result<FleetView, HubError> {
        let now = now_ms();
        let (nodes, statuses) = (self.store.nodes().await?, self.store.statuses(None).await?);
        let (alerts, vitals, (_, queue)) = (
            self.monitor.alerts(false).await?,
            self.monitor.vitals().await?,
            self.monitor.hook_queue().await?,
        );
        let mut f = FleetView {
            webhook_queue: queue,
            ..Default::default()
        };
        for n in nodes {
            let online = is_online(&n, self.settings.offline_after, now);
            if let Some(v) = vitals.get(&n.name) {
                f.vitals.insert(n.name.clone(), v.clone());
            }
            f.nodes.push((n.name, n.labels, online));
        }
        for (_, w) in statuses {
            *f.phases.entry(w.phase.as_str().to_string()).or_default() += 1;
        }
        for a in alerts {
            *f.firing.entry((a.name, a.severity)).or_default() += 1;
        }
        Ok(f)
    }

    // -----------------------------------------------------------------------------------------
    // The node protocol

    /// A signed node certificate: PEM, fingerprint, expiry (unix ms).
    fn sign(&self, csr_pem: &str, node: &str) -> Result<(String, String, UnixMs), HubError> {
        let cert_pem = self
            .authority
            .ca
            .sign_node_csr(csr_pem, node, self.authority.node_cert_lifetime)
            .map_err(|e| HubError::InvalidCsr(e.to_string()))?;
        let der = outpost_pki::pem_to_der(&cert_pem).map_err(|e| HubError::Internal(e.to_string()))?;
        let not_after = outpost_pki::not_after_unix(&cert_pem).map_err(|e| HubError::Internal(e.to_string()))?;
        Ok((outpost_pki::fingerprint(&der), cert_pem, not_after.saturating_mul(1000)))
    }

    /// `POST /v1/join`: check the token and the labels, sign the CSR, record the node.
    pub async fn join(&self, req: JoinRequest) -> Result<JoinResponse, HubError> {
        validate::node_name(&req.name)?;
        let now = now_ms();
        let secret_sha = sha256_hex(&req.token_secret);
        // Check the token before signing anything; the join transaction checks it again.
        let id = req.token_id.clone();
        let tok = self.store.token(&id).await?;
        check_token(tok.as_ref(), &req.token_id, &secret_sha, now).map_err(|p| {
            tracing::warn!(node = %req.name, token = %req.token_id, problem = ?p, "join refused");
            HubError::Token(p)
        })?;
        if let Some(t) = &tok {
            outpost_core::link::node_labels(&req.name, &t.labels, &t.node_labels, &req.labels).map_err(|r| {
                tracing::warn!(node = %req.name, token = %req.token_id, problem = %r, "join refused: labels");
                HubError::Labels(r)
            })?;
        }
        let (cert_fp, cert_pem, cert_not_after) = self.sign(&req.csr_pem, &req.name)?;
        let node = NewNode {
            name: req.name.clone(),
            labels: req.labels.clone(),
            cert_fp,
            cert_not_after,
        };
        // Stored and scheduled with the joins queued beside it (`join_group`).
        let stopped = || HubError::Internal("the join writer stopped".into());
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.join_tx
            .send(JoinJob {
                token_id: req.token_id.clone(),
                secret_sha,
                node,
                now,
                reply,
            })
            .map_err(|_| stopped())?;
        let labels = rx.await.map_err(|_| stopped())??;
        Ok(JoinResponse {
            node: req.name,
            cert_pem,
            ca_pem: self.authority.ca.cert_pem.clone(),
            labels,
            hubs: self.settings.hubs.clone(),
        })
    }

    /// The node the caller's certificate belongs to (current or just renewed), expired or not.
    /// One indexed read, as every node request always made.
    /// From memory after the first request of a certificate (`CertCache`); a renewed
    /// certificate's first use goes to the store, which promotes it and ends the old one here.
    async fn cert_owner(&self, peer: &Peer) -> Result<String, HubError> {
        let fp = peer.cert_fp.clone().ok_or(HubError::NoClientCert)?;
        if let Some(node) = self.certs.get(&fp) {
            return Ok(node);
        }
        let epoch = self.certs.epoch();
        let owner = self.store.node_by_cert(&fp).await?.ok_or(HubError::UnknownNode)?;
        if owner.promoted {
            tracing::info!(node = %owner.node, "node uses its renewed certificate; the previous one no longer works");
            // The old one ends here; the new one is remembered from its next request (this
            // read began before the drop, so `put` would not keep it anyway). The other
            // replicas drop the old one at their next look: wake them for it now.
            self.certs.forget(&owner.node);
            self.notify_replicas().await;
        }
        self.certs.put(epoch, fp, &owner.node);
        Ok(owner.node)
    }

    /// Forget what this process remembers of `node`'s certificates (None: of every node), so
    /// the next request of each goes to the store. For changes made by another hub replica
    /// on the shared database: a node deleted there, or a renewed certificate promoted there
    /// (its previous one must stop working here too). Local deletes and promotions call it
    /// themselves.
    pub fn forget_certs(&self, node: Option<&str>) {
        match node {
            Some(n) => self.certs.forget(n),
            None => self.certs.clear(),
        }
    }

    /// The caller is a known node with an unexpired certificate: which one.
    pub async fn known_node(&self, peer: &Peer) -> Result<String, HubError> {
        let node = self.cert_owner(peer).await?;
        unexpired(peer, &node)?;
        Ok(node)
    }

    /// The caller's certificate must belong to `node`.
    async fn authorize_owner(&self, peer: &Peer, node: &str) -> Result<(), HubError> {
        let caller = self.cert_owner(peer).await?;
        if caller != node {
            tracing::warn!(caller = %caller, target = %node, "node asked for another node's state");
            return Err(HubError::Forbidden {
                caller,
                target: node.to_string(),
            });
        }
        Ok(())
    }

    /// The caller's unexpired certificate must belong to `node`.
    pub async fn authorize_node(&self, peer: &Peer, node: &str) -> Result<(), HubError> {
        self.authorize_owner(peer, node).await?;
        unexpired(peer, node)
    }

    /// Record contact; a node back from Offline is logged and gets a reschedule (Deployments
    /// short of replicas may now be placed on it; its rollout waves count it again).
    async fn contact(&self, node: &str, now: UnixMs) -> Result<(), HubError> {
        let n = node.to_string();
        let offline_ms = self.settings.offline_after.as_millis() as i64;
        let prev = match self.store.touch_if_recent(&n, now, offline_ms) {
            Some(prev) => prev,
            None => self.store.touch(&n, now).await?.ok_or(HubError::UnknownNode)?,
        };
        if now.saturating_sub(prev) > self.settings.offline_after.as_millis() as i64 {
            tracing::info!(node = %node, offline_for = %human_duration(now - prev), "node online");
            // One run for every node that came back meanwhile, off this request: a
            // full-fleet reschedule per returning node, inline and under the write lock, held
            // thousands of polls behind one another after a stall (the fleet bench at 5,000
            // agents), which made yet more nodes look offline. The run plans the returned
            // nodes alone when nothing else can change (at 100,000 agents one full plan held
            // the write lock for 25 s while every replica asked for another).
            self.request_reschedule_of(node);
        }
        Ok(())
    }

    /// `GET /v1/nodes/{node}/sync`: the node's desired state after `since`, held open up to
    /// the long-poll time while nothing changes (None: nothing changed).
    pub async fn sync(
        &self,
        peer: &Peer,
        node: &str,
        since: u64,
        held: Held<'_>,
    ) -> Result<Option<SyncAnswer>, HubError> {
        // The reads run boxed: an async fn's future is as large as its largest state, and a
        // held long-poll keeps its future for hours on every connected agent, so the states
        // that read (store calls, extras, the answer) live on the heap only while they run
        // and the wait keeps only what it needs (issue 16, BENCHMARKS.md §4).
        Box::pin(async {
            self.authorize_node(peer, node).await?;
            self.contact(node, now_ms()).await
        })
        .await?;
        // Subscribe before reading, so a change committed after the read still wakes us.
        let mut rx = self.subscribe(node);
        let _connected = crate::metrics::LongPollGuard::new(self.metrics.clone());
        let _link = Connected::new(&self.store, node);
        let hold = held.wait.map_or(self.settings.long_poll, |w| {
            w.min(Duration::from_secs(outpost_api::MAX_LONG_POLL_SECS))
        });
        let deadline = tokio::time::Instant::now() + hold;
        let closed = peer.closed.clone().unwrap_or_default();
        loop {
            if let Some(answer) = Box::pin(self.sync_read(node, since, held)).await? {
                return Ok(Some(answer));
            }
            // Waiting costs the hub nothing: give the place in admission control back.
            if let Some(t) = held.ticket {
                t.release();
            }
            tokio::select! {
                r = tokio::time::timeout_at(deadline, rx.changed()) => match r {
                    Ok(Ok(())) => {}
                    // The node was deleted (its sender dropped): the next read answers unknown_node.
                    Ok(Err(_)) => rx = self.subscribe(node),
                    Err(_) => {
                        // A long hold is contact until its end: the node is online until the
                        // next poll arrives, however long this one was held.
                        Box::pin(self.contact(node, now_ms())).await?;
                        return Ok(None);
                    }
                },
                // The connection is gone: nobody reads the answer, and the node is no longer
                // connected (its last contact decides when it turns Offline).
                _ = closed.cancelled() => return Ok(None),
            }
        }
    }

    /// One read of a sync: the answer when the node is behind `since` or has additions, None
    /// when the poll should wait (nothing of the read is kept). The read queues for a group
    /// read of the store (`crate::sync_reads`).
    async fn sync_read(&self, node: &str, since: u64, held: Held<'_>) -> Result<Option<SyncAnswer>, HubError> {
        let crate::sync_reads::GroupRead { read, relays, exec } =
            self.reads.read(node, since).await?.ok_or(HubError::UnknownNode)?;
        let crate::store::SyncRead {
            sync: resp,
            labels,
            prefetch,
        } = read;
        self.seen(node, resp.generation);
        // Additions: a changed alert policy, pending log requests (they wake us too).
        let Extras {
            alert_policy,
            log_requests,
            exec,
            vitals_requests,
        } = self.sync_extras(node, &labels, relays, exec, held);
        let hubs = self.hubs_for(held);
        if resp.generation == since
            && alert_policy.is_none()
            && log_requests.is_empty()
            && exec.is_empty()
            && vitals_requests.is_empty()
            && hubs.is_empty()
        {
            return Ok(None);
        }
        tracing::debug!(node = %node, since, generation = resp.generation, full = resp.full,
            policy = alert_policy.is_some(), log_requests = log_requests.len(), "sync answered");
        Ok(Some(SyncAnswer {
            sync: resp,
            alert_policy,
            log_requests,
            prefetch,
            exec,
            vitals_requests,
            hubs,
        }))
    }

    /// The hub endpoints, when the agent sent a hash of its list and it differs (agents that
    /// send none get none; a hub that advertises none sends none).
    fn hubs_for(&self, held: Held<'_>) -> Vec<String> {
        match held.hubs {
            Some(h) if !self.settings.hubs.is_empty() && outpost_api::hubs_hash(&self.settings.hubs) != h => {
                self.settings.hubs.clone()
            }
            _ => Vec::new(),
        }
    }

    /// What a sync answer adds for `node`: its policy when the agent's hash differs (agents
    /// that send no hash get none), its pending log and vitals requests and exec sessions
    /// (those parked here, and `relays` and `shared_exec`, taken from the shared store by its
    /// group read).
    fn sync_extras(
        &self,
        node: &str,
        labels: &outpost_api::Labels,
        relays: Vec<(String, String)>,
        shared_exec: Vec<String>,
        held: Held<'_>,
    ) -> Extras {
        let alert_policy = held.policy.and_then(|h| {
            let p = self.policy_for(labels);
            (p.hash() != h).then_some(p)
        });
        let relayed = self.relay_take(node, relays);
        let mut exec = self.links.exec.take(node);
        for body in shared_exec {
            match serde_json::from_str(&body) {
                Ok(r) => exec.push(r),
                Err(e) => tracing::warn!(node = %node, error = %e, "a parked exec session is not valid; dropped"),
            }
        }
        Extras {
            alert_policy,
            log_requests: relayed.logs,
            exec,
            vitals_requests: relayed.vitals,
        }
    }

    /// `POST /v1/nodes/{node}/status`: store a status report (and its monitoring additions);
    /// returns the highest event sequence stored.
    pub async fn status(&self, peer: &Peer, node: &str, body: StatusWithVitals) -> Result<u64, HubError> {
        self.authorize_node(peer, node).await?;
        let now = now_ms();
        self.contact(node, now).await?;
        let StatusWithVitals {
            report,
            vitals,
            conditions,
        } = body;
        // Alert events are processed (idempotently) before the events are acknowledged.
        self.on_node_report(node, report.events.clone(), vitals, conditions)
            .await?;
        let events = report.events.len();
        let gates = self.wake.rollouts_active.load(std::sync::atomic::Ordering::Relaxed)
            && (report.workloads.iter().any(|w| w.rollout.is_some()) || report.full);
        let events_acked = self.record_status(node.to_string(), report, now).await?;
        if gates {
            // Gate results move rollout waves.
            self.wake.rollouts.notify_one();
        }
        self.live.changed("status", Some(node));
        tracing::debug!(node = %node, events, events_acked, "status stored");
        Ok(events_acked)
    }

    /// Node alert events, vitals and conditions of a status report.
    async fn on_node_report(
        &self,
        node: &str,
        events: Vec<NodeEvent>,
        vitals: Option<Vitals>,
        conditions: Option<Vec<NodeCondition>>,
    ) -> Result<(), HubError> {
        if let Some(list) = &conditions {
            for c in list {
                tracing::warn!(node, kind = %c.kind, since = c.since, "node condition: {}", c.message);
            }
        }
        if let Some(v) = &vitals {
            self.live.record_vitals(node, v);
        }
        if vitals.is_none()
            && conditions.is_none()
            && !events
                .iter()
                .any(|e| e.reason == ALERT_FIRING || e.reason == ALERT_RESOLVED)
        {
            return Ok(());
        }
        // A few at a time: after a change every node reports at once, and each report with
        // vitals reads the node and writes the monitoring tables; unbounded, on PostgreSQL they
        // took every pooled connection (and the leases' renewals timed out with them).
        let _place = self
            .report_places
            .acquire()
            .await
            .map_err(|_| HubError::Internal("the report places closed".into()))?;
        let n = node.to_string();
        let labels = self.store.node(&n).await?.map(|r| r.labels).unwrap_or_default();
        let n = node.to_string();
        let now = now_ms();
        let out = self
            .monitor
            .node_report(&n, &labels, &events, vitals.as_ref(), conditions.as_deref(), now)
            .await?;
        self.announce(&out);
        Ok(())
    }

    /// Store a status report. Reports that arrive while a commit is under way are committed
    /// together in the next transaction (group commit): one fsync for many nodes.
    async fn record_status(&self, node: String, report: StatusReport, now: UnixMs) -> Result<u64, HubError> {
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

    /// Start the sync readers (once, from `Hub::start`; `crate::sync_reads`).
    pub fn spawn_sync_readers(&self) {
        self.reads.spawn(self.store.clone());
    }

    /// Start the join writer (once, from `Hub::start`): joins that queue while a group is
    /// stored and scheduled go together in the next group (`join_group`).
    pub fn spawn_join_writer(self: &Arc<Self>) {
        let Some(mut rx) = lock(&self.join_rx).take() else {
            return;
        };
        let svc = self.clone();
        tokio::spawn(async move {
            // What queued while the last group ran is the next group (0: the channel closed).
            let mut jobs = Vec::with_capacity(JOIN_GROUP);
            while rx.recv_many(&mut jobs, JOIN_GROUP).await > 0 {
                let jobs = std::mem::take(&mut jobs);
                svc.join_group(jobs).await;
            }
        });
    }

    /// Store a group of joins and plan the new nodes together, under one hold of the write
    /// lock (a join used to take it, and on PostgreSQL its cross-replica advisory lock, once
    /// per node: joins were serialized at ~10 statements each). Each join is its own
    /// transaction, so a refused one (token used up, name taken) refuses only itself. The
    /// answers go out once the group is scheduled, so a new node's first sync finds its
    /// desired state.
    async fn join_group(&self, mut jobs: Vec<JoinJob>) {
        // A join whose caller is gone is not stored: it would use up a token use for nobody.
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.is_empty() {
            return;
        }
        let _guard = match self.write_lock.lock().await {
            Ok(g) => g,
            Err(e) => {
                for job in jobs {
                    let _ = job.reply.send(Err(e.again()));
                }
                return;
            }
        };
        let mut joined = Vec::with_capacity(jobs.len());
        for job in jobs {
            match self
                .store
                .join(&job.token_id, &job.secret_sha, &job.node, job.now)
                .await
            {
                Ok(labels) => {
                    tracing::info!(node = %job.node.name, token = %job.token_id, labels = ?labels, "node joined");
                    joined.push((job, labels));
                }
                Err(e) => {
                    let _ = job.reply.send(Err(e.into()));
                }
            }
        }
        if joined.is_empty() {
            return;
        }
        let names: Vec<String> = joined.iter().map(|(j, _)| j.node.name.clone()).collect();
        if let Err(e) = self.schedule_joined(names, now_ms()).await {
            tracing::error!(nodes = joined.len(), error = %e, "scheduling new nodes failed; the reschedule controller retries");
            self.request_reschedule();
        }
        for (job, labels) in joined {
            let _ = job.reply.send(Ok(labels));
        }
    }

    /// Start the group-commit writer (once, from `Hub::start`).
    pub fn spawn_status_writer(self: &Arc<Self>) {
        let Some(mut rx) = lock(&self.status_rx).take() else {
            return;
        };
        let svc = self.clone();
        tokio::spawn(async move {
            // What queued while the last group ran is the next group (0: the channel closed).
            let mut jobs = Vec::with_capacity(STATUS_BATCH);
            while rx.recv_many(&mut jobs, STATUS_BATCH).await > 0 {
                let jobs = std::mem::take(&mut jobs);
                let (items, replies): (Vec<_>, Vec<_>) =
                    jobs.into_iter().map(|j| ((j.node, j.report, j.now), j.reply)).unzip();
                let n = items.len();
                match svc.store.record_statuses(&items).await {
                    Ok(results) => {
                        for (reply, r) in replies.into_iter().zip(results) {
                            let _ = reply.send(r.map_err(HubError::Internal));
                        }
                    }
                    Err(e) => {
                        for reply in replies {
                            let _ = reply.send(Err(HubError::for_each_of_group(&e)));
                        }
                    }
                }
                tracing::trace!(reports = n, "status batch committed");
            }
        });
    }

    /// `POST /v1/nodes/{node}/renew`: the one call an expired (but known: the node was not
    /// deleted) certificate may make; the TLS handshake proved the caller holds its key.
    pub async fn renew(&self, peer: &Peer, node: &str, req: RenewRequest) -> Result<String, HubError> {
        self.authorize_owner(peer, node).await?;
        let (fp, cert_pem, not_after) = self.sign(&req.csr_pem, node)?;
        let n = node.to_string();
        self.store.renew(&n, &fp, not_after).await?;
        match peer.expired_for(now_ms()) {
            Some(ago) => tracing::warn!(node = %node, expired_ago = %human_duration(ago), expires_at = not_after,
                "renewed an expired node certificate"),
            None => tracing::info!(node = %node, expires_at = not_after, "node certificate renewed"),
        }
        Ok(cert_pem)
    }

    /// `POST /v1/nodes/{node}/errors`: forwarded error lines; returns the acknowledged sequence.
    pub async fn node_errors(&self, peer: &Peer, node: &str, batch: ErrorBatch) -> Result<u64, HubError> {
        self.authorize_node(peer, node).await?;
        let (n, lines) = (node.to_string(), batch.lines.len());
        let (acked, added) = self.monitor.store_errors(&n, &batch, now_ms()).await?;
        self.metrics.error_lines.inc_by(added);
        tracing::debug!(node = %node, lines, acked, "error lines stored");
        Ok(acked)
    }

    /// `POST /v1/nodes/{node}/data`: a batch of pipeline records from the node's spool, stored
    /// (each record id once per node) before the answer; returns how many ids were new. The
    /// body is decoded (`decode`) only once the caller is authorized: a batch may decompress to
    /// 64 MiB.
    pub async fn node_data(
        &self,
        peer: &Peer,
        node: &str,
        decode: impl FnOnce() -> Result<DataBatch, HubError>,
    ) -> Result<u64, HubError> {
        self.authorize_node(peer, node).await?;
        let batch = decode()?;
        let now = now_ms();
        let records = batch.records.len();
        let stored = self.data.insert(node, &batch.records, now).await?;
        tracing::debug!(node = %node, records, stored, "pipeline records stored");
        Ok(stored)
    }

    /// `POST /v1/nodes/{node}/logs/{id}`: the node's answer to one of its own log requests.
    pub async fn node_logs(&self, peer: &Peer, node: &str, id: &str, data: LogData) -> Result<(), HubError> {
        self.authorize_node(peer, node).await?;
        if !self
            .relay_complete(&self.links.logs, RELAY_LOGS, node, id, data)
            .await?
        {
            return Err(HubError::NotFound(format!(
                "log request {id} for node {node} (it expired, or was never addressed to this node)"
            )));
        }
        Ok(())
    }

    /// Who may read image archives and tags: an operator account that may read, or a known node.
    pub async fn image_reader(
        &self,
        caller: Option<&crate::accounts::Caller>,
        peer: &Peer,
    ) -> Result<ImageReader, HubError> {
        if let Some(c) = caller {
            c.require_role(outpost_core::access::Action::Read)?;
            return Ok(ImageReader::Admin);
        }
        if peer.cert_fp.is_none() {
            return Err(HubError::Unauthorized);
        }
        self.known_node(peer).await.map(|_| ImageReader::Node)
    }
}

/// The hashes a node's sync request says it holds (`policy=`, `pipelines=`); an agent that
/// sends none of one is never sent that addition.
#[derive(Clone, Copy, Debug, Default)]
pub struct Held<'a> {
    /// The sync's place in admission control (`crate::server::Admission`), given back when
    /// the poll starts waiting.
    pub ticket: Option<&'a AdmitTicket>,
    pub policy: Option<&'a str>,
    /// How long the agent asked the hub to hold the long-poll (capped).
    pub wait: Option<Duration>,
    /// Hash of the hub endpoints the agent holds (`outpost_api::hubs_hash`).
    pub hubs: Option<&'a str>,
}

/// A place among the joins and syncs the hub lets work at once; released when dropped or by
/// [`AdmitTicket::release`] (a long-poll that starts waiting).
#[derive(Clone, Debug)]
pub struct AdmitTicket(Arc<Mutex<Option<AdmitPlace>>>);

/// A held place: the permit, and the `outpost_hub_admission_in_use` gauge it counts in.
#[derive(Debug)]
struct AdmitPlace {
    _permit: tokio::sync::OwnedSemaphorePermit,
    in_use: prometheus_client::metrics::gauge::Gauge<i64, std::sync::atomic::AtomicI64>,
}

impl Drop for AdmitPlace {
    fn drop(&mut self) {
        self.in_use.dec();
    }
}

impl AdmitTicket {
    pub fn new(
        permit: tokio::sync::OwnedSemaphorePermit,
        in_use: prometheus_client::metrics::gauge::Gauge<i64, std::sync::atomic::AtomicI64>,
    ) -> Self {
        in_use.inc();
        AdmitTicket(Arc::new(Mutex::new(Some(AdmitPlace {
            _permit: permit,
            in_use,
        }))))
    }

    pub fn release(&self) {
        lock(&self.0).take();
    }
}

/// The kinds of relayed requests (`relays.kind`).
pub const RELAY_LOGS: &str = "logs";
pub const RELAY_VITALS: &str = "vitals";

/// A node's relayed requests, taken for one sync answer.
struct Relayed {
    logs: Vec<LogRequest>,
    vitals: Vec<outpost_api::VitalsRequest>,
}

/// What a sync answer adds to the desired state.
struct Extras {
    alert_policy: Option<NodePolicy>,
    log_requests: Vec<LogRequest>,
    exec: Vec<outpost_api::exec::ExecRequest>,
    vitals_requests: Vec<outpost_api::VitalsRequest>,
}

fn exec_session_error(e: crate::exec::SessionError) -> HubError {
    match e {
        crate::exec::SessionError::Unknown => {
            HubError::NotFound("exec session (ended, timed out, or not this node's)".into())
        }
        crate::exec::SessionError::AlreadyOpen => {
            HubError::Conflict("this stream of the exec session is open already".into())
        }
        crate::exec::SessionError::Stalled => HubError::Conflict(
            "the node has not read the input sent before; send more once it has (is the command reading its stdin?)"
                .into(),
        ),
    }
}

/// Who reads an image: the operator or a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageReader {
    Admin,
    Node,
}

/// Refuse an expired certificate (only the renew call takes one).
fn unexpired(peer: &Peer, node: &str) -> Result<(), HubError> {
    match peer.expired_for(now_ms()) {
        Some(ago_ms) => Err(HubError::CertificateExpired {
            node: node.to_string(),
            ago_ms,
        }),
        None => Ok(()),
    }
}

/// An object id from the route's kind word (`deployment`, `ds`, ...).
pub fn object_id(kind: &str, namespace: String, name: String) -> Result<ObjectId, HubError> {
    let kind = Kind::parse_cli(kind).ok_or_else(|| {
        HubError::BadRequest(format!(
            "unknown kind {kind:?}; use deployment, daemonset, configmap or secret"
        ))
    })?;
    Ok(ObjectId { kind, namespace, name })
}

/// Refuse rollout commands for kinds that do not roll out in waves.
fn rolled_out(id: &ObjectId) -> Result<(), HubError> {
    if id.kind.is_rolled_out() {
        return Ok(());
    }
    Err(HubError::BadRequest(format!(
        "{id} does not roll out in waves: only Deployments, DaemonSets, AgentUpdates and Pipelines do (a Job or CronJob's new revision reaches its node at once)"
    )))
}

/// What `outpost rollout history` shows of a stored revision: `container=image` per container
/// of a pod template, `agent=<version or digest>` of an AgentUpdate.
fn revision_images(stored: &serde_json::Value) -> Vec<String> {
    if let Ok(t) = serde_json::from_value::<outpost_api::PodTemplate>(stored.clone()) {
        return t
            .spec
            .containers
            .iter()
            .map(|c| format!("{}={}", c.name, c.image.as_deref().unwrap_or("-")))
            .collect();
    }
    let version = stored["version"].as_str().or(stored["digest"].as_str()).unwrap_or("-");
    vec![format!("agent={version}")]
}

/// Certificate fingerprint -> node, filled by `Service::cert_owner` from the store. A node has
/// one working certificate, so an entry is dropped only when its node is deleted or a renewed
/// certificate is promoted (and by `Service::forget_certs`). `epoch` moves on every drop: a
/// store read that began before a drop does not put its (maybe stale) answer back.
#[derive(Default)]
struct CertCache {
    inner: Mutex<CertMap>,
}

#[derive(Default)]
struct CertMap {
    by_fp: std::collections::HashMap<String, Arc<str>>,
    /// node -> its fingerprints in `by_fp` (one, but for a moment around a promotion)
    by_node: std::collections::HashMap<Arc<str>, Vec<String>>,
    epoch: u64,
}

impl CertCache {
    fn get(&self, fp: &str) -> Option<String> {
        lock(&self.inner).by_fp.get(fp).map(|n| n.to_string())
    }

    fn epoch(&self) -> u64 {
        lock(&self.inner).epoch
    }

    fn put(&self, epoch: u64, fp: String, node: &str) {
        let mut m = lock(&self.inner);
        if m.epoch == epoch && !m.by_fp.contains_key(&fp) {
            let node: Arc<str> = Arc::from(node);
            m.by_node.entry(node.clone()).or_default().push(fp.clone());
            m.by_fp.insert(fp, node);
        }
    }

    fn forget(&self, node: &str) {
        let mut m = lock(&self.inner);
        for fp in m.by_node.remove(node).unwrap_or_default() {
            m.by_fp.remove(&fp);
        }
        m.epoch += 1;
    }

    fn clear(&self) {
        let mut m = lock(&self.inner);
        m.by_fp.clear();
        m.by_node.clear();
        m.epoch += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::CertCache;

    #[test]
    fn cert_cache_forgets_a_node_and_refuses_a_read_that_raced_the_drop() {
        let c = CertCache::default();
        let e = c.epoch();
        c.put(e, "fp1".into(), "n1");
        c.put(e, "fp2".into(), "n2");
        assert_eq!(c.get("fp1").as_deref(), Some("n1"));
        // a store read began, then n1 was deleted: its answer is not kept
        let before = c.epoch();
        c.forget("n1");
        c.put(before, "fp1".into(), "n1");
        assert_eq!(c.get("fp1"), None);
        assert_eq!(c.get("fp2").as_deref(), Some("n2"));
        // a promotion: the old one goes; the renewed one is kept from its next request
        let e = c.epoch();
        c.forget("n2");
        c.put(e, "fp2b".into(), "n2");
        assert_eq!((c.get("fp2"), c.get("fp2b")), (None, None));
        c.put(c.epoch(), "fp2b".into(), "n2");
        assert_eq!((c.get("fp2"), c.get("fp2b").as_deref()), (None, Some("n2")));
        c.clear();
        assert_eq!(c.get("fp2b"), None);
    }
}
