//! The hub's durable state, behind the async [`Store`] trait with two implementations:
//! [`SqliteStore`] (the default, one embedded file in the data dir) and [`PgStore`]
//! (PostgreSQL, `outpost hub --store postgres://...`). The rest of the hub sees only
//! `Arc<dyn Store>`.
//!
//! Invariants every implementation keeps:
//! - a batch apply or delete is one transaction: all objects or none;
//! - a node's generation never decreases, also across restarts: every bump takes the next value
//!   of one hub-wide sequence (`meta.gen_seq`), so even a node deleted and joined again under
//!   the same name sees larger generations than before;
//! - `node_workloads` is a node's desired state; `changed_gen` says when each row last changed,
//!   `node_tombstones` when each removed key went away, and `nodes.tombstone_floor` the highest
//!   generation whose tombstones may have been pruned (a sync from below it gets the full state);
//! - a node's labels are decided by `outpost_core::link::node_labels` inside the join
//!   transaction: `kubernetes.io/hostname` is always the node's name, the token's labels always
//!   apply, and a node adds only the keys it may set;
//! - certificate renewal is two-phase: `renew` records the new certificate as `next_cert_fp`
//!   and the old one keeps working; the first request made with the new one promotes it
//!   (`node_by_cert`) and the old one stops working. A lost renew answer never locks a node out.
//!
//! Each backend keeps a versioned schema (`meta.schema_version`, [`SCHEMA_VERSION`]): opening
//! runs the migrations the database lacks, in order, in one transaction, and refuses a database
//! whose version is newer than this hub knows ([`StoreError::SchemaTooNew`]).
//!
//! `SqliteStore` keeps a synchronous core (one connection behind a mutex) and runs each call on
//! the blocking pool; `PgStore` is async throughout (sqlx, a connection pool). The contacts held
//! in memory ([`Contacts`]) are per hub process on both; on PostgreSQL each replica writes them
//! at a bounded rate (`Store::flush_contacts`) so every replica sees every node's last contact,
//! and [`notify`] holds what replicas share beyond the tables.

use std::collections::HashMap;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use outpost_api::{
    ApplyResult, ImageTag, Kind, Labels, NodeEvent, Object, ObjectId, StatusReport, SyncResponse, UnixMs, WorkloadSpec,
    WorkloadStatus,
};
use outpost_core::waves::Rollout;

pub mod accounts;
pub mod authority;
pub mod blobs;
pub mod exec_frames;
pub mod migrate;
mod monitor_pg;
#[cfg(test)]
mod monitor_tests;
pub mod notify;
mod pg;
pub mod records;
mod sqlite;
pub mod testkit;
#[cfg(test)]
mod tests;

pub use accounts::AccountStore;
pub use monitor_pg::PgMonitor;
pub use pg::{redact as pg_redact, PgStore};
pub use records::RecordStore;
pub use sqlite::{SqliteCore, SqliteStore};

