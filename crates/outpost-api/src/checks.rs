//! Checks of single values that come from outside: image references, label keys and values,
//! text that must reach the operating system intact, and the host paths a workload mounts.
//!
//! Each check returns the reason a value is refused (or risky), for the caller to put next to the
//! field it came from. They are used by the manifest validator ([`crate::parse_file`]), by the
//! CLI before it sends a request, and by the hub for requests that do not come from manifests.

use std::fmt;

use crate::manifest::{Container, PodSpec, Volume};

/// A value refused at the edge: which field, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// The longest image reference accepted (the registry's own limit on a name is 255).
pub const MAX_IMAGE_REF_LEN: usize = 512;

/// Check an image reference against the distribution grammar Docker and registries use:
/// `[host[:port]/]path[:tag][@algorithm:hex]`, where path components are lower-case letters
/// and digits joined by `.`, `_`, `__` or dashes. This refuses what would break a node or a
/// listing: whitespace and control characters, `..` and empty path components, upper case in
/// the path.
pub fn validate_image_ref(r: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("{r:?} is not a valid image reference: {why}"));
    if r.is_empty() {
        return bad("it is empty");
    }
    if r.len() > MAX_IMAGE_REF_LEN {
        return bad(&format!("it is longer than {MAX_IMAGE_REF_LEN} characters"));
    }
    if let Some(c) = r.chars().find(|c| c.is_control() || c.is_whitespace()) {
        return bad(&format!(
            "it contains {c:?}; image references have no spaces or control characters"
        ));
    }
    let (name_tag, digest) = match r.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (r, None),
    };
    if let Some(d) = digest {
        let ok = d.split_once(':').is_some_and(|(alg, hex)| {
            !alg.is_empty()
                && alg.split(['+', '.', '-', '_']).all(|p| {
                    p.starts_with(|c: char| c.is_ascii_alphabetic()) && p.chars().all(|c| c.is_ascii_alphanumeric())
                })
                && hex.len() >= 32
                && hex.chars().all(|c| c.is_ascii_hexdigit())
        });
        if !ok {
            return bad("the digest after '@' must look like sha256:<64 hex digits>");
        }
    }
    let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_tag[last_slash..].rfind(':') {
        Some(i) => (&name_tag[..last_slash + i], Some(&name_tag[last_slash + i + 1..])),
        None => (name_tag, None),
    };
    if let Some(t) = tag {
        let ok = !t.is_empty()
            && t.len() <= 128
            && !t.starts_with(['.', '-'])
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !ok {
            return bad(
                "the tag after ':' must be 1-128 letters, digits, '_', '.' or '-', not starting with '.' or '-'",
            );
        }
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    if parts.len() > 1 {
        let first = parts[0];
        let is_host = (first.contains(['.', ':']) && !first.starts_with('.'))
            || first.starts_with('[')
            || first == "localhost"
            || first.chars().any(|c| c.is_ascii_uppercase());
        if is_host {
            if let Err(why) = check_registry_host(first) {
                return bad(&why);
            }
            parts.remove(0);
        }
    }
    for p in parts {
        if !is_path_component(p) {
            return bad(&format!(
                "path component {p:?} must be lower-case letters and digits, separated by '.', '_', '__' or '-'"
            ));
        }
    }
    if name.len() > 255 {
        return bad("the name is longer than 255 characters");
    }
    Ok(())
}

fn is_path_component(p: &str) -> bool {
    let b = p.as_bytes();
    if b.is_empty() || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            i += 1;
            continue;
        }
        // a separator: '.', '_', "__" or a run of '-', followed by an alphanumeric
        let start = i;
        match c {
            b'.' => i += 1,
            b'_' => i += if b.get(i + 1) == Some(&b'_') { 2 } else { 1 },
            b'-' => {
                while b.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || !b.get(i).is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit()) {
            return false;
        }
    }
    true
}

