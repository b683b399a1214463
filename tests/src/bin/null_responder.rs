//! Benchmark ceiling: attaches the `localdns_null` XDP program (which turns
//! every UDP/53 query to a listener address straight around) to an
//! interface in generic mode and holds it until SIGTERM/SIGINT.
//! Usage: null_responder IFACE

use std::net::Ipv4Addr;

use aya::programs::{Xdp, XdpMode};
use localdns_user::fastpath;

fn main() {
    let iface = std::env::args()
        .nth(1)
        .expect("usage: null_responder IFACE");
    let g = fastpath::Globals {
        listen: vec![
            (
                Ipv4Addr::new(169, 254, 10, 10).into(),
                localdns_common::VIEW_VNET,
            ),
            (
                Ipv4Addr::new(169, 254, 10, 11).into(),
                localdns_common::VIEW_KUBE,
            ),
        ],
        seed: 0,
        fault: 0,
    };
    let mut ebpf = fastpath::open(&g, 16, None).expect("open eBPF object");
    let p: &mut Xdp = ebpf
        .program_mut("localdns_null")
        .expect("program")
        .try_into()
        .expect("xdp");
    p.load().expect("load");
    p.attach(&iface, XdpMode::Skb).expect("attach");
    println!("null responder attached to {iface}");
    // SAFETY: plain signal-mask calls on this (only) thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
    }
    drop(ebpf);
}
