//! The hub's Prometheus endpoint (`GET /metrics`), through the `prometheus-client` crate: the
//! hub's own counters live in a [`Registry`] (requests, request latency, open long-polls, alert
//! notifications, webhook deliveries, forwarded error lines, log requests), and the fleet
//! figures read from the store at scrape time (nodes by status, workloads by phase, firing
//! alerts, each node's last reported vital signs with `node` and `site` labels) are encoded by a
//! custom [`Collector`] over a [`FleetView`]. docs/metrics.md lists every metric.
//!
//! Formats: OpenMetrics 1.0 when the scraper accepts it (Prometheus does), otherwise the
//! Prometheus text format 0.0.4 (curl, `promtool check metrics`): the crate encodes OpenMetrics
//! only, and [`to_text_004`] renames counter families to their `_total` sample name and drops
//! the `# EOF` marker, the only differences for the metric types used here.
//!
//! A leaf module: the service fills a [`FleetView`], this module encodes it. Owns: the counters
//! and the exposition. Must never: block a request on anything but the
//! short store reads of a scrape, or take labels from anything unbounded except node and
//! workload names.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use outpost_api::{Labels, Vitals};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// Upper bounds of the request-duration histogram, seconds (long-polls land in the last ones).
pub const BUCKETS: &[f64] = &[0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 40.0];

/// The label set of a family: `(name, value)` pairs in a fixed order.
type LabelSet = Vec<(&'static str, String)>;

/// A label value escaped for the text formats (`\\`, `\"`, `\n`): prometheus-client 0.24
/// writes label values verbatim, and node names, sites and workload keys come from outside.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn histogram() -> Histogram {
    Histogram::new(BUCKETS.iter().copied())
}

/// Counters of the hub process. One `Metrics` per hub, shared by the service and the HTTP layer.
pub struct Metrics {
    registry: Registry,
    requests: Family<LabelSet, Counter>,
    durations: Family<LabelSet, Histogram, fn() -> Histogram>,
    /// Open sync long-polls: connected agents.
    pub long_polls: Gauge<i64, AtomicI64>,
    pub alerts_fired: Counter,
    pub alerts_resolved: Counter,
    pub webhook_ok: Counter,
    pub webhook_retry: Counter,
    pub webhook_dropped: Counter,
    pub error_lines: Counter,
    pub log_requests_ok: Counter,
    pub log_requests_failed: Counter,
    rollout_events: Family<LabelSet, Counter>,
    /// 1 for each controller lease this replica holds now (`crate::controllers`).
    leases_held: Family<LabelSet, Gauge<i64, AtomicI64>>,
    /// Requests answered `503 busy`, by route: joins and syncs by admission control, any
    /// route when the database is saturated (`HubError::StoreBusy`).
    busy: Family<LabelSet, Counter>,
    /// Places of admission control held now (joins and syncs at work), and how many there are.
    pub admission_in_use: Gauge<i64, AtomicI64>,
    pub admission_limit: Gauge<i64, AtomicI64>,
}

/// The routes that pass admission control (the `route` label of `outpost_hub_busy_answers`).
pub const ADMITTED_ROUTES: &[&str] = &["join", "sync"];

