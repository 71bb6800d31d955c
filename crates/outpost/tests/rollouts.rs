//! Fleet rollouts end to end (issue 10): a real hub and real agents on loopback, process
//! workloads (and one Docker test for the maintenance window's prefetch). Each test states the
//! promise it checks; docs/rollouts.md describes the behaviour.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::*;
use serde_json::Value;

/// A process DaemonSet: revision content from `command` (a YAML flow list), gate of 1 s.
fn app(name: &str, command: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: {name}, labels: {{app: {name}}}}}\nspec:\n  minReadySeconds: 1\n  template:\n    spec:\n      runtimeClassName: process\n      terminationGracePeriodSeconds: 1\n      containers:\n      - {{name: main, command: {command}}}\n"
    )
}

fn sleeper(m: &str) -> String {
    format!("[/bin/sleep, '{m}']")
}

/// A revision that crashes at once on every node.
fn crasher(m: &str) -> String {
    format!("[/bin/sh, -c, 'echo crash-{m}; exit 3']")
}

/// A RolloutPolicy for workloads labelled `app: <name>`.
fn policy(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: outpost.dev/v1\nkind: RolloutPolicy\nmetadata: {{name: {name}}}\nspec:\n  selector: {{app: {name}}}\n{spec}"
    )
}

/// Join `n` agents named `<prefix>-<i>` with a token carrying `labels`.
fn join(hub: &Hub, prefix: &str, n: usize, labels: &str) -> Vec<Agent> {
    let token = hub.token(&["--labels", labels]);
    (0..n)
        .map(|i| {
            let mut a = hub.join(&format!("{prefix}-{i:02}"), &token);
            a.env.push(("OUTPOST_LOG".into(), "info".into()));
            a.running()
        })
        .collect()
}

fn rollout(hub: &Hub, name: &str) -> Value {
    hub.json(&["rollout", "status", name])
}

fn phase(hub: &Hub, name: &str) -> String {
    rollout(hub, name)["phase"].as_str().unwrap_or_default().to_string()
}

