//! Hub <-> agent and hub <-> operator wire types (JSON over HTTPS). See docs/protocol.md.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::checks::FieldError;
use crate::manifest::{Kind, Labels, ManifestError, Warning};

/// Protocol major version; the hub refuses a higher one (docs/protocol.md §8).
pub const PROTOCOL_VERSION: u32 = 1;
/// Protocol minor version: additive changes an older peer can ignore (1.1: node-label
/// restriction, two-phase renewal, renewal of expired certificates; 1.2: fleet rollouts, the
/// `prefetch` hint in sync answers; 1.3: remote exec, the `exec` list in sync answers; 1.4: the
/// `vitals_requests` list in sync answers, `ka=` on sync, zstd request bodies, several hubs (the
/// `hubs` list in join and sync answers)).
pub const PROTOCOL_MINOR: u32 = 4;
/// `<major>.<minor>`, as agents send it in [`PROTOCOL_HEADER`].
pub const PROTOCOL: &str = "1.4";
/// Header carrying [`PROTOCOL`].
pub const PROTOCOL_HEADER: &str = "x-outpost-protocol";
/// How long the hub holds a sync long-poll open when nothing changes and the agent asked for
/// no other time (agents before `wait=`).
pub const LONG_POLL_SECS: u64 = 30;
/// The longest a hub holds a long-poll an agent asks for (`wait=<secs>` on sync).
pub const MAX_LONG_POLL_SECS: u64 = 3600;
/// How long an agent asks the hub to hold its long-poll: liveness comes from the held
/// connection and the agent's keepalive probes, not from how often it polls
/// (docs/protocol.md §12).
pub const AGENT_LONG_POLL_SECS: u64 = 3600;

/// A join token: `outpost1:<ca sha256 hex>:<id>:<secret>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinToken {
    pub ca_fingerprint: String,
    pub id: String,
    pub secret: String,
}

