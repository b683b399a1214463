//! Forwarding to upstream servers, in the manner of CoreDNS `forward`.
//!
//! - One query tries upstreams in the zone's policy order (healthy ones
//!   first), one second per try, until it has an answer or its 3 s budget
//!   is spent: a lost UDP datagram is retransmitted, a dead upstream is
//!   passed over.
//! - UDP: a fresh socket (random port and ID) per try; retried over TCP
//!   when the reply is truncated (PreferUDP).
//! - TCP: one persistent connection per upstream carrying pipelined queries
//!   (RFC 7766), matched by ID. Keepalive and `TCP_USER_TIMEOUT` make the
//!   kernel abort a connection whose packets vanish (a CoreDNS pod gone
//!   behind the service IP, no RST); a try that times out kills the
//!   connection too; either way the next try opens a new one. Idle
//!   connections close after 10 s.
//! - Health: an upstream failing twice in a row is marked down and probed
//!   with `. IN NS` every 0.5 s until it answers.
//! - Every reply must match the query (ID, question) and decode completely
//!   ([`crate::validate`]); a malformed one fails the try.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{Notify, Semaphore, TryAcquireError, mpsc, oneshot};
use tokio::time::Instant;

use crate::cache::mono_ns;
use crate::config::{Policy, Protocol};
use crate::metrics::metrics;
use crate::validate;
use crate::wire::{self, F_TC, Query};

/// Time allowed for one try at one upstream.
pub const TRY_TIMEOUT: Duration = Duration::from_millis(1000);
/// Time allowed for the whole exchange over all tries and upstreams.
pub const TOTAL_TIMEOUT: Duration = Duration::from_millis(3000);
/// Consecutive failures that mark an upstream down (CoreDNS `max_fails`).
const MAX_FAILS: u32 = 2;
/// Health-check interval of an upstream marked down.
const HEALTH_CHECK_EVERY: Duration = Duration::from_millis(500);
/// Idle persistent connections close after this (CoreDNS `expire`).
pub const TCP_EXPIRE: Duration = Duration::from_secs(10);
/// Unacknowledged data older than this aborts a connection.
const TCP_USER_TIMEOUT: Duration = Duration::from_millis(1000);
/// Keepalive on idle connections: first probe, interval, count.
const KEEPALIVE: (Duration, Duration, u32) = (Duration::from_secs(5), Duration::from_secs(1), 2);

#[derive(Debug, Error)]
pub enum ForwardError {
    #[error("no upstream configured")]
    NoUpstream,
    #[error("more than {limit} queries in flight for this zone")]
    Overloaded { limit: u32 },
    #[error("upstream {addr} timed out")]
    Timeout { addr: SocketAddr },
    #[error("upstream {addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("upstream {addr} closed the connection")]
    Closed { addr: SocketAddr },
    #[error("upstream {addr} sent a malformed reply: {source}")]
    Malformed {
        addr: SocketAddr,
        #[source]
        source: validate::Malformed,
    },
    #[error("all upstreams failed; last error: {last}")]
    AllFailed { last: Box<ForwardError> },
    #[error("upstream fetch aborted: {0}")]
    Aborted(String),
    #[error("forwarding loop detected for zone {zone}: not forwarded")]
    Loop { zone: &'static str },
}

impl ForwardError {
    /// The malformed reply behind this error, if that is what it is.
    pub fn is_malformed(&self) -> bool {
        match self {
            ForwardError::Malformed { .. } => true,
            ForwardError::AllFailed { last } => last.is_malformed(),
            _ => false,
        }
    }
}

/// One upstream server: its health and its TCP connection.
pub struct Upstream {
    pub addr: SocketAddr,
    /// `to` label of the forward metrics.
    label: &'static str,
    conn: tokio::sync::Mutex<Option<Arc<TcpConn>>>,
    fails: AtomicU32,
    down: AtomicBool,
    /// Queries sent to this upstream (for tests and metrics).
    pub sent: AtomicU64,
    /// Health checks that got no answer.
    pub health_failures: AtomicU64,
}

impl Upstream {
    pub fn new(addr: SocketAddr) -> Arc<Self> {
        Arc::new(Upstream {
            addr,
            label: crate::metrics::intern(&addr.to_string()),
            conn: tokio::sync::Mutex::new(None),
            fails: AtomicU32::new(0),
            down: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            health_failures: AtomicU64::new(0),
        })
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Counts a try's outcome; the second failure in a row marks the
    /// upstream down and starts its health checks.
    fn record(self: &Arc<Self>, ok: bool, proto: Protocol) {
        if ok {
            self.fails.store(0, Ordering::Relaxed);
            return;
        }
        let n = self.fails.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= MAX_FAILS && !self.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(upstream = %self.addr, "upstream marked down after {n} failures; health-checking it");
            let me = self.clone();
            tokio::spawn(async move { me.health_check(proto).await });
        }
    }

