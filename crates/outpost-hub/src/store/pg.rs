//! [`Store`] on PostgreSQL (sqlx, a connection pool), for large fleets and, later, several hub
//! replicas on one database.
//!
//! The invariants of the module docs hold with several writers on the database, not only one:
//! - generations come from one PostgreSQL `SEQUENCE` (`gen_seq`), taken while the node's row is
//!   locked (`SELECT ... FOR UPDATE`), so a node's generation only grows whichever transaction
//!   commits first; every transaction that locks several `nodes` rows (a plan, a report group,
//!   a contact batch) locks them in name order before anything else (`lock_nodes`), so
//!   replicas' writers cannot deadlock on them; a plan or a contact batch that loses a lock
//!   conflict all the same (PostgreSQL fails one side: 40P01, or 40001) runs again, up to
//!   `LOCK_CONFLICT_RETRIES` times, so a change is never dropped for it;
//! - a join locks the token's row before checking it, and uses it up with a conditional
//!   `UPDATE ... WHERE uses_left > 0`: two joins racing for the last use, on one hub or on two,
//!   cannot both win; a taken name is refused by `INSERT ... ON CONFLICT DO NOTHING`;
//! - reads that must see one state (`sync`, `schedule_inputs`) run in a `REPEATABLE READ`
//!   transaction;
//! - the schema is migrated under a transaction-scoped advisory lock, so hubs starting at once
//!   migrate it once.
//!
//! Text columns use the "C" collation so listings sort by bytes, as on SQLite.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use outpost_api::{
    ApplyResult, ImageTag, Labels, NodeEvent, Object, ObjectId, StatusReport, SyncResponse, UnixMs, WorkloadSpec,
    WorkloadStatus,
};
use outpost_core::waves::Rollout;
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::Acquire;

use super::*;

/// The PostgreSQL migrations, in order: (the version a step brings the database to, its SQL).
/// PostgreSQL support starts at version 3 (the SQLite schema's numbering), so its first step
/// creates the whole version-3 schema; later steps each add one version to both backends.
const PG_MIGRATIONS: &[(i64, &str)] = &[
    (3, PG_V3),
    (4, super::monitor_pg::PG_V4),
    (5, PG_V5),
    (6, PG_V6),
    (7, PG_V7),
    (8, PG_V8),
];

/// 6: requests relayed to nodes through whichever replica holds their long-poll
/// (`super::notify`).
const PG_V6: &str = r#"
CREATE TABLE relays (
    id TEXT COLLATE "C" PRIMARY KEY, kind TEXT NOT NULL, node TEXT COLLATE "C" NOT NULL,
    request TEXT NOT NULL, taken BOOLEAN NOT NULL DEFAULT FALSE, answer TEXT, created_at BIGINT NOT NULL);
CREATE INDEX relays_pending ON relays (node) WHERE NOT taken;
"#;

/// 7: exec sessions across replicas (`super::exec_frames`): the session rows, parked for their
/// node until taken, with each side's beat, and the frame batches per session and direction.
const PG_V7: &str = r#"
CREATE TABLE exec_sessions (
    id TEXT COLLATE "C" PRIMARY KEY, node TEXT COLLATE "C" NOT NULL, owner TEXT NOT NULL,
    request TEXT NOT NULL, taken BOOLEAN NOT NULL DEFAULT FALSE,
    out_open BOOLEAN NOT NULL DEFAULT FALSE, in_open BOOLEAN NOT NULL DEFAULT FALSE,
    out_closed BOOLEAN NOT NULL DEFAULT FALSE,
    out_seq BIGINT NOT NULL DEFAULT 0, out_acked BIGINT NOT NULL DEFAULT 0,
    in_seq BIGINT NOT NULL DEFAULT 0, in_acked BIGINT NOT NULL DEFAULT 0,
    operator_beat BIGINT NOT NULL, node_beat BIGINT, deadline BIGINT NOT NULL, created_at BIGINT NOT NULL);
CREATE INDEX exec_sessions_pending ON exec_sessions (node) WHERE NOT taken;
CREATE TABLE exec_frames (
    session TEXT COLLATE "C" NOT NULL REFERENCES exec_sessions (id) ON DELETE CASCADE,
    dir TEXT NOT NULL, seq BIGINT NOT NULL, data BYTEA NOT NULL,
    PRIMARY KEY (session, dir, seq));
"#;

/// 8: certificates retired through any replica (a renewed one promoted, a node deleted), for
/// every replica's certificate cache (`Shared::retired_certs`); `at` is the database's clock.
/// Desired specs stored once each (`specs`, by the SHA-256 of their JSON,
/// `super::SpecTexts`): `node_workloads.spec_addr` refers to one; rows written before keep
/// their spec inline.
const PG_V8: &str = r#"
CREATE TABLE cert_retired (node TEXT COLLATE "C" NOT NULL, at BIGINT NOT NULL);
CREATE INDEX cert_retired_at ON cert_retired (at);
CREATE TABLE specs (addr TEXT COLLATE "C" PRIMARY KEY, spec TEXT NOT NULL);
ALTER TABLE node_workloads ADD COLUMN spec_addr TEXT COLLATE "C";
"#;

/// The database's clock, in ms since the epoch (`cert_retired.at`).
pub(super) const PG_NOW_MS: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";

const PG_V3: &str = r#"
CREATE TABLE tokens (
    id TEXT COLLATE "C" PRIMARY KEY, secret_sha256 TEXT NOT NULL, labels TEXT NOT NULL,
    expires_at BIGINT, uses_left BIGINT, used BIGINT NOT NULL DEFAULT 0, created_at BIGINT NOT NULL,
    node_labels TEXT NOT NULL DEFAULT '[]');
CREATE TABLE nodes (
    name TEXT COLLATE "C" PRIMARY KEY, labels TEXT NOT NULL, cert_fp TEXT NOT NULL UNIQUE,
    cert_not_after BIGINT NOT NULL, joined_at BIGINT NOT NULL, last_seen BIGINT,
    generation BIGINT NOT NULL, applied_generation BIGINT NOT NULL DEFAULT 0,
    tombstone_floor BIGINT NOT NULL DEFAULT 0, agent_version TEXT, uptime_secs BIGINT,
    token_id TEXT, next_cert_fp TEXT, next_cert_not_after BIGINT);
CREATE INDEX nodes_next_cert ON nodes (next_cert_fp);
CREATE TABLE objects (
    kind TEXT COLLATE "C" NOT NULL, namespace TEXT COLLATE "C" NOT NULL, name TEXT COLLATE "C" NOT NULL,
    manifest TEXT NOT NULL, template_hash TEXT, revision BIGINT NOT NULL, created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL, PRIMARY KEY (kind, namespace, name));
CREATE TABLE revisions (
    kind TEXT COLLATE "C" NOT NULL, namespace TEXT COLLATE "C" NOT NULL, name TEXT COLLATE "C" NOT NULL,
    revision BIGINT NOT NULL, template_hash TEXT NOT NULL, template TEXT NOT NULL, created_at BIGINT NOT NULL,
    PRIMARY KEY (kind, namespace, name, revision));
CREATE TABLE assignments (
    kind TEXT COLLATE "C" NOT NULL, namespace TEXT COLLATE "C" NOT NULL, name TEXT COLLATE "C" NOT NULL,
    node TEXT COLLATE "C" NOT NULL, PRIMARY KEY (kind, namespace, name, node));
CREATE TABLE node_workloads (
    node TEXT COLLATE "C" NOT NULL, key TEXT COLLATE "C" NOT NULL, spec TEXT NOT NULL, hash TEXT NOT NULL,
    changed_gen BIGINT NOT NULL, revision BIGINT NOT NULL DEFAULT 0, PRIMARY KEY (node, key));
CREATE TABLE node_prefetch (
    node TEXT COLLATE "C" NOT NULL, key TEXT COLLATE "C" NOT NULL, spec TEXT NOT NULL, hash TEXT NOT NULL,
    PRIMARY KEY (node, key));
