//! The hub's error type, and the one place where errors become HTTP answers.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use outpost_api::{ApiError, ManifestError, PROTOCOL_VERSION};

use crate::store::StoreError;

pub use crate::store::TokenProblem;

/// Everything a request can fail with. [`IntoResponse`] maps each variant to its status and
/// stable `code` (see docs/protocol.md); the `Display` text is the operator-facing message.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("missing or unknown token; pass an account token (`outpost user add`) or the admin token from <data-dir>/admin.token as `Authorization: Bearer <token>` (outpost reads it from OUTPOST_TOKEN or --token)")]
    Unauthorized,
    /// A known credential that no longer works (expired, revoked, a session ended); the text
    /// says which and what to do.
    #[error("{0}")]
    Credential(String),
    #[error("this request carries no client certificate; node routes need the node's certificate (mTLS). Join first with `outpost agent join --hub URL --token T`")]
    NoClientCert,
    #[error("this node's certificate is not known to the hub (the node was deleted or re-joined elsewhere); join again with `outpost agent join --hub URL --token T`")]
    UnknownNode,
    #[error("the certificate of node {node} expired {} ago; the agent renews it by itself (POST /v1/nodes/{node}/renew accepts it); if that keeps failing, see the agent's log", human_duration(*.ago_ms))]
    CertificateExpired { node: String, ago_ms: i64 },
    #[error("{0}; nothing was stored")]
    Labels(#[from] outpost_core::link::LabelRefusal),
    #[error("the request body is larger than the hub accepts ({} MiB); send less at once (for example apply the manifests in several commands)", .limit >> 20)]
    PayloadTooLarge { limit: usize },
    #[error("the hub cannot store this: {0}; free space in the hub's data directory (or raise its file size limit) and try again")]
    InsufficientStorage(String),
    #[error("node {caller} may only access its own state, not node {target}'s")]
    Forbidden { caller: String, target: String },
    #[error("the agent speaks protocol version {got}, this hub only version {PROTOCOL_VERSION}; upgrade the hub to the agent's release (or install an older agent)")]
    ProtocolVersion { got: String },
    #[error("{}", token_message(.0))]
    Token(TokenProblem),
    #[error("node {0} already exists; pick another --name, or remove the old one with `outpost delete node {0}`")]
    NodeExists(String),
    #[error("invalid node name {name:?}: {reason}; use a DNS label: lower-case letters, digits and '-', at most 63 characters, starting and ending with a letter or digit")]
    InvalidName { name: String, reason: &'static str },
    #[error(
        "the certificate signing request is not valid ({0}); the agent generates it, so upgrade or reinstall the agent"
    )]
    InvalidCsr(String),
    #[error("{} in the manifests; nothing was applied", problems(.0.len()))]
    InvalidManifest(Vec<ManifestError>),
    #[error("{object} is used by {workload}; delete or change {workload} first, or delete both in one command")]
    InUse { object: String, workload: String },
    #[error("{0} not found; list what exists with `outpost get`")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    /// The request does not fit the object's state (e.g. resuming a rollout that is not paused).
    #[error("{0}")]
    Conflict(String),
    /// A node did not answer a request relayed through its own link in time.
    #[error("{0}")]
    NodeUnreachable(String),
    /// A request needs a node that is offline now (its link is down): try again later.
    #[error("{0}")]
    NodeOffline(String),
    /// The caller is known but may not make this request.
    #[error("{0}")]
    NotAllowed(String),
    #[error("internal hub error: {0}; see the hub's log, and retry")]
    Internal(String),
    #[error(
        "{method} is not allowed on {path}; see docs/protocol.md (or GET /v1/openapi.yaml) for what this route accepts"
    )]
    MethodNotAllowed { method: String, path: String },
    /// No pooled database connection came free within the pool's wait (PostgreSQL saturated):
    /// answered `503` with a `Retry-After` (`outpost_core::admission::store_busy_retry_after`).
    #[error("the hub's database is saturated (no connection came free in time), so this request did not complete; retry after the answer's Retry-After (agents do so by themselves)")]
    StoreBusy,
    /// SQLite reported a full disk: nothing was written.
    #[error("the hub's disk is full, so nothing was changed; free space in the hub's data directory (or grow its disk) and retry")]
    DiskFull,
}

fn problems(n: usize) -> String {
    if n == 1 {
        "1 problem".into()
    } else {
        format!("{n} problems")
    }
}

