//! Shared helpers of the localdns integration tests: packet and message
//! builders with independent (reference) checksums, and guards that build
//! and always tear down network namespaces and processes.

pub mod fake;
pub mod load;
pub mod msg;
pub mod netns;
pub mod topo;

use std::net::Ipv4Addr;

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

/// Knobs for an Ethernet/IPv4 frame around a payload.
#[derive(Clone)]
pub struct FrameSpec {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub ip_options: Vec<u8>,
    pub frag: u16,
    pub ethertype: u16,
}

impl FrameSpec {
    pub fn udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Self {
        FrameSpec {
            src,
            dst,
            sport,
            dport,
            proto: 17,
            ip_options: Vec::new(),
            frag: 0x4000,
            ethertype: 0x0800,
        }
    }

    /// The frame: Ethernet (client -> node), IPv4, UDP (or raw L4 bytes when
    /// `proto` is not UDP), with correct checksums.
    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&NODE_MAC);
        f.extend_from_slice(&CLIENT_MAC);
        f.extend_from_slice(&self.ethertype.to_be_bytes());
        let ihl = 5 + self.ip_options.len() / 4;
        let l4_len = if self.proto == 17 {
            8 + payload.len()
        } else {
            payload.len()
        };
        let tot = ihl * 4 + l4_len;
        let mut ip = vec![(4 << 4) | ihl as u8, 0];
        ip.extend_from_slice(&(tot as u16).to_be_bytes());
        ip.extend_from_slice(&0x1234u16.to_be_bytes());
        ip.extend_from_slice(&self.frag.to_be_bytes());
        ip.extend_from_slice(&[64, self.proto, 0, 0]);
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        ip.extend_from_slice(&self.ip_options);
        let c = inet_csum(&[&ip]);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        if self.proto == 17 {
            f.extend_from_slice(&udp_segment(
                self.src, self.dst, self.sport, self.dport, payload,
            ));
        } else {
            f.extend_from_slice(payload);
        }
        f
    }
}

/// UDP header + payload with the checksum over the pseudo-header.
pub fn udp_segment(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&len.to_be_bytes());
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
