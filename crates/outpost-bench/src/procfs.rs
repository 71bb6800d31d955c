//! Reading a process's memory and CPU from `/proc` (Linux). Parsing is pure and unit-tested;
//! the readers are thin wrappers.

use std::time::{Duration, Instant};

/// Clock ticks per second for `utime`/`stime` in `/proc/PID/stat`.
pub fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// `utime + stime` (ticks) from the text of `/proc/PID/stat`. The command name may contain
/// spaces and parentheses, so fields are counted after the last `)`.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // after ")": state(0) ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime(11) stime(12)
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A `kB` field (e.g. `VmRSS`, `Pss`) from `/proc/PID/status` or `smaps_rollup`, in bytes.
pub fn parse_kb_field(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        let kb: u64 = rest.split_whitespace().next()?.parse().ok()?;
        Some(kb * 1024)
    })
}

/// Total busy and total ticks from the `cpu` line of `/proc/stat`.
pub fn parse_proc_stat_total(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// `ppid` and `cutime + cstime` (ticks of children that ended and were waited for) from the
/// text of `/proc/PID/stat`.
pub fn parse_stat_ppid_and_child_ticks(stat: &str) -> Option<(u32, u64)> {
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // after ")": state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
    let ppid: u32 = f.get(1)?.parse().ok()?;
    let cutime: u64 = f.get(13)?.parse().ok()?;
    let cstime: u64 = f.get(14)?.parse().ok()?;
    Some((ppid, cutime + cstime))
}

/// `root` and every process below it, from `(pid, ppid)` pairs (pure: the tree walk).
pub fn descendants(root: u32, pairs: &[(u32, u32)]) -> Vec<u32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(
            pairs
                .iter()
                .filter(|(p, pp)| *pp == parent && *p != root)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    out
}

/// `root` and its live descendants (one scan of `/proc`); empty when `root` is gone.
pub fn tree(root: u32) -> Vec<u32> {
    if cpu_ticks(root).is_none() {
        return Vec::new();
    }
    let mut pairs = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some((ppid, _)) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .as_deref()
                .and_then(parse_stat_ppid_and_child_ticks)
            {
                pairs.push((pid, ppid));
            }
        }
    }
    descendants(root, &pairs)
}

/// CPU ticks of a process tree: every live member's `utime + stime`, plus the root's
/// `cutime + cstime` (children that ended since, e.g. PostgreSQL backends of closed
/// connections, reaped by the postmaster), so the difference between two readings is the
/// tree's CPU in between, ended members included.
pub fn tree_cpu_ticks(root: u32) -> Option<u64> {
    let reaped = parse_stat_ppid_and_child_ticks(&std::fs::read_to_string(format!("/proc/{root}/stat")).ok()?)?.1;
    let live: u64 = tree(root).into_iter().filter_map(cpu_ticks).sum();
    Some(reaped + live)
}

/// Summed RSS of a process tree (shared pages, e.g. PostgreSQL's shared buffers, count once per
/// process that touched them: read PSS for the tree's real share).
pub fn tree_rss_bytes(root: u32) -> Option<u64> {
    let t = tree(root);
    (!t.is_empty()).then(|| t.into_iter().filter_map(rss_bytes).sum())
}

/// Summed PSS of a process tree (shared pages divided among the processes sharing them).
pub fn tree_pss_bytes(root: u32) -> Option<u64> {
    let t = tree(root);
    (!t.is_empty()).then(|| t.into_iter().filter_map(pss_bytes).sum())
}

