//! The public-manifest corpus: real Deployment, DaemonSet, Job and CronJob files from public
//! projects (tests/corpus/SOURCES.md names each one's repository and path). This test parses
//! every file with `parse_file`, prints the share accepted and every refusal with its reason,
//! and fails if the share falls below what outpost accepted when the corpus was last measured
//! (`ACCEPTED_AT_LEAST`), so a regression shows up here.

use std::path::Path;

use outpost_api::parse_file;

/// Files of the corpus `parse_file` accepted at the last measurement (docs/manifests.md).
const ACCEPTED_AT_LEAST: usize = 34;

#[test]
fn corpus_share_accepted() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/corpus")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let sources = std::fs::read_to_string(dir.join("SOURCES.md")).expect("SOURCES.md");
    let mut accepted = 0;
    let mut report = String::new();
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            sources.contains(&format!("| {name} |")),
            "{name} is not listed in tests/corpus/SOURCES.md"
        );
        let text = std::fs::read_to_string(path).expect("read");
        match parse_file(&name, &text) {
            Ok(p) => {
                accepted += 1;
                report.push_str(&format!("ACCEPTED {name}\n"));
                for w in &p.warnings {
                    report.push_str(&format!("    warning: {w}\n"));
                }
            }
            Err(errors) => {
                report.push_str(&format!("REFUSED  {name}\n"));
                for e in &errors {
                    report.push_str(&format!("    {e}\n"));
                }
            }
        }
    }
    assert!(files.len() >= 40, "the corpus must hold at least 40 files");
    println!("{report}");
    println!(
        "corpus: {accepted} of {} files accepted ({:.0} %)",
        files.len(),
        accepted as f64 * 100.0 / files.len() as f64
    );
    assert!(
        accepted >= ACCEPTED_AT_LEAST,
        "only {accepted} corpus files accepted, fewer than the {ACCEPTED_AT_LEAST} measured before"
    );
}
