//! The rollout controller's load and decide steps: load every workload, its rollout, its nodes
//! and their gate results ([`load`]) -> `outpost_core::waves::{start, decide}` ([`step`]). The
//! service executes the result (`Service::advance_rollouts_locked`): store the new rollout,
//! record its events (webhooks) and its `RolloutFailed` alert, and reschedule when some node's
//! revision changed; `crate::controllers` runs it.
//!
//! It runs under the write lock (so it sees one state with applies and deletes), when woken by
//! a status report carrying gate results, a node back online, an apply or an undo, and on a
//! timer (bake ends, maintenance windows open, nodes go silent). A rollout is stored before
//! anything acts on it: a hub killed at any instant resumes from the last stored decision, and
//! a decision that was not stored is made again. A workload whose current revision has no
//! rollout yet (the hub stopped between an apply and its rollout) gets one here; until then its
//! nodes keep the revision they hold (`outpost_core::waves::desired_revision`).
//!
//! Must never: decide a wave itself (that is `outpost_core::waves`), or hand a node a revision
//! without storing the rollout that says so first.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use jiff::tz::TimeZone;
use outpost_api::{Kind, Object, ObjectId, RolloutPhase, RolloutPolicySpec, UnixMs, WorkloadStatus};
use outpost_core::render::workload_key;
use outpost_core::waves::{self, Decision, Gate, NodeView, Policy, Rollout};

use crate::scheduler::is_online;
use crate::store::{DesiredRow, NodeRow, Store, StoreError, StoredObject};

/// How often the controller looks while a rollout is active, at most (nodes going silent,
/// windows opening); it also wakes on gate results and at each rollout's own `wake_at`.
pub const ACTIVE_TICK: Duration = Duration::from_secs(1);
/// How often it looks while no rollout is active.
pub const IDLE_TICK: Duration = Duration::from_secs(10);

/// Everything one run reads, in one go.
pub struct Loaded {
    pub objects: Vec<StoredObject>,
    pub rollouts: BTreeMap<String, Rollout>,
    pub nodes: BTreeMap<String, NodeRow>,
    /// key -> node -> desired row
    pub desired: BTreeMap<String, BTreeMap<String, DesiredRow>>,
    /// (node, key) -> status
    pub statuses: HashMap<(String, String), WorkloadStatus>,
    /// RolloutPolicy objects: (namespace/name, spec)
    pub policies: Vec<(String, RolloutPolicySpec)>,
    /// Every object by id (what a render reads ConfigMaps and Secrets from).
    pub sources: BTreeMap<ObjectId, Object>,
}

/// Read what a run needs (one short read each).
pub async fn load(s: &dyn Store) -> Result<Loaded, StoreError> {
    let objects = s.objects().await?;
    let rollouts = s
        .rollouts()
        .await?
        .into_iter()
        .map(|r| (r.workload.clone(), r))
        .collect();
    let nodes = s.nodes().await?.into_iter().map(|n| (n.name.clone(), n)).collect();
    let mut desired: BTreeMap<String, BTreeMap<String, DesiredRow>> = BTreeMap::new();
    for r in s.desired().await? {
        desired.entry(r.key.clone()).or_default().insert(r.node.clone(), r);
    }
    let statuses = s
        .statuses(None)
        .await?
        .into_iter()
        .map(|(n, w)| ((n, w.key.clone()), w))
        .collect();
    let policies = objects
        .iter()
        .filter_map(|o| match &o.object {
            Object::RolloutPolicy(p) => Some((format!("{}/{}", p.metadata.ns(), p.metadata.name), p.spec.clone())),
            _ => None,
        })
        .collect();
    let sources = objects.iter().map(|o| (o.object.id(), o.object.clone())).collect();
    Ok(Loaded {
        sources,
        objects,
        rollouts,
        nodes,
        desired,
        statuses,
        policies,
    })
}

