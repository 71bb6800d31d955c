//! The hub's Prometheus endpoint (`GET /metrics`, text format 0.0.4): fleet gauges computed at
//! scrape time from the store (nodes by status, workloads by phase, firing alerts, each node's
//! last reported vital signs with `node` and `site` labels) and the hub's own counters (requests,
//! request latency, open long-polls, alert notifications, webhook deliveries, forwarded error
//! lines, log requests). docs/metrics.md lists every metric.
//!
//! Owns: the counters and the text rendering. Must never: block a request on anything but the
//! short store reads of a scrape, or take labels from anything unbounded except node and
//! workload names.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use outpost_api::{Labels, Vitals};

use crate::state::HubState;

/// Upper bounds of the request-duration histogram, seconds (long-polls land in the last ones).
pub const BUCKETS: &[f64] = &[0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 40.0];

#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// Counters of the hub process. One `Metrics` per hub, shared through [`HubState`].
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, String), u64>>,
    durations: Mutex<BTreeMap<&'static str, Histogram>>,
    /// Open sync long-polls: connected agents.
    pub long_polls: AtomicI64,
    pub alerts_fired: AtomicU64,
    pub alerts_resolved: AtomicU64,
    pub webhook_ok: AtomicU64,
    pub webhook_retry: AtomicU64,
    pub webhook_dropped: AtomicU64,
    pub error_lines: AtomicU64,
    pub log_requests_ok: AtomicU64,
    pub log_requests_failed: AtomicU64,
}

/// A bounded route label for a request path.
pub fn route_of(path: &str) -> &'static str {
    if path == "/metrics" {
        return "metrics";
    }
    if path == "/v1/join" {
        return "join";
    }
    if let Some(rest) = path.strip_prefix("/v1/nodes/") {
        let mut parts = rest.split('/');
        let _node = parts.next();
        return match parts.next() {
            Some("sync") => "sync",
            Some("status") => "status",
            Some("errors") => "errors",
            Some("logs") => "logs",
            Some("renew") => "renew",
            Some(_) => "node_other",
            None => "operator",
        };
    }
    "operator"
}

impl Metrics {
    pub fn observe(&self, route: &'static str, status: u16, secs: f64) {
        let class = format!("{}xx", status / 100);
        *self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((route, class))
            .or_default() += 1;
        let mut d = self.durations.lock().unwrap_or_else(|p| p.into_inner());
        let h = d.entry(route).or_default();
        if h.counts.is_empty() {
            h.counts = vec![0; BUCKETS.len()];
        }
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                h.counts[i] += 1;
            }
        }
        h.sum += secs;
        h.count += 1;
    }
}

/// Middleware: count and time every request by route.
pub async fn track(State(st): State<Arc<HubState>>, req: Request, next: Next) -> Response {
    let route = route_of(req.uri().path());
    let t = Instant::now();
    let resp = next.run(req).await;
    st.monitor
        .metrics
        .observe(route, resp.status().as_u16(), t.elapsed().as_secs_f64());
    resp
}

/// Keeps `sync` long-polls counted while they are open.
pub struct LongPollGuard(Arc<Metrics>);

impl LongPollGuard {
    pub fn new(m: Arc<Metrics>) -> Self {
        m.long_polls.fetch_add(1, Ordering::Relaxed);
        Self(m)
    }
}

