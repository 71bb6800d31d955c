//! GitOps decisions (issue 12), pure: which rendered variant a node gets, when a repository is
//! fetched next, and whether a fetched commit is applied.
//!
//! ```text
//!   idle --(poll interval | webhook)--> fetch --ok--> render every target --all ok--> apply commit
//!     ^                                   |                    |                         |
//!     |                                 error              any error                     |
//!     |                                   v                    v                         |
//!     +------------- backoff (capped, jitter) <---- reject the whole commit, alert       |
//!     +----------------------------------------------------------------------------------+
//! ```
//!
//! Invariants: a commit is applied only when every target renders (a commit that fails for one
//! site changes no site); the running commit stays until a later commit renders everywhere; a
//! repository in error is never fetched more often than its poll interval, and less and less
//! often as failures repeat (doubling to [`FETCH_RETRY`]'s cap of 10 min, with jitter), so a
//! broken remote is not hammered; a webhook fetches at
//! once, even during a backoff, because a push is what usually repairs a repository.

use std::collections::BTreeSet;

use outpost_api::{Labels, NodeSelectorRequirement, NodeSelectorTerm, Object, UnixMs};
use serde_json::Value;

use crate::retry::Policy;
use crate::schedule::selector_matches;

/// After fetch failures: 5 s doubling to 10 min, + up to 20 %.
pub const FETCH_RETRY: Policy = Policy {
    base_ms: 5_000,
    max_ms: 600_000,
    jitter_pct: 20,
    give_up_after_ms: None,
};

/// An explicit target: nodes matching `node_selector` get the render of `path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub path: String,
    pub node_selector: Labels,
}

/// How a repository's directories map to nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Targets {
    /// First match wins; a node no target matches gets nothing from this repository.
    Explicit(Vec<Target>),
    /// `overlays/<value of label>/` for nodes carrying `label`, when that overlay exists;
    /// `base/` for every other node.
    OverlaysBy { label: String },
}

/// The directory (relative to the repository's path) a node's variant renders from, and the
/// target's name; `None` when no target applies. `overlays` lists the overlay directory names
/// present in the commit.
pub fn target_for(targets: &Targets, node_labels: &Labels, overlays: &BTreeSet<String>) -> Option<(String, String)> {
    match targets {
        Targets::Explicit(list) => list
            .iter()
            .find(|t| selector_matches(&t.node_selector, node_labels))
            .map(|t| (t.name.clone(), t.path.clone())),
        Targets::OverlaysBy { label } => match node_labels.get(label) {
            Some(v) if overlays.contains(v) => Some((v.clone(), format!("overlays/{v}"))),
            _ => Some(("base".into(), "base".into())),
        },
    }
}

/// What the fetcher remembers between runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FetchState {
    /// When the last fetch finished (successfully or not).
    pub last_fetch: Option<UnixMs>,
    /// Failed fetches since the last good one.
    pub failures: u32,
    /// A webhook asked for a fetch that has not happened yet (not kept across restarts).
    #[serde(skip)]
    pub webhook_pending: bool,
}

/// When the next fetch is due (`<= now`: fetch now). `draw` in `[0, 1]` is the jitter draw.
pub fn next_fetch(state: &FetchState, poll_every_ms: u64, now: UnixMs, draw: f64) -> UnixMs {
    let Some(last) = state.last_fetch else { return now };
    if state.webhook_pending {
        return now;
    }
    let wait = if state.failures == 0 {
        poll_every_ms
    } else {
        FETCH_RETRY.delay_ms(state.failures - 1, draw).max(poll_every_ms)
    };
    last.saturating_add(i64::try_from(wait).unwrap_or(i64::MAX))
}

/// The render of one target for a fetched commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetRender {
    pub target: String,
    /// `Err(reason)` naming file and field.
    pub result: Result<(), String>,
}

/// What to do with a fetched commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommitDecision {
    /// The commit already runs (or was already rejected): nothing to do.
    Nothing,
    /// Every target rendered: apply the commit as one command (one rollout).
    Apply,
    /// Some target failed: nothing of the commit is applied, the running commit stays, an
    /// alert fires with these (target, reason) pairs.
    Reject(Vec<(String, String)>),
}

