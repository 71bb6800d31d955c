//! Chaos: real hub and agent processes under `kill -9` at random instants, a network partition
//! made with `ip netns` and veth during an update, full disks on the hub and on an agent, and
//! agents whose clocks are hours off. After the faults the invariants are checked:
//!
//! - no workload lost or doubled: every unit runs exactly once per node (read from `/proc`),
//!   and never twice at any instant we look;
//! - no acknowledged apply lost: the hub holds the last revision the CLI reported applied (or
//!   one whose apply was in flight when the hub died);
//! - no acknowledged status or event lost: the hub's events of each node form one gapless
//!   sequence and every agent's outbox drains;
//! - no rollout stuck: every node ends Ready on the last revision;
//! - hub and agents healthy again without a person.
//!
//! `OUTPOST_CHAOS_SEED` replays a run (the seed is printed on failure); `OUTPOST_CHAOS_KILLS`
//! sets how many `kill -9` the storm deals (default 100).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// xorshift64*: a small seeded generator, so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("OUTPOST_CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("chaos seed {seed} (replay with OUTPOST_CHAOS_SEED={seed})");
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A DaemonSet on every node and a two-replica Deployment, both process workloads, at `rev`.
fn workloads(marker: &str, rev: u32) -> String {
    let pod = |name: &str| {
        format!(
            "  minReadySeconds: 1\n  template:\n    spec:\n      runtimeClassName: process\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: main\n        image: 'chaos:{rev}'\n        command: [/bin/sleep, '{marker}']\n        env: [{{name: REV, value: '{rev}'}}, {{name: WHO, value: '{name}'}}]\n"
        )
    };
    format!(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: chaos-ds}}\nspec:\n{}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: chaos-dep}}\nspec:\n  replicas: 2\n{}",
        pod("ds"),
        pod("dep")
    )
}

const KEYS: [&str; 2] = ["daemonset/default/chaos-ds", "deployment/default/chaos-dep"];

/// The workload processes of one agent, by unit, read from `/proc`: (pid, REV) of each.
fn units(agent_dir: &Path) -> BTreeMap<String, Vec<(u32, String)>> {
    let mut out: BTreeMap<String, Vec<(u32, String)>> = BTreeMap::new();
    for pid in pids_with_env("OUTPOST_UNIT=") {
        let in_dir = std::fs::read_link(format!("/proc/{pid}/cwd"))
            .map(|c| c.starts_with(agent_dir))
            .unwrap_or(false);
        if !in_dir {
            continue;
        }
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let var = |name: &str| {
            env.split(|b| *b == 0)
                .find_map(|v| v.strip_prefix(format!("{name}=").as_bytes()))
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        if let Some(unit) = var("OUTPOST_UNIT") {
            out.entry(unit).or_default().push((pid, var("REV").unwrap_or_default()));
        }
    }
    out
}

/// No unit of any agent runs twice right now.
fn assert_no_doubles(agents: &[Agent], when: &str) {
    for a in agents {
        for (unit, pids) in units(&a.dir) {
            assert!(
                pids.len() <= 1,
                "{when}: unit {unit} on {} runs {} times: {pids:?}",
                a.name,
                pids.len()
            );
        }
    }
}

/// Every node runs every unit it should exactly once, at `rev`, and the hub sees each placement
/// Running and Ready on the revision it wants (a DaemonSet on each node, two Deployment
/// replicas).
fn converged(hub: &Hub, agents: &[Agent], rev: u32) -> Option<()> {
    let placed = converged_on(hub, agents, rev)?;
    (placed == agents.len() + 2).then_some(())
}

/// Like [`converged`] for the placements on `agents` only; returns how many there are.
fn converged_on(hub: &Hub, agents: &[Agent], rev: u32) -> Option<usize> {
    let all = hub.try_cli(&["get", "workloads", "-o", "json"]);
    if !all.status.success() {
        return None;
    }
    let all: Value = serde_json::from_slice(&all.stdout).ok()?;
    let placements = all.as_array()?;
    let mut want: BTreeMap<String, usize> = BTreeMap::new();
    for p in placements {
        let key = p["key"].as_str()?;
        if !KEYS.contains(&key) || !agents.iter().any(|a| p["node"] == a.name.as_str()) {
            continue;
        }
        let s = &p["status"];
        if s["phase"] != "Running" || s["ready"] != true || s["revision"] != p["desired_revision"] {
            return None;
        }
        *want.entry(p["node"].as_str()?.to_string()).or_default() += 1;
    }
    for a in agents {
        let running = units(&a.dir);
        let n = want.get(&a.name).copied().unwrap_or(0);
        if running.len() != n || running.values().any(|p| p.len() != 1 || p[0].1 != rev.to_string()) {
            return None;
        }
    }
    Some(want.values().sum())
}

fn open_ro(db: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap()
}

/// The hub's events of each node form one gapless sequence (nothing acknowledged was lost).
fn assert_events_gapless(hub: &Hub, agents: &[Agent]) {
    let db = open_ro(&hub.dir.join("hub/hub.db"));
    for a in agents {
        let seqs: Vec<i64> = db
            .prepare("SELECT seq FROM events WHERE node = ?1 ORDER BY seq")
            .unwrap()
            .query_map([&a.name], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(!seqs.is_empty(), "the hub holds no events of {}", a.name);
        for w in seqs.windows(2) {
            assert_eq!(
                w[1],
                w[0] + 1,
                "events of {} have a gap: {} then {}",
                a.name,
                w[0],
                w[1]
            );
        }
    }
}

/// The agent's event outbox is empty (everything it recorded reached the hub).
fn outbox_len(agent: &Agent) -> i64 {
    let db = open_ro(&agent.dir.join("state.db"));
    db.query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0)).unwrap()
}

