//! Exec sessions across hub replicas on one PostgreSQL database (docs/exec.md, "Across
//! replicas"): the session rows (`exec_sessions`) and the frame batches between the operator's
//! replica and the node's (`exec_frames`). The rules (order, acknowledgement, window, when a
//! session is dead) are `outpost_core::exec_relay`'s; this module only reads and writes rows.
//!
//! - A session row is parked for its node (`taken` false) until a replica holding the node's
//!   long-poll hands it out ([`Shared::exec_take`], once). Attaching a stream checks the node
//!   and that the stream is not open yet ([`Shared::exec_attach`]).
//! - A batch is stored by one statement that bumps the session's counter for that direction and
//!   inserts the batch under that number ([`Shared::exec_store`]): the row lock the counter takes
//!   makes batches visible in their order, and a batch for a session that is gone (or, for
//!   input, of another owner) is stored nowhere.
//! - Acknowledging deletes the batches up to a number ([`Shared::exec_ack`]); ending a session
//!   deletes its row, and its batches with it (`ON DELETE CASCADE`).
//! - A notification on [`EXEC_CHANNEL`] carries only the session id; readers re-read on it and
//!   on their fallback poll, so one lost costs at most `outpost_core::exec_relay::POLL_MS`.

use std::collections::HashMap;

use outpost_api::UnixMs;
use outpost_core::exec_relay::SessionView;

use super::notify::Shared;
use super::{u, Result};

/// The channel whose notifications name an exec session whose rows changed.
pub const EXEC_CHANNEL: &str = "outpost_exec";

/// A direction of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Node -> operator: stdout, stderr, exit.
    Output,
    /// Operator -> node: stdin, end of input, resize.
    Input,
}

impl Dir {
    fn tag(self) -> &'static str {
        match self {
            Dir::Output => "o",
            Dir::Input => "i",
        }
    }
    /// Attach this direction's stream (`$1` id, `$2` node, `$3` now).
    fn attach_sql(self) -> &'static str {
        match self {
            Dir::Output => {
                "UPDATE exec_sessions SET out_open = TRUE, node_beat = $3 WHERE id = $1 AND node = $2 AND NOT out_open"
            }
            Dir::Input => {
                "UPDATE exec_sessions SET in_open = TRUE, node_beat = $3 WHERE id = $1 AND node = $2 AND NOT in_open"
            }
        }
    }
    /// Store a batch under the next number (`$1` id, `$2` dir, `$3` owner or NULL, `$4` data).
    fn store_sql(self) -> &'static str {
        match self {
            Dir::Output => {
                "WITH s AS (UPDATE exec_sessions SET out_seq = out_seq + 1
                            WHERE id = $1 AND ($3::TEXT IS NULL OR owner = $3) RETURNING out_seq AS n)
                 INSERT INTO exec_frames (session, dir, seq, data) SELECT $1, $2, n, $4 FROM s RETURNING seq"
            }
            Dir::Input => {
                "WITH s AS (UPDATE exec_sessions SET in_seq = in_seq + 1
                            WHERE id = $1 AND ($3::TEXT IS NULL OR owner = $3) RETURNING in_seq AS n)
                 INSERT INTO exec_frames (session, dir, seq, data) SELECT $1, $2, n, $4 FROM s RETURNING seq"
            }
        }
    }
    /// Acknowledge up to `$3` (`$1` id, `$2` dir).
    fn ack_sql(self) -> &'static str {
        match self {
            Dir::Output => {
                "WITH d AS (DELETE FROM exec_frames WHERE session = $1 AND dir = $2 AND seq <= $3)
                 UPDATE exec_sessions SET out_acked = GREATEST(out_acked, $3) WHERE id = $1"
            }
            Dir::Input => {
                "WITH d AS (DELETE FROM exec_frames WHERE session = $1 AND dir = $2 AND seq <= $3)
                 UPDATE exec_sessions SET in_acked = GREATEST(in_acked, $3) WHERE id = $1"
            }
        }
    }
}

/// A session row as either side reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecRow {
    pub node: String,
    pub view: SessionView,
    /// The node attached its output stream.
    pub out_open: bool,
    /// The node's output stream ended (with or without its Exit frame).
    pub out_closed: bool,
    /// (stored, acknowledged) batches of the output and of the input.
    pub output: (u64, u64),
    pub input: (u64, u64),
}

