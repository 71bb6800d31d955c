//! A node's own vitals history (docs/dashboard.md "Vitals history"), fetched through the node's
//! outbound link like a log read: `GET /v1/nodes/{node}/vitals?since=6h` parks a
//! [`VitalsRequest`] in `Links::vitals`, wakes the node's long-poll (its sync answer carries
//! `vitals_requests`, protocol 1.4), and waits for the agent's `POST
//! /v1/nodes/{node}/vitals/{id}` ([`VitalsHistory`], at most [`MAX_VITALS_POINTS`] points per
//! series: the agent downsamples with `outpost_core::vitals::history`).
//!
//! An offline node answers at once (409 `node_offline`, naming since when); an agent older than
//! 1.4 never answers, so the hub gives up after [`VITALS_WAIT`] (504 `node_unreachable`).
//!
//! Must never: keep a history itself (the hub's in-memory samples are `crate::dashboard::Live`),
//! or answer a node's POST for another node's request.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::Json;
use outpost_api::{human_duration, utc_time, VitalsHistory, VitalsRequest, MAX_VITALS_POINTS};
use serde::Deserialize;

use crate::error::HubError;
use crate::extract::{ApiJson, ApiQuery, Caller, Peer};
use crate::files::random_hex;
use crate::service::{now_ms, Query, Reply, Service};

type St = State<Arc<Service>>;

/// How long the hub waits for a node's history (at most the log-request wait): a connected
/// node answers in milliseconds; one that predates protocol 1.4 never does.
pub const VITALS_WAIT: Duration = Duration::from_secs(8);
/// How far back a history reaches: the agent keeps 24 h.
pub const MAX_SINCE_SECS: u64 = 24 * 3600;

#[derive(Debug, Deserialize)]
pub struct VitalsQuery {
    /// How far back, a duration (`90m`, `6h`; default and at most `24h`).
    #[serde(default)]
    since: Option<String>,
    /// Points per series (default and at most 300).
    #[serde(default)]
    points: Option<u32>,
}

/// `GET /v1/nodes/{node}/vitals[?since=&points=]` (viewer and up, the node in the caller's
/// scope): the node's own history, oldest first.
pub async fn get(
    State(svc): St,
    c: Caller,
    Path(node): Path<String>,
    ApiQuery(q): ApiQuery<VitalsQuery>,
) -> Result<Json<VitalsHistory>, HubError> {
    let since_secs = match q.since.as_deref() {
        None | Some("") => MAX_SINCE_SECS,
        Some(s) => outpost_api::parse_duration_secs(s)
            .map_err(|e| HubError::BadRequest(format!("since: {e}")))?
            .min(MAX_SINCE_SECS),
    };
    let points = match q.points {
        None => MAX_VITALS_POINTS,
        Some(p) if (1..=MAX_VITALS_POINTS).contains(&p) => p,
        Some(p) => {
            return Err(HubError::BadRequest(format!(
                "points: {p} is out of range; ask for 1 to {MAX_VITALS_POINTS}"
            )))
        }
    };
    // The node route checks role (viewer and up) and scope (out of scope reads as not found).
    let info = match svc.query_as(&c, Query::Node { name: node.clone() }).await? {
        Reply::Node(n) => n,
        _ => return Err(HubError::Internal("node query answered something else".into())),
    };
    let now = now_ms();
    if info.status != "Online" {
        let last = info.last_seen.unwrap_or(info.joined_at);
        return Err(HubError::NodeOffline(format!(
            "node {node} is offline since {} (last contact {} ago): its vitals history travels over the node's own link, so try again once it is back (`outpost get nodes`); the dashboard shows the samples the hub received meanwhile",
            utc_time(last),
            human_duration(now - last),
        )));
    }
    let req = VitalsRequest {
        id: random_hex(8),
        since: outpost_api::ms_before(now, since_secs),
        max_points: points,
    };
    let id = req.id.clone();
    let rx = svc.relay_vitals(&node, req).await?;
    let wait = VITALS_WAIT.min(svc.settings.monitor.log_wait);
    match tokio::time::timeout(wait, rx).await {
        Ok(Ok(h)) => {
            if let Some(e) = &h.error {
                tracing::warn!(node = %node, error = %e, "node could not read its vitals history");
                return Err(HubError::Internal(format!("node {node}: {e}")));
            }
            tracing::debug!(node = %node, points = h.points.len(), samples = h.samples, "vitals history answered");
            Ok(Json(h))
        }
        _ => {
            svc.cancel_vitals(&node, &id).await;
            tracing::warn!(node = %node, "vitals history request not answered in time");
            Err(HubError::NodeUnreachable(format!(
                "node {node} did not send its vitals history within {}s: its link may be slow or just dropped, or its agent predates protocol 1.4; retry, and check `outpost describe node {node}`",
                wait.as_secs(),
            )))
        }
    }
}

/// `POST /v1/nodes/{node}/vitals/{id}` (mTLS): the node's answer to one of its own requests.
pub async fn answer(
    State(svc): St,
    peer: Peer,
    Path((node, id)): Path<(String, String)>,
    ApiJson(h): ApiJson<VitalsHistory>,
) -> Result<Json<serde_json::Value>, HubError> {
    svc.authorize_node(&peer, &node).await?;
    if h.points.len() > MAX_VITALS_POINTS as usize {
        return Err(HubError::BadRequest(format!(
            "points: {} points, at most {MAX_VITALS_POINTS}",
            h.points.len()
        )));
    }
    if !svc
        .relay_complete(&svc.links.vitals, crate::service::RELAY_VITALS, &node, &id, h)
        .await?
    {
        return Err(HubError::NotFound(format!(
            "vitals request {id} for node {node} (it expired, or was never addressed to this node)"
        )));
    }
    Ok(Json(serde_json::json!({})))
}
