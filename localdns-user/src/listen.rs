//! UDP and TCP listeners on the listener addresses, and the hand-over to a
//! successor without losing a query.
//!
//! Every socket is bound with SO_REUSEPORT, so a new instance can bind next
//! to a running one (a DaemonSet rolling update with `maxSurge: 1`, or a
//! restart). On stop, each UDP socket leaves the reuseport group by
//! connecting to a local address nobody sends from (the kernel no longer
//! picks connected sockets for other peers' datagrams), answers what is
//! already queued on it, and every query in flight is finished before the
//! process exits. Pending TCP connections move to the successor's listener
//! (`net.ipv4.tcp_migrate_req`, set at start); open ones finish their
//! in-flight queries and are closed.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Notify, Semaphore, mpsc, watch};

use crate::resolver::{Resolver, Transport};

/// Queries one TCP connection may have in flight; reading pauses beyond.
const TCP_PIPELINE: usize = 32;
/// After leaving the reuseport group, a socket is read until it has been
/// quiet this long (datagrams already past the socket lookup still land).
const DRAIN_QUIET: Duration = Duration::from_millis(50);

#[derive(Debug, Error)]
pub enum ListenError {
    #[error("binding {proto} {addr}: {source}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Receive buffer per UDP socket: room for bursts while a core is busy.
const UDP_RCVBUF: usize = 4 << 20;

/// One UDP socket per core on `addr` (SO_REUSEPORT spreads clients across
/// them) and one TCP listener, all in the address's reuseport groups.
pub fn bind(
    addr: SocketAddr,
    udp_sockets: usize,
) -> Result<(Vec<UdpSocket>, TcpListener), ListenError> {
    let err = |proto, source| ListenError::Bind {
        proto,
        addr,
        source,
    };
    let mut udp = Vec::new();
    for _ in 0..udp_sockets.max(1) {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::DGRAM,
            None,
        )
        .map_err(|e| err("udp", e))?;
        s.set_reuse_port(true).map_err(|e| err("udp", e))?;
        freebind(&s, addr);
        // Root may exceed net.core.rmem_max; otherwise take what is allowed.
        if !rcvbuf_force(&s, UDP_RCVBUF) {
            let _ = s.set_recv_buffer_size(UDP_RCVBUF);
        }
        s.set_nonblocking(true).map_err(|e| err("udp", e))?;
        s.bind(&addr.into()).map_err(|e| err("udp", e))?;
        udp.push(UdpSocket::from_std(s.into()).map_err(|e| err("udp", e))?);
    }
    let t = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .map_err(|e| err("tcp", e))?;
    t.set_reuse_address(true).map_err(|e| err("tcp", e))?;
    t.set_reuse_port(true).map_err(|e| err("tcp", e))?;
    freebind(&t, addr);
    t.set_nonblocking(true).map_err(|e| err("tcp", e))?;
    t.bind(&addr.into()).map_err(|e| err("tcp", e))?;
    t.listen(1024).map_err(|e| err("tcp", e))?;
    let tcp = TcpListener::from_std(t.into()).map_err(|e| err("tcp", e))?;
    Ok((udp, tcp))
}

/// Lets a socket bind an address that is not (yet) usable: an IPv6
/// address still in duplicate address detection, or one an operator adds
/// later. Best effort.
fn freebind(s: &socket2::Socket, addr: SocketAddr) {
    let _ = if addr.is_ipv6() {
        s.set_freebind_v6(true)
    } else {
        s.set_freebind_v4(true)
    };
}

/// SO_RCVBUFFORCE (CAP_NET_ADMIN): a buffer beyond net.core.rmem_max.
fn rcvbuf_force(s: &socket2::Socket, size: usize) -> bool {
    rustix::net::sockopt::set_socket_recv_buffer_size_force(s, size).is_ok()
}

