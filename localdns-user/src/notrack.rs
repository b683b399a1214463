//! Raw-priority NOTRACK rules for DNS to and from the listener addresses,
//! as AKS LocalDNS and NodeLocal DNSCache install them: queries the daemon
//! answers (kernel hits never reach netfilter) create no conntrack entry,
//! so a DNS flood cannot fill the conntrack table or race on it.
//!
//! One table, `inet localdns`, with a `prerouting` and an `output` chain at
//! priority raw (-300); in each, for every listener address, UDP and TCP to
//! port 53 of it and from port 53 of it skip conntrack. The table is
//! replaced as a whole in one transaction (`nft -j -f`, built with the
//! typed `nftables` crate), re-checked periodically, and removed by
//! `teardown`. Upstream traffic is untouched: kube-proxy needs conntrack to
//! NAT the kube-dns service address.

use std::borrow::Cow;
use std::net::IpAddr;

use nftables::batch::Batch;
use nftables::expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, SetItem};
use nftables::schema::{Chain, FlushObject, NfCmd, NfListObject, Rule, Table};
use nftables::stmt::{Counter, Match, Operator, Statement};
use nftables::types::{NfChainType, NfFamily, NfHook};
use thiserror::Error;

pub const TABLE: &str = "localdns";
const CHAINS: [(&str, NfHook); 2] = [
    ("prerouting", NfHook::Prerouting),
    ("output", NfHook::Output),
];
/// The raw table's priority (NF_IP_PRI_RAW): before conntrack (-200).
const PRIO_RAW: i32 = -300;

#[derive(Debug, Error)]
pub enum NotrackError {
    #[error("encoding the ruleset: {0}")]
    Json(#[source] serde_json::Error),
    #[error("running nft: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("nft rejected the ruleset: {0}")]
    Rejected(String),
}

fn table() -> Table<'static> {
    Table {
        family: NfFamily::INet,
        name: TABLE.into(),
        handle: None,
    }
}

fn field(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

/// `meta l4proto { udp, tcp } ip[6] <addr_field> A th <port_field> 53 counter notrack`
fn rule(
    chain: &'static str,
    ip: IpAddr,
    addr_field: &'static str,
    port_field: &'static str,
) -> Rule<'static> {
    let family = if ip.is_ipv4() { "ip" } else { "ip6" };
    let stmts = vec![
        Statement::Match(Match {
            left: Expression::Named(NamedExpression::Meta(Meta {
                key: MetaKey::L4proto,
            })),
            right: Expression::Named(NamedExpression::Set(vec![
                SetItem::Element(Expression::String("udp".into())),
                SetItem::Element(Expression::String("tcp".into())),
            ])),
            op: Operator::IN,
        }),
        eq(
            field(family, addr_field),
            Expression::String(ip.to_string().into()),
        ),
        eq(field("th", port_field), Expression::Number(53)),
        Statement::Counter(Counter::Anonymous(None)),
        Statement::Notrack,
    ];
    Rule {
        family: NfFamily::INet,
        table: TABLE.into(),
        chain: chain.into(),
        expr: Cow::Owned(stmts),
        handle: None,
        index: None,
        comment: Some("localdns: DNS to/from a listener skips conntrack".into()),
    }
}

/// How many rules [`install`] puts in the table for `listen`.
pub fn rule_count(listen: &[IpAddr]) -> usize {
    CHAINS.len() * listen.len() * 2
}

/// The crate writes the notrack statement as the bare string `"notrack"`;
/// nft's JSON parser wants `{"notrack": null}`.
fn patch_notrack(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Array(items) => {
            for item in items {
                if item.as_str() == Some("notrack") {
                    *item = serde_json::json!({ "notrack": null });
                } else {
                    patch_notrack(item);
                }
            }
        }
        Value::Object(fields) => fields.values_mut().for_each(patch_notrack),
        _ => {}
    }
}

