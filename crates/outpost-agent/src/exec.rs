//! Remote exec on this node (docs/exec.md): sessions an operator opened at the hub arrive with
//! sync answers; each runs one command in a running workload's container (a process with the
//! workload's environment, working directory and mount namespace, or `docker exec`) or, for a
//! node shell, on the node itself, and streams over the node's own outbound link:
//! `POST exec/{id}/output` carries stdout, stderr and the exit; `GET exec/{id}/input` brings
//! stdin, end of input and terminal sizes. No inbound port.
//!
//! Bounds: the command is killed when it runs past the session's time limit, when its output
//! passes the byte limit, or when the input stream ends (the operator left or the hub ended
//! the session). The Exit frame says which.
//!
//! Must never: run a session in a workload that is not running here, or outlive its limits.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use outpost_api::exec::{
    ExecExit, ExecRequest, Frame, FrameDecoder, DEFAULT_EXEC_MAX_BYTES, DEFAULT_EXEC_TIMEOUT_SECS,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::docker::Engine;
use crate::sync::HubClient;

/// A question to the reconciler: what does this workload run here now?
pub struct Lookup {
    pub workload: String,
    pub namespace: String,
    pub container: Option<String>,
    pub reply: oneshot::Sender<Result<Target, String>>,
}

/// A running container to exec in.
pub struct Target {
    pub unit: String,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub pid: u32,
    /// Docker containers: exec through the engine.
    pub container: Option<(Engine, String)>,
}

/// How long to wait for output still buffered after the command exited (a background child
/// holding the pipe open does not keep the session alive).
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);

/// Run the exec sessions that arrive with sync answers, each in its own task.
pub async fn request_loop(
    client: Arc<HubClient>,
    lookups: mpsc::UnboundedSender<Lookup>,
    mut rx: mpsc::UnboundedReceiver<ExecRequest>,
) {
    while let Some(req) = rx.recv().await {
        let (client, lookups) = (client.clone(), lookups.clone());
        tokio::spawn(async move { session(client, lookups, req).await });
    }
}

/// A command started for a session.
struct Running {
    /// (stderr, bytes) chunks; closed when every output stream ended.
    output: mpsc::Receiver<(bool, Vec<u8>)>,
    /// Bytes for the command's stdin; dropping it closes stdin.
    stdin: Option<mpsc::Sender<Vec<u8>>>,
    /// The command's exit code or signal.
    exit: oneshot::Receiver<ExitInfo>,
    resize: Resize,
    kill: Box<dyn Fn() + Send>,
}

/// Sets the terminal size (rows, columns).
type Resize = Box<dyn Fn(u16, u16) + Send>;

#[derive(Clone, Copy, Debug, Default)]
struct ExitInfo {
    code: Option<i32>,
    signal: Option<i32>,
}

async fn session(client: Arc<HubClient>, lookups: mpsc::UnboundedSender<Lookup>, req: ExecRequest) {
    let id = req.id.clone();
    let limit = Duration::from_secs(req.start.timeout_secs.unwrap_or(DEFAULT_EXEC_TIMEOUT_SECS));
    let (out_tx, out_rx) = mpsc::channel::<Frame>(64);
    // Opening the output stream is what tells the hub the session was taken.
    let frames = futures_util::stream::unfold(out_rx, |mut rx| async move {
        rx.recv().await.map(|f| (Ok::<_, std::io::Error>(f.encode()), rx))
    });
    let post = {
        let (client, path) = (client.clone(), format!("exec/{id}/output"));
        let body = reqwest::Body::wrap_stream(frames);
        tokio::spawn(async move { client.post_stream(&path, body, limit + Duration::from_secs(60)).await })
    };
    let exit = run(&client, lookups, &req, limit, &out_tx).await;
    info!(session = %id, code = ?exit.code, reason = ?exit.reason, "exec session ended");
    let _ = out_tx.send(Frame::Exit(exit)).await;
    drop(out_tx);
    match tokio::time::timeout(Duration::from_secs(30), post).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => warn!(session = %id, error = %e, "exec output stream to the hub failed"),
        _ => warn!(session = %id, "exec output stream to the hub did not finish"),
    }
}

