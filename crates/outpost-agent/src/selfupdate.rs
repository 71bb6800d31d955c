//! Agent self-update: the node switches to the binary its desired state names
//! (`kind: AgentUpdate`), and goes back to the old one by itself when the new one does not
//! prove healthy. The decisions are `outpost_core::agent_update`'s; this module does the I/O.
//!
//! On-disk state, in `<data-dir>/update/`:
//! - `previous`: the binary that ran before the update (restored on failure);
//! - `pending.json`: the update in progress ([`Pending`]: from, to, deadline), written before the
//!   swap;
//! - `healthy-<hex>`: written by the new agent once its first status report reached the hub;
//! - `failed.json`: digests this node tried and rolled back (never tried again);
//! - `rolled-back.json`: left by the watchdog for the restored agent to report as an event;
//! - `blobs/`: downloads (resumable `.partial`, digest-checked, as images are).
//!
//! The swap: download, copy the running executable to `previous`, write `pending.json`, start
//! the watchdog from `previous` (so it never depends on the new binary), rename the new binary
//! over the executable (atomic, same directory), and `exec` it with the same arguments. `exec`
//! keeps the process id, so process workloads stay its children and are adopted by the new
//! agent (containers are the engine's): no workload restarts. The watchdog
//! (`outpost agent update-watchdog`) waits for `healthy-<hex>`; if the agent dies first or the
//! deadline passes, it renames `previous` back, records the digest in `failed.json`, kills the
//! new agent if it still runs, and starts the old binary (under systemd it lets `Restart=always`
//! do that).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use outpost_api::{now_ms, ImageTag, RolloutState, RolloutStatus};
use outpost_core::agent_update::{decide, on_start, Pending, StartAction, UpdateAction};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::store::{Desired, Store};
use crate::sync::HubClient;

static OWN: OnceLock<String> = OnceLock::new();
static DIR: OnceLock<PathBuf> = OnceLock::new();
static TRIAL: AtomicBool = AtomicBool::new(false);

/// `sha256:<hex>` of the running executable.
pub fn own_digest() -> &'static str {
    OWN.get_or_init(|| {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
        match std::fs::read(&exe) {
            Ok(b) => format!("sha256:{}", hex::encode(Sha256::digest(&b))),
            Err(_) => "sha256:unknown".into(),
        }
    })
}

/// What the agent reports as its version: the crate version and its binary's digest prefix,
/// so two builds of one version are told apart (`outpost get nodes`).
pub fn version() -> String {
    let d = own_digest().strip_prefix("sha256:").unwrap_or("");
    format!("{}+{}", env!("CARGO_PKG_VERSION"), &d[..d.len().min(12)])
}

fn dir() -> Option<&'static PathBuf> {
    DIR.get()
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

fn read_json<T: serde::de::DeserializeOwned>(p: &Path) -> Option<T> {
    std::fs::read(p).ok().and_then(|b| serde_json::from_slice(&b).ok())
}

fn write_json<T: serde::Serialize>(p: &Path, v: &T) -> std::io::Result<()> {
    crate::identity::write_atomic(p, &serde_json::to_vec(v).unwrap_or_default(), 0o644)
}

fn failed_list(dir: &Path) -> Vec<String> {
    read_json(&dir.join("failed.json")).unwrap_or_default()
}

/// The update gate of an AgentUpdate on this node (decided by
/// `outpost_core::agent_update::gate`), with the reason and time of its last change.
pub fn gate_status(data_dir: &Path, run: &outpost_api::AgentUpdateRun, revision: u64, hash: &str) -> RolloutStatus {
    let dir = data_dir.join("update");
    let mtime = |p: PathBuf| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as i64)
    };
    let state = outpost_core::agent_update::gate(own_digest(), run, &failed_list(&dir));
    let (reason, since) = match state {
        RolloutState::Complete => (None, mtime(dir.join(format!("healthy-{}", hex_of(&run.digest))))),
        RolloutState::RolledBack => (
            Some(format!(
                "the agent {} did not report to the hub within {} s; the watchdog restored {}",
                run.version.as_deref().unwrap_or(&run.digest),
                run.health_deadline_seconds,
                version()
            )),
            mtime(dir.join("failed.json")),
        ),
        _ => (None, mtime(dir.join("pending.json"))),
    };
    RolloutStatus {
        state,
        target_revision: revision,
        target_hash: hash.to_string(),
        good_revision: None,
        reason,
        since,
    }
}

/// Put `bin` at `exe` atomically: copy beside it, then rename over it.
fn replace_executable(bin: &Path, exe: &Path) -> std::io::Result<()> {
    let bytes = std::fs::read(bin)?;
    let tmp = exe.with_file_name(format!(
        ".{}.swap",
        exe.file_name().and_then(|n| n.to_str()).unwrap_or("outpost")
    ));
    crate::identity::write_atomic(&tmp, &bytes, 0o755)?;
    std::fs::rename(&tmp, exe)
}

