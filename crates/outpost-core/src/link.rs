//! Decisions about the hub link, as pure functions: which labels a joining node gets
//! ([`node_labels`]), when a node renews its certificate ([`renewal`]), and which TCP connections
//! the hub admits when descriptors run short ([`budget`], [`admit`], [`victim`]).
//!
//! Owns: the node-label restriction (NodeRestriction-style), the renewal schedule, connection
//! limits and the choice of which idle connection to drop. Must never: read the clock, the
//! descriptor limit or the network; callers pass what they observed.
//!
//! ## Node labels
//! Labels select where DaemonSets, Deployments and so their Secrets go, so a node must not pick
//! its own placement. The hub decides:
//! 1. `kubernetes.io/hostname` is always the node's name (the hub sets it; a request may repeat
//!    it, never change it).
//! 2. The token's labels always apply; a request may repeat one, never change it.
//! 3. A node may add only `kubernetes.io/os`, `kubernetes.io/arch`, keys under
//!    [`NODE_LABEL_PREFIX`] (`node.outpost.dev/`), and the keys its token lists in
//!    `node_labels` (`outpost token create --node-labels rack,zone`).
//!
//! Anything else refuses the join (nothing is stored), naming the label and what to do.

use std::collections::BTreeMap;

use outpost_api::Labels;

/// The label the hub owns: always the node's name.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";
/// Keys under this prefix are the node's own to set (facts it reports about itself; never a
/// basis for sending it Secrets).
pub const NODE_LABEL_PREFIX: &str = "node.outpost.dev/";
/// Well-known keys a node may set about itself.
pub const SELF_LABELS: [&str; 2] = ["kubernetes.io/os", "kubernetes.io/arch"];

/// Why a join's labels were refused. The `Display` text names the label and what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LabelRefusal {
    #[error(
        "label {HOSTNAME_LABEL}={value:?} is not allowed: the hub sets it to the node's name ({node:?}); leave it out"
    )]
    Hostname { node: String, value: String },
    #[error("label {key}={value:?} is not allowed: the join token sets {key}={token_value:?} and a node cannot change it; leave it out, or join with a token for {key}={value:?}")]
    TokenLabel {
        key: String,
        value: String,
        token_value: String,
    },
    #[error("label {key}={value:?} is not allowed: a node may set only kubernetes.io/os, kubernetes.io/arch, keys under {NODE_LABEL_PREFIX} and the keys its token allows; put it on the token (`outpost token create --labels {key}=...`), allow it (`outpost token create --node-labels {key}`), or use {NODE_LABEL_PREFIX}{key}")]
    NotAllowed { key: String, value: String },
}

/// May a node set `key` on itself, given the keys its token allows?
pub fn node_may_set(key: &str, token_allows: &[String]) -> bool {
    SELF_LABELS.contains(&key) || key.starts_with(NODE_LABEL_PREFIX) || token_allows.iter().any(|k| k == key)
}

/// May a token let its nodes set `key` (`outpost token create --node-labels`)? Not the
/// hostname, which is the hub's, nor a key the token sets itself. Pure.
pub fn grantable(key: &str, token_labels: &Labels) -> Result<(), &'static str> {
    if key.is_empty() {
        Err("a label key cannot be empty")
    } else if key == HOSTNAME_LABEL {
        Err("the hub sets it to the node's name")
    } else if token_labels.contains_key(key) {
        Err("the token sets it (--labels); drop one of the two")
    } else {
        Ok(())
    }
}

