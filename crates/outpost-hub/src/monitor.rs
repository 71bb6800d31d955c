//! The hub's monitoring database: alerts (from nodes and from the hub's own rules), the nodes'
//! last vital signs and conditions, forwarded error lines, and the webhook outbox, in tables of
//! the hub's database file (its own connection, so the core [`crate::store::Store`] stays about
//! desired state).
//!
//! Alerts: one row per `(node, name, subject)` with its state (`Firing`/`Resolved`), so
//! repeated reports never duplicate an alert. Node alerts arrive as `AlertFiring` /
//! `AlertResolved` events in status reports (original node timestamps); each node's highest
//! processed event sequence is stored with the alert rows in one transaction, so a resent batch
//! changes nothing (`outpost_core::alerts::on_node_event`). Every transition, and every rollout
//! event, enqueues one webhook row per URL in the same transaction (delivered by
//! `crate::webhook`).
//!
//! A leaf module: it knows SQLite and the wire types, nothing else of the hub. Must never:
//! notify twice for one transition, lose a transition across a hub restart, or decide an alert
//! itself (the decisions are in `outpost_core::alerts`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_api::RolloutEvent;
use outpost_api::{
    AlertInfo, AlertState, ErrorBatch, Labels, NodeCondition, NodeEvent, StoredErrorLine, UnixMs, Vitals, ALERT_FIRING,
    ALERT_RESOLVED,
};
use outpost_core::alerts::{self as rules, AlertKey, HubTransition, NodeEventAction};
use outpost_core::lease::{self, Claim, Fence, Lease, Timing};
use outpost_core::retention;
use outpost_core::waves::{AlertChange, Rollout};
use rusqlite::{params, Connection, OptionalExtension};

/// Resolved alerts are kept this long for `outpost get alerts --all`.
const RESOLVED_KEPT_MS: i64 = 7 * 86_400_000;
/// Forwarded error lines kept per node.
const ERRORS_KEPT: i64 = 5000;

#[derive(Clone, Debug)]
pub struct MonitorConfig {
    /// Webhook URLs every alert transition is POSTed to.
    pub webhooks: Vec<String>,
    /// A node silent this long raises `NodeOffline` (default 5 min).
    pub offline_alert: Duration,
    /// How often the hub's rules run (`OUTPOST_ALERT_EVAL_MS`, default 5 s).
    pub eval_every: Duration,
    /// Longest pause between webhook retries (`OUTPOST_WEBHOOK_RETRY_MAX_MS`, default 5 min).
    pub retry_max: Duration,
    /// Give up on a notification after this long (default 24 h).
    pub give_up_after: Duration,
    /// How long an operator's log request waits for the node (default 20 s).
    pub log_wait: Duration,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        let env = |n: &str, d: u64| std::env::var(n).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
        Self {
            webhooks: Vec::new(),
            offline_alert: Duration::from_secs(300),
            eval_every: Duration::from_millis(env("OUTPOST_ALERT_EVAL_MS", 5000).max(50)),
            retry_max: Duration::from_millis(env("OUTPOST_WEBHOOK_RETRY_MAX_MS", 300_000).max(100)),
            give_up_after: Duration::from_secs(86_400),
            log_wait: Duration::from_secs(20),
        }
    }
}

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS alerts (
    node TEXT NOT NULL, name TEXT NOT NULL, subject TEXT NOT NULL, source TEXT NOT NULL,
    severity TEXT NOT NULL, state TEXT NOT NULL, started_at INTEGER NOT NULL, resolved_at INTEGER,
    summary TEXT NOT NULL, updated_at INTEGER NOT NULL, PRIMARY KEY (node, name, subject));
