//! Fleet rollouts: the `RolloutPolicy` kind (`apiVersion: outpost.dev/v1`), its structural
//! checks, and the wire types of `outpost rollout status|pause|resume|abort|undo`
//! (docs/rollouts.md). How a policy is applied is decided in `outpost_core::waves`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::manifest::{Labels, ObjectMeta};

/// `apiVersion: outpost.dev/v1`, `kind: RolloutPolicy`: how changes to the workloads its
/// `selector` matches reach the fleet: ordered waves, bake time, failure threshold, maintenance
/// windows. Workloads no policy matches follow outpost's built-in default (docs/rollouts.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutPolicy {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: RolloutPolicySpec,
}

#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutPolicySpec {
    /// Workloads (by their `metadata.labels`) this policy applies to; empty: every workload.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: Labels,
    /// Ordered waves; nodes left after the last one form a final wave. Default: one canary
    /// node, then 10 %, 50 %, 100 % of the nodes not yet updated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waves: Vec<WaveSpec>,
    /// How long a wave's nodes run healthy after passing their gates before the next wave
    /// opens (e.g. `5m`, `0s`). Default 5 minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake: Option<String>,
    /// Nodes updating (past the wave's start, gate not yet passed or failed) at once; default
    /// unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<FailureThreshold>,
    /// `Rollback` (default): every node already updated returns to its previous revision and
    /// the rollout is Failed. `Pause`: the rollout stops where it is until resumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<String>,
    /// Fleets of at most this many nodes get the change in one wave (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiny_fleet: Option<u32>,
    /// When nodes may switch to a new revision, in each node's local time. Images are fetched
    /// ahead of the window. Empty: any time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub maintenance_windows: Vec<WindowSpec>,
    /// The node label holding a node's time zone, with `.` for `/` (`Europe.Berlin`; label
    /// values cannot hold `/`). Default `node.outpost.dev/timezone`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone_label: Option<String>,
    /// The time zone of nodes without that label (an IANA name, default `UTC`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// What a node's update gate checks besides readiness: for ONNX serving workloads, the
    /// model's own error rate and p99 latency (docs/inference.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateSpec>,
}

/// `gate: {modelErrorRate: 0.05, modelP99: 50ms, minRequests: 20}`: a new model revision that
/// answers worse than this on a node while its gate runs fails the gate there (rolled back on
/// the node, counted against the wave).
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GateSpec {
    /// Largest fraction of requests answered with an error, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_error_rate: Option<f64>,
    /// Largest p99 latency inside the model server: `50ms`, `0.5s`, `2s`.
    #[serde(default, rename = "modelP99", skip_serializing_if = "Option::is_none")]
    pub model_p99: Option<String>,
    /// Requests a node must have answered with the new model before judging it (default 20);
    /// with fewer, readiness alone decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_requests: Option<u64>,
}

/// Requests judged by default before a model's gate decides.
pub const DEFAULT_GATE_MIN_REQUESTS: u64 = 20;

/// `50ms`, `1.5ms`, `0.5s`, `2s` -> milliseconds.
pub fn parse_latency_ms(s: &str) -> Result<f64, String> {
    let bad = || format!("{s:?} is not a latency like 50ms or 0.5s");
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return Err(bad());
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    if !v.is_finite() || v <= 0.0 {
        return Err(format!("{s:?} must be more than 0"));
    }
    let ms = v * scale;
    if ms > 600_000.0 {
        return Err(format!("{s:?} is more than 10 minutes"));
    }
    Ok(ms)
}

impl GateSpec {
    /// The model gate nodes apply, if this spec sets a model threshold.
    pub fn model_gate(&self) -> Option<crate::ModelGate> {
        let max_p99_ms = self.model_p99.as_deref().and_then(|p| parse_latency_ms(p).ok());
        if self.model_error_rate.is_none() && max_p99_ms.is_none() {
            return None;
        }
        Some(crate::ModelGate {
            max_error_rate: self.model_error_rate,
            max_p99_ms,
            min_requests: self.min_requests.unwrap_or(DEFAULT_GATE_MIN_REQUESTS),
        })
    }
}