/// The labels a node gets at join: see the module docs for the rules. Pure.
pub fn node_labels(
    node: &str,
    token_labels: &Labels,
    token_allows: &[String],
    requested: &Labels,
) -> Result<Labels, LabelRefusal> {
    let mut out: Labels = token_labels.clone();
    for (key, value) in requested {
        if key == HOSTNAME_LABEL {
            if value != node {
                return Err(LabelRefusal::Hostname {
                    node: node.to_string(),
                    value: value.clone(),
                });
            }
            continue;
        }
        if let Some(t) = token_labels.get(key) {
            if t != value {
                return Err(LabelRefusal::TokenLabel {
                    key: key.clone(),
                    value: value.clone(),
                    token_value: t.clone(),
                });
            }
            continue;
        }
        if !node_may_set(key, token_allows) {
            return Err(LabelRefusal::NotAllowed {
                key: key.clone(),
                value: value.clone(),
            });
        }
        out.insert(key.clone(), value.clone());
    }
    out.insert(HOSTNAME_LABEL.to_string(), node.to_string());
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Certificate renewal

/// Where a node certificate stands at `now` (all times in Unix seconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// Nothing to do until `at`.
    NotYet { at: i64 },
    /// Less than a third of the validity is left: renew now (the certificate still works).
    Due,
    /// Past `notAfter`: only the hub's renew route still accepts it.
    Expired,
}

/// A node renews when less than a third of its certificate's validity is left (30 days of 90),
/// so a node offline for a while still comes back with a valid certificate. Pure.
pub fn renewal(not_before: i64, not_after: i64, now: i64) -> Renewal {
    if now > not_after {
        return Renewal::Expired;
    }
    let at = not_after - (not_after - not_before).max(0) / 3;
    if now >= at {
        Renewal::Due
    } else {
        Renewal::NotYet { at }
    }
}

/// Warn (`NodeCertificateExpiring`) when less than this is left of a certificate that lives
/// `lifetime_ms`: 14 days for the default 90-day certificates, a quarter of shorter ones. Agents
/// renew with a third left, so the alert means renewal has been failing for a while.
pub fn expiry_warning_ms(lifetime_ms: i64) -> i64 {
    (14 * 86_400_000i64).min(lifetime_ms.max(0) / 4)
}

// ---------------------------------------------------------------------------------------------
// Connection admission

/// How many connections the hub holds (see [`budget`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// All connections together.
    pub max_total: usize,
    /// Connections from one source address that have not (yet) shown a node certificate:
    /// TLS handshakes in progress, operators, joins, and anything idle without a certificate.
    pub max_certless_per_ip: usize,
}

/// Limits from the process's descriptor limit (`RLIMIT_NOFILE`): a sixteenth (between 64 and
/// 1024) stays free for the database, image files and webhooks; a source address may hold a
/// quarter of the rest without a certificate (between 4 and 128). Pure.
pub fn budget(nofile: u64) -> ConnLimits {
    let nofile = usize::try_from(nofile).unwrap_or(usize::MAX).min(1 << 20);
    let headroom = (nofile / 16).clamp(64, 1024);
    let max_total = nofile.saturating_sub(headroom).max(16);
    ConnLimits {
        max_total,
        max_certless_per_ip: (max_total / 4).clamp(4, 128),
    }
}

/// What to do with a newly accepted TCP connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    Accept,
    /// The source address holds its share of certless connections: drop its longest-idle
    /// certless one to make room ([`victim`] among that address's), or refuse the new one.
    EvictSameSource,
    /// The hub holds its maximum: drop the longest-idle certless connection from anywhere, or
    /// refuse the new one.
    EvictAny,
}

/// Admission of a new connection, given how many the hub holds and how many certless ones its
/// source address holds. Connections with a node certificate are never evicted: agents keep
/// their link, and a flood of idle handshakes cannot push them out. Pure.
pub fn admit(total: usize, certless_from_source: usize, l: &ConnLimits) -> Admit {
    if certless_from_source >= l.max_certless_per_ip {
        Admit::EvictSameSource
    } else if total >= l.max_total {
        Admit::EvictAny
    } else {
        Admit::Accept
    }
}

/// A certless connection that could make room: how long it has been idle (no bytes either way,
/// no request in flight), or `None` while it is busy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub id: u64,
    pub idle_ms: Option<i64>,
}

/// The connection to drop: the longest idle, if idle at least `min_idle_ms` (a handshake or a
/// request that is moving is never cut). Ties go to the lowest id (the oldest). Pure.
pub fn victim(candidates: impl IntoIterator<Item = Candidate>, min_idle_ms: i64) -> Option<u64> {
    let mut best: BTreeMap<(i64, std::cmp::Reverse<u64>), u64> = BTreeMap::new();
    for c in candidates {
        if let Some(idle) = c.idle_ms.filter(|i| *i >= min_idle_ms) {
            best.insert((idle, std::cmp::Reverse(c.id)), c.id);
        }
    }
    best.into_iter().next_back().map(|(_, id)| id)
}

