//! [`Store`] on SQLite: a synchronous core ([`SqliteCore`], one connection behind a mutex) and
//! its async face ([`SqliteStore`]) that runs each call on the blocking pool.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use outpost_api::{
    ApplyResult, ImageTag, Labels, NodeEvent, Object, ObjectId, StatusReport, SyncResponse, UnixMs, WorkloadSpec,
    WorkloadStatus,
};
use outpost_core::waves::Rollout;
use rusqlite::{params, Connection, OptionalExtension, Transaction};

use super::*;

/// [`Store`] on one SQLite file (WAL, synchronous=FULL): the synchronous [`SqliteCore`], each
/// call run on the blocking pool.
#[derive(Clone)]
pub struct SqliteStore {
    core: Arc<SqliteCore>,
}

/// The synchronous SQLite store: one connection behind a mutex. Its methods are short and
/// block; async code goes through [`SqliteStore`].
pub struct SqliteCore {
    conn: Mutex<Connection>,
    contacts: Contacts,
}

/// Statements through the connection's statement cache: the hot paths (reports, contacts,
/// syncs, joins) ran the same few dozen statements thousands of times a second, each parsed
/// and planned again (a tenth of the hub's CPU during a join wave of 4,000 agents).
trait Cached {
    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;
    fn row<T, P: rusqlite::Params, F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>>(
        &self,
        sql: &str,
        params: P,
        f: F,
    ) -> rusqlite::Result<T>;
}

impl Cached for Connection {
    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }
    fn row<T, P: rusqlite::Params, F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>>(
        &self,
        sql: &str,
        params: P,
        f: F,
    ) -> rusqlite::Result<T> {
        self.prepare_cached(sql)?.query_row(params, f)
    }
}

/// Distinct statements kept prepared (rusqlite's default is 16; the store has ~100).
const STATEMENT_CACHE: usize = 256;

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
    changed_gen INTEGER NOT NULL, revision INTEGER NOT NULL DEFAULT 0, spec_addr TEXT, PRIMARY KEY (node, key));
