//! The agent's durable state: `<data-dir>/state.db` (SQLite, WAL, `synchronous=FULL`) and its
//! exported copy `<data-dir>/state.export.json`.
//!
//! Tables:
//! - `meta(key, value)`: `generation` (the desired-state generation held), `schema`,
//!   `events_confirmed` / `errors_confirmed` (see "sequence numbers" below).
//! - `workloads(key, spec)`: the desired state, one row per workload, JSON `WorkloadSpec`.
//! - `units(unit, hash, restarts)`: restart counts, so they survive an agent restart.
//! - `events(seq AUTOINCREMENT, at, workload, reason, message)`: the outbox of node events not
//!   yet acknowledged by the hub.
//! - `rollouts(key, state)`: per workload, the update gate's state (`outpost_core::rollout::
//!   NodeRollout`: last-known-good spec, specs marked bad, the gate in progress), written before
//!   the agent acts on a gate decision.
//!
//! Crash invariants (what survives `kill -9` or a power cut at any instant):
//! - [`Store::save_desired`] replaces the whole desired state and its generation in one
//!   transaction: after a crash the store holds either the old state and generation or the new
//!   ones, never a mix. The agent saves before acting and before asking for a newer generation,
//!   so the hub's generation never runs ahead of what is on disk.
//! - An event is committed before the action that reported it is considered done; `seq` is
//!   AUTOINCREMENT, so a sequence number is never reused, even after the acknowledged rows are
//!   deleted. Deleting acknowledged events can be lost in a crash; the hub ignores the resent
//!   duplicates by `(node, seq)`.
//! - Which processes run is *not* stored: it is read back from `/proc` at start (see `runtime`),
//!   so there is no window in which a process runs that the agent cannot find.
//!
//! The export (`state.export.json`, mode 0600: it holds Secrets like the database does):
//! after every commit that changes the desired state, the gate state, the alert policy or the
//! alert evaluator's state, the same content is written as JSON with write-temp, fsync, rename,
//! fsync-dir, under the store's lock (so exports land in commit order), with a SHA-256 of the
//! payload. A crash leaves the previous export or the new one, never a torn file. The database
//! is the source of truth; the export is read only when the database is new (deleted by hand,
//! first start) or was quarantined, and only if its checksum matches.
//!
//! Corruption ([`Store::open_or_recover`]): at start the database must open, pass
//! `PRAGMA quick_check`, and decode. If it does not (a torn or overwritten page, a file that is
//! not SQLite any more), the file and its `-wal`/`-shm` companions are *quarantined*: renamed
//! to `state.db.corrupt-<UTC time>[-wal|-shm]` (the newest [`QUARANTINE_KEEP`] sets are kept),
//! a new database is created, the export is imported if valid, and the agent says so (an error
//! log line and a `StoreQuarantined` node event). Never-delivered events of the corrupt file
//! stay in the quarantined copy. Errors that are not corruption (permissions, I/O) stop the
//! start with a message; they never cost the operator a file. Corruption met while running
//! makes store calls fail: each failure is reported (below) and the next start quarantines.
//!
//! A new database starts with an unknown event sequence: the hub may hold higher sequence
//! numbers from the old file, and would ignore new events that reuse them. Until the hub has
//! answered once ([`Store::ack_events`], [`Store::ack_error_lines`]), queued events and error
//! lines are held back ([`Store::events_to_send`]); the first answer carries the hub's highest
//! stored sequence, and the queued rows are renumbered above it (one transaction) before they
//! are sent. Renumbering never reorders them.
//!
//! Write failures (disk full, I/O errors, corruption met while running) are never silent:
//! every call records its outcome per operation, [`Store::conditions`] turns the failing ones
//! into node conditions that every status report carries (they live in memory, so they reach
//! the hub when nothing can be written locally), and events that cannot be committed are held
//! in memory (bounded) and committed, in order, before the next event.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use outpost_api::{NodeCondition, NodeEvent, UnixMs, WorkloadSpec};
use outpost_core::rollout::NodeRollout;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tracing::{error, info, warn};

/// The exported copy of the state, next to `state.db`.
pub const EXPORT_FILE: &str = "state.export.json";
/// Quarantined database files kept (older ones are deleted).
pub const QUARANTINE_KEEP: usize = 3;
/// Events held in memory while they cannot be committed.
pub const UNSAVED_EVENTS_MAX: usize = 10_000;
/// Node condition kinds (`NodeCondition::kind`).
pub const DISK_FULL: &str = "DiskFull";
pub const STORE_FAILING: &str = "StoreFailing";
/// Event reasons of a recovery at start.
pub const EVENT_QUARANTINED: &str = "StoreQuarantined";
pub const EVENT_RESTORED: &str = "StoreRestored";
/// `meta` keys copied into the export.
const EXPORTED_META: &[&str] = &["generation", "alert_policy", "alert_state"];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("agent state database {path}: {source}")]
    Sqlite { path: String, source: rusqlite::Error },
    #[error("agent state database holds an unreadable workload {key}: {source}")]
    Decode { key: String, source: serde_json::Error },
    #[error("agent state database {path} is corrupt: {detail}")]
    Corrupt { path: String, detail: String },
    #[error(
        "the agent state database {path} is corrupt and cannot be moved aside: {source}; \
         move it (and its -wal and -shm files) away by hand, then start the agent again"
    )]
    Quarantine { path: String, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Export { path: String, source: std::io::Error },
}

impl StoreError {
    /// The file itself is damaged: quarantining it is the way out.
    pub fn is_corruption(&self) -> bool {
        match self {
            StoreError::Sqlite { source, .. } => matches!(
                source.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
            ),
            StoreError::Decode { .. } | StoreError::Corrupt { .. } => true,
            StoreError::Quarantine { .. } | StoreError::Export { .. } => false,
        }
    }

    /// The file system is full (or the quota is used up).
    pub fn is_disk_full(&self) -> bool {
        match self {
            // SQLite maps ENOSPC on its writes to SQLITE_FULL
            StoreError::Sqlite { source, .. } => source.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull),
            StoreError::Export { source, .. } | StoreError::Quarantine { source, .. } => io_is_full(source),
            _ => false,
        }
    }
}

/// ENOSPC or EDQUOT.
pub fn io_is_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// An error inside a store call, before the path is attached.
enum Inner {
    Sql(rusqlite::Error),
    Decode { key: String, source: serde_json::Error },
}

impl From<rusqlite::Error> for Inner {
    fn from(e: rusqlite::Error) -> Self {
        Inner::Sql(e)
    }
}

/// The last failure of one kind of store operation, until it succeeds again.
#[derive(Clone, Debug)]
struct Failure {
    since: UnixMs,
    error: String,
    disk_full: bool,
}

/// An event waiting in memory because it could not be committed.
type Unsaved = (UnixMs, Option<String>, String, String);