CREATE TABLE rollouts (
    workload TEXT COLLATE "C" PRIMARY KEY, revision BIGINT NOT NULL, state TEXT NOT NULL, updated_at BIGINT NOT NULL);
CREATE TABLE node_tombstones (
    node TEXT COLLATE "C" NOT NULL, key TEXT COLLATE "C" NOT NULL, gen BIGINT NOT NULL, PRIMARY KEY (node, key));
CREATE TABLE workload_status (
    node TEXT COLLATE "C" NOT NULL, key TEXT COLLATE "C" NOT NULL, status TEXT NOT NULL, updated_at BIGINT NOT NULL,
    PRIMARY KEY (node, key));
CREATE TABLE image_tags (
    name TEXT COLLATE "C" PRIMARY KEY, digest TEXT NOT NULL, size BIGINT NOT NULL, pushed_at BIGINT NOT NULL);
CREATE TABLE events (
    node TEXT COLLATE "C" NOT NULL, seq BIGINT NOT NULL, at BIGINT NOT NULL, workload TEXT,
    reason TEXT NOT NULL, message TEXT NOT NULL, received_at BIGINT NOT NULL, PRIMARY KEY (node, seq));
CREATE TABLE gitops_state (
    repo TEXT COLLATE "C" PRIMARY KEY, state TEXT NOT NULL, updated_at BIGINT NOT NULL);
CREATE SEQUENCE gen_seq;
"#;

/// 4: what lived only in the data dir and hub.db moves into the shared database: operator
/// accounts, their tokens, the audit log and browser sessions (`store::accounts`), pipeline
/// records (`store::records`), image and model blobs in chunks (`store::blobs`), and the CA
/// certificate, the sealed CA key and the admin token's hash (`hub_secrets`, `crate::files`).
/// (SQLite keeps these in `hub.db` tables of their own modules and the data dir.)
const PG_V5: &str = r#"
CREATE TABLE users (
    name TEXT COLLATE "C" PRIMARY KEY, role TEXT NOT NULL, scope TEXT NOT NULL DEFAULT '',
    password TEXT, created_at BIGINT NOT NULL);
CREATE TABLE user_tokens (
    id TEXT COLLATE "C" PRIMARY KEY, "user" TEXT COLLATE "C" NOT NULL, secret_sha256 TEXT NOT NULL UNIQUE,
    expires_at BIGINT, revoked_at BIGINT, created_at BIGINT NOT NULL, last_used_at BIGINT);
CREATE INDEX user_tokens_user ON user_tokens ("user");
CREATE TABLE audit (
    seq BIGSERIAL PRIMARY KEY, at BIGINT NOT NULL, "user" TEXT NOT NULL,
    action TEXT NOT NULL, target TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '',
    peer TEXT NOT NULL DEFAULT '', result TEXT NOT NULL);
CREATE INDEX audit_at ON audit (at);
CREATE TABLE sessions (
    id_sha256 TEXT COLLATE "C" PRIMARY KEY, "user" TEXT COLLATE "C" NOT NULL, csrf_sha256 TEXT NOT NULL,
    created_at BIGINT NOT NULL, last_used_at BIGINT NOT NULL);
CREATE INDEX sessions_user ON sessions ("user");
CREATE TABLE data_records (
    "cursor" BIGSERIAL PRIMARY KEY, node TEXT COLLATE "C" NOT NULL, id TEXT COLLATE "C" NOT NULL,
    pipeline TEXT COLLATE "C" NOT NULL, stream TEXT COLLATE "C" NOT NULL, at BIGINT NOT NULL, kind TEXT NOT NULL,
    rules TEXT NOT NULL, key TEXT, data TEXT NOT NULL, received_at BIGINT NOT NULL,
    UNIQUE (node, id));
CREATE INDEX data_records_stream ON data_records (stream, "cursor");
CREATE INDEX data_records_received ON data_records (pipeline, received_at);
CREATE TABLE blobs (
    digest TEXT COLLATE "C" PRIMARY KEY, size BIGINT NOT NULL, chunk_size BIGINT NOT NULL, stored_at BIGINT NOT NULL);
CREATE TABLE blob_chunks (
    digest TEXT COLLATE "C" NOT NULL REFERENCES blobs (digest) ON DELETE CASCADE, n BIGINT NOT NULL,
    data BYTEA NOT NULL, PRIMARY KEY (digest, n));
CREATE TABLE hub_secrets (
    name TEXT COLLATE "C" PRIMARY KEY, value TEXT NOT NULL, updated_at BIGINT NOT NULL);
"#;

/// Any fixed number: the advisory lock hubs take while they migrate the schema.
const MIGRATION_LOCK: i64 = 0x6f75_7470_6f73_7431;

/// [`Store`] on PostgreSQL. See the module docs.
pub struct PgStore {
    pub(super) pool: PgPool,
    contacts: Contacts,
    shared: super::notify::Shared,
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some((auth, host)) => (auth, host),
        None => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

impl PgStore {
    /// The scheduler's inputs; with `only`, only that node's rows.
    async fn schedule_inputs_of(&self, only: Option<&[String]>) -> Result<ScheduleInputs> {
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let rows: Vec<NodeTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {NODE_COLS} FROM nodes WHERE $1::text[] IS NULL OR name = ANY($1) ORDER BY name"
        )))
        .bind(only)
        .fetch_all(&mut *tx)
        .await?;
        let nodes = rows
            .into_iter()
            .map(|r| node_row(r).map(|n| self.contacts.overlay(n)))
            .collect::<Result<Vec<_>>>()?;
        let objects = objects_in(&mut tx).await?;
        let mut assignments: BTreeMap<ObjectId, BTreeSet<String>> = BTreeMap::new();
        let rows: Vec<(String, String, String, String)> =
            sqlx::query_as("SELECT kind, namespace, name, node FROM assignments")
                .fetch_all(&mut *tx)
                .await?;
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
        let mut held: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let mut held_revisions: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
            "SELECT node, key, hash, revision FROM node_workloads WHERE $1::text[] IS NULL OR node = ANY($1)",
        )
        .bind(only)
        .fetch_all(&mut *tx)
        .await?;
        for (node, key, hash, rev) in rows {
            held.entry(node.clone()).or_default().insert(key.clone(), hash);
            held_revisions.entry(node).or_default().insert(key, u(rev));
        }
        let mut held_prefetch: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let rows: Vec<(String, String, String)> =
            sqlx::query_as("SELECT node, key, hash FROM node_prefetch WHERE $1::text[] IS NULL OR node = ANY($1)")
                .bind(only)
                .fetch_all(&mut *tx)
                .await?;
        for (node, key, hash) in rows {
            held_prefetch.entry(node).or_default().insert(key, hash);
        }
        let rollouts: BTreeMap<String, Rollout> = rollouts_in(&mut tx)
            .await?
            .into_iter()
            .map(|r| (r.workload.clone(), r))
            .collect();
        let mut templates = BTreeMap::new();
        for (id, rev) in wanted_templates(&objects, &held_revisions, &rollouts) {
            let t: Option<String> = sqlx::query_scalar(
                "SELECT template FROM revisions WHERE kind = $1 AND namespace = $2 AND name = $3 AND revision = $4",
            )
            .bind(id.kind.as_str())
            .bind(&id.namespace)
            .bind(&id.name)
            .bind(i(rev))
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(t) = t {
                templates.insert((id, rev), serde_json::from_str(&t)?);
            }
        }
        tx.commit().await?;
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

    /// Connect, run the migrations the database lacks and check its schema version.
    pub async fn connect(url: &str) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await?;
        migrate(&pool, &redact(url)).await?;
        Ok(Self {
            shared: super::notify::Shared::new(pool.clone()),
            pool,
            contacts: Contacts::default(),
        })
    }

    /// The connection pool, shared with the account, record and blob stores.
    pub fn pool(&self) -> PgPool {
        self.pool.clone()
    }

    /// Begin a transaction that writes the reports of `nodes`: their rows are locked first, in
    /// name order, so it cannot close a lock cycle with a plan (which locks its nodes in name
    /// order too) or another replica's report group. The contacts held in memory are not
    /// written here but by the contact writer (`flush_contacts`), in a short transaction of its
    /// own: written with the reports, they made every group lock the rows of nodes that merely
    /// polled, which other groups were reporting for, so the groups queued on one another with
    /// their pool connections held (pool timeouts at 5,000 agents on three replicas).
    async fn begin_reports<'n>(
        &self,
        nodes: impl Iterator<Item = &'n str>,
    ) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        let names: BTreeSet<&str> = nodes.collect();
        let mut tx = self.pool.begin().await?;
        lock_nodes(&mut tx, names.into_iter()).await?;
        Ok(tx)
    }
}

