//! Site-local high availability (issue 18, docs/site-ha.md): how a Deployment asks for
//! failover between the boxes of one site, the labels that say which site a box belongs to and
//! where its peers reach it, and what a node receives in its desired state.
//!
//! A Deployment asks with annotations on its own metadata:
//!
//! | annotation | value | default |
//! |---|---|---|
//! | `outpost.dev/failover` | `site` | (required to turn failover on) |
//! | `outpost.dev/failover-standbys` | 1..=9 | 1 |
//! | `outpost.dev/failover-warm` | `true` / `false` | `false` |
//! | `outpost.dev/failover-policy` | `preferAvailability` / `preferSafety` | `preferAvailability` |
//! | `outpost.dev/failover-vip` | an IPv4 address with a prefix, `10.0.0.100/24` | none |
//! | `outpost.dev/failover-interface` | the interface that holds the vip, `eth0` | required with a vip |
//!
//! No I/O and no policy here: the rules of who runs the copy live in `outpost_core::site_ha`.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::manifest::{Labels, Object};

/// Turns site failover on: the only accepted value is `site`.
pub const FAILOVER_ANNOTATION: &str = "outpost.dev/failover";
/// Every failover option sits under this prefix; an unknown one is an error.
pub const FAILOVER_PREFIX: &str = "outpost.dev/failover-";
pub const STANDBYS_ANNOTATION: &str = "outpost.dev/failover-standbys";
pub const WARM_ANNOTATION: &str = "outpost.dev/failover-warm";
pub const POLICY_ANNOTATION: &str = "outpost.dev/failover-policy";
pub const VIP_ANNOTATION: &str = "outpost.dev/failover-vip";
pub const INTERFACE_ANNOTATION: &str = "outpost.dev/failover-interface";
/// Most standbys one workload may ask for (a site has up to ten boxes).
pub const MAX_STANDBYS: u32 = 9;

/// The node label naming a box's site. A token's `site` label is read when this one is absent.
pub const SITE_LABEL: &str = "topology.outpost.dev/site";
pub const SITE_LABEL_FALLBACK: &str = "site";
/// The box's IPv4 address on the site network, set by the box at join
/// (`outpost agent join --labels node.outpost.dev/site-ip=10.0.0.2`).
pub const SITE_IP_LABEL: &str = "node.outpost.dev/site-ip";
/// The port the box's peer link listens on (default [`DEFAULT_SITE_PORT`]).
pub const SITE_PORT_LABEL: &str = "node.outpost.dev/site-port";
pub const DEFAULT_SITE_PORT: u16 = 7946;

/// What happens when two boxes lose each other and the hub cannot be asked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FailoverPolicy {
    /// The standby starts its copy (two may run until the boxes see each other again, then the
    /// older one stops). The articles' wind-farm case, and the default.
    #[default]
    PreferAvailability,
    /// The standby waits: never two copies, but none if the active box really died.
    PreferSafety,
}

/// A Deployment's failover options, read from its annotations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverOptions {
    pub standbys: u32,
    pub warm: bool,
    pub policy: FailoverPolicy,
    /// `10.0.0.100/24`.
    pub vip: Option<String>,
    pub interface: Option<String>,
}

/// One box holding a failover workload, as its peers see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteMember {
    pub node: String,
    /// `ip:port` of its peer link on the site network; None when the box did not say
    /// (its peers then count it as silent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// 0 is the preferred active; the best-ranked live standby takes over.
    pub rank: u32,
}

/// The failover part of a node's workload spec: the options and every box holding the workload
/// (the same list on each of them; the spec's hash covers the options, not the list).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverSpec {
    #[serde(flatten)]
    pub options: FailoverOptions,
    pub members: Vec<SiteMember>,
}

/// `POST /v1/nodes/{node}/witness` (mTLS, own node only): a box of a two-box site that cannot
/// hear its peer claims the copy of `workload` at `epoch` (the holder renews at its own epoch).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessClaim {
    /// The workload key, `deployment/<namespace>/<name>`.
    pub workload: String,
    pub epoch: u64,
}

/// The witness's answer: who holds the copy now, at which epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessAnswer {
    pub owner: String,
    pub epoch: u64,
}

