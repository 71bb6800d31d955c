//! Agents that know several hubs (docs/protocol.md §6, "Several hubs"): two real hub processes
//! serving one fleet (one data dir: the same CA, admin token and SQLite database in WAL mode),
//! a real agent learning both endpoints, failing over when its hub is killed, and backing off
//! when no hub answers.

mod common;

use std::io::ErrorKind;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn identity_hubs(agent: &Agent) -> Vec<String> {
    let id: Value = serde_json::from_str(&std::fs::read_to_string(agent.dir.join("identity.json")).unwrap()).unwrap();
    id["hubs"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

fn restarts(hub: &Hub, node: &str) -> Option<u64> {
    hub.placement(node, "daemonset/default/app")?["status"]["containers"][0]["restarts"].as_u64()
}

/// The agent's log has said "connected to hub" for `url` at least `n` times.
fn connected_to(agent: &Agent, url: &str) -> usize {
    agent
        .log()
        .lines()
        .filter(|l| l.contains("connected to hub") && l.contains(url))
        .count()
}

fn events_of(hub: &Hub, node: &str) -> Vec<Value> {
    let db =
        rusqlite::Connection::open_with_flags(hub.dir.join("hub/hub.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut q = db
        .prepare("SELECT seq, reason FROM events WHERE node = ?1 ORDER BY seq")
        .unwrap();
    q.query_map([node], |r| {
        Ok(serde_json::json!({"seq": r.get::<_, i64>(0)?, "reason": r.get::<_, String>(1)?}))
    })
    .unwrap()
    .map(Result::unwrap)
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
fn an_agent_learns_every_hub_fails_over_when_its_hub_dies_and_loses_nothing() {
    let pa = free_port();
    let pb = loop {
        let p = free_port();
        if p != pa {
            break p;
        }
    };
    let url_a = format!("https://127.0.0.1:{pa}");
    let url_b = format!("https://127.0.0.1:{pb}");
    // Hub A alone first, advertising only itself (the harness's `--advertise <own URL>`).
    let mut a = Hub::start_on_port(pa, &[]);
    let token = a.token(&[]);
    let agent = a.join("hubs-1", &token).running();
    assert_eq!(
        identity_hubs(&agent),
        vec![url_a.clone()],
        "the join answer carries the list"
    );
    let m = marker();
    a.apply(&sleeper_ds("app", &m, ""));
    wait_for("the workload running", 30.0, || {
        (a.phase("hubs-1", "daemonset/default/app").as_deref() == Some("Running")).then_some(())
    });
    let pid = wait_for("the sleeper process", 10.0, || {
        pids_with_cmdline(&["/bin/sleep", &m]).first().copied()
    });

    // A is restarted advertising both replicas, and B starts on the same data dir: the agent
    // learns the list from a sync answer (no re-join) and persists it.
    let both = format!("{url_a},{url_b}");
    a.extra_args = vec!["--advertise".into(), both];
    a.restart();
    let b = a.replica(pb);
    let mut want = vec![url_a.clone(), url_b.clone()];
    want.sort();
    wait_for("the agent to learn both hubs", 20.0, || {
        (identity_hubs(&agent) == want).then_some(())
    });
    // It stays on A (the list still holds its endpoint) and B serves the same fleet.
    wait_for("the agent back on A", 20.0, || {
        (connected_to(&agent, &url_a) >= 2).then_some(())
    });
    assert_eq!(b.phase("hubs-1", "daemonset/default/app").as_deref(), Some("Running"));
    assert_eq!(connected_to(&agent, &url_b), 0);

    // kill -9 A, and the workload crashes in the same instant: its event is recorded while the
    // agent has no hub.
    let before = restarts(&b, "hubs-1").unwrap_or(0);
    a.kill();
    let t0 = Instant::now();
    kill_pid(pid);
    // The status it reports after the failover (the workload's restart, 1 s after the crash)
    // is visible through B: the agent's link moved there. (The held long-poll on B logs
    // nothing until it is answered.)
    let end = Instant::now() + Duration::from_secs(10);
    while restarts(&b, "hubs-1").unwrap_or(0) <= before {
        assert!(
            Instant::now() < end,
            "no restart reported through B in 10 s; the agent's log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let failover = t0.elapsed();
    eprintln!("kill -9 of A -> restart reported through B: {failover:?}");
    assert!(failover < Duration::from_secs(5), "failover took {failover:?}");
    assert!(agent.log().contains(&format!("to={url_b}")), "the agent moved to B");
    wait_for("the Exited event through B", 20.0, || {
        let d = b.cli(&["describe", "node", "hubs-1"]);
        d.contains("Exited").then_some(())
    });
    let pid2 = wait_for("the restarted sleeper", 10.0, || {
        pids_with_cmdline(&["/bin/sleep", &m]).into_iter().find(|p| *p != pid)
    });

    // Now B dies too: the agent keeps its workload and holds what it records; when A comes
    // back, the agent finds it along the list and delivers everything it held.
    let mut b = b;
    b.kill();
    let held_reasons = events_of(&a, "hubs-1").len();
    kill_pid(pid2);
    let pid3 = wait_for("the workload restarted without any hub", 20.0, || {
        pids_with_cmdline(&["/bin/sleep", &m])
            .into_iter()
            .find(|p| *p != pid && *p != pid2)
    });
    wait_for("the event held in the outbox", 10.0, || {
        (outbox_len(&agent) > 0).then_some(())
    });
    a.restart();
    wait_for("the outbox delivered to A", 30.0, || {
        (outbox_len(&agent) == 0).then_some(())
    });
    let events = events_of(&a, "hubs-1");
    assert!(events.len() > held_reasons, "{events:?}");
    let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    for w in seqs.windows(2) {
        assert_eq!(w[1], w[0] + 1, "the hub's events have a gap: {seqs:?}");
    }
    assert!(
        events.iter().filter(|e| e["reason"] == "Exited").count() >= 2,
        "{events:?}"
    );
    assert!(pids_with_cmdline(&["/bin/sleep", &m]).contains(&pid3));
    wait_for("the second restart reported through A", 20.0, || {
        (restarts(&a, "hubs-1")? > before + 1).then_some(())
    });
}

#[test]
fn an_agent_whose_only_hub_is_down_keeps_its_workload_and_backs_off() {
    let mut hub = Hub::start();
    let token = hub.token(&[]);
    let agent = hub.join("lonely", &token).running();
    let m = marker();
    hub.apply(&sleeper_ds("app", &m, ""));
    wait_for("the workload running", 30.0, || {
        (hub.phase("lonely", "daemonset/default/app").as_deref() == Some("Running")).then_some(())
    });
    let pid = pids_with_cmdline(&["/bin/sleep", &m])[0];
    wait_for("the agent connected", 10.0, || {
        agent.log().contains("connected to hub").then_some(())
    });
    hub.kill();
    // Something that counts every connection attempt now listens on the hub's port.
    let listener = wait_for("the hub's port free", 10.0, || {
        TcpListener::bind(("127.0.0.1", hub.port)).ok()
    });
    listener.set_nonblocking(true).unwrap();
    let window = Duration::from_secs(15);
    let start = Instant::now();
    let mut attempts: Vec<Duration> = Vec::new();
    while start.elapsed() < window {
        match listener.accept() {
            Ok((conn, _)) => {
                attempts.push(start.elapsed());
                drop(conn);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("accept: {e}"),
        }
    }
    eprintln!("{} connection attempts in {window:?}: {attempts:?}", attempts.len());
    // The sync and status loops each back off 1, 2, 4, 8 s (+ up to 50 %): a handful of
    // attempts, not a tight loop; and it does keep trying.
    assert!(attempts.len() >= 2, "the agent stopped retrying: {attempts:?}");
    assert!(attempts.len() <= 16, "too many attempts: {attempts:?}");
    assert!(
        pids_with_cmdline(&["/bin/sleep", &m]).contains(&pid),
        "the workload kept running"
    );
}

/// `outpost hub` on `dir` with `env`, expected to refuse to start: its stderr.
fn hub_refuses(dir: &std::path::Path, env: &[(&str, &str)]) -> String {
    let o = std::process::Command::new(BIN)
        .args(["hub", "--listen", &format!("127.0.0.1:{}", free_port()), "--data-dir"])
        .arg(dir)
        .env_remove("OUTPOST_CA_KEY_SECRET")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(!o.status.success(), "the hub started");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn the_ca_key_is_encrypted_at_rest_refused_without_its_secret_and_rotated() {
    // An install from before secrets: the key is PEM on disk.
    let mut hub = Hub::start();
    let key_file = hub.dir.join("hub/ca.key");
    assert!(std::fs::read_to_string(&key_file).unwrap().contains("PRIVATE KEY"));
    let token = hub.token(&[]);
    let mut agent = hub.join("sealed-1", &token);
    agent.start();
    wait_for("the agent connected", 20.0, || {
        agent.log().contains("connected to hub").then_some(())
    });
    // The first start with a secret encrypts it in place.
    hub.extra_env = vec![("OUTPOST_CA_KEY_SECRET".into(), "first-secret".into())];
    hub.restart();
    let sealed = std::fs::read_to_string(&key_file).unwrap();
    assert!(!sealed.contains("PRIVATE KEY") && !sealed.contains("BEGIN"), "{sealed}");
    // The same CA: the node joined before still works, and new joins are signed.
    let t2 = hub.token(&[]);
    let _second = hub.join("sealed-2", &t2);
    hub.kill();

    let dir = hub.dir.join("hub");
    let missing = hub_refuses(&dir, &[]);
    assert!(
        missing.contains("the CA key is encrypted; set OUTPOST_CA_KEY_SECRET or --ca-secret-file"),
        "{missing}"
    );
    let wrong = hub_refuses(&dir, &[("OUTPOST_CA_KEY_SECRET", "not-it")]);
    assert!(wrong.contains("does not open it"), "{wrong}");
    assert_eq!(
        std::fs::read_to_string(&key_file).unwrap(),
        sealed,
        "refusals change nothing"
    );

    // Rotation: the current secret from a file, the new one from the environment.
    let old_file = hub.dir.join("old-secret");
    std::fs::write(&old_file, "first-secret\n").unwrap();
    let o = std::process::Command::new(BIN)
        .args(["hub", "ca-secret", "rotate", "--data-dir"])
        .arg(&dir)
        .arg("--ca-secret-file")
        .arg(&old_file)
        .env_remove("OUTPOST_CA_KEY_SECRET")
        .env("OUTPOST_CA_KEY_NEW_SECRET", "second-secret")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("restart every hub"));
    let rotated = std::fs::read_to_string(&key_file).unwrap();
    assert_ne!(rotated, sealed);
    assert!(!rotated.contains("PRIVATE KEY"));
    let old = hub_refuses(&dir, &[("OUTPOST_CA_KEY_SECRET", "first-secret")]);
    assert!(old.contains("does not open it"), "{old}");
    hub.extra_env = vec![("OUTPOST_CA_KEY_SECRET".into(), "second-secret".into())];
    hub.restart();
    // The agent joined under the plain key still talks to the hub after both changes (its
    // held long-poll is contact: the node turns Online again).
    wait_for("the node Online", 90.0, || {
        (node_status(&hub, "sealed-1").as_deref() == Some("Online")).then_some(())
    });
}
