//! The MQTT broker inside the agent (MQTT 3.1.1 and 5; packet codecs from `rumqttc`), and the
//! client that subscribes to a site's own broker instead.
//!
//! What it does: CONNECT with optional username/password, PUBLISH at QoS 0 and 1, SUBSCRIBE /
//! UNSUBSCRIBE with `+` and `#` filters (delivery at min(publish, subscription) QoS), retained
//! messages, last will (published when a client goes away without DISCONNECT), keep-alive.
//! A PUBLISH whose topic matches a stream's `mqtt` filters goes into that stream; at QoS 1 its
//! PUBACK is sent only once the record is durable in the spool, so an acknowledged message
//! survives a `kill -9` of the agent (in-order PUBACKs, many in flight per connection).
//!
//! What it does not (say so to users): QoS 2 (a QoS 2 PUBLISH closes the connection; QoS 2
//! subscriptions are granted QoS 1), persistent sessions (`cleanSession=false` /
//! session expiry are treated as a clean session: subscriptions and undelivered QoS 1 messages
//! to subscribers do not outlive a connection or an agent restart), retained messages across an
//! agent restart, `$SYS` topics. Publishers lose nothing: their data is in the spool before the
//! PUBACK. Subscribers that need every message should use the pipeline's sinks instead.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::{self as m4, QoS as Q4};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::{Input, Rejected, Shared};

const MAX_PACKET: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    V4,
    V5,
}

/// A packet, whatever the version.
#[derive(Debug)]
enum In {
    Connect {
        client_id: String,
        keep_alive: u16,
        will: Option<Msg>,
        login: Option<(String, String)>,
    },
    Publish {
        msg: Msg,
        pkid: u16,
    },
    PubAck,
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect,
    Unsupported(&'static str),
}

#[derive(Clone, Debug)]
pub struct Msg {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
}

fn q4(q: Q4) -> u8 {
    q as u8
}
fn q5(q: Q5) -> u8 {
    q as u8
}
fn to_q4(q: u8) -> Q4 {
    if q >= 1 {
        Q4::AtLeastOnce
    } else {
        Q4::AtMostOnce
    }
}
fn to_q5(q: u8) -> Q5 {
    if q >= 1 {
        Q5::AtLeastOnce
    } else {
        Q5::AtMostOnce
    }
}

/// The protocol level of a CONNECT at the start of `buf`, once enough bytes are there.
fn peek_level(buf: &[u8]) -> Option<Result<u8, ()>> {
    let first = *buf.first()?;
    if first >> 4 != 1 {
        return Some(Err(()));
    }
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Some(Err(()));
        }
    }
    // The protocol name (2-byte length + "MQTT"), then the level.
    let name_len = u16::from_be_bytes([*buf.get(i)?, *buf.get(i + 1)?]) as usize;
    buf.get(i + 2 + name_len).map(|l| Ok(*l))
}

enum Decoded {
    Packet(In),
    NeedMore,
    Bad(String),
}

