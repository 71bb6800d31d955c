//! The hub's data directory: CA, server certificate, admin token. Every write goes to a temp
//! file, is fsynced, renamed over the target, and the directory is fsynced, so a crash leaves
//! either the old or the new file, never a torn one.
//!
//! Layout: `ca.pem`, `ca.key` (0600), `server.pem` (chain), `server.key` (0600),
//! `server.names` (the names the server certificate was issued for, one a line),
//! `admin.token` (0600), `hub.db` (SQLite).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use outpost_pki::CaMaterial;
use rand::RngCore;

/// Write `data` to `path` atomically with the given mode.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = path.parent().context("path has no parent directory")?;
    let name = path
        .file_name()
        .context("path has no file name")?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    // The mode passed to open() only applies to new files.
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.write_all(data)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.sync_all()
        .with_context(|| format!("cannot fsync {}", tmp.display()))?;
    drop(f);
    fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync directory {}", dir.display()))?;
    Ok(())
}

fn read(path: &Path) -> anyhow::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Random lower-case hex of `bytes` bytes.
pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

pub struct DataDir {
    pub root: PathBuf,
}

/// What the hub loads from its data directory at start.
pub struct Material {
    pub ca: CaMaterial,
    pub server_chain_pem: String,
    pub server_key_pem: String,
    pub admin_token: String,
    /// Some on first start only.
    pub created_admin_token: Option<String>,
}

/// The names the server certificate must cover: advertised ones plus localhost, sorted.
pub fn server_names(advertise: &[String]) -> Vec<String> {
    let mut names: Vec<String> = advertise
        .iter()
        .map(|a| host_of(a))
        .filter(|h| !h.is_empty())
        .chain(["localhost".to_string(), "127.0.0.1".to_string()])
        .collect();
    names.sort();
    names.dedup();
    names
}

/// `https://hub.example:8443/x` -> `hub.example`; `[::1]:443` -> `::1`; plain names unchanged.
pub fn host_of(s: &str) -> String {
    let s = s.trim();
    let s = s.split_once("://").map_or(s, |(_, rest)| rest);
    let s = s.split('/').next().unwrap_or(s);
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest).to_string();
    }
    if s.parse::<std::net::IpAddr>().is_ok() {
        return s.to_string();
    }
    s.rsplit_once(':').map_or(s, |(h, _)| h).to_string()
}

impl DataDir {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Create the directory (0700) and load or create the CA, server certificate and admin token.
    pub fn load_or_create(&self, advertise: &[String]) -> anyhow::Result<Material> {
        fs::create_dir_all(&self.root).with_context(|| format!("cannot create data dir {}", self.root.display()))?;
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot set mode 0700 on {}", self.root.display()))?;

        let ca = match (read(&self.path("ca.pem"))?, read(&self.path("ca.key"))?) {
            (Some(cert_pem), Some(key_pem)) => CaMaterial { cert_pem, key_pem },
            (None, None) => {
                let ca = CaMaterial::generate("hub").context("cannot generate the hub CA")?;
                write_atomic(&self.path("ca.key"), ca.key_pem.as_bytes(), 0o600)?;
                write_atomic(&self.path("ca.pem"), ca.cert_pem.as_bytes(), 0o644)?;
                tracing::info!(dir = %self.root.display(), "created hub CA");
                ca
            }
            _ => bail!(
                "{} has only one of ca.pem and ca.key; restore the missing file from a backup (a new CA would lock out every joined node)",
                self.root.display()
            ),
        };
        ca.fingerprint()
            .context("ca.pem is not a valid certificate; restore it from a backup")?;

        let names = server_names(advertise);
        let names_text = names.join("\n");
        let stored = (
            read(&self.path("server.pem"))?,
            read(&self.path("server.key"))?,
            read(&self.path("server.names"))?,
        );
        let (server_chain_pem, server_key_pem) = match stored {
            (Some(c), Some(k), Some(n)) if n.trim() == names_text => (c, k),
            _ => {
                let (c, k) = ca
                    .issue_server(&names)
                    .context("cannot issue the hub's server certificate")?;
                write_atomic(&self.path("server.key"), k.as_bytes(), 0o600)?;
                write_atomic(&self.path("server.pem"), c.as_bytes(), 0o644)?;
                write_atomic(&self.path("server.names"), names_text.as_bytes(), 0o644)?;
                tracing::info!(names = ?names, "issued hub server certificate");
                (c, k)
            }
        };

        let (admin_token, created_admin_token) = match read(&self.path("admin.token"))? {
            Some(t) if !t.trim().is_empty() => (t.trim().to_string(), None),
            _ => {
                let t = random_hex(32);
                write_atomic(&self.path("admin.token"), format!("{t}\n").as_bytes(), 0o600)?;
                (t.clone(), Some(t))
            }
        };
        Ok(Material {
            ca,
            server_chain_pem,
            server_key_pem,
            admin_token,
            created_admin_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_from_urls_and_names() {
        for (input, want) in [
            ("https://hub.example:8443/x", "hub.example"),
            ("hub.example", "hub.example"),
            ("10.0.0.1:443", "10.0.0.1"),
            ("https://[::1]:8443", "::1"),
            ("::1", "::1"),
        ] {
            assert_eq!(host_of(input), want, "{input}");
        }
        assert_eq!(
            server_names(&["https://x:1".into(), "localhost".into()]),
            vec!["127.0.0.1", "localhost", "x"]
        );
    }

    #[test]
    fn second_load_reuses_everything_and_reissues_on_new_names() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let d = DataDir::new(dir.path().join("hub"));
        let first = d.load_or_create(&[])?;
        assert!(first.created_admin_token.is_some());
        let mode = fs::metadata(d.path("admin.token"))?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::metadata(&d.root)?.permissions().mode() & 0o777, 0o700);
        let second = d.load_or_create(&[])?;
        assert!(second.created_admin_token.is_none());
        assert_eq!(second.admin_token, first.admin_token);
        assert_eq!(second.ca.cert_pem, first.ca.cert_pem);
        assert_eq!(second.server_chain_pem, first.server_chain_pem);
        let third = d.load_or_create(&["hub.example".into()])?;
        assert_ne!(third.server_chain_pem, first.server_chain_pem);
        assert_eq!(third.ca.cert_pem, first.ca.cert_pem);
        Ok(())
    }
}
