//! The Docker runtime: runs containers of workloads without `runtimeClassName: process` on the
//! node's Docker Engine (or podman's Docker-compatible socket) through its API.
//!
//! Ownership: every container the agent creates carries the labels `outpost.agent` (this agent's
//! id), `outpost.unit` and `outpost.hash`. At start the agent lists containers with its own
//! `outpost.agent` label and adopts the running ones whose unit and hash are still wanted (same
//! container ids, no restart); it never looks at, stops or removes a container without its label.
//!
//! The engine does not restart containers (restart policy `no`): the agent's supervisor does,
//! with the same backoff and crash-loop reporting as processes. Output is copied from the engine
//! into the same per-workload log files processes write to. Exited containers are removed once
//! their exit is recorded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::models::{
    ContainerCreateBody, DeviceMapping, HostConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, KillContainerOptions, ListContainersOptions, LogsOptions,
    RemoveContainerOptions, StartContainerOptions, StopContainerOptions, WaitContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use outpost_api::{ContainerSpec, WorkloadSpec};
use tokio::io::AsyncWriteExt;

pub const LABEL_AGENT: &str = "outpost.agent";
pub const LABEL_UNIT: &str = "outpost.unit";
pub const LABEL_HASH: &str = "outpost.hash";
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// A container this agent created, found through the engine.
#[derive(Clone, Debug)]
pub struct OwnedContainer {
    pub id: String,
    pub unit: String,
    pub hash: String,
    pub running: bool,
}

#[derive(Clone)]
pub struct Engine {
    pub api: Docker,
    pub socket: String,
    agent_id: String,
}

/// Outcome of running a container to its end.
pub struct ContainerExit {
    pub code: Option<i32>,
    pub reason: Option<String>,
}

impl Engine {
    /// Connect to the engine's socket and agree on an API version.
    pub async fn connect(socket: &str, agent_id: &str) -> Result<Self, String> {
        let api = Docker::connect_with_socket(socket, 120, bollard::API_DEFAULT_VERSION)
            .map_err(|e| format!("cannot use Docker socket {socket}: {e}"))?;
        let api = api
            .negotiate_version()
            .await
            .map_err(|e| format!("cannot reach the Docker Engine at {socket}: {e}; start Docker (or podman's socket), or use runtimeClassName: process"))?;
        api.ping()
            .await
            .map_err(|e| format!("the Docker Engine at {socket} does not answer: {e}"))?;
        Ok(Self {
            api,
            socket: socket.to_string(),
            agent_id: agent_id.to_string(),
        })
    }

