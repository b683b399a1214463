//! Per-hit BPF cost against the size of the warm set: localdns's fast path
//! and the null responder at one fixed offered rate (kxdpgun), for warm
//! sets of 50 to 50,000 names (A only: one kernel entry per name), then
//! each at saturation (the rate ratio against the set). The fast path's
//! live cost grows with the set (cache and TLB misses on the map's
//! memory); the null responder touches no map and stays flat; the floor
//! (the null responder plus one 64-byte read per name) shows what one cold
//! touch of per-name memory costs, whatever the cache's design.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::Opts;
use crate::contenders::{Kind, bpf_run, kernel_stat, start_with};
use crate::topology::Topo;
use crate::workloads::{
    SATURATION, dnsperf_once, field, generate, kxdpgun_args, kxdpgun_replies, median,
};

const SIZES_FULL: [usize; 6] = [50, 500, 2000, 5000, 20000, 50000];
const SIZES_QUICK: [usize; 3] = [50, 2000, 20000];
/// Default offered rate: well below every ceiling, so the cost is per
/// packet, not a queue's. The cost depends on it (how long since the entry
/// was last touched): `--warmset-rate=N` measures another.
pub(crate) const RATE: u32 = 100_000;

pub(crate) fn sizes(o: &Opts) -> &'static [usize] {
    if o.quick { &SIZES_QUICK } else { &SIZES_FULL }
}

/// The largest warm set (the zone holds at least that many names).
pub(crate) fn most(o: &Opts) -> usize {
    sizes(o).iter().copied().max().unwrap_or(0)
}

fn names_file(dir: &Path, n: usize) -> PathBuf {
    let mut s = String::new();
    for i in 0..n {
        let _ = writeln!(s, "h{i}.bench.test A");
    }
    let p = dir.join(format!("warmset-{n}.txt"));
    std::fs::write(&p, s).unwrap();
    p
}

/// One contender over every size: `{name, rows: [{names, bpf_ns_per_run,
/// replies_per_s, sat_bpf_ns_per_run, sat_replies_per_s}]}`.
pub(crate) fn sweep(k: Kind, t: &Topo, o: &Opts, raw: &Path) -> Value {
    // The userspace cache is the kernel map's source (names it evicts
    // leave the map): as large as the map, so that the 50,000 names all
    // stay hits (the default 30,000 would send some to the daemon).
    let procs = start_with(k, t, o, &["--cache-success", "65536"]);
    let slug = k.slug();
    if k == Kind::Localdns {
        // Every name of the largest set cached once (not counted).
        let f = names_file(&t.dir.path, most(o));
        generate(
            t,
            "dnsperf",
            &dnsperf_once(20_000, &f),
            &raw.join(format!("{slug}-warmset-warmup.txt")),
        );
    }
    let mut rows = Vec::new();
    for &n in sizes(o) {
        let f = names_file(&t.dir.path, n);
        let offered = o.warmset_rate.to_string();
        // Medians of `runs` runs each: one 5-second run moves by up to a
        // third on this VM.
        let (mut ns, mut replies, mut sat_ns, mut sat_replies, mut ok) =
            (vec![], vec![], vec![], vec![], true);
        // The least share of a run's queries the kernel answered: the
        // cost is per hit only where nearly all are (the daemon answers
        // the names the map has no room for, and a miss costs less BPF
        // time than a hit).
        let mut share = f64::INFINITY;
        for i in 0..o.runs {
            for (rate, tag, cost, answered) in [
                (offered.as_str(), "", &mut ns, &mut replies),
                (SATURATION, "-sat", &mut sat_ns, &mut sat_replies),
            ] {
                let out = raw.join(format!("{slug}-warmset-{n}{tag}-{i}.txt"));
                let h0 = (k == Kind::Localdns).then(|| kernel_stat(t, "hit"));
                let r = run(t, o, &f, rate, &out);
                if let Some(h0) = h0 {
                    let hits = kernel_stat(t, "hit").saturating_sub(h0);
                    share = share.min(hits as f64 / r.sent);
                }
                cost.push(r.ns);
                answered.push(r.replies);
                ok &= r.all_noerror;
            }
        }
        rows.push(json!({
            "names": n,
            "bpf_ns_per_run": median(&ns),
            "replies_per_s": median(&replies),
            "sat_bpf_ns_per_run": median(&sat_ns),
            "sat_replies_per_s": median(&sat_replies),
            // Every reply a NOERROR hit, or the row measures something else
            // (the report says so).
            "all_noerror": ok,
            "kernel_share": if share.is_finite() { json!(share) } else { Value::Null },
        }));
    }
    drop(procs);
    std::thread::sleep(Duration::from_millis(300));
    json!({ "name": k.name(), "rows": rows })
}

/// What one kxdpgun run measured.
struct Run {
    /// Live BPF ns per run of the program.
    ns: f64,
    replies: f64,
    /// Queries sent.
    sent: f64,
    /// Every query got a NOERROR reply.
    all_noerror: bool,
}

/// One kxdpgun run over `names` at `rate` q/s.
fn run(t: &Topo, o: &Opts, names: &Path, rate: &str, out: &Path) -> Run {
    let (b0, r0) = bpf_run();
    let (text, _, _) = generate(t, "kxdpgun", &kxdpgun_args(o, names, rate), out);
    let (b1, r1) = bpf_run();
    let ns = if r1 > r0 {
        (b1 - b0) as f64 / (r1 - r0) as f64
    } else {
        f64::NAN
    };
    let sent = field(&text, "total queries:").unwrap_or(0.0);
    Run {
        ns,
        replies: kxdpgun_replies(&text),
        sent,
        all_noerror: sent > 0.0 && field(&text, "responded NOERROR:") == Some(sent),
    }
}
