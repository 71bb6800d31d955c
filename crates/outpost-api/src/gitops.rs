//! The `GitRepo` kind (`apiVersion: outpost.dev/v1`): a Git repository the hub follows, renders
//! with its Kustomize engine and rolls out commit by commit (docs/gitops.md), and the wire
//! types of `outpost gitops status`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::manifest::{Labels, ObjectMeta};
use crate::UnixMs;

/// The annotation the hub puts on every object a GitRepo applies:
/// `gitrepo/<namespace>/<name>`. A hand apply over such an object is refused (unless forced),
/// and only objects carrying it are pruned.
pub const OWNED_BY: &str = "outpost.dev/owned-by";

/// Default poll interval when `pollInterval` is absent.
pub const DEFAULT_POLL: &str = "1m";
/// The shortest poll interval accepted (a Git host is not to be hammered).
pub const MIN_POLL_SECS: u64 = 5;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GitRepo {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: GitRepoSpec,
}

#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GitRepoSpec {
    /// `https://...` (or `http://` for a mirror on the hub's own network) or `file:///...`.
    pub url: String,
    /// The branch to follow (default `main` when neither branch nor tag is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// A tag to pin instead of a branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// The directory in the repository that holds the targets' directories (default: the root).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// How often the hub fetches (a duration such as `30s`, `5m`; default 1m, at least 5s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_interval: Option<String>,
    /// Credentials for an https remote: a Secret in the GitRepo's namespace with `token`
    /// (sent as HTTP basic auth, user `username` or `x-access-token`) or `username` and `password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<SecretRef>,
    /// The webhook's shared secret: a Secret in the GitRepo's namespace with a `token` key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<SecretRef>,
    /// Explicit targets, first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<GitTarget>,
    /// Convention for large fleets: `overlays/<value of this label>/`, else `base/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlays_by: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretRef {
    pub secret_ref: String,
}

#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GitTarget {
    pub name: String,
    /// A kustomization directory, relative to `spec.path`.
    pub path: String,
    /// Nodes carrying every one of these labels (empty: every node).
    #[serde(default)]
    pub node_selector: Labels,
}

impl GitRepoSpec {
    /// The ref fetched: `refs/tags/<tag>` or `refs/heads/<branch>`.
    pub fn git_ref(&self) -> String {
        match (&self.tag, &self.branch) {
            (Some(t), _) => format!("refs/tags/{t}"),
            (None, Some(b)) => format!("refs/heads/{b}"),
            (None, None) => "refs/heads/main".into(),
        }
    }

    /// The poll interval in ms (checked specs only; falls back to the default).
    pub fn poll_ms(&self) -> u64 {
        crate::parse_duration_secs(self.poll_interval.as_deref().unwrap_or(DEFAULT_POLL)).unwrap_or(60) * 1000
    }
}

fn safe_rel_path(p: &str) -> bool {
    !p.starts_with('/') && !p.contains('\\') && p.split('/').all(|c| c != ".." && !c.chars().any(char::is_control))
}

fn ref_name_ok(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('-')
        && !s.starts_with('/')
        && !s.ends_with('/')
        && !s.ends_with(".lock")
        && !s.contains("..")
        && !s.contains("//")
        && !s.contains("@{")
        && s.bytes().all(|b| b > b' ' && !b"~^:?*[\\\x7f".contains(&b))
}