CREATE TABLE IF NOT EXISTS alert_seq (node TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS error_logs (
    node TEXT NOT NULL, seq INTEGER NOT NULL, at INTEGER NOT NULL, workload TEXT NOT NULL,
    container TEXT NOT NULL, line TEXT NOT NULL, received_at INTEGER NOT NULL, PRIMARY KEY (node, seq));
CREATE TABLE IF NOT EXISTS node_vitals (node TEXT PRIMARY KEY, vitals TEXT NOT NULL, received_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS node_conditions (node TEXT PRIMARY KEY, conditions TEXT NOT NULL, received_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS webhook_queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT, url TEXT NOT NULL, payload TEXT NOT NULL,
    attempts INTEGER NOT NULL, next_at INTEGER NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY, holder TEXT NOT NULL, token INTEGER NOT NULL, expires_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL);
";

/// One queued webhook delivery.
#[derive(Clone, Debug)]
pub struct QueuedHook {
    pub id: i64,
    pub url: String,
    pub payload: String,
    pub attempts: u32,
    pub created_at: UnixMs,
}

/// The monitoring tables. Each call is one short statement or transaction; async callers run
/// them on the blocking pool through [`SqliteMonitorStore`].
pub struct SqliteMonitor {
    conn: Mutex<Connection>,
    /// The webhook URLs every transition is queued for.
    webhooks: Vec<String>,
}

pub type R<T> = Result<T, rusqlite::Error>;

fn state_word(s: AlertState) -> &'static str {
    match s {
        AlertState::Firing => "Firing",
        AlertState::Resolved => "Resolved",
    }
}

/// The fleet alert a failed (or threshold-paused) rollout raises; its subject is the workload.
pub const ROLLOUT_FAILED: &str = "RolloutFailed";

/// The webhook body of a rollout event: `text` for Slack-style receivers, the event for
/// everyone else. See docs/rollouts.md.
pub fn rollout_payload(workload: &str, revision: u64, e: &RolloutEvent) -> serde_json::Value {
    serde_json::json!({
        "version": 1,
        "text": format!(":arrows_counterclockwise: [{}] {workload}: {}", e.reason, e.message),
        "status": "rollout",
        "event": {
            "workload": workload,
            "revision": revision,
            "reason": e.reason,
            "message": e.message,
            "at": e.at,
        },
    })
}

/// The webhook body: `text` for Slack-style receivers, the alert for everyone else. See
/// docs/alerts.md.
pub fn payload(a: &AlertInfo) -> serde_json::Value {
    let (icon, word) = match a.state {
        AlertState::Firing => (":red_circle:", "FIRING"),
        AlertState::Resolved => (":large_green_circle:", "RESOLVED"),
    };
    let subject = if a.subject.is_empty() {
        String::new()
    } else {
        format!(" ({})", a.subject)
    };
    serde_json::json!({
        "version": 1,
        "text": if a.node.is_empty() {
            // a fleet alert (RolloutFailed): about a workload, not a node
            format!("{icon} [{word}] {}{subject}: {}", a.name, a.summary)
        } else {
            format!("{icon} [{word}] {} on {}{subject}: {}", a.name, a.node, a.summary)
        },
        "status": word.to_ascii_lowercase(),
        "alert": a,
    })
}

impl SqliteMonitor {
    /// Open the monitoring tables in the hub's database file.
    pub fn open(path: &Path, webhooks: Vec<String>) -> Result<Self, rusqlite::Error> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        // Two connections share this file (store and monitoring): a deferred transaction that
        // reads, then writes after the other committed, fails at once with SQLITE_BUSY whatever
        // the busy timeout. Write transactions take the lock when they begin instead.
        conn.set_transaction_behavior(rusqlite::TransactionBehavior::Immediate);
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn: Mutex::new(conn),
            webhooks,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn enqueue(&self, tx: &Connection, a: &AlertInfo, now: UnixMs) -> R<()> {
        self.enqueue_payload(tx, &payload(a), now)
    }

    fn enqueue_payload(&self, tx: &Connection, payload: &serde_json::Value, now: UnixMs) -> R<()> {
        let body = payload.to_string();
        for url in &self.webhooks {
            tx.execute(
                "INSERT INTO webhook_queue (url, payload, attempts, next_at, created_at) VALUES (?1, ?2, 0, ?3, ?3)",
                params![url, body, now],
            )?;
        }
        Ok(())
    }

    fn current(tx: &Connection, k: &AlertKey) -> R<Option<(bool, UnixMs)>> {
        tx.query_row(
            "SELECT state, started_at FROM alerts WHERE node = ?1 AND name = ?2 AND subject = ?3",
            params![k.node, k.name, k.subject],
            |r| Ok((r.get::<_, String>(0)? == "Firing", r.get(1)?)),
        )
        .optional()
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        tx: &Connection,
        k: &AlertKey,
        source: &str,
        state: AlertState,
        started_at: UnixMs,
        resolved_at: Option<UnixMs>,
        summary: &str,
        labels: &Labels,
        now: UnixMs,
    ) -> R<AlertInfo> {
        tx.execute(
            "INSERT INTO alerts (node, name, subject, source, severity, state, started_at, resolved_at, summary, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT(node, name, subject) DO UPDATE SET source = excluded.source, state = excluded.state,
                started_at = excluded.started_at, resolved_at = excluded.resolved_at, summary = excluded.summary,
                updated_at = excluded.updated_at",
            params![
                k.node,
                k.name,
                k.subject,
                source,
                rules::severity(&k.name),
                state_word(state),
                started_at,
                resolved_at,
                summary,
                now
            ],
        )?;
        let a = AlertInfo {
            name: k.name.clone(),
            node: k.node.clone(),
            subject: k.subject.clone(),
            severity: rules::severity(&k.name).into(),
            state,
            source: source.into(),
            started_at,
            resolved_at,
            summary: summary.into(),
            labels: labels.clone(),
        };
        self.enqueue(tx, &a, now)?;
        Ok(a)
    }

    /// Record a status report's node alert events, vitals and conditions (`Some`: the node's
    /// complete list). Returns the transitions.
    pub fn node_report(
        &self,
        node: &str,
        labels: &Labels,
        events: &[NodeEvent],
        vitals: Option<&Vitals>,
        conditions: Option<&[NodeCondition]>,
        now: UnixMs,
    ) -> R<Vec<AlertInfo>> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        match conditions {
            Some([]) => {
                tx.execute("DELETE FROM node_conditions WHERE node = ?1", params![node])?;
            }
            Some(list) => {
                tx.execute(
                    "INSERT OR REPLACE INTO node_conditions (node, conditions, received_at) VALUES (?1, ?2, ?3)",
                    params![node, serde_json::to_string(list).expect("serializable"), now],
                )?;
            }
            None => {}
        }
        if let Some(v) = vitals {
            tx.execute(
                "INSERT OR REPLACE INTO node_vitals (node, vitals, received_at) VALUES (?1, ?2, ?3)",
                params![node, serde_json::to_string(v).expect("serializable"), now],
            )?;
        }
        let processed: u64 = tx
            .query_row("SELECT seq FROM alert_seq WHERE node = ?1", params![node], |r| {
                r.get::<_, i64>(0)
            })
            .optional()?
            .map_or(0, |s| s as u64);
        let mut out = Vec::new();
        let mut high = processed;
        for e in events
            .iter()
            .filter(|e| e.reason == ALERT_FIRING || e.reason == ALERT_RESOLVED)
        {
            let (name, summary) = e.message.split_once(": ").unwrap_or((e.message.as_str(), ""));
            let key = AlertKey {
                node: node.into(),
                name: name.into(),
                subject: e.workload.clone().unwrap_or_default(),
            };
            let cur = Self::current(&tx, &key)?;
            let firing = e.reason == ALERT_FIRING;
            match rules::on_node_event(firing, e.seq, processed, cur.map(|c| c.0)) {
                NodeEventAction::Fire => {
                    out.push(self.write(&tx, &key, "node", AlertState::Firing, e.at, None, summary, labels, now)?)
                }
                NodeEventAction::Resolve => {
                    let started = cur.map_or(e.at, |c| c.1);
                    out.push(self.write(
                        &tx,
                        &key,
                        "node",
                        AlertState::Resolved,
                        started,
                        Some(e.at),
                        summary,
                        labels,
                        now,
                    )?)
                }
                NodeEventAction::Ignore => {}
            }
            high = high.max(e.seq);
        }
        if high > processed {
            tx.execute(
                "INSERT OR REPLACE INTO alert_seq (node, seq) VALUES (?1, ?2)",
                params![node, high as i64],
            )?;
        }
        tx.commit()?;
        Ok(out)
    }

    /// Record a rollout's events and its `RolloutFailed` alert change, in one transaction:
    /// one webhook row per URL for each event and for the alert transition. Returns the alert
    /// transitions (none or one).
    pub fn rollout_events(
        &self,
        workload: &str,
        revision: u64,
        events: &[RolloutEvent],
        alert: Option<&AlertChange>,
        now: UnixMs,
    ) -> R<Vec<AlertInfo>> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let out = self.rollout_events_in(&tx, workload, revision, events, alert, now)?;
        tx.commit()?;
        Ok(out)
    }

    /// Store a rollout with its events and alert change ([`Self::rollout_events`]) in one
    /// transaction, refused when `fence` is not current.
    pub fn record_rollout(
        &self,
        r: &Rollout,
        events: &[RolloutEvent],
        alert: Option<&AlertChange>,
        fence: Option<&Fence>,
        now: UnixMs,
    ) -> Result<Vec<AlertInfo>, MonitorError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        check_fence(&tx, fence)?;
        tx.execute(
            "INSERT INTO rollouts (workload, revision, state, updated_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(workload) DO UPDATE SET revision = excluded.revision, state = excluded.state,
                updated_at = excluded.updated_at",
            params![r.workload, r.revision as i64, serde_json::to_string(r)?, r.updated_at],
        )?;
        let out = if events.is_empty() && alert.is_none() {
            Vec::new()
        } else {
            self.rollout_events_in(&tx, &r.workload, r.revision, events, alert, now)?
        };
        tx.commit()?;
        Ok(out)
    }

    fn rollout_events_in(
        &self,
        tx: &Connection,
        workload: &str,
        revision: u64,
        events: &[RolloutEvent],
        alert: Option<&AlertChange>,
        now: UnixMs,
    ) -> R<Vec<AlertInfo>> {
        for e in events {
            self.enqueue_payload(tx, &rollout_payload(workload, revision, e), now)?;
        }
        let key = AlertKey {
            node: String::new(),
            name: ROLLOUT_FAILED.into(),
            subject: workload.into(),
        };
        Ok(match alert {
            Some(change) => {
                let resolved = format!("{workload}: a new rollout, resume or undo cleared it");
                self.fleet_transition(tx, &key, "rollout", change, resolved, now)?
            }
            None => Vec::new(),
        })
    }

    /// Fire or resolve a fleet alert about a subject that is not a node (a GitRepo), with its
    /// webhook rows, in one transaction. Returns the transition (none when nothing changes).
    pub fn fleet_alert(
        &self,
        name: &str,
        subject: &str,
        source: &str,
        change: &AlertChange,
        now: UnixMs,
    ) -> R<Vec<AlertInfo>> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let key = AlertKey {
            node: String::new(),
            name: name.into(),
            subject: subject.into(),
        };
        let out = self.fleet_transition(&tx, &key, source, change, format!("{subject}: recovered"), now)?;
        tx.commit()?;
        Ok(out)
    }

    /// Fire a fleet alert (no node) that is not firing, or resolve one that is, inside `tx`;
    /// the transition written, if any.
    fn fleet_transition(
        &self,
        tx: &Connection,
        key: &AlertKey,
        source: &str,
        change: &AlertChange,
        resolved_summary: String,
        now: UnixMs,
    ) -> R<Vec<AlertInfo>> {
        let cur = Self::current(tx, key)?;
        let labels = Labels::new();
        let firing = cur.map(|c| c.0) == Some(true);
        Ok(match change {
            AlertChange::Fire(summary) if !firing => {
                vec![self.write(tx, key, source, AlertState::Firing, now, None, summary, &labels, now)?]
            }
            AlertChange::Resolve if firing => {
                let started = cur.map_or(now, |c| c.1);
                vec![self.write(
                    tx,
                    key,
                    source,
                    AlertState::Resolved,
                    started,
                    Some(now),
                    &resolved_summary,
                    &labels,
                    now,
                )?]
            }
            _ => Vec::new(),
        })
    }

    /// Each node's conditions as it last reported them (nodes without any are absent).
    pub fn conditions(&self, node: Option<&str>) -> R<BTreeMap<String, Vec<NodeCondition>>> {
        let c = self.lock();
        let mut st = c.prepare("SELECT node, conditions FROM node_conditions WHERE ?1 IS NULL OR node = ?1")?;
        let rows = st.query_map(params![node], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (n, json) = row?;
            if let Ok(list) = serde_json::from_str(&json) {
                out.insert(n, list);
            }
        }
        Ok(out)
    }

    /// Hub-sourced alerts firing now.
    pub fn firing_hub_alerts(&self) -> R<BTreeSet<AlertKey>> {
        let c = self.lock();
        let mut st = c.prepare("SELECT node, name, subject FROM alerts WHERE source = 'hub' AND state = 'Firing'")?;
        let rows = st.query_map([], |r| {
            Ok(AlertKey {
                node: r.get(0)?,
                name: r.get(1)?,
                subject: r.get(2)?,
            })
        })?;
        rows.collect()
    }

    /// Apply the hub rules' transitions (one transaction), with each node's labels.
    pub fn apply_hub(
        &self,
        ts: &[HubTransition],
        labels: &BTreeMap<String, Labels>,
        fence: Option<&Fence>,
        now: UnixMs,
    ) -> Result<Vec<AlertInfo>, MonitorError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        check_fence(&tx, fence)?;
        let mut out = Vec::new();
        let empty = Labels::new();
        for t in ts {
            match t {
                HubTransition::Fire { key, alert } => {
                    let l = labels.get(&key.node).unwrap_or(&empty);
                    out.push(self.write(
                        &tx,
                        key,
                        "hub",
                        AlertState::Firing,
                        alert.started_at,
                        None,
                        &alert.summary,
                        l,
                        now,
                    )?);
                }
                HubTransition::Resolve { key, at } => {
                    let l = labels.get(&key.node).unwrap_or(&empty);
                    let (_, started) = Self::current(&tx, key)?.unwrap_or((true, *at));
                    let summary = match key.name.as_str() {
                        rules::NODE_OFFLINE => format!("{} is back", key.node),
                        _ => format!("{} recovered on {}", key.subject, key.node),
                    };
                    out.push(self.write(
                        &tx,
                        key,
                        "hub",
                        AlertState::Resolved,
                        started,
                        Some(*at),
                        &summary,
                        l,
                        now,
                    )?);
                }
            }
        }
        tx.execute(
            "DELETE FROM alerts WHERE state = 'Resolved' AND updated_at < ?1",
            params![now - RESOLVED_KEPT_MS],
        )?;
        tx.commit()?;
        Ok(out)
    }

    /// Forget resolved alerts older than 7 days; returns how many went.
    pub fn prune(&self, fence: Option<&Fence>, now: UnixMs) -> Result<usize, MonitorError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        check_fence(&tx, fence)?;
        let n = tx.execute(
            "DELETE FROM alerts WHERE state = 'Resolved' AND updated_at < ?1",
            params![now - RESOLVED_KEPT_MS],
        )?;
        tx.commit()?;
        Ok(n)
    }

    /// Alerts, firing first then newest; resolved ones only with `all`.
    pub fn alerts(&self, all: bool) -> R<Vec<AlertInfo>> {
        let c = self.lock();
        let mut st = c.prepare(
            "SELECT node, name, subject, source, severity, state, started_at, resolved_at, summary FROM alerts
             WHERE ?1 OR state = 'Firing' ORDER BY state, started_at DESC",
        )?;
        let rows = st.query_map(params![all], |r| {
            Ok(AlertInfo {
                node: r.get(0)?,
                name: r.get(1)?,
                subject: r.get(2)?,
                source: r.get(3)?,
                severity: r.get(4)?,
                state: if r.get::<_, String>(5)? == "Firing" {
                    AlertState::Firing
                } else {
                    AlertState::Resolved
                },
                started_at: r.get(6)?,
                resolved_at: r.get(7)?,
                summary: r.get(8)?,
                labels: Labels::new(),
            })
        })?;
        rows.collect()
    }

    /// Store forwarded error lines; returns the highest sequence stored for the node, and how
    /// many lines were new.
    pub fn store_errors(&self, node: &str, b: &ErrorBatch, now: UnixMs) -> R<(u64, u64)> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let mut added = 0u64;
        for l in &b.lines {
            added += tx.execute(
                "INSERT OR IGNORE INTO error_logs (node, seq, at, workload, container, line, received_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![node, l.seq as i64, l.at, l.workload, l.container, l.line, now],
            )? as u64;
        }
        let high: Option<i64> =
            tx.query_row("SELECT MAX(seq) FROM error_logs WHERE node = ?1", params![node], |r| {
                r.get(0)
            })?;
        let high = high.unwrap_or(0);
        tx.execute(
            "DELETE FROM error_logs WHERE node = ?1 AND seq <= ?2",
            params![node, high - ERRORS_KEPT],
        )?;
        tx.commit()?;
        // The acknowledgement covers the whole batch: lines pruned or stored before count too.
        Ok((b.lines.iter().map(|l| l.seq).max().unwrap_or(0).max(high as u64), added))
    }

    pub fn errors(
        &self,
        node: Option<&str>,
        workload: Option<&str>,
        since: UnixMs,
        limit: u32,
    ) -> R<Vec<StoredErrorLine>> {
        let c = self.lock();
        let mut st = c.prepare(
            "SELECT node, seq, at, workload, container, line FROM error_logs
             WHERE (?1 IS NULL OR node = ?1) AND (?2 IS NULL OR workload = ?2) AND at >= ?3
             ORDER BY at DESC, node, seq DESC LIMIT ?4",
        )?;
        let rows = st.query_map(params![node, workload, since, limit], |r| {
            Ok(StoredErrorLine {
                node: r.get(0)?,
                line: outpost_api::ErrorLine {
                    seq: r.get::<_, i64>(1)? as u64,
                    at: r.get(2)?,
                    workload: r.get(3)?,
                    container: r.get(4)?,
                    line: r.get(5)?,
                },
            })
        })?;
        let mut out: Vec<StoredErrorLine> = rows.collect::<R<_>>()?;
        out.reverse();
        Ok(out)
    }

    pub fn vitals(&self) -> R<BTreeMap<String, Vitals>> {
        let c = self.lock();
        let mut st = c.prepare("SELECT node, vitals FROM node_vitals")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (n, v) = row?;
            if let Ok(v) = serde_json::from_str(&v) {
                out.insert(n, v);
            }
        }
        Ok(out)
    }

    /// Deliveries due at `now`, oldest first.
    pub fn due_hooks(&self, now: UnixMs, limit: u32) -> R<Vec<QueuedHook>> {
        let c = self.lock();
        let mut st = c.prepare(
            "SELECT id, url, payload, attempts, created_at FROM webhook_queue WHERE next_at <= ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = st.query_map(params![now, limit], |r| {
            Ok(QueuedHook {
                id: r.get(0)?,
                url: r.get(1)?,
                payload: r.get(2)?,
                attempts: r.get(3)?,
                created_at: r.get(4)?,
            })
        })?;
        rows.collect()
    }

    /// Earliest next attempt, and the queue length.
    pub fn hook_queue(&self) -> R<(Option<UnixMs>, u64)> {
        self.lock()
            .query_row("SELECT MIN(next_at), COUNT(*) FROM webhook_queue", [], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? as u64))
            })
    }

    /// Claim the deliveries due at `now` (oldest first) as the holder of `fence`: refused when
    /// the fence is not current.
    pub fn claim_hooks(&self, now: UnixMs, limit: u32, fence: Option<&Fence>) -> Result<Vec<QueuedHook>, MonitorError> {
        {
            let c = self.lock();
            check_fence(&c, fence)?;
        }
        Ok(self.due_hooks(now, limit)?)
    }

    /// A delivery is done (delivered or given up): its row goes, under `fence`.
    pub fn hook_done(&self, id: i64, fence: Option<&Fence>) -> Result<(), MonitorError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        check_fence(&tx, fence)?;
        tx.execute("DELETE FROM webhook_queue WHERE id = ?1", params![id])?;
        tx.commit()?;
        Ok(())
    }

    /// Schedule another attempt; later notifications to the same URL wait behind it (order).
    pub fn hook_retry(
        &self,
        id: i64,
        url: &str,
        attempts: u32,
        next_at: UnixMs,
        fence: Option<&Fence>,
    ) -> Result<(), MonitorError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        check_fence(&tx, fence)?;
        tx.execute(
            "UPDATE webhook_queue SET attempts = ?2, next_at = ?3 WHERE id = ?1",
            params![id, attempts, next_at],
        )?;
        tx.execute(
            "UPDATE webhook_queue SET next_at = MAX(next_at, ?2) WHERE url = ?3 AND id > ?1",
            params![id, next_at, url],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Take or renew the lease `name` for `me` (see `outpost_core::lease`): the row written,
    /// or `None` when another holds it. A conditional UPDATE on the row read decides races. On
    /// SQLite (one process per file) a lease held by another holder is taken at once.
    pub fn lease_acquire(&self, name: &str, me: &str, now: UnixMs, t: &Timing) -> Result<Option<Lease>, MonitorError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let row = lease_row(&tx, name)?;
        // One hub process per SQLite file: a row held by another holder is its predecessor's,
        // killed before it could renew, so it counts as expired (a restarted hub does not
        // wait out the old lease). The token still grows with the change of holder.
        let seen_at = row.as_ref().map_or(now, |r| now.max(r.expires_at));
        let won = match lease::claim(row.as_ref(), me, seen_at, t) {
            Claim::Busy { .. } => None,
            Claim::Take(new) => {
                let new = Lease {
                    expires_at: now + t.period_ms,
                    ..new
                };
                let n = match &row {
                    None => tx.execute(
                        "INSERT INTO leases (name, holder, token, expires_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT(name) DO NOTHING",
                        params![name, new.holder, new.token as i64, new.expires_at, now],
                    )?,
                    Some(old) => tx.execute(
                        "UPDATE leases SET holder = ?2, token = ?3, expires_at = ?4, updated_at = ?5
                         WHERE name = ?1 AND holder = ?6 AND token = ?7 AND expires_at = ?8",
                        params![
                            name,
                            new.holder,
                            new.token as i64,
                            new.expires_at,
                            now,
                            old.holder,
                            old.token as i64,
                            old.expires_at
                        ],
                    )?,
                };
                (n == 1).then_some(new)
            }
        };
        tx.commit()?;
        Ok(won)
    }

    /// Every lease row, by name.
    pub fn leases(&self) -> R<Vec<(String, Lease)>> {
        let c = self.lock();
        let mut st = c.prepare("SELECT name, holder, token, expires_at FROM leases ORDER BY name")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                Lease {
                    holder: r.get(1)?,
                    token: r.get::<_, i64>(2)? as u64,
                    expires_at: r.get(3)?,
                },
            ))
        })?;
        rows.collect()
    }

    /// Delete object revisions past the last `keep` that nothing uses
    /// (`outpost_core::retention::revisions_to_prune`), under `fence`; how many went.
    pub fn prune_revisions(&self, keep: usize, fence: Option<&Fence>) -> Result<usize, MonitorError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        check_fence(&tx, fence)?;
        let quad = |r: &rusqlite::Row<'_>| -> R<RevisionRow> { Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)) };
        let stored: Vec<RevisionRow> = tx
            .prepare("SELECT kind, namespace, name, revision FROM revisions")?
            .query_map([], quad)?
            .collect::<R<_>>()?;
        let in_use: Vec<RevisionRow> = tx
            .prepare(
                "SELECT kind, namespace, name, revision FROM objects
                 UNION ALL SELECT '', '', key, revision FROM node_workloads",
            )?
            .query_map([], quad)?
            .collect::<R<_>>()?;
        let docs: Vec<String> = tx
            .prepare("SELECT spec FROM node_prefetch UNION ALL SELECT state FROM rollouts")?
            .query_map([], |r| r.get(0))?
            .collect::<R<_>>()?;
        let gone = revisions_to_drop(stored, in_use, &docs, keep);
        for (key, rev) in &gone {
            let mut parts = key.splitn(3, '/');
            let (k, ns, n) = (parts.next(), parts.next(), parts.next());
            tx.execute(
                "DELETE FROM revisions WHERE lower(kind) = ?1 AND namespace = ?2 AND name = ?3 AND revision = ?4",
                params![k, ns, n, *rev as i64],
            )?;
        }
        // Specs no node refers to any more (plans commit on the store's connection; SQLite
        // runs one write transaction at a time).
        tx.execute(
            "DELETE FROM specs WHERE addr NOT IN (SELECT spec_addr FROM node_workloads WHERE spec_addr IS NOT NULL)",
            [],
        )?;
        tx.commit()?;
        Ok(gone.len())
    }

    /// Compaction after a retention run: `PRAGMA optimize` and giving back free pages when the
    /// file allows it (`auto_vacuum = INCREMENTAL`; a no-op otherwise).
    pub fn compact(&self) -> R<()> {
        let c = self.lock();
        c.execute_batch("PRAGMA optimize; PRAGMA incremental_vacuum;")
    }

    pub fn forget_node(&self, node: &str) -> R<()> {
        let c = self.lock();
        for t in ["alerts", "alert_seq", "error_logs", "node_vitals", "node_conditions"] {
            c.execute(&format!("DELETE FROM {t} WHERE node = ?1"), params![node])?;
        }
        Ok(())
    }
}

