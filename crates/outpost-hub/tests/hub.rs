//! A real hub on 127.0.0.1:0 with real TLS, mTLS node certificates and SQLite in a temp dir.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use outpost_api::{
    ApiError, ApplyRequest, ApplyResponse, DeleteResponse, JoinRequest, JoinResponse, JoinToken, ManifestFile,
    NodeEvent, NodeInfo, Phase, RenewRequest, RenewResponse, StatusAck, StatusReport, SyncResponse, TokenRequest,
    TokenResponse, WorkloadInfo, WorkloadStatus, PROTOCOL_HEADER,
};
use outpost_hub::{Hub, HubConfig};
use reqwest::{Client, StatusCode};
use serde::de::DeserializeOwned;

struct Node {
    name: String,
    key_pem: String,
    client: Client,
}

async fn start(dir: &Path, long_poll: Duration) -> Result<(Hub, Option<String>)> {
    outpost_pki::install_provider();
    let mut cfg = HubConfig::new("127.0.0.1:0".parse()?, dir.join("hub"));
    cfg.long_poll = long_poll;
    Hub::start(cfg).await
}

fn url(hub: &Hub, path: &str) -> String {
    format!("https://127.0.0.1:{}{path}", hub.addr.port())
}

fn client(hub: &Hub, identity: Option<(&str, &str)>) -> Result<Client> {
    let tls = outpost_pki::client_config(&hub.ca_pem, identity)?;
    Ok(Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(20))
        .build()?)
}

async fn json<T: DeserializeOwned>(resp: reqwest::Response, want: StatusCode) -> Result<T> {
    let status = resp.status();
    let text = resp.text().await?;
    ensure!(status == want, "expected {want}, got {status}: {text}");
    serde_json::from_str(&text).with_context(|| format!("decoding {text}"))
}

/// The ApiError of a refused request, checked for status and code.
async fn refused(resp: reqwest::Response, want: StatusCode, code: &str) -> Result<ApiError> {
    let e: ApiError = json(resp, want).await?;
    ensure!(e.code == code, "expected code {code}, got {e:?}");
    Ok(e)
}

async fn admin_post<T: serde::Serialize>(hub: &Hub, path: &str, body: &T) -> Result<reqwest::Response> {
    Ok(client(hub, None)?
        .post(url(hub, path))
        .bearer_auth(&hub.admin_token)
        .json(body)
        .send()
        .await?)
}

async fn admin_get(hub: &Hub, path: &str) -> Result<reqwest::Response> {
    Ok(client(hub, None)?
        .get(url(hub, path))
        .bearer_auth(&hub.admin_token)
        .send()
        .await?)
}

async fn token(hub: &Hub, ttl_secs: Option<u64>, uses: Option<u32>) -> Result<JoinToken> {
    let req = TokenRequest {
        labels: [("site".to_string(), "hq".to_string())].into(),
        ttl_secs,
        uses,
        ..Default::default()
    };
    let resp: TokenResponse = json(admin_post(hub, "/v1/tokens", &req).await?, StatusCode::OK).await?;
    JoinToken::parse(&resp.token).map_err(anyhow::Error::msg)
}

async fn join_raw(hub: &Hub, tok: &JoinToken, name: &str) -> Result<(reqwest::Response, outpost_pki::NodeKey)> {
    let key = outpost_pki::NodeKey::generate(name)?;
    let req = JoinRequest {
        token_id: tok.id.clone(),
        token_secret: tok.secret.clone(),
        name: name.into(),
        labels: [("kubernetes.io/hostname".to_string(), name.to_string())].into(),
        csr_pem: key.csr_pem.clone(),
    };
    let resp = client(hub, None)?
        .post(url(hub, "/v1/join"))
        .header(PROTOCOL_HEADER, "1")
        .json(&req)
        .send()
        .await?;
    Ok((resp, key))
}

async fn join(hub: &Hub, tok: &JoinToken, name: &str) -> Result<(Node, JoinResponse)> {
    let (resp, key) = join_raw(hub, tok, name).await?;
    let joined: JoinResponse = json(resp, StatusCode::OK).await?;
    let client = client(hub, Some((&joined.cert_pem, &key.key_pem)))?;
    Ok((
        Node {
            name: name.into(),
            key_pem: key.key_pem,
            client,
        },
        joined,
    ))
}

async fn sync(hub: &Hub, node: &Node, target: &str, generation: u64) -> Result<reqwest::Response> {
    Ok(node
        .client
        .get(url(hub, &format!("/v1/nodes/{target}/sync?generation={generation}")))
        .header(PROTOCOL_HEADER, "1")
        .send()
        .await?)
}

