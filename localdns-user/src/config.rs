//! `localdnsconfig.json`: parsing, defaults and validation with AKS
//! semantics. Every problem names its JSON path and the rule it breaks.
//! `Required`: any problem is fatal. `Preferred`: each invalid setting is
//! replaced by its default (or an unknown property ignored) with a warning.

use std::fmt;

use serde_json::{Map, Value};
use thiserror::Error;

use crate::wire::text_to_wire_lower;

/// The sample profile of the AKS LocalDNS document, used without `--config`.
pub const DEFAULT_CONFIG: &str = include_str!("../default-localdnsconfig.json");

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not valid JSON: {source}")]
    Json {
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid configuration:\n{}", list(.problems))]
    Invalid { problems: Vec<Problem> },
}

fn list(p: &[Problem]) -> String {
    p.iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One thing wrong with a configuration: where, and which rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub rule: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.rule)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Required,
    Preferred,
    Disabled,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryLogging {
    Error,
    Log,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    PreferUdp,
    ForceTcp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    VnetDns,
    ClusterCoreDns,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    Sequential,
    RoundRobin,
    Random,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServeStale {
    Verify,
    Immediate,
    Disable,
}

/// The eight per-zone settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneSettings {
    pub query_logging: QueryLogging,
    pub protocol: Protocol,
    pub destination: Destination,
    pub policy: Policy,
    pub max_concurrent: u32,
    pub cache_secs: u32,
    pub stale_secs: u32,
    pub serve_stale: ServeStale,
}

/// Which override map a zone belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViewKind {
    Vnet,
    Kube,
}

impl ViewKind {
    pub fn json_key(self) -> &'static str {
        match self {
            ViewKind::Vnet => "vnetDNSOverrides",
            ViewKind::Kube => "kubeDNSOverrides",
        }
    }
}

impl ZoneSettings {
    /// AKS defaults for `zone` (lower-case wire form) in `view`.
    pub fn default_for(view: ViewKind, zone: &[u8]) -> Self {
        let cluster_local = zone == b"\x07cluster\x05local\x00";
        ZoneSettings {
            query_logging: QueryLogging::Error,
            protocol: if cluster_local {
                Protocol::ForceTcp
            } else {
                Protocol::PreferUdp
            },
            destination: if cluster_local || view == ViewKind::Kube {
                Destination::ClusterCoreDns
            } else {
                Destination::VnetDns
            },
            // The reference document's default (CoreDNS's own); later AKS
            // documents say Sequential.
            policy: Policy::Random,
            max_concurrent: 1000,
            cache_secs: 3600,
            stale_secs: 3600,
            serve_stale: ServeStale::Immediate,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Zone {
    /// Lower-case wire form; `[0]` is the root zone.
    pub name: Vec<u8>,
    /// As written in the file (for logs and the Corefile).
    pub text: String,
    pub settings: ZoneSettings,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub mode: Mode,
    pub vnet: Vec<Zone>,
    pub kube: Vec<Zone>,
}

impl Config {
    pub fn zones(&self, view: ViewKind) -> &[Zone] {
        match view {
            ViewKind::Vnet => &self.vnet,
            ViewKind::Kube => &self.kube,
        }
    }
}

/// A parsed configuration plus what Preferred mode replaced.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<Problem>,
}

pub fn load_file(path: &str) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_string(),
        source,
    })?;
    parse(&text)
}

const ZONE_FIELDS: [&str; 8] = [
    "queryLogging",
    "protocol",
    "forwardDestination",
    "forwardPolicy",
    "maxConcurrent",
    "cacheDurationInSeconds",
    "serveStaleDurationInSeconds",
    "serveStale",
];

