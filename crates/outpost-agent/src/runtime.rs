//! The process runtime: runs a container of a `runtimeClassName: process` workload as a native
//! process under the agent's supervision.
//!
//! Every process is started in a new session (so it leads its own process group and the
//! agent's terminal signals never reach it) with these variables in its environment:
//! `OUTPOST_AGENT_ID` (this agent's data dir, hashed), `OUTPOST_UNIT` and `OUTPOST_UNIT_HASH`.
//! **Children survive an agent restart and are re-adopted**: at start the agent scans `/proc`
//! for group leaders carrying its agent id ([`scan_owned`]) and adopts the one that matches the
//! desired spec of its unit; duplicates and stale ones are killed. Because ownership is read
//! from the processes themselves, a `kill -9` of the agent between spawning a process and
//! recording anything cannot lose track of it, and nothing ever runs twice.
//!
//! stdout and stderr go straight to `<data-dir>/workloads/<workload>/<container>.log`
//! (O_APPEND), so a process never depends on the agent being alive to write its output.
//! Volumes: hostPath as is; configMap/secret files and emptyDir under the workload's dir. When
//! the agent runs as root, each process gets a private mount namespace with the volumes
//! bind-mounted at their `mountPath`; `OUTPOST_VOLUME_<NAME>` always holds the host path.
//! Limits: `memory` and `cpu` are applied through a cgroup (v2, or v1 memory+cpu) per unit.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use outpost_api::{ContainerSpec, VolumeSource, WorkloadSpec};

pub const ENV_AGENT: &str = "OUTPOST_AGENT_ID";
pub const ENV_UNIT: &str = "OUTPOST_UNIT";
pub const ENV_HASH: &str = "OUTPOST_UNIT_HASH";

/// A process found in `/proc` that this agent started.
#[derive(Clone, Debug, PartialEq)]
pub struct Owned {
    pub pid: u32,
    pub unit: String,
    pub hash: String,
    /// Start time in clock ticks since boot (field 22 of /proc/PID/stat): with the pid, it
    /// identifies the process across pid reuse.
    pub start_ticks: u64,
}

/// `(pgid, state, start_ticks)` from /proc/PID/stat.
fn stat(pid: u32) -> Option<(u32, char, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // rest starts at field 3 (state): index 0 = state, 2 = pgrp, 19 = starttime
    Some((
        f.get(2)?.parse().ok()?,
        f.first()?.chars().next()?,
        f.get(19)?.parse().ok()?,
    ))
}

/// Is the process still the one we know (alive, not a zombie, same start time)?
pub fn alive(pid: u32, start_ticks: u64) -> bool {
    matches!(stat(pid), Some((_, state, st)) if st == start_ticks && state != 'Z' && state != 'X')
}

pub fn start_ticks(pid: u32) -> Option<u64> {
    stat(pid).map(|(_, _, t)| t)
}

/// Every live process-group leader whose environment carries `agent_id`.
pub fn scan_owned(agent_id: &str) -> Vec<Owned> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    let needle = format!("{ENV_AGENT}={agent_id}");
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
        if !vars.contains(&needle.as_bytes()) {
            continue;
        }
        let get = |k: &str| {
            let prefix = format!("{k}=");
            vars.iter()
                .find_map(|v| v.strip_prefix(prefix.as_bytes()))
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let Some((pgid, state, start)) = stat(pid) else {
            continue;
        };
        if pgid != pid || state == 'Z' || state == 'X' {
            continue;
        }
        if let (Some(unit), Some(hash)) = (get(ENV_UNIT), get(ENV_HASH)) {
            out.push(Owned {
                pid,
                unit,
                hash,
                start_ticks: start,
            });
        }
    }
    out.sort_by_key(|o| (o.unit.clone(), o.start_ticks, o.pid));
    out
}

/// Send a signal to a unit's whole process group.
pub fn signal_group(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), sig);
}

/// File-system name for a workload key (`deployment/default/web` -> `deployment_default_web`).
pub fn dir_name(key: &str) -> String {
    key.replace('/', "_")
}

pub struct Runtime {
    pub data_dir: PathBuf,
    pub agent_id: String,
    pub node: String,
    cgroups: Cgroups,
}

