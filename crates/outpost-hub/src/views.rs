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

/// How reachable a node is, from its last contact (docs/dashboard.md): a connected agent holds
/// its long-poll and reads as in contact now (docs/protocol.md §12), and polls again at once
/// when one ends, so a last contact older than `stale_after` means it missed check-ins; older
/// than `offline_after` it is Offline (what `outpost get nodes` says).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Reach {
    Online,
    Stale,
    Offline,
}

/// Silence after which an online node counts as Stale: a third of the offline grace period.
pub fn stale_after(offline_after: Duration) -> Duration {
    offline_after / 3
}

/// One node as the dashboard lists it: reachability, and whether it is degraded or updating,
/// with the reasons.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct NodeSummary {
    pub name: String,
    pub labels: outpost_api::Labels,
    pub reach: Reach,
    /// Unix ms of the last contact (joining counts).
    pub last_contact: UnixMs,
    /// A node condition holds, or a workload running its desired revision is not ready.
    pub degraded: bool,
    /// A workload on the node is not yet on its desired revision, or is being gated.
    pub updating: bool,
    /// Why degraded or updating, one line each.
    pub reasons: Vec<String>,
    pub agent_version: Option<String>,
}

/// Summarize one node from its row, its workload statuses, its desired rows and its conditions.
pub fn node_summary(
    n: &NodeRow,
    statuses: &[WorkloadStatus],
    desired: &[&DesiredRow],
    conditions: &[outpost_api::NodeCondition],
    offline_after: Duration,
    now: UnixMs,
) -> NodeSummary {
    let silent = now.saturating_sub(n.last_contact());
    let reach = if silent > offline_after.as_millis() as i64 {
        Reach::Offline
    } else if silent > stale_after(offline_after).as_millis() as i64 {
        Reach::Stale
    } else {
        Reach::Online
    };
    let mut reasons: Vec<String> = conditions
        .iter()
        .map(|c| format!("{}: {}", c.kind, c.message))
        .collect();
    let mut degraded = !conditions.is_empty();
    let mut updating = false;
    for d in desired {
        let st = statuses.iter().find(|s| s.key == d.key);
        match st {
            None => {
                updating = true;
                reasons.push(format!("{}: revision {} not reported yet", d.key, d.revision));
            }
            Some(s) if s.hash != d.hash => {
                updating = true;
                reasons.push(format!("{}: revision {} -> {}", d.key, s.revision, d.revision));
            }
            Some(s)
                if s.rollout
                    .as_ref()
                    .is_some_and(|g| g.state == outpost_api::RolloutState::Progressing) =>
            {
                updating = true;
                reasons.push(format!("{}: revision {} being gated", d.key, d.revision));
            }
            Some(s) if !(s.ready && s.phase == Phase::Running) && s.phase != Phase::Succeeded => {
                degraded = true;
                reasons.push(format!(
                    "{}: {}{}",
                    d.key,
                    s.phase.as_str(),
                    if s.ready { "" } else { ", not ready" }
                ));
            }
            Some(_) => {}
        }
    }
    NodeSummary {
        name: n.name.clone(),
        labels: n.labels.clone(),
        reach,
        last_contact: n.last_contact(),
        degraded,
        updating,
        reasons,
        agent_version: n.agent_version.clone(),
    }
}

/// Node counts of the fleet overview. `online + stale + offline == total`; `degraded` and
/// `updating` count reachable (online or stale) nodes only, and a node may be both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FleetCounts {
    pub total: u32,
    pub online: u32,
    pub stale: u32,
    pub offline: u32,
    pub degraded: u32,
    pub updating: u32,
}

/// Count nodes for the overview (see [`FleetCounts`]).
pub fn fleet_counts<'a>(nodes: impl IntoIterator<Item = &'a NodeSummary>) -> FleetCounts {
    let mut c = FleetCounts::default();
    for n in nodes {
        c.total += 1;
        match n.reach {
            Reach::Online => c.online += 1,
            Reach::Stale => c.stale += 1,
            Reach::Offline => {
                c.offline += 1;
                continue;
            }
        }
        c.degraded += u32::from(n.degraded);
        c.updating += u32::from(n.updating);
    }
    c
}

#[cfg(test)]
mod dashboard_tests {
    use super::*;
    use outpost_api::{NodeCondition, RolloutState, RolloutStatus};

    fn row(name: &str, last_seen: UnixMs) -> NodeRow {
        NodeRow {
            name: name.into(),
            labels: [("site".to_string(), "a".to_string())].into(),
            cert_fp: String::new(),
            cert_not_after: 0,
            joined_at: 0,
            last_seen: Some(last_seen),
            generation: 1,
            applied_generation: 1,
            agent_version: None,
            uptime_secs: None,
        }
    }