/// Enum spellings vary between AKS documents: compare case-insensitively
/// with `_`/`-` dropped.
fn norm(s: &str) -> String {
    s.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

fn enum_field<T: Copy>(
    v: &Value,
    path: &str,
    choices: &[(&str, T)],
    problems: &mut Vec<Problem>,
) -> Option<T> {
    let allowed = || choices.iter().map(|c| c.0).collect::<Vec<_>>().join(", ");
    match v.as_str() {
        Some(s) => match choices.iter().find(|(name, _)| norm(name) == norm(s)) {
            Some((_, t)) => Some(*t),
            None => {
                problems.push(Problem {
                    path: path.into(),
                    rule: format!("{s:?} is not one of {}", allowed()),
                });
                None
            }
        },
        None => {
            problems.push(Problem {
                path: path.into(),
                rule: format!("must be a string, one of {}", allowed()),
            });
            None
        }
    }
}

fn int_field(
    v: &Value,
    path: &str,
    min: u64,
    max: u64,
    problems: &mut Vec<Problem>,
) -> Option<u32> {
    match v.as_i64() {
        Some(n) if n >= min as i64 && n <= max as i64 => Some(n as u32),
        _ => {
            problems.push(Problem {
                path: path.into(),
                rule: format!("must be an integer from {min} to {max}"),
            });
            None
        }
    }
}

/// Parses and validates. In Preferred mode the result carries warnings; in
/// Required mode any problem is an error listing all of them.
pub fn parse(text: &str) -> Result<Loaded, ConfigError> {
    let root: Value = serde_json::from_str(text).map_err(|source| ConfigError::Json { source })?;
    let mut problems = Vec::new();
    let empty = Map::new();
    let root_obj = match root.as_object() {
        Some(o) => o,
        None => {
            return Err(ConfigError::Invalid {
                problems: vec![Problem {
                    path: "$".into(),
                    rule: "must be a JSON object".into(),
                }],
            });
        }
    };
    for k in root_obj.keys().filter(|k| *k != "localDNSProfile") {
        problems.push(Problem {
            path: format!("$.{k}"),
            rule: "unknown property".into(),
        });
    }
    let profile = match root_obj.get("localDNSProfile") {
        Some(Value::Object(o)) => o,
        Some(_) => {
            problems.push(Problem {
                path: "$.localDNSProfile".into(),
                rule: "must be an object".into(),
            });
            &empty
        }
        None => {
            problems.push(Problem {
                path: "$.localDNSProfile".into(),
                rule: "is required".into(),
            });
            &empty
        }
    };
    for k in profile.keys() {
        if !["mode", "vnetDNSOverrides", "kubeDNSOverrides"].contains(&k.as_str()) {
            problems.push(Problem {
                path: format!("$.localDNSProfile.{k}"),
                rule: "unknown property".into(),
            });
        }
    }
    let mode = match profile.get("mode") {
        None => Mode::Preferred,
        Some(v) => {
            let mut bad = Vec::new();
            match enum_field(
                v,
                "$.localDNSProfile.mode",
                &[
                    ("Required", Mode::Required),
                    ("Preferred", Mode::Preferred),
                    ("Disabled", Mode::Disabled),
                ],
                &mut bad,
            ) {
                Some(m) => m,
                // Without a valid mode nothing says how to treat the other
                // problems (the AKS API rejects it too): always fatal.
                None => {
                    bad.append(&mut problems);
                    return Err(ConfigError::Invalid { problems: bad });
                }
            }
        }
    };
    let vnet = parse_view(profile, ViewKind::Vnet, &mut problems);
    let kube = parse_view(profile, ViewKind::Kube, &mut problems);
    let config = Config { mode, vnet, kube };
    if mode == Mode::Required && !problems.is_empty() {
        return Err(ConfigError::Invalid { problems });
    }
    Ok(Loaded {
        config,
        warnings: problems,
    })
}

fn parse_view(
    profile: &Map<String, Value>,
    view: ViewKind,
    problems: &mut Vec<Problem>,
) -> Vec<Zone> {
    let base = format!("$.localDNSProfile.{}", view.json_key());
    let mut zones: Vec<Zone> = Vec::new();
    match profile.get(view.json_key()) {
        None => {}
        Some(Value::Object(map)) => {
            for (zname, zval) in map {
                let zpath = format!("{base}[{zname:?}]");
                let Some(wire) = text_to_wire_lower(zname) else {
                    problems.push(Problem {
                        path: zpath,
                        rule: "zone is not a valid domain name".into(),
                    });
                    continue;
                };
                if zones.iter().any(|z| z.name == wire) {
                    problems.push(Problem {
                        path: zpath,
                        rule: "zone is listed twice (names compare case-insensitively, trailing dot optional)".into(),
                    });
                    continue;
                }
                let settings = parse_zone(zval, &zpath, view, &wire, problems);
                zones.push(Zone {
                    name: wire,
                    text: zname.clone(),
                    settings,
                });
            }
        }
        Some(_) => problems.push(Problem {
            path: base,
            rule: "must be an object of zones".into(),
        }),
    }
    // Both views always serve "." and cluster.local, as AKS generates them.
    for must in [".", "cluster.local"] {
        let wire = text_to_wire_lower(must).expect("static name");
        if !zones.iter().any(|z| z.name == wire) {
            let settings = ZoneSettings::default_for(view, &wire);
            zones.push(Zone {
                name: wire,
                text: must.into(),
                settings,
            });
        }
    }
    // Longest zone first: the first suffix match is the most specific.
    zones.sort_by(|a, b| b.name.len().cmp(&a.name.len()).then(a.name.cmp(&b.name)));
    zones
}

fn parse_zone(
    v: &Value,
    zpath: &str,
    view: ViewKind,
    wire: &[u8],
    problems: &mut Vec<Problem>,
) -> ZoneSettings {
    let mut s = ZoneSettings::default_for(view, wire);
    let Some(obj) = v.as_object() else {
        problems.push(Problem {
            path: zpath.into(),
            rule: "must be an object".into(),
        });
        return s;
    };
    for (k, v) in obj {
        let p = format!("{zpath}.{k}");
        match k.as_str() {
            "queryLogging" => {
                if let Some(x) = enum_field(
                    v,
                    &p,
                    &[("Error", QueryLogging::Error), ("Log", QueryLogging::Log)],
                    problems,
                ) {
                    s.query_logging = x;
                }
            }
            "protocol" => {
                if let Some(x) = enum_field(
                    v,
                    &p,
                    &[
                        ("PreferUDP", Protocol::PreferUdp),
                        ("ForceTCP", Protocol::ForceTcp),
                    ],
                    problems,
                ) {
                    s.protocol = x;
                }
            }
            "forwardDestination" => {
                if let Some(x) = enum_field(
                    v,
                    &p,
                    &[
                        ("VnetDNS", Destination::VnetDns),
                        ("ClusterCoreDNS", Destination::ClusterCoreDns),
                    ],
                    problems,
                ) {
                    s.destination = x;
                }
            }
            "forwardPolicy" => {
                if let Some(x) = enum_field(
                    v,
                    &p,
                    &[
                        ("Sequential", Policy::Sequential),
                        ("RoundRobin", Policy::RoundRobin),
                        ("Random", Policy::Random),
                    ],
                    problems,
                ) {
                    s.policy = x;
                }
            }
            "maxConcurrent" => {
                if let Some(x) = int_field(v, &p, 1, 100_000, problems) {
                    s.max_concurrent = x;
                }
            }
            "cacheDurationInSeconds" => {
                if let Some(x) = int_field(v, &p, 1, 604_800, problems) {
                    s.cache_secs = x;
                }
            }
            "serveStaleDurationInSeconds" => {
                if let Some(x) = int_field(v, &p, 0, 604_800, problems) {
                    s.stale_secs = x;
                }
            }
            "serveStale" => {
                if let Some(x) = enum_field(
                    v,
                    &p,
                    &[
                        ("Verify", ServeStale::Verify),
                        ("Immediate", ServeStale::Immediate),
                        ("Disable", ServeStale::Disable),
                    ],
                    problems,
                ) {
                    s.serve_stale = x;
                }
            }
            _ => problems.push(Problem {
                path: p,
                rule: format!("unknown property (allowed: {})", ZONE_FIELDS.join(", ")),
            }),
        }
    }
    let defaults = ZoneSettings::default_for(view, wire);
    let is_root = wire == [0];
    let is_cluster_local = wire == b"\x07cluster\x05local\x00";
    if view == ViewKind::Vnet && is_root && s.destination == Destination::ClusterCoreDns {
        problems.push(Problem {
            path: format!("{zpath}.forwardDestination"),
            rule: "the \".\" zone of vnetDNSOverrides cannot forward to ClusterCoreDNS".into(),
        });
        s.destination = defaults.destination;
    }
    if is_cluster_local && s.destination == Destination::VnetDns {
        problems.push(Problem {
            path: format!("{zpath}.forwardDestination"),
            rule: "cluster.local cannot forward to VnetDNS".into(),
        });
        s.destination = defaults.destination;
    }
    if s.protocol == Protocol::ForceTcp && s.serve_stale == ServeStale::Verify {
        problems.push(Problem {
            path: format!("{zpath}.serveStale"),
            rule: "serveStale Verify cannot be combined with protocol ForceTCP".into(),
        });
        s.serve_stale = defaults.serve_stale;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_the_aks_sample() {
        let l = parse(DEFAULT_CONFIG).unwrap();
        assert_eq!(l.config.mode, Mode::Preferred);
        let root = l.config.vnet.iter().find(|z| z.name == [0]).unwrap();
        assert_eq!(root.settings.destination, Destination::VnetDns);
        assert_eq!(root.settings.policy, Policy::Sequential);
        assert_eq!(root.settings.serve_stale, ServeStale::Verify);
        // The sample pairs ForceTCP with Verify on cluster.local: Preferred
        // mode runs with the default (Immediate) and says so.
        assert_eq!(l.warnings.len(), 2, "{:?}", l.warnings);
        assert!(
            l.warnings
                .iter()
                .all(|w| w.path.ends_with("[\"cluster.local\"].serveStale"))
        );
        let cl = l
            .config
            .kube
            .iter()
            .find(|z| z.text == "cluster.local")
            .unwrap();
        assert_eq!(cl.settings.protocol, Protocol::ForceTcp);
        assert_eq!(cl.settings.serve_stale, ServeStale::Immediate);
        // Longest first.
        assert_eq!(l.config.kube[0].text, "cluster.local");
    }

    #[test]
    fn required_mode_lists_every_problem() {
        let text = r#"{"localDNSProfile":{"mode":"Required","vnetDNSOverrides":{
            ".":{"forwardDestination":"ClusterCoreDNS","maxConcurrent":-1,"bogus":1},
            "Cluster.Local.":{"forwardDestination":"vnetdns","protocol":"ForceTCP","serveStale":"verify"}}}}"#;
        let ConfigError::Invalid { problems } = parse(text).unwrap_err() else {
            panic!()
        };
        let paths: Vec<_> = problems.iter().map(|p| p.path.as_str()).collect();
        assert!(paths.contains(&"$.localDNSProfile.vnetDNSOverrides[\".\"].forwardDestination"));
        assert!(paths.contains(&"$.localDNSProfile.vnetDNSOverrides[\".\"].maxConcurrent"));
        assert!(paths.contains(&"$.localDNSProfile.vnetDNSOverrides[\".\"].bogus"));
        assert!(paths.contains(
            &"$.localDNSProfile.vnetDNSOverrides[\"Cluster.Local.\"].forwardDestination"
        ));
        assert!(
            paths.contains(&"$.localDNSProfile.vnetDNSOverrides[\"Cluster.Local.\"].serveStale")
        );
        assert_eq!(problems.len(), 5);
    }

    #[test]
    fn enum_spellings_and_defaults() {
        let text = r#"{"localDNSProfile":{"mode":"preferred","kubeDNSOverrides":{
            "example.com":{"forwardPolicy":"round_robin","serveStale":"Disable","protocol":"forcetcp"},
            "b.com":{"forwardPolicy":"RoundRobin"}}}}"#;
        let l = parse(text).unwrap();
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        let z = l
            .config
            .kube
            .iter()
            .find(|z| z.text == "example.com")
            .unwrap();
        assert_eq!(z.settings.policy, Policy::RoundRobin);
        assert_eq!(z.settings.serve_stale, ServeStale::Disable);
        assert_eq!(z.settings.protocol, Protocol::ForceTcp);
        assert_eq!(z.settings.destination, Destination::ClusterCoreDns);
        assert_eq!(z.settings.cache_secs, 3600);
        assert_eq!(z.settings.policy, Policy::RoundRobin);
        assert_eq!(l.config.vnet.len(), 2, "defaults fill the missing view");
    }

    #[test]
    fn integer_ranges() {
        let cases = [
            ("maxConcurrent", "0", false),
            ("maxConcurrent", "1", true),
            ("maxConcurrent", "100000", true),
            ("maxConcurrent", "100001", false),
            ("maxConcurrent", "-5", false),
            ("maxConcurrent", "1.5", false),
            ("maxConcurrent", "\"10\"", false),
            ("cacheDurationInSeconds", "0", false),
            ("cacheDurationInSeconds", "604800", true),
            ("cacheDurationInSeconds", "604801", false),
            ("serveStaleDurationInSeconds", "0", true),
            ("serveStaleDurationInSeconds", "-1", false),
            ("serveStaleDurationInSeconds", "99999999999", false),
        ];
        for (field, value, ok) in cases {
            let text = format!(
                r#"{{"localDNSProfile":{{"mode":"Required","kubeDNSOverrides":{{"a.com":{{"{field}":{value}}}}}}}}}"#
            );
            match parse(&text) {
                Ok(_) => assert!(ok, "{field}={value} accepted"),
                Err(ConfigError::Invalid { problems }) => {
                    assert!(!ok, "{field}={value} rejected: {problems:?}");
                    assert_eq!(problems.len(), 1);
                    assert!(
                        problems[0].path.ends_with(field)
                            && problems[0].rule.contains("integer from"),
                        "{problems:?}"
                    );
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn preferred_mode_replaces_invalid_values_with_defaults() {
        let text = r#"{"localDNSProfile":{"mode":"Preferred","vnetDNSOverrides":{".":{"maxConcurrent":-3,"protocol":"QUIC","forwardDestination":"ClusterCoreDNS","cacheDurationInSeconds":60}}}}"#;
        let l = parse(text).unwrap();
        assert_eq!(l.warnings.len(), 3, "{:?}", l.warnings);
        let root = l.config.vnet.iter().find(|z| z.name == [0]).unwrap();
        assert_eq!(root.settings.max_concurrent, 1000);
        assert_eq!(root.settings.protocol, Protocol::PreferUdp);
        assert_eq!(root.settings.destination, Destination::VnetDns);
        assert_eq!(root.settings.cache_secs, 60, "valid settings are kept");
    }

    #[test]
    fn invalid_mode_is_an_error() {
        for mode in ["\"Sometimes\"", "1", "null"] {
            let text = DEFAULT_CONFIG.replace("\"Preferred\"", mode);
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains("$.localDNSProfile.mode"), "{e}");
        }
    }

    #[test]
    fn disabled_mode_parses() {
        let l = parse(r#"{"localDNSProfile":{"mode":"disabled"}}"#).unwrap();
        assert_eq!(l.config.mode, Mode::Disabled);
    }

    #[test]
    fn duplicate_zone_and_bad_json() {
        let text = r#"{"localDNSProfile":{"mode":"Required","kubeDNSOverrides":{"a.com":{},"A.COM.":{}}}}"#;
        assert!(matches!(parse(text), Err(ConfigError::Invalid { .. })));
        assert!(matches!(parse("{"), Err(ConfigError::Json { .. })));
    }
}
