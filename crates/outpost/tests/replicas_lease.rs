//! Three hub replicas on one PostgreSQL database, the controllers under leases with fencing
//! (docs/postgres.md, "Leases"): the replica holding the `rollouts` lease is killed with
//! SIGKILL in the middle of a rollout's bake; another takes the lease within the lease period,
//! the rollout goes on to Complete, and every webhook arrives exactly once (by its
//! `X-Outpost-Delivery` id, and by its content).
//!
//! The agents reach the hubs through a TCP relay in the test (one advertised name, like a
//! load balancer) that the test points at the lease holder: liveness and long-poll wake-ups
//! across replicas are another part's business; this test is about the leases.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Which replica (by pid) holds `lease` now, and its token.
fn holder(url: &str, lease: &str) -> Option<(u32, u64)> {
    let row = psql(
        url,
        &format!("SELECT holder, token FROM leases WHERE name = '{lease}' AND expires_at > (extract(epoch from now()) * 1000)::bigint"),
    );
    let (holder, token) = row.split_once('|')?;
    let pid = holder.split(':').nth(1)?.parse().ok()?;
    Some((pid, token.parse().ok()?))
}

/// A TCP relay on loopback forwarding each new connection to the port in `target`.
fn relay(target: Arc<AtomicU16>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let Ok(up) = TcpStream::connect(("127.0.0.1", target.load(Ordering::SeqCst))) else {
                continue;
            };
            let (mut r1, mut w1) = (conn.try_clone().unwrap(), up.try_clone().unwrap());
            let (mut r2, mut w2) = (up, conn);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut r1, &mut w1);
                let _ = w1.shutdown(std::net::Shutdown::Both);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut r2, &mut w2);
                let _ = w2.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    port
}

/// Every webhook received: (delivery id, body).
type Got = Arc<Mutex<Vec<(String, Value)>>>;

/// A webhook receiver keeping each POST's `X-Outpost-Delivery` header with its body.
fn receiver() -> (String, Got) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}/hook", l.local_addr().unwrap().port());
    let got: Got = Default::default();
    let g = got.clone();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let (mut len, mut id) = (0usize, String::new());
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                if let Some(v) = lower.strip_prefix("x-outpost-delivery:") {
                    id = v.trim().to_string();
                }
            }
            let mut body = vec![0u8; len];
            if r.read_exact(&mut body).is_ok() {
                if let Ok(v) = serde_json::from_slice(&body) {
                    g.lock().unwrap().push((id, v));
                }
            }
            let mut w = conn;
            let _ = w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
        }
    });
    (url, got)
}

fn app(rev: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: web, labels: {{app: web}}}}\nspec:\n  template:\n    spec:\n      runtimeClassName: process\n      terminationGracePeriodSeconds: 1\n      containers:\n      - {{name: main, command: [/bin/sleep, '{rev}']}}\n"
    )
}

const POLICY: &str = "apiVersion: outpost.dev/v1\nkind: RolloutPolicy\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  waves:\n  - {percent: 34}\n  - {percent: 100}\n  bake: 4s\n  tinyFleet: 1\n";

