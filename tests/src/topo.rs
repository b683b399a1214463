//! The test topology of DESIGN §7: a pod netns joined by veth to a node
//! netns that runs `localdns-user`, and an upstream netns running NSD with
//! the test zones. Everything is torn down on drop (fields drop in order:
//! processes first, then namespaces, then files).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::netns::{Netns, Proc, TempDir, start_nsd, unique_tag, wait_for};

pub const VNET: &str = "169.254.10.10";
pub const KUBE: &str = "169.254.10.11";
pub const POD_IP: &str = "169.254.100.2";
pub const UPSTREAM_IP: &str = "169.254.200.2";

const EXAMPLE_ZONE: &str = "$ORIGIN example.test.
$TTL 300
@ IN SOA ns.example.test. admin.example.test. 1 3600 600 86400 60
@ IN NS ns
ns IN A 192.0.2.53
www IN A 192.0.2.10
www IN AAAA 2001:db8::10
alias IN CNAME www
";

const CLUSTER_ZONE: &str = "$ORIGIN cluster.local.
$TTL 30
@ IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5
@ IN NS ns.dns
ns.dns IN A 10.0.0.10
kubernetes.default.svc IN A 10.0.0.1
kube-dns.kube-system.svc IN A 10.0.0.10
";

/// Path of the daemon binary under test.
pub fn daemon_bin() -> PathBuf {
    let p = std::env::var_os("LOCALDNS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/localdns-user")
        });
    assert!(
        p.exists(),
        "{} missing: build it first (`cargo xtask test` does)",
        p.display()
    );
    p
}

pub struct Topo {
    pub daemon: Option<Proc>,
    nsd: Option<Proc>,
    pub pod: Netns,
    pub node: Netns,
    pub upstream: Netns,
    pub dir: TempDir,
    pub tag: String,
}

