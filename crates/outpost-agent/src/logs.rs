//! Workload logs on the node: rotation, compression, caps, error forwarding, and answers to the
//! operator's log requests.
//!
//! Files: each container writes `<data-dir>/workloads/<key with / as _>/<container>.log` itself
//! (opened O_APPEND by the child, see `runtime`); the agent never sits in the pipe. Rotated
//! segments sit beside it as `<container>.log.<end unix ms>.<lines>.gz` (gzip).
//!
//! Rotation is **copy-then-truncate**, the only way that works while another process appends:
//! the live file is read from 0 to its end and gzipped into `<segment>.tmp`; if it grew during
//! the copy the new bytes are copied too (up to three rounds); the segment is fsynced and
//! renamed, and only then is the live file truncated to 0. The writer's O_APPEND means its next
//! write lands at the new end (0), never at a stale offset, so no hole and no overwrite. What
//! can be lost is only what the writer appended between the last size check and the
//! `ftruncate` (microseconds). A crash before the truncate leaves the data both in the segment
//! and the live file (duplicated, not lost).
//!
//! Caps: a live file is rotated at `OUTPOST_LOG_MAX_BYTES` (default 10 MiB) or after
//! `OUTPOST_LOG_ROTATE_SECS` (default 1 day); segments older than the policy's `log_max_age`
//! (default 7 days) are deleted; when all logs together exceed `OUTPOST_LOG_TOTAL_BYTES`
//! (default 256 MiB) the oldest segments go first, then the biggest live file is truncated.
//! Lines lost to a cap are counted (`meta.log_dropped`, reported in the vitals summary).
//!
//! Error forwarding: every pass reads each live file from its stored offset (in the store, so
//! it survives restarts; an offset past the end means the file was truncated and reading
//! restarts at 0), queues lines matching the policy's patterns in the store's `error_lines`
//! outbox together with the new offset, and [`forward_loop`] sends them in batches when the hub
//! answers (`POST /v1/nodes/{node}/errors`). The queue is capped (`OUTPOST_ERROR_QUEUE_MAX`,
//! default 10000 lines; the oldest are dropped and counted).
//!
//! Must never: write into a live log file other than to truncate it, hold a whole segment in
//! memory, or block the reconciler.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use outpost_api::{ErrorAck, ErrorBatch, LogData, LogRequest, NodePolicy, UnixMs};
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, warn};

use crate::reconcile::now_ms;
use crate::store::Store;
use crate::sync::HubClient;
use outpost_core::retry::{self, Backoff};

/// The largest log answer sent to the hub (the newest part is kept).
pub const ANSWER_MAX: usize = 1 << 20;
/// Longest forwarded error line (longer ones are cut).
pub const LINE_MAX: usize = 2048;
/// Error lines per batch.
pub const BATCH: usize = 500;
/// Bytes read per file per pass when looking for errors.
const READ_CHUNK: u64 = 1 << 20;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[derive(Clone, Debug)]
pub struct LogConfig {
    pub scan_every: Duration,
    pub max_file_bytes: u64,
    pub total_bytes: u64,
    pub rotate_after_ms: i64,
    pub queue_max: usize,
}

impl LogConfig {
    pub fn from_env() -> Self {
        Self {
            scan_every: Duration::from_millis(env_u64("OUTPOST_LOG_SCAN_MS", 5_000).max(50)),
            max_file_bytes: env_u64("OUTPOST_LOG_MAX_BYTES", 10 << 20).max(1024),
            total_bytes: env_u64("OUTPOST_LOG_TOTAL_BYTES", 256 << 20).max(4096),
            rotate_after_ms: env_u64("OUTPOST_LOG_ROTATE_SECS", 86_400) as i64 * 1000,
            queue_max: env_u64("OUTPOST_ERROR_QUEUE_MAX", 10_000) as usize,
        }
    }
}

/// A rotated segment, parsed from its name.
#[derive(Clone, Debug, PartialEq)]
struct Segment {
    path: PathBuf,
    container: String,
    end_ms: i64,
    lines: u64,
    size: u64,
}

