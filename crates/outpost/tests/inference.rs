//! Edge AI inference end to end (docs/inference.md), with a real model: scripts/make-digits-model.py
//! trains an MLP on scikit-learn's digits, exports it with skl2onnx and writes onnxruntime's
//! predictions for the whole test set. Real `outpost serve-model`, hub and agent processes.
//!
//! The model is built once per target dir (`CARGO_TARGET_TMPDIR/digits-model`) with the venv's
//! Python (`.venv/bin/python`, installed by scripts/test.sh, or `OUTPOST_PYTHON`).

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use common::*;
use serde_json::{json, Value};

fn python() -> PathBuf {
    let p = std::env::var_os("OUTPOST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv/bin/python")));
    assert!(
        p.exists(),
        "Python with scikit-learn/skl2onnx/onnxruntime is missing at {}: run ./scripts/test.sh (it installs them into .venv) or set OUTPOST_PYTHON",
        p.display()
    );
    p
}

/// The digits model files, built on first use (atomically: concurrent tests never see half).
fn model_dir() -> PathBuf {
    // (a new name whenever the script writes a new file: an older dir lacks it)
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("digits-model-4");
    if dir.join("digits-v4-wide.onnx").exists() {
        return dir;
    }
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("digits-model.{}", std::process::id()));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/make-digits-model.py");
    let out = Command::new(python()).arg(script).arg(&tmp).output().unwrap();
    assert!(
        out.status.success(),
        "make-digits-model.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another test built it first.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    assert!(dir.join("digits-v4-wide.onnx").exists());
    dir
}

/// One HTTP/1.1 request on a fresh connection: (status, body).
fn http(port: u16, method: &str, path: &str, body: &[u8]) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).ok()?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).ok()?;
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

fn post_json(port: u16, path: &str, v: &Value) -> (u16, Value) {
    let (st, body) = http(port, "POST", path, v.to_string().as_bytes()).expect("the server answers");
    (st, serde_json::from_str(&body).unwrap_or(Value::String(body)))
}

