//! The shipped deployment files: the systemd unit and slice pass
//! `systemd-analyze verify`, carry AKS LocalDNS's service settings, and the
//! capability set the unit grants is enough to run the daemon with its
//! kernel fast path, NOTRACK rules and teardown (run under `setpriv` with
//! exactly that bounding set).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use localdns_tests::netns::TempDir;
use localdns_tests::topo::{Topo, VNET, daemon_bin};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `key=value` lines of a unit file (later ones win, like systemd for
/// single-valued keys).
fn unit_keys(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn systemd_unit_and_slice_verify_and_match_aks() {
    let dir = TempDir::new("units");
    let unit = read("deploy/systemd/localdns.service").replace(
        "/usr/local/bin/localdns-user",
        daemon_bin().to_str().unwrap(),
    );
    std::fs::write(dir.path.join("localdns.service"), &unit).unwrap();
    std::fs::write(
        dir.path.join("localdns.slice"),
        read("deploy/systemd/localdns.slice"),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path.join("localdns.service"))
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path.display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Complaints about our own files only (the host's units are not ours).
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("localdns")).collect();
    assert!(out.status.success() && ours.is_empty(), "{stderr}");

    let k = unit_keys(&unit);
    for (key, want) in [
        ("Type", "notify"),
        ("WatchdogSec", "60"),
        ("Restart", "on-failure"),
        ("RestartSec", "2"),
        ("KillMode", "mixed"),
        ("TimeoutStopSec", "30"),
        ("Slice", "localdns.slice"),
        ("NoNewPrivileges", "yes"),
    ] {
        assert_eq!(k.get(key).map(String::as_str), Some(want), "{key}");
    }
    assert!(
        k["Before"]
            .split_whitespace()
            .any(|u| u == "kubelet.service")
    );
    let s = unit_keys(&read("deploy/systemd/localdns.slice"));
    assert_eq!(s["MemoryMax"], "128M");
    assert_eq!(s["CPUQuota"], "200%");
}

/// The capabilities the unit keeps, as `setpriv` names them (`+bpf,...`).
fn unit_caps() -> String {
    let k = unit_keys(&read("deploy/systemd/localdns.service"));
    k["CapabilityBoundingSet"]
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn daemon_runs_with_only_the_units_capabilities() {
    let mut t = Topo::new();
    let bounding = format!("--bounding-set=-all,{}", unit_caps());
    let wrapper = ["setpriv", bounding.as_str(), "--"];
    let mut args = Topo::upstream_args().to_vec();
    args.extend(["--iface", "vpod*", "--fastpath", "required"]);
    t.daemon = Some(t.spawn_daemon_wrapped(&wrapper, &args, "daemon.log"));
    let status = std::fs::read_to_string(format!(
        "/proc/{}/status",
        t.daemon.as_ref().unwrap().child.id()
    ))
    .unwrap_or_default();
    let caps = status
        .lines()
        .find(|l| l.starts_with("CapBnd:"))
        .unwrap_or("")
        .to_string();
    // The whole set would be 000001ffffffffff: this one is smaller.
    assert!(!caps.is_empty() && !caps.ends_with("1ffffffffff"), "{caps}");
    assert_eq!(t.dig(VNET, "www.example.test", "A").unwrap().0, "NOERROR");
    assert_eq!(t.dig(VNET, "www.example.test", "A").unwrap().0, "NOERROR");
    assert!(
        t.kernel_stat("hit") >= 1,
        "no kernel hit:\n{}",
        t.daemon_log()
    );
    let rules = t.node.sh_ok("nft", &["list", "table", "inet", "localdns"]);
    assert!(rules.contains("notrack"), "{rules}");
    assert!(
        !t.daemon_log().contains("ERROR"),
        "errors with the unit's capabilities:\n{}",
        t.daemon_log()
    );
    assert!(
        t.daemon
            .as_mut()
            .unwrap()
            .terminate(std::time::Duration::from_secs(10))
    );
    let out = t
        .node
        .cmd("setpriv")
        .args([bounding.as_str(), "--"])
        .arg(daemon_bin())
        .args(["teardown", "--pin-path", &t.pin_path()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let link = t.node.sh_ok("ip", &["-d", "link", "show", "vpod0"]);
    assert!(!link.contains("prog/xdp"), "{link}");
}
