//! Whole-path tests in network namespaces: a pod queries the listener
//! addresses with dig, NSD answers upstream, localdns-user runs in the node
//! netns with the fast path attached to the pod's veth and to lo.

use std::time::Duration;

use localdns_tests::netns::wait_for;
use localdns_tests::topo::{KUBE, SAMPLE_CONFIG, Topo, VNET, sample_with};

/// Answer records without their TTL field (TTLs count down between queries).
fn answers(t: &Topo, server: &str, name: &str, qtype: &str) -> Vec<String> {
    let (status, a) = t
        .dig(server, name, qtype)
        .unwrap_or_else(|| panic!("no answer for {name}\n{}", t.daemon_log()));
    assert_eq!(status, "NOERROR", "{name}: {a:?}");
    strip_ttl(a)
}

fn strip_ttl(a: Vec<String>) -> Vec<String> {
    a.into_iter()
        .map(|l| {
            let mut f: Vec<&str> = l.split(' ').collect();
            if f.len() > 2 {
                f.remove(1);
            }
            f.join(" ")
        })
        .collect()
}

fn ttl_of(t: &Topo, server: &str, name: &str) -> u32 {
    let (_, a) = t.dig(server, name, "A").unwrap();
    a[0].split(' ').nth(1).unwrap().parse().unwrap()
}