/// `(kind, namespace, name, revision)` as the revision queries of both backends read them
/// (node rows: `('', '', key, revision)`).
pub(crate) type RevisionRow = (String, String, String, i64);

/// The revisions a retention run deletes, from what both backends read: every stored revision,
/// the revisions objects and nodes use, and the rollout/prefetch documents that name more
/// (`outpost_core::retention::revisions_to_prune` decides).
pub(crate) fn revisions_to_drop(
    stored: Vec<RevisionRow>,
    in_use: Vec<RevisionRow>,
    docs: &[String],
    keep: usize,
) -> Vec<(String, u64)> {
    let mut revisions: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (k, ns, n, rev) in stored {
        revisions.entry(object_key(&k, &ns, &n)).or_default().push(rev as u64);
    }
    let mut used = BTreeSet::new();
    for (k, ns, n, rev) in in_use {
        let key = if k.is_empty() { n } else { object_key(&k, &ns, &n) };
        used.insert((key, rev as u64));
    }
    for json in docs {
        used.extend(revisions_named(json));
    }
    retention::revisions_to_prune(&revisions, &used, keep)
}

/// A revision's object key as rollouts and node rows name it (`daemonset/default/web`).
pub(crate) fn object_key(kind: &str, namespace: &str, name: &str) -> String {
    format!("{}/{namespace}/{name}", kind.to_ascii_lowercase())
}

