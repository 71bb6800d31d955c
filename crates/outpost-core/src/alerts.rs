//! Alert decisions, as pure functions: which policy a node runs ([`effective_policy`]), when a
//! node's vital signs fire or resolve an alert ([`evaluate`], run on the node so alerts work
//! offline), and which alerts the hub raises itself or accepts from nodes ([`fleet_alerts`],
//! [`diff_hub_alerts`], [`on_node_event`]).
//!
//! Owns: thresholds with their `for` durations, alert identities (name + subject), severities,
//! de-duplication. Must never: read the clock (`now` is an argument), touch files or sockets,
//! or send anything; callers persist the returned state and deliver the transitions.
//!
//! Node alert lifecycle (per alert id, one evaluation per sample):
//! ```text
//!            value > above                 breached for >= for_secs
//!   (ok) -----------------> pending(since) --------------------------> firing  --> event AlertFiring(at = now)
//!     ^   value <= above         |                                        |
//!     +--------------------------+         value <= above, or disabled    v
//!     +--------------------------------------------------------------- resolved --> event AlertResolved(at = now)
//! ```

use std::collections::{BTreeMap, BTreeSet};

use outpost_api::{AlertPolicySpec, Labels, NodePolicy, Threshold, ThresholdSpec, UnixMs};
use serde::{Deserialize, Serialize};

use crate::schedule::selector_matches;

pub const NODE_CPU_HIGH: &str = "NodeCpuHigh";
pub const NODE_MEMORY_HIGH: &str = "NodeMemoryHigh";
pub const NODE_DISK_FULL: &str = "NodeDiskFull";
pub const DATA_DISK_FULL: &str = "DataDiskFull";
pub const NODE_TEMPERATURE_HIGH: &str = "NodeTemperatureHigh";
pub const WORKLOAD_CRASH_LOOP: &str = "WorkloadCrashLoop";
pub const NODE_OFFLINE: &str = "NodeOffline";
pub const WORKLOAD_ROLLED_BACK: &str = "WorkloadRolledBack";
/// Raised by the hub while a node reports that it cannot write its state (not for lack of
/// space: that is `NodeDiskFull` with subject [`AGENT_DATA`]).
pub const NODE_STORE_FAILING: &str = "NodeStoreFailing";
/// Subject of the alerts raised from node conditions about the agent's data dir.
pub const AGENT_DATA: &str = "agent-data";
pub const NODE_CERTIFICATE_EXPIRING: &str = "NodeCertificateExpiring";
/// A model's p99 latency over a sampling interval is above the policy's `inferenceLatency`
/// (ms); subject: the serving workload.
pub const INFERENCE_LATENCY_HIGH: &str = "InferenceLatencyHigh";
/// The percent of a model's requests that failed over a sampling interval is above the
/// policy's `inferenceErrors`; subject: the serving workload.
pub const INFERENCE_ERRORS_HIGH: &str = "InferenceErrorsHigh";

/// A crash-loop alert resolves only after the workload has been out of CrashLoopBackOff this
/// long: between two crashes a looping workload is briefly Running, which must not resolve it.
pub const CRASH_LOOP_CLEAR_MS: i64 = 30_000;

/// `critical` or `warning`, by alert name.
pub fn severity(name: &str) -> &'static str {
    match name {
        NODE_OFFLINE | WORKLOAD_CRASH_LOOP | NODE_DISK_FULL | DATA_DISK_FULL | NODE_STORE_FAILING | "RolloutFailed" => {
            "critical"
        }
        _ => "warning",
    }
}

// ---------------------------------------------------------------------------------------------
// Policy

fn overlay(cur: &mut Option<Threshold>, spec: &Option<ThresholdSpec>) {
    let Some(spec) = spec else { return };
    if spec.disabled {
        *cur = None;
        return;
    }
    let for_secs = spec
        .for_
        .as_deref()
        .and_then(|f| outpost_api::parse_duration_secs(f).ok());
    let base = cur.unwrap_or(Threshold {
        above: 90.0,
        for_secs: 0,
    });
    *cur = Some(Threshold {
        above: spec.above.unwrap_or(base.above),
        for_secs: for_secs.unwrap_or(base.for_secs),
    });
}

