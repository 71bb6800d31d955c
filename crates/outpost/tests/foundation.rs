//! End-to-end tests of the foundation: real `outpost hub` and `outpost agent` processes on
//! loopback with real mTLS and temp dirs, driven through the CLI.

mod common;

use std::time::Instant;

use common::*;

#[test]
fn join_with_valid_token_and_rejected_joins() {
    let hub = Hub::start();
    // valid, with labels from the token and the node
    let t = hub.token(&["--labels", "site=s1", "--uses", "1", "--node-labels", "rack"]);
    let dir = hub.dir.join("a1");
    let out = std::process::Command::new(BIN)
        .args([
            "agent",
            "join",
            "--hub",
            &hub.url,
            "--token",
            &t,
            "--name",
            "box-1",
            "--labels",
            "rack=r7",
            "--data-dir",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let node = hub.node("box-1").expect("node listed");
    for (k, v) in [
        ("site", "s1"),
        ("rack", "r7"),
        ("kubernetes.io/hostname", "box-1"),
        ("kubernetes.io/os", "linux"),
    ] {
        assert_eq!(node["labels"][k], v, "label {k}");
    }
    assert!(node["labels"]["kubernetes.io/arch"].is_string());

    let join_err = |token: &str, name: &str| {
        let o = std::process::Command::new(BIN)
            .args([
                "agent",
                "join",
                "--hub",
                &hub.url,
                "--token",
                token,
                "--name",
                name,
                "--data-dir",
            ])
            .arg(hub.dir.join(format!("d-{name}")))
            .output()
            .unwrap();
        assert!(!o.status.success(), "join {name} should fail");
        assert!(
            !hub.dir.join(format!("d-{name}/identity.json")).exists(),
            "a failed join stores no identity"
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    // used up
    let e = join_err(&t, "box-2");
    assert!(e.contains("token_used_up") && e.contains("outpost token create"), "{e}");
    // expired
    let short = hub.token(&["--ttl", "1s"]);
    let t0 = Instant::now();
    wait_for("token expiry", 5.0, || (t0.elapsed().as_millis() > 1500).then_some(()));
    let e = join_err(&short, "box-3");
    assert!(e.contains("token_expired") && e.contains("outpost token create"), "{e}");
    // unknown token (right CA pin, made-up id)
    let good = hub.token(&[]);
    let parts: Vec<&str> = good.split(':').collect();
    let unknown = format!("outpost1:{}:deadbeef:{}", parts[1], parts[3]);
    let e = join_err(&unknown, "box-4");
    assert!(e.contains("token_unknown"), "{e}");
    // wrong CA pin: nothing is sent to the hub
    let wrong = format!("outpost1:{}:{}:{}", "0".repeat(64), parts[2], parts[3]);
    let e = join_err(&wrong, "box-5");
    assert!(e.contains("pins CA") && e.contains("another hub"), "{e}");
    // the real token still works after the wrong-pin attempt: it was never presented
    hub.join("box-6", &good);
    // a taken name
    let e = join_err(&good, "box-6");
    assert!(e.contains("already exists"), "{e}");
}

async fn mtls_call(ca: &str, cert: &str, key: &str, method: &str, url: &str) -> u16 {
    let tls = outpost_pki::client_config(ca, Some((cert, key))).unwrap();
    let c = reqwest::Client::builder().use_preconfigured_tls(tls).build().unwrap();
    let req = match method {
        "GET" => c.get(url),
        _ => c
            .post(url)
            .json(&serde_json::json!({"agent_version": "x", "uptime_secs": 1, "generation": 0, "full": true})),
    };
    req.header("x-outpost-protocol", "1")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "current_thread")]
async fn a_node_cannot_read_or_write_another_nodes_state() {
    outpost_pki::install_provider();
    let hub = Hub::start();
    let t = hub.token(&[]);
    let a = hub.join("node-a", &t);
    let _b = hub.join("node-b", &t);
    let (ca, cert, key) = a.identity();
    let base = &hub.url;
    // own state: allowed
    assert_eq!(
        mtls_call(
            &ca,
            &cert,
            &key,
            "GET",
            &format!("{base}/v1/nodes/node-a/sync?generation=0")
        )
        .await,
        200
    );
    assert_eq!(
        mtls_call(&ca, &cert, &key, "POST", &format!("{base}/v1/nodes/node-a/status")).await,
        200
    );
    // another node's state: 403, for reading and for writing
    assert_eq!(
        mtls_call(
            &ca,
            &cert,
            &key,
            "GET",
            &format!("{base}/v1/nodes/node-b/sync?generation=0")
        )
        .await,
        403
    );
    assert_eq!(
        mtls_call(&ca, &cert, &key, "POST", &format!("{base}/v1/nodes/node-b/status")).await,
        403
    );
    // a deleted node's certificate stops working at once
    hub.cli(&["delete", "node", "node-a"]);
    assert_eq!(
        mtls_call(
            &ca,
            &cert,
            &key,
            "GET",
            &format!("{base}/v1/nodes/node-a/sync?generation=0")
        )
        .await,
        401
    );
}

#[test]
fn apply_update_delete_reach_the_right_nodes() {
    let hub = Hub::start();
    let t1 = hub.token(&["--labels", "site=store-001"]);
    let t2 = hub.token(&["--labels", "site=store-002"]);
    let _a = hub.join("s1-a", &t1).running();
    let _b = hub.join("s1-b", &t1).running();
    let _c = hub.join("s2-a", &t2).running();
    wait_for("3 nodes online", 10.0, || {
        (hub.json(&["get", "nodes"])
            .as_array()?
            .iter()
            .filter(|n| n["status"] == "Online")
            .count()
            == 3)
            .then_some(())
    });
    let m1 = marker();
    let ds = sleeper_ds("mon", &m1, "      nodeSelector: {site: store-001}\n");
    let start = Instant::now();
    hub.apply(&ds);
    wait_for("DaemonSet running on both store-001 nodes", 2.0, || {
        (pids_with_cmdline(&["/bin/sleep", &m1]).len() == 2).then_some(())
    });
    let took = start.elapsed();
    eprintln!("apply -> running on 2 nodes: {took:?}");
    assert_eq!(
        hub.placement("s2-a", "daemonset/default/mon"),
        None,
        "store-002 must not run it"
    );
    wait_for("status at the hub", 5.0, || {
        (hub.phase("s1-a", "daemonset/default/mon")? == "Running").then_some(())
    });

    // update: a new revision replaces the old process
    let m2 = marker();
    let out = hub.apply(&sleeper_ds("mon", &m2, "      nodeSelector: {site: store-001}\n"));
    assert!(out.contains("configured (revision 2)"), "{out}");
    wait_for("revision 2 running, revision 1 gone", 5.0, || {
        (pids_with_cmdline(&["/bin/sleep", &m2]).len() == 2 && pids_with_cmdline(&["/bin/sleep", &m1]).is_empty())
            .then_some(())
    });
    wait_for("hub sees revision 2", 5.0, || {
        (hub.placement("s1-b", "daemonset/default/mon")?["status"]["revision"] == 2).then_some(())
    });
    let ds_list = hub.json(&["get", "daemonsets"]);
    assert_eq!(ds_list[0]["revision"], 2);

    // a Deployment with 1 replica lands on exactly one matching node
    let m3 = marker();
    hub.apply(&format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\nspec:\n  replicas: 1\n  template:\n    spec:\n      runtimeClassName: process\n      nodeSelector: {{site: store-002}}\n      containers:\n      - {{name: web, command: [/bin/sleep, '{m3}']}}\n"
    ));
    wait_for("deployment replica on s2-a", 3.0, || {
        (pids_with_cmdline(&["/bin/sleep", &m3]).len() == 1).then_some(())
    });
    wait_for("placement on s2-a", 3.0, || {
        hub.placement("s2-a", "deployment/default/web")
    });

    // delete -> stopped everywhere
    hub.cli(&["delete", "daemonset", "mon"]);
    wait_for("DaemonSet processes stopped", 5.0, || {
        pids_with_cmdline(&["/bin/sleep", &m2]).is_empty().then_some(())
    });
    let f = hub.dir.join("web.yaml");
    std::fs::write(&f, "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {template: {spec: {containers: [{name: web, image: x}]}}}\n").unwrap();
    let out = hub.cli(&["delete", "-f", f.to_str().unwrap()]);
    assert!(out.contains("Deployment/default/web deleted"), "{out}");
    wait_for("Deployment process stopped", 5.0, || {
        pids_with_cmdline(&["/bin/sleep", &m3]).is_empty().then_some(())
    });
}

#[test]
fn daemonset_reaches_a_node_that_joins_later() {
    let hub = Hub::start();
    let t = hub.token(&[]);
    let _a = hub.join("first", &t).running();
    let m = marker();
    hub.apply(&sleeper_ds("everywhere", &m, ""));
    wait_for("on the first node", 3.0, || {
        (pids_with_cmdline(&["/bin/sleep", &m]).len() == 1).then_some(())
    });
    let _b = hub.join("late", &t).running();
    wait_for("on the late node too", 5.0, || {
        (pids_with_cmdline(&["/bin/sleep", &m]).len() == 2).then_some(())
    });
    wait_for("hub shows it Running on the late node", 5.0, || {
        (hub.phase("late", "daemonset/default/everywhere")? == "Running").then_some(())
    });
}

#[test]
fn crash_is_restarted_with_backoff_and_reported() {
    let hub = Hub::start();
    let t = hub.token(&[]);
    let _a = hub.join("crashy", &t).running();
    hub.apply(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: crash}\nspec:\n  template:\n    spec:\n      runtimeClassName: process\n      containers:\n      - {name: c, command: [/bin/sh, -c, 'echo boom; exit 3']}\n",
    );
    let p = wait_for("CrashLoopBackOff at the hub", 20.0, || {
        let p = hub.placement("crashy", "daemonset/default/crash")?;
        (p["status"]["phase"] == "CrashLoopBackOff").then_some(p)
    });
    let c = &p["status"]["containers"][0];
    assert_eq!(c["last_exit_code"], 3);
    assert!(c["restarts"].as_u64().unwrap() >= 3, "{c}");
    assert!(c["reason"].as_str().unwrap().contains("exited with code 3"), "{c}");
    // backoff grows: restarts do not keep up with elapsed seconds
    let r0 = c["restarts"].as_u64().unwrap();
    let t0 = Instant::now();
    wait_for("one more restart", 30.0, || {
        let p = hub.placement("crashy", "daemonset/default/crash")?;
        (p["status"]["containers"][0]["restarts"].as_u64()? > r0).then_some(())
    });
    assert!(
        t0.elapsed().as_millis() >= 1000,
        "the next restart waited for its backoff"
    );
    let d = hub.cli(&["describe", "node", "crashy"]);
    assert!(
        d.contains("CrashLoopBackOff") && d.contains("exited with code 3"),
        "{d}"
    );
}

#[test]
fn workloads_keep_running_and_restarting_without_the_hub() {
    let mut hub = Hub::start();
    let t = hub.token(&[]);
    let _a = hub.join("alone", &t).running();
    let m = marker();
    hub.apply(&sleeper_ds("keep", &m, ""));
    let pid = wait_for("running", 3.0, || {
        pids_with_cmdline(&["/bin/sleep", &m]).first().copied()
    });
    hub.kill();
    // still running with the hub gone, and a crash is still handled locally
    assert_eq!(pids_with_cmdline(&["/bin/sleep", &m]), vec![pid]);
    // SAFETY: kill(2) on the workload process.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let new = wait_for("restarted while the hub is down", 5.0, || {
        pids_with_cmdline(&["/bin/sleep", &m])
            .first()
            .copied()
            .filter(|p| *p != pid)
    });
    assert_ne!(new, pid);
    // the hub comes back: status gathered offline arrives (restart count 1)
    hub.restart();
    wait_for("offline restart reported after reconnect", 15.0, || {
        let p = hub.placement("alone", "daemonset/default/keep")?;
        (p["status"]["containers"][0]["restarts"] == 1 && p["status"]["containers"][0]["pid"] == new).then_some(())
    });
    let d = hub.cli(&["describe", "node", "alone"]);
    assert!(
        d.contains("Killed by signal 9") || d.contains("exited"),
        "event from offline time reaches the hub:\n{d}"
    );
}

