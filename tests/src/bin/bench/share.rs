//! Kernel share of answers under short TTLs: names with TTLs of 5 to 30 s
//! (as Kubernetes service records have) asked with a Zipf distribution
//! (s = 1) at a fixed rate for several TTLs; the share is the kernel's
//! answers over all answers, with prefetch (the default) and without.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};

use crate::Opts;
use crate::contenders::{Kind, kernel_stat, start_with};
use crate::topology::Topo;
use crate::workloads::{dnsperf_fixed, dnsperf_once, field, generate};

/// Names in `short.test`.
pub(crate) const NAMES: usize = 1000;
const RATE: u32 = 10_000;

/// TTL of name `i`: spread over 5..=30 s.
pub(crate) fn ttl(i: usize) -> u32 {
    5 + (i * 7 % 26) as u32
}

fn zipf_file(dir: &Path, lines: usize) -> PathBuf {
    let cum: Vec<f64> = (1..=NAMES)
        .scan(0.0, |acc, i| {
            *acc += 1.0 / i as f64;
            Some(*acc)
        })
        .collect();
    let total = cum[NAMES - 1];
    let mut rng = StdRng::seed_from_u64(42);
    let mut s = String::new();
    for _ in 0..lines {
        let x = rng.random::<f64>() * total;
        let i = cum.partition_point(|&c| c < x).min(NAMES - 1);
        let _ = writeln!(s, "s{i}.short.test A");
    }
    let p = dir.join("zipf.txt");
    std::fs::write(&p, s).unwrap();
    p
}

/// `{secs, rate, names, runs: [{prefetch, kernel, completed, share}]}`.
pub(crate) fn measure(t: &Topo, o: &Opts, raw: &Path) -> Value {
    let secs: u32 = if o.quick { 15 } else { 60 };
    let zipf = zipf_file(&t.dir.path, RATE as usize * 4);
    let mut all = String::new();
    for i in 0..NAMES {
        let _ = writeln!(all, "s{i}.short.test A");
    }
    let all_file = t.dir.path.join("short-all.txt");
    std::fs::write(&all_file, all).unwrap();
    let mut runs = Vec::new();
    for amount in ["2", "0"] {
        let procs = start_with(Kind::Localdns, t, o, &["--prefetch-amount", amount]);
        let tag = format!("share-prefetch{amount}");
        generate(
            t,
            "dnsperf",
            &dnsperf_once(5_000, &all_file),
            &raw.join(format!("{tag}-warmup.txt")),
        );
        let h0 = kernel_stat(t, "hit");
        let a = dnsperf_fixed(secs, RATE, &zipf);
        let (text, _, _) = generate(t, "dnsperf", &a, &raw.join(format!("{tag}.txt")));
        let kernel = kernel_stat(t, "hit") - h0;
        let completed = field(&text, "Queries completed:").unwrap_or(0.0);
        runs.push(json!({
            "prefetch_amount": amount,
            "kernel": kernel,
            "completed": completed,
            "lost": field(&text, "Queries lost:").unwrap_or(0.0),
            "share": kernel as f64 / completed,
        }));
        drop(procs);
        std::thread::sleep(Duration::from_millis(300));
    }
    json!({ "secs": secs, "rate": RATE, "names": NAMES, "runs": runs })
}