/// One wave: exactly one of `count`, `percent` (of the nodes not updated by earlier waves,
/// rounded up) or `selector` (the matching nodes not updated yet).
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaveSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Labels>,
    /// This wave's bake time, overriding the policy's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake: Option<String>,
}

/// The rollout fails when `percent` % of the updated nodes that finished their gate failed
/// it, counting at least `minSample` nodes (so with `minSample: 10` and `percent: 10`, the
/// first failure trips it while fewer than 10 nodes are done). Default 10 % of at least 10.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailureThreshold {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_sample: Option<u32>,
}

/// A maintenance window: from `start` (`HH:MM`, or `HH:MM:SS`, node-local) for `duration`, on `days`
/// (`Mon`..`Sun`; default every day). A window may run past midnight.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WindowSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub days: Vec<String>,
    pub start: String,
    pub duration: String,
}

/// Day names a window accepts, Monday first.
pub const WEEKDAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
/// The longest maintenance window.
pub const MAX_WINDOW_SECS: u64 = 7 * 86_400;
/// The default label holding a node's time zone.
pub const TIMEZONE_LABEL: &str = "node.outpost.dev/timezone";

/// `HH:MM` (or `HH:MM:SS`) -> seconds after midnight.
pub fn parse_clock(s: &str) -> Result<u32, String> {
    let bad = || format!("{s:?} is not a time of day like 02:30 (24-hour HH:MM)");
    let parts: Vec<&str> = s.split(':').collect();
    if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.len() != 2) {
        return Err(bad());
    }
    let n: Vec<u32> = parts
        .iter()
        .map(|p| p.parse::<u32>().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let (h, m, sec) = (n[0], n[1], n.get(2).copied().unwrap_or(0));
    if h > 23 || m > 59 || sec > 59 {
        return Err(bad());
    }
    Ok(h * 3600 + m * 60 + sec)
}

/// A time-zone label value (`Europe.Berlin`) as an IANA name (`Europe/Berlin`).
pub fn timezone_from_label(v: &str) -> String {
    v.replace('.', "/")
}

