//! The `Pipeline` kind (`apiVersion: outpost.dev/v1`): the edge data pipeline of a node —
//! which MQTT topics and HTTP streams it takes in, the rules that keep anomalies and aggregate
//! the rest, and the sinks results are forwarded to (docs/pipeline.md). Also the filter
//! expression language ([`Expr`]) and its parser: a bad expression is an apply-time error.
//!
//! Nothing here evaluates rules over time (that is `outpost_core::pipeline`) or does I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::duration::parse_duration_secs;
use crate::manifest::{Labels, ObjectMeta};
use crate::parse::parse_memory;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Pipeline {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: PipelineSpec,
}

#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PipelineSpec {
    /// Nodes that run this pipeline (like a DaemonSet); empty: every node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: Labels,
    pub streams: Vec<StreamSpec>,
    #[serde(default)]
    pub sinks: Vec<SinkSpec>,
}

/// One stream: where its records come from, the rules applied to each, where results go.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StreamSpec {
    pub name: String,
    /// MQTT topic filters (`sensors/+/temp`, `cameras/#`) whose messages feed this stream.
    /// HTTP always works: `POST /v1/streams/<name>` on the agent's ingest listener.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mqtt: Vec<String>,
    /// Field path that keys aggregates and per-key rule state; `$topic` for the MQTT topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Records for which this expression is false are dropped before anything else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// A record matching any of these is forwarded exactly as it came, with its time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anomalies: Vec<AnomalyRule>,
    /// Tumbling-window statistics of the records that are not anomalies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<AggregateSpec>,
    /// Forward one in `every` of the records that are not anomalies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample: Option<SampleSpec>,
    /// Names of `spec.sinks` that receive this stream's results.
    #[serde(default)]
    pub sinks: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spool: Option<SpoolSpec>,
    /// A model stage before everything else: each record's feature vector goes to an ONNX
    /// serving workload on the node, and the record becomes its prediction
    /// (docs/inference.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub infer: Option<InferSpec>,
}

/// The model stage of a stream: `{"model": m, "pred": .., "confidence": .., <keep fields>}`
/// replaces each record; the filter, anomaly rules (e.g. `{field: confidence, below: 0.9}`)
/// and windows then apply to predictions.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InferSpec {
    /// The model's name as its serving workload serves it (`/v2/models/<model>`).
    pub model: String,
    /// The serving workload's port on this node (its containerPort, on loopback).
    pub port: u16,
    /// Field path of the feature vector (an array of numbers, nested arrays allowed).
    pub input: String,
    /// Fields copied from the record into its prediction (e.g. a camera id).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep: Vec<String>,
}

/// One anomaly rule: `when` (an expression), or a `field` with `above`/`below` (threshold),
/// `deadband` (the value moved more than this from the last one kept) or `rateOfChange`
/// (more than this many units per second).
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AnomalyRule {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub above: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadband: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_of_change: Option<f64>,
    /// Also raise a `DataAnomaly` node alert (webhooks) when this rule matches.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub alert: bool,
}

#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AggregateSpec {
    /// A time window: `10s`, `1m`, ... (aligned to multiples of the window since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<String>,
    /// A count window: one statistics record per key every `count` records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// Numeric fields to summarize (records without them still count).
    #[serde(default)]
    pub fields: Vec<String>,
    /// Any of count, min, max, mean, p95 (default: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub functions: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SampleSpec {
    pub every: u32,
}

#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpoolSpec {
    /// This stream's share of the node's spool, e.g. `64Mi` (default 64 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<Value>,
    /// `dropOldest` (default) or `rejectNewest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when_full: Option<String>,
}

/// Where results go: `type: hub` (over the agent's link), `nats` (JetStream) or `file`.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SinkSpec {
    pub name: String,
    #[serde(rename = "type")]
    pub type_: String,
    /// hub: how long the hub keeps records (default 7d).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<String>,
    /// nats: `nats://host:4222` or `tls://host:4222`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// nats: subject template; `{node}`, `{pipeline}` and `{stream}` are replaced
    /// (default `outpost.{node}.{stream}`). The subject must belong to a JetStream stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// nats: create this JetStream stream over `outpost.>` if it does not exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jetstream: Option<String>,
    /// nats: a `.creds` file on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creds_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// nats: a CA certificate (PEM file on the node) to verify the server with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// file: an absolute path on the node; records are appended as JSON lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

