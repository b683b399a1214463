//! Real clients (dig, kdig, glibc) over IPv4 and IPv6, UDP and TCP, against
//! a DNSSEC-signed NSD upstream: every answer is compared with what the
//! upstream answers the same client directly, and the kernel's counters
//! show which repeats the kernel answered.

use localdns_tests::client::{Opts, Reply, Tool, ask};
use localdns_tests::topo::{DUAL_STACK, KUBE, KUBE6, Topo, UPSTREAM_IP, UPSTREAM_IP6, VNET, VNET6};

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

/// Opens TCP connections to a listener from given source addresses and
/// reports, as JSON, what each got. Queries are built by hand here (not by
/// our codec); an answer counts when its ID matches and QR is set.
const TCP_CLIENT: &str = r#"
import json, socket, struct, sys, time
server, plan = sys.argv[1], json.loads(sys.argv[2])
def query(qid, name):
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0" + struct.pack(">HH", 1, 1)
def read_msg(s):
    def exact(n):
        b = b""
        while len(b) < n:
            c = s.recv(n - len(b))
            if not c:
                return None
            b += c
        return b
    h = exact(2)
    return exact(struct.unpack(">H", h)[0]) if h else None
def answered(s, ids):
    got = set()
    try:
        for _ in ids:
            m = read_msg(s)
            if m is None or not (m[2] & 0x80):
                break
            got.add(struct.unpack(">H", m[:2])[0])
    except OSError:
        pass
    return sorted(got)
def connect(src):
    s = socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET)
    s.settimeout(3)
    s.bind((src, 0))
    s.connect((server, 53))
    return s
out, keep = {}, []
for step in plan:
    if step["op"] == "pipeline":
        s = connect(step["src"])
        ids = list(range(1, step["n"] + 1))
        s.sendall(b"".join(struct.pack(">H", len(q)) + q for q in (query(i, step["name"]) for i in ids)))
        out[step["label"]] = answered(s, ids)
        s.close()
    elif step["op"] == "open":
        ok = 0
        for i in range(step["n"]):
            s = connect(step["src"])
            q = query(1000 + i, step["name"])
            try:
                s.sendall(struct.pack(">H", len(q)) + q)
            except OSError:
                continue
            if answered(s, [0]):
                ok += 1
                keep.append(s)
        out[step["label"]] = ok
    elif step["op"] == "close_all":
        for s in keep:
            s.close()
        keep = []
        time.sleep(0.3)
    elif step["op"] == "idle":
        s = connect(step["src"])
        time.sleep(step["secs"])
        try:
            out[step["label"]] = "closed" if s.recv(1) == b"" else "open"
        except socket.timeout:
            out[step["label"]] = "open"
        except OSError:
            out[step["label"]] = "closed"
print(json.dumps(out))
"#;

/// RFC 7766 TCP service: pipelined queries all answered on one connection,
/// connections bounded per client address and in total, idle ones closed.
#[test]
fn tcp_clients_pipeline_and_are_bounded() {
    let mut t = Topo::new();
    let mut args = vec![
        "--iface",
        "vpod*",
        "--tcp-max-conns",
        "24",
        "--tcp-max-conns-per-client",
        "16",
        "--tcp-idle-timeout",
        "1",
    ];
    args.extend(DUAL_STACK);
    t.start_daemon(&args);
    // A second source address in the pod: another client for the bounds.
    t.pod
        .ip(&["addr", "add", "fd00:100::3/64", "dev", "eth0", "nodad"]);
    let name = "kubernetes.default.svc.cluster.local";
    let step = |op: &str, label: &str, src: &str, n: u32| serde_json::json!({"op": op, "label": label, "src": src, "n": n, "name": name, "secs": 1.6});
    let plan = serde_json::json!([
        // Neighbour discovery for the new address first (it costs its
        // first connection ~2 s, longer than the idle timeout).
        step("open", "warm", "fd00:100::3", 1),
        step("close_all", "", "", 0),
        step("pipeline", "pipelined", "fd00:100::2", 40),
        step("open", "first_client", "fd00:100::2", 20),
        step("open", "second_client", "fd00:100::3", 12),
        step("close_all", "", "", 0),
        step("open", "after_close", "fd00:100::3", 1),
        step("close_all", "", "", 0),
        step("idle", "idle", "fd00:100::2", 0),
    ]);
    let o = t
        .pod
        .output("python3", &["-c", TCP_CLIENT, KUBE6, &plan.to_string()]);
    let text = String::from_utf8_lossy(&o.stdout);
    let got: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "{e}: {text}{}\n{}",
            String::from_utf8_lossy(&o.stderr),
            t.daemon_log()
        )
    });
    // 40 queries in one write, more than the 32 in flight at once: all answered.
    let ids: Vec<u64> = (1..=40).collect();
    assert_eq!(got["pipelined"], serde_json::json!(ids), "{got}");
    // 16 per client; the second client stops at the total of 24.
    assert_eq!(got["first_client"], 16, "{got}");
    assert_eq!(got["second_client"], 8, "{got}");
    // Closed connections give their places back.
    assert_eq!(got["after_close"], 1, "{got}");
    // Idle past --tcp-idle-timeout (1 s): the daemon closed it.
    assert_eq!(got["idle"], "closed", "{got}");
}
