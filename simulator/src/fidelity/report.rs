//! What a fidelity run measured: `summary.json` (deterministic: only what the seed decides)
//! and the per-stream, per-relay and per-message tables.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use murmur_protocol::session::SessionStats;
use serde::Serialize;

use super::web::{PageKind, StockFigures};
use crate::report::{Timing, cell, mean, percentile, write_file, write_json};
use crate::scenario::Loaded;
use crate::{Error, Result, plot};

/// Distinct hop-error labels kept (the rest are summed under `other`).
const MAX_ERROR_LABELS: usize = 64;

/// Pots the adversary's ticket counts keep apart (clients beyond are summed).
const MAX_POTS: usize = 1 << 20;

/// Counters of the whole network.
#[derive(Debug, Default)]
pub struct Counts {
    pub window_started: Option<u64>,
    pub link_crossings: u64,
    pub link_losses: u64,
    pub dropped_in_flight_cap: u64,
    pub cover_delivered: u64,
    pub replies_sent: u64,
    pub mix_loops_sent: u64,
    pub gateway_cutoff_verdicts: u64,
    /// Client packets the corrupt mixes carried in the window, tickets they read in them
    /// (valid, from a known pot), and packets whose distribution that ticket collapsed.
    pub corrupt_client_packets: u64,
    pub corrupt_tickets: u64,
    pub linked_by_ticket: u64,
    /// Tickets the corrupt mixes read, by the pot's owner.
    pub tickets_by_pot: BTreeMap<u32, u64>,
    pub errors: BTreeMap<String, u64>,
    /// From leaving the client to reaching the exit, for every real packet sent in the window.
    pub network_latency: Vec<f64>,
}

impl Counts {
    pub fn error(&mut self, label: &str) {
        let label = if self.errors.len() < MAX_ERROR_LABELS || self.errors.contains_key(label) {
            label
        } else {
            "other"
        };
        *self.errors.entry(label.to_string()).or_default() += 1;
    }

    pub fn note_pot(&mut self, owner: u32) {
        if self.tickets_by_pot.len() < MAX_POTS || self.tickets_by_pot.contains_key(&owner) {
            *self.tickets_by_pot.entry(owner).or_default() += 1;
        }
    }
}

/// One relay over the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RelayRow {
    pub relay: u32,
    pub role: &'static str,
    pub layer: u32,
    pub corrupt: bool,
    pub price: u64,
    /// Packets it accepted (Sphinx step done), over the run and in the window.
    pub carried: u64,
    pub carried_in_window: u64,
    /// Of those, the packets clients pay for (all but the mixes' own loops).
    pub client_carried: u64,
    /// Packets the clients' payers counted for it, and the expected value of the tickets
    /// they issued it (some still in flight or lost with their packets at the end).
    pub payer_counted: u64,
    pub issued_value: u64,
    /// Frames a gateway forwarded for or delivered to its clients (what its tabs charge).
    pub gateway_frames: u64,
    pub tickets: u64,
    pub tickets_refused: u64,
    /// Expected value of the tickets it accepted (base units).
    pub paid_value: u64,
    pub replays: u64,
    pub errors: u64,
}

impl RelayRow {
    /// What it was owed: its price per packet it carried (per frame, for a gateway).
    fn owed(&self) -> u64 {
        let units = if self.role == "gateway" {
            self.gateway_frames
        } else {
            self.client_carried
        };
        units.saturating_mul(self.price)
    }

    fn paid_over_owed(&self) -> Option<f64> {
        let owed = self.owed();
        (owed > 0).then(|| self.paid_value as f64 / owed as f64)
    }
}

/// One page load or download.
#[derive(Debug, Clone, Serialize)]
pub struct PageRow {
    pub page: u32,
    pub client: u32,
    pub kind: PageKind,
    pub bytes: u64,
    pub in_window: bool,
    pub started_s: f64,
    pub sent_s: Option<f64>,
    pub at_exit_s: Option<f64>,
    pub first_byte_s: Option<f64>,
    pub done_s: Option<f64>,
    /// The SOCKS code it failed with.
    pub failed: Option<u8>,
    pub received: u64,
}

/// One real packet measured at the exit.
#[derive(Debug, Clone, Serialize)]
pub struct MessageRow {
    pub sender: u32,
    pub sent_s: f64,
    pub at_exit_s: f64,
    pub entropy_bits: Option<f64>,
    pub min_entropy_bits: Option<f64>,
    pub anonymity_set: Option<u32>,
}

