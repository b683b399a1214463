//! The report: the Markdown table, the SVG plots, the README section.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

use crate::contenders::Kind;

pub(crate) fn num(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

pub(crate) fn fmt_k(x: f64) -> String {
    if x.is_nan() {
        "n/a".into()
    } else if x >= 1000.0 {
        format!("{:.0}k", x / 1000.0)
    } else {
        format!("{x:.0}")
    }
}

/// `x` with `digits` decimals, or "n/a" (a run without that figure).
fn or_na(x: f64, digits: usize) -> String {
    if x.is_finite() {
        format!("{x:.digits$}")
    } else {
        "n/a".into()
    }
}

pub(crate) fn lat(v: &Value, k: &str) -> String {
    match v[k].as_array() {
        Some(a) if a.len() == 3 => format!(
            "{:.0} / {:.0} / {:.0}",
            a[0].as_f64().unwrap(),
            a[1].as_f64().unwrap(),
            a[2].as_f64().unwrap()
        ),
        _ => "n/a".into(),
    }
}

pub(crate) fn table(results: &[Value], meta: &Value) -> String {
    let null = results.iter().find(|r| r["name"] == Kind::Null.name());
    let ceiling = null.map(|n| num(n, "w1_kxdpgun_qps")).unwrap_or(f64::NAN);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Run {} on {} ({} cores, kernel {}), `{}`; medians of {} run(s) of {} s; fixed rate {} qps. Latency in µs (p50 / p99 / p99.9). Upstream: NSD in its own netns (no added latency: this kernel has no netem).\n",
        meta["date"].as_str().unwrap_or(""),
        meta["host"].as_str().unwrap_or(""),
        meta["cores"],
        meta["kernel"].as_str().unwrap_or(""),
        meta["command"].as_str().unwrap_or(""),
        meta["runs"],
        meta["secs"],
        meta["fixed_qps"]
    );
    let _ = writeln!(
        s,
        "| contender | W1 hits, kxdpgun q/s | × null | W1 hits, dnsperf q/s | latency @ fixed rate | latency @ saturation | server CPU s / 1M answers | peak RSS MiB | W2 90/10 mix q/s | W3 misses q/s | lost (W1/W2/W3) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let kx = num(r, "w1_kxdpgun_qps");
        let _ = writeln!(
            s,
            "| {} | {} | {:.2} | {} | {} | {} | {:.2} | {:.0} | {} | {} | {:.0}/{:.0}/{:.0} |",
            r["name"].as_str().unwrap(),
            fmt_k(kx),
            kx / ceiling,
            fmt_k(num(r, "w1_dnsperf_qps")),
            lat(r, "fixed_latency_us"),
            lat(r, "sat_latency_us"),
            num(r, "cpu_s_per_million"),
            num(r, "peak_rss_kib") / 1024.0,
            fmt_k(num(r, "w2_qps")),
            fmt_k(num(r, "w3_qps")),
            num(r, "w1_dnsperf_lost") + num(r, "fixed_lost"),
            num(r, "w2_lost"),
            num(r, "w3_lost"),
        );
    }
    let _ = writeln!(
        s,
        "\nLoad generators' own CPU (busy fraction of one core, median): {}.",
        results
            .iter()
            .map(|r| format!(
                "{}: kxdpgun {:.2}, dnsperf {:.2}",
                r["name"].as_str().unwrap(),
                num(r, "w1_kxdpgun_client_cpu"),
                num(r, "w1_dnsperf_client_cpu")
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    s.push_str(&loss_lines(results));
    let live = |kind: Kind, k: &str| {
        results
            .iter()
            .find(|r| r["name"] == kind.name())
            .map_or(f64::NAN, |r| num(r, k))
    };
    let tr = &meta["prog_test_run_ns"];
    let _ = writeln!(
        s,
        "\nKernel cost per packet: `BPF_PROG_TEST_RUN` median {:.0} ns per fast-path hit vs {:.0} ns for the null responder (the XDP_TX ceiling). Live (`run_time_ns / run_cnt`, bpf_stats on): {:.0} ns per hit at saturation and {:.0} ns at the fixed rate, vs {:.0} / {:.0} ns for the null responder.",
        tr["localdns_xdp"].as_f64().unwrap_or(f64::NAN),
        tr["localdns_null"].as_f64().unwrap_or(f64::NAN),
        live(Kind::Localdns, "sat_bpf_ns_per_run"),
        live(Kind::Localdns, "fixed_bpf_ns_per_run"),
        live(Kind::Null, "sat_bpf_ns_per_run"),
        live(Kind::Null, "fixed_bpf_ns_per_run"),
    );
    if let Some(md) = tr["profile_md"].as_str() {
        let _ = writeln!(
            s,
            "\nWhere a hit's time goes in `BPF_PROG_TEST_RUN` (each prefix loaded with a `FAULT_STOP_*` global; `repeat` times the untouched prefixes):\n\n{md}"
        );
    }
    s.push_str(&warmset_table(meta));
    s.push_str(&share_line(&meta["share"]));
    s
}

/// For each contender and workload that lost queries: how many, and the
/// drop counters that grew over those runs (`losses`), so a loss says where
/// it happened.
fn loss_lines(results: &[Value]) -> String {
    let mut rows = String::new();
    for r in results {
        let phases = [
            ("W1", num(r, "w1_dnsperf_lost") + num(r, "fixed_lost"), "w1"),
            ("W2", num(r, "w2_lost"), "w2"),
            ("W3", num(r, "w3_lost"), "w3"),
        ];
        for (label, lost, key) in phases {
            if lost.is_nan() || lost <= 0.0 {
                continue;
            }
            let grew: Vec<String> = r["loss_counters"][key]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| format!("{k} +{v}")).collect())
                .unwrap_or_default();
            let _ = writeln!(
                rows,
                "| {} | {label} | {lost:.0} | {} |",
                r["name"].as_str().unwrap_or(""),
                if grew.is_empty() {
                    "none".to_string()
                } else {
                    grew.join(", ")
                }
            );
        }
    }
    if rows.is_empty() {
        return rows;
    }
    format!(
        "\nWhere the lost queries went (dnsperf runs; drop counters that grew over them, read in the client and node netns; `loss_counters` in results.json):\n\n| contender | workload | lost | counters that grew |\n|---|---|---|---|\n{rows}"
    )
}

/// Per-hit BPF cost against the warm set: localdns, the null responder
/// and (runs since the floor was added) the floor.
fn warmset_table(meta: &Value) -> String {
    let Some(sweep) = meta["warmset"].as_array() else {
        return String::new();
    };
    let find = |k: Kind| {
        sweep
            .iter()
            .find(|v| v["name"] == k.name())
            .and_then(|v| v["rows"].as_array())
    };
    let (Some(null), Some(ours)) = (find(Kind::Null), find(Kind::Localdns)) else {
        return String::new();
    };
    let floor = find(Kind::Floor);
    let mut s = format!(
        "\nLive BPF cost per packet (`run_time_ns / run_cnt`) against the warm set, kxdpgun at {} q/s, A queries over the set in turn, then the same set at saturation; medians of {} run(s) of {} s (plot: `docs/bench/warmset.svg`). The floor is the null responder after one 64-byte read of per-name memory (a page-aligned array, one line per name): the least any cache lookup costs.\n\n| warm names | localdns ns/hit | floor ns/packet | null ns/packet | × null | saturation: localdns ns/hit | floor | null | localdns replies/s | floor replies/s | null replies/s | rate × null | floor rate × null |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        meta["warmset_rate"], meta["runs"], meta["secs"]
    );
    for (i, (n, o)) in null.iter().zip(ours).enumerate() {
        let (a, b) = (num(o, "bpf_ns_per_run"), num(n, "bpf_ns_per_run"));
        let (ra, rb) = (num(o, "sat_replies_per_s"), num(n, "sat_replies_per_s"));
        // The floor's row, where the run has one (NaN figures otherwise).
        let fr = floor.and_then(|f| f.get(i));
        let fl = |k: &str| fr.map_or(f64::NAN, |r| num(r, k));
        let rf = fl("sat_replies_per_s");
        let floor_ok = fr.is_none_or(|r| r["all_noerror"] == true);
        let _ = writeln!(
            s,
            "| {}{} | {a:.0} | {} | {b:.0} | {:.1} | {:.0} | {} | {:.0} | {} | {} | {} | {:.2} | {} |",
            o["names"],
            row_caveat(o, n, floor_ok),
            or_na(fl("bpf_ns_per_run"), 0),
            a / b,
            num(o, "sat_bpf_ns_per_run"),
            or_na(fl("sat_bpf_ns_per_run"), 0),
            num(n, "sat_bpf_ns_per_run"),
            fmt_k(ra),
            fmt_k(rf),
            fmt_k(rb),
            ra / rb,
            or_na(rf / rb, 2),
        );
    }
    s.push_str(&memory_latency_line(&meta["memory_latency"]));
    s
}

/// What makes a sweep row measure something other than kernel hits: a
/// query without a NOERROR reply, or one the daemon answered (the
/// kernel's share is recorded since 2026-12-06).
fn row_caveat(ours: &Value, null: &Value, floor_ok: bool) -> String {
    let mut s = String::new();
    if ours["all_noerror"] != true || null["all_noerror"] != true || !floor_ok {
        s.push_str(" (not every query answered NOERROR: see the raw files)");
    }
    if let Some(share) = ours["kernel_share"].as_f64().filter(|s| *s < 0.999) {
        let _ = write!(
            s,
            " (the kernel answered only {:.2}% of localdns's queries)",
            share * 100.0
        );
    }
    s
}

/// This machine's random-access latency, for scale next to the sweep.
fn memory_latency_line(rows: &Value) -> String {
    let Some(rows) = rows.as_array().filter(|r| !r.is_empty()) else {
        return String::new();
    };
    let cells: Vec<String> = rows
        .iter()
        .map(|r| {
            let bytes = num(r, "bytes");
            let span = if bytes >= f64::from(1u32 << 30) {
                format!("{:.0} GiB", bytes / f64::from(1u32 << 30))
            } else {
                format!("{:.0} MiB", bytes / f64::from(1u32 << 20))
            };
            format!(
                "{:.0} ns over {span} ({:.0}-byte slots)",
                num(r, "ns_per_access"),
                num(r, "stride")
            )
        })
        .collect();
    format!(
        "\nFor scale, this machine's random-access latency (a dependent pointer chase in userspace, 4 KiB pages): {}. A hit whose entry went cold since its last hit pays at least one such access.\n",
        cells.join(", ")
    )
}

fn share_line(share: &Value) -> String {
    let Some(runs) = share["runs"].as_array() else {
        return String::new();
    };
    let pick = |amount: &str| {
        runs.iter()
            .find(|r| r["prefetch_amount"] == amount)
            .map_or(String::from("n/a"), |r| {
                format!(
                    "{:.4} ({} of {:.0}, {:.0} lost)",
                    num(r, "share"),
                    r["kernel"],
                    num(r, "completed"),
                    num(r, "lost")
                )
            })
    };
    format!(
        "\nKernel share of answers under short TTLs (5-30 s), Zipf (s = 1) over {} names, {} q/s for {} s (dnsperf): with prefetch (amount 2, last 10% of the TTL) {}; without {}.\n",
        share["names"],
        share["rate"],
        share["secs"],
        pick("2"),
        pick("0")
    )
}

/// Line plot of the warm-set sweep (log-scaled names), SVG.
pub(crate) fn plot_warmset(sweep: &[Value]) -> String {
    let (w, h, l, b, top) = (760.0, 420.0, 70.0, 60.0, 40.0);
    let rows = |v: &Value| -> Vec<(f64, f64)> {
        v["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| (num(r, "names"), num(r, "bpf_ns_per_run")))
            .filter(|(_, y)| y.is_finite())
            .collect()
    };
    let all: Vec<(f64, f64)> = sweep.iter().flat_map(rows).collect();
    let ymax = all.iter().map(|p| p.1).fold(100.0, f64::max) * 1.1;
    let (xmin, xmax) = (
        all.iter()
            .map(|p| p.0)
            .fold(f64::INFINITY, f64::min)
            .log10(),
        all.iter().map(|p| p.0).fold(1.0, f64::max).log10(),
    );
    let px = |x: f64| l + (w - l - 30.0) * (x.log10() - xmin) / (xmax - xmin).max(1e-9);
    let py = |y: f64| h - b - (h - b - top) * y / ymax;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"13\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"22\" font-size=\"15\">Live BPF ns per packet against warm names (log scale)</text>\n<line x1=\"{l}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{l}\" y1=\"{top}\" x2=\"{l}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - b,
        w - 20.0,
        h - b,
        h - b
    );
    for i in 0..=4 {
        let y = ymax * f64::from(i) / 4.0;
        let _ = writeln!(s, "<text x=\"8\" y=\"{:.1}\">{y:.0} ns</text>", py(y) + 4.0);
    }
    let color_of = |v: &Value| match v["name"].as_str() {
        Some(n) if n == Kind::Localdns.name() => "#1f4e79",
        Some(n) if n == Kind::Floor.name() => "#e07b39",
        _ => "#9dc3e6",
    };
    for (i, v) in sweep.iter().enumerate() {
        let color = color_of(v);
        let pts = rows(v);
        let path: Vec<String> = pts
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2.5\" points=\"{}\"/>",
            path.join(" ")
        );
        for (x, y) in &pts {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{color}\"/>",
                px(*x),
                py(*y)
            );
            if i == 0 {
                let _ = writeln!(
                    s,
                    "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{x}</text>",
                    px(*x),
                    h - b + 18.0
                );
            }
        }
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{}</text>",
            l + 10.0,
            top + 16.0 + 18.0 * i as f64,
            v["name"].as_str().unwrap_or("")
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">warm names</text>",
        (w + l) / 2.0,
        h - 15.0
    );
    s.push_str("</svg>\n");
    s
}