impl Drop for LongPollGuard {
    fn drop(&mut self) {
        self.0.long_polls.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a scrape reads from the store.
#[derive(Default)]
pub struct FleetView {
    /// (name, labels, online)
    pub nodes: Vec<(String, Labels, bool)>,
    /// Workload phases as reported.
    pub phases: BTreeMap<String, u64>,
    /// (alert name, severity) -> firing count
    pub firing: BTreeMap<(String, String), u64>,
    /// node -> last vitals
    pub vitals: BTreeMap<String, Vitals>,
    pub webhook_queue: u64,
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn line(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", esc(v))).collect();
        if l.is_empty() {
            let _ = writeln!(self.0, "{name} {v}");
        } else {
            let _ = writeln!(self.0, "{name}{{{}}} {v}", l.join(","));
        }
    }
}

/// The `/metrics` text.
pub fn render(f: &FleetView, m: &Metrics) -> String {
    let mut o = Out(String::new());
    o.head("outpost_nodes", "gauge", "Nodes by status (Online/Offline).");
    for status in ["Online", "Offline"] {
        let n = f.nodes.iter().filter(|(_, _, on)| *on == (status == "Online")).count();
        o.line("outpost_nodes", &[("status", status)], n as f64);
    }
    o.head(
        "outpost_workloads",
        "gauge",
        "Workload instances on nodes by reported phase.",
    );
    for (phase, n) in &f.phases {
        o.line("outpost_workloads", &[("phase", phase)], *n as f64);
    }
    o.head(
        "outpost_alerts_firing",
        "gauge",
        "Fleet alerts firing now, by alert name and severity.",
    );
    for ((name, sev), n) in &f.firing {
        o.line(
            "outpost_alerts_firing",
            &[("alertname", name), ("severity", sev)],
            *n as f64,
        );
    }
    let site = |labels: &Labels| labels.get("site").cloned().unwrap_or_default();
    let sites: BTreeMap<&str, String> = f.nodes.iter().map(|(n, l, _)| (n.as_str(), site(l))).collect();
    o.head("outpost_node_up", "gauge", "1 while the node is Online.");
    for (n, l, on) in &f.nodes {
        o.line(
            "outpost_node_up",
            &[("node", n), ("site", &site(l))],
            if *on { 1.0 } else { 0.0 },
        );
    }
    type Get = fn(&Vitals) -> Option<f64>;
    let gauges: &[(&str, &str, Get)] = &[
        (
            "outpost_node_cpu_ratio",
            "CPU busy, fraction of all cores (last report).",
            |v| Some(v.cpu as f64 / 100.0),
        ),
        (
            "outpost_node_memory_ratio",
            "Memory in use, fraction (last report).",
            |v| Some(v.mem as f64 / 100.0),
        ),
        ("outpost_node_memory_total_bytes", "Memory of the node.", |v| {
            Some(v.mem_total_bytes as f64)
        }),
        (
            "outpost_node_disk_root_ratio",
            "Use of the file system holding /, fraction.",
            |v| Some(v.disk_root as f64 / 100.0),
        ),
        (
            "outpost_node_disk_data_ratio",
            "Use of the file system holding the agent's data dir, when not the one of /.",
            |v| v.disk_data.map(|d| d as f64 / 100.0),
        ),
        ("outpost_node_load1", "1-minute load average.", |v| Some(v.load1 as f64)),
        (
            "outpost_node_temperature_celsius",
            "Hottest thermal zone, where the host has one.",
            |v| v.temp_c.map(f64::from),
        ),
        (
            "outpost_node_vitals_timestamp_seconds",
            "When the node took the reported sample (node clock).",
            |v| Some(v.at as f64 / 1000.0),
        ),
    ];
    for (name, help, get) in gauges {
        o.head(name, "gauge", help);
        for (node, v) in &f.vitals {
            if let Some(x) = get(v) {
                let s = sites.get(node.as_str()).cloned().unwrap_or_default();
                o.line(name, &[("node", node), ("site", &s)], x);
            }
        }
    }
    o.head(
        "outpost_node_log_dropped_lines_total",
        "counter",
        "Log lines a node dropped because a log cap was reached.",
    );
    for (node, v) in &f.vitals {
        let s = sites.get(node.as_str()).cloned().unwrap_or_default();
        o.line(
            "outpost_node_log_dropped_lines_total",
            &[("node", node), ("site", &s)],
            v.log_dropped_lines as f64,
        );
    }
    type WGet = fn(&outpost_api::WorkloadVitals) -> f64;
    let wl: &[(&str, &str, &str, WGet)] = &[
        (
            "outpost_workload_cpu_ratio",
            "gauge",
            "Workload CPU, fraction of one core, summed over its process groups.",
            |w| w.cpu as f64 / 100.0,
        ),
        (
            "outpost_workload_memory_bytes",
            "gauge",
            "Workload resident memory, summed over its process groups.",
            |w| w.rss_bytes as f64,
        ),
        (
            "outpost_workload_restarts_total",
            "counter",
            "Workload container restarts on the node.",
            |w| w.restarts as f64,
        ),
    ];
    for (name, kind, help, get) in wl {
        o.head(name, kind, help);
        for (node, v) in &f.vitals {
            let s = sites.get(node.as_str()).cloned().unwrap_or_default();
            for w in &v.workloads {
                o.line(name, &[("node", node), ("site", &s), ("workload", &w.key)], get(w));
            }
        }
    }
    o.head(
        "outpost_hub_http_requests_total",
        "counter",
        "Requests answered by the hub, by route and status class.",
    );
    for ((route, class), n) in m.requests.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        o.line(
            "outpost_hub_http_requests_total",
            &[("route", route), ("code", class)],
            *n as f64,
        );
    }
    o.head(
        "outpost_hub_http_request_duration_seconds",
        "histogram",
        "Time to answer, by route (sync includes the long-poll wait).",
    );
    for (route, h) in m.durations.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        for (i, b) in BUCKETS.iter().enumerate() {
            let le = b.to_string();
            o.line(
                "outpost_hub_http_request_duration_seconds_bucket",
                &[("route", route), ("le", &le)],
                h.counts[i] as f64,
            );
        }
        o.line(
            "outpost_hub_http_request_duration_seconds_bucket",
            &[("route", route), ("le", "+Inf")],
            h.count as f64,
        );
        o.line(
            "outpost_hub_http_request_duration_seconds_sum",
            &[("route", route)],
            h.sum,
        );
        o.line(
            "outpost_hub_http_request_duration_seconds_count",
            &[("route", route)],
            h.count as f64,
        );
    }
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
    o.head(
        "outpost_hub_connected_agents",
        "gauge",
        "Open sync long-polls (agents connected now).",
    );
    o.line(
        "outpost_hub_connected_agents",
        &[],
        m.long_polls.load(Ordering::Relaxed).max(0) as f64,
    );
    o.head(
        "outpost_hub_alert_notifications_total",
        "counter",
        "Alert transitions recorded, by new state.",
    );
    o.line(
        "outpost_hub_alert_notifications_total",
        &[("state", "firing")],
        load(&m.alerts_fired),
    );
    o.line(
        "outpost_hub_alert_notifications_total",
        &[("state", "resolved")],
        load(&m.alerts_resolved),
    );
    o.head(
        "outpost_hub_webhook_deliveries_total",
        "counter",
        "Webhook POST attempts by result (ok, retry, dropped).",
    );
    o.line(
        "outpost_hub_webhook_deliveries_total",
        &[("result", "ok")],
        load(&m.webhook_ok),
    );
    o.line(
        "outpost_hub_webhook_deliveries_total",
        &[("result", "retry")],
        load(&m.webhook_retry),
    );
    o.line(
        "outpost_hub_webhook_deliveries_total",
        &[("result", "dropped")],
        load(&m.webhook_dropped),
    );
    o.head(
        "outpost_hub_webhook_queue",
        "gauge",
        "Webhook notifications waiting to be delivered.",
    );
    o.line("outpost_hub_webhook_queue", &[], f.webhook_queue as f64);
    o.head(
        "outpost_hub_error_lines_received_total",
        "counter",
        "Error log lines forwarded by nodes and stored.",
    );
    o.line("outpost_hub_error_lines_received_total", &[], load(&m.error_lines));
    o.head(
        "outpost_hub_log_requests_total",
        "counter",
        "Operator log requests, by result (ok, failed).",
    );
    o.line(
        "outpost_hub_log_requests_total",
        &[("result", "ok")],
        load(&m.log_requests_ok),
    );
    o.line(
        "outpost_hub_log_requests_total",
        &[("result", "failed")],
        load(&m.log_requests_failed),
    );
    o.0
}

