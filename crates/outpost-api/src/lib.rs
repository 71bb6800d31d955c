//! outpost's data types: manifests (the Kubernetes-style subset we honour), their parser and
//! validator, and the JSON wire types between hub, agents and operators.
//!
//! Owns: what a valid manifest is and every message it produces; the shape of every request and
//! response. Must never: do I/O, know about SQLite or HTTP libraries, or hold policy decisions
//! (those live in `outpost-core`).

pub mod manifest;
pub mod parse;
pub mod pipeline;
pub mod protocol;

pub use manifest::*;
pub use parse::{parse_cpu, parse_file, parse_memory, probe_port, Parsed, PROCESS_RUNTIME};
pub use parse::{parse_duration_secs, ALERT_POLICY_API};
pub use protocol::*;

/// Unix time in milliseconds. Pure code never reads the clock: it takes `now` as an argument.
pub type UnixMs = i64;

/// Percent-encode a URL query value (RFC 3986 unreserved characters pass through).
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The wall clock in Unix milliseconds, for the edges (hub, agent, CLI) that pass `now` on.
pub fn now_ms() -> UnixMs {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Content hash helper: sha256 of the JSON encoding, first 16 hex characters.
pub fn content_hash<T: serde::Serialize>(v: &T) -> String {
    use sha2::{Digest, Sha256};
    let bytes = serde_json::to_vec(v).expect("serializable");
    hex::encode(&Sha256::digest(&bytes)[..8])
}
