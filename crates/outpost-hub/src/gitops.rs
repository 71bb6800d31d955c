//! The GitOps controller (docs/gitops.md): for every `GitRepo` object, *load -> decide
//! (`outpost_core::gitops::{next_fetch, decide_commit, placement_terms, combine}`) -> execute*:
//! fetch the repository when due (`gitops_fetch`), render every target with the Kustomize
//! engine, check each render as the hub checks an apply, and apply a commit that renders
//! everywhere as ONE [`Command::GitOpsApply`] (every changed workload becomes one rollout, in
//! waves; objects the repository dropped are pruned in the same command).
//!
//! What it remembers per GitRepo ([`RepoState`]: the commit running, fetched and rejected, the
//! last error, the failure count and the backoff's jitter draw, the last fetch) is kept in the
//! store (`gitops_state`, written whenever it changes and read at the controller's first run),
//! so a restarted hub neither applies the running commit again nor forgets it, and keeps a
//! failing repository's backoff. A hub that stops between applying a commit and storing that it
//! runs applies it again after the restart, which changes nothing (unchanged objects are
//! "unchanged"). Ownership lives on the objects themselves (the `outpost.dev/owned-by`
//! annotation).
//!
//! Must never: apply part of a commit, touch an object it does not own, or fetch a failing
//! repository more often than `next_fetch` allows (a webhook excepted).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use outpost_api::gitops::{GitChange, GitDiff, GitRepo, GitRepoStatus, TargetStatus, OWNED_BY};
use outpost_api::{ManifestFile, Object, UnixMs};
use outpost_core::gitops::{self as core, CommitDecision, FetchState, TargetObjects, TargetRender, Targets};
use outpost_core::waves::AlertChange;

use crate::error::HubError;
use crate::gitops_fetch::{self as fetch, Credentials, Tree};
use crate::service::{Command, Reply, Service};

/// Alert while a GitRepo cannot be fetched.
pub const UNREACHABLE: &str = "GitRepoUnreachable";
/// Alert while a GitRepo's newest commit is refused (does not render, validate or apply).
pub const REJECTED: &str = "GitCommitRejected";

/// What the controller remembers about one GitRepo (stored as JSON in `gitops_state`).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RepoState {
    pub fetch: FetchState,
    /// The jitter draw for the current backoff.
    pub draw: f64,
    pub running: Option<String>,
    pub fetched: Option<String>,
    pub rejected: Option<String>,
    pub error: Option<String>,
    pub targets: Vec<TargetStatus>,
    /// The spec these commits were decided under: a changed spec (URL, ref, path, targets)
    /// decides the fetched commit again, at once.
    pub spec_hash: String,
}

/// Every GitRepo's state, by `namespace/name`.
#[derive(Default)]
pub struct Repos {
    inner: Mutex<BTreeMap<String, RepoState>>,
    /// The stored states were read (the controller's first run does it).
    loaded: std::sync::atomic::AtomicBool,
    /// Fetches asked for (webhook, sync) and not started yet. Kept apart from [`RepoState`] so
    /// a request that arrives while a sync runs is not overwritten when that sync stores its
    /// result: the next run fetches again.
    pending: Mutex<BTreeSet<String>>,
}

impl Repos {
    fn get(&self, key: &str) -> RepoState {
        self.lock().get(key).cloned().unwrap_or_default()
    }
    /// Remember `st`, and return whether it differs from what was remembered.
    fn put(&self, key: &str, st: RepoState) -> bool {
        self.lock().insert(key.to_string(), st.clone()).as_ref() != Some(&st)
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, RepoState>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// A webhook (or `outpost gitops sync`) asks for a fetch now.
    pub fn request_fetch(&self, key: &str) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string());
    }
    fn is_pending(&self, key: &str) -> bool {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).contains(key)
    }
    fn take_pending(&self, key: &str) {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }
}

pub fn key(g: &GitRepo) -> String {
    format!("{}/{}", g.metadata.ns(), g.metadata.name)
}

