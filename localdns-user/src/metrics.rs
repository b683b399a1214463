//! `/health`, `/ready` and Prometheus `/metrics` over a minimal HTTP/1.0
//! responder (one request per connection, as probes and scrapers use it).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::resolver::Resolver;

pub struct Health {
    pub ready: AtomicBool,
}

/// Prometheus text exposition of daemon and kernel counters.
pub fn render(res: &Resolver) -> String {
    let c = &res.counters;
    let mut s = String::new();
    for (name, v) in [
        ("queries_total", &c.queries),
        ("cache_hits_total", &c.cache_hits),
        ("stale_served_total", &c.stale_served),
        ("forwarded_total", &c.forwarded),
        ("servfail_total", &c.servfail),
        ("refused_total", &c.refused),
        ("formerr_total", &c.formerr),
    ] {
        let _ = writeln!(s, "# TYPE localdns_daemon_{name} counter");
        let _ = writeln!(s, "localdns_daemon_{name} {}", v.load(Ordering::Relaxed));
    }
    let _ = writeln!(
        s,
        "# TYPE localdns_cache_entries gauge\nlocaldns_cache_entries {}",
        res.cache.len()
    );
    let _ = writeln!(
        s,
        "# TYPE localdns_kernel_fastpath_up gauge\nlocaldns_kernel_fastpath_up {}",
        u8::from(res.fastpath.is_some())
    );
    if let Some(fp) = &res.fastpath {
        let _ = writeln!(s, "# TYPE localdns_kernel_packets_total counter");
        for (name, v) in fp.stats() {
            let _ = writeln!(s, "localdns_kernel_packets_total{{result=\"{name}\"}} {v}");
        }
    }
    s
}

pub async fn serve(listener: TcpListener, res: Arc<Resolver>, health: Arc<Health>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let (res, health) = (res.clone(), health.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("/");
            let (code, body) = match path {
                "/health" => ("200 OK", "OK\n".to_string()),
                "/ready" if health.ready.load(Ordering::Relaxed) => ("200 OK", "OK\n".to_string()),
                "/ready" => ("503 Service Unavailable", "starting\n".to_string()),
                "/metrics" => ("200 OK", render(&res)),
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.0 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
        });
    }
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