/// The REV the hub holds for the DaemonSet, read from its database.
fn stored_rev(hub: &Hub) -> u32 {
    let db = open_ro(&hub.dir.join("hub/hub.db"));
    let manifest: String = db
        .query_row("SELECT manifest FROM objects WHERE name = 'chaos-ds'", [], |r| r.get(0))
        .unwrap();
    let v: Value = serde_json::from_str(&manifest).unwrap();
    v["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn manifest_file(hub: &Hub, marker: &str, rev: u32) -> PathBuf {
    let f = hub.dir.join(format!("chaos-{rev}.yaml"));
    std::fs::write(&f, workloads(marker, rev)).unwrap();
    f
}

/// Start `outpost apply` without waiting for it.
fn spawn_apply(hub: &Hub, file: &Path) -> std::process::Child {
    Command::new(BIN)
        .args(["apply", "-f"])
        .arg(file)
        .env("OUTPOST_HUB", &hub.url)
        .env("OUTPOST_TOKEN", hub.token.trim())
        .env("OUTPOST_CA_FILE", hub.ca_file())
        .env("OUTPOST_CONFIG", hub.dir.join("no-config.json"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// [`wait_for`], printing the tail of every agent's and the hub's log if it times out.
fn wait_logged<T>(what: &str, secs: f64, hub: &Hub, agents: &[Agent], f: impl FnMut() -> Option<T>) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| wait_for(what, secs, f))) {
        Ok(v) => v,
        Err(e) => {
            let tail = |text: String| {
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(25)..].join("\n")
            };
            for a in agents {
                eprintln!("--- {} log:\n{}", a.name, tail(a.log()));
            }
            let hub_log = std::fs::read_to_string(hub.dir.join("hub.log")).unwrap_or_default();
            eprintln!("--- hub log:\n{}", tail(hub_log));
            std::panic::resume_unwind(e)
        }
    }
}