/// Structural checks of a RolloutPolicy's spec: every problem as (field, reason). Time-zone
/// names are checked by the hub, which holds the time-zone database.
pub fn check_rollout_policy(spec: &RolloutPolicySpec) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut err = |f: String, r: String| out.push((f, r));
    for (k, v) in &spec.selector {
        if let Err(e) = crate::checks::validate_label_key(k) {
            err("spec.selector".into(), e);
        }
        if let Err(e) = crate::checks::validate_label_value(v) {
            err(format!("spec.selector.{k}"), e);
        }
    }
    let duration = |f: String, v: &Option<String>, err: &mut dyn FnMut(String, String)| {
        if let Some(v) = v {
            if let Err(e) = crate::parse_duration_secs(v) {
                err(f, e);
            }
        }
    };
    duration("spec.bake".into(), &spec.bake, &mut err);
    for (i, w) in spec.waves.iter().enumerate() {
        let f = format!("spec.waves[{i}]");
        let set = [w.count.is_some(), w.percent.is_some(), w.selector.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if set != 1 {
            err(
                f.clone(),
                "give exactly one of count (nodes), percent (of the nodes not yet updated) or selector (node labels)"
                    .into(),
            );
        }
        if w.count == Some(0) {
            err(format!("{f}.count"), "must be at least 1".into());
        }
        if let Some(p) = w.percent {
            if !(1..=100).contains(&p) {
                err(format!("{f}.percent"), format!("{p} is not between 1 and 100"));
            }
        }
        if let Some(sel) = &w.selector {
            if sel.is_empty() {
                err(
                    format!("{f}.selector"),
                    "an empty selector matches every node: use percent: 100".into(),
                );
            }
            for (k, v) in sel {
                if let Err(e) = crate::checks::validate_label_key(k) {
                    err(format!("{f}.selector"), e);
                }
                if let Err(e) = crate::checks::validate_label_value(v) {
                    err(format!("{f}.selector.{k}"), e);
                }
            }
        }
        duration(format!("{f}.bake"), &w.bake, &mut err);
        if let Some(n) = &w.name {
            if n.is_empty() || n.len() > 63 || n.chars().any(|c| c.is_control()) {
                err(format!("{f}.name"), "must be 1 to 63 printable characters".into());
            }
        }
    }
    if spec.max_concurrent == Some(0) {
        err(
            "spec.maxConcurrent".into(),
            "must be at least 1 (leave it out for no limit)".into(),
        );
    }
    if let Some(t) = &spec.failure_threshold {
        if let Some(p) = t.percent {
            if p > 100 {
                err("spec.failureThreshold.percent".into(), format!("{p} is more than 100"));
            }
        }
        if t.min_sample == Some(0) {
            err("spec.failureThreshold.minSample".into(), "must be at least 1".into());
        }
    }
    if let Some(o) = &spec.on_failure {
        if o != "Rollback" && o != "Pause" {
            err("spec.onFailure".into(), format!("{o:?} is not Rollback or Pause"));
        }
    }
    if let Some(g) = &spec.gate {
        if let Some(r) = g.model_error_rate {
            if !(r.is_finite() && (0.0..1.0).contains(&r)) {
                err(
                    "spec.gate.modelErrorRate".into(),
                    format!("{r} is not a fraction from 0 to below 1 (0.05 = 5 % of requests)"),
                );
            }
        }
        if let Some(p) = &g.model_p99 {
            if let Err(e) = parse_latency_ms(p) {
                err("spec.gate.modelP99".into(), e);
            }
        }
        if g.min_requests == Some(0) {
            err(
                "spec.gate.minRequests".into(),
                "must be at least 1 (a model is judged on its requests)".into(),
            );
        }
        if g.model_error_rate.is_none() && g.model_p99.is_none() {
            err(
                "spec.gate".into(),
                "set modelErrorRate and/or modelP99 (or leave gate out)".into(),
            );
        }
    }
    if spec.tiny_fleet == Some(0) {
        err(
            "spec.tinyFleet".into(),
            "must be at least 1 (a fleet of 1 node always goes at once)".into(),
        );
    }
    for (i, w) in spec.maintenance_windows.iter().enumerate() {
        let f = format!("spec.maintenanceWindows[{i}]");
        if let Err(e) = parse_clock(&w.start) {
            err(format!("{f}.start"), e);
        }
        match crate::parse_duration_secs(&w.duration) {
            Ok(0) => err(format!("{f}.duration"), "must be more than 0".into()),
            Ok(s) if s > MAX_WINDOW_SECS => err(format!("{f}.duration"), "must be at most 7d".into()),
            Ok(_) => {}
            Err(e) => err(format!("{f}.duration"), e),
        }
        for (j, d) in w.days.iter().enumerate() {
            if !WEEKDAYS.contains(&d.as_str()) {
                err(
                    format!("{f}.days[{j}]"),
                    format!("{d:?} is not a day: use {}", WEEKDAYS.join(", ")),
                );
            }
        }
    }
    if let Some(l) = &spec.timezone_label {
        if let Err(e) = crate::checks::validate_label_key(l) {
            err("spec.timezoneLabel".into(), e);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Wire types (operator API)

/// Where a fleet rollout stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RolloutPhase {
    /// Waves are opening as the earlier ones complete.
    Progressing,
    /// Stopped by `outpost rollout pause` or by the failure threshold (`onFailure: Pause`);
    /// nodes keep what they run until `resume`.
    Paused,
    /// Every node has the revision.
    Complete,
    /// The failure threshold tripped: every updated node went back to its previous revision.
    Failed,
    /// `outpost rollout undo`: every updated node went back to its previous revision.
    RolledBack,
    /// `outpost rollout abort`: stopped for good; updated nodes keep the revision, the others
    /// keep theirs.
    Aborted,
}

impl RolloutPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutPhase::Progressing => "Progressing",
            RolloutPhase::Paused => "Paused",
            RolloutPhase::Complete => "Complete",
            RolloutPhase::Failed => "Failed",
            RolloutPhase::RolledBack => "RolledBack",
            RolloutPhase::Aborted => "Aborted",
        }
    }
    /// Waves may still open (after a resume, for Paused).
    pub fn is_active(self) -> bool {
        matches!(self, RolloutPhase::Progressing | RolloutPhase::Paused)
    }
}

