//! Real clients (dig, kdig, glibc) over IPv4 and IPv6, UDP and TCP, against
//! a DNSSEC-signed NSD upstream: every answer is compared with what the
//! upstream answers the same client directly, and the kernel's counters
//! show which repeats the kernel answered.

use localdns_tests::client::{Opts, Reply, Tool, ask};
use localdns_tests::topo::{KUBE, KUBE6, Topo, UPSTREAM_IP, UPSTREAM_IP6, VNET, VNET6};

/// Listener options for both families in both views.
const DUAL_STACK: [&str; 8] = [
    "--vnet-listen",
    VNET,
    "--vnet-listen",
    VNET6,
    "--kube-listen",
    KUBE,
    "--kube-listen",
    KUBE6,
];

/// (name, type, kube view?) asked in every combination.
const NAMES: [(&str, &str, bool); 7] = [
    ("www.example.test", "A", false),
    ("www.example.test", "AAAA", false),
    ("alias.example.test", "A", false),
    ("nothere.example.test", "A", false),
    ("mid.example.test", "TXT", false),
    ("big.example.test", "TXT", false),
    ("kubernetes.default.svc.cluster.local", "A", true),
];

fn option_sets() -> Vec<(&'static str, Opts)> {
    let e = Opts::edns;
    vec![
        (
            "no EDNS",
            Opts {
                edns: None,
                ..Opts::default()
            },
        ),
        ("EDNS 1232", e(1232)),
        (
            "+dnssec bufsize 512",
            Opts {
                dnssec: true,
                ..e(512)
            },
        ),
        (
            "+dnssec bufsize 1232",
            Opts {
                dnssec: true,
                ..e(1232)
            },
        ),
        (
            "+dnssec bufsize 4096",
            Opts {
                dnssec: true,
                ..e(4096)
            },
        ),
        (
            "+cd",
            Opts {
                cd: true,
                ..e(1232)
            },
        ),
        (
            "+dnssec +cd",
            Opts {
                dnssec: true,
                cd: true,
                ..e(4096)
            },
        ),
        (
            "+norecurse",
            Opts {
                norec: true,
                ..e(1232)
            },
        ),
    ]
}

/// The flags of a recursive service (issue 8 point 3) on `got`, asked with
/// `o`, whose upstream said `direct`.
fn check_flags(got: &Reply, direct: &Reply, o: &Opts) -> Result<(), String> {
    let want = |f: &str, on: bool| {
        if got.has(f) == on {
            Ok(())
        } else {
            Err(format!(
                "flag {f} should be {}",
                if on { "set" } else { "clear" }
            ))
        }
    };
    want("qr", true)?;
    want("ra", true)?;
    want("aa", false)?;
    want("tc", false)?;
    want("rd", !o.norec)?;
    want("cd", o.cd)?;
    // RFC 6840 §5.8: AD only to a query with DO or AD (dig sets AD), and
    // never when the upstream did not set it.
    if got.has("ad") && !direct.has("ad") {
        return Err("AD set although the upstream did not".into());
    }
    Ok(())
}

struct Seen {
    cases: usize,
    kernel_hits: usize,
    kernel_tc: usize,
}

