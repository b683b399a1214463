//! A bounded DNS load generator for survival tests: a fixed rate of UDP
//! queries from inside a network namespace, every answer checked with an
//! independent codec (hickory-proto) against the question asked and the
//! address expected, every query accounted for (answered in time, or
//! failed with the reason and when it was sent).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

use crate::netns::Netns;

/// What is asked: names whose answer is known in advance.
#[derive(Clone, Debug)]
pub enum Target {
    /// This name, always (a cached name once warmed).
    Fixed { name: String, addr: Ipv4Addr },
    /// `n<seq>.<suffix>`, a new name every time (a cache miss: the daemon
    /// must ask upstream), answered by a wildcard with `addr`.
    Unique { suffix: String, addr: Ipv4Addr },
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub server: SocketAddr,
    /// Queries per second over all targets, taken in turn.
    pub rate: u32,
    pub duration: Duration,
    /// A reply later than this is a failure.
    pub timeout: Duration,
    pub targets: Vec<Target>,
}

/// One query's fate.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Since the load started.
    pub sent_at: Duration,
    /// Index into [`Spec::targets`].
    pub target: usize,
    /// `None`: answered correctly in time; otherwise why not.
    pub failure: Option<String>,
}

#[derive(Debug, Default)]
pub struct Report {
    pub outcomes: Vec<Outcome>,
    pub started: Option<Instant>,
}

impl Report {
    pub fn sent(&self, target: impl Fn(usize) -> bool) -> usize {
        self.outcomes.iter().filter(|o| target(o.target)).count()
    }

    pub fn failed(&self, target: impl Fn(usize) -> bool) -> Vec<&Outcome> {
        self.outcomes
            .iter()
            .filter(|o| target(o.target) && o.failure.is_some())
            .collect()
    }

    /// The longest stretch of send times, among the selected targets,
    /// without a correctly answered query: from the last answered query
    /// before a run of failures to the first answered one after it.
    pub fn longest_gap(&self, target: impl Fn(usize) -> bool) -> Duration {
        let mut sel: Vec<&Outcome> = self.outcomes.iter().filter(|o| target(o.target)).collect();
        sel.sort_by_key(|o| o.sent_at);
        let mut gap = Duration::ZERO;
        let mut last_ok: Option<Duration> = None;
        let mut in_failure = false;
        for o in sel {
            match (&o.failure, in_failure) {
                (Some(_), _) => in_failure = true,
                (None, true) => {
                    if let Some(l) = last_ok {
                        gap = gap.max(o.sent_at - l);
                    }
                    in_failure = false;
                    last_ok = Some(o.sent_at);
                }
                (None, false) => last_ok = Some(o.sent_at),
            }
        }
        gap
    }