pub const SINK_TYPES: &[&str] = &["hub", "nats", "file"];
pub const AGG_FUNCTIONS: &[&str] = &["count", "min", "max", "mean", "p95"];
/// Default share of the spool per stream.
pub const DEFAULT_STREAM_BYTES: u64 = 64 << 20;
/// Default hub retention of pipeline records.
pub const DEFAULT_RETENTION_SECS: u64 = 7 * 86400;

/// What to do when a stream's spool budget (or the node's) is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WhenFull {
    DropOldest,
    RejectNewest,
}

impl StreamSpec {
    pub fn budget_bytes(&self) -> u64 {
        self.spool
            .as_ref()
            .and_then(|s| s.max_bytes.as_ref())
            .and_then(|v| parse_memory(v).ok())
            .unwrap_or(DEFAULT_STREAM_BYTES)
    }
    pub fn when_full(&self) -> WhenFull {
        match self.spool.as_ref().and_then(|s| s.when_full.as_deref()) {
            Some("rejectNewest") => WhenFull::RejectNewest,
            _ => WhenFull::DropOldest,
        }
    }
}

impl SinkSpec {
    pub fn retention_secs(&self) -> u64 {
        self.retention
            .as_deref()
            .and_then(|r| parse_duration_secs(r).ok())
            .unwrap_or(DEFAULT_RETENTION_SECS)
    }
}

/// A pipeline as a node receives it (in its sync answer): the spec, resolved, with the
/// revision it has at the hub.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodePipeline {
    pub namespace: String,
    pub name: String,
    pub revision: u64,
    pub spec: PipelineSpec,
}

/// The pipelines of one node, sorted by namespace and name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodePipelines {
    pub pipelines: Vec<NodePipeline>,
}

impl NodePipelines {
    pub fn hash(&self) -> String {
        crate::content_hash(self)
    }
}

// ---------------------------------------------------------------------------------------------
// Records on the wire (agent -> hub sink; operator API)

/// Why a record was forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordKind {
    /// Passed the filter; no aggregate or sample configured.
    Record,
    /// Matched an anomaly rule: the original payload and time.
    Anomaly,
    /// Window statistics.
    Aggregate,
    /// One in N of the rest.
    Sample,
}

impl RecordKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Record => "record",
            RecordKind::Anomaly => "anomaly",
            RecordKind::Aggregate => "aggregate",
            RecordKind::Sample => "sample",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "record" => RecordKind::Record,
            "anomaly" => RecordKind::Anomaly,
            "aggregate" => RecordKind::Aggregate,
            "sample" => RecordKind::Sample,
            _ => return None,
        })
    }
}

/// One forwarded record. `id` is unique per node and never reused (`<spool id>-<seq>`): sinks
/// store each id once, so redelivery after a crash or an outage is harmless.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataRecord {
    pub id: String,
    pub pipeline: String,
    pub stream: String,
    /// Unix ms: when the record reached the node (for aggregates: the window's start).
    pub at: i64,
    pub kind: RecordKind,
    /// The anomaly rules it matched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub data: Value,
}

/// `POST /v1/nodes/{node}/data` (zstd-compressed JSON when `Content-Encoding: zstd`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DataBatch {
    pub records: Vec<DataRecord>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataAck {
    /// Records stored for the first time (the rest were already there).
    pub stored: u64,
}

/// A stored record, as `outpost data tail|query` and `GET /v1/data` return it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredRecord {
    pub node: String,
    /// Order of arrival at the hub; `--follow` asks for records after the last one seen.
    pub cursor: i64,
    #[serde(flatten)]
    pub record: DataRecord,
}

