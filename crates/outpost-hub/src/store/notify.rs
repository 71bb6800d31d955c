//! What hub replicas on one PostgreSQL database share beyond the [`Store`] itself
//! (docs/postgres.md, "Replicas"): wake-ups (LISTEN/NOTIFY), the write lock, and requests
//! relayed to nodes whose long-poll another replica holds.
//!
//! - **Wake-ups**: [`Shared::notify`] sends a NOTIFY on [`CHANNEL`] carrying only a number (the
//!   last generation taken from `gen_seq`); it is a hint. Each replica's listener
//!   (`crate::replicas`) re-reads the stored generations of the nodes it holds
//!   ([`Shared::generations`]) and pending relays on a notification, after every reconnect, and
//!   on a slow fallback poll.
//! - **The write lock**: [`Shared::write_lock`] opens a transaction and takes a
//!   transaction-scoped advisory lock in it; the lock is held until the transaction ends (the
//!   guard is dropped: sqlx rolls it back when the connection goes back to the pool), or until
//!   the connection dies (a replica killed with `kill -9` releases it with its connection).
//! - **Relays** (`relays` table): an operator's log or vitals request is stored for its node
//!   ([`Shared::relay_put`]); whichever replica holds the node's long-poll takes it
//!   ([`Shared::relay_take`], each request handed out once); whichever replica the node answers
//!   stores the answer ([`Shared::relay_answer`]); the replica the operator waits on reads it
//!   ([`Shared::relay_answers`]) and forgets the row. Rows older than [`RELAY_KEPT_MS`] are
//!   removed by any replica's look.
//! - **Retired certificates** (`cert_retired` table): a renewed certificate promoted, or a node
//!   deleted, through any replica leaves a row stamped with the database's clock; every look
//!   reads the rows since its last read ([`Shared::retired_certs`],
//!   `outpost_core::replicas::RetiredCerts`) and drops those nodes from its certificate cache.
//!   Rows older than `outpost_core::replicas::RETIRED_KEPT_MS` are removed by the fallback poll.
//!
//! Must never: carry data in a notification (payloads are a number), or let correctness depend
//! on one arriving.

use std::collections::HashMap;

use sqlx::postgres::{PgListener, PgPool};
use sqlx::{Postgres, Transaction};

use super::{u, Result};
use outpost_api::UnixMs;

/// The channel every replica LISTENs on.
pub const CHANNEL: &str = "outpost_wake";
/// The advisory lock of the write lock (any fixed number, distinct from the migration lock).
pub(super) const WRITE_LOCK: i64 = 0x6f75_7470_6f73_7457;
/// Relayed requests (and their answers) older than this are removed.
pub const RELAY_KEPT_MS: i64 = 10 * 60 * 1000;

/// The PostgreSQL side of replicas. Cheap to clone (a pool handle).
#[derive(Clone)]
pub struct Shared {
    pub(super) pool: PgPool,
}

