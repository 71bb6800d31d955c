//! The hub's durable state, behind the [`Store`] trait so another database (PostgreSQL) can be
//! added without touching the rest of the hub.
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
//! All methods are synchronous and short; async callers run them on the blocking pool.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use outpost_api::{
    ApplyResult, ImageTag, Kind, Labels, NodeEvent, Object, ObjectId, StatusReport, SyncResponse, UnixMs, WorkloadSpec,
    WorkloadStatus,
};
use outpost_core::waves::Rollout;
use rusqlite::{params, Connection, OptionalExtension, Transaction};

/// Current schema version, kept in `meta.schema_version`. 2: token `node_labels`, two-phase
/// renewal (`nodes.next_cert_fp`), `kubernetes.io/hostname` forced to the node's name.
/// 3: fleet rollouts (`rollouts`, `node_prefetch`, `node_workloads.revision`).
pub const SCHEMA_VERSION: i64 = 3;
/// Events kept per node (older ones are pruned when new ones arrive).
pub const EVENTS_KEPT: i64 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored data is not valid JSON ({0}); the database may be corrupt or from a newer hub")]
    Json(#[from] serde_json::Error),
    #[error("database {path} has schema version {found}, this hub knows up to {SCHEMA_VERSION}; run the newer hub release that created it")]
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
pub trait Store: Send + Sync + 'static {
    fn create_token(&self, t: &TokenRow) -> Result<()>;
    fn token(&self, id: &str) -> Result<Option<TokenRow>>;
    /// Check the token and the requested labels, refuse a taken name, record the node with its
    /// first generation and use up one token use, in one transaction. Returns the node's final
    /// labels (`outpost_core::link::node_labels`).
    fn join(&self, token_id: &str, secret_sha256: &str, node: &NewNode, now: UnixMs) -> Result<Labels>;
    /// The node holding this certificate: its current one, or the one `renew` issued last (which
    /// then becomes the current one, and the old one stops working).
    fn node_by_cert(&self, cert_fp: &str) -> Result<Option<CertOwner>>;
    fn node(&self, name: &str) -> Result<Option<NodeRow>>;
    fn nodes(&self) -> Result<Vec<NodeRow>>;
    /// Record contact; returns the previous last contact (None when the node is unknown).
    fn touch(&self, node: &str, now: UnixMs) -> Result<Option<UnixMs>>;
    /// A long-poll of `node` opened (`true`) or ended (`false`). While one is open, the node's
    /// last contact reads as the time of the read; when the last one ends it is what it was
    /// (a hold that ended normally touches first; one whose connection died does not).
    fn hold(&self, node: &str, open: bool);
    /// Record a renewed certificate as the node's next one; the current one keeps working until
    /// the next one is used (see `node_by_cert`). A later renewal replaces an unused next one.
    fn renew(&self, node: &str, cert_fp: &str, cert_not_after: UnixMs) -> Result<()>;
    /// Remove the node and everything recorded about it. False when it did not exist.
    fn delete_node(&self, name: &str) -> Result<bool>;
    /// The answer to a sync from `since`: `generation == since` means nothing changed.
    /// None when the node is unknown.
    fn sync(&self, node: &str, since: u64) -> Result<Option<SyncResponse>>;
    /// Store a status report; returns the highest event sequence stored for the node.
    fn record_status(&self, node: &str, report: &StatusReport, now: UnixMs) -> Result<u64>;
    /// Store many status reports in one transaction (group commit); per report, the highest
    /// event sequence stored, or why that report was refused.
    fn record_statuses(&self, batch: &[(String, StatusReport, UnixMs)]) -> Result<Vec<Result<u64, String>>> {
        Ok(batch
            .iter()
            .map(|(n, r, now)| self.record_status(n, r, *now).map_err(|e| e.to_string()))
            .collect())
    }
    fn statuses(&self, node: Option<&str>) -> Result<Vec<(String, WorkloadStatus)>>;
    fn events(&self, node: &str, limit: u32) -> Result<Vec<NodeEvent>>;
    /// Upsert all objects in one transaction (namespace already set explicitly).
    fn apply(&self, objects: &[Object], now: UnixMs) -> Result<Vec<ApplyResult>>;
    fn objects(&self) -> Result<Vec<StoredObject>>;
    fn object(&self, id: &ObjectId) -> Result<Option<StoredObject>>;
    /// Delete in one transaction; returns (deleted, not found).
    fn delete_objects(&self, ids: &[ObjectId]) -> Result<(Vec<ObjectId>, Vec<ObjectId>)>;
    /// Point an image name at a pushed archive.
    fn put_image_tag(&self, t: &ImageTag) -> Result<()>;
    fn image_tag(&self, name: &str) -> Result<Option<ImageTag>>;
    fn image_tags(&self) -> Result<Vec<ImageTag>>;
    /// Revision history of a workload, oldest first.
    fn revisions(&self, id: &ObjectId) -> Result<Vec<RevisionRow>>;
    fn schedule_inputs(&self) -> Result<ScheduleInputs>;
    /// Write a plan in one transaction; returns the new generation of every node that changed.
    fn commit_plan(&self, plan: &Plan) -> Result<BTreeMap<String, u64>>;
    /// Every node's desired rows.
    fn desired(&self) -> Result<Vec<DesiredRow>>;
    /// The prefetch hints a node holds (images to fetch before its maintenance window).
    fn prefetch(&self, node: &str) -> Result<Vec<WorkloadSpec>>;
    /// A workload's current (or last) rollout.
    fn rollout(&self, workload: &str) -> Result<Option<Rollout>>;
    fn rollouts(&self) -> Result<Vec<Rollout>>;
    /// Store a rollout (one per workload: a new one replaces the old).
    fn put_rollout(&self, r: &Rollout) -> Result<()>;
    /// The GitOps controller's memory per GitRepo (`namespace/name` -> its JSON,
    /// `crate::gitops::RepoState`).
    fn gitops_states(&self) -> Result<Vec<(String, String)>>;
    /// Store one GitRepo's controller state (`None`: forget it, the GitRepo is gone).
    fn put_gitops_state(&self, repo: &str, state: Option<&str>, now: UnixMs) -> Result<()>;
}

/// [`Store`] on one SQLite file (WAL, synchronous=FULL) behind a mutex.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    /// Contacts (`last_seen`) not yet written: every sync and status request is a contact, and
    /// an fsync'd write for each was the hub's scale limit (BENCHMARKS.md). They are overlaid on
    /// every node read and written with the next status report's transaction; a hub crash loses
    /// at most the contacts since then, which the next poll restores.
    seen: Mutex<std::collections::HashMap<String, UnixMs>>,
    /// Long-polls open per node: a node holding one is in contact all along (its last contact
    /// reads as now), however long the hold (docs/protocol.md §12).
    held: Mutex<std::collections::HashMap<String, usize>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY, secret_sha256 TEXT NOT NULL, labels TEXT NOT NULL,
    expires_at INTEGER, uses_left INTEGER, used INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL,
    node_labels TEXT NOT NULL DEFAULT '[]');
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY, labels TEXT NOT NULL, cert_fp TEXT NOT NULL UNIQUE,
    cert_not_after INTEGER NOT NULL, joined_at INTEGER NOT NULL, last_seen INTEGER,
    generation INTEGER NOT NULL, applied_generation INTEGER NOT NULL DEFAULT 0,
    tombstone_floor INTEGER NOT NULL DEFAULT 0, agent_version TEXT, uptime_secs INTEGER,
    token_id TEXT, next_cert_fp TEXT, next_cert_not_after INTEGER);
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL, manifest TEXT NOT NULL,
    template_hash TEXT, revision INTEGER NOT NULL, created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL, PRIMARY KEY (kind, namespace, name));
