//! The reconcile loop: executes `outpost_core::supervise` decisions against the process runtime
//! and the Docker runtime.
//!
//! Inputs: the desired state (a `watch` channel fed by the sync task, always already persisted),
//! process exits (from waiter tasks), container starts (from start tasks: an image may have to
//! come from the hub first), probe results, and timers (backoff, stop grace, update gates). Output: a status snapshot
//! (a `watch` channel read by the status reporter) and events in the store's outbox.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use outpost_api::{ContainerStatus, Phase, Runtime as RuntimeKind, UnixMs, WorkloadSpec, WorkloadStatus};
use outpost_core::probe::{ProbeKind, ProbeState, Verdict};
use outpost_core::rollout::{self, Health, NodeRollout, Run};
use outpost_core::supervise::{self, Action, DesiredUnit, Unit};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::docker::Engine;
use crate::probe::{self, ProbeEvent};
use crate::runtime::{self, Runtime};
use crate::store::{Desired, Store};
use crate::sync::HubClient;

pub use outpost_api::now_ms;

/// A process exit, from a waiter task.
#[derive(Debug)]
struct Exit {
    unit: String,
    pid: u32,
    code: Option<i32>,
    signal: Option<i32>,
    /// Why, when the runtime knows more than the code (a container removed from outside).
    detail: Option<String>,
}

/// A container start finished (or failed), from a start task.
struct Started {
    unit: String,
    hash: String,
    result: Result<StartedContainer, String>,
}

struct StartedContainer {
    engine: Engine,
    id: String,
    pid: u32,
    ip: Option<String>,
}

/// The containers a previous agent left running, from `find_containers`.
struct Found {
    engine: Engine,
    containers: Vec<(crate::docker::OwnedContainer, Option<u32>, Option<String>)>,
}

/// Reason prefix when the Docker Engine cannot be reached: reported as WaitingForRuntime.
const RUNTIME_UNAVAILABLE: &str = "RuntimeUnavailable";

/// Status of every desired workload, keyed by workload key.
pub type Snapshot = BTreeMap<String, WorkloadStatus>;

pub struct Reconciler {
    rt: Runtime,
    store: Arc<Store>,
    /// What the hub asked for (persisted).
    desired: Arc<Desired>,
    /// Per workload: last-known-good, bad marks, gate in progress (persisted).
    rollouts: BTreeMap<String, NodeRollout>,
    /// What runs, per workload: the desired spec, or the last-known-good after a rollback.
    effective: BTreeMap<String, WorkloadSpec>,
    units: BTreeMap<String, Unit>,
    probes: BTreeMap<String, UnitProbes>,
    exits_tx: mpsc::UnboundedSender<Exit>,
    exits_rx: mpsc::UnboundedReceiver<Exit>,
    probe_tx: mpsc::UnboundedSender<ProbeEvent>,
    probe_rx: mpsc::UnboundedReceiver<ProbeEvent>,
    started_tx: mpsc::UnboundedSender<Started>,
    started_rx: mpsc::UnboundedReceiver<Started>,
    status_tx: watch::Sender<Snapshot>,
    /// The Docker Engine, once reached; `docker_socket` says where to find it.
    engine: Option<Engine>,
    docker_socket: String,
    /// Container id of each unit that runs as a container.
    containers: BTreeMap<String, String>,
    /// Container IPs, for http/tcp probes.
    container_ips: BTreeMap<String, String>,
    /// True once the agent knows which containers it already runs; container units start only then.
    docker_known: bool,
    /// Why the engine could not be asked yet.
    docker_pending: Option<String>,
    found_tx: mpsc::UnboundedSender<Result<Found, String>>,
    found_rx: mpsc::UnboundedReceiver<Result<Found, String>>,
    hub: Option<Arc<HubClient>>,
    /// The hub's desired state (from the store); `desired` is it plus the local workloads.
    hub_desired: Arc<Desired>,
    local: crate::local::LocalWorkloads,
    local_rx: Option<watch::Receiver<crate::local::LocalWorkloads>>,
    /// The store was new and nothing was restored: units that run but are not desired are
    /// kept (not stopped) until the first desired state arrives from the hub.
    hold: bool,
    /// Job and CronJob state by workload key (`jobs` module; loaded on first use).
    jobs: BTreeMap<String, crate::jobs::JobState>,
    local_tz: jiff::tz::TimeZone,
    /// The node's data pipeline: runs the Pipeline workloads of `desired`, reports their gates.
    pipelines: Option<crate::pipeline::PipelineLink>,
    applied_rx: Option<watch::Receiver<BTreeMap<String, outpost_core::pipeline::Applied>>>,
    /// The model servers' counters (`inference::stats`): the reconciler names the servers that
    /// run and judges a new model revision on them (the model gate).
    models: crate::inference::stats::Board,
    /// Site failover (docs/site-ha.md): which failover workloads this box runs, from the site
    /// peer link. A failover workload runs only while its role here is `active`.
    roles: crate::site::Roles,
    roles_rx: Option<watch::Receiver<crate::site::Roles>>,
    /// Exec sessions asking what to run in (`crate::exec`).
    exec_rx: Option<mpsc::UnboundedReceiver<crate::exec::Lookup>>,
}

