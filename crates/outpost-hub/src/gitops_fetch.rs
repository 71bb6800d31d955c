//! Reading a GitRepo's commit: the hub runs the `git` binary against a bare cache repository
//! under `<data-dir>/gitops/`, then reads the tree of the fetched commit into memory (the
//! Kustomize engine's `MemFs`). Only the hub does this: edge boxes never see Git.
//!
//! Why `git` and not the `gix` crate: gix spawns `git` for `file://` remotes anyway, needs its
//! own reqwest transport for smart HTTP, and would add several MiB and minutes of build to the
//! one binary that also ships to edge boxes, for code only the hub runs. `git` speaks every
//! protocol and credential form Git hosts accept; the hub needs it installed (docs/gitops.md).
//!
//! Must never: put credentials on a command line (they go through `GIT_CONFIG_*` environment
//! variables), read a tree larger than [`MAX_TREE_BYTES`], or wait on a remote longer than
//! [`FETCH_TIMEOUT`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// A fetch (and the tree read) gives up after this long.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(60);
/// The most bytes of files read from one commit's tree.
pub const MAX_TREE_BYTES: u64 = 64 << 20;
/// The most files read from one commit's tree.
pub const MAX_TREE_FILES: usize = 20_000;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot run git ({0}); install git on the hub (Debian: apt-get install git)")]
    NoGit(String),
    #[error("fetching {url} ({git_ref}) failed: {detail}")]
    Fetch {
        url: String,
        git_ref: String,
        detail: String,
    },
    #[error("{url} has no {git_ref}; check spec.branch / spec.tag")]
    NoRef { url: String, git_ref: String },
    #[error("commit {0} is not in the hub's copy of the repository; fetch it first (`outpost gitops sync`)")]
    NoCommit(String),
    #[error("the tree at {commit} under {path:?} is larger than the hub reads ({limit}); keep the repository's path to manifests")]
    TooLarge {
        commit: String,
        path: String,
        limit: String,
    },
    #[error("git {what} timed out after {}s", FETCH_TIMEOUT.as_secs())]
    Timeout { what: &'static str },
    #[error("reading the hub's copy of the repository failed: {0}")]
    Local(String),
}

/// Credentials for an https remote, sent as HTTP basic auth.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, ***)", self.username)
    }
}

/// One commit's files under the GitRepo's path, relative to it.
#[derive(Clone, Debug, Default)]
pub struct Tree {
    pub commit: String,
    pub files: BTreeMap<String, Vec<u8>>,
}

impl Tree {
    /// Names of the directories directly below `dir` that hold a kustomization file.
    pub fn kustomization_dirs_below(&self, dir: &str) -> std::collections::BTreeSet<String> {
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        self.files
            .keys()
            .filter_map(|p| p.strip_prefix(&prefix))
            .filter_map(|rest| {
                let (sub, file) = rest.split_once('/')?;
                matches!(file, "kustomization.yaml" | "kustomization.yml" | "Kustomization").then(|| sub.to_string())
            })
            .collect()
    }

    pub fn mem_fs(&self) -> outpost_kustomize::MemFs {
        let mut fs = outpost_kustomize::MemFs::new();
        for (p, c) in &self.files {
            fs.insert(p, c.clone());
        }
        fs
    }
}

