//! The YAML printer for rendered objects, in `kubectl kustomize`'s layout (block maps with
//! sorted keys, list items at their key's indentation). A string is printed plain only when it
//! cannot be read back as anything else; otherwise it is double-quoted with JSON's escapes,
//! which YAML reads the same way. A key whose printed form is longer than YAML allows for an
//! implicit key (1024 characters) is printed as an explicit key (`? key` then `: value`).
//! Every value printed parses back to itself (a property test checks it).

use serde_json::Value;

fn plain_ok(s: &str) -> bool {
    let Some(first) = s.chars().next() else { return false };
    if !(first.is_ascii_alphanumeric() || first == '/' || first == '_' || first == '.') {
        return false;
    }
    if s.ends_with(' ') || s.ends_with(':') || s.contains(": ") || s.contains(" #") {
        return false;
    }
    if !s.chars().all(|c| c.is_ascii_alphanumeric() || " _./:=+@-".contains(c)) {
        return false;
    }
    let lower = s.to_ascii_lowercase();
    if matches!(
        lower.as_str(),
        "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n" | "null" | ".inf" | ".nan" | "-.inf" | "+.inf"
    ) {
        return false;
    }
    // What starts like a number (ints, floats, octal, hex, sexagesimal, dates) is quoted,
    // unless a letter no number can hold shows it is text (`1Gi`, `100m`, `12h`).
    if first == '.' {
        return false;
    }
    if first.is_ascii_digit() {
        if ["0x", "0o", "0b"].iter().any(|p| lower.starts_with(p)) {
            return false;
        }
        let texty = s.chars().any(|c| c.is_ascii_alphabetic() && c != 'e' && c != 'E');
        return texty && !s.contains(':');
    }
    true
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) if plain_ok(s) => s.clone(),
        Value::String(s) => serde_json::to_string(s).expect("a string serializes"),
        Value::Null => "null".into(),
        v => v.to_string(),
    }
}

fn key(k: &str) -> String {
    if plain_ok(k) {
        k.to_string()
    } else {
        serde_json::to_string(k).expect("a string serializes")
    }
}

fn is_block(v: &Value) -> bool {
    matches!(v, Value::Object(m) if !m.is_empty()) || matches!(v, Value::Array(a) if !a.is_empty())
}

fn inline(v: &Value) -> String {
    match v {
        Value::Object(_) => "{}".into(),
        Value::Array(_) => "[]".into(),
        v => scalar(v),
    }
}

/// YAML's limit on an implicit key, in characters, with room for the `:` after it.
const IMPLICIT_KEY_MAX: usize = 1000;

/// Whether `out` ends in an open `- ` or `: ` (a list item or an explicit key's value) that a
/// block map or list continues; every other line is finished with a newline before one starts.
fn continues(out: &str) -> bool {
    out.ends_with("- ") || out.ends_with(": ")
}

fn map(m: &serde_json::Map<String, Value>, indent: usize, out: &mut String) {
    let mut keys: Vec<&String> = m.keys().collect();
    keys.sort();
    for (i, k) in keys.into_iter().enumerate() {
        // The first key of a map inside a list item (or explicit value) continues its line.
        if !(i == 0 && continues(out)) {
            out.push_str(&" ".repeat(indent));
        }
        let v = &m[k.as_str()];
        let printed = key(k);
        if printed.chars().count() > IMPLICIT_KEY_MAX {
            // An explicit key; its value is indented like a list item's.
            out.push_str("? ");
            out.push_str(&printed);
            out.push('\n');
            out.push_str(&" ".repeat(indent));
            out.push_str(": ");
            open_value(v, indent, out);
            continue;
        }
        out.push_str(&printed);
        out.push(':');
        match v {
            Value::Object(inner) if !inner.is_empty() => {
                out.push('\n');
                map(inner, indent + 2, out);
            }
            Value::Array(items) if !items.is_empty() => {
                out.push('\n');
                list(items, indent, out);
            }
            v => {
                out.push(' ');
                out.push_str(&inline(v));
                out.push('\n');
            }
        }
    }
}

fn list(items: &[Value], indent: usize, out: &mut String) {
    for (i, v) in items.iter().enumerate() {
        // The first item of a list inside a list item (or explicit value) continues its line.
        if !(i == 0 && continues(out)) {
            out.push_str(&" ".repeat(indent));
        }
        out.push_str("- ");
        open_value(v, indent, out);
    }
}

/// A value after an open `- ` or `: ` at `indent`: a block continues that line, two deeper.
fn open_value(v: &Value, indent: usize, out: &mut String) {
    match v {
        Value::Object(m) if !m.is_empty() => map(m, indent + 2, out),
        Value::Array(a) if !a.is_empty() => list(a, indent + 2, out),
        v => {
            out.push_str(&inline(v));
            out.push('\n');
        }
    }
}

/// One document (no `---`).
pub fn document(v: &Value) -> String {
    let mut out = String::new();
    match v {
        Value::Object(m) if !m.is_empty() => map(m, 0, &mut out),
        Value::Array(a) if !a.is_empty() && is_block(v) => list(a, 0, &mut out),
        v => {
            out.push_str(&inline(v));
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn layout_like_kubectl() {
        let v = json!({"kind": "Service", "spec": {"ports": [{"port": 80, "name": "http"}], "selector": {}}, "data": {"a": "yes", "b": "1.0", "c": "x y", "d": "trailing ", "e": "multi\nline"}, "list": [[1, 2], "s"]});
        assert_eq!(
            document(&v),
            "data:\n  a: \"yes\"\n  b: \"1.0\"\n  c: x y\n  d: \"trailing \"\n  e: \"multi\\nline\"\nkind: Service\nlist:\n- - 1\n  - 2\n- s\nspec:\n  ports:\n  - name: http\n    port: 80\n  selector: {}\n"
        );
    }

    #[test]
    fn keys_too_long_for_an_implicit_key_are_printed_explicitly_and_read_back() {
        // Control characters print as `\u001d`: 200 of them make a 1,200-character key.
        let long = format!("k{}", "\u{1d}".repeat(200));
        let plain_long = "k".repeat(1100);
        let v = json!({
            "a": {&long: "scalar", "b": 1},
            &plain_long: {"inner": {"x": [1, 2]}, "y": "z"},
            "list": [{&long: [1, {&long: {}}]}, [{&plain_long: null}]],
            "z": {&long: [[1], "s"]}
        });
        let text = document(&v);
        assert!(text.contains("? \"k\\u001d"), "{text}");
        let back = crate::parse_stream(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(back, vec![v], "printed:\n{text}");
    }
}
