//! `outpost kustomize build`, `outpost apply -k` and `outpost diff -k` against a real hub.

mod common;

use std::path::Path;

use common::Hub;

fn write(root: &Path, files: &[(&str, &str)]) {
    for (p, c) in files {
        let path = root.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, c).unwrap();
    }
}

const BASE: &str = "resources:\n- app.yaml\nconfigMapGenerator:\n- name: app-config\n  literals:\n  - MODE=base\n";
const APP: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: app\nspec:\n  replicas: 1\n  template:\n    spec:\n      runtimeClassName: process\n      containers:\n      - name: main\n        image: 'app:1'\n        command: [/bin/sleep, '3600']\n        env:\n        - name: MODE\n          valueFrom:\n            configMapKeyRef:\n              name: app-config\n              key: MODE\n---\napiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: probe\nspec:\n  template:\n    spec:\n      runtimeClassName: process\n      containers:\n      - name: main\n        image: 'probe:1'\n        command: [/bin/sleep, '3600']\n";

const SITE_V3: &str = "resources:\n- ../base\nnamespace: store-1\nimages:\n- name: app\n  newTag: '3'\nconfigMapGenerator:\n- name: app-config\n  behavior: merge\n  literals:\n  - MODE=site\n";

#[test]
fn build_apply_and_diff_a_kustomization() {
    let hub = Hub::start();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write(
        root,
        &[
            ("base/kustomization.yaml", BASE),
            ("base/app.yaml", APP),
            (
                "site/kustomization.yaml",
                "resources:\n- ../base\nnamespace: store-1\nimages:\n- name: app\n  newTag: '2'\n",
            ),
        ],
    );
    let site = root.join("site");
    let site = site.to_str().unwrap();

    // Offline build: the same objects the library renders.
    let printed = hub.cli(&["kustomize", "build", site]);
    let lib = outpost_kustomize::to_yaml(&outpost_kustomize::build(&outpost_kustomize::DiskFs, site).unwrap());
    assert_eq!(printed, lib);
    assert!(printed.contains("image: app:2"), "{printed}");
    assert!(printed.contains("name: app-config-"), "{printed}");

    // Nothing at the hub yet: everything is created.
    let plan = hub.cli(&["diff", "-k", site]);
    assert!(plan.contains("created   Deployment/store-1/app"), "{plan}");
    assert!(plan.contains("created   DaemonSet/store-1/probe"), "{plan}");
    assert!(
        plan.contains("3 to create, 0 to change, 0 unchanged, 0 to delete"),
        "{plan}"
    );

    let applied = hub.cli(&["apply", "-k", site]);
    assert!(applied.contains("Deployment/store-1/app created"), "{applied}");

    let plan = hub.cli(&["diff", "-k", site]);
    assert!(
        plan.contains("0 to create, 0 to change, 3 unchanged, 0 to delete"),
        "{plan}"
    );

    // A new tag and a new literal; the DaemonSet leaves the tree.
    write(
        root,
        &[
            ("base/app.yaml", APP.split("---").next().unwrap()),
            ("site/kustomization.yaml", SITE_V3),
        ],
    );
    let plan = hub.cli(&["diff", "-k", site]);
    assert!(plan.contains("changed   Deployment/store-1/app"), "{plan}");
    assert!(
        plan.contains("~ spec.template.spec.containers[0].image: \"app:2\" -> \"app:3\""),
        "{plan}"
    );
    // The ConfigMap's content changed, so its hashed name did: a new one is created and the
    // Deployment's reference follows it.
    assert!(
        plan.contains("~ spec.template.spec.containers[0].env[0].valueFrom.configMapKeyRef.name: \"app-config-"),
        "{plan}"
    );
    assert!(plan.contains("created   ConfigMap/store-1/app-config-"), "{plan}");
    assert!(plan.contains("deleted   DaemonSet/store-1/probe"), "{plan}");
    // diff changed nothing.
    let plan2 = hub.cli(&["diff", "-k", site]);
    assert_eq!(plan, plan2);

    // A broken kustomization names file and field, and nothing reaches the hub.
    write(
        root,
        &[(
            "site/kustomization.yaml",
            "resources:\n- ../base\nhelmCharts:\n- name: x\n",
        )],
    );
    let err = hub.cli_err(&["apply", "-k", site]);
    assert!(
        err.contains("site/kustomization.yaml") && err.contains("helmCharts"),
        "{err}"
    );
    let err = hub.cli_err(&["diff", "-k", site]);
    assert!(err.contains("helmCharts") && err.contains("not supported"), "{err}");
    // The hub still holds what the good apply sent: with the good tree back, the same plan.
    write(root, &[("site/kustomization.yaml", SITE_V3)]);
    assert_eq!(hub.cli(&["diff", "-k", site]), plan);
}

#[test]
fn kustomize_build_needs_no_hub() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), &[("kustomization.yaml", BASE), ("app.yaml", APP)]);
    let out = std::process::Command::new(common::BIN)
        .args(["kustomize", "build", tmp.path().to_str().unwrap()])
        .env("OUTPOST_HUB", "https://127.0.0.1:9")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let docs = outpost_kustomize::parse_stream(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["ConfigMap", "Deployment", "DaemonSet"]);
}

/// The articles' layout (docs/gitops.md): a site's overlay applies as rendered, and the
/// other site's overlay shows, field by field, how it differs.
#[test]
fn the_articles_overlays_apply_and_diff() {
    let hub = Hub::start();
    let root =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../outpost-kustomize/tests/fixtures/01-article-gitops/overlays");
    let shanghai = root.join("factory-shanghai");
    let berlin = root.join("factory-berlin");
    let out = hub.cli(&["apply", "-k", shanghai.to_str().unwrap()]);
    assert!(out.contains("Deployment/edge/edge-infer-service created"), "{out}");
    let plan = hub.cli(&["diff", "-k", shanghai.to_str().unwrap()]);
    assert!(
        plan.ends_with("0 to create, 0 to change, 3 unchanged, 0 to delete\n"),
        "{plan}"
    );
    let plan = hub.cli(&["diff", "-k", berlin.to_str().unwrap()]);
    for want in [
        "changed   Deployment/edge/edge-infer-service",
        "~ spec.template.spec.containers[0].image: \"registry.example.com/edge-infer:v1.1\" -> \"registry.example.com/edge-infer:v1.0\"",
        "+ metadata.labels: {\"compliance\":\"gdpr\"}",
        "+ spec.selector.matchLabels.compliance: \"gdpr\"",
        "- spec.template.spec.containers[0].resources: {\"limits\":{\"cpu\":\"1\",\"memory\":\"512Mi\"}}",
        "changed   Service/edge/edge-infer-service",
        "~ spec.ports[0].nodePort: 30001 -> 30002",
        "created   ConfigMap/edge/infer-config-8t465hghmb",
    ] {
        assert!(plan.contains(want), "missing `{want}` in:\n{plan}");
    }
}
