//! Forwarding loops, found the way CoreDNS `loop` finds them: the daemon
//! sends each forwarded zone's upstreams a query for a random name
//! (`<n>.<n>.<zone> HINFO`) that nobody else can know. If that name comes
//! back to one of our listeners, the upstream forwards to us: a loop, which
//! would otherwise turn every miss into a chain of timeouts.
//!
//! Unlike CoreDNS, which exits, the daemon stays up: the looping zone's
//! misses get SERVFAIL at once (cache hits, kernel ones included, still
//! answer), `/ready` fails, `localdns_forward_loop{view,zone}` is 1, and the
//! probe repeats every [`REPROBE`] so that a fixed upstream clears it.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The probes' type: only HINFO queries are looked up among them, so
/// every other query pays one comparison, even while a probe is out.
pub const TYPE_HINFO: u16 = 13;

/// How often the probes repeat.
pub const REPROBE: Duration = Duration::from_secs(30);

/// A forwarded zone of one view: (view, CoreDNS zone label).
pub type ZoneId = (u8, &'static str);

struct Probe {
    zone: ZoneId,
    seen: bool,
}

#[derive(Default)]
pub struct Loops {
    /// Probe names in flight (lowercase wire format).
    probes: Mutex<HashMap<Vec<u8>, Probe>>,
    /// Set while any probe is in flight: the per-query check is one load.
    probing: AtomicBool,
    looping: Mutex<HashSet<ZoneId>>,
    any_looping: AtomicBool,
}

/// A probe name for `zone` (wire format, lowercase): two random 64-bit
/// decimal labels before it.
pub fn probe_name(zone_wire: &[u8]) -> Vec<u8> {
    let mut n = Vec::with_capacity(42 + zone_wire.len());
    for _ in 0..2 {
        let label = rand::random::<u64>().to_string();
        n.push(label.len() as u8);
        n.extend_from_slice(label.as_bytes());
    }
    n.extend_from_slice(zone_wire);
    n
}

impl Loops {
    /// Registers a probe for `zone` under `name` before it is sent.
    pub fn start(&self, name: Vec<u8>, zone: ZoneId) {
        let mut p = self.probes.lock().unwrap_or_else(|e| e.into_inner());
        p.insert(name, Probe { zone, seen: false });
        self.probing.store(true, Ordering::Release);
    }

    /// Ends the probe `name`: true when it came back (the zone loops). The
    /// zone's looping state follows the answer.
    pub fn finish(&self, name: &[u8]) -> Option<(ZoneId, bool)> {
        let mut p = self.probes.lock().unwrap_or_else(|e| e.into_inner());
        let probe = p.remove(name)?;
        if p.is_empty() {
            self.probing.store(false, Ordering::Release);
        }
        drop(p);
        let mut l = self.looping.lock().unwrap_or_else(|e| e.into_inner());
        let changed = if probe.seen {
            l.insert(probe.zone)
        } else {
            l.remove(&probe.zone)
        };
        self.any_looping.store(!l.is_empty(), Ordering::Release);
        changed.then_some((probe.zone, probe.seen))
    }

    /// A query for `qname` arrived from `client`: the zone it probed when
    /// it is one of our probes coming back.
    pub fn arrived(&self, qname_lower: &[u8], client: SocketAddr) -> Option<ZoneId> {
        if !self.probing.load(Ordering::Acquire) {
            return None;
        }
        let mut p = self.probes.lock().unwrap_or_else(|e| e.into_inner());
        let probe = p.get_mut(qname_lower)?;
        probe.seen = true;
        let zone = probe.zone;
        drop(p);
        let mut l = self.looping.lock().unwrap_or_else(|e| e.into_inner());
        l.insert(zone);
        self.any_looping.store(true, Ordering::Release);
        tracing::trace!(%client, "loop probe came back");
        Some(zone)
    }

    pub fn is_looping(&self, zone: ZoneId) -> bool {
        self.any_looping.load(Ordering::Acquire)
            && self
                .looping
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&zone)
    }

    /// The looping zones, for `/ready`.
    pub fn looping(&self) -> Vec<ZoneId> {
        let mut v: Vec<_> = self
            .looping
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_that_comes_back_marks_its_zone_until_one_does_not() {
        let l = Loops::default();
        let c: SocketAddr = "169.254.200.2:5353".parse().unwrap();
        let zone = (0, ".");
        let n = probe_name(b"\x00");
        assert_eq!(
            n[0] as usize + 1 + n[n[0] as usize + 1] as usize + 1 + 1,
            n.len()
        );
        assert_ne!(probe_name(b"\x00"), n, "names repeat");
        assert_eq!(l.arrived(&n, c), None, "no probe yet");
        l.start(n.clone(), zone);
        assert_eq!(l.arrived(b"\x01x\x00", c), None);
        assert_eq!(l.arrived(&n, c), Some(zone));
        assert!(l.is_looping(zone));
        assert!(!l.is_looping((1, ".")));
        assert_eq!(l.finish(&n), None, "already marked on arrival");
        assert!(l.is_looping(zone));
        assert_eq!(l.looping(), vec![zone]);
        let m = probe_name(b"\x00");
        l.start(m.clone(), zone);
        assert_eq!(l.finish(&m), Some((zone, false)));
        assert!(!l.is_looping(zone));
        assert!(l.looping().is_empty());
    }
}
