//! The hub's data directory: CA, server certificate, admin token. Every write goes to a temp
//! file, is fsynced, renamed over the target, and the directory is fsynced, so a crash leaves
//! either the old or the new file, never a torn one.
//!
//! Layout: `ca.pem`, `ca.key` (0600: the CA key as PEM, or sealed under the CA secret, see
//! below), `server.pem` (chain), `server.key` (0600),
//! `server.names` (the names the server certificate was issued for, one a line),
//! `admin.token` (0600), `hub.db` (SQLite).
//!
//! The CA key at rest: with a CA secret (`OUTPOST_CA_KEY_SECRET`, or `--ca-secret-file`),
//! `ca.key` holds the key sealed under it (`outpost_pki::sealed`: Argon2id, ChaCha20-Poly1305),
//! never the PEM. A plain `ca.key` from an install without a secret is read as before, and
//! sealed on the first start that has one. A sealed key without the secret, or with another
//! one, stops the hub with a message saying what to set. `outpost hub ca-secret rotate`
//! ([`DataDir::rotate_ca_secret`]) re-seals it under a new secret (docs/security.md).

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

/// The environment variable that holds the CA secret.
pub const CA_SECRET_ENV: &str = "OUTPOST_CA_KEY_SECRET";

/// The CA secret: the file's content (`--ca-secret-file`, trailing newline dropped) when a file
/// is given, else `OUTPOST_CA_KEY_SECRET` when set and not empty, else none.
pub fn ca_secret(file: Option<&Path>) -> anyhow::Result<Option<Vec<u8>>> {
    if let Some(f) = file {
        let text = fs::read_to_string(f)
            .with_context(|| format!("cannot read the CA secret file {} (--ca-secret-file)", f.display()))?;
        let s = text.trim_end_matches(['\n', '\r']);
        if s.is_empty() {
            bail!(
                "the CA secret file {} is empty; put the secret in it (e.g. `openssl rand -hex 32 > {}`)",
                f.display(),
                f.display()
            );
        }
        return Ok(Some(s.as_bytes().to_vec()));
    }
    Ok(std::env::var(CA_SECRET_ENV)
        .ok()
        .filter(|s| !s.is_empty())
        .map(String::into_bytes))
}

/// What [`DataDir::rotate_ca_secret`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rotated {
    /// The key was sealed under the old secret and is now sealed under the new one.
    Resealed,
    /// The key was plain PEM and is now sealed.
    Sealed,
}

/// What the hub loads from its data directory at start.
pub struct Material {
    pub ca: CaMaterial,
    pub server_chain_pem: String,
    pub server_key_pem: String,
    /// The admin token; empty on a replica that did not create it (PostgreSQL: only the
    /// replica that created it has the plaintext, in its data dir).
    pub admin_token: String,
    /// SHA-256 of the admin token (what requests are checked against).
    pub admin_token_sha256: [u8; 32],
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

    /// The CA key from what `ca.key` holds: open a sealed one with `secret`; seal a plain one
    /// when there is a secret (an install from before secrets, upgraded in place).
    pub(crate) fn ca_key(&self, stored: &str, secret: Option<&[u8]>) -> anyhow::Result<String> {
        let path = self.path("ca.key");
        if outpost_pki::sealed::is_sealed(stored) {
            let Some(s) = secret else {
                bail!(
                    "the CA key is encrypted; set {CA_SECRET_ENV} or --ca-secret-file to the secret it was encrypted with ({})",
                    path.display()
                );
            };
            return outpost_pki::sealed::open(stored, s).map_err(|e| match e {
                outpost_pki::sealed::SealError::WrongSecret => anyhow::anyhow!(
                    "the CA key is encrypted and the secret given ({CA_SECRET_ENV} or --ca-secret-file) does not open it ({}); \
                     give the secret it was encrypted with (after `outpost hub ca-secret rotate`, the new one)",
                    path.display()
                ),
                other => anyhow::anyhow!("{}: {other}; restore ca.key from a backup", path.display()),
            });
        }
        if let Some(s) = secret {
            let sealed = outpost_pki::sealed::seal(stored, s).context("cannot seal the CA key")?;
            write_atomic(&path, sealed.as_bytes(), 0o600)?;
            tracing::info!(path = %path.display(), "the CA key was stored in plain text; it is now encrypted under the CA secret");
        }
        Ok(stored.to_string())
    }

