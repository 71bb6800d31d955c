//! Log requests from operators to nodes, through the node's own outbound link.
//!
//! The hub cannot reach an agent, so `GET /v1/logs?node=..&workload=..` parks a
//! [`LogRequest`] for the node, wakes the node's sync long-poll (the answer carries
//! `log_requests`), and waits for the agent to POST the data to
//! `/v1/nodes/{node}/logs/{id}` (mTLS; a node may only answer requests addressed to it). Requests
//! live in memory only: an operator waits seconds, not across hub restarts.
//!
//! Must never: hold a request longer than its deadline, or hand a node another node's request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::Json;
use outpost_api::{ErrorAck, ErrorBatch, LogData, LogRequest, StoredErrorLine};
use serde::Deserialize;
use tokio::sync::oneshot;

use crate::alerts::mdb;
use crate::api::authorize_node;
use crate::error::{human_duration, HubError};
use crate::files::random_hex;
use crate::scheduler::is_online;
use crate::server::{Admin, ApiJson, ApiQuery, Peer};
use crate::state::HubState;

#[derive(Default)]
pub struct LogBroker {
    /// Requests not yet handed to their node.
    pending: Mutex<HashMap<String, Vec<LogRequest>>>,
    /// Requests handed out or pending, by id: (node, where to deliver the answer).
    waiting: Mutex<HashMap<String, (String, oneshot::Sender<LogData>)>>,
}

impl LogBroker {
    /// Park a request for `node`; the receiver gets the agent's answer.
    pub fn submit(&self, node: &str, req: LogRequest) -> oneshot::Receiver<LogData> {
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(req.id.clone(), (node.to_string(), tx));
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(node.to_string())
            .or_default()
            .push(req);
        rx
    }