fn rollout_events(got: &[(String, Value)], revision: u64) -> Vec<String> {
    got.iter()
        .filter(|(_, b)| b["status"] == "rollout" && b["event"]["revision"] == revision)
        .map(|(_, b)| b["event"]["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn killing_the_rollouts_lease_holder_mid_rollout_hands_over_without_a_duplicate_webhook() {
    let Some(db) = outpost_hub::store::testkit::pg_database("replicas_lease") else {
        return;
    };
    let (hook, got) = receiver();
    let target = Arc::new(AtomicU16::new(0));
    let front = relay(target.clone());
    let advertise = format!("https://127.0.0.1:{front}");
    let env = [
        ("OUTPOST_LEASE_MS", "3000"),
        ("OUTPOST_LEASE_RENEW_MS", "500"),
        ("OUTPOST_CA_KEY_SECRET", "replicas-lease-secret"),
    ];
    let args = [
        "--store",
        db.as_str(),
        "--webhook",
        hook.as_str(),
        "--advertise",
        advertise.as_str(),
    ];
    let mut a = Hub::start_with(&args, &env);
    let a_pid = a.pid();
    let (holder_a, token_a) = wait_for("replica A holds the rollouts lease", 10.0, || holder(&db, "rollouts"));
    assert_eq!(holder_a, a_pid, "the first replica takes every free lease");
    let b = a.replica(free_port());
    let c = a.replica(free_port());
    let replicas = [(b.pid(), &b), (c.pid(), &c)];
    target.store(a.port, Ordering::SeqCst);
    for lease in ["alert-rules", "webhooks", "retention", "gitops", "data-retention"] {
        assert_eq!(holder(&db, lease).map(|h| h.0), Some(a_pid), "{lease} is A's");
    }

    // Three agents (through the relay: they reach A), revision 1 everywhere.
    let token = a.token(&[]);
    // The agents join through the relay, so that is the endpoint they hold on to.
    let direct = std::mem::replace(&mut a.url, advertise.clone());
    let agents: Vec<Agent> = (0..3)
        .map(|i| {
            let mut ag = a.join(&format!("lease-{i}"), &token);
            ag.env.push(("OUTPOST_LONG_POLL_SECS".into(), "2".into()));
            ag.running()
        })
        .collect();
    a.url = direct;
    a.apply(POLICY);
    a.apply(&app("1001"));
    wait_for("revision 1 on the three nodes", 30.0, || {
        let r = a.json(&["rollout", "status", "web"]);
        (r["revision"] == 1 && r["phase"] == "Complete").then_some(())
    });

    // Revision 2 in two waves with a 4 s bake: kill -9 A once the first wave is baking and
    // every webhook so far has been delivered (so none is in flight).
    a.apply(&app("1002"));
    wait_for("the first wave of revision 2 is baking", 30.0, || {
        let r = a.json(&["rollout", "status", "web"]);
        let baking = r["waves"][0]["state"] == "Baking";
        (r["revision"] == 2 && baking && r["waves"][1]["state"] == "Planned").then_some(())
    });
    wait_for("the events so far delivered", 10.0, || {
        let ev = rollout_events(&got.lock().unwrap(), 2);
        (ev.contains(&"WaveStarted".to_string()) && psql(&db, "SELECT count(*) FROM webhook_queue") == "0")
            .then_some(())
    });
    a.kill();
    let killed = Instant::now();

    // Another replica takes the lease within the lease period, with a new token.
    let (pid, token_b) = wait_for("another replica holds the rollouts lease", 10.0, || {
        holder(&db, "rollouts").filter(|h| h.0 != a_pid)
    });
    let took = killed.elapsed();
    eprintln!("kill -9 of the holder -> lease taken over after {took:?}");
    assert!(took < Duration::from_millis(3000 + 2000), "took {took:?}");
    assert!(token_b > token_a, "a new holder, a new token");
    let next = replicas
        .iter()
        .find(|(p, _)| *p == pid)
        .map(|(_, h)| *h)
        .expect("the new holder is B or C");
    target.store(next.port, Ordering::SeqCst);
    let webhooks = wait_for("another replica holds the webhooks lease", 10.0, || {
        holder(&db, "webhooks").filter(|h| h.0 != a_pid)
    });
    assert!(replicas.iter().any(|(p, _)| *p == webhooks.0), "B or C delivers now");

    // The rollout goes on to Complete under the new holder.
    let r = wait_for("revision 2 Complete", 40.0, || {
        let r = next.json(&["rollout", "status", "web"]);
        (r["revision"] == 2 && r["phase"] == "Complete").then_some(r)
    });
    assert_eq!(r["waves"].as_array().map(Vec::len), Some(2), "{r:#}");
    wait_for("RolloutComplete at the webhook", 15.0, || {
        rollout_events(&got.lock().unwrap(), 2)
            .contains(&"RolloutComplete".to_string())
            .then_some(())
    });
    wait_for("the outbox drained", 10.0, || {
        (psql(&db, "SELECT count(*) FROM webhook_queue") == "0").then_some(())
    });

    // Every webhook exactly once: by delivery id, and by content.
    let got = got.lock().unwrap().clone();
    let mut ids: BTreeMap<&str, usize> = BTreeMap::new();
    for (id, _) in &got {
        assert!(!id.is_empty(), "every webhook carries X-Outpost-Delivery");
        *ids.entry(id.as_str()).or_default() += 1;
    }
    assert!(ids.values().all(|n| *n == 1), "a delivery id arrived twice: {ids:?}");
    let mut bodies: Vec<String> = got.iter().map(|(_, b)| b.to_string()).collect();
    bodies.sort();
    let n = bodies.len();
    bodies.dedup();
    assert_eq!(bodies.len(), n, "a notification arrived twice");
    let ev = rollout_events(&got, 2);
    eprintln!("revision 2 events at the webhook: {ev:?}");
    let count = |r: &str| ev.iter().filter(|e| *e == r).count();
    assert_eq!(
        (count("RolloutStarted"), count("WaveStarted"), count("RolloutComplete")),
        (1, 2, 1),
        "each event of revision 2 once: {ev:?}"
    );
    assert_eq!(ev.first().map(String::as_str), Some("RolloutStarted"));
    assert_eq!(ev.last().map(String::as_str), Some("RolloutComplete"));
    // The lease changes are logged (the replicas share one log file here).
    let logs = std::fs::read_to_string(a.dir.join("hub.log")).unwrap_or_default();
    assert!(logs.matches("lease taken").count() >= 2, "the lease changes are logged");
    drop(agents);
}
