//! `outpost kustomize build DIR`, `outpost diff -k DIR` and `outpost apply -k DIR`: the
//! Kustomize engine (`outpost-kustomize`) offline, and its render compared with or applied to
//! what the hub holds.

use std::path::Path;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use outpost_kustomize::diff::{plan, Change};
use serde_json::Value;

use crate::client::Client;

#[derive(Subcommand)]
pub enum KustomizeCmd {
    /// Render a kustomization directory and print the objects as YAML (as `kubectl kustomize`
    /// does); nothing is sent anywhere.
    Build {
        /// The directory holding kustomization.yaml.
        dir: std::path::PathBuf,
    },
}

/// Renders `dir` into one YAML stream.
pub fn render(dir: &Path) -> Result<String> {
    let d = dir
        .to_str()
        .with_context(|| format!("{} is not a UTF-8 path", dir.display()))?;
    let objs = outpost_kustomize::build(&outpost_kustomize::DiskFs, d)
        .map_err(|e| anyhow::anyhow!("{e}\nnothing was rendered; fix the kustomization and run again"))?;
    Ok(outpost_kustomize::to_yaml(&objs))
}

pub fn run(cmd: KustomizeCmd) -> Result<()> {
    match cmd {
        KustomizeCmd::Build { dir } => {
            print!("{}", render(&dir)?);
            Ok(())
        }
    }
}

/// The manifest file an apply of `dir` sends: the render, named after the directory so
/// the hub's messages point at it.
pub fn manifest_file(dir: &Path) -> Result<outpost_api::ManifestFile> {
    Ok(outpost_api::ManifestFile {
        name: format!("kustomize build {}", dir.display()),
        content: render(dir)?,
    })
}

fn object_path(id: &outpost_api::ObjectId) -> String {
    format!(
        "/v1/objects/{}/{}/{}",
        id.kind.as_str().to_ascii_lowercase(),
        id.namespace,
        id.name
    )
}

/// `outpost diff -k DIR`: per object of the render, created / changed (field by field) /
/// unchanged against the hub; Deployments and DaemonSets the hub holds in the render's
/// namespaces but the render lacks show as deleted.
pub async fn diff(c: &Client, dir: &Path) -> Result<()> {
    let file = manifest_file(dir)?;
    let parsed = match outpost_api::parse_file(&file.name, &file.content) {
        Ok(p) => p,
        Err(errors) => {
            let mut msg = format!("the render of {} would be refused by the hub:", dir.display());
            for e in &errors {
                msg.push_str(&format!("\n  - {}: {}: {}", e.document, e.field, e.reason));
            }
            bail!("{msg}\nnothing was compared; fix the kustomization and run again");
        }
    };
    for w in &parsed.warnings {
        eprintln!("warning: {w}");
    }
    let mut desired = Vec::new();
    let mut current = Vec::new();
    for o in &parsed.objects {
        let id = o.id();
        desired.push((id.to_string(), serde_json::to_value(o)?));
        let path = object_path(&id);
        if c.exists(&path).await? {
            let v: Value = c.get(&path).await?;
            // Workloads come back with their status around the manifest.
            let v = if id.kind.is_workload() {
                v.get("manifest").cloned().unwrap_or(v)
            } else {
                v
            };
            current.push((id.to_string(), v));
        }
    }
    let namespaces: std::collections::BTreeSet<String> = parsed.objects.iter().map(|o| o.id().namespace).collect();
    let workloads: Vec<outpost_api::WorkloadInfo> = c.get("/v1/workloads").await?;
    for w in workloads {
        let id = outpost_api::ObjectId {
            kind: w.kind,
            namespace: w.namespace.clone(),
            name: w.name.clone(),
        };
        let key = id.to_string();
        if namespaces.contains(&w.namespace) && !desired.iter().any(|(d, _)| *d == key) {
            current.push((key, w.manifest));
        }
    }
    let changes = plan(&desired, &current);
    print!("{}", format_plan(&changes));
    Ok(())
}

/// The plan as text: one line per object, the changed fields indented below, a summary.
pub fn format_plan(changes: &[(String, Change)]) -> String {
    let mut out = String::new();
    let mut counts = [0usize; 4];
    for (id, ch) in changes {
        let i = match ch {
            Change::Created => 0,
            Change::Changed(_) => 1,
            Change::Unchanged => 2,
            Change::Deleted => 3,
        };
        counts[i] += 1;
        out.push_str(&format!("{:<9} {id}\n", ch.word()));
        if let Change::Changed(fields) = ch {
            for f in fields {
                out.push_str(&format!("    {f}\n"));
            }
        }
    }
    out.push_str(&format!(
        "{} to create, {} to change, {} unchanged, {} to delete\n",
        counts[0], counts[1], counts[2], counts[3]
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_kustomize::diff::FieldChange;
    use serde_json::json;

    #[test]
    fn plan_text() {
        let changes = vec![
            ("Deployment/edge/web".to_string(), Change::Created),
            (
                "ConfigMap/edge/cfg".to_string(),
                Change::Changed(vec![FieldChange {
                    path: "data.MODE".into(),
                    old: Some(json!("a")),
                    new: Some(json!("b")),
                }]),
            ),
            ("Service/edge/web".to_string(), Change::Unchanged),
            ("DaemonSet/edge/old".to_string(), Change::Deleted),
        ];
        assert_eq!(
            format_plan(&changes),
            "created   Deployment/edge/web\nchanged   ConfigMap/edge/cfg\n    ~ data.MODE: \"a\" -> \"b\"\nunchanged Service/edge/web\ndeleted   DaemonSet/edge/old\n1 to create, 1 to change, 1 unchanged, 1 to delete\n"
        );
    }
}