/// Decides on `fetched` given the commit that runs and the last one rejected.
pub fn decide_commit(
    running: Option<&str>,
    rejected: Option<&str>,
    fetched: &str,
    renders: &[TargetRender],
) -> CommitDecision {
    if running == Some(fetched) || rejected == Some(fetched) {
        return CommitDecision::Nothing;
    }
    let failures: Vec<(String, String)> = renders
        .iter()
        .filter_map(|r| r.result.as_ref().err().map(|e| (r.target.clone(), e.clone())))
        .collect();
    if failures.is_empty() {
        CommitDecision::Apply
    } else {
        CommitDecision::Reject(failures)
    }
}

/// The label every node carries (the hub sets it): `Exists` on it is a term every node matches.
const EVERY_NODE_KEY: &str = "kubernetes.io/hostname";

fn req(key: &str, operator: &str, values: Vec<String>) -> NodeSelectorRequirement {
    NodeSelectorRequirement {
        key: key.into(),
        operator: operator.into(),
        values,
    }
}

/// Most terms a target's placement may have (first-match-wins over many selectors multiplies).
pub const MAX_TERMS: usize = 256;

/// The required node-affinity terms (ORed) that hold exactly for the nodes [`target_for`] gives
/// `target`: for explicit targets its selector and no earlier target's; for `overlaysBy`,
/// `label In [value]` for an overlay and `label NotIn [every overlay]` for `base`. An empty
/// list: no node can get this target (an earlier target matches every node).
pub fn placement_terms(
    targets: &Targets,
    target: &str,
    overlays: &BTreeSet<String>,
) -> Result<Vec<NodeSelectorTerm>, String> {
    let term = |exprs: Vec<NodeSelectorRequirement>| NodeSelectorTerm {
        match_expressions: if exprs.is_empty() {
            vec![req(EVERY_NODE_KEY, "Exists", vec![])]
        } else {
            exprs
        },
        match_fields: vec![],
    };
    match targets {
        Targets::OverlaysBy { label } => Ok(if target == "base" {
            if overlays.is_empty() {
                vec![term(vec![])]
            } else {
                vec![term(vec![req(label, "NotIn", overlays.iter().cloned().collect())])]
            }
        } else {
            vec![term(vec![req(label, "In", vec![target.to_string()])])]
        }),
        Targets::Explicit(list) => {
            let Some(i) = list.iter().position(|t| t.name == target) else {
                return Err(format!("no target {target:?}"));
            };
            let own: Vec<NodeSelectorRequirement> = list[i]
                .node_selector
                .iter()
                .map(|(k, v)| req(k, "In", vec![v.clone()]))
                .collect();
            let mut terms: Vec<Vec<NodeSelectorRequirement>> = vec![own];
            for earlier in &list[..i] {
                // not (k1=v1 and k2=v2) = k1 NotIn [v1] or k2 NotIn [v2]
                let mut next = Vec::new();
                for t in &terms {
                    for (k, v) in &earlier.node_selector {
                        let mut t = t.clone();
                        t.push(req(k, "NotIn", vec![v.clone()]));
                        next.push(t);
                    }
                }
                if next.len() > MAX_TERMS {
                    return Err(format!(
                        "target {target:?}: excluding the nodes of the {i} targets before it needs more than {MAX_TERMS} affinity terms; use fewer labels per nodeSelector or overlaysBy"
                    ));
                }
                terms = next;
            }
            Ok(terms.into_iter().map(term).collect())
        }
    }
}

/// `a AND b` for two ORed term lists (each term's expressions are ANDed).
pub fn and_terms(a: &[NodeSelectorTerm], b: &[NodeSelectorTerm]) -> Vec<NodeSelectorTerm> {
    let mut out = Vec::new();
    for x in a {
        for y in b {
            let mut t = x.clone();
            t.match_expressions.extend(y.match_expressions.iter().cloned());
            t.match_fields.extend(y.match_fields.iter().cloned());
            if !out.contains(&t) {
                out.push(t);
            }
        }
    }
    out
}

/// One target's render: its name, the nodes it is for, and the rendered objects (as the
/// Kustomize engine prints them).
#[derive(Clone, Debug)]
pub struct TargetObjects {
    pub target: String,
    pub terms: Vec<NodeSelectorTerm>,
    pub objects: Vec<Value>,
}

