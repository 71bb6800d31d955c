//! Read models for operators: a workload or node as `outpost get`/`describe` show it, built
//! from rows read in one go. Pure functions of the rows and `now`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use outpost_api::{Kind, NodeInfo, Phase, Placement, Runtime, UnixMs, WorkloadInfo, WorkloadStatus, PROCESS_RUNTIME};
use outpost_core::render::workload_key;
use outpost_core::schedule::selector_matches;

use crate::scheduler::{is_online, status_word, workload_view};
use crate::store::{DesiredRow, NodeRow, StoredObject};

/// Everything needed to describe workloads, read in one go.
pub struct View {
    pub nodes: BTreeMap<String, NodeRow>,
    pub desired: Vec<DesiredRow>,
    pub statuses: HashMap<(String, String), WorkloadStatus>,
}

/// Describe one workload.
pub fn workload_info(
    obj: &StoredObject,
    view: &View,
    note: Option<String>,
    offline_after: Duration,
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
    let runtime = if template.spec.runtime_class_name.as_deref() == Some(PROCESS_RUNTIME) {
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

/// A node as `outpost get nodes` lists it (events and conditions are added by `describe`).
pub fn node_info(n: NodeRow, workloads: Vec<WorkloadStatus>, offline_after: Duration, now: UnixMs) -> NodeInfo {
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
