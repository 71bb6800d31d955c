//! Resources as the engine carries them: the object, the ids it had before (names and
//! namespaces change under prefixes, suffixes, namespaces and hashes, and references are
//! rewritten from those old ids at the end), and generator options.

use serde_json::{Map, Value};

/// Group, version, kind, namespace and name of an object.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResId {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl ResId {
    /// Same object, where an empty namespace and `default` are the same namespace.
    pub fn same(&self, o: &ResId) -> bool {
        self.group == o.group
            && self.version == o.version
            && self.kind == o.kind
            && self.name == o.name
            && ns_eq(&self.namespace, &o.namespace)
    }
}

impl std::fmt::Display for ResId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gv = if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        };
        write!(f, "{} {}", gv, self.kind)?;
        if !self.namespace.is_empty() {
            write!(f, " {}/{}", self.namespace, self.name)
        } else {
            write!(f, " {}", self.name)
        }
    }
}

pub fn ns_eq(a: &str, b: &str) -> bool {
    let n = |s: &str| {
        if s.is_empty() {
            "default".to_string()
        } else {
            s.to_string()
        }
    };
    n(a) == n(b)
}

/// Generator settings carried by a generated ConfigMap or Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenInfo {
    pub hash: bool,
}

#[derive(Debug, Clone)]
pub struct Res {
    pub obj: Map<String, Value>,
    /// Ids this object had before its current one, oldest first.
    pub prev: Vec<ResId>,
    pub gen: Option<GenInfo>,
}

pub fn split_api_version(api: &str) -> (String, String) {
    match api.split_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (String::new(), api.to_string()),
    }
}

fn str_at<'a>(obj: &'a Map<String, Value>, path: &[&str]) -> &'a str {
    let mut cur = obj;
    for (i, p) in path.iter().enumerate() {
        match cur.get(*p) {
            Some(Value::Object(m)) if i + 1 < path.len() => cur = m,
            Some(Value::String(s)) if i + 1 == path.len() => return s,
            _ => return "",
        }
    }
    ""
}

impl Res {
    pub fn new(obj: Map<String, Value>) -> Self {
        Res {
            obj,
            prev: Vec::new(),
            gen: None,
        }
    }
    pub fn kind(&self) -> &str {
        str_at(&self.obj, &["kind"])
    }
    pub fn name(&self) -> &str {
        str_at(&self.obj, &["metadata", "name"])
    }
    pub fn namespace(&self) -> &str {
        str_at(&self.obj, &["metadata", "namespace"])
    }
    pub fn group_version(&self) -> (String, String) {
        split_api_version(str_at(&self.obj, &["apiVersion"]))
    }
    pub fn id(&self) -> ResId {
        let (group, version) = self.group_version();
        ResId {
            group,
            version,
            kind: self.kind().to_string(),
            namespace: self.namespace().to_string(),
            name: self.name().to_string(),
        }
    }
    /// The id the object had when it was read or generated.
    pub fn org_id(&self) -> ResId {
        self.prev.first().cloned().unwrap_or_else(|| self.id())
    }
    /// Current and previous ids.
    pub fn any_id(&self, f: impl Fn(&ResId) -> bool) -> bool {
        f(&self.id()) || self.prev.iter().any(f)
    }
    pub fn metadata_mut(&mut self) -> &mut Map<String, Value> {
        let m = self.obj.entry("metadata").or_insert_with(|| Value::Object(Map::new()));
        if !m.is_object() {
            *m = Value::Object(Map::new());
        }
        m.as_object_mut().expect("metadata is an object")
    }
    pub fn set_name(&mut self, name: &str) {
        if self.name() == name {
            return;
        }
        self.prev.push(self.id());
        self.metadata_mut().insert("name".into(), Value::String(name.into()));
    }
    pub fn set_namespace(&mut self, ns: &str) {
        if self.namespace() == ns {
            return;
        }
        self.prev.push(self.id());
        self.metadata_mut().insert("namespace".into(), Value::String(ns.into()));
    }
    pub fn string_map(&self, key: &str) -> Map<String, Value> {
        self.obj
            .get("metadata")
            .and_then(|m| m.get(key))
            .and_then(|v| v.as_object())
            .cloned()
            .unwrap_or_default()
    }
    pub fn cluster_scoped(&self) -> bool {
        is_cluster_scoped(self.kind())
    }
}

/// Kinds Kubernetes keeps outside namespaces (the built-in ones; custom kinds count as
/// namespaced, as kustomize counts them without their CRD).
pub fn is_cluster_scoped(kind: &str) -> bool {
    matches!(
        kind,
        "Namespace"
            | "Node"
            | "PersistentVolume"
            | "ClusterRole"
            | "ClusterRoleBinding"
            | "CustomResourceDefinition"
            | "StorageClass"
            | "PriorityClass"
            | "MutatingWebhookConfiguration"
            | "ValidatingWebhookConfiguration"
            | "ValidatingAdmissionPolicy"
            | "ValidatingAdmissionPolicyBinding"
            | "APIService"
            | "CSIDriver"
            | "CSINode"
            | "IngressClass"
            | "RuntimeClass"
            | "VolumeAttachment"
            | "CertificateSigningRequest"
            | "PodSecurityPolicy"
            | "ComponentStatus"
            | "FlowSchema"
            | "PriorityLevelConfiguration"
            | "SelfSubjectReview"
            | "TokenReview"
            | "SubjectAccessReview"
            | "SelfSubjectAccessReview"
            | "SelfSubjectRulesReview"
    )
}