fn object_key(o: &Value) -> (String, String, String) {
    let s = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("").to_string();
    let meta = o.get("metadata");
    let ns = s(meta.and_then(|m| m.get("namespace")));
    (
        s(o.get("kind")),
        if ns.is_empty() { "default".into() } else { ns },
        s(meta.and_then(|m| m.get("name"))),
    )
}

/// Where the pod spec of a workload kind sits.
fn pod_spec_path(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "Deployment" | "DaemonSet" | "Job" => Some(&["spec", "template", "spec"]),
        "CronJob" => Some(&["spec", "jobTemplate", "spec", "template", "spec"]),
        _ => None,
    }
}

/// Restrict a workload to `terms`, ANDed with its own required node affinity.
fn restrict(o: &mut Value, kind: &str, terms: &[NodeSelectorTerm]) -> Result<(), String> {
    let Some(path) = pod_spec_path(kind) else { return Ok(()) };
    let mut at = &mut *o;
    for p in path {
        at = at
            .as_object_mut()
            .ok_or_else(|| format!("{p}: not a mapping"))?
            .entry(p.to_string())
            .or_insert_with(|| Value::Object(Default::default()));
    }
    let spec = at.as_object_mut().ok_or("pod spec: not a mapping")?;
    let na = spec
        .entry("affinity")
        .or_insert_with(|| Value::Object(Default::default()))
        .as_object_mut()
        .ok_or("affinity: not a mapping")?
        .entry("nodeAffinity")
        .or_insert_with(|| Value::Object(Default::default()))
        .as_object_mut()
        .ok_or("nodeAffinity: not a mapping")?;
    let key = "requiredDuringSchedulingIgnoredDuringExecution";
    let own: Vec<NodeSelectorTerm> = match na.get(key) {
        Some(v) => {
            serde_json::from_value::<outpost_api::NodeSelector>(v.clone())
                .map_err(|e| format!("affinity.nodeAffinity.{key}: {e}"))?
                .node_selector_terms
        }
        None => Vec::new(),
    };
    let terms = if own.is_empty() {
        terms.to_vec()
    } else {
        and_terms(&own, terms)
    };
    na.insert(
        key.into(),
        serde_json::json!({ "nodeSelectorTerms": serde_json::to_value(terms).map_err(|e| e.to_string())? }),
    );
    Ok(())
}

/// The annotation, on a fleet workload's pod template, that carries its per-target variants
/// (a JSON list of [`Variant`]). It sits in the template so that the template's hash (the
/// workload's revision) covers every variant: a commit that changes one site's variant is one
/// new revision of the one workload, and each stored revision keeps the variants it had.
pub const VARIANTS: &str = "outpost.dev/variants";

/// One per-target variant of a fleet workload: the targets that render it, and the whole
/// object as they render it (restricted to their nodes by a required node affinity).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Variant {
    pub targets: Vec<String>,
    pub object: Value,
}

/// The variants a workload carries, parsed, in order; empty for a workload without them (every
/// hand-applied one). Err names what is wrong with the annotation.
pub fn variants_of(obj: &Object) -> Result<Vec<(Vec<String>, Object)>, String> {
    let Some(raw) = obj
        .template()
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.annotations.get(VARIANTS))
    else {
        return Ok(Vec::new());
    };
    let list: Vec<Variant> =
        serde_json::from_str(raw).map_err(|e| format!("annotation {VARIANTS}: not a list of variants: {e}"))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, v) in list.into_iter().enumerate() {
        let o: Object =
            serde_json::from_value(v.object).map_err(|e| format!("annotation {VARIANTS}: variant {}: {e}", i + 1))?;
        if o.id() != obj.id() {
            return Err(format!(
                "annotation {VARIANTS}: variant {} is {}, not {}",
                i + 1,
                o.id(),
                obj.id()
            ));
        }
        out.push((v.targets, o));
    }
    Ok(out)
}

/// Whether a node may run a workload object: its node selector and required node affinity.
pub fn fits(obj: &Object, node: &str, labels: &Labels) -> bool {
    let Some(t) = obj.template() else { return false };
    selector_matches(&t.spec.node_selector, labels)
        && t.spec
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|n| n.required_during_scheduling_ignored_during_execution.as_ref())
            .is_none_or(|sel| crate::schedule::affinity_matches(sel, node, labels))
}

