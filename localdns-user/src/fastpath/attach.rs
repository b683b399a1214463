//! Attaching the program to interfaces, one pinned bpf_link each, and
//! replacing the program on links an earlier instance left (atomic link
//! update: no moment without a program). Interfaces are reconciled against
//! the wanted set whenever they change.

use std::collections::HashMap;
use std::path::Path;

use aya::Ebpf;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::xdp::XdpLink;
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode, tc};
use aya::util::KernelVersion;

use super::pins::{LinkKind, PinDir};
use super::{AttachMode, FastpathError, TC_PROG, TC_ROOM_PROG, XDP_PROG};
use crate::ifaces::Iface;

/// Priority and handle of the TC filter on kernels without TCX (< 6.6),
/// where filters cannot be pinned: fixed, so a later instance finds it.
const NL_PRIORITY: u16 = 0x1d5;
const NL_HANDLE: u16 = 0x1d5;
/// The same for the XDP modes' TC companion.
const NL_ROOM_PRIORITY: u16 = 0x1d6;
const NL_ROOM_HANDLE: u16 = 0x1d6;

/// How the program runs on one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum How {
    Link(LinkKind),
    /// TC filter through netlink (no bpf_link on this kernel).
    NetlinkTc,
}

impl How {
    pub fn name(self) -> &'static str {
        match self {
            How::Link(k) => k.mode_name(),
            How::NetlinkTc => "tc (netlink)",
        }
    }

    /// XDP, which gets a TC companion for replies it has no room to build.
    fn is_xdp(self) -> bool {
        matches!(
            self,
            How::Link(LinkKind::XdpGeneric) | How::Link(LinkKind::XdpNative)
        )
    }
}

/// What a reconcile step did to one interface.
#[derive(Debug)]
pub enum Change {
    /// The program now runs on it; `adopted`: on a link an earlier
    /// instance left, replaced in place.
    Attached {
        iface: String,
        how: How,
        adopted: bool,
    },
    /// It is no longer selected (or gone): the link was removed.
    Detached { iface: String },
    /// Attaching failed; retried on the next reconcile.
    Failed { iface: String, error: String },
}

struct Attached {
    name: String,
    how: How,
}

/// The loaded program plus the interfaces it runs on.
pub struct Attacher {
    ebpf: Ebpf,
    pins: PinDir,
    mode: AttachMode,
    tcx: bool,
    current: HashMap<u32, Attached>,
}

impl Attacher {
    pub fn new(ebpf: Ebpf, pins: PinDir, mode: AttachMode) -> Self {
        Attacher {
            ebpf,
            pins,
            mode,
            tcx: has_tcx(),
            current: HashMap::new(),
        }
    }

    /// Attaches to every wanted interface not yet covered and detaches from
    /// every covered one no longer wanted; link pins of interfaces that are
    /// gone are removed.
    pub fn reconcile(&mut self, wanted: &[Iface]) -> Vec<Change> {
        let mut changes = Vec::new();
        let stale: Vec<u32> = self
            .current
            .keys()
            .copied()
            .filter(|i| !wanted.iter().any(|w| w.index == *i))
            .collect();
        for idx in stale {
            if let Some(a) = self.current.remove(&idx) {
                self.detach(idx, &a);
                changes.push(Change::Detached { iface: a.name });
            }
        }
        for w in wanted {
            if self.current.contains_key(&w.index) {
                continue;
            }
            match self.attach(w) {
                Ok((how, adopted)) => {
                    self.current.insert(
                        w.index,
                        Attached {
                            name: w.name.clone(),
                            how,
                        },
                    );
                    changes.push(Change::Attached {
                        iface: w.name.clone(),
                        how,
                        adopted,
                    });
                }
                Err(e) => changes.push(Change::Failed {
                    iface: w.name.clone(),
                    error: e.to_string(),
                }),
            }
        }
        // Pins of interfaces that no longer exist (deleted while no daemon
        // ran, or just now): their links are defunct.
        for p in self.pins.link_pins() {
            if !self.current.contains_key(&p.ifindex)
                && !wanted.iter().any(|w| w.index == p.ifindex)
            {
                let _ = std::fs::remove_file(&p.path);
            }
        }
        changes
    }

    /// Interfaces the program runs on, with how.
    pub fn attached(&self) -> Vec<(String, &'static str)> {
        let mut v: Vec<_> = self
            .current
            .values()
            .map(|a| (a.name.clone(), a.how.name()))
            .collect();
        v.sort();
        v
    }

    fn wanted_how(&self, iface: &Iface) -> How {
        match self.mode {
            AttachMode::Tc if self.tcx => How::Link(LinkKind::Tcx),
            AttachMode::Tc => How::NetlinkTc,
            AttachMode::Xdp => How::Link(LinkKind::XdpNative),
            AttachMode::XdpGeneric => How::Link(LinkKind::XdpGeneric),
            AttachMode::Auto if iface.is_virtual => How::Link(LinkKind::XdpGeneric),
            AttachMode::Auto => How::Link(LinkKind::XdpNative),
        }
    }

