//! The node's identity: joining a hub with a token, and the files that hold the result.
//!
//! `<data-dir>/identity.json` (node name, hub URL, the hub endpoints the hubs advertise, CA and
//! node certificate) and
//! `<data-dir>/node.key` (the private key, generated here, mode 0600, never sent anywhere).
//! Both are written with write-temp, fsync, rename, fsync-dir, so a power cut leaves either the
//! old file or the new one.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use outpost_api::{ApiError, JoinRequest, JoinResponse, JoinToken, Labels, PROTOCOL, PROTOCOL_HEADER};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("{0}")]
    Token(String),
    #[error("cannot reach the hub at {url}: {source}; check the URL and that `outpost hub` is running and reachable from this box")]
    Unreachable { url: String, source: reqwest::Error },
    #[error(
        "the hub at {url} presents CA {actual}, but the token pins CA {expected}: the token belongs to another hub, \
         or something between this box and the hub is intercepting TLS. Nothing was sent. Check the hub URL, or \
         create a token on the right hub with `outpost token create`"
    )]
    WrongCa {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("the hub refused the join ({code}): {message}")]
    Refused { code: String, message: String },
    #[error("this box already joined as node {node} (data dir {dir}); run it with `outpost agent run`, or use another --data-dir")]
    AlreadyJoined { node: String, dir: String },
    #[error("{0}")]
    Local(String),
}

/// What a joined node knows about itself and its hub.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Identity {
    pub node: String,
    pub hub: String,
    pub ca_pem: String,
    pub cert_pem: String,
    pub labels: Labels,
    /// The hub endpoints the hubs advertise (join and sync answers, protocol 1.4); empty: only
    /// `hub`. Saved whenever a hub sends a new list, so a restart (also after `kill -9`) starts
    /// from the last list known.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hubs: Vec<String>,
    #[serde(skip)]
    pub key_pem: String,
    /// `outpost agent run --hub URL`: use that URL only, ignore advertised lists (a proxy or
    /// tunnel the hubs do not know about). Not saved.
    #[serde(skip)]
    pub pinned: bool,
}

pub struct JoinOptions {
    pub hub: String,
    pub token: String,
    pub name: Option<String>,
    pub labels: Labels,
    pub data_dir: PathBuf,
}

const IDENTITY: &str = "identity.json";
const KEY: &str = "node.key";

/// Write `bytes` to `path` atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

impl Identity {
    /// The endpoints to use: the advertised list, or the one URL this node joined through.
    pub fn endpoints(&self) -> Vec<String> {
        if self.hubs.is_empty() || self.pinned {
            vec![self.hub.clone()]
        } else {
            self.hubs.clone()
        }
    }

    pub fn exists(dir: &Path) -> bool {
        dir.join(IDENTITY).exists()
    }

    pub fn load(dir: &Path) -> Result<Self, String> {
        let p = dir.join(IDENTITY);
        let text = std::fs::read_to_string(&p).map_err(|e| {
            format!(
                "cannot read {}: {e}; join this box first with `outpost agent join --hub URL --token T`",
                p.display()
            )
        })?;
        let mut id: Identity = serde_json::from_str(&text).map_err(|e| format!("{} is corrupt: {e}", p.display()))?;
        id.key_pem = std::fs::read_to_string(dir.join(KEY))
            .map_err(|e| format!("cannot read {}: {e}", dir.join(KEY).display()))?;
        Ok(id)
    }

    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        write_atomic(&dir.join(KEY), self.key_pem.as_bytes(), 0o600)?;
        write_atomic(
            &dir.join(IDENTITY),
            serde_json::to_string_pretty(self).expect("serializable").as_bytes(),
            0o600,
        )
    }
}

/// This machine's host name as a node name: lower-case, DNS-label characters only.
pub fn default_node_name() -> String {
    let raw = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "node".into());
    let mut s: String = raw
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' })
        .collect();
    s.truncate(63);
    let s = s.trim_matches('-').to_string();
    if s.is_empty() {
        "node".into()
    } else {
        s
    }
}