#[test]
fn agent_kill9_and_restart_with_hub_down_brings_everything_back_once() {
    let mut hub = Hub::start();
    let t = hub.token(&[]);
    let mut a = hub.join("power", &t).running();
    let marks: Vec<String> = (0..3).map(|_| marker()).collect();
    for (i, m) in marks.iter().enumerate() {
        hub.apply(&sleeper_ds(&format!("w{i}"), m, ""));
    }
    let count = |m: &String| pids_with_cmdline(&["/bin/sleep", m]).len();
    wait_for("3 workloads running", 5.0, || {
        marks.iter().all(|m| count(m) == 1).then_some(())
    });
    let before: Vec<u32> = marks.iter().map(|m| pids_with_cmdline(&["/bin/sleep", m])[0]).collect();
    hub.kill();

    // 1. agent crash: kill -9, workloads survive, restart with the hub down re-adopts them
    a.kill9();
    a.start();
    wait_for("agent re-adopted its workloads", 5.0, || {
        a.log()
            .matches("re-adopted running process")
            .count()
            .eq(&3)
            .then_some(())
    });
    let after: Vec<u32> = marks.iter().map(|m| pids_with_cmdline(&["/bin/sleep", m])[0]).collect();
    assert_eq!(before, after, "healthy workloads are adopted, not restarted");
    assert!(marks.iter().all(|m| count(m) == 1), "none duplicated");

    // 2. power cut: the agent and every workload die; start with the hub down
    a.kill9();
    for p in &before {
        // SAFETY: kill(2) on the workload process groups.
        unsafe { libc::kill(-(*p as i32), libc::SIGKILL) };
    }
    wait_for("all workloads dead", 3.0, || {
        marks.iter().all(|m| count(m) == 0).then_some(())
    });
    let t0 = Instant::now();
    a.start();
    wait_for("all 3 back within 3 s, hub unreachable", 3.0, || {
        marks.iter().all(|m| count(m) == 1).then_some(())
    });
    eprintln!("offline start -> 3 workloads running: {:?}", t0.elapsed());
    // and they stay single
    let t1 = Instant::now();
    wait_for("a second to pass", 2.0, || {
        (t1.elapsed().as_millis() > 1000).then_some(())
    });
    assert!(marks.iter().all(|m| count(m) == 1), "none duplicated after settling");
}

