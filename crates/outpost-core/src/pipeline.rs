//! Edge data pipeline decisions, as pure code: which pipelines a node runs ([`from_desired`],
//! [`effective`]), their update gate ([`gate`]) and what each stream keeps of every record
//! ([`StreamRules`]).
//!
//! Per record, in this order (docs/pipeline.md):
//! ```text
//!  record ─► filter false? ─► dropped
//!     │
//!     ▼
//!  anomaly rules (when / threshold / deadband / rate of change, per key) ─► any match ─► Anomaly (payload and time as they came)
//!     │ none
//!     ▼
//!  aggregate? ─► add to the key's window (tumbling: every N s aligned to the epoch, or every N records) ─► Aggregate at window close
//!  sample?    ─► one in N ─► Sample
//!  neither    ─► Record (forwarded as is)
//! ```
//! The state (open windows, last values of deadband and rate rules, sample counters) is
//! serializable ([`StreamRules::checkpoint`]): the agent writes it into its spool and rebuilds
//! it after a crash by replaying the records written after it. Windows close on a record
//! past their end or on [`StreamRules::tick`]; nothing here reads the clock.
//!
//! p95 comes from a log-bucket sketch (relative error under 1 %), so a window's memory is
//! bounded by the spread of its values, not by how many records it saw.

use std::collections::BTreeMap;

use outpost_api::pipeline::{lookup, AnomalyRule, CmpOp, Expr, NodePipeline, NodePipelines, RecordKind, StreamSpec};
use outpost_api::{RolloutState, UnixMs, WorkloadSpec};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The pipelines a node's desired state holds: one per Pipeline workload, at the revision its
/// rollout gives this node (the hub places them by nodeSelector, like DaemonSets), sorted by
/// namespace and name.
pub fn from_desired<'a>(workloads: impl IntoIterator<Item = &'a WorkloadSpec>) -> NodePipelines {
    let mut out: Vec<NodePipeline> = workloads.into_iter().filter_map(|w| w.pipeline.clone()).collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    NodePipelines { pipelines: out }
}

/// What the node's pipeline made of the revision it was last given of one pipeline.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The revision the node was given.
    pub revision: u64,
    /// Why some stream of it could not start; None when all of them run.
    pub error: Option<String>,
    /// The revision that runs: the given one, or its last good one when the given one failed.
    pub running: Option<u64>,
    /// Unix ms when this last changed.
    pub since: UnixMs,
}

/// Which revision of a pipeline to run: the one wanted, unless it already failed on this node
/// and an earlier good one exists (the node rolls back on its own, as for workloads; the
/// fleet rollout sees the failure and stops the wave).
pub fn effective<'a>(want: &'a NodePipeline, good: Option<&'a NodePipeline>, failed: Option<u64>) -> &'a NodePipeline {
    match good {
        Some(g) if failed == Some(want.revision) && g.revision != want.revision => g,
        _ => want,
    }
}

/// The update gate of revision `target` of a pipeline on this node, with the reason when it
/// did not pass: Progressing until the node applied it, Complete when every stream of it
/// started, RolledBack when one could not and an earlier revision runs again, Failed when
/// one could not and there is none to go back to.
pub fn gate(target: u64, applied: Option<&Applied>) -> (RolloutState, Option<String>) {
    match applied {
        Some(a) if a.revision == target => match (&a.error, a.running) {
            (None, _) => (RolloutState::Complete, None),
            (Some(e), Some(r)) if r != target => (
                RolloutState::RolledBack,
                Some(format!("{e}; the node runs revision {r} of the pipeline again")),
            ),
            (Some(e), _) => (RolloutState::Failed, Some(e.clone())),
        },
        _ => (RolloutState::Progressing, None),
    }
}