/// The figures of one fidelity run; everything here follows from the scenario and the seed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FidelitySummary {
    pub mode: &'static str,
    pub scenario: String,
    pub seed: u64,
    pub events: u64,
    pub clients: u64,
    /// Page loads started in the measured window, and how they ended.
    pub pages: u64,
    pub pages_completed: u64,
    pub pages_failed: u64,
    pub pages_unfinished: u64,
    pub pages_skipped: u64,
    /// From the application's open to the stream's first byte, and to its end (completed
    /// page loads in the window).
    pub ttfb_mean_s: Option<f64>,
    pub ttfb_p50_s: Option<f64>,
    pub ttfb_p99_s: Option<f64>,
    pub completion_mean_s: Option<f64>,
    pub completion_p50_s: Option<f64>,
    pub completion_p99_s: Option<f64>,
    /// The same for bulk downloads, and their mean rate (bytes per second of completion time).
    pub downloads: u64,
    pub downloads_completed: u64,
    pub download_completion_mean_s: Option<f64>,
    pub download_rate_mean_bytes_per_s: Option<f64>,
    /// Stream bytes the applications received in the window's streams, per second of window.
    pub goodput_bytes_per_s: f64,
    /// The request's latency, comparable with the fast mode's `latency_*`: from the page
    /// load's start (the request is written) to the exit reading the packet that opened it:
    /// the wait for a send tick, the access link, three mixes and their links.
    pub latency_mean_s: Option<f64>,
    pub latency_p50_s: Option<f64>,
    pub latency_p99_s: Option<f64>,
    /// The request's part before it left the client: the send stream's wait.
    pub send_wait_mean_s: Option<f64>,
    /// From leaving the client to the exit, for every real packet of the window.
    pub network_latency_mean_s: Option<f64>,
    /// Client packets in the window: real (data, acks, reply blocks), cover (drop), loops.
    pub real_packets: u64,
    pub cover_packets: u64,
    pub loop_packets: u64,
    /// Client packets re-sent for want of an acknowledgement.
    pub retransmissions: u64,
    /// Replies (and SURB-ACKs) the exit sent, and replies the clients received, in the window.
    pub exit_replies_sent: u64,
    pub replies_received: u64,
    pub reply_blocks_sent: u64,
    pub loops_missing: u64,
    /// The exit's reply-block stock: mean over 1-s samples in all, and per exit session with
    /// a stream open; the share of such samples with none; sessions that ran dry with data
    /// waiting.
    pub reply_stock_mean: Option<f64>,
    pub reply_stock_per_session_mean: Option<f64>,
    pub reply_stock_empty_fraction: Option<f64>,
    pub reply_starvation_events: u64,
    /// Anonymity of real packets reaching the exit, as the adversary sees them.
    pub measured_messages: u64,
    pub entropy_mean_bits: Option<f64>,
    pub min_entropy_mean_bits: Option<f64>,
    pub anonymity_set_mean: Option<f64>,
    pub tracked_senders: u64,
    pub unestimated_messages: u64,
    /// Ticket linkability on real envelopes: client packets the corrupt mixes carried in the
    /// window, the valid tickets they read in them, the fraction (`ticket_rate_measured`,
    /// the fast mode's `tickets.rate` per hop), packets that ticket named the sender of where
    /// the view had not, and pots seen.
    pub corrupt_client_packets: u64,
    pub corrupt_tickets: u64,
    pub ticket_rate_measured: Option<f64>,
    pub packets_linked_by_ticket: u64,
    pub pots_seen_by_adversary: u64,
    /// Paid value (expected value of accepted tickets) over owed value (price × packets
    /// carried; frames for gateways), over the run: mixes' mean, min and max; the exit's; the
    /// gateways' in all.
    pub mix_paid_over_owed_mean: Option<f64>,
    pub mix_paid_over_owed_min: Option<f64>,
    pub mix_paid_over_owed_max: Option<f64>,
    pub exit_paid_over_owed: Option<f64>,
    pub gateway_paid_over_owed: Option<f64>,
    pub tickets_refused: u64,
    pub gateway_cutoff_verdicts: u64,
    /// Link crossings and losses, replays dropped, and errors by label (an honest network
    /// has none).
    pub link_crossings: u64,
    pub link_losses: u64,
    pub replays: u64,
    pub errors: BTreeMap<String, u64>,
}

