//! The floating address of a failover workload (docs/site-ha.md): added to the site interface
//! when this box takes the copy over, announced with a gratuitous ARP so devices and switches
//! move to this box at once (as keepalived does), removed when it stands down or starts as a
//! standby. Uses `ip` (iproute2) for the address and a raw packet socket for the ARP.

use std::net::Ipv4Addr;
use std::process::Command;

/// Add `vip` (`a.b.c.d/len`) to `iface` and announce it. Returns what failed, if anything.
pub fn take(vip: &str, iface: &str) -> Result<(), String> {
    let o = Command::new("ip")
        .args(["addr", "replace", vip, "dev", iface])
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "ip addr replace {vip} dev {iface}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    let ip: Ipv4Addr = vip
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("{vip} is not an IPv4 address with a prefix"))?;
    // Three announcements, as keepalived sends several: one lost frame must not strand devices.
    for _ in 0..3 {
        gratuitous_arp(ip, iface)?;
    }
    Ok(())
}

/// Remove `vip` from `iface` (nothing to do when it is not there).
pub fn release(vip: &str, iface: &str) {
    let _ = Command::new("ip").args(["addr", "del", vip, "dev", iface]).output();
}

/// One gratuitous ARP request for `ip` from `iface`'s MAC address, broadcast.
fn gratuitous_arp(ip: Ipv4Addr, iface: &str) -> Result<(), String> {
    let sys = |f: &str| std::fs::read_to_string(format!("/sys/class/net/{iface}/{f}"));
    let mac: Vec<u8> = sys("address")
        .map_err(|e| format!("no interface {iface}: {e}"))?
        .trim()
        .split(':')
        .filter_map(|h| u8::from_str_radix(h, 16).ok())
        .collect();
    if mac.len() != 6 {
        return Err(format!("{iface} has no Ethernet address"));
    }
    let ifindex: i32 = sys("ifindex")
        .map_err(|e| format!("no interface {iface}: {e}"))?
        .trim()
        .parse()
        .map_err(|_| format!("{iface}: unreadable ifindex"))?;
    let mut frame = Vec::with_capacity(42);
    frame.extend([0xff; 6]);
    frame.extend(&mac);
    frame.extend([0x08, 0x06]); // ARP
    frame.extend([0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]); // Ethernet/IPv4, request
    frame.extend(&mac);
    frame.extend(ip.octets());
    frame.extend([0; 6]);
    frame.extend(ip.octets());
    // SAFETY: plain socket(2)/sendto(2)/close(2) on a descriptor this function owns, with a
    // sockaddr_ll that lives across the call.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (libc::ETH_P_ARP as u16).to_be() as i32);
        if fd < 0 {
            return Err(format!("raw socket: {}", std::io::Error::last_os_error()));
        }
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
        addr.sll_ifindex = ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        let n = libc::sendto(
            fd,
            frame.as_ptr() as *const libc::c_void,
            frame.len(),
            0,
            &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if n < 0 {
            return Err(format!("gratuitous ARP on {iface}: {err}"));
        }
    }
    Ok(())
}