fn b64(bytes: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The articles' request for one test input: the 64 values as little-endian float32 bytes.
fn articles_request(input: &[Value]) -> Value {
    let bytes: Vec<u8> = input
        .iter()
        .flat_map(|v| (v.as_f64().unwrap() as f32).to_le_bytes())
        .collect();
    json!({"image_base64": b64(&bytes)})
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(model: &std::path::Path, port: u16, extra: &[&str]) -> Server {
    let child = Command::new(BIN)
        .args(["serve-model", "--name", "digits", "--version", "v1", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--model")
        .arg(model)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let s = Server(child);
    wait_for("the model server to be ready", 20.0, || {
        http(port, "GET", "/v2/health/ready", b"").filter(|(st, _)| *st == 200)
    });
    s
}

#[test]
fn predictions_equal_onnxruntime_on_the_whole_test_set() {
    let dir = model_dir();
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("digits-reference.json")).unwrap()).unwrap();
    let inputs = reference["inputs"].as_array().unwrap();
    let n = inputs.len();
    assert_eq!(n, 450);
    let port = free_port();
    let _s = serve(&dir.join("digits.onnx"), port, &[]);

    let (st, meta) = http(port, "GET", "/v2/models/digits", b"").unwrap();
    assert_eq!(st, 200);
    let meta: Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(
        meta["inputs"][0],
        json!({"name": "X", "datatype": "FP32", "shape": [-1, 64]})
    );

    // The whole test set in one v2 request.
    let req = json!({"id": "all", "inputs": [{"name": "X", "datatype": "FP32", "shape": [n, 64], "data": inputs}]});
    let (st, a) = post_json(port, "/v2/models/digits/infer", &req);
    assert_eq!(st, 200, "{a}");
    assert_eq!(a["id"], "all");
    let labels = &a["outputs"][0];
    let probs = &a["outputs"][1];
    assert_eq!(
        (labels["name"].as_str(), probs["name"].as_str()),
        (Some("label"), Some("probabilities"))
    );
    assert_eq!(probs["shape"], json!([n, 10]));
    let got_probs: Vec<f64> = probs["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let mut max_diff = 0f64;
    for i in 0..n {
        assert_eq!(labels["data"][i], reference["labels"][i], "label of test item {i}");
        let want = reference["probabilities"][i].as_array().unwrap();
        let row = &got_probs[i * 10..i * 10 + 10];
        for (k, w) in want.iter().enumerate() {
            max_diff = max_diff.max((row[k] - w.as_f64().unwrap()).abs());
        }
        let argmax = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        assert_eq!(json!(argmax), reference["labels"][i], "argmax of test item {i}");
    }
    assert!(max_diff < 1e-5, "probabilities differ from onnxruntime's by {max_diff}");

    // The articles' request shape, unchanged: POST /infer {"image_base64"} -> {"code": 200, "pred"}.
    for i in [0, 1, 17, 449] {
        let (st, a) = post_json(port, "/infer", &articles_request(inputs[i].as_array().unwrap()));
        assert_eq!(st, 200, "{a}");
        assert_eq!(a["code"], 200);
        assert_eq!(a["pred"], reference["labels"][i], "{a}");
        assert!(a["timestamp"].as_u64().unwrap() > 1_600_000_000, "{a}");
    }

    // Bad input: 400 saying what was expected; oversized: 413; nothing breaks the server.
    let (st, a) = post_json(
        port,
        "/v2/models/digits/infer",
        &json!({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 63], "data": vec![0.0; 63]}]}),
    );
    assert_eq!(st, 400);
    assert!(a["error"].as_str().unwrap().contains("[-1, 64]"), "{a}");
    let (st, a) = post_json(
        port,
        "/v2/models/digits/infer",
        &json!({"inputs": [{"name": "X", "datatype": "INT64", "shape": [1, 64], "data": vec![0; 64]}]}),
    );
    assert_eq!(st, 400);
    assert!(a["error"].as_str().unwrap().contains("datatype INT64"), "{a}");
    let (st, a) = post_json(port, "/infer", &json!({"image_base64": b64(&[1, 2, 3])}));
    assert_eq!((st, &a["code"]), (400, &json!(400)), "{a}");
    assert!(
        a["msg"].as_str().unwrap().contains("64 raw 8-bit grayscale pixels"),
        "{a}"
    );
    let (st, _) = post_json(port, "/infer", &json!({}));
    assert_eq!(st, 400);
    let big = json!({"image_base64": "A".repeat(2 << 20)});
    let (st, body) = http(port, "POST", "/infer", big.to_string().as_bytes()).unwrap();
    assert_eq!(st, 413, "{body}");
    assert!(body.contains("at most 1048576"), "{body}");

    // Per-model metrics: requests, errors and a latency histogram.
    let (_, m) = http(port, "GET", "/metrics", b"").unwrap();
    assert!(
        m.contains("outpost_inference_requests_total{model=\"digits\",version=\"v1\"} 10"),
        "{m}"
    );
    assert!(
        m.contains("outpost_inference_errors_total{model=\"digits\",version=\"v1\"} 5"),
        "{m}"
    );
    assert!(
        m.contains("outpost_inference_latency_seconds_count{model=\"digits\",version=\"v1\"} 10"),
        "{m}"
    );
}

#[test]
fn a_model_that_does_not_load_says_why() {
    let dir = model_dir();
    let run = |model: &std::path::Path| {
        Command::new(BIN)
            .args(["serve-model", "--listen", "127.0.0.1:0", "--model"])
            .arg(model)
            .output()
            .unwrap()
    };
    let o = run(&dir.join("digits-v3-broken.onnx"));
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("operator(s) FrobnicateV9"), "{e}");
    let o = run(&dir.join("digits-reference.json"));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("is not a valid ONNX model"), "{e}");
}

fn model_deployment(image: &str, port: u16) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: digits}}\nspec:\n  replicas: 1\n  minReadySeconds: 1\n  template:\n    spec:\n      runtimeClassName: onnx\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: model\n        image: {image}\n        ports: [{{containerPort: {port}}}]\n"
    )
}

fn rollout_state(hub: &Hub, node: &str, key: &str) -> Option<(String, u64, u64, Value)> {
    let p = hub.placement(node, key)?;
    let s = p.get("status")?;
    let r = s.get("rollout")?;
    Some((
        r["state"].as_str()?.to_string(),
        r["target_revision"].as_u64()?,
        s["revision"].as_u64()?,
        p.clone(),
    ))
}

