//! Property tests of the pure core (proptest): random sequences of events against a model, and
//! random fleets. Each property is a promise a module doc makes:
//!
//! - `supervise`: one process per unit, ever: no `Start` while the unit's process (or a
//!   container start) is alive, no `Forget` of a unit that still has one.
//! - `rollout`: a node never runs a revision marked bad (except a target with no
//!   last-known-good at all, as documented), and every change to what must survive a crash
//!   (good spec, bad marks, progress start) comes with `persist: true`.
//! - `schedule`: adding, removing or flapping nodes never moves a placed Deployment replica
//!   off a node that still exists and matches; new replicas only go to online matching nodes;
//!   a Deployment fills up to its replicas when it can; a DaemonSet is on every matching node.
//! - `bundle_changes`: applying the delta to the old bundle gives the new one, and the delta
//!   names only what changed.
//! - `waves`: a wave never opens before the previous one completed; once the fleet rolled a
//!   revision back, no node that had not already refused it is handed it again (so a node that
//!   was offline, or in a later wave, never runs it); nodes whose wave has not opened keep their
//!   previous revision; with every online node healthy the rollout completes, whatever nodes
//!   stay offline.

use std::collections::{BTreeMap, BTreeSet};

use outpost_api::{Kind, ObjectId, Phase, RestartPolicy, Runtime, UnixMs, WorkloadSpec};
use outpost_core::rollout::{self, Health, NodeRollout, Run};
use outpost_core::schedule::{schedule, selector_matches, NodeView, WorkloadView};
use outpost_core::supervise::{self, Action, DesiredUnit, Unit};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// supervise: the agent's executor, modelled as in outpost-agent's reconcile.rs

const UNITS: [&str; 3] = ["w/a", "w/b", "w/c"];
/// `w/c` runs as a container: its start is asynchronous (`starting` until the runtime reports).
fn is_container(unit: &str) -> bool {
    unit == "w/c"
}

#[derive(Clone, Debug)]
enum Ev {
    /// Time passes, then the agent runs `decide` and executes its actions. `fail` makes a
    /// process start fail (missing executable).
    Tick { dt: i64, fail: bool },
    /// The process of a unit exits (the agent learns of it).
    Exit { unit: usize, code: Option<i32> },
    /// The container runtime reports a start it was asked for.
    Started { unit: usize, fail: bool },
    /// A liveness probe fails: the agent stops the process to restart it.
    Unhealthy { unit: usize },
    /// The hub changes what should run.
    Desire {
        unit: usize,
        hash: u8,
        present: bool,
        runnable: bool,
        policy: u8,
        grace_ms: i64,
    },
}

fn ev() -> impl Strategy<Value = Ev> {
    prop_oneof![
        4 => (0i64..20_000, prop::bool::weighted(0.2)).prop_map(|(dt, fail)| Ev::Tick { dt, fail }),
        2 => (0..3usize, prop::option::of(0..3i32)).prop_map(|(unit, code)| Ev::Exit { unit, code }),
        1 => (0..3usize, any::<bool>()).prop_map(|(unit, fail)| Ev::Started { unit, fail }),
        1 => (0..3usize).prop_map(|unit| Ev::Unhealthy { unit }),
        2 => (0..3usize, 0..3u8, prop::bool::weighted(0.8), prop::bool::weighted(0.9), 0..3u8, 0i64..5_000)
            .prop_map(|(unit, hash, present, runnable, policy, grace_ms)| Ev::Desire {
                unit,
                hash,
                present,
                runnable,
                policy,
                grace_ms,
            }),
    ]
}

#[derive(Default)]
struct Agent {
    now: UnixMs,
    desired: BTreeMap<String, DesiredUnit>,
    units: BTreeMap<String, Unit>,
    /// Processes that exist and whose exit the agent has not seen yet, per unit.
    alive: BTreeMap<String, Vec<u32>>,
    /// Container starts under way: (hash asked for).
    pending: BTreeMap<String, String>,
    next_pid: u32,
}

impl Agent {
    fn live(&self, unit: &str) -> usize {
        self.alive.get(unit).map_or(0, Vec::len) + self.pending.contains_key(unit) as usize
    }