fn parse_segment(path: &Path) -> Option<Segment> {
    let name = path.file_name()?.to_str()?;
    let rest = name.strip_suffix(".gz")?;
    let mut parts = rest.rsplitn(3, '.');
    let lines = parts.next()?.parse().ok()?;
    let end_ms = parts.next()?.parse().ok()?;
    let container = parts.next()?.strip_suffix(".log")?.to_string();
    Some(Segment {
        path: path.to_path_buf(),
        container,
        end_ms,
        lines,
        size: std::fs::metadata(path).ok()?.len(),
    })
}

/// Workload key from its directory name (`deployment_default_web`). Names and namespaces are
/// DNS labels/subdomains, which never contain `_`.
fn key_of(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().replace('_', "/"))
        .unwrap_or_default()
}

/// Every workload dir's live logs and segments.
fn inventory(data_dir: &Path) -> (Vec<(String, String, PathBuf)>, Vec<Segment>) {
    let mut live = Vec::new();
    let mut segs = Vec::new();
    let Ok(dirs) = std::fs::read_dir(data_dir.join("workloads")) else {
        return (live, segs);
    };
    for d in dirs.flatten().filter(|d| d.path().is_dir()) {
        let key = key_of(&d.path());
        let Ok(files) = std::fs::read_dir(d.path()) else {
            continue;
        };
        for f in files.flatten() {
            let p = f.path();
            let name = f.file_name().to_string_lossy().into_owned();
            if let Some(c) = name.strip_suffix(".log") {
                live.push((key.clone(), c.to_string(), p));
            } else if let Some(s) = parse_segment(&p) {
                segs.push(s);
            } else if name.ends_with(".gz.tmp") {
                // a rotation interrupted by a crash: the live file still holds the data
                let _ = std::fs::remove_file(&p);
            }
        }
    }
    live.sort();
    segs.sort_by_key(|s| s.end_ms);
    (live, segs)
}

fn is_error(line: &str, patterns: &[String]) -> bool {
    patterns.iter().any(|p| line.contains(p.as_str()))
}

fn cut(line: &str) -> String {
    if line.len() <= LINE_MAX {
        return line.to_string();
    }
    let mut end = LINE_MAX;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &line[..end])
}

/// Matches complete lines in `bytes` (a chunk starting at a line boundary).
fn errors_in(
    bytes: &[u8],
    key: &str,
    container: &str,
    patterns: &[String],
    at: UnixMs,
) -> Vec<(UnixMs, String, String, String)> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter(|l| is_error(l, patterns))
        .map(|l| (at, key.to_string(), container.to_string(), cut(l)))
        .collect()
}

/// What one pass did (for logs and tests).
#[derive(Debug, Default, PartialEq)]
pub struct PassReport {
    pub errors_queued: usize,
    pub rotated: usize,
    pub deleted_segments: usize,
    pub dropped_lines: u64,
}

