//! The contenders: how each one is started alone in the node netns on
//! 169.254.10.10:53, and what is read of it (CPU, peak RSS, BPF run time).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use localdns_tests::netns::{Proc, dig_ok, wait_for};
use serde_json::Value;

use crate::Opts;

use crate::topology::{LISTEN, Topo, UPSTREAM};

/// A contender: how to start it in the node netns.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Kind {
    Null,
    /// The null responder after one read of per-name memory (warm-set
    /// sweep only): the least any cache lookup costs here.
    Floor,
    Localdns,
    LocaldnsNoFastpath,
    Unbound,
    Dnsdist,
    Kresd,
    Dnsmasq,
}

impl Kind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Null => "null responder (XDP)",
            Kind::Floor => "null + one line per name (floor)",
            Kind::Localdns => "localdns (kernel fast path)",
            Kind::LocaldnsNoFastpath => "localdns --no-fastpath",
            Kind::Unbound => "Unbound",
            Kind::Dnsdist => "dnsdist (packet cache)",
            Kind::Kresd => "Knot Resolver (2 procs)",
            Kind::Dnsmasq => "dnsmasq",
        }
    }
    pub(crate) fn slug(self) -> &'static str {
        match self {
            Kind::Null => "null",
            Kind::Floor => "floor",
            Kind::Localdns => "localdns",
            Kind::LocaldnsNoFastpath => "localdns-nofastpath",
            Kind::Unbound => "unbound",
            Kind::Dnsdist => "dnsdist",
            Kind::Kresd => "kresd",
            Kind::Dnsmasq => "dnsmasq",
        }
    }
    pub(crate) fn version(self) -> String {
        let (cmd, args): (&str, &[&str]) = match self {
            Kind::Null | Kind::Floor | Kind::Localdns | Kind::LocaldnsNoFastpath => {
                return env!("CARGO_PKG_VERSION").to_string();
            }
            Kind::Unbound => ("unbound", &["-V"]),
            Kind::Dnsdist => ("dnsdist", &["--version"]),
            Kind::Kresd => ("kresd", &["--version"]),
            Kind::Dnsmasq => ("dnsmasq", &["--version"]),
        };
        Command::new(cmd)
            .args(args)
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_default()
    }
}

pub(crate) fn bin(name: &str) -> PathBuf {
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .join(name)
}

/// A started contender. Dropping it stops the processes and then removes
/// the daemon's pins: a stopped daemon leaves its fast path attached (as it
/// must on a node), which would otherwise answer for the next contender.
pub(crate) struct Running {
    pub(crate) procs: Vec<Proc>,
    pins: Option<String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.procs.clear();
        if let Some(p) = &self.pins {
            let _ = std::fs::remove_dir_all(p);
            let gone = wait_for(Duration::from_secs(5), || (bpf_run().1 == 0).then_some(()));
            if gone.is_none() {
                eprintln!("[bench] warning: the fast path is still attached after unpinning");
            }
        }
    }
}

pub(crate) fn start(k: Kind, t: &Topo, o: &Opts) -> Running {
    start_with(k, t, o, &[])
}