impl Topo {
    /// Namespaces, veths, addresses, and NSD serving the test zones.
    #[expect(
        clippy::new_without_default,
        reason = "building a topology has side effects; Default would hide them"
    )]
    pub fn new() -> Topo {
        assert!(
            crate::is_root(),
            "network namespace tests need root (CI runs as root)"
        );
        let tag = unique_tag();
        let dir = TempDir::new(&tag);
        let node = Netns::new(format!("{tag}-node"));
        let pod = Netns::new(format!("{tag}-pod"));
        let upstream = Netns::new(format!("{tag}-up"));
        crate::netns::ip(&[
            "link", "add", "vpod0", "netns", &node.name, "type", "veth", "peer", "name", "eth0",
            "netns", &pod.name,
        ]);
        crate::netns::ip(&[
            "link",
            "add",
            "vup0",
            "netns",
            &node.name,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &upstream.name,
        ]);
        node.ip(&["addr", "add", "169.254.100.1/30", "dev", "vpod0"]);
        node.ip(&["addr", "add", "169.254.200.1/24", "dev", "vup0"]);
        node.ip(&["link", "set", "vpod0", "up"]);
        node.ip(&["link", "set", "vup0", "up"]);
        pod.ip(&["addr", "add", "169.254.100.2/30", "dev", "eth0"]);
        pod.ip(&["link", "set", "eth0", "up"]);
        pod.ip(&["route", "add", "default", "via", "169.254.100.1"]);
        upstream.ip(&["addr", "add", "169.254.200.2/24", "dev", "eth0"]);
        upstream.ip(&["link", "set", "eth0", "up"]);
        upstream.ip(&["route", "add", "default", "via", "169.254.200.1"]);
        let mut t = Topo {
            daemon: None,
            nsd: None,
            pod,
            node,
            upstream,
            dir,
            tag,
        };
        t.start_nsd();
        t
    }

    fn start_nsd(&mut self) {
        let zones = [
            ("example.test", EXAMPLE_ZONE),
            ("cluster.local", CLUSTER_ZONE),
        ];
        let tuning = "  server-count: 1\n  tcp-count: 256\n";
        self.nsd = Some(start_nsd(
            &self.upstream,
            &self.dir.path,
            UPSTREAM_IP,
            &zones,
            tuning,
            "www.example.test",
        ));
    }

    /// Adds another address to the upstream netns (for fake upstreams).
    pub fn add_upstream_ip(&self, ip: &str) {
        self.upstream
            .ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    }

    /// True while the daemon process has not exited.
    pub fn daemon_alive(&mut self) -> bool {
        self.daemon
            .as_mut()
            .is_some_and(|d| matches!(d.child.try_wait(), Ok(None)))
    }

    pub fn pin_path(&self) -> String {
        format!("/sys/fs/bpf/localdns-{}", self.tag)
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path.join("daemon.log")).unwrap_or_default()
    }

    /// Starts `localdns-user` in the node netns with `extra` options and
    /// waits until it is ready.
    pub fn start_daemon(&mut self, extra: &[&str]) {
        let mut args = vec!["--vnet-dns", UPSTREAM_IP, "--cluster-dns", UPSTREAM_IP];
        args.extend_from_slice(extra);
        self.start_daemon_raw(&args);
    }

    /// Like [`Topo::start_daemon`] without the default (NSD) upstreams.
    pub fn start_daemon_raw(&mut self, extra: &[&str]) {
        let mut cmd = self.node.cmd(daemon_bin().to_str().unwrap());
        cmd.args(["--metrics", "none", "--health", "none"]);
        cmd.args(["--pin-path", &self.pin_path()]);
        cmd.args(extra);
        cmd.env("RUST_LOG", "info");
        self.daemon = Some(Proc::spawn(
            cmd,
            "localdns-user",
            &self.dir.path.join("daemon.log"),
        ));
        let ready = wait_for(Duration::from_secs(20), || {
            if let Some(d) = self.daemon.as_mut()
                && let Ok(Some(st)) = d.child.try_wait()
            {
                panic!("daemon exited ({st}):\n{}", self.daemon_log());
            }
            self.daemon_log().contains("localdns ready").then_some(())
        });
        assert!(ready.is_some(), "daemon not ready:\n{}", self.daemon_log());
    }

    /// `dig` from `ns` (pod or node); returns (status, answer lines).
    pub fn dig_in(
        &self,
        ns: &Netns,
        server: &str,
        name: &str,
        qtype: &str,
    ) -> Option<(String, Vec<String>)> {
        let o = ns.output(
            "dig",
            &[
                "+tries=1",
                "+time=2",
                "+noquestion",
                "+nostats",
                "+noauthority",
                "+noadditional",
                &format!("@{server}"),
                name,
                qtype,
            ],
        );
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let status = text
            .split("status: ")
            .nth(1)?
            .split(',')
            .next()?
            .to_string();
        let answers = text
            .lines()
            .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        Some((status, answers))
    }

    pub fn dig(&self, server: &str, name: &str, qtype: &str) -> Option<(String, Vec<String>)> {
        self.dig_in(&self.pod, server, name, qtype)
    }

    /// Kernel counters of the running daemon, via `localdns-user cache stats`
    /// in the daemon's mount and network namespaces.
    pub fn kernel_stat(&self, name: &str) -> u64 {
        let pid = self.daemon.as_ref().expect("daemon running").pid();
        let out = Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-m", "-n"])
            .arg(daemon_bin())
            .args(["cache", "stats", "--pin-path", &self.pin_path()])
            .output()
            .expect("nsenter");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == name).then(|| v.trim().parse().ok())?
            })
            .unwrap_or_else(|| {
                panic!(
                    "no counter {name} in:\n{text}{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
    }
}

/// The AKS sample profile (the daemon's embedded default config).
pub const SAMPLE_CONFIG: &str = include_str!("../../localdns-user/default-localdnsconfig.json");

/// The sample with one setting changed in one zone block: the first `from`
/// after the `nth` (0-based) occurrence of `zone_key` becomes `to`. The
/// sample lists vnet ".", vnet "cluster.local", kube ".", kube "cluster.local".
pub fn sample_with(zone_key: &str, nth: usize, from: &str, to: &str) -> String {
    let (block, _) = SAMPLE_CONFIG
        .match_indices(zone_key)
        .nth(nth)
        .expect("zone block in the sample");
    let at = block
        + SAMPLE_CONFIG[block..]
            .find(from)
            .expect("setting in the block");
    format!(
        "{}{to}{}",
        &SAMPLE_CONFIG[..at],
        &SAMPLE_CONFIG[at + from.len()..]
    )
}
