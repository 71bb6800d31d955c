//! outpost's data types: manifests (the Kubernetes-style subset we honour), their parser and
//! validator, and the JSON wire types between hub, agents and operators.
//!
//! Owns: what a valid manifest is and every message it produces; the shape of every request and
//! response. Must never: do I/O, know about SQLite or HTTP libraries, or hold policy decisions
//! (those live in `outpost-core`).

pub mod accounts;
pub mod checks;
pub mod cron;
pub mod duration;
pub mod exec;
pub mod gitops;
pub mod manifest;
pub mod onnx;
pub mod parse;
pub mod pipeline;
pub mod protocol;
pub mod rollout;
pub mod site;

pub use checks::{validate_image_ref, FieldError};
pub use duration::{human_duration, ms_before, parse_duration, parse_duration_secs, utc_time, MAX_DURATION_SECS};
pub use manifest::*;
pub use parse::ALERT_POLICY_API;
pub use parse::{capability_number, CLUSTER_ONLY_KINDS, HOST_PATH_TYPES, NODE_PORT_RANGE};
pub use parse::{parse_cpu, parse_file, parse_memory, probe_port, Parsed, ONNX_RUNTIME, PROCESS_RUNTIME};
pub use parse::{MAX_DOCUMENTS_PER_FILE, MAX_FILE_BYTES, MAX_NESTING_DEPTH, MAX_REPLICAS};
pub use protocol::*;
pub use rollout::{
    NodeRolloutInfo, NodeRolloutState, RolloutActionResult, RolloutEvent, RolloutInfo, RolloutPhase, RolloutPolicy,
    RolloutPolicySpec, WaveInfo,
};

/// Unix time in milliseconds. Pure code never reads the clock: it takes `now` as an argument.
pub type UnixMs = i64;

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
