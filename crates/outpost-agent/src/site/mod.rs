//! The site peer link (docs/site-ha.md): boxes of one site tell each other, every
//! [`HEARTBEAT_MS`], which failover workloads they run, and each box decides with
//! `outpost_core::site_ha::decide` whether it runs each copy. The reconciler reads the result
//! ([`Roles`]) and starts or stops the copy.
//!
//! Transport: TLS 1.3 over TCP with both sides' node certificates (same CA; `outpost_pki`'s
//! peer configs). Each box dials every peer and writes one JSON line per heartbeat on that
//! connection; it reads its peers' heartbeats on the connections they dialled. Why TCP and not
//! UDP with an HMAC: the node certificates already give both sides an identity with no new key
//! to distribute, and on a LAN a heartbeat line reaches the peer in well under a millisecond.
//! TCP's retransmission timers never decide anything here: a peer is dead when nothing arrived
//! for [`outpost_core::site_ha::DEADLINE_MS`], whatever the socket says, so the failover budget (500 ms) is the
//! deadline (250 ms) plus starting the process.
//!
//! A pair that lost itself asks the hub witness (`POST /v1/nodes/{node}/witness` over the
//! agent's own hub link, at most [`WITNESS_TIMEOUT`]); past that the policy decides.
//!
//! Durability: this box's claims (role, epoch, newest epoch seen, whether its `SiteFailover`
//! alert fires) are written to the store's `meta` table (`site_claims`) whenever they change,
//! before the next heartbeat tells the peers. After a `kill -9` of the agent the claims are the
//! last ones peers heard; an active claim is resumed only if the copy still runs
//! ([`running_copies`]), so a power cut never brings back a dead copy as active.
//!
//! Owns: the listener (only on the address this box published for the site network, the one
//! inbound port of an edge box), the dialers, what peers last said, this box's claims, the
//! witness questions. Must never: decide anything itself (the core does), or accept a
//! heartbeat whose sender is not the node named in its TLS certificate.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_api::site::{SiteMember, WitnessAnswer, WitnessClaim};
use outpost_api::{now_ms, UnixMs};
use outpost_core::site_ha::{decide, Change, PeerState, View, Witness, HEARTBEAT_MS, STARTUP_GRACE_MS};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::store::{Desired, Store};
use crate::sync::HubClient;

pub mod vip;

/// Per failover workload on this box: `active` or `standby`.
pub type Roles = Arc<BTreeMap<String, String>>;

pub const ACTIVE: &str = "active";
pub const STANDBY: &str = "standby";
/// Node event reasons (docs/site-ha.md).
pub const EVENT_TAKEOVER: &str = "SiteTakeover";
pub const EVENT_STAND_DOWN: &str = "SiteStandDown";
/// A heartbeat line longer than this ends the connection.
const MAX_LINE: usize = 64 * 1024;

/// One heartbeat: the sender and, per failover workload it holds, its claim.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Heartbeat {
    node: String,
    #[serde(default)]
    workloads: BTreeMap<String, Claim>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Claim {
    active: bool,
    epoch: u64,
}

/// What each peer said last, and when (this box's clock).
type Heard = Arc<Mutex<BTreeMap<String, (UnixMs, Heartbeat)>>>;

/// The `meta` key under which this box's claims survive an agent restart.
const CLAIMS_META: &str = "site_claims";

/// One workload's claim as persisted (docs/site-ha.md, "Roles across an agent restart").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Saved {
    active: bool,
    epoch: u64,
    known: u64,
    /// The `SiteFailover` alert is firing here for this workload.
    #[serde(default)]
    alert: bool,
}

fn load_claims(store: &Store) -> BTreeMap<String, Saved> {
    match store.meta(CLAIMS_META) {
        Ok(Some(json)) => serde_json::from_str(&json).unwrap_or_else(|e| {
            warn!(error = %e, "site claims unreadable; every failover workload starts as standby");
            BTreeMap::new()
        }),
        Ok(None) => BTreeMap::new(),
        Err(e) => {
            warn!(error = %e, "cannot read the site claims; every failover workload starts as standby");
            BTreeMap::new()
        }
    }
}

