//! Exec sessions across hub replicas on one PostgreSQL database (docs/exec.md, "Across
//! replicas"). Nothing here talks to another replica: the session is a row in the store
//! (`crate::store::exec_frames`), frames travel as batches through it, and a notification
//! naming the session wakes whoever reads it (the replica listener pokes [`Wakes`]); every
//! reader also re-reads on a short fallback poll.
//!
//! Four tasks may serve one session, each on whichever replica its request reached:
//! - the operator's **output pump** ([`open`]): reads the output batches in order, hands their
//!   frames to the operator's answer, acknowledges them (deleting them), beats for the
//!   operator's side and ends the session (deletes its row) when the Exit frame went out, the
//!   operator stopped reading, or the session died;
//! - the node's **output writer** ([`attach_output`]): batches the node's output frames and
//!   stores them within the window, beating for the node's side;
//! - the node's **input reader** ([`attach_input`]): the operator's input batches, in order, to
//!   the node; its stream ends when the session does, and the node then kills the command;
//! - the operator's **input** POSTs ([`send_input`]): one batch each, stored only for the
//!   session's owner.
//!
//! The rules (order, acknowledgement, window, when a session is dead) are
//! `outpost_core::exec_relay`'s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_api::exec::{decode_all, ExecExit, ExecRequest, Frame};
use outpost_core::exec_relay::{self as rules, Dead};
use tokio::sync::{mpsc, oneshot, watch};

use super::{lock, ExecBroker, Opened, SessionError, SessionGuard, FRAMES_IN_FLIGHT};
use crate::service::now_ms;
use crate::store::exec_frames::{Attach, Dir, ExecRow};
use crate::store::notify::Shared;
use crate::store::StoreError;

/// A batch is stored once it reaches this size (or when no more frames are waiting).
const BATCH_BYTES: usize = 64 * 1024;
/// Sessions left behind by a replica that died are removed this long after its last beat.
pub const EXPIRE_AFTER_MS: i64 = 10 * rules::LEASE_MS;

/// Per-session wake-ups on this replica: a notification naming a session pokes its readers.
#[derive(Default)]
pub struct Wakes(Mutex<HashMap<String, watch::Sender<u64>>>);

/// A reader's subscription to its session's wake-ups; forgotten with the last one.
pub struct Wake<'a> {
    wakes: &'a Wakes,
    id: String,
    rx: watch::Receiver<u64>,
}

impl Wakes {
    fn subscribe(&self, id: &str) -> Wake<'_> {
        let rx = lock(&self.0)
            .entry(id.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        Wake {
            wakes: self,
            id: id.to_string(),
            rx,
        }
    }

    /// A notification named session `id`.
    pub fn poke(&self, id: &str) {
        if let Some(tx) = lock(&self.0).get(id) {
            tx.send_modify(|n| *n += 1);
        }
    }

    /// Notifications may have been lost (the listener reconnected): every reader looks again.
    pub fn poke_all(&self) {
        for tx in lock(&self.0).values() {
            tx.send_modify(|n| *n += 1);
        }
    }
}

impl Wake<'_> {
    /// Until a poke for this session or the fallback poll, whichever comes first.
    async fn wait(&mut self) {
        let _ = tokio::time::timeout(Duration::from_millis(rules::POLL_MS), self.rx.changed()).await;
    }
}

impl Drop for Wake<'_> {
    fn drop(&mut self) {
        let mut m = lock(&self.wakes.0);
        if m.get(&self.id).is_some_and(|tx| tx.receiver_count() <= 1) {
            m.remove(&self.id);
        }
    }
}

fn view(row: &Option<ExecRow>) -> Option<rules::SessionView> {
    row.as_ref().map(|r| r.view)
}

async fn notify(shared: &Shared, id: &str) {
    if let Err(e) = shared.exec_notify(id).await {
        tracing::debug!(session = %id, error = %e, "cannot notify about an exec session; its readers see it at their next poll");
    }
}

