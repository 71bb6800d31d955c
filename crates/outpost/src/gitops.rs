//! `outpost gitops add|ls|status|sync|diff|rm`: thin commands over the hub's GitOps routes
//! (docs/gitops.md). `add` builds a GitRepo manifest and applies it like any object.

use anyhow::{bail, Result};
use clap::Subcommand;
use outpost_api::gitops::{GitDiff, GitRepoStatus};

use crate::client::Client;

#[derive(Subcommand)]
pub enum GitopsCmd {
    /// Follow a Git repository: apply a GitRepo object (the hub fetches it at once).
    Add {
        name: String,
        /// https://host/path.git or file:///path
        #[arg(long)]
        url: String,
        #[arg(long, conflicts_with = "tag")]
        branch: Option<String>,
        #[arg(long)]
        tag: Option<String>,
        /// The directory in the repository that holds the targets.
        #[arg(long, default_value = "")]
        path: String,
        /// How often the hub fetches (e.g. 30s, 5m).
        #[arg(long)]
        poll_interval: Option<String>,
        /// `overlays/<value of this node label>/`, else `base/`.
        #[arg(long, required_unless_present = "target")]
        overlays_by: Option<String>,
        /// An explicit target NAME=PATH[:key=value,key=value] (first match wins); repeatable.
        #[arg(long, conflicts_with = "overlays_by")]
        target: Vec<String>,
        /// A Secret (keys token, or username and password) for an https remote.
        #[arg(long)]
        auth_secret: Option<String>,
        /// A Secret with a `token` key: the webhook's shared secret.
        #[arg(long)]
        webhook_secret: Option<String>,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
    /// Every GitRepo: commit running and fetched, errors.
    Ls,
    /// One GitRepo: commits, per target render result, objects and their rollouts.
    Status {
        name: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Fetch now (as the webhook does).
    Sync {
        name: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
    /// Per target, what applying a commit (default: the last fetched) would create, change or
    /// prune at the hub; changes nothing.
    Diff {
        name: String,
        #[arg(long)]
        commit: Option<String>,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
    /// Stop following a repository (the GitRepo object goes; the objects it applied stay, and
    /// may then be changed by hand).
    Rm {
        name: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
}

fn q(ns: &str) -> Vec<(&'static str, String)> {
    vec![("namespace", ns.to_string())]
}

fn short(c: &Option<String>) -> String {
    c.as_deref().map_or("-".into(), |c| c[..c.len().min(12)].to_string())
}

/// The GitRepo manifest `outpost gitops add` applies.
#[allow(clippy::too_many_arguments)]
pub fn manifest(
    name: &str,
    namespace: &str,
    url: &str,
    branch: Option<&str>,
    tag: Option<&str>,
    path: &str,
    poll_interval: Option<&str>,
    overlays_by: Option<&str>,
    targets: &[String],
    auth_secret: Option<&str>,
    webhook_secret: Option<&str>,
) -> Result<serde_json::Value> {
    let mut spec = serde_json::json!({ "url": url });
    let s = spec.as_object_mut().expect("object");
    let mut set = |k: &str, v: Option<serde_json::Value>| {
        if let Some(v) = v {
            s.insert(k.into(), v);
        }
    };
    set("branch", branch.map(Into::into));
    set("tag", tag.map(Into::into));
    set("path", (!path.is_empty()).then(|| path.into()));
    set("pollInterval", poll_interval.map(Into::into));
    set("overlaysBy", overlays_by.map(Into::into));
    set("auth", auth_secret.map(|a| serde_json::json!({ "secretRef": a })));
    set("webhook", webhook_secret.map(|a| serde_json::json!({ "secretRef": a })));
    let mut list = Vec::new();
    for t in targets {
        let Some((tname, rest)) = t.split_once('=') else {
            bail!("--target {t:?}: write NAME=PATH[:key=value,...]");
        };
        let (path, sel) = rest.split_once(':').unwrap_or((rest, ""));
        let mut selector = serde_json::Map::new();
        for kv in sel.split(',').filter(|s| !s.is_empty()) {
            let Some((k, v)) = kv.split_once('=') else {
                bail!("--target {t:?}: the node selector is key=value pairs separated by commas");
            };
            selector.insert(k.into(), v.into());
        }
        list.push(serde_json::json!({ "name": tname, "path": path, "nodeSelector": selector }));
    }
    set("targets", (!list.is_empty()).then(|| list.into()));
    Ok(serde_json::json!({
        "apiVersion": "outpost.dev/v1",
        "kind": "GitRepo",
        "metadata": { "name": name, "namespace": namespace },
        "spec": spec,
    }))
}

/// `gitops status` as text.
pub fn format_status(s: &GitRepoStatus) -> String {
    let mut out = format!(
        "GitRepo {}/{}  {} ({})\n  running:  {}\n  fetched:  {}\n",
        s.namespace,
        s.name,
        s.url,
        s.git_ref,
        short(&s.running),
        short(&s.fetched)
    );
    if let Some(r) = &s.rejected {
        out.push_str(&format!("  rejected: {}\n", &r[..r.len().min(12)]));
    }
    if s.failures > 0 {
        out.push_str(&format!("  fetch failures: {}\n", s.failures));
    }
    if let Some(e) = &s.error {
        out.push_str(&format!("  error: {}\n", e.replace('\n', "\n    ")));
    }
    out.push_str("  targets:\n");
    for t in &s.targets {
        match &t.error {
            None => {
                out.push_str(&format!(
                    "    {:<16} {:<24} ok, {} objects, {} node{}\n",
                    t.name,
                    t.path,
                    t.objects,
                    t.nodes,
                    if t.nodes == 1 { "" } else { "s" }
                ));
                for (o, r) in &t.rollouts {
                    out.push_str(&format!("      {o}: {r}\n"));
                }
            }
            Some(e) => out.push_str(&format!("    {:<16} {:<24} FAILED: {e}\n", t.name, t.path)),
        }
    }
    out.push_str("  objects:\n");
    for o in &s.objects {
        match s.rollouts.get(o) {
            Some(p) => out.push_str(&format!("    {o}  (rollout {p})\n")),
            None => out.push_str(&format!("    {o}\n")),
        }
    }
    out
}

pub async fn run(c: &Client, cmd: GitopsCmd) -> Result<()> {
    match cmd {
        GitopsCmd::Add {
            name,
            url,
            branch,
            tag,
            path,
            poll_interval,
            overlays_by,
            target,
            auth_secret,
            webhook_secret,
            namespace,
        } => {
            let m = manifest(
                &name,
                &namespace,
                &url,
                branch.as_deref(),
                tag.as_deref(),
                &path,
                poll_interval.as_deref(),
                overlays_by.as_deref(),
                &target,
                auth_secret.as_deref(),
                webhook_secret.as_deref(),
            )?;
            let req = outpost_api::ApplyRequest {
                files: vec![outpost_api::ManifestFile {
                    name: format!("gitops add {name}"),
                    content: serde_json::to_string(&m)?,
                }],
            };
            let r: outpost_api::ApplyResponse = c.post("/v1/apply", &req).await?;
            for res in &r.results {
                println!("{} {}", res.object, res.action);
            }
            println!("the hub fetches it now; see `outpost gitops status {name}`");
            Ok(())
        }
        GitopsCmd::Ls => {
            let list: Vec<GitRepoStatus> = c.get("/v1/gitops").await?;
            println!("{:<24} {:<40} {:<13} {:<13} STATE", "NAME", "URL", "RUNNING", "FETCHED");
            for s in list {
                let state = match (&s.error, s.failures) {
                    (None, _) => "ok".to_string(),
                    (Some(_), n) if n > 0 => format!("unreachable ({n} failures)"),
                    (Some(_), _) => "commit rejected".into(),
                };
                println!(
                    "{:<24} {:<40} {:<13} {:<13} {state}",
                    format!("{}/{}", s.namespace, s.name),
                    s.url,
                    short(&s.running),
                    short(&s.fetched)
                );
            }
            Ok(())
        }
        GitopsCmd::Status { name, namespace, json } => {
            let s: GitRepoStatus = c.get_query(&format!("/v1/gitops/{name}"), &q(&namespace)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", format_status(&s));
            }
            Ok(())
        }
        GitopsCmd::Sync { name, namespace } => {
            let path = format!("/v1/gitops/{name}/sync?namespace={namespace}");
            let _: serde_json::Value = c.post(&path, &serde_json::json!({})).await?;
            println!("gitrepo/{namespace}/{name}: fetching now; see `outpost gitops status {name}`");
            Ok(())
        }
        GitopsCmd::Diff {
            name,
            commit,
            namespace,
        } => {
            let mut query = q(&namespace);
            if let Some(cm) = commit {
                query.push(("commit", cm));
            }
            let d: GitDiff = c.get_query(&format!("/v1/gitops/{name}/diff"), &query).await?;
            println!("commit {}", d.commit);
            for t in &d.targets {
                match &t.error {
                    None => println!("target {:<16} {} objects", t.name, t.objects),
                    Some(e) => println!("target {:<16} FAILED: {e}", t.name),
                }
            }
            if let Some(e) = &d.error {
                println!("the commit would be rejected:\n  {}", e.replace('\n', "\n  "));
            }
            let mut counts = std::collections::BTreeMap::<&str, usize>::new();
            for ch in &d.changes {
                *counts.entry(ch.change.as_str()).or_default() += 1;
                println!("{:<9} {}", ch.change, ch.object);
                for f in &ch.fields {
                    println!("    {f}");
                }
            }
            let n = |k: &str| counts.get(k).copied().unwrap_or(0);
            println!(
                "{} to create, {} to change, {} unchanged, {} to prune",
                n("created"),
                n("changed"),
                n("unchanged"),
                n("deleted")
            );
            Ok(())
        }
        GitopsCmd::Rm { name, namespace } => {
            c.delete(&format!("/v1/objects/gitrepo/{namespace}/{name}")).await?;
            println!("gitrepo/{namespace}/{name} deleted; the objects it applied stay as they are");
            Ok(())
        }
    }
}