    /// Puts the program on `iface`: on its existing link when one of the
    /// wanted kind is pinned, else on a new link (native XDP falling back
    /// to generic in `auto`). Links of another kind go afterwards, so
    /// switching modes leaves no gap either. Returns how, and whether an
    /// existing link was reused.
    fn attach(&mut self, iface: &Iface) -> Result<(How, bool), FastpathError> {
        let how = self.wanted_how(iface);
        let existing: Vec<_> = self
            .pins
            .link_pins()
            .into_iter()
            .filter(|p| p.ifindex == iface.index)
            .collect();
        let mut result = None;
        if let How::Link(kind) = how
            && let Some(p) = existing.iter().find(|p| p.kind == kind)
        {
            match self.update(kind, &p.path) {
                Ok(()) => result = Some((how, true)),
                Err(e) => {
                    tracing::info!(iface = %iface.name, error = %e, "pinned link not reusable; attaching anew");
                    let _ = std::fs::remove_file(&p.path);
                }
            }
        }
        let result = match result {
            Some(r) => r,
            None => (self.attach_new(iface, how)?, false),
        };
        let mut keep = vec![result.0];
        if result.0.is_xdp() {
            match self.companion(iface, &existing) {
                Ok(()) => keep.push(How::Link(LinkKind::TcRoom)),
                Err(e) => tracing::warn!(iface = %iface.name, error = %e,
                    "no TC companion: replies too large for XDP's room go to the daemon"),
            }
        }
        for p in existing {
            if !keep.contains(&How::Link(p.kind)) {
                let _ = std::fs::remove_file(&p.path);
            }
        }
        Ok(result)
    }

