//! An in-process upstream DNS server for fault injection: it answers any A
//! query with a configurable address and TTL (other types: NODATA with an
//! SOA), over UDP and TCP (pipelined), and can be switched to drop queries,
//! answer SERVFAIL, answer late, or send malformed replies. Messages are
//! built with hickory-proto (`crate::msg`). Its threads enter the upstream
//! netns with setns(2) (which only moves the calling thread), so the test
//! process itself stays where it is. Stopped and joined on drop.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;

use crate::msg;
use crate::netns::Netns;

pub const MODE_NORMAL: u8 = 0;
pub const MODE_DROP: u8 = 1;
pub const MODE_SERVFAIL: u8 = 2;
/// UDP replies are empty with TC=1 (the answer only fits TCP); TCP is normal.
pub const MODE_TRUNCATE_UDP: u8 = 3;
/// The answer's RDLENGTH claims more bytes than the message has.
pub const MODE_BAD_RDATA: u8 = 4;
/// The answer's owner name is a compression pointer past the message.
pub const MODE_BAD_POINTER: u8 = 5;
/// A correct answer followed by garbage bytes.
pub const MODE_TRAILING: u8 = 6;
/// Drops the next UDP query only, then answers normally.
pub const MODE_DROP_ONE_UDP: u8 = 7;

/// What the fake does, changeable while it runs.
pub struct Ctl {
    pub mode: AtomicU8,
    pub delay_ms: AtomicU64,
    pub ttl: AtomicU32,
    /// IPv4 address in A answers (`u32::from(Ipv4Addr)`).
    pub answer: AtomicU32,
    pub udp_queries: AtomicU64,
    pub tcp_queries: AtomicU64,
}

impl Ctl {
    pub fn queries(&self) -> u64 {
        self.udp_queries.load(Ordering::Relaxed) + self.tcp_queries.load(Ordering::Relaxed)
    }
    pub fn set_answer(&self, ip: Ipv4Addr) {
        self.answer.store(u32::from(ip), Ordering::Relaxed);
    }
}

pub struct FakeUpstream {
    pub addr: Ipv4Addr,
    pub ctl: Arc<Ctl>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// Moves the calling thread (only) into network namespace `name`.
pub fn enter_netns(name: &str) {
    let f = std::fs::File::open(format!("/var/run/netns/{name}")).expect("netns file");
    // SAFETY: setns on a valid namespace fd; affects this thread only.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
}

/// The daemon's loop probe (CoreDNS `loop`: `<n>.<n>.<zone> HINFO`). The
/// fake answers it NXDOMAIN whatever its mode and does not count it, so
/// the tests' query counts and one-shot faults are about their own names.
fn is_loop_probe(q: &[u8]) -> bool {
    Message::from_vec(q).is_ok_and(|m| {
        m.queries
            .first()
            .is_some_and(|q| q.query_type() == RecordType::HINFO)
    })
}

/// The fake's reply to `q`, or `None` to stay silent.
fn reply(ctl: &Ctl, q: &[u8], udp: bool) -> Option<Vec<u8>> {
    let pq = Message::from_vec(q).ok()?;
    let question = pq.queries.first()?.clone();
    if question.query_type() == RecordType::HINFO {
        return Some(msg::dns_response(q, 3, &[], &[]));
    }
    let mode = ctl.mode.load(Ordering::Relaxed);
    if mode == MODE_DROP {
        return None;
    }
    if mode == MODE_DROP_ONE_UDP && udp {
        ctl.mode.store(MODE_NORMAL, Ordering::Relaxed);
        return None;
    }
    let ttl = ctl.ttl.load(Ordering::Relaxed);
    let owner = question.name().clone();
    let ip = ctl.answer.load(Ordering::Relaxed).to_be_bytes();
    if mode == MODE_TRUNCATE_UDP && udp {
        let mut m = msg::dns_response(q, 0, &[], &[]);
        m[2] |= 0x02; // TC
        return Some(m);
    }
    if mode == MODE_SERVFAIL {
        return Some(msg::dns_response(q, 2, &[], &[]));
    }
    let mut m = if question.query_type() == RecordType::A {
        msg::dns_response(q, 0, &[msg::a(&owner, ttl, ip)], &[])
    } else {
        let zone = owner.base_name().to_ascii();
        msg::dns_response(q, 0, &[], &[msg::soa(&zone, ttl, ttl)])
    };
    let qend = 12 + question.name().len() + 4;
    match mode {
        // The first record's owner is a 2-byte pointer, so RDLENGTH sits
        // at qend + 10.
        MODE_BAD_RDATA if m.len() > qend + 12 => {
            let l = u16::from_be_bytes([m[qend + 10], m[qend + 11]]) + 200;
            m[qend + 10..qend + 12].copy_from_slice(&l.to_be_bytes());
        }
        MODE_BAD_POINTER if m.len() > qend + 2 => {
            m[qend..qend + 2].copy_from_slice(&[0xc3, 0xff]);
        }
        MODE_TRAILING => m.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]),
        _ => {}
    }
    Some(m)
}

