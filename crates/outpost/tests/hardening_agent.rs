//! Agent hardening end to end (issue 9, defects 7 and 8): a corrupt or deleted `state.db`, with
//! the hub up and down, and a full disk under the agent's data dir. Real hub and agent
//! processes, real SQLite files, a real tmpfs.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// A process DaemonSet running `sleep <marker>` that passes its update gate after 1 s.
fn ds(name: &str, marker: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: {name}}}\nspec:\n  minReadySeconds: 1\n  template:\n    spec:\n      runtimeClassName: process\n      terminationGracePeriodSeconds: 1\n      containers:\n      - {{name: main, image: 'sleeper:1', command: [/bin/sleep, '{marker}']}}\n"
    )
}

fn pid_of(marker: &str) -> Option<u32> {
    match pids_with_cmdline(&["/bin/sleep", marker])[..] {
        [p] => Some(p),
        _ => None,
    }
}

/// A hub, one agent running two workloads that passed their gates, and an event the hub has
/// stored (so a new database that restarted its event sequence at 1 would collide with it).
struct Site {
    hub: Hub,
    agent: Agent,
    marks: Vec<String>,
    pids: Vec<u32>,
}

fn site(name: &str) -> Site {
    let hub = Hub::start();
    let t = hub.token(&[]);
    let mut agent = hub.join(name, &t);
    agent.start();
    let marks: Vec<String> = (0..2).map(|_| marker()).collect();
    for (i, m) in marks.iter().enumerate() {
        hub.apply(&ds(&format!("w{i}"), m));
    }
    for i in 0..2 {
        wait_for("both gates complete", 20.0, || {
            let p = hub.placement(name, &format!("daemonset/default/w{i}"))?;
            (p["status"]["rollout"]["state"] == "Complete").then_some(())
        });
    }
    // one crash: the hub stores an `Exited` event with sequence 1 or more
    let first = pid_of(&marks[0]).expect("running");
    // SAFETY: kill(2) on the workload process.
    unsafe { libc::kill(first as i32, libc::SIGKILL) };
    wait_for("the crash reported to the hub", 20.0, || {
        hub.cli(&["describe", "node", name]).contains("exited").then_some(())
    });
    let pids = marks
        .iter()
        .map(|m| wait_for("restarted", 10.0, || pid_of(m).filter(|p| *p != first)))
        .collect();
    Site {
        hub,
        agent,
        marks,
        pids,
    }
}

impl Site {
    fn db(&self) -> PathBuf {
        self.agent.dir.join("state.db")
    }

    fn pids_now(&self) -> Vec<Option<u32>> {
        self.marks.iter().map(|m| pid_of(m)).collect()
    }

    /// The workloads run, each once, with the PIDs they had before.
    fn assert_same_pids(&self, what: &str) {
        let want: Vec<Option<u32>> = self.pids.iter().map(|p| Some(*p)).collect();
        assert_eq!(self.pids_now(), want, "{what}: workloads kept their processes");
    }

    /// The hub shows both workloads Running with the original PIDs.
    fn wait_hub_sees_same_pids(&self, what: &str) {
        let node = self.agent.name.clone();
        wait_for(what, 60.0, || {
            (0..2)
                .all(|i| {
                    self.hub
                        .placement(&node, &format!("daemonset/default/w{i}"))
                        .is_some_and(|p| {
                            p["status"]["phase"] == "Running" && p["status"]["containers"][0]["pid"] == self.pids[i]
                        })
                })
                .then_some(())
        });
    }

    fn events_named(&self, reason: &str) -> usize {
        self.hub
            .cli(&["describe", "node", &self.agent.name])
            .matches(reason)
            .count()
    }

    /// kill -9 the agent and fold its WAL into `state.db`, as a checkpoint before a power cut
    /// would have, so that damage to the file is damage to the state.
    fn crash_agent_and_checkpoint(&mut self) {
        self.agent.kill9();
        let c = rusqlite::Connection::open(self.db()).unwrap();
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
        drop(c);
    }
}

/// Damage the database file the way storage does.
fn corrupt(db: &Path, how: &str) {
    let mut bytes = std::fs::read(db).unwrap();
    let page = 4096;
    assert!(bytes.len() >= 4 * page, "state.db spans pages: {} bytes", bytes.len());
    match how {
        // pages in the middle overwritten, the header intact: unnoticed before quick_check
        "interior pages" => {
            let end = bytes.len() - page;
            bytes[page..end].fill(0x5a)
        }
        "truncated" => bytes.truncate(bytes.len() / 2 / page * page),
        "header" => bytes[..100].fill(0x42),
        _ => unreachable!(),
    }
    std::fs::write(db, bytes).unwrap();
}

