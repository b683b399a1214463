//! Prefetch keeps hot names in the kernel. Short-TTL names (5 s, as
//! Kubernetes service records have) asked with a Zipf distribution, from an
//! upstream that takes 150 ms: without prefetch every expiry sends the
//! name's queries to the daemon until the upstream answers; with it
//! (CoreDNS semantics: amount 2, the last 10% of the TTL) the kernel's
//! report makes the daemon refresh the entry in place before it expires,
//! and at least 99% of answers come from the kernel.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Duration;

use localdns_tests::fake::FakeUpstream;
use localdns_tests::load::{Load, Spec, Target};
use localdns_tests::topo::{Topo, VNET};

const FAKE: &str = "169.254.200.61";
const ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 61);
const NAMES: usize = 30;

/// Zipf (s = 1) over `NAMES` names: name i appears ~60/i times per round.
fn zipf_targets() -> Vec<Target> {
    let mut round: Vec<(usize, usize)> = (1..=NAMES).map(|i| (i, 60 / i)).collect();
    let mut out = Vec::new();
    // Interleave so a name's queries spread over the round.
    while round.iter().any(|(_, n)| *n > 0) {
        for (i, n) in round.iter_mut() {
            if *n > 0 {
                *n -= 1;
                out.push(Target::Fixed {
                    name: format!("z{i}.short.test."),
                    addr: ANSWER,
                });
            }
        }
    }
    out
}

struct Run {
    sent: usize,
    failed: usize,
    kernel: u64,
    prefetched: String,
}

fn run(prefetch_amount: &str) -> Run {
    let mut t = Topo::new();
    t.add_upstream_ip(FAKE);
    let fake = FakeUpstream::start(&t.upstream, FAKE.parse().unwrap());
    fake.ctl.ttl.store(5, Ordering::Relaxed);
    fake.ctl.delay_ms.store(150, Ordering::Relaxed);
    fake.ctl.set_answer(ANSWER);
    t.start_daemon_raw(&[
        "--iface",
        "vpod*",
        "--vnet-dns",
        FAKE,
        "--cluster-dns",
        FAKE,
        "--prefetch-amount",
        prefetch_amount,
    ]);
    let server = SocketAddr::new(VNET.parse().unwrap(), 53);
    let spec = |rate, secs, targets| Spec {
        server,
        rate,
        duration: Duration::from_secs(secs),
        timeout: Duration::from_secs(1),
        targets,
    };
    // Warm: every name cached once.
    let names: Vec<Target> = (1..=NAMES)
        .map(|i| Target::Fixed {
            name: format!("z{i}.short.test."),
            addr: ANSWER,
        })
        .collect();
    let w = Load::start(&t.pod, spec(200, 1, names)).finish();
    assert!(w.failed(|_| true).is_empty(), "{}", w.sample(|_| true));
    let h0 = t.kernel_stat("hit");
    let r = Load::start(&t.pod, spec(1500, 12, zipf_targets())).finish();
    let kernel = t.kernel_stat("hit") - h0;
    let stats = t.node.sh_ok(
        localdns_tests::topo::daemon_bin().to_str().unwrap(),
        &["cache", "stats", "--pin-path", &t.pin_path()],
    );
    Run {
        sent: r.sent(|_| true),
        failed: r.failed(|_| true).len(),
        kernel,
        prefetched: format!(
            "{} upstream queries; kernel {}",
            fake.ctl.queries(),
            stats
                .lines()
                .filter(|l| l.contains("miss") || l.contains("expired"))
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[test]
fn prefetch_keeps_short_ttl_hot_names_in_the_kernel() {
    let with = run("2");
    let without = run("0");
    let share = |r: &Run| r.kernel as f64 / r.sent as f64;
    println!(
        "kernel share of answers, 5 s TTLs, Zipf over {NAMES} names, 1500 q/s for 12 s, upstream 150 ms: \
         with prefetch {:.4} ({} of {}, {}), without {:.4} ({} of {}, {})",
        share(&with),
        with.kernel,
        with.sent,
        with.prefetched,
        share(&without),
        without.kernel,
        without.sent,
        without.prefetched
    );
    assert_eq!(with.failed, 0);
    assert_eq!(without.failed, 0);
    assert!(share(&with) >= 0.99, "with prefetch: {:.4}", share(&with));
    assert!(
        share(&without) < share(&with),
        "prefetch made no difference"
    );
}