/// Lock the rows of `names` (sorted) in name order: every writer that locks several `nodes` rows
/// does it in this one order, so no two can wait on each other in a cycle. (The "C" collation of
/// `name` is byte order, the order of a `BTreeMap<String, _>`.)
async fn lock_nodes(tx: &mut PgConnection, names: impl Iterator<Item = &str>) -> Result<()> {
    let names: Vec<&str> = names.collect();
    if names.is_empty() {
        return Ok(());
    }
    sqlx::query("SELECT 1 FROM nodes WHERE name = ANY($1) ORDER BY name FOR UPDATE")
        .bind(&names)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Write contacts (node -> time) in one statement; the caller locked their rows.
async fn write_seen(tx: &mut PgConnection, seen: &BTreeMap<String, UnixMs>) -> Result<()> {
    if seen.is_empty() {
        return Ok(());
    }
    let (names, times): (Vec<&str>, Vec<i64>) = seen.iter().map(|(n, t)| (n.as_str(), *t)).unzip();
    sqlx::query(
        "UPDATE nodes SET last_seen = GREATEST(COALESCE(nodes.last_seen, 0), c.t)
         FROM UNNEST($1::text[], $2::bigint[]) AS c(name, t) WHERE nodes.name = c.name",
    )
    .bind(&names)
    .bind(&times)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn migrate(pool: &PgPool, shown: &str) -> Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS meta (key TEXT COLLATE \"C\" PRIMARY KEY, value TEXT NOT NULL)")
        .execute(&mut *tx)
        .await?;
    let found: Option<String> = sqlx::query_scalar("SELECT value FROM meta WHERE key = 'schema_version'")
        .fetch_optional(&mut *tx)
        .await?;
    let found = found.and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            path: shown.to_string(),
            found,
        });
    }
    for (version, sql) in PG_MIGRATIONS {
        if *version > found {
            tracing::info!(database = %shown, version, "migrating the PostgreSQL schema");
            sqlx::raw_sql(*sql).execute(&mut *tx).await?;
        }
    }
    sqlx::query(
        "INSERT INTO meta (key, value) VALUES ('schema_version', $1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )
    .bind(SCHEMA_VERSION.to_string())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

type NodeTuple = (
    String,
    String,
    String,
    i64,
    i64,
    Option<i64>,
    i64,
    i64,
    Option<String>,
    Option<i64>,
);

const NODE_COLS: &str = "name, labels, cert_fp, cert_not_after, joined_at, last_seen, generation, \
     applied_generation, agent_version, uptime_secs";

fn node_row(t: NodeTuple) -> Result<NodeRow> {
    Ok(NodeRow {
        name: t.0,
        labels: serde_json::from_str(&t.1)?,
        cert_fp: t.2,
        cert_not_after: t.3,
        joined_at: t.4,
        last_seen: t.5,
        generation: u(t.6),
        applied_generation: u(t.7),
        agent_version: t.8,
        uptime_secs: t.9.map(u),
    })
}

type TokenTuple = (String, String, String, Option<i64>, Option<i64>, i64, i64, String);

async fn token_row(c: &mut PgConnection, id: &str, lock: bool) -> Result<Option<TokenRow>> {
    let sql = if lock {
        "SELECT id, secret_sha256, labels, expires_at, uses_left, used, created_at, node_labels
         FROM tokens WHERE id = $1 FOR UPDATE"
    } else {
        "SELECT id, secret_sha256, labels, expires_at, uses_left, used, created_at, node_labels
         FROM tokens WHERE id = $1"
    };
    let row: Option<TokenTuple> = sqlx::query_as(sql).bind(id).fetch_optional(&mut *c).await?;
    row.map(|t| {
        Ok(TokenRow {
            id: t.0,
            secret_sha256: t.1,
            labels: serde_json::from_str(&t.2)?,
            expires_at: t.3,
            uses_left: t.4.map(u),
            used: u(t.5),
            created_at: t.6,
            node_labels: serde_json::from_str(&t.7)?,
        })
    })
    .transpose()
}

async fn object_row(c: &mut PgConnection, id: &ObjectId) -> Result<Option<StoredObject>> {
    let row: Option<(String, Option<String>, i64, i64, i64)> = sqlx::query_as(
        "SELECT manifest, template_hash, revision, created_at, updated_at FROM objects
         WHERE kind = $1 AND namespace = $2 AND name = $3",
    )
    .bind(id.kind.as_str())
    .bind(&id.namespace)
    .bind(&id.name)
    .fetch_optional(&mut *c)
    .await?;
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

async fn objects_in(c: &mut PgConnection) -> Result<Vec<StoredObject>> {
    let rows: Vec<(String, String, Option<String>, i64, i64, i64)> = sqlx::query_as(
        "SELECT kind, manifest, template_hash, revision, created_at, updated_at FROM objects
         ORDER BY kind, namespace, name",
    )
    .fetch_all(&mut *c)
    .await?;
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

async fn rollouts_in(c: &mut PgConnection) -> Result<Vec<Rollout>> {
    let rows: Vec<String> = sqlx::query_scalar("SELECT state FROM rollouts ORDER BY workload")
        .fetch_all(&mut *c)
        .await?;
    rows.iter().map(|s| Ok(serde_json::from_str(s)?)).collect()
}

/// Store one status report inside an open transaction or savepoint.
async fn record_status_in(tx: &mut PgConnection, node: &str, report: &StatusReport, now: UnixMs) -> Result<u64> {
    let generation: i64 = sqlx::query_scalar("SELECT generation FROM nodes WHERE name = $1")
        .bind(node)
        .fetch_one(&mut *tx)
        .await?;
    // An agent cannot have applied more than we sent; clamp so pruning stays safe.
    let applied = i(report.generation).min(generation);
    sqlx::query(
        "UPDATE nodes SET last_seen = GREATEST(COALESCE(last_seen, 0), $2), agent_version = $3, uptime_secs = $4,
                applied_generation = $5, tombstone_floor = GREATEST(tombstone_floor, $5) WHERE name = $1",
    )
    .bind(node)
    .bind(now)
    .bind(&report.agent_version)
    .bind(i(report.uptime_secs))
    .bind(applied)
    .execute(&mut *tx)
    .await?;
    // Tombstones the agent has applied are no longer needed; the floor remembers them.
    sqlx::query("DELETE FROM node_tombstones WHERE node = $1 AND gen <= $2")
        .bind(node)
        .bind(applied)
        .execute(&mut *tx)
        .await?;
    if report.full {
        let listed: Vec<&str> = report.workloads.iter().map(|w| w.key.as_str()).collect();
        sqlx::query("DELETE FROM workload_status WHERE node = $1 AND NOT (key = ANY($2))")
            .bind(node)
            .bind(&listed)
            .execute(&mut *tx)
            .await?;
    }
    for w in &report.workloads {
        sqlx::query(
            "INSERT INTO workload_status (node, key, status, updated_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (node, key) DO UPDATE SET status = excluded.status, updated_at = excluded.updated_at",
        )
        .bind(node)
        .bind(&w.key)
        .bind(serde_json::to_string(w)?)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    for k in &report.removed {
        sqlx::query("DELETE FROM workload_status WHERE node = $1 AND key = $2")
            .bind(node)
            .bind(k)
            .execute(&mut *tx)
            .await?;
    }
    for e in &report.events {
        sqlx::query(
            "INSERT INTO events (node, seq, at, workload, reason, message, received_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (node, seq) DO NOTHING",
        )
        .bind(node)
        .bind(i(e.seq))
        .bind(e.at)
        .bind(&e.workload)
        .bind(&e.reason)
        .bind(&e.message)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    let acked: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM events WHERE node = $1")
        .bind(node)
        .fetch_one(&mut *tx)
        .await?;
    let acked = acked.unwrap_or(0);
    if !report.events.is_empty() {
        sqlx::query("DELETE FROM events WHERE node = $1 AND seq <= $2")
            .bind(node)
            .bind(acked - EVENTS_KEPT)
            .execute(&mut *tx)
            .await?;
    }
    Ok(u(acked))
}

/// Delete, in one statement, the rows of `table` whose `column` is at most the bound given for
/// their node (`nodes[i]`, `bounds[i]`).
async fn delete_up_to(tx: &mut PgConnection, table: &str, column: &str, nodes: &[&str], bounds: &[i64]) -> Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM {table} t USING UNNEST($1::text[], $2::bigint[]) AS b(node, bound)
         WHERE t.node = b.node AND t.{column} <= b.bound"
    )))
    .bind(nodes)
    .bind(bounds)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// A report group in a fixed number of statements, each over every report of the group at once:
/// what [`record_status_in`] does report by report (5 to 18 round trips each), for many. The
/// nodes of `batch` are distinct (the caller checks) and their rows are locked. A report whose
/// node is gone is refused alone, as [`record_status_in`] refuses it.
async fn record_statuses_in(
    tx: &mut PgConnection,
    batch: &[(String, StatusReport, UnixMs)],
) -> Result<Vec<Result<u64, String>>> {
    // The nodes: contact, version, uptime, and the applied generation clamped to what was sent.
    let mut cols = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (node, r, now) in batch {
        cols.0.push(node.as_str());
        cols.1.push(*now);
        cols.2.push(r.agent_version.as_str());
        cols.3.push(i(r.uptime_secs));
        cols.4.push(i(r.generation));
    }
    let applied: BTreeMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "UPDATE nodes SET last_seen = GREATEST(COALESCE(nodes.last_seen, 0), r.now), agent_version = r.version,
                uptime_secs = r.uptime, applied_generation = LEAST(r.gen, nodes.generation),
                tombstone_floor = GREATEST(nodes.tombstone_floor, LEAST(r.gen, nodes.generation))
         FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::bigint[], $5::bigint[]) AS r(name, now, version, uptime, gen)
         WHERE nodes.name = r.name RETURNING nodes.name, nodes.applied_generation",
    )
    .bind(&cols.0)
    .bind(&cols.1)
    .bind(&cols.2)
    .bind(&cols.3)
    .bind(&cols.4)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let present: Vec<&(String, StatusReport, UnixMs)> =
        batch.iter().filter(|(n, _, _)| applied.contains_key(n)).collect();
    // Tombstones the agents have applied are no longer needed; the floor remembers them.
    let (names, gens): (Vec<&str>, Vec<i64>) = applied.iter().map(|(n, g)| (n.as_str(), *g)).unzip();
    delete_up_to(&mut *tx, "node_tombstones", "gen", &names, &gens).await?;
    // Full reports drop the statuses they do not list.
    let full: Vec<&str> = present
        .iter()
        .filter(|(_, r, _)| r.full)
        .map(|(n, _, _)| n.as_str())
        .collect();
    if !full.is_empty() {
        let mut listed = NodeKeys::default();
        for (n, r, _) in present.iter().filter(|(_, r, _)| r.full) {
            for w in &r.workloads {
                listed.push(n, &w.key);
            }
        }
        sqlx::query(
            "DELETE FROM workload_status w WHERE w.node = ANY($1) AND NOT EXISTS
               (SELECT 1 FROM UNNEST($2::text[], $3::text[]) AS l(node, key) WHERE l.node = w.node AND l.key = w.key)",
        )
        .bind(&full)
        .bind(&listed.node)
        .bind(&listed.key)
        .execute(&mut *tx)
        .await?;
    }
    // Statuses: the last of one (node, key) wins, as one upsert after another would leave it.
    let mut statuses: BTreeMap<(&str, &str), (String, i64)> = BTreeMap::new();
    for (n, r, now) in &present {
        for w in &r.workloads {
            statuses.insert((n.as_str(), w.key.as_str()), (serde_json::to_string(w)?, *now));
        }
    }
    if !statuses.is_empty() {
        let mut c = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((n, k), (st, now)) in &statuses {
            c.0.push(*n);
            c.1.push(*k);
            c.2.push(st.as_str());
            c.3.push(*now);
        }
        sqlx::query(
            "INSERT INTO workload_status (node, key, status, updated_at)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[])
             ON CONFLICT (node, key) DO UPDATE SET status = excluded.status, updated_at = excluded.updated_at",
        )
        .bind(&c.0)
        .bind(&c.1)
        .bind(&c.2)
        .bind(&c.3)
        .execute(&mut *tx)
        .await?;
    }
    let mut removed = NodeKeys::default();
    for (n, r, _) in &present {
        for k in &r.removed {
            removed.push(n, k);
        }
    }
    if !removed.is_empty() {
        removed.delete_from(&mut *tx, "workload_status").await?;
    }
    // Events, each (node, seq) once.
    let mut ev = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for (n, r, now) in &present {
        for e in &r.events {
            ev.0.push(n.as_str());
            ev.1.push(i(e.seq));
            ev.2.push(e.at);
            ev.3.push(e.workload.as_deref());
            ev.4.push(e.reason.as_str());
            ev.5.push(e.message.as_str());
            ev.6.push(*now);
        }
    }
    if !ev.0.is_empty() {
        sqlx::query(
            "INSERT INTO events (node, seq, at, workload, reason, message, received_at)
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::bigint[])
             ON CONFLICT (node, seq) DO NOTHING",
        )
        .bind(&ev.0)
        .bind(&ev.1)
        .bind(&ev.2)
        .bind(&ev.3)
        .bind(&ev.4)
        .bind(&ev.5)
        .bind(&ev.6)
        .execute(&mut *tx)
        .await?;
    }
    let acked: BTreeMap<String, i64> =
        sqlx::query_as::<_, (String, i64)>("SELECT node, MAX(seq) FROM events WHERE node = ANY($1) GROUP BY node")
            .bind(&names)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
    // Past the newest EVENTS_KEPT of a node that sent events, the oldest go.
    let (pn, upto): (Vec<&str>, Vec<i64>) = present
        .iter()
        .filter(|(_, r, _)| !r.events.is_empty())
        .map(|(n, _, _)| (n.as_str(), acked.get(n).copied().unwrap_or(0) - EVENTS_KEPT))
        .unzip();
    if !pn.is_empty() {
        delete_up_to(&mut *tx, "events", "seq", &pn, &upto).await?;
    }
    Ok(batch
        .iter()
        .map(|(n, _, _)| match applied.contains_key(n) {
            true => Ok(u(acked.get(n).copied().unwrap_or(0))),
            false => Err(format!("no node named {n} (deleted?)")),
        })
        .collect())
}

