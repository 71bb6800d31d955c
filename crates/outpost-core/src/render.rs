//! Rendering a workload object into the fully resolved [`WorkloadSpec`] a node runs, and the
//! cross-object checks (references to ConfigMaps and Secrets) done at apply and delete.

use std::collections::BTreeMap;

use base64::Engine;
use outpost_api::{
    content_hash, parse_cpu, parse_memory, probe_port, ConcurrencyPolicy, ConfigMap, Container, ContainerSpec,
    CronRunSpec, JobRunSpec, Kind, ManifestError, ModelServe, MountSpec, NodeField, Object, ObjectId, PodSpec,
    PortSpec, Probe, ProbeAction, ProbeSpec, PullPolicy, RestartPolicy, Runtime, Secret, SecuritySpec, VolumeSource,
    VolumeSpec, WorkloadSpec, DEFAULT_MIN_READY_SECS, DEFAULT_PROGRESS_DEADLINE_SECS, ONNX_RUNTIME, PROCESS_RUNTIME,
};

/// Default grace period, as in Kubernetes.
pub const DEFAULT_GRACE_SECS: u64 = 30;

/// Read access to the ConfigMaps and Secrets a workload may reference.
pub trait ConfigSource {
    fn config_map(&self, namespace: &str, name: &str) -> Option<&ConfigMap>;
    fn secret(&self, namespace: &str, name: &str) -> Option<&Secret>;
    /// Services of a namespace.
    fn services(&self, namespace: &str) -> Vec<&outpost_api::Service>;
    /// Does an object of this kind exist?
    fn has(&self, kind: Kind, namespace: &str, name: &str) -> bool;
    /// The RolloutPolicies, as `(<namespace>/<name>, spec)`: an ONNX workload's model gate
    /// comes from the one that covers it.
    fn rollout_policies(&self) -> Vec<(String, outpost_api::RolloutPolicySpec)> {
        Vec::new()
    }
}

impl ConfigSource for BTreeMap<ObjectId, Object> {
    fn config_map(&self, namespace: &str, name: &str) -> Option<&ConfigMap> {
        let id = ObjectId {
            kind: Kind::ConfigMap,
            namespace: namespace.into(),
            name: name.into(),
        };
        match self.get(&id) {
            Some(Object::ConfigMap(c)) => Some(c),
            _ => None,
        }
    }
    fn secret(&self, namespace: &str, name: &str) -> Option<&Secret> {
        let id = ObjectId {
            kind: Kind::Secret,
            namespace: namespace.into(),
            name: name.into(),
        };
        match self.get(&id) {
            Some(Object::Secret(s)) => Some(s),
            _ => None,
        }
    }
    fn has(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        self.contains_key(&ObjectId {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        })
    }
    fn services(&self, namespace: &str) -> Vec<&outpost_api::Service> {
        self.values()
            .filter_map(|o| match o {
                Object::Service(s) if s.metadata.ns() == namespace => Some(s),
                _ => None,
            })
            .collect()
    }
    fn rollout_policies(&self) -> Vec<(String, outpost_api::RolloutPolicySpec)> {
        self.values()
            .filter_map(|o| match o {
                Object::RolloutPolicy(p) => Some((format!("{}/{}", p.metadata.ns(), p.metadata.name), p.spec.clone())),
                _ => None,
            })
            .collect()
    }
}

/// The model gate of a workload with `labels`: the `gate` of the RolloutPolicy that covers it
/// (the one `waves::Policy::for_workload` picks: most selector labels, ties by name).
pub fn model_gate(
    policies: &[(String, outpost_api::RolloutPolicySpec)],
    labels: &outpost_api::Labels,
) -> Option<outpost_api::ModelGate> {
    policies
        .iter()
        .filter(|(_, p)| crate::schedule::selector_matches(&p.selector, labels))
        .max_by(|(an, a), (bn, b)| a.selector.len().cmp(&b.selector.len()).then(bn.cmp(an)))
        .and_then(|(_, p)| p.gate.as_ref()?.model_gate())
}

/// The workload key nodes know a workload by: `deployment/<ns>/<name>`.
pub fn workload_key(id: &ObjectId) -> String {
    format!("{}/{}/{}", id.kind.as_str().to_ascii_lowercase(), id.namespace, id.name)
}

/// Hash of a workload's pod template: a change of it is a new revision.
pub fn template_hash(obj: &Object) -> Option<String> {
    match obj {
        // A pipeline's revision moves with its spec (node selector, streams, sinks).
        Object::Pipeline(p) => Some(content_hash(&p.spec)),
        // An AgentUpdate's with its spec (the binary), so each one rolls out as a revision.
        Object::AgentUpdate(u) => Some(content_hash(&u.spec)),
        _ => obj.template().map(content_hash),
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn secret_value(s: &Secret, key: &str) -> Option<Vec<u8>> {
    if let Some(v) = s.string_data.get(key) {
        return Some(v.as_bytes().to_vec());
    }
    s.data
        .get(key)
        .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v.trim()).ok())
}