/// What a status report would carry if the agent sent one now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingStatus {
    /// The hub has not acknowledged a full report since the agent started or a report failed.
    pub needs_full: bool,
    /// Workloads changed or went away, events are queued, the node's conditions changed, or the
    /// generation the agent runs moved.
    pub changes: bool,
    /// The vitals summary is due (`crate::alerts::vitals_worth_sending` and the report pace).
    pub vitals: bool,
}

/// Should the status reporter send now? Yes when there is something to say, or when the
/// heartbeat is due (`since_last_ms`: time since the hub last acknowledged a report). A
/// wake-up with nothing to say and the heartbeat not due sends nothing: an idle node's link
/// budget is a few packets an hour (docs/protocol.md §12).
pub fn status_due(p: PendingStatus, since_last_ms: i64, heartbeat_ms: i64) -> bool {
    p.needs_full || p.changes || p.vitals || since_last_ms >= heartbeat_ms
}

/// Shortest and longest keepalive period an agent may announce (`ka=` on sync, seconds).
pub const AGENT_PROBE_SECS: std::ops::RangeInclusive<u64> = 1..=600;

/// Slack on top of an agent's announced keepalive period before the hub calls its connection
/// dead (probe timers are not exact, and a probe and its ACK take a round trip): half the
/// period, between 1 and 10 s.
pub fn probe_grace_ms(probe_ms: i64) -> i64 {
    (probe_ms / 2).clamp(1_000, 10_000)
}

/// Is the peer of a connection dead? The agent announced that it probes its idle connection
/// every `probe_ms` (TCP keepalive: a bare segment the hub's kernel answers), so the hub,
/// instead of probing too, counts the segments that arrive: none for `silent_ms` past the
/// period and its [`probe_grace_ms`] means the box or the path is gone. One probe pair per
/// period serves both ends (docs/protocol.md §12).
pub fn peer_silent(probe_ms: i64, silent_ms: i64) -> bool {
    silent_ms > probe_ms + probe_grace_ms(probe_ms)
}

/// How long the hub's own probes of a silent agent connection may go unanswered before it
/// gives the connection up (the kernel usually ends it first, after 1 + 2 x 1 s).
pub const ASK_TIMEOUT_MS: i64 = 5_000;

/// What the hub does next about a connection whose agent announced its probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watch {
    /// Keep watching for the agent's segments.
    Wait,
    /// Segments came while the hub was probing: a middlebox (a TCP load balancer) answers for
    /// the agent, or its probes were late. Stop probing, watch again.
    StopAsking,
    /// Silent past the period and grace: probe once ourselves.
    Ask,
    /// Our probes went unanswered too: the peer is gone.
    Close,
}

/// One step of the hub's watch of an agent-probed connection. `moved`: segments arrived since
/// the last step; `quiet_ms`: time since they last did, or since the hub started asking.
pub fn watch_step(asking: bool, moved: bool, quiet_ms: i64, probe_ms: i64) -> Watch {
    match (asking, moved) {
        (true, true) => Watch::StopAsking,
        (false, true) => Watch::Wait,
        (false, false) if peer_silent(probe_ms, quiet_ms) => Watch::Ask,
        (true, false) if quiet_ms > ASK_TIMEOUT_MS => Watch::Close,
        _ => Watch::Wait,
    }
}

/// The step of the hub's close looks at an agent-probed connection: a tenth of the period and
/// its grace, between 100 ms and 2.5 s (an agent probing every 100 s is found silent within
/// 100 + 10 + 2.5 s).
pub fn look_step_ms(probe_ms: i64) -> i64 {
    ((probe_ms + probe_grace_ms(probe_ms)) / 10).clamp(100, 2_500)
}

