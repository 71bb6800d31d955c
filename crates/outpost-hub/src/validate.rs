//! Pure checks behind the operator and join routes: batch parsing, the host-path policy,
//! cross-object references, in-use refusal, node names.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use outpost_api::checks::{host_path_mounts, normalize_path};
use outpost_api::{parse_file, ManifestError, ManifestFile, Object, ObjectId, Warning};
use outpost_core::render::{gate_timing, missing_references, references};

use crate::error::HubError;

/// What the hub does with a workload that mounts a host path (`outpost hub --host-paths`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HostPathMode {
    /// Accept every host path; warn about sensitive ones (`/`, `/etc` read-write, the
    /// Docker socket, ...; see `outpost_api::checks::host_path_risk`).
    #[default]
    Warn,
    /// Refuse sensitive host paths at apply.
    DenySensitive,
    /// Refuse every host path.
    Deny,
}

impl FromStr for HostPathMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "warn" => Ok(Self::Warn),
            "deny-sensitive" => Ok(Self::DenySensitive),
            "deny" => Ok(Self::Deny),
            other => Err(format!(
                "{other:?} is not a host path mode: use warn, deny-sensitive or deny"
            )),
        }
    }
}

/// The hub's host-path policy: a mode, and prefixes exempt from it (`--host-path-allow`). A
/// host path under an allowed prefix is accepted whatever the mode (the operator named it), so
/// `deny` with a few prefixes is a strict allow-list, and `deny-sensitive` with
/// `/var/run/docker.sock` lets a monitoring agent have the one socket it needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostPathPolicy {
    pub mode: HostPathMode,
    /// Normalized absolute prefixes (`/srv/data`).
    pub allow: Vec<String>,
    /// `outpost hub --privileged deny`: refuse privileged containers, added capabilities,
    /// hostNetwork and hostPID (`outpost_api::checks::privileges`).
    pub deny_privileged: bool,
}

impl HostPathPolicy {
    /// A policy from the command line's mode and prefixes; prefixes must be absolute.
    pub fn new(mode: HostPathMode, allow: &[String]) -> Result<Self, String> {
        let mut out = Vec::new();
        for p in allow {
            if !p.starts_with('/') || p.chars().any(char::is_control) {
                return Err(format!(
                    "--host-path-allow {p:?} must be an absolute path like /srv/data"
                ));
            }
            out.push(normalize_path(p));
        }
        Ok(Self {
            mode,
            allow: out,
            deny_privileged: false,
        })
    }

    /// The same policy with `--privileged allow|deny`.
    pub fn with_privileged(mut self, mode: &str) -> Result<Self, String> {
        self.deny_privileged = match mode {
            "allow" => false,
            "deny" => true,
            other => return Err(format!("--privileged {other:?}: use allow or deny")),
        };
        Ok(self)
    }

    fn allowed(&self, path: &str) -> bool {
        let p = normalize_path(path);
        self.allow
            .iter()
            .any(|a| a == "/" || p == *a || p.starts_with(&format!("{a}/")))
    }