fn decode(v: Version, buf: &mut BytesMut) -> Decoded {
    match v {
        Version::V4 => match m4::Packet::read(buf, MAX_PACKET) {
            Ok(p) => Decoded::Packet(match p {
                m4::Packet::Connect(c) => In::Connect {
                    client_id: c.client_id,
                    keep_alive: c.keep_alive,
                    will: c.last_will.map(|w| Msg {
                        topic: w.topic,
                        payload: w.message,
                        qos: q4(w.qos),
                        retain: w.retain,
                    }),
                    login: c.login.map(|l| (l.username, l.password)),
                },
                m4::Packet::Publish(p) => In::Publish {
                    pkid: p.pkid,
                    msg: Msg {
                        topic: p.topic,
                        payload: p.payload,
                        qos: q4(p.qos),
                        retain: p.retain,
                    },
                },
                m4::Packet::PubAck(_) => In::PubAck,
                m4::Packet::Subscribe(s) => In::Subscribe {
                    pkid: s.pkid,
                    filters: s.filters.into_iter().map(|f| (f.path, q4(f.qos))).collect(),
                },
                m4::Packet::Unsubscribe(u) => In::Unsubscribe {
                    pkid: u.pkid,
                    filters: u.topics,
                },
                m4::Packet::PingReq => In::PingReq,
                m4::Packet::Disconnect => In::Disconnect,
                m4::Packet::PubRec(_) | m4::Packet::PubRel(_) | m4::Packet::PubComp(_) => In::Unsupported("QoS 2"),
                _ => In::Unsupported("a packet a client does not send"),
            }),
            Err(m4::Error::InsufficientBytes(_)) => Decoded::NeedMore,
            Err(e) => Decoded::Bad(format!("{e:?}")),
        },
        Version::V5 => match m5::Packet::read(buf, Some(MAX_PACKET as u32)) {
            Ok(p) => Decoded::Packet(match p {
                m5::Packet::Connect(c, will, login) => In::Connect {
                    client_id: c.client_id,
                    keep_alive: c.keep_alive,
                    will: will.map(|w| Msg {
                        topic: String::from_utf8_lossy(&w.topic).into_owned(),
                        payload: w.message,
                        qos: q5(w.qos),
                        retain: w.retain,
                    }),
                    login: login.map(|l| (l.username, l.password)),
                },
                m5::Packet::Publish(p) => In::Publish {
                    pkid: p.pkid,
                    msg: Msg {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload,
                        qos: q5(p.qos),
                        retain: p.retain,
                    },
                },
                m5::Packet::PubAck(_) => In::PubAck,
                m5::Packet::Subscribe(s) => In::Subscribe {
                    pkid: s.pkid,
                    filters: s.filters.into_iter().map(|f| (f.path, q5(f.qos))).collect(),
                },
                m5::Packet::Unsubscribe(u) => In::Unsubscribe {
                    pkid: u.pkid,
                    filters: u.filters,
                },
                m5::Packet::PingReq(_) => In::PingReq,
                m5::Packet::Disconnect(_) => In::Disconnect,
                m5::Packet::PubRec(_) | m5::Packet::PubRel(_) | m5::Packet::PubComp(_) => In::Unsupported("QoS 2"),
                _ => In::Unsupported("a packet a client does not send"),
            }),
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Decoded::NeedMore,
            Err(e) => Decoded::Bad(format!("{e:?}")),
        },
    }
}

/// Encoders for what the broker sends.
mod out {
    use super::*;

    pub fn connack(v: Version, ok: bool, buf: &mut BytesMut) {
        let _ = match v {
            Version::V4 => m4::ConnAck::new(
                if ok {
                    m4::ConnectReturnCode::Success
                } else {
                    m4::ConnectReturnCode::BadUserNamePassword
                },
                false,
            )
            .write(buf)
            .ok(),
            Version::V5 => m5::ConnAck {
                session_present: false,
                code: if ok {
                    m5::ConnectReturnCode::Success
                } else {
                    m5::ConnectReturnCode::BadUserNamePassword
                },
                properties: None,
            }
            .write(buf)
            .ok(),
        };
    }

    /// `quota`: the record was refused (spool full); only MQTT 5 can say so.
    pub fn puback(v: Version, pkid: u16, quota: bool, buf: &mut BytesMut) {
        let _ = match v {
            Version::V4 => m4::PubAck::new(pkid).write(buf).ok(),
            Version::V5 => m5::PubAck {
                pkid,
                reason: if quota {
                    m5::PubAckReason::QuotaExceeded
                } else {
                    m5::PubAckReason::Success
                },
                properties: None,
            }
            .write(buf)
            .ok(),
        };
    }

    pub fn suback(v: Version, pkid: u16, granted: &[Option<u8>], buf: &mut BytesMut) {
        let _ = match v {
            Version::V4 => m4::SubAck::new(
                pkid,
                granted
                    .iter()
                    .map(|g| match g {
                        Some(q) => m4::SubscribeReasonCode::Success(to_q4(*q)),
                        None => m4::SubscribeReasonCode::Failure,
                    })
                    .collect(),
            )
            .write(buf)
            .ok(),
            Version::V5 => m5::SubAck {
                pkid,
                return_codes: granted
                    .iter()
                    .map(|g| match g {
                        Some(q) => m5::SubscribeReasonCode::Success(to_q5(*q)),
                        None => m5::SubscribeReasonCode::TopicFilterInvalid,
                    })
                    .collect(),
                properties: None,
            }
            .write(buf)
            .ok(),
        };
    }