/// Current schema version, kept in `meta.schema_version`. 2: token `node_labels`, two-phase
/// renewal (`nodes.next_cert_fp`), `kubernetes.io/hostname` forced to the node's name.
/// 3: fleet rollouts (`rollouts`, `node_prefetch`, `node_workloads.revision`).
/// 4: the monitoring tables in the store's database on both backends, and `leases` (the
/// controllers' leases with fencing tokens).
/// 5: on PostgreSQL, accounts, audit, sessions, pipeline records, blobs and the CA in the
/// database (`store::accounts`, `store::records`, `store::blobs`, `hub_secrets`); on SQLite no
/// change (those stay in their own `hub.db` tables and the data dir).
/// 6: `relays`, requests relayed across hub replicas (PostgreSQL only; nothing on SQLite).
/// 7: `exec_sessions` and `exec_frames`, exec sessions across hub replicas (PostgreSQL only;
/// nothing on SQLite, where sessions live in the one hub process).
pub const SCHEMA_VERSION: i64 = 8;
/// Events kept per node (older ones are pruned when new ones arrive).
pub const EVENTS_KEPT: i64 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("PostgreSQL error: {0}")]
    Pg(#[from] sqlx::Error),
    #[error("database task failed: {0}")]
    Task(String),
    #[error("stored data is not valid JSON ({0}); the database may be corrupt or from a newer hub")]
    Json(#[from] serde_json::Error),
    #[error("database {path} has schema version {found}, this hub knows up to {SCHEMA_VERSION}; run the newer hub release that created it (or point this hub at another database)")]
    SchemaTooNew { path: String, found: i64 },
    #[error("stored object has unknown kind {0:?}; the database may be from a newer hub")]
    UnknownKind(String),
    #[error("database lock poisoned by an earlier panic; restart the hub")]
    Poisoned,
    #[error("join token refused")]
    Token(TokenProblem),
    #[error("{0}")]
    Labels(#[from] outpost_core::link::LabelRefusal),
    #[error("node {0} already exists")]
    NodeExists(String),
    #[error("desired spec {0} is referenced by a node but not stored; the database was changed outside the hub (apply the workloads again to store their specs)")]
    MissingSpec(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Why a join token was refused. Decided by [`check_token`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenProblem {
    /// No such token, or the secret does not match (not told apart, on purpose).
    Unknown {
        id: String,
    },
    Expired {
        id: String,
        ago_ms: i64,
    },
    UsedUp {
        id: String,
        used: u64,
    },
}

/// A join token as stored (the secret only as its SHA-256).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenRow {
    pub id: String,
    pub secret_sha256: String,
    pub labels: Labels,
    pub expires_at: Option<UnixMs>,
    /// `None`: unlimited.
    pub uses_left: Option<u64>,
    pub used: u64,
    pub created_at: UnixMs,
    /// Label keys a node joining with this token may set on itself.
    pub node_labels: Vec<String>,
}

/// Is this token good for one more join at `now`? Pure; the store calls it inside the join
/// transaction.
pub fn check_token(tok: Option<&TokenRow>, id: &str, secret_sha256: &str, now: UnixMs) -> Result<(), TokenProblem> {
    let unknown = || TokenProblem::Unknown { id: id.to_string() };
    let tok = tok.ok_or_else(unknown)?;
    if tok.secret_sha256 != secret_sha256 {
        return Err(unknown());
    }
    if let Some(exp) = tok.expires_at {
        if now >= exp {
            return Err(TokenProblem::Expired {
                id: id.to_string(),
                ago_ms: now - exp,
            });
        }
    }
    if tok.uses_left == Some(0) {
        return Err(TokenProblem::UsedUp {
            id: id.to_string(),
            used: tok.used,
        });
    }
    Ok(())
}

/// A node about to be recorded by a join.
#[derive(Clone, Debug)]
pub struct NewNode {
    pub name: String,
    /// Labels from the join request, checked against the token by
    /// `outpost_core::link::node_labels`.
    pub labels: Labels,
    pub cert_fp: String,
    pub cert_not_after: UnixMs,
}

#[derive(Clone, Debug, PartialEq)]
pub struct NodeRow {
    pub name: String,
    pub labels: Labels,
    pub cert_fp: String,
    pub cert_not_after: UnixMs,
    pub joined_at: UnixMs,
    pub last_seen: Option<UnixMs>,
    pub generation: u64,
    pub applied_generation: u64,
    pub agent_version: Option<String>,
    pub uptime_secs: Option<u64>,
}

impl NodeRow {
    /// Last contact; joining counts as contact.
    pub fn last_contact(&self) -> UnixMs {
        self.last_seen.unwrap_or(self.joined_at)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct StoredObject {
    pub object: Object,
    pub template_hash: Option<String>,
    pub revision: u64,
    pub created_at: UnixMs,
    pub updated_at: UnixMs,
}

/// One revision of a workload's pod template (of an AgentUpdate: its spec), as stored JSON.
#[derive(Clone, Debug, PartialEq)]
pub struct RevisionRow {
    pub revision: u64,
    pub template_hash: String,
    pub created_at: UnixMs,
    pub template: serde_json::Value,
}

/// What a revision keeps of an object: the pod template of a workload, the spec of an
/// AgentUpdate (the binary a fleet rollback goes back to) or of a Pipeline.
fn revision_content(obj: &Object) -> serde_json::Result<Option<String>> {
    match obj {
        Object::AgentUpdate(u) => serde_json::to_string(&u.spec).map(Some),
        Object::Pipeline(p) => serde_json::to_string(&p.spec).map(Some),
        _ => obj.template().map(serde_json::to_string).transpose(),
    }
}

/// One row of a node's desired state.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredRow {
    pub node: String,
    pub key: String,
    pub hash: String,
    pub revision: u64,
}

/// One node's part of a group of sync reads ([`Store::sync_group`]).
#[derive(Clone, Debug, PartialEq)]
pub struct SyncRead {
    /// What [`Store::sync`] answers.
    pub sync: SyncResponse,
    /// The node's labels (they choose its alert policy).
    pub labels: Labels,
    /// Its prefetch hints ([`Store::prefetch`]); read only when its generation moved past
    /// the poll's, empty otherwise.
    pub prefetch: Vec<WorkloadSpec>,
}

/// What the scheduler reads.
#[derive(Clone, Debug, Default)]
pub struct ScheduleInputs {
    pub nodes: Vec<NodeRow>,
    pub objects: Vec<StoredObject>,
    /// Current Deployment placements.
    pub assignments: BTreeMap<ObjectId, BTreeSet<String>>,
    /// node -> key -> hash of what each node currently holds.
    pub held: BTreeMap<String, BTreeMap<String, String>>,
    /// node -> key -> revision of what each node currently holds.
    pub held_revisions: BTreeMap<String, BTreeMap<String, u64>>,
    /// node -> key -> hash of the prefetch hints each node holds.
    pub held_prefetch: BTreeMap<String, BTreeMap<String, String>>,
    /// Workload key -> its current (or last) rollout.
    pub rollouts: BTreeMap<String, Rollout>,
    /// Pod templates (AgentUpdate specs) of earlier revisions that nodes hold or may go back
    /// to, as stored JSON.
    pub templates: BTreeMap<(ObjectId, u64), serde_json::Value>,
}

/// Changes to one node's desired state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeChange {
    pub upsert: Vec<WorkloadSpec>,
    pub remove: Vec<String>,
    /// The node's new prefetch hints (all of them), when they changed.
    pub prefetch: Option<Vec<WorkloadSpec>>,
}

/// What the scheduler writes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Deployment placements (replaces all stored ones).
    pub assignments: BTreeMap<ObjectId, BTreeSet<String>>,
    pub changes: BTreeMap<String, NodeChange>,
    /// Why workloads are short of replicas.
    pub notes: BTreeMap<ObjectId, String>,
}

/// A plan's desired specs stored once each (the `specs` table, by address): a fleet-wide
/// change writes one spec row and a short reference per node, not 100,000 copies of one JSON.
/// The address is the SHA-256 of the spec's JSON; each distinct spec of a plan is serialized
/// once (specs with the same content hash are compared whole before one is reused, so a hash
/// collision can never hand one workload another's spec).
#[derive(Default)]
pub(crate) struct SpecTexts<'a> {
    by_hash: HashMap<&'a str, Vec<(&'a WorkloadSpec, usize)>>,
    /// (address, JSON) of each distinct spec, in the order first seen.
    pub texts: Vec<(String, String)>,
}

impl<'a> SpecTexts<'a> {
    /// The address of `spec` (its JSON serialized and stored on first sight).
    pub fn address(&mut self, spec: &'a WorkloadSpec) -> Result<String> {
        let seen = self.by_hash.entry(spec.hash.as_str()).or_default();
        if let Some((_, i)) = seen.iter().find(|(s, _)| *s == spec) {
            return Ok(self.texts[*i].0.clone());
        }
        let json = serde_json::to_string(spec)?;
        let addr = {
            use sha2::{Digest, Sha256};
            hex::encode(Sha256::digest(json.as_bytes()))
        };
        seen.push((spec, self.texts.len()));
        self.texts.push((addr.clone(), json));
        Ok(addr)
    }
}

/// Deployment placements as rows (kind, namespace, name, node), for `commit_plan`'s diff.
pub(crate) fn assignment_rows(a: &BTreeMap<ObjectId, BTreeSet<String>>) -> BTreeSet<(String, String, String, String)> {
    a.iter()
        .flat_map(|(id, nodes)| {
            nodes.iter().map(|n| {
                (
                    id.kind.as_str().to_string(),
                    id.namespace.clone(),
                    id.name.clone(),
                    n.clone(),
                )
            })
        })
        .collect()
}

/// Who a client certificate belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertOwner {
    pub node: String,
    /// This request is the first with a renewed certificate: it is now the node's only one.
    pub promoted: bool,
}

