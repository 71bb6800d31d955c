//! The hub as a pipeline sink (docs/pipeline.md): the records nodes POST
//! (`/v1/nodes/{node}/data`, zstd-compressed JSON over the node's mTLS link), stored so that
//! each record id is kept once per node (redelivery after a crash or an outage is harmless),
//! read back by operators (`GET /v1/data`, `outpost data tail|query`) and pruned after the
//! retention of their pipeline's hub sink (default 7 days; the `data-retention` controller).
//!
//! Also caches the `Pipeline` objects for their sinks' retention; the service refreshes the
//! cache after every reschedule. (Nodes get pipelines as revisions in their desired state,
//! rolled out like workloads: `outpost_core::render::render_pipeline`.)
//!
//! The records live behind `crate::store::records::RecordStore`: on SQLite, the table
//! `data_records` on its own connection to hub.db ([`SqliteRecords`], called on the blocking
//! pool); on PostgreSQL, the same table in the shared database, so every replica reads what any
//! of them stored.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_api::pipeline::{DataRecord, Pipeline, RecordKind, StoredRecord};
use outpost_api::UnixMs;
use rusqlite::{params, Connection};

/// Largest decompressed batch the hub takes (`POST /v1/nodes/{node}/data`).
pub const MAX_BATCH_BYTES: usize = 64 << 20;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS data_records (
    cursor INTEGER PRIMARY KEY AUTOINCREMENT, node TEXT NOT NULL, id TEXT NOT NULL,
    pipeline TEXT NOT NULL, stream TEXT NOT NULL, at INTEGER NOT NULL, kind TEXT NOT NULL,
    rules TEXT NOT NULL, key TEXT, data TEXT NOT NULL, received_at INTEGER NOT NULL,
    UNIQUE (node, id));
CREATE INDEX IF NOT EXISTS data_records_stream ON data_records (stream, cursor);
CREATE INDEX IF NOT EXISTS data_records_received ON data_records (pipeline, received_at);
";

/// The pipeline records (on either backend) and the cached Pipeline objects.
pub struct DataStore {
    records: Arc<dyn crate::store::RecordStore>,
    /// Pipeline objects with their revisions, as last loaded.
    pipelines: Mutex<Vec<(Pipeline, u64)>>,
}

/// The `data_records` table on SQLite (hub.db).
pub struct SqliteRecords {
    conn: Mutex<Connection>,
}

/// What `GET /v1/data` asks for.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct DataQuery {
    pub stream: Option<String>,
    pub node: Option<String>,
    pub pipeline: Option<String>,
    pub kind: Option<String>,
    /// Only records that reached the node in the last N seconds.
    pub since_secs: Option<u64>,
    /// Only records stored after this cursor (follow).
    pub after: Option<i64>,
    /// The newest N (default 100, at most 10,000), oldest first.
    pub limit: Option<u32>,
}

type R<T> = Result<T, rusqlite::Error>;

impl DataStore {
    /// Records on SQLite, in the hub's database file.
    pub fn open(path: &Path) -> R<Self> {
        Ok(Self::on(Arc::new(crate::store::records::SqliteRecordStore(Arc::new(
            SqliteRecords::open(path)?,
        )))))
    }

    /// Records on any backend.
    pub fn on(records: Arc<dyn crate::store::RecordStore>) -> Self {
        Self {
            records,
            pipelines: Mutex::new(Vec::new()),
        }
    }

    pub fn in_memory() -> Self {
        Self::open(Path::new(":memory:")).expect("in-memory SQLite")
    }

    /// Store a batch in one transaction; returns how many ids were new.
    pub async fn insert(&self, node: &str, records: &[DataRecord], now: UnixMs) -> crate::store::Result<u64> {
        self.records.insert(node, records, now).await
    }

    pub async fn query(&self, q: &DataQuery, now: UnixMs) -> crate::store::Result<Vec<StoredRecord>> {
        self.records.query(q, now).await
    }

    /// Delete records past their pipeline's retention. Returns how many went.
    pub async fn prune(&self, now: UnixMs) -> crate::store::Result<u64> {
        let retention = self.retention();
        self.records.prune(&retention, now).await
    }

    /// Each known pipeline's retention in seconds (the longest of its hub sinks).
    fn retention(&self) -> Vec<(String, u64)> {
        self.pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(p, _)| {
                let secs = p
                    .spec
                    .sinks
                    .iter()
                    .filter(|s| s.type_ == "hub")
                    .map(|s| s.retention_secs())
                    .max()
                    .unwrap_or(outpost_api::pipeline::DEFAULT_RETENTION_SECS);
                (p.metadata.name.clone(), secs)
            })
            .collect()
    }

    /// Replace the pipelines.
    pub fn set_pipelines(&self, p: Vec<(Pipeline, u64)>) {
        *self.pipelines.lock().unwrap_or_else(|x| x.into_inner()) = p;
    }
}

impl SqliteRecords {
    pub fn open(path: &Path) -> R<Self> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // Writers take the write lock up front, so a busy database waits instead of failing.
        conn.set_transaction_behavior(rusqlite::TransactionBehavior::Immediate);
        conn.execute_batch(SCHEMA)?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Store a batch in one transaction; returns how many ids were new.
    pub fn insert(&self, node: &str, records: &[DataRecord], now: UnixMs) -> R<u64> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let mut stored = 0;
        {
            let mut st = tx.prepare_cached(
                "INSERT OR IGNORE INTO data_records (node, id, pipeline, stream, at, kind, rules, key, data, received_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?;
            for r in records {
                stored += st.execute(params![
                    node,
                    r.id,
                    r.pipeline,
                    r.stream,
                    r.at,
                    r.kind.as_str(),
                    serde_json::to_string(&r.rules).unwrap_or_default(),
                    r.key,
                    r.data.to_string(),
                    now
                ])? as u64;
            }
        }
        tx.commit()?;
        Ok(stored)
    }