/// One Pipeline as `outpost get pipelines` lists it (`GET /v1/pipelines`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PipelineInfo {
    pub namespace: String,
    pub name: String,
    pub revision: u64,
    pub node_selector: Labels,
    pub streams: Vec<String>,
    pub sinks: Vec<String>,
    /// Nodes the pipeline is placed on (their labels match).
    pub nodes: Vec<String>,
    /// Per node: the revision its rollout gives it, the one it runs and its gate.
    #[serde(default)]
    pub placements: Vec<PipelinePlacement>,
    pub updated_at: i64,
}

/// One node of a pipeline, as `outpost get pipelines` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PipelinePlacement {
    pub node: String,
    pub desired_revision: u64,
    /// The revision the node reported running (its last good one after a fallback).
    pub running_revision: Option<u64>,
    /// The node's gate for the desired revision (Progressing, Complete, RolledBack, Failed).
    pub state: Option<crate::RolloutState>,
    pub reason: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Validation

/// Check a pipeline spec; every problem as (field path, reason).
pub fn check_spec(spec: &PipelineSpec) -> Vec<(String, String)> {
    let mut errs = Vec::new();
    let mut e = |f: String, r: String| errs.push((f, r));
    let mut sink_names = BTreeSet::new();
    for (i, s) in spec.sinks.iter().enumerate() {
        let f = format!("spec.sinks[{i}]");
        if !is_name(&s.name) {
            e(
                format!("{f}.name"),
                format!("{:?} is not a valid name: use a-z, 0-9 and '-'", s.name),
            );
        }
        if !sink_names.insert(s.name.as_str()) {
            e(format!("{f}.name"), format!("sink {:?} is defined twice", s.name));
        }
        let only = |field: &str, set: bool, types: &[&str], e: &mut dyn FnMut(String, String)| {
            if set && !types.contains(&s.type_.as_str()) {
                e(
                    format!("{f}.{field}"),
                    format!("not used by a sink of type {}", s.type_),
                );
            }
        };
        match s.type_.as_str() {
            "hub" => {
                if let Some(r) = &s.retention {
                    match parse_duration_secs(r) {
                        Ok(0) => e(format!("{f}.retention"), "must be more than 0".into()),
                        Ok(_) => {}
                        Err(x) => e(format!("{f}.retention"), x),
                    }
                }
            }
            "nats" => {
                match s.url.as_deref() {
                    None => e(
                        format!("{f}.url"),
                        "required for a nats sink, e.g. nats://hq.example.com:4222".into(),
                    ),
                    Some(u) if !(u.starts_with("nats://") || u.starts_with("tls://")) => {
                        e(format!("{f}.url"), format!("{u:?} must start with nats:// or tls://"))
                    }
                    _ => {}
                }
                if let Some(sub) = &s.subject {
                    if sub.is_empty() || sub.contains(' ') || sub.contains('*') || sub.contains('>') {
                        e(
                            format!("{f}.subject"),
                            format!("{sub:?} is not a NATS subject to publish to (no spaces or wildcards)"),
                        );
                    }
                }
                if s.password.is_some() != s.user.is_some() {
                    e(format!("{f}.user"), "user and password go together".into());
                }
            }
            "file" => match s.path.as_deref() {
                None => e(
                    format!("{f}.path"),
                    "required for a file sink: an absolute path on the node".into(),
                ),
                Some(p) if !p.starts_with('/') => e(format!("{f}.path"), format!("{p:?} must be an absolute path")),
                _ => {}
            },
            other => e(
                format!("{f}.type"),
                format!("{other:?} is not a sink type; use one of {}", SINK_TYPES.join(", ")),
            ),
        }
        only("retention", s.retention.is_some(), &["hub"], &mut e);
        for (field, set) in [
            ("url", s.url.is_some()),
            ("subject", s.subject.is_some()),
            ("jetstream", s.jetstream.is_some()),
            ("credsFile", s.creds_file.is_some()),
            ("user", s.user.is_some()),
            ("token", s.token.is_some()),
            ("caFile", s.ca_file.is_some()),
        ] {
            only(field, set, &["nats"], &mut e);
        }
        only("path", s.path.is_some(), &["file"], &mut e);
    }
    if spec.streams.is_empty() {
        e("spec.streams".into(), "at least one stream is required".into());
    }
    let mut stream_names = BTreeSet::new();
    for (i, st) in spec.streams.iter().enumerate() {
        let f = format!("spec.streams[{i}]");
        if !is_name(&st.name) {
            e(
                format!("{f}.name"),
                format!("{:?} is not a valid stream name: use a-z, 0-9 and '-'", st.name),
            );
        }
        if !stream_names.insert(st.name.as_str()) {
            e(format!("{f}.name"), format!("stream {:?} is defined twice", st.name));
        }
        for (j, t) in st.mqtt.iter().enumerate() {
            if let Err(r) = check_topic_filter(t) {
                e(format!("{f}.mqtt[{j}]"), r);
            }
        }
        if let Some(k) = &st.key {
            if let Err(r) = check_path(k) {
                e(format!("{f}.key"), r);
            }
        }
        if let Some(x) = &st.filter {
            if let Err(r) = Expr::parse(x) {
                e(format!("{f}.filter"), r);
            }
        }
        let mut rule_names = BTreeSet::new();
        for (j, a) in st.anomalies.iter().enumerate() {
            let g = format!("{f}.anomalies[{j}]");
            if !is_name(&a.name) {
                e(
                    format!("{g}.name"),
                    format!("{:?} is not a valid rule name: use a-z, 0-9 and '-'", a.name),
                );
            }
            if !rule_names.insert(a.name.as_str()) {
                e(format!("{g}.name"), format!("rule {:?} is defined twice", a.name));
            }
            let kinds = a.when.is_some() as u8
                + (a.above.is_some() || a.below.is_some()) as u8
                + a.deadband.is_some() as u8
                + a.rate_of_change.is_some() as u8;
            if kinds != 1 {
                e(
                    g.clone(),
                    "set exactly one of: when (an expression), above/below (a threshold), deadband, rateOfChange"
                        .into(),
                );
            }
            if let Some(x) = &a.when {
                if let Err(r) = Expr::parse(x) {
                    e(format!("{g}.when"), r);
                }
                if a.field.is_some() {
                    e(
                        format!("{g}.field"),
                        "not used with when; name the field in the expression".into(),
                    );
                }
            } else if kinds == 1 {
                match &a.field {
                    None => e(
                        format!("{g}.field"),
                        "required: the numeric field this rule watches".into(),
                    ),
                    Some(p) => {
                        if let Err(r) = check_path(p) {
                            e(format!("{g}.field"), r);
                        }
                    }
                }
            }
            for (name, v) in [
                ("above", a.above),
                ("below", a.below),
                ("deadband", a.deadband),
                ("rateOfChange", a.rate_of_change),
            ] {
                if v.is_some_and(|v| !v.is_finite()) {
                    e(format!("{g}.{name}"), "must be a finite number".into());
                }
            }
            for (name, v) in [("deadband", a.deadband), ("rateOfChange", a.rate_of_change)] {
                if v.is_some_and(|v| v <= 0.0) {
                    e(format!("{g}.{name}"), "must be more than 0".into());
                }
            }
        }
        if let Some(inf) = &st.infer {
            let g = format!("{f}.infer");
            if inf.model.is_empty()
                || !inf
                    .model
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                e(
                    format!("{g}.model"),
                    format!(
                        "{:?} is not a model name like digits (letters, digits, '.', '_', '-')",
                        inf.model
                    ),
                );
            }
            if inf.port == 0 {
                e(
                    format!("{g}.port"),
                    "required: the serving workload's containerPort".into(),
                );
            }
            for (name, p) in std::iter::once(("input", &inf.input)).chain(inf.keep.iter().map(|k| ("keep", k))) {
                if let Err(r) = check_path(p) {
                    e(format!("{g}.{name}"), r);
                }
            }
        }
        if let Some(ag) = &st.aggregate {
            let g = format!("{f}.aggregate");
            match (&ag.every, ag.count) {
                (Some(_), Some(_)) | (None, None) => e(
                    g.clone(),
                    "set exactly one of every (a duration) or count (records)".into(),
                ),
                (Some(d), None) => match parse_duration_secs(d) {
                    Ok(0) => e(format!("{g}.every"), "must be more than 0".into()),
                    Ok(_) => {}
                    Err(x) => e(format!("{g}.every"), x),
                },
                (None, Some(0)) => e(format!("{g}.count"), "must be at least 1".into()),
                _ => {}
            }
            for (j, p) in ag.fields.iter().enumerate() {
                if let Err(r) = check_path(p) {
                    e(format!("{g}.fields[{j}]"), r);
                }
            }
            for (j, fun) in ag.functions.iter().enumerate() {
                if !AGG_FUNCTIONS.contains(&fun.as_str()) {
                    e(
                        format!("{g}.functions[{j}]"),
                        format!("{fun:?} is not one of {}", AGG_FUNCTIONS.join(", ")),
                    );
                }
            }
        }
        if st.sample.as_ref().is_some_and(|s| s.every == 0) {
            e(format!("{f}.sample.every"), "must be at least 1".into());
        }
        if st.sinks.is_empty() {
            e(format!("{f}.sinks"), "name at least one sink of spec.sinks".into());
        }
        for (j, s) in st.sinks.iter().enumerate() {
            if !spec.sinks.iter().any(|d| &d.name == s) {
                e(
                    format!("{f}.sinks[{j}]"),
                    format!(
                        "no sink named {s:?} in spec.sinks (defined: {})",
                        if sink_names.is_empty() {
                            "none".to_string()
                        } else {
                            sink_names.iter().copied().collect::<Vec<_>>().join(", ")
                        }
                    ),
                );
            }
        }
        if let Some(sp) = &st.spool {
            if let Some(v) = &sp.max_bytes {
                if let Err(r) = parse_memory(v) {
                    e(format!("{f}.spool.maxBytes"), r);
                }
            }
            if let Some(w) = &sp.when_full {
                if w != "dropOldest" && w != "rejectNewest" {
                    e(
                        format!("{f}.spool.whenFull"),
                        format!("{w:?} is not dropOldest or rejectNewest"),
                    );
                }
            }
        }
    }
    errs
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