/// The `(workload key, revision)` pairs a stored rollout or prefetch spec (JSON) refers to.
pub(crate) fn revisions_named(json: &str) -> Vec<(String, u64)> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    let key = v["workload"]
        .as_str()
        .or(v["key"].as_str())
        .unwrap_or_default()
        .to_string();
    let mut out: Vec<u64> = [&v["revision"], &v["previous"]]
        .iter()
        .filter_map(|r| r.as_u64())
        .collect();
    if let Some(from) = v["from"].as_object() {
        out.extend(from.values().filter_map(|r| r.as_u64()));
    }
    out.into_iter().map(|r| (key.clone(), r)).collect()
}

fn lease_row(c: &Connection, name: &str) -> R<Option<Lease>> {
    c.query_row(
        "SELECT holder, token, expires_at FROM leases WHERE name = ?1",
        params![name],
        |r| {
            Ok(Lease {
                holder: r.get(0)?,
                token: r.get::<_, i64>(1)? as u64,
                expires_at: r.get(2)?,
            })
        },
    )
    .optional()
}

/// Refuse (inside the caller's transaction) a write whose fence is not current.
fn check_fence(c: &Connection, fence: Option<&Fence>) -> Result<(), MonitorError> {
    let Some(f) = fence else { return Ok(()) };
    let row = lease_row(c, &f.lease)?;
    if lease::fence_holds(row.as_ref().map(|l| (l.holder.as_str(), l.token)), f) {
        Ok(())
    } else {
        Err(MonitorError::Fenced {
            lease: f.lease.clone(),
            token: f.token,
        })
    }
}