/// Every ConfigMap/Secret reference that does not resolve (and is not optional), as errors naming
/// the field. `doc` names the workload in messages.
pub fn missing_references(obj: &Object, src: &impl ConfigSource) -> Vec<ManifestError> {
    let mut out = Vec::new();
    let Some(t) = obj.template() else { return out };
    let ns = obj.meta().ns();
    let doc = format!("{} {}/{}", obj.kind(), ns, obj.meta().name);
    let mut err = |field: String, reason: String| {
        out.push(ManifestError {
            document: doc.clone(),
            field,
            reason,
        })
    };
    for (cf, c) in outpost_api::checks::all_containers("spec.template.spec", &t.spec) {
        for (j, ef) in c.env_from.iter().enumerate() {
            let f = format!("{cf}.envFrom[{j}]");
            if let Some(r) = ef.config_map_ref.as_ref().filter(|r| !r.optional) {
                if src.config_map(ns, &r.name).is_none() {
                    err(
                        format!("{f}.configMapRef.name"),
                        format!(
                            "ConfigMap {ns}/{} does not exist: apply it first or in the same command",
                            r.name
                        ),
                    );
                }
            }
            if let Some(r) = ef.secret_ref.as_ref().filter(|r| !r.optional) {
                if src.secret(ns, &r.name).is_none() {
                    err(
                        format!("{f}.secretRef.name"),
                        format!(
                            "Secret {ns}/{} does not exist: apply it first or in the same command",
                            r.name
                        ),
                    );
                }
            }
        }
        for (j, e) in c.env.iter().enumerate() {
            let Some(vf) = &e.value_from else { continue };
            let f = format!("{cf}.env[{j}].valueFrom");
            if let Some(r) = &vf.config_map_key_ref {
                match src.config_map(ns, &r.name) {
                    Some(cm) if cm.data.contains_key(&r.key) || r.optional => {}
                    Some(_) => err(
                        format!("{f}.configMapKeyRef.key"),
                        format!("ConfigMap {ns}/{} has no key {:?}", r.name, r.key),
                    ),
                    None if r.optional => {}
                    None => err(
                        format!("{f}.configMapKeyRef.name"),
                        format!(
                            "ConfigMap {ns}/{} does not exist: apply it first or in the same command",
                            r.name
                        ),
                    ),
                }
            }
            if let Some(r) = &vf.secret_key_ref {
                match src.secret(ns, &r.name) {
                    Some(s) if secret_value(s, &r.key).is_some() || r.optional => {}
                    Some(_) => err(
                        format!("{f}.secretKeyRef.key"),
                        format!("Secret {ns}/{} has no key {:?}", r.name, r.key),
                    ),
                    None if r.optional => {}
                    None => err(
                        format!("{f}.secretKeyRef.name"),
                        format!(
                            "Secret {ns}/{} does not exist: apply it first or in the same command",
                            r.name
                        ),
                    ),
                }
            }
        }
    }
    let at = match obj {
        Object::CronJob(_) => "spec.jobTemplate.spec.template.spec",
        _ => "spec.template.spec",
    };
    for (i, v) in t.spec.volumes.iter().enumerate() {
        let f = format!("{at}.volumes[{i}]");
        if let Some(pvc) = &v.persistent_volume_claim {
            if !src.has(Kind::PersistentVolumeClaim, ns, &pvc.claim_name) {
                err(
                    format!("{f}.persistentVolumeClaim.claimName"),
                    format!(
                        "PersistentVolumeClaim {ns}/{} does not exist: apply it first or in the same command",
                        pvc.claim_name
                    ),
                );
            }
        }
        if let Some(cm) = &v.config_map {
            if let Some(c) = src.config_map(ns, &cm.name).filter(|_| !cm.optional) {
                for (j, it) in cm.items.iter().enumerate() {
                    if !c.data.contains_key(&it.key) && !c.binary_data.contains_key(&it.key) {
                        err(
                            format!("{f}.configMap.items[{j}].key"),
                            format!("ConfigMap {ns}/{} has no key {:?}", cm.name, it.key),
                        );
                    }
                }
            }
            if !cm.optional && src.config_map(ns, &cm.name).is_none() {
                err(
                    format!("{f}.configMap.name"),
                    format!(
                        "ConfigMap {ns}/{} does not exist: apply it first or in the same command",
                        cm.name
                    ),
                );
            }
        }
        if let Some(s) = &v.secret {
            if !s.optional && src.secret(ns, &s.secret_name).is_none() {
                err(
                    format!("{f}.secret.secretName"),
                    format!(
                        "Secret {ns}/{} does not exist: apply it first or in the same command",
                        s.secret_name
                    ),
                );
            }
        }
    }
    out
}

/// Give every `type: NodePort` Service port of `batch` without a `nodePort` one from
/// [`outpost_api::NODE_PORT_RANGE`]: the one its stored version had when still free, else the
/// lowest free one. A nodePort (named or kept) that another Service already uses for the same
/// protocol is an error naming the field. Pure: `stored` is every stored object.
pub fn assign_node_ports(batch: &mut [Object], stored: &[Object]) -> Vec<ManifestError> {
    use std::collections::BTreeSet;
    let in_batch: BTreeSet<ObjectId> = batch.iter().map(Object::id).collect();
    let node_port = |o: &Object| match o {
        Object::Service(s) if s.spec.type_.as_deref() == Some("NodePort") => Some(s.clone()),
        _ => None,
    };
    let proto = |p: &outpost_api::ServicePort| p.protocol.clone().unwrap_or_else(|| "TCP".into());
    // (port, protocol) -> the Service holding it
    let mut used: BTreeMap<(u16, String), ObjectId> = BTreeMap::new();
    for o in stored.iter().filter(|o| !in_batch.contains(&o.id())) {
        if let Some(svc) = node_port(o) {
            for p in &svc.spec.ports {
                if let Some(np) = p.node_port {
                    used.insert((np, proto(p)), o.id());
                }
            }
        }
    }
    let mut errors = Vec::new();
    let doc = |o: &Object| format!("{} {}/{}", o.kind(), o.meta().ns(), o.meta().name);
    // Named ports first, so an assigned one never takes a port named later in the batch.
    for o in batch.iter() {
        let Some(svc) = node_port(o) else { continue };
        for (i, p) in svc.spec.ports.iter().enumerate() {
            let Some(np) = p.node_port else { continue };
            match used.get(&(np, proto(p))) {
                Some(holder) if *holder != o.id() => errors.push(ManifestError {
                    document: doc(o),
                    field: format!("spec.ports[{i}].nodePort"),
                    reason: format!(
                        "{np}/{} is already used by {holder}; choose another port or leave nodePort out and the hub assigns a free one",
                        proto(p)
                    ),
                }),
                _ => {
                    used.insert((np, proto(p)), o.id());
                }
            }
        }
    }
    let before: BTreeMap<ObjectId, outpost_api::Service> = stored
        .iter()
        .filter_map(|o| node_port(o).map(|s| (o.id(), s)))
        .collect();
    for o in batch.iter_mut() {
        let id = o.id();
        let Object::Service(svc) = o else { continue };
        if svc.spec.type_.as_deref() != Some("NodePort") {
            continue;
        }
        for i in 0..svc.spec.ports.len() {
            if svc.spec.ports[i].node_port.is_some() {
                continue;
            }
            let pr = proto(&svc.spec.ports[i]);
            let kept = before.get(&id).and_then(|old| {
                old.spec
                    .ports
                    .iter()
                    .find(|q| q.port == svc.spec.ports[i].port && q.name == svc.spec.ports[i].name && proto(q) == pr)
                    .and_then(|q| q.node_port)
            });
            let free = |np: u16| used.get(&(np, pr.clone())).is_none_or(|h| *h == id);
            let pick = kept
                .filter(|np| free(*np))
                .or_else(|| outpost_api::NODE_PORT_RANGE.clone().find(|np| free(*np)));
            match pick {
                Some(np) => {
                    used.insert((np, pr.clone()), id.clone());
                    svc.spec.ports[i].node_port = Some(np);
                }
                None => errors.push(ManifestError {
                    document: format!("Service {}/{}", id.namespace, id.name),
                    field: format!("spec.ports[{i}].nodePort"),
                    reason: "every node port of the range is taken; delete a NodePort Service first".into(),
                }),
            }
        }
    }
    errors
}

