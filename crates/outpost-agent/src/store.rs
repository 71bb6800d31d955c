//! The agent's durable state: `<data-dir>/state.db` (SQLite, WAL, `synchronous=FULL`).
//!
//! Tables:
//! - `meta(key, value)`: `generation` (the desired-state generation held), `schema`.
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

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use outpost_api::{NodeEvent, UnixMs, WorkloadSpec};
use outpost_core::rollout::NodeRollout;
use rusqlite::{params, Connection, OptionalExtension};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("agent state database {path}: {source}")]
    Sqlite { path: String, source: rusqlite::Error },
    #[error("agent state database holds an unreadable workload {key}: {source}")]
    Decode { key: String, source: serde_json::Error },
}

pub struct Store {
    conn: Mutex<Connection>,
    path: String,
}

/// The desired state the agent holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    pub generation: u64,
    pub workloads: BTreeMap<String, WorkloadSpec>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let p = path.display().to_string();
        let wrap = |source| StoreError::Sqlite {
            path: p.clone(),
            source,
        };
        let conn = Connection::open(path).map_err(wrap)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=FULL;
             PRAGMA busy_timeout=5000;
             CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS workloads(key TEXT PRIMARY KEY, spec TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS units(unit TEXT PRIMARY KEY, hash TEXT NOT NULL, restarts INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS events(seq INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL,
                 workload TEXT, reason TEXT NOT NULL, message TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS rollouts(key TEXT PRIMARY KEY, state TEXT NOT NULL);
             INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', '1');",
        )
        .map_err(wrap)?;
        Ok(Self {
            conn: Mutex::new(conn),
            path: p,
        })
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn load_desired(&self) -> Result<Desired, StoreError> {
        let c = self.lock();
        let generation: Option<String> = c
            .query_row("SELECT value FROM meta WHERE key='generation'", [], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))?;
        let mut stmt = c.prepare("SELECT key, spec FROM workloads").map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        let mut workloads = BTreeMap::new();
        for (key, spec) in rows {
            let spec: WorkloadSpec = serde_json::from_str(&spec).map_err(|source| StoreError::Decode {
                key: key.clone(),
                source,
            })?;
            workloads.insert(key, spec);
        }
        Ok(Desired {
            generation: generation.and_then(|g| g.parse().ok()).unwrap_or(0),
            workloads,
        })
    }

    /// Replace the desired state atomically (see the module's crash invariants).
    pub fn save_desired(&self, d: &Desired) -> Result<(), StoreError> {
        let mut c = self.lock();
        let tx = c.transaction().map_err(|e| self.err(e))?;
        tx.execute("DELETE FROM workloads", []).map_err(|e| self.err(e))?;
        for (key, spec) in &d.workloads {
            let json = serde_json::to_string(spec).expect("serializable");
            tx.execute("INSERT INTO workloads(key, spec) VALUES (?1, ?2)", params![key, json])
                .map_err(|e| self.err(e))?;
        }
        tx.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES ('generation', ?1)",
            params![d.generation.to_string()],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    pub fn load_rollouts(&self) -> Result<BTreeMap<String, NodeRollout>, StoreError> {
        let c = self.lock();
        let mut stmt = c.prepare("SELECT key, state FROM rollouts").map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        let mut out = BTreeMap::new();
        for (key, state) in rows {
            let st = serde_json::from_str(&state).map_err(|source| StoreError::Decode {
                key: key.clone(),
                source,
            })?;
            out.insert(key, st);
        }
        Ok(out)
    }

    pub fn save_rollout(&self, key: &str, st: &NodeRollout) -> Result<(), StoreError> {
        let json = serde_json::to_string(st).expect("serializable");
        self.lock()
            .execute(
                "INSERT OR REPLACE INTO rollouts(key, state) VALUES (?1, ?2)",
                params![key, json],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    pub fn delete_rollout(&self, key: &str) -> Result<(), StoreError> {
        self.lock()
            .execute("DELETE FROM rollouts WHERE key = ?1", params![key])
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    pub fn unit_restarts(&self) -> Result<BTreeMap<String, (String, u32)>, StoreError> {
        let c = self.lock();
        let mut stmt = c
            .prepare("SELECT unit, hash, restarts FROM units")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, (r.get::<_, String>(1)?, r.get::<_, u32>(2)?)))
            })
            .map_err(|e| self.err(e))?
            .collect::<Result<BTreeMap<_, _>, _>>()
            .map_err(|e| self.err(e));
        rows
    }

    pub fn set_unit_restarts(&self, unit: &str, hash: &str, restarts: u32) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "INSERT OR REPLACE INTO units(unit, hash, restarts) VALUES (?1, ?2, ?3)",
                params![unit, hash, restarts],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    pub fn forget_unit(&self, unit: &str) -> Result<(), StoreError> {
        self.lock()
            .execute("DELETE FROM units WHERE unit = ?1", params![unit])
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Append an event to the outbox; returns its sequence number.
    pub fn push_event(
        &self,
        at: UnixMs,
        workload: Option<&str>,
        reason: &str,
        message: &str,
    ) -> Result<u64, StoreError> {
        let c = self.lock();
        c.execute(
            "INSERT INTO events(at, workload, reason, message) VALUES (?1, ?2, ?3, ?4)",
            params![at, workload, reason, message],
        )
        .map_err(|e| self.err(e))?;
        Ok(c.last_insert_rowid() as u64)
    }

    /// Unacknowledged events, oldest first, at most `limit`.
    pub fn pending_events(&self, limit: usize) -> Result<Vec<NodeEvent>, StoreError> {
        let c = self.lock();
        let mut stmt = c
            .prepare("SELECT seq, at, workload, reason, message FROM events ORDER BY seq LIMIT ?1")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![limit as i64], |r| {
                Ok(NodeEvent {
                    seq: r.get::<_, i64>(0)? as u64,
                    at: r.get(1)?,
                    workload: r.get(2)?,
                    reason: r.get(3)?,
                    message: r.get(4)?,
                })
            })
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e));
        rows
    }

    pub fn ack_events(&self, up_to: u64) -> Result<(), StoreError> {
        self.lock()
            .execute("DELETE FROM events WHERE seq <= ?1", params![up_to as i64])
            .map(|_| ())
            .map_err(|e| self.err(e))
    }
}

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
// - `error_lines.seq` is AUTOINCREMENT like `events.seq`.