/// The roles to start from: a persisted active claim whose copy still runs (`owned`, the
/// processes the agent adopts) is active, every other failover workload standby. So a
/// restarted agent keeps running the copy it ran (the peer link confirms or ends it), and a box
/// back from a power cut starts as standby. A Docker copy is not found this way and starts as
/// standby (docs/site-ha.md, "What is left").
pub fn running_copies(store: &Store, owned: &[crate::runtime::Owned]) -> Roles {
    Arc::new(
        load_claims(store)
            .into_iter()
            .map(|(k, s)| {
                let runs = owned
                    .iter()
                    .any(|o| o.unit.strip_prefix(k.as_str()).is_some_and(|r| r.starts_with('/')));
                (k, if s.active && runs { ACTIVE } else { STANDBY }.to_string())
            })
            .collect(),
    )
}

/// This box's state for one workload.
#[derive(Clone, Copy, Debug, Default)]
struct Own {
    active: bool,
    epoch: u64,
    known: u64,
    /// When this box first held the workload: it listens for the startup grace before it may
    /// take over.
    since: UnixMs,
    /// This box took the copy over from a failed or silent box and fired `SiteFailover`; it
    /// resolves once every box holding the workload is heard again, or this box stands down.
    alert: bool,
}

/// The node alert a takeover fires (docs/site-ha.md, "Visible everywhere").
pub const ALERT_FAILOVER: &str = "SiteFailover";

/// How long a box waits for the hub witness's answer: a takeover must not wait for a dead
/// hub; past this the hub counts as unreachable and the policy decides.
pub const WITNESS_TIMEOUT: Duration = Duration::from_millis(150);
/// How often a box repeats its claim while its pair's peer stays silent (the lease is
/// [`outpost_core::site_ha::LEASE_MS`]).
const WITNESS_EVERY: Duration = Duration::from_millis(100);

/// The witness's last answer for one workload, for the silence in progress.
#[derive(Clone, Debug)]
struct Asked {
    answer: Witness,
    epoch: u64,
    at: std::time::Instant,
    in_flight: bool,
}

type Answers = Arc<Mutex<BTreeMap<String, Asked>>>;

/// Ask the hub witness for `workload` at `epoch` and record the answer (or
/// [`Witness::Unreachable`] when it does not come within [`WITNESS_TIMEOUT`]).
async fn ask_witness(client: Arc<HubClient>, workload: String, epoch: u64, answers: Answers, wake: Arc<Notify>) {
    let claim = WitnessClaim {
        workload: workload.clone(),
        epoch,
    };
    let r = tokio::time::timeout(WITNESS_TIMEOUT, client.post_json::<_, WitnessAnswer>("witness", &claim)).await;
    let answer = match r {
        Ok(Ok(a)) => Witness::Answer {
            owner: a.owner,
            epoch: a.epoch,
        },
        Ok(Err(e)) if e.code().is_some() => {
            warn!(workload = %workload, error = %e, "site witness: the hub refused the claim; the policy decides");
            Witness::Unreachable
        }
        Ok(Err(e)) => {
            debug!(workload = %workload, error = %e, "site witness: hub unreachable; the policy decides");
            Witness::Unreachable
        }
        Err(_) => Witness::Unreachable,
    };
    if let Some(a) = answers.lock().expect("answers lock").get_mut(&workload) {
        a.answer = answer;
        a.in_flight = false;
    }
    wake.notify_one();
}

