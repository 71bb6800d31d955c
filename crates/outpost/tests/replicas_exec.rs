//! Remote exec across hub replicas on one PostgreSQL database (docs/exec.md, "Across
//! replicas"): three real hub processes, a real agent whose long-poll and streams are held by
//! replica B, and the operator's `outpost exec` talking to replica A only. No replica can reach
//! another; the session and its frames travel through the database.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn database(case: &str) -> Option<String> {
    outpost_hub::store::testkit::pg_database(case)
}

/// Three replicas on `store`, each advertising only itself (an agent stays where it joined).
fn three(store: &str) -> (Hub, Hub, Hub) {
    let pa = free_port();
    let pb = other_port(&[pa]);
    let pc = other_port(&[pa, pb]);
    let a = Hub::start_on_port(pa, &["--store", store]);
    let b = a.replica(pb);
    let c = a.replica(pc);
    (a, b, c)
}

fn app(name: &str, marker: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: {name}}}\nspec:\n  template:\n    spec:\n      runtimeClassName: process\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: main\n        image: 'sleeper:1'\n        command: [/bin/sleep, '{marker}']\n"
    )
}

/// Round trips of one input line to its echo by `cat` on the node, through `hub`.
fn echo_round_trips(hub: &Hub, node: &str, rounds: usize) -> Vec<Duration> {
    let mut child = hub
        .command(&["exec", node, "app", "-i", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut took = Vec::new();
    for i in 0..rounds {
        let line = format!("ping-{i}\n");
        let t0 = Instant::now();
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.flush().unwrap();
        let mut got = String::new();
        out.read_line(&mut got).unwrap();
        assert_eq!(got, line, "echo {i}");
        // The first includes the session's set-up (the CLI starts sending once it is open).
        if i > 0 {
            took.push(t0.elapsed());
        }
    }
    drop(stdin);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    took.sort();
    took
}

fn running(hub: &Hub, node: &str) {
    wait_for("app running", 30.0, || {
        (hub.phase(node, "daemonset/default/app").as_deref() == Some("Running")).then_some(())
    });
}

fn connected_to(agent: &Agent, url: &str) -> usize {
    agent
        .log()
        .lines()
        .filter(|l| l.contains("connected to hub") && l.contains(url))
        .count()
}

#[test]
fn exec_through_one_replica_of_a_node_held_by_another() {
    let Some(store) = database("replicas_exec") else { return };
    let (mut a, b, _c) = three(&store);
    let token = a.token(&[]);
    let agent = b.join("rx1", &token).running();
    let m = marker();
    a.apply(&app("app", &m));
    running(&a, "rx1");
    assert!(
        connected_to(&agent, &b.url) >= 1 && connected_to(&agent, &a.url) == 0,
        "{}",
        agent.log()
    );

    // stdin -> stdout, stderr and the exit code, through A while B holds the node.
    let (code, out, err) = exec(
        &a,
        &[
            "rx1",
            "app",
            "-i",
            "--",
            "/bin/sh",
            "-c",
            "read x; echo got-$x; cat; echo oops >&2; exit 7",
        ],
        "first\nsecond\nthird\n",
    );
    assert_eq!((code, out.as_str()), (7, "got-first\nsecond\nthird\n"), "{err}");
    assert!(err.contains("oops"), "{err}");

    // A large output arrives complete and in order.
    let (code, out, err) = exec(&a, &["rx1", "app", "--", "/usr/bin/env", "seq", "1", "170000"], "");
    assert_eq!(code, 0, "{err}");
    let want: String = (1..=170_000).map(|i| format!("{i}\n")).collect();
    assert!(want.len() > 1_000_000);
    assert_eq!(out.len(), want.len(), "all of it");
    assert!(out == want, "in order, nothing duplicated");

    // Latency: one input frame to its echo, across replicas.
    let rt = echo_round_trips(&a, "rx1", 21);
    eprintln!(
        "echo round trip across replicas (A -> PostgreSQL -> B -> node and back): median {:?}, max {:?}",
        rt[rt.len() / 2],
        rt[rt.len() - 1]
    );
    assert!(rt[rt.len() - 1] < Duration::from_secs(1), "{rt:?}");

    // The operator stops reading: the command ends on the node.
    let left = format!("{m}1");
    let mut cli = a
        .command(&["exec", "rx1", "app", "--", "/bin/sleep", &left])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the command runs on the node", 20.0, || {
        (!pids_with_cmdline(&["/bin/sleep", &left]).is_empty()).then_some(())
    });
    cli.kill().unwrap();
    cli.wait().unwrap();
    wait_for("the node ends the command of a departed operator", 10.0, || {
        pids_with_cmdline(&["/bin/sleep", &left]).is_empty().then_some(())
    });

    // kill -9 of the operator's replica: the node's command ends within the lease.
    let orphan = format!("{m}2");
    let mut cli = a
        .command(&["exec", "rx1", "app", "--", "/bin/sleep", &orphan])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the command runs on the node", 20.0, || {
        (!pids_with_cmdline(&["/bin/sleep", &orphan]).is_empty()).then_some(())
    });
    a.kill();
    let t0 = Instant::now();
    wait_for("the node ends the command of a dead replica's operator", 20.0, || {
        pids_with_cmdline(&["/bin/sleep", &orphan]).is_empty().then_some(())
    });
    let took = t0.elapsed();
    eprintln!("kill -9 of the operator's replica -> command ended on the node: {took:?}");
    assert!(took < Duration::from_secs(10), "bounded by the 5 s lease: {took:?}");
    let _ = cli.wait();

    // Nothing is left in the store.
    wait_for("exec rows removed", 10.0, || {
        (psql(&store, "SELECT count(*) FROM exec_sessions") == "0"
            && psql(&store, "SELECT count(*) FROM exec_frames") == "0")
            .then_some(())
    });
    // The workload itself was never touched.
    assert_eq!(pids_with_cmdline(&["/bin/sleep", &m]).len(), 1);
}

