//! The daemon's Prometheus endpoint, read from inside a namespace and
//! parsed by the Prometheus client library's own OpenMetrics parser (not
//! by our code).

use crate::netns::Netns;

/// Debian's Python with python3-prometheus-client (not a pyenv shim).
pub const PYTHON: &str = "/usr/bin/python3";

/// Scrapes `url` and parses it with prometheus_client's OpenMetrics parser;
/// returns `name{labels} value` lines of the samples (labels sorted).
pub fn scrape(ns: &Netns, url: &str) -> Vec<String> {
    let script = r#"
import sys, urllib.request
from prometheus_client.openmetrics.parser import text_string_to_metric_families
text = urllib.request.urlopen(sys.argv[1], timeout=5).read().decode()
for fam in text_string_to_metric_families(text):
    for s in fam.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        print(f"{s.name}{{{labels}}} {s.value}")
"#;
    let o = ns.output(PYTHON, &["-c", script, url]);
    assert!(
        o.status.success(),
        "scrape did not parse: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Sum of the samples named `name` whose labels contain every `want`.
pub fn sum(samples: &[String], name: &str, want: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| want.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
