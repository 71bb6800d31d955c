//! `outpost bench kustomize`: the render time of an `overlaysBy` repository with one overlay
//! per site (500 by default) over a shared base, by outpost's engine (in process, as the hub
//! renders) from disk and from memory (as from a Git tree), and by `kubectl kustomize` (one
//! process per site) when kubectl is found, on the same tree.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::stats::{ms, Summary};

#[derive(clap::Args, Clone, Debug)]
pub struct KustomizeArgs {
    /// Sites, one overlay each.
    #[arg(long, default_value_t = 500)]
    pub sites: usize,
    /// Deployments in the base (each with a Service).
    #[arg(long, default_value_t = 10)]
    pub workloads: usize,
    /// kubectl for the comparison (skipped when missing); default: `.venv/bin/kubectl`, then PATH.
    #[arg(long)]
    pub kubectl: Option<PathBuf>,
    /// Sites kubectl renders (it is slow: one process per site).
    #[arg(long, default_value_t = 50)]
    pub kubectl_sites: usize,
}

/// The repository: (path, content) pairs, relative to its root.
pub fn repo(sites: usize, workloads: usize) -> Vec<(String, String)> {
    let mut files = Vec::new();
    let mut base = String::from("resources:\n");
    for w in 0..workloads {
        base.push_str(&format!("- app-{w}.yaml\n"));
        files.push((
            format!("base/app-{w}.yaml"),
            format!(
                "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: app-{w}\nspec:\n  replicas: 1\n  selector:\n    matchLabels:\n      app: app-{w}\n  template:\n    metadata:\n      labels:\n        app: app-{w}\n    spec:\n      containers:\n      - name: main\n        image: registry.example.com/app-{w}:1.0\n        env:\n        - name: SITE\n          valueFrom:\n            configMapKeyRef:\n              name: site-config\n              key: SITE\n        ports:\n        - containerPort: 8080\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: app-{w}\nspec:\n  selector:\n    app: app-{w}\n  ports:\n  - port: 80\n    targetPort: 8080\n"
            ),
        ));
    }
    base.push_str("configMapGenerator:\n- name: site-config\n  literals:\n  - SITE=none\n  - MODE=standard\n");
    files.push(("base/kustomization.yaml".into(), base));
    for s in 0..sites {
        let site = format!("store-{s:04}");
        files.push((
            format!("overlays/{site}/kustomization.yaml"),
            format!(
                "resources:\n- ../../base\nnamespace: {site}\nlabels:\n- pairs:\n    outpost.dev/site: {site}\nconfigMapGenerator:\n- name: site-config\n  behavior: merge\n  literals:\n  - SITE={site}\nimages:\n- name: registry.example.com/app-0\n  newTag: \"1.{}\"\npatches:\n- path: limits.yaml\n  target:\n    kind: Deployment\n",
                s % 7
            ),
        ));
        files.push((
            format!("overlays/{site}/limits.yaml"),
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: any\nspec:\n  template:\n    spec:\n      containers:\n      - name: main\n        resources:\n          limits:\n            memory: 128Mi\n".into(),
        ));
    }
    files
}

fn find_kubectl(given: Option<PathBuf>) -> Option<PathBuf> {
    if let Some(k) = given {
        return k.exists().then_some(k);
    }
    let venv = PathBuf::from(".venv/bin/kubectl");
    if venv.exists() {
        return Some(venv);
    }
    let out = std::process::Command::new("sh")
        .args(["-c", "command -v kubectl"])
        .output()
        .ok()?;
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!p.is_empty()).then(|| PathBuf::from(p))
}

fn row(what: &str, total: Duration, per: &Summary, sites: usize, objects: usize) -> Vec<String> {
    vec![
        what.to_string(),
        sites.to_string(),
        format!("{:.2} s", total.as_secs_f64()),
        ms(per.p50),
        ms(per.p99),
        format!("{:.0}", objects as f64 / total.as_secs_f64()),
    ]
}