/// The whole transaction for `listen`, as `nft -j -f` reads it.
fn ruleset_json(listen: &[IpAddr]) -> Result<String, NotrackError> {
    let mut b = Batch::new();
    b.add(NfListObject::Table(table()));
    b.add_cmd(NfCmd::Flush(FlushObject::Table(table())));
    for (name, hook) in CHAINS {
        b.add(NfListObject::Chain(Chain {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: name.into(),
            _type: Some(NfChainType::Filter),
            hook: Some(hook),
            prio: Some(PRIO_RAW),
            ..Default::default()
        }));
        for ip in listen {
            b.add(NfListObject::Rule(rule(name, *ip, "daddr", "dport")));
            b.add(NfListObject::Rule(rule(name, *ip, "saddr", "sport")));
        }
    }
    let mut v = serde_json::to_value(b.to_nftables()).map_err(NotrackError::Json)?;
    patch_notrack(&mut v);
    Ok(v.to_string())
}

/// Installs (or replaces) the table with rules for `listen`, atomically.
pub fn install(listen: &[IpAddr]) -> Result<(), NotrackError> {
    apply(&ruleset_json(listen)?)
}

/// Runs `nft -j ARGS`, with `input` on stdin; its stdout. Every stream is
/// a pipe: a minimal container may have no /dev (no /dev/null for an
/// inherited-null stream, no /dev/stdin for `-f -`).
fn nft(args: &[&str], input: &str) -> Result<String, NotrackError> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("nft")
        .arg("-j")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NotrackError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(NotrackError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NotrackError::Spawn)?;
    if !out.status.success() {
        return Err(NotrackError::Rejected(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Applies a JSON ruleset (stdin named through /proc, not as `-`).
fn apply(json: &str) -> Result<(), NotrackError> {
    nft(&["-f", "/proc/self/fd/0"], json).map(drop)
}

/// Our table as nft lists it, if it exists.
fn list() -> Option<String> {
    nft(&["list", "table", "inet", TABLE], "").ok()
}

/// Rules of our table now in the kernel (0 when the table is missing).
pub fn installed_rules() -> usize {
    list().map_or(0, |raw| raw.matches("\"notrack\"").count())
}

/// Removes the table (nothing to do when it is not there).
pub fn remove() -> Result<bool, NotrackError> {
    if list().is_none() {
        return Ok(false);
    }
    let mut b = Batch::new();
    b.delete(NfListObject::Table(table()));
    apply(&serde_json::to_string(&b.to_nftables()).map_err(NotrackError::Json)?)?;
    Ok(true)
}

/// Keeps the rules in place: checks every `every` and reinstalls them when
/// something (an operator's `nft flush ruleset`, a firewall reload) took
/// them away.
pub async fn keep(listen: Vec<IpAddr>, every: std::time::Duration) {
    let want = rule_count(&listen);
    loop {
        tokio::time::sleep(every).await;
        let l = listen.clone();
        let have = tokio::task::spawn_blocking(installed_rules)
            .await
            .unwrap_or(0);
        if have != want {
            tracing::warn!(have, want, "NOTRACK rules missing: reinstalling");
            match tokio::task::spawn_blocking(move || install(&l)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "reinstalling NOTRACK rules failed"),
                Err(e) => tracing::error!(error = %e, "reinstalling NOTRACK rules failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notrack_is_sent_as_nft_expects_it() {
        let listen: Vec<IpAddr> = vec![
            "169.254.10.10".parse().unwrap(),
            "fd00:10::10".parse().unwrap(),
        ];
        let json = ruleset_json(&listen).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let rules: Vec<_> = v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o.get("add")?.get("rule"))
            .collect();
        assert_eq!(rules.len(), rule_count(&listen));
        for r in rules {
            let last = r["expr"].as_array().unwrap().last().unwrap();
            assert_eq!(last, &serde_json::json!({"notrack": null}), "{r}");
        }
        assert!(json.contains(r#""protocol":"ip6""#));
    }
}
