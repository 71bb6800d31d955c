//! Browser sessions (docs/accounts.md), the backend the dashboard logs in with:
//! - `POST /v1/session` with a user and password sets the cookie
//!   `outpost_session=<random>; HttpOnly; Secure; SameSite=Strict; Path=/` and answers with a
//!   CSRF token;
//! - a request with the cookie (and no bearer token) acts as the account; a mutating one
//!   (anything but GET and HEAD) must carry the CSRF token in `X-CSRF-Token`;
//! - a session ends after an idle time and an absolute lifetime
//!   (`outpost_core::access::session_validity`), at logout (`DELETE /v1/session`), and when
//!   its account is removed. Sessions are kept in the accounts store (`sessions` table,
//!   `crate::store::accounts`) and cached in memory: a hub restart keeps everyone logged in.
//!   When the store is shared by several replicas (PostgreSQL), every check reads the row, so
//!   a session made on one replica works on all and a logout on one ends it on all.
//!
//! The hub keeps the SHA-256 of each session id and of its CSRF token, never the values. A
//! session's last use is written to the database at most once a minute ([`TOUCH_EVERY_MS`]), so
//! after a restart a session may count up to a minute more idle than it was. A database error
//! logs and falls back to memory (the session then ends with the hub).
//! [`CSP`] is the Content-Security-Policy for the hub's HTML pages ([`html_headers`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};
use outpost_api::accounts::SESSION_COOKIE;
use outpost_api::UnixMs;
use outpost_core::access::{self, Validity};

use crate::error::human_duration;
use crate::files::random_hex;
use crate::service::sha256;
use crate::store::AccountStore;

/// A session's last use is written to the database at most this often.
pub const TOUCH_EVERY_MS: i64 = 60_000;

/// Content-Security-Policy of every HTML page the hub serves: its own scripts, styles and
/// images only, no inline script, no framing, forms post only to the hub.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'";

/// Headers every HTML response gets: the CSP, no sniffing, no framing, no referrer.
pub fn html_headers(h: &mut HeaderMap) {
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
}

/// How long sessions last.
#[derive(Clone, Copy, Debug)]
pub struct SessionLimits {
    /// A session unused this long ends (default 30 min).
    pub idle: Duration,
    /// A session ends this long after login whatever its use (default 12 h).
    pub max: Duration,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(30 * 60),
            max: Duration::from_secs(12 * 3600),
        }
    }
}

struct Session {
    user: String,
    csrf_sha256: [u8; 32],
    created_at: UnixMs,
    last_used: UnixMs,
    /// The last use the database has.
    stored_last_used: UnixMs,
}

/// A new session's secrets, shown to the browser once.
pub struct NewSession {
    pub id: String,
    pub csrf: String,
    pub expires_at: UnixMs,
}

/// Why a cookie does not work; the text is the operator-facing message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SessionRefusal {
    #[error("the session is unknown (you logged out, or it ended); log in again")]
    Unknown,
    #[error("the session ended {} ago (it lasts at most {}); log in again", human_duration(*.0), human_duration(*.1))]
    Expired(i64, i64),
    #[error("the session ended {} ago after {} without use; log in again", human_duration(*.0), human_duration(*.1))]
    Idle(i64, i64),
}