/// node -> (desired revision, running revision, node rollout state)
fn nodes_of(r: &Value) -> BTreeMap<String, (u64, Option<u64>, String)> {
    r["nodes"]
        .as_array()
        .map(|ns| {
            ns.iter()
                .map(|n| {
                    (
                        n["node"].as_str().unwrap().to_string(),
                        (
                            n["desired_revision"].as_u64().unwrap(),
                            n["running_revision"].as_u64(),
                            n["state"].as_str().unwrap().to_string(),
                        ),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Every node of `name` reports revision `rev` running and Ready, and its gate Complete.
fn all_on(hub: &Hub, name: &str, nodes: usize, rev: u64) -> Option<()> {
    let key = format!("daemonset/default/{name}");
    let all = hub.json(&["get", "workloads"]);
    let ps: Vec<&Value> = all.as_array()?.iter().filter(|p| p["key"] == key).collect();
    (ps.len() == nodes
        && ps.iter().all(|p| {
            p["desired_revision"] == rev
                && p["status"]["revision"] == rev
                && p["status"]["ready"] == true
                && p["status"]["rollout"]["state"] == "Complete"
        }))
    .then_some(())
}

/// GET an operator route with the admin token, as JSON.
fn api_json(hub: &Hub, path: &str) -> Value {
    let (_, body) = api_get(hub, path);
    serde_json::from_str(&body).unwrap_or(Value::Null)
}

/// The events a node reported (its agent's outbox, as stored at the hub).
fn node_events(hub: &Hub, node: &str) -> Vec<String> {
    api_json(hub, &format!("/v1/nodes/{node}"))["events"]
        .as_array()
        .map(|es| {
            es.iter()
                .map(|e| {
                    format!(
                        "{} {}",
                        e["reason"].as_str().unwrap_or(""),
                        e["message"].as_str().unwrap_or("")
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A webhook receiver on loopback: collects every JSON body POSTed to it.
struct Hooks {
    url: String,
    got: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
}

impl Hooks {
    fn start() -> Hooks {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://127.0.0.1:{}/hook", l.local_addr().unwrap().port());
        let got: std::sync::Arc<std::sync::Mutex<Vec<Value>>> = Default::default();
        let g = got.clone();
        // the thread ends with the test process
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                if let Some(v) = read_json_post(conn) {
                    g.lock().unwrap().push(v);
                }
            }
        });
        Hooks { url, got }
    }

    /// Reasons of the rollout events received for `workload`, in order.
    fn rollout_events(&self, workload: &str) -> Vec<String> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p["status"] == "rollout" && p["event"]["workload"] == workload)
            .map(|p| p["event"]["reason"].as_str().unwrap_or("").to_string())
            .collect()
    }

    fn alert(&self, name: &str, status: &str) -> bool {
        self.got
            .lock()
            .unwrap()
            .iter()
            .any(|p| p["alert"]["name"] == name && p["status"] == status)
    }
}

fn hub_log(hub: &Hub) -> String {
    std::fs::read_to_string(hub.dir.join("hub.log")).unwrap_or_default()
}

/// 12 agents, the built-in policy: a revision that crashes on every node stops at the canary.
/// No other node ever starts it, the fleet ends on the previous revision, and `rollout status`
/// names the canary's reason; RolloutFailed fires, and the webhooks get the rollout's events.
#[test]
fn a_crashing_revision_stops_at_the_canary_with_the_default_policy() {
    let hooks = Hooks::start();
    let hub = Hub::start_with(&["--webhook", &hooks.url], &[]);
    let _agents = join(&hub, "store", 12, "chain=retail");
    let (m1, m2) = (marker(), marker());
    hub.apply(&app("web", &sleeper(&m1)));
    wait_for("revision 1 on all 12 nodes", 90.0, || all_on(&hub, "web", 12, 1));
    assert_eq!(
        phase(&hub, "web"),
        "Complete",
        "a first revision goes everywhere at once"
    );

    hub.apply(&app("web", &crasher(&m2)));
    let r = wait_for("the rollout Failed", 90.0, || {
        let r = rollout(&hub, "web");
        (r["phase"] == "Failed").then_some(r)
    });
    assert_eq!(r["policy"], "default");
    let nodes = nodes_of(&r);
    let canary: Vec<&String> = nodes.iter().filter(|(_, v)| v.2 == "Failed").map(|(n, _)| n).collect();
    assert_eq!(canary.len(), 1, "exactly one canary: {nodes:?}");
    let canary = canary[0].clone();
    assert!(
        r["reason"].as_str().unwrap().contains("exited with code 3") && r["reason"].as_str().unwrap().contains(&canary),
        "the reason names the canary and why: {}",
        r["reason"]
    );
    // the fleet ends on revision 1: the canary by its own rollback, the rest never left it
    wait_for("every node back on revision 1", 60.0, || {
        let r = rollout(&hub, "web");
        nodes_of(&r).values().all(|v| v.1 == Some(1)).then_some(())
    });
    for (n, v) in nodes_of(&rollout(&hub, "web")) {
        if n != canary {
            assert_eq!(v.0, 1, "{n} is never handed revision 2");
            assert!(
                !node_events(&hub, &n).iter().any(|e| e.contains("revision 2")),
                "{n} never started revision 2: {:?}",
                node_events(&hub, &n)
            );
        }
    }
    let text = hub.cli(&["rollout", "status", "web"]);
    assert!(
        text.contains("Failed") && text.contains("exited with code 3") && text.contains(&canary),
        "{text}"
    );
    let alerts = hub.json(&["get", "alerts"]);
    assert!(
        alerts
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["name"] == "RolloutFailed" && a["subject"] == "daemonset/default/web"),
        "RolloutFailed fires: {alerts}"
    );
    wait_for("rollout events and RolloutFailed at the webhook", 30.0, || {
        let ev = hooks.rollout_events("daemonset/default/web");
        let want = ["RolloutStarted", "WaveStarted", "RolloutFailed", "RolloutRolledBack"];
        (want.iter().all(|w| ev.iter().any(|e| e == w)) && hooks.alert("RolloutFailed", "firing")).then_some(ev)
    });
    // -w ends at once with the failure
    let o = hub.try_cli(&["rollout", "status", "web", "-w"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("is Failed"));
}

/// A revision that fails only on nodes with a given label (a third of them): the canary (a good
/// node) passes, the threshold trips in a later wave, and every node already updated is back on
/// the previous revision.
#[test]
fn the_threshold_trips_in_a_later_wave_and_every_updated_node_goes_back() {
    let hub = Hub::start();
    let mut agents = join(&hub, "good", 7, "ring=good");
    agents.extend(join(&hub, "canary", 1, "ring=canary"));
    agents.extend(join(&hub, "flaky", 4, "ring=flaky"));
    hub.apply(&policy(
        "shop",
        "  waves:\n  - {name: canary, selector: {ring: canary}}\n  - {percent: 40}\n  - {percent: 100}\n  bake: 1s\n  failureThreshold: {percent: 20, minSample: 3}\n",
    ));
    let (m1, m2) = (marker(), marker());
    hub.apply(&app("shop", &sleeper(&m1)));
    wait_for("revision 1 on all 12 nodes", 90.0, || all_on(&hub, "shop", 12, 1));
    let bad =
        format!("[/bin/sh, -c, 'case \"$OUTPOST_NODE\" in flaky-*) echo bad-site; exit 3;; esac; exec sleep {m2}']");
    hub.apply(&app("shop", &bad));
    let r = wait_for("the rollout Failed", 120.0, || {
        let r = rollout(&hub, "shop");
        (r["phase"] == "Failed").then_some(r)
    });
    let waves = r["waves"].as_array().unwrap();
    let opened = waves.iter().filter(|w| w["state"] != "Planned").count();
    assert!(opened >= 2, "it tripped after the canary wave: {waves:#?}");
    assert_eq!(waves[0]["name"], "canary");
    assert_eq!(
        waves[0]["counts"]["Reverted"], 1,
        "the canary passed, then went back: {r}"
    );
    let nodes = nodes_of(&r);
    let failed: Vec<&String> = nodes.iter().filter(|(_, v)| v.2 == "Failed").map(|(n, _)| n).collect();
    assert!(
        !failed.is_empty() && failed.iter().all(|n| n.starts_with("flaky")),
        "{nodes:?}"
    );
    assert!(r["reason"].as_str().unwrap().contains("bad-site"), "{}", r["reason"]);
    // every node that ran revision 2 runs revision 1 again; none runs 2
    wait_for("every node on revision 1 again", 60.0, || {
        let r = rollout(&hub, "shop");
        nodes_of(&r).values().all(|v| v.1 == Some(1)).then_some(())
    });
    let reverted = nodes_of(&rollout(&hub, "shop"))
        .values()
        .filter(|v| v.2 == "Reverted")
        .count();
    assert!(reverted >= 1, "good nodes that had revision 2 were reverted");
    drop(agents);
}

/// A node offline during a rollout does not block it, and on return runs the revision its wave
/// reached. A node offline during a fleet rollback never runs the bad revision.
#[test]
fn offline_nodes_never_block_and_never_get_a_rolled_back_revision() {
    let hub = Hub::start();
    let mut agents = join(&hub, "site", 4, "chain=retail");
    hub.apply(&policy(
        "pos",
        "  waves:\n  - {count: 1}\n  - {percent: 100}\n  bake: 0s\n  tinyFleet: 1\n  failureThreshold: {percent: 50, minSample: 2}\n",
    ));
    let (m1, m2, m3) = (marker(), marker(), marker());
    hub.apply(&app("pos", &sleeper(&m1)));
    wait_for("revision 1 everywhere", 60.0, || all_on(&hub, "pos", 4, 1));

    // site-03 goes away (its agent dies; its workload keeps running)
    agents[3].kill9();
    wait_for("site-03 Offline", 20.0, || {
        (hub.node("site-03")?["status"] == "Offline").then_some(())
    });
    hub.apply(&app("pos", &sleeper(&m2)));
    let r = wait_for("the rollout Complete without site-03", 60.0, || {
        let r = rollout(&hub, "pos");
        (r["phase"] == "Complete").then_some(r)
    });
    let absent = &nodes_of(&r)["site-03"];
    assert_ne!(absent.1, Some(2), "site-03 was away the whole time: {r}");
    // back: it gets revision 2, the revision its wave reached
    agents[3].start();
    wait_for("site-03 runs revision 2", 60.0, || all_on(&hub, "pos", 4, 2));

    // now site-02 is offline while a bad revision fails on the others: one wave, fleet rollback
    hub.apply(&policy(
        "pos",
        "  waves:\n  - {percent: 100}\n  bake: 0s\n  tinyFleet: 1\n  failureThreshold: {percent: 50, minSample: 2}\n",
    ));
    agents[2].kill9();
    wait_for("site-02 Offline", 20.0, || {
        (hub.node("site-02")?["status"] == "Offline").then_some(())
    });
    hub.apply(&app("pos", &crasher(&m3)));
    let r = wait_for("the rollout Failed", 60.0, || {
        let r = rollout(&hub, "pos");
        (r["phase"] == "Failed").then_some(r)
    });
    assert_eq!(nodes_of(&r)["site-02"].0, 2, "site-02 is not handed revision 3: {r}");
    agents[2].start();
    wait_for("site-02 back and reporting revision 2", 60.0, || {
        let r = rollout(&hub, "pos");
        let v = &nodes_of(&r)["site-02"];
        (hub.node("site-02")?["status"] == "Online" && v.1 == Some(2)).then_some(())
    });
    // give it a few polls: it must stay on 2 and never start 3
    std::thread::sleep(std::time::Duration::from_secs(3));
    let r = rollout(&hub, "pos");
    assert_eq!(nodes_of(&r)["site-02"].0, 2);
    assert!(
        !node_events(&hub, "site-02").iter().any(|e| e.contains("revision 3")),
        "site-02 never started revision 3: {:?}",
        node_events(&hub, "site-02")
    );
    assert!(!agents[2].log().contains(&format!("crash-{m3}")));
}

/// Pause then resume; abort; undo; a new apply while a rollout is Failed starts at once.
#[test]
fn pause_resume_abort_undo_and_a_new_apply_after_a_failure() {
    let hub = Hub::start();
    let _agents = join(&hub, "box", 5, "chain=retail");
    hub.apply(&policy(
        "kiosk",
        "  waves:\n  - {count: 1, bake: 3s}\n  - {count: 2}\n  - {percent: 100}\n  bake: 1s\n  tinyFleet: 1\n",
    ));
    let m: Vec<String> = (0..6).map(|_| marker()).collect();
    hub.apply(&app("kiosk", &sleeper(&m[0])));
    wait_for("revision 1 everywhere", 60.0, || all_on(&hub, "kiosk", 5, 1));

    // pause right after the apply: only the canary gets revision 2
    hub.apply(&app("kiosk", &sleeper(&m[1])));
    let out = hub.cli(&["rollout", "pause", "kiosk"]);
    assert!(out.contains("Paused"), "{out}");
    std::thread::sleep(std::time::Duration::from_secs(6));
    let r = rollout(&hub, "kiosk");
    assert_eq!(r["phase"], "Paused");
    let on2 = nodes_of(&r).values().filter(|v| v.0 == 2).count();
    assert_eq!(on2, 1, "paused: no wave after the canary: {r}");
    let e = hub.cli_err(&["rollout", "pause", "kiosk"]);
    assert!(e.contains("Paused: there is nothing to pause"), "{e}");
    hub.cli(&["rollout", "resume", "kiosk"]);
    wait_for("revision 2 everywhere after resume", 60.0, || {
        all_on(&hub, "kiosk", 5, 2)
    });
    wait_for("the rollout Complete (last bake over)", 20.0, || {
        (phase(&hub, "kiosk") == "Complete").then_some(())
    });

    // abort after the canary: updated nodes keep 3, the rest keep 2, nothing moves on
    hub.apply(&app("kiosk", &sleeper(&m[2])));
    wait_for("the canary passed revision 3", 30.0, || {
        let r = rollout(&hub, "kiosk");
        (r["counts"]["Passed"] == 1).then_some(())
    });
    hub.cli(&["rollout", "abort", "kiosk"]);
    std::thread::sleep(std::time::Duration::from_secs(5));
    let r = rollout(&hub, "kiosk");
    assert_eq!(r["phase"], "Aborted");
    let revs: Vec<u64> = nodes_of(&r).values().map(|v| v.0).collect();
    assert_eq!(revs.iter().filter(|r| **r == 3).count(), 1, "{r}");
    assert_eq!(revs.iter().filter(|r| **r == 2).count(), 4, "{r}");

    // undo: the aborted rollout's updated node goes back to 2
    let out = hub.cli(&["rollout", "undo", "kiosk"]);
    assert!(out.contains("rolled back"), "{out}");
    wait_for("every node on revision 2", 30.0, || {
        let r = rollout(&hub, "kiosk");
        (r["phase"] == "RolledBack" && nodes_of(&r).values().all(|v| v.0 == 2 && v.1 == Some(2))).then_some(())
    });

    // a crashing revision fails at the canary; a new apply starts at once and completes
    hub.apply(&app("kiosk", &crasher(&m[3])));
    wait_for("revision 4 Failed", 60.0, || {
        (phase(&hub, "kiosk") == "Failed").then_some(())
    });
    hub.apply(&app("kiosk", &sleeper(&m[4])));
    let r = rollout(&hub, "kiosk");
    assert_eq!(r["revision"], 5);
    assert_eq!(r["phase"], "Progressing", "started at once: {r}");
    assert!(
        r["waves"][0]["state"] != "Planned",
        "the first wave opened with the apply: {r}"
    );
    wait_for("revision 5 everywhere", 90.0, || all_on(&hub, "kiosk", 5, 5));
    // the RolloutFailed alert of revision 4 resolved
    let alerts = hub.json(&["get", "alerts"]);
    let failed: Vec<&Value> = alerts
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["name"] == "RolloutFailed")
        .collect();
    assert!(
        !failed.is_empty() && failed.iter().all(|a| a["state"] == "Resolved"),
        "RolloutFailed fired for revision 4 and resolved with revision 5: {alerts}"
    );
}

/// `kill -9` of the hub between waves: after the restart the rollout goes on from the same wave
/// (the waves already open keep their nodes and times; nothing starts over).
#[test]
fn a_hub_killed_between_waves_resumes_from_the_same_wave() {
    let mut hub = Hub::start();
    let _agents = join(&hub, "node", 4, "chain=retail");
    hub.apply(&policy(
        "svc",
        "  waves:\n  - {count: 1}\n  - {count: 1}\n  - {percent: 100}\n  bake: 4s\n  tinyFleet: 1\n",
    ));
    let (m1, m2) = (marker(), marker());
    hub.apply(&app("svc", &sleeper(&m1)));
    wait_for("revision 1 everywhere", 60.0, || all_on(&hub, "svc", 4, 1));
    hub.apply(&app("svc", &sleeper(&m2)));
    let before = wait_for("the second wave open", 60.0, || {
        let r = rollout(&hub, "svc");
        (r["waves"][1]["state"] == "Open" || r["waves"][1]["state"] == "Baking").then_some(r)
    });
    hub.kill();
    hub.restart();
    let after = rollout(&hub, "svc");
    assert_eq!(after["revision"], 2);
    for i in 0..2 {
        assert_eq!(
            after["waves"][i]["opened_at"], before["waves"][i]["opened_at"],
            "wave {i} kept its opening time"
        );
    }
    let members = |r: &Value, wave: u64| -> Vec<String> {
        r["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["wave"] == wave)
            .map(|n| n["node"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(members(&after, 0), members(&before, 0));
    assert_eq!(members(&after, 1), members(&before, 1));
    wait_for("the rollout Complete after the restart", 60.0, || {
        (phase(&hub, "svc") == "Complete").then_some(())
    });
    let r = rollout(&hub, "svc");
    let started = r["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["reason"] == "RolloutStarted")
        .count();
    assert_eq!(started, 1, "not started over: {:#?}", r["events"]);
    let opened: Vec<u64> = r["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["reason"] == "WaveStarted")
        .map(|e| e["at"].as_u64().unwrap())
        .collect();
    assert_eq!(opened.len(), 3, "each wave opened once: {:#?}", r["events"]);
    wait_for("revision 2 everywhere", 60.0, || all_on(&hub, "svc", 4, 2));
}

// ---------------------------------------------------------------------------------------------
// Maintenance window with image prefetch (Docker Engine)

/// A busybox image (from the host's static busybox) with `sleep`, imported as `name`.
fn busybox_image(name: &str, label: &str) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("bin")).unwrap();
    std::fs::copy("/bin/busybox", dir.path().join("bin/busybox")).expect("busybox-static provides /bin/busybox");
    for a in ["sh", "sleep"] {
        std::os::unix::fs::symlink("busybox", dir.path().join("bin").join(a)).unwrap();
    }
    std::fs::write(dir.path().join("version"), label).unwrap();
    let script = format!(
        "tar -C {} -c . | docker import -c 'ENV PATH=/bin' - {name}",
        dir.path().display()
    );
    let o = Command::new("sh").args(["-c", &script]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A window that opens a few seconds after the apply: nothing activates before it, and the new
/// revision's image (held only by the hub) is already on the node when it opens.
#[test]
fn a_maintenance_window_activates_nothing_before_it_and_images_are_prefetched() {
    if !docker_ready() {
        return;
    }
    let hub = Hub::start();
    let _agents = join(&hub, "shop", 1, "chain=retail");
    let m = marker();
    let (v1, v2) = (format!("local/window:{m}-1"), format!("local/window:{m}-2"));
    busybox_image(&v1, "1");
    busybox_image(&v2, "2");
    // revision 2's image only on the hub
    let out = hub.cli(&["image", "push", &v2]);
    assert!(out.contains("pushed"), "{out}");
    docker(&["rmi", &v2]);
    assert!(!has_image(&v2));
    let dep = |image: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: till, labels: {{app: till}}}}\nspec:\n  replicas: 1\n  minReadySeconds: 1\n  template:\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n      - {{name: main, image: '{image}', command: [sleep, '3600']}}\n"
        )
    };
    hub.apply(&dep(&v1));
    wait_for("revision 1 running", 60.0, || {
        let p = hub.placement("shop-00", "deployment/default/till")?;
        (p["status"]["rollout"]["state"] == "Complete").then_some(())
    });
    let now_s = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    // the window opens 12 s after the apply (node-local: UTC here)
    let opens_at = now_s() + 12;
    let start = format!(
        "{:02}:{:02}:{:02}",
        (opens_at / 3600) % 24,
        (opens_at / 60) % 60,
        opens_at % 60
    );
    hub.apply(&policy(
        "till",
        &format!("  maintenanceWindows:\n  - {{start: '{start}', duration: 1h}}\n  timezone: UTC\n"),
    ));
    hub.apply(&dep(&v2));
    // before the window: waiting, revision 1 still runs, and the image arrives
    let r = rollout(&hub, "till");
    assert_eq!(r["nodes"][0]["state"], "Waiting", "{r}");
    wait_for("the image prefetched", 30.0, || has_image(&v2).then_some(()));
    assert!(now_s() < opens_at, "prefetched before the window opened");
    let p = hub.placement("shop-00", "deployment/default/till").unwrap();
    assert_eq!(p["desired_revision"], 1, "nothing activates before the window: {p}");
    assert_eq!(p["status"]["revision"], 1);
    // the window opens: revision 2 runs, with no download left to do
    let p = wait_for("revision 2 running after the window opened", 60.0, || {
        let p = hub.placement("shop-00", "deployment/default/till")?;
        (p["status"]["revision"] == 2 && p["status"]["rollout"]["state"] == "Complete").then_some(p)
    });
    assert!(now_s() >= opens_at, "activated inside the window: {p}");
    let log = hub_log(&hub);
    assert!(log.contains("WaveStarted") || log.contains("wave 1"), "hub log:\n{log}");
    hub.cli(&["delete", "deployment", "till"]);
    let _ = Command::new("docker").args(["rmi", &v1, &v2]).output();
}

/// A Job or CronJob is not kept running, so its node has no update gate to report: its new
/// revision reaches the node at once and no rollout is opened for it (one would never complete).
#[test]
fn a_cronjob_change_reaches_its_node_at_once_without_a_rollout() {
    let hub = Hub::start();
    let _agents = join(&hub, "cron", 1, "site=a");
    let cron = |m: &str| {
        format!(
            "apiVersion: batch/v1\nkind: CronJob\nmetadata: {{name: nightly}}\nspec:\n  schedule: '0 3 1 1 *'\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          runtimeClassName: process\n          restartPolicy: Never\n          containers:\n          - {{name: main, command: [/bin/echo, '{m}']}}\n"
        )
    };
    hub.apply(&cron("one"));
    hub.apply(&cron("two"));
    wait_for("the node holds revision 2 of the CronJob", 20.0, || {
        let p = hub.placement("cron-00", "cronjob/default/nightly")?;
        (p["desired_revision"] == 2 && p["status"]["revision"] == 2).then_some(())
    });
    let all = api_json(&hub, "/v1/rollouts");
    let keys: Vec<&Value> = all.as_array().unwrap().iter().map(|r| &r["workload"]).collect();
    assert!(
        !keys.iter().any(|k| k.as_str().is_some_and(|k| k.contains("nightly"))),
        "no rollout for a CronJob: {all}"
    );
    let err = api_json(&hub, "/v1/objects/cronjob/default/nightly/rollout").to_string();
    assert!(
        err.contains("only Deployments, DaemonSets, AgentUpdates and Pipelines"),
        "{err}"
    );
}