    /// Re-seal the CA key under `new`: a sealed key is opened with `old` first; a plain one is
    /// sealed. The file is replaced atomically (a crash leaves the old or the new envelope).
    /// Running hubs keep the key they loaded; restart each with the new secret.
    pub fn rotate_ca_secret(&self, old: Option<&[u8]>, new: &[u8]) -> anyhow::Result<Rotated> {
        let path = self.path("ca.key");
        let stored = read(&path)?.with_context(|| {
            format!(
                "{} does not exist; is {} a hub data directory (--data-dir)?",
                path.display(),
                self.root.display()
            )
        })?;
        let was_sealed = outpost_pki::sealed::is_sealed(&stored);
        let plain = self.ca_key(&stored, if was_sealed { old } else { None })?;
        let sealed = outpost_pki::sealed::seal(&plain, new).map_err(|e| anyhow::anyhow!("the new secret: {e}"))?;
        write_atomic(&path, sealed.as_bytes(), 0o600)?;
        Ok(if was_sealed { Rotated::Resealed } else { Rotated::Sealed })
    }

    /// Create the directory (0700) if missing.
    pub fn prepare(&self) -> anyhow::Result<()> {
        fs::create_dir_all(&self.root).with_context(|| format!("cannot create data dir {}", self.root.display()))?;
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot set mode 0700 on {}", self.root.display()))
    }

    /// The CA this data dir holds (`ca.pem`, `ca.key` opened with `secret`), if any.
    pub fn existing_ca(&self, secret: Option<&[u8]>) -> anyhow::Result<Option<CaMaterial>> {
        match (read(&self.path("ca.pem"))?, read(&self.path("ca.key"))?) {
            (Some(cert_pem), Some(stored)) => Ok(Some(CaMaterial {
                cert_pem,
                key_pem: self.ca_key(&stored, secret)?,
            })),
            _ => Ok(None),
        }
    }

