//! Site-local high availability (issue 18, docs/site-ha.md): which box of a site runs a
//! failover workload, decided on each box from what its peers last said, with `now` as an
//! argument.
//!
//! ```text
//!            peers heard within the deadline, none of them active,
//!            best rank among the live boxes, quorum (see below)
//!  standby ───────────────────────────────────────────────────────► active (epoch = newest seen + 1)
//!     ▲                                                                 │
//!     │ a live peer is active with a newer epoch (ties: better rank),   │
//!     │ or a minority of a site of 3+, or the hub witness hands the     │
//!     └──────────────────── copy to the other box of a pair ◄───────────┘
//! ```
//!
//! Rules ([`decide`]):
//! 1. **Membership.** A peer is alive while its last heartbeat is at most `deadline_ms` old
//!    ([`alive`]). A box that just started holding a workload waits a grace period
//!    ([`STARTUP_GRACE_MS`]) before it may take over, so it hears an active peer first (a
//!    returning box never starts a second copy).
//! 2. **No flapping.** While an active peer is alive, nobody else takes over, whatever its rank.
//! 3. **Takeover.** With no live active peer, the best-ranked live box takes over, at an epoch
//!    one above the newest it has seen, when it has quorum:
//!    - three or more boxes: it sees a strict majority of them (itself included);
//!    - two boxes: the hub is the witness when reachable ([`witness`]: the first box to claim a
//!      silent pair's copy at a newer epoch gets it, unless the holder renewed within the
//!      lease); when the hub cannot be asked, the policy decides: `preferAvailability` (the
//!      default) takes over, `preferSafety` waits;
//!    - one box: always.
//! 4. **Stand down.** An active box stops its copy when a live peer is active with a newer epoch
//!    (equal epochs: the better rank, 0 being best, keeps it), when it sees only a minority of a
//!    site of three or more, or when the hub witness names the other box of a pair as the
//!    holder (the hub hears both; a box that took over while the hub did not answer yields to
//!    a holder the hub still hears). So after a partition heals exactly one copy runs: the one
//!    with the highest epoch, ties broken by rank. An active box of a pair renews its lease
//!    once its peer is quiet for half the deadline, before the standby claims at the deadline.
//! 5. **Resume.** A box restarted while active (its claim persisted by the agent) resumes as
//!    active; during the startup grace it stands down only for a live peer with a newer claim,
//!    never for quorum, which it cannot know before its peers answer.
//!
//! Must never: read the clock or the network; callers pass what they heard and when.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use outpost_api::site::{site_address, site_of, FailoverOptions, FailoverPolicy, FailoverSpec, SiteMember};
use outpost_api::{ObjectId, UnixMs, WorkloadSpec};
use sha2::{Digest, Sha256};

use crate::schedule::{NodeView, PlacementDecision};

/// How often a box sends its peers a heartbeat.
pub const HEARTBEAT_MS: i64 = 50;
/// A peer silent for longer than this is dead (five missed heartbeats). With a process start of
/// a few tens of milliseconds, failover stays inside the 500 ms budget.
pub const DEADLINE_MS: i64 = 250;
/// How long a box that starts holding a workload listens before it may take it over: long
/// enough for every peer link to connect (TLS handshakes on a busy box), so boxes that start
/// together do not each start a copy. Failover itself does not wait for it.
pub const STARTUP_GRACE_MS: i64 = 1_000;
/// How long the hub keeps a pair's copy with the box that last renewed it ([`witness`]).
pub const LEASE_MS: i64 = 300;

/// What a peer last said about one workload, and when it was heard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerState {
    pub heard_at: UnixMs,
    pub active: bool,
    pub epoch: u64,
}

/// The hub witness's answer for a pair: who holds the copy, at which epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Witness {
    /// Not asked for this silence yet, or the answer is on its way.
    Pending,
    /// The hub cannot be reached (its link is down or the question timed out).
    Unreachable,
    Answer {
        owner: String,
        epoch: u64,
    },
}