/// An MQTT topic filter: `+` and `#` only as whole levels, `#` only last.
pub fn check_topic_filter(t: &str) -> Result<(), String> {
    if t.is_empty() {
        return Err("an empty topic filter matches nothing".into());
    }
    let levels: Vec<&str> = t.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i != levels.len() - 1) {
            return Err(format!("{t:?}: '#' must be a whole level and the last one"));
        }
        if l.contains('+') && *l != "+" {
            return Err(format!("{t:?}: '+' must be a whole level"));
        }
    }
    Ok(())
}

/// Does an MQTT topic match a (checked) filter?
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return !topic.starts_with('$'),
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn check_path(p: &str) -> Result<(), String> {
    if p == "$topic" {
        return Ok(());
    }
    let ok = !p.is_empty()
        && p.split('.')
            .all(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!("{p:?} is not a field path like temp or reading.value"))
    }
}

// ---------------------------------------------------------------------------------------------
// Expressions

/// A filter or `when` expression over a record's JSON fields:
/// `status != 200 && (temp > 80 || exists(alarm))`. Operators: `== != < <= > >=`, `&& || !`
/// (also `and or not`), parentheses; operands: field paths (`reading.value`, `$topic`),
/// numbers, "strings" or 'strings', true, false, null, and `exists(path)`.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Lit(Value),
    Path(Vec<String>),
    Exists(Vec<String>),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Cmp(CmpOp, Box<Expr>, Box<Expr>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Num(f64),
    Str(String),
    Ident(String),
    Op(&'static str),
    LParen,
    RParen,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Num(n) => write!(f, "{n}"),
            Tok::Str(s) => write!(f, "{s:?}"),
            Tok::Ident(s) => f.write_str(s),
            Tok::Op(o) => f.write_str(o),
            Tok::LParen => f.write_str("("),
            Tok::RParen => f.write_str(")"),
        }
    }
}

