//! Senders: one task per (stream, sink) reads the stream's spool after its cursor, sends a
//! batch, and moves the cursor only when the sink confirmed it. Delivery is at least once from
//! the node; every record carries an id (`<spool id>-<seq>-<n>`) the sink de-duplicates on:
//! the hub stores each id once, NATS JetStream drops a repeated `Nats-Msg-Id` within the
//! stream's duplicate window, the file sink's lines carry the id.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_api::pipeline::{DataAck, DataBatch, DataRecord, SinkSpec};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{DataEntry, StreamStats, KIND_DATA};
use crate::spool::Reader;

/// Records per batch at most, and about this many bytes.
const BATCH_RECORDS: usize = 2000;
const BATCH_BYTES: usize = 1 << 20;

pub struct SinkCtx {
    pub dir: PathBuf,
    pub spool_id: String,
    pub node: String,
    pub pipeline: String,
    pub stream: String,
    pub spec: SinkSpec,
    pub acked: Arc<AtomicU64>,
    pub committed: watch::Receiver<u64>,
    pub stats: Arc<Mutex<StreamStats>>,
    pub hub: Option<Arc<crate::sync::HubClient>>,
    pub stop: watch::Receiver<bool>,
}

/// A connected sink.
enum Target {
    Hub(Arc<crate::sync::HubClient>),
    #[cfg(feature = "nats")]
    Nats(Box<NatsTarget>),
    File(std::fs::File),
}

impl SinkCtx {
    fn set_error(&self, e: Option<String>) {
        let mut st = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        st.sinks.entry(self.spec.name.clone()).or_default().last_error = e;
    }

    fn set_delivered(&self, acked: u64, records: u64) {
        let mut st = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let s = st.sinks.entry(self.spec.name.clone()).or_default();
        s.acked = acked;
        s.delivered_records += records;
    }

    async fn connect(&self) -> Result<Target, String> {
        match self.spec.type_.as_str() {
            "hub" => self
                .hub
                .clone()
                .map(Target::Hub)
                .ok_or_else(|| "this agent has no hub link".to_string()),
            "file" => {
                let path = self.spec.path.clone().unwrap_or_default();
                if let Some(parent) = std::path::Path::new(&path).parent() {
                    let _ = std::fs::create_dir_all(parent);
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map(Target::File)
                    .map_err(|e| format!("cannot open {path}: {e}"))
            }
            #[cfg(feature = "nats")]
            "nats" => NatsTarget::connect(self).await.map(|t| Target::Nats(Box::new(t))),
            other => Err(format!("sink type {other} is not built into this agent")),
        }
    }
}

/// Read the next batch after `after`: records and the last seq covered.
fn read_batch(ctx: &SinkCtx, reader: &mut Reader, upto: u64) -> (Vec<DataRecord>, u64) {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut last = reader.after;
    while out.len() < BATCH_RECORDS && bytes < BATCH_BYTES {
        let e = match reader.next(upto) {
            Ok(Some(e)) => e,
            Ok(None) => break,
            Err(err) => {
                warn!(stream = %ctx.stream, error = %err, "cannot read the spool");
                break;
            }
        };
        last = e.seq;
        if e.kind != KIND_DATA {
            continue;
        }
        bytes += e.payload.len();
        let Ok(d) = serde_json::from_slice::<DataEntry>(&e.payload) else {
            warn!(stream = %ctx.stream, seq = e.seq, "spool entry is not a data entry; skipped");
            continue;
        };
        for (i, o) in d.outs.into_iter().enumerate() {
            out.push(DataRecord {
                id: format!("{}-{}-{i}", ctx.spool_id, e.seq),
                pipeline: ctx.pipeline.clone(),
                stream: ctx.stream.clone(),
                at: o.at,
                kind: o.kind,
                rules: o.rules,
                key: o.key,
                data: o.data,
            });
        }
    }
    (out, last)
}

pub async fn run(mut ctx: SinkCtx) {
    let mut target: Option<Target> = None;
    let mut reader = Reader::new(&ctx.dir, ctx.acked.load(Ordering::Relaxed));
    let mut backoff = outpost_core::retry::Backoff::new(outpost_core::retry::HUB_LINK);
    let mut reported_corrupt = 0u64;
    loop {
        let upto = *ctx.committed.borrow_and_update();
        if reader.after >= upto {
            tokio::select! {
                r = ctx.committed.changed() => if r.is_err() { return },
                _ = ctx.stop.changed() => return,
            }
            continue;
        }
        let start = reader.after;
        let (records, last) = tokio::task::block_in_place(|| read_batch(&ctx, &mut reader, upto));
        if reader.corrupt_spots > reported_corrupt {
            reported_corrupt = reader.corrupt_spots;
            warn!(stream = %ctx.stream, sink = %ctx.spec.name, skipped_bytes = reader.skipped_bytes, spots = reader.corrupt_spots,
                "spool: skipped damaged entries to the end of their segment");
            let mut st = ctx.stats.lock().unwrap_or_else(|p| p.into_inner());
            st.corrupt_bytes = st.corrupt_bytes.max(reader.skipped_bytes);
            st.corrupt_spots = st.corrupt_spots.max(reader.corrupt_spots);
        }
        let result = if records.is_empty() {
            Ok(())
        } else {
            if target.is_none() {
                match ctx.connect().await {
                    Ok(t) => target = Some(t),
                    Err(e) => {
                        ctx.set_error(Some(e.clone()));
                        warn!(stream = %ctx.stream, sink = %ctx.spec.name, error = %e, "sink unavailable");
                    }
                }
            }
            match target.as_mut() {
                Some(t) => send(t, &records).await,
                None => Err("not connected".into()),
            }
        };
        match result {
            Ok(()) => {
                if ctx.acked.load(Ordering::Relaxed) < last {
                    ctx.acked.store(last, Ordering::Relaxed);
                    if let Err(e) = crate::spool::write_cursor(&ctx.dir, &ctx.spec.name, last) {
                        warn!(stream = %ctx.stream, error = %e, "cannot save the sink cursor; records may be sent again");
                    }
                }
                ctx.set_delivered(last, records.len() as u64);
                if !records.is_empty() {
                    debug!(stream = %ctx.stream, sink = %ctx.spec.name, records = records.len(), upto = last, "delivered");
                }
                if backoff_was_failing(&mut backoff) {
                    info!(stream = %ctx.stream, sink = %ctx.spec.name, "sink reachable again");
                    ctx.set_error(None);
                }
            }
            Err(e) => {
                target = None;
                ctx.set_error(Some(e.clone()));
                let d = crate::retry_delay(&mut backoff).min(Duration::from_secs(10));
                debug!(stream = %ctx.stream, sink = %ctx.spec.name, error = %e, retry_in = ?d, "delivery failed; kept in the spool");
                reader = Reader::new(&ctx.dir, start);
                reader.skipped_bytes = 0;
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = ctx.stop.changed() => return,
                }
            }
        }
    }
}

