//! The body of the `kustomize` fuzz target (`fuzz/`, cargo fuzz), kept here so the normal test
//! suite replays it on the checked-in corpus (`fuzz/corpus/kustomize/`, `tests/fuzz_corpus.rs`).
//!
//! An input is a small tree: sections starting with a line `==> PATH` hold the file at `PATH`
//! (under `r/`); text before the first section, or an input without sections, is
//! `r/kustomization.yaml`. The tree is built from `r`. Invariants: no panic, abort or stack
//! overflow on any input; a render prints as YAML that parses back to the same objects; two
//! builds of one tree give the same result. Returns whether the tree rendered.

use crate::{build, parse_stream, to_yaml, MemFs};

/// Splits an input into (path, content) pairs.
pub fn tree(text: &str) -> Vec<(String, String)> {
    let mut files = Vec::new();
    let mut path = "kustomization.yaml".to_string();
    let mut content = String::new();
    for line in text.split_inclusive('\n') {
        if let Some(p) = line.strip_prefix("==> ") {
            if !content.is_empty() {
                files.push((path, std::mem::take(&mut content)));
            }
            path = p.trim().to_string();
        } else {
            content.push_str(line);
        }
    }
    files.push((path, content));
    files
}

pub fn kustomize(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let mut fs = MemFs::new();
    for (p, c) in tree(text) {
        fs.insert(&format!("r/{p}"), c.into_bytes());
    }
    let first = build(&fs, "r");
    let second = build(&fs, "r");
    assert_eq!(first, second, "two builds of one tree differ");
    match first {
        Ok(objs) => {
            let printed = to_yaml(&objs);
            let back = parse_stream(&printed).expect("printed YAML parses");
            assert_eq!(back, objs, "printed YAML reads back differently:\n{printed}");
            true
        }
        Err(_) => false,
    }
}