    /// Errors for every host path of `obj` (from `document`) this policy refuses.
    pub fn check(&self, document: &str, obj: &Object) -> Vec<ManifestError> {
        let Some(t) = obj.template() else { return Vec::new() };
        let at = match obj {
            Object::CronJob(_) => "spec.jobTemplate.spec.template.spec",
            _ => "spec.template.spec",
        };
        let mut refused: Vec<ManifestError> = Vec::new();
        if self.deny_privileged {
            for (field, what) in outpost_api::checks::privileges(at, &t.spec) {
                refused.push(ManifestError {
                    document: document.to_string(),
                    field,
                    reason: format!(
                        "refused by this hub's policy (outpost hub --privileged deny): the workload {what}; \
                         remove the field, or ask the hub's operator to allow privileged workloads"
                    ),
                });
            }
        }
        if self.mode == HostPathMode::Warn {
            return refused;
        }
        let err = |field: String, reason: String| ManifestError {
            document: document.to_string(),
            field,
            reason,
        };
        let mut errors = Vec::new();
        for (i, v) in t.spec.volumes.iter().enumerate() {
            let Some(hp) = &v.host_path else { continue };
            if self.allowed(&hp.path) {
                continue;
            }
            if self.mode == HostPathMode::Deny {
                let allowed = if self.allow.is_empty() {
                    "use emptyDir, configMap or secret volumes".to_string()
                } else {
                    format!("it allows only paths under {}", self.allow.join(", "))
                };
                errors.push(err(
                    format!("{at}.volumes[{i}].hostPath.path"),
                    format!(
                        "{}: this hub refuses hostPath volumes (outpost hub --host-paths deny); {allowed}, or ask the hub's operator to allow the path (--host-path-allow)",
                        hp.path
                    ),
                ));
            }
        }
        if self.mode == HostPathMode::DenySensitive && errors.is_empty() {
            for m in host_path_mounts(at, &t.spec) {
                if self.allowed(&m.host_path) {
                    continue;
                }
                if let Some(risk) = m.risk() {
                    errors.push(err(
                        m.field.clone(),
                        format!(
                            "{m}: refused by this hub's policy (outpost hub --host-paths deny-sensitive) because {risk}; \
                             mount a narrower path{}, or ask the hub's operator to allow it (--host-path-allow)",
                            if m.read_only { "" } else { " or set readOnly: true" }
                        ),
                    ));
                }
            }
        }
        refused.extend(errors);
        refused
    }
}

/// Parse every file, collecting every error from every file. Objects get their namespace set
/// explicitly ("default" when absent). An object named twice in the batch is an error.
pub fn parse_batch(files: &[ManifestFile]) -> Result<(Vec<Object>, Vec<Warning>), Vec<ManifestError>> {
    parse_files(files, None)
}

/// [`parse_batch`] for an apply: every workload must also pass the hub's host-path policy, and
/// its update gate must be passable (`outpost_core::render::gate_timing`).
pub fn parse_apply_batch(
    files: &[ManifestFile],
    host_paths: &HostPathPolicy,
) -> Result<(Vec<Object>, Vec<Warning>), Vec<ManifestError>> {
    parse_files(files, Some(host_paths))
}