#[async_trait::async_trait]
impl Store for PgStore {
    async fn create_token(&self, t: &TokenRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO tokens (id, secret_sha256, labels, expires_at, uses_left, used, created_at, node_labels)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&t.id)
        .bind(&t.secret_sha256)
        .bind(serde_json::to_string(&t.labels)?)
        .bind(t.expires_at)
        .bind(t.uses_left.map(i))
        .bind(i(t.used))
        .bind(t.created_at)
        .bind(serde_json::to_string(&t.node_labels)?)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn token(&self, id: &str) -> Result<Option<TokenRow>> {
        let mut c = self.pool.acquire().await?;
        token_row(&mut c, id, false).await
    }

    async fn join(&self, token_id: &str, secret_sha256: &str, node: &NewNode, now: UnixMs) -> Result<Labels> {
        let mut tx = self.pool.begin().await?;
        // The row lock makes racing joins for one token take turns: the second sees the use
        // the first took.
        let tok = token_row(&mut tx, token_id, true).await?;
        check_token(tok.as_ref(), token_id, secret_sha256, now).map_err(StoreError::Token)?;
        let tok = tok.ok_or_else(|| StoreError::Token(TokenProblem::Unknown { id: token_id.into() }))?;
        let exists: Option<String> = sqlx::query_scalar("SELECT name FROM nodes WHERE name = $1")
            .bind(&node.name)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_some() {
            return Err(StoreError::NodeExists(node.name.clone()));
        }
        let labels = outpost_core::link::node_labels(&node.name, &tok.labels, &tok.node_labels, &node.labels)?;
        let gen: i64 = sqlx::query_scalar("SELECT nextval('gen_seq')")
            .fetch_one(&mut *tx)
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO nodes (name, labels, cert_fp, cert_not_after, joined_at, generation, token_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&node.name)
        .bind(serde_json::to_string(&labels)?)
        .bind(&node.cert_fp)
        .bind(node.cert_not_after)
        .bind(now)
        .bind(gen)
        .bind(token_id)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(StoreError::NodeExists(node.name.clone()));
        }
        let used = sqlx::query(
            "UPDATE tokens SET used = used + 1,
                    uses_left = CASE WHEN uses_left IS NULL THEN NULL ELSE uses_left - 1 END
             WHERE id = $1 AND (uses_left IS NULL OR uses_left > 0)",
        )
        .bind(token_id)
        .execute(&mut *tx)
        .await?;
        if used.rows_affected() == 0 {
            return Err(StoreError::Token(TokenProblem::UsedUp {
                id: token_id.into(),
                used: tok.used,
            }));
        }
        tx.commit().await?;
        Ok(labels)
    }

    async fn node_by_cert(&self, cert_fp: &str) -> Result<Option<CertOwner>> {
        let found: Option<(String, bool)> =
            sqlx::query_as("SELECT name, cert_fp = $1 FROM nodes WHERE cert_fp = $1 OR next_cert_fp = $1")
                .bind(cert_fp)
                .fetch_optional(&self.pool)
                .await?;
        let Some((node, current)) = found else { return Ok(None) };
        if !current {
            // The previous certificate is retired for every replica's cache too.
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "WITH p AS (
                    UPDATE nodes SET cert_fp = next_cert_fp, cert_not_after = next_cert_not_after,
                        next_cert_fp = NULL, next_cert_not_after = NULL
                    WHERE name = $1 AND next_cert_fp = $2 RETURNING name)
                 INSERT INTO cert_retired (node, at) SELECT name, {PG_NOW_MS} FROM p"
            )))
            .bind(&node)
            .bind(cert_fp)
            .execute(&self.pool)
            .await?;
        }
        Ok(Some(CertOwner {
            node,
            promoted: !current,
        }))
    }

    async fn node(&self, name: &str) -> Result<Option<NodeRow>> {
        let row: Option<NodeTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {NODE_COLS} FROM nodes WHERE name = $1"
        )))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.map(node_row)
            .transpose()
            .map(|n| n.map(|n| self.contacts.overlay(n)))
    }

    async fn nodes(&self) -> Result<Vec<NodeRow>> {
        let rows: Vec<NodeTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {NODE_COLS} FROM nodes ORDER BY name"
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| node_row(r).map(|n| self.contacts.overlay(n)))
            .collect()
    }

    async fn touch(&self, node: &str, now: UnixMs) -> Result<Option<UnixMs>> {
        let prev: Option<(Option<i64>, i64)> = sqlx::query_as("SELECT last_seen, joined_at FROM nodes WHERE name = $1")
            .bind(node)
            .fetch_optional(&self.pool)
            .await?;
        let Some((seen, joined)) = prev else { return Ok(None) };
        Ok(Some(self.contacts.touch(node, seen.unwrap_or(joined), now)))
    }

    fn hold(&self, node: &str, open: bool) {
        self.contacts.hold(node, open)
    }

    fn touch_if_recent(&self, node: &str, now: UnixMs, within_ms: i64) -> Option<UnixMs> {
        self.contacts.touch_if_recent(node, now, within_ms)
    }

    fn shared(&self) -> Option<&super::notify::Shared> {
        Some(&self.shared)
    }

    async fn flush_contacts(&self, now: UnixMs) -> Result<()> {
        // The nodes holding a long-poll here are in contact now; the others' latest contacts.
        let mut pending: BTreeMap<String, UnixMs> = self.contacts.drain().into_iter().collect();
        for n in self.contacts.held() {
            pending.insert(n, now);
        }
        if pending.is_empty() {
            return Ok(());
        }
        // Locked in name order first (see `lock_nodes`); a lock conflict all the same (the
        // database may be shared with writers of its own) runs the batch again: the contacts
        // were drained from memory and must not be lost.
        again_on_lock_conflict("contact batch", || async {
            let mut tx = self.pool.begin().await?;
            lock_nodes(&mut tx, pending.keys().map(String::as_str)).await?;
            write_seen(&mut tx, &pending).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    async fn renew(&self, node: &str, cert_fp: &str, cert_not_after: UnixMs) -> Result<()> {
        sqlx::query("UPDATE nodes SET next_cert_fp = $2, next_cert_not_after = $3 WHERE name = $1")
            .bind(node)
            .bind(cert_fp)
            .bind(cert_not_after)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn delete_node(&self, name: &str) -> Result<bool> {
        self.contacts.forget(name);
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query("DELETE FROM nodes WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n > 0 {
            // Every replica's cache drops the node's certificate (`Shared::retired_certs`).
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO cert_retired (node, at) VALUES ($1, {PG_NOW_MS})"
            )))
            .bind(name)
            .execute(&mut *tx)
            .await?;
        }
        for table in NODE_TABLES {
            sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table} WHERE node = $1")))
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(n > 0)
    }

    async fn sync(&self, node: &str, since: u64) -> Result<Option<SyncResponse>> {
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let Some((generation, floor)) =
            sqlx::query_as::<_, (i64, i64)>("SELECT generation, tombstone_floor FROM nodes WHERE name = $1")
                .bind(node)
                .fetch_optional(&mut *tx)
                .await?
        else {
            return Ok(None);
        };
        let (generation, floor) = (u(generation), u(floor));
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
        let specs: Vec<String> = sqlx::query_scalar(
            "SELECT COALESCE(s.spec, w.spec) FROM node_workloads w LEFT JOIN specs s ON s.addr = w.spec_addr
             WHERE w.node = $1 AND w.changed_gen > $2 ORDER BY w.key",
        )
        .bind(node)
        .bind(i(from))
        .fetch_all(&mut *tx)
        .await?;
        let upsert = specs
            .iter()
            .map(|s| serde_json::from_str(s))
            .collect::<Result<Vec<WorkloadSpec>, _>>()?;
        let remove = if full {
            vec![]
        } else {
            sqlx::query_scalar("SELECT key FROM node_tombstones WHERE node = $1 AND gen > $2 ORDER BY key")
                .bind(node)
                .bind(i(since))
                .fetch_all(&mut *tx)
                .await?
        };
        tx.commit().await?;
        Ok(Some(SyncResponse {
            generation,
            full,
            upsert,
            remove,
        }))
    }

    async fn sync_group(&self, reads: &[(String, u64)]) -> Result<Vec<Option<SyncRead>>> {
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let names: Vec<&str> = reads.iter().map(|(n, _)| n.as_str()).collect();
        let rows: Vec<(String, i64, i64, String)> =
            sqlx::query_as("SELECT name, generation, tombstone_floor, labels FROM nodes WHERE name = ANY($1)")
                .bind(&names)
                .fetch_all(&mut *tx)
                .await?;
        let known: HashMap<String, (u64, u64, String)> =
            rows.into_iter().map(|(n, g, f, l)| (n, (u(g), u(f), l))).collect();
        // The reads whose node moved: their rows from `from`, their tombstones after `since`
        // unless the answer is full, their prefetch hints.
        let mut out: Vec<Option<SyncRead>> = Vec::with_capacity(reads.len());
        let (mut changed, mut froms, mut tomb_idx, mut tomb_since) = (vec![], vec![], vec![], vec![]);
        for (k, (node, since)) in reads.iter().enumerate() {
            let Some((generation, floor, labels)) = known.get(node) else {
                out.push(None);
                continue;
            };
            let full = *generation != *since && needs_full(*since, *generation, *floor);
            if *generation != *since {
                changed.push(k);
                froms.push(i(if full { 0 } else { *since }));
                if !full {
                    tomb_idx.push(k);
                    tomb_since.push(i(*since));
                }
            }
            out.push(Some(SyncRead {
                sync: SyncResponse {
                    generation: *generation,
                    full,
                    upsert: vec![],
                    remove: vec![],
                },
                labels: serde_json::from_str(labels)?,
                prefetch: vec![],
            }));
        }
        // Rows come back tagged with their read's place in `changed` / `tomb_idx` (1-based).
        let read = |at: &[usize], ord: i64| at[usize::try_from(ord - 1).unwrap_or(usize::MAX)];
        if !changed.is_empty() {
            let nodes: Vec<&str> = changed.iter().map(|&k| reads[k].0.as_str()).collect();
            // A stored spec (by address) is read and parsed once for the whole group: after a
            // fleet-wide change every node of the group holds the same one.
            let specs: Vec<(i64, Option<String>, Option<String>)> = sqlx::query_as(
                "SELECT r.ord, w.spec_addr, CASE WHEN w.spec_addr IS NULL THEN w.spec END
                 FROM UNNEST($1::text[], $2::bigint[]) WITH ORDINALITY AS r(node, since, ord)
                 JOIN node_workloads w ON w.node = r.node AND w.changed_gen > r.since ORDER BY r.ord, w.key",
            )
            .bind(&nodes)
            .bind(&froms)
            .fetch_all(&mut *tx)
            .await?;
            let addrs: Vec<&str> = specs
                .iter()
                .filter_map(|(_, a, _)| a.as_deref())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let mut stored: HashMap<String, WorkloadSpec> = HashMap::new();
            if !addrs.is_empty() {
                let rows: Vec<(String, String)> = sqlx::query_as("SELECT addr, spec FROM specs WHERE addr = ANY($1)")
                    .bind(&addrs)
                    .fetch_all(&mut *tx)
                    .await?;
                for (addr, spec) in rows {
                    stored.insert(addr, serde_json::from_str(&spec)?);
                }
            }
            for (ord, addr, inline) in specs {
                let spec: WorkloadSpec = match addr {
                    Some(a) => stored.get(&a).cloned().ok_or(StoreError::MissingSpec(a))?,
                    None => serde_json::from_str(inline.as_deref().unwrap_or_default())?,
                };
                if let Some(r) = out[read(&changed, ord)].as_mut() {
                    r.sync.upsert.push(spec);
                }
            }
            let hints: Vec<(i64, String)> = sqlx::query_as(
                "SELECT r.ord, p.spec FROM UNNEST($1::text[]) WITH ORDINALITY AS r(node, ord)
                 JOIN node_prefetch p ON p.node = r.node ORDER BY r.ord, p.key",
            )
            .bind(&nodes)
            .fetch_all(&mut *tx)
            .await?;
            for (ord, spec) in hints {
                if let Some(r) = out[read(&changed, ord)].as_mut() {
                    r.prefetch.push(serde_json::from_str(&spec)?);
                }
            }
        }
        if !tomb_idx.is_empty() {
            let nodes: Vec<&str> = tomb_idx.iter().map(|&k| reads[k].0.as_str()).collect();
            let keys: Vec<(i64, String)> = sqlx::query_as(
                "SELECT r.ord, t.key FROM UNNEST($1::text[], $2::bigint[]) WITH ORDINALITY AS r(node, since, ord)
                 JOIN node_tombstones t ON t.node = r.node AND t.gen > r.since ORDER BY r.ord, t.key",
            )
            .bind(&nodes)
            .bind(&tomb_since)
            .fetch_all(&mut *tx)
            .await?;
            for (ord, key) in keys {
                if let Some(r) = out[read(&tomb_idx, ord)].as_mut() {
                    r.sync.remove.push(key);
                }
            }
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn record_status(&self, node: &str, report: &StatusReport, now: UnixMs) -> Result<u64> {
        let mut tx = self.begin_reports(std::iter::once(node)).await?;
        let acked = record_status_in(&mut tx, node, report, now).await?;
        tx.commit().await?;
        Ok(acked)
    }

    async fn record_statuses(&self, batch: &[(String, StatusReport, UnixMs)]) -> Result<Vec<Result<u64, String>>> {
        let mut tx = self.begin_reports(batch.iter().map(|(n, _, _)| n.as_str())).await?;
        // The whole group in a few statements; a node twice in the group, or a group that
        // fails (a bad report), goes report by report, each refused alone.
        let distinct = batch.iter().map(|(n, _, _)| n.as_str()).collect::<BTreeSet<_>>().len() == batch.len();
        if distinct && batch.len() > 1 {
            let mut sp = (&mut tx).begin().await?;
            match record_statuses_in(&mut sp, batch).await {
                Ok(out) => {
                    sp.commit().await?;
                    tx.commit().await?;
                    return Ok(out);
                }
                Err(e) => {
                    sp.rollback().await?;
                    tracing::debug!(error = %e, reports = batch.len(), "report group failed as a whole; storing report by report");
                }
            }
        }
        let mut out = Vec::with_capacity(batch.len());
        for (node, report, now) in batch {
            // A savepoint per report: one that fails (its node was just deleted) is undone alone.
            let mut sp = (&mut tx).begin().await?;
            match record_status_in(&mut sp, node, report, *now).await {
                Ok(acked) => {
                    sp.commit().await?;
                    out.push(Ok(acked));
                }
                Err(e) => {
                    sp.rollback().await?;
                    out.push(Err(e.to_string()));
                }
            }
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn statuses(&self, node: Option<&str>) -> Result<Vec<(String, WorkloadStatus)>> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT node, status FROM workload_status WHERE $1::text IS NULL OR node = $1 ORDER BY node, key",
        )
        .bind(node)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(n, s)| Ok((n, serde_json::from_str(&s)?)))
            .collect()
    }

    async fn events(&self, node: &str, limit: u32) -> Result<Vec<NodeEvent>> {
        let rows: Vec<(i64, i64, Option<String>, String, String)> = sqlx::query_as(
            "SELECT seq, at, workload, reason, message FROM events WHERE node = $1 ORDER BY seq DESC LIMIT $2",
        )
        .bind(node)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut out: Vec<NodeEvent> = rows
            .into_iter()
            .map(|(seq, at, workload, reason, message)| NodeEvent {
                seq: u(seq),
                at,
                workload,
                reason,
                message,
            })
            .collect();
        out.reverse();
        Ok(out)
    }

    async fn apply(&self, objects: &[Object], now: UnixMs) -> Result<Vec<ApplyResult>> {
        let mut tx = self.pool.begin().await?;
        let mut results = Vec::with_capacity(objects.len());
        for obj in objects {
            let id = obj.id();
            let manifest = serde_json::to_string(obj)?;
            let thash = outpost_core::render::template_hash(obj);
            let prev = object_row(&mut tx, &id).await?;
            let (action, revision, created_at) = apply_action(prev.as_ref(), obj, &thash, now);
            if action != "unchanged" {
                sqlx::query(
                    "INSERT INTO objects (kind, namespace, name, manifest, template_hash, revision, created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                     ON CONFLICT (kind, namespace, name) DO UPDATE SET manifest = excluded.manifest,
                        template_hash = excluded.template_hash, revision = excluded.revision,
                        updated_at = excluded.updated_at",
                )
                .bind(id.kind.as_str())
                .bind(&id.namespace)
                .bind(&id.name)
                .bind(&manifest)
                .bind(&thash)
                .bind(i(revision))
                .bind(created_at)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                if let (Some(h), Some(t)) = (&thash, revision_content(obj)?) {
                    sqlx::query(
                        "INSERT INTO revisions (kind, namespace, name, revision, template_hash, template, created_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                    )
                    .bind(id.kind.as_str())
                    .bind(&id.namespace)
                    .bind(&id.name)
                    .bind(i(revision))
                    .bind(h)
                    .bind(&t)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            results.push(apply_result(&id, action, revision));
        }
        tx.commit().await?;
        Ok(results)
    }

    async fn objects(&self) -> Result<Vec<StoredObject>> {
        let mut c = self.pool.acquire().await?;
        objects_in(&mut c).await
    }

    async fn object(&self, id: &ObjectId) -> Result<Option<StoredObject>> {
        let mut c = self.pool.acquire().await?;
        object_row(&mut c, id).await
    }

    async fn delete_objects(&self, ids: &[ObjectId]) -> Result<(Vec<ObjectId>, Vec<ObjectId>)> {
        let mut tx = self.pool.begin().await?;
        let (mut deleted, mut missing) = (Vec::new(), Vec::new());
        for id in ids {
            let mut n = 0;
            for table in ["objects", "assignments", "revisions"] {
                let r = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DELETE FROM {table} WHERE kind = $1 AND namespace = $2 AND name = $3"
                )))
                .bind(id.kind.as_str())
                .bind(&id.namespace)
                .bind(&id.name)
                .execute(&mut *tx)
                .await?;
                if table == "objects" {
                    n = r.rows_affected();
                }
            }
            if id.kind.is_workload() || id.kind.is_rolled_out() {
                sqlx::query("DELETE FROM rollouts WHERE workload = $1")
                    .bind(outpost_core::render::workload_key(id))
                    .execute(&mut *tx)
                    .await?;
            }
            if n > 0 {
                deleted.push(id.clone());
            } else {
                missing.push(id.clone());
            }
        }
        tx.commit().await?;
        Ok((deleted, missing))
    }

    async fn put_image_tag(&self, t: &ImageTag) -> Result<()> {
        sqlx::query(
            "INSERT INTO image_tags (name, digest, size, pushed_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE SET digest = excluded.digest, size = excluded.size,
                pushed_at = excluded.pushed_at",
        )
        .bind(&t.name)
        .bind(&t.digest)
        .bind(i(t.size))
        .bind(t.pushed_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn image_tag(&self, name: &str) -> Result<Option<ImageTag>> {
        let row: Option<(String, String, i64, i64)> =
            sqlx::query_as("SELECT name, digest, size, pushed_at FROM image_tags WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(image_tag))
    }

    async fn image_tags(&self) -> Result<Vec<ImageTag>> {
        let rows: Vec<(String, String, i64, i64)> =
            sqlx::query_as("SELECT name, digest, size, pushed_at FROM image_tags ORDER BY name")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().map(image_tag).collect())
    }

    async fn revisions(&self, id: &ObjectId) -> Result<Vec<RevisionRow>> {
        let rows: Vec<(i64, String, i64, String)> = sqlx::query_as(
            "SELECT revision, template_hash, created_at, template FROM revisions
             WHERE kind = $1 AND namespace = $2 AND name = $3 ORDER BY revision",
        )
        .bind(id.kind.as_str())
        .bind(&id.namespace)
        .bind(&id.name)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(revision, template_hash, created_at, t)| {
                Ok(RevisionRow {
                    revision: u(revision),
                    template_hash,
                    created_at,
                    template: serde_json::from_str(&t)?,
                })
            })
            .collect()
    }

    async fn schedule_inputs(&self) -> Result<ScheduleInputs> {
        self.schedule_inputs_of(None).await
    }
    async fn schedule_inputs_for(&self, nodes: &[String]) -> Result<ScheduleInputs> {
        self.schedule_inputs_of(Some(nodes)).await
    }

    async fn commit_plan(&self, plan: &Plan) -> Result<BTreeMap<String, u64>> {
        // Replicas' report groups and contact batches lock `nodes` rows too; PostgreSQL breaks
        // a lock cycle by failing one transaction, and a plan that fails is a change that never
        // reaches its nodes: run it again (the transaction was rolled back whole).
        again_on_lock_conflict("plan", || self.commit_plan_once(plan)).await
    }

    async fn desired(&self) -> Result<Vec<DesiredRow>> {
        let rows: Vec<(String, String, String, i64)> =
            sqlx::query_as("SELECT node, key, hash, revision FROM node_workloads ORDER BY key, node")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(node, key, hash, revision)| DesiredRow {
                node,
                key,
                hash,
                revision: u(revision),
            })
            .collect())
    }

    async fn prefetch(&self, node: &str) -> Result<Vec<WorkloadSpec>> {
        let rows: Vec<String> = sqlx::query_scalar("SELECT spec FROM node_prefetch WHERE node = $1 ORDER BY key")
            .bind(node)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|s| Ok(serde_json::from_str(s)?)).collect()
    }

    async fn rollout(&self, workload: &str) -> Result<Option<Rollout>> {
        let s: Option<String> = sqlx::query_scalar("SELECT state FROM rollouts WHERE workload = $1")
            .bind(workload)
            .fetch_optional(&self.pool)
            .await?;
        s.map(|s| Ok(serde_json::from_str(&s)?)).transpose()
    }

    async fn rollouts(&self) -> Result<Vec<Rollout>> {
        let mut c = self.pool.acquire().await?;
        rollouts_in(&mut c).await
    }

    async fn put_rollout(&self, r: &Rollout) -> Result<()> {
        sqlx::query(
            "INSERT INTO rollouts (workload, revision, state, updated_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (workload) DO UPDATE SET revision = excluded.revision, state = excluded.state,
                updated_at = excluded.updated_at",
        )
        .bind(&r.workload)
        .bind(i(r.revision))
        .bind(serde_json::to_string(r)?)
        .bind(r.updated_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn gitops_states(&self) -> Result<Vec<(String, String)>> {
        Ok(sqlx::query_as("SELECT repo, state FROM gitops_state ORDER BY repo")
            .fetch_all(&self.pool)
            .await?)
    }

    async fn put_gitops_state(&self, repo: &str, state: Option<&str>, now: UnixMs) -> Result<()> {
        match state {
            Some(s) => {
                sqlx::query(
                    "INSERT INTO gitops_state (repo, state, updated_at) VALUES ($1, $2, $3)
                 ON CONFLICT (repo) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
                )
                .bind(repo)
                .bind(s)
                .bind(now)
                .execute(&self.pool)
                .await?
            }
            None => {
                sqlx::query("DELETE FROM gitops_state WHERE repo = $1")
                    .bind(repo)
                    .execute(&self.pool)
                    .await?
            }
        };
        Ok(())
    }
}

fn image_tag((name, digest, size, pushed_at): (String, String, i64, i64)) -> ImageTag {
    ImageTag {
        name,
        digest,
        size: u(size),
        pushed_at,
    }
}

/// How many times a transaction that lost a lock conflict runs again.
const LOCK_CONFLICT_RETRIES: u32 = 5;

/// Run `op` again, after a short growing pause, while it loses a lock conflict (PostgreSQL
/// rolled its transaction back whole), up to [`LOCK_CONFLICT_RETRIES`] times.
async fn again_on_lock_conflict<T, F, Fut>(what: &str, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Err(e) if is_lock_conflict(&e) && attempt < LOCK_CONFLICT_RETRIES => {
                attempt += 1;
                tracing::warn!(attempt, error = %e, what, "lost a lock conflict in PostgreSQL; running it again");
                tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
            }
            r => return r,
        }
    }
}

