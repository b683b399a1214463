//! Benchmark ceiling: attaches the `localdns_null` XDP program (which turns
//! every UDP/53 query to a listener address straight around) to an
//! interface in generic mode and holds it until SIGTERM/SIGINT. With
//! `--floor LINES`, the `localdns_floor` program instead: the same, after
//! reading LINES cache lines of per-name memory (the floor of any cache).
//! Usage: null_responder IFACE [--floor LINES]

use std::net::Ipv4Addr;

use aya::programs::{Xdp, XdpMode};
use localdns_user::fastpath;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: null_responder IFACE [--floor LINES]";
    let iface = args.get(1).expect(usage);
    let floor: Option<u32> = match args.get(2).map(String::as_str) {
        None => None,
        Some("--floor") => Some(args.get(3).and_then(|l| l.parse().ok()).expect(usage)),
        Some(_) => panic!("{usage}"),
    };
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
    let (ebpf, prog) = match floor {
        None => (fastpath::open(&g, 16, None), "localdns_null"),
        Some(lines) => (fastpath::open_floor(&g, lines), "localdns_floor"),
    };
    let mut ebpf = ebpf.expect("open eBPF object");
    let p: &mut Xdp = ebpf
        .program_mut(prog)
        .expect("program")
        .try_into()
        .expect("xdp");
    p.load().expect("load");
    p.attach(iface, XdpMode::Skb).expect("attach");
    println!("{prog} attached to {iface}");
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
