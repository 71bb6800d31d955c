//! The reconcile loop: executes `outpost_core::supervise` decisions against the process runtime.
//!
//! Inputs: the desired state (a `watch` channel fed by the sync task, always already persisted),
//! process exits (from waiter tasks), and timers (backoff, stop grace). Output: a status snapshot
//! (a `watch` channel read by the status reporter) and events in the store's outbox.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use outpost_api::{ContainerStatus, Phase, Runtime as RuntimeKind, UnixMs, WorkloadSpec, WorkloadStatus};
use outpost_core::supervise::{self, Action, DesiredUnit, Unit};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::runtime::{self, Runtime};
use crate::store::{Desired, Store};

pub fn now_ms() -> UnixMs {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A process exit, from a waiter task.
#[derive(Debug)]
struct Exit {
    unit: String,
    pid: u32,
    code: Option<i32>,
    signal: Option<i32>,
}

/// Status of every desired workload, keyed by workload key.
pub type Snapshot = BTreeMap<String, WorkloadStatus>;

pub struct Reconciler {
    rt: Runtime,
    store: Arc<Store>,
    desired: Arc<Desired>,
    units: BTreeMap<String, Unit>,
    /// Start ticks of each running pid, to recognise pid reuse for adopted processes.
    exits_tx: mpsc::UnboundedSender<Exit>,
    exits_rx: mpsc::UnboundedReceiver<Exit>,
    status_tx: watch::Sender<Snapshot>,
}

fn unit_id(key: &str, container: &str) -> String {
    format!("{key}/{container}")
}

const DOCKER_PENDING: &str =
    "WaitingForRuntime: this agent does not run Docker containers yet; set runtimeClassName: process to run it as a native process";

impl Reconciler {
    pub fn new(rt: Runtime, store: Arc<Store>, desired: Arc<Desired>, status_tx: watch::Sender<Snapshot>) -> Self {
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        Self {
            rt,
            store,
            desired,
            units: BTreeMap::new(),
            exits_tx,
            exits_rx,
            status_tx,
        }
    }

    /// Units the desired state asks for.
    fn desired_units(&self) -> BTreeMap<String, DesiredUnit> {
        let mut out = BTreeMap::new();
        for w in self.desired.workloads.values() {
            for c in &w.containers {
                out.insert(
                    unit_id(&w.key, &c.name),
                    DesiredUnit {
                        hash: w.hash.clone(),
                        restart_policy: w.restart_policy,
                        grace_ms: (w.grace_seconds * 1000) as i64,
                        runnable: w.runtime == RuntimeKind::Process,
                    },
                );
            }
        }
        out
    }

    fn lookup(&self, unit: &str) -> Option<(&WorkloadSpec, usize)> {
        self.desired.workloads.values().find_map(|w| {
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
                runtime::signal_group(pid, Signal::SIGTERM);
                if let Some(u) = self.units.get_mut(&unit) {
                    u.stopping = Some((kill_at, false));
                }
            }
            Action::Kill { unit, pid } => {
                warn!(unit = %unit, pid, "grace period over; killing");
                runtime::signal_group(pid, Signal::SIGKILL);
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
        let result = self.rt.spawn(&w, &c, unit);
        let u = self.units.get_mut(unit).expect("inserted above");
        u.next_start_at = None;
        match result {
            Ok(mut child) => {
                let pid = child.id().unwrap_or(0);
                u.pid = Some(pid);
                u.started_at = Some(now);
                info!(unit = %unit, pid, revision = w.revision, "started");
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

    fn on_exit(&mut self, e: Exit, now: UnixMs) {
        let policy = self.lookup(&e.unit).map(|(w, _)| w.restart_policy).unwrap_or_default();
        let Some(u) = self.units.get_mut(&e.unit) else { return };
        if u.pid != Some(e.pid) {
            return;
        }
        let intentional = u.stopping.is_some();
        supervise::on_exit(u, e.code, e.signal, policy, now);
        let (restarts, hash, reason, phase) = (u.restarts, u.hash.clone(), u.reason.clone(), supervise::phase(u));
        let _ = self.store.set_unit_restarts(&e.unit, &hash, restarts);
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

    fn snapshot(&self) -> Snapshot {
        let mut out = Snapshot::new();
        for w in self.desired.workloads.values() {
            let containers: Vec<ContainerStatus> = w
                .containers
                .iter()
                .map(|c| {
                    let id = unit_id(&w.key, &c.name);
                    if w.runtime != RuntimeKind::Process {
                        return ContainerStatus {
                            name: c.name.clone(),
                            phase: Phase::WaitingForRuntime,
                            pid: None,
                            restarts: 0,
                            last_exit_code: None,
                            reason: Some(DOCKER_PENDING.into()),
                            started_at: None,
                        };
                    }
                    match self.units.get(&id).filter(|u| u.hash == w.hash) {
                        Some(u) => ContainerStatus {
                            name: c.name.clone(),
                            phase: supervise::phase(u),
                            pid: u.pid,
                            restarts: u.restarts,
                            last_exit_code: u.last_exit_code,
                            reason: u.reason.clone(),
                            started_at: u.started_at.filter(|_| u.pid.is_some()),
                        },
                        None => ContainerStatus {
                            name: c.name.clone(),
                            phase: Phase::Pending,
                            pid: None,
                            restarts: 0,
                            last_exit_code: None,
                            reason: None,
                            started_at: None,
                        },
                    }
                })
                .collect();
            let phase = supervise::workload_phase(containers.iter().map(|c| c.phase));
            out.insert(
                w.key.clone(),
                WorkloadStatus {
                    key: w.key.clone(),
                    revision: w.revision,
                    hash: w.hash.clone(),
                    phase,
                    containers,
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
        self.adopt();
        loop {
            let now = now_ms();
            let desired = self.desired_units();
            let (actions, wake) = supervise::decide(&desired, &self.units, now);
            for a in actions {
                self.execute(a, now);
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
                r = desired_rx.changed() => {
                    if r.is_err() { break; }
                    self.desired = desired_rx.borrow_and_update().clone();
                }
                Some(e) = self.exits_rx.recv() => self.on_exit(e, now_ms()),
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