    pub fn has_pending(&self, node: &str) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .is_some_and(|v| !v.is_empty())
    }

    /// Hand the node its pending requests (once).
    pub fn take(&self, node: &str) -> Vec<LogRequest> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node)
            .unwrap_or_default()
    }

    /// Deliver an answer. False when there is no such request for this node (unknown id,
    /// expired, or addressed to another node).
    pub fn complete(&self, node: &str, id: &str, data: LogData) -> bool {
        let mut w = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        match w.get(id) {
            Some((n, _)) if n == node => {}
            _ => return false,
        }
        let Some((_, tx)) = w.remove(id) else { return false };
        tx.send(data).is_ok()
    }

    /// Forget a request whose operator stopped waiting.
    pub fn cancel(&self, node: &str, id: &str) {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        if let Some(v) = self.pending.lock().unwrap_or_else(|p| p.into_inner()).get_mut(node) {
            v.retain(|r| r.id != id);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Routes

#[derive(Deserialize)]
pub struct LogsQuery {
    node: String,
    workload: String,
    #[serde(default)]
    container: Option<String>,
    #[serde(default)]
    tail: Option<u32>,
    #[serde(default)]
    since_secs: Option<u64>,
    #[serde(default)]
    from_offset: Option<u64>,
}

/// `GET /v1/logs?node=&workload=[&container=&tail=&since_secs=&from_offset=]` (admin): relay a
/// log request to the node and wait for its answer.
pub async fn get_logs(
    State(st): State<Arc<HubState>>,
    _: Admin,
    ApiQuery(q): ApiQuery<LogsQuery>,
) -> Result<Json<LogData>, HubError> {
    let n = q.node.clone();
    let row = st
        .db(move |s| s.node(&n))
        .await?
        .ok_or_else(|| HubError::NotFound(format!("node {}", q.node)))?;
    let now = crate::now_ms();
    let failed = || st.monitor.metrics.log_requests_failed.inc();
    if !is_online(&row, st.offline_after, now) {
        failed();
        return Err(HubError::NodeUnreachable(format!(
            "node {} is offline (last contact {} ago): logs travel over the node's own link, so try again once it is back (`outpost get nodes`); forwarded errors are here already: `outpost logs --errors {}`",
            q.node,
            human_duration(now - row.last_contact()),
            q.node
        )));
    }
    let req = LogRequest {
        id: random_hex(8),
        workload: q.workload.clone(),
        container: q.container,
        tail: q.tail,
        since_secs: q.since_secs,
        from_offset: q.from_offset,
    };
    let id = req.id.clone();
    let rx = st.monitor.logs.submit(&q.node, req);
    st.wake(&q.node);
    match tokio::time::timeout(st.monitor.cfg.log_wait, rx).await {
        Ok(Ok(data)) => {
            st.monitor.metrics.log_requests_ok.inc();
            tracing::debug!(node = %q.node, workload = %q.workload, bytes = data.text.len(), "log request answered");
            Ok(Json(data))
        }
        _ => {
            st.monitor.logs.cancel(&q.node, &id);
            failed();
            tracing::warn!(node = %q.node, workload = %q.workload, "log request not answered in time");
            Err(HubError::NodeUnreachable(format!(
                "node {} did not answer within {}s; its link may be slow or just dropped: retry, and check `outpost describe node {}`",
                q.node,
                st.monitor.cfg.log_wait.as_secs(),
                q.node
            )))
        }
    }
}

/// `POST /v1/nodes/{node}/logs/{id}` (mTLS): the node's answer to one of its own requests.
pub async fn node_logs(
    State(st): State<Arc<HubState>>,
    peer: Peer,
    Path((node, id)): Path<(String, String)>,
    ApiJson(data): ApiJson<LogData>,
) -> Result<Json<serde_json::Value>, HubError> {
    authorize_node(&st, &peer, &node).await?;
    if !st.monitor.logs.complete(&node, &id, data) {
        return Err(HubError::NotFound(format!(
            "log request {id} for node {node} (it expired, or was never addressed to this node)"
        )));
    }
    Ok(Json(serde_json::json!({})))
}

/// `POST /v1/nodes/{node}/errors` (mTLS): forwarded error lines.
pub async fn node_errors(
    State(st): State<Arc<HubState>>,
    peer: Peer,
    Path(node): Path<String>,
    ApiJson(batch): ApiJson<ErrorBatch>,
) -> Result<Json<ErrorAck>, HubError> {
    authorize_node(&st, &peer, &node).await?;
    let (n, lines) = (node.clone(), batch.lines.len());
    let acked = mdb(&st, move |m| m.store_errors(&n, &batch, crate::now_ms())).await?;
    tracing::debug!(node = %node, lines, acked, "error lines stored");
    Ok(Json(ErrorAck { acked }))
}

#[derive(Deserialize)]
pub struct ErrorsQuery {
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    workload: Option<String>,
    #[serde(default)]
    since_secs: Option<u64>,
    #[serde(default)]
    limit: Option<u32>,
}

/// `GET /v1/errors[?node=&workload=&since_secs=&limit=]` (admin): forwarded error lines, oldest
/// first.
pub async fn get_errors(
    State(st): State<Arc<HubState>>,
    _: Admin,
    ApiQuery(q): ApiQuery<ErrorsQuery>,
) -> Result<Json<Vec<StoredErrorLine>>, HubError> {
    let since = q.since_secs.map_or(0, |s| outpost_api::ms_before(crate::now_ms(), s));
    let limit = q.limit.unwrap_or(1000).min(10_000);
    let lines = mdb(&st, move |m| {
        m.errors(q.node.as_deref(), q.workload.as_deref(), since, limit)
    })
    .await?;
    Ok(Json(lines))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: &str) -> LogRequest {
        LogRequest {
            id: id.into(),
            workload: "daemonset/default/a".into(),
            container: None,
            tail: None,
            since_secs: None,
            from_offset: None,
        }
    }

    #[test]
    fn a_node_answers_only_its_own_requests() {
        let b = LogBroker::default();
        let mut rx = b.submit("n1", req("r1"));
        assert!(b.has_pending("n1") && !b.has_pending("n2"));
        assert_eq!(b.take("n1").len(), 1);
        assert!(b.take("n1").is_empty(), "handed out once");
        assert!(
            !b.complete("n2", "r1", LogData::default()),
            "another node cannot answer"
        );
        assert!(rx.try_recv().is_err());
        assert!(b.complete(
            "n1",
            "r1",
            LogData {
                text: "hi".into(),
                ..Default::default()
            }
        ));
        assert_eq!(rx.try_recv().unwrap().text, "hi");
        assert!(!b.complete("n1", "r1", LogData::default()), "answered once");
        let _rx = b.submit("n1", req("r2"));
        b.cancel("n1", "r2");
        assert!(!b.has_pending("n1"));
    }
}