fn git(dir: &Path) -> Command {
    let mut c = Command::new("git");
    c.arg("-C")
        .arg(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_ASKPASS", "/bin/true")
        .env_remove("GIT_DIR")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

async fn run(mut c: Command, what: &'static str) -> Result<std::process::Output, FetchError> {
    let out = tokio::time::timeout(FETCH_TIMEOUT, c.output())
        .await
        .map_err(|_| FetchError::Timeout { what })?
        .map_err(|e| FetchError::NoGit(e.to_string()))?;
    Ok(out)
}

/// The last lines git printed, without anything that looks like a credential.
fn git_message(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.to_ascii_lowercase().contains("authorization"))
        .collect();
    let tail = &lines[lines.len().saturating_sub(3)..];
    if tail.is_empty() {
        "git failed without a message".into()
    } else {
        tail.join("; ")
    }
}

/// The cache repository of a GitRepo.
pub fn cache_dir(root: &Path, namespace: &str, name: &str) -> PathBuf {
    root.join(format!("{namespace}--{name}.git"))
}

/// Fetch `git_ref` of `url` into the cache repository; returns the commit it points at.
pub async fn fetch(dir: &Path, url: &str, git_ref: &str, creds: Option<&Credentials>) -> Result<String, FetchError> {
    if !dir.join("HEAD").exists() {
        std::fs::create_dir_all(dir).map_err(|e| FetchError::Local(format!("{}: {e}", dir.display())))?;
        let mut c = git(dir);
        c.args(["init", "--bare", "-q"]);
        let out = run(c, "init").await?;
        if !out.status.success() {
            return Err(FetchError::Local(git_message(&out.stderr)));
        }
    }
    let mut c = git(dir);
    let mut n = 0;
    let mut cfg = |c: &mut Command, k: &str, v: &str| {
        c.env(format!("GIT_CONFIG_KEY_{n}"), k)
            .env(format!("GIT_CONFIG_VALUE_{n}"), v);
        n += 1;
    };
    cfg(&mut c, "http.lowSpeedLimit", "1000");
    cfg(&mut c, "http.lowSpeedTime", "30");
    if let Some(cr) = creds {
        use base64::Engine;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", cr.username, cr.password));
        cfg(&mut c, "http.extraHeader", &format!("Authorization: Basic {basic}"));
    }
    c.env("GIT_CONFIG_COUNT", n.to_string());
    c.args(["fetch", "-q", "--no-tags", "--force", "--no-write-fetch-head", "--"])
        .arg(url)
        .arg(format!("+{git_ref}:refs/outpost/fetched"));
    let out = run(c, "fetch").await?;
    if !out.status.success() {
        let detail = git_message(&out.stderr);
        if detail.contains("couldn't find remote ref") {
            return Err(FetchError::NoRef {
                url: url.into(),
                git_ref: git_ref.into(),
            });
        }
        return Err(FetchError::Fetch {
            url: url.into(),
            git_ref: git_ref.into(),
            detail,
        });
    }
    resolve(dir, "refs/outpost/fetched").await
}

/// The full commit id `rev` names in the cache repository.
pub async fn resolve(dir: &Path, rev: &str) -> Result<String, FetchError> {
    let mut c = git(dir);
    c.args(["rev-parse", "--verify", "-q", "--end-of-options"])
        .arg(format!("{rev}^{{commit}}"));
    let out = run(c, "rev-parse").await?;
    if !out.status.success() {
        return Err(FetchError::NoCommit(rev.into()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Read the files under `path` at `commit` (paths relative to `path`). Symbolic links and
/// submodules are left out.
pub async fn read_tree(dir: &Path, commit: &str, path: &str) -> Result<Tree, FetchError> {
    let path = path.trim_matches('/');
    let mut c = git(dir);
    c.args(["ls-tree", "-r", "-z", "-l", "--full-tree", commit]);
    if !path.is_empty() {
        c.arg("--").arg(path);
    }
    let out = run(c, "ls-tree").await?;
    if !out.status.success() {
        return Err(FetchError::NoCommit(commit.into()));
    }
    let mut wanted: Vec<(String, String)> = Vec::new();
    let mut total = 0u64;
    for entry in out.stdout.split(|b| *b == 0).filter(|e| !e.is_empty()) {
        let entry = String::from_utf8_lossy(entry);
        let Some((info, name)) = entry.split_once('\t') else {
            continue;
        };
        let f: Vec<&str> = info.split_whitespace().collect();
        if f.len() < 4 || f[1] != "blob" || f[0] == "120000" {
            continue;
        }
        total += f[3].parse::<u64>().unwrap_or(0);
        let rel = if path.is_empty() {
            name.to_string()
        } else {
            match name.strip_prefix(path).and_then(|r| r.strip_prefix('/')) {
                Some(r) => r.to_string(),
                None => continue,
            }
        };
        wanted.push((f[2].to_string(), rel));
    }
    if total > MAX_TREE_BYTES || wanted.len() > MAX_TREE_FILES {
        return Err(FetchError::TooLarge {
            commit: commit.into(),
            path: path.into(),
            limit: format!("{} MiB, {MAX_TREE_FILES} files", MAX_TREE_BYTES >> 20),
        });
    }
    let mut c = git(dir);
    c.args(["cat-file", "--batch"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = c.spawn().map_err(|e| FetchError::NoGit(e.to_string()))?;
    let mut stdin = child.stdin.take().ok_or_else(|| FetchError::Local("no stdin".into()))?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| FetchError::Local("no stdout".into()))?;
    let ids: String = wanted.iter().map(|(oid, _)| format!("{oid}\n")).collect();
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(ids.as_bytes()).await;
    });
    let mut buf = Vec::new();
    tokio::time::timeout(FETCH_TIMEOUT, stdout.read_to_end(&mut buf))
        .await
        .map_err(|_| FetchError::Timeout { what: "cat-file" })?
        .map_err(|e| FetchError::Local(e.to_string()))?;
    let _ = writer.await;
    let _ = child.wait().await;
    let mut files = BTreeMap::new();
    let mut at = 0usize;
    for (_, rel) in &wanted {
        let nl = buf[at..]
            .iter()
            .position(|b| *b == b'\n')
            .ok_or_else(|| FetchError::Local("short answer from git cat-file".into()))?;
        let header = String::from_utf8_lossy(&buf[at..at + nl]).to_string();
        let size: usize = header
            .split_whitespace()
            .nth(2)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| FetchError::Local(format!("unexpected git cat-file header {header:?}")))?;
        let start = at + nl + 1;
        let end = start + size;
        if end > buf.len() {
            return Err(FetchError::Local("short answer from git cat-file".into()));
        }
        files.insert(rel.clone(), buf[start..end].to_vec());
        at = end + 1;
    }
    Ok(Tree {
        commit: commit.into(),
        files,
    })
}
