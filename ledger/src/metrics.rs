//! `/metrics` in Prometheus' text format: requests by operation and result, and the money
//! supply from an audit of the ledger.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use crate::ledger::Audit;

/// Request counters, by operation (`fund`, `warn`, `withdraw`, `redeem`, `pot`, `account`)
/// and result (`ok` or a refusal's label, `storage`, `internal`).
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Connections refused or closed before they were served, by reason.
    refused: Mutex<BTreeMap<&'static str, u64>>,
}

impl Metrics {
    /// Counts one request.
    pub fn inc(&self, op: &'static str, result: &'static str) {
        let mut c = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *c.entry((op, result)).or_insert(0) += 1;
    }

    /// The count of one (operation, result).
    pub fn get(&self, op: &'static str, result: &'static str) -> u64 {
        let c = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        c.get(&(op, result)).copied().unwrap_or(0)
    }

    /// Counts a connection refused or closed before it was served (`per_address_limit`,
    /// `header_timeout`, `idle_timeout`).
    pub fn refused(&self, reason: &'static str) {
        let mut c = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        *c.entry(reason).or_insert(0) += 1;
    }

    /// The text exposition; the money gauges are left out if the audit failed.
    pub fn render(&self, audit: Option<&Audit>) -> String {
        let mut out = String::new();
        let name = "murmur_ledger_requests_total";
        let _ = writeln!(
            out,
            "# HELP {name} Requests by operation and result (ok, or the refusal's reason).\n\
             # TYPE {name} counter"
        );
        {
            let c = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            for ((op, result), n) in c.iter() {
                let _ = writeln!(out, "{name}{{op=\"{op}\",result=\"{result}\"}} {n}");
            }
        }
        let name = "murmur_ledger_connections_refused_total";
        let _ = writeln!(
            out,
            "# HELP {name} Connections refused or closed before they were served, by reason.\n\
             # TYPE {name} counter"
        );
        {
            let c = self.refused.lock().unwrap_or_else(|p| p.into_inner());
            for (reason, n) in c.iter() {
                let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {n}");
            }
        }
        let Some(a) = audit else {
            return out;
        };
        let name = "murmur_ledger_money";
        let _ = writeln!(
            out,
            "# HELP {name} Base units by where they are; they add up to the genesis total.\n\
             # TYPE {name} gauge"
        );
        for (held_in, v) in [
            ("accounts", a.accounts),
            ("pot_balances", a.pot_balances),
            ("pot_escrows", a.pot_escrows),
            ("burned", u128::from(a.burned)),
            ("genesis", u128::from(a.genesis)),
        ] {
            let _ = writeln!(out, "{name}{{held_in=\"{held_in}\"}} {v}");
        }
        for (name, help, v) in [
            (
                "murmur_ledger_conserved",
                "1 if accounts, pots and burned add up to the genesis total.",
                u64::from(a.conserved()),
            ),
            ("murmur_ledger_pots", "Pots held.", a.pots),
            (
                "murmur_ledger_redeemed_tickets",
                "Redeemed-ticket records kept until their tickets expire.",
                a.redeemed_tickets,
            ),
            (
                "murmur_ledger_remembered_requests",
                "Request nonces kept for replay protection.",
                a.remembered_requests,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        out
    }
}
