//! The hub side of scheduling: turn stored nodes, objects, placements and rollouts into each
//! node's desired state. Placement is decided by `outpost_core::schedule`, which revision each
//! node gets by `outpost_core::waves`; this module only renders and diffs, as a pure function
//! of [`ScheduleInputs`] and `now` ([`plan`]).
//!
//! A change to objects recomputes every node ([`plan`]); a join plans the new node alone
//! ([`plan_join`], from that node's rows only) unless `outpost_core::schedule::place_joined`
//! says other nodes can change (a site-failover workload on its site, a Deployment it fills
//! only partly). Either way only nodes whose bundle changed get a new generation, and the store
//! writes only the placements that differ (`Store::commit_plan`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use outpost_api::site::{failover_options, FailoverOptions, SiteMember};
use outpost_api::{Kind, Object, ObjectId, PodTemplate, UnixMs, WorkloadSpec};
use outpost_core::render::{render, workload_key};
use outpost_core::schedule::{schedule, NodeView, PlacementDecision, WorkloadView};
use outpost_core::site_ha;
use outpost_core::waves::{desired_revision, prefetch};

use crate::store::{NodeChange, NodeRow, Plan, ScheduleInputs};

/// Online while the last contact (joining counts) is within `offline_after` of `now`.
pub fn is_online(node: &NodeRow, offline_after: Duration, now: UnixMs) -> bool {
    now.saturating_sub(node.last_contact()) <= offline_after.as_millis() as i64
}

pub fn status_word(online: bool) -> &'static str {
    if online {
        "Online"
    } else {
        "Offline"
    }
}

/// Node selector and replica count of a workload object.
pub fn workload_view(obj: &Object) -> Option<WorkloadView> {
    // Container-less kinds on every node they select, like DaemonSets.
    let every_selected = |node_selector: &outpost_api::Labels| WorkloadView {
        id: obj.id(),
        node_selector: node_selector.clone(),
        affinity: None,
        replicas: 0,
    };
    match obj {
        Object::AgentUpdate(u) => return Some(every_selected(&u.spec.node_selector)),
        Object::Pipeline(p) => return Some(every_selected(&p.spec.node_selector)),
        _ => {}
    }
    let replicas = match obj {
        Object::Deployment(d) => d.spec.replicas,
        Object::DaemonSet(_) => 0,
        Object::Job(_) | Object::CronJob(_) => 1,
        _ => return None,
    };
    let pod = &obj.template()?.spec;
    Some(WorkloadView {
        id: obj.id(),
        node_selector: pod.node_selector.clone(),
        affinity: pod
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|n| n.required_during_scheduling_ignored_during_execution.clone()),
        replicas,
    })
}

/// A workload object at an earlier revision: its pod template (an AgentUpdate's or a
/// Pipeline's spec) replaced by that revision's, as `crate::store` keeps it. Err says why not.
pub fn at_revision(obj: &Object, stored: &serde_json::Value) -> Result<Object, String> {
    fn from<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> Result<T, String> {
        serde_json::from_value(v.clone()).map_err(|e| e.to_string())
    }
    let mut o = obj.clone();
    match &mut o {
        Object::Deployment(d) => d.spec.template = from::<PodTemplate>(stored)?,
        Object::DaemonSet(d) => d.spec.template = from::<PodTemplate>(stored)?,
        Object::AgentUpdate(u) => u.spec = from(stored)?,
        Object::Pipeline(p) => p.spec = from(stored)?,
        _ => return Err(format!("{} is not a workload", obj.id())),
    }
    Ok(o)
}

/// A workload's objects and rendered specs by revision, for one planning run: the object at a
/// revision (its stored template), its per-target variants (`outpost_core::gitops::VARIANTS`)
/// and each node's variant rendered, each computed once.
struct Revisions<'a> {
    stored: &'a crate::store::StoredObject,
    templates: &'a BTreeMap<(ObjectId, u64), serde_json::Value>,
    src: &'a BTreeMap<ObjectId, Object>,
    /// Whether the current revision carries variants (a GitOps fleet workload).
    fleet: bool,
    /// revision -> its variants (empty: the object itself), None when the template is gone.
    at: BTreeMap<u64, Option<(Object, Vec<Object>)>>,
    /// (revision, variant index, revision number rendered) -> spec
    specs: BTreeMap<(u64, usize, u64), Option<WorkloadSpec>>,
}