pub fn cpu_ticks(pid: u32) -> Option<u64> {
    parse_stat_cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

pub fn rss_bytes(pid: u32) -> Option<u64> {
    parse_kb_field(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?, "VmRSS")
}

pub fn pss_bytes(pid: u32) -> Option<u64> {
    parse_kb_field(
        &std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?,
        "Pss",
    )
}

pub fn fd_count(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

pub fn threads(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Threads:").and_then(|v| v.trim().parse().ok()))
}

pub fn machine_busy() -> Option<(u64, u64)> {
    parse_proc_stat_total(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// CPU and memory of one process (or of a process tree) over a window: start, sample RSS as
/// often as you like, finish.
pub struct Meter {
    pub pid: u32,
    /// Measure `pid` and every process below it (summed), e.g. a PostgreSQL postmaster and its
    /// backends.
    tree: bool,
    t0: Instant,
    ticks0: u64,
    machine0: Option<(u64, u64)>,
    rss_samples: Vec<u64>,
}

/// What a [`Meter`] saw.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Usage {
    pub secs: f64,
    /// CPU time over wall time, in percent of one core.
    pub cpu_pct: f64,
    pub rss_mean: u64,
    pub rss_max: u64,
    pub rss_end: u64,
    pub pss_end: u64,
    /// Processes measured at the end (1, or the size of the tree).
    pub procs: usize,
    /// Whole-machine busy share over the window, percent of all cores.
    pub machine_busy_pct: f64,
}

impl Meter {
    pub fn start(pid: u32) -> Option<Meter> {
        Some(Meter {
            pid,
            tree: false,
            t0: Instant::now(),
            ticks0: cpu_ticks(pid)?,
            machine0: machine_busy(),
            rss_samples: rss_bytes(pid).into_iter().collect(),
        })
    }

    /// A meter of `root` and every process below it (CPU and memory summed over the tree).
    pub fn start_tree(root: u32) -> Option<Meter> {
        Some(Meter {
            pid: root,
            tree: true,
            t0: Instant::now(),
            ticks0: tree_cpu_ticks(root)?,
            machine0: machine_busy(),
            rss_samples: tree_rss_bytes(root).into_iter().collect(),
        })
    }

    fn ticks(&self) -> Option<u64> {
        if self.tree {
            tree_cpu_ticks(self.pid)
        } else {
            cpu_ticks(self.pid)
        }
    }

    pub fn sample(&mut self) {
        let r = if self.tree {
            tree_rss_bytes(self.pid)
        } else {
            rss_bytes(self.pid)
        };
        if let Some(r) = r {
            self.rss_samples.push(r);
        }
    }

    pub fn finish(mut self) -> Option<Usage> {
        self.sample();
        let secs = self.t0.elapsed().as_secs_f64();
        let ticks = self.ticks()?.saturating_sub(self.ticks0);
        let machine_busy_pct = match (self.machine0, machine_busy()) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => 100.0 * (b1 - b0) as f64 / (t1 - t0) as f64,
            _ => 0.0,
        };
        let n = self.rss_samples.len().max(1) as u64;
        Some(Usage {
            secs,
            cpu_pct: 100.0 * ticks as f64 / ticks_per_sec() / secs,
            rss_mean: self.rss_samples.iter().sum::<u64>() / n,
            rss_max: self.rss_samples.iter().copied().max().unwrap_or(0),
            rss_end: self.rss_samples.last().copied().unwrap_or(0),
            pss_end: if self.tree {
                tree_pss_bytes(self.pid)
            } else {
                pss_bytes(self.pid)
            }
            .unwrap_or(0),
            procs: if self.tree { tree(self.pid).len() } else { 1 },
            machine_busy_pct,
        })
    }
}

/// Sample several meters once a second for `d`.
pub async fn watch(meters: &mut [Meter], d: Duration) {
    let end = tokio::time::Instant::now() + d;
    while tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for m in meters.iter_mut() {
            m.sample();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ticks_survive_odd_command_names() {
        let s = "1234 (out post) (x)) S 1 1234 1234 0 -1 4194560 500 0 0 0 17 4 0 0 20 0 3 0 100 1000 200";
        assert_eq!(parse_stat_cpu_ticks(s), Some(21));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn kb_fields() {
        let status = "Name:\toutpost\nVmRSS:\t    9876 kB\nThreads:\t3\n";
        assert_eq!(parse_kb_field(status, "VmRSS"), Some(9876 * 1024));
        assert_eq!(parse_kb_field(status, "VmHWM"), None);
        let rollup = "55d0-7ff [rollup]\nRss:  100 kB\nPss:  80 kB\nPss_Anon: 60 kB\n";
        assert_eq!(parse_kb_field(rollup, "Pss"), Some(80 * 1024));
    }

    #[test]
    fn parents_and_reaped_children() {
        let s = "77 (postgres) S 1 77 77 0 -1 4194560 500 0 0 0 17 4 30 12 20 0 1 0 100 1000 200";
        assert_eq!(parse_stat_ppid_and_child_ticks(s), Some((1, 42)));
        assert_eq!(parse_stat_ppid_and_child_ticks("77 (x) S"), None);
    }

    #[test]
    fn a_tree_is_its_root_and_everything_below() {
        // 10 -> 11, 12; 12 -> 13; 20 is elsewhere; 1 is init
        let pairs = [(10, 1), (11, 10), (12, 10), (13, 12), (20, 1), (1, 0)];
        let mut t = descendants(10, &pairs);
        t.sort();
        assert_eq!(t, vec![10, 11, 12, 13]);
        assert_eq!(descendants(13, &pairs), vec![13]);
    }

    #[test]
    fn this_process_is_a_tree_of_at_least_itself() {
        let me = std::process::id();
        assert!(tree(me).contains(&me));
        let m = Meter::start_tree(me).expect("our own process is readable");
        let u = m.finish().expect("still running");
        assert!(u.procs >= 1 && u.rss_end > 0, "{u:?}");
    }

    #[test]
    fn machine_totals() {
        let t = "cpu  10 0 5 80 5 0 0 0 0 0\ncpu0 1 2 3 4\n";
        assert_eq!(parse_proc_stat_total(t), Some((15, 100)));
    }
}
