//! Hub replicas on one PostgreSQL with data dirs of their own (docs/postgres.md): the CA, the
//! admin token's hash, operator accounts, browser sessions, pipeline records and image/model
//! blobs live in the database, so nothing but the admin token file (copied by the operator)
//! is shared on disk. Real hub and agent processes, a real PostgreSQL.

mod common;

use common::*;
use serde_json::{json, Value};

/// One request: (status, headers, body).
fn call(
    hub: &Hub,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    outpost_pki::install_provider();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tls = outpost_pki::client_config(&hub.ca_pem(), None).unwrap();
        let c = reqwest::Client::builder().use_preconfigured_tls(tls).build().unwrap();
        let mut r = c.request(method.parse().unwrap(), format!("{}{path}", hub.url));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        if let Some(b) = body {
            r = r.body(b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        (status, headers, resp.bytes().await.unwrap().to_vec())
    })
}

#[test]
fn replicas_with_their_own_data_dirs_share_the_ca_accounts_sessions_and_blobs() {
    use sha2::Digest;
    let Some(url) = outpost_hub::store::testkit::pg_database("shared_state") else {
        return;
    };
    let pa = free_port();
    let pb = loop {
        let p = free_port();
        if p != pa {
            break p;
        }
    };
    let secret = tempfile::tempdir().unwrap();
    let secret_file = secret.path().join("ca-secret");
    std::fs::write(&secret_file, "replicas-share-this\n").unwrap();
    let both = format!("https://127.0.0.1:{pa},https://127.0.0.1:{pb}");
    let args = [
        "--store",
        url.as_str(),
        "--ca-secret-file",
        secret_file.to_str().unwrap(),
        "--advertise",
        both.as_str(),
    ];
    let mut a = Hub::start_on_port(pa, &args);
    let b = a.replica_elsewhere(pb);
    assert_ne!(a.dir, b.dir);

    // One CA, its key only in the database and only sealed.
    assert_eq!(a.ca_pem(), b.ca_pem(), "both replicas serve the same CA");
    for h in [&a, &b] {
        assert!(!h.dir.join("hub/ca.key").exists(), "no CA key on disk");
    }
    assert!(psql(&url, "SELECT value FROM hub_secrets WHERE name = 'ca.key'").starts_with("outpost-sealed-v1"));
    assert_eq!(
        psql(&url, "SELECT value FROM hub_secrets WHERE name = 'admin.token.sha256'"),
        hex::encode(sha2::Sha256::digest(a.token.trim().as_bytes())),
        "only the admin token's hash is stored"
    );

    // An account made through A works on B; revoking it on B ends it on A.
    let ops = a.cli(&["user", "add", "ops", "--role", "operator"]).trim().to_string();
    let (status, body) = api_get_as(&b, &ops, "/v1/whoami");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"ops\""), "{body}");
    assert!(
        b.cli(&["audit"]).contains("user add"),
        "A's audit entries are read through B"
    );

    // A dashboard session made on A is valid on B; a logout on B ends it on A.
    {
        use std::io::Write;
        let mut child = b
            .command(&["user", "add", "web", "--role", "viewer", "--password-stdin"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        writeln!(child.stdin.take().unwrap(), "a long enough password").unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let (st, h, body) = call(
        &a,
        "POST",
        "/v1/session",
        &[("content-type", "application/json")],
        Some(serde_json::to_vec(&json!({"user": "web", "password": "a long enough password"})).unwrap()),
    );
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
    let cookie = h["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_string();
    let csrf = serde_json::from_slice::<Value>(&body).unwrap()["csrf_token"]
        .as_str()
        .unwrap()
        .to_string();
    let (st, _, body) = call(&b, "GET", "/v1/whoami", &[("cookie", &cookie)], None);
    assert_eq!(
        st,
        200,
        "the session made on A works on B: {}",
        String::from_utf8_lossy(&body)
    );
    let (st, _, _) = call(
        &b,
        "DELETE",
        "/v1/session",
        &[("cookie", &cookie), ("x-csrf-token", &csrf)],
        None,
    );
    assert_eq!(st, 200);
    let (st, _, _) = call(&a, "GET", "/v1/whoami", &[("cookie", &cookie)], None);
    assert_eq!(st, 401, "a logout on B ends the session on A");

    // A blob uploaded through A is served by B, whole and from an offset; tags too.
    let archive: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&archive)));
    let bearer = format!("Bearer {}", a.token.trim());
    let (st, _, _) = call(
        &a,
        "PUT",
        &format!("/v1/images/blobs/{digest}"),
        &[("authorization", &bearer)],
        Some(archive.clone()),
    );
    assert_eq!(st, 201);
    assert!(!a.dir.join("hub/images").read_dir().is_ok_and(|mut d| d.any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("sha256-"))));
    let (st, _, got) = call(
        &b,
        "GET",
        &format!("/v1/images/blobs/{digest}"),
        &[("authorization", &bearer)],
        None,
    );
    assert_eq!(st, 200);
    assert!(got == archive, "B serves the bytes A stored");
    let from = 1_500_000;
    let (st, h, got) = call(
        &b,
        "GET",
        &format!("/v1/images/blobs/{digest}"),
        &[("authorization", &bearer), ("range", &format!("bytes={from}-"))],
        None,
    );
    assert_eq!(st, 206);
    assert_eq!(
        h["content-range"],
        format!("bytes {from}-{}/{}", archive.len() - 1, archive.len()).as_str()
    );
    assert!(got[..] == archive[from..], "a resumed download across chunk boundaries");
    let (st, _, _) = call(
        &b,
        "POST",
        "/v1/images/tags",
        &[("authorization", &bearer), ("content-type", "application/json")],
        Some(serde_json::to_vec(&json!({"name": "shop/app:1", "digest": digest, "size": 0, "pushed_at": 0})).unwrap()),
    );
    assert_eq!(st, 200, "B tags the blob A stored");
    let bad = vec![7u8; 1000];
    let (st, _, _) = call(
        &a,
        "PUT",
        &format!("/v1/images/blobs/sha256:{}", "0".repeat(64)),
        &[("authorization", &bearer)],
        Some(bad),
    );
    assert_eq!(st, 400, "a wrong digest is refused");
    assert_eq!(psql(&url, "SELECT count(*) FROM blobs"), "1", "and stores nothing");

    // An agent joined through A syncs through B when A is gone (same CA: B accepts its
    // certificate).
    let token = a.token(&[]);
    let agent = a.join("shared-1", &token).running();
    let m = marker();
    b.apply(&sleeper_ds("app", &m, ""));
    wait_for("the workload applied through B runs", 30.0, || {
        (pids_with_cmdline(&["/bin/sleep", &m]).len() == 1).then_some(())
    });
    a.kill();
    let m2 = marker();
    b.apply(&sleeper_ds("app2", &m2, ""));
    wait_for("a change through B reaches the agent after A died", 30.0, || {
        (pids_with_cmdline(&["/bin/sleep", &m2]).len() == 1).then_some(())
    });
    wait_for("the agent reports to B", 20.0, || {
        (b.phase("shared-1", "daemonset/default/app2")? == "Running").then_some(())
    });
    let log = agent.log();
    assert!(
        log.contains(&format!("hub=https://127.0.0.1:{pb}")) || log.contains(&format!("to=https://127.0.0.1:{pb}")),
        "the agent syncs through B: {log}"
    );
}

#[test]
fn a_hub_on_postgres_refuses_to_store_a_plain_ca_key() {
    let Some(url) = outpost_hub::store::testkit::pg_database("plain_ca") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = outpost_under::<&str>(&[])
        .args(["hub", "--listen", &format!("127.0.0.1:{}", free_port()), "--data-dir"])
        .arg(dir.path().join("hub"))
        .args(["--store", &url])
        .env_remove("OUTPOST_CA_KEY_SECRET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("OUTPOST_CA_KEY_SECRET") && e.contains("--ca-secret-file"),
        "{e}"
    );
    assert_eq!(psql(&url, "SELECT count(*) FROM hub_secrets"), "0", "nothing stored");
}
