//! Where lost queries went. Around each dnsperf phase the bench reads, in
//! the client and the node netns, the UDP counters of `/proc/net/snmp`
//! (socket receive/send buffer overflows, input errors) and the drops of
//! `/proc/net/dev` (a veth end's, XDP_TX errors included), and for
//! localdns the fast path's counters of queries it did not answer. The
//! non-zero differences are kept per phase in `results.json` and printed
//! under the table when a contender lost queries.

use std::collections::BTreeMap;

use crate::contenders::kernel_stats;
use crate::topology::Topo;

/// Counter name -> value.
pub(crate) type Counters = BTreeMap<String, u64>;

/// The UDP counters that mean a datagram was dropped.
const UDP_DROPS: [&str; 4] = ["InErrors", "RcvbufErrors", "SndbufErrors", "MemErrors"];

/// The fast-path counters of queries not answered in the kernel (W1 is all
/// hits, so each is a query that went to the daemon, or was dropped).
const FASTPATH: [&str; 6] = [
    "miss",
    "expired",
    "pass_error",
    "pass_race",
    "drop_error",
    "pass_room",
];

/// All the counters now.
pub(crate) fn read(t: &Topo, fastpath: bool) -> Counters {
    let mut c = Counters::new();
    for (side, ns) in [("client", &t.client), ("node", &t.node)] {
        let snmp = ns.output("cat", &["/proc/net/snmp"]);
        for (k, v) in udp(&String::from_utf8_lossy(&snmp.stdout)) {
            if UDP_DROPS.contains(&k.as_str()) {
                c.insert(format!("{side} udp {k}"), v);
            }
        }
        let dev = ns.output("cat", &["/proc/net/dev"]);
        for (iface, rx, tx) in dev_drops(&String::from_utf8_lossy(&dev.stdout)) {
            c.insert(format!("{side} {iface} rx_dropped"), rx);
            c.insert(format!("{side} {iface} tx_dropped"), tx);
        }
    }
    if fastpath {
        for (k, v) in kernel_stats(t) {
            if FASTPATH.contains(&k.as_str()) {
                c.insert(format!("fast path {k}"), v);
            }
        }
    }
    c
}

/// Adds `after - before` (where it grew) to `into`.
pub(crate) fn add_growth(into: &mut Counters, before: &Counters, after: &Counters) {
    for (k, &a) in after {
        let d = a.saturating_sub(before.get(k).copied().unwrap_or(0));
        if d > 0 {
            *into.entry(k.clone()).or_default() += d;
        }
    }
}

/// The `Udp:` header and value lines of /proc/net/snmp, paired.
fn udp(snmp: &str) -> Vec<(String, u64)> {
    let mut lines = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return Vec::new();
    };
    names
        .split_whitespace()
        .skip(1)
        .zip(values.split_whitespace().skip(1))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

/// (interface, rx drops, tx drops) from /proc/net/dev, loopback left out.
fn dev_drops(dev: &str) -> Vec<(String, u64, u64)> {
    dev.lines()
        .filter_map(|l| {
            let (iface, rest) = l.split_once(':')?;
            let f: Vec<u64> = rest
                .split_whitespace()
                .map(|v| v.parse().ok())
                .collect::<Option<_>>()?;
            // rx: bytes packets errs drop ...; tx starts at the 9th field.
            (f.len() >= 12 && iface.trim() != "lo").then(|| (iface.trim().to_string(), f[3], f[11]))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{dev_drops, udp};

    #[test]
    fn parses_proc_net() {
        let snmp = "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors\nUdp: 10 1 7 9 5 0 0 0 0\nUdpLite: InDatagrams\nUdpLite: 0\n";
        let u = udp(snmp);
        assert!(u.contains(&("InErrors".into(), 7)));
        assert!(u.contains(&("RcvbufErrors".into(), 5)));
        let dev = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0\n  eth0: 1000 10 0 3 0 0 0 0 2000 20 0 4 0 0 0 0\n";
        assert_eq!(dev_drops(dev), vec![("eth0".to_string(), 3, 4)]);
    }
}