    pub fn unsuback(v: Version, pkid: u16, n: usize, buf: &mut BytesMut) {
        let _ = match v {
            Version::V4 => m4::UnsubAck::new(pkid).write(buf).ok(),
            Version::V5 => m5::UnsubAck {
                pkid,
                reasons: vec![m5::UnsubAckReason::Success; n],
                properties: None,
            }
            .write(buf)
            .ok(),
        };
    }

    pub fn pingresp(v: Version, buf: &mut BytesMut) {
        let _ = match v {
            Version::V4 => m4::PingResp.write(buf).ok(),
            Version::V5 => m5::PingResp::write(buf).ok(),
        };
    }

    pub fn publish(v: Version, m: &Msg, qos: u8, pkid: u16, retain: bool, buf: &mut BytesMut) {
        let _ = match v {
            Version::V4 => {
                let mut p = m4::Publish::from_bytes(m.topic.clone(), to_q4(qos), m.payload.clone());
                p.pkid = pkid;
                p.retain = retain;
                p.write(buf).ok()
            }
            Version::V5 => {
                let mut p = m5::Publish::new(m.topic.clone(), to_q5(qos), m.payload.clone(), None);
                p.pkid = pkid;
                p.retain = retain;
                p.write(buf).ok()
            }
        };
    }

    pub fn disconnect_qos(v: Version, buf: &mut BytesMut) {
        if v == Version::V5 {
            let _ = m5::Disconnect::new(m5::DisconnectReasonCode::QoSNotSupported).write(buf);
        }
    }
}

/// Something to write to a client: an in-order PUBACK (waits for the spool), or a message.
enum Outgoing {
    /// Sent once every matching stream has the record on disk.
    Ack {
        pkid: u16,
        wait: Vec<oneshot::Receiver<Result<(), Rejected>>>,
    },
    Bytes(BytesMut),
    Deliver(Msg, u8, bool),
    Close,
}

struct Sub {
    conn: u64,
    filter: String,
    qos: u8,
    tx: mpsc::Sender<Outgoing>,
}

/// Broker state shared by connections.
#[derive(Default)]
struct Core {
    subs: RwLock<Vec<Sub>>,
    retained: Mutex<BTreeMap<String, Msg>>,
    next_conn: AtomicU64,
    /// Messages received (all topics) and taken into streams.
    received: AtomicU64,
}

impl Core {
    fn route(&self, m: &Msg, from: u64) {
        let subs = self.subs.read().unwrap_or_else(|p| p.into_inner());
        for s in subs
            .iter()
            .filter(|s| outpost_api::pipeline::topic_matches(&s.filter, &m.topic))
        {
            let _ = from;
            // A slow subscriber loses QoS 0 messages rather than slowing publishers down.
            let _ = s.tx.try_send(Outgoing::Deliver(m.clone(), m.qos.min(s.qos), false));
        }
    }

    fn retain(&self, m: &Msg) {
        let mut r = self.retained.lock().unwrap_or_else(|p| p.into_inner());
        if m.payload.is_empty() {
            r.remove(&m.topic);
        } else {
            r.insert(m.topic.clone(), m.clone());
        }
    }
}

pub struct Broker {
    listener: TcpListener,
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    core: Arc<Core>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Broker {
    pub async fn bind(
        addr: SocketAddr,
        shared: Arc<Shared>,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::io::Result<Broker> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        Ok(Broker {
            listener,
            addr,
            shared,
            core: Arc::new(Core::default()),
            tls,
        })
    }

    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        loop {
            let (tcp, remote) = tokio::select! {
                a = self.listener.accept() => match a {
                    Ok(a) => a,
                    Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue }
                },
                _ = stop.changed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let (shared, core, tls) = (self.shared.clone(), self.core.clone(), self.tls.clone());
            tokio::spawn(async move {
                let r = match tls {
                    None => {
                        let (rd, wr) = tcp.into_split();
                        connection(rd, wr, shared, core).await
                    }
                    Some(acceptor) => match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => {
                            let (rd, wr) = tokio::io::split(s);
                            connection(rd, wr, shared, core).await
                        }
                        _ => Err("TLS handshake failed".into()),
                    },
                };
                if let Err(e) = r {
                    debug!(%remote, error = %e, "MQTT connection ended");
                }
            });
        }
    }
}

