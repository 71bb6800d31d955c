//! The hub on PostgreSQL (`outpost hub --store postgres://...`, docs/postgres.md): real hub and
//! agent processes, a real PostgreSQL (the server `OUTPOST_TEST_PG` names, or the tests' own
//! throwaway cluster; a database per test).

mod common;

use common::*;

/// A fresh database; None (test skipped, said why) outside CI without PostgreSQL.
fn database(case: &str) -> Option<String> {
    outpost_hub::store::testkit::pg_database(case)
}

#[test]
fn a_hub_on_postgres_joins_runs_reports_and_keeps_it_all_across_a_restart() {
    let Some(url) = database("e2e") else { return };
    let mut hub = Hub::start_with(&["--store", &url], &[("OUTPOST_CA_KEY_SECRET", "pg-e2e-secret")]);
    let t = hub.token(&["--labels", "zone=z1"]);
    let _a = hub.join("pg-keeper", &t).running();
    let m = marker();
    hub.apply(&sleeper_ds("pgapp", &m, ""));
    wait_for("the workload runs on the agent", 10.0, || {
        (pids_with_cmdline(&["/bin/sleep", &m]).len() == 1).then_some(())
    });
    wait_for("the agent reports it Running", 10.0, || {
        (hub.phase("pg-keeper", "daemonset/default/pgapp")? == "Running").then_some(())
    });
    // The state is in PostgreSQL.
    assert_eq!(psql(&url, "SELECT name FROM nodes"), "pg-keeper");
    assert_eq!(psql(&url, "SELECT count(*) FROM objects WHERE name = 'pgapp'"), "1");
    assert_eq!(
        psql(&url, "SELECT count(*) FROM workload_status WHERE node = 'pg-keeper'"),
        "1"
    );
    assert_eq!(psql(&url, "SELECT value FROM meta WHERE key = 'schema_version'"), "8");

    hub.restart();
    assert_eq!(hub.node("pg-keeper").unwrap()["labels"]["zone"], "z1");
    assert_eq!(hub.json(&["get", "daemonsets"])[0]["name"], "pgapp");
    // The token made before the restart still joins, and the DaemonSet reaches the new node.
    let _b = hub.join("pg-after", &t).running();
    wait_for("the DaemonSet reaches the new node", 10.0, || {
        (pids_with_cmdline(&["/bin/sleep", &m]).len() == 2).then_some(())
    });
    wait_for("the first agent is Online again", 10.0, || {
        (hub.node("pg-keeper")?["status"] == "Online").then_some(())
    });
    wait_for("the new node reports Running", 10.0, || {
        (hub.phase("pg-after", "daemonset/default/pgapp")? == "Running").then_some(())
    });
    assert_eq!(psql(&url, "SELECT count(*) FROM nodes"), "2");
}

#[test]
fn a_bad_or_unreachable_store_is_refused_with_the_reason_and_no_password() {
    let dir = tempfile::tempdir().unwrap();
    let run = |store: &str| {
        let out = outpost_under::<&str>(&[])
            .args(["hub", "--listen", &format!("127.0.0.1:{}", free_port()), "--data-dir"])
            .arg(dir.path().join("hub"))
            .args(["--store", store])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{store}: the hub must not start");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let e = run("mysql://u:hunter2@db/x");
    assert!(
        e.contains("--store") && e.contains("neither `sqlite` nor a PostgreSQL URL"),
        "{e}"
    );
    assert!(!e.contains("hunter2"), "{e}");
    let port = free_port();
    let e = run(&format!("postgres://u:hunter2@127.0.0.1:{port}/x"));
    assert!(
        e.contains(&format!(
            "cannot open the PostgreSQL store postgres://u:***@127.0.0.1:{port}/x"
        )),
        "{e}"
    );
    assert!(!e.contains("hunter2"), "{e}");
}