/// Evaluate an expression against a record. Missing fields are null; comparisons between a
/// number and anything else, or ordering comparisons with null, are false.
pub fn eval(e: &Expr, rec: &Value, topic: Option<&str>) -> Value {
    match e {
        Expr::Lit(v) => v.clone(),
        Expr::Path(p) => lookup(rec, p, topic).map(|c| c.into_owned()).unwrap_or(Value::Null),
        Expr::Exists(p) => Value::Bool(lookup(rec, p, topic).is_some_and(|v| !v.is_null())),
        Expr::Not(x) => Value::Bool(!truthy(&eval(x, rec, topic))),
        Expr::And(a, b) => Value::Bool(truthy(&eval(a, rec, topic)) && truthy(&eval(b, rec, topic))),
        Expr::Or(a, b) => Value::Bool(truthy(&eval(a, rec, topic)) || truthy(&eval(b, rec, topic))),
        Expr::Cmp(op, a, b) => Value::Bool(compare(*op, &eval(a, rec, topic), &eval(b, rec, topic))),
    }
}

pub fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(_) => true,
    }
}

fn compare(op: CmpOp, a: &Value, b: &Value) -> bool {
    use std::cmp::Ordering;
    let ord: Option<Ordering> = match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64().zip(y.as_f64()).and_then(|(x, y)| x.partial_cmp(&y)),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        (Value::Null, Value::Null) => Some(Ordering::Equal),
        _ => None,
    };
    match op {
        CmpOp::Eq => ord == Some(Ordering::Equal),
        CmpOp::Ne => ord != Some(Ordering::Equal),
        CmpOp::Lt => ord == Some(Ordering::Less),
        CmpOp::Le => matches!(ord, Some(Ordering::Less | Ordering::Equal)) && !a.is_null(),
        CmpOp::Gt => ord == Some(Ordering::Greater),
        CmpOp::Ge => matches!(ord, Some(Ordering::Greater | Ordering::Equal)) && !a.is_null(),
    }
}

fn number(rec: &Value, path: &[String], topic: Option<&str>) -> Option<f64> {
    let v = lookup(rec, path, topic)?;
    match v.as_ref() {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        Value::Bool(b) => Some(*b as u8 as f64),
        _ => None,
    }
}

fn split(p: &str) -> Vec<String> {
    if p == "$topic" {
        vec![p.to_string()]
    } else {
        p.split('.').map(str::to_string).collect()
    }
}

/// One result of the rules, to be spooled and forwarded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Out {
    pub kind: RecordKind,
    pub at: UnixMs,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub data: Value,
    /// Anomaly rules that asked for an alert.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<String>,
}

/// Relative accuracy of the quantile sketch.
const SKETCH_ALPHA: f64 = 0.005;

/// Count, min, max, sum and a log-bucket sketch of one field in one window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub n: u64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    /// bucket index -> count; positive values by index, negative values by -(index) - 1 with
    /// an offset, zero at `zeros`.
    pos: BTreeMap<i32, u64>,
    neg: BTreeMap<i32, u64>,
    zeros: u64,
}

