//! The test topology of DESIGN §7: a pod netns joined by veth to a node
//! netns that runs `localdns-user`, and an upstream netns running NSD with
//! the test zones. Everything is torn down on drop (fields drop in order:
//! processes first, then namespaces, then files).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::netns::{BpfFs, Netns, Proc, TempDir, join, start_nsd, unique_tag, wait_for};

pub const VNET: &str = "169.254.10.10";
pub const KUBE: &str = "169.254.10.11";
pub const POD_IP: &str = "169.254.100.2";
pub const UPSTREAM_IP: &str = "169.254.200.2";
/// IPv6 listener addresses (DESIGN §7: `fd00::/8` inside test namespaces).
pub const VNET6: &str = "fd00:10::10";
pub const KUBE6: &str = "fd00:10::11";
pub const POD_IP6: &str = "fd00:100::2";
pub const UPSTREAM_IP6: &str = "fd00:200::2";

/// Listener options for both families in both views.
pub const DUAL_STACK: [&str; 8] = [
    "--vnet-listen",
    VNET,
    "--vnet-listen",
    VNET6,
    "--kube-listen",
    KUBE,
    "--kube-listen",
    KUBE6,
];

const EXAMPLE_ZONE: &str = "$ORIGIN example.test.
$TTL 300
@ IN SOA ns.example.test. admin.example.test. 1 3600 600 86400 60
@ IN NS ns
ns IN A 192.0.2.53
www IN A 192.0.2.10
www IN AAAA 2001:db8::10
alias IN CNAME www
*.fresh IN A 192.0.2.77
";