/// At agent start: note an update in progress (this may be the new binary on trial), and
/// report a rollback the watchdog did.
pub fn at_start(data_dir: &Path, store: &Store) {
    let dir = data_dir.join("update");
    let _ = DIR.set(dir.clone());
    let own = own_digest();
    if let Some(rb) = read_json::<serde_json::Value>(&dir.join("rolled-back.json")) {
        let msg = format!(
            "agent update to {} was rolled back: {}; running {} again",
            rb["digest"].as_str().unwrap_or("?"),
            rb["reason"].as_str().unwrap_or("it did not become healthy in time"),
            version()
        );
        warn!("{msg}");
        let _ = store.push_event(now_ms(), None, "AgentUpdateRolledBack", &msg);
        let _ = std::fs::remove_file(dir.join("rolled-back.json"));
    }
    let pending: Option<Pending> = read_json(&dir.join("pending.json"));
    let healthy = pending
        .as_ref()
        .is_some_and(|p| dir.join(format!("healthy-{}", hex_of(&p.to))).exists());
    match on_start(own, pending.as_ref(), healthy, now_ms()) {
        StartAction::Nothing => {}
        StartAction::Trial => {
            info!(version = %version(), "running an agent update on trial; healthy after the first report to the hub");
            TRIAL.store(true, Ordering::SeqCst);
        }
        StartAction::Failed => {
            let _ = std::fs::remove_file(dir.join("pending.json"));
        }
        StartAction::Restore => {
            // The watchdog did not act (it died with the box): restore now and run the old binary.
            if let Some(p) = pending {
                restore(&dir, &p, "the new agent was not healthy by its deadline");
                if let Ok(exe) = std::env::current_exe() {
                    let err = exec_self(&exe);
                    error!(error = %err, "cannot start the restored agent");
                }
            }
        }
    }
}

/// The new agent reached the hub: it is healthy.
pub fn on_reported(store: &Store) {
    if !TRIAL.swap(false, Ordering::SeqCst) {
        return;
    }
    let Some(dir) = dir() else { return };
    let Some(p) = read_json::<Pending>(&dir.join("pending.json")) else {
        return;
    };
    if let Err(e) = std::fs::write(dir.join(format!("healthy-{}", hex_of(&p.to))), b"ok") {
        error!(error = %e, "cannot mark the agent update healthy; it will be rolled back");
        return;
    }
    let msg = format!("agent updated to {} (from {})", version(), p.from);
    info!("{msg}");
    let _ = store.push_event(now_ms(), None, "AgentUpdated", &msg);
}

fn restore(dir: &Path, p: &Pending, reason: &str) {
    let exe = std::env::current_exe().ok();
    if let Some(exe) = exe {
        if let Err(e) = replace_executable(&dir.join("previous"), &exe) {
            error!(error = %e, "cannot restore the previous agent binary");
        }
    }
    let mut failed = failed_list(dir);
    if !failed.contains(&p.to) {
        failed.push(p.to.clone());
    }
    let _ = write_json(&dir.join("failed.json"), &failed);
    let _ = write_json(
        &dir.join("rolled-back.json"),
        &serde_json::json!({"digest": p.to, "reason": reason}),
    );
    let _ = std::fs::remove_file(dir.join("pending.json"));
}

/// Replace this process with `exe`, same arguments. Returns only on failure.
fn exec_self(exe: &Path) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    std::process::Command::new(exe).args(args).exec()
}

/// Follow the desired state's AgentUpdate: download, swap, exec.
pub async fn update_loop(
    client: Arc<HubClient>,
    data_dir: PathBuf,
    store: Arc<Store>,
    mut desired: watch::Receiver<Arc<Desired>>,
    mut stop: watch::Receiver<bool>,
) {
    let dir = data_dir.join("update");
    let mut backoff = outpost_core::retry::Backoff::new(outpost_core::retry::HUB_LINK);
    loop {
        let want = desired
            .borrow_and_update()
            .workloads
            .values()
            .find_map(|w| w.agent_update.clone());
        let pending: Option<Pending> = read_json(&dir.join("pending.json"));
        let wait = match decide(own_digest(), want.as_ref(), &failed_list(&dir), pending.as_ref()) {
            UpdateAction::Nothing => None,
            UpdateAction::Update { digest, deadline_ms } => {
                match update(&client, &dir, &store, &digest, deadline_ms).await {
                    Ok(never) => match never {},
                    Err(e) => {
                        warn!(digest = %digest, error = %e, "agent update not applied; retrying");
                        Some(crate::retry_delay(&mut backoff))
                    }
                }
            }
        };
        tokio::select! {
            r = desired.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(wait.unwrap_or(Duration::from_secs(3600))), if wait.is_some() => {}
            _ = stop.changed() => return,
        }
    }
}

