//! Memory inside AKS's slice: the daemon (BPF maps included) in a memory
//! cgroup limited to 128 MiB, as `localdns.slice` runs it, through a flood
//! of unique names, with a hot name asked all along.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use localdns_tests::cgroup::MemCgroup;
use localdns_tests::load::{Load, Spec, Target};
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
    let peak = cg.peak();
    let alive = t.daemon_alive();
    eprintln!(
        "memory: {unique} unique names, {failed} failed of {}; cgroup usage at ready {:.1} MiB, peak {:.1} MiB of {} MiB; OOM kills {}",
        report.outcomes.len(),
        start as f64 / MIB as f64,
        peak as f64 / MIB as f64,
        LIMIT / MIB,
        cg.oom_kills()
    );
    assert!(alive, "daemon died:\n{}", t.daemon_log());
    assert_eq!(cg.oom_kills(), 0);
    assert!(unique >= 150_000, "only {unique} unique names sent");
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