/// The owner annotation's value for a GitRepo.
pub fn owner(g: &GitRepo) -> String {
    format!("gitrepo/{}", key(g))
}

fn cache_root(svc: &Service) -> PathBuf {
    svc.settings
        .images_dir
        .parent()
        .map(|p| p.join("gitops"))
        .unwrap_or_else(|| PathBuf::from("gitops"))
}

fn targets_of(g: &GitRepo) -> Targets {
    match &g.spec.overlays_by {
        Some(label) => Targets::OverlaysBy { label: label.clone() },
        None => Targets::Explicit(
            g.spec
                .targets
                .iter()
                .map(|t| core::Target {
                    name: t.name.clone(),
                    path: t.path.clone(),
                    node_selector: t.node_selector.clone(),
                })
                .collect(),
        ),
    }
}

/// A key of a Secret in the GitRepo's namespace (`data` is base64, `stringData` plain).
fn secret_value(objects: &[Object], ns: &str, secret: &str, key: &str) -> Option<String> {
    use base64::Engine;
    objects.iter().find_map(|o| match o {
        Object::Secret(s) if s.metadata.ns() == ns && s.metadata.name == secret => {
            s.string_data.get(key).cloned().or_else(|| {
                s.data.get(key).and_then(|v| {
                    base64::engine::general_purpose::STANDARD
                        .decode(v.trim())
                        .ok()
                        .and_then(|b| String::from_utf8(b).ok())
                })
            })
        }
        _ => None,
    })
}

fn credentials(g: &GitRepo, objects: &[Object]) -> Result<Option<Credentials>, String> {
    let Some(auth) = &g.spec.auth else { return Ok(None) };
    let ns = g.metadata.ns();
    let name = &auth.secret_ref;
    let get = |k: &str| secret_value(objects, ns, name, k);
    if !objects
        .iter()
        .any(|o| matches!(o, Object::Secret(s) if s.metadata.ns() == ns && s.metadata.name == *name))
    {
        return Err(format!(
            "spec.auth.secretRef: Secret {ns}/{name} does not exist; apply it (keys token, or username and password)"
        ));
    }
    match (get("token"), get("username"), get("password")) {
        (Some(t), user, _) => Ok(Some(Credentials {
            username: user.unwrap_or_else(|| "x-access-token".into()),
            password: t,
        })),
        (None, Some(u), Some(p)) => Ok(Some(Credentials {
            username: u,
            password: p,
        })),
        _ => Err(format!(
            "spec.auth.secretRef: Secret {ns}/{name} has neither `token` nor `username` and `password`"
        )),
    }
}

/// The webhook's shared secret, if the GitRepo has one.
pub fn webhook_secret(g: &GitRepo, objects: &[Object]) -> Option<String> {
    let r = g.spec.webhook.as_ref()?;
    secret_value(objects, g.metadata.ns(), &r.secret_ref, "token")
}

/// The result of rendering every target of one commit.
pub struct Rendered {
    pub targets: Vec<TargetStatus>,
    pub renders: Vec<TargetRender>,
    /// The objects the hub would hold (as one manifest file), when every target rendered.
    pub file: Option<ManifestFile>,
    /// Why the combined objects are refused, when the targets rendered but do not combine.
    pub combine_error: Option<Vec<(String, String)>>,
}

/// Remember a GitRepo's state, and store it when it changed (a failed write is logged: the
/// state in memory is still right, and the next change writes it again).
async fn save(svc: &Service, key: &str, st: RepoState) {
    if !svc.gitops.put(key, st.clone()) {
        return;
    }
    let json = match serde_json::to_string(&st) {
        Ok(j) => j,
        Err(e) => {
            tracing::warn!(gitrepo = %key, error = %e, "cannot encode the GitOps state");
            return;
        }
    };
    let k = key.to_string();
    let now = outpost_api::now_ms();
    if let Err(e) = svc.store.put_gitops_state(&k, Some(&json), now).await {
        tracing::warn!(gitrepo = %key, error = %e, "cannot store the GitOps state; it is kept in memory");
    }
}

