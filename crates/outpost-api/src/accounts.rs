//! Operator accounts, their tokens, browser sessions and the audit log, as the hub's API carries
//! them (docs/accounts.md).

use serde::{Deserialize, Serialize};

/// `POST /v1/users`: add an account. Optional fields take no `serde(default)`: a missing one
/// is None all the same, and a JSON array is refused instead of read as the fields in order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UserRequest {
    /// A DNS-label-like name: lower-case letters, digits, '-', '.', '_' and '@', at most 64.
    pub name: String,
    /// `admin`, `operator`, `viewer` or `metrics`.
    pub role: String,
    /// Limit the account to nodes matching `k=v,k2=v2` (a key given twice allows either value).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// The first token expires after this many seconds (none: never).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_secs: Option<u64>,
    /// A password for browser login (at least 12 characters); none: token only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

/// `POST /v1/users/{name}/tokens`: a new token for an account.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UserTokenRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_secs: Option<u64>,
}

/// A new account token: shown once, the hub keeps its SHA-256 only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UserTokenResponse {
    pub user: String,
    /// The token's id (`outpost user revoke NAME --token ID`).
    pub id: String,
    pub token: String,
    pub expires_at: Option<i64>,
}

/// One token of an account, without its secret.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UserTokenInfo {
    pub id: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub last_used_at: Option<i64>,
}

/// An account as `outpost user ls` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UserInfo {
    pub name: String,
    pub role: String,
    /// Empty: the whole fleet.
    pub selector: String,
    pub has_password: bool,
    pub created_at: i64,
    pub tokens: Vec<UserTokenInfo>,
}

/// `DELETE /v1/users/{name}/tokens[/{id}]` answers with the tokens revoked now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RevokeResponse {
    pub user: String,
    pub revoked: Vec<String>,
}

/// One audited action.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Order of recording.
    pub seq: i64,
    /// Unix ms.
    pub at: i64,
    /// The account (`admin` for the first-start admin token, `hub` for the hub's own controllers).
    pub user: String,
    /// What was asked: `apply`, `delete`, `rollout pause`, `user add`, `login`, `exec`, ...
    pub action: String,
    /// What it was asked of: objects, a node, an account.
    pub target: String,
    /// More: for exec the command line.
    #[serde(default)]
    pub detail: String,
    /// The caller's address.
    #[serde(default)]
    pub peer: String,
    /// `ok`, or `denied: ...` / `failed: ...` with the message.
    pub result: String,
}

/// `POST /v1/session`: log in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionRequest {
    pub user: String,
    pub password: String,
}

/// The answer to a login: send `csrf_token` as `X-CSRF-Token` on every mutating request made
/// with the session cookie.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionResponse {
    pub user: String,
    pub role: String,
    pub selector: String,
    pub csrf_token: String,
    /// When the session ends at the latest (Unix ms); idle sessions end earlier.
    pub expires_at: i64,
}

/// `GET /v1/whoami`: who the hub takes the caller for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WhoAmI {
    pub user: String,
    pub role: String,
    pub selector: String,
}

/// The header carrying the CSRF token of a cookie session.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// The session cookie's name.
pub const SESSION_COOKIE: &str = "outpost_session";

/// Whether `name` is a valid account name; the reason when not.
pub fn check_user_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err("must be 1 to 64 characters".into());
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_' | b'@'))
    {
        return Err("may contain only lower-case letters, digits, '-', '.', '_' and '@'".into());
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err("must start with a letter or digit".into());
    }
    if matches!(name, "admin" | "hub") {
        return Err("is reserved (the first-start admin token and the hub itself)".into());
    }
    Ok(())
}

/// Shortest password accepted.
pub const MIN_PASSWORD: usize = 12;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_objects_with_optional_fields() {
        let t: UserTokenRequest = serde_json::from_str("{}").unwrap();
        assert_eq!(t.expires_secs, None);
        assert!(serde_json::from_str::<UserTokenRequest>("[]").is_err());
        let u: UserRequest = serde_json::from_str(r#"{"name": "a", "role": "viewer"}"#).unwrap();
        assert_eq!((u.selector, u.expires_secs, u.password), (None, None, None));
        assert!(serde_json::from_str::<UserRequest>(r#"["a", "viewer"]"#).is_err());
    }

    #[test]
    fn user_names() {
        for ok in ["alice", "ops-eu", "a.b_c@x", "0day"] {
            assert_eq!(check_user_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "Alice", "a b", "-x", "admin", "hub", &"x".repeat(65)] {
            assert!(check_user_name(bad).is_err(), "{bad}");
        }
    }
}
