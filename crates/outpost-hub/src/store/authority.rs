//! The CA and the admin token of hubs on PostgreSQL, shared by every replica through the
//! `hub_secrets` table (docs/security.md):
//! - `ca.pem`: the CA certificate;
//! - `ca.key`: the CA key, always sealed under the CA secret (`outpost_pki::sealed`); the hub
//!   refuses to put a plain key in the database, so a replica without the secret does not start;
//! - `admin.token.sha256`: the admin token's SHA-256 (hex); the plaintext is written only to the
//!   data dir of the replica that created it (and printed once).
//!
//! The first replica creates them inside one transaction holding an advisory lock, so replicas
//! starting at once end with one CA; the others wait for that transaction and load what it
//! stored. A first replica whose data dir already holds a CA (a hub that ran on PostgreSQL
//! before the CA moved there, or one moved by `outpost hub migrate`) stores that CA and admin
//! token instead of making new ones, so joined nodes and their CA pins stay valid.
//! Each replica's server certificate stays in its own data dir, issued by the shared CA.

use anyhow::{bail, Context};
use outpost_pki::CaMaterial;
use sqlx::PgPool;

use crate::files::{random_hex, DataDir, Material, Rotated, CA_SECRET_ENV};

/// Any fixed number: the advisory lock held while the CA is created or re-sealed.
const CA_LOCK: i64 = 0x6f75_7470_6f73_7443;

const NO_SECRET: &str =
    "the hub keeps its CA key in PostgreSQL only encrypted; set OUTPOST_CA_KEY_SECRET or --ca-secret-file \
to a secret (e.g. `openssl rand -hex 32`), the same on every replica";

async fn get(tx: &mut sqlx::PgConnection, name: &str) -> anyhow::Result<Option<String>> {
    Ok(sqlx::query_scalar("SELECT value FROM hub_secrets WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?)
}

async fn put(tx: &mut sqlx::PgConnection, name: &str, value: &str) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO hub_secrets (name, value, updated_at) VALUES ($1, $2, $3)
         ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
    )
    .bind(name)
    .bind(value)
    .bind(outpost_api::now_ms())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

fn open_sealed(stored: &str, secret: &[u8]) -> anyhow::Result<String> {
    outpost_pki::sealed::open(stored, secret).map_err(|e| match e {
        outpost_pki::sealed::SealError::WrongSecret => anyhow::anyhow!(
            "the CA key in the database is encrypted and the secret given ({CA_SECRET_ENV} or --ca-secret-file) does not open it; \
             give the secret the other replicas use (after `outpost hub ca-secret rotate`, the new one)"
        ),
        other => anyhow::anyhow!("the CA key in the database: {other}; restore the hub_secrets table from a backup"),
    })
}

/// Load the shared CA and admin token, creating them on the first start; the server
/// certificate comes from (or is issued into) the replica's own data dir.
pub async fn load_or_create(
    pool: &PgPool,
    dir: &DataDir,
    advertise: &[String],
    secret: Option<&[u8]>,
) -> anyhow::Result<Material> {
    let secret = secret.context(NO_SECRET)?;
    dir.prepare()?;
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(CA_LOCK)
        .execute(&mut *tx)
        .await?;
    let stored = (
        get(&mut tx, "ca.pem").await?,
        get(&mut tx, "ca.key").await?,
        get(&mut tx, "admin.token.sha256").await?,
    );
    let local_token = dir.existing_admin_token()?;
    let (ca, admin_token, admin_sha, created) = match stored {
        (Some(cert_pem), Some(sealed), Some(sha_hex)) => {
            tx.commit().await?;
            let key_pem = open_sealed(&sealed, secret)?;
            let sha: [u8; 32] = hex::decode(sha_hex.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .context("the admin token hash in the database is not valid; restore the hub_secrets table from a backup")?;
            // The plaintext only where it was created (or copied by the operator).
            let token = local_token
                .filter(|t| crate::service::sha256(t) == sha)
                .unwrap_or_default();
            (CaMaterial { cert_pem, key_pem }, token, sha, None)
        }
        (None, None, None) => {
            let ca = match dir.existing_ca(Some(secret))? {
                Some(ca) => {
                    tracing::info!(dir = %dir.root.display(), "storing this data dir's CA in the database for every replica");
                    ca
                }
                None => {
                    tracing::info!("created hub CA in the database");
                    CaMaterial::generate("hub").context("cannot generate the hub CA")?
                }
            };
            let (token, created) = match local_token {
                Some(t) => (t, None),
                None => {
                    let t = random_hex(32);
                    dir.write_admin_token(&t)?;
                    (t.clone(), Some(t))
                }
            };
            let sha = crate::service::sha256(&token);
            let sealed = outpost_pki::sealed::seal(&ca.key_pem, secret).context("cannot seal the CA key")?;
            put(&mut tx, "ca.pem", &ca.cert_pem).await?;
            put(&mut tx, "ca.key", &sealed).await?;
            put(&mut tx, "admin.token.sha256", &hex::encode(sha)).await?;
            tx.commit().await?;
            (ca, token, sha, created)
        }
        _ => bail!(
            "the database holds only part of the hub's CA and admin token (table hub_secrets); restore it from a backup \
             (a new CA would lock out every joined node)"
        ),
    };
    ca.fingerprint()
        .context("the CA certificate in the database is not valid; restore the hub_secrets table from a backup")?;
    // The certificate (public) in the data dir too, for operators' CLIs (`--ca-file`).
    let ca_pem = dir.path("ca.pem");
    if std::fs::read_to_string(&ca_pem).ok().as_deref() != Some(ca.cert_pem.as_str()) {
        crate::files::write_atomic(&ca_pem, ca.cert_pem.as_bytes(), 0o644)?;
    }
    let (server_chain_pem, server_key_pem) = dir.server_cert(&ca, advertise)?;
    Ok(Material {
        ca,
        server_chain_pem,
        server_key_pem,
        admin_token: admin_token.clone(),
        admin_token_sha256: admin_sha,
        created_admin_token: created,
    })
}

/// Re-seal the shared CA key under `new` (`outpost hub ca-secret rotate --store postgres://`),
/// in one transaction. Replicas that run keep the key they loaded; restart each with the new
/// secret.
pub async fn rotate(pool: &PgPool, old: Option<&[u8]>, new: &[u8]) -> anyhow::Result<Rotated> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(CA_LOCK)
        .execute(&mut *tx)
        .await?;
    let sealed = get(&mut tx, "ca.key")
        .await?
        .context("the database holds no CA key yet; start a hub on it first")?;
    let old = old.with_context(|| {
        format!(
            "the CA key in the database is encrypted; set {CA_SECRET_ENV} or --ca-secret-file to the current secret"
        )
    })?;
    let plain = open_sealed(&sealed, old)?;
    let resealed = outpost_pki::sealed::seal(&plain, new).map_err(|e| anyhow::anyhow!("the new secret: {e}"))?;
    put(&mut tx, "ca.key", &resealed).await?;
    tx.commit().await?;
    Ok(Rotated::Resealed)
}