/// Probe state of one running process.
struct UnitProbes {
    pid: u32,
    state: ProbeState,
    specs: BTreeMap<ProbeKind, outpost_api::ProbeSpec>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for UnitProbes {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn unit_id(key: &str, container: &str) -> String {
    format!("{key}/{container}")
}

impl Reconciler {
    pub fn new(
        rt: Runtime,
        store: Arc<Store>,
        desired: Arc<Desired>,
        status_tx: watch::Sender<Snapshot>,
        hub: Option<Arc<HubClient>>,
        docker_socket: String,
    ) -> Self {
        let hub_desired = desired.clone();
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        let (probe_tx, probe_rx) = mpsc::unbounded_channel();
        let (started_tx, started_rx) = mpsc::unbounded_channel();
        let (found_tx, found_rx) = mpsc::unbounded_channel();
        let mut rollouts = store.load_rollouts().unwrap_or_else(|e| {
            warn!(error = %e, "cannot read rollout state; starting the update gates afresh");
            BTreeMap::new()
        });
        rollouts.values_mut().for_each(rollout::after_restart);
        Self {
            rt,
            store,
            desired,
            rollouts,
            effective: BTreeMap::new(),
            units: BTreeMap::new(),
            probes: BTreeMap::new(),
            exits_tx,
            exits_rx,
            probe_tx,
            probe_rx,
            started_tx,
            started_rx,
            status_tx,
            engine: None,
            docker_socket,
            containers: BTreeMap::new(),
            container_ips: BTreeMap::new(),
            docker_known: false,
            docker_pending: None,
            found_tx,
            found_rx,
            hub,
            hold: false,
            jobs: BTreeMap::new(),
            local_tz: crate::jobs::local_zone(),
            hub_desired,
            local: Arc::new(BTreeMap::new()),
            local_rx: None,
            pipelines: None,
            applied_rx: None,
            models: Default::default(),
            roles: Arc::new(BTreeMap::new()),
            roles_rx: None,
            exec_rx: None,
        }
    }

    /// Answer exec sessions' questions about what runs where (`crate::exec`).
    pub fn with_exec(mut self, rx: mpsc::UnboundedReceiver<crate::exec::Lookup>) -> Self {
        self.exec_rx = Some(rx);
        self
    }

    /// The running container an exec session names: `workload` is `NAME` or `KIND/NAME`.
    fn exec_target(&self, l: &crate::exec::Lookup) -> Result<crate::exec::Target, String> {
        let (kind, name) = match l.workload.split_once('/') {
            Some((k, n)) => (Some(k.to_ascii_lowercase()), n),
            None => (None, l.workload.as_str()),
        };
        let found: Vec<&WorkloadSpec> = self
            .effective
            .values()
            .filter(|w| w.name == name && w.namespace == l.namespace && !w.containers.is_empty())
            .filter(|w| kind.as_deref().is_none_or(|k| w.key.split('/').next() == Some(k)))
            .collect();
        let w = match found[..] {
            [w] => w,
            [] => {
                return Err(format!(
                    "workload {} is not on this node (namespace {}): see `outpost get workloads`",
                    l.workload, l.namespace
                ))
            }
            _ => {
                return Err(format!(
                    "several workloads are named {name} here ({}): name one as KIND/NAME",
                    found.iter().map(|w| w.key.as_str()).collect::<Vec<_>>().join(", ")
                ))
            }
        };
        let c = match &l.container {
            Some(c) => w.containers.iter().find(|x| &x.name == c).ok_or_else(|| {
                format!(
                    "workload {} has no container {c} (it has {})",
                    w.key,
                    w.containers
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?,
            None => w.containers.iter().find(|c| !c.init).unwrap_or(&w.containers[0]),
        };
        let unit = unit_id(&w.key, &c.name);
        let pid = self.units.get(&unit).and_then(|u| u.pid).ok_or_else(|| {
            let why = self
                .units
                .get(&unit)
                .and_then(|u| u.reason.clone())
                .unwrap_or_else(|| "not started".into());
            format!("{unit} is not running on this node ({why}); exec needs a running container")
        })?;
        let ctx = self.rt.exec_context(w, c, &unit);
        let container = match (self.containers.get(&unit), &self.engine) {
            (Some(id), Some(engine)) => Some((engine.clone(), id.clone())),
            _ => None,
        };
        Ok(crate::exec::Target {
            unit,
            env: ctx.env,
            cwd: ctx.cwd,
            pid,
            container,
        })
    }

    /// Hand the Pipeline workloads of the desired state to the node's data pipeline.
    pub fn with_pipelines(mut self, link: crate::pipeline::PipelineLink) -> Self {
        self.applied_rx = Some(link.applied());
        self.pipelines = Some(link);
        self.publish_pipelines();
        self
    }

    /// The pipelines of `desired` (persisted with it) to the data pipeline.
    fn publish_pipelines(&self) {
        if let Some(link) = &self.pipelines {
            link.set(outpost_core::pipeline::from_desired(self.desired.workloads.values()));
        }
    }

    /// Share the model servers' counters with the stats scrape loop and the vitals sampler.
    pub fn with_models(mut self, board: crate::inference::stats::Board) -> Self {
        self.models = board;
        self
    }

    /// Run the workloads of a manifest directory beside the hub's (`local` module).
    pub fn with_local(mut self, rx: watch::Receiver<crate::local::LocalWorkloads>) -> Self {
        self.local = rx.borrow().clone();
        self.local_rx = Some(rx);
        self.merge();
        self
    }

    /// Run failover workloads only where the site peer link says this box is active.
    pub fn with_site_roles(mut self, rx: watch::Receiver<crate::site::Roles>) -> Self {
        self.roles = rx.borrow().clone();
        self.roles_rx = Some(rx);
        self
    }

    /// A failover workload this box does not run now (a standby copy: nothing runs, no gate).
    fn standby(&self, w: &WorkloadSpec) -> bool {
        w.failover.is_some() && self.roles.get(&w.key).map(String::as_str) != Some(crate::site::ACTIVE)
    }

    /// `desired` = the hub's workloads and the local ones (keys never collide: `local/...`).
    fn merge(&mut self) {
        self.desired = if self.local.is_empty() {
            self.hub_desired.clone()
        } else {
            let mut d = (*self.hub_desired).clone();
            d.workloads.retain(|k, _| !crate::local::is_local(k));
            for (k, w) in self.local.iter() {
                d.workloads.insert(k.clone(), w.clone());
            }
            Arc::new(d)
        };
        self.publish_pipelines();
    }

    /// Keep adopted units that the (empty) desired state does not list until the hub's first
    /// answer: an agent whose state was lost must not stop healthy workloads.
    pub fn hold_until_synced(mut self, hold: bool) -> Self {
        self.hold = hold;
        self
    }

    /// While holding, stopping a unit the desired state does not know is not decided yet.
    fn held(&self, a: &Action, desired: &BTreeMap<String, DesiredUnit>) -> bool {
        self.hold
            && match a {
                Action::Terminate { unit, .. } | Action::Kill { unit, .. } => !desired.contains_key(unit),
                Action::Start { .. } | Action::Forget { .. } => false,
            }
    }

    /// Health of a target spec's processes, for its update gate; for a model server with a
    /// model gate, also the model's own error rate and p99 latency since it started.
    fn health(&self, w: &WorkloadSpec, now: UnixMs) -> Health {
        let mut h = Health {
            ready: true,
            failing: None,
            last_probe_failure: None,
        };
        let main_running = w.containers.iter().filter(|c| !c.init).any(|c| {
            self.units
                .get(&unit_id(&w.key, &c.name))
                .is_some_and(|u| u.hash == w.hash && u.pid.is_some())
        });
        for c in &w.containers {
            let id = unit_id(&w.key, &c.name);
            let Some(u) = self.units.get(&id).filter(|u| u.hash == w.hash) else {
                // an init container that ran before an agent restart
                h.ready &= c.init && main_running;
                continue;
            };
            let probes = self.probes.get(&id).filter(|p| Some(p.pid) == u.pid);
            if let Some(f) = probes.and_then(|p| p.state.last_failure.clone()) {
                h.last_probe_failure = Some(format!("container {}: {f}", c.name));
            }
            let ready = u.done == Some(Phase::Succeeded) || (u.pid.is_some() && probes.is_none_or(|p| p.state.ready()));
            h.ready &= ready;
            if supervise::broken(u) && h.failing.is_none() {
                let tail = probe::tail(&self.rt.log_path(&w.key, &c.name), 5);
                h.failing = Some(format!(
                    "container {}: {} ({} restarts){}",
                    c.name,
                    u.reason.clone().unwrap_or_else(|| "exited".into()),
                    u.restarts,
                    if tail.is_empty() {
                        String::new()
                    } else {
                        format!("; last output: {tail}")
                    }
                ));
            }
        }
        if h.failing.is_none() {
            h.failing = self.model_gate_failure(w, now);
        }
        h
    }

    /// Why the target's model fails its gate (`outpost_core::inference::gate_verdict`), judged
    /// only on the counters of the target's own server process.
    fn model_gate_failure(&self, w: &WorkloadSpec, now: UnixMs) -> Option<String> {
        let (c, m, gate) = w
            .containers
            .iter()
            .find_map(|c| c.model.as_ref().and_then(|m| Some((c, m, m.gate.as_ref()?))))?;
        let pid = self
            .units
            .get(&unit_id(&w.key, &c.name))
            .filter(|u| u.hash == w.hash)?
            .pid?;
        let r = self.models.reading(&w.key).filter(|r| r.pid == pid)?;
        outpost_core::inference::gate_verdict(gate, &m.reference, &r.counters, r.at, now)
    }

    /// Run every workload's update gate; decide what runs. Returns the earliest wake-up.
    fn gate(&mut self, now: UnixMs) -> Option<UnixMs> {
        let mut wake: Option<UnixMs> = None;
        let mut effective = BTreeMap::new();
        for (key, target) in &self.desired.workloads {
            if self.standby(target) {
                continue; // nothing runs here and the update gate waits until this box is active
            }
            if target.job.is_some() || target.agent_update.is_some() || target.pipeline.is_some() {
                // A Job is not kept running, so it has no update gate: each run uses the target.
                // An AgentUpdate's gate is the self-update's own (selfupdate::gate_status), a
                // Pipeline's the data pipeline's (`pipeline_gate`).
                effective.insert(key.clone(), target.clone());
                continue;
            }
            let health = self.health(target, now);
            let st = self.rollouts.entry(key.clone()).or_default();
            let step = rollout::step(st, target, &health, now);
            if step.persist {
                if let Err(e) = self.store.save_rollout(key, st) {
                    // Acting on a decision that is not on disk could repeat a bad revision after a
                    // crash; keep running what runs now and try again shortly.
                    warn!(workload = %key, error = %e, "cannot persist update state; holding");
                    if let Some(cur) = self.effective.get(key) {
                        effective.insert(key.clone(), cur.clone());
                    }
                    wake = Some(wake.map_or(now + 1000, |w: i64| w.min(now + 1000)));
                    continue;
                }
            }
            if let Some((reason, message)) = &step.event {
                info!(workload = %key, %reason, "{message}");
                if let Err(e) = self.store.push_event(now, Some(key), reason, message) {
                    warn!(error = %e, "cannot record event");
                }
            }
            if let Some(t) = step.wake {
                wake = Some(wake.map_or(t, |w| w.min(t)));
            }
            let spec = match (step.run, &st.good) {
                (Run::Good, Some(g)) => g.clone(),
                _ => target.clone(),
            };
            effective.insert(key.clone(), spec);
        }
        let gone: Vec<String> = self
            .rollouts
            .keys()
            .filter(|k| !self.desired.workloads.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            self.rollouts.remove(&k);
            let _ = self.store.delete_rollout(&k);
        }
        self.effective = effective;
        self.models
            .set_targets(crate::inference::stats::targets(self.effective.values()));
        wake
    }

    /// Units the effective state asks for.
    fn desired_units(&self) -> BTreeMap<String, DesiredUnit> {
        let mut out = BTreeMap::new();
        for w in self
            .effective
            .values()
            .filter(|w| self.docker_known || w.runtime == RuntimeKind::Process)
        {
            let runnable = match (&w.job, self.jobs.get(&w.key)) {
                (None, _) => true,
                (Some(j), st) if j.cron.is_some() => st.is_some_and(|s| s.active),
                (Some(_), st) => !st.is_some_and(|s| s.finished(&w.hash)),
            };
            // Init containers run to completion first; the containers start once all have
            // succeeded. Containers found running (adopted after an agent restart) mean the
            // init containers already ran: they are not run again.
            let unit =
                |c: &outpost_api::ContainerSpec| self.units.get(&unit_id(&w.key, &c.name)).filter(|u| u.hash == w.hash);
            let main_running = w
                .containers
                .iter()
                .filter(|c| !c.init)
                .any(|c| unit(c).is_some_and(|u| u.pid.is_some() || u.starting || u.done.is_some()));
            let inits_done = w
                .containers
                .iter()
                .filter(|c| c.init)
                .all(|c| unit(c).is_some_and(|u| u.done == Some(Phase::Succeeded)));
            // init containers run one after the other, in declaration order
            let mut earlier_done = true;
            for c in &w.containers {
                let (runnable, restart_policy) = if c.init {
                    let policy = match w.restart_policy {
                        outpost_api::RestartPolicy::Never => outpost_api::RestartPolicy::Never,
                        _ => outpost_api::RestartPolicy::OnFailure,
                    };
                    let turn = unit(c).is_some() || (!main_running && earlier_done);
                    earlier_done &= unit(c).is_some_and(|u| u.done == Some(Phase::Succeeded));
                    (runnable && turn, policy)
                } else {
                    (runnable && (inits_done || main_running), w.restart_policy)
                };
                out.insert(
                    unit_id(&w.key, &c.name),
                    DesiredUnit {
                        hash: w.hash.clone(),
                        restart_policy,
                        grace_ms: (w.grace_seconds * 1000) as i64,
                        runnable,
                    },
                );
            }
        }
        out
    }

    fn lookup(&self, unit: &str) -> Option<(&WorkloadSpec, usize)> {
        self.effective.values().find_map(|w| {
            w.containers
                .iter()
                .position(|c| unit_id(&w.key, &c.name) == unit)
                .map(|i| (w, i))
        })
    }

    /// Re-adopt processes this agent started before it restarted (see `runtime`'s module doc).
    pub fn adopt(&mut self) {
        let desired = self.desired_units();
        let restarts = self.store.unit_restarts().unwrap_or_default();
        for p in runtime::scan_owned(&self.rt.agent_id) {
            let keep = !self.units.contains_key(&p.unit);
            if keep {
                let grace = desired.get(&p.unit).map_or(30_000, |d| d.grace_ms);
                info!(unit = %p.unit, pid = p.pid, "re-adopted running process");
                self.units.insert(
                    p.unit.clone(),
                    Unit {
                        hash: p.hash.clone(),
                        grace_ms: grace,
                        pid: Some(p.pid),
                        started_at: Some(now_ms()),
                        restarts: restarts
                            .get(&p.unit)
                            .filter(|(h, _)| *h == p.hash)
                            .map_or(0, |(_, r)| *r),
                        ..Default::default()
                    },
                );
                self.watch_adopted(p.unit.clone(), p.pid, p.start_ticks);
                self.start_probes(&p.unit, p.pid);
            } else {
                warn!(unit = %p.unit, pid = p.pid, "found a second process for one unit; killing the duplicate");
                runtime::signal_group(p.pid, Signal::SIGKILL);
            }
        }
    }

    /// An adopted process is not our child: poll /proc for its end (exit code unknown).
    fn watch_adopted(&self, unit: String, pid: u32, ticks: u64) {
        let tx = self.exits_tx.clone();
        tokio::spawn(async move {
            while runtime::alive(pid, ticks) {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            let _ = tx.send(Exit {
                unit,
                pid,
                code: None,
                signal: None,
                detail: None,
            });
        });
    }

    fn event(&self, workload: Option<&str>, reason: &str, message: &str) {
        if let Err(e) = self.store.push_event(now_ms(), workload, reason, message) {
            warn!(error = %e, "cannot record event");
        }
    }

    fn execute(&mut self, action: Action, now: UnixMs) {
        match action {
            Action::Start { unit } => self.start(&unit, now),
            Action::Terminate { unit, pid, kill_at } => {
                info!(unit = %unit, pid, "stopping");
                self.signal(&unit, pid, Signal::SIGTERM, kill_at - now);
                if let Some(u) = self.units.get_mut(&unit) {
                    u.stopping = Some((kill_at, false));
                }
            }
            Action::Kill { unit, pid } => {
                warn!(unit = %unit, pid, "grace period over; killing");
                self.signal(&unit, pid, Signal::SIGKILL, 0);
                if let Some(u) = self.units.get_mut(&unit) {
                    if let Some((deadline, _)) = u.stopping {
                        u.stopping = Some((deadline, true));
                    }
                }
            }
            Action::Forget { unit } => {
                self.units.remove(&unit);
                let _ = self.store.forget_unit(&unit);
            }
        }
    }

    /// Stop (SIGTERM, with the engine's own SIGKILL after `grace_ms`) or kill a unit, whatever
    /// its runtime.
    fn signal(&self, unit: &str, pid: u32, sig: Signal, grace_ms: i64) {
        match (self.containers.get(unit), &self.engine) {
            (Some(id), Some(engine)) => {
                let (engine, id) = (engine.clone(), id.clone());
                tokio::spawn(async move {
                    if sig == Signal::SIGKILL {
                        engine.kill(&id).await
                    } else {
                        engine.stop(&id, (grace_ms.max(0) as u64).div_ceil(1000)).await
                    }
                });
            }
            _ => runtime::signal_group(pid, sig),
        }
    }

    /// Start a container in a task: the image may have to be fetched first.
    fn start_container(&mut self, unit: &str, w: WorkloadSpec, mut c: outpost_api::ContainerSpec) {
        // Where to publish data, when the pipeline's listeners are reachable from a container.
        crate::pipeline::add_container_env(&self.rt.data_dir, &mut c.env);
        let volumes = match self.rt.prepare_volumes(&w) {
            Ok(v) => v,
            Err(reason) => return self.start_failed(unit, &w, &c, reason, now_ms()),
        };
        if let Some(u) = self.units.get_mut(unit) {
            u.starting = true;
            u.next_start_at = None;
        }
        let (engine, socket, agent_id) = (
            self.engine.clone(),
            self.docker_socket.clone(),
            self.rt.agent_id.clone(),
        );
        let (hub, images_dir, tx) = (
            self.hub.clone(),
            self.rt.data_dir.join("images"),
            self.started_tx.clone(),
        );
        let unit = unit.to_string();
        let node = self.rt.node.clone();
        tokio::spawn(async move {
            let run = async {
                let engine = match engine {
                    Some(e) => e,
                    None => Engine::connect(&socket, &agent_id)
                        .await
                        .map_err(|e| format!("{RUNTIME_UNAVAILABLE}: {e}"))?,
                };
                let image = c.image.clone().unwrap_or_default();
                crate::images::ensure(&engine, hub.as_deref(), &images_dir, &image, c.image_pull_policy).await?;
                let id = engine.run(&w, &c, &unit, &volumes, &node).await?;
                let pid = engine.pid(&id).await.unwrap_or(0);
                let ip = engine.ip(&id).await;
                Ok(StartedContainer { engine, id, pid, ip })
            };
            let result = run.await;
            let _ = tx.send(Started {
                unit,
                hash: w.hash.clone(),
                result,
            });
        });
    }

    fn start_failed(
        &mut self,
        unit: &str,
        w: &WorkloadSpec,
        c: &outpost_api::ContainerSpec,
        reason: String,
        now: UnixMs,
    ) {
        let Some(u) = self.units.get_mut(unit) else { return };
        warn!(unit = %unit, %reason, "cannot start");
        u.starting = false;
        supervise::on_start_failed(u, reason.clone(), w.restart_policy, now);
        let restarts = u.restarts;
        let _ = self.store.set_unit_restarts(unit, &w.hash, restarts);
        self.event(Some(&w.key), "FailedStart", &format!("container {}: {reason}", c.name));
    }

    fn on_started(&mut self, s: Started, now: UnixMs) {
        let wanted = self.units.get(&s.unit).is_some_and(|u| u.starting && u.hash == s.hash);
        match s.result {
            Ok(sc) if wanted => {
                self.engine.get_or_insert_with(|| sc.engine.clone());
                let u = self.units.get_mut(&s.unit).expect("checked");
                u.starting = false;
                u.pid = Some(sc.pid);
                u.started_at = Some(now);
                info!(unit = %s.unit, pid = sc.pid, container = %&sc.id[..12.min(sc.id.len())], "container started");
                self.track_container(&s.unit, sc.engine, sc.id, sc.pid, sc.ip, 0);
            }
            Ok(sc) => {
                // The unit changed or went away while it was starting: not ours to run any more.
                tokio::spawn(async move { sc.engine.remove(&sc.id).await });
            }
            Err(reason) if wanted => {
                let Some((w, idx)) = self.lookup(&s.unit) else { return };
                let (w, c) = (w.clone(), w.containers[idx].clone());
                self.start_failed(&s.unit, &w, &c, reason, now);
            }
            Err(_) => {
                if let Some(u) = self.units.get_mut(&s.unit) {
                    u.starting = false;
                }
            }
        }
    }

    /// Watch a running container: its end, its output, its probes.
    fn track_container(
        &mut self,
        unit: &str,
        engine: Engine,
        id: String,
        pid: u32,
        ip: Option<String>,
        logs_since: i64,
    ) {
        self.containers.insert(unit.to_string(), id.clone());
        if let Some(ip) = ip {
            self.container_ips.insert(unit.to_string(), ip);
        }
        if let Some((w, idx)) = self.lookup(unit) {
            let log = self.rt.log_path(&w.key, &w.containers[idx].name);
            let _ = std::fs::create_dir_all(self.rt.workload_dir(&w.key));
            let (e2, id2) = (engine.clone(), id.clone());
            tokio::spawn(async move { e2.copy_logs(&id2, &log, logs_since).await });
        }
        let tx = self.exits_tx.clone();
        let unit_s = unit.to_string();
        tokio::spawn(async move {
            let exit = engine.wait(&id).await;
            let _ = engine.remove(&id).await;
            let _ = tx.send(Exit {
                unit: unit_s,
                pid,
                code: exit.code,
                signal: None,
                detail: exit.reason,
            });
        });
        self.start_probes(unit, pid);
    }

    /// Find the containers this agent created before it restarted, in the background: a Docker
    /// socket that accepts connections while the engine is still starting (socket activation
    /// at boot) must not delay process workloads. Retries until the engine answers; container
    /// units start only once this is known, so an existing container is never duplicated.
    fn find_containers(&self) {
        let (socket, agent_id, tx) = (
            self.docker_socket.clone(),
            self.rt.agent_id.clone(),
            self.found_tx.clone(),
        );
        tokio::spawn(async move {
            let mut backoff = outpost_core::retry::Backoff::new(outpost_core::retry::RUNTIME_PROBE);
            loop {
                let attempt = async {
                    let engine = Engine::connect(&socket, &agent_id).await?;
                    let mut found = Vec::new();
                    for c in engine.list_owned().await? {
                        let pid = if c.running { engine.pid(&c.id).await } else { None };
                        let ip = if pid.is_some() { engine.ip(&c.id).await } else { None };
                        found.push((c, pid, ip));
                    }
                    Ok::<_, String>(Found {
                        engine,
                        containers: found,
                    })
                };
                match tokio::time::timeout(Duration::from_secs(30), attempt).await {
                    Ok(Ok(f)) => {
                        let _ = tx.send(Ok(f));
                        return;
                    }
                    Ok(Err(e)) => {
                        if tx.send(Err(e)).is_err() {
                            return;
                        }
                    }
                    Err(_) => {
                        if tx
                            .send(Err(format!("the Docker Engine at {socket} did not answer within 30 s")))
                            .is_err()
                        {
                            return;
                        }
                    }
                }
                tokio::time::sleep(crate::retry_delay(&mut backoff)).await;
            }
        });
    }

    /// Adopt the running containers found; remove exited ones and duplicates.
    fn on_found(&mut self, found: Result<Found, String>) {
        let f = match found {
            Ok(f) => f,
            Err(e) => {
                if self.effective.values().any(|w| w.runtime == RuntimeKind::Docker) {
                    warn!(error = %e, "Docker Engine unreachable; container workloads wait for it");
                }
                self.docker_pending = Some(e);
                return;
            }
        };
        self.docker_pending = None;
        self.docker_known = true;
        self.engine = Some(f.engine.clone());
        let restarts = self.store.unit_restarts().unwrap_or_default();
        for (c, pid, ip) in f.containers {
            match pid.filter(|_| !self.units.contains_key(&c.unit)) {
                Some(pid) => {
                    info!(unit = %c.unit, container = %&c.id[..12.min(c.id.len())], "re-adopted running container");
                    let grace = self.desired_units().get(&c.unit).map_or(30_000, |d| d.grace_ms);
                    self.units.insert(
                        c.unit.clone(),
                        Unit {
                            hash: c.hash.clone(),
                            grace_ms: grace,
                            pid: Some(pid),
                            started_at: Some(now_ms()),
                            restarts: restarts
                                .get(&c.unit)
                                .filter(|(h, _)| *h == c.hash)
                                .map_or(0, |(_, r)| *r),
                            ..Default::default()
                        },
                    );
                    let since = self
                        .lookup(&c.unit)
                        .and_then(|(w, i)| std::fs::metadata(self.rt.log_path(&w.key, &w.containers[i].name)).ok())
                        .and_then(|m| m.modified().ok())
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_secs() as i64);
                    self.track_container(&c.unit, f.engine.clone(), c.id, pid, ip, since);
                }
                None => {
                    let e = f.engine.clone();
                    tokio::spawn(async move { e.remove(&c.id).await });
                }
            }
        }
    }

    fn start(&mut self, unit: &str, now: UnixMs) {
        let Some((w, idx)) = self.lookup(unit) else { return };
        let (w, c) = (w.clone(), w.containers[idx].clone());
        let fresh = self.units.get(unit).is_none_or(|u| u.hash != w.hash);
        if fresh {
            self.units.insert(
                unit.to_string(),
                Unit {
                    hash: w.hash.clone(),
                    grace_ms: (w.grace_seconds * 1000) as i64,
                    ..Default::default()
                },
            );
        }
        if w.runtime == RuntimeKind::Docker {
            return self.start_container(unit, w, c);
        }
        let result = self.rt.spawn(&w, &c, unit);
        let u = self.units.get_mut(unit).expect("inserted above");
        u.next_start_at = None;
        match result {
            Ok(mut child) => {
                let pid = child.id().unwrap_or(0);
                u.pid = Some(pid);
                u.started_at = Some(now);
                info!(unit = %unit, pid, revision = w.revision, "started");
                self.start_probes(unit, pid);
                let tx = self.exits_tx.clone();
                let unit = unit.to_string();
                tokio::spawn(async move {
                    use std::os::unix::process::ExitStatusExt;
                    let status = child.wait().await;
                    let (code, signal) = match status {
                        Ok(s) => (s.code(), s.signal()),
                        Err(_) => (None, None),
                    };
                    // The leader is gone: take the rest of its group with it.
                    runtime::signal_group(pid, Signal::SIGKILL);
                    let _ = tx.send(Exit {
                        unit,
                        pid,
                        code,
                        signal,
                        detail: None,
                    });
                });
            }
            Err(reason) => {
                warn!(unit = %unit, %reason, "cannot start");
                supervise::on_start_failed(u, reason.clone(), w.restart_policy, now);
                let restarts = u.restarts;
                let _ = self.store.set_unit_restarts(unit, &w.hash, restarts);
                self.event(Some(&w.key), "FailedStart", &format!("container {}: {reason}", c.name));
            }
        }
    }

    fn start_probes(&mut self, unit: &str, pid: u32) {
        let Some((w, idx)) = self.lookup(unit) else { return };
        let c = &w.containers[idx];
        let specs: BTreeMap<ProbeKind, outpost_api::ProbeSpec> = [
            (ProbeKind::Startup, c.startup_probe.clone()),
            (ProbeKind::Liveness, c.liveness_probe.clone()),
            (ProbeKind::Readiness, c.readiness_probe.clone()),
        ]
        .into_iter()
        .filter_map(|(k, s)| s.map(|s| (k, s)))
        .collect();
        if specs.is_empty() {
            self.probes.remove(unit);
            return;
        }
        let state = ProbeState::new(c.startup_probe.is_some(), c.readiness_probe.is_some());
        let mut ctx = self.rt.exec_context(w, c, unit);
        let ip = self.container_ips.get(unit).cloned();
        if let (Some(id), Some(engine)) = (self.containers.get(unit), &self.engine) {
            ctx.container = Some((engine.clone(), id.clone()));
        }
        // A container's ports are on its own address, not the host's.
        let at_container = |p: Option<outpost_api::ProbeSpec>| {
            p.map(|mut p| {
                if let Some(ip) = &ip {
                    match &mut p.action {
                        outpost_api::ProbeAction::HttpGet { host, .. }
                        | outpost_api::ProbeAction::TcpSocket { host, .. }
                            if host == "127.0.0.1" =>
                        {
                            *host = ip.clone()
                        }
                        _ => {}
                    }
                }
                p
            })
        };
        let tasks = probe::spawn(
            unit,
            pid,
            [
                (ProbeKind::Startup, at_container(c.startup_probe.clone())),
                (ProbeKind::Liveness, at_container(c.liveness_probe.clone())),
                (ProbeKind::Readiness, at_container(c.readiness_probe.clone())),
            ],
            ctx,
            self.probe_tx.clone(),
        );
        self.probes.insert(
            unit.to_string(),
            UnitProbes {
                pid,
                state,
                specs,
                tasks,
            },
        );
    }

    fn on_probe(&mut self, e: ProbeEvent, now: UnixMs) {
        let Some(p) = self.probes.get_mut(&e.unit).filter(|p| p.pid == e.pid) else {
            return;
        };
        let Some(spec) = p.specs.get(&e.kind) else { return };
        let verdict = p.state.record(e.kind, spec, e.ok, &e.message);
        match verdict {
            Verdict::Restart(reason) => {
                let Some(u) = self
                    .units
                    .get_mut(&e.unit)
                    .filter(|u| u.pid == Some(e.pid) && u.stopping.is_none())
                else {
                    return;
                };
                warn!(unit = %e.unit, pid = e.pid, %reason, "unhealthy; restarting");
                u.kill_reason = Some(reason.clone());
                u.stopping = Some((now + u.grace_ms, false));
                runtime::signal_group(e.pid, Signal::SIGTERM);
                let workload = e.unit.rsplit_once('/').map(|(w, _)| w.to_string());
                self.event(
                    workload.as_deref(),
                    "Unhealthy",
                    &format!("{}: {reason}; restarting", e.unit),
                );
            }
            Verdict::Ready(ready) => info!(unit = %e.unit, ready, "readiness changed"),
            Verdict::Nothing => {}
        }
    }

    /// Load the Job state of every job workload; run each CronJob's schedule decision
    /// (`outpost_core::cron::decide`) on the node's clock. Returns the earliest wake-up.
    fn jobs_tick(&mut self, now: UnixMs) -> Option<UnixMs> {
        let mut wake: Option<UnixMs> = None;
        let specs: Vec<WorkloadSpec> = self.effective.values().filter(|w| w.job.is_some()).cloned().collect();
        self.jobs.retain(|k, _| self.desired.workloads.contains_key(k));
        for w in specs {
            let dir = self.rt.workload_dir(&w.key);
            let st = self
                .jobs
                .entry(w.key.clone())
                .or_insert_with(|| crate::jobs::JobState::load(&dir));
            let Some(cron) = w.job.as_ref().and_then(|j| j.cron.clone()) else {
                continue;
            };
            let tz = match outpost_core::cron::zone(cron.time_zone.as_deref(), &self.local_tz) {
                Ok(z) => z,
                Err(e) => {
                    warn!(workload = %w.key, error = %e, "cannot evaluate the schedule");
                    continue;
                }
            };
            let last = match st.last_scheduled {
                Some(t) => t,
                None => {
                    // A new CronJob on this node: its first run is the next schedule time from now.
                    st.last_scheduled = Some(now);
                    if let Err(e) = st.save(&dir) {
                        warn!(workload = %w.key, error = %e, "cannot persist CronJob state");
                    }
                    now
                }
            };
            let running = w.containers.iter().any(|c| {
                self.units
                    .get(&unit_id(&w.key, &c.name))
                    .is_some_and(|u| u.pid.is_some() || u.starting || (u.done.is_none() && st.active))
            });
            let state = outpost_core::cron::CronState {
                last_scheduled: last,
                running,
            };
            let action = outpost_core::cron::decide(&cron, &state, &tz, now);
            let (scheduled, start, message) = match action {
                outpost_core::cron::CronAction::Wait { next } => {
                    if let Some(t) = next {
                        wake = Some(wake.map_or(t, |x| x.min(t)));
                    }
                    continue;
                }
                outpost_core::cron::CronAction::Start { scheduled } => (scheduled, true, None),
                outpost_core::cron::CronAction::Replace { scheduled } => (
                    scheduled,
                    true,
                    Some((
                        "CronJobReplaced",
                        "the previous run is stopped (concurrencyPolicy: Replace)".to_string(),
                    )),
                ),
                outpost_core::cron::CronAction::Skip { scheduled, reason } => {
                    (scheduled, false, Some(("CronJobSkipped", reason)))
                }
            };
            // Recorded before acting: a crash never runs one schedule time twice.
            st.last_scheduled = Some(scheduled);
            let was_active = st.active;
            if start {
                st.active = true;
            }
            if let Err(e) = st.save(&dir) {
                warn!(workload = %w.key, error = %e, "cannot persist CronJob state; not starting the run");
                st.active = was_active;
                continue;
            }
            let at = jiff::Timestamp::from_millisecond(scheduled)
                .map(|t| t.to_string())
                .unwrap_or_default();
            if let Some((reason, why)) = message {
                info!(workload = %w.key, scheduled = %at, %reason, "{why}");
                self.event(Some(&w.key), reason, &format!("run scheduled at {at}: {why}"));
            }
            if start {
                info!(workload = %w.key, scheduled = %at, "starting a CronJob run");
                self.event(Some(&w.key), "CronJobRun", &format!("run scheduled at {at} started"));
                for c in &w.containers {
                    let id = unit_id(&w.key, &c.name);
                    match self.units.get_mut(&id) {
                        // Replace: stop the running one; it starts again once stopped.
                        Some(u) if u.pid.is_some() => {
                            let pid = u.pid.unwrap_or_default();
                            let kill_at = now + u.grace_ms;
                            self.execute(Action::Terminate { unit: id, pid, kill_at }, now);
                        }
                        Some(_) => {
                            self.units.remove(&id);
                            let _ = self.store.forget_unit(&id);
                        }
                        None => {}
                    }
                }
            }
            wake = Some(wake.map_or(now, |x| x.min(now)));
        }
        wake
    }

    /// A job workload's container ended for good: record the Job's outcome or the CronJob run.
    fn job_finished(&mut self, unit: &str, phase: Phase, now: UnixMs) {
        let Some((w, _)) = self.lookup(unit) else { return };
        let Some(job) = w.job.clone() else { return };
        let (key, hash) = (w.key.clone(), w.hash.clone());
        let dir = self.rt.workload_dir(&key);
        let st = self
            .jobs
            .entry(key.clone())
            .or_insert_with(|| crate::jobs::JobState::load(&dir));
        let succeeded = phase == Phase::Succeeded;
        let (reason, message) = match &job.cron {
            Some(cron) => {
                let scheduled = st.last_scheduled.unwrap_or(now);
                st.record_run(
                    crate::jobs::Run {
                        scheduled,
                        finished: now,
                        succeeded,
                    },
                    cron.successful_history,
                    cron.failed_history,
                );
                let at = jiff::Timestamp::from_millisecond(scheduled)
                    .map(|t| t.to_string())
                    .unwrap_or_default();
                (
                    if succeeded {
                        "CronJobRunSucceeded"
                    } else {
                        "CronJobRunFailed"
                    },
                    format!(
                        "run scheduled at {at} {}",
                        if succeeded { "succeeded" } else { "failed" }
                    ),
                )
            }
            None => {
                st.done = Some((hash, phase));
                (
                    if succeeded { "JobSucceeded" } else { "JobFailed" },
                    format!(
                        "{unit} {}",
                        if succeeded {
                            "completed"
                        } else {
                            "failed (backoffLimit reached)"
                        }
                    ),
                )
            }
        };
        if let Err(e) = st.save(&dir) {
            warn!(workload = %key, error = %e, "cannot persist Job state");
        }
        info!(workload = %key, %reason, "{message}");
        self.event(Some(&key), reason, &message);
    }

    fn on_exit(&mut self, e: Exit, now: UnixMs) {
        let (mut policy, backoff_limit, init) = self
            .lookup(&e.unit)
            .map(|(w, i)| {
                let init = w.containers[i].init;
                let policy = match (init, w.restart_policy) {
                    (true, outpost_api::RestartPolicy::Never) => outpost_api::RestartPolicy::Never,
                    (true, _) => outpost_api::RestartPolicy::OnFailure,
                    (false, p) => p,
                };
                (policy, w.job.as_ref().map(|j| j.backoff_limit), init)
            })
            .unwrap_or_default();
        if let (Some(limit), Some(u)) = (backoff_limit, self.units.get(&e.unit)) {
            // A Job retries a failed pod until backoffLimit, whatever its restartPolicy.
            policy = if u.restarts >= limit {
                outpost_api::RestartPolicy::Never
            } else {
                outpost_api::RestartPolicy::OnFailure
            };
        }
        let Some(u) = self.units.get_mut(&e.unit) else { return };
        if u.pid != Some(e.pid) {
            return;
        }
        if self.probes.get(&e.unit).is_some_and(|p| p.pid == e.pid) {
            self.probes.remove(&e.unit);
        }
        self.containers.remove(&e.unit);
        self.container_ips.remove(&e.unit);
        let intentional = u.stopping.is_some();
        supervise::on_exit(u, e.code, e.signal, policy, now);
        if let (Some(d), false) = (&e.detail, intentional) {
            if e.code.is_none() {
                u.reason = Some(d.clone());
            }
        }
        let (restarts, hash, reason, phase) = (u.restarts, u.hash.clone(), u.reason.clone(), supervise::phase(u));
        let finished = u.done;
        let _ = self.store.set_unit_restarts(&e.unit, &hash, restarts);
        if let Some(p) = finished.filter(|p| !init || *p == Phase::Failed) {
            self.job_finished(&e.unit, p, now);
        }
        if !intentional {
            let workload = e.unit.rsplit_once('/').map(|(w, _)| w.to_string());
            let msg = format!(
                "{} exited ({}); {}",
                e.unit,
                reason.unwrap_or_default(),
                match phase {
                    Phase::Succeeded | Phase::Failed => "not restarted (restartPolicy)".to_string(),
                    _ => format!("restart #{restarts} after backoff"),
                }
            );
            info!(unit = %e.unit, code = ?e.code, signal = ?e.signal, restarts, "process exited");
            self.event(
                workload.as_deref(),
                if phase == Phase::CrashLoopBackOff {
                    "CrashLoopBackOff"
                } else {
                    "Exited"
                },
                &msg,
            );
        }
    }

    /// The update gate of a Pipeline workload: what the data pipeline made of its revision.
    fn pipeline_gate(
        &self,
        p: &outpost_api::pipeline::NodePipeline,
        target: &WorkloadSpec,
    ) -> outpost_api::RolloutStatus {
        let applied = self.applied_rx.as_ref().and_then(|rx| {
            rx.borrow()
                .get(&crate::pipeline::pipeline_id(&p.namespace, &p.name))
                .cloned()
        });
        let (state, reason) = outpost_core::pipeline::gate(target.revision, applied.as_ref());
        outpost_api::RolloutStatus {
            state,
            target_revision: target.revision,
            target_hash: target.hash.clone(),
            good_revision: applied.as_ref().and_then(|a| a.running),
            reason,
            since: applied.map_or(0, |a| a.since),
        }
    }

    fn snapshot(&self) -> Snapshot {
        let mut out = Snapshot::new();
        for (key, target) in &self.desired.workloads {
            let w = self.effective.get(key).unwrap_or(target);
            let containers: Vec<ContainerStatus> = w
                .containers
                .iter()
                .map(|c| {
                    let id = unit_id(&w.key, &c.name);
                    let mut cs = ContainerStatus {
                        name: c.name.clone(),
                        phase: Phase::Pending,
                        pid: None,
                        restarts: 0,
                        last_exit_code: None,
                        reason: None,
                        started_at: None,
                        ready: false,
                        probe_failure: None,
                    };
                    if let Some(u) = self.units.get(&id).filter(|u| u.hash == w.hash) {
                        let probes = self.probes.get(&id).filter(|p| Some(p.pid) == u.pid);
                        cs.phase = supervise::phase(u);
                        if u.pid.is_none() && u.reason.as_deref().is_some_and(|r| r.contains(RUNTIME_UNAVAILABLE)) {
                            cs.phase = Phase::WaitingForRuntime;
                        }
                        cs.pid = u.pid;
                        cs.restarts = u.restarts;
                        cs.last_exit_code = u.last_exit_code;
                        cs.reason = u.reason.clone();
                        cs.started_at = u.started_at.filter(|_| u.pid.is_some());
                        cs.ready = u.pid.is_some() && probes.is_none_or(|p| p.state.ready());
                        cs.probe_failure = probes.and_then(|p| p.state.last_failure.clone());
                    } else if w.runtime == RuntimeKind::Docker && !self.docker_known {
                        cs.phase = Phase::WaitingForRuntime;
                        cs.reason = Some(format!(
                            "{RUNTIME_UNAVAILABLE}: waiting for the Docker Engine at {}{}",
                            self.docker_socket,
                            self.docker_pending
                                .as_ref()
                                .map(|e| format!(" ({e})"))
                                .unwrap_or_default()
                        ));
                    }
                    cs
                })
                .collect();
            // Init containers count while they have not all succeeded; then only the containers.
            let is_init = |c: &ContainerStatus| w.containers.iter().any(|s| s.name == c.name && s.init);
            let main_started = containers.iter().any(|c| !is_init(c) && c.pid.is_some());
            let inits_pending = !main_started && containers.iter().any(|c| is_init(c) && c.phase != Phase::Succeeded);
            let phase = supervise::workload_phase(
                containers
                    .iter()
                    .filter(|c| inits_pending || !is_init(c))
                    .map(|c| c.phase),
            );
            let mut ready =
                containers.iter().any(|c| !is_init(c)) && containers.iter().filter(|c| !is_init(c)).all(|c| c.ready);
            let mut phase = phase;
            let mut rollout = self.rollouts.get(key).map(|st| rollout::status(st, target));
            if self.standby(target) {
                // A standby runs nothing, so it has no gate to report; the fleet rollout judges
                // the revision on the active copy and moves on (docs/site-ha.md). The gate runs
                // here when this box takes over.
                rollout = Some(outpost_api::RolloutStatus {
                    state: outpost_api::RolloutState::Complete,
                    target_revision: target.revision,
                    target_hash: target.hash.clone(),
                    good_revision: None,
                    reason: Some("standby copy: nothing runs on this box until it takes over".into()),
                    since: 0,
                });
            }
            if let Some(run) = &target.agent_update {
                let gate = crate::selfupdate::gate_status(&self.rt.data_dir, run, target.revision, &target.hash);
                ready = gate.state == outpost_api::RolloutState::Complete;
                phase = if ready { Phase::Running } else { Phase::Pending };
                rollout = Some(gate);
            }
            let mut revision = w.revision;
            if let Some(p) = &target.pipeline {
                let gate = self.pipeline_gate(p, target);
                ready = gate.state == outpost_api::RolloutState::Complete;
                phase = if ready { Phase::Running } else { Phase::Pending };
                // after a fallback on the node, its last good revision runs
                revision = gate.good_revision.unwrap_or(revision);
                rollout = Some(gate);
            }
            out.insert(
                w.key.clone(),
                WorkloadStatus {
                    key: w.key.clone(),
                    revision,
                    hash: w.hash.clone(),
                    phase,
                    containers,
                    ready,
                    rollout,
                    site_role: target.failover.as_ref().map(|_| {
                        self.roles
                            .get(key)
                            .cloned()
                            .unwrap_or_else(|| crate::site::STANDBY.to_string())
                    }),
                },
            );
        }
        out
    }

    /// Run until `shutdown` resolves. With `stop_all`, stop every workload before returning
    /// (the demo); otherwise leave them running for the next agent to adopt.
    pub async fn run(
        mut self,
        mut desired_rx: watch::Receiver<Arc<Desired>>,
        mut shutdown: watch::Receiver<bool>,
        stop_all: bool,
    ) {
        self.gate(now_ms());
        self.adopt();
        self.find_containers();
        if self.hold && !self.units.is_empty() {
            warn!(
                processes = self.units.len(),
                "the agent's state is new and holds no desired state, but its processes run: keeping them \
                 until the hub says what should run"
            );
        }
        loop {
            let now = now_ms();
            let mut gate_wake = self.gate(now);
            if let Some(t) = self.jobs_tick(now) {
                gate_wake = Some(gate_wake.map_or(t, |g| g.min(t)));
            }
            let desired = self.desired_units();
            let (mut actions, wake) = supervise::decide(&desired, &self.units, now);
            actions.retain(|a| !self.held(a, &desired));
            let wake = match (wake, gate_wake) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let acted = !actions.is_empty();
            for a in actions {
                self.execute(a, now);
            }
            if acted {
                // Every action changes a unit's state (pid, stopping, gone), so this converges;
                // the gate must see the processes just started.
                continue;
            }
            let snap = self.snapshot();
            self.status_tx.send_if_modified(|s| {
                if *s != snap {
                    *s = snap;
                    true
                } else {
                    false
                }
            });
            let sleep = wake.map_or(Duration::from_secs(3600), |w| {
                Duration::from_millis((w - now_ms()).max(0) as u64)
            });
            tokio::select! {
                r = watch_changed(&mut self.local_rx) => {
                    if r {
                        if let Some(rx) = self.local_rx.as_mut() {
                            self.local = rx.borrow_and_update().clone();
                        }
                        self.merge();
                    } else {
                        self.local_rx = None;
                    }
                }
                r = watch_changed(&mut self.applied_rx) => if !r { self.applied_rx = None },
                r = watch_changed(&mut self.roles_rx) => {
                    match (r, self.roles_rx.as_mut()) {
                        (true, Some(rx)) => self.roles = rx.borrow_and_update().clone(),
                        _ => self.roles_rx = None,
                    }
                }
                r = desired_rx.changed() => {
                    if r.is_err() { break; }
                    self.hub_desired = desired_rx.borrow_and_update().clone();
                    self.merge();
                    if std::mem::take(&mut self.hold) {
                        info!(generation = self.desired.generation, workloads = self.desired.workloads.len(),
                            "first desired state from the hub; adopted units it does not list are stopped");
                    }
                }
                Some(e) = self.exits_rx.recv() => self.on_exit(e, now_ms()),
                Some(e) = self.probe_rx.recv() => self.on_probe(e, now_ms()),
                Some(s) = self.started_rx.recv() => self.on_started(s, now_ms()),
                Some(f) = self.found_rx.recv() => self.on_found(f),
                l = recv_some(&mut self.exec_rx) => match l {
                    Some(l) => {
                        let t = self.exec_target(&l);
                        let _ = l.reply.send(t);
                    }
                    None => self.exec_rx = None,
                },
                _ = tokio::time::sleep(sleep) => {}
                _ = shutdown.changed() => break,
            }
        }
        if stop_all {
            self.stop_everything().await;
        }
    }

    /// Stop every unit: SIGTERM, wait out the grace, SIGKILL.
    async fn stop_everything(&mut self) {
        self.desired = Arc::new(Desired::default());
        self.effective.clear();
        self.probes.clear();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let now = now_ms();
            let (actions, wake) = supervise::decide(&BTreeMap::new(), &self.units, now);
            for a in actions {
                self.execute(a, now);
            }
            if self.units.values().all(|u| u.pid.is_none()) || tokio::time::Instant::now() >= deadline {
                break;
            }
            let sleep = wake.map_or(Duration::from_millis(200), |w| {
                Duration::from_millis((w - now).clamp(10, 200) as u64)
            });
            tokio::select! {
                Some(e) = self.exits_rx.recv() => self.on_exit(e, now_ms()),
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }
}

/// The next message (None: the senders are gone), or never without a receiver.
async fn recv_some<T>(rx: &mut Option<mpsc::UnboundedReceiver<T>>) -> Option<T> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// A change (true), the sender gone (false), or never without a receiver.
async fn watch_changed<T>(rx: &mut Option<watch::Receiver<T>>) -> bool {
    match rx {
        Some(r) => r.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}
