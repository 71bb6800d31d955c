//! The name suffix of generated ConfigMaps and Secrets, computed as kustomize computes it:
//! the SHA-256 of a JSON document (`kind`, `name`, `data`, and `type` for Secrets, keys in
//! sorted order (the name always empty, as kustomize's lookup of it never finds it), strings escaped as Go's `encoding/json` escapes them), its first ten hex
//! digits with `0 1 3 a e` replaced by `g h k m t`.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

fn go_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Go's `json.Marshal` of a decoded JSON value: maps with sorted keys, no spaces.
fn go_json(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                go_json_string(k, out);
                out.push(':');
                go_json(&m[k.as_str()], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                go_json(x, out);
            }
            out.push(']');
        }
        Value::String(s) => go_json_string(s, out),
        v => out.push_str(&v.to_string()),
    }
}

fn encode(hex: &str) -> String {
    hex[..10]
        .chars()
        .map(|c| match c {
            '0' => 'g',
            '1' => 'h',
            '3' => 'k',
            'a' => 'm',
            'e' => 't',
            c => c,
        })
        .collect()
}

fn field(obj: &Map<String, Value>, key: &str) -> Value {
    match obj.get(key) {
        None | Some(Value::Null) => Value::String(String::new()),
        Some(v) => v.clone(),
    }
}

/// The suffix for a ConfigMap or Secret object (`kind` decides which fields count).
pub fn suffix(obj: &Map<String, Value>) -> String {
    let kind = obj.get("kind").and_then(|v| v.as_str()).unwrap_or_default();
    // kustomize looks the name up as one field called `metadata/name`, finds nothing, and
    // hashes an empty name: the suffix depends on the content only.
    let name = Value::String(String::new());
    let mut m = Map::new();
    m.insert("kind".into(), Value::String(kind.into()));
    m.insert("name".into(), name);
    m.insert("data".into(), field(obj, "data"));
    if kind == "Secret" {
        m.insert("type".into(), field(obj, "type"));
        if let Some(Value::Object(sd)) = obj.get("stringData") {
            m.insert("stringData".into(), Value::Object(sd.clone()));
        }
    } else if let Some(Value::Object(bd)) = obj.get("binaryData") {
        m.insert("binaryData".into(), Value::Object(bd.clone()));
    }
    let mut s = String::new();
    go_json(&Value::Object(m), &mut s);
    encode(&hex::encode(Sha256::digest(s.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kustomize_reference_values() {
        // Values from kustomize's hasher tests.
        let cm = |data: Value| {
            let mut o = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": ""}});
            if !data.is_null() {
                o["data"] = data;
            }
            o.as_object().unwrap().clone()
        };
        assert_eq!(suffix(&cm(Value::Null)), "6ct58987ht");
        assert_eq!(suffix(&cm(json!({"one": ""}))), "9g67k2htb6");
        assert_eq!(suffix(&cm(json!({"two": "2", "one": "", "three": "3"}))), "f5h7t85m9b");
        let secret = |data: Value| {
            json!({"apiVersion": "v1", "kind": "Secret", "type": "my-type", "metadata": {"name": ""}, "data": data})
                .as_object()
                .unwrap()
                .clone()
        };
        assert_eq!(suffix(&secret(json!({}))), "t75bgf6ctb");
        assert_eq!(suffix(&secret(json!({"one": ""}))), "74bd68bm66");
        assert_eq!(
            suffix(&secret(json!({"two": "Mg==", "one": "", "three": "Mw=="}))),
            "dgcb6h9tmk"
        );
    }
}
