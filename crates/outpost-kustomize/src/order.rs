//! kustomize's legacy output order: kinds in a fixed priority (Namespace first, webhooks
//! last), then by group/version/kind, then by namespace and name.

use crate::resource::Res;

const FIRST: &[&str] = &[
    "Namespace",
    "ResourceQuota",
    "StorageClass",
    "CustomResourceDefinition",
    "ServiceAccount",
    "PodSecurityPolicy",
    "Role",
    "ClusterRole",
    "RoleBinding",
    "ClusterRoleBinding",
    "ConfigMap",
    "Secret",
    "Endpoints",
    "Service",
    "LimitRange",
    "PriorityClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "Deployment",
    "StatefulSet",
    "CronJob",
    "PodDisruptionBudget",
];
const LAST: &[&str] = &["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"];

fn rank(kind: &str) -> i64 {
    if let Some(i) = FIRST.iter().position(|k| *k == kind) {
        return i as i64 - FIRST.len() as i64;
    }
    if let Some(i) = LAST.iter().position(|k| *k == kind) {
        return 1 + i as i64;
    }
    0
}

fn or(s: &str, d: &str) -> String {
    if s.is_empty() {
        d.to_string()
    } else {
        s.to_string()
    }
}

/// The sort key: rank, then `group_version_kind` with kustomize's placeholders for empty
/// parts, then `namespace|name`.
fn key(r: &Res) -> (i64, String, String) {
    let id = r.id();
    let gvk = format!(
        "{}_{}_{}",
        or(&id.group, "~G"),
        or(&id.version, "~V"),
        or(&id.kind, "~K")
    );
    (
        rank(&id.kind),
        gvk,
        format!("{}|{}", or(&id.namespace, "~X"), or(&id.name, "~N")),
    )
}

pub fn legacy_sort(ra: &mut [Res]) {
    ra.sort_by_cached_key(key);
}
