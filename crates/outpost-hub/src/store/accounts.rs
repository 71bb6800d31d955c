//! Operator accounts, their tokens, the audit log and browser sessions behind one async
//! interface, [`AccountStore`], with two implementations:
//! - [`SqliteAccounts`]: the tables in `hub.db` (`crate::accounts::Accounts`, a connection of
//!   its own), each call on the blocking pool;
//! - [`PgAccounts`]: the same tables in PostgreSQL (created by the store's migrations, version
//!   4), shared by every hub replica on the database, so an account, a token or a dashboard
//!   session made through one replica works on all of them.
//!
//! Both keep the rules of `crate::accounts`: token secrets and session ids only as SHA-256,
//! revoked tokens kept (using one says "revoked"), removing an account removes its tokens and
//! sessions in one transaction, the audit log pruned to its age and row bounds at each write
//! (`outpost_core::access::audit_prune`), `last_used_at` written at most once a minute.

use std::sync::Arc;

use outpost_api::accounts::{AuditEntry, UserInfo, UserTokenInfo, UserTokenResponse};
use outpost_api::UnixMs;
use outpost_core::access::{self, Role, Scope, Validity};
use sqlx::PgPool;

use super::{Result, StoreError};
use crate::accounts::{Accounts, SessionRow, TokenRefusal, UserRow, AUDIT_MAX_ROWS};
use crate::files::random_hex;
use crate::service::sha256_hex;

/// `last_used_at` of a token is written at most this often.
const LAST_USED_EVERY_MS: i64 = 60_000;

/// Accounts, tokens, audit and sessions. See the module docs.
#[async_trait::async_trait]
pub trait AccountStore: Send + Sync + 'static {
    /// True when several hub processes share these tables (PostgreSQL): sessions are then read
    /// from the database on every check, not cached, so a logout on one replica ends the
    /// session on all.
    fn shared(&self) -> bool;
    async fn save_session(&self, id_sha256: &str, row: &SessionRow) -> Result<()>;
    async fn session(&self, id_sha256: &str) -> Result<Option<SessionRow>>;
    async fn touch_session(&self, id_sha256: &str, last_used: UnixMs) -> Result<()>;
    /// End a session. False when there was none.
    async fn delete_session(&self, id_sha256: &str) -> Result<bool>;
    async fn delete_user_sessions(&self, user: &str) -> Result<()>;
    /// Drop sessions unused since `idle_before` or created before `created_before`.
    async fn prune_sessions(&self, idle_before: UnixMs, created_before: UnixMs) -> Result<u64>;
    async fn session_count(&self) -> Result<i64>;
    async fn user(&self, name: &str) -> Result<Option<UserRow>>;
    /// Add an account with its first token. None when the name is taken.
    async fn add_user(&self, u: &UserRow, token_expires_at: Option<UnixMs>) -> Result<Option<UserTokenResponse>>;
    /// Remove an account, its tokens and sessions. False when there is none.
    async fn remove_user(&self, name: &str) -> Result<bool>;
    /// A new token for an account; None when there is no such account.
    async fn new_token(&self, user: &str, expires_at: Option<UnixMs>, now: UnixMs)
        -> Result<Option<UserTokenResponse>>;
    /// Revoke an account's tokens (one by id, or all); the ids revoked now, or None when there
    /// is no such account.
    async fn revoke(&self, user: &str, id: Option<&str>, now: UnixMs) -> Result<Option<Vec<String>>>;
    async fn users(&self) -> Result<Vec<UserInfo>>;
    /// The account an account token belongs to: Ok(None) for an unknown token, Err for a
    /// revoked or expired one.
    async fn authenticate(
        &self,
        token: &str,
        now: UnixMs,
    ) -> Result<std::result::Result<Option<UserRow>, TokenRefusal>>;
    /// Record one audited action and apply the retention bounds.
    async fn record(&self, e: &AuditEntry) -> Result<()>;
    /// Audit entries, oldest first, since `since`, of one user or all, at most `limit` (the
    /// newest ones).
    async fn audit(&self, since: UnixMs, user: Option<&str>, limit: u32) -> Result<Vec<AuditEntry>>;
}

// ---------------------------------------------------------------------------------------------
// SQLite

/// [`AccountStore`] on the hub's SQLite file.
pub struct SqliteAccounts(pub Arc<Accounts>);

impl SqliteAccounts {
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Accounts) -> std::result::Result<T, rusqlite::Error> + Send + 'static,
    ) -> Result<T> {
        let a = self.0.clone();
        tokio::task::spawn_blocking(move || f(&a))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
            .map_err(StoreError::from)
    }
}

