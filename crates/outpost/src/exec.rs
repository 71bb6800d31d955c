//! `outpost exec NODE WORKLOAD -- CMD...`: run a command in a workload's container on a node,
//! through the hub and the node's own outbound link (docs/exec.md). The output streams back as
//! it comes; `-i` sends stdin, `-t` asks for a terminal (the local one is put in raw mode and its
//! size follows). The exit code is the command's.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{bail, Result};
use futures_util::StreamExt;
use outpost_api::exec::{ExecStart, Frame, FrameDecoder, DEFAULT_EXEC_TIMEOUT_SECS, EXEC_SESSION_HEADER};
use tokio::io::AsyncReadExt;

use crate::client::Client;

#[derive(clap::Args)]
pub struct ExecArgs {
    /// The node (as in `outpost get nodes`).
    node: String,
    /// The workload: NAME or KIND/NAME (omit with --node-shell).
    workload: Option<String>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
    /// Container of a multi-container workload (default: the first).
    #[arg(short = 'c', long)]
    container: Option<String>,
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// Pass stdin to the command.
    #[arg(short = 'i', long)]
    stdin: bool,
    /// Run the command under a terminal.
    #[arg(short = 't', long)]
    tty: bool,
    /// Run on the node itself, outside any workload (admins only).
    #[arg(long)]
    node_shell: bool,
    /// End the command after this long (default 15m, at most 4h).
    #[arg(long, value_parser = crate::parse_duration)]
    timeout: Option<Duration>,
}

/// The local terminal in raw mode while it lives.
struct RawMode(Option<libc::termios>);

impl RawMode {
    fn enter() -> Self {
        // SAFETY: tcgetattr/tcsetattr on fd 0 with a valid termios; failures leave it untouched.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return Self(None);
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            if libc::tcsetattr(0, libc::TCSANOW, &t) != 0 {
                return Self(None);
            }
            Self(Some(saved))
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = self.0 {
            // SAFETY: restoring the attributes read in `enter`.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        }
    }
}

fn window_size() -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ writes a winsize into a valid pointer.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        (libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
    }
}

/// Send input frames of session `id`, in order.
async fn send_input(c: &Client, id: &str, frames: Vec<Frame>) -> Result<()> {
    let (http, hub) = c.http();
    let body: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
    c.stream(
        http.post(format!("{hub}/v1/exec/{id}/input")).body(body),
        Duration::from_secs(60),
    )
    .await?;
    Ok(())
}

/// Run the command; returns the process exit code for `outpost`.
pub async fn run(c: &Client, a: ExecArgs) -> Result<i32> {
    if a.node_shell && a.workload.is_some() {
        bail!("--node-shell runs outside every workload: drop the workload argument");
    }
    if !a.node_shell && a.workload.is_none() {
        bail!("name the workload to run in (NAME or KIND/NAME), or use --node-shell");
    }
    let local_tty = a.tty && std::io::stdin().is_terminal();
    let size = if a.tty { window_size() } else { None };
    let start = ExecStart {
        workload: a.workload.clone(),
        namespace: a.namespace.clone(),
        container: a.container.clone(),
        command: a.command.clone(),
        tty: a.tty,
        stdin: a.stdin,
        rows: size.map(|s| s.0),
        cols: size.map(|s| s.1),
        timeout_secs: a.timeout.map(|t| t.as_secs().max(1)),
        max_bytes: None,
        node_shell: a.node_shell,
    };
    session(c, &a.node, start, local_tty).await
}

/// Run `command` in `workload` on `node` without input; its output goes to stdout and stderr.
/// The exit code (255 when it did not exit by itself).
pub async fn once(c: &Client, node: &str, workload: &str, command: &[&str]) -> Result<i32> {
    let start = ExecStart {
        workload: Some(workload.into()),
        namespace: "default".into(),
        command: command.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    session(c, node, start, false).await
}

/// Open the session and relay it until the command's exit.
async fn session(c: &Client, node: &str, start: ExecStart, local_tty: bool) -> Result<i32> {
    let limit = Duration::from_secs(start.timeout_secs.unwrap_or(DEFAULT_EXEC_TIMEOUT_SECS) + 90);
    let (http, hub) = c.http();
    let resp = c
        .stream(http.post(format!("{hub}/v1/nodes/{node}/exec")).json(&start), limit)
        .await?;
    let id = resp
        .headers()
        .get(EXEC_SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let _raw = local_tty.then(RawMode::enter);
    // Input: stdin chunks and terminal sizes, sent in order by one task.
    let input = if start.stdin {
        let (c2, id2) = (Client::from_env()?, id.clone());
        let tty = start.tty;
        Some(tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut winch = tty
                .then(|| tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok())
                .flatten();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let frames = tokio::select! {
                    n = stdin.read(&mut buf) => match n {
                        Ok(0) | Err(_) => vec![Frame::StdinEof],
                        Ok(n) => vec![Frame::Stdin(buf[..n].to_vec())],
                    },
                    Some(()) = async { match winch.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => {
                        match window_size() {
                            Some((rows, cols)) => vec![Frame::Resize { rows, cols }],
                            None => continue,
                        }
                    }
                };
                let eof = frames == [Frame::StdinEof];
                if send_input(&c2, &id2, frames).await.is_err() || eof {
                    return;
                }
            }
        }))
    } else {
        None
    };
    let mut body = resp.bytes_stream();
    let mut dec = FrameDecoder::default();
    let mut exit = None;
    'read: while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else { break };
        dec.push(&chunk);
        while let Some(f) = dec.next_frame()? {
            match f {
                Frame::Stdout(b) => {
                    let mut o = std::io::stdout().lock();
                    o.write_all(&b)?;
                    o.flush()?;
                }
                Frame::Stderr(b) => {
                    let mut e = std::io::stderr().lock();
                    e.write_all(&b)?;
                    e.flush()?;
                }
                Frame::Exit(e) => {
                    exit = Some(e);
                    break 'read;
                }
                _ => {}
            }
        }
    }
    if let Some(t) = input {
        t.abort();
    }
    drop(_raw);
    match exit {
        Some(e) => {
            if let Some(r) = &e.reason {
                eprintln!("outpost exec: {r}");
            }
            Ok(e.code.unwrap_or(255))
        }
        None => {
            eprintln!("outpost exec: the hub's stream ended before the command's exit; it may still run on the node");
            Ok(255)
        }
    }
}
