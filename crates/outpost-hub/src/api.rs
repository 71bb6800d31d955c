//! Route handlers: thin wrappers that authorize, call the store (on the blocking pool) and the
//! pure checks, reschedule after changes, and shape answers. See docs/protocol.md.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use outpost_api::{
    ApplyRequest, ApplyResponse, ApplyResult, DeleteResponse, JoinRequest, JoinResponse, JoinToken, Kind, NodeInfo,
    Object, ObjectId, Phase, Placement, RenewRequest, RenewResponse, RevisionInfo, Runtime, StatusAck, TokenRequest,
    TokenResponse, UndoRequest, UnixMs, WorkloadInfo, WorkloadStatus, PROCESS_RUNTIME,
};
use outpost_core::render::workload_key;
use outpost_core::schedule::selector_matches;
use serde::Deserialize;

use crate::error::{human_duration, HubError};
use crate::files::random_hex;
use crate::scheduler::{is_online, status_word, workload_view};
use crate::server::{Admin, ApiJson, ApiQuery, Peer};
use crate::state::{sha256_hex, HubState};
use crate::store::{check_token, DesiredRow, NewNode, NodeRow, StoredObject, TokenRow};
use crate::{now_ms, validate};

type St = State<Arc<HubState>>;

/// Events returned by `GET /v1/nodes/{node}`.
const NODE_EVENTS: u32 = 50;

pub async fn ca(State(st): St) -> Response {
    ([(CONTENT_TYPE, "application/x-pem-file")], st.ca.cert_pem.clone()).into_response()
}

/// A signed node certificate: PEM, fingerprint, expiry (unix ms).
fn sign(st: &HubState, csr_pem: &str, node: &str) -> Result<(String, String, UnixMs), HubError> {
    let cert_pem = st
        .ca
        .sign_node_csr(csr_pem, node, st.node_cert_lifetime)
        .map_err(|e| HubError::InvalidCsr(e.to_string()))?;
    let der = outpost_pki::pem_to_der(&cert_pem).map_err(|e| HubError::Internal(e.to_string()))?;
    let not_after = outpost_pki::not_after_unix(&cert_pem).map_err(|e| HubError::Internal(e.to_string()))?;
    Ok((outpost_pki::fingerprint(&der), cert_pem, not_after.saturating_mul(1000)))
}

/// Reschedule after a committed change. The change stands even if this fails (the next change
/// or the next hub start reschedules), so the failure is logged, not returned.
async fn reschedule_after_commit(st: &HubState, now: UnixMs) {
    if let Err(e) = st.reschedule_locked(now).await {
        tracing::error!(error = %e, "rescheduling after a change failed; the next change or hub restart retries");
    }
}

pub async fn join(State(st): St, ApiJson(req): ApiJson<JoinRequest>) -> Result<Json<JoinResponse>, HubError> {
    validate::node_name(&req.name)?;
    let now = now_ms();
    let secret_sha = sha256_hex(&req.token_secret);
    // Check the token before signing anything; the join transaction checks it again.
    let id = req.token_id.clone();
    let tok = st.db(move |s| s.token(&id)).await?;
    check_token(tok.as_ref(), &req.token_id, &secret_sha, now).map_err(|p| {
        tracing::warn!(node = %req.name, token = %req.token_id, problem = ?p, "join refused");
        HubError::Token(p)
    })?;
    if let Some(t) = &tok {
        outpost_core::link::node_labels(&req.name, &t.labels, &t.node_labels, &req.labels).map_err(|r| {
            tracing::warn!(node = %req.name, token = %req.token_id, problem = %r, "join refused: labels");
            HubError::Labels(r)
        })?;
    }
    let (cert_fp, cert_pem, cert_not_after) = sign(&st, &req.csr_pem, &req.name)?;
    let node = NewNode {
        name: req.name.clone(),
        labels: req.labels.clone(),
        cert_fp,
        cert_not_after,
    };
    let _guard = st.write_lock.lock().await;
    let token_id = req.token_id.clone();
    let labels = st.db(move |s| s.join(&token_id, &secret_sha, &node, now)).await?;
    tracing::info!(node = %req.name, token = %req.token_id, labels = ?labels, "node joined");
    reschedule_after_commit(&st, now).await;
    Ok(Json(JoinResponse {
        node: req.name,
        cert_pem,
        ca_pem: st.ca.cert_pem.clone(),
        labels,
    }))
}

