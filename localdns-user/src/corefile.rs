//! The CoreDNS Corefile a configuration means, as AKS LocalDNS generates it
//! (AgentBaker's template): the health-check block, then one `<zone>:53`
//! block per zone and view with errors/log, bind, the optional hosts file,
//! forward, ready, cache (capacities, serve_stale, servfail 0), loop, nsid,
//! prometheus and, in `.` blocks, the search-list NXDOMAIN templates. Zones
//! come in the order Go's template gives map keys: sorted by key.

use std::fmt::Write as _;

use crate::config::{Config, Destination, Policy, Protocol, QueryLogging, ServeStale, ViewKind};

/// What the Corefile needs besides the config file.
pub struct Context<'a> {
    pub vnet_listen: &'a str,
    pub kube_listen: &'a str,
    /// `forward` target of VnetDNS zones (AKS: 168.63.129.16).
    pub vnet_dns: &'a str,
    /// `forward` target of ClusterCoreDNS zones (the kube-dns service IP).
    pub cluster_dns: &'a str,
    /// Cache capacities per kind (AKS: 9984 each).
    pub success_cap: usize,
    pub denial_cap: usize,
    /// `hosts` file served before forwarding in `.` blocks, if any.
    pub hosts_file: Option<&'a str>,
    /// Port of `prometheus :PORT` and of `ready ADDR:PORT`.
    pub metrics_port: u16,
    pub ready_port: u16,
}

const HEADER: &str =
    "# ***********************************************************************************
# WARNING: Changes to this file will be overwritten and not persisted.
# ***********************************************************************************
";

/// Search-list junk answered NXDOMAIN in `.` blocks (names with four or
/// more labels before internal.cloudapp.net, anything under
/// reddog.microsoft.com).
const TEMPLATES: &str = r#"    template ANY ANY internal.cloudapp.net {
        match "^(?:[^.]+\.){4,}internal\.cloudapp\.net\.$"
        rcode NXDOMAIN
        fallthrough
    }
    template ANY ANY reddog.microsoft.com {
        rcode NXDOMAIN
    }
"#;