    fn policy(&self, unit: &str) -> RestartPolicy {
        self.desired.get(unit).map(|d| d.restart_policy).unwrap_or_default()
    }

    fn spawn(&mut self, unit: &str) -> u32 {
        self.next_pid += 1;
        self.alive.entry(unit.to_string()).or_default().push(self.next_pid);
        self.next_pid
    }

    fn execute(&mut self, a: Action, fail: bool) -> Result<(), TestCaseError> {
        let now = self.now;
        match a {
            Action::Start { unit } => {
                let d = self.desired.get(&unit).cloned();
                prop_assert!(
                    d.as_ref().is_some_and(|d| d.runnable),
                    "started {unit}, which is not wanted"
                );
                let d = d.unwrap();
                prop_assert_eq!(
                    self.live(&unit),
                    0,
                    "started {} while its process lives: {:?}",
                    unit,
                    self.units.get(&unit)
                );
                if self.units.get(&unit).is_none_or(|u| u.hash != d.hash) {
                    self.units.insert(
                        unit.clone(),
                        Unit {
                            hash: d.hash.clone(),
                            grace_ms: d.grace_ms,
                            ..Default::default()
                        },
                    );
                }
                if is_container(&unit) {
                    let u = self.units.get_mut(&unit).unwrap();
                    u.starting = true;
                    u.next_start_at = None;
                    self.pending.insert(unit, d.hash);
                } else if fail {
                    let u = self.units.get_mut(&unit).unwrap();
                    u.next_start_at = None;
                    supervise::on_start_failed(u, "no such file".into(), d.restart_policy, now);
                } else {
                    let pid = self.spawn(&unit);
                    let u = self.units.get_mut(&unit).unwrap();
                    u.next_start_at = None;
                    u.pid = Some(pid);
                    u.started_at = Some(now);
                }
            }
            Action::Terminate { unit, pid, kill_at } => {
                prop_assert!(
                    self.alive.get(&unit).is_some_and(|p| p.contains(&pid)),
                    "terminate of a dead pid"
                );
                prop_assert!(kill_at >= now);
                if let Some(u) = self.units.get_mut(&unit) {
                    u.stopping = Some((kill_at, false));
                }
            }
            Action::Kill { unit, pid } => {
                prop_assert!(
                    self.alive.get(&unit).is_some_and(|p| p.contains(&pid)),
                    "kill of a dead pid"
                );
                if let Some(u) = self.units.get_mut(&unit) {
                    if let Some((deadline, _)) = u.stopping {
                        u.stopping = Some((deadline, true));
                    }
                }
            }
            Action::Forget { unit } => {
                prop_assert_eq!(
                    self.live(&unit),
                    0,
                    "forgot {} while its process lives: it would start twice",
                    unit
                );
                self.units.remove(&unit);
            }
        }
        Ok(())
    }

