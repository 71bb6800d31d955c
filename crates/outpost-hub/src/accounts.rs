//! Operator accounts (docs/accounts.md): the account and token tables, who a request's
//! credentials belong to ([`Caller`]), and the audit log.
//!
//! Tables (in the hub's database file, created if missing; additive, no migration needed):
//! - `users`: name, role, scope (a label selector, empty for the whole fleet), an argon2id
//!   password hash or NULL, created_at;
//! - `user_tokens`: id, user, SHA-256 of the token, expires_at, revoked_at, created_at,
//!   last_used_at (written at most once a minute per token). Revoked tokens stay, so using one
//!   says "revoked", not "unknown"; removing an account removes its tokens;
//! - `audit`: every mutating request (allowed, refused or failed), pruned to
//!   [`AUDIT_MAX_ROWS`] rows and the configured age at each write;
//! - `sessions`: browser sessions (`crate::session`): SHA-256 of the session id and of its CSRF
//!   token, user, created_at, last_used_at (written at most once a minute), so a hub restart
//!   keeps everyone logged in; logout, expiry and removing the account delete the row.
//!
//! Tokens are `opu_<id>_<secret>` with 128 random bits of secret; the hub keeps their SHA-256
//! (a fast hash is enough for random secrets), shown once when created. Passwords are hashed
//! with argon2id (the `argon2` crate's defaults, a random salt each).
//!
//! Must never: decide who may do what (that is `outpost_core::access::check`, called through
//! [`Caller::require`]) or speak HTTP (status codes are `crate::error`'s).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use outpost_api::accounts::{AuditEntry, UserInfo, UserTokenInfo, UserTokenResponse};
use outpost_api::{Labels, UnixMs};
use outpost_core::access::{self, Action, Role, Scope, Target, Validity};
use rusqlite::{params, Connection, OptionalExtension};

use crate::error::{human_duration, HubError};
use crate::files::random_hex;
use crate::service::sha256_hex;

type R<T> = Result<T, rusqlite::Error>;
/// A token row: id, user, expires_at, revoked_at, last_used_at.
type TokenLookup = (String, String, Option<i64>, Option<i64>, Option<i64>);

/// Most audit entries kept; older ones go first.
pub const AUDIT_MAX_ROWS: i64 = 100_000;
/// Default age after which audit entries go.
pub const AUDIT_MAX_AGE: Duration = Duration::from_secs(90 * 86_400);
/// `last_used_at` of a token is written at most this often.
const LAST_USED_EVERY_MS: i64 = 60_000;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY, role TEXT NOT NULL, scope TEXT NOT NULL DEFAULT '',
    password TEXT, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS user_tokens (
    id TEXT PRIMARY KEY, user TEXT NOT NULL, secret_sha256 TEXT NOT NULL UNIQUE,
    expires_at INTEGER, revoked_at INTEGER, created_at INTEGER NOT NULL, last_used_at INTEGER);
CREATE INDEX IF NOT EXISTS user_tokens_user ON user_tokens (user);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, user TEXT NOT NULL,
    action TEXT NOT NULL, target TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '',
    peer TEXT NOT NULL DEFAULT '', result TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS audit_at ON audit (at);
CREATE TABLE IF NOT EXISTS sessions (
    id_sha256 TEXT PRIMARY KEY, user TEXT NOT NULL, csrf_sha256 TEXT NOT NULL,
    created_at INTEGER NOT NULL, last_used_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions (user);
";

/// A stored browser session: user, CSRF token's SHA-256 (hex), created_at, last_used_at.
pub type SessionRow = (String, String, UnixMs, UnixMs);

/// How the caller proved who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    /// The first-start admin token (`<data-dir>/admin.token`).
    AdminToken,
    /// An account token.
    Token,
    /// A browser session cookie (mutating requests carry its CSRF token).
    Session,
    /// The hub itself (controllers: GitOps, rollouts).
    Hub,
}

/// Who is calling: the account, its role and scope, and from where. Every operator route
/// takes one (`crate::extract`) and checks it with [`Caller::require`] before acting.
#[derive(Clone, Debug)]
pub struct Caller {
    pub name: String,
    pub role: Role,
    pub scope: Scope,
    pub via: Via,
    /// The caller's address, for the audit log.
    pub remote: Option<SocketAddr>,
}

impl Caller {
    /// The first-start admin token's caller.
    pub fn admin(remote: Option<SocketAddr>) -> Self {
        Self {
            name: "admin".into(),
            role: Role::Admin,
            scope: Scope::all(),
            via: Via::AdminToken,
            remote,
        }
    }