impl Summary {
    fn gamma() -> f64 {
        (1.0 + SKETCH_ALPHA) / (1.0 - SKETCH_ALPHA)
    }
    fn index(v: f64) -> i32 {
        (v.ln() / Self::gamma().ln()).ceil() as i32
    }
    fn value(i: i32) -> f64 {
        2.0 * Self::gamma().powi(i) / (1.0 + Self::gamma())
    }
    pub fn add(&mut self, v: f64) {
        if !v.is_finite() {
            return;
        }
        if self.n == 0 {
            self.min = v;
            self.max = v;
        } else {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
        self.n += 1;
        self.sum += v;
        if v > 1e-12 {
            *self.pos.entry(Self::index(v)).or_default() += 1;
        } else if v < -1e-12 {
            *self.neg.entry(Self::index(-v)).or_default() += 1;
        } else {
            self.zeros += 1;
        }
    }
    /// The q-quantile (0..=1), within the sketch's relative accuracy, clamped to [min, max].
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.n == 0 {
            return None;
        }
        let rank = (q * (self.n - 1) as f64).round() as u64;
        let mut seen = 0u64;
        for (i, c) in self.neg.iter().rev() {
            seen += c;
            if seen > rank {
                return Some((-Self::value(*i)).clamp(self.min, self.max));
            }
        }
        seen += self.zeros;
        if seen > rank {
            return Some(0.0f64.clamp(self.min, self.max));
        }
        for (i, c) in &self.pos {
            seen += c;
            if seen > rank {
                return Some(Self::value(*i).clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }
}

/// One key's open window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// Time of the first record (count windows) or the window's start (time windows).
    pub start: UnixMs,
    pub records: u64,
    pub fields: BTreeMap<String, Summary>,
}

/// Everything a stream remembers between records.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamState {
    /// Time windows: start of the open window (all keys share it).
    pub window_start: Option<UnixMs>,
    pub windows: BTreeMap<String, Window>,
    /// rule -> key -> last value kept (deadband).
    pub deadband: BTreeMap<String, BTreeMap<String, f64>>,
    /// rule -> key -> (last value, its time) (rate of change).
    pub last: BTreeMap<String, BTreeMap<String, (f64, UnixMs)>>,
    /// Records that were neither dropped nor anomalies, for 1-in-N sampling.
    pub sampled: u64,
    pub counters: Counters,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub received: u64,
    pub filtered: u64,
    pub anomalies: u64,
    pub aggregated: u64,
    pub aggregates: u64,
    pub sampled_out: u64,
    pub forwarded: u64,
}

enum RuleKind {
    When(Expr),
    Threshold { above: Option<f64>, below: Option<f64> },
    Deadband(f64),
    Rate(f64),
}

struct Rule {
    name: String,
    field: Vec<String>,
    kind: RuleKind,
    alert: bool,
}

/// A stream's rules, compiled once, with their state.
pub struct StreamRules {
    filter: Option<Expr>,
    key: Option<Vec<String>>,
    rules: Vec<Rule>,
    agg_every_ms: Option<i64>,
    agg_count: Option<u64>,
    agg_fields: Vec<(String, Vec<String>)>,
    agg_functions: Vec<String>,
    aggregate: bool,
    sample_every: Option<u64>,
    pub state: StreamState,
}

impl StreamRules {
    /// Compile a (validated) stream spec. Errors name the field, as at apply.
    pub fn new(spec: &StreamSpec) -> Result<Self, String> {
        let filter = spec
            .filter
            .as_deref()
            .map(Expr::parse)
            .transpose()
            .map_err(|e| format!("filter: {e}"))?;
        let rules = spec.anomalies.iter().map(compile_rule).collect::<Result<Vec<_>, _>>()?;
        let (mut agg_every_ms, mut agg_count, mut agg_fields, mut agg_functions) = (None, None, vec![], vec![]);
        if let Some(a) = &spec.aggregate {
            agg_every_ms = a
                .every
                .as_deref()
                .map(outpost_api::parse_duration_secs)
                .transpose()
                .map_err(|e| format!("aggregate.every: {e}"))?
                .map(|s| (s as i64).max(1) * 1000);
            agg_count = a.count.map(|c| c.max(1) as u64);
            agg_fields = a.fields.iter().map(|f| (f.clone(), split(f))).collect();
            agg_functions = if a.functions.is_empty() {
                outpost_api::pipeline::AGG_FUNCTIONS
                    .iter()
                    .map(|s| s.to_string())
                    .collect()
            } else {
                a.functions.clone()
            };
        }
        Ok(Self {
            filter,
            key: spec.key.as_deref().map(split),
            rules,
            agg_every_ms,
            agg_count,
            agg_fields,
            agg_functions,
            aggregate: spec.aggregate.is_some(),
            sample_every: spec.sample.as_ref().map(|s| s.every.max(1) as u64),
            state: StreamState::default(),
        })
    }

    /// Does this stream remember anything between records? (Then the agent keeps the records
    /// that changed the state until a checkpoint covers them.)
    pub fn stateful(&self) -> bool {
        self.aggregate
            || self.sample_every.is_some()
            || self
                .rules
                .iter()
                .any(|r| matches!(r.kind, RuleKind::Deadband(_) | RuleKind::Rate(_)))
    }

    pub fn checkpoint(&self) -> Value {
        serde_json::to_value(&self.state).unwrap_or(Value::Null)
    }