fn parse_files(
    files: &[ManifestFile],
    apply: Option<&HostPathPolicy>,
) -> Result<(Vec<Object>, Vec<Warning>), Vec<ManifestError>> {
    let mut objects = Vec::new();
    let mut warnings = Vec::new();
    let mut errors = Vec::new();
    let mut seen: BTreeMap<ObjectId, String> = BTreeMap::new();
    for f in files {
        match parse_file(&f.name, &f.content) {
            Ok(parsed) => {
                warnings.extend(parsed.warnings);
                for (obj, document) in parsed.objects.iter().zip(&parsed.documents) {
                    let Some(host_paths) = apply else { break };
                    errors.extend(host_paths.check(document, obj));
                    if let Object::RolloutPolicy(p) = obj {
                        if let Some(tz) = &p.spec.timezone {
                            if let Err(e) = jiff::tz::TimeZone::get(tz) {
                                errors.push(ManifestError {
                                    document: document.clone(),
                                    field: "spec.timezone".into(),
                                    reason: format!(
                                        "{tz:?} is not a time zone this hub knows ({e}); use an IANA name like Europe/Berlin or UTC"
                                    ),
                                });
                            }
                        }
                    }
                    if let Err(e) = gate_timing(obj) {
                        errors.push(ManifestError {
                            document: document.clone(),
                            field: e.field.into(),
                            reason: e.reason,
                        });
                    }
                }
                for mut obj in parsed.objects {
                    let ns = obj.meta().ns().to_string();
                    obj.meta_mut().namespace = Some(ns);
                    let id = obj.id();
                    if let Some(first) = seen.get(&id) {
                        errors.push(ManifestError {
                            document: format!("{} {id}", f.name),
                            field: "metadata.name".into(),
                            reason: format!("{id} is also defined in {first}; define each object once per command"),
                        });
                        continue;
                    }
                    seen.insert(id, f.name.clone());
                    objects.push(obj);
                }
            }
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        Ok((objects, warnings))
    } else {
        Err(errors)
    }
}

/// References from the batch that resolve neither in the stored objects nor in the batch.
pub fn check_references(batch: &[Object], stored: impl IntoIterator<Item = Object>) -> Vec<ManifestError> {
    let mut merged: BTreeMap<ObjectId, Object> = stored.into_iter().map(|o| (o.id(), o)).collect();
    for o in batch {
        merged.insert(o.id(), o.clone());
    }
    batch.iter().flat_map(|o| missing_references(o, &merged)).collect()
}

/// The first (ConfigMap or Secret, workload) pair where a deleted config object is still used
/// by a workload that stays.
pub fn in_use<'a>(stored: impl IntoIterator<Item = &'a Object>, deleting: &[ObjectId]) -> Option<(ObjectId, ObjectId)> {
    let gone: BTreeSet<&ObjectId> = deleting.iter().collect();
    let workloads: Vec<&Object> = stored
        .into_iter()
        .filter(|o| o.kind().is_workload() && !gone.contains(&o.id()))
        .collect();
    deleting.iter().filter(|id| !id.kind.is_workload()).find_map(|target| {
        workloads
            .iter()
            .find(|w| references(w, target))
            .map(|w| (target.clone(), w.id()))
    })
}