fn conntrack_count(t: &Topo) -> u64 {
    t.node
        .sh_ok("cat", &["/proc/sys/net/netfilter/nf_conntrack_count"])
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn fast_path_end_to_end() {
    let mut t = Topo::new();
    // A conntrack-using rule in the node netns, so every tracked flow counts.
    t.node.sh_ok("nft", &["add table ip ldt; add chain ip ldt pre { type filter hook prerouting priority 0; }; add rule ip ldt pre ct state new counter"]);
    t.start_daemon(&["--iface", "vpod*"]);

    // First queries: daemon path (miss), answered from the real upstream.
    let k = answers(&t, KUBE, "kubernetes.default.svc.cluster.local", "A");
    assert_eq!(k, ["kubernetes.default.svc.cluster.local. IN A 10.0.0.1"]);
    let v = answers(&t, VNET, "www.example.test", "A");
    assert_eq!(v, ["www.example.test. IN A 192.0.2.10"]);
    let cname = answers(&t, VNET, "alias.example.test", "A");
    assert_eq!(
        cname,
        [
            "alias.example.test. IN CNAME www.example.test.",
            "www.example.test. IN A 192.0.2.10"
        ]
    );
    let (nx, _) = t.dig(VNET, "nothere.example.test", "A").unwrap();
    assert_eq!(nx, "NXDOMAIN");
    assert_eq!(t.kernel_stat("hit"), 0);

    // Second identical queries: answered by the kernel, same answers.
    assert_eq!(
        answers(&t, KUBE, "kubernetes.default.svc.cluster.local", "A"),
        k
    );
    assert_eq!(answers(&t, VNET, "www.example.test", "A"), v);
    assert_eq!(answers(&t, VNET, "alias.example.test", "A"), cname);
    assert_eq!(
        t.dig(VNET, "nothere.example.test", "A").unwrap().0,
        "NXDOMAIN"
    );
    assert_eq!(t.kernel_stat("hit"), 4);
    // The views never share entries: the kube view has not seen www yet.
    let before = t.kernel_stat("hit");
    answers(&t, KUBE, "www.example.test", "A");
    assert_eq!(
        t.kernel_stat("hit"),
        before,
        "kube view answered from the vnet view's entry"
    );
    // Mixed case is answered from the same entry, in the asker's case.
    let mixed = answers(&t, VNET, "WwW.ExAmPlE.TeSt", "A");
    assert_eq!(mixed, ["WwW.ExAmPlE.TeSt. IN A 192.0.2.10"]);
    assert_eq!(t.kernel_stat("hit"), before + 1);

    // Kernel-answered queries create no conntrack entry; a daemon-answered
    // one does (each dig uses a new source port).
    let ct0 = conntrack_count(&t);
    for _ in 0..20 {
        answers(&t, VNET, "www.example.test", "A");
    }
    assert_eq!(
        conntrack_count(&t),
        ct0,
        "kernel answers must not be tracked"
    );
    answers(&t, VNET, "ns.example.test", "A");
    assert!(
        conntrack_count(&t) > ct0,
        "the daemon path is tracked, so the counter is live"
    );

    // With the daemon stopped, cached names are still answered by the
    // kernel, new names are not answered at all.
    let d = t.daemon.as_ref().unwrap();
    d.signal(libc::SIGSTOP);
    let hit0 = t.kernel_stat("hit");
    assert_eq!(
        answers(&t, KUBE, "kubernetes.default.svc.cluster.local", "A"),
        k
    );
    assert_eq!(answers(&t, VNET, "www.example.test", "A"), v);
    assert_eq!(t.kernel_stat("hit"), hit0 + 2);
    assert!(
        t.dig(KUBE, "kube-dns.kube-system.svc.cluster.local", "A")
            .is_none(),
        "a new name was answered while the daemon was stopped"
    );
    t.daemon.as_ref().unwrap().signal(libc::SIGCONT);
    assert_eq!(
        answers(&t, KUBE, "kube-dns.kube-system.svc.cluster.local", "A"),
        ["kube-dns.kube-system.svc.cluster.local. IN A 10.0.0.10"]
    );

    // Host-originated queries (node netns, via lo) take the same fast path.
    let hit1 = t.kernel_stat("hit");
    let (st, a) = t.dig_in(&t.node, VNET, "www.example.test", "A").unwrap();
    assert_eq!((st.as_str(), strip_ttl(a)), ("NOERROR", v.clone()));
    assert_eq!(
        t.kernel_stat("hit"),
        hit1 + 1,
        "lo query not answered by the kernel"
    );
    // The TTL counts down (the stopped-daemon probe alone waited 2 s).
    assert!(ttl_of(&t, VNET, "www.example.test") < 300);
}

#[test]
fn cluster_dns_goes_over_tcp() {
    let mut t = Topo::new();
    // The upstream drops UDP/53 and counts TCP/53: only TCP can work.
    t.upstream.sh_ok("nft", &["add table inet ldt; add chain inet ldt in { type filter hook input priority 0; }; add rule inet ldt in udp dport 53 drop; add rule inet ldt in tcp dport 53 counter"]);
    t.start_daemon(&[]);
    for name in [
        "kubernetes.default.svc.cluster.local",
        "kube-dns.kube-system.svc.cluster.local",
    ] {
        let a = answers(&t, KUBE, name, "A");
        assert_eq!(a.len(), 1, "{a:?}");
    }
    let rules = t.upstream.sh_ok("nft", &["list table inet ldt"]);
    let packets: u64 = rules
        .split("packets ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(packets > 0, "no TCP seen upstream:\n{rules}");
    // And a PreferUDP zone (vnet "."): UDP is dropped, so no answer within the
    // forwarder's deadline: SERVFAIL, quickly, not a hang.
    let t0 = std::time::Instant::now();
    let r = t.dig(VNET, "www.example.test", "A");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(r.map(|r| r.0), Some("SERVFAIL".to_string()));
}

fn attach_mode_works(mode: &str) {
    let mut t = Topo::new();
    t.start_daemon(&["--iface", "vpod0", "--attach-mode", mode]);
    let log = t.daemon_log();
    assert!(log.contains("fast path attached"), "{log}");
    let v = answers(&t, VNET, "www.example.test", "AAAA");
    assert_eq!(v, ["www.example.test. IN AAAA 2001:db8::10"]);
    let h0 = t.kernel_stat("hit");
    assert_eq!(answers(&t, VNET, "www.example.test", "AAAA"), v);
    assert_eq!(
        t.kernel_stat("hit"),
        h0 + 1,
        "mode {mode}: reply not from the kernel"
    );
    let (st, a) = t.dig_in(&t.node, VNET, "www.example.test", "AAAA").unwrap();
    assert_eq!((st.as_str(), strip_ttl(a)), ("NOERROR", v));
    assert_eq!(
        t.kernel_stat("hit"),
        h0 + 2,
        "mode {mode}: lo reply not from the kernel"
    );
}

#[test]
fn attach_mode_auto() {
    attach_mode_works("auto");
}

#[test]
fn attach_mode_xdp_generic() {
    attach_mode_works("xdp-generic");
}

#[test]
fn attach_mode_tc() {
    attach_mode_works("tc");
}

/// SIGTERM stops the daemon but leaves the kernel fast path (programs,
/// links, maps, addresses) for the next instance: cached names are still
/// answered, new ones are not. `teardown` removes it all.
#[test]
fn stop_keeps_the_fast_path_and_teardown_removes_it() {
    let mut t = Topo::new();
    t.start_daemon(&["--iface", "vpod0"]);
    answers(&t, VNET, "www.example.test", "A");
    let mut d = t.daemon.take().unwrap();
    assert!(
        d.terminate(Duration::from_secs(5)),
        "daemon did not exit on SIGTERM"
    );
    assert!(t.daemon_log().contains("the kernel fast path stays"));
    let link = t.node.sh_ok("ip", &["link", "show", "vpod0"]);
    assert!(link.contains("xdp"), "XDP gone after SIGTERM: {link}");
    let addrs = t.node.sh_ok("ip", &["-o", "addr", "show"]);
    assert!(
        addrs.contains("169.254.10.10/32") && addrs.contains("169.254.10.11/32"),
        "{addrs}"
    );
    let h0 = t.kernel_stat("hit");
    assert_eq!(
        answers(&t, VNET, "www.example.test", "A"),
        ["www.example.test. IN A 192.0.2.10"]
    );
    assert_eq!(t.kernel_stat("hit"), h0 + 1);
    assert!(
        t.dig(VNET, "ns.example.test", "A").is_none(),
        "no daemon, no new names"
    );
    let out = t.node.output(
        localdns_tests::topo::daemon_bin().to_str().unwrap(),
        &["teardown", "--pin-path", &t.pin_path()],
    );
    assert!(out.status.success(), "{out:?}");
    let link = t.node.sh_ok("ip", &["link", "show", "vpod0"]);
    assert!(!link.contains("xdp"), "XDP still attached: {link}");
    let addrs = t.node.sh_ok("ip", &["-o", "addr", "show"]);
    assert!(
        !addrs.contains("169.254.10.1"),
        "listener addresses left: {addrs}"
    );
    let r = wait_for(Duration::from_millis(100), || {
        t.dig(VNET, "www.example.test", "A")
    });
    assert!(r.is_none(), "still answered after teardown");
}

#[test]
fn malformed_queries_do_not_hurt() {
    let mut t = Topo::new();
    t.start_daemon(&["--iface", "vpod0"]);
    answers(&t, VNET, "www.example.test", "A");
    // Garbage and truncated datagrams straight at the listener.
    let py = "import socket,os\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(1)\nfor p in [b'', b'\\x00', os.urandom(11), os.urandom(40), b'\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x03www']:\n  s.sendto(p,('169.254.10.10',53))\nfor i in range(200):\n  s.sendto(os.urandom(12+i%300),('169.254.10.10',53))\n";
    t.pod.sh_ok("python3", &["-c", py]);
    // Still serving, from the kernel and from the daemon.
    answers(&t, VNET, "www.example.test", "A");
    answers(&t, KUBE, "kubernetes.default.svc.cluster.local", "A");
    assert!(t.daemon_alive(), "daemon died");
}

#[test]
fn sighup_reloads_valid_files_and_keeps_running_on_invalid_ones() {
    let mut t = Topo::new();
    let cfg = t.dir.path.join("localdnsconfig.json");
    let sample = SAMPLE_CONFIG;
    std::fs::write(&cfg, sample).unwrap();
    t.start_daemon(&["--iface", "vpod0", "--config", cfg.to_str().unwrap()]);
    let v = answers(&t, VNET, "www.example.test", "A");
    answers(&t, KUBE, "kubernetes.default.svc.cluster.local", "A");
    let reloads = |t: &Topo, what: &str| t.daemon_log().matches(what).count();

    // Valid change to the kube view's cluster.local only: the vnet "."
    // entry stays cached, in the kernel too.
    let changed = sample_with(
        "\"cluster.local\"",
        1,
        "\"cacheDurationInSeconds\": 3600",
        "\"cacheDurationInSeconds\": 5",
    );
    std::fs::write(&cfg, changed).unwrap();
    t.daemon.as_ref().unwrap().signal(libc::SIGHUP);
    assert!(
        wait_for(Duration::from_secs(5), || (reloads(
            &t,
            "configuration reloaded"
        ) == 1)
            .then_some(()))
        .is_some(),
        "{}",
        t.daemon_log()
    );
    assert!(
        t.daemon_log().contains("dropped_cache_entries=1"),
        "{}",
        t.daemon_log()
    );
    let h0 = t.kernel_stat("hit");
    assert_eq!(answers(&t, VNET, "www.example.test", "A"), v);
    assert_eq!(
        t.kernel_stat("hit"),
        h0 + 1,
        "unchanged zone lost its cache"
    );
    // The changed zone now caps TTLs at 5 s.
    answers(&t, KUBE, "kubernetes.default.svc.cluster.local", "A");
    let (_, a) = t
        .dig(KUBE, "kubernetes.default.svc.cluster.local", "A")
        .unwrap();
    let ttl: u32 = a[0].split(' ').nth(1).unwrap().parse().unwrap();
    assert!(ttl <= 5, "{a:?}");

    // Invalid file: logged, old config kept, still answering.
    std::fs::write(&cfg, "{ not json").unwrap();
    t.daemon.as_ref().unwrap().signal(libc::SIGHUP);
    assert!(
        wait_for(Duration::from_secs(5), || (reloads(&t, "reload failed")
            == 1)
            .then_some(()))
        .is_some(),
        "{}",
        t.daemon_log()
    );
    assert_eq!(answers(&t, VNET, "www.example.test", "A"), v);
    answers(&t, VNET, "alias.example.test", "A");
    assert!(t.daemon_alive(), "daemon died on SIGHUP");
}

#[test]
fn query_log_covers_kernel_answered_queries() {
    let mut t = Topo::new();
    let cfg = t.dir.path.join("localdnsconfig.json");
    // Log every query of the kube view's cluster.local.
    let text = sample_with(
        "\"cluster.local\"",
        1,
        "\"queryLogging\": \"Error\"",
        "\"queryLogging\": \"Log\"",
    );
    std::fs::write(&cfg, text).unwrap();
    t.start_daemon(&["--iface", "vpod0", "--config", cfg.to_str().unwrap()]);
    let name = "kubernetes.default.svc.cluster.local";
    answers(&t, KUBE, name, "A");
    let h0 = t.kernel_stat("hit");
    answers(&t, KUBE, name, "A");
    assert_eq!(
        t.kernel_stat("hit"),
        h0 + 1,
        "second query not kernel-answered"
    );
    // Other zones stay quiet.
    answers(&t, VNET, "www.example.test", "A");
    let lines = || -> Vec<String> {
        t.daemon_log()
            .lines()
            .filter(|l| l.contains("[INFO] 169.254.100.2:"))
            .inspect(|l| {
                // A line of its own, as CoreDNS writes it: no tracing prefix.
                assert!(l.starts_with("[INFO] 169.254.100.2:"), "{l}");
            })
            .map(String::from)
            .collect()
    };
    let got = wait_for(Duration::from_secs(3), || (lines().len() >= 2).then(lines))
        .unwrap_or_else(|| panic!("{}", t.daemon_log()));
    assert_eq!(got.len(), 2, "{got:?}");
    for l in &got {
        // CoreDNS log default: {remote}:{port} - {id} "{type} {class} {name} {proto} {size} {do} {bufsize}" {rcode} {rflags} {rsize} {duration}
        let tail = l.split("[INFO] ").nth(1).unwrap();
        let parts: Vec<&str> = tail.split('"').collect();
        assert_eq!(parts.len(), 3, "{l}");
        let q: Vec<&str> = parts[1].split(' ').collect();
        assert_eq!(
            &q[..4],
            ["A", "IN", "kubernetes.default.svc.cluster.local.", "udp"],
            "{l}"
        );
        assert_eq!(q[6], "1232", "{l}");
        let r: Vec<&str> = parts[2].trim().split(' ').collect();
        assert_eq!(&r[..2], ["NOERROR", "qr,rd,ra"], "{l}");
        assert!(r[3].ends_with('s'), "{l}");
    }
    // Same reply size either way: the kernel answers what the daemon would.
    let rsize = |l: &String| {
        l.split('"')
            .nth(2)
            .unwrap()
            .trim()
            .split(' ')
            .nth(2)
            .unwrap()
            .to_string()
    };
    assert_eq!(rsize(&got[0]), rsize(&got[1]));
}