fn lex(s: &str) -> Result<Vec<Tok>, String> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'(' => {
                out.push(Tok::LParen);
                i += 1
            }
            b')' => {
                out.push(Tok::RParen);
                i += 1
            }
            b'"' | b'\'' => {
                let end = s[i + 1..]
                    .find(c as char)
                    .ok_or_else(|| format!("unterminated string starting at column {}", i + 1))?;
                out.push(Tok::Str(s[i + 1..i + 1 + end].to_string()));
                i += end + 2;
            }
            b'0'..=b'9' | b'-' if c != b'-' || b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                let start = i;
                i += 1;
                while i < b.len() && (b[i].is_ascii_digit() || matches!(b[i], b'.' | b'e' | b'E')) {
                    i += 1;
                }
                let n: f64 = s[start..i]
                    .parse()
                    .map_err(|_| format!("{:?} is not a number", &s[start..i]))?;
                out.push(Tok::Num(n));
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c == b'$' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || matches!(b[i], b'_' | b'$' | b'.' | b'-')) {
                    i += 1;
                }
                out.push(Tok::Ident(s[start..i].to_string()));
            }
            _ => {
                let two = s.get(i..i + 2).unwrap_or("");
                let op = ["==", "!=", "<=", ">=", "&&", "||"].into_iter().find(|o| *o == two);
                if let Some(o) = op {
                    out.push(Tok::Op(o));
                    i += 2;
                } else {
                    let one = match c {
                        b'<' => "<",
                        b'>' => ">",
                        b'!' => "!",
                        b'=' => return Err(format!("'=' at column {}: compare with ==", i + 1)),
                        _ => return Err(format!("unexpected character {:?} at column {}", c as char, i + 1)),
                    };
                    out.push(Tok::Op(one));
                    i += 1;
                }
            }
        }
    }
    Ok(out)
}

