//! The cross-check: one scenario in both modes, where their models overlap.
//!
//! The overlap is the request of a page load. In fidelity mode it is written to a stream and
//! rides one real packet: it waits for a λ_P tick, crosses the access link, three mixes and
//! their links, and the exit reads it. In the fast mode a message is created and takes the
//! same way with no links. A page load makes more real packets than its request (the
//! acknowledgements of its replies, reply blocks to keep the exit stocked), and they share
//! the send ticks the request waits for; so the fast run is the same scenario with the
//! fidelity run's real packets per client per second as its message rate. Theory says both
//! means are `3/μ` plus the links plus the wait for a send tick. The check compares the
//! fidelity mode's mean request latency with the fast mode's mean message latency, and with
//! `3/μ` + the links' mean + the fidelity mode's own measured send wait, each within
//! [`TOLERANCE`]; and the mean sender entropy of the fidelity mode's real packets at the exit
//! with the fast mode's, within [`ENTROPY_TOLERANCE_BITS`], with the fast mode's ticket rate
//! set to the rate at which the fidelity mode's corrupt mixes found tickets.

use serde::Serialize;

use crate::scenario::{Loaded, Mode, Scenario, TrafficModel};
use crate::{Error, Result, run_fidelity, run_loaded};

/// Relative difference allowed between the means.
pub const TOLERANCE: f64 = 0.05;

/// Difference allowed between the mean sender entropies (bits).
pub const ENTROPY_TOLERANCE_BITS: f64 = 0.1;

/// Both runs' figures and the verdict.
#[derive(Debug, Clone, Serialize)]
pub struct CrossCheck {
    pub tolerance: f64,
    pub fidelity_latency_mean_s: f64,
    pub fidelity_requests: u64,
    pub fidelity_send_wait_mean_s: f64,
    pub fidelity_network_latency_mean_s: Option<f64>,
    /// The fidelity run's real packets per client per second: the fast run's message rate.
    pub real_packets_per_client_s: f64,
    pub fast_latency_mean_s: f64,
    pub fast_messages: u64,
    pub fast_network_latency_mean_s: Option<f64>,
    /// `3/μ` + the links' expected latency (access link, three links between mixes, the
    /// link to the exit) + the fidelity mode's send wait.
    pub theory_latency_mean_s: f64,
    pub vs_fast: f64,
    pub vs_theory: f64,
    pub entropy_fidelity_bits: Option<f64>,
    pub entropy_fast_bits: Option<f64>,
    /// The fast run's `tickets.rate`: the fidelity run's `ticket_rate_measured`.
    pub fast_ticket_rate: f64,
    pub entropy_difference_bits: Option<f64>,
    pub entropy_tolerance_bits: f64,
    pub pass: bool,
}

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

/// Runs `loaded` in fidelity mode and its fast-mode twin with `seed`.
pub fn crosscheck(
    loaded: &Loaded,
    seed: Option<u64>,
    progress: &mut dyn FnMut(f64),
) -> Result<CrossCheck> {
    let s = &loaded.scenario;
    if s.streams.bulk_clients > 0 {
        return Err(Error::Input(
            "crosscheck compares page-load requests: streams.bulk_clients must be 0".into(),
        ));
    }
    let mut fid = loaded.clone();
    fid.scenario.mode = Mode::Fidelity;
    let (f, _) = run_fidelity(&fid, seed, &mut |x| progress(x / 2.0))?;
    let window_s = (s.duration_s - s.warmup_s).max(1e-9);
    let real_rate = f.summary.real_packets as f64 / (f64::from(s.network.clients) * window_s);
    let mut fast = loaded.clone();
    fast.scenario.mode = Mode::Fast;
    fast.scenario.traffic.model = TrafficModel::Poisson;
    fast.scenario.traffic.file = None;
    fast.scenario.traffic.messages_per_s = Some(real_rate);
    // Tickets at the rate corrupt mixes actually found them in real envelopes.
    fast.scenario.tickets.rate = f.summary.ticket_rate_measured.unwrap_or(0.0);
    let fast = Loaded {
        scenario: Scenario::checked(fast.scenario)?,
        base_dir: fast.base_dir,
    };
    let (q, _) = run_loaded(&fast, seed, &mut |x| progress(0.5 + x / 2.0))?;
    let missing = |what: &str| Error::Input(format!("crosscheck: the {what} run measured nothing"));
    let fs = &f.summary;
    let fid_latency = fs.latency_mean_s.ok_or_else(|| missing("fidelity"))?;
    let wait = fs.send_wait_mean_s.ok_or_else(|| missing("fidelity"))?;
    let fast_latency = q.summary.latency_mean_s.ok_or_else(|| missing("fast"))?;
    let l = &s.links;
    let link_ms = l.access_latency_ms
        + 4.0 * (l.latency_ms + l.latency_spread_ms / 2.0)
        + 5.0 * l.jitter_ms / 2.0;
    let theory = 3.0 / s.rates.mu + link_ms / 1e3 + wait;
    let vs_fast = relative(fid_latency, fast_latency);
    let vs_theory = relative(fid_latency, theory);
    let entropy = fs
        .entropy_mean_bits
        .zip(q.summary.entropy_mean_bits)
        .map(|(a, b)| a - b);
    Ok(CrossCheck {
        tolerance: TOLERANCE,
        fidelity_latency_mean_s: fid_latency,
        fidelity_requests: f
            .pages
            .iter()
            .filter(|p| p.in_window && p.at_exit_s.is_some())
            .count() as u64,
        fidelity_send_wait_mean_s: wait,
        fidelity_network_latency_mean_s: fs.network_latency_mean_s,
        real_packets_per_client_s: real_rate,
        fast_latency_mean_s: fast_latency,
        fast_messages: q.summary.messages,
        fast_network_latency_mean_s: q.summary.network_latency_mean_s,
        theory_latency_mean_s: theory,
        vs_fast,
        vs_theory,
        entropy_fidelity_bits: fs.entropy_mean_bits,
        entropy_fast_bits: q.summary.entropy_mean_bits,
        fast_ticket_rate: fast.scenario.tickets.rate,
        entropy_difference_bits: entropy,
        entropy_tolerance_bits: ENTROPY_TOLERANCE_BITS,
        pass: vs_fast <= TOLERANCE
            && vs_theory <= TOLERANCE
            && entropy.is_none_or(|d| d.abs() <= ENTROPY_TOLERANCE_BITS),
    })
}
