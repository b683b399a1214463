//! localdnsconfig.json semantics against fault-injecting upstreams: forward
//! policies, maxConcurrent, TTL cap, serveStale modes through an outage and
//! its recovery, and SIGHUP under load.

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use localdns_tests::fake::{
    FakeUpstream, MODE_DROP, MODE_NORMAL, MODE_SERVFAIL, MODE_TRUNCATE_UDP,
};
use localdns_tests::netns::wait_for;
use localdns_tests::topo::{SAMPLE_CONFIG, Topo, VNET, sample_with};

const UPS: [&str; 3] = ["169.254.200.3", "169.254.200.4", "169.254.200.5"];

/// A Required-mode config whose vnet view has the given extra zones
/// (`(name, JSON fields)`); everything else takes the defaults.
fn config(zones: &[(&str, &str)]) -> String {
    let z: Vec<String> = zones
        .iter()
        .map(|(n, f)| format!("\"{n}\": {{ {f} }}"))
        .collect();
    format!(
        r#"{{"localDNSProfile": {{"mode": "Required", "vnetDNSOverrides": {{ {} }}}}}}"#,
        z.join(", ")
    )
}

/// Topology + `n` fake upstreams + daemon on `cfg` with them as VnetDNS.
fn setup(n: usize, cfg: &str) -> (Topo, Vec<FakeUpstream>) {
    let mut t = Topo::new();
    let fakes: Vec<FakeUpstream> = UPS[..n]
        .iter()
        .map(|ip| {
            t.add_upstream_ip(ip);
            FakeUpstream::start(&t.upstream, ip.parse().unwrap())
        })
        .collect();
    let path = t.dir.path.join("localdnsconfig.json");
    std::fs::write(&path, cfg).unwrap();
    let mut args = vec![
        "--iface",
        "vpod0",
        "--config",
        path.to_str().unwrap(),
        "--cluster-dns",
        UPS[0],
    ];
    for ip in &UPS[..n] {
        args.extend_from_slice(&["--vnet-dns", ip]);
    }
    t.start_daemon_raw(&args);
    (t, fakes)
}

/// (status, first answer's TTL and address, elapsed).
fn query(t: &Topo, name: &str) -> (String, Option<(u32, String)>, Duration) {
    let t0 = Instant::now();
    let r = t.dig(VNET, name, "A");
    let el = t0.elapsed();
    match r {
        None => ("TIMEOUT".into(), None, el),
        Some((st, a)) => {
            let first = a.first().map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                (f[1].parse().unwrap(), f[4].to_string())
            });
            (st, first, el)
        }
    }
}

