//! `outpost bench inference`: the model endpoint's latency and throughput at 1, 4 and 16
//! concurrent clients, beside the articles' Flask + onnxruntime app serving the same model in
//! the same run; the model server's RSS with the model loaded; the binary's size.
//!
//! Method: scripts/make-digits-model.py builds the digits MLP (scikit-learn, skl2onnx). Both
//! servers get the same requests, the articles' shape (`POST /infer` with `image_base64`, here
//! the 64 input values as float32 bytes so neither side spends time on image decoding), from
//! closed-loop clients on threads of this process, each with its own connection (kept alive
//! when the server allows it; Werkzeug's development server, which the articles run, closes it
//! after every answer). Latency is from writing the request to reading the whole answer.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::harness::{free_port, outpost_bin};
use crate::stats::{bytes, ms, Summary};
use crate::table;

#[derive(clap::Args, Debug)]
pub struct InferenceArgs {
    /// Requests per concurrency level and server.
    #[arg(long, default_value_t = 3000)]
    pub requests: usize,
    /// Python with scikit-learn, skl2onnx, onnxruntime and flask (scripts/test.sh installs them
    /// into .venv).
    #[arg(long, default_value = ".venv/bin/python")]
    pub python: PathBuf,
    /// Concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub clients: Vec<usize>,
}

/// The articles' app (seed 002), serving the same model: `os.time()` fixed to `time.time()`, the
/// cloud connectivity check left out (it would add a 2 s timeout per request here), and the
/// image decoding replaced by reading the same float32 bytes outpost reads.
const FLASK_APP: &str = r#"
import base64, sys, time
import numpy as np
import onnxruntime as ort
from flask import Flask, request, jsonify
app = Flask(__name__)
ort_session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
NAME = ort_session.get_inputs()[0].name
def preprocess(image_base64):
    return np.frombuffer(base64.b64decode(image_base64), dtype=np.float32).reshape(1, 64)
@app.route("/infer", methods=["POST"])
def infer():
    try:
        data = request.json
        img_base64 = data.get("image_base64")
        if not img_base64:
            return jsonify({"code": 400, "msg": "missing image_base64"})
        output = ort_session.run(None, {NAME: preprocess(img_base64)})
        pred = int(np.argmax(output[1]))
        return jsonify({"code": 200, "pred": pred, "node_id": "edge-node-01", "timestamp": int(time.time())})
    except Exception as e:
        return jsonify({"code": 500, "msg": str(e)})
if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(sys.argv[2]))
"#;

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A client connection that reconnects when the server closes.
struct Conn {
    port: u16,
    s: Option<TcpStream>,
}

impl Conn {
    fn request(&mut self, req: &[u8]) -> Result<String> {
        for attempt in 0..2 {
            if self.s.is_none() {
                let s = TcpStream::connect(("127.0.0.1", self.port))?;
                s.set_nodelay(true)?;
                self.s = Some(s);
            }
            let s = self.s.as_mut().expect("connected");
            if s.write_all(req).is_err() {
                self.s = None;
                continue;
            }
            match read_response(s) {
                Ok((body, keep)) => {
                    if !keep {
                        self.s = None;
                    }
                    return Ok(body);
                }
                Err(e) if attempt == 0 => {
                    self.s = None;
                    let _ = e;
                }
                Err(e) => return Err(e),
            }
        }
        bail!("the server closed the connection twice")
    }
}

