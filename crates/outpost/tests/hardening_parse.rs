//! Hostile and wrong input at the edge (issue 9: defects 1, 9, 10), against a real `outpost hub`
//! process through the real CLI: nothing an operator sends may stop the hub, and what a node
//! could not run is refused at apply with the field named.

mod common;

use common::*;

const CM_HEAD: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: fine}\ndata: {k: v}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: hostile}\nextra:\n";

/// The reproductions: ~3,000 block-style sequence levels, ~1,500 block-style mapping
/// levels (each about 6 KB or more), and deep flow style.
fn hostile_files() -> Vec<(&'static str, String)> {
    let mut block_map = String::new();
    for i in 0..1_500 {
        block_map.push_str(&" ".repeat(i));
        block_map.push_str("a:\n");
    }
    vec![
        ("seq.yaml", format!("{CM_HEAD}{}v\n", "- ".repeat(3_000))),
        ("map.yaml", format!("{CM_HEAD}{block_map}")),
        (
            "flow.json",
            format!("{CM_HEAD}  {}{}\n", "[".repeat(20_000), "]".repeat(20_000)),
        ),
    ]
}

/// POST a raw body to the hub's operator API with the admin token: (status, body).
fn post_raw(hub: &Hub, path: &str, body: String) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        outpost_pki::install_provider();
        let tls = outpost_pki::client_config(&hub.ca_pem(), None).unwrap();
        let c = reqwest::Client::builder().use_preconfigured_tls(tls).build().unwrap();
        let r = c
            .post(format!("{}{path}", hub.url))
            .bearer_auth(hub.token.trim())
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    })
}

#[test]
fn deeply_nested_manifests_are_refused_and_the_hub_keeps_answering() {
    let hub = Hub::start();
    for (name, text) in hostile_files() {
        let f = hub.dir.join(name);
        std::fs::write(&f, &text).unwrap();
        for cmd in ["apply", "delete"] {
            let e = hub.cli_err(&[cmd, "-f", f.to_str().unwrap()]);
            assert!(
                e.contains("document 2 (line ") && e.contains("nested deeper than 64 levels"),
                "{cmd} -f {name}: {e}"
            );
            // the hub is the same process and still answers
            hub.cli(&["get", "nodes"]);
        }
    }
    // nothing of the rejected files was stored (all or nothing)
    let out = hub.cli(&["delete", "configmap", "fine"]);
    assert!(out.contains("not found"), "{out}");

    // The JSON body itself, nested far deeper: a clean 400, no crash.
    let deep = format!("{{\"files\": {}{}}}", "[".repeat(200_000), "]".repeat(200_000));
    let (status, body) = post_raw(&hub, "/v1/apply", deep);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("\"code\""), "an ApiError body: {body}");
    hub.cli(&["get", "nodes"]);

    // Size and count limits, named.
    let many = format!(
        "{}{}",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n",
        "---\n{}\n".repeat(1_001)
    );
    let e = hub.apply_err(&many);
    assert!(e.contains("more than 1000 documents"), "{e}");
    let big = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: a}}\ndata: {{k: '{}'}}\n",
        "x".repeat(9 << 20)
    );
    let e = hub.apply_err(&big);
    assert!(e.contains("more than the 8 MiB a manifest file may have"), "{e}");
    hub.cli(&["get", "nodes"]);
}

