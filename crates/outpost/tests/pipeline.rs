//! The edge data pipeline end to end (issue 11): a real hub and agent processes on loopback,
//! real `mosquitto_pub`/`mosquitto_sub` against the agent's MQTT broker, a real `nats-server`
//! with JetStream started by the test, `kill -9` of the agent mid-stream, hub and NATS outages,
//! spool budgets and a spool corrupted by hand.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// An agent with its pipeline listeners on free loopback ports.
fn pipeline_agent(hub: &Hub, name: &str, labels: &str, extra_env: &[(&str, &str)]) -> Agent {
    let tok = hub.token(&["--labels", labels]);
    let mut a = hub.join(name, &tok);
    a.env.push(("OUTPOST_MQTT_LISTEN".into(), "127.0.0.1:0".into()));
    a.env.push(("OUTPOST_INGEST_LISTEN".into(), "127.0.0.1:0".into()));
    for (k, v) in extra_env {
        a.env.push((k.to_string(), v.to_string()));
    }
    a.running()
}

/// The addresses the agent bound (`pipeline/listen.json`), once written by this run.
fn listen(a: &Agent) -> BTreeMap<String, String> {
    let p = a.dir.join("pipeline/listen.json");
    wait_for("pipeline listeners", 20.0, || {
        let t = std::fs::read_to_string(&p).ok()?;
        let m: BTreeMap<String, String> = serde_json::from_str(&t).ok()?;
        (m.contains_key("mqtt") && m.contains_key("ingest")).then_some(m)
    })
}

/// Restart after a kill: forget the old ports first.
fn restart(a: &mut Agent) -> BTreeMap<String, String> {
    let _ = std::fs::remove_file(a.dir.join("pipeline/listen.json"));
    a.start();
    listen(a)
}

/// A tiny HTTP/1.1 client: (status, body).
fn http(addr: &str, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or_default();
    Ok((status, body))
}

fn stats(addrs: &BTreeMap<String, String>, stream: &str) -> Option<Value> {
    let (code, body) = http(&addrs["ingest"], "GET", "/v1/stats", "").ok()?;
    if code != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&body).ok()?;
    v["streams"].as_array()?.iter().find(|s| s["stream"] == stream).cloned()
}

fn wait_stream(addrs: &BTreeMap<String, String>, stream: &str) {
    wait_for(&format!("stream {stream} running"), 30.0, || stats(addrs, stream));
}

const HUB_SINK: &str = "  sinks:\n  - {name: hub, type: hub, retention: 1d}\n";

/// A raw MQTT 3.1.1 client: publishes at QoS 1 and tells which messages were acknowledged.
struct Mqtt {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Mqtt {
    fn connect(addr: &str, id: &str) -> std::io::Result<Mqtt> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_nodelay(true)?;
        let mut vh = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
        vh.extend_from_slice(&(id.len() as u16).to_be_bytes());
        vh.extend_from_slice(id.as_bytes());
        let mut p = vec![0x10];
        p.extend(remaining(vh.len()));
        p.extend(vh);
        s.write_all(&p)?;
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack)?;
        if ack != [0x20, 2, 0, 0] {
            return Err(std::io::Error::other(format!("CONNACK {ack:?}")));
        }
        Ok(Mqtt { s, buf: Vec::new() })
    }

    fn publish(&mut self, topic: &str, payload: &[u8], pkid: u16) -> std::io::Result<()> {
        let mut vh = Vec::new();
        vh.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        vh.extend_from_slice(topic.as_bytes());
        vh.extend_from_slice(&pkid.to_be_bytes());
        vh.extend_from_slice(payload);
        let mut p = vec![0x32];
        p.extend(remaining(vh.len()));
        p.extend(vh);
        self.s.write_all(&p)
    }

    /// The next PUBACK's packet id.
    fn puback(&mut self) -> std::io::Result<u16> {
        while self.buf.len() < 4 {
            let mut b = [0u8; 4096];
            let n = self.s.read(&mut b)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&b[..n]);
        }
        let p: Vec<u8> = self.buf.drain(..4).collect();
        assert_eq!(p[0], 0x40, "expected PUBACK, got {p:?}");
        Ok(u16::from_be_bytes([p[2], p[3]]))
    }
}

fn remaining(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}

#[test]
fn bad_pipelines_are_rejected_at_apply_with_the_field_named() {
    let hub = Hub::start();
    let good = format!(
        "apiVersion: outpost.dev/v1\nkind: Pipeline\nmetadata: {{name: p}}\nspec:\n  streams:\n  - name: s\n    filter: 'temp > 1'\n    sinks: [hub]\n{HUB_SINK}"
    );
    for (from, to, want) in [
        (
            "    filter:",
            "    colour: red\n    filter:",
            "spec.streams[0].colour: unknown field `colour`",
        ),
        (
            "'temp > 1'",
            "'temp >'",
            "spec.streams[0].filter: \"temp >\" does not parse",
        ),
        (
            "sinks: [hub]",
            "sinks: [warehouse]",
            "spec.streams[0].sinks[0]: no sink named \"warehouse\"",
        ),
    ] {
        let bad = good.replacen(from, to, 1);
        let err = hub.apply_err(&bad);
        assert!(err.contains(want), "want {want}\ngot {err}");
        assert!(err.contains("nothing was applied"), "{err}");
    }
    assert!(hub.try_cli(&["get", "nodes"]).status.success());
    let out = hub.apply(&good);
    assert!(out.contains("created"), "{out}");
}

