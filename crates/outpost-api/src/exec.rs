//! Remote exec (docs/exec.md): what an operator asks for, what the hub hands the node, and the
//! frames both streams carry.
//!
//! An exec session is two byte streams between the operator and the node, relayed by the hub
//! over the node's own outbound link (no inbound port on the node):
//! - output (node -> hub -> operator): [`Frame::Stdout`], [`Frame::Stderr`], then one
//!   [`Frame::Exit`] that ends the session;
//! - input (operator -> hub -> node): [`Frame::Stdin`], [`Frame::StdinEof`], [`Frame::Resize`].
//!
//! A frame is `kind: u8`, `length: u32` big-endian, then `length` payload bytes; a payload is at
//! most [`MAX_FRAME_BYTES`]. [`FrameDecoder`] takes bytes as they arrive and yields whole frames;
//! an unknown kind or an oversized length is an error (the stream is then dropped, never guessed at).

use serde::{Deserialize, Serialize};

/// Largest payload of one frame.
pub const MAX_FRAME_BYTES: usize = 1 << 20;
/// How long a session may run when the operator does not say (`--timeout`).
pub const DEFAULT_EXEC_TIMEOUT_SECS: u64 = 900;
/// The longest session an operator may ask for.
pub const MAX_EXEC_TIMEOUT_SECS: u64 = 4 * 3600;
/// Output a session may send before the node ends it.
pub const DEFAULT_EXEC_MAX_BYTES: u64 = 64 << 20;
/// The largest output limit an operator may ask for.
pub const MAX_EXEC_MAX_BYTES: u64 = 1 << 30;
/// Header naming the session on the operator's output stream (input goes to `/v1/exec/{id}/input`).
pub const EXEC_SESSION_HEADER: &str = "x-outpost-exec-session";
/// Media type of both frame streams.
pub const EXEC_MEDIA_TYPE: &str = "application/vnd.outpost.exec";

/// `POST /v1/nodes/{node}/exec`: what the operator wants to run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStart {
    /// The workload to run in: `NAME` or `KIND/NAME` (deployment, daemonset, statefulset...).
    /// Absent with `node_shell`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The container of a multi-container workload (default: the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// argv; must not be empty.
    pub command: Vec<String>,
    /// Run under a pseudo-terminal.
    #[serde(default)]
    pub tty: bool,
    /// Keep stdin open (input frames are delivered); without it stdin is empty.
    #[serde(default)]
    pub stdin: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cols: Option<u16>,
    /// Seconds before the node ends the command (default [`DEFAULT_EXEC_TIMEOUT_SECS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Output bytes before the node ends the command (default [`DEFAULT_EXEC_MAX_BYTES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// Run on the node itself, outside any workload (admins only).
    #[serde(default)]
    pub node_shell: bool,
}

fn default_namespace() -> String {
    "default".into()
}

impl ExecStart {
    /// Check the request; the error names the field and the reason.
    pub fn validate(&self) -> Result<(), String> {
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err("command: empty; give the program to run after `--`".into());
        }
        match (&self.workload, self.node_shell) {
            (Some(_), true) => {
                return Err("workload: a node shell runs outside every workload; give one or the other".into())
            }
            (None, false) => {
                return Err("workload: missing; name the workload to run in, or ask for a node shell".into())
            }
            (Some(w), false) if w.is_empty() || w.split('/').count() > 2 => {
                return Err(format!("workload: {w:?} is not NAME or KIND/NAME"))
            }
            _ => {}
        }
        if let Some(t) = self.timeout_secs {
            if t == 0 || t > MAX_EXEC_TIMEOUT_SECS {
                return Err(format!("timeout_secs: {t} is outside 1..={MAX_EXEC_TIMEOUT_SECS}"));
            }
        }
        if let Some(b) = self.max_bytes {
            if b == 0 || b > MAX_EXEC_MAX_BYTES {
                return Err(format!("max_bytes: {b} is outside 1..={MAX_EXEC_MAX_BYTES}"));
            }
        }
        Ok(())
    }
}