pub struct Store {
    conn: Mutex<Connection>,
    path: String,
    export_path: PathBuf,
    data_dir: PathBuf,
    /// Failing operations (see the module doc), by operation.
    failures: Mutex<BTreeMap<&'static str, Failure>>,
    unsaved: Mutex<VecDeque<Unsaved>>,
    events_confirmed: AtomicBool,
    errors_confirmed: AtomicBool,
    /// Woken when the conditions change (the status reporter waits on it).
    notify: OnceLock<Arc<tokio::sync::Notify>>,
}

/// The desired state the agent holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    pub generation: u64,
    pub workloads: BTreeMap<String, WorkloadSpec>,
}

/// What [`Store::open_or_recover`] found and did.
#[derive(Debug, Default)]
pub struct Recovery {
    /// The corrupt database was moved to this path (its `-wal`/`-shm` beside it), and why.
    pub quarantined: Option<(PathBuf, String)>,
    /// The database held no desired state when opened (first start, deleted, or quarantined).
    pub fresh: bool,
    /// The desired and gate state were restored from the export, at this generation.
    pub restored: Option<u64>,
    /// The export exists but could not be used, and why.
    pub export_error: Option<String>,
}

/// The export file: a checksummed JSON payload.
#[derive(Serialize, Deserialize)]
struct ExportFile {
    format: u32,
    sha256: String,
    payload: String,
}

/// The rows the export carries, as stored (JSON text).
#[derive(Serialize, Deserialize)]
struct Export {
    written_at: UnixMs,
    meta: BTreeMap<String, String>,
    workloads: BTreeMap<String, String>,
    rollouts: BTreeMap<String, String>,
}

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS workloads(key TEXT PRIMARY KEY, spec TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS units(unit TEXT PRIMARY KEY, hash TEXT NOT NULL, restarts INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS events(seq INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL,
        workload TEXT, reason TEXT NOT NULL, message TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS rollouts(key TEXT PRIMARY KEY, state TEXT NOT NULL);
    INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', '1');";

/// `YYYYMMDDTHHMMSS.mmmZ` for a Unix ms time (sorts like the time it names).
pub fn utc_stamp(ms: UnixMs) -> String {
    let secs = ms.div_euclid(1000);
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // civil_from_days (H. Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}.{:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60,
        ms.rem_euclid(1000)
    )
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// Move `path` and its `-wal`/`-shm` files to `<path>.corrupt-<stamp>...`, keep the newest
/// [`QUARANTINE_KEEP`] sets. The WAL must go too: left behind, it would be replayed into the
/// new database.
fn quarantine(path: &Path, now: UnixMs) -> std::io::Result<PathBuf> {
    let target = with_suffix(path, &format!(".corrupt-{}", utc_stamp(now)));
    for sfx in ["", "-wal", "-shm"] {
        let from = with_suffix(path, sfx);
        if from.exists() {
            std::fs::rename(&from, with_suffix(&target, sfx))?;
        }
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()?;
    // prune: sets are named by their stamp; the companions share it
    let prefix = format!(
        "{}.corrupt-",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state.db")
    );
    let mut stamps: Vec<String> = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.to_string();
            let rest = n.strip_prefix(&prefix)?;
            let stamp = rest.trim_end_matches("-wal").trim_end_matches("-shm");
            Some(stamp.to_string())
        })
        .collect();
    stamps.sort();
    stamps.dedup();
    let excess = stamps.len().saturating_sub(QUARANTINE_KEEP);
    for stamp in &stamps[..excess] {
        for sfx in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(dir.join(format!("{prefix}{stamp}{sfx}")));
        }
    }
    Ok(target)
}

/// Open a connection and create the schema. A database created here is marked `seq_new`: its
/// sequences start at 1 and must be confirmed against the hub's (module doc); one made by an
/// older agent carries on the sequences it always had.
fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.execute_batch(
        "PRAGMA journal_mode=WAL;
         PRAGMA synchronous=FULL;
         PRAGMA busy_timeout=5000;",
    )?;
    let exists: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
        [],
        |r| r.get(0),
    )?;
    conn.execute_batch(SCHEMA)?;
    if !exists {
        conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('seq_new', '1')", [])?;
    }
    Ok(conn)
}

/// `PRAGMA quick_check`: `None` when the file is sound, else what is wrong (first lines).
fn quick_check(conn: &Connection) -> rusqlite::Result<Option<String>> {
    let mut st = conn.prepare("PRAGMA quick_check(5)")?;
    let lines = st
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok((lines != ["ok"]).then(|| lines.join("; ")))
}

fn rows(c: &Connection, sql: &str) -> rusqlite::Result<BTreeMap<String, String>> {
    let mut st = c.prepare(sql)?;
    let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    rows.collect()
}

fn decode_all<T: serde::de::DeserializeOwned>(rows: &BTreeMap<String, String>) -> Result<BTreeMap<String, T>, Inner> {
    rows.iter()
        .map(|(k, v)| {
            serde_json::from_str(v)
                .map(|t| (k.clone(), t))
                .map_err(|source| Inner::Decode { key: k.clone(), source })
        })
        .collect()
}

fn sha256_hex(s: &str) -> String {
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// Read and verify an export file.
fn read_export(path: &Path) -> Result<Option<Export>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let f: ExportFile = serde_json::from_str(&text).map_err(|e| format!("{} is not an export: {e}", path.display()))?;
    if f.format != 1 {
        return Err(format!("{} has unknown format {}", path.display(), f.format));
    }
    if sha256_hex(&f.payload) != f.sha256 {
        return Err(format!("{} fails its checksum", path.display()));
    }
    let e: Export = serde_json::from_str(&f.payload).map_err(|e| format!("{}: {e}", path.display()))?;
    // every row must decode, or the export is not used at all
    decode_all::<WorkloadSpec>(&e.workloads)
        .and_then(|_| decode_all::<NodeRollout>(&e.rollouts))
        .map_err(|err| match err {
            Inner::Decode { key, source } => format!("{}: unreadable {key}: {source}", path.display()),
            Inner::Sql(e) => e.to_string(),
        })?;
    Ok(Some(e))
}

