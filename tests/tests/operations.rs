//! Operating like AKS LocalDNS: the health-check name, `/ready` and
//! `/health`, CoreDNS metrics that include kernel answers (parsed by the
//! Prometheus client library's own parser), and the systemd notify
//! protocol (READY, WATCHDOG, STOPPING) on a real notify socket.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use localdns_tests::client::{Opts, Tool, ask};
use localdns_tests::netns::{Netns, Proc, wait_for};
use localdns_tests::scrape::{PYTHON, scrape, sum};
use localdns_tests::topo::{
    DUAL_STACK, KUBE, KUBE6, POD_IP, POD_IP6, Topo, UPSTREAM_IP, VNET, VNET6, daemon_bin,
};

/// GET `url` from inside `ns`: (status, body).
fn http_get(ns: &Netns, url: &str) -> (u16, String) {
    let script = r#"
import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=3)
    print(r.status); sys.stdout.write(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); sys.stdout.write(e.read().decode())
"#;
    let o = ns.output(PYTHON, &["-c", script, url]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let (code, body) = text.split_once('\n').unwrap_or(("0", ""));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn health_check_name_is_answered_with_every_upstream_dead() {
    let mut t = Topo::new();
    // Upstreams nobody listens on: nothing can be forwarded.
    let dead = "169.254.200.9";
    let mut args = vec![
        "--iface",
        "vpod*",
        "--vnet-dns",
        dead,
        "--cluster-dns",
        dead,
        "--health",
        "169.254.100.1:8181",
    ];
    args.extend(DUAL_STACK);
    t.start_daemon_raw(&args);
    for (server, client, tcp) in [
        (VNET, POD_IP, false),
        (KUBE, POD_IP, true),
        (VNET6, POD_IP6, false),
        (KUBE6, POD_IP6, true),
    ] {
        let o = Opts {
            tcp,
            ..Opts::edns(1232)
        };
        let r = ask(
            &t.pod,
            Tool::Dig,
            server,
            "health-check.localdns.local",
            "A",
            o,
        )
        .unwrap_or_else(|| panic!("no answer from {server}\n{}", t.daemon_log()));
        assert_eq!(r.rcode, "NOERROR", "{}", r.text);
        assert!(r.answer.is_empty(), "{}", r.text);
        // whoami: the client's address and its port over the transport.
        let rtype = if client.contains(':') { "AAAA" } else { "A" };
        assert!(
            r.additional
                .contains(&format!("health-check.localdns.local. IN {rtype} {client}")),
            "{}",
            r.text
        );
        let proto = if tcp { "_tcp" } else { "_udp" };
        let srv = r
            .additional
            .iter()
            .find(|l| l.starts_with(&format!("{proto}.health-check.localdns.local. IN SRV 0 0 ")))
            .unwrap_or_else(|| panic!("no SRV: {}", r.text));
        let port: u16 = srv.split(" ").nth(5).unwrap().parse().unwrap();
        assert!(port > 0);
        assert!(r.has("qr") && r.has("ra") && !r.has("aa"), "{}", r.text);
    }
    // A name that must be forwarded: SERVFAIL after the tries, and the
    // upstreams get marked down; /ready says so, /health does not care.
    let (st, _) = t.dig(VNET, "www.example.test", "A").unwrap();
    assert_eq!(st, "SERVFAIL");
    let (st, _) = t
        .dig(KUBE, "kubernetes.default.svc.cluster.local", "A")
        .unwrap();
    assert_eq!(st, "SERVFAIL");
    let not_ready = wait_for(Duration::from_secs(5), || {
        let (code, body) = http_get(&t.pod, "http://169.254.100.1:8181/ready");
        (code == 503).then_some(body)
    })
    .unwrap_or_else(|| panic!("/ready stayed OK\n{}", t.daemon_log()));
    assert!(not_ready.contains("no healthy upstream"), "{not_ready}");
    assert_eq!(http_get(&t.pod, "http://169.254.100.1:8181/health").0, 200);
}

#[test]
fn ready_and_metrics_follow_coredns_and_count_kernel_answers() {
    let mut t = Topo::new();
    t.start_daemon(&[
        "--iface",
        "vpod*",
        "--metrics",
        "169.254.100.1:9253",
        "--health",
        "169.254.100.1:8181",
    ]);
    let (code, body) = http_get(&t.pod, "http://169.254.100.1:8181/ready");
    assert_eq!((code, body.trim()), (200, "OK"));
    let before = scrape(&t.pod, "http://169.254.100.1:9253/metrics");
    let server = format!("server=\"dns://{VNET}:53\"");
    let zone = "zone=\".\"";
    let req = |s: &[String]| {
        sum(
            s,
            "coredns_dns_requests_total",
            &[&server, zone, "type=\"A\"", "proto=\"udp\""],
        )
    };
    let hits = |s: &[String]| {
        sum(
            s,
            "coredns_cache_hits_total",
            &[&server, "zones=\".\"", "type=\"success\""],
        )
    };
    let h0 = t.kernel_stat("hit");
    const N: u64 = 20;
    for _ in 0..N {
        let (st, _) = t.dig(VNET, "www.example.test", "A").unwrap();
        assert_eq!(st, "NOERROR");
    }
    let kernel = t.kernel_stat("hit") - h0;
    assert_eq!(kernel, N - 1, "all but the first answered by the kernel");
    let after = scrape(&t.pod, "http://169.254.100.1:9253/metrics");
    assert_eq!(req(&after) - req(&before), N as f64, "requests: {after:#?}");
    assert_eq!(hits(&after) - hits(&before), (N - 1) as f64);
    let grew = |name: &str, want: &[&str]| sum(&after, name, want) - sum(&before, name, want);
    let noerror = [server.as_str(), zone, "rcode=\"NOERROR\""];
    assert_eq!(grew("coredns_dns_responses_total", &noerror), N as f64);
    let typed = [server.as_str(), zone, "type=\"A\""];
    assert_eq!(
        grew("coredns_dns_request_duration_seconds_count", &typed),
        N as f64
    );
    // The miss went upstream once.
    assert!(sum(&after, "coredns_forward_requests_total", &[]) >= 1.0);
    assert!(sum(&after, "coredns_cache_entries", &["type=\"success\""]) >= 1.0);
    assert_eq!(
        grew("localdns_kernel_packets_total", &["result=\"hit\""]),
        (N - 1) as f64
    );
    assert_eq!(sum(&after, "localdns_kernel_fastpath_up", &[]), 1.0);
}

/// systemd's side of `Type=notify` and `WatchdogSec=`: a datagram socket
/// named by NOTIFY_SOCKET.
#[test]
fn systemd_notify_ready_watchdog_stopping() {
    let t = Topo::new();
    let path = t.dir.path.join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let d = t.spawn_daemon_with(&Topo::upstream_args(), "daemon.log", |c| {
        c.env("NOTIFY_SOCKET", &path)
            .env("WATCHDOG_USEC", "1000000");
    });
    let mut d = d;
    let mut msgs: Vec<(Instant, String)> = Vec::new();
    let read_until = |until: Instant, msgs: &mut Vec<(Instant, String)>| {
        let mut buf = [0u8; 512];
        while Instant::now() < until {
            if let Ok(n) = sock.recv(&mut buf) {
                msgs.push((
                    Instant::now(),
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                ));
            }
        }
    };
    // spawn_daemon returned once the daemon logged "ready": READY=1 is
    // already queued, and the daemon answers.
    read_until(Instant::now() + Duration::from_millis(300), &mut msgs);
    assert!(
        msgs.iter().any(|(_, m)| m.contains("READY=1")),
        "{msgs:?}\n{}",
        t.daemon_log()
    );
    let (st, _) = t.dig(VNET, "www.example.test", "A").unwrap();
    assert_eq!(st, "NOERROR");
    // Watchdog pings at half the 1 s interval, each after a self-check.
    let from = Instant::now();
    read_until(from + Duration::from_millis(2600), &mut msgs);
    let pings = msgs
        .iter()
        .filter(|(at, m)| *at >= from && m.contains("WATCHDOG=1"))
        .count();
    assert!((4..=7).contains(&pings), "{pings} pings in 2.6 s: {msgs:?}");
    assert!(d.terminate(Duration::from_secs(10)), "daemon did not stop");
    read_until(Instant::now() + Duration::from_millis(300), &mut msgs);
    assert!(
        msgs.iter().any(|(_, m)| m.contains("STOPPING=1")),
        "{msgs:?}"
    );
    // READY came before any watchdog ping and STOPPING last.
    let first = |what: &str| msgs.iter().position(|(_, m)| m.contains(what)).unwrap();
    assert!(first("READY=1") < first("WATCHDOG=1"));
    assert!(first("STOPPING=1") > first("WATCHDOG=1"));
}

fn conntrack_count(ns: &Netns) -> u64 {
    ns.sh_ok("cat", &["/proc/sys/net/netfilter/nf_conntrack_count"])
        .trim()
        .parse()
        .unwrap()
}

/// NOTRACK: with conntrack active in the node (a rule that uses it), 400
/// daemon-path misses add no conntrack entries: the rules cover queries
/// and replies on the listener addresses, over UDP and TCP. The upstream
/// side here is one persistent TCP connection (cluster.local is ForceTCP).
#[test]
fn daemon_path_misses_create_no_conntrack_entries() {
    let mut t = Topo::new();
    t.node.sh_ok("nft", &["add table ip ldt; add chain ip ldt pre { type filter hook prerouting priority 0; }; add rule ip ldt pre ct state new counter"]);
    t.start_daemon(&["--iface", "vpod*"]);
    let rules = t.node.sh_ok("nft", &["list", "table", "inet", "localdns"]);
    assert_eq!(rules.matches("notrack").count(), 8, "{rules}");
    // Warm the upstream connection, then count.
    let (st, _) = t
        .dig(KUBE, "kubernetes.default.svc.cluster.local", "A")
        .unwrap();
    assert_eq!(st, "NOERROR");
    let before = conntrack_count(&t.node);
    // 400 names nobody asked before, in batches of 100 per dig run, over
    // UDP and TCP.
    for (batch, tcp) in [(0, false), (1, true), (2, false), (3, true)] {
        let names: Vec<String> = (0..100)
            .map(|i| format!("n{batch}-{i}.default.svc.cluster.local"))
            .collect();
        let mut args = vec![
            format!("@{KUBE}"),
            "+tries=1".into(),
            "+time=3".into(),
            "+short".into(),
        ];
        if tcp {
            args.push("+tcp".into());
        }
        args.extend(names);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = t.pod.output("dig", &args);
        assert!(o.status.success(), "{o:?}");
    }
    let misses = t.kernel_stat("miss");
    let after = conntrack_count(&t.node);
    eprintln!(
        "conntrack: {before} entries before, {after} after 400 misses (kernel misses counted {misses})"
    );
    // Only the UDP half passes the XDP program (TCP goes to the socket).
    assert!(misses >= 200, "{misses}");
    let listed = t.node.sh_ok("nft", &["list", "table", "inet", "localdns"]);
    let matched: u64 = listed
        .split("counter packets ")
        .skip(1)
        .map(|s| s.split_whitespace().next().unwrap().parse::<u64>().unwrap())
        .sum();
    // Each query and each reply crosses one of the rules at least once.
    assert!(
        matched >= 800,
        "NOTRACK rules matched {matched} packets:\n{listed}"
    );
    assert!(
        after <= before + 2,
        "conntrack grew from {before} to {after}:\n{}",
        t.node.sh_ok("cat", &["/proc/net/nf_conntrack"])
    );
    // The rules come back when someone flushes them, and teardown removes
    // them.
    t.node
        .sh_ok("nft", &["delete", "table", "inet", "localdns"]);
    let back = wait_for(Duration::from_secs(15), || {
        t.node
            .output("nft", &["list", "table", "inet", "localdns"])
            .status
            .success()
            .then_some(())
    });
    assert!(back.is_some(), "NOTRACK table not reinstalled");
    // SIGTERM leaves the rules with the rest of the fast path (a successor
    // keeps them); teardown removes them.
    assert!(
        t.daemon
            .as_mut()
            .unwrap()
            .terminate(Duration::from_secs(10))
    );
    t.node.sh_ok("nft", &["list", "table", "inet", "localdns"]);
    let out = t.node.output(
        daemon_bin().to_str().unwrap(),
        &["teardown", "--pin-path", &t.pin_path()],
    );
    assert!(out.status.success(), "{out:?}");
    let gone = t.node.output("nft", &["list", "table", "inet", "localdns"]);
    assert!(!gone.status.success(), "NOTRACK table left after teardown");
    t.node.sh_ok("nft", &["delete", "table", "ip", "ldt"]);
}

/// dnsmasq in the upstream netns forwarding `server`-wards, as a real
/// second-hop resolver.
fn dnsmasq(t: &Topo, listen: &str, server: &str, log: &str) -> Proc {
    let mut cmd = t.upstream.cmd("dnsmasq");
    cmd.args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--cache-size=0",
        "--bind-interfaces",
        "--pid-file=",
        "--user=root",
        &format!("--listen-address={listen}"),
        &format!("--server={server}"),
    ]);
    let p = Proc::spawn(cmd, "dnsmasq", &t.dir.path.join(log));
    std::thread::sleep(Duration::from_millis(300));
    p
}

