//! Per-step cost of a kernel cache hit in `BPF_PROG_TEST_RUN`.
//!
//! A full hit rewrites the packet, so `repeat` would re-run the program on
//! its own reply: it can only be timed in single runs, whose durations
//! include the test-run timer. The program loaded with a
//! `FAULT_STOP_*` global stops before its first write, so each prefix of
//! the hit (parse, lookup, check, checksum) is timed both ways: `repeat`
//! gives its cost without the timer; single runs minus that give the timer
//! overhead, which is then taken off the full hit and the null responder.

use aya::{
    Ebpf,
    programs::{TestRun, TestRunOptions, Xdp},
};
use localdns_common::{
    FAULT_AFTER_COPY, FAULT_AFTER_RESIZE, FAULT_NONE, FAULT_STOP_CHECKED, FAULT_STOP_LOOKED_UP,
    FAULT_STOP_PARSED, FAULT_STOP_SUMMED,
};
use serde_json::{Value, json};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const SINGLE_RUNS: usize = 20_000;
const REPEAT: u32 = 200_000;

/// One prefix of the hit path.
pub struct Step {
    pub name: &'static str,
    /// Median of single runs (timer included), ns.
    pub single_ns: u64,
    /// Mean over `repeat` runs (no timer), ns; `None` for programs that
    /// rewrite the packet.
    pub repeat_ns: Option<f64>,
}

pub struct Profile {
    pub steps: Vec<Step>,
    /// Median (over the stop steps) of single-run minus repeat time.
    pub timer_ns: f64,
}

/// The prefixes of a hit, in order: row name, fault global, expected XDP
/// action, and whether `repeat` can time it (only before the first write;
/// after it the packet has changed). The last is the whole hit.
const HIT_STEPS: [(&str, u32, u32, bool); 7] = [
    ("parse", FAULT_STOP_PARSED, XDP_PASS, true),
    ("+ lookup", FAULT_STOP_LOOKED_UP, XDP_PASS, true),
    ("+ check", FAULT_STOP_CHECKED, XDP_PASS, true),
    ("+ checksum", FAULT_STOP_SUMMED, XDP_PASS, true),
    ("+ save, resize", FAULT_AFTER_RESIZE, XDP_DROP, false),
    ("+ copy tail", FAULT_AFTER_COPY, XDP_DROP, false),
    (Profile::HIT, FAULT_NONE, XDP_TX, false),
];

/// Loads the program once per stop through `load` (which must return the
/// object with the XDP program loaded and the hit's entry seeded), times
/// each prefix, the full hit, a miss (`miss_frame`), and the null
/// responder on `frame`.
pub fn hit_profile(load: impl Fn(u32) -> Ebpf, frame: &[u8], miss_frame: &[u8]) -> Profile {
    let mut steps = Vec::new();
    let mut last = None;
    for (name, fault, want, repeatable) in HIT_STEPS {
        let ebpf = load(fault);
        let p = xdp(&ebpf, localdns_user::fastpath::XDP_PROG);
        steps.push(Step {
            name,
            single_ns: median(p, frame, want),
            repeat_ns: repeatable.then(|| repeat_ns(p, frame, want)),
        });
        last = Some(ebpf);
    }
    // The last load is the production one (no fault).
    let mut ebpf = last.expect("hit steps");
    {
        let p = xdp(&ebpf, localdns_user::fastpath::XDP_PROG);
        steps.push(Step {
            name: "miss",
            single_ns: median(p, miss_frame, XDP_PASS),
            repeat_ns: Some(repeat_ns(p, miss_frame, XDP_PASS)),
        });
    }
    let null: &mut Xdp = ebpf
        .program_mut("localdns_null")
        .unwrap()
        .try_into()
        .unwrap();
    null.load().expect("null responder verifies");
    steps.push(Step {
        name: "null responder",
        single_ns: median(null, frame, XDP_TX),
        repeat_ns: None,
    });
    let mut over: Vec<f64> = steps
        .iter()
        .filter_map(|s| Some(s.single_ns as f64 - s.repeat_ns?))
        .collect();
    over.sort_by(f64::total_cmp);
    let timer_ns = over[over.len() / 2];
    Profile { steps, timer_ns }
}

impl Profile {
    /// Cost of a step without the timer: the `repeat` mean where there is
    /// one, else the single-run median minus the timer overhead.
    pub fn net_ns(&self, name: &str) -> f64 {
        let s = self.steps.iter().find(|s| s.name == name).unwrap();
        s.repeat_ns.unwrap_or(s.single_ns as f64 - self.timer_ns)
    }

    /// The full hit's row.
    pub const HIT: &'static str = "+ TTLs, headers = hit";

    pub fn hit_single_ns(&self) -> u64 {
        self.steps
            .iter()
            .find(|s| s.name == Self::HIT)
            .unwrap()
            .single_ns
    }

    pub fn table(&self) -> String {
        let mut out = String::from(
            "| step | single run (median) | repeat (mean) | net | step's own |\n|---|---|---|---|---|\n",
        );
        let mut prev = 0.0;
        for (i, s) in self.steps.iter().enumerate() {
            let net = self.net_ns(s.name);
            // The hit's steps come first, in order; then the miss and the
            // null responder.
            let in_hit = i < HIT_STEPS.len();
            let own = if in_hit {
                format!("{:.0}", net - prev)
            } else {
                String::new()
            };
            if in_hit {
                prev = net;
            }
            out.push_str(&format!(
                "| {} | {} | {} | {:.0} | {} |\n",
                s.name,
                s.single_ns,
                s.repeat_ns.map_or(String::from("—"), |r| format!("{r:.0}")),
                net,
                own
            ));
        }
        out.push_str(&format!(
            "\nTimer overhead of a single run: {:.0} ns (median over the stop steps of single minus repeat).\n",
            self.timer_ns
        ));
        out
    }

    pub fn to_json(&self) -> Value {
        json!({
            "timer_ns": self.timer_ns,
            "steps": self.steps.iter().map(|s| json!({
                "step": s.name,
                "single_median_ns": s.single_ns,
                "repeat_mean_ns": s.repeat_ns,
                "net_ns": self.net_ns(s.name),
            })).collect::<Vec<_>>(),
        })
    }
}

fn xdp<'a>(ebpf: &'a Ebpf, name: &str) -> &'a Xdp {
    ebpf.program(name).unwrap().try_into().unwrap()
}

fn median(p: &Xdp, frame: &[u8], want: u32) -> u64 {
    let ns = crate::single_run_ns(p, frame, SINGLE_RUNS, want);
    ns[ns.len() / 2]
}

fn repeat_ns(p: &Xdp, frame: &[u8], want: u32) -> f64 {
    let mut out = vec![0u8; 512];
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: REPEAT,
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    assert_eq!(r.return_value, want, "unexpected XDP action");
    // The kernel reports the mean per run, rounded to whole nanoseconds.
    r.duration.as_nanos() as f64
}