impl Loaded {
    /// The policy of a workload object.
    pub fn policy_for(&self, obj: &Object) -> Policy {
        Policy::for_workload(&self.policies, &obj.meta().labels)
    }

    /// The revision each node placed now holds for `key`. For an AgentUpdate every matching
    /// node counts, and one without any revision holds [`AGENT_AS_INSTALLED`].
    /// A fleet workload's node whose variant did not change counts as holding `revision`.
    pub fn held(&self, obj: &Object, revision: u64, key: &str) -> BTreeMap<String, u64> {
        let variants = fleet_variants(obj);
        let mut held: BTreeMap<String, u64> = self
            .desired
            .get(key)
            .map(|m| {
                m.iter()
                    .map(|(n, r)| {
                        let same = self.unchanged(&variants, revision, n, r);
                        (n.clone(), if same { revision } else { r.revision })
                    })
                    .collect()
            })
            .unwrap_or_default();
        if obj.kind() == Kind::AgentUpdate {
            for n in self.placed(obj, key) {
                held.entry(n).or_insert(AGENT_AS_INSTALLED);
            }
        }
        held
    }

    /// Whether `node`, holding `row`, runs what a fleet workload's variant for it is at
    /// `revision` (a commit that changed other sites' variants only): rendering its variant of
    /// `revision` under the revision number it holds gives the hash it holds. Such a node is no
    /// part of the rollout of `revision`; the scheduler leaves its workload untouched.
    fn unchanged(&self, variants: &[Object], revision: u64, node: &str, row: &DesiredRow) -> bool {
        if variants.is_empty() || row.revision == revision {
            return false;
        }
        let Some(n) = self.nodes.get(node) else { return false };
        let Some(v) = outpost_core::gitops::pick_variant_object(variants, node, &n.labels) else {
            return false;
        };
        outpost_core::render::render(v, row.revision, &self.sources).is_some_and(|s| s.hash == row.hash)
    }

    /// The nodes a workload is placed on. An AgentUpdate is on every node it selects, also
    /// those whose wave has not opened (their desired state does not hold it yet).
    fn placed(&self, obj: &Object, key: &str) -> Vec<String> {
        if obj.kind() == Kind::AgentUpdate {
            let Some(view) = crate::scheduler::workload_view(obj) else {
                return Vec::new();
            };
            return self
                .nodes
                .values()
                .filter(|n| view.fits(&n.name, &n.labels))
                .map(|n| n.name.clone())
                .collect();
        }
        self.desired
            .get(key)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }
}

/// A fleet workload's variants (`outpost_core::gitops::VARIANTS`); empty for any other, and for
/// a site-failover one (its nodes all take each revision, as `crate::scheduler::plan` does).
fn fleet_variants(obj: &Object) -> Vec<Object> {
    if outpost_api::site::failover_options(obj).is_some() {
        return Vec::new();
    }
    outpost_core::gitops::variants_of(obj)
        .map(|v| v.into_iter().map(|(_, o)| o).collect())
        .unwrap_or_default()
}

/// Time zones by IANA name, looked up once per run (an unknown name is UTC, with a warning).
#[derive(Default)]
pub struct Zones(HashMap<String, TimeZone>);

impl Zones {
    pub fn get(&mut self, name: &str) -> TimeZone {
        self.0
            .entry(name.to_string())
            .or_insert_with(|| {
                TimeZone::get(name).unwrap_or_else(|e| {
                    tracing::warn!(timezone = %name, error = %e, "unknown time zone; maintenance windows use UTC for it");
                    TimeZone::UTC
                })
            })
            .clone()
    }
}

