//! Parsing and validation of manifest files.
//!
//! [`parse_file`] turns YAML text (several `---` documents) into typed [`Object`]s. It collects
//! every error rather than stopping at the first, and never returns objects when any document is
//! rejected, so callers store all or nothing.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::checks::{
    host_path_mounts, no_control, no_nul, normalize_path, validate_image_ref, validate_label_key, validate_label_value,
};
use crate::duration::parse_duration_secs;
use crate::manifest::*;

/// The runtime class that runs containers as native processes.
pub const PROCESS_RUNTIME: &str = "process";
/// The runtime class whose containers each serve an ONNX model named by `image`
/// (docs/inference.md).
pub const ONNX_RUNTIME: &str = "onnx";

/// The deepest nesting of mappings and sequences a manifest may have. Real manifests stay
/// under 15 levels (a Deployment's probe header is 10 deep); the limit keeps every recursive
/// step after the YAML parser (building the document, typing it, dropping it) far from the end
/// of a thread's stack, on the hub and in the CLI.
pub const MAX_NESTING_DEPTH: usize = 64;
/// The most documents one file may hold.
pub const MAX_DOCUMENTS_PER_FILE: usize = 1_000;
/// The largest manifest file accepted, in bytes (Kubernetes caps one object at about 1.5 MiB;
/// the hub caps a whole request at 16 MiB).
pub const MAX_FILE_BYTES: usize = 8 << 20;
/// The most nodes (mappings, sequences and scalars) in one file.
pub const MAX_NODES_PER_FILE: usize = 250_000;
/// The most replicas a Deployment may ask for. outpost runs at most one replica per node, and a
/// hub is sized for 100,000 nodes; a DaemonSet runs on every matching node.
pub const MAX_REPLICAS: u32 = 100_000;
/// The largest CPU limit: 1,000 cores, in millicores.
pub const MAX_CPU_MILLIS: u64 = 1_000_000;
/// The smallest CPU limit a node can enforce (cgroup quota of 1 ms per 100 ms period): 10m.
pub const MIN_CPU_MILLIS: u64 = 10;
/// The largest memory limit: 1 PiB.
pub const MAX_MEMORY_BYTES: u64 = 1 << 50;
/// The smallest memory limit the Docker Engine accepts for a container: 6 MiB.
pub const MIN_DOCKER_MEMORY_BYTES: u64 = 6 << 20;
/// The longest terminationGracePeriodSeconds: one day.
pub const MAX_GRACE_SECONDS: i64 = 86_400;
/// The node ports a `type: NodePort` Service may name, and the hub assigns from (Kubernetes').
pub const NODE_PORT_RANGE: std::ops::RangeInclusive<u16> = 30000..=32767;
/// Kinds that only mean something to a Kubernetes cluster: accepted with a warning, not stored.
pub const CLUSTER_ONLY_KINDS: &[&str] = &[
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ClusterRole",
    "ClusterRoleBinding",
    "StorageClass",
    "PodDisruptionBudget",
    "NetworkPolicy",
    "PodSecurityPolicy",
    "PriorityClass",
    "ResourceQuota",
    "LimitRange",
    "HorizontalPodAutoscaler",
    "RuntimeClass",
];
/// The hostPath types outpost honours ("" checks nothing and creates a missing directory).
pub const HOST_PATH_TYPES: &[&str] = &[
    "",
    "Directory",
    "DirectoryOrCreate",
    "File",
    "FileOrCreate",
    "Socket",
    "CharDevice",
    "BlockDevice",
];
/// The largest uid or gid `runAsUser`/`runAsGroup` may name.
pub const MAX_ID: i64 = u32::MAX as i64 - 1;
/// The capabilities a container may add or drop (`ALL`, and Linux's names with or without `CAP_`).
pub const CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// A capability name as Linux numbers it (`NET_ADMIN`, `cap_net_admin`): its index, or None.
pub fn capability_number(name: &str) -> Option<u32> {
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    CAPABILITIES.iter().position(|c| *c == bare).map(|i| i as u32)
}

/// Parsed documents, and warnings about accepted-but-not-enforced fields.
#[derive(Debug, Default)]
pub struct Parsed {
    pub objects: Vec<Object>,
    /// For each object, the document it came from as messages name it
    /// (`app.yaml document 2 (Deployment web)`).
    pub documents: Vec<String>,
    pub warnings: Vec<Warning>,
}

/// Parse every document of one file. `file` names the file in messages.
pub fn parse_file(file: &str, text: &str) -> Result<Parsed, Vec<ManifestError>> {
    let whole = |reason: String| {
        Err(vec![ManifestError {
            document: file.to_string(),
            field: "(file)".into(),
            reason,
        }])
    };
    if text.len() > MAX_FILE_BYTES {
        return whole(format!(
            "{} bytes is more than the {} MiB a manifest file may have; split it into several files",
            text.len(),
            MAX_FILE_BYTES >> 20
        ));
    }
    let docs: Vec<Value> = match serde_saphyr::from_multiple_with_options::<Value>(text, yaml_options()) {
        Ok(d) => d,
        Err(e) => return Err(vec![yaml_error(file, text, &e)]),
    };
    let mut out = Parsed::default();
    let mut errors = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let mut ctx = Ctx::new(format!("{file} document {}", i + 1));
        if let Some(obj) = parse_document(&mut ctx, doc) {
            let id = obj.id();
            if !seen.insert(id.clone()) {
                ctx.err("metadata.name", format!("{id} appears more than once in this file"));
            } else if ctx.errors.is_empty() {
                out.objects.push(obj);
                out.documents.push(ctx.document.clone());
            }
        }
        errors.append(&mut ctx.errors);
        out.warnings.append(&mut ctx.warnings);
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// serde-saphyr's budget with outpost's limits; breaches stop the parser before anything
/// recurses deeper than [`MAX_NESTING_DEPTH`].
fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::Options {
        budget: Some(serde_saphyr::Budget {
            max_depth: MAX_NESTING_DEPTH,
            max_documents: MAX_DOCUMENTS_PER_FILE,
            max_nodes: MAX_NODES_PER_FILE,
            max_reader_input_bytes: Some(MAX_FILE_BYTES),
            ..serde_saphyr::Budget::default()
        }),
        with_snippet: false,
        ..serde_saphyr::Options::default()
    }
}

/// A YAML-level error, naming the document by the line it happened on.
fn yaml_error(file: &str, text: &str, e: &serde_saphyr::Error) -> ManifestError {
    use serde_saphyr::budget::BudgetBreach;
    let line = e.location().map(|l| l.line() as usize).filter(|l| *l > 0);
    let document = match line {
        Some(line) => format!("{file} document {} (line {line})", document_at_line(text, line)),
        None => file.to_string(),
    };
    let nesting = || {
        format!(
            "nested deeper than {MAX_NESTING_DEPTH} levels of mappings and sequences, the limit for a manifest; \
             flatten the structure (outpost manifests need far fewer levels)"
        )
    };
    let reason = match e {
        serde_saphyr::Error::Budget { breach, .. } => match breach {
            BudgetBreach::Depth { .. } => nesting(),
            BudgetBreach::Documents { .. } => {
                format!("more than {MAX_DOCUMENTS_PER_FILE} documents in one file; split it into several files")
            }
            BudgetBreach::Nodes { .. } => {
                format!("more than {MAX_NODES_PER_FILE} values in one file; split it into several files")
            }
            other => format!("refused: the YAML exceeds a parser limit ({other:?}); simplify the file"),
        },
        // The parser's own guard (flow collections) says the same thing in other words.
        other if other.to_string().contains("recursion limit exceeded") => nesting(),
        other => format!("not valid YAML: {}", first_line(&other.to_string())),
    };
    ManifestError {
        document,
        field: "(yaml)".into(),
        reason,
    }
}

/// The 1-based number of the document holding `line` (1-based): documents are separated by
/// lines starting with `---`; one before any content only opens the first document.
fn document_at_line(text: &str, line: usize) -> usize {
    let mut doc = 1;
    let mut content = false;
    for l in text.lines().take(line.saturating_sub(1)) {
        if l.starts_with("---") {
            if content {
                doc += 1;
            }
            content = true; // the separator opens a document
        } else if !l.trim().is_empty() && !l.trim_start().starts_with('#') && !l.starts_with('%') {
            content = true;
        }
    }
    doc
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

struct Ctx {
    document: String,
    errors: Vec<ManifestError>,
    warnings: Vec<Warning>,
}

impl Ctx {
    fn new(document: String) -> Self {
        Self {
            document,
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }
    fn err(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(ManifestError {
            document: self.document.clone(),
            field: field.into(),
            reason: reason.into(),
        });
    }
    fn warn(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Warning {
            document: self.document.clone(),
            field: field.into(),
            message: message.into(),
        });
    }
}

fn typed<T: DeserializeOwned>(ctx: &mut Ctx, doc: Value) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(doc) {
        Ok(v) => Some(v),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            let reason = match inner.strip_prefix("unknown field ") {
                Some(rest) => format!(
                    "unknown field {}: outpost does not support it; remove it or check its spelling",
                    rest.split(',').next().unwrap_or(rest)
                ),
                None => inner,
            };
            ctx.err(if path == "." { "(document)".to_string() } else { path }, reason);
            None
        }
    }
}

