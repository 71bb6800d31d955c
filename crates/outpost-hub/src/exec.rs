//! Remote exec relay (docs/exec.md): operator sessions carried over the node's own outbound
//! link, like log requests (`crate::logs`), but as two streams that live as long as the command.
//!
//! 1. `POST /v1/nodes/{node}/exec` parks an [`ExecRequest`] for the node and wakes its sync
//!    long-poll; the operator's answer waits until the node takes the session (or a deadline).
//! 2. The node opens `POST /v1/nodes/{node}/exec/{id}/output` (its output frames; opening it is
//!    what attaches the session) and `GET /v1/nodes/{node}/exec/{id}/input` (the operator's
//!    input frames). Both are mTLS requests of the node that owns the session.
//! 3. The operator reads the output frames as the body of its answer and sends input with
//!    `POST /v1/exec/{id}/input`.
//!
//! On one hub (SQLite) sessions live in memory only (a hub restart ends them). Where replicas
//! share a PostgreSQL store ([`remote`]), the operator's request, the node's two streams and
//! the operator's input may each reach a different replica: the session is a row in the store
//! and the frames travel through it (docs/exec.md, "Across replicas"). A session ends when its
//! output stream carries the Exit frame, when the operator stops reading (the node then sees
//! its input stream end and kills the command), at its deadline, and, across replicas, when
//! the replica on either side stops beating.
//!
//! Must never: hand a node another node's session, let another operator send input, duplicate
//! or reorder frames, or keep a session past its deadline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_api::exec::{ExecExit, ExecRequest, Frame};
use tokio::sync::{mpsc, oneshot};

/// Frames buffered per direction before the sender waits (backpressure down the link).
const FRAMES_IN_FLIGHT: usize = 64;

struct Session {
    node: String,
    /// Who opened it (the hash of the caller's credential): only they may send input.
    owner: String,
    input_tx: mpsc::Sender<Frame>,
    input_rx: Option<mpsc::Receiver<Frame>>,
    output_tx: Option<mpsc::Sender<Frame>>,
    attached: Option<oneshot::Sender<()>>,
}

#[derive(Default)]
pub struct ExecBroker {
    /// Sessions not yet handed to their node.
    pending: Mutex<HashMap<String, Vec<ExecRequest>>>,
    sessions: Mutex<HashMap<String, Session>>,
    /// Wake-ups of this replica's relays of sessions in the shared store ([`remote`]).
    pub wakes: remote::Wakes,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The operator's side of an open session: its output frames; dropping it ends the session.
pub struct Opened {
    pub output: mpsc::Receiver<Frame>,
    pub guard: SessionGuard,
}

/// Ends the session (forgets it, so the node's input stream ends) when dropped.
pub struct SessionGuard {
    broker: Arc<ExecBroker>,
    pub node: String,
    pub id: String,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.broker.end(&self.node, &self.id);
    }
}

/// Why a node's or operator's request names no session it may use.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionError {
    /// Unknown id, ended, or another node's / operator's session.
    Unknown,
    /// The node already opened this stream once.
    AlreadyOpen,
    /// Across replicas: the node has not read the input sent before (a window of batches).
    Stalled,
}

impl ExecBroker {
    /// Park a session for `node`. Returns the operator's side and a receiver that fires when the
    /// node attaches.
    pub fn open(self: &Arc<Self>, node: &str, owner: &str, req: ExecRequest) -> (Opened, oneshot::Receiver<()>) {
        let (input_tx, input_rx) = mpsc::channel(FRAMES_IN_FLIGHT);
        let (output_tx, output_rx) = mpsc::channel(FRAMES_IN_FLIGHT);
        let (att_tx, att_rx) = oneshot::channel();
        let id = req.id.clone();
        lock(&self.sessions).insert(
            id.clone(),
            Session {
                node: node.to_string(),
                owner: owner.to_string(),
                input_tx,
                input_rx: Some(input_rx),
                output_tx: Some(output_tx),
                attached: Some(att_tx),
            },
        );
        lock(&self.pending).entry(node.to_string()).or_default().push(req);
        let guard = SessionGuard {
            broker: self.clone(),
            node: node.to_string(),
            id,
        };
        (
            Opened {
                output: output_rx,
                guard,
            },
            att_rx,
        )
    }

    /// Hand the node its parked sessions (once).
    pub fn take(&self, node: &str) -> Vec<ExecRequest> {
        lock(&self.pending).remove(node).unwrap_or_default()
    }

    pub fn has_pending(&self, node: &str) -> bool {
        lock(&self.pending).get(node).is_some_and(|v| !v.is_empty())
    }

    /// The node opens its output stream: the session is attached.
    pub fn attach_output(&self, node: &str, id: &str) -> Result<mpsc::Sender<Frame>, SessionError> {
        let mut s = lock(&self.sessions);
        let sess = s.get_mut(id).filter(|s| s.node == node).ok_or(SessionError::Unknown)?;
        let tx = sess.output_tx.take().ok_or(SessionError::AlreadyOpen)?;
        if let Some(a) = sess.attached.take() {
            let _ = a.send(());
        }
        Ok(tx)
    }

