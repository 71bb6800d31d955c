//! Link options of the release binary only (nothing here changes how dependencies build).
//!
//! On Linux with glibc, the release binary packs its relative relocations (`-z
//! pack-relative-relocs`, DT_RELR): a position-independent executable keeps ASLR, but its
//! ~60,000 relative relocations take a few KB instead of 1.4 MB, which the dynamic loader no
//! longer reads at every start (BENCHMARKS.md section 1: binary size and the agent's RSS). It
//! needs GNU ld >= 2.38 or lld to link and glibc >= 2.36 to run (the binary already needs 2.35).
//! `OUTPOST_NO_RELR=1` builds without it, for an older toolchain or an older target.

fn main() {
    println!("cargo:rerun-if-env-changed=OUTPOST_NO_RELR");
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let linux_gnu = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|o| o == "linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").is_ok_and(|e| e == "gnu");
    if release && linux_gnu && std::env::var_os("OUTPOST_NO_RELR").is_none() {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