/// Run the session's command; the exit to report.
async fn run(
    client: &HubClient,
    lookups: mpsc::UnboundedSender<Lookup>,
    req: &ExecRequest,
    limit: Duration,
    out: &mpsc::Sender<Frame>,
) -> ExecExit {
    let failed = |reason: String| ExecExit {
        code: None,
        reason: Some(reason),
    };
    let s = &req.start;
    let target = if s.node_shell {
        None
    } else {
        let (reply, answer) = oneshot::channel();
        let asked = lookups.send(Lookup {
            workload: s.workload.clone().unwrap_or_default(),
            namespace: s.namespace.clone(),
            container: s.container.clone(),
            reply,
        });
        match (asked, answer.await) {
            (Ok(()), Ok(Ok(t))) => Some(t),
            (Ok(()), Ok(Err(e))) => return failed(e),
            _ => return failed("the agent is shutting down".into()),
        }
    };
    let input = match client
        .get_stream(&format!("exec/{}/input", req.id), limit + Duration::from_secs(60))
        .await
    {
        Ok(r) => r,
        Err(e) => return failed(format!("cannot open the input stream: {e}")),
    };
    let mut running = match start(target, req).await {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    info!(session = %req.id, workload = ?s.workload, node_shell = s.node_shell, tty = s.tty,
        command = ?s.command, "exec session started");
    if let (Some(rows), Some(cols)) = (s.rows, s.cols) {
        (running.resize)(rows, cols);
    }
    if !s.stdin {
        running.stdin = None;
    }
    // Input frames, decoded as they arrive; the channel closes when the stream ends.
    let (in_tx, mut in_rx) = mpsc::channel::<Frame>(64);
    tokio::spawn(async move {
        let mut body = input.bytes_stream();
        let mut dec = FrameDecoder::default();
        while let Some(Ok(chunk)) = body.next().await {
            dec.push(&chunk);
            while let Ok(Some(f)) = dec.next_frame() {
                if in_tx.send(f).await.is_err() {
                    return;
                }
            }
        }
    });
    let max_bytes = s.max_bytes.unwrap_or(DEFAULT_EXEC_MAX_BYTES);
    let deadline = tokio::time::Instant::now() + limit;
    let mut sent: u64 = 0;
    let mut exited: Option<ExitInfo> = None;
    let mut output_open = true;
    let mut drain_until: Option<tokio::time::Instant> = None;
    let cut = loop {
        if exited.is_some() && !output_open {
            break None;
        }
        tokio::select! {
            c = running.output.recv(), if output_open => match c {
                Some((stderr, bytes)) => {
                    sent += bytes.len() as u64;
                    if sent > max_bytes {
                        break Some(format!("its output passed the session's {max_bytes}-byte limit"));
                    }
                    let make = if stderr { Frame::Stderr } else { Frame::Stdout };
                    for f in Frame::data(&bytes, make) {
                        if out.send(f).await.is_err() {
                            break;
                        }
                    }
                }
                None => output_open = false,
            },
            e = &mut running.exit, if exited.is_none() => {
                exited = Some(e.unwrap_or_default());
                drain_until = Some(tokio::time::Instant::now() + DRAIN_AFTER_EXIT);
            }
            f = in_rx.recv() => match f {
                Some(Frame::Stdin(b)) => {
                    if let Some(tx) = &running.stdin {
                        let _ = tx.send(b).await;
                    }
                }
                Some(Frame::StdinEof) => running.stdin = None,
                Some(Frame::Resize { rows, cols }) => (running.resize)(rows, cols),
                Some(_) => {}
                None => break Some("the operator left (the session's input ended)".into()),
            },
            _ = tokio::time::sleep_until(drain_until.unwrap_or(deadline)), if drain_until.is_some() => output_open = false,
            _ = tokio::time::sleep_until(deadline) => break Some(format!("it ran past the session's {}s limit", limit.as_secs())),
        }
    };
    match cut {
        None => {
            let e = exited.unwrap_or_default();
            ExecExit {
                code: e.code,
                reason: e.signal.map(|s| format!("killed by signal {s}")),
            }
        }
        Some(why) => {
            (running.kill)();
            ExecExit {
                code: None,
                reason: Some(format!("ended by the node: {why}")),
            }
        }
    }
}

async fn start(target: Option<Target>, req: &ExecRequest) -> Result<Running, String> {
    match target {
        Some(Target {
            container: Some((engine, id)),
            ..
        }) => docker(engine, id, req).await,
        Some(t) => process(Some(t), req),
        None => process(None, req),
    }
}

/// Copy a reader into the output channel in chunks.
fn pump<R: tokio::io::AsyncRead + Unpin + Send + 'static>(mut r: R, stderr: bool, tx: mpsc::Sender<(bool, Vec<u8>)>) {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match r.read(&mut buf).await {
                // A pty's master reads EIO once the last slave closed: the end.
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send((stderr, buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
}

/// Write stdin bytes as they come; dropping the sender closes the writer.
fn feed<W: tokio::io::AsyncWrite + Unpin + Send + 'static>(mut w: W) -> mpsc::Sender<Vec<u8>> {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(16);
    tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            if w.write_all(&b).await.is_err() || w.flush().await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    });
    tx
}