    /// The node opens its input stream.
    pub fn attach_input(&self, node: &str, id: &str) -> Result<mpsc::Receiver<Frame>, SessionError> {
        let mut s = lock(&self.sessions);
        let sess = s.get_mut(id).filter(|s| s.node == node).ok_or(SessionError::Unknown)?;
        sess.input_rx.take().ok_or(SessionError::AlreadyOpen)
    }

    /// Where the operator's input for session `id` goes.
    pub fn input(&self, owner: &str, id: &str) -> Result<mpsc::Sender<Frame>, SessionError> {
        lock(&self.sessions)
            .get(id)
            .filter(|s| s.owner == owner)
            .map(|s| s.input_tx.clone())
            .ok_or(SessionError::Unknown)
    }

    /// Forget a session (and its parked request if the node never took it).
    pub fn end(&self, node: &str, id: &str) {
        lock(&self.sessions).remove(id);
        if let Some(v) = lock(&self.pending).get_mut(node) {
            v.retain(|r| r.id != id);
        }
    }

    /// Open sessions (metrics).
    pub fn open_sessions(&self) -> usize {
        lock(&self.sessions).len()
    }
}

/// The operator's output stream: frames until the Exit frame, which always comes (made up by
/// the hub when the node's stream ended without one, or at `deadline`).
pub fn output_stream(
    opened: Opened,
    deadline: Duration,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::convert::Infallible>> + Send {
    let until = tokio::time::Instant::now() + deadline;
    futures_util::stream::unfold(Some(opened), move |state| async move {
        let mut opened = state?;
        let frame = match tokio::time::timeout_at(until, opened.output.recv()).await {
            Ok(Some(f)) => f,
            Ok(None) => Frame::Exit(ExecExit {
                code: None,
                reason: Some("the node's link dropped before the command ended".into()),
            }),
            Err(_) => Frame::Exit(ExecExit {
                code: None,
                reason: Some(format!(
                    "the hub ended the session after {}s, its time limit",
                    deadline.as_secs()
                )),
            }),
        };
        let last = matches!(frame, Frame::Exit(_));
        Some((Ok(frame.encode()), (!last).then_some(opened)))
    })
}

pub mod remote;

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use outpost_api::exec::{decode_all, ExecStart};

    fn req(id: &str) -> ExecRequest {
        ExecRequest {
            id: id.into(),
            start: ExecStart {
                workload: Some("web".into()),
                command: vec!["true".into()],
                ..Default::default()
            },
        }
    }

    #[tokio::test]
    async fn a_node_attaches_only_its_own_sessions_once() {
        let b = Arc::new(ExecBroker::default());
        let (opened, attached) = b.open("n1", "alice", req("s1"));
        assert!(b.take("n2").is_empty());
        assert!(b.has_pending("n1"));
        assert_eq!(b.take("n1").len(), 1);
        assert_eq!(b.attach_output("n2", "s1").err(), Some(SessionError::Unknown));
        let out = b.attach_output("n1", "s1").unwrap();
        attached.await.unwrap();
        assert_eq!(b.attach_output("n1", "s1").err(), Some(SessionError::AlreadyOpen));
        let mut input = b.attach_input("n1", "s1").unwrap();
        assert_eq!(b.input("mallory", "s1").err(), Some(SessionError::Unknown));
        b.input("alice", "s1").unwrap().send(Frame::StdinEof).await.unwrap();
        assert_eq!(input.recv().await, Some(Frame::StdinEof));
        out.send(Frame::Stdout(b"hi".to_vec())).await.unwrap();
        drop(out);
        let bytes: Vec<u8> = output_stream(opened, Duration::from_secs(5))
            .map(|r| r.unwrap())
            .concat()
            .await;
        let (frames, rest) = decode_all(&bytes).unwrap();
        assert_eq!(rest, 0);
        assert_eq!(frames[0], Frame::Stdout(b"hi".to_vec()));
        assert!(
            matches!(&frames[1], Frame::Exit(e) if e.code.is_none()),
            "made-up exit: {frames:?}"
        );
        // the operator's side is gone: the session is forgotten, the node's input ends
        assert_eq!(input.recv().await, None);
        assert_eq!(b.open_sessions(), 0);
    }

    #[tokio::test]
    async fn a_session_ends_at_its_deadline_and_unclaimed_requests_are_withdrawn() {
        let b = Arc::new(ExecBroker::default());
        let (opened, _attached) = b.open("n1", "alice", req("s2"));
        let bytes: Vec<u8> = output_stream(opened, Duration::from_millis(50))
            .map(|r| r.unwrap())
            .concat()
            .await;
        let (frames, _) = decode_all(&bytes).unwrap();
        assert!(matches!(&frames[..], [Frame::Exit(e)] if e.reason.as_deref().unwrap().contains("time limit")));
        assert!(!b.has_pending("n1"), "the node never took it: withdrawn");
    }
}