fn check_registry_host(h: &str) -> Result<(), String> {
    let (host, port) = if let Some(rest) = h.strip_prefix('[') {
        // [IPv6]:port
        let (addr, after) = rest
            .split_once(']')
            .ok_or("an IPv6 registry address needs its closing ']'")?;
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{addr:?} is not an IPv6 address"));
        }
        match after.strip_prefix(':') {
            Some(p) => ("", Some(p)),
            None if after.is_empty() => ("", None),
            None => return Err(format!("unexpected {after:?} after the registry address")),
        }
    } else {
        match h.split_once(':') {
            Some((host, p)) => (host, Some(p)),
            None => (h, None),
        }
    };
    if let Some(p) = port {
        if !matches!(p.parse::<u16>(), Ok(n) if n > 0) {
            return Err(format!("registry port {p:?} is not a port number"));
        }
    }
    if h.starts_with('[') {
        return Ok(());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.is_empty() || !host.split('.').all(label_ok) {
        return Err(format!(
            "registry host {host:?} must be a host name (letters, digits, '-' and '.') or an IP address"
        ));
    }
    Ok(())
}

/// Kubernetes' rule for a label or annotation key: an optional DNS-subdomain prefix and `/`,
/// then a name of 1-63 letters, digits, `-`, `_`, `.`, starting and ending alphanumeric.
pub fn validate_label_key(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        let label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if p.len() > 253 || !p.split('.').all(label) {
            return Err(format!(
                "{k:?} is not a valid label key: the prefix before '/' must be a DNS name like example.com"
            ));
        }
    }
    if name.is_empty() || !is_label_name(name) {
        return Err(format!(
            "{k:?} is not a valid label key: use 1-63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit (optionally after a prefix like example.com/)"
        ));
    }
    Ok(())
}

/// Kubernetes' rule for a label value: empty, or 1-63 letters, digits, `-`, `_`, `.`, starting
/// and ending alphanumeric.
pub fn validate_label_value(v: &str) -> Result<(), String> {
    if v.is_empty() || is_label_name(v) {
        Ok(())
    } else {
        Err(format!(
            "{v:?} is not a valid label value: use at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
        ))
    }
}

fn is_label_name(s: &str) -> bool {
    s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Refuse NUL: the operating system cannot pass it in an argument, a path or the environment.
pub fn no_nul(s: &str) -> Result<(), String> {
    match s.find('\0') {
        Some(i) => Err(format!(
            "contains a NUL byte at position {i}; the operating system cannot pass it to a process"
        )),
        None => Ok(()),
    }
}

/// Refuse every control character (NUL, newline, tab, escape, ...): for names and paths, where
/// they can only be a mistake or an attack on whoever reads the value later.
pub fn no_control(s: &str) -> Result<(), String> {
    match s.char_indices().find(|(_, c)| c.is_control()) {
        Some((i, c)) => Err(format!("contains the control character {c:?} at position {i}")),
        None => Ok(()),
    }
}

/// Normalize an absolute path lexically: no `.`, no `..`, no repeated or trailing `/`.
pub fn normalize_path(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Host paths that hand the host over even when mounted read-only: the container engines'
/// API sockets and the agent's own data (its node key). A path that contains one is as bad.
const SENSITIVE_ALWAYS: &[(&str, &str)] = &[
    (
        "/var/run/docker.sock",
        "the Docker Engine's API socket, which controls the whole host",
    ),
    (
        "/run/docker.sock",
        "the Docker Engine's API socket, which controls the whole host",
    ),
    (
        "/run/containerd/containerd.sock",
        "containerd's API socket, which controls the whole host",
    ),
    (
        "/var/run/containerd/containerd.sock",
        "containerd's API socket, which controls the whole host",
    ),
    (
        "/run/podman/podman.sock",
        "podman's API socket, which controls the whole host",
    ),
    (
        "/var/run/podman/podman.sock",
        "podman's API socket, which controls the whole host",
    ),
    (
        "/var/lib/outpost",
        "the outpost agent's data: the node's private key and desired state",
    ),
];

/// Host paths whose writing takes the host over.
const SENSITIVE_WRITE: &[(&str, &str)] = &[
    ("/etc", "the host's configuration"),
    ("/boot", "the host's kernel and boot loader"),
    ("/root", "root's home directory"),
    ("/usr", "the host's programs"),
    ("/bin", "the host's programs"),
    ("/sbin", "the host's programs"),
    ("/lib", "the host's libraries"),
    ("/lib64", "the host's libraries"),
    ("/proc", "the host's process and kernel settings"),
    ("/sys", "the host's kernel and device settings"),
    ("/dev", "the host's devices"),
    ("/var/lib/docker", "the Docker Engine's storage"),
    ("/var/lib/containerd", "containerd's storage"),
];

/// Why mounting `path` from the host (read-only or not) puts the host at risk, if it does.
pub fn host_path_risk(path: &str, read_only: bool) -> Option<String> {
    let p = normalize_path(path);
    if p == "/" {
        return Some("/ is the host's whole file system".into());
    }
    let within = |base: &str| p == base || p.starts_with(&format!("{base}/"));
    let contains = |inner: &str| inner.starts_with(&format!("{p}/"));
    let lists: &[(&[(&str, &str)], bool)] = &[(SENSITIVE_ALWAYS, true), (SENSITIVE_WRITE, !read_only)];
    for (list, applies) in lists {
        if !applies {
            continue;
        }
        for (base, what) in list.iter() {
            if within(base) {
                return Some(format!("{p} is {what}"));
            }
            if contains(base) {
                return Some(format!("{p} contains {base}, {what}"));
            }
        }
    }
    None
}

/// One container mount of a hostPath volume, with the field paths to name in messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPathMount {
    /// `<at>.containers[i].volumeMounts[j]`
    pub field: String,
    /// `<at>.volumes[k].hostPath.path`
    pub volume_field: String,
    pub container: String,
    pub volume: String,
    pub host_path: String,
    pub mount_path: String,
    pub read_only: bool,
}

impl HostPathMount {
    /// Why this mount puts the host at risk, if it does.
    pub fn risk(&self) -> Option<String> {
        host_path_risk(&self.host_path, self.read_only)
    }
}

impl fmt::Display for HostPathMount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "container {} mounts hostPath {} at {} {}",
            self.container,
            self.host_path,
            self.mount_path,
            if self.read_only { "read-only" } else { "read-write" }
        )
    }
}