/// Everything one box knows about one failover workload.
#[derive(Clone, Debug)]
pub struct View<'a> {
    pub me: &'a str,
    /// Every box holding the workload, this one included.
    pub members: &'a [SiteMember],
    pub policy: FailoverPolicy,
    /// This box runs the copy, at `epoch`.
    pub active: bool,
    pub epoch: u64,
    /// The newest epoch this box has seen for the workload (its own, its peers', the hub's).
    pub known_epoch: u64,
    /// What each peer last said (peers not listed were never heard).
    pub peers: &'a BTreeMap<String, PeerState>,
    /// When this box started holding the workload (its peer link started, or the workload
    /// arrived): it may take over only `grace_ms` later, once it had time to hear its peers.
    pub since: UnixMs,
    pub grace_ms: i64,
    pub witness: &'a Witness,
    pub deadline_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    TookOver { reason: String },
    StoodDown { reason: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub active: bool,
    pub epoch: u64,
    pub known_epoch: u64,
    pub change: Option<Change>,
    /// Ask the hub witness to give this box the copy at this epoch (a pair whose peer is
    /// silent). An active box renews at its own epoch; a standby claims the next one.
    pub claim: Option<u64>,
}

/// The peers heard within `deadline_ms` of `now`.
pub fn alive(peers: &BTreeMap<String, PeerState>, now: UnixMs, deadline_ms: i64) -> BTreeSet<&str> {
    peers
        .iter()
        .filter(|(_, p)| now.saturating_sub(p.heard_at) <= deadline_ms)
        .map(|(n, _)| n.as_str())
        .collect()
}

/// Who should run the copy, seen from this box. Pure; see the module doc for the rules.
pub fn decide(v: &View, now: UnixMs) -> Outcome {
    let rank = |n: &str| v.members.iter().find(|m| m.node == n).map_or(u32::MAX, |m| m.rank);
    let my_rank = rank(v.me);
    let live = alive(v.peers, now, v.deadline_ms);
    let live: Vec<(&str, &PeerState)> = v
        .peers
        .iter()
        .filter(|(n, _)| live.contains(n.as_str()) && n.as_str() != v.me && rank(n) != u32::MAX)
        .map(|(n, p)| (n.as_str(), p))
        .collect();
    let n = v.members.len().max(1);
    let visible = 1 + live.len();
    let mut known = v.known_epoch.max(v.epoch);
    for (_, p) in &live {
        known = known.max(p.epoch);
    }
    if let Witness::Answer { epoch, .. } = v.witness {
        known = known.max(*epoch);
    }
    let stay = |claim| Outcome {
        active: v.active,
        epoch: v.epoch,
        known_epoch: known,
        change: None,
        claim,
    };
    // The strongest claim a live peer makes: newest epoch, then best rank.
    let holder = live
        .iter()
        .filter(|(_, p)| p.active)
        .max_by_key(|(name, p)| (p.epoch, Reverse(rank(name))));
    let pair_silent = n == 2 && live.is_empty();
    // An active box of a pair starts renewing its lease at the hub once its peer has been
    // quiet for half the deadline, so its renewal reaches the witness before the standby's
    // claim (made at the deadline): a partition of a pair whose hub is up keeps the copy where
    // it runs.
    let pair_quiet = n == 2 && alive(v.peers, now, v.deadline_ms / 2).iter().all(|p| *p == v.me);
    let settling = now.saturating_sub(v.since) < v.grace_ms;

    if v.active {
        let down = |reason: String| Outcome {
            active: false,
            epoch: v.epoch,
            known_epoch: known,
            change: Some(Change::StoodDown { reason }),
            claim: None,
        };
        if let Some((name, p)) = holder {
            if (p.epoch, Reverse(rank(name))) > (v.epoch, Reverse(my_rank)) {
                return down(format!(
                    "{name} runs it at epoch {} (this box: epoch {}, rank {my_rank}); the newer copy wins",
                    p.epoch, v.epoch
                ));
            }
        }
        if settling {
            // Resumed after an agent restart: keep the copy while listening, unless a newer
            // owner is heard (above); quorum and the witness count once the peers had time
            // to answer.
            return stay(None);
        }
        if n >= 3 && visible * 2 <= n {
            return down(format!(
                "this box sees {visible} of the site's {n} boxes, not a majority; the majority decides"
            ));
        }
        if pair_silent {
            if let Witness::Answer { owner, epoch } = v.witness {
                if owner != v.me {
                    return down(format!(
                        "the hub, as witness, says {owner} holds it (epoch {epoch}) while this box cannot reach it"
                    ));
                }
            }
            return stay(Some(v.epoch));
        }
        return stay(pair_quiet.then_some(v.epoch));
    }

    if holder.is_some() {
        return stay(None);
    }
    if settling {
        return stay(None); // just started: listen for an active peer first
    }
    if live.iter().any(|(name, _)| rank(name) < my_rank) {
        return stay(None); // a better-ranked live box takes over
    }
    let take = |epoch: u64, reason: String| Outcome {
        active: true,
        epoch,
        known_epoch: known.max(epoch),
        change: Some(Change::TookOver { reason }),
        claim: None,
    };
    let silent: Vec<&str> = v
        .members
        .iter()
        .map(|m| m.node.as_str())
        .filter(|m| *m != v.me && !live.iter().any(|(l, _)| l == m))
        .collect();
    let silent = silent.join(", ");
    match n {
        1 => take(known + 1, "the only box holding it".into()),
        2 if visible == 2 => take(known + 1, "no box runs it and this box has the better rank".into()),
        2 => match (v.witness, v.policy) {
            (Witness::Answer { owner, epoch }, _) if owner == v.me && *epoch > v.epoch => take(
                *epoch,
                format!("{silent} is silent and the hub, as witness, gave this box the copy at epoch {epoch}"),
            ),
            (Witness::Answer { .. }, _) | (Witness::Pending, _) => stay(Some(known + 1)),
            (Witness::Unreachable, FailoverPolicy::PreferAvailability) => take(
                known + 1,
                format!("{silent} is silent and the hub cannot be reached; policy preferAvailability"),
            ),
            (Witness::Unreachable, FailoverPolicy::PreferSafety) => stay(Some(known + 1)),
        },
        _ if visible * 2 > n => take(
            known + 1,
            format!("no live box runs it ({silent} silent); this box sees {visible} of {n}, a majority"),
        ),
        _ => stay(None),
    }
}

