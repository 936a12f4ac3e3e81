//! What a run measured, and the files it writes.
//!
//! `summary.json` holds only what the seed determines, so two runs with the same seed write
//! the same bytes. Wall-clock figures (seconds, events per second) go to `timing.json`.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::scenario::Scenario;
use crate::{Error, Result};

/// One measured real message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MessageRow {
    pub message: u32,
    pub sender: u32,
    pub created_s: f64,
    pub sent_s: f64,
    pub delivered_s: f64,
    pub latency_s: f64,
    pub entropy_bits: Option<f64>,
    pub min_entropy_bits: Option<f64>,
    pub anonymity_set: Option<u32>,
}

/// One mix over the measured window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MixRow {
    pub mix: u32,
    pub layer: u32,
    pub corrupt: bool,
    pub mean_pool: f64,
    pub max_pool: u32,
    pub arrivals_per_s: f64,
}

/// The figures of one run. Everything here follows from the scenario and the seed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub scenario: String,
    pub seed: u64,
    /// Real messages created in the measured window (all delivered before the run ends).
    pub messages: u64,
    /// Events the engine processed.
    pub events: u64,
    /// End to end: from the message's creation (including its wait for a send tick) until it
    /// leaves the last mix.
    pub latency_mean_s: Option<f64>,
    pub latency_p50_s: Option<f64>,
    pub latency_p99_s: Option<f64>,
    /// From the packet's departure from the client until it leaves the last mix.
    pub network_latency_mean_s: Option<f64>,
    /// Messages whose sender anonymity was computed.
    pub measured_messages: u64,
    pub entropy_mean_bits: Option<f64>,
    pub min_entropy_mean_bits: Option<f64>,
    pub anonymity_set_mean: Option<f64>,
    /// Coordinates of the adversary's distributions: the number of senders when exact, the
    /// sample size when sampled (`measure.tracker`), 0 when anonymity is not tracked.
    pub tracked_senders: u64,
    /// Measured messages whose anonymity could not be estimated (sampled tracking, and no
    /// sampled sender could have sent them); always 0 when exact.
    pub unestimated_messages: u64,
    /// Cover packets per real packet sent in the window (client and relay cover alike).
    pub overhead_ratio: Option<f64>,
    pub real_packets: u64,
    pub cover_packets: u64,
    /// Time-average packets in a mix, averaged over mixes.
    pub mean_pool_size: f64,
    /// Packets arriving at a mix per second, averaged over mixes.
    pub mix_arrival_rate_per_s: f64,
    /// `mix_arrival_rate_per_s / mu`: the M/M/∞ prediction of `mean_pool_size`.
    pub lambda_over_mu: f64,
}

/// The mean, if there is anything.
pub(crate) fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = xs.fold((0.0, 0u64), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// Nearest-rank percentile of sorted data.
pub(crate) fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
    sorted.get(rank - 1).copied()
}

impl Summary {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        s: &Scenario,
        seed: u64,
        events: u64,
        latencies: &mut [f64],
        network_latency_sum: f64,
        rows: &[MessageRow],
        mixes: &[MixRow],
        (real, cover): (u64, u64),
        tracked_senders: u64,
    ) -> Summary {
        latencies.sort_by(f64::total_cmp);
        let n = latencies.len();
        let mix_rate = mean(mixes.iter().map(|m| m.arrivals_per_s)).unwrap_or(0.0);
        Summary {
            scenario: s.name.clone(),
            seed,
            messages: n as u64,
            events,
            latency_mean_s: mean(latencies.iter().copied()),
            latency_p50_s: percentile(latencies, 0.5),
            latency_p99_s: percentile(latencies, 0.99),
            network_latency_mean_s: (n > 0).then(|| network_latency_sum / n as f64),
            measured_messages: rows.len() as u64,
            entropy_mean_bits: mean(rows.iter().filter_map(|r| r.entropy_bits)),
            min_entropy_mean_bits: mean(rows.iter().filter_map(|r| r.min_entropy_bits)),
            anonymity_set_mean: mean(rows.iter().filter_map(|r| r.anonymity_set.map(f64::from))),
            tracked_senders,
            unestimated_messages: rows.iter().filter(|r| r.entropy_bits.is_none()).count() as u64,
            overhead_ratio: (real > 0).then(|| cover as f64 / real as f64),
            real_packets: real,
            cover_packets: cover,
            mean_pool_size: mean(mixes.iter().map(|m| m.mean_pool)).unwrap_or(0.0),
            mix_arrival_rate_per_s: mix_rate,
            lambda_over_mu: mix_rate / s.rates.mu,
        }
    }

    /// The summary's figures by name, as they appear in `summary.json` (numbers only).
    pub fn fields(&self) -> Result<Vec<(String, Option<f64>)>> {
        fields_of(self)
    }
}

/// A summary's figures by name (numbers only: its name, mode and tables of counts left out).
pub fn fields_of<T: Serialize>(summary: &T) -> Result<Vec<(String, Option<f64>)>> {
    let value = serde_json::to_value(summary).map_err(|e| Error::Input(e.to_string()))?;
    let serde_json::Value::Object(map) = value else {
        return Err(Error::Input("summary is not an object".into()));
    };
    Ok(map
        .into_iter()
        .filter(|(k, v)| k != "scenario" && k != "mode" && !v.is_object())
        .map(|(k, v)| (k, v.as_f64()))
        .collect())
}

/// Everything a run produced.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub summary: Summary,
    /// Measured messages, in delivery order.
    pub messages: Vec<MessageRow>,
    /// End-to-end latencies of every message in the window, sorted (seconds).
    pub latencies: Vec<f64>,
    pub mixes: Vec<MixRow>,
}

/// Wall-clock figures of a run: not deterministic, so not in `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    pub wall_s: f64,
    pub events: u64,
    pub events_per_s: f64,
}

/// Writes `path`, naming it in any error.
pub fn write_file(path: &Path, contents: &[u8]) -> Result<()> {
    std::fs::write(path, contents).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Pretty JSON with a final newline.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| Error::Input(e.to_string()))?;
    text.push('\n');
    write_file(path, text.as_bytes())
}

/// A CSV cell: numbers as JSON writes them, empty for none.
pub fn cell<T: ToString>(x: Option<T>) -> String {
    x.map(|x| x.to_string()).unwrap_or_default()
}

/// The per-message CSV.
pub fn messages_csv(rows: &[MessageRow]) -> String {
    let mut out = String::from(
        "message,sender,created_s,sent_s,delivered_s,latency_s,entropy_bits,min_entropy_bits,anonymity_set\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{}",
            r.message,
            r.sender,
            r.created_s,
            r.sent_s,
            r.delivered_s,
            r.latency_s,
            cell(r.entropy_bits),
            cell(r.min_entropy_bits),
            cell(r.anonymity_set)
        );
    }
    out
}

/// The per-mix CSV.
pub fn mixes_csv(rows: &[MixRow]) -> String {
    let mut out = String::from("mix,layer,corrupt,mean_pool,max_pool,arrivals_per_s\n");
    for r in rows {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{}",
            r.mix, r.layer, r.corrupt, r.mean_pool, r.max_pool, r.arrivals_per_s
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&xs, 0.5), Some(50.0));
        assert_eq!(percentile(&xs, 0.99), Some(99.0));
        assert_eq!(percentile(&xs, 1.0), Some(100.0));
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[3.0], 0.0), Some(3.0));
    }
}