fn quarantined(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let n = e.ok()?.file_name().to_string_lossy().into_owned();
            (n.starts_with("state.db.corrupt-") && !n.ends_with("-wal") && !n.ends_with("-shm")).then_some(n)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_corrupt_state_db_is_quarantined_reported_and_workloads_keep_running() {
    let mut s = site("corrupt");
    for (round, how) in ["interior pages", "truncated", "header"].into_iter().enumerate() {
        s.crash_agent_and_checkpoint();
        corrupt(&s.db(), how);
        s.agent.start();
        wait_for(&format!("{how}: the agent says it quarantined state.db"), 10.0, || {
            s.agent
                .log()
                .matches("the agent state database is corrupt; moved it aside")
                .count()
                .eq(&(round + 1))
                .then_some(())
        });
        assert_eq!(quarantined(&s.agent.dir).len(), round + 1, "{how}");
        // the event reaches the hub although the new database restarted its sequence at 1
        wait_for(&format!("{how}: StoreQuarantined at the hub"), 20.0, || {
            (s.events_named("StoreQuarantined") == round + 1).then_some(())
        });
        let d = s.hub.cli(&["describe", "node", "corrupt"]);
        assert!(
            d.contains("restored from state.export.json") && d.contains("adopted, not restarted"),
            "{how}: {d}"
        );
        s.wait_hub_sees_same_pids(&format!("{how}: the hub sees the original processes"));
        s.assert_same_pids(how);
    }
    // the recovered agent still applies changes and supervises
    let m = marker();
    s.hub.apply(&ds("w0", &m));
    wait_for("a change after recovery is applied", 20.0, || pid_of(&m));
    assert_eq!(pid_of(&s.marks[1]), Some(s.pids[1]), "the other workload is untouched");
}

#[test]
fn a_deleted_state_db_recovers_without_restarting_workloads() {
    let mut s = site("deleted");
    let dir = s.agent.dir.clone();
    let rm_db = |dir: &Path| {
        for f in ["state.db", "state.db-wal", "state.db-shm"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
    };

    // 1. state.db deleted by hand: the export brings the desired and gate state back
    s.agent.kill9();
    rm_db(&dir);
    s.agent.start();
    wait_for("restored from the export", 10.0, || {
        s.agent
            .log()
            .contains("restored the desired and update-gate state from the export")
            .then_some(())
    });
    wait_for("StoreRestored at the hub", 20.0, || {
        (s.events_named("StoreRestored") == 1).then_some(())
    });
    s.wait_hub_sees_same_pids("after restoring from the export");
    s.assert_same_pids("state.db deleted");

    // 2. state.db and the export deleted, hub down: nothing says what should run, so what
    // runs keeps running (not stopped before the hub answers)
    s.hub.kill();
    s.agent.kill9();
    rm_db(&dir);
    std::fs::remove_file(dir.join("state.export.json")).unwrap();
    s.agent.start();
    wait_for("the agent holds its adopted processes", 10.0, || {
        s.agent
            .log()
            .contains("keeping them until the hub says what should run")
            .then_some(())
    });
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        s.assert_same_pids("no state, hub down");
        std::thread::sleep(Duration::from_millis(200));
    }
    // the hub comes back: its answer lists the same specs, so nothing restarts
    s.hub.restart();
    // includes the agent's reconnect backoff (HUB_LINK: up to 45 s)
    wait_for("first desired state from the hub", 60.0, || {
        s.agent.log().contains("first desired state from the hub").then_some(())
    });
    s.wait_hub_sees_same_pids("after the hub's answer");
    s.assert_same_pids("state.db and export deleted");
    // and the node works as before: a crash is restarted
    // SAFETY: kill(2) on the workload process.
    unsafe { libc::kill(s.pids[1] as i32, libc::SIGKILL) };
    wait_for("restarted after the recovery", 10.0, || {
        pid_of(&s.marks[1]).filter(|p| *p != s.pids[1])
    });
}

#[test]
fn a_corrupt_state_db_with_the_hub_down_runs_from_the_export() {
    let mut s = site("offline");
    s.hub.kill();
    s.crash_agent_and_checkpoint();
    corrupt(&s.db(), "interior pages");
    s.agent.start();
    wait_for("quarantined", 10.0, || {
        s.agent
            .log()
            .contains("the agent state database is corrupt")
            .then_some(())
    });
    wait_for("the workloads re-adopted from the export's desired state", 10.0, || {
        (s.agent.log().matches("re-adopted running process").count() == 2).then_some(())
    });
    s.assert_same_pids("hub down");
    // supervised from the export's desired state: a crash is restarted with no hub
    // SAFETY: kill(2) on the workload process.
    unsafe { libc::kill(s.pids[0] as i32, libc::SIGKILL) };
    let new = wait_for("restarted with the hub down", 10.0, || {
        pid_of(&s.marks[0]).filter(|p| *p != s.pids[0])
    });
    assert_eq!(pid_of(&s.marks[1]), Some(s.pids[1]));
    // the hub returns: the quarantine and the crash reach it, after the events it had
    s.hub.restart();
    // includes the agent's reconnect backoff (HUB_LINK: up to 45 s)
    wait_for("StoreQuarantined at the hub", 60.0, || {
        (s.events_named("StoreQuarantined") == 1).then_some(())
    });
    wait_for("the hub sees the restarted workload", 30.0, || {
        let p = s.hub.placement("offline", "daemonset/default/w0")?;
        (p["status"]["containers"][0]["pid"] == new).then_some(())
    });
}

/// A tmpfs mounted for the test's lifetime (tests run as root).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs on {} (needs root)", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fill the file system holding `dir` (until ENOSPC).
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).unwrap();
    let chunk = vec![0x33u8; 64 * 1024];
    loop {
        if let Err(e) = f.write_all(&chunk).and_then(|_| f.sync_data()) {
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
            break;
        }
    }
    // the last partial pages too
    while f.write_all(&[0x33; 512]).is_ok() {}
    p
}