CREATE TABLE IF NOT EXISTS revisions (
    kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL, revision INTEGER NOT NULL,
    template_hash TEXT NOT NULL, template TEXT NOT NULL, created_at INTEGER NOT NULL,
    PRIMARY KEY (kind, namespace, name, revision));
CREATE TABLE IF NOT EXISTS assignments (
    kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL, node TEXT NOT NULL,
    PRIMARY KEY (kind, namespace, name, node));
CREATE TABLE IF NOT EXISTS node_workloads (
    node TEXT NOT NULL, key TEXT NOT NULL, spec TEXT NOT NULL, hash TEXT NOT NULL,
    changed_gen INTEGER NOT NULL, revision INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (node, key));
CREATE TABLE IF NOT EXISTS node_prefetch (
    node TEXT NOT NULL, key TEXT NOT NULL, spec TEXT NOT NULL, hash TEXT NOT NULL, PRIMARY KEY (node, key));
CREATE TABLE IF NOT EXISTS rollouts (
    workload TEXT PRIMARY KEY, revision INTEGER NOT NULL, state TEXT NOT NULL, updated_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS node_tombstones (
    node TEXT NOT NULL, key TEXT NOT NULL, gen INTEGER NOT NULL, PRIMARY KEY (node, key));
CREATE TABLE IF NOT EXISTS workload_status (
    node TEXT NOT NULL, key TEXT NOT NULL, status TEXT NOT NULL, updated_at INTEGER NOT NULL,
    PRIMARY KEY (node, key));
CREATE TABLE IF NOT EXISTS image_tags (
    name TEXT PRIMARY KEY, digest TEXT NOT NULL, size INTEGER NOT NULL, pushed_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    node TEXT NOT NULL, seq INTEGER NOT NULL, at INTEGER NOT NULL, workload TEXT,
    reason TEXT NOT NULL, message TEXT NOT NULL, received_at INTEGER NOT NULL,
    PRIMARY KEY (node, seq));
CREATE TABLE IF NOT EXISTS gitops_state (
    repo TEXT PRIMARY KEY, state TEXT NOT NULL, updated_at INTEGER NOT NULL);
";

/// Store one status report inside an open transaction or savepoint.
fn record_status_in(tx: &Connection, node: &str, report: &StatusReport, now: UnixMs) -> Result<u64> {
    let generation: i64 = tx.query_row("SELECT generation FROM nodes WHERE name = ?1", params![node], |r| {
        r.get(0)
    })?;
    // An agent cannot have applied more than we sent; clamp so pruning stays safe.
    let applied = i(report.generation).min(generation);
    tx.execute(
        "UPDATE nodes SET last_seen = MAX(COALESCE(last_seen, 0), ?2), agent_version = ?3, uptime_secs = ?4,
                    applied_generation = ?5 WHERE name = ?1",
        params![node, now, report.agent_version, i(report.uptime_secs), applied],
    )?;
    // Tombstones the agent has applied are no longer needed; remember the floor.
    tx.execute(
        "DELETE FROM node_tombstones WHERE node = ?1 AND gen <= ?2",
        params![node, applied],
    )?;
    tx.execute(
        "UPDATE nodes SET tombstone_floor = MAX(tombstone_floor, ?2) WHERE name = ?1",
        params![node, applied],
    )?;
    if report.full {
        let listed: BTreeSet<&str> = report.workloads.iter().map(|w| w.key.as_str()).collect();
        let keys: Vec<String> = {
            let mut st = tx.prepare("SELECT key FROM workload_status WHERE node = ?1")?;
            let rows = st.query_map(params![node], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        for k in keys.iter().filter(|k| !listed.contains(k.as_str())) {
            tx.execute(
                "DELETE FROM workload_status WHERE node = ?1 AND key = ?2",
                params![node, k],
            )?;
        }
    }
    for w in &report.workloads {
        tx.execute(
            "INSERT INTO workload_status (node, key, status, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(node, key) DO UPDATE SET status = excluded.status, updated_at = excluded.updated_at",
            params![node, w.key, serde_json::to_string(w)?, now],
        )?;
    }
    for k in &report.removed {
        tx.execute(
            "DELETE FROM workload_status WHERE node = ?1 AND key = ?2",
            params![node, k],
        )?;
    }
    for e in &report.events {
        tx.execute(
            "INSERT OR IGNORE INTO events (node, seq, at, workload, reason, message, received_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![node, i(e.seq), e.at, e.workload, e.reason, e.message, now],
        )?;
    }
    let acked: Option<i64> = tx.query_row("SELECT MAX(seq) FROM events WHERE node = ?1", params![node], |r| {
        r.get(0)
    })?;
    let acked = acked.unwrap_or(0);
    if !report.events.is_empty() {
        tx.execute(
            "DELETE FROM events WHERE node = ?1 AND seq <= ?2",
            params![node, acked - EVENTS_KEPT],
        )?;
    }
    Ok(u(acked))
}

fn image_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ImageTag> {
    Ok(ImageTag {
        name: r.get(0)?,
        digest: r.get(1)?,
        size: u(r.get(2)?),
        pushed_at: r.get(3)?,
    })
}

fn kind_of(s: &str) -> Result<Kind> {
    Kind::parse_cli(s).ok_or_else(|| StoreError::UnknownKind(s.to_string()))
}

/// Decode a stored manifest by its stored kind (the untagged [`Object`] cannot tell a
/// DaemonSet from a Deployment by shape alone).
fn decode_object(kind: Kind, manifest: &str) -> Result<Object> {
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

const NODE_COLS: &str = "name, labels, cert_fp, cert_not_after, joined_at, last_seen, generation, \
     applied_generation, agent_version, uptime_secs";

impl SqliteStore {
    /// Write the contacts held in memory, inside the caller's transaction.
    fn flush_seen(&self, tx: &Connection) -> Result<()> {
        let pending: Vec<(String, UnixMs)> = self.seen.lock().unwrap_or_else(|e| e.into_inner()).drain().collect();
        for (n, t) in &pending {
            tx.execute(
                "UPDATE nodes SET last_seen = MAX(COALESCE(last_seen, 0), ?2) WHERE name = ?1",
                params![n, t],
            )?;
        }
        Ok(())
    }

    /// A node row with its latest contact, written or not (now, while it holds a long-poll).
    fn with_seen(&self, mut n: NodeRow) -> NodeRow {
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
}

fn node_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(NodeRow, String)> {
    let labels: String = r.get(1)?;
    Ok((
        NodeRow {
            name: r.get(0)?,
            labels: Labels::new(),
            cert_fp: r.get(2)?,
            cert_not_after: r.get(3)?,
            joined_at: r.get(4)?,
            last_seen: r.get(5)?,
            generation: u(r.get(6)?),
            applied_generation: u(r.get(7)?),
            agent_version: r.get(8)?,
            uptime_secs: r.get::<_, Option<i64>>(9)?.map(u),
        },
        labels,
    ))
}

fn finish_node((mut n, labels): (NodeRow, String)) -> Result<NodeRow> {
    n.labels = serde_json::from_str(&labels)?;
    Ok(n)
}

fn next_gen(tx: &Transaction<'_>) -> Result<u64> {
    let cur: Option<String> = tx
        .query_row("SELECT value FROM meta WHERE key = 'gen_seq'", [], |r| r.get(0))
        .optional()?;
    let next = cur.and_then(|s| s.parse::<u64>().ok()).unwrap_or(0) + 1;
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('gen_seq', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![next.to_string()],
    )?;
    Ok(next)
}

fn object_row(tx: &Transaction<'_>, id: &ObjectId) -> Result<Option<StoredObject>> {
    let row = tx
        .query_row(
            "SELECT manifest, template_hash, revision, created_at, updated_at FROM objects
             WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
            params![id.kind.as_str(), id.namespace, id.name],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get(1)?,
                    r.get::<_, i64>(2)?,
                    r.get(3)?,
                    r.get(4)?,
                ))
            },
        )
        .optional()?;
    row.map(|(m, template_hash, rev, created_at, updated_at)| {
        Ok(StoredObject {
            object: decode_object(id.kind, &m)?,
            template_hash,
            revision: u(rev),
            created_at,
            updated_at,
        })
    })
    .transpose()
}

/// Add a column unless it exists (schema upgrades of tables created by an older hub).
fn add_column(conn: &Connection, table: &str, column: &str, decl: &str) -> Result<()> {
    let exists: bool = conn
        .prepare(&format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"))?
        .exists(params![column])?;
    if !exists {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
    }
    Ok(())
}

/// Bring a database from `from` to [`SCHEMA_VERSION`], in one transaction.
fn migrate(conn: &mut Connection, from: i64) -> Result<()> {
    let tx = conn.transaction()?;
    if from < 2 {
        add_column(&tx, "tokens", "node_labels", "TEXT NOT NULL DEFAULT '[]'")?;
        add_column(&tx, "nodes", "next_cert_fp", "TEXT")?;
        add_column(&tx, "nodes", "next_cert_not_after", "INTEGER")?;
        // The hub owns kubernetes.io/hostname: undo any a node set for itself.
        tx.execute(
            "UPDATE nodes SET labels = json_set(labels, '$.\"kubernetes.io/hostname\"', name)",
            [],
        )?;
    }
    if from < 3 {
        add_column(&tx, "node_workloads", "revision", "INTEGER NOT NULL DEFAULT 0")?;
        tx.execute(
            "UPDATE node_workloads SET revision = COALESCE(json_extract(spec, '$.revision'), 0) WHERE revision = 0",
            [],
        )?;
    }
    tx.execute_batch("CREATE INDEX IF NOT EXISTS nodes_next_cert ON nodes (next_cert_fp)")?;
    tx.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?1)",
        params![SCHEMA_VERSION.to_string()],
    )?;
    tx.commit()?;
    Ok(())
}

impl SqliteStore {
    /// Open (or create) the database file and its schema.
    pub fn open(path: &Path) -> Result<Self> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Two connections share this file (store and monitoring): a deferred transaction that
        // reads, then writes after the other committed, fails at once with SQLITE_BUSY whatever
        // the busy timeout. Write transactions take the lock when they begin instead.
        conn.set_transaction_behavior(rusqlite::TransactionBehavior::Immediate);
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        let found: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| r.get(0))
            .optional()?;
        match found.and_then(|v| v.parse::<i64>().ok()) {
            Some(v) if v > SCHEMA_VERSION => {
                return Err(StoreError::SchemaTooNew {
                    path: path.display().to_string(),
                    found: v,
                })
            }
            // A new database already has the current tables; the upgrade steps are no-ops.
            Some(v) => migrate(&mut conn, v)?,
            None => migrate(&mut conn, SCHEMA_VERSION)?,
        }
        Ok(Self {
            conn: Mutex::new(conn),
            seen: Mutex::new(Default::default()),
            held: Mutex::new(Default::default()),
        })
    }

    fn conn(&self) -> Result<MutexGuard<'_, Connection>> {
        self.conn.lock().map_err(|_| StoreError::Poisoned)
    }
}