    /// The hub's own controllers.
    pub fn hub() -> Self {
        Self {
            name: "hub".into(),
            role: Role::Admin,
            scope: Scope::all(),
            via: Via::Hub,
            remote: None,
        }
    }

    /// A request the hub authorizes by other means (a GitRepo's webhook secret), audited under
    /// `name`.
    pub fn system(name: String, remote: Option<SocketAddr>) -> Self {
        Self {
            name,
            remote,
            ..Self::hub()
        }
    }

    /// Refuse (403, naming the role or the scope) unless this caller may do `action` on
    /// `target`.
    pub fn require(&self, action: Action, target: Target<'_>) -> Result<(), HubError> {
        access::check(self.role, &self.scope, action, target)
            .map_err(|d| HubError::NotAllowed(format!("{}: {d}", self.name)))
    }

    /// [`Caller::require`] for a node with these labels (exec, logs).
    pub fn require_node(&self, action: Action, node_labels: &Labels) -> Result<(), HubError> {
        self.require(action, Target::Node(node_labels))
    }

    /// The role alone grants `action` (for reads that lists then filter by scope).
    pub fn require_role(&self, action: Action) -> Result<(), HubError> {
        if self.role.allows(action) {
            Ok(())
        } else {
            self.require(action, Target::Fleet)
        }
    }

    /// Whether a node with these labels is in this caller's scope.
    pub fn sees_node(&self, labels: &Labels) -> bool {
        self.scope.matches_node(labels)
    }

    /// Whether an object placed by this nodeSelector is in this caller's scope.
    pub fn sees_selector(&self, selector: &Labels) -> bool {
        self.scope.covers_selector(selector)
    }

    pub fn remote_text(&self) -> String {
        self.remote.map(|a| a.to_string()).unwrap_or_default()
    }
}

/// An account row.
#[derive(Clone, Debug)]
pub struct UserRow {
    pub name: String,
    pub role: Role,
    pub scope: Scope,
    pub password: Option<String>,
    pub created_at: UnixMs,
}

/// The account and audit tables on their own connection to the hub's database file.
pub struct Accounts {
    conn: Mutex<Connection>,
    audit_max_age_ms: i64,
}

fn role_of(s: &str) -> R<Role> {
    Role::parse(s)
        .ok_or_else(|| rusqlite::Error::InvalidColumnType(1, format!("role {s:?}"), rusqlite::types::Type::Text))
}

fn scope_of(s: &str) -> R<Scope> {
    Scope::parse(s)
        .map_err(|e| rusqlite::Error::InvalidColumnType(2, format!("scope: {e}"), rusqlite::types::Type::Text))
}

fn user_row(r: &rusqlite::Row<'_>) -> R<UserRow> {
    Ok(UserRow {
        name: r.get(0)?,
        role: role_of(&r.get::<_, String>(1)?)?,
        scope: scope_of(&r.get::<_, String>(2)?)?,
        password: r.get(3)?,
        created_at: r.get(4)?,
    })
}

/// Why a presented token does not work; the text is the operator-facing message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("the token {id} of user {user} was revoked {} ago; ask an admin for a new one (`outpost user token {user}`)", human_duration(*.ago_ms))]
    Revoked { id: String, user: String, ago_ms: i64 },
    #[error("the token {id} of user {user} expired {} ago; ask an admin for a new one (`outpost user token {user}`)", human_duration(*.ago_ms))]
    Expired { id: String, user: String, ago_ms: i64 },
}

/// Hash a password with argon2id and a random salt (PHC string).
pub fn hash_password(password: &str) -> Result<String, HubError> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| HubError::Internal(format!("password salt: {e}")))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| HubError::Internal(format!("hashing the password: {e}")))
}

/// Whether `password` matches the stored PHC string.
pub fn verify_password(password: &str, stored: &str) -> bool {
    PasswordHash::new(stored).is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
}

/// A fixed hash verified when the account does not exist, so a login takes as long either way.
fn dummy_hash() -> &'static str {
    static H: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    H.get_or_init(|| hash_password("outpost-no-such-account").unwrap_or_default())
}

/// Check a login's password against the account's (or a dummy, so timing does not tell which
/// accounts exist).
pub fn check_login(user: Option<&UserRow>, password: &str) -> bool {
    match user.and_then(|u| u.password.as_deref()) {
        Some(h) => verify_password(password, h),
        None => {
            let _ = verify_password(password, dummy_hash());
            false
        }
    }
}