impl JoinToken {
    pub fn encode(&self) -> String {
        format!("outpost1:{}:{}:{}", self.ca_fingerprint, self.id, self.secret)
    }
    pub fn parse(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.trim().split(':').collect();
        let hexok = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_hexdigit());
        match parts.as_slice() {
            ["outpost1", fp, id, secret] if fp.len() == 64 && hexok(fp) && hexok(id) && hexok(secret) => Ok(Self {
                ca_fingerprint: fp.to_ascii_lowercase(),
                id: id.to_string(),
                secret: secret.to_string(),
            }),
            _ => Err("malformed join token: expected outpost1:<ca-fingerprint>:<id>:<secret> as printed by `outpost token create`".into()),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    pub token_id: String,
    pub token_secret: String,
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
    pub csr_pem: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinResponse {
    pub node: String,
    pub cert_pem: String,
    pub ca_pem: String,
    pub labels: Labels,
    /// The public endpoints of every hub replica (`outpost hub --advertise`), `https://` URLs,
    /// sorted. Empty (left out) when the hub advertises none: the agent keeps the URL it joined
    /// through. Protocol 1.4.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hubs: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RenewRequest {
    pub csr_pem: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RenewResponse {
    pub cert_pem: String,
}

/// Error body of every non-2xx answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiError {
    /// Machine-readable: `token_expired`, `forbidden`, `invalid_manifest`, ...
    pub code: String,
    /// What happened and what to do next.
    pub message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<ManifestError>,
}

// ---------------------------------------------------------------------------------------------
// Desired state (hub -> agent)

/// The runtime a workload's containers run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Process,
    Docker,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum RestartPolicy {
    #[default]
    Always,
    OnFailure,
    Never,
}

/// One workload as a node runs it: everything resolved (env values, config files), so the agent
/// needs nothing else from the hub.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkloadSpec {
    /// `deployment/<ns>/<name>` or `daemonset/<ns>/<name>`.
    pub key: String,
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    /// Revision number of the pod template at the hub.
    pub revision: u64,
    /// Content hash of everything in this spec except `hash` itself.
    pub hash: String,
    pub runtime: Runtime,
    pub restart_policy: RestartPolicy,
    pub grace_seconds: u64,
    pub containers: Vec<ContainerSpec>,
    pub volumes: Vec<VolumeSpec>,
    /// Health gate of an update on the node: Ready continuously for this long...
    #[serde(default = "default_min_ready")]
    pub min_ready_seconds: u64,
    /// ...within this long after the new revision started, or it is rolled back.
    #[serde(default = "default_progress_deadline")]
    pub progress_deadline_seconds: u64,
    /// Docker containers share the node's network namespace (processes always do).
    #[serde(default, skip_serializing_if = "is_false")]
    pub host_network: bool,
    /// Docker containers share the node's PID namespace (processes always do).
    #[serde(default, skip_serializing_if = "is_false")]
    pub host_pid: bool,
    /// Set for Jobs and CronJobs: run to completion instead of being kept running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobRunSpec>,
    /// Set for an AgentUpdate (no containers): the agent binary this node should run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_update: Option<AgentUpdateRun>,
    /// Set for a Pipeline (no containers): the pipeline this node runs at this revision
    /// (docs/pipeline.md); its streams run in the agent's pipeline, not as processes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<crate::pipeline::NodePipeline>,
    /// Set for a Deployment with site failover (docs/site-ha.md): this node holds the workload
    /// as one of the site's members and runs it only while its site peers agree it is active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<crate::site::FailoverSpec>,
}

/// The agent binary a node should run (`kind: AgentUpdate`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentUpdateRun {
    /// `sha256:<hex>` of the binary, a blob at the hub (`/v1/images/blobs/<digest>`).
    pub digest: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The new agent must mark itself healthy within this long, or it is rolled back.
    pub health_deadline_seconds: u64,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// How a Job's pod runs on its node; with `cron`, the node starts one run per schedule time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRunSpec {
    /// Failed runs (Never) or container restarts (OnFailure) before the Job fails.
    pub backoff_limit: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_deadline_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<CronRunSpec>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CronRunSpec {
    pub schedule: String,
    /// IANA zone; None: the node's local zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    pub concurrency: ConcurrencyPolicy,
    #[serde(default, skip_serializing_if = "is_false")]
    pub suspend: bool,
    pub successful_history: u32,
    pub failed_history: u32,
    /// A run missed by more than this (agent down) is skipped; None: any delay is fine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starting_deadline_seconds: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ConcurrencyPolicy {
    #[default]
    Allow,
    Forbid,
    Replace,
}

/// A container's security settings as the node applies them (pod defaults folded in).
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SecuritySpec {
    #[serde(default, skip_serializing_if = "is_false")]
    pub privileged: bool,
    /// Upper-case names without `CAP_`, or `ALL`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_drop: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_user: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_group: Option<u32>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub run_as_non_root: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only_root_fs: bool,
    /// `allowPrivilegeEscalation: false`: the no_new_privs flag.
    #[serde(default, skip_serializing_if = "is_false")]
    pub no_new_privileges: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub seccomp_unconfined: bool,
}

impl SecuritySpec {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// A downward-API value only the node knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum NodeField {
    /// `spec.nodeName`.
    NodeName,
    /// `status.hostIP`: the node's first non-loopback address.
    HostIp,
    /// `status.podIP` of a pod on the host network (or a process): the node's address.
    PodIp,
    /// `metadata.name`: `<workload>-<node>`.
    PodName,
    /// `limits.cpu` without a limit: the node's CPUs, in units of `divisor` millicores (rounded up).
    NodeCpu { divisor_millis: u64 },
    /// `limits.memory` without a limit: the node's memory, in units of `divisor` bytes (rounded up).
    NodeMemory { divisor_bytes: u64 },
}

/// outpost's default `minReadySeconds` (Kubernetes' is 0): a revision must stay Ready this
/// long before it becomes a node's last-known-good, so a crash shortly after start is caught.
pub const DEFAULT_MIN_READY_SECS: u64 = 10;
/// Kubernetes' default `progressDeadlineSeconds`.
pub const DEFAULT_PROGRESS_DEADLINE_SECS: u64 = 600;

fn default_min_ready() -> u64 {
    DEFAULT_MIN_READY_SECS
}
fn default_progress_deadline() -> u64 {
    DEFAULT_PROGRESS_DEADLINE_SECS
}

/// A probe as the agent runs it (ports resolved to numbers, Kubernetes defaults filled in).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeSpec {
    pub action: ProbeAction,
    pub initial_delay_seconds: u64,
    pub period_seconds: u64,
    pub timeout_seconds: u64,
    pub failure_threshold: u32,
    pub success_threshold: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProbeAction {
    HttpGet {
        host: String,
        port: u16,
        path: String,
        headers: Vec<(String, String)>,
        /// `scheme: HTTPS`: TLS without verifying the certificate, as the kubelet does.
        #[serde(default, skip_serializing_if = "is_false")]
        https: bool,
    },
    TcpSocket {
        host: String,
        port: u16,
    },
    Exec {
        command: Vec<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContainerSpec {
    pub name: String,
    pub image: Option<String>,
    #[serde(default)]
    pub image_pull_policy: PullPolicy,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub ports: Vec<PortSpec>,
    pub cpu_millis: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub mounts: Vec<MountSpec>,
    #[serde(default)]
    pub startup_probe: Option<ProbeSpec>,
    #[serde(default)]
    pub liveness_probe: Option<ProbeSpec>,
    #[serde(default)]
    pub readiness_probe: Option<ProbeSpec>,
    #[serde(default, skip_serializing_if = "SecuritySpec::is_default")]
    pub security: SecuritySpec,
    /// Environment variables the node fills in (the downward API's node-side fields).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_env: Vec<(String, NodeField)>,
    /// An init container: runs to completion (restarted on failure) before the containers
    /// start. A sidecar (`restartPolicy: Always`) is an ordinary container.
    #[serde(default, skip_serializing_if = "is_false")]
    pub init: bool,
    /// Set for `runtimeClassName: onnx`: the model this container serves (docs/inference.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelServe>,
}

/// What an ONNX serving container runs: the agent starts `outpost serve-model` on the model's
/// cached file (the workload runs with the process runtime).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelServe {
    /// As the manifest names it: `digits:v2` or `digits@sha256:<hex>`.
    pub reference: String,
    /// Where it is served: `127.0.0.1:<containerPort>`, or every address at `hostPort` when set.
    pub port: u16,
    #[serde(default)]
    pub host_port: Option<u16>,
    /// The model's own health gate, from the RolloutPolicy that covers the workload
    /// (`spec.gate`): judged on the node while a revision is Progressing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<ModelGate>,
}

/// The model part of a node's update gate (RolloutPolicy `spec.gate`, docs/inference.md): a
/// new model revision whose server answers with more errors or slower than this, over at least
/// `min_requests` requests while it is Progressing, fails its gate and is rolled back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelGate {
    /// Largest fraction of requests answered with an error (0.05 = 5 %).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate: Option<f64>,
    /// Largest p99 latency inside the model server, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99_ms: Option<f64>,
    /// Requests needed before the model is judged (fewer: the gate is readiness only).
    pub min_requests: u64,
}

// Eq for ModelServe (the gate's thresholds are finite numbers, checked at apply).
impl Eq for ModelGate {}

/// Upper bounds (seconds) of a model server's latency histogram buckets; one more bucket
/// counts what is slower than the last bound.
pub const MODEL_LATENCY_BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
];