/// An exec session the hub hands a node in its sync answer (protocol 1.4). The node opens
/// `POST /v1/nodes/{node}/exec/{id}/output` (its output, which also tells the hub it took the
/// session) and `GET /v1/nodes/{node}/exec/{id}/input` (the operator's input; the stream's end
/// means the operator is gone: the node ends the command).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub id: String,
    #[serde(flatten)]
    pub start: ExecStart,
}

/// How a session ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecExit {
    /// The command's exit code; absent when it did not exit by itself (killed, never started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// Why the session ended other than by the command's own exit (limit reached, not found...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One unit of an exec stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(ExecExit),
    Stdin(Vec<u8>),
    StdinEof,
    Resize { rows: u16, cols: u16 },
}

const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const EXIT: u8 = 3;
const STDIN: u8 = 4;
const STDIN_EOF: u8 = 5;
const RESIZE: u8 = 6;

impl Frame {
    /// The frame's bytes on the wire. A data payload over [`MAX_FRAME_BYTES`] must be split by
    /// the caller ([`Frame::data`] does).
    pub fn encode(&self) -> Vec<u8> {
        let (kind, payload): (u8, std::borrow::Cow<[u8]>) = match self {
            Frame::Stdout(b) => (STDOUT, b.into()),
            Frame::Stderr(b) => (STDERR, b.into()),
            Frame::Stdin(b) => (STDIN, b.into()),
            Frame::Exit(e) => (EXIT, serde_json::to_vec(e).unwrap_or_default().into()),
            Frame::StdinEof => (STDIN_EOF, (&[][..]).into()),
            Frame::Resize { rows, cols } => {
                let mut p = rows.to_be_bytes().to_vec();
                p.extend_from_slice(&cols.to_be_bytes());
                (RESIZE, p.into())
            }
        };
        let mut out = Vec::with_capacity(5 + payload.len());
        out.push(kind);
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Data frames of `bytes`, split at [`MAX_FRAME_BYTES`]; `make` picks the kind.
    pub fn data(bytes: &[u8], make: fn(Vec<u8>) -> Frame) -> Vec<Frame> {
        bytes.chunks(MAX_FRAME_BYTES).map(|c| make(c.to_vec())).collect()
    }
}

/// Why a stream is not a frame stream.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unknown exec frame kind {0}")]
    Kind(u8),
    #[error("exec frame of {0} bytes is over the {MAX_FRAME_BYTES}-byte limit")]
    TooLong(usize),
    #[error("malformed exec frame of kind {kind}: {reason}")]
    Payload { kind: u8, reason: String },
}

/// Incremental decoder: [`FrameDecoder::push`] bytes as they arrive, then take frames with
/// [`FrameDecoder::next_frame`] until it answers `Ok(None)`.
#[derive(Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held that do not make a whole frame yet (a stream that ends with some was cut).
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let kind = self.buf[0];
        if !(STDOUT..=RESIZE).contains(&kind) {
            return Err(FrameError::Kind(kind));
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > MAX_FRAME_BYTES {
            return Err(FrameError::TooLong(len));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        let payload: Vec<u8> = self.buf[5..5 + len].to_vec();
        self.buf.drain(..5 + len);
        let bad = |reason: &str| FrameError::Payload {
            kind,
            reason: reason.to_string(),
        };
        Ok(Some(match kind {
            STDOUT => Frame::Stdout(payload),
            STDERR => Frame::Stderr(payload),
            STDIN => Frame::Stdin(payload),
            EXIT => Frame::Exit(serde_json::from_slice(&payload).map_err(|e| bad(&e.to_string()))?),
            STDIN_EOF if payload.is_empty() => Frame::StdinEof,
            STDIN_EOF => return Err(bad("end of input carries no payload")),
            RESIZE if payload.len() == 4 => Frame::Resize {
                rows: u16::from_be_bytes([payload[0], payload[1]]),
                cols: u16::from_be_bytes([payload[2], payload[3]]),
            },
            _ => return Err(bad("a resize is 4 bytes: rows and columns")),
        }))
    }
}

