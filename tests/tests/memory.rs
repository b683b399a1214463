//! Memory inside AKS's slice: the daemon (BPF maps included) in a memory
//! cgroup limited to 128 MiB, as `localdns.slice` runs it, through a flood
//! of unique names, with a hot name asked all along.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use localdns_tests::cgroup::MemCgroup;
use localdns_tests::load::{Load, Spec, Target};
use localdns_tests::scrape::{scrape, sum};
use localdns_tests::topo::{Topo, UPSTREAM_IP, VNET};

const MIB: u64 = 1 << 20;
const LIMIT: u64 = 128 * MIB;

#[test]
fn a_flood_of_unique_names_stays_inside_128_mib() {
    let mut t = Topo::new();
    let cg = MemCgroup::new(&t.tag, LIMIT);
    let args = [
        "--iface",
        "vpod*",
        "--vnet-dns",
        UPSTREAM_IP,
        "--cluster-dns",
        UPSTREAM_IP,
        "--metrics",
        "169.254.100.1:9253",
    ];
    t.daemon = Some(t.spawn_daemon_with(&args, "daemon.log", |c| cg.enter_on_spawn(c)));
    let start = cg.usage();
    // 12,500 queries a second for 14 s: 157,500 unique names, all misses
    // answered by NSD's wildcard, and a cached name every tenth query.
    let spec = Spec {
        server: SocketAddr::new(VNET.parse().unwrap(), 53),
        rate: 12_500,
        duration: Duration::from_secs(14),
        timeout: Duration::from_secs(2),
        targets: (0..9)
            .map(|_| Target::Unique {
                suffix: "fresh.example.test.".into(),
                addr: Ipv4Addr::new(192, 0, 2, 77),
            })
            .chain([Target::Fixed {
                name: "www.example.test.".into(),
                addr: Ipv4Addr::new(192, 0, 2, 10),
            }])
            .collect(),
    };
    let report = Load::start(&t.pod, spec).finish();
    let unique = report.sent(|i| i < 9);
    let failed = report.failed(|_| true).len();
    let (peak, now) = (cg.peak(), cg.usage());
    assert!(t.daemon_alive(), "daemon died:\n{}", t.daemon_log());
    // Memory per userspace cache entry: what the cgroup grew by since
    // ready (the kernel maps are preallocated before it: their memory is
    // in `start`), over the entries the daemon holds now.
    let m = scrape(&t.pod, "http://169.254.100.1:9253/metrics");
    let entries = sum(&m, "coredns_cache_entries", &[]);
    let kernel = sum(&m, "localdns_kernel_cache_entries", &[]);
    let per_entry = now.saturating_sub(start) as f64 / entries;
    eprintln!(
        "memory: {unique} unique names, {failed} failed of {}; cgroup usage at ready {:.1} MiB, peak {:.1} MiB of {} MiB, now {:.1} MiB with {entries} userspace cache entries ({per_entry:.0} bytes each since ready) and {kernel} kernel entries; OOM kills {}",
        report.outcomes.len(),
        start as f64 / MIB as f64,
        peak as f64 / MIB as f64,
        LIMIT / MIB,
        now as f64 / MIB as f64,
        cg.oom_kills()
    );
    assert_eq!(cg.oom_kills(), 0);
    assert!(unique >= 150_000, "only {unique} unique names sent");
    // The default cache is full (30,000 answers, of 157,500 names).
    assert!(entries >= 25_000.0, "{entries} userspace entries");
    assert!(
        per_entry < 2048.0,
        "{per_entry:.0} bytes per userspace entry"
    );
    assert!(
        peak <= LIMIT * 3 / 4,
        "peak {:.1} MiB over three quarters of the limit",
        peak as f64 / MIB as f64
    );
    // Overload may cost some misses, never the daemon.
    assert!(
        failed * 100 <= report.outcomes.len(),
        "{failed} failed: {}",
        report.sample(|_| true)
    );
}
