//! Agent self-update through the hub (`outpost agent publish` + `kind: AgentUpdate`): to a good
//! binary (the node reports the new version, its workload is never restarted), then to a
//! binary that exits at once (the watchdog, running the old binary, restores it by itself and
//! the node reports the old version again, workload untouched, the rollback as an event).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use common::*;
use sha2::{Digest, Sha256};

fn digest(p: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(p).unwrap()))
}

/// Agents of this data dir (the first one and any the watchdog started), by /proc.
fn agent_pids(data: &Path) -> Vec<u32> {
    pids_of(data, false)
}

/// Agents, and with `watchdogs` the update watchdogs too, of this data dir.
fn pids_of(data: &Path, watchdogs: bool) -> Vec<u32> {
    let needle = data.display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        // the watchdog carries the agent's arguments too: it is not an agent
        let watchdog = args.iter().any(|a| a == "update-watchdog");
        if (watchdogs || !watchdog) && args.iter().any(|a| a == "run") && args.contains(&needle) {
            out.push(pid);
        }
    }
    out
}

struct Cleanup {
    data: PathBuf,
    child: Option<Child>,
    markers: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for pid in pids_of(&self.data, true) {
            // SAFETY: kill(2) of agents this test started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        for m in &self.markers {
            for pid in pids_with_cmdline(&["/bin/sleep", m]) {
                // SAFETY: kill(2) of this test's workloads.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

#[test]
fn agent_updates_itself_and_rolls_back_a_bad_binary_without_restarting_workloads() {
    let hub = Hub::start();
    let dir = tempfile::tempdir().unwrap();
    let (good, bad) = builds(dir.path());
    let token = hub.token(&["--labels", "site=upd"]);
    let TestAgent { exe, data, mut cleanup } = own_agent(&hub, dir.path(), "upd-box", &token);
    let agent_pid = cleanup.child.as_ref().unwrap().id();
    let m = marker();
    cleanup.markers.push(m.clone());
    hub.apply(&sleeper_ds("steady", &m, ""));
    let w = wait_for("the workload runs", 30.0, || {
        pids_with_cmdline(&["/bin/sleep", &m]).first().copied()
    });
    let version_of = |d: &str| format!("+{}", &d[..12]);
    let reported = || {
        hub.node("upd-box")
            .and_then(|n| n["agent_version"].as_str().map(String::from))
            .unwrap_or_default()
    };
    let old = digest(&exe);
    wait_for("the agent reports its version", 30.0, || {
        reported().ends_with(&version_of(&old)).then_some(())
    });

    // update to a good binary
    let manifest = hub.cli(&["agent", "publish", good.to_str().unwrap(), "--version", "test-good"]);
    assert!(
        manifest.contains("kind: AgentUpdate") && manifest.contains(&digest(&good)),
        "{manifest}"
    );
    hub.apply(&manifest.replace("healthDeadlineSeconds: 120", "healthDeadlineSeconds: 60"));
    let new = digest(&good);
    wait_for("the node runs and reports the new agent", 60.0, || {
        reported().ends_with(&version_of(&new)).then_some(())
    });
    assert_eq!(digest(&exe), new, "the executable was swapped");
    assert_eq!(agent_pids(&data), vec![agent_pid], "exec kept the agent's process");
    wait_for("the update is confirmed", 30.0, || {
        (!data.join("update/pending.json").exists()).then_some(())
    });
    assert_eq!(
        pids_with_cmdline(&["/bin/sleep", &m]),
        vec![w],
        "the workload was not restarted"
    );

    // update to a binary that exits at once: back on the good one by itself
    let manifest = hub.cli(&["agent", "publish", bad.to_str().unwrap()]);
    hub.apply(&manifest.replace("healthDeadlineSeconds: 120", "healthDeadlineSeconds: 30"));
    let broken = digest(&bad);
    wait_for("the broken release was tried", 60.0, || {
        std::fs::read_to_string(data.join("update/failed.json"))
            .ok()
            .filter(|f| f.contains(&broken))
    });
    wait_for("the restored agent reports again", 60.0, || {
        let p = agent_pids(&data);
        (p.len() == 1 && p[0] != agent_pid && reported().ends_with(&version_of(&new))).then_some(())
    });
    assert_eq!(digest(&exe), new, "the previous binary is back in place");
    assert_eq!(
        pids_with_cmdline(&["/bin/sleep", &m]),
        vec![w],
        "the workload was not restarted"
    );
    wait_for("the rollback is reported", 30.0, || {
        hub.cli(&["describe", "node", "upd-box"])
            .contains("AgentUpdateRolledBack")
            .then_some(())
    });
    // it is not tried again
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(digest(&exe), new);
    if let Some(mut c) = cleanup.child.take() {
        let _ = c.wait();
    }
}

/// A different good build (the test binary with trailing bytes: another digest) and a broken
/// release (exits at once), in `dir`.
fn builds(dir: &Path) -> (PathBuf, PathBuf) {
    let good = dir.join("outpost-good");
    let mut bytes = std::fs::read(BIN).unwrap();
    bytes.extend_from_slice(format!("outpost-test-build-{}", std::process::id()).as_bytes());
    std::fs::write(&good, &bytes).unwrap();
    let bad = dir.join("outpost-bad");
    std::fs::write(&bad, "#!/bin/sh\nexit 1\n").unwrap();
    for f in [&good, &bad] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    (good, bad)
}

/// A joined, running agent with its own executable (a hard link to the test binary until it
/// updates, so the swap replaces only its own path) and data dir under `root/name`.
struct TestAgent {
    exe: PathBuf,
    data: PathBuf,
    cleanup: Cleanup,
}

fn own_agent(hub: &Hub, root: &Path, name: &str, token: &str) -> TestAgent {
    let bin_dir = root.join(name).join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let exe = bin_dir.join("outpost");
    if std::fs::hard_link(BIN, &exe).is_err() {
        std::fs::copy(BIN, &exe).unwrap();
    }
    let data = root.join(name).join("data");
    let o = Command::new(&exe)
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
        .arg(&data)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = std::fs::File::create(root.join(format!("{name}.log"))).unwrap();
    let child = Command::new(&exe)
        .args(["agent", "run", "--data-dir"])
        .arg(&data)
        .env("OUTPOST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    TestAgent {
        exe,
        cleanup: Cleanup {
            data: data.clone(),
            child: Some(child),
            markers: Vec::new(),
        },
        data,
    }
}

/// The agent binary rolls out to the fleet in waves like any release: one canary node first,
/// the others after its bake; a binary that fails on the canary stops there (the fleet
/// rollout fails) and no other node ever downloads or runs it.
#[test]
fn agent_updates_roll_out_canary_first_and_a_bad_binary_stops_at_the_canary() {
    let hub = Hub::start();
    let dir = tempfile::tempdir().unwrap();
    let (good, bad) = builds(dir.path());
    let old = digest(Path::new(BIN));
    let new = digest(&good);
    let broken = digest(&bad);

    // every workload of this hub: one canary node, then the rest after 6 s
    hub.apply(
        "apiVersion: outpost.dev/v1\nkind: RolloutPolicy\nmetadata: {name: agents}\nspec:\n  waves:\n  - {name: canary, count: 1}\n  - {name: rest, percent: 100}\n  bake: 6s\n  tinyFleet: 1\n",
    );
    let token = hub.token(&["--labels", "site=wave", "--uses", "4"]);
    let names = ["wave-0", "wave-1", "wave-2", "wave-3"];
    let agents: Vec<TestAgent> = names.iter().map(|n| own_agent(&hub, dir.path(), n, &token)).collect();
    let reported = |node: &str| {
        hub.node(node)
            .and_then(|n| n["agent_version"].as_str().map(String::from))
            .unwrap_or_default()
    };
    let on = |d: &str| format!("+{}", &d[..12]);
    wait_for("four agents report their version", 60.0, || {
        names.iter().all(|n| reported(n).ends_with(&on(&old))).then_some(())
    });

    let manifest = hub.cli(&["agent", "publish", good.to_str().unwrap(), "--version", "wave-good"]);
    hub.apply(&manifest.replace("healthDeadlineSeconds: 120", "healthDeadlineSeconds: 60"));
    let rollout = || hub.json(&["rollout", "status", "agentupdate", "agent"]);
    let canary = wait_for("the canary runs the new agent", 90.0, || {
        names
            .iter()
            .find(|n| reported(n).ends_with(&on(&new)))
            .map(|n| n.to_string())
    });
    let others: Vec<&str> = names.iter().copied().filter(|n| *n != canary).collect();
    // the canary's wave bakes 6 s after its gate: the others are still on the old binary
    for n in &others {
        assert!(
            reported(n).ends_with(&on(&old)),
            "{n} updated before the canary's bake ended"
        );
    }
    let r = rollout();
    let wave0: Vec<&str> = r["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["wave"] == 0)
        .filter_map(|n| n["node"].as_str())
        .collect();
    assert_eq!(wave0, vec![canary.as_str()], "{r}");
    // Three agents swap their executables and restart, then the rollout's gates pass: under
    // the whole suite's load on two cores this took up to ~150 s (67 s alone).
    wait_for("every node runs the new agent and the rollout completes", 240.0, || {
        (names.iter().all(|n| reported(n).ends_with(&on(&new))) && rollout()["phase"] == "Complete").then_some(())
    });
    for a in &agents {
        assert_eq!(digest(&a.exe), new, "{} swapped its executable", a.data.display());
    }

    // a binary that exits at once: the canary's watchdog restores it, the rollout fails, and
    // the other nodes never receive it
    let manifest = hub.cli(&["agent", "publish", bad.to_str().unwrap()]);
    hub.apply(&manifest.replace("healthDeadlineSeconds: 120", "healthDeadlineSeconds: 20"));
    let r = wait_for("the fleet rollout of the broken agent fails", 120.0, || {
        let r = rollout();
        (r["revision"] == 2 && r["phase"] == "Failed").then_some(r)
    });
    let tried: Vec<&TestAgent> = agents
        .iter()
        .filter(|a| std::fs::read_to_string(a.data.join("update/failed.json")).is_ok_and(|f| f.contains(&broken)))
        .collect();
    assert_eq!(tried.len(), 1, "only one node tried the broken agent: {r}");
    wait_for("every node runs the good agent again", 90.0, || {
        names.iter().all(|n| reported(n).ends_with(&on(&new))).then_some(())
    });
    let canary_data = tried[0].data.clone();
    for a in &agents {
        assert_eq!(digest(&a.exe), new, "{} runs the good binary", a.data.display());
        if a.data == canary_data {
            continue;
        }
        let fetched: Vec<String> = walk(&a.data.join("update"));
        assert!(
            !fetched.iter().any(|f| f.contains(&broken[..12])),
            "{} outside the canary wave fetched the broken agent: {fetched:?}",
            a.data.display()
        );
    }
    drop(agents);
}

/// Every file name under `dir`, recursively.
fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p.display().to_string());
    }
    out
}