/// Everything a fidelity run produced.
#[derive(Debug, Clone)]
pub struct FidelityResult {
    pub summary: FidelitySummary,
    pub pages: Vec<PageRow>,
    pub relays: Vec<RelayRow>,
    pub messages: Vec<MessageRow>,
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

#[allow(clippy::too_many_arguments)]
pub(super) fn summarize(
    loaded: &Loaded,
    seed: u64,
    events: u64,
    counts: &mut Counts,
    stats: &[(SessionStats, SessionStats)],
    relays: Vec<RelayRow>,
    pages: Vec<PageRow>,
    messages: Vec<MessageRow>,
    tracked_senders: u64,
    stock: StockFigures,
) -> FidelityResult {
    let s = &loaded.scenario;
    let window_s = (s.duration_s - s.warmup_s).max(1e-9);
    let in_window = |p: &&PageRow| p.in_window;
    let of_kind = |k: PageKind| {
        let v: Vec<&PageRow> = pages
            .iter()
            .filter(in_window)
            .filter(|p| p.kind == k)
            .collect();
        v
    };
    let page_rows = of_kind(PageKind::Page);
    let bulk_rows = of_kind(PageKind::Bulk);
    let done = |rows: &[&PageRow]| -> Vec<f64> {
        sorted(
            rows.iter()
                .filter_map(|p| p.done_s.map(|d| d - p.started_s))
                .collect(),
        )
    };
    let ttfb = sorted(
        page_rows
            .iter()
            .filter(|p| p.done_s.is_some())
            .filter_map(|p| p.first_byte_s.map(|f| f - p.started_s))
            .collect(),
    );
    let completion = done(&page_rows);
    let bulk_done = done(&bulk_rows);
    let request = sorted(
        page_rows
            .iter()
            .chain(bulk_rows.iter())
            .filter_map(|p| p.at_exit_s.map(|a| a - p.started_s))
            .collect(),
    );
    let wait = mean(
        page_rows
            .iter()
            .chain(bulk_rows.iter())
            .filter_map(|p| p.sent_s.map(|x| x - p.started_s)),
    );
    let received: u64 = pages.iter().filter(in_window).map(|p| p.received).sum();
    let delta = |f: fn(&SessionStats) -> u64| -> u64 {
        stats.iter().map(|(a, b)| f(b).saturating_sub(f(a))).sum()
    };
    let mixes: Vec<f64> = relays
        .iter()
        .filter(|r| r.role == "mix")
        .filter_map(RelayRow::paid_over_owed)
        .collect();
    let ratio_of = |role: &str| {
        let (paid, owed) = relays
            .iter()
            .filter(|r| r.role == role)
            .fold((0u64, 0u64), |(p, o), r| (p + r.paid_value, o + r.owed()));
        (owed > 0).then(|| paid as f64 / owed as f64)
    };
    let count =
        |rows: &[&PageRow], f: fn(&PageRow) -> bool| rows.iter().filter(|p| f(p)).count() as u64;
    let network = std::mem::take(&mut counts.network_latency);
    let summary = FidelitySummary {
        mode: "fidelity",
        scenario: s.name.clone(),
        seed,
        events,
        clients: u64::from(s.network.clients),
        pages: page_rows.len() as u64,
        pages_completed: count(&page_rows, |p| p.done_s.is_some()),
        pages_failed: count(&page_rows, |p| p.failed.is_some()),
        pages_unfinished: count(&page_rows, |p| p.done_s.is_none() && p.failed.is_none()),
        pages_skipped: 0,
        ttfb_mean_s: mean(ttfb.iter().copied()),
        ttfb_p50_s: percentile(&ttfb, 0.5),
        ttfb_p99_s: percentile(&ttfb, 0.99),
        completion_mean_s: mean(completion.iter().copied()),
        completion_p50_s: percentile(&completion, 0.5),
        completion_p99_s: percentile(&completion, 0.99),
        downloads: bulk_rows.len() as u64,
        downloads_completed: bulk_done.len() as u64,
        download_completion_mean_s: mean(bulk_done.iter().copied()),
        download_rate_mean_bytes_per_s: mean(bulk_rows.iter().filter_map(|p| {
            p.done_s
                .map(|d| p.bytes as f64 / (d - p.started_s).max(1e-9))
        })),
        goodput_bytes_per_s: received as f64 / window_s,
        latency_mean_s: mean(request.iter().copied()),
        latency_p50_s: percentile(&request, 0.5),
        latency_p99_s: percentile(&request, 0.99),
        send_wait_mean_s: wait,
        network_latency_mean_s: mean(network.iter().copied()),
        real_packets: delta(|s| s.real_sent),
        cover_packets: delta(|s| s.cover_sent),
        loop_packets: delta(|s| s.loops_sent),
        retransmissions: delta(|s| s.retransmits),
        exit_replies_sent: counts.replies_sent,
        replies_received: delta(|s| s.replies),
        reply_blocks_sent: delta(|s| s.reply_blocks_sent),
        loops_missing: delta(|s| s.loops_missing),
        reply_stock_mean: stock.exit_mean,
        reply_stock_per_session_mean: stock.session_mean,
        reply_stock_empty_fraction: stock.session_empty_fraction,
        reply_starvation_events: stock.starvation_events,
        measured_messages: messages.len() as u64,
        entropy_mean_bits: mean(messages.iter().filter_map(|m| m.entropy_bits)),
        min_entropy_mean_bits: mean(messages.iter().filter_map(|m| m.min_entropy_bits)),
        anonymity_set_mean: mean(
            messages
                .iter()
                .filter_map(|m| m.anonymity_set.map(f64::from)),
        ),
        tracked_senders,
        unestimated_messages: messages.iter().filter(|m| m.entropy_bits.is_none()).count() as u64,
        corrupt_client_packets: counts.corrupt_client_packets,
        corrupt_tickets: counts.corrupt_tickets,
        ticket_rate_measured: (counts.corrupt_client_packets > 0)
            .then(|| counts.corrupt_tickets as f64 / counts.corrupt_client_packets as f64),
        packets_linked_by_ticket: counts.linked_by_ticket,
        pots_seen_by_adversary: counts.tickets_by_pot.len() as u64,
        mix_paid_over_owed_mean: mean(mixes.iter().copied()),
        mix_paid_over_owed_min: mixes.iter().copied().reduce(f64::min),
        mix_paid_over_owed_max: mixes.iter().copied().reduce(f64::max),
        exit_paid_over_owed: ratio_of("exit"),
        gateway_paid_over_owed: ratio_of("gateway"),
        tickets_refused: relays.iter().map(|r| r.tickets_refused).sum(),
        gateway_cutoff_verdicts: counts.gateway_cutoff_verdicts,
        link_crossings: counts.link_crossings,
        link_losses: counts.link_losses,
        replays: relays.iter().map(|r| r.replays).sum(),
        errors: std::mem::take(&mut counts.errors),
    };
    FidelityResult {
        summary,
        pages,
        relays,
        messages,
    }
}

impl FidelitySummary {
    /// The summary's numbers by name, as in `summary.json` (for sweeps).
    pub fn fields(&self) -> Result<Vec<(String, Option<f64>)>> {
        crate::report::fields_of(self)
    }
}

fn rows_csv<T: Serialize>(rows: &[T]) -> Result<String> {
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let value = serde_json::to_value(row).map_err(|e| Error::Input(e.to_string()))?;
        let serde_json::Value::Object(map) = value else {
            return Err(Error::Input("a row is not an object".into()));
        };
        if i == 0 {
            let names: Vec<&str> = map.keys().map(String::as_str).collect();
            let _ = writeln!(out, "{}", names.join(","));
        }
        let cells: Vec<String> = map
            .values()
            .map(|v| match v {
                serde_json::Value::Null => String::new(),
                serde_json::Value::String(s) => s.clone(),
                other => cell(Some(other)),
            })
            .collect();
        let _ = writeln!(out, "{}", cells.join(","));
    }
    Ok(out)
}

