//! Several hub replicas on one PostgreSQL database (docs/postgres.md, "Replicas"): three real
//! hub processes on one database (one data dir for the CA and admin token), real agents whose
//! long-polls are held by different replicas, and an operator talking to yet another one.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A fresh database on the shared test server; None (test skipped, said why) outside CI
/// without PostgreSQL.
fn database(case: &str) -> Option<String> {
    outpost_hub::store::testkit::pg_database(case)
}

/// How many times the agent's log says it connected to `url`.
fn connected_to(agent: &Agent, url: &str) -> usize {
    agent
        .log()
        .lines()
        .filter(|l| l.contains("connected to hub") && l.contains(url))
        .count()
}

/// Three replicas A, B, C on `store`, each advertising only itself: an agent stays on the
/// replica it joined through (agents spread themselves over every endpoint they know).
fn three(store: &str) -> (Hub, Hub, Hub) {
    three_with(store, false, &[])
}

/// Three replicas; with `all`, each advertises all three endpoints (agents fail over along them).
fn three_with(store: &str, all: bool, extra: &[&str]) -> (Hub, Hub, Hub) {
    let pa = free_port();
    let pb = other_port(&[pa]);
    let pc = other_port(&[pa, pb]);
    let list = [pa, pb, pc]
        .iter()
        .map(|p| format!("https://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut args = vec!["--store", store];
    if all {
        args.extend(["--advertise", list.as_str()]);
    }
    args.extend(extra);
    let a = Hub::start_on_port(pa, &args);
    let b = a.replica(pb);
    let c = a.replica(pc);
    (a, b, c)
}

fn sleepers(m: &str) -> usize {
    pids_with_cmdline(&["/bin/sleep", m]).len()
}

#[test]
fn an_apply_through_one_replica_reaches_agents_held_by_the_others_in_under_a_second() {
    let Some(store) = database("replicas_apply") else {
        return;
    };
    let (a, b, c) = three(&store);
    let token = a.token(&[]);
    let rb = b.join("rep-b", &token).running();
    let rc = c.join("rep-c", &token).running();
    // A first workload: both agents have synced and reported, and hold a long-poll again.
    let warm = marker();
    a.apply(&sleeper_ds("warm", &warm, ""));
    wait_for("the first workload on both agents", 20.0, || {
        (sleepers(&warm) == 2).then_some(())
    });
    wait_for("both agents report it Running through A", 20.0, || {
        (a.phase("rep-b", "daemonset/default/warm")? == "Running"
            && a.phase("rep-c", "daemonset/default/warm")? == "Running")
            .then_some(())
    });
    // Their links are on B and C, never on A.
    assert!(connected_to(&rb, &b.url) >= 1, "{}", rb.log());
    assert!(connected_to(&rc, &c.url) >= 1, "{}", rc.log());
    assert_eq!(connected_to(&rb, &a.url) + connected_to(&rc, &a.url), 0);

    let mut worst = Duration::ZERO;
    for round in 0..3 {
        let m = marker();
        let yaml = sleeper_ds(&format!("app{round}"), &m, "");
        let f = a.dir.join(format!("round-{round}.yaml"));
        std::fs::write(&f, yaml).unwrap();
        a.cli(&["apply", "-f", f.to_str().unwrap()]);
        let t0 = Instant::now();
        // Both agents got it: each started the process (a tight look at /proc, no sleeps).
        while sleepers(&m) < 2 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "round {round}: the change did not reach both agents in 10 s\nB's agent:\n{}\nC's agent:\n{}",
                rb.log(),
                rc.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let took = t0.elapsed();
        eprintln!("round {round}: apply through A -> running on agents held by B and C: {took:?}");
        worst = worst.max(took);
    }
    assert!(worst < Duration::from_secs(1), "worst change -> both agents: {worst:?}");
    // Every replica shows both nodes Online (the long-polls' contacts are shared).
    for h in [&a, &b, &c] {
        for n in ["rep-b", "rep-c"] {
            wait_for("the node Online on every replica", 10.0, || {
                (h.node(n)?["status"] == "Online").then_some(())
            });
        }
    }
}

#[test]
fn logs_and_vitals_through_one_replica_of_a_node_held_by_another() {
    let Some(store) = database("replicas_logs") else { return };
    let (a, b, _c) = three(&store);
    let token = a.token(&[]);
    let mut agent = b.join("rep-logs", &token);
    agent.env.push(("OUTPOST_VITALS_INTERVAL_MS".into(), "500".into()));
    let agent = agent.running();
    let yaml = "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: talker}\nspec:\n  template:\n    spec:\n      runtimeClassName: process\n      containers:\n      - {name: main, image: 'talker:1', command: [/bin/sh, -c, 'echo hello-from-the-node; exec sleep 1000']}\n";
    a.apply(yaml);
    wait_for("the workload Running", 20.0, || {
        (a.phase("rep-logs", "daemonset/default/talker")? == "Running").then_some(())
    });
    assert!(connected_to(&agent, &b.url) >= 1 && connected_to(&agent, &a.url) == 0);
    // Through A, while B holds the node's long-poll (A has no link to the node at all).
    let out = wait_for("logs through A", 20.0, || {
        let o = a.try_cli(&["logs", "rep-logs", "talker", "--tail", "5"]);
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        (o.status.success() && text.contains("hello-from-the-node")).then_some(text)
    });
    assert!(out.contains("hello-from-the-node"), "{out}");
    // Through C too, and again through A (requests are handed out once, answers go back to
    // whoever asked).
    let c_url = format!("https://127.0.0.1:{}", _c.port);
    assert!(connected_to(&agent, &c_url) == 0);
    let out = _c.cli(&["logs", "rep-logs", "talker", "--tail", "5"]);
    assert!(out.contains("hello-from-the-node"), "{out}");
    // The vitals history through A.
    let (code, body) = wait_for("vitals history through A", 20.0, || {
        let (code, body) = api_get(&a, "/v1/nodes/rep-logs/vitals?since=10m");
        (code == 200).then_some((code, body))
    });
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(code, 200);
    assert!(v.get("points").is_some(), "{body}");
    // Nothing is left behind in the store.
    wait_for("relayed requests forgotten", 10.0, || {
        (psql(&store, "SELECT count(*) FROM relays") == "0").then_some(())
    });
}

/// The event sequence numbers PostgreSQL holds for `node`, in order.
fn event_seqs(store: &str, node: &str) -> Vec<i64> {
    psql(
        store,
        &format!("SELECT seq FROM events WHERE node = '{node}' ORDER BY seq"),
    )
    .lines()
    .filter(|l| !l.is_empty())
    .map(|l| l.parse().unwrap())
    .collect()
}

fn outbox_len(agent: &Agent) -> i64 {
    let db =
        rusqlite::Connection::open_with_flags(agent.dir.join("state.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    db.query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0)).unwrap()
}

fn kill_pid(pid: u32) {
    // SAFETY: kill(2) on a workload process this test started through its agent.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

#[test]
fn kill_9_of_the_replica_an_agent_is_on_fails_it_over_and_loses_nothing_it_reported() {
    let Some(store) = database("replicas_failover") else {
        return;
    };
    let (a, b, c) = three_with(&store, true, &[]);
    let token = a.token(&[]);
    let agent = a.join("rep-fo", &token).running();
    let m = marker();
    a.apply(&sleeper_ds("app", &m, ""));
    let pid = wait_for("the workload running", 20.0, || {
        pids_with_cmdline(&["/bin/sleep", &m]).first().copied()
    });
    wait_for("Running, seen through A", 20.0, || {
        (a.phase("rep-fo", "daemonset/default/app")? == "Running").then_some(())
    });
    // The agent learnt all three endpoints and picked one: that replica dies.
    let mut hubs = [a, b, c];
    let on = wait_for("the agent's replica", 10.0, || {
        let log = agent.log();
        let last = log.lines().rev().find(|l| l.contains("connected to hub"))?;
        hubs.iter().position(|h| last.ends_with(&format!("hub={}", h.url)))
    });
    let others: Vec<usize> = (0..3).filter(|i| *i != on).collect();
    let (o1, o2) = (others[0], others[1]);
    let before = event_seqs(&store, "rep-fo").len();

    // kill -9 the replica holding the agent's link, and crash the workload in the same instant.
    hubs[on].kill();
    let t0 = Instant::now();
    kill_pid(pid);
    let (a, c) = (&hubs[o1], &hubs[o2]);
    // The crash and restart are reported through whichever replica the agent moved to, and
    // every replica reads them from the one database.
    wait_for("the restart reported", 20.0, || {
        let restarts =
            a.placement("rep-fo", "daemonset/default/app")?["status"]["containers"][0]["restarts"].as_u64()?;
        (restarts >= 1).then_some(())
    });
    eprintln!(
        "kill -9 of the agent's replica -> the crash reported through another: {:?}",
        t0.elapsed()
    );
    wait_for("the outbox delivered", 20.0, || (outbox_len(&agent) == 0).then_some(()));
    let seqs = event_seqs(&store, "rep-fo");
    assert!(seqs.len() > before, "{seqs:?}");
    assert_eq!(seqs.first(), Some(&1), "{seqs:?}");
    for w in seqs.windows(2) {
        assert_eq!(w[1], w[0] + 1, "the hub's events have a gap: {seqs:?}");
    }
    // A change through C still reaches the agent (held now by A or C).
    let m2 = marker();
    c.apply(&sleeper_ds("after", &m2, ""));
    wait_for("the change after the failover", 10.0, || {
        (sleepers(&m2) == 1).then_some(())
    });
    wait_for("the node Online through C", 10.0, || {
        (c.node("rep-fo")?["status"] == "Online").then_some(())
    });
}

/// A node back online to a replica that holds no controller lease gets the Deployment that
/// waited for it: the reschedule its return asks for runs in that replica (a reschedule is a
/// plan from the stored state under the replicas' write lock, safe in any of them).
#[test]
fn a_node_back_online_to_a_replica_without_leases_gets_the_deployment_that_waited_for_it() {
    let Some(store) = database("replicas_back_online") else {
        return;
    };
    // A starts first and takes every lease; the node joins and comes back through B.
    let (a, b, _c) = three(&store);
    let token = a.token(&[]);
    let mut agent = b.join("rep-back", &token).running();
    wait_for("the node Online", 20.0, || {
        (a.node("rep-back")?["status"] == "Online").then_some(())
    });
    agent.stop();
    wait_for("the node Offline (--offline-after 3s)", 30.0, || {
        (a.node("rep-back")?["status"] == "Offline").then_some(())
    });
    let m = marker();
    a.apply(&format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: waiting}}\nspec:\n  replicas: 1\n  template:\n    spec:\n      runtimeClassName: process\n      terminationGracePeriodSeconds: 2\n      containers:\n      - {{name: main, image: 'sleeper:1', command: [/bin/sleep, '{m}']}}\n"
    ));
    assert_eq!(sleepers(&m), 0, "no node was online to place it on");
    agent.start();
    wait_for(
        "the Deployment placed on the node back through B, and running",
        20.0,
        || (sleepers(&m) == 1).then_some(()),
    );
}

#[test]
fn the_replicas_reconnect_by_themselves_after_postgres_restarts_under_load() {
    let Some(cluster) = outpost_hub::store::testkit::Cluster::start() else {
        return;
    };
    let store = cluster.database("replicas_restart");
    // A fallback poll far longer than the test: changes after the restart can only reach the
    // agents through notifications, so the listeners must have reconnected.
    let (a, b, c) = three_with(&store, false, &["--replica-poll", "120s"]);
    let token = a.token(&[]);
    let agents: Vec<Agent> = [(&b, "rep-r1"), (&c, "rep-r2"), (&b, "rep-r3")]
        .into_iter()
        .map(|(h, n)| h.join(n, &token).running())
        .collect();
    let warm = marker();
    a.apply(&sleeper_ds("warm", &warm, ""));
    wait_for("the first workload on every agent", 20.0, || {
        (sleepers(&warm) == 3).then_some(())
    });

    // Restart PostgreSQL while the agents poll and report: every connection is cut.
    cluster.restart();
    let t0 = Instant::now();
    // A change after the restart (the first attempt may meet a connection the restart cut).
    let m = marker();
    let f = a.dir.join("after-restart.yaml");
    std::fs::write(&f, sleeper_ds("after", &m, "")).unwrap();
    wait_for("an apply through A after the restart", 20.0, || {
        a.try_cli(&["apply", "-f", f.to_str().unwrap()])
            .status
            .success()
            .then_some(())
    });
    let applied = Instant::now();
    wait_for("the change on every agent", 10.0, || (sleepers(&m) == 3).then_some(()));
    eprintln!(
        "PostgreSQL restart -> change on every agent: {:?} ({:?} after the apply)",
        t0.elapsed(),
        applied.elapsed()
    );
    for (h, n) in [(&a, "rep-r1"), (&b, "rep-r2"), (&c, "rep-r3")] {
        wait_for("the report after the restart", 20.0, || {
            (h.phase(n, "daemonset/default/after")? == "Running").then_some(())
        });
    }
    drop(agents);
}

#[test]
fn two_replicas_racing_applies_lose_no_update_and_generations_only_grow() {
    let Some(store) = database("replicas_race") else { return };
    let (a, b, _c) = three(&store);
    let token = a.token(&[]);
    let _agent = b.join("rep-race", &token).running();
    wait_for("the node joined", 10.0, || a.node("rep-race"));
    let markers: Vec<String> = (0..8).map(|_| marker()).collect();
    // Watch the node's generation in PostgreSQL while the replicas race.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (stop, store) = (stop.clone(), store.clone());
        std::thread::spawn(move || {
            let mut seen: Vec<i64> = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(g) = psql(&store, "SELECT generation FROM nodes WHERE name = 'rep-race'").parse() {
                    seen.push(g);
                }
            }
            seen
        })
    };
    std::thread::scope(|s| {
        for (i, hub) in [&a, &b].into_iter().enumerate() {
            let markers = &markers;
            s.spawn(move || {
                for (j, m) in markers.iter().enumerate().filter(|(j, _)| j % 2 == i) {
                    let f = hub.dir.join(format!("race-{j}.yaml"));
                    std::fs::write(&f, sleeper_ds(&format!("race{j}"), m, "")).unwrap();
                    hub.cli(&["apply", "-f", f.to_str().unwrap()]);
                }
            });
        }
    });
    for m in &markers {
        wait_for("every raced workload on the agent", 20.0, || {
            (sleepers(m) == 1).then_some(())
        });
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = watcher.join().unwrap();
    assert!(seen.len() > 1, "{seen:?}");
    for w in seen.windows(2) {
        assert!(w[1] >= w[0], "the node's generation went back: {seen:?}");
    }
    assert_eq!(
        psql(
            &store,
            "SELECT count(*) FROM node_workloads WHERE node = 'rep-race' AND key LIKE 'daemonset/default/race%'"
        ),
        "8"
    );
}

/// A GET with a node's certificate: the status.
fn node_get(ca: &str, cert: &str, key: &str, url: &str) -> u16 {
    node_call(ca, cert, key, url, None).0
}

/// A GET (or, with a body, a POST of that JSON) with a node's certificate: status and body.
fn node_call(ca: &str, cert: &str, key: &str, url: &str, body: Option<Value>) -> (u16, Value) {
    outpost_pki::install_provider();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tls = outpost_pki::client_config(ca, Some((cert, key))).unwrap();
        let c = reqwest::Client::builder().use_preconfigured_tls(tls).build().unwrap();
        let req = match body {
            Some(b) => c.post(url).json(&b),
            None => c.get(url),
        };
        let r = req.header("x-outpost-protocol", "1").send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    })
}