/// The well-known labels the agent states about its node at join. The hub checks them
/// (`outpost_core::link::node_labels`): `kubernetes.io/hostname` must be the node's name (the
/// hub sets it anyway; 1.0 hubs relied on the agent sending it).
pub fn well_known_labels(node: &str) -> Labels {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        other => other,
    };
    [
        ("kubernetes.io/hostname", node.to_string()),
        ("kubernetes.io/os", std::env::consts::OS.to_string()),
        ("kubernetes.io/arch", arch.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn client(cfg: rustls::ClientConfig) -> Result<reqwest::Client, JoinError> {
    reqwest::Client::builder()
        .use_preconfigured_tls(cfg)
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| JoinError::Local(format!("cannot build HTTPS client: {e}")))
}

/// Join the hub: check its CA against the token's pin, generate the node key, send the CSR,
/// store the identity. Fails without writing anything if any step fails.
pub async fn join(o: &JoinOptions) -> Result<Identity, JoinError> {
    if Identity::exists(&o.data_dir) {
        let node = Identity::load(&o.data_dir)
            .map(|i| i.node)
            .unwrap_or_else(|_| "?".into());
        return Err(JoinError::AlreadyJoined {
            node,
            dir: o.data_dir.display().to_string(),
        });
    }
    let token = JoinToken::parse(&o.token).map_err(JoinError::Token)?;
    let hub = o.hub.trim_end_matches('/').to_string();
    let unreachable = |source| JoinError::Unreachable {
        url: hub.clone(),
        source,
    };
    // 1. Fetch the CA without trusting the connection, then pin it.
    let boot = client(outpost_pki::bootstrap_client_config().map_err(|e| JoinError::Local(e.to_string()))?)?;
    let ca_pem = boot
        .get(format!("{hub}/v1/ca"))
        .send()
        .await
        .map_err(unreachable)?
        .text()
        .await
        .map_err(unreachable)?;
    let ca_der = outpost_pki::pem_to_der(&ca_pem).map_err(|_| JoinError::WrongCa {
        url: hub.clone(),
        expected: token.ca_fingerprint.clone(),
        actual: "(no CA certificate in the answer)".into(),
    })?;
    let actual = outpost_pki::fingerprint(&ca_der);
    if actual != token.ca_fingerprint {
        return Err(JoinError::WrongCa {
            url: hub.clone(),
            expected: token.ca_fingerprint,
            actual,
        });
    }
    // 2. From here on the hub is verified against the pinned CA.
    let verified = client(outpost_pki::client_config(&ca_pem, None).map_err(|e| JoinError::Local(e.to_string()))?)?;
    let name = o.name.clone().unwrap_or_else(default_node_name);
    let key = outpost_pki::NodeKey::generate(&name).map_err(|e| JoinError::Local(e.to_string()))?;
    let mut labels = well_known_labels(&name);
    labels.extend(o.labels.clone());
    let req = JoinRequest {
        token_id: token.id,
        token_secret: token.secret,
        name: name.clone(),
        labels,
        csr_pem: key.csr_pem,
    };
    // A hub busy with a reconnect storm answers 503 + Retry-After: wait that long and again
    // (docs/protocol.md §6), up to BUSY_TRIES times.
    const BUSY_TRIES: u32 = 40;
    let mut tries = 0;
    let resp = loop {
        let resp = verified
            .post(format!("{hub}/v1/join"))
            .header(PROTOCOL_HEADER, PROTOCOL)
            .json(&req)
            .send()
            .await
            .map_err(unreachable)?;
        let busy = (resp.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE)
            .then(|| resp.headers().get(reqwest::header::RETRY_AFTER))
            .flatten()
            .and_then(|v| v.to_str().ok())
            .and_then(outpost_core::admission::parse_retry_after);
        tries += 1;
        match busy {
            Some(secs) if tries < BUSY_TRIES => {
                let wait = outpost_core::admission::agent_wait(std::time::Duration::from_secs(1), Some(secs));
                tracing::info!(hub = %hub, retry_in = ?wait, "hub busy; joining again after its Retry-After");
                tokio::time::sleep(wait).await;
            }
            _ => break resp,
        }
    };
    if !resp.status().is_success() {
        let status = resp.status();
        let err: ApiError = resp.json().await.unwrap_or(ApiError {
            code: status.as_str().into(),
            message: format!("HTTP {status}"),
            details: vec![],
        });
        return Err(JoinError::Refused {
            code: err.code,
            message: err.message,
        });
    }
    let jr: JoinResponse = resp.json().await.map_err(unreachable)?;
    let id = Identity {
        node: jr.node,
        hub,
        ca_pem,
        cert_pem: jr.cert_pem,
        labels: jr.labels,
        hubs: jr.hubs,
        key_pem: key.key_pem,
        pinned: false,
    };
    id.save(&o.data_dir)
        .map_err(|e| JoinError::Local(format!("cannot write identity to {}: {e}", o.data_dir.display())))?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_dns_labels() {
        let n = default_node_name();
        assert!(!n.is_empty() && n.len() <= 63);
        assert!(
            n.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "{n}"
        );
    }

    #[test]
    fn atomic_write_replaces_and_sets_mode() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