/// [`start`] with extra daemon arguments (localdns only).
pub(crate) fn start_with(k: Kind, t: &Topo, o: &Opts, extra: &[&str]) -> Running {
    let d = &t.dir.path;
    let subst = |f: &str| {
        let text = std::fs::read_to_string(o.repo.join("bench").join(f))
            .unwrap()
            .replace("@DIR@", &d.display().to_string());
        let p = d.join(f);
        std::fs::write(&p, text).unwrap();
        p
    };
    let log = |s: &str| d.join(format!("{}-{s}.log", k.slug()));
    let mut procs = Vec::new();
    match k {
        Kind::Null | Kind::Floor => {
            let mut c = t.node.cmd(bin("null_responder").to_str().unwrap());
            c.arg("vcl0");
            if k == Kind::Floor {
                c.args(["--floor", "1"]);
            }
            procs.push(Proc::spawn(c, "null_responder", &log("0")));
        }
        Kind::Localdns | Kind::LocaldnsNoFastpath => {
            let cfg = subst("localdnsconfig.json");
            let mut c = t.node.cmd(bin("localdns-user").to_str().unwrap());
            c.args([
                "--iface",
                "vcl0",
                "--vnet-dns",
                UPSTREAM,
                "--cluster-dns",
                UPSTREAM,
                "--metrics",
                "none",
                "--health",
                "none",
            ]);
            c.args([
                "--pin-path",
                &t.pin_path(),
                "--fastpath-entries",
                &o.fastpath_entries.to_string(),
                "--config",
            ])
            .arg(cfg);
            if k == Kind::LocaldnsNoFastpath {
                c.arg("--no-fastpath");
            }
            c.args(extra);
            c.env("RUST_LOG", "warn");
            procs.push(Proc::spawn(c, "localdns-user", &log("0")));
        }
        Kind::Unbound => {
            let cfg = subst("unbound.conf");
            let mut c = t.node.cmd("unbound");
            c.args(["-d", "-c"]).arg(cfg);
            procs.push(Proc::spawn(c, "unbound", &log("0")));
        }
        Kind::Dnsdist => {
            let cfg = subst("dnsdist.conf");
            let mut c = t.node.cmd("dnsdist");
            c.args(["--supervised", "--disable-syslog", "-C"]).arg(cfg);
            procs.push(Proc::spawn(c, "dnsdist", &log("0")));
        }
        Kind::Kresd => {
            let cfg = subst("kresd.conf");
            let run = d.join("kresd");
            std::fs::create_dir_all(&run).unwrap();
            for i in 0..2 {
                let mut c = t.node.cmd("kresd");
                c.args(["-n", "-q", "-c"]).arg(&cfg).arg(&run);
                procs.push(Proc::spawn(c, "kresd", &log(&i.to_string())));
            }
        }
        Kind::Dnsmasq => {
            let cfg = subst("dnsmasq.conf");
            let mut c = t.node.cmd("dnsmasq");
            c.args(["-k", "--log-facility=-", "-C"])
                .arg(cfg)
                .arg(format!("--pid-file={}/dnsmasq.pid", d.display()));
            procs.push(Proc::spawn(c, "dnsmasq", &log("0")));
        }
    }
    let probe = if matches!(k, Kind::Null | Kind::Floor) {
        None
    } else {
        Some("h1.bench.test")
    };
    let ready = wait_for(Duration::from_secs(30), || match probe {
        Some(n) => dig_ok(&t.client, LISTEN, n).then_some(()),
        None => {
            let o = t.client.output(
                "dig",
                &[
                    "+tries=1",
                    "+time=1",
                    &format!("@{LISTEN}"),
                    "h1.bench.test",
                ],
            );
            String::from_utf8_lossy(&o.stdout)
                .contains("status: NOERROR")
                .then_some(())
        }
    });
    assert!(
        ready.is_some(),
        "{} did not come up: {}",
        k.name(),
        std::fs::read_to_string(log("0")).unwrap_or_default()
    );
    let pins = matches!(k, Kind::Localdns | Kind::LocaldnsNoFastpath).then(|| t.pin_path());
    Running { procs, pins }
}

/// CPU time of a process (all its threads, exited ones included), seconds,
/// to the nanosecond: its CPU-time clock. `/proc/<pid>/stat`'s utime and
/// stime count 10 ms ticks, which over a fixed-rate run of 100,000 answers
/// is 0.1 s per million answers a tick: more than the whole daemon's share
/// while the kernel answers.
pub(crate) fn proc_cpu(pid: i32) -> f64 {
    let mut clock: libc::clockid_t = 0;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: both calls only write to the locals passed.
    let ok = unsafe {
        libc::clock_getcpuclockid(pid, &mut clock) == 0 && libc::clock_gettime(clock, &mut ts) == 0
    };
    if ok {
        ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
    } else {
        // Gone: nothing more to count.
        0.0
    }
}

pub(crate) fn peak_rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmHWM:")
                .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

/// Total run time (ns) and run count of our XDP programs
/// (kernel.bpf_stats_enabled=1).
pub(crate) fn bpf_run() -> (u64, u64) {
    let o = Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    let ours = |p: &&Value| {
        matches!(
            p["name"].as_str(),
            Some("localdns_xdp" | "localdns_null" | "localdns_floor" | "localdns_tc")
        )
    };
    let a = v.as_array().cloned().unwrap_or_default();
    let sum = |k: &str| {
        a.iter()
            .filter(ours)
            .map(|p| p[k].as_u64().unwrap_or(0))
            .sum()
    };
    (sum("run_time_ns"), sum("run_cnt"))
}

/// The kernel counters of the running daemon (`localdns-user cache
/// stats`), by name.
pub(crate) fn kernel_stats(t: &Topo) -> Vec<(String, u64)> {
    let out = Command::new(bin("localdns-user"))
        .args(["cache", "stats", "--pin-path", &t.pin_path()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// One kernel counter of the running daemon.
pub(crate) fn kernel_stat(t: &Topo, name: &str) -> u64 {
    kernel_stats(t)
        .into_iter()
        .find_map(|(k, v)| (k == name).then_some(v))
        .unwrap_or(0)
}