/// The node the caller's certificate belongs to (current or just renewed), expired or not.
/// One indexed read, as every node request always made.
async fn cert_owner(st: &HubState, peer: &Peer) -> Result<String, HubError> {
    let fp = peer.cert_fp.clone().ok_or(HubError::NoClientCert)?;
    let owner = st
        .db(move |s| s.node_by_cert(&fp))
        .await?
        .ok_or(HubError::UnknownNode)?;
    if owner.promoted {
        tracing::info!(node = %owner.node, "node uses its renewed certificate; the previous one no longer works");
    }
    Ok(owner.node)
}

/// Refuse an expired certificate (only the renew route takes one).
fn unexpired(peer: &Peer, node: &str) -> Result<(), HubError> {
    match peer.expired_for(now_ms()) {
        Some(ago_ms) => Err(HubError::CertificateExpired {
            node: node.to_string(),
            ago_ms,
        }),
        None => Ok(()),
    }
}

/// The caller is a known node with an unexpired certificate: which one.
pub(crate) async fn known_node(st: &HubState, peer: &Peer) -> Result<String, HubError> {
    let node = cert_owner(st, peer).await?;
    unexpired(peer, &node)?;
    Ok(node)
}

/// The caller's certificate must belong to `node`.
async fn authorize_owner(st: &HubState, peer: &Peer, node: &str) -> Result<(), HubError> {
    let caller = cert_owner(st, peer).await?;
    if caller != node {
        tracing::warn!(caller = %caller, target = %node, "node asked for another node's state");
        return Err(HubError::Forbidden {
            caller,
            target: node.to_string(),
        });
    }
    Ok(())
}

/// The caller's unexpired certificate must belong to `node`.
pub(crate) async fn authorize_node(st: &HubState, peer: &Peer, node: &str) -> Result<(), HubError> {
    authorize_owner(st, peer, node).await?;
    unexpired(peer, node)
}

/// Record contact; a node back from Offline is logged and gets a reschedule (Deployments short
/// of replicas may now be placed on it).
async fn contact(st: &HubState, node: &str, now: UnixMs) -> Result<(), HubError> {
    let n = node.to_string();
    let prev = st.db(move |s| s.touch(&n, now)).await?.ok_or(HubError::UnknownNode)?;
    if now.saturating_sub(prev) > st.offline_after.as_millis() as i64 {
        tracing::info!(node = %node, offline_for = %human_duration(now - prev), "node online");
        st.reschedule(now).await?;
    }
    Ok(())
}

#[derive(Deserialize)]
pub struct SyncQuery {
    #[serde(default)]
    generation: u64,
    /// Hash of the alert policy the agent holds (monitoring-aware agents only).
    #[serde(default)]
    policy: Option<String>,
    /// Hash of the pipelines the agent holds (pipeline-aware agents only).
    #[serde(default)]
    pipelines: Option<String>,
}

pub async fn sync(
    State(st): St,
    peer: Peer,
    Path(node): Path<String>,
    ApiQuery(q): ApiQuery<SyncQuery>,
) -> Result<Response, HubError> {
    authorize_node(&st, &peer, &node).await?;
    contact(&st, &node, now_ms()).await?;
    // Subscribe before reading, so a change committed after the read still wakes us.
    let mut rx = st.subscribe(&node);
    let _connected = crate::metrics::LongPollGuard::new(st.monitor.metrics.clone());
    let deadline = tokio::time::Instant::now() + st.long_poll;
    loop {
        let (n, since) = (node.clone(), q.generation);
        let resp = st.db(move |s| s.sync(&n, since)).await?.ok_or(HubError::UnknownNode)?;
        // Monitoring additions: a changed alert policy, pending log requests (they wake us too).
        let (alert_policy, log_requests) = crate::alerts::sync_extras(&st, &node, q.policy.as_deref()).await?;
        let pipelines = crate::data::sync_pipelines(&st, &node, q.pipelines.as_deref()).await?;
        if resp.generation != since || alert_policy.is_some() || !log_requests.is_empty() || pipelines.is_some() {
            tracing::debug!(node = %node, since, generation = resp.generation, full = resp.full,
                policy = alert_policy.is_some(), log_requests = log_requests.len(), "sync answered");
            let answer = outpost_api::SyncAnswer {
                sync: resp,
                alert_policy,
                log_requests,
                pipelines,
            };
            return Ok(Json(answer).into_response());
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            // The node was deleted (its sender dropped): the next read answers unknown_node.
            Ok(Err(_)) => rx = st.subscribe(&node),
            Err(_) => return Ok(StatusCode::NO_CONTENT.into_response()),
        }
    }
}