/// A deadlock (40P01) or serialization failure (40001): PostgreSQL rolled the transaction back
/// and it may simply run again.
fn is_lock_conflict(e: &StoreError) -> bool {
    match e {
        StoreError::Pg(sqlx::Error::Database(d)) => matches!(d.code().as_deref(), Some("40P01") | Some("40001")),
        _ => false,
    }
}

impl PgStore {
    async fn commit_plan_once(&self, plan: &Plan) -> Result<BTreeMap<String, u64>> {
        let mut tx = self.pool.begin().await?;
        // Placements: write only the rows that differ from the stored ones.
        let stored: BTreeSet<(String, String, String, String)> = sqlx::query_as::<_, (String, String, String, String)>(
            "SELECT kind, namespace, name, node FROM assignments",
        )
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
        let planned = super::assignment_rows(&plan.assignments);
        for (k, ns, name, node) in stored.difference(&planned) {
            sqlx::query("DELETE FROM assignments WHERE kind = $1 AND namespace = $2 AND name = $3 AND node = $4")
                .bind(k)
                .bind(ns)
                .bind(name)
                .bind(node)
                .execute(&mut *tx)
                .await?;
        }
        for (k, ns, name, node) in planned.difference(&stored) {
            sqlx::query("INSERT INTO assignments (kind, namespace, name, node) VALUES ($1, $2, $3, $4)")
                .bind(k)
                .bind(ns)
                .bind(name)
                .bind(node)
                .execute(&mut *tx)
                .await?;
        }
        let changed: Vec<(&String, &NodeChange)> = plan
            .changes
            .iter()
            .filter(|(_, c)| !(c.upsert.is_empty() && c.remove.is_empty() && c.prefetch.is_none()))
            .collect();
        if changed.is_empty() {
            tx.commit().await?;
            return Ok(BTreeMap::new());
        }
        // Lock the nodes (in name order, as every writer of several nodes does) before taking
        // the generation: whoever commits later for a node took its number later, so a node's
        // generation never goes back. One number serves every node of the plan; each statement
        // below writes the rows of all of them at once (a plan for a whole fleet is a handful of
        // statements, not several per node, and holds its locks that much shorter).
        lock_nodes(&mut tx, changed.iter().map(|(n, _)| n.as_str())).await?;
        let gen: i64 = sqlx::query_scalar("SELECT nextval('gen_seq')")
            .fetch_one(&mut *tx)
            .await?;
        let mut rows = PlanRows::default();
        let mut texts = super::SpecTexts::default();
        for (node, change) in &changed {
            rows.add(node, change, &mut texts)?;
        }
        if !texts.texts.is_empty() {
            let (addrs, jsons): (Vec<&str>, Vec<&str>) =
                texts.texts.iter().map(|(a, j)| (a.as_str(), j.as_str())).unzip();
            sqlx::query(
                "INSERT INTO specs (addr, spec) SELECT * FROM UNNEST($1::text[], $2::text[])
                 ON CONFLICT (addr) DO NOTHING",
            )
            .bind(&addrs)
            .bind(&jsons)
            .execute(&mut *tx)
            .await?;
        }
        // A statement with no rows is not sent (a join's plan is one node's upserts).
        if !rows.prefetch_nodes.is_empty() {
            sqlx::query("DELETE FROM node_prefetch WHERE node = ANY($1)")
                .bind(&rows.prefetch_nodes)
                .execute(&mut *tx)
                .await?;
        }
        if !rows.prefetch.at.is_empty() {
            sqlx::query(
                "INSERT INTO node_prefetch (node, key, spec, hash)
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[])",
            )
            .bind(&rows.prefetch.at.node)
            .bind(&rows.prefetch.at.key)
            .bind(&rows.prefetch.spec)
            .bind(&rows.prefetch.hash)
            .execute(&mut *tx)
            .await?;
        }
        if !rows.upsert.at.is_empty() {
            sqlx::query(
                "INSERT INTO node_workloads (node, key, spec, hash, changed_gen, revision, spec_addr)
                 SELECT u.node, u.key, '', u.hash, $5, u.revision, u.addr
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $6::bigint[]) AS u(node, key, addr, hash, revision)
                 ON CONFLICT (node, key) DO UPDATE SET spec = excluded.spec, hash = excluded.hash,
                    changed_gen = excluded.changed_gen, revision = excluded.revision, spec_addr = excluded.spec_addr",
            )
            .bind(&rows.upsert.at.node)
            .bind(&rows.upsert.at.key)
            .bind(&rows.upsert.spec)
            .bind(&rows.upsert.hash)
            .bind(gen)
            .bind(&rows.upsert_revision)
            .execute(&mut *tx)
            .await?;
            rows.upsert.at.delete_from(&mut tx, "node_tombstones").await?;
        }
        if !rows.remove.is_empty() {
            rows.remove.delete_from(&mut tx, "node_workloads").await?;
            sqlx::query(
                "INSERT INTO node_tombstones (node, key, gen)
                 SELECT u.node, u.key, $3 FROM UNNEST($1::text[], $2::text[]) AS u(node, key)
                 ON CONFLICT (node, key) DO UPDATE SET gen = excluded.gen",
            )
            .bind(&rows.remove.node)
            .bind(&rows.remove.key)
            .bind(gen)
            .execute(&mut *tx)
            .await?;
        }
        let names: Vec<&str> = changed.iter().map(|(n, _)| n.as_str()).collect();
        sqlx::query("UPDATE nodes SET generation = GREATEST(generation, $2) WHERE name = ANY($1)")
            .bind(&names)
            .bind(gen)
            .execute(&mut *tx)
            .await?;
        let bumped = names.into_iter().map(|n| (n.to_string(), u(gen))).collect();
        tx.commit().await?;
        Ok(bumped)
    }
}

