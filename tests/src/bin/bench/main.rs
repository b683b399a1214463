//! `cargo xtask bench [--quick]`: localdns against Unbound, dnsdist, Knot
//! Resolver and dnsmasq, side by side, on one machine, in one run.
//!
//! Topology (DESIGN §7): client netns --veth-- node netns --veth-- upstream
//! netns (NSD with the test zones). Each contender runs alone in the node
//! netns on 169.254.10.10:53 with the configs under `bench/`. The null
//! responder (XDP turning queries straight around) is the ceiling.
//!
//! Workloads: W1 100% hits over a warm set (A/AAAA, mixed case), W2 90%
//! hits and 10% unique misses, W3 misses only (cluster.local, which localdns
//! sends to ClusterCoreDNS over TCP). Load: kxdpgun (AF_XDP) and dnsperf. Every
//! number in the table comes from a raw output file kept next to it.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde_json::json;

mod contenders;
mod losses;
mod memlat;
mod report;
mod share;
mod topology;
mod warmset;
mod workloads;

use contenders::Kind;
use report::{plot, plot_warmset, table, update_readme};
use topology::setup;
use workloads::{measure, prog_test_run_ns, write_query_files};

pub(crate) struct Opts {
    pub(crate) quick: bool,
    pub(crate) names: usize,
    pub(crate) secs: u32,
    pub(crate) runs: usize,
    pub(crate) fixed_qps: u32,
    /// Offered rate of the warm-set sweep (`--warmset-rate=N`).
    pub(crate) warmset_rate: u32,
    /// The daemon's `--fastpath-entries` (`--fastpath-entries=N`): room
    /// for the largest warm set, and the kernel table's footprint.
    pub(crate) fastpath_entries: u32,
    pub(crate) out: PathBuf,
    pub(crate) repo: PathBuf,
}

pub(crate) fn main() {
    clean_up_on_signal();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    if let Some(dir) = args.iter().find_map(|a| a.strip_prefix("--report=")) {
        return report_again(&repo, dir);
    }
    let stamp = chrono_stamp();
    let out = if quick {
        repo.join("target/bench-quick")
    } else {
        repo.join("docs/bench")
    };
    let o = Opts {
        quick,
        names: args
            .iter()
            .find_map(|a| a.strip_prefix("--names=")?.parse().ok())
            .unwrap_or(if quick { 2000 } else { 10000 }),
        secs: if quick { 2 } else { 5 },
        runs: if quick { 1 } else { 3 },
        fixed_qps: 20000,
        warmset_rate: args
            .iter()
            .find_map(|a| a.strip_prefix("--warmset-rate=")?.parse().ok())
            .unwrap_or(warmset::RATE),
        fastpath_entries: args
            .iter()
            .find_map(|a| a.strip_prefix("--fastpath-entries=")?.parse().ok())
            .unwrap_or(65536),
        out: out.clone(),
        repo: repo.clone(),
    };
    let raw = o.out.join("raw").join(&stamp);
    std::fs::create_dir_all(&raw).unwrap();
    let only: Option<&String> = args.iter().find(|a| !a.starts_with("--"));
    // What killed runs left; a killed bench also left bpf_stats on (only the
    // bench sets it), which the guard below would keep as "before".
    let reaped = localdns_tests::reap::reap_stale();
    for r in &reaped {
        eprintln!("[bench] removed a killed run's leftover: {r}");
    }
    if reaped.iter().any(|r| r.contains("localdns-test-bench-")) {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");
    }
    // Before bpf_stats is switched on: it adds its own cost to every run.
    let test_run = prog_test_run_ns();
    // Before the topology: nothing else of ours running.
    let memory_latency = memlat::measure();
    let _stats = SysctlGuard::set("/proc/sys/kernel/bpf_stats_enabled", "1");
    let t = setup(&o);
    let files = write_query_files(&o, &t.dir.path);
    let kinds = [
        Kind::Null,
        Kind::Localdns,
        Kind::LocaldnsNoFastpath,
        Kind::Unbound,
        Kind::Dnsdist,
        Kind::Kresd,
        Kind::Dnsmasq,
    ];
    let started = Instant::now();
    let mut results = Vec::new();
    // `kernel`: only the fast path's own workloads (warm-set sweep, kernel
    // share).
    let kernel_only = only.is_some_and(|f| f == "kernel");
    for k in kinds {
        if let Some(f) = only
            && k.slug() != f
            && (k != Kind::Null || kernel_only)
        {
            continue;
        }
        eprintln!("[bench] {} ...", k.name());
        let r = measure(k, &t, &o, &files, &raw);
        eprintln!("[bench] {}: {}", k.name(), r);
        results.push(r);
    }
    let (mut sweep, mut share) = (Vec::new(), serde_json::Value::Null);
    if only.is_none_or(|f| f == "localdns" || kernel_only) {
        for k in [Kind::Null, Kind::Floor, Kind::Localdns] {
            eprintln!("[bench] warm-set sweep: {} ...", k.name());
            sweep.push(warmset::sweep(k, &t, &o, &raw));
        }
        eprintln!("[bench] kernel share under short TTLs ...");
        share = share::measure(&t, &o, &raw);
        eprintln!("[bench] share: {share}");
    }
    let uname = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let meta = json!({
        "date": stamp,
        "host": "2-core VM",
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": uname,
        "command": if quick { "cargo xtask bench --quick" } else { "cargo xtask bench" },
        "runs": o.runs, "secs": o.secs, "fixed_qps": o.fixed_qps, "names": o.names,
        "elapsed_s": started.elapsed().as_secs(),
        "raw_dir": raw.strip_prefix(&repo).unwrap_or(&raw).display().to_string(),
        "only": only,
    });
    let mut meta = meta;
    meta["prog_test_run_ns"] = test_run;
    meta["warmset"] = json!(sweep);
    meta["warmset_rate"] = json!(o.warmset_rate);
    meta["share"] = share;
    meta["memory_latency"] = memory_latency;
    let doc = json!({ "meta": meta, "results": results });
    std::fs::write(
        raw.join("results.json"),
        serde_json::to_string_pretty(&doc).unwrap(),
    )
    .unwrap();
    drop(t);
    publish(
        &doc,
        &o.out,
        (!quick && only.is_none()).then(|| repo.join("README.md")),
    );
}

