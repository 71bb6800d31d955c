//! `outpost bench fleet` in its two-tier mode, small (BENCHMARKS.md §4, "Hub tiers"): one
//! SQLite hub, then two hub replicas on a PostgreSQL server the bench starts itself, each with
//! fresh simulated agents, changes and the reconnect storm of every hub process; the report
//! must hold both tiers' tables with numbers and every agent re-synced after the storm.

mod common;

use std::process::Command;

use common::*;

/// The cells of the Markdown row whose first cell is `first`, after `heading`.
fn row<'a>(out: &'a str, heading: &str, first: &str) -> Vec<&'a str> {
    let at = out.find(heading).unwrap_or_else(|| panic!("no {heading:?} in:\n{out}"));
    let line = out[at..]
        .lines()
        .find(|l| l.starts_with(&format!("| {first} |")))
        .unwrap_or_else(|| panic!("no row {first:?} after {heading:?} in:\n{out}"));
    line.trim_matches('|').split('|').map(str::trim).collect()
}

/// A duration cell such as `412 ms` in milliseconds.
fn millis(cell: &str) -> f64 {
    cell.strip_suffix(" ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{cell:?} is not a duration in ms"))
}

#[test]
fn the_fleet_bench_measures_a_sqlite_hub_and_postgres_replicas_in_one_run() {
    if !std::path::Path::new("/usr/lib/postgresql").exists() {
        assert!(std::env::var_os("CI").is_none(), "CI needs Debian's postgresql");
        eprintln!("skipping: no PostgreSQL server binaries");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let agents = "40";
    let o = Command::new(BIN)
        .args(["bench", "--work-dir"])
        .arg(work.path())
        .args([
            "fleet",
            "--agents",
            agents,
            "--tiers",
            "sqlite,postgres:2",
            "--window-secs",
            "1",
            "--changes",
            "1",
            "--no-rollout",
        ])
        .env("OUTPOST_LOG", "warn")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "bench fleet failed:\n{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("## Tier sqlite: 1 hub process(es) on SQLite"), "{out}");
    assert!(
        out.contains("## Tier postgres:2: 2 hub process(es) on one PostgreSQL database"),
        "{out}"
    );
    for (tier, hubs) in [("sqlite", "1"), ("postgres:2", "2")] {
        let r = row(&out, "## Comparison", tier);
        assert_eq!(r[1], hubs, "{r:?}");
        assert_eq!(r[2], agents, "every agent joined: {r:?}");
        assert!(millis(r[4]) > 0.0, "status p99: {r:?}");
        assert!(millis(r[5]) > 0.0, "change -> all agents: {r:?}");
        assert!(
            r[6].contains(" %, ") && r[6].contains("MiB"),
            "hubs' CPU and RSS: {r:?}"
        );
        // storm: every agent re-synced (the bench fails otherwise), none gave up
        let (resynced, gave_up) = r[8].split_once(" / ").expect("storm cell");
        assert!(millis(resynced) > 0.0, "{r:?}");
        assert_eq!(gave_up, "0", "agents that gave up after the storm: {r:?}");
    }
    // the SQLite tier has no PostgreSQL; the PostgreSQL tier measured its server's processes
    assert_eq!(row(&out, "## Comparison", "sqlite")[7], "-");
    assert!(row(&out, "## Comparison", "postgres:2")[7].contains("PSS"));
    // per process: both replicas and the PostgreSQL tree (postmaster + backends)
    let pg_section = &out[out.find("## Tier postgres:2").unwrap()..];
    for p in ["hub-0 (:", "hub-1 (:", "postgres (postmaster + backends)"] {
        assert!(
            pg_section.lines().any(|l| l.starts_with(&format!("| {agents} | {p}"))),
            "no per-process row for {p}:\n{pg_section}"
        );
    }
    let tree = pg_section
        .lines()
        .find(|l| l.contains("| postgres (postmaster + backends) |"))
        .unwrap();
    let procs: usize = tree
        .split('|')
        .map(str::trim)
        .find_map(|c| c.strip_suffix(" processes"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{tree}"));
    assert!(procs > 2, "postmaster, its helpers and the replicas' backends: {tree}");
    // the storm killed every hub of each tier and restarted them
    assert_eq!(
        out.matches("SIGKILL every hub process of the tier at once").count(),
        2,
        "{out}"
    );
}