#[test]
fn a_node_deleted_through_one_replica_is_refused_by_another_that_knew_its_certificate() {
    let Some(store) = database("replicas_cert") else {
        return;
    };
    let (a, b, _c) = three(&store);
    let token = a.token(&[]);
    let gone = a.join("rep-gone", &token);
    let (ca, cert, key) = gone.identity();
    let sync = format!("{}/v1/nodes/rep-gone/sync?generation=0", b.url);
    // B has seen the certificate (its cache holds it now).
    assert_eq!(node_get(&ca, &cert, &key, &sync), 200);
    a.cli(&["delete", "node", "rep-gone"]);
    wait_for("replica B refuses the deleted node's certificate", 10.0, || {
        (node_get(&ca, &cert, &key, &sync) == 401).then_some(())
    });
}

#[test]
fn a_certificate_renewed_through_one_replica_stops_working_on_another_within_seconds() {
    let Some(store) = database("replicas_renew") else {
        return;
    };
    let (a, b, _c) = three(&store);
    let token = a.token(&[]);
    let mut agent = a.join("rep-renew", &token);
    let (ca, cert, key) = agent.identity();
    // Only this test's requests use the certificates from here on.
    agent.stop();
    let on = |hub: &Hub| format!("{}/v1/nodes/rep-renew/sync?generation=0", hub.url);
    // B has seen the certificate (its cache holds it now).
    assert_eq!(node_get(&ca, &cert, &key, &on(&b)), 200);
    let csr_pem = outpost_pki::NodeKey::csr_for(&key, "rep-renew").unwrap();
    let (status, renewed) = node_call(
        &ca,
        &cert,
        &key,
        &format!("{}/v1/nodes/rep-renew/renew", a.url),
        Some(serde_json::json!({ "csr_pem": csr_pem })),
    );
    assert_eq!(status, 200, "{renewed}");
    let new_cert = renewed["cert_pem"].as_str().expect("a renewed certificate").to_string();
    // Two-phase: the old certificate works everywhere until the new one is used.
    assert_eq!(node_get(&ca, &cert, &key, &on(&b)), 200);
    // Its first use, through A, promotes it ...
    assert_eq!(node_get(&ca, &new_cert, &key, &on(&a)), 200);
    assert_eq!(node_get(&ca, &cert, &key, &on(&a)), 401);
    // ... and B, which remembers the old one, refuses it within seconds (the promotion wakes
    // every replica's look), not after a cache period.
    let t = Instant::now();
    wait_for("replica B refuses the renewed node's old certificate", 10.0, || {
        (node_get(&ca, &cert, &key, &on(&b)) == 401).then_some(())
    });
    eprintln!("B refused the old certificate {:?} after the promotion", t.elapsed());
    assert_eq!(node_get(&ca, &new_cert, &key, &on(&b)), 200);
    assert_eq!(
        psql(&store, "SELECT count(*) FROM cert_retired WHERE node = 'rep-renew'"),
        "1",
        "one retirement row for the promotion"
    );
}
