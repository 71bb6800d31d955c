//! See `outpost_core::fuzz::exec_frames`: the checks live there so the normal test suite replays
//! this target's corpus (`crates/outpost-core/tests/fuzz_corpus.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    outpost_core::fuzz::exec_frames(data);
});
