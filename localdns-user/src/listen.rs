//! UDP and TCP listeners on the two listener addresses, plus the listener
//! address set-up (a `localdns` dummy device where the kernel has one,
//! /32 addresses on `lo` where it does not).

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

use crate::resolver::{Resolver, Transport};

/// TCP connections idle this long are closed (RFC 7766 suggests seconds).
const TCP_IDLE: Duration = Duration::from_secs(10);
const DUMMY_DEV: &str = "localdns";

#[derive(Debug, Error)]
pub enum ListenError {
    #[error("binding {proto} {addr}: {source}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("running ip(8): {source}")]
    IpSpawn {
        #[source]
        source: std::io::Error,
    },
}

fn ip(args: &[&str]) -> Result<String, ListenError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| ListenError::IpSpawn { source })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(ListenError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Listener addresses this process added; removed again on drop.
pub struct ListenerAddrs {
    added: Vec<(Ipv4Addr, String)>,
    created_dummy: bool,
    pub device: String,
}

impl ListenerAddrs {
    pub fn setup(addrs: &[Ipv4Addr]) -> Result<Self, ListenError> {
        let mut created_dummy = false;
        let device = if ip(&["link", "show", DUMMY_DEV]).is_ok() {
            DUMMY_DEV.to_string()
        } else {
            match ip(&["link", "add", DUMMY_DEV, "type", "dummy"]) {
                Ok(_) => {
                    created_dummy = true;
                    ip(&["link", "set", DUMMY_DEV, "up"])?;
                    DUMMY_DEV.to_string()
                }
                Err(e) => {
                    tracing::info!(
                        error = %e,
                        "no dummy link support in this kernel: listener addresses go on lo as /32"
                    );
                    "lo".to_string()
                }
            }
        };
        let mut me = ListenerAddrs {
            added: Vec::new(),
            created_dummy,
            device,
        };
        for a in addrs {
            let present = ip(&["-o", "addr", "show", "to", &format!("{a}/32")])?;
            if !present.trim().is_empty() {
                tracing::info!(addr = %a, "listener address already present");
                continue;
            }
            ip(&["addr", "add", &format!("{a}/32"), "dev", &me.device])?;
            me.added.push((*a, me.device.clone()));
        }
        Ok(me)
    }
}

impl Drop for ListenerAddrs {
    fn drop(&mut self) {
        for (a, dev) in &self.added {
            let _ = ip(&["addr", "del", &format!("{a}/32"), "dev", dev]);
        }
        if self.created_dummy {
            let _ = ip(&["link", "del", DUMMY_DEV]);
        }
    }
}

/// Receive buffer per UDP socket: room for bursts while a core is busy.
const UDP_RCVBUF: usize = 4 << 20;

/// One UDP socket per core on `addr` (SO_REUSEPORT spreads clients across
/// them) and one TCP listener.
pub async fn bind(
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
    let tcp = TcpListener::bind(addr).await.map_err(|e| err("tcp", e))?;
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

pub async fn serve_udp(sock: UdpSocket, view: u8, res: Arc<Resolver>) {
    let sock = Arc::new(sock);
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "udp receive failed");
                continue;
            }
        };
        let raw = &buf[..n];
        // Hits are answered inline; everything else gets its own task,
        // with the query as already parsed.
        let parsed = match res.answer_cached(view, raw) {
            Ok(out) => {
                let _ = sock.send_to(&out, peer).await;
                continue;
            }
            Err(parsed) => parsed,
        };
        let raw = raw.to_vec();
        let (sock, res) = (sock.clone(), res.clone());
        tokio::spawn(async move {
            let out = match parsed {
                Some(q) => res.handle_parsed(view, &raw, q, peer, Transport::Udp).await,
                None => res.handle(view, &raw, peer, Transport::Udp).await,
            };
            if let Some(out) = out {
                let _ = sock.send_to(&out, peer).await;
            }
        });
    }
}

pub async fn serve_tcp(listener: TcpListener, view: u8, res: Arc<Resolver>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(tcp_conn(stream, peer, view, res.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "tcp accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One client connection: queries are answered concurrently and written
/// back as they complete (pipelining, RFC 7766 §6.2.1.1).
async fn tcp_conn(stream: TcpStream, peer: SocketAddr, view: u8, res: Arc<Resolver>) {
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
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, rd.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => break,
        }
        let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
        match tokio::time::timeout(TCP_IDLE, rd.read_exact(&mut msg)).await {
            Ok(Ok(_)) => {}
            _ => break,
        }
        let (tx, res) = (tx.clone(), res.clone());
        tokio::spawn(async move {
            if let Some(out) = res.handle(view, &msg, peer, Transport::Tcp).await {
                let _ = tx.send(out).await;
            }
        });
    }
    drop(tx);
    let _ = writer.await;
}