fn wait_rollout(hub: &Hub, key: &str, state: &str, target: u64, secs: f64) -> Value {
    wait_for(&format!("{key}: {state} at revision {target}"), secs, || {
        let (s, t, _, p) = rollout_state(hub, "edge", key)?;
        (s == state && t == target).then_some(p)
    })
}

#[test]
fn push_serve_roll_out_v2_and_roll_back_a_broken_v3() {
    let dir = model_dir();
    let hub = Hub::start();
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("digits-reference.json")).unwrap()).unwrap();
    let x0 = reference["inputs"][0].as_array().unwrap().clone();

    // Push: a file that is not ONNX is refused with the reason, and nothing is stored.
    let e = hub.cli_err(&[
        "model",
        "push",
        dir.join("digits-reference.json").to_str().unwrap(),
        "--name",
        "digits:bad",
    ]);
    assert!(e.contains("is not an ONNX model"), "{e}");
    let v1 = dir.join("digits.onnx");
    let v2 = dir.join("digits-v2.onnx");
    let v3 = dir.join("digits-v3-broken.onnx");
    let out = hub.cli(&["model", "push", v1.to_str().unwrap(), "--name", "digits:v1"]);
    assert!(out.contains("pushed model digits:v1 (sha256:"), "{out}");
    hub.cli(&["model", "push", v2.to_str().unwrap(), "--name", "digits:v2"]);
    hub.cli(&["model", "push", v3.to_str().unwrap(), "--name", "digits:v3"]);
    let ls = hub.cli(&["model", "ls"]);
    assert!(
        ls.contains("digits:v1") && ls.contains("digits:v2") && ls.contains("digits:v3"),
        "{ls}"
    );

    let t = hub.token(&[]);
    let _a = hub.join("edge", &t).running();
    let key = "deployment/default/digits";
    let port = free_port();
    let version = || -> Option<String> {
        let (st, b) = http(port, "GET", "/v2/models/digits", b"")?;
        let v: Value = serde_json::from_str(&b).ok()?;
        (st == 200).then(|| v["versions"][0].as_str().unwrap_or("").to_string())
    };
    let pred = || -> Option<Value> {
        let (st, a) = post_json(port, "/infer", &articles_request(&x0));
        (st == 200).then(|| a["pred"].clone())
    };

    // v1: fetched from the hub over the node's link, loaded, Ready, answering.
    hub.apply(&model_deployment("digits:v1", port));
    wait_rollout(&hub, key, "Complete", 1, 60.0);
    assert_eq!(version().as_deref(), Some("v1"));
    assert_eq!(pred(), Some(reference["labels"][0].clone()));

    // v2 rolls out like any revision.
    hub.apply(&model_deployment("digits:v2", port));
    wait_rollout(&hub, key, "Complete", 2, 60.0);
    assert_eq!(version().as_deref(), Some("v2"));
    assert_eq!(pred(), Some(reference["labels"][0].clone()));

    // v3 does not load (an operator nobody implements): rolled back to v2 on the node by the
    // health gate, with the reason, and v2 answers again.
    hub.apply(&model_deployment("digits:v3", port));
    let p = wait_rollout(&hub, key, "RolledBack", 3, 90.0);
    let reason = p["status"]["rollout"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("FrobnicateV9"), "the rollback names the operator: {p}");
    assert_eq!(p["status"]["revision"], 2, "{p}");
    wait_for("v2 answering again", 30.0, || {
        (version().as_deref() == Some("v2")).then_some(())
    });
    assert_eq!(pred(), Some(reference["labels"][0].clone()));
}

