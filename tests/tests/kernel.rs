//! Table-driven BPF_PROG_TEST_RUN tests of the fast path program: input
//! frame + seeded cache entries -> expected action, counter and exact output
//! bytes. The expected reply is built independently: the daemon's renderer
//! for the DNS payload (so kernel and daemon must agree byte for byte) and
//! textbook checksums for IPv4 and UDP.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::Ebpf;
use aya::maps::{MapData, PerCpuArray};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use localdns_common::{
    MAP_STATS, STAT_EXPIRED, STAT_HIT, STAT_MISS, STAT_NAMES, STAT_NOT_DNS, STAT_PASS_COLLISION,
    STAT_PASS_EDNS, STAT_PASS_HEADER, STAT_PASS_IP, STAT_PASS_QNAME,
};
use localdns_tests::msg::replies;
use localdns_tests::*;
use localdns_user::cache::{Entry, Key, mono_ns};
use localdns_user::fastpath::classes::CacheMaps;
use localdns_user::fastpath::{self, Globals, encode};
use localdns_user::wire::parse_query;

const VNET: Ipv4Addr = Ipv4Addr::new(169, 254, 10, 10);
const KUBE: Ipv4Addr = Ipv4Addr::new(169, 254, 10, 11);
const CLIENT: Ipv4Addr = Ipv4Addr::new(169, 254, 100, 2);
const VNET6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0x10, 0x10);
const KUBE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0x10, 0x11);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0x100, 2);
const SEED: u64 = 0x5eed_1234_abcd_0042;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const NS: u64 = 1_000_000_000;
/// The stat slot seeded entries carry: their answers count there.
const TEST_SLOT: u16 = 37;

struct Rig {
    ebpf: Ebpf,
    cache: CacheMaps,
    stats: PerCpuArray<MapData, u64>,
}

impl Rig {
    fn new() -> Rig {
        Rig::with_fault(localdns_common::FAULT_NONE)
    }

    /// The program as loaded for tests with one fault injected after its
    /// first write (see `localdns_common::GLOBAL_FAULT`).
    fn with_fault(fault: u32) -> Rig {
        Rig::with(fault, 1024)
    }

    /// [`Rig::with_fault`] with a cache map of `entries`.
    fn with(fault: u32, entries: u32) -> Rig {
        assert!(
            is_root(),
            "BPF_PROG_TEST_RUN tests need root (CI runs as root)"
        );
        let g = globals(fault);
        let mut ebpf = fastpath::open(&g, entries, None).expect("open object");
        fastpath::load_xdp(&mut ebpf).expect("XDP program verifies");
        fastpath::load_tc(&mut ebpf).expect("TC program verifies");
        fastpath::load_classifier(&mut ebpf, fastpath::TC_ROOM_PROG)
            .expect("TC companion verifies");
        let cache = CacheMaps::take(&mut ebpf, false).unwrap();
        let stats = PerCpuArray::try_from(ebpf.take_map(MAP_STATS).unwrap()).unwrap();
        Rig { ebpf, cache, stats }
    }

    /// One counter by reason; `hit` derived from the per-slot counts as
    /// the daemon derives it.
    fn stat(&self, idx: u32) -> u64 {
        if idx == STAT_HIT {
            return self.stats_all()[idx as usize];
        }
        self.stats.get(&idx, 0).unwrap().iter().sum()
    }

    /// Every counter by reason, as `cache stats` reads them.
    fn stats_all(&self) -> Vec<u64> {
        fastpath::read_stats(&self.stats)
            .into_iter()
            .map(|(_, v)| v)
            .collect()
    }

    fn run(&self, prog: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; 4096];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let r = match prog {
            "xdp" => {
                let p: &Xdp = self
                    .ebpf
                    .program(fastpath::XDP_PROG)
                    .unwrap()
                    .try_into()
                    .unwrap();
                p.test_run(opts).unwrap()
            }
            _ => {
                let p: &SchedClassifier = self
                    .ebpf
                    .program(fastpath::TC_PROG)
                    .unwrap()
                    .try_into()
                    .unwrap();
                p.test_run(opts).unwrap()
            }
        };
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    /// Caches the reply `resp` to DNS query `query` sent to `dst`, inserted
    /// `age_ns` ago; returns the entry.
    fn seed(&mut self, dst: IpAddr, query: &[u8], resp: &[u8], age_ns: u64) -> Entry {
        let q = parse_query(query).unwrap();
        // A freshly booted VM's monotonic clock may be younger than the age.
        let up = mono_ns();
        if up < age_ns + NS {
            std::thread::sleep(std::time::Duration::from_nanos(age_ns + NS - up));
        }
        let e = Entry::from_upstream(&q, resp, 3600, 3600, mono_ns() - age_ns).unwrap();
        let key = Key::of(view_of(dst), &q);
        let mut v = encode::value(&key, &e).unwrap();
        v.head.stat = TEST_SLOT;
        self.cache.insert(&encode::key(&key, SEED), &v).unwrap();
        e
    }

    fn clear(&mut self) {
        self.cache.clear();
    }
}

/// How a query frame of [`FrameSpec::build`] was built (no options).
fn spec_of(f: &[u8]) -> FrameSpec {
    let port = |at: usize| u16::from_be_bytes([f[at], f[at + 1]]);
    let mut s = if f[12..14] == [0x86, 0xdd] {
        let a = |at: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&f[at..at + 16]).unwrap());
        FrameSpec::udp(a(22), a(38), port(54), port(56))
    } else {
        let a = |at: usize| Ipv4Addr::from(<[u8; 4]>::try_from(&f[at..at + 4]).unwrap());
        FrameSpec::udp(a(26), a(30), port(34), port(36))
    };
    s.dst_mac.copy_from_slice(&f[0..6]);
    s.src_mac.copy_from_slice(&f[6..12]);
    s
}

/// The program's load-time constants in these tests: both families.
fn globals(fault: u32) -> Globals {
    use localdns_common::{VIEW_KUBE, VIEW_VNET};
    Globals {
        listen: vec![
            (VNET.into(), VIEW_VNET),
            (KUBE.into(), VIEW_KUBE),
            (VNET6.into(), VIEW_VNET),
            (KUBE6.into(), VIEW_KUBE),
        ],
        seed: SEED,
        fault,
    }
}

fn view_of(dst: IpAddr) -> u8 {
    if dst == IpAddr::from(KUBE) || dst == IpAddr::from(KUBE6) {
        localdns_common::VIEW_KUBE
    } else {
        localdns_common::VIEW_VNET
    }
}

/// The reply frame the kernel must produce for the query `spec` carried
/// `dns` in, from `entry` at `now`: the daemon's reply (TC=1 when it does
/// not fit the client, as the daemon sends it) in a frame built the
/// textbook way with addresses, ports and MACs swapped.
fn expected_reply(frame: &[u8], dns: &[u8], entry: &Entry, now: u64) -> Vec<u8> {
    let spec = spec_of(frame);
    let q = parse_query(dns).unwrap();
    let payload = entry
        .render(dns, &q, now, q.max_udp())
        .or_else(|| localdns_user::wire::error_reply(dns, Some(&q), entry.rcode, true))
        .unwrap();
    spec.reversed().build(&payload)
}

fn cookie() -> Vec<u8> {
    // COOKIE option with an 8-byte client cookie, as dig sends by default.
    let mut o = vec![0, 10, 0, 8];
    o.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    o
}

/// An A record owned by the question name of `q`.
fn a_rr(q: &[u8], ttl: u32, ip: [u8; 4]) -> hickory_proto::rr::Record {
    msg::a(&msg::qname_of(q), ttl, ip)
}

enum Expect {
    /// Answered: the expected reply is rendered from the seeded entry.
    Hit,
    /// Answered TC=1 (the answer is larger than the client takes).
    Truncated,
    /// Passed with this counter bumped and the packet untouched.
    Pass(u32),
}

/// (destination, query message, upstream reply builder, age of the entry).
type Seed = (IpAddr, Vec<u8>, fn(&[u8]) -> Vec<u8>, u64);

