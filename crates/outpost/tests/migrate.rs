//! `outpost hub migrate --from <sqlite data dir> --to postgres://...` (docs/postgres.md): a
//! populated SQLite hub with real agents is stopped, migrated and started on PostgreSQL on the
//! same address; everything is there and the agents go on without re-joining.

mod common;

use common::*;
use serde_json::Value;

fn migrate(hub: &Hub, url: &str, secret: &std::path::Path) -> std::process::Output {
    outpost_under::<&str>(&[])
        .args(["hub", "migrate", "--from"])
        .arg(hub.dir.join("hub"))
        .args(["--to", url, "--ca-secret-file"])
        .arg(secret)
        .output()
        .unwrap()
}

/// PUT a blob with the admin token; the HTTP status.
fn put_blob(hub: &Hub, digest: &str, data: Vec<u8>) -> u16 {
    outpost_pki::install_provider();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tls = outpost_pki::client_config(&hub.ca_pem(), None).unwrap();
        let c = reqwest::Client::builder().use_preconfigured_tls(tls).build().unwrap();
        c.put(format!("{}/v1/images/blobs/{digest}", hub.url))
            .bearer_auth(hub.token.trim())
            .body(data)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    })
}

/// The outputs compared before and after: what does not move on its own (nodes' names, labels
/// and join times, the workloads, every revision, accounts, image tags).
fn snapshot(hub: &Hub) -> Vec<Value> {
    let nodes: Vec<Value> = hub
        .json(&["get", "nodes"])
        .as_array()
        .unwrap()
        .iter()
        .map(|n| serde_json::json!([n["name"], n["labels"], n["joined_at"]]))
        .collect();
    let workloads: Vec<Value> = hub
        .json(&["get", "daemonsets"])
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].clone())
        .collect();
    let api = |path: &str| {
        let (st, body) = api_get(hub, path);
        assert_eq!(st, 200, "{path}: {body}");
        serde_json::from_str::<Value>(&body).unwrap()
    };
    let mut users = api("/v1/users");
    for u in users.as_array_mut().unwrap() {
        for t in u["tokens"].as_array_mut().unwrap() {
            t.as_object_mut().unwrap().remove("last_used_at");
        }
    }
    vec![
        Value::from(nodes),
        Value::from(workloads),
        api("/v1/objects/daemonset/default/app/revisions"),
        users,
        api("/v1/images/tags"),
    ]
}

#[test]
fn a_populated_sqlite_hub_moves_to_postgres_and_its_agents_go_on() {
    use sha2::Digest;
    let Some(url) = outpost_hub::store::testkit::pg_database("migrate") else {
        return;
    };
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("ca-secret");
    std::fs::write(&secret, "migrate-secret\n").unwrap();

    let mut hub = Hub::start();
    let token = hub.token(&["--uses", "5"]);
    let a1 = hub.join("mig-1", &token).running();
    let a2 = hub.join("mig-2", &token).running();
    let ids = (a1.identity(), a2.identity());
    // Several revisions of a workload, one after the other.
    let (m1, m2) = (marker(), marker());
    hub.apply(&sleeper_ds("app", &m1, ""));
    wait_for("revision 1 runs on both", 30.0, || {
        (pids_with_cmdline(&["/bin/sleep", &m1]).len() == 2).then_some(())
    });
    hub.apply(&sleeper_ds("app", &m2, ""));
    wait_for("revision 2 runs on both", 60.0, || {
        (pids_with_cmdline(&["/bin/sleep", &m2]).len() == 2).then_some(())
    });
    let ops = hub
        .cli(&["user", "add", "ops", "--role", "operator"])
        .trim()
        .to_string();
    let blob = b"an image archive that moves with the hub".to_vec();
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&blob)));
    assert_eq!(put_blob(&hub, &digest, blob), 201);
    let (st, body) = api_post(
        &hub,
        "/v1/images/tags",
        &serde_json::json!({"name": "shop/app:1", "digest": digest, "size": 0, "pushed_at": 0}),
    );
    assert_eq!(st, 200, "{body}");
    let before = snapshot(&hub);
    let events_before = hub.cli(&["describe", "node", "mig-1"]);
    assert!(events_before.contains("revision 2 started"), "{events_before}");

    // A running hub is refused, and nothing is copied.
    let o = migrate(&hub, &url, &secret);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("a hub is running") && e.contains("stop it first"), "{e}");

    hub.kill();
    let o = migrate(&hub, &url, &secret);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    for line in ["nodes              2", "users              1", "blobs              1"] {
        assert!(out.contains(line), "{out}");
    }
    // A second run into the now populated database is refused.
    let o = migrate(&hub, &url, &secret);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already holds a hub"));

    // The same address and data dir, now on PostgreSQL.
    hub.extra_args = vec![
        "--store".into(),
        url.clone(),
        "--ca-secret-file".into(),
        secret.to_str().unwrap().into(),
    ];
    hub.restart();
    assert_eq!(psql(&url, "SELECT count(*) FROM nodes"), "2");
    assert_eq!(
        snapshot(&hub),
        before,
        "every node, object, revision, token, account and image"
    );
    let described = hub.cli(&["describe", "node", "mig-1"]);
    assert!(
        described.contains("revision 2 started"),
        "events came along: {described}"
    );
    let (st, body) = api_get(&hub, "/v1/rollouts");
    assert_eq!(st, 200);
    assert!(body.contains("app"), "the rollout came along: {body}");
    let (st, body) = api_get_as(&hub, &ops, "/v1/whoami");
    assert_eq!(st, 200, "the account's token works: {body}");

    // The agents go on without re-joining, and a change reaches them.
    let m3 = marker();
    hub.apply(&sleeper_ds("app", &m3, ""));
    wait_for("a change after the move reaches both agents", 60.0, || {
        (pids_with_cmdline(&["/bin/sleep", &m3]).len() == 2).then_some(())
    });
    assert_eq!((a1.identity(), a2.identity()), ids, "same identities");
    for n in ["mig-1", "mig-2"] {
        wait_for("Online on the new store", 20.0, || {
            (node_status(&hub, n)? == "Online").then_some(())
        });
    }
    // The old join token still joins.
    let _a3 = hub.join("mig-3", &token).running();
    wait_for("the third node runs the DaemonSet", 30.0, || {
        (pids_with_cmdline(&["/bin/sleep", &m3]).len() == 3).then_some(())
    });
}
