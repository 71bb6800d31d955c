//! HTTP ingest on the node: `POST /v1/streams/<stream>` with one JSON value, a JSON array, or
//! newline-delimited JSON (one value per line). The answer comes once every record is durable
//! in the spool: `200 {"accepted": n}`. `GET /v1/stats` returns every stream's counters.
//! With `OUTPOST_INGEST_TOKEN` set, requests need `Authorization: Bearer <token>`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::debug;

use super::{Rejected, Shared};

/// Largest request body.
const MAX_BODY: usize = 16 << 20;

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (tcp, remote) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => { tokio::time::sleep(std::time::Duration::from_millis(50)).await; continue }
            },
            _ = stop.changed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(req, shared.clone()));
            let http = hyper::server::conn::http1::Builder::new();
            let r = match tls {
                None => http.serve_connection(TokioIo::new(tcp), svc).await,
                Some(acceptor) => {
                    match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => http.serve_connection(TokioIo::new(s), svc).await,
                        _ => {
                            debug!(%remote, "ingest TLS handshake failed");
                            return;
                        }
                    }
                }
            };
            if let Err(e) = r {
                debug!(%remote, error = %e, "ingest connection ended with an error");
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

fn error(status: StatusCode, code: &str, message: String) -> Response<Full<Bytes>> {
    answer(status, json!({"code": code, "message": message}))
}

/// Parse a body: one JSON value, an array of values, or one value per line.
pub fn parse_records(body: &[u8]) -> Result<Vec<Value>, String> {
    let text = std::str::from_utf8(body).map_err(|_| "the body is not UTF-8 text".to_string())?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err("the body is empty: send a JSON object, an array, or one object per line".into());
    }
    match serde_json::from_str::<Value>(trimmed) {
        Ok(Value::Array(a)) => Ok(a),
        Ok(v) => Ok(vec![v]),
        Err(_) => trimmed
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("line {}: not JSON: {e}", i + 1)))
            .collect(),
    }
}

async fn handle(req: Request<Incoming>, shared: Arc<Shared>) -> Result<Response<Full<Bytes>>, Infallible> {
    if let Some(tok) = &shared.opts.ingest_token {
        let given = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(tok.as_str()) {
            return Ok(error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this ingest listener needs Authorization: Bearer <OUTPOST_INGEST_TOKEN>".into(),
            ));
        }
    }
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/v1/stats") => Ok(answer(StatusCode::OK, json!({"streams": shared.stats()}))),
        (&Method::GET, "/healthz") => Ok(answer(StatusCode::OK, json!({"ok": true}))),
        (&Method::POST, p) if p.starts_with("/v1/streams/") => {
            let name = p.trim_start_matches("/v1/streams/").trim_end_matches('/').to_string();
            let routes = shared.routes();
            let Some(stream) = routes.streams.get(&name).cloned() else {
                let known: Vec<&str> = routes.streams.keys().map(String::as_str).collect();
                return Ok(error(
                    StatusCode::NOT_FOUND,
                    "unknown_stream",
                    format!(
                        "no stream {name:?} runs on this node (streams here: {}); check the Pipeline's streams and nodeSelector",
                        if known.is_empty() { "none".to_string() } else { known.join(", ") }
                    ),
                ));
            };
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return Ok(error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body",
                        format!("cannot read the body ({e}); send at most {MAX_BODY} bytes per request"),
                    ))
                }
            };
            let records = match parse_records(&body) {
                Ok(r) => r,
                Err(e) => return Ok(error(StatusCode::BAD_REQUEST, "invalid_json", e)),
            };
            let n = records.len();
            // Hand every record over first, then wait: one group commit for the whole body.
            let mut waits = Vec::with_capacity(n);
            for v in records {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let input = super::Input {
                    value: v,
                    topic: None,
                    at: crate::reconcile::now_ms(),
                    done: Some(tx),
                };
                if stream.tx.send(input).await.is_err() {
                    return Ok(error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "stopping",
                        "the stream is restarting; retry".into(),
                    ));
                }
                waits.push(rx);
            }
            let mut accepted = 0;
            let mut first_err: Option<Rejected> = None;
            for w in waits {
                match w.await {
                    Ok(Ok(())) => accepted += 1,
                    Ok(Err(e)) => {
                        first_err.get_or_insert(e);
                    }
                    Err(_) => {
                        first_err.get_or_insert(Rejected::NoStream(name.clone()));
                    }
                }
            }
            Ok(match first_err {
                None => answer(StatusCode::OK, json!({"accepted": accepted})),
                Some(e @ Rejected::Unpredictable(..)) => answer(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    json!({"code": "model_refused", "message": e.to_string(), "accepted": accepted}),
                ),
                Some(e @ Rejected::Full(_)) => answer(
                    StatusCode::INSUFFICIENT_STORAGE,
                    json!({"code": "spool_full", "message": e.to_string(), "accepted": accepted}),
                ),
                Some(e) => answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"code": "unavailable", "message": e.to_string(), "accepted": accepted}),
                ),
            })
        }
        _ => Ok(error(
            StatusCode::NOT_FOUND,
            "no_route",
            format!(
                "no route {} {path}; POST /v1/streams/<stream> or GET /v1/stats",
                req.method()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn any_body_parses_or_is_refused(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            if let Err(e) = parse_records(&b) {
                proptest::prop_assert!(!e.is_empty());
            }
        }
    }

    #[test]
    fn bodies_of_one_many_or_lines() {
        assert_eq!(parse_records(b"{\"a\":1}").unwrap().len(), 1);
        assert_eq!(parse_records(b"[{\"a\":1},{\"a\":2}]").unwrap().len(), 2);
        assert_eq!(parse_records(b"{\"a\":1}\n\n{\"a\":2}\n").unwrap().len(), 2);
        let e = parse_records(b"{\"a\":1}\n{nope}\n").unwrap_err();
        assert!(e.starts_with("line 2: not JSON"), "{e}");
        assert!(parse_records(b"  ").is_err());
    }
}