/// A forwarding loop (the vnet upstream is a dnsmasq that forwards back to
/// 169.254.10.10) is found by the loop probe: CoreDNS's log line, SERVFAIL
/// at once for the looping zone's misses instead of timeouts, /ready 503,
/// the gauge; the kube view's cluster.local still resolves. When the
/// upstream is fixed, the next probe clears it all.
#[test]
fn forwarding_loop_is_detected_answered_fast_and_cleared() {
    let mut t = Topo::new();
    let fwd = "169.254.200.53";
    t.add_upstream_ip(fwd);
    let mut dm = dnsmasq(&t, fwd, VNET, "dnsmasq-loop.log");
    t.start_daemon_raw(&[
        "--iface",
        "vpod*",
        "--vnet-dns",
        fwd,
        "--cluster-dns",
        UPSTREAM_IP,
        "--health",
        "169.254.100.1:8181",
        "--metrics",
        "169.254.100.1:9253",
        "--loop-probe-interval",
        "1",
    ]);
    let line = wait_for(Duration::from_secs(10), || {
        t.daemon_log()
            .lines()
            .find(|l| l.starts_with("[ERROR] plugin/loop: Loop ("))
            .map(str::to_string)
    })
    .unwrap_or_else(|| panic!("no loop found:\n{}", t.daemon_log()));
    assert!(
        line.contains("detected for zone \".\"")
            && line.contains("coredns.io/plugins/loop#troubleshooting")
            && line.contains("Query: \"HINFO "),
        "{line}"
    );
    let started = Instant::now();
    let (st, _) = t.dig(VNET, "www.example.test", "A").unwrap();
    let took = started.elapsed();
    assert_eq!(st, "SERVFAIL");
    assert!(took < Duration::from_millis(500), "SERVFAIL took {took:?}");
    let (st, _) = t
        .dig(KUBE, "kubernetes.default.svc.cluster.local", "A")
        .unwrap();
    assert_eq!(st, "NOERROR");
    let (code, body) = http_get(&t.pod, "http://169.254.100.1:8181/ready");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("forwarding loop"), "{body}");
    let m = scrape(&t.pod, "http://169.254.100.1:9253/metrics");
    assert_eq!(
        sum(
            &m,
            "localdns_forward_loop",
            &["view=\"vnet\"", "zone=\".\""]
        ),
        1.0,
        "{m:?}"
    );
    assert!(sum(&m, "localdns_loops_detected_total", &[]) >= 1.0);

    // Fixed: dnsmasq now forwards to the real upstream.
    assert!(dm.terminate(Duration::from_secs(5)));
    let _dm = dnsmasq(&t, fwd, UPSTREAM_IP, "dnsmasq-fixed.log");
    let ok = wait_for(Duration::from_secs(10), || {
        (http_get(&t.pod, "http://169.254.100.1:8181/ready").0 == 200).then_some(())
    });
    assert!(ok.is_some(), "still looping:\n{}", t.daemon_log());
    let (st, _) = t.dig(VNET, "www.example.test", "A").unwrap();
    assert_eq!(st, "NOERROR");
    let m = scrape(&t.pod, "http://169.254.100.1:9253/metrics");
    assert_eq!(sum(&m, "localdns_forward_loop", &["view=\"vnet\""]), 0.0);
}