#[test]
fn a_pipeline_model_stage_forwards_only_predictions_and_unsure_ones_as_anomalies() {
    let dir = model_dir();
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("digits-reference.json")).unwrap()).unwrap();
    let hub = Hub::start();
    hub.cli(&[
        "model",
        "push",
        dir.join("digits.onnx").to_str().unwrap(),
        "--name",
        "digits:v1",
    ]);
    let t = hub.token(&["--labels", "site=a"]);
    let mut a = hub.join("edge", &t);
    a.env.push(("OUTPOST_INGEST_LISTEN".into(), "127.0.0.1:0".into()));
    a.env.push(("OUTPOST_MQTT_LISTEN".into(), "127.0.0.1:0".into()));
    let a = a.running();
    let port = free_port();
    hub.apply(&model_deployment("digits:v1", port));
    wait_rollout(&hub, "deployment/default/digits", "Complete", 1, 60.0);
    hub.apply(&format!(
        "apiVersion: outpost.dev/v1
kind: Pipeline
metadata: {{name: cameras}}
spec:
  nodeSelector: {{site: a}}
  streams:
  - name: digits
    mqtt: ['cameras/+/features']
    infer: {{model: digits, port: {port}, input: features, keep: [camera, i]}}
    anomalies:
    - {{name: unsure, field: confidence, below: 0.9}}
    sinks: [hub]
  sinks:
  - {{name: hub, type: hub, retention: 1d}}
"
    ));
    let listen = a.dir.join("pipeline/listen.json");
    let ingest = wait_for("pipeline listeners", 20.0, || {
        let m: Value = serde_json::from_str(&std::fs::read_to_string(&listen).ok()?).ok()?;
        m["ingest"].as_str().map(String::from)
    });
    let ingest_port: u16 = ingest.rsplit(':').next().unwrap().parse().unwrap();
    wait_for("stream digits running", 30.0, || {
        let (st, b) = http(ingest_port, "GET", "/v1/stats", b"")?;
        (st == 200 && b.contains("\"digits\"")).then_some(())
    });

    // Every test image as a camera's feature vector, newline-delimited, in one request.
    let inputs = reference["inputs"].as_array().unwrap();
    let body: String = inputs
        .iter()
        .enumerate()
        .map(|(i, x)| json!({"camera": format!("cam-{}", i % 3), "i": i, "features": x}).to_string() + "\n")
        .collect();
    let (st, answer) = http(ingest_port, "POST", "/v1/streams/digits", body.as_bytes()).unwrap();
    assert_eq!(st, 200, "{answer}");
    assert!(answer.contains("\"accepted\":450"), "{answer}");
    // A record without features is refused with the reason, and nothing of it goes upstream.
    let (st, answer) = http(ingest_port, "POST", "/v1/streams/digits", br#"{"camera": "cam-9"}"#).unwrap();
    assert_ne!(st, 200);
    assert!(answer.contains("no feature vector"), "{answer}");
    // Over MQTT (QoS 1) such a record is acknowledged and dropped: refusing the PUBACK would
    // make the client send it again forever.
    let mqtt = wait_for("the MQTT listener", 20.0, || {
        let m: Value = serde_json::from_str(&std::fs::read_to_string(&listen).ok()?).ok()?;
        m["mqtt"].as_str().map(String::from)
    });
    let out = Command::new("timeout")
        .args([
            "10",
            "mosquitto_pub",
            "-h",
            "127.0.0.1",
            "-p",
            mqtt.rsplit(':').next().unwrap(),
        ])
        .args([
            "-q",
            "1",
            "-t",
            "cameras/cam-9/features",
            "-m",
            r#"{"camera": "cam-9"}"#,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the PUBACK came: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let got = wait_for("450 predictions at the hub", 60.0, || {
        let r = stored_records(&hub, "digits");
        (r.len() >= 450).then_some(r)
    });
    assert_eq!(got.len(), 450, "nothing of the refused records went upstream");
    let mut upstream = 0usize;
    let mut unsure = 0;
    for r in &got {
        let d = &r["data"];
        let i = d["i"].as_u64().unwrap() as usize;
        assert_eq!(d["pred"], reference["labels"][i], "prediction of image {i}: {r}");
        assert!(d.get("features").is_none(), "only predictions go upstream: {r}");
        assert_eq!(d["camera"], format!("cam-{}", i % 3));
        let confidence = d["confidence"].as_f64().unwrap();
        let want_kind = if confidence < 0.9 { "anomaly" } else { "record" };
        assert_eq!(r["kind"], want_kind, "{r}");
        unsure += (confidence < 0.9) as usize;
        upstream += d.to_string().len();
    }
    assert!(
        unsure > 0 && unsure < 45,
        "a few unsure predictions are anomalies: {unsure}"
    );
    // The stream's spool (what the sinks send) against what came in.
    let (_, stats) = http(ingest_port, "GET", "/v1/stats", b"").unwrap();
    let stats: Value = serde_json::from_str(&stats).unwrap();
    let s = stats["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stream"] == "digits")
        .unwrap()
        .clone();
    let written = s["written_bytes"].as_u64().unwrap() as usize;
    eprintln!(
        "model stage: {} bytes in, {upstream} bytes of predictions, {written} bytes spooled for upstream ({:.1} %)",
        body.len(),
        100.0 * written as f64 / body.len() as f64
    );
    // 64 features (~350 B of JSON) in, a prediction (~80 B) out: measured 23 % and, with the
    // spool's entry headers, 46 %.
    assert!(
        upstream * 4 < body.len(),
        "predictions {upstream} B vs {} B in",
        body.len()
    );
    assert!(written * 2 < body.len(), "spooled {written} B vs {} B in", body.len());
}

