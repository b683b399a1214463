//! The VnetDNS upstreams when none are given: the node's resolv.conf
//! nameservers (read with the `resolv-conf` crate), without our own
//! listener addresses (a node already pointed at us must not forward to
//! itself). When resolv.conf names only systemd-resolved's stub
//! (127.0.0.53/54), the servers behind it are read from resolved's own
//! list: a node cache behind the stub would add a hop, and the stub may be
//! forwarding to us.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

pub const RESOLV_CONF: &str = "/etc/resolv.conf";
pub const RESOLVED_UPLINKS: &str = "/run/systemd/resolve/resolv.conf";

fn is_resolved_stub(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V4(a) if *a == Ipv4Addr::new(127, 0, 0, 53) || *a == Ipv4Addr::new(127, 0, 0, 54))
}

/// Nameservers of one file; lines that do not parse are skipped (glibc
/// ignores them too), a missing file gives none.
fn nameservers(path: &Path) -> Vec<IpAddr> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    let (cfg, errors) = resolv_conf::Config::parse_with_errors(&bytes);
    for e in errors {
        tracing::warn!(path = %path.display(), error = %e, "resolv.conf line ignored");
    }
    cfg.nameservers.into_iter().map(IpAddr::from).collect()
}

/// The upstreams `resolv_conf` (or, behind the stub, `uplinks`) lists,
/// minus `exclude`.
pub fn upstreams(resolv_conf: &Path, uplinks: &Path, exclude: &[IpAddr]) -> Vec<IpAddr> {
    let mut ips = nameservers(resolv_conf);
    if !ips.is_empty() && ips.iter().all(is_resolved_stub) {
        let real = nameservers(uplinks);
        if !real.is_empty() {
            ips = real;
        }
    }
    ips.retain(|ip| !exclude.contains(ip));
    ips
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("localdns-resolv-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn reads_nameservers_skips_ours_and_looks_behind_the_stub() {
        let d = dir();
        let (main, up) = (d.join("resolv.conf"), d.join("uplinks"));
        let ours: IpAddr = "169.254.10.10".parse().unwrap();
        std::fs::write(
            &main,
            "# node\nsearch x.internal.cloudapp.net\nnameserver 169.254.10.10\n\
             nameserver 168.63.129.16\nnameserver fd00::53\noptions ndots:2 timeout:1\n",
        )
        .unwrap();
        assert_eq!(
            upstreams(&main, &up, &[ours]),
            vec![
                "168.63.129.16".parse::<IpAddr>().unwrap(),
                "fd00::53".parse().unwrap()
            ]
        );
        std::fs::write(&main, "nameserver 127.0.0.53\noptions edns0 trust-ad\n").unwrap();
        assert_eq!(
            upstreams(&main, &up, &[ours]),
            vec!["127.0.0.53".parse::<IpAddr>().unwrap()],
            "stub kept when resolved lists nothing"
        );
        std::fs::write(&up, "nameserver 10.0.0.2\nnameserver 169.254.10.10\n").unwrap();
        assert_eq!(
            upstreams(&main, &up, &[ours]),
            vec!["10.0.0.2".parse::<IpAddr>().unwrap()]
        );
        assert!(upstreams(&d.join("missing"), &up, &[]).is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
