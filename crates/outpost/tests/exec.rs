//! Remote exec through the hub and the node's own outbound link (docs/exec.md): a real hub and
//! agent on loopback, the real CLI, process and Docker workloads.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

fn app(name: &str, marker: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: {name}}}\nspec:\n  template:\n    spec:\n      runtimeClassName: process\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: main\n        image: 'sleeper:1'\n        command: [/bin/sleep, '{marker}']\n        env: [{{name: GREETING, value: hello-from-app}}]\n"
    )
}

#[test]
fn exec_round_trips_output_exit_codes_stdin_and_a_terminal_within_its_limits() {
    let hub = Hub::start();
    let t = hub.token(&[]);
    let mut agent = hub.join("ex1", &t).running();
    let m = marker();
    hub.apply(&app("app", &m));
    wait_for("app running", 30.0, || {
        (hub.phase("ex1", "daemonset/default/app").as_deref() == Some("Running")).then_some(())
    });

    // Output, stderr and the exit code; the workload's environment and working directory.
    let (code, out, err) = exec(
        &hub,
        &[
            "ex1",
            "app",
            "--",
            "/bin/sh",
            "-c",
            "echo out-$GREETING; echo to-stderr >&2; exit 3",
        ],
        "",
    );
    assert_eq!(code, 3, "stderr: {err}");
    assert_eq!(out, "out-hello-from-app\n");
    assert!(err.contains("to-stderr"), "{err}");

    // Interactive stdin, and the end of input reaches the command.
    let (code, out, err) = exec(
        &hub,
        &[
            "ex1",
            "daemonset/app",
            "-i",
            "--",
            "/bin/sh",
            "-c",
            "read a; echo got-$a; cat; echo done",
        ],
        "first\nsecond\nthird\n",
    );
    assert_eq!((code, out.as_str()), (0, "got-first\nsecond\nthird\ndone\n"), "{err}");

    // A terminal: the command runs on a pseudo-terminal with the size asked for.
    let (code, out, err) = exec(&hub, &["ex1", "app", "-t", "--", "/bin/sh", "-c", "tty"], "");
    assert_eq!(code, 0, "{err}");
    assert!(out.trim().starts_with("/dev/pts/"), "{out:?}");

    // A node shell runs outside the workload, from `/`.
    let (code, out, err) = exec(
        &hub,
        &["ex1", "--node-shell", "--", "/bin/sh", "-c", "pwd; echo x${GREETING}x"],
        "",
    );
    assert_eq!((code, out.as_str()), (0, "/\nxx\n"), "{err}");

    // What the node cannot run is said plainly.
    let (code, _, err) = exec(&hub, &["ex1", "nope", "--", "/bin/true"], "");
    assert_eq!(code, 255);
    assert!(err.contains("workload nope is not on this node"), "{err}");

    // A command past its time limit is cut off on the node.
    let long = format!("{m}1");
    let started = Instant::now();
    let (code, _, err) = exec(&hub, &["ex1", "app", "--timeout", "1s", "--", "/bin/sleep", &long], "");
    assert_eq!(code, 255);
    assert!(err.contains("ran past the session's 1s limit"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(15));
    wait_for("the cut-off command is gone", 10.0, || {
        pids_with_cmdline(&["/bin/sleep", &long]).is_empty().then_some(())
    });

    // An operator who leaves ends the command.
    let left = format!("{m}2");
    let mut cli = hub
        .command(&["exec", "ex1", "app", "--", "/bin/sleep", &left])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the command runs on the node", 20.0, || {
        (!pids_with_cmdline(&["/bin/sleep", &left]).is_empty()).then_some(())
    });
    cli.kill().unwrap();
    cli.wait().unwrap();
    wait_for("the node ends the command of a departed operator", 20.0, || {
        pids_with_cmdline(&["/bin/sleep", &left]).is_empty().then_some(())
    });

    // The workload itself was never touched.
    assert_eq!(pids_with_cmdline(&["/bin/sleep", &m]).len(), 1);

    // An offline node answers at once.
    agent.kill9();
    wait_for("ex1 offline", 30.0, || {
        (node_status(&hub, "ex1").as_deref() == Some("Offline")).then_some(())
    });
    let started = Instant::now();
    let (code, _, err) = exec(&hub, &["ex1", "app", "--", "/bin/true"], "");
    assert_ne!(code, 0);
    assert!(err.contains("node ex1 is offline since"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "answered at once");
}

