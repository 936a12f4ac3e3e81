//! Scenario files: a versioned TOML schema, refused loudly when wrong.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The schema version this build reads.
pub const SCHEMA_VERSION: u32 = 1;

/// The most mix layers a path can cross (Murmur routes `[L1, L2, L3, exit]`).
pub const MAX_LAYERS: usize = 3;

/// One simulated network and what to measure in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Schema version; must be 1.
    pub version: u32,
    /// A name for reports.
    #[serde(default)]
    pub name: String,
    /// Seed of every random choice; `--seed` overrides it.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Simulated seconds of traffic (including the warm-up).
    pub duration_s: f64,
    /// Seconds at the start that are simulated but not measured (pools fill up).
    #[serde(default)]
    pub warmup_s: f64,
    pub network: Network,
    pub rates: Rates,
    pub traffic: Traffic,
    #[serde(default)]
    pub adversary: Adversary,
    #[serde(default)]
    pub tickets: Tickets,
    #[serde(default)]
    pub measure: Measure,
    /// `fast` (the default: packets as ids, no links, no cryptography) or `fidelity` (the
    /// shipping client sessions, relays, gateways and exit on real packets; see
    /// [`crate::fidelity`]). `murmur-sim run --fidelity` sets it.
    #[serde(default)]
    pub mode: Mode,
    /// Links' latency and loss (fidelity mode).
    #[serde(default)]
    pub links: Links,
    /// The applications' streams (fidelity mode).
    #[serde(default)]
    pub streams: Streams,
}

/// Which engine runs the scenario.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Fast,
    Fidelity,
}

/// What every link does to a packet (fidelity mode). A link between relays takes
/// `latency_ms` plus a fixed share of `latency_spread_ms` of its own (each directed link
/// draws its share once, from its endpoints), plus up to `jitter_ms` more per packet
/// (uniform), and loses each packet with probability `loss`. A client's access link to its
/// gateway takes `access_latency_ms` and loses with `access_loss`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Links {
    #[serde(default)]
    pub latency_ms: f64,
    #[serde(default)]
    pub latency_spread_ms: f64,
    #[serde(default)]
    pub jitter_ms: f64,
    #[serde(default)]
    pub loss: f64,
    #[serde(default)]
    pub access_latency_ms: f64,
    #[serde(default)]
    pub access_loss: f64,
}

impl Default for Links {
    fn default() -> Self {
        Links {
            latency_ms: 0.0,
            latency_spread_ms: 0.0,
            jitter_ms: 0.0,
            loss: 0.0,
            access_latency_ms: 0.0,
            access_loss: 0.0,
        }
    }
}

/// The applications behind the clients (fidelity mode): page loads, and bulk downloads.
/// Every client but the first `bulk_clients` loads pages as a Poisson process: it opens a
/// stream to the exit's simulated web server, writes `request_bytes` and closes its side;
/// the server answers `server_delay_ms` after the whole request arrived with `page_bytes`,
/// then closes. Each of the first `bulk_clients` clients downloads `bulk_bytes` at a time,
/// pausing `bulk_pause_s` between downloads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Streams {
    #[serde(default = "default_page_rate")]
    pub page_loads_per_s: f64,
    #[serde(default = "default_request_bytes")]
    pub request_bytes: u32,
    #[serde(default = "default_page_bytes")]
    pub page_bytes: u32,
    #[serde(default = "default_server_delay")]
    pub server_delay_ms: f64,
    #[serde(default)]
    pub bulk_clients: u32,
    #[serde(default = "default_bulk_bytes")]
    pub bulk_bytes: u32,
    #[serde(default = "default_bulk_pause")]
    pub bulk_pause_s: f64,
    /// A page load that finds this many of its client's streams open is skipped (counted).
    #[serde(default = "default_max_open")]
    pub max_open_per_client: u32,
    /// Packets a ticket to a mix or the exit pays for (the payer's `packets_per_ticket`).
    #[serde(default = "default_packets_per_ticket")]
    pub packets_per_ticket: u64,
}

fn default_page_rate() -> f64 {
    0.02
}
fn default_request_bytes() -> u32 {
    400
}
fn default_page_bytes() -> u32 {
    20_000
}
fn default_server_delay() -> f64 {
    50.0
}
fn default_bulk_bytes() -> u32 {
    1_000_000
}
fn default_bulk_pause() -> f64 {
    10.0
}
fn default_max_open() -> u32 {
    8
}
fn default_packets_per_ticket() -> u64 {
    64
}

