//! Single-box mode: workloads from a manifest directory on the node itself
//! (`outpost agent run --manifests /etc/outpost/manifests`), with or without a hub.
//!
//! The directory is read like an `outpost apply` of all its files (`*.yaml`, `*.yml`,
//! `*.json`): all or nothing, every error logged with its file, document and field, and the
//! last good set kept running when a change is refused. It is polled every
//! [`POLL_MS`]; a change of any file's content is a new set. Workloads whose node selector and
//! node affinity match this node are rendered exactly as the hub renders them
//! (`outpost_core::render`), so the same supervision, health gate, rollback, monitoring and
//! logs apply. Each template change is a new revision (kept in `local-revisions.json`).
//!
//! Local workloads are keyed `local/<kind>/<namespace>/<name>`: they never collide with the
//! hub's, a hub's full sync never removes them, and removing a file stops only what it held.
//! An agent that joins a hub later keeps them and adds the hub's workloads beside them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use outpost_api::{content_hash, Kind, Labels, Object, ObjectId, WorkloadSpec};
use outpost_core::render::{assign_node_ports, missing_references, render, template_hash};
use outpost_core::schedule::WorkloadView;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tracing::{error, info};

/// How often the directory is checked for changes.
pub const POLL_MS: u64 = 2000;
/// The prefix of local workload keys.
pub const PREFIX: &str = "local/";

pub type LocalWorkloads = Arc<BTreeMap<String, WorkloadSpec>>;

/// Template hash and revision of each local workload, so revisions grow across restarts.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Revisions(BTreeMap<String, (String, u64)>);