pub async fn kustomize(a: KustomizeArgs, work: &Path) -> Result<String> {
    let files = repo(a.sites, a.workloads);
    let root = work.join("repo");
    let mut mem = outpost_kustomize::MemFs::new();
    for (p, c) in &files {
        let path = root.join(p);
        std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        std::fs::write(&path, c)?;
        mem.insert(&format!("repo/{p}"), c.as_bytes());
    }
    let sites: Vec<String> = (0..a.sites).map(|s| format!("overlays/store-{s:04}")).collect();
    let mut rows = Vec::new();
    let mut objects = 0;
    let mut first = None;
    for (label, from_disk) in [
        ("outpost, from disk", true),
        ("outpost, from memory (a Git tree)", false),
    ] {
        let mut per = Vec::new();
        let start = Instant::now();
        objects = 0;
        for s in &sites {
            let t = Instant::now();
            let out = if from_disk {
                outpost_kustomize::build(&outpost_kustomize::DiskFs, root.join(s).to_str().context("UTF-8 path")?)
            } else {
                outpost_kustomize::build(&mem, &format!("repo/{s}"))
            }
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            per.push(t.elapsed());
            objects += out.len();
            if first.is_none() {
                first = Some(out);
            }
        }
        rows.push(row(
            label,
            start.elapsed(),
            &Summary::of_durations(&per),
            sites.len(),
            objects,
        ));
    }
    let mut notes = String::new();
    match find_kubectl(a.kubectl.clone()) {
        None => notes.push_str("kubectl not found: no comparison.\n"),
        Some(k) => {
            let n = a.kubectl_sites.min(sites.len());
            let mut per = Vec::new();
            let start = Instant::now();
            for s in &sites[..n] {
                let t = Instant::now();
                let out = tokio::process::Command::new(&k)
                    .arg("kustomize")
                    .arg(root.join(s))
                    .output()
                    .await?;
                if !out.status.success() {
                    bail!("kubectl kustomize {s} failed: {}", String::from_utf8_lossy(&out.stderr));
                }
                per.push(t.elapsed());
                if s == &sites[0] {
                    let theirs = outpost_kustomize::parse_stream(&String::from_utf8_lossy(&out.stdout))
                        .map_err(anyhow::Error::msg)?;
                    let same = first.as_ref() == Some(&theirs);
                    notes.push_str(&format!(
                        "Site {s}: outpost's render {} `kubectl kustomize`'s ({} objects).\n",
                        if same { "equals" } else { "DIFFERS FROM" },
                        theirs.len()
                    ));
                }
            }
            let per_site = objects / sites.len().max(1);
            rows.push(row(
                &format!("kubectl kustomize ({})", k.display()),
                start.elapsed(),
                &Summary::of_durations(&per),
                n,
                per_site * n,
            ));
        }
    }
    Ok(format!(
        "## Kustomize render (`outpost bench kustomize --sites {} --workloads {}`)\n\n\
         An `overlaysBy` repository: a base of {} Deployments, {} Services and a generated ConfigMap; one overlay \
         per site with a namespace, a label, a merged ConfigMap, an image tag and a strategic merge patch on every \
         Deployment. Each site rendered once, in sequence, on one thread.\n\n{}\n{}",
        a.sites,
        a.workloads,
        a.workloads,
        a.workloads,
        crate::table(
            &[
                "renderer",
                "sites",
                "total",
                "p50 per site",
                "p99 per site",
                "objects/s"
            ],
            &rows
        ),
        notes
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_repo_renders() {
        let files = repo(3, 2);
        let mut fs = outpost_kustomize::MemFs::new();
        for (p, c) in &files {
            fs.insert(&format!("r/{p}"), c.as_bytes());
        }
        let out = outpost_kustomize::build(&fs, "r/overlays/store-0001").unwrap();
        assert_eq!(out.len(), 5);
        assert_eq!(out[0]["kind"], "ConfigMap");
        assert_eq!(out[0]["metadata"]["namespace"], "store-0001");
        assert_eq!(
            out[3]["spec"]["template"]["spec"]["containers"][0]["image"],
            "registry.example.com/app-0:1.1"
        );
    }
}