/// The site a node belongs to, from its labels.
pub fn site_of(labels: &Labels) -> Option<&str> {
    labels
        .get(SITE_LABEL)
        .or_else(|| labels.get(SITE_LABEL_FALLBACK))
        .map(String::as_str)
        .filter(|s| !s.is_empty())
}

/// `ip:port` of a node's peer link, from its labels (None without a valid site IP).
pub fn site_address(labels: &Labels) -> Option<String> {
    let ip: Ipv4Addr = labels.get(SITE_IP_LABEL)?.parse().ok()?;
    let port = match labels.get(SITE_PORT_LABEL) {
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0)?,
        None => DEFAULT_SITE_PORT,
    };
    Some(format!("{ip}:{port}"))
}

/// The failover options of an object's annotations: None when it does not ask for failover.
/// Assumes [`check_object`] accepted the object (values that do not parse fall back to
/// defaults).
pub fn failover_options(obj: &Object) -> Option<FailoverOptions> {
    let a = &obj.meta().annotations;
    if a.get(FAILOVER_ANNOTATION).map(String::as_str) != Some("site") {
        return None;
    }
    Some(FailoverOptions {
        standbys: a.get(STANDBYS_ANNOTATION).and_then(|s| s.parse().ok()).unwrap_or(1),
        warm: a.get(WARM_ANNOTATION).is_some_and(|s| s == "true"),
        policy: match a.get(POLICY_ANNOTATION).map(String::as_str) {
            Some("preferSafety") => FailoverPolicy::PreferSafety,
            _ => FailoverPolicy::PreferAvailability,
        },
        vip: a.get(VIP_ANNOTATION).cloned(),
        interface: a.get(INTERFACE_ANNOTATION).cloned(),
    })
}

/// Every problem with an object's failover annotations, as (field path, reason). Empty when it
/// asks for none or asks correctly.
pub fn check_object(obj: &Object) -> Vec<(String, String)> {
    let a = &obj.meta().annotations;
    let field = |k: &str| format!("metadata.annotations.{k}");
    let mut errs = Vec::new();
    let asks = a.contains_key(FAILOVER_ANNOTATION) || a.keys().any(|k| k.starts_with(FAILOVER_PREFIX));
    if !asks {
        return errs;
    }
    match a.get(FAILOVER_ANNOTATION).map(String::as_str) {
        Some("site") => {}
        Some(other) => errs.push((
            field(FAILOVER_ANNOTATION),
            format!("{other:?} is not a failover mode: the only one is \"site\" (an active copy and standbys on other boxes of the same site)"),
        )),
        None => errs.push((
            field(FAILOVER_ANNOTATION),
            format!("missing: the failover options need {FAILOVER_ANNOTATION}: site to take effect"),
        )),
    }
    match obj {
        Object::Deployment(d) if d.spec.replicas != 1 => errs.push((
            "spec.replicas".into(),
            format!(
                "{} with site failover: a failover Deployment runs exactly one active copy; set replicas: 1 and ask for standbys with {STANDBYS_ANNOTATION}",
                d.spec.replicas
            ),
        )),
        Object::Deployment(_) => {}
        other => errs.push((
            field(FAILOVER_ANNOTATION),
            format!(
                "site failover is for Deployments, not {:?}: a DaemonSet already runs on every box",
                other.id().kind
            ),
        )),
    }
    for (k, v) in a.iter().filter(|(k, _)| k.starts_with(FAILOVER_PREFIX)) {
        let bad = match k.as_str() {
            STANDBYS_ANNOTATION => match v.parse::<u32>() {
                Ok(n) if (1..=MAX_STANDBYS).contains(&n) => None,
                _ => Some(format!("{v:?} is not a standby count: use a whole number from 1 to {MAX_STANDBYS}")),
            },
            WARM_ANNOTATION => (v != "true" && v != "false").then(|| format!("{v:?}: use \"true\" or \"false\"")),
            POLICY_ANNOTATION => (v != "preferAvailability" && v != "preferSafety")
                .then(|| format!("{v:?} is not a policy: use preferAvailability (the default) or preferSafety")),
            VIP_ANNOTATION => check_vip(v).err(),
            INTERFACE_ANNOTATION => check_interface(v).err(),
            _ => Some(format!(
                "unknown failover option: use {STANDBYS_ANNOTATION}, {WARM_ANNOTATION}, {POLICY_ANNOTATION}, {VIP_ANNOTATION} or {INTERFACE_ANNOTATION}"
            )),
        };
        if let Some(reason) = bad {
            errs.push((field(k), reason));
        }
    }
    if a.contains_key(VIP_ANNOTATION) && !a.contains_key(INTERFACE_ANNOTATION) {
        errs.push((
            field(INTERFACE_ANNOTATION),
            format!("missing: a virtual IP needs the interface of the site network that holds it, e.g. {INTERFACE_ANNOTATION}: eth0"),
        ));
    }
    if a.contains_key(INTERFACE_ANNOTATION) && !a.contains_key(VIP_ANNOTATION) {
        errs.push((
            field(VIP_ANNOTATION),
            format!("missing: {INTERFACE_ANNOTATION} is only for a virtual IP; add one (e.g. 10.0.0.100/24) or remove the interface"),
        ));
    }
    errs
}