    fn apply(&mut self, e: &Ev) -> Result<(), TestCaseError> {
        match e.clone() {
            Ev::Tick { dt, fail } => {
                self.now += dt;
                let (actions, wake) = supervise::decide(&self.desired, &self.units, self.now);
                if let Some(w) = wake {
                    prop_assert!(w >= self.now, "wake-up in the past");
                }
                for a in actions {
                    self.execute(a, fail)?;
                }
            }
            Ev::Exit { unit, code } => {
                let unit = UNITS[unit].to_string();
                let Some(pid) = self
                    .alive
                    .get_mut(&unit)
                    .and_then(|p| (!p.is_empty()).then(|| p.remove(0)))
                else {
                    return Ok(());
                };
                let policy = self.policy(&unit);
                if let Some(u) = self.units.get_mut(&unit).filter(|u| u.pid == Some(pid)) {
                    supervise::on_exit(u, code, code.is_none().then_some(9), policy, self.now);
                }
            }
            Ev::Started { unit, fail } => {
                let unit = UNITS[unit].to_string();
                let Some(hash) = self.pending.remove(&unit) else {
                    return Ok(());
                };
                let wanted = self.units.get(&unit).is_some_and(|u| u.starting && u.hash == hash);
                let policy = self.policy(&unit);
                match (fail, wanted) {
                    (false, true) => {
                        let pid = self.spawn(&unit);
                        let u = self.units.get_mut(&unit).unwrap();
                        u.starting = false;
                        u.pid = Some(pid);
                        u.started_at = Some(self.now);
                    }
                    (false, false) => {} // the agent removes the container it no longer wants
                    (true, true) => {
                        let u = self.units.get_mut(&unit).unwrap();
                        u.starting = false;
                        supervise::on_start_failed(u, "image not found".into(), policy, self.now);
                    }
                    (true, false) => {
                        if let Some(u) = self.units.get_mut(&unit) {
                            u.starting = false;
                        }
                    }
                }
            }
            Ev::Unhealthy { unit } => {
                let unit = UNITS[unit];
                let now = self.now;
                if let Some(u) = self
                    .units
                    .get_mut(unit)
                    .filter(|u| u.pid.is_some() && u.stopping.is_none())
                {
                    u.kill_reason = Some("liveness probe failed".into());
                    u.stopping = Some((now + u.grace_ms, false));
                }
            }
            Ev::Desire {
                unit,
                hash,
                present,
                runnable,
                policy,
                grace_ms,
            } => {
                let unit = UNITS[unit].to_string();
                if present {
                    let restart_policy =
                        [RestartPolicy::Always, RestartPolicy::OnFailure, RestartPolicy::Never][policy as usize];
                    self.desired.insert(
                        unit,
                        DesiredUnit {
                            hash: format!("h{hash}"),
                            restart_policy,
                            grace_ms,
                            runnable,
                        },
                    );
                } else {
                    self.desired.remove(&unit);
                }
            }
        }
        for u in UNITS {
            prop_assert!(self.live(u) <= 1, "{u} has {} live processes", self.live(u));
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn supervisor_never_runs_a_unit_twice(events in prop::collection::vec(ev(), 1..120)) {
        let mut agent = Agent::default();
        for e in &events {
            agent.apply(e)?;
        }
        // Settle: with every process gone and time passing, every wanted unit that is not done
        // gets started again (no unit is stuck), still never twice.
        for _ in 0..3 {
            for u in UNITS {
                agent.apply(&Ev::Started { unit: UNITS.iter().position(|x| *x == u).unwrap(), fail: false })?;
            }
            agent.apply(&Ev::Tick { dt: supervise::BACKOFF_MAX_MS, fail: false })?;
        }
        for (id, d) in &agent.desired {
            if d.runnable {
                let u = agent.units.get(id);
                let running_or_done = u.is_some_and(|u| u.pid.is_some() || u.starting || u.done.is_some() || u.stopping.is_some());
                prop_assert!(running_or_done, "{} is wanted but not running: {:?}", id, u);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// rollout: the update gate on a node

fn spec(revision: u64, hash: &str) -> WorkloadSpec {
    WorkloadSpec {
        key: "deployment/default/w".into(),
        kind: Kind::Deployment,
        namespace: "default".into(),
        name: "w".into(),
        revision,
        hash: hash.into(),
        runtime: Runtime::Process,
        restart_policy: RestartPolicy::Always,
        grace_seconds: 1,
        containers: vec![],
        volumes: vec![],
        min_ready_seconds: 10,
        progress_deadline_seconds: 60,
        host_network: false,
        host_pid: false,
        job: None,
        agent_update: None,
        pipeline: None,
        failover: None,
    }
}

#[derive(Clone, Debug)]
enum Gate {
    /// The hub asks for a new revision (hash from a small set, so old content comes back).
    NewTarget(u8),
    /// Time passes and the agent steps the gate with what it observes.
    Step { dt: i64, ready: bool, failing: bool },
    /// `kill -9` and restart: state reloaded from its persisted JSON.
    Restart,
}

fn gate() -> impl Strategy<Value = Gate> {
    prop_oneof![
        1 => (0..4u8).prop_map(Gate::NewTarget),
        6 => (0i64..40_000, prop::bool::weighted(0.7), prop::bool::weighted(0.15))
            .prop_map(|(dt, ready, failing)| Gate::Step { dt, ready, failing }),
        1 => Just(Gate::Restart),
    ]
}

/// What must be persisted before acting: the good spec, the bad marks, the progress start.
fn durable(st: &NodeRollout) -> (Option<String>, BTreeSet<String>, Option<(String, UnixMs)>) {
    (
        st.good.as_ref().map(rollout::spec_id),
        st.bad.clone(),
        st.progress.as_ref().map(|p| (p.target.clone(), p.started_at)),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn rollout_gate_never_runs_a_bad_revision(events in prop::collection::vec(gate(), 1..80)) {
        let mut st = NodeRollout::default();
        let mut persisted = st.clone();
        let mut target = spec(1, "h0");
        let mut now: UnixMs = 0;
        for e in &events {
            match e {
                Gate::NewTarget(h) => target = spec(target.revision + 1, &format!("h{h}")),
                Gate::Restart => {
                    st = serde_json::from_str(&serde_json::to_string(&persisted).unwrap()).unwrap();
                    rollout::after_restart(&mut st);
                }
                Gate::Step { dt, ready, failing } => {
                    now += dt;
                    let health = Health {
                        ready: *ready && !*failing,
                        failing: failing.then(|| "crash loop".to_string()),
                        last_probe_failure: None,
                    };
                    let before = durable(&st);
                    let was_bad = st.bad.contains(&rollout::spec_id(&target));
                    let had_good = st.good.is_some();
                    let s = rollout::step(&mut st, &target, &health, now);
                    if durable(&st) != before {
                        prop_assert!(s.persist, "state changed without persist: {:?} -> {:?}", before, durable(&st));
                    }
                    if s.persist {
                        persisted = st.clone();
                    }
                    match s.run {
                        Run::Good => {
                            let good = st.good.as_ref();
                            prop_assert!(good.is_some(), "runs the good spec without one");
                            prop_assert!(!st.bad.contains(&rollout::spec_id(good.unwrap())), "the good spec is marked bad");
                        }
                        Run::Target => prop_assert!(
                            !st.bad.contains(&rollout::spec_id(&target)) || st.good.is_none(),
                            "runs bad target {} although a good revision exists", rollout::spec_id(&target)
                        ),
                    }
                    // A bad target is never retried while a good revision exists: it stays bad
                    // and is not run again. (With none, it runs, and may become the good one.)
                    if was_bad && had_good {
                        prop_assert_eq!(s.run, Run::Good);
                    }
                    // A target not yet bad is always tried: it runs, or fails its gate now.
                    if !was_bad {
                        prop_assert!(s.run == Run::Target || st.bad.contains(&rollout::spec_id(&target)));
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// schedule: stability under node churn

fn labels() -> impl Strategy<Value = outpost_api::Labels> {
    (prop::option::of(0..2u8), prop::option::of(0..2u8)).prop_map(|(site, tier)| {
        let mut l = outpost_api::Labels::new();
        if let Some(s) = site {
            l.insert("site".into(), format!("s{s}"));
        }
        if let Some(t) = tier {
            l.insert("tier".into(), format!("t{t}"));
        }
        l
    })
}

fn nodes(prefix: &'static str, max: usize) -> impl Strategy<Value = Vec<NodeView>> {
    prop::collection::vec((labels(), prop::bool::weighted(0.8)), 0..max).prop_map(move |v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (labels, online))| NodeView {
                name: format!("{prefix}{i}"),
                labels,
                online,
            })
            .collect()
    })
}

fn workloads() -> impl Strategy<Value = Vec<WorkloadView>> {
    prop::collection::vec((any::<bool>(), labels(), 0..5u32), 1..6).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (daemon, node_selector, replicas))| WorkloadView {
                affinity: None,
                id: ObjectId {
                    kind: if daemon { Kind::DaemonSet } else { Kind::Deployment },
                    namespace: "default".into(),
                    name: format!("w{i}"),
                },
                node_selector,
                replicas,
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn placed_replicas_stay_under_node_churn(
        before in nodes("n", 8),
        added in nodes("m", 4),
        removed in prop::collection::btree_set(0..8usize, 0..4),
        flapped in prop::collection::btree_set(0..8usize, 0..4),
        workloads in workloads(),
    ) {
        let first = schedule(&before, &workloads, &BTreeMap::new());
        let current: BTreeMap<ObjectId, BTreeSet<String>> = first
            .iter()
            .filter(|(id, _)| id.kind == Kind::Deployment)
            .map(|(id, d)| (id.clone(), d.nodes.clone()))
            .collect();
        let mut after: Vec<NodeView> = before
            .iter()
            .enumerate()
            .filter(|(i, _)| !removed.contains(i))
            .map(|(i, n)| NodeView { online: n.online ^ flapped.contains(&i), ..n.clone() })
            .collect();
        after.extend(added);
        let second = schedule(&after, &workloads, &current);
        prop_assert_eq!(&second, &schedule(&after, &workloads, &current), "deterministic");
        for w in &workloads {
            let got = &second[&w.id].nodes;
            let matching: BTreeSet<&str> = after
                .iter()
                .filter(|n| selector_matches(&w.node_selector, &n.labels))
                .map(|n| n.name.as_str())
                .collect();
            if w.id.kind == Kind::DaemonSet {
                prop_assert_eq!(got.iter().map(String::as_str).collect::<BTreeSet<_>>(), matching);
                continue;
            }
            let placed = &current[&w.id];
            let kept: BTreeSet<&str> = placed.iter().map(String::as_str).filter(|n| matching.contains(n)).collect();
            for n in &kept {
                prop_assert!(got.contains(*n), "{}: replica on {} moved; before {:?}, after {:?}", w.id, n, placed, got);
            }
            prop_assert!(got.len() <= w.replicas as usize);
            for n in got {
                prop_assert!(matching.contains(n.as_str()), "{} placed on non-matching {}", w.id, n);
                let online = after.iter().any(|x| &x.name == n && x.online);
                prop_assert!(kept.contains(n.as_str()) || online, "{}: new replica on offline {}", w.id, n);
            }
            let free_online = after
                .iter()
                .filter(|n| n.online && matching.contains(n.name.as_str()) && !kept.contains(n.name.as_str()))
                .count();
            prop_assert_eq!(got.len(), (w.replicas as usize).min(kept.len() + free_online), "{} fills up", &w.id);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// bundle_changes: deltas round-trip

fn bundle() -> impl Strategy<Value = BTreeMap<String, WorkloadSpec>> {
    prop::collection::btree_map(0..8u8, (1..4u64, 0..3u8), 0..8).prop_map(|m| {
        m.into_iter()
            .map(|(k, (revision, image))| {
                let key = format!("deployment/default/w{k}");
                let mut s = spec(revision, "");
                s.key = key.clone();
                s.name = format!("w{k}");
                s.grace_seconds = image as u64;
                s.hash = outpost_api::content_hash(&s);
                (key, s)
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn bundle_deltas_round_trip(old in bundle(), new in bundle()) {
        let held: BTreeMap<String, String> = old.iter().map(|(k, s)| (k.clone(), s.hash.clone())).collect();
        let (upsert, remove) = outpost_core::bundle_changes(&held, &new);
        let mut applied = old.clone();
        for k in &remove {
            prop_assert!(applied.remove(k).is_some(), "removes {} which is not held", k);
        }
        for k in &upsert {
            applied.insert(k.clone(), new[k].clone());
        }
        prop_assert_eq!(&applied, &new);
        // only what changed, each once, in order
        for k in &upsert {
            prop_assert!(old.get(k).is_none_or(|o| o.hash != new[k].hash), "{} upserted unchanged", k);
        }
        prop_assert!(upsert.windows(2).all(|w| w[0] < w[1]) && remove.windows(2).all(|w| w[0] < w[1]));
        prop_assert!(remove.iter().all(|k| !new.contains_key(k)));
    }
}

#[test]
fn phases_of_the_model_are_reachable() {
    // Guard against a model that never reaches the interesting states: a crash loop and a
    // completed unit under the executor above.
    let mut a = Agent::default();
    a.apply(&Ev::Desire {
        unit: 0,
        hash: 0,
        present: true,
        runnable: true,
        policy: 0,
        grace_ms: 10,
    })
    .unwrap();
    for _ in 0..4 {
        a.apply(&Ev::Tick {
            dt: supervise::BACKOFF_MAX_MS,
            fail: false,
        })
        .unwrap();
        a.apply(&Ev::Exit { unit: 0, code: Some(1) }).unwrap();
    }
    assert_eq!(supervise::phase(&a.units["w/a"]), Phase::CrashLoopBackOff);
}

// ---------------------------------------------------------------------------------------------
// waves: fleet rollouts

mod fleet_rollout {
    use super::*;
    use outpost_core::waves::{self, Gate, OnFailure, Policy, Select, WavePlan};

    #[derive(Clone, Debug)]
    pub enum Step {
        /// Time passes; the hub decides.
        Tick(i64),
        /// A node goes offline or comes back.
        Flip(usize),
        Pause,
        Resume,
        Abort,
        Undo,
    }

    pub fn any_step() -> impl Strategy<Value = Step> {
        prop_oneof![
            8 => (0i64..90_000).prop_map(Step::Tick),
            3 => (0usize..16).prop_map(Step::Flip),
            1 => Just(Step::Pause),
            1 => Just(Step::Resume),
            1 => Just(Step::Abort),
            1 => Just(Step::Undo),
        ]
    }

    pub fn any_policy() -> impl Strategy<Value = Policy> {
        let select = prop_oneof![
            (1u32..4).prop_map(Select::Count),
            (1u32..=100).prop_map(Select::Percent),
            (0u8..2).prop_map(|s| Select::Labels([("site".to_string(), format!("s{s}"))].into())),
        ];
        (
            prop::collection::vec((select, prop::sample::select(vec![0i64, 30_000, 120_000])), 1..5),
            0u32..=100,
            1u32..12,
            prop::bool::ANY,
            prop::option::of(1u32..4),
            1u32..5,
        )
            .prop_map(|(waves, pct, min, pause, max, tiny)| Policy {
                waves: waves
                    .into_iter()
                    .enumerate()
                    .map(|(i, (select, bake_ms))| WavePlan {
                        name: format!("w{i}"),
                        select,
                        bake_ms,
                    })
                    .collect(),
                failure_percent: pct,
                min_sample: min,
                on_failure: if pause { OnFailure::Pause } else { OnFailure::Rollback },
                max_concurrent: max,
                tiny_fleet: tiny,
                ..Policy::default()
            })
    }

    /// A simulated node: it receives its desired revision only while online, and its gate of
    /// the new revision passes unless the node is `bad`.
    #[derive(Clone, Debug)]
    pub struct Sim {
        pub view: waves::NodeView,
        pub bad: bool,
        pub received: u64,
        pub received_target: bool,
    }

    pub fn any_fleet() -> impl Strategy<Value = Vec<Sim>> {
        prop::collection::vec((0u8..2, prop::bool::weighted(0.25), prop::bool::weighted(0.8)), 2..16).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (site, bad, online))| Sim {
                    view: waves::NodeView {
                        name: format!("n{i:02}"),
                        labels: [("site".to_string(), format!("s{site}"))].into(),
                        online,
                        tz: jiff::tz::TimeZone::UTC,
                        gate: Gate::Unknown,
                    },
                    bad,
                    received: 1,
                    received_target: false,
                })
                .collect()
        })
    }

    pub const TARGET: u64 = 2;
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn waves_keep_their_promises(
        mut sims in fleet_rollout::any_fleet(),
        policy in fleet_rollout::any_policy(),
        steps in prop::collection::vec(fleet_rollout::any_step(), 1..60),
    ) {
        use fleet_rollout::*;
        use outpost_api::{NodeRolloutState, RolloutPhase};
        use outpost_core::waves::{self, Gate};
        let held: BTreeMap<String, u64> = sims.iter().map(|s| (s.view.name.clone(), 1)).collect();
        let mut r = waves::start(None, "w", TARGET, &held, &policy, false, 0).rollout;
        let mut now: UnixMs = 0;
        let mut rolled_back_at: Option<UnixMs> = None;
        for st in &steps {
            match st {
                Step::Tick(dt) => {
                    now += dt;
                    let views: Vec<waves::NodeView> = sims.iter().map(|s| s.view.clone()).collect();
                    r = waves::decide(&r, &policy, &views, now).rollout;
                }
                Step::Flip(i) => {
                    if let Some(s) = sims.get_mut(*i) {
                        s.view.online = !s.view.online;
                    }
                }
                Step::Pause => if let Ok(d) = waves::pause(&r, now) { r = d.rollout },
                Step::Resume => if let Ok(d) = waves::resume(&r, now) { r = d.rollout },
                Step::Abort => if let Ok(d) = waves::abort(&r, now) { r = d.rollout },
                Step::Undo => if let Ok(d) = waves::undo(&r, now) { r = d.rollout },
            }
            if rolled_back_at.is_none() && matches!(r.phase, RolloutPhase::Failed | RolloutPhase::RolledBack) {
                rolled_back_at = Some(now);
            }
            // Online nodes receive what the hub hands them; their gate reports on the target.
            for s in sims.iter_mut() {
                let want = waves::desired_revision(Some(&r), TARGET, Some(1), &s.view.name);
                if rolled_back_at.is_some() && want == TARGET && s.view.online && !s.received_target {
                    prop_assert!(false, "{} is handed revision {TARGET} after the fleet rolled it back", s.view.name);
                }
                if rolled_back_at.is_some() && want == TARGET {
                    let m = r.members.get(&s.view.name);
                    prop_assert!(
                        m.is_some_and(|m| m.state == NodeRolloutState::Failed && m.running_good),
                        "{} pinned to the rolled-back revision without having refused it: {m:?}", s.view.name
                    );
                }
                // A node whose wave has not opened keeps its previous revision.
                if !r.members.contains_key(&s.view.name) && r.phase != RolloutPhase::Complete {
                    prop_assert_eq!(want, 1);
                }
                if s.view.online {
                    s.received = want;
                    if want == TARGET {
                        s.received_target = true;
                        s.view.gate = if s.bad { Gate::RolledBack("bad".into()) } else { Gate::Passed };
                    }
                }
            }
            // A wave completes only after its bake, and never opens before the previous one
            // completed.
            for w in &r.waves {
                if let Some(done) = w.completed_at {
                    let gates = w.gates_done_at.expect("a completed wave has its gates done");
                    prop_assert!(done >= gates + w.bake_ms, "wave {w:?} completed before its bake");
                }
            }
            for w in r.waves.windows(2) {
                prop_assert!(w[0].completed_at.is_some_and(|c| c <= w[1].opened_at),
                    "wave {:?} opened before {:?} completed", w[1], w[0]);
            }
        }
    }

    #[test]
    fn healthy_online_nodes_complete_whatever_stays_offline(
        mut sims in fleet_rollout::any_fleet(),
        policy in fleet_rollout::any_policy(),
    ) {
        use fleet_rollout::*;
        use outpost_api::RolloutPhase;
        use outpost_core::waves::{self, Gate};
        for s in sims.iter_mut() {
            s.bad = false;
        }
        let held: BTreeMap<String, u64> = sims.iter().map(|s| (s.view.name.clone(), 1)).collect();
        let mut r = waves::start(None, "w", TARGET, &held, &policy, false, 0).rollout;
        let mut now = 0;
        for _ in 0..200 {
            let views: Vec<waves::NodeView> = sims.iter().map(|s| s.view.clone()).collect();
            r = waves::decide(&r, &policy, &views, now).rollout;
            if r.phase == RolloutPhase::Complete {
                break;
            }
            for s in sims.iter_mut().filter(|s| s.view.online) {
                if waves::desired_revision(Some(&r), TARGET, Some(1), &s.view.name) == TARGET {
                    s.view.gate = Gate::Passed;
                }
            }
            now += 60_000;
        }
        prop_assert_eq!(r.phase, RolloutPhase::Complete, "stuck: {:?}", r);
        // offline nodes get the revision when they return
        for s in &sims {
            prop_assert_eq!(waves::desired_revision(Some(&r), TARGET, Some(1), &s.view.name), TARGET);
        }
    }
}
