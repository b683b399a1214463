//! Shared helpers of the localdns integration tests: packet and message
//! builders with independent (reference) checksums, and guards that build
//! and always tear down network namespaces and processes.

pub mod cgroup;
pub mod client;
pub mod fake;
pub mod load;
pub mod msg;
pub mod netns;
pub mod profile;
pub mod reap;
pub mod scrape;
pub mod topo;

use std::net::IpAddr;

pub use msg::{QEdns, dns_query, dns_response};

/// RFC 1071 checksum, written the textbook way (big-endian words), to
/// check the kernel's incremental arithmetic against.
pub fn inet_csum(chunks: &[&[u8]]) -> u16 {
    let mut all = Vec::new();
    for c in chunks {
        all.extend_from_slice(c);
    }
    if all.len() % 2 == 1 {
        all.push(0);
    }
    let mut sum: u32 = 0;
    for w in all.chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// Knobs for an Ethernet/IPv4 or IPv6 frame around a payload.
#[derive(Clone)]
pub struct FrameSpec {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// IPv4 only.
    pub ip_options: Vec<u8>,
    /// IPv4 only: flags and fragment offset.
    pub frag: u16,
    pub ethertype: u16,
    /// IPv6 only: a hop-by-hop options header before UDP.
    pub hop_by_hop: bool,
}

impl FrameSpec {
    /// A client -> node datagram; the family follows the addresses.
    pub fn udp(src: impl Into<IpAddr>, dst: impl Into<IpAddr>, sport: u16, dport: u16) -> Self {
        let dst = dst.into();
        FrameSpec {
            src: src.into(),
            dst,
            src_mac: CLIENT_MAC,
            dst_mac: NODE_MAC,
            sport,
            dport,
            proto: 17,
            ip_options: Vec::new(),
            frag: 0x4000,
            ethertype: if dst.is_ipv6() { 0x86dd } else { 0x0800 },
            hop_by_hop: false,
        }
    }

    /// The reply's frame spec: addresses, ports and MACs swapped.
    pub fn reversed(&self) -> Self {
        FrameSpec {
            src: self.dst,
            dst: self.src,
            src_mac: self.dst_mac,
            dst_mac: self.src_mac,
            sport: self.dport,
            dport: self.sport,
            ..self.clone()
        }
    }

    /// The frame: Ethernet, IPv4 or IPv6, UDP (or raw L4 bytes when
    /// `proto` is not UDP), with correct checksums computed the textbook
    /// way.
    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&self.ethertype.to_be_bytes());
        let l4 = if self.proto == 17 {
            udp_segment(self.src, self.dst, self.sport, self.dport, payload)
        } else {
            payload.to_vec()
        };
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let ihl = 5 + self.ip_options.len() / 4;
                let tot = ihl * 4 + l4.len();
                let mut ip = vec![(4 << 4) | ihl as u8, 0];
                ip.extend_from_slice(&(tot as u16).to_be_bytes());
                ip.extend_from_slice(&0x1234u16.to_be_bytes());
                ip.extend_from_slice(&self.frag.to_be_bytes());
                ip.extend_from_slice(&[64, self.proto, 0, 0]);
                ip.extend_from_slice(&src.octets());
                ip.extend_from_slice(&dst.octets());
                ip.extend_from_slice(&self.ip_options);
                let c = inet_csum(&[&ip]);
                ip[10..12].copy_from_slice(&c.to_be_bytes());
                f.extend_from_slice(&ip);
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let ext = if self.hop_by_hop { 8 } else { 0 };
                let next = if self.hop_by_hop { 0 } else { self.proto };
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&((l4.len() + ext) as u16).to_be_bytes());
                f.extend_from_slice(&[next, 64]);
                f.extend_from_slice(&src.octets());
                f.extend_from_slice(&dst.octets());
                if self.hop_by_hop {
                    // Next header, length 0 (8 bytes), PadN.
                    f.extend_from_slice(&[self.proto, 0, 1, 4, 0, 0, 0, 0]);
                }
            }
            _ => panic!("mixed address families"),
        }
        f.extend_from_slice(&l4);
        f
    }
}

/// UDP header + payload with the checksum over the pseudo-header (IPv4 or
/// IPv6, RFC 768 / RFC 8200 §8.1).
pub fn udp_segment(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, 17]);
            pseudo.extend_from_slice(&len.to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&u32::from(len).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 17]);
        }
        _ => panic!("mixed address families"),
    }
    let mut c = inet_csum(&[&pseudo, &u]);
    if c == 0 {
        c = 0xffff;
    }
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

/// True when running as root (needed for BPF and namespaces).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Durations (ns, sorted) of `runs` single BPF_PROG_TEST_RUN invocations of
/// `prog` on `frame`, each asserted to return `want`. Single runs because a
/// program that rewrites the packet cannot be timed with `repeat`: the next
/// repetition would see its own output.
pub fn single_run_ns(prog: &aya::programs::Xdp, frame: &[u8], runs: usize, want: u32) -> Vec<u64> {
    use aya::programs::{TestRun, TestRunOptions};
    let mut ns: Vec<u64> = (0..runs)
        .map(|_| {
            let mut out = vec![0u8; 512];
            let opts = TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            };
            let r = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
            assert_eq!(r.return_value, want, "unexpected XDP action");
            r.duration.as_nanos() as u64
        })
        .collect();
    ns.sort_unstable();
    ns
}