/// Read the stored states once, at the controller's first run.
async fn load_states(svc: &Service) {
    if svc.gitops.loaded.load(std::sync::atomic::Ordering::Acquire) {
        return;
    }
    match svc.store.gitops_states().await {
        Ok(rows) => {
            let mut map = svc.gitops.lock();
            for (k, json) in rows {
                match serde_json::from_str::<RepoState>(&json) {
                    Ok(st) => {
                        map.entry(k).or_insert(st);
                    }
                    Err(e) => {
                        tracing::warn!(gitrepo = %k, error = %e, "stored GitOps state unreadable; starting afresh")
                    }
                }
            }
            svc.gitops.loaded.store(true, std::sync::atomic::Ordering::Release);
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the stored GitOps states; retrying"),
    }
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

/// Render every target of `tree` and check each as an apply would.
pub fn render(g: &GitRepo, tree: &Tree, host_paths: &crate::validate::HostPathPolicy) -> Rendered {
    let fs = tree.mem_fs();
    let targets = targets_of(g);
    let overlays = tree.kustomization_dirs_below("overlays");
    let list: Vec<(String, String)> = match &targets {
        Targets::Explicit(l) => l.iter().map(|t| (t.name.clone(), t.path.clone())).collect(),
        Targets::OverlaysBy { .. } => std::iter::once(("base".to_string(), "base".to_string()))
            .chain(overlays.iter().map(|o| (o.clone(), format!("overlays/{o}"))))
            .collect(),
    };
    let mut statuses = Vec::new();
    let mut renders = Vec::new();
    let mut per_target = Vec::new();
    for (name, path) in &list {
        let result = (|| -> Result<Vec<serde_json::Value>, String> {
            let objs = outpost_kustomize::build(&fs, path).map_err(|e| e.to_string())?;
            let file = ManifestFile {
                name: format!("{path} @ {}", short(&tree.commit)),
                content: outpost_kustomize::to_yaml(&objs),
            };
            crate::validate::parse_apply_batch(std::slice::from_ref(&file), host_paths).map_err(|errors| {
                errors
                    .iter()
                    .map(|e| format!("{}: {}: {}", e.document, e.field, e.reason))
                    .collect::<Vec<_>>()
                    .join("; ")
            })?;
            Ok(objs)
        })();
        statuses.push(TargetStatus {
            name: name.clone(),
            path: path.clone(),
            objects: result.as_ref().map_or(0, Vec::len),
            error: result.as_ref().err().cloned(),
            nodes: 0,
            rollouts: BTreeMap::new(),
        });
        renders.push(TargetRender {
            target: name.clone(),
            result: result.as_ref().map(|_| ()).map_err(Clone::clone),
        });
        if let Ok(objs) = result {
            match core::placement_terms(&targets, name, &overlays) {
                Ok(terms) => per_target.push(TargetObjects {
                    target: name.clone(),
                    terms,
                    objects: objs,
                }),
                Err(e) => {
                    let last = renders.len() - 1;
                    renders[last].result = Err(e.clone());
                    statuses[last].error = Some(e);
                }
            }
        }
    }
    let (file, combine_error) = if renders.iter().all(|r| r.result.is_ok()) {
        match core::combine(&per_target) {
            Ok(objs) => (
                Some(ManifestFile {
                    name: format!("gitrepo/{} @ {}", key(g), short(&tree.commit)),
                    content: outpost_kustomize::to_yaml(&objs),
                }),
                None,
            ),
            Err(e) => (None, Some(e)),
        }
    } else {
        (None, None)
    };
    Rendered {
        targets: statuses,
        renders,
        file,
        combine_error,
    }
}

async fn alert(svc: &Service, name: &'static str, g: &GitRepo, change: AlertChange) {
    let subject = owner(g);
    let now = outpost_api::now_ms();
    match svc.monitor.fleet_alert(name, &subject, "gitops", &change, now).await {
        Ok(out) => svc.announce(&out),
        Err(e) => tracing::warn!(error = %e, alert = name, "cannot record a GitOps alert"),
    }
}

/// Fetch, render and (when the commit is new and good) apply one GitRepo.
async fn sync_one(svc: &Service, g: &GitRepo, objects: &[Object], now: UnixMs) {
    let k = key(g);
    svc.gitops.take_pending(&k);
    let mut st = svc.gitops.get(&k);
    st.fetch.webhook_pending = false;
    st.fetch.last_fetch = Some(now);
    let dir = fetch::cache_dir(&cache_root(svc), g.metadata.ns(), &g.metadata.name);
    let fetched = match credentials(g, objects) {
        Err(e) => Err(e),
        Ok(creds) => fetch::fetch(&dir, &g.spec.url, &g.spec.git_ref(), creds.as_ref())
            .await
            .map_err(|e| e.to_string()),
    };
    let commit = match fetched {
        Err(e) => {
            st.fetch.failures += 1;
            st.draw = rand::random::<f64>();
            tracing::warn!(gitrepo = %k, failures = st.fetch.failures, error = %e, "GitOps fetch failed; the running commit stays");
            st.error = Some(e.clone());
            save(svc, &k, st.clone()).await;
            alert(svc, UNREACHABLE, g, AlertChange::Fire(format!("gitrepo/{k}: {e}"))).await;
            return;
        }
        Ok(c) => c,
    };
    // A no-op unless it fires (also after a spec change reset the failure count).
    alert(svc, UNREACHABLE, g, AlertChange::Resolve).await;
    st.fetch.failures = 0;
    st.fetched = Some(commit.clone());
    if st.running.as_deref() == Some(commit.as_str()) {
        st.error = None; // a fetch error before this good fetch is over
        save(svc, &k, st.clone()).await;
        return;
    }
    if st.rejected.as_deref() == Some(commit.as_str()) {
        save(svc, &k, st.clone()).await;
        return;
    }
    let tree = match fetch::read_tree(&dir, &commit, &g.spec.path).await {
        Ok(t) => t,
        Err(e) => {
            st.error = Some(e.to_string());
            save(svc, &k, st.clone()).await;
            return;
        }
    };
    let r = render(g, &tree, &svc.settings.host_paths);
    st.targets = r.targets.clone();
    let mut decision = core::decide_commit(st.running.as_deref(), st.rejected.as_deref(), &commit, &r.renders);
    if let (CommitDecision::Apply, Some(errs)) = (&decision, &r.combine_error) {
        decision = CommitDecision::Reject(errs.iter().map(|(o, why)| (o.clone(), why.clone())).collect());
    }
    match decision {
        CommitDecision::Nothing => {}
        CommitDecision::Reject(reasons) => {
            let why = reasons
                .iter()
                .map(|(t, e)| format!("{t}: {e}"))
                .collect::<Vec<_>>()
                .join("\n");
            tracing::warn!(gitrepo = %k, commit = %commit, reasons = %why, "commit rejected; the running commit stays");
            st.rejected = Some(commit.clone());
            st.error = Some(format!(
                "commit {} rejected, nothing of it applied:\n{why}",
                short(&commit)
            ));
            alert(
                svc,
                REJECTED,
                g,
                AlertChange::Fire(format!("gitrepo/{k}: commit {} rejected: {why}", short(&commit))),
            )
            .await;
        }
        CommitDecision::Apply => {
            let Some(file) = r.file else { return };
            match svc.execute(Command::GitOpsApply { owner: owner(g), file }).await {
                Ok(Reply::Applied(resp)) => {
                    let changed = resp.results.iter().filter(|r| r.action != "unchanged").count();
                    tracing::info!(gitrepo = %k, commit = %commit, changed, "commit applied");
                    st.running = Some(commit.clone());
                    st.rejected = None;
                    st.error = None;
                    alert(svc, REJECTED, g, AlertChange::Resolve).await;
                }
                Ok(_) => {}
                Err(e) => {
                    // Not marked rejected: an ownership conflict or a missing reference can be
                    // fixed at the hub, so the next fetch tries the same commit again.
                    tracing::warn!(gitrepo = %k, commit = %commit, error = %e, "applying the commit failed; retrying at the next fetch");
                    st.error = Some(format!("commit {} not applied: {e}", short(&commit)));
                    alert(
                        svc,
                        REJECTED,
                        g,
                        AlertChange::Fire(format!("gitrepo/{k}: commit {} not applied: {e}", short(&commit))),
                    )
                    .await;
                }
            }
        }
    }
    save(svc, &k, st.clone()).await;
}

/// One run of the controller: sync every GitRepo that is due; returns the wait until the next
/// one is.
pub async fn tick(svc: &Service, now: UnixMs) -> Duration {
    let objects = match svc.store.objects().await {
        Ok(o) => o.into_iter().map(|o| o.object).collect::<Vec<_>>(),
        Err(e) => {
            tracing::warn!(error = %e, "GitOps cannot read the objects; retrying");
            return Duration::from_secs(5);
        }
    };
    let repos: Vec<GitRepo> = objects
        .iter()
        .filter_map(|o| match o {
            Object::GitRepo(g) => Some(g.clone()),
            _ => None,
        })
        .collect();
    let keys: BTreeSet<String> = repos.iter().map(key).collect();
    load_states(svc).await;
    if !svc.gitops.loaded.load(std::sync::atomic::Ordering::Acquire) {
        return Duration::from_secs(5);
    }
    let gone: Vec<String> = svc
        .gitops
        .lock()
        .keys()
        .filter(|k| !keys.contains(*k))
        .cloned()
        .collect();
    for k in gone {
        svc.gitops.lock().remove(&k);
        let key = k.clone();
        if let Err(e) = svc.store.put_gitops_state(&key, None, 0).await {
            tracing::warn!(gitrepo = %k, error = %e, "cannot forget the GitOps state of a removed GitRepo");
        }
    }
    svc.gitops
        .pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|k| keys.contains(k));
    let mut wait = Duration::from_secs(30);
    for g in &repos {
        let mut st = svc.gitops.get(&key(g));
        let spec_hash = outpost_api::content_hash(&g.spec);
        if st.spec_hash != spec_hash {
            if !st.spec_hash.is_empty() {
                tracing::info!(gitrepo = %key(g), "GitRepo spec changed; fetching and deciding again");
            }
            st = RepoState {
                spec_hash,
                ..RepoState::default()
            };
            save(svc, &key(g), st.clone()).await;
        }
        st.fetch.webhook_pending = svc.gitops.is_pending(&key(g));
        let due = core::next_fetch(&st.fetch, g.spec.poll_ms(), now, st.draw);
        if due <= now {
            sync_one(svc, g, &objects, outpost_api::now_ms()).await;
        }
        let mut st = svc.gitops.get(&key(g));
        st.fetch.webhook_pending = svc.gitops.is_pending(&key(g));
        let next = core::next_fetch(&st.fetch, g.spec.poll_ms(), outpost_api::now_ms(), st.draw);
        let ms = (next - outpost_api::now_ms()).max(10);
        wait = wait.min(Duration::from_millis(u64::try_from(ms).unwrap_or(10)));
    }
    wait
}

fn find<'a>(objects: &'a [Object], namespace: &str, name: &str) -> Result<&'a GitRepo, HubError> {
    objects
        .iter()
        .find_map(|o| match o {
            Object::GitRepo(g) if g.metadata.ns() == namespace && g.metadata.name == name => Some(g),
            _ => None,
        })
        .ok_or_else(|| {
            HubError::NotFound(format!(
                "GitRepo {namespace}/{name} (add one with `outpost gitops add`)"
            ))
        })
}