/// One error line waiting to be forwarded.
pub type QueuedError = outpost_api::ErrorLine;

impl Store {
    /// Create the monitoring tables (idempotent).
    pub fn init_monitoring(&self) -> Result<(), StoreError> {
        self.lock()
            .execute_batch(
                "CREATE TABLE IF NOT EXISTS vitals(minute INTEGER PRIMARY KEY, sample TEXT NOT NULL);
                 CREATE TABLE IF NOT EXISTS log_files(path TEXT PRIMARY KEY, offset INTEGER NOT NULL,
                     started_at INTEGER NOT NULL);
                 CREATE TABLE IF NOT EXISTS error_lines(seq INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL,
                     workload TEXT NOT NULL, container TEXT NOT NULL, line TEXT NOT NULL);",
            )
            .map_err(|e| self.err(e))
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.lock()
            .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES (?1, ?2)",
                params![key, value],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Keep one vital-sign sample per minute; drop those older than `keep_from` (unix ms).
    pub fn save_vitals(&self, at: UnixMs, sample: &str, keep_from: UnixMs) -> Result<(), StoreError> {
        let mut c = self.lock();
        let tx = c.transaction().map_err(|e| self.err(e))?;
        tx.execute(
            "INSERT OR REPLACE INTO vitals(minute, sample) VALUES (?1, ?2)",
            params![at / 60_000, sample],
        )
        .map_err(|e| self.err(e))?;
        tx.execute("DELETE FROM vitals WHERE minute < ?1", params![keep_from / 60_000])
            .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    /// Stored samples (JSON), oldest first.
    pub fn vitals_history(&self) -> Result<Vec<String>, StoreError> {
        let c = self.lock();
        let mut st = c
            .prepare("SELECT sample FROM vitals ORDER BY minute")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| r.get(0))
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<String>, _>>()
            .map_err(|e| self.err(e));
        rows
    }

    /// Save the alert evaluator's state and queue its events (`(at, workload, reason, message)`)
    /// in one transaction.
    pub fn record_alerts(
        &self,
        state_json: &str,
        events: &[(UnixMs, Option<String>, &str, String)],
    ) -> Result<(), StoreError> {
        let mut c = self.lock();
        let tx = c.transaction().map_err(|e| self.err(e))?;
        tx.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES ('alert_state', ?1)",
            params![state_json],
        )
        .map_err(|e| self.err(e))?;
        for (at, workload, reason, message) in events {
            tx.execute(
                "INSERT INTO events(at, workload, reason, message) VALUES (?1, ?2, ?3, ?4)",
                params![at, workload, reason, message],
            )
            .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// `(offset, started_at)` of a log file, if known.
    pub fn log_offset(&self, path: &str) -> Result<Option<(u64, UnixMs)>, StoreError> {
        self.lock()
            .query_row(
                "SELECT offset, started_at FROM log_files WHERE path = ?1",
                params![path],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .optional()
            .map_err(|e| self.err(e))
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
        let mut c = self.lock();
        let tx = c.transaction().map_err(|e| self.err(e))?;
        for (at, workload, container, line) in lines {
            tx.execute(
                "INSERT INTO error_lines(at, workload, container, line) VALUES (?1, ?2, ?3, ?4)",
                params![at, workload, container, line],
            )
            .map_err(|e| self.err(e))?;
        }
        tx.execute(
            "INSERT OR REPLACE INTO log_files(path, offset, started_at) VALUES (?1, ?2, ?3)",
            params![path, offset as i64, started_at],
        )
        .map_err(|e| self.err(e))?;
        let queued: i64 = tx
            .query_row("SELECT COUNT(*) FROM error_lines", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        let over = (queued - cap as i64).max(0);
        if over > 0 {
            tx.execute(
                "DELETE FROM error_lines WHERE seq IN (SELECT seq FROM error_lines ORDER BY seq LIMIT ?1)",
                params![over],
            )
            .map_err(|e| self.err(e))?;
            add_dropped(&tx, over as u64).map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(over as u64)
    }

    /// Forget a log file's offset (the file is gone).
    pub fn forget_log(&self, path: &str) -> Result<(), StoreError> {
        self.lock()
            .execute("DELETE FROM log_files WHERE path = ?1", params![path])
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    pub fn pending_error_lines(&self, limit: usize) -> Result<Vec<QueuedError>, StoreError> {
        let c = self.lock();
        let mut st = c
            .prepare("SELECT seq, at, workload, container, line FROM error_lines ORDER BY seq LIMIT ?1")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![limit as i64], |r| {
                Ok(QueuedError {
                    seq: r.get::<_, i64>(0)? as u64,
                    at: r.get(1)?,
                    workload: r.get(2)?,
                    container: r.get(3)?,
                    line: r.get(4)?,
                })
            })
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e));
        rows
    }

    pub fn ack_error_lines(&self, up_to: u64) -> Result<(), StoreError> {
        self.lock()
            .execute("DELETE FROM error_lines WHERE seq <= ?1", params![up_to as i64])
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Count lines dropped because a log cap bit (rotated segments deleted early).
    pub fn add_dropped_lines(&self, n: u64) -> Result<(), StoreError> {
        add_dropped(&self.lock(), n).map_err(|e| self.err(e))
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
        }
    }

    #[test]
    fn desired_state_and_outbox_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let s = Store::open(&path).unwrap();
            assert_eq!(s.load_desired().unwrap(), Desired::default());
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
}