#[test]
fn hub_restart_keeps_nodes_tokens_and_apps() {
    let mut hub = Hub::start();
    let t = hub.token(&["--labels", "zone=z1"]);
    let _a = hub.join("keeper", &t).running();
    let m = marker();
    hub.apply(&sleeper_ds("persist", &m, ""));
    wait_for("running", 3.0, || {
        (pids_with_cmdline(&["/bin/sleep", &m]).len() == 1).then_some(())
    });
    let token_before = std::fs::read_to_string(hub.dir.join("hub/admin.token")).unwrap();
    hub.restart();
    assert_eq!(
        std::fs::read_to_string(hub.dir.join("hub/admin.token")).unwrap(),
        token_before,
        "admin token kept"
    );
    assert_eq!(hub.node("keeper").unwrap()["labels"]["zone"], "z1");
    assert_eq!(hub.json(&["get", "daemonsets"])[0]["name"], "persist");
    // the token made before the restart still joins
    let _b = hub.join("after-restart", &t).running();
    wait_for("DaemonSet reaches the new node", 5.0, || {
        (pids_with_cmdline(&["/bin/sleep", &m]).len() == 2).then_some(())
    });
    // the first agent reconnects and is Online
    wait_for("keeper online again", 10.0, || {
        (hub.node("keeper")?["status"] == "Online").then_some(())
    });
}