/// What the monitoring store and the lease/retention calls fail with.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("monitoring database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("monitoring tables on PostgreSQL: {0}")]
    Pg(#[from] sqlx::Error),
    #[error("stored monitoring data is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("monitoring task failed: {0}")]
    Task(String),
    /// The write came from a holder whose lease moved on; nothing was written.
    #[error("lease {lease} moved on to another holder (this replica held token {token}); the write was refused and this replica stops acting for it")]
    Fenced { lease: String, token: u64 },
}

impl MonitorError {
    pub fn is_fenced(&self) -> bool {
        matches!(self, MonitorError::Fenced { .. })
    }
}

impl From<MonitorError> for crate::error::HubError {
    fn from(e: MonitorError) -> Self {
        use crate::error::HubError;
        match e {
            MonitorError::Sqlite(e) if crate::error::is_disk_full(&e) => HubError::DiskFull,
            MonitorError::Pg(sqlx::Error::Database(d)) if d.code().as_deref() == Some("53100") => HubError::DiskFull,
            MonitorError::Pg(sqlx::Error::PoolTimedOut) => HubError::StoreBusy,
            e => HubError::Internal(e.to_string()),
        }
    }
}

pub type MonitorResult<T> = Result<T, MonitorError>;

/// What the hub keeps for monitoring (alert state and history, vitals, conditions, error
/// lines, the webhook outbox and its delivery bookkeeping), the controllers' leases and the
/// retention of object revisions, on either backend: [`SqliteMonitorStore`] (the `hub.db`
/// file) or `crate::store::PgMonitor` (the PostgreSQL store's database). Every `fence`d call
/// is refused with [`MonitorError::Fenced`], in its own transaction, when the fence is not
/// current (`None`: a write not made as a lease holder, e.g. an operator's command).
#[async_trait::async_trait]
pub trait MonitorStore: Send + Sync {
    async fn node_report(
        &self,
        node: &str,
        labels: &Labels,
        events: &[NodeEvent],
        vitals: Option<&Vitals>,
        conditions: Option<&[NodeCondition]>,
        now: UnixMs,
    ) -> MonitorResult<Vec<AlertInfo>>;
    /// Store a rollout with its events' webhook rows and its alert change, in one transaction.
    async fn record_rollout(
        &self,
        r: &Rollout,
        events: &[RolloutEvent],
        alert: Option<&AlertChange>,
        fence: Option<&Fence>,
        now: UnixMs,
    ) -> MonitorResult<Vec<AlertInfo>>;
    async fn fleet_alert(
        &self,
        name: &str,
        subject: &str,
        source: &str,
        change: &AlertChange,
        now: UnixMs,
    ) -> MonitorResult<Vec<AlertInfo>>;
    async fn conditions(&self, node: Option<&str>) -> MonitorResult<BTreeMap<String, Vec<NodeCondition>>>;
    async fn firing_hub_alerts(&self) -> MonitorResult<BTreeSet<AlertKey>>;
    async fn apply_hub(
        &self,
        ts: &[HubTransition],
        labels: &BTreeMap<String, Labels>,
        fence: Option<&Fence>,
        now: UnixMs,
    ) -> MonitorResult<Vec<AlertInfo>>;
    async fn prune(&self, fence: Option<&Fence>, now: UnixMs) -> MonitorResult<usize>;
    async fn alerts(&self, all: bool) -> MonitorResult<Vec<AlertInfo>>;
    async fn store_errors(&self, node: &str, b: &ErrorBatch, now: UnixMs) -> MonitorResult<(u64, u64)>;
    async fn errors(
        &self,
        node: Option<&str>,
        workload: Option<&str>,
        since: UnixMs,
        limit: u32,
    ) -> MonitorResult<Vec<StoredErrorLine>>;
    async fn vitals(&self) -> MonitorResult<BTreeMap<String, Vitals>>;
    async fn claim_hooks(&self, now: UnixMs, limit: u32, fence: Option<&Fence>) -> MonitorResult<Vec<QueuedHook>>;
    async fn hook_queue(&self) -> MonitorResult<(Option<UnixMs>, u64)>;
    async fn hook_done(&self, id: i64, fence: Option<&Fence>) -> MonitorResult<()>;
    async fn hook_retry(
        &self,
        id: i64,
        url: &str,
        attempts: u32,
        next_at: UnixMs,
        fence: Option<&Fence>,
    ) -> MonitorResult<()>;
    async fn forget_node(&self, node: &str) -> MonitorResult<()>;
    async fn lease_acquire(&self, name: &str, me: &str, now: UnixMs, t: &Timing) -> MonitorResult<Option<Lease>>;
    async fn leases(&self) -> MonitorResult<Vec<(String, Lease)>>;
    async fn prune_revisions(&self, keep: usize, fence: Option<&Fence>) -> MonitorResult<usize>;
    async fn compact(&self) -> MonitorResult<()>;
}

