//! Safe change end to end: probes of each kind, health-gated updates, automatic rollback to the
//! last-known-good on the node (online and offline), `rollout undo`, and crash mid-update.

mod common;

use common::*;
use serde_json::Value;

/// A Deployment of one replica running `sleep <marker>` plus optional extra container fields
/// (YAML flow entries appended to the container map) and spec fields.
fn deployment(name: &str, command: &str, container_extra: &str, spec_extra: &str) -> String {
    let min_ready = if spec_extra.contains("minReadySeconds") {
        ""
    } else {
        "  minReadySeconds: 1\n"
    };
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}}}\nspec:\n  replicas: 1\n{min_ready}{spec_extra}  template:\n    spec:\n      runtimeClassName: process\n      terminationGracePeriodSeconds: 1\n      containers:\n      - {{name: main, command: {command}{container_extra}}}\n"
    )
}

fn sleeper(m: &str) -> String {
    format!("[/bin/sleep, '{m}']")
}

fn rollout_of(p: &Value) -> Option<(String, u64, u64)> {
    let s = p.get("status")?;
    let r = s.get("rollout")?;
    Some((
        r["state"].as_str()?.to_string(),
        r["target_revision"].as_u64()?,
        s["revision"].as_u64()?,
    ))
}

fn wait_rollout(hub: &Hub, node: &str, key: &str, state: &str, target: u64, secs: f64) -> Value {
    wait_for(&format!("{key} on {node}: {state} at revision {target}"), secs, || {
        let p = hub.placement(node, key)?;
        let (s, t, _) = rollout_of(&p)?;
        (s == state && t == target).then_some(p)
    })
}

fn one_node(hub: &Hub, name: &str) -> Agent {
    let t = hub.token(&[]);
    hub.join(name, &t).running()
}