/// Where one node stands in a rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum NodeRolloutState {
    /// Its wave has not opened yet: it keeps its previous revision.
    Pending,
    /// Its wave is open but its maintenance window is closed; images are being fetched.
    Waiting,
    /// Its wave is open; it gets the revision when it is online and a slot is free.
    Queued,
    /// It has the revision and its gate is running.
    Updating,
    /// It passed its gate.
    Passed,
    /// It failed its gate (the reason says why).
    Failed,
    /// A fleet rollback put it back on its previous revision.
    Reverted,
}

impl NodeRolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRolloutState::Pending => "Pending",
            NodeRolloutState::Waiting => "Waiting",
            NodeRolloutState::Queued => "Queued",
            NodeRolloutState::Updating => "Updating",
            NodeRolloutState::Passed => "Passed",
            NodeRolloutState::Failed => "Failed",
            NodeRolloutState::Reverted => "Reverted",
        }
    }
}

/// A wave of a rollout: planned (not opened), open, baking or complete.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WaveInfo {
    pub index: u32,
    pub name: String,
    /// `Planned`, `Open`, `Baking` or `Complete`.
    pub state: String,
    /// Nodes in the wave (for a planned wave: as it would open now).
    pub nodes: u32,
    /// Node count per [`NodeRolloutState`] name.
    #[serde(default)]
    pub counts: BTreeMap<String, u32>,
    #[serde(default)]
    pub opened_at: Option<i64>,
    /// Every online node passed or failed its gate at this time; the bake started.
    #[serde(default)]
    pub gates_done_at: Option<i64>,
    #[serde(default)]
    pub completed_at: Option<i64>,
    pub bake_secs: u64,
}

/// One node of a rollout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeRolloutInfo {
    pub node: String,
    /// Index of its wave, once its wave opened.
    #[serde(default)]
    pub wave: Option<u32>,
    pub state: NodeRolloutState,
    /// The revision the hub hands this node now.
    pub desired_revision: u64,
    /// The revision it reports running.
    #[serde(default)]
    pub running_revision: Option<u64>,
    pub online: bool,
    /// The node's own update gate of the revision it was handed, as it last reported it.
    #[serde(default)]
    pub gate: Option<crate::RolloutState>,
    #[serde(default)]
    pub reason: Option<String>,
}

/// Something that happened to a rollout (also sent to webhooks).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutEvent {
    pub at: i64,
    /// `RolloutStarted`, `WaveStarted`, `WaveCompleted`, `RolloutPaused`, `RolloutResumed`,
    /// `RolloutFailed`, `RolloutRolledBack`, `RolloutAborted`, `RolloutComplete`,
    /// `RolloutSuperseded`.
    pub reason: String,
    pub message: String,
}

/// `GET /v1/objects/{kind}/{namespace}/{name}/rollout`: a workload's current (or last) rollout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutInfo {
    /// `deployment/<ns>/<name>`.
    pub workload: String,
    /// The revision being rolled out.
    pub revision: u64,
    /// The revision most nodes ran before (where nodes without one of their own go back to).
    pub previous_revision: Option<u64>,
    pub phase: RolloutPhase,
    #[serde(default)]
    pub reason: Option<String>,
    /// The RolloutPolicy applied (`default` for the built-in one).
    pub policy: String,
    pub started_at: i64,
    pub updated_at: i64,
    pub waves: Vec<WaveInfo>,
    /// Node count per [`NodeRolloutState`] name, over the whole fleet of the workload.
    pub counts: BTreeMap<String, u32>,
    pub nodes: Vec<NodeRolloutInfo>,
    pub events: Vec<RolloutEvent>,
}

