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
    let bin_dir = dir.path().join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let exe = bin_dir.join("outpost");
    std::fs::copy(BIN, &exe).unwrap();
    // a different good build: the same program with trailing bytes (another digest)
    let good = dir.path().join("outpost-good");
    let mut bytes = std::fs::read(BIN).unwrap();
    bytes.extend_from_slice(format!("outpost-test-build-{}", std::process::id()).as_bytes());
    std::fs::write(&good, &bytes).unwrap();
    // a broken release: exits at once
    let bad = dir.path().join("outpost-bad");
    std::fs::write(&bad, "#!/bin/sh\nexit 1\n").unwrap();
    for f in [&exe, &good, &bad] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    let data = dir.path().join("agent");
    let token = hub.token(&["--labels", "site=upd"]);
    let o = Command::new(&exe)
        .args([
            "agent",
            "join",
            "--hub",
            &hub.url,
            "--token",
            &token,
            "--name",
            "upd-box",
            "--data-dir",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let child = Command::new(&exe)
        .args(["agent", "run", "--data-dir"])
        .arg(&data)
        .env("OUTPOST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let agent_pid = child.id();
    let m = marker();
    let mut cleanup = Cleanup {
        data: data.clone(),
        child: Some(child),
        markers: vec![m.clone()],
    };
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