/// Every live session, by the SHA-256 of its id.
pub struct Sessions {
    limits: SessionLimits,
    map: Mutex<HashMap<[u8; 32], Session>>,
    /// Where sessions persist (None: memory only).
    db: Option<Arc<dyn AccountStore>>,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Sessions {
    /// Sessions in memory only.
    pub fn new(limits: SessionLimits) -> Self {
        Self {
            limits,
            map: Mutex::new(HashMap::new()),
            db: None,
        }
    }

    /// Sessions kept in the accounts database too (they survive a hub restart).
    pub fn with_db(limits: SessionLimits, db: Arc<dyn AccountStore>) -> Self {
        Self {
            db: Some(db),
            ..Self::new(limits)
        }
    }

    /// Log a database error (memory still answers).
    fn logged<T>(what: &str, r: crate::store::Result<T>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::error!(error = %e, op = what, "browser session database");
                None
            }
        }
    }

    /// Whether every check must read the database (several replicas share it).
    fn shared(&self) -> bool {
        self.db.as_ref().is_some_and(|d| d.shared())
    }

    /// A session the database has and memory does not (the hub restarted, or another replica
    /// made it).
    async fn load(&self, key: &[u8; 32]) -> Option<Session> {
        let db = self.db.as_ref()?;
        let (user, csrf_hex, created_at, last_used) =
            Self::logged("reading a session", db.session(&hex::encode(key)).await)??;
        let csrf_sha256: [u8; 32] = hex::decode(csrf_hex).ok()?.try_into().ok()?;
        Some(Session {
            user,
            csrf_sha256,
            created_at,
            last_used,
            stored_last_used: last_used,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start a session for `user`; drops the expired ones on the way.
    pub async fn create(&self, user: &str, now: UnixMs) -> NewSession {
        let id = random_hex(32);
        let csrf = random_hex(32);
        let (idle, max) = (ms(self.limits.idle), ms(self.limits.max));
        let (key, csrf_sha256) = (sha256(&id), sha256(&csrf));
        if let Some(db) = &self.db {
            Self::logged(
                "pruning sessions",
                db.prune_sessions(now.saturating_sub(idle), now.saturating_sub(max))
                    .await,
            );
            Self::logged(
                "storing a session",
                db.save_session(
                    &hex::encode(key),
                    &(user.to_string(), hex::encode(csrf_sha256), now, now),
                )
                .await,
            );
        }
        let mut m = self.lock();
        m.retain(|_, s| access::session_validity(s.created_at, s.last_used, now, idle, max) == Validity::Valid);
        m.insert(
            key,
            Session {
                user: user.to_string(),
                csrf_sha256,
                created_at: now,
                last_used: now,
                stored_last_used: now,
            },
        );
        NewSession {
            id,
            csrf,
            expires_at: now.saturating_add(max),
        }
    }

    /// The account of a live session, touching it; with `csrf` (mutating requests) the CSRF
    /// token must match too: Ok(Err(())) when it does not.
    pub async fn check(&self, id: &str, now: UnixMs) -> Result<(String, [u8; 32]), SessionRefusal> {
        let key = sha256(id);
        if self.shared() {
            // Another replica may have ended it, or used it since: the row decides.
            match self.load(&key).await {
                Some(s) => {
                    self.lock().insert(key, s);
                }
                None => {
                    self.lock().remove(&key);
                    return Err(SessionRefusal::Unknown);
                }
            }
        }
        let known = self.lock().contains_key(&key);
        if !known {
            let s = self.load(&key).await.ok_or(SessionRefusal::Unknown)?;
            self.lock().entry(key).or_insert(s);
        }
        let (idle, max) = (ms(self.limits.idle), ms(self.limits.max));
        // Decide under the lock, write to the database after it.
        let outcome = {
            let mut m = self.lock();
            let s = m.get_mut(&key).ok_or(SessionRefusal::Unknown)?;
            match access::session_validity(s.created_at, s.last_used, now, idle, max) {
                Validity::Valid => {
                    s.last_used = now;
                    let touch = now.saturating_sub(s.stored_last_used) >= TOUCH_EVERY_MS;
                    if touch {
                        s.stored_last_used = now;
                    }
                    Ok((s.user.clone(), s.csrf_sha256, touch))
                }
                v => {
                    m.remove(&key);
                    Err(v)
                }
            }
        };
        match outcome {
            Ok((user, csrf, touch)) => {
                if let (true, Some(db)) = (touch, &self.db) {
                    Self::logged("touching a session", db.touch_session(&hex::encode(key), now).await);
                }
                Ok((user, csrf))
            }
            Err(v) => {
                if let Some(db) = &self.db {
                    Self::logged("ending a session", db.delete_session(&hex::encode(key)).await);
                }
                Err(match v {
                    Validity::Idle(ago) => SessionRefusal::Idle(ago, idle),
                    Validity::Expired(ago) => SessionRefusal::Expired(ago, max),
                    _ => SessionRefusal::Unknown,
                })
            }
        }
    }

    /// End a session (logout). False when there was none.
    pub async fn remove(&self, id: &str) -> bool {
        let key = sha256(id);
        let stored = match &self.db {
            Some(db) => Self::logged("ending a session", db.delete_session(&hex::encode(key)).await).unwrap_or(false),
            None => false,
        };
        self.lock().remove(&key).is_some() || stored
    }

    /// End every session of an account (removed).
    pub async fn remove_user(&self, user: &str) {
        if let Some(db) = &self.db {
            Self::logged("ending an account's sessions", db.delete_user_sessions(user).await);
        }
        self.lock().retain(|_, s| s.user != user);
    }
}

/// The session id in a request's cookies.
pub fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v.trim().to_string())
}

/// `Set-Cookie` for a new session.
pub fn set_cookie(id: &str, max: Duration) -> String {
    format!(
        "{SESSION_COOKIE}={id}; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age={}",
        max.as_secs()
    )
}

/// `Set-Cookie` that removes the session cookie.
pub fn clear_cookie() -> String {
    format!("{SESSION_COOKIE}=; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age=0")
}