fn parse_document(ctx: &mut Ctx, doc: Value) -> Option<Object> {
    let Some(map) = doc.as_object() else {
        ctx.err(
            "(document)",
            "a manifest document must be a mapping with apiVersion, kind and metadata",
        );
        return None;
    };
    let kind = map.get("kind").and_then(Value::as_str).unwrap_or("").to_string();
    let api = map.get("apiVersion").and_then(Value::as_str).unwrap_or("").to_string();
    if let Some(name) = map.get("metadata").and_then(|m| m.get("name")).and_then(Value::as_str) {
        ctx.document = format!("{} ({kind} {name})", ctx.document);
    }
    if CLUSTER_ONLY_KINDS.contains(&kind.as_str()) {
        ctx.warn(
            "kind",
            format!(
                "{kind} has no effect on outpost (nodes have no Kubernetes API, RBAC, storage classes or \
                 cluster network): accepted and not stored; the workloads of this file run without it"
            ),
        );
        return None;
    }
    let expected_api = match kind.as_str() {
        "Deployment" | "DaemonSet" => "apps/v1",
        "ConfigMap" | "Secret" | "Service" | "PersistentVolumeClaim" | "Namespace" => "v1",
        "Job" => "batch/v1",
        "CronJob" if api == "batch/v1beta1" => {
            ctx.warn(
                "apiVersion",
                "batch/v1beta1 was removed in Kubernetes 1.25; read as batch/v1 (the fields are the same)",
            );
            "batch/v1beta1"
        }
        "CronJob" => "batch/v1",
        "AlertPolicy" | "AgentUpdate" | "RolloutPolicy" | "Pipeline" | "GitRepo" => ALERT_POLICY_API,
        "" => {
            ctx.err(
                "kind",
                "missing: every document needs a kind (Deployment, DaemonSet, ConfigMap or Secret)",
            );
            return None;
        }
        other => {
            ctx.err(
                "kind",
                format!(
                    "{other} is not supported by outpost; supported kinds are Deployment, DaemonSet, Job, CronJob, \
                     ConfigMap, Secret, Service, PersistentVolumeClaim, Namespace, AlertPolicy, RolloutPolicy, \
                     Pipeline, GitRepo and AgentUpdate (cluster-only kinds such as ServiceAccount or ClusterRole are accepted \
                     and ignored)"
                ),
            );
            return None;
        }
    };
    if api != expected_api {
        ctx.err(
            "apiVersion",
            format!("{kind} must use apiVersion {expected_api}, found {api:?}"),
        );
        return None;
    }
    let obj = match kind.as_str() {
        "Deployment" => Object::Deployment(typed(ctx, doc)?),
        "DaemonSet" => Object::DaemonSet(typed(ctx, doc)?),
        "ConfigMap" => Object::ConfigMap(typed(ctx, doc)?),
        "Service" => Object::Service(typed(ctx, doc)?),
        "AlertPolicy" => Object::AlertPolicy(typed(ctx, doc)?),
        "Job" => Object::Job(typed(ctx, doc)?),
        "CronJob" => Object::CronJob(typed(ctx, doc)?),
        "PersistentVolumeClaim" => Object::PersistentVolumeClaim(typed(ctx, doc)?),
        "Namespace" => Object::Namespace(typed(ctx, doc)?),
        "AgentUpdate" => Object::AgentUpdate(typed(ctx, doc)?),
        "RolloutPolicy" => Object::RolloutPolicy(typed(ctx, doc)?),
        "Pipeline" => Object::Pipeline(typed(ctx, doc)?),
        "GitRepo" => Object::GitRepo(typed(ctx, doc)?),
        _ => Object::Secret(typed(ctx, doc)?),
    };
    validate_meta(ctx, obj.meta());
    for (field, reason) in crate::site::check_object(&obj) {
        ctx.err(field, reason);
    }
    match &obj {
        Object::Deployment(d) => {
            validate_selector(ctx, d.spec.selector.as_ref(), &d.spec.template);
            validate_pod(ctx, "spec.template.spec", &d.spec.template.spec);
            validate_strategy(
                ctx,
                "spec.strategy",
                d.spec.strategy.as_ref(),
                &["Recreate", "RollingUpdate"],
            );
            if d.spec.progress_deadline_seconds == Some(0) {
                ctx.err("spec.progressDeadlineSeconds", "must be at least 1");
            }
            if d.spec.replicas > MAX_REPLICAS {
                ctx.err(
                    "spec.replicas",
                    format!(
                        "{} is more than {MAX_REPLICAS}, the most outpost schedules (at most one replica per node); \
                         use a DaemonSet to run on every matching node",
                        d.spec.replicas
                    ),
                );
            }
        }
        Object::DaemonSet(d) => {
            validate_selector(ctx, d.spec.selector.as_ref(), &d.spec.template);
            validate_pod(ctx, "spec.template.spec", &d.spec.template.spec);
            validate_strategy(
                ctx,
                "spec.updateStrategy",
                d.spec.update_strategy.as_ref(),
                &["OnDelete", "RollingUpdate"],
            );
        }
        Object::Job(j) => {
            validate_template_meta(ctx, "spec.template", &j.spec.template);
            validate_pod(ctx, "spec.template.spec", &j.spec.template.spec);
            validate_job(ctx, "spec", &j.spec);
        }
        Object::CronJob(c) => {
            let at = "spec.jobTemplate.spec";
            validate_template_meta(ctx, &format!("{at}.template"), &c.spec.job_template.spec.template);
            validate_pod(
                ctx,
                &format!("{at}.template.spec"),
                &c.spec.job_template.spec.template.spec,
            );
            validate_job(ctx, at, &c.spec.job_template.spec);
            validate_cron_job(ctx, &c.spec);
        }
        Object::PersistentVolumeClaim(pvc) => {
            if pvc.spec.storage_class_name.is_some() {
                ctx.warn(
                    "spec.storageClassName",
                    "accepted but not used: a claim is a directory on each node that uses it (local-path)",
                );
            }
            if pvc.spec.resources.is_some() {
                ctx.warn(
                    "spec.resources",
                    "accepted but not enforced: a claim may use the node's free disk space",
                );
            }
            if pvc.spec.volume_mode.as_deref().is_some_and(|m| m != "Filesystem") {
                ctx.err("spec.volumeMode", "only Filesystem: a claim is a directory on the node");
            }
        }
        Object::Namespace(n) => {
            if !is_dns_label(&n.metadata.name) {
                ctx.err(
                    "metadata.name",
                    "a namespace name is a DNS label: lower-case letters, digits and '-'",
                );
            }
        }
        Object::AgentUpdate(u) => {
            let hex = u.spec.digest.strip_prefix("sha256:").unwrap_or("");
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                ctx.err(
                    "spec.digest",
                    format!(
                        "{:?} is not sha256: and 64 lower-case hex digits; `outpost agent publish FILE` prints it",
                        u.spec.digest
                    ),
                );
            }
            if u.spec
                .health_deadline_seconds
                .is_some_and(|d| !(10..=3600).contains(&d))
            {
                ctx.err("spec.healthDeadlineSeconds", "must be between 10 and 3600");
            }
            if let Some(Err(e)) = u.spec.version.as_deref().map(no_control) {
                ctx.err("spec.version", e);
            }
            validate_labels(ctx, "spec.nodeSelector", &u.spec.node_selector);
        }
        Object::Service(svc) => validate_service(ctx, svc),
        Object::AlertPolicy(p) => validate_alert_policy(ctx, &p.spec),
        Object::RolloutPolicy(p) => {
            for (field, reason) in crate::rollout::check_rollout_policy(&p.spec) {
                ctx.err(field, reason);
            }
        }
        Object::Pipeline(p) => {
            for (field, reason) in crate::pipeline::check_spec(&p.spec) {
                ctx.err(field, reason);
            }
        }
        Object::GitRepo(g) => {
            for (field, reason) in crate::gitops::check_spec(&g.spec) {
                ctx.err(field, reason);
            }
        }
        Object::ConfigMap(c) => {
            for (k, v) in &c.binary_data {
                validate_key(ctx, &format!("binaryData.{k}"), k);
                if base64::engine::general_purpose::STANDARD.decode(v).is_err() {
                    ctx.err(format!("binaryData.{k}"), "not valid base64");
                }
            }
            for k in c.data.keys() {
                validate_key(ctx, &format!("data.{k}"), k);
            }
        }
        Object::Secret(s) => {
            for (k, v) in &s.data {
                validate_key(ctx, &format!("data.{k}"), k);
                if base64::engine::general_purpose::STANDARD.decode(v.trim()).is_err() {
                    ctx.err(
                        format!("data.{k}"),
                        "not valid base64 (Secret data values are base64; use stringData for plain text)",
                    );
                }
            }
            for k in s.string_data.keys() {
                validate_key(ctx, &format!("stringData.{k}"), k);
            }
        }
    }
    Some(obj)
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn validate_meta(ctx: &mut Ctx, m: &ObjectMeta) {
    if !is_dns_subdomain(&m.name) {
        ctx.err(
            "metadata.name",
            format!(
                "{:?} is not a valid name: use lower-case letters, digits, '-' and '.'",
                m.name
            ),
        );
    }
    if let Some(ns) = &m.namespace {
        if !is_dns_label(ns) {
            ctx.err(
                "metadata.namespace",
                format!("{ns:?} is not a valid namespace: use lower-case letters, digits and '-'"),
            );
        }
    }
    validate_labels(ctx, "metadata.labels", &m.labels);
    validate_annotations(ctx, "metadata.annotations", &m.annotations);
}

/// Label keys and values (Kubernetes' syntax), in labels, selectors and node selectors.
fn validate_labels(ctx: &mut Ctx, at: &str, labels: &Labels) {
    for (k, v) in labels {
        if let Err(e) = validate_label_key(k) {
            ctx.err(format!("{at}.{}", printable(k)), e);
        } else if let Err(e) = validate_label_value(v) {
            ctx.err(format!("{at}.{k}"), e);
        }
    }
}

/// Annotation keys follow the label key syntax; values are free text.
fn validate_annotations(ctx: &mut Ctx, at: &str, annotations: &Labels) {
    for k in annotations.keys() {
        if let Err(e) = validate_label_key(k) {
            ctx.err(format!("{at}.{}", printable(k)), e);
        }
    }
}

/// A value as it may appear inside a field path: control characters escaped.
fn printable(s: &str) -> String {
    if s.chars().any(char::is_control) {
        s.escape_default().to_string()
    } else {
        s.to_string()
    }
}

fn validate_key(ctx: &mut Ctx, field: &str, key: &str) {
    let ok = !key.is_empty()
        && key != "."
        && key != ".."
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        ctx.err(
            field,
            format!("{key:?} is not a valid key: use letters, digits, '-', '_' and '.'"),
        );
    }
}

fn validate_selector(ctx: &mut Ctx, sel: Option<&LabelSelector>, template: &PodTemplate) {
    if let Some(m) = &template.metadata {
        validate_labels(ctx, "spec.template.metadata.labels", &m.labels);
        validate_annotations(ctx, "spec.template.metadata.annotations", &m.annotations);
    }
    let Some(sel) = sel else { return };
    validate_labels(ctx, "spec.selector.matchLabels", &sel.match_labels);
    let labels = template.metadata.as_ref().map(|m| &m.labels);
    for (k, v) in &sel.match_labels {
        if labels.and_then(|l| l.get(k)) != Some(v) {
            ctx.err(
                format!("spec.selector.matchLabels.{k}"),
                "the selector does not match spec.template.metadata.labels; a workload must select its own pods",
            );
        }
    }
}

