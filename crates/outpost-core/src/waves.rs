//! Fleet rollouts in health-gated waves, as pure functions.
//!
//! When a workload gets a new revision, the hub starts a [`Rollout`] ([`start`]) and runs
//! [`decide`] whenever nodes report, nodes come and go, or a timer (bake, maintenance window)
//! is due. The rollout decides, per node, which revision the hub hands it ([`desired_revision`]):
//! nodes whose wave has not opened keep the revision they ran before; members of an open wave
//! get the new one as soon as they are online, inside their maintenance window, and under the
//! concurrency limit. The node's own gate (`crate::rollout`: Ready for minReadySeconds within
//! progressDeadlineSeconds) reports Passed or Failed; those results move the rollout.
//!
//! ```text
//!  start ──► Progressing ── wave i: pick nodes (count / percent of the rest / selector)
//!              │  ▲            members: Waiting (window closed; prefetch) ─► Queued (offline,
//!              │  │            or no slot) ─► Updating ─► Passed | Failed
//!              │  │          every online member Passed/Failed ─► bake ─► wave complete ─► i+1
//!              │  │          no node left ─► Complete
//!     pause    │  │ resume
//!              ▼  │
//!            Paused          threshold: failed >= percent of max(finished, minSample)
//!              │               onFailure Rollback ─► Failed: every updated node Reverted
//!     abort ───┼─────────►     onFailure Pause    ─► Paused (resume accepts those failures)
//!     undo ────┴─────────► RolledBack (every updated node Reverted)     Aborted (keep as is)
//! ```
//!
//! Rules this module keeps (table tests below, properties in `tests/properties.rs`):
//! - A wave never opens before the previous one completed (its online members passed or
//!   failed their gates, and its bake time passed).
//! - Offline nodes never block a wave: they count as pending; when they come back they get the
//!   revision their wave reached (the new one while the rollout goes on or after it completed,
//!   their previous one after a fleet rollback).
//! - After a fleet rollback the hub never hands the rolled-back revision to a node again, except
//!   to nodes whose own gate already refused it (they run their last-known-good and report why);
//!   a later rollout's "previous revision" never names a rolled-back revision.
//! - A new revision starts a new rollout at once, whatever the old one's phase: a failed
//!   rollout never blocks the next.
//! - Maintenance windows are evaluated in each node's local time zone (the hub resolves it from
//!   a node label); a window start that does not exist on a spring-forward day moves forward by
//!   the gap, an ambiguous one on a fall-back day takes the earlier instant, and durations are
//!   elapsed time.
//!
//! Nothing here reads the clock: `now` is an argument. The state is plain data, stored by the
//! hub as JSON after each decision, so a hub killed at any instant resumes from the last stored
//! decision (a decision not stored is simply made again).

use std::collections::{BTreeMap, BTreeSet};

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::Timestamp;
use outpost_api::rollout::{parse_clock, RolloutPolicySpec, TIMEZONE_LABEL, WEEKDAYS};
use outpost_api::{Labels, NodeRolloutState, RolloutEvent, RolloutPhase, RolloutState, RolloutStatus, UnixMs};
use serde::{Deserialize, Serialize};

use crate::schedule::selector_matches;

/// Bake time of a wave unless the policy says otherwise.
pub const DEFAULT_BAKE_MS: i64 = 5 * 60_000;
/// Fleets of at most this many nodes get a change in one wave.
pub const DEFAULT_TINY_FLEET: u32 = 3;
pub const DEFAULT_FAILURE_PERCENT: u32 = 10;
pub const DEFAULT_MIN_SAMPLE: u32 = 10;
/// Events kept in a rollout's record.
pub const EVENTS_KEPT: usize = 100;
/// Name of the built-in policy.
pub const DEFAULT_POLICY: &str = "default";

// ---------------------------------------------------------------------------------------------
// Policy

/// How a wave picks its nodes among those not updated by earlier waves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Select {
    Count(u32),
    /// Percent of the remaining nodes, rounded up (at least one).
    Percent(u32),
    Labels(Labels),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WavePlan {
    pub name: String,
    pub select: Select,
    pub bake_ms: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFailure {
    Rollback,
    Pause,
}

/// A maintenance window in a node's local time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    /// Bit 0 = Monday .. bit 6 = Sunday; 0 = every day.
    pub days: u8,
    /// Seconds after local midnight.
    pub start_secs: u32,
    pub duration_ms: i64,
}

/// A resolved rollout policy (defaults filled in).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// `default`, or `<namespace>/<name>` of the RolloutPolicy.
    pub name: String,
    pub waves: Vec<WavePlan>,
    /// Bake of the implicit last wave (nodes left after the listed waves).
    pub bake_ms: i64,
    pub max_concurrent: Option<u32>,
    pub failure_percent: u32,
    pub min_sample: u32,
    pub on_failure: OnFailure,
    pub tiny_fleet: u32,
    pub windows: Vec<Window>,
    pub timezone_label: String,
    pub timezone: String,
}

fn duration_ms(s: Option<&String>, default: i64) -> i64 {
    s.and_then(|s| outpost_api::parse_duration_secs(s).ok())
        .map_or(default, |secs| {
            i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)
        })
}

impl Default for Policy {
    /// One canary node, then 10 %, 50 % and 100 % of the nodes not yet updated, 5 minutes of
    /// bake after each; the rollout fails (and rolls back) when 10 % of at least 10 finished
    /// nodes failed their gate; fleets of 3 nodes or fewer go at once; no windows.
    fn default() -> Self {
        let wave = |name: &str, select| WavePlan {
            name: name.into(),
            select,
            bake_ms: DEFAULT_BAKE_MS,
        };
        Self {
            name: DEFAULT_POLICY.into(),
            waves: vec![
                wave("canary", Select::Count(1)),
                wave("10%", Select::Percent(10)),
                wave("50%", Select::Percent(50)),
                wave("100%", Select::Percent(100)),
            ],
            bake_ms: DEFAULT_BAKE_MS,
            max_concurrent: None,
            failure_percent: DEFAULT_FAILURE_PERCENT,
            min_sample: DEFAULT_MIN_SAMPLE,
            on_failure: OnFailure::Rollback,
            tiny_fleet: DEFAULT_TINY_FLEET,
            windows: Vec::new(),
            timezone_label: TIMEZONE_LABEL.into(),
            timezone: "UTC".into(),
        }
    }
}

