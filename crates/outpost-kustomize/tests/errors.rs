//! Trees the engine refuses: each error names the file and the field, and says why.

use outpost_kustomize::{build, Error, MemFs};

const DEP: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 1\n";

/// Builds `r` from `files` (path, content) and checks the error's file, field and a part of
/// its message.
fn check(files: &[(&str, &str)], want_file: &str, want_field: &str, want_text: &str) {
    let mut fs = MemFs::new();
    for (p, c) in files {
        fs.insert(p, *c);
    }
    let err = build(&fs, "r").expect_err("the tree must be refused");
    assert_eq!(err.file(), want_file, "file of: {err}");
    assert_eq!(err.field(), want_field, "field of: {err}");
    assert!(err.to_string().contains(want_text), "`{err}` should say `{want_text}`");
}

#[test]
fn refused_fields_name_file_and_field() {
    for (field, body) in [
        ("helmCharts", "helmCharts:\n- name: x\n"),
        ("replacements", "replacements:\n- path: r.yaml\n"),
        ("vars", "vars:\n- name: X\n"),
        ("transformers", "transformers:\n- t.yaml\n"),
        ("generators", "generators:\n- g.yaml\n"),
        ("configurations", "configurations:\n- c.yaml\n"),
        ("openapi", "openapi:\n  path: schema.json\n"),
        ("sortOptions", "sortOptions:\n  order: fifo\n"),
    ] {
        let mut fs = MemFs::new();
        fs.insert("r/kustomization.yaml", body);
        let err = build(&fs, "r").expect_err(field);
        assert!(matches!(err, Error::Unsupported { .. }), "{field}: {err}");
        assert_eq!(err.file(), "r/kustomization.yaml");
        assert_eq!(err.field(), field);
        assert!(err.to_string().contains("not supported"), "{err}");
    }
}