pub async fn status(
    State(st): St,
    peer: Peer,
    Path(node): Path<String>,
    ApiJson(body): ApiJson<outpost_api::StatusWithVitals>,
) -> Result<Json<StatusAck>, HubError> {
    authorize_node(&st, &peer, &node).await?;
    let now = now_ms();
    contact(&st, &node, now).await?;
    let outpost_api::StatusWithVitals {
        report,
        vitals,
        conditions,
    } = body;
    // Alert events are processed (idempotently) before the events are acknowledged.
    crate::alerts::on_status(&st, &node, report.events.clone(), vitals, conditions).await?;
    let events = report.events.len();
    let events_acked = st.record_status(node.clone(), report, now).await?;
    tracing::debug!(node = %node, events, events_acked, "status stored");
    Ok(Json(StatusAck { events_acked }))
}

pub async fn renew(
    State(st): St,
    peer: Peer,
    Path(node): Path<String>,
    ApiJson(req): ApiJson<RenewRequest>,
) -> Result<Json<RenewResponse>, HubError> {
    // The one route an expired (but known: the node was not deleted) certificate may call; the
    // TLS handshake proved the caller holds its key.
    authorize_owner(&st, &peer, &node).await?;
    let (fp, cert_pem, not_after) = sign(&st, &req.csr_pem, &node)?;
    let n = node.clone();
    st.db(move |s| s.renew(&n, &fp, not_after)).await?;
    match peer.expired_for(now_ms()) {
        Some(ago) => tracing::warn!(node = %node, expired_ago = %human_duration(ago), expires_at = not_after,
            "renewed an expired node certificate"),
        None => tracing::info!(node = %node, expires_at = not_after, "node certificate renewed"),
    }
    Ok(Json(RenewResponse { cert_pem }))
}

pub async fn create_token(
    State(st): St,
    _: Admin,
    ApiJson(req): ApiJson<TokenRequest>,
) -> Result<Json<TokenResponse>, HubError> {
    req.validate().map_err(|e| HubError::BadRequest(e.to_string()))?;
    let now = now_ms();
    for k in &req.node_labels {
        outpost_core::link::grantable(k, &req.labels)
            .map_err(|why| HubError::BadRequest(format!("node_labels: {k:?} cannot be left to nodes: {why}")))?;
    }
    let row = TokenRow {
        id: random_hex(4),
        secret_sha256: String::new(),
        node_labels: req.node_labels.clone(),
        labels: req.labels,
        expires_at: req
            .ttl_secs
            .map(|t| now.saturating_add(i64::try_from(t).unwrap_or(i64::MAX).saturating_mul(1000))),
        uses_left: req.uses.map(u64::from),
        used: 0,
        created_at: now,
    };
    let secret = random_hex(16);
    let row = TokenRow {
        secret_sha256: sha256_hex(&secret),
        ..row
    };
    let token = JoinToken {
        ca_fingerprint: st.ca_fingerprint.clone(),
        id: row.id.clone(),
        secret,
    }
    .encode();
    let resp = TokenResponse {
        token,
        id: row.id.clone(),
        expires_at: row.expires_at,
        uses: req.uses,
    };
    let (id, expires_at) = (row.id.clone(), row.expires_at);
    st.db(move |s| s.create_token(&row)).await?;
    tracing::info!(token = %id, expires_at = ?expires_at, uses = ?req.uses, "join token created");
    Ok(Json(resp))
}

pub async fn apply(
    State(st): St,
    _: Admin,
    ApiJson(req): ApiJson<ApplyRequest>,
) -> Result<Json<ApplyResponse>, HubError> {
    let (objects, warnings) =
        validate::parse_apply_batch(&req.files, &st.host_paths).map_err(HubError::InvalidManifest)?;
    let _guard = st.write_lock.lock().await;
    let stored = st.db(|s| s.objects()).await?;
    let errors = validate::check_references(&objects, stored.into_iter().map(|o| o.object));
    if !errors.is_empty() {
        return Err(HubError::InvalidManifest(errors));
    }
    let now = now_ms();
    let results = st.db(move |s| s.apply(&objects, now)).await?;
    let mut changed = false;
    for r in results.iter().filter(|r| r.action != "unchanged") {
        changed = true;
        tracing::info!(object = %r.object, action = %r.action, revision = ?r.revision, "object applied");
    }
    if changed {
        reschedule_after_commit(&st, now).await;
    }
    Ok(Json(ApplyResponse { results, warnings }))
}