impl Policy {
    /// A policy from a checked RolloutPolicy spec (values the checks refuse fall back to the
    /// defaults; they never reach here from an apply).
    pub fn from_spec(name: &str, spec: &RolloutPolicySpec) -> Self {
        let d = Policy::default();
        let bake_ms = duration_ms(spec.bake.as_ref(), d.bake_ms);
        let waves = if spec.waves.is_empty() {
            d.waves.into_iter().map(|w| WavePlan { bake_ms, ..w }).collect()
        } else {
            spec.waves
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let select = match (w.count, w.percent, &w.selector) {
                        (Some(n), _, _) => Select::Count(n.max(1)),
                        (_, Some(p), _) => Select::Percent(p.clamp(1, 100)),
                        (_, _, Some(l)) => Select::Labels(l.clone()),
                        _ => Select::Percent(100),
                    };
                    let name = w.name.clone().unwrap_or_else(|| match &select {
                        Select::Count(n) => format!("wave {} ({n} node{})", i + 1, if *n == 1 { "" } else { "s" }),
                        Select::Percent(p) => format!("wave {} ({p}%)", i + 1),
                        Select::Labels(l) => format!(
                            "wave {} ({})",
                            i + 1,
                            l.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
                        ),
                    });
                    WavePlan {
                        name,
                        select,
                        bake_ms: duration_ms(w.bake.as_ref(), bake_ms),
                    }
                })
                .collect()
        };
        let t = spec.failure_threshold.clone().unwrap_or_default();
        Self {
            name: name.into(),
            waves,
            bake_ms,
            max_concurrent: spec.max_concurrent.filter(|n| *n > 0),
            failure_percent: t.percent.unwrap_or(d.failure_percent).min(100),
            min_sample: t.min_sample.unwrap_or(d.min_sample).max(1),
            on_failure: if spec.on_failure.as_deref() == Some("Pause") {
                OnFailure::Pause
            } else {
                OnFailure::Rollback
            },
            tiny_fleet: spec.tiny_fleet.unwrap_or(d.tiny_fleet).max(1),
            windows: spec
                .maintenance_windows
                .iter()
                .filter_map(|w| {
                    let days = w
                        .days
                        .iter()
                        .filter_map(|d| WEEKDAYS.iter().position(|x| x == d))
                        .fold(0u8, |m, i| m | (1 << i));
                    Some(Window {
                        days,
                        start_secs: parse_clock(&w.start).ok()?,
                        duration_ms: duration_ms(Some(&w.duration), 0).max(1),
                    })
                })
                .collect(),
            timezone_label: spec.timezone_label.clone().unwrap_or(d.timezone_label),
            timezone: spec.timezone.clone().unwrap_or(d.timezone),
        }
    }

    /// The policy for a workload with `labels`: the matching RolloutPolicy with the most
    /// selector labels (ties: the first by name), or the built-in default.
    pub fn for_workload(policies: &[(String, RolloutPolicySpec)], labels: &Labels) -> Policy {
        policies
            .iter()
            .filter(|(_, p)| selector_matches(&p.selector, labels))
            .max_by(|(an, a), (bn, b)| a.selector.len().cmp(&b.selector.len()).then(bn.cmp(an)))
            .map(|(name, spec)| Policy::from_spec(name, spec))
            .unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------------
// Maintenance windows

fn ts(ms: UnixMs) -> Timestamp {
    Timestamp::from_millisecond(ms).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// When `w` opens on local `date` (None if the date is out of range).
fn opening(w: &Window, date: Date, tz: &TimeZone) -> Option<UnixMs> {
    let s = w.start_secs;
    let dt = date.at((s / 3600) as i8, ((s / 60) % 60) as i8, (s % 60) as i8, 0);
    // `compatible`: a start in a spring-forward gap moves forward by the gap, an ambiguous one
    // in a fall-back fold takes the earlier instant.
    let z = tz.to_ambiguous_zoned(dt).compatible().ok()?;
    Some(z.timestamp().as_millisecond())
}

fn day_matches(w: &Window, date: Date) -> bool {
    let i = date.weekday().to_monday_zero_offset();
    w.days == 0 || w.days & (1 << i) != 0
}

/// Is any window open at `now` in `tz`? No windows: always open.
pub fn window_open(windows: &[Window], tz: &TimeZone, now: UnixMs) -> bool {
    if windows.is_empty() {
        return true;
    }
    let today = ts(now).to_zoned(tz.clone()).date();
    windows.iter().any(|w| {
        // A window that opened up to 8 days ago may still be open (at most 7 days long).
        (0..=8).any(|back| {
            let Ok(date) = today.checked_sub(jiff::Span::new().days(back)) else {
                return false;
            };
            day_matches(w, date)
                && opening(w, date, tz).is_some_and(|start| start <= now && now < start.saturating_add(w.duration_ms))
        })
    })
}

/// The next time after `now` a window opens in `tz` (None without windows).
pub fn next_opening(windows: &[Window], tz: &TimeZone, now: UnixMs) -> Option<UnixMs> {
    let today = ts(now).to_zoned(tz.clone()).date();
    windows
        .iter()
        .flat_map(|w| {
            (0..=8).filter_map(move |ahead| {
                let date = today.checked_add(jiff::Span::new().days(ahead)).ok()?;
                if !day_matches(w, date) {
                    return None;
                }
                opening(w, date, tz).filter(|s| *s > now)
            })
        })
        .min()
}

// ---------------------------------------------------------------------------------------------
// State

/// A wave that opened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Wave {
    pub name: String,
    pub bake_ms: i64,
    pub opened_at: UnixMs,
    /// Every online member passed or failed its gate (the bake started).
    #[serde(default)]
    pub gates_done_at: Option<UnixMs>,
    #[serde(default)]
    pub completed_at: Option<UnixMs>,
}

/// A node whose wave opened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub wave: u32,
    pub state: NodeRolloutState,
    pub since: UnixMs,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Failed, and the node runs its last-known-good (it rolled back by itself).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub running_good: bool,
}

/// One rollout of one workload revision (stored by the hub as JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// Workload key, `deployment/<ns>/<name>`.
    pub workload: String,
    /// The revision being rolled out.
    pub revision: u64,
    pub phase: RolloutPhase,
    #[serde(default)]
    pub reason: Option<String>,
    pub policy: String,
    pub started_at: UnixMs,
    pub updated_at: UnixMs,
    /// Node -> the revision it ran before this rollout.
    #[serde(default)]
    pub from: BTreeMap<String, u64>,
    /// Where nodes without a `from` go back to: the revision most nodes ran.
    #[serde(default)]
    pub previous: Option<u64>,
    /// Revisions this workload's fleet rolled back (never a node's `from` again).
    #[serde(default)]
    pub rolled_back: BTreeSet<u64>,
    /// Everything in one wave (a tiny fleet, or an undo to a revision the fleet ran).
    #[serde(default)]
    pub one_wave: bool,
    #[serde(default)]
    pub waves: Vec<Wave>,
    #[serde(default)]
    pub members: BTreeMap<String, Member>,
    /// Failures accepted when the rollout was resumed after the threshold paused it.
    #[serde(default)]
    pub accepted_failures: u32,
    /// Paused by the failure threshold (not by an operator).
    #[serde(default)]
    pub paused_by_threshold: bool,
    #[serde(default)]
    pub events: Vec<RolloutEvent>,
}

/// A node's gate result for the rollout's revision, from its status report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Nothing reported for this revision yet.
    Unknown,
    Progressing,
    Passed,
    /// Failed, and the node went back to its last-known-good.
    RolledBack(String),
    /// Failed, with nothing to go back to on the node.
    Failed(String),
}

impl Gate {
    /// The gate of `revision` from a node's reported rollout status.
    pub fn of(status: Option<&RolloutStatus>, revision: u64) -> Gate {
        let Some(s) = status.filter(|s| s.target_revision == revision) else {
            return Gate::Unknown;
        };
        let why = || s.reason.clone().unwrap_or_else(|| "failed its health gate".into());
        match s.state {
            RolloutState::Complete => Gate::Passed,
            RolloutState::Progressing => Gate::Progressing,
            RolloutState::RolledBack => Gate::RolledBack(why()),
            RolloutState::Failed => Gate::Failed(why()),
        }
    }
}

/// What the hub knows of one node the workload is placed on.
#[derive(Clone, Debug)]
pub struct NodeView {
    pub name: String,
    pub labels: Labels,
    pub online: bool,
    /// The node's time zone (resolved by the hub from its label or the policy's default).
    pub tz: TimeZone,
    pub gate: Gate,
}

/// A fleet alert the rollout raises or clears (`RolloutFailed`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AlertChange {
    Fire(String),
    Resolve,
}

/// The result of [`decide`] and of the operator actions.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub rollout: Rollout,
    /// New events, to log, store and send to webhooks.
    pub events: Vec<RolloutEvent>,
    pub alert: Option<AlertChange>,
    /// Decide again by then even if nothing is reported (bake end, window opening).
    pub wake_at: Option<UnixMs>,
    /// The revision each node gets changed for some node: reschedule.
    pub pins_changed: bool,
}

// ---------------------------------------------------------------------------------------------
// Pins: which revision each node gets

/// The revision a node keeps while it is not updated.
pub fn previous_of(r: &Rollout, node: &str) -> u64 {
    r.from.get(node).copied().or(r.previous).unwrap_or(r.revision)
}

/// Does the node get the rollout's revision now?
pub fn gets_target(r: &Rollout, node: &str) -> bool {
    if r.phase == RolloutPhase::Complete {
        return true;
    }
    r.members.get(node).is_some_and(|m| {
        matches!(
            m.state,
            NodeRolloutState::Updating | NodeRolloutState::Passed | NodeRolloutState::Failed
        )
    })
}

/// The revision the hub hands `node` for a workload at revision `current`. `held` is the
/// revision the node holds now. Without a rollout for `current` (the hub stopped between the
/// apply and the rollout's start), nodes keep what they hold and new nodes get `current`.
pub fn desired_revision(r: Option<&Rollout>, current: u64, held: Option<u64>, node: &str) -> u64 {
    match r.filter(|r| r.revision == current) {
        Some(r) if gets_target(r, node) => r.revision,
        Some(r) => previous_of(r, node),
        None => held.unwrap_or(current),
    }
}

