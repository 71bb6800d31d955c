//! References to renamed objects: after prefixes, suffixes and hash suffixes, every field
//! that names a ConfigMap, Secret, Service, ServiceAccount, claim, role... by one of its old
//! names gets its new name, when the object it names is among the rendered ones (same
//! namespace as the referrer, except for cluster-scoped objects and ServiceAccounts).

use serde_json::Value;

use crate::fieldspec;
use crate::resource::{is_cluster_scoped, ns_eq, Res};

/// Kinds whose pod spec sits under a prefix.
const POD_SPECS: &[(&str, &str)] = &[
    ("Pod", "spec"),
    ("PodTemplate", "template/spec"),
    ("Deployment", "spec/template/spec"),
    ("ReplicaSet", "spec/template/spec"),
    ("DaemonSet", "spec/template/spec"),
    ("StatefulSet", "spec/template/spec"),
    ("Job", "spec/template/spec"),
    ("CronJob", "spec/jobTemplate/spec/template/spec"),
];

const SA_PVC_KINDS: &[(&str, &str)] = &[
    ("Pod", "spec"),
    ("StatefulSet", "spec/template/spec"),
    ("Deployment", "spec/template/spec"),
    ("ReplicationController", "spec/template/spec"),
    ("CronJob", "spec/jobTemplate/spec/template/spec"),
    ("Job", "spec/template/spec"),
    ("DaemonSet", "spec/template/spec"),
];

struct Spec {
    kind: String,
    path: String,
}

fn pod_paths(kinds: &[(&str, &str)], rels: &[&str]) -> Vec<Spec> {
    let mut out = Vec::new();
    for (kind, prefix) in kinds {
        for rel in rels {
            out.push(Spec {
                kind: kind.to_string(),
                path: format!("{prefix}/{rel}"),
            });
        }
    }
    out
}

/// (referenced kind, where it is referenced).
fn table() -> Vec<(&'static str, Vec<Spec>)> {
    let s = |kind: &str, path: &str| Spec {
        kind: kind.into(),
        path: path.into(),
    };
    let mut cm = pod_paths(
        POD_SPECS,
        &[
            "volumes/configMap/name",
            "containers/env/valueFrom/configMapKeyRef/name",
            "initContainers/env/valueFrom/configMapKeyRef/name",
            "containers/envFrom/configMapRef/name",
            "initContainers/envFrom/configMapRef/name",
            "volumes/projected/sources/configMap/name",
        ],
    );
    cm.push(s("Node", "spec/configSource/configMap"));
    cm.push(s("Role", "rules/resourceNames"));
    cm.push(s("ClusterRole", "rules/resourceNames"));
    let mut secret = pod_paths(
        POD_SPECS,
        &[
            "volumes/secret/secretName",
            "containers/env/valueFrom/secretKeyRef/name",
            "initContainers/env/valueFrom/secretKeyRef/name",
            "containers/envFrom/secretRef/name",
            "initContainers/envFrom/secretRef/name",
            "imagePullSecrets/name",
            "volumes/projected/sources/secret/name",
        ],
    );
    secret.extend([
        s("Ingress", "spec/tls/secretName"),
        s("ServiceAccount", "imagePullSecrets/name"),
        s("StorageClass", "parameters/secretName"),
        s("StorageClass", "parameters/adminSecretName"),
        s("StorageClass", "parameters/userSecretName"),
        s("StorageClass", "parameters/secretRef"),
        s("Role", "rules/resourceNames"),
        s("ClusterRole", "rules/resourceNames"),
        s("PersistentVolume", "spec/azureFile/secretName"),
    ]);
    let service = vec![
        s("StatefulSet", "spec/serviceName"),
        s("Ingress", "spec/rules/http/paths/backend/serviceName"),
        s("Ingress", "spec/backend/serviceName"),
        s("Ingress", "spec/rules/http/paths/backend/service/name"),
        s("Ingress", "spec/defaultBackend/service/name"),
        s("APIService", "spec/service/name"),
        s("HTTPRoute", "spec/rules/backendRefs/name"),
    ];
    let mut sa = pod_paths(SA_PVC_KINDS, &["serviceAccountName"]);
    sa.push(s("RoleBinding", "subjects"));
    sa.push(s("ClusterRoleBinding", "subjects"));
    let pvc = pod_paths(SA_PVC_KINDS, &["volumes/persistentVolumeClaim/claimName"]);
    let priority = pod_paths(SA_PVC_KINDS, &["priorityClassName"]);
    let scale = ["Deployment", "ReplicationController", "ReplicaSet", "StatefulSet"];
    let mut out: Vec<(&'static str, Vec<Spec>)> = vec![
        ("ConfigMap", cm),
        ("Secret", secret),
        ("Service", service),
        ("ServiceAccount", sa),
        ("PersistentVolumeClaim", pvc),
        (
            "PersistentVolume",
            vec![
                s("PersistentVolumeClaim", "spec/volumeName"),
                s("ClusterRole", "rules/resourceNames"),
            ],
        ),
        (
            "StorageClass",
            vec![
                s("PersistentVolume", "spec/storageClassName"),
                s("PersistentVolumeClaim", "spec/storageClassName"),
                s("StatefulSet", "spec/volumeClaimTemplates/spec/storageClassName"),
            ],
        ),
        ("PriorityClass", priority),
        ("Role", vec![s("RoleBinding", "roleRef/name")]),
        (
            "ClusterRole",
            vec![
                s("RoleBinding", "roleRef/name"),
                s("ClusterRoleBinding", "roleRef/name"),
            ],
        ),
        ("IngressClass", vec![s("Ingress", "spec/ingressClassName")]),
    ];
    for k in scale {
        out.push((k, vec![s("HorizontalPodAutoscaler", "spec/scaleTargetRef/name")]));
    }
    out
}

