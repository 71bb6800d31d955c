//! The serving process of an ONNX workload (`outpost serve-model`): loads and warms up the model
//! first, then listens, so a probe of `/v2/health/ready` passes only once the model can answer.
//!
//! Routes (docs/inference.md):
//! - `GET /v2/health/live`, `GET /v2/health/ready`, `GET /v2`: server liveness, readiness, metadata
//! - `GET /v2/models/{name}[/versions/{v}]`, `GET .../ready`: model metadata and readiness
//! - `POST /v2/models/{name}[/versions/{v}]/infer`: KServe v2 inference (FP32 input, any batch)
//! - `POST /infer`: the articles' `{"image_base64": ...}` -> `{"code": 200, "pred": ..}`
//! - `GET /metrics`: request count, errors and a latency histogram (Prometheus text)
//! - `GET /v2/models/{name}/stats`: the same counters as JSON, with the server's pid (the agent
//!   reads them for its vitals and the model's update gate)
//!
//! Bad input is a 400 naming what was expected; a body over the limit is a 413.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tracing::{debug, info};

use super::{decode_image, decode_v2, top_class, Model};

/// Default largest request body: a digits or MNIST request is a few KiB; a 1 MiB frame is plenty.
pub const DEFAULT_MAX_BODY: usize = 1 << 20;

/// Upper bounds (seconds) of the latency histogram's buckets (shared with the agent and hub).
pub use outpost_api::MODEL_LATENCY_BUCKETS as LATENCY_BUCKETS;

#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The ONNX file; or, with `data_dir`, a reference fetched through the node's cache.
    pub model: Option<PathBuf>,
    pub model_ref: Option<String>,
    /// The agent's data dir (its identity, for fetching from the hub, and the model cache).
    pub data_dir: Option<PathBuf>,
    /// The model's name in URLs (`/v2/models/<name>`).
    pub name: String,
    /// Its version (the tag or digest the workload named).
    pub version: String,
    pub listen: SocketAddr,
    pub max_body: usize,
    /// Node name in the articles' answer (`node_id`).
    pub node: String,
}

/// Per-model counters, exported at `/metrics` and `/v2/models/{name}/stats`. Lock-free: a
/// request costs three relaxed atomic additions and a bucket search over 12 bounds.
#[derive(Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    /// Per bucket, not cumulative; the last counts what is slower than the last bound.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl Metrics {
    fn observe(&self, secs: f64) {
        let i = LATENCY_BUCKETS.partition_point(|le| *le < secs);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add((secs * 1e9) as u64, Ordering::Relaxed);
    }

    /// A reading of the counters (what the agent forwards in its vitals).
    pub fn counters(&self) -> outpost_api::ModelCounters {
        outpost_api::ModelCounters {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            buckets: self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect(),
            latency_sum_s: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }

    /// Prometheus text exposition of this model's figures.
    pub fn render(&self, model: &str, version: &str) -> String {
        let c = self.counters();
        let l = format!("model=\"{model}\",version=\"{version}\"");
        let mut s = String::new();
        s.push_str("# HELP outpost_inference_requests_total Inference requests answered, by model.\n");
        s.push_str("# TYPE outpost_inference_requests_total counter\n");
        s.push_str(&format!("outpost_inference_requests_total{{{l}}} {}\n", c.requests));
        s.push_str("# HELP outpost_inference_errors_total Inference requests refused or failed (4xx/5xx), by model.\n");
        s.push_str("# TYPE outpost_inference_errors_total counter\n");
        s.push_str(&format!("outpost_inference_errors_total{{{l}}} {}\n", c.errors));
        s.push_str(
            "# HELP outpost_inference_latency_seconds Time from request to answer inside the server, by model.\n",
        );
        s.push_str("# TYPE outpost_inference_latency_seconds histogram\n");
        let mut cumulative = 0;
        for (n, le) in c.buckets.iter().zip(LATENCY_BUCKETS) {
            cumulative += n;
            s.push_str(&format!(
                "outpost_inference_latency_seconds_bucket{{{l},le=\"{le}\"}} {cumulative}\n"
            ));
        }
        let count: u64 = c.buckets.iter().sum();
        s.push_str(&format!(
            "outpost_inference_latency_seconds_bucket{{{l},le=\"+Inf\"}} {count}\n"
        ));
        s.push_str(&format!(
            "outpost_inference_latency_seconds_sum{{{l}}} {}\n",
            c.latency_sum_s
        ));
        s.push_str(&format!("outpost_inference_latency_seconds_count{{{l}}} {count}\n"));
        s
    }
}