pub fn render(cfg: &Config, ctx: &Context<'_>) -> String {
    let mut out = String::from(HEADER);
    let _ = writeln!(out, "# whoami (used for health check of DNS)");
    let _ = writeln!(
        out,
        "health-check.localdns.local:53 {{\n    bind {} {}\n    whoami\n}}",
        ctx.vnet_listen, ctx.kube_listen
    );
    for (view, bind, nsid, comment) in [
        (
            ViewKind::Vnet,
            ctx.vnet_listen,
            "localdns",
            "# VnetDNS overrides apply to DNS traffic from pods with dnsPolicy:default or kubelet (referred to as VnetDNS traffic).",
        ),
        (
            ViewKind::Kube,
            ctx.kube_listen,
            "localdns-pod",
            "# KubeDNS overrides apply to DNS traffic from pods with dnsPolicy:ClusterFirst (referred to as KubeDNS traffic).",
        ),
    ] {
        let _ = writeln!(out, "{comment}");
        let mut zones: Vec<_> = cfg.zones(view).iter().collect();
        zones.sort_by(|a, b| a.text.cmp(&b.text));
        for z in zones {
            let s = &z.settings;
            let root = z.name == [0];
            let _ = writeln!(out, "{}:53 {{", z.text);
            let _ = writeln!(
                out,
                "    {}",
                match s.query_logging {
                    QueryLogging::Error => "errors",
                    QueryLogging::Log => "log",
                }
            );
            let _ = writeln!(out, "    bind {bind}");
            if let (true, Some(h)) = (root, ctx.hosts_file) {
                let _ = writeln!(
                    out,
                    "    hosts {h} {{\n        ttl 5\n        reload 5s\n        fallthrough\n    }}"
                );
            }
            let target = match s.destination {
                Destination::VnetDns => ctx.vnet_dns,
                Destination::ClusterCoreDns => ctx.cluster_dns,
            };
            let _ = writeln!(out, "    forward . {target} {{");
            let proto = match s.protocol {
                Protocol::ForceTcp => "force_tcp",
                Protocol::PreferUdp => "prefer_udp",
            };
            let policy = match s.policy {
                Policy::Sequential => "sequential",
                Policy::RoundRobin => "round_robin",
                Policy::Random => "random",
            };
            let _ = writeln!(
                out,
                "        {proto}\n        policy {policy}\n        max_concurrent {}\n    }}",
                s.max_concurrent
            );
            let _ = writeln!(out, "    ready {bind}:{}", ctx.ready_port);
            let _ = writeln!(
                out,
                "    cache {} {{\n        success {}\n        denial {}",
                s.cache_secs, ctx.success_cap, ctx.denial_cap
            );
            match s.serve_stale {
                ServeStale::Disable => {}
                ServeStale::Verify => {
                    let _ = writeln!(out, "        serve_stale {}s verify", s.stale_secs);
                }
                ServeStale::Immediate => {
                    let _ = writeln!(out, "        serve_stale {}s immediate", s.stale_secs);
                }
            }
            let _ = writeln!(out, "        servfail 0\n    }}");
            let _ = writeln!(
                out,
                "    loop\n    nsid {nsid}\n    prometheus :{}",
                ctx.metrics_port
            );
            if root {
                out.push_str(TEMPLATES);
            }
            let _ = writeln!(out, "}}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DEFAULT_CONFIG, parse};

    const CTX: Context<'static> = Context {
        vnet_listen: "169.254.10.10",
        kube_listen: "169.254.10.11",
        vnet_dns: "168.63.129.16",
        cluster_dns: "10.0.0.10",
        success_cap: 9984,
        denial_cap: 9984,
        hosts_file: None,
        metrics_port: 9253,
        ready_port: 8181,
    };

    /// What AgentBaker's LocalDNS template produces for the sample profile
    /// (as we run it: Preferred mode replaced the sample's Verify on the
    /// ForceTCP cluster.local zones by the default, Immediate).
    const GOLDEN: &str = include_str!("../testdata/sample.Corefile");

    #[test]
    fn sample_profile_renders_the_aks_corefile() {
        let cfg = parse(DEFAULT_CONFIG).unwrap().config;
        let got = render(&cfg, &CTX);
        if got != GOLDEN {
            for (i, (g, w)) in got.lines().zip(GOLDEN.lines()).enumerate() {
                assert_eq!(g, w, "line {}", i + 1);
            }
            assert_eq!(got.lines().count(), GOLDEN.lines().count(), "{got}");
        }
    }

    #[test]
    fn hosts_file_goes_into_root_blocks_only() {
        let cfg = parse(DEFAULT_CONFIG).unwrap().config;
        let ctx = Context {
            hosts_file: Some("/etc/localdns/hosts"),
            ..CTX
        };
        let c = render(&cfg, &ctx);
        assert_eq!(c.matches("hosts /etc/localdns/hosts {").count(), 2, "{c}");
        let cl = c.split("cluster.local:53 {").nth(1).unwrap();
        assert!(!cl.split('}').next().unwrap().contains("hosts"));
    }

    #[test]
    fn bing_block_from_the_doc() {
        let text = r#"{"localDNSProfile":{"mode":"Preferred","kubeDNSOverrides":{"bing.com":{
            "queryLogging":"Log","protocol":"ForceTCP","forwardDestination":"ClusterCoreDNS",
            "forwardPolicy":"Sequential","maxConcurrent":1000,"cacheDurationInSeconds":3600,
            "serveStaleDurationInSeconds":3600,"serveStale":"Verify"}}}}"#;
        let l = parse(text).unwrap();
        // ForceTCP + Verify is invalid: Preferred keeps running on Immediate.
        assert_eq!(l.warnings.len(), 1);
        let c = render(&l.config, &CTX);
        assert!(
            c.contains("bing.com:53 {\n    log\n    bind 169.254.10.11\n    forward . 10.0.0.10 {\n        force_tcp\n        policy sequential\n"),
            "{c}"
        );
        assert!(c.contains("serve_stale 3600s immediate"), "{c}");
    }
}