/// (body, keep-alive) of one HTTP/1.x response with a Content-Length.
fn read_response(s: &mut TcpStream) -> Result<(String, bool)> {
    let mut buf = Vec::with_capacity(1024);
    let mut b = [0u8; 4096];
    let head_end = loop {
        let n = s.read(&mut b)?;
        if n == 0 {
            bail!("connection closed");
        }
        buf.extend_from_slice(&b[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no content-length")?;
    while buf.len() < head_end + len {
        let n = s.read(&mut b)?;
        if n == 0 {
            bail!("connection closed mid-body");
        }
        buf.extend_from_slice(&b[..n]);
    }
    let keep = head.starts_with("http/1.1") && !head.contains("connection: close");
    Ok((
        String::from_utf8_lossy(&buf[head_end..head_end + len]).into_owned(),
        keep,
    ))
}

fn b64(bytes: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            out.push(if i <= c.len() {
                T[(n >> (18 - 6 * i) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

/// Closed-loop load: `clients` threads share `total` requests. Returns (latencies, wall time).
fn load(port: u16, bodies: &[String], clients: usize, total: usize) -> Result<(Vec<Duration>, Duration)> {
    let per = total.div_ceil(clients);
    let started = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let reqs: Vec<Vec<u8>> = (0..per)
                .map(|i| {
                    let body = &bodies[(c * per + i) % bodies.len()];
                    format!(
                        "POST /infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .into_bytes()
                })
                .collect();
            std::thread::spawn(move || -> Result<Vec<Duration>> {
                let mut conn = Conn { port, s: None };
                let mut lat = Vec::with_capacity(reqs.len());
                for r in &reqs {
                    let t = Instant::now();
                    let body = conn.request(r)?;
                    lat.push(t.elapsed());
                    if !body.contains("\"pred\"") {
                        bail!("unexpected answer: {body}");
                    }
                }
                Ok(lat)
            })
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.join().map_err(|_| anyhow::anyhow!("client thread panicked"))??);
    }
    Ok((all, started.elapsed()))
}

fn wait_ready(port: u16, what: &str, child: &mut Child) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Some(st) = child.try_wait()? {
            bail!("{what} exited ({st}) before listening");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not listen within 60 s")
}

pub async fn inference(a: InferenceArgs, work: &Path) -> Result<String> {
    tokio::task::spawn_blocking({
        let work = work.to_path_buf();
        move || run(a, &work)
    })
    .await?
}

fn run(a: InferenceArgs, work: &Path) -> Result<String> {
    let script = ["scripts/make-digits-model.py", "../../scripts/make-digits-model.py"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("run from the repository root: scripts/make-digits-model.py builds the model")?;
    let models = work.join("model");
    let out = Command::new(&a.python)
        .arg(&script)
        .arg(&models)
        .output()
        .with_context(|| {
            format!(
            "cannot run {} (install scikit-learn, skl2onnx, onnxruntime, flask: scripts/test.sh puts them in .venv)",
            a.python.display()
        )
        })?;
    if !out.status.success() {
        bail!("make-digits-model.py failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let model = models.join("digits.onnx");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(models.join("digits-reference.json"))?)?;
    let bodies: Vec<String> = reference["inputs"]
        .as_array()
        .context("reference inputs")?
        .iter()
        .map(|x| {
            let raw: Vec<u8> = x
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|v| (v.as_f64().unwrap_or(0.0) as f32).to_le_bytes())
                .collect();
            serde_json::json!({"image_base64": b64(&raw)}).to_string()
        })
        .collect();

    let op_port = free_port()?;
    let mut op = Proc(
        Command::new(outpost_bin()?)
            .args(["serve-model", "--name", "digits", "--listen"])
            .arg(format!("127.0.0.1:{op_port}"))
            .arg("--model")
            .arg(&model)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_ready(op_port, "outpost serve-model", &mut op.0)?;
    let app = work.join("edge_infer.py");
    std::fs::write(&app, FLASK_APP)?;
    let fl_port = free_port()?;
    let mut fl = Proc(
        Command::new(&a.python)
            .arg(&app)
            .arg(&model)
            .arg(fl_port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_ready(fl_port, "the Flask app", &mut fl.0)?;

    // Warm up both.
    load(op_port, &bodies, 1, 200)?;
    load(fl_port, &bodies, 1, 200)?;

    let mut rows = Vec::new();
    for &c in &a.clients {
        for (name, port) in [
            ("outpost serve-model (tract)", op_port),
            ("Flask + onnxruntime", fl_port),
        ] {
            eprintln!("{name}: {} requests from {c} clients", a.requests);
            let (lat, wall) = load(port, &bodies, c, a.requests)?;
            let s = Summary::of_durations(&lat);
            rows.push(vec![
                c.to_string(),
                name.to_string(),
                ms(s.p50),
                ms(s.p99),
                format!("{:.0}/s", lat.len() as f64 / wall.as_secs_f64()),
            ]);
        }
    }
    let rss = crate::procfs::rss_bytes(op.0.id()).unwrap_or(0) as f64;
    let fl_rss = crate::procfs::rss_bytes(fl.0.id()).unwrap_or(0) as f64;
    let bin = std::fs::metadata(outpost_bin()?)?.len() as f64;
    let mut s = String::from("## Edge inference: the digits MLP behind POST /infer\n\n");
    s.push_str(&table(&["clients", "server", "p50", "p99", "throughput"], &rows));
    s.push_str(&format!(
        "\n- RSS with the model loaded: outpost serve-model {}, Flask + onnxruntime {}\n- outpost binary: {} ({})\n- {} requests per row, closed loop, loopback; model {} bytes\n",
        bytes(rss),
        bytes(fl_rss),
        bytes(bin),
        outpost_bin()?.display(),
        a.requests,
        std::fs::metadata(&model)?.len()
    ));
    Ok(s)
}