/// Is a delta from `since` complete, given the node's current generation and tombstone floor?
pub fn needs_full(since: u64, current: u64, tombstone_floor: u64) -> bool {
    since == 0 || since > current || since < tombstone_floor
}

/// The hub's storage. See the module docs for the invariants.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    async fn create_token(&self, t: &TokenRow) -> Result<()>;
    async fn token(&self, id: &str) -> Result<Option<TokenRow>>;
    /// Check the token and the requested labels, refuse a taken name, record the node with its
    /// first generation and use up one token use, in one transaction. Returns the node's final
    /// labels (`outpost_core::link::node_labels`).
    async fn join(&self, token_id: &str, secret_sha256: &str, node: &NewNode, now: UnixMs) -> Result<Labels>;
    /// The node holding this certificate: its current one, or the one `renew` issued last (which
    /// then becomes the current one, and the old one stops working).
    async fn node_by_cert(&self, cert_fp: &str) -> Result<Option<CertOwner>>;
    async fn node(&self, name: &str) -> Result<Option<NodeRow>>;
    async fn nodes(&self) -> Result<Vec<NodeRow>>;
    /// Record contact; returns the previous last contact (None when the node is unknown).
    async fn touch(&self, node: &str, now: UnixMs) -> Result<Option<UnixMs>>;
    /// [`Store::touch`] without reading the store, when this process knows of a contact of the
    /// node at most `within_ms` old (a lower bound of the stored one: enough to know the node was
    /// not offline); None: call `touch`. On PostgreSQL every sync and report read the node's
    /// contact, one pooled statement each: after a change to 100,000 nodes, 100,000 of them at
    /// once, and the pools timed out.
    fn touch_if_recent(&self, _node: &str, _now: UnixMs, _within_ms: i64) -> Option<UnixMs> {
        None
    }
    /// A long-poll of `node` opened (`true`) or ended (`false`). While one is open, the node's
    /// last contact reads as the time of the read; when the last one ends it is what it was
    /// (a hold that ended normally touches first; one whose connection died does not).
    fn hold(&self, node: &str, open: bool);
    /// What replicas on one database share (wake-ups, the write lock, relays); None on a store
    /// only one hub process uses (SQLite), where all of that stays in the process.
    fn shared(&self) -> Option<&notify::Shared> {
        None
    }
    /// Write the contacts held in memory now (the nodes holding a long-poll here count as in
    /// contact at `now`), so other replicas see them; called every
    /// `outpost_core::replicas::contact_every` where replicas share the store.
    async fn flush_contacts(&self, _now: UnixMs) -> Result<()> {
        Ok(())
    }
    /// Record a renewed certificate as the node's next one; the current one keeps working until
    /// the next one is used (see `node_by_cert`). A later renewal replaces an unused next one.
    async fn renew(&self, node: &str, cert_fp: &str, cert_not_after: UnixMs) -> Result<()>;
    /// Remove the node and everything recorded about it. False when it did not exist.
    async fn delete_node(&self, name: &str) -> Result<bool>;
    /// The answer to a sync from `since`: `generation == since` means nothing changed.
    /// None when the node is unknown.
    async fn sync(&self, node: &str, since: u64) -> Result<Option<SyncResponse>>;
    /// Many syncs read at once (the polls a change woke, queued in the hub): per `(node,
    /// since)`, in order, the node's [`SyncRead`], None for an unknown node. One read
    /// transaction for the group: a fleet-wide change costs a few statements per group, not a
    /// few per node (issue 16).
    async fn sync_group(&self, reads: &[(String, u64)]) -> Result<Vec<Option<SyncRead>>>;
    /// Store a status report; returns the highest event sequence stored for the node.
    async fn record_status(&self, node: &str, report: &StatusReport, now: UnixMs) -> Result<u64>;
    /// Store many status reports in one transaction (group commit); per report, the highest
    /// event sequence stored, or why that report was refused.
    async fn record_statuses(&self, batch: &[(String, StatusReport, UnixMs)]) -> Result<Vec<Result<u64, String>>>;
    async fn statuses(&self, node: Option<&str>) -> Result<Vec<(String, WorkloadStatus)>>;
    async fn events(&self, node: &str, limit: u32) -> Result<Vec<NodeEvent>>;
    /// Upsert all objects in one transaction (namespace already set explicitly).
    async fn apply(&self, objects: &[Object], now: UnixMs) -> Result<Vec<ApplyResult>>;
    async fn objects(&self) -> Result<Vec<StoredObject>>;
    async fn object(&self, id: &ObjectId) -> Result<Option<StoredObject>>;
    /// Delete in one transaction; returns (deleted, not found).
    async fn delete_objects(&self, ids: &[ObjectId]) -> Result<(Vec<ObjectId>, Vec<ObjectId>)>;
    /// Point an image name at a pushed archive.
    async fn put_image_tag(&self, t: &ImageTag) -> Result<()>;
    async fn image_tag(&self, name: &str) -> Result<Option<ImageTag>>;
    async fn image_tags(&self) -> Result<Vec<ImageTag>>;
    /// Revision history of a workload, oldest first.
    async fn revisions(&self, id: &ObjectId) -> Result<Vec<RevisionRow>>;
    async fn schedule_inputs(&self) -> Result<ScheduleInputs>;
    /// The scheduler's inputs with only the rows of `nodes` (their node rows, what they hold,
    /// their prefetch hints); objects, placements, rollouts as for [`Store::schedule_inputs`].
    /// For a group of joins (`scheduler::plan_join`), which changes no other node.
    async fn schedule_inputs_for(&self, nodes: &[String]) -> Result<ScheduleInputs>;
    /// Write a plan in one transaction; returns the new generation of every node that changed.
    /// Deployment placements are diffed against the stored ones: only rows that differ are
    /// written, and a plan that changes nothing writes nothing and bumps no generation.
    async fn commit_plan(&self, plan: &Plan) -> Result<BTreeMap<String, u64>>;
    /// Every node's desired rows.
    async fn desired(&self) -> Result<Vec<DesiredRow>>;
    /// The prefetch hints a node holds (images to fetch before its maintenance window).
    async fn prefetch(&self, node: &str) -> Result<Vec<WorkloadSpec>>;
    /// A workload's current (or last) rollout.
    async fn rollout(&self, workload: &str) -> Result<Option<Rollout>>;
    async fn rollouts(&self) -> Result<Vec<Rollout>>;
    /// Store a rollout (one per workload: a new one replaces the old).
    async fn put_rollout(&self, r: &Rollout) -> Result<()>;
    /// The GitOps controller's memory per GitRepo (`namespace/name` -> its JSON,
    /// `crate::gitops::RepoState`).
    async fn gitops_states(&self) -> Result<Vec<(String, String)>>;
    /// Store one GitRepo's controller state (`None`: forget it, the GitRepo is gone).
    async fn put_gitops_state(&self, repo: &str, state: Option<&str>, now: UnixMs) -> Result<()>;
}