/// The hub's witness record for a pair's copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub owner: String,
    pub epoch: u64,
    pub renewed_at: UnixMs,
}

/// The hub as witness for two boxes that lost each other: `node` claims the copy at `epoch`.
/// The holder renews (same node) and keeps it; another node gets it only at a newer epoch and
/// once the holder has not renewed for `lease_ms`. The answer is the record after the claim.
pub fn witness(current: Option<&Lease>, node: &str, epoch: u64, now: UnixMs, lease_ms: i64) -> Lease {
    match current {
        None => Lease {
            owner: node.into(),
            epoch,
            renewed_at: now,
        },
        Some(l) if l.owner == node => Lease {
            owner: node.into(),
            epoch: epoch.max(l.epoch),
            renewed_at: now,
        },
        Some(l) if epoch > l.epoch && now.saturating_sub(l.renewed_at) > lease_ms => Lease {
            owner: node.into(),
            epoch,
            renewed_at: now,
        },
        Some(l) => l.clone(),
    }
}

/// A rendered spec as a member of a failover workload receives it: the options and the member
/// list added (the same spec, and hash, on every member). The hash covers the options but not
/// the members: a box that joins or leaves the workload's members does not make a new spec, so
/// the active copy is not restarted and no update gate runs ([`delivery_hash`] makes the hub
/// deliver the new list all the same).
pub fn with_failover(mut spec: WorkloadSpec, options: &FailoverOptions, members: &[SiteMember]) -> WorkloadSpec {
    spec.failover = Some(FailoverSpec {
        options: options.clone(),
        members: Vec::new(),
    });
    spec.hash = String::new();
    spec.hash = outpost_api::content_hash(&spec);
    if let Some(f) = spec.failover.as_mut() {
        f.members = members.to_vec();
    }
    spec
}

/// What the hub compares to decide whether a node must receive a spec again: its hash and, for
/// a failover workload, its member list (which the hash leaves out, [`with_failover`]).
pub fn delivery_hash(spec: &WorkloadSpec) -> String {
    match &spec.failover {
        Some(f) => format!("{}.{}", spec.hash, outpost_api::content_hash(&f.members)),
        None => spec.hash.clone(),
    }
}

fn spread_key(id: &ObjectId, node: &str) -> [u8; 8] {
    let d = Sha256::digest(format!("{id}\0site\0{node}").as_bytes());
    d[..8].try_into().expect("8 bytes")
}