    pub fn query(&self, q: &DataQuery, now: UnixMs) -> R<Vec<StoredRecord>> {
        let c = self.lock();
        let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
        let since = q.since_secs.map(|s| outpost_api::ms_before(now, s));
        // With `after` (follow): the oldest records after it; otherwise the newest `limit`.
        let order = if q.after.is_some() { "ASC" } else { "DESC" };
        let sql = format!(
            "SELECT cursor, node, id, pipeline, stream, at, kind, rules, key, data FROM data_records
             WHERE (?1 IS NULL OR stream = ?1) AND (?2 IS NULL OR node = ?2) AND (?3 IS NULL OR pipeline = ?3)
               AND (?4 IS NULL OR kind = ?4) AND (?5 IS NULL OR at >= ?5) AND (?6 IS NULL OR cursor > ?6)
             ORDER BY cursor {order} LIMIT ?7"
        );
        let mut st = c.prepare(&sql)?;
        let mut out = st
            .query_map(
                params![q.stream, q.node, q.pipeline, q.kind, since, q.after, limit],
                |r| {
                    let rules: String = r.get(7)?;
                    let data: String = r.get(9)?;
                    let kind: String = r.get(6)?;
                    Ok(StoredRecord {
                        cursor: r.get(0)?,
                        node: r.get(1)?,
                        record: DataRecord {
                            id: r.get(2)?,
                            pipeline: r.get(3)?,
                            stream: r.get(4)?,
                            at: r.get(5)?,
                            kind: RecordKind::parse(&kind).unwrap_or(RecordKind::Record),
                            rules: serde_json::from_str(&rules).unwrap_or_default(),
                            key: r.get(8)?,
                            data: serde_json::from_str(&data).unwrap_or(serde_json::Value::Null),
                        },
                    })
                },
            )?
            .collect::<R<Vec<_>>>()?;
        if q.after.is_none() {
            out.reverse();
        }
        Ok(out)
    }

    /// Delete records past their pipeline's retention (name, seconds; others: the default).
    /// Returns how many went.
    pub fn prune(&self, retention: &[(String, u64)], now: UnixMs) -> R<u64> {
        let c = self.lock();
        let mut n = 0;
        for (name, secs) in retention {
            n += c.execute(
                "DELETE FROM data_records WHERE pipeline = ?1 AND received_at < ?2",
                params![name, outpost_api::ms_before(now, *secs)],
            )? as u64;
        }
        // Records of pipelines that no longer exist: the default retention.
        let names: Vec<String> = retention.iter().map(|r| r.0.clone()).collect();
        let cutoff = now - outpost_api::pipeline::DEFAULT_RETENTION_SECS as i64 * 1000;
        let mut st = c.prepare("SELECT DISTINCT pipeline FROM data_records WHERE received_at < ?1")?;
        let old: Vec<String> = st.query_map(params![cutoff], |r| r.get(0))?.collect::<R<_>>()?;
        for p in old.iter().filter(|p| !names.contains(p)) {
            n += c.execute(
                "DELETE FROM data_records WHERE pipeline = ?1 AND received_at < ?2",
                params![p, cutoff],
            )? as u64;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(id: &str, stream: &str, kind: RecordKind) -> DataRecord {
        DataRecord {
            id: id.into(),
            pipeline: "p".into(),
            stream: stream.into(),
            at: 5,
            kind,
            rules: vec![],
            key: None,
            data: json!({"v": id}),
        }
    }

    #[tokio::test]
    async fn each_id_is_stored_once_per_node_and_read_back_in_order() {
        let d = DataStore::in_memory();
        let batch = [
            rec("a-1-0", "s", RecordKind::Record),
            rec("a-2-0", "s", RecordKind::Anomaly),
        ];
        assert_eq!(d.insert("n1", &batch, 100).await.unwrap(), 2);
        assert_eq!(
            d.insert("n1", &batch, 101).await.unwrap(),
            0,
            "a redelivered batch stores nothing"
        );
        assert_eq!(d.insert("n2", &batch[..1], 102).await.unwrap(), 1, "ids are per node");
        let all = d.query(&DataQuery::default(), 200).await.unwrap();
        assert_eq!(all.len(), 3);
        assert!(all.windows(2).all(|w| w[0].cursor < w[1].cursor));
        let q = DataQuery {
            node: Some("n1".into()),
            kind: Some("anomaly".into()),
            ..Default::default()
        };
        let a = d.query(&q, 200).await.unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].record.id, "a-2-0");
        let after = d
            .query(
                &DataQuery {
                    after: Some(all[0].cursor),
                    limit: Some(1),
                    ..Default::default()
                },
                200,
            )
            .await
            .unwrap();
        assert_eq!(after[0].cursor, all[1].cursor);
    }

    #[tokio::test]
    async fn retention_prunes_by_pipeline() {
        let d = DataStore::in_memory();
        let p: Pipeline = serde_json::from_value(json!({
            "apiVersion": "outpost.dev/v1", "kind": "Pipeline", "metadata": {"name": "p"},
            "spec": {"streams": [], "sinks": [{"name": "hub", "type": "hub", "retention": "1h"}]}
        }))
        .unwrap();
        d.set_pipelines(vec![(p, 1)]);
        d.insert("n", &[rec("old", "s", RecordKind::Record)], 0).await.unwrap();
        d.insert("n", &[rec("new", "s", RecordKind::Record)], 3_500_000)
            .await
            .unwrap();
        assert_eq!(d.prune(3_600_001).await.unwrap(), 1);
        assert_eq!(d.query(&DataQuery::default(), 0).await.unwrap()[0].record.id, "new");
    }
}
