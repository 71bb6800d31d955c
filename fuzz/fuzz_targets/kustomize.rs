//! See `outpost_kustomize::fuzz::kustomize`: the checks live there so the normal test suite
//! replays this target's corpus (`crates/outpost-kustomize/tests/fuzz_corpus.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    outpost_kustomize::fuzz::kustomize(data);
});