    pub fn restore(&mut self, v: Value) -> Result<(), String> {
        self.state = serde_json::from_value(v).map_err(|e| format!("checkpoint does not match this stream: {e}"))?;
        Ok(())
    }

    /// The time window that `at` falls in has started after the open one: close it.
    fn roll_time_window(&mut self, at: UnixMs, out: &mut Vec<Out>) {
        let Some(every) = self.agg_every_ms else { return };
        let start = at - at.rem_euclid(every);
        match self.state.window_start {
            Some(s) if start <= s => {}
            Some(_) => {
                self.close_all(out);
                self.state.window_start = Some(start);
            }
            None => self.state.window_start = Some(start),
        }
    }

    fn close_all(&mut self, out: &mut Vec<Out>) {
        let windows = std::mem::take(&mut self.state.windows);
        let end = self.state.window_start.zip(self.agg_every_ms).map(|(s, e)| s + e);
        for (key, w) in windows {
            out.push(self.aggregate_out(key, w, end));
        }
    }

    fn aggregate_out(&mut self, key: String, w: Window, end: Option<UnixMs>) -> Out {
        self.state.counters.aggregates += 1;
        self.state.counters.forwarded += 1;
        let mut fields = serde_json::Map::new();
        for (name, s) in &w.fields {
            let mut m = serde_json::Map::new();
            for f in &self.agg_functions {
                let v = match f.as_str() {
                    "count" => json!(s.n),
                    "min" if s.n > 0 => json!(s.min),
                    "max" if s.n > 0 => json!(s.max),
                    "mean" if s.n > 0 => json!(s.sum / s.n as f64),
                    "p95" => s.quantile(0.95).map_or(Value::Null, |v| json!(v)),
                    _ => Value::Null,
                };
                m.insert(f.clone(), v);
            }
            fields.insert(name.clone(), Value::Object(m));
        }
        let mut data = json!({ "records": w.records, "fields": fields });
        if let Some(end) = end {
            data["window_start"] = json!(w.start);
            data["window_end"] = json!(end);
        }
        Out {
            kind: RecordKind::Aggregate,
            at: w.start,
            rules: vec![],
            key: (!key.is_empty()).then_some(key),
            data,
            alerts: vec![],
        }
    }

    /// Close time windows that ended at or before `now`.
    pub fn tick(&mut self, now: UnixMs) -> Vec<Out> {
        let mut out = Vec::new();
        if let (Some(every), Some(start)) = (self.agg_every_ms, self.state.window_start) {
            if now >= start + every {
                self.close_all(&mut out);
                self.state.window_start = Some(now - now.rem_euclid(every));
            }
        }
        out
    }

    /// When the open time window ends (the caller ticks then).
    pub fn next_deadline(&self) -> Option<UnixMs> {
        let (every, start) = (self.agg_every_ms?, self.state.window_start?);
        (!self.state.windows.is_empty()).then_some(start + every)
    }

