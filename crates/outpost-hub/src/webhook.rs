//! Webhook delivery: POSTs each queued alert notification (JSON, see docs/alerts.md) to its URL,
//! in order per URL, retrying with `outpost_core::retry::webhook` (1 s doubling up to
//! `MonitorConfig::retry_max`, plus up to 25 %) until a 2xx answer or the policy gives up
//! (`MonitorConfig::give_up_after`, 24 h). The queue is
//! the `webhook_queue` table (see `alerts`), so notifications survive a hub restart and a
//! receiver that is down for a while gets them all when it is back.
//!
//! Must never: drop a notification silently (giving up is logged and counted), or block alert
//! evaluation (delivery runs in its own task).

use std::collections::BTreeSet;
use std::time::Duration;

use outpost_core::retry;

use crate::monitor::QueuedHook;
use crate::service::Service;

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

/// The delivery policy for this hub's configuration.
pub fn policy(cfg: &crate::monitor::MonitorConfig) -> retry::Policy {
    retry::Policy {
        give_up_after_ms: Some(cfg.give_up_after.as_millis() as i64),
        ..retry::webhook(cfg.retry_max.as_millis() as u64)
    }
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

/// One round: deliver what is due (in order per URL); returns when to look again.
pub async fn deliver_due(svc: &Service, http: &reqwest::Client, now: outpost_api::UnixMs) -> Duration {
    let due = svc.mdb(move |m| m.due_hooks(now, 50)).await.unwrap_or_default();
    // One failure holds back later notifications to the same URL this round (order).
    let mut failed: BTreeSet<String> = BTreeSet::new();
    for h in due {
        if failed.contains(&h.url) {
            continue;
        }
        let id = h.id;
        let result = deliver(http, &h).await;
        let next = result
            .as_ref()
            .err()
            .map(|_| policy(&svc.settings.monitor).next(h.attempts, h.created_at, now, rand::random()));
        match (result, next) {
            (Ok(()), _) => {
                svc.metrics.webhook_ok.inc();
                tracing::debug!(url = %h.url, attempts = h.attempts + 1, "webhook delivered");
                let _ = svc.mdb(move |m| m.hook_done(id)).await;
            }
            (Err(e), Some(retry::Next::GiveUp) | None) => {
                svc.metrics.webhook_dropped.inc();
                tracing::error!(url = %h.url, attempts = h.attempts + 1, error = %e, "webhook undeliverable; giving up on this notification");
                let _ = svc.mdb(move |m| m.hook_done(id)).await;
            }
            (Err(e), Some(retry::Next::RetryIn(ms))) => {
                svc.metrics.webhook_retry.inc();
                let d = Duration::from_millis(ms);
                tracing::warn!(url = %h.url, attempts = h.attempts + 1, retry_in = ?d, error = %e, "webhook failed; will retry");
                failed.insert(h.url.clone());
                let (a, next, url) = (h.attempts + 1, now + ms as i64, h.url.clone());
                let _ = svc.mdb(move |m| m.hook_retry(id, &url, a, next)).await;
            }
        }
    }
    let next = svc.mdb(|m| m.hook_queue()).await.ok().and_then(|(n, _)| n);
    next.map_or(Duration::from_secs(60), |t| {
        Duration::from_millis((t - crate::now_ms()).clamp(20, 60_000) as u64)
    })
}