impl Store for SqliteStore {
    fn create_token(&self, t: &TokenRow) -> Result<()> {
        self.conn()?.execute(
            "INSERT INTO tokens (id, secret_sha256, labels, expires_at, uses_left, used, created_at, node_labels)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                t.id,
                t.secret_sha256,
                serde_json::to_string(&t.labels)?,
                t.expires_at,
                t.uses_left.map(i),
                i(t.used),
                t.created_at,
                serde_json::to_string(&t.node_labels)?
            ],
        )?;
        Ok(())
    }

    fn token(&self, id: &str) -> Result<Option<TokenRow>> {
        let conn = self.conn()?;
        token_row(&conn, id)
    }

    fn join(&self, token_id: &str, secret_sha256: &str, node: &NewNode, now: UnixMs) -> Result<Labels> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let tok = token_row(&tx, token_id)?;
        check_token(tok.as_ref(), token_id, secret_sha256, now).map_err(StoreError::Token)?;
        let tok = tok.ok_or_else(|| StoreError::Token(TokenProblem::Unknown { id: token_id.into() }))?;
        let exists: Option<String> = tx
            .query_row("SELECT name FROM nodes WHERE name = ?1", params![node.name], |r| {
                r.get(0)
            })
            .optional()?;
        if exists.is_some() {
            return Err(StoreError::NodeExists(node.name.clone()));
        }
        let labels = outpost_core::link::node_labels(&node.name, &tok.labels, &tok.node_labels, &node.labels)?;
        let gen = next_gen(&tx)?;
        tx.execute(
            "INSERT INTO nodes (name, labels, cert_fp, cert_not_after, joined_at, generation, token_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                node.name,
                serde_json::to_string(&labels)?,
                node.cert_fp,
                node.cert_not_after,
                now,
                i(gen),
                token_id
            ],
        )?;
        tx.execute(
            "UPDATE tokens SET used = used + 1,
                    uses_left = CASE WHEN uses_left IS NULL THEN NULL ELSE uses_left - 1 END
             WHERE id = ?1",
            params![token_id],
        )?;
        tx.commit()?;
        Ok(labels)
    }

    fn node_by_cert(&self, cert_fp: &str) -> Result<Option<CertOwner>> {
        let conn = self.conn()?;
        // One indexed read per request, as before renewal was two-phase; the write happens
        // once, on the first request made with a renewed certificate.
        let found: Option<(String, bool)> = conn
            .query_row(
                "SELECT name, cert_fp = ?1 FROM nodes WHERE cert_fp = ?1 OR next_cert_fp = ?1",
                params![cert_fp],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((node, current)) = found else { return Ok(None) };
        if !current {
            conn.execute(
                "UPDATE nodes SET cert_fp = next_cert_fp, cert_not_after = next_cert_not_after,
                        next_cert_fp = NULL, next_cert_not_after = NULL
                 WHERE name = ?1 AND next_cert_fp = ?2",
                params![node, cert_fp],
            )?;
        }
        Ok(Some(CertOwner {
            node,
            promoted: !current,
        }))
    }

    fn node(&self, name: &str) -> Result<Option<NodeRow>> {
        let conn = self.conn()?;
        let row = conn
            .query_row(
                &format!("SELECT {NODE_COLS} FROM nodes WHERE name = ?1"),
                params![name],
                node_from_row,
            )
            .optional()?;
        row.map(finish_node).transpose().map(|n| n.map(|n| self.with_seen(n)))
    }

    fn nodes(&self) -> Result<Vec<NodeRow>> {
        let conn = self.conn()?;
        let mut st = conn.prepare(&format!("SELECT {NODE_COLS} FROM nodes ORDER BY name"))?;
        let rows = st.query_map([], node_from_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|r| finish_node(r).map(|n| self.with_seen(n)))
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

    fn touch(&self, node: &str, now: UnixMs) -> Result<Option<UnixMs>> {
        let conn = self.conn()?;
        let prev: Option<(Option<i64>, i64)> = conn
            .query_row(
                "SELECT last_seen, joined_at FROM nodes WHERE name = ?1",
                params![node],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((seen, joined)) = prev else { return Ok(None) };
        let mut cache = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let prev = seen.unwrap_or(joined).max(cache.get(node).copied().unwrap_or(0));
        cache.insert(node.to_string(), prev.max(now));
        Ok(Some(prev))
    }

    fn renew(&self, node: &str, cert_fp: &str, cert_not_after: UnixMs) -> Result<()> {
        self.conn()?.execute(
            "UPDATE nodes SET next_cert_fp = ?2, next_cert_not_after = ?3 WHERE name = ?1",
            params![node, cert_fp, cert_not_after],
        )?;
        Ok(())
    }

    fn delete_node(&self, name: &str) -> Result<bool> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let n = tx.execute("DELETE FROM nodes WHERE name = ?1", params![name])?;
        for table in [
            "assignments",
            "node_workloads",
            "node_tombstones",
            "node_prefetch",
            "workload_status",
            "events",
        ] {
            tx.execute(&format!("DELETE FROM {table} WHERE node = ?1"), params![name])?;
        }
        tx.commit()?;
        Ok(n > 0)
    }

    fn sync(&self, node: &str, since: u64) -> Result<Option<SyncResponse>> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let Some((generation, floor)) = tx
            .query_row(
                "SELECT generation, tombstone_floor FROM nodes WHERE name = ?1",
                params![node],
                |r| Ok((u(r.get(0)?), u(r.get(1)?))),
            )
            .optional()?
        else {
            return Ok(None);
        };
        if generation == since {
            return Ok(Some(SyncResponse {
                generation,
                full: false,
                upsert: vec![],
                remove: vec![],
            }));
        }
        let full = needs_full(since, generation, floor);
        let from = if full { 0 } else { since };
        let specs: Vec<String> = {
            let mut st =
                tx.prepare("SELECT spec FROM node_workloads WHERE node = ?1 AND changed_gen > ?2 ORDER BY key")?;
            let rows = st.query_map(params![node, i(from)], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let upsert = specs
            .iter()
            .map(|s| serde_json::from_str(s))
            .collect::<Result<Vec<WorkloadSpec>, _>>()?;
        let remove = if full {
            vec![]
        } else {
            let mut st = tx.prepare("SELECT key FROM node_tombstones WHERE node = ?1 AND gen > ?2 ORDER BY key")?;
            let rows = st.query_map(params![node, i(since)], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        Ok(Some(SyncResponse {
            generation,
            full,
            upsert,
            remove,
        }))
    }

    fn record_status(&self, node: &str, report: &StatusReport, now: UnixMs) -> Result<u64> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        self.flush_seen(&tx)?;
        let acked = record_status_in(&tx, node, report, now)?;
        tx.commit()?;
        Ok(acked)
    }

    fn record_statuses(&self, batch: &[(String, StatusReport, UnixMs)]) -> Result<Vec<Result<u64, String>>> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        self.flush_seen(&tx)?;
        let mut out = Vec::with_capacity(batch.len());
        for (node, report, now) in batch {
            // A savepoint per report: one that fails (its node was just deleted) is undone alone.
            let sp = tx.savepoint()?;
            match record_status_in(&sp, node, report, *now) {
                Ok(acked) => {
                    sp.commit()?;
                    out.push(Ok(acked));
                }
                Err(e) => out.push(Err(e.to_string())),
            }
        }
        tx.commit()?;
        Ok(out)
    }

    fn statuses(&self, node: Option<&str>) -> Result<Vec<(String, WorkloadStatus)>> {
        let conn = self.conn()?;
        let mut st =
            conn.prepare("SELECT node, status FROM workload_status WHERE ?1 IS NULL OR node = ?1 ORDER BY node, key")?;
        let rows = st
            .query_map(params![node], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(n, s)| Ok((n, serde_json::from_str(&s)?)))
            .collect()
    }

    fn events(&self, node: &str, limit: u32) -> Result<Vec<NodeEvent>> {
        let conn = self.conn()?;
        let mut st = conn.prepare(
            "SELECT seq, at, workload, reason, message FROM events WHERE node = ?1 ORDER BY seq DESC LIMIT ?2",
        )?;
        let mut out = st
            .query_map(params![node, limit], |r| {
                Ok(NodeEvent {
                    seq: u(r.get(0)?),
                    at: r.get(1)?,
                    workload: r.get(2)?,
                    reason: r.get(3)?,
                    message: r.get(4)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        out.reverse();
        Ok(out)
    }

    fn apply(&self, objects: &[Object], now: UnixMs) -> Result<Vec<ApplyResult>> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let mut results = Vec::with_capacity(objects.len());
        for obj in objects {
            let id = obj.id();
            let manifest = serde_json::to_string(obj)?;
            let thash = outpost_core::render::template_hash(obj);
            let prev = object_row(&tx, &id)?;
            let (action, revision, created_at) = match &prev {
                None => ("created", 1, now),
                Some(p) if p.object == *obj => ("unchanged", p.revision, p.created_at),
                Some(p) if p.template_hash != thash => ("configured", p.revision + 1, p.created_at),
                Some(p) => ("configured", p.revision, p.created_at),
            };
            if action != "unchanged" {
                tx.execute(
                    "INSERT INTO objects (kind, namespace, name, manifest, template_hash, revision, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT(kind, namespace, name) DO UPDATE SET manifest = excluded.manifest,
                        template_hash = excluded.template_hash, revision = excluded.revision,
                        updated_at = excluded.updated_at",
                    params![id.kind.as_str(), id.namespace, id.name, manifest, thash, i(revision), created_at, now],
                )?;
                if let (Some(h), Some(t)) = (&thash, revision_content(obj)?) {
                    tx.execute(
                        "INSERT OR IGNORE INTO revisions (kind, namespace, name, revision, template_hash, template, created_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                        params![id.kind.as_str(), id.namespace, id.name, i(revision), h, t, now],
                    )?;
                }
            }
            results.push(ApplyResult {
                object: id.to_string(),
                action: action.to_string(),
                revision: (id.kind.is_workload() || id.kind.is_rolled_out()).then_some(revision),
            });
        }
        tx.commit()?;
        Ok(results)
    }

    fn objects(&self) -> Result<Vec<StoredObject>> {
        let conn = self.conn()?;
        let mut st = conn.prepare(
            "SELECT kind, manifest, template_hash, revision, created_at, updated_at FROM objects
             ORDER BY kind, namespace, name",
        )?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(k, m, template_hash, rev, created_at, updated_at)| {
                Ok(StoredObject {
                    object: decode_object(kind_of(&k)?, &m)?,
                    template_hash,
                    revision: u(rev),
                    created_at,
                    updated_at,
                })
            })
            .collect()
    }

    fn object(&self, id: &ObjectId) -> Result<Option<StoredObject>> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        object_row(&tx, id)
    }

    fn delete_objects(&self, ids: &[ObjectId]) -> Result<(Vec<ObjectId>, Vec<ObjectId>)> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let (mut deleted, mut missing) = (Vec::new(), Vec::new());
        for id in ids {
            let p = params![id.kind.as_str(), id.namespace, id.name];
            let n = tx.execute(
                "DELETE FROM objects WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
                p,
            )?;
            tx.execute(
                "DELETE FROM assignments WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
                p,
            )?;
            tx.execute(
                "DELETE FROM revisions WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
                p,
            )?;
            if id.kind.is_workload() || id.kind.is_rolled_out() {
                tx.execute(
                    "DELETE FROM rollouts WHERE workload = ?1",
                    params![outpost_core::render::workload_key(id)],
                )?;
            }
            if n > 0 {
                deleted.push(id.clone());
            } else {
                missing.push(id.clone());
            }
        }
        tx.commit()?;
        Ok((deleted, missing))
    }

    fn put_image_tag(&self, t: &ImageTag) -> Result<()> {
        self.conn()?.execute(
            "INSERT OR REPLACE INTO image_tags (name, digest, size, pushed_at) VALUES (?1, ?2, ?3, ?4)",
            params![t.name, t.digest, t.size as i64, t.pushed_at],
        )?;
        Ok(())
    }

    fn image_tag(&self, name: &str) -> Result<Option<ImageTag>> {
        Ok(self
            .conn()?
            .query_row(
                "SELECT name, digest, size, pushed_at FROM image_tags WHERE name = ?1",
                params![name],
                image_row,
            )
            .optional()?)
    }

    fn image_tags(&self) -> Result<Vec<ImageTag>> {
        let conn = self.conn()?;
        let mut st = conn.prepare("SELECT name, digest, size, pushed_at FROM image_tags ORDER BY name")?;
        let rows = st.query_map([], image_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn revisions(&self, id: &ObjectId) -> Result<Vec<RevisionRow>> {
        let conn = self.conn()?;
        let mut st = conn.prepare(
            "SELECT revision, template_hash, created_at, template FROM revisions
             WHERE kind = ?1 AND namespace = ?2 AND name = ?3 ORDER BY revision",
        )?;
        let rows = st
            .query_map(params![id.kind.as_str(), id.namespace, id.name], |r| {
                Ok((u(r.get(0)?), r.get(1)?, r.get(2)?, r.get::<_, String>(3)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(revision, template_hash, created_at, t)| {
                Ok(RevisionRow {
                    revision,
                    template_hash,
                    created_at,
                    template: serde_json::from_str(&t)?,
                })
            })
            .collect()
    }

    fn schedule_inputs(&self) -> Result<ScheduleInputs> {
        let nodes = self.nodes()?;
        let objects = self.objects()?;
        let conn = self.conn()?;
        let mut assignments: BTreeMap<ObjectId, BTreeSet<String>> = BTreeMap::new();
        {
            let mut st = conn.prepare("SELECT kind, namespace, name, node FROM assignments")?;
            let rows = st
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            for (k, namespace, name, node) in rows {
                assignments
                    .entry(ObjectId {
                        kind: kind_of(&k)?,
                        namespace,
                        name,
                    })
                    .or_default()
                    .insert(node);
            }
        }
        let mut held: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let mut held_revisions: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        {
            let mut st = conn.prepare("SELECT node, key, hash, revision FROM node_workloads")?;
            let rows = st
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            for (node, key, hash, rev) in rows {
                held.entry(node.clone()).or_default().insert(key.clone(), hash);
                held_revisions.entry(node).or_default().insert(key, u(rev));
            }
        }
        let mut held_prefetch: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        {
            let mut st = conn.prepare("SELECT node, key, hash FROM node_prefetch")?;
            let rows = st
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            for (node, key, hash) in rows {
                held_prefetch.entry(node).or_default().insert(key, hash);
            }
        }
        let rollouts: BTreeMap<String, Rollout> = rollout_rows(&conn)?
            .into_iter()
            .map(|r| (r.workload.clone(), r))
            .collect();
        // Templates of earlier revisions: those nodes hold, and those rollouts go back to.
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
        let mut templates = BTreeMap::new();
        {
            let mut st = conn.prepare(
                "SELECT template FROM revisions WHERE kind = ?1 AND namespace = ?2 AND name = ?3 AND revision = ?4",
            )?;
            for (id, rev) in wanted {
                let t: Option<String> = st
                    .query_row(params![id.kind.as_str(), id.namespace, id.name, i(rev)], |r| r.get(0))
                    .optional()?;
                if let Some(t) = t {
                    templates.insert((id, rev), serde_json::from_str(&t)?);
                }
            }
        }
        Ok(ScheduleInputs {
            nodes,
            objects,
            assignments,
            held,
            held_revisions,
            held_prefetch,
            rollouts,
            templates,
        })
    }

    fn commit_plan(&self, plan: &Plan) -> Result<BTreeMap<String, u64>> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM assignments", [])?;
        for (id, nodes) in &plan.assignments {
            for n in nodes {
                tx.execute(
                    "INSERT INTO assignments (kind, namespace, name, node) VALUES (?1, ?2, ?3, ?4)",
                    params![id.kind.as_str(), id.namespace, id.name, n],
                )?;
            }
        }
        let mut bumped = BTreeMap::new();
        for (node, change) in &plan.changes {
            if change.upsert.is_empty() && change.remove.is_empty() && change.prefetch.is_none() {
                continue;
            }
            let gen = next_gen(&tx)?;
            if let Some(hints) = &change.prefetch {
                tx.execute("DELETE FROM node_prefetch WHERE node = ?1", params![node])?;
                for spec in hints {
                    tx.execute(
                        "INSERT INTO node_prefetch (node, key, spec, hash) VALUES (?1, ?2, ?3, ?4)",
                        params![node, spec.key, serde_json::to_string(spec)?, spec.hash],
                    )?;
                }
            }
            for spec in &change.upsert {
                tx.execute(
                    "INSERT INTO node_workloads (node, key, spec, hash, changed_gen, revision) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT(node, key) DO UPDATE SET spec = excluded.spec, hash = excluded.hash,
                        changed_gen = excluded.changed_gen, revision = excluded.revision",
                    params![node, spec.key, serde_json::to_string(spec)?, outpost_core::site_ha::delivery_hash(spec), i(gen), i(spec.revision)],
                )?;
                tx.execute(
                    "DELETE FROM node_tombstones WHERE node = ?1 AND key = ?2",
                    params![node, spec.key],
                )?;
            }
            for key in &change.remove {
                tx.execute(
                    "DELETE FROM node_workloads WHERE node = ?1 AND key = ?2",
                    params![node, key],
                )?;
                tx.execute(
                    "INSERT INTO node_tombstones (node, key, gen) VALUES (?1, ?2, ?3)
                     ON CONFLICT(node, key) DO UPDATE SET gen = excluded.gen",
                    params![node, key, i(gen)],
                )?;
            }
            tx.execute(
                "UPDATE nodes SET generation = ?2 WHERE name = ?1",
                params![node, i(gen)],
            )?;
            bumped.insert(node.clone(), gen);
        }
        tx.commit()?;
        Ok(bumped)
    }

    fn desired(&self) -> Result<Vec<DesiredRow>> {
        let conn = self.conn()?;
        let mut st = conn.prepare("SELECT node, key, hash, revision FROM node_workloads ORDER BY key, node")?;
        let rows = st
            .query_map([], |r| {
                Ok(DesiredRow {
                    node: r.get(0)?,
                    key: r.get(1)?,
                    hash: r.get(2)?,
                    revision: u(r.get(3)?),
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn prefetch(&self, node: &str) -> Result<Vec<WorkloadSpec>> {
        let conn = self.conn()?;
        let mut st = conn.prepare("SELECT spec FROM node_prefetch WHERE node = ?1 ORDER BY key")?;
        let rows = st
            .query_map(params![node], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.iter().map(|s| Ok(serde_json::from_str(s)?)).collect()
    }

    fn rollout(&self, workload: &str) -> Result<Option<Rollout>> {
        let conn = self.conn()?;
        let s: Option<String> = conn
            .query_row(
                "SELECT state FROM rollouts WHERE workload = ?1",
                params![workload],
                |r| r.get(0),
            )
            .optional()?;
        s.map(|s| Ok(serde_json::from_str(&s)?)).transpose()
    }

    fn rollouts(&self) -> Result<Vec<Rollout>> {
        rollout_rows(&*self.conn()?)
    }

    fn gitops_states(&self) -> Result<Vec<(String, String)>> {
        let conn = self.conn()?;
        let mut st = conn.prepare("SELECT repo, state FROM gitops_state ORDER BY repo")?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn put_gitops_state(&self, repo: &str, state: Option<&str>, now: UnixMs) -> Result<()> {
        let conn = self.conn()?;
        match state {
            Some(s) => conn.execute(
                "INSERT INTO gitops_state (repo, state, updated_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (repo) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
                params![repo, s, now],
            )?,
            None => conn.execute("DELETE FROM gitops_state WHERE repo = ?1", params![repo])?,
        };
        Ok(())
    }

    fn put_rollout(&self, r: &Rollout) -> Result<()> {
        self.conn()?.execute(
            "INSERT INTO rollouts (workload, revision, state, updated_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(workload) DO UPDATE SET revision = excluded.revision, state = excluded.state,
                updated_at = excluded.updated_at",
            params![r.workload, i(r.revision), serde_json::to_string(r)?, r.updated_at],
        )?;
        Ok(())
    }
}

fn rollout_rows(conn: &Connection) -> Result<Vec<Rollout>> {
    let mut st = conn.prepare("SELECT state FROM rollouts ORDER BY workload")?;
    let rows = st
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.iter().map(|s| Ok(serde_json::from_str(s)?)).collect()
}

fn token_row(conn: &Connection, id: &str) -> Result<Option<TokenRow>> {
    let row = conn
        .query_row(
            "SELECT id, secret_sha256, labels, expires_at, uses_left, used, created_at, node_labels
             FROM tokens WHERE id = ?1",
            params![id],
            |r| {
                Ok((
                    (
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Option<i64>>(3)?,
                    ),
                    (
                        r.get::<_, Option<i64>>(4)?,
                        r.get::<_, i64>(5)?,
                        r.get::<_, i64>(6)?,
                        r.get::<_, String>(7)?,
                    ),
                ))
            },
        )
        .optional()?;
    row.map(
        |((id, secret_sha256, labels, expires_at), (uses_left, used, created_at, node_labels))| {
            Ok(TokenRow {
                id,
                secret_sha256,
                labels: serde_json::from_str(&labels)?,
                expires_at,
                uses_left: uses_left.map(u),
                used: u(used),
                created_at,
                node_labels: serde_json::from_str(&node_labels)?,
            })
        },
    )
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_api::{RestartPolicy, Runtime};

    fn open(dir: &Path) -> SqliteStore {
        SqliteStore::open(&dir.join("hub.db")).expect("open test database")
    }

    fn token(id: &str, uses: Option<u64>) -> TokenRow {
        TokenRow {
            id: id.into(),
            secret_sha256: "s".into(),
            labels: [("site".to_string(), "hq".to_string())].into(),
            expires_at: None,
            uses_left: uses,
            used: 0,
            created_at: 0,
            node_labels: vec!["rack".into()],
        }
    }

    fn new_node(name: &str) -> NewNode {
        NewNode {
            name: name.into(),
            labels: Labels::new(),
            cert_fp: format!("fp-{name}"),
            cert_not_after: 0,
        }
    }

    fn spec(key: &str, hash: &str) -> WorkloadSpec {
        WorkloadSpec {
            key: key.into(),
            kind: Kind::DaemonSet,
            namespace: "default".into(),
            name: key.rsplit('/').next().unwrap_or(key).into(),
            revision: 1,
            hash: hash.into(),
            runtime: Runtime::Process,
            restart_policy: RestartPolicy::Always,
            grace_seconds: 30,
            containers: vec![],
            volumes: vec![],
            min_ready_seconds: 0,
            progress_deadline_seconds: 600,
            host_network: false,
            host_pid: false,
            job: None,
            agent_update: None,
            pipeline: None,
            failover: None,
        }
    }

    fn change(node: &str, upsert: &[(&str, &str)], remove: &[&str]) -> Plan {
        let c = NodeChange {
            upsert: upsert.iter().map(|(k, h)| spec(k, h)).collect(),
            remove: remove.iter().map(|s| s.to_string()).collect(),
            prefetch: None,
        };
        Plan {
            changes: [(node.to_string(), c)].into(),
            ..Default::default()
        }
    }

    fn objects(yaml: &str) -> Vec<Object> {
        let mut objs = outpost_api::parse_file("t.yaml", yaml)
            .expect("valid test manifest")
            .objects;
        for o in &mut objs {
            let ns = o.meta().ns().to_string();
            o.meta_mut().namespace = Some(ns);
        }
        objs
    }

    const CM_AND_BOOM: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ok}\ndata: {a: b}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: boom}\ndata: {a: b}\n";

    #[test]
    fn apply_is_all_or_nothing() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let s = open(dir.path());
        // Make the second insert of the batch fail inside the transaction.
        s.conn()?.execute_batch(
            "CREATE TRIGGER boom BEFORE INSERT ON objects WHEN NEW.name = 'boom'
             BEGIN SELECT RAISE(ABORT, 'boom'); END;",
        )?;
        assert!(s.apply(&objects(CM_AND_BOOM), 1).is_err());
        assert!(
            s.objects()?.is_empty(),
            "the first object of a failed batch must not be stored"
        );
        s.conn()?.execute_batch("DROP TRIGGER boom")?;
        let r = s.apply(&objects(CM_AND_BOOM), 2)?;
        assert_eq!(
            r.iter().map(|r| r.action.as_str()).collect::<Vec<_>>(),
            ["created", "created"]
        );
        let r = s.apply(&objects(CM_AND_BOOM), 3)?;
        assert_eq!(
            r.iter().map(|r| r.action.as_str()).collect::<Vec<_>>(),
            ["unchanged", "unchanged"]
        );
        Ok(())
    }

    #[test]
    fn workload_revision_moves_only_with_the_template() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let s = open(dir.path());
        let dep = |replicas: u32, image: &str| {
            objects(&format!(
                "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\nspec:\n  replicas: {replicas}\n  template:\n    spec:\n      containers: [{{name: c, image: {image}}}]\n"
            ))
        };
        assert_eq!(s.apply(&dep(1, "nginx:1"), 1)?[0].revision, Some(1));
        let r = s.apply(&dep(2, "nginx:1"), 2)?;
        assert_eq!((r[0].action.as_str(), r[0].revision), ("configured", Some(1)));
        let r = s.apply(&dep(2, "nginx:2"), 3)?;
        assert_eq!((r[0].action.as_str(), r[0].revision), ("configured", Some(2)));
        let id = dep(1, "x")[0].id();
        assert_eq!(s.revisions(&id)?.iter().map(|r| r.revision).collect::<Vec<_>>(), [1, 2]);
        let stored = s.object(&id)?.expect("stored");
        assert_eq!((stored.created_at, stored.updated_at), (1, 3));
        Ok(())
    }

    #[test]
    fn generation_never_decreases_across_reopen_and_rejoin() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let first;
        {
            let s = open(dir.path());
            s.create_token(&token("t", None))?;
            s.join("t", "s", &new_node("a"), 0)?;
            s.commit_plan(&change("a", &[("daemonset/default/x", "h1")], &[]))?;
            first = s.node("a")?.expect("joined").generation;
            assert!(first >= 2);
        }
        let s = open(dir.path());
        let bumped = s.commit_plan(&change("a", &[("daemonset/default/x", "h2")], &[]))?;
        assert!(bumped["a"] > first, "{bumped:?} after {first}");
        assert!(s.delete_node("a")?);
        s.join("t", "s", &new_node("a"), 0)?;
        let rejoined = s.node("a")?.expect("rejoined").generation;
        assert!(rejoined > bumped["a"]);
        Ok(())
    }

    #[test]
    fn contacts_are_read_at_once_and_written_with_the_next_status() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        {
            let s = open(dir.path());
            s.create_token(&token("t", None))?;
            s.join("t", "s", &new_node("a"), 0)?;
            assert_eq!(s.touch("a", 5_000)?, Some(0), "previous contact: the join");
            assert_eq!(s.touch("a", 9_000)?, Some(5_000));
            assert_eq!(s.touch("ghost", 9_000)?, None);
            assert_eq!(
                s.node("a")?.expect("a").last_seen,
                Some(9_000),
                "readers see the contact at once"
            );
        }
        // not yet written: a restarted hub has only the join
        let s = open(dir.path());
        assert_eq!(s.node("a")?.expect("a").last_seen, None);
        s.touch("a", 20_000)?;
        let report: StatusReport = serde_json::from_value(serde_json::json!(
            {"agent_version": "t", "uptime_secs": 1, "generation": 0, "full": true}
        ))?;
        s.record_status("a", &report, 15_000)?;
        drop(s);
        let s = open(dir.path());
        assert_eq!(
            s.node("a")?.expect("a").last_seen,
            Some(20_000),
            "written with the status transaction"
        );
        Ok(())
    }

    #[test]
    fn group_commit_isolates_a_failing_report() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let s = open(dir.path());
        s.create_token(&token("t", None))?;
        s.join("t", "s", &new_node("a"), 0)?;
        s.join("t", "s", &new_node("b"), 0)?;
        let ev = |seq| NodeEvent {
            seq,
            at: 1,
            workload: None,
            reason: "x".into(),
            message: "y".into(),
        };
        let report = |events: Vec<NodeEvent>| -> anyhow::Result<StatusReport> {
            let mut r: StatusReport = serde_json::from_value(serde_json::json!(
                {"agent_version": "t", "uptime_secs": 1, "generation": 0, "full": true}
            ))?;
            r.events = events;
            Ok(r)
        };
        let batch = vec![
            ("a".to_string(), report(vec![ev(1), ev(2)])?, 10),
            ("gone".to_string(), report(vec![ev(7)])?, 10),
            ("b".to_string(), report(vec![ev(5)])?, 10),
        ];
        let out = s.record_statuses(&batch)?;
        assert_eq!(out[0], Ok(2));
        assert!(out[1].is_err(), "an unknown node's report is refused alone: {out:?}");
        assert_eq!(out[2], Ok(5));
        drop(s);
        let s = open(dir.path());
        assert_eq!(s.events("a", 10)?.len(), 2, "committed");
        assert_eq!(s.events("b", 10)?.len(), 1, "committed");
        Ok(())
    }

    #[test]
    fn join_checks_token_and_name_and_merges_labels() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let s = open(dir.path());
        s.create_token(&token("t", Some(1)))?;
        // Labels the node may not set refuse the join and use nothing up.
        for (k, v) in [("site", "edge"), ("kubernetes.io/hostname", "other"), ("zone", "z")] {
            let mut n = new_node("a");
            n.labels.insert(k.into(), v.into());
            let refused = s.join("t", "s", &n, 0);
            assert!(matches!(refused, Err(StoreError::Labels(_))), "{k}: {refused:?}");
        }
        assert!(s.node("a")?.is_none());
        let mut n = new_node("a");
        n.labels.insert("rack".into(), "r7".into());
        n.labels.insert("kubernetes.io/os".into(), "linux".into());
        let labels = s.join("t", "s", &n, 0)?;
        assert_eq!(labels["site"], "hq", "the token's label");
        assert_eq!(labels["rack"], "r7", "a key the token allows");
        assert_eq!(labels["kubernetes.io/hostname"], "a", "set by the hub");
        assert_eq!(s.node("a")?.expect("joined").labels, labels);
        let again = s.join("t", "s", &new_node("b"), 0);
        assert!(
            matches!(again, Err(StoreError::Token(TokenProblem::UsedUp { used: 1, .. }))),
            "{again:?}"
        );
        s.create_token(&token("u", None))?;
        assert!(matches!(
            s.join("u", "s", &new_node("a"), 0),
            Err(StoreError::NodeExists(_))
        ));
        assert!(matches!(
            s.join("u", "wrong", &new_node("c"), 0),
            Err(StoreError::Token(TokenProblem::Unknown { .. }))
        ));
        assert_eq!(s.token("u")?.expect("token").used, 0, "refused joins use nothing up");
        Ok(())
    }

    #[test]
    fn renewal_is_two_phase() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let s = open(dir.path());
        s.create_token(&token("t", None))?;
        s.join("t", "s", &new_node("a"), 0)?;
        let owner = |fp: &str| s.node_by_cert(fp).map(|o| o.map(|o| (o.node, o.promoted)));
        assert_eq!(owner("fp-a")?, Some(("a".into(), false)));
        // A renewal whose answer was lost: the old certificate still works, and so would the new.
        s.renew("a", "fp-a2", 100)?;
        assert_eq!(owner("fp-a")?, Some(("a".into(), false)));
        // The node renews again (it never got fp-a2): the newest one replaces it.
        s.renew("a", "fp-a3", 200)?;
        assert_eq!(owner("fp-a2")?, None);
        assert_eq!(s.node("a")?.expect("node").cert_not_after, 0, "not switched yet");
        // First use of the new certificate switches over; the old one stops working.
        assert_eq!(owner("fp-a3")?, Some(("a".into(), true)));
        assert_eq!(owner("fp-a3")?, Some(("a".into(), false)));
        assert_eq!(owner("fp-a")?, None);
        let n = s.node("a")?.expect("node");
        assert_eq!((n.cert_fp.as_str(), n.cert_not_after), ("fp-a3", 200));
        Ok(())
    }

    #[test]
    fn a_version_1_database_is_upgraded() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("hub.db");
        {
            let c = Connection::open(&path)?;
            c.execute_batch(
                "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                 INSERT INTO meta VALUES ('schema_version', '1');
                 CREATE TABLE tokens (id TEXT PRIMARY KEY, secret_sha256 TEXT NOT NULL, labels TEXT NOT NULL,
                    expires_at INTEGER, uses_left INTEGER, used INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL);
                 INSERT INTO tokens VALUES ('t', 's', '{}', NULL, NULL, 0, 0);
                 CREATE TABLE nodes (name TEXT PRIMARY KEY, labels TEXT NOT NULL, cert_fp TEXT NOT NULL UNIQUE,
                    cert_not_after INTEGER NOT NULL, joined_at INTEGER NOT NULL, last_seen INTEGER,
                    generation INTEGER NOT NULL, applied_generation INTEGER NOT NULL DEFAULT 0,
                    tombstone_floor INTEGER NOT NULL DEFAULT 0, agent_version TEXT, uptime_secs INTEGER, token_id TEXT);
                 INSERT INTO nodes (name, labels, cert_fp, cert_not_after, joined_at, generation)
                    VALUES ('impostor', '{\"kubernetes.io/hostname\":\"victim\",\"site\":\"s\"}', 'fp', 0, 0, 1);",
            )?;
        }
        let s = SqliteStore::open(&path)?;
        let n = s.node("impostor")?.expect("kept");
        assert_eq!(n.labels["kubernetes.io/hostname"], "impostor");
        assert_eq!(n.labels["site"], "s");
        assert_eq!(s.token("t")?.expect("kept").node_labels, Vec::<String>::new());
        s.renew("impostor", "fp2", 5)?;
        assert!(s.node_by_cert("fp2")?.is_some());
        drop(s);
        // Opening again changes nothing.
        let s = SqliteStore::open(&path)?;
        assert_eq!(s.node("impostor")?.expect("kept").cert_fp, "fp2");
        Ok(())
    }

    /// token, secret, now, expected
    type Case = (Option<TokenRow>, &'static str, i64, Result<(), TokenProblem>);

    #[test]
    fn token_check_table() {
        let t = |expires_at, uses_left, used| TokenRow {
            expires_at,
            uses_left,
            used,
            ..token("t", None)
        };
        let cases: &[Case] = &[
            (Some(t(None, None, 5)), "s", 0, Ok(())),
            (None, "s", 0, Err(TokenProblem::Unknown { id: "t".into() })),
            (
                Some(t(None, None, 0)),
                "x",
                0,
                Err(TokenProblem::Unknown { id: "t".into() }),
            ),
            (Some(t(Some(100), None, 0)), "s", 99, Ok(())),
            (
                Some(t(Some(100), None, 0)),
                "s",
                150,
                Err(TokenProblem::Expired {
                    id: "t".into(),
                    ago_ms: 50,
                }),
            ),
            (
                Some(t(None, Some(0), 3)),
                "s",
                0,
                Err(TokenProblem::UsedUp {
                    id: "t".into(),
                    used: 3,
                }),
            ),
        ];
        for (i, (tok, secret, now, want)) in cases.iter().enumerate() {
            assert_eq!(&check_token(tok.as_ref(), "t", secret, *now), want, "case {i}");
        }
    }

    #[test]
    fn tombstones_give_deltas_until_pruned() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let s = open(dir.path());
        s.create_token(&token("t", None))?;
        s.join("t", "s", &new_node("a"), 0)?;
        let g1 = s.commit_plan(&change("a", &[("k/a", "1"), ("k/b", "1")], &[]))?["a"];
        let g2 = s.commit_plan(&change("a", &[], &["k/a"]))?["a"];
        assert!(g2 > g1);

        let d = s.sync("a", g1)?.expect("node exists");
        assert_eq!(
            (d.generation, d.full, d.upsert.len(), d.remove.clone()),
            (g2, false, 0, vec!["k/a".to_string()])
        );
        let full = s.sync("a", 0)?.expect("node exists");
        assert!(full.full);
        assert_eq!(full.upsert.iter().map(|w| w.key.as_str()).collect::<Vec<_>>(), ["k/b"]);
        assert!(s.sync("a", g2)?.expect("node exists").upsert.is_empty());
        assert!(
            s.sync("a", g2 + 10)?.expect("node exists").full,
            "an agent ahead of the hub gets everything"
        );

        // Re-adding a removed key drops its tombstone: the delta holds only the upsert.
        let g3 = s.commit_plan(&change("a", &[("k/a", "2")], &[]))?["a"];
        let d = s.sync("a", g1)?.expect("node exists");
        assert_eq!((d.full, d.remove.len(), d.upsert.len()), (false, 0, 1));

        // Once the agent reports g3 applied, tombstones up to it are pruned and older deltas go full.
        let g4 = s.commit_plan(&change("a", &[], &["k/b"]))?["a"];
        let report = StatusReport {
            agent_version: "t".into(),
            uptime_secs: 1,
            generation: g3,
            full: true,
            workloads: vec![],
            removed: vec![],
            events: vec![],
        };
        s.record_status("a", &report, 5)?;
        assert!(s.sync("a", g1)?.expect("node exists").full);
        let d = s.sync("a", g3)?.expect("node exists");
        assert_eq!(
            (d.generation, d.full, d.remove.clone()),
            (g4, false, vec!["k/b".to_string()])
        );
        Ok(())
    }

    #[test]
    fn events_are_stored_once_and_acked_by_highest_seq() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let s = open(dir.path());
        s.create_token(&token("t", None))?;
        s.join("t", "s", &new_node("a"), 0)?;
        let ev = |seq| NodeEvent {
            seq,
            at: 10,
            workload: None,
            reason: "Started".into(),
            message: format!("m{seq}"),
        };
        let mut report = StatusReport {
            agent_version: "t".into(),
            uptime_secs: 1,
            generation: 0,
            full: true,
            workloads: vec![],
            removed: vec![],
            events: vec![ev(1), ev(2)],
        };
        assert_eq!(s.record_status("a", &report, 1)?, 2);
        report.events = vec![ev(2), ev(3)];
        assert_eq!(s.record_status("a", &report, 2)?, 3);
        assert_eq!(s.events("a", 50)?.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(s.events("a", 2)?.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3]);
        Ok(())
    }
}