fn set_size(fd: i32, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer; a bad fd just fails.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
}

/// A process: in the workload's environment, working directory and mount namespace, or on
/// the node (a node shell: the agent's environment, `/`).
fn process(target: Option<Target>, req: &ExecRequest) -> Result<Running, String> {
    let s = &req.start;
    let exe = &s.command[0];
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(&s.command[1..]);
    let mnt_fd = match &target {
        Some(t) => {
            cmd.env_clear().envs(t.env.iter().cloned()).current_dir(&t.cwd);
            let ours = std::fs::read_link("/proc/self/ns/mnt").ok();
            let theirs = std::fs::read_link(format!("/proc/{}/ns/mnt", t.pid)).ok();
            match theirs.filter(|t| Some(t) != ours.as_ref()) {
                Some(_) => Some(
                    std::fs::File::open(format!("/proc/{}/ns/mnt", t.pid))
                        .map(OwnedFd::from)
                        .map_err(|e| format!("cannot enter {}'s mount namespace: {e}", t.unit))?,
                ),
                None => None,
            }
        }
        None => {
            cmd.current_dir("/");
            None
        }
    };
    if s.tty {
        cmd.env("TERM", std::env::var("TERM").unwrap_or_else(|_| "xterm".into()));
    }
    let (master, slave_raw) = if s.tty {
        let pty = nix_openpty()?;
        (Some(pty.0), Some(pty.1))
    } else {
        (None, None)
    };
    match &slave_raw {
        Some(slave) => {
            let io = |f: &OwnedFd| f.try_clone().map(std::process::Stdio::from).map_err(|e| e.to_string());
            cmd.stdin(io(slave)?).stdout(io(slave)?).stderr(io(slave)?);
        }
        None => {
            cmd.stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
        }
    }
    let tty = s.tty;
    let mnt_raw = mnt_fd.as_ref().map(|f| f.as_raw_fd());
    // SAFETY: only async-signal-safe calls on values prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = mnt_raw {
                if libc::setns(fd, libc::CLONE_NEWNS) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.kill_on_drop(false);
    let mut child = cmd.spawn().map_err(|e| format!("cannot start {exe}: {e}"))?;
    drop(cmd);
    drop(slave_raw);
    drop(mnt_fd);
    let pid = child.id().ok_or("the command exited at once")?;
    let (otx, orx) = mpsc::channel(16);
    let (stdin, resize): (Option<mpsc::Sender<Vec<u8>>>, Resize) = match master {
        Some(m) => {
            let w = m.try_clone().map_err(|e| e.to_string())?;
            let size_fd = m.try_clone().map_err(|e| e.to_string())?;
            pump(tokio::fs::File::from_std(std::fs::File::from(m)), false, otx);
            let stdin = feed(tokio::fs::File::from_std(std::fs::File::from(w)));
            (
                Some(stdin),
                Box::new(move |rows, cols| set_size(size_fd.as_raw_fd(), rows, cols)),
            )
        }
        None => {
            if let Some(o) = child.stdout.take() {
                pump(o, false, otx.clone());
            }
            if let Some(e) = child.stderr.take() {
                pump(e, true, otx);
            }
            (child.stdin.take().map(feed), Box::new(|_, _| {}))
        }
    };
    let (etx, erx) = oneshot::channel();
    tokio::spawn(async move {
        use std::os::unix::process::ExitStatusExt;
        let st = child.wait().await.ok();
        let _ = etx.send(ExitInfo {
            code: st.and_then(|s| s.code()),
            signal: st.and_then(|s| s.signal()),
        });
    });
    Ok(Running {
        output: orx,
        stdin,
        exit: erx,
        resize,
        kill: Box::new(move || crate::runtime::signal_group(pid, nix::sys::signal::Signal::SIGKILL)),
    })
}

