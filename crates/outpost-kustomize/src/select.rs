//! Patch `target` selectors: group, version, kind, name and namespace as anchored regular
//! expressions, and label/annotation selectors in Kubernetes' syntax
//! (`a=b,c!=d,e in (x,y),f notin (z),g,!h`).

use regex::Regex;
use serde_json::{Map, Value};

use crate::resource::Res;

#[derive(Debug, Clone, Default)]
pub struct Selector {
    pub group: Option<String>,
    pub version: Option<String>,
    pub kind: Option<String>,
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub label_selector: Option<String>,
    pub annotation_selector: Option<String>,
}

fn anchored(re: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{re})$")).map_err(|e| format!("`{re}` is not a valid regular expression: {e}"))
}

#[derive(Debug)]
enum Req {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// Parses a label selector; the error says what is wrong.
fn parse_selector(s: &str) -> Result<Vec<Req>, String> {
    // Split on commas outside parentheses.
    let mut parts = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => {
                depth += 1;
                cur.push(c)
            }
            ')' => {
                depth -= 1;
                cur.push(c)
            }
            ',' if depth == 0 => parts.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    parts.push(cur);
    let mut out = Vec::new();
    for p in parts.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        let set = |rest: &str| -> Result<Vec<String>, String> {
            let rest = rest.trim();
            let inner = rest
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| format!("`{p}`: expected a list in parentheses"))?;
            Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
        };
        if let Some((k, v)) = p.split_once("!=") {
            out.push(Req::NotEq(k.trim().into(), v.trim().into()));
        } else if let Some((k, v)) = p.split_once("==") {
            out.push(Req::Eq(k.trim().into(), v.trim().into()));
        } else if let Some((k, v)) = p.split_once('=') {
            out.push(Req::Eq(k.trim().into(), v.trim().into()));
        } else if let Some((k, rest)) = p.split_once(" notin ") {
            out.push(Req::NotIn(k.trim().into(), set(rest)?));
        } else if let Some((k, rest)) = p.split_once(" in ") {
            out.push(Req::In(k.trim().into(), set(rest)?));
        } else if let Some(k) = p.strip_prefix('!') {
            out.push(Req::NotExists(k.trim().into()));
        } else if p.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c)) {
            out.push(Req::Exists(p.into()));
        } else {
            return Err(format!("`{p}` is not a label selector requirement"));
        }
    }
    Ok(out)
}

fn matches_selector(reqs: &[Req], labels: &Map<String, Value>) -> bool {
    let get = |k: &str| labels.get(k).and_then(|v| v.as_str());
    reqs.iter().all(|r| match r {
        Req::Eq(k, v) => get(k) == Some(v),
        Req::NotEq(k, v) => get(k) != Some(v),
        Req::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
        Req::NotIn(k, vs) => !get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
        Req::Exists(k) => get(k).is_some(),
        Req::NotExists(k) => get(k).is_none(),
    })
}

/// A compiled selector.
pub struct Compiled {
    group: Option<Regex>,
    version: Option<Regex>,
    kind: Option<Regex>,
    name: Option<Regex>,
    namespace: Option<Regex>,
    labels: Option<Vec<Req>>,
    annotations: Option<Vec<Req>>,
}

impl Selector {
    /// Compiles; the error names the selector field at fault (`name`, `labelSelector`...).
    pub fn compile(&self) -> Result<Compiled, (&'static str, String)> {
        let re = |field: &'static str, v: &Option<String>| -> Result<Option<Regex>, (&'static str, String)> {
            v.as_deref()
                .filter(|s| !s.is_empty())
                .map(anchored)
                .transpose()
                .map_err(|e| (field, e))
        };
        Ok(Compiled {
            group: re("group", &self.group)?,
            version: re("version", &self.version)?,
            kind: re("kind", &self.kind)?,
            name: re("name", &self.name)?,
            namespace: re("namespace", &self.namespace)?,
            labels: self
                .label_selector
                .as_deref()
                .filter(|s| !s.is_empty())
                .map(parse_selector)
                .transpose()
                .map_err(|e| ("labelSelector", e))?,
            annotations: self
                .annotation_selector
                .as_deref()
                .filter(|s| !s.is_empty())
                .map(parse_selector)
                .transpose()
                .map_err(|e| ("annotationSelector", e))?,
        })
    }
}

fn effective_ns(r: &Res, ns: &str) -> String {
    if ns.is_empty() && !r.cluster_scoped() {
        "default".into()
    } else {
        ns.into()
    }
}

impl Compiled {
    /// Whether `r` is selected: namespace and name match the original or the current id.
    pub fn matches(&self, r: &Res) -> bool {
        let org = r.org_id();
        let cur = r.id();
        if let Some(ns) = &self.namespace {
            if !ns.is_match(&effective_ns(r, &org.namespace)) && !ns.is_match(&effective_ns(r, &cur.namespace)) {
                return false;
            }
        }
        if let Some(n) = &self.name {
            if !n.is_match(&org.name) && !n.is_match(&cur.name) {
                return false;
            }
        }
        let checks = [
            (&self.group, &cur.group),
            (&self.version, &cur.version),
            (&self.kind, &cur.kind),
        ];
        if checks
            .iter()
            .any(|(re, v)| re.as_ref().is_some_and(|re| !re.is_match(v)))
        {
            return false;
        }
        if let Some(l) = &self.labels {
            if !matches_selector(l, &r.string_map("labels")) {
                return false;
            }
        }
        if let Some(a) = &self.annotations {
            if !matches_selector(a, &r.string_map("annotations")) {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors() {
        let labels = json!({"app": "web", "tier": "front"});
        let labels = labels.as_object().unwrap();
        for (sel, want) in [
            ("app=web", true),
            ("app==web,tier=front", true),
            ("app!=web", false),
            ("tier in (front, back)", true),
            ("tier notin (front)", false),
            ("app", true),
            ("!app", false),
            ("!zone", true),
        ] {
            assert_eq!(matches_selector(&parse_selector(sel).unwrap(), labels), want, "{sel}");
        }
        assert!(parse_selector("tier in front").is_err());
    }
}