#[test]
fn real_clients_get_the_upstreams_answers() {
    let mut t = Topo::signed();
    // VnetDNS over IPv6, ClusterCoreDNS over IPv4.
    let mut args = vec![
        "--iface",
        "vpod*",
        "--vnet-dns",
        "[fd00:200::2]:53",
        "--cluster-dns",
        UPSTREAM_IP,
    ];
    args.extend(DUAL_STACK);
    t.start_daemon_raw(&args);

    let mut seen = Seen {
        cases: 0,
        kernel_hits: 0,
        kernel_tc: 0,
    };
    let mut failures = Vec::new();
    for tool in [Tool::Dig, Tool::Kdig] {
        for (vnet, kube, upstream) in [(VNET, KUBE, UPSTREAM_IP), (VNET6, KUBE6, UPSTREAM_IP6)] {
            for tcp in [false, true] {
                for (label, o) in option_sets() {
                    let o = Opts { tcp, ..o };
                    for (name, qtype, kube_view) in NAMES {
                        let server = if kube_view { kube } else { vnet };
                        let what = format!(
                            "{tool:?} @{server} {name} {qtype} {label}{}",
                            if tcp { " tcp" } else { "" }
                        );
                        if let Err(e) =
                            one_case(&t, tool, server, upstream, name, qtype, o, &mut seen)
                        {
                            failures.push(format!("{what}: {e}"));
                        }
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}\n{}",
        failures.len(),
        seen.cases,
        failures.join("\n"),
        t.daemon_log()
    );
    eprintln!(
        "{} cases; kernel answered {} UDP repeats, {} of them TC=1",
        seen.cases,
        seen.kernel_hits + seen.kernel_tc,
        seen.kernel_tc
    );
    // Every UDP repeat was the kernel's: half the cases are UDP.
    assert_eq!(seen.kernel_hits + seen.kernel_tc, seen.cases / 2);
    assert!(seen.kernel_tc > 0, "no oversize answer was tried");
}

#[expect(clippy::too_many_arguments, reason = "one row of the test matrix")]
fn one_case(
    t: &Topo,
    tool: Tool,
    server: &str,
    upstream: &str,
    name: &str,
    qtype: &str,
    o: Opts,
    seen: &mut Seen,
) -> Result<(), String> {
    seen.cases += 1;
    let direct = ask(&t.upstream, tool, upstream, name, qtype, o)
        .ok_or("no direct answer from the upstream")?;
    // Every name asked has records (answers, or the SOA of a negative
    // answer): an empty parse would make the comparison vacuous.
    if direct.answer.is_empty() && direct.authority.is_empty() {
        return Err(format!("no records read from:\n{}", direct.text));
    }
    if o.dnssec
        && name.ends_with("example.test")
        && !direct
            .records()
            .iter()
            .any(|s| s.iter().any(|r| r.contains("RRSIG")))
    {
        return Err(format!("DO=1 answer without RRSIG:\n{}", direct.text));
    }
    let compare = |got: &Reply| -> Result<(), String> {
        if got.rcode != direct.rcode {
            return Err(format!("rcode {} != upstream {}", got.rcode, direct.rcode));
        }
        if got.records() != direct.records() {
            return Err(format!(
                "records differ:\n--- ours\n{}\n--- upstream\n{}",
                got.text, direct.text
            ));
        }
        check_flags(got, &direct, &o).map_err(|e| format!("{e}:\n{}", got.text))
    };
    // First ask: a miss or a hit, depending on earlier cases.
    let first = ask(&t.pod, tool, server, name, qtype, o).ok_or("no answer")?;
    compare(&first)?;
    // Repeat: cached now; over UDP the kernel must answer it.
    let (h0, tc0) = (t.kernel_stat("hit"), t.kernel_stat("truncated"));
    let again = ask(&t.pod, tool, server, name, qtype, o).ok_or("no answer to the repeat")?;
    compare(&again)?;
    let (dh, dtc) = (t.kernel_stat("hit") - h0, t.kernel_stat("truncated") - tc0);
    if o.tcp {
        if dh + dtc != 0 {
            return Err(format!(
                "TCP query counted by the kernel: hit {dh} tc {dtc}"
            ));
        }
        return Ok(());
    }
    let fits = again.size <= o.udp_limit();
    match (fits, dh, dtc) {
        (true, 1, 0) => seen.kernel_hits += 1,
        (false, 0, 1) => seen.kernel_tc += 1,
        _ => {
            return Err(format!(
                "{} bytes for a {}-byte client: kernel hit +{dh}, truncated +{dtc}",
                again.size,
                o.udp_limit()
            ));
        }
    }
    Ok(())
}

/// glibc's resolver in a dual-stack pod whose resolv.conf is what kubelet
/// writes (search list, ndots:5), listing the IPv6 listener first.
#[test]
fn glibc_getent_from_a_dual_stack_pod() {
    let mut t = Topo::new();
    let mut args = vec!["--iface", "vpod*"];
    args.extend(DUAL_STACK);
    t.start_daemon(&args);
    t.pod.set_etc(
        "resolv.conf",
        &format!(
            "nameserver {KUBE6}\nnameserver {KUBE}\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 timeout:2 attempts:2\n"
        ),
    );
    let getent = |name: &str| {
        let o = t.pod.output("getent", &["ahosts", name]);
        let mut addrs: Vec<String> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.contains("STREAM"))
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect();
        addrs.sort();
        addrs
    };
    for round in 0..2 {
        let h0 = t.kernel_stat("hit");
        assert_eq!(
            getent("www.example.test"),
            ["192.0.2.10", "2001:db8::10"],
            "round {round}\n{}",
            t.daemon_log()
        );
        // Through the search list: kubernetes.default.default.svc... is
        // NXDOMAIN, then kubernetes.default.svc.cluster.local answers.
        assert_eq!(getent("kubernetes.default"), ["10.0.0.1"], "round {round}");
        let hits = t.kernel_stat("hit") - h0;
        if round == 1 {
            // Everything was cached by round 0: A and AAAA of each name
            // tried (www: 4 search names + itself; kubernetes: 2 names).
            assert!(hits >= 8, "only {hits} kernel answers in round 1");
        }
    }
    // Only the IPv6 listener, then only the IPv4 one: both answer alone.
    for ns in [KUBE6, KUBE] {
        t.pod.set_etc(
            "resolv.conf",
            &format!("nameserver {ns}\noptions timeout:2 attempts:1\n"),
        );
        assert_eq!(
            getent("www.example.test"),
            ["192.0.2.10", "2001:db8::10"],
            "via {ns}"
        );
    }
}

/// Large (DO=1, ~1150-byte) answers and IPv6 answered by the kernel in every
/// attach mode, on the pod's veth and on lo.
fn large_answers_in_mode(mode: &str) {
    let mut t = Topo::signed();
    let mut args = vec!["--iface", "vpod0", "--attach-mode", mode];
    args.extend(DUAL_STACK);
    t.start_daemon(&args);
    let o = Opts {
        dnssec: true,
        ..Opts::edns(1232)
    };
    for server in [VNET, VNET6] {
        for (label, ns) in [("veth", &t.pod), ("lo", &t.node)] {
            let first = ask(ns, Tool::Dig, server, "big.example.test", "TXT", o).expect("answer");
            assert_eq!(first.rcode, "NOERROR");
            assert!(first.size > 1100, "{}", first.text);
            let h0 = t.kernel_stat("hit");
            let again = ask(ns, Tool::Dig, server, "big.example.test", "TXT", o).expect("answer");
            assert_eq!(again.records(), first.records());
            assert_eq!(
                t.kernel_stat("hit"),
                h0 + 1,
                "mode {mode}, {label}, @{server}: {} bytes not from the kernel (pass_room {})\n{}",
                again.size,
                t.kernel_stat("pass_room"),
                t.daemon_log()
            );
        }
    }
}

#[test]
fn large_answers_in_the_kernel_auto() {
    large_answers_in_mode("auto");
}

#[test]
fn large_answers_in_the_kernel_xdp_generic() {
    large_answers_in_mode("xdp-generic");
}

#[test]
fn large_answers_in_the_kernel_tc() {
    large_answers_in_mode("tc");
}