impl<'a> Revisions<'a> {
    fn new(
        stored: &'a crate::store::StoredObject,
        templates: &'a BTreeMap<(ObjectId, u64), serde_json::Value>,
        src: &'a BTreeMap<ObjectId, Object>,
    ) -> Self {
        let mut r = Revisions {
            stored,
            templates,
            src,
            fleet: false,
            at: BTreeMap::new(),
            specs: BTreeMap::new(),
        };
        r.fleet = r.load(stored.revision).is_some_and(|(_, v)| !v.is_empty());
        r
    }

    fn load(&mut self, rev: u64) -> Option<&(Object, Vec<Object>)> {
        Self::load_into(&mut self.at, self.stored, self.templates, rev)
    }

    fn load_into<'m>(
        at: &'m mut BTreeMap<u64, Option<(Object, Vec<Object>)>>,
        stored: &crate::store::StoredObject,
        templates: &BTreeMap<(ObjectId, u64), serde_json::Value>,
        rev: u64,
    ) -> Option<&'m (Object, Vec<Object>)> {
        at.entry(rev)
            .or_insert_with(|| {
                let id = stored.object.id();
                let obj = if rev == stored.revision {
                    stored.object.clone()
                } else {
                    at_revision(&stored.object, templates.get(&(id.clone(), rev))?).ok()?
                };
                let variants = match outpost_core::gitops::variants_of(&obj) {
                    Ok(v) => v.into_iter().map(|(_, o)| o).collect(),
                    Err(e) => {
                        tracing::warn!(workload = %id, revision = rev, error = %e, "workload variants unreadable; its nodes get the object as it is");
                        Vec::new()
                    }
                };
                Some((obj, variants))
            })
            .as_ref()
    }

    /// The spec `node` gets at revision `rev` (its variant, for a fleet workload).
    fn spec(&mut self, rev: u64, node: &str, labels: &outpost_api::Labels) -> Option<WorkloadSpec> {
        self.variant_at(rev, node, labels, rev)
    }

    /// `node`'s variant at revision `rev`, rendered with the revision number `number`.
    fn variant_at(&mut self, rev: u64, node: &str, labels: &outpost_api::Labels, number: u64) -> Option<WorkloadSpec> {
        let (obj, variants) = Self::load_into(&mut self.at, self.stored, self.templates, rev)?;
        let index = if variants.is_empty() {
            0
        } else {
            1 + variants
                .iter()
                .position(|o| outpost_core::gitops::fits(o, node, labels))?
        };
        if let Some(spec) = self.specs.get(&(rev, index, number)) {
            return spec.clone();
        }
        let obj = if index == 0 { obj } else { &variants[index - 1] };
        let spec = render(obj, number, self.src);
        self.specs.insert((rev, index, number), spec.clone());
        spec
    }
}

/// Compute placements and per-node changes. Pure.
///
/// Which revision of a workload each node gets is the rollout's decision
/// (`outpost_core::waves::desired_revision`): nodes in waves not yet open keep the revision
/// they had, rendered from its stored pod template; nodes waiting for their maintenance window
/// get the new revision as a prefetch hint.
pub fn plan(inputs: &ScheduleInputs, offline_after: Duration, now: UnixMs) -> Plan {
    let nodes: Vec<NodeView> = inputs
        .nodes
        .iter()
        .map(|n| NodeView {
            name: n.name.clone(),
            labels: n.labels.clone(),
            online: is_online(n, offline_after, now),
        })
        .collect();
    let workloads: Vec<WorkloadView> = inputs.objects.iter().filter_map(|o| workload_view(&o.object)).collect();
    // Site failover (docs/site-ha.md): one active and its standbys on one site, placed apart.
    let failover: BTreeMap<ObjectId, FailoverOptions> = inputs
        .objects
        .iter()
        .filter_map(|o| failover_options(&o.object).map(|f| (o.object.id(), f)))
        .collect();
    let (site_ha, workloads): (Vec<WorkloadView>, Vec<WorkloadView>) =
        workloads.into_iter().partition(|w| failover.contains_key(&w.id));
    let mut decisions = schedule(&nodes, &workloads, &inputs.assignments);
    let mut members: BTreeMap<ObjectId, Vec<SiteMember>> = BTreeMap::new();
    let none = BTreeSet::new();
    for w in &site_ha {
        let current = inputs.assignments.get(&w.id).unwrap_or(&none);
        let (d, m) = site_ha::place(
            &w.id,
            failover[&w.id].standbys,
            &nodes,
            |n| w.fits(&n.name, &n.labels),
            current,
        );
        decisions.insert(w.id.clone(), d);
        members.insert(w.id.clone(), m);
    }
    render_plan(inputs, &nodes, &decisions, &members, &failover)
}