/// Does this workload reference the given ConfigMap, Secret or PersistentVolumeClaim?
pub fn references(obj: &Object, target: &ObjectId) -> bool {
    let Some(t) = obj.template() else { return false };
    if obj.meta().ns() != target.namespace {
        return false;
    }
    let name = target.name.as_str();
    let env_from_hit = t
        .spec
        .containers
        .iter()
        .flat_map(|c| &c.env_from)
        .any(|ef| match target.kind {
            Kind::ConfigMap => ef.config_map_ref.as_ref().is_some_and(|r| r.name == name),
            Kind::Secret => ef.secret_ref.as_ref().is_some_and(|r| r.name == name),
            _ => false,
        });
    let env_hit = env_from_hit
        || t.spec
            .containers
            .iter()
            .chain(&t.spec.init_containers)
            .flat_map(|c| &c.env)
            .filter_map(|e| e.value_from.as_ref())
            .any(|vf| match target.kind {
                Kind::ConfigMap => vf.config_map_key_ref.as_ref().is_some_and(|r| r.name == name),
                Kind::Secret => vf.secret_key_ref.as_ref().is_some_and(|r| r.name == name),
                _ => false,
            });
    let vol_hit = t.spec.volumes.iter().any(|v| match target.kind {
        Kind::ConfigMap => v.config_map.as_ref().is_some_and(|c| c.name == name),
        Kind::Secret => v.secret.as_ref().is_some_and(|s| s.secret_name == name),
        Kind::PersistentVolumeClaim => v.persistent_volume_claim.as_ref().is_some_and(|p| p.claim_name == name),
        _ => false,
    });
    env_hit || vol_hit
}

fn pull_policy(c: &Container) -> PullPolicy {
    match c.image_pull_policy.as_deref() {
        Some("Always") => PullPolicy::Always,
        Some("Never") => PullPolicy::Never,
        Some(_) => PullPolicy::IfNotPresent,
        None => {
            let image = c.image.as_deref().unwrap_or_default();
            let tag = image
                .rsplit('/')
                .next()
                .and_then(|last| last.split_once(':'))
                .map(|(_, t)| t);
            if tag.is_none_or(|t| t == "latest") && !image.contains('@') {
                PullPolicy::Always
            } else {
                PullPolicy::IfNotPresent
            }
        }
    }
}

/// NodePort Services whose selector matches the pod's labels publish `nodePort` on the host:
/// the matching container port gets it as its host port.
fn apply_node_ports(
    containers: &mut [ContainerSpec],
    pod_labels: &outpost_api::Labels,
    pod: &outpost_api::PodSpec,
    ns: &str,
    src: &impl ConfigSource,
) {
    for svc in src.services(ns) {
        if svc.spec.type_.as_deref() != Some("NodePort")
            || !crate::schedule::selector_matches(&svc.spec.selector, pod_labels)
        {
            continue;
        }
        for sp in &svc.spec.ports {
            let Some(node_port) = sp.node_port else { continue };
            for (cs, c) in containers.iter_mut().zip(&pod.containers) {
                let target = match &sp.target_port {
                    None => Some(sp.port),
                    Some(v) => probe_port(v, c).ok(),
                };
                let proto = sp.protocol.clone().unwrap_or_else(|| "TCP".into());
                if let Some(p) = cs
                    .ports
                    .iter_mut()
                    .find(|p| Some(p.container_port) == target && p.protocol == proto)
                {
                    p.host_port = Some(node_port);
                } else if let Some(t) =
                    target.filter(|_| cs.ports.is_empty() || c.ports.iter().all(|p| p.name.is_none()))
                {
                    cs.ports.push(PortSpec {
                        container_port: t,
                        host_port: Some(node_port),
                        protocol: proto,
                    });
                }
            }
        }
    }
}

/// A probe with ports resolved and Kubernetes' defaults filled in (period 10 s, timeout 1 s,
/// failure threshold 3, success threshold 1). Probes reach the workload on 127.0.0.1 unless a
/// host is given. Invalid probes were rejected at apply; one that still does not resolve is
/// dropped here.
fn probe_spec(p: &Probe, c: &Container) -> Option<ProbeSpec> {
    let action = if let Some(h) = &p.http_get {
        ProbeAction::HttpGet {
            host: h.host.clone().unwrap_or_else(|| "127.0.0.1".into()),
            port: probe_port(&h.port, c).ok()?,
            path: h.path.clone().unwrap_or_else(|| "/".into()),
            headers: h
                .http_headers
                .iter()
                .map(|x| (x.name.clone(), x.value.clone()))
                .collect(),
            https: h.scheme.as_deref() == Some("HTTPS"),
        }
    } else if let Some(t) = &p.tcp_socket {
        ProbeAction::TcpSocket {
            host: t.host.clone().unwrap_or_else(|| "127.0.0.1".into()),
            port: probe_port(&t.port, c).ok()?,
        }
    } else {
        ProbeAction::Exec {
            command: p.exec.as_ref()?.command.clone(),
        }
    };
    Some(ProbeSpec {
        action,
        initial_delay_seconds: p.initial_delay_seconds.unwrap_or(0) as u64,
        period_seconds: p.period_seconds.unwrap_or(10).max(1) as u64,
        timeout_seconds: p.timeout_seconds.unwrap_or(1).max(1) as u64,
        failure_threshold: p.failure_threshold.unwrap_or(3).max(1),
        success_threshold: p.success_threshold.unwrap_or(1).max(1),
    })
}

/// What an ONNX serving container serves (`runtimeClassName: onnx`, docs/inference.md).
fn model_serve(c: &Container) -> Option<ModelServe> {
    let port = c.ports.first()?;
    Some(ModelServe {
        reference: c.image.clone()?,
        port: port.container_port,
        host_port: port.host_port,
        gate: None,
    })
}

/// Ready only once the model is loaded and warmed up: the server listens only then, and answers
/// `/v2/health/ready`. The update gate waits for it, so a model that does not load is rolled back.
fn model_ready_probe(c: &Container) -> Option<ProbeSpec> {
    let m = model_serve(c)?;
    Some(ProbeSpec {
        action: ProbeAction::HttpGet {
            host: "127.0.0.1".into(),
            port: m.host_port.unwrap_or(m.port),
            path: "/v2/health/ready".into(),
            headers: vec![],
            https: false,
        },
        initial_delay_seconds: 0,
        period_seconds: 1,
        timeout_seconds: 1,
        failure_threshold: 3,
        success_threshold: 1,
    })
}