/// (node, key) pairs as two columns, for `UNNEST`.
#[derive(Default)]
struct NodeKeys {
    node: Vec<String>,
    key: Vec<String>,
}

impl NodeKeys {
    fn push(&mut self, node: &str, key: &str) {
        self.node.push(node.to_string());
        self.key.push(key.to_string());
    }

    fn is_empty(&self) -> bool {
        self.node.is_empty()
    }

    /// Delete these (node, key) rows of `table` in one statement.
    async fn delete_from(&self, tx: &mut PgConnection, table: &str) -> Result<()> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {table} t USING UNNEST($1::text[], $2::text[]) AS u(node, key)
             WHERE t.node = u.node AND t.key = u.key"
        )))
        .bind(&self.node)
        .bind(&self.key)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

/// Workload specs of nodes as columns, for `UNNEST`.
#[derive(Default)]
struct SpecColumns {
    at: NodeKeys,
    /// The spec's JSON (prefetch hints), or its address in `specs` (workloads).
    spec: Vec<String>,
    hash: Vec<String>,
}

impl SpecColumns {
    fn push(&mut self, node: &str, key: &str, spec: String, hash: String) {
        self.at.push(node, key);
        self.spec.push(spec);
        self.hash.push(hash);
    }
}

/// A plan's per-node writes as columns. A key is written once per node (the last upsert of a
/// key wins; a key removed is not upserted), as one statement may not touch a row twice.
#[derive(Default)]
struct PlanRows {
    prefetch_nodes: Vec<String>,
    prefetch: SpecColumns,
    upsert: SpecColumns,
    upsert_revision: Vec<i64>,
    remove: NodeKeys,
}

impl PlanRows {
    fn add<'a>(&mut self, node: &str, change: &'a NodeChange, texts: &mut super::SpecTexts<'a>) -> Result<()> {
        if let Some(hints) = &change.prefetch {
            self.prefetch_nodes.push(node.to_string());
            let hints: BTreeMap<&str, &WorkloadSpec> = hints.iter().map(|h| (h.key.as_str(), h)).collect();
            for spec in hints.values() {
                self.prefetch
                    .push(node, &spec.key, serde_json::to_string(spec)?, spec.hash.clone());
            }
        }
        let removed: BTreeSet<&str> = change.remove.iter().map(String::as_str).collect();
        let upserts: BTreeMap<&str, &WorkloadSpec> = change
            .upsert
            .iter()
            .filter(|s| !removed.contains(s.key.as_str()))
            .map(|s| (s.key.as_str(), s))
            .collect();
        for spec in upserts.into_values() {
            self.upsert.push(
                node,
                &spec.key,
                texts.address(spec)?,
                outpost_core::site_ha::delivery_hash(spec),
            );
            self.upsert_revision.push(i(spec.revision));
        }
        for key in removed {
            self.remove.push(node, key);
        }
        Ok(())
    }
}