/// When the agent was last heard, at a look that found new segments on its connection.
/// `prev_look_ms`: the look before this one. Within one step of it the segments came within
/// that step: now (late by at most a step, as every look used to be). After a longer sleep they
/// came some time in (`prev_look_ms`, `now_ms`]: the last data or ACK the socket took
/// (`recv_ms`, from `TCP_INFO`, which bare keepalive probes do not move) when it falls there,
/// else the start of the span, early rather than late: the worst case is one needless probe
/// pair of the hub's, never a dead box found late.
pub fn heard_at(now_ms: i64, prev_look_ms: i64, step_ms: i64, recv_ms: Option<i64>) -> i64 {
    if now_ms - prev_look_ms <= step_ms {
        return now_ms;
    }
    match recv_ms {
        Some(r) if r > prev_look_ms && r <= now_ms => r,
        _ => prev_look_ms,
    }
}

/// How long until the hub's next look at a connection whose agent was last heard at
/// `heard_ms`. The agent probes a period after the last segment it received from the hub,
/// which is no earlier than the last one the hub heard from it, so nothing needs a look until
/// a step before that; from there the hub looks every step until the probe comes (or the
/// silence passes [`peer_silent`]). An idle agent's connection is looked at about three times a
/// period instead of every step (issue 16: at 100,000 connections a look every 2.5 s each was
/// most of an idle hub's CPU). While the hub asks (its own probes): every step.
pub fn next_look_ms(probe_ms: i64, heard_ms: i64, now_ms: i64, asking: bool) -> i64 {
    let step = look_step_ms(probe_ms);
    if asking {
        return step;
    }
    (heard_ms + probe_ms - step - now_ms).max(step)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn node_labels_table() {
        let token = labels(&[("site", "store-042")]);
        let allows = vec!["rack".to_string()];
        type Pairs = Vec<(&'static str, &'static str)>;
        type Want = Result<Pairs, &'static str>;
        let cases: Vec<(&str, Pairs, Want)> = vec![
            (
                "well-known facts, hostname repeated",
                vec![
                    ("kubernetes.io/hostname", "box-1"),
                    ("kubernetes.io/os", "linux"),
                    ("kubernetes.io/arch", "arm64"),
                ],
                Ok(vec![
                    ("kubernetes.io/arch", "arm64"),
                    ("kubernetes.io/hostname", "box-1"),
                    ("kubernetes.io/os", "linux"),
                    ("site", "store-042"),
                ]),
            ),
            (
                "nothing requested: token labels and hostname",
                vec![],
                Ok(vec![("kubernetes.io/hostname", "box-1"), ("site", "store-042")]),
            ),
            (
                "impersonating another node's hostname",
                vec![("kubernetes.io/hostname", "victim")],
                Err("kubernetes.io/hostname"),
            ),
            (
                "changing the token's site",
                vec![("site", "store-001")],
                Err("the join token sets site"),
            ),
            (
                "repeating the token's site",
                vec![("site", "store-042")],
                Ok(vec![("kubernetes.io/hostname", "box-1"), ("site", "store-042")]),
            ),
            ("a key nobody allowed", vec![("zone", "z1")], Err("a node may set only")),
            (
                "a key the token allows",
                vec![("rack", "r7")],
                Ok(vec![
                    ("kubernetes.io/hostname", "box-1"),
                    ("rack", "r7"),
                    ("site", "store-042"),
                ]),
            ),
            (
                "the node prefix",
                vec![("node.outpost.dev/camera", "yes")],
                Ok(vec![
                    ("kubernetes.io/hostname", "box-1"),
                    ("node.outpost.dev/camera", "yes"),
                    ("site", "store-042"),
                ]),
            ),
        ];
        for (what, req, want) in cases {
            let got = node_labels("box-1", &token, &allows, &labels(&req));
            match (got, want) {
                (Ok(l), Ok(w)) => assert_eq!(l, labels(&w), "{what}"),
                (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{what}: {e}"),
                (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
            }
        }
        // The message says what to do.
        let e = node_labels("a", &token, &[], &labels(&[("zone", "z")])).unwrap_err();
        assert!(e.to_string().contains("outpost token create --node-labels zone"), "{e}");
    }

    #[test]
    fn grants_table() {
        let token = labels(&[("site", "s")]);
        for (key, ok) in [("rack", true), ("", false), (HOSTNAME_LABEL, false), ("site", false)] {
            assert_eq!(grantable(key, &token).is_ok(), ok, "{key:?}");
        }
    }

    #[test]
    fn renewal_table() {
        let (nb, na) = (1000, 1000 + 90);
        for (now, want) in [
            (1000, Renewal::NotYet { at: 1060 }),
            (1059, Renewal::NotYet { at: 1060 }),
            (1060, Renewal::Due),
            (1090, Renewal::Due),
            (1091, Renewal::Expired),
        ] {
            assert_eq!(renewal(nb, na, now), want, "now {now}");
        }
        // a certificate with not_after before not_before is simply due, then expired
        assert_eq!(renewal(10, 5, 5), Renewal::Due);
        assert_eq!(renewal(10, 5, 6), Renewal::Expired);
    }

    #[test]
    fn expiry_warning_is_14_days_or_a_quarter() {
        assert_eq!(expiry_warning_ms(90 * 86_400_000), 14 * 86_400_000);
        assert_eq!(expiry_warning_ms(20_000), 5_000);
        assert_eq!(expiry_warning_ms(-5), 0);
    }

    #[test]
    fn budget_leaves_headroom() {
        for (nofile, total, per_ip) in [
            (256, 192, 48),
            (1024, 960, 128),
            (20_000, 18_976, 128),
            (40, 16, 4),
            (u64::MAX, (1 << 20) - 1024, 128),
        ] {
            assert_eq!(
                budget(nofile),
                ConnLimits {
                    max_total: total,
                    max_certless_per_ip: per_ip
                },
                "nofile {nofile}"
            );
        }
    }

    #[test]
    fn admission_table() {
        let l = ConnLimits {
            max_total: 10,
            max_certless_per_ip: 3,
        };
        for (total, from_ip, want) in [
            (0, 0, Admit::Accept),
            (9, 2, Admit::Accept),
            (10, 0, Admit::EvictAny),
            (5, 3, Admit::EvictSameSource),
            (10, 3, Admit::EvictSameSource),
        ] {
            assert_eq!(admit(total, from_ip, &l), want, "total {total}, from ip {from_ip}");
        }
    }

    #[test]
    fn victim_is_the_longest_idle_and_never_busy() {
        let c = |id, idle_ms| Candidate { id, idle_ms };
        assert_eq!(victim([c(1, Some(500)), c(2, Some(3000)), c(3, None)], 1000), Some(2));
        assert_eq!(
            victim([c(1, Some(500)), c(3, None)], 1000),
            None,
            "nothing idle long enough"
        );
        assert_eq!(
            victim([c(4, Some(2000)), c(2, Some(2000))], 1000),
            Some(2),
            "tie: oldest"
        );
        assert_eq!(victim(Vec::new(), 0), None);
    }

    #[test]
    fn status_goes_when_there_is_something_to_say_or_the_heartbeat_is_due() {
        let p = |needs_full, changes, vitals| PendingStatus {
            needs_full,
            changes,
            vitals,
        };
        let hb = 1_800_000;
        for (pending, since, want, what) in [
            (
                p(false, false, false),
                300_000,
                false,
                "idle wake-up (vitals pace) sends nothing",
            ),
            (p(false, false, false), hb - 1, false, "just before the heartbeat"),
            (p(false, false, false), hb, true, "heartbeat due"),
            (p(true, false, false), 0, true, "full report owed"),
            (p(false, true, false), 0, true, "a change"),
            (p(false, false, true), 0, true, "vitals due"),
        ] {
            assert_eq!(status_due(pending, since, hb), want, "{what}");
        }
    }

    #[test]
    fn a_connection_is_dead_when_the_agents_probes_stop() {
        for (probe, silent, want) in [
            (100_000, 0, false),
            (100_000, 100_000, false),
            (100_000, 110_000, false),
            (100_000, 110_001, true),
            (3_000, 4_500, false),
            (3_000, 4_501, true),
            (600_000, 610_001, true),
        ] {
            assert_eq!(peer_silent(probe, silent), want, "probe {probe} ms, silent {silent} ms");
        }
    }

    #[test]
    fn the_hub_asks_a_silent_agent_connection_before_it_closes_it() {
        use Watch::*;
        let p = 100_000;
        for (asking, moved, quiet, want, what) in [
            (false, true, 0, Wait, "the agent's probe came"),
            (false, false, 110_000, Wait, "silent, within period and grace"),
            (false, false, 110_001, Ask, "silent past the grace: ask ourselves"),
            (true, false, 5_000, Wait, "asking, waiting for the answer"),
            (true, false, 5_001, Close, "our probes unanswered: gone"),
            (true, true, 1_000, StopAsking, "a balancer answered for it"),
            (true, false, 200_000, Close, "asking never turns into a second ask"),
        ] {
            assert_eq!(watch_step(asking, moved, quiet, p), want, "{what}");
        }
    }

    #[test]
    fn the_hub_looks_at_an_idle_agent_connection_a_few_times_a_period() {
        let p = 100_000;
        assert_eq!(look_step_ms(p), 2_500);
        assert_eq!(look_step_ms(2_000), 300);
        assert_eq!(look_step_ms(100), 110);
        assert_eq!(look_step_ms(1), 100);
        // heard_at(now, previous look, step, last data/ACK received)
        for (now, prev, recv, want, what) in [
            (10_000, 8_000, None, 10_000, "looked a step ago: now"),
            (
                10_000,
                7_500,
                Some(9_000),
                10_000,
                "within a step: now, whatever TCP_INFO says",
            ),
            (
                100_000,
                2_500,
                Some(50_000),
                50_000,
                "a long sleep: the data or ACK heard in it",
            ),
            (
                100_000,
                2_500,
                Some(1_000),
                2_500,
                "nothing received in the span: its start",
            ),
            (100_000, 2_500, None, 2_500, "no TCP_INFO: the span's start"),
            (100_000, 2_500, Some(100_001), 2_500, "a time after now is not believed"),
        ] {
            assert_eq!(heard_at(now, prev, 2_500, recv), want, "{what}");
        }
        // next_look_ms(probe, heard, now, asking)
        for (heard, now, asking, want, what) in [
            (
                0,
                0,
                false,
                97_500,
                "just heard: sleep until a step before the next probe",
            ),
            (0, 97_500, false, 2_500, "the probe is due: every step"),
            (
                0,
                105_000,
                false,
                2_500,
                "late: every step until it comes or the silence is past",
            ),
            (0, 50_000, false, 47_500, "woken early: sleep the rest"),
            (0, 0, true, 2_500, "asking: every step"),
        ] {
            assert_eq!(next_look_ms(p, heard, now, asking), want, "{what}");
        }
        // A box that dies right after it was heard: the looks find the silence in time.
        let (heard, mut now, mut looks) = (0, 0, 0);
        while !peer_silent(p, now - heard) {
            now += next_look_ms(p, heard, now, false);
            looks += 1;
        }
        assert!(
            now - heard <= p + probe_grace_ms(p) + look_step_ms(p),
            "found at {now} ms"
        );
        assert!(looks <= 8, "{looks} looks");
        // An idle agent probing every period exactly: three looks per period.
        let (mut heard, mut now, mut looks) = (0i64, 0i64, 0);
        let mut next_probe = p + 700;
        while now < 10 * p {
            let next = now + next_look_ms(p, heard, now, false);
            let moved = next_probe <= next && next_probe > now;
            let prev = std::mem::replace(&mut now, next);
            looks += 1;
            if moved {
                heard = heard_at(now, prev, look_step_ms(p), None);
                assert!(heard - next_probe <= look_step_ms(p) && heard >= next_probe);
                next_probe += p + 300;
            }
            assert!(
                !peer_silent(p, now - heard),
                "a live agent is never silent (at {now} ms)"
            );
        }
        assert!(looks <= 30, "{looks} looks in ten periods");
    }
}