/// `outpost gitops ls|status`: every GitRepo, or one.
pub async fn status(svc: &Service, only: Option<(String, String)>) -> Result<Vec<GitRepoStatus>, HubError> {
    let (stored, rollouts) = (svc.store.objects().await?, svc.store.rollouts().await?);
    let objects: Vec<Object> = stored.into_iter().map(|o| o.object).collect();
    if let Some((ns, name)) = &only {
        find(&objects, ns, name)?;
    }
    let phases: BTreeMap<String, String> = rollouts
        .iter()
        .map(|r| (r.workload.clone(), format!("{:?}", r.phase)))
        .collect();
    let by_key: BTreeMap<&str, &outpost_core::waves::Rollout> =
        rollouts.iter().map(|r| (r.workload.as_str(), r)).collect();
    let nodes = svc.store.nodes().await?;
    let mut out = Vec::new();
    for o in &objects {
        let Object::GitRepo(g) = o else { continue };
        if only
            .as_ref()
            .is_some_and(|(ns, n)| g.metadata.ns() != ns || g.metadata.name != *n)
        {
            continue;
        }
        let st = svc.gitops.get(&key(g));
        let own = owner(g);
        let owned: Vec<&Object> = objects
            .iter()
            .filter(|o| o.meta().annotations.get(OWNED_BY) == Some(&own))
            .collect();
        let mut rollouts = BTreeMap::new();
        for o in &owned {
            if let Some(p) = phases.get(&outpost_core::render::workload_key(&o.id())) {
                rollouts.insert(o.id().to_string(), p.clone());
            }
        }
        let mut targets = st.targets.clone();
        let overlays: BTreeSet<String> = targets
            .iter()
            .filter(|t| t.path.starts_with("overlays/"))
            .map(|t| t.name.clone())
            .collect();
        let spec_targets = targets_of(g);
        let mut of_target: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for n in &nodes {
            if let Some((t, _)) = core::target_for(&spec_targets, &n.labels, &overlays) {
                of_target.entry(t).or_default().insert(n.name.clone());
            }
        }
        let owned_rollouts: Vec<(String, &outpost_core::waves::Rollout)> = owned
            .iter()
            .filter_map(|o| {
                by_key
                    .get(outpost_core::render::workload_key(&o.id()).as_str())
                    .map(|r| (o.id().to_string(), *r))
            })
            .collect();
        let none = BTreeSet::new();
        for t in &mut targets {
            let members = of_target.get(&t.name).unwrap_or(&none);
            t.nodes = members.len();
            t.rollouts = owned_rollouts
                .iter()
                .filter_map(|(id, r)| target_rollout(r, members).map(|s| (id.clone(), s)))
                .collect();
        }
        out.push(GitRepoStatus {
            name: g.metadata.name.clone(),
            namespace: g.metadata.ns().to_string(),
            url: g.spec.url.clone(),
            git_ref: g.spec.git_ref(),
            running: st.running.clone(),
            fetched: st.fetched.clone(),
            rejected: st.rejected.clone(),
            last_fetch: st.fetch.last_fetch,
            next_fetch: st
                .fetch
                .last_fetch
                .map(|_| core::next_fetch(&st.fetch, g.spec.poll_ms(), outpost_api::now_ms(), st.draw)),
            failures: st.fetch.failures,
            error: st.error.clone(),
            targets,
            objects: owned.iter().map(|o| o.id().to_string()).collect(),
            rollouts,
        });
    }
    Ok(out)
}