/// Beat for one side of session `id` every `BEAT_MS` until aborted.
fn beat(shared: Shared, id: String, operator: bool) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(rules::BEAT_MS as u64));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match shared.exec_beat(&id, operator, now_ms()).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => tracing::warn!(session = %id, error = %e, "cannot beat for an exec session; retrying"),
            }
        }
    })
}

/// Aborts a beat when dropped.
struct Beat(tokio::task::JoinHandle<()>);

impl Drop for Beat {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Park a session for `node` in the shared store and start the operator's output pump here.
/// The returned receiver fires when the node attached its output stream (on any replica).
pub async fn open(
    broker: &Arc<ExecBroker>,
    shared: &Shared,
    node: &str,
    owner: &str,
    req: ExecRequest,
    deadline: Duration,
) -> Result<(Opened, oneshot::Receiver<()>), StoreError> {
    let id = req.id.clone();
    let body = serde_json::to_string(&req)?;
    let now = now_ms();
    shared
        .exec_open(&id, node, owner, &body, now, now + deadline.as_millis() as i64)
        .await?;
    let (output_tx, output_rx) = mpsc::channel(FRAMES_IN_FLIGHT);
    let (att_tx, att_rx) = oneshot::channel();
    tokio::spawn(output_pump(
        broker.clone(),
        shared.clone(),
        id.clone(),
        output_tx,
        att_tx,
    ));
    let guard = SessionGuard {
        broker: broker.clone(),
        node: node.to_string(),
        id,
    };
    Ok((
        Opened {
            output: output_rx,
            guard,
        },
        att_rx,
    ))
}

/// The operator's side: output batches, in order, to the operator's answer.
async fn output_pump(
    broker: Arc<ExecBroker>,
    shared: Shared,
    id: String,
    tx: mpsc::Sender<Frame>,
    attached: oneshot::Sender<()>,
) {
    let _beat = Beat(beat(shared.clone(), id.clone(), true));
    let mut wake = broker.wakes.subscribe(&id);
    let mut attached = Some(attached);
    let mut acked = 0u64;
    // Some(reason): the session died under us (the operator gets an exit saying so);
    // None: it ended as it should (exit delivered, the operator left, the node's stream ended).
    let died: Option<Dead> = 'pump: loop {
        let row = match shared.exec_session(&id).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(session = %id, error = %e, "cannot read an exec session; retrying");
                tokio::select! {
                    _ = wake.wait() => continue,
                    _ = tx.closed() => break None,
                }
            }
        };
        if let Err(d) = rules::verdict(view(&row).as_ref(), now_ms(), rules::LEASE_MS) {
            break Some(d);
        }
        let row = row.expect("alive");
        if row.out_open {
            if let Some(a) = attached.take() {
                let _ = a.send(());
            }
        }
        let batches = match shared.exec_read(&id, Dir::Output, acked, rules::WINDOW as i64).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(session = %id, error = %e, "cannot read exec output; retrying");
                Vec::new()
            }
        };
        let seqs: Vec<u64> = batches.iter().map(|b| b.0).collect();
        let (skip, take) = rules::take(acked, &seqs);
        let mut exit = false;
        for (_, data) in batches.iter().skip(skip).take(take.deliver) {
            let frames = match decode_all(data) {
                Ok((f, _)) => f,
                Err(e) => {
                    tracing::warn!(session = %id, error = %e, "a stored exec output batch is not valid; ending the session");
                    break 'pump Some(Dead::Ended);
                }
            };
            for f in frames {
                exit |= matches!(f, Frame::Exit(_));
                if tx.send(f).await.is_err() {
                    break 'pump None;
                }
                if exit {
                    break;
                }
            }
        }
        if take.acked > acked {
            acked = take.acked;
            if let Err(e) = shared.exec_ack(&id, Dir::Output, acked).await {
                tracing::debug!(session = %id, error = %e, "cannot acknowledge exec output; the next one does");
            }
            notify(&shared, &id).await;
        }
        if exit {
            break None;
        }
        // The node's stream ended without an exit and everything stored has been delivered:
        // the operator's stream makes one up (the link dropped).
        if take.deliver == 0 && row.out_closed && row.output.0 <= acked {
            break None;
        }
        if take.deliver == 0 {
            tokio::select! {
                _ = wake.wait() => {}
                _ = tx.closed() => break None,
            }
        }
    };
    if let Err(e) = shared.exec_end(&id).await {
        tracing::warn!(session = %id, error = %e, "cannot end an exec session in the store; it expires by itself");
    }
    notify(&shared, &id).await;
    if let Some(d) = died {
        tracing::info!(session = %id, reason = d.reason(), "exec session ended");
        let _ = tx
            .send(Frame::Exit(ExecExit {
                code: None,
                reason: Some(d.reason().into()),
            }))
            .await;
    }
}

