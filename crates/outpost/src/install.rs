//! `outpost agent install|uninstall` and `outpost hub install|uninstall`: outpost as a
//! systemd service that comes back after a power cut.
//!
//! Install is idempotent: the binary is copied to `/usr/local/bin/outpost` only when its
//! content differs, the box joins only when it has no identity yet, the unit is rewritten
//! (and systemd reloaded, the service restarted) only when its text changes, and
//! `systemctl enable --now` is a no-op for an enabled, running service. Running it twice
//! changes nothing and restarts nothing.
//!
//! The agent's unit uses `KillMode=process`: stopping or restarting the service stops the
//! agent only; its workloads keep running and the next agent adopts them (containers are
//! never the service's children anyway; process workloads get cgroups of their own). So the
//! unit's `MemoryMax` bounds the agent, not the workloads.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Args;

pub const AGENT_UNIT: &str = "outpost-agent.service";
pub const HUB_UNIT: &str = "outpost-hub.service";
pub const DEFAULT_BIN: &str = "/usr/local/bin/outpost";
pub const UNIT_DIR: &str = "/etc/systemd/system";

#[derive(Args, Clone, Debug)]
pub struct AgentInstallArgs {
    /// Hub URL, e.g. https://hub.example.com:8443 (not needed with --manifests only).
    #[arg(long)]
    pub hub: Option<String>,
    /// Join token from `outpost token create` (used once: a joined box keeps its identity).
    #[arg(long)]
    pub token: Option<String>,
    /// Node name (default: this host's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Extra node labels k=v,k2=v2 (as `outpost agent join --labels`).
    #[arg(long)]
    pub labels: Option<String>,
    #[arg(long, default_value = "/var/lib/outpost/agent")]
    pub data_dir: PathBuf,
    /// Also run the workloads of this manifest directory (single-box mode; alone: no hub).
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,
    /// The memory the agent itself may use (systemd MemoryMax); its workloads are not counted.
    #[arg(long, default_value = "256M")]
    pub memory_max: String,
    /// Where the binary is installed.
    #[arg(long, default_value = DEFAULT_BIN)]
    pub bin: PathBuf,
}