/// Contacts and long-polls kept in memory by one hub process (both backends).
///
/// Contacts (`last_seen`) not yet written: every sync and status request is a contact, and an
/// fsync'd write for each was the hub's scale limit (BENCHMARKS.md). They are overlaid on every
/// node read and written with the next status report's transaction; a hub crash loses at most
/// the contacts since then, which the next poll restores. Long-polls open per node: a node
/// holding one is in contact all along (its last contact reads as now), however long the hold
/// (docs/protocol.md §12).
#[derive(Default)]
pub(crate) struct Contacts {
    seen: Mutex<HashMap<String, UnixMs>>,
    held: Mutex<HashMap<String, usize>>,
    /// The latest contact of each node this process knows of (not drained by the writer): a
    /// lower bound of the stored one, which lets [`Store::touch_if_recent`] skip the read.
    known: Mutex<HashMap<String, UnixMs>>,
}

impl Contacts {
    /// The contacts not yet written, forgotten here (the caller writes them).
    fn drain(&self) -> Vec<(String, UnixMs)> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).drain().collect()
    }

    /// A node row with its latest contact, written or not (now, while it holds a long-poll).
    fn overlay(&self, mut n: NodeRow) -> NodeRow {
        if let Some(t) = self.seen.lock().unwrap_or_else(|e| e.into_inner()).get(&n.name) {
            n.last_seen = Some(n.last_seen.unwrap_or(0).max(*t));
        }
        if self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&n.name)
        {
            n.last_seen = Some(n.last_seen.unwrap_or(0).max(outpost_api::now_ms()));
        }
        n
    }

    /// The nodes holding a long-poll here now.
    fn held(&self) -> Vec<String> {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    fn hold(&self, node: &str, open: bool) {
        let mut h = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if open {
            *h.entry(node.to_string()).or_default() += 1;
        } else if let Some(n) = h.get_mut(node) {
            *n -= 1;
            if *n == 0 {
                h.remove(node);
            }
        }
    }

    /// Record a contact of a node whose stored last contact is `stored`; returns the previous
    /// last contact (stored or held here).
    fn touch(&self, node: &str, stored: UnixMs, now: UnixMs) -> UnixMs {
        let mut cache = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let prev = stored
            .max(cache.get(node).copied().unwrap_or(0))
            .max(known.get(node).copied().unwrap_or(0));
        cache.insert(node.to_string(), prev.max(now));
        known.insert(node.to_string(), prev.max(now));
        prev
    }

    /// [`Store::touch_if_recent`] from memory: the contact this process knows of, when it is
    /// no older than `within_ms` (the contact is recorded then), else None.
    fn touch_if_recent(&self, node: &str, now: UnixMs, within_ms: i64) -> Option<UnixMs> {
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner()).get(node).copied();
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner()).contains_key(node);
        let prev = if held { Some(now) } else { known };
        match prev {
            Some(p) if now.saturating_sub(p) <= within_ms => Some(self.touch(node, p, now)),
            _ => None,
        }
    }

    /// Forget what this process knows of a deleted node's contacts.
    fn forget(&self, node: &str) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).remove(node);
        self.known.lock().unwrap_or_else(|e| e.into_inner()).remove(node);
    }
}

