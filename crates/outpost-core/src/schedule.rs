//! Placement of workloads onto nodes.
//!
//! DaemonSets go to every node whose labels match the node selector, online or not (an offline
//! node receives it when it reconnects). Deployments get `replicas` matching nodes, at most one
//! replica per node, spread by load, and stable: a replica stays where it is while its node
//! exists and matches, even if that node is offline (offline nodes keep running what they have).
//! New replicas go only to online nodes. Jobs and CronJobs are placed like a one-replica
//! Deployment (one node, stable). A node matches a workload when it has every `nodeSelector`
//! label and satisfies the required node affinity ([`affinity_matches`]: terms ORed, the
//! expressions of a term ANDed, Kubernetes' operators).

use std::collections::{BTreeMap, BTreeSet};

use outpost_api::{Kind, Labels, NodeSelector, NodeSelectorRequirement, ObjectId};
use sha2::{Digest, Sha256};

#[derive(Clone, Debug, PartialEq)]
pub struct NodeView {
    pub name: String,
    pub labels: Labels,
    pub online: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadView {
    pub id: ObjectId,
    pub node_selector: Labels,
    /// `affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution`.
    pub affinity: Option<NodeSelector>,
    /// Deployments only (Jobs and CronJobs: 1).
    pub replicas: u32,
}

impl WorkloadView {
    /// Can this workload run on a node with this name and these labels?
    pub fn fits(&self, node: &str, labels: &Labels) -> bool {
        selector_matches(&self.node_selector, labels)
            && self.affinity.as_ref().is_none_or(|a| affinity_matches(a, node, labels))
    }
}

/// Required node affinity: some term whose every expression (and field match) holds. A term
/// with no expressions matches no node, as in Kubernetes.
pub fn affinity_matches(sel: &NodeSelector, node: &str, labels: &Labels) -> bool {
    sel.node_selector_terms.iter().any(|t| {
        (!t.match_expressions.is_empty() || !t.match_fields.is_empty())
            && t.match_expressions
                .iter()
                .all(|e| requirement_holds(e, labels.get(&e.key).map(String::as_str)))
            && t.match_fields
                .iter()
                .all(|e| e.key == "metadata.name" && requirement_holds(e, Some(node)))
    })
}

/// One requirement against the node's value for its key (None: the node lacks the label).
/// `Gt`/`Lt` compare integers; a value that is not one fails them.
pub fn requirement_holds(e: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let int = |s: &str| s.parse::<i64>().ok();
    match e.operator.as_str() {
        "In" => value.is_some_and(|v| e.values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| e.values.iter().all(|x| x != v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" => matches!((value.and_then(int), e.values.first().and_then(|x| int(x))), (Some(v), Some(x)) if v > x),
        "Lt" => matches!((value.and_then(int), e.values.first().and_then(|x| int(x))), (Some(v), Some(x)) if v < x),
        _ => false,
    }
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct PlacementDecision {
    pub nodes: BTreeSet<String>,
    /// Set when fewer replicas are placed than requested.
    pub note: Option<String>,
}

/// True when every selector entry is among the labels.
pub fn selector_matches(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Place every workload. `current` holds the existing Deployment placements; the result holds
/// the new placement for every workload. Workloads are processed in id order so the result
/// depends only on the inputs.
pub fn schedule(
    nodes: &[NodeView],
    workloads: &[WorkloadView],
    current: &BTreeMap<ObjectId, BTreeSet<String>>,
) -> BTreeMap<ObjectId, PlacementDecision> {
    let mut sorted: Vec<&WorkloadView> = workloads.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let mut load: BTreeMap<&str, usize> = nodes.iter().map(|n| (n.name.as_str(), 0)).collect();
    let mut out = BTreeMap::new();
    // DaemonSets first: their load is fixed, Deployments spread around it.
    let every_node = |k: Kind| matches!(k, Kind::DaemonSet | Kind::AgentUpdate | Kind::Pipeline);
    for w in sorted.iter().filter(|w| every_node(w.id.kind)) {
        let placed: BTreeSet<String> = nodes
            .iter()
            .filter(|n| w.fits(&n.name, &n.labels))
            .map(|n| n.name.clone())
            .collect();
        for n in &placed {
            if let Some(l) = load.get_mut(n.as_str()) {
                *l += 1;
            }
        }
        out.insert(
            w.id.clone(),
            PlacementDecision {
                nodes: placed,
                note: None,
            },
        );
    }
    for w in sorted.iter().filter(|w| !every_node(w.id.kind)) {
        let empty = BTreeSet::new();
        let decision = place_deployment(w, nodes, current.get(&w.id).unwrap_or(&empty), &load);
        for n in &decision.nodes {
            if let Some(l) = load.get_mut(n.as_str()) {
                *l += 1;
            }
        }
        out.insert(w.id.clone(), decision);
    }
    out
}

fn spread_key(id: &ObjectId, node: &str) -> [u8; 8] {
    let d = Sha256::digest(format!("{id}\0{node}").as_bytes());
    d[..8].try_into().expect("8 bytes")
}

fn place_deployment(
    w: &WorkloadView,
    nodes: &[NodeView],
    current: &BTreeSet<String>,
    load: &BTreeMap<&str, usize>,
) -> PlacementDecision {
    let matching: Vec<&NodeView> = nodes.iter().filter(|n| w.fits(&n.name, &n.labels)).collect();
    let want = w.replicas as usize;
    // Keep existing replicas on nodes that still exist and match.
    let mut kept: Vec<&NodeView> = matching.iter().copied().filter(|n| current.contains(&n.name)).collect();
    if kept.len() > want {
        // Scale down: drop offline nodes first, then the busiest, then by name.
        kept.sort_by_key(|n| {
            (
                !n.online,
                load.get(n.name.as_str()).copied().unwrap_or(0),
                n.name.clone(),
            )
        });
        kept.truncate(want);
    }
    let mut chosen: BTreeSet<String> = kept.iter().map(|n| n.name.clone()).collect();
    let mut candidates: Vec<&NodeView> = matching
        .iter()
        .copied()
        .filter(|n| n.online && !chosen.contains(&n.name))
        .collect();
    candidates.sort_by_key(|n| {
        (
            load.get(n.name.as_str()).copied().unwrap_or(0),
            spread_key(&w.id, &n.name),
        )
    });
    for n in candidates {
        if chosen.len() >= want {
            break;
        }
        chosen.insert(n.name.clone());
    }
    let note = (chosen.len() < want).then(|| {
        let online = matching.iter().filter(|n| n.online).count();
        format!(
            "{} of {want} replicas scheduled: {} nodes match the nodeSelector ({online} online); outpost runs at most one replica per node",
            chosen.len(),
            matching.len()
        )
    });
    PlacementDecision { nodes: chosen, note }
}

/// What the join of one new node changes, decided without planning the fleet
/// ([`place_joined`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JoinEffect {
    /// Only the new node's desired state changes. `runs`: every workload placed on it;
    /// `filled`: the Deployments (and Jobs) short of replicas that take it, now at their count.
    Node {
        runs: BTreeSet<ObjectId>,
        filled: BTreeSet<ObjectId>,
    },
    /// Other nodes may change too (or the fleet-wide notes): plan the whole fleet. Why, for
    /// the log.
    Fleet(&'static str),
}

/// Which workloads a node that has just joined runs, and whether anything else can change.
///
/// A join adds a node and changes nothing else, so with placements stable
/// (see the module doc) it can only: put every-node kinds (DaemonSet, AgentUpdate, Pipeline)
/// that select it on it; give it a replica of a Deployment short of replicas that it fits
/// (all other fitting online nodes already hold one, at most one per node). Everything
/// already placed stays where it is. The exceptions need the whole fleet:
/// - a site-failover workload (`site_ha`) that fits the node: the member list in every
///   member's spec may change;
/// - a Deployment it fills only partly: its note ("k of n replicas scheduled: m nodes
///   match") counts the fleet.
///
/// `site_ha`: the ids of the site-failover workloads; `current`: Deployment placements.
pub fn place_joined(
    node: &NodeView,
    workloads: &[WorkloadView],
    site_ha: &BTreeSet<ObjectId>,
    current: &BTreeMap<ObjectId, BTreeSet<String>>,
) -> JoinEffect {
    let every_node = |k: Kind| matches!(k, Kind::DaemonSet | Kind::AgentUpdate | Kind::Pipeline);
    let mut runs = BTreeSet::new();
    let mut filled = BTreeSet::new();
    for w in workloads {
        if !w.fits(&node.name, &node.labels) {
            continue;
        }
        if site_ha.contains(&w.id) {
            return JoinEffect::Fleet("a site-failover workload fits the new node");
        }
        if every_node(w.id.kind) {
            runs.insert(w.id.clone());
            continue;
        }
        let placed = current.get(&w.id).map_or(0, BTreeSet::len);
        if current.get(&w.id).is_some_and(|c| c.contains(&node.name)) {
            runs.insert(w.id.clone());
        } else if node.online && placed < w.replicas as usize {
            if placed + 1 < w.replicas as usize {
                return JoinEffect::Fleet("a Deployment stays short of replicas after the join");
            }
            runs.insert(w.id.clone());
            filled.insert(w.id.clone());
        }
    }
    JoinEffect::Node { runs, filled }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, labels: &[(&str, &str)], online: bool) -> NodeView {
        NodeView {
            name: name.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            online,
        }
    }
    fn wl(kind: Kind, name: &str, sel: &[(&str, &str)], replicas: u32) -> WorkloadView {
        WorkloadView {
            id: ObjectId {
                kind,
                namespace: "default".into(),
                name: name.into(),
            },
            node_selector: sel.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            affinity: None,
            replicas,
        }
    }
    fn names(s: &BTreeSet<String>) -> Vec<&str> {
        s.iter().map(String::as_str).collect()
    }

    /// One scheduling case: nodes, workloads, current placements -> expected nodes per workload.
    fn check(
        nodes: &[NodeView],
        workloads: &[WorkloadView],
        current: &[(&WorkloadView, &[&str])],
        expected: &[(&str, &[&str])],
    ) -> BTreeMap<ObjectId, PlacementDecision> {
        let cur = current
            .iter()
            .map(|(w, ns)| (w.id.clone(), ns.iter().map(|s| s.to_string()).collect()))
            .collect();
        let out = schedule(nodes, workloads, &cur);
        for (name, want) in expected {
            let got = out
                .iter()
                .find(|(id, _)| id.name == *name)
                .map(|(_, d)| names(&d.nodes))
                .unwrap_or_default();
            assert_eq!(&got, want, "workload {name}");
        }
        out
    }

    #[test]
    fn daemonset_goes_to_every_matching_node_including_offline() {
        let nodes = [
            node("a", &[("site", "1")], true),
            node("b", &[("site", "1")], false),
            node("c", &[("site", "2")], true),
        ];
        check(
            &nodes,
            &[wl(Kind::DaemonSet, "ds", &[("site", "1")], 0)],
            &[],
            &[("ds", &["a", "b"])],
        );
        check(
            &nodes,
            &[wl(Kind::DaemonSet, "all", &[], 0)],
            &[],
            &[("all", &["a", "b", "c"])],
        );
    }

    #[test]
    fn deployment_spreads_over_online_matching_nodes() {
        let nodes = [node("a", &[], true), node("b", &[], true), node("c", &[], false)];
        let d = wl(Kind::Deployment, "web", &[], 2);
        check(&nodes, &[d], &[], &[("web", &["a", "b"])]);
    }

    #[test]
    fn deployment_is_stable_when_a_node_joins() {
        let d = wl(Kind::Deployment, "web", &[], 1);
        let before = check(
            &[node("a", &[], true)],
            std::slice::from_ref(&d),
            &[],
            &[("web", &["a"])],
        );
        assert_eq!(before.len(), 1);
        // "0" would sort first and has zero load, but the running replica stays on "a".
        check(
            &[node("0", &[], true), node("a", &[], true)],
            std::slice::from_ref(&d),
            &[(&d, &["a"])],
            &[("web", &["a"])],
        );
    }

    #[test]
    fn replica_on_offline_node_is_not_moved() {
        let d = wl(Kind::Deployment, "web", &[], 1);
        check(
            &[node("a", &[], false), node("b", &[], true)],
            std::slice::from_ref(&d),
            &[(&d, &["a"])],
            &[("web", &["a"])],
        );
    }

    #[test]
    fn replica_moves_when_node_stops_matching_or_is_deleted() {
        let d = wl(Kind::Deployment, "web", &[("site", "1")], 1);
        let nodes = [node("a", &[("site", "2")], true), node("b", &[("site", "1")], true)];
        check(&nodes, std::slice::from_ref(&d), &[(&d, &["a"])], &[("web", &["b"])]);
        check(
            &nodes[1..],
            std::slice::from_ref(&d),
            &[(&d, &["gone"])],
            &[("web", &["b"])],
        );
    }

    #[test]
    fn scale_down_drops_offline_then_busiest() {
        let d = wl(Kind::Deployment, "web", &[], 1);
        let nodes = [node("a", &[], false), node("b", &[], true)];
        check(
            &nodes,
            std::slice::from_ref(&d),
            &[(&d, &["a", "b"])],
            &[("web", &["b"])],
        );
    }

    #[test]
    fn spread_accounts_for_daemonsets_and_other_deployments() {
        let nodes = [node("a", &[], true), node("b", &[], true)];
        let ds = wl(Kind::DaemonSet, "agent", &[("x", "y")], 0);
        let d1 = wl(Kind::Deployment, "one", &[], 1);
        let d2 = wl(Kind::Deployment, "two", &[], 1);
        let out = schedule(&nodes, &[ds, d1, d2], &BTreeMap::new());
        let placed: Vec<_> = out.values().flat_map(|d| d.nodes.iter().cloned()).collect();
        assert_eq!(placed.len(), 2);
        assert_ne!(
            placed[0], placed[1],
            "two single-replica deployments land on different nodes"
        );
    }

    #[test]
    fn too_few_nodes_leaves_a_note() {
        let out = check(
            &[node("a", &[], true)],
            &[wl(Kind::Deployment, "web", &[], 3)],
            &[],
            &[("web", &["a"])],
        );
        let note = out.values().next().unwrap().note.clone().unwrap();
        assert!(note.starts_with("1 of 3 replicas scheduled"), "{note}");
    }

    fn req(key: &str, op: &str, values: &[&str]) -> NodeSelectorRequirement {
        NodeSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn requirements_table() {
        let cases: &[(&str, &[&str], Option<&str>, bool)] = &[
            ("In", &["a", "b"], Some("b"), true),
            ("In", &["a", "b"], Some("c"), false),
            ("In", &["a"], None, false),
            ("NotIn", &["a"], Some("b"), true),
            ("NotIn", &["a"], Some("a"), false),
            ("NotIn", &["a"], None, true),
            ("Exists", &[], Some(""), true),
            ("Exists", &[], None, false),
            ("DoesNotExist", &[], None, true),
            ("DoesNotExist", &[], Some("x"), false),
            ("Gt", &["4"], Some("8"), true),
            ("Gt", &["4"], Some("4"), false),
            ("Gt", &["4"], Some("x"), false),
            ("Gt", &["4"], None, false),
            ("Lt", &["4"], Some("-1"), true),
            ("Lt", &["4"], Some("4"), false),
            ("Bogus", &["4"], Some("4"), false),
        ];
        for (op, values, value, want) in cases {
            assert_eq!(
                requirement_holds(&req("k", op, values), *value),
                *want,
                "{op} {values:?} {value:?}"
            );
        }
    }

    #[test]
    fn affinity_terms_or_expressions_and() {
        use outpost_api::NodeSelectorTerm;
        let labels: Labels = [("zone", "floor-1"), ("cores", "4")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let term = |exprs: Vec<NodeSelectorRequirement>, fields: Vec<NodeSelectorRequirement>| NodeSelectorTerm {
            match_expressions: exprs,
            match_fields: fields,
        };
        let sel = |terms: Vec<NodeSelectorTerm>| NodeSelector {
            node_selector_terms: terms,
        };
        let cases = [
            (sel(vec![term(vec![req("zone", "In", &["floor-1"])], vec![])]), true),
            (
                sel(vec![term(
                    vec![req("zone", "In", &["floor-1"]), req("cores", "Gt", &["4"])],
                    vec![],
                )]),
                false,
            ),
            (
                sel(vec![
                    term(vec![req("zone", "In", &["floor-2"])], vec![]),
                    term(vec![req("cores", "Lt", &["8"])], vec![]),
                ]),
                true,
            ),
            (sel(vec![term(vec![], vec![])]), false),
            (sel(vec![]), false),
            (
                sel(vec![term(vec![], vec![req("metadata.name", "In", &["box-1"])])]),
                true,
            ),
            (
                sel(vec![term(vec![], vec![req("metadata.name", "NotIn", &["box-1"])])]),
                false,
            ),
        ];
        for (i, (s, want)) in cases.iter().enumerate() {
            assert_eq!(affinity_matches(s, "box-1", &labels), *want, "case {i}");
        }
    }

    #[test]
    fn affinity_narrows_placement() {
        let nodes = vec![
            node("a", &[("topology.kubernetes.io/zone", "factory-floor-1")], true),
            node("b", &[("topology.kubernetes.io/zone", "office")], true),
            node("c", &[], true),
        ];
        let mut w = wl(Kind::Deployment, "agv", &[], 3);
        w.affinity = Some(NodeSelector {
            node_selector_terms: vec![outpost_api::NodeSelectorTerm {
                match_expressions: vec![req("topology.kubernetes.io/zone", "In", &["factory-floor-1"])],
                match_fields: vec![],
            }],
        });
        let got = schedule(&nodes, &[w.clone()], &BTreeMap::new());
        assert_eq!(names(&got[&w.id].nodes), vec!["a"]);
        let mut ds = w.clone();
        ds.id.kind = Kind::DaemonSet;
        let got = schedule(&nodes, &[ds.clone()], &BTreeMap::new());
        assert_eq!(names(&got[&ds.id].nodes), vec!["a"]);
        let mut job = w.clone();
        job.id.kind = Kind::Job;
        job.replicas = 1;
        let got = schedule(&nodes, std::slice::from_ref(&job), &BTreeMap::new());
        assert_eq!(names(&got[&job.id].nodes), vec!["a"]);
    }

    /// A join case: the fleet before (placed by `schedule`), the workloads, the joining node ->
    /// the expected effect. When only the node changes, planning the whole fleet with it must
    /// give the same placements (what was placed stays, the node gets exactly `runs`).
    fn check_join(
        fleet: &[NodeView],
        workloads: &[WorkloadView],
        site_ha: &[&WorkloadView],
        new: NodeView,
        want: Result<(&[&str], &[&str]), &str>,
    ) {
        let placed = schedule(fleet, workloads, &BTreeMap::new());
        let current: BTreeMap<ObjectId, BTreeSet<String>> = placed
            .iter()
            .filter(|(id, _)| matches!(id.kind, Kind::Deployment | Kind::Job | Kind::CronJob))
            .map(|(id, d)| (id.clone(), d.nodes.clone()))
            .collect();
        let ha: BTreeSet<ObjectId> = site_ha.iter().map(|w| w.id.clone()).collect();
        let got = place_joined(&new, workloads, &ha, &current);
        let (runs, filled) = match (want, &got) {
            (Err(why), JoinEffect::Fleet(reason)) => {
                assert!(reason.contains(why), "{reason}");
                return;
            }
            (Ok(w), JoinEffect::Node { runs, filled }) => (w, (runs, filled)),
            (want, got) => panic!("want {want:?}, got {got:?}"),
        };
        let ids = |s: &BTreeSet<ObjectId>| {
            let mut v = s.iter().map(|i| i.name.clone()).collect::<Vec<_>>();
            v.sort();
            v
        };
        assert_eq!(ids(filled.0), runs.0, "runs");
        assert_eq!(ids(filled.1), runs.1, "filled");
        let mut all = fleet.to_vec();
        all.push(new.clone());
        let full = schedule(&all, workloads, &current);
        for w in workloads {
            let mut expect = placed[&w.id].nodes.clone();
            if filled.0.contains(&w.id) {
                expect.insert(new.name.clone());
            }
            assert_eq!(full[&w.id].nodes, expect, "{}: the full plan differs", w.id.name);
        }
    }

    #[test]
    fn a_join_changes_only_the_new_node_unless_the_fleet_must_be_planned() {
        let fleet = vec![
            node("a", &[("site", "s1")], true),
            node("b", &[("site", "s2")], true),
            node("c", &[("site", "s2")], false),
        ];
        let ds = wl(Kind::DaemonSet, "ds", &[], 0);
        let ds_s2 = wl(Kind::DaemonSet, "ds-s2", &[("site", "s2")], 0);
        let full = wl(Kind::Deployment, "full", &[], 2);
        let short = wl(Kind::Deployment, "short", &[("site", "s1")], 2);
        let very_short = wl(Kind::Deployment, "very-short", &[("site", "s1")], 3);
        let job = wl(Kind::Job, "job", &[("site", "s9")], 1);
        let ha = wl(Kind::Deployment, "ha", &[("site", "s1")], 1);
        let s1 = |n: &str| node(n, &[("site", "s1")], true);
        // every-node kinds by selector; a full Deployment stays where it is
        check_join(
            &fleet,
            &[ds.clone(), ds_s2.clone(), full.clone()],
            &[],
            s1("n"),
            Ok((&["ds"], &[])),
        );
        check_join(
            &fleet,
            &[ds.clone(), ds_s2.clone()],
            &[],
            node("n", &[("site", "s2")], true),
            Ok((&["ds", "ds-s2"], &[])),
        );
        // a Deployment one short takes the new node; a Job with no fitting node takes it
        check_join(
            &fleet,
            &[ds.clone(), short.clone()],
            &[],
            s1("n"),
            Ok((&["ds", "short"], &["short"])),
        );
        check_join(
            &fleet,
            std::slice::from_ref(&job),
            &[],
            node("n", &[("site", "s9")], true),
            Ok((&["job"], &["job"])),
        );
        // ... not while the new node is offline (joining counts as contact, but be exact)
        check_join(
            &fleet,
            std::slice::from_ref(&short),
            &[],
            node("n", &[("site", "s1")], false),
            Ok((&[], &[])),
        );
        // a node that fits nothing changes nothing
        check_join(
            &fleet,
            &[ds_s2.clone(), short.clone()],
            &[],
            node("n", &[("site", "s7")], true),
            Ok((&[], &[])),
        );
        // the fleet: a Deployment still short (its note counts the fleet), site failover
        check_join(
            &fleet,
            std::slice::from_ref(&very_short),
            &[],
            s1("n"),
            Err("stays short"),
        );
        check_join(&fleet, &[ds.clone(), ha.clone()], &[&ha], s1("n"), Err("site-failover"));
        // a site-failover workload that does not fit the node does not matter
        check_join(
            &fleet,
            &[ds.clone(), ha.clone()],
            &[&ha],
            node("n", &[("site", "s2")], true),
            Ok((&["ds"], &[])),
        );
    }
}