/// `a.b.c.d/len`, a unicast IPv4 address with a prefix length of 8 to 32.
fn check_vip(v: &str) -> Result<(), String> {
    let bad = || format!("{v:?} is not a virtual IP: use an IPv4 address with its prefix length, e.g. 10.0.0.100/24");
    let (ip, len) = v.split_once('/').ok_or_else(bad)?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    if !(8..=32).contains(&len) {
        return Err(bad());
    }
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast() {
        return Err(format!(
            "{v:?} cannot be a virtual IP: use a unicast address of the site network"
        ));
    }
    Ok(())
}

/// A Linux interface name: 1 to 15 bytes, no '/', whitespace or ':'.
fn check_interface(v: &str) -> Result<(), String> {
    let ok = !v.is_empty()
        && v.len() <= 15
        && v != "."
        && v != ".."
        && v.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{v:?} is not an interface name: 1 to 15 characters, no '/', ':' or spaces (e.g. eth0)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(annotations: &str, kind: &str, replicas: u32) -> Vec<String> {
        let spec = match kind {
            "Deployment" => format!(
                "spec:\n  replicas: {replicas}\n  template:\n    spec:\n      containers: [{{name: c, image: nginx}}]\n"
            ),
            _ => "spec:\n  template:\n    spec:\n      containers: [{name: c, image: nginx}]\n".to_string(),
        };
        let yaml = format!(
            "apiVersion: apps/v1\nkind: {kind}\nmetadata:\n  name: w\n  annotations: {{{annotations}}}\n{spec}"
        );
        match crate::parse_file("t.yaml", &yaml) {
            Ok(_) => Vec::new(),
            Err(errs) => errs.iter().map(|e| format!("{}: {}", e.field, e.reason)).collect(),
        }
    }

    #[test]
    fn table_of_failover_annotations() {
        let f = "metadata.annotations.outpost.dev/failover";
        let cases: &[(&str, &str, u32, Option<&str>)] = &[
            ("", "Deployment", 3, None),
            ("outpost.dev/failover: site", "Deployment", 1, None),
            (
                "outpost.dev/failover: site, outpost.dev/failover-standbys: '2', outpost.dev/failover-warm: 'true', outpost.dev/failover-policy: preferSafety, outpost.dev/failover-vip: 10.0.0.100/24, outpost.dev/failover-interface: eth0",
                "Deployment",
                1,
                None,
            ),
            ("outpost.dev/failover: node", "Deployment", 1, Some("failover: \"node\" is not a failover mode")),
            ("outpost.dev/failover-standbys: '1'", "Deployment", 1, Some("failover: missing")),
            ("outpost.dev/failover: site", "Deployment", 2, Some("spec.replicas: 2 with site failover")),
            ("outpost.dev/failover: site", "DaemonSet", 1, Some("failover: site failover is for Deployments")),
            ("outpost.dev/failover: site, outpost.dev/failover-standbys: '0'", "Deployment", 1, Some("failover-standbys: \"0\" is not a standby count")),
            ("outpost.dev/failover: site, outpost.dev/failover-standbys: '10'", "Deployment", 1, Some("failover-standbys: \"10\"")),
            ("outpost.dev/failover: site, outpost.dev/failover-standbys: two", "Deployment", 1, Some("failover-standbys: \"two\"")),
            ("outpost.dev/failover: site, outpost.dev/failover-warm: maybe", "Deployment", 1, Some("failover-warm: \"maybe\": use \"true\" or \"false\"")),
            ("outpost.dev/failover: site, outpost.dev/failover-policy: preferSpeed", "Deployment", 1, Some("failover-policy: \"preferSpeed\" is not a policy")),
            ("outpost.dev/failover: site, outpost.dev/failover-vip: 10.0.0.100, outpost.dev/failover-interface: eth0", "Deployment", 1, Some("failover-vip: \"10.0.0.100\" is not a virtual IP")),
            ("outpost.dev/failover: site, outpost.dev/failover-vip: 10.0.0.300/24, outpost.dev/failover-interface: eth0", "Deployment", 1, Some("failover-vip: \"10.0.0.300/24\" is not a virtual IP")),
            ("outpost.dev/failover: site, outpost.dev/failover-vip: 127.0.0.5/8, outpost.dev/failover-interface: eth0", "Deployment", 1, Some("cannot be a virtual IP")),
            ("outpost.dev/failover: site, outpost.dev/failover-vip: 10.0.0.100/24", "Deployment", 1, Some("failover-interface: missing: a virtual IP needs the interface")),
            ("outpost.dev/failover: site, outpost.dev/failover-interface: eth0", "Deployment", 1, Some("failover-vip: missing")),
            ("outpost.dev/failover: site, outpost.dev/failover-vip: 10.0.0.100/24, outpost.dev/failover-interface: 'eth 0'", "Deployment", 1, Some("failover-interface: \"eth 0\" is not an interface name")),
            ("outpost.dev/failover: site, outpost.dev/failover-rank: '1'", "Deployment", 1, Some("failover-rank: unknown failover option")),
        ];
        for (annotations, kind, replicas, want) in cases {
            let errs = errors(annotations, kind, *replicas);
            match want {
                None => assert!(errs.is_empty(), "{annotations}: {errs:?}"),
                Some(w) => assert!(
                    errs.iter()
                        .any(|e| e.contains(w) && (e.starts_with(f) || e.starts_with("spec."))),
                    "{annotations}: want {w:?} in {errs:?}"
                ),
            }
        }
    }

    #[test]
    fn options_and_labels_are_read() {
        let parsed = crate::parse_file(
            "t.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: w\n  annotations: {outpost.dev/failover: site, outpost.dev/failover-standbys: '2', outpost.dev/failover-policy: preferSafety}\nspec:\n  template:\n    spec:\n      containers: [{name: c, image: nginx}]\n",
        )
        .expect("valid");
        let o = failover_options(&parsed.objects[0]).expect("asks for failover");
        assert_eq!(
            o,
            FailoverOptions {
                standbys: 2,
                warm: false,
                policy: FailoverPolicy::PreferSafety,
                vip: None,
                interface: None
            }
        );
        let labels = |l: &[(&str, &str)]| -> Labels { l.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() };
        assert_eq!(site_of(&labels(&[("site", "a"), (SITE_LABEL, "b")])), Some("b"));
        assert_eq!(site_of(&labels(&[("site", "a")])), Some("a"));
        assert_eq!(site_of(&labels(&[])), None);
        assert_eq!(
            site_address(&labels(&[(SITE_IP_LABEL, "10.1.2.3")])).as_deref(),
            Some("10.1.2.3:7946")
        );
        assert_eq!(
            site_address(&labels(&[(SITE_IP_LABEL, "10.1.2.3"), (SITE_PORT_LABEL, "8000")])).as_deref(),
            Some("10.1.2.3:8000")
        );
        assert_eq!(site_address(&labels(&[(SITE_IP_LABEL, "box-1")])), None);
        assert_eq!(
            site_address(&labels(&[(SITE_IP_LABEL, "10.1.2.3"), (SITE_PORT_LABEL, "0")])),
            None
        );
    }
}
