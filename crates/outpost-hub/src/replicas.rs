//! Several hub replicas on one PostgreSQL database (docs/postgres.md, "Replicas"): the write
//! lock every change takes, and the listener that wakes this replica's long-polls for changes
//! committed through any replica.
//!
//! The listener (`spawn`) LISTENs on `store::notify::CHANNEL`. On a notification, after every
//! (re)connect of its connection, and on the fallback poll (`HubConfig::replica_poll`, 5 s by
//! default) it runs one look ([`Service::look`]): re-read the generations of the nodes holding
//! a long-poll here and wake those that moved (`outpost_core::replicas::moved`), forget nodes
//! deleted elsewhere, wake nodes with relayed requests pending, deliver relayed answers to the
//! operators waiting here, and refresh the caches built from stored objects
//! ([`Service::remote_changes`]). It also writes this replica's contacts every
//! `outpost_core::replicas::contact_every`. On SQLite (one hub process per file) none of this
//! runs: wake-ups stay in the process.
//!
//! Must never: trust a notification's payload, or wait for one to be correct (the fallback poll
//! bounds any delay).

use std::sync::Arc;
use std::time::Duration;

use outpost_core::replicas::{self, Trigger};
use tokio::sync::watch;

use crate::error::HubError;
use crate::service::{now_ms, Service};
use crate::store::notify::Shared;

/// Serializes every change to objects and nodes together with the reschedule that follows: in
/// this process (a mutex) and, where replicas share a PostgreSQL store, across them (an advisory
/// lock held in a transaction for the guard's life).
pub struct WriteLock {
    local: tokio::sync::Mutex<()>,
    shared: Option<Shared>,
}

/// Held while a change and its reschedule run; dropping it releases the lock.
pub struct WriteGuard<'a> {
    _local: tokio::sync::MutexGuard<'a, ()>,
    _shared: Option<sqlx::Transaction<'static, sqlx::Postgres>>,
}

impl WriteLock {
    pub fn new(shared: Option<Shared>) -> Self {
        Self {
            local: tokio::sync::Mutex::new(()),
            shared,
        }
    }

    /// Wait for the lock. Fails only when the shared database cannot be reached (then no change
    /// could be written either).
    pub async fn lock(&self) -> Result<WriteGuard<'_>, HubError> {
        let local = self.local.lock().await;
        let shared = match &self.shared {
            Some(s) => Some(s.write_lock().await.map_err(|e| match e {
                crate::store::StoreError::Pg(sqlx::Error::PoolTimedOut) => HubError::StoreBusy,
                e => HubError::Internal(format!(
                    "cannot take the replicas' write lock in PostgreSQL: {e}; retry once the database answers"
                )),
            })?),
            None => None,
        };
        Ok(WriteGuard {
            _local: local,
            _shared: shared,
        })
    }
}

/// Start the listener and the contact writer of a replica on a shared store (nothing on SQLite).
pub fn spawn(svc: &Arc<Service>, fallback: Duration, stop: watch::Receiver<bool>) {
    let Some(shared) = svc.store.shared().cloned() else {
        return;
    };
    let (s, st) = (svc.clone(), stop.clone());
    tokio::spawn(listen(s, shared, fallback, st));
    let (s, mut st) = (svc.clone(), stop);
    let every = Duration::from_millis(replicas::contact_every(svc.settings.offline_after.as_millis() as u64));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = s.store.flush_contacts(now_ms()).await {
                        tracing::warn!(error = %e, "cannot write this replica's node contacts; retrying");
                    }
                }
                _ = st.changed() => return,
            }
        }
    });
}

async fn listen(svc: Arc<Service>, shared: Shared, fallback: Duration, mut stop: watch::Receiver<bool>) {
    let mut failures = 0u32;
    loop {
        let mut listener = match shared.listener().await {
            Ok(l) => {
                tracing::info!(channel = crate::store::notify::CHANNEL, "replica listener listening");
                failures = 0;
                l
            }
            Err(e) => {
                let wait = Duration::from_millis(replicas::reconnect_backoff_ms(failures));
                failures = failures.saturating_add(1);
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64,
                    "replica listener cannot reach PostgreSQL; long-polls here are woken by the fallback poll meanwhile");
                // The fallback poll goes on while the listener is down.
                svc.look(Trigger::Poll).await;
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = stop.changed() => return,
                }
            }
        };
        // Anything sent while we were not listening is lost: look at everything now.
        svc.look(Trigger::Reconnected).await;
        let mut due = tokio::time::Instant::now() + fallback;
        loop {
            tokio::select! {
                r = listener.try_recv() => match r {
                    Ok(Some(first)) => {
                        // Exec notifications wake that session's readers here; one look serves
                        // every other notification already buffered.
                        let mut look = false;
                        let mut next = Some(first);
                        while let Some(n) = next.take().or_else(|| listener.next_buffered()) {
                            if n.channel() == crate::store::exec_frames::EXEC_CHANNEL {
                                svc.links.exec.wakes.poke(n.payload());
                            } else {
                                look = true;
                            }
                        }
                        if !look {
                            // Not a look: the fallback poll stays due when it was.
                            continue;
                        }
                        svc.look(Trigger::Notified).await;
                    }
                    Ok(None) => {
                        // The connection dropped; the next try_recv reconnects and listens again.
                        tracing::info!("replica listener lost its PostgreSQL connection; reconnecting");
                        svc.look(Trigger::Reconnected).await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "replica listener failed; reconnecting");
                        break;
                    }
                },
                _ = tokio::time::sleep_until(due) => {
                    svc.look(Trigger::Poll).await;
                }
                _ = stop.changed() => return,
            }
            // Any look resets the fallback poll.
            due = tokio::time::Instant::now() + fallback;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(replicas::reconnect_backoff_ms(0))) => {}
            _ = stop.changed() => return,
        }
    }
}
