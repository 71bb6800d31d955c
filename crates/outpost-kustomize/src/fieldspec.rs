//! Field specs: "this path, in objects of this group/version/kind", the way kustomize says
//! where labels, annotations and references live. A path walks maps by key and, on meeting a
//! list, walks every element with the rest of the path.

use serde_json::{Map, Value};

use crate::resource::Res;

#[derive(Debug, Clone, Copy)]
pub struct FieldSpec {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub path: &'static str,
    pub create: bool,
}

pub const fn fs(kind: &'static str, path: &'static str, create: bool) -> FieldSpec {
    FieldSpec {
        group: "",
        version: "",
        kind,
        path,
        create,
    }
}

pub const fn fsg(group: &'static str, kind: &'static str, path: &'static str, create: bool) -> FieldSpec {
    FieldSpec {
        group,
        version: "",
        kind,
        path,
        create,
    }
}

pub const fn fsv(version: &'static str, kind: &'static str, path: &'static str, create: bool) -> FieldSpec {
    FieldSpec {
        group: "",
        version,
        kind,
        path,
        create,
    }
}

impl FieldSpec {
    pub fn selects(&self, group: &str, version: &str, kind: &str) -> bool {
        (self.group.is_empty() || self.group == group)
            && (self.version.is_empty() || self.version == version)
            && (self.kind.is_empty() || self.kind == kind)
    }
    pub fn selects_res(&self, r: &Res) -> bool {
        let (g, v) = r.group_version();
        self.selects(&g, &v, r.kind())
    }
}

/// The path's segments; a segment ending in `[]` names a list (never created).
fn segments(path: &str) -> Vec<String> {
    // `\/` escapes a slash inside a key (annotation names).
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = path.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'/') => {
                cur.push('/');
                chars.next();
            }
            '/' => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// Calls `f` on every value at `path` in `obj`. With `create`, missing maps on the way and
/// the final value (as `Value::Null`) are created; lists are never created.
pub fn visit(obj: &mut Map<String, Value>, path: &str, create: bool, f: &mut dyn FnMut(&mut Value)) {
    let segs = segments(path);
    visit_map(obj, &segs, create, f);
}

fn visit_map(obj: &mut Map<String, Value>, segs: &[String], create: bool, f: &mut dyn FnMut(&mut Value)) {
    let Some((first, rest)) = segs.split_first() else {
        return;
    };
    let (first, is_list) = match first.strip_suffix("[]") {
        Some(name) => (name.to_string(), true),
        None => (first.clone(), false),
    };
    if !obj.contains_key(first.as_str()) {
        if !create || is_list {
            return;
        }
        let v = if rest.is_empty() {
            Value::Null
        } else {
            Value::Object(Map::new())
        };
        obj.insert(first.clone(), v);
    }
    let v = obj.get_mut(first.as_str()).expect("present");
    visit_value(v, rest, create, f);
}

fn visit_value(v: &mut Value, rest: &[String], create: bool, f: &mut dyn FnMut(&mut Value)) {
    match v {
        Value::Array(items) if !rest.is_empty() => {
            for item in items {
                visit_value(item, rest, create, f);
            }
        }
        _ if rest.is_empty() => f(v),
        Value::Object(m) => visit_map(m, rest, create, f),
        Value::Null if create => {
            *v = Value::Object(Map::new());
            if let Value::Object(m) = v {
                visit_map(m, rest, create, f);
            }
        }
        _ => {}
    }
}

/// Adds `pairs` into the string map at every spec'd path of `r`.
pub fn add_pairs(r: &mut Res, specs: &[FieldSpec], pairs: &[(String, String)]) {
    for spec in specs {
        if !spec.selects_res(r) {
            continue;
        }
        visit(&mut r.obj, spec.path, spec.create, &mut |v| {
            if v.is_null() {
                *v = Value::Object(Map::new());
            }
            if let Value::Object(m) = v {
                for (k, val) in pairs {
                    m.insert(k.clone(), Value::String(val.clone()));
                }
            }
        });
    }
}

/// Where kustomize puts labels in pod templates (its `templateLabels`).
pub const TEMPLATE_LABELS: &[FieldSpec] = &[
    fsv("v1", "ReplicationController", "spec/template/metadata/labels", true),
    fs("Deployment", "spec/template/metadata/labels", true),
    fs("ReplicaSet", "spec/template/metadata/labels", true),
    fs("DaemonSet", "spec/template/metadata/labels", true),
    fsg("apps", "StatefulSet", "spec/template/metadata/labels", true),
    fsg("batch", "Job", "spec/template/metadata/labels", true),
    fsg("batch", "CronJob", "spec/jobTemplate/metadata/labels", true),
    fsg(
        "batch",
        "CronJob",
        "spec/jobTemplate/spec/template/metadata/labels",
        true,
    ),
];

pub const METADATA_LABELS: FieldSpec = fs("", "metadata/labels", true);