impl Runtime {
    pub fn new(data_dir: &Path, node: &str) -> Self {
        let canonical = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
        let agent_id = outpost_api::content_hash(&canonical.display().to_string());
        let cgroups = Cgroups::detect(&agent_id);
        Self {
            data_dir: data_dir.to_path_buf(),
            agent_id,
            node: node.to_string(),
            cgroups,
        }
    }

    pub fn workload_dir(&self, key: &str) -> PathBuf {
        self.data_dir.join("workloads").join(dir_name(key))
    }

    /// A PersistentVolumeClaim's directory on this node: outside every workload's directory, so
    /// it outlives revisions, restarts and reboots (the local-path provisioner's model).
    pub fn claim_dir(&self, namespace: &str, claim: &str) -> PathBuf {
        self.data_dir.join("volumes").join(namespace).join(claim)
    }

    pub fn log_path(&self, key: &str, container: &str) -> PathBuf {
        self.workload_dir(key).join(format!("{container}.log"))
    }

    /// Create the workload's volumes on the host; returns volume name -> host path.
    pub fn prepare_volumes(&self, w: &WorkloadSpec) -> Result<BTreeMap<String, PathBuf>, String> {
        let mut out = BTreeMap::new();
        for v in &w.volumes {
            let path = match &v.source {
                VolumeSource::HostPath {
                    path,
                    create,
                    host_type,
                } => {
                    let p = PathBuf::from(path);
                    if let Some(why) = host_type_mismatch(&p, host_type) {
                        return Err(format!("volume {}: hostPath {path} {why}", v.name));
                    }
                    if !matches!(host_type.as_str(), "" | "Directory" | "DirectoryOrCreate") {
                        // files, sockets and devices are mounted as they are
                    } else if *create {
                        std::fs::create_dir_all(&p)
                            .map_err(|e| format!("volume {}: cannot create {path}: {e}", v.name))?;
                    } else if !p.exists() {
                        // Kubernetes' default hostPath type creates nothing; a missing path is an error
                        // only for type Directory. Create the directory so the bind mount has a source.
                        std::fs::create_dir_all(&p).map_err(|e| {
                            format!("volume {}: {path} does not exist and cannot be created: {e}", v.name)
                        })?;
                    }
                    p
                }
                VolumeSource::Files { files, secret, mode } => {
                    let dir = self.workload_dir(&w.key).join("volumes").join(&v.name);
                    std::fs::create_dir_all(&dir).map_err(|e| format!("volume {}: {e}", v.name))?;
                    let mode = mode.unwrap_or(if *secret { 0o600 } else { 0o644 });
                    for (name, b64) in files {
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(b64)
                            .map_err(|e| format!("volume {} file {name}: {e}", v.name))?;
                        crate::identity::write_atomic(&dir.join(name), &bytes, mode)
                            .map_err(|e| format!("volume {} file {name}: {e}", v.name))?;
                    }
                    // drop files no longer in the ConfigMap/Secret
                    if let Ok(rd) = std::fs::read_dir(&dir) {
                        for e in rd.flatten() {
                            let n = e.file_name().to_string_lossy().into_owned();
                            if !files.contains_key(&n) && !n.starts_with('.') {
                                let _ = std::fs::remove_file(e.path());
                            }
                        }
                    }
                    dir
                }
                VolumeSource::EmptyDir => {
                    let dir = self.workload_dir(&w.key).join("volumes").join(&v.name);
                    std::fs::create_dir_all(&dir).map_err(|e| format!("volume {}: {e}", v.name))?;
                    dir
                }
                VolumeSource::Claim { namespace, claim } => {
                    let dir = self.claim_dir(namespace, claim);
                    std::fs::create_dir_all(&dir).map_err(|e| {
                        format!(
                            "volume {}: claim {namespace}/{claim}: cannot create {}: {e}",
                            v.name,
                            dir.display()
                        )
                    })?;
                    dir
                }
            };
            out.insert(v.name.clone(), path);
        }
        Ok(out)
    }

    /// Where each volume lives on the host.
    fn volume_paths(&self, w: &WorkloadSpec) -> BTreeMap<String, PathBuf> {
        w.volumes
            .iter()
            .map(|v| {
                let p = match &v.source {
                    VolumeSource::HostPath { path, .. } => PathBuf::from(path),
                    VolumeSource::Claim { namespace, claim } => self.claim_dir(namespace, claim),
                    _ => self.workload_dir(&w.key).join("volumes").join(&v.name),
                };
                (v.name.clone(), p)
            })
            .collect()
    }