struct P {
    toks: Vec<Tok>,
    pos: usize,
}

impl P {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }
    fn is_word(&self, w: &str) -> bool {
        matches!(self.peek(), Some(Tok::Ident(s)) if s == w)
    }
    fn or(&mut self) -> Result<Expr, String> {
        let mut l = self.and()?;
        while matches!(self.peek(), Some(Tok::Op("||"))) || self.is_word("or") {
            self.next();
            l = Expr::Or(Box::new(l), Box::new(self.and()?));
        }
        Ok(l)
    }
    fn and(&mut self) -> Result<Expr, String> {
        let mut l = self.not()?;
        while matches!(self.peek(), Some(Tok::Op("&&"))) || self.is_word("and") {
            self.next();
            l = Expr::And(Box::new(l), Box::new(self.not()?));
        }
        Ok(l)
    }
    fn not(&mut self) -> Result<Expr, String> {
        if matches!(self.peek(), Some(Tok::Op("!"))) || self.is_word("not") {
            self.next();
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        self.cmp()
    }
    fn cmp(&mut self) -> Result<Expr, String> {
        let l = self.primary()?;
        let op = match self.peek() {
            Some(Tok::Op("==")) => CmpOp::Eq,
            Some(Tok::Op("!=")) => CmpOp::Ne,
            Some(Tok::Op("<")) => CmpOp::Lt,
            Some(Tok::Op("<=")) => CmpOp::Le,
            Some(Tok::Op(">")) => CmpOp::Gt,
            Some(Tok::Op(">=")) => CmpOp::Ge,
            _ => return Ok(l),
        };
        self.next();
        let r = self.primary()?;
        Ok(Expr::Cmp(op, Box::new(l), Box::new(r)))
    }
    fn primary(&mut self) -> Result<Expr, String> {
        match self.next() {
            Some(Tok::Num(n)) => Ok(Expr::Lit(serde_json::json!(n))),
            Some(Tok::Str(s)) => Ok(Expr::Lit(Value::String(s))),
            Some(Tok::LParen) => {
                let e = self.or()?;
                match self.next() {
                    Some(Tok::RParen) => Ok(e),
                    Some(t) => Err(format!("expected ')' but found {t}")),
                    None => Err("missing ')' at the end".into()),
                }
            }
            Some(Tok::Ident(w)) => match w.as_str() {
                "true" => Ok(Expr::Lit(Value::Bool(true))),
                "false" => Ok(Expr::Lit(Value::Bool(false))),
                "null" => Ok(Expr::Lit(Value::Null)),
                "and" | "or" | "not" => Err(format!("{w:?} needs an operand before it")),
                "exists" if matches!(self.peek(), Some(Tok::LParen)) => {
                    self.next();
                    let path = match self.next() {
                        Some(Tok::Ident(p)) => {
                            check_path(&p)?;
                            split_path(&p)
                        }
                        other => {
                            return Err(format!(
                                "exists() takes a field path, found {}",
                                other.map_or("nothing".to_string(), |t| t.to_string())
                            ))
                        }
                    };
                    match self.next() {
                        Some(Tok::RParen) => Ok(Expr::Exists(path)),
                        _ => Err("exists(path) takes one field path and a ')'".into()),
                    }
                }
                _ => {
                    check_path(&w)?;
                    Ok(Expr::Path(split_path(&w)))
                }
            },
            Some(t) => Err(format!("unexpected {t}: expected a field, a value or '('")),
            None => Err("the expression ends too early".into()),
        }
    }
}