/// A rollout as one target's nodes see it: `None` when none of them is in it (the revision
/// did not change this target's variant, or the target has no node).
fn target_rollout(r: &outpost_core::waves::Rollout, nodes: &BTreeSet<String>) -> Option<String> {
    use outpost_api::NodeRolloutState as S;
    let mine: Vec<&outpost_core::waves::Member> = r
        .members
        .iter()
        .filter(|(n, _)| nodes.contains(*n))
        .map(|(_, m)| m)
        .collect();
    let in_from = nodes.iter().filter(|n| r.from.contains_key(*n)).count();
    let total = mine.len().max(in_from);
    if total == 0 {
        return None;
    }
    let count = |s: S| mine.iter().filter(|m| m.state == s).count();
    let updated = if r.phase == outpost_api::RolloutPhase::Complete {
        total - count(S::Failed)
    } else {
        count(S::Passed)
    };
    Some(format!(
        "{}: {updated} of {total} node{} updated, {} failed (revision {})",
        r.phase.as_str(),
        if total == 1 { "" } else { "s" },
        count(S::Failed),
        r.revision
    ))
}

/// `outpost gitops sync` and the webhook: fetch at once.
pub fn request_sync(svc: &Service, g: &GitRepo) {
    svc.gitops.request_fetch(&key(g));
    svc.wake.gitops.notify_one();
}

