//! Query and error lines in CoreDNS's exact formats, each on a line of its
//! own on stdout (no tracing prefix), so log parsers written for AKS
//! LocalDNS keep working. Daemon diagnostics stay in `tracing` (stderr).
//!
//! `log` plugin, default format:
//! `[INFO] {remote}:{port} - {id} "{type} {class} {name} {proto} {size} {do} {bufsize}" {rcode} {rflags} {rsize} {duration}`
//! `errors` plugin: `[ERROR] plugin/errors: {rcode} {name} {type}: {error}`
//!
//! Lines go through a bounded queue to one writer thread, so a slow stdout
//! (a full journald pipe) never blocks a query; what does not fit is
//! counted and dropped.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};

use crate::wire;

/// Lines waiting for the writer at most.
const QUEUE: usize = 65_536;

/// Lines dropped because the writer fell behind.
pub static DROPPED: AtomicU64 = AtomicU64::new(0);

static SINK: OnceLock<SyncSender<String>> = OnceLock::new();

fn sink() -> &'static SyncSender<String> {
    SINK.get_or_init(|| {
        let (tx, rx) = sync_channel::<String>(QUEUE);
        std::thread::Builder::new()
            .name("querylog".into())
            .spawn(move || {
                let stdout = std::io::stdout();
                while let Ok(first) = rx.recv() {
                    let mut out = stdout.lock();
                    let _ = writeln!(out, "{first}");
                    // Whatever else is queued goes out in the same flush.
                    while let Ok(more) = rx.try_recv() {
                        let _ = writeln!(out, "{more}");
                    }
                    let _ = out.flush();
                }
            })
            .expect("spawning the query-log writer");
        tx
    })
}

/// Queues one line for stdout.
pub fn emit(line: String) {
    match sink().try_send(line) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Transport of a query, as CoreDNS names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Udp,
    Tcp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
        }
    }
}

/// What one `log` line says about a query.
#[derive(Clone, Debug)]
pub struct QueryLine {
    pub client: SocketAddr,
    pub proto: Proto,
    pub id: u16,
    pub qtype: u16,
    pub qclass: u16,
    /// The wire qname (any case: CoreDNS logs it lower-cased).
    pub qname: Vec<u8>,
    /// Query size in bytes.
    pub size: usize,
    pub do_bit: bool,
    /// The query's EDNS UDP size, `None` without EDNS.
    pub edns_size: Option<u16>,
    /// Reply header flags word (with RCODE), `None` without a reply.
    pub rflags: Option<u16>,
    pub rsize: usize,
    pub secs: f64,
}

impl QueryLine {
    /// The line, exactly as CoreDNS's `log` plugin writes it.
    pub fn format(&self) -> String {
        // request.Size(): 65535 over TCP, else the EDNS size, at least 512.
        let bufsize = match self.proto {
            Proto::Tcp => 65535,
            Proto::Udp => self.edns_size.unwrap_or(0).max(512),
        };
        let (rcode, rflags) = match self.rflags {
            Some(f) => (rcode_name(f & 0xf), flag_names(f)),
            None => ("-".to_string(), "-".to_string()),
        };
        let name = wire::name_to_text(&self.qname).to_ascii_lowercase();
        format!(
            "[INFO] {}:{} - {} \"{} {} {} {} {} {} {}\" {} {} {} {}s",
            rfc3986(&self.client),
            self.client.port(),
            self.id,
            type_name(self.qtype),
            class_name(self.qclass),
            name,
            self.proto.as_str(),
            self.size,
            self.do_bit,
            bufsize,
            rcode,
            rflags,
            self.rsize,
            self.secs
        )
    }
}

/// An `errors` plugin line for a query that got `rcode` because of `err`.
pub fn error_line(rcode: u16, qname: &[u8], qtype: u16, err: &dyn std::fmt::Display) -> String {
    format!(
        "[ERROR] plugin/errors: {rcode} {} {}: {err}",
        wire::name_to_text(qname).to_ascii_lowercase(),
        type_name(qtype)
    )
}

/// The client address as CoreDNS prints it: IPv6 in brackets.
fn rfc3986(a: &SocketAddr) -> String {
    match a {
        SocketAddr::V4(v) => v.ip().to_string(),
        SocketAddr::V6(v) => format!("[{}]", v.ip()),
    }
}

/// Header flags in CoreDNS's order, comma-separated.
fn flag_names(f: u16) -> String {
    const NAMES: [(u16, &str); 8] = [
        (0x8000, "qr"),
        (0x0400, "aa"),
        (0x0200, "tc"),
        (0x0100, "rd"),
        (0x0080, "ra"),
        (0x0040, "z"),
        (0x0020, "ad"),
        (0x0010, "cd"),
    ];
    NAMES
        .iter()
        .filter(|(b, _)| f & b != 0)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join(",")
}

/// RCODE names as the miekg/dns library (CoreDNS) spells them.
pub fn rcode_name(r: u16) -> String {
    match r {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        6 => "YXDOMAIN",
        7 => "YXRRSET",
        8 => "NXRRSET",
        9 => "NOTAUTH",
        10 => "NOTZONE",
        16 => "BADSIG",
        _ => return r.to_string(),
    }
    .to_string()
}