/// `POST /v1/objects/{kind}/{namespace}/{name}/rollout/{action}` answers with what changed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutActionResult {
    pub workload: String,
    /// `pause`, `resume`, `abort` or `undo`.
    pub action: String,
    pub phase: RolloutPhase,
    pub message: String,
    /// For an undo after the rollout ended: the new revision made from the previous template.
    #[serde(default)]
    pub revision: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_and_policies_are_checked() {
        assert_eq!(parse_clock("02:30"), Ok(150 * 60));
        assert_eq!(parse_clock("23:59"), Ok(1439 * 60));
        assert_eq!(parse_clock("23:59:30"), Ok(1439 * 60 + 30));
        for bad in ["2:30", "24:00", "12:60", "noon", "12-30", "12:00:60", "12:00:00:00"] {
            assert!(parse_clock(bad).is_err(), "{bad}");
        }
        let spec: RolloutPolicySpec = serde_json::from_value(serde_json::json!({
            "waves": [{"count": 1, "percent": 5}, {"percent": 0}, {"selector": {}}, {"count": 0}],
            "bake": "5 minutes",
            "maxConcurrent": 0,
            "failureThreshold": {"percent": 101, "minSample": 0},
            "onFailure": "Explode",
            "maintenanceWindows": [{"days": ["Monday"], "start": "25:00", "duration": "8d"}],
        }))
        .unwrap();
        let errs: Vec<String> = check_rollout_policy(&spec)
            .into_iter()
            .map(|(f, r)| format!("{f}: {r}"))
            .collect();
        for want in [
            "spec.bake: ",
            "spec.waves[0]: give exactly one of count",
            "spec.waves[1].percent: 0 is not between 1 and 100",
            "spec.waves[2].selector: an empty selector",
            "spec.waves[3].count: must be at least 1",
            "spec.maxConcurrent: must be at least 1",
            "spec.failureThreshold.percent: 101 is more than 100",
            "spec.failureThreshold.minSample: must be at least 1",
            "spec.onFailure: \"Explode\" is not Rollback or Pause",
            "spec.maintenanceWindows[0].start: \"25:00\" is not a time of day",
            "spec.maintenanceWindows[0].duration: must be at most 7d",
            "spec.maintenanceWindows[0].days[0]: \"Monday\" is not a day",
        ] {
            assert!(errs.iter().any(|e| e.starts_with(want)), "{want} not in {errs:#?}");
        }
        assert_eq!(errs.len(), 12, "{errs:#?}");
        assert!(check_rollout_policy(&RolloutPolicySpec::default()).is_empty());
        assert_eq!(
            timezone_from_label("America.Argentina.Buenos_Aires"),
            "America/Argentina/Buenos_Aires"
        );
    }

    #[test]
    fn model_gates_are_checked() {
        let check = |gate: serde_json::Value, want: &[&str]| {
            let spec: RolloutPolicySpec = serde_json::from_value(serde_json::json!({ "gate": gate })).unwrap();
            let errs: Vec<String> = check_rollout_policy(&spec)
                .into_iter()
                .map(|(f, r)| format!("{f}: {r}"))
                .collect();
            assert_eq!(errs.len(), want.len(), "{gate}: {errs:#?}");
            for w in want {
                assert!(errs.iter().any(|e| e.starts_with(w)), "{w} not in {errs:#?}");
            }
        };
        check(
            serde_json::json!({"modelErrorRate": 0.05, "modelP99": "50ms", "minRequests": 10}),
            &[],
        );
        check(serde_json::json!({"modelP99": "1.5ms"}), &[]);
        check(
            serde_json::json!({"modelErrorRate": 5, "modelP99": "fast", "minRequests": 0}),
            &[
                "spec.gate.modelErrorRate: 5 is not a fraction",
                "spec.gate.modelP99: \"fast\" is not a latency",
                "spec.gate.minRequests: must be at least 1",
            ],
        );
        check(
            serde_json::json!({"modelErrorRate": -0.1}),
            &["spec.gate.modelErrorRate"],
        );
        check(
            serde_json::json!({"modelP99": "0ms"}),
            &["spec.gate.modelP99: \"0ms\" must be more than 0"],
        );
        check(
            serde_json::json!({"minRequests": 5}),
            &["spec.gate: set modelErrorRate and/or modelP99"],
        );
        assert_eq!(parse_latency_ms("50ms"), Ok(50.0));
        assert_eq!(parse_latency_ms("0.5s"), Ok(500.0));
        assert_eq!(parse_latency_ms("250us"), Ok(0.25));
        assert!(
            parse_latency_ms("50").is_err() && parse_latency_ms("11m").is_err() && parse_latency_ms("601s").is_err()
        );
    }
}
