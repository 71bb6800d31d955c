//! End-to-end tests of monitoring, alerts and logs (issue 5): real hub and agent processes,
//! short sampling intervals through the agents' and hub's environment.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Fast monitoring for test agents.
fn fast(agent: &mut Agent) {
    for (k, v) in [
        ("OUTPOST_VITALS_INTERVAL_MS", "200"),
        ("OUTPOST_VITALS_REPORT_SECS", "1"),
        ("OUTPOST_LOG_SCAN_MS", "200"),
    ] {
        agent.env.push((k.into(), v.into()));
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn alerts(hub: &Hub) -> Vec<Value> {
    hub.json(&["get", "alerts"]).as_array().cloned().unwrap_or_default()
}

fn find_alert(hub: &Hub, node: &str, name: &str, state: &str) -> Option<Value> {
    alerts(hub)
        .into_iter()
        .find(|a| a["node"] == node && a["name"] == name && a["state"] == state)
}

const BURNER: &str = "apiVersion: apps/v1
kind: DaemonSet
metadata: {name: burner}
spec:
  template:
    spec:
      runtimeClassName: process
      terminationGracePeriodSeconds: 1
      containers:
      - {name: main, image: 'burner:1', command: [/bin/sh, -c, 'while :; do :; done']}
";

fn policy(cpu: &str) -> String {
    format!(
        "apiVersion: outpost.dev/v1\nkind: AlertPolicy\nmetadata: {{name: test}}\nspec:\n  cpu: {cpu}\n  memory: {{disabled: true}}\n  disk: {{disabled: true}}\n"
    )
}

/// A real CPU burner fires NodeCpuHigh on the node (threshold from an AlertPolicy synced from
/// the hub); disabling the threshold resolves it; /metrics shows the burner and passes promtool.
#[test]
fn cpu_burner_fires_a_node_alert_and_metrics_pass_promtool() {
    let hub = Hub::start_with(&[], &[("OUTPOST_ALERT_EVAL_MS", "200")]);
    let mut a = hub.join("burn-1", &hub.token(&["--labels", "site=s1"]));
    fast(&mut a);
    a.start();
    hub.apply(&policy("{above: 25, for: 1s}"));
    hub.apply(BURNER);
    let fired = wait_for("NodeCpuHigh firing", 60.0, || {
        find_alert(&hub, "burn-1", "NodeCpuHigh", "Firing")
    });
    assert_eq!(fired["source"], "node");
    assert!(fired["summary"].as_str().unwrap().contains("> 25%"), "{fired}");

    // the burner's own CPU is measured (one full core = ratio 1)
    let text = wait_for("burner CPU in /metrics", 30.0, || {
        let (code, text) = api_get(&hub, "/metrics");
        assert_eq!(code, 200, "{text}");
        let cpu = metric(
            &text,
            "outpost_workload_cpu_ratio",
            &[("workload", "daemonset/default/burner")],
        )?;
        (cpu > 0.5).then_some(text)
    });
    for (m, labels) in [
        ("outpost_nodes", vec![("status", "Online")]),
        ("outpost_node_up", vec![("node", "burn-1"), ("site", "s1")]),
        ("outpost_node_memory_ratio", vec![("node", "burn-1")]),
        ("outpost_workloads", vec![("phase", "Running")]),
        ("outpost_alerts_firing", vec![("alertname", "NodeCpuHigh")]),
        ("outpost_hub_connected_agents", vec![]),
        ("outpost_hub_http_requests_total", vec![("route", "status")]),
    ] {
        assert!(metric(&text, m, &labels).is_some(), "{m} {labels:?} missing:\n{text}");
    }
    promtool_accepts(&text);
    let (code, _) = {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let tls = outpost_pki::client_config(&hub.ca_pem(), None).unwrap();
            let c = reqwest::Client::builder().use_preconfigured_tls(tls).build().unwrap();
            let r = c.get(format!("{}/metrics", hub.url)).send().await.unwrap();
            (r.status().as_u16(), ())
        })
    };
    assert_eq!(code, 401, "/metrics needs the admin token");

    // the node resolves the alert when the policy disables the threshold
    hub.apply(&policy("{disabled: true}"));
    let resolved = wait_for("NodeCpuHigh resolved", 30.0, || {
        find_alert(&hub, "burn-1", "NodeCpuHigh", "Resolved")
    });
    assert!(resolved["resolved_at"].as_i64().unwrap() >= fired["started_at"].as_i64().unwrap());
    let table = hub.cli(&["get", "alerts"]);
    assert!(table.contains("NodeCpuHigh") && table.contains("resolved"), "{table}");
}