/// What a join of `nodes` (already stored, in `inputs`, which need hold only those nodes'
/// rows: `Store::schedule_inputs_for`) changes, when only their desired state can change
/// (`outpost_core::schedule::place_joined`): their plan (their bundles; Deployment placements
/// as stored plus the ones they fill) and the Deployments they filled (their notes go). The
/// nodes are placed one after another, each seeing the placements the ones before it filled,
/// as the same joins one at a time would. Err: plan the whole fleet ([`plan`]). Pure.
pub fn plan_join(
    inputs: &ScheduleInputs,
    nodes: &[String],
    offline_after: Duration,
    now: UnixMs,
) -> Result<(Plan, BTreeSet<ObjectId>), &'static str> {
    let workloads: Vec<WorkloadView> = inputs.objects.iter().filter_map(|o| workload_view(&o.object)).collect();
    let site_ha: BTreeSet<ObjectId> = inputs
        .objects
        .iter()
        .filter(|o| failover_options(&o.object).is_some())
        .map(|o| o.object.id())
        .collect();
    let mut assignments = inputs.assignments.clone();
    let mut views = Vec::with_capacity(nodes.len());
    let mut decisions: BTreeMap<ObjectId, PlacementDecision> = BTreeMap::new();
    let mut filled_all = BTreeSet::new();
    for node in nodes {
        let n = inputs
            .nodes
            .iter()
            .find(|n| &n.name == node)
            .ok_or("a joined node is not in the store")?;
        let view = NodeView {
            name: n.name.clone(),
            labels: n.labels.clone(),
            online: is_online(n, offline_after, now),
        };
        let (runs, filled) = match outpost_core::schedule::place_joined(&view, &workloads, &site_ha, &assignments) {
            outpost_core::schedule::JoinEffect::Node { runs, filled } => (runs, filled),
            outpost_core::schedule::JoinEffect::Fleet(why) => return Err(why),
        };
        for id in runs {
            decisions
                .entry(id)
                .or_insert_with(|| PlacementDecision {
                    nodes: BTreeSet::new(),
                    note: None,
                })
                .nodes
                .insert(view.name.clone());
        }
        for id in &filled {
            assignments.entry(id.clone()).or_default().insert(view.name.clone());
        }
        filled_all.extend(filled);
        views.push(view);
    }
    let mut plan = render_plan(inputs, &views, &decisions, &BTreeMap::new(), &BTreeMap::new());
    plan.assignments = assignments;
    plan.notes.clear();
    Ok((plan, filled_all))
}