/// An upstream that is one of our own listeners is refused at start.
#[test]
fn an_upstream_that_is_our_own_listener_is_refused() {
    let t = Topo::new();
    let o = t.node.output(
        daemon_bin().to_str().unwrap(),
        &[
            "--cluster-dns",
            KUBE,
            "--pin-path",
            &t.pin_path(),
            "--no-fastpath",
        ],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--cluster-dns 169.254.10.11:53 is one of this daemon's own listeners"),
        "{err}"
    );
}

/// What AKS's Corefile adds in the `.` zones of both views: NXDOMAIN for
/// search-list junk (4+ labels before internal.cloudapp.net, anything
/// under reddog.microsoft.com) without asking upstream, and a hosts file
/// (ttl 5, reload 5s, fallthrough) whose answers the kernel serves too.
#[test]
fn nxdomain_templates_and_hosts_file() {
    let mut t = Topo::new();
    let hosts = t.dir.path.join("hosts");
    std::fs::write(&hosts, "# test\n10.1.2.3 db.example.internal\n").unwrap();
    t.start_daemon(&["--iface", "vpod*", "--hosts-file", hosts.to_str().unwrap()]);
    for server in [VNET, KUBE] {
        for (name, want) in [
            ("a.b.c.d.internal.cloudapp.net", "NXDOMAIN"),
            ("www.google.com.ns1.svc.internal.cloudapp.net", "NXDOMAIN"),
            ("x.reddog.microsoft.com", "NXDOMAIN"),
            ("reddog.microsoft.com", "NXDOMAIN"),
            // Fewer labels: forwarded; NSD has no such zone and refuses.
            ("vm1.internal.cloudapp.net", "REFUSED"),
        ] {
            let (st, _) = t.dig(server, name, "A").unwrap();
            assert_eq!(st, want, "{name} @{server}");
        }
        let (st, ans) = t.dig(server, "db.example.internal", "A").unwrap();
        assert_eq!(st, "NOERROR");
        assert_eq!(ans.len(), 1, "{ans:?}");
        let f: Vec<&str> = ans[0].split_whitespace().collect();
        assert_eq!((f[3], f[4]), ("A", "10.1.2.3"), "{ans:?}");
        assert!(f[1].parse::<u32>().unwrap() <= 5, "{ans:?}");
        // No AAAA in the file: falls through to the upstream.
        let (st, _) = t.dig(server, "db.example.internal", "AAAA").unwrap();
        assert_eq!(st, "REFUSED");
    }
    // The hosts answer is cached like an upstream's: the kernel answers it.
    let hits = t.kernel_stat("hit");
    let (st, _) = t.dig(VNET, "db.example.internal", "A").unwrap();
    assert_eq!(st, "NOERROR");
    assert_eq!(t.kernel_stat("hit"), hits + 1, "not a kernel hit");
    // Edited: a new name is served after the next reload (5 s).
    std::fs::write(
        &hosts,
        "10.1.2.3 db.example.internal\n10.7.7.7 new.example.internal\n",
    )
    .unwrap();
    let seen = wait_for(Duration::from_secs(8), || {
        let (st, ans) = t.dig(VNET, "new.example.internal", "A")?;
        (st == "NOERROR" && ans.iter().any(|a| a.ends_with("10.7.7.7"))).then_some(())
    });
    assert!(
        seen.is_some(),
        "hosts file not reloaded:\n{}",
        t.daemon_log()
    );
}