/// Look a GitRepo up by namespace and name.
pub async fn repo(svc: &Service, namespace: &str, name: &str) -> Result<(GitRepo, Vec<Object>), HubError> {
    let objects: Vec<Object> = svc.store.objects().await?.into_iter().map(|o| o.object).collect();
    let g = find(&objects, namespace, name)?.clone();
    Ok((g, objects))
}

/// `outpost gitops diff`: what applying `commit` (default: the last fetched one) would do.
pub async fn diff(svc: &Service, namespace: &str, name: &str, commit: Option<String>) -> Result<GitDiff, HubError> {
    let (g, objects) = repo(svc, namespace, name).await?;
    let dir = fetch::cache_dir(&cache_root(svc), g.metadata.ns(), &g.metadata.name);
    let rev = commit.unwrap_or_else(|| "refs/outpost/fetched".into());
    if !dir.join("HEAD").exists() {
        return Err(HubError::Conflict(format!(
            "gitrepo/{namespace}/{name} was not fetched yet; see `outpost gitops status {name}`"
        )));
    }
    let commit = fetch::resolve(&dir, &rev)
        .await
        .map_err(|e| HubError::BadRequest(e.to_string()))?;
    let tree = fetch::read_tree(&dir, &commit, &g.spec.path)
        .await
        .map_err(|e| HubError::BadRequest(e.to_string()))?;
    let r = render(&g, &tree, &svc.settings.host_paths);
    let mut out = GitDiff {
        commit: commit.clone(),
        targets: r.targets,
        error: r.combine_error.map(|e| {
            e.iter()
                .map(|(o, why)| format!("{o}: {why}"))
                .collect::<Vec<_>>()
                .join("\n")
        }),
        changes: Vec::new(),
    };
    let Some(file) = r.file else { return Ok(out) };
    let (desired, _) = crate::validate::parse_apply_batch(std::slice::from_ref(&file), &svc.settings.host_paths)
        .map_err(HubError::InvalidManifest)?;
    let own = owner(&g);
    let mut want = Vec::new();
    for mut o in desired {
        o.meta_mut().annotations.insert(OWNED_BY.into(), own.clone());
        let mut v = serde_json::to_value(&o).unwrap_or_default();
        expand_variants(&mut v);
        want.push((o.id().to_string(), v));
    }
    let have: Vec<(String, serde_json::Value)> = objects
        .iter()
        .filter(|o| {
            want.iter().any(|(id, _)| *id == o.id().to_string()) || o.meta().annotations.get(OWNED_BY) == Some(&own)
        })
        .map(|o| {
            let mut v = serde_json::to_value(o).unwrap_or_default();
            expand_variants(&mut v);
            (o.id().to_string(), v)
        })
        .collect();
    for (id, ch) in outpost_kustomize::diff::plan(&want, &have) {
        let fields = match &ch {
            outpost_kustomize::diff::Change::Changed(f) => f.iter().map(ToString::to_string).collect(),
            _ => Vec::new(),
        };
        out.changes.push(GitChange {
            object: id,
            change: ch.word().to_string(),
            fields,
        });
    }
    Ok(out)
}

