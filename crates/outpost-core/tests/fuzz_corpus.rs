//! Replays the checked-in fuzz corpus (`fuzz/corpus/<target>/`) through the fuzz targets'
//! checks with stable Rust, so every input that once crashed a target stays a regression test
//! of the normal suite. Naming: `seed-*` inputs must be accepted, `reject-*` must be refused,
//! any other (`input-*`, `crash-*` saved from a fuzzing run) must only not panic.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8]) -> bool) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let data = std::fs::read(&path).unwrap();
        let accepted = check(&data);
        if name.starts_with("seed-") {
            assert!(accepted, "{target}/{name} should be accepted");
        } else if name.starts_with("reject-") {
            assert!(!accepted, "{target}/{name} should be refused");
        }
        n += 1;
    }
    assert!(n > 0, "no corpus in {}", dir.display());
}

#[test]
fn manifest_corpus() {
    replay("manifest", outpost_core::fuzz::manifest);
}

#[test]
fn join_token_corpus() {
    replay("join_token", outpost_core::fuzz::join_token);
}

#[test]
fn exec_frames_corpus() {
    replay("exec_frames", outpost_core::fuzz::exec_frames);
}

#[test]
fn protocol_corpus() {
    replay("protocol", outpost_core::fuzz::protocol);
}