/// One pass over every log file: errors, rotation, age and total caps.
pub fn pass(data_dir: &Path, store: &Store, policy: &NodePolicy, cfg: &LogConfig, now: UnixMs) -> PassReport {
    let mut rep = PassReport::default();
    let (live, _) = inventory(data_dir);
    // A full or failing disk is reported as a node condition (see `store`); other errors
    // (a file that vanished) only here.
    let mut disk_error: Option<std::io::Error> = None;
    for (key, container, path) in &live {
        if let Err(e) = one_file(store, policy, cfg, key, container, path, now, &mut rep) {
            warn!(file = %path.display(), error = %e, "log pass failed for this file");
            if crate::store::io_is_full(&e) || matches!(e.raw_os_error(), Some(libc::EIO | libc::EROFS)) {
                disk_error = Some(e);
            }
        }
    }
    store.note_io("logs", disk_error.as_ref().map_or(Ok(()), Err));
    // Age cap.
    let (live, mut segs) = inventory(data_dir);
    let oldest_kept = now - policy.log_max_age_secs as i64 * 1000;
    segs.retain(|s| {
        if s.end_ms < oldest_kept {
            let _ = std::fs::remove_file(&s.path);
            rep.deleted_segments += 1;
            false
        } else {
            true
        }
    });
    // Total cap: oldest segments first, then the biggest live file.
    let live_size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let mut total: u64 =
        segs.iter().map(|s| s.size).sum::<u64>() + live.iter().map(|(_, _, p)| live_size(p)).sum::<u64>();
    let mut i = 0;
    while total > cfg.total_bytes && i < segs.len() {
        let s = &segs[i];
        if std::fs::remove_file(&s.path).is_ok() {
            total = total.saturating_sub(s.size);
            rep.deleted_segments += 1;
            rep.dropped_lines += s.lines;
        }
        i += 1;
    }
    if total > cfg.total_bytes {
        if let Some((_, _, p)) = live.iter().max_by_key(|(_, _, p)| live_size(p)) {
            let lines = count_lines(p);
            if OpenOptionsExt::truncate_file(p).is_ok() {
                let _ = store.push_error_lines(&p.display().to_string(), 0, now, &[], cfg.queue_max);
                rep.dropped_lines += lines;
            }
        }
    }
    if rep.dropped_lines > 0 {
        warn!(
            dropped_lines = rep.dropped_lines,
            total_cap = cfg.total_bytes,
            "log size cap reached; oldest lines dropped"
        );
        let _ = store.add_dropped_lines(rep.dropped_lines);
    }
    rep
}

fn count_lines(p: &Path) -> u64 {
    File::open(p)
        .map(|f| BufReader::new(f).split(b'\n').count() as u64)
        .unwrap_or(0)
}

struct OpenOptionsExt;
impl OpenOptionsExt {
    fn truncate_file(p: &Path) -> std::io::Result<()> {
        std::fs::OpenOptions::new().write(true).open(p)?.set_len(0)
    }
}

#[allow(clippy::too_many_arguments)]
fn one_file(
    store: &Store,
    policy: &NodePolicy,
    cfg: &LogConfig,
    key: &str,
    container: &str,
    path: &Path,
    now: UnixMs,
    rep: &mut PassReport,
) -> std::io::Result<()> {
    let id = path.display().to_string();
    let len = std::fs::metadata(path)?.len();
    let (mut offset, started) = store.log_offset(&id).ok().flatten().unwrap_or((0, now));
    if offset > len {
        offset = 0; // truncated under us (rotation or the workload itself)
    }
    let rotate = len >= cfg.max_file_bytes || (len > 0 && now - started >= cfg.rotate_after_ms);
    if rotate {
        return rotate_file(store, policy, cfg, key, container, path, offset, now, rep);
    }
    if offset == len {
        if store.log_offset(&id).ok().flatten().is_none() {
            let _ = store.push_error_lines(&id, offset, started, &[], cfg.queue_max);
        }
        return Ok(());
    }
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::new();
    f.take(READ_CHUNK.min(len - offset)).read_to_end(&mut buf)?;
    // consume complete lines only, unless a single line fills the whole chunk
    let upto = match buf.iter().rposition(|b| *b == b'\n') {
        Some(i) => i + 1,
        None if buf.len() as u64 >= READ_CHUNK => buf.len(),
        None => return Ok(()),
    };
    let lines = errors_in(&buf[..upto], key, container, &policy.error_patterns, now);
    rep.errors_queued += lines.len();
    let dropped = store
        .push_error_lines(&id, offset + upto as u64, started, &lines, cfg.queue_max)
        .map_err(std::io::Error::other)?;
    if dropped > 0 {
        warn!(
            dropped_lines = dropped,
            "error-line queue full; oldest queued lines dropped"
        );
    }
    Ok(())
}

