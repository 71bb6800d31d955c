//! Strategic merge patches over `serde_json::Value`, the subset kustomize users write.
//!
//! Maps merge key by key; a `null` in the patch deletes the key; `$patch: delete` deletes
//! the map (or the list element) it sits in, `$patch: replace` replaces it. Lists of objects
//! with a Kubernetes merge key (`containers` by `name`, `volumeMounts` by `mountPath`...) merge
//! element by element: the patch's elements first, in the patch's order, then the target's
//! elements the patch does not name (the order `kubectl kustomize` produces). Ports, keyed by
//! port and protocol, keep the target's order with new ones in front (see `merge_composite`).
//! Every other list is replaced.

use serde_json::{Map, Value};

/// The merge key of a list field, by the field's name and the elements it holds.
fn merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims"
        | "schedulingGates" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "hostAliases" => "ip",
        "topologySpreadConstraints" => "topologyKey",
        "conditions" => "type",
        "ownerReferences" => "uid",
        _ => return None,
    })
}

const DIRECTIVE: &str = "$patch";

/// Merge `patch` into `target`. Returns `false` when the patch deletes the whole object.
pub fn merge_object(target: &mut Map<String, Value>, patch: &Map<String, Value>) -> bool {
    match patch.get(DIRECTIVE).and_then(|v| v.as_str()) {
        Some("delete") => return false,
        Some("replace") => {
            *target = strip(patch);
            return true;
        }
        _ => {}
    }
    for (k, pv) in patch {
        if k == DIRECTIVE || k.starts_with("$setElementOrder") || k == "$retainKeys" {
            continue;
        }
        if pv.is_null() {
            target.remove(k);
            continue;
        }
        match (target.get_mut(k), pv) {
            (Some(Value::Object(tm)), Value::Object(pm)) => {
                if !merge_object(tm, pm) {
                    target.remove(k);
                }
            }
            (Some(Value::Array(ta)), Value::Array(pa)) => {
                let merged = merge_list(k, ta, pa);
                target.insert(k.clone(), Value::Array(merged));
            }
            (_, Value::Object(pm)) => {
                if pm.get(DIRECTIVE).and_then(|v| v.as_str()) == Some("delete") {
                    target.remove(k);
                } else {
                    target.insert(k.clone(), Value::Object(strip(pm)));
                }
            }
            (_, Value::Array(pa)) => {
                let items: Vec<Value> = pa.iter().filter(|v| !is_delete(v)).map(strip_value).collect();
                target.insert(k.clone(), Value::Array(items));
            }
            (_, pv) => {
                target.insert(k.clone(), pv.clone());
            }
        }
    }
    true
}

/// What kustomize's merge does to the whole object it patches, touched or not: in every list
/// with a merge key, elements repeating a key collapse into one (at the first one's place, with
/// the last one's content). A strategic merge patch therefore also removes the duplicates an
/// earlier JSON patch may have added.
pub fn normalize(obj: &mut Map<String, Value>) {
    for (k, v) in obj.iter_mut() {
        if let Value::Array(items) = v {
            let refs: Vec<&Value> = items.iter().collect();
            let keys: Option<Vec<&str>> = match composite_keys(k, &refs) {
                Some(ks) => Some(ks.to_vec()),
                None => merge_key(k).map(|k| vec![k]),
            };
            if let Some(keys) = keys {
                // A repeated key: the first element's place, the last element's content.
                let mut out: Vec<Value> = Vec::with_capacity(items.len());
                let mut ids: Vec<Option<Vec<Option<Value>>>> = Vec::with_capacity(items.len());
                for item in items.drain(..) {
                    let id = (item.is_object() && item.get(keys[0]).is_some())
                        .then(|| keys.iter().map(|k| item.get(*k).cloned()).collect::<Vec<_>>());
                    match id
                        .as_ref()
                        .and_then(|id| ids.iter().position(|x| x.as_ref() == Some(id)))
                    {
                        Some(i) => out[i] = item,
                        None => {
                            out.push(item);
                            ids.push(id);
                        }
                    }
                }
                *items = out;
            }
        }
        match v {
            Value::Object(m) => normalize(m),
            Value::Array(items) => {
                for item in items.iter_mut() {
                    if let Value::Object(m) = item {
                        normalize(m);
                    }
                }
            }
            _ => {}
        }
    }
}

fn is_delete(v: &Value) -> bool {
    v.get(DIRECTIVE).and_then(|d| d.as_str()) == Some("delete")
}

fn strip(m: &Map<String, Value>) -> Map<String, Value> {
    m.iter()
        .filter(|(k, v)| !k.starts_with('$') && !v.is_null())
        .map(|(k, v)| (k.clone(), strip_value(v)))
        .collect()
}

fn strip_value(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(strip(m)),
        Value::Array(a) => Value::Array(a.iter().map(strip_value).collect()),
        v => v.clone(),
    }
}

/// Lists whose elements Kubernetes identifies by two fields (`x-kubernetes-list-map-keys`):
/// container ports by `containerPort` and `protocol`, Service ports by `port` and `protocol`.
fn composite_keys(field: &str, items: &[&Value]) -> Option<[&'static str; 2]> {
    let has = |k: &str| items.iter().any(|v| v.get(k).is_some());
    match field {
        "ports" if has("containerPort") => Some(["containerPort", "protocol"]),
        "ports" if has("port") => Some(["port", "protocol"]),
        _ => None,
    }
}