/// Every container of a pod with its field path: containers, then init containers.
pub fn all_containers<'a>(at: &'a str, pod: &'a PodSpec) -> impl Iterator<Item = (String, &'a Container)> + 'a {
    pod.containers
        .iter()
        .enumerate()
        .map(move |(i, c)| (format!("{at}.containers[{i}]"), c))
        .chain(
            pod.init_containers
                .iter()
                .enumerate()
                .map(move |(i, c)| (format!("{at}.initContainers[{i}]"), c)),
        )
}

/// What a pod may do to its node beyond an ordinary container: host namespaces, privileged
/// containers, added capabilities. Each entry is (field path, what it grants), for
/// `outpost describe` and the hub's `--privileged deny`.
pub fn privileges(at: &str, pod: &PodSpec) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if pod.host_network {
        out.push((
            format!("{at}.hostNetwork"),
            "shares the node's network namespace".to_string(),
        ));
    }
    if pod.host_pid {
        out.push((
            format!("{at}.hostPID"),
            "sees and can signal every process of the node".to_string(),
        ));
    }
    for (cf, c) in all_containers(at, pod) {
        let Some(sc) = &c.security_context else { continue };
        let f = format!("{cf}.securityContext");
        if sc.privileged == Some(true) {
            out.push((
                format!("{f}.privileged"),
                format!("container {} is privileged (every device, every capability)", c.name),
            ));
        }
        if let Some(caps) = &sc.capabilities {
            if !caps.add.is_empty() {
                out.push((
                    format!("{f}.capabilities.add"),
                    format!("container {} adds capabilities {}", c.name, caps.add.join(", ")),
                ));
            }
        }
    }
    out
}