impl FakeUpstream {
    /// Starts serving on `addr:53` inside `ns` (the address must exist there).
    pub fn start(ns: &Netns, addr: Ipv4Addr) -> FakeUpstream {
        let ctl = Arc::new(Ctl {
            mode: AtomicU8::new(MODE_NORMAL),
            delay_ms: AtomicU64::new(0),
            ttl: AtomicU32::new(300),
            answer: AtomicU32::new(u32::from(Ipv4Addr::new(10, 1, 1, 1))),
            udp_queries: AtomicU64::new(0),
            tcp_queries: AtomicU64::new(0),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        let sa = SocketAddr::from((addr, 53));
        {
            let (ns, ctl, stop, ready) =
                (ns.name.clone(), ctl.clone(), stop.clone(), ready_tx.clone());
            threads.push(std::thread::spawn(move || {
                enter_netns(&ns);
                let sock = Arc::new(UdpSocket::bind(sa).expect("fake udp bind"));
                sock.set_read_timeout(Some(Duration::from_millis(50)))
                    .unwrap();
                ready.send(()).unwrap();
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    if !is_loop_probe(&buf[..n]) {
                        ctl.udp_queries.fetch_add(1, Ordering::Relaxed);
                    }
                    let Some(r) = reply(&ctl, &buf[..n], true) else {
                        continue;
                    };
                    let delay = ctl.delay_ms.load(Ordering::Relaxed);
                    if delay == 0 {
                        let _ = sock.send_to(&r, peer);
                    } else {
                        let sock = sock.clone();
                        std::thread::spawn(move || {
                            std::thread::sleep(Duration::from_millis(delay));
                            let _ = sock.send_to(&r, peer);
                        });
                    }
                }
            }));
        }
        {
            let (ns, ctl, stop, ready) = (ns.name.clone(), ctl.clone(), stop.clone(), ready_tx);
            threads.push(std::thread::spawn(move || {
                enter_netns(&ns);
                let l = TcpListener::bind(sa).expect("fake tcp bind");
                l.set_nonblocking(true).unwrap();
                ready.send(()).unwrap();
                let mut conns = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((s, _)) => {
                            let (ctl, stop) = (ctl.clone(), stop.clone());
                            conns.push(std::thread::spawn(move || tcp_conn(s, &ctl, &stop)));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
                for c in conns {
                    let _ = c.join();
                }
            }));
        }
        for _ in 0..2 {
            ready_rx
                .recv_timeout(Duration::from_secs(5))
                .expect("fake upstream did not start");
        }
        FakeUpstream {
            addr,
            ctl,
            stop,
            threads,
        }
    }
}

fn tcp_conn(s: TcpStream, ctl: &Ctl, stop: &AtomicBool) {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let w = Arc::new(Mutex::new(s.try_clone().unwrap()));
    let mut r = s;
    let mut len = [0u8; 2];
    while !stop.load(Ordering::Relaxed) {
        match r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => return,
        }
        let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
        r.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        if r.read_exact(&mut msg).is_err() {
            return;
        }
        r.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        if !is_loop_probe(&msg) {
            ctl.tcp_queries.fetch_add(1, Ordering::Relaxed);
        }
        let Some(resp) = reply(ctl, &msg, false) else {
            continue;
        };
        let mut frame = (resp.len() as u16).to_be_bytes().to_vec();
        frame.extend_from_slice(&resp);
        let delay = ctl.delay_ms.load(Ordering::Relaxed);
        let w = w.clone();
        let send = move || {
            let _ = w.lock().unwrap().write_all(&frame);
        };
        if delay == 0 {
            send();
        } else {
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(delay));
                send();
            });
        }
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
