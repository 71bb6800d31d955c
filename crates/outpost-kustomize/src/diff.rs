//! What a render would change: per object created, changed (with a field-level diff),
//! unchanged or deleted, given what is held now. Pure: the caller fetches both sides.

use serde_json::Value;

/// One field that differs. `old`/`new` are `None` where the field is absent.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldChange {
    /// `spec.template.spec.containers[0].image`, `metadata.labels["app.kubernetes.io/name"]`.
    pub path: String,
    pub old: Option<Value>,
    pub new: Option<Value>,
}

impl std::fmt::Display for FieldChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: &Value| serde_json::to_string(v).unwrap_or_default();
        match (&self.old, &self.new) {
            (None, Some(n)) => write!(f, "+ {}: {}", self.path, show(n)),
            (Some(o), None) => write!(f, "- {}: {}", self.path, show(o)),
            (Some(o), Some(n)) => write!(f, "~ {}: {} -> {}", self.path, show(o), show(n)),
            (None, None) => write!(f, "  {}", self.path),
        }
    }
}

/// The fate of one object.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Created,
    Changed(Vec<FieldChange>),
    Unchanged,
    Deleted,
}

impl Change {
    pub fn word(&self) -> &'static str {
        match self {
            Change::Created => "created",
            Change::Changed(_) => "changed",
            Change::Unchanged => "unchanged",
            Change::Deleted => "deleted",
        }
    }
}

/// Plans the change for each object: `desired` from the render, `current` what is held now,
/// both keyed by an id. Order: desired objects in their order, then deleted ones in theirs.
pub fn plan<K: PartialEq + Clone>(desired: &[(K, Value)], current: &[(K, Value)]) -> Vec<(K, Change)> {
    let mut out = Vec::new();
    for (id, want) in desired {
        let change = match current.iter().find(|(c, _)| c == id) {
            None => Change::Created,
            Some((_, have)) => {
                let d = field_diff(have, want);
                if d.is_empty() {
                    Change::Unchanged
                } else {
                    Change::Changed(d)
                }
            }
        };
        out.push((id.clone(), change));
    }
    for (id, _) in current {
        if !desired.iter().any(|(d, _)| d == id) {
            out.push((id.clone(), Change::Deleted));
        }
    }
    out
}

fn key_path(base: &str, key: &str) -> String {
    let plain = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    match (base.is_empty(), plain) {
        (true, true) => key.to_string(),
        (false, true) => format!("{base}.{key}"),
        (_, false) => format!("{base}[{}]", serde_json::to_string(key).unwrap_or_default()),
    }
}

/// Fields that differ between `old` and `new`, depth first, map keys in `new`'s order then
/// removed ones; lists compared index by index.
pub fn field_diff(old: &Value, new: &Value) -> Vec<FieldChange> {
    let mut out = Vec::new();
    walk("", old, new, &mut out);
    out
}

fn walk(path: &str, old: &Value, new: &Value, out: &mut Vec<FieldChange>) {
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            for (k, nv) in n {
                let p = key_path(path, k);
                match o.get(k) {
                    Some(ov) => walk(&p, ov, nv, out),
                    None => out.push(FieldChange {
                        path: p,
                        old: None,
                        new: Some(nv.clone()),
                    }),
                }
            }
            for (k, ov) in o {
                if !n.contains_key(k) {
                    out.push(FieldChange {
                        path: key_path(path, k),
                        old: Some(ov.clone()),
                        new: None,
                    });
                }
            }
        }
        (Value::Array(o), Value::Array(n)) => {
            for i in 0..o.len().max(n.len()) {
                let p = format!("{path}[{i}]");
                match (o.get(i), n.get(i)) {
                    (Some(ov), Some(nv)) => walk(&p, ov, nv, out),
                    (None, Some(nv)) => out.push(FieldChange {
                        path: p,
                        old: None,
                        new: Some(nv.clone()),
                    }),
                    (Some(ov), None) => out.push(FieldChange {
                        path: p,
                        old: Some(ov.clone()),
                        new: None,
                    }),
                    (None, None) => {}
                }
            }
        }
        (o, n) if o == n => {}
        (o, n) => out.push(FieldChange {
            path: path.to_string(),
            old: Some(o.clone()),
            new: Some(n.clone()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn field_diff_table() {
        let lines = |o: Value, n: Value| field_diff(&o, &n).iter().map(|c| c.to_string()).collect::<Vec<_>>();
        assert!(lines(json!({"a": 1}), json!({"a": 1})).is_empty());
        assert_eq!(lines(json!({"a": 1}), json!({"a": 2})), ["~ a: 1 -> 2"]);
        assert_eq!(
            lines(json!({"a": {"b": "x"}}), json!({"a": {"b": "x", "c": true}})),
            ["+ a.c: true"]
        );
        assert_eq!(lines(json!({"a": {"b": "x"}}), json!({"a": {}})), ["- a.b: \"x\""]);
        assert_eq!(
            lines(
                json!({"metadata": {"labels": {"app.kubernetes.io/name": "a"}}}),
                json!({"metadata": {"labels": {"app.kubernetes.io/name": "b"}}})
            ),
            ["~ metadata.labels[\"app.kubernetes.io/name\"]: \"a\" -> \"b\""]
        );
        assert_eq!(
            lines(
                json!({"c": [{"image": "a:1"}]}),
                json!({"c": [{"image": "a:2"}, {"image": "b"}]})
            ),
            ["~ c[0].image: \"a:1\" -> \"a:2\"", "+ c[1]: {\"image\":\"b\"}"]
        );
        assert_eq!(
            lines(json!({"a": [1]}), json!({"a": {"x": 1}})),
            ["~ a: [1] -> {\"x\":1}"]
        );
    }

    #[test]
    fn plan_table() {
        let desired = vec![("a", json!({"v": 1})), ("b", json!({"v": 2})), ("c", json!({"v": 3}))];
        let current = vec![("b", json!({"v": 2})), ("c", json!({"v": 4})), ("d", json!({"v": 5}))];
        let p = plan(&desired, &current);
        let words: Vec<(&str, &str)> = p.iter().map(|(k, c)| (*k, c.word())).collect();
        assert_eq!(
            words,
            [("a", "created"), ("b", "unchanged"), ("c", "changed"), ("d", "deleted")]
        );
        assert_eq!(
            p[2].1,
            Change::Changed(vec![FieldChange {
                path: "v".into(),
                old: Some(json!(4)),
                new: Some(json!(3))
            }])
        );
    }
}