#[derive(Args, Clone, Debug)]
pub struct UninstallArgs {
    /// Also delete the data dir (identity, state, logs, volumes) after stopping every workload.
    #[arg(long)]
    pub purge: bool,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

#[derive(clap::Parser, Debug)]
#[command(name = "outpost hub install")]
pub struct HubInstallArgs {
    #[arg(long, default_value = "/var/lib/outpost/hub")]
    pub data_dir: PathBuf,
    #[arg(long, default_value = DEFAULT_BIN)]
    pub bin: PathBuf,
    /// Arguments for `outpost hub` (after `--`), e.g. -- --advertise https://hub.example.com:8443
    #[arg(last = true)]
    pub hub_args: Vec<String>,
}

#[derive(clap::Parser, Debug)]
#[command(name = "outpost hub uninstall")]
pub struct HubUninstallArgs {
    #[command(flatten)]
    pub u: UninstallArgs,
}

/// What install did, for the operator.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes(pub Vec<String>);

impl Changes {
    fn note(&mut self, s: impl Into<String>) {
        self.0.push(s.into());
    }
    pub fn report(&self, what: &str) {
        if self.0.is_empty() {
            println!("{what} is installed and running; nothing changed");
        } else {
            for c in &self.0 {
                println!("{c}");
            }
        }
    }
}

/// Quote one argument for a systemd `ExecStart=` line.
fn quote(a: &str) -> String {
    if !a.is_empty()
        && a.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=,@+".contains(&b))
    {
        a.to_string()
    } else {
        format!(
            "\"{}\"",
            a.replace('\\', "\\\\").replace('"', "\\\"").replace('%', "%%")
        )
    }
}

/// The agent's unit: restarts always, starts after Docker when the box has it, descriptors
/// and memory sized for the agent.
pub fn agent_unit(bin: &Path, data_dir: &Path, manifests: Option<&Path>, memory_max: &str, docker: bool) -> String {
    let mut exec = vec![
        bin.display().to_string(),
        "agent".into(),
        "run".into(),
        "--data-dir".into(),
        data_dir.display().to_string(),
    ];
    if let Some(m) = manifests {
        exec.push("--manifests".into());
        exec.push(m.display().to_string());
    }
    let exec: Vec<String> = exec.iter().map(|a| quote(a)).collect();
    let after = if docker {
        "network-online.target docker.service"
    } else {
        "network-online.target"
    };
    format!(
        "# Written by `outpost agent install`; `outpost agent uninstall` removes it.
[Unit]
Description=outpost agent (runs this box's workloads, with or without its hub)
Wants=network-online.target
After={after}
{wants_docker}StartLimitIntervalSec=0

[Service]
Type=simple
ExecStart={exec}
Restart=always
RestartSec=2
# Stop the agent only: its workloads keep running and the next agent adopts them.
KillMode=process
TimeoutStopSec=30
LimitNOFILE=65536
MemoryMax={memory_max}
Environment=OUTPOST_LOG=info

[Install]
WantedBy=multi-user.target
",
        wants_docker = if docker { "Wants=docker.service\n" } else { "" },
        exec = exec.join(" "),
    )
}

/// The hub's unit: restarts always; a high descriptor limit (the hub sizes its connection
/// budget from it); no memory cap (its database cache grows with the fleet).
pub fn hub_unit(bin: &Path, data_dir: &Path, hub_args: &[String]) -> String {
    let mut exec = vec![
        bin.display().to_string(),
        "hub".into(),
        "--data-dir".into(),
        data_dir.display().to_string(),
    ];
    exec.extend(hub_args.iter().cloned());
    let exec: Vec<String> = exec.iter().map(|a| quote(a)).collect();
    format!(
        "# Written by `outpost hub install`; `outpost hub uninstall` removes it.
[Unit]
Description=outpost hub
Wants=network-online.target
After=network-online.target
StartLimitIntervalSec=0

[Service]
Type=simple
ExecStart={}
Restart=always
RestartSec=2
LimitNOFILE=1048576
Environment=OUTPOST_LOG=info

[Install]
WantedBy=multi-user.target
",
        exec.join(" ")
    )
}

fn systemctl(args: &[&str]) -> Result<String> {
    let o = Command::new("systemctl")
        .args(args)
        .output()
        .with_context(|| "cannot run systemctl: this command needs systemd".to_string())?;
    if !o.status.success() {
        bail!(
            "systemctl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn have_systemd() -> Result<()> {
    if !Path::new("/run/systemd/system").is_dir() {
        bail!(
            "this box does not run systemd (no /run/systemd/system); start `outpost agent run` from your init system instead"
        );
    }
    Ok(())
}

fn has_docker_unit() -> bool {
    Command::new("systemctl")
        .args(["cat", "docker.service"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Copy the running binary to `bin` unless it is already there.
fn install_binary(bin: &Path, ch: &mut Changes) -> Result<()> {
    let me = std::env::current_exe().context("cannot find the running binary")?;
    let new = std::fs::read(&me).with_context(|| format!("cannot read {}", me.display()))?;
    if std::fs::read(bin).ok().as_deref() == Some(&new[..]) {
        return Ok(());
    }
    if let Some(dir) = bin.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    outpost_agent::identity::write_atomic(bin, &new, 0o755)
        .with_context(|| format!("cannot write {}", bin.display()))?;
    ch.note(format!("installed {}", bin.display()));
    Ok(())
}

/// Write the unit when its text changed; returns whether it did.
fn write_unit(name: &str, text: &str, ch: &mut Changes) -> Result<bool> {
    let path = Path::new(UNIT_DIR).join(name);
    if std::fs::read_to_string(&path).ok().as_deref() == Some(text) {
        return Ok(false);
    }
    std::fs::create_dir_all(UNIT_DIR)?;
    outpost_agent::identity::write_atomic(&path, text.as_bytes(), 0o644)
        .with_context(|| format!("cannot write {}", path.display()))?;
    ch.note(format!("wrote {}", path.display()));
    Ok(true)
}

fn enable_and_start(unit: &str, changed: bool, ch: &mut Changes) -> Result<()> {
    if changed {
        systemctl(&["daemon-reload"])?;
    }
    let enabled = systemctl(&["is-enabled", unit]).is_ok_and(|s| s == "enabled");
    let active = systemctl(&["is-active", unit]).is_ok_and(|s| s == "active");
    if !enabled {
        systemctl(&["enable", unit])?;
        ch.note(format!("enabled {unit} (starts at boot)"));
    }
    if !active {
        systemctl(&["start", unit])?;
        ch.note(format!("started {unit}"));
    } else if changed {
        systemctl(&["restart", unit])?;
        ch.note(format!("restarted {unit} with the new unit"));
    }
    Ok(())
}

pub async fn agent_install(a: AgentInstallArgs) -> Result<Changes> {
    have_systemd()?;
    let mut ch = Changes::default();
    install_binary(&a.bin, &mut ch)?;
    if !outpost_agent::Identity::exists(&a.data_dir) {
        match (&a.hub, &a.token) {
            (Some(hub), Some(token)) => {
                let labels = match &a.labels {
                    Some(l) => crate::parse_labels(l).map_err(anyhow::Error::msg)?,
                    None => Default::default(),
                };
                let id = outpost_agent::join(&outpost_agent::JoinOptions {
                    hub: hub.clone(),
                    token: token.clone(),
                    name: a.name.clone(),
                    labels,
                    data_dir: a.data_dir.clone(),
                })
                .await?;
                ch.note(format!("joined {} as node {}", id.hub, id.node));
            }
            _ if a.manifests.is_some() => {}
            _ => bail!(
                "this box has not joined a hub: give --hub URL --token T (from `outpost token create`), \
                 or --manifests DIR to run hub-less"
            ),
        }
    }
    let unit = agent_unit(
        &a.bin,
        &a.data_dir,
        a.manifests.as_deref(),
        &a.memory_max,
        has_docker_unit(),
    );
    let changed = write_unit(AGENT_UNIT, &unit, &mut ch)?;
    enable_and_start(AGENT_UNIT, changed, &mut ch)?;
    Ok(ch)
}

pub fn hub_install(a: HubInstallArgs) -> Result<Changes> {
    have_systemd()?;
    let mut ch = Changes::default();
    install_binary(&a.bin, &mut ch)?;
    let changed = write_unit(HUB_UNIT, &hub_unit(&a.bin, &a.data_dir, &a.hub_args), &mut ch)?;
    enable_and_start(HUB_UNIT, changed, &mut ch)?;
    Ok(ch)
}

fn remove_unit(unit: &str, ch: &mut Changes) -> Result<()> {
    let path = Path::new(UNIT_DIR).join(unit);
    if !path.exists() {
        return Ok(());
    }
    let _ = systemctl(&["disable", "--now", unit]);
    std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    systemctl(&["daemon-reload"])?;
    ch.note(format!("stopped, disabled and removed {unit}"));
    Ok(())
}

/// The data dir the installed unit names (or the default).
fn unit_data_dir(unit: &str, default: &str) -> PathBuf {
    std::fs::read_to_string(Path::new(UNIT_DIR).join(unit))
        .ok()
        .and_then(|t| {
            let exec = t.lines().find(|l| l.starts_with("ExecStart="))?.to_string();
            let mut it = exec.split_whitespace();
            it.find(|w| *w == "--data-dir")?;
            it.next().map(|d| PathBuf::from(d.trim_matches('"')))
        })
        .unwrap_or_else(|| PathBuf::from(default))
}

pub async fn agent_uninstall(u: UninstallArgs) -> Result<Changes> {
    have_systemd()?;
    let mut ch = Changes::default();
    let data_dir = u
        .data_dir
        .clone()
        .unwrap_or_else(|| unit_data_dir(AGENT_UNIT, "/var/lib/outpost/agent"));
    remove_unit(AGENT_UNIT, &mut ch)?;
    // The service stopped only the agent (KillMode=process): stop what it ran.
    if data_dir.exists() {
        let stopped = outpost_agent::stop_all_workloads(&data_dir).await;
        if stopped > 0 {
            ch.note(format!("stopped {stopped} workload processes and containers"));
        }
    }
    if u.purge && data_dir.exists() {
        std::fs::remove_dir_all(&data_dir).with_context(|| format!("cannot remove {}", data_dir.display()))?;
        ch.note(format!("deleted {}", data_dir.display()));
    }
    Ok(ch)
}

pub fn hub_uninstall(u: UninstallArgs) -> Result<Changes> {
    have_systemd()?;
    let mut ch = Changes::default();
    let data_dir = u
        .data_dir
        .clone()
        .unwrap_or_else(|| unit_data_dir(HUB_UNIT, "/var/lib/outpost/hub"));
    remove_unit(HUB_UNIT, &mut ch)?;
    if u.purge && data_dir.exists() {
        std::fs::remove_dir_all(&data_dir).with_context(|| format!("cannot remove {}", data_dir.display()))?;
        ch.note(format!("deleted {}", data_dir.display()));
    }
    Ok(ch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_unit_fits_the_agent() {
        let u = agent_unit(
            Path::new("/usr/local/bin/outpost"),
            Path::new("/var/lib/outpost/agent"),
            Some(Path::new("/etc/outpost/my manifests")),
            "256M",
            true,
        );
        for want in [
            "ExecStart=/usr/local/bin/outpost agent run --data-dir /var/lib/outpost/agent --manifests \"/etc/outpost/my manifests\"",
            "Restart=always",
            "After=network-online.target docker.service",
            "Wants=docker.service",
            "KillMode=process",
            "LimitNOFILE=65536",
            "MemoryMax=256M",
            "WantedBy=multi-user.target",
        ] {
            assert!(u.contains(want), "{want} missing from\n{u}");
        }
        let no_docker = agent_unit(Path::new("/b"), Path::new("/d"), None, "128M", false);
        assert!(no_docker.contains("After=network-online.target\n") && !no_docker.contains("docker"));
    }

    #[test]
    fn hub_unit_passes_its_arguments() {
        let u = hub_unit(
            Path::new("/usr/local/bin/outpost"),
            Path::new("/var/lib/outpost/hub"),
            &["--advertise".into(), "https://hub.example.com:8443".into()],
        );
        assert!(u.contains(
            "ExecStart=/usr/local/bin/outpost hub --data-dir /var/lib/outpost/hub --advertise https://hub.example.com:8443"
        ));
        assert!(u.contains("LimitNOFILE=1048576") && u.contains("Restart=always"));
        assert_eq!(quote("50%"), "\"50%%\"");
    }
}
