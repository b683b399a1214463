//! The systemd side of the daemon (`Type=notify`, `WatchdogSec=`), with the
//! `sd-notify` crate: READY=1 once the daemon answers its own health-check
//! query through its listener; WATCHDOG=1 only while that self-check keeps
//! passing; STOPPING=1 when it stops. Without `NOTIFY_SOCKET` (not under
//! systemd) the notifications are no-ops and the self-checks still run.

use std::net::SocketAddr;
use std::time::Duration;

use sd_notify::NotifyState;
use thiserror::Error;
use tokio::net::UdpSocket;

#[derive(Debug, Error)]
pub enum SelfCheckError {
    #[error("self-check socket: {0}")]
    Io(#[source] std::io::Error),
    #[error("no answer from {addr} within {within:?}")]
    Timeout { addr: SocketAddr, within: Duration },
}

/// `health-check.localdns.local. IN A`, RD, with `id`.
fn probe(id: u16) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    m.extend_from_slice(b"\x0chealth-check\x08localdns\x05local\x00\x00\x01\x00\x01");
    m
}

/// Asks `addr` (one of our listeners) for the health-check name, as AKS's
/// probe does, and waits for the matching answer.
pub async fn self_check(addr: SocketAddr, within: Duration) -> Result<(), SelfCheckError> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let sock = UdpSocket::bind(bind).await.map_err(SelfCheckError::Io)?;
    sock.connect(addr).await.map_err(SelfCheckError::Io)?;
    let id: u16 = rand::random();
    sock.send(&probe(id)).await.map_err(SelfCheckError::Io)?;
    let mut buf = [0u8; 512];
    let wait = async {
        loop {
            let n = sock.recv(&mut buf).await?;
            // Our ID, QR set, NOERROR.
            if n >= 12 && buf[..2] == id.to_be_bytes() && buf[2] & 0x80 != 0 && buf[3] & 0xf == 0 {
                return Ok::<(), std::io::Error>(());
            }
        }
    };
    match tokio::time::timeout(within, wait).await {
        Ok(r) => r.map_err(SelfCheckError::Io),
        Err(_) => Err(SelfCheckError::Timeout { addr, within }),
    }
}

fn notify(what: &str, state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "sd_notify {what} failed");
    }
}

/// Tells systemd the service is up (after a passed self-check).
pub fn ready() {
    notify("READY", &[NotifyState::Ready]);
}

/// Tells systemd the service is stopping.
pub fn stopping() {
    notify("STOPPING", &[NotifyState::Stopping]);
}

/// Pings systemd's watchdog at half its interval, each time only after a
/// passed self-check: a daemon that stopped answering is restarted by
/// systemd even though the process lives. Returns at once when no watchdog
/// is configured.
pub async fn watchdog(addr: SocketAddr) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = interval / 2;
    tracing::info!(
        ?interval,
        "systemd watchdog: pinging every {every:?} after a self-check"
    );
    let mut t = tokio::time::interval(every);
    loop {
        t.tick().await;
        match self_check(addr, every.min(Duration::from_secs(2))).await {
            Ok(()) => notify("WATCHDOG", &[NotifyState::Watchdog]),
            Err(e) => tracing::error!(error = %e, "self-check failed: not pinging the watchdog"),
        }
    }
}