fn pause(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// `kill -9` of the hub and of agents at random instants: mid-apply, mid-update on the node,
/// both at once. At least 100 kills (`OUTPOST_CHAOS_KILLS`), then every invariant.
#[test]
fn kill_storm_keeps_every_invariant() {
    let kills_wanted: u32 = std::env::var("OUTPOST_CHAOS_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let mut rng = Rng::new();
    let started = Instant::now();
    let mut hub = Hub::start();
    let token = hub.token(&["--uses", "3"]);
    let mut agents: Vec<Agent> = (1..=3)
        .map(|i| hub.join(&format!("chaos-{i}"), &token).running())
        .collect();
    let marker = marker();
    let mut rev = 1;
    hub.cli(&["apply", "-f", manifest_file(&hub, &marker, rev).to_str().unwrap()]);
    wait_for("first revision everywhere", 60.0, || converged(&hub, &agents, rev));
    let mut acked = rev;
    let mut in_flight: Vec<u32> = Vec::new();
    let (mut hub_kills, mut agent_kills, mut applies_cut) = (0u32, 0u32, 0u32);
    let mut step = 0;
    while hub_kills + agent_kills < kills_wanted {
        step += 1;
        match rng.below(4) {
            // kill the hub while an apply is on its way
            0 => {
                rev += 1;
                let apply = spawn_apply(&hub, &manifest_file(&hub, &marker, rev));
                pause(rng.below(25));
                hub.kill();
                hub_kills += 1;
                let out = apply.wait_with_output().unwrap();
                if out.status.success() {
                    acked = rev;
                    in_flight.clear();
                } else {
                    applies_cut += 1;
                    in_flight.push(rev);
                }
                hub.restart();
            }
            // an agent dies while it updates
            1 => {
                rev += 1;
                hub.cli(&["apply", "-f", manifest_file(&hub, &marker, rev).to_str().unwrap()]);
                acked = rev;
                in_flight.clear();
                pause(rng.below(1500));
                let a = rng.below(agents.len() as u64) as usize;
                agents[a].kill9();
                agent_kills += 1;
                assert_no_doubles(&agents, &format!("step {step}, agent {} killed", agents[a].name));
                agents[a].start();
            }
            // hub and an agent at once
            2 => {
                let a = rng.below(agents.len() as u64) as usize;
                pause(rng.below(500));
                agents[a].kill9();
                hub.kill();
                hub_kills += 1;
                agent_kills += 1;
                agents[a].start();
                hub.restart();
            }
            // an agent dies while nothing changes (mid status report, mid probe)
            _ => {
                let a = rng.below(agents.len() as u64) as usize;
                pause(rng.below(700));
                agents[a].kill9();
                agent_kills += 1;
                agents[a].start();
            }
        }
        assert_no_doubles(&agents, &format!("step {step}"));
        // Acknowledged applies survive every kill.
        let held = stored_rev(&hub);
        assert!(
            held == acked || in_flight.contains(&held),
            "step {step}: the hub holds revision {held}, but {acked} was acknowledged (in flight: {in_flight:?})"
        );
    }
    // Settle on one last revision with everything up: nothing may be stuck.
    rev += 1;
    hub.cli(&["apply", "-f", manifest_file(&hub, &marker, rev).to_str().unwrap()]);
    wait_logged("every node Ready on the last revision", 90.0, &hub, &agents, || {
        converged(&hub, &agents, rev)
    });
    for a in &agents {
        wait_for(&format!("{}'s outbox drained", a.name), 60.0, || {
            (outbox_len(a) == 0).then_some(())
        });
    }
    assert_events_gapless(&hub, &agents);
    for a in &agents {
        let node = hub.node(&a.name).expect("node listed");
        assert_eq!(node["status"], "Online", "{} should be Online: {node}", a.name);
        let log = a.log();
        assert!(!log.contains("panicked"), "{} panicked:\n{log}", a.name);
    }
    let hub_log = std::fs::read_to_string(hub.dir.join("hub.log")).unwrap_or_default();
    assert!(!hub_log.contains("panicked"), "the hub panicked:\n{hub_log}");
    eprintln!(
        "chaos: {} kills ({hub_kills} hub, {agent_kills} agent), {applies_cut} applies cut mid-flight, {step} steps, {} revisions, {:.0?}; invariants violated: 0",
        hub_kills + agent_kills,
        rev,
        started.elapsed()
    );
}

/// An agent behind a link that goes down in the middle of updates (three times, at random
/// instants), while the hub takes a further change: the node keeps its workloads running once
/// each while cut off, the other node is undisturbed, and after the link heals the node
/// converges on the newest revision by itself with nothing lost.
#[test]
fn partition_during_update_heals_by_itself() {
    let mut rng = Rng::new();
    let ns = Netns::new();
    // a cut link is found by the hub's TCP keepalive: 5 s here instead of 90 s
    let hub = Hub::start_on(&ns.host_ip, &["--keepalive", "5s"], &[]);
    let token = hub.token(&["--uses", "2"]);
    let wrap = ns.wrap();
    let wrap: Vec<&str> = wrap.iter().map(String::as_str).collect();
    let mut remote = hub.join_wrapped("behind-link", &token, &wrap);
    // after the link heals, the agent finds its dead connection by keepalive: 3 s here
    remote.env.push(("OUTPOST_LINK_KEEPALIVE_SECS".into(), "3".into()));
    let remote = remote.running();
    let local = hub.join("on-site", &token).running();
    let agents = [remote, local];
    let marker = marker();
    let mut rev = 1;
    hub.cli(&["apply", "-f", manifest_file(&hub, &marker, rev).to_str().unwrap()]);
    wait_for("first revision on both nodes", 60.0, || converged(&hub, &agents, rev));
    for round in 1..=3 {
        rev += 1;
        hub.cli(&["apply", "-f", manifest_file(&hub, &marker, rev).to_str().unwrap()]);
        pause(rng.below(1500));
        ns.cut();
        wait_for("the hub to see the cut-off node Offline", 30.0, || {
            (node_status(&hub, "behind-link").as_deref() == Some("Offline")).then_some(())
        });
        // A change made while the node is unreachable.
        rev += 1;
        hub.cli(&["apply", "-f", manifest_file(&hub, &marker, rev).to_str().unwrap()]);
        wait_for("the reachable node on the newest revision", 60.0, || {
            converged_on(&hub, &agents[1..], rev).filter(|n| *n >= 1)
        });
        let cut_off = units(&agents[0].dir);
        assert_eq!(
            cut_off.len(),
            2,
            "round {round}: the cut-off node must keep both workloads: {cut_off:?}"
        );
        assert_no_doubles(&agents, &format!("round {round}, link down"));
        pause(rng.below(3000));
        ns.heal();
        wait_logged(
            "both nodes on the newest revision after the link healed",
            120.0,
            &hub,
            &agents,
            || {
                assert_no_doubles(&agents, &format!("round {round}, healing"));
                converged(&hub, &agents, rev)
            },
        );
    }
    for a in &agents {
        wait_for(&format!("{}'s outbox drained", a.name), 60.0, || {
            (outbox_len(a) == 0).then_some(())
        });
    }
    assert_events_gapless(&hub, &agents);
}

/// A small tmpfs mounted over a data directory (its files copied in), to fill up.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    /// Move `dir` onto a fresh tmpfs of `mib` MiB (the process using it must be stopped).
    fn over(dir: &Path, mib: u32) -> SmallDisk {
        let orig = dir.with_extension("orig");
        std::fs::rename(dir, &orig).unwrap();
        std::fs::create_dir(dir).unwrap();
        sh(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            &format!("size={mib}m,mode=0700"),
            "tmpfs",
            dir.to_str().unwrap(),
        ]);
        sh(&["cp", "-a", &format!("{}/.", orig.display()), dir.to_str().unwrap()]);
        SmallDisk {
            path: dir.to_path_buf(),
        }
    }
    /// Write a filler file until the disk is full.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path.join("filler")).unwrap();
        let chunk = vec![0u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    fn free(&self) {
        std::fs::remove_file(self.path.join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).output();
    }
}

/// The hub's disk fills up: an apply fails with a message that says so and changes nothing,
/// the hub keeps answering and the nodes keep running; once space is back, the next apply goes
/// through and reaches every node.
#[test]
fn full_disk_on_the_hub_fails_cleanly_and_recovers() {
    let mut hub = Hub::start();
    let token = hub.token(&["--uses", "2"]);
    let agents = [
        hub.join("disk-1", &token).running(),
        hub.join("disk-2", &token).running(),
    ];
    let marker = marker();
    hub.cli(&["apply", "-f", manifest_file(&hub, &marker, 1).to_str().unwrap()]);
    wait_for("first revision", 60.0, || converged(&hub, &agents, 1));
    hub.kill();
    let disk = SmallDisk::over(&hub.dir.join("hub"), 48);
    hub.restart();
    let file = manifest_file(&hub, &marker, 2);
    disk.fill();
    let err = hub.cli_err(&["apply", "-f", file.to_str().unwrap()]);
    assert!(
        err.contains("hub's disk is full"),
        "the error should say the hub's disk is full: {err}"
    );
    assert_eq!(stored_rev(&hub), 1, "a failed apply changes nothing");
    // Reads still work and the nodes keep running what they had.
    hub.json(&["get", "nodes"]);
    for a in &agents {
        assert_eq!(
            units(&a.dir).len(),
            2,
            "{} must keep its workloads while the hub's disk is full",
            a.name
        );
    }
    disk.free();
    hub.cli(&["apply", "-f", file.to_str().unwrap()]);
    wait_logged(
        "the change everywhere after space came back",
        60.0,
        &hub,
        &agents,
        || converged(&hub, &agents, 2),
    );
    let log = std::fs::read_to_string(hub.dir.join("hub.log")).unwrap_or_default();
    assert!(!log.contains("panicked"), "the hub panicked:\n{log}");
    hub.kill();
    drop(disk);
}

/// An agent's disk fills up: it cannot persist a new desired state, so it keeps running the
/// last one (never acting on what it could not save) and stays alive; once space is back it
/// applies the change by itself.
#[test]
fn full_disk_on_an_agent_keeps_the_last_state_and_recovers() {
    let hub = Hub::start();
    let token = hub.token(&["--uses", "2"]);
    let mut full = hub.join("full-1", &token);
    let agents_dir = full.dir.clone();
    let disk = SmallDisk::over(&agents_dir, 32);
    full.start();
    let other = hub.join("roomy-1", &token).running();
    let marker = marker();
    hub.cli(&["apply", "-f", manifest_file(&hub, &marker, 1).to_str().unwrap()]);
    let agents = [full, other];
    wait_for("first revision", 60.0, || converged(&hub, &agents, 1));
    disk.fill();
    hub.cli(&["apply", "-f", manifest_file(&hub, &marker, 2).to_str().unwrap()]);
    wait_for("the roomy node on the new revision", 60.0, || {
        converged_on(&hub, &agents[1..], 2).filter(|n| *n >= 1)
    });
    // The full node keeps its workloads, on the revision it holds, once each.
    let held = units(&agents[0].dir);
    assert!(!held.is_empty(), "the full node lost its workloads");
    assert_no_doubles(&agents, "disk full");
    disk.free();
    wait_logged(
        "the full node on the new revision once space came back",
        90.0,
        &hub,
        &agents,
        || converged(&hub, &agents, 2),
    );
    drop(agents);
    drop(disk);
}

/// Agents whose clocks are three hours behind and ahead (a box without a working RTC or NTP)
/// still join the fleet's work: they sync, run, report, and count as Online.
#[test]
fn agents_with_clocks_hours_off_still_work() {
    let lib = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
    assert!(
        Path::new(lib).exists(),
        "{lib} is missing: install Debian's faketime package (scripts/test.sh does)"
    );
    let hub = Hub::start();
    let token = hub.token(&["--uses", "2"]);
    let mut agents = Vec::new();
    for (name, offset) in [("behind-3h", "-3h"), ("ahead-3h", "+3h")] {
        let mut a = hub.join(name, &token);
        a.env = vec![
            ("LD_PRELOAD".into(), lib.into()),
            ("FAKETIME".into(), offset.into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ];
        a.start();
        agents.push(a);
    }
    let marker = marker();
    hub.cli(&["apply", "-f", manifest_file(&hub, &marker, 1).to_str().unwrap()]);
    wait_logged("both skewed nodes running and Ready", 60.0, &hub, &agents, || {
        converged(&hub, &agents, 1)
    });
    hub.cli(&["apply", "-f", manifest_file(&hub, &marker, 2).to_str().unwrap()]);
    wait_logged("an update on both skewed nodes", 60.0, &hub, &agents, || {
        converged(&hub, &agents, 2)
    });
    for a in &agents {
        assert_eq!(node_status(&hub, &a.name).as_deref(), Some("Online"), "{}", a.name);
        wait_for(&format!("{}'s outbox drained", a.name), 60.0, || {
            (outbox_len(a) == 0).then_some(())
        });
    }
}

/// An agent whose clock is days behind (beyond the certificates' back-dating) cannot verify the
/// hub, and says why: its log names the clock, at warn level, rather than "hub unreachable".
#[test]
fn an_agent_whose_clock_is_days_off_says_the_clock_is_wrong() {
    let lib = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
    assert!(
        Path::new(lib).exists(),
        "{lib} is missing: install Debian's faketime package"
    );
    let hub = Hub::start();
    let token = hub.token(&[]);
    let mut a = hub.join("days-behind", &token);
    a.env = vec![
        ("LD_PRELOAD".into(), lib.into()),
        ("FAKETIME".into(), "-5d".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ];
    a.start();
    wait_logged(
        "the agent to say its clock is wrong",
        30.0,
        &hub,
        std::slice::from_ref(&a),
        || {
            let log = a.log();
            log.lines()
                .any(|l| l.contains("WARN") && l.contains("fix the clock"))
                .then_some(())
        },
    );
}

/// A child the killed agent was starting holds the data dir's lock until it execs (simulated
/// here by `flock` holding it): the next agent waits for it instead of starting the unit a
/// second time, and a second agent on the same data dir is refused.
#[test]
fn an_agent_waits_for_a_child_its_predecessor_was_starting() {
    let hub = Hub::start();
    let token = hub.token(&[]);
    let mut a = hub.join("lock-1", &token).running();
    let marker = marker();
    hub.cli(&["apply", "-f", manifest_file(&hub, &marker, 1).to_str().unwrap()]);
    // One node holds the DaemonSet and one of the two Deployment replicas.
    let one = |a: &Agent| converged_on(&hub, std::slice::from_ref(a), 1).filter(|n| *n == 2);
    wait_for("the workloads", 60.0, || one(&a));
    a.kill9();
    let lock = a.dir.join("agent.lock");
    let mut holder = Command::new("flock")
        .arg(&lock)
        .args(["sleep", "2"])
        .spawn()
        .expect("util-linux flock");
    wait_for("the stand-in child to hold the lock", 5.0, || {
        let o = Command::new("flock")
            .args(["-n"])
            .arg(&lock)
            .arg("true")
            .output()
            .ok()?;
        (!o.status.success()).then_some(())
    });
    a.start();
    wait_for("the agent to wait for the lock", 10.0, || {
        a.log()
            .contains("waiting for the previous agent's children")
            .then_some(())
    });
    assert_no_doubles(std::slice::from_ref(&a), "while the lock is held");
    holder.wait().unwrap();
    wait_for("the agent to go on once the lock is free", 10.0, || {
        a.log().contains("last child has started").then_some(())
    });
    // A second agent on the same data dir is refused (it gives up after its wait).
    let second = Command::new(BIN)
        .args(["agent", "run", "--data-dir"])
        .arg(&a.dir)
        .env("OUTPOST_LOG", "info")
        .output()
        .unwrap();
    assert!(!second.status.success(), "a second agent on one data dir must not run");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("another outpost agent"), "{err}");
    wait_for("the workloads, once each", 30.0, || one(&a));
}
