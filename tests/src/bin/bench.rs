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

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use localdns_tests::netns::{Netns, Proc, TempDir, dig_ok, ip, start_nsd, unique_tag, wait_for};
use serde_json::{Value, json};

const LISTEN: &str = "169.254.10.10";
const UPSTREAM: &str = "169.254.60.2";

struct Opts {
    quick: bool,
    names: usize,
    secs: u32,
    runs: usize,
    fixed_qps: u32,
    out: PathBuf,
    repo: PathBuf,
}

struct Topo {
    /// Held so NSD is stopped (first) when the topology drops.
    _nsd: Proc,
    client: Netns,
    node: Netns,
    /// Held so the upstream netns lives as long as the topology.
    _up: Netns,
    dir: TempDir,
}

fn setup(o: &Opts) -> Topo {
    let tag = unique_tag();
    let dir = TempDir::new(&format!("bench-{tag}"));
    let node = Netns::new(format!("{tag}-bnode"));
    let client = Netns::new(format!("{tag}-bcli"));
    let up = Netns::new(format!("{tag}-bup"));
    ip(&[
        "link",
        "add",
        "vcl0",
        "netns",
        &node.name,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &client.name,
    ]);
    ip(&[
        "link", "add", "vup0", "netns", &node.name, "type", "veth", "peer", "name", "eth0",
        "netns", &up.name,
    ]);
    node.ip(&["addr", "add", "169.254.50.1/24", "dev", "vcl0"]);
    node.ip(&["addr", "add", "169.254.60.1/24", "dev", "vup0"]);
    node.ip(&["link", "set", "vcl0", "up"]);
    node.ip(&["link", "set", "vup0", "up"]);
    // Listener addresses for every contender (localdns keeps them as found).
    node.ip(&["addr", "add", "169.254.10.10/32", "dev", "lo"]);
    node.ip(&["addr", "add", "169.254.10.11/32", "dev", "lo"]);
    client.ip(&["addr", "add", "169.254.50.2/24", "dev", "eth0"]);
    client.ip(&["link", "set", "eth0", "up"]);
    client.ip(&["route", "add", "default", "via", "169.254.50.1"]);
    up.ip(&["addr", "add", "169.254.60.2/24", "dev", "eth0"]);
    up.ip(&["link", "set", "eth0", "up"]);
    up.ip(&["route", "add", "default", "via", "169.254.60.1"]);
    let d = dir.path.clone();
    let mut zone = String::from(
        "$ORIGIN bench.test.\n$TTL 3600\n@ IN SOA ns admin 1 3600 600 86400 3600\n@ IN NS ns\nns IN A 192.0.2.53\n",
    );
    for i in 0..o.names {
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
    // RRL off: with it, every wildcard answer shares one bucket, which
    // throttles the UDP forwarders and not localdns's TCP path.
    let tuning =
        "  server-count: 2\n  tcp-count: 1000\n  rrl-ratelimit: 0\n  rrl-whitelist-ratelimit: 0\n";
    let zones = [
        ("bench.test", zone.as_str()),
        ("miss.test", miss),
        ("cluster.local", cluster),
    ];
    let nsd = start_nsd(&up, &d, UPSTREAM, &zones, tuning, "h0.bench.test");
    Topo {
        _nsd: nsd,
        client,
        node,
        _up: up,
        dir,
    }
}

/// A contender: how to start it in the node netns.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Null,
    Localdns,
    LocaldnsNoFastpath,
    Unbound,
    Dnsdist,
    Kresd,
    Dnsmasq,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Null => "null responder (XDP)",
            Kind::Localdns => "localdns (kernel fast path)",
            Kind::LocaldnsNoFastpath => "localdns --no-fastpath",
            Kind::Unbound => "Unbound",
            Kind::Dnsdist => "dnsdist (packet cache)",
            Kind::Kresd => "Knot Resolver (2 procs)",
            Kind::Dnsmasq => "dnsmasq",
        }
    }
    fn slug(self) -> &'static str {
        match self {
            Kind::Null => "null",
            Kind::Localdns => "localdns",
            Kind::LocaldnsNoFastpath => "localdns-nofastpath",
            Kind::Unbound => "unbound",
            Kind::Dnsdist => "dnsdist",
            Kind::Kresd => "kresd",
            Kind::Dnsmasq => "dnsmasq",
        }
    }
    fn version(self) -> String {
        let (cmd, args): (&str, &[&str]) = match self {
            Kind::Null | Kind::Localdns | Kind::LocaldnsNoFastpath => {
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

fn bin(name: &str) -> PathBuf {
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .join(name)
}

fn start(k: Kind, t: &Topo, o: &Opts) -> Vec<Proc> {
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
        Kind::Null => {
            let mut c = t.node.cmd(bin("null_responder").to_str().unwrap());
            c.arg("vcl0");
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
                "/sys/fs/bpf/localdns-bench",
                "--fastpath-entries",
                "65536",
                "--config",
            ])
            .arg(cfg);
            if k == Kind::LocaldnsNoFastpath {
                c.arg("--no-fastpath");
            }
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
    let probe = if k == Kind::Null {
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
    procs
}

/// utime + stime of a process, seconds.
fn proc_cpu(pid: i32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn peak_rss_kib(pid: i32) -> u64 {
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
fn bpf_run() -> (u64, u64) {
    let o = Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    let ours = |p: &&Value| {
        matches!(
            p["name"].as_str(),
            Some("localdns_xdp" | "localdns_null" | "localdns_tc")
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

/// Runs a load generator in the client netns; returns (stdout, its own CPU
/// seconds from wait4's rusage, wall seconds).
fn generate(t: &Topo, prog: &str, args: &[String], raw: &Path) -> (String, f64, f64) {
    let mut c = t.client.cmd(prog);
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    let t0 = Instant::now();
    let child = c.spawn().unwrap();
    let out = child.wait_with_output_rusage();
    let wall = t0.elapsed().as_secs_f64();
    let text = format!("$ {prog} {}\n{}{}", args.join(" "), out.0, out.1);
    // Per-query lines of `dnsperf -v` are kept as a histogram (µs -> count):
    // the percentiles are exact from it, the files stay small.
    let mut hist: BTreeMap<u64, u64> = BTreeMap::new();
    let mut kept = String::new();
    for l in text.lines() {
        match l
            .strip_prefix("> ")
            .and_then(|r| r.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
        {
            Some(secs) => *hist.entry((secs * 1e6) as u64).or_default() += 1,
            None => {
                kept.push_str(l);
                kept.push('\n');
            }
        }
    }
    if !hist.is_empty() {
        let _ = writeln!(
            kept,
            "\n# latency histogram from -v: <microseconds> <queries>"
        );
        for (us, n) in &hist {
            let _ = writeln!(kept, "{us} {n}");
        }
    }
    std::fs::write(raw, &kept).unwrap();
    (text, out.2, wall)
}

trait WaitRusage {
    fn wait_with_output_rusage(self) -> (String, String, f64);
}

impl WaitRusage for std::process::Child {
    fn wait_with_output_rusage(mut self) -> (String, String, f64) {
        use std::io::Read;
        let mut so = self.stdout.take().unwrap();
        let mut se = self.stderr.take().unwrap();
        let h = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = se.read_to_string(&mut s);
            s
        });
        let mut out = String::new();
        let _ = so.read_to_string(&mut out);
        let err = h.join().unwrap();
        let mut status = 0;
        // SAFETY: reaping our own child; rusage is a plain out-parameter.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::wait4(self.id() as i32, &mut status, 0, &mut ru) };
        let cpu = ru.ru_utime.tv_sec as f64
            + ru.ru_utime.tv_usec as f64 / 1e6
            + ru.ru_stime.tv_sec as f64
            + ru.ru_stime.tv_usec as f64 / 1e6;
        (out, err, cpu)
    }
}

fn field(text: &str, key: &str) -> Option<f64> {
    let l = text.lines().find(|l| l.trim_start().starts_with(key))?;
    l.trim_start()[key.len()..]
        .split_whitespace()
        .next()?
        .trim_end_matches(',')
        .parse()
        .ok()
}

/// p50/p99/p99.9 in microseconds from `dnsperf -v` lines.
fn percentiles(text: &str) -> Option<[f64; 3]> {
    let mut lat: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("> "))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|s| s * 1e6)
        .collect();
    if lat.is_empty() {
        return None;
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    Some([p(0.5), p(0.99), p(0.999)])
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

struct Files {
    hits: PathBuf,
}

fn write_query_files(o: &Opts, dir: &Path) -> Files {
    let mut hits = String::new();
    for i in 0..o.names {
        for ty in ["A", "AAAA"] {
            // A quarter in mixed case, as 0x20-randomising clients send.
            if i % 4 == 0 {
                let _ = writeln!(hits, "H{i}.Bench.TEST {ty}");
            } else {
                let _ = writeln!(hits, "h{i}.bench.test {ty}");
            }
        }
    }
    let p = dir.join("hits.txt");
    std::fs::write(&p, hits).unwrap();
    Files { hits: p }
}

/// W2 file for one run: 9 warm-set lines, then one unique miss.
fn mix_file(o: &Opts, dir: &Path, run: &str, lines: usize) -> PathBuf {
    let mut s = String::new();
    for j in 0..lines {
        if j % 10 == 9 {
            let _ = writeln!(s, "u{j}-{run}.miss.test A");
        } else {
            let i = (j * 7919) % o.names;
            let _ = writeln!(
                s,
                "h{i}.bench.test {}",
                if j % 2 == 0 { "A" } else { "AAAA" }
            );
        }
    }
    let p = dir.join(format!("mix-{run}.txt"));
    std::fs::write(&p, s).unwrap();
    p
}

/// W3 file for one run: unique cluster.local names only.
fn miss_file(dir: &Path, run: &str, lines: usize) -> PathBuf {
    let mut s = String::new();
    for j in 0..lines {
        let _ = writeln!(s, "m{j}-{run}.default.svc.cluster.local A");
    }
    let p = dir.join(format!("miss-{run}.txt"));
    std::fs::write(&p, s).unwrap();
    p
}

/// dnsperf at saturation: 500 outstanding and a 1 s timeout saturate every
/// contender here, and a dropped query frees its slot soon instead of
/// stalling the window.
fn dnsperf_sat(o: &Opts, file: &Path, once: bool) -> Vec<String> {
    let mut a: Vec<String> = [
        "-s",
        LISTEN,
        "-l",
        &o.secs.to_string(),
        "-c",
        "32",
        "-T",
        "2",
        "-q",
        "500",
        "-t",
        "1",
        "-d",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(file.display().to_string());
    if once {
        a.extend(["-n".into(), "1".into()]);
    }
    a
}

fn measure(k: Kind, t: &Topo, o: &Opts, f: &Files, raw: &Path) -> Value {
    let procs = start(k, t, o);
    let pids: Vec<i32> = procs.iter().map(|p| p.pid()).collect();
    let cpu = || pids.iter().map(|&p| proc_cpu(p)).sum::<f64>();
    let slug = k.slug();
    let rawf = |w: &str| raw.join(format!("{slug}-{w}.txt"));
    let mut r = serde_json::Map::new();
    r.insert("name".into(), json!(k.name()));
    r.insert("version".into(), json!(k.version()));

    // Warm-up (not counted): the whole warm set once, at a moderate rate.
    if k != Kind::Null {
        let mut a: Vec<String> = [
            "-s", LISTEN, "-n", "1", "-Q", "20000", "-c", "4", "-t", "2", "-d",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push(f.hits.display().to_string());
        generate(t, "dnsperf", &a, &rawf("w1-warmup"));
    }

    // W1 saturation, kxdpgun (AF_XDP) and dnsperf.
    let (mut kx, mut kx_cpu, mut dp, mut dp_cpu, mut dp_lost) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (bs0, ns0) = bpf_run();
    for run in 0..o.runs {
        let args: Vec<String> = [
            "-t",
            &o.secs.to_string(),
            "-Q",
            "4000000",
            "-I",
            "eth0",
            "-i",
            &f.hits.display().to_string(),
            LISTEN,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (text, ccpu, wall) = generate(t, "kxdpgun", &args, &rawf(&format!("w1-kxdpgun-{run}")));
        let replies = text
            .lines()
            .find(|l| l.starts_with("total replies:"))
            .and_then(|l| l.split('(').nth(1)?.split(' ').next()?.parse::<f64>().ok());
        kx.push(replies.unwrap_or(0.0));
        kx_cpu.push(ccpu / wall);
        let (text, ccpu, wall) = generate(
            t,
            "dnsperf",
            &dnsperf_sat(o, &f.hits, false),
            &rawf(&format!("w1-dnsperf-{run}")),
        );
        dp.push(field(&text, "Queries per second:").unwrap_or(0.0));
        dp_lost.push(field(&text, "Queries lost:").unwrap_or(0.0));
        dp_cpu.push(ccpu / wall);
    }
    let (bs1, ns1) = bpf_run();
    if ns1 > ns0 {
        r.insert(
            "sat_bpf_ns_per_run".into(),
            json!((bs1 - bs0) as f64 / (ns1 - ns0) as f64),
        );
    }
    r.insert("w1_kxdpgun_qps".into(), json!(median(&mut kx)));
    r.insert("w1_kxdpgun_client_cpu".into(), json!(median(&mut kx_cpu)));
    r.insert("w1_dnsperf_qps".into(), json!(median(&mut dp)));
    r.insert("w1_dnsperf_client_cpu".into(), json!(median(&mut dp_cpu)));
    r.insert("w1_dnsperf_lost".into(), json!(dp_lost.iter().sum::<f64>()));

    // W1 at a fixed offered rate: latency percentiles and server CPU/query.
    let (c0, (b0, n0)) = (cpu(), bpf_run());
    let mut a: Vec<String> = [
        "-s",
        LISTEN,
        "-l",
        &o.secs.to_string(),
        "-Q",
        &o.fixed_qps.to_string(),
        "-c",
        "8",
        "-T",
        "2",
        "-t",
        "2",
        "-v",
        "-d",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(f.hits.display().to_string());
    let (text, _, _) = generate(t, "dnsperf", &a, &rawf("w1-fixed"));
    let (c1, (b1, n1)) = (cpu(), bpf_run());
    if n1 > n0 {
        r.insert(
            "fixed_bpf_ns_per_run".into(),
            json!((b1 - b0) as f64 / (n1 - n0) as f64),
        );
    }
    let completed = field(&text, "Queries completed:").unwrap_or(0.0);
    let server_cpu = (c1 - c0) + (b1 - b0) as f64 / 1e9;
    r.insert("fixed_qps".into(), json!(o.fixed_qps));
    r.insert("fixed_completed".into(), json!(completed));
    r.insert(
        "fixed_lost".into(),
        json!(field(&text, "Queries lost:").unwrap_or(0.0)),
    );
    r.insert("fixed_latency_us".into(), json!(percentiles(&text)));
    r.insert("fixed_server_cpu_s".into(), json!(server_cpu));
    r.insert("fixed_bpf_s".into(), json!((b1 - b0) as f64 / 1e9));
    r.insert(
        "cpu_s_per_million".into(),
        json!(if completed > 0.0 {
            server_cpu / completed * 1e6
        } else {
            f64::NAN
        }),
    );
    // Latency at saturation (short verbose run).
    if !o.quick {
        let mut a = dnsperf_sat(o, &f.hits, false);
        a[3] = "2".into();
        a.push("-v".into());
        let (text, _, _) = generate(t, "dnsperf", &a, &rawf("w1-sat-latency"));
        r.insert("sat_latency_us".into(), json!(percentiles(&text)));
    }

    // W2 (90% hits, 10% unique misses) and W3 (unique cluster.local misses).
    if k != Kind::Null {
        let lines = if o.quick { 200_000 } else { 2_000_000 };
        let (mut w2, mut w2l, mut w3, mut w3l) = (vec![], vec![], vec![], vec![]);
        for run in 0..o.runs {
            let mf = mix_file(o, &t.dir.path, &format!("{slug}{run}"), lines);
            let (text, _, _) = generate(
                t,
                "dnsperf",
                &dnsperf_sat(o, &mf, true),
                &rawf(&format!("w2-{run}")),
            );
            w2.push(field(&text, "Queries per second:").unwrap_or(0.0));
            w2l.push(field(&text, "Queries lost:").unwrap_or(0.0));
            let _ = std::fs::remove_file(mf);
            let sf = miss_file(&t.dir.path, &format!("{slug}{run}"), lines / 4);
            let (text, _, _) = generate(
                t,
                "dnsperf",
                &dnsperf_sat(o, &sf, true),
                &rawf(&format!("w3-{run}")),
            );
            w3.push(field(&text, "Queries per second:").unwrap_or(0.0));
            w3l.push(field(&text, "Queries lost:").unwrap_or(0.0));
            let _ = std::fs::remove_file(sf);
        }
        r.insert("w2_qps".into(), json!(median(&mut w2)));
        r.insert("w2_lost".into(), json!(w2l.iter().sum::<f64>()));
        r.insert("w3_qps".into(), json!(median(&mut w3)));
        r.insert("w3_lost".into(), json!(w3l.iter().sum::<f64>()));
    }
    r.insert(
        "peak_rss_kib".into(),
        json!(pids.iter().map(|&p| peak_rss_kib(p)).sum::<u64>()),
    );
    drop(procs);
    // Let sockets and XDP attachments go before the next contender.
    std::thread::sleep(Duration::from_millis(300));
    Value::Object(r)
}

fn num(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

fn fmt_k(x: f64) -> String {
    if x.is_nan() {
        "n/a".into()
    } else if x >= 1000.0 {
        format!("{:.0}k", x / 1000.0)
    } else {
        format!("{x:.0}")
    }
}

fn lat(v: &Value, k: &str) -> String {
    match v[k].as_array() {
        Some(a) if a.len() == 3 => format!(
            "{:.0} / {:.0} / {:.0}",
            a[0].as_f64().unwrap(),
            a[1].as_f64().unwrap(),
            a[2].as_f64().unwrap()
        ),
        _ => "n/a".into(),
    }
}

fn table(results: &[Value], meta: &Value) -> String {
    let null = results.iter().find(|r| r["name"] == Kind::Null.name());
    let ceiling = null.map(|n| num(n, "w1_kxdpgun_qps")).unwrap_or(f64::NAN);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Run {} on {} ({} cores, kernel {}), `{}`; medians of {} run(s) of {} s; fixed rate {} qps. Latency in µs (p50 / p99 / p99.9). Upstream: NSD in its own netns (no added latency: this kernel has no netem).\n",
        meta["date"].as_str().unwrap_or(""),
        meta["host"].as_str().unwrap_or(""),
        meta["cores"],
        meta["kernel"].as_str().unwrap_or(""),
        meta["command"].as_str().unwrap_or(""),
        meta["runs"],
        meta["secs"],
        meta["fixed_qps"]
    );
    let _ = writeln!(
        s,
        "| contender | W1 hits, kxdpgun q/s | × null | W1 hits, dnsperf q/s | latency @ fixed rate | latency @ saturation | server CPU s / 1M answers | peak RSS MiB | W2 90/10 mix q/s | W3 misses q/s | lost (W1/W2/W3) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let kx = num(r, "w1_kxdpgun_qps");
        let _ = writeln!(
            s,
            "| {} | {} | {:.2} | {} | {} | {} | {:.2} | {:.0} | {} | {} | {:.0}/{:.0}/{:.0} |",
            r["name"].as_str().unwrap(),
            fmt_k(kx),
            kx / ceiling,
            fmt_k(num(r, "w1_dnsperf_qps")),
            lat(r, "fixed_latency_us"),
            lat(r, "sat_latency_us"),
            num(r, "cpu_s_per_million"),
            num(r, "peak_rss_kib") / 1024.0,
            fmt_k(num(r, "w2_qps")),
            fmt_k(num(r, "w3_qps")),
            num(r, "w1_dnsperf_lost") + num(r, "fixed_lost"),
            num(r, "w2_lost"),
            num(r, "w3_lost"),
        );
    }
    let _ = writeln!(
        s,
        "\nLoad generators' own CPU (busy fraction of one core, median): {}.",
        results
            .iter()
            .map(|r| format!(
                "{}: kxdpgun {:.2}, dnsperf {:.2}",
                r["name"].as_str().unwrap(),
                num(r, "w1_kxdpgun_client_cpu"),
                num(r, "w1_dnsperf_client_cpu")
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let live = |kind: Kind, k: &str| {
        results
            .iter()
            .find(|r| r["name"] == kind.name())
            .map_or(f64::NAN, |r| num(r, k))
    };
    let tr = &meta["prog_test_run_ns"];
    let _ = writeln!(
        s,
        "\nKernel cost per packet: `BPF_PROG_TEST_RUN` median {:.0} ns per fast-path hit vs {:.0} ns for the null responder (the XDP_TX ceiling). Live (`run_time_ns / run_cnt`, bpf_stats on): {:.0} ns per hit at saturation and {:.0} ns at the fixed rate, vs {:.0} / {:.0} ns for the null responder.",
        tr["localdns_xdp"].as_f64().unwrap_or(f64::NAN),
        tr["localdns_null"].as_f64().unwrap_or(f64::NAN),
        live(Kind::Localdns, "sat_bpf_ns_per_run"),
        live(Kind::Localdns, "fixed_bpf_ns_per_run"),
        live(Kind::Null, "sat_bpf_ns_per_run"),
        live(Kind::Null, "fixed_bpf_ns_per_run"),
    );
    s
}

/// Bar chart of W1 hit rates (kxdpgun and dnsperf), SVG.
fn plot(results: &[Value]) -> String {
    let max = results
        .iter()
        .map(|r| num(r, "w1_kxdpgun_qps").max(num(r, "w1_dnsperf_qps")))
        .fold(1.0, f64::max);
    let (w, row, left) = (900.0, 44.0, 260.0);
    let h = 60.0 + row * results.len() as f64;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"13\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"22\" font-size=\"15\">W1 cache hits, replies/s (median): kxdpgun (dark), dnsperf (light)</text>\n"
    );
    for (i, r) in results.iter().enumerate() {
        let y = 40.0 + row * i as f64;
        let bar = |v: f64| {
            if v.is_nan() {
                0.0
            } else {
                (w - left - 90.0) * v / max
            }
        };
        let (a, b) = (num(r, "w1_kxdpgun_qps"), num(r, "w1_dnsperf_qps"));
        let _ = writeln!(
            s,
            "<text x=\"10\" y=\"{}\">{}</text>",
            y + 18.0,
            r["name"].as_str().unwrap()
        );
        let _ = writeln!(
            s,
            "<rect x=\"{left}\" y=\"{y}\" width=\"{:.1}\" height=\"16\" fill=\"#1f4e79\"/><text x=\"{:.1}\" y=\"{}\">{}</text>",
            bar(a),
            left + bar(a) + 4.0,
            y + 13.0,
            fmt_k(a)
        );
        let _ = writeln!(
            s,
            "<rect x=\"{left}\" y=\"{}\" width=\"{:.1}\" height=\"16\" fill=\"#9dc3e6\"/><text x=\"{:.1}\" y=\"{}\">{}</text>",
            y + 18.0,
            bar(b),
            left + bar(b) + 4.0,
            y + 31.0,
            fmt_k(b)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Kernel cost per packet in BPF_PROG_TEST_RUN, median of single runs (a
/// rewritten packet cannot be re-run with `repeat`): a fresh hit of the
/// fast path, and the null responder (the XDP_TX ceiling) on the same query.
fn prog_test_run_ns() -> Value {
    use aya::programs::Xdp;
    use localdns_tests::{FrameSpec, QEdns, dns_query, dns_response};
    use localdns_user::cache::{Entry, Key, mono_ns};
    use localdns_user::wire::parse_query;
    let (vnet, client) = (
        std::net::Ipv4Addr::new(169, 254, 10, 10),
        std::net::Ipv4Addr::new(169, 254, 50, 2),
    );
    let seed = 42;
    let g = localdns_user::fastpath::Globals {
        listen: vec![
            (vnet.into(), localdns_common::VIEW_VNET),
            (
                std::net::Ipv4Addr::new(169, 254, 10, 11).into(),
                localdns_common::VIEW_KUBE,
            ),
        ],
        seed,
        fault: 0,
    };
    let mut ebpf = localdns_user::fastpath::open(&g, 1024, None).unwrap();
    let edns = QEdns {
        udp_size: 1232,
        do_bit: false,
        options: vec![],
    };
    let q = dns_query(7, "h1.bench.test", 1, 0x0100, Some(&edns));
    let resp = dns_response(
        &q,
        0,
        &[localdns_tests::msg::a(
            &localdns_tests::msg::qname_of(&q),
            3600,
            [10, 0, 0, 1],
        )],
        &[],
    );
    let pq = parse_query(&q).unwrap();
    let e = Entry::from_upstream(&pq, &resp, 3600, 0, mono_ns()).unwrap();
    let key = Key::of(localdns_common::VIEW_VNET, &pq);
    let mut cache: aya::maps::HashMap<_, localdns_common::CacheKey, localdns_common::CacheValue> =
        aya::maps::HashMap::try_from(ebpf.map_mut(localdns_common::MAP_CACHE).unwrap()).unwrap();
    cache
        .insert(
            localdns_user::fastpath::encode::key(&key, seed),
            localdns_user::fastpath::encode::value(&e).unwrap(),
            0,
        )
        .unwrap();
    let frame = FrameSpec::udp(client, vnet, 40000, 53).build(&q);
    let mut out = json!({});
    for (prog, want) in [
        (localdns_user::fastpath::XDP_PROG, 3u32),
        ("localdns_null", 3),
    ] {
        let p: &mut Xdp = ebpf.program_mut(prog).unwrap().try_into().unwrap();
        p.load().unwrap();
        let ns = localdns_tests::single_run_ns(p, &frame, 20_000, want);
        out[prog] = json!(ns[ns.len() / 2]);
    }
    out
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
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
        out: out.clone(),
        repo: repo.clone(),
    };
    let raw = o.out.join("raw").join(&stamp);
    std::fs::create_dir_all(&raw).unwrap();
    let only: Option<&String> = args.iter().find(|a| !a.starts_with("--"));
    // Before bpf_stats is switched on: it adds its own cost to every run.
    let test_run = prog_test_run_ns();
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
    for k in kinds {
        if let Some(f) = only
            && k.slug() != f
            && k != Kind::Null
        {
            continue;
        }
        eprintln!("[bench] {} ...", k.name());
        let r = measure(k, &t, &o, &files, &raw);
        eprintln!("[bench] {}: {}", k.name(), r);
        results.push(r);
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
    });
    let mut meta = meta;
    meta["prog_test_run_ns"] = test_run;
    let doc = json!({ "meta": meta, "results": results });
    std::fs::write(
        raw.join("results.json"),
        serde_json::to_string_pretty(&doc).unwrap(),
    )
    .unwrap();
    let md = table(&results, &meta);
    let md = format!(
        "{md}\nRaw outputs and results.json: `{}`.\n",
        meta["raw_dir"].as_str().unwrap()
    );
    std::fs::write(o.out.join("latest.md"), &md).unwrap();
    std::fs::write(o.out.join("latest.svg"), plot(&results)).unwrap();
    if !quick && only.is_none() {
        update_readme(&repo.join("README.md"), &md);
    }
    drop(t);
    println!("{md}");
}

/// Sets a sysctl for the run and restores it on drop, panics included.
struct SysctlGuard {
    path: &'static str,
    before: String,
}

impl SysctlGuard {
    fn set(path: &'static str, value: &str) -> SysctlGuard {
        let before = std::fs::read_to_string(path)
            .unwrap_or_else(|_| "0".into())
            .trim()
            .to_string();
        let _ = std::fs::write(path, value);
        SysctlGuard { path, before }
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path, &self.before);
    }
}

fn chrono_stamp() -> String {
    let o = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H%MZ"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn update_readme(path: &Path, md: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    let (a, b) = ("<!-- bench:start -->", "<!-- bench:end -->");
    if let (Some(i), Some(j)) = (text.find(a), text.find(b)) {
        let new = format!(
            "{}{a}\n{md}\n![W1 hit rates](docs/bench/latest.svg)\n{}",
            &text[..i],
            &text[j..]
        );
        std::fs::write(path, new).unwrap();
    }
}