/// A node name is a DNS label: 1-63 of `a-z 0-9 -`, not starting or ending with '-'.
pub fn node_name(name: &str) -> Result<(), HubError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 63 {
        Some("it is longer than 63 characters")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Some("it contains characters other than a-z, 0-9 and '-'")
    } else if name.starts_with('-') || name.ends_with('-') {
        Some("it starts or ends with '-'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(HubError::InvalidName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// GitOps ownership at apply (docs/gitops.md). A GitRepo's apply stamps every object with
/// its owner annotation, refuses objects someone else holds (applied by hand, or owned by
/// another GitRepo that exists) and returns the objects it owned that the commit lacks (to
/// prune). A hand apply over an object an existing GitRepo owns is refused unless `force`;
/// forced, the object keeps its owner (the GitRepo's next commit puts its version back).
/// Otherwise a hand-applied object never carries the annotation.
pub fn ownership(
    objects: &mut [Object],
    stored: &[Object],
    who: &crate::service::Ownership,
) -> Result<Vec<ObjectId>, String> {
    use crate::service::Ownership;
    use outpost_api::gitops::OWNED_BY;
    let repos: BTreeSet<String> = stored
        .iter()
        .filter(|o| o.kind() == outpost_api::Kind::GitRepo)
        .map(|o| format!("gitrepo/{}/{}", o.meta().ns(), o.meta().name))
        .collect();
    let owner_of = |id: &ObjectId| -> Option<String> {
        stored
            .iter()
            .find(|o| o.id() == *id)
            .and_then(|o| o.meta().annotations.get(OWNED_BY).cloned())
            .filter(|o| repos.contains(o))
    };
    let exists = |id: &ObjectId| stored.iter().any(|o| o.id() == *id);
    match who {
        Ownership::GitOps(me) => {
            let mut problems = Vec::new();
            for o in objects.iter_mut() {
                let id = o.id();
                match owner_of(&id) {
                    Some(other) if other != *me => problems.push(format!("{id} is owned by {other}")),
                    None if exists(&id)
                        && stored
                            .iter()
                            .find(|s| s.id() == id)
                            .and_then(|s| s.meta().annotations.get(OWNED_BY))
                            .is_none() =>
                    {
                        problems.push(format!(
                            "{id} exists and was applied by hand; GitOps never overwrites it (delete it with `outpost delete {} {} -n {}` to let {me} manage it)",
                            id.kind.as_str().to_ascii_lowercase(),
                            id.name,
                            id.namespace
                        ))
                    }
                    _ => {}
                }
                o.meta_mut().annotations.insert(OWNED_BY.into(), me.clone());
            }
            if !problems.is_empty() {
                return Err(problems.join("; "));
            }
            let ids: BTreeSet<ObjectId> = objects.iter().map(Object::id).collect();
            Ok(stored
                .iter()
                .filter(|o| o.meta().annotations.get(OWNED_BY) == Some(me) && !ids.contains(&o.id()))
                .map(Object::id)
                .collect())
        }
        Ownership::Hand { force } => {
            // Per-target variants are GitOps' (docs/gitops.md): a hand-applied workload has one
            // template for every node it runs on.
            let variants: Vec<String> = objects
                .iter()
                .filter(|o| {
                    o.template()
                        .and_then(|t| t.metadata.as_ref())
                        .is_some_and(|m| m.annotations.contains_key(outpost_core::gitops::VARIANTS))
                })
                .map(|o| o.id().to_string())
                .collect();
            if !variants.is_empty() {
                return Err(format!(
                    "{}: the pod template annotation {} is set by GitOps only (per-target variants of a GitRepo's workload); remove it to apply one template for every node; nothing was applied",
                    variants.join(", "),
                    outpost_core::gitops::VARIANTS
                ));
            }
            let mut owned = Vec::new();
            for o in objects.iter_mut() {
                let id = o.id();
                match owner_of(&id) {
                    Some(repo) if *force => {
                        o.meta_mut().annotations.insert(OWNED_BY.into(), repo);
                    }
                    Some(repo) => owned.push(format!("{id} (owned by {repo})")),
                    None => {
                        o.meta_mut().annotations.remove(OWNED_BY);
                    }
                }
            }
            if owned.is_empty() {
                Ok(Vec::new())
            } else {
                Err(format!(
                    "{} managed by GitOps; change it in the repository, or apply with --force to overwrite it now (the GitRepo's next commit puts the repository's version back); nothing was applied",
                    owned.join(", ") + if owned.len() == 1 { " is" } else { " are" }
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, content: &str) -> ManifestFile {
        ManifestFile {
            name: name.into(),
            content: content.into(),
        }
    }

    const CM: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\ndata: {k: v}\n";
    const WEB: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  template:\n    spec:\n      containers:\n      - name: c\n        image: nginx\n        env:\n        - name: K\n          valueFrom: {configMapKeyRef: {name: cfg, key: k}}\n";

    #[test]
    fn names() {
        for ok in ["a", "store-1", &"a".repeat(63)] {
            assert!(node_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "A", "a_b", "-a", "a-", &"a".repeat(64), "a.b"] {
            assert!(node_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn batch_sets_namespace_and_rejects_duplicates_across_files() {
        let (objs, _) = parse_batch(&[file("a.yaml", CM)]).expect("valid");
        assert_eq!(objs[0].meta().namespace.as_deref(), Some("default"));
        let errs = parse_batch(&[file("a.yaml", CM), file("b.yaml", CM)]).expect_err("duplicate");
        assert_eq!(errs.len(), 1);
        assert!(errs[0].reason.contains("also defined in a.yaml"), "{:?}", errs);
    }

    #[test]
    fn batch_collects_errors_from_every_file() {
        let errs = parse_batch(&[file("a.yaml", "kind: Nope\n"), file("b.yaml", ": : :\n- [")]).expect_err("bad");
        assert!(errs.iter().any(|e| e.document.starts_with("a.yaml")), "{errs:?}");
        assert!(errs.iter().any(|e| e.document.starts_with("b.yaml")), "{errs:?}");
    }

    #[test]
    fn host_path_policy() {
        let ds = |path: &str, ro: bool| {
            file(
                "h.yaml",
                &format!("apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: d}}\nspec:\n  template:\n    spec:\n      containers: [{{name: a, image: x, volumeMounts: [{{name: h, mountPath: /h, readOnly: {ro}}}]}}]\n      volumes: [{{name: h, hostPath: {{path: {path}}}}}]\n"),
            )
        };
        let policy = |mode, allow: &[&str]| {
            HostPathPolicy::new(mode, &allow.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
        };
        use HostPathMode::*;
        // (policy, path, read-only, the error it gives, if any)
        let cases: &[(HostPathPolicy, &str, bool, Option<&str>)] = &[
            (policy(Warn, &[]), "/", false, None),
            (policy(Warn, &[]), "/var/run/docker.sock", true, None),
            (policy(DenySensitive, &[]), "/mnt/videos", false, None),
            (policy(DenySensitive, &[]), "/etc", true, None),
            (
                policy(DenySensitive, &[]),
                "/etc",
                false,
                Some("containers[0].volumeMounts[0]: container a mounts hostPath /etc at /h read-write: refused by this hub's policy (outpost hub --host-paths deny-sensitive) because /etc is the host's configuration"),
            ),
            (policy(DenySensitive, &[]), "/", true, Some("because / is the host's whole file system")),
            (policy(DenySensitive, &[]), "/var/run/docker.sock", true, Some("Docker Engine's API socket")),
            (policy(DenySensitive, &["/var/run/docker.sock"]), "/var/run/docker.sock", true, None),
            (policy(DenySensitive, &["/var/run/docker.sock"]), "/etc", false, Some("because /etc is")),
            (policy(DenySensitive, &["/var/run/docker.sock"]), "/srv/data", false, None),
            (policy(Deny, &[]), "/mnt/videos", true, Some("volumes[0].hostPath.path: /mnt/videos: this hub refuses hostPath volumes (outpost hub --host-paths deny); use emptyDir")),
            (policy(Deny, &["/mnt"]), "/mnt/videos", true, None),
            (policy(Deny, &["/srv/"]), "/srv/data", false, None),
            (policy(Deny, &["/srv"]), "/srv//data/", false, None),
            (policy(Deny, &["/srv", "/data"]), "/etc", false, Some("it allows only paths under /srv, /data")),
            (policy(Deny, &["/srv"]), "/srvx", false, Some("it allows only paths under /srv")),
            (policy(Warn, &["/srv"]), "/etc", false, None),
        ];
        for (p, path, ro, want) in cases {
            let got = parse_apply_batch(&[ds(path, *ro)], p);
            match (want, &got) {
                (None, Ok(_)) => {}
                (Some(w), Err(e)) if e.len() == 1 && e[0].to_string().contains(w) => {
                    assert!(e[0].document.starts_with("h.yaml document 1 (DaemonSet d)"), "{e:?}");
                }
                _ => panic!("{p:?} {path} ro={ro}: want {want:?}, got {got:?}"),
            }
        }
        assert!(HostPathPolicy::new(Warn, &["srv".into()]).is_err());
        assert_eq!("deny-sensitive".parse(), Ok(DenySensitive));
        assert!("yes"
            .parse::<HostPathMode>()
            .unwrap_err()
            .contains("warn, deny-sensitive or deny"));
    }

    #[test]
    fn references_resolve_against_batch_and_store() {
        let (web, _) = parse_batch(&[file("w.yaml", WEB)]).expect("valid");
        assert_eq!(check_references(&web, []).len(), 1);
        let (cm, _) = parse_batch(&[file("c.yaml", CM)]).expect("valid");
        assert!(check_references(&web, cm.clone()).is_empty());
        let (both, _) = parse_batch(&[file("c.yaml", CM), file("w.yaml", WEB)]).expect("valid");
        assert!(check_references(&both, []).is_empty());

        let cm_id = cm[0].id();
        let (user, target) = (web[0].id(), cm_id.clone());
        assert_eq!(
            in_use(both.iter(), std::slice::from_ref(&cm_id)),
            Some((target, user.clone()))
        );
        assert_eq!(in_use(both.iter(), &[cm_id, user]), None);
    }

    #[test]
    fn gitops_ownership() {
        use crate::service::Ownership;
        use outpost_api::gitops::OWNED_BY;
        let parse = |y: &str| {
            parse_batch(&[ManifestFile {
                name: "t".into(),
                content: y.into(),
            }])
            .unwrap()
            .0
        };
        let cm = |name: &str, owner: Option<&str>| {
            let mut o = parse(&format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}}}\ndata: {{a: b}}\n"
            ))
            .remove(0);
            if let Some(w) = owner {
                o.meta_mut().annotations.insert(OWNED_BY.into(), w.into());
            }
            o
        };
        let repo = parse("apiVersion: outpost.dev/v1\nkind: GitRepo\nmetadata: {name: fleet}\nspec: {url: 'file:///x', overlaysBy: site}\n").remove(0);
        // A hand apply cannot carry GitOps' per-target variants.
        let mut with_variants = parse("apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: web}\nspec:\n  template:\n    metadata:\n      annotations: {outpost.dev/variants: '[]'}\n    spec:\n      containers: [{name: c, image: busybox}]\n");
        let e = ownership(&mut with_variants, &[], &Ownership::Hand { force: true }).unwrap_err();
        assert!(
            e.contains("DaemonSet/default/web") && e.contains("outpost.dev/variants"),
            "{e}"
        );
        let me = "gitrepo/default/fleet";
        let stored = vec![
            repo.clone(),
            cm("mine", Some(me)),
            cm("gone", Some(me)),
            cm("hand", None),
            cm("orphan", Some("gitrepo/default/old")),
        ];
        let git = Ownership::GitOps(me.into());
        // GitOps: stamps, prunes what it owned and lost, takes over an orphan.
        let mut objs = vec![cm("mine", None), cm("orphan", None), cm("new", None)];
        let prune = ownership(&mut objs, &stored, &git).unwrap();
        assert_eq!(prune.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), ["gone"]);
        assert!(objs
            .iter()
            .all(|o| o.meta().annotations.get(OWNED_BY).map(String::as_str) == Some(me)));
        // GitOps never overwrites a hand-applied object.
        let err = ownership(&mut [cm("hand", None)], &stored, &git).unwrap_err();
        assert!(
            err.contains("ConfigMap/default/hand exists and was applied by hand"),
            "{err}"
        );
        // Another GitRepo's object is refused.
        let other = Ownership::GitOps("gitrepo/default/other".into());
        let err = ownership(&mut [cm("mine", None)], &stored, &other).unwrap_err();
        assert!(err.contains("owned by gitrepo/default/fleet"), "{err}");
        // By hand: refused over an owned object, forced keeps the owner, never pruned.
        let hand = Ownership::Hand { force: false };
        let err = ownership(&mut [cm("mine", None)], &stored, &hand).unwrap_err();
        assert!(
            err.contains("ConfigMap/default/mine (owned by gitrepo/default/fleet) is managed by GitOps"),
            "{err}"
        );
        assert!(err.contains("--force"), "{err}");
        let mut objs = vec![cm("mine", None)];
        assert!(ownership(&mut objs, &stored, &Ownership::Hand { force: true })
            .unwrap()
            .is_empty());
        assert_eq!(objs[0].meta().annotations.get(OWNED_BY).map(String::as_str), Some(me));
        // A hand object carries no owner (an orphan's annotation goes); a stale one is dropped.
        let mut objs = vec![cm("orphan", Some("gitrepo/default/old")), cm("x", Some(me))];
        assert!(ownership(&mut objs, &stored, &hand).unwrap().is_empty());
        assert!(objs.iter().all(|o| o.meta().annotations.is_empty()));
    }
}