#[test]
fn values_a_node_could_not_run_are_refused_at_apply_with_the_field() {
    let hub = Hub::start();
    let pod = |extra: &str| {
        format!("apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\nspec:\n  replicas: 1\n  template:\n    spec:\n      runtimeClassName: process\n      containers:\n      - name: main\n        image: 'web:1'\n        command: [/bin/sleep, '1000']\n{extra}")
    };
    let cases: &[(String, &str)] = &[
        (
            pod("").replace("/bin/sleep", "\"/bin/sleep\\0\""),
            "spec.template.spec.containers[0].command[0]: contains the control character '\\0'",
        ),
        (
            pod("        env: [{name: \"A\\0B\", value: x}]\n"),
            "spec.template.spec.containers[0].env[0].name: \"A\\0B\" is not a valid variable name",
        ),
        (
            pod("        resources: {limits: {cpu: \"1e300\"}}\n"),
            "containers[0].resources.limits.cpu: \"1e300\" is more than 1000 cores",
        ),
        (
            pod("        resources: {limits: {memory: 99999999999Ti}}\n"),
            "containers[0].resources.limits.memory: \"99999999999Ti\" is more than 1Pi",
        ),
        (
            pod("").replace("replicas: 1", "replicas: 4294967295"),
            "spec.replicas: 4294967295 is more than 100000",
        ),
        (
            pod("").replace("'web:1'", "\"web\\n:1\""),
            "containers[0].image: \"web\\n:1\" is not a valid image reference",
        ),
        (
            pod("").replace("'web:1'", "'../../web'"),
            "containers[0].image: \"../../web\" is not a valid image reference",
        ),
    ];
    for (yaml, want) in cases {
        let e = hub.apply_err(yaml);
        assert!(
            e.contains("(Deployment web)") && e.contains(want),
            "want {want}\ngot {e}"
        );
    }
    assert!(hub.json(&["get", "deployments"]).as_array().unwrap().is_empty());

    let e = hub.cli_err(&["token", "create", "--uses", "0"]);
    assert!(e.contains("--uses: must be at least 1"), "{e}");
    let e = hub.cli_err(&["token", "create", "--ttl", "999999999999999d"]);
    assert!(e.contains("longer than 100 years"), "{e}");
    let e = hub.cli_err(&["image", "push", "bad\nname:1"]);
    assert!(e.contains("is not a valid image reference"), "{e}");
    let e = hub.cli_err(&["image", "push", "../x"]);
    assert!(e.contains("path component \"..\""), "{e}");
}

fn host_path_ds(path: &str, read_only: bool) -> String {
    format!("apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: hp}}\nspec:\n  template:\n    spec:\n      containers:\n      - name: app\n        image: 'app:1'\n        volumeMounts: [{{name: h, mountPath: /h, readOnly: {read_only}}}]\n      volumes: [{{name: h, hostPath: {{path: {path}}}}}]\n")
}

#[test]
fn sensitive_host_paths_are_warned_shown_and_refused_by_policy() {
    // default policy: accepted with a warning, and `describe` shows the mount and the risk
    let hub = Hub::start();
    let f = hub.dir.join("hp.yaml");
    std::fs::write(&f, host_path_ds("/etc", false)).unwrap();
    let o = hub.try_cli(&["apply", "-f", f.to_str().unwrap()]);
    assert!(o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("warning: ")
            && stderr.contains("containers[0].volumeMounts[0]: container app mounts hostPath /etc read-write"),
        "{stderr}"
    );
    let d = hub.cli(&["describe", "daemonset", "hp"]);
    assert!(d.contains("Volumes:") && d.contains("hostPath /etc (Directory)"), "{d}");
    assert!(
        d.contains("Mounts:") && d.contains("WARNING: /etc is the host's configuration"),
        "{d}"
    );
    drop(hub);

    // --host-paths deny-sensitive: refused with the field; narrower or read-only is fine
    let hub = Hub::start_with(
        &[
            "--host-paths",
            "deny-sensitive",
            "--host-path-allow",
            "/var/run/docker.sock",
        ],
        &[],
    );
    for path in ["/etc", "/"] {
        let e = hub.apply_err(&host_path_ds(path, false));
        assert!(
            e.contains("spec.template.spec.containers[0].volumeMounts[0]")
                && e.contains("refused by this hub's policy (outpost hub --host-paths deny-sensitive)"),
            "{path}: {e}"
        );
    }
    hub.apply(&host_path_ds("/etc", true));
    hub.apply(&host_path_ds("/srv/data", false));
    hub.apply(&host_path_ds("/var/run/docker.sock", false));

    let o = std::process::Command::new(BIN)
        .args(["hub", "--host-paths", "maybe"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("possible values: warn, deny-sensitive, deny"),
        "{e}"
    );
}
