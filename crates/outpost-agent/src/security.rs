//! What the node fills in for a container: the downward API's node-side values, and the
//! credentials a process workload runs with (`securityContext` for `runtimeClassName: process`).
//!
//! Processes share the node's network and PID namespaces (hostNetwork and hostPID hold by
//! construction). Between fork and exec the child, still root, drops capabilities from its
//! bounding set, sets `no_new_privs`, switches group and user, and raises the added
//! capabilities as ambient ones so they survive `exec` of an unprivileged program. Everything
//! is prepared before fork ([`Credentials::prepare`]); the child only makes raw system calls.

use outpost_api::{capability_number, ContainerSpec, NodeField, SecuritySpec, WorkloadSpec};

/// The highest capability number Linux knows today (CAP_CHECKPOINT_RESTORE).
pub const CAP_LAST: u32 = 40;

/// Resolve the node-side downward-API values of a container.
pub fn node_env(node: &str, w: &WorkloadSpec, c: &ContainerSpec) -> Vec<(String, String)> {
    c.node_env
        .iter()
        .map(|(name, f)| {
            let v = match f {
                NodeField::NodeName => node.to_string(),
                NodeField::HostIp | NodeField::PodIp => host_ip(),
                NodeField::PodName => format!("{}-{node}", w.name),
                NodeField::NodeCpu { divisor_millis } => {
                    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
                    (cpus * 1000).div_ceil((*divisor_millis).max(1)).to_string()
                }
                NodeField::NodeMemory { divisor_bytes } => {
                    let total = mem_total_bytes();
                    total.div_ceil((*divisor_bytes).max(1)).to_string()
                }
            };
            (name.clone(), v)
        })
        .collect()
}

/// The node's address as Kubernetes' `status.hostIP` means it: the first non-loopback IPv4
/// address of an interface that is up (IPv6 if there is none), else 127.0.0.1.
pub fn host_ip() -> String {
    let mut v4 = None;
    let mut v6 = None;
    // SAFETY: getifaddrs fills a list we walk read-only and free with freeifaddrs.
    unsafe {
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut list) == 0 {
            let mut cur = list;
            while !cur.is_null() {
                let ifa = &*cur;
                let up = ifa.ifa_flags & libc::IFF_UP as u32 != 0;
                let lo = ifa.ifa_flags & libc::IFF_LOOPBACK as u32 != 0;
                if up && !lo && !ifa.ifa_addr.is_null() {
                    match (*ifa.ifa_addr).sa_family as i32 {
                        libc::AF_INET if v4.is_none() => {
                            let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                            v4 = Some(std::net::Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)).to_string());
                        }
                        libc::AF_INET6 if v6.is_none() => {
                            let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                            let ip = std::net::Ipv6Addr::from(sa.sin6_addr.s6_addr);
                            if !ip.is_unicast_link_local() {
                                v6 = Some(ip.to_string());
                            }
                        }
                        _ => {}
                    }
                }
                cur = ifa.ifa_next;
            }
            libc::freeifaddrs(list);
        }
    }
    v4.or(v6).unwrap_or_else(|| "127.0.0.1".into())
}

fn mem_total_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// A process's credentials, computed before fork.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    drop_bounding: Vec<u32>,
    ambient: Vec<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    no_new_privs: bool,
}

impl Credentials {
    /// Refuses what a process cannot be given, with the reason.
    pub fn prepare(sec: &SecuritySpec) -> Result<Self, String> {
        let caps = |names: &[String]| -> Vec<u32> {
            if names.iter().any(|n| n == "ALL") {
                (0..=CAP_LAST).collect()
            } else {
                names.iter().filter_map(|n| capability_number(n)).collect()
            }
        };
        let drop = caps(&sec.cap_drop);
        let add = caps(&sec.cap_add);
        if sec.run_as_non_root && sec.run_as_user.is_none_or(|u| u == 0) {
            return Err("runAsNonRoot is set but the process would run as root; set runAsUser".into());
        }
        let root = nix::unistd::geteuid().is_root();
        let switching = sec.run_as_user.is_some_and(|u| u != nix::unistd::geteuid().as_raw())
            || sec.run_as_group.is_some_and(|g| g != nix::unistd::getegid().as_raw());
        if (switching || !drop.is_empty() || !add.is_empty()) && !root {
            return Err(
                "runAsUser/runAsGroup and capabilities need the agent to run as root to apply them to a process; \
                 run the agent as root or remove them"
                    .into(),
            );
        }
        Ok(Self {
            drop_bounding: drop.iter().copied().filter(|c| !add.contains(c)).collect(),
            // Added capabilities are raised as ambient ones only for a non-root user: root
            // keeps every capability of its bounding set across exec anyway.
            ambient: if sec.run_as_user.is_some_and(|u| u != 0) {
                add
            } else {
                Vec::new()
            },
            uid: sec.run_as_user,
            gid: sec.run_as_group,
            no_new_privs: sec.no_new_privileges,
        })
    }

    pub fn is_noop(&self) -> bool {
        self.drop_bounding.is_empty()
            && self.ambient.is_empty()
            && self.uid.is_none()
            && self.gid.is_none()
            && !self.no_new_privs
    }

    /// Runs in the child between fork and exec: only raw system calls.
    ///
    /// # Safety
    /// Call only in a forked child before exec.
    pub unsafe fn apply(&self) -> std::io::Result<()> {
        let err = || Err(std::io::Error::last_os_error());
        for c in &self.drop_bounding {
            if libc::prctl(libc::PR_CAPBSET_DROP, *c as libc::c_ulong, 0, 0, 0) != 0 {
                // A capability the kernel does not know is not in the set: nothing to drop.
                if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
                    return err();
                }
            }
        }
        if !self.ambient.is_empty() && libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0 {
            return err();
        }
        if let Some(g) = self.gid {
            if libc::setgroups(1, &g) != 0 || libc::setresgid(g, g, g) != 0 {
                return err();
            }
        } else if self.uid.is_some() && libc::setgroups(0, std::ptr::null()) != 0 {
            return err();
        }
        if let Some(u) = self.uid {
            if libc::setresuid(u, u, u) != 0 {
                return err();
            }
        }
        if !self.ambient.is_empty() {
            let mut mask = [0u32; 2];
            for c in &self.ambient {
                mask[(*c / 32) as usize] |= 1 << (c % 32);
            }
            let mut hdr = CapHeader {
                version: 0x2008_0522,
                pid: 0,
            };
            let data = [
                CapData {
                    effective: mask[0],
                    permitted: mask[0],
                    inheritable: mask[0],
                },
                CapData {
                    effective: mask[1],
                    permitted: mask[1],
                    inheritable: mask[1],
                },
            ];
            if libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) != 0 {
                return err();
            }
            for c in &self.ambient {
                if libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    *c as libc::c_ulong,
                    0,
                    0,
                ) != 0
                {
                    return err();
                }
            }
        }
        if self.no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return err();
        }
        Ok(())
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}