/// A model server's counters since it started (`GET /v2/models/{name}/stats`), as the agent
/// reads them and forwards them in its vitals.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelCounters {
    /// Requests answered (inference routes only).
    pub requests: u64,
    /// Of which refused or failed (4xx/5xx).
    pub errors: u64,
    /// Requests per latency bucket, not cumulative: `MODEL_LATENCY_BUCKETS.len() + 1` values,
    /// the last for requests slower than the last bound.
    pub buckets: Vec<u64>,
    /// Sum of the latencies, seconds.
    pub latency_sum_s: f64,
}

/// One serving workload's model figures in a vitals sample.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelVitals {
    /// Workload key.
    pub key: String,
    pub model: String,
    pub version: String,
    /// Cumulative since the model server started (a restart starts them again from 0).
    #[serde(flatten)]
    pub counters: ModelCounters,
    /// p99 latency over the last sampling interval, ms (absent: no request in it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
    /// Percent of the last interval's requests that failed (absent: no request in it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_pct: Option<f64>,
}

impl ModelServe {
    /// The model's name (before `:` or `@`) and its version (the tag or the digest).
    pub fn name_version(&self) -> (&str, &str) {
        if let Some((n, d)) = self.reference.split_once('@') {
            return (n, d);
        }
        match self.reference.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, t),
            _ => (&self.reference, "latest"),
        }
    }
}

/// When the agent fetches a container's image (Kubernetes' meaning; the default is Always for
/// `:latest` or untagged images, IfNotPresent otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PullPolicy {
    Always,
    #[default]
    IfNotPresent,
    Never,
}

/// An image stored at the hub (`outpost image push`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageTag {
    /// As the workload names it, e.g. `local/busybox:1`.
    pub name: String,
    /// `sha256:<hex>` of the `docker save` archive.
    pub digest: String,
    pub size: u64,
    pub pushed_at: i64,
}

