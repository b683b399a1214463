//! Answers the daemon gives without asking an upstream, in the `.` zones of
//! both views, as AKS's generated Corefile does:
//!
//! - the NXDOMAIN templates for search-list junk: names with four or more
//!   labels before `internal.cloudapp.net.` (what a pod's `ndots:5` search
//!   list makes of external names on Azure), and `reddog.microsoft.com` and
//!   everything under it;
//! - an optional hosts file (`--hosts-file`, CoreDNS `hosts` with `ttl 5`,
//!   `reload 5s`, `fallthrough`): A, AAAA and PTR records of its names;
//!   names it does not have, or types it has no record of, are forwarded.
//!
//! Hosts answers are made as an upstream reply would be and go through the
//! normal cache path, so the kernel answers them too, for their 5 s TTL.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use thiserror::Error;

use crate::wire::{self, CLASS_IN, F_QR, F_RA, F_RD, Query};

/// TTL of hosts answers (AKS's `ttl 5`).
pub const HOSTS_TTL: u32 = 5;
const TYPE_A: u16 = 1;
const TYPE_PTR: u16 = 12;
const TYPE_AAAA: u16 = 28;

const INTERNAL_CLOUDAPP: &[u8] = b"\x08internal\x08cloudapp\x03net\x00";
const REDDOG: &[u8] = b"\x06reddog\x09microsoft\x03com\x00";

/// The NXDOMAIN template `qname_lower` (wire) falls under, if any.
pub fn nxdomain_template(qname_lower: &[u8]) -> Option<&'static str> {
    if ends_with_name(qname_lower, REDDOG) {
        return Some("reddog.microsoft.com");
    }
    if ends_with_name(qname_lower, INTERNAL_CLOUDAPP)
        && labels(&qname_lower[..qname_lower.len() - INTERNAL_CLOUDAPP.len()]) >= 4
    {
        return Some("internal.cloudapp.net");
    }
    None
}

/// True when wire name `name` is `suffix` or under it, on a label
/// boundary.
fn ends_with_name(name: &[u8], suffix: &[u8]) -> bool {
    if !name.ends_with(suffix) {
        return false;
    }
    let cut = name.len() - suffix.len();
    let mut p = 0;
    while p < cut {
        p += 1 + name[p] as usize;
    }
    p == cut
}

/// Labels of a wire-name prefix (no root byte).
fn labels(prefix: &[u8]) -> usize {
    let (mut p, mut n) = (0, 0);
    while p < prefix.len() {
        p += 1 + prefix[p] as usize;
        n += 1;
    }
    n
}

#[derive(Debug, Error)]
pub enum HostsError {
    #[error("hosts file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Addresses per name and names per address (wire, lower case).
#[derive(Default, Debug)]
struct Table {
    addrs: HashMap<Vec<u8>, Vec<IpAddr>>,
    names: HashMap<Vec<u8>, Vec<Vec<u8>>>,
}

/// Parses hosts-file text: `ADDRESS NAME [ALIAS...]` lines, `#` comments.
/// Lines whose address does not parse are skipped, like CoreDNS does.
fn parse(text: &str) -> Table {
    let mut t = Table::default();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut f = line.split_whitespace();
        let Some(Ok(ip)) = f
            .next()
            .map(|a| a.split('%').next().unwrap_or(a).parse::<IpAddr>())
        else {
            continue;
        };
        for name in f {
            let Some(w) = wire::text_to_wire_lower(name) else {
                continue;
            };
            let a = t.addrs.entry(w.clone()).or_default();
            if !a.contains(&ip) {
                a.push(ip);
            }
            let n = t.names.entry(reverse_name(ip)).or_default();
            if !n.contains(&w) {
                n.push(w);
            }
        }
    }
    t
}

/// `d.c.b.a.in-addr.arpa.` / nibbles `.ip6.arpa.` of `ip`, wire, lower.
fn reverse_name(ip: IpAddr) -> Vec<u8> {
    let text = match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(a) => {
            let mut s = String::new();
            for b in a.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            s.push_str("ip6.arpa");
            s
        }
    };
    wire::text_to_wire_lower(&text).expect("reverse names are valid")
}

