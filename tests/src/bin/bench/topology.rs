//! The benchmark's network: client netns --veth-- node netns --veth--
//! upstream netns (NSD with the bench zones), built from the tests'
//! namespace guards, so everything is torn down on drop.

use std::fmt::Write as _;

use localdns_tests::netns::{BpfFs, Netns, Proc, TempDir, join, start_nsd, unique_tag};

use crate::Opts;

pub(crate) const LISTEN: &str = "169.254.10.10";

pub(crate) const UPSTREAM: &str = "169.254.60.2";

pub(crate) struct Topo {
    /// Held so NSD is stopped (first) when the topology drops.
    pub(crate) _nsd: Proc,
    pub(crate) client: Netns,
    pub(crate) node: Netns,
    /// Held so the upstream netns lives as long as the topology.
    pub(crate) _up: Netns,
    /// The daemon's pins, visible from here (`ip netns exec` gives each
    /// process its own /sys); unmounted (so unpinned) on drop.
    bpffs: BpfFs,
    pub(crate) dir: TempDir,
}

pub(crate) fn setup(o: &Opts) -> Topo {
    let tag = unique_tag();
    let dir = TempDir::new(&format!("bench-{tag}"));
    let node = Netns::new(format!("{tag}-bnode"));
    let client = Netns::new(format!("{tag}-bcli"));
    let up = Netns::new(format!("{tag}-bup"));
    join(&node, "vcl0", &client, "169.254.50", 24);
    join(&node, "vup0", &up, "169.254.60", 24);
    // Listener addresses for every contender (localdns keeps them as found).
    node.ip(&["addr", "add", "169.254.10.10/32", "dev", "lo"]);
    node.ip(&["addr", "add", "169.254.10.11/32", "dev", "lo"]);
    let d = dir.path.clone();
    let mut zone = String::from(
        "$ORIGIN bench.test.\n$TTL 3600\n@ IN SOA ns admin 1 3600 600 86400 3600\n@ IN NS ns\nns IN A 192.0.2.53\n",
    );
    // The warm-set sweep reaches further than W1's names.
    for i in 0..o.names.max(crate::warmset::most(o)) {
        let _ = writeln!(
            zone,
            "h{i} IN A 10.{}.{}.{}\nh{i} IN AAAA 2001:db8::{:x}",
            (i >> 16) & 255,
            (i >> 8) & 255,
            i & 255,
            i
        );
    }
    let miss = "$ORIGIN miss.test.\n$TTL 3600\n@ IN SOA ns admin 1 3600 600 86400 3600\n@ IN NS ns\nns IN A 192.0.2.53\n* IN A 10.9.9.9\n";
    let cluster = "$ORIGIN cluster.local.\n$TTL 30\n@ IN SOA ns.dns hostmaster 1 7200 1800 86400 5\n@ IN NS ns.dns\nns.dns IN A 10.0.0.10\n*.svc IN A 10.96.0.1\n";
    // Short TTLs (5-30 s, as Kubernetes service records have) for the
    // kernel-share workload.
    let mut short = String::from(
        "$ORIGIN short.test.\n$TTL 30\n@ IN SOA ns admin 1 3600 600 86400 5\n@ IN NS ns\nns IN A 192.0.2.53\n",
    );
    for i in 0..crate::share::NAMES {
        let _ = writeln!(
            short,
            "s{i} {} IN A 10.77.{}.{}",
            crate::share::ttl(i),
            i >> 8,
            i & 255
        );
    }
    // RRL off: with it, every wildcard answer shares one bucket, which
    // throttles the UDP forwarders and not localdns's TCP path.
    let tuning =
        "  server-count: 2\n  tcp-count: 1000\n  rrl-ratelimit: 0\n  rrl-whitelist-ratelimit: 0\n";
    let zones = [
        ("bench.test", zone.as_str()),
        ("miss.test", miss),
        ("cluster.local", cluster),
        ("short.test", short.as_str()),
    ];
    let nsd = start_nsd(&up, &d, UPSTREAM, &zones, tuning, "h0.bench.test");
    let bpffs = BpfFs::new(dir.path.join("bpffs"));
    Topo {
        bpffs,
        _nsd: nsd,
        client,
        node,
        _up: up,
        dir,
    }
}

impl Topo {
    /// The daemon's `--pin-path`.
    pub(crate) fn pin_path(&self) -> String {
        self.bpffs.path.join("localdns").display().to_string()
    }
}