async fn delete_ids(st: &HubState, ids: Vec<ObjectId>) -> Result<DeleteResponse, HubError> {
    let _guard = st.write_lock.lock().await;
    let stored = st.db(|s| s.objects()).await?;
    if let Some((object, workload)) = validate::in_use(stored.iter().map(|o| &o.object), &ids) {
        return Err(HubError::InUse {
            object: object.to_string(),
            workload: workload.to_string(),
        });
    }
    let (deleted, not_found) = st.db(move |s| s.delete_objects(&ids)).await?;
    for id in &deleted {
        tracing::info!(object = %id, "object deleted");
    }
    if !deleted.is_empty() {
        reschedule_after_commit(st, now_ms()).await;
    }
    Ok(DeleteResponse {
        deleted: deleted.iter().map(ToString::to_string).collect(),
        not_found: not_found.iter().map(ToString::to_string).collect(),
    })
}

pub async fn delete(
    State(st): St,
    _: Admin,
    ApiJson(req): ApiJson<ApplyRequest>,
) -> Result<Json<DeleteResponse>, HubError> {
    let (objects, _) = validate::parse_batch(&req.files).map_err(HubError::InvalidManifest)?;
    Ok(Json(delete_ids(&st, objects.iter().map(Object::id).collect()).await?))
}

fn object_id(kind: &str, namespace: String, name: String) -> Result<ObjectId, HubError> {
    let kind = Kind::parse_cli(kind).ok_or_else(|| {
        HubError::BadRequest(format!(
            "unknown kind {kind:?}; use deployment, daemonset, configmap or secret"
        ))
    })?;
    Ok(ObjectId { kind, namespace, name })
}

pub async fn delete_object(
    State(st): St,
    _: Admin,
    Path((kind, namespace, name)): Path<(String, String, String)>,
) -> Result<Json<DeleteResponse>, HubError> {
    let id = object_id(&kind, namespace, name)?;
    Ok(Json(delete_ids(&st, vec![id]).await?))
}

/// Everything needed to describe workloads, read in one go.
struct View {
    nodes: BTreeMap<String, NodeRow>,
    desired: Vec<DesiredRow>,
    statuses: HashMap<(String, String), WorkloadStatus>,
}

async fn read_view(st: &HubState) -> Result<View, HubError> {
    st.db(|s| {
        let nodes = s.nodes()?.into_iter().map(|n| (n.name.clone(), n)).collect();
        let desired = s.desired()?;
        let statuses = s
            .statuses(None)?
            .into_iter()
            .map(|(n, w)| ((n, w.key.clone()), w))
            .collect();
        Ok(View {
            nodes,
            desired,
            statuses,
        })
    })
    .await
}

/// Describe one workload. Pure.
fn workload_info(
    obj: &StoredObject,
    view: &View,
    note: Option<String>,
    offline_after: std::time::Duration,
    now: UnixMs,
) -> Option<WorkloadInfo> {
    let o = &obj.object;
    let template = o.template()?;
    let wv = workload_view(o)?;
    let id = o.id();
    let key = workload_key(&id);
    let desired = match id.kind {
        Kind::Deployment => wv.replicas,
        _ => view
            .nodes
            .values()
            .filter(|n| selector_matches(&wv.node_selector, &n.labels))
            .count() as u32,
    };
    let mut ready = 0;
    let placements: Vec<Placement> = view
        .desired
        .iter()
        .filter(|r| r.key == key)
        .map(|r| {
            let status = view.statuses.get(&(r.node.clone(), key.clone())).cloned();
            if status
                .as_ref()
                .is_some_and(|s| s.phase == Phase::Running && s.ready && s.hash == r.hash)
            {
                ready += 1;
            }
            let online = view
                .nodes
                .get(&r.node)
                .is_some_and(|n| is_online(n, offline_after, now));
            Placement {
                node: r.node.clone(),
                node_status: status_word(online).to_string(),
                key: key.clone(),
                desired_revision: r.revision,
                status,
            }
        })
        .collect();
    let runtime = if matches!(
        template.spec.runtime_class_name.as_deref(),
        Some(PROCESS_RUNTIME | outpost_api::ONNX_RUNTIME)
    ) {
        Runtime::Process
    } else {
        Runtime::Docker
    };
    Some(WorkloadInfo {
        kind: id.kind,
        namespace: id.namespace.clone(),
        name: id.name.clone(),
        revision: obj.revision,
        runtime,
        desired,
        scheduled: placements.len() as u32,
        ready,
        node_selector: wv.node_selector,
        created_at: obj.created_at,
        updated_at: obj.updated_at,
        placements,
        note,
        manifest: serde_json::to_value(o).unwrap_or_default(),
    })
}