/// [`MonitorStore`] on the `hub.db` file: [`SqliteMonitor`]'s calls on the blocking pool.
#[derive(Clone)]
pub struct SqliteMonitorStore(pub Arc<SqliteMonitor>);

macro_rules! blocking {
    ($self:ident, $m:ident => $body:expr) => {{
        let $m = $self.0.clone();
        tokio::task::spawn_blocking(move || -> MonitorResult<_> { Ok($body?) })
            .await
            .map_err(|e| MonitorError::Task(e.to_string()))?
    }};
}

#[async_trait::async_trait]
impl MonitorStore for SqliteMonitorStore {
    async fn node_report(
        &self,
        node: &str,
        labels: &Labels,
        events: &[NodeEvent],
        vitals: Option<&Vitals>,
        conditions: Option<&[NodeCondition]>,
        now: UnixMs,
    ) -> MonitorResult<Vec<AlertInfo>> {
        let (n, l, e, v, c) = (
            node.to_string(),
            labels.clone(),
            events.to_vec(),
            vitals.cloned(),
            conditions.map(|c| c.to_vec()),
        );
        blocking!(self, m => m.node_report(&n, &l, &e, v.as_ref(), c.as_deref(), now))
    }
    async fn record_rollout(
        &self,
        r: &Rollout,
        events: &[RolloutEvent],
        alert: Option<&AlertChange>,
        fence: Option<&Fence>,
        now: UnixMs,
    ) -> MonitorResult<Vec<AlertInfo>> {
        let (r, e, a, f) = (r.clone(), events.to_vec(), alert.cloned(), fence.cloned());
        blocking!(self, m => m.record_rollout(&r, &e, a.as_ref(), f.as_ref(), now))
    }
    async fn fleet_alert(
        &self,
        name: &str,
        subject: &str,
        source: &str,
        change: &AlertChange,
        now: UnixMs,
    ) -> MonitorResult<Vec<AlertInfo>> {
        let (n, s, src, c) = (
            name.to_string(),
            subject.to_string(),
            source.to_string(),
            change.clone(),
        );
        blocking!(self, m => m.fleet_alert(&n, &s, &src, &c, now))
    }
    async fn conditions(&self, node: Option<&str>) -> MonitorResult<BTreeMap<String, Vec<NodeCondition>>> {
        let n = node.map(String::from);
        blocking!(self, m => m.conditions(n.as_deref()))
    }
    async fn firing_hub_alerts(&self) -> MonitorResult<BTreeSet<AlertKey>> {
        blocking!(self, m => m.firing_hub_alerts())
    }
    async fn apply_hub(
        &self,
        ts: &[HubTransition],
        labels: &BTreeMap<String, Labels>,
        fence: Option<&Fence>,
        now: UnixMs,
    ) -> MonitorResult<Vec<AlertInfo>> {
        let (ts, l, f) = (ts.to_vec(), labels.clone(), fence.cloned());
        blocking!(self, m => m.apply_hub(&ts, &l, f.as_ref(), now))
    }
    async fn prune(&self, fence: Option<&Fence>, now: UnixMs) -> MonitorResult<usize> {
        let f = fence.cloned();
        blocking!(self, m => m.prune(f.as_ref(), now))
    }
    async fn alerts(&self, all: bool) -> MonitorResult<Vec<AlertInfo>> {
        blocking!(self, m => m.alerts(all))
    }
    async fn store_errors(&self, node: &str, b: &ErrorBatch, now: UnixMs) -> MonitorResult<(u64, u64)> {
        let (n, b) = (node.to_string(), b.clone());
        blocking!(self, m => m.store_errors(&n, &b, now))
    }
    async fn errors(
        &self,
        node: Option<&str>,
        workload: Option<&str>,
        since: UnixMs,
        limit: u32,
    ) -> MonitorResult<Vec<StoredErrorLine>> {
        let (n, w) = (node.map(String::from), workload.map(String::from));
        blocking!(self, m => m.errors(n.as_deref(), w.as_deref(), since, limit))
    }
    async fn vitals(&self) -> MonitorResult<BTreeMap<String, Vitals>> {
        blocking!(self, m => m.vitals())
    }
    async fn claim_hooks(&self, now: UnixMs, limit: u32, fence: Option<&Fence>) -> MonitorResult<Vec<QueuedHook>> {
        let f = fence.cloned();
        blocking!(self, m => m.claim_hooks(now, limit, f.as_ref()))
    }
    async fn hook_queue(&self) -> MonitorResult<(Option<UnixMs>, u64)> {
        blocking!(self, m => m.hook_queue())
    }
    async fn hook_done(&self, id: i64, fence: Option<&Fence>) -> MonitorResult<()> {
        let f = fence.cloned();
        blocking!(self, m => m.hook_done(id, f.as_ref()))
    }
    async fn hook_retry(
        &self,
        id: i64,
        url: &str,
        attempts: u32,
        next_at: UnixMs,
        fence: Option<&Fence>,
    ) -> MonitorResult<()> {
        let (u, f) = (url.to_string(), fence.cloned());
        blocking!(self, m => m.hook_retry(id, &u, attempts, next_at, f.as_ref()))
    }
    async fn forget_node(&self, node: &str) -> MonitorResult<()> {
        let n = node.to_string();
        blocking!(self, m => m.forget_node(&n))
    }
    async fn lease_acquire(&self, name: &str, me: &str, now: UnixMs, t: &Timing) -> MonitorResult<Option<Lease>> {
        let (n, me, t) = (name.to_string(), me.to_string(), *t);
        blocking!(self, m => m.lease_acquire(&n, &me, now, &t))
    }
    async fn leases(&self) -> MonitorResult<Vec<(String, Lease)>> {
        blocking!(self, m => m.leases())
    }
    async fn prune_revisions(&self, keep: usize, fence: Option<&Fence>) -> MonitorResult<usize> {
        let f = fence.cloned();
        blocking!(self, m => m.prune_revisions(keep, f.as_ref()))
    }
    async fn compact(&self) -> MonitorResult<()> {
        blocking!(self, m => m.compact())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, at: i64, firing: bool, msg: &str, wl: Option<&str>) -> NodeEvent {
        NodeEvent {
            seq,
            at,
            workload: wl.map(String::from),
            reason: if firing { ALERT_FIRING } else { ALERT_RESOLVED }.into(),
            message: msg.into(),
        }
    }