    fn status(key: &str, hash: &str, phase: Phase, ready: bool, gate: Option<RolloutState>) -> WorkloadStatus {
        WorkloadStatus {
            key: key.into(),
            revision: 1,
            hash: hash.into(),
            phase,
            containers: Vec::new(),
            ready,
            rollout: gate.map(|state| RolloutStatus {
                state,
                target_revision: 1,
                target_hash: hash.into(),
                good_revision: None,
                reason: None,
                since: 0,
            }),
            site_role: None,
        }
    }

    fn desired(key: &str, hash: &str) -> DesiredRow {
        DesiredRow {
            node: "n".into(),
            key: key.into(),
            hash: hash.into(),
            revision: 2,
        }
    }

    /// (case, last contact seconds ago, statuses, desired, conditions, expected reach, degraded, updating)
    #[test]
    fn node_summaries_and_fleet_counts() {
        let now: UnixMs = 1_000_000_000;
        let off = Duration::from_secs(90);
        let cond = NodeCondition {
            kind: "DiskFull".into(),
            message: "no space".into(),
            since: 0,
        };
        let running = status("w", "h", Phase::Running, true, Some(RolloutState::Complete));
        let crashing = status("w", "h", Phase::CrashLoopBackOff, false, None);
        let gated = status("w", "h", Phase::Running, true, Some(RolloutState::Progressing));
        let old = status("w", "old", Phase::Running, true, None);
        let done = status("w", "h", Phase::Succeeded, false, None);
        type Case<'a> = (
            &'a str,
            i64,
            Vec<WorkloadStatus>,
            Vec<DesiredRow>,
            Vec<NodeCondition>,
            Reach,
            bool,
            bool,
        );
        let cases: Vec<Case> = vec![
            (
                "healthy",
                0,
                vec![running.clone()],
                vec![desired("w", "h")],
                vec![],
                Reach::Online,
                false,
                false,
            ),
            (
                "30 s is still online",
                30,
                vec![],
                vec![],
                vec![],
                Reach::Online,
                false,
                false,
            ),
            (
                "31 s silent: stale",
                31,
                vec![],
                vec![],
                vec![],
                Reach::Stale,
                false,
                false,
            ),
            (
                "90 s: stale, not offline",
                90,
                vec![],
                vec![],
                vec![],
                Reach::Stale,
                false,
                false,
            ),
            (
                "91 s: offline",
                91,
                vec![],
                vec![],
                vec![],
                Reach::Offline,
                false,
                false,
            ),
            (
                "condition",
                0,
                vec![],
                vec![],
                vec![cond.clone()],
                Reach::Online,
                true,
                false,
            ),
            (
                "crash loop",
                0,
                vec![crashing],
                vec![desired("w", "h")],
                vec![],
                Reach::Online,
                true,
                false,
            ),
            (
                "old hash",
                0,
                vec![old],
                vec![desired("w", "h")],
                vec![],
                Reach::Online,
                false,
                true,
            ),
            (
                "not reported",
                0,
                vec![],
                vec![desired("w", "h")],
                vec![],
                Reach::Online,
                false,
                true,
            ),
            (
                "gated",
                0,
                vec![gated],
                vec![desired("w", "h")],
                vec![],
                Reach::Online,
                false,
                true,
            ),
            (
                "job done",
                0,
                vec![done],
                vec![desired("w", "h")],
                vec![],
                Reach::Online,
                false,
                false,
            ),
            (
                "offline and broken",
                500,
                vec![],
                vec![desired("w", "h")],
                vec![cond],
                Reach::Offline,
                true,
                true,
            ),
        ];
        let mut summaries = Vec::new();
        for (case, ago, st, d, c, reach, degraded, updating) in cases {
            let d: Vec<&DesiredRow> = d.iter().collect();
            let s = node_summary(&row(case, now - ago * 1000), &st, &d, &c, off, now);
            assert_eq!(
                (s.reach, s.degraded, s.updating),
                (reach, degraded, updating),
                "{case}: {s:?}"
            );
            assert_eq!(
                s.reasons.is_empty(),
                !degraded && !updating,
                "{case}: reasons {:?}",
                s.reasons
            );
            summaries.push(s);
        }
        assert_eq!(
            fleet_counts(&summaries),
            FleetCounts {
                total: 12,
                online: 8,
                stale: 2,
                offline: 2,
                // the offline node's condition and pending update are not counted
                degraded: 2,
                updating: 3,
            }
        );
        assert_eq!(fleet_counts(&[]), FleetCounts::default());
    }
}