/// An AgentUpdate as a node receives it: no containers, the binary to run.
pub fn render_agent_update(u: &outpost_api::AgentUpdate, revision: u64) -> WorkloadSpec {
    let id = ObjectId {
        kind: Kind::AgentUpdate,
        namespace: u.metadata.ns().to_string(),
        name: u.metadata.name.clone(),
    };
    let mut spec = container_less(&id, revision);
    spec.agent_update = Some(outpost_api::AgentUpdateRun {
        digest: u.spec.digest.clone(),
        version: u.spec.version.clone(),
        health_deadline_seconds: u.spec.health_deadline_seconds.unwrap_or(120) as u64,
    });
    spec.hash = content_hash(&spec);
    spec
}

/// A Pipeline as a node receives it: no containers, the pipeline's spec at this revision.
pub fn render_pipeline(p: &outpost_api::pipeline::Pipeline, revision: u64) -> WorkloadSpec {
    let id = ObjectId {
        kind: Kind::Pipeline,
        namespace: p.metadata.ns().to_string(),
        name: p.metadata.name.clone(),
    };
    let mut spec = container_less(&id, revision);
    spec.pipeline = Some(outpost_api::pipeline::NodePipeline {
        namespace: id.namespace.clone(),
        name: id.name.clone(),
        revision,
        spec: p.spec.clone(),
    });
    spec.hash = content_hash(&spec);
    spec
}

/// A workload that runs no containers (an AgentUpdate, a Pipeline), before its payload is set.
fn container_less(id: &ObjectId, revision: u64) -> WorkloadSpec {
    WorkloadSpec {
        key: workload_key(id),
        kind: id.kind,
        namespace: id.namespace.clone(),
        name: id.name.clone(),
        revision,
        hash: String::new(),
        runtime: Runtime::Process,
        restart_policy: RestartPolicy::Never,
        grace_seconds: 0,
        containers: Vec::new(),
        volumes: Vec::new(),
        min_ready_seconds: 0,
        progress_deadline_seconds: DEFAULT_PROGRESS_DEADLINE_SECS,
        host_network: false,
        host_pid: false,
        job: None,
        agent_update: None,
        pipeline: None,
        failover: None,
    }
}

/// `items`: only the listed keys, each under its path (a missing key is left out; apply
/// refuses it unless the volume is optional).
fn select_items(files: &mut BTreeMap<String, String>, items: &[outpost_api::KeyToPath]) {
    if items.is_empty() {
        return;
    }
    let all = std::mem::take(files);
    for it in items {
        if let Some(v) = all.get(&it.key) {
            files.insert(it.path.clone(), v.clone());
        }
    }
}

/// How a Job or CronJob runs on its node.
fn job_spec(obj: &Object) -> Option<JobRunSpec> {
    let (j, cron) = match obj {
        Object::Job(j) => (&j.spec, None),
        Object::CronJob(c) => {
            let s = &c.spec;
            let cron = CronRunSpec {
                schedule: s.schedule.clone(),
                time_zone: s.time_zone.clone(),
                concurrency: match s.concurrency_policy.as_deref() {
                    Some("Forbid") => ConcurrencyPolicy::Forbid,
                    Some("Replace") => ConcurrencyPolicy::Replace,
                    _ => ConcurrencyPolicy::Allow,
                },
                suspend: s.suspend == Some(true),
                successful_history: s.successful_jobs_history_limit.unwrap_or(3),
                failed_history: s.failed_jobs_history_limit.unwrap_or(1),
                starting_deadline_seconds: s.starting_deadline_seconds,
            };
            (&s.job_template.spec, Some(cron))
        }
        _ => return None,
    };
    Some(JobRunSpec {
        backoff_limit: j.backoff_limit.unwrap_or(6),
        active_deadline_seconds: j.active_deadline_seconds,
        cron,
    })
}

/// A container's security settings with the pod's defaults folded in; capability names
/// upper-cased without `CAP_`.
fn security_spec(pod: &PodSpec, c: &Container) -> SecuritySpec {
    let psc = pod.security_context.clone().unwrap_or_default();
    let sc = c.security_context.clone().unwrap_or_default();
    let norm = |v: &[String]| -> Vec<String> {
        v.iter()
            .map(|n| {
                let u = n.to_ascii_uppercase();
                u.strip_prefix("CAP_").unwrap_or(&u).to_string()
            })
            .collect()
    };
    let caps = sc.capabilities.clone().unwrap_or_default();
    let unconfined = |p: &Option<serde_json::Value>| {
        p.as_ref().and_then(|v| v.get("type")).and_then(|t| t.as_str()) == Some("Unconfined")
    };
    SecuritySpec {
        privileged: sc.privileged == Some(true),
        cap_add: norm(&caps.add),
        cap_drop: norm(&caps.drop),
        run_as_user: sc.run_as_user.or(psc.run_as_user).and_then(|u| u32::try_from(u).ok()),
        run_as_group: sc.run_as_group.or(psc.run_as_group).and_then(|g| u32::try_from(g).ok()),
        run_as_non_root: sc.run_as_non_root.or(psc.run_as_non_root) == Some(true),
        read_only_root_fs: sc.read_only_root_filesystem == Some(true),
        no_new_privileges: sc.allow_privilege_escalation == Some(false),
        seccomp_unconfined: unconfined(&sc.seccomp_profile)
            || (sc.seccomp_profile.is_none() && unconfined(&psc.seccomp_profile)),
    }
}

/// A downward-API value: known at the hub, filled in by the node, or not resolvable.
enum Downward {
    Value(String),
    Node(NodeField),
    Unknown,
}