#[test]
fn forward_policies_over_three_upstreams() {
    let cfg = config(&[
        ("seq.test", r#""forwardPolicy": "Sequential""#),
        ("rr.test", r#""forwardPolicy": "round_robin""#),
        ("rnd.test", r#""forwardPolicy": "random""#),
    ]);
    let (t, fakes) = setup(3, &cfg);
    let counts = || -> Vec<u64> { fakes.iter().map(|f| f.ctl.queries()).collect() };
    let mut per_zone = Vec::new();
    for zone in ["seq.test", "rr.test", "rnd.test"] {
        let c0 = counts();
        for i in 0..30 {
            let (st, _, _) = query(&t, &format!("n{i}.{zone}"));
            assert_eq!(st, "NOERROR");
        }
        let d: Vec<u64> = counts().iter().zip(&c0).map(|(a, b)| a - b).collect();
        per_zone.push(d);
    }
    assert_eq!(
        per_zone[0],
        [30, 0, 0],
        "sequential: first healthy upstream only"
    );
    assert_eq!(per_zone[1], [10, 10, 10], "round_robin: even rotation");
    assert!(
        per_zone[2].iter().all(|&n| n > 0) && per_zone[2].iter().sum::<u64>() == 30,
        "random: {:?}",
        per_zone[2]
    );
}

#[test]
fn sequential_skips_a_dead_upstream() {
    let cfg = config(&[("seq.test", r#""forwardPolicy": "Sequential""#)]);
    let (t, fakes) = setup(2, &cfg);
    fakes[0].ctl.mode.store(MODE_DROP, Ordering::Relaxed);
    // The first queries pay one try timeout each, then the dead one is
    // skipped: later queries are fast and all go to the second.
    for i in 0..2 {
        assert_eq!(query(&t, &format!("warm{i}.seq.test")).0, "NOERROR");
    }
    let before = fakes[1].ctl.queries();
    for i in 0..10 {
        let (st, _, el) = query(&t, &format!("n{i}.seq.test"));
        assert_eq!(st, "NOERROR");
        assert!(el < Duration::from_millis(500), "query {i} took {el:?}");
    }
    assert_eq!(fakes[1].ctl.queries() - before, 10);
    // Recovered upstreams are re-probed and used again.
    fakes[0].ctl.mode.store(MODE_NORMAL, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(2100));
    let first = fakes[0].ctl.queries();
    for i in 0..5 {
        assert_eq!(query(&t, &format!("back{i}.seq.test")).0, "NOERROR");
    }
    assert!(
        fakes[0].ctl.queries() - first >= 4,
        "recovered upstream not used again"
    );
}

#[test]
fn max_concurrent_refuses_overflow_at_once() {
    let cfg = config(&[("slow.test", r#""maxConcurrent": 2"#)]);
    let (t, fakes) = setup(1, &cfg);
    fakes[0].ctl.delay_ms.store(800, Ordering::Relaxed);
    // Six queries at once from one socket; print id, rcode, elapsed.
    let py = r#"
import socket, struct, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.2)
def q(i):
    name = b''.join(bytes([len(l)]) + l for l in [b'q%d' % i, b'slow', b'test']) + b'\0'
    return struct.pack('>HHHHHH', i, 0x0100, 1, 0, 0, 0) + name + struct.pack('>HH', 1, 1)
t0 = time.time()
for i in range(6):
    s.sendto(q(i), ('169.254.10.10', 53))
got = {}
while len(got) < 6 and time.time() - t0 < 3:
    try:
        d, _ = s.recvfrom(4096)
    except socket.timeout:
        continue
    i, fl = struct.unpack('>HH', d[:4])
    got[i] = (fl & 0xf, time.time() - t0)
for i, (rc, el) in sorted(got.items()):
    print(i, rc, '%.3f' % el)
"#;
    let out = t.pod.sh_ok("python3", &["-c", py]);
    let rows: Vec<(u8, f64)> = out
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[1].parse().unwrap(), f[2].parse().unwrap())
        })
        .collect();
    assert_eq!(rows.len(), 6, "{out}");
    let ok: Vec<f64> = rows.iter().filter(|r| r.0 == 0).map(|r| r.1).collect();
    let refused: Vec<f64> = rows.iter().filter(|r| r.0 == 5).map(|r| r.1).collect();
    assert_eq!((ok.len(), refused.len()), (2, 4), "{out}");
    assert!(
        ok.iter().all(|&e| e >= 0.7),
        "answered before the upstream did: {out}"
    );
    assert!(
        refused.iter().all(|&e| e < 0.3),
        "REFUSED was not immediate: {out}"
    );
    assert_eq!(
        fakes[0].ctl.queries(),
        2,
        "overflow must not reach the upstream"
    );
}

#[test]
fn cache_duration_caps_ttls_in_daemon_and_kernel() {
    let cfg = config(&[("cap.test", r#""cacheDurationInSeconds": 5"#)]);
    let (t, fakes) = setup(1, &cfg);
    fakes[0].ctl.ttl.store(300, Ordering::Relaxed);
    let (_, a, _) = query(&t, "x.cap.test");
    assert!(a.unwrap().0 <= 5);
    let h0 = t.kernel_stat("hit");
    let (_, a, _) = query(&t, "x.cap.test");
    assert!(a.unwrap().0 <= 5);
    assert_eq!(t.kernel_stat("hit"), h0 + 1);
    // Never extends: a 2 s upstream TTL stays 2.
    fakes[0].ctl.ttl.store(2, Ordering::Relaxed);
    let (_, a, _) = query(&t, "y.cap.test");
    assert_eq!(a.unwrap().0, 2);
}

#[test]
fn serve_stale_modes_through_outage_and_recovery() {
    let cfg = config(&[
        ("imm.test", r#""serveStale": "Immediate""#),
        ("ver.test", r#""serveStale": "Verify""#),
        ("dis.test", r#""serveStale": "Disable""#),
        (
            "short.test",
            r#""serveStale": "Immediate", "serveStaleDurationInSeconds": 2"#,
        ),
    ]);
    let (t, fakes) = setup(1, &cfg);
    let f = &fakes[0].ctl;
    f.ttl.store(1, Ordering::Relaxed);
    f.set_answer(Ipv4Addr::new(10, 1, 1, 1));
    let warm = Instant::now();
    for z in ["imm", "ver", "dis", "short"] {
        let (st, a, _) = query(&t, &format!("a.{z}.test"));
        assert_eq!(
            (st.as_str(), a.unwrap().1.as_str()),
            ("NOERROR", "10.1.1.1")
        );
    }
    // Outage; let the 1 s TTLs run out.
    f.mode.store(MODE_DROP, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(1300));

    let (st, a, el) = query(&t, "a.imm.test");
    assert_eq!(
        (st.as_str(), a),
        ("NOERROR", Some((0, "10.1.1.1".into()))),
        "Immediate serves stale with TTL 0"
    );
    assert!(el < Duration::from_millis(500), "Immediate took {el:?}");

    let (st, a, el) = query(&t, "a.ver.test");
    assert_eq!(
        (st.as_str(), a),
        ("NOERROR", Some((0, "10.1.1.1".into()))),
        "Verify falls back to stale"
    );
    assert!(
        el >= Duration::from_millis(1000) && el < Duration::from_millis(2500),
        "Verify asked upstream first: {el:?}"
    );

    let (st, _, el) = query(&t, "a.dis.test");
    assert_eq!(st, "SERVFAIL", "Disable never serves stale");
    // Three tries of 1 s (retransmits), then SERVFAIL: never a hang.
    assert!(el < Duration::from_millis(3500), "{el:?}");

    // Past expiry + serveStaleDuration the entry is gone.
    std::thread::sleep(
        (warm + Duration::from_millis(3500)).saturating_duration_since(Instant::now()),
    );
    assert_eq!(query(&t, "a.short.test").0, "SERVFAIL");

    // Recovery with a new address.
    f.mode.store(MODE_NORMAL, Ordering::Relaxed);
    f.set_answer(Ipv4Addr::new(10, 2, 2, 2));
    f.ttl.store(300, Ordering::Relaxed);
    assert_eq!(
        query(&t, "a.ver.test").1.unwrap().1,
        "10.2.2.2",
        "Verify asks upstream first"
    );
    assert_eq!(query(&t, "a.dis.test").1.unwrap().1, "10.2.2.2");
    // Immediate keeps answering at once and picks up the refresh soon.
    let fresh = wait_for(Duration::from_secs(6), || {
        let (st, a, el) = query(&t, "a.imm.test");
        assert!(
            st == "NOERROR" && el < Duration::from_millis(500),
            "{st} {el:?}"
        );
        (a.unwrap().1 == "10.2.2.2").then_some(())
    });
    assert!(fresh.is_some(), "Immediate never refreshed");
}

#[test]
fn sighup_under_load_answers_every_query() {
    let mut t = Topo::new();
    let cfg = t.dir.path.join("localdnsconfig.json");
    let sample = SAMPLE_CONFIG;
    std::fs::write(&cfg, sample).unwrap();
    t.start_daemon(&["--iface", "vpod0", "--config", cfg.to_str().unwrap()]);
    let data = t.dir.path.join("queries.txt");
    std::fs::write(
        &data,
        "www.example.test A\nalias.example.test A\nns.example.test A\nwww.example.test AAAA\nnothere.example.test A\nkubernetes.default.svc.cluster.local A\nkube-dns.kube-system.svc.cluster.local A\n",
    )
    .unwrap();
    let pid = t.daemon.as_ref().unwrap().pid();
    // vnet cluster.local gets a new cap: its cache is dropped.
    let changed = sample_with(
        "\"cluster.local\"",
        0,
        "\"cacheDurationInSeconds\": 3600",
        "\"cacheDurationInSeconds\": 60",
    );
    let cfg2 = cfg.clone();
    let hup = std::thread::spawn(move || {
        // At 1 s, 2 s and 3 s into the 4 s run: valid, invalid, valid again.
        for text in [changed.as_str(), "{ broken", sample] {
            std::thread::sleep(Duration::from_millis(1000));
            std::fs::write(&cfg2, text).unwrap();
            // SAFETY: signalling the daemon we started.
            unsafe { libc::kill(pid, libc::SIGHUP) };
        }
    });
    let out = t.pod.sh_ok(
        "dnsperf",
        &[
            "-s",
            VNET,
            "-d",
            data.to_str().unwrap(),
            "-l",
            "4",
            "-Q",
            "1000",
            "-c",
            "2",
            "-t",
            "2",
        ],
    );
    hup.join().unwrap();
    let line = |key: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(key))
            .unwrap_or_else(|| panic!("{out}"))
            .to_string()
    };
    let lost: u64 = line("Queries lost:")
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    let completed: u64 = line("Queries completed:")
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(lost, 0, "{out}");
    assert!(completed > 2000, "{out}");
    let log = t.daemon_log();
    assert_eq!(log.matches("configuration reloaded").count(), 2, "{log}");
    assert_eq!(log.matches("reload failed").count(), 1, "{log}");
    assert!(!out.contains("SERVFAIL"), "{out}");
    println!("{}", line("Queries completed:"));
}

#[test]
fn prefer_udp_retries_truncated_answers_over_tcp() {
    let (t, fakes) = setup(1, &config(&[("tc.test", r#""protocol": "PreferUDP""#)]));
    fakes[0]
        .ctl
        .mode
        .store(MODE_TRUNCATE_UDP, Ordering::Relaxed);
    let (st, a, _) = query(&t, "big.tc.test");
    assert_eq!(
        (st.as_str(), a.unwrap().1.as_str()),
        ("NOERROR", "10.1.1.1")
    );
    assert_eq!(fakes[0].ctl.udp_queries.load(Ordering::Relaxed), 1);
    assert_eq!(fakes[0].ctl.tcp_queries.load(Ordering::Relaxed), 1);
    // ForceTCP never tries UDP.
    let (t2, fakes2) = setup(
        1,
        &config(&[(
            "tcp.test",
            r#""protocol": "ForceTCP", "serveStale": "Immediate""#,
        )]),
    );
    assert_eq!(query(&t2, "x.tcp.test").0, "NOERROR");
    assert_eq!(fakes2[0].ctl.udp_queries.load(Ordering::Relaxed), 0);
    assert_eq!(fakes2[0].ctl.tcp_queries.load(Ordering::Relaxed), 1);
    drop(t);
}

#[test]
fn servfail_is_never_cached() {
    let (t, fakes) = setup(1, &config(&[("sf.test", r#""serveStale": "Disable""#)]));
    fakes[0].ctl.mode.store(MODE_SERVFAIL, Ordering::Relaxed);
    assert_eq!(query(&t, "a.sf.test").0, "SERVFAIL");
    fakes[0].ctl.mode.store(MODE_NORMAL, Ordering::Relaxed);
    let (st, a, _) = query(&t, "a.sf.test");
    assert_eq!(
        (st.as_str(), a.unwrap().1.as_str()),
        ("NOERROR", "10.1.1.1")
    );
    assert_eq!(
        fakes[0].ctl.queries(),
        2,
        "the second query must go upstream again"
    );
}

#[test]
fn disabled_mode_cleans_up_after_a_killed_run() {
    let (mut t, _fakes) = setup(1, &config(&[]));
    assert_eq!(query(&t, "a.example.test").0, "NOERROR");
    // An OOM kill: no cleanup ran.
    let mut d = t.daemon.take().unwrap();
    d.signal(libc::SIGKILL);
    let _ = d.child.wait();
    let addrs = t.node.sh_ok("ip", &["-o", "addr", "show"]);
    assert!(addrs.contains("169.254.10.10/32"), "{addrs}");
    // The fast path outlives the process (pinned links).
    let link = t.node.sh_ok("ip", &["link", "show", "vpod0"]);
    assert!(link.contains("xdp"), "{link}");
    // mode Disabled removes what is left and exits 0.
    let path = t.dir.path.join("disabled.json");
    std::fs::write(&path, r#"{"localDNSProfile": {"mode": "Disabled"}}"#).unwrap();
    let out = t.node.output(
        localdns_tests::topo::daemon_bin().to_str().unwrap(),
        &[
            "--config",
            path.to_str().unwrap(),
            "--pin-path",
            &t.pin_path(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let addrs = t.node.sh_ok("ip", &["-o", "addr", "show"]);
    assert!(!addrs.contains("169.254.10.1"), "{addrs}");
    let link = t.node.sh_ok("ip", &["link", "show", "vpod0"]);
    assert!(!link.contains("xdp"), "{link}");
    assert_eq!(query(&t, "a.example.test").0, "TIMEOUT");
}

/// The upstream's established TCP connection goes silent (its packets are
/// dropped, no RST: a CoreDNS pod gone behind the service IP). New names
/// keep resolving: TCP_USER_TIMEOUT aborts the dead connection within a
/// second and the queries retry on a new one.
#[test]
fn a_silently_dead_tcp_connection_is_replaced() {
    let (t, fakes) = setup(
        1,
        &config(&[(
            "tcp.test",
            r#""protocol": "ForceTCP", "serveStale": "Immediate""#,
        )]),
    );
    assert_eq!(query(&t, "warm.tcp.test").0, "NOERROR");
    // The daemon's connection to the fake: drop everything it sends.
    let ss = t.node.sh_ok(
        "ss",
        &[
            "-Htn",
            "state",
            "established",
            "dst",
            &format!("{}:53", UPS[0]),
        ],
    );
    let port = ss
        .split_whitespace()
        .nth(2)
        .and_then(|local| local.rsplit(':').next())
        .unwrap_or_else(|| panic!("no upstream connection: {ss}"))
        .to_string();
    t.upstream.sh_ok(
        "nft",
        &[&format!(
            "add table inet ldt; add chain inet ldt in {{ type filter hook input priority 0; }}; add rule inet ldt in tcp sport {port} drop"
        )],
    );
    let t0 = Instant::now();
    let mut worst = Duration::ZERO;
    let mut n = 0;
    while t0.elapsed() < Duration::from_secs(4) {
        let (st, a, el) = query(&t, &format!("n{n}.tcp.test"));
        assert_eq!(st, "NOERROR", "query {n} at {:?}: {a:?}", t0.elapsed());
        worst = worst.max(el);
        n += 1;
    }
    println!(
        "dead TCP connection: {n} new names over 4 s all answered, slowest {worst:?}; {} TCP queries upstream",
        fakes[0].ctl.tcp_queries.load(Ordering::Relaxed)
    );
    assert!(worst < Duration::from_secs(2), "{worst:?}");
}

/// Malformed upstream replies are never relayed or cached: SERVFAIL, and an
/// error line naming the fault.
#[test]
fn malformed_upstream_replies_become_servfail() {
    use localdns_tests::fake::{MODE_BAD_POINTER, MODE_BAD_RDATA, MODE_TRAILING};
    let (t, fakes) = setup(1, &config(&[("bad.test", r#""serveStale": "Disable""#)]));
    for (mode, what) in [
        (MODE_BAD_RDATA, "RDATA past the end"),
        (MODE_BAD_POINTER, "compression pointer past the end"),
        (MODE_TRAILING, "trailing bytes"),
    ] {
        fakes[0].ctl.mode.store(mode, Ordering::Relaxed);
        let name = format!("m{mode}.bad.test");
        let (st, a, el) = query(&t, &name);
        assert_eq!(st, "SERVFAIL", "{what}: {a:?}");
        assert!(el < Duration::from_millis(3500), "{what}: {el:?}");
        let log = t.daemon_log();
        assert!(
            log.lines()
                .any(|l| l.starts_with(&format!("[ERROR] plugin/errors: 2 {name}. A:")))
                && log.contains("malformed reply"),
            "{what}:\n{log}"
        );
        // Not cached: a good reply afterwards is used.
        fakes[0].ctl.mode.store(MODE_NORMAL, Ordering::Relaxed);
        assert_eq!(query(&t, &name).0, "NOERROR", "{what}");
    }
}

/// One lost datagram is retransmitted, not turned into SERVFAIL.
#[test]
fn a_lost_udp_datagram_is_retransmitted() {
    use localdns_tests::fake::MODE_DROP_ONE_UDP;
    let (t, fakes) = setup(1, &config(&[("loss.test", "")]));
    fakes[0]
        .ctl
        .mode
        .store(MODE_DROP_ONE_UDP, Ordering::Relaxed);
    let (st, a, el) = query(&t, "x.loss.test");
    assert_eq!(
        (st.as_str(), a.map(|a| a.1)),
        ("NOERROR", Some("10.1.1.1".into()))
    );
    assert!(
        el >= Duration::from_millis(900) && el < Duration::from_millis(2500),
        "retransmitted after one try: {el:?}"
    );
    assert_eq!(fakes[0].ctl.udp_queries.load(Ordering::Relaxed), 2);
}

/// Identical misses arriving together share one upstream query.
#[test]
fn identical_misses_in_flight_are_coalesced() {
    let (t, fakes) = setup(1, &config(&[("co.test", "")]));
    fakes[0].ctl.delay_ms.store(400, Ordering::Relaxed);
    let py = "import socket,struct,threading\nq=struct.pack('>HHHHHH',0,0x100,1,0,0,0)+b'\\x04same\\x02co\\x04test\\x00'+struct.pack('>HH',1,1)\nok=[]\ndef one(i):\n  s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(3)\n  s.sendto(struct.pack('>H',i)+q[2:],('169.254.10.10',53))\n  r=s.recv(512);ok.append(r[3]&15)\nts=[threading.Thread(target=one,args=(i,)) for i in range(20)]\n[t.start() for t in ts];[t.join() for t in ts]\nprint(len(ok),sorted(set(ok)))\n";
    let out = t.pod.sh_ok("python3", &["-c", py]);
    assert_eq!(out.trim(), "20 [0]", "all 20 answered NOERROR");
    assert_eq!(
        fakes[0].ctl.queries(),
        1,
        "one upstream query for 20 identical misses"
    );
}
