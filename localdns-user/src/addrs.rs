//! The listener addresses, through rtnetlink: on a `localdns` dummy device
//! where the kernel has dummy links (as AKS does), otherwise on `lo` (/32,
//! or /128 for IPv6). IPv4 addresses on `lo` are labelled `lo:localdns`, so
//! `teardown` removes exactly what localdns added (IPv6 has no labels:
//! teardown is told which). They stay when the daemon stops (the next
//! instance, and the kernel fast path on `lo`, need them).

use std::net::{IpAddr, Ipv6Addr};

use futures::TryStreamExt;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use netlink_packet_route::link::LinkMessage;
use rtnetlink::{Handle, LinkDummy};
use thiserror::Error;

/// Name of the dummy device that carries the listener addresses.
pub const DEVICE: &str = "localdns";
/// Label of listener addresses on `lo` (labels start with the device name).
pub const LO_LABEL: &str = "lo:localdns";

#[derive(Debug, Error)]
pub enum AddrError {
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("no loopback device")]
    NoLoopback,
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> AddrError {
    let what = what.into();
    move |source| AddrError::Netlink { what, source }
}

async fn link_index(handle: &Handle, name: &str) -> Option<u32> {
    let mut s = handle.link().get().match_name(name.to_string()).execute();
    s.try_next().await.ok().flatten().map(|m| m.header.index)
}

/// Every IPv4/IPv6 address of the namespace with its interface and label.
async fn all_addresses(handle: &Handle) -> Result<Vec<(IpAddr, AddressMessage)>, AddrError> {
    let msgs: Vec<AddressMessage> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing addresses"))?;
    Ok(msgs
        .into_iter()
        .filter_map(|m| {
            let a = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) | AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })?;
            Some((a, m))
        })
        .collect())
}

/// What [`ensure`] found and did.
#[derive(Debug)]
pub struct Listeners {
    /// `localdns` or `lo`.
    pub device: String,
    /// Addresses this call added (the others were already there).
    pub added: Vec<IpAddr>,
}

/// Makes sure every listener address is configured.
pub async fn ensure(handle: &Handle, addrs: &[IpAddr]) -> Result<Listeners, AddrError> {
    let (device, index) = match link_index(handle, DEVICE).await {
        Some(i) => (DEVICE.to_string(), i),
        None => match handle
            .link()
            .add(LinkDummy::new(DEVICE).up().build())
            .execute()
            .await
        {
            Ok(()) => match link_index(handle, DEVICE).await {
                Some(i) => (DEVICE.to_string(), i),
                None => ("lo".into(), lo_index(handle).await?),
            },
            Err(e) => {
                tracing::info!(error = %e, "no dummy link support in this kernel: listener addresses go on lo as /32");
                ("lo".into(), lo_index(handle).await?)
            }
        },
    };
    let present = all_addresses(handle).await?;
    let mut added = Vec::new();
    for a in addrs {
        if present.iter().any(|(ip, _)| ip == a) {
            tracing::info!(addr = %a, "listener address already present");
            continue;
        }
        let len = if a.is_ipv4() { 32 } else { 128 };
        let mut req = handle.address().add(index, *a, len);
        if device == "lo" && a.is_ipv4() {
            req.message_mut()
                .attributes
                .push(AddressAttribute::Label(LO_LABEL.into()));
        }
        if a.is_ipv6() {
            // No duplicate address detection: a tentative address cannot
            // be bound for a second or more (on the dummy device).
            let m = req.message_mut();
            m.header.flags |= AddressHeaderFlags::Nodad;
            m.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        req.execute()
            .await
            .map_err(nl(format!("adding {a}/{len} to {device}")))?;
        added.push(*a);
    }
    Ok(Listeners { device, added })
}

async fn lo_index(handle: &Handle) -> Result<u32, AddrError> {
    link_index(handle, "lo").await.ok_or(AddrError::NoLoopback)
}

/// Removes what [`ensure`] may have added in any earlier run: addresses
/// labelled [`LO_LABEL`], the IPv6 listener addresses `v6` on `lo`, and
/// the [`DEVICE`] dummy link with its addresses. Returns what was removed,
/// for the log.
pub async fn remove(handle: &Handle, v6: &[Ipv6Addr]) -> Result<Vec<String>, AddrError> {
    let mut gone = Vec::new();
    let lo = link_index(handle, "lo").await;
    for (ip, m) in all_addresses(handle).await? {
        let labelled = m
            .attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Label(l) if l == LO_LABEL));
        let listed = matches!(ip, IpAddr::V6(a) if v6.contains(&a)) && Some(m.header.index) == lo;
        let ours = labelled || listed;
        if ours {
            handle
                .address()
                .del(m)
                .execute()
                .await
                .map_err(nl(format!("removing {ip}")))?;
            gone.push(format!("{ip} on lo"));
        }
    }
    if let Some(i) = link_index(handle, DEVICE).await {
        let is_dummy = handle
            .link()
            .get()
            .match_index(i)
            .execute()
            .try_next()
            .await
            .ok()
            .flatten()
            .is_some_and(|m: LinkMessage| is_dummy(&m));
        if is_dummy {
            handle
                .link()
                .del(i)
                .execute()
                .await
                .map_err(nl(format!("deleting link {DEVICE}")))?;
            gone.push(format!("link {DEVICE}"));
        }
    }
    Ok(gone)
}

fn is_dummy(m: &LinkMessage) -> bool {
    use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo};
    m.attributes.iter().any(|a| {
        matches!(a, LinkAttribute::LinkInfo(infos)
            if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Dummy))))
    })
}