#[test]
fn exec_input_is_its_operators_only_across_replicas() {
    let Some(store) = database("replicas_exec_owner") else {
        return;
    };
    let (a, b, c) = three(&store);
    let token = a.token(&[]);
    let _agent = b.join("rx2", &token).running();
    let m = marker();
    a.apply(&app("app", &m));
    running(&a, "rx2");
    // An operator account besides the admin.
    let olga = a.cli(&["user", "add", "olga", "--role", "operator"]).trim().to_string();
    // The admin opens a session through A that waits on its stdin.
    let mut cli = a
        .command(&["exec", "rx2", "app", "-i", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = wait_for("the session open", 20.0, || {
        let v = psql(&store, "SELECT id FROM exec_sessions WHERE out_open");
        (!v.is_empty()).then_some(v)
    });
    // Olga, through C, may not send it input; the admin through C may (any replica).
    let frame = |s: &str| outpost_api::exec::Frame::Stdin(s.as_bytes().to_vec()).encode();
    let post = |token: &str, body: Vec<u8>| {
        let o = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(c.ca_file())
            .args(["-H", &format!("authorization: Bearer {token}"), "--data-binary", "@-"])
            .arg(format!("{}/v1/exec/{id}/input", c.url))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut ch| {
                ch.stdin.take().unwrap().write_all(&body)?;
                ch.wait_with_output()
            })
            .unwrap();
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    assert_eq!(post(&olga, frame("from-olga\n")), "404");
    assert_eq!(post(a.token.trim(), frame("from-admin\n")), "200");
    let mut out = BufReader::new(cli.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "from-admin\n", "only the owner's input reached the node");
    drop(cli.stdin.take());
    let status = cli.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert_eq!(rest, "", "nothing of olga's");
}

#[test]
fn echo_round_trip_on_one_hub_for_comparison() {
    let hub = Hub::start();
    let t = hub.token(&[]);
    let _agent = hub.join("rx3", &t).running();
    let m = marker();
    hub.apply(&app("app", &m));
    running(&hub, "rx3");
    let rt = echo_round_trips(&hub, "rx3", 21);
    eprintln!(
        "echo round trip on one hub (SQLite, in memory): median {:?}, max {:?}",
        rt[rt.len() / 2],
        rt[rt.len() - 1]
    );
    assert!(rt[rt.len() - 1] < Duration::from_secs(1), "{rt:?}");
}

#[test]
fn kill_9_of_the_nodes_replica_ends_the_operators_session_with_the_reason() {
    let Some(store) = database("replicas_exec_node_side") else {
        return;
    };
    let (a, mut b, _c) = three(&store);
    let token = a.token(&[]);
    let _agent = b.join("rx4", &token).running();
    let m = marker();
    a.apply(&app("app", &m));
    running(&a, "rx4");
    let long = format!("{m}1");
    let cli = a
        .command(&["exec", "rx4", "app", "--", "/bin/sleep", &long])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the command runs on the node", 20.0, || {
        (!pids_with_cmdline(&["/bin/sleep", &long]).is_empty()).then_some(())
    });
    b.kill();
    let t0 = Instant::now();
    // The operator's replica notices within the lease and says why (the CLI exits by itself).
    let o = cli.wait_with_output().unwrap();
    let took = t0.elapsed();
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("kill -9 of the node's replica -> operator's session ended: {took:?}");
    assert_eq!(o.status.code(), Some(255), "{err}");
    assert!(err.contains("went away") || err.contains("link dropped"), "{err}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    // And the node, whose streams broke, ended the command.
    wait_for("the node ends the command", 20.0, || {
        pids_with_cmdline(&["/bin/sleep", &long]).is_empty().then_some(())
    });
}
