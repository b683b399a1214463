//! Network interfaces through rtnetlink: which exist, which `--iface`
//! patterns select, and a stream of "something changed" events so the
//! fast path follows pods that come and go.

use futures::{StreamExt, TryStreamExt};
use netlink_packet_route::link::{LinkAttribute, LinkInfo, LinkLayerType, LinkMessage};
use rtnetlink::{Handle, MulticastGroup};
use thiserror::Error;
use tokio::sync::mpsc;

#[derive(Debug, Error)]
pub enum IfaceError {
    #[error("rtnetlink socket: {source}")]
    Socket {
        #[source]
        source: std::io::Error,
    },
    #[error("listing interfaces: {source}")]
    List {
        #[source]
        source: rtnetlink::Error,
    },
    #[error("interface pattern {pattern:?}: {source}")]
    Pattern {
        pattern: String,
        #[source]
        source: glob::PatternError,
    },
}

/// One interface of this network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Iface {
    pub index: u32,
    pub name: String,
    /// veth, bridge, dummy, lo, ...: no hardware behind it, so native XDP
    /// is not what `auto` picks (native XDP_TX on a veth is lost unless the
    /// peer runs XDP too).
    pub is_virtual: bool,
}

impl Iface {
    fn from_message(m: &LinkMessage) -> Option<Self> {
        let mut name = None;
        let mut kind = false;
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::LinkInfo(infos) => {
                    kind |= infos.iter().any(|i| matches!(i, LinkInfo::Kind(_)));
                }
                _ => {}
            }
        }
        Some(Iface {
            index: m.header.index,
            name: name?,
            is_virtual: kind || m.header.link_layer_type == LinkLayerType::Loopback,
        })
    }
}

/// A request/response rtnetlink connection, its task running on tokio.
pub fn connect() -> Result<Handle, IfaceError> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|source| IfaceError::Socket { source })?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Every interface, in index order.
pub async fn list(handle: &Handle) -> Result<Vec<Iface>, IfaceError> {
    let mut out: Vec<Iface> = handle
        .link()
        .get()
        .execute()
        .try_filter_map(|m| async move { Ok(Iface::from_message(&m)) })
        .try_collect()
        .await
        .map_err(|source| IfaceError::List { source })?;
    out.sort_by_key(|i| i.index);
    Ok(out)
}

/// `--iface` patterns (shell globs); `lo` is always selected.
#[derive(Clone, Debug)]
pub struct Patterns(Vec<(String, glob::Pattern)>);

impl Patterns {
    pub fn new(patterns: &[String]) -> Result<Self, IfaceError> {
        patterns
            .iter()
            .map(|p| {
                glob::Pattern::new(p)
                    .map(|g| (p.clone(), g))
                    .map_err(|source| IfaceError::Pattern {
                        pattern: p.clone(),
                        source,
                    })
            })
            .collect::<Result<_, _>>()
            .map(Patterns)
    }

    /// The interfaces that get the fast path.
    pub fn select(&self, all: &[Iface]) -> Vec<Iface> {
        all.iter()
            .filter(|i| i.name == "lo" || self.0.iter().any(|(_, g)| g.matches(&i.name)))
            .cloned()
            .collect()
    }

    /// Patterns that match no interface of `all` (a warning at start: a
    /// node without pods yet).
    pub fn unmatched(&self, all: &[Iface]) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(_, g)| !all.iter().any(|i| g.matches(&i.name)))
            .map(|(p, _)| p.as_str())
            .collect()
    }
}

/// Sends `()` whenever an interface appears, changes or disappears. Ends
/// when the receiver is dropped.
pub fn watch() -> Result<mpsc::Receiver<()>, IfaceError> {
    let (conn, _handle, mut messages) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Link])
            .map_err(|source| IfaceError::Socket { source })?;
    tokio::spawn(conn);
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        while messages.next().await.is_some() {
            // A full channel already holds a wake-up: nothing is lost.
            match tx.try_send(()) {
                Ok(()) | Err(mpsc::error::TrySendError::Full(())) => {}
                Err(mpsc::error::TrySendError::Closed(())) => break,
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(index: u32, name: &str) -> Iface {
        Iface {
            index,
            name: name.into(),
            is_virtual: true,
        }
    }

    #[test]
    fn globs_select_and_lo_is_always_in() {
        let all = [
            iface(1, "lo"),
            iface(2, "eth0"),
            iface(3, "azv1"),
            iface(4, "azv22"),
        ];
        let p = Patterns::new(&["azv*".into(), "cali*".into()]).unwrap();
        let names: Vec<_> = p.select(&all).into_iter().map(|i| i.name).collect();
        assert_eq!(names, ["lo", "azv1", "azv22"]);
        assert_eq!(p.unmatched(&all), ["cali*"]);
        assert!(Patterns::new(&["[".into()]).is_err());
    }
}
