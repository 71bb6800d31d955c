//! API fuzzing: schemathesis (PyPI) generates requests from docs/openapi.yaml against a real hub
//! process, valid and invalid, and checks every answer: no 5xx, the documented status codes and
//! content types, every error body an `ApiError`, invalid input refused, wrong methods answered
//! 405, and authentication enforced. The hub must still answer and never have panicked.
//!
//! schemathesis comes from a venv that scripts/test.sh creates (`.venv/` at the repository root),
//! or from `OUTPOST_SCHEMATHESIS`. `OUTPOST_API_FUZZ_SECS` sets the time budget (default 60 s).

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

fn schemathesis() -> PathBuf {
    let path = std::env::var_os("OUTPOST_SCHEMATHESIS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv/bin/schemathesis")));
    assert!(
        path.exists(),
        "schemathesis is missing at {}: run ./scripts/test.sh (it installs it into .venv) or set OUTPOST_SCHEMATHESIS",
        path.display()
    );
    path
}

#[test]
fn schemathesis_finds_no_server_error_or_contract_violation() {
    let tool = schemathesis();
    let hub = Hub::start();
    // A node identity, so the node routes are exercised over real mTLS too.
    let token = hub.token(&[]);
    let agent = hub.join("fuzz-node", &token);
    let (_, cert, key) = agent.identity();
    let bundle = hub.dir.join("node-bundle.pem");
    std::fs::write(&bundle, format!("{cert}{key}")).unwrap();
    let secs = std::env::var("OUTPOST_API_FUZZ_SECS").unwrap_or_else(|_| "60".into());
    let spec = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.yaml");
    let out = Command::new(&tool)
        .current_dir(&hub.dir)
        .args(["run", spec, "--url", &hub.url])
        .args(["-H", &format!("Authorization: Bearer {}", hub.token.trim())])
        .arg("--tls-verify")
        .arg(hub.ca_file())
        .arg("--request-cert")
        .arg(&bundle)
        // Every check but "schema-valid data is accepted": the hub validates meaning (kinds,
        // names, manifests) beyond what a schema can say, and must refuse such requests.
        .args(["--checks", "all", "--exclude-checks", "positive_data_acceptance"])
        // The dashboard's event stream never ends (a request to it can only time out).
        .args(["--exclude-path", "/v1/watch"])
        .args(["--max-time", &secs, "--workers", "2", "--request-timeout", "20"])
        .args(["--suppress-health-check", "all", "--no-color"])
        .env("SCHEMATHESIS_HOOKS", "")
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: String = report
        .lines()
        .skip_while(|l| !l.contains("SUMMARY"))
        .collect::<Vec<_>>()
        .join("\n");
    eprintln!("{summary}");
    assert!(out.status.success(), "schemathesis found problems:\n{report}");
    // The hub survived all of it.
    hub.json(&["get", "nodes"]);
    let log = std::fs::read_to_string(hub.dir.join("hub.log")).unwrap_or_default();
    assert!(!log.contains("panicked"), "the hub panicked:\n{log}");
}