/// Lets a closing TCP listener hand its not-yet-accepted connections to
/// another listener of its reuseport group (Linux >= 5.14) instead of
/// resetting them. Per network namespace; best effort.
pub fn enable_tcp_migration() {
    const PATH: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
    match std::fs::read_to_string(PATH) {
        Ok(v) if v.trim() == "1" => {}
        Ok(_) => match std::fs::write(PATH, "1") {
            Ok(()) => tracing::info!(
                "set net.ipv4.tcp_migrate_req=1: pending TCP connections move to a successor on restart"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot set net.ipv4.tcp_migrate_req"),
        },
        Err(_) => tracing::info!(
            "kernel without net.ipv4.tcp_migrate_req: pending TCP connections are reset on restart"
        ),
    }
}

/// Queries being answered, so a stopping daemon can wait for them.
#[derive(Default)]
pub struct InFlight {
    n: AtomicUsize,
    idle: Notify,
}

/// Held while a query is answered.
pub struct InFlightGuard(Arc<InFlight>);

impl InFlight {
    pub fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.n.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(self.clone())
    }

    pub fn count(&self) -> usize {
        self.n.load(Ordering::Acquire)
    }

    /// Waits until no query is in flight, at most `limit`; true if idle.
    pub async fn wait_idle(&self, limit: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.idle.notified();
                if self.count() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.n.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Bounds on TCP client connections, over all listener addresses: a
/// client (one source address: a pod) may hold `per_client`, all clients
/// together `total`. A connection over either bound is closed at once.
pub struct TcpLimits {
    pub total: usize,
    pub per_client: usize,
    /// A connection with no query for this long is closed (RFC 7766 §6.2.3
    /// suggests seconds; CoreDNS uses 10 s).
    pub idle: Duration,
    open: Mutex<HashMap<IpAddr, usize>>,
    count: AtomicUsize,
    /// Connections closed at accept because of a bound.
    pub refused: AtomicU64,
}

/// One admitted connection; gives its place back on drop.
pub struct TcpSlot {
    limits: Arc<TcpLimits>,
    client: IpAddr,
}

impl TcpLimits {
    pub fn new(total: usize, per_client: usize, idle: Duration) -> Arc<TcpLimits> {
        Arc::new(TcpLimits {
            total,
            per_client,
            idle,
            open: Mutex::new(HashMap::new()),
            count: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// A slot for a connection from `client`, if both bounds allow it.
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Option<TcpSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let mine = open.entry(client).or_insert(0);
        if *mine >= self.per_client || self.count.load(Ordering::Relaxed) >= self.total {
            if *mine == 0 {
                open.remove(&client);
            }
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *mine += 1;
        self.count.fetch_add(1, Ordering::Relaxed);
        Some(TcpSlot {
            limits: self.clone(),
            client,
        })
    }

    /// Open client connections.
    pub fn open(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

impl Drop for TcpSlot {
    fn drop(&mut self) {
        let l = &self.limits;
        let mut open = l.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.client);
            }
        }
        l.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What every serving task shares: the resolver, the stop signal, the
/// in-flight count and the TCP client bounds.
#[derive(Clone)]
pub struct Ctx {
    pub res: Arc<Resolver>,
    pub stop: watch::Receiver<bool>,
    pub inflight: Arc<InFlight>,
    pub tcp: Arc<TcpLimits>,
}

/// Takes a bound UDP socket out of its reuseport group: a connected socket
/// only receives from its peer, and the kernel does not pick it for other
/// peers' datagrams. Datagrams already queued stay readable, and replies
/// can still be sent to any address.
fn leave_group(sock: &UdpSocket) -> std::io::Result<()> {
    let local = sock.local_addr()?;
    // Port 9 (discard) of our own address: nothing sends from there.
    let s = socket2::SockRef::from(sock);
    s.connect(&SocketAddr::new(local.ip(), 9).into())
}

pub async fn serve_udp(sock: UdpSocket, view: u8, ctx: Ctx) {
    let sock = Arc::new(sock);
    let mut buf = vec![0u8; 65535];
    let mut stop = ctx.stop.clone();
    loop {
        let got = tokio::select! {
            r = sock.recv_from(&mut buf) => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        handle_datagram(&sock, &buf, got, view, &ctx).await;
    }
    // Hand-over: no new datagrams, answer the queued ones.
    if let Err(e) = leave_group(&sock) {
        tracing::warn!(error = %e, "leaving the reuseport group failed; closing the socket");
        return;
    }
    while let Ok(got) = tokio::time::timeout(DRAIN_QUIET, sock.recv_from(&mut buf)).await {
        handle_datagram(&sock, &buf, got, view, &ctx).await;
    }
}

async fn handle_datagram(
    sock: &Arc<UdpSocket>,
    buf: &[u8],
    got: std::io::Result<(usize, SocketAddr)>,
    view: u8,
    ctx: &Ctx,
) {
    let (n, peer) = match got {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(error = %e, "udp receive failed");
            return;
        }
    };
    let raw = &buf[..n];
    // Hits are answered inline; everything else gets its own task, with
    // the query as already parsed.
    let parsed = match ctx.res.answer_cached(view, raw, peer) {
        Ok(out) => {
            let _ = sock.send_to(&out, peer).await;
            return;
        }
        Err(parsed) => parsed,
    };
    let raw = raw.to_vec();
    let (sock, res, guard) = (sock.clone(), ctx.res.clone(), ctx.inflight.enter());
    tokio::spawn(async move {
        let out = match parsed {
            Some(q) => res.handle_parsed(view, &raw, q, peer, Transport::Udp).await,
            None => res.handle(view, &raw, peer, Transport::Udp).await,
        };
        if let Some(out) = out {
            let _ = sock.send_to(&out, peer).await;
        }
        drop(guard);
    });
}

/// Accepts connections until stopped; then the listener is closed (its
/// pending connections migrate to the successor's listener).
pub async fn serve_tcp(listener: TcpListener, view: u8, ctx: Ctx) {
    let mut stop = ctx.stop.clone();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        match accepted {
            Ok((stream, peer)) => match ctx.tcp.admit(peer.ip()) {
                Some(slot) => {
                    tokio::spawn(tcp_conn(stream, peer, view, ctx.clone(), slot));
                }
                None => {
                    crate::metrics::metrics().tcp_refused.inc();
                    tracing::debug!(client = %peer, open = ctx.tcp.open(), "tcp connection over the limits closed");
                    drop(stream);
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "tcp accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One client connection: queries are answered concurrently and written
/// back as they complete (pipelining, RFC 7766 §6.2.1.1), at most
/// [`TCP_PIPELINE`] at a time. Idle for [`TcpLimits::idle`], it is closed. On
/// stop, no more queries are read; those read are answered, then the
/// connection closes and gives back its `slot`.
async fn tcp_conn(stream: TcpStream, peer: SocketAddr, view: u8, ctx: Ctx, slot: TcpSlot) {
    let _slot = slot;
    let pipeline = Arc::new(Semaphore::new(TCP_PIPELINE));
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(64);
    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            let mut frame = Vec::with_capacity(msg.len() + 2);
            frame.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            frame.extend_from_slice(&msg);
            if wr.write_all(&frame).await.is_err() {
                break;
            }
        }
    });
    let mut stop = ctx.stop.clone();
    loop {
        let mut len = [0u8; 2];
        let read = tokio::select! {
            r = tokio::time::timeout(ctx.tcp.idle, rd.read_exact(&mut len)) => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        match read {
            Ok(Ok(_)) => {}
            _ => break,
        }
        let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
        match tokio::time::timeout(ctx.tcp.idle, rd.read_exact(&mut msg)).await {
            Ok(Ok(_)) => {}
            _ => break,
        }
        let Ok(permit) = pipeline.clone().acquire_owned().await else {
            break;
        };
        let (tx, res, guard) = (tx.clone(), ctx.res.clone(), ctx.inflight.enter());
        tokio::spawn(async move {
            if let Some(out) = res.handle(view, &msg, peer, Transport::Tcp).await {
                let _ = tx.send(out).await;
            }
            drop((guard, permit));
        });
    }
    drop(tx);
    let _ = writer.await;
}