/// The nodes a workload is placed on, as the rollout decision sees them.
#[allow(clippy::too_many_arguments)]
pub fn node_views(
    l: &Loaded,
    obj: &Object,
    key: &str,
    revision: u64,
    policy: &Policy,
    zones: &mut Zones,
    offline_after: Duration,
    now: UnixMs,
) -> Vec<NodeView> {
    let variants = fleet_variants(obj);
    let rows = l.desired.get(key);
    l.placed(obj, key)
        .iter()
        .filter(|n| {
            !rows
                .and_then(|r| r.get(n.as_str()))
                .is_some_and(|row| l.unchanged(&variants, revision, n, row))
        })
        .filter_map(|n| l.nodes.get(n))
        .map(|n| {
            let zone = n
                .labels
                .get(&policy.timezone_label)
                .map(|v| outpost_api::rollout::timezone_from_label(v))
                .unwrap_or_else(|| policy.timezone.clone());
            let status = l.statuses.get(&(n.name.clone(), key.to_string()));
            NodeView {
                name: n.name.clone(),
                labels: n.labels.clone(),
                // a node holding a long-poll reads as in contact now (`Store::hold`)
                online: is_online(n, offline_after, now),
                tz: zones.get(&zone),
                gate: Gate::of(status.and_then(|s| s.rollout.as_ref()), revision),
            }
        })
        .collect()
}

/// What a run did.
#[derive(Default)]
pub struct Outcome {
    /// Some node's revision (or prefetch hint) changed: the caller reschedules.
    pub pins_changed: bool,
    /// The earliest time a rollout asked to be looked at again.
    pub wake_at: Option<UnixMs>,
    /// A rollout is still Progressing or Paused.
    pub active: bool,
}

/// The "revision" of an AgentUpdate a node holds before its first one: the agent binary it was
/// installed with. A node pinned to it gets no AgentUpdate in its desired state, so it keeps
/// the binary it runs; a fleet rollback of a first AgentUpdate stops the update on the nodes
/// not yet updated, and the updated ones keep the binary that passed their gate.
pub const AGENT_AS_INSTALLED: u64 = 0;

/// Start rollouts for `started` (workloads that just got a new revision; `one_wave` for an
/// undo) and for any workload whose current revision has none, then move every rollout on.
/// Returns each rollout to store, with the decisions that led to it, and the outcome.
pub fn step(
    l: &Loaded,
    started: &[ObjectId],
    one_wave: bool,
    offline_after: Duration,
    now: UnixMs,
) -> (Vec<(Rollout, Vec<Decision>)>, Outcome) {
    let mut zones = Zones::default();
    let mut out = Outcome::default();
    let mut changes = Vec::new();
    for o in l.objects.iter().filter(|o| o.object.kind().is_rolled_out()) {
        let id = o.object.id();
        let key = workload_key(&id);
        let policy = l.policy_for(&o.object);
        let prev = l.rollouts.get(&key);
        let mut decisions: Vec<Decision> = Vec::new();
        let mut rollout = match prev {
            Some(r) if r.revision == o.revision && !started.contains(&id) => r.clone(),
            _ => {
                let d = waves::start(
                    prev,
                    &key,
                    o.revision,
                    &l.held(&o.object, o.revision, &key),
                    &policy,
                    one_wave && started.contains(&id),
                    now,
                );
                let r = d.rollout.clone();
                decisions.push(d);
                r
            }
        };
        if rollout.phase != RolloutPhase::Complete {
            let views = node_views(
                l,
                &o.object,
                &key,
                rollout.revision,
                &policy,
                &mut zones,
                offline_after,
                now,
            );
            let d = waves::decide(&rollout, &policy, &views, now);
            if let Some(t) = d.wake_at {
                out.wake_at = Some(out.wake_at.map_or(t, |w| w.min(t)));
            }
            if d.rollout != rollout || !d.events.is_empty() || d.alert.is_some() {
                rollout = d.rollout.clone();
                decisions.push(d);
            }
        }
        out.active |= rollout.phase.is_active();
        if decisions.is_empty() {
            continue;
        }
        out.pins_changed |= decisions.iter().any(|d| d.pins_changed);
        changes.push((rollout, decisions));
    }
    (changes, out)
}