pub async fn revisions(
    State(st): St,
    _: Admin,
    Path((kind, namespace, name)): Path<(String, String, String)>,
) -> Result<Json<Vec<RevisionInfo>>, HubError> {
    let id = object_id(&kind, namespace, name)?;
    let lookup = id.clone();
    let (obj, revs) = st.db(move |s| Ok((s.object(&lookup)?, s.revisions(&lookup)?))).await?;
    let obj = obj.ok_or_else(|| HubError::NotFound(id.to_string()))?;
    Ok(Json(
        revs.into_iter()
            .map(|r| RevisionInfo {
                revision: r.revision,
                current: r.revision == obj.revision,
                images: r
                    .template
                    .spec
                    .containers
                    .iter()
                    .map(|c| format!("{}={}", c.name, c.image.as_deref().unwrap_or("-")))
                    .collect(),
                template_hash: r.template_hash,
                created_at: r.created_at,
            })
            .collect(),
    ))
}

/// `outpost rollout undo`: the pod template of an earlier revision becomes a new revision, as
/// in Kubernetes. Goes through the same checks as an apply.
pub async fn undo(
    State(st): St,
    _: Admin,
    Path((kind, namespace, name)): Path<(String, String, String)>,
    ApiJson(req): ApiJson<UndoRequest>,
) -> Result<Json<ApplyResult>, HubError> {
    let id = object_id(&kind, namespace, name)?;
    let _guard = st.write_lock.lock().await;
    let lookup = id.clone();
    let (obj, revs) = st.db(move |s| Ok((s.object(&lookup)?, s.revisions(&lookup)?))).await?;
    let obj = obj.ok_or_else(|| HubError::NotFound(id.to_string()))?;
    let current_hash = obj.template_hash.clone().unwrap_or_default();
    let target = match req.to_revision {
        Some(n) => revs.iter().find(|r| r.revision == n).ok_or_else(|| {
            HubError::BadRequest(format!(
                "{id} has no revision {n}; see `outpost rollout history {} {}`",
                id.kind.as_str().to_ascii_lowercase(),
                id.name
            ))
        })?,
        None => revs
            .iter()
            .rev()
            .find(|r| r.revision < obj.revision && r.template_hash != current_hash)
            .ok_or_else(|| HubError::BadRequest(format!("{id} has no earlier revision to go back to")))?,
    };
    let mut object = obj.object.clone();
    match &mut object {
        Object::Deployment(d) => d.spec.template = target.template.clone(),
        Object::DaemonSet(d) => d.spec.template = target.template.clone(),
        _ => return Err(HubError::BadRequest(format!("{id} is not a workload"))),
    }
    let stored = st.db(|s| s.objects()).await?;
    let errors = validate::check_references(std::slice::from_ref(&object), stored.into_iter().map(|o| o.object));
    if !errors.is_empty() {
        return Err(HubError::InvalidManifest(errors));
    }
    let now = now_ms();
    let from = target.revision;
    let mut results = st.db(move |s| s.apply(&[object], now)).await?;
    let result = results
        .pop()
        .ok_or_else(|| HubError::Internal("apply returned nothing".into()))?;
    tracing::info!(object = %id, from_revision = from, revision = ?result.revision, "rollout undone");
    if result.action != "unchanged" {
        reschedule_after_commit(&st, now).await;
    }
    Ok(Json(result))
}