fn token_message(p: &TokenProblem) -> String {
    match p {
        TokenProblem::Unknown { id } => format!(
            "join token {id} is not known to this hub (wrong secret, or the token belongs to another hub); create a new one with `outpost token create`"
        ),
        TokenProblem::Expired { id, ago_ms } => format!(
            "join token {id} expired {} ago; create a new one with `outpost token create`",
            human_duration(*ago_ms)
        ),
        TokenProblem::UsedUp { id, used } => format!(
            "join token {id} has been used {used} time{} already; create a new one with `outpost token create`",
            if *used == 1 { "" } else { "s" }
        ),
    }
}

/// `90s`, `5m`, `2h`, `3d`: coarse, for messages (outpost's one duration formatter).
pub use outpost_api::human_duration;

impl HubError {
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        use HubError::*;
        match self {
            Unauthorized | NoClientCert | Credential(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            UnknownNode => (StatusCode::UNAUTHORIZED, "unknown_node"),
            CertificateExpired { .. } => (StatusCode::UNAUTHORIZED, "certificate_expired"),
            Labels(_) => (StatusCode::BAD_REQUEST, "label_not_allowed"),
            PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            InsufficientStorage(_) => (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage"),
            Forbidden { .. } => (StatusCode::FORBIDDEN, "forbidden"),
            ProtocolVersion { .. } => (StatusCode::BAD_REQUEST, "protocol_version"),
            Token(TokenProblem::Unknown { .. }) => (StatusCode::UNAUTHORIZED, "token_unknown"),
            Token(TokenProblem::Expired { .. }) => (StatusCode::UNAUTHORIZED, "token_expired"),
            Token(TokenProblem::UsedUp { .. }) => (StatusCode::UNAUTHORIZED, "token_used_up"),
            NodeExists(_) => (StatusCode::CONFLICT, "node_exists"),
            InvalidName { .. } => (StatusCode::BAD_REQUEST, "invalid_name"),
            InvalidCsr(_) => (StatusCode::BAD_REQUEST, "invalid_csr"),
            InvalidManifest(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_manifest"),
            InUse { .. } => (StatusCode::CONFLICT, "in_use"),
            NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            NodeUnreachable(_) => (StatusCode::GATEWAY_TIMEOUT, "node_unreachable"),
            NodeOffline(_) => (StatusCode::CONFLICT, "node_offline"),
            NotAllowed(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            MethodNotAllowed { .. } => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            DiskFull => (StatusCode::INSUFFICIENT_STORAGE, "disk_full"),
            StoreBusy => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
        }
    }
}

impl HubError {
    /// The error each request of a failed group gets (a store error is not `Clone`): a
    /// saturated database and a full disk stay what they are, anything else is an internal
    /// error with the store's text.
    pub fn for_each_of_group(e: &StoreError) -> HubError {
        match e {
            StoreError::Pg(sqlx::Error::PoolTimedOut) => HubError::StoreBusy,
            StoreError::Sqlite(s) if is_disk_full(s) => HubError::DiskFull,
            // PostgreSQL's disk_full (SQLSTATE 53100).
            StoreError::Pg(sqlx::Error::Database(d)) if d.code().as_deref() == Some("53100") => HubError::DiskFull,
            other => HubError::Internal(other.to_string()),
        }
    }

    /// The same error again, for another request that waited on the same failure.
    pub fn again(&self) -> HubError {
        match self {
            HubError::StoreBusy => HubError::StoreBusy,
            HubError::DiskFull => HubError::DiskFull,
            other => HubError::Internal(other.to_string()),
        }
    }
}

impl From<StoreError> for HubError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Token(p) => HubError::Token(p),
            StoreError::NodeExists(n) => HubError::NodeExists(n),
            StoreError::Labels(r) => HubError::Labels(r),
            other => HubError::for_each_of_group(&other),
        }
    }
}

/// SQLite's "database or disk is full" (also when a write hits ENOSPC).
pub fn is_disk_full(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull)
}

/// A `503 busy` with `Retry-After: secs` (admission control, a saturated database).
pub fn busy_response(message: String, secs: u64) -> Response {
    let body = ApiError {
        code: "busy".into(),
        message,
        details: Vec::new(),
    };
    let mut resp = (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    resp.headers_mut()
        .insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(secs));
    resp
}