/// A tiny HTTP server that records POST bodies; stop it and start it again on the same port.
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Value>>>,
    stop: Option<Arc<std::sync::atomic::AtomicBool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn new() -> Self {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        Receiver {
            port,
            got: Arc::default(),
            stop: None,
            thread: None,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn start(&mut self) {
        let l = TcpListener::bind(("127.0.0.1", self.port)).unwrap();
        l.set_nonblocking(true).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, got) = (stop.clone(), self.got.clone());
        self.thread = Some(std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((conn, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                conn.set_nonblocking(false).unwrap();
                if let Some(v) = read_json_post(conn) {
                    got.lock().unwrap().push(v);
                }
            }
        }));
        self.stop = Some(stop);
    }

    fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            s.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn has(&self, name: &str, status: &str) -> bool {
        self.got
            .lock()
            .unwrap()
            .iter()
            .any(|p| p["alert"]["name"] == name && p["status"] == status)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Alerts raised while the hub is down (and across a kill -9 of the agent) reach the hub after
/// it is back, with their original timestamps, each once; the webhook receiver, down at first,
/// gets them when it comes up; NodeOffline fires after its grace and resolves on return.
#[test]
fn offline_alerts_arrive_once_with_original_times_and_webhooks_catch_up() {
    let mut rx = Receiver::new();
    let mut hub = Hub::start_with(
        &["--webhook", &rx.url(), "--node-offline-alert", "4s"],
        &[
            ("OUTPOST_ALERT_EVAL_MS", "200"),
            ("OUTPOST_WEBHOOK_RETRY_MAX_MS", "500"),
        ],
    );
    let flag = hub.dir.join("crash-now");
    let mut a = hub.join("edge-1", &hub.token(&[]));
    fast(&mut a);
    a.start();
    hub.apply(&policy("{disabled: true}"));
    hub.apply(&format!(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: flaky}}\nspec:\n  template:\n    spec:\n      runtimeClassName: process\n      terminationGracePeriodSeconds: 1\n      containers:\n      - {{name: main, image: 'flaky:1', command: [/bin/sh, -c, 'while [ ! -f {} ]; do sleep 0.1; done; exit 3']}}\n",
        flag.display()
    ));
    wait_for("flaky running", 30.0, || {
        (hub.phase("edge-1", "daemonset/default/flaky").as_deref() == Some("Running")).then_some(())
    });

    // hub down; the workload starts crash-looping; the node alerts on its own
    hub.kill();
    let offline_from = now_ms();
    std::fs::write(&flag, "x").unwrap();
    wait_for("the node's crash-loop alert", 60.0, || {
        a.log().contains("WorkloadCrashLoop").then_some(())
    });
    // kill -9 with the alert event still in the outbox, start again (hub still down)
    a.kill9();
    a.start();
    let restart_at = now_ms();
    hub.restart();

    let fired = wait_for("WorkloadCrashLoop at the hub", 60.0, || {
        find_alert(&hub, "edge-1", "WorkloadCrashLoop", "Firing")
    });
    let at = fired["started_at"].as_i64().unwrap();
    assert!(
        at > offline_from && at < restart_at,
        "original node time {at}, offline from {offline_from} to {restart_at}"
    );
    assert_eq!(fired["subject"], "daemonset/default/flaky");
    // none lost, none duplicated: every transition the node logged is one event at the hub
    let (_, node) = api_get(&hub, "/v1/nodes/edge-1");
    let node: Value = serde_json::from_str(&node).unwrap();
    let events: Vec<&Value> = node["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["reason"] == "AlertFiring" || e["reason"] == "AlertResolved")
        .collect();
    let logged = a.log().lines().filter(|l| l.contains("node alert")).count();
    assert_eq!(events.len(), logged, "hub events {events:?}\nagent log:\n{}", a.log());
    let mut seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    seqs.dedup();
    assert_eq!(seqs.len(), events.len());
    assert_eq!(
        alerts(&hub).iter().filter(|a| a["name"] == "WorkloadCrashLoop").count(),
        1,
        "one alert per (node, name, subject)"
    );

    // the receiver was down all along; it gets the notification once it is up
    assert!(rx.got.lock().unwrap().is_empty());
    rx.start();
    wait_for("webhook delivered after the receiver came back", 30.0, || {
        rx.has("WorkloadCrashLoop", "firing").then_some(())
    });
    let p = rx
        .got
        .lock()
        .unwrap()
        .iter()
        .find(|p| p["alert"]["name"] == "WorkloadCrashLoop")
        .cloned()
        .unwrap();
    assert!(
        p["text"]
            .as_str()
            .unwrap()
            .contains("[FIRING] WorkloadCrashLoop on edge-1"),
        "{p}"
    );
    assert_eq!(p["version"], 1);

    // node offline > grace: NodeOffline fires (hub rule), and resolves when it is back
    std::fs::remove_file(&flag).unwrap();
    a.kill9();
    let t0 = Instant::now();
    let off = wait_for("NodeOffline", 30.0, || {
        find_alert(&hub, "edge-1", "NodeOffline", "Firing")
    });
    assert!(
        t0.elapsed() >= Duration::from_secs(3),
        "not before its grace: {:?}",
        t0.elapsed()
    );
    assert_eq!(off["source"], "hub");
    wait_for("NodeOffline webhook", 30.0, || {
        rx.has("NodeOffline", "firing").then_some(())
    });
    rx.stop();
    a.start();
    wait_for("NodeOffline resolved", 30.0, || {
        find_alert(&hub, "edge-1", "NodeOffline", "Resolved")
    });
    rx.start();
    wait_for("resolution delivered after a second outage", 30.0, || {
        rx.has("NodeOffline", "resolved").then_some(())
    });
}