impl Revisions {
    fn load(path: &Path) -> Self {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn next(&mut self, key: &str, hash: &str) -> u64 {
        let e = self.0.entry(key.to_string()).or_insert((String::new(), 0));
        if e.0 != hash {
            *e = (hash.to_string(), e.1 + 1);
        }
        e.1
    }
}

/// The manifest files of `dir`, sorted, with their contents.
fn read_dir(dir: &Path) -> Result<Vec<(String, String)>, String> {
    let mut files = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for e in rd.flatten() {
        let p = e.path();
        let ext = p.extension().and_then(|x| x.to_str()).unwrap_or("");
        if !matches!(ext, "yaml" | "yml" | "json") || !p.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
        files.push((p.file_name().unwrap_or_default().to_string_lossy().into_owned(), text));
    }
    files.sort();
    Ok(files)
}

/// Parse and check a directory's files as one apply; render what this node runs.
pub fn plan(
    files: &[(String, String)],
    node: &str,
    labels: &Labels,
    revisions: &mut Revisions,
) -> Result<BTreeMap<String, WorkloadSpec>, Vec<String>> {
    let mut objects: Vec<Object> = Vec::new();
    let mut errors = Vec::new();
    for (name, text) in files {
        match outpost_api::parse_file(name, text) {
            Ok(p) => {
                for w in &p.warnings {
                    info!(file = %name, "{w}");
                }
                for mut o in p.objects {
                    let ns = o.meta().ns().to_string();
                    o.meta_mut().namespace = Some(ns);
                    if objects.iter().any(|x| x.id() == o.id()) {
                        errors.push(format!("{name}: {} is defined twice in the directory", o.id()));
                    }
                    objects.push(o);
                }
            }
            Err(es) => errors.extend(es.iter().map(ToString::to_string)),
        }
    }
    errors.extend(assign_node_ports(&mut objects, &[]).iter().map(ToString::to_string));
    let all: BTreeMap<ObjectId, Object> = objects.iter().map(|o| (o.id(), o.clone())).collect();
    for o in &objects {
        errors.extend(missing_references(o, &all).iter().map(ToString::to_string));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut out = BTreeMap::new();
    for o in &objects {
        let Some(t) = o.template() else { continue };
        let replicas = match o {
            Object::Deployment(d) => d.spec.replicas,
            _ => 1,
        };
        let view = WorkloadView {
            id: o.id(),
            node_selector: t.spec.node_selector.clone(),
            affinity: t
                .spec
                .affinity
                .as_ref()
                .and_then(|a| a.node_affinity.as_ref())
                .and_then(|n| n.required_during_scheduling_ignored_during_execution.clone()),
            replicas,
        };
        if replicas == 0 || !view.fits(node, labels) {
            continue;
        }
        let key = format!("{PREFIX}{}", outpost_core::render::workload_key(&o.id()));
        let rev = revisions.next(&key, &template_hash(o).unwrap_or_default());
        let Some(mut spec) = render(o, rev, &all) else { continue };
        spec.key = key.clone();
        spec.hash = String::new();
        spec.hash = content_hash(&spec);
        out.insert(key, spec);
    }
    Ok(out)
}

fn fingerprint(files: &[(String, String)]) -> String {
    let mut h = Sha256::new();
    for (n, t) in files {
        h.update(n.as_bytes());
        h.update([0]);
        h.update(t.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}

/// The labels this node matches local workloads against: the hub's (when joined) or the
/// ones given, plus `kubernetes.io/hostname`, `kubernetes.io/os` and `kubernetes.io/arch`.
pub fn node_labels(node: &str, given: &Labels) -> Labels {
    let mut l = given.clone();
    l.entry("kubernetes.io/hostname".into())
        .or_insert_with(|| node.to_string());
    l.entry("kubernetes.io/os".into())
        .or_insert_with(|| std::env::consts::OS.to_string());
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    l.entry("kubernetes.io/arch".into()).or_insert_with(|| arch.to_string());
    l
}

/// Load the directory once (for the agent's start) and keep it current in `tx`.
pub struct Source {
    pub dir: PathBuf,
    pub node: String,
    pub labels: Labels,
    pub revisions_file: PathBuf,
}

impl Source {
    /// The current plan, or the errors that refuse it.
    fn load(&self, files: &[(String, String)]) -> Result<BTreeMap<String, WorkloadSpec>, Vec<String>> {
        let mut revisions = Revisions::load(&self.revisions_file);
        let out = plan(files, &self.node, &self.labels, &mut revisions)?;
        if let Ok(b) = serde_json::to_vec_pretty(&revisions) {
            if let Err(e) = crate::identity::write_atomic(&self.revisions_file, &b, 0o644) {
                error!(error = %e, "cannot save local revisions");
            }
        }
        Ok(out)
    }

    /// The first plan (empty when the directory is missing or refused).
    pub fn initial(&self) -> (LocalWorkloads, String) {
        match read_dir(&self.dir) {
            Ok(files) => {
                let fp = fingerprint(&files);
                match self.load(&files) {
                    Ok(w) => {
                        info!(dir = %self.dir.display(), workloads = w.len(), "local manifests loaded");
                        (Arc::new(w), fp)
                    }
                    Err(errors) => {
                        report(&self.dir, &errors);
                        (Arc::new(BTreeMap::new()), fp)
                    }
                }
            }
            Err(e) => {
                error!("{e}; no local workloads until it can be read");
                (Arc::new(BTreeMap::new()), String::new())
            }
        }
    }

    /// Poll the directory; publish each accepted change.
    pub async fn watch(self, mut fp: String, tx: watch::Sender<LocalWorkloads>, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(POLL_MS)) => {}
                _ = stop.changed() => return,
            }
            let Ok(files) = read_dir(&self.dir) else { continue };
            let now = fingerprint(&files);
            if now == fp {
                continue;
            }
            fp = now;
            match self.load(&files) {
                Ok(w) => {
                    info!(dir = %self.dir.display(), workloads = w.len(), "local manifests changed");
                    let _ = tx.send(Arc::new(w));
                }
                Err(errors) => report(&self.dir, &errors),
            }
        }
    }
}

fn report(dir: &Path, errors: &[String]) {
    error!(
        dir = %dir.display(),
        "the manifest directory is refused; the last accepted workloads keep running. Fix: {}",
        errors.join("; ")
    );
}

/// Is this workload key a local one?
pub fn is_local(key: &str) -> bool {
    key.starts_with(PREFIX)
}

/// Kinds a directory may hold that are not workloads are checked and used for rendering only.
pub fn workload_kinds() -> [Kind; 4] {
    [Kind::Deployment, Kind::DaemonSet, Kind::Job, Kind::CronJob]
}