fn validate_template_meta(ctx: &mut Ctx, at: &str, template: &PodTemplate) {
    if let Some(m) = &template.metadata {
        validate_labels(ctx, &format!("{at}.metadata.labels"), &m.labels);
        validate_annotations(ctx, &format!("{at}.metadata.annotations"), &m.annotations);
    }
}

fn validate_job(ctx: &mut Ctx, at: &str, j: &JobSpec) {
    match j.template.spec.restart_policy.as_deref() {
        Some("OnFailure") | Some("Never") => {}
        Some(other) => ctx.err(
            format!("{at}.template.spec.restartPolicy"),
            format!("{other:?}: a Job's pod must use OnFailure or Never"),
        ),
        None => ctx.err(
            format!("{at}.template.spec.restartPolicy"),
            "required for a Job: OnFailure (restart the container on the node) or Never (a failure counts against backoffLimit)",
        ),
    }
    for (name, v) in [("completions", j.completions), ("parallelism", j.parallelism)] {
        if v.is_some_and(|n| n > 1) {
            ctx.err(
                format!("{at}.{name}"),
                format!(
                    "{} is not supported: outpost runs one pod per Job, on one node; split the work into several Jobs",
                    v.unwrap_or_default()
                ),
            );
        }
    }
    if j.completion_mode.as_deref().is_some_and(|m| m != "NonIndexed") {
        ctx.err(
            format!("{at}.completionMode"),
            "only NonIndexed: outpost runs one pod per Job",
        );
    }
    if j.pod_failure_policy.is_some() {
        ctx.warn(
            format!("{at}.podFailurePolicy"),
            "accepted but not used: every failed run counts against backoffLimit",
        );
    }
    if j.active_deadline_seconds.is_some() {
        ctx.warn(
            format!("{at}.activeDeadlineSeconds"),
            "accepted but not enforced: a run is not stopped after this long",
        );
    }
    if j.ttl_seconds_after_finished.is_some() {
        ctx.warn(
            format!("{at}.ttlSecondsAfterFinished"),
            "accepted but not used: finished runs are kept until the Job is deleted (CronJobs keep their history limits)",
        );
    }
    if j.backoff_limit.is_some_and(|b| b > 1000) {
        ctx.err(format!("{at}.backoffLimit"), "at most 1000");
    }
    if let Some(sel) = &j.selector {
        validate_labels(ctx, &format!("{at}.selector.matchLabels"), &sel.match_labels);
    }
}

fn validate_cron_job(ctx: &mut Ctx, c: &CronJobSpec) {
    if let Err(e) = crate::cron::parse_schedule(&c.schedule) {
        ctx.err("spec.schedule", e);
    }
    if let Some(tz) = c.time_zone.as_deref() {
        if jiff::tz::TimeZone::get(tz).is_err() {
            ctx.err(
                "spec.timeZone",
                format!("{tz:?} is not a time zone of the IANA database (e.g. Europe/Berlin, Asia/Shanghai, UTC)"),
            );
        }
    }
    if let Some(p) = c.concurrency_policy.as_deref() {
        if !matches!(p, "Allow" | "Forbid" | "Replace") {
            ctx.err(
                "spec.concurrencyPolicy",
                format!("{p:?} is not one of Allow, Forbid, Replace"),
            );
        }
    }
    for (name, v) in [
        ("successfulJobsHistoryLimit", c.successful_jobs_history_limit),
        ("failedJobsHistoryLimit", c.failed_jobs_history_limit),
    ] {
        if v.is_some_and(|n| n > 100) {
            ctx.err(format!("spec.{name}"), "at most 100");
        }
    }
}

fn validate_service(ctx: &mut Ctx, svc: &Service) {
    match svc.spec.type_.as_deref() {
        None | Some("ClusterIP") => ctx.warn(
            "spec.type",
            "accepted but not used: outpost has no cluster network; use type NodePort to expose pods on their nodes",
        ),
        Some("NodePort") => {}
        Some(other) => ctx.err(
            "spec.type",
            format!("{other:?} is not supported; outpost supports NodePort"),
        ),
    }
    if svc.spec.selector.is_empty() {
        ctx.err(
            "spec.selector",
            "required: a Service selects the pods it exposes by their labels",
        );
    }
    validate_labels(ctx, "spec.selector", &svc.spec.selector);
    for (i, p) in svc.spec.ports.iter().enumerate() {
        let f = format!("spec.ports[{i}]");
        if p.port == 0 {
            ctx.err(format!("{f}.port"), "must be between 1 and 65535");
        }
        if p.protocol.as_deref().is_some_and(|x| !matches!(x, "TCP" | "UDP")) {
            ctx.err(format!("{f}.protocol"), "must be TCP or UDP");
        }
        match p.target_port.as_ref() {
            None | Some(Value::String(_)) => {}
            Some(Value::Number(n)) if n.as_u64().is_some_and(|n| (1..=65535).contains(&n)) => {}
            Some(other) => ctx.err(
                format!("{f}.targetPort"),
                format!("{other} is not a port number or name"),
            ),
        }
        if let Some(np) = p.node_port {
            if svc.spec.type_.as_deref() == Some("NodePort") && !NODE_PORT_RANGE.contains(&np) {
                ctx.err(
                    format!("{f}.nodePort"),
                    format!(
                        "{np} is outside the node port range {}-{}; choose a port in it or leave nodePort out \
                         and the hub assigns one",
                        NODE_PORT_RANGE.start(),
                        NODE_PORT_RANGE.end()
                    ),
                );
            }
        }
    }
}

fn validate_strategy(ctx: &mut Ctx, at: &str, s: Option<&DeploymentStrategy>, allowed: &[&str]) {
    let Some(s) = s else { return };
    if let Some(t) = s.type_.as_deref() {
        if !allowed.contains(&t) {
            ctx.err(
                format!("{at}.type"),
                format!("{t:?} is not one of {}", allowed.join(", ")),
            );
        } else if t == "OnDelete" {
            ctx.err(
                format!("{at}.type"),
                "OnDelete is not supported: outpost updates every node it schedules to",
            );
        }
    }
    if s.rolling_update.is_some() {
        ctx.warn(
            format!("{at}.rollingUpdate"),
            "accepted but not used: on a node, process workloads are replaced stop-old-then-start-new \
             (each node runs one copy), with automatic rollback if the new revision fails its health gate",
        );
    }
}

/// Resolve a probe port (number or container port name).
pub fn probe_port(port: &Value, c: &Container) -> Result<u16, String> {
    match port {
        Value::Number(n) => n
            .as_u64()
            .filter(|p| (1..=65535).contains(p))
            .map(|p| p as u16)
            .ok_or_else(|| format!("{n} is not a port between 1 and 65535")),
        Value::String(s) => match s.parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => c
                .ports
                .iter()
                .find(|p| p.name.as_deref() == Some(s.as_str()))
                .map(|p| p.container_port)
                .ok_or_else(|| format!("no container port named {s:?}")),
        },
        other => Err(format!("{other} is not a port number or name")),
    }
}

fn validate_probe(ctx: &mut Ctx, f: &str, p: &Probe, c: &Container, kind: &str) {
    let n = p.http_get.is_some() as u8 + p.tcp_socket.is_some() as u8 + p.exec.is_some() as u8;
    if n != 1 {
        ctx.err(f, "a probe needs exactly one of httpGet, tcpSocket or exec");
    }
    if let Some(h) = &p.http_get {
        if let Err(e) = probe_port(&h.port, c) {
            ctx.err(format!("{f}.httpGet.port"), e);
        }
        if let Some(s) = h.scheme.as_deref() {
            if s != "HTTP" && s != "HTTPS" {
                ctx.err(format!("{f}.httpGet.scheme"), format!("{s:?} is not HTTP or HTTPS"));
            }
        }
        if let Some(path) = h.path.as_deref() {
            if !path.starts_with('/') {
                ctx.err(format!("{f}.httpGet.path"), "must start with /");
            } else if path.chars().any(|c| c.is_control() || c.is_whitespace()) {
                ctx.err(
                    format!("{f}.httpGet.path"),
                    "must not contain spaces or control characters; percent-encode them",
                );
            }
        }
        check_host(ctx, &format!("{f}.httpGet.host"), h.host.as_deref());
        for (j, hd) in h.http_headers.iter().enumerate() {
            let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            if hd.name.is_empty() || !hd.name.bytes().all(token) {
                ctx.err(
                    format!("{f}.httpGet.httpHeaders[{j}].name"),
                    format!("{:?} is not an HTTP header name", hd.name),
                );
            }
            if hd.value.chars().any(|c| c.is_control() && c != '\t') {
                ctx.err(
                    format!("{f}.httpGet.httpHeaders[{j}].value"),
                    "must not contain line breaks or other control characters",
                );
            }
        }
    }
    if let Some(t) = &p.tcp_socket {
        if let Err(e) = probe_port(&t.port, c) {
            ctx.err(format!("{f}.tcpSocket.port"), e);
        }
        check_host(ctx, &format!("{f}.tcpSocket.host"), t.host.as_deref());
    }
    if let Some(e) = &p.exec {
        if e.command.is_empty() {
            ctx.err(format!("{f}.exec.command"), "must name a command to run");
        }
        check_argv(ctx, &format!("{f}.exec.command"), &e.command);
    }
    for (name, v) in [
        ("periodSeconds", p.period_seconds),
        ("timeoutSeconds", p.timeout_seconds),
        ("failureThreshold", p.failure_threshold),
        ("successThreshold", p.success_threshold),
    ] {
        if v == Some(0) {
            ctx.err(format!("{f}.{name}"), "must be at least 1");
        }
    }
    if kind != "readinessProbe" && p.success_threshold.is_some_and(|s| s != 1) {
        ctx.err(format!("{f}.successThreshold"), format!("must be 1 for a {kind}"));
    }
}

