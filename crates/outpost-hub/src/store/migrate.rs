//! `outpost hub migrate --from <sqlite data dir> --to postgres://...` (docs/postgres.md): copies
//! an SQLite hub into an empty PostgreSQL database at the current schema, in **one
//! transaction** (a failure leaves the target as it was; run it again), so agents keep their
//! identities and the old join tokens keep working.
//!
//! The copy is table-driven: [`TABLES`] lists the tables; their columns and types come from
//! PostgreSQL's catalog (`information_schema.columns`), matched by name with SQLite's
//! (`PRAGMA table_info`), and values are bound as BIGINT, TEXT or BYTEA. A new table is one
//! line. A table marked optional is copied when the target has it and reported as skipped
//! otherwise.
//!
//! Besides the tables: the generation sequence is set past the highest generation copied, the
//! serial columns (`audit.seq`, `data_records.cursor`, `webhook_queue.id`) past their highest value, the CA and
//! admin token go to `hub_secrets` (the key sealed under the CA secret), and image/model blobs
//! from `<data-dir>/images` into `blobs` in chunks.
//!
//! Refused: a target that already holds a hub (nodes, objects, tokens, accounts, the CA), and
//! an SQLite hub that is running (it holds `<data-dir>/hub.lock`).

use std::path::Path;

use anyhow::{bail, Context};
use rusqlite::types::Value as SqlValue;
use sqlx::PgPool;

use crate::files::DataDir;

/// (table, optional): the tables copied, parents first.
pub const TABLES: &[(&str, bool)] = &[
    ("tokens", false),
    ("nodes", false),
    ("objects", false),
    ("revisions", false),
    ("assignments", false),
    ("specs", false),
    ("node_workloads", false),
    ("node_prefetch", false),
    ("node_tombstones", false),
    ("rollouts", false),
    ("workload_status", false),
    ("events", false),
    ("image_tags", false),
    ("gitops_state", false),
    ("users", false),
    ("user_tokens", false),
    ("audit", false),
    ("sessions", false),
    ("data_records", false),
    // The monitor's tables (the controllers' leases start afresh).
    ("alerts", false),
    ("alert_seq", false),
    ("error_logs", false),
    ("node_vitals", false),
    ("node_conditions", false),
    ("webhook_queue", false),
];

/// Serial columns set past the highest copied value: (table, column).
const SERIALS: &[(&str, &str)] = &[("audit", "seq"), ("data_records", "cursor"), ("webhook_queue", "id")];

/// What was copied: (what, rows or files; None: skipped).
pub type Counts = Vec<(String, Option<u64>)>;

/// Take the data dir's hub lock, exclusively: refused while a hub runs on it. Hubs take it
/// shared ([`hold_hub_lock`]).
pub fn lock_out_hubs(dir: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let path = dir.join("hub.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|_| {
        anyhow::anyhow!(
            "a hub is running on {} (it holds {}); stop it first (e.g. `systemctl stop outpost-hub`), then migrate",
            dir.display(),
            path.display()
        )
    })
}

/// Hold the data dir's hub lock shared for as long as the returned guard lives (a running hub).
pub fn hold_hub_lock(dir: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let path = dir.join("hub.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockSharedNonblock).map_err(|_| {
        anyhow::anyhow!(
            "{} is locked by `outpost hub migrate`; wait for it to finish (then start the hub with --store postgres://...)",
            path.display()
        )
    })
}