/// Earlier revisions whose templates the scheduler needs: those nodes hold, and those rollouts
/// go back to (not the current one, which is in the object).
fn wanted_templates(
    objects: &[StoredObject],
    held_revisions: &BTreeMap<String, BTreeMap<String, u64>>,
    rollouts: &BTreeMap<String, Rollout>,
) -> BTreeSet<(ObjectId, u64)> {
    let mut wanted: BTreeSet<(ObjectId, u64)> = BTreeSet::new();
    for o in objects
        .iter()
        .filter(|o| o.object.kind().is_workload() || o.object.kind().is_rolled_out())
    {
        let id = o.object.id();
        let key = outpost_core::render::workload_key(&id);
        for revs in held_revisions.values() {
            if let Some(r) = revs.get(&key).filter(|r| **r != o.revision) {
                wanted.insert((id.clone(), *r));
            }
        }
        if let Some(ro) = rollouts.get(&key) {
            for r in ro.from.values().chain(ro.previous.iter()) {
                if *r != o.revision {
                    wanted.insert((id.clone(), *r));
                }
            }
        }
    }
    wanted
}

/// What an apply does to one object, given what is stored: (action, revision, created_at).
fn apply_action(
    prev: Option<&StoredObject>,
    obj: &Object,
    thash: &Option<String>,
    now: UnixMs,
) -> (&'static str, u64, UnixMs) {
    match prev {
        None => ("created", 1, now),
        Some(p) if p.object == *obj => ("unchanged", p.revision, p.created_at),
        Some(p) if p.template_hash != *thash => ("configured", p.revision + 1, p.created_at),
        Some(p) => ("configured", p.revision, p.created_at),
    }
}