/// Writes the report of one run (`results.json`'s document): `latest.md`
/// and the plots under `out`, and the README's table when `readme` is
/// given.
fn publish(doc: &serde_json::Value, out: &std::path::Path, readme: Option<PathBuf>) {
    let (meta, results) = (&doc["meta"], doc["results"].as_array().unwrap());
    let md = table(results, meta);
    let md = format!(
        "{md}\nRaw outputs and results.json: `{}`.\n",
        meta["raw_dir"].as_str().unwrap()
    );
    std::fs::write(out.join("latest.md"), &md).unwrap();
    std::fs::write(out.join("latest.svg"), plot(results)).unwrap();
    if let Some(sweep) = meta["warmset"].as_array().filter(|s| !s.is_empty()) {
        std::fs::write(out.join("warmset.svg"), plot_warmset(sweep)).unwrap();
    }
    if let Some(readme) = readme {
        update_readme(&readme, &md);
    }
    println!("{md}");
}

/// `bench --report=<raw dir>`: the report of a finished run again, from its
/// `results.json` (after a change to the report's format). A full run's
/// report goes to docs/bench and the README, a quick one's under target/.
fn report_again(repo: &std::path::Path, dir: &str) {
    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(std::path::Path::new(dir).join("results.json"))
            .unwrap_or_else(|e| panic!("{dir}/results.json: {e}")),
    )
    .unwrap_or_else(|e| panic!("{dir}/results.json: {e}"));
    let full = doc["meta"]["command"] == "cargo xtask bench" && doc["meta"]["only"].is_null();
    let out = repo.join(if full {
        "docs/bench"
    } else {
        "target/bench-quick"
    });
    publish(&doc, &out, full.then(|| repo.join("README.md")));
}

/// Sets a sysctl for the run and restores it on drop, panics included,
/// and on SIGINT/SIGTERM/SIGHUP ([`clean_up_on_signal`]).
pub(crate) struct SysctlGuard {
    path: &'static str,
}

/// Sysctls set by guards, with the values to put back.
static SYSCTLS: Mutex<Vec<(&'static str, String)>> = Mutex::new(Vec::new());

impl SysctlGuard {
    pub(crate) fn set(path: &'static str, value: &str) -> SysctlGuard {
        let before = std::fs::read_to_string(path)
            .unwrap_or_else(|_| "0".into())
            .trim()
            .to_string();
        SYSCTLS.lock().unwrap().push((path, before));
        let _ = std::fs::write(path, value);
        SysctlGuard { path }
    }
}

/// Puts back the sysctls of live guards (all of them when `path` is None).
fn restore_sysctls(path: Option<&str>) {
    let mut set = SYSCTLS.lock().unwrap_or_else(|e| e.into_inner());
    set.retain(|(p, before)| {
        if path.is_some_and(|q| q != *p) {
            return true;
        }
        let _ = std::fs::write(p, before);
        false
    });
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        restore_sysctls(Some(self.path));
    }
}

/// An interrupted bench (Ctrl-C, a CI timeout's SIGTERM) would leave its
/// namespaces, the processes in them, the bpffs mount and `bpf_stats_enabled`
/// behind: the guards' `Drop` does not run on a signal. The signals are
/// blocked in every thread (children get a clean mask from `Command`) and
/// one thread waits for them, removes this run's resources and exits.
fn clean_up_on_signal() {
    // SAFETY: sigset and pthread_sigmask on a local set, before any other
    // thread exists.
    let set = unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    // The main thread may trip over what the cleanup removes: that is not
    // a failure to report.
    static INTERRUPTED: AtomicBool = AtomicBool::new(false);
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !INTERRUPTED.load(Ordering::Relaxed) {
            report(info);
        }
    }));
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: sigwait on the set blocked above.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            return;
        }
        INTERRUPTED.store(true, Ordering::Relaxed);
        eprintln!("[bench] signal {sig}: removing this run's namespaces, processes and mounts");
        // Twice: the main thread runs on meanwhile and may write a file or
        // start a process in the first pass's wake.
        for pass in 0..2 {
            for r in localdns_tests::reap::reap_run(localdns_tests::reap::own_run()) {
                eprintln!("[bench] removed {r}");
            }
            if pass == 0 {
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
        }
        restore_sysctls(None);
        std::process::exit(128 + sig);
    });
}

pub(crate) fn chrono_stamp() -> String {
    let o = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H%MZ"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}