/// outpost's defaults overlaid with every policy whose selector matches `labels`: the least
/// specific first (fewest selector labels, then by name), so a more specific policy wins for the
/// fields it sets. `policies` are `(name, spec)`.
pub fn effective_policy(policies: &[(String, AlertPolicySpec)], labels: &Labels) -> NodePolicy {
    let mut matching: Vec<&(String, AlertPolicySpec)> = policies
        .iter()
        .filter(|(_, p)| selector_matches(&p.node_selector, labels))
        .collect();
    matching.sort_by(|a, b| (a.1.node_selector.len(), &a.0).cmp(&(b.1.node_selector.len(), &b.0)));
    let mut out = NodePolicy::default();
    for (name, p) in matching {
        overlay(&mut out.cpu, &p.cpu);
        overlay(&mut out.memory, &p.memory);
        overlay(&mut out.disk, &p.disk);
        overlay(&mut out.temperature, &p.temperature);
        overlay(&mut out.inference_latency, &p.inference_latency);
        overlay(&mut out.inference_errors, &p.inference_errors);
        if let Some(c) = p.crash_loop {
            out.crash_loop = c;
        }
        if let Some(l) = &p.logs {
            if let Some(pats) = &l.error_patterns {
                out.error_patterns = pats.clone();
            }
            if let Some(a) = l
                .max_age
                .as_deref()
                .and_then(|a| outpost_api::parse_duration_secs(a).ok())
            {
                out.log_max_age_secs = a;
            }
        }
        out.sources.push(name.clone());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Node-side threshold evaluation

/// One sample of a node's vital signs, as the evaluator needs it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    /// Percent of all cores.
    pub cpu: f64,
    pub mem: f64,
    pub disk_root: f64,
    /// None when the data dir shares the root file system.
    pub disk_data: Option<f64>,
    pub temp_c: Option<f64>,
    /// Workload keys in CrashLoopBackOff.
    pub crash_looping: BTreeSet<String>,
    /// Each serving workload's model over the last interval.
    pub models: Vec<ModelSample>,
}

/// A model's last sampling interval, as the evaluator needs it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelSample {
    /// The serving workload's key (the alert's subject).
    pub key: String,
    /// `name:version`, for the summary.
    pub model: String,
    /// None: no request in the interval (nothing breached).
    pub p99_ms: Option<f64>,
    pub error_pct: Option<f64>,
}

/// The evaluator's memory, persisted by the agent with the events it produced (one
/// transaction), so a restart neither repeats nor loses a transition.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeAlerts {
    /// alert id -> when the current breach started.
    pub pending: BTreeMap<String, UnixMs>,
    /// alert id -> when it fired.
    pub firing: BTreeMap<String, UnixMs>,
}

/// An alert firing or resolving.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    /// `name` or `name/subject`.
    pub id: String,
    pub name: String,
    pub subject: Option<String>,
    pub firing: bool,
    pub at: UnixMs,
    pub summary: String,
}

pub fn alert_id(name: &str, subject: Option<&str>) -> String {
    match subject {
        Some(s) => format!("{name}/{s}"),
        None => name.to_string(),
    }
}

fn fmt_for(secs: u64) -> String {
    match secs {
        0 => String::new(),
        s if s % 3600 == 0 => format!(" for {}h", s / 3600),
        s if s % 60 == 0 => format!(" for {}m", s / 60),
        s => format!(" for {s}s"),
    }
}

/// (alert name, what, value, threshold, unit)
type Check<'a> = (&'a str, &'a str, Option<f64>, Option<Threshold>, &'a str);

/// (alert name, what, threshold, unit, the value of a model sample)
type ModelRule<'a> = (
    &'a str,
    &'a str,
    Option<Threshold>,
    &'a str,
    fn(&ModelSample) -> Option<f64>,
);