/// Render the desired state of `nodes` from placement decisions and diff it against what each
/// holds. Decisions may name nodes outside `nodes`; only `nodes` get bundles.
fn render_plan(
    inputs: &ScheduleInputs,
    nodes: &[NodeView],
    decisions: &BTreeMap<ObjectId, PlacementDecision>,
    members: &BTreeMap<ObjectId, Vec<SiteMember>>,
    failover: &BTreeMap<ObjectId, FailoverOptions>,
) -> Plan {
    let objects: BTreeMap<ObjectId, Object> = inputs
        .objects
        .iter()
        .map(|o| (o.object.id(), o.object.clone()))
        .collect();
    let mut want: BTreeMap<String, BTreeMap<String, WorkloadSpec>> =
        nodes.iter().map(|n| (n.name.clone(), BTreeMap::new())).collect();
    let mut hints: BTreeMap<String, BTreeMap<String, WorkloadSpec>> = BTreeMap::new();
    let mut out = Plan::default();
    let empty_revs = BTreeMap::new();
    let empty_labels = outpost_api::Labels::new();
    let labels_of: BTreeMap<&str, &outpost_api::Labels> =
        inputs.nodes.iter().map(|n| (n.name.as_str(), &n.labels)).collect();
    for stored in &inputs.objects {
        let id = stored.object.id();
        let Some(decision) = decisions.get(&id) else {
            continue;
        };
        if let Some(note) = &decision.note {
            out.notes.insert(id.clone(), note.clone());
        }
        if !matches!(id.kind, Kind::DaemonSet | Kind::AgentUpdate | Kind::Pipeline) {
            out.assignments.insert(id.clone(), decision.nodes.clone());
        }
        if decision.nodes.is_empty() {
            continue;
        }
        let mut revs = Revisions::new(stored, &inputs.templates, &objects);
        let rollout = inputs.rollouts.get(&workload_key(&id));
        for n in &decision.nodes {
            let labels = labels_of.get(n.as_str()).copied().unwrap_or(&empty_labels);
            let Some(current) = revs.spec(stored.revision, n, labels) else {
                continue;
            };
            debug_assert_eq!(current.key, workload_key(&id));
            let held_rev = inputs
                .held_revisions
                .get(n)
                .unwrap_or(&empty_revs)
                .get(&current.key)
                .copied();
            let rev = desired_revision(rollout, stored.revision, held_rev, n);
            if rev == crate::rollouts::AGENT_AS_INSTALLED {
                continue; // an AgentUpdate whose wave has not reached this node: none yet
            }
            let spec = if rev == stored.revision {
                current
            } else {
                if rollout.is_some_and(|r| r.revision == stored.revision && prefetch(r, n)) {
                    hints
                        .entry(n.clone())
                        .or_default()
                        .insert(current.key.clone(), current.clone());
                }
                // the revision's template is gone: the current one is all there is
                revs.spec(rev, n, labels).unwrap_or(current)
            };
            let wrap = |spec: WorkloadSpec| match (failover.get(&id), members.get(&id)) {
                (Some(o), Some(m)) => site_ha::with_failover(spec, o, m),
                _ => spec,
            };
            let mut spec = wrap(spec);
            // A fleet workload's node whose variant is the same at the revision it is handed
            // as at the one it holds keeps what it holds: a commit that changes one site's
            // variant leaves the other sites' workloads running untouched.
            // (Not for a site-failover workload: its spec carries the members, which the
            // rollout controller's same check cannot see; such a fleet workload's nodes all
            // take each revision.)
            if revs.fleet && !failover.contains_key(&id) {
                let held_hash = inputs.held.get(n).and_then(|h| h.get(&spec.key));
                if let (Some(h), Some(hash)) = (held_rev.filter(|h| *h != spec.revision), held_hash) {
                    if let Some(same) = revs.variant_at(rev, n, labels, h).map(wrap) {
                        if same.hash == *hash {
                            spec = same;
                        }
                    }
                }
            }
            if let Some(bundle) = want.get_mut(n) {
                bundle.insert(spec.key.clone(), spec);
            }
        }
    }
    let empty = BTreeMap::new();
    for (node, mut bundle) in want {
        let held = inputs.held.get(&node).unwrap_or(&empty);
        let (up, remove) = outpost_core::bundle_changes(held, &bundle);
        let node_hints = hints.remove(&node).unwrap_or_default();
        let held_hints = inputs.held_prefetch.get(&node).unwrap_or(&empty);
        let hints_changed =
            held_hints.len() != node_hints.len() || node_hints.iter().any(|(k, s)| held_hints.get(k) != Some(&s.hash));
        if up.is_empty() && remove.is_empty() && !hints_changed {
            continue;
        }
        let upsert = up.iter().filter_map(|k| bundle.remove(k)).collect();
        out.changes.insert(
            node,
            NodeChange {
                upsert,
                remove,
                prefetch: hints_changed.then(|| node_hints.into_values().collect()),
            },
        );
    }
    out
}