/// Marks a `503` answered for a saturated database (`HubError::StoreBusy`), for the busy
/// counter (`crate::metrics::track`).
#[derive(Clone, Copy, Debug)]
pub struct StoreBusyAnswer;

/// Saturated-database answers come in floods: logged at most every 10 s, with a count.
static STORE_BUSY_LOG: std::sync::Mutex<crate::server::Throttle> =
    std::sync::Mutex::new(crate::server::Throttle::new(std::time::Duration::from_secs(10)));

impl IntoResponse for HubError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if matches!(self, HubError::StoreBusy) {
            let logged = STORE_BUSY_LOG
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .check(std::time::Instant::now());
            if let Some(not_logged) = logged {
                tracing::warn!(
                    not_logged,
                    "requests answered 503 busy: no database connection came free within the pool's wait"
                );
            }
            let secs = outpost_core::admission::store_busy_retry_after(rand::random());
            let mut resp = busy_response(self.to_string(), secs);
            resp.extensions_mut().insert(StoreBusyAnswer);
            return resp;
        }
        if status.is_server_error() {
            tracing::error!(code, error = %self, "request failed");
        } else {
            tracing::debug!(code, error = %self, "request refused");
        }
        let message = self.to_string();
        let details = match self {
            HubError::InvalidManifest(d) => d,
            _ => Vec::new(),
        };
        let body = ApiError {
            code: code.to_string(),
            message,
            details,
        };
        (status, axum::Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_to_do() {
        let e = HubError::Token(TokenProblem::Expired {
            id: "ab12".into(),
            ago_ms: 2 * 3600 * 1000 + 5,
        });
        assert_eq!(
            e.to_string(),
            "join token ab12 expired 2h ago; create a new one with `outpost token create`"
        );
        assert_eq!(e.status_and_code(), (StatusCode::UNAUTHORIZED, "token_expired"));
        let e = HubError::Forbidden {
            caller: "a".into(),
            target: "b".into(),
        };
        assert_eq!(e.to_string(), "node a may only access its own state, not node b's");
        let e = HubError::InvalidManifest(vec![]);
        assert_eq!(e.to_string(), "0 problems in the manifests; nothing was applied");
        let e = HubError::PayloadTooLarge { limit: 16 << 20 };
        assert!(e.to_string().contains("(16 MiB)"), "{e}");
        assert_eq!(
            e.status_and_code(),
            (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
        );
        let e = HubError::CertificateExpired {
            node: "n".into(),
            ago_ms: 3 * 86_400_000,
        };
        assert!(
            e.to_string().starts_with("the certificate of node n expired 3d ago"),
            "{e}"
        );
        assert_eq!(e.status_and_code(), (StatusCode::UNAUTHORIZED, "certificate_expired"));
    }

    #[test]
    fn a_saturated_database_is_a_busy_answer_with_retry_after_not_an_internal_error() {
        for e in [
            HubError::from(StoreError::Pg(sqlx::Error::PoolTimedOut)),
            HubError::from(crate::monitor::MonitorError::Pg(sqlx::Error::PoolTimedOut)),
        ] {
            assert!(matches!(e, HubError::StoreBusy), "{e:?}");
            let resp = e.into_response();
            assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
            let secs: u64 = resp.headers()[axum::http::header::RETRY_AFTER]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((5..=10).contains(&secs), "{secs}");
            assert!(resp.extensions().get::<StoreBusyAnswer>().is_some());
        }
        // Every request of a failed group gets the busy answer too.
        let group = StoreError::Pg(sqlx::Error::PoolTimedOut);
        assert!(matches!(HubError::for_each_of_group(&group), HubError::StoreBusy));
        assert!(matches!(HubError::StoreBusy.again(), HubError::StoreBusy));
        assert!(matches!(
            HubError::for_each_of_group(&StoreError::Pg(sqlx::Error::PoolClosed)),
            HubError::Internal(_)
        ));
        // Other database errors stay internal.
        let e = HubError::from(StoreError::Pg(sqlx::Error::PoolClosed));
        assert_eq!(e.status_and_code(), (StatusCode::INTERNAL_SERVER_ERROR, "internal"));
        assert_eq!(
            HubError::StoreBusy.status_and_code(),
            (StatusCode::SERVICE_UNAVAILABLE, "busy")
        );
    }
}