/// For a diff: a fleet workload's variants annotation (one JSON string) as a mapping from the
/// variant's targets (`base,shanghai`) to its object, so a changed variant shows as the fields
/// that changed in it (`...variants.berlin.spec.template...`), not as one changed string.
fn expand_variants(v: &mut serde_json::Value) {
    for path in [
        "/spec/template/metadata/annotations",
        "/spec/jobTemplate/spec/template/metadata/annotations",
    ] {
        let Some(ann) = v.pointer_mut(path).and_then(|a| a.as_object_mut()) else {
            continue;
        };
        let Some(raw) = ann.get(core::VARIANTS).and_then(|r| r.as_str()) else {
            continue;
        };
        let Ok(list) = serde_json::from_str::<Vec<core::Variant>>(raw) else {
            continue;
        };
        let map: serde_json::Map<String, serde_json::Value> =
            list.into_iter().map(|x| (x.targets.join(","), x.object)).collect();
        ann.insert(core::VARIANTS.into(), serde_json::Value::Object(map));
    }
}

/// Whether a webhook request carries the GitRepo's secret: GitHub's `X-Hub-Signature-256:
/// sha256=<HMAC-SHA256 of the body, hex>` or the plain `X-Outpost-Token: <secret>`. Both are
/// compared as SHA-256 digests, so the time taken does not depend on where they differ.
pub fn webhook_authorized(secret: &str, signature: Option<&str>, token: Option<&str>, body: &[u8]) -> bool {
    use crate::service::sha256;
    if let Some(sig) = signature {
        let want = format!("sha256={}", hex::encode(hmac_sha256(secret.as_bytes(), body)));
        return sha256(&want) == sha256(sig.trim());
    }
    if let Some(t) = token {
        return sha256(secret) == sha256(t.trim());
    }
    false
}

