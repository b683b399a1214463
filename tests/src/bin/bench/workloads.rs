//! The workloads and their measurement: query files, load generators
//! (kxdpgun, dnsperf) and what is taken from their output.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::Opts;
use crate::contenders::{Kind, bpf_run, peak_rss_kib, proc_cpu, start};
use crate::losses::{self, Counters};
use crate::topology::{LISTEN, Topo};

/// Runs a load generator in the client netns; returns (stdout, its own CPU
/// seconds from wait4's rusage, wall seconds).
pub(crate) fn generate(t: &Topo, prog: &str, args: &[String], raw: &Path) -> (String, f64, f64) {
    let mut attempt = 0;
    let (text, out, wall) = loop {
        let mut c = t.client.cmd(prog);
        c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        let t0 = Instant::now();
        let out = c.spawn().unwrap().wait_with_output_rusage();
        let wall = t0.elapsed().as_secs_f64();
        let text = format!("$ {prog} {}\n{}{}", args.join(" "), out.0, out.1);
        // The kernel frees the previous kxdpgun's AF_XDP socket after the
        // process exits; a run that starts too soon finds the queue busy.
        attempt += 1;
        if attempt == 10 || !text.contains("requested resource is busy") {
            break (text, out, wall);
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
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

pub(crate) trait WaitRusage {
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

/// Replies per second from kxdpgun's summary.
pub(crate) fn kxdpgun_replies(text: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with("total replies:"))
        .and_then(|l| l.split('(').nth(1)?.split(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
}

pub(crate) fn field(text: &str, key: &str) -> Option<f64> {
    let l = text.lines().find(|l| l.trim_start().starts_with(key))?;
    l.trim_start()[key.len()..]
        .split_whitespace()
        .next()?
        .trim_end_matches(',')
        .parse()
        .ok()
}

/// p50/p99/p99.9 in microseconds from `dnsperf -v` lines.
pub(crate) fn percentiles(text: &str) -> Option<[f64; 3]> {
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

/// Median of the values that are numbers (a failed run gives NaN).
pub(crate) fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub(crate) struct Files {
    pub(crate) hits: PathBuf,
}

pub(crate) fn write_query_files(o: &Opts, dir: &Path) -> Files {
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
pub(crate) fn mix_file(o: &Opts, dir: &Path, run: &str, lines: usize) -> PathBuf {
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
pub(crate) fn miss_file(dir: &Path, run: &str, lines: usize) -> PathBuf {
    let mut s = String::new();
    for j in 0..lines {
        let _ = writeln!(s, "m{j}-{run}.default.svc.cluster.local A");
    }
    let p = dir.join(format!("miss-{run}.txt"));
    std::fs::write(&p, s).unwrap();
    p
}

/// dnsperf through `file` once at `qps` (warm-ups, not counted).
pub(crate) fn dnsperf_once(qps: u32, file: &Path) -> Vec<String> {
    let mut a = args(&[
        "-s",
        LISTEN,
        "-n",
        "1",
        "-Q",
        &qps.to_string(),
        "-c",
        "4",
        "-t",
        "2",
    ]);
    a.extend(["-d".into(), file.display().to_string()]);
    a
}

/// dnsperf at a fixed offered rate for `secs`, looping over `file`.
pub(crate) fn dnsperf_fixed(secs: u32, qps: u32, file: &Path) -> Vec<String> {
    let mut a = args(&[
        "-s",
        LISTEN,
        "-l",
        &secs.to_string(),
        "-Q",
        &qps.to_string(),
        "-c",
        "8",
        "-T",
        "2",
        "-t",
        "2",
    ]);
    a.extend(["-d".into(), file.display().to_string()]);
    a
}

/// dnsperf at saturation: 500 outstanding and a 1 s timeout saturate every
/// contender here, and a dropped query frees its slot soon instead of
/// stalling the window.
pub(crate) fn dnsperf_sat(o: &Opts, file: &Path, once: bool) -> Vec<String> {
    let mut a = args(&[
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
    ]);
    a.push(file.display().to_string());
    if once {
        a.extend(["-n".into(), "1".into()]);
    }
    a
}

/// What every phase of one contender's run needs.
struct Run<'a> {
    t: &'a Topo,
    o: &'a Opts,
    f: &'a Files,
    raw: &'a Path,
    slug: &'static str,
    /// The contender's processes (CPU is read from them).
    pids: Vec<i32>,
    /// Growth of the drop counters ([`losses`]) over each phase's runs.
    losses: RefCell<BTreeMap<&'static str, Counters>>,
}

impl Run<'_> {
    fn raw(&self, w: &str) -> PathBuf {
        self.raw.join(format!("{}-{w}.txt", self.slug))
    }

    fn cpu(&self) -> f64 {
        self.pids.iter().map(|&p| proc_cpu(p)).sum()
    }

    /// Runs `f` (one dnsperf run of `phase`) and adds the growth of the drop
    /// counters over it to the phase's.
    fn counted<T>(&self, phase: &'static str, f: impl FnOnce() -> T) -> T {
        let fastpath = self.slug == Kind::Localdns.slug();
        let before = losses::read(self.t, fastpath);
        let out = f();
        let after = losses::read(self.t, fastpath);
        let mut all = self.losses.borrow_mut();
        losses::add_growth(all.entry(phase).or_default(), &before, &after);
        out
    }
}

/// Args of a command line, owned.
pub(crate) fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// One contender through W1 (warm-up, saturation, fixed rate), then W2 and
/// W3; one JSON object of results.
pub(crate) fn measure(k: Kind, t: &Topo, o: &Opts, f: &Files, raw: &Path) -> Value {
    let procs = start(k, t, o);
    let run = Run {
        t,
        o,
        f,
        raw,
        slug: k.slug(),
        pids: procs.procs.iter().map(|p| p.pid()).collect(),
        losses: RefCell::new(BTreeMap::new()),
    };
    let mut r = serde_json::Map::new();
    r.insert("name".into(), json!(k.name()));
    r.insert("version".into(), json!(k.version()));
    if k != Kind::Null {
        warm_up(&run);
    }
    w1_saturation(&run, &mut r);
    w1_fixed(&run, &mut r);
    if k != Kind::Null {
        w2_w3(&run, &mut r);
    }
    r.insert("loss_counters".into(), json!(*run.losses.borrow()));
    r.insert(
        "peak_rss_kib".into(),
        json!(run.pids.iter().map(|&p| peak_rss_kib(p)).sum::<u64>()),
    );
    drop(procs);
    // Let sockets and XDP attachments go before the next contender.
    std::thread::sleep(Duration::from_millis(300));
    Value::Object(r)
}

/// The whole warm set once, at a moderate rate (not counted).
fn warm_up(run: &Run) {
    let a = dnsperf_once(20_000, &run.f.hits);
    generate(run.t, "dnsperf", &a, &run.raw("w1-warmup"));
}

/// kxdpgun's offered rate at saturation: above every contender's ceiling.
pub(crate) const SATURATION: &str = "4000000";

/// kxdpgun for `secs` over the names in `file` at `rate` q/s, from the
/// client netns's eth0 to the listener.
pub(crate) fn kxdpgun_args(o: &Opts, file: &Path, rate: &str) -> Vec<String> {
    args(&[
        "-t",
        &o.secs.to_string(),
        "-Q",
        rate,
        "-I",
        "eth0",
        "-i",
        &file.display().to_string(),
        LISTEN,
    ])
}

/// W1 at saturation: kxdpgun (AF_XDP) and dnsperf, `runs` times each.
fn w1_saturation(run: &Run, r: &mut serde_json::Map<String, Value>) {
    let (t, o, f) = (run.t, run.o, run.f);
    let (mut kx, mut kx_cpu, mut dp, mut dp_cpu, mut dp_lost) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (bs0, ns0) = bpf_run();
    for i in 0..o.runs {
        let a = kxdpgun_args(o, &f.hits, SATURATION);
        let (text, ccpu, wall) = generate(t, "kxdpgun", &a, &run.raw(&format!("w1-kxdpgun-{i}")));
        kx.push(kxdpgun_replies(&text));
        kx_cpu.push(ccpu / wall);
        let (text, ccpu, wall) = run.counted("w1", || {
            generate(
                t,
                "dnsperf",
                &dnsperf_sat(o, &f.hits, false),
                &run.raw(&format!("w1-dnsperf-{i}")),
            )
        });
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
    r.insert("w1_kxdpgun_qps".into(), json!(median(&kx)));
    r.insert("w1_kxdpgun_client_cpu".into(), json!(median(&kx_cpu)));
    r.insert("w1_dnsperf_qps".into(), json!(median(&dp)));
    r.insert("w1_dnsperf_client_cpu".into(), json!(median(&dp_cpu)));
    r.insert("w1_dnsperf_lost".into(), json!(dp_lost.iter().sum::<f64>()));
    // Latency at saturation (short verbose run).
    if !o.quick {
        let mut a = dnsperf_sat(o, &f.hits, false);
        a[3] = "2".into();
        a.push("-v".into());
        let (text, _, _) = generate(t, "dnsperf", &a, &run.raw("w1-sat-latency"));
        r.insert("sat_latency_us".into(), json!(percentiles(&text)));
    }
}

/// W1 at a fixed offered rate: latency percentiles and server CPU (the
/// contender's processes plus its BPF run time) per answer.
fn w1_fixed(run: &Run, r: &mut serde_json::Map<String, Value>) {
    let o = run.o;
    let (c0, (b0, n0)) = (run.cpu(), bpf_run());
    let mut a = dnsperf_fixed(o.secs, o.fixed_qps, &run.f.hits);
    a.push("-v".into());
    let (text, _, _) = run.counted("w1", || {
        generate(run.t, "dnsperf", &a, &run.raw("w1-fixed"))
    });
    let (c1, (b1, n1)) = (run.cpu(), bpf_run());
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
}

/// W2 (90% hits, 10% unique misses) and W3 (unique cluster.local misses).
fn w2_w3(run: &Run, r: &mut serde_json::Map<String, Value>) {
    let (t, o) = (run.t, run.o);
    let lines = if o.quick { 200_000 } else { 2_000_000 };
    // Run `i` of `phase`: one pass over a query file at saturation; (q/s,
    // lost); the file goes.
    let once = |file: PathBuf, phase: &'static str, i: usize| {
        let raw = run.raw(&format!("{phase}-{i}"));
        let (text, _, _) = run.counted(phase, || {
            generate(t, "dnsperf", &dnsperf_sat(o, &file, true), &raw)
        });
        let _ = std::fs::remove_file(file);
        (
            field(&text, "Queries per second:").unwrap_or(0.0),
            field(&text, "Queries lost:").unwrap_or(0.0),
        )
    };
    let (mut w2, mut w2l, mut w3, mut w3l) = (vec![], vec![], vec![], vec![]);
    for i in 0..o.runs {
        let tag = format!("{}{i}", run.slug);
        let (q, l) = once(mix_file(o, &t.dir.path, &tag, lines), "w2", i);
        w2.push(q);
        w2l.push(l);
        let (q, l) = once(miss_file(&t.dir.path, &tag, lines / 4), "w3", i);
        w3.push(q);
        w3l.push(l);
    }
    r.insert("w2_qps".into(), json!(median(&w2)));
    r.insert("w2_lost".into(), json!(w2l.iter().sum::<f64>()));
    r.insert("w3_qps".into(), json!(median(&w3)));
    r.insert("w3_lost".into(), json!(w3l.iter().sum::<f64>()));
}

/// Kernel cost per packet in BPF_PROG_TEST_RUN, step by step
/// ([`localdns_tests::profile`]): a fresh hit of the fast path, a miss, and
/// the null responder (the XDP_TX ceiling) on the same query.
pub(crate) fn prog_test_run_ns() -> Value {
    use localdns_tests::{FrameSpec, QEdns, dns_query, dns_response};
    use localdns_user::cache::{Entry, Key, mono_ns};
    use localdns_user::wire::parse_query;
    let (vnet, client) = (
        std::net::Ipv4Addr::new(169, 254, 10, 10),
        std::net::Ipv4Addr::new(169, 254, 50, 2),
    );
    let seed = 42;
    let edns = QEdns {
        udp_size: 1232,
        do_bit: false,
        options: vec![],
    };
    let q = dns_query(7, "h1.bench.test", 1, 0x0100, Some(&edns));
    let other = dns_query(7, "h2.bench.test", 1, 0x0100, Some(&edns));
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
    let load = |fault| {
        let g = localdns_user::fastpath::Globals {
            listen: vec![
                (vnet.into(), localdns_common::VIEW_VNET),
                (
                    std::net::Ipv4Addr::new(169, 254, 10, 11).into(),
                    localdns_common::VIEW_KUBE,
                ),
            ],
            seed,
            fault,
        };
        let mut ebpf = localdns_user::fastpath::open(&g, 1024, None).unwrap();
        localdns_user::fastpath::load_xdp(&mut ebpf).unwrap();
        let e = Entry::from_upstream(&pq, &resp, 3600, 0, mono_ns()).unwrap();
        let key = Key::of(localdns_common::VIEW_VNET, &pq);
        let mut cache =
            localdns_user::fastpath::classes::CacheMaps::take(&mut ebpf, false).unwrap();
        cache
            .insert(
                &localdns_user::fastpath::encode::key(&key, seed),
                &localdns_user::fastpath::encode::value(&key, &e).unwrap(),
            )
            .unwrap();
        ebpf
    };
    let frame = FrameSpec::udp(client, vnet, 40000, 53).build(&q);
    let miss = FrameSpec::udp(client, vnet, 40000, 53).build(&other);
    let p = localdns_tests::profile::hit_profile(load, &frame, &miss);
    json!({
        "localdns_xdp": p.hit_single_ns(),
        "localdns_null": p.steps.last().map(|s| s.single_ns),
        "hit_net_ns": p.net_ns(localdns_tests::profile::Profile::HIT),
        "profile": p.to_json(),
        "profile_md": p.table(),
    })
}