/// Rewrites references in `ra`. Fails when a reference is ambiguous.
pub fn fix(ra: &mut [Res]) -> Result<(), String> {
    let renamed: Vec<usize> = (0..ra.len())
        .filter(|&i| ra[i].prev.iter().any(|p| p.name != ra[i].name()))
        .collect();
    if renamed.is_empty() {
        return Ok(());
    }
    let snapshot: Vec<Res> = ra.to_vec();
    for (ref_kind, specs) in table() {
        let candidates: Vec<&Res> = renamed
            .iter()
            .map(|&i| &snapshot[i])
            .filter(|r| r.kind() == ref_kind)
            .collect();
        if candidates.is_empty() {
            continue;
        }
        for referrer in ra.iter_mut() {
            let referrer_ns = referrer.namespace().to_string();
            let referrer_cluster = referrer.cluster_scoped();
            let referrer_kind = referrer.kind().to_string();
            for spec in specs.iter().filter(|s| s.kind == referrer_kind) {
                let pick = |old: &str| -> Result<Option<String>, String> {
                    let found: Vec<&&Res> = candidates
                        .iter()
                        .filter(|c| c.prev.iter().any(|p| p.name == old))
                        .filter(|c| {
                            referrer_cluster
                                || is_cluster_scoped(c.kind())
                                || c.kind() == "ServiceAccount"
                                || ns_eq(c.namespace(), &referrer_ns)
                        })
                        .collect();
                    match found.as_slice() {
                        [] => Ok(None),
                        [one] => Ok(Some(one.name().to_string())),
                        many if many.iter().all(|c| c.name() == many[0].name()) => Ok(Some(many[0].name().to_string())),
                        many => Err(format!(
                            "`{old}` may name any of {}; give them distinct names",
                            many.iter().map(|c| c.id().to_string()).collect::<Vec<_>>().join(", ")
                        )),
                    }
                };
                let mut err = None;
                let is_subjects = spec.path == "subjects";
                let is_role_ref = spec.path == "roleRef/name";
                if is_role_ref {
                    let kind_ok = referrer
                        .obj
                        .get("roleRef")
                        .and_then(|r| r.get("kind"))
                        .and_then(|k| k.as_str())
                        == Some(ref_kind);
                    if !kind_ok {
                        continue;
                    }
                }
                fieldspec::visit(&mut referrer.obj, &spec.path, false, &mut |v| {
                    let mut one = |s: &mut String| match pick(s) {
                        Ok(Some(n)) => *s = n,
                        Ok(None) => {}
                        Err(e) => err = Some(e),
                    };
                    match v {
                        Value::String(s) if !is_subjects => one(s),
                        Value::Array(items) if !is_subjects => {
                            for i in items.iter_mut() {
                                if let Value::String(s) = i {
                                    one(s)
                                }
                            }
                        }
                        Value::Array(items) if is_subjects => {
                            for m in items.iter_mut().filter_map(|i| i.as_object_mut()) {
                                if m.get("kind").and_then(|k| k.as_str()) == Some(ref_kind) {
                                    if let Some(Value::String(s)) = m.get_mut("name") {
                                        one(s)
                                    }
                                }
                            }
                        }
                        _ => {}
                    }
                });
                if let Some(e) = err {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}