#[test]
fn mqtt_and_http_records_reach_the_hub_once_with_every_anomaly_exact() {
    let hub = Hub::start();
    let mut agent = pipeline_agent(&hub, "edge-1", "site=a", &[]);
    let m = marker();
    // A workload that records where it is told to publish.
    hub.apply(&format!(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: env-{m}}}\nspec:\n  template:\n    spec:\n      runtimeClassName: process\n      containers:\n      - name: main\n        image: 'x:1'\n        command: [/bin/sh, -c, 'echo \"$OUTPOST_MQTT_URL $OUTPOST_INGEST_URL\" > env.txt; exec sleep {m}']\n"
    ));
    hub.apply(&format!(
        "apiVersion: outpost.dev/v1
kind: Pipeline
metadata: {{name: sensors}}
spec:
  nodeSelector: {{site: a}}
  streams:
  - name: temps
    mqtt: ['sensors/+/temp']
    key: $topic
    filter: 'exists(t)'
    anomalies:
    - {{name: hot, field: t, above: 80}}
    aggregate: {{count: 10, fields: [t]}}
    sinks: [hub]
  - name: results
    anomalies:
    - {{name: failed, when: 'status != 200', alert: true}}
    sinks: [hub]
{HUB_SINK}"
    ));
    let addrs = listen(&agent);
    wait_stream(&addrs, "temps");
    wait_stream(&addrs, "results");

    // A subscriber on the agent's broker sees what is published (and the retained message).
    let mut sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", addrs["mqtt"].rsplit(':').next().unwrap()])
        .args(["-t", "sensors/#", "-q", "1", "-v", "-C", "21"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let port = addrs["mqtt"].rsplit(':').next().unwrap().to_string();
    let publish = |topic: &str, msg: &str, retain: bool| {
        let mut c = Command::new("mosquitto_pub");
        c.args(["-h", "127.0.0.1", "-p", &port, "-q", "1", "-t", topic, "-m", msg]);
        if retain {
            c.arg("-r");
        }
        let o = c.output().unwrap();
        assert!(
            o.status.success(),
            "mosquitto_pub: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    std::thread::sleep(Duration::from_millis(300));
    // 20 readings on two sensors; 3 are hot.
    for i in 0..20 {
        let t = if [4, 11, 17].contains(&i) { 90 + i } else { 20 + i % 5 };
        publish(
            &format!("sensors/s{}/temp", i % 2),
            &format!("{{\"t\": {t}, \"i\": {i}}}"),
            false,
        );
    }
    publish("sensors/s0/temp", "{\"note\": \"no t: filtered\"}", true);
    let out = wait_for("mosquitto_sub got every message", 20.0, || {
        sub.try_wait().unwrap().map(|_| {
            let mut s = String::new();
            sub.stdout.take().unwrap().read_to_string(&mut s).unwrap();
            s
        })
    });
    assert_eq!(out.lines().count(), 21, "{out}");
    // A late subscriber gets the retained message.
    let o = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-t", "sensors/#", "-C", "1", "-W", "5"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("no t: filtered"));

    // HTTP: an object, an array and NDJSON.
    let ingest = &addrs["ingest"];
    let (code, body) = http(ingest, "POST", "/v1/streams/results", r#"{"status": 200, "n": 0}"#).unwrap();
    assert_eq!((code, body.as_str()), (200, r#"{"accepted":1}"#));
    let (code, _) = http(
        ingest,
        "POST",
        "/v1/streams/results",
        r#"[{"status": 500, "n": 1}, {"status": 200, "n": 2}]"#,
    )
    .unwrap();
    assert_eq!(code, 200);
    let (code, _) = http(
        ingest,
        "POST",
        "/v1/streams/results",
        "{\"status\": 404, \"n\": 3}\n{\"status\": 200, \"n\": 4}\n",
    )
    .unwrap();
    assert_eq!(code, 200);
    let (code, body) = http(ingest, "POST", "/v1/streams/nope", "{}").unwrap();
    assert_eq!(code, 404);
    assert!(body.contains("streams here: results, temps"), "{body}");
    let (code, body) = http(ingest, "POST", "/v1/streams/results", "{broken").unwrap();
    assert_eq!(code, 400, "{body}");

    // At the hub: the hot readings exactly as published, and two windows of 10 normal readings
    // per... (17 normal readings on two keys: s0 has 9, s1 has 8: no full window yet).
    let temps = wait_for("anomalies at the hub", 30.0, || {
        let r = stored_records(&hub, "temps");
        (r.len() >= 3).then_some(r)
    });
    let hot: Vec<i64> = temps
        .iter()
        .filter(|r| r["kind"] == "anomaly")
        .map(|r| r["data"]["i"].as_i64().unwrap())
        .collect();
    assert_eq!(hot, vec![4, 11, 17]);
    assert!(temps.iter().all(|r| r["kind"] != "aggregate"), "{temps:?}");
    for i in 20..23 {
        publish("sensors/s1/temp", &format!("{{\"t\": 25, \"i\": {i}}}"), false);
    }
    let agg = wait_for("a count window of 10 at the hub", 30.0, || {
        stored_records(&hub, "temps")
            .into_iter()
            .find(|r| r["kind"] == "aggregate")
    });
    assert_eq!(agg["key"], "sensors/s1/temp");
    assert_eq!(agg["data"]["records"], 10);
    assert_eq!(agg["data"]["fields"]["t"]["count"], 10);

    let results = wait_for("results at the hub", 30.0, || {
        let r = stored_records(&hub, "results");
        (r.len() >= 5).then_some(r)
    });
    let kinds: Vec<(i64, String)> = results
        .iter()
        .map(|r| {
            (
                r["data"]["n"].as_i64().unwrap(),
                r["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            (0, "record".into()),
            (1, "anomaly".into()),
            (2, "record".into()),
            (3, "anomaly".into()),
            (4, "record".into())
        ]
    );
    // The rule with `alert: true` raised a node alert (the path webhooks follow).
    let alert = wait_for("DataAnomaly alert", 30.0, || {
        let a = hub.json(&["get", "alerts"]);
        a.as_array()?.iter().find(|x| x["name"] == "DataAnomaly").cloned()
    });
    assert_eq!(alert["subject"], "results/failed");
    assert!(alert["summary"].as_str().unwrap().contains("\"status\":500"), "{alert}");
    // `outpost get pipelines` shows which nodes run it.
    let pl = hub.cli(&["get", "pipelines"]);
    assert!(
        pl.contains("sensors") && pl.contains("temps,results") && pl.contains("hub (hub)"),
        "{pl}"
    );
    let plj: Value = serde_json::from_str(&hub.cli(&["get", "pipelines", "-o", "json"])).unwrap();
    assert_eq!(plj[0]["nodes"], json!(["edge-1"]));
    // `outpost data tail` prints a table.
    let t = hub.cli(&["data", "tail", "results", "--kind", "anomaly"]);
    assert!(
        t.contains("KIND") && t.contains("failed") && t.contains("edge-1"),
        "{t}"
    );

    // Workloads were told where to publish.
    let envf = agent.dir.join(format!("workloads/daemonset_default_env-{m}/env.txt"));
    let env = wait_for("workload env file", 20.0, || std::fs::read_to_string(&envf).ok());
    assert_eq!(
        env.trim(),
        format!("mqtt://{} http://{}/v1/streams", addrs["mqtt"], addrs["ingest"])
    );
    agent.stop();
}

#[test]
fn hub_down_for_a_while_then_every_record_arrives_exactly_once() {
    let outage = std::env::var("OUTPOST_TEST_OUTAGE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20u64);
    let mut hub = Hub::start();
    let agent = pipeline_agent(&hub, "edge-1", "site=a", &[]);
    hub.apply(&format!(
        "apiVersion: outpost.dev/v1\nkind: Pipeline\nmetadata: {{name: p}}\nspec:\n  streams:\n  - name: steady\n    sinks: [hub]\n{HUB_SINK}"
    ));
    let addrs = listen(&agent);
    wait_stream(&addrs, "steady");
    let mut n = 0u64;
    let send_for = |secs: u64, n: &mut u64| {
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            let body: Vec<Value> = (0..20).map(|i| json!({"n": *n + i})).collect();
            let (code, _) = http(
                &addrs["ingest"],
                "POST",
                "/v1/streams/steady",
                &Value::Array(body).to_string(),
            )
            .unwrap();
            assert_eq!(code, 200);
            *n += 20;
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    send_for(3, &mut n);
    hub.kill();
    send_for(outage, &mut n);
    let during = n;
    hub.restart();
    send_for(3, &mut n);
    let recs = wait_for("every record at the hub", 90.0, || {
        let r = stored_records(&hub, "steady");
        (r.len() as u64 >= n).then_some(r)
    });
    let mut seen: Vec<u64> = recs.iter().map(|r| r["data"]["n"].as_u64().unwrap()).collect();
    seen.sort();
    assert_eq!(
        seen,
        (0..n).collect::<Vec<_>>(),
        "each of {n} records once ({during} sent while the hub was down)"
    );
    let st = stats(&addrs, "steady").unwrap();
    assert_eq!(st["sinks"]["hub"]["acked"], st["committed"], "{st}");
}

/// A nats-server with JetStream on free ports, its store in `dir`.
struct Nats {
    child: Child,
    port: u16,
    http: u16,
    dir: std::path::PathBuf,
}

impl Nats {
    fn start(dir: &Path, port: u16, http: u16) -> Nats {
        let child = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-m",
                &http.to_string(),
                "-sd",
            ])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (Debian package nats-server) is installed by scripts/test.sh");
        wait_for("nats-server", 20.0, || TcpStream::connect(("127.0.0.1", port)).ok());
        Nats {
            child,
            port,
            http,
            dir: dir.to_path_buf(),
        }
    }
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    fn restart(&mut self) {
        self.kill();
        *self = Nats::start(&self.dir.clone(), self.port, self.http);
    }
    /// Messages in a JetStream stream, from the monitoring endpoint.
    fn messages(&self, stream: &str) -> Option<u64> {
        let (_, body) = http(&format!("127.0.0.1:{}", self.http), "GET", "/jsz?streams=true", "").ok()?;
        let v: Value = serde_json::from_str(&body).ok()?;
        v["account_details"].as_array()?.iter().find_map(|a| {
            a["stream_detail"]
                .as_array()?
                .iter()
                .find(|s| s["name"] == stream)
                .and_then(|s| s["state"]["messages"].as_u64())
        })
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn nats_down_for_a_while_then_every_record_lands_in_jetstream_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mut nats = Nats::start(tmp.path(), free_port(), free_port());
    let hub = Hub::start();
    let agent = pipeline_agent(&hub, "edge-1", "site=a", &[]);
    hub.apply(&format!(
        "apiVersion: outpost.dev/v1\nkind: Pipeline\nmetadata: {{name: p}}\nspec:\n  streams:\n  - name: readings\n    sinks: [hq]\n  sinks:\n  - {{name: hq, type: nats, url: 'nats://127.0.0.1:{}', jetstream: OUTPOST}}\n",
        nats.port
    ));
    let addrs = listen(&agent);
    wait_stream(&addrs, "readings");
    let mut n = 0u64;
    let send = |count: u64, n: &mut u64| {
        for _ in 0..count / 10 {
            let body: Vec<Value> = (0..10).map(|i| json!({"n": *n + i})).collect();
            let (code, _) = http(
                &addrs["ingest"],
                "POST",
                "/v1/streams/readings",
                &Value::Array(body).to_string(),
            )
            .unwrap();
            assert_eq!(code, 200);
            *n += 10;
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    send(200, &mut n);
    wait_for("first records in JetStream", 30.0, || {
        nats.messages("OUTPOST").filter(|m| *m > 0)
    });
    nats.kill();
    send(500, &mut n);
    std::thread::sleep(Duration::from_secs(3));
    nats.restart();
    send(200, &mut n);
    wait_for("every record in JetStream", 60.0, || {
        let st = stats(&addrs, "readings")?;
        (st["sinks"]["hq"]["acked"] == st["committed"]).then_some(())
    });
    // Nats-Msg-Id de-duplication: exactly one message per record, even for batches sent again
    // after the outage.
    assert_eq!(nats.messages("OUTPOST"), Some(n));
}

#[test]
fn kill_9_mid_stream_loses_no_acknowledged_record_and_duplicates_none() {
    let hub = Hub::start();
    let mut agent = pipeline_agent(&hub, "edge-1", "site=a", &[]);
    hub.apply(&format!(
        "apiVersion: outpost.dev/v1\nkind: Pipeline\nmetadata: {{name: p}}\nspec:\n  streams:\n  - name: raw\n    mqtt: [m/raw]\n    sinks: [hub]\n  - name: stats\n    mqtt: [m/raw]\n    aggregate: {{count: 25, fields: ['n']}}\n    sinks: [hub]\n{HUB_SINK}"
    ));
    let mut addrs = listen(&agent);
    wait_stream(&addrs, "raw");
    wait_stream(&addrs, "stats");
    let mut acked: Vec<u64> = Vec::new();
    let mut sent = 0u64;
    let rounds = 5;
    for round in 0..rounds {
        let mut c = Mqtt::connect(&addrs["mqtt"], &format!("pub-{round}")).unwrap();
        // Publish with up to 50 in flight; kill -9 the agent at a pseudo-random point.
        let kill_at = 150 + (round * 97) % 200;
        let mut inflight: std::collections::VecDeque<(u16, u64)> = Default::default();
        for i in 0..400u64 {
            if i == kill_at {
                agent.kill9();
                break;
            }
            let pkid = (i % 60000 + 1) as u16;
            if c.publish("m/raw", json!({"n": sent}).to_string().as_bytes(), pkid)
                .is_err()
            {
                break;
            }
            inflight.push_back((pkid, sent));
            sent += 1;
            while inflight.len() >= 50 {
                let id = c.puback().unwrap();
                let (p, n) = inflight.pop_front().unwrap();
                assert_eq!(id, p, "PUBACKs come in order");
                acked.push(n);
            }
        }
        // Whatever was acknowledged before the kill counts; the rest may or may not be there.
        while let Ok(id) = c.puback() {
            let (p, n) = inflight.pop_front().unwrap();
            assert_eq!(id, p);
            acked.push(n);
        }
        agent.kill9();
        addrs = restart(&mut agent);
        wait_stream(&addrs, "raw");
    }
    assert!(acked.len() > 500, "only {} acknowledged", acked.len());
    let recs = wait_for("every acknowledged record at the hub", 60.0, || {
        let r = stored_records(&hub, "raw");
        let have: std::collections::BTreeSet<u64> = r.iter().map(|x| x["data"]["n"].as_u64().unwrap()).collect();
        let missing: Vec<&u64> = acked.iter().filter(|n| !have.contains(n)).collect();
        if !missing.is_empty() {
            let near: Vec<(u64, String)> = r
                .iter()
                .map(|x| {
                    (
                        x["data"]["n"].as_u64().unwrap(),
                        x["id"].as_str().unwrap_or("").to_string(),
                    )
                })
                .filter(|(n, _)| missing[0].saturating_sub(5) <= *n && *n < missing[0] + 15)
                .collect();
            eprintln!(
                "{} acknowledged records missing, first {:?}; near: {near:?}",
                missing.len(),
                &missing[..missing.len().min(5)]
            );
            let d = agent.dir.join("spool/default.p.raw");
            let mut files: Vec<String> = std::fs::read_dir(&d)
                .unwrap()
                .flatten()
                .map(|e| format!("{:?} {}", e.file_name(), e.metadata().map(|m| m.len()).unwrap_or(0)))
                .collect();
            files.sort();
            eprintln!(
                "spool: {files:?} cursor {:?}",
                std::fs::read_to_string(d.join("cursor-hub"))
            );
        }
        missing.is_empty().then_some(r)
    });
    let mut ns: Vec<u64> = recs.iter().map(|x| x["data"]["n"].as_u64().unwrap()).collect();
    let total = ns.len();
    ns.sort();
    ns.dedup();
    assert_eq!(ns.len(), total, "no record stored twice");
    assert!(ns.iter().all(|n| *n < sent));
    // The aggregate stream survived the kills through its checkpoints: no record counted twice.
    // Each stream has its own spool and a record is acknowledged only once every stream holds
    // it, so an unacknowledged record may be counted by `stats` and missing from `raw`: the
    // upper bound is what was published, not what `raw` stored. Records arrive in the order of
    // `n` (also when replayed after a kill), so windows that never count a record twice cover
    // disjoint ranges of `n`, each no wider than its count allows.
    let mut windows: Vec<(u64, u64, u64)> = stored_records(&hub, "stats")
        .iter()
        .map(|r| {
            let d = &r["data"];
            let f = &d["fields"]["n"];
            (
                f["min"].as_f64().unwrap() as u64,
                f["max"].as_f64().unwrap() as u64,
                d["records"].as_u64().unwrap(),
            )
        })
        .collect();
    windows.sort();
    for w in windows.windows(2) {
        assert!(
            w[0].1 < w[1].0,
            "windows overlap (a record counted twice): {:?} then {:?}",
            w[0],
            w[1]
        );
    }
    for (lo, hi, n) in &windows {
        assert!(*n <= hi - lo + 1, "window [{lo}, {hi}] counted {n} records: some twice");
    }
    let counted: u64 = windows.iter().map(|w| w.2).sum();
    assert!(
        counted <= sent && counted + 25 * 2 >= acked.len() as u64 - 25,
        "windows counted {counted} of {} acknowledged ({} stored, {sent} published)",
        acked.len(),
        ns.len()
    );
}

#[test]
fn a_full_spool_follows_its_policy_raises_an_alert_and_the_node_stays_healthy() {
    let hub = Hub::start();
    let agent = pipeline_agent(&hub, "edge-1", "site=a", &[("OUTPOST_SPOOL_SEGMENT_BYTES", "8Ki")]);
    let m = marker();
    hub.apply(&sleeper_ds(&format!("keep-{m}"), &m, ""));
    // The NATS sink points at a closed port: nothing drains.
    let dead = free_port();
    hub.apply(&format!(
        "apiVersion: outpost.dev/v1\nkind: Pipeline\nmetadata: {{name: p}}\nspec:\n  streams:\n  - name: strict\n    sinks: [nowhere]\n    spool: {{maxBytes: 64Ki, whenFull: rejectNewest}}\n  - name: rolling\n    sinks: [nowhere]\n    spool: {{maxBytes: 64Ki, whenFull: dropOldest}}\n  sinks:\n  - {{name: nowhere, type: nats, url: 'nats://127.0.0.1:{dead}'}}\n"
    ));
    let addrs = listen(&agent);
    wait_stream(&addrs, "strict");
    wait_stream(&addrs, "rolling");
    let big = "x".repeat(400);
    let mut refused = 0;
    for i in 0..400 {
        let (code, body) = http(
            &addrs["ingest"],
            "POST",
            "/v1/streams/strict",
            &json!({"i": i, "pad": big}).to_string(),
        )
        .unwrap();
        if code == 507 {
            assert!(body.contains("rejectNewest"), "{body}");
            refused += 1;
        } else {
            assert_eq!(code, 200, "{body}");
        }
        let (code, body) = http(
            &addrs["ingest"],
            "POST",
            "/v1/streams/rolling",
            &json!({"i": i, "pad": big}).to_string(),
        )
        .unwrap();
        assert_eq!(code, 200, "dropOldest keeps taking records: {body}");
    }
    assert!(refused > 200, "refused {refused}");
    let strict = stats(&addrs, "strict").unwrap();
    let rolling = stats(&addrs, "rolling").unwrap();
    assert_eq!(strict["rejected"], refused, "{strict}");
    assert!(strict["spool_bytes"].as_u64().unwrap() <= 64 * 1024, "{strict}");
    assert!(rolling["dropped_entries"].as_u64().unwrap() > 100, "{rolling}");
    assert!(rolling["spool_bytes"].as_u64().unwrap() <= 64 * 1024, "{rolling}");
    // The alert reaches the hub, one per stream.
    let alerts = wait_for("PipelineSpoolFull alerts", 30.0, || {
        let a = hub.json(&["get", "alerts"]);
        let firing: Vec<String> = a
            .as_array()?
            .iter()
            .filter(|x| x["name"] == "PipelineSpoolFull" && x["state"] == "Firing")
            .map(|x| x["subject"].as_str().unwrap_or("").to_string())
            .collect();
        if firing.len() != 2 {
            eprintln!("alerts: {a}\nagent log: {}", agent.log());
        }
        (firing.len() == 2).then_some(firing)
    });
    assert!(alerts.contains(&"strict".to_string()) && alerts.contains(&"rolling".to_string()));
    // The agent and its workload are fine.
    assert_eq!(http(&addrs["ingest"], "GET", "/healthz", "").unwrap().0, 200);
    wait_for("the workload still running", 20.0, || {
        (hub.phase("edge-1", &format!("daemonset/default/keep-{m}")).as_deref() == Some("Running")).then_some(())
    });
}

#[test]
fn a_spool_corrupted_by_hand_is_skipped_reported_and_the_agent_goes_on() {
    let mut hub = Hub::start();
    let mut agent = pipeline_agent(&hub, "edge-1", "site=a", &[("OUTPOST_SPOOL_SEGMENT_BYTES", "4Ki")]);
    hub.apply(&format!(
        "apiVersion: outpost.dev/v1\nkind: Pipeline\nmetadata: {{name: p}}\nspec:\n  streams:\n  - name: s\n    sinks: [hub]\n{HUB_SINK}"
    ));
    let addrs = listen(&agent);
    wait_stream(&addrs, "s");
    // With the hub down, records stay in the spool.
    hub.kill();
    for i in 0..60 {
        let (code, _) = http(
            &addrs["ingest"],
            "POST",
            "/v1/streams/s",
            &json!({"i": i, "pad": "y".repeat(200)}).to_string(),
        )
        .unwrap();
        assert_eq!(code, 200);
    }
    agent.kill9();
    // Flip bytes in the middle of the second segment.
    let dir = agent.dir.join("spool/default.p.s");
    let mut segs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segs.sort();
    assert!(segs.len() >= 3, "{segs:?}");
    let mut bytes = std::fs::read(&segs[1]).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 16] {
        *b ^= 0x5a;
    }
    std::fs::write(&segs[1], &bytes).unwrap();
    hub.restart();
    let addrs = restart(&mut agent);
    wait_stream(&addrs, "s");
    let (code, _) = http(
        &addrs["ingest"],
        "POST",
        "/v1/streams/s",
        &json!({"i": 1000}).to_string(),
    )
    .unwrap();
    assert_eq!(code, 200, "the agent takes new records");
    let recs = wait_for("the readable records and the new one at the hub", 60.0, || {
        let r = stored_records(&hub, "s");
        r.iter().any(|x| x["data"]["i"] == 1000).then_some(r)
    });
    let got: Vec<i64> = recs.iter().map(|x| x["data"]["i"].as_i64().unwrap()).collect();
    assert!(got.len() >= 40 && got.len() < 61, "{got:?}");
    assert!(
        got.contains(&0) && got.contains(&59),
        "records before and after the damage: {got:?}"
    );
    let st = stats(&addrs, "s").unwrap();
    assert!(st["corrupt_spots"].as_u64().unwrap() >= 1, "{st}");
    assert!(
        agent.log().contains("skipped damaged entries"),
        "the agent logs what it skipped"
    );
}

#[test]
fn mqtt_5_login_and_a_site_broker_feed_the_pipeline() {
    // A site's own broker (Debian mosquitto) the agent subscribes to, as a client.
    let site_port = free_port();
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("m.conf");
    std::fs::write(&conf, format!("listener {site_port} 127.0.0.1\nallow_anonymous true\n")).unwrap();
    let site = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto (Debian package) is installed by scripts/test.sh");
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _site = Kill(site);
    wait_for("site broker", 20.0, || {
        TcpStream::connect(("127.0.0.1", site_port)).ok()
    });
    let hub = Hub::start();
    let site_addr = format!("127.0.0.1:{site_port}");
    let agent = pipeline_agent(
        &hub,
        "edge-1",
        "site=a",
        &[
            ("OUTPOST_MQTT_USERNAME", "dev"),
            ("OUTPOST_MQTT_PASSWORD", "s3cret"),
            ("OUTPOST_SITE_MQTT", &site_addr),
        ],
    );
    hub.apply(&format!(
        "apiVersion: outpost.dev/v1\nkind: Pipeline\nmetadata: {{name: p}}\nspec:\n  streams:\n  - name: plc\n    mqtt: ['plc/#']\n    sinks: [hub]\n{HUB_SINK}"
    ));
    let addrs = listen(&agent);
    wait_stream(&addrs, "plc");
    let port = addrs["mqtt"].rsplit(':').next().unwrap().to_string();
    let publish = |extra: &[&str], msg: &str| {
        Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port, "-q", "1", "-t", "plc/line1"])
            .args(extra)
            .args(["-m", msg])
            .output()
            .unwrap()
    };
    // Without the username and password the broker refuses the client.
    let o = publish(&[], r#"{"n": 0}"#);
    assert!(!o.status.success(), "published without a login");
    // MQTT 5 and 3.1.1 clients with the login.
    let o = publish(&["-u", "dev", "-P", "s3cret", "-V", "mqttv5"], r#"{"n": 1}"#);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = publish(&["-u", "dev", "-P", "s3cret"], r#"{"n": 2}"#);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A message published on the site broker reaches the stream through the agent's subscription.
    wait_for("the agent subscribed to the site broker", 30.0, || {
        let o = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &site_port.to_string(),
                "-q",
                "1",
                "-t",
                "plc/line2",
                "-m",
                r#"{"n": 3}"#,
            ])
            .output()
            .unwrap();
        assert!(o.status.success());
        let r = stored_records(&hub, "plc");
        r.iter().any(|x| x["data"]["n"] == 3).then_some(())
    });
    let ns: BTreeMap<i64, usize> = stored_records(&hub, "plc").iter().fold(BTreeMap::new(), |mut m, x| {
        *m.entry(x["data"]["n"].as_i64().unwrap()).or_default() += 1;
        m
    });
    assert!(
        ns.contains_key(&1) && ns.contains_key(&2) && !ns.contains_key(&0),
        "{ns:?}"
    );
}

#[test]
fn listeners_opened_with_tls_refuse_plain_text_and_take_tls_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = outpost_pki::CaMaterial::generate("site").unwrap();
    let (chain, key) = ca.issue_server(&["127.0.0.1".to_string()]).unwrap();
    let (cert_f, key_f, ca_f) = (
        tmp.path().join("c.pem"),
        tmp.path().join("k.pem"),
        tmp.path().join("ca.pem"),
    );
    std::fs::write(&cert_f, chain).unwrap();
    std::fs::write(&key_f, key).unwrap();
    std::fs::write(&ca_f, &ca.cert_pem).unwrap();
    let hub = Hub::start();
    let agent = pipeline_agent(
        &hub,
        "edge-1",
        "site=a",
        &[
            ("OUTPOST_LISTEN_TLS_CERT", cert_f.to_str().unwrap()),
            ("OUTPOST_LISTEN_TLS_KEY", key_f.to_str().unwrap()),
        ],
    );
    hub.apply(&format!(
        "apiVersion: outpost.dev/v1\nkind: Pipeline\nmetadata: {{name: p}}\nspec:\n  streams:\n  - name: s\n    mqtt: [t/#]\n    sinks: [hub]\n{HUB_SINK}"
    ));
    let addrs = listen(&agent);
    let port = addrs["mqtt"].rsplit(':').next().unwrap().to_string();
    // Plain text is refused.
    assert!(http(&addrs["ingest"], "GET", "/v1/stats", "").map(|r| r.0).unwrap_or(0) != 200);
    let plain = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-q",
            "1",
            "-t",
            "t/1",
            "-m",
            "{\"n\": 0}",
        ])
        .output()
        .unwrap();
    assert!(!plain.status.success());
    // TLS clients that trust the site CA get in.
    let ingest = addrs["ingest"].clone();
    wait_for("stream s over HTTPS", 30.0, || {
        let o = Command::new("curl")
            .args([
                "-s",
                "--cacert",
                ca_f.to_str().unwrap(),
                &format!("https://{ingest}/v1/stats"),
            ])
            .output()
            .ok()?;
        String::from_utf8_lossy(&o.stdout)
            .contains("\"stream\":\"s\"")
            .then_some(())
    });
    let o = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "--cafile",
            ca_f.to_str().unwrap(),
            "-q",
            "1",
            "-t",
            "t/1",
            "-m",
            "{\"n\": 1}",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new("curl")
        .args([
            "-s",
            "--cacert",
            ca_f.to_str().unwrap(),
            "-d",
            "{\"n\": 2}",
            &format!("https://{ingest}/v1/streams/s"),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "{\"accepted\":1}");
    wait_for("both records at the hub", 30.0, || {
        (stored_records(&hub, "s").len() == 2).then_some(())
    });
}

/// Pipeline revisions roll out like workloads: canary first under a RolloutPolicy. A revision
/// one stream of which cannot start on the canary (its spool path is blocked on that node) is
/// rolled back there, where the last good revision runs again and still takes records; the
/// rollout fails and the other node is never handed it. A good revision then goes through
/// every wave.
#[test]
fn pipeline_revisions_roll_out_in_waves_and_a_bad_one_stops_at_the_canary() {
    let hub = Hub::start();
    let a = pipeline_agent(&hub, "pipe-a", "ring=canary", &[]);
    let b = pipeline_agent(&hub, "pipe-b", "ring=rest", &[]);
    hub.apply(
        "apiVersion: outpost.dev/v1\nkind: RolloutPolicy\nmetadata: {name: flow}\nspec:\n  selector: {app: flow}\n  waves:\n  - {name: canary, selector: {ring: canary}}\n  - {percent: 100}\n  bake: 1s\n  tinyFleet: 1\n",
    );
    let pipeline = |streams: &[&str]| {
        let s: String = streams
            .iter()
            .map(|s| format!("  - {{name: {s}, sinks: [hub]}}\n"))
            .collect();
        format!("apiVersion: outpost.dev/v1\nkind: Pipeline\nmetadata: {{name: flow, labels: {{app: flow}}}}\nspec:\n  streams:\n{s}{HUB_SINK}")
    };
    let status = || hub.json(&["rollout", "status", "pipeline/flow"]);
    // node -> (desired revision, running revision, state)
    let nodes = |r: &Value| -> BTreeMap<String, (u64, Option<u64>, String)> {
        r["nodes"]
            .as_array()
            .map(|ns| {
                ns.iter()
                    .map(|n| {
                        let s = n["state"].as_str().unwrap_or_default().to_string();
                        let node = n["node"].as_str().unwrap().to_string();
                        (
                            node,
                            (
                                n["desired_revision"].as_u64().unwrap(),
                                n["running_revision"].as_u64(),
                                s,
                            ),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let all_on = |rev: u64| {
        let r = status();
        let ns = nodes(&r);
        (r["phase"] == "Complete" && ns.len() == 2 && ns.values().all(|v| v.0 == rev && v.1 == Some(rev))).then_some(r)
    };

    hub.apply(&pipeline(&["s1"]));
    wait_for("revision 1 of the pipeline on both nodes", 60.0, || all_on(1));
    let (la, lb) = (listen(&a), listen(&b));
    wait_stream(&la, "s1");
    wait_stream(&lb, "s1");

    // Revision 2 adds a stream whose spool cannot be made on pipe-a (the canary).
    std::fs::create_dir_all(a.dir.join("spool")).unwrap();
    std::fs::write(a.dir.join("spool/default.flow.bad"), "in the way").unwrap();
    hub.apply(&pipeline(&["s1", "bad"]));
    let r = wait_for("the pipeline's rollout Failed", 90.0, || {
        let r = status();
        (r["phase"] == "Failed").then_some(r)
    });
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("pipe-a") && reason.contains("stream bad"),
        "the reason names the canary and the stream: {r}"
    );
    assert_eq!(nodes(&r)["pipe-b"].0, 1, "pipe-b is never handed revision 2: {r}");
    wait_for("both nodes on revision 1 again", 60.0, || {
        nodes(&status()).values().all(|v| v.1 == Some(1)).then_some(())
    });
    assert!(stats(&lb, "bad").is_none(), "pipe-b never ran the bad stream");
    // The canary runs revision 1 again: its stream takes records, and they reach the hub.
    wait_stream(&la, "s1");
    let (code, body) = http(&la["ingest"], "POST", "/v1/streams/s1", r#"{"after": "rollback"}"#).unwrap();
    assert_eq!(code, 200, "{body}");
    wait_for("the record at the hub", 30.0, || {
        stored_records(&hub, "s1")
            .iter()
            .any(|r| r["data"]["after"] == "rollback")
            .then_some(())
    });

    // A good revision 3 goes canary first, then everywhere.
    std::fs::remove_file(a.dir.join("spool/default.flow.bad")).unwrap();
    hub.apply(&pipeline(&["s1", "s2"]));
    let r = wait_for("revision 3 of the pipeline on both nodes", 90.0, || all_on(3));
    assert_eq!(r["waves"][0]["name"], "canary", "{r}");
    wait_stream(&la, "s2");
    wait_stream(&lb, "s2");
    // `outpost get pipelines` shows where each revision runs.
    let pl: Value = serde_json::from_str(&hub.cli(&["get", "pipelines", "-o", "json"])).unwrap();
    let placements = pl[0]["placements"].as_array().unwrap();
    assert_eq!(placements.len(), 2, "{pl}");
    assert!(
        placements
            .iter()
            .all(|x| x["desired_revision"] == 3 && x["running_revision"] == 3 && x["state"] == "Complete"),
        "{pl}"
    );
    let table = hub.cli(&["get", "pipelines"]);
    assert!(table.contains("UP-TO-DATE") && table.contains("2/2"), "{table}");
}
