//! The operator's HTTPS client: where the hub is, how to trust it, and how its errors read.
//!
//! `outpost login` stores `{hub, token, ca_pem}` in `$OUTPOST_CONFIG` or
//! `~/.config/outpost/config.json` (mode 0600). `OUTPOST_HUB` and `OUTPOST_TOKEN` override the
//! stored values; `OUTPOST_CA_FINGERPRINT` pins the CA when no stored CA applies.
//!
//! A request that changes something (POST, PUT, DELETE) and loses its connection after it was
//! sent may have been applied by the hub (it commits before it answers): the error says so and
//! how to check, instead of suggesting the hub is not running.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use outpost_api::{ApiError, ManifestFile};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
pub struct Config {
    pub hub: String,
    pub token: String,
    pub ca_pem: String,
}

pub fn config_path() -> PathBuf {
    if let Some(p) = std::env::var_os("OUTPOST_CONFIG") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".config/outpost/config.json")
}

pub fn save_config(c: &Config) -> Result<PathBuf> {
    let p = config_path();
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir)?;
    }
    outpost_agent::identity::write_atomic(&p, serde_json::to_string_pretty(c)?.as_bytes(), 0o600)
        .with_context(|| format!("cannot write {}", p.display()))?;
    Ok(p)
}

/// Fetch the hub's CA over an unverified connection and check it against `pin` if given.
pub async fn fetch_ca(hub: &str, pin: Option<&str>) -> Result<(String, String)> {
    let boot = reqwest::Client::builder()
        .use_preconfigured_tls(outpost_pki::bootstrap_client_config()?)
        .build()?;
    let pem = boot
        .get(format!("{hub}/v1/ca"))
        .send()
        .await
        .with_context(|| format!("cannot reach the hub at {hub}; check the URL and that `outpost hub` runs"))?
        .text()
        .await?;
    let fp =
        outpost_pki::fingerprint(&outpost_pki::pem_to_der(&pem).context("the hub did not return a CA certificate")?);
    if let Some(pin) = pin {
        if !fp.eq_ignore_ascii_case(pin.trim()) {
            bail!("the hub at {hub} presents CA {fp}, not {pin}: wrong hub, or the connection is intercepted; nothing was stored");
        }
    }
    Ok((pem, fp))
}

pub async fn login(hub: &str, token: &str, pin: Option<&str>) -> Result<()> {
    let hub = hub.trim_end_matches('/').to_string();
    let (ca_pem, fp) = fetch_ca(&hub, pin).await?;
    let c = Client::new(&hub, token, &ca_pem)?;
    let _: Vec<outpost_api::NodeInfo> = c.get("/v1/nodes").await.context("the hub refused the admin token")?;
    let path = save_config(&Config {
        hub: hub.clone(),
        token: token.to_string(),
        ca_pem,
    })?;
    if pin.is_none() {
        eprintln!("trusted the hub's CA {fp} on first use: compare it with the fingerprint `outpost hub` printed");
    }
    println!("logged in to {hub}; settings in {}", path.display());
    Ok(())
}

pub struct Client {
    hub: String,
    token: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(hub: &str, token: &str, ca_pem: &str) -> Result<Self> {
        let tls = outpost_pki::client_config(ca_pem, None)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(std::time::Duration::from_secs(60))
            .build()?;
        Ok(Self {
            hub: hub.trim_end_matches('/').to_string(),
            token: token.trim().to_string(),
            http,
        })
    }

    /// From the stored login, with `OUTPOST_HUB` / `OUTPOST_TOKEN` overriding it.
    pub fn from_env() -> Result<Self> {
        let stored: Option<Config> = std::fs::read_to_string(config_path())
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let hub = std::env::var("OUTPOST_HUB")
            .ok()
            .or_else(|| stored.as_ref().map(|c| c.hub.clone()));
        let token = std::env::var("OUTPOST_TOKEN")
            .ok()
            .or_else(|| stored.as_ref().map(|c| c.token.clone()));
        let (Some(hub), Some(token)) = (hub, token) else {
            bail!("no hub configured: run `outpost login --hub URL --token ADMIN_TOKEN` (or set OUTPOST_HUB and OUTPOST_TOKEN)");
        };
        let hub = hub.trim_end_matches('/').to_string();
        let ca = match (&stored, std::env::var("OUTPOST_CA_FILE").ok()) {
            (_, Some(file)) => std::fs::read_to_string(&file).with_context(|| format!("OUTPOST_CA_FILE {file}"))?,
            (Some(c), None) if c.hub == hub => c.ca_pem.clone(),
            _ => bail!(
                "no CA stored for {hub}: run `outpost login --hub {hub} --token ADMIN_TOKEN`, or set OUTPOST_CA_FILE to the hub's ca.pem"
            ),
        };
        Self::new(&hub, &token, &ca)
    }