CREATE TABLE IF NOT EXISTS specs (addr TEXT PRIMARY KEY, spec TEXT NOT NULL) WITHOUT ROWID;
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
    let generation: i64 = tx.row("SELECT generation FROM nodes WHERE name = ?1", params![node], |r| {
        r.get(0)
    })?;
    // An agent cannot have applied more than we sent; clamp so pruning stays safe.
    let applied = i(report.generation).min(generation);
    tx.exec(
        "UPDATE nodes SET last_seen = MAX(COALESCE(last_seen, 0), ?2), agent_version = ?3, uptime_secs = ?4,
                    applied_generation = ?5 WHERE name = ?1",
        params![node, now, report.agent_version, i(report.uptime_secs), applied],
    )?;
    // Tombstones the agent has applied are no longer needed; remember the floor.
    tx.exec(
        "DELETE FROM node_tombstones WHERE node = ?1 AND gen <= ?2",
        params![node, applied],
    )?;
    tx.exec(
        "UPDATE nodes SET tombstone_floor = MAX(tombstone_floor, ?2) WHERE name = ?1",
        params![node, applied],
    )?;
    if report.full {
        let listed: BTreeSet<&str> = report.workloads.iter().map(|w| w.key.as_str()).collect();
        let keys: Vec<String> = {
            let mut st = tx.prepare_cached("SELECT key FROM workload_status WHERE node = ?1")?;
            let rows = st.query_map(params![node], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        for k in keys.iter().filter(|k| !listed.contains(k.as_str())) {
            tx.exec(
                "DELETE FROM workload_status WHERE node = ?1 AND key = ?2",
                params![node, k],
            )?;
        }
    }
    for w in &report.workloads {
        tx.exec(
            "INSERT INTO workload_status (node, key, status, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(node, key) DO UPDATE SET status = excluded.status, updated_at = excluded.updated_at",
            params![node, w.key, serde_json::to_string(w)?, now],
        )?;
    }
    for k in &report.removed {
        tx.exec(
            "DELETE FROM workload_status WHERE node = ?1 AND key = ?2",
            params![node, k],
        )?;
    }
    for e in &report.events {
        tx.exec(
            "INSERT OR IGNORE INTO events (node, seq, at, workload, reason, message, received_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![node, i(e.seq), e.at, e.workload, e.reason, e.message, now],
        )?;
    }
    let acked: Option<i64> = tx.row("SELECT MAX(seq) FROM events WHERE node = ?1", params![node], |r| {
        r.get(0)
    })?;
    let acked = acked.unwrap_or(0);
    if !report.events.is_empty() {
        tx.exec(
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

const NODE_COLS: &str = "name, labels, cert_fp, cert_not_after, joined_at, last_seen, generation, \
     applied_generation, agent_version, uptime_secs";

impl SqliteCore {
    /// Write the contacts held in memory, inside the caller's transaction.
    fn flush_seen(&self, tx: &Connection) -> Result<()> {
        for (n, t) in &self.contacts.drain() {
            tx.exec(
                "UPDATE nodes SET last_seen = MAX(COALESCE(last_seen, 0), ?2) WHERE name = ?1",
                params![n, t],
            )?;
        }
        Ok(())
    }

    fn with_seen(&self, n: NodeRow) -> NodeRow {
        self.contacts.overlay(n)
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
        .row("SELECT value FROM meta WHERE key = 'gen_seq'", [], |r| r.get(0))
        .optional()?;
    let next = cur.and_then(|s| s.parse::<u64>().ok()).unwrap_or(0) + 1;
    tx.exec(
        "INSERT INTO meta (key, value) VALUES ('gen_seq', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![next.to_string()],
    )?;
    Ok(next)
}

fn object_row(tx: &Transaction<'_>, id: &ObjectId) -> Result<Option<StoredObject>> {
    let row = tx
        .row(
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
        .prepare_cached(&format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"))?
        .exists(params![column])?;
    if !exists {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
    }
    Ok(())
}

/// One versioned schema step: the version it brings a database to and what it does, inside
/// the migration transaction. [`SCHEMA`] creates the current tables first (`IF NOT EXISTS`), so
/// on a new database every step finds its work done and changes nothing.
type SqliteStep = (i64, fn(&Connection) -> Result<()>);

/// The SQLite migrations, in order; the last one's version is [`SCHEMA_VERSION`].
const SQLITE_MIGRATIONS: &[SqliteStep] = &[
    (2, sqlite_v2),
    (3, sqlite_v3),
    (4, sqlite_v4),
    (5, sqlite_v5),
    (6, sqlite_v6),
    (7, sqlite_v6),
    (8, sqlite_v8),
];

/// 8: desired specs stored once each (`specs`, from [`SCHEMA`]; `node_workloads.spec_addr`
/// refers to one, and rows written before keep their spec inline). Certificates retired across
/// replicas are a PostgreSQL table only.
fn sqlite_v8(tx: &Connection) -> Result<()> {
    add_column(tx, "node_workloads", "spec_addr", "TEXT")
}

/// 6: relays across replicas, a PostgreSQL table only; 7 (exec sessions across replicas) is the
/// same no-op (one hub process uses an SQLite file, and keeps its relays in memory).
fn sqlite_v6(_tx: &Connection) -> Result<()> {
    Ok(())
}

/// 2: token `node_labels`, two-phase renewal, `kubernetes.io/hostname` owned by the hub.
fn sqlite_v2(tx: &Connection) -> Result<()> {
    add_column(tx, "tokens", "node_labels", "TEXT NOT NULL DEFAULT '[]'")?;
    add_column(tx, "nodes", "next_cert_fp", "TEXT")?;
    add_column(tx, "nodes", "next_cert_not_after", "INTEGER")?;
    // The hub owns kubernetes.io/hostname: undo any a node set for itself.
    tx.exec(
        "UPDATE nodes SET labels = json_set(labels, '$.\"kubernetes.io/hostname\"', name)",
        [],
    )?;
    Ok(())
}

/// 3: fleet rollouts (`node_workloads.revision`; the new tables come from [`SCHEMA`]).
fn sqlite_v3(tx: &Connection) -> Result<()> {
    add_column(tx, "node_workloads", "revision", "INTEGER NOT NULL DEFAULT 0")?;
    tx.exec(
        "UPDATE node_workloads SET revision = COALESCE(json_extract(spec, '$.revision'), 0) WHERE revision = 0",
        [],
    )?;
    Ok(())
}

/// 4: the monitoring tables and `leases` (`crate::monitor::SCHEMA`; the monitor also creates
/// them when it opens the file).
fn sqlite_v4(tx: &Connection) -> Result<()> {
    tx.execute_batch(crate::monitor::SCHEMA)?;
    Ok(())
}

/// 5: nothing on SQLite (the version moved the accounts, records, blobs and CA into
/// PostgreSQL; here they stay in their modules' tables and the data dir).
fn sqlite_v5(_tx: &Connection) -> Result<()> {
    Ok(())
}

/// Bring a database from `from` to [`SCHEMA_VERSION`], in one transaction.
fn migrate(conn: &mut Connection, from: i64) -> Result<()> {
    let tx = conn.transaction()?;
    for (version, step) in SQLITE_MIGRATIONS {
        if *version > from {
            step(&tx)?;
        }
    }
    tx.execute_batch("CREATE INDEX IF NOT EXISTS nodes_next_cert ON nodes (next_cert_fp)")?;
    tx.exec(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?1)",
        params![SCHEMA_VERSION.to_string()],
    )?;
    tx.commit()?;
    Ok(())
}

impl SqliteCore {
    /// Open (or create) the database file and its schema.
    pub fn open(path: &Path) -> Result<Self> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        // Two connections share this file (store and monitoring): a deferred transaction that
        // reads, then writes after the other committed, fails at once with SQLITE_BUSY whatever
        // the busy timeout. Write transactions take the lock when they begin instead.
        conn.set_transaction_behavior(rusqlite::TransactionBehavior::Immediate);
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        let found: Option<String> = conn
            .row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| r.get(0))
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
            contacts: Contacts::default(),
        })
    }

    pub(crate) fn conn(&self) -> Result<MutexGuard<'_, Connection>> {
        self.conn.lock().map_err(|_| StoreError::Poisoned)
    }
}

impl SqliteCore {
    pub fn create_token(&self, t: &TokenRow) -> Result<()> {
        self.conn()?.exec(
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

    pub fn token(&self, id: &str) -> Result<Option<TokenRow>> {
        let conn = self.conn()?;
        token_row(&conn, id)
    }

    pub fn join(&self, token_id: &str, secret_sha256: &str, node: &NewNode, now: UnixMs) -> Result<Labels> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let tok = token_row(&tx, token_id)?;
        check_token(tok.as_ref(), token_id, secret_sha256, now).map_err(StoreError::Token)?;
        let tok = tok.ok_or_else(|| StoreError::Token(TokenProblem::Unknown { id: token_id.into() }))?;
        let exists: Option<String> = tx
            .row("SELECT name FROM nodes WHERE name = ?1", params![node.name], |r| {
                r.get(0)
            })
            .optional()?;
        if exists.is_some() {
            return Err(StoreError::NodeExists(node.name.clone()));
        }
        let labels = outpost_core::link::node_labels(&node.name, &tok.labels, &tok.node_labels, &node.labels)?;
        let gen = next_gen(&tx)?;
        tx.exec(
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
        tx.exec(
            "UPDATE tokens SET used = used + 1,
                    uses_left = CASE WHEN uses_left IS NULL THEN NULL ELSE uses_left - 1 END
             WHERE id = ?1",
            params![token_id],
        )?;
        tx.commit()?;
        Ok(labels)
    }

    pub fn node_by_cert(&self, cert_fp: &str) -> Result<Option<CertOwner>> {
        let conn = self.conn()?;
        // One indexed read per request, as before renewal was two-phase; the write happens
        // once, on the first request made with a renewed certificate.
        let found: Option<(String, bool)> = conn
            .row(
                "SELECT name, cert_fp = ?1 FROM nodes WHERE cert_fp = ?1 OR next_cert_fp = ?1",
                params![cert_fp],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((node, current)) = found else { return Ok(None) };
        if !current {
            conn.exec(
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

    pub fn node(&self, name: &str) -> Result<Option<NodeRow>> {
        let conn = self.conn()?;
        let row = conn
            .row(
                &format!("SELECT {NODE_COLS} FROM nodes WHERE name = ?1"),
                params![name],
                node_from_row,
            )
            .optional()?;
        row.map(finish_node).transpose().map(|n| n.map(|n| self.with_seen(n)))
    }

    pub fn nodes(&self) -> Result<Vec<NodeRow>> {
        let conn = self.conn()?;
        let mut st = conn.prepare_cached(&format!("SELECT {NODE_COLS} FROM nodes ORDER BY name"))?;
        let rows = st.query_map([], node_from_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|r| finish_node(r).map(|n| self.with_seen(n)))
            .collect()
    }

    pub fn hold(&self, node: &str, open: bool) {
        self.contacts.hold(node, open)
    }

    pub fn touch(&self, node: &str, now: UnixMs) -> Result<Option<UnixMs>> {
        let conn = self.conn()?;
        let prev: Option<(Option<i64>, i64)> = conn
            .row(
                "SELECT last_seen, joined_at FROM nodes WHERE name = ?1",
                params![node],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((seen, joined)) = prev else { return Ok(None) };
        Ok(Some(self.contacts.touch(node, seen.unwrap_or(joined), now)))
    }

    pub fn renew(&self, node: &str, cert_fp: &str, cert_not_after: UnixMs) -> Result<()> {
        self.conn()?.exec(
            "UPDATE nodes SET next_cert_fp = ?2, next_cert_not_after = ?3 WHERE name = ?1",
            params![node, cert_fp, cert_not_after],
        )?;
        Ok(())
    }

    pub fn delete_node(&self, name: &str) -> Result<bool> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let n = tx.exec("DELETE FROM nodes WHERE name = ?1", params![name])?;
        for table in NODE_TABLES {
            tx.exec(&format!("DELETE FROM {table} WHERE node = ?1"), params![name])?;
        }
        tx.commit()?;
        Ok(n > 0)
    }

    pub fn sync(&self, node: &str, since: u64) -> Result<Option<SyncResponse>> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        sync_in(&tx, node, since)
    }

    /// [`Store::sync_group`]: every read under one hold of the connection, in one transaction.
    pub fn sync_group(&self, reads: &[(String, u64)]) -> Result<Vec<Option<SyncRead>>> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        reads
            .iter()
            .map(|(node, since)| {
                let Some(sync) = sync_in(&tx, node, *since)? else {
                    return Ok(None);
                };
                let labels: String = tx.row("SELECT labels FROM nodes WHERE name = ?1", params![node], |r| r.get(0))?;
                let prefetch = if sync.generation != *since {
                    prefetch_in(&tx, node)?
                } else {
                    Vec::new()
                };
                Ok(Some(SyncRead {
                    sync,
                    labels: serde_json::from_str(&labels)?,
                    prefetch,
                }))
            })
            .collect()
    }

    pub fn record_status(&self, node: &str, report: &StatusReport, now: UnixMs) -> Result<u64> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        self.flush_seen(&tx)?;
        let acked = record_status_in(&tx, node, report, now)?;
        tx.commit()?;
        Ok(acked)
    }

    pub fn record_statuses(&self, batch: &[(String, StatusReport, UnixMs)]) -> Result<Vec<Result<u64, String>>> {
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

    pub fn statuses(&self, node: Option<&str>) -> Result<Vec<(String, WorkloadStatus)>> {
        let conn = self.conn()?;
        let mut st = conn.prepare_cached(
            "SELECT node, status FROM workload_status WHERE ?1 IS NULL OR node = ?1 ORDER BY node, key",
        )?;
        let rows = st
            .query_map(params![node], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(n, s)| Ok((n, serde_json::from_str(&s)?)))
            .collect()
    }

    pub fn events(&self, node: &str, limit: u32) -> Result<Vec<NodeEvent>> {
        let conn = self.conn()?;
        let mut st = conn.prepare_cached(
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

    pub fn apply(&self, objects: &[Object], now: UnixMs) -> Result<Vec<ApplyResult>> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let mut results = Vec::with_capacity(objects.len());
        for obj in objects {
            let id = obj.id();
            let manifest = serde_json::to_string(obj)?;
            let thash = outpost_core::render::template_hash(obj);
            let prev = object_row(&tx, &id)?;
            let (action, revision, created_at) = apply_action(prev.as_ref(), obj, &thash, now);
            if action != "unchanged" {
                tx.exec(
                    "INSERT INTO objects (kind, namespace, name, manifest, template_hash, revision, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT(kind, namespace, name) DO UPDATE SET manifest = excluded.manifest,
                        template_hash = excluded.template_hash, revision = excluded.revision,
                        updated_at = excluded.updated_at",
                    params![id.kind.as_str(), id.namespace, id.name, manifest, thash, i(revision), created_at, now],
                )?;
                if let (Some(h), Some(t)) = (&thash, revision_content(obj)?) {
                    tx.exec(
                        "INSERT OR IGNORE INTO revisions (kind, namespace, name, revision, template_hash, template, created_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                        params![id.kind.as_str(), id.namespace, id.name, i(revision), h, t, now],
                    )?;
                }
            }
            results.push(apply_result(&id, action, revision));
        }
        tx.commit()?;
        Ok(results)
    }

    pub fn objects(&self) -> Result<Vec<StoredObject>> {
        let conn = self.conn()?;
        let mut st = conn.prepare_cached(
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

    pub fn object(&self, id: &ObjectId) -> Result<Option<StoredObject>> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        object_row(&tx, id)
    }

    pub fn delete_objects(&self, ids: &[ObjectId]) -> Result<(Vec<ObjectId>, Vec<ObjectId>)> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let (mut deleted, mut missing) = (Vec::new(), Vec::new());
        for id in ids {
            let p = params![id.kind.as_str(), id.namespace, id.name];
            let n = tx.exec(
                "DELETE FROM objects WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
                p,
            )?;
            tx.exec(
                "DELETE FROM assignments WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
                p,
            )?;
            tx.exec(
                "DELETE FROM revisions WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
                p,
            )?;
            if id.kind.is_workload() || id.kind.is_rolled_out() {
                tx.exec(
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

    pub fn put_image_tag(&self, t: &ImageTag) -> Result<()> {
        self.conn()?.exec(
            "INSERT OR REPLACE INTO image_tags (name, digest, size, pushed_at) VALUES (?1, ?2, ?3, ?4)",
            params![t.name, t.digest, t.size as i64, t.pushed_at],
        )?;
        Ok(())
    }

    pub fn image_tag(&self, name: &str) -> Result<Option<ImageTag>> {
        Ok(self
            .conn()?
            .row(
                "SELECT name, digest, size, pushed_at FROM image_tags WHERE name = ?1",
                params![name],
                image_row,
            )
            .optional()?)
    }

    pub fn image_tags(&self) -> Result<Vec<ImageTag>> {
        let conn = self.conn()?;
        let mut st = conn.prepare_cached("SELECT name, digest, size, pushed_at FROM image_tags ORDER BY name")?;
        let rows = st.query_map([], image_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    pub fn revisions(&self, id: &ObjectId) -> Result<Vec<RevisionRow>> {
        let conn = self.conn()?;
        let mut st = conn.prepare_cached(
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

    pub fn schedule_inputs(&self) -> Result<ScheduleInputs> {
        self.schedule_inputs_of(None)
    }

    /// The scheduler's inputs; with `only`, only that node's rows.
    pub fn schedule_inputs_of(&self, only: Option<&[String]>) -> Result<ScheduleInputs> {
        let mut nodes = match only {
            None => self.nodes()?,
            Some(names) => names
                .iter()
                .map(|n| self.node(n))
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .flatten()
                .collect(),
        };
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        nodes.dedup_by(|a, b| a.name == b.name);
        // The per-node reads below: every node's rows (None), or each listed node's.
        let targets: Vec<Option<&str>> = match only {
            None => vec![None],
            Some(names) => names.iter().map(|n| Some(n.as_str())).collect(),
        };
        let objects = self.objects()?;
        let conn = self.conn()?;
        let mut assignments: BTreeMap<ObjectId, BTreeSet<String>> = BTreeMap::new();
        {
            let mut st = conn.prepare_cached("SELECT kind, namespace, name, node FROM assignments")?;
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
            let mut st = conn
                .prepare_cached("SELECT node, key, hash, revision FROM node_workloads WHERE ?1 IS NULL OR node = ?1")?;
            for only in &targets {
                let rows = st
                    .query_map(params![only], |r| {
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
        }
        let mut held_prefetch: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        {
            let mut st =
                conn.prepare_cached("SELECT node, key, hash FROM node_prefetch WHERE ?1 IS NULL OR node = ?1")?;
            for only in &targets {
                let rows = st
                    .query_map(params![only], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                for (node, key, hash) in rows {
                    held_prefetch.entry(node).or_default().insert(key, hash);
                }
            }
        }
        let rollouts: BTreeMap<String, Rollout> = rollout_rows(&conn)?
            .into_iter()
            .map(|r| (r.workload.clone(), r))
            .collect();
        let wanted = wanted_templates(&objects, &held_revisions, &rollouts);
        let mut templates = BTreeMap::new();
        {
            let mut st = conn.prepare_cached(
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

    pub fn commit_plan(&self, plan: &Plan) -> Result<BTreeMap<String, u64>> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        // Placements: write only the rows that differ from the stored ones.
        let stored: BTreeSet<(String, String, String, String)> = {
            let mut st = tx.prepare_cached("SELECT kind, namespace, name, node FROM assignments")?;
            let rows = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect::<rusqlite::Result<_>>()?;
            rows
        };
        let planned = super::assignment_rows(&plan.assignments);
        for (k, ns, name, node) in stored.difference(&planned) {
            tx.exec(
                "DELETE FROM assignments WHERE kind = ?1 AND namespace = ?2 AND name = ?3 AND node = ?4",
                params![k, ns, name, node],
            )?;
        }
        for (k, ns, name, node) in planned.difference(&stored) {
            tx.exec(
                "INSERT INTO assignments (kind, namespace, name, node) VALUES (?1, ?2, ?3, ?4)",
                params![k, ns, name, node],
            )?;
        }
        let mut bumped = BTreeMap::new();
        let mut texts = super::SpecTexts::default();
        for (node, change) in &plan.changes {
            if change.upsert.is_empty() && change.remove.is_empty() && change.prefetch.is_none() {
                continue;
            }
            let gen = next_gen(&tx)?;
            if let Some(hints) = &change.prefetch {
                tx.exec("DELETE FROM node_prefetch WHERE node = ?1", params![node])?;
                for spec in hints {
                    tx.exec(
                        "INSERT INTO node_prefetch (node, key, spec, hash) VALUES (?1, ?2, ?3, ?4)",
                        params![node, spec.key, serde_json::to_string(spec)?, spec.hash],
                    )?;
                }
            }
            for spec in &change.upsert {
                let known = texts.texts.len();
                let addr = texts.address(spec)?;
                if texts.texts.len() > known {
                    tx.exec(
                        "INSERT INTO specs (addr, spec) VALUES (?1, ?2) ON CONFLICT(addr) DO NOTHING",
                        params![addr, texts.texts[known].1],
                    )?;
                }
                tx.exec(
                    "INSERT INTO node_workloads (node, key, spec, hash, changed_gen, revision, spec_addr) VALUES (?1, ?2, '', ?3, ?4, ?5, ?6)
                     ON CONFLICT(node, key) DO UPDATE SET spec = excluded.spec, hash = excluded.hash,
                        changed_gen = excluded.changed_gen, revision = excluded.revision, spec_addr = excluded.spec_addr",
                    params![node, spec.key, outpost_core::site_ha::delivery_hash(spec), i(gen), i(spec.revision), addr],
                )?;
                tx.exec(
                    "DELETE FROM node_tombstones WHERE node = ?1 AND key = ?2",
                    params![node, spec.key],
                )?;
            }
            for key in &change.remove {
                tx.exec(
                    "DELETE FROM node_workloads WHERE node = ?1 AND key = ?2",
                    params![node, key],
                )?;
                tx.exec(
                    "INSERT INTO node_tombstones (node, key, gen) VALUES (?1, ?2, ?3)
                     ON CONFLICT(node, key) DO UPDATE SET gen = excluded.gen",
                    params![node, key, i(gen)],
                )?;
            }
            tx.exec(
                "UPDATE nodes SET generation = ?2 WHERE name = ?1",
                params![node, i(gen)],
            )?;
            bumped.insert(node.clone(), gen);
        }
        tx.commit()?;
        Ok(bumped)
    }

    pub fn desired(&self) -> Result<Vec<DesiredRow>> {
        let conn = self.conn()?;
        let mut st = conn.prepare_cached("SELECT node, key, hash, revision FROM node_workloads ORDER BY key, node")?;
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

    pub fn prefetch(&self, node: &str) -> Result<Vec<WorkloadSpec>> {
        let conn = self.conn()?;
        prefetch_in(&conn, node)
    }

    pub fn rollout(&self, workload: &str) -> Result<Option<Rollout>> {
        let conn = self.conn()?;
        let s: Option<String> = conn
            .row(
                "SELECT state FROM rollouts WHERE workload = ?1",
                params![workload],
                |r| r.get(0),
            )
            .optional()?;
        s.map(|s| Ok(serde_json::from_str(&s)?)).transpose()
    }

    pub fn rollouts(&self) -> Result<Vec<Rollout>> {
        rollout_rows(&*self.conn()?)
    }

    pub fn gitops_states(&self) -> Result<Vec<(String, String)>> {
        let conn = self.conn()?;
        let mut st = conn.prepare_cached("SELECT repo, state FROM gitops_state ORDER BY repo")?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    pub fn put_gitops_state(&self, repo: &str, state: Option<&str>, now: UnixMs) -> Result<()> {
        let conn = self.conn()?;
        match state {
            Some(s) => conn.exec(
                "INSERT INTO gitops_state (repo, state, updated_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (repo) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
                params![repo, s, now],
            )?,
            None => conn.exec("DELETE FROM gitops_state WHERE repo = ?1", params![repo])?,
        };
        Ok(())
    }

    pub fn put_rollout(&self, r: &Rollout) -> Result<()> {
        self.conn()?.exec(
            "INSERT INTO rollouts (workload, revision, state, updated_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(workload) DO UPDATE SET revision = excluded.revision, state = excluded.state,
                updated_at = excluded.updated_at",
            params![r.workload, i(r.revision), serde_json::to_string(r)?, r.updated_at],
        )?;
        Ok(())
    }
}

fn rollout_rows(conn: &Connection) -> Result<Vec<Rollout>> {
    let mut st = conn.prepare_cached("SELECT state FROM rollouts ORDER BY workload")?;
    let rows = st
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.iter().map(|s| Ok(serde_json::from_str(s)?)).collect()
}

fn token_row(conn: &Connection, id: &str) -> Result<Option<TokenRow>> {
    let row = conn
        .row(
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

/// Run a [`SqliteCore`] call on the blocking pool.
/// One node's sync answer, read inside the caller's transaction.
fn sync_in(tx: &Connection, node: &str, since: u64) -> Result<Option<SyncResponse>> {
    let Some((generation, floor)) = tx
        .row(
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
        let mut st = tx.prepare_cached(
            "SELECT COALESCE(s.spec, w.spec) FROM node_workloads w LEFT JOIN specs s ON s.addr = w.spec_addr
                 WHERE w.node = ?1 AND w.changed_gen > ?2 ORDER BY w.key",
        )?;
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
        let mut st = tx.prepare_cached("SELECT key FROM node_tombstones WHERE node = ?1 AND gen > ?2 ORDER BY key")?;
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

/// The prefetch hints `node` holds.
fn prefetch_in(conn: &Connection, node: &str) -> Result<Vec<WorkloadSpec>> {
    let mut st = conn.prepare_cached("SELECT spec FROM node_prefetch WHERE node = ?1 ORDER BY key")?;
    let rows = st
        .query_map(params![node], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.iter().map(|s| Ok(serde_json::from_str(s)?)).collect()
}

macro_rules! blocking {
    ($self:ident, $c:ident => $body:expr) => {{
        let $c = $self.core.clone();
        tokio::task::spawn_blocking(move || $body)
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }};
}

impl SqliteStore {
    /// Open (or create) the database file and its schema (blocking: call it from the blocking
    /// pool or before the runtime's tasks depend on it).
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self {
            core: Arc::new(SqliteCore::open(path)?),
        })
    }

    /// The synchronous core, for blocking code and tests.
    pub fn core(&self) -> &SqliteCore {
        &self.core
    }
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn create_token(&self, t: &TokenRow) -> Result<()> {
        let t = t.clone();
        blocking!(self, c => c.create_token(&t))
    }
    async fn token(&self, id: &str) -> Result<Option<TokenRow>> {
        let id = id.to_string();
        blocking!(self, c => c.token(&id))
    }
    async fn join(&self, token_id: &str, secret_sha256: &str, node: &NewNode, now: UnixMs) -> Result<Labels> {
        let (t, s, n) = (token_id.to_string(), secret_sha256.to_string(), node.clone());
        blocking!(self, c => c.join(&t, &s, &n, now))
    }
    async fn node_by_cert(&self, cert_fp: &str) -> Result<Option<CertOwner>> {
        let fp = cert_fp.to_string();
        blocking!(self, c => c.node_by_cert(&fp))
    }
    async fn node(&self, name: &str) -> Result<Option<NodeRow>> {
        let n = name.to_string();
        blocking!(self, c => c.node(&n))
    }
    async fn nodes(&self) -> Result<Vec<NodeRow>> {
        blocking!(self, c => c.nodes())
    }
    async fn touch(&self, node: &str, now: UnixMs) -> Result<Option<UnixMs>> {
        let n = node.to_string();
        blocking!(self, c => c.touch(&n, now))
    }
    fn hold(&self, node: &str, open: bool) {
        self.core.hold(node, open)
    }
    async fn renew(&self, node: &str, cert_fp: &str, cert_not_after: UnixMs) -> Result<()> {
        let (n, fp) = (node.to_string(), cert_fp.to_string());
        blocking!(self, c => c.renew(&n, &fp, cert_not_after))
    }
    async fn delete_node(&self, name: &str) -> Result<bool> {
        let n = name.to_string();
        blocking!(self, c => c.delete_node(&n))
    }
    async fn sync(&self, node: &str, since: u64) -> Result<Option<SyncResponse>> {
        let n = node.to_string();
        blocking!(self, c => c.sync(&n, since))
    }
    async fn sync_group(&self, reads: &[(String, u64)]) -> Result<Vec<Option<SyncRead>>> {
        let r = reads.to_vec();
        blocking!(self, c => c.sync_group(&r))
    }
    async fn record_status(&self, node: &str, report: &StatusReport, now: UnixMs) -> Result<u64> {
        let (n, r) = (node.to_string(), report.clone());
        blocking!(self, c => c.record_status(&n, &r, now))
    }
    async fn record_statuses(&self, batch: &[(String, StatusReport, UnixMs)]) -> Result<Vec<Result<u64, String>>> {
        let b = batch.to_vec();
        blocking!(self, c => c.record_statuses(&b))
    }
    async fn statuses(&self, node: Option<&str>) -> Result<Vec<(String, WorkloadStatus)>> {
        let n = node.map(str::to_string);
        blocking!(self, c => c.statuses(n.as_deref()))
    }
    async fn events(&self, node: &str, limit: u32) -> Result<Vec<NodeEvent>> {
        let n = node.to_string();
        blocking!(self, c => c.events(&n, limit))
    }
    async fn apply(&self, objects: &[Object], now: UnixMs) -> Result<Vec<ApplyResult>> {
        let o = objects.to_vec();
        blocking!(self, c => c.apply(&o, now))
    }
    async fn objects(&self) -> Result<Vec<StoredObject>> {
        blocking!(self, c => c.objects())
    }
    async fn object(&self, id: &ObjectId) -> Result<Option<StoredObject>> {
        let id = id.clone();
        blocking!(self, c => c.object(&id))
    }
    async fn delete_objects(&self, ids: &[ObjectId]) -> Result<(Vec<ObjectId>, Vec<ObjectId>)> {
        let ids = ids.to_vec();
        blocking!(self, c => c.delete_objects(&ids))
    }
    async fn put_image_tag(&self, t: &ImageTag) -> Result<()> {
        let t = t.clone();
        blocking!(self, c => c.put_image_tag(&t))
    }
    async fn image_tag(&self, name: &str) -> Result<Option<ImageTag>> {
        let n = name.to_string();
        blocking!(self, c => c.image_tag(&n))
    }
    async fn image_tags(&self) -> Result<Vec<ImageTag>> {
        blocking!(self, c => c.image_tags())
    }
    async fn revisions(&self, id: &ObjectId) -> Result<Vec<RevisionRow>> {
        let id = id.clone();
        blocking!(self, c => c.revisions(&id))
    }
    async fn schedule_inputs(&self) -> Result<ScheduleInputs> {
        blocking!(self, c => c.schedule_inputs())
    }
    async fn schedule_inputs_for(&self, nodes: &[String]) -> Result<ScheduleInputs> {
        let n = nodes.to_vec();
        blocking!(self, c => c.schedule_inputs_of(Some(&n)))
    }
    async fn commit_plan(&self, plan: &Plan) -> Result<BTreeMap<String, u64>> {
        let p = plan.clone();
        blocking!(self, c => c.commit_plan(&p))
    }
    async fn desired(&self) -> Result<Vec<DesiredRow>> {
        blocking!(self, c => c.desired())
    }
    async fn prefetch(&self, node: &str) -> Result<Vec<WorkloadSpec>> {
        let n = node.to_string();
        blocking!(self, c => c.prefetch(&n))
    }
    async fn rollout(&self, workload: &str) -> Result<Option<Rollout>> {
        let w = workload.to_string();
        blocking!(self, c => c.rollout(&w))
    }
    async fn rollouts(&self) -> Result<Vec<Rollout>> {
        blocking!(self, c => c.rollouts())
    }
    async fn put_rollout(&self, r: &Rollout) -> Result<()> {
        let r = r.clone();
        blocking!(self, c => c.put_rollout(&r))
    }
    async fn gitops_states(&self) -> Result<Vec<(String, String)>> {
        blocking!(self, c => c.gitops_states())
    }
    async fn put_gitops_state(&self, repo: &str, state: Option<&str>, now: UnixMs) -> Result<()> {
        let (r, s) = (repo.to_string(), state.map(str::to_string));
        blocking!(self, c => c.put_gitops_state(&r, s.as_deref(), now))
    }
}