/// Evaluate one sample. Returns the transitions in a stable order; `st` is updated.
pub fn evaluate(policy: &NodePolicy, st: &mut NodeAlerts, s: &Sample, now: UnixMs) -> Vec<Transition> {
    let mut out = Vec::new();
    let checks: [Check; 5] = [
        (NODE_CPU_HIGH, "CPU", Some(s.cpu), policy.cpu, "%"),
        (NODE_MEMORY_HIGH, "memory", Some(s.mem), policy.memory, "%"),
        (NODE_DISK_FULL, "disk / ", Some(s.disk_root), policy.disk, "%"),
        (DATA_DISK_FULL, "data disk", s.disk_data, policy.disk, "%"),
        (NODE_TEMPERATURE_HIGH, "temperature", s.temp_c, policy.temperature, "°C"),
    ];
    for (name, what, value, threshold, unit) in checks {
        let id = name.to_string();
        let breach = match (value, threshold) {
            (Some(v), Some(t)) if v > t.above => Some((v, t)),
            _ => None,
        };
        match breach {
            Some((v, t)) => {
                let since = *st.pending.entry(id.clone()).or_insert(now);
                if !st.firing.contains_key(&id) && now - since >= (t.for_secs as i64) * 1000 {
                    st.firing.insert(id.clone(), now);
                    out.push(Transition {
                        id,
                        name: name.into(),
                        subject: None,
                        firing: true,
                        at: now,
                        summary: format!(
                            "{} {v:.1}{unit} > {}{unit}{}",
                            what.trim(),
                            t.above,
                            fmt_for(t.for_secs)
                        ),
                    });
                }
            }
            None => {
                st.pending.remove(&id);
                if st.firing.remove(&id).is_some() {
                    let summary = match (value, threshold) {
                        (Some(v), Some(t)) => format!("{} back to {v:.1}{unit} (<= {}{unit})", what.trim(), t.above),
                        (None, _) => format!("{} no longer measured", what.trim()),
                        (_, None) => format!("{} alert disabled by policy", what.trim()),
                    };
                    out.push(Transition {
                        id,
                        name: name.into(),
                        subject: None,
                        firing: false,
                        at: now,
                        summary,
                    });
                }
            }
        }
    }
    // Models: one alert per serving workload and rule, with the thresholds' `for`; resolved
    // when the value is back under, the interval saw no request, or the workload is gone.
    let model_rules: [ModelRule; 2] = [
        (
            INFERENCE_LATENCY_HIGH,
            "p99 latency",
            policy.inference_latency,
            " ms",
            |m| m.p99_ms,
        ),
        (
            INFERENCE_ERRORS_HIGH,
            "failed requests",
            policy.inference_errors,
            " %",
            |m| m.error_pct,
        ),
    ];
    for (name, what, threshold, unit, get) in model_rules {
        let prefix = format!("{name}/");
        for m in &s.models {
            let id = alert_id(name, Some(&m.key));
            let value = get(m);
            match (value, threshold) {
                (Some(v), Some(t)) if v > t.above => {
                    let since = *st.pending.entry(id.clone()).or_insert(now);
                    if !st.firing.contains_key(&id) && now - since >= (t.for_secs as i64) * 1000 {
                        st.firing.insert(id.clone(), now);
                        out.push(Transition {
                            id,
                            name: name.into(),
                            subject: Some(m.key.clone()),
                            firing: true,
                            at: now,
                            summary: format!(
                                "model {} {what} {v:.1}{unit} > {}{unit}{}",
                                m.model,
                                t.above,
                                fmt_for(t.for_secs)
                            ),
                        });
                    }
                }
                _ => {
                    st.pending.remove(&id);
                    if st.firing.remove(&id).is_some() {
                        let summary = match (value, threshold) {
                            (Some(v), Some(t)) => {
                                format!("model {} {what} back to {v:.1}{unit} (<= {}{unit})", m.model, t.above)
                            }
                            (None, _) => format!("model {} answered no request in the last interval", m.model),
                            (_, None) => format!("model {} {what} alert disabled by policy", m.model),
                        };
                        out.push(Transition {
                            id,
                            name: name.into(),
                            subject: Some(m.key.clone()),
                            firing: false,
                            at: now,
                            summary,
                        });
                    }
                }
            }
        }
        let gone: Vec<String> = st
            .firing
            .keys()
            .chain(st.pending.keys())
            .filter_map(|id| id.strip_prefix(&prefix))
            .filter(|key| !s.models.iter().any(|m| m.key == *key))
            .map(String::from)
            .collect();
        for key in gone {
            let id = alert_id(name, Some(&key));
            st.pending.remove(&id);
            if st.firing.remove(&id).is_some() {
                out.push(Transition {
                    id,
                    name: name.into(),
                    subject: Some(key.clone()),
                    firing: false,
                    at: now,
                    summary: format!("{key} no longer serves a model"),
                });
            }
        }
    }
    // Crash loops: one alert per workload, fired at once (the supervisor already waited for
    // several consecutive failures), resolved once out of CrashLoopBackOff for
    // CRASH_LOOP_CLEAR_MS (`pending` holds when it was last seen looping, as `clear:<id>`).
    let prefix = format!("{WORKLOAD_CRASH_LOOP}/");
    let looping: BTreeSet<String> = if policy.crash_loop {
        s.crash_looping.clone()
    } else {
        BTreeSet::new()
    };
    for key in &looping {
        let id = alert_id(WORKLOAD_CRASH_LOOP, Some(key));
        st.pending.insert(format!("clear:{id}"), now);
        if !st.firing.contains_key(&id) {
            st.firing.insert(id.clone(), now);
            out.push(Transition {
                id,
                name: WORKLOAD_CRASH_LOOP.into(),
                subject: Some(key.clone()),
                firing: true,
                at: now,
                summary: format!("{key} is in CrashLoopBackOff"),
            });
        }
    }
    let gone: Vec<String> = st
        .firing
        .keys()
        .filter_map(|id| id.strip_prefix(&prefix))
        .filter(|key| !looping.contains(*key))
        .filter(|key| {
            let last = st.pending.get(&format!("clear:{prefix}{key}")).copied().unwrap_or(0);
            !policy.crash_loop || now - last >= CRASH_LOOP_CLEAR_MS
        })
        .map(String::from)
        .collect();
    for key in gone {
        let id = alert_id(WORKLOAD_CRASH_LOOP, Some(&key));
        st.firing.remove(&id);
        st.pending.remove(&format!("clear:{id}"));
        out.push(Transition {
            id,
            name: WORKLOAD_CRASH_LOOP.into(),
            subject: Some(key.clone()),
            firing: false,
            at: now,
            summary: format!("{key} no longer crash-looping"),
        });
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Vitals reporting

/// Should a status report carry this vitals summary? Yes for the first, when `max_silence_ms`
/// passed since the last one, or when something moved enough to matter: CPU or memory by 5
/// points, a disk by 1, the workload set, a restart, a workload's CPU by 10 points or memory by
/// 20 %, dropped log lines, the temperature by 2 degrees, a model that answered requests.
/// Keeps an idle node's uplink small.
pub fn vitals_worth_sending(
    last: Option<&outpost_api::Vitals>,
    cur: &outpost_api::Vitals,
    max_silence_ms: i64,
) -> bool {
    let Some(l) = last else { return true };
    if cur.at - l.at >= max_silence_ms {
        return true;
    }
    let moved = |a: f32, b: f32, by: f32| (a - b).abs() >= by;
    let opt = |a: Option<f32>, b: Option<f32>, by: f32| match (a, b) {
        (Some(a), Some(b)) => moved(a, b, by),
        (a, b) => a.is_some() != b.is_some(),
    };
    if moved(cur.cpu, l.cpu, 5.0)
        || moved(cur.mem, l.mem, 5.0)
        || moved(cur.disk_root, l.disk_root, 1.0)
        || opt(cur.disk_data, l.disk_data, 1.0)
        || opt(cur.temp_c, l.temp_c, 2.0)
        || cur.log_dropped_lines != l.log_dropped_lines
        || cur.workloads.len() != l.workloads.len()
        || cur.models.len() != l.models.len()
        || cur
            .models
            .iter()
            .zip(&l.models)
            .any(|(c, p)| c.key != p.key || c.counters.requests != p.counters.requests)
    {
        return true;
    }
    cur.workloads.iter().zip(&l.workloads).any(|(c, p)| {
        c.key != p.key
            || c.restarts != p.restarts
            || moved(c.cpu, p.cpu, 10.0)
            || (c.rss_bytes as f64 - p.rss_bytes as f64).abs() > 0.2 * p.rss_bytes.max(1) as f64
    })
}

// ---------------------------------------------------------------------------------------------
// Hub-side fleet rules

/// Identity of a fleet alert: one per (node, name, subject).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AlertKey {
    pub node: String,
    pub name: String,
    /// Empty for node-wide alerts.
    pub subject: String,
}

/// A hub-derived alert that should be firing now.
#[derive(Clone, Debug, PartialEq)]
pub struct HubAlert {
    pub started_at: UnixMs,
    pub summary: String,
}

/// What the hub knows about a node for its rules.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetNode {
    pub name: String,
    pub last_contact: UnixMs,
    /// When the node's current certificate expires.
    pub cert_not_after: UnixMs,
}