/// Bar chart of W1 hit rates (kxdpgun and dnsperf), SVG.
pub(crate) fn plot(results: &[Value]) -> String {
    let max = results
        .iter()
        .map(|r| num(r, "w1_kxdpgun_qps").max(num(r, "w1_dnsperf_qps")))
        .fold(1.0, f64::max);
    let (w, row, left) = (900.0, 44.0, 260.0);
    let h = 60.0 + row * results.len() as f64;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"13\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"22\" font-size=\"15\">W1 cache hits, replies/s (median): kxdpgun (dark), dnsperf (light)</text>\n"
    );
    for (i, r) in results.iter().enumerate() {
        let y = 40.0 + row * i as f64;
        let bar = |v: f64| {
            if v.is_nan() {
                0.0
            } else {
                (w - left - 90.0) * v / max
            }
        };
        let (a, b) = (num(r, "w1_kxdpgun_qps"), num(r, "w1_dnsperf_qps"));
        let _ = writeln!(
            s,
            "<text x=\"10\" y=\"{}\">{}</text>",
            y + 18.0,
            r["name"].as_str().unwrap()
        );
        let _ = writeln!(
            s,
            "<rect x=\"{left}\" y=\"{y}\" width=\"{:.1}\" height=\"16\" fill=\"#1f4e79\"/><text x=\"{:.1}\" y=\"{}\">{}</text>",
            bar(a),
            left + bar(a) + 4.0,
            y + 13.0,
            fmt_k(a)
        );
        let _ = writeln!(
            s,
            "<rect x=\"{left}\" y=\"{}\" width=\"{:.1}\" height=\"16\" fill=\"#9dc3e6\"/><text x=\"{:.1}\" y=\"{}\">{}</text>",
            y + 18.0,
            bar(b),
            left + bar(b) + 4.0,
            y + 31.0,
            fmt_k(b)
        );
    }
    s.push_str("</svg>\n");
    s
}