impl Accounts {
    /// Open the account and audit tables in the hub's database file.
    pub fn open(path: &Path, audit_max_age: Duration) -> R<Self> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.set_transaction_behavior(rusqlite::TransactionBehavior::Immediate);
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn: Mutex::new(conn),
            audit_max_age_ms: i64::try_from(audit_max_age.as_millis()).unwrap_or(i64::MAX),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keep a new browser session (by the hashes of its id and CSRF token).
    pub fn save_session(&self, id_sha256: &str, row: &SessionRow) -> R<()> {
        self.lock().execute(
            "INSERT OR REPLACE INTO sessions (id_sha256, user, csrf_sha256, created_at, last_used_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id_sha256, row.0, row.1, row.2, row.3],
        )?;
        Ok(())
    }

    pub fn session(&self, id_sha256: &str) -> R<Option<SessionRow>> {
        self.lock()
            .query_row(
                "SELECT user, csrf_sha256, created_at, last_used_at FROM sessions WHERE id_sha256 = ?1",
                params![id_sha256],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
    }

    pub fn touch_session(&self, id_sha256: &str, last_used: UnixMs) -> R<()> {
        self.lock().execute(
            "UPDATE sessions SET last_used_at = ?2 WHERE id_sha256 = ?1",
            params![id_sha256, last_used],
        )?;
        Ok(())
    }

    /// End a session. False when there was none.
    pub fn delete_session(&self, id_sha256: &str) -> R<bool> {
        Ok(self
            .lock()
            .execute("DELETE FROM sessions WHERE id_sha256 = ?1", params![id_sha256])?
            > 0)
    }

    pub fn delete_user_sessions(&self, user: &str) -> R<()> {
        self.lock()
            .execute("DELETE FROM sessions WHERE user = ?1", params![user])?;
        Ok(())
    }

    /// Drop sessions unused since `idle_before` or created before `created_before`.
    pub fn prune_sessions(&self, idle_before: UnixMs, created_before: UnixMs) -> R<usize> {
        self.lock().execute(
            "DELETE FROM sessions WHERE last_used_at < ?1 OR created_at < ?2",
            params![idle_before, created_before],
        )
    }

    /// How many sessions are stored (tests).
    pub fn session_count(&self) -> R<i64> {
        self.lock().query_row("SELECT COUNT(*) FROM sessions", [], |r| r.get(0))
    }

    pub fn user(&self, name: &str) -> R<Option<UserRow>> {
        self.lock()
            .query_row(
                "SELECT name, role, scope, password, created_at FROM users WHERE name = ?1",
                params![name],
                user_row,
            )
            .optional()
    }

    /// Add an account with its first token. False when the name is taken.
    pub fn add_user(&self, u: &UserRow, token_expires_at: Option<UnixMs>) -> R<Option<UserTokenResponse>> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let n = tx.execute(
            "INSERT OR IGNORE INTO users (name, role, scope, password, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![u.name, u.role.as_str(), u.scope.to_string(), u.password, u.created_at],
        )?;
        if n == 0 {
            return Ok(None);
        }
        let t = insert_token(&tx, &u.name, token_expires_at, u.created_at)?;
        tx.commit()?;
        Ok(Some(t))
    }