fn report(generation: u64, workloads: Vec<WorkloadStatus>, events: Vec<NodeEvent>) -> StatusReport {
    StatusReport {
        agent_version: "test".into(),
        uptime_secs: 5,
        generation,
        full: true,
        workloads,
        removed: vec![],
        events,
    }
}

fn files(content: &str) -> ApplyRequest {
    ApplyRequest {
        files: vec![ManifestFile {
            name: "app.yaml".into(),
            content: content.into(),
        }],
    }
}

const DAEMONSET: &str = "apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent}
spec:
  template:
    spec:
      runtimeClassName: process
      containers: [{name: c, command: [/bin/sleep, '1000']}]
";

const CONFIG_AND_DEPLOYMENT: &str = "apiVersion: v1
kind: ConfigMap
metadata: {name: cfg}
data: {greeting: hi}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 1
  template:
    spec:
      containers:
      - name: c
        image: nginx
        env:
        - name: GREETING
          valueFrom: {configMapKeyRef: {name: cfg, key: greeting}}
";

#[tokio::test]
async fn ca_join_and_token_refusals() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (hub, created) = start(dir.path(), Duration::from_secs(1)).await?;
    assert_eq!(created.as_deref(), Some(hub.admin_token.as_str()));
    let stored = std::fs::read_to_string(dir.path().join("hub/admin.token"))?;
    assert_eq!(stored.trim(), hub.admin_token);

    // The CA is served without authentication and matches the token pin.
    let ca = client(&hub, None)?
        .get(url(&hub, "/v1/ca"))
        .send()
        .await?
        .text()
        .await?;
    assert_eq!(
        outpost_pki::fingerprint(&outpost_pki::pem_to_der(&ca)?),
        hub.ca_fingerprint
    );

    let once = token(&hub, None, Some(1)).await?;
    assert_eq!(once.ca_fingerprint, hub.ca_fingerprint);
    let (node, joined) = join(&hub, &once, "store-1").await?;
    assert_eq!(joined.ca_pem, hub.ca_pem);
    assert_eq!(joined.labels["site"], "hq");
    assert_eq!(joined.labels["kubernetes.io/hostname"], "store-1");
    assert!(joined.cert_pem.contains("BEGIN CERTIFICATE"));
    // The certificate works for the node's own routes.
    assert_eq!(sync(&hub, &node, "store-1", 0).await?.status(), StatusCode::OK);

    let e = refused(
        join_raw(&hub, &once, "store-2").await?.0,
        StatusCode::UNAUTHORIZED,
        "token_used_up",
    )
    .await?;
    assert!(
        e.message.contains("used 1 time already") && e.message.contains("outpost token create"),
        "{e:?}"
    );

    // The shortest lifetime a token may have is one second (0 is refused).
    let expired = token(&hub, Some(1), None).await?;
    let made = Instant::now();
    until("the one-second token to expire", 5, || {
        made.elapsed() > Duration::from_millis(1100)
    })
    .await?;
    let e = refused(
        join_raw(&hub, &expired, "store-2").await?.0,
        StatusCode::UNAUTHORIZED,
        "token_expired",
    )
    .await?;
    assert!(
        e.message.contains("expired") && e.message.contains("outpost token create"),
        "{e:?}"
    );

    let unknown = JoinToken {
        id: "deadbeef".into(),
        ..once.clone()
    };
    refused(
        join_raw(&hub, &unknown, "store-2").await?.0,
        StatusCode::UNAUTHORIZED,
        "token_unknown",
    )
    .await?;
    let wrong_secret = JoinToken {
        secret: "00".repeat(16),
        ..token(&hub, None, None).await?
    };
    refused(
        join_raw(&hub, &wrong_secret, "store-2").await?.0,
        StatusCode::UNAUTHORIZED,
        "token_unknown",
    )
    .await?;

    let many = token(&hub, None, None).await?;
    let e = refused(
        join_raw(&hub, &many, "store-1").await?.0,
        StatusCode::CONFLICT,
        "node_exists",
    )
    .await?;
    assert!(e.message.contains("outpost delete node store-1"), "{e:?}");
    refused(
        join_raw(&hub, &many, "Bad_Name").await?.0,
        StatusCode::BAD_REQUEST,
        "invalid_name",
    )
    .await?;

    let req = JoinRequest {
        token_id: many.id.clone(),
        token_secret: many.secret.clone(),
        name: "store-3".into(),
        labels: Default::default(),
        csr_pem: "not a csr".into(),
    };
    let resp = client(&hub, None)?
        .post(url(&hub, "/v1/join"))
        .json(&req)
        .send()
        .await?;
    refused(resp, StatusCode::BAD_REQUEST, "invalid_csr").await?;

    // Operator routes need the admin token.
    let resp = client(&hub, None)?.get(url(&hub, "/v1/nodes")).send().await?;
    refused(resp, StatusCode::UNAUTHORIZED, "unauthorized").await?;
    let resp = client(&hub, None)?
        .get(url(&hub, "/v1/nodes"))
        .bearer_auth("nope")
        .send()
        .await?;
    refused(resp, StatusCode::UNAUTHORIZED, "unauthorized").await?;

    // A newer protocol is refused with a message to upgrade the hub.
    let resp = node
        .client
        .get(url(&hub, "/v1/nodes/store-1/sync"))
        .header(PROTOCOL_HEADER, "2")
        .send()
        .await?;
    let e = refused(resp, StatusCode::BAD_REQUEST, "protocol_version").await?;
    assert!(e.message.contains("upgrade the hub"), "{e:?}");
    hub.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn nodes_only_reach_their_own_state() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (hub, _) = start(dir.path(), Duration::from_millis(200)).await?;
    let tok = token(&hub, None, None).await?;
    let (a, _) = join(&hub, &tok, "a").await?;
    let (b, _) = join(&hub, &tok, "b").await?;

    let e = refused(sync(&hub, &a, "b", 0).await?, StatusCode::FORBIDDEN, "forbidden").await?;
    assert_eq!(e.message, "node a may only access its own state, not node b's");
    let resp = a
        .client
        .post(url(&hub, "/v1/nodes/b/status"))
        .json(&report(0, vec![], vec![]))
        .send()
        .await?;
    refused(resp, StatusCode::FORBIDDEN, "forbidden").await?;
    let resp = a
        .client
        .post(url(&hub, "/v1/nodes/b/renew"))
        .json(&serde_json::json!({"csr_pem": "x"}))
        .send()
        .await?;
    refused(resp, StatusCode::FORBIDDEN, "forbidden").await?;
    // Nothing was written for b by a's refused status report.
    let info: NodeInfo = json(admin_get(&hub, "/v1/nodes/b").await?, StatusCode::OK).await?;
    assert_eq!(info.agent_version, None);

    // Renewal is two-phase: the old certificate works until the new one has been used, then
    // only the new one works.
    let csr_pem = outpost_pki::NodeKey::csr_for(&a.key_pem, "a")?;
    let resp = a
        .client
        .post(url(&hub, "/v1/nodes/a/renew"))
        .json(&RenewRequest { csr_pem })
        .send()
        .await?;
    let renewed: RenewResponse = json(resp, StatusCode::OK).await?;
    assert_eq!(
        sync(&hub, &a, "a", 0).await?.status(),
        StatusCode::OK,
        "old one still works"
    );
    let a2 = Node {
        name: "a".into(),
        client: client(&hub, Some((&renewed.cert_pem, &a.key_pem)))?,
        key_pem: a.key_pem.clone(),
    };
    assert_eq!(sync(&hub, &a2, "a", 0).await?.status(), StatusCode::OK);
    refused(sync(&hub, &a, "a", 0).await?, StatusCode::UNAUTHORIZED, "unknown_node").await?;

    // No client certificate at all.
    let resp = client(&hub, None)?.get(url(&hub, "/v1/nodes/a/sync")).send().await?;
    refused(resp, StatusCode::UNAUTHORIZED, "unauthorized").await?;

    // A deleted node's certificate stops working at once.
    let resp = client(&hub, None)?
        .delete(url(&hub, "/v1/nodes/b"))
        .bearer_auth(&hub.admin_token)
        .send()
        .await?;
    let _: DeleteResponse = json(resp, StatusCode::OK).await?;
    let e = refused(sync(&hub, &b, "b", 0).await?, StatusCode::UNAUTHORIZED, "unknown_node").await?;
    assert!(e.message.contains("outpost agent join"), "{e:?}");
    hub.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn long_poll_answers_at_once_times_out_and_wakes_on_apply() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let long_poll = Duration::from_millis(400);
    let (hub, _) = start(dir.path(), long_poll).await?;
    let tok = token(&hub, None, None).await?;
    let (node, _) = join(&hub, &tok, "edge-1").await?;

    // Generation 0: the full (empty) state at once.
    let first: SyncResponse = json(sync(&hub, &node, "edge-1", 0).await?, StatusCode::OK).await?;
    assert!(
        first.full && first.upsert.is_empty() && first.generation > 0,
        "{first:?}"
    );

    // Up to date: 204 after the long-poll timeout, not before.
    let t0 = Instant::now();
    let resp = sync(&hub, &node, "edge-1", first.generation).await?;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let waited = t0.elapsed();
    assert!(
        waited >= long_poll - Duration::from_millis(50) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    hub.shutdown().await;

    // Same data, long timeout: an apply while waiting answers the poll without waiting it out.
    let (hub, _) = start(dir.path(), Duration::from_secs(60)).await?;
    let url_sync = url(
        &hub,
        &format!("/v1/nodes/{}/sync?generation={}", node.name, first.generation),
    );
    let poll = tokio::spawn({
        let c = node.client.clone();
        async move { c.get(url_sync).send().await }
    });
    // Give the poll a chance to be parked at the hub (it would also be answered if not yet).
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !poll.is_finished(),
        "nothing changed yet, so the poll must still be waiting"
    );
    let t0 = Instant::now();
    let applied: ApplyResponse = json(admin_post(&hub, "/v1/apply", &files(DAEMONSET)).await?, StatusCode::OK).await?;
    assert_eq!(applied.results[0].action, "created");
    let resp = tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .context("poll not answered within 10s")???;
    assert!(t0.elapsed() < Duration::from_secs(10));
    let delta: SyncResponse = json(resp, StatusCode::OK).await?;
    assert!(!delta.full, "{delta:?}");
    assert_eq!(
        delta.upsert.iter().map(|w| w.key.as_str()).collect::<Vec<_>>(),
        ["daemonset/default/agent"]
    );

    // A newer generation answers at once.
    let t0 = Instant::now();
    let again: SyncResponse = json(sync(&hub, &node, "edge-1", first.generation).await?, StatusCode::OK).await?;
    assert_eq!(again.generation, delta.generation);
    assert!(t0.elapsed() < Duration::from_secs(5));

    // Status: Running and ready with the desired hash counts as ready; events are acknowledged.
    let spec = &delta.upsert[0];
    let st = WorkloadStatus {
        key: spec.key.clone(),
        revision: spec.revision,
        hash: spec.hash.clone(),
        phase: Phase::Running,
        containers: vec![],
        ready: true,
        rollout: None,
        site_role: None,
    };
    let ev = |seq| NodeEvent {
        seq,
        at: 1,
        workload: Some(spec.key.clone()),
        reason: "Started".into(),
        message: "ok".into(),
    };
    let resp = node
        .client
        .post(url(&hub, "/v1/nodes/edge-1/status"))
        .header(PROTOCOL_HEADER, "1")
        .json(&report(delta.generation, vec![st], vec![ev(1), ev(2)]))
        .send()
        .await?;
    let ack: StatusAck = json(resp, StatusCode::OK).await?;
    assert_eq!(ack.events_acked, 2);
    let wl: Vec<WorkloadInfo> = json(admin_get(&hub, "/v1/workloads").await?, StatusCode::OK).await?;
    assert_eq!((wl[0].desired, wl[0].scheduled, wl[0].ready), (1, 1, 1));
    assert_eq!(wl[0].placements[0].node_status, "Online");
    let info: NodeInfo = json(admin_get(&hub, "/v1/nodes/edge-1").await?, StatusCode::OK).await?;
    assert_eq!(
        (info.applied_generation, info.events.len(), info.workloads.len()),
        (delta.generation, 2, 1)
    );
    hub.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn bad_apply_stores_nothing_and_in_use_blocks_delete() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (hub, _) = start(dir.path(), Duration::from_secs(1)).await?;
    let bad = format!("{CONFIG_AND_DEPLOYMENT}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: broken}}\nspec: {{replicas: 1, bogus: true}}\n");
    let e = refused(
        admin_post(&hub, "/v1/apply", &files(&bad)).await?,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_manifest",
    )
    .await?;
    assert!(
        !e.details.is_empty() && e.message.ends_with("nothing was applied"),
        "{e:?}"
    );
    let wl: Vec<WorkloadInfo> = json(admin_get(&hub, "/v1/workloads").await?, StatusCode::OK).await?;
    assert!(wl.is_empty());
    refused(
        admin_get(&hub, "/v1/objects/configmap/default/cfg").await?,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await?;

    // A reference to a ConfigMap that exists neither stored nor in the batch.
    let dangling = CONFIG_AND_DEPLOYMENT.split("---\n").nth(1).context("two documents")?;
    let e = refused(
        admin_post(&hub, "/v1/apply", &files(dangling)).await?,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_manifest",
    )
    .await?;
    assert!(e.details[0].reason.contains("does not exist"), "{e:?}");

    let ok: ApplyResponse = json(
        admin_post(&hub, "/v1/apply", &files(CONFIG_AND_DEPLOYMENT)).await?,
        StatusCode::OK,
    )
    .await?;
    assert_eq!(
        ok.results.iter().map(|r| r.action.as_str()).collect::<Vec<_>>(),
        ["created", "created"]
    );
    let cm: serde_json::Value = json(admin_get(&hub, "/v1/objects/cm/default/cfg").await?, StatusCode::OK).await?;
    assert_eq!(cm["metadata"]["namespace"], "default");

    let resp = client(&hub, None)?
        .delete(url(&hub, "/v1/objects/configmap/default/cfg"))
        .bearer_auth(&hub.admin_token)
        .send()
        .await?;
    let e = refused(resp, StatusCode::CONFLICT, "in_use").await?;
    assert!(e.message.contains("Deployment/default/web"), "{e:?}");
    // Deleting both together is fine.
    let del: DeleteResponse = json(
        admin_post(&hub, "/v1/delete", &files(CONFIG_AND_DEPLOYMENT)).await?,
        StatusCode::OK,
    )
    .await?;
    assert_eq!(del.deleted.len(), 2);
    hub.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn restart_keeps_nodes_tokens_objects_and_certificates() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (hub, created) = start(dir.path(), Duration::from_millis(200)).await?;
    assert!(created.is_some());
    let tok = token(&hub, None, Some(2)).await?;
    let (a, _) = join(&hub, &tok, "a").await?;
    let _: ApplyResponse = json(
        admin_post(&hub, "/v1/apply", &files(CONFIG_AND_DEPLOYMENT)).await?,
        StatusCode::OK,
    )
    .await?;
    let before: SyncResponse = json(sync(&hub, &a, "a", 0).await?, StatusCode::OK).await?;
    assert_eq!(before.upsert.len(), 1);
    let (token_before, fp_before) = (hub.admin_token.clone(), hub.ca_fingerprint.clone());
    hub.shutdown().await;

    let (hub, created) = start(dir.path(), Duration::from_millis(200)).await?;
    assert!(created.is_none(), "the admin token is printed on first start only");
    assert_eq!(
        (hub.admin_token.as_str(), hub.ca_fingerprint.as_str()),
        (token_before.as_str(), fp_before.as_str())
    );
    // The node's certificate still works; nothing changed, so the poll times out.
    assert_eq!(
        sync(&hub, &a, "a", before.generation).await?.status(),
        StatusCode::NO_CONTENT
    );
    let nodes: Vec<NodeInfo> = json(admin_get(&hub, "/v1/nodes").await?, StatusCode::OK).await?;
    assert_eq!(nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["a"]);
    let wl: Vec<WorkloadInfo> = json(admin_get(&hub, "/v1/workloads").await?, StatusCode::OK).await?;
    assert_eq!(wl.len(), 1);
    assert_eq!(wl[0].placements[0].node, "a");
    // The token kept its remaining use.
    join(&hub, &tok, "b").await?;
    refused(
        join_raw(&hub, &tok, "c").await?.0,
        StatusCode::UNAUTHORIZED,
        "token_used_up",
    )
    .await?;
    hub.shutdown().await;
    Ok(())
}