    /// `. IN NS` every 0.5 s until any answer comes back.
    async fn health_check(self: Arc<Self>, proto: Protocol) {
        let probe = wire::parse_query(&wire::probe_query()).expect("static probe parses");
        loop {
            tokio::time::sleep(HEALTH_CHECK_EVERY).await;
            let deadline = Instant::now() + TRY_TIMEOUT;
            match self.exchange(&probe, proto, deadline).await {
                Ok(_) => {
                    self.fails.store(0, Ordering::Relaxed);
                    self.down.store(false, Ordering::Relaxed);
                    tracing::info!(upstream = %self.addr, "upstream healthy again");
                    return;
                }
                Err(e) => {
                    self.health_failures.fetch_add(1, Ordering::Relaxed);
                    metrics()
                        .fwd_health_failures
                        .get_or_create(&crate::metrics::ToLabels { to: self.label })
                        .inc();
                    tracing::debug!(upstream = %self.addr, error = %e, "health check failed");
                }
            }
        }
    }

    /// One try with this upstream before `deadline`: `q` is sent with a
    /// fresh ID and the matching, well-formed reply returned.
    pub async fn exchange(
        &self,
        q: &Query,
        proto: Protocol,
        deadline: Instant,
    ) -> Result<Vec<u8>, ForwardError> {
        self.sent.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let r = match proto {
            Protocol::ForceTcp => self.exchange_tcp(q, deadline).await,
            Protocol::PreferUdp => match self.exchange_udp(q, deadline).await {
                Ok(r) if wire::be16(&r, 2) & F_TC != 0 => self.exchange_tcp(q, deadline).await,
                other => other,
            },
        };
        metrics().forwarded(
            self.label,
            r.as_ref().ok().map(|r| u16::from(r[3] & 0xf)),
            started.elapsed(),
        );
        let r = r?;
        validate::upstream_reply(&r).map_err(|source| ForwardError::Malformed {
            addr: self.addr,
            source,
        })
    }

    async fn exchange_udp(&self, q: &Query, deadline: Instant) -> Result<Vec<u8>, ForwardError> {
        let addr = self.addr;
        let io = |source| ForwardError::Io { addr, source };
        let bind: SocketAddr = if addr.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let sock = UdpSocket::bind(bind).await.map_err(io)?;
        sock.connect(addr).await.map_err(io)?;
        let id: u16 = rand::rng().random();
        sock.send(&wire::upstream_query(q, id)).await.map_err(io)?;
        // We advertise OUR_UDP_SIZE, so a larger datagram is not an answer
        // we asked for. A small buffer per exchange, not 64 KiB: allocating
        // and freeing those per query made glibc consolidate its heap each
        // time, slower and slower as the cache filled it.
        let mut buf = [0u8; 4096];
        loop {
            let n = match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                Err(_) => return Err(ForwardError::Timeout { addr }),
                Ok(r) => r.map_err(io)?,
            };
            // Anything that does not answer our question is ignored.
            if wire::response_matches(&buf[..n], q, id) {
                return Ok(buf[..n].to_vec());
            }
        }
    }