struct Served {
    model: Model,
    opts: ServeOptions,
    metrics: Metrics,
}

/// Load the model (failing with the reason before anything listens), then serve until SIGTERM.
pub async fn run(opts: ServeOptions) -> anyhow::Result<()> {
    let path = match (&opts.model, &opts.model_ref, &opts.data_dir) {
        (Some(p), _, _) => p.clone(),
        (None, Some(r), Some(d)) => super::fetch::resolve(d, r).await.map_err(anyhow::Error::msg)?,
        _ => anyhow::bail!("give --model FILE, or --model-ref NAME:TAG with --data-dir AGENT_DATA_DIR"),
    };
    let model = Model::load(&path)?;
    info!(
        model = %opts.name,
        version = %opts.version,
        input = ?model.input.shape,
        load_ms = model.load_ms,
        "model loaded and warmed up"
    );
    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", opts.listen))?;
    info!(listen = %opts.listen, "serving the Open Inference Protocol and POST /infer");
    let served = Arc::new(Served {
        model,
        opts,
        metrics: Metrics::default(),
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (tcp, remote) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => { tokio::time::sleep(std::time::Duration::from_millis(50)).await; continue }
            },
            _ = term.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let _ = tcp.set_nodelay(true);
        let served = served.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(req, served.clone()));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await
            {
                debug!(%remote, error = %e, "inference connection ended with an error");
            }
        });
    }
}

fn answer(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid response")
}

fn error(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    answer(status, json!({"error": message}))
}

/// `/v2/models/<name>[/versions/<v>]<rest>` -> (name, rest).
fn model_route(path: &str) -> Option<(&str, &str)> {
    let p = path.strip_prefix("/v2/models/")?;
    let (name, rest) = p.split_once('/').map_or((p, ""), |(n, r)| (n, r));
    let rest = match rest.strip_prefix("versions/") {
        Some(v) => v.split_once('/').map_or("", |(_, r)| r),
        None => rest,
    };
    Some((name, rest))
}

async fn handle(req: Request<Incoming>, s: Arc<Served>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let ready = || answer(StatusCode::OK, json!({"ready": true}));
    let meta = || {
        json!({
            "name": s.opts.name,
            "versions": [s.opts.version],
            "platform": "onnx",
            "inputs": [s.model.input.to_json()],
            "outputs": s.model.outputs.iter().map(|o| o.to_json()).collect::<Vec<_>>(),
        })
    };
    Ok(match (&method, path.as_str()) {
        (&Method::GET, "/v2/health/live" | "/v2/health/ready") => ready(),
        (&Method::GET, "/v2") => answer(
            StatusCode::OK,
            json!({"name": "outpost", "version": env!("CARGO_PKG_VERSION"), "extensions": []}),
        ),
        (&Method::GET, "/metrics") => Response::builder()
            .header("content-type", "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(s.metrics.render(&s.opts.name, &s.opts.version))))
            .expect("valid response"),
        (&Method::POST, "/infer") => {
            let started = Instant::now();
            let r = articles_infer(req, &s).await;
            s.count(started, r)
        }
        (m, p) if p.starts_with("/v2/models/") => {
            let (name, rest) = model_route(p).unwrap_or(("", ""));
            if name != s.opts.name {
                error(
                    StatusCode::NOT_FOUND,
                    format!("no model {name:?} here; this server serves {:?}", s.opts.name),
                )
            } else {
                match (m, rest) {
                    (&Method::GET, "") => answer(StatusCode::OK, meta()),
                    (&Method::GET, "ready") => ready(),
                    // outpost's own: the counters the agent reads (its vitals, the model gate)
                    (&Method::GET, "stats") => {
                        let mut v = serde_json::to_value(s.metrics.counters()).unwrap_or_default();
                        v["model"] = json!(s.opts.name);
                        v["version"] = json!(s.opts.version);
                        v["pid"] = json!(std::process::id());
                        answer(StatusCode::OK, v)
                    }
                    (&Method::POST, "infer") => {
                        let started = Instant::now();
                        let r = v2_infer(req, &s).await;
                        s.count(started, r)
                    }
                    _ => error(
                        StatusCode::NOT_FOUND,
                        format!("no route {m} {p}; see GET /v2/models/{name}"),
                    ),
                }
            }
        }
        _ => error(
            StatusCode::NOT_FOUND,
            format!(
                "no route {method} {path}; use POST /v2/models/{}/infer or POST /infer",
                s.opts.name
            ),
        ),
    })
}

impl Served {
    fn count(&self, started: Instant, r: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
        self.metrics.requests.fetch_add(1, Ordering::Relaxed);
        if !r.status().is_success() {
            self.metrics.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.metrics.observe(started.elapsed().as_secs_f64());
        r
    }
}

async fn json_body(req: Request<Incoming>, max: usize) -> Result<Value, Response<Full<Bytes>>> {
    if let Some(len) = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
    {
        if len > max {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is {len} bytes; this model server accepts at most {max}"),
            ));
        }
    }
    let body = match Limited::new(req.into_body(), max).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is over {max} bytes, the most this model server accepts"),
            ))
        }
    };
    serde_json::from_slice(&body).map_err(|e| error(StatusCode::BAD_REQUEST, format!("the body is not JSON: {e}")))
}