/// The rollout event reasons counted (the label is bounded to these).
pub const ROLLOUT_EVENTS: &[&str] = &[
    "RolloutStarted",
    "WaveStarted",
    "WaveCompleted",
    "RolloutPaused",
    "RolloutResumed",
    "RolloutFailed",
    "RolloutRolledBack",
    "RolloutAborted",
    "RolloutComplete",
    "RolloutSuperseded",
];

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<LabelSet, Counter>::default();
        registry.register(
            "outpost_hub_http_requests",
            "Requests answered by the hub, by route and status class",
            requests.clone(),
        );
        let durations = Family::<LabelSet, Histogram, fn() -> Histogram>::new_with_constructor(histogram);
        registry.register(
            "outpost_hub_http_request_duration_seconds",
            "Time to answer, by route (sync includes the long-poll wait)",
            durations.clone(),
        );
        let long_polls = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "outpost_hub_connected_agents",
            "Open sync long-polls (agents connected now)",
            long_polls.clone(),
        );
        // Each labelled child is created up front, so every series shows from the start (0).
        let child =
            |f: &Family<LabelSet, Counter>, k: &'static str, v: &str| f.get_or_create_owned(&vec![(k, v.to_string())]);
        let notifications = Family::<LabelSet, Counter>::default();
        registry.register(
            "outpost_hub_alert_notifications",
            "Alert transitions recorded, by new state",
            notifications.clone(),
        );
        let webhooks = Family::<LabelSet, Counter>::default();
        registry.register(
            "outpost_hub_webhook_deliveries",
            "Webhook POST attempts by result (ok, retry, dropped)",
            webhooks.clone(),
        );
        let error_lines = Counter::default();
        registry.register(
            "outpost_hub_error_lines_received",
            "Error log lines forwarded by nodes and stored",
            error_lines.clone(),
        );
        let log_requests = Family::<LabelSet, Counter>::default();
        registry.register(
            "outpost_hub_log_requests",
            "Operator log requests, by result (ok, failed)",
            log_requests.clone(),
        );
        let rollout_events = Family::<LabelSet, Counter>::default();
        registry.register(
            "outpost_hub_rollout_events",
            "Fleet rollout events recorded, by reason (docs/rollouts.md)",
            rollout_events.clone(),
        );
        for r in ROLLOUT_EVENTS {
            child(&rollout_events, "reason", r);
        }
        let leases_held = Family::<LabelSet, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "outpost_hub_lease_held",
            "1 for each controller lease (rollouts, webhooks, ...) this replica holds now",
            leases_held.clone(),
        );
        let busy = Family::<LabelSet, Counter>::default();
        registry.register(
            "outpost_hub_busy_answers",
            "Requests answered 503 busy with Retry-After, by route: joins and syncs by admission control, any route when the database is saturated",
            busy.clone(),
        );
        for r in ADMITTED_ROUTES {
            child(&busy, "route", r);
        }
        let admission_in_use = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "outpost_hub_admission_in_use",
            "Places of admission control held now (joins and syncs at work; a held long-poll gives its place back)",
            admission_in_use.clone(),
        );
        let admission_limit = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "outpost_hub_admission_limit",
            "Places of admission control (OUTPOST_HUB_ADMISSION_LIMIT, default from the CPU count)",
            admission_limit.clone(),
        );
        Self {
            rollout_events,
            leases_held,
            busy,
            admission_in_use,
            admission_limit,
            alerts_fired: child(&notifications, "state", "firing"),
            alerts_resolved: child(&notifications, "state", "resolved"),
            webhook_ok: child(&webhooks, "result", "ok"),
            webhook_retry: child(&webhooks, "result", "retry"),
            webhook_dropped: child(&webhooks, "result", "dropped"),
            log_requests_ok: child(&log_requests, "result", "ok"),
            log_requests_failed: child(&log_requests, "result", "failed"),
            registry,
            requests,
            durations,
            long_polls,
            error_lines,
        }
    }
}

impl Metrics {
    /// Count a `503 busy` answer on `route` (a [`route_of`] label): admission control's, or a
    /// saturated database's.
    pub fn busy_answer(&self, route: &'static str) {
        self.busy.get_or_create(&vec![("route", route.to_string())]).inc();
    }

    /// Whether this replica holds the controller lease `name` now.
    pub fn lease_held(&self, name: &str, held: bool) {
        self.leases_held
            .get_or_create_owned(&vec![("lease", name.to_string())])
            .set(i64::from(held));
    }
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
    /// Count a rollout event (reasons outside [`ROLLOUT_EVENTS`] are not counted).
    pub fn rollout_event(&self, reason: &str) {
        if let Some(r) = ROLLOUT_EVENTS.iter().find(|r| **r == reason) {
            self.rollout_events
                .get_or_create(&vec![("reason", r.to_string())])
                .inc();
        }
    }

    pub fn observe(&self, route: &'static str, status: u16, secs: f64) {
        let class = format!("{}xx", status / 100);
        self.requests
            .get_or_create(&vec![("route", route.to_string()), ("code", class)])
            .inc();
        self.durations
            .get_or_create(&vec![("route", route.to_string())])
            .observe(secs);
    }
}

/// Middleware: count and time every request by route.
pub async fn track(State(m): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let route = route_of(req.uri().path());
    let t = Instant::now();
    let resp = next.run(req).await;
    m.observe(route, resp.status().as_u16(), t.elapsed().as_secs_f64());
    if resp.extensions().get::<crate::error::StoreBusyAnswer>().is_some() {
        m.busy_answer(route);
    }
    resp
}

