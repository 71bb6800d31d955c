//! docs/openapi.yaml and the hub's route table describe the same API: every documented
//! operation reaches a handler on a real hub (not the "no such route" or "wrong method"
//! answers), and the hub serves the document itself.

use std::time::Duration;

use anyhow::{ensure, Result};
use outpost_hub::{Hub, HubConfig};
use serde_json::Value;

const METHODS: [&str; 5] = ["get", "post", "put", "delete", "head"];

#[tokio::test]
async fn every_documented_operation_reaches_a_handler() -> Result<()> {
    outpost_pki::install_provider();
    let dir = tempfile::tempdir()?;
    let mut cfg = HubConfig::new("127.0.0.1:0".parse()?, dir.path().join("hub"));
    cfg.long_poll = Duration::from_millis(100);
    let (hub, _) = Hub::start(cfg).await?;
    let tls = outpost_pki::client_config(&hub.ca_pem, None)?;
    let http = reqwest::Client::builder().use_preconfigured_tls(tls).build()?;
    let base = format!("https://127.0.0.1:{}", hub.addr.port());

    let served = http.get(format!("{base}/v1/openapi.yaml")).send().await?.text().await?;
    ensure!(
        served == outpost_hub::openapi::OPENAPI_YAML,
        "the hub serves docs/openapi.yaml"
    );
    let doc: Value = serde_saphyr::from_str(outpost_hub::openapi::OPENAPI_YAML)?;
    let paths = doc["paths"].as_object().expect("paths");
    let mut checked = 0;
    for (path, item) in paths {
        let concrete = path
            .split('/')
            .map(|seg| match seg {
                "{digest}" => "sha256:00".to_string(),
                s if s.starts_with('{') => "x".to_string(),
                s => s.to_string(),
            })
            .collect::<Vec<_>>()
            .join("/");
        for method in METHODS.iter().filter(|m| item.get(**m).is_some()) {
            let req = http
                .request(method.to_uppercase().parse()?, format!("{base}{concrete}"))
                .bearer_auth(&hub.admin_token)
                .header("content-type", "application/json")
                .body("{}");
            let resp = req.send().await?;
            let status = resp.status();
            // an event stream never ends: that it answered is enough
            let streams = resp
                .headers()
                .get("content-type")
                .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            let body = if streams { String::new() } else { resp.text().await? };
            let unrouted = body.contains("\"route ") || body.contains("method_not_allowed");
            ensure!(
                !unrouted,
                "{method} {path} is documented but the hub has no such route: {status} {body}"
            );
            ensure!(status.as_u16() < 500, "{method} {path} answered {status}: {body}");
            checked += 1;
        }
    }
    ensure!(checked >= 25, "only {checked} operations documented");
    hub.shutdown().await;
    Ok(())
}

/// Every route in the hub's route table is documented (read from the source of the table).
#[test]
fn every_route_is_documented() -> Result<()> {
    let doc: Value = serde_saphyr::from_str(outpost_hub::openapi::OPENAPI_YAML)?;
    let paths = doc["paths"].as_object().expect("paths");
    let table = include_str!("../src/server.rs");
    let mut routes = 0;
    for piece in table.split(".route(\"").skip(1) {
        let path = piece.split('"').next().unwrap_or_default();
        ensure!(
            paths.contains_key(path),
            "route {path} is missing from docs/openapi.yaml"
        );
        routes += 1;
    }
    ensure!(routes >= 20, "found only {routes} routes in server.rs");
    Ok(())
}