/// The node opens its session's output stream here: its frames go to the store in batches.
pub async fn attach_output(
    broker: &Arc<ExecBroker>,
    shared: &Shared,
    node: &str,
    id: &str,
) -> Result<Result<mpsc::Sender<Frame>, SessionError>, StoreError> {
    match shared.exec_attach(id, node, Dir::Output, now_ms()).await? {
        Attach::Attached => {}
        Attach::Unknown => return Ok(Err(SessionError::Unknown)),
        Attach::AlreadyOpen => return Ok(Err(SessionError::AlreadyOpen)),
    }
    notify(shared, id).await;
    let (tx, rx) = mpsc::channel(FRAMES_IN_FLIGHT);
    tokio::spawn(output_writer(broker.clone(), shared.clone(), id.to_string(), rx));
    Ok(Ok(tx))
}

/// Whether the session is alive for the node's side; ends it in the store when not.
async fn alive(shared: &Shared, id: &str) -> Result<Option<ExecRow>, StoreError> {
    let row = shared.exec_session(id).await?;
    match rules::verdict(view(&row).as_ref(), now_ms(), rules::LEASE_MS) {
        Ok(()) => Ok(row),
        Err(d) => {
            if d != Dead::Ended {
                tracing::info!(session = %id, reason = d.reason(), "exec session ended");
                shared.exec_end(id).await?;
                notify(shared, id).await;
            }
            Ok(None)
        }
    }
}

async fn output_writer(broker: Arc<ExecBroker>, shared: Shared, id: String, mut rx: mpsc::Receiver<Frame>) {
    let _beat = Beat(beat(shared.clone(), id.clone(), false));
    let mut wake = broker.wakes.subscribe(&id);
    loop {
        let first = tokio::select! {
            f = rx.recv() => f,
            _ = wake.wait() => match alive(&shared, &id).await {
                Ok(None) => return,
                _ => continue,
            },
        };
        let Some(first) = first else {
            // The node's stream ended without its Exit frame.
            if let Err(e) = shared.exec_close_output(&id).await {
                tracing::debug!(session = %id, error = %e, "cannot mark exec output closed; the session expires");
            }
            notify(&shared, &id).await;
            return;
        };
        let mut exit = matches!(first, Frame::Exit(_));
        let mut batch = first.encode();
        while !exit && batch.len() < BATCH_BYTES {
            match rx.try_recv() {
                Ok(f) => {
                    exit = matches!(f, Frame::Exit(_));
                    batch.extend_from_slice(&f.encode());
                }
                Err(_) => break,
            }
        }
        // Within the window: a reader that does not keep up stalls the node's upload.
        loop {
            match alive(&shared, &id).await {
                Ok(None) => return,
                Ok(Some(row)) if rules::may_send(row.output.0, row.output.1, rules::WINDOW) => break,
                Ok(Some(_)) => {}
                Err(e) => tracing::warn!(session = %id, error = %e, "cannot read an exec session; retrying"),
            }
            wake.wait().await;
        }
        match shared.exec_store(&id, Dir::Output, None, &batch).await {
            Ok(Some(_)) => notify(&shared, &id).await,
            Ok(None) => return,
            Err(e) => {
                // A batch that cannot be stored cannot be skipped either: the session ends.
                tracing::warn!(session = %id, error = %e, "cannot store exec output; ending the session");
                let _ = shared.exec_end(&id).await;
                notify(&shared, &id).await;
                return;
            }
        }
        if exit {
            return;
        }
    }
}

