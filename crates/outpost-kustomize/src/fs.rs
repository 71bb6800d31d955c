//! The one door to the outside: reading a tree of files. Paths are `/`-separated and
//! normalised lexically (`a/./b/../c` is `a/c`), so a Git tree in memory and a directory on
//! disk look the same to the engine.

use std::collections::BTreeMap;
use std::io;

/// Read access to a tree of files.
pub trait Fs {
    /// The bytes of the file at `path`.
    fn read(&self, path: &str) -> io::Result<Vec<u8>>;
    /// Whether `path` names a directory.
    fn is_dir(&self, path: &str) -> bool;
    /// Whether `path` names a regular file.
    fn is_file(&self, path: &str) -> bool;
}

/// The real filesystem, paths taken as they are.
#[derive(Debug, Default, Clone, Copy)]
pub struct DiskFs;

impl Fs for DiskFs {
    fn read(&self, path: &str) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }
    fn is_dir(&self, path: &str) -> bool {
        std::path::Path::new(path).is_dir()
    }
    fn is_file(&self, path: &str) -> bool {
        std::path::Path::new(path).is_file()
    }
}

/// A tree held in memory (tests, Git trees): file path -> content. Directories are implied
/// by the files below them.
#[derive(Debug, Default, Clone)]
pub struct MemFs {
    files: BTreeMap<String, Vec<u8>>,
}

impl MemFs {
    pub fn new() -> Self {
        Self::default()
    }
    /// Add (or replace) a file.
    pub fn insert(&mut self, path: &str, content: impl Into<Vec<u8>>) -> &mut Self {
        self.files.insert(normalize(path), content.into());
        self
    }
}

impl Fs for MemFs {
    fn read(&self, path: &str) -> io::Result<Vec<u8>> {
        self.files
            .get(&normalize(path))
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such file"))
    }
    fn is_dir(&self, path: &str) -> bool {
        let p = normalize(path);
        let prefix = if p.is_empty() || p == "/" {
            p.clone()
        } else {
            format!("{p}/")
        };
        self.files
            .range(prefix.clone()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(&prefix))
    }
    fn is_file(&self, path: &str) -> bool {
        self.files.contains_key(&normalize(path))
    }
}

/// Lexical normalisation: drops `.` and empty segments, resolves `..` against what precedes
/// it (a leading `..` of a relative path stays).
pub fn normalize(path: &str) -> String {
    let absolute = path.starts_with('/');
    let mut out: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if matches!(out.last(), Some(s) if *s != "..") {
                    out.pop();
                } else if !absolute {
                    out.push("..");
                }
            }
            s => out.push(s),
        }
    }
    let joined = out.join("/");
    match (absolute, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".into(),
        (false, false) => joined,
    }
}

/// `base` joined with the relative (or absolute) `rel`, normalised.
pub fn join(base: &str, rel: &str) -> String {
    if rel.starts_with('/') {
        normalize(rel)
    } else {
        normalize(&format!("{base}/{rel}"))
    }
}

/// Whether `path` is `dir` or below it (both normalised).
pub fn is_within(dir: &str, path: &str) -> bool {
    dir == "." && !path.starts_with("..") && !path.starts_with('/')
        || path == dir
        || path.starts_with(&format!("{}/", dir.trim_end_matches('/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_table() {
        for (input, want) in [
            ("a/./b/../c", "a/c"),
            ("../../base", "../../base"),
            ("overlays/x/../../base", "base"),
            ("/r/overlays/x/../../base", "/r/base"),
            ("/..", "/"),
            ("", "."),
            ("a/..", "."),
        ] {
            assert_eq!(normalize(input), want, "{input}");
        }
        assert!(is_within("/r/a", "/r/a/b.yaml"));
        assert!(!is_within("/r/a", "/r/ab.yaml"));
        assert!(!is_within("/r/a", "/r/b.yaml"));
        assert!(is_within(".", "x.yaml"));
        assert!(!is_within(".", "../x.yaml"));
    }

    #[test]
    fn memfs_dirs() {
        let mut fs = MemFs::new();
        fs.insert("repo/base/kustomization.yaml", "x");
        assert!(fs.is_dir("repo/base"));
        assert!(fs.is_dir("repo"));
        assert!(!fs.is_dir("repo/bas"));
        assert!(fs.is_file("repo/./base/kustomization.yaml"));
    }
}