/// Every problem of a GitRepo spec as (field path, reason).
pub fn check_spec(s: &GitRepoSpec) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut err = |f: &str, r: String| out.push((f.to_string(), r));
    let url = s.url.as_str();
    if url.is_empty() {
        err("spec.url", "missing: the repository's https:// or file:// URL".into());
    } else if let Some(rest) = url.strip_prefix("file://") {
        if !rest.starts_with('/') {
            err(
                "spec.url",
                format!("{url:?}: a file:// URL needs an absolute path (file:///srv/git/fleet.git)"),
            );
        }
        if s.auth.is_some() {
            err(
                "spec.auth",
                "a file:// repository takes no credentials; remove auth".into(),
            );
        }
    } else if url.starts_with("https://") || url.starts_with("http://") {
        let host = url.split("://").nth(1).unwrap_or("").split('/').next().unwrap_or("");
        if host.is_empty() {
            err("spec.url", format!("{url:?} has no host"));
        }
        if host.contains('@') {
            err(
                "spec.url",
                "credentials in the URL would be stored and shown in clear; put them in a Secret and name it in spec.auth.secretRef".into(),
            );
        }
    } else {
        err(
            "spec.url",
            format!("{url:?} is not supported: use https://host/path (or http:// for a mirror on the hub's network) or file:///path; ssh remotes are not supported"),
        );
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        err("spec.url", "must not contain spaces or control characters".into());
    }
    match (&s.branch, &s.tag) {
        (Some(_), Some(_)) => err("spec.tag", "set either branch or tag, not both".into()),
        (Some(b), None) if !ref_name_ok(b) => err("spec.branch", format!("{b:?} is not a valid Git branch name")),
        (None, Some(t)) if !ref_name_ok(t) => err("spec.tag", format!("{t:?} is not a valid Git tag name")),
        _ => {}
    }
    if !safe_rel_path(&s.path) {
        err(
            "spec.path",
            format!("{:?} must be a relative path inside the repository (no '..')", s.path),
        );
    }
    if let Some(p) = &s.poll_interval {
        match crate::parse_duration_secs(p) {
            Ok(secs) if secs < MIN_POLL_SECS => err(
                "spec.pollInterval",
                format!("{p} is shorter than {MIN_POLL_SECS}s; use a webhook for faster syncs"),
            ),
            Ok(_) => {}
            Err(e) => err("spec.pollInterval", e),
        }
    }
    for (f, r) in [("spec.auth.secretRef", &s.auth), ("spec.webhook.secretRef", &s.webhook)] {
        if let Some(r) = r {
            if r.secret_ref.is_empty() {
                err(f, "missing: the name of a Secret in the GitRepo's namespace".into());
            }
        }
    }
    match (s.targets.is_empty(), &s.overlays_by) {
        (true, None) => err(
            "spec.targets",
            "missing: list targets [{name, path, nodeSelector}] or set overlaysBy: <node label>".into(),
        ),
        (false, Some(_)) => err("spec.overlaysBy", "set either targets or overlaysBy, not both".into()),
        (true, Some(l)) if l.is_empty() => err("spec.overlaysBy", "missing: a node label key such as site".into()),
        _ => {}
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, t) in s.targets.iter().enumerate() {
        let at = format!("spec.targets[{i}]");
        if t.name.is_empty()
            || !t
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            err(
                &format!("{at}.name"),
                format!("{:?} must be lower-case letters, digits and '-'", t.name),
            );
        }
        if !seen.insert(t.name.clone()) {
            err(
                &format!("{at}.name"),
                format!("{:?} is used by an earlier target", t.name),
            );
        }
        if t.path.is_empty() || !safe_rel_path(&t.path) {
            err(
                &format!("{at}.path"),
                format!("{:?} must be a relative path inside the repository", t.path),
            );
        }
    }
    out
}

/// The render of one target for a commit, as `gitops status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetStatus {
    pub name: String,
    pub path: String,
    /// Objects the render produced (0 on error).
    pub objects: usize,
    /// Why the target did not render or validate (file, document, field, reason), if it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Nodes this target is for now (filled by `gitops status`).
    #[serde(default)]
    pub nodes: usize,
    /// The rollout of each of the repository's workloads on this target's nodes, when its
    /// current revision changed this target's variant: `Kind/namespace/name` -> e.g.
    /// `Progressing: 1 of 3 nodes updated, 0 failed` (filled by `gitops status`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rollouts: BTreeMap<String, String>,
}

