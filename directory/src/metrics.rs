//! Counters for `/metrics`, in Prometheus' text format. A handful of counters does not need a
//! metrics framework: a map from (name, label) to a count behind a lock.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// A counter family: its name, help text and label name (if it has one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub label: Option<&'static str>,
}

pub const DESCRIPTORS_ACCEPTED: Family = Family {
    name: "murmur_directory_descriptors_accepted_total",
    help: "Relay descriptors accepted (new or newer).",
    label: None,
};
pub const DESCRIPTORS_REJECTED: Family = Family {
    name: "murmur_directory_descriptors_rejected_total",
    help: "Relay descriptors refused, by reason.",
    label: Some("reason"),
};
pub const VOTES_RECEIVED: Family = Family {
    name: "murmur_directory_votes_received_total",
    help: "Votes received from peers or fetched from them, by result.",
    label: Some("result"),
};
pub const SIGNATURES_RECEIVED: Family = Family {
    name: "murmur_directory_signatures_received_total",
    help: "Consensus signatures received from peers, by result.",
    label: Some("result"),
};
pub const CONSENSUS_PRODUCED: Family = Family {
    name: "murmur_directory_consensus_computed_total",
    help: "Consensus documents this authority computed and signed.",
    label: None,
};
pub const CONSENSUS_FAILED: Family = Family {
    name: "murmur_directory_consensus_failed_total",
    help: "Epochs for which no consensus could be computed, by reason.",
    label: Some("reason"),
};
pub const REQUESTS_REFUSED: Family = Family {
    name: "murmur_directory_requests_refused_total",
    help: "HTTP requests refused before their document was read, by reason.",
    label: Some("reason"),
};
pub const PEER_REQUESTS_FAILED: Family = Family {
    name: "murmur_directory_peer_requests_failed_total",
    help: "Requests to peer authorities that failed (each retry counts).",
    label: Some("kind"),
};

pub const PROBES: Family = Family {
    name: "murmur_directory_probes_total",
    help: "Relay test rounds by result (passed, lost, unreachable), and what the prober's \
           listener refused (inbound_*).",
    label: Some("result"),
};

/// Every counter of the authority.
#[derive(Debug, Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<(Family, &'static str), u64>>,
}

impl Metrics {
    /// Adds one to `family` (with `label`'s value, or "" for an unlabelled family).
    pub fn inc(&self, family: Family, label: &'static str) {
        let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        *c.entry((family, label)).or_insert(0) += 1;
    }

    /// The current value of a counter.
    pub fn get(&self, family: Family, label: &'static str) -> u64 {
        let c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        c.get(&(family, label)).copied().unwrap_or(0)
    }

    /// The text exposition: every counter, then the given gauges `(name, help, value)`.
    pub fn render(&self, gauges: &[(&str, &str, u64)]) -> String {
        let mut out = String::new();
        let c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let families = [
            DESCRIPTORS_ACCEPTED,
            DESCRIPTORS_REJECTED,
            VOTES_RECEIVED,
            SIGNATURES_RECEIVED,
            CONSENSUS_PRODUCED,
            CONSENSUS_FAILED,
            REQUESTS_REFUSED,
            PEER_REQUESTS_FAILED,
            PROBES,
        ];
        for f in families {
            let _ = writeln!(
                out,
                "# HELP {} {}\n# TYPE {} counter",
                f.name, f.help, f.name
            );
            let mut any = false;
            for ((_, label), n) in c.range((f, "")..).take_while(|((g, _), _)| *g == f) {
                any = true;
                match f.label {
                    Some(l) => {
                        let _ = writeln!(out, "{}{{{l}=\"{label}\"}} {n}", f.name);
                    }
                    None => {
                        let _ = writeln!(out, "{} {n}", f.name);
                    }
                }
            }
            if !any && f.label.is_none() {
                let _ = writeln!(out, "{} 0", f.name);
            }
        }
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        out
    }
}
