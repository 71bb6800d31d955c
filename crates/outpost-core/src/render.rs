//! Rendering a workload object into the fully resolved [`WorkloadSpec`] a node runs, and the
//! cross-object checks (references to ConfigMaps and Secrets) done at apply and delete.

use std::collections::BTreeMap;

use base64::Engine;
use outpost_api::{
    content_hash, parse_cpu, parse_memory, probe_port, ConfigMap, Container, ContainerSpec, Kind, ManifestError,
    ModelServe, MountSpec, Object, ObjectId, PortSpec, Probe, ProbeAction, ProbeSpec, PullPolicy, RestartPolicy,
    Runtime, Secret, VolumeSource, VolumeSpec, WorkloadSpec, DEFAULT_MIN_READY_SECS, DEFAULT_PROGRESS_DEADLINE_SECS,
    ONNX_RUNTIME, PROCESS_RUNTIME,
};

/// Default grace period, as in Kubernetes.
pub const DEFAULT_GRACE_SECS: u64 = 30;

/// Read access to the ConfigMaps and Secrets a workload may reference.
pub trait ConfigSource {
    fn config_map(&self, namespace: &str, name: &str) -> Option<&ConfigMap>;
    fn secret(&self, namespace: &str, name: &str) -> Option<&Secret>;
    /// Services of a namespace.
    fn services(&self, namespace: &str) -> Vec<&outpost_api::Service>;
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
    fn services(&self, namespace: &str) -> Vec<&outpost_api::Service> {
        self.values()
            .filter_map(|o| match o {
                Object::Service(s) if s.metadata.ns() == namespace => Some(s),
                _ => None,
            })
            .collect()
    }
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
    for (i, c) in t.spec.containers.iter().enumerate() {
        for (j, e) in c.env.iter().enumerate() {
            let Some(vf) = &e.value_from else { continue };
            let f = format!("spec.template.spec.containers[{i}].env[{j}].valueFrom");
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
    for (i, v) in t.spec.volumes.iter().enumerate() {
        let f = format!("spec.template.spec.volumes[{i}]");
        if let Some(cm) = &v.config_map {
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

/// Does this workload reference the given ConfigMap or Secret?
pub fn references(obj: &Object, target: &ObjectId) -> bool {
    let Some(t) = obj.template() else { return false };
    if obj.meta().ns() != target.namespace {
        return false;
    }
    let name = target.name.as_str();
    let env_hit = t
        .spec
        .containers
        .iter()
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
        },
        initial_delay_seconds: 0,
        period_seconds: 1,
        timeout_seconds: 1,
        failure_threshold: 3,
        success_threshold: 1,
    })
}

/// Render a Deployment or DaemonSet at `revision`. Missing optional references are skipped;
/// missing required ones were rejected at apply, and are skipped here too.
pub fn render(obj: &Object, revision: u64, src: &impl ConfigSource) -> Option<WorkloadSpec> {
    let t = obj.template()?;
    let ns = obj.meta().ns().to_string();
    let pod = &t.spec;
    // An ONNX serving workload runs as processes: the agent starts `outpost serve-model`.
    let onnx = pod.runtime_class_name.as_deref() == Some(ONNX_RUNTIME);
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
    let mut containers: Vec<ContainerSpec> = pod
        .containers
        .iter()
        .map(|c| {
            let env = c
                .env
                .iter()
                .filter_map(|e| {
                    let value = match (&e.value, &e.value_from) {
                        (Some(v), _) => Some(v.clone()),
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
                model: onnx.then(|| model_serve(c)).flatten(),
            }
        })
        .collect();
    if runtime == Runtime::Docker {
        let empty = outpost_api::Labels::new();
        let labels = t.metadata.as_ref().map_or(&empty, |m| &m.labels);
        apply_node_ports(&mut containers, labels, pod, &ns, src);
    }
    let volumes = pod
        .volumes
        .iter()
        .map(|v| {
            let source = if let Some(hp) = &v.host_path {
                VolumeSource::HostPath {
                    path: hp.path.clone(),
                    create: hp.type_.as_deref() == Some("DirectoryOrCreate"),
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
                VolumeSource::Files { files, secret: false }
            } else if let Some(s) = &v.secret {
                let mut files = BTreeMap::new();
                if let Some(sec) = src.secret(&ns, &s.secret_name) {
                    for k in sec.data.keys().chain(sec.string_data.keys()) {
                        if let Some(b) = secret_value(sec, k) {
                            files.insert(k.clone(), b64(&b));
                        }
                    }
                }
                VolumeSource::Files { files, secret: true }
            } else {
                VolumeSource::EmptyDir
            };
            VolumeSpec {
                name: v.name.clone(),
                source,
            }
        })
        .collect();
    let (min_ready, deadline) = match obj {
        Object::Deployment(d) => (d.spec.min_ready_seconds, d.spec.progress_deadline_seconds),
        Object::DaemonSet(d) => (d.spec.min_ready_seconds, None),
        _ => (None, None),
    };
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
        min_ready_seconds: min_ready.map_or(DEFAULT_MIN_READY_SECS, u64::from),
        progress_deadline_seconds: deadline.map_or(DEFAULT_PROGRESS_DEADLINE_SECS, u64::from),
    };
    spec.hash = content_hash(&spec);
    Some(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_api::parse_file;

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
            VolumeSource::Files { files, secret } => {
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
}
