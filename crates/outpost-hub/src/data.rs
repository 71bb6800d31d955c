//! The hub as a pipeline sink (docs/pipeline.md): nodes POST batches of records
//! (`/v1/nodes/{node}/data`, zstd-compressed JSON over the node's mTLS link); each record id is
//! stored once per node, so redelivery after a crash or an outage is harmless. Operators read
//! them with `GET /v1/data` (`outpost data tail|query`). Records are kept for the retention of
//! their pipeline's hub sink (default 7 days).
//!
//! Also hands each node its pipelines in the sync answer: `Pipeline` objects whose
//! nodeSelector matches the node (`outpost_core::pipeline::pipelines_for_node`), sent when the
//! hash the agent holds differs; a change wakes every long-poll.
//!
//! Own tables (`data_records`) on their own connection to hub.db; must never block an async
//! task on SQLite (everything runs on the blocking pool).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use outpost_api::pipeline::{DataAck, DataBatch, DataRecord, NodePipelines, Pipeline, RecordKind, StoredRecord};
use outpost_api::{Object, UnixMs};
use rusqlite::{params, Connection};
use serde::Deserialize;
use tokio::sync::watch;

use crate::api::authorize_node;
use crate::error::HubError;
use crate::server::{Admin, ApiQuery, Peer};
use crate::state::HubState;

/// Largest decompressed batch.
const MAX_BATCH_BYTES: usize = 64 << 20;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS data_records (
    cursor INTEGER PRIMARY KEY AUTOINCREMENT, node TEXT NOT NULL, id TEXT NOT NULL,
    pipeline TEXT NOT NULL, stream TEXT NOT NULL, at INTEGER NOT NULL, kind TEXT NOT NULL,
    rules TEXT NOT NULL, key TEXT, data TEXT NOT NULL, received_at INTEGER NOT NULL,
    UNIQUE (node, id));
CREATE INDEX IF NOT EXISTS data_records_stream ON data_records (stream, cursor);
CREATE INDEX IF NOT EXISTS data_records_received ON data_records (pipeline, received_at);
";

pub struct DataStore {
    conn: Mutex<Connection>,
    /// Pipeline objects with their revisions, as last loaded.
    pipelines: Mutex<Vec<(Pipeline, u64)>>,
    /// Hash of the loaded set, to tell whether nodes must be woken.
    loaded_hash: Mutex<String>,
}