/// Turn a payload into a record: JSON as is, anything else as `{"payload": "<text>"}`.
pub fn record_of(payload: &[u8]) -> Value {
    match serde_json::from_slice::<Value>(payload) {
        Ok(v) => v,
        Err(_) => serde_json::json!({ "payload": String::from_utf8_lossy(payload) }),
    }
}

/// One client connection, on its read and write halves (plain TCP or TLS).
async fn connection<R, W>(mut rd: R, mut wr: W, shared: Arc<Shared>, core: Arc<Core>) -> Result<(), String>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut buf = BytesMut::with_capacity(64 << 10);
    // The CONNECT decides the version.
    let version = loop {
        if let Some(l) = peek_level(&buf) {
            match l {
                Ok(5) => break Version::V5,
                Ok(3 | 4) => break Version::V4,
                _ => return Err("not an MQTT CONNECT".into()),
            }
        }
        if tokio::time::timeout(Duration::from_secs(10), rd.read_buf(&mut buf))
            .await
            .map_err(|_| "no CONNECT within 10 s")?
            .map_err(|e| e.to_string())?
            == 0
        {
            return Err("closed before CONNECT".into());
        }
    };
    let (client_id, keep_alive, will) = loop {
        match decode(version, &mut buf) {
            Decoded::Packet(In::Connect {
                client_id,
                keep_alive,
                will,
                login,
            }) => {
                let ok = match &shared.opts.mqtt_login {
                    None => true,
                    Some((u, p)) => login.as_ref().is_some_and(|(lu, lp)| lu == u && lp == p),
                };
                let mut o = BytesMut::new();
                out::connack(version, ok, &mut o);
                wr.write_all(&o).await.map_err(|e| e.to_string())?;
                if !ok {
                    warn!(client = %client_id, "MQTT client refused: bad username or password");
                    return Err("bad username or password".into());
                }
                break (client_id, keep_alive, will);
            }
            Decoded::Packet(other) => return Err(format!("expected CONNECT, got {other:?}")),
            Decoded::Bad(e) => return Err(format!("bad CONNECT: {e}")),
            Decoded::NeedMore => {
                if rd.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
                    return Err("closed during CONNECT".into());
                }
            }
        }
    };
    let conn = core.next_conn.fetch_add(1, Ordering::Relaxed);
    debug!(client = %client_id, ?version, "MQTT client connected");
    let (tx, mut rx) = mpsc::channel::<Outgoing>(65_536);
    // Writer: PUBACKs in order (each waits for its record to be durable), deliveries.
    let writer = tokio::spawn(async move {
        let mut o = BytesMut::with_capacity(16 << 10);
        let mut next_pkid: u16 = 0;
        while let Some(first) = rx.recv().await {
            let mut item = Some(first);
            // Write everything ready in one go.
            while let Some(it) = item.take() {
                match it {
                    Outgoing::Ack { pkid, wait } => {
                        let mut quota = false;
                        for w in wait {
                            match w.await {
                                Ok(Ok(())) => {}
                                Ok(Err(Rejected::Full(_))) if version == Version::V5 => quota = true,
                                // A record the stream's model can never take: acknowledged and
                                // dropped (logged and refused), or the client would resend it forever.
                                Ok(Err(Rejected::Unpredictable(..))) => {}
                                // Not durable and no way to say so in 3.1.1: no PUBACK, close,
                                // and the client publishes again.
                                _ => return,
                            }
                        }
                        out::puback(version, pkid, quota, &mut o);
                    }
                    Outgoing::Bytes(b) => o.extend_from_slice(&b),
                    Outgoing::Deliver(m, qos, retain) => {
                        let pkid = if qos > 0 {
                            next_pkid = next_pkid.wrapping_add(1).max(1);
                            next_pkid
                        } else {
                            0
                        };
                        out::publish(version, &m, qos, pkid, retain, &mut o);
                    }
                    Outgoing::Close => {
                        let _ = wr.write_all(&o).await;
                        return;
                    }
                }
                if o.len() < 64 << 10 {
                    item = rx.try_recv().ok();
                }
            }
            if wr.write_all(&o).await.is_err() {
                return;
            }
            o.clear();
        }
    });
    let idle = if keep_alive == 0 {
        Duration::from_secs(24 * 3600)
    } else {
        Duration::from_millis(keep_alive as u64 * 1500)
    };
    let mut clean = false;
    let result: Result<(), String> = async {
        loop {
            let packet = match decode(version, &mut buf) {
                Decoded::Packet(p) => p,
                Decoded::Bad(e) => return Err(format!("malformed packet: {e}")),
                Decoded::NeedMore => {
                    let n = tokio::time::timeout(idle, rd.read_buf(&mut buf))
                        .await
                        .map_err(|_| "keep-alive expired".to_string())?
                        .map_err(|e| e.to_string())?;
                    if n == 0 {
                        return Err("connection closed without DISCONNECT".into());
                    }
                    continue;
                }
            };
            match packet {
                In::Publish { msg, pkid } => {
                    if msg.qos > 1 {
                        let mut o = BytesMut::new();
                        out::disconnect_qos(version, &mut o);
                        let _ = tx.send(Outgoing::Bytes(o)).await;
                        return Err("QoS 2 is not supported; publish at QoS 0 or 1".into());
                    }
                    on_publish(&shared, &core, conn, msg, pkid, &tx).await;
                }
                In::Subscribe { pkid, filters } => {
                    let mut granted = Vec::new();
                    let mut retained = Vec::new();
                    {
                        let mut subs = core.subs.write().unwrap_or_else(|p| p.into_inner());
                        for (f, q) in filters {
                            if outpost_api::pipeline::check_topic_filter(&f).is_err() {
                                granted.push(None);
                                continue;
                            }
                            let q = q.min(1);
                            subs.retain(|s| !(s.conn == conn && s.filter == f));
                            let r = core.retained.lock().unwrap_or_else(|p| p.into_inner());
                            retained.extend(
                                r.values()
                                    .filter(|m| outpost_api::pipeline::topic_matches(&f, &m.topic))
                                    .map(|m| (m.clone(), m.qos.min(q))),
                            );
                            subs.push(Sub {
                                conn,
                                filter: f,
                                qos: q,
                                tx: tx.clone(),
                            });
                            granted.push(Some(q));
                        }
                    }
                    let mut o = BytesMut::new();
                    out::suback(version, pkid, &granted, &mut o);
                    let _ = tx.send(Outgoing::Bytes(o)).await;
                    for (m, q) in retained {
                        let _ = tx.send(Outgoing::Deliver(m, q, true)).await;
                    }
                }
                In::Unsubscribe { pkid, filters } => {
                    core.subs
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .retain(|s| !(s.conn == conn && filters.contains(&s.filter)));
                    let mut o = BytesMut::new();
                    out::unsuback(version, pkid, filters.len(), &mut o);
                    let _ = tx.send(Outgoing::Bytes(o)).await;
                }
                In::PingReq => {
                    let mut o = BytesMut::new();
                    out::pingresp(version, &mut o);
                    let _ = tx.send(Outgoing::Bytes(o)).await;
                }
                In::PubAck => {}
                In::Disconnect => {
                    clean = true;
                    return Ok(());
                }
                In::Connect { .. } => return Err("a second CONNECT".into()),
                In::Unsupported(what) => return Err(format!("{what} is not supported")),
            }
        }
    }
    .await;
    core.subs
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|s| s.conn != conn);
    if !clean {
        if let Some(w) = will {
            debug!(client = %client_id, topic = %w.topic, "publishing last will");
            let (wtx, _wrx) = mpsc::channel(1);
            on_publish(&shared, &core, conn, w, 0, &wtx).await;
        }
    }
    let _ = tx.send(Outgoing::Close).await;
    drop(tx);
    let _ = writer.await;
    result
}