impl Store {
    /// Open (or create) the database; no corruption check (see [`Store::open_or_recover`]).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = connect(path).map_err(|source| StoreError::Sqlite {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self::with(conn, path))
    }

    fn with(conn: Connection, path: &Path) -> Self {
        let confirmed = |k: &str| {
            conn.query_row("SELECT value FROM meta WHERE key = ?1", params![k], |r| {
                r.get::<_, String>(0)
            })
            .optional()
            .ok()
            .flatten()
            .is_some()
        };
        let older = !confirmed("seq_new");
        let (ev, er) = (
            older || confirmed("events_confirmed"),
            older || confirmed("errors_confirmed"),
        );
        let data_dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        Self {
            conn: Mutex::new(conn),
            path: path.display().to_string(),
            export_path: data_dir.join(EXPORT_FILE),
            data_dir,
            failures: Mutex::new(BTreeMap::new()),
            unsaved: Mutex::new(VecDeque::new()),
            events_confirmed: AtomicBool::new(ev),
            errors_confirmed: AtomicBool::new(er),
            notify: OnceLock::new(),
        }
    }

    /// Open the database the agent runs from: check it, quarantine it if it is corrupt, and
    /// restore a new one from the export (module doc). Fails only for errors that are not
    /// corruption (the file stays where it is).
    pub fn open_or_recover(path: &Path, now: UnixMs) -> Result<(Self, Recovery), StoreError> {
        let mut rec = Recovery::default();
        let p = path.display().to_string();
        let sql = |source| StoreError::Sqlite {
            path: p.clone(),
            source,
        };
        let checked = (|| -> Result<Connection, StoreError> {
            let conn = connect(path).map_err(sql)?;
            if let Some(detail) = quick_check(&conn).map_err(sql)? {
                return Err(StoreError::Corrupt {
                    path: p.clone(),
                    detail,
                });
            }
            let w = rows(&conn, "SELECT key, spec FROM workloads").map_err(sql)?;
            let r = rows(&conn, "SELECT key, state FROM rollouts").map_err(sql)?;
            decode_all::<WorkloadSpec>(&w)
                .and_then(|_| decode_all::<NodeRollout>(&r))
                .map_err(|e| match e {
                    Inner::Sql(e) => sql(e),
                    Inner::Decode { key, source } => StoreError::Decode { key, source },
                })?;
            Ok(conn)
        })();
        let conn = match checked {
            Ok(c) => c,
            Err(e) if e.is_corruption() => {
                let why = e.to_string();
                let moved = quarantine(path, now).map_err(|source| StoreError::Quarantine {
                    path: p.clone(),
                    source,
                })?;
                error!(
                    file = %p, moved_to = %moved.display(), error = %why,
                    "the agent state database is corrupt; moved it aside and starting a new one"
                );
                rec.quarantined = Some((moved, why));
                connect(path).map_err(sql)?
            }
            Err(e) => return Err(e),
        };
        let store = Self::with(conn, path);
        rec.fresh = store.meta_raw("generation")?.is_none();
        if rec.fresh {
            match read_export(&store.export_path) {
                Ok(Some(export)) => {
                    let generation = store.import(&export)?;
                    info!(generation, workloads = export.workloads.len(), file = %store.export_path.display(),
                        "restored the desired and update-gate state from the export");
                    rec.restored = Some(generation);
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(error = %e, "the state export is unusable; the desired state comes from the hub");
                    rec.export_error = Some(e);
                }
            }
        }
        Ok((store, rec))
    }

    /// Wake `n` whenever the conditions change.
    pub fn set_notify(&self, n: Arc<tokio::sync::Notify>) {
        let _ = self.notify.set(n);
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wrap(&self, e: Inner) -> StoreError {
        match e {
            Inner::Sql(source) => StoreError::Sqlite {
                path: self.path.clone(),
                source,
            },
            Inner::Decode { key, source } => StoreError::Decode { key, source },
        }
    }

    /// Run `f` on the connection and record its outcome under `op`.
    fn run<T>(&self, op: &'static str, f: impl FnOnce(&mut Connection) -> Result<T, Inner>) -> Result<T, StoreError> {
        let r = {
            let mut c = self.lock();
            f(&mut c).map_err(|e| self.wrap(e))
        };
        self.note(op, r.as_ref().err().map(|e| (e.to_string(), e.is_disk_full())));
        r
    }

    /// Like [`Store::run`], and then rewrite the export from the committed state.
    fn run_exported<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut Connection) -> Result<T, Inner>,
    ) -> Result<T, StoreError> {
        let (r, export) = {
            let mut c = self.lock();
            let r = f(&mut c).map_err(|e| self.wrap(e));
            let export = r.is_ok().then(|| self.write_export(&c));
            (r, export)
        };
        self.note(op, r.as_ref().err().map(|e| (e.to_string(), e.is_disk_full())));
        if let Some(x) = export {
            if let Err(e) = &x {
                warn!(error = %e, "cannot write the state export; the database is current");
            }
            self.note("state export", x.err().map(|e| (e.to_string(), e.is_disk_full())));
        }
        r
    }

    /// Record the outcome of an operation (`None`: it succeeded). Logs each new failure and
    /// each recovery once, and wakes the status reporter when the conditions change.
    fn note(&self, op: &'static str, failed: Option<(String, bool)>) {
        let changed = {
            let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            match failed {
                Some((error, disk_full)) => {
                    let new = f.get(op).is_none_or(|x| x.error != error);
                    if new {
                        error!(operation = op, error = %error, disk_full, "cannot write the agent's state");
                        let since = f.get(op).map_or_else(outpost_api::now_ms, |x| x.since);
                        f.insert(
                            op,
                            Failure {
                                since,
                                error,
                                disk_full,
                            },
                        );
                    }
                    new
                }
                None => match f.remove(op) {
                    Some(x) => {
                        info!(operation = op, failing_since = x.since, "agent state writes work again");
                        true
                    }
                    None => false,
                },
            }
        };
        if changed {
            if let Some(n) = self.notify.get() {
                n.notify_one();
            }
        }
    }

    /// Record the outcome of a file write outside the database (log rotation).
    pub fn note_io(&self, op: &'static str, r: Result<(), &std::io::Error>) {
        self.note(op, r.err().map(|e| (e.to_string(), io_is_full(e))));
    }

    /// What is wrong with the node's storage now, for status reports (empty when all is well).
    pub fn conditions(&self) -> Vec<NodeCondition> {
        let f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_empty() {
            return Vec::new();
        }
        let full = f.values().any(|x| x.disk_full);
        let ops: Vec<&str> = f.keys().copied().collect();
        let since = f.values().map(|x| x.since).min().unwrap_or(0);
        let first = f
            .values()
            .find(|x| x.disk_full == full)
            .map(|x| x.error.clone())
            .unwrap_or_default();
        let unsaved = self.unsaved.lock().unwrap_or_else(|e| e.into_inner()).len();
        let mut message = format!(
            "the agent cannot save its {} in {}: {first}",
            ops.join(", "),
            self.data_dir.display()
        );
        if f.contains_key(OP_DESIRED) {
            message.push_str("; new revisions are not applied until it can");
        }
        if unsaved > 0 {
            message.push_str(&format!("; {unsaved} events held in memory"));
        }
        message.push_str(if full {
            "; free space on that file system"
        } else {
            "; check the disk and the file, or restart the agent to quarantine a corrupt database"
        });
        vec![NodeCondition {
            kind: if full { DISK_FULL } else { STORE_FAILING }.to_string(),
            message,
            since,
        }]
    }

    fn meta_raw(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.run("reading state", |c| {
            Ok(
                c.query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| r.get(0))
                    .optional()?,
            )
        })
    }

    /// Write the export from the committed state (called under the lock).
    fn write_export(&self, c: &Connection) -> Result<(), StoreError> {
        let sql = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let mut meta = BTreeMap::new();
        for k in EXPORTED_META {
            if let Some(v) = c
                .query_row("SELECT value FROM meta WHERE key = ?1", params![k], |r| r.get(0))
                .optional()
                .map_err(sql)?
            {
                meta.insert(k.to_string(), v);
            }
        }
        let export = Export {
            written_at: outpost_api::now_ms(),
            meta,
            workloads: rows(c, "SELECT key, spec FROM workloads").map_err(sql)?,
            rollouts: rows(c, "SELECT key, state FROM rollouts").map_err(sql)?,
        };
        let payload = serde_json::to_string(&export).expect("serializable");
        let file = ExportFile {
            format: 1,
            sha256: sha256_hex(&payload),
            payload,
        };
        crate::identity::write_atomic(
            &self.export_path,
            serde_json::to_string(&file).expect("serializable").as_bytes(),
            0o600,
        )
        .map_err(|source| StoreError::Export {
            path: self.export_path.display().to_string(),
            source,
        })
    }

    /// Put an export's rows into this (new) database, in one transaction. Returns its generation.
    fn import(&self, e: &Export) -> Result<u64, StoreError> {
        self.run("restoring state", |c| {
            let tx = c.transaction()?;
            for (k, v) in &e.meta {
                tx.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?1, ?2)", params![k, v])?;
            }
            for (k, v) in &e.workloads {
                tx.execute(
                    "INSERT OR REPLACE INTO workloads(key, spec) VALUES (?1, ?2)",
                    params![k, v],
                )?;
            }
            for (k, v) in &e.rollouts {
                tx.execute(
                    "INSERT OR REPLACE INTO rollouts(key, state) VALUES (?1, ?2)",
                    params![k, v],
                )?;
            }
            tx.commit()?;
            Ok(())
        })?;
        Ok(e.meta.get("generation").and_then(|g| g.parse().ok()).unwrap_or(0))
    }

    pub fn load_desired(&self) -> Result<Desired, StoreError> {
        self.run("reading state", |c| {
            let generation: Option<String> = c
                .query_row("SELECT value FROM meta WHERE key='generation'", [], |r| r.get(0))
                .optional()?;
            let workloads = decode_all(&rows(c, "SELECT key, spec FROM workloads")?)?;
            Ok(Desired {
                generation: generation.and_then(|g| g.parse().ok()).unwrap_or(0),
                workloads,
            })
        })
    }

    /// Replace the desired state atomically (see the module's crash invariants).
    pub fn save_desired(&self, d: &Desired) -> Result<(), StoreError> {
        self.run_exported(OP_DESIRED, |c| {
            let tx = c.transaction()?;
            tx.execute("DELETE FROM workloads", [])?;
            for (key, spec) in &d.workloads {
                let json = serde_json::to_string(spec).expect("serializable");
                tx.execute("INSERT INTO workloads(key, spec) VALUES (?1, ?2)", params![key, json])?;
            }
            tx.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('generation', ?1)",
                params![d.generation.to_string()],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    pub fn load_rollouts(&self) -> Result<BTreeMap<String, NodeRollout>, StoreError> {
        self.run("reading state", |c| {
            decode_all(&rows(c, "SELECT key, state FROM rollouts")?)
        })
    }

    pub fn save_rollout(&self, key: &str, st: &NodeRollout) -> Result<(), StoreError> {
        let json = serde_json::to_string(st).expect("serializable");
        self.run_exported("update-gate state", |c| {
            c.execute(
                "INSERT OR REPLACE INTO rollouts(key, state) VALUES (?1, ?2)",
                params![key, json],
            )?;
            Ok(())
        })
    }

    pub fn delete_rollout(&self, key: &str) -> Result<(), StoreError> {
        self.run_exported("update-gate state", |c| {
            c.execute("DELETE FROM rollouts WHERE key = ?1", params![key])?;
            Ok(())
        })
    }

    pub fn unit_restarts(&self) -> Result<BTreeMap<String, (String, u32)>, StoreError> {
        self.run("reading state", |c| {
            let mut stmt = c.prepare("SELECT unit, hash, restarts FROM units")?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, (r.get::<_, String>(1)?, r.get::<_, u32>(2)?)))
                })?
                .collect::<Result<BTreeMap<_, _>, _>>()?;
            Ok(rows)
        })
    }

    pub fn set_unit_restarts(&self, unit: &str, hash: &str, restarts: u32) -> Result<(), StoreError> {
        self.run("restart counts", |c| {
            c.execute(
                "INSERT OR REPLACE INTO units(unit, hash, restarts) VALUES (?1, ?2, ?3)",
                params![unit, hash, restarts],
            )?;
            Ok(())
        })
    }

    pub fn forget_unit(&self, unit: &str) -> Result<(), StoreError> {
        self.run("restart counts", |c| {
            c.execute("DELETE FROM units WHERE unit = ?1", params![unit])?;
            Ok(())
        })
    }

    /// Append an event to the outbox; returns its sequence number. Events held in memory
    /// after an earlier failure are committed first, in order. When the event cannot be
    /// committed it is held in memory too (bounded; the oldest goes first, logged) and the
    /// error is returned.
    pub fn push_event(
        &self,
        at: UnixMs,
        workload: Option<&str>,
        reason: &str,
        message: &str,
    ) -> Result<u64, StoreError> {
        let mut unsaved = self.unsaved.lock().unwrap_or_else(|e| e.into_inner());
        unsaved.push_back((at, workload.map(String::from), reason.to_string(), message.to_string()));
        let r = self.flush_locked(&mut unsaved);
        if r.is_err() && unsaved.len() > UNSAVED_EVENTS_MAX {
            let over = unsaved.len() - UNSAVED_EVENTS_MAX;
            unsaved.drain(..over);
            error!(
                dropped = over,
                held = UNSAVED_EVENTS_MAX,
                "node events dropped: the agent state cannot be written"
            );
        }
        r
    }

    /// Commit the events held in memory (in one transaction); returns the last sequence.
    fn flush_locked(&self, unsaved: &mut VecDeque<Unsaved>) -> Result<u64, StoreError> {
        if unsaved.is_empty() {
            return Ok(0);
        }
        let r = self.run(OP_EVENTS, |c| {
            let tx = c.transaction()?;
            for (at, workload, reason, message) in unsaved.iter() {
                tx.execute(
                    "INSERT INTO events(at, workload, reason, message) VALUES (?1, ?2, ?3, ?4)",
                    params![at, workload, reason, message],
                )?;
            }
            let seq = tx.last_insert_rowid() as u64;
            tx.commit()?;
            Ok(seq)
        });
        if r.is_ok() {
            unsaved.clear();
        }
        r
    }

    /// Commit events held in memory, if any (called before reading the outbox).
    pub fn flush_events(&self) {
        let mut unsaved = self.unsaved.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self.flush_locked(&mut unsaved);
    }

    /// Unacknowledged events, oldest first, at most `limit`.
    pub fn pending_events(&self, limit: usize) -> Result<Vec<NodeEvent>, StoreError> {
        self.run("reading state", |c| {
            let mut stmt = c.prepare("SELECT seq, at, workload, reason, message FROM events ORDER BY seq LIMIT ?1")?;
            let rows = stmt
                .query_map(params![limit as i64], |r| {
                    Ok(NodeEvent {
                        seq: r.get::<_, i64>(0)? as u64,
                        at: r.get(1)?,
                        workload: r.get(2)?,
                        reason: r.get(3)?,
                        message: r.get(4)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    /// The events a status report may carry now: none until the hub has told this database
    /// its highest sequence (module doc).
    pub fn events_to_send(&self, limit: usize) -> Result<Vec<NodeEvent>, StoreError> {
        self.flush_events();
        if !self.events_confirmed.load(Ordering::Relaxed) {
            return Ok(Vec::new());
        }
        self.pending_events(limit)
    }

    /// The hub has stored events up to `up_to`. The first answer after the database was
    /// created instead confirms the sequence: queued events are renumbered above `up_to`.
    /// Returns true when events are queued that the hub has not seen (send again now).
    pub fn ack_events(&self, up_to: u64) -> Result<bool, StoreError> {
        if !self.events_confirmed.load(Ordering::Relaxed) {
            let queued = self.confirm_seq("events", "events_confirmed", up_to)?;
            self.events_confirmed.store(true, Ordering::Relaxed);
            return Ok(queued);
        }
        self.run(OP_EVENTS, |c| {
            c.execute("DELETE FROM events WHERE seq <= ?1", params![up_to as i64])?;
            Ok(false)
        })
    }

    /// Renumber `table`'s queued rows above `hub_max` (keeping their order), make later rows
    /// follow them, and remember that this is done (`meta.<flag>`). Returns whether rows are
    /// queued.
    fn confirm_seq(&self, table: &'static str, flag: &'static str, hub_max: u64) -> Result<bool, StoreError> {
        let hub_max = hub_max.min(i64::MAX as u64 / 2) as i64;
        self.run("event sequence", |c| {
            let tx = c.transaction()?;
            let (min, max, n): (Option<i64>, Option<i64>, i64) =
                tx.query_row(&format!("SELECT MIN(seq), MAX(seq), COUNT(*) FROM {table}"), [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?;
            let mut top = max.unwrap_or(0);
            if let Some(min) = min.filter(|m| *m <= hub_max) {
                let shift = hub_max + 1 - min;
                tx.execute(&format!("UPDATE {table} SET seq = -seq"), [])?;
                tx.execute(&format!("UPDATE {table} SET seq = ?1 - seq"), params![shift])?;
                top += shift;
                info!(
                    table,
                    renumbered = n,
                    above = hub_max,
                    "queued rows renumbered above the hub's sequence"
                );
            }
            let floor = top.max(hub_max);
            let cur: Option<i64> = tx
                .query_row("SELECT seq FROM sqlite_sequence WHERE name = ?1", params![table], |r| {
                    r.get(0)
                })
                .optional()?;
            match cur {
                Some(s) if s >= floor => {}
                Some(_) => {
                    tx.execute(
                        "UPDATE sqlite_sequence SET seq = ?2 WHERE name = ?1",
                        params![table, floor],
                    )?;
                }
                None => {
                    tx.execute(
                        "INSERT INTO sqlite_sequence(name, seq) VALUES (?1, ?2)",
                        params![table, floor],
                    )?;
                }
            }
            tx.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES (?1, '1')",
                params![flag],
            )?;
            tx.commit()?;
            Ok(n > 0)
        })
    }
}

/// Operation names used in conditions.
const OP_DESIRED: &str = "desired state";
const OP_EVENTS: &str = "events";

// ---------------------------------------------------------------------------------------------
// Monitoring (issue 5): vital-sign history, alert evaluator state, log read offsets, and the
// outbox of error lines to forward. Created by [`Store::init_monitoring`].
//
// Crash invariants, in addition to the ones above:
// - [`Store::record_alerts`] writes the evaluator's state and the AlertFiring/AlertResolved
//   events it produced in one transaction: after a crash the agent neither repeats a transition
//   nor loses one, and each event keeps its original timestamp until the hub acknowledges it.
// - [`Store::push_error_lines`] queues error lines and advances the file's read offset in one
//   transaction: a line is forwarded at least once, and only duplicated if the hub's answer is
//   lost (the hub ignores `(node, seq)` it has).
// - `error_lines.seq` is AUTOINCREMENT like `events.seq`, and confirmed against the hub's
//   sequence the same way after the database is created ([`Store::ack_error_lines`]).

/// One error line waiting to be forwarded.
pub type QueuedError = outpost_api::ErrorLine;

impl Store {
    /// Create the monitoring tables (idempotent).
    pub fn init_monitoring(&self) -> Result<(), StoreError> {
        self.run("monitoring tables", |c| {
            c.execute_batch(
                "CREATE TABLE IF NOT EXISTS vitals(minute INTEGER PRIMARY KEY, sample TEXT NOT NULL);
                 CREATE TABLE IF NOT EXISTS log_files(path TEXT PRIMARY KEY, offset INTEGER NOT NULL,
                     started_at INTEGER NOT NULL);
                 CREATE TABLE IF NOT EXISTS error_lines(seq INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL,
                     workload TEXT NOT NULL, container TEXT NOT NULL, line TEXT NOT NULL);",
            )?;
            Ok(())
        })
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.meta_raw(key)
    }

    /// Set a `meta` value; the exported ones (alert policy and state) rewrite the export.
    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let f = |c: &mut Connection| -> Result<(), Inner> {
            c.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES (?1, ?2)",
                params![key, value],
            )?;
            Ok(())
        };
        if EXPORTED_META.contains(&key) {
            self.run_exported("settings", f)
        } else {
            self.run("settings", f)
        }
    }

    /// Keep one vital-sign sample per minute; drop those older than `keep_from` (unix ms).
    pub fn save_vitals(&self, at: UnixMs, sample: &str, keep_from: UnixMs) -> Result<(), StoreError> {
        self.run("vital-sign history", |c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT OR REPLACE INTO vitals(minute, sample) VALUES (?1, ?2)",
                params![at / 60_000, sample],
            )?;
            tx.execute("DELETE FROM vitals WHERE minute < ?1", params![keep_from / 60_000])?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Stored samples (JSON), oldest first.
    pub fn vitals_history(&self) -> Result<Vec<String>, StoreError> {
        self.run("reading state", |c| {
            let mut st = c.prepare("SELECT sample FROM vitals ORDER BY minute")?;
            let rows = st.query_map([], |r| r.get(0))?.collect::<Result<Vec<String>, _>>()?;
            Ok(rows)
        })
    }

    /// Save the alert evaluator's state and queue its events (`(at, workload, reason, message)`)
    /// in one transaction.
    pub fn record_alerts(
        &self,
        state_json: &str,
        events: &[(UnixMs, Option<String>, &str, String)],
    ) -> Result<(), StoreError> {
        // events held in memory go first, so the outbox keeps the order things happened in
        self.flush_events();
        self.run_exported("alert state", |c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('alert_state', ?1)",
                params![state_json],
            )?;
            for (at, workload, reason, message) in events {
                tx.execute(
                    "INSERT INTO events(at, workload, reason, message) VALUES (?1, ?2, ?3, ?4)",
                    params![at, workload, reason, message],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// `(offset, started_at)` of a log file, if known.
    pub fn log_offset(&self, path: &str) -> Result<Option<(u64, UnixMs)>, StoreError> {
        self.run("reading state", |c| {
            Ok(c.query_row(
                "SELECT offset, started_at FROM log_files WHERE path = ?1",
                params![path],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .optional()?)
        })
    }

    /// Queue error lines read from `path` and move its offset, in one transaction. Keeps at most
    /// `cap` queued lines (the oldest go, counted in `meta.log_dropped`). Returns how many were
    /// dropped now.
    pub fn push_error_lines(
        &self,
        path: &str,
        offset: u64,
        started_at: UnixMs,
        lines: &[(UnixMs, String, String, String)],
        cap: usize,
    ) -> Result<u64, StoreError> {
        self.run("log offsets and error lines", |c| {
            let tx = c.transaction()?;
            for (at, workload, container, line) in lines {
                tx.execute(
                    "INSERT INTO error_lines(at, workload, container, line) VALUES (?1, ?2, ?3, ?4)",
                    params![at, workload, container, line],
                )?;
            }
            tx.execute(
                "INSERT OR REPLACE INTO log_files(path, offset, started_at) VALUES (?1, ?2, ?3)",
                params![path, offset as i64, started_at],
            )?;
            let queued: i64 = tx.query_row("SELECT COUNT(*) FROM error_lines", [], |r| r.get(0))?;
            let over = (queued - cap as i64).max(0);
            if over > 0 {
                tx.execute(
                    "DELETE FROM error_lines WHERE seq IN (SELECT seq FROM error_lines ORDER BY seq LIMIT ?1)",
                    params![over],
                )?;
                add_dropped(&tx, over as u64)?;
            }
            tx.commit()?;
            Ok(over as u64)
        })
    }

    /// Forget a log file's offset (the file is gone).
    pub fn forget_log(&self, path: &str) -> Result<(), StoreError> {
        self.run("log offsets and error lines", |c| {
            c.execute("DELETE FROM log_files WHERE path = ?1", params![path])?;
            Ok(())
        })
    }

    pub fn pending_error_lines(&self, limit: usize) -> Result<Vec<QueuedError>, StoreError> {
        self.run("reading state", |c| {
            let mut st =
                c.prepare("SELECT seq, at, workload, container, line FROM error_lines ORDER BY seq LIMIT ?1")?;
            let rows = st
                .query_map(params![limit as i64], |r| {
                    Ok(QueuedError {
                        seq: r.get::<_, i64>(0)? as u64,
                        at: r.get(1)?,
                        workload: r.get(2)?,
                        container: r.get(3)?,
                        line: r.get(4)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    /// The error lines a batch may carry now: none until the hub has told this database its
    /// highest sequence (an empty batch asks it).
    pub fn error_lines_to_send(&self, limit: usize) -> Result<Vec<QueuedError>, StoreError> {
        if !self.errors_confirmed.load(Ordering::Relaxed) {
            return Ok(Vec::new());
        }
        self.pending_error_lines(limit)
    }

    /// Like [`Store::ack_events`], for error lines.
    pub fn ack_error_lines(&self, up_to: u64) -> Result<bool, StoreError> {
        if !self.errors_confirmed.load(Ordering::Relaxed) {
            let queued = self.confirm_seq("error_lines", "errors_confirmed", up_to)?;
            self.errors_confirmed.store(true, Ordering::Relaxed);
            return Ok(queued);
        }
        self.run("log offsets and error lines", |c| {
            c.execute("DELETE FROM error_lines WHERE seq <= ?1", params![up_to as i64])?;
            Ok(false)
        })
    }

    /// Count lines dropped because a log cap bit (rotated segments deleted early).
    pub fn add_dropped_lines(&self, n: u64) -> Result<(), StoreError> {
        self.run("log offsets and error lines", |c| Ok(add_dropped(c, n)?))
    }

    /// Lines dropped so far (error queue cap and log size caps).
    pub fn dropped_lines(&self) -> u64 {
        self.meta("log_dropped")
            .ok()
            .flatten()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

fn add_dropped(c: &Connection, n: u64) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO meta(key, value) VALUES ('log_dropped', ?1)
         ON CONFLICT(key) DO UPDATE SET value = CAST(CAST(value AS INTEGER) + ?1 AS TEXT)",
        params![n as i64],
    )
    .map(|_| ())
}

#[cfg(test)]
mod monitoring_tests {
    use super::*;

    #[test]
    fn alert_events_and_error_lines_survive_reopen_and_caps_count_drops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let s = Store::open(&path).unwrap();
            s.init_monitoring().unwrap();
            // the hub has no error lines from this node yet
            assert!(!s.ack_error_lines(0).unwrap());
            s.record_alerts(
                "{\"firing\":{\"NodeCpuHigh\":5}}",
                &[(5, None, "AlertFiring", "NodeCpuHigh: CPU 95%".into())],
            )
            .unwrap();
            let l = |i: i64| (i, "w".to_string(), "c".to_string(), format!("ERROR {i}"));
            assert_eq!(s.push_error_lines("/x.log", 100, 1, &[l(1), l(2)], 3).unwrap(), 0);
            assert_eq!(s.push_error_lines("/x.log", 200, 1, &[l(3), l(4)], 3).unwrap(), 1);
            s.save_vitals(60_000, "a", 0).unwrap();
            s.save_vitals(61_000, "b", 0).unwrap();
            s.save_vitals(180_000, "c", 120_000).unwrap();
        }
        let s = Store::open(&path).unwrap();
        s.init_monitoring().unwrap();
        assert_eq!(
            s.meta("alert_state").unwrap().unwrap(),
            "{\"firing\":{\"NodeCpuHigh\":5}}"
        );
        let ev = s.pending_events(10).unwrap();
        assert_eq!((ev[0].at, ev[0].reason.as_str()), (5, "AlertFiring"));
        assert_eq!(s.log_offset("/x.log").unwrap(), Some((200, 1)));
        let q = s.pending_error_lines(10).unwrap();
        assert_eq!(
            q.iter().map(|l| l.line.as_str()).collect::<Vec<_>>(),
            ["ERROR 2", "ERROR 3", "ERROR 4"]
        );
        assert_eq!(s.dropped_lines(), 1);
        s.add_dropped_lines(10).unwrap();
        assert_eq!(s.dropped_lines(), 11);
        s.ack_error_lines(q[1].seq).unwrap();
        assert_eq!(s.pending_error_lines(10).unwrap().len(), 1);
        assert_eq!(
            s.vitals_history().unwrap(),
            ["c"],
            "one sample per minute, older than 24 h pruned"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_api::{Kind, RestartPolicy, Runtime};

    fn spec(key: &str, hash: &str) -> WorkloadSpec {
        WorkloadSpec {
            key: key.into(),
            kind: Kind::DaemonSet,
            namespace: "default".into(),
            name: key.into(),
            revision: 1,
            hash: hash.into(),
            runtime: Runtime::Process,
            restart_policy: RestartPolicy::Always,
            grace_seconds: 1,
            containers: vec![],
            volumes: vec![],
            min_ready_seconds: 0,
            progress_deadline_seconds: 600,
            host_network: false,
            host_pid: false,
            job: None,
            agent_update: None,
            pipeline: None,
            failover: None,
        }
    }

    #[test]
    fn desired_state_and_outbox_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let s = Store::open(&path).unwrap();
            assert_eq!(s.load_desired().unwrap(), Desired::default());
            // the hub has no events from this node yet: nothing to renumber
            assert!(!s.ack_events(0).unwrap());
            let mut d = Desired {
                generation: 4,
                workloads: BTreeMap::new(),
            };
            d.workloads.insert("a".into(), spec("a", "h1"));
            d.workloads.insert("b".into(), spec("b", "h2"));
            s.save_desired(&d).unwrap();
            d.workloads.remove("a");
            d.generation = 5;
            s.save_desired(&d).unwrap();
            assert_eq!(s.push_event(10, Some("b"), "BackOff", "exited 1").unwrap(), 1);
            assert_eq!(s.push_event(11, None, "Started", "agent").unwrap(), 2);
            s.ack_events(1).unwrap();
        }
        let s = Store::open(&path).unwrap();
        let d = s.load_desired().unwrap();
        assert_eq!(d.generation, 5);
        assert_eq!(d.workloads.keys().collect::<Vec<_>>(), ["b"]);
        let ev = s.pending_events(10).unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!((ev[0].seq, ev[0].at), (2, 11));
        s.ack_events(2).unwrap();
        // sequence numbers are never reused, even when the outbox is empty
        assert_eq!(s.push_event(12, None, "x", "y").unwrap(), 3);
        // rollout state round-trips
        let st = NodeRollout {
            good: Some(spec("b", "h2")),
            since: 5,
            ..Default::default()
        };
        s.save_rollout("b", &st).unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.load_rollouts().unwrap()["b"], st);
        s.delete_rollout("b").unwrap();
        assert!(s.load_rollouts().unwrap().is_empty());
    }

    fn sample_state(path: &Path) -> (Desired, NodeRollout) {
        let s = Store::open(path).unwrap();
        s.init_monitoring().unwrap();
        let mut d = Desired {
            generation: 7,
            workloads: BTreeMap::new(),
        };
        for i in 0..6 {
            let mut w = spec(&format!("daemonset/default/w{i}"), &format!("h{i}"));
            // big enough that the tables span several pages
            w.name = "x".repeat(3000);
            d.workloads.insert(w.key.clone(), w);
        }
        s.save_desired(&d).unwrap();
        let st = NodeRollout {
            good: Some(spec("daemonset/default/w0", "h0")),
            since: 9,
            ..Default::default()
        };
        s.save_rollout("daemonset/default/w0", &st).unwrap();
        s.record_alerts("{\"firing\":{}}", &[]).unwrap();
        s.push_event(1, None, "Exited", "x").unwrap();
        (d, st)
    }

    fn corrupt(path: &Path, how: &str) {
        let mut bytes = std::fs::read(path).unwrap();
        let page = 4096;
        assert!(
            bytes.len() >= 6 * page,
            "the test database spans pages: {}",
            bytes.len()
        );
        match how {
            "header" => bytes[..100].fill(0x42),
            "middle pages" => {
                let end = bytes.len() - page;
                bytes[page..end].fill(0x55)
            }
            "one interior page" => bytes[2 * page..3 * page]
                .iter_mut()
                .for_each(|b| *b = b.wrapping_mul(7) ^ 0xa5),
            "truncated" => bytes.truncate(bytes.len() / 2),
            _ => unreachable!(),
        }
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn a_corrupt_database_is_quarantined_and_rebuilt_from_the_export() {
        for how in ["header", "middle pages", "one interior page", "truncated"] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("state.db");
            let (d, st) = sample_state(&path);
            assert!(!path.with_file_name("state.db-wal").exists(), "closed cleanly");
            corrupt(&path, how);
            // a stale WAL beside the corrupt file must not be replayed into the new one
            std::fs::write(dir.path().join("state.db-wal"), b"junk").unwrap();
            let (s, rec) = Store::open_or_recover(&path, 1_700_000_000_123).unwrap();
            let (moved, why) = rec
                .quarantined
                .as_ref()
                .unwrap_or_else(|| panic!("{how}: not quarantined"));
            assert_eq!(
                moved.file_name().unwrap(),
                "state.db.corrupt-20231114T221320.123Z",
                "{how}"
            );
            assert!(moved.exists(), "{how}");
            assert!(!why.is_empty(), "{how}");
            assert!(rec.fresh && rec.restored == Some(7), "{how}: {rec:?}");
            assert_eq!(s.load_desired().unwrap(), d, "{how}");
            assert_eq!(s.load_rollouts().unwrap()["daemonset/default/w0"], st, "{how}");
            assert_eq!(s.meta("alert_state").unwrap().as_deref(), Some("{\"firing\":{}}"));
            assert!(s.pending_events(10).unwrap().is_empty(), "{how}: a new outbox");
            drop(s);
            // the rebuilt database is sound: opening again changes nothing
            let (s, rec) = Store::open_or_recover(&path, 1_700_000_001_000).unwrap();
            assert!(
                rec.quarantined.is_none() && !rec.fresh && rec.restored.is_none(),
                "{how}: {rec:?}"
            );
            assert_eq!(s.load_desired().unwrap().generation, 7);
        }
    }

    #[test]
    fn a_sound_database_is_used_as_is_and_other_errors_move_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let (d, _) = sample_state(&path);
        let (s, rec) = Store::open_or_recover(&path, 5).unwrap();
        assert!(rec.quarantined.is_none() && !rec.fresh, "{rec:?}");
        assert_eq!(s.load_desired().unwrap(), d);
        assert_eq!(s.pending_events(10).unwrap().len(), 1, "the outbox is kept");
        drop(s);
        // a path that cannot be opened (a directory) is an error, not corruption
        let bad = dir.path().join("sub");
        std::fs::create_dir(&bad).unwrap();
        let e = Store::open_or_recover(&bad, 5).err().expect("cannot open a directory");
        assert!(!e.is_corruption(), "{e}");
        assert!(bad.is_dir(), "nothing moved");
    }

    #[test]
    fn quarantine_keeps_the_newest_three_sets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        for i in 0..5i64 {
            std::fs::write(&path, b"x").unwrap();
            std::fs::write(dir.path().join("state.db-wal"), b"w").unwrap();
            quarantine(&path, 1_000_000 + i * 1000).unwrap();
        }
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "state.db.corrupt-19700101T001642.000Z",
                "state.db.corrupt-19700101T001642.000Z-wal",
                "state.db.corrupt-19700101T001643.000Z",
                "state.db.corrupt-19700101T001643.000Z-wal",
                "state.db.corrupt-19700101T001644.000Z",
                "state.db.corrupt-19700101T001644.000Z-wal",
            ]
        );
    }

    #[test]
    fn a_missing_database_uses_the_export_and_a_damaged_export_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let (d, _) = sample_state(&path);
        let export = dir.path().join(EXPORT_FILE);
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&export).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "the export holds Secrets");
        }
        std::fs::remove_file(&path).unwrap();
        let (s, rec) = Store::open_or_recover(&path, 5).unwrap();
        assert!(
            rec.quarantined.is_none() && rec.fresh && rec.restored == Some(7),
            "{rec:?}"
        );
        assert_eq!(s.load_desired().unwrap(), d);
        drop(s);
        // one flipped byte in the payload: the checksum refuses the export
        std::fs::remove_file(&path).unwrap();
        let text = std::fs::read_to_string(&export).unwrap().replacen("h3", "h9", 1);
        std::fs::write(&export, text).unwrap();
        let (s, rec) = Store::open_or_recover(&path, 5).unwrap();
        assert!(rec.fresh && rec.restored.is_none(), "{rec:?}");
        assert!(rec.export_error.as_deref().unwrap().contains("checksum"), "{rec:?}");
        assert_eq!(s.load_desired().unwrap(), Desired::default());
        drop(s);
        // no database, no export: a first start
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(&export).unwrap();
        let (_, rec) = Store::open_or_recover(&path, 5).unwrap();
        assert!(
            rec.fresh && rec.restored.is_none() && rec.export_error.is_none(),
            "{rec:?}"
        );
    }

    #[test]
    fn a_new_database_continues_the_event_sequence_above_the_hubs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let s = Store::open(&path).unwrap();
        s.init_monitoring().unwrap();
        for i in 1..=3 {
            assert_eq!(s.push_event(i, None, "E", &format!("e{i}")).unwrap(), i as u64);
        }
        assert!(
            s.events_to_send(10).unwrap().is_empty(),
            "held until the hub answered once"
        );
        // the hub holds sequences up to 10 from the node's previous database
        assert!(s.ack_events(10).unwrap(), "queued events to send now");
        let sent = s.events_to_send(10).unwrap();
        let seqs: Vec<(u64, &str)> = sent.iter().map(|e| (e.seq, e.message.as_str())).collect();
        assert_eq!(seqs, [(11, "e1"), (12, "e2"), (13, "e3")], "renumbered, order kept");
        assert_eq!(s.push_event(4, None, "E", "e4").unwrap(), 14);
        assert!(!s.ack_events(13).unwrap());
        assert_eq!(s.pending_events(10).unwrap()[0].seq, 14);
        // error lines: same, and an empty queue just moves the sequence
        assert!(!s.ack_error_lines(40).unwrap());
        s.push_error_lines("/l", 1, 1, &[(1, "w".into(), "c".into(), "ERROR".into())], 10)
            .unwrap();
        assert_eq!(s.error_lines_to_send(10).unwrap()[0].seq, 41);
        drop(s);
        // confirmed stays confirmed
        let s = Store::open(&path).unwrap();
        assert_eq!(s.events_to_send(10).unwrap().len(), 1);
        assert_eq!(s.error_lines_to_send(10).unwrap().len(), 1);
        // a database made by an older agent keeps its sequence (no renumbering)
        let old = dir.path().join("old.db");
        let s = Store::open(&old).unwrap();
        s.push_event(1, None, "E", "a").unwrap();
        drop(s);
        let c = Connection::open(&old).unwrap();
        c.execute("DELETE FROM meta WHERE key = 'seq_new'", []).unwrap();
        drop(c);
        let s = Store::open(&old).unwrap();
        assert_eq!(s.events_to_send(10).unwrap()[0].seq, 1, "sent at once");
        assert!(!s.ack_events(1).unwrap());
        assert!(s.pending_events(10).unwrap().is_empty(), "acknowledged, not renumbered");
        // a hub behind the node (its events were pruned) renumbers nothing
        let other = dir.path().join("other.db");
        let s = Store::open(&other).unwrap();
        s.push_event(1, None, "E", "a").unwrap();
        assert!(s.ack_events(0).unwrap());
        assert_eq!(s.events_to_send(10).unwrap()[0].seq, 1);
    }

    #[test]
    fn write_failures_are_conditions_and_unsaved_events_are_kept_and_retried() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let s = Store::open(&path).unwrap();
        assert!(s.ack_events(0).is_ok());
        assert!(s.conditions().is_empty());
        // something breaks the outbox table under the agent
        let other = Connection::open(&path).unwrap();
        other.execute_batch("ALTER TABLE events RENAME TO events_gone").unwrap();
        assert!(s.push_event(1, Some("w"), "Exited", "first").is_err());
        assert!(s.push_event(2, Some("w"), "Exited", "second").is_err());
        let c = s.conditions();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].kind, STORE_FAILING);
        assert!(
            c[0].message.contains("cannot save its events") && c[0].message.contains("2 events held in memory"),
            "{}",
            c[0].message
        );
        // a desired-state write that fails says that revisions wait
        other
            .execute_batch("ALTER TABLE workloads RENAME TO workloads_gone")
            .unwrap();
        assert!(s.save_desired(&Desired::default()).is_err());
        assert!(s.conditions()[0].message.contains("new revisions are not applied"));
        // repaired: the next event commits the held ones first, in order, and the condition clears
        other
            .execute_batch("ALTER TABLE events_gone RENAME TO events; ALTER TABLE workloads_gone RENAME TO workloads;")
            .unwrap();
        assert_eq!(s.push_event(3, Some("w"), "Exited", "third").unwrap(), 3);
        s.save_desired(&Desired::default()).unwrap();
        let msgs: Vec<String> = s.pending_events(10).unwrap().into_iter().map(|e| e.message).collect();
        assert_eq!(msgs, ["first", "second", "third"]);
        assert!(s.conditions().is_empty(), "{:?}", s.conditions());
    }

    #[test]
    fn disk_full_is_told_apart() {
        let full = StoreError::Sqlite {
            path: "p".into(),
            source: rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL), None),
        };
        assert!(full.is_disk_full() && !full.is_corruption());
        let corrupt = StoreError::Sqlite {
            path: "p".into(),
            source: rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT), None),
        };
        assert!(corrupt.is_corruption() && !corrupt.is_disk_full());
        let export = StoreError::Export {
            path: "p".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        assert!(export.is_disk_full());
        let s = Store::open(&tempfile::tempdir().unwrap().path().join("s.db")).unwrap();
        s.note_io("logs", Err(&std::io::Error::from_raw_os_error(libc::ENOSPC)));
        let c = s.conditions();
        assert_eq!(c[0].kind, DISK_FULL);
        assert!(c[0].message.contains("free space"), "{}", c[0].message);
        s.note_io("logs", Ok(()));
        assert!(s.conditions().is_empty());
    }

    #[test]
    fn utc_stamps() {
        for (ms, want) in [
            (0, "19700101T000000.000Z"),
            (1_700_000_000_123, "20231114T221320.123Z"),
            (951_782_400_000, "20000229T000000.000Z"),
            (4_102_444_799_999, "20991231T235959.999Z"),
        ] {
            assert_eq!(utc_stamp(ms), want);
        }
    }
}