fn downward(
    vf: &outpost_api::EnvVarSource,
    c: &Container,
    pod: &PodSpec,
    meta: Option<&outpost_api::TemplateMeta>,
    ns: &str,
    runtime: Runtime,
) -> Downward {
    if let Some(fr) = &vf.field_ref {
        let key = |prefix: &str| {
            fr.field_path
                .strip_prefix(prefix)
                .and_then(|r| r.strip_prefix("['"))
                .and_then(|r| r.strip_suffix("']"))
                .map(str::to_string)
        };
        return match fr.field_path.as_str() {
            "metadata.namespace" => Downward::Value(ns.to_string()),
            "metadata.name" => Downward::Node(NodeField::PodName),
            "spec.nodeName" => Downward::Node(NodeField::NodeName),
            "status.hostIP" => Downward::Node(NodeField::HostIp),
            "status.podIP" if pod.host_network || runtime == Runtime::Process => Downward::Node(NodeField::PodIp),
            "spec.serviceAccountName" => Downward::Value(
                pod.service_account_name
                    .clone()
                    .or_else(|| pod.service_account.clone())
                    .unwrap_or_else(|| "default".into()),
            ),
            _ => {
                if let Some(k) = key("metadata.labels") {
                    Downward::Value(meta.and_then(|m| m.labels.get(&k)).cloned().unwrap_or_default())
                } else if let Some(k) = key("metadata.annotations") {
                    Downward::Value(meta.and_then(|m| m.annotations.get(&k)).cloned().unwrap_or_default())
                } else {
                    Downward::Unknown
                }
            }
        };
    }
    let Some(rr) = &vf.resource_field_ref else {
        return Downward::Unknown;
    };
    let target = rr
        .container_name
        .as_ref()
        .and_then(|n| pod.containers.iter().find(|x| &x.name == n))
        .unwrap_or(c);
    let res = target.resources.as_ref();
    let (kind, what) = rr.resource.split_once('.').unwrap_or(("", ""));
    let pick = |m: Option<&std::collections::BTreeMap<String, serde_json::Value>>| m.and_then(|m| m.get(what)).cloned();
    // requests default to limits, as in Kubernetes; limits default to the node's capacity.
    let value = match kind {
        "requests" => pick(res.map(|r| &r.requests)).or_else(|| pick(res.map(|r| &r.limits))),
        _ => pick(res.map(|r| &r.limits)),
    };
    let ceil = |a: u64, b: u64| a.div_ceil(b.max(1));
    match what {
        "cpu" => {
            let divisor = rr
                .divisor
                .as_ref()
                .and_then(|d| outpost_api::parse::parse_cpu_divisor(d).ok())
                .unwrap_or(1000);
            match value.and_then(|v| parse_cpu(&v).ok()) {
                Some(m) => Downward::Value(ceil(m, divisor).to_string()),
                None if kind == "requests" => Downward::Value("0".into()),
                None => Downward::Node(NodeField::NodeCpu {
                    divisor_millis: divisor,
                }),
            }
        }
        "memory" => {
            let divisor = rr.divisor.as_ref().and_then(|d| parse_memory(d).ok()).unwrap_or(1);
            match value.and_then(|v| parse_memory(&v).ok()) {
                Some(b) => Downward::Value(ceil(b, divisor).to_string()),
                None if kind == "requests" => Downward::Value("0".into()),
                None => Downward::Node(NodeField::NodeMemory { divisor_bytes: divisor }),
            }
        }
        _ => Downward::Unknown,
    }
}

/// The update gate a node applies to a workload's revisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateTiming {
    pub min_ready_seconds: u64,
    pub progress_deadline_seconds: u64,
}

/// A `minReadySeconds` that can never be met within `progressDeadlineSeconds`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GateTimingError {
    /// The manifest field to change.
    pub field: &'static str,
    pub reason: String,
    /// What nodes would apply to such an object stored by an older hub: half the deadline.
    pub fallback: GateTiming,
}

/// `minReadySeconds` and `progressDeadlineSeconds` of a workload, as nodes apply them.
///
/// `progressDeadlineSeconds` defaults to Kubernetes' 600 s (DaemonSets have none in Kubernetes
/// and always get 600 s). outpost's `minReadySeconds` default is 10 s (Kubernetes' is 0), but at
/// most half the deadline, so a Deployment that sets only a short `progressDeadlineSeconds`
/// (valid in Kubernetes) still lets a healthy revision pass: a revision must be Ready for
/// `minReadySeconds` before the deadline. An explicit `minReadySeconds` at or above the deadline
/// could never pass, so it is refused at apply (as Kubernetes refuses it), naming the field.
pub fn gate_timing(obj: &Object) -> Result<GateTiming, GateTimingError> {
    let (min_ready, deadline, deadline_field) = match obj {
        Object::Deployment(d) => (
            d.spec.min_ready_seconds,
            d.spec.progress_deadline_seconds,
            "spec.progressDeadlineSeconds",
        ),
        Object::DaemonSet(d) => (d.spec.min_ready_seconds, None, "the 600 s progress deadline"),
        _ => (None, None, ""),
    };
    let deadline = deadline.map_or(DEFAULT_PROGRESS_DEADLINE_SECS, u64::from);
    let adapted = DEFAULT_MIN_READY_SECS.min(deadline / 2);
    match min_ready.map(u64::from) {
        None => Ok(GateTiming {
            min_ready_seconds: adapted,
            progress_deadline_seconds: deadline,
        }),
        Some(m) if m < deadline => Ok(GateTiming {
            min_ready_seconds: m,
            progress_deadline_seconds: deadline,
        }),
        Some(m) => Err(GateTimingError {
            field: "spec.minReadySeconds",
            reason: format!(
                "{m} s is not less than {deadline_field} ({deadline} s): no revision could ever pass its health \
                 gate (Ready for minReadySeconds within the deadline), so none would become a node's last-known-good; \
                 lower minReadySeconds{}",
                if obj.kind() == Kind::Deployment {
                    " or raise progressDeadlineSeconds"
                } else {
                    " below 600"
                }
            ),
            fallback: GateTiming {
                min_ready_seconds: deadline / 2,
                progress_deadline_seconds: deadline,
            },
        }),
    }
}