    /// Why a request failed on the way, told apart by whether it may have changed something.
    fn transport_error(&self, e: reqwest::Error, change: Option<&str>) -> anyhow::Error {
        match change {
            Some(path) if !e.is_connect() && !e.is_builder() => {
                let what = if e.is_timeout() {
                    "the hub did not answer in time"
                } else {
                    "the connection to the hub broke after the request was sent"
                };
                anyhow::anyhow!(
                    "{what} ({}): the hub may have applied the change; {} before trying again",
                    self.hub,
                    check_hint(path)
                )
                .context(e)
            }
            _ => anyhow::Error::new(e).context(format!(
                "cannot reach the hub at {}; is `outpost hub` running?",
                self.hub
            )),
        }
    }

    /// Send with the admin token; `change` is the path of a request that changes something.
    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder, change: Option<&str>) -> Result<T> {
        let resp = match req.bearer_auth(&self.token).send().await {
            Ok(r) => r,
            Err(e) => return Err(self.transport_error(e, change)),
        };
        let status = resp.status();
        if status.is_success() {
            return match (resp.json().await, change) {
                (Ok(v), _) => Ok(v),
                (Err(e), Some(path)) => Err(anyhow::Error::new(e).context(format!(
                    "the hub accepted the change, but its answer broke off; {}",
                    check_hint(path)
                ))),
                (Err(e), None) => Err(anyhow::Error::new(e).context("unreadable answer from the hub")),
            };
        }
        let text = resp.text().await.unwrap_or_default();
        match serde_json::from_str::<ApiError>(&text) {
            Ok(e) => {
                let mut msg = e.message;
                for d in &e.details {
                    msg.push_str(&format!("\n  - {d}"));
                }
                bail!("{msg}")
            }
            Err(_) => bail!("the hub answered {status}: {text}"),
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(self.http.get(format!("{}{path}", self.hub)), None).await
    }
    /// GET with query parameters (encoded by reqwest).
    pub async fn get_query<T: DeserializeOwned, Q: Serialize + ?Sized>(&self, path: &str, query: &Q) -> Result<T> {
        self.send(self.http.get(format!("{}{path}", self.hub)).query(query), None)
            .await
    }
    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.send(self.http.post(format!("{}{path}", self.hub)).json(body), Some(path))
            .await
    }
    /// Does the hub have this path (HEAD answers 200)?
    pub async fn exists(&self, path: &str) -> Result<bool> {
        let r = self
            .http
            .head(format!("{}{path}", self.hub))
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach the hub at {}", self.hub))?;
        Ok(r.status().is_success())
    }
    /// PUT a large body (no overall timeout).
    pub async fn put_stream(&self, path: &str, body: reqwest::Body, len: u64) -> Result<()> {
        let r = self
            .http
            .put(format!("{}{path}", self.hub))
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_LENGTH, len)
            .timeout(std::time::Duration::from_secs(24 * 3600))
            .body(body)
            .send()
            .await
            .map_err(|e| self.transport_error(e, Some(path)))
            .context("the upload did not complete; push again")?;
        if !r.status().is_success() {
            let status = r.status();
            let text = r.text().await.unwrap_or_default();
            let msg = serde_json::from_str::<ApiError>(&text)
                .map(|e| e.message)
                .unwrap_or(text);
            bail!("the hub refused the upload ({status}): {msg}");
        }
        Ok(())
    }
    /// A request with the token and no overall timeout (exec streams), sent; a refusal is an
    /// error with the hub's message.
    pub async fn stream(
        &self,
        req: reqwest::RequestBuilder,
        timeout: std::time::Duration,
    ) -> Result<reqwest::Response> {
        let r = req
            .bearer_auth(&self.token)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| self.transport_error(e, None))?;
        if r.status().is_success() {
            return Ok(r);
        }
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        match serde_json::from_str::<ApiError>(&text) {
            Ok(e) => bail!("{}", e.message),
            Err(_) => bail!("the hub answered {status}: {text}"),
        }
    }
    /// The underlying client and the hub's URL, for [`Client::stream`].
    pub fn http(&self) -> (&reqwest::Client, &str) {
        (&self.http, &self.hub)
    }
    pub async fn delete_json<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(self.http.delete(format!("{}{path}", self.hub)), Some(path))
            .await
    }
    pub async fn delete(&self, path: &str) -> Result<()> {
        let _: serde_json::Value = self.delete_json(path).await?;
        Ok(())
    }
}

