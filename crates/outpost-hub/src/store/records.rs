//! Pipeline records (`crate::data`) behind one async interface, [`RecordStore`]: on SQLite the
//! `data_records` table of hub.db ([`SqliteRecordStore`], the blocking pool), on PostgreSQL the
//! same table in the shared database ([`PgRecords`], migration 4), so every replica reads the
//! records any of them stored. Both keep each record id once per node (a redelivered batch
//! stores nothing new) and hand out cursors in the order records arrived.

use std::sync::Arc;

use outpost_api::pipeline::{DataRecord, RecordKind, StoredRecord};
use outpost_api::UnixMs;
use sqlx::PgPool;

use super::{Result, StoreError};
use crate::data::{DataQuery, SqliteRecords};

#[async_trait::async_trait]
pub trait RecordStore: Send + Sync + 'static {
    /// Store a batch in one transaction; returns how many ids were new.
    async fn insert(&self, node: &str, records: &[DataRecord], now: UnixMs) -> Result<u64>;
    async fn query(&self, q: &DataQuery, now: UnixMs) -> Result<Vec<StoredRecord>>;
    /// Delete records past their pipeline's retention (name, seconds); records of pipelines not
    /// listed go after the default retention. Returns how many went.
    async fn prune(&self, retention: &[(String, u64)], now: UnixMs) -> Result<u64>;
}

/// [`RecordStore`] on SQLite.
pub struct SqliteRecordStore(pub Arc<SqliteRecords>);

impl SqliteRecordStore {
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&SqliteRecords) -> std::result::Result<T, rusqlite::Error> + Send + 'static,
    ) -> Result<T> {
        let a = self.0.clone();
        tokio::task::spawn_blocking(move || f(&a))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
            .map_err(StoreError::from)
    }
}

#[async_trait::async_trait]
impl RecordStore for SqliteRecordStore {
    async fn insert(&self, node: &str, records: &[DataRecord], now: UnixMs) -> Result<u64> {
        let (n, r) = (node.to_string(), records.to_vec());
        self.run(move |d| d.insert(&n, &r, now)).await
    }
    async fn query(&self, q: &DataQuery, now: UnixMs) -> Result<Vec<StoredRecord>> {
        let q = q.clone();
        self.run(move |d| d.query(&q, now)).await
    }
    async fn prune(&self, retention: &[(String, u64)], now: UnixMs) -> Result<u64> {
        let r = retention.to_vec();
        self.run(move |d| d.prune(&r, now)).await
    }
}

/// [`RecordStore`] on PostgreSQL.
pub struct PgRecords {
    pool: PgPool,
}

impl PgRecords {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

type RecordRow = (
    i64,
    String,
    String,
    String,
    String,
    i64,
    String,
    String,
    Option<String>,
    String,
);

#[async_trait::async_trait]
impl RecordStore for PgRecords {
    async fn insert(&self, node: &str, records: &[DataRecord], now: UnixMs) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let mut stored = 0;
        for r in records {
            stored += sqlx::query(
                r#"INSERT INTO data_records (node, id, pipeline, stream, at, kind, rules, key, data, received_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (node, id) DO NOTHING"#,
            )
            .bind(node)
            .bind(&r.id)
            .bind(&r.pipeline)
            .bind(&r.stream)
            .bind(r.at)
            .bind(r.kind.as_str())
            .bind(serde_json::to_string(&r.rules).unwrap_or_default())
            .bind(&r.key)
            .bind(r.data.to_string())
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(stored)
    }

    async fn query(&self, q: &DataQuery, now: UnixMs) -> Result<Vec<StoredRecord>> {
        let limit = i64::from(q.limit.unwrap_or(100).clamp(1, 10_000));
        let since = q.since_secs.map(|s| outpost_api::ms_before(now, s));
        let order = if q.after.is_some() { "ASC" } else { "DESC" };
        let sql = format!(
            r#"SELECT "cursor", node, id, pipeline, stream, at, kind, rules, key, data FROM data_records
               WHERE ($1::TEXT IS NULL OR stream = $1) AND ($2::TEXT IS NULL OR node = $2)
                 AND ($3::TEXT IS NULL OR pipeline = $3) AND ($4::TEXT IS NULL OR kind = $4)
                 AND ($5::BIGINT IS NULL OR at >= $5) AND ($6::BIGINT IS NULL OR "cursor" > $6)
               ORDER BY "cursor" {order} LIMIT $7"#
        );
        let rows: Vec<RecordRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(&q.stream)
            .bind(&q.node)
            .bind(&q.pipeline)
            .bind(&q.kind)
            .bind(since)
            .bind(q.after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        let mut out: Vec<StoredRecord> = rows
            .into_iter()
            .map(|r| StoredRecord {
                cursor: r.0,
                node: r.1,
                record: DataRecord {
                    id: r.2,
                    pipeline: r.3,
                    stream: r.4,
                    at: r.5,
                    kind: RecordKind::parse(&r.6).unwrap_or(RecordKind::Record),
                    rules: serde_json::from_str(&r.7).unwrap_or_default(),
                    key: r.8,
                    data: serde_json::from_str(&r.9).unwrap_or(serde_json::Value::Null),
                },
            })
            .collect();
        if q.after.is_none() {
            out.reverse();
        }
        Ok(out)
    }

    async fn prune(&self, retention: &[(String, u64)], now: UnixMs) -> Result<u64> {
        let mut n = 0;
        for (name, secs) in retention {
            n += sqlx::query("DELETE FROM data_records WHERE pipeline = $1 AND received_at < $2")
                .bind(name)
                .bind(outpost_api::ms_before(now, *secs))
                .execute(&self.pool)
                .await?
                .rows_affected();
        }
        let names: Vec<String> = retention.iter().map(|r| r.0.clone()).collect();
        let cutoff = now - outpost_api::pipeline::DEFAULT_RETENTION_SECS as i64 * 1000;
        n += sqlx::query("DELETE FROM data_records WHERE received_at < $1 AND NOT (pipeline = ANY($2))")
            .bind(cutoff)
            .bind(&names)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n)
    }
}