/// kustomize's merge of a two-key list, as `kubectl kustomize` does it: the target's elements
/// stay in place (merged with the patch element of the same port and protocol); new elements
/// go before them, in the patch's order; a patch element without a protocol that names a port
/// the target has with one is dropped (kustomize matches and discards it).
fn merge_composite(keys: [&str; 2], target: &[Value], patch: &[Value]) -> Vec<Value> {
    let id = |v: &Value| -> (Option<Value>, Option<Value>) { (v.get(keys[0]).cloned(), v.get(keys[1]).cloned()) };
    let mut out: Vec<Option<Value>> = target.iter().cloned().map(Some).collect();
    let mut new = Vec::new();
    for p in patch {
        let Some(pm) = p.as_object() else {
            new.push(p.clone());
            continue;
        };
        let pid = id(p);
        if let Some(i) = target.iter().position(|t| id(t) == pid) {
            if is_delete(p) {
                out[i] = None;
            } else if let Some(Value::Object(tm)) = out[i].as_mut() {
                if !merge_object(tm, pm) {
                    out[i] = None;
                }
            }
        } else if pid.1.is_none() && target.iter().any(|t| t.get(keys[0]) == pid.0.as_ref()) {
            // Dropped, as kustomize drops it.
        } else if !is_delete(p) {
            new.push(Value::Object(strip(pm)));
        }
    }
    new.into_iter().chain(out.into_iter().flatten()).collect()
}

fn merge_list(field: &str, target: &[Value], patch: &[Value]) -> Vec<Value> {
    // A list holding `{$patch: replace}` is replaced by the rest of the patch list.
    if patch.iter().any(|v| {
        v.get(DIRECTIVE).and_then(|d| d.as_str()) == Some("replace") && v.as_object().is_some_and(|m| m.len() == 1)
    }) {
        return patch
            .iter()
            .filter(|v| v.get(DIRECTIVE).is_none())
            .map(strip_value)
            .collect();
    }
    let all: Vec<&Value> = target.iter().chain(patch.iter()).collect();
    if let Some(keys) = composite_keys(field, &all) {
        return merge_composite(keys, target, patch);
    }
    let Some(key) = merge_key(field) else {
        return patch.iter().filter(|v| !is_delete(v)).map(strip_value).collect();
    };
    let mut used = vec![false; target.len()];
    let mut out = Vec::new();
    for p in patch {
        let Some(pm) = p.as_object() else {
            out.push(p.clone());
            continue;
        };
        let pk = pm.get(key);
        let found = pk.and_then(|pk| {
            target
                .iter()
                .enumerate()
                .position(|(i, t)| !used[i] && t.get(key) == Some(pk))
        });
        match found {
            Some(i) => {
                used[i] = true;
                if is_delete(p) {
                    continue;
                }
                let mut t = target[i].clone();
                if let Value::Object(tm) = &mut t {
                    if merge_object(tm, pm) {
                        out.push(t);
                    }
                }
            }
            None => {
                if !is_delete(p) {
                    out.push(Value::Object(strip(pm)));
                }
            }
        }
    }
    for (i, t) in target.iter().enumerate() {
        if !used[i] {
            out.push(t.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(target: Value, patch: Value, want: Option<Value>) {
        let mut t = target.as_object().unwrap().clone();
        let kept = merge_object(&mut t, patch.as_object().unwrap());
        match want {
            Some(w) => {
                assert!(kept);
                assert_eq!(Value::Object(t), w);
            }
            None => assert!(!kept),
        }
    }

    #[test]
    fn table() {
        check(
            json!({"a": 1, "b": {"c": 2}}),
            json!({"b": {"d": 3}}),
            Some(json!({"a": 1, "b": {"c": 2, "d": 3}})),
        );
        check(json!({"a": 1, "b": 2}), json!({"b": null}), Some(json!({"a": 1})));
        check(json!({"a": 1}), json!({"$patch": "delete"}), None);
        check(
            json!({"a": {"x": 1}}),
            json!({"a": {"$patch": "replace", "y": 2}}),
            Some(json!({"a": {"y": 2}})),
        );
        check(
            json!({"args": ["a", "b"]}),
            json!({"args": ["c"]}),
            Some(json!({"args": ["c"]})),
        );
        check(
            json!({"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]}),
            json!({"containers": [{"name": "c", "image": "z"}, {"name": "a", "image": "x2"}]}),
            Some(
                json!({"containers": [{"name": "c", "image": "z"}, {"name": "a", "image": "x2"}, {"name": "b", "image": "y"}]}),
            ),
        );
        check(
            json!({"containers": [{"name": "a"}, {"name": "b"}]}),
            json!({"containers": [{"name": "a", "$patch": "delete"}]}),
            Some(json!({"containers": [{"name": "b"}]})),
        );
        check(
            json!({"volumeMounts": [{"name": "v", "mountPath": "/a"}]}),
            json!({"volumeMounts": [{"name": "v", "mountPath": "/b"}]}),
            Some(json!({"volumeMounts": [{"name": "v", "mountPath": "/b"}, {"name": "v", "mountPath": "/a"}]})),
        );
    }
}
