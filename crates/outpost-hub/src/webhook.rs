//! Webhook delivery: POSTs each queued alert notification (JSON, see docs/alerts.md) to its URL,
//! in order per URL, retrying with exponential backoff (1 s doubling up to
//! `MonitorConfig::retry_max`, plus jitter) until a 2xx answer or `give_up_after`. The queue is
//! the `webhook_queue` table (see `alerts`), so notifications survive a hub restart and a
//! receiver that is down for a while gets them all when it is back.
//!
//! Must never: drop a notification silently (giving up is logged and counted), or block alert
//! evaluation (delivery runs in its own task).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::watch;

use crate::alerts::{mdb, QueuedHook};
use crate::state::HubState;

/// An HTTP client for webhooks: public roots (webpki-roots) for https, ring provider.
pub fn client() -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let tls = rustls::ClientConfig::builder_with_provider(outpost_pki::provider())
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth());
    let b = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(5));
    let b = match tls {
        Ok(t) => b.use_preconfigured_tls(t),
        Err(_) => b,
    };
    b.build().unwrap_or_default()
}

/// Delay before attempt `attempts + 1`.
pub fn backoff(attempts: u32, max: Duration) -> Duration {
    let base = (1000u64 << attempts.min(20)).min(max.as_millis() as u64);
    let jitter = rand::rng().random_range(0..=base / 4);
    Duration::from_millis(base + jitter)
}

async fn deliver(http: &reqwest::Client, h: &QueuedHook) -> Result<(), String> {
    let resp = http
        .post(&h.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(h.payload.clone())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {}", resp.status()))
    }
}

/// Deliver due notifications until shutdown.
pub async fn sender_loop(st: Arc<HubState>, mut shutdown: watch::Receiver<bool>) {
    let http = client();
    let m = st.monitor.clone();
    loop {
        let now = crate::now_ms();
        let due = mdb(&st, move |m| m.due_hooks(now, 50)).await.unwrap_or_default();
        // One failure holds back later notifications to the same URL this round (order).
        let mut failed: BTreeSet<String> = BTreeSet::new();
        for h in due {
            if failed.contains(&h.url) {
                continue;
            }
            let id = h.id;
            match deliver(&http, &h).await {
                Ok(()) => {
                    m.metrics.webhook_ok.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(url = %h.url, attempts = h.attempts + 1, "webhook delivered");
                    let _ = mdb(&st, move |m| m.hook_done(id)).await;
                }
                Err(e) if now - h.created_at > m.cfg.give_up_after.as_millis() as i64 => {
                    m.metrics.webhook_dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(url = %h.url, attempts = h.attempts + 1, error = %e, "webhook undeliverable; giving up on this notification");
                    let _ = mdb(&st, move |m| m.hook_done(id)).await;
                }
                Err(e) => {
                    m.metrics.webhook_retry.fetch_add(1, Ordering::Relaxed);
                    let d = backoff(h.attempts, m.cfg.retry_max);
                    tracing::warn!(url = %h.url, attempts = h.attempts + 1, retry_in = ?d, error = %e, "webhook failed; will retry");
                    failed.insert(h.url.clone());
                    let (a, next, url) = (h.attempts + 1, now + d.as_millis() as i64, h.url.clone());
                    let _ = mdb(&st, move |m| m.hook_retry(id, &url, a, next)).await;
                }
            }
        }
        let next = mdb(&st, |m| m.hook_queue()).await.ok().and_then(|(n, _)| n);
        let sleep = next.map_or(Duration::from_secs(60), |t| {
            Duration::from_millis((t - crate::now_ms()).clamp(20, 60_000) as u64)
        });
        tokio::select! {
            _ = m.webhook_wake.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
            _ = shutdown.changed() => return,
        }
    }
}