    /// The TC companion next to an XDP link: its pinned link updated, or a
    /// new one (a fixed netlink filter before TCX).
    fn companion(
        &mut self,
        iface: &Iface,
        existing: &[super::pins::LinkPin],
    ) -> Result<(), FastpathError> {
        if let Some(p) = existing.iter().find(|p| p.kind == LinkKind::TcRoom) {
            if self.update(LinkKind::TcRoom, &p.path).is_ok() {
                return Ok(());
            }
            let _ = std::fs::remove_file(&p.path);
        }
        let err = |source: ProgramError| FastpathError::Attach {
            iface: iface.name.clone(),
            mode: "tc companion",
            source: Box::new(source),
        };
        let _ = tc::qdisc_add_clsact(&iface.name);
        let tcx = self.tcx;
        let p = self.classifier(TC_ROOM_PROG)?;
        if tcx {
            let id = p
                .attach_with_options(
                    &iface.name,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(err)?;
            let link = p.take_link(id).map_err(err)?;
            self.pin(link.try_into(), LinkKind::TcRoom, iface)
        } else {
            let id =
                netlink_filter(p, &iface.name, NL_ROOM_PRIORITY, NL_ROOM_HANDLE).map_err(err)?;
            std::mem::forget(p.take_link(id).map_err(err)?);
            Ok(())
        }
    }

    /// Replaces the program on a pinned link (bpf_link_update).
    fn update(&mut self, kind: LinkKind, pin: &Path) -> Result<(), FastpathError> {
        let link = FdLink::from(PinnedLink::from_pin(pin).map_err(|e| FastpathError::Link {
            path: pin.to_path_buf(),
            error: e.to_string(),
        })?);
        let err = |e: ProgramError| FastpathError::Link {
            path: pin.to_path_buf(),
            error: e.to_string(),
        };
        let lerr = |e: aya::programs::links::LinkError| FastpathError::Link {
            path: pin.to_path_buf(),
            error: e.to_string(),
        };
        match kind {
            LinkKind::Tcx | LinkKind::TcRoom => {
                let prog = if kind == LinkKind::Tcx {
                    TC_PROG
                } else {
                    TC_ROOM_PROG
                };
                let p = self.classifier(prog)?;
                let id = p
                    .attach_to_link(SchedClassifierLink::try_from(link).map_err(lerr)?)
                    .map_err(err)?;
                // The pin keeps the link; our fd may go.
                drop(p.take_link(id).map_err(err)?);
            }
            LinkKind::XdpGeneric | LinkKind::XdpNative => {
                let p = self.xdp()?;
                let id = p
                    .attach_to_link(XdpLink::try_from(link).map_err(lerr)?)
                    .map_err(err)?;
                drop(p.take_link(id).map_err(err)?);
            }
        }
        Ok(())
    }

    fn attach_new(&mut self, iface: &Iface, how: How) -> Result<How, FastpathError> {
        let attach_err = |mode: &'static str, source: ProgramError| FastpathError::Attach {
            iface: iface.name.clone(),
            mode,
            source: Box::new(source),
        };
        match how {
            How::Link(LinkKind::Tcx) => {
                // Harmless where clsact exists already or TCX needs none.
                let _ = tc::qdisc_add_clsact(&iface.name);
                let p = self.classifier(TC_PROG)?;
                let id = p
                    .attach_with_options(
                        &iface.name,
                        TcAttachType::Ingress,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .map_err(|e| attach_err("tc", e))?;
                let link = p.take_link(id).map_err(|e| attach_err("tc", e))?;
                self.pin(link.try_into(), LinkKind::Tcx, iface)?;
                Ok(how)
            }
            How::NetlinkTc => {
                let _ = tc::qdisc_add_clsact(&iface.name);
                let p = self.classifier(TC_PROG)?;
                let id = netlink_filter(p, &iface.name, NL_PRIORITY, NL_HANDLE)
                    .map_err(|e| attach_err("tc", e))?;
                // A netlink filter outlives the process by itself; forget
                // the handle so dropping the program does not remove it.
                std::mem::forget(p.take_link(id).map_err(|e| attach_err("tc", e))?);
                Ok(how)
            }
            How::Link(kind) => {
                let auto = self.mode == AttachMode::Auto;
                let p = self.xdp()?;
                let (id, kind) = match kind {
                    LinkKind::XdpNative => match p.attach_to_if_index(iface.index, XdpMode::Driver)
                    {
                        Ok(id) => (id, LinkKind::XdpNative),
                        Err(e) if auto => {
                            tracing::info!(iface = %iface.name, error = %e, "native XDP unavailable, using generic XDP");
                            let id = p
                                .attach_to_if_index(iface.index, XdpMode::Skb)
                                .map_err(|e| attach_err("xdp-generic", e))?;
                            (id, LinkKind::XdpGeneric)
                        }
                        Err(e) => return Err(attach_err("xdp", e)),
                    },
                    _ => (
                        p.attach_to_if_index(iface.index, XdpMode::Skb)
                            .map_err(|e| attach_err("xdp-generic", e))?,
                        LinkKind::XdpGeneric,
                    ),
                };
                let link = p
                    .take_link(id)
                    .map_err(|e| attach_err(kind.mode_name(), e))?;
                self.pin(link.try_into(), kind, iface)?;
                Ok(How::Link(kind))
            }
        }
    }

    fn pin(
        &self,
        link: Result<FdLink, aya::programs::links::LinkError>,
        kind: LinkKind,
        iface: &Iface,
    ) -> Result<(), FastpathError> {
        let path = self.pins.link(kind, iface.index, &iface.name);
        let link = link.map_err(|e| FastpathError::Link {
            path: path.clone(),
            error: format!("{e} (this kernel has no bpf_link for it)"),
        })?;
        let _ = std::fs::remove_file(&path);
        link.pin(&path).map_err(|e| FastpathError::Link {
            path: path.clone(),
            error: e.to_string(),
        })?;
        Ok(())
    }

    fn detach(&mut self, ifindex: u32, a: &Attached) {
        for p in self.pins.link_pins() {
            if p.ifindex == ifindex {
                let _ = std::fs::remove_file(&p.path);
            }
        }
        if !self.tcx {
            for prog in [TC_PROG, TC_ROOM_PROG] {
                let _ = tc::qdisc_detach_program(&a.name, TcAttachType::Ingress, prog);
            }
        }
    }

    fn xdp(&mut self) -> Result<&mut Xdp, FastpathError> {
        self.ebpf
            .program_mut(XDP_PROG)
            .and_then(|p| p.try_into().ok())
            .ok_or(FastpathError::Missing(XDP_PROG))
    }

    fn classifier(&mut self, name: &'static str) -> Result<&mut SchedClassifier, FastpathError> {
        self.ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .ok_or(FastpathError::Missing(name))
    }
}

/// A TC filter through netlink at a fixed priority and handle: replaces
/// the one an earlier instance left there, or adds it.
fn netlink_filter(
    p: &mut SchedClassifier,
    iface: &str,
    priority: u16,
    handle: u16,
) -> Result<aya::programs::tc::SchedClassifierLinkId, ProgramError> {
    let replaced = SchedClassifierLink::attached(
        iface,
        TcAttachType::Ingress,
        priority,
        TcHandle::new(0, handle),
        None,
    )
    .ok()
    .and_then(|l| p.attach_to_link(l).ok());
    match replaced {
        Some(id) => Ok(id),
        None => p.attach_with_options(
            iface,
            TcAttachType::Ingress,
            TcAttachOptions::Netlink(NlOptions {
                priority,
                handle: TcHandle::new(0, handle),
                classid: None,
            }),
        ),
    }
}

/// Detaches netlink TC filters of earlier runs on every interface (TCX and
/// XDP links go with their pins). For `teardown` on kernels before 6.6.
pub fn detach_netlink_tc(ifaces: &[Iface]) -> usize {
    if has_tcx() {
        return 0;
    }
    let mut n = 0;
    for i in ifaces {
        for prog in [TC_PROG, TC_ROOM_PROG] {
            n +=
                usize::from(tc::qdisc_detach_program(&i.name, TcAttachType::Ingress, prog).is_ok());
        }
    }
    n
}

/// TCX (pinnable TC links) arrived in Linux 6.6.
fn has_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}