/// Keeps `sync` long-polls counted while they are open.
pub struct LongPollGuard(Arc<Metrics>);

impl LongPollGuard {
    pub fn new(m: Arc<Metrics>) -> Self {
        m.long_polls.inc();
        Self(m)
    }
}

impl Drop for LongPollGuard {
    fn drop(&mut self) {
        self.0.long_polls.dec();
    }
}

/// What a scrape reads from the store.
#[derive(Debug, Default)]
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

/// One sample value: integers print as integers.
#[derive(Clone, Copy)]
enum V {
    U(u64),
    F(f64),
}

/// A histogram read from a node's report: per-bucket counts (not cumulative) for
/// [`outpost_api::MODEL_LATENCY_BUCKETS`] and one open bucket.
#[derive(Debug)]
struct ConstHistogram<'a> {
    counters: &'a outpost_api::ModelCounters,
}

impl EncodeMetric for ConstHistogram<'_> {
    fn encode(&self, mut enc: prometheus_client::encoding::MetricEncoder) -> Result<(), std::fmt::Error> {
        let b = &self.counters.buckets;
        let buckets: Vec<(f64, u64)> = outpost_api::MODEL_LATENCY_BUCKETS
            .iter()
            .copied()
            .chain([f64::MAX])
            .zip(b.iter().copied().chain(std::iter::repeat(0)))
            .collect();
        let count = b.iter().sum();
        enc.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.counters.latency_sum_s,
            count,
            &buckets,
            None,
        )
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Encodes the [`FleetView`] of one scrape.
#[derive(Debug)]
struct FleetCollector(FleetView);

/// One metric family of constant samples.
fn family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: Vec<(LabelSet, V)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    if let [(labels, v)] = &rows[..] {
        if labels.is_empty() {
            return match (kind, *v) {
                (MetricType::Counter, V::U(x)) => ConstCounter::new(x).encode(m),
                (MetricType::Counter, V::F(x)) => ConstCounter::new(x).encode(m),
                (_, V::U(x)) => ConstGauge::new(x as i64).encode(m),
                (_, V::F(x)) => ConstGauge::new(x).encode(m),
            };
        }
    }
    for (labels, v) in rows {
        let e = m.encode_family(&labels)?;
        match (kind, v) {
            (MetricType::Counter, V::U(x)) => ConstCounter::new(x).encode(e)?,
            (MetricType::Counter, V::F(x)) => ConstCounter::new(x).encode(e)?,
            (_, V::U(x)) => ConstGauge::new(x as i64).encode(e)?,
            (_, V::F(x)) => ConstGauge::new(x).encode(e)?,
        }
    }
    Ok(())
}