/// A pseudo-terminal pair (master, slave).
fn nix_openpty() -> Result<(OwnedFd, OwnedFd), String> {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two fds into valid pointers; name, termios and size may be null.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(format!(
            "cannot open a pseudo-terminal: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: both fds were just opened and are owned here.
    unsafe {
        libc::fcntl(master, libc::F_SETFD, libc::FD_CLOEXEC);
        libc::fcntl(slave, libc::F_SETFD, libc::FD_CLOEXEC);
        Ok((OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)))
    }
}

/// `docker exec` through the engine's API.
async fn docker(engine: Engine, container: String, req: &ExecRequest) -> Result<Running, String> {
    use bollard::exec::{CreateExecOptions, ResizeExecOptions, StartExecOptions, StartExecResults};
    let s = &req.start;
    let created = engine
        .api
        .create_exec(
            &container,
            CreateExecOptions {
                cmd: Some(s.command.clone()),
                attach_stdin: Some(s.stdin || s.tty),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                tty: Some(s.tty),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("cannot exec in container {container}: {e}"))?;
    let started = engine
        .api
        .start_exec(
            &created.id,
            Some(StartExecOptions {
                detach: false,
                tty: s.tty,
                ..Default::default()
            }),
        )
        .await
        .map_err(|e| format!("cannot start the exec in container {container}: {e}"))?;
    let StartExecResults::Attached { mut output, input } = started else {
        return Err("the engine detached the exec".into());
    };
    let (otx, orx) = mpsc::channel(16);
    let (etx, erx) = oneshot::channel();
    let (api, exec_id) = (engine.api.clone(), created.id.clone());
    tokio::spawn(async move {
        use bollard::container::LogOutput;
        while let Some(Ok(chunk)) = output.next().await {
            let stderr = matches!(chunk, LogOutput::StdErr { .. });
            if otx.send((stderr, chunk.into_bytes().to_vec())).await.is_err() {
                break;
            }
        }
        drop(otx);
        let code = api.inspect_exec(&exec_id).await.ok().and_then(|i| i.exit_code);
        let _ = etx.send(ExitInfo {
            code: code.map(|c| c as i32),
            signal: None,
        });
    });
    let (api, exec_id) = (engine.api.clone(), created.id.clone());
    let rt = tokio::runtime::Handle::current();
    let resize = Box::new(move |rows: u16, cols: u16| {
        let (api, id) = (api.clone(), exec_id.clone());
        rt.spawn(async move {
            let _ = api
                .resize_exec(
                    &id,
                    ResizeExecOptions {
                        height: rows,
                        width: cols,
                    },
                )
                .await;
        });
    });
    let (api, exec_id) = (engine.api.clone(), created.id);
    let rt = tokio::runtime::Handle::current();
    let kill = Box::new(move || {
        let (api, id) = (api.clone(), exec_id.clone());
        rt.spawn(async move {
            // The exec's process as the host sees it.
            if let Some(pid) = api.inspect_exec(&id).await.ok().and_then(|i| i.pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        });
    });
    Ok(Running {
        output: orx,
        stdin: Some(feed(input)),
        exit: erx,
        resize,
        kill,
    })
}