struct Case {
    name: &'static str,
    /// (destination, query message) seeded with (response builder, age).
    seed: Option<Seed>,
    /// The frame sent, and the DNS message inside it (for Hit).
    frame: Vec<u8>,
    dns: Vec<u8>,
    expect: Expect,
}

fn resp_short(q: &[u8]) -> Vec<u8> {
    dns_response(q, 0, &[a_rr(q, 2, [192, 0, 2, 10])], &[])
}
/// `replies::a2` from a validating upstream: AD set.
fn resp_a_ad(q: &[u8]) -> Vec<u8> {
    let mut r = replies::a2(q);
    r[3] |= 0x20;
    r
}

fn udp_to(dst: impl Into<IpAddr>, dport: u16) -> FrameSpec {
    match dst.into() {
        IpAddr::V4(d) => FrameSpec::udp(CLIENT, d, 40000, dport),
        IpAddr::V6(d) => FrameSpec::udp(CLIENT6, d, 40000, dport),
    }
}

fn cases() -> Vec<Case> {
    let edns = QEdns {
        udp_size: 1232,
        do_bit: false,
        options: cookie(),
    };
    let small_edns = QEdns {
        udp_size: 512,
        do_bit: false,
        options: vec![],
    };
    let q_www = dns_query(0x1111, "www.example.test", 1, 0x0120, Some(&edns));
    let q_www_plain = dns_query(0x2222, "www.example.test", 1, 0x0100, None);
    let q_mixed = dns_query(0x3333, "WwW.ExAmPlE.tEsT", 1, 0x0120, Some(&edns));
    let q_aaaa = dns_query(0x4444, "www.example.test", 28, 0x0100, None);
    let q_cname = dns_query(0x5555, "alias.example.test", 1, 0x0100, Some(&edns));
    let q_nx = dns_query(0x6666, "nothere.example.test", 1, 0x0100, Some(&edns));
    let q_kube = dns_query(
        0x7777,
        "kubernetes.default.svc.cluster.local",
        1,
        0x0100,
        None,
    );
    let q_big = dns_query(0x8888, "big.example.test", 1, 0x0100, Some(&small_edns));
    let q_big_large = dns_query(
        0x8889,
        "big.example.test",
        1,
        0x0100,
        Some(&QEdns {
            udp_size: 4096,
            ..small_edns.clone()
        }),
    );
    let mut q_compressed = dns_query(0x9999, "a.example.test", 1, 0x0100, None);
    q_compressed[12..14].copy_from_slice(&[0xc0, 0x0c]);
    let mut q_qr = q_www_plain.clone();
    q_qr[2] |= 0x80;
    let mut q_an = q_www_plain.clone();
    q_an[7] = 1;
    let mut q_ednsv1 = q_www.clone();
    let vpos = q_ednsv1.len() - cookie().len() - 2 - 3;
    q_ednsv1[vpos] = 1;
    let mut q_trailing = q_www_plain.clone();
    q_trailing.extend_from_slice(&[0, 0, 0]);

    let f = |dst: IpAddr, dns: &[u8]| udp_to(dst, 53).build(dns);
    let seed = |dst: IpAddr, q: &Vec<u8>, r: fn(&[u8]) -> Vec<u8>, age| {
        Some((dst, q.clone(), r as fn(&[u8]) -> Vec<u8>, age))
    };
    let mut truncated = f(VNET.into(), &q_www);
    truncated.truncate(14 + 20 + 8 + 12 + 5);
    let mut opts = udp_to(VNET, 53);
    opts.ip_options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL
    let mut frag = udp_to(VNET, 53);
    frag.frag = 0x2000; // MF
    let mut tcp = udp_to(VNET, 53);
    tcp.proto = 6;
    let mut vlan = udp_to(VNET, 53);
    vlan.ethertype = 0x8100;
    let oversized = dns_query(
        0xaaaa,
        &format!(
            "{}.example.test",
            "x".repeat(60) + "." + &"y".repeat(60) + "." + &"z".repeat(60)
        ),
        1,
        0x0100,
        Some(&QEdns {
            udp_size: 1232,
            do_bit: false,
            options: vec![0; 400],
        }),
    );

    let do_edns = QEdns {
        udp_size: 1232,
        do_bit: true,
        options: vec![],
    };
    let q_cd = dns_query(0x1a1a, "www.example.test", 1, 0x0110, None);
    let q_ad_plain = dns_query(0x1b1b, "www.example.test", 1, 0x0100, None);
    let q_ad_asked = dns_query(0x1c1c, "www.example.test", 1, 0x0120, None);
    let q_ad_do = dns_query(0x1d1d, "www.example.test", 1, 0x0100, Some(&do_edns));
    let q_no_rd = dns_query(0x1e1e, "www.example.test", 1, 0x0000, None);
    let mut pad = vec![0, 12, 0, 200]; // PADDING, 200 bytes
    pad.extend(vec![0u8; 200]);
    let q_padded = dns_query(
        0x6f6f,
        "www.example.test",
        1,
        0x0100,
        Some(&QEdns {
            udp_size: 1232,
            do_bit: false,
            options: pad,
        }),
    );
    let q_txt = dns_query(0x2f2f, "big.example.test", 16, 0x0100, Some(&edns));
    let q_txt_512 = dns_query(0x3f3f, "big.example.test", 16, 0x0100, Some(&small_edns));
    let q_txt_plain = dns_query(0x4f4f, "big.example.test", 16, 0x0100, None);
    let q_kube6 = dns_query(
        0x5f5f,
        "kubernetes.default.svc.cluster.local",
        28,
        0x0100,
        None,
    );
    let mut hop = udp_to(VNET6, 53);
    hop.hop_by_hop = true;
    // 81 bytes on the wire: one past the small class's names.
    let long_name = format!("{}.{}.example.test", "l".repeat(40), "m".repeat(25));
    let q_long = dns_query(0x6a6a, &long_name, 1, 0x0100, Some(&edns));
    let q_long80 = dns_query(0x6b6b, &long_name[1..], 1, 0x0100, Some(&edns));
    vec![
        Case {
            name: "81-byte name: big class",
            seed: seed(VNET.into(), &q_long, replies::a2, NS / 2),
            frame: f(VNET.into(), &q_long),
            dns: q_long.clone(),
            expect: Expect::Hit,
        },
        Case {
            name: "80-byte name: small class",
            seed: seed(VNET.into(), &q_long80, replies::a2, NS / 2),
            frame: f(VNET.into(), &q_long80),
            dns: q_long80.clone(),
            expect: Expect::Hit,
        },
        Case {
            name: "IPv6 hit, EDNS with cookie",
            seed: seed(VNET6.into(), &q_www, replies::a2, NS / 2),
            frame: f(VNET6.into(), &q_www),
            dns: q_www.clone(),
            expect: Expect::Hit,
        },
        Case {
            name: "IPv6 kube view hit, AAAA",
            seed: seed(KUBE6.into(), &q_kube6, replies::aaaa1, NS / 2),
            frame: f(KUBE6.into(), &q_kube6),
            dns: q_kube6.clone(),
            expect: Expect::Hit,
        },
        Case {
            name: "IPv6 entry is not the IPv4 view's",
            seed: seed(VNET6.into(), &q_www, replies::a2, 0),
            frame: f(KUBE6.into(), &q_www),
            dns: q_www.clone(),
            expect: Expect::Pass(STAT_MISS),
        },
        Case {
            name: "IPv6 with a hop-by-hop header",
            seed: seed(VNET6.into(), &q_www, replies::a2, 0),
            frame: hop.build(&q_www),
            dns: vec![],
            expect: Expect::Pass(STAT_PASS_IP),
        },
        Case {
            name: "IPv6 to another address",
            seed: seed(VNET6.into(), &q_www, replies::a2, 0),
            frame: f(CLIENT6.into(), &q_www),
            dns: vec![],
            expect: Expect::Pass(STAT_NOT_DNS),
        },
        Case {
            name: "reply of about 1200 bytes",
            seed: seed(VNET.into(), &q_txt, replies::txt_1200, NS / 2),
            frame: f(VNET.into(), &q_txt),
            dns: q_txt.clone(),
            expect: Expect::Hit,
        },
        Case {
            name: "reply of about 1200 bytes over IPv6",
            seed: seed(VNET6.into(), &q_txt, replies::txt_1200, NS / 2),
            frame: f(VNET6.into(), &q_txt),
            dns: q_txt.clone(),
            expect: Expect::Hit,
        },
        Case {
            name: "1200 bytes for a client taking 512: TC=1 with OPT",
            seed: seed(VNET.into(), &q_txt_512, replies::txt_1200, NS / 2),
            frame: f(VNET.into(), &q_txt_512),
            dns: q_txt_512.clone(),
            expect: Expect::Truncated,
        },
        Case {
            name: "1200 bytes for a client without EDNS: TC=1",
            seed: seed(VNET.into(), &q_txt_plain, replies::txt_1200, NS / 2),
            frame: f(VNET.into(), &q_txt_plain),
            dns: q_txt_plain.clone(),
            expect: Expect::Truncated,
        },
        Case {
            name: "TC=1 over IPv6",
            seed: seed(VNET6.into(), &q_txt_512, replies::txt_1200, NS / 2),
            frame: f(VNET6.into(), &q_txt_512),
            dns: q_txt_512.clone(),
            expect: Expect::Truncated,
        },
        Case {
            name: "CD set: copied into the reply",
            seed: seed(VNET.into(), &q_cd, replies::a2, NS / 2),
            frame: f(VNET.into(), &q_cd),
            dns: q_cd.clone(),
            expect: Expect::Hit,
        },
        Case {
            name: "AD from upstream, query without DO or AD: cleared",
            seed: seed(VNET.into(), &q_ad_plain, resp_a_ad, NS / 2),
            frame: f(VNET.into(), &q_ad_plain),
            dns: q_ad_plain.clone(),
            expect: Expect::Hit,
        },
        Case {
            name: "AD from upstream, query with AD: kept",
            seed: seed(VNET.into(), &q_ad_asked, resp_a_ad, NS / 2),
            frame: f(VNET.into(), &q_ad_asked),
            dns: q_ad_asked.clone(),
            expect: Expect::Hit,
        },
        Case {
            name: "AD from upstream, query with DO: kept",
            seed: seed(VNET.into(), &q_ad_do, resp_a_ad, NS / 2),
            frame: f(VNET.into(), &q_ad_do),
            dns: q_ad_do.clone(),
            expect: Expect::Hit,
        },
        Case {
            name: "RD clear: stays clear",
            seed: seed(VNET.into(), &q_no_rd, replies::a2, NS / 2),
            frame: f(VNET.into(), &q_no_rd),
            dns: q_no_rd.clone(),
            expect: Expect::Hit,
        },
        Case {
            name: "fresh A hit, EDNS with cookie",
            seed: seed(VNET.into(), &q_www, replies::a2, NS / 2),
            frame: f(VNET.into(), &q_www),
            dns: q_www.clone(),
            expect: Expect::Hit,
        },
        Case {
            name: "mixed-case qname keeps its case",
            seed: seed(VNET.into(), &q_www, replies::a2, NS / 2),
            frame: f(VNET.into(), &q_mixed),
            dns: q_mixed.clone(),
            expect: Expect::Hit,
        },
        Case {
            name: "AAAA without EDNS",
            seed: seed(VNET.into(), &q_aaaa, replies::aaaa1, NS / 2),
            frame: f(VNET.into(), &q_aaaa),
            dns: q_aaaa.clone(),
            expect: Expect::Hit,
        },
        Case {
            name: "CNAME chain",
            seed: seed(VNET.into(), &q_cname, replies::cname_a, NS / 2),
            frame: f(VNET.into(), &q_cname),
            dns: q_cname.clone(),
            expect: Expect::Hit,
        },
        Case {
            name: "NXDOMAIN with SOA",
            seed: seed(VNET.into(), &q_nx, replies::nxdomain, NS / 2),
            frame: f(VNET.into(), &q_nx),
            dns: q_nx.clone(),
            expect: Expect::Hit,
        },
        Case {
            name: "kube view hit",
            seed: seed(KUBE.into(), &q_kube, replies::a2, NS / 2),
            frame: f(KUBE.into(), &q_kube),
            dns: q_kube.clone(),
            expect: Expect::Hit,
        },
        Case {
            name: "TTL lowered by 5 s elapsed",
            seed: seed(VNET.into(), &q_www, replies::a2, 5 * NS + NS / 2),
            frame: f(VNET.into(), &q_www),
            dns: q_www.clone(),
            expect: Expect::Hit,
        },
        Case {
            name: "expired entry",
            seed: seed(VNET.into(), &q_www, resp_short, 3 * NS),
            frame: f(VNET.into(), &q_www),
            dns: q_www.clone(),
            expect: Expect::Pass(STAT_EXPIRED),
        },
        Case {
            name: "wrong view",
            seed: seed(KUBE.into(), &q_www, replies::a2, 0),
            frame: f(VNET.into(), &q_www),
            dns: q_www.clone(),
            expect: Expect::Pass(STAT_MISS),
        },
        Case {
            name: "EDNS entry, query without EDNS",
            seed: seed(VNET.into(), &q_www, replies::a2, 0),
            frame: f(VNET.into(), &q_www_plain),
            dns: q_www_plain.clone(),
            expect: Expect::Pass(STAT_MISS),
        },
        Case {
            name: "plain entry, query with EDNS",
            seed: seed(VNET.into(), &q_www_plain, replies::a2, 0),
            frame: f(VNET.into(), &q_www),
            dns: q_www.clone(),
            expect: Expect::Pass(STAT_MISS),
        },
        Case {
            name: "reply larger than client's 512: TC=1",
            seed: seed(VNET.into(), &q_big, replies::big, 0),
            frame: f(VNET.into(), &q_big),
            dns: q_big.clone(),
            expect: Expect::Truncated,
        },
        Case {
            name: "same entry, client takes 4096",
            seed: seed(VNET.into(), &q_big_large, replies::big, 0),
            frame: f(VNET.into(), &q_big_large),
            dns: q_big_large.clone(),
            expect: Expect::Hit,
        },
        Case {
            name: "not a listener address",
            seed: seed(VNET.into(), &q_www, replies::a2, 0),
            frame: f(CLIENT.into(), &q_www),
            dns: vec![],
            expect: Expect::Pass(STAT_NOT_DNS),
        },
        Case {
            name: "non-DNS UDP port",
            seed: None,
            frame: udp_to(VNET, 123).build(&q_www),
            dns: vec![],
            expect: Expect::Pass(STAT_NOT_DNS),
        },
        Case {
            name: "TCP to port 53",
            seed: None,
            frame: tcp.build(&[0u8; 40]),
            dns: vec![],
            expect: Expect::Pass(STAT_NOT_DNS),
        },
        Case {
            name: "VLAN-tagged frame",
            seed: seed(VNET.into(), &q_www, replies::a2, 0),
            frame: vlan.build(&q_www),
            dns: vec![],
            expect: Expect::Pass(STAT_NOT_DNS),
        },
        Case {
            name: "IPv4 options",
            seed: seed(VNET.into(), &q_www, replies::a2, 0),
            frame: opts.build(&q_www),
            dns: vec![],
            expect: Expect::Pass(STAT_PASS_IP),
        },
        Case {
            name: "IPv4 header checksum wrong",
            seed: seed(VNET.into(), &q_www, replies::a2, 0),
            frame: {
                let mut fr = f(VNET.into(), &q_www);
                fr[24] ^= 0x01;
                fr
            },
            dns: vec![],
            expect: Expect::Pass(STAT_PASS_IP),
        },
        Case {
            name: "IPv4 broadcast source",
            seed: seed(VNET.into(), &q_www, replies::a2, 0),
            frame: FrameSpec::udp(Ipv4Addr::BROADCAST, VNET, 40000, 53).build(&q_www),
            dns: vec![],
            expect: Expect::Pass(STAT_PASS_IP),
        },
        Case {
            name: "IPv4 multicast source",
            seed: seed(VNET.into(), &q_www, replies::a2, 0),
            frame: FrameSpec::udp(Ipv4Addr::new(224, 0, 0, 251), VNET, 40000, 53).build(&q_www),
            dns: vec![],
            expect: Expect::Pass(STAT_PASS_IP),
        },
        Case {
            name: "IPv6 multicast source",
            seed: seed(VNET6.into(), &q_www, replies::a2, 0),
            frame: FrameSpec::udp("ff02::fb".parse::<Ipv6Addr>().unwrap(), VNET6, 40000, 53)
                .build(&q_www),
            dns: vec![],
            expect: Expect::Pass(STAT_PASS_IP),
        },
        Case {
            name: "source port 0",
            seed: seed(VNET.into(), &q_www, replies::a2, 0),
            frame: FrameSpec::udp(CLIENT, VNET, 0, 53).build(&q_www),
            dns: vec![],
            expect: Expect::Pass(STAT_PASS_IP),
        },
        Case {
            name: "fragment",
            seed: seed(VNET.into(), &q_www, replies::a2, 0),
            frame: frag.build(&q_www),
            dns: vec![],
            expect: Expect::Pass(STAT_PASS_IP),
        },
        Case {
            name: "truncated in the qname",
            seed: None,
            frame: truncated,
            dns: vec![],
            expect: Expect::Pass(STAT_PASS_IP),
        },
        Case {
            name: "garbage payload",
            seed: None,
            frame: f(VNET.into(), &[0xff; 40]),
            dns: vec![],
            expect: Expect::Pass(STAT_PASS_HEADER),
        },
        Case {
            name: "oversized query",
            seed: None,
            frame: f(VNET.into(), &oversized),
            dns: vec![],
            expect: Expect::Pass(STAT_PASS_HEADER),
        },
        Case {
            name: "compression pointer in question",
            seed: None,
            frame: f(VNET.into(), &q_compressed),
            dns: vec![],
            expect: Expect::Pass(STAT_PASS_QNAME),
        },
        Case {
            name: "QR=1 (a response)",
            seed: seed(VNET.into(), &q_www_plain, replies::a2, 0),
            frame: f(VNET.into(), &q_qr),
            dns: vec![],
            expect: Expect::Pass(STAT_PASS_HEADER),
        },
        Case {
            name: "ANCOUNT=1",
            seed: None,
            frame: f(VNET.into(), &q_an),
            dns: vec![],
            expect: Expect::Pass(STAT_PASS_HEADER),
        },
        Case {
            name: "EDNS version 1",
            seed: seed(VNET.into(), &q_www, replies::a2, 0),
            frame: f(VNET.into(), &q_ednsv1),
            dns: vec![],
            expect: Expect::Pass(STAT_PASS_EDNS),
        },
        Case {
            name: "trailing bytes",
            seed: seed(VNET.into(), &q_www_plain, replies::a2, 0),
            frame: f(VNET.into(), &q_trailing),
            dns: vec![],
            expect: Expect::Pass(STAT_PASS_HEADER),
        },
        Case {
            name: "more option bytes than an undo can save",
            seed: seed(VNET.into(), &q_padded, replies::a2, 0),
            frame: f(VNET.into(), &q_padded),
            dns: vec![],
            expect: Expect::Pass(localdns_common::STAT_PASS_SIZE),
        },
        Case {
            name: "empty cache",
            seed: None,
            frame: f(VNET.into(), &q_www),
            dns: q_www.clone(),
            expect: Expect::Pass(STAT_MISS),
        },
    ]
}