/// `outpost gitops status`: one GitRepo.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct GitRepoStatus {
    pub name: String,
    pub namespace: String,
    pub url: String,
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// The commit whose objects the hub holds now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<String>,
    /// The last commit fetched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetched: Option<String>,
    /// The last commit rejected (it did not render for some target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_fetch: Option<UnixMs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_fetch: Option<UnixMs>,
    /// Fetch failures since the last good fetch.
    pub failures: u32,
    /// The last fetch or apply error, if the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Per target: the last render.
    pub targets: Vec<TargetStatus>,
    /// Objects the hub holds for this repository (`Kind/namespace/name`).
    pub objects: Vec<String>,
    /// Rollouts of this repository's workloads: `Kind/namespace/name` -> phase.
    #[serde(default)]
    pub rollouts: std::collections::BTreeMap<String, String>,
}

/// What `outpost gitops diff` shows: the commit, each target's render, and per object what
/// applying the commit would do at the hub.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct GitDiff {
    pub commit: String,
    pub targets: Vec<TargetStatus>,
    /// Why the commit would be refused as a whole, if it would.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub changes: Vec<GitChange>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GitChange {
    /// `Kind/namespace/name`
    pub object: String,
    /// `created`, `changed`, `unchanged` or `deleted` (pruned).
    pub change: String,
    /// For `changed`: one line per field (`+ path: value`, `- path: value`, `~ path: old -> new`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(y: &str) -> GitRepoSpec {
        serde_json::from_str(y).unwrap()
    }

    #[test]
    fn checks_name_the_field() {
        let cases: &[(&str, &[&str])] = &[
            (r#"{"url":"file:///srv/git/fleet.git","overlaysBy":"site"}"#, &[]),
            (
                r#"{"url":"https://git.example.com/fleet.git","branch":"prod","auth":{"secretRef":"git"},"targets":[{"name":"a","path":"overlays/a","nodeSelector":{"site":"a"}}]}"#,
                &[],
            ),
            (r#"{"url":"ssh://git@host/x","overlaysBy":"site"}"#, &["spec.url"]),
            (r#"{"url":"https://u:p@host/x","overlaysBy":"site"}"#, &["spec.url"]),
            (r#"{"url":"file://rel/x","overlaysBy":"site"}"#, &["spec.url"]),
            (
                r#"{"url":"file:///x","overlaysBy":"site","auth":{"secretRef":"a"}}"#,
                &["spec.auth"],
            ),
            (
                r#"{"url":"file:///x","overlaysBy":"site","branch":"a","tag":"b"}"#,
                &["spec.tag"],
            ),
            (
                r#"{"url":"file:///x","overlaysBy":"site","branch":"a..b"}"#,
                &["spec.branch"],
            ),
            (
                r#"{"url":"file:///x","overlaysBy":"site","path":"../x"}"#,
                &["spec.path"],
            ),
            (
                r#"{"url":"file:///x","overlaysBy":"site","pollInterval":"1s"}"#,
                &["spec.pollInterval"],
            ),
            (
                r#"{"url":"file:///x","overlaysBy":"site","pollInterval":"soon"}"#,
                &["spec.pollInterval"],
            ),
            (r#"{"url":"file:///x"}"#, &["spec.targets"]),
            (
                r#"{"url":"file:///x","overlaysBy":"site","targets":[{"name":"a","path":"a"}]}"#,
                &["spec.overlaysBy"],
            ),
            (
                r#"{"url":"file:///x","targets":[{"name":"a","path":"a"},{"name":"a","path":"/b"}]}"#,
                &["spec.targets[1].name", "spec.targets[1].path"],
            ),
        ];
        for (json, want) in cases {
            let got: Vec<String> = check_spec(&spec(json)).into_iter().map(|(f, _)| f).collect();
            assert_eq!(got, *want, "{json}");
        }
    }

    #[test]
    fn refs() {
        assert_eq!(spec(r#"{"url":"x"}"#).git_ref(), "refs/heads/main");
        assert_eq!(spec(r#"{"url":"x","branch":"prod"}"#).git_ref(), "refs/heads/prod");
        assert_eq!(spec(r#"{"url":"x","tag":"v1"}"#).git_ref(), "refs/tags/v1");
        assert_eq!(spec(r#"{"url":"x","pollInterval":"30s"}"#).poll_ms(), 30_000);
    }
}