/// Sends the articles' request for `input` to `port` every 20 ms (about 50 per second, a
/// camera's pace) until dropped; answers and refused connections are ignored (what is
/// counted is the model server's business). Returns (ok, failed) answers when stopped.
struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<(u64, u64)>>,
}

impl Traffic {
    fn start(port: u16, bodies: Vec<Value>) -> Traffic {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, 0);
            let mut i = 0;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let b = bodies[i % bodies.len()].to_string();
                i += 1;
                match http(port, "POST", "/infer", b.as_bytes()) {
                    Some((200, _)) => ok += 1,
                    Some(_) => failed += 1,
                    None => {}
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            (ok, failed)
        });
        Traffic {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> (u64, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn find_alert(hub: &Hub, node: &str, name: &str, state: &str) -> Option<Value> {
    hub.json(&["get", "alerts"])
        .as_array()?
        .iter()
        .find(|a| a["node"] == node && a["name"] == name && a["state"] == state)
        .cloned()
}

/// The model server's counters reach the node's vitals and alert rules (the articles' "alert
/// when inference latency is over 50 ms", here with thresholds a healthy model breaches) and
/// the hub's `/metrics` per node and model, which promtool accepts.
#[test]
fn model_figures_reach_node_alert_rules_and_the_hub_metrics() {
    let dir = model_dir();
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("digits-reference.json")).unwrap()).unwrap();
    let hub = Hub::start_with(&[], &[("OUTPOST_ALERT_EVAL_MS", "200")]);
    hub.cli(&[
        "model",
        "push",
        dir.join("digits.onnx").to_str().unwrap(),
        "--name",
        "digits:v1",
    ]);
    let mut a = hub.join("edge", &hub.token(&["--labels", "site=s1"]));
    for (k, v) in [
        ("OUTPOST_VITALS_INTERVAL_MS", "300"),
        ("OUTPOST_VITALS_REPORT_SECS", "1"),
        ("OUTPOST_MODEL_STATS_MS", "200"),
    ] {
        a.env.push((k.into(), v.into()));
    }
    let _a = a.running();
    // p99 above 1 us (every real request takes longer) and more than 10 % failed requests
    hub.apply(
        "apiVersion: outpost.dev/v1\nkind: AlertPolicy\nmetadata: {name: models}\nspec:\n  inferenceLatency: {above: 0.001, for: 1s}\n  inferenceErrors: {above: 10}\n",
    );
    let port = free_port();
    hub.apply(&model_deployment("digits:v1", port));
    wait_rollout(&hub, "deployment/default/digits", "Complete", 1, 60.0);

    // one good request, one with 63 values (a 400), in turn: 50 % errors
    let x0 = reference["inputs"][0].as_array().unwrap().clone();
    let short = articles_request(&x0[..63]);
    let traffic = Traffic::start(port, vec![articles_request(&x0), short]);
    let latency = wait_for("InferenceLatencyHigh firing", 60.0, || {
        find_alert(&hub, "edge", "InferenceLatencyHigh", "Firing")
    });
    assert_eq!(latency["source"], "node", "{latency}");
    let summary = latency["summary"].as_str().unwrap_or_default();
    assert!(
        summary.contains("model digits:v1 p99 latency") && summary.contains("> 0.001 ms"),
        "{latency}"
    );
    let errors = wait_for("InferenceErrorsHigh firing", 30.0, || {
        find_alert(&hub, "edge", "InferenceErrorsHigh", "Firing")
    });
    // about half of each sampling interval's requests failed (the interval may cut the
    // alternation unevenly: 5 of 9 is 55.6 %)
    let pct: f64 = errors["summary"]
        .as_str()
        .unwrap_or_default()
        .split("failed requests ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|x| x.parse().ok())
        .unwrap_or(-1.0);
    assert!((25.0..=75.0).contains(&pct), "{errors}");

    // /metrics: per node and model, Prometheus text that promtool accepts
    let labels = [
        ("node", "edge"),
        ("site", "s1"),
        ("workload", "deployment/default/digits"),
        ("model", "digits"),
        ("version", "v1"),
    ];
    let text = wait_for("the model's counters at the hub", 30.0, || {
        let (code, text) = api_get(&hub, "/metrics");
        assert_eq!(code, 200, "{text}");
        let n = metric(&text, "outpost_inference_requests_total", &labels)?;
        (n >= 20.0).then_some(text)
    });
    let requests = metric(&text, "outpost_inference_requests_total", &labels).unwrap();
    let failed = metric(&text, "outpost_inference_errors_total", &labels).unwrap();
    assert!(
        failed >= requests / 2.0 - 1.0 && failed <= requests / 2.0 + 1.0,
        "{requests} requests, {failed} errors:\n{text}"
    );
    let count = metric(&text, "outpost_inference_latency_seconds_count", &labels).unwrap();
    assert_eq!(count, requests, "{text}");
    let mut inf = labels.to_vec();
    inf.push(("le", "+Inf"));
    assert_eq!(
        metric(&text, "outpost_inference_latency_seconds_bucket", &inf),
        Some(requests)
    );
    let p99 = metric(&text, "outpost_inference_p99_seconds", &labels).unwrap();
    assert!(
        p99 > 0.0 && p99 < 0.05,
        "a digits request takes well under 50 ms: {p99}"
    );
    assert!(
        metric(&text, "outpost_alerts_firing", &[("alertname", "InferenceLatencyHigh")]).is_some(),
        "{text}"
    );
    promtool_accepts(&text);

    // no request in an interval: the node resolves both
    let (ok, bad) = traffic.stop();
    assert!(ok > 0 && bad > 0, "{ok} {bad}");
    for name in ["InferenceLatencyHigh", "InferenceErrorsHigh"] {
        wait_for(&format!("{name} resolved"), 30.0, || {
            find_alert(&hub, "edge", name, "Resolved")
        });
    }
}

/// The model's own rollout gate: v4 loads and answers, but takes 128 features, so every
/// request of the site's 64-feature clients is refused. With `gate: {modelErrorRate: 0.05}` in
/// the RolloutPolicy the node's update gate fails it (readiness alone would pass it), rolls
/// it back to v1, which answers again, and the rollout stops as Failed.
#[test]
fn a_model_that_fails_its_requests_is_rolled_back_by_the_model_gate() {
    let dir = model_dir();
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("digits-reference.json")).unwrap()).unwrap();
    let hub = Hub::start();
    hub.cli(&[
        "model",
        "push",
        dir.join("digits.onnx").to_str().unwrap(),
        "--name",
        "digits:v1",
    ]);
    hub.cli(&[
        "model",
        "push",
        dir.join("digits-v4-wide.onnx").to_str().unwrap(),
        "--name",
        "digits:v4",
    ]);
    let mut a = hub.join("edge", &hub.token(&[]));
    a.env.push(("OUTPOST_MODEL_STATS_MS".into(), "200".into()));
    let _a = a.running();
    // bad gates are refused naming the field
    let e = hub.apply_err(
        "apiVersion: outpost.dev/v1\nkind: RolloutPolicy\nmetadata: {name: models}\nspec:\n  gate: {modelErrorRate: 5, modelP99: fast}\n",
    );
    assert!(
        e.contains("spec.gate.modelErrorRate") && e.contains("spec.gate.modelP99"),
        "{e}"
    );
    hub.apply(
        "apiVersion: outpost.dev/v1\nkind: RolloutPolicy\nmetadata: {name: models}\nspec:\n  bake: 0s\n  gate: {modelErrorRate: 0.05, modelP99: 50ms, minRequests: 20}\n",
    );
    let port = free_port();
    let key = "deployment/default/digits";
    let deployment = |image: &str| model_deployment(image, port).replace("minReadySeconds: 1", "minReadySeconds: 4");
    hub.apply(&deployment("digits:v1"));
    let x0 = reference["inputs"][0].as_array().unwrap().clone();
    let traffic = Traffic::start(port, vec![articles_request(&x0)]);
    // v1 passes its gate under traffic: no error, fast
    wait_rollout(&hub, key, "Complete", 1, 60.0);

    hub.apply(&deployment("digits:v4"));
    let p = wait_rollout(&hub, key, "RolledBack", 2, 90.0);
    let reason = p["status"]["rollout"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("model digits:v4")
            && reason.contains("requests failed")
            && reason.contains("modelErrorRate 0.05"),
        "the rollback says why: {p}"
    );
    assert_eq!(p["status"]["revision"], 1, "{p}");
    let pred = || -> Option<Value> {
        let (st, a) = post_json(port, "/infer", &articles_request(&x0));
        (st == 200).then(|| a["pred"].clone())
    };
    wait_for("v1 answering again", 30.0, &pred);
    assert_eq!(pred(), Some(reference["labels"][0].clone()));
    let r = wait_for("the rollout stopped as Failed", 30.0, || {
        let r = hub.json(&["rollout", "status", "digits"]);
        (r["phase"] == "Failed").then_some(r)
    });
    assert_eq!(r["revision"], 2, "{r}");
    let (ok, failed) = traffic.stop();
    assert!(
        ok > 20 && failed > 20,
        "v1 answered and v4 refused: {ok} ok, {failed} failed"
    );
}