fn run_table(prog: &str, hit_rc: u32, pass_rc: u32) {
    let mut rig = Rig::new();
    let mut failures = Vec::new();
    // Hits answered from each size class's map (small, big).
    let mut hits_by_class = (0, 0);
    for c in cases() {
        rig.clear();
        let entry = c
            .seed
            .as_ref()
            .map(|(dst, q, r, age)| rig.seed(*dst, q, &r(q), *age));
        if matches!(c.expect, Expect::Hit | Expect::Truncated) {
            match rig.cache.counts() {
                (1, 0) => hits_by_class.0 += 1,
                (0, 1) => hits_by_class.1 += 1,
                n => failures.push(format!("{}: entries by class {n:?}", c.name)),
            }
        }
        let before = rig.stats_all();
        let slots_before = fastpath::read_slots(&rig.stats);
        let (rc, out) = rig.run(prog, &c.frame);
        let now = mono_ns();
        let after = rig.stats_all();
        let slots_after = fastpath::read_slots(&rig.stats);
        let bumped: Vec<&str> = (0..after.len())
            .filter(|&i| after[i] != before[i])
            .map(|i| STAT_NAMES[i])
            .collect();
        match c.expect {
            Expect::Hit | Expect::Truncated => {
                let want = expected_reply(&c.frame, &c.dns, entry.as_ref().unwrap(), now);
                let stat = if matches!(c.expect, Expect::Hit) {
                    STAT_HIT
                } else {
                    localdns_common::STAT_TRUNCATED
                };
                // Counted once, under the entry's slot and the family.
                let v6 = usize::from(c.frame[12..14] == [0x86, 0xdd]);
                let slot = usize::from(TEST_SLOT) * 2 + v6;
                let slot_bumps: Vec<(usize, u64)> = (0..slots_after.len())
                    .filter(|&i| slots_after[i] != slots_before[i])
                    .map(|i| (i, slots_after[i] - slots_before[i]))
                    .collect();
                if rc != hit_rc
                    || out != want
                    || bumped != [STAT_NAMES[stat as usize]]
                    || slot_bumps != [(slot, 1)]
                {
                    failures.push(format!(
                        "{}: rc {rc} counters {bumped:?} slots {slot_bumps:?}\n got  {out:02x?}\n want {want:02x?}",
                        c.name
                    ));
                }
            }
            Expect::Pass(stat) => {
                if rc != pass_rc || out != c.frame || bumped != [STAT_NAMES[stat as usize]] {
                    failures.push(format!(
                        "{}: rc {rc} (want {pass_rc}), counters {bumped:?} (want {}), untouched: {}",
                        c.name,
                        STAT_NAMES[stat as usize],
                        out == c.frame
                    ));
                }
            }
        }
    }
    assert!(
        hits_by_class.0 >= 10 && hits_by_class.1 >= 5,
        "both size classes answer: {hits_by_class:?}"
    );
    eprintln!("hits by class (small, big): {hits_by_class:?}");
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn xdp_table() {
    run_table("xdp", XDP_TX, XDP_PASS);
}

#[test]
fn tc_table() {
    run_table("tc", TC_ACT_REDIRECT, TC_ACT_OK);
}

#[test]
fn logged_entries_emit_an_event_per_hit() {
    let mut rig = Rig::new();
    let mut ring =
        aya::maps::RingBuf::try_from(rig.ebpf.take_map(localdns_common::MAP_LOG).unwrap()).unwrap();
    let edns = QEdns {
        udp_size: 1232,
        do_bit: true,
        options: cookie(),
    };
    let q = dns_query(0xbeef, "Www.Example.Test", 1, 0x0100, Some(&edns));
    let pq = parse_query(&q).unwrap();
    let key = Key::of(localdns_common::VIEW_KUBE, &pq);
    let e = Entry::from_upstream(&pq, &replies::a2(&q), 3600, 0, mono_ns()).unwrap();
    let mut v = encode::value(&key, &e).unwrap();
    // Not logged: no event.
    rig.cache.insert(&encode::key(&key, SEED), &v).unwrap();
    let frame = udp_to(KUBE, 53).build(&q);
    assert_eq!(rig.run("xdp", &frame).0, XDP_TX);
    assert!(ring.next().is_none());
    // Logged: one event with the query as sent.
    v.head.log = 1;
    rig.cache.insert(&encode::key(&key, SEED), &v).unwrap();
    let (rc, out) = rig.run("xdp", &frame);
    assert_eq!(rc, XDP_TX);
    let item = ring.next().expect("an event");
    assert_eq!(item.len(), std::mem::size_of::<localdns_common::LogEvent>());
    // SAFETY: the program writes exactly one LogEvent per record.
    let ev: localdns_common::LogEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
    assert_eq!((ev.family, &ev.addr[..4]), (4, &CLIENT.octets()[..]));
    assert_eq!(
        (ev.sport, ev.id, ev.qtype, ev.qclass),
        (40000, 0xbeef, 1, 1)
    );
    assert_eq!(
        (ev.view, ev.udp_size, ev.query_len as usize),
        (localdns_common::VIEW_KUBE, 1232, q.len())
    );
    assert_eq!(ev.reply_len as usize, out.len() - 42);
    assert_eq!(ev.rflags, 0x8180, "QR RD RA, NOERROR");
    assert_eq!(
        &ev.qname[..ev.qname_len as usize],
        &q[12..12 + ev.qname_len as usize]
    );
    assert_eq!(
        ev.kflags,
        localdns_common::KEY_F_EDNS | localdns_common::KEY_F_DO
    );
}

/// Prefetch: hits before the entry's window opens are not counted; in the
/// window, the hit that reaches the amount (and only that one) reports the
/// key on the ring, with the fields the daemon rebuilds the key from.
#[test]
fn prefetch_window_reports_an_entry_once() {
    let mut rig = Rig::new();
    let mut ring =
        aya::maps::RingBuf::try_from(rig.ebpf.take_map(localdns_common::MAP_LOG).unwrap()).unwrap();
    let q = dns_query(0x1111, "www.example.test", 1, 0x0110, None);
    let pq = parse_query(&q).unwrap();
    let key = Key::of(localdns_common::VIEW_KUBE, &pq);
    let e = Entry::from_upstream(&pq, &replies::a2(&q), 3600, 0, mono_ns()).unwrap();
    let mut v = encode::value(&key, &e).unwrap();
    let bkey = encode::key(&key, SEED);
    let frame = udp_to(KUBE, 53).build(&q);
    // Window far ahead: hits answer, nothing is counted or reported.
    v.head.prefetch_amount = 3;
    v.head.prefetch_ms = 3_000_000;
    rig.cache.insert(&bkey, &v).unwrap();
    for _ in 0..4 {
        assert_eq!(rig.run("xdp", &frame).0, XDP_TX);
    }
    assert!(ring.next().is_none());
    assert_eq!(rig.cache.get(&bkey).unwrap().head.hits, 0);
    // Window open: the third hit reports, the fourth and fifth do not.
    v.head.prefetch_ms = 0;
    rig.cache.insert(&bkey, &v).unwrap();
    let mut events = Vec::new();
    for i in 0..5 {
        assert_eq!(rig.run("xdp", &frame).0, XDP_TX, "hit {i}");
        while let Some(item) = ring.next() {
            // SAFETY: the program writes exactly one LogEvent per record.
            let ev: localdns_common::LogEvent =
                unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            events.push((i, ev));
        }
    }
    assert_eq!(events.len(), 1, "one report");
    let (at, ev) = &events[0];
    assert_eq!(*at, 2, "reported on the hit that reached the amount");
    assert_eq!(ev.kind, localdns_common::EVENT_PREFETCH);
    assert_eq!(
        (ev.view, ev.qtype, ev.qclass),
        (localdns_common::VIEW_KUBE, 1, 1)
    );
    assert_eq!(ev.kflags, pq.key_flags(), "CD is part of the key");
    assert_eq!(&ev.qname[..ev.qname_len as usize], &pq.qname[..]);
    assert_eq!(rig.cache.get(&bkey).unwrap().head.hits, 5);
    // Amount 0: never reported.
    v.head.prefetch_amount = 0;
    rig.cache.insert(&bkey, &v).unwrap();
    for _ in 0..3 {
        assert_eq!(rig.run("xdp", &frame).0, XDP_TX);
    }
    assert!(ring.next().is_none());
}

/// An entry whose answer moves between size classes (the record set grew
/// past the small class, then shrank) is answered from its newest copy
/// only: writing it to one map removes it from the other.
#[test]
fn an_entry_moving_between_size_classes_is_answered_from_its_newest_copy() {
    let mut rig = Rig::new();
    let q = dns_query(0x5151, "moving.example.test", 1, 0x0100, None);
    let frame = udp_to(VNET, 53).build(&q);
    let small = |q: &[u8]| dns_response(q, 0, &[a_rr(q, 300, [10, 1, 0, 1])], &[]);
    // Twelve A records: 192 bytes after the question, past the small class.
    let big = |q: &[u8]| {
        let rrs: Vec<_> = (1..=12).map(|i| a_rr(q, 300, [10, 2, 0, i])).collect();
        dns_response(q, 0, &rrs, &[])
    };
    for (step, resp, classes) in [
        ("small", small(&q), (1, 0)),
        ("grown to big", big(&q), (0, 1)),
        ("shrunk to small", small(&q), (1, 0)),
        ("big again", big(&q), (0, 1)),
    ] {
        let entry = rig.seed(VNET.into(), &q, &resp, NS / 2);
        assert_eq!(rig.cache.counts(), classes, "{step}: entries by class");
        let (rc, out) = rig.run("xdp", &frame);
        assert_eq!(rc, XDP_TX, "{step}");
        assert_eq!(
            out,
            expected_reply(&frame, &q, &entry, mono_ns()),
            "{step}: the newest answer"
        );
    }
}

/// The benchmark's null responder: QR set, addresses and ports swapped,
/// UDP checksum still valid.
#[test]
fn null_responder_turns_queries_around() {
    let g = globals(0);
    let mut ebpf = fastpath::open(&g, 16, None).unwrap();
    turns_queries_around(&mut ebpf, "localdns_null");
}

/// The benchmark's floor (the null responder after reading per-name
/// memory) answers exactly as the null responder, with every line count.
#[test]
fn floor_turns_queries_around() {
    let g = globals(0);
    for lines in [1, 5, 8] {
        let mut ebpf = fastpath::open_floor(&g, lines).unwrap();
        let Some(aya::maps::Map::Array(m)) = ebpf.map(localdns_common::MAP_FLOOR) else {
            panic!("no floor array");
        };
        let size = m.info().unwrap().max_entries();
        assert_eq!(size, localdns_common::FLOOR_SLOTS * lines, "{lines} lines");
        turns_queries_around(&mut ebpf, "localdns_floor");
    }
}

fn turns_queries_around(ebpf: &mut aya::Ebpf, prog: &str) {
    let p: &mut Xdp = ebpf.program_mut(prog).unwrap().try_into().unwrap();
    p.load().unwrap();
    let q = dns_query(0x4242, "www.example.test", 1, 0x0100, None);
    let frame = udp_to(VNET, 53).build(&q);
    let mut out = vec![0u8; 512];
    let (rc, len) = test_run_xdp(p, &frame, &mut out);
    out.truncate(len);
    assert_eq!(rc, XDP_TX);
    let mut reply_dns = q.clone();
    reply_dns[2] |= 0x80;
    let want = FrameSpec::udp(VNET, CLIENT, 53, 40000).build(&reply_dns);
    assert_eq!(&out[..12], &[&frame[6..12], &frame[0..6]].concat()[..]);
    assert_eq!(
        &out[14..],
        &want[14..],
        "IP/UDP/DNS of the turned-around packet"
    );
    // Not a query to us: passed.
    let other = udp_to(CLIENT, 53).build(&q);
    let mut out = vec![0u8; 512];
    assert_eq!(test_run_xdp(p, &other, &mut out).0, XDP_PASS);
}

#[test]
fn collision_on_hash_passes() {
    let mut rig = Rig::new();
    let q = dns_query(1, "www.example.test", 1, 0x0100, None);
    let other = dns_query(1, "www.exbmple.test", 1, 0x0100, None);
    let e = rig.seed(VNET.into(), &other, &replies::a2(&other), 0);
    // Plant the other name's value under this name's key, as a 64-bit hash
    // collision would.
    let key = Key::of(localdns_common::VIEW_VNET, &parse_query(&q).unwrap());
    let okey = Key::of(localdns_common::VIEW_VNET, &parse_query(&other).unwrap());
    rig.cache
        .insert(&encode::key(&key, SEED), &encode::value(&okey, &e).unwrap())
        .unwrap();
    let before = rig.stat(STAT_PASS_COLLISION);
    let frame = udp_to(VNET, 53).build(&q);
    let (rc, out) = rig.run("xdp", &frame);
    assert_eq!((rc, out == frame), (XDP_PASS, true));
    assert_eq!(rig.stat(STAT_PASS_COLLISION), before + 1);
}

/// The program ages entries by jiffies scaled onto the daemon's coarse
/// clock (calibrated at load, `fastpath::clock`), not by a helper: on this
/// machine the calibration must succeed, and the program must agree with
/// the daemon on either side of an expiry: 50 ms (a dozen ticks) after it
/// the entry is expired; 300 ms before it (room for a slow emulator
/// between seeding and the run) it answers byte for byte what the daemon
/// would.
#[test]
fn program_clock_agrees_with_the_daemons_at_expiry() {
    let clock = fastpath::clock::program_clock();
    assert_ne!(
        clock,
        fastpath::clock::JiffyClock::HELPER,
        "calibration failed: {:?}",
        fastpath::clock::calibrate()
    );
    let q = dns_query(2, "www.example.test", 1, 0x0100, None);
    let frame = udp_to(VNET, 53).build(&q);
    // TTL 2 s: 300 ms before its end a hit, TTL 1; 50 ms after, expired.
    for round in 0..5 {
        let mut rig = Rig::new();
        let e = rig.seed(VNET.into(), &q, &resp_short(&q), 2 * NS - 300_000_000);
        let (rc, out) = rig.run("xdp", &frame);
        assert_eq!(rc, XDP_TX, "round {round}: fresh entry not answered");
        assert_eq!(
            out,
            expected_reply(&frame, &q, &e, mono_ns()),
            "round {round}"
        );
        rig.clear();
        rig.seed(VNET.into(), &q, &resp_short(&q), 2 * NS + 50_000_000);
        let before = rig.stat(STAT_EXPIRED);
        let (rc, out) = rig.run("xdp", &frame);
        assert_eq!((rc, out == frame), (XDP_PASS, true), "round {round}");
        assert_eq!(rig.stat(STAT_EXPIRED), before + 1, "round {round}");
        std::thread::sleep(std::time::Duration::from_millis(7));
    }
}

/// The map key is only a hash of the name and the key fields: an entry for
/// the same name but another type, view or set of flags found under a
/// query's key (a collision) is passed too, by the fields stored in the
/// value.
#[test]
fn collision_on_key_fields_passes() {
    let mut rig = Rig::new();
    let q = dns_query(1, "www.example.test", 1, 0x0100, None);
    let key = Key::of(localdns_common::VIEW_VNET, &parse_query(&q).unwrap());
    let frame = udp_to(VNET, 53).build(&q);
    let edns = QEdns {
        udp_size: 1232,
        do_bit: true,
        options: vec![],
    };
    let others = [
        (dns_query(1, "www.example.test", 28, 0x0100, None), VNET),
        (dns_query(1, "www.example.test", 1, 0x0100, None), KUBE),
        (
            dns_query(1, "www.example.test", 1, 0x0100, Some(&edns)),
            VNET,
        ),
        (dns_query(1, "www.example.test", 1, 0x0110, None), VNET),
    ];
    for (other, dst) in others {
        let po = parse_query(&other).unwrap();
        let okey = Key::of(view_of(dst.into()), &po);
        assert_ne!(okey, key);
        let e = Entry::from_upstream(&po, &replies::a2(&other), 3600, 0, mono_ns()).unwrap();
        rig.cache
            .insert(&encode::key(&key, SEED), &encode::value(&okey, &e).unwrap())
            .unwrap();
        let before = rig.stat(STAT_PASS_COLLISION);
        let (rc, out) = rig.run("xdp", &frame);
        assert_eq!((rc, out == frame), (XDP_PASS, true), "{okey:?}");
        assert_eq!(rig.stat(STAT_PASS_COLLISION), before + 1, "{okey:?}");
    }
    // The right entry under the key answers.
    let e = Entry::from_upstream(
        &parse_query(&q).unwrap(),
        &replies::a2(&q),
        3600,
        0,
        mono_ns(),
    )
    .unwrap();
    rig.cache
        .insert(&encode::key(&key, SEED), &encode::value(&key, &e).unwrap())
        .unwrap();
    assert_eq!(rig.run("xdp", &frame).0, XDP_TX);
}

/// Cost of a fresh hit in BPF_PROG_TEST_RUN, step by step (not asserted:
/// printed for the closing notes; timing belongs in `cargo xtask bench`,
/// which records the same profile). A full hit rewrites the packet, so
/// `repeat` would re-run on the reply: it is timed in single runs (median
/// of many, timer overhead included). The `FAULT_STOP_*` loads stop before
/// the first write, so those prefixes are timed both ways: `repeat` gives
/// their cost without the timer, and the difference is the single-run
/// overhead, which is taken off the full hit.
#[test]
fn hit_cost_report() {
    let edns = QEdns {
        udp_size: 1232,
        do_bit: false,
        options: cookie(),
    };
    let q = dns_query(7, "www.example.test", 1, 0x0100, Some(&edns));
    let frame = udp_to(VNET, 53).build(&q);
    let other = dns_query(7, "www.exbmple.test", 1, 0x0100, Some(&edns));
    let miss = udp_to(VNET, 53).build(&other);
    let profile = localdns_tests::profile::hit_profile(
        |fault| {
            let mut rig = Rig::with_fault(fault);
            rig.seed(VNET.into(), &q, &replies::a2(&q), 0);
            rig.ebpf
        },
        &frame,
        &miss,
    );
    println!(
        "BPF_PROG_TEST_RUN www.example.test A (2 records, EDNS+cookie), ns per packet:\n{}",
        profile.table()
    );
}

/// Cost of a hit against the size of the warm set in BPF_PROG_TEST_RUN:
/// `n` entries seeded, their queries run in turn (single runs), so
/// consecutive runs touch different entries as live traffic does and the
/// map's memory is as cold as the system call between runs leaves it.
/// Printed, not asserted (the live figure is `cargo xtask bench`'s sweep).
#[test]
fn warm_set_cost_report() {
    let edns = QEdns {
        udp_size: 1232,
        do_bit: false,
        options: vec![],
    };
    let mut line = String::new();
    for n in [50usize, 2000, 20000] {
        let mut rig = Rig::with(localdns_common::FAULT_NONE, 65536);
        let frames: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                let q = dns_query(7, &format!("h{i}.bench.test"), 1, 0x0100, Some(&edns));
                rig.seed(VNET.into(), &q, &replies::a2(&q), 0);
                udp_to(VNET, 53).build(&q)
            })
            .collect();
        let p: &Xdp = rig
            .ebpf
            .program(fastpath::XDP_PROG)
            .unwrap()
            .try_into()
            .unwrap();
        let mut ns = Vec::new();
        for _ in 0..(40_000 / n).max(2) {
            for f in &frames {
                ns.extend(single_run_ns(p, f, 1, XDP_TX));
            }
        }
        ns.sort_unstable();
        line.push_str(&format!(" {n}: {} ns;", ns[ns.len() / 2]));
    }
    println!(
        "BPF_PROG_TEST_RUN hit against the warm set (single-run medians, timer included):{line}"
    );
}