/// `GET /v1/data` parameters.
#[derive(Clone, Debug, Default, Deserialize)]
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
    pub fn open(path: &Path) -> R<Self> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn: Mutex::new(conn),
            pipelines: Mutex::new(Vec::new()),
            loaded_hash: Mutex::new(String::new()),
        })
    }

    pub fn in_memory() -> Self {
        Self::open(Path::new(":memory:")).expect("in-memory SQLite")
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

    /// Delete records past their pipeline's retention. Returns how many went.
    pub fn prune(&self, now: UnixMs) -> R<u64> {
        let retention: Vec<(String, u64)> = self
            .pipelines
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
            .collect();
        let c = self.lock();
        let mut n = 0;
        for (name, secs) in &retention {
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

    /// Replace the pipelines; true when they changed.
    pub fn set_pipelines(&self, p: Vec<(Pipeline, u64)>) -> bool {
        let hash = outpost_api::content_hash(&p.iter().map(|(p, r)| (&p.metadata, &p.spec, r)).collect::<Vec<_>>());
        let mut h = self.loaded_hash.lock().unwrap_or_else(|x| x.into_inner());
        *self.pipelines.lock().unwrap_or_else(|x| x.into_inner()) = p;
        let changed = *h != hash;
        *h = hash;
        changed
    }

    pub fn pipelines_for(&self, labels: &outpost_api::Labels) -> NodePipelines {
        let p = self.pipelines.lock().unwrap_or_else(|x| x.into_inner());
        outpost_core::pipeline::pipelines_for_node(&p, labels)
    }
}

async fn ddb<T, F>(st: &HubState, f: F) -> Result<T, HubError>
where
    T: Send + 'static,
    F: FnOnce(&DataStore) -> R<T> + Send + 'static,
{
    let d = st.data.clone();
    tokio::task::spawn_blocking(move || f(&d))
        .await
        .map_err(|e| HubError::Internal(format!("data task failed: {e}")))?
        .map_err(|e| HubError::Internal(format!("data database: {e}")))
}

/// Reload Pipeline objects after a change; wake every long-poll when they changed.
pub async fn refresh_pipelines(st: &HubState) -> Result<(), HubError> {
    let objects = st.db(|s| s.objects()).await?;
    let mut p: Vec<(Pipeline, u64)> = objects
        .into_iter()
        .filter_map(|o| match o.object {
            Object::Pipeline(p) => Some((p, o.revision)),
            _ => None,
        })
        .collect();
    p.sort_by(|a, b| (a.0.metadata.ns(), &a.0.metadata.name).cmp(&(b.0.metadata.ns(), &b.0.metadata.name)));
    if st.data.set_pipelines(p) {
        tracing::info!("pipelines changed; waking every node");
        st.wake_all();
    }
    Ok(())
}

/// The node's pipelines for its sync answer, when they differ from the hash it holds (agents
/// that send no hash get none).
pub async fn sync_pipelines(
    st: &HubState,
    node: &str,
    agent_hash: Option<&str>,
) -> Result<Option<NodePipelines>, HubError> {
    let Some(h) = agent_hash else { return Ok(None) };
    let n = node.to_string();
    let labels = st.db(move |s| s.node(&n)).await?.map(|r| r.labels).unwrap_or_default();
    let p = st.data.pipelines_for(&labels);
    Ok((p.hash() != h).then_some(p))
}

/// `POST /v1/nodes/{node}/data`: a batch of records from the node's spool.
pub async fn node_data(
    State(st): State<Arc<HubState>>,
    peer: Peer,
    axum::extract::Path(node): axum::extract::Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<DataAck>, HubError> {
    authorize_node(&st, &peer, &node).await?;
    let zstd = headers
        .get(axum::http::header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("zstd"));
    let json = if zstd {
        zstd::bulk::decompress(&body, MAX_BATCH_BYTES).map_err(|e| {
            HubError::BadRequest(format!(
                "the body is not zstd data of at most {MAX_BATCH_BYTES} bytes ({e}); send smaller batches"
            ))
        })?
    } else {
        body.to_vec()
    };
    let batch: DataBatch = serde_json::from_slice(&json).map_err(|e| {
        HubError::BadRequest(format!(
            "the body is not a data batch ({e}); check that agent and hub are the same release"
        ))
    })?;
    let now = crate::now_ms();
    let n = batch.records.len();
    let nd = node.clone();
    let stored = ddb(&st, move |d| d.insert(&nd, &batch.records, now)).await?;
    tracing::debug!(node = %node, records = n, stored, "pipeline records stored");
    Ok(Json(DataAck { stored }))
}

/// `GET /v1/data`: stored records, oldest first.
pub async fn get_data(
    State(st): State<Arc<HubState>>,
    _: Admin,
    ApiQuery(q): ApiQuery<DataQuery>,
) -> Result<Json<Vec<StoredRecord>>, HubError> {
    if let Some(k) = &q.kind {
        if RecordKind::parse(k).is_none() {
            return Err(HubError::BadRequest(format!(
                "kind {k:?} is not one of record, anomaly, aggregate, sample"
            )));
        }
    }
    let now = crate::now_ms();
    Ok(Json(ddb(&st, move |d| d.query(&q, now)).await?))
}

/// `GET /v1/pipelines`: every Pipeline with the nodes that run it.
pub async fn get_pipelines(
    State(st): State<Arc<HubState>>,
    _: Admin,
) -> Result<Json<Vec<outpost_api::pipeline::PipelineInfo>>, HubError> {
    let (objects, nodes) = st.db(|s| Ok((s.objects()?, s.nodes()?))).await?;
    let out = objects
        .into_iter()
        .filter_map(|o| match o.object {
            Object::Pipeline(p) => Some(outpost_api::pipeline::PipelineInfo {
                namespace: p.metadata.ns().to_string(),
                name: p.metadata.name.clone(),
                revision: o.revision,
                nodes: nodes
                    .iter()
                    .filter(|n| outpost_core::schedule::selector_matches(&p.spec.node_selector, &n.labels))
                    .map(|n| n.name.clone())
                    .collect(),
                node_selector: p.spec.node_selector,
                streams: p.spec.streams.iter().map(|s| s.name.clone()).collect(),
                sinks: p
                    .spec
                    .sinks
                    .iter()
                    .map(|s| format!("{} ({})", s.name, s.type_))
                    .collect(),
                updated_at: o.updated_at,
            }),
            _ => None,
        })
        .collect();
    Ok(Json(out))
}

/// Prune expired records every minute until `stop`.
pub async fn retention_loop(st: Arc<HubState>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            _ = stop.changed() => return,
        }
        match ddb(&st, |d| d.prune(crate::now_ms())).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(records = n, "pruned pipeline records past their retention"),
            Err(e) => tracing::warn!(error = %e, "cannot prune pipeline records"),
        }
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

    #[test]
    fn each_id_is_stored_once_per_node_and_read_back_in_order() {
        let d = DataStore::in_memory();
        let batch = [
            rec("a-1-0", "s", RecordKind::Record),
            rec("a-2-0", "s", RecordKind::Anomaly),
        ];
        assert_eq!(d.insert("n1", &batch, 100).unwrap(), 2);
        assert_eq!(
            d.insert("n1", &batch, 101).unwrap(),
            0,
            "a redelivered batch stores nothing"
        );
        assert_eq!(d.insert("n2", &batch[..1], 102).unwrap(), 1, "ids are per node");
        let all = d.query(&DataQuery::default(), 200).unwrap();
        assert_eq!(all.len(), 3);
        assert!(all.windows(2).all(|w| w[0].cursor < w[1].cursor));
        let q = DataQuery {
            node: Some("n1".into()),
            kind: Some("anomaly".into()),
            ..Default::default()
        };
        let a = d.query(&q, 200).unwrap();
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
            .unwrap();
        assert_eq!(after[0].cursor, all[1].cursor);
    }

    #[test]
    fn retention_prunes_by_pipeline() {
        let d = DataStore::in_memory();
        let p: Pipeline = serde_json::from_value(json!({
            "apiVersion": "outpost.dev/v1", "kind": "Pipeline", "metadata": {"name": "p"},
            "spec": {"streams": [], "sinks": [{"name": "hub", "type": "hub", "retention": "1h"}]}
        }))
        .unwrap();
        assert!(d.set_pipelines(vec![(p.clone(), 1)]));
        assert!(!d.set_pipelines(vec![(p, 1)]), "same set: no wake-up");
        d.insert("n", &[rec("old", "s", RecordKind::Record)], 0).unwrap();
        d.insert("n", &[rec("new", "s", RecordKind::Record)], 3_500_000)
            .unwrap();
        assert_eq!(d.prune(3_600_001).unwrap(), 1);
        assert_eq!(d.query(&DataQuery::default(), 0).unwrap()[0].record.id, "new");
    }
}