/// Where kustomize puts `commonLabels` and `labels` with `includeSelectors` besides metadata
/// and templates: the selectors.
pub const SELECTOR_LABELS: &[FieldSpec] = &[
    fsv("v1", "Service", "spec/selector", true),
    fsv("v1", "ReplicationController", "spec/selector", true),
    fs("Deployment", "spec/selector/matchLabels", true),
    fsg("apps", "Deployment", "spec/template/spec/affinity/podAffinity/preferredDuringSchedulingIgnoredDuringExecution/podAffinityTerm/labelSelector/matchLabels", false),
    fsg("apps", "Deployment", "spec/template/spec/affinity/podAffinity/requiredDuringSchedulingIgnoredDuringExecution/labelSelector/matchLabels", false),
    fsg("apps", "Deployment", "spec/template/spec/affinity/podAntiAffinity/preferredDuringSchedulingIgnoredDuringExecution/podAffinityTerm/labelSelector/matchLabels", false),
    fsg("apps", "Deployment", "spec/template/spec/affinity/podAntiAffinity/requiredDuringSchedulingIgnoredDuringExecution/labelSelector/matchLabels", false),
    fsg("apps", "Deployment", "spec/template/spec/topologySpreadConstraints/labelSelector/matchLabels", false),
    fs("ReplicaSet", "spec/selector/matchLabels", true),
    fs("DaemonSet", "spec/selector/matchLabels", true),
    fsg("apps", "StatefulSet", "spec/selector/matchLabels", true),
    fsg("apps", "StatefulSet", "spec/volumeClaimTemplates[]/metadata/labels", true),
    fsg("apps", "StatefulSet", "spec/template/spec/affinity/podAffinity/preferredDuringSchedulingIgnoredDuringExecution/podAffinityTerm/labelSelector/matchLabels", false),
    fsg("apps", "StatefulSet", "spec/template/spec/affinity/podAffinity/requiredDuringSchedulingIgnoredDuringExecution/labelSelector/matchLabels", false),
    fsg("apps", "StatefulSet", "spec/template/spec/affinity/podAntiAffinity/preferredDuringSchedulingIgnoredDuringExecution/podAffinityTerm/labelSelector/matchLabels", false),
    fsg("apps", "StatefulSet", "spec/template/spec/affinity/podAntiAffinity/requiredDuringSchedulingIgnoredDuringExecution/labelSelector/matchLabels", false),
    fsg("apps", "StatefulSet", "spec/template/spec/topologySpreadConstraints/labelSelector/matchLabels", false),
    fsg("batch", "Job", "spec/selector/matchLabels", false),
    fsg("batch", "CronJob", "spec/jobTemplate/spec/selector/matchLabels", false),
    fsg("policy", "PodDisruptionBudget", "spec/selector/matchLabels", false),
    fsg("networking.k8s.io", "NetworkPolicy", "spec/podSelector/matchLabels", false),
    fsg("networking.k8s.io", "NetworkPolicy", "spec/ingress/from/podSelector/matchLabels", false),
    fsg("networking.k8s.io", "NetworkPolicy", "spec/egress/to/podSelector/matchLabels", false),
];

/// Where `commonAnnotations` go.
pub const ANNOTATIONS: &[FieldSpec] = &[
    fs("", "metadata/annotations", true),
    fsv(
        "v1",
        "ReplicationController",
        "spec/template/metadata/annotations",
        true,
    ),
    fs("Deployment", "spec/template/metadata/annotations", true),
    fs("ReplicaSet", "spec/template/metadata/annotations", true),
    fs("DaemonSet", "spec/template/metadata/annotations", true),
    fsg("apps", "StatefulSet", "spec/template/metadata/annotations", true),
    fsg("batch", "Job", "spec/template/metadata/annotations", true),
    fsg("batch", "CronJob", "spec/jobTemplate/metadata/annotations", true),
    fsg(
        "batch",
        "CronJob",
        "spec/jobTemplate/spec/template/metadata/annotations",
        true,
    ),
];

/// Where `replicas` go.
pub const REPLICAS: &[FieldSpec] = &[
    fs("Deployment", "spec/replicas", true),
    fs("ReplicationController", "spec/replicas", true),
    fs("ReplicaSet", "spec/replicas", true),
    fs("StatefulSet", "spec/replicas", true),
];

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn visit_walks_lists_and_creates_maps_only() {
        let mut obj = json!({"spec": {"containers": [{"name": "a"}, {"name": "b", "env": [{"name": "X"}]}]}});
        let mut seen = Vec::new();
        visit(
            obj.as_object_mut().unwrap(),
            "spec/containers/env/name",
            false,
            &mut |v| seen.push(v.clone()),
        );
        assert_eq!(seen, vec![json!("X")]);
        visit(
            obj.as_object_mut().unwrap(),
            "spec/selector/matchLabels",
            true,
            &mut |v| *v = json!({"a": "b"}),
        );
        assert_eq!(obj["spec"]["selector"]["matchLabels"], json!({"a": "b"}));
        assert_eq!(
            segments(r"metadata/annotations/nginx.ingress.kubernetes.io\/auth-secret")[2],
            "nginx.ingress.kubernetes.io/auth-secret"
        );
    }

    #[test]
    fn list_segments_are_walked_never_created() {
        let mut obj = json!({"spec": {}});
        visit(
            obj.as_object_mut().unwrap(),
            "spec/volumeClaimTemplates[]/metadata/labels",
            true,
            &mut |v| *v = json!({"a": "b"}),
        );
        assert_eq!(obj, json!({"spec": {}}));
        let mut obj = json!({"spec": {"volumeClaimTemplates": [{"metadata": {"name": "d"}}]}});
        visit(
            obj.as_object_mut().unwrap(),
            "spec/volumeClaimTemplates[]/metadata/labels",
            true,
            &mut |v| *v = json!({"a": "b"}),
        );
        assert_eq!(
            obj["spec"]["volumeClaimTemplates"][0]["metadata"]["labels"],
            json!({"a": "b"})
        );
    }
}