    /// The environment of a container's process: a clean base, the spec's variables, and the
    /// `OUTPOST_*` variables that let the agent find the process again.
    fn process_env(
        &self,
        w: &WorkloadSpec,
        c: &ContainerSpec,
        unit: &str,
        volumes: &BTreeMap<String, PathBuf>,
    ) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
            ("HOME".into(), "/".into()),
            ("HOSTNAME".into(), self.node.clone()),
            ("OUTPOST_NODE".into(), self.node.clone()),
            ("OUTPOST_WORKLOAD".into(), w.key.clone()),
            ("OUTPOST_REVISION".into(), w.revision.to_string()),
        ];
        for m in &c.mounts {
            if let Some(p) = volumes.get(&m.volume) {
                let var = format!(
                    "OUTPOST_VOLUME_{}",
                    m.volume.to_ascii_uppercase().replace(['-', '.'], "_")
                );
                env.push((var, p.display().to_string()));
            }
        }
        // Where to publish data: the agent's MQTT broker and HTTP ingest (docs/pipeline.md).
        env.extend(crate::pipeline::workload_env(&self.data_dir));
        env.extend(c.env.iter().cloned());
        env.extend(crate::security::node_env(&self.node, w, c));
        env.push((ENV_AGENT.into(), self.agent_id.clone()));
        env.push((ENV_UNIT.into(), unit.into()));
        env.push((ENV_HASH.into(), w.hash.clone()));
        env
    }

    fn working_dir(&self, w: &WorkloadSpec, c: &ContainerSpec) -> PathBuf {
        c.working_dir
            .as_deref()
            .map(PathBuf::from)
            .unwrap_or_else(|| self.workload_dir(&w.key))
    }

    /// What an exec probe of this container runs with.
    pub fn exec_context(&self, w: &WorkloadSpec, c: &ContainerSpec, unit: &str) -> crate::probe::ExecContext {
        let mut env = self.process_env(w, c, unit, &self.volume_paths(w));
        // A probe is not a unit process: it must not be found and adopted as one.
        env.retain(|(k, _)| k != ENV_AGENT);
        crate::probe::ExecContext {
            env,
            cwd: self.working_dir(w, c),
            container: None,
        }
    }

    /// Start one container. Returns the child (the caller waits on it) and its pid.
    pub fn spawn(&self, w: &WorkloadSpec, c: &ContainerSpec, unit: &str) -> Result<tokio::process::Child, String> {
        let volumes = self.prepare_volumes(w)?;
        let wdir = self.workload_dir(&w.key);
        std::fs::create_dir_all(&wdir).map_err(|e| format!("cannot create {}: {e}", wdir.display()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(&w.key, &c.name))
            .map_err(|e| format!("cannot open log file: {e}"))?;
        // An ONNX serving container runs this binary's model server (docs/inference.md).
        let argv: Vec<String> = match &c.model {
            Some(m) => crate::inference::serve_argv(&self.data_dir, m)?,
            None => c.command.iter().chain(&c.args).cloned().collect(),
        };
        let exe = argv.first().ok_or("command is empty")?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.args(&argv[1..]);
        cmd.env_clear().envs(self.process_env(w, c, unit, &volumes));
        cmd.current_dir(self.working_dir(w, c));
        cmd.stdin(std::process::Stdio::null());
        cmd.stdout(log.try_clone().map_err(|e| e.to_string())?);
        cmd.stderr(log);
        cmd.kill_on_drop(false);

        // Everything the child does between fork and exec is prepared here: no allocation there.
        let mounts = self.mount_plan(c, &volumes)?;
        let creds = crate::security::Credentials::prepare(&c.security)?;
        // Every process gets a cgroup of its own when the host has them (so a service manager's
        // limits on the agent never apply to workloads); only a limit makes its absence an error.
        let cgroup_procs = match self.cgroups.prepare(unit, c.cpu_millis, c.memory_bytes) {
            Err(_) if c.cpu_millis.is_none() && c.memory_bytes.is_none() => Vec::new(),
            r => r?,
        };
        let parent_fds = cgroup_procs.clone();
        // SAFETY: the closure only makes async-signal-safe system calls on data prepared above.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for fd in &cgroup_procs {
                    if libc::write(*fd, b"0".as_ptr().cast(), 1) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if !mounts.is_empty() {
                    apply_mounts(&mounts)?;
                }
                if !creds.is_noop() {
                    creds.apply()?;
                }
                Ok(())
            });
        }
        let spawned = cmd.spawn();
        close_fds(&parent_fds);
        let child = spawned.map_err(|e| format!("cannot start {exe}: {e}"))?;
        Ok(child)
    }

    fn mount_plan(&self, c: &ContainerSpec, volumes: &BTreeMap<String, PathBuf>) -> Result<Vec<MountStep>, String> {
        if c.mounts.is_empty() {
            return Ok(Vec::new());
        }
        let root = nix::unistd::geteuid().is_root();
        let mut steps = Vec::new();
        for m in &c.mounts {
            let src = volumes
                .get(&m.volume)
                .ok_or_else(|| format!("volume {} is not defined", m.volume))?;
            if Path::new(&m.path) == src.as_path() {
                continue;
            }
            if !root {
                return Err(format!(
                    "volumeMount {} at {} needs a private mount namespace, which needs the agent to run as root; \
                     run the agent as root or mount the volume at its host path {}",
                    m.volume,
                    m.path,
                    src.display()
                ));
            }
            let cs = |p: &Path| {
                CString::new(p.as_os_str().as_bytes()).map_err(|_| format!("path {} contains NUL", p.display()))
            };
            let target = PathBuf::from(&m.path);
            let mut mkdirs = Vec::new();
            let mut acc = PathBuf::from("/");
            for comp in target.components().skip(1) {
                acc.push(comp);
                mkdirs.push(cs(&acc)?);
            }
            // A file, socket or device is mounted onto a file: the last component is not a directory.
            let file = std::fs::metadata(src).is_ok_and(|m| !m.is_dir());
            if file {
                mkdirs.pop();
            }
            steps.push(MountStep {
                source: cs(src)?,
                target: cs(&target)?,
                mkdirs,
                read_only: m.read_only,
                file,
            });
        }
        Ok(steps)
    }
}