fn condition_at_hub(hub: &Hub, node: &str) -> Option<String> {
    hub.cli(&["describe", "node", node])
        .lines()
        .find(|l| l.starts_with("Condition "))
        .map(String::from)
}

fn firing(hub: &Hub, name: &str, subject: &str) -> bool {
    hub.json(&["get", "alerts"]).as_array().is_some_and(|a| {
        a.iter()
            .any(|x| x["name"] == name && x["subject"] == subject && x["state"] == "Firing")
    })
}

#[test]
fn a_full_disk_is_reported_at_the_hub_and_clears_when_space_is_freed() {
    let hub = Hub::start_with(&[], &[("OUTPOST_ALERT_EVAL_MS", "200")]);
    let t = hub.token(&[]);
    let dir = hub.dir.join("agent-full");
    let _fs = Tmpfs::mount(&dir, "6m");
    let mut a = hub.join("full", &t);
    a.start();
    let m = marker();
    hub.apply(&ds("app", &m));
    wait_for("running", 20.0, || pid_of(&m));
    assert_eq!(condition_at_hub(&hub, "full"), None, "no condition while all is well");

    let filler = fill(&dir);
    // a change whose desired state cannot be saved: a new revision with a large ConfigMap
    let big = "x".repeat(100 * 1024); // under the 128 KiB limit of one environment string
    let m2 = marker();
    hub.apply(&format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: big}}\ndata: {{blob: {big}}}\n---\n{}",
        ds("app", &m2).replace(
            "command: [/bin/sleep",
            "env: [{name: BLOB, valueFrom: {configMapKeyRef: {name: big, key: blob}}}], command: [/bin/sleep"
        )
    ));
    let cond = wait_for("the disk-full condition at the hub", 30.0, || {
        condition_at_hub(&hub, "full")
    });
    assert!(cond.starts_with("Condition DiskFull"), "{cond}");
    assert!(
        cond.contains("desired state") && cond.contains("new revisions are not applied") && cond.contains("free space"),
        "{cond}"
    );
    wait_for("NodeDiskFull firing for the agent's data", 20.0, || {
        firing(&hub, "NodeDiskFull", "agent-data").then_some(())
    });
    assert!(
        pid_of(&m2).is_none(),
        "the revision that could not be saved is not applied"
    );
    assert!(pid_of(&m).is_some(), "the running revision keeps running");

    // space freed: the revision lands, the condition and the alert clear
    std::fs::remove_file(filler).unwrap();
    wait_for("the new revision runs after space is freed", 40.0, || pid_of(&m2));
    wait_for("the condition clears at the hub", 40.0, || {
        condition_at_hub(&hub, "full").is_none().then_some(())
    });
    wait_for("the alert resolves", 20.0, || {
        (!firing(&hub, "NodeDiskFull", "agent-data")).then_some(())
    });
    drop(a);
}
