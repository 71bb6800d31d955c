//! Sync reads in groups: every sync's read of the store (the first read of a poll, and each
//! read after a wake-up) queues here, and a few readers take what is queued as one group,
//! read in one store transaction ([`Store::sync_group`]) plus, where replicas share the
//! store, one statement each for the relayed requests and exec sessions of the whole group.
//!
//! Why (issue 16, BENCHMARKS.md §4): a fleet-wide change wakes every held long-poll at once.
//! Read one by one, each woken poll took ~9 statements and a pool connection; at 100,000
//! agents on seven replicas they queued for the replicas' pools and ~99,000 gave up with
//! `pool timed out` within a minute. Here the waiting is a place in an in-memory queue with no
//! timeout, at most [`GROUPS_AT_ONCE`] groups use the store at once, and a group costs a few
//! statements whatever its size. The queue also batches by itself: while the readers are busy
//! the queue grows, and the next group takes up to [`GROUP`] of it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::error::HubError;
use crate::store::{Store, StoreError, SyncRead};

/// Reads in one group at most.
pub const GROUP: usize = 256;
/// Groups reading the store at once (the rest wait in the queue). PostgreSQL pools hold 16
/// connections: this leaves most of them to status groups, contacts and commands.
pub const GROUPS_AT_ONCE: usize = 4;
/// Reads of a group while the pool has no connection free within its timeout.
const POOL_TRIES: u32 = 6;

/// One poll's part of a group read.
#[derive(Debug)]
pub struct GroupRead {
    pub read: SyncRead,
    /// Requests relayed through the shared store, (kind, request JSON), taken for this answer.
    pub relays: Vec<(String, String)>,
    /// Exec sessions parked in the shared store (request JSON), taken for this answer.
    pub exec: Vec<String>,
}

type Reply = oneshot::Sender<Result<Option<GroupRead>, HubError>>;

struct Job {
    node: String,
    since: u64,
    reply: Reply,
}

/// The queue of sync reads and its readers.
pub struct SyncReads {
    tx: mpsc::UnboundedSender<Job>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Job>>>,
}

impl Default for SyncReads {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }
}

impl SyncReads {
    /// Queue one read and wait for its group: None when the node is unknown.
    pub async fn read(&self, node: &str, since: u64) -> Result<Option<GroupRead>, HubError> {
        let stopped = || HubError::Internal("the sync reader stopped".into());
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job {
                node: node.to_string(),
                since,
                reply,
            })
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Start the readers (once, from `Hub::start`; later calls do nothing).
    pub fn spawn(&self, store: Arc<dyn Store>) {
        let Some(mut rx) = self.rx.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        tokio::spawn(async move {
            let readers = Arc::new(Semaphore::new(GROUPS_AT_ONCE));
            loop {
                let Ok(place) = readers.clone().acquire_owned().await else {
                    return;
                };
                // What queued while the readers were busy is this group (0: the channel closed).
                let mut jobs = Vec::with_capacity(GROUP);
                if rx.recv_many(&mut jobs, GROUP).await == 0 {
                    return;
                }
                let store = store.clone();
                tokio::spawn(async move {
                    read_group(&*store, jobs).await;
                    drop(place);
                });
            }
        });
    }
}

/// Read one group and answer each of its polls.
async fn read_group(store: &dyn Store, mut jobs: Vec<Job>) {
    // A poll whose connection closed while it queued reads nothing (and takes no relays).
    jobs.retain(|j| !j.reply.is_closed());
    if jobs.is_empty() {
        return;
    }
    let reads: Vec<(String, u64)> = jobs.iter().map(|j| (j.node.clone(), j.since)).collect();
    let result = read(store, &reads).await;
    match result {
        Ok((group, mut relays, mut exec)) => {
            for (job, read) in jobs.into_iter().zip(group) {
                // A node polling twice in one group gets its taken requests once.
                let answer = read.map(|read| GroupRead {
                    read,
                    relays: relays.remove(&job.node).unwrap_or_default(),
                    exec: exec.remove(&job.node).unwrap_or_default(),
                });
                let _ = job.reply.send(Ok(answer));
            }
        }
        Err(e) => {
            tracing::warn!(reads = jobs.len(), error = %e, "a group of sync reads failed");
            for job in jobs {
                let _ = job.reply.send(Err(HubError::for_each_of_group(&e)));
            }
        }
    }
}

/// A group's reads from the store; relayed requests and exec sessions are taken once the
/// group was read.
type Read = (
    Vec<Option<SyncRead>>,
    HashMap<String, Vec<(String, String)>>,
    HashMap<String, Vec<String>>,
);

async fn read(store: &dyn Store, reads: &[(String, u64)]) -> Result<Read, StoreError> {
    // A pool with no connection free within its timeout (a tier short of CPU): the group
    // waits and reads again rather than failing every poll in it. Only the read is tried
    // again: a take that failed took nothing, one that succeeded must not run twice.
    let mut tries = 1;
    let group = loop {
        match store.sync_group(reads).await {
            Err(StoreError::Pg(sqlx::Error::PoolTimedOut)) if tries < POOL_TRIES => {
                tracing::debug!(
                    reads = reads.len(),
                    tries,
                    "no pooled connection for a group of sync reads; reading again"
                );
                tries += 1;
            }
            r => break r?,
        }
    };
    let (mut relays, mut exec) = (HashMap::new(), HashMap::new());
    if let Some(shared) = store.shared() {
        let mut nodes: Vec<&str> = reads.iter().map(|(n, _)| n.as_str()).collect();
        nodes.sort_unstable();
        nodes.dedup();
        relays = shared.relay_take(&nodes).await?;
        exec = shared.exec_take(&nodes).await?;
    }
    Ok((group, relays, exec))
}