/// Why a hostPath does not fit its declared `type` (None when it does or may be created).
pub fn host_type_mismatch(p: &Path, host_type: &str) -> Option<String> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(p).ok();
    let ft = meta.as_ref().map(|m| m.file_type());
    let want = |ok: bool, what: &str| (!ok).then(|| format!("is not {what} (hostPath type {host_type})"));
    match host_type {
        "Directory" => want(ft.is_some_and(|f| f.is_dir()), "an existing directory"),
        "File" => want(ft.is_some_and(|f| f.is_file()), "an existing file"),
        "Socket" => want(ft.is_some_and(|f| f.is_socket()), "an existing socket"),
        "CharDevice" => want(ft.is_some_and(|f| f.is_char_device()), "an existing character device"),
        "BlockDevice" => want(ft.is_some_and(|f| f.is_block_device()), "an existing block device"),
        "FileOrCreate" => {
            if ft.is_none() {
                if let Some(dir) = p.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                if let Err(e) = std::fs::OpenOptions::new().create(true).append(true).open(p) {
                    return Some(format!("cannot be created: {e}"));
                }
                None
            } else {
                want(ft.is_some_and(|f| f.is_file()), "a file")
            }
        }
        _ => None,
    }
}

/// Is this volume a device node (mounted as a device into containers)?
pub fn is_device(host_type: &str) -> bool {
    matches!(host_type, "CharDevice" | "BlockDevice")
}

fn close_fds(fds: &[i32]) {
    for fd in fds {
        // SAFETY: closing fds `Cgroups::prepare` opened; the child got its own copies at fork.
        unsafe { libc::close(*fd) };
    }
}

pub struct MountStep {
    source: CString,
    target: CString,
    mkdirs: Vec<CString>,
    read_only: bool,
    file: bool,
}