/// Should the node fetch the rollout revision's images now (its wave is open, its window not)?
pub fn prefetch(r: &Rollout, node: &str) -> bool {
    r.phase.is_active()
        && r.members
            .get(node)
            .is_some_and(|m| m.state == NodeRolloutState::Waiting)
}

/// Every pin in one map (node -> revision) for the nodes given: to tell whether a decision
/// changed what some node gets.
fn pins<'a>(r: &Rollout, nodes: impl Iterator<Item = &'a str>) -> BTreeMap<String, (u64, bool)> {
    nodes
        .map(|n| {
            let rev = if gets_target(r, n) {
                r.revision
            } else {
                previous_of(r, n)
            };
            (n.to_string(), (rev, prefetch(r, n)))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Start

/// Start the rollout of `revision`. `held` is what each node placed now holds (its desired
/// revision under the previous rollout); `prev` is the workload's previous rollout, which this
/// one supersedes whatever its phase. `one_wave`: everything at once (an undo).
pub fn start(
    prev: Option<&Rollout>,
    workload: &str,
    revision: u64,
    held: &BTreeMap<String, u64>,
    policy: &Policy,
    one_wave: bool,
    now: UnixMs,
) -> Decision {
    let mut rolled_back = prev.map(|p| p.rolled_back.clone()).unwrap_or_default();
    if let Some(p) = prev.filter(|p| matches!(p.phase, RolloutPhase::Failed | RolloutPhase::RolledBack)) {
        rolled_back.insert(p.revision);
    }
    // A node's previous revision is what it holds, unless the fleet rolled that back (a node
    // kept on a refused revision, running its last-known-good): then what it ran before.
    let fallback = |node: &str, rev: u64| -> Option<u64> {
        let mut r = rev;
        let mut hops = 0;
        while rolled_back.contains(&r) && hops < 4 {
            r = prev.map(|p| previous_of(p, node)).filter(|x| *x != r)?;
            hops += 1;
        }
        (!rolled_back.contains(&r)).then_some(r)
    };
    let from: BTreeMap<String, u64> = held
        .iter()
        .filter(|(_, r)| **r != revision)
        .filter_map(|(n, r)| fallback(n, *r).map(|x| (n.clone(), x)))
        .collect();
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for r in from.values() {
        *counts.entry(*r).or_default() += 1;
    }
    let previous = counts
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then(a.0.cmp(b.0)))
        .map(|(r, _)| *r)
        .or_else(|| prev.and_then(|p| p.previous).filter(|r| !rolled_back.contains(r)));
    let mut events = Vec::new();
    let mut alert = None;
    if let Some(p) = prev {
        if p.phase.is_active() || p.phase == RolloutPhase::Aborted {
            events.push(event(
                now,
                "RolloutSuperseded",
                format!(
                    "revision {revision} supersedes the rollout of revision {} ({})",
                    p.revision,
                    p.phase.as_str()
                ),
            ));
        }
        if p.phase == RolloutPhase::Failed || (p.phase == RolloutPhase::Paused && p.paused_by_threshold) {
            alert = Some(AlertChange::Resolve);
        }
    }
    let nothing_to_keep = from.is_empty();
    let mut r = Rollout {
        workload: workload.into(),
        revision,
        phase: if nothing_to_keep {
            RolloutPhase::Complete
        } else {
            RolloutPhase::Progressing
        },
        reason: None,
        policy: policy.name.clone(),
        started_at: now,
        updated_at: now,
        from,
        previous,
        rolled_back,
        one_wave,
        waves: Vec::new(),
        members: BTreeMap::new(),
        accepted_failures: 0,
        paused_by_threshold: false,
        events: Vec::new(),
    };
    events.push(event(
        now,
        if nothing_to_keep {
            "RolloutComplete"
        } else {
            "RolloutStarted"
        },
        if nothing_to_keep {
            format!("revision {revision}: no node runs an earlier revision, so every node gets it at once")
        } else {
            format!(
                "revision {revision} ({} policy{}), from revision {}",
                policy.name,
                if one_wave { ", one wave" } else { "" },
                r.previous.map_or("-".to_string(), |p| p.to_string())
            )
        },
    ));
    push_events(&mut r, &events);
    Decision {
        rollout: r,
        events,
        alert,
        wake_at: None,
        pins_changed: true,
    }
}

fn event(at: UnixMs, reason: &str, message: String) -> RolloutEvent {
    RolloutEvent {
        at,
        reason: reason.into(),
        message,
    }
}

fn push_events(r: &mut Rollout, events: &[RolloutEvent]) {
    r.events.extend(events.iter().cloned());
    if r.events.len() > EVENTS_KEPT {
        let cut = r.events.len() - EVENTS_KEPT;
        r.events.drain(..cut);
    }
}

// ---------------------------------------------------------------------------------------------
// Decide

/// A stable spread of nodes (FNV-1a of workload and node): waves do not always pick the same
/// nodes for every workload, and the order survives hub restarts and releases.
fn spread(workload: &str, node: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in workload.bytes().chain([0]).chain(node.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// The nodes the next wave would take from `remaining`, by `plan`: online nodes first, then
/// a stable spread.
fn pick(workload: &str, plan: &Select, remaining: &[&NodeView]) -> Vec<String> {
    let mut order: Vec<&&NodeView> = remaining.iter().collect();
    order.sort_by_key(|n| (!n.online, spread(workload, &n.name), n.name.clone()));
    let take = |k: usize| order.iter().take(k).map(|n| n.name.clone()).collect();
    match plan {
        Select::Count(k) => take(*k as usize),
        Select::Percent(p) => take((remaining.len() * *p as usize).div_ceil(100).max(1)),
        Select::Labels(sel) => order
            .iter()
            .filter(|n| selector_matches(sel, &n.labels))
            .map(|n| n.name.clone())
            .collect(),
    }
}

/// The wave `index` would be, with its name and bake: a listed wave, or the implicit last one
/// (every node left). The first wave of a tiny fleet or a one-wave rollout takes everyone.
fn plan_of(r: &Rollout, policy: &Policy, index: usize, fleet: usize) -> WavePlan {
    if r.one_wave || (index == 0 && fleet <= policy.tiny_fleet as usize) {
        return WavePlan {
            name: "all nodes".into(),
            select: Select::Percent(100),
            bake_ms: 0,
        };
    }
    policy.waves.get(index).cloned().unwrap_or(WavePlan {
        name: "remaining nodes".into(),
        select: Select::Percent(100),
        bake_ms: 0,
    })
}

/// The waves still to open as they would open now: (name, nodes), for status displays.
pub fn planned_waves(r: &Rollout, policy: &Policy, nodes: &[NodeView]) -> Vec<(String, Vec<String>)> {
    let mut taken: BTreeSet<String> = r.members.keys().cloned().collect();
    let mut out = Vec::new();
    if !r.phase.is_active() {
        return out;
    }
    let mut index = r.waves.len();
    while index < policy.waves.len() + 2 {
        let remaining: Vec<&NodeView> = nodes.iter().filter(|n| !taken.contains(&n.name)).collect();
        if remaining.is_empty() {
            break;
        }
        let plan = plan_of(r, policy, index, nodes.len());
        let picked = pick(&r.workload, &plan.select, &remaining);
        taken.extend(picked.iter().cloned());
        if !picked.is_empty() {
            out.push((plan.name, picked));
        }
        index += 1;
    }
    out
}

fn failure_counts(r: &Rollout, universe: &BTreeSet<&str>) -> (u32, u32) {
    let mut failed = 0;
    let mut finished = 0;
    for (n, m) in &r.members {
        if !universe.contains(n.as_str()) {
            continue;
        }
        match m.state {
            NodeRolloutState::Failed => {
                failed += 1;
                finished += 1;
            }
            NodeRolloutState::Passed => finished += 1,
            _ => {}
        }
    }
    (failed, finished)
}

/// Does the threshold trip with `failed` of `finished` nodes failed?
pub fn threshold_trips(policy: &Policy, failed: u32, finished: u32, accepted: u32) -> bool {
    failed > accepted
        && failed >= 1
        && u64::from(failed) * 100 >= u64::from(policy.failure_percent) * u64::from(finished.max(policy.min_sample))
}

/// Revert every updated node to its previous revision (a fleet rollback). Nodes whose own gate
/// rolled them back keep the revision pinned (they run their last-known-good and report why);
/// members that never got it are dropped (they keep their previous revision).
fn revert_all(r: &mut Rollout, now: UnixMs) -> usize {
    let mut reverted = 0;
    r.members.retain(|_, m| match m.state {
        NodeRolloutState::Updating | NodeRolloutState::Passed => {
            m.state = NodeRolloutState::Reverted;
            m.since = now;
            reverted += 1;
            true
        }
        NodeRolloutState::Failed if !m.running_good => {
            m.state = NodeRolloutState::Reverted;
            m.since = now;
            reverted += 1;
            true
        }
        NodeRolloutState::Waiting | NodeRolloutState::Queued | NodeRolloutState::Pending => false,
        NodeRolloutState::Failed | NodeRolloutState::Reverted => true,
    });
    r.rolled_back.insert(r.revision);
    reverted
}

fn failure_summary(r: &Rollout) -> String {
    let failed: Vec<String> = r
        .members
        .iter()
        .filter(|(_, m)| m.state == NodeRolloutState::Failed || m.reason.is_some())
        .take(5)
        .map(|(n, m)| format!("{n}: {}", m.reason.clone().unwrap_or_default()))
        .collect();
    failed.join("; ")
}

/// Move the rollout on: record gate results, check the failure threshold, activate members,
/// complete and open waves. See the module doc.
pub fn decide(r: &Rollout, policy: &Policy, nodes: &[NodeView], now: UnixMs) -> Decision {
    let mut r = r.clone();
    let before = pins(&r, nodes.iter().map(|n| n.name.as_str()));
    let mut events = Vec::new();
    let mut alert = None;
    let by_name: BTreeMap<&str, &NodeView> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let universe: BTreeSet<&str> = by_name.keys().copied().collect();

    // 1. Gate results of updating nodes.
    for (name, m) in r.members.iter_mut() {
        let Some(n) = by_name.get(name.as_str()) else { continue };
        if m.state != NodeRolloutState::Updating {
            continue;
        }
        match &n.gate {
            Gate::Passed => {
                m.state = NodeRolloutState::Passed;
                m.since = now;
                m.reason = None;
            }
            Gate::RolledBack(why) | Gate::Failed(why) => {
                m.state = NodeRolloutState::Failed;
                m.since = now;
                m.reason = Some(why.clone());
                m.running_good = matches!(n.gate, Gate::RolledBack(_));
            }
            Gate::Unknown | Gate::Progressing => {}
        }
    }

    // 2. The failure threshold.
    let (failed, finished) = failure_counts(&r, &universe);
    let armed = r.phase == RolloutPhase::Progressing || (r.phase == RolloutPhase::Paused && !r.paused_by_threshold);
    if armed && threshold_trips(policy, failed, finished, r.accepted_failures) {
        let why = format!(
            "{failed} of {finished} updated node{} failed the health gate (threshold {} % of at least {}): {}",
            if finished == 1 { "" } else { "s" },
            policy.failure_percent,
            policy.min_sample,
            failure_summary(&r)
        );
        match policy.on_failure {
            OnFailure::Rollback => {
                let n = revert_all(&mut r, now);
                r.phase = RolloutPhase::Failed;
                r.reason = Some(why.clone());
                events.push(event(now, "RolloutFailed", format!("revision {}: {why}", r.revision)));
                events.push(event(
                    now,
                    "RolloutRolledBack",
                    format!(
                        "revision {}: {n} updated node{} sent back to their previous revision",
                        r.revision,
                        if n == 1 { "" } else { "s" }
                    ),
                ));
                alert = Some(AlertChange::Fire(format!(
                    "rollout of revision {} failed: {why}",
                    r.revision
                )));
            }
            OnFailure::Pause => {
                r.phase = RolloutPhase::Paused;
                r.paused_by_threshold = true;
                r.reason = Some(why.clone());
                events.push(event(
                    now,
                    "RolloutPaused",
                    format!("revision {}: paused by the failure threshold: {why}", r.revision),
                ));
                alert = Some(AlertChange::Fire(format!(
                    "rollout of revision {} paused: {why}; `outpost rollout resume` or `undo`",
                    r.revision
                )));
            }
        }
    }

    let mut wake_at: Option<UnixMs> = None;
    let mut wake = |t: UnixMs| wake_at = Some(wake_at.map_or(t, |w: UnixMs| w.min(t)));
    if r.phase == RolloutPhase::Progressing {
        // 3. Open, complete and open again, until nothing moves.
        for _ in 0..policy.waves.len() + 4 {
            activate(&mut r, policy, &by_name, now);
            let index = r.waves.len();
            if let Some(w) = r.waves.last() {
                if w.completed_at.is_none() {
                    let done = r
                        .members
                        .iter()
                        .filter(|(n, m)| m.wave as usize == index - 1 && universe.contains(n.as_str()))
                        .all(|(n, m)| {
                            let online = by_name.get(n.as_str()).is_some_and(|v| v.online);
                            matches!(m.state, NodeRolloutState::Passed | NodeRolloutState::Failed) || !online
                        });
                    if !done {
                        break;
                    }
                    let w = r.waves.last_mut().expect("checked above");
                    let gates_done = *w.gates_done_at.get_or_insert(now);
                    if now < gates_done.saturating_add(w.bake_ms) {
                        wake(gates_done.saturating_add(w.bake_ms));
                        break;
                    }
                    w.completed_at = Some(now);
                    let msg = format!("wave {index} ({}) of revision {} complete", w.name, r.revision);
                    events.push(event(now, "WaveCompleted", msg));
                }
            }
            // The previous wave is complete (or none opened): open the next, or finish.
            let remaining: Vec<&NodeView> = nodes.iter().filter(|n| !r.members.contains_key(&n.name)).collect();
            if remaining.is_empty() {
                r.phase = RolloutPhase::Complete;
                r.reason = None;
                events.push(event(
                    now,
                    "RolloutComplete",
                    format!("revision {} reached every node", r.revision),
                ));
                break;
            }
            let plan = plan_of(&r, policy, index, nodes.len());
            let picked = pick(&r.workload, &plan.select, &remaining);
            if picked.is_empty() {
                // A selector no remaining node matches: nothing to wait for.
                r.waves.push(Wave {
                    name: plan.name.clone(),
                    bake_ms: 0,
                    opened_at: now,
                    gates_done_at: Some(now),
                    completed_at: Some(now),
                });
                events.push(event(
                    now,
                    "WaveCompleted",
                    format!(
                        "wave {} ({}) of revision {}: no node left matches it",
                        index + 1,
                        plan.name,
                        r.revision
                    ),
                ));
                continue;
            }
            r.waves.push(Wave {
                name: plan.name.clone(),
                bake_ms: plan.bake_ms,
                opened_at: now,
                gates_done_at: None,
                completed_at: None,
            });
            for n in &picked {
                r.members.insert(
                    n.clone(),
                    Member {
                        wave: index as u32,
                        state: NodeRolloutState::Queued,
                        since: now,
                        reason: None,
                        running_good: false,
                    },
                );
            }
            events.push(event(
                now,
                "WaveStarted",
                format!(
                    "wave {} ({}) of revision {}: {} node{}",
                    index + 1,
                    plan.name,
                    r.revision,
                    picked.len(),
                    if picked.len() == 1 { "" } else { "s" }
                ),
            ));
        }
        activate(&mut r, policy, &by_name, now);
        // Members waiting for their window: look again when the first window opens.
        for (n, m) in &r.members {
            if m.state == NodeRolloutState::Waiting {
                if let Some(v) = by_name.get(n.as_str()) {
                    if let Some(t) = next_opening(&policy.windows, &v.tz, now) {
                        wake(t);
                    }
                }
            }
        }
    }
    if !events.is_empty() {
        r.updated_at = now;
    }
    push_events(&mut r, &events);
    let after = pins(&r, nodes.iter().map(|n| n.name.as_str()));
    Decision {
        pins_changed: before != after,
        rollout: r,
        events,
        alert,
        wake_at,
    }
}

/// Give members of open waves the revision when they are online, inside their window, and a
/// slot is free (earlier waves first).
fn activate(r: &mut Rollout, policy: &Policy, nodes: &BTreeMap<&str, &NodeView>, now: UnixMs) {
    let mut busy = r
        .members
        .iter()
        .filter(|(n, m)| m.state == NodeRolloutState::Updating && nodes.get(n.as_str()).is_some_and(|v| v.online))
        .count() as u32;
    let mut order: Vec<(u32, String)> = r
        .members
        .iter()
        .filter(|(_, m)| matches!(m.state, NodeRolloutState::Queued | NodeRolloutState::Waiting))
        .map(|(n, m)| (m.wave, n.clone()))
        .collect();
    order.sort();
    for (_, name) in order {
        let Some(v) = nodes.get(name.as_str()) else { continue };
        let m = r.members.get_mut(&name).expect("listed above");
        let next = if !v.online {
            NodeRolloutState::Queued
        } else if !window_open(&policy.windows, &v.tz, now) {
            NodeRolloutState::Waiting
        } else if policy.max_concurrent.is_some_and(|max| busy >= max) {
            NodeRolloutState::Queued
        } else {
            busy += 1;
            NodeRolloutState::Updating
        };
        if next != m.state {
            m.state = next;
            m.since = now;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Operator actions

/// Why an operator action does not apply to the rollout as it stands.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ActionRefused(pub String);

fn not_active(r: &Rollout, what: &str) -> ActionRefused {
    ActionRefused(format!(
        "the rollout of {} revision {} is {}: there is nothing to {what}",
        r.workload,
        r.revision,
        r.phase.as_str()
    ))
}

fn acted(mut r: Rollout, ev: RolloutEvent, alert: Option<AlertChange>) -> Decision {
    r.updated_at = ev.at;
    push_events(&mut r, std::slice::from_ref(&ev));
    Decision {
        rollout: r,
        events: vec![ev],
        alert,
        wake_at: None,
        pins_changed: true,
    }
}

/// `outpost rollout pause`: no wave opens and no node gets the revision until `resume`; nodes
/// already updating finish their gates.
pub fn pause(r: &Rollout, now: UnixMs) -> Result<Decision, ActionRefused> {
    if r.phase != RolloutPhase::Progressing {
        return Err(not_active(r, "pause"));
    }
    let mut r = r.clone();
    r.phase = RolloutPhase::Paused;
    r.paused_by_threshold = false;
    r.reason = Some("paused by an operator".into());
    let ev = event(
        now,
        "RolloutPaused",
        format!("revision {}: paused by an operator", r.revision),
    );
    Ok(acted(r, ev, None))
}

/// `outpost rollout resume`: go on where it stopped. After the threshold paused it, the
/// failures so far are accepted; new ones count again.
pub fn resume(r: &Rollout, now: UnixMs) -> Result<Decision, ActionRefused> {
    if r.phase != RolloutPhase::Paused {
        return Err(not_active(r, "resume (only a Paused rollout resumes)"));
    }
    let mut r = r.clone();
    let alert = r.paused_by_threshold.then_some(AlertChange::Resolve);
    if r.paused_by_threshold {
        let universe: BTreeSet<&str> = r.members.keys().map(String::as_str).collect();
        let (failed, _) = failure_counts(&r, &universe);
        r.accepted_failures = failed;
    }
    r.phase = RolloutPhase::Progressing;
    r.paused_by_threshold = false;
    r.reason = None;
    let ev = event(now, "RolloutResumed", format!("revision {}: resumed", r.revision));
    Ok(acted(r, ev, alert))
}

/// `outpost rollout abort`: stop here for good; updated nodes keep the revision, the others
/// keep theirs. A new apply starts a new rollout.
pub fn abort(r: &Rollout, now: UnixMs) -> Result<Decision, ActionRefused> {
    if !r.phase.is_active() {
        return Err(not_active(r, "abort"));
    }
    let mut r = r.clone();
    let alert = r.paused_by_threshold.then_some(AlertChange::Resolve);
    r.members
        .retain(|_, m| !matches!(m.state, NodeRolloutState::Waiting | NodeRolloutState::Queued));
    r.phase = RolloutPhase::Aborted;
    r.paused_by_threshold = false;
    r.reason = Some("aborted by an operator: updated nodes keep the revision".into());
    let ev = event(
        now,
        "RolloutAborted",
        format!(
            "revision {}: aborted; {} node{} keep it, the others keep their revision",
            r.revision,
            r.members.len(),
            if r.members.len() == 1 { "" } else { "s" }
        ),
    );
    Ok(acted(r, ev, alert))
}

/// `outpost rollout undo` during a rollout: every updated node goes back to its previous
/// revision (nodes never updated are not touched), and the rollout ends RolledBack.
pub fn undo(r: &Rollout, now: UnixMs) -> Result<Decision, ActionRefused> {
    if !(r.phase.is_active() || r.phase == RolloutPhase::Aborted) {
        return Err(not_active(
            r,
            "undo here; `undo` makes the previous revision current instead",
        ));
    }
    let mut r = r.clone();
    let alert = r.paused_by_threshold.then_some(AlertChange::Resolve);
    let n = revert_all(&mut r, now);
    r.phase = RolloutPhase::RolledBack;
    r.paused_by_threshold = false;
    r.reason = Some("rolled back by an operator".into());
    let ev = event(
        now,
        "RolloutRolledBack",
        format!(
            "revision {}: rolled back by an operator; {n} updated node{} go back to their previous revision",
            r.revision,
            if n == 1 { "" } else { "s" }
        ),
    );
    Ok(acted(r, ev, alert))
}

/// Each node's state in the rollout (Pending for nodes whose wave has not opened).
pub fn node_state(r: &Rollout, node: &str) -> NodeRolloutState {
    match r.members.get(node) {
        Some(m) => m.state,
        None if r.phase == RolloutPhase::Complete => NodeRolloutState::Passed,
        None => NodeRolloutState::Pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn node(name: &str, online: bool, gate: Gate) -> NodeView {
        NodeView {
            name: name.into(),
            labels: [("site".to_string(), name.split('-').next().unwrap_or("").to_string())].into(),
            online,
            tz: TimeZone::UTC,
            gate,
        }
    }

    fn fleet(n: usize) -> Vec<NodeView> {
        (0..n)
            .map(|i| node(&format!("s{i:02}-box"), true, Gate::Unknown))
            .collect()
    }

    fn held(nodes: &[NodeView], rev: u64) -> BTreeMap<String, u64> {
        nodes.iter().map(|n| (n.name.clone(), rev)).collect()
    }

    fn policy(bake_ms: i64) -> Policy {
        let mut p = Policy::default();
        for w in &mut p.waves {
            w.bake_ms = bake_ms;
        }
        p
    }

    /// Report `gate` for the rollout's revision from every node now Updating.
    fn report(nodes: &mut [NodeView], r: &Rollout, gate: impl Fn(&str) -> Gate) {
        for n in nodes.iter_mut() {
            if r.members
                .get(&n.name)
                .is_some_and(|m| m.state == NodeRolloutState::Updating)
            {
                n.gate = gate(&n.name);
            }
        }
    }

    fn updating(r: &Rollout) -> Vec<String> {
        r.members
            .iter()
            .filter(|(_, m)| m.state == NodeRolloutState::Updating)
            .map(|(n, _)| n.clone())
            .collect()
    }

    #[test]
    fn default_waves_go_canary_10_50_100_with_bake() {
        let mut nodes = fleet(20);
        let p = policy(MIN);
        let d = start(None, "deployment/default/web", 2, &held(&nodes, 1), &p, false, 0);
        assert_eq!(d.rollout.phase, RolloutPhase::Progressing);
        assert_eq!(d.rollout.previous, Some(1));
        let d = decide(&d.rollout, &p, &nodes, 0);
        assert_eq!(updating(&d.rollout).len(), 1, "one canary");
        assert!(d.pins_changed);
        let canary = updating(&d.rollout)[0].clone();
        // nobody else gets revision 2; the canary does
        for n in &nodes {
            let want = if n.name == canary { 2 } else { 1 };
            assert_eq!(desired_revision(Some(&d.rollout), 2, Some(1), &n.name), want);
        }
        report(&mut nodes, &d.rollout, |_| Gate::Passed);
        let d = decide(&d.rollout, &p, &nodes, 1_000);
        assert_eq!(d.rollout.waves.len(), 1, "baking: the next wave waits");
        assert_eq!(d.wake_at, Some(1_000 + MIN));
        let d = decide(&d.rollout, &p, &nodes, 1_000 + MIN);
        assert_eq!(d.rollout.waves.len(), 2);
        assert_eq!(updating(&d.rollout).len(), 2, "10 % of 19, rounded up");
        let mut r = d.rollout;
        let mut t = 1_000 + MIN;
        let mut sizes = vec![1, 2];
        while r.phase == RolloutPhase::Progressing {
            report(&mut nodes, &r, |_| Gate::Passed);
            t += 1_000;
            r = decide(&r, &p, &nodes, t).rollout;
            t += MIN;
            let before = r.waves.len();
            r = decide(&r, &p, &nodes, t).rollout;
            if r.waves.len() > before {
                sizes.push(updating(&r).len());
            }
        }
        assert_eq!(sizes, vec![1, 2, 9, 8], "canary, 10 %, 50 % of the rest, the rest");
        assert_eq!(r.phase, RolloutPhase::Complete);
        assert!(nodes
            .iter()
            .all(|n| desired_revision(Some(&r), 2, Some(1), &n.name) == 2));
        // waves opened strictly after the previous completed
        for w in r.waves.windows(2) {
            assert!(w[1].opened_at >= w[0].completed_at.unwrap());
        }
    }

    #[test]
    fn a_canary_that_fails_stops_everything_and_nobody_else_gets_it() {
        let mut nodes = fleet(12);
        let p = Policy::default();
        let r = start(None, "w", 5, &held(&nodes, 4), &p, false, 0).rollout;
        let r = decide(&r, &p, &nodes, 0).rollout;
        report(&mut nodes, &r, |_| {
            Gate::RolledBack("container main exited with code 3".into())
        });
        let d = decide(&r, &p, &nodes, 5_000);
        assert_eq!(d.rollout.phase, RolloutPhase::Failed);
        assert!(
            d.rollout.reason.as_deref().unwrap().contains("exited with code 3"),
            "{:?}",
            d.rollout.reason
        );
        assert!(matches!(d.alert, Some(AlertChange::Fire(_))));
        assert_eq!(
            d.events.iter().map(|e| e.reason.as_str()).collect::<Vec<_>>(),
            ["RolloutFailed", "RolloutRolledBack"]
        );
        // the canary rolled back by itself: it keeps the revision pinned (it runs its
        // last-known-good and reports why); every other node stays on 4, now and later
        let canary = d.rollout.members.keys().next().unwrap().clone();
        for n in &nodes {
            let want = if n.name == canary { 5 } else { 4 };
            assert_eq!(
                desired_revision(Some(&d.rollout), 5, Some(4), &n.name),
                want,
                "{}",
                n.name
            );
        }
        let later = decide(&d.rollout, &p, &nodes, 10 * MIN);
        assert_eq!(later.rollout.waves.len(), 1);
        assert!(!later.pins_changed);
    }

    #[test]
    fn threshold_with_small_samples() {
        let p = Policy {
            failure_percent: 20,
            min_sample: 5,
            ..Policy::default()
        };
        // (failed, finished, accepted) -> trips
        for (failed, finished, accepted, trips) in [
            (0, 0, 0, false),
            (0, 50, 0, false),
            (1, 1, 0, true),  // 1 of max(1,5)=5: 20 %
            (1, 6, 0, false), // 1 of 6: 16 %
            (2, 10, 0, true), // 20 %
            (1, 4, 1, false), // accepted after a resume
            (2, 4, 1, true),  // a new one
            (10, 100, 0, false),
            (20, 100, 0, true),
        ] {
            assert_eq!(
                threshold_trips(&p, failed, finished, accepted),
                trips,
                "{failed}/{finished} accepted {accepted}"
            );
        }
        let zero = Policy {
            failure_percent: 0,
            ..Policy::default()
        };
        assert!(threshold_trips(&zero, 1, 100, 0), "0 %: any failure");
        let all = Policy {
            failure_percent: 100,
            min_sample: 1,
            ..Policy::default()
        };
        assert!(!threshold_trips(&all, 9, 10, 0));
        assert!(threshold_trips(&all, 10, 10, 0));
    }

    #[test]
    fn a_later_wave_trips_and_every_updated_node_goes_back() {
        // a third of the nodes (site "bad") fail; the canary is a good one
        let mut nodes: Vec<NodeView> = (0..12)
            .map(|i| {
                let site = if i % 3 == 0 { "bad" } else { "good" };
                node(&format!("{site}-{i:02}"), true, Gate::Unknown)
            })
            .collect();
        let p = Policy {
            waves: vec![
                WavePlan {
                    name: "canary".into(),
                    select: Select::Labels([("site".to_string(), "good".to_string())].into()),
                    bake_ms: 0,
                },
                WavePlan {
                    name: "half".into(),
                    select: Select::Percent(50),
                    bake_ms: 0,
                },
            ],
            failure_percent: 20,
            min_sample: 3,
            ..Policy::default()
        };
        let gate = |n: &str| {
            if n.starts_with("bad") {
                Gate::RolledBack("exits on bad sites".into())
            } else {
                Gate::Passed
            }
        };
        let mut r = start(None, "w", 3, &held(&nodes, 2), &p, false, 0).rollout;
        let mut t = 0;
        while r.phase == RolloutPhase::Progressing && t < 100_000 {
            r = decide(&r, &p, &nodes, t).rollout;
            report(&mut nodes, &r, gate);
            t += 1_000;
        }
        assert_eq!(r.phase, RolloutPhase::Failed, "{:?}", r.events);
        assert_eq!(
            r.waves.len(),
            2,
            "the canary wave (good sites) passed; the second tripped"
        );
        // every updated good node is back on 2; failed bad nodes keep 3 pinned (they run 2)
        for n in &nodes {
            let m = r.members.get(&n.name);
            let want = match m.map(|m| m.state) {
                Some(NodeRolloutState::Failed) => 3,
                _ => 2,
            };
            assert_eq!(
                desired_revision(Some(&r), 3, Some(2), &n.name),
                want,
                "{}: {m:?}",
                n.name
            );
        }
        assert!(r.members.values().any(|m| m.state == NodeRolloutState::Reverted));
        // a new apply starts at once; the failed revision is never anyone's previous
        let d = start(Some(&r), "w", 4, &held(&nodes, 3), &p, false, t);
        assert_eq!(d.rollout.phase, RolloutPhase::Progressing);
        assert!(d.rollout.from.values().all(|r| *r == 2), "{:?}", d.rollout.from);
        assert_eq!(d.alert, Some(AlertChange::Resolve));
        assert!(d.rollout.rolled_back.contains(&3));
    }

    #[test]
    fn offline_nodes_never_block_and_get_their_wave_on_return() {
        let mut nodes = fleet(6);
        nodes[1].online = false;
        nodes[2].online = false;
        let p = Policy {
            waves: vec![
                WavePlan {
                    name: "first".into(),
                    select: Select::Count(3),
                    bake_ms: 0,
                },
                WavePlan {
                    name: "second".into(),
                    select: Select::Percent(100),
                    bake_ms: 0,
                },
            ],
            tiny_fleet: 1,
            ..Policy::default()
        };
        let r = start(None, "w", 2, &held(&nodes, 1), &p, false, 0).rollout;
        let r = decide(&r, &p, &nodes, 0).rollout;
        // online nodes first: the first wave takes the three online ones
        assert_eq!(updating(&r).len(), 3);
        // one of them goes offline mid-wave; the others pass: the wave completes anyway
        let gone = updating(&r)[0].clone();
        for n in nodes.iter_mut() {
            if n.name == gone {
                n.online = false;
            }
        }
        report(
            &mut nodes,
            &r,
            |n| if n == gone { Gate::Progressing } else { Gate::Passed },
        );
        let r = decide(&r, &p, &nodes, 1_000).rollout;
        assert_eq!(r.waves.len(), 2, "the offline node did not block the wave");
        // the second wave's offline members are queued, still on revision 1
        for n in ["s01-box", "s02-box"] {
            assert_eq!(r.members[n].state, NodeRolloutState::Queued);
            assert_eq!(desired_revision(Some(&r), 2, Some(1), n), 1);
        }
        // one comes back: it gets the revision its wave reached
        nodes[1].online = true;
        let d = decide(&r, &p, &nodes, 2_000);
        assert!(d.pins_changed);
        assert_eq!(desired_revision(Some(&d.rollout), 2, Some(1), "s01-box"), 2);
        // the wave completes with the other still offline: the rollout is Complete, and the
        // absent node gets the revision when it returns
        let mut nodes2 = nodes.clone();
        report(&mut nodes2, &d.rollout, |_| Gate::Passed);
        let d = decide(&d.rollout, &p, &nodes2, 3_000);
        assert_eq!(d.rollout.phase, RolloutPhase::Complete);
        assert_eq!(desired_revision(Some(&d.rollout), 2, Some(1), "s02-box"), 2);
    }

    #[test]
    fn a_node_offline_during_a_fleet_rollback_never_gets_the_bad_revision() {
        let mut nodes = fleet(6);
        let p = Policy {
            tiny_fleet: 1,
            waves: vec![
                WavePlan {
                    name: "two".into(),
                    select: Select::Count(2),
                    bake_ms: 0,
                },
                WavePlan {
                    name: "rest".into(),
                    select: Select::Percent(100),
                    bake_ms: 0,
                },
            ],
            ..Policy::default()
        };
        let r = start(None, "w", 9, &held(&nodes, 8), &p, false, 0).rollout;
        let r = decide(&r, &p, &nodes, 0).rollout;
        report(&mut nodes, &r, |_| Gate::Passed);
        // a later-wave node goes offline; wave 2 opens; it is queued (still on 8)
        let late = nodes
            .iter()
            .find(|n| !r.members.contains_key(&n.name))
            .unwrap()
            .name
            .clone();
        for n in nodes.iter_mut().filter(|n| n.name == late) {
            n.online = false;
        }
        let r = decide(&r, &p, &nodes, 1_000).rollout;
        assert_eq!(r.members[&late].state, NodeRolloutState::Queued);
        // wave 2 fails on the first nodes that update: fleet rollback
        report(&mut nodes, &r, |_| Gate::RolledBack("bad".into()));
        let r = decide(&r, &p, &nodes, 2_000).rollout;
        assert_eq!(r.phase, RolloutPhase::Failed);
        // it comes back: it gets 8, never 9
        for n in nodes.iter_mut() {
            n.online = true;
        }
        let r = decide(&r, &p, &nodes, 3_000).rollout;
        assert_eq!(desired_revision(Some(&r), 9, Some(8), &late), 8);
        assert!(!r.members.contains_key(&late));
        // the two that passed wave 1 are back on 8 too
        assert_eq!(
            r.members
                .values()
                .filter(|m| m.state == NodeRolloutState::Reverted)
                .count(),
            2
        );
    }

    #[test]
    fn pause_resume_abort_undo() {
        let mut nodes = fleet(10);
        let p = policy(0);
        let r = start(None, "w", 2, &held(&nodes, 1), &p, false, 0).rollout;
        let r = decide(&r, &p, &nodes, 0).rollout;
        let paused = pause(&r, 100).unwrap().rollout;
        assert_eq!(paused.phase, RolloutPhase::Paused);
        assert!(pause(&paused, 100).is_err());
        report(&mut nodes, &paused, |_| Gate::Passed);
        let still = decide(&paused, &p, &nodes, 1_000).rollout;
        assert_eq!(still.waves.len(), 1, "no wave opens while paused");
        assert_eq!(still.members.values().next().unwrap().state, NodeRolloutState::Passed);
        let resumed = resume(&still, 2_000).unwrap().rollout;
        let next = decide(&resumed, &p, &nodes, 2_000).rollout;
        assert_eq!(next.waves.len(), 2, "resumed: the next wave opens");
        // abort: updated nodes keep 2, the others keep 1, and nothing moves again
        let aborted = abort(&next, 3_000).unwrap().rollout;
        let kept: Vec<&String> = aborted.members.keys().collect();
        assert!(!kept.is_empty());
        for n in &nodes {
            let want = if aborted.members.contains_key(&n.name) { 2 } else { 1 };
            assert_eq!(desired_revision(Some(&aborted), 2, Some(1), &n.name), want);
        }
        assert_eq!(decide(&aborted, &p, &nodes, 9 * MIN).rollout.waves.len(), 2);
        // undo after abort: every updated node goes back
        let undone = undo(&aborted, 4_000).unwrap().rollout;
        assert_eq!(undone.phase, RolloutPhase::RolledBack);
        assert!(nodes
            .iter()
            .all(|n| desired_revision(Some(&undone), 2, Some(1), &n.name) == 1));
        assert!(undo(&undone, 5_000).is_err());
        assert!(resume(&undone, 5_000).unwrap_err().0.contains("RolledBack"));
    }

    #[test]
    fn pause_on_failure_then_resume_accepts_the_failures_so_far() {
        let mut nodes = fleet(10);
        let p = Policy {
            on_failure: OnFailure::Pause,
            min_sample: 1,
            failure_percent: 50,
            ..policy(0)
        };
        let r = start(None, "w", 2, &held(&nodes, 1), &p, false, 0).rollout;
        let r = decide(&r, &p, &nodes, 0).rollout;
        report(&mut nodes, &r, |_| Gate::RolledBack("boom".into()));
        let d = decide(&r, &p, &nodes, 1_000);
        assert_eq!(d.rollout.phase, RolloutPhase::Paused);
        assert!(d.rollout.paused_by_threshold);
        assert!(matches!(d.alert, Some(AlertChange::Fire(_))));
        // the canary keeps its revision pinned; nothing else moves
        assert_eq!(d.rollout.waves.len(), 1);
        let resumed = resume(&d.rollout, 2_000).unwrap();
        assert_eq!(resumed.alert, Some(AlertChange::Resolve));
        assert_eq!(resumed.rollout.accepted_failures, 1);
        let next = decide(&resumed.rollout, &p, &nodes, 2_000).rollout;
        assert_eq!(next.phase, RolloutPhase::Progressing);
        assert_eq!(next.waves.len(), 2);
    }

    #[test]
    fn tiny_fleets_and_undo_go_in_one_wave_and_first_revisions_at_once() {
        let nodes = fleet(3);
        let p = Policy::default();
        let r = start(None, "w", 2, &held(&nodes, 1), &p, false, 0).rollout;
        let d = decide(&r, &p, &nodes, 0);
        assert_eq!(updating(&d.rollout).len(), 3);
        assert_eq!(d.rollout.waves[0].bake_ms, 0);
        let mut big = fleet(30);
        let r = start(None, "w", 2, &held(&big, 1), &p, true, 0).rollout;
        assert_eq!(updating(&decide(&r, &p, &big, 0).rollout).len(), 30, "one wave");
        // no node holds an earlier revision: complete at once
        big.truncate(5);
        let d = start(None, "w", 1, &BTreeMap::new(), &p, false, 0);
        assert_eq!(d.rollout.phase, RolloutPhase::Complete);
        assert!(big
            .iter()
            .all(|n| desired_revision(Some(&d.rollout), 1, None, &n.name) == 1));
        // no rollout for the current revision yet: nodes keep what they hold, new ones get it
        assert_eq!(desired_revision(None, 7, Some(6), "a"), 6);
        assert_eq!(desired_revision(None, 7, None, "a"), 7);
        assert_eq!(desired_revision(Some(&d.rollout), 7, Some(6), "a"), 6, "stale rollout");
    }

    #[test]
    fn max_concurrent_limits_nodes_updating_at_once() {
        let mut nodes = fleet(10);
        let p = Policy {
            waves: vec![WavePlan {
                name: "all".into(),
                select: Select::Percent(100),
                bake_ms: 0,
            }],
            max_concurrent: Some(3),
            tiny_fleet: 1,
            ..Policy::default()
        };
        let mut r = decide(
            &start(None, "w", 2, &held(&nodes, 1), &p, false, 0).rollout,
            &p,
            &nodes,
            0,
        )
        .rollout;
        let mut seen = 0;
        let mut t = 0;
        while r.phase == RolloutPhase::Progressing && t < 100_000 {
            let now_updating = updating(&r).len();
            assert!(now_updating <= 3, "{now_updating} at once");
            seen = seen.max(now_updating);
            report(&mut nodes, &r, |_| Gate::Passed);
            t += 1_000;
            r = decide(&r, &p, &nodes, t).rollout;
        }
        assert_eq!((seen, r.phase), (3, RolloutPhase::Complete));
    }

    fn berlin() -> TimeZone {
        // the POSIX rule of Europe/Berlin: no time-zone database needed
        TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3").unwrap()
    }

    fn at(tz: &TimeZone, s: &str) -> UnixMs {
        let dt: jiff::civil::DateTime = s.parse().unwrap();
        tz.to_ambiguous_zoned(dt)
            .compatible()
            .unwrap()
            .timestamp()
            .as_millisecond()
    }

    #[test]
    fn windows_across_midnight_and_days() {
        let tz = berlin();
        let w = |days: u8, start: &str, hours: i64| Window {
            days,
            start_secs: parse_clock(start).unwrap(),
            duration_ms: hours * 3_600_000,
        };
        // 23:00 for 3 h, Saturdays only (2024-06-01 is a Saturday)
        let sat = [w(1 << 5, "23:00", 3)];
        for (when, open) in [
            ("2024-06-01T22:59", false),
            ("2024-06-01T23:00", true),
            ("2024-06-02T01:59", true), // Sunday morning: still Saturday's window
            ("2024-06-02T02:00", false),
            ("2024-06-02T23:30", false), // Sunday's 23:00 is not a window
            ("2024-06-08T23:30", true),
        ] {
            assert_eq!(window_open(&sat, &tz, at(&tz, when)), open, "{when}");
        }
        assert_eq!(
            next_opening(&sat, &tz, at(&tz, "2024-06-02T12:00")),
            Some(at(&tz, "2024-06-08T23:00"))
        );
        // in UTC the same instant is 21:00-24:00 on Saturday
        // 21:30 UTC is 23:30 in Berlin (summer time): open there, not for a node on UTC
        assert!(window_open(&sat, &tz, at(&TimeZone::UTC, "2024-06-01T21:30")));
        assert!(!window_open(
            &sat,
            &TimeZone::UTC,
            at(&TimeZone::UTC, "2024-06-01T21:30")
        ));
        // no windows: always open
        assert!(window_open(&[], &tz, 0));
        assert_eq!(next_opening(&[], &tz, 0), None);
    }

    #[test]
    fn windows_across_dst_changes() {
        let tz = berlin();
        let w = |start: &str, hours: i64| Window {
            days: 0,
            start_secs: parse_clock(start).unwrap(),
            duration_ms: hours * 3_600_000,
        };
        // spring forward, 2024-03-31: 02:00 -> 03:00. A 02:30 start does not exist that day: it
        // opens at 03:30 local (the gap added), and lasts one hour of elapsed time.
        let spring = [w("02:30", 1)];
        let open_at = next_opening(&spring, &tz, at(&tz, "2024-03-31T00:00")).unwrap();
        assert_eq!(open_at, at(&tz, "2024-03-31T03:30"));
        assert!(window_open(&spring, &tz, at(&tz, "2024-03-31T04:29")));
        assert!(!window_open(&spring, &tz, at(&tz, "2024-03-31T04:30")));
        // 01:00 for 3 h of elapsed time on that night ends at 05:00 local (one hour vanished)
        let night = [w("01:00", 3)];
        assert!(window_open(&night, &tz, at(&tz, "2024-03-31T04:59")));
        assert!(!window_open(&night, &tz, at(&tz, "2024-03-31T05:00")));
        // fall back, 2024-10-27: 03:00 -> 02:00. A 02:30 start is ambiguous: the first one.
        let fall = [w("02:30", 1)];
        let first = at(&tz, "2024-10-27T02:30"); // `compatible`: the earlier instant
        assert_eq!(next_opening(&fall, &tz, at(&tz, "2024-10-27T00:00")), Some(first));
        assert!(window_open(&fall, &tz, first + 59 * MIN));
        assert!(!window_open(&fall, &tz, first + 60 * MIN), "one hour of elapsed time");
        // a window across midnight on the fall-back night lasts its elapsed duration
        let late = [w("23:00", 4)];
        let start = at(&tz, "2024-10-26T23:00");
        assert!(window_open(&late, &tz, start + 4 * 60 * MIN - 1));
        assert!(!window_open(&late, &tz, start + 4 * 60 * MIN));
    }

    #[test]
    fn members_wait_for_their_window_and_prefetch_meanwhile() {
        let tz = berlin();
        let mut nodes = fleet(2);
        for n in nodes.iter_mut() {
            n.tz = tz.clone();
        }
        let p = Policy {
            windows: vec![Window {
                days: 0,
                start_secs: parse_clock("02:00").unwrap(),
                duration_ms: 60 * MIN,
            }],
            ..Policy::default()
        };
        let now = at(&tz, "2024-06-01T12:00");
        let r = start(None, "w", 2, &held(&nodes, 1), &p, false, now).rollout;
        let d = decide(&r, &p, &nodes, now);
        assert!(d.rollout.members.values().all(|m| m.state == NodeRolloutState::Waiting));
        assert!(nodes.iter().all(|n| prefetch(&d.rollout, &n.name)));
        assert!(nodes
            .iter()
            .all(|n| desired_revision(Some(&d.rollout), 2, Some(1), &n.name) == 1));
        let opens = at(&tz, "2024-06-02T02:00");
        assert_eq!(d.wake_at, Some(opens));
        let d = decide(&d.rollout, &p, &nodes, opens);
        assert!(nodes
            .iter()
            .all(|n| desired_revision(Some(&d.rollout), 2, Some(1), &n.name) == 2));
        assert!(!prefetch(&d.rollout, "s00-box"));
    }

    #[test]
    fn policies_resolve_from_specs_and_selectors() {
        let spec: RolloutPolicySpec = serde_json::from_value(serde_json::json!({
            "selector": {"app": "web"},
            "waves": [{"name": "pilot", "selector": {"site": "s01"}}, {"percent": 25, "bake": "0s"}],
            "bake": "2m",
            "failureThreshold": {"percent": 30},
            "onFailure": "Pause",
            "maintenanceWindows": [{"days": ["Sat", "Sun"], "start": "01:30", "duration": "2h"}],
        }))
        .unwrap();
        let p = Policy::from_spec("default/web", &spec);
        assert_eq!(p.waves[0].name, "pilot");
        assert_eq!(p.waves[0].bake_ms, 2 * MIN);
        assert_eq!(p.waves[1].name, "wave 2 (25%)");
        assert_eq!(p.waves[1].bake_ms, 0);
        assert_eq!(
            (p.failure_percent, p.min_sample, p.on_failure),
            (30, 10, OnFailure::Pause)
        );
        assert_eq!(
            p.windows,
            vec![Window {
                days: 0b110_0000,
                start_secs: 90 * 60,
                duration_ms: 120 * MIN
            }]
        );
        let all = vec![
            ("default/web".to_string(), spec.clone()),
            ("default/any".to_string(), RolloutPolicySpec::default()),
        ];
        let web: Labels = [("app".to_string(), "web".to_string())].into();
        assert_eq!(
            Policy::for_workload(&all, &web).name,
            "default/web",
            "the most specific"
        );
        assert_eq!(Policy::for_workload(&all, &Labels::new()).name, "default/any");
        assert_eq!(Policy::for_workload(&[], &web).name, DEFAULT_POLICY);
    }

    #[test]
    fn gates_are_read_for_the_rollouts_revision_only() {
        let st = |state, rev| RolloutStatus {
            state,
            target_revision: rev,
            target_hash: "h".into(),
            good_revision: Some(1),
            reason: Some("why".into()),
            since: 0,
        };
        assert_eq!(Gate::of(None, 2), Gate::Unknown);
        assert_eq!(Gate::of(Some(&st(RolloutState::Complete, 1)), 2), Gate::Unknown);
        assert_eq!(Gate::of(Some(&st(RolloutState::Complete, 2)), 2), Gate::Passed);
        assert_eq!(
            Gate::of(Some(&st(RolloutState::RolledBack, 2)), 2),
            Gate::RolledBack("why".into())
        );
        assert_eq!(
            Gate::of(Some(&st(RolloutState::Failed, 2)), 2),
            Gate::Failed("why".into())
        );
    }
}