impl Default for Streams {
    fn default() -> Self {
        Streams {
            page_loads_per_s: default_page_rate(),
            request_bytes: default_request_bytes(),
            page_bytes: default_page_bytes(),
            server_delay_ms: default_server_delay(),
            bulk_clients: 0,
            bulk_bytes: default_bulk_bytes(),
            bulk_pause_s: default_bulk_pause(),
            max_open_per_client: default_max_open(),
            packets_per_ticket: default_packets_per_ticket(),
        }
    }
}

fn default_seed() -> u64 {
    1
}

fn default_one() -> u32 {
    1
}

fn default_true() -> bool {
    true
}

fn default_sample() -> f64 {
    1.0
}

/// The shape of the network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Number of clients.
    pub clients: u32,
    /// Number of gateways; clients are split among them in equal contiguous blocks.
    #[serde(default = "default_one")]
    pub gateways: u32,
    /// Mix layers on every path (1 to 3).
    pub layers: u32,
    /// Mixes in each layer.
    pub mixes_per_layer: u32,
}

/// Loopix rates, all per second, as published in the directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rates {
    /// λ_P: each client's send stream (a real packet if queued, else cover).
    pub lambda_p: f64,
    /// λ_L: each client's loop cover.
    pub lambda_l: f64,
    /// λ_D: each client's drop cover.
    pub lambda_d: f64,
    /// λ_M: each mix's loop cover.
    pub lambda_m: f64,
    /// μ: per-hop delay rate; the mean delay at each hop is 1/μ seconds.
    pub mu: f64,
    /// With `false`, no cover at all: clients send each real packet the moment it exists and
    /// the four λ are ignored (the "without cover" case of the Loopix evaluation).
    #[serde(default = "default_true")]
    pub cover: bool,
}

/// Where real messages come from. Every message is one packet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Traffic {
    pub model: TrafficModel,
    /// `poisson`: messages per second per client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_per_s: Option<f64>,
    /// `trace`: a CSV file of `time_s,client` lines (relative to the scenario file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
}

/// The traffic model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrafficModel {
    /// Each client creates messages as a Poisson process.
    Poisson,
    /// Messages at the times and from the clients a trace file lists.
    Trace,
}

/// What the adversary sees and controls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Adversary {
    /// `true`: a global passive observer sees every link, clients' access links included.
    /// `false`: it sees the links between relays only, so a packet leaving an honest gateway
    /// could be from any of that gateway's clients.
    #[serde(default = "default_true")]
    pub global_passive: bool,
    /// Fraction of mixes the adversary runs (rounded to a whole number of mixes): they reveal
    /// which outgoing packet is which incoming one.
    #[serde(default)]
    pub corrupt_mix_fraction: f64,
    /// Gateways the adversary runs: they know which of their clients sent each packet (this
    /// adds nothing to a global passive observer, who sees the access links anyway).
    #[serde(default)]
    pub corrupt_gateways: u32,
}

impl Default for Adversary {
    fn default() -> Self {
        Adversary {
            global_passive: true,
            corrupt_mix_fraction: 0.0,
            corrupt_gateways: 0,
        }
    }
}

/// Per-hop payment tickets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tickets {
    /// Probability that a client's packet carries a ticket for a given hop. A corrupt mix
    /// that receives a ticket learns the pot that paid, and so the packet's sender.
    #[serde(default)]
    pub rate: f64,
}

/// What to measure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Measure {
    /// Track the adversary's sender distributions (costs one vector of all senders per mix).
    #[serde(default = "default_true")]
    pub anonymity: bool,
    /// Fraction of real messages whose sender anonymity is computed and listed in the CSV.
    #[serde(default = "default_sample")]
    pub sample: f64,
    /// How the distributions are kept: over every sender, over a fixed sample of them, or
    /// (`auto`) exact up to [`AUTO_EXACT_MAX_SENDERS`] senders and sampled above.
    #[serde(default)]
    pub tracker: TrackerKind,
    /// Senders in the sample when sampled.
    #[serde(default = "default_tracked_senders")]
    pub tracked_senders: u32,
}

/// Above this many senders (clients and mixes), `measure.tracker = "auto"` samples.
pub const AUTO_EXACT_MAX_SENDERS: usize = 20_000;

fn default_tracked_senders() -> u32 {
    1024
}

/// The anonymity tracker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrackerKind {
    /// Exact up to [`AUTO_EXACT_MAX_SENDERS`] senders, sampled above.
    #[default]
    Auto,
    /// One coordinate per sender: O(senders) per hop.
    Exact,
    /// `tracked_senders` coordinates: O(tracked_senders) per hop, estimated figures.
    Sampled,
}