    async fn exchange_tcp(&self, q: &Query, deadline: Instant) -> Result<Vec<u8>, ForwardError> {
        let addr = self.addr;
        // A connection that dies under the query gets one fresh retry.
        for attempt in 0..2 {
            let conn = self.tcp_conn(deadline).await?;
            match tokio::time::timeout_at(deadline, conn.query(q)).await {
                Err(_) => {
                    // No answer in time: the connection may be dead without
                    // knowing it. The next try opens a new one.
                    conn.kill();
                    return Err(ForwardError::Timeout { addr });
                }
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(ForwardError::Closed { .. })) if attempt == 0 => continue,
                Ok(Err(e)) => return Err(e),
            }
        }
        Err(ForwardError::Closed { addr })
    }

    /// The live connection, or a new one.
    async fn tcp_conn(&self, deadline: Instant) -> Result<Arc<TcpConn>, ForwardError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref()
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        let c = match tokio::time::timeout_at(deadline, TcpConn::connect(self.addr)).await {
            Err(_) => return Err(ForwardError::Timeout { addr: self.addr }),
            Ok(r) => r?,
        };
        *slot = Some(c.clone());
        Ok(c)
    }
}

type Pending = Arc<Mutex<HashMap<u16, (Query, oneshot::Sender<Vec<u8>>)>>>;

/// A persistent, pipelined TCP connection to one upstream.
struct TcpConn {
    addr: SocketAddr,
    tx: mpsc::Sender<Vec<u8>>,
    pending: Pending,
    closed: Arc<AtomicBool>,
    kill: Arc<Notify>,
}

/// Socket options of an upstream connection: no Nagle, keepalive, and
/// `TCP_USER_TIMEOUT` so a silent peer is given up on within a second.
fn tune(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let s = socket2::SockRef::from(stream);
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE.0)
        .with_interval(KEEPALIVE.1)
        .with_retries(KEEPALIVE.2);
    s.set_tcp_keepalive(&ka)?;
    s.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT))
}

impl TcpConn {
    async fn connect(addr: SocketAddr) -> Result<Arc<Self>, ForwardError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| ForwardError::Io { addr, source })?;
        if let Err(e) = tune(&stream) {
            tracing::debug!(upstream = %addr, error = %e, "tcp socket options");
        }
        let (mut rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(1024);
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let closed = Arc::new(AtomicBool::new(false));
        let kill = Arc::new(Notify::new());
        let conn = Arc::new(TcpConn {
            addr,
            tx,
            pending: pending.clone(),
            closed: closed.clone(),
            kill: kill.clone(),
        });
        let wclosed = closed.clone();
        tokio::spawn(async move {
            // Pipelined queries waiting together go out in one write.
            let mut batch = Vec::with_capacity(4096);
            while let Some(frame) = rx.recv().await {
                batch.clear();
                batch.extend_from_slice(&frame);
                while batch.len() < 60_000 {
                    match rx.try_recv() {
                        Ok(f) => batch.extend_from_slice(&f),
                        Err(_) => break,
                    }
                }
                if wr.write_all(&batch).await.is_err() {
                    break;
                }
            }
            wclosed.store(true, Ordering::Relaxed);
        });
        tokio::spawn(async move {
            let mut len = [0u8; 2];
            loop {
                let read = tokio::select! {
                    r = tokio::time::timeout(TCP_EXPIRE, rd.read_exact(&mut len)) => r,
                    _ = kill.notified() => break,
                };
                match read {
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) => break,
                    // Quiet for the expiry time: close once nothing waits.
                    Err(_) => {
                        if pending.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
                            break;
                        }
                        continue;
                    }
                }
                let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
                if rd.read_exact(&mut msg).await.is_err() {
                    break;
                }
                if msg.len() < wire::HEADER_LEN {
                    continue;
                }
                let id = wire::be16(&msg, 0);
                let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((q, _)) = p.get(&id)
                    && wire::response_matches(&msg, q, id)
                    && let Some((_, tx)) = p.remove(&id)
                {
                    let _ = tx.send(msg);
                }
            }
            closed.store(true, Ordering::Relaxed);
            // Dropping the senders fails every query still waiting, so they
            // retry on a new connection at once.
            pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
        });
        Ok(conn)
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Closes the connection: new queries go to a new one.
    fn kill(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.kill.notify_one();
    }

    async fn query(&self, q: &Query) -> Result<Vec<u8>, ForwardError> {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let mut rng = rand::rng();
            let mut id: u16 = rng.random();
            for _ in 0..64 {
                if !p.contains_key(&id) {
                    break;
                }
                id = rng.random();
            }
            if p.contains_key(&id) {
                return Err(ForwardError::Closed { addr: self.addr });
            }
            p.insert(id, (q.clone(), tx));
            id
        };
        let msg = wire::upstream_query(q, id);
        let mut frame = Vec::with_capacity(msg.len() + 2);
        frame.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        frame.extend_from_slice(&msg);
        let guard = PendingGuard {
            pending: &self.pending,
            id,
        };
        if self.tx.send(frame).await.is_err() {
            return Err(ForwardError::Closed { addr: self.addr });
        }
        let r = rx
            .await
            .map_err(|_| ForwardError::Closed { addr: self.addr });
        drop(guard);
        r
    }
}