enum Never {}

async fn update(
    client: &HubClient,
    dir: &Path,
    store: &Store,
    digest: &str,
    deadline_ms: u64,
) -> Result<Never, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the running executable: {e}"))?;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let tag = ImageTag {
        name: "outpost-agent".into(),
        digest: digest.into(),
        size: 0,
        pushed_at: 0,
    };
    info!(digest, "downloading the agent update");
    let bin = crate::images::download(client, &dir.join("blobs"), &tag).await?;
    std::fs::copy(&exe, dir.join("previous")).map_err(|e| format!("cannot keep the running binary: {e}"))?;
    let _ = std::fs::File::open(dir.join("previous")).and_then(|f| f.sync_all());
    let pending = Pending {
        from: own_digest().to_string(),
        to: digest.to_string(),
        deadline: now_ms() + deadline_ms as i64,
    };
    write_json(&dir.join("pending.json"), &pending).map_err(|e| format!("cannot record the update: {e}"))?;
    // The watchdog runs the old binary: it never depends on the new one.
    let watchdog = {
        use std::os::unix::process::CommandExt;
        let mut c = std::process::Command::new(dir.join("previous"));
        c.args(["agent", "update-watchdog", "--dir"])
            .arg(dir)
            .arg("--exe")
            .arg(&exe)
            .arg("--pid")
            .arg(std::process::id().to_string())
            .arg("--")
            .args(std::env::args_os().skip(1))
            .stdin(std::process::Stdio::null());
        // SAFETY: setsid only, between fork and exec.
        unsafe {
            c.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        c.spawn()
    };
    if let Err(e) = watchdog {
        let _ = std::fs::remove_file(dir.join("pending.json"));
        return Err(format!("cannot start the update watchdog: {e}"));
    }
    let msg = format!("switching the agent from {} to {digest}", version());
    info!("{msg}");
    let _ = store.push_event(now_ms(), None, "AgentUpdating", &msg);
    if let Err(e) = replace_executable(&bin, &exe) {
        let _ = std::fs::remove_file(dir.join("pending.json"));
        return Err(format!("cannot replace {}: {e}", exe.display()));
    }
    let err = exec_self(&exe);
    // exec failed: the watchdog sees this agent keep running unhealthy and restores at the deadline
    Err(format!("cannot start the new agent: {err}"))
}

/// `outpost agent update-watchdog`: restore the previous binary unless the new agent marks
/// itself healthy in time. Runs the old binary; blocks until decided.
pub fn watchdog(dir: &Path, exe: &Path, pid: u32, args: &[String]) -> anyhow::Result<()> {
    let Some(p) = read_json::<Pending>(&dir.join("pending.json")) else {
        return Ok(());
    };
    let marker = dir.join(format!("healthy-{}", hex_of(&p.to)));
    loop {
        // SAFETY: kill(pid, 0) only probes for existence.
        let alive = unsafe { libc::kill(pid as i32, 0) } == 0
            && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "));
        match outpost_core::agent_update::watchdog(marker.exists(), alive, now_ms(), p.deadline) {
            None => std::thread::sleep(Duration::from_millis(250)),
            Some(false) => {
                let _ = std::fs::remove_file(dir.join("pending.json"));
                return Ok(());
            }
            Some(true) => break,
        }
    }
    let reason = "it did not report to the hub in time";
    replace_executable(&dir.join("previous"), exe)?;
    let mut failed = failed_list(dir);
    if !failed.contains(&p.to) {
        failed.push(p.to.clone());
    }
    write_json(&dir.join("failed.json"), &failed)?;
    write_json(
        &dir.join("rolled-back.json"),
        &serde_json::json!({"digest": p.to, "reason": reason}),
    )?;
    let _ = std::fs::remove_file(dir.join("pending.json"));
    eprintln!(
        "outpost update-watchdog: {} {reason}; restored the previous agent binary",
        p.to
    );
    // SAFETY: plain kill(2) of the agent that failed its trial (its workloads have their own sessions).
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    if std::env::var_os("INVOCATION_ID").is_some() {
        return Ok(()); // systemd restarts the service from the restored binary
    }
    use std::os::unix::process::CommandExt;
    let mut c = std::process::Command::new(exe);
    c.args(args).stdin(std::process::Stdio::null());
    // SAFETY: setsid only, between fork and exec.
    unsafe {
        c.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    c.spawn()?;
    Ok(())
}