impl Measure {
    /// Whether a network of `senders` senders samples them.
    pub fn samples(&self, senders: usize) -> bool {
        let k = self.tracked_senders as usize;
        match self.tracker {
            TrackerKind::Exact => false,
            TrackerKind::Sampled => k < senders,
            TrackerKind::Auto => senders > AUTO_EXACT_MAX_SENDERS && k < senders,
        }
    }
}

impl Default for Measure {
    fn default() -> Self {
        Measure {
            anonymity: true,
            sample: 1.0,
            tracker: TrackerKind::Auto,
            tracked_senders: default_tracked_senders(),
        }
    }
}

/// A scenario as loaded: the document, and the directory its relative paths start from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub scenario: Scenario,
    pub base_dir: PathBuf,
}

impl Loaded {
    /// A scenario given as text (with overrides); relative paths start at the working directory.
    pub fn from_text<S: AsRef<str>>(text: &str, overrides: &[S]) -> Result<Loaded> {
        Ok(Loaded {
            scenario: Scenario::parse(text, overrides)?,
            base_dir: PathBuf::from("."),
        })
    }
}

impl Scenario {
    /// Reads, overrides (`key.path=value`, value in TOML syntax) and checks a scenario file.
    pub fn load<S: AsRef<str>>(path: &Path, overrides: &[S]) -> Result<Loaded> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let scenario = Scenario::parse(&text, overrides).map_err(|e| match e {
            Error::Scenario { message, .. } => Error::Scenario {
                origin: path.display().to_string(),
                message,
            },
            other => other,
        })?;
        let base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok(Loaded { scenario, base_dir })
    }

    /// Parses and checks scenario text, with overrides applied.
    pub fn parse<S: AsRef<str>>(text: &str, overrides: &[S]) -> Result<Scenario> {
        let bad = |message: String| Error::Scenario {
            origin: "scenario".into(),
            message,
        };
        // Parse the text as written first, so errors point at its lines.
        let mut scenario: Scenario = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        if !overrides.is_empty() {
            let mut table: toml::Table = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
            for o in overrides {
                apply_override(&mut table, o.as_ref())?;
            }
            scenario = table.try_into().map_err(|e| bad(e.to_string()))?;
        }
        scenario.check().map_err(bad)?;
        Ok(scenario)
    }

    /// A scenario changed after loading, checked again.
    pub fn checked(scenario: Scenario) -> Result<Scenario> {
        scenario.check().map_err(|message| Error::Scenario {
            origin: "scenario".into(),
            message,
        })?;
        Ok(scenario)
    }

    /// Every constraint serde cannot express, in words a user can act on.
    fn check(&self) -> std::result::Result<(), String> {
        if self.version != SCHEMA_VERSION {
            return Err(format!(
                "schema version {} is not supported (this build reads version {SCHEMA_VERSION})",
                self.version
            ));
        }
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("{name} must be a positive number; got {v}"))
            }
        };
        let non_negative = |name: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(format!("{name} must be a number ≥ 0; got {v}"))
            }
        };
        let fraction = |name: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("{name} must be between 0 and 1; got {v}"))
            }
        };
        positive("duration_s", self.duration_s)?;
        non_negative("warmup_s", self.warmup_s)?;
        if self.warmup_s >= self.duration_s {
            return Err(format!(
                "warmup_s ({}) must be shorter than duration_s ({})",
                self.warmup_s, self.duration_s
            ));
        }
        let n = &self.network;
        if n.clients == 0 {
            return Err("network.clients must be at least 1".into());
        }
        if n.gateways == 0 || n.gateways > n.clients {
            return Err(format!(
                "network.gateways must be between 1 and the number of clients ({}); got {}",
                n.clients, n.gateways
            ));
        }
        if n.layers == 0 || n.layers as usize > MAX_LAYERS {
            return Err(format!(
                "network.layers must be 1 to {MAX_LAYERS}; got {}",
                n.layers
            ));
        }
        if n.mixes_per_layer == 0 {
            return Err("network.mixes_per_layer must be at least 1".into());
        }
        // Sender ids (clients, then mixes) index u32 vectors; mix ids fit a u16 path.
        if u64::from(n.layers) * u64::from(n.mixes_per_layer) > u64::from(u16::MAX) {
            return Err("network has too many mixes (at most 65535)".into());
        }
        let r = &self.rates;
        positive("rates.mu", r.mu)?;
        for (name, v) in [
            ("rates.lambda_p", r.lambda_p),
            ("rates.lambda_l", r.lambda_l),
            ("rates.lambda_d", r.lambda_d),
            ("rates.lambda_m", r.lambda_m),
        ] {
            non_negative(name, v)?;
        }
        match self.traffic.model {
            TrafficModel::Poisson => {
                let Some(rate) = self.traffic.messages_per_s else {
                    return Err("traffic.model = \"poisson\" needs traffic.messages_per_s".into());
                };
                non_negative("traffic.messages_per_s", rate)?;
                if self.traffic.file.is_some() {
                    return Err("traffic.file is for model = \"trace\"".into());
                }
                if r.cover && rate >= r.lambda_p && rate > 0.0 {
                    return Err(format!(
                        "with cover, real messages leave only on λ_P ticks: \
                         traffic.messages_per_s ({rate}) must be below rates.lambda_p ({}), \
                         or client queues grow without bound",
                        r.lambda_p
                    ));
                }
            }
            TrafficModel::Trace => {
                if self.traffic.file.is_none() {
                    return Err("traffic.model = \"trace\" needs traffic.file".into());
                }
                if self.traffic.messages_per_s.is_some() {
                    return Err("traffic.messages_per_s is for model = \"poisson\"".into());
                }
                if r.cover && r.lambda_p == 0.0 {
                    return Err("with cover, rates.lambda_p must be positive".into());
                }
            }
        }
        let a = &self.adversary;
        fraction("adversary.corrupt_mix_fraction", a.corrupt_mix_fraction)?;
        if a.corrupt_gateways > n.gateways {
            return Err(format!(
                "adversary.corrupt_gateways ({}) exceeds network.gateways ({})",
                a.corrupt_gateways, n.gateways
            ));
        }
        fraction("tickets.rate", self.tickets.rate)?;
        fraction("measure.sample", self.measure.sample)?;
        if self.measure.tracked_senders == 0 {
            return Err("measure.tracked_senders must be at least 1".into());
        }
        let l = &self.links;
        for (name, v) in [
            ("links.latency_ms", l.latency_ms),
            ("links.latency_spread_ms", l.latency_spread_ms),
            ("links.jitter_ms", l.jitter_ms),
            ("links.access_latency_ms", l.access_latency_ms),
        ] {
            non_negative(name, v)?;
            if v > 60_000.0 {
                return Err(format!("{name} must be at most 60000 (a minute); got {v}"));
            }
        }
        fraction("links.loss", l.loss)?;
        fraction("links.access_loss", l.access_loss)?;
        let st = &self.streams;
        non_negative("streams.page_loads_per_s", st.page_loads_per_s)?;
        non_negative("streams.server_delay_ms", st.server_delay_ms)?;
        non_negative("streams.bulk_pause_s", st.bulk_pause_s)?;
        if st.bulk_clients > n.clients {
            return Err(format!(
                "streams.bulk_clients ({}) exceeds network.clients ({})",
                st.bulk_clients, n.clients
            ));
        }
        for (name, v) in [
            ("streams.request_bytes", st.request_bytes),
            ("streams.page_bytes", st.page_bytes),
            ("streams.bulk_bytes", st.bulk_bytes),
        ] {
            if v == 0 || v > 100_000_000 {
                return Err(format!("{name} must be 1 to 100000000; got {v}"));
            }
        }
        if st.max_open_per_client == 0 || st.max_open_per_client > 1024 {
            return Err(format!(
                "streams.max_open_per_client must be 1 to 1024; got {}",
                st.max_open_per_client
            ));
        }
        if st.packets_per_ticket == 0 {
            return Err("streams.packets_per_ticket must be at least 1".into());
        }
        if self.mode == Mode::Fidelity {
            if !r.cover || r.lambda_p <= 0.0 {
                return Err(
                    "mode = \"fidelity\" runs the client session, which sends on λ_P ticks: \
                     rates.cover must be true and rates.lambda_p positive"
                        .into(),
                );
            }
            if n.layers as usize != MAX_LAYERS {
                return Err(format!(
                    "mode = \"fidelity\" routes over the directory's three layers; \
                     network.layers must be {MAX_LAYERS}"
                ));
            }
        }
        Ok(())
    }

    /// Simulated duration in nanoseconds.
    pub fn duration_ns(&self) -> u64 {
        secs_to_ns(self.duration_s)
    }

    /// Warm-up in nanoseconds.
    pub fn warmup_ns(&self) -> u64 {
        secs_to_ns(self.warmup_s)
    }
}