/// Reset the backoff after a success; true when there had been failures.
fn backoff_was_failing(b: &mut outpost_core::retry::Backoff) -> bool {
    let failing = b.failures() > 0;
    b.reset();
    failing
}

async fn send(t: &mut Target, records: &[DataRecord]) -> Result<(), String> {
    match t {
        Target::Hub(hub) => {
            let body = DataBatch {
                records: records.to_vec(),
            };
            let json = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
            let compressed = zstd::bulk::compress(&json, 3).map_err(|e| e.to_string())?;
            let ack: DataAck = hub
                .post_compressed("data", compressed)
                .await
                .map_err(|e| e.to_string())?;
            debug!(stored = ack.stored, sent = records.len(), "hub stored records");
            Ok(())
        }
        Target::File(f) => {
            let mut buf = Vec::new();
            for r in records {
                serde_json::to_writer(&mut buf, r).map_err(|e| e.to_string())?;
                buf.push(b'\n');
            }
            f.write_all(&buf).map_err(|e| e.to_string())?;
            f.sync_data().map_err(|e| e.to_string())
        }
        #[cfg(feature = "nats")]
        Target::Nats(n) => n.publish(records).await,
    }
}

#[cfg(feature = "nats")]
pub struct NatsTarget {
    js: async_nats::jetstream::Context,
    subject: String,
}

#[cfg(feature = "nats")]
impl NatsTarget {
    async fn connect(ctx: &SinkCtx) -> Result<Self, String> {
        let s = &ctx.spec;
        let url = s.url.clone().unwrap_or_default();
        let mut o = async_nats::ConnectOptions::new()
            .name(format!("outpost-agent {}", ctx.node))
            .connection_timeout(Duration::from_secs(5))
            // Connection trouble is reported by the publish that fails; the sender retries.
            .event_callback(|e| async move { debug!(event = %e, "nats") });
        if let (Some(u), Some(p)) = (&s.user, &s.password) {
            o = o.user_and_password(u.clone(), p.clone());
        }
        if let Some(t) = &s.token {
            o = o.token(t.clone());
        }
        if let Some(f) = &s.creds_file {
            o = o
                .credentials_file(f)
                .await
                .map_err(|e| format!("cannot read credentials {f}: {e}"))?;
        }
        if let Some(ca) = &s.ca_file {
            o = o.add_root_certificates(PathBuf::from(ca)).require_tls(true);
        }
        if url.starts_with("tls://") {
            o = o.require_tls(true);
        }
        // Do not wait for a server that is down: connect, or fail and retry later.
        let o = o.max_reconnects(Some(0));
        let client = tokio::time::timeout(Duration::from_secs(6), async_nats::connect_with_options(url.clone(), o))
            .await
            .map_err(|_| format!("NATS server {url} did not answer"))?
            .map_err(|e| format!("cannot connect to NATS {url}: {e}"))?;
        let js = async_nats::jetstream::new(client);
        let subject = s
            .subject
            .clone()
            .unwrap_or_else(|| "outpost.{node}.{stream}".into())
            .replace("{node}", &ctx.node)
            .replace("{pipeline}", &ctx.pipeline)
            .replace("{stream}", &ctx.stream);
        if let Some(name) = &s.jetstream {
            let root = subject.split('.').next().unwrap_or("outpost");
            js.get_or_create_stream(async_nats::jetstream::stream::Config {
                name: name.clone(),
                subjects: vec![format!("{root}.>")],
                duplicate_window: Duration::from_secs(3600),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("cannot create JetStream stream {name}: {e}"))?;
        }
        info!(url = %url, subject = %subject, "connected to NATS");
        Ok(Self { js, subject })
    }

    async fn publish(&mut self, records: &[DataRecord]) -> Result<(), String> {
        let mut acks = Vec::with_capacity(records.len());
        for r in records {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", r.id.as_str());
            let body = serde_json::to_vec(r).map_err(|e| e.to_string())?;
            let ack = self
                .js
                .publish_with_headers(self.subject.clone(), h, body.into())
                .await
                .map_err(|e| format!("publish to {}: {e}", self.subject))?;
            acks.push(ack);
        }
        for a in acks {
            tokio::time::timeout(Duration::from_secs(10), a)
                .await
                .map_err(|_| "JetStream did not acknowledge in 10 s".to_string())?
                .map_err(|e| format!("JetStream refused: {e}"))?;
        }
        Ok(())
    }
}