/// Runs in the child between fork and exec: only raw system calls.
fn apply_mounts(steps: &[MountStep]) -> std::io::Result<()> {
    // SAFETY: raw system calls on NUL-terminated strings prepared before fork.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let root = c"/";
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        for s in steps {
            for d in &s.mkdirs {
                libc::mkdir(d.as_ptr(), 0o755);
            }
            if s.file {
                let fd = libc::open(
                    s.target.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o644,
                );
                if fd >= 0 {
                    libc::close(fd);
                }
            }
            if libc::mount(
                s.source.as_ptr(),
                s.target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if s.read_only
                && libc::mount(
                    std::ptr::null(),
                    s.target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                    std::ptr::null(),
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Per-unit cgroups for cpu and memory limits.
enum Cgroups {
    V2 { base: PathBuf },
    V1 { memory: PathBuf, cpu: PathBuf },
    None,
}

impl Cgroups {
    fn detect(agent_id: &str) -> Self {
        let root = Path::new("/sys/fs/cgroup");
        let group = format!("outpost-{agent_id}");
        if root.join("cgroup.controllers").exists() {
            let base = root.join(&group);
            if std::fs::create_dir_all(&base).is_ok() {
                let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory +cpu");
                let _ = std::fs::write(base.join("cgroup.subtree_control"), "+memory +cpu");
                return Cgroups::V2 { base };
            }
        } else if root.join("memory").is_dir() && root.join("cpu").is_dir() {
            let memory = root.join("memory").join(&group);
            let cpu = root.join("cpu").join(&group);
            if std::fs::create_dir_all(&memory).is_ok() && std::fs::create_dir_all(&cpu).is_ok() {
                return Cgroups::V1 { memory, cpu };
            }
        }
        Cgroups::None
    }

    /// Create the unit's cgroup with its limits; returns open `cgroup.procs` fds for the child
    /// to write "0" into (which moves it). No limits: no cgroup.
    fn prepare(&self, unit: &str, cpu_millis: Option<u64>, memory: Option<u64>) -> Result<Vec<i32>, String> {
        if cpu_millis.is_none() && memory.is_none() && matches!(self, Cgroups::None) {
            return Ok(Vec::new());
        }
        let name = unit.replace('/', "_");
        let fail = |what: &str, e: std::io::Error| format!("cannot apply {what} limit through cgroups: {e}");
        let mut fds = Vec::new();
        let mut open = |p: PathBuf| -> Result<(), String> {
            let c = CString::new(p.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
            // SAFETY: plain open(2) on a NUL-terminated path.
            let fd = unsafe { libc::open(c.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(fail("process", std::io::Error::last_os_error()));
            }
            fds.push(fd);
            Ok(())
        };
        match self {
            Cgroups::V2 { base } => {
                let g = base.join(&name);
                std::fs::create_dir_all(&g).map_err(|e| fail("cgroup", e))?;
                let mem = memory.map_or("max".to_string(), |m| m.to_string());
                std::fs::write(g.join("memory.max"), mem).map_err(|e| fail("memory", e))?;
                let cpu = cpu_millis.map_or("max 100000".to_string(), |m| format!("{} 100000", m * 100));
                std::fs::write(g.join("cpu.max"), cpu).map_err(|e| fail("cpu", e))?;
                open(g.join("cgroup.procs"))?;
            }
            Cgroups::V1 {
                memory: mroot,
                cpu: croot,
            } => {
                let mg = mroot.join(&name);
                let cg = croot.join(&name);
                std::fs::create_dir_all(&mg).map_err(|e| fail("memory", e))?;
                std::fs::create_dir_all(&cg).map_err(|e| fail("cpu", e))?;
                let mem = memory.map_or("-1".to_string(), |m| m.to_string());
                std::fs::write(mg.join("memory.limit_in_bytes"), mem).map_err(|e| fail("memory", e))?;
                std::fs::write(cg.join("cpu.cfs_period_us"), "100000").map_err(|e| fail("cpu", e))?;
                let quota = cpu_millis.map_or("-1".to_string(), |m| (m * 100).to_string());
                std::fs::write(cg.join("cpu.cfs_quota_us"), quota).map_err(|e| fail("cpu", e))?;
                open(mg.join("cgroup.procs"))?;
                open(cg.join("cgroup.procs"))?;
            }
            Cgroups::None => {
                return Err(
                    "resources.limits are set but this host has no writable cgroup hierarchy \
                     (cgroup v2 or v1 memory+cpu); run the agent as root on a host with cgroups, or remove the limits"
                        .into(),
                )
            }
        }
        Ok(fds)
    }
}