/// Records of example.test that make large answers: `mid` (~520 bytes, more
/// than a 512-byte client takes) and `big` (~1000 bytes of TXT, ~1150 with
/// its RRSIG: under 1232).
fn large_records() -> String {
    let s = |c: char, n: usize| std::iter::repeat_n(c, n).collect::<String>();
    format!(
        "mid IN TXT \"{}\" \"{}\"\nbig IN TXT \"{}\" \"{}\" \"{}\" \"{}\"\n",
        s('m', 250),
        s('n', 250),
        s('a', 240),
        s('b', 240),
        s('c', 240),
        s('d', 240)
    )
}

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
    /// The node's bpffs (pins survive daemon restarts; unmounted last).
    pub bpffs: BpfFs,
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
        Topo::build(false)
    }

    /// Like [`Topo::new`] with example.test DNSSEC-signed (ECDSA P-256,
    /// NSEC) by `ldns-signzone`, and NSD giving minimal responses, so an
    /// answer has the same records whatever the asker's buffer size.
    pub fn signed() -> Topo {
        Topo::build(true)
    }

    fn build(signed: bool) -> Topo {
        assert!(
            crate::is_root(),
            "network namespace tests need root (CI runs as root)"
        );
        for r in crate::reap::reap_stale_once() {
            eprintln!("removed a killed run's leftover: {r}");
        }
        let tag = unique_tag();
        let dir = TempDir::new(&tag);
        let bpffs = BpfFs::new(dir.path.join("bpffs"));
        let node = Netns::new(format!("{tag}-node"));
        let pod = Netns::new(format!("{tag}-pod"));
        let upstream = Netns::new(format!("{tag}-up"));
        join(&node, "vpod0", &pod, "169.254.100", 30);
        join(&node, "vup0", &upstream, "169.254.200", 24);
        join6(&node, "vpod0", &pod, "fd00:100");
        join6(&node, "vup0", &upstream, "fd00:200");
        let mut t = Topo {
            daemon: None,
            nsd: None,
            pod,
            node,
            upstream,
            bpffs,
            dir,
            tag,
        };
        t.start_nsd(signed);
        t
    }

    fn start_nsd(&mut self, signed: bool) {
        let mut example = format!("{EXAMPLE_ZONE}{}", large_records());
        if signed {
            example = sign_zone(&self.dir.path, "example.test", &example);
        }
        let zones = [
            ("example.test", example.as_str()),
            ("cluster.local", CLUSTER_ZONE),
        ];
        // RRL off: Debian's default limits similar answers (one wildcard)
        // to ~200/s per client network, which load tests exceed.
        let mut tuning = format!(
            "  ip-address: {UPSTREAM_IP6}\n  server-count: 1\n  tcp-count: 256\n  rrl-ratelimit: 0\n"
        );
        if signed {
            tuning.push_str("  minimal-responses: yes\n");
        }
        self.nsd = Some(start_nsd(
            &self.upstream,
            &self.dir.path,
            UPSTREAM_IP,
            &zones,
            &tuning,
            "www.example.test",
        ));
    }

    /// A pod created now, joined to the node by a veth named `host_if` on
    /// the node's side, in `169.254.<net>.0/30` and `fd00:<net>::/64` (node
    /// .1/::1, pod .2/::2).
    pub fn add_pod(&self, name: &str, host_if: &str, net: u8) -> Netns {
        let pod = Netns::new(format!("{}-{name}", self.tag));
        join(&self.node, host_if, &pod, &format!("169.254.{net}"), 30);
        join6(&self.node, host_if, &pod, &format!("fd00:{net}"));
        pod
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
        self.bpffs.path.join("localdns").display().to_string()
    }

    pub fn daemon_log(&self) -> String {
        self.log("daemon.log")
    }

    /// A log file of the test directory (daemon instances write their own).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path.join(name)).unwrap_or_default()
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
        self.daemon = Some(self.spawn_daemon(extra, "daemon.log"));
    }

    /// Another daemon instance on this node (same pin path), logging to
    /// `log`; returns once it is ready. For restarts and hand-overs.
    pub fn spawn_daemon(&self, extra: &[&str], log: &str) -> Proc {
        self.spawn_daemon_with(extra, log, |_| {})
    }

    /// [`Topo::spawn_daemon`] with `adjust` applied to the command first
    /// (e.g. to start it inside a cgroup).
    pub fn spawn_daemon_with(
        &self,
        extra: &[&str],
        log: &str,
        adjust: impl FnOnce(&mut std::process::Command),
    ) -> Proc {
        let mut cmd = self.node.cmd(daemon_bin().to_str().unwrap());
        adjust(&mut cmd);
        self.spawn_daemon_cmd(cmd, extra, log)
    }

    /// [`Topo::spawn_daemon`] through `wrapper` (e.g. `setpriv` with a
    /// capability set): `wrapper... localdns-user ...`.
    pub fn spawn_daemon_wrapped(&self, wrapper: &[&str], extra: &[&str], log: &str) -> Proc {
        let mut cmd = self.node.cmd(wrapper[0]);
        cmd.args(&wrapper[1..]).arg(daemon_bin());
        self.spawn_daemon_cmd(cmd, extra, log)
    }

    fn spawn_daemon_cmd(&self, mut cmd: std::process::Command, extra: &[&str], log: &str) -> Proc {
        cmd.args(["--metrics", "none", "--health", "none"]);
        cmd.args(["--pin-path", &self.pin_path()]);
        cmd.args(extra);
        cmd.env("RUST_LOG", "info");
        let mut d = Proc::spawn(cmd, "localdns-user", &self.dir.path.join(log));
        let ready = wait_for(Duration::from_secs(20), || {
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("daemon exited ({st}):\n{}", self.log(log));
            }
            self.log(log).contains("localdns ready").then_some(())
        });
        assert!(ready.is_some(), "daemon not ready:\n{}", self.log(log));
        d
    }

    /// The default upstream options of [`Topo::start_daemon`].
    pub fn upstream_args() -> [&'static str; 4] {
        ["--vnet-dns", UPSTREAM_IP, "--cluster-dns", UPSTREAM_IP]
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
                "+time=4",
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

    /// Kernel counters, via `localdns-user cache stats` on the node's pins
    /// (with or without a daemon running).
    pub fn kernel_stat(&self, name: &str) -> u64 {
        let out = Command::new(daemon_bin())
            .args(["cache", "stats", "--pin-path", &self.pin_path()])
            .output()
            .expect("cache stats");
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

/// Adds IPv6 to a veth made by [`join`]: `<prefix>::1/64` on the node,
/// `<prefix>::2/64` in `other`, whose default route is the node. No DAD, so
/// the addresses work at once.
pub fn join6(node: &Netns, host_if: &str, other: &Netns, prefix: &str) {
    let node_ip = format!("{prefix}::1");
    node.ip(&[
        "addr",
        "add",
        &format!("{node_ip}/64"),
        "dev",
        host_if,
        "nodad",
    ]);
    other.ip(&[
        "addr",
        "add",
        &format!("{prefix}::2/64"),
        "dev",
        "eth0",
        "nodad",
    ]);
    other.ip(&["-6", "route", "add", "default", "via", &node_ip]);
}

/// Signs `text` (the zone `origin`) with a fresh KSK and ZSK made by
/// `ldns-keygen` in `dir`; returns the signed zone text.
pub fn sign_zone(dir: &Path, origin: &str, text: &str) -> String {
    let keys = dir.join("keys");
    std::fs::create_dir_all(&keys).expect("key dir");
    let unsigned = keys.join(format!("{origin}.zone"));
    std::fs::write(&unsigned, text).expect("zone file");
    let keygen = |ksk: bool| {
        let mut c = Command::new("ldns-keygen");
        c.current_dir(&keys).args(["-a", "ECDSAP256SHA256"]);
        if ksk {
            c.arg("-k");
        }
        let out = c.arg(origin).output().expect("ldns-keygen (ldnsutils)");
        assert!(out.status.success(), "ldns-keygen: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let (ksk, zsk) = (keygen(true), keygen(false));
    let out = Command::new("ldns-signzone")
        .current_dir(&keys)
        .args(["-o", origin])
        .arg(&unsigned)
        .args([&ksk, &zsk])
        .output()
        .expect("ldns-signzone (ldnsutils)");
    assert!(out.status.success(), "ldns-signzone: {out:?}");
    std::fs::read_to_string(keys.join(format!("{origin}.zone.signed"))).expect("signed zone")
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