/// How an operator checks whether a change whose answer was lost happened.
fn check_hint(path: &str) -> &'static str {
    if path.starts_with("/v1/tokens") {
        "a token may have been created (an unused one expires by itself); create a new one with `outpost token create`"
    } else if path.starts_with("/v1/nodes") {
        "check with `outpost get nodes`"
    } else if path.ends_with("/undo") {
        "check with `outpost rollout history`"
    } else if path.starts_with("/v1/users") {
        "check with `outpost user ls`"
    } else if path.starts_with("/v1/images") {
        "check with `outpost image ls`"
    } else {
        "check with `outpost get workloads` (and `outpost get nodes`)"
    }
}

/// Read manifest files; directories contribute their `.yaml`/`.yml`/`.json` files, sorted.
pub fn read_manifests(paths: &[PathBuf]) -> Result<Vec<ManifestFile>> {
    let mut out = Vec::new();
    for p in paths {
        if p.as_os_str() == "-" {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
            out.push(ManifestFile {
                name: "<stdin>".into(),
                content: s,
            });
        } else if p.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot read directory {}", p.display()))?
                .flatten()
                .map(|e| e.path())
                .filter(|e| matches!(e.extension().and_then(|x| x.to_str()), Some("yaml" | "yml" | "json")))
                .collect();
            entries.sort();
            for e in entries {
                out.push(read_one(&e)?);
            }
        } else {
            out.push(read_one(p)?);
        }
    }
    if out.is_empty() {
        bail!(
            "no manifest files found in {}",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(out)
}

fn read_one(p: &Path) -> Result<ManifestFile> {
    let content = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
    Ok(ManifestFile {
        name: p.display().to_string(),
        content,
    })
}

/// The host of an `https://host:port/...` URL.
pub fn url_host(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"))?;
    let hostport = rest.split('/').next()?;
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        v6.split(']').next()?.to_string()
    } else {
        hostport.rsplit_once(':').map_or(hostport, |(h, _)| h).to_string()
    };
    (!host.is_empty()).then_some(host)
}

/// `0.0.0.0:8443` -> `127.0.0.1:8443` for a URL printed to the user.
pub fn display_addr(a: std::net::SocketAddr) -> String {
    if a.ip().is_unspecified() {
        format!("127.0.0.1:{}", a.port())
    } else {
        a.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_change_route_has_a_way_to_check() {
        for (path, want) in [
            ("/v1/apply", "outpost get workloads"),
            ("/v1/delete", "outpost get workloads"),
            ("/v1/objects/deployment/default/web", "outpost get workloads"),
            ("/v1/objects/deployment/default/web/undo", "outpost rollout history"),
            ("/v1/nodes/box-1", "outpost get nodes"),
            ("/v1/tokens", "outpost token create"),
            ("/v1/images/tags", "outpost image ls"),
        ] {
            assert!(check_hint(path).contains(want), "{path}: {}", check_hint(path));
        }
    }

    #[test]
    fn url_hosts() {
        assert_eq!(
            url_host("https://hub.example.com:8443").as_deref(),
            Some("hub.example.com")
        );
        assert_eq!(url_host("https://10.0.0.1/x").as_deref(), Some("10.0.0.1"));
        assert_eq!(url_host("https://[::1]:8443").as_deref(), Some("::1"));
        assert_eq!(url_host("hub:8443"), None);
    }
}