#[async_trait::async_trait]
impl AccountStore for SqliteAccounts {
    fn shared(&self) -> bool {
        false
    }
    async fn save_session(&self, id_sha256: &str, row: &SessionRow) -> Result<()> {
        let (id, row) = (id_sha256.to_string(), row.clone());
        self.run(move |a| a.save_session(&id, &row)).await
    }
    async fn session(&self, id_sha256: &str) -> Result<Option<SessionRow>> {
        let id = id_sha256.to_string();
        self.run(move |a| a.session(&id)).await
    }
    async fn touch_session(&self, id_sha256: &str, last_used: UnixMs) -> Result<()> {
        let id = id_sha256.to_string();
        self.run(move |a| a.touch_session(&id, last_used)).await
    }
    async fn delete_session(&self, id_sha256: &str) -> Result<bool> {
        let id = id_sha256.to_string();
        self.run(move |a| a.delete_session(&id)).await
    }
    async fn delete_user_sessions(&self, user: &str) -> Result<()> {
        let u = user.to_string();
        self.run(move |a| a.delete_user_sessions(&u)).await
    }
    async fn prune_sessions(&self, idle_before: UnixMs, created_before: UnixMs) -> Result<u64> {
        self.run(move |a| a.prune_sessions(idle_before, created_before).map(|n| n as u64))
            .await
    }
    async fn session_count(&self) -> Result<i64> {
        self.run(|a| a.session_count()).await
    }
    async fn user(&self, name: &str) -> Result<Option<UserRow>> {
        let n = name.to_string();
        self.run(move |a| a.user(&n)).await
    }
    async fn add_user(&self, u: &UserRow, token_expires_at: Option<UnixMs>) -> Result<Option<UserTokenResponse>> {
        let u = u.clone();
        self.run(move |a| a.add_user(&u, token_expires_at)).await
    }
    async fn remove_user(&self, name: &str) -> Result<bool> {
        let n = name.to_string();
        self.run(move |a| a.remove_user(&n)).await
    }
    async fn new_token(
        &self,
        user: &str,
        expires_at: Option<UnixMs>,
        now: UnixMs,
    ) -> Result<Option<UserTokenResponse>> {
        let u = user.to_string();
        self.run(move |a| a.new_token(&u, expires_at, now)).await
    }
    async fn revoke(&self, user: &str, id: Option<&str>, now: UnixMs) -> Result<Option<Vec<String>>> {
        let (u, id) = (user.to_string(), id.map(str::to_string));
        self.run(move |a| a.revoke(&u, id.as_deref(), now)).await
    }
    async fn users(&self) -> Result<Vec<UserInfo>> {
        self.run(|a| a.users()).await
    }
    async fn authenticate(
        &self,
        token: &str,
        now: UnixMs,
    ) -> Result<std::result::Result<Option<UserRow>, TokenRefusal>> {
        let t = token.to_string();
        self.run(move |a| a.authenticate(&t, now)).await
    }
    async fn record(&self, e: &AuditEntry) -> Result<()> {
        let e = e.clone();
        self.run(move |a| a.record(&e)).await
    }
    async fn audit(&self, since: UnixMs, user: Option<&str>, limit: u32) -> Result<Vec<AuditEntry>> {
        let u = user.map(str::to_string);
        self.run(move |a| a.audit(since, u.as_deref(), limit)).await
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

/// [`AccountStore`] on PostgreSQL (the tables of migration 4 in `store::pg`).
pub struct PgAccounts {
    pool: PgPool,
    audit_max_age_ms: i64,
}

impl PgAccounts {
    pub fn new(pool: PgPool, audit_max_age: std::time::Duration) -> Self {
        Self {
            pool,
            audit_max_age_ms: i64::try_from(audit_max_age.as_millis()).unwrap_or(i64::MAX),
        }
    }
}

type UserTuple = (String, String, String, Option<String>, i64);

fn user_row(t: UserTuple) -> Result<UserRow> {
    Ok(UserRow {
        role: Role::parse(&t.1)
            .ok_or_else(|| StoreError::Task(format!("stored account {} has unknown role {:?}", t.0, t.1)))?,
        scope: Scope::parse(&t.2)
            .map_err(|e| StoreError::Task(format!("stored account {} has a bad scope: {e}", t.0)))?,
        name: t.0,
        password: t.3,
        created_at: t.4,
    })
}

async fn pg_insert_token(
    tx: &mut sqlx::PgConnection,
    user: &str,
    expires_at: Option<UnixMs>,
    now: UnixMs,
) -> Result<UserTokenResponse> {
    let id = random_hex(4);
    let token = format!("opu_{id}_{}", random_hex(16));
    sqlx::query(
        r#"INSERT INTO user_tokens (id, "user", secret_sha256, expires_at, created_at) VALUES ($1, $2, $3, $4, $5)"#,
    )
    .bind(&id)
    .bind(user)
    .bind(sha256_hex(&token))
    .bind(expires_at)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    Ok(UserTokenResponse {
        user: user.to_string(),
        id,
        token,
        expires_at,
    })
}

async fn pg_user_exists(tx: &mut sqlx::PgConnection, user: &str) -> Result<bool> {
    // FOR SHARE: a concurrent remove_user waits for this transaction (or we see it gone).
    Ok(sqlx::query("SELECT 1 FROM users WHERE name = $1 FOR SHARE")
        .bind(user)
        .fetch_optional(&mut *tx)
        .await?
        .is_some())
}

#[async_trait::async_trait]
impl AccountStore for PgAccounts {
    fn shared(&self) -> bool {
        true
    }
    async fn save_session(&self, id_sha256: &str, row: &SessionRow) -> Result<()> {
        sqlx::query(
            r#"INSERT INTO sessions (id_sha256, "user", csrf_sha256, created_at, last_used_at) VALUES ($1, $2, $3, $4, $5)
               ON CONFLICT (id_sha256) DO UPDATE SET "user" = excluded."user", csrf_sha256 = excluded.csrf_sha256,
               created_at = excluded.created_at, last_used_at = excluded.last_used_at"#,
        )
        .bind(id_sha256)
        .bind(&row.0)
        .bind(&row.1)
        .bind(row.2)
        .bind(row.3)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
    async fn session(&self, id_sha256: &str) -> Result<Option<SessionRow>> {
        Ok(sqlx::query_as::<_, SessionRow>(
            r#"SELECT "user", csrf_sha256, created_at, last_used_at FROM sessions WHERE id_sha256 = $1"#,
        )
        .bind(id_sha256)
        .fetch_optional(&self.pool)
        .await?)
    }
    async fn touch_session(&self, id_sha256: &str, last_used: UnixMs) -> Result<()> {
        sqlx::query("UPDATE sessions SET last_used_at = GREATEST(last_used_at, $2) WHERE id_sha256 = $1")
            .bind(id_sha256)
            .bind(last_used)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
    async fn delete_session(&self, id_sha256: &str) -> Result<bool> {
        Ok(sqlx::query("DELETE FROM sessions WHERE id_sha256 = $1")
            .bind(id_sha256)
            .execute(&self.pool)
            .await?
            .rows_affected()
            > 0)
    }
    async fn delete_user_sessions(&self, user: &str) -> Result<()> {
        sqlx::query(r#"DELETE FROM sessions WHERE "user" = $1"#)
            .bind(user)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
    async fn prune_sessions(&self, idle_before: UnixMs, created_before: UnixMs) -> Result<u64> {
        Ok(
            sqlx::query("DELETE FROM sessions WHERE last_used_at < $1 OR created_at < $2")
                .bind(idle_before)
                .bind(created_before)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }
    async fn session_count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM sessions")
            .fetch_one(&self.pool)
            .await?)
    }
    async fn user(&self, name: &str) -> Result<Option<UserRow>> {
        sqlx::query_as::<_, UserTuple>("SELECT name, role, scope, password, created_at FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .map(user_row)
            .transpose()
    }
    async fn add_user(&self, u: &UserRow, token_expires_at: Option<UnixMs>) -> Result<Option<UserTokenResponse>> {
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "INSERT INTO users (name, role, scope, password, created_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(&u.name)
        .bind(u.role.as_str())
        .bind(u.scope.to_string())
        .bind(&u.password)
        .bind(u.created_at)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Ok(None);
        }
        let t = pg_insert_token(&mut tx, &u.name, token_expires_at, u.created_at).await?;
        tx.commit().await?;
        Ok(Some(t))
    }
    async fn remove_user(&self, name: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query("DELETE FROM users WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query(r#"DELETE FROM user_tokens WHERE "user" = $1"#)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        sqlx::query(r#"DELETE FROM sessions WHERE "user" = $1"#)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(n > 0)
    }
    async fn new_token(
        &self,
        user: &str,
        expires_at: Option<UnixMs>,
        now: UnixMs,
    ) -> Result<Option<UserTokenResponse>> {
        let mut tx = self.pool.begin().await?;
        if !pg_user_exists(&mut tx, user).await? {
            return Ok(None);
        }
        let t = pg_insert_token(&mut tx, user, expires_at, now).await?;
        tx.commit().await?;
        Ok(Some(t))
    }
    async fn revoke(&self, user: &str, id: Option<&str>, now: UnixMs) -> Result<Option<Vec<String>>> {
        let mut tx = self.pool.begin().await?;
        if !pg_user_exists(&mut tx, user).await? {
            return Ok(None);
        }
        let ids: Vec<String> = sqlx::query_scalar(
            r#"UPDATE user_tokens SET revoked_at = $3
               WHERE "user" = $1 AND revoked_at IS NULL AND ($2::TEXT IS NULL OR id = $2) RETURNING id"#,
        )
        .bind(user)
        .bind(id)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut ids = ids;
        ids.sort();
        Ok(Some(ids))
    }
    async fn users(&self) -> Result<Vec<UserInfo>> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .execute(&mut *tx)
            .await?;
        let users =
            sqlx::query_as::<_, UserTuple>("SELECT name, role, scope, password, created_at FROM users ORDER BY name")
                .fetch_all(&mut *tx)
                .await?;
        type TokTuple = (String, String, i64, Option<i64>, Option<i64>, Option<i64>);
        let toks = sqlx::query_as::<_, TokTuple>(
            r#"SELECT "user", id, created_at, expires_at, revoked_at, last_used_at FROM user_tokens ORDER BY created_at, id"#,
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        users
            .into_iter()
            .map(|t| {
                let u = user_row(t)?;
                let tokens = toks
                    .iter()
                    .filter(|t| t.0 == u.name)
                    .map(|t| UserTokenInfo {
                        id: t.1.clone(),
                        created_at: t.2,
                        expires_at: t.3,
                        revoked_at: t.4,
                        last_used_at: t.5,
                    })
                    .collect();
                Ok(UserInfo {
                    role: u.role.as_str().into(),
                    selector: u.scope.to_string(),
                    has_password: u.password.is_some(),
                    created_at: u.created_at,
                    name: u.name,
                    tokens,
                })
            })
            .collect()
    }
    async fn authenticate(
        &self,
        token: &str,
        now: UnixMs,
    ) -> Result<std::result::Result<Option<UserRow>, TokenRefusal>> {
        let found = sqlx::query_as::<_, (String, String, Option<i64>, Option<i64>, Option<i64>)>(
            r#"SELECT id, "user", expires_at, revoked_at, last_used_at FROM user_tokens WHERE secret_sha256 = $1"#,
        )
        .bind(sha256_hex(token))
        .fetch_optional(&self.pool)
        .await?;
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
            sqlx::query(
                "UPDATE user_tokens SET last_used_at = $2 WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < $2)",
            )
            .bind(&id)
            .bind(now)
            .execute(&self.pool)
            .await?;
        }
        Ok(Ok(self.user(&user).await?))
    }
    async fn record(&self, e: &AuditEntry) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let newest: i64 = sqlx::query_scalar(
            r#"INSERT INTO audit (at, "user", action, target, detail, peer, result) VALUES ($1, $2, $3, $4, $5, $6, $7)
               RETURNING seq"#,
        )
        .bind(e.at)
        .bind(&e.user)
        .bind(&e.action)
        .bind(&e.target)
        .bind(&e.detail)
        .bind(&e.peer)
        .bind(&e.result)
        .fetch_one(&mut *tx)
        .await?;
        let (before, upto) = access::audit_prune(e.at, newest, self.audit_max_age_ms, AUDIT_MAX_ROWS);
        sqlx::query("DELETE FROM audit WHERE at < $1 OR seq <= $2")
            .bind(before)
            .bind(upto)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
    async fn audit(&self, since: UnixMs, user: Option<&str>, limit: u32) -> Result<Vec<AuditEntry>> {
        type Row = (i64, i64, String, String, String, String, String, String);
        let mut out: Vec<AuditEntry> = sqlx::query_as::<_, Row>(
            r#"SELECT seq, at, "user", action, target, detail, peer, result FROM audit
               WHERE at >= $1 AND ($2::TEXT IS NULL OR "user" = $2) ORDER BY seq DESC LIMIT $3"#,
        )
        .bind(since)
        .bind(user)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|r| AuditEntry {
            seq: r.0,
            at: r.1,
            user: r.2,
            action: r.3,
            target: r.4,
            detail: r.5,
            peer: r.6,
            result: r.7,
        })
        .collect();
        out.reverse();
        Ok(out)
    }
}