/// Render a Deployment or DaemonSet at `revision`. Missing optional references are skipped;
/// missing required ones were rejected at apply, and are skipped here too.
pub fn render(obj: &Object, revision: u64, src: &impl ConfigSource) -> Option<WorkloadSpec> {
    match obj {
        Object::AgentUpdate(u) => return Some(render_agent_update(u, revision)),
        Object::Pipeline(p) => return Some(render_pipeline(p, revision)),
        _ => {}
    }
    let t = obj.template()?;
    let ns = obj.meta().ns().to_string();
    let pod = &t.spec;
    // An ONNX serving workload runs as processes: the agent starts `outpost serve-model`.
    let onnx = pod.runtime_class_name.as_deref() == Some(ONNX_RUNTIME);
    // Its model gate comes from the RolloutPolicy that covers it (changing the gate changes the
    // spec's hash, so the model servers restart with it, as for a new revision).
    let gate = if onnx {
        model_gate(&src.rollout_policies(), &obj.meta().labels)
    } else {
        None
    };
    let runtime = if onnx || pod.runtime_class_name.as_deref() == Some(PROCESS_RUNTIME) {
        Runtime::Process
    } else {
        Runtime::Docker
    };
    let restart_policy = match pod.restart_policy.as_deref() {
        Some("OnFailure") => RestartPolicy::OnFailure,
        Some("Never") => RestartPolicy::Never,
        _ => RestartPolicy::Always,
    };
    let to_spec = |c: &Container| {
        let mut env: Vec<(String, String)> = Vec::new();
        for ef in &c.env_from {
            let prefix = ef.prefix.clone().unwrap_or_default();
            if let Some(cm) = ef.config_map_ref.as_ref().and_then(|r| src.config_map(&ns, &r.name)) {
                env.extend(cm.data.iter().map(|(k, v)| (format!("{prefix}{k}"), v.clone())));
            }
            if let Some(sec) = ef.secret_ref.as_ref().and_then(|r| src.secret(&ns, &r.name)) {
                for k in sec.data.keys().chain(sec.string_data.keys()) {
                    if let Some(b) = secret_value(sec, k) {
                        env.push((format!("{prefix}{k}"), String::from_utf8_lossy(&b).into_owned()));
                    }
                }
            }
        }
        let explicit: Vec<(String, String)> = c
            .env
            .iter()
            .filter_map(|e| {
                let value = match (&e.value, &e.value_from) {
                    (Some(v), _) => Some(v.clone()),
                    (None, Some(vf)) if vf.field_ref.is_some() || vf.resource_field_ref.is_some() => {
                        match downward(vf, c, pod, t.metadata.as_ref(), &ns, runtime) {
                            Downward::Value(v) => Some(v),
                            Downward::Node(_) | Downward::Unknown => None,
                        }
                    }
                    (None, Some(vf)) => {
                        if let Some(r) = &vf.config_map_key_ref {
                            src.config_map(&ns, &r.name).and_then(|cm| cm.data.get(&r.key).cloned())
                        } else if let Some(r) = &vf.secret_key_ref {
                            src.secret(&ns, &r.name)
                                .and_then(|s| secret_value(s, &r.key))
                                .map(|b| String::from_utf8_lossy(&b).into_owned())
                        } else {
                            None
                        }
                    }
                    (None, None) => Some(String::new()),
                };
                value.map(|v| (e.name.clone(), v))
            })
            .collect();
        env.retain(|(k, _)| !explicit.iter().any(|(e, _)| e == k));
        env.extend(explicit);
        let limits = c.resources.as_ref().map(|r| &r.limits);
        ContainerSpec {
            name: c.name.clone(),
            image: c.image.clone(),
            image_pull_policy: pull_policy(c),
            command: c.command.clone(),
            args: c.args.clone(),
            env,
            working_dir: c.working_dir.clone(),
            ports: c
                .ports
                .iter()
                .map(|p| PortSpec {
                    container_port: p.container_port,
                    host_port: p.host_port,
                    protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                })
                .collect(),
            cpu_millis: limits.and_then(|l| l.get("cpu")).and_then(|v| parse_cpu(v).ok()),
            memory_bytes: limits.and_then(|l| l.get("memory")).and_then(|v| parse_memory(v).ok()),
            mounts: c
                .volume_mounts
                .iter()
                .map(|m| MountSpec {
                    volume: m.name.clone(),
                    path: m.mount_path.clone(),
                    read_only: m.read_only,
                })
                .collect(),
            startup_probe: c.startup_probe.as_ref().and_then(|p| probe_spec(p, c)),
            liveness_probe: c.liveness_probe.as_ref().and_then(|p| probe_spec(p, c)),
            readiness_probe: c
                .readiness_probe
                .as_ref()
                .and_then(|p| probe_spec(p, c))
                .or_else(|| onnx.then(|| model_ready_probe(c)).flatten()),
            model: onnx.then(|| model_serve(c)).flatten().map(|mut m| {
                m.gate = gate.clone();
                m
            }),
            security: security_spec(pod, c),
            node_env: c
                .env
                .iter()
                .filter(|e| e.value.is_none())
                .filter_map(|e| {
                    let vf = e.value_from.as_ref()?;
                    match downward(vf, c, pod, t.metadata.as_ref(), &ns, runtime) {
                        Downward::Node(f) => Some((e.name.clone(), f)),
                        _ => None,
                    }
                })
                .collect(),
            init: false,
        }
    };
    let mut containers: Vec<ContainerSpec> = pod.containers.iter().map(to_spec).collect();
    if runtime == Runtime::Docker {
        let empty = outpost_api::Labels::new();
        let labels = t.metadata.as_ref().map_or(&empty, |m| &m.labels);
        apply_node_ports(&mut containers, labels, pod, &ns, src);
    }
    // Init containers after the containers (node ports pair containers by position); a sidecar
    // (restartPolicy: Always) is an ordinary container.
    for c in &pod.init_containers {
        let mut spec = to_spec(c);
        spec.init = c.restart_policy.as_deref() != Some("Always");
        containers.push(spec);
    }
    let volumes = pod
        .volumes
        .iter()
        .map(|v| {
            let source = if let Some(hp) = &v.host_path {
                VolumeSource::HostPath {
                    path: hp.path.clone(),
                    create: hp.type_.as_deref() == Some("DirectoryOrCreate"),
                    host_type: hp.type_.clone().unwrap_or_default(),
                }
            } else if let Some(cm) = &v.config_map {
                let mut files = BTreeMap::new();
                if let Some(c) = src.config_map(&ns, &cm.name) {
                    for (k, val) in &c.data {
                        files.insert(k.clone(), b64(val.as_bytes()));
                    }
                    for (k, val) in &c.binary_data {
                        files.insert(k.clone(), val.clone());
                    }
                }
                select_items(&mut files, &cm.items);
                VolumeSource::Files {
                    files,
                    secret: false,
                    mode: cm.default_mode,
                }
            } else if let Some(s) = &v.secret {
                let mut files = BTreeMap::new();
                if let Some(sec) = src.secret(&ns, &s.secret_name) {
                    for k in sec.data.keys().chain(sec.string_data.keys()) {
                        if let Some(b) = secret_value(sec, k) {
                            files.insert(k.clone(), b64(&b));
                        }
                    }
                }
                select_items(&mut files, &s.items);
                VolumeSource::Files {
                    files,
                    secret: true,
                    mode: s.default_mode,
                }
            } else if let Some(pvc) = &v.persistent_volume_claim {
                VolumeSource::Claim {
                    namespace: ns.clone(),
                    claim: pvc.claim_name.clone(),
                }
            } else {
                VolumeSource::EmptyDir
            };
            VolumeSpec {
                name: v.name.clone(),
                source,
            }
        })
        .collect();
    let gate = gate_timing(obj).unwrap_or_else(|e| e.fallback);
    let id = obj.id();
    let mut spec = WorkloadSpec {
        key: workload_key(&id),
        kind: id.kind,
        namespace: id.namespace,
        name: id.name,
        revision,
        hash: String::new(),
        runtime,
        restart_policy,
        grace_seconds: pod
            .termination_grace_period_seconds
            .map(|g| g.max(0) as u64)
            .unwrap_or(DEFAULT_GRACE_SECS),
        containers,
        volumes,
        min_ready_seconds: gate.min_ready_seconds,
        progress_deadline_seconds: gate.progress_deadline_seconds,
        host_network: pod.host_network,
        host_pid: pod.host_pid,
        job: job_spec(obj),
        agent_update: None,
        pipeline: None,
        failover: None,
    };
    spec.hash = content_hash(&spec);
    Some(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_api::{parse_file, ModelGate};

    fn objects(yaml: &str) -> BTreeMap<ObjectId, Object> {
        parse_file("t.yaml", yaml)
            .unwrap()
            .objects
            .into_iter()
            .map(|o| (o.id(), o))
            .collect()
    }

    const APP: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: cfg}
data: {greeting: hello, "app.conf": "x=1"}
---
apiVersion: v1
kind: Secret
metadata: {name: sec}
data: {token: c2VjcmV0}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: d}
spec:
  template:
    spec:
      runtimeClassName: process
      terminationGracePeriodSeconds: 5
      containers:
      - name: c
        command: [/bin/sh]
        env:
        - {name: G, valueFrom: {configMapKeyRef: {name: cfg, key: greeting}}}
        - {name: T, valueFrom: {secretKeyRef: {name: sec, key: token}}}
        - {name: O, valueFrom: {secretKeyRef: {name: nope, key: k, optional: true}}}
        volumeMounts: [{name: conf, mountPath: /etc/app}]
      volumes:
      - {name: conf, configMap: {name: cfg}}