fn split_path(p: &str) -> Vec<String> {
    if p == "$topic" {
        return vec![p.to_string()];
    }
    p.split('.').map(str::to_string).collect()
}

impl Expr {
    pub fn parse(s: &str) -> Result<Expr, String> {
        let toks = lex(s).map_err(|e| format!("{s:?} does not parse: {e}"))?;
        if toks.is_empty() {
            return Err("empty expression".into());
        }
        let mut p = P { toks, pos: 0 };
        let e = p.or().map_err(|e| format!("{s:?} does not parse: {e}"))?;
        if let Some(t) = p.peek() {
            return Err(format!(
                "{s:?} does not parse: unexpected {t} after a complete expression"
            ));
        }
        Ok(e)
    }
}

/// Look a field path up in a record; `$topic` is the MQTT topic the record came on.
pub fn lookup<'a>(v: &'a Value, path: &[String], topic: Option<&'a str>) -> Option<std::borrow::Cow<'a, Value>> {
    if path.len() == 1 && path[0] == "$topic" {
        return topic.map(|t| std::borrow::Cow::Owned(Value::String(t.to_string())));
    }
    let mut cur = v;
    for p in path {
        cur = cur.get(p.as_str())?;
    }
    Some(std::borrow::Cow::Borrowed(cur))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expressions_parse_or_say_why() {
        for good in [
            "status != 200",
            "temp > 80 && (site == 'a' || exists(alarm))",
            "not ok or reading.value >= -1.5e3",
            "$topic == \"sensors/1\"",
            "!(a < 1)",
        ] {
            assert!(Expr::parse(good).is_ok(), "{good}: {:?}", Expr::parse(good));
        }
        for (bad, why) in [
            ("status = 200", "compare with =="),
            ("temp >", "ends too early"),
            ("(a > 1", "missing ')'"),
            ("a > 1 b", "unexpected b"),
            ("'open", "unterminated string"),
            ("a # 1", "unexpected character '#'"),
            ("", "empty expression"),
            ("exists(1)", "exists() takes a field path"),
        ] {
            let e = Expr::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    proptest::proptest! {
        /// Expressions come from operators' manifests: any text parses or is refused with a
        /// message, never a panic.
        #[test]
        fn any_text_parses_or_is_refused(s in ".{0,64}", t in "[a-z0-9 ._$()<>=!&|'\"-]{0,48}") {
            let _ = Expr::parse(&s);
            if let Err(e) = Expr::parse(&t) {
                proptest::prop_assert!(!e.is_empty());
            }
        }

        #[test]
        fn any_topic_filter_is_checked_without_panic(f in "[a-z+#/]{0,24}", t in "[a-z/]{0,24}") {
            if check_topic_filter(&f).is_ok() {
                let _ = topic_matches(&f, &t);
            }
        }
    }

    #[test]
    fn topic_filters() {
        assert!(topic_matches("sensors/+/temp", "sensors/a/temp"));
        assert!(!topic_matches("sensors/+/temp", "sensors/a/b/temp"));
        assert!(topic_matches("sensors/#", "sensors/a/b"));
        assert!(topic_matches("sensors/#", "sensors"));
        assert!(!topic_matches("#", "$SYS/x"));
        assert!(topic_matches("a", "a"));
        assert!(!topic_matches("a", "a/b"));
        assert!(check_topic_filter("a/#/b").is_err());
        assert!(check_topic_filter("a/b+").is_err());
    }
}

#[cfg(test)]
mod apply_tests {
    use crate::parse_file;

    const GOOD: &str = "apiVersion: outpost.dev/v1
kind: Pipeline
metadata: {name: results}
spec:
  nodeSelector: {site: store-001}
  streams:
  - name: inference
    mqtt: [results/#]
    key: camera
    anomalies:
    - {name: failed, when: 'status != 200', alert: true}
    - {name: hot, field: temp, above: 80}
    aggregate: {count: 100, fields: [latency_ms]}
    sinks: [hub, hq]
    spool: {maxBytes: 16Mi, whenFull: rejectNewest}
  sinks:
  - {name: hub, type: hub, retention: 3d}
  - {name: hq, type: nats, url: 'nats://hq.example.com:4222', subject: 'outpost.{node}.{stream}'}
";

    #[test]
    fn accepts_the_articles_pipeline() {
        let p = parse_file("p.yaml", GOOD).unwrap();
        assert_eq!(p.objects[0].id().to_string(), "Pipeline/default/results");
        let back: crate::Object = serde_json::from_value(serde_json::to_value(&p.objects[0]).unwrap()).unwrap();
        assert_eq!(back, p.objects[0]);
    }

    #[test]
    fn bad_pipelines_are_rejected_with_the_field_named() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "    key: camera\n",
                "    key: camera\n    colour: red\n",
                "spec.streams[0].colour: unknown field `colour`",
            ),
            (
                "    key: camera\n",
                "    key: camera\n    infer: {model: 'digits v2', port: 5000, input: features}\n",
                "spec.streams[0].infer.model: \"digits v2\" is not a model name",
            ),
            (
                "    key: camera\n",
                "    key: camera\n    infer: {model: digits, port: 0, input: features}\n",
                "spec.streams[0].infer.port: required",
            ),
            (
                "    key: camera\n",
                "    key: camera\n    infer: {model: digits, port: 5000, input: 'a..b'}\n",
                "spec.streams[0].infer.input: \"a..b\" is not a field path",
            ),
            (
                "    key: camera\n",
                "    key: camera\n    infer: {model: digits, port: 5000, input: features, shape: [64]}\n",
                "spec.streams[0].infer.shape: unknown field `shape`",
            ),
            (
                "'status != 200'",
                "'status = 200'",
                "spec.streams[0].anomalies[0].when: \"status = 200\" does not parse",
            ),
            (
                "sinks: [hub, hq]",
                "sinks: [hub, warehouse]",
                "spec.streams[0].sinks[1]: no sink named \"warehouse\" in spec.sinks (defined: hq, hub)",
            ),
            (
                "{count: 100,",
                "{count: 100, every: 1m,",
                "spec.streams[0].aggregate: set exactly one of every",
            ),
            (
                "type: nats, url: 'nats://",
                "type: nats, url: 'http://",
                "spec.sinks[1].url: \"http://hq.example.com:4222\" must start with nats://",
            ),
            ("mqtt: [results/#]", "mqtt: ['results/#/x']", "spec.streams[0].mqtt[0]"),
            (
                "whenFull: rejectNewest",
                "whenFull: dropNewest",
                "spec.streams[0].spool.whenFull",
            ),
            (
                "field: temp, above: 80",
                "field: temp, above: 80, deadband: 1",
                "spec.streams[0].anomalies[1]: set exactly one of",
            ),
            (
                "type: hub, retention",
                "type: hubb, retention",
                "spec.sinks[0].type: \"hubb\" is not a sink type",
            ),
        ];
        for (from, to, want) in cases {
            assert!(GOOD.contains(from), "{from}");
            let yaml = GOOD.replacen(from, to, 1);
            let got = match parse_file("p.yaml", &yaml) {
                Ok(_) => panic!("accepted: {to}"),
                Err(e) => e.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"),
            };
            assert!(got.contains(want), "for {to:?}\n want: {want}\n got:  {got}");
            assert!(got.contains("(Pipeline results)"), "names the document: {got}");
        }
    }
}
