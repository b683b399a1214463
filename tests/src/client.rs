//! Real DNS clients (`dig`, `kdig`) run inside a namespace, and what they
//! print read back into the parts a comparison needs: rcode, header flags,
//! the three record sections (TTL left out, sorted) and the message size.

use std::collections::BTreeSet;

use crate::netns::Netns;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    Dig,
    Kdig,
}

/// Query options, spelled for either tool.
#[derive(Clone, Copy, Debug, Default)]
pub struct Opts {
    pub tcp: bool,
    /// DO=1 (`+dnssec`).
    pub dnssec: bool,
    /// CD=1.
    pub cd: bool,
    /// RD=0.
    pub norec: bool,
    /// EDNS with this UDP size; `None`: no EDNS at all.
    pub edns: Option<u16>,
    /// Show a TC=1 reply instead of retrying over TCP.
    pub ignore_tc: bool,
}

impl Opts {
    /// EDNS with `size`, nothing else.
    pub fn edns(size: u16) -> Opts {
        Opts {
            edns: Some(size),
            ..Opts::default()
        }
    }

    /// The largest UDP reply the query allows (RFC 6891: 512 without EDNS).
    pub fn udp_limit(&self) -> usize {
        self.edns.map_or(512, |s| usize::from(s.max(512)))
    }

    fn args(&self, tool: Tool) -> Vec<String> {
        let mut a: Vec<String> = match tool {
            Tool::Dig => vec!["+tries=1".into(), "+time=4".into()],
            Tool::Kdig => vec!["+retry=0".into(), "+timeout=4".into()],
        };
        let mut flag = |on: bool, dig: &str, kdig: &str| {
            if on {
                a.push(if tool == Tool::Dig { dig } else { kdig }.into());
            }
        };
        flag(self.tcp, "+tcp", "+tcp");
        flag(self.dnssec, "+dnssec", "+dnssec");
        flag(self.cd, "+cd", "+cdflag");
        flag(self.norec, "+norecurse", "+norecurse");
        flag(self.ignore_tc, "+ignore", "+ignore");
        match self.edns {
            Some(size) => a.push(format!("+bufsize={size}")),
            None => a.push("+noedns".into()),
        }
        a
    }
}

/// What a client printed, in parts.
#[derive(Clone, Debug, Default)]
pub struct Reply {
    pub rcode: String,
    pub flags: BTreeSet<String>,
    pub answer: Vec<String>,
    pub authority: Vec<String>,
    pub additional: Vec<String>,
    /// Message size as the client reports it.
    pub size: usize,
    pub text: String,
}

impl Reply {
    pub fn has(&self, flag: &str) -> bool {
        self.flags.contains(flag)
    }

    /// The records of all three sections, for comparing two replies.
    pub fn records(&self) -> [&Vec<String>; 3] {
        [&self.answer, &self.authority, &self.additional]
    }
}

/// Runs `tool @server name qtype` with `opts` in `ns`; `None` when the
/// client got no reply (timeout, refused connection).
pub fn ask(
    ns: &Netns,
    tool: Tool,
    server: &str,
    name: &str,
    qtype: &str,
    opts: Opts,
) -> Option<Reply> {
    let program = match tool {
        Tool::Dig => "dig",
        Tool::Kdig => "kdig",
    };
    let mut args = opts.args(tool);
    args.extend([format!("@{server}"), name.into(), qtype.into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ns.output(program, &args);
    parse(&String::from_utf8_lossy(&out.stdout))
}

/// Reads dig's or kdig's presentation output.
pub fn parse(text: &str) -> Option<Reply> {
    let rcode = text
        .split("status: ")
        .nth(1)?
        .split([',', ';', '\n'])
        .next()?
        .trim()
        .to_string();
    let mut r = Reply {
        rcode,
        text: text.to_string(),
        ..Reply::default()
    };
    #[derive(PartialEq)]
    enum Sec {
        None,
        Answer,
        Authority,
        Additional,
    }
    let mut sec = Sec::None;
    for line in text.lines() {
        let l = line.trim();
        if let Some(rest) = l
            .strip_prefix(";; flags:")
            .or_else(|| l.strip_prefix(";; Flags:"))
        {
            let flags = rest.split(';').next().unwrap_or("");
            r.flags = flags.split_whitespace().map(str::to_string).collect();
        } else if let Some(n) = l.strip_prefix(";; MSG SIZE  rcvd: ") {
            r.size = n.trim().parse().unwrap_or(0);
        } else if let Some(n) = l.strip_prefix(";; Received ") {
            r.size = n.trim_end_matches(" B").trim().parse().unwrap_or(0);
        } else if l.starts_with(';') {
            sec = if l.contains("ANSWER SECTION") {
                Sec::Answer
            } else if l.contains("AUTHORITY SECTION") {
                Sec::Authority
            } else if l.contains("ADDITIONAL SECTION") {
                Sec::Additional
            } else if l.contains("SECTION") {
                Sec::None
            } else {
                sec
            };
        } else if !l.is_empty() {
            let rec = without_ttl(l);
            match sec {
                Sec::Answer => r.answer.push(rec),
                Sec::Authority => r.authority.push(rec),
                Sec::Additional => r.additional.push(rec),
                Sec::None => {}
            }
        }
    }
    for s in [&mut r.answer, &mut r.authority, &mut r.additional] {
        s.sort();
    }
    Some(r)
}

/// A record line with its TTL (second field) left out: TTLs count down.
fn without_ttl(line: &str) -> String {
    let mut f: Vec<&str> = line.split_whitespace().collect();
    if f.len() > 2 && f[1].parse::<u32>().is_ok() {
        f.remove(1);
    }
    f.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_dig_and_kdig_output() {
        let dig = ";; ->>HEADER<<- opcode: QUERY, status: NXDOMAIN, id: 1\n;; flags: qr rd ra; QUERY: 1, ANSWER: 0, AUTHORITY: 1, ADDITIONAL: 1\n\n;; OPT PSEUDOSECTION:\n; EDNS: version: 0, flags: do; udp: 1232\n;; QUESTION SECTION:\n;x.example.test.\t\tIN\tA\n\n;; AUTHORITY SECTION:\nexample.test.\t\t60\tIN\tSOA\tns.example.test. admin.example.test. 1 3600 600 86400 60\n\n;; MSG SIZE  rcvd: 99\n";
        let r = parse(dig).unwrap();
        assert_eq!(r.rcode, "NXDOMAIN");
        assert!(r.has("ra") && r.has("rd") && !r.has("aa"));
        assert_eq!(
            r.authority,
            ["example.test. IN SOA ns.example.test. admin.example.test. 1 3600 600 86400 60"]
        );
        assert_eq!(r.size, 99);
        let kdig = ";; ->>HEADER<<- opcode: QUERY; status: NOERROR; id: 2\n;; Flags: qr aa rd; QUERY: 1; ANSWER: 1; AUTHORITY: 0; ADDITIONAL: 0\n\n;; QUESTION SECTION:\n;; www.example.test.   \t\tIN\tA\n\n;; ANSWER SECTION:\nwww.example.test.   \t300\tIN\tA\t192.0.2.10\n\n;; Received 50 B\n;; Time 2026-11-27 20:00:00 UTC\n;; From 169.254.10.10@53(UDP) in 0.1 ms\n";
        let r = parse(kdig).unwrap();
        assert_eq!(r.rcode, "NOERROR");
        assert!(r.has("aa") && !r.has("ra"));
        assert_eq!(r.answer, ["www.example.test. IN A 192.0.2.10"]);
        assert!(r.authority.is_empty());
        assert_eq!(r.size, 50);
    }
}