pub(crate) fn update_readme(path: &Path, md: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    let (a, b) = ("<!-- bench:start -->", "<!-- bench:end -->");
    if let (Some(i), Some(j)) = (text.find(a), text.find(b)) {
        let new = format!(
            "{}{a}\n{md}\n![W1 hit rates](docs/bench/latest.svg)\n{}",
            &text[..i],
            &text[j..]
        );
        std::fs::write(path, new).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::row_caveat;

    #[test]
    fn a_sweep_row_the_daemon_partly_answered_is_flagged() {
        let null = json!({ "all_noerror": true });
        let row = |share: serde_json::Value| json!({ "all_noerror": true, "kernel_share": share });
        // Every query a kernel hit, or a run from before the share was
        // recorded: no caveat.
        assert_eq!(row_caveat(&row(json!(1.0)), &null, true), "");
        assert_eq!(row_caveat(&row(serde_json::Value::Null), &null, true), "");
        assert_eq!(row_caveat(&row(json!(0.9995)), &null, true), "");
        assert_eq!(
            row_caveat(&row(json!(0.99217)), &null, true),
            " (the kernel answered only 99.22% of localdns's queries)"
        );
        let failed = json!({ "all_noerror": false, "kernel_share": 1.0 });
        assert!(row_caveat(&failed, &null, true).contains("NOERROR"));
        assert!(row_caveat(&row(json!(1.0)), &null, false).contains("NOERROR"));
    }
}