    /// A few failures, for assertion messages.
    pub fn sample(&self, target: impl Fn(usize) -> bool) -> String {
        self.failed(target)
            .iter()
            .take(5)
            .map(|o| {
                format!(
                    "{:?} t{} {}",
                    o.sent_at,
                    o.target,
                    o.failure.as_deref().unwrap_or("")
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// A load run in the background; [`Load::finish`] waits for it.
pub struct Load {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Report>>,
    pub started: Instant,
}

impl Load {
    /// Starts sending from inside `ns` (a thread that enters the namespace).
    pub fn start(ns: &Netns, spec: Spec) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (ns_name, stop2) = (ns.name.clone(), stop.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            crate::fake::enter_netns(&ns_name);
            run(&spec, &stop2, tx)
        });
        let started = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("load started");
        Load {
            stop,
            handle: Some(handle),
            started,
        }
    }

    /// Waits for the run to end (its duration, or [`Load::stop`]) and for
    /// the last replies.
    pub fn finish(mut self) -> Report {
        self.handle
            .take()
            .expect("running")
            .join()
            .expect("load thread")
    }

    /// Ends the run early (before its duration).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

const SOCKETS: usize = 16;

struct Pending {
    sent: Instant,
    target: usize,
    name: Name,
}

fn run(spec: &Spec, stop: &AtomicBool, started: std::sync::mpsc::Sender<Instant>) -> Report {
    let socks: Vec<UdpSocket> = (0..SOCKETS)
        .map(|_| {
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let t0 = Instant::now();
    let _ = started.send(t0);
    let interval = Duration::from_secs(1) / spec.rate.max(1);
    let mut pending: Vec<HashMap<u16, Pending>> = (0..SOCKETS).map(|_| HashMap::new()).collect();
    let mut outcomes = Vec::new();
    let mut next_id: u16 = 0;
    let mut seq: u64 = 0;
    let mut buf = [0u8; 4096];
    let end = t0 + spec.duration;
    let mut next_send = t0;
    loop {
        let now = Instant::now();
        let sending = now < end && !stop.load(Ordering::Relaxed);
        // Send what is due (bounded per round so receiving keeps up).
        let mut burst = 0;
        while sending && next_send <= now && burst < 64 {
            let target = (seq as usize) % spec.targets.len();
            let (name, _) = target_name(&spec.targets[target], seq);
            let sock = (seq as usize) % SOCKETS;
            let id = next_id;
            next_id = next_id.wrapping_add(1);
            let mut m = Message::new(id, MessageType::Query, OpCode::Query);
            m.metadata.recursion_desired = true;
            m.add_query(Query::query(name.clone(), RecordType::A));
            let bytes = m.to_vec().expect("encode query");
            let sent = Instant::now();
            if let Some(old) = pending[sock].insert(id, Pending { sent, target, name }) {
                outcomes.push(Outcome {
                    sent_at: old.sent - t0,
                    target: old.target,
                    failure: Some("id reused before a reply".into()),
                });
            }
            if let Err(e) = socks[sock].send_to(&bytes, spec.server) {
                let p = pending[sock].remove(&id).expect("just inserted");
                outcomes.push(Outcome {
                    sent_at: p.sent - t0,
                    target,
                    failure: Some(format!("send: {e}")),
                });
            }
            seq += 1;
            next_send += interval;
            burst += 1;
        }
        // Receive everything waiting.
        for (i, s) in socks.iter().enumerate() {
            while let Ok((n, _)) = s.recv_from(&mut buf) {
                let Ok(m) = Message::from_vec(&buf[..n]) else {
                    continue; // not even a DNS message: the query will time out
                };
                let Some(p) = pending[i].remove(&m.metadata.id) else {
                    continue; // late, already counted as a timeout
                };
                let late = p.sent.elapsed() > spec.timeout;
                let failure = if late {
                    Some(format!("late reply after {:?}", p.sent.elapsed()))
                } else {
                    check(&m, &p.name, &spec.targets[p.target])
                };
                outcomes.push(Outcome {
                    sent_at: p.sent - t0,
                    target: p.target,
                    failure,
                });
            }
        }
        // Time out what waited too long.
        for p in pending.iter_mut() {
            let expired: Vec<u16> = p
                .iter()
                .filter(|(_, q)| q.sent.elapsed() > spec.timeout)
                .map(|(id, _)| *id)
                .collect();
            for id in expired {
                let q = p.remove(&id).expect("listed");
                outcomes.push(Outcome {
                    sent_at: q.sent - t0,
                    target: q.target,
                    failure: Some("timeout".into()),
                });
            }
        }
        if !sending && pending.iter().all(|p| p.is_empty()) {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Report {
        outcomes,
        started: Some(t0),
    }
}

fn target_name(t: &Target, seq: u64) -> (Name, Ipv4Addr) {
    match t {
        Target::Fixed { name, addr } => (Name::from_ascii(name).expect("name"), *addr),
        Target::Unique { suffix, addr } => (
            Name::from_ascii(format!("n{seq}.{suffix}")).expect("name"),
            *addr,
        ),
    }
}

/// `None` when `m` is the right answer to `name`.
fn check(m: &Message, name: &Name, t: &Target) -> Option<String> {
    let want = match t {
        Target::Fixed { addr, .. } | Target::Unique { addr, .. } => *addr,
    };
    if m.metadata.response_code != ResponseCode::NoError {
        return Some(format!("rcode {}", m.metadata.response_code));
    }
    if m.queries.len() != 1 || m.queries[0].name() != name {
        return Some(format!("question {:?}", m.queries));
    }
    let got = m
        .answers
        .iter()
        .any(|r| matches!(&r.data, RData::A(a) if a.0 == want));
    if !got {
        return Some(format!("no A {want} in {:?}", m.answers));
    }
    None
}