    #[test]
    fn rollout_events_queue_webhooks_and_raise_one_alert() {
        let dir = tempfile::tempdir().unwrap();
        let m = SqliteMonitor::open(&dir.path().join("hub.db"), vec!["http://a".into()]).unwrap();
        let ev = |reason: &str| RolloutEvent {
            at: 5,
            reason: reason.into(),
            message: format!("{reason} message"),
        };
        let w = "daemonset/default/web";
        let fire = AlertChange::Fire("revision 7 failed: node a: exited".into());
        let out = m
            .rollout_events(w, 7, &[ev("RolloutFailed"), ev("RolloutRolledBack")], Some(&fire), 10)
            .unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].name.as_str(), out[0].node.as_str(), out[0].subject.as_str()),
            (ROLLOUT_FAILED, "", w)
        );
        assert_eq!(out[0].severity, "critical");
        // firing again is no new transition; the events still go out
        assert!(m
            .rollout_events(w, 7, &[ev("WaveStarted")], Some(&fire), 11)
            .unwrap()
            .is_empty());
        let hooks = m.due_hooks(100, 10).unwrap();
        let bodies: Vec<serde_json::Value> = hooks
            .iter()
            .map(|h| serde_json::from_str(&h.payload).unwrap())
            .collect();
        let reasons: Vec<&str> = bodies.iter().filter_map(|b| b["event"]["reason"].as_str()).collect();
        assert_eq!(reasons, ["RolloutFailed", "RolloutRolledBack", "WaveStarted"]);
        assert_eq!(bodies[0]["status"], "rollout");
        assert!(bodies[0]["text"]
            .as_str()
            .unwrap()
            .contains("[RolloutFailed] daemonset/default/web"));
        assert_eq!(
            bodies.iter().filter(|b| b["alert"]["name"] == ROLLOUT_FAILED).count(),
            1
        );
        // the next rollout clears it, once
        let out = m.rollout_events(w, 8, &[], Some(&AlertChange::Resolve), 20).unwrap();
        assert_eq!((out.len(), out[0].state), (1, AlertState::Resolved));
        assert!(m
            .rollout_events(w, 8, &[], Some(&AlertChange::Resolve), 21)
            .unwrap()
            .is_empty());
        // hub rules never touch it (their source is "hub")
        assert!(m.firing_hub_alerts().unwrap().is_empty());
    }

    #[test]
    fn node_events_dedup_and_enqueue_one_webhook_per_transition() {
        let dir = tempfile::tempdir().unwrap();
        let m = SqliteMonitor::open(&dir.path().join("hub.db"), vec!["http://a".into(), "http://b".into()]).unwrap();
        let l = Labels::new();
        let batch = vec![
            ev(1, 100, true, "NodeCpuHigh: CPU 95% > 90%", None),
            ev(2, 200, true, "WorkloadCrashLoop: x", Some("daemonset/default/x")),
            ev(3, 300, false, "NodeCpuHigh: CPU back", None),
        ];
        let t = m.node_report("n", &l, &batch, None, None, 1000).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(
            m.node_report("n", &l, &batch, None, None, 2000).unwrap().len(),
            0,
            "resent batch"
        );
        let all = m.alerts(true).unwrap();
        let cpu = all.iter().find(|a| a.name == "NodeCpuHigh").unwrap();
        assert_eq!(
            (cpu.state, cpu.started_at, cpu.resolved_at),
            (AlertState::Resolved, 100, Some(300))
        );
        assert_eq!(m.alerts(false).unwrap().len(), 1, "only the crash loop fires");
        assert_eq!(m.hook_queue().unwrap().1, 6, "3 transitions x 2 URLs");
        let hooks = m.due_hooks(1000, 10).unwrap();
        let first: serde_json::Value = serde_json::from_str(&hooks[0].payload).unwrap();
        assert_eq!(first["status"], "firing");
        assert_eq!(first["alert"]["started_at"], 100, "original node timestamp");
        assert!(first["text"].as_str().unwrap().contains("[FIRING] NodeCpuHigh on n"));
    }
}