/// Every container mount of a hostPath volume in a pod spec found at field path `at`.
pub fn host_path_mounts(at: &str, pod: &PodSpec) -> Vec<HostPathMount> {
    let volumes: Vec<(usize, &Volume)> = pod.volumes.iter().enumerate().collect();
    let mut out = Vec::new();
    for (cf, c) in all_containers(at, pod) {
        for (j, m) in c.volume_mounts.iter().enumerate() {
            let Some((k, v)) = volumes.iter().find(|(_, v)| v.name == m.name) else {
                continue;
            };
            let Some(hp) = &v.host_path else { continue };
            out.push(HostPathMount {
                field: format!("{cf}.volumeMounts[{j}]"),
                volume_field: format!("{at}.volumes[{k}].hostPath.path"),
                container: c.name.clone(),
                volume: v.name.clone(),
                host_path: hp.path.clone(),
                mount_path: m.mount_path.clone(),
                read_only: m.read_only,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_refs() {
        for ok in [
            "busybox",
            "busybox:1.36",
            "web:1.0",
            "local/web:1",
            "my-repo/video-analyzer:v2",
            "registry.example.com/edge-inference:2.1",
            "registry.example.com:5000/team/app:v1.2.3",
            "localhost/app",
            "localhost:5000/app:latest",
            "[::1]:5000/app",
            "a__b/c-d--e.f_g",
            "app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "app:1@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "Registry.Example.com/app",
        ] {
            assert_eq!(validate_image_ref(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("app\nevil", "'\\n'"),
            ("app:1\r", "'\\r'"),
            ("app name", "' '"),
            ("app\0", "'\\0'"),
            ("../etc/passwd", "path component \"..\""),
            ("a/../b", "path component \"..\""),
            ("a//b", "path component \"\""),
            ("App", "path component \"App\""),
            ("app:", "the tag"),
            ("app:-x", "the tag"),
            ("app:a/b", "registry port \"a\""),
            ("app@sha256:xyz", "the digest"),
            ("-app", "path component"),
            ("app_", "path component"),
            ("a___b", "path component"),
            ("exa mple.com/app", "' '"),
            ("example.com:0/app", "port"),
            ("example.com:http/app", "port"),
            ("-bad.com/app", "registry host"),
            ("[zz]/app", "IPv6"),
        ] {
            let e = validate_image_ref(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert!(validate_image_ref(&"a".repeat(600))
            .unwrap_err()
            .contains("longer than"));
    }

    #[test]
    fn label_keys_and_values() {
        for ok in [
            "site",
            "kubernetes.io/hostname",
            "node-role.kubernetes.io/edge",
            "a.b_c-d",
            "A1",
        ] {
            assert_eq!(validate_label_key(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "a b",
            "a\nb",
            "Example.com/a",
            "/a",
            "a/",
            &"a".repeat(64),
        ] {
            assert!(validate_label_key(bad).is_err(), "{bad:?}");
        }
        for ok in ["", "store-001", "true", "A.b_c"] {
            assert_eq!(validate_label_value(ok), Ok(()), "{ok}");
        }
        for bad in ["-x", "x\n", "a b", "ü", &"v".repeat(64)] {
            assert!(validate_label_value(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn text() {
        assert!(no_nul("a\nb").is_ok());
        assert!(no_nul("a\0b").unwrap_err().contains("position 1"));
        assert!(no_control("abc").is_ok());
        assert!(no_control("a\tb").unwrap_err().contains("'\\t'"));
    }

    #[test]
    fn host_path_risks() {
        let cases: &[(&str, bool, Option<&str>)] = &[
            ("/", true, Some("/ is the host's whole file system")),
            ("//", true, Some("whole file system")),
            ("/etc/..", true, Some("whole file system")),
            ("/etc", true, None),
            ("/etc", false, Some("/etc is the host's configuration")),
            ("/etc/cron.d/", false, Some("/etc/cron.d is the host's configuration")),
            ("/etcetera", false, None),
            ("/var/run/docker.sock", true, Some("Docker Engine's API socket")),
            ("/run/docker.sock", false, Some("Docker Engine's API socket")),
            ("/var/run", true, Some("/var/run contains /var/run/docker.sock")),
            ("/var", true, Some("contains /var/run/docker.sock")),
            ("/var/lib/outpost/agent", true, Some("node's private key")),
            ("/var/lib", false, Some("contains /var/lib/outpost")),
            ("/var/lib/kubeedge/edge_cached_data", false, None),
            ("/mnt/videos", false, None),
            ("/proc", true, None),
            ("/proc", false, Some("process and kernel settings")),
            ("/var/lib/docker/volumes", false, Some("Docker Engine's storage")),
        ];
        for (path, ro, want) in cases {
            let got = host_path_risk(path, *ro);
            match (want, &got) {
                (None, None) => {}
                (Some(w), Some(g)) if g.contains(w) => {}
                _ => panic!("{path} ro={ro}: got {got:?}, want {want:?}"),
            }
        }
    }
}