/// A workload that a node rolled back to its last-known-good (status `RolledBack`/`Failed`).
#[derive(Clone, Debug, PartialEq)]
pub struct RolledBack {
    pub node: String,
    pub workload: String,
    pub since: UnixMs,
    pub reason: String,
}

/// The alerts the hub raises itself: `NodeOffline` once a node has been silent for longer than
/// `offline_alert_ms` (it started at last contact + that grace), `WorkloadRolledBack` while a
/// node runs an older revision because the new one failed its health gate there,
/// `NodeCertificateExpiring` while less than `cert_warning_ms` is left of a node's certificate
/// (or it has expired: the node renews it when it is back, see `crate::link`).
/// Silence counts only from `listening_since` (the hub's start): while the hub itself was down,
/// nodes could not reach it, so a hub outage never makes the whole fleet "offline".
pub fn fleet_alerts(
    nodes: &[FleetNode],
    rollbacks: &[RolledBack],
    offline_alert_ms: i64,
    cert_warning_ms: i64,
    listening_since: UnixMs,
    now: UnixMs,
) -> BTreeMap<AlertKey, HubAlert> {
    let mut out = BTreeMap::new();
    for n in nodes {
        let left = n.cert_not_after.saturating_sub(now);
        if left < cert_warning_ms {
            let summary = if left < 0 {
                format!(
                    "the certificate of {} expired {}s ago; it renews when the node is back online",
                    n.name,
                    -left / 1000
                )
            } else {
                format!(
                    "the certificate of {} expires in {}s and has not been renewed; check the node's link and log",
                    n.name,
                    left / 1000
                )
            };
            out.insert(
                AlertKey {
                    node: n.name.clone(),
                    name: NODE_CERTIFICATE_EXPIRING.into(),
                    subject: String::new(),
                },
                HubAlert {
                    started_at: n.cert_not_after.saturating_sub(cert_warning_ms).min(now),
                    summary,
                },
            );
        }
        let last = n.last_contact.max(listening_since);
        let silent = now.saturating_sub(last);
        if silent > offline_alert_ms {
            out.insert(
                AlertKey {
                    node: n.name.clone(),
                    name: NODE_OFFLINE.into(),
                    subject: String::new(),
                },
                HubAlert {
                    started_at: last + offline_alert_ms,
                    summary: format!("no contact from {} for {}s", n.name, silent / 1000),
                },
            );
        }
    }
    for r in rollbacks {
        out.insert(
            AlertKey {
                node: r.node.clone(),
                name: WORKLOAD_ROLLED_BACK.into(),
                subject: r.workload.clone(),
            },
            HubAlert {
                started_at: r.since,
                summary: format!("{} rolled back on {}: {}", r.workload, r.node, r.reason),
            },
        );
    }
    out
}

/// What to do with one hub-derived alert.
#[derive(Clone, Debug, PartialEq)]
pub enum HubTransition {
    Fire { key: AlertKey, alert: HubAlert },
    Resolve { key: AlertKey, at: UnixMs },
}

/// Compare the hub-derived alerts firing now (`firing`, from the store) with what should fire
/// (`want`): fire the new, resolve the gone. Already-firing alerts are left alone, so a
/// notification goes out once per firing and once per resolution.
pub fn diff_hub_alerts(
    firing: &BTreeSet<AlertKey>,
    want: &BTreeMap<AlertKey, HubAlert>,
    now: UnixMs,
) -> Vec<HubTransition> {
    let mut out: Vec<HubTransition> = want
        .iter()
        .filter(|(k, _)| !firing.contains(*k))
        .map(|(k, a)| HubTransition::Fire {
            key: k.clone(),
            alert: a.clone(),
        })
        .collect();
    out.extend(
        firing
            .iter()
            .filter(|k| !want.contains_key(*k))
            .map(|k| HubTransition::Resolve {
                key: k.clone(),
                at: now,
            }),
    );
    out
}