/// An argument vector: the program (`[0]`) has no control characters, no element has NUL.
fn check_argv(ctx: &mut Ctx, at: &str, argv: &[String]) {
    for (j, a) in argv.iter().enumerate() {
        let r = if j == 0 { no_control(a) } else { no_nul(a) };
        if let Err(e) = r {
            ctx.err(format!("{at}[{j}]"), e);
        }
    }
}

/// A probe's host: a host name or an IP address, nothing that could smuggle a line into a request.
fn check_host(ctx: &mut Ctx, field: &str, host: Option<&str>) {
    let Some(h) = host else { return };
    let ok = !h.is_empty()
        && (h.parse::<std::net::IpAddr>().is_ok()
            || h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'));
    if !ok {
        ctx.err(field, format!("{h:?} is not a host name or an IP address"));
    }
}

/// An absolute path without control characters, and without ':' or ',' (a Docker bind mount
/// is written `host:container[:ro]`).
fn check_path(p: &str) -> Result<(), String> {
    no_control(p)?;
    if !p.starts_with('/') {
        return Err("must be an absolute path".into());
    }
    if p.contains([':', ',']) {
        return Err(format!(
            "{p:?} contains ':' or ',', which a container bind mount cannot carry"
        ));
    }
    Ok(())
}

/// A container of `runtimeClassName: onnx`: `image` names the model (`name:tag` or
/// `name@sha256:<hex>`), one `containerPort` is where it is served, and the agent supplies the
/// program, so `command` and `args` are refused.
fn validate_model_container(ctx: &mut Ctx, f: &str, c: &crate::manifest::Container) {
    if c.image.as_deref().is_none_or(str::is_empty) {
        ctx.err(
            format!("{f}.image"),
            "required with runtimeClassName: onnx: the model to serve, e.g. digits:v2 or digits@sha256:<hex> (`outpost model push`)",
        );
    }
    if !c.command.is_empty() || !c.args.is_empty() {
        ctx.err(
            format!("{f}.command"),
            "not allowed with runtimeClassName: onnx: outpost runs the model server itself; remove command and args",
        );
    }
    if c.ports.len() != 1 {
        ctx.err(
            format!("{f}.ports"),
            format!(
                "runtimeClassName: onnx needs exactly one containerPort (the port the model is served on), found {}",
                c.ports.len()
            ),
        );
    }
}

fn validate_pod(ctx: &mut Ctx, at: &str, pod: &PodSpec) {
    let onnx = pod.runtime_class_name.as_deref() == Some(ONNX_RUNTIME);
    let process = match pod.runtime_class_name.as_deref() {
        None | Some(ONNX_RUNTIME) => false,
        Some(PROCESS_RUNTIME) => true,
        Some(other) => {
            ctx.err(
                format!("{at}.runtimeClassName"),
                format!("unknown runtime class {other:?}: use \"process\" for native processes, \"onnx\" to serve a model, or omit it for Docker"),
            );
            false
        }
    };
    if pod.containers.is_empty() {
        ctx.err(format!("{at}.containers"), "at least one container is required");
    }
    if let Some(p) = pod.restart_policy.as_deref() {
        if !matches!(p, "Always" | "OnFailure" | "Never") {
            ctx.err(
                format!("{at}.restartPolicy"),
                format!("{p:?} is not one of Always, OnFailure, Never"),
            );
        }
    }
    if let Some(g) = pod.termination_grace_period_seconds {
        if !(0..=MAX_GRACE_SECONDS).contains(&g) {
            ctx.err(
                format!("{at}.terminationGracePeriodSeconds"),
                format!("{g} must be between 0 and {MAX_GRACE_SECONDS} (one day)"),
            );
        }
    }
    validate_labels(ctx, &format!("{at}.nodeSelector"), &pod.node_selector);
    let mut volumes = BTreeMap::new();
    for (i, v) in pod.volumes.iter().enumerate() {
        let f = format!("{at}.volumes[{i}]");
        if !is_dns_label(&v.name) {
            ctx.err(format!("{f}.name"), format!("{:?} is not a valid volume name", v.name));
        }
        if volumes.insert(v.name.clone(), v).is_some() {
            ctx.err(format!("{f}.name"), format!("volume {:?} is defined twice", v.name));
        }
        let sources = [
            v.host_path.is_some(),
            v.config_map.is_some(),
            v.secret.is_some(),
            v.empty_dir.is_some(),
            v.persistent_volume_claim.is_some(),
        ];
        match sources.iter().filter(|s| **s).count() {
            1 => {}
            0 => ctx.err(
                &f,
                "a volume needs exactly one source: hostPath, configMap, secret, emptyDir or persistentVolumeClaim",
            ),
            _ => ctx.err(
                &f,
                "a volume may have only one source: hostPath, configMap, secret, emptyDir or persistentVolumeClaim",
            ),
        }
        if let Some(pvc) = &v.persistent_volume_claim {
            if !is_dns_subdomain(&pvc.claim_name) {
                ctx.err(
                    format!("{f}.persistentVolumeClaim.claimName"),
                    format!("{:?} is not a valid claim name", pvc.claim_name),
                );
            }
        }
        for (src, items) in [
            ("configMap", v.config_map.as_ref().map(|c| &c.items)),
            ("secret", v.secret.as_ref().map(|c| &c.items)),
        ] {
            for (j, it) in items.into_iter().flatten().enumerate() {
                let ok = !it.path.is_empty() && it.path != "." && it.path != ".." && !it.path.contains('/');
                if !ok {
                    ctx.err(
                        format!("{f}.{src}.items[{j}].path"),
                        format!("{:?} must be a file name (no '/', no sub-directories)", it.path),
                    );
                } else {
                    validate_key(ctx, &format!("{f}.{src}.items[{j}].path"), &it.path);
                }
            }
        }
        for (src, mode) in [
            ("configMap", v.config_map.as_ref().and_then(|c| c.default_mode)),
            ("secret", v.secret.as_ref().and_then(|c| c.default_mode)),
        ] {
            if mode.is_some_and(|m| m > 0o777) {
                ctx.err(
                    format!("{f}.{src}.defaultMode"),
                    "must be a file mode between 0 and 0777 (511 in decimal)",
                );
            }
        }
        if let Some(hp) = &v.host_path {
            if let Err(e) = check_path(&hp.path) {
                ctx.err(format!("{f}.hostPath.path"), e);
            } else if hp.path.split('/').any(|c| c == "..") {
                ctx.err(
                    format!("{f}.hostPath.path"),
                    format!("{:?} contains '..'; name the directory directly", hp.path),
                );
            }
            if let Some(t) = hp.type_.as_deref() {
                if !HOST_PATH_TYPES.contains(&t) {
                    ctx.err(
                        format!("{f}.hostPath.type"),
                        format!(
                            "{t:?} is not a hostPath type; use one of {}",
                            HOST_PATH_TYPES[1..].join(", ")
                        ),
                    );
                }
            }
        }
        if let Some(ed) = &v.empty_dir {
            if ed.medium.as_deref().is_some_and(|m| !m.is_empty()) {
                ctx.warn(
                    format!("{f}.emptyDir.medium"),
                    "accepted but not honoured: emptyDir is always disk-backed on outpost",
                );
            }
            if ed.size_limit.is_some() {
                ctx.warn(format!("{f}.emptyDir.sizeLimit"), "accepted but not enforced");
            }
        }
    }
    let mut names = BTreeSet::new();
    let all = pod
        .containers
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("{at}.containers[{i}]"), c, false))
        .chain(
            pod.init_containers
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("{at}.initContainers[{i}]"), c, true)),
        );
    for (f, c, init) in all {
        match (init, c.restart_policy.as_deref()) {
            (_, None) | (true, Some("Always")) => {}
            (true, Some(other)) => ctx.err(
                format!("{f}.restartPolicy"),
                format!("{other:?}: an init container's restartPolicy can only be Always (a sidecar)"),
            ),
            (false, Some(_)) => ctx.err(
                format!("{f}.restartPolicy"),
                "only init containers have a restartPolicy (Always: a sidecar); set the pod's",
            ),
        }
        if !is_dns_label(&c.name) {
            ctx.err(
                format!("{f}.name"),
                format!("{:?} is not a valid container name", c.name),
            );
        }
        if !names.insert(&c.name) {
            ctx.err(
                format!("{f}.name"),
                format!("container name {:?} is used twice", c.name),
            );
        }
        if onnx {
            validate_model_container(ctx, &f, c);
        } else if process {
            if c.command.first().is_none_or(|s| s.is_empty()) {
                ctx.err(
                    format!("{f}.command"),
                    "required with runtimeClassName: process (command[0] is the executable to run)",
                );
            }
        } else if c.image.as_deref().is_none_or(str::is_empty) {
            ctx.err(
                format!("{f}.image"),
                "required for Docker containers (or set runtimeClassName: process)",
            );
        }
        if let Some(image) = c.image.as_deref().filter(|i| !i.is_empty()) {
            if let Err(e) = validate_image_ref(image) {
                ctx.err(format!("{f}.image"), e);
            }
        }
        check_argv(ctx, &format!("{f}.command"), &c.command);
        for (j, a) in c.args.iter().enumerate() {
            if let Err(e) = no_nul(a) {
                ctx.err(format!("{f}.args[{j}]"), e);
            }
        }
        if let Some(p) = c.image_pull_policy.as_deref() {
            if !matches!(p, "Always" | "IfNotPresent" | "Never") {
                ctx.err(
                    format!("{f}.imagePullPolicy"),
                    format!("{p:?} is not one of Always, IfNotPresent, Never"),
                );
            }
        }
        for (j, e) in c.env.iter().enumerate() {
            let ef = format!("{f}.env[{j}]");
            if e.name.is_empty() || !e.name.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'=') {
                ctx.err(
                    format!("{ef}.name"),
                    format!(
                        "{:?} is not a valid variable name: use printable ASCII characters other than '=' (e.g. LOG_LEVEL)",
                        e.name
                    ),
                );
            }
            if let Some(Err(err)) = e.value.as_deref().map(no_nul) {
                ctx.err(format!("{ef}.value"), err);
            }
            match (&e.value, &e.value_from) {
                (Some(_), Some(_)) => ctx.err(&ef, "set either value or valueFrom, not both"),
                (None, Some(src)) => {
                    let n = src.config_map_key_ref.is_some() as u8
                        + src.secret_key_ref.is_some() as u8
                        + src.field_ref.is_some() as u8
                        + src.resource_field_ref.is_some() as u8;
                    if n != 1 {
                        ctx.err(
                            format!("{ef}.valueFrom"),
                            "set exactly one of configMapKeyRef, secretKeyRef, fieldRef or resourceFieldRef",
                        );
                    }
                    if let Some(fr) = &src.field_ref {
                        if let Err(e) = check_field_path(&fr.field_path) {
                            ctx.err(format!("{ef}.valueFrom.fieldRef.fieldPath"), e);
                        } else if fr.field_path == "status.podIP" && !process && !pod.host_network {
                            ctx.err(
                                format!("{ef}.valueFrom.fieldRef.fieldPath"),
                                "status.podIP of a Docker container on its own network is not known before it starts; \
                                 use hostNetwork: true (the pod's IP is then the node's) or status.hostIP",
                            );
                        }
                    }
                    if let Some(rr) = &src.resource_field_ref {
                        let rf = format!("{ef}.valueFrom.resourceFieldRef");
                        if !matches!(
                            rr.resource.as_str(),
                            "limits.cpu" | "limits.memory" | "requests.cpu" | "requests.memory"
                        ) {
                            ctx.err(
                                format!("{rf}.resource"),
                                format!(
                                    "{:?} is not supported; use limits.cpu, limits.memory, requests.cpu or requests.memory",
                                    rr.resource
                                ),
                            );
                        }
                        if let Some(cn) = &rr.container_name {
                            if !pod.containers.iter().any(|c| &c.name == cn) {
                                ctx.err(
                                    format!("{rf}.containerName"),
                                    format!("no container named {cn:?} in this pod"),
                                );
                            }
                        }
                        if let Some(d) = &rr.divisor {
                            let ok = if rr.resource.ends_with(".cpu") {
                                parse_cpu_divisor(d).is_ok()
                            } else {
                                parse_memory(d).is_ok()
                            };
                            if !ok {
                                ctx.err(
                                    format!("{rf}.divisor"),
                                    format!("{d} is not a quantity for {}", rr.resource),
                                );
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        for (j, ef) in c.env_from.iter().enumerate() {
            let f = format!("{f}.envFrom[{j}]");
            if ef.config_map_ref.is_some() == ef.secret_ref.is_some() {
                ctx.err(&f, "set exactly one of configMapRef or secretRef");
            }
            if let Some(p) = &ef.prefix {
                if !p.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'=') {
                    ctx.err(format!("{f}.prefix"), "use printable ASCII characters other than '='");
                }
            }
        }
        if let Some(wd) = &c.working_dir {
            if let Err(e) = no_control(wd).and_then(|_| {
                wd.starts_with('/')
                    .then_some(())
                    .ok_or_else(|| "must be an absolute path".to_string())
            }) {
                ctx.err(format!("{f}.workingDir"), e);
            }
        }
        for (j, p) in c.ports.iter().enumerate() {
            if p.container_port == 0 {
                ctx.err(format!("{f}.ports[{j}].containerPort"), "must be between 1 and 65535");
            }
            if let Some(proto) = p.protocol.as_deref() {
                if !matches!(proto, "TCP" | "UDP") {
                    ctx.err(
                        format!("{f}.ports[{j}].protocol"),
                        format!("{proto:?} is not TCP or UDP"),
                    );
                }
            }
        }
        if let Some(r) = &c.resources {
            for (k, v) in &r.limits {
                let lf = format!("{f}.resources.limits.{k}");
                let res = match k.as_str() {
                    "cpu" => parse_cpu(v).map(|_| ()),
                    "memory" => parse_memory(v).and_then(|b| {
                        if !process && b < MIN_DOCKER_MEMORY_BYTES {
                            Err(format!(
                                "{v} is less than 6Mi, the smallest memory limit the Docker Engine accepts"
                            ))
                        } else {
                            Ok(())
                        }
                    }),
                    other => Err(format!(
                        "{:?} is not supported; outpost enforces cpu and memory",
                        printable(other)
                    )),
                };
                if let Err(reason) = res {
                    ctx.err(lf, reason);
                }
            }
            if !r.requests.is_empty() {
                ctx.warn(
                    format!("{f}.resources.requests"),
                    "accepted but not used: outpost does not schedule by requests; limits are enforced",
                );
            }
        }
        for (kind, p) in [
            ("startupProbe", &c.startup_probe),
            ("livenessProbe", &c.liveness_probe),
            ("readinessProbe", &c.readiness_probe),
        ] {
            if let Some(p) = p {
                validate_probe(ctx, &format!("{f}.{kind}"), p, c, kind);
            }
        }
        let mut paths = BTreeSet::new();
        for (j, m) in c.volume_mounts.iter().enumerate() {
            let mf = format!("{f}.volumeMounts[{j}]");
            if !volumes.contains_key(&m.name) {
                ctx.err(
                    format!("{mf}.name"),
                    format!("no volume named {:?} in {at}.volumes", m.name),
                );
            }
            if let Err(e) = check_path(&m.mount_path) {
                ctx.err(format!("{mf}.mountPath"), e);
            }
            if !paths.insert(&m.mount_path) {
                ctx.err(
                    format!("{mf}.mountPath"),
                    format!("{:?} is mounted twice", m.mount_path),
                );
            }
            match m.mount_propagation.as_deref() {
                None | Some("None") => {}
                Some("HostToContainer") => ctx.warn(
                    format!("{mf}.mountPropagation"),
                    "accepted but not honoured: mounts made on the host later do not appear in the container",
                ),
                Some(other) => ctx.err(
                    format!("{mf}.mountPropagation"),
                    format!("{other:?} is not supported: outpost mounts volumes privately (None)"),
                ),
            }
        }
        validate_security(ctx, &f, pod, c, process);
        if c.termination_message_path.is_some() || c.termination_message_policy.is_some() {
            ctx.warn(
                format!("{f}.terminationMessagePath"),
                "accepted but not used: a failure's reason carries the last log lines instead",
            );
        }
    }
    validate_pod_extras(ctx, at, pod, process);
    for m in host_path_mounts(at, pod) {
        if let Some(risk) = m.risk() {
            ctx.warn(
                &m.field,
                format!(
                    "container {} mounts hostPath {} {} ({risk}): the workload can take over the node; \
                     use a narrower path{}, or let the hub refuse such mounts (outpost hub --host-paths deny-sensitive)",
                    m.container,
                    normalize_path(&m.host_path),
                    if m.read_only { "read-only" } else { "read-write" },
                    if m.read_only { "" } else { " or readOnly: true" },
                ),
            );
        }
    }
}

/// A fieldRef path of the downward API outpost fills in.
fn check_field_path(p: &str) -> Result<(), String> {
    let quoted_key = |rest: &str| -> bool {
        rest.strip_prefix("['")
            .and_then(|r| r.strip_suffix("']"))
            .is_some_and(|k| validate_label_key(k).is_ok())
    };
    match p {
        "metadata.name"
        | "metadata.namespace"
        | "spec.nodeName"
        | "status.hostIP"
        | "status.podIP"
        | "spec.serviceAccountName" => Ok(()),
        other if other.strip_prefix("metadata.labels").is_some_and(quoted_key) => Ok(()),
        other if other.strip_prefix("metadata.annotations").is_some_and(quoted_key) => Ok(()),
        other => Err(format!(
            "{other:?} is not supported; use metadata.name, metadata.namespace, metadata.labels['KEY'], \
             metadata.annotations['KEY'], spec.nodeName, spec.serviceAccountName, status.hostIP or status.podIP"
        )),
    }
}

/// A resourceFieldRef divisor for CPU (`1`, `1m`): millicores, at least 1m.
pub fn parse_cpu_divisor(v: &Value) -> Result<u64, String> {
    let s = quantity_text(v)?;
    match s.strip_suffix('m') {
        Some(m) => m.parse::<u64>().ok().filter(|m| *m > 0),
        None => s
            .parse::<f64>()
            .ok()
            .filter(|f| *f > 0.0)
            .map(|f| (f * 1000.0).round() as u64),
    }
    .filter(|m| *m > 0)
    .ok_or_else(|| format!("{s:?} is not a CPU divisor like \"1\" or \"1m\""))
}

fn validate_security(ctx: &mut Ctx, f: &str, pod: &PodSpec, c: &Container, process: bool) {
    let psc = pod.security_context.clone().unwrap_or_default();
    let sc = c.security_context.clone().unwrap_or_default();
    let sf = format!("{f}.securityContext");
    let runtime = if process { "a process" } else { "a Docker container" };
    for (name, v) in [
        ("runAsUser", sc.run_as_user.or(psc.run_as_user)),
        ("runAsGroup", sc.run_as_group.or(psc.run_as_group)),
    ] {
        if v.is_some_and(|id| !(0..=MAX_ID).contains(&id)) {
            ctx.err(
                format!("{sf}.{name}"),
                format!("{} is not a uid/gid between 0 and {MAX_ID}", v.unwrap_or_default()),
            );
        }
    }
    let uid = sc.run_as_user.or(psc.run_as_user);
    if sc.run_as_non_root.or(psc.run_as_non_root) == Some(true) && uid == Some(0) {
        ctx.err(
            format!("{sf}.runAsNonRoot"),
            "runAsNonRoot is true but runAsUser is 0 (root); set runAsUser to another uid",
        );
    }
    if process && sc.run_as_non_root.or(psc.run_as_non_root) == Some(true) && uid.is_none() {
        ctx.err(
            format!("{sf}.runAsNonRoot"),
            "a process has no image that names a user: set runAsUser (a uid other than 0) with runAsNonRoot",
        );
    }
    if sc.privileged == Some(true) && sc.allow_privilege_escalation == Some(false) {
        ctx.err(
            format!("{sf}.allowPrivilegeEscalation"),
            "cannot be false for a privileged container (as in Kubernetes)",
        );
    }
    if let Some(caps) = &sc.capabilities {
        for (list, names) in [("add", &caps.add), ("drop", &caps.drop)] {
            for (i, n) in names.iter().enumerate() {
                if !n.eq_ignore_ascii_case("ALL") && capability_number(n).is_none() {
                    ctx.err(
                        format!("{sf}.capabilities.{list}[{i}]"),
                        format!("{n:?} is not a Linux capability (e.g. NET_ADMIN, SYS_TIME, or ALL)"),
                    );
                }
            }
        }
    }
    if sc.read_only_root_filesystem == Some(true) && process {
        ctx.err(
            format!("{sf}.readOnlyRootFilesystem"),
            "cannot be honoured for a process: it shares the node's root filesystem; run it as a Docker container \
             (remove runtimeClassName: process) or remove the field",
        );
    }
    for (at, prof) in [
        (format!("{sf}.seccompProfile"), &sc.seccomp_profile),
        (
            format!(
                "{}.securityContext.seccompProfile",
                f.rsplit_once(".containers").map_or(f, |(p, _)| p)
            ),
            &psc.seccomp_profile,
        ),
    ] {
        let Some(p) = prof else { continue };
        match p.get("type").and_then(Value::as_str) {
            Some("RuntimeDefault") if process => ctx.warn(
                at,
                format!("accepted but not applied to {runtime}: processes run without a seccomp filter"),
            ),
            Some("RuntimeDefault") | Some("Unconfined") => {}
            other => ctx.err(
                at,
                format!("{other:?} is not supported; use RuntimeDefault or Unconfined"),
            ),
        }
    }
}

/// Pod-level fields that are accepted with a warning, and node affinity.
fn validate_pod_extras(ctx: &mut Ctx, at: &str, pod: &PodSpec, process: bool) {
    if !pod.tolerations.is_empty() {
        ctx.warn(
            format!("{at}.tolerations"),
            "accepted but not used: outpost nodes carry no taints, so every pod tolerates every node",
        );
    }
    if let Some(sa) = pod.service_account_name.as_ref().or(pod.service_account.as_ref()) {
        ctx.warn(
            format!("{at}.serviceAccountName"),
            format!(
                "accepted but not used: service account {sa:?} has no meaning on an outpost node (no Kubernetes API)"
            ),
        );
    }
    if pod.automount_service_account_token == Some(true) {
        ctx.warn(
            format!("{at}.automountServiceAccountToken"),
            "accepted but not used: no service account token is mounted (no Kubernetes API)",
        );
    }
    if pod.priority_class_name.is_some() {
        ctx.warn(
            format!("{at}.priorityClassName"),
            "accepted but not used: outpost never preempts workloads",
        );
    }
    if pod.dns_policy.as_deref().is_some_and(|d| d != "Default") {
        ctx.warn(
            format!("{at}.dnsPolicy"),
            "accepted: containers use the node's resolver (Docker's for containers), there is no cluster DNS",
        );
    }
    if pod.scheduler_name.as_deref().is_some_and(|s| s != "default-scheduler") {
        ctx.warn(
            format!("{at}.schedulerName"),
            "accepted but not used: the hub schedules every workload",
        );
    }
    if let Some(psc) = &pod.security_context {
        if psc.fs_group.is_some() {
            ctx.warn(
                format!("{at}.securityContext.fsGroup"),
                "accepted but not honoured: volume ownership is not changed",
            );
        }
    }
    if process && (pod.host_network || pod.host_pid) {
        // Processes always share the node's namespaces: nothing to do, nothing to warn about.
    }
    let Some(na) = pod.affinity.as_ref().and_then(|a| a.node_affinity.as_ref()) else {
        return;
    };
    let af = format!("{at}.affinity.nodeAffinity");
    if na.preferred_during_scheduling_ignored_during_execution.is_some() {
        ctx.warn(
            format!("{af}.preferredDuringSchedulingIgnoredDuringExecution"),
            "accepted but not used: only required node affinity changes placement",
        );
    }
    let Some(req) = &na.required_during_scheduling_ignored_during_execution else {
        return;
    };
    let rf = format!("{af}.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms");
    if req.node_selector_terms.is_empty() {
        ctx.err(&rf, "at least one term is required (an empty list matches no node)");
    }
    for (i, t) in req.node_selector_terms.iter().enumerate() {
        for (j, e) in t.match_expressions.iter().enumerate() {
            let ef = format!("{rf}[{i}].matchExpressions[{j}]");
            if let Err(err) = validate_label_key(&e.key) {
                ctx.err(format!("{ef}.key"), err);
            }
            if let Err(err) = check_requirement(e) {
                ctx.err(ef, err);
            }
        }
        for (j, e) in t.match_fields.iter().enumerate() {
            let ef = format!("{rf}[{i}].matchFields[{j}]");
            if e.key != "metadata.name" {
                ctx.err(
                    format!("{ef}.key"),
                    "only metadata.name (the node's name) can be matched",
                );
            } else if !matches!(e.operator.as_str(), "In" | "NotIn") || e.values.len() != 1 {
                ctx.err(
                    ef,
                    "matchFields on metadata.name takes In or NotIn with exactly one value",
                );
            }
        }
    }
}

/// One node selector requirement: the operator and the number of values fit.
pub fn check_requirement(e: &NodeSelectorRequirement) -> Result<(), String> {
    match e.operator.as_str() {
        "In" | "NotIn" if e.values.is_empty() => Err(format!("{} needs at least one value", e.operator)),
        "In" | "NotIn" => e.values.iter().try_for_each(|v| validate_label_value(v)),
        "Exists" | "DoesNotExist" if !e.values.is_empty() => Err(format!("{} takes no values", e.operator)),
        "Exists" | "DoesNotExist" => Ok(()),
        "Gt" | "Lt" => match e.values.as_slice() {
            [v] if v.parse::<i64>().is_ok() => Ok(()),
            _ => Err(format!("{} needs exactly one integer value", e.operator)),
        },
        other => Err(format!(
            "{other:?} is not one of In, NotIn, Exists, DoesNotExist, Gt, Lt"
        )),
    }
}

/// CPU quantity (`"500m"`, `"1"`, `0.5`) in millicores.
pub fn parse_cpu(v: &Value) -> Result<u64, String> {
    let s = quantity_text(v)?;
    let milli = if let Some(m) = s.strip_suffix('m') {
        m.parse::<u64>()
            .map_err(|_| format!("{s:?} is not a CPU quantity like \"500m\" or \"1.5\""))?
    } else {
        let f: f64 = s
            .parse()
            .map_err(|_| format!("{s:?} is not a CPU quantity like \"500m\" or \"1.5\""))?;
        if !(f.is_finite() && f >= 0.0) {
            return Err(format!("{s:?} must be a positive number of cores"));
        }
        let m = (f * 1000.0).round();
        if m > MAX_CPU_MILLIS as f64 {
            return Err(format!(
                "{s:?} is more than 1000 cores, the largest CPU limit outpost accepts"
            ));
        }
        m as u64
    };
    if milli == 0 {
        return Err(format!("{s:?} is zero: a limit must be positive"));
    }
    if milli < MIN_CPU_MILLIS {
        return Err(format!(
            "{s:?} is less than 10m, the smallest CPU limit a node can enforce"
        ));
    }
    if milli > MAX_CPU_MILLIS {
        return Err(format!(
            "{s:?} is more than 1000 cores, the largest CPU limit outpost accepts"
        ));
    }
    Ok(milli)
}

/// Memory quantity (`"512Mi"`, `"1G"`, `1048576`) in bytes.
pub fn parse_memory(v: &Value) -> Result<u64, String> {
    let s = quantity_text(v)?;
    let bad = || format!("{s:?} is not a memory quantity like \"512Mi\" or \"1Gi\"");
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let mul: f64 = match unit {
        "" => 1.0,
        "k" | "K" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0f64.powi(4),
        _ => return Err(bad()),
    };
    let bytes = (n * mul).round();
    if !(bytes.is_finite() && bytes >= 1.0) {
        return Err(format!("{s:?} must be a positive amount of memory"));
    }
    if bytes > MAX_MEMORY_BYTES as f64 {
        return Err(format!(
            "{s:?} is more than 1Pi, the largest memory limit outpost accepts"
        ));
    }
    Ok(bytes as u64)
}

fn quantity_text(v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.trim().to_string()),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(format!("{other} is not a quantity")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(yaml: &str) -> Vec<String> {
        match parse_file("f.yaml", yaml) {
            Ok(p) => panic!("expected errors, parsed {:?}", p.objects),
            Err(e) => e.iter().map(|e| e.to_string()).collect(),
        }
    }

    const GOOD: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, labels: {app: web}}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      runtimeClassName: process
      nodeSelector: {site: store-001}
      containers:
      - name: web
        image: web:1.0
        command: [/bin/sleep, "1000"]
        env:
        - {name: A, value: "1"}
        - name: B
          valueFrom: {configMapKeyRef: {name: cfg, key: b}}
        resources: {limits: {cpu: 500m, memory: 64Mi}}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: cfg, namespace: shop}
data: {b: hello}
"#;

    #[test]
    fn accepts_a_good_file() {
        let p = parse_file("f.yaml", GOOD).unwrap();
        assert_eq!(p.objects.len(), 2);
        assert_eq!(p.objects[0].id().to_string(), "Deployment/default/web");
        assert_eq!(p.objects[1].id().to_string(), "ConfigMap/shop/cfg");
        assert!(p.warnings.is_empty());
    }

    #[test]
    fn table_of_rejections() {
        let cases: &[(&str, &str)] = &[
            (
                "kind: Ingress\napiVersion: networking.k8s.io/v1\nmetadata: {name: a}",
                "document 1 (Ingress a): kind: Ingress is not supported",
            ),
            (
                "kind: Service\napiVersion: v1\nmetadata: {name: a}\nspec: {type: NodePort, selector: {app: a}, ports: [{port: 80, nodePort: 8080}]}",
                "spec.ports[0].nodePort: 8080 is outside the node port range 30000-32767",
            ),
            (
                "kind: Service\napiVersion: v1\nmetadata: {name: a}\nspec: {type: LoadBalancer, selector: {app: a}}",
                "spec.type: \"LoadBalancer\" is not supported",
            ),
            (
                "kind: Deployment\napiVersion: v1\nmetadata: {name: a}",
                "apiVersion: Deployment must use apiVersion apps/v1",
            ),
            (
                "kind: ConfigMap\napiVersion: v1\nmetadata: {name: a, uid: x}",
                "metadata.uid: unknown field `uid`",
            ),
            (
                "kind: ConfigMap\napiVersion: v1\nmetadata: {name: Bad_Name}",
                "metadata.name: \"Bad_Name\" is not a valid name",
            ),
            (
                "kind: Secret\napiVersion: v1\nmetadata: {name: s}\ndata: {k: '***'}",
                "data.k: not valid base64",
            ),
            ("a: [unclosed", "(yaml): not valid YAML"),
        ];
        for (yaml, want) in cases {
            let got = errors(yaml).join("\n");
            assert!(got.contains(want), "for {yaml:?}\n want: {want}\n got:  {got}");
        }
    }

    fn pod_errors(pod: &str) -> String {
        let yaml = format!(
            "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: d}}\nspec:\n  template:\n    spec:\n{}",
            pod.lines().map(|l| format!("      {l}\n")).collect::<String>()
        );
        errors(&yaml).join("\n")
    }

    #[test]
    fn table_of_pod_rejections() {
        let cases: &[(&str, &str)] = &[
            (
                "containers: []",
                "spec.template.spec.containers: at least one container is required",
            ),
            (
                "runtimeClassName: kata\ncontainers: [{name: a, image: x}]",
                "runtimeClassName: unknown runtime class \"kata\"",
            ),
            (
                "runtimeClassName: process\ncontainers: [{name: a}]",
                "containers[0].command: required with runtimeClassName: process",
            ),
            (
                "runtimeClassName: onnx\ncontainers: [{name: a, ports: [{containerPort: 5000}]}]",
                "containers[0].image: required with runtimeClassName: onnx: the model to serve",
            ),
            (
                "runtimeClassName: onnx\ncontainers: [{name: a, image: 'digits:v2', command: [x], ports: [{containerPort: 5000}]}]",
                "containers[0].command: not allowed with runtimeClassName: onnx",
            ),
            (
                "runtimeClassName: onnx\ncontainers: [{name: a, image: 'digits:v2'}]",
                "containers[0].ports: runtimeClassName: onnx needs exactly one containerPort",
            ),
            (
                "runtimeClassName: onnx\ncontainers: [{name: a, image: 'digits v2', ports: [{containerPort: 5000}]}]",
                "containers[0].image:",
            ),
            (
                "containers: [{name: a}]",
                "containers[0].image: required for Docker containers",
            ),
            (
                "containers: [{name: a, image: x, foo: 1}]",
                "containers[0].foo: unknown field `foo`",
            ),
            (
                "containers: [{name: a, image: x}]\nrestartPolicy: Sometimes",
                "restartPolicy: \"Sometimes\" is not one of",
            ),
            (
                "containers: [{name: a, image: x, resources: {limits: {cpu: lots}}}]",
                "limits.cpu: \"lots\" is not a CPU quantity",
            ),
            (
                "containers: [{name: a, image: x, resources: {limits: {gpu: 1}}}]",
                "limits.gpu: \"gpu\" is not supported",
            ),
            (
                "containers: [{name: a, image: x, volumeMounts: [{name: v, mountPath: /d}]}]",
                "volumeMounts[0].name: no volume named \"v\"",
            ),
            (
                "containers: [{name: a, image: x}]\nvolumes: [{name: v}]",
                "volumes[0]: a volume needs exactly one source",
            ),
            (
                "containers: [{name: a, image: x, env: [{name: E, value: a, valueFrom: {}}]}]",
                "env[0]: set either value or valueFrom",
            ),
            (
                "containers: [{name: a, image: x}, {name: a, image: z}]",
                "containers[1].name: container name \"a\" is used twice",
            ),
        ];
        for (pod, want) in cases {
            let got = pod_errors(pod);
            assert!(got.contains(want), "for {pod:?}\n want: {want}\n got:  {got}");
        }
    }

    /// Defect 1: block-style nesting used to overflow the stack (the hub aborted) from about
    /// 1,000 levels in a debug build. Now the parser stops at MAX_NESTING_DEPTH and names the
    /// document.
    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        let head = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\nextra:\n";
        let mut block_map = String::new();
        for i in 0..1_500 {
            block_map.push_str(&" ".repeat(i));
            block_map.push_str("a:\n");
        }
        let hostile = [
            format!("{head}{}v\n", "- ".repeat(3_000)),
            format!("{head}{block_map}"),
            format!("{head}  {}{}\n", "[".repeat(5_000), "]".repeat(5_000)),
            format!("{head}  {}\n", "{a: ".repeat(5_000)),
        ];
        for text in &hostile {
            let e = errors(text);
            assert_eq!(e.len(), 1, "{e:?}");
            assert!(
                e[0].starts_with("f.yaml document 2 (line ") && e[0].contains("nested deeper than 64 levels"),
                "{}",
                e[0]
            );
        }
        // within the limit: an ordinary error, not a nesting one
        let ok_depth = format!("{head}{}v\n", "- ".repeat(MAX_NESTING_DEPTH - 2));
        let e = errors(&ok_depth).join("\n");
        assert!(e.contains("unknown field `extra`"), "{e}");
    }

    #[test]
    fn file_size_and_document_count_are_bounded() {
        let doc = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n";
        let many = format!("{doc}{}", "---\n{}\n".repeat(MAX_DOCUMENTS_PER_FILE));
        let e = errors(&many).join("\n");
        assert!(e.contains("more than 1000 documents"), "{e}");
        let big = format!("{doc}data: {{k: '{}'}}\n", "x".repeat(MAX_FILE_BYTES));
        let e = errors(&big).join("\n");
        assert!(
            e.starts_with("f.yaml: (file): ") && e.contains("more than the 8 MiB"),
            "{e}"
        );
        let wide = format!("{doc}data: [{}]\n", "1,".repeat(MAX_NODES_PER_FILE));
        let e = errors(&wide).join("\n");
        assert!(e.contains("more than 250000 values"), "{e}");
    }

    #[test]
    fn table_of_value_rejections() {
        let cases: &[(&str, &str)] = &[
            (
                "containers: [{name: a, image: x, command: [\"/bin/sh\\0\"]}]",
                "containers[0].command[0]: contains the control character '\\0'",
            ),
            (
                "containers: [{name: a, image: x, command: [/bin/sh, \"a\\0b\"]}]",
                "containers[0].command[1]: contains a NUL byte at position 1",
            ),
            (
                "containers: [{name: a, image: x, args: [\"\\0\"]}]",
                "containers[0].args[0]: contains a NUL byte",
            ),
            (
                "containers: [{name: a, image: x, env: [{name: \"A\\0B\", value: v}]}]",
                "containers[0].env[0].name: \"A\\0B\" is not a valid variable name",
            ),
            (
                "containers: [{name: a, image: x, env: [{name: \"A\\nB\", value: v}]}]",
                "env[0].name: \"A\\nB\" is not a valid variable name",
            ),
            (
                "containers: [{name: a, image: x, env: [{name: A, value: \"v\\0\"}]}]",
                "containers[0].env[0].value: contains a NUL byte",
            ),
            (
                "containers: [{name: a, image: x, resources: {limits: {cpu: 1e300}}}]",
                "limits.cpu: \"1e+300\" is more than 1000 cores",
            ),
            (
                "containers: [{name: a, image: x, resources: {limits: {cpu: .nan}}}]",
                "limits.cpu: \".nan\" is not a CPU quantity",
            ),
            (
                "containers: [{name: a, image: x, resources: {limits: {cpu: \"NaN\"}}}]",
                "limits.cpu: \"NaN\" must be a positive number of cores",
            ),
            (
                "containers: [{name: a, image: x, resources: {limits: {cpu: \"inf\"}}}]",
                "limits.cpu: \"inf\" must be a positive number of cores",
            ),
            (
                "containers: [{name: a, image: x, resources: {limits: {cpu: -1}}}]",
                "limits.cpu: \"-1\" must be a positive number of cores",
            ),
            (
                "containers: [{name: a, image: x, resources: {limits: {cpu: 1m}}}]",
                "limits.cpu: \"1m\" is less than 10m",
            ),
            (
                "containers: [{name: a, image: x, resources: {limits: {memory: 99999999999Ti}}}]",
                "limits.memory: \"99999999999Ti\" is more than 1Pi",
            ),
            (
                "containers: [{name: a, image: x, resources: {limits: {memory: 1Mi}}}]",
                "limits.memory: \"1Mi\" is less than 6Mi",
            ),
            (
                "containers: [{name: a, image: \"x\\nevil\"}]",
                "containers[0].image: \"x\\nevil\" is not a valid image reference",
            ),
            (
                "containers: [{name: a, image: ../../etc/passwd}]",
                "containers[0].image: \"../../etc/passwd\" is not a valid image reference: path component \"..\"",
            ),
            (
                "containers: [{name: a, image: x, workingDir: \"/tmp\\n\"}]",
                "containers[0].workingDir: contains the control character",
            ),
            (
                "containers: [{name: a, image: x, volumeMounts: [{name: v, mountPath: \"/a:/b\"}]}]\nvolumes: [{name: v, emptyDir: {}}]",
                "volumeMounts[0].mountPath: \"/a:/b\" contains ':'",
            ),
            (
                "containers: [{name: a, image: x}]\nvolumes: [{name: v, hostPath: {path: /data/../etc}}]",
                "volumes[0].hostPath.path: \"/data/../etc\" contains '..'",
            ),
            (
                "containers: [{name: a, image: x}]\nterminationGracePeriodSeconds: 99999999999",
                "terminationGracePeriodSeconds: 99999999999 must be between 0 and 86400",
            ),
            (
                "containers: [{name: a, image: x}]\nnodeSelector: {\"site\\n\": a}",
                "nodeSelector.site\\n: \"site\\n\" is not a valid label key",
            ),
            (
                "containers: [{name: a, image: x, readinessProbe: {httpGet: {port: 80, httpHeaders: [{name: X, value: \"a\\r\\nEvil: 1\"}]}}}]",
                "httpHeaders[0].value: must not contain line breaks",
            ),
            (
                "containers: [{name: a, image: x, readinessProbe: {httpGet: {port: 80, path: \"/a b\"}}}]",
                "httpGet.path: must not contain spaces",
            ),
            (
                "containers: [{name: a, image: x, readinessProbe: {tcpSocket: {port: 80, host: \"a/b\"}}}]",
                "tcpSocket.host: \"a/b\" is not a host name",
            ),
            (
                "containers: [{name: a, image: x, livenessProbe: {exec: {command: [\"\\0\"]}}}]",
                "livenessProbe.exec.command[0]: contains the control character",
            ),
        ];
        for (pod, want) in cases {
            let got = pod_errors(pod);
            assert!(got.contains(want), "for {pod:?}\n want: {want}\n got:  {got}");
        }
        let yaml = |replicas: &str| {
            format!("apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d, labels: {{\"a b\": c}}}}\nspec:\n  replicas: {replicas}\n  template:\n    spec:\n      containers: [{{name: a, image: x}}]\n")
        };
        let e = errors(&yaml("4294967295")).join("\n");
        assert!(e.contains("spec.replicas: 4294967295 is more than 100000"), "{e}");
        assert!(
            e.contains("metadata.labels.a b: \"a b\" is not a valid label key"),
            "{e}"
        );
        // the limits themselves are accepted
        let ok = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  replicas: 100000\n  template:\n    spec:\n      terminationGracePeriodSeconds: 86400\n      containers: [{name: a, image: x, args: [\"multi\\nline\"], env: [{name: A, value: \"tab\\there\"}], resources: {limits: {cpu: 1000, memory: 1Pi}}}]\n";
        let e = parse_file("f.yaml", ok);
        assert!(
            e.as_ref()
                .is_err_and(|e| e.len() == 1 && e[0].reason.contains("\"1Pi\" is not a memory quantity")),
            "{e:?}"
        );
        let ok = ok.replace("1Pi", "1024Ti");
        parse_file("f.yaml", &ok).expect("values at the limits are accepted");
    }

    #[test]
    fn sensitive_host_paths_are_warned_about() {
        let yaml = |path: &str, ro: bool| {
            format!("apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: d}}\nspec:\n  template:\n    spec:\n      containers: [{{name: a, image: x, volumeMounts: [{{name: h, mountPath: /h, readOnly: {ro}}}]}}]\n      volumes: [{{name: h, hostPath: {{path: {path}}}}}]\n")
        };
        for (path, ro, want) in [
            (
                "/",
                true,
                Some("mounts hostPath / read-only (/ is the host's whole file system)"),
            ),
            (
                "/etc",
                false,
                Some("mounts hostPath /etc read-write (/etc is the host's configuration)"),
            ),
            ("/etc", true, None),
            ("/var/run/docker.sock", true, Some("Docker Engine's API socket")),
            ("/mnt/videos", false, None),
        ] {
            let p = parse_file("f.yaml", &yaml(path, ro)).expect("accepted");
            let w: Vec<String> = p.warnings.iter().map(ToString::to_string).collect();
            match want {
                None => assert!(w.is_empty(), "{path}: {w:?}"),
                Some(want) => {
                    assert_eq!(w.len(), 1, "{path}: {w:?}");
                    assert!(
                        w[0].contains("spec.template.spec.containers[0].volumeMounts[0]: container a ")
                            && w[0].contains(want)
                            && w[0].contains("--host-paths deny-sensitive"),
                        "{}",
                        w[0]
                    );
                }
            }
        }
    }

    #[test]
    fn one_bad_document_rejects_the_whole_file() {
        let yaml = format!("{GOOD}\n---\nkind: Pod\napiVersion: v1\nmetadata: {{name: x}}\n");
        let e = errors(&yaml);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("document 3"));
    }

    #[test]
    fn requests_are_warned_about_not_ignored() {
        let yaml = "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: d}\nspec:\n  template:\n    spec:\n      containers: [{name: a, image: x, resources: {requests: {cpu: 1}}}]\n";
        let p = parse_file("f.yaml", yaml).unwrap();
        assert_eq!(p.warnings.len(), 1);
        assert!(p.warnings[0].field.ends_with("resources.requests"));
    }

    #[test]
    fn objects_roundtrip_through_json_by_kind() {
        let yaml = "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: d}\nspec: {template: {spec: {containers: [{name: a, image: x}]}}}\n";
        let obj = parse_file("f.yaml", yaml).unwrap().objects.remove(0);
        let back: Object = serde_json::from_value(serde_json::to_value(&obj).unwrap()).unwrap();
        assert_eq!(back.kind(), Kind::DaemonSet);
        assert_eq!(back, obj);
    }

    #[test]
    fn quantities() {
        use serde_json::json;
        assert_eq!(parse_cpu(&json!("500m")), Ok(500));
        assert_eq!(parse_cpu(&json!("1")), Ok(1000));
        assert_eq!(parse_cpu(&json!(0.25)), Ok(250));
        assert!(parse_cpu(&json!("0")).is_err());
        assert_eq!(parse_memory(&json!("512Mi")), Ok(512 * 1024 * 1024));
        assert_eq!(parse_memory(&json!("1G")), Ok(1_000_000_000));
        assert_eq!(parse_memory(&json!(4096)), Ok(4096));
        assert!(parse_memory(&json!("12Qi")).is_err());
    }

    #[test]
    fn shared_examples_parse() {
        for (name, want_err) in [("edge-infer.yaml", None::<&str>), ("video-analyzer.yaml", None)] {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/examples/").to_string() + name;
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            match (parse_file(name, &text), want_err) {
                (Ok(_), None) => {}
                (Err(e), Some(w)) => assert!(e.iter().any(|e| e.to_string().contains(w)), "{e:?}"),
                (r, w) => panic!("{name}: {r:?} but wanted {w:?}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// AlertPolicy (issue 5)

/// The apiVersion of outpost's own kinds.
pub const ALERT_POLICY_API: &str = "outpost.dev/v1";

fn validate_threshold(ctx: &mut Ctx, field: &str, t: &ThresholdSpec, max: f64) {
    match (t.above, t.disabled) {
        (Some(_), true) => ctx.err(field, "set either above or disabled: true, not both"),
        (None, false) if t.for_.is_none() => ctx.err(field, "set above (the threshold) or disabled: true"),
        (Some(a), false) if !(a.is_finite() && a > 0.0 && a <= max) => ctx.err(
            format!("{field}.above"),
            format!("{a} must be more than 0 and at most {max}"),
        ),
        _ => {}
    }
    if let Some(f) = &t.for_ {
        if let Err(e) = parse_duration_secs(f) {
            ctx.err(format!("{field}.for"), e);
        }
    }
}

fn validate_alert_policy(ctx: &mut Ctx, spec: &AlertPolicySpec) {
    validate_labels(ctx, "spec.nodeSelector", &spec.node_selector);
    for (name, t, max) in [
        ("cpu", &spec.cpu, 100.0),
        ("memory", &spec.memory, 100.0),
        ("disk", &spec.disk, 100.0),
        ("temperature", &spec.temperature, 200.0),
        ("inferenceLatency", &spec.inference_latency, 600_000.0),
        ("inferenceErrors", &spec.inference_errors, 100.0),
    ] {
        if let Some(t) = t {
            validate_threshold(ctx, &format!("spec.{name}"), t, max);
        }
    }
    if let Some(l) = &spec.logs {
        if let Some(p) = &l.error_patterns {
            for (i, pat) in p.iter().enumerate() {
                if pat.trim().is_empty() {
                    ctx.err(
                        format!("spec.logs.errorPatterns[{i}]"),
                        "an empty pattern would match every line",
                    );
                }
            }
        }
        if let Some(a) = &l.max_age {
            match parse_duration_secs(a) {
                Ok(0) => ctx.err("spec.logs.maxAge", "must be more than 0"),
                Ok(_) => {}
                Err(e) => ctx.err("spec.logs.maxAge", e),
            }
        }
    }
}

#[cfg(test)]
mod alert_policy_tests {
    use super::*;

    const GOOD: &str = "apiVersion: outpost.dev/v1
kind: AlertPolicy
metadata: {name: stores}
spec:
  nodeSelector: {site: store-001}
  cpu: {above: 80, for: 5m}
  memory: {disabled: true}
  crashLoop: true
  logs: {errorPatterns: [ERROR, panic], maxAge: 3d}
";

    #[test]
    fn accepts_a_good_policy() {
        let p = parse_file("p.yaml", GOOD).unwrap();
        let Object::AlertPolicy(ap) = &p.objects[0] else {
            panic!("not an AlertPolicy: {:?}", p.objects[0])
        };
        assert_eq!(ap.spec.cpu.as_ref().and_then(|c| c.above), Some(80.0));
        assert_eq!(p.objects[0].id().to_string(), "AlertPolicy/default/stores");
        let back: Object = serde_json::from_value(serde_json::to_value(&p.objects[0]).unwrap()).unwrap();
        assert_eq!(back, p.objects[0]);
    }

    #[test]
    fn table_of_rejections() {
        let doc = |spec: &str| {
            format!("apiVersion: outpost.dev/v1\nkind: AlertPolicy\nmetadata: {{name: p}}\nspec: {spec}\n")
        };
        let cases: &[(String, &str)] = &[
            (
                "apiVersion: v1\nkind: AlertPolicy\nmetadata: {name: p}\nspec: {}\n".into(),
                "apiVersion: AlertPolicy must use apiVersion outpost.dev/v1",
            ),
            (doc("{cpu: {above: 80, fo: 5m}}"), "spec.cpu.fo: unknown field `fo`"),
            (
                doc("{cpu: {above: 180}}"),
                "spec.cpu.above: 180 must be more than 0 and at most 100",
            ),
            (
                doc("{cpu: {above: 80, for: 5y}}"),
                "spec.cpu.for: \"5y\" is not a duration",
            ),
            (
                doc("{disk: {above: 80, disabled: true}}"),
                "spec.disk: set either above or disabled",
            ),
            (
                doc("{memory: {}}"),
                "spec.memory: set above (the threshold) or disabled: true",
            ),
            (
                doc("{logs: {errorPatterns: ['']}}"),
                "spec.logs.errorPatterns[0]: an empty pattern",
            ),
            (doc("{logs: {maxAge: 0d}}"), "spec.logs.maxAge: must be more than 0"),
            (doc("{gpu: {above: 1}}"), "spec.gpu: unknown field `gpu`"),
        ];
        for (yaml, want) in cases {
            let got = match parse_file("f.yaml", yaml) {
                Ok(p) => panic!("expected errors for {yaml}, parsed {:?}", p.objects),
                Err(e) => e.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"),
            };
            assert!(got.contains(want), "for {yaml:?}\n want: {want}\n got:  {got}");
            assert!(got.contains("(AlertPolicy p)"), "names the document: {got}");
        }
    }
}