pub struct SiteLink {
    pub node: String,
    /// The link to the hub, whose witness route decides for a pair that lost itself.
    pub client: Option<Arc<HubClient>>,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub store: Arc<Store>,
    /// The failover copies found running at agent start ([`running_copies`]): only these
    /// resume as active from a persisted claim.
    pub running: Roles,
    /// Peers silent longer than this are dead (default [`outpost_core::site_ha::DEADLINE_MS`];
    /// `OUTPOST_SITE_DEADLINE_MS` overrides it).
    pub deadline_ms: i64,
}

/// The members and this box's listen address of every failover workload in `desired`.
fn failover_members(desired: &Desired, me: &str) -> BTreeMap<String, Vec<SiteMember>> {
    desired
        .workloads
        .iter()
        .filter_map(|(k, w)| w.failover.as_ref().map(|f| (k.clone(), f.members.clone())))
        .filter(|(_, m)| m.iter().any(|m| m.node == me))
        .collect()
}

impl SiteLink {
    /// Run until `stop`: keep the listener and dialers in step with the desired state, decide
    /// every half heartbeat, publish the roles.
    pub async fn run(
        self,
        mut desired_rx: watch::Receiver<Arc<Desired>>,
        roles_tx: watch::Sender<Roles>,
        mut stop: watch::Receiver<bool>,
    ) {
        let heard: Heard = Arc::new(Mutex::new(BTreeMap::new()));
        let (hb_tx, hb_rx) = watch::channel(Vec::<u8>::new());
        let server = match outpost_pki::peer_server_config(&self.ca_pem, &self.cert_pem, &self.key_pem) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                warn!(error = %e, "site peer link: cannot build its TLS configuration; failover workloads stay standby");
                return;
            }
        };
        let client = match outpost_pki::peer_client_config(&self.ca_pem, &self.cert_pem, &self.key_pem) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                warn!(error = %e, "site peer link: cannot build its TLS configuration; failover workloads stay standby");
                return;
            }
        };
        let mut listener: Option<(String, JoinHandle<()>)> = None;
        let mut dialers: BTreeMap<String, (String, JoinHandle<()>)> = BTreeMap::new();
        // Claims persisted by the last agent: resume them (with the startup grace, so a newer
        // owner heard meanwhile still wins; `site_ha::decide`, rule 5).
        // Only a copy that still runs is resumed (an agent restart); after a power cut or a
        // reboot the box starts as standby, keeping the epochs it knew.
        let mut saved = load_claims(&self.store);
        let started = now_ms();
        let runs = |k: &str| self.running.get(k).map(String::as_str) == Some(ACTIVE);
        let mut own: BTreeMap<String, Own> = saved
            .iter()
            .map(|(k, s)| {
                (
                    k.clone(),
                    Own {
                        active: s.active && runs(k),
                        epoch: s.epoch,
                        known: s.known,
                        since: started,
                        alert: s.alert,
                    },
                )
            })
            .collect();
        let resumed: std::collections::BTreeSet<String> =
            own.iter().filter(|(_, s)| s.active).map(|(k, _)| k.clone()).collect();
        if !resumed.is_empty() {
            info!(workloads = ?resumed, "site peer link: resuming as active from the persisted claims");
        }
        let mut seen: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        let answers: Answers = Arc::new(Mutex::new(BTreeMap::new()));
        let wake = Arc::new(Notify::new());
        let mut tick = tokio::time::interval(Duration::from_millis((HEARTBEAT_MS / 2) as u64));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = wake.notified() => {}
                r = desired_rx.changed() => if r.is_err() { break },
                _ = stop.changed() => break,
            }
            let desired = desired_rx.borrow().clone();
            let workloads = failover_members(&desired, &self.node);
            // Listen on this box's own site address; dial every peer that has one.
            let mine = workloads
                .values()
                .flatten()
                .find(|m| m.node == self.node)
                .and_then(|m| m.address.clone());
            if listener.as_ref().map(|(a, _)| a) != mine.as_ref() {
                if let Some((_, h)) = listener.take() {
                    h.abort();
                }
                if let Some(addr) = mine {
                    let h = tokio::spawn(listen(addr.clone(), server.clone(), heard.clone()));
                    listener = Some((addr, h));
                }
            }
            let mut peers: BTreeMap<String, String> = BTreeMap::new();
            for m in workloads.values().flatten().filter(|m| m.node != self.node) {
                if let Some(a) = &m.address {
                    peers.insert(m.node.clone(), a.clone());
                }
            }
            dialers.retain(|node, (addr, h)| {
                let keep = peers.get(node) == Some(addr);
                if !keep {
                    h.abort();
                }
                keep
            });
            for (node, addr) in &peers {
                if !dialers.contains_key(node) {
                    let h = tokio::spawn(dial(node.clone(), addr.clone(), client.clone(), hb_rx.clone()));
                    dialers.insert(node.clone(), (addr.clone(), h));
                }
            }
            // Decide each workload.
            let now = now_ms();
            let snapshot = heard.lock().expect("heard lock").clone();
            own.retain(|k, _| workloads.contains_key(k));
            answers
                .lock()
                .expect("answers lock")
                .retain(|k, _| workloads.contains_key(k));
            for (key, members) in &workloads {
                let spec = &desired.workloads[key];
                let Some(fo) = spec.failover.as_ref() else { continue };
                let peer_states: BTreeMap<String, PeerState> = members
                    .iter()
                    .filter(|m| m.node != self.node)
                    .filter_map(|m| {
                        let (at, hb) = snapshot.get(&m.node)?;
                        let c = hb.workloads.get(key).copied().unwrap_or_default();
                        Some((
                            m.node.clone(),
                            PeerState {
                                heard_at: *at,
                                active: c.active,
                                epoch: c.epoch,
                            },
                        ))
                    })
                    .collect();
                let vip = fo.options.vip.as_deref().zip(fo.options.interface.as_deref());
                if seen.insert(key.clone()) {
                    if let Some((addr, iface)) = vip {
                        if resumed.contains(key) {
                            // Resumed as active: the address is still ours; announce it again.
                            if let Err(e) = vip::take(addr, iface) {
                                warn!(workload = %key, error = %e, "cannot take the virtual IP");
                            }
                        } else {
                            // A box starts as standby: an address left from before is not ours.
                            vip::release(addr, iface);
                        }
                    }
                }
                let st = own.entry(key.clone()).or_insert_with(|| Own {
                    since: now,
                    ..Own::default()
                });
                let witness = match answers.lock().expect("answers lock").get(key) {
                    Some(a) if self.client.is_some() => a.answer.clone(),
                    _ if self.client.is_some() => Witness::Pending,
                    _ => Witness::Unreachable,
                };
                let o = decide(
                    &View {
                        me: &self.node,
                        members,
                        policy: fo.options.policy,
                        active: st.active,
                        epoch: st.epoch,
                        known_epoch: st.known,
                        peers: &peer_states,
                        since: st.since,
                        grace_ms: STARTUP_GRACE_MS.max(self.deadline_ms),
                        witness: &witness,
                        deadline_ms: self.deadline_ms,
                    },
                    now,
                );
                let whole = members.iter().filter(|m| m.node != self.node).all(|m| {
                    peer_states
                        .get(&m.node)
                        .is_some_and(|p| now - p.heard_at <= self.deadline_ms)
                });
                let mut alert = st.alert;
                match &o.change {
                    // Epoch 1 is the first start of the workload on the site, not a failover.
                    Some(Change::TookOver { reason }) if o.epoch > 1 && !alert => {
                        alert = true;
                        let msg = format!(
                            "{ALERT_FAILOVER}: this box took over {key} at epoch {} ({reason}); resolves when every box holding it is heard again",
                            o.epoch
                        );
                        if let Err(e) = self.store.push_event(now, Some(key), outpost_api::ALERT_FIRING, &msg) {
                            warn!(error = %e, "cannot record the site failover alert");
                        }
                    }
                    Some(Change::StoodDown { .. }) if alert => alert = false,
                    _ if alert && whole => alert = false,
                    _ => {}
                }
                if st.alert && !alert {
                    let msg =
                        format!("{ALERT_FAILOVER}: every box holding {key} is heard again or this box stood down");
                    if let Err(e) = self.store.push_event(now, Some(key), outpost_api::ALERT_RESOLVED, &msg) {
                        warn!(error = %e, "cannot record the site failover alert");
                    }
                }
                *st = Own {
                    active: o.active,
                    epoch: o.epoch,
                    known: o.known_epoch,
                    since: st.since,
                    alert,
                };
                // The hub witness: ask while the pair's peer is silent, again every
                // WITNESS_EVERY (a holder's renewal keeps its lease); forget the answers when
                // the peer is heard again, so the next silence starts from a fresh question.
                match (o.claim, self.client.as_ref()) {
                    (Some(epoch), Some(client)) => {
                        let mut all = answers.lock().expect("answers lock");
                        let a = all.entry(key.clone()).or_insert_with(|| Asked {
                            answer: Witness::Pending,
                            epoch,
                            at: std::time::Instant::now(),
                            in_flight: false,
                        });
                        let due = a.at.elapsed() >= WITNESS_EVERY || a.epoch != epoch || a.answer == Witness::Pending;
                        if !a.in_flight && due {
                            a.in_flight = true;
                            a.epoch = epoch;
                            a.at = std::time::Instant::now();
                            tokio::spawn(ask_witness(
                                client.clone(),
                                key.clone(),
                                epoch,
                                answers.clone(),
                                wake.clone(),
                            ));
                        }
                    }
                    _ => {
                        answers.lock().expect("answers lock").remove(key);
                    }
                }
                if let Some(change) = o.change {
                    let (reason, message) = match change {
                        Change::TookOver { reason } => (
                            EVENT_TAKEOVER,
                            format!("this box took over {key} at epoch {}: {reason}", o.epoch),
                        ),
                        Change::StoodDown { reason } => (
                            EVENT_STAND_DOWN,
                            format!("this box stopped its copy of {key}: {reason}"),
                        ),
                    };
                    info!(workload = %key, epoch = o.epoch, %reason, "{message}");
                    if let Some((addr, iface)) = vip {
                        if o.active {
                            if let Err(e) = vip::take(addr, iface) {
                                warn!(workload = %key, error = %e, "cannot take the virtual IP");
                                let _ = self.store.push_event(
                                    now,
                                    Some(key),
                                    "SiteVipFailed",
                                    &format!("this box runs {key} but could not take its virtual IP {addr}: {e}"),
                                );
                            }
                        } else {
                            vip::release(addr, iface);
                        }
                    }
                    if let Err(e) = self.store.push_event(now, Some(key), reason, &message) {
                        warn!(error = %e, "cannot record the site event");
                    }
                }
            }
            // Persist the claims when they change, before peers hear of them.
            let now_saved: BTreeMap<String, Saved> = own
                .iter()
                .map(|(k, s)| {
                    (
                        k.clone(),
                        Saved {
                            active: s.active,
                            epoch: s.epoch,
                            known: s.known,
                            alert: s.alert,
                        },
                    )
                })
                .collect();
            if now_saved != saved {
                match serde_json::to_string(&now_saved).map(|j| self.store.set_meta(CLAIMS_META, &j)) {
                    Ok(Ok(())) => saved = now_saved,
                    Ok(Err(e)) => warn!(error = %e, "cannot persist the site claims; retrying"),
                    Err(e) => warn!(error = %e, "cannot encode the site claims"),
                }
            }
            let hb = Heartbeat {
                node: self.node.clone(),
                workloads: own
                    .iter()
                    .map(|(k, s)| {
                        (
                            k.clone(),
                            Claim {
                                active: s.active,
                                epoch: s.epoch,
                            },
                        )
                    })
                    .collect(),
            };
            let mut line = serde_json::to_vec(&hb).expect("serializable");
            line.push(b'\n');
            hb_tx.send_if_modified(|cur| {
                if *cur != line {
                    *cur = line;
                    true
                } else {
                    false
                }
            });
            let roles: BTreeMap<String, String> = own
                .iter()
                .map(|(k, s)| (k.clone(), if s.active { ACTIVE } else { STANDBY }.to_string()))
                .collect();
            roles_tx.send_if_modified(|cur| {
                if **cur != roles {
                    *cur = Arc::new(roles);
                    true
                } else {
                    false
                }
            });
        }
        if let Some((_, h)) = listener {
            h.abort();
        }
        for (_, (_, h)) in dialers {
            h.abort();
        }
    }
}