impl Collector for FleetCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let f = &self.0;
        let gauge = MetricType::Gauge;
        let rows = ["Online", "Offline"]
            .into_iter()
            .map(|status| {
                let n = f.nodes.iter().filter(|(_, _, on)| *on == (status == "Online")).count();
                (vec![("status", status.to_string())], V::U(n as u64))
            })
            .collect();
        family(
            &mut enc,
            "outpost_nodes",
            "Nodes by status (Online/Offline).",
            gauge,
            rows,
        )?;
        let rows = f
            .phases
            .iter()
            .map(|(phase, n)| (vec![("phase", esc(phase))], V::U(*n)))
            .collect();
        family(
            &mut enc,
            "outpost_workloads",
            "Workload instances on nodes by reported phase.",
            gauge,
            rows,
        )?;
        let rows = f
            .firing
            .iter()
            .map(|((name, sev), n)| (vec![("alertname", esc(name)), ("severity", esc(sev))], V::U(*n)))
            .collect();
        family(
            &mut enc,
            "outpost_alerts_firing",
            "Fleet alerts firing now, by alert name and severity.",
            gauge,
            rows,
        )?;
        let site = |labels: &Labels| esc(labels.get("site").map_or("", |s| s.as_str()));
        let sites: BTreeMap<&str, String> = f.nodes.iter().map(|(n, l, _)| (n.as_str(), site(l))).collect();
        let node_labels = |node: &str| -> LabelSet {
            vec![
                ("node", esc(node)),
                ("site", sites.get(node).cloned().unwrap_or_default()),
            ]
        };
        let rows = f
            .nodes
            .iter()
            .map(|(n, l, on)| (vec![("node", esc(n)), ("site", site(l))], V::U(u64::from(*on))))
            .collect();
        family(&mut enc, "outpost_node_up", "1 while the node is Online.", gauge, rows)?;
        type Get = fn(&Vitals) -> Option<V>;
        let gauges: &[(&str, &str, Get)] = &[
            (
                "outpost_node_cpu_ratio",
                "CPU busy, fraction of all cores (last report).",
                |v| Some(V::F(v.cpu as f64 / 100.0)),
            ),
            (
                "outpost_node_memory_ratio",
                "Memory in use, fraction (last report).",
                |v| Some(V::F(v.mem as f64 / 100.0)),
            ),
            ("outpost_node_memory_total_bytes", "Memory of the node.", |v| {
                Some(V::U(v.mem_total_bytes))
            }),
            (
                "outpost_node_disk_root_ratio",
                "Use of the file system holding /, fraction.",
                |v| Some(V::F(v.disk_root as f64 / 100.0)),
            ),
            (
                "outpost_node_disk_data_ratio",
                "Use of the file system holding the agent's data dir, when not the one of /.",
                |v| v.disk_data.map(|d| V::F(d as f64 / 100.0)),
            ),
            ("outpost_node_load1", "1-minute load average.", |v| {
                Some(V::F(v.load1 as f64))
            }),
            (
                "outpost_node_temperature_celsius",
                "Hottest thermal zone, where the host has one.",
                |v| v.temp_c.map(|t| V::F(f64::from(t))),
            ),
            (
                "outpost_node_vitals_timestamp_seconds",
                "When the node took the reported sample (node clock).",
                |v| Some(V::F(v.at as f64 / 1000.0)),
            ),
        ];
        for (name, help, get) in gauges {
            let rows = f
                .vitals
                .iter()
                .filter_map(|(node, v)| get(v).map(|x| (node_labels(node), x)))
                .collect();
            family(&mut enc, name, help, gauge, rows)?;
        }
        let rows = f
            .vitals
            .iter()
            .map(|(node, v)| (node_labels(node), V::U(v.log_dropped_lines)))
            .collect();
        family(
            &mut enc,
            "outpost_node_log_dropped_lines",
            "Log lines a node dropped because a log cap was reached.",
            MetricType::Counter,
            rows,
        )?;
        type WGet = fn(&outpost_api::WorkloadVitals) -> V;
        let wl: &[(&str, MetricType, &str, WGet)] = &[
            (
                "outpost_workload_cpu_ratio",
                MetricType::Gauge,
                "Workload CPU, fraction of one core, summed over its process groups.",
                |w| V::F(w.cpu as f64 / 100.0),
            ),
            (
                "outpost_workload_memory_bytes",
                MetricType::Gauge,
                "Workload resident memory, summed over its process groups.",
                |w| V::U(w.rss_bytes),
            ),
            (
                "outpost_workload_restarts",
                MetricType::Counter,
                "Workload container restarts on the node.",
                |w| V::U(u64::from(w.restarts)),
            ),
        ];
        for (name, kind, help, get) in wl {
            let rows = f
                .vitals
                .iter()
                .flat_map(|(node, v)| {
                    v.workloads.iter().map(move |w| {
                        let mut l = node_labels(node);
                        l.push(("workload", esc(&w.key)));
                        (l, get(w))
                    })
                })
                .collect();
            family(&mut enc, name, help, *kind, rows)?;
        }
        // Each node's model servers (docs/inference.md): cumulative since the server started, so
        // a restart is a counter reset, as Prometheus expects.
        let model_rows = || {
            f.vitals.iter().flat_map(|(node, v)| {
                v.models.iter().map(move |m| {
                    let mut l = node_labels(node);
                    l.push(("workload", esc(&m.key)));
                    l.push(("model", esc(&m.model)));
                    l.push(("version", esc(&m.version)));
                    (l, m)
                })
            })
        };
        type MGet = fn(&outpost_api::ModelVitals) -> Option<V>;
        let per_model: &[(&str, MetricType, &str, MGet)] = &[
            (
                "outpost_inference_requests",
                MetricType::Counter,
                "Inference requests a node's model server answered (last report).",
                |m| Some(V::U(m.counters.requests)),
            ),
            (
                "outpost_inference_errors",
                MetricType::Counter,
                "Inference requests refused or failed (4xx/5xx) by a node's model server (last report).",
                |m| Some(V::U(m.counters.errors)),
            ),
            (
                "outpost_inference_p99_seconds",
                MetricType::Gauge,
                "p99 latency inside the model server over the node's last sampling interval with requests.",
                |m| m.p99_ms.map(|p| V::F(p / 1000.0)),
            ),
        ];
        for (name, kind, help, get) in per_model {
            let rows = model_rows().filter_map(|(l, m)| get(m).map(|v| (l, v))).collect();
            family(&mut enc, name, help, *kind, rows)?;
        }
        {
            let mut h = enc.encode_descriptor(
                "outpost_inference_latency_seconds",
                "Time from request to answer inside a node's model server (last report).",
                None,
                MetricType::Histogram,
            )?;
            for (l, m) in model_rows() {
                let e = h.encode_family(&l)?;
                ConstHistogram { counters: &m.counters }.encode(e)?;
            }
        }
        family(
            &mut enc,
            "outpost_hub_webhook_queue",
            "Webhook notifications waiting to be delivered.",
            gauge,
            vec![(Vec::new(), V::U(f.webhook_queue))],
        )
    }
}