/// The node opens its session's input stream here: the operator's input batches, in order.
pub async fn attach_input(
    broker: &Arc<ExecBroker>,
    shared: &Shared,
    node: &str,
    id: &str,
) -> Result<Result<mpsc::Receiver<Frame>, SessionError>, StoreError> {
    match shared.exec_attach(id, node, Dir::Input, now_ms()).await? {
        Attach::Attached => {}
        Attach::Unknown => return Ok(Err(SessionError::Unknown)),
        Attach::AlreadyOpen => return Ok(Err(SessionError::AlreadyOpen)),
    }
    let (tx, rx) = mpsc::channel(FRAMES_IN_FLIGHT);
    tokio::spawn(input_reader(broker.clone(), shared.clone(), id.to_string(), tx));
    Ok(Ok(rx))
}

async fn input_reader(broker: Arc<ExecBroker>, shared: Shared, id: String, tx: mpsc::Sender<Frame>) {
    let _beat = Beat(beat(shared.clone(), id.clone(), false));
    let mut wake = broker.wakes.subscribe(&id);
    let mut acked = 0u64;
    loop {
        match alive(&shared, &id).await {
            // Ended, or dead: the node's input stream ends and the node ends the command.
            Ok(None) => return,
            Ok(Some(_)) => {}
            Err(e) => tracing::warn!(session = %id, error = %e, "cannot read an exec session; retrying"),
        }
        let batches = shared
            .exec_read(&id, Dir::Input, acked, rules::WINDOW as i64)
            .await
            .unwrap_or_default();
        let seqs: Vec<u64> = batches.iter().map(|b| b.0).collect();
        let (skip, take) = rules::take(acked, &seqs);
        for (_, data) in batches.iter().skip(skip).take(take.deliver) {
            let Ok((frames, _)) = decode_all(data) else {
                tracing::warn!(session = %id, "a stored exec input batch is not valid; ending the session");
                let _ = shared.exec_end(&id).await;
                notify(&shared, &id).await;
                return;
            };
            for f in frames {
                if tx.send(f).await.is_err() {
                    return;
                }
            }
        }
        if take.acked > acked {
            acked = take.acked;
            let _ = shared.exec_ack(&id, Dir::Input, acked).await;
            notify(&shared, &id).await;
        } else {
            tokio::select! {
                _ = wake.wait() => {}
                _ = tx.closed() => return,
            }
        }
    }
}

/// The operator's input for session `id`, stored as one batch for the node; only the session's
/// owner may send it. Waits (up to `wait`) while the node is a window behind.
pub async fn send_input(
    broker: &ExecBroker,
    shared: &Shared,
    owner: &str,
    id: &str,
    frames: &[Frame],
    wait: Duration,
) -> Result<Result<(), SessionError>, StoreError> {
    if !shared.exec_owned(id, owner).await? {
        return Ok(Err(SessionError::Unknown));
    }
    let batch: Vec<u8> = frames.iter().flat_map(|f| f.encode()).collect();
    let until = tokio::time::Instant::now() + wait;
    let mut wake = broker.wakes.subscribe(id);
    loop {
        let Some(row) = shared.exec_session(id).await? else {
            return Ok(Err(SessionError::Unknown));
        };
        if rules::may_send(row.input.0, row.input.1, rules::WINDOW) {
            break;
        }
        if tokio::time::Instant::now() >= until {
            return Ok(Err(SessionError::Stalled));
        }
        wake.wait().await;
    }
    if shared.exec_store(id, Dir::Input, Some(owner), &batch).await?.is_none() {
        return Ok(Err(SessionError::Unknown));
    }
    notify(shared, id).await;
    Ok(Ok(()))
}