impl Shared {
    pub(super) fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Wake every replica's listener (this one's too). The payload is the last generation taken.
    pub async fn notify(&self) -> Result<()> {
        sqlx::query("SELECT pg_notify($1, (SELECT last_value FROM gen_seq)::text)")
            .bind(CHANNEL)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A listener on [`CHANNEL`] and the exec sessions' channel (a connection of its own).
    pub async fn listener(&self) -> Result<PgListener> {
        let mut l = PgListener::connect_with(&self.pool).await?;
        l.listen_all([CHANNEL, super::exec_frames::EXEC_CHANNEL]).await?;
        Ok(l)
    }

    /// Take the replicas' write lock: held until the returned transaction is dropped.
    pub async fn write_lock(&self) -> Result<Transaction<'static, Postgres>> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(WRITE_LOCK)
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    /// The stored generations of these nodes (nodes that no longer exist are left out).
    pub async fn generations(&self, nodes: &[String]) -> Result<Vec<(String, u64)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT name, generation FROM nodes WHERE name = ANY($1)")
            .bind(nodes)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|(n, g)| (n, u(g))).collect())
    }

    /// The database's now (ms) and the certificates retired at or after `since` (None: in the
    /// last `overlap_ms` before now), as (node, retired at).
    pub async fn retired_certs(&self, since: Option<i64>, overlap_ms: i64) -> Result<(i64, Vec<(String, i64)>)> {
        let rows: Vec<(i64, Option<String>, Option<i64>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "WITH t AS (SELECT {} AS now_ms)
             SELECT t.now_ms, r.node, r.at FROM t
             LEFT JOIN cert_retired r ON r.at >= COALESCE($1, t.now_ms - $2)",
            super::pg::PG_NOW_MS
        )))
        .bind(since)
        .bind(overlap_ms)
        .fetch_all(&self.pool)
        .await?;
        let now = rows.first().map_or(0, |r| r.0);
        Ok((now, rows.into_iter().filter_map(|(_, n, at)| Some((n?, at?))).collect()))
    }

    /// Remove retired-certificate rows older than `kept_ms` before the database's now.
    pub async fn retired_forget(&self, kept_ms: i64) -> Result<()> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM cert_retired WHERE at < {} - $1",
            super::pg::PG_NOW_MS
        )))
        .bind(kept_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Store a request of `kind` (`logs`, `vitals`) for `node`, as JSON.
    pub async fn relay_put(&self, kind: &str, id: &str, node: &str, request: &str, now: UnixMs) -> Result<()> {
        sqlx::query(
            "INSERT INTO relays (id, kind, node, request, taken, created_at) VALUES ($1, $2, $3, $4, FALSE, $5)",
        )
        .bind(id)
        .bind(kind)
        .bind(node)
        .bind(request)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Hand out the pending requests of `nodes` (the group of sync reads that asks), per node
    /// (kind, request JSON) in the order they were made, each once whichever replica asks.
    pub async fn relay_take(&self, nodes: &[&str]) -> Result<HashMap<String, Vec<(String, String)>>> {
        let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
            "UPDATE relays SET taken = TRUE WHERE node = ANY($1) AND NOT taken RETURNING node, kind, request, created_at",
        )
        .bind(nodes)
        .fetch_all(&self.pool)
        .await?;
        Ok(by_node(rows, |(n, k, r, at)| (n, (k, r), at)))
    }

    /// Which of these nodes have requests not yet handed out.
    pub async fn relay_pending(&self, nodes: &[String]) -> Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT DISTINCT node FROM relays WHERE NOT taken AND node = ANY($1)")
                .bind(nodes)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Store `node`'s answer to its request `id`; false when there is no such request for this
    /// node (expired, answered already, or another node's).
    pub async fn relay_answer(&self, kind: &str, node: &str, id: &str, answer: &str) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE relays SET answer = $4, taken = TRUE WHERE id = $1 AND kind = $2 AND node = $3 AND answer IS NULL",
        )
        .bind(id)
        .bind(kind)
        .bind(node)
        .bind(answer)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n > 0)
    }

    /// The answers stored for these request ids: (id, answer JSON).
    pub async fn relay_answers(&self, ids: &[String]) -> Result<Vec<(String, String)>> {
        Ok(
            sqlx::query_as("SELECT id, answer FROM relays WHERE id = ANY($1) AND answer IS NOT NULL")
                .bind(ids)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Forget these requests (answered, or their operator stopped waiting), and every request
    /// older than [`RELAY_KEPT_MS`].
    pub async fn relay_forget(&self, ids: &[String], now: UnixMs) -> Result<()> {
        sqlx::query("DELETE FROM relays WHERE id = ANY($1) OR created_at < $2")
            .bind(ids)
            .bind(now - RELAY_KEPT_MS)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// Rows of many nodes, split by node, each node's in the order of their time.
pub(super) fn by_node<R, T>(rows: Vec<R>, split: impl Fn(R) -> (String, T, i64)) -> HashMap<String, Vec<T>> {
    let mut out: HashMap<String, Vec<(i64, T)>> = HashMap::new();
    for row in rows {
        let (node, item, at) = split(row);
        out.entry(node).or_default().push((at, item));
    }
    out.into_iter()
        .map(|(node, mut items)| {
            items.sort_by_key(|(at, _)| *at);
            (node, items.into_iter().map(|(_, item)| item).collect())
        })
        .collect()
}