#[test]
fn bad_manifests_are_rejected_with_field_and_nothing_is_stored() {
    let hub = Hub::start();
    let good = sleeper_ds("ok", "1", "");
    let cases: &[(&str, &str)] = &[
        ("kind: Deployment\napiVersion: apps/v1\nmetadata: {name: [x\n", "not valid YAML"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n", "kind: Pod is not supported"),
        (
            "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: d}\nspec: {template: {spec: {containers: [{name: a, image: x, lifecycle: {}}]}}}\n",
            "containers[0].lifecycle: unknown field",
        ),
        (
            "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: d}\nspec: {template: {spec: {containers: [{name: a, image: x, env: [{name: E, valueFrom: {configMapKeyRef: {name: missing, key: k}}}]}]}}}\n",
            "ConfigMap default/missing does not exist",
        ),
    ];
    for (bad, want) in cases {
        // a good document in the same file must not be stored either
        let e = hub.apply_err(&format!("{good}---\n{bad}"));
        assert!(e.contains(want), "want {want:?} in:\n{e}");
        assert!(
            e.contains("bad.yaml") || e.contains("DaemonSet default/d"),
            "the error names the document:\n{e}"
        );
        assert_eq!(
            hub.json(&["get", "daemonsets"]),
            serde_json::json!([]),
            "nothing stored for {want}"
        );
    }
    // the same good document alone is accepted
    assert!(hub.apply(&good).contains("created"));
}

#[test]
fn a_hung_docker_socket_does_not_delay_process_workloads() {
    // A socket that accepts connections and never answers, like a socket-activated engine that
    // is still starting at boot.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("docker.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming() {
            held.push(c);
        }
    });
    let mut hub = Hub::start();
    let t = hub.token(&[]);
    let mut a = hub.join("booting", &t);
    a.env.push(("OUTPOST_DOCKER_SOCKET".into(), sock.display().to_string()));
    a.start();
    let m = marker();
    hub.apply(&sleeper_ds("proc", &m, ""));
    hub.apply(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: boxed}\nspec:\n  template:\n    spec:\n      containers:\n      - {name: c, image: 'local/web:1'}\n",
    );
    wait_for("process workload running", 5.0, || {
        (pids_with_cmdline(&["/bin/sleep", &m]).len() == 1).then_some(())
    });
    let w = wait_for("the container waits for the engine, with the reason", 10.0, || {
        let p = hub.placement("booting", "daemonset/default/boxed")?;
        (p["status"]["phase"] == "WaitingForRuntime").then_some(p)
    });
    assert!(
        w["status"]["containers"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("waiting for the Docker Engine"),
        "{w}"
    );
    // power cut with the hub down: the process workload is back within 3 s despite the socket
    hub.kill();
    a.kill9();
    for p in pids_with_cmdline(&["/bin/sleep", &m]) {
        // SAFETY: kill(2) on the workload's process group.
        unsafe { libc::kill(-(p as i32), libc::SIGKILL) };
    }
    wait_for("workload dead", 3.0, || {
        pids_with_cmdline(&["/bin/sleep", &m]).is_empty().then_some(())
    });
    a.start();
    wait_for("back within 3 s", 3.0, || {
        (pids_with_cmdline(&["/bin/sleep", &m]).len() == 1).then_some(())
    });
}