/// Query type names as miekg/dns spells them; `TYPE<n>` otherwise.
pub fn type_name(t: u16) -> String {
    let n = match t {
        1 => "A",
        2 => "NS",
        5 => "CNAME",
        6 => "SOA",
        12 => "PTR",
        13 => "HINFO",
        15 => "MX",
        16 => "TXT",
        17 => "RP",
        18 => "AFSDB",
        24 => "SIG",
        25 => "KEY",
        28 => "AAAA",
        29 => "LOC",
        33 => "SRV",
        35 => "NAPTR",
        36 => "KX",
        37 => "CERT",
        39 => "DNAME",
        41 => "OPT",
        42 => "APL",
        43 => "DS",
        44 => "SSHFP",
        46 => "RRSIG",
        47 => "NSEC",
        48 => "DNSKEY",
        49 => "DHCID",
        50 => "NSEC3",
        51 => "NSEC3PARAM",
        52 => "TLSA",
        53 => "SMIMEA",
        55 => "HIP",
        59 => "CDS",
        60 => "CDNSKEY",
        61 => "OPENPGPKEY",
        62 => "CSYNC",
        63 => "ZONEMD",
        64 => "SVCB",
        65 => "HTTPS",
        99 => "SPF",
        108 => "EUI48",
        109 => "EUI64",
        249 => "TKEY",
        250 => "TSIG",
        251 => "IXFR",
        252 => "AXFR",
        255 => "ANY",
        256 => "URI",
        257 => "CAA",
        _ => return format!("TYPE{t}"),
    };
    n.to_string()
}

/// Class names as miekg/dns spells them.
pub fn class_name(c: u16) -> String {
    match c {
        1 => "IN".into(),
        3 => "CH".into(),
        4 => "HS".into(),
        254 => "NONE".into(),
        255 => "ANY".into(),
        c => format!("CLASS{c}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line() -> QueryLine {
        QueryLine {
            client: "169.254.100.2:40000".parse().unwrap(),
            proto: Proto::Udp,
            id: 4242,
            qtype: 1,
            qclass: 1,
            qname: b"\x03WwW\x07example\x04test\x00".to_vec(),
            size: 45,
            do_bit: false,
            edns_size: Some(1232),
            rflags: Some(0x8180),
            rsize: 61,
            secs: 0.000123456,
        }
    }

    /// CoreDNS's own output for the same fields (plugin/log with the
    /// default format; the names lower-cased by request.Name()).
    #[test]
    fn log_lines_match_coredns() {
        let rows: Vec<(QueryLine, &str)> = vec![
            (
                line(),
                r#"[INFO] 169.254.100.2:40000 - 4242 "A IN www.example.test. udp 45 false 1232" NOERROR qr,rd,ra 61 0.000123456s"#,
            ),
            (
                QueryLine {
                    client: "[fd00:100::2]:53000".parse().unwrap(),
                    qtype: 28,
                    do_bit: true,
                    edns_size: Some(4096),
                    rflags: Some(0x8183 | 0x0020 | 0x0010),
                    secs: 1.5,
                    ..line()
                },
                r#"[INFO] [fd00:100::2]:53000 - 4242 "AAAA IN www.example.test. udp 45 true 4096" NXDOMAIN qr,rd,ra,ad,cd 61 1.5s"#,
            ),
            (
                QueryLine {
                    proto: Proto::Tcp,
                    qtype: 65280,
                    qclass: 3,
                    edns_size: None,
                    rflags: Some(0x8382),
                    ..line()
                },
                r#"[INFO] 169.254.100.2:40000 - 4242 "TYPE65280 CH www.example.test. tcp 45 false 65535" SERVFAIL qr,tc,rd,ra 61 0.000123456s"#,
            ),
            (
                QueryLine {
                    edns_size: Some(100),
                    rflags: Some(0x8005),
                    secs: 0.0,
                    ..line()
                },
                r#"[INFO] 169.254.100.2:40000 - 4242 "A IN www.example.test. udp 45 false 512" REFUSED qr 61 0s"#,
            ),
            (
                QueryLine {
                    qname: vec![0],
                    qtype: 2,
                    edns_size: None,
                    rflags: None,
                    rsize: 0,
                    ..line()
                },
                r#"[INFO] 169.254.100.2:40000 - 4242 "NS IN . udp 45 false 512" - - 0 0.000123456s"#,
            ),
        ];
        for (l, want) in rows {
            assert_eq!(l.format(), want);
        }
    }

    #[test]
    fn error_lines_match_coredns() {
        let e = "read udp 169.254.200.2:53: i/o timeout";
        assert_eq!(
            error_line(2, b"\x03WWW\x07example\x04test\x00", 1, &e),
            "[ERROR] plugin/errors: 2 www.example.test. A: read udp 169.254.200.2:53: i/o timeout"
        );
    }
}