/// Why a node may not attach a stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Attach {
    Attached,
    /// No such session for this node (ended, expired, or another node's).
    Unknown,
    /// This stream is open already.
    AlreadyOpen,
}

impl Shared {
    /// Park a session for `node`: `request` is the ExecRequest as JSON.
    pub async fn exec_open(
        &self,
        id: &str,
        node: &str,
        owner: &str,
        request: &str,
        now: UnixMs,
        deadline: UnixMs,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO exec_sessions (id, node, owner, request, operator_beat, deadline, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $5)",
        )
        .bind(id)
        .bind(node)
        .bind(owner)
        .bind(request)
        .bind(now)
        .bind(deadline)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Hand out the sessions of `nodes` not yet handed out (the group of sync reads that asks),
    /// per node in the order they were opened, each once.
    pub async fn exec_take(&self, nodes: &[&str]) -> Result<HashMap<String, Vec<String>>> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "UPDATE exec_sessions SET taken = TRUE WHERE node = ANY($1) AND NOT taken RETURNING node, request, created_at",
        )
        .bind(nodes)
        .fetch_all(&self.pool)
        .await?;
        Ok(super::notify::by_node(rows, |(n, r, at)| (n, r, at)))
    }

    /// Which of these nodes have sessions not yet handed out.
    pub async fn exec_pending(&self, nodes: &[String]) -> Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT DISTINCT node FROM exec_sessions WHERE NOT taken AND node = ANY($1)")
                .bind(nodes)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// The node opens one of its session's streams (and beats for its side).
    pub async fn exec_attach(&self, id: &str, node: &str, dir: Dir, now: UnixMs) -> Result<Attach> {
        let n = sqlx::query(dir.attach_sql())
            .bind(id)
            .bind(node)
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected();
        if n > 0 {
            return Ok(Attach::Attached);
        }
        let exists: Option<bool> = sqlx::query_scalar("SELECT TRUE FROM exec_sessions WHERE id = $1 AND node = $2")
            .bind(id)
            .bind(node)
            .fetch_optional(&self.pool)
            .await?;
        Ok(if exists.is_some() {
            Attach::AlreadyOpen
        } else {
            Attach::Unknown
        })
    }

    /// The session's row; None when it is gone (ended or expired).
    pub async fn exec_session(&self, id: &str) -> Result<Option<ExecRow>> {
        type Row = (String, i64, i64, Option<i64>, bool, bool, i64, i64, i64, i64);
        let r: Option<Row> = sqlx::query_as(
            "SELECT node, deadline, operator_beat, node_beat, out_open, out_closed, out_seq, out_acked, in_seq, in_acked
             FROM exec_sessions WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(r.map(|r| ExecRow {
            node: r.0,
            view: SessionView {
                deadline: r.1,
                operator_beat: r.2,
                node_beat: r.3,
            },
            out_open: r.4,
            out_closed: r.5,
            output: (u(r.6), u(r.7)),
            input: (u(r.8), u(r.9)),
        }))
    }

    /// Whether `owner` opened the session `id` (and it is still there).
    pub async fn exec_owned(&self, id: &str, owner: &str) -> Result<bool> {
        let r: Option<bool> = sqlx::query_scalar("SELECT TRUE FROM exec_sessions WHERE id = $1 AND owner = $2")
            .bind(id)
            .bind(owner)
            .fetch_optional(&self.pool)
            .await?;
        Ok(r.is_some())
    }

    /// Store one batch (encoded frames) in `dir`; for input, only the session's `owner` may.
    /// Returns its number, None when the session is gone (or not `owner`'s).
    pub async fn exec_store(&self, id: &str, dir: Dir, owner: Option<&str>, data: &[u8]) -> Result<Option<u64>> {
        let seq: Option<i64> = sqlx::query_scalar(dir.store_sql())
            .bind(id)
            .bind(dir.tag())
            .bind(owner)
            .bind(data)
            .fetch_optional(&self.pool)
            .await?;
        Ok(seq.map(u))
    }

    /// The batches of `dir` after `after`, in order (at most `limit`).
    pub async fn exec_read(&self, id: &str, dir: Dir, after: u64, limit: i64) -> Result<Vec<(u64, Vec<u8>)>> {
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT seq, data FROM exec_frames WHERE session = $1 AND dir = $2 AND seq > $3 ORDER BY seq LIMIT $4",
        )
        .bind(id)
        .bind(dir.tag())
        .bind(after as i64)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(s, d)| (u(s), d)).collect())
    }

    /// Acknowledge the batches of `dir` up to `upto`: they are deleted.
    pub async fn exec_ack(&self, id: &str, dir: Dir, upto: u64) -> Result<()> {
        sqlx::query(dir.ack_sql())
            .bind(id)
            .bind(dir.tag())
            .bind(upto as i64)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The operator's side (`operator` true) or the node's beats; false when the row is gone.
    pub async fn exec_beat(&self, id: &str, operator: bool, now: UnixMs) -> Result<bool> {
        let sql = if operator {
            "UPDATE exec_sessions SET operator_beat = $2 WHERE id = $1"
        } else {
            "UPDATE exec_sessions SET node_beat = $2 WHERE id = $1"
        };
        let n = sqlx::query(sql)
            .bind(id)
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n > 0)
    }

    /// The node's output stream ended: no more output batches come.
    pub async fn exec_close_output(&self, id: &str) -> Result<()> {
        sqlx::query("UPDATE exec_sessions SET out_closed = TRUE WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// End a session: its row and every batch left go.
    pub async fn exec_end(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM exec_sessions WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Remove sessions nobody ends any more: past their deadline, or whose operator's replica
    /// stopped beating `gone_after` ago (a replica killed before it could end them).
    pub async fn exec_expire(&self, now: UnixMs, gone_after: i64) -> Result<u64> {
        Ok(
            sqlx::query("DELETE FROM exec_sessions WHERE deadline < $1 OR operator_beat < $2")
                .bind(now)
                .bind(now - gone_after)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }

    /// Wake whoever reads session `id` on any replica (the payload is the id only).
    pub async fn exec_notify(&self, id: &str) -> Result<()> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(EXEC_CHANNEL)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{PgStore, Store};

    async fn shared(case: &str) -> Option<Shared> {
        let url = crate::store::testkit::pg_database(case)?;
        let s = PgStore::connect(&url).await.expect("open the test store");
        Some(s.shared().expect("a PostgreSQL store is shared").clone())
    }

    /// Relayed requests (notify.rs) are taken like sessions: per node, in order, once.
    #[tokio::test]
    async fn relayed_requests_are_taken_per_node_in_order_once() {
        let Some(s) = shared("relay_take").await else { return };
        s.relay_put("logs", "r2", "n1", "{2}", 2_000).await.unwrap();
        s.relay_put("vitals", "r1", "n1", "{1}", 1_000).await.unwrap();
        s.relay_put("logs", "r3", "n3", "{3}", 3_000).await.unwrap();
        let taken = s.relay_take(&["n1", "n2", "n3"]).await.unwrap();
        assert_eq!(taken.len(), 2, "only the nodes with requests: {taken:?}");
        let pair = |k: &str, r: &str| (k.to_string(), r.to_string());
        assert_eq!(
            taken["n1"],
            vec![pair("vitals", "{1}"), pair("logs", "{2}")],
            "oldest first"
        );
        assert_eq!(taken["n3"], vec![pair("logs", "{3}")]);
        assert!(s.relay_take(&["n1", "n3"]).await.unwrap().is_empty(), "handed out once");
    }

    #[tokio::test]
    async fn a_session_is_handed_to_its_node_once_and_attached_once_per_stream() {
        let Some(s) = shared("exec_attach").await else { return };
        s.exec_open("s1", "n1", "alice", "{}", 1_000, 60_000).await.unwrap();
        assert_eq!(s.exec_pending(&["n1".into(), "n2".into()]).await.unwrap(), vec!["n1"]);
        assert!(s.exec_take(&["n2"]).await.unwrap().is_empty(), "not another node's");
        s.exec_open("s2", "n1", "alice", "{2}", 1_001, 60_000).await.unwrap();
        s.exec_open("s3", "n3", "alice", "{3}", 1_002, 60_000).await.unwrap();
        let taken = s.exec_take(&["n1", "n2", "n3"]).await.unwrap();
        assert_eq!(taken.len(), 2, "only the nodes with sessions: {taken:?}");
        assert_eq!(taken["n1"], vec!["{}", "{2}"], "in the order they were opened");
        assert_eq!(taken["n3"], vec!["{3}"]);
        assert!(s.exec_take(&["n1", "n3"]).await.unwrap().is_empty(), "handed out once");
        assert_eq!(
            s.exec_attach("s1", "n2", Dir::Output, 2_000).await.unwrap(),
            Attach::Unknown
        );
        assert_eq!(
            s.exec_attach("s1", "n1", Dir::Output, 2_000).await.unwrap(),
            Attach::Attached
        );
        assert_eq!(
            s.exec_attach("s1", "n1", Dir::Output, 2_000).await.unwrap(),
            Attach::AlreadyOpen
        );
        assert_eq!(
            s.exec_attach("s1", "n1", Dir::Input, 2_000).await.unwrap(),
            Attach::Attached
        );
        let row = s.exec_session("s1").await.unwrap().unwrap();
        assert!(row.out_open && !row.out_closed);
        assert_eq!(row.view.node_beat, Some(2_000));
        assert_eq!(
            s.exec_attach("nope", "n1", Dir::Input, 2_000).await.unwrap(),
            Attach::Unknown
        );
    }

    #[tokio::test]
    async fn batches_are_numbered_in_order_input_is_the_owners_only_and_ending_removes_all() {
        let Some(s) = shared("exec_batches").await else { return };
        s.exec_open("s2", "n1", "alice", "{}", 1_000, 60_000).await.unwrap();
        for (i, d) in [b"a", b"b", b"c"].iter().enumerate() {
            assert_eq!(
                s.exec_store("s2", Dir::Output, None, *d).await.unwrap(),
                Some(i as u64 + 1)
            );
        }
        assert_eq!(
            s.exec_store("s2", Dir::Input, Some("mallory"), b"x").await.unwrap(),
            None
        );
        assert_eq!(
            s.exec_store("s2", Dir::Input, Some("alice"), b"x").await.unwrap(),
            Some(1)
        );
        assert!(!s.exec_owned("s2", "mallory").await.unwrap() && s.exec_owned("s2", "alice").await.unwrap());
        let got = s.exec_read("s2", Dir::Output, 0, 10).await.unwrap();
        assert_eq!(got, vec![(1, b"a".to_vec()), (2, b"b".to_vec()), (3, b"c".to_vec())]);
        s.exec_ack("s2", Dir::Output, 2).await.unwrap();
        assert_eq!(
            s.exec_read("s2", Dir::Output, 0, 10).await.unwrap(),
            vec![(3, b"c".to_vec())]
        );
        let row = s.exec_session("s2").await.unwrap().unwrap();
        assert_eq!((row.output, row.input), ((3, 2), (1, 0)));
        assert!(s.exec_beat("s2", true, 5_000).await.unwrap());
        assert_eq!(s.exec_session("s2").await.unwrap().unwrap().view.operator_beat, 5_000);
        s.exec_end("s2").await.unwrap();
        assert_eq!(s.exec_session("s2").await.unwrap(), None);
        assert_eq!(
            s.exec_store("s2", Dir::Output, None, b"d").await.unwrap(),
            None,
            "gone: stored nowhere"
        );
        assert!(
            s.exec_read("s2", Dir::Input, 0, 10).await.unwrap().is_empty(),
            "its batches went with it"
        );
        assert!(!s.exec_beat("s2", false, 6_000).await.unwrap());
    }

    #[tokio::test]
    async fn sessions_left_behind_expire() {
        let Some(s) = shared("exec_expire").await else { return };
        s.exec_open("old", "n1", "alice", "{}", 1_000, 600_000).await.unwrap();
        s.exec_open("late", "n1", "alice", "{}", 90_000, 95_000).await.unwrap();
        s.exec_open("live", "n1", "alice", "{}", 90_000, 600_000).await.unwrap();
        assert_eq!(s.exec_expire(100_000, 50_000).await.unwrap(), 2);
        assert!(s.exec_session("live").await.unwrap().is_some());
    }
}