/// The index of the variant a node runs: the first that fits it (the variants' placements are
/// disjoint, as [`placement_terms`] makes them, so "first" only matters for hand-made ones).
pub fn pick_variant(variants: &[(Vec<String>, Object)], node: &str, labels: &Labels) -> Option<usize> {
    variants.iter().position(|(_, o)| fits(o, node, labels))
}

/// The variant object a node runs (see [`pick_variant`]).
pub fn pick_variant_object<'a>(variants: &'a [Object], node: &str, labels: &Labels) -> Option<&'a Object> {
    variants.iter().find(|o| fits(o, node, labels))
}

fn required_terms(o: &Value, kind: &str) -> Vec<NodeSelectorTerm> {
    let Some(path) = pod_spec_path(kind) else {
        return Vec::new();
    };
    let mut at = o;
    for p in path {
        match at.get(p) {
            Some(v) => at = v,
            None => return Vec::new(),
        }
    }
    at.pointer("/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default()
}

/// The object mapping at `path`, created when missing.
fn mapping_at<'a>(o: &'a mut Value, path: &[&str]) -> Result<&'a mut serde_json::Map<String, Value>, String> {
    let mut at = o;
    for p in path {
        at = at
            .as_object_mut()
            .ok_or_else(|| format!("{p}: not a mapping"))?
            .entry(p.to_string())
            .or_insert_with(|| Value::Object(Default::default()));
    }
    at.as_object_mut()
        .ok_or_else(|| format!("{}: not a mapping", path.join(".")))
}

/// One fleet workload from its variants (each already restricted to its targets' nodes): the
/// first variant's object, placed on the union of every variant's nodes, carrying all the
/// variants in its template's [`VARIANTS`] annotation.
fn fleet_workload(kind: &str, variants: &[(Vec<String>, Value)]) -> Result<Value, String> {
    let path = pod_spec_path(kind).ok_or("not a workload")?;
    let mut top = variants[0].1.clone();
    let mut union: Vec<NodeSelectorTerm> = Vec::new();
    for (_, v) in variants {
        for t in required_terms(v, kind) {
            if !union.contains(&t) {
                union.push(t);
            }
        }
    }
    let na = mapping_at(&mut top, path)?;
    let aff = na
        .entry("affinity")
        .or_insert_with(|| Value::Object(Default::default()))
        .as_object_mut()
        .ok_or("affinity: not a mapping")?
        .entry("nodeAffinity")
        .or_insert_with(|| Value::Object(Default::default()))
        .as_object_mut()
        .ok_or("nodeAffinity: not a mapping")?;
    aff.insert(
        "requiredDuringSchedulingIgnoredDuringExecution".into(),
        serde_json::json!({ "nodeSelectorTerms": serde_json::to_value(&union).map_err(|e| e.to_string())? }),
    );
    let list: Vec<Variant> = variants
        .iter()
        .map(|(targets, object)| Variant {
            targets: targets.clone(),
            object: object.clone(),
        })
        .collect();
    let meta_path: Vec<&str> = path[..path.len() - 1].iter().copied().chain(["metadata"]).collect();
    let meta = mapping_at(&mut top, &meta_path)?;
    let ann = meta
        .entry("annotations")
        .or_insert_with(|| Value::Object(Default::default()))
        .as_object_mut()
        .ok_or("template annotations: not a mapping")?;
    ann.insert(
        VARIANTS.into(),
        Value::String(serde_json::to_string(&list).map_err(|e| e.to_string())?),
    );
    Ok(top)
}

