//! `outpost demo`, the first command of the README, runs end to end: three agents join, the
//! sample app runs, the data pipeline forwards only results, a new revision rolls out canary
//! first, and every process is stopped at the end.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

#[test]
fn the_readme_demo_runs_its_whole_tour_and_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let out = Command::new(BIN)
        .args(["demo", "--seconds", "1", "--dir"])
        .arg(&dir)
        .env("OUTPOST_CONFIG", tmp.path().join("config.json"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(stderr.contains("joined three agents"), "{stderr}");
    // 5 placements: the DaemonSet on 3 boxes, the Deployment's 2 replicas on store-001.
    assert_eq!(stdout.matches(" Running ").count(), 5, "{stdout}");
    assert!(
        stdout.contains("the hub received 4 records") && stdout.contains("the 2 hot readings"),
        "{stdout}"
    );
    let canary = stdout.find("wave 1 (canary) of revision 2: 1 node").expect(&stdout);
    let rest = stdout.find("wave 2 (rest) of revision 2: 2 nodes").expect(&stdout);
    let done = stdout.find("RolloutComplete").expect(&stdout);
    assert!(canary < rest && rest < done, "{stdout}");
    // Remote exec through a box's own link, and a dashboard account.
    assert!(stdout.contains("hello from store-00"), "{stdout}");
    assert!(stdout.contains("Dashboard: https://127.0.0.1:"), "{stdout}");
    // The CLI config the demo wrote points at its hub.
    let cfg = std::fs::read_to_string(tmp.path().join("config.json")).unwrap();
    assert!(cfg.contains("https://127.0.0.1:"), "{cfg}");
    // Agents stopped their workloads and exited: nothing of the demo runs any more.
    let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout);
    let marker = dir.to_string_lossy();
    let left: Vec<&str> = ps.lines().filter(|l| l.contains(marker.as_ref())).collect();
    assert!(left.is_empty(), "demo processes left running: {left:?}");
}