/// A hosts file, re-read when its modification time or size changes.
pub struct Hosts {
    path: PathBuf,
    table: RwLock<Arc<Table>>,
    stamp: Mutex<Option<(SystemTime, u64)>>,
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl Hosts {
    /// Reads `path`. A file that is missing now is not an error (CoreDNS
    /// starts without it too): it is picked up once it appears.
    pub fn open(path: &Path) -> Result<Hosts, HostsError> {
        let h = Hosts {
            path: path.to_path_buf(),
            table: RwLock::new(Arc::new(Table::default())),
            stamp: Mutex::new(None),
        };
        match h.reload() {
            Ok(_) => Ok(h),
            Err(HostsError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                tracing::warn!(path = %path.display(), "hosts file missing: served once it appears");
                Ok(h)
            }
            Err(e) => Err(e),
        }
    }

    /// Re-reads the file when it changed; true when it did. A file that
    /// went away empties the table.
    pub fn reload(&self) -> Result<bool, HostsError> {
        let now = stamp(&self.path);
        let mut last = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
        if now.is_some() && now == *last {
            return Ok(false);
        }
        let table = match std::fs::read_to_string(&self.path) {
            Ok(text) => parse(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && last.is_some() => {
                Table::default()
            }
            Err(source) => {
                return Err(HostsError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        tracing::info!(
            path = %self.path.display(),
            names = table.addrs.len(),
            "hosts file loaded"
        );
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
        *last = now;
        Ok(true)
    }

    /// An upstream-style reply to `q` from the file, or `None` to forward
    /// (fallthrough): the name is not there or has no record of the type.
    pub fn answer(&self, q: &Query) -> Option<Vec<u8>> {
        if q.qclass != CLASS_IN {
            return None;
        }
        let t = self.table.read().unwrap_or_else(|e| e.into_inner()).clone();
        let rdatas: Vec<Vec<u8>> = match q.qtype {
            TYPE_A | TYPE_AAAA => t
                .addrs
                .get(&q.qname_lower)?
                .iter()
                .filter_map(|ip| match (ip, q.qtype) {
                    (IpAddr::V4(a), TYPE_A) => Some(a.octets().to_vec()),
                    (IpAddr::V6(a), TYPE_AAAA) => Some(a.octets().to_vec()),
                    _ => None,
                })
                .collect(),
            TYPE_PTR => t.names.get(&q.qname_lower)?.clone(),
            _ => return None,
        };
        if rdatas.is_empty() {
            return None;
        }
        Some(reply(q, &rdatas))
    }
}

/// A NOERROR reply to `q` with one record of its type per `rdatas`.
fn reply(q: &Query, rdatas: &[Vec<u8>]) -> Vec<u8> {
    let mut m = Vec::with_capacity(q.question_end + rdatas.len() * 32);
    m.extend_from_slice(&q.id.to_be_bytes());
    m.extend_from_slice(&(F_QR | F_RA | (q.flags & F_RD)).to_be_bytes());
    m.extend_from_slice(&[0, 1]);
    m.extend_from_slice(&(rdatas.len() as u16).to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    m.extend_from_slice(&q.question_bytes());
    for rd in rdatas {
        m.extend_from_slice(&[0xc0, 0x0c]);
        m.extend_from_slice(&q.qtype.to_be_bytes());
        m.extend_from_slice(&CLASS_IN.to_be_bytes());
        m.extend_from_slice(&HOSTS_TTL.to_be_bytes());
        m.extend_from_slice(&(rd.len() as u16).to_be_bytes());
        m.extend_from_slice(rd);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::testmsg::query;
    use hickory_proto::op::Message;
    use hickory_proto::rr::RData;

    fn w(name: &str) -> Vec<u8> {
        wire::text_to_wire_lower(name).unwrap()
    }

    #[test]
    fn templates_match_like_akss_regex() {
        for (name, want) in [
            (
                "a.b.c.d.internal.cloudapp.net.",
                Some("internal.cloudapp.net"),
            ),
            (
                "www.google.com.svc.x.internal.cloudapp.net.",
                Some("internal.cloudapp.net"),
            ),
            ("b.c.d.internal.cloudapp.net.", None),
            ("vm1.internal.cloudapp.net.", None),
            ("internal.cloudapp.net.", None),
            ("a.b.c.dinternal.cloudapp.net.", None),
            ("reddog.microsoft.com.", Some("reddog.microsoft.com")),
            ("x.y.reddog.microsoft.com.", Some("reddog.microsoft.com")),
            ("notreddog.microsoft.com.", None),
            ("microsoft.com.", None),
        ] {
            assert_eq!(nxdomain_template(&w(name)), want, "{name}");
        }
    }

    fn answers(h: &Hosts, name: &str, qtype: u16) -> Option<Vec<String>> {
        let raw = query(name, qtype, None);
        let q = wire::parse_query(&raw).unwrap();
        let r = h.answer(&q)?;
        let m = Message::from_vec(&r).expect("hickory decodes it");
        assert_eq!(m.metadata.id, q.id);
        assert_eq!(m.queries.len(), 1);
        Some(
            m.answers
                .iter()
                .map(|rr| {
                    assert_eq!(rr.ttl, HOSTS_TTL);
                    match &rr.data {
                        RData::A(a) => a.to_string(),
                        RData::AAAA(a) => a.to_string(),
                        RData::PTR(p) => p.to_string(),
                        other => panic!("{other:?}"),
                    }
                })
                .collect(),
        )
    }

    #[test]
    fn hosts_file_answers_its_names_and_falls_through_otherwise() {
        let dir = std::env::temp_dir().join(format!("localdns-hosts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hosts");
        std::fs::write(
            &path,
            "# comment\n10.1.2.3 Db.Example.Internal db # trailing\n\
             fd00::3 db.example.internal\nnot-an-ip x.y\n10.1.2.4 db.example.internal\n",
        )
        .unwrap();
        let h = Hosts::open(&path).unwrap();
        assert_eq!(
            answers(&h, "DB.example.internal", 1),
            Some(vec!["10.1.2.3".into(), "10.1.2.4".into()])
        );
        assert_eq!(
            answers(&h, "db.example.internal", 28),
            Some(vec!["fd00::3".into()])
        );
        assert_eq!(answers(&h, "db", 1), Some(vec!["10.1.2.3".into()]));
        assert_eq!(
            answers(&h, "3.2.1.10.in-addr.arpa", 12),
            Some(vec!["db.example.internal.".into(), "db.".into()])
        );
        assert_eq!(answers(&h, "x.y", 1), None, "bad address line");
        assert_eq!(
            answers(&h, "db.example.internal", 16),
            None,
            "TXT falls through"
        );
        assert_eq!(answers(&h, "other.internal", 1), None);
        // Changed: re-read (size differs), old names gone.
        std::fs::write(&path, "10.9.9.9 new.internal\n").unwrap();
        assert!(h.reload().unwrap());
        assert_eq!(answers(&h, "db.example.internal", 1), None);
        assert_eq!(
            answers(&h, "new.internal", 1),
            Some(vec!["10.9.9.9".into()])
        );
        assert!(!h.reload().unwrap(), "unchanged file re-read");
        std::fs::remove_file(&path).unwrap();
        assert!(h.reload().unwrap());
        assert_eq!(answers(&h, "new.internal", 1), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