/// Writes a fidelity run's files into `dir`: `summary.json` (deterministic), `timing.json`,
/// `streams.csv`, `relays.csv`, `messages.csv`, `completion_cdf.svg`.
pub fn write_outputs(dir: &Path, result: &FidelityResult, timing: &Timing) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    write_json(&dir.join("summary.json"), &result.summary)?;
    write_json(&dir.join("timing.json"), timing)?;
    write_file(
        &dir.join("streams.csv"),
        rows_csv(&result.pages)?.as_bytes(),
    )?;
    write_file(
        &dir.join("relays.csv"),
        rows_csv(&result.relays)?.as_bytes(),
    )?;
    write_file(
        &dir.join("messages.csv"),
        rows_csv(&result.messages)?.as_bytes(),
    )?;
    let completion: Vec<f64> = result
        .pages
        .iter()
        .filter(|p| p.in_window)
        .filter_map(|p| p.done_s.map(|d| d - p.started_s))
        .collect();
    let ttfb: Vec<f64> = result
        .pages
        .iter()
        .filter(|p| p.in_window && p.done_s.is_some())
        .filter_map(|p| p.first_byte_s.map(|f| f - p.started_s))
        .collect();
    plot::lines(
        &dir.join("completion_cdf.svg"),
        "Stream time to first byte and completion",
        "seconds",
        "fraction of streams",
        &[
            ("time to first byte".into(), plot::cdf(&ttfb, 400)),
            ("completion".into(), plot::cdf(&completion, 400)),
        ],
    )
}