/// Sockets a process listens on (TCP, IPv4 and IPv6).
/// TCP sockets of `pid` that listen on an address other than loopback (the agent's pipeline
/// listeners bind 127.0.0.1 by default; nothing may face the network).
fn listening_sockets_beyond_loopback(pid: u32) -> usize {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    l.to_str()?
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')
                        .map(String::from)
                })
                .collect()
        })
        .unwrap_or_default();
    let mut n = 0;
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for l in std::fs::read_to_string(f).unwrap_or_default().lines().skip(1) {
            let c: Vec<&str> = l.split_whitespace().collect();
            let loopback = c.get(1).is_some_and(|a| {
                let ip = a.split(':').next().unwrap_or("");
                // /proc/net/tcp prints addresses as little-endian hex words: 127.x.x.x ends in
                // "7F"; ::1 is 00000000000000000000000001000000.
                (ip.len() == 8 && ip.ends_with("7F")) || ip == "00000000000000000000000001000000"
            });
            if c.get(3) == Some(&"0A") && !loopback && c.get(9).is_some_and(|i| inodes.iter().any(|x| x == i)) {
                n += 1;
            }
        }
    }
    n
}

/// A workload that spams its log: rotation, compression and the total cap hold, dropped lines
/// are reported, error lines are forwarded (`outpost logs --errors`), and `outpost logs` (tail
/// and follow) works through the agent's own link: the agent listens on no port beyond loopback.
#[test]
fn log_spam_is_rotated_capped_forwarded_and_fetchable() {
    let hub = Hub::start();
    let mut a = hub.join("logs-1", &hub.token(&[]));
    fast(&mut a);
    a.env.push(("OUTPOST_LOG_MAX_BYTES".into(), "65536".into()));
    a.env.push(("OUTPOST_LOG_TOTAL_BYTES".into(), "524288".into()));
    a.start();
    hub.apply(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: spam}\nspec:\n  template:\n    spec:\n      runtimeClassName: process\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: main\n        image: 'spam:1'\n        command: [/bin/sh, -c, 'n=0; while :; do n=$((n+1)); seq 1 1500 | sed \"s/^/$n spam line with some filler text /\"; echo \"ERROR boom $n\"; sleep 0.2; done']\n",
    );
    let wdir = a.dir.join("workloads/daemonset_default_spam");
    let size = |d: &std::path::Path| -> (u64, usize) {
        let mut total = 0;
        let mut segs = 0;
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("main.log") {
                total += e.metadata().map(|m| m.len()).unwrap_or(0);
                segs += name.ends_with(".gz") as usize;
            }
        }
        (total, segs)
    };
    // the cap holds while it bites (some slack: the writer keeps writing between passes)
    let t0 = Instant::now();
    let mut max_total = 0;
    wait_for("the total cap to bite", 90.0, || {
        let (total, segs) = size(&wdir);
        max_total = max_total.max(total);
        let (_, text) = api_get(&hub, "/metrics");
        let dropped = metric(&text, "outpost_node_log_dropped_lines_total", &[("node", "logs-1")]).unwrap_or(0.0);
        (segs > 0 && dropped > 0.0 && t0.elapsed() > Duration::from_secs(5)).then_some(())
    });
    for _ in 0..20 {
        let (total, _) = size(&wdir);
        max_total = max_total.max(total);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(max_total <= 524_288 + 400_000, "logs reached {max_total} bytes");

    // error lines reached the hub
    let errs = wait_for("forwarded error lines", 30.0, || {
        let out = hub.cli(&["logs", "--errors", "logs-1", "spam"]);
        out.contains("ERROR boom").then_some(out)
    });
    assert!(errs.contains("daemonset/default/spam/main"), "{errs}");
    assert!(!errs.contains("spam line"), "only errors are forwarded");

    // on-demand logs through the agent's own link; the agent has no listening socket
    let pid = wait_for("agent pid", 10.0, || {
        pids_with_cmdline(&[
            BIN,
            "agent",
            "run",
            "--stop-workloads-on-exit",
            "--data-dir",
            a.dir.to_str().unwrap(),
        ])
        .first()
        .copied()
    });
    assert_eq!(
        listening_sockets_beyond_loopback(pid),
        0,
        "the agent must not listen on any port beyond loopback"
    );
    let out = hub.cli(&["logs", "logs-1", "spam", "--tail", "5"]);
    assert_eq!(out.lines().count(), 5, "{out}");
    assert!(
        out.lines().all(|l| l.contains("spam line") || l.contains("ERROR boom")),
        "{out}"
    );
    let err = hub.cli_err(&["logs", "logs-1", "nope"]);
    assert!(err.contains("no workload named"), "{err}");

    // follow: new output keeps arriving
    let mut f = Command::new(BIN)
        .args(["logs", "logs-1", "daemonset/default/spam", "--tail", "1", "-f"])
        .env("OUTPOST_HUB", &hub.url)
        .env("OUTPOST_TOKEN", hub.token.trim())
        .env("OUTPOST_CA_FILE", hub.ca_file())
        .env("OUTPOST_CONFIG", hub.dir.join("no-config.json"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(f.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let start_round: u64 = first
        .split(' ')
        .next()
        .unwrap_or("0")
        .trim_start_matches("ERROR")
        .parse()
        .unwrap_or(0);
    let mut later = 0;
    for l in lines.by_ref().take(5000) {
        let l = l.unwrap();
        if l.split(' ')
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n > start_round + 1)
        {
            later += 1;
            if later > 10 {
                break;
            }
        }
    }
    let _ = f.kill();
    let _ = f.wait();
    assert!(later > 10, "follow printed no new rounds after {first:?}");
}