/// Nodes placed per workload, from the nodes' desired rows: workload key -> nodes.
pub fn placed_by_key(rows: &[crate::store::DesiredRow]) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in rows {
        out.entry(r.key.clone()).or_default().insert(r.node.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoredObject;
    use outpost_api::parse_file;

    fn node(name: &str, labels: &[(&str, &str)], last_seen: Option<UnixMs>) -> NodeRow {
        NodeRow {
            name: name.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            cert_fp: format!("fp-{name}"),
            cert_not_after: 0,
            joined_at: 0,
            last_seen,
            generation: 1,
            applied_generation: 0,
            agent_version: None,
            uptime_secs: None,
        }
    }

    fn objects(yaml: &str) -> Vec<StoredObject> {
        parse_file("t.yaml", yaml)
            .expect("valid test manifest")
            .objects
            .into_iter()
            .map(|object| StoredObject {
                object,
                template_hash: None,
                revision: 1,
                created_at: 0,
                updated_at: 0,
            })
            .collect()
    }

    const DS: &str = "apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent}
spec:
  template:
    spec:
      nodeSelector: {site: a}
      containers: [{name: c, image: busybox}]
";

    #[test]
    fn online_counts_join_as_contact() {
        let d = Duration::from_secs(90);
        let mut n = node("a", &[], None);
        n.joined_at = 1_000;
        assert!(is_online(&n, d, 1_000 + 90_000));
        assert!(!is_online(&n, d, 1_000 + 90_001));
        n.last_seen = Some(100_000);
        assert!(is_online(&n, d, 150_000));
    }

    #[test]
    fn daemonset_lands_on_matching_nodes_and_leaves_when_labels_change() {
        let mut inputs = ScheduleInputs {
            nodes: vec![
                node("a", &[("site", "a")], Some(0)),
                node("b", &[("site", "b")], Some(0)),
            ],
            objects: objects(DS),
            ..Default::default()
        };
        let p = plan(&inputs, Duration::from_secs(90), 0);
        assert_eq!(p.changes.keys().collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(p.changes["a"].upsert[0].key, "daemonset/default/agent");
        // Holding the same hash: nothing to do.
        let hash = p.changes["a"].upsert[0].hash.clone();
        inputs
            .held
            .insert("a".into(), [("daemonset/default/agent".to_string(), hash)].into());
        assert!(plan(&inputs, Duration::from_secs(90), 0).changes.is_empty());
        // Node a no longer matches: removal.
        inputs.nodes[0].labels.insert("site".into(), "c".into());
        let p = plan(&inputs, Duration::from_secs(90), 0);
        assert_eq!(p.changes["a"].remove, vec!["daemonset/default/agent".to_string()]);
    }

    #[test]
    fn failover_deployment_goes_to_one_site_with_its_members() {
        let site = |s: &str, ip: &str| {
            vec![
                ("site", s.to_string()),
                (outpost_api::site::SITE_IP_LABEL, ip.to_string()),
            ]
        };
        let mk = |name: &str, l: Vec<(&str, String)>| {
            let l: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
            node(name, &l, Some(0))
        };
        let inputs = ScheduleInputs {
            nodes: vec![
                mk("a1", site("a", "10.0.0.1")),
                mk("b1", site("b", "10.0.1.1")),
                mk("b2", site("b", "10.0.1.2")),
                mk("b3", site("b", "10.0.1.3")),
            ],
            objects: objects(
                "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: gw\n  annotations: {outpost.dev/failover: site, outpost.dev/failover-standbys: '2'}\nspec:\n  template:\n    spec:\n      containers: [{name: c, image: nginx}]\n",
            ),
            ..Default::default()
        };
        let p = plan(&inputs, Duration::from_secs(90), 0);
        assert_eq!(p.changes.keys().collect::<Vec<_>>(), vec!["b1", "b2", "b3"]);
        let specs: Vec<&WorkloadSpec> = p.changes.values().map(|c| &c.upsert[0]).collect();
        let fo = specs[0].failover.as_ref().expect("failover part");
        assert_eq!(fo.options.standbys, 2);
        let mut addrs: Vec<&str> = fo.members.iter().filter_map(|m| m.address.as_deref()).collect();
        addrs.sort();
        assert_eq!(addrs, vec!["10.0.1.1:7946", "10.0.1.2:7946", "10.0.1.3:7946"]);
        // The same spec, hash included, on every member; the hash covers the members.
        assert!(specs.iter().all(|s| *s == specs[0]));
        let mut bare = specs[0].clone();
        bare.failover = None;
        bare.hash = String::new();
        assert_ne!(outpost_api::content_hash(&bare), specs[0].hash);
    }

    /// A fleet workload (GitOps variants): each node gets its own variant; a revision that
    /// changes one site's variant leaves the other site's node as it is (revision included).
    #[test]
    fn fleet_workload_nodes_get_their_variant_and_unchanged_ones_stay() {
        use outpost_core::gitops::{combine, placement_terms, TargetObjects, Targets};
        let by = Targets::OverlaysBy { label: "site".into() };
        let overlays: BTreeSet<String> = ["berlin", "shanghai"].iter().map(|s| s.to_string()).collect();
        let ds = |arg: &str| {
            serde_json::json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "web"},
                "spec": {"template": {"spec": {"runtimeClassName": "process",
                "containers": [{"name": "c", "image": "x", "command": ["/bin/sleep", arg]}]}}}})
        };
        let fleet = |berlin: &str, shanghai: &str, revision: u64| {
            let r = |t: &str, o| TargetObjects {
                target: t.into(),
                terms: placement_terms(&by, t, &overlays).unwrap(),
                objects: vec![o],
            };
            let out = combine(&[r("base", ds("0")), r("berlin", ds(berlin)), r("shanghai", ds(shanghai))]).unwrap();
            let mut o = objects(&serde_json::to_string(&out[0]).unwrap());
            o[0].revision = revision;
            o
        };
        let command = |spec: &WorkloadSpec| spec.containers[0].command[1].clone();
        let mut inputs = ScheduleInputs {
            nodes: vec![
                node("b", &[("site", "berlin")], Some(0)),
                node("s", &[("site", "shanghai")], Some(0)),
                node("p", &[("site", "paris")], Some(0)),
            ],
            objects: fleet("1", "3", 1),
            ..Default::default()
        };
        let p = plan(&inputs, Duration::from_secs(90), 0);
        let got: Vec<(&str, String, u64)> = p
            .changes
            .iter()
            .map(|(n, c)| (n.as_str(), command(&c.upsert[0]), c.upsert[0].revision))
            .collect();
        assert_eq!(got, [("b", "1".into(), 1), ("p", "0".into(), 1), ("s", "3".into(), 1)]);
        assert!(p.changes.values().all(|c| c.upsert[0].key == "daemonset/default/web"));
        assert_ne!(
            p.changes["b"].upsert[0].hash, p.changes["s"].upsert[0].hash,
            "two variants"
        );
        for (n, c) in &p.changes {
            let s = &c.upsert[0];
            inputs.held.insert(n.clone(), [(s.key.clone(), s.hash.clone())].into());
            inputs.held_revisions.insert(n.clone(), [(s.key.clone(), 1)].into());
        }
        // Revision 2 changes berlin's variant only; the templates of revision 1 are stored.
        let old = &fleet("1", "3", 1)[0].object;
        inputs
            .templates
            .insert((old.id(), 1), serde_json::to_value(old.template().unwrap()).unwrap());
        inputs.objects = fleet("2", "3", 2);
        let complete: outpost_core::waves::Rollout = serde_json::from_value(serde_json::json!({
            "workload": "daemonset/default/web", "revision": 2, "phase": "Complete",
            "policy": "default", "started_at": 0, "updated_at": 0}))
        .unwrap();
        inputs.rollouts.insert(complete.workload.clone(), complete);
        let p = plan(&inputs, Duration::from_secs(90), 0);
        assert_eq!(
            p.changes.keys().collect::<Vec<_>>(),
            ["b"],
            "only berlin's node changes"
        );
        assert_eq!(command(&p.changes["b"].upsert[0]), "2");
        assert_eq!(p.changes["b"].upsert[0].revision, 2);
        // Paris moves to berlin: it gets berlin's variant.
        inputs.nodes[2].labels.insert("site".into(), "berlin".into());
        let p = plan(&inputs, Duration::from_secs(90), 0);
        assert_eq!(command(&p.changes["p"].upsert[0]), "2");
    }

    #[test]
    fn deployment_short_of_nodes_gets_a_note_and_assignments() {
        let inputs = ScheduleInputs {
            nodes: vec![node("a", &[], Some(0))],
            objects: objects(
                "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 2\n  template:\n    spec:\n      containers: [{name: c, image: nginx}]\n",
            ),
            ..Default::default()
        };
        let p = plan(&inputs, Duration::from_secs(90), 0);
        let (id, nodes) = p.assignments.iter().next().expect("one deployment");
        assert_eq!(nodes.iter().collect::<Vec<_>>(), vec!["a"]);
        assert!(p.notes[id].starts_with("1 of 2 replicas"), "{:?}", p.notes);
    }

    /// A join plans the new node alone: the same bundle and placements as planning the whole
    /// fleet, and no other node touched; a site-failover workload that fits it needs the fleet.
    #[test]
    fn a_join_plans_the_new_node_alone() {
        let yaml = format!(
            "{DS}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\nspec:\n  replicas: 2\n  template:\n    spec:\n      nodeSelector: {{site: a}}\n      containers: [{{name: c, image: nginx}}]\n"
        );
        let d = Duration::from_secs(90);
        let fleet = ScheduleInputs {
            nodes: vec![
                node("a1", &[("site", "a")], Some(0)),
                node("b1", &[("site", "b")], Some(0)),
            ],
            objects: objects(&yaml),
            ..Default::default()
        };
        // the fleet as stored after its own reschedule
        let first = plan(&fleet, d, 0);
        let mut stored = fleet.clone();
        stored.assignments = first.assignments.clone();
        for (n, c) in &first.changes {
            stored.held.insert(
                n.clone(),
                c.upsert.iter().map(|s| (s.key.clone(), s.hash.clone())).collect(),
            );
            stored.held_revisions.insert(
                n.clone(),
                c.upsert.iter().map(|s| (s.key.clone(), s.revision)).collect(),
            );
        }
        // a2 joins: the full plan changes a2 only; the join plan, from a2's rows alone, agrees
        let mut full_in = stored.clone();
        full_in.nodes.push(node("a2", &[("site", "a")], Some(0)));
        let full = plan(&full_in, d, 0);
        assert_eq!(full.changes.keys().collect::<Vec<_>>(), ["a2"]);
        let mut one = stored.clone();
        one.nodes = vec![node("a2", &[("site", "a")], Some(0))];
        one.held.clear();
        one.held_revisions.clear();
        let (joined, filled) = plan_join(&one, &["a2".into()], d, 0).expect("node only");
        assert_eq!(joined.changes, full.changes);
        assert_eq!(joined.assignments, full.assignments);
        assert_eq!(filled.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), ["web"]);
        assert!(joined.notes.is_empty());
        // a node of another site gets nothing
        one.nodes = vec![node("c1", &[("site", "c")], Some(0))];
        let (other, filled) = plan_join(&one, &["c1".into()], d, 0).expect("node only");
        assert!(other.changes.is_empty() && filled.is_empty());
        assert_eq!(other.assignments, stored.assignments);
        // site failover on the node's site: the fleet
        let ha = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: till\n  annotations: {outpost.dev/failover: site}\nspec:\n  replicas: 1\n  template:\n    spec:\n      nodeSelector: {site: a}\n      containers: [{name: c, image: nginx}]\n";
        let mut with_ha = one.clone();
        with_ha.nodes = vec![node("a2", &[("site", "a")], Some(0))];
        with_ha.objects = objects(ha);
        assert!(failover_options(&with_ha.objects[0].object).is_some());
        assert!(plan_join(&with_ha, &["a2".into()], d, 0).is_err());

        // Several joins planned together: what the same joins one at a time give (a2 fills
        // web, a3 comes after it and only gets the DaemonSet; c1 gets nothing).
        let mut group = stored.clone();
        group.nodes = ["a2", "a3", "c1"]
            .map(|n| node(n, &[("site", if n == "c1" { "c" } else { "a" })], Some(0)))
            .into();
        group.held.clear();
        group.held_revisions.clear();
        let names: Vec<String> = ["a2", "a3", "c1"].map(String::from).into();
        let (joined, filled) = plan_join(&group, &names, d, 0).expect("nodes only");
        let mut one_by_one = group.clone();
        let mut changes = BTreeMap::new();
        for n in &names {
            let (p, _) = plan_join(&one_by_one, std::slice::from_ref(n), d, 0).expect("node only");
            one_by_one.assignments = p.assignments;
            changes.extend(p.changes);
        }
        assert_eq!(joined.changes, changes);
        assert_eq!(joined.assignments, one_by_one.assignments);
        let keys = |n: &str| joined.changes.get(n).map(|c| c.upsert.len()).unwrap_or(0);
        assert_eq!((keys("a2"), keys("a3"), keys("c1")), (2, 1, 0));
        assert_eq!(filled.len(), 1);
    }
}