#[test]
fn error_table() {
    let k = "r/kustomization.yaml";
    // A remote base.
    check(
        &[(k, "resources:\n- https://github.com/org/repo//base?ref=v1\n")],
        k,
        "resources[0] (https://github.com/org/repo//base?ref=v1)",
        "vendor the base",
    );
    // A resource that does not exist.
    check(
        &[(k, "resources:\n- missing.yaml\n")],
        k,
        "resources[0]",
        "neither a file nor a directory",
    );
    // An unknown field.
    check(
        &[(k, "resourcez:\n- a.yaml\n")],
        k,
        "resourcez",
        "unknown kustomization field",
    );
    // A patch with both path and patch.
    check(
        &[(k, "patches:\n- path: p.yaml\n  patch: x\n"), ("r/p.yaml", DEP)],
        k,
        "patches[0]",
        "exactly one of",
    );
    // Patch options (renames) are refused.
    check(
        &[(k, "patches:\n- path: p.yaml\n  options:\n    allowNameChange: true\n")],
        k,
        "patches[0].options",
        "not supported",
    );
    // A patch whose object is not among the resources.
    check(
        &[
            (k, "resources:\n- d.yaml\npatches:\n- path: p.yaml\n"),
            ("r/d.yaml", DEP),
            (
                "r/p.yaml",
                "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: api\n",
            ),
        ],
        k,
        "patches[0]",
        "is not among the resources",
    );
    // A JSON 6902 patch without a target.
    check(
        &[
            (
                k,
                "resources:\n- d.yaml\npatches:\n- patch: '[{\"op\": \"remove\", \"path\": \"/spec\"}]'\n",
            ),
            ("r/d.yaml", DEP),
        ],
        k,
        "patches[0].target",
        "needs a target",
    );
    // A bad regular expression in a target.
    check(
        &[
            (
                k,
                "resources:\n- d.yaml\npatches:\n- target:\n    name: 'web-('\n  patch: '[]'\n",
            ),
            ("r/d.yaml", DEP),
        ],
        k,
        "patches[0].target.name",
        "not a valid regular expression",
    );
    // A JSON 6902 operation that cannot apply names the object.
    check(
        &[(k, "resources:\n- d.yaml\npatches:\n- target:\n    kind: Deployment\n  patch: '[{\"op\": \"remove\", \"path\": \"/spec/nothing\"}]'\n"), ("r/d.yaml", DEP)],
        "r/kustomization.yaml patches[0].patch",
        "(patch)",
        "apps/v1 Deployment web",
    );
    // Generators: a literal without `=`, a merge with nothing to merge into, a duplicate create.
    check(
        &[(k, "configMapGenerator:\n- name: c\n  literals:\n  - NOVALUE\n")],
        k,
        "configMapGenerator[0].literals[0]",
        "has no `=`",
    );
    check(
        &[(
            k,
            "configMapGenerator:\n- name: c\n  behavior: merge\n  literals:\n  - a=b\n",
        )],
        k,
        "configMapGenerator[0].behavior",
        "does not exist",
    );
    check(
        &[(
            k,
            "configMapGenerator:\n- name: c\n  literals:\n  - a=b\n- name: c\n  literals:\n  - a=c\n",
        )],
        k,
        "configMapGenerator[1].name",
        "already exists",
    );
    check(
        &[(k, "configMapGenerator:\n- name: c\n  behavior: upsert\n")],
        k,
        "configMapGenerator[0].behavior",
        "not one of",
    );
    // A file outside the kustomization's directory.
    check(
        &[
            (k, "configMapGenerator:\n- name: c\n  files:\n  - ../secret.txt\n"),
            ("secret.txt", "x"),
        ],
        k,
        "configMapGenerator[0].files[0]",
        "outside",
    );
    // replicas for a name nothing has.
    check(
        &[
            (k, "resources:\n- d.yaml\nreplicas:\n- name: api\n  count: 2\n"),
            ("r/d.yaml", DEP),
        ],
        k,
        "replicas[0].name",
        "no Deployment",
    );
    // A Component listed as a resource, and a Kustomization listed as a component.
    check(
        &[
            (k, "resources:\n- c\n"),
            (
                "r/c/kustomization.yaml",
                "apiVersion: kustomize.config.k8s.io/v1alpha1\nkind: Component\n",
            ),
        ],
        k,
        "resources[0]",
        "is a Component",
    );
    check(
        &[(k, "components:\n- c\n"), ("r/c/kustomization.yaml", "resources: []\n")],
        k,
        "components[0]",
        "must have `kind: Component`",
    );
    // The same object twice.
    check(
        &[
            (k, "resources:\n- a.yaml\n- b.yaml\n"),
            ("r/a.yaml", DEP),
            ("r/b.yaml", DEP),
        ],
        "r/b.yaml",
        "document 1",
        "already among the resources",
    );
    // An object without a name.
    check(
        &[
            (k, "resources:\n- a.yaml\n"),
            ("r/a.yaml", "apiVersion: v1\nkind: ConfigMap\n"),
        ],
        "r/a.yaml",
        "document 1 metadata.name",
        "needs a name",
    );
    // A cycle of kustomizations.
    check(
        &[
            (k, "resources:\n- ../s\n"),
            ("s/kustomization.yaml", "resources:\n- ../r\n"),
        ],
        "s/kustomization.yaml",
        "resources[0]",
        "cycle",
    );
    // commonLabels and labels naming the same label.
    check(
        &[(k, "commonLabels:\n  a: b\nlabels:\n- pairs:\n    a: c\n")],
        k,
        "labels",
        "in both",
    );
    // No kustomization at all.
    let mut fs = MemFs::new();
    fs.insert("r/d.yaml", DEP);
    let err = build(&fs, "r").unwrap_err();
    assert!(
        matches!(err, Error::Read { .. }) && err.to_string().contains("no kustomization.yaml"),
        "{err}"
    );
}

#[test]
fn memfs_tree_builds_like_a_directory() {
    let mut fs = MemFs::new();
    fs.insert(
        "repo/base/kustomization.yaml",
        "resources:\n- d.yaml\nconfigMapGenerator:\n- name: c\n  literals:\n  - a=b\n",
    );
    fs.insert("repo/base/d.yaml", DEP);
    fs.insert(
        "repo/overlays/x/kustomization.yaml",
        "resources:\n- ../../base\nnamePrefix: x-\n",
    );
    let out = build(&fs, "repo/overlays/x").unwrap();
    // The same suffix as `kubectl kustomize` gives `a=b` (fixture 19: settings-4h2mbtbbt6).
    let names: Vec<&str> = out.iter().map(|o| o["metadata"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["x-c-4h2mbtbbt6", "x-web"]);
}
