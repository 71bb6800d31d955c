//! Replays the checked-in corpus of the `kustomize` fuzz target (`fuzz/corpus/kustomize/`)
//! with stable Rust: `seed-*` trees must render, `reject-*` must be refused, any other input
//! (saved from a fuzzing run) must only not panic.

use std::path::Path;

#[test]
fn kustomize_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/kustomize");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let accepted = outpost_kustomize::fuzz::kustomize(&std::fs::read(&path).unwrap());
        if name.starts_with("seed-") {
            assert!(accepted, "{name} should render");
        } else if name.starts_with("reject-") {
            assert!(!accepted, "{name} should be refused");
        }
        n += 1;
    }
    assert!(n > 0, "no corpus in {}", dir.display());
}