/// Copy-then-truncate (see the module doc). Error lines past `offset` are matched on the way.
#[allow(clippy::too_many_arguments)]
fn rotate_file(
    store: &Store,
    policy: &NodePolicy,
    cfg: &LogConfig,
    key: &str,
    container: &str,
    path: &Path,
    offset: u64,
    now: UnixMs,
    rep: &mut PassReport,
) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!("{container}.log.{now}.gz.tmp"));
    let r = copy_and_truncate(store, policy, cfg, key, container, path, offset, now, rep, dir, &tmp);
    if r.is_err() {
        // a full disk must not keep the partial copy: it holds the space the live file needs
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

#[allow(clippy::too_many_arguments)]
fn copy_and_truncate(
    store: &Store,
    policy: &NodePolicy,
    cfg: &LogConfig,
    key: &str,
    container: &str,
    path: &Path,
    offset: u64,
    now: UnixMs,
    rep: &mut PassReport,
    dir: &Path,
    tmp: &Path,
) -> std::io::Result<()> {
    let mut src = File::open(path)?;
    let mut gz = flate2::write::GzEncoder::new(File::create(tmp)?, flate2::Compression::fast());
    let mut copied = 0u64;
    let mut lines = 0u64;
    let mut errors = Vec::new();
    let mut carry: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    for _round in 0..3 {
        let end = src.metadata()?.len();
        while copied < end {
            let n = src.read(&mut buf)?;
            if n == 0 {
                break;
            }
            let chunk = &buf[..n];
            gz.write_all(chunk)?;
            lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
            // error matching for the part not yet scanned
            let start = offset.saturating_sub(copied).min(n as u64) as usize;
            carry.extend_from_slice(&chunk[start..]);
            copied += n as u64;
            if let Some(i) = carry.iter().rposition(|b| *b == b'\n') {
                errors.extend(errors_in(&carry[..=i], key, container, &policy.error_patterns, now));
                carry.drain(..=i);
            }
        }
        if src.metadata()?.len() == copied {
            break;
        }
    }
    if !carry.is_empty() {
        errors.extend(errors_in(&carry, key, container, &policy.error_patterns, now));
        lines += 1;
    }
    let file = gz.finish()?;
    file.sync_all()?;
    drop(file);
    let seg = dir.join(format!("{container}.log.{now}.{lines}.gz"));
    std::fs::rename(tmp, &seg)?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    std::fs::OpenOptions::new().write(true).open(path)?.set_len(0)?;
    rep.rotated += 1;
    rep.errors_queued += errors.len();
    let id = path.display().to_string();
    store
        .push_error_lines(&id, 0, now, &errors, cfg.queue_max)
        .map_err(std::io::Error::other)?;
    info!(file = %path.display(), bytes = copied, lines, segment = %seg.display(), "log rotated");
    Ok(())
}

/// Rotation, caps and error matching every `scan_every`, until shutdown.
pub async fn log_loop(
    data_dir: PathBuf,
    store: Arc<Store>,
    policy: watch::Receiver<NodePolicy>,
    cfg: LogConfig,
    errors_ready: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (d, s, p, c) = (data_dir.clone(), store.clone(), policy.borrow().clone(), cfg.clone());
        match tokio::task::spawn_blocking(move || pass(&d, &s, &p, &c, now_ms())).await {
            Ok(rep) => {
                if rep != PassReport::default() {
                    debug!(?rep, "log pass");
                }
                if rep.errors_queued > 0 || rep.dropped_lines > 0 {
                    errors_ready.notify_one();
                }
            }
            Err(e) => warn!(error = %e, "log pass panicked"),
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.scan_every) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Send queued error lines in batches while the hub answers; keep them while it does not.
pub async fn forward_loop(
    client: Arc<HubClient>,
    store: Arc<Store>,
    ready: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(retry::HUB_LINK);
    let mut sent_dropped = u64::MAX;
    loop {
        let lines = store.error_lines_to_send(BATCH).unwrap_or_default();
        let dropped = store.dropped_lines();
        let wait = if lines.is_empty() && dropped == sent_dropped {
            None
        } else {
            let n = lines.len();
            let batch = ErrorBatch {
                lines,
                dropped_lines: dropped,
            };
            match client.post_json::<_, ErrorAck>("errors", &batch).await {
                Ok(ack) => {
                    // the first answer after a new state database confirms its line sequence
                    let more = store.ack_error_lines(ack.acked).unwrap_or(false);
                    sent_dropped = dropped;
                    backoff.reset();
                    debug!(lines = n, acked = ack.acked, "error lines forwarded");
                    if n >= BATCH || more {
                        continue;
                    }
                    None
                }
                Err(e) => {
                    debug!(error = %e, "cannot forward error lines; keeping them");
                    Some(crate::retry_delay(&mut backoff))
                }
            }
        };
        tokio::select! {
            _ = ready.notified(), if wait.is_none() => {}
            _ = tokio::time::sleep(wait.unwrap_or(Duration::from_secs(60))) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Keep only the last `max` bytes read from `r`, starting at a line boundary when cut.
fn tail_bytes(mut r: impl Read, max: usize) -> (Vec<u8>, bool) {
    let mut out: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut cut = false;
    while let Ok(n) = r.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if out.len() > 2 * max {
            out.drain(..out.len() - max);
            cut = true;
        }
    }
    if out.len() > max {
        out.drain(..out.len() - max);
        cut = true;
    }
    (out, cut)
}

/// Answer one log request from the files on disk. Pure file reading; no network.
pub fn read_logs(data_dir: &Path, req: &LogRequest, now: UnixMs) -> LogData {
    let dir = data_dir.join("workloads").join(crate::runtime::dir_name(&req.workload));
    let mut containers: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_suffix(".log").map(String::from))
                .collect()
        })
        .unwrap_or_default();
    containers.sort();
    let fail = |msg: String| LogData {
        error: Some(msg),
        ..Default::default()
    };
    let container = match &req.container {
        Some(c) if containers.contains(c) => c.clone(),
        Some(c) => {
            return fail(format!(
                "no log for container {c:?} of {}; containers with logs: {}",
                req.workload,
                if containers.is_empty() {
                    "none".into()
                } else {
                    containers.join(", ")
                }
            ))
        }
        None => match containers.first() {
            Some(c) => c.clone(),
            None => {
                return fail(format!(
                    "{} has no logs on this node (is it placed here?)",
                    req.workload
                ))
            }
        },
    };
    let live = dir.join(format!("{container}.log"));
    let len = std::fs::metadata(&live).map(|m| m.len()).unwrap_or(0);
    if let Some(from) = req.from_offset {
        let from = if from > len { 0 } else { from };
        let mut text = Vec::new();
        if let Ok(mut f) = File::open(&live) {
            let _ = f.seek(SeekFrom::Start(from));
            let _ = f.take((len - from).min(ANSWER_MAX as u64)).read_to_end(&mut text);
        }
        let offset = from + text.len() as u64;
        return LogData {
            container,
            text: String::from_utf8_lossy(&text).into_owned(),
            offset,
            truncated: false,
            error: None,
        };
    }
    // Newest first: the live file, then segments from the newest, until enough is collected.
    let since = req.since_secs.map(|s| outpost_api::ms_before(now, s));
    let (_, segs) = inventory(data_dir);
    let mut sources: Vec<PathBuf> = vec![live.clone()];
    sources.extend(
        segs.iter()
            .rev()
            .filter(|s| s.path.parent() == Some(dir.as_path()) && s.container == container)
            .filter(|s| since.is_none_or(|t| s.end_ms >= t))
            .map(|s| s.path.clone()),
    );
    let want_lines = req.tail.map(|t| t as usize);
    let mut parts: Vec<Vec<u8>> = Vec::new();
    let mut size = 0usize;
    let mut truncated = false;
    for p in sources {
        let Ok(f) = File::open(&p) else { continue };
        let (bytes, cut) = if p.extension().is_some_and(|e| e == "gz") {
            tail_bytes(flate2::read::GzDecoder::new(f), ANSWER_MAX)
        } else {
            tail_bytes(f, ANSWER_MAX)
        };
        size += bytes.len();
        parts.push(bytes);
        let lines: usize = parts.iter().map(|b| b.iter().filter(|c| **c == b'\n').count()).sum();
        if cut || size >= ANSWER_MAX {
            truncated = true;
            break;
        }
        if want_lines.is_some_and(|w| lines >= w) {
            break;
        }
    }
    parts.reverse();
    let all: Vec<u8> = parts.concat();
    let mut text = String::from_utf8_lossy(&all).into_owned();
    if let Some(n) = want_lines {
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(n);
        text = lines[start..].iter().map(|l| format!("{l}\n")).collect();
    }
    if text.len() > ANSWER_MAX {
        let mut start = text.len() - ANSWER_MAX;
        while !text.is_char_boundary(start) {
            start += 1;
        }
        text = text[start..].to_string();
        truncated = true;
    }
    LogData {
        container,
        text,
        offset: len,
        truncated,
        error: None,
    }
}

/// Answer the operator's log requests that arrive with sync answers.
pub async fn request_loop(client: Arc<HubClient>, data_dir: PathBuf, mut rx: mpsc::UnboundedReceiver<LogRequest>) {
    while let Some(req) = rx.recv().await {
        let (client, dir) = (client.clone(), data_dir.clone());
        tokio::spawn(async move {
            let r = req.clone();
            let data = tokio::task::spawn_blocking(move || read_logs(&dir, &r, now_ms()))
                .await
                .unwrap_or_else(|e| LogData {
                    error: Some(format!("reading logs failed: {e}")),
                    ..Default::default()
                });
            let path = format!("logs/{}", req.id);
            match client.post_json::<_, serde_json::Value>(&path, &data).await {
                Ok(_) => {
                    debug!(request = %req.id, workload = %req.workload, bytes = data.text.len(), "log request answered")
                }
                Err(e) => warn!(request = %req.id, error = %e, "cannot answer a log request"),
            }
        });
    }
}

/// Containers' log files per workload key, for tests and `outpost` diagnostics.
pub fn files(data_dir: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let (live, segs) = inventory(data_dir);
    let mut out: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for (k, _, p) in live {
        out.entry(k).or_default().push(p);
    }
    for s in segs {
        if let Some(k) = s.path.parent().map(key_of) {
            out.entry(k).or_default().push(s.path);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Store, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        store.init_monitoring().unwrap();
        let wdir = dir.path().join("workloads/daemonset_default_app");
        std::fs::create_dir_all(&wdir).unwrap();
        (dir, store, wdir.join("main.log"))
    }

    fn cfg() -> LogConfig {
        LogConfig {
            scan_every: Duration::from_millis(100),
            max_file_bytes: 4096,
            total_bytes: 64 * 1024,
            rotate_after_ms: 86_400_000,
            queue_max: 100,
        }
    }

    fn append(p: &Path, s: &str) {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(p).unwrap();
        f.write_all(s.as_bytes()).unwrap();
    }

    #[test]
    fn errors_are_queued_once_and_offsets_survive_truncation() {
        let (dir, store, log) = setup();
        let policy = NodePolicy::default();
        append(&log, "ok\nERROR one\nfine\npanic: two\npartial ERR");
        let r = pass(dir.path(), &store, &policy, &cfg(), 1);
        assert_eq!(r.errors_queued, 2);
        assert_eq!(
            pass(dir.path(), &store, &policy, &cfg(), 2).errors_queued,
            0,
            "not twice"
        );
        append(&log, "OR three\n");
        assert_eq!(
            pass(dir.path(), &store, &policy, &cfg(), 3).errors_queued,
            1,
            "the completed line"
        );
        // someone truncates the file: reading restarts at 0
        std::fs::OpenOptions::new()
            .write(true)
            .open(&log)
            .unwrap()
            .set_len(0)
            .unwrap();
        append(&log, "FATAL four\n");
        assert_eq!(pass(dir.path(), &store, &policy, &cfg(), 4).errors_queued, 1);
        let q = store.pending_error_lines(10).unwrap();
        let lines: Vec<&str> = q.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(lines, ["ERROR one", "panic: two", "partial ERROR three", "FATAL four"]);
        assert_eq!(
            (q[0].workload.as_str(), q[0].container.as_str()),
            ("daemonset/default/app", "main")
        );
    }

    #[test]
    fn rotation_compresses_keeps_every_line_and_caps_hold() {
        let (dir, store, log) = setup();
        let policy = NodePolicy::default();
        let mut written = 0;
        for round in 0..40 {
            let mut s = String::new();
            for i in 0..50 {
                s.push_str(&format!("line {round}-{i} {}\n", "x".repeat(40)));
                written += 1;
            }
            append(&log, &s);
            pass(dir.path(), &store, &policy, &cfg(), 1000 + round);
        }
        let (live, segs) = inventory(dir.path());
        assert_eq!(live.len(), 1);
        assert!(!segs.is_empty(), "rotated");
        let total: u64 = segs.iter().map(|s| s.size).sum::<u64>() + std::fs::metadata(&log).unwrap().len();
        assert!(total <= cfg().total_bytes, "total {total}");
        // every line is either in a segment, in the live file, or counted as dropped
        let in_segs: u64 = segs.iter().map(|s| s.lines).sum();
        let live_lines = count_lines(&log);
        assert_eq!(in_segs + live_lines + store.dropped_lines(), written);
        // a segment decompresses to whole lines
        let mut text = String::new();
        flate2::read::GzDecoder::new(File::open(&segs[0].path).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text.lines().count() as u64, segs[0].lines);
        assert!(text.lines().all(|l| l.starts_with("line ")));

        // a tiny total cap drops old segments and counts their lines
        let small = LogConfig {
            total_bytes: 4096,
            ..cfg()
        };
        let before = store.dropped_lines();
        let r = pass(dir.path(), &store, &policy, &small, 5000);
        assert!(
            r.dropped_lines > 0 && store.dropped_lines() == before + r.dropped_lines,
            "{r:?}"
        );
        // age cap
        let r = pass(dir.path(), &store, &policy, &cfg(), 5000 + 8 * 86_400_000);
        let (_, segs) = inventory(dir.path());
        assert!(segs.iter().all(|s| s.end_ms == 5000 + 8 * 86_400_000), "{r:?} {segs:?}");
        assert!(r.deleted_segments > 0, "{r:?}");
    }

    #[test]
    fn log_requests_tail_follow_and_name_containers() {
        let (dir, store, log) = setup();
        let policy = NodePolicy::default();
        let small = LogConfig {
            max_file_bytes: 1024,
            ..cfg()
        };
        for i in 0..100 {
            append(&log, &format!("n{i:03} {}\n", "y".repeat(20)));
            if i % 10 == 9 {
                pass(dir.path(), &store, &policy, &small, 1000 + i);
            }
        }
        append(&log, "last\n");
        let req = |tail, from_offset| LogRequest {
            id: "r".into(),
            workload: "daemonset/default/app".into(),
            container: None,
            tail,
            since_secs: None,
            from_offset,
        };
        let all = read_logs(dir.path(), &req(None, None), 2000);
        assert_eq!(all.error, None);
        let lines: Vec<&str> = all.text.lines().collect();
        assert_eq!(lines.len(), 101, "segments and live file, in order");
        assert!(lines[0].starts_with("n000") && lines[99].starts_with("n099") && lines[100] == "last");
        let t = read_logs(dir.path(), &req(Some(3), None), 2000);
        assert_eq!(t.text, format!("n098 {0}\nn099 {0}\nlast\n", "y".repeat(20)));
        append(&log, "more\n");
        let f = read_logs(dir.path(), &req(None, Some(t.offset)), 2000);
        assert_eq!((f.text.as_str(), f.offset), ("more\n", t.offset + 5));
        let mut bad = req(None, None);
        bad.container = Some("nope".into());
        assert!(read_logs(dir.path(), &bad, 0)
            .error
            .unwrap()
            .contains("containers with logs: main"));
    }
}