/// Decode every whole frame of `bytes` (tests and fuzzing).
pub fn decode_all(bytes: &[u8]) -> Result<(Vec<Frame>, usize), FrameError> {
    let mut d = FrameDecoder::default();
    d.push(bytes);
    let mut out = Vec::new();
    while let Some(f) = d.next_frame()? {
        out.push(f);
    }
    Ok((out, d.pending()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_in_any_split() {
        let frames = vec![
            Frame::Stdout(b"hello\n".to_vec()),
            Frame::Stderr(vec![]),
            Frame::Stdin(vec![0, 255, 10]),
            Frame::StdinEof,
            Frame::Resize { rows: 40, cols: 132 },
            Frame::Exit(ExecExit {
                code: Some(3),
                reason: None,
            }),
        ];
        let wire: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
        for split in 0..wire.len() {
            let mut d = FrameDecoder::default();
            let mut got = Vec::new();
            for part in [&wire[..split], &wire[split..]] {
                d.push(part);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, frames, "split at {split}");
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn bad_streams_are_refused() {
        assert_eq!(decode_all(&[9, 0, 0, 0, 0]), Err(FrameError::Kind(9)));
        assert_eq!(
            decode_all(&[1, 0xff, 0xff, 0xff, 0xff]),
            Err(FrameError::TooLong(u32::MAX as usize))
        );
        assert!(matches!(
            decode_all(&[6, 0, 0, 0, 1, 7]),
            Err(FrameError::Payload { kind: 6, .. })
        ));
        assert!(matches!(
            decode_all(&[3, 0, 0, 0, 1, b'x']),
            Err(FrameError::Payload { kind: 3, .. })
        ));
        // a cut frame is pending, not an error
        assert_eq!(decode_all(&[1, 0, 0, 0, 4, b'a']), Ok((vec![], 6)));
    }

    #[test]
    fn data_is_split_at_the_frame_limit() {
        let big = vec![7u8; MAX_FRAME_BYTES + 3];
        let f = Frame::data(&big, Frame::Stdout);
        assert_eq!(f.len(), 2);
        assert_eq!(f[1], Frame::Stdout(vec![7; 3]));
    }

    #[test]
    fn start_requests_are_checked_with_the_field_named() {
        let ok = ExecStart {
            workload: Some("web".into()),
            command: vec!["ls".into()],
            ..Default::default()
        };
        assert_eq!(ok.validate(), Ok(()));
        let cases = [
            (
                ExecStart {
                    command: vec![],
                    ..ok.clone()
                },
                "command:",
            ),
            (
                ExecStart {
                    workload: None,
                    ..ok.clone()
                },
                "workload:",
            ),
            (
                ExecStart {
                    node_shell: true,
                    ..ok.clone()
                },
                "workload:",
            ),
            (
                ExecStart {
                    workload: Some("a/b/c".into()),
                    ..ok.clone()
                },
                "workload:",
            ),
            (
                ExecStart {
                    timeout_secs: Some(0),
                    ..ok.clone()
                },
                "timeout_secs:",
            ),
            (
                ExecStart {
                    max_bytes: Some(MAX_EXEC_MAX_BYTES + 1),
                    ..ok.clone()
                },
                "max_bytes:",
            ),
        ];
        for (req, field) in cases {
            let e = req.validate().unwrap_err();
            assert!(e.starts_with(field), "{e}");
        }
        let shell = ExecStart {
            workload: None,
            node_shell: true,
            ..ok
        };
        assert_eq!(shell.validate(), Ok(()));
    }
}