pub async fn get_object(
    State(st): St,
    _: Admin,
    Path((kind, namespace, name)): Path<(String, String, String)>,
) -> Result<Json<serde_json::Value>, HubError> {
    let id = object_id(&kind, namespace, name)?;
    let lookup = id.clone();
    let obj = st
        .db(move |s| s.object(&lookup))
        .await?
        .ok_or_else(|| HubError::NotFound(id.to_string()))?;
    if !id.kind.is_workload() {
        return Ok(Json(
            serde_json::to_value(&obj.object).map_err(|e| HubError::Internal(e.to_string()))?,
        ));
    }
    let view = read_view(&st).await?;
    let info = workload_info(&obj, &view, st.note(&id), st.offline_after, now_ms())
        .ok_or_else(|| HubError::Internal(format!("{id} has no pod template")))?;
    Ok(Json(
        serde_json::to_value(info).map_err(|e| HubError::Internal(e.to_string()))?,
    ))
}

pub async fn workloads(State(st): St, _: Admin) -> Result<Json<Vec<WorkloadInfo>>, HubError> {
    let objects = st.db(|s| s.objects()).await?;
    let view = read_view(&st).await?;
    let now = now_ms();
    let mut out: Vec<WorkloadInfo> = objects
        .iter()
        .filter_map(|o| workload_info(o, &view, st.note(&o.object.id()), st.offline_after, now))
        .collect();
    out.sort_by(|a, b| (a.kind, &a.namespace, &a.name).cmp(&(b.kind, &b.namespace, &b.name)));
    Ok(Json(out))
}

fn node_info(n: NodeRow, workloads: Vec<WorkloadStatus>, offline_after: std::time::Duration, now: UnixMs) -> NodeInfo {
    NodeInfo {
        status: status_word(is_online(&n, offline_after, now)).to_string(),
        name: n.name,
        labels: n.labels,
        last_seen: n.last_seen,
        joined_at: n.joined_at,
        agent_version: n.agent_version,
        uptime_secs: n.uptime_secs,
        generation: n.generation,
        applied_generation: n.applied_generation,
        cert_expires_at: Some(n.cert_not_after),
        workloads,
        events: Vec::new(),
        conditions: Vec::new(),
    }
}

pub async fn nodes(State(st): St, _: Admin) -> Result<Json<Vec<NodeInfo>>, HubError> {
    let (nodes, statuses) = st.db(|s| Ok((s.nodes()?, s.statuses(None)?))).await?;
    let mut by_node: HashMap<String, Vec<WorkloadStatus>> = HashMap::new();
    for (n, w) in statuses {
        by_node.entry(n).or_default().push(w);
    }
    let now = now_ms();
    let out = nodes
        .into_iter()
        .map(|n| {
            let w = by_node.remove(&n.name).unwrap_or_default();
            node_info(n, w, st.offline_after, now)
        })
        .collect();
    Ok(Json(out))
}

pub async fn node(State(st): St, _: Admin, Path(name): Path<String>) -> Result<Json<NodeInfo>, HubError> {
    let n = name.clone();
    let found = st
        .db(move |s| {
            let Some(row) = s.node(&n)? else {
                return Ok(None);
            };
            let statuses = s.statuses(Some(&n))?.into_iter().map(|(_, w)| w).collect();
            Ok(Some((row, statuses, s.events(&n, NODE_EVENTS)?)))
        })
        .await?;
    let (row, statuses, events) = found.ok_or_else(|| HubError::NotFound(format!("node {name}")))?;
    let n = name.clone();
    let conditions = crate::alerts::mdb(&st, move |m| m.conditions(Some(&n)))
        .await?
        .remove(&name)
        .unwrap_or_default();
    Ok(Json(NodeInfo {
        events,
        conditions,
        ..node_info(row, statuses, st.offline_after, now_ms())
    }))
}

pub async fn delete_node(State(st): St, _: Admin, Path(name): Path<String>) -> Result<Json<DeleteResponse>, HubError> {
    let _guard = st.write_lock.lock().await;
    let n = name.clone();
    if !st.db(move |s| s.delete_node(&n)).await? {
        return Err(HubError::NotFound(format!("node {name}")));
    }
    st.forget_node(&name);
    let n = name.clone();
    crate::alerts::mdb(&st, move |m| m.forget_node(&n)).await?;
    tracing::info!(node = %name, "node deleted; its certificate no longer works");
    reschedule_after_commit(&st, now_ms()).await;
    Ok(Json(DeleteResponse {
        deleted: vec![format!("node/{name}")],
        not_found: vec![],
    }))
}