    /// The admin token in `admin.token`, if any.
    pub fn existing_admin_token(&self) -> anyhow::Result<Option<String>> {
        Ok(read(&self.path("admin.token"))?
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty()))
    }

    /// Write a new admin token to `admin.token` (0600).
    pub fn write_admin_token(&self, t: &str) -> anyhow::Result<()> {
        write_atomic(&self.path("admin.token"), format!("{t}\n").as_bytes(), 0o600)
    }

    /// Create the directory (0700) and load or create the CA, server certificate and admin token.
    pub fn load_or_create(&self, advertise: &[String], secret: Option<&[u8]>) -> anyhow::Result<Material> {
        self.prepare()?;
        let ca = match (read(&self.path("ca.pem"))?, read(&self.path("ca.key"))?) {
            (Some(cert_pem), Some(stored)) => CaMaterial {
                cert_pem,
                key_pem: self.ca_key(&stored, secret)?,
            },
            (None, None) => {
                let ca = CaMaterial::generate("hub").context("cannot generate the hub CA")?;
                let at_rest = match secret {
                    Some(s) => outpost_pki::sealed::seal(&ca.key_pem, s).context("cannot seal the CA key")?,
                    None => ca.key_pem.clone(),
                };
                write_atomic(&self.path("ca.key"), at_rest.as_bytes(), 0o600)?;
                write_atomic(&self.path("ca.pem"), ca.cert_pem.as_bytes(), 0o644)?;
                tracing::info!(dir = %self.root.display(), "created hub CA");
                ca
            }
            _ => bail!(
                "{} has only one of ca.pem and ca.key; restore the missing file from a backup (a new CA would lock out every joined node)",
                self.root.display()
            ),
        };
        let (server_chain_pem, server_key_pem) = self.server_cert(&ca, advertise)?;
        let (admin_token, created_admin_token) = match self.existing_admin_token()? {
            Some(t) => (t, None),
            None => {
                let t = random_hex(32);
                self.write_admin_token(&t)?;
                (t.clone(), Some(t))
            }
        };
        Ok(Material {
            ca,
            server_chain_pem,
            server_key_pem,
            admin_token_sha256: crate::service::sha256(&admin_token),
            admin_token,
            created_admin_token,
        })
    }

    /// The server certificate for `advertise`, issued by `ca`: the stored one while it was
    /// issued for these names by this CA, else a new one.
    pub fn server_cert(&self, ca: &CaMaterial, advertise: &[String]) -> anyhow::Result<(String, String)> {
        let fp = ca
            .fingerprint()
            .context("the CA certificate is not valid; restore it from a backup")?;
        let names = server_names(advertise);
        // The CA's fingerprint is recorded too: a certificate from another CA is re-issued.
        let names_text = format!("{}\nca {fp}", names.join("\n"));
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
        Ok((server_chain_pem, server_key_pem))
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
        let first = d.load_or_create(&[], None)?;
        assert!(first.created_admin_token.is_some());
        let mode = fs::metadata(d.path("admin.token"))?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::metadata(&d.root)?.permissions().mode() & 0o777, 0o700);
        let second = d.load_or_create(&[], None)?;
        assert!(second.created_admin_token.is_none());
        assert_eq!(second.admin_token, first.admin_token);
        assert_eq!(second.ca.cert_pem, first.ca.cert_pem);
        assert_eq!(second.server_chain_pem, first.server_chain_pem);
        let third = d.load_or_create(&["hub.example".into()], None)?;
        assert_ne!(third.server_chain_pem, first.server_chain_pem);
        assert_eq!(third.ca.cert_pem, first.ca.cert_pem);
        Ok(())
    }

    fn on_disk(d: &DataDir) -> String {
        fs::read_to_string(d.path("ca.key")).unwrap()
    }

    #[test]
    fn with_a_secret_the_ca_key_is_sealed_at_rest_and_opens_only_with_it() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let d = DataDir::new(dir.path().join("hub"));
        let first = d.load_or_create(&[], Some(b"one"))?;
        let stored = on_disk(&d);
        assert!(!stored.contains("PRIVATE KEY"), "the PEM is on disk: {stored}");
        assert!(outpost_pki::sealed::is_sealed(&stored));
        assert_eq!(fs::metadata(d.path("ca.key"))?.permissions().mode() & 0o777, 0o600);
        let again = d.load_or_create(&[], Some(b"one"))?;
        assert_eq!(again.ca.key_pem, first.ca.key_pem);
        assert_eq!(on_disk(&d), stored, "a start with the right secret rewrites nothing");
        let missing = format!("{:#}", d.load_or_create(&[], None).err().unwrap());
        assert!(
            missing.contains("the CA key is encrypted; set OUTPOST_CA_KEY_SECRET or --ca-secret-file"),
            "{missing}"
        );
        let wrong = format!("{:#}", d.load_or_create(&[], Some(b"two")).err().unwrap());
        assert!(wrong.contains("does not open it"), "{wrong}");
        assert_eq!(on_disk(&d), stored, "refusals change nothing");
        Ok(())
    }

    #[test]
    fn a_plain_install_is_sealed_on_the_first_start_with_a_secret() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let d = DataDir::new(dir.path().join("hub"));
        let plain = d.load_or_create(&[], None)?;
        assert!(on_disk(&d).contains("PRIVATE KEY"), "no secret: stored as before");
        let upgraded = d.load_or_create(&[], Some(b"s"))?;
        assert_eq!(upgraded.ca.key_pem, plain.ca.key_pem);
        assert_eq!(upgraded.ca.cert_pem, plain.ca.cert_pem);
        assert!(outpost_pki::sealed::is_sealed(&on_disk(&d)));
        assert!(d.load_or_create(&[], None).is_err());
        Ok(())
    }

    #[test]
    fn rotation_reseals_under_the_new_secret_and_needs_the_old_one() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let d = DataDir::new(dir.path().join("hub"));
        let first = d.load_or_create(&[], Some(b"old"))?;
        let before = on_disk(&d);
        let e = format!("{:#}", d.rotate_ca_secret(Some(b"nope"), b"new").err().unwrap());
        assert!(e.contains("does not open it"), "{e}");
        let e = format!("{:#}", d.rotate_ca_secret(None, b"new").err().unwrap());
        assert!(e.contains("the CA key is encrypted"), "{e}");
        let e = format!("{:#}", d.rotate_ca_secret(Some(b"old"), b"").err().unwrap());
        assert!(e.contains("empty"), "{e}");
        assert_eq!(on_disk(&d), before, "failed rotations change nothing");
        assert_eq!(d.rotate_ca_secret(Some(b"old"), b"new")?, Rotated::Resealed);
        assert!(d.load_or_create(&[], Some(b"old")).is_err());
        assert_eq!(d.load_or_create(&[], Some(b"new"))?.ca.key_pem, first.ca.key_pem);
        // a plain install is sealed by a rotation too
        let dir2 = tempfile::tempdir()?;
        let p = DataDir::new(dir2.path().join("hub"));
        let plain = p.load_or_create(&[], None)?;
        assert_eq!(p.rotate_ca_secret(None, b"first")?, Rotated::Sealed);
        assert_eq!(p.load_or_create(&[], Some(b"first"))?.ca.key_pem, plain.ca.key_pem);
        Ok(())
    }
}