/// `GET /metrics` (admin token, as for every operator route): Prometheus text format.
pub async fn metrics(State(st): State<Arc<HubState>>, _: crate::server::Admin) -> Result<Response, crate::HubError> {
    use axum::response::IntoResponse;
    let now = crate::now_ms();
    let offline_after = st.offline_after;
    let (nodes, statuses) = st.db(|s| Ok((s.nodes()?, s.statuses(None)?))).await?;
    let (alerts, vitals, (_, queue)) =
        crate::alerts::mdb(&st, |m| Ok((m.alerts(false)?, m.vitals()?, m.hook_queue()?))).await?;
    let mut f = FleetView {
        webhook_queue: queue,
        ..Default::default()
    };
    for n in nodes {
        let online = crate::scheduler::is_online(&n, offline_after, now);
        if let Some(v) = vitals.get(&n.name) {
            f.vitals.insert(n.name.clone(), v.clone());
        }
        f.nodes.push((n.name, n.labels, online));
    }
    for (_, w) in statuses {
        *f.phases.entry(w.phase.as_str().to_string()).or_default() += 1;
    }
    for a in alerts {
        *f.firing.entry((a.name, a.severity)).or_default() += 1;
    }
    let body = render(&f, &st.monitor.metrics);
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_bounded_and_text_is_well_formed() {
        assert_eq!(route_of("/v1/nodes/a/sync"), "sync");
        assert_eq!(route_of("/v1/nodes/a/logs/123"), "logs");
        assert_eq!(route_of("/v1/nodes/a"), "operator");
        assert_eq!(route_of("/v1/apply"), "operator");
        let m = Metrics::default();
        m.observe("sync", 204, 30.0);
        m.observe("status", 200, 0.01);
        let mut f = FleetView::default();
        f.nodes
            .push(("a".into(), [("site".to_string(), "s\"1".to_string())].into(), true));
        f.vitals.insert(
            "a".into(),
            Vitals {
                cpu: 50.0,
                ..Default::default()
            },
        );
        let text = render(&f, &m);
        assert!(text.contains("outpost_nodes{status=\"Online\"} 1"), "{text}");
        assert!(
            text.contains("outpost_node_cpu_ratio{node=\"a\",site=\"s\\\"1\"} 0.5"),
            "{text}"
        );
        assert!(text.contains("outpost_hub_http_request_duration_seconds_bucket{route=\"sync\",le=\"40\"} 1"));
        assert!(text.contains("outpost_hub_http_request_duration_seconds_bucket{route=\"sync\",le=\"10\"} 0"));
    }

    fn names(text: &str) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        let mut cur = String::new();
        for c in text.chars().chain(std::iter::once(' ')) {
            if c.is_ascii_alphanumeric() || c == '_' {
                cur.push(c);
            } else {
                if cur.starts_with("outpost_") {
                    out.insert(cur.clone());
                }
                cur.clear();
            }
        }
        out
    }

    #[test]
    fn docs_list_every_metric_and_the_dashboard_uses_only_real_ones() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
        let docs = std::fs::read_to_string(format!("{root}/docs/metrics.md")).unwrap();
        let dash = std::fs::read_to_string(format!("{root}/dashboards/outpost.json")).unwrap();
        let _: serde_json::Value = serde_json::from_str(&dash).expect("dashboard is JSON");
        let mut f = FleetView::default();
        f.nodes.push(("a".into(), Labels::new(), true));
        let text = render(&f, &Metrics::default());
        let emitted: std::collections::BTreeSet<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .map(String::from)
            .collect();
        let documented = names(&docs);
        for m in &emitted {
            assert!(documented.contains(m), "{m} is not in docs/metrics.md");
        }
        for m in names(&dash) {
            let base = m.trim_end_matches("_bucket");
            assert!(
                emitted.contains(base),
                "the dashboard uses {m}, which /metrics does not have"
            );
        }
    }
}