async fn v2_infer(req: Request<Incoming>, s: &Served) -> Response<Full<Bytes>> {
    let body = match json_body(req, s.opts.max_body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let (data, batch) = match decode_v2(&body, &s.model.input) {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.0),
    };
    match s.model.run(&data, batch) {
        Ok(outs) => {
            let mut a = json!({
                "model_name": s.opts.name,
                "model_version": s.opts.version,
                "outputs": outs.iter().map(|o| o.to_json()).collect::<Vec<_>>(),
            });
            if let Some(id) = body.get("id") {
                a["id"] = id.clone();
            }
            answer(StatusCode::OK, a)
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("inference failed: {e}")),
    }
}

async fn articles_infer(req: Request<Incoming>, s: &Served) -> Response<Full<Bytes>> {
    let body = match json_body(req, s.opts.max_body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Some(img) = body
        .get("image_base64")
        .and_then(Value::as_str)
        .filter(|v| !v.is_empty())
    else {
        return answer(
            StatusCode::BAD_REQUEST,
            json!({"code": 400, "msg": "missing image_base64: send {\"image_base64\": \"<base64 PNG or raw pixels>\"}"}),
        );
    };
    let data = match decode_image(img, &s.model.input) {
        Ok(d) => d,
        Err(e) => return answer(StatusCode::BAD_REQUEST, json!({"code": 400, "msg": e.0})),
    };
    match s.model.run(&data, 1).map(|o| top_class(&o, 0)) {
        Ok(Some((pred, confidence))) => answer(
            StatusCode::OK,
            json!({
                "code": 200,
                "pred": pred,
                "confidence": confidence,
                "model": format!("{}:{}", s.opts.name, s.opts.version),
                "node_id": s.opts.node,
                "timestamp": crate::reconcile::now_ms() / 1000,
            }),
        ),
        Ok(None) => answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"code": 500, "msg": "the model gives no class output (no integer label and no [batch, classes] scores); use POST /v2/models/<name>/infer"}),
        ),
        Err(e) => answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"code": 500, "msg": format!("inference failed: {e}")}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_routes_with_and_without_versions() {
        assert_eq!(model_route("/v2/models/digits"), Some(("digits", "")));
        assert_eq!(model_route("/v2/models/digits/infer"), Some(("digits", "infer")));
        assert_eq!(
            model_route("/v2/models/digits/versions/v2/infer"),
            Some(("digits", "infer"))
        );
        assert_eq!(model_route("/v2/models/digits/versions/v2"), Some(("digits", "")));
        assert_eq!(model_route("/v2/health"), None);
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.observe(0.000_07);
        m.observe(0.003);
        let text = m.render("digits", "v2");
        assert!(
            text.contains("outpost_inference_latency_seconds_bucket{model=\"digits\",version=\"v2\",le=\"0.0001\"} 1"),
            "{text}"
        );
        assert!(text.contains("le=\"0.005\"} 2"), "{text}");
        assert!(text.contains("le=\"+Inf\"} 2"), "{text}");
        assert!(text.contains("outpost_inference_latency_seconds_count{model=\"digits\",version=\"v2\"} 2"));
    }
}