/// Where a failover Deployment goes: one active and `standbys` standbys on distinct boxes of
/// one site. Stable: while its current boxes still match, the site and those boxes are kept.
/// Otherwise the site with the most matching online boxes (ties: by name) is chosen. Only
/// boxes with a site label are eligible. Ranks come from a hash of workload and node, so a
/// box's rank does not change when others come and go. Returns the placement and the members
/// (with their peer-link addresses from their labels), in rank order.
pub fn place(
    id: &ObjectId,
    standbys: u32,
    nodes: &[NodeView],
    fits: impl Fn(&NodeView) -> bool,
    current: &BTreeSet<String>,
) -> (PlacementDecision, Vec<SiteMember>) {
    let want = 1 + standbys as usize;
    let matching: Vec<&NodeView> = nodes
        .iter()
        .filter(|n| fits(n) && site_of(&n.labels).is_some())
        .collect();
    let mut sites: BTreeMap<&str, (usize, usize)> = BTreeMap::new(); // site -> (current, online)
    for n in &matching {
        let e = sites.entry(site_of(&n.labels).expect("filtered")).or_default();
        e.0 += current.contains(&n.name) as usize;
        e.1 += n.online as usize;
    }
    let site = sites
        .iter()
        .max_by_key(|(name, (cur, online))| (*cur, *online, Reverse(*name)))
        .map(|(s, _)| *s);
    let Some(site) = site else {
        let note = format!(
            "0 of {want} boxes placed for site failover: no matching node has a site label ({} or {}); join boxes with a token for a site",
            outpost_api::site::SITE_LABEL,
            outpost_api::site::SITE_LABEL_FALLBACK
        );
        return (
            PlacementDecision {
                nodes: BTreeSet::new(),
                note: Some(note),
            },
            Vec::new(),
        );
    };
    let in_site: Vec<&NodeView> = matching
        .iter()
        .copied()
        .filter(|n| site_of(&n.labels) == Some(site))
        .collect();
    let mut kept: Vec<&NodeView> = in_site.iter().copied().filter(|n| current.contains(&n.name)).collect();
    kept.sort_by_key(|n| (!n.online, spread_key(id, &n.name)));
    kept.truncate(want);
    let mut chosen: BTreeSet<String> = kept.iter().map(|n| n.name.clone()).collect();
    let mut candidates: Vec<&NodeView> = in_site
        .iter()
        .copied()
        .filter(|n| n.online && !chosen.contains(&n.name))
        .collect();
    candidates.sort_by_key(|n| spread_key(id, &n.name));
    for n in candidates {
        if chosen.len() >= want {
            break;
        }
        chosen.insert(n.name.clone());
    }
    let mut members: Vec<&NodeView> = in_site.iter().copied().filter(|n| chosen.contains(&n.name)).collect();
    members.sort_by_key(|n| spread_key(id, &n.name));
    let members: Vec<SiteMember> = members
        .iter()
        .enumerate()
        .map(|(i, n)| SiteMember {
            node: n.name.clone(),
            address: site_address(&n.labels),
            rank: i as u32,
        })
        .collect();
    let mut notes = Vec::new();
    if chosen.len() < want {
        notes.push(format!(
            "{} of {want} boxes placed for site failover in site {site}: {} matching boxes there ({} online); each copy needs its own box",
            chosen.len(),
            in_site.len(),
            in_site.iter().filter(|n| n.online).count()
        ));
    }
    let unaddressed: Vec<&str> = members
        .iter()
        .filter(|m| m.address.is_none())
        .map(|m| m.node.as_str())
        .collect();
    if !unaddressed.is_empty() && members.len() > 1 {
        notes.push(format!(
            "{} cannot be reached by its peers: no valid {} label; join it with --labels {}=<its IPv4 address on the site network>",
            unaddressed.join(", "),
            outpost_api::site::SITE_IP_LABEL,
            outpost_api::site::SITE_IP_LABEL
        ));
    }
    (
        PlacementDecision {
            nodes: chosen,
            note: (!notes.is_empty()).then(|| notes.join("; ")),
        },
        members,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_api::Kind;

    fn members(n: usize) -> Vec<SiteMember> {
        (0..n)
            .map(|i| SiteMember {
                node: format!("b{i}"),
                address: Some(format!("10.0.0.{}:7946", i + 1)),
                rank: i as u32,
            })
            .collect()
    }

    /// (peer, heard_at, active, epoch)
    type Heard = &'static [(&'static str, UnixMs, bool, u64)];

    struct Case {
        name: &'static str,
        boxes: usize,
        me: &'static str,
        policy: FailoverPolicy,
        active: bool,
        epoch: u64,
        known: u64,
        heard: Heard,
        since: UnixMs,
        witness: Witness,
        now: UnixMs,
        /// (active after, epoch after, change word, claim)
        want: (bool, u64, Option<&'static str>, Option<u64>),
    }

    const AV: FailoverPolicy = FailoverPolicy::PreferAvailability;
    const SAFE: FailoverPolicy = FailoverPolicy::PreferSafety;

    fn case(name: &'static str, boxes: usize, me: &'static str, active: bool, epoch: u64, heard: Heard) -> Case {
        Case {
            name,
            boxes,
            me,
            policy: AV,
            active,
            epoch,
            known: epoch,
            heard,
            since: 0,
            witness: Witness::Unreachable,
            now: 10_000,
            want: (active, epoch, None, None),
        }
    }

    fn check(c: &Case) {
        let m = members(c.boxes);
        let peers: BTreeMap<String, PeerState> = c
            .heard
            .iter()
            .map(|(n, at, active, epoch)| {
                (
                    n.to_string(),
                    PeerState {
                        heard_at: *at,
                        active: *active,
                        epoch: *epoch,
                    },
                )
            })
            .collect();
        let v = View {
            me: c.me,
            members: &m,
            policy: c.policy,
            active: c.active,
            epoch: c.epoch,
            known_epoch: c.known,
            peers: &peers,
            since: c.since,
            grace_ms: DEADLINE_MS,
            witness: &c.witness,
            deadline_ms: DEADLINE_MS,
        };
        let o = decide(&v, c.now);
        let word = o.change.as_ref().map(|ch| match ch {
            Change::TookOver { .. } => "took over",
            Change::StoodDown { .. } => "stood down",
        });
        assert_eq!((o.active, o.epoch, word, o.claim), c.want, "{}: {:?}", c.name, o.change);
    }

    #[test]
    fn table_of_decisions() {
        const NOW: UnixMs = 10_000;
        const FRESH: UnixMs = NOW - 100; // heard 100 ms ago: alive
        const STALE: UnixMs = NOW - DEADLINE_MS - 1; // silent past the deadline
        let cases = vec![
            Case {
                want: (false, 0, None, None),
                ..case(
                    "standby keeps waiting while the active peer is alive",
                    3,
                    "b1",
                    false,
                    0,
                    &[("b0", FRESH, true, 1), ("b2", FRESH, false, 1)],
                )
            },
            Case {
                want: (true, 2, Some("took over"), None),
                ..case(
                    "best live standby takes over when the active is silent",
                    3,
                    "b1",
                    false,
                    1,
                    &[("b0", STALE, true, 1), ("b2", FRESH, false, 1)],
                )
            },
            Case {
                want: (false, 1, None, None),
                ..case(
                    "a worse-ranked standby leaves it to the better one",
                    3,
                    "b2",
                    false,
                    1,
                    &[("b0", STALE, true, 1), ("b1", FRESH, false, 1)],
                )
            },
            Case {
                want: (false, 1, None, None),
                ..case(
                    "exactly at the deadline the peer is still alive",
                    3,
                    "b1",
                    false,
                    1,
                    &[("b0", NOW - DEADLINE_MS, true, 1), ("b2", FRESH, false, 1)],
                )
            },
            Case {
                want: (false, 0, None, None),
                ..case(
                    "no flapping: a better-ranked box that returns does not take it back",
                    3,
                    "b0",
                    false,
                    0,
                    &[("b1", FRESH, true, 2), ("b2", FRESH, false, 2)],
                )
            },
            Case {
                want: (false, 0, None, None),
                since: NOW - 100,
                ..case(
                    "a box that just started listens first",
                    3,
                    "b0",
                    false,
                    0,
                    &[("b1", STALE, false, 0), ("b2", FRESH, false, 0)],
                )
            },
            Case {
                want: (true, 1, Some("took over"), None),
                ..case(
                    "first start: the best rank with a majority takes it",
                    3,
                    "b0",
                    false,
                    0,
                    &[("b1", FRESH, false, 0), ("b2", FRESH, false, 0)],
                )
            },
            Case {
                want: (false, 2, None, None),
                ..case(
                    "a minority standby of three never takes over",
                    3,
                    "b2",
                    false,
                    2,
                    &[("b0", STALE, true, 2), ("b1", STALE, false, 2)],
                )
            },
            Case {
                want: (false, 1, Some("stood down"), None),
                ..case(
                    "an active box cut off from the majority stands down",
                    3,
                    "b0",
                    true,
                    1,
                    &[("b1", STALE, false, 1), ("b2", STALE, false, 1)],
                )
            },
            Case {
                want: (true, 1, None, None),
                ..case(
                    "an active box with a majority keeps it",
                    3,
                    "b0",
                    true,
                    1,
                    &[("b1", FRESH, false, 1), ("b2", STALE, false, 1)],
                )
            },
            Case {
                want: (false, 1, Some("stood down"), None),
                ..case(
                    "a returning active sees a newer owner and stands down",
                    3,
                    "b0",
                    true,
                    1,
                    &[("b1", FRESH, true, 2), ("b2", FRESH, false, 2)],
                )
            },
            Case {
                want: (true, 2, None, None),
                ..case(
                    "the newer owner keeps it against an older one",
                    3,
                    "b1",
                    true,
                    2,
                    &[("b0", FRESH, true, 1), ("b2", FRESH, false, 2)],
                )
            },
            Case {
                want: (false, 3, Some("stood down"), None),
                ..case(
                    "equal epochs after a heal: the better rank keeps it",
                    2,
                    "b1",
                    true,
                    3,
                    &[("b0", FRESH, true, 3)],
                )
            },
            Case {
                want: (true, 3, None, None),
                ..case(
                    "equal epochs after a heal: the better rank is b0",
                    2,
                    "b0",
                    true,
                    3,
                    &[("b1", FRESH, true, 3)],
                )
            },
            Case {
                want: (true, 5, Some("took over"), None),
                ..case(
                    "pair, hub unreachable, preferAvailability: take over",
                    2,
                    "b1",
                    false,
                    4,
                    &[("b0", STALE, true, 4)],
                )
            },
            Case {
                policy: SAFE,
                want: (false, 4, None, Some(5)),
                ..case(
                    "pair, hub unreachable, preferSafety: wait",
                    2,
                    "b1",
                    false,
                    4,
                    &[("b0", STALE, true, 4)],
                )
            },
            Case {
                witness: Witness::Pending,
                want: (false, 4, None, Some(5)),
                ..case(
                    "pair, the witness is being asked: claim and wait",
                    2,
                    "b1",
                    false,
                    4,
                    &[("b0", STALE, true, 4)],
                )
            },
            Case {
                witness: Witness::Answer {
                    owner: "b1".into(),
                    epoch: 5,
                },
                policy: SAFE,
                want: (true, 5, Some("took over"), None),
                ..case(
                    "pair, the hub grants the copy: take over even under preferSafety",
                    2,
                    "b1",
                    false,
                    4,
                    &[("b0", STALE, true, 4)],
                )
            },
            Case {
                witness: Witness::Answer {
                    owner: "b0".into(),
                    epoch: 4,
                },
                want: (false, 4, None, Some(5)),
                ..case(
                    "pair, the hub says the active renewed: keep waiting",
                    2,
                    "b1",
                    false,
                    4,
                    &[("b0", STALE, true, 4)],
                )
            },
            Case {
                witness: Witness::Answer {
                    owner: "b1".into(),
                    epoch: 5,
                },
                want: (false, 4, Some("stood down"), None),
                ..case(
                    "pair, active cut off, the hub gave the other box a newer epoch",
                    2,
                    "b0",
                    true,
                    4,
                    &[("b1", STALE, false, 4)],
                )
            },
            Case {
                want: (true, 4, None, Some(4)),
                ..case(
                    "pair, active cut off, hub unreachable: keeps it and claims",
                    2,
                    "b0",
                    true,
                    4,
                    &[("b1", STALE, false, 4)],
                )
            },
            Case {
                want: (true, 1, Some("took over"), None),
                ..case("a site of one box", 1, "b0", false, 0, &[])
            },
            Case {
                want: (true, 4, None, Some(4)),
                ..case(
                    "pair, peer quiet for half the deadline: the active renews its lease early",
                    2,
                    "b0",
                    true,
                    4,
                    &[("b1", NOW - DEADLINE_MS / 2 - 1, false, 4)],
                )
            },
            Case {
                witness: Witness::Answer {
                    owner: "b0".into(),
                    epoch: 4,
                },
                want: (false, 5, Some("stood down"), None),
                ..case(
                    "pair, a box that took over while the hub did not answer yields to the holder the hub hears",
                    2,
                    "b1",
                    true,
                    5,
                    &[("b0", STALE, false, 4)],
                )
            },
            Case {
                since: NOW - 100,
                want: (true, 2, None, None),
                ..case(
                    "resumed active (agent restart) keeps its copy while it listens, though it hears nobody yet",
                    3,
                    "b0",
                    true,
                    2,
                    &[],
                )
            },
            Case {
                since: NOW - 100,
                want: (false, 2, Some("stood down"), None),
                ..case(
                    "resumed active hears a newer owner during the grace: stands down",
                    3,
                    "b0",
                    true,
                    2,
                    &[("b1", FRESH, true, 3)],
                )
            },
            Case {
                since: NOW - DEADLINE_MS - 1,
                want: (false, 2, Some("stood down"), None),
                ..case(
                    "resumed active still alone after the grace: a minority, stands down",
                    3,
                    "b0",
                    true,
                    2,
                    &[],
                )
            },
            Case {
                policy: SAFE,
                want: (true, 1, Some("took over"), None),
                ..case(
                    "pair that sees each other, nobody active: the better rank starts it, any policy",
                    2,
                    "b0",
                    false,
                    0,
                    &[("b1", FRESH, false, 0)],
                )
            },
            Case {
                policy: SAFE,
                want: (false, 0, None, None),
                ..case(
                    "pair that sees each other: the worse rank leaves it",
                    2,
                    "b1",
                    false,
                    0,
                    &[("b0", FRESH, false, 0)],
                )
            },
            Case {
                want: (false, 0, None, None),
                ..case(
                    "an active peer with an older epoch still blocks a standby",
                    3,
                    "b2",
                    false,
                    0,
                    &[("b0", FRESH, true, 1), ("b1", FRESH, false, 1)],
                )
            },
            Case {
                known: 7,
                want: (true, 8, Some("took over"), None),
                ..case(
                    "the new epoch is above every epoch seen",
                    3,
                    "b0",
                    false,
                    1,
                    &[("b1", FRESH, false, 2), ("b2", STALE, true, 7)],
                )
            },
        ];
        for c in &cases {
            check(c);
        }
    }

    #[test]
    fn partition_heals_to_exactly_one_copy() {
        // Two boxes, hub unreachable, preferAvailability: both end up active at some point;
        // once they hear each other again, exactly one keeps it, on both sides' view.
        let m = members(2);
        let w = Witness::Unreachable;
        let run = |me: &str, active, epoch, peer: (&str, bool, u64)| {
            let peers: BTreeMap<String, PeerState> = [(
                peer.0.to_string(),
                PeerState {
                    heard_at: 1_000,
                    active: peer.1,
                    epoch: peer.2,
                },
            )]
            .into();
            decide(
                &View {
                    me,
                    members: &m,
                    policy: AV,
                    active,
                    epoch,
                    known_epoch: epoch,
                    peers: &peers,
                    since: 0,
                    grace_ms: DEADLINE_MS,
                    witness: &w,
                    deadline_ms: DEADLINE_MS,
                },
                1_050,
            )
        };
        for (e0, e1) in [(1, 2), (2, 1), (3, 3)] {
            let a = run("b0", true, e0, ("b1", true, e1));
            let b = run("b1", true, e1, ("b0", true, e0));
            assert_eq!(a.active as u8 + b.active as u8, 1, "epochs {e0}/{e1}: {a:?} {b:?}");
        }
    }

    #[test]
    fn witness_leases() {
        let l = |owner: &str, epoch, at| Lease {
            owner: owner.into(),
            epoch,
            renewed_at: at,
        };
        // (current, node, epoch, now) -> (owner, epoch)
        type Row = (Option<Lease>, &'static str, u64, UnixMs, (&'static str, u64));
        let cases: Vec<Row> = vec![
            (None, "b1", 2, 0, ("b1", 2)),
            (Some(l("b0", 1, 0)), "b1", 2, 1_000, ("b1", 2)),
            (Some(l("b0", 1, 900)), "b1", 2, 1_000, ("b0", 1)),
            (Some(l("b0", 1, 0)), "b1", 1, 1_000, ("b0", 1)),
            (Some(l("b0", 1, 0)), "b0", 1, 1_000, ("b0", 1)),
            (Some(l("b1", 5, 0)), "b0", 3, 1_000, ("b1", 5)),
            (Some(l("b0", 1, 1_000 - LEASE_MS)), "b1", 2, 1_000, ("b0", 1)),
            (Some(l("b0", 1, 1_000 - LEASE_MS - 1)), "b1", 2, 1_000, ("b1", 2)),
        ];
        for (cur, node, epoch, now, want) in cases {
            let got = witness(cur.as_ref(), node, epoch, now, LEASE_MS);
            assert_eq!((got.owner.as_str(), got.epoch), want, "{cur:?} {node} {epoch} {now}");
        }
        // A renewal moves the lease forward.
        assert_eq!(witness(Some(&l("b0", 1, 0)), "b0", 1, 500, LEASE_MS).renewed_at, 500);
    }

    fn node(name: &str, site: Option<&str>, ip: Option<&str>, online: bool) -> NodeView {
        let mut labels = outpost_api::Labels::new();
        if let Some(s) = site {
            labels.insert("site".into(), s.into());
        }
        if let Some(ip) = ip {
            labels.insert(outpost_api::site::SITE_IP_LABEL.into(), ip.into());
        }
        NodeView {
            name: name.into(),
            labels,
            online,
        }
    }

    #[test]
    fn placement_on_one_site() {
        let id = ObjectId {
            kind: Kind::Deployment,
            namespace: "default".into(),
            name: "scada".into(),
        };
        let nodes = vec![
            node("a1", Some("a"), Some("10.0.0.1"), true),
            node("a2", Some("a"), Some("10.0.0.2"), true),
            node("b1", Some("b"), Some("10.0.1.1"), true),
            node("b2", Some("b"), Some("10.0.1.2"), true),
            node("b3", Some("b"), None, true),
            node("x", None, Some("10.0.9.9"), true),
        ];
        let all = |_: &NodeView| true;
        let names = |d: &PlacementDecision| d.nodes.iter().cloned().collect::<Vec<_>>();
        // The site with the most boxes online; one active + one standby.
        let (d, m) = place(&id, 1, &nodes, all, &BTreeSet::new());
        assert_eq!(d.nodes.len(), 2);
        assert!(d.nodes.iter().all(|n| n.starts_with('b')), "{d:?}");
        assert_eq!(m.iter().map(|m| m.rank).collect::<Vec<_>>(), vec![0, 1]);
        // Two standbys: the whole site b; b3 has no address, which the note says.
        let (d, m) = place(&id, 2, &nodes, all, &BTreeSet::new());
        assert_eq!(names(&d), vec!["b1", "b2", "b3"]);
        assert!(d.note.as_deref().unwrap().contains("b3 cannot be reached"), "{d:?}");
        assert_eq!(
            m.iter().find(|m| m.node == "b1").unwrap().address.as_deref(),
            Some("10.0.1.1:7946")
        );
        // Stable: the current site and boxes are kept even when another site has more.
        let cur: BTreeSet<String> = ["a1".to_string(), "a2".to_string()].into();
        let (d, _) = place(&id, 1, &nodes, all, &cur);
        assert_eq!(names(&d), vec!["a1", "a2"]);
        // An offline current box is kept (its standby takes over on the site); ranks stay.
        let mut off = nodes.clone();
        off[0].online = false;
        let (d2, m2) = place(&id, 1, &off, all, &cur);
        assert_eq!(names(&d2), vec!["a1", "a2"]);
        let (_, m1) = place(&id, 1, &nodes, all, &cur);
        assert_eq!(m1, m2);
        // Too few boxes: a note; nodes without a site label are never used.
        let (d, _) = place(&id, 3, &nodes[..2], all, &BTreeSet::new());
        assert_eq!(names(&d), vec!["a1", "a2"]);
        assert!(d.note.as_deref().unwrap().starts_with("2 of 4 boxes placed"), "{d:?}");
        let (d, m) = place(&id, 1, &nodes[5..], all, &BTreeSet::new());
        assert!(d.nodes.is_empty() && m.is_empty());
        assert!(d.note.unwrap().contains("no matching node has a site label"));
        // The workload's own selector still applies.
        let (d, _) = place(&id, 1, &nodes, |n: &NodeView| n.name != "b1", &BTreeSet::new());
        assert!(!d.nodes.contains("b1"), "{d:?}");
    }
}