/// Merges the renders of every target into the one set of objects the hub holds for the
/// commit. An object identical in several targets is held once; a workload is restricted
/// (required node affinity, ANDed with its own) to the nodes of the targets that render it, so
/// a node whose labels move it to another target moves to that target's variant. A workload
/// that differs between targets is ONE fleet workload carrying its variants ([`VARIANTS`]):
/// the scheduler gives each node its variant ([`pick_variant`]), and a commit is one revision
/// and one rollout across all of them. Any other kind that differs between targets is refused
/// (it has no placement to tell the variants apart): reasons as `(object, reason)`.
pub fn combine(renders: &[TargetObjects]) -> Result<Vec<Value>, Vec<(String, String)>> {
    // key -> variants: (object, targets, terms)
    type Variant = (Value, Vec<String>, Vec<NodeSelectorTerm>);
    let mut by_key: std::collections::BTreeMap<(String, String, String), Vec<Variant>> = Default::default();
    let mut order: Vec<(String, String, String)> = Vec::new();
    for r in renders {
        for o in &r.objects {
            let key = object_key(o);
            let variants = by_key.entry(key.clone()).or_insert_with(|| {
                order.push(key.clone());
                Vec::new()
            });
            match variants.iter_mut().find(|v| v.0 == *o) {
                Some(v) => {
                    v.1.push(r.target.clone());
                    for t in &r.terms {
                        if !v.2.contains(t) {
                            v.2.push(t.clone());
                        }
                    }
                }
                None => variants.push((o.clone(), vec![r.target.clone()], r.terms.clone())),
            }
        }
    }
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for key in order {
        let variants = &by_key[&key];
        let (kind, ns, name) = &key;
        let id = format!("{kind}/{ns}/{name}");
        let workload = pod_spec_path(kind).is_some();
        if !workload {
            if variants.len() > 1 {
                errors.push((
                    id.clone(),
                    format!(
                        "differs between targets {} and {}; only workloads (Deployment, DaemonSet, Job, CronJob) may have per-target variants: give each variant its own name (a configMapGenerator's hash suffix does)",
                        variants[0].1.join(", "),
                        variants[1].1.join(", ")
                    ),
                ));
            } else {
                out.push(variants[0].0.clone());
            }
            continue;
        }
        let mut restricted: Vec<(Vec<String>, Value)> = Vec::new();
        for (obj, targets, terms) in variants {
            if terms.is_empty() {
                continue; // no node can get these targets
            }
            let mut obj = obj.clone();
            match restrict(&mut obj, kind, terms) {
                Ok(()) => restricted.push((targets.clone(), obj)),
                Err(e) => errors.push((id.clone(), e)),
            }
        }
        match restricted.len() {
            0 => {}
            1 => out.extend(restricted.pop().map(|(_, o)| o)),
            _ => match fleet_workload(kind, &restricted) {
                Ok(o) => out.push(o),
                Err(e) => errors.push((id.clone(), e)),
            },
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn targets_table() {
        let overlays: BTreeSet<String> = ["factory-berlin", "factory-shanghai"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let by = Targets::OverlaysBy { label: "site".into() };
        let explicit = Targets::Explicit(vec![
            Target {
                name: "gpu".into(),
                path: "gpu".into(),
                node_selector: labels(&[("gpu", "true")]),
            },
            Target {
                name: "berlin".into(),
                path: "overlays/berlin".into(),
                node_selector: labels(&[("site", "berlin")]),
            },
            Target {
                name: "rest".into(),
                path: "base".into(),
                node_selector: labels(&[]),
            },
        ]);
        let only_gpu = Targets::Explicit(vec![Target {
            name: "gpu".into(),
            path: "gpu".into(),
            node_selector: labels(&[("gpu", "true")]),
        }]);
        type Case<'a> = (&'a Targets, Labels, Option<(&'a str, &'a str)>);
        let cases: Vec<Case> = vec![
            (
                &by,
                labels(&[("site", "factory-berlin")]),
                Some(("factory-berlin", "overlays/factory-berlin")),
            ),
            (&by, labels(&[("site", "factory-paris")]), Some(("base", "base"))),
            (&by, labels(&[]), Some(("base", "base"))),
            (
                &explicit,
                labels(&[("site", "berlin"), ("gpu", "true")]),
                Some(("gpu", "gpu")),
            ),
            (
                &explicit,
                labels(&[("site", "berlin")]),
                Some(("berlin", "overlays/berlin")),
            ),
            (&explicit, labels(&[("site", "paris")]), Some(("rest", "base"))),
            (&only_gpu, labels(&[("site", "paris")]), None),
        ];
        for (t, l, want) in cases {
            let got = target_for(t, &l, &overlays);
            assert_eq!(got.as_ref().map(|(a, b)| (a.as_str(), b.as_str())), want, "{l:?}");
        }
    }

    #[test]
    fn fetch_schedule_table() {
        let poll = 60_000;
        let st = |last: Option<i64>, failures: u32, webhook: bool| FetchState {
            last_fetch: last,
            failures,
            webhook_pending: webhook,
        };
        for (state, draw, want) in [
            (st(None, 0, false), 0.0, 1_000_000),             // never fetched: now
            (st(Some(1_000_000), 0, false), 0.0, 1_060_000),  // healthy: the poll interval
            (st(Some(1_000_000), 0, true), 0.0, 1_000_000),   // webhook: now
            (st(Some(1_000_000), 3, true), 0.0, 1_000_000),   // webhook during a backoff: now
            (st(Some(1_000_000), 1, false), 0.0, 1_060_000),  // backoff never below the interval
            (st(Some(1_000_000), 5, false), 0.0, 1_080_000),  // 5 s * 2^4
            (st(Some(1_000_000), 5, false), 1.0, 1_096_000),  // + 20 % jitter
            (st(Some(1_000_000), 30, false), 0.0, 1_600_000), // capped at 10 min
            (st(Some(1_000_000), 30, false), 1.0, 1_720_000), // cap + jitter
        ] {
            assert_eq!(next_fetch(&state, poll, 1_000_000, draw), want, "{state:?} draw {draw}");
        }
    }

    #[test]
    fn commit_decisions() {
        let ok = |t: &str| TargetRender {
            target: t.into(),
            result: Ok(()),
        };
        let bad = |t: &str, e: &str| TargetRender {
            target: t.into(),
            result: Err(e.into()),
        };
        assert_eq!(
            decide_commit(Some("a"), None, "a", &[ok("base")]),
            CommitDecision::Nothing
        );
        assert_eq!(
            decide_commit(Some("a"), Some("b"), "b", &[bad("x", "y")]),
            CommitDecision::Nothing
        );
        assert_eq!(
            decide_commit(Some("a"), None, "b", &[ok("base"), ok("berlin")]),
            CommitDecision::Apply
        );
        assert_eq!(decide_commit(None, None, "b", &[ok("base")]), CommitDecision::Apply);
        assert_eq!(
            decide_commit(
                Some("a"),
                None,
                "c",
                &[
                    ok("base"),
                    bad("berlin", "overlays/berlin/kustomization.yaml: field `helmCharts` ...")
                ]
            ),
            CommitDecision::Reject(vec![(
                "berlin".into(),
                "overlays/berlin/kustomization.yaml: field `helmCharts` ...".into()
            )])
        );
        // A later good commit after a rejected one goes through.
        assert_eq!(
            decide_commit(Some("a"), Some("c"), "d", &[ok("base"), ok("berlin")]),
            CommitDecision::Apply
        );
    }

    fn node(pairs: &[(&str, &str)]) -> Labels {
        let mut l = labels(pairs);
        l.insert(EVERY_NODE_KEY.into(), "n".into());
        l
    }

    /// The placement terms agree with `target_for` on every node of a table.
    #[test]
    fn placement_agrees_with_target_for() {
        use crate::schedule::affinity_matches;
        let overlays: BTreeSet<String> = ["berlin", "shanghai"].iter().map(|s| s.to_string()).collect();
        let explicit = Targets::Explicit(vec![
            Target {
                name: "gpu".into(),
                path: "gpu".into(),
                node_selector: labels(&[("gpu", "true"), ("site", "berlin")]),
            },
            Target {
                name: "berlin".into(),
                path: "b".into(),
                node_selector: labels(&[("site", "berlin")]),
            },
            Target {
                name: "rest".into(),
                path: "base".into(),
                node_selector: labels(&[]),
            },
            Target {
                name: "never".into(),
                path: "x".into(),
                node_selector: labels(&[("x", "y")]),
            },
        ]);
        let by = Targets::OverlaysBy { label: "site".into() };
        let nodes = [
            node(&[]),
            node(&[("site", "berlin")]),
            node(&[("site", "berlin"), ("gpu", "true")]),
            node(&[("site", "shanghai"), ("gpu", "true")]),
            node(&[("site", "paris")]),
            node(&[("x", "y")]),
        ];
        for targets in [&explicit, &by] {
            let names: Vec<String> = match targets {
                Targets::Explicit(l) => l.iter().map(|t| t.name.clone()).collect(),
                Targets::OverlaysBy { .. } => vec!["base".into(), "berlin".into(), "shanghai".into()],
            };
            for n in &nodes {
                let want = target_for(targets, n, &overlays).map(|(t, _)| t);
                let got: Vec<&String> = names
                    .iter()
                    .filter(|t| {
                        let sel = outpost_api::NodeSelector {
                            node_selector_terms: placement_terms(targets, t, &overlays).unwrap(),
                        };
                        affinity_matches(&sel, "n", n)
                    })
                    .collect();
                assert_eq!(got, want.iter().collect::<Vec<_>>(), "{n:?}");
            }
        }
    }

    #[test]
    fn combine_merges_identical_and_names_variants() {
        let by = Targets::OverlaysBy { label: "site".into() };
        let overlays: BTreeSet<String> = ["berlin", "shanghai"].iter().map(|s| s.to_string()).collect();
        let dep = |image: &str| {
            serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web"}, "spec": {"template": {"spec": {"containers": [{"name": "c", "image": image}]}}}})
        };
        let cm = |v: &str| serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"a": v}});
        let r = |t: &str, objects: Vec<Value>| TargetObjects {
            target: t.into(),
            terms: placement_terms(&by, t, &overlays).unwrap(),
            objects,
        };
        // Identical everywhere: one object, placed on the nodes of all three targets.
        let out = combine(&[
            r("base", vec![dep("a"), cm("1")]),
            r("berlin", vec![dep("a"), cm("1")]),
            r("shanghai", vec![dep("a"), cm("1")]),
        ])
        .unwrap();
        assert_eq!(out.len(), 2);
        let terms = &out[0]["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
            ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"];
        assert_eq!(terms.as_array().unwrap().len(), 3);
        // Berlin differs: ONE workload carrying two variants, placed on the union of their
        // nodes; each node picks its own variant.
        let out = combine(&[
            r("base", vec![dep("a")]),
            r("berlin", vec![dep("b")]),
            r("shanghai", vec![dep("a")]),
        ])
        .unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0]["metadata"]["name"], "web");
        let union = &out[0]["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
            ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"];
        assert_eq!(union.as_array().unwrap().len(), 3, "{union}");
        let parsed = outpost_api::parse_file("t.yaml", &serde_json::to_string(&out[0]).unwrap())
            .unwrap()
            .objects
            .remove(0);
        let variants = variants_of(&parsed).unwrap();
        let targets: Vec<&Vec<String>> = variants.iter().map(|(t, _)| t).collect();
        assert_eq!(
            targets,
            [
                &vec!["base".to_string(), "shanghai".into()],
                &vec!["berlin".to_string()]
            ]
        );
        let image = |i: usize| variants[i].1.template().unwrap().spec.containers[0].image.clone();
        for (labels, want) in [
            (node(&[("site", "berlin")]), Some("b")),
            (node(&[("site", "shanghai")]), Some("a")),
            (node(&[("site", "paris")]), Some("a")),
            (node(&[]), Some("a")),
        ] {
            let got = pick_variant(&variants, "n", &labels).and_then(image);
            assert_eq!(got.as_deref(), want, "{labels:?}");
        }
        // The variants carry no variants of their own, and a plain workload has none.
        assert!(variants_of(&variants[0].1).unwrap().is_empty());
        // A broken annotation is an error naming it, not a silent fallback.
        let mut bad = out[0].clone();
        bad["spec"]["template"]["metadata"]["annotations"][VARIANTS] = Value::String("[{\"targets\":[]}]".into());
        let bad = outpost_api::parse_file("t.yaml", &serde_json::to_string(&bad).unwrap())
            .unwrap()
            .objects
            .remove(0);
        assert!(variants_of(&bad).unwrap_err().contains(VARIANTS));
        // A ConfigMap that differs cannot be told apart by placement: refused, named.
        let err = combine(&[r("base", vec![cm("1")]), r("berlin", vec![cm("2")])]).unwrap_err();
        assert_eq!(err[0].0, "ConfigMap/default/cfg");
        assert!(err[0].1.contains("differs between targets base and berlin"), "{err:?}");
        // The workload's own required affinity stays, ANDed.
        let mut own = dep("a");
        own["spec"]["template"]["spec"]["affinity"] = serde_json::json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
            {"nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}]}}});
        let out = combine(&[r("berlin", vec![own])]).unwrap();
        assert_eq!(
            out[0]["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
                ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"],
            serde_json::json!([{"matchExpressions": [{"key": "gpu", "operator": "Exists"}, {"key": "site", "operator": "In", "values": ["berlin"]}]}])
        );
    }
}