#[test]
fn probes_of_each_kind_pass_and_fail_as_kubernetes_would() {
    let hub = Hub::start();
    let _a = one_node(&hub, "probed");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = format!("[python3, -m, http.server, '{port}', --bind, 127.0.0.1]");
    let cases = [
        ("http-ok", format!(", ports: [{{containerPort: {port}, name: web}}], readinessProbe: {{httpGet: {{path: /, port: web}}, periodSeconds: 1}}"), true, ""),
        ("http-404", format!(", readinessProbe: {{httpGet: {{path: /missing, port: {port}}}, periodSeconds: 1, failureThreshold: 1}}"), false, "HTTP 404 from http://127.0.0.1"),
        ("tcp-ok", format!(", readinessProbe: {{tcpSocket: {{port: {port}}}, periodSeconds: 1}}"), true, ""),
        ("tcp-closed", format!(", readinessProbe: {{tcpSocket: {{port: {closed}}}, periodSeconds: 1, failureThreshold: 1}}"), false, "dial tcp 127.0.0.1"),
        ("exec-ok", ", readinessProbe: {exec: {command: [/bin/sh, -c, 'test -d /proc']}, periodSeconds: 1}".to_string(), true, ""),
        ("exec-fail", ", readinessProbe: {exec: {command: [/bin/sh, -c, 'echo nope >&2; exit 2']}, periodSeconds: 1, failureThreshold: 1}".to_string(), false, "exited with code 2: nope"),
    ];
    // one server process; the other workloads probe it
    hub.apply(&deployment("server", &server, "", ""));
    wait_for("server up", 10.0, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    // the server itself carries the http-ok probe; the others probe it from sleepers
    hub.apply(&deployment("server", &server, &cases[0].1, ""));
    for (name, extra, _, _) in &cases[1..] {
        hub.apply(&deployment(name, &sleeper(&marker()), extra, ""));
    }
    for (name, _, ready, failure) in &cases {
        let key = format!(
            "deployment/default/{}",
            if *name == "http-ok" { "server" } else { name }
        );
        let c = wait_for(&format!("{name}: ready={ready}"), 20.0, || {
            let p = hub.placement("probed", &key)?;
            let c = p["status"]["containers"][0].clone();
            let done =
                c["ready"] == *ready && (*ready || c["probe_failure"].as_str().is_some_and(|f| f.contains(failure)));
            done.then_some(c)
        });
        if !ready {
            assert!(
                c["probe_failure"]
                    .as_str()
                    .unwrap()
                    .starts_with("readiness probe failed: "),
                "{c}"
            );
            assert_eq!(c["phase"], "Running", "a failing readiness probe does not restart: {c}");
        }
    }
    let d = hub.cli(&["describe", "node", "probed"]);
    assert!(d.contains("HTTP 404"), "describe shows the probe failure:\n{d}");
}

#[test]
fn good_update_commits_and_bad_updates_roll_back_automatically() {
    let hub = Hub::start();
    let _a = one_node(&hub, "gate");
    let key = "deployment/default/app";
    let (m1, m2, m4) = (marker(), marker(), marker());
    hub.apply(&deployment("app", &sleeper(&m1), "", ""));
    wait_rollout(&hub, "gate", key, "Complete", 1, 15.0);
    // good update: revision 2 becomes the last-known-good
    hub.apply(&deployment("app", &sleeper(&m2), "", ""));
    wait_rollout(&hub, "gate", key, "Complete", 2, 15.0);
    assert!(pids_with_cmdline(&["/bin/sleep", &m1]).is_empty());
    assert_eq!(pids_with_cmdline(&["/bin/sleep", &m2]).len(), 1);

    // 1. exits at once -> crash loop -> back to revision 2, with exit code and last output
    hub.apply(&deployment("app", "[/bin/sh, -c, 'echo failing-v3; exit 7']", "", ""));
    let p = wait_rollout(&hub, "gate", key, "RolledBack", 3, 30.0);
    let reason = p["status"]["rollout"]["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("exited with code 7") && reason.contains("failing-v3"),
        "{reason}"
    );
    wait_for("revision 2 running again", 10.0, || {
        (pids_with_cmdline(&["/bin/sleep", &m2]).len() == 1).then_some(())
    });
    assert_eq!(p["status"]["revision"], 2);
    let status = hub.cli(&["rollout", "status", "app"]);
    assert!(
        status.contains("RolledBack") && status.contains("exited with code 7"),
        "{status}"
    );

    // 2. never Ready -> progress deadline -> rolled back, with the probe message
    hub.apply(&deployment(
        "app",
        &sleeper(&marker()),
        ", readinessProbe: {tcpSocket: {port: 1}, periodSeconds: 1, failureThreshold: 1}",
        "  progressDeadlineSeconds: 4\n",
    ));
    let p = wait_rollout(&hub, "gate", key, "RolledBack", 4, 30.0);
    let reason = p["status"]["rollout"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("progressDeadlineSeconds (4 s)") && reason.contains("readiness probe failed"),
        "{reason}"
    );
    wait_for("revision 2 running again", 10.0, || {
        (pids_with_cmdline(&["/bin/sleep", &m2]).len() == 1).then_some(())
    });

    // 3. Ready, then failing liveness -> restarted -> crash loop -> rolled back
    let flag = hub.dir.join("alive-flag");
    let cmd = format!(
        "[/bin/sh, -c, 'touch {f}; sleep 2; rm -f {f}; exec sleep {m4}']",
        f = flag.display()
    );
    hub.apply(&deployment(
        "app",
        &cmd,
        &format!(
            ", livenessProbe: {{exec: {{command: [test, -f, '{}']}}, periodSeconds: 1, failureThreshold: 1}}",
            flag.display()
        ),
        "  minReadySeconds: 60\n",
    ));
    let p = wait_rollout(&hub, "gate", key, "RolledBack", 5, 60.0);
    let reason = p["status"]["rollout"]["reason"].as_str().unwrap();
    assert!(reason.contains("liveness probe failed"), "{reason}");
    wait_for("revision 2 running again", 10.0, || {
        (pids_with_cmdline(&["/bin/sleep", &m2]).len() == 1).then_some(())
    });
    wait_for("revision 5 stopped", 10.0, || {
        pids_with_cmdline(&["sleep", &m4]).is_empty().then_some(())
    });

    // a failed revision never blocks the next: revision 6 is tried and commits
    let m6 = marker();
    hub.apply(&deployment("app", &sleeper(&m6), "", ""));
    wait_rollout(&hub, "gate", key, "Complete", 6, 15.0);
    assert_eq!(pids_with_cmdline(&["/bin/sleep", &m6]).len(), 1);
    assert!(pids_with_cmdline(&["/bin/sleep", &m2]).is_empty());
    let d = hub.cli(&["describe", "node", "gate"]);
    assert!(
        d.contains("RolledBack") && d.contains("RolloutComplete"),
        "events reach the hub:\n{d}"
    );
}

#[test]
fn rollout_undo_and_history() {
    let hub = Hub::start();
    let _a = one_node(&hub, "undo");
    let key = "deployment/default/app";
    let (m1, m2) = (marker(), marker());
    hub.apply(&deployment("app", &sleeper(&m1), "", ""));
    wait_rollout(&hub, "undo", key, "Complete", 1, 15.0);
    hub.apply(&deployment("app", &sleeper(&m2), "", ""));
    wait_rollout(&hub, "undo", key, "Complete", 2, 15.0);
    let out = hub.cli(&["rollout", "undo", "deployment", "app"]);
    assert!(out.contains("now revision 3"), "{out}");
    wait_for("revision 1's template runs again", 10.0, || {
        (pids_with_cmdline(&["/bin/sleep", &m1]).len() == 1 && pids_with_cmdline(&["/bin/sleep", &m2]).is_empty())
            .then_some(())
    });
    wait_rollout(&hub, "undo", key, "Complete", 3, 15.0);
    let h = hub.cli(&["rollout", "history", "deployment", "app"]);
    assert!(h.contains("3 (current)") && h.lines().count() == 4, "{h}");
    let out = hub.cli(&["rollout", "undo", "deployment", "app", "--to-revision", "2"]);
    assert!(out.contains("now revision 4"), "{out}");
    wait_for("revision 2's template runs", 10.0, || {
        (pids_with_cmdline(&["/bin/sleep", &m2]).len() == 1).then_some(())
    });
    let e = hub.cli_err(&["rollout", "undo", "deployment", "app", "--to-revision", "42"]);
    assert!(e.contains("has no revision 42"), "{e}");
}

#[test]
fn kill9_mid_update_with_the_hub_down_ends_with_the_good_revision() {
    let mut hub = Hub::start();
    let mut a = one_node(&hub, "midway");
    let key = "deployment/default/app";
    let m1 = marker();
    hub.apply(&deployment("app", &sleeper(&m1), "", ""));
    wait_rollout(&hub, "midway", key, "Complete", 1, 15.0);
    // a bad revision reaches the node; the gate is in progress when the hub and agent die
    hub.apply(&deployment("app", "[/bin/sh, -c, 'echo broken; exit 4']", "", ""));
    wait_rollout(&hub, "midway", key, "Progressing", 2, 15.0);
    hub.kill();
    a.kill9();
    a.start();
    // with no hub, the agent finishes the gate: it rolls back and revision 1 runs
    wait_for("agent rolled back offline", 30.0, || {
        a.log().contains("rolled back to revision 1").then_some(())
    });
    wait_for("revision 1 running", 10.0, || {
        (pids_with_cmdline(&["/bin/sleep", &m1]).len() == 1).then_some(())
    });
    // and it stays that way across another crash: no return to the bad revision
    a.kill9();
    a.start();
    wait_for("agent re-adopted revision 1", 10.0, || {
        a.log()
            .matches("re-adopted running process")
            .count()
            .ge(&1)
            .then_some(())
    });
    assert_eq!(pids_with_cmdline(&["/bin/sleep", &m1]).len(), 1);
    hub.restart();
    wait_rollout(&hub, "midway", key, "RolledBack", 2, 20.0);
}

/// Issue 10's defect: `progressDeadlineSeconds: 10` (valid in Kubernetes, whose minReadySeconds
/// defaults to 0) used to meet outpost's 10 s default minReadySeconds, so a healthy first
/// revision was marked Failed and a crashing second one was never rolled back. The default now
/// adapts (at most half the deadline), the healthy first revision becomes the last-known-good,
/// the crashing second rolls back to it, and an impossible explicit pair is refused at apply.
#[test]
fn a_short_progress_deadline_still_gives_a_last_known_good() {
    let hub = Hub::start();
    let _a = one_node(&hub, "short");
    let key = "deployment/default/app";
    let m1 = marker();
    let dep = |command: &str, extra: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: app}}\nspec:\n  replicas: 1\n  progressDeadlineSeconds: 10\n{extra}  template:\n    spec:\n      runtimeClassName: process\n      terminationGracePeriodSeconds: 1\n      containers:\n      - {{name: main, command: {command}}}\n"
        )
    };
    hub.apply(&dep(&sleeper(&m1), ""));
    let p = wait_rollout(&hub, "short", key, "Complete", 1, 30.0);
    assert_eq!(p["status"]["rollout"]["good_revision"], 1, "{p}");
    hub.apply(&dep("[/bin/sh, -c, 'echo crashing-v2; exit 3']", ""));
    let p = wait_rollout(&hub, "short", key, "RolledBack", 2, 40.0);
    assert_eq!(p["status"]["revision"], 1, "back on revision 1: {p}");
    wait_for("revision 1 running", 10.0, || {
        (pids_with_cmdline(&["/bin/sleep", &m1]).len() == 1).then_some(())
    });
    // an explicit pair that can never pass is refused, naming the field, and changes nothing
    let e = hub.apply_err(&dep(&sleeper(&marker()), "  minReadySeconds: 10\n"));
    assert!(
        e.contains("spec.minReadySeconds: 10 s is not less than spec.progressDeadlineSeconds (10 s)"),
        "{e}"
    );
    let revs = hub.cli(&["rollout", "history", "deployment", "app"]);
    assert!(revs.contains("2 (current)"), "nothing applied: {revs}");
}