/// After the program's first write to a packet, a failure drops it; it is
/// never passed half-rewritten. The one way back is a generation mismatch,
/// where the saved query bytes are put back first: the packet passed on is
/// the query exactly as it arrived. Rows for XDP and TC, for a query with
/// EDNS (the reply overwrites its OPT record), one without, and one whose
/// reply is shorter than the query (padding option).
#[test]
fn fault_rows_drop_after_the_first_write() {
    use localdns_common::{
        FAULT_AFTER_COPY, FAULT_AFTER_RESIZE, FAULT_RACE, FAULT_RACE_NO_UNDO, STAT_DROP_ERROR,
        STAT_PASS_RACE,
    };
    let edns = QEdns {
        udp_size: 1232,
        do_bit: false,
        options: cookie(),
    };
    let mut padding = vec![0, 12, 0, 100]; // PADDING, 100 bytes
    padding.extend(vec![0u8; 100]);
    let padded = QEdns {
        udp_size: 1232,
        do_bit: false,
        options: padding,
    };
    let queries = [
        (
            "EDNS+cookie",
            dns_query(0x1212, "www.example.test", 1, 0x0100, Some(&edns)),
        ),
        (
            "no EDNS",
            dns_query(0x1313, "www.example.test", 1, 0x0100, None),
        ),
        (
            "reply shorter",
            dns_query(0x1414, "www.example.test", 1, 0x0100, Some(&padded)),
        ),
    ];
    let mut failures = Vec::new();
    for (fault, expect) in [
        (FAULT_AFTER_RESIZE, STAT_DROP_ERROR),
        (FAULT_AFTER_COPY, STAT_DROP_ERROR),
        (FAULT_RACE_NO_UNDO, STAT_DROP_ERROR),
        (FAULT_RACE, STAT_PASS_RACE),
    ] {
        let mut rig = Rig::with_fault(fault);
        for (prog, drop_rc, pass_rc) in
            [("xdp", XDP_DROP, XDP_PASS), ("tc", TC_ACT_SHOT, TC_ACT_OK)]
        {
            for (what, q) in &queries {
                rig.clear();
                rig.seed(VNET.into(), q, &replies::a2(q), NS / 2);
                let frame = udp_to(VNET, 53).build(q);
                let before = rig.stat(expect);
                let (rc, out) = rig.run(prog, &frame);
                let bumped = rig.stat(expect) - before;
                let ok = if expect == STAT_PASS_RACE {
                    rc == pass_rc && out == frame && bumped == 1
                } else {
                    rc == drop_rc && bumped == 1
                };
                if !ok {
                    failures.push(format!(
                        "fault {fault} {prog} {what}: rc {rc}, {} bumped {bumped}, restored {}",
                        STAT_NAMES[expect as usize],
                        out == frame
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A name under `base` (`<prefix><n>.<base>`) whose two slots in a table
/// of two are both slot 0, so two such names can only take each other's
/// place.
fn name_in_slot_zero(prefix: &str, base: &str) -> String {
    (0..10_000)
        .map(|n| format!("{prefix}{n}.{base}"))
        .find(|name| {
            let q = dns_query(1, name, 1, 0x0100, None);
            let key = Key::of(view_of(VNET.into()), &parse_query(&q).unwrap());
            localdns_common::slot_pair(encode::key(&key, SEED).hash, 1) == (0, 0)
        })
        .expect("one name in four has both slots at 0")
}

/// Replacing entries while the program copies them. The small class's
/// slots are written in place: with a table of two slots and two names
/// that may only live in slot 0, every write replaces the other name's
/// entry in the slot the program is reading. The big class's preallocated
/// elements are reused by the next update at once. Either way a reader
/// can see one name's header and another's records. A writer thread on
/// one CPU replaces two entries of different shapes in turn;
/// BPF_PROG_TEST_RUN answers on the other CPU; every reply is decoded with
/// hickory-proto and must answer its own question. With the generation
/// check off, the same test shows the torn replies it prevents.
#[test]
fn torn_reads_are_never_sent() {
    use hickory_proto::op::Message;
    use hickory_proto::rr::RData;
    use localdns_common::{FAULT_NO_GENERATION_CHECK, STAT_PASS_RACE};
    use std::sync::atomic::{AtomicBool, Ordering};
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(cpus >= 2, "needs two CPUs");
    // Replies the check-on runs must see, and wait for.
    const MIN_REPLIES: u64 = 10_000;
    // Each size class is its own map and its own compiled hit path: both
    // are raced. Names over 80 bytes put both entries in the big class.
    let pad = format!("{}.{}", "p".repeat(50), "q".repeat(30));
    let mut report = Vec::new();
    for (class, x_name, y_name, counts) in [
        (
            "small",
            name_in_slot_zero("x", "race.test"),
            name_in_slot_zero("yyyyyy", "race.test"),
            (1, 0),
        ),
        (
            "big",
            format!("x.{pad}.race.test"),
            format!("yyyyyy.{pad}.race.test"),
            (0, 2),
        ),
    ] {
        let qx = dns_query(0x7001, &x_name, 1, 0x0100, None);
        let qy = dns_query(0x7002, &y_name, 1, 0x0100, None);
        let rx = dns_response(&qx, 0, &[a_rr(&qx, 300, [10, 0, 0, 1])], &[]);
        let ry = dns_response(
            &qy,
            0,
            &(2..6)
                .map(|i| a_rr(&qy, 300, [10, 0, 0, i]))
                .collect::<Vec<_>>(),
            &[],
        );
        let frame = udp_to(VNET, 53).build(&qx);
        let x_fqdn = format!("{x_name}.");
        for fault in [localdns_common::FAULT_NONE, FAULT_NO_GENERATION_CHECK] {
            let Rig {
                ebpf,
                mut cache,
                stats,
            } = Rig::with(fault, 1);
            let value = |q: &[u8], r: &[u8], generation: u64| {
                let pq = parse_query(q).unwrap();
                let e = Entry::from_upstream(&pq, r, 3600, 0, mono_ns()).unwrap();
                let key = Key::of(view_of(VNET.into()), &pq);
                let mut v = encode::value(&key, &e).unwrap();
                v.head.generation = generation;
                (encode::key(&key, SEED), v)
            };
            let stop = AtomicBool::new(false);
            let (mut tx, mut passed, mut torn, mut writes) = (0u64, 0u64, 0u64, 0u64);
            let race0: u64 = stats.get(&STAT_PASS_RACE, 0).unwrap().iter().sum();
            std::thread::scope(|sc| {
                let writer = sc.spawn(|| {
                    pin_to_cpu(1);
                    let gens = encode::Generations::default();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) && n < 2_000_000 {
                        let (kx, vx) = value(&qx, &rx, gens.next());
                        cache.insert(&kx, &vx).unwrap();
                        let (ky, vy) = value(&qy, &ry, gens.next());
                        cache.insert(&ky, &vy).unwrap();
                        n += 2;
                    }
                    n
                });
                pin_to_cpu(0);
                let p: &Xdp = ebpf
                    .program(fastpath::XDP_PROG)
                    .unwrap()
                    .try_into()
                    .unwrap();
                let t0 = std::time::Instant::now();
                let mut out = vec![0u8; 1024];
                // With the check on: at least 2 s, then on until 10,000
                // replies, bounded at 30 s. Under qemu's emulation on a
                // slow machine a reply is ~100 times rarer than on the
                // host, so a fixed time proves little there.
                let min = std::time::Duration::from_secs(2);
                let max = std::time::Duration::from_secs(30);
                let want = if fault == localdns_common::FAULT_NONE {
                    MIN_REPLIES
                } else {
                    0
                };
                while t0.elapsed() < min || (tx < want && t0.elapsed() < max) {
                    let (rc, len) = test_run_xdp(p, &frame, &mut out);
                    if rc != XDP_TX {
                        passed += 1;
                        continue;
                    }
                    tx += 1;
                    let dns = &out[42..len];
                    let good = Message::from_vec(dns).is_ok_and(|m| {
                    m.queries.len() == 1
                        && m.queries[0].name().to_ascii() == x_fqdn
                        && m.answers.len() == 1
                        && matches!(&m.answers[0].data, RData::A(a) if a.0 == Ipv4Addr::new(10, 0, 0, 1))
                });
                    if !good {
                        torn += 1;
                    }
                }
                stop.store(true, Ordering::Relaxed);
                writes = writer.join().unwrap();
            });
            assert_eq!(cache.counts(), counts, "{class} class");
            let races = stats.get(&STAT_PASS_RACE, 0).unwrap().iter().sum::<u64>() - race0;
            report.push(format!(
            "{class} class, generation check {}: {tx} replies, {torn} torn, {passed} passed ({races} generation mismatches undone), {writes} entry writes",
            if fault == FAULT_NO_GENERATION_CHECK { "off" } else { "on" }
        ));
            if fault == localdns_common::FAULT_NONE {
                assert_eq!(torn, 0, "{}", report.join("; "));
                assert!(tx >= MIN_REPLIES, "too few replies: {}", report.join("; "));
            }
        }
    }
    println!("torn-read stress (2-30 s each): {}", report.join("; "));
}

/// One `BPF_PROG_TEST_RUN` of an XDP program: (return value, output length).
fn test_run_xdp(p: &Xdp, frame: &[u8], out: &mut [u8]) -> (u32, usize) {
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(out),
            ..Default::default()
        })
        .unwrap();
    (r.return_value, r.data_size_out as usize)
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Helper functions the object calls, per program section, must all exist
/// in Linux 5.15 (the oldest kernel AKS LocalDNS supports) for the
/// program's type. Helper numbers are from include/uapi/linux/bpf.h; 5.15
/// ends at 175 (task_pt_regs).
#[test]
fn helpers_are_those_of_linux_5_15() {
    use object::{Object, ObjectSection, SectionKind};
    // What XDP and TC programs may call on 5.15 and this program might use.
    const XDP: &[(i32, &str)] = &[
        (1, "map_lookup_elem"),
        (2, "map_update_elem"),
        (3, "map_delete_elem"),
        (160, "ktime_get_coarse_ns"),
        (118, "jiffies64"),
        (8, "get_smp_processor_id"),
        (23, "redirect"),
        (44, "xdp_adjust_head"),
        (51, "redirect_map"),
        (54, "xdp_adjust_meta"),
        (65, "xdp_adjust_tail"),
        (131, "ringbuf_reserve"),
        (132, "ringbuf_submit"),
        (133, "ringbuf_discard"),
    ];
    const TC: &[(i32, &str)] = &[
        (1, "map_lookup_elem"),
        (2, "map_update_elem"),
        (3, "map_delete_elem"),
        (160, "ktime_get_coarse_ns"),
        (118, "jiffies64"),
        (9, "skb_store_bytes"),
        (10, "l3_csum_replace"),
        (11, "l4_csum_replace"),
        (23, "redirect"),
        (26, "skb_load_bytes"),
        (38, "skb_change_tail"),
        (39, "skb_pull_data"),
        (131, "ringbuf_reserve"),
        (132, "ringbuf_submit"),
        (133, "ringbuf_discard"),
    ];
    const LAST_IN_5_15: i32 = 175;
    let obj = object::File::parse(fastpath::EBPF_OBJECT).expect("ELF");
    let text = obj.section_by_name(".text");
    let text_index = text.as_ref().map(|t| t.index());
    // `.text`'s code and relocations, read once for all its subprograms.
    let text_code = text.as_ref().map(Code::of);
    let mut found = Vec::new();
    for sec in obj.sections() {
        if sec.kind() != SectionKind::Text || Some(sec.index()) == text_index {
            continue;
        }
        let name = sec.name().unwrap_or("?").to_string();
        let allowed = match name.as_str() {
            "xdp" => XDP,
            "classifier" => TC,
            other => panic!("program section {other} not covered"),
        };
        // The section's own code, then every `.text` subprogram it reaches
        // (BPF-to-BPF calls): their helper calls run as this program type.
        let mut calls = std::collections::BTreeSet::new();
        let mut subprogs = Vec::new();
        Code::of(&sec).scan(&obj, 0, sec.size(), &mut calls, &mut subprogs);
        let mut seen = std::collections::BTreeSet::new();
        while let Some(at) = subprogs.pop() {
            if !seen.insert(at) {
                continue;
            }
            let (t, code) = text
                .as_ref()
                .zip(text_code.as_ref())
                .expect("a subprogram without .text");
            let size = text_function_size(&obj, t.index(), at);
            code.scan(&obj, at, size, &mut calls, &mut subprogs);
        }
        for c in &calls {
            assert!(*c <= LAST_IN_5_15, "{name}: helper {c} is newer than 5.15");
            let known = allowed.iter().find(|(id, _)| id == c);
            assert!(
                known.is_some(),
                "{name}: helper {c} not allowed for this type on 5.15"
            );
        }
        found.push(format!(
            "{name} ({} subprograms): {}",
            seen.len(),
            calls
                .iter()
                .map(|c| allowed.iter().find(|(id, _)| id == c).unwrap().1)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    assert!(found.iter().any(|f| f.starts_with("xdp ")), "{found:?}");
    assert!(
        found.iter().any(|f| f.starts_with("classifier ")),
        "{found:?}"
    );
    println!("helpers called: {}", found.join("; "));
}

/// A code section's bytes and relocations (by offset), and whether it is
/// `.text`, where unrelocated calls are relative.
struct Code<'a> {
    name: String,
    data: &'a [u8],
    relocs: std::collections::BTreeMap<u64, object::Relocation>,
}

impl<'a> Code<'a> {
    fn of(sec: &object::Section<'a, '_>) -> Self {
        use object::ObjectSection;
        Code {
            name: sec.name().unwrap_or("?").to_string(),
            data: sec.data().expect("section data"),
            relocs: sec.relocations().collect(),
        }
    }

    /// Scans `size` bytes from `from`: helper calls go to `calls`,
    /// BPF-to-BPF call targets (byte offsets in `.text`) to `subprogs`.
    fn scan(
        &self,
        obj: &object::File,
        from: u64,
        size: u64,
        calls: &mut std::collections::BTreeSet<i32>,
        subprogs: &mut Vec<u64>,
    ) {
        use object::{Object, ObjectSymbol, RelocationTarget};
        let code = self.data;
        let mut i = from as usize;
        while i + 8 <= (from + size) as usize {
            let (op, regs) = (code[i], code[i + 1]);
            let imm = i32::from_le_bytes(code[i + 4..i + 8].try_into().unwrap());
            // BPF_JMP|BPF_CALL: src_reg 0 a helper, 1 a BPF-to-BPF call, 2
            // a kfunc (which 5.15's XDP/TC lack).
            if op == 0x85 {
                match regs >> 4 {
                    0 => {
                        calls.insert(imm);
                    }
                    1 => {
                        // Into another section through a relocation
                        // (against the section: the target is in the
                        // immediate; against a function: its address),
                        // else relative to here.
                        let target = match self.relocs.get(&(i as u64)).map(|r| r.target()) {
                            Some(RelocationTarget::Symbol(s)) => {
                                let sym = obj.symbol_by_index(s).unwrap();
                                if sym.kind() == object::SymbolKind::Section {
                                    (imm as i64 + 1) as u64 * 8
                                } else {
                                    sym.address()
                                }
                            }
                            Some(other) => panic!("call relocation {other:?}"),
                            None => {
                                assert_eq!(self.name, ".text", "an unrelocated call");
                                (i as i64 + (imm as i64 + 1) * 8) as u64
                            }
                        };
                        subprogs.push(target);
                    }
                    r => panic!("{}: call kind {r} (kfunc?) {imm}", self.name),
                }
            }
            i += if op == 0x18 { 16 } else { 8 }; // lddw is two slots
        }
    }
}

/// The size of the `.text` (section `text`) function starting at byte `at`.
fn text_function_size(obj: &object::File, text: object::SectionIndex, at: u64) -> u64 {
    use object::{Object, ObjectSymbol};
    obj.symbols()
        .find(|s| {
            s.section_index() == Some(text)
                && s.kind() == object::SymbolKind::Text
                && s.address() == at
        })
        .unwrap_or_else(|| panic!("no .text function at {at:#x}"))
        .size()
}

/// The verifier's work per program stays far from its limit (1M processed
/// instructions on every kernel since 5.2): a loop that stops being
/// prunable shows up here first, not as a load failure on some node.
/// Measured: about 77k on 6.18 and 156k on 6.1 (older verifiers prune
/// less); the guard is a quarter of the limit.
#[test]
fn verifier_cost_stays_small() {
    let rig = Rig::new();
    let mut counts = Vec::new();
    for name in [fastpath::XDP_PROG, fastpath::TC_PROG] {
        let info = rig.ebpf.program(name).unwrap().info().unwrap();
        let n = info.verified_instruction_count().unwrap_or(0);
        counts.push(format!("{name} {n}"));
        assert!(n > 0 && n < 250_000, "{name}: {n} instructions verified");
    }
    println!("verified instructions: {}", counts.join(", "));
}