/// The apply result reported for one object.
fn apply_result(id: &ObjectId, action: &str, revision: u64) -> ApplyResult {
    ApplyResult {
        object: id.to_string(),
        action: action.to_string(),
        revision: (id.kind.is_workload() || id.kind.is_rolled_out()).then_some(revision),
    }
}

/// Tables holding rows about one node (removed with it).
const NODE_TABLES: [&str; 6] = [
    "assignments",
    "node_workloads",
    "node_tombstones",
    "node_prefetch",
    "workload_status",
    "events",
];

fn kind_of(s: &str) -> Result<Kind> {
    Kind::parse_cli(s).ok_or_else(|| StoreError::UnknownKind(s.to_string()))
}

/// Decode a stored manifest by its stored kind (the untagged [`Object`] cannot tell a
/// DaemonSet from a Deployment by shape alone).
pub(crate) fn decode_object(kind: Kind, manifest: &str) -> Result<Object> {
    Ok(match kind {
        Kind::Deployment => Object::Deployment(serde_json::from_str(manifest)?),
        Kind::DaemonSet => Object::DaemonSet(serde_json::from_str(manifest)?),
        Kind::ConfigMap => Object::ConfigMap(serde_json::from_str(manifest)?),
        Kind::Secret => Object::Secret(serde_json::from_str(manifest)?),
        Kind::Service => Object::Service(serde_json::from_str(manifest)?),
        Kind::AlertPolicy => Object::AlertPolicy(serde_json::from_str(manifest)?),
        Kind::Job => Object::Job(serde_json::from_str(manifest)?),
        Kind::CronJob => Object::CronJob(serde_json::from_str(manifest)?),
        Kind::PersistentVolumeClaim => Object::PersistentVolumeClaim(serde_json::from_str(manifest)?),
        Kind::Namespace => Object::Namespace(serde_json::from_str(manifest)?),
        Kind::AgentUpdate => Object::AgentUpdate(serde_json::from_str(manifest)?),
        Kind::RolloutPolicy => Object::RolloutPolicy(serde_json::from_str(manifest)?),
        Kind::Pipeline => Object::Pipeline(serde_json::from_str(manifest)?),
        Kind::GitRepo => Object::GitRepo(serde_json::from_str(manifest)?),
    })
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
