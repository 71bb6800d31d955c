//! Pure checks behind the operator and join routes: batch parsing, cross-object references,
//! in-use refusal, node names.

use std::collections::{BTreeMap, BTreeSet};

use outpost_api::{parse_file, ManifestError, ManifestFile, Object, ObjectId, Warning};
use outpost_core::render::{missing_references, references};

use crate::error::HubError;

/// Parse every file, collecting every error from every file. Objects get their namespace set
/// explicitly ("default" when absent). An object named twice in the batch is an error.
pub fn parse_batch(files: &[ManifestFile]) -> Result<(Vec<Object>, Vec<Warning>), Vec<ManifestError>> {
    let mut objects = Vec::new();
    let mut warnings = Vec::new();
    let mut errors = Vec::new();
    let mut seen: BTreeMap<ObjectId, String> = BTreeMap::new();
    for f in files {
        match parse_file(&f.name, &f.content) {
            Ok(parsed) => {
                warnings.extend(parsed.warnings);
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
}