    /// Remove an account and its tokens. False when there is none.
    pub fn remove_user(&self, name: &str) -> R<bool> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        tx.execute("DELETE FROM user_tokens WHERE user = ?1", params![name])?;
        tx.execute("DELETE FROM sessions WHERE user = ?1", params![name])?;
        let n = tx.execute("DELETE FROM users WHERE name = ?1", params![name])?;
        tx.commit()?;
        Ok(n > 0)
    }

    /// A new token for an account; None when there is no such account.
    pub fn new_token(&self, user: &str, expires_at: Option<UnixMs>, now: UnixMs) -> R<Option<UserTokenResponse>> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let exists = tx
            .prepare("SELECT 1 FROM users WHERE name = ?1")?
            .exists(params![user])?;
        if !exists {
            return Ok(None);
        }
        let t = insert_token(&tx, user, expires_at, now)?;
        tx.commit()?;
        Ok(Some(t))
    }

    /// Revoke an account's tokens (one by id, or all); returns the ids revoked now, or None
    /// when there is no such account.
    pub fn revoke(&self, user: &str, id: Option<&str>, now: UnixMs) -> R<Option<Vec<String>>> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let exists = tx
            .prepare("SELECT 1 FROM users WHERE name = ?1")?
            .exists(params![user])?;
        if !exists {
            return Ok(None);
        }
        let ids: Vec<String> = tx
            .prepare("SELECT id FROM user_tokens WHERE user = ?1 AND revoked_at IS NULL AND (?2 IS NULL OR id = ?2) ORDER BY id")?
            .query_map(params![user, id], |r| r.get(0))?
            .collect::<R<_>>()?;
        tx.execute(
            "UPDATE user_tokens SET revoked_at = ?3 WHERE user = ?1 AND revoked_at IS NULL AND (?2 IS NULL OR id = ?2)",
            params![user, id, now],
        )?;
        tx.commit()?;
        Ok(Some(ids))
    }

    pub fn users(&self) -> R<Vec<UserInfo>> {
        let c = self.lock();
        let users: Vec<UserRow> = c
            .prepare("SELECT name, role, scope, password, created_at FROM users ORDER BY name")?
            .query_map([], user_row)?
            .collect::<R<_>>()?;
        let mut stmt = c.prepare(
            "SELECT id, created_at, expires_at, revoked_at, last_used_at FROM user_tokens WHERE user = ?1 ORDER BY created_at, id",
        )?;
        users
            .into_iter()
            .map(|u| {
                let tokens = stmt
                    .query_map(params![u.name], |r| {
                        Ok(UserTokenInfo {
                            id: r.get(0)?,
                            created_at: r.get(1)?,
                            expires_at: r.get(2)?,
                            revoked_at: r.get(3)?,
                            last_used_at: r.get(4)?,
                        })
                    })?
                    .collect::<R<_>>()?;
                Ok(UserInfo {
                    name: u.name,
                    role: u.role.as_str().into(),
                    selector: u.scope.to_string(),
                    has_password: u.password.is_some(),
                    created_at: u.created_at,
                    tokens,
                })
            })
            .collect()
    }

    /// The account an account token belongs to: Ok(None) for an unknown token, Err for a
    /// revoked or expired one.
    pub fn authenticate(&self, token: &str, now: UnixMs) -> R<Result<Option<UserRow>, TokenRefusal>> {
        let c = self.lock();
        let found: Option<TokenLookup> = c
            .query_row(
                "SELECT id, user, expires_at, revoked_at, last_used_at FROM user_tokens WHERE secret_sha256 = ?1",
                params![sha256_hex(token)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()?;
        let Some((id, user, expires_at, revoked_at, last_used)) = found else {
            return Ok(Ok(None));
        };
        match access::token_validity(expires_at, revoked_at, now) {
            Validity::Revoked(at) => {
                return Ok(Err(TokenRefusal::Revoked {
                    id,
                    user,
                    ago_ms: now - at,
                }))
            }
            Validity::Expired(ago_ms) => return Ok(Err(TokenRefusal::Expired { id, user, ago_ms })),
            Validity::Valid | Validity::Idle(_) => {}
        }
        if last_used.is_none_or(|t| now - t >= LAST_USED_EVERY_MS) {
            c.execute(
                "UPDATE user_tokens SET last_used_at = ?2 WHERE id = ?1",
                params![id, now],
            )?;
        }
        drop(c);
        Ok(Ok(self.user(&user)?))
    }

    /// Record one audited action and apply the retention bounds.
    pub fn record(&self, e: &AuditEntry) -> R<()> {
        let c = self.lock();
        c.execute(
            "INSERT INTO audit (at, user, action, target, detail, peer, result) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![e.at, e.user, e.action, e.target, e.detail, e.peer, e.result],
        )?;
        let newest = c.last_insert_rowid();
        let (before, upto) = access::audit_prune(e.at, newest, self.audit_max_age_ms, AUDIT_MAX_ROWS);
        c.execute("DELETE FROM audit WHERE at < ?1 OR seq <= ?2", params![before, upto])?;
        Ok(())
    }

    /// Audit entries, oldest first, since `since` (Unix ms), of one user or all, at most `limit`
    /// (the newest ones).
    pub fn audit(&self, since: UnixMs, user: Option<&str>, limit: u32) -> R<Vec<AuditEntry>> {
        let c = self.lock();
        let mut out: Vec<AuditEntry> = c
            .prepare(
                "SELECT seq, at, user, action, target, detail, peer, result FROM audit
                 WHERE at >= ?1 AND (?2 IS NULL OR user = ?2) ORDER BY seq DESC LIMIT ?3",
            )?
            .query_map(params![since, user, limit], |r| {
                Ok(AuditEntry {
                    seq: r.get(0)?,
                    at: r.get(1)?,
                    user: r.get(2)?,
                    action: r.get(3)?,
                    target: r.get(4)?,
                    detail: r.get(5)?,
                    peer: r.get(6)?,
                    result: r.get(7)?,
                })
            })?
            .collect::<R<_>>()?;
        out.reverse();
        Ok(out)
    }
}

fn insert_token(tx: &Connection, user: &str, expires_at: Option<UnixMs>, now: UnixMs) -> R<UserTokenResponse> {
    let id = random_hex(4);
    let token = format!("opu_{id}_{}", random_hex(16));
    tx.execute(
        "INSERT INTO user_tokens (id, user, secret_sha256, expires_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![id, user, sha256_hex(&token), expires_at, now],
    )?;
    Ok(UserTokenResponse {
        user: user.to_string(),
        id,
        token,
        expires_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, Accounts) {
        let d = tempfile::tempdir().unwrap();
        let a = Accounts::open(&d.path().join("hub.db"), AUDIT_MAX_AGE).unwrap();
        (d, a)
    }

    fn user(name: &str) -> UserRow {
        UserRow {
            name: name.into(),
            role: Role::Operator,
            scope: Scope::parse("site=a").unwrap(),
            password: None,
            created_at: 1000,
        }
    }

    #[test]
    fn tokens_authenticate_expire_and_revoke() {
        let (_d, a) = open();
        let t = a.add_user(&user("ops"), Some(10_000)).unwrap().expect("new user");
        assert!(a.add_user(&user("ops"), None).unwrap().is_none(), "name taken");
        let u = a.authenticate(&t.token, 5000).unwrap().unwrap().expect("known");
        assert_eq!(
            (u.name.as_str(), u.role, u.scope.to_string()),
            ("ops", Role::Operator, "site=a".into())
        );
        assert!(a.authenticate("opu_00000000_nope", 5000).unwrap().unwrap().is_none());
        assert!(matches!(
            a.authenticate(&t.token, 12_000).unwrap(),
            Err(TokenRefusal::Expired { ago_ms: 2000, .. })
        ));
        let t2 = a.new_token("ops", None, 6000).unwrap().expect("user exists");
        assert_eq!(a.revoke("ops", Some(&t2.id), 7000).unwrap(), Some(vec![t2.id.clone()]));
        assert!(matches!(
            a.authenticate(&t2.token, 8000).unwrap(),
            Err(TokenRefusal::Revoked { ago_ms: 1000, .. })
        ));
        assert_eq!(a.revoke("nobody", None, 7000).unwrap(), None);
        assert!(a.remove_user("ops").unwrap());
        assert!(
            a.authenticate(&t.token, 5000).unwrap().unwrap().is_none(),
            "tokens go with the account"
        );
    }

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("wrong", &h));
        let mut u = user("p");
        u.password = Some(h);
        assert!(check_login(Some(&u), "correct horse battery"));
        assert!(!check_login(None, "correct horse battery"));
    }

    #[test]
    fn audit_keeps_order_and_filters() {
        let (_d, a) = open();
        for (i, who) in ["alice", "bob", "alice"].iter().enumerate() {
            a.record(&AuditEntry {
                seq: 0,
                at: 1000 + i as i64,
                user: who.to_string(),
                action: "apply".into(),
                target: format!("deployment/default/w{i}"),
                detail: String::new(),
                peer: "127.0.0.1:1".into(),
                result: "ok".into(),
            })
            .unwrap();
        }
        let all = a.audit(0, None, 10).unwrap();
        assert_eq!(all.len(), 3);
        assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
        let alice = a.audit(0, Some("alice"), 10).unwrap();
        assert_eq!(
            alice.iter().map(|e| e.target.as_str()).collect::<Vec<_>>(),
            ["deployment/default/w0", "deployment/default/w2"]
        );
        assert_eq!(a.audit(1001, None, 10).unwrap().len(), 2);
        assert_eq!(
            a.audit(0, None, 1).unwrap()[0].target,
            "deployment/default/w2",
            "the newest within the limit"
        );
    }

    #[test]
    fn audit_entries_past_the_retention_go() {
        let d = tempfile::tempdir().unwrap();
        let a = Accounts::open(&d.path().join("hub.db"), Duration::from_secs(60)).unwrap();
        let entry = |at: i64| AuditEntry {
            seq: 0,
            at,
            user: "alice".into(),
            action: "apply".into(),
            target: format!("t{at}"),
            detail: String::new(),
            peer: String::new(),
            result: "ok".into(),
        };
        a.record(&entry(1_000)).unwrap();
        a.record(&entry(30_000)).unwrap();
        a.record(&entry(61_001)).unwrap();
        let kept: Vec<String> = a.audit(0, None, 10).unwrap().into_iter().map(|e| e.target).collect();
        assert_eq!(kept, ["t30000", "t61001"]);
    }
}