/// Seconds (checked finite and ≥ 0) to whole nanoseconds.
pub(crate) fn secs_to_ns(s: f64) -> u64 {
    (s * 1e9).round() as u64
}

/// Sets `a.b.c = value` in a TOML table; `value` is TOML (`2.5`, `true`, `"trace"`).
fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let bad = |m: &str| Error::Override(assignment.to_string(), m.to_string());
    let (key, value) = assignment
        .split_once('=')
        .ok_or_else(|| bad("expected KEY=VALUE"))?;
    let value: toml::Value = {
        let doc: toml::Table =
            toml::from_str(&format!("v = {}", value.trim())).map_err(|e| bad(&e.to_string()))?;
        doc.get("v").cloned().ok_or_else(|| bad("no value"))?
    };
    let mut parts = key.trim().split('.').peekable();
    let mut cur = table;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            cur.insert(part.to_string(), value);
            return Ok(());
        }
        let next = cur
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = match next {
            toml::Value::Table(t) => t,
            _ => return Err(bad(&format!("`{part}` is not a table"))),
        };
    }
    Err(bad("empty key"))
}

/// Reads a trace: one `time_s,client` line per message; `#` starts a comment.
pub fn load_trace(path: &Path, clients: u32) -> Result<Vec<(u64, u32)>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let bad = |message: String| Error::Trace {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        };
        let (t, c) = line
            .split_once(',')
            .ok_or_else(|| bad("expected `time_s,client`".into()))?;
        let t: f64 = t
            .trim()
            .parse()
            .map_err(|_| bad(format!("time `{}` is not a number", t.trim())))?;
        if !t.is_finite() || t < 0.0 {
            return Err(bad(format!("time {t} must be ≥ 0")));
        }
        let c: u32 = c
            .trim()
            .parse()
            .map_err(|_| bad(format!("client `{}` is not a client index", c.trim())))?;
        if c >= clients {
            return Err(bad(format!(
                "client {c} does not exist (the network has {clients})"
            )));
        }
        out.push((secs_to_ns(t), c));
    }
    // Stable: equal times keep file order.
    out.sort_by_key(|&(t, _)| t);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        version = 1
        duration_s = 10
        [network]
        clients = 10
        layers = 3
        mixes_per_layer = 2
        [rates]
        lambda_p = 1
        lambda_l = 0.1
        lambda_d = 0.1
        lambda_m = 0.1
        mu = 2
        [traffic]
        model = "poisson"
        messages_per_s = 0.1
    "#;

    #[test]
    fn minimal_scenario_takes_defaults() {
        let s = Scenario::parse::<&str>(MINIMAL, &[]).unwrap();
        assert_eq!(s.seed, 1);
        assert!(s.rates.cover && s.adversary.global_passive && s.measure.anonymity);
        assert_eq!(s.network.gateways, 1);
    }

    #[test]
    fn overrides_replace_values_and_are_checked() {
        let s = Scenario::parse(
            MINIMAL,
            &["rates.mu=4.5", "adversary.corrupt_mix_fraction=0.5"],
        )
        .unwrap();
        assert_eq!(s.rates.mu, 4.5);
        assert_eq!(s.adversary.corrupt_mix_fraction, 0.5);
        let err = Scenario::parse(MINIMAL, &["rates.mu=-1"]).unwrap_err();
        assert!(
            err.to_string().contains("rates.mu must be a positive"),
            "{err}"
        );
        let err = Scenario::parse(MINIMAL, &["rates.bogus=1"]).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        assert!(matches!(
            Scenario::parse(MINIMAL, &["nonsense"]),
            Err(Error::Override(..))
        ));
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        let cases = [
            ("version = 1", "version = 2", "schema version 2"),
            ("[rates]", "bogus = 3\n[rates]", "unknown field `bogus`"),
            ("layers = 3", "layers = 4", "network.layers must be 1 to 3"),
            (
                "messages_per_s = 0.1",
                "messages_per_s = 2",
                "must be below rates.lambda_p",
            ),
            (
                "model = \"poisson\"",
                "model = \"trace\"",
                "needs traffic.file",
            ),
            (
                "duration_s = 10",
                "duration_s = 10\nwarmup_s = 20",
                "must be shorter",
            ),
        ];
        for (from, to, expect) in cases {
            let text = MINIMAL.replace(from, to);
            let err = Scenario::parse::<&str>(&text, &[]).unwrap_err().to_string();
            assert!(err.contains(expect), "{to}: {err}");
        }
    }

    #[test]
    fn traces_parse_sort_and_refuse_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.csv");
        std::fs::write(&p, "# time_s,client\n2.5,1\n0.5,0 # first\n\n").unwrap();
        assert_eq!(
            load_trace(&p, 2).unwrap(),
            vec![(500_000_000, 0), (2_500_000_000, 1)]
        );
        std::fs::write(&p, "1,5\n").unwrap();
        let err = load_trace(&p, 2).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("client 5"), "{err}");
    }
}
