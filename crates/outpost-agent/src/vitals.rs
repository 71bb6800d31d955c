//! Vital signs of the node, read from `/proc`, `/sys` and `statvfs`: CPU, memory, disk (the
//! file system of `/` and, when different, of the agent's data dir), load, temperature where
//! the host exposes a thermal zone, and per workload CPU, resident memory and restarts.
//!
//! Per-workload figures are summed over each unit's **process group** (the unit's leader runs
//! in its own session and group, see `runtime`; children it forks stay in that group unless
//! they start a session of their own). CPU is percent of one core since the previous sample.
//!
//! Owns: reading and computing the numbers. Must never: decide anything about them (that is
//! `outpost_core::alerts`), write to the store, or block for long (one pass reads a few
//! hundred small files).

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use outpost_api::{ModelCounters, ModelVitals, Phase, Vitals, WorkloadVitals};
use outpost_core::alerts::{ModelSample, Sample};

use crate::inference::stats::Reading;

use crate::reconcile::Snapshot;
use crate::runtime::Owned;

/// Keeps the previous counters so CPU can be computed as a rate.
pub struct Sampler {
    data_dir: PathBuf,
    prev_cpu: Option<(u64, u64)>,
    prev_groups: HashMap<u32, (u64, Instant)>,
    clk_tck: f64,
    page: u64,
    /// Per serving workload: (server pid, its counters at the previous sample).
    prev_models: HashMap<String, (u32, ModelCounters)>,
}

/// `(busy, total)` jiffies from the first line of /proc/stat.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?;
    let f: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if f.len() < 4 {
        return None;
    }
    let total: u64 = f.iter().take(8).sum();
    let idle = f[3] + f.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// (percent used, total bytes) from /proc/meminfo: total - available.
fn memory() -> (f32, u64) {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    match (get("MemTotal:"), get("MemAvailable:")) {
        (Some(t), Some(a)) if t > 0 => (((t - a.min(t)) as f64 / t as f64 * 100.0) as f32, t),
        _ => (0.0, 0),
    }
}

/// Percent of a file system in use, as `df` computes it (space reserved for root excluded).
fn disk_used(path: &Path) -> Option<f32> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    let used = (st.blocks() - st.blocks_free()) as f64;
    let avail = st.blocks_available() as f64;
    (used + avail > 0.0).then(|| (used / (used + avail) * 100.0) as f32)
}

fn load1() -> f32 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// The hottest thermal zone, in degrees Celsius, if the host has any.
fn temperature() -> Option<f32> {
    let dir = std::fs::read_dir("/sys/class/thermal").ok()?;
    dir.flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("thermal_zone"))
        .filter_map(|e| std::fs::read_to_string(e.path().join("temp")).ok())
        .filter_map(|t| t.trim().parse::<f32>().ok())
        .map(|milli| milli / 1000.0)
        .fold(None, |acc: Option<f32>, t| Some(acc.map_or(t, |a| a.max(t))))
}

/// Per process group: (utime + stime ticks, resident pages), for every process in /proc.
fn groups() -> HashMap<u32, (u64, u64)> {
    let mut out: HashMap<u32, (u64, u64)> = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().filter(|s| s.bytes().all(|b| b.is_ascii_digit())) else {
            continue;
        };
        let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = s.rfind(')') else { continue };
        let f: Vec<&str> = s[close + 2..].split(' ').collect();
        // fields from 3 (state): index 2 = pgrp, 11 = utime, 12 = stime, 21 = rss
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let pgrp = num(2) as u32;
        let g = out.entry(pgrp).or_default();
        g.0 += num(11) + num(12);
        g.1 += num(21);
    }
    out
}

