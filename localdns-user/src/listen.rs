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

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Notify, mpsc, watch};

use crate::resolver::{Resolver, Transport};

/// TCP connections idle this long are closed (RFC 7766 suggests seconds).
const TCP_IDLE: Duration = Duration::from_secs(10);
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
    t.set_nonblocking(true).map_err(|e| err("tcp", e))?;
    t.bind(&addr.into()).map_err(|e| err("tcp", e))?;
    t.listen(1024).map_err(|e| err("tcp", e))?;
    let tcp = TcpListener::from_std(t.into()).map_err(|e| err("tcp", e))?;
    Ok((udp, tcp))
}

/// SO_RCVBUFFORCE (root only): a buffer beyond net.core.rmem_max.
fn rcvbuf_force(s: &socket2::Socket, size: usize) -> bool {
    use std::os::fd::AsRawFd;
    let v = size as libc::c_int;
    // SAFETY: setsockopt on an open socket with a correctly sized int.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
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

/// What every serving task shares: the resolver, the stop signal and the
/// in-flight count.
#[derive(Clone)]
pub struct Ctx {
    pub res: Arc<Resolver>,
    pub stop: watch::Receiver<bool>,
    pub inflight: Arc<InFlight>,
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
    let parsed = match ctx.res.answer_cached(view, raw) {
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
            Ok((stream, peer)) => {
                tokio::spawn(tcp_conn(stream, peer, view, ctx.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "tcp accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One client connection: queries are answered concurrently and written
/// back as they complete (pipelining, RFC 7766 §6.2.1.1). On stop, no more
/// queries are read; those read are answered, then the connection closes.
async fn tcp_conn(stream: TcpStream, peer: SocketAddr, view: u8, ctx: Ctx) {
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
            r = tokio::time::timeout(TCP_IDLE, rd.read_exact(&mut len)) => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        match read {
            Ok(Ok(_)) => {}
            _ => break,
        }
        let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
        match tokio::time::timeout(TCP_IDLE, rd.read_exact(&mut msg)).await {
            Ok(Ok(_)) => {}
            _ => break,
        }
        let (tx, res, guard) = (tx.clone(), ctx.res.clone(), ctx.inflight.enter());
        tokio::spawn(async move {
            if let Some(out) = res.handle(view, &msg, peer, Transport::Tcp).await {
                let _ = tx.send(out).await;
            }
            drop(guard);
        });
    }
    drop(tx);
    let _ = writer.await;
}