"#;

    #[test]
    fn an_onnx_workload_renders_to_a_model_server_gated_on_readiness() {
        let objs = objects(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: digits}\nspec:\n  template:\n    spec:\n      runtimeClassName: onnx\n      containers:\n      - {name: m, image: 'digits:v2', ports: [{containerPort: 5000, hostPort: 30001}]}\n",
        );
        let spec = render(objs.values().next().unwrap(), 1, &objs).unwrap();
        assert_eq!(spec.runtime, Runtime::Process);
        let c = &spec.containers[0];
        let m = c.model.as_ref().unwrap();
        assert_eq!(
            (m.reference.as_str(), m.port, m.host_port),
            ("digits:v2", 5000, Some(30001))
        );
        assert_eq!(m.name_version(), ("digits", "v2"));
        match &c.readiness_probe.as_ref().unwrap().action {
            ProbeAction::HttpGet { port, path, .. } => assert_eq!((*port, path.as_str()), (30001, "/v2/health/ready")),
            other => panic!("{other:?}"),
        }
        // A process workload's spec (and so its hash) carries no model field.
        let objs = objects(APP);
        let ds = objs.values().find(|o| o.kind() == Kind::DaemonSet).unwrap();
        let plain = serde_json::to_value(render(ds, 1, &objs).unwrap()).unwrap();
        assert!(plain["containers"][0].get("model").is_none());
    }

    #[test]
    fn an_onnx_workload_takes_its_model_gate_from_the_rollout_policy_that_covers_it() {
        let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: digits, labels: {app: vision}}\nspec:\n  template:\n    spec:\n      runtimeClassName: onnx\n      containers:\n      - {name: m, image: 'digits:v2', ports: [{containerPort: 5000}]}\n";
        let policy = |name: &str, selector: &str, gate: &str| {
            format!("---\napiVersion: outpost.dev/v1\nkind: RolloutPolicy\nmetadata: {{name: {name}}}\nspec:\n  selector: {selector}\n{gate}")
        };
        let gate_of = |docs: String| {
            let objs = objects(&docs);
            let d = objs.values().find(|o| o.kind() == Kind::Deployment).unwrap();
            let spec = render(d, 1, &objs).unwrap();
            (spec.containers[0].model.as_ref().unwrap().gate.clone(), spec.hash)
        };
        let check = |extra: String, want: Option<ModelGate>| {
            assert_eq!(gate_of(format!("{deployment}{extra}")).0, want, "{extra}");
        };
        // no policy, a policy without a gate, one that does not select it: no model gate
        check(String::new(), None);
        check(policy("p", "{}", "  bake: 0s\n"), None);
        check(policy("p", "{app: other}", "  gate: {modelErrorRate: 0.05}\n"), None);
        // the covering policy's gate, with the default minRequests
        let g = |e: Option<f64>, p99: Option<f64>, n: u64| {
            Some(ModelGate {
                max_error_rate: e,
                max_p99_ms: p99,
                min_requests: n,
            })
        };
        check(
            policy("p", "{app: vision}", "  gate: {modelErrorRate: 0.05, modelP99: 50ms}\n"),
            g(Some(0.05), Some(50.0), 20),
        );
        check(
            policy("p", "{}", "  gate: {modelP99: 0.5s, minRequests: 100}\n"),
            g(None, Some(500.0), 100),
        );
        // the most specific policy wins, as for waves
        check(
            policy("wide", "{}", "  gate: {modelErrorRate: 0.5}\n")
                + &policy("narrow", "{app: vision}", "  gate: {modelErrorRate: 0.01}\n"),
            g(Some(0.01), None, 20),
        );
        // the gate is part of the spec's content
        let (_, plain) = gate_of(deployment.to_string());
        let (_, gated) = gate_of(format!(
            "{deployment}{}",
            policy("p", "{}", "  gate: {modelErrorRate: 0.05}\n")
        ));
        assert_ne!(plain, gated);
    }

    #[test]
    fn render_resolves_env_and_files() {
        let objs = objects(APP);
        let ds = objs.values().find(|o| o.kind() == Kind::DaemonSet).unwrap();
        assert!(missing_references(ds, &objs).is_empty());
        let spec = render(ds, 3, &objs).unwrap();
        assert_eq!(spec.key, "daemonset/default/d");
        assert_eq!(spec.runtime, Runtime::Process);
        assert_eq!(spec.grace_seconds, 5);
        assert_eq!(
            spec.containers[0].env,
            vec![("G".into(), "hello".into()), ("T".into(), "secret".into())]
        );
        match &spec.volumes[0].source {
            VolumeSource::Files { files, secret, .. } => {
                assert!(!secret);
                assert_eq!(files["greeting"], b64(b"hello"));
            }
            other => panic!("{other:?}"),
        }
        // the hash covers resolved values: a ConfigMap change changes the spec
        let mut objs2 = objs.clone();
        if let Some(Object::ConfigMap(c)) = objs2.values_mut().find(|o| o.kind() == Kind::ConfigMap) {
            c.data.insert("greeting".into(), "bye".into());
        }
        assert_ne!(render(ds, 3, &objs2).unwrap().hash, spec.hash);
        assert_eq!(render(ds, 3, &objs).unwrap().hash, spec.hash);
    }

    #[test]
    fn gate_timing_adapts_the_default_and_refuses_impossible_pairs() {
        let dep = |extra: &str| {
            let o = parse_file(
                "d.yaml",
                &format!("apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\nspec:\n{extra}  template:\n    spec:\n      containers: [{{name: c, image: x}}]\n"),
            )
            .unwrap()
            .objects
            .remove(0);
            gate_timing(&o).map(|g| (g.min_ready_seconds, g.progress_deadline_seconds))
        };
        let gate = |m, d| Ok((m, d));
        assert_eq!(dep(""), gate(10, 600));
        // Kubernetes' defaults for minReadySeconds (0) make a 10 s deadline valid: ours adapts
        assert_eq!(dep("  progressDeadlineSeconds: 10\n"), gate(5, 10));
        assert_eq!(dep("  progressDeadlineSeconds: 1\n"), gate(0, 1));
        assert_eq!(dep("  progressDeadlineSeconds: 30\n"), gate(10, 30));
        assert_eq!(
            dep("  minReadySeconds: 9\n  progressDeadlineSeconds: 10\n"),
            gate(9, 10)
        );
        let e = dep("  minReadySeconds: 10\n  progressDeadlineSeconds: 10\n").unwrap_err();
        assert_eq!(e.field, "spec.minReadySeconds");
        assert!(
            e.reason
                .starts_with("10 s is not less than spec.progressDeadlineSeconds (10 s)"),
            "{}",
            e.reason
        );
        assert!(e.reason.contains("raise progressDeadlineSeconds"), "{}", e.reason);
        let e = dep("  minReadySeconds: 900\n").unwrap_err();
        assert_eq!(e.fallback.min_ready_seconds, 300);
        // rendering an old stored pair uses the fallback
        let mut objs = objects(APP);
        if let Some(Object::DaemonSet(d)) = objs.values_mut().find(|o| o.kind() == Kind::DaemonSet) {
            d.spec.min_ready_seconds = Some(700);
        }
        let ds = objs.values().find(|o| o.kind() == Kind::DaemonSet).unwrap();
        let e = gate_timing(ds).unwrap_err();
        assert!(e.reason.contains("the 600 s progress deadline"), "{}", e.reason);
        let spec = render(ds, 1, &objs).unwrap();
        assert_eq!((spec.min_ready_seconds, spec.progress_deadline_seconds), (300, 600));
    }

    #[test]
    fn missing_references_name_the_field() {
        let mut objs = objects(APP);
        objs.retain(|id, _| id.kind == Kind::DaemonSet);
        let ds = objs.values().next().unwrap();
        let errs: Vec<String> = missing_references(ds, &objs).iter().map(|e| e.to_string()).collect();
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(
            errs[0].contains("env[0].valueFrom.configMapKeyRef.name: ConfigMap default/cfg does not exist"),
            "{errs:?}"
        );
        assert!(errs[2].contains("volumes[0].configMap.name"), "{errs:?}");
        let cfg = ObjectId {
            kind: Kind::ConfigMap,
            namespace: "default".into(),
            name: "cfg".into(),
        };
        assert!(references(ds, &cfg));
        assert!(!references(
            ds,
            &ObjectId {
                name: "other".into(),
                ..cfg
            }
        ));
    }

    #[test]
    fn node_ports_are_assigned_kept_and_collisions_refused() {
        let svc = |name: &str, port_line: &str| {
            let yaml = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec: {{type: NodePort, selector: {{app: a}}, ports: [{port_line}]}}"
            );
            parse_file("s.yaml", &yaml).unwrap().objects.remove(0)
        };
        let port_of = |o: &Object| match o {
            Object::Service(s) => s.spec.ports[0].node_port,
            _ => None,
        };
        // lowest free, skipping one held by another Service
        let stored = vec![svc("held", "{port: 80, nodePort: 30000}")];
        let mut batch = vec![svc("new", "{port: 80}")];
        assert!(assign_node_ports(&mut batch, &stored).is_empty());
        assert_eq!(port_of(&batch[0]), Some(30001));
        // re-applying without nodePort keeps the port it had
        let stored = vec![
            svc("held", "{port: 80, nodePort: 30000}"),
            svc("new", "{port: 80, nodePort: 30007}"),
        ];
        let mut batch = vec![svc("new", "{port: 80}")];
        assert!(assign_node_ports(&mut batch, &stored).is_empty());
        assert_eq!(port_of(&batch[0]), Some(30007));
        // a collision with another Service is refused, naming the field
        let mut batch = vec![svc("other", "{port: 80, nodePort: 30000}")];
        let errors = assign_node_ports(&mut batch, &stored);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].field, "spec.ports[0].nodePort");
        assert!(
            errors[0].reason.contains("already used by Service/default/held"),
            "{}",
            errors[0].reason
        );
        // two Services of one batch cannot share a port either
        let mut batch = vec![
            svc("sx", "{port: 80, nodePort: 30100}"),
            svc("sy", "{port: 81, nodePort: 30100}"),
        ];
        assert_eq!(assign_node_ports(&mut batch, &[]).len(), 1);
        // the same port under another protocol is a different port
        let mut batch = vec![svc("su", "{port: 53, protocol: UDP, nodePort: 30000}")];
        assert!(assign_node_ports(&mut batch, &stored).is_empty());
    }

    #[test]
    fn env_from_expands_keys_and_env_wins() {
        let yaml = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\ndata: {A: from-cm, B: from-cm}\n---\n\
apiVersion: v1\nkind: Secret\nmetadata: {name: sec}\nstringData: {TOKEN: s3cret}\n---\n\
apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: app}\nspec:\n  template:\n    spec:\n      containers:\n      - name: c\n        image: 'app:1'\n        envFrom: [{configMapRef: {name: cfg}}, {secretRef: {name: sec}, prefix: S_}]\n        env: [{name: B, value: explicit}]\n";
        let objs: BTreeMap<ObjectId, Object> = parse_file("f.yaml", yaml)
            .unwrap()
            .objects
            .into_iter()
            .map(|o| (o.id(), o))
            .collect();
        let ds = objs.values().find(|o| o.kind() == Kind::DaemonSet).unwrap();
        let spec = render(ds, 1, &objs).unwrap();
        let env: BTreeMap<_, _> = spec.containers[0].env.iter().cloned().collect();
        assert_eq!(env["A"], "from-cm");
        assert_eq!(env["B"], "explicit");
        assert_eq!(env["S_TOKEN"], "s3cret");
        let mut missing = objs.clone();
        missing.retain(|id, _| id.kind != Kind::Secret);
        let errors = missing_references(ds, &missing);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].field.ends_with("envFrom[1].secretRef.name"), "{errors:?}");
    }
}
