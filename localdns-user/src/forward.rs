//! Forwarding to upstream servers. UDP: a fresh socket (random port) per
//! query, retried over TCP when the reply is truncated. TCP: one persistent
//! connection per upstream carrying pipelined queries (RFC 7766): frames are
//! length-prefixed, replies may come in any order and are matched by ID.
//! A reply is accepted only if its ID and question match what we sent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{Semaphore, TryAcquireError, mpsc, oneshot};

use crate::cache::mono_ns;
use crate::config::{Policy, Protocol};
use crate::wire::{self, F_TC, Query};

/// Time allowed for one upstream to answer one attempt.
pub const TRY_TIMEOUT: Duration = Duration::from_millis(1500);
/// Time allowed for the whole exchange over all upstreams.
pub const TOTAL_TIMEOUT: Duration = Duration::from_millis(3000);
/// An upstream with this many consecutive failures is skipped until re-probed.
const FAILS_UNHEALTHY: u32 = 2;
/// How long an unhealthy upstream is skipped before a query probes it again.
const REPROBE_NS: u64 = 2_000_000_000;

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
    #[error("all upstreams failed; last error: {last}")]
    AllFailed { last: Box<ForwardError> },
}

/// One upstream server and its TCP connection.
pub struct Upstream {
    pub addr: SocketAddr,
    conn: tokio::sync::Mutex<Option<Arc<TcpConn>>>,
    fails: AtomicU32,
    last_fail_ns: AtomicU64,
    /// Queries sent to this upstream (for tests and metrics).
    pub sent: AtomicU64,
}

impl Upstream {
    pub fn new(addr: SocketAddr) -> Arc<Self> {
        Arc::new(Upstream {
            addr,
            conn: tokio::sync::Mutex::new(None),
            fails: AtomicU32::new(0),
            last_fail_ns: AtomicU64::new(0),
            sent: AtomicU64::new(0),
        })
    }

    fn healthy(&self, now_ns: u64) -> bool {
        self.fails.load(Ordering::Relaxed) < FAILS_UNHEALTHY
            || now_ns.saturating_sub(self.last_fail_ns.load(Ordering::Relaxed)) > REPROBE_NS
    }

    fn record(&self, ok: bool) {
        if ok {
            self.fails.store(0, Ordering::Relaxed);
        } else {
            self.fails.fetch_add(1, Ordering::Relaxed);
            self.last_fail_ns.store(mono_ns(), Ordering::Relaxed);
        }
    }

    /// One exchange with this upstream: `msg` is sent with a fresh ID and the
    /// matching reply returned.
    pub async fn exchange(&self, q: &Query, proto: Protocol) -> Result<Vec<u8>, ForwardError> {
        self.sent.fetch_add(1, Ordering::Relaxed);
        match proto {
            Protocol::ForceTcp => self.exchange_tcp(q).await,
            Protocol::PreferUdp => {
                let r = self.exchange_udp(q).await?;
                if wire::be16(&r, 2) & F_TC != 0 {
                    return self.exchange_tcp(q).await;
                }
                Ok(r)
            }
        }
    }

    async fn exchange_udp(&self, q: &Query) -> Result<Vec<u8>, ForwardError> {
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
        let deadline = tokio::time::Instant::now() + TRY_TIMEOUT;
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

    async fn exchange_tcp(&self, q: &Query) -> Result<Vec<u8>, ForwardError> {
        let addr = self.addr;
        let deadline = tokio::time::Instant::now() + TRY_TIMEOUT;
        // A connection that died between queries gets one fresh retry.
        for attempt in 0..2 {
            let conn = {
                let mut slot = self.conn.lock().await;
                match slot.as_ref() {
                    Some(c) if !c.is_closed() => c.clone(),
                    _ => {
                        let c =
                            match tokio::time::timeout_at(deadline, TcpConn::connect(addr)).await {
                                Err(_) => return Err(ForwardError::Timeout { addr }),
                                Ok(r) => r?,
                            };
                        *slot = Some(c.clone());
                        c
                    }
                }
            };
            match tokio::time::timeout_at(deadline, conn.query(q)).await {
                Err(_) => return Err(ForwardError::Timeout { addr }),
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(ForwardError::Closed { .. })) if attempt == 0 => continue,
                Ok(Err(e)) => return Err(e),
            }
        }
        Err(ForwardError::Closed { addr })
    }
}

type Pending = Arc<Mutex<HashMap<u16, (Query, oneshot::Sender<Vec<u8>>)>>>;

/// A persistent, pipelined TCP connection to one upstream.
struct TcpConn {
    addr: SocketAddr,
    tx: mpsc::Sender<Vec<u8>>,
    pending: Pending,
    closed: Arc<std::sync::atomic::AtomicBool>,
}

impl TcpConn {
    async fn connect(addr: SocketAddr) -> Result<Arc<Self>, ForwardError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| ForwardError::Io { addr, source })?;
        let _ = stream.set_nodelay(true);
        let (mut rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(1024);
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conn = Arc::new(TcpConn {
            addr,
            tx,
            pending: pending.clone(),
            closed: closed.clone(),
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
                if rd.read_exact(&mut len).await.is_err() {
                    break;
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
            // Dropping the senders fails every query still waiting.
            pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
        });
        Ok(conn)
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
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
    /// by policy, then unhealthy ones as a last resort.
    fn order(&self) -> Vec<Arc<Upstream>> {
        let n = self.upstreams.len();
        let start = match self.policy {
            Policy::Sequential => 0,
            Policy::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % n.max(1),
            Policy::Random => rand::rng().random_range(0..n.max(1)),
        };
        let now = mono_ns();
        let rotated = (0..n).map(|i| self.upstreams[(start + i) % n].clone());
        let (mut good, bad): (Vec<_>, Vec<_>) = rotated.partition(|u| u.healthy(now));
        good.extend(bad);
        good
    }

    /// Resolves `q` upstream: REFUSED-worthy [`ForwardError::Overloaded`] at
    /// once beyond maxConcurrent, otherwise the first matching reply.
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
        let work = async {
            let mut last = None;
            for u in self.order() {
                match u.exchange(q, self.protocol).await {
                    Ok(r) => {
                        u.record(true);
                        return Ok(r);
                    }
                    Err(e) => {
                        u.record(false);
                        tracing::debug!(upstream = %u.addr, error = %e, "upstream attempt failed");
                        last = Some(e);
                    }
                }
            }
            Err(ForwardError::AllFailed {
                last: Box::new(last.unwrap_or(ForwardError::NoUpstream)),
            })
        };
        match tokio::time::timeout(TOTAL_TIMEOUT, work).await {
            Ok(r) => r,
            Err(_) => Err(ForwardError::AllFailed {
                last: Box::new(ForwardError::Timeout {
                    addr: self.upstreams[0].addr,
                }),
            }),
        }
    }
}