impl ImageTag {
    /// The name must be a valid image reference (no newlines, no `..`; see
    /// [`crate::validate_image_ref`]) and the digest `sha256:` and 64 lower-case hex digits.
    pub fn validate(&self) -> Result<(), FieldError> {
        crate::validate_image_ref(&self.name).map_err(|e| FieldError::new("name", e))?;
        let hex = self.digest.strip_prefix("sha256:").unwrap_or("");
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(FieldError::new(
                "digest",
                format!("{:?} is not sha256: followed by 64 lower-case hex digits", self.digest),
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PortSpec {
    pub container_port: u16,
    pub host_port: Option<u16>,
    pub protocol: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MountSpec {
    pub volume: String,
    pub path: String,
    pub read_only: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub name: String,
    pub source: VolumeSource,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum VolumeSource {
    HostPath {
        path: String,
        create: bool,
        /// Kubernetes' hostPath `type` (`CharDevice`, `File`, ...); empty: none given.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        host_type: String,
    },
    /// Files materialized from a ConfigMap or Secret: file name -> base64 content.
    Files {
        files: BTreeMap<String, String>,
        secret: bool,
        /// `defaultMode`; None: 0644 (0600 for Secrets).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<u32>,
    },
    EmptyDir,
    /// A PersistentVolumeClaim: `<data-dir>/volumes/<namespace>/<claim>` on the node, kept
    /// across revisions, restarts and reboots.
    Claim {
        namespace: String,
        claim: String,
    },
}

/// Answer to a sync long-poll: the changes since the generation the agent holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyncResponse {
    pub generation: u64,
    /// When true, `upsert` is the whole desired state and the agent drops everything else.
    pub full: bool,
    #[serde(default)]
    pub upsert: Vec<WorkloadSpec>,
    #[serde(default)]
    pub remove: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Status (agent -> hub)

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Pending,
    Running,
    /// Restarting after an exit, waiting out the backoff.
    Backoff,
    /// Restarting repeatedly: several consecutive failures.
    CrashLoopBackOff,
    Succeeded,
    Failed,
    /// The workload needs a runtime this agent does not provide yet.
    WaitingForRuntime,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Running => "Running",
            Phase::Backoff => "Backoff",
            Phase::CrashLoopBackOff => "CrashLoopBackOff",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
            Phase::WaitingForRuntime => "WaitingForRuntime",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContainerStatus {
    pub name: String,
    pub phase: Phase,
    pub pid: Option<u32>,
    pub restarts: u32,
    pub last_exit_code: Option<i32>,
    pub reason: Option<String>,
    /// Unix ms when the current process started.
    pub started_at: Option<i64>,
    /// Started (startup probe passed) and readiness probe passing (or none defined).
    #[serde(default)]
    pub ready: bool,
    /// The last probe failure: `liveness probe failed: HTTP 500 from http://127.0.0.1:8080/healthz`.
    #[serde(default)]
    pub probe_failure: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkloadStatus {
    pub key: String,
    /// The revision running on the node (the last-known-good after a rollback).
    pub revision: u64,
    pub hash: String,
    pub phase: Phase,
    pub containers: Vec<ContainerStatus>,
    /// Every container ready.
    #[serde(default)]
    pub ready: bool,
    /// The update state of this workload on the node.
    #[serde(default)]
    pub rollout: Option<RolloutStatus>,
    /// For a site-failover workload: `active` or `standby` on this node (docs/site-ha.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_role: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RolloutState {
    /// The desired revision is running and passed its health gate: it is the last-known-good.
    Complete,
    /// The desired revision runs and is being gated.
    Progressing,
    /// The desired revision failed its gate; the last-known-good runs again.
    RolledBack,
    /// The desired revision failed its gate and there is no last-known-good to return to.
    Failed,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutStatus {
    pub state: RolloutState,
    /// The revision the hub asked for.
    pub target_revision: u64,
    pub target_hash: String,
    /// The node's last-known-good revision, if any.
    pub good_revision: Option<u64>,
    /// Why the target failed: probe failure text, exit code, last log lines.
    pub reason: Option<String>,
    /// Unix ms of the last state change.
    pub since: i64,
}

/// Something that happened on the node, kept durably until the hub acknowledges it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeEvent {
    /// Per-node sequence number, strictly increasing, never reused.
    pub seq: u64,
    /// Unix ms when it happened on the node.
    pub at: i64,
    pub workload: Option<String>,
    pub reason: String,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub agent_version: String,
    pub uptime_secs: u64,
    /// The generation the agent has applied.
    pub generation: u64,
    /// When true, `workloads` is complete and the hub drops statuses not listed.
    pub full: bool,
    #[serde(default)]
    pub workloads: Vec<WorkloadStatus>,
    #[serde(default)]
    pub removed: Vec<String>,
    #[serde(default)]
    pub events: Vec<NodeEvent>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusAck {
    /// Highest event sequence the hub has stored; the agent may forget events up to it.
    pub events_acked: u64,
}

// ---------------------------------------------------------------------------------------------
// Operator API

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ManifestFile {
    pub name: String,
    pub content: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApplyRequest {
    pub files: Vec<ManifestFile>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApplyResult {
    pub object: String,
    /// `created`, `configured` or `unchanged`.
    pub action: String,
    pub revision: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApplyResponse {
    pub results: Vec<ApplyResult>,
    #[serde(default)]
    pub warnings: Vec<Warning>,
}

/// One entry of `outpost rollout history`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RevisionInfo {
    pub revision: u64,
    pub template_hash: String,
    pub created_at: i64,
    /// `container=image` of each container, to tell revisions apart.
    pub images: Vec<String>,
    /// This revision is the current one.
    pub current: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UndoRequest {
    /// Go back to this revision; default: the revision before the current one.
    pub to_revision: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeleteResponse {
    pub deleted: Vec<String>,
    pub not_found: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TokenRequest {
    /// Labels every node joining with the token gets; a node cannot change them.
    #[serde(default)]
    pub labels: Labels,
    pub ttl_secs: Option<u64>,
    pub uses: Option<u32>,
    /// Label keys a node joining with the token may set on itself (besides
    /// `kubernetes.io/os`, `kubernetes.io/arch` and `node.outpost.dev/*`). Protocol 1.1.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_labels: Vec<String>,
}

impl TokenRequest {
    /// Refuse what would make a useless or broken token: `uses: 0` (nobody could join),
    /// `ttl_secs: 0` or beyond 100 years, labels Kubernetes would not accept. The CLI checks
    /// before sending; the hub checks again.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.uses == Some(0) {
            return Err(FieldError::new(
                "uses",
                "must be at least 1: no node could join with a token of 0 uses; leave it out for unlimited uses until the token expires",
            ));
        }
        match self.ttl_secs {
            Some(0) => {
                return Err(FieldError::new(
                    "ttl_secs",
                    "must be at least 1 second; leave it out for a token that does not expire",
                ))
            }
            Some(t) if t > crate::MAX_DURATION_SECS => {
                return Err(FieldError::new(
                    "ttl_secs",
                    format!("{t} s is longer than 100 years; leave it out for a token that does not expire"),
                ))
            }
            _ => {}
        }
        for (k, v) in &self.labels {
            crate::checks::validate_label_key(k).map_err(|e| FieldError::new("labels", e))?;
            crate::checks::validate_label_value(v).map_err(|e| FieldError::new(format!("labels.{k}"), e))?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenResponse {
    pub token: String,
    pub id: String,
    pub expires_at: Option<i64>,
    pub uses: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    /// `Online` or `Offline`.
    pub status: String,
    pub labels: Labels,
    pub last_seen: Option<i64>,
    pub joined_at: i64,
    pub agent_version: Option<String>,
    pub uptime_secs: Option<u64>,
    pub generation: u64,
    pub applied_generation: u64,
    pub cert_expires_at: Option<i64>,
    pub workloads: Vec<WorkloadStatus>,
    #[serde(default)]
    pub events: Vec<NodeEvent>,
    /// Problems the node reported last (empty when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<NodeCondition>,
}

/// One workload instance on one node, as `outpost get workloads` lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub node: String,
    pub node_status: String,
    pub key: String,
    pub desired_revision: u64,
    pub status: Option<WorkloadStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkloadInfo {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub revision: u64,
    pub runtime: Runtime,
    /// Deployments: requested replicas. DaemonSets: matching nodes.
    pub desired: u32,
    pub scheduled: u32,
    pub ready: u32,
    pub node_selector: Labels,
    pub created_at: i64,
    pub updated_at: i64,
    pub placements: Vec<Placement>,
    /// Why fewer replicas are scheduled than desired, if so.
    pub note: Option<String>,
    pub manifest: serde_json::Value,
}

// ---------------------------------------------------------------------------------------------
// Monitoring, alerts and logs (issue 5). Every addition is optional on the wire: the two wrapper
// types flatten the v1 messages and add fields an older peer ignores. See docs/alerts.md.

/// A threshold on a percentage (or degrees Celsius): breached while the value is `> above`;
/// fires once breached continuously for `for_secs`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Threshold {
    pub above: f64,
    #[serde(default)]
    pub for_secs: u64,
}

/// A node's effective monitoring policy: outpost's defaults overlaid with every `AlertPolicy`
/// whose nodeSelector matches the node. `None` thresholds are disabled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodePolicy {
    #[serde(default)]
    pub cpu: Option<Threshold>,
    #[serde(default)]
    pub memory: Option<Threshold>,
    #[serde(default)]
    pub disk: Option<Threshold>,
    #[serde(default)]
    pub temperature: Option<Threshold>,
    /// A model's p99 latency over a sampling interval, milliseconds (`InferenceLatencyHigh`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference_latency: Option<Threshold>,
    /// Percent of a model's requests that failed over a sampling interval
    /// (`InferenceErrorsHigh`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference_errors: Option<Threshold>,
    /// Alert when a workload is in CrashLoopBackOff.
    #[serde(default)]
    pub crash_loop: bool,
    /// Substrings (case-sensitive) that mark a log line as an error to forward.
    #[serde(default)]
    pub error_patterns: Vec<String>,
    /// Rotated log segments older than this are deleted.
    #[serde(default)]
    pub log_max_age_secs: u64,
    /// The AlertPolicy objects merged in, in the order applied.
    #[serde(default)]
    pub sources: Vec<String>,
}

pub const DEFAULT_ERROR_PATTERNS: &[&str] = &[
    "ERROR",
    "Error:",
    "FATAL",
    "Fatal",
    "CRITICAL",
    "panic",
    "PANIC",
    "Traceback (most recent call last)",
    "Exception",
    "segfault",
    "Segmentation fault",
    "OOM",
    "Out of memory",
];

impl Default for NodePolicy {
    /// CPU > 90 % for 5 min, memory > 90 %, disk > 90 %, a model's p99 latency > 50 ms for
    /// 1 min, crash loops, no temperature or inference error alert, the default error
    /// patterns, logs kept 7 days.
    fn default() -> Self {
        Self {
            cpu: Some(Threshold {
                above: 90.0,
                for_secs: 300,
            }),
            memory: Some(Threshold {
                above: 90.0,
                for_secs: 0,
            }),
            disk: Some(Threshold {
                above: 90.0,
                for_secs: 0,
            }),
            temperature: None,
            // The articles' rule: alert when inference latency is over 50 ms.
            inference_latency: Some(Threshold {
                above: 50.0,
                for_secs: 60,
            }),
            inference_errors: None,
            crash_loop: true,
            error_patterns: DEFAULT_ERROR_PATTERNS.iter().map(|s| s.to_string()).collect(),
            log_max_age_secs: 7 * 86400,
            sources: Vec::new(),
        }
    }
}

impl NodePolicy {
    pub fn hash(&self) -> String {
        crate::content_hash(self)
    }
}

/// An operator's request for a workload's log, handed to the agent in its sync answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogRequest {
    pub id: String,
    /// Workload key, `deployment/<ns>/<name>`.
    pub workload: String,
    /// Default: the workload's first container.
    #[serde(default)]
    pub container: Option<String>,
    /// Only the last N lines.
    #[serde(default)]
    pub tail: Option<u32>,
    /// Only segments written in the last N seconds.
    #[serde(default)]
    pub since_secs: Option<u64>,
    /// Follow: only bytes of the live file after this offset (from the previous answer).
    #[serde(default)]
    pub from_offset: Option<u64>,
}

/// The agent's answer to a [`LogRequest`] (`POST /v1/nodes/{node}/logs/{id}`), also what the
/// operator receives.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LogData {
    pub container: String,
    pub text: String,
    /// Length of the live log file when read: the next `from_offset` when following.
    pub offset: u64,
    /// The answer was cut to the size limit (the newest part is kept).
    #[serde(default)]
    pub truncated: bool,
    #[serde(default)]
    pub error: Option<String>,
}

/// Most points per series a vitals history answer carries (the agent downsamples to it).
pub const MAX_VITALS_POINTS: u32 = 300;

/// An operator's request for the node's own vitals history (protocol 1.4), handed to the agent
/// in its sync answer; answered with `POST /v1/nodes/{node}/vitals/{id}` ([`VitalsHistory`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VitalsRequest {
    pub id: String,
    /// Only samples taken at or after this time (unix ms, node clock).
    pub since: i64,
    /// Downsample to at most this many points (capped at [`MAX_VITALS_POINTS`]).
    pub max_points: u32,
}

/// One point of a node's vitals history: a sample, or the peak of several when downsampled.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct VitalsPoint {
    /// Unix ms (node clock): the last sample the point covers.
    pub at: i64,
    /// CPU busy, percent of all cores.
    pub cpu: f32,
    /// Memory in use, percent.
    pub mem: f32,
    /// Use of the agent's data file system (of `/` when the same), percent.
    pub disk: f32,
    pub load1: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temp_c: Option<f32>,
}

impl VitalsPoint {
    pub fn of(v: &Vitals) -> Self {
        Self {
            at: v.at,
            cpu: v.cpu,
            mem: v.mem,
            disk: v.disk_data.unwrap_or(v.disk_root),
            load1: v.load1,
            temp_c: v.temp_c,
        }
    }
}

/// A node's vitals history, oldest first: the agent's answer to a [`VitalsRequest`], also what
/// `GET /v1/nodes/{node}/vitals` returns.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VitalsHistory {
    pub points: Vec<VitalsPoint>,
    /// How many stored samples the points summarize (one per minute on the node).
    #[serde(default)]
    pub samples: u32,
    /// Set when the node could not read its history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A forwarded error line. `at` is when the agent read it (log files carry no timestamps).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorLine {
    pub seq: u64,
    pub at: i64,
    pub workload: String,
    pub container: String,
    pub line: String,
}

/// `POST /v1/nodes/{node}/errors`: error lines oldest first, and how many lines the node had to
/// drop so far because a cap was reached (cumulative).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorBatch {
    pub lines: Vec<ErrorLine>,
    #[serde(default)]
    pub dropped_lines: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorAck {
    /// Highest sequence stored; the agent forgets lines up to it.
    pub acked: u64,
}

/// One forwarded error line as `outpost logs --errors` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredErrorLine {
    pub node: String,
    #[serde(flatten)]
    pub line: ErrorLine,
}

/// Per-workload vital signs: CPU percent of one core summed over the unit process groups,
/// resident memory, restarts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkloadVitals {
    pub key: String,
    pub cpu: f32,
    pub rss_bytes: u64,
    #[serde(default)]
    pub restarts: u32,
}

/// A compact summary of a node's vital signs, sent with some status reports.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Vitals {
    /// Unix ms of the sample.
    pub at: i64,
    /// CPU busy, percent of all cores.
    pub cpu: f32,
    /// Memory in use (total - available), percent.
    pub mem: f32,
    pub mem_total_bytes: u64,
    /// Use of the file system holding `/`, percent.
    pub disk_root: f32,
    /// Use of the file system holding the agent's data dir, when it is not the one of `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_data: Option<f32>,
    pub load1: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temp_c: Option<f32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<WorkloadVitals>,
    /// Log lines dropped because a cap was reached, since the node joined.
    #[serde(default)]
    pub log_dropped_lines: u64,
    /// Each ONNX serving workload's model counters (docs/inference.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelVitals>,
}

/// A sync answer with the monitoring additions (one JSON object; see docs/protocol.md §9).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyncAnswer {
    #[serde(flatten)]
    pub sync: SyncResponse,
    /// The node's effective policy, present when it differs from the hash the agent sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert_policy: Option<NodePolicy>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log_requests: Vec<LogRequest>,
    /// Revisions this node will be asked to run later (its rollout wave is open but its
    /// maintenance window is not): the agent fetches their images now, so activation inside
    /// the window needs no download. A hint: it changes nothing that runs. Protocol 1.2.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefetch: Vec<WorkloadSpec>,
    /// Exec sessions an operator opened on this node (docs/exec.md). Protocol 1.3.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exec: Vec<crate::exec::ExecRequest>,
    /// Requests for the node's own vitals history (docs/dashboard.md). Protocol 1.4.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vitals_requests: Vec<VitalsRequest>,
    /// The hub endpoints (as in [`JoinResponse::hubs`]), present when they differ from the
    /// hash the agent sent (`hubs=`, [`hubs_hash`]). Protocol 1.4.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hubs: Vec<String>,
}

/// The hash an agent sends (`hubs=` on sync) of the hub endpoints it holds.
pub fn hubs_hash(hubs: &[String]) -> String {
    crate::content_hash(&hubs)
}

/// A status report with the monitoring additions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusWithVitals {
    #[serde(flatten)]
    pub report: StatusReport,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vitals: Option<Vitals>,
    /// The node's conditions, complete (an empty list clears them); absent: unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<NodeCondition>>,
}

/// A problem the node reports about itself while it lasts (e.g. it cannot write its state).
/// The status report carries it from memory, so it arrives when nothing can be written on the
/// node; the hub shows it in `describe node` and raises an alert for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeCondition {
    /// `DiskFull` (a write to the agent's data dir failed for lack of space) or `StoreFailing`
    /// (any other failure to write or read the agent's state).
    pub kind: String,
    /// What fails, the error, and what to do.
    pub message: String,
    /// Unix ms (node clock) since when.
    pub since: i64,
}

/// Event reasons of node alerts in the event outbox; the message is `<alert name>: <summary>`.
pub const ALERT_FIRING: &str = "AlertFiring";
pub const ALERT_RESOLVED: &str = "AlertResolved";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AlertState {
    Firing,
    Resolved,
}

/// One fleet alert, as `outpost get alerts` lists it and webhooks carry it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AlertInfo {
    /// `NodeOffline`, `NodeCpuHigh`, `NodeMemoryHigh`, `NodeDiskFull`, `DataDiskFull`,
    /// `NodeTemperatureHigh`, `WorkloadCrashLoop`, `WorkloadRolledBack`, `NodeCertificateExpiring`.
    pub name: String,
    pub node: String,
    /// The workload (or other subject) the alert is about; empty for node-wide alerts.
    #[serde(default)]
    pub subject: String,
    /// `critical` or `warning`.
    pub severity: String,
    pub state: AlertState,
    /// `node` (evaluated on the node, works offline) or `hub`.
    pub source: String,
    /// Unix ms when it started firing (the node's time for node alerts).
    pub started_at: i64,
    #[serde(default)]
    pub resolved_at: Option<i64>,
    pub summary: String,
    #[serde(default)]
    pub labels: Labels,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_requests_are_checked() {
        let req = |uses, ttl_secs, labels: &[(&str, &str)]| TokenRequest {
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ttl_secs,
            uses,
            node_labels: Vec::new(),
        };
        assert_eq!(req(Some(1), Some(86_400), &[("site", "store-1")]).validate(), Ok(()));
        assert_eq!(req(None, None, &[]).validate(), Ok(()));
        for (r, want) in [
            (req(Some(0), None, &[]), "uses: must be at least 1"),
            (req(None, Some(0), &[]), "ttl_secs: must be at least 1 second"),
            (
                req(None, Some(u64::MAX), &[]),
                "ttl_secs: 18446744073709551615 s is longer than 100 years",
            ),
            (
                req(None, None, &[("a\nb", "c")]),
                "labels: \"a\\nb\" is not a valid label key",
            ),
            (
                req(None, None, &[("site", "x y")]),
                "labels.site: \"x y\" is not a valid label value",
            ),
        ] {
            let e = r.validate().unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}");
        }
    }

    #[test]
    fn image_tags_are_checked() {
        let tag = |name: &str, digest: &str| ImageTag {
            name: name.into(),
            digest: digest.into(),
            size: 1,
            pushed_at: 0,
        };
        let d = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(tag("local/web:1", &d).validate(), Ok(()));
        for (t, want) in [
            (tag("web\n:1", &d), "name: \"web\\n:1\" is not a valid image reference"),
            (tag("../web", &d), "name: \"../web\" is not a valid image reference"),
            (tag("web", "sha256:xyz"), "digest: \"sha256:xyz\" is not sha256:"),
            (tag("web", &d.to_uppercase()), "digest:"),
        ] {
            let e = t.validate().unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}");
        }
    }

    #[test]
    fn token_roundtrip_and_rejects() {
        let t = JoinToken {
            ca_fingerprint: "ab".repeat(32),
            id: "0a1b2c3d".into(),
            secret: "ff".repeat(16),
        };
        assert_eq!(JoinToken::parse(&t.encode()), Ok(t));
        for bad in ["", "outpost1:zz:1:2", "outpost2:aa:1:2", "K10abc::server:secret"] {
            assert!(JoinToken::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn protocol_string_matches_the_numbers() {
        assert_eq!(PROTOCOL, format!("{PROTOCOL_VERSION}.{PROTOCOL_MINOR}"));
    }
}