    /// Containers carrying this agent's label.
    pub async fn list_owned(&self) -> Result<Vec<OwnedContainer>, String> {
        let filters = HashMap::from([("label".to_string(), vec![format!("{LABEL_AGENT}={}", self.agent_id)])]);
        let list = self
            .api
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(|e| format!("cannot list containers: {e}"))?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels.unwrap_or_default();
                // the engine filtered on the label already; check again, never touch others
                if labels.get(LABEL_AGENT) != Some(&self.agent_id) {
                    return None;
                }
                Some(OwnedContainer {
                    id: c.id?,
                    unit: labels.get(LABEL_UNIT)?.clone(),
                    hash: labels.get(LABEL_HASH)?.clone(),
                    running: c.state.is_some_and(|s| s.to_string() == "running"),
                })
            })
            .collect())
    }

    /// The host pid of a running container's main process.
    pub async fn pid(&self, id: &str) -> Option<u32> {
        let i = self
            .api
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .ok()?;
        i.state?.pid.filter(|p| *p > 0).map(|p| p as u32)
    }

    /// The container's address on its network, for http/tcp probes.
    pub async fn ip(&self, id: &str) -> Option<String> {
        let i = self
            .api
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .ok()?;
        let ns = i.network_settings?;
        ns.ip_address.filter(|ip| !ip.is_empty()).or_else(|| {
            ns.networks?
                .values()
                .find_map(|n| n.ip_address.clone().filter(|ip| !ip.is_empty()))
        })
    }

    /// Create and start a container for one unit. `volumes` maps volume names to host paths.
    pub async fn run(
        &self,
        w: &WorkloadSpec,
        c: &ContainerSpec,
        unit: &str,
        volumes: &std::collections::BTreeMap<String, PathBuf>,
        node: &str,
    ) -> Result<String, String> {
        let image = c.image.clone().ok_or("no image")?;
        let mut labels = HashMap::from([
            (LABEL_AGENT.to_string(), self.agent_id.clone()),
            (LABEL_UNIT.to_string(), unit.to_string()),
            (LABEL_HASH.to_string(), w.hash.clone()),
            ("outpost.workload".to_string(), w.key.clone()),
            ("outpost.revision".to_string(), w.revision.to_string()),
        ]);
        labels.insert("outpost.container".into(), c.name.clone());
        let mut exposed = HashMap::new();
        let mut bindings = HashMap::new();
        for p in &c.ports {
            let key = format!("{}/{}", p.container_port, p.protocol.to_ascii_lowercase());
            exposed.insert(key.clone(), HashMap::new());
            if let Some(hp) = p.host_port {
                bindings.insert(
                    key,
                    Some(vec![PortBinding {
                        host_ip: None,
                        host_port: Some(hp.to_string()),
                    }]),
                );
            }
        }
        let device_volume = |name: &str| {
            w.volumes.iter().any(|v| {
                v.name == name
                    && matches!(&v.source, outpost_api::VolumeSource::HostPath { host_type, .. }
                        if crate::runtime::is_device(host_type))
            })
        };
        let binds: Vec<String> = c
            .mounts
            .iter()
            .filter(|m| !device_volume(&m.volume))
            .filter_map(|m| {
                let src = volumes.get(&m.volume)?;
                Some(format!(
                    "{}:{}{}",
                    src.display(),
                    m.path,
                    if m.read_only { ":ro" } else { "" }
                ))
            })
            .collect();
        // Device nodes are passed as devices, so the container's device cgroup allows them.
        let devices: Vec<DeviceMapping> = c
            .mounts
            .iter()
            .filter(|m| device_volume(&m.volume))
            .filter_map(|m| {
                let src = volumes.get(&m.volume)?;
                Some(DeviceMapping {
                    path_on_host: Some(src.display().to_string()),
                    path_in_container: Some(m.path.clone()),
                    cgroup_permissions: Some(if m.read_only { "r" } else { "rwm" }.into()),
                })
            })
            .collect();
        let sec = &c.security;
        if sec.run_as_non_root && sec.run_as_user.is_none() {
            let user = self
                .api
                .inspect_image(&image)
                .await
                .ok()
                .and_then(|i| i.config)
                .and_then(|c| c.user)
                .unwrap_or_default();
            let name = user.split(':').next().unwrap_or("");
            if name.is_empty() || name == "root" || name == "0" {
                return Err(format!(
                    "runAsNonRoot is set but image {image} runs as root (its USER is {:?}); set runAsUser",
                    user
                ));
            }
        }
        let mut security_opt = Vec::new();
        if sec.no_new_privileges {
            security_opt.push("no-new-privileges".to_string());
        }
        if sec.seccomp_unconfined {
            security_opt.push("seccomp=unconfined".to_string());
        }
        let host = HostConfig {
            binds: Some(binds),
            devices: (!devices.is_empty()).then_some(devices),
            // Published ports mean nothing on the host network: the container binds them itself.
            port_bindings: (!w.host_network).then_some(bindings),
            network_mode: w.host_network.then(|| "host".to_string()),
            pid_mode: w.host_pid.then(|| "host".to_string()),
            privileged: sec.privileged.then_some(true),
            cap_add: (!sec.cap_add.is_empty()).then(|| sec.cap_add.clone()),
            cap_drop: (!sec.cap_drop.is_empty()).then(|| sec.cap_drop.clone()),
            readonly_rootfs: sec.read_only_root_fs.then_some(true),
            security_opt: (!security_opt.is_empty()).then_some(security_opt),
            memory: c.memory_bytes.map(|m| m as i64),
            nano_cpus: c.cpu_millis.map(|m| (m * 1_000_000) as i64),
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            }),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(image),
            entrypoint: (!c.command.is_empty()).then(|| c.command.clone()),
            cmd: (!c.args.is_empty()).then(|| c.args.clone()),
            env: Some(
                c.env
                    .iter()
                    .cloned()
                    .chain(crate::security::node_env(node, w, c))
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect(),
            ),
            user: sec.run_as_user.map(|u| match sec.run_as_group {
                Some(g) => format!("{u}:{g}"),
                None => u.to_string(),
            }),
            working_dir: c.working_dir.clone(),
            labels: Some(labels),
            exposed_ports: Some(exposed),
            host_config: Some(host),
            ..Default::default()
        };
        let name = format!(
            "outpost_{}_{}_{:08x}",
            unit.replace('/', "_"),
            &w.hash[..8.min(w.hash.len())],
            rand::random::<u32>()
        );
        let created = self
            .api
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name),
                    ..Default::default()
                }),
                body,
            )
            .await
            .map_err(|e| format!("cannot create container: {e}"))?;
        if let Err(e) = self
            .api
            .start_container(&created.id, None::<StartContainerOptions>)
            .await
        {
            let _ = self.remove(&created.id).await;
            return Err(format!("cannot start container: {e}"));
        }
        Ok(created.id)
    }

    /// Wait for the container to stop. A container removed from outside, or an engine that went
    /// away, ends the wait too (exit code unknown).
    pub async fn wait(&self, id: &str) -> ContainerExit {
        let mut s = self.api.wait_container(
            id,
            Some(WaitContainerOptions {
                condition: "not-running".into(),
            }),
        );
        match s.next().await {
            Some(Ok(r)) => ContainerExit {
                code: Some(r.status_code as i32),
                reason: r.error.and_then(|e| e.message),
            },
            // bollard reports a non-zero exit as an error carrying the code
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, error })) => ContainerExit {
                code: Some(code as i32),
                reason: (!error.is_empty()).then_some(error),
            },
            Some(Err(e)) => ContainerExit {
                code: None,
                reason: Some(format!("container lost: {e}")),
            },
            None => ContainerExit {
                code: None,
                reason: Some("container lost".into()),
            },
        }
    }

    pub async fn stop(&self, id: &str, grace_secs: u64) {
        let _ = self
            .api
            .stop_container(
                id,
                Some(StopContainerOptions {
                    t: Some(grace_secs as i32),
                    signal: None,
                }),
            )
            .await;
    }

    pub async fn kill(&self, id: &str) {
        let _ = self
            .api
            .kill_container(
                id,
                Some(KillContainerOptions {
                    signal: "SIGKILL".into(),
                }),
            )
            .await;
    }

    pub async fn remove(&self, id: &str) -> Result<(), String> {
        self.api
            .remove_container(
                id,
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    link: false,
                }),
            )
            .await
            .map_err(|e| e.to_string())
    }

    /// Copy the container's output into `log` until the container ends. `since` (unix seconds)
    /// skips what an earlier agent already copied.
    pub async fn copy_logs(&self, id: &str, log: &Path, since: i64) {
        let Ok(mut f) = tokio::fs::OpenOptions::new().create(true).append(true).open(log).await else {
            return;
        };
        let opts = LogsOptions {
            follow: true,
            stdout: true,
            stderr: true,
            since: since as i32,
            tail: "all".into(),
            ..Default::default()
        };
        let mut s = self.api.logs(id, Some(opts));
        while let Some(Ok(chunk)) = s.next().await {
            if f.write_all(&chunk.into_bytes()).await.is_err() {
                break;
            }
        }
        let _ = f.flush().await;
    }

    /// Run a command inside a container (exec probes). Returns (exit code, output).
    pub async fn exec(&self, id: &str, command: &[String], timeout: Duration) -> Result<(i64, String), String> {
        use bollard::exec::{CreateExecOptions, StartExecResults};
        let created = self
            .api
            .create_exec(
                id,
                CreateExecOptions {
                    cmd: Some(command.to_vec()),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("cannot exec in container: {e}"))?;
        let mut out = String::new();
        let run = async {
            if let Ok(StartExecResults::Attached { mut output, .. }) = self.api.start_exec(&created.id, None).await {
                while let Some(Ok(chunk)) = output.next().await {
                    if out.len() < 1024 {
                        out.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
                    }
                }
            }
        };
        tokio::time::timeout(timeout, run)
            .await
            .map_err(|_| format!("timed out after {} s", timeout.as_secs()))?;
        let code = self
            .api
            .inspect_exec(&created.id)
            .await
            .ok()
            .and_then(|i| i.exit_code)
            .unwrap_or(-1);
        Ok((code, out.trim().to_string()))
    }
}