/// A PUBLISH: retained store, subscribers, and the streams whose filters match.
async fn on_publish(shared: &Shared, core: &Core, conn: u64, msg: Msg, pkid: u16, tx: &mpsc::Sender<Outgoing>) {
    core.received.fetch_add(1, Ordering::Relaxed);
    if msg.retain {
        core.retain(&msg);
    }
    core.route(&msg, conn);
    let routes = shared.routes();
    let mut wait = Vec::new();
    let mut streams = routes.for_topic(&msg.topic).peekable();
    if streams.peek().is_some() {
        let value = record_of(&msg.payload);
        let at = crate::reconcile::now_ms();
        for s in streams {
            let (done_tx, done_rx) = if msg.qos > 0 {
                let (a, b) = oneshot::channel();
                (Some(a), Some(b))
            } else {
                (None, None)
            };
            let input = Input {
                value: value.clone(),
                topic: Some(msg.topic.clone()),
                at,
                done: done_tx,
            };
            // With several matching streams, the PUBACK waits for every one of them.
            if s.tx.send(input).await.is_ok() {
                wait.extend(done_rx);
            }
        }
    }
    if msg.qos > 0 {
        let _ = tx.send(Outgoing::Ack { pkid, wait }).await;
    }
}

/// Subscribe to a site's existing broker (`OUTPOST_SITE_MQTT=host:port`) for every stream's
/// topics, as a client, and feed the streams. QoS 1: the site broker redelivers what the agent
/// did not acknowledge... within the limits of that broker's session handling.
pub async fn site_client(site: String, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let (host, port) = match site.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().unwrap_or(1883)),
        None => (site.clone(), 1883),
    };
    let mut o = rumqttc::MqttOptions::new(format!("outpost-{}", shared.node), host, port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(false);
    o.set_manual_acks(true);
    let (client, mut events) = rumqttc::AsyncClient::new(o, 1024);
    // The event loop runs in its own task (its poll is not meant to be cancelled).
    let (ev_tx, mut ev_rx) = mpsc::channel(1024);
    let poller = tokio::spawn(async move {
        loop {
            let e = events.poll().await;
            let failed = e.is_err();
            if ev_tx.send(e).await.is_err() {
                return;
            }
            if failed {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    });
    let _poller = AbortOnDrop(poller);
    let mut subscribed: Vec<String> = Vec::new();
    loop {
        let want: Vec<String> = {
            let r = shared.routes();
            let mut v: Vec<String> = r.streams.values().flat_map(|s| s.mqtt.clone()).collect();
            v.sort();
            v.dedup();
            v
        };
        if want != subscribed {
            for t in &want {
                let _ = client.subscribe(t.clone(), Q4::AtLeastOnce).await;
            }
            subscribed = want;
        }
        // Wake at least every second, so new streams' topics are subscribed to soon.
        let ev = tokio::select! {
            e = ev_rx.recv() => match e {
                Some(e) => e,
                None => return,
            },
            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
            _ = stop.changed() => return,
        };
        match ev {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                let routes = shared.routes();
                let value = record_of(&p.payload);
                let mut ok = true;
                for s in routes.for_topic(&p.topic) {
                    ok &= shared.submit(s, value.clone(), Some(p.topic.clone())).await.is_ok();
                }
                if ok {
                    let _ = client.ack(&p).await;
                }
            }
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                info!(broker = %site, "subscribed to the site broker");
                subscribed.clear();
            }
            Ok(_) => {}
            Err(e) => warn!(broker = %site, error = %e, "site broker unreachable; retrying"),
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_levels_are_read_from_the_first_bytes() {
        let mut b = BytesMut::new();
        m4::Connect::new("c").write(&mut b).unwrap();
        assert_eq!(peek_level(&b), Some(Ok(4)));
        assert_eq!(peek_level(&b[..3]), None);
        let mut b5 = BytesMut::new();
        m5::Connect {
            keep_alive: 10,
            client_id: "c".into(),
            clean_start: true,
            properties: None,
        }
        .write(&None, &None, &mut b5)
        .unwrap();
        assert_eq!(peek_level(&b5), Some(Ok(5)));
        assert_eq!(peek_level(b"\x30\x00"), Some(Err(())));
    }

    proptest::proptest! {
        /// Packets come from devices on the site: any bytes decode, wait for more, or are
        /// refused; never a panic.
        #[test]
        fn any_bytes_decode_or_are_refused(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = peek_level(&bytes);
            for v in [Version::V4, Version::V5] {
                let mut b = BytesMut::from(&bytes[..]);
                for _ in 0..64 {
                    match decode(v, &mut b) {
                        Decoded::Packet(_) if !b.is_empty() => continue,
                        _ => break,
                    }
                }
            }
        }
    }

    #[test]
    fn payloads_become_records() {
        assert_eq!(record_of(br#"{"t": 1}"#)["t"], 1);
        assert_eq!(record_of(b"21.5"), serde_json::json!(21.5));
        assert_eq!(record_of(b"hello")["payload"], "hello");
    }
}