/// Accept peers' connections on `addr` and record their heartbeats. Retries the bind (the
/// address may not be up yet).
async fn listen(addr: String, cfg: Arc<rustls::ServerConfig>, heard: Heard) {
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let sock: SocketAddr = match addr.parse() {
        Ok(a) => a,
        Err(_) => {
            warn!(%addr, "site peer link: not an ip:port; peers cannot reach this box");
            return;
        }
    };
    let l = loop {
        match TcpListener::bind(sock).await {
            Ok(l) => break l,
            Err(e) => {
                warn!(%addr, error = %e, "site peer link: cannot listen yet; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    info!(%addr, "site peer link listening (site network only)");
    loop {
        let Ok((tcp, from)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let heard = heard.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(Duration::from_secs(2), acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    warn!(%from, error = %e, "site peer link: refused a connection");
                    return;
                }
                Err(_) => return,
            };
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| outpost_pki::node_of_der(c));
            let Some(peer) = peer else { return };
            let mut r = BufReader::new(tls);
            let mut line = Vec::new();
            loop {
                line.clear();
                let n = match (&mut r).take(MAX_LINE as u64).read_until(b'\n', &mut line).await {
                    Ok(n) => n,
                    Err(_) => return,
                };
                if n == 0 || !line.ends_with(b"\n") {
                    return;
                }
                match serde_json::from_slice::<Heartbeat>(&line) {
                    Ok(hb) if hb.node == peer => {
                        heard.lock().expect("heard lock").insert(peer.clone(), (now_ms(), hb));
                    }
                    Ok(hb) => {
                        warn!(%peer, claimed = %hb.node, "site peer link: a heartbeat names another node; connection closed");
                        return;
                    }
                    Err(_) => return,
                }
            }
        });
    }
}

/// Keep a connection to `node` at `addr` and write the current heartbeat every
/// [`HEARTBEAT_MS`]; reconnect after a failure.
async fn dial(node: String, addr: String, cfg: Arc<rustls::ClientConfig>, hb: watch::Receiver<Vec<u8>>) {
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let Ok(name) = rustls_pki_types::ServerName::try_from(node.clone()) else {
        warn!(%node, "site peer link: the node name is not usable as a TLS name");
        return;
    };
    loop {
        let conn = async {
            let tcp = TcpStream::connect(&addr).await?;
            tcp.set_nodelay(true)?;
            connector.connect(name.clone(), tcp).await
        };
        let mut tls = match tokio::time::timeout(Duration::from_millis(500), conn).await {
            Ok(Ok(t)) => t,
            _ => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut every = tokio::time::interval(Duration::from_millis(HEARTBEAT_MS as u64));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let line = hb.borrow().clone();
            if line.is_empty() {
                continue;
            }
            let write = async {
                tls.write_all(&line).await?;
                tls.flush().await
            };
            match tokio::time::timeout(Duration::from_millis(HEARTBEAT_MS as u64 * 4), write).await {
                Ok(Ok(())) => {}
                _ => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