/// HMAC-SHA256 (RFC 2104) over `sha2`.
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(msg).finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_rfc4231() {
        // RFC 4231 test cases 1 and 2.
        assert_eq!(
            hex::encode(hmac_sha256(&[0x0b; 20], b"Hi There")),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Case 6: a key longer than the block.
        assert_eq!(
            hex::encode(hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn a_diff_sees_variants_as_objects() {
        let variants = serde_json::json!([
            {"targets": ["base", "shanghai"], "object": {"kind": "DaemonSet", "spec": {"x": 1}}},
            {"targets": ["berlin"], "object": {"kind": "DaemonSet", "spec": {"x": 2}}},
        ]);
        let mut v = serde_json::json!({"spec": {"template": {"metadata": {"annotations": {
            core::VARIANTS: variants.to_string(), "other": "kept"}}}}});
        expand_variants(&mut v);
        let ann = &v["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(ann[core::VARIANTS]["berlin"]["spec"]["x"], 2);
        assert_eq!(ann[core::VARIANTS]["base,shanghai"]["spec"]["x"], 1);
        assert_eq!(ann["other"], "kept");
        // Anything else is left alone.
        let mut plain = serde_json::json!({"spec": {"replicas": 1}});
        expand_variants(&mut plain);
        assert_eq!(plain, serde_json::json!({"spec": {"replicas": 1}}));
    }

    #[test]
    fn webhook_checks() {
        let body = b"{\"ref\":\"refs/heads/main\"}";
        let sig = format!("sha256={}", hex::encode(hmac_sha256(b"s3cret", body)));
        assert!(webhook_authorized("s3cret", Some(&sig), None, body));
        assert!(!webhook_authorized("other", Some(&sig), None, body));
        assert!(!webhook_authorized("s3cret", Some(&sig), None, b"{}"));
        assert!(webhook_authorized("s3cret", None, Some("s3cret"), body));
        assert!(!webhook_authorized("s3cret", None, Some("s3cre"), body));
        assert!(!webhook_authorized("s3cret", None, None, body));
    }
}