/// Copy the SQLite hub in `from` into the empty PostgreSQL database `pool` points at (already
/// migrated to the current schema). `secret` seals the CA key.
pub async fn migrate(from: &Path, pool: &PgPool, secret: &[u8]) -> anyhow::Result<Counts> {
    let db = from.join("hub.db");
    if !db.exists() {
        bail!("{} has no hub.db; is it a hub data directory (--from)?", from.display());
    }
    let _lock = lock_out_hubs(from)?;
    let dir = DataDir::new(from.to_path_buf());
    let ca = dir
        .existing_ca(Some(secret))?
        .with_context(|| format!("{} has no ca.pem and ca.key", from.display()))?;
    let admin = dir
        .existing_admin_token()?
        .with_context(|| format!("{} has no admin.token", from.display()))?;
    let conn = rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("cannot open {}", db.display()))?;

    let mut tx = pool.begin().await?;
    for t in ["nodes", "objects", "tokens", "users", "hub_secrets", "blobs"] {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {t}")))
            .fetch_one(&mut *tx)
            .await?;
        if n > 0 {
            bail!("the target database already holds a hub ({t} has {n} rows); migrate into an empty database");
        }
    }
    let mut counts: Counts = Vec::new();
    for (table, optional) in TABLES {
        let target: Vec<(String, String)> = sqlx::query_as(
            "SELECT column_name::TEXT, data_type::TEXT FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
        )
        .bind(table)
        .fetch_all(&mut *tx)
        .await?;
        let source: Vec<String> = conn
            .prepare(&format!("PRAGMA table_info({table})"))?
            .query_map([], |r| r.get::<_, String>(1))?
            .collect::<Result<_, _>>()?;
        if target.is_empty() || source.is_empty() {
            if *optional || source.is_empty() {
                counts.push((table.to_string(), None));
                continue;
            }
            bail!("the target database has no table {table}; is it at this hub's schema?");
        }
        let cols: Vec<(String, String)> = target.into_iter().filter(|(c, _)| source.contains(c)).collect();
        let names: Vec<String> = cols.iter().map(|(c, _)| format!("\"{c}\"")).collect();
        let select = format!("SELECT {} FROM {table}", names.join(", "));
        let insert = format!(
            "INSERT INTO {table} ({}) VALUES ({})",
            names.join(", "),
            (1..=cols.len()).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
        );
        let mut stmt = conn.prepare(&select)?;
        let mut rows = stmt.query([])?;
        let mut n = 0u64;
        while let Some(row) = rows.next()? {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(insert.clone()));
            for (i, (c, ty)) in cols.iter().enumerate() {
                let v: SqlValue = row.get(i)?;
                q = match (ty.as_str(), v) {
                    ("bigint" | "integer", SqlValue::Integer(x)) => q.bind(Some(x)),
                    ("bigint" | "integer", SqlValue::Null) => q.bind(None::<i64>),
                    ("bytea", SqlValue::Blob(b)) => q.bind(Some(b)),
                    ("bytea", SqlValue::Null) => q.bind(None::<Vec<u8>>),
                    (_, SqlValue::Text(s)) => q.bind(Some(s)),
                    (_, SqlValue::Integer(x)) => q.bind(Some(x.to_string())),
                    (_, SqlValue::Real(x)) => q.bind(Some(x.to_string())),
                    (_, SqlValue::Null) => q.bind(None::<String>),
                    (_, SqlValue::Blob(b)) => q.bind(Some(
                        String::from_utf8(b).with_context(|| format!("{table}.{c}: not text"))?,
                    )),
                };
            }
            q.execute(&mut *tx).await.with_context(|| format!("copying {table}"))?;
            n += 1;
        }
        counts.push((table.to_string(), Some(n)));
    }

    // Generations continue past every one handed out.
    let stored_seq: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'gen_seq'", [], |r| r.get(0))
        .ok();
    let max_gen: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(generation), 0) FROM nodes")
        .fetch_one(&mut *tx)
        .await?;
    let next = stored_seq
        .and_then(|s| s.parse::<i64>().ok())
        .unwrap_or(0)
        .max(max_gen)
        .max(1);
    sqlx::query("SELECT setval('gen_seq', $1)")
        .bind(next)
        .execute(&mut *tx)
        .await?;
    counts.push(("gen_seq".into(), Some(next as u64)));
    for (table, col) in SERIALS {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT setval(pg_get_serial_sequence('{table}', '{col}'), COALESCE((SELECT MAX(\"{col}\") FROM {table}), 0) + 1, false)"
        )))
        .execute(&mut *tx)
        .await?;
    }

    // The CA (sealed) and the admin token's hash.
    let sealed = outpost_pki::sealed::seal(&ca.key_pem, secret).context("cannot seal the CA key")?;
    for (name, value) in [
        ("ca.pem", ca.cert_pem.clone()),
        ("ca.key", sealed),
        ("admin.token.sha256", hex::encode(crate::service::sha256(&admin))),
    ] {
        sqlx::query("INSERT INTO hub_secrets (name, value, updated_at) VALUES ($1, $2, $3)")
            .bind(name)
            .bind(value)
            .bind(outpost_api::now_ms())
            .execute(&mut *tx)
            .await?;
    }
    counts.push(("hub_secrets".into(), Some(3)));

    // Blobs, chunk by chunk.
    let mut blobs = 0u64;
    if let Ok(entries) = std::fs::read_dir(from.join("images")) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some(hex) = name.strip_prefix("sha256-") else {
                continue;
            };
            let digest = format!("sha256:{hex}");
            super::blobs::copy_file_in(&mut tx, &digest, &e.path()).await?;
            blobs += 1;
        }
    }
    counts.push(("blobs".into(), Some(blobs)));
    tx.commit().await?;
    Ok(counts)
}