#[test]
fn exec_in_a_docker_container_with_stdin_and_its_exit_code() {
    if !docker_ready() {
        return;
    }
    build_image("local/exec:1", &["sh", "sleep", "cat", "echo", "hostname"], "", &[]);
    let hub = Hub::start();
    let t = hub.token(&[]);
    let _agent = hub.join("ex2", &t).running();
    hub.apply(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: box}\nspec:\n  replicas: 1\n  template:\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n      - {name: main, image: 'local/exec:1', imagePullPolicy: Never, command: [sleep, '3600'], env: [{name: WHERE, value: in-container}]}\n",
    );
    wait_for("box running", 60.0, || {
        (hub.phase("ex2", "deployment/default/box").as_deref() == Some("Running")).then_some(())
    });
    let (code, out, err) = exec(
        &hub,
        &["ex2", "box", "--", "sh", "-c", "echo $WHERE; echo e >&2; exit 4"],
        "",
    );
    assert_eq!(code, 4, "{err}");
    assert_eq!(out, "in-container\n");
    assert!(err.contains('e'));
    let (code, out, err) = exec(&hub, &["ex2", "box", "-i", "--", "cat"], "through-the-link\n");
    assert_eq!((code, out.as_str()), (0, "through-the-link\n"), "{err}");
}

/// `outpost exec` as another account.
fn exec_as(hub: &Hub, token: &str, args: &[&str]) -> (i32, String) {
    let mut a = vec!["exec"];
    a.extend(args);
    let o = hub
        .command(&a)
        .env("OUTPOST_TOKEN", token)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

#[test]
fn exec_is_for_operators_within_their_sites_and_node_shells_for_admins() {
    let hub = Hub::start();
    let _a = hub.join("site-a-1", &hub.token(&["--labels", "site=a"])).running();
    let _b = hub.join("site-b-1", &hub.token(&["--labels", "site=b"])).running();
    let m = marker();
    hub.apply(&app("app", &m));
    for n in ["site-a-1", "site-b-1"] {
        wait_for("app running", 30.0, || {
            (hub.phase(n, "daemonset/default/app").as_deref() == Some("Running")).then_some(())
        });
    }
    let user = |name: &str, extra: &[&str]| {
        let mut a = vec!["user", "add", name];
        a.extend(extra);
        hub.cli(&a).trim().to_string()
    };
    let viewer = user("vera", &["--role", "viewer"]);
    let op_a = user("otto", &["--role", "operator", "--selector", "site=a"]);

    let (code, out) = exec_as(&hub, &viewer, &["site-a-1", "app", "--", "/bin/true"]);
    assert_ne!(code, 0);
    assert!(out.contains("vera") && out.contains("exec"), "{out}");

    // An operator of site a runs commands there, and sees no node of site b.
    let (code, out) = exec_as(&hub, &op_a, &["site-a-1", "app", "--", "/bin/sh", "-c", "echo in-a"]);
    assert_eq!((code, out.trim()), (0, "in-a"));
    let (code, out) = exec_as(&hub, &op_a, &["site-b-1", "app", "--", "/bin/true"]);
    assert_ne!(code, 0);
    assert!(out.contains("node site-b-1") && out.contains("not found"), "{out}");
    // A node shell is for admins.
    let (code, out) = exec_as(&hub, &op_a, &["site-a-1", "--node-shell", "--", "/bin/true"]);
    assert_ne!(code, 0);
    assert!(out.contains("otto"), "{out}");
    let (code, _, _) = exec(&hub, &["site-b-1", "--node-shell", "--", "/bin/true"], "");
    assert_eq!(code, 0);

    // Every session is in the audit log with its command line, the refused ones as denied.
    let audit = hub.cli(&["audit"]);
    assert!(audit.contains("otto") && audit.contains("echo in-a"), "{audit}");
    let entries = hub.json(&["audit"]);
    let denied = |user: &str, target: &str| {
        entries.as_array().unwrap().iter().any(|e| {
            e["user"] == user
                && e["action"] == "exec"
                && e["target"] == target
                && e["detail"] == "/bin/true"
                && e["result"].as_str().unwrap_or_default().starts_with("denied")
        })
    };
    assert!(denied("vera", "site-a-1 default/app"), "the viewer's exec: {entries:#}");
    assert!(denied("otto", "site-b-1 default/app"), "out of scope: {entries:#}");
    assert!(denied("otto", "site-a-1 (node shell)"), "a node shell: {entries:#}");
}