/// Removes a pending ID when its query is abandoned (timeout, cancel).
struct PendingGuard<'a> {
    pending: &'a Pending,
    id: u16,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// The upstreams of one zone with its policy, protocol and concurrency cap.
pub struct Forwarder {
    pub upstreams: Vec<Arc<Upstream>>,
    pub policy: Policy,
    pub protocol: Protocol,
    max_concurrent: u32,
    permits: Arc<Semaphore>,
    next: AtomicUsize,
}

impl Forwarder {
    pub fn new(
        upstreams: Vec<Arc<Upstream>>,
        policy: Policy,
        protocol: Protocol,
        max_concurrent: u32,
    ) -> Self {
        Forwarder {
            upstreams,
            policy,
            protocol,
            max_concurrent,
            permits: Arc::new(Semaphore::new(max_concurrent as usize)),
            next: AtomicUsize::new(0),
        }
    }

    /// The order in which upstreams are tried for one query: healthy ones
    /// by policy, then those marked down as a last resort.
    fn order(&self) -> Vec<Arc<Upstream>> {
        let n = self.upstreams.len();
        let start = match self.policy {
            Policy::Sequential => 0,
            Policy::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % n.max(1),
            Policy::Random => rand::rng().random_range(0..n.max(1)),
        };
        let rotated = (0..n).map(|i| self.upstreams[(start + i) % n].clone());
        let (mut good, bad): (Vec<_>, Vec<_>) = rotated.partition(|u| !u.is_down());
        good.extend(bad);
        good
    }

    /// Resolves `q` upstream: REFUSED-worthy [`ForwardError::Overloaded`] at
    /// once beyond maxConcurrent, otherwise the first good reply of tries
    /// going round the upstreams (one second each) within the budget.
    pub async fn resolve(&self, q: &Query) -> Result<Vec<u8>, ForwardError> {
        let _permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(TryAcquireError::NoPermits) | Err(TryAcquireError::Closed) => {
                return Err(ForwardError::Overloaded {
                    limit: self.max_concurrent,
                });
            }
        };
        if self.upstreams.is_empty() {
            return Err(ForwardError::NoUpstream);
        }
        let order = self.order();
        if order.iter().all(|u| u.is_down()) {
            // CoreDNS counts a forward with every upstream down as "broken".
            metrics().fwd_health_broken.inc();
        }
        let end = Instant::now() + TOTAL_TIMEOUT;
        let mut last = None;
        // Upstreams that sent garbage are not asked again for this query.
        let mut spoiled = vec![false; order.len()];
        let mut i = 0;
        while Instant::now() < end && spoiled.iter().any(|s| !s) {
            let k = i % order.len();
            i += 1;
            if spoiled[k] {
                continue;
            }
            let u = &order[k];
            let deadline = (Instant::now() + TRY_TIMEOUT).min(end);
            let started = mono_ns();
            match u.exchange(q, self.protocol, deadline).await {
                Ok(r) => {
                    u.record(true, self.protocol);
                    return Ok(r);
                }
                Err(e) => {
                    u.record(false, self.protocol);
                    spoiled[k] = e.is_malformed();
                    tracing::debug!(upstream = %u.addr, error = %e, ms = (mono_ns() - started) / 1_000_000, "upstream try failed");
                    // A fast failure (refused, reset) leaves time: wait a
                    // moment rather than spin over the same upstreams.
                    if mono_ns() - started < 20_000_000 && order.len() == 1 {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    last = Some(e);
                }
            }
        }
        Err(ForwardError::AllFailed {
            last: Box::new(last.unwrap_or(ForwardError::Timeout {
                addr: order[0].addr,
            })),
        })
    }
}