/// A PNG in the articles' request is preprocessed as their app does with PIL:
/// `Image.open(...).convert('L').resize((w, h))` (bicubic by default, antialiased when
/// shrinking), pixel for pixel, for color and grayscale images shrunk, enlarged and kept.
#[test]
fn png_preprocessing_equals_pil_pixel_for_pixel() {
    let script = r#"
import base64, io, json, random, sys
from PIL import Image
random.seed(7)
cases = []
for mode, (w, h), (ow, oh) in [("RGB", (37, 23), (8, 8)), ("L", (5, 7), (8, 8)), ("RGBA", (64, 64), (28, 28)),
                               ("L", (28, 28), (28, 28)), ("RGB", (300, 200), (8, 8)), ("LA", (40, 9), (28, 28))]:
    n = len(mode)
    im = Image.frombytes(mode, (w, h), bytes(random.randrange(256) for _ in range(w * h * n)))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    ref = Image.open(io.BytesIO(buf.getvalue())).convert("L").resize((ow, oh))
    cases.append({"png": base64.b64encode(buf.getvalue()).decode(), "side": [oh, ow], "pixels": list(ref.tobytes()), "what": f"{mode} {w}x{h} -> {ow}x{oh}"})
json.dump(cases, sys.stdout)
"#;
    let out = Command::new(python()).args(["-c", script]).output().unwrap();
    assert!(
        out.status.success(),
        "the PIL reference failed (scripts/test.sh installs Pillow into .venv): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cases: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cases.len(), 6);
    for c in &cases {
        let (h, w) = (c["side"][0].as_i64().unwrap(), c["side"][1].as_i64().unwrap());
        let input = outpost_agent::inference::TensorMeta {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![-1, 1, h, w],
        };
        let got: Vec<u8> = outpost_agent::inference::decode_image(c["png"].as_str().unwrap(), &input)
            .unwrap()
            .iter()
            .map(|v| (v * 255.0).round() as u8)
            .collect();
        let want: Vec<u8> = c["pixels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(got, want, "{}", c["what"]);
    }
}