    /// Apply the rules to one record that arrived at `at`.
    pub fn ingest(&mut self, rec: &Value, topic: Option<&str>, at: UnixMs) -> Vec<Out> {
        let mut out = Vec::new();
        self.state.counters.received += 1;
        self.roll_time_window(at, &mut out);
        if let Some(f) = &self.filter {
            if !truthy(&eval(f, rec, topic)) {
                self.state.counters.filtered += 1;
                return out;
            }
        }
        let key = self
            .key
            .as_ref()
            .and_then(|k| lookup(rec, k, topic))
            .map(|v| match v.as_ref() {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .unwrap_or_default();
        let mut matched = Vec::new();
        let mut alerts = Vec::new();
        for r in &self.rules {
            let hit = match &r.kind {
                RuleKind::When(e) => truthy(&eval(e, rec, topic)),
                RuleKind::Threshold { above, below } => number(rec, &r.field, topic)
                    .is_some_and(|v| above.is_some_and(|a| v > a) || below.is_some_and(|b| v < b)),
                RuleKind::Deadband(band) => match number(rec, &r.field, topic) {
                    None => false,
                    Some(v) => {
                        let last = self.state.deadband.entry(r.name.clone()).or_default();
                        let hit = last.get(&key).is_none_or(|l| (v - l).abs() > *band);
                        if hit {
                            last.insert(key.clone(), v);
                        }
                        hit
                    }
                },
                RuleKind::Rate(limit) => match number(rec, &r.field, topic) {
                    None => false,
                    Some(v) => {
                        let last = self.state.last.entry(r.name.clone()).or_default();
                        let hit = match last.get(&key) {
                            Some((lv, lat)) if at > *lat => ((v - lv) / ((at - lat) as f64 / 1000.0)).abs() > *limit,
                            _ => false,
                        };
                        last.insert(key.clone(), (v, at));
                        hit
                    }
                },
            };
            if hit {
                matched.push(r.name.clone());
                if r.alert {
                    alerts.push(r.name.clone());
                }
            }
        }
        let key_opt = (!key.is_empty()).then(|| key.clone());
        if !matched.is_empty() {
            self.state.counters.anomalies += 1;
            self.state.counters.forwarded += 1;
            out.push(Out {
                kind: RecordKind::Anomaly,
                at,
                rules: matched,
                key: key_opt,
                data: rec.clone(),
                alerts,
            });
            return out;
        }
        if self.aggregate {
            self.state.counters.aggregated += 1;
            let w = self.state.windows.entry(key.clone()).or_insert_with(|| Window {
                start: at,
                ..Default::default()
            });
            if let Some(s) = self.state.window_start {
                w.start = s;
            }
            w.records += 1;
            for (name, path) in &self.agg_fields {
                if let Some(v) = number(rec, path, topic) {
                    w.fields.entry(name.clone()).or_default().add(v);
                }
            }
            if self.agg_count.is_some_and(|c| w.records >= c) {
                let w = self.state.windows.remove(&key).unwrap_or_default();
                out.push(self.aggregate_out(key.clone(), w, None));
            }
        }
        if let Some(n) = self.sample_every {
            let i = self.state.sampled;
            self.state.sampled += 1;
            if i.is_multiple_of(n) {
                self.state.counters.sampled_out += 1;
                self.state.counters.forwarded += 1;
                out.push(Out {
                    kind: RecordKind::Sample,
                    at,
                    rules: vec![],
                    key: key_opt,
                    data: rec.clone(),
                    alerts: vec![],
                });
            }
        } else if !self.aggregate {
            self.state.counters.forwarded += 1;
            out.push(Out {
                kind: RecordKind::Record,
                at,
                rules: vec![],
                key: key_opt,
                data: rec.clone(),
                alerts: vec![],
            });
        }
        out
    }
}

fn compile_rule(a: &AnomalyRule) -> Result<Rule, String> {
    let kind = if let Some(w) = &a.when {
        RuleKind::When(Expr::parse(w).map_err(|e| format!("anomalies {}: when: {e}", a.name))?)
    } else if a.above.is_some() || a.below.is_some() {
        RuleKind::Threshold {
            above: a.above,
            below: a.below,
        }
    } else if let Some(d) = a.deadband {
        RuleKind::Deadband(d)
    } else if let Some(r) = a.rate_of_change {
        RuleKind::Rate(r)
    } else {
        return Err(format!("anomalies {}: no condition", a.name));
    };
    Ok(Rule {
        name: a.name.clone(),
        field: a.field.as_deref().map(split).unwrap_or_default(),
        kind,
        alert: a.alert,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_api::pipeline::{AggregateSpec, SampleSpec};

    fn stream(yaml_rules: impl FnOnce(&mut StreamSpec)) -> StreamRules {
        let mut s = StreamSpec {
            name: "s".into(),
            sinks: vec!["hub".into()],
            ..Default::default()
        };
        yaml_rules(&mut s);
        assert!(
            outpost_api::pipeline::check_spec(&outpost_api::pipeline::PipelineSpec {
                streams: vec![s.clone()],
                sinks: vec![outpost_api::pipeline::SinkSpec {
                    name: "hub".into(),
                    type_: "hub".into(),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .is_empty(),
            "test stream must be valid"
        );
        StreamRules::new(&s).unwrap()
    }

    fn rule(name: &str, f: impl FnOnce(&mut AnomalyRule)) -> AnomalyRule {
        let mut r = AnomalyRule {
            name: name.into(),
            ..Default::default()
        };
        f(&mut r);
        r
    }

    /// check(stream, [(record, at, expected kinds)])
    fn check(mut s: StreamRules, cases: &[(Value, UnixMs, &[RecordKind])]) {
        for (i, (rec, at, want)) in cases.iter().enumerate() {
            let got: Vec<RecordKind> = s.ingest(rec, Some("t/1"), *at).iter().map(|o| o.kind).collect();
            assert_eq!(&got, want, "case {i}: {rec}");
        }
    }

    #[test]
    fn expressions_evaluate() {
        let rec = json!({"status": 500, "site": "a", "r": {"v": 1.5}, "ok": false});
        for (e, want) in [
            ("status != 200", true),
            ("status == 500 && site == 'a'", true),
            ("r.v > 1 and r.v < 2", true),
            ("missing > 1", false),
            ("missing == null", true),
            ("exists(missing)", false),
            ("exists(r.v)", true),
            ("not ok", true),
            ("status > 'a'", false),
            ("$topic == 't/1'", true),
            ("!(status >= 500) || site != 'a'", false),
        ] {
            let x = Expr::parse(e).unwrap();
            assert_eq!(truthy(&eval(&x, &rec, Some("t/1"))), want, "{e}");
        }
    }

    #[test]
    fn filter_then_anomaly_then_rest() {
        use RecordKind::*;
        let s = stream(|s| {
            s.filter = Some("exists(temp)".into());
            s.anomalies = vec![rule("hot", |r| {
                r.field = Some("temp".into());
                r.above = Some(80.0);
            })];
        });
        check(
            s,
            &[
                (json!({"x": 1}), 0, &[]),
                (json!({"temp": 20}), 1, &[Record]),
                (json!({"temp": 90}), 2, &[Anomaly]),
                (json!({"temp": "95"}), 3, &[Anomaly]),
            ],
        );
    }

    #[test]
    fn deadband_keeps_changes_per_key() {
        use RecordKind::*;
        let s = stream(|s| {
            s.key = Some("id".into());
            s.anomalies = vec![rule("moved", |r| {
                r.field = Some("v".into());
                r.deadband = Some(1.0);
            })];
            s.sample = Some(SampleSpec { every: 1000 });
        });
        check(
            s,
            &[
                (json!({"id": "a", "v": 10}), 0, &[Anomaly]), // first value per key is kept
                (json!({"id": "a", "v": 10.5}), 1, &[Sample]),
                (json!({"id": "a", "v": 11.5}), 2, &[Anomaly]), // 1.5 from the last kept
                (json!({"id": "b", "v": 11.5}), 3, &[Anomaly]),
                (json!({"id": "a", "v": 12.0}), 4, &[]),
            ],
        );
    }

    #[test]
    fn rate_of_change_per_second() {
        use RecordKind::*;
        let s = stream(|s| {
            s.anomalies = vec![rule("jump", |r| {
                r.field = Some("v".into());
                r.rate_of_change = Some(5.0);
            })];
        });
        check(
            s,
            &[
                (json!({"v": 0}), 0, &[Record]),
                (json!({"v": 4}), 1000, &[Record]),   // 4/s
                (json!({"v": 10}), 2000, &[Anomaly]), // 6/s
                (json!({"v": 9}), 2500, &[Record]),   // -2/s
                (json!({"v": 0}), 3000, &[Anomaly]),  // -18/s
            ],
        );
    }

    #[test]
    fn the_articles_example_every_failure_and_stats_every_100() {
        let mut s = stream(|s| {
            s.anomalies = vec![rule("failed", |r| r.when = Some("status != 200".into()))];
            s.aggregate = Some(AggregateSpec {
                count: Some(100),
                fields: vec!["latency_ms".into()],
                ..Default::default()
            });
        });
        let mut out = Vec::new();
        for i in 0..1000 {
            let status = if i % 97 == 0 { 500 } else { 200 };
            out.extend(s.ingest(&json!({"status": status, "latency_ms": i % 50}), None, i));
        }
        let anomalies: Vec<&Out> = out.iter().filter(|o| o.kind == RecordKind::Anomaly).collect();
        assert_eq!(anomalies.len(), 11);
        assert!(anomalies
            .iter()
            .all(|a| a.data["status"] == 500 && a.rules == ["failed"]));
        let aggs: Vec<&Out> = out.iter().filter(|o| o.kind == RecordKind::Aggregate).collect();
        assert_eq!(aggs.len(), 9, "989 ok results: 9 full windows of 100");
        assert_eq!(aggs[0].data["records"], 100);
        assert_eq!(aggs[0].data["fields"]["latency_ms"]["count"], 100);
        assert_eq!(out.len(), 20);
    }

    #[test]
    fn time_windows_per_key_close_on_later_records_and_ticks() {
        let mut s = stream(|s| {
            s.key = Some("id".into());
            s.aggregate = Some(AggregateSpec {
                every: Some("10s".into()),
                fields: vec!["v".into()],
                functions: vec!["count".into(), "min".into(), "max".into(), "mean".into(), "p95".into()],
                ..Default::default()
            });
        });
        for i in 0..100 {
            assert!(s.ingest(&json!({"id": "a", "v": i}), None, 10_000 + i * 10).is_empty());
        }
        assert!(s.ingest(&json!({"id": "b", "v": 7}), None, 19_999).is_empty());
        assert_eq!(s.next_deadline(), Some(20_000));
        let out = s.ingest(&json!({"id": "a", "v": 1}), None, 20_000);
        assert_eq!(out.len(), 2);
        let a = out.iter().find(|o| o.key.as_deref() == Some("a")).unwrap();
        assert_eq!(a.at, 10_000);
        assert_eq!(a.data["window_end"], 20_000);
        let f = &a.data["fields"]["v"];
        assert_eq!(
            (f["count"].clone(), f["min"].clone(), f["max"].clone()),
            (json!(100), json!(0.0), json!(99.0))
        );
        assert_eq!(f["mean"], json!(49.5));
        let p95 = f["p95"].as_f64().unwrap();
        assert!((p95 - 94.0).abs() <= 94.0 * 0.01 + 1.0, "p95 {p95}");
        assert!(s.tick(29_999).is_empty());
        let t = s.tick(30_000);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].data["records"], 1);
        assert!(s.tick(45_000).is_empty(), "no empty windows");
    }

    #[test]
    fn checkpoint_and_replay_rebuild_the_same_state() {
        let make = || {
            stream(|s| {
                s.key = Some("id".into());
                s.anomalies = vec![rule("moved", |r| {
                    r.field = Some("v".into());
                    r.deadband = Some(5.0);
                })];
                s.aggregate = Some(AggregateSpec {
                    count: Some(7),
                    fields: vec!["v".into()],
                    ..Default::default()
                });
            })
        };
        let recs: Vec<Value> = (0..50)
            .map(|i| json!({"id": format!("k{}", i % 3), "v": (i * 7) % 13}))
            .collect();
        let mut whole = make();
        let all: Vec<Out> = recs
            .iter()
            .enumerate()
            .flat_map(|(i, r)| whole.ingest(r, None, i as i64))
            .collect();
        // Crash after 20 records with a checkpoint at 15: restore, replay 15..20 (outputs
        // discarded, they were spooled), then go on.
        let mut first = make();
        let mut out: Vec<Out> = Vec::new();
        let mut cp = Value::Null;
        for (i, r) in recs.iter().enumerate().take(20) {
            if i == 15 {
                cp = first.checkpoint();
            }
            out.extend(first.ingest(r, None, i as i64));
        }
        let mut second = make();
        second.restore(cp).unwrap();
        for (i, r) in recs.iter().enumerate().take(20).skip(15) {
            second.ingest(r, None, i as i64);
        }
        assert_eq!(second.state, first.state);
        for (i, r) in recs.iter().enumerate().skip(20) {
            out.extend(second.ingest(r, None, i as i64));
        }
        assert_eq!(out, all);
    }

    #[test]
    fn sketch_quantiles_stay_within_one_percent() {
        let mut s = Summary::default();
        for i in 1..=10_000 {
            s.add(i as f64 / 10.0);
        }
        let p95 = s.quantile(0.95).unwrap();
        assert!((p95 - 950.0).abs() / 950.0 < 0.01, "{p95}");
        let mut m = Summary::default();
        for v in [-5.0, -1.0, 0.0, 2.0, 3.0] {
            m.add(v);
        }
        assert!((m.quantile(0.0).unwrap() + 5.0).abs() < 0.05);
        assert!((m.quantile(0.5).unwrap()).abs() < 1e-9);
        assert!(m.pos.len() + m.neg.len() <= 4);
    }

    #[test]
    fn pipelines_come_from_the_desired_state_sorted() {
        let w = |ns: &str, name: &str, rev: u64| {
            let spec = crate::render::render_pipeline(
                &serde_json::from_value(json!({
                    "apiVersion": "outpost.dev/v1", "kind": "Pipeline",
                    "metadata": {"name": name, "namespace": ns}, "spec": {"streams": []}
                }))
                .unwrap(),
                rev,
            );
            assert_eq!(spec.key, format!("pipeline/{ns}/{name}"));
            spec
        };
        let mut plain = w("x", "y", 1);
        plain.pipeline = None;
        let all = [w("b", "p", 2), plain, w("a", "q", 7)];
        let got = from_desired(&all);
        let names: Vec<(&str, u64)> = got
            .pipelines
            .iter()
            .map(|p| (p.namespace.as_str(), p.revision))
            .collect();
        assert_eq!(names, [("a", 7), ("b", 2)]);
    }

    #[test]
    fn a_failed_revision_falls_back_to_the_good_one_and_the_gate_says_so() {
        let np = |rev: u64| NodePipeline {
            namespace: "default".into(),
            name: "p".into(),
            revision: rev,
            spec: Default::default(),
        };
        let (v1, v2) = (np(1), np(2));
        // effective: (want, good, failed) -> revision run
        let cases: [(&NodePipeline, Option<&NodePipeline>, Option<u64>, u64); 5] = [
            (&v2, Some(&v1), None, 2),    // not tried yet: the new one
            (&v2, Some(&v1), Some(2), 1), // failed: back to the good one
            (&v2, Some(&v1), Some(1), 2), // an older failure says nothing of this one
            (&v2, None, Some(2), 2),      // nothing to go back to: keep trying it
            (&v2, Some(&v2), Some(2), 2), // the good one is the same revision
        ];
        for (want, good, failed, run) in cases {
            assert_eq!(
                effective(want, good, failed).revision,
                run,
                "{want:?} {good:?} {failed:?}"
            );
        }
        let applied = |rev: u64, err: Option<&str>, running: Option<u64>| Applied {
            revision: rev,
            error: err.map(str::to_string),
            running,
            since: 0,
        };
        let table: [(u64, Option<Applied>, RolloutState); 6] = [
            (2, None, RolloutState::Progressing),
            (2, Some(applied(1, None, Some(1))), RolloutState::Progressing),
            (2, Some(applied(2, None, Some(2))), RolloutState::Complete),
            (2, Some(applied(2, Some("spool"), Some(1))), RolloutState::RolledBack),
            (2, Some(applied(2, Some("spool"), None)), RolloutState::Failed),
            (2, Some(applied(2, Some("spool"), Some(2))), RolloutState::Failed),
        ];
        for (target, a, want) in table {
            let (got, reason) = gate(target, a.as_ref());
            assert_eq!(got, want, "{a:?}");
            assert_eq!(
                reason.is_some(),
                a.as_ref().is_some_and(|a| a.revision == target && a.error.is_some())
            );
        }
        let (_, reason) = gate(2, Some(&applied(2, Some("cannot open the spool"), Some(1))));
        assert!(reason
            .unwrap()
            .contains("cannot open the spool; the node runs revision 1"));
    }
}
