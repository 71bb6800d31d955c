//! Route handlers: each decodes its request into a [`Command`], a [`Query`] or a node-protocol
//! call, runs it on the [`Service`], and encodes the answer. No decisions and no storage here.
//! See docs/protocol.md and docs/openapi.yaml.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::header::{ACCEPT, CONTENT_ENCODING, CONTENT_TYPE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use outpost_api::pipeline::{DataAck, DataBatch};
use outpost_api::{
    ApplyRequest, ErrorAck, ErrorBatch, JoinRequest, JoinResponse, LogData, LogRequest, RenewRequest, RenewResponse,
    StatusAck, StatusWithVitals, TokenRequest, UndoRequest,
};
use serde::Deserialize;

use crate::data::{DataQuery, MAX_BATCH_BYTES};
use crate::error::HubError;
use crate::extract::{ApiJson, ApiQuery, Caller, Peer};
use crate::service::{object_id, Command, Held, Query, Reply, RolloutAction, Service};

type St = State<Arc<Service>>;
type Answer = Result<Reply, HubError>;

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        match self.to_json() {
            Ok(v) => Json(v).into_response(),
            Err(e) => HubError::Internal(format!("encoding the answer: {e}")).into_response(),
        }
    }
}

pub async fn ca(State(svc): St) -> Response {
    (
        [(CONTENT_TYPE, "application/x-pem-file")],
        svc.authority.ca.cert_pem.clone(),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------------
// Node protocol (mTLS)

pub async fn join(State(svc): St, ApiJson(req): ApiJson<JoinRequest>) -> Result<Json<JoinResponse>, HubError> {
    Ok(Json(svc.join(req).await?))
}

#[derive(Deserialize)]
pub struct SyncQuery {
    #[serde(default)]
    generation: u64,
    /// Hash of the alert policy the agent holds (monitoring-aware agents only).
    #[serde(default)]
    policy: Option<String>,
    /// Seconds the agent asks the hub to hold the long-poll (at most MAX_LONG_POLL_SECS).
    #[serde(default)]
    wait: Option<u64>,
    /// Seconds of idle time after which the agent probes this connection itself (TCP
    /// keepalive); the hub then watches for those probes instead of sending its own.
    #[serde(default)]
    ka: Option<u64>,
    /// Hash of the hub endpoints the agent holds (protocol 1.4 agents).
    #[serde(default)]
    hubs: Option<String>,
}

pub async fn sync(
    State(svc): St,
    peer: Peer,
    Path(node): Path<String>,
    ApiQuery(q): ApiQuery<SyncQuery>,
    ticket: Option<axum::Extension<crate::service::AdmitTicket>>,
) -> Result<Response, HubError> {
    if let (Some(ka), Some(l)) = (q.ka, &peer.liveness) {
        l.agent_probes(ka);
    }
    let held = Held {
        ticket: ticket.as_ref().map(|t| &t.0),
        policy: q.policy.as_deref(),
        wait: q.wait.map(std::time::Duration::from_secs),
        hubs: q.hubs.as_deref(),
    };
    Ok(match svc.sync(&peer, &node, q.generation, held).await? {
        Some(answer) => Json(answer).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

pub async fn status(
    State(svc): St,
    peer: Peer,
    Path(node): Path<String>,
    ApiJson(body): ApiJson<StatusWithVitals>,
) -> Result<Json<StatusAck>, HubError> {
    let events_acked = svc.status(&peer, &node, body).await?;
    Ok(Json(StatusAck { events_acked }))
}

pub async fn renew(
    State(svc): St,
    peer: Peer,
    Path(node): Path<String>,
    ApiJson(req): ApiJson<RenewRequest>,
) -> Result<Json<RenewResponse>, HubError> {
    let cert_pem = svc.renew(&peer, &node, req).await?;
    Ok(Json(RenewResponse { cert_pem }))
}

/// `POST /v1/nodes/{node}/errors` (mTLS): forwarded error lines.
pub async fn node_errors(
    State(svc): St,
    peer: Peer,
    Path(node): Path<String>,
    ApiJson(batch): ApiJson<ErrorBatch>,
) -> Result<Json<ErrorAck>, HubError> {
    let acked = svc.node_errors(&peer, &node, batch).await?;
    Ok(Json(ErrorAck { acked }))
}

/// `POST /v1/nodes/{node}/logs/{id}` (mTLS): the node's answer to one of its own requests.
pub async fn node_logs(
    State(svc): St,
    peer: Peer,
    Path((node, id)): Path<(String, String)>,
    ApiJson(data): ApiJson<LogData>,
) -> Result<Json<serde_json::Value>, HubError> {
    svc.node_logs(&peer, &node, &id, data).await?;
    Ok(Json(serde_json::json!({})))
}

/// `POST /v1/nodes/{node}/data` (mTLS): a batch of pipeline records, JSON, compressed with zstd
/// when `Content-Encoding: zstd`.
pub async fn node_data(
    State(svc): St,
    peer: Peer,
    Path(node): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<DataAck>, HubError> {
    let zstd = headers
        .get(CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("zstd"));
    let decode = || -> Result<DataBatch, HubError> {
        let json = if zstd {
            zstd::bulk::decompress(&body, MAX_BATCH_BYTES).map_err(|e| {
                HubError::BadRequest(format!(
                    "the body is not zstd data of at most {MAX_BATCH_BYTES} bytes ({e}); send smaller batches"
                ))
            })?
        } else {
            body.to_vec()
        };
        serde_json::from_slice(&json).map_err(|e| {
            HubError::BadRequest(format!(
                "the body is not a data batch ({e}); check that agent and hub are the same release"
            ))
        })
    };
    let stored = svc.node_data(&peer, &node, decode).await?;
    Ok(Json(DataAck { stored }))
}

// ---------------------------------------------------------------------------------------------
// Operator commands (a [`Caller`], checked and audited by `Service::execute_as`)

pub async fn create_token(State(svc): St, c: Caller, ApiJson(req): ApiJson<TokenRequest>) -> Answer {
    svc.execute_as(&c, Command::CreateToken(req)).await
}

/// `?force=true`: apply over objects a GitRepo owns (docs/gitops.md).
#[derive(Debug, Default, serde::Deserialize)]
pub struct ForceQuery {
    #[serde(default)]
    pub force: bool,
}

pub async fn apply(
    State(svc): St,
    c: Caller,
    ApiQuery(q): ApiQuery<ForceQuery>,
    ApiJson(req): ApiJson<ApplyRequest>,
) -> Answer {
    svc.execute_as(
        &c,
        Command::Apply {
            files: req.files,
            force: q.force,
        },
    )
    .await
}

pub async fn delete(State(svc): St, c: Caller, ApiJson(req): ApiJson<ApplyRequest>) -> Answer {
    svc.execute_as(&c, Command::Delete { files: req.files }).await
}

type ObjectPath = Path<(String, String, String)>;

pub async fn delete_object(State(svc): St, c: Caller, Path((kind, namespace, name)): ObjectPath) -> Answer {
    let id = object_id(&kind, namespace, name)?;
    svc.execute_as(&c, Command::DeleteObject { id }).await
}

pub async fn undo(
    State(svc): St,
    c: Caller,
    Path((kind, namespace, name)): ObjectPath,
    ApiJson(req): ApiJson<UndoRequest>,
) -> Answer {
    let id = object_id(&kind, namespace, name)?;
    svc.execute_as(
        &c,
        Command::Undo {
            id,
            to_revision: req.to_revision,
        },
    )
    .await
}

pub async fn delete_node(State(svc): St, c: Caller, Path(name): Path<String>) -> Answer {
    svc.execute_as(&c, Command::DeleteNode { name }).await
}

// ---------------------------------------------------------------------------------------------
// Operator queries (a [`Caller`], checked and filtered by `Service::query_as`)

pub async fn get_object(State(svc): St, c: Caller, Path((kind, namespace, name)): ObjectPath) -> Answer {
    let id = object_id(&kind, namespace, name)?;
    svc.query_as(&c, Query::Object { id }).await
}

pub async fn revisions(State(svc): St, c: Caller, Path((kind, namespace, name)): ObjectPath) -> Answer {
    let id = object_id(&kind, namespace, name)?;
    svc.query_as(&c, Query::Revisions { id }).await
}

pub async fn workloads(State(svc): St, c: Caller) -> Answer {
    svc.query_as(&c, Query::Workloads).await
}

pub async fn nodes(State(svc): St, c: Caller) -> Answer {
    svc.query_as(&c, Query::Nodes).await
}

pub async fn node(State(svc): St, c: Caller, Path(name): Path<String>) -> Answer {
    svc.query_as(&c, Query::Node { name }).await
}

#[derive(Deserialize)]
pub struct AlertsQuery {
    /// Include resolved alerts (kept 7 days).
    #[serde(default)]
    all: bool,
}

/// `GET /v1/alerts[?all=true]`.
pub async fn alerts(State(svc): St, c: Caller, ApiQuery(q): ApiQuery<AlertsQuery>) -> Answer {
    svc.query_as(&c, Query::Alerts { all: q.all }).await
}

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

/// `GET /v1/logs?node=&workload=[&container=&tail=&since_secs=&from_offset=]`: relay a log
/// request to the node and wait for its answer.
pub async fn logs(State(svc): St, c: Caller, ApiQuery(q): ApiQuery<LogsQuery>) -> Answer {
    let request = LogRequest {
        id: String::new(),
        workload: q.workload,
        container: q.container,
        tail: q.tail,
        since_secs: q.since_secs,
        from_offset: q.from_offset,
    };
    svc.query_as(&c, Query::Logs { node: q.node, request }).await
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

/// `GET /v1/errors[?node=&workload=&since_secs=&limit=]`: forwarded error lines, oldest first.
pub async fn errors(State(svc): St, c: Caller, ApiQuery(q): ApiQuery<ErrorsQuery>) -> Answer {
    svc.query_as(
        &c,
        Query::Errors {
            node: q.node,
            workload: q.workload,
            since_secs: q.since_secs,
            limit: q.limit,
        },
    )
    .await
}

/// `GET /metrics` (admin, or a `metrics`, `viewer` or `operator` account without a scope): OpenMetrics when the scraper
/// accepts it, else the Prometheus text format 0.0.4.
pub async fn metrics(State(svc): St, c: Caller, headers: HeaderMap) -> Result<Response, HubError> {
    let Reply::Fleet(f) = svc.query_as(&c, Query::Fleet).await? else {
        return Err(HubError::Internal("the fleet query answered something else".into()));
    };
    let accept: Vec<&str> = headers.get_all(ACCEPT).iter().filter_map(|v| v.to_str().ok()).collect();
    let (content_type, body) = crate::metrics::exposition(f, &svc.metrics, &accept);
    Ok(([(CONTENT_TYPE, content_type)], body).into_response())
}

// ---------------------------------------------------------------------------------------------
// Edge data pipeline (a [`Caller`])

/// `GET /v1/pipelines`: every Pipeline with its revision, streams, sinks and matching nodes.
pub async fn pipelines(State(svc): St, c: Caller) -> Answer {
    svc.query_as(&c, Query::Pipelines).await
}

/// `GET /v1/data?stream=&node=&pipeline=&kind=&since_secs=&after=&limit=`: stored records,
/// oldest first.
pub async fn data(State(svc): St, c: Caller, ApiQuery(q): ApiQuery<DataQuery>) -> Answer {
    svc.query_as(&c, Query::Data(q)).await
}

// ---------------------------------------------------------------------------------------------
// Rollouts (a [`Caller`])

/// `GET /v1/rollouts`: every workload's current (or last) rollout, without per-node lists.
pub async fn rollouts(State(svc): St, c: Caller) -> Answer {
    svc.query_as(&c, Query::Rollouts).await
}

/// `GET /v1/objects/{kind}/{namespace}/{name}/rollout`.
pub async fn rollout(State(svc): St, c: Caller, Path((kind, namespace, name)): ObjectPath) -> Answer {
    let id = object_id(&kind, namespace, name)?;
    svc.query_as(&c, Query::Rollout { id }).await
}

/// `POST /v1/objects/{kind}/{namespace}/{name}/rollout/{action}`: pause, resume, abort, undo.
pub async fn rollout_action(
    State(svc): St,
    c: Caller,
    Path((kind, namespace, name, action)): Path<(String, String, String, String)>,
) -> Answer {
    let id = object_id(&kind, namespace, name)?;
    let action = RolloutAction::parse(&action).ok_or_else(|| {
        HubError::BadRequest(format!(
            "{action:?} is not a rollout action: use pause, resume, abort or undo"
        ))
    })?;
    svc.execute_as(&c, Command::Rollout { id, action }).await
}
