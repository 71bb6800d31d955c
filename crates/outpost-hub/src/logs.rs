//! Requests from operators to nodes, through the node's own outbound link: log reads and the
//! node's vitals history.
//!
//! The hub cannot reach an agent, so `GET /v1/logs?node=..&workload=..` parks a
//! [`LogRequest`] for the node, wakes the node's sync long-poll (the answer carries
//! `log_requests`), and waits for the agent to POST the data to
//! `/v1/nodes/{node}/logs/{id}` (mTLS; a node may only answer requests addressed to it).
//! `GET /v1/nodes/{node}/vitals` does the same with a [`VitalsRequest`] (`vitals_requests`,
//! answered at `/v1/nodes/{node}/vitals/{id}`). Requests live in memory only: an operator
//! waits seconds, not across hub restarts. Where replicas share a PostgreSQL store, the request
//! itself is parked in the store instead (`crate::store::notify`: any replica may hold the
//! node's long-poll, and the node may answer any replica) and only the operator's wait is here
//! ([`Broker::expect`], [`Broker::deliver`]).
//!
//! This module is the broker only (a leaf); `crate::service` and `crate::node_vitals` park and
//! complete requests.
//!
//! Must never: hold a request longer than its deadline, or hand a node another node's request.

use std::collections::HashMap;
use std::sync::Mutex;

use outpost_api::{LogData, LogRequest, VitalsHistory, VitalsRequest};
use tokio::sync::oneshot;

/// A request relayed to a node: it has an id the node's answer names.
pub trait Relayed {
    fn id(&self) -> &str;
}

impl Relayed for LogRequest {
    fn id(&self) -> &str {
        &self.id
    }
}

impl Relayed for VitalsRequest {
    fn id(&self) -> &str {
        &self.id
    }
}

/// Parks requests of one kind for nodes and hands their answers to the waiting operators.
pub struct Broker<Req, Ans> {
    /// Requests not yet handed to their node.
    pending: Mutex<HashMap<String, Vec<Req>>>,
    /// Requests handed out or pending, by id: (node, where to deliver the answer).
    waiting: Mutex<HashMap<String, (String, oneshot::Sender<Ans>)>>,
}

pub type LogBroker = Broker<LogRequest, LogData>;
pub type VitalsBroker = Broker<VitalsRequest, VitalsHistory>;

impl<Req, Ans> Default for Broker<Req, Ans> {
    fn default() -> Self {
        Self {
            pending: Mutex::new(HashMap::new()),
            waiting: Mutex::new(HashMap::new()),
        }
    }
}

impl<Req: Relayed, Ans> Broker<Req, Ans> {
    /// Park a request for `node`; the receiver gets the agent's answer.
    pub fn submit(&self, node: &str, req: Req) -> oneshot::Receiver<Ans> {
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(req.id().to_string(), (node.to_string(), tx));
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(node.to_string())
            .or_default()
            .push(req);
        rx
    }

    /// Wait for the answer to a request parked elsewhere (in the shared store, for the replica
    /// that holds the node's long-poll: `crate::store::notify`); nothing is parked here.
    pub fn expect(&self, node: &str, id: &str) -> oneshot::Receiver<Ans> {
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), (node.to_string(), tx));
        rx
    }

    /// Is an operator here waiting for `node`'s answer to `id`?
    pub fn is_waiting(&self, node: &str, id: &str) -> bool {
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .is_some_and(|(n, _)| n == node)
    }

    /// The ids of the requests operators here wait for.
    pub fn waiting_ids(&self) -> Vec<String> {
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Deliver an answer stored by another replica (already checked to be the addressed
    /// node's when it was stored).
    pub fn deliver(&self, id: &str, data: Ans) -> bool {
        let w = self.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        w.is_some_and(|(_, tx)| tx.send(data).is_ok())
    }

    pub fn has_pending(&self, node: &str) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .is_some_and(|v| !v.is_empty())
    }

    /// Hand the node its pending requests (once).
    pub fn take(&self, node: &str) -> Vec<Req> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node)
            .unwrap_or_default()
    }

    /// Deliver an answer. False when there is no such request for this node (unknown id,
    /// expired, or addressed to another node).
    pub fn complete(&self, node: &str, id: &str, data: Ans) -> bool {
        let mut w = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        match w.get(id) {
            Some((n, _)) if n == node => {}
            _ => return false,
        }
        let Some((_, tx)) = w.remove(id) else { return false };
        tx.send(data).is_ok()
    }

    /// Forget a request whose operator stopped waiting.
    pub fn cancel(&self, node: &str, id: &str) {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        if let Some(v) = self.pending.lock().unwrap_or_else(|p| p.into_inner()).get_mut(node) {
            v.retain(|r| r.id() != id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: &str) -> LogRequest {
        LogRequest {
            id: id.into(),
            workload: "daemonset/default/a".into(),
            container: None,
            tail: None,
            since_secs: None,
            from_offset: None,
        }
    }

    #[test]
    fn a_node_answers_only_its_own_requests() {
        let b = LogBroker::default();
        let mut waits = b.expect("n1", "x1");
        assert!(b.is_waiting("n1", "x1") && !b.is_waiting("n2", "x1") && !b.has_pending("n1"));
        assert_eq!(b.waiting_ids(), ["x1"]);
        assert!(b.deliver("x1", LogData::default()) && waits.try_recv().is_ok());
        assert!(!b.deliver("x1", LogData::default()), "delivered once");
        let mut rx = b.submit("n1", req("r1"));
        assert!(b.has_pending("n1") && !b.has_pending("n2"));
        assert_eq!(b.take("n1").len(), 1);
        assert!(b.take("n1").is_empty(), "handed out once");
        assert!(
            !b.complete("n2", "r1", LogData::default()),
            "another node cannot answer"
        );
        assert!(rx.try_recv().is_err());
        assert!(b.complete(
            "n1",
            "r1",
            LogData {
                text: "hi".into(),
                ..Default::default()
            }
        ));
        assert_eq!(rx.try_recv().unwrap().text, "hi");
        assert!(!b.complete("n1", "r1", LogData::default()), "answered once");
        let _rx = b.submit("n1", req("r2"));
        b.cancel("n1", "r2");
        assert!(!b.has_pending("n1"));
    }
}