/// What the hub does with an alert event a node reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeEventAction {
    /// Record it as firing (new, or firing again after a resolution) and notify.
    Fire,
    /// Mark it resolved and notify.
    Resolve,
    /// A duplicate (already in that state, or an event sequence already processed).
    Ignore,
}

/// De-duplicate node alert events: `seq` against the highest sequence already processed for
/// the node, and the event against the alert's current state (`Some(true)`: firing).
pub fn on_node_event(firing_event: bool, seq: u64, processed_up_to: u64, current: Option<bool>) -> NodeEventAction {
    if seq <= processed_up_to {
        return NodeEventAction::Ignore;
    }
    match (firing_event, current) {
        (true, Some(true)) => NodeEventAction::Ignore,
        (true, _) => NodeEventAction::Fire,
        (false, Some(true)) => NodeEventAction::Resolve,
        (false, _) => NodeEventAction::Ignore,
    }
}

/// The hub's alerts for the conditions nodes report (`NodeCondition`, kept as each node last
/// sent them): `DiskFull` raises `NodeDiskFull`, any other kind `NodeStoreFailing`, both with
/// subject [`AGENT_DATA`] (the node's own disk threshold alert has none), the condition's
/// message as summary and its start as the alert's. An alert resolves when its node no longer
/// reports the condition.
pub fn condition_alerts(
    conditions: &BTreeMap<String, Vec<outpost_api::NodeCondition>>,
) -> BTreeMap<AlertKey, HubAlert> {
    let mut out = BTreeMap::new();
    for (node, list) in conditions {
        for c in list {
            let name = if c.kind == "DiskFull" {
                NODE_DISK_FULL
            } else {
                NODE_STORE_FAILING
            };
            out.entry(AlertKey {
                node: node.clone(),
                name: name.into(),
                subject: AGENT_DATA.into(),
            })
            .or_insert_with(|| HubAlert {
                started_at: c.since,
                summary: format!("{node}: {}", c.message),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> NodePolicy {
        NodePolicy {
            cpu: Some(Threshold {
                above: 90.0,
                for_secs: 300,
            }),
            memory: Some(Threshold {
                above: 90.0,
                for_secs: 0,
            }),
            temperature: Some(Threshold {
                above: 80.0,
                for_secs: 60,
            }),
            ..NodePolicy::default()
        }
    }

    fn sample(cpu: f64, mem: f64) -> Sample {
        Sample {
            cpu,
            mem,
            disk_root: 50.0,
            ..Default::default()
        }
    }

    /// Feed samples in order; each step: (sample, now in seconds, expected transitions as
    /// "+id" / "-id").
    fn check(policy: &NodePolicy, steps: &[(Sample, i64, &[&str])]) {
        let mut st = NodeAlerts::default();
        for (i, (s, t, want)) in steps.iter().enumerate() {
            let got: Vec<String> = evaluate(policy, &mut st, s, t * 1000)
                .iter()
                .map(|tr| {
                    assert_eq!(tr.at, t * 1000, "transitions carry the sample time");
                    format!("{}{}", if tr.firing { "+" } else { "-" }, tr.id)
                })
                .collect();
            assert_eq!(got, *want, "step {i} at {t}s");
        }
    }

    #[test]
    fn cpu_fires_only_after_its_duration_and_resolves_below() {
        check(
            &policy(),
            &[
                (sample(95.0, 10.0), 0, &[]),
                (sample(95.0, 10.0), 299, &[]),
                (sample(95.0, 10.0), 300, &["+NodeCpuHigh"]),
                (sample(99.0, 10.0), 360, &[]),
                (sample(90.0, 10.0), 420, &["-NodeCpuHigh"]),
                (sample(91.0, 10.0), 480, &[]),
            ],
        );
    }

    #[test]
    fn a_dip_restarts_the_cpu_timer() {
        check(
            &policy(),
            &[
                (sample(95.0, 10.0), 0, &[]),
                (sample(50.0, 10.0), 200, &[]),
                (sample(95.0, 10.0), 250, &[]),
                (sample(95.0, 10.0), 500, &[]),
                (sample(95.0, 10.0), 550, &["+NodeCpuHigh"]),
            ],
        );
    }

    #[test]
    fn memory_fires_at_once_and_disk_and_temperature_have_their_own_ids() {
        let mut hot = sample(10.0, 95.0);
        hot.disk_root = 95.0;
        hot.disk_data = Some(97.0);
        hot.temp_c = Some(85.0);
        let mut cool = sample(10.0, 10.0);
        cool.temp_c = Some(40.0);
        check(
            &policy(),
            &[
                (hot.clone(), 0, &["+NodeMemoryHigh", "+NodeDiskFull", "+DataDiskFull"]),
                (hot, 60, &["+NodeTemperatureHigh"]),
                (
                    cool,
                    120,
                    &[
                        "-NodeMemoryHigh",
                        "-NodeDiskFull",
                        "-DataDiskFull",
                        "-NodeTemperatureHigh",
                    ],
                ),
            ],
        );
    }

    #[test]
    fn disabling_a_threshold_resolves_what_it_fired() {
        let mut st = NodeAlerts::default();
        assert_eq!(evaluate(&policy(), &mut st, &sample(10.0, 95.0), 0).len(), 1);
        let mut off = policy();
        off.memory = None;
        let t = evaluate(&off, &mut st, &sample(10.0, 95.0), 1000);
        assert_eq!(
            (t.len(), t[0].firing, t[0].summary.as_str()),
            (1, false, "memory alert disabled by policy")
        );
        assert!(st.firing.is_empty());
    }

    #[test]
    fn inference_latency_and_errors_fire_per_model_and_resolve() {
        // defaults: p99 > 50 ms for 1 min; errors > 5 % at once (set here)
        let p = NodePolicy {
            inference_errors: Some(Threshold {
                above: 5.0,
                for_secs: 0,
            }),
            ..NodePolicy::default()
        };
        let m = |key: &str, p99: Option<f64>, err: Option<f64>| ModelSample {
            key: key.into(),
            model: "digits:v2".into(),
            p99_ms: p99,
            error_pct: err,
        };
        let with = |models: Vec<ModelSample>| Sample {
            models,
            ..sample(1.0, 1.0)
        };
        let a = "deployment/default/digits";
        let b = "daemonset/default/faces";
        check(
            &p,
            &[
                (with(vec![m(a, Some(0.2), Some(0.0))]), 0, &[]),
                (with(vec![m(a, Some(70.0), Some(0.0))]), 10, &[]),
                (
                    with(vec![m(a, Some(80.0), Some(0.0)), m(b, Some(1.0), Some(50.0))]),
                    40,
                    &["+InferenceErrorsHigh/daemonset/default/faces"],
                ),
                (
                    with(vec![m(a, Some(60.0), None), m(b, None, None)]),
                    70,
                    &[
                        "+InferenceLatencyHigh/deployment/default/digits",
                        "-InferenceErrorsHigh/daemonset/default/faces",
                    ],
                ),
                // exactly at the threshold is not above it
                (
                    with(vec![m(a, Some(50.0), None)]),
                    80,
                    &["-InferenceLatencyHigh/deployment/default/digits"],
                ),
                // a dip restarts the timer
                (with(vec![m(a, Some(51.0), None)]), 90, &[]),
                (with(vec![m(a, Some(1.0), None)]), 100, &[]),
                (with(vec![m(a, Some(51.0), None)]), 110, &[]),
                (with(vec![m(a, Some(51.0), None)]), 169, &[]),
                (
                    with(vec![m(a, Some(51.0), None)]),
                    170,
                    &["+InferenceLatencyHigh/deployment/default/digits"],
                ),
                // the workload is gone: resolved
                (with(vec![]), 180, &["-InferenceLatencyHigh/deployment/default/digits"]),
            ],
        );
        // disabled by policy: nothing fires
        let mut off = p.clone();
        off.inference_latency = None;
        check(
            &off,
            &[
                (with(vec![m(a, Some(900.0), None)]), 0, &[]),
                (with(vec![m(a, Some(900.0), None)]), 600, &[]),
            ],
        );
    }

    #[test]
    fn an_alert_policy_sets_the_inference_rules() {
        let spec: AlertPolicySpec = serde_json::from_value(serde_json::json!({
            "inferenceLatency": {"above": 20, "for": "30s"},
            "inferenceErrors": {"above": 1},
        }))
        .unwrap();
        let p = effective_policy(&[("models".into(), spec)], &Labels::new());
        assert_eq!(
            p.inference_latency,
            Some(Threshold {
                above: 20.0,
                for_secs: 30
            })
        );
        assert_eq!(
            p.inference_errors,
            Some(Threshold {
                above: 1.0,
                for_secs: 0
            })
        );
        let off: AlertPolicySpec =
            serde_json::from_value(serde_json::json!({"inferenceLatency": {"disabled": true}})).unwrap();
        assert_eq!(
            effective_policy(&[("x".into(), off)], &Labels::new()).inference_latency,
            None
        );
    }

    #[test]
    fn crash_loops_fire_per_workload_and_resolve() {
        let looping = |keys: &[&str]| Sample {
            crash_looping: keys.iter().map(|k| k.to_string()).collect(),
            ..sample(1.0, 1.0)
        };
        check(
            &policy(),
            &[
                (
                    looping(&["daemonset/default/a"]),
                    0,
                    &["+WorkloadCrashLoop/daemonset/default/a"],
                ),
                (
                    looping(&["daemonset/default/a", "deployment/x/b"]),
                    10,
                    &["+WorkloadCrashLoop/deployment/x/b"],
                ),
                // briefly Running between crashes: still firing
                (looping(&["deployment/x/b"]), 20, &[]),
                (looping(&["deployment/x/b"]), 39, &[]),
                (
                    looping(&["deployment/x/b"]),
                    40,
                    &["-WorkloadCrashLoop/daemonset/default/a"],
                ),
                (looping(&[]), 50, &[]),
                (looping(&["deployment/x/b"]), 60, &[]),
                (looping(&[]), 89, &[]),
                (looping(&[]), 90, &["-WorkloadCrashLoop/deployment/x/b"]),
            ],
        );
        let mut off = policy();
        off.crash_loop = false;
        check(&off, &[(looping(&["daemonset/default/a"]), 0, &[])]);
    }

    #[test]
    fn state_survives_a_restart_without_repeating_a_firing() {
        let mut st = NodeAlerts::default();
        evaluate(&policy(), &mut st, &sample(10.0, 95.0), 0);
        let saved = serde_json::to_string(&st).unwrap();
        let mut back: NodeAlerts = serde_json::from_str(&saved).unwrap();
        assert!(evaluate(&policy(), &mut back, &sample(10.0, 95.0), 5000).is_empty());
    }

    #[test]
    fn policies_overlay_least_specific_first() {
        let spec = |sel: &[(&str, &str)], cpu: Option<(f64, &str)>, crash: Option<bool>| AlertPolicySpec {
            node_selector: sel.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            cpu: cpu.map(|(a, f)| ThresholdSpec {
                above: Some(a),
                for_: Some(f.into()),
                disabled: false,
            }),
            crash_loop: crash,
            ..Default::default()
        };
        let policies = vec![
            ("z-site".to_string(), spec(&[("site", "s1")], Some((70.0, "1m")), None)),
            ("a-all".to_string(), spec(&[], Some((80.0, "5m")), Some(false))),
            ("other".to_string(), spec(&[("site", "s2")], Some((10.0, "1s")), None)),
        ];
        let labels: Labels = [("site".to_string(), "s1".to_string())].into();
        let p = effective_policy(&policies, &labels);
        assert_eq!(
            p.cpu,
            Some(Threshold {
                above: 70.0,
                for_secs: 60
            })
        );
        assert!(!p.crash_loop);
        assert_eq!(p.sources, ["a-all", "z-site"]);
        assert_eq!(p.memory, NodePolicy::default().memory);
        // no policy: the defaults, and the hash is stable
        let d = effective_policy(&[], &labels);
        assert_eq!(d, NodePolicy::default());
        assert_eq!(d.hash(), NodePolicy::default().hash());
        // disabled
        let off = vec![(
            "off".to_string(),
            AlertPolicySpec {
                disk: Some(ThresholdSpec {
                    disabled: true,
                    ..Default::default()
                }),
                ..Default::default()
            },
        )];
        assert_eq!(effective_policy(&off, &labels).disk, None);
    }

    #[test]
    fn fleet_rules_and_their_diff() {
        let nodes = vec![
            FleetNode {
                name: "a".into(),
                last_contact: 0,
                cert_not_after: i64::MAX,
            },
            FleetNode {
                name: "b".into(),
                last_contact: 290_000,
                cert_not_after: i64::MAX,
            },
        ];
        let rb = vec![RolledBack {
            node: "b".into(),
            workload: "deployment/default/web".into(),
            since: 100,
            reason: "exit 1".into(),
        }];
        let want = fleet_alerts(&nodes, &rb, 300_000, 1000, 0, 300_000);
        assert_eq!(want.len(), 1, "a is silent for exactly the grace: not yet");
        // the hub itself was down until 200_000: a's silence counts from then
        let want = fleet_alerts(&nodes, &rb, 300_000, 1000, 200_000, 300_001);
        assert!(
            want.keys().all(|k| k.name != NODE_OFFLINE),
            "no NodeOffline right after a hub outage"
        );
        let want = fleet_alerts(&nodes, &rb, 300_000, 1000, 200_000, 500_001);
        assert_eq!(
            want.keys().find(|k| k.name == NODE_OFFLINE).map(|k| want[k].started_at),
            Some(500_000)
        );
        let want = fleet_alerts(&nodes, &rb, 300_000, 1000, 0, 300_001);
        let names: Vec<_> = want.keys().map(|k| format!("{}:{}", k.node, k.name)).collect();
        assert_eq!(names, ["a:NodeOffline", "b:WorkloadRolledBack"]);
        let offline = want.keys().next().unwrap().clone();
        assert_eq!(want[&offline].started_at, 300_000);

        let firing: BTreeSet<AlertKey> = [offline.clone()].into();
        let t = diff_hub_alerts(&firing, &want, 5);
        assert_eq!(t.len(), 1, "only the new one fires: {t:?}");
        assert!(matches!(&t[0], HubTransition::Fire { key, .. } if key.name == WORKLOAD_ROLLED_BACK));
        let t = diff_hub_alerts(&firing, &BTreeMap::new(), 7);
        assert_eq!(t, vec![HubTransition::Resolve { key: offline, at: 7 }]);
    }

    #[test]
    fn certificate_expiry_alert_table() {
        let day = 86_400_000;
        let warn = 14 * day;
        let node = |left_ms: i64| FleetNode {
            name: "n".into(),
            last_contact: 100 * day,
            cert_not_after: 100 * day + left_ms,
        };
        // (time left, fires?, summary contains)
        for (left, fires, text) in [
            (30 * day, false, ""),
            (14 * day, false, ""),
            (14 * day - 1, true, "expires in 1209599s"),
            (0, true, "expires in 0s"),
            (-2000, true, "expired 2s ago"),
        ] {
            let got = fleet_alerts(&[node(left)], &[], i64::MAX, warn, 0, 100 * day);
            let alert = got.iter().find(|(k, _)| k.name == NODE_CERTIFICATE_EXPIRING);
            assert_eq!(alert.is_some(), fires, "left {left}: {got:?}");
            if let Some((k, a)) = alert {
                assert_eq!((k.node.as_str(), k.subject.as_str()), ("n", ""));
                assert!(a.summary.contains(text), "{}", a.summary);
                assert!(a.started_at <= 100 * day, "never in the future");
                assert_eq!(a.started_at, (100 * day + left - warn).min(100 * day));
            }
        }
        assert_eq!(severity(NODE_CERTIFICATE_EXPIRING), "warning");
    }

    #[test]
    fn vitals_are_sent_when_they_move_or_go_stale() {
        use outpost_api::{Vitals, WorkloadVitals};
        let base = Vitals {
            at: 0,
            cpu: 10.0,
            mem: 40.0,
            disk_root: 50.0,
            workloads: vec![WorkloadVitals {
                key: "w".into(),
                cpu: 1.0,
                rss_bytes: 1000,
                restarts: 0,
            }],
            ..Default::default()
        };
        let with = |f: &dyn Fn(&mut Vitals)| {
            let mut v = base.clone();
            v.at = 60_000;
            f(&mut v);
            v
        };
        let cases: &[(&str, Vitals, bool)] = &[
            ("unchanged", with(&|_| {}), false),
            ("small cpu wobble", with(&|v| v.cpu = 13.0), false),
            ("cpu jump", with(&|v| v.cpu = 60.0), true),
            ("disk grew", with(&|v| v.disk_root = 51.5), true),
            ("a restart", with(&|v| v.workloads[0].restarts = 1), true),
            ("workload memory +30%", with(&|v| v.workloads[0].rss_bytes = 1300), true),
            ("dropped log lines", with(&|v| v.log_dropped_lines = 5), true),
            ("stale", with(&|v| v.at = 3_600_000), true),
        ];
        for (what, cur, want) in cases {
            assert_eq!(vitals_worth_sending(Some(&base), cur, 3_600_000), *want, "{what}");
        }
        assert!(vitals_worth_sending(None, &base, 3_600_000));
    }

    #[test]
    fn node_events_are_deduplicated() {
        use NodeEventAction::*;
        let cases = [
            // (firing event, seq, processed up to, current state, expected)
            (true, 5, 4, None, Fire),
            (true, 5, 5, None, Ignore),
            (true, 6, 4, Some(true), Ignore),
            (true, 6, 4, Some(false), Fire),
            (false, 7, 6, Some(true), Resolve),
            (false, 7, 6, Some(false), Ignore),
            (false, 7, 6, None, Ignore),
            (false, 3, 6, Some(true), Ignore),
        ];
        for (i, (f, seq, up_to, cur, want)) in cases.into_iter().enumerate() {
            assert_eq!(on_node_event(f, seq, up_to, cur), want, "case {i}");
        }
    }

    #[test]
    fn node_conditions_raise_hub_alerts() {
        let cond = |kind: &str, since| outpost_api::NodeCondition {
            kind: kind.into(),
            message: format!("{kind} msg"),
            since,
        };
        let key = |node: &str, name: &str| AlertKey {
            node: node.into(),
            name: name.into(),
            subject: AGENT_DATA.into(),
        };
        type Case<'a> = (
            Vec<(&'a str, Vec<outpost_api::NodeCondition>)>,
            Vec<(AlertKey, UnixMs, &'a str)>,
        );
        let cases: Vec<Case> = vec![
            (vec![], vec![]),
            (vec![("a", vec![])], vec![]),
            (
                vec![("a", vec![cond("DiskFull", 5)])],
                vec![(key("a", NODE_DISK_FULL), 5, "a: DiskFull msg")],
            ),
            (
                vec![("a", vec![cond("StoreFailing", 7)]), ("b", vec![cond("DiskFull", 9)])],
                vec![
                    (key("a", NODE_STORE_FAILING), 7, "a: StoreFailing msg"),
                    (key("b", NODE_DISK_FULL), 9, "b: DiskFull msg"),
                ],
            ),
        ];
        for (input, want) in cases {
            let m: BTreeMap<String, Vec<outpost_api::NodeCondition>> =
                input.into_iter().map(|(n, c)| (n.to_string(), c)).collect();
            let got: Vec<(AlertKey, UnixMs, String)> = condition_alerts(&m)
                .into_iter()
                .map(|(k, a)| (k, a.started_at, a.summary))
                .collect();
            let want: Vec<(AlertKey, UnixMs, String)> =
                want.into_iter().map(|(k, t, s)| (k, t, s.to_string())).collect();
            assert_eq!(got, want);
        }
        assert_eq!(severity(NODE_STORE_FAILING), "critical");
        // the node's own disk alert (no subject) and this one are different alerts
        assert_ne!(key("a", NODE_DISK_FULL).subject, "");
    }
}
