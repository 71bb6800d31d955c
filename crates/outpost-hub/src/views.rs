//! Read models for operators: a workload, node, rollout or pipeline as `outpost get`/`describe`
//! show it, built from rows read in one go. Pure functions of the rows and `now`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use outpost_api::pipeline::{PipelineInfo, PipelinePlacement};
use outpost_api::{
    Kind, NodeInfo, NodeRolloutInfo, NodeRolloutState, Object, Phase, Placement, RolloutInfo, Runtime, UnixMs,
    WaveInfo, WorkloadInfo, WorkloadStatus, PROCESS_RUNTIME,
};
use outpost_core::render::workload_key;
use outpost_core::waves::{node_state, planned_waves, Rollout};

use crate::rollouts::{node_views, Loaded, Zones};
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
        Kind::DaemonSet | Kind::AgentUpdate => {
            view.nodes.values().filter(|n| wv.fits(&n.name, &n.labels)).count() as u32
        }
        _ => wv.replicas,
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

/// A workload's rollout as `outpost rollout status` shows it: opened waves with their counts,
/// the waves still to open as they would open now, every node's state and reason, the events.
/// `with_nodes: false` leaves out the per-node list (fleet-wide listings).
pub fn rollout_info(
    r: &Rollout,
    l: &Loaded,
    obj: &Object,
    offline_after: Duration,
    now: UnixMs,
    with_nodes: bool,
) -> RolloutInfo {
    let policy = l.policy_for(obj);
    let mut zones = Zones::default();
    let views = node_views(l, obj, &r.workload, r.revision, &policy, &mut zones, offline_after, now);
    let mut waves: Vec<WaveInfo> = r
        .waves
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let mut counts: BTreeMap<String, u32> = BTreeMap::new();
            let mut nodes = 0;
            for m in r.members.values().filter(|m| m.wave as usize == i) {
                nodes += 1;
                *counts.entry(m.state.as_str().to_string()).or_default() += 1;
            }
            let state = match (w.completed_at, w.gates_done_at) {
                (Some(_), _) => "Complete",
                (None, Some(_)) => "Baking",
                (None, None) => "Open",
            };
            WaveInfo {
                index: i as u32,
                name: w.name.clone(),
                state: state.into(),
                nodes,
                counts,
                opened_at: Some(w.opened_at),
                gates_done_at: w.gates_done_at,
                completed_at: w.completed_at,
                bake_secs: (w.bake_ms / 1000) as u64,
            }
        })
        .collect();
    for (name, nodes) in planned_waves(r, &policy, &views) {
        waves.push(WaveInfo {
            index: waves.len() as u32,
            name,
            state: "Planned".into(),
            nodes: nodes.len() as u32,
            counts: [(NodeRolloutState::Pending.as_str().to_string(), nodes.len() as u32)].into(),
            opened_at: None,
            gates_done_at: None,
            completed_at: None,
            bake_secs: 0,
        });
    }
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    let mut nodes = Vec::new();
    for v in &views {
        let state = node_state(r, &v.name);
        *counts.entry(state.as_str().to_string()).or_default() += 1;
        if !with_nodes {
            continue;
        }
        let status = l.statuses.get(&(v.name.clone(), r.workload.clone()));
        let member = r.members.get(&v.name);
        let reason = member.and_then(|m| m.reason.clone()).or_else(|| {
            status
                .and_then(|s| s.rollout.as_ref())
                .filter(|g| g.target_revision == r.revision)
                .and_then(|g| g.reason.clone())
        });
        let desired = l
            .desired
            .get(&r.workload)
            .and_then(|m| m.get(&v.name))
            .map(|d| d.revision)
            .unwrap_or(r.revision);
        let gate = status
            .and_then(|s| s.rollout.as_ref())
            .filter(|g| g.target_revision == desired)
            .map(|g| g.state);
        nodes.push(NodeRolloutInfo {
            node: v.name.clone(),
            wave: member.map(|m| m.wave),
            state,
            desired_revision: desired,
            running_revision: status.map(|s| s.revision),
            online: v.online,
            gate,
            reason,
        });
    }
    RolloutInfo {
        workload: r.workload.clone(),
        revision: r.revision,
        previous_revision: r.previous,
        phase: r.phase,
        reason: r.reason.clone(),
        policy: policy.name,
        started_at: r.started_at,
        updated_at: r.updated_at,
        waves,
        counts,
        nodes,
        events: r.events.clone(),
    }
}

/// Every Pipeline with the nodes that run it (`outpost get pipelines`).
pub fn pipeline_infos(objects: &[StoredObject], view: &View) -> Vec<PipelineInfo> {
    objects
        .iter()
        .filter_map(|o| match &o.object {
            Object::Pipeline(p) => {
                let key = workload_key(&o.object.id());
                let placements: Vec<PipelinePlacement> = view
                    .desired
                    .iter()
                    .filter(|r| r.key == key)
                    .map(|r| {
                        let st = view.statuses.get(&(r.node.clone(), key.clone()));
                        let gate = st
                            .and_then(|s| s.rollout.as_ref())
                            .filter(|g| g.target_revision == r.revision);
                        PipelinePlacement {
                            node: r.node.clone(),
                            desired_revision: r.revision,
                            running_revision: st.map(|s| s.revision),
                            state: gate.map(|g| g.state),
                            reason: gate.and_then(|g| g.reason.clone()),
                        }
                    })
                    .collect();
                Some(PipelineInfo {
                    namespace: p.metadata.ns().to_string(),
                    name: p.metadata.name.clone(),
                    revision: o.revision,
                    nodes: placements.iter().map(|x| x.node.clone()).collect(),
                    placements,
                    node_selector: p.spec.node_selector.clone(),
                    streams: p.spec.streams.iter().map(|s| s.name.clone()).collect(),
                    sinks: p
                        .spec
                        .sinks
                        .iter()
                        .map(|s| format!("{} ({})", s.name, s.type_))
                        .collect(),
                    updated_at: o.updated_at,
                })
            }
            _ => None,
        })
        .collect()
}