/// The `/metrics` body in OpenMetrics text format.
pub fn render_openmetrics(f: FleetView, m: &Metrics) -> String {
    use prometheus_client::encoding::text::{encode_eof, encode_registry};
    let mut fleet = Registry::default();
    fleet.register_collector(Box::new(FleetCollector(f)));
    let mut out = String::new();
    // Writing into a String cannot fail; the collector only formats numbers.
    let _ = encode_registry(&mut out, &fleet);
    let _ = encode_registry(&mut out, &m.registry);
    let _ = encode_eof(&mut out);
    out
}

/// OpenMetrics text -> Prometheus text format 0.0.4: a counter family is named after its
/// `_total` samples in `# HELP`/`# TYPE`, and there is no `# EOF` (see the module doc).
pub fn to_text_004(openmetrics: &str) -> String {
    let counters: std::collections::BTreeSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// The `/metrics` text in the Prometheus text format 0.0.4.
pub fn render(f: FleetView, m: &Metrics) -> String {
    to_text_004(&render_openmetrics(f, m))
}

/// The `/metrics` body for a scrape that sent `accept`: OpenMetrics when the scraper accepts
/// it, else the Prometheus text format 0.0.4. Returns (content type, body).
pub fn exposition(f: FleetView, m: &Metrics, accept: &[&str]) -> (&'static str, String) {
    if accept.iter().any(|v| v.contains("application/openmetrics-text")) {
        (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render_openmetrics(f, m),
        )
    } else {
        ("text/plain; version=0.0.4; charset=utf-8", render(f, m))
    }
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
        f.vitals.get_mut("a").unwrap().models.push(outpost_api::ModelVitals {
            key: "deployment/default/digits".into(),
            model: "digits".into(),
            version: "v2".into(),
            counters: outpost_api::ModelCounters {
                requests: 7,
                errors: 2,
                buckets: vec![5, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                latency_sum_s: 0.75,
            },
            p99_ms: Some(0.5),
            error_pct: Some(10.0),
        });
        let text = render(f, &m);
        let l = "node=\"a\",site=\"s\\\"1\",workload=\"deployment/default/digits\",model=\"digits\",version=\"v2\"";
        for want in [
            format!("# TYPE outpost_inference_requests_total counter\noutpost_inference_requests_total{{{l}}} 7\n"),
            format!("outpost_inference_errors_total{{{l}}} 2\n"),
            format!("outpost_inference_p99_seconds{{{l}}} 0.0005\n"),
            "# TYPE outpost_inference_latency_seconds histogram\n".to_string(),
            format!("outpost_inference_latency_seconds_sum{{{l}}} 0.75\n"),
            format!("outpost_inference_latency_seconds_count{{{l}}} 7\n"),
            format!("outpost_inference_latency_seconds_bucket{{le=\"0.00005\",{l}}} 5\n"),
            format!("outpost_inference_latency_seconds_bucket{{le=\"0.0001\",{l}}} 6\n"),
            format!("outpost_inference_latency_seconds_bucket{{le=\"0.5\",{l}}} 6\n"),
            format!("outpost_inference_latency_seconds_bucket{{le=\"+Inf\",{l}}} 7\n"),
        ] {
            assert!(text.contains(&want), "{want}\n---\n{text}");
        }
        assert!(text.contains("outpost_nodes{status=\"Online\"} 1\n"), "{text}");
        assert!(
            text.contains("outpost_node_cpu_ratio{node=\"a\",site=\"s\\\"1\"} 0.5\n"),
            "{text}"
        );
        assert!(
            text.contains("outpost_hub_http_request_duration_seconds_bucket{le=\"40.0\",route=\"sync\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("outpost_hub_http_request_duration_seconds_bucket{le=\"10.0\",route=\"sync\"} 0\n"),
            "{text}"
        );
        // 0.0.4: counters are typed under their sample name, no EOF; OpenMetrics keeps both
        assert!(
            text.contains("# TYPE outpost_hub_http_requests_total counter\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
        let om = render_openmetrics(FleetView::default(), &m);
        assert!(om.contains("# TYPE outpost_hub_http_requests counter\n") && om.ends_with("# EOF\n"));
    }

    #[test]
    fn text_004_renames_counter_families_only() {
        let om = "# HELP a_x A.\n# TYPE a_x counter\na_x_total{k=\"v\"} 1\n# HELP b B.\n# TYPE b gauge\nb 2\n# EOF\n";
        assert_eq!(
            to_text_004(om),
            "# HELP a_x_total A.\n# TYPE a_x_total counter\na_x_total{k=\"v\"} 1\n# HELP b B.\n# TYPE b gauge\nb 2\n"
        );
    }

    /// Series of one family come out of a hash map: sort each run of samples.
    fn stable(text: &str) -> String {
        let mut out = Vec::new();
        let mut run: Vec<&str> = Vec::new();
        for l in text.lines() {
            if l.starts_with('#') {
                run.sort();
                out.append(&mut run);
                out.push(l);
            } else {
                run.push(l);
            }
        }
        run.sort();
        out.append(&mut run);
        out.join("\n") + "\n"
    }

    #[test]
    fn metrics_snapshot() {
        let m = Metrics::default();
        m.observe("sync", 204, 30.0);
        m.observe("status", 200, 0.01);
        m.observe("operator", 404, 0.001);
        m.alerts_fired.inc();
        m.webhook_retry.inc();
        m.error_lines.inc_by(3);
        m.log_requests_ok.inc();
        m.rollout_event("WaveStarted");
        m.rollout_event("NotAReason");
        m.lease_held("rollouts", true);
        m.lease_held("webhooks", false);
        let _poll = LongPollGuard::new(Arc::new(Metrics::default()));
        m.long_polls.inc();
        let mut f = FleetView {
            webhook_queue: 2,
            ..Default::default()
        };
        f.nodes
            .push(("a".into(), [("site".to_string(), "s1".to_string())].into(), true));
        f.nodes.push(("b".into(), Labels::new(), false));
        f.phases.insert("Running".into(), 3);
        f.phases.insert("CrashLoopBackOff".into(), 1);
        f.firing.insert(("NodeOffline".into(), "critical".into()), 1);
        f.vitals.insert(
            "a".into(),
            Vitals {
                at: 1_700_000_000_000,
                cpu: 12.5,
                mem: 40.0,
                mem_total_bytes: 1 << 30,
                disk_root: 55.0,
                disk_data: Some(70.0),
                load1: 0.25,
                temp_c: Some(48.0),
                workloads: vec![outpost_api::WorkloadVitals {
                    key: "daemonset/default/web".into(),
                    cpu: 3.5,
                    rss_bytes: 10 << 20,
                    restarts: 2,
                }],
                log_dropped_lines: 7,
                models: vec![outpost_api::ModelVitals {
                    key: "deployment/default/digits".into(),
                    model: "digits".into(),
                    version: "v2".into(),
                    counters: outpost_api::ModelCounters {
                        requests: 120,
                        errors: 3,
                        buckets: vec![0, 100, 15, 2, 1, 0, 0, 0, 0, 1, 0, 0, 1],
                        latency_sum_s: 0.93,
                    },
                    p99_ms: Some(48.0),
                    error_pct: Some(2.5),
                }],
            },
        );
        let text = render(f, &m);
        promtool_if_present(&text);
        insta::assert_snapshot!(stable(&text));
    }

    /// `promtool check metrics` where installed (the end-to-end test requires it under CI).
    fn promtool_if_present(text: &str) {
        use std::io::Write;
        let Ok(mut child) = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
        else {
            return;
        };
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
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
        // a family shows once it has a series; a scrape is itself a request
        let m = Metrics::default();
        m.observe("metrics", 200, 0.001);
        let text = render(f, &m);
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
