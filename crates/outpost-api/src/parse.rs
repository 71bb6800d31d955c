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
    let expected_api = match kind.as_str() {
        "Deployment" | "DaemonSet" => "apps/v1",
        "ConfigMap" | "Secret" | "Service" => "v1",
        "AlertPolicy" | "Pipeline" => ALERT_POLICY_API,
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
                format!("{other} is not supported by outpost; supported kinds are Deployment, DaemonSet, ConfigMap, Secret, Service, AlertPolicy and Pipeline"),
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
        "Pipeline" => Object::Pipeline(typed(ctx, doc)?),
        _ => Object::Secret(typed(ctx, doc)?),
    };
    validate_meta(ctx, obj.meta());
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
        Object::Service(svc) => validate_service(ctx, svc),
        Object::AlertPolicy(p) => validate_alert_policy(ctx, &p.spec),
        Object::Pipeline(p) => {
            for (field, reason) in crate::pipeline::check_spec(&p.spec) {
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
        if svc.spec.type_.as_deref() == Some("NodePort") && p.node_port.is_none() {
            ctx.err(
                format!("{f}.nodePort"),
                "required: outpost does not pick node ports; choose one (e.g. 30001)",
            );
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
            if s != "HTTP" {
                ctx.err(
                    format!("{f}.httpGet.scheme"),
                    format!("{s:?} is not supported; outpost probes use HTTP"),
                );
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
        ];
        match sources.iter().filter(|s| **s).count() {
            1 => {}
            0 => ctx.err(
                &f,
                "a volume needs exactly one source: hostPath, configMap, secret or emptyDir",
            ),
            _ => ctx.err(
                &f,
                "a volume may have only one source: hostPath, configMap, secret or emptyDir",
            ),
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
                if !matches!(t, "" | "Directory" | "DirectoryOrCreate") {
                    ctx.err(
                        format!("{f}.hostPath.type"),
                        format!("{t:?} is not supported; use Directory or DirectoryOrCreate"),
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
    for (i, c) in pod.containers.iter().enumerate() {
        let f = format!("{at}.containers[{i}]");
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
                    let n = src.config_map_key_ref.is_some() as u8 + src.secret_key_ref.is_some() as u8;
                    if n != 1 {
                        ctx.err(
                            format!("{ef}.valueFrom"),
                            "set exactly one of configMapKeyRef or secretKeyRef",
                        );
                    }
                }
                _ => {}
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
        }
    }
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
                "kind: Service\napiVersion: v1\nmetadata: {name: a}\nspec: {type: NodePort, selector: {app: a}, ports: [{port: 80}]}",
                "spec.ports[0].nodePort: required",
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
