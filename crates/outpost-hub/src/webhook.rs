//! Webhook delivery: POSTs each queued alert notification (JSON, see docs/alerts.md) to its URL,
//! in order per URL, retrying with `outpost_core::retry::webhook` (1 s doubling up to
//! `MonitorConfig::retry_max`, plus up to 25 %) until a 2xx answer or the policy gives up
//! (`MonitorConfig::give_up_after`, 24 h). The queue is
//! the `webhook_queue` table (see `alerts`), so notifications survive a hub restart and a
//! receiver that is down for a while gets them all when it is back.
//!
//! Delivery is at least once: every POST carries the row's delivery id in
//! [`DELIVERY_HEADER`] (`X-Outpost-Delivery`), the same on every retry, so a receiver drops a
//! repeat. A repeat happens only when a hub dies (or loses its lease) between a receiver's
//! 2xx and marking the row done: the next holder of the `webhooks` lease sends it again.
//!
//! Must never: drop a notification silently (giving up is logged and counted), or block alert
//! evaluation (delivery runs in its own task).

use std::collections::BTreeSet;
use std::time::Duration;

use outpost_core::lease::Fence;
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

/// How often the holder of the `webhooks` lease looks at the outbox at the latest: other
/// replicas queue notifications without waking this one (a local enqueue wakes it at once).
const OUTBOX_POLL: Duration = Duration::from_secs(2);

/// The header carrying a notification's delivery id: the same for every attempt of one
/// notification, different for every other one, so a receiver can drop a repeat.
pub const DELIVERY_HEADER: &str = "X-Outpost-Delivery";

async fn deliver(http: &reqwest::Client, h: &QueuedHook) -> Result<(), String> {
    let resp = http
        .post(&h.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(DELIVERY_HEADER, h.id.to_string())
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

/// One round: deliver what is due (in order per URL) as the holder of the `webhooks` lease
/// (`fence`): the rows are claimed and marked done under it, so a replica that lost the lease
/// stops at its next write. Returns when to look again.
pub async fn deliver_due(
    svc: &Service,
    http: &reqwest::Client,
    fence: Option<&Fence>,
    now: outpost_api::UnixMs,
) -> Duration {
    let due = match svc.monitor.claim_hooks(now, 50, fence).await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "cannot claim webhook deliveries");
            return Duration::from_secs(1);
        }
    };
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
        let written = match (result, next) {
            (Ok(()), _) => {
                svc.metrics.webhook_ok.inc();
                tracing::debug!(url = %h.url, delivery = id, attempts = h.attempts + 1, "webhook delivered");
                svc.monitor.hook_done(id, fence).await
            }
            (Err(e), Some(retry::Next::GiveUp) | None) => {
                svc.metrics.webhook_dropped.inc();
                tracing::error!(url = %h.url, delivery = id, attempts = h.attempts + 1, error = %e, "webhook undeliverable; giving up on this notification");
                svc.monitor.hook_done(id, fence).await
            }
            (Err(e), Some(retry::Next::RetryIn(ms))) => {
                svc.metrics.webhook_retry.inc();
                let d = Duration::from_millis(ms);
                tracing::warn!(url = %h.url, delivery = id, attempts = h.attempts + 1, retry_in = ?d, error = %e, "webhook failed; will retry");
                failed.insert(h.url.clone());
                svc.monitor
                    .hook_retry(id, &h.url, h.attempts + 1, now + ms as i64, fence)
                    .await
            }
        };
        if let Err(e) = written {
            // Fenced: another replica took the lease and delivers from here (the row stays,
            // so it may deliver this one again with the same delivery id).
            tracing::warn!(error = %e, delivery = id, "cannot record a webhook delivery; stopping this round");
            return Duration::from_secs(1);
        }
    }
    let next = svc.monitor.hook_queue().await.ok().and_then(|(n, _)| n);
    next.map_or(OUTBOX_POLL, |t| {
        Duration::from_millis((t - crate::now_ms()).clamp(20, OUTBOX_POLL.as_millis() as i64) as u64)
    })
}