impl Sampler {
    pub fn new(data_dir: &Path) -> Self {
        // SAFETY: sysconf has no preconditions.
        let (tck, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
        Self {
            data_dir: data_dir.to_path_buf(),
            prev_cpu: None,
            prev_groups: HashMap::new(),
            clk_tck: if tck > 0 { tck as f64 } else { 100.0 },
            page: if page > 0 { page as u64 } else { 4096 },
            prev_models: HashMap::new(),
        }
    }

    /// The model servers' figures for this sample: their counters, and the p99 and error
    /// percent of what they answered since the previous sample (`outpost_core::inference`).
    pub fn models(&mut self, readings: &[Reading]) -> Vec<ModelVitals> {
        let mut next = HashMap::new();
        let out = readings
            .iter()
            .map(|r| {
                let prev = self
                    .prev_models
                    .get(&r.key)
                    .filter(|(pid, _)| *pid == r.pid)
                    .map(|(_, c)| c);
                let w = outpost_core::inference::window(prev, &r.counters);
                next.insert(r.key.clone(), (r.pid, r.counters.clone()));
                let round = |v: f64| (v * 1000.0).round() / 1000.0;
                ModelVitals {
                    key: r.key.clone(),
                    model: r.model.clone(),
                    version: r.version.clone(),
                    counters: r.counters.clone(),
                    p99_ms: w.p99_ms.map(round),
                    error_pct: w.error_pct.map(round),
                }
            })
            .collect();
        self.prev_models = next;
        out
    }

    /// Take one sample. `owned` are the unit leaders (`runtime::scan_owned`), `snap` the
    /// reconciler's status (restart counts).
    pub fn sample(&mut self, at: i64, owned: &[Owned], snap: &Snapshot) -> Vitals {
        let cpu = match (cpu_jiffies(), self.prev_cpu) {
            (Some((b, t)), Some((pb, pt))) if t > pt => {
                ((b.saturating_sub(pb)) as f64 / (t - pt) as f64 * 100.0) as f32
            }
            _ => 0.0,
        };
        self.prev_cpu = cpu_jiffies().or(self.prev_cpu);
        let (mem, mem_total_bytes) = memory();
        let same_fs = match (std::fs::metadata("/"), std::fs::metadata(&self.data_dir)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev(),
            _ => true,
        };
        let now = Instant::now();
        let groups = groups();
        let mut per: BTreeMap<String, WorkloadVitals> = BTreeMap::new();
        let mut next_prev = HashMap::new();
        for o in owned {
            let Some(&(ticks, pages)) = groups.get(&o.pid) else {
                continue;
            };
            let key = o.unit.rsplit_once('/').map_or(o.unit.as_str(), |(k, _)| k).to_string();
            let w = per.entry(key.clone()).or_insert_with(|| WorkloadVitals {
                key,
                cpu: 0.0,
                rss_bytes: 0,
                restarts: 0,
            });
            if let Some(&(pt, pat)) = self.prev_groups.get(&o.pid) {
                let secs = now.duration_since(pat).as_secs_f64();
                if secs > 0.0 {
                    w.cpu += (ticks.saturating_sub(pt) as f64 / self.clk_tck / secs * 100.0) as f32;
                }
            }
            w.rss_bytes += pages * self.page;
            next_prev.insert(o.pid, (ticks, now));
        }
        self.prev_groups = next_prev;
        for (key, st) in snap {
            let restarts = st.containers.iter().map(|c| c.restarts).sum();
            per.entry(key.clone())
                .or_insert_with(|| WorkloadVitals {
                    key: key.clone(),
                    cpu: 0.0,
                    rss_bytes: 0,
                    restarts: 0,
                })
                .restarts = restarts;
        }
        let round = |v: f32| (v * 10.0).round() / 10.0;
        Vitals {
            at,
            cpu: round(cpu),
            mem: round(mem),
            mem_total_bytes,
            disk_root: round(disk_used(Path::new("/")).unwrap_or(0.0)),
            disk_data: if same_fs {
                None
            } else {
                disk_used(&self.data_dir).map(round)
            },
            load1: round(load1()),
            temp_c: temperature().map(round),
            workloads: per
                .into_values()
                .map(|mut w| {
                    w.cpu = round(w.cpu);
                    w
                })
                .collect(),
            log_dropped_lines: 0,
            models: Vec::new(),
        }
    }
}

/// The evaluator's view of a sample.
pub fn to_sample(v: &Vitals, snap: &Snapshot) -> Sample {
    Sample {
        cpu: v.cpu as f64,
        mem: v.mem as f64,
        disk_root: v.disk_root as f64,
        disk_data: v.disk_data.map(f64::from),
        temp_c: v.temp_c.map(f64::from),
        crash_looping: snap
            .values()
            .filter(|w| w.phase == Phase::CrashLoopBackOff)
            .map(|w| w.key.clone())
            .collect(),
        models: v
            .models
            .iter()
            .map(|m| ModelSample {
                key: m.key.clone(),
                model: format!("{}:{}", m.model, m.version),
                p99_ms: m.p99_ms,
                error_pct: m.error_pct,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_host() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Sampler::new(dir.path());
        let _ = s.sample(0, &[], &Snapshot::new());
        let v = s.sample(1, &[], &Snapshot::new());
        assert!(v.mem > 0.0 && v.mem <= 100.0, "{v:?}");
        assert!(v.mem_total_bytes > 0);
        assert!(v.disk_root > 0.0 && v.disk_root <= 100.0, "{v:?}");
        assert!((0.0..=100.0).contains(&v.cpu), "{v:?}");
    }
}