/// Poll `f` every 50 ms until it holds, or fail after `secs`.
async fn until(what: &str, secs: u64, mut f: impl FnMut() -> bool) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(secs);
    while !f() {
        ensure!(Instant::now() < end, "timed out after {secs}s waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn token_with(hub: &Hub, req: &TokenRequest) -> Result<reqwest::Response> {
    admin_post(hub, "/v1/tokens", req).await
}

async fn join_labelled(
    hub: &Hub,
    tok: &JoinToken,
    name: &str,
    labels: &[(&str, &str)],
) -> Result<(reqwest::Response, outpost_pki::NodeKey)> {
    let key = outpost_pki::NodeKey::generate(name)?;
    let req = JoinRequest {
        token_id: tok.id.clone(),
        token_secret: tok.secret.clone(),
        name: name.into(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        csr_pem: key.csr_pem.clone(),
    };
    let resp = client(hub, None)?
        .post(url(hub, "/v1/join"))
        .header(PROTOCOL_HEADER, "1.1")
        .json(&req)
        .send()
        .await?;
    Ok((resp, key))
}

#[tokio::test]
async fn nodes_cannot_pick_their_placement_labels() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (hub, _) = start(dir.path(), Duration::from_millis(200)).await?;
    let req = TokenRequest {
        labels: [("site".to_string(), "store-042".to_string())].into(),
        uses: Some(1),
        node_labels: vec!["rack".into()],
        ..Default::default()
    };
    let resp: TokenResponse = json(token_with(&hub, &req).await?, StatusCode::OK).await?;
    let tok = JoinToken::parse(&resp.token).map_err(anyhow::Error::msg)?;
    for (labels, says) in [
        (
            vec![("kubernetes.io/hostname", "victim")],
            "the hub sets it to the node's name",
        ),
        (vec![("site", "store-001")], "the join token sets site=\"store-042\""),
        (vec![("zone", "z1")], "outpost token create --node-labels zone"),
    ] {
        let (resp, _) = join_labelled(&hub, &tok, "impostor", &labels).await?;
        let e = refused(resp, StatusCode::BAD_REQUEST, "label_not_allowed").await?;
        assert!(
            e.message.contains(says) && e.message.contains("nothing was stored"),
            "{labels:?}: {e:?}"
        );
    }
    let nodes: Vec<NodeInfo> = json(admin_get(&hub, "/v1/nodes").await?, StatusCode::OK).await?;
    assert!(nodes.is_empty(), "refused joins store nothing: {nodes:?}");
    // The token's one use is still there; allowed labels pass, the hub sets the hostname.
    let (resp, _) = join_labelled(
        &hub,
        &tok,
        "box-1",
        &[
            ("rack", "r7"),
            ("node.outpost.dev/camera", "yes"),
            ("kubernetes.io/os", "linux"),
            ("site", "store-042"),
        ],
    )
    .await?;
    let joined: JoinResponse = json(resp, StatusCode::OK).await?;
    let want: std::collections::BTreeMap<String, String> = [
        ("kubernetes.io/hostname", "box-1"),
        ("kubernetes.io/os", "linux"),
        ("node.outpost.dev/camera", "yes"),
        ("rack", "r7"),
        ("site", "store-042"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(joined.labels, want);
    // A token cannot hand the hostname (or its own labels) to nodes.
    for key in ["kubernetes.io/hostname", "site"] {
        let req = TokenRequest {
            labels: [("site".to_string(), "s".to_string())].into(),
            node_labels: vec![key.into()],
            ..Default::default()
        };
        let e = refused(token_with(&hub, &req).await?, StatusCode::BAD_REQUEST, "bad_request").await?;
        assert!(e.message.contains("node_labels"), "{e:?}");
    }
    hub.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn an_expired_certificate_may_only_renew() -> Result<()> {
    let dir = tempfile::tempdir()?;
    outpost_pki::install_provider();
    let mut cfg = HubConfig::new("127.0.0.1:0".parse()?, dir.path().join("hub"));
    cfg.long_poll = Duration::from_millis(200);
    cfg.node_cert_lifetime = Duration::from_secs(3);
    let (hub, _) = Hub::start(cfg).await?;
    let tok = token(&hub, None, None).await?;
    let (a, joined) = join(&hub, &tok, "a").await?;
    let (b, _) = join(&hub, &tok, "b").await?;
    assert_eq!(sync(&hub, &a, "a", 0).await?.status(), StatusCode::OK);
    let not_after = outpost_pki::not_after_unix(&joined.cert_pem)? * 1000;
    until("the node certificates to expire", 20, || {
        outpost_hub::now_ms() > not_after + 100
    })
    .await?;

    // A new connection with the expired certificate passes the TLS handshake...
    let expired = client(&hub, Some((&joined.cert_pem, &a.key_pem)))?;
    // ...but every route except renew answers certificate_expired, saying what happens next.
    let e = refused(
        expired
            .get(url(&hub, "/v1/nodes/a/sync"))
            .query(&[("generation", "0")])
            .send()
            .await?,
        StatusCode::UNAUTHORIZED,
        "certificate_expired",
    )
    .await?;
    assert!(e.message.contains("renews it by itself"), "{e:?}");
    let resp = expired
        .post(url(&hub, "/v1/nodes/a/status"))
        .json(&report(0, vec![], vec![]))
        .send()
        .await?;
    refused(resp, StatusCode::UNAUTHORIZED, "certificate_expired").await?;
    let resp = expired
        .get(url(&hub, "/v1/images/tags"))
        .query(&[("name", "x:1")])
        .send()
        .await?;
    refused(resp, StatusCode::UNAUTHORIZED, "certificate_expired").await?;
    // Another node's expired certificate cannot renew a's.
    let csr_pem = outpost_pki::NodeKey::csr_for(&a.key_pem, "a")?;
    let resp = b
        .client
        .post(url(&hub, "/v1/nodes/a/renew"))
        .json(&RenewRequest {
            csr_pem: csr_pem.clone(),
        })
        .send()
        .await?;
    refused(resp, StatusCode::FORBIDDEN, "forbidden").await?;

    // The renew route takes it: the handshake proved the key, the hub knows the certificate.
    let resp = expired
        .post(url(&hub, "/v1/nodes/a/renew"))
        .json(&RenewRequest { csr_pem })
        .send()
        .await?;
    let renewed: RenewResponse = json(resp, StatusCode::OK).await?;
    let fresh = client(&hub, Some((&renewed.cert_pem, &a.key_pem)))?;
    let resp = fresh
        .get(url(&hub, "/v1/nodes/a/sync"))
        .query(&[("generation", "0")])
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let info: NodeInfo = json(admin_get(&hub, "/v1/nodes/a").await?, StatusCode::OK).await?;
    assert_eq!(
        info.cert_expires_at,
        Some(outpost_pki::not_after_unix(&renewed.cert_pem)? * 1000)
    );
    // The old certificate is gone now that the new one was used.
    let resp = expired.get(url(&hub, "/v1/nodes/a/sync")).send().await?;
    refused(resp, StatusCode::UNAUTHORIZED, "unknown_node").await?;

    // A deleted node's expired certificate renews nothing.
    let resp = client(&hub, None)?
        .delete(url(&hub, "/v1/nodes/b"))
        .bearer_auth(&hub.admin_token)
        .send()
        .await?;
    let _: DeleteResponse = json(resp, StatusCode::OK).await?;
    let resp = b
        .client
        .post(url(&hub, "/v1/nodes/b/renew"))
        .json(&RenewRequest {
            csr_pem: outpost_pki::NodeKey::csr_for(&b.key_pem, "b")?,
        })
        .send()
        .await?;
    refused(resp, StatusCode::UNAUTHORIZED, "unknown_node").await?;
    hub.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_lost_renew_answer_locks_nobody_out() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (hub, _) = start(dir.path(), Duration::from_millis(200)).await?;
    let tok = token(&hub, None, None).await?;
    let (a, _) = join(&hub, &tok, "a").await?;
    let renew = |csr_pem: String| {
        a.client
            .post(url(&hub, "/v1/nodes/a/renew"))
            .json(&RenewRequest { csr_pem })
            .send()
    };
    // Two renewals whose answers never reach the agent.
    for _ in 0..2 {
        let resp = renew(outpost_pki::NodeKey::csr_for(&a.key_pem, "a")?).await?;
        assert_eq!(resp.status(), StatusCode::OK);
        drop(resp);
    }
    // The agent carries on with the certificate it has: sync, status, renew all work.
    assert_eq!(sync(&hub, &a, "a", 0).await?.status(), StatusCode::OK);
    let resp = a
        .client
        .post(url(&hub, "/v1/nodes/a/status"))
        .json(&report(0, vec![], vec![]))
        .send()
        .await?;
    let _: StatusAck = json(resp, StatusCode::OK).await?;
    let renewed: RenewResponse = json(
        renew(outpost_pki::NodeKey::csr_for(&a.key_pem, "a")?).await?,
        StatusCode::OK,
    )
    .await?;
    let a2 = Node {
        name: "a".into(),
        client: client(&hub, Some((&renewed.cert_pem, &a.key_pem)))?,
        key_pem: a.key_pem.clone(),
    };
    assert_eq!(sync(&hub, &a2, "a", 0).await?.status(), StatusCode::OK);
    refused(sync(&hub, &a, "a", 0).await?, StatusCode::UNAUTHORIZED, "unknown_node").await?;
    hub.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn early_answers_reach_http2_clients_and_big_bodies_get_413() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (hub, _) = start(dir.path(), Duration::from_millis(200)).await?;
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &hub.ca_pem)?;
    let body = dir.path().join("body");
    std::fs::write(&body, vec![b'x'; 8 << 20])?;
    // curl (nghttp2) reports a stream reset after an early answer as an error of the whole
    // exchange; the hub reads the rest of the body first, so it sees the 401.
    for (method, path) in [
        ("PUT", format!("/v1/images/blobs/sha256:{}", "a".repeat(64))),
        ("POST", "/v1/apply".to_string()),
        ("POST", "/v1/tokens".to_string()),
    ] {
        for _ in 0..3 {
            let out = tokio::process::Command::new("curl")
                .args(["-sS", "--http2", "--cacert"])
                .arg(&ca)
                .args([
                    "-H",
                    "Authorization: Bearer wrong",
                    "-H",
                    "Content-Type: application/json",
                ])
                .args(["-X", method, "--data-binary"])
                .arg(format!("@{}", body.display()))
                .args(["-w", "\n%{http_version} %{http_code}"])
                .arg(url(&hub, &path))
                .output()
                .await
                .context("running curl (install it: apt-get install curl)")?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            ensure!(
                out.status.success(),
                "{method} {path}: curl failed: {}{stdout}",
                String::from_utf8_lossy(&out.stderr)
            );
            let (answer, status) = stdout.rsplit_once('\n').context("curl output")?;
            assert_eq!(status, "2 401", "{method} {path}: {stdout}");
            let e: ApiError = serde_json::from_str(answer)?;
            assert_eq!(e.code, "unauthorized");
        }
    }
    // A body over the limit: 413 naming the limit, not "same release".
    let big = files(&"x".repeat(17 << 20));
    let e = refused(
        admin_post(&hub, "/v1/apply", &big).await?,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    )
    .await?;
    assert!(
        e.message.contains("16 MiB") && !e.message.contains("same release"),
        "{e:?}"
    );
    // The connection is still good for the next request.
    let _: Vec<NodeInfo> = json(admin_get(&hub, "/v1/nodes").await?, StatusCode::OK).await?;
    hub.shutdown().await;
    Ok(())
}

/// Everything the hub logs, for the test that checks what it says.
#[derive(Clone, Default)]
struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

#[tokio::test]
async fn a_token_is_logged_as_created_only_once_it_is_stored() -> Result<()> {
    let logs = Logs::default();
    tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .try_init()
        .map_err(|e| anyhow::anyhow!("this test needs its own process (cargo nextest): {e}"))?;
    let dir = tempfile::tempdir()?;
    let (hub, _) = start(dir.path(), Duration::from_millis(200)).await?;
    token(&hub, None, None).await?;
    assert_eq!(logs.text().matches("join token created").count(), 1);

    // The database refuses the next token (its table is gone).
    rusqlite::Connection::open(dir.path().join("hub/hub.db"))?.execute_batch("DROP TABLE tokens")?;
    let req = TokenRequest::default();
    let e = refused(
        token_with(&hub, &req).await?,
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
    )
    .await?;
    assert!(e.message.contains("tokens"), "{e:?}");
    let text = logs.text();
    assert_eq!(
        text.matches("join token created").count(),
        1,
        "a token that was not stored is not logged as created:\n{text}"
    );
    assert!(text.contains("request failed"), "{text}");
    hub.shutdown().await;
    Ok(())
}

/// The hub checks token requests and image names itself (not only the CLI): a zero-use token,
/// a label that is not one and an image name with a newline or `../` are refused with the field
/// named, and nothing is stored.
#[tokio::test]
async fn token_and_image_tag_requests_are_checked_by_the_hub() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (hub, _) = start(dir.path(), Duration::from_secs(1)).await?;
    for (req, want) in [
        (
            TokenRequest {
                uses: Some(0),
                ..Default::default()
            },
            "uses",
        ),
        (
            TokenRequest {
                labels: [("site".to_string(), "a b".to_string())].into(),
                ..Default::default()
            },
            "a b",
        ),
    ] {
        let e = refused(token_with(&hub, &req).await?, StatusCode::BAD_REQUEST, "bad_request").await?;
        ensure!(e.message.contains(want), "{want}: {}", e.message);
    }
    for name in ["evil\nname:1", "../../etc:1"] {
        let tag = outpost_api::ImageTag {
            name: name.into(),
            digest: format!("sha256:{}", "0".repeat(64)),
            size: 0,
            pushed_at: 0,
        };
        let e = refused(
            admin_post(&hub, "/v1/images/tags", &tag).await?,
            StatusCode::BAD_REQUEST,
            "bad_request",
        )
        .await?;
        ensure!(e.message.contains("name"), "{name:?}: {}", e.message);
    }
    let tags: Vec<outpost_api::ImageTag> = json(admin_get(&hub, "/v1/images/tags").await?, StatusCode::OK).await?;
    ensure!(tags.is_empty(), "nothing stored: {tags:?}");
    hub.shutdown().await;
    Ok(())
}