impl Sessions {
    pub fn limits(&self) -> SessionLimits {
        self.limits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sessions_expire_idle_and_absolute() {
        let s = Sessions::new(SessionLimits {
            idle: Duration::from_secs(60),
            max: Duration::from_secs(300),
        });
        let a = s.create("alice", 0).await;
        assert_eq!(s.check(&a.id, 30_000).await.unwrap().0, "alice");
        // used at 30 s: alive at 80 s, idle-expired at 91 s
        assert!(s.check(&a.id, 80_000).await.is_ok());
        assert!(matches!(
            s.check(&a.id, 141_000).await,
            Err(SessionRefusal::Idle(1000, 60_000))
        ));
        assert_eq!(
            s.check(&a.id, 141_001).await,
            Err(SessionRefusal::Unknown),
            "an ended session is gone"
        );
        let b = s.create("bob", 0).await;
        for t in (50_000..300_000).step_by(50_000) {
            assert!(s.check(&b.id, t).await.is_ok(), "used every 50 s: alive at {t}");
        }
        assert!(matches!(
            s.check(&b.id, 300_000).await,
            Err(SessionRefusal::Expired(0, 300_000))
        ));
        let c = s.create("carol", 0).await;
        assert!(s.remove(&c.id).await);
        assert_eq!(s.check(&c.id, 1).await, Err(SessionRefusal::Unknown));
        let d = s.create("dave", 0).await;
        s.remove_user("dave").await;
        assert_eq!(s.check(&d.id, 1).await, Err(SessionRefusal::Unknown));
    }

    #[tokio::test]
    async fn sessions_survive_a_restart_in_the_accounts_database() {
        let d = tempfile::tempdir().unwrap();
        let db: Arc<dyn AccountStore> = Arc::new(crate::store::accounts::SqliteAccounts(Arc::new(
            crate::accounts::Accounts::open(&d.path().join("hub.db"), crate::accounts::AUDIT_MAX_AGE).unwrap(),
        )));
        let limits = SessionLimits {
            idle: Duration::from_secs(600),
            max: Duration::from_secs(3600),
        };
        let before = Sessions::with_db(limits, db.clone());
        let a = before.create("alice", 0).await;
        let b = before.create("bob", 0).await;
        assert_eq!(db.session_count().await.unwrap(), 2);
        // used at 2 min: written (at most once a minute)
        assert!(before.check(&a.id, 120_000).await.is_ok());
        drop(before);
        // a new hub process: the same database, nothing in memory
        let after = Sessions::with_db(limits, db.clone());
        let (user, csrf) = after
            .check(&a.id, 700_000)
            .await
            .expect("alice's session after the restart");
        assert_eq!((user.as_str(), csrf), ("alice", sha256(&a.csrf)));
        assert!(
            matches!(after.check(&b.id, 700_000).await, Err(SessionRefusal::Idle(..))),
            "bob's session went idle across the restart"
        );
        assert_eq!(db.session_count().await.unwrap(), 1, "the idle one is deleted");
        assert_eq!(
            after.check("not-a-session", 700_000).await,
            Err(SessionRefusal::Unknown)
        );
        assert!(after.remove(&a.id).await, "logout");
        assert_eq!(db.session_count().await.unwrap(), 0, "logout deletes the row");
        let again = Sessions::with_db(limits, db.clone());
        assert_eq!(again.check(&a.id, 700_001).await, Err(SessionRefusal::Unknown));
        let c = again.create("carol", 700_000).await;
        again.remove_user("carol").await;
        assert_eq!(db.session_count().await.unwrap(), 0);
        assert_eq!(
            Sessions::with_db(limits, db).check(&c.id, 700_001).await,
            Err(SessionRefusal::Unknown)
        );
    }

    #[test]
    fn cookie_is_found_among_others_and_set_with_its_flags() {
        let mut h = HeaderMap::new();
        h.insert("cookie", HeaderValue::from_static("a=1; outpost_session=abc ; b=2"));
        assert_eq!(cookie(&h).as_deref(), Some("abc"));
        let c = set_cookie("abc", Duration::from_secs(60));
        for flag in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
            assert!(c.contains(flag), "{c}");
        }
    }

    #[test]
    fn html_pages_get_a_strict_csp() {
        let mut h = HeaderMap::new();
        html_headers(&mut h);
        let csp = h["content-security-policy"].to_str().unwrap();
        for part in [
            "default-src 'self'",
            "script-src 'self'",
            "frame-ancestors 'none'",
            "object-src 'none'",
        ] {
            assert!(csp.contains(part), "{csp}");
        }
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{csp}");
        assert_eq!(h["x-frame-options"], "DENY");
    }
}
