//! A client's check of its own send schedule: are the gaps between the packets it hands to
//! its gateway link exponentially distributed at the published rate?
//!
//! The cover schedule ([`crate::cover::ClientCover`]) draws Poisson ticks, but what an
//! observer of the client's link sees is when packets actually leave, and a session thread
//! that is late (building packets, opening replies) delays ticks and bunches them. So the
//! driver records the moment each packet leaves ([`SendTiming::sent`]) and the status reports
//! a Kolmogorov–Smirnov test of the recent gaps against Exp(λ_P + λ_L + λ_D): the three
//! Loopix streams are independent Poisson processes, so everything they send together is one
//! Poisson process at the sum of their rates.
//!
//! Payments to the gateway (`Frame::Control`) are not packets of the schedule and are not
//! recorded; each follows the packet that made it due.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use statrs::distribution::Exp;
use statrs::stats_tests::NaNPolicy;
use statrs::stats_tests::ks_test::{KSOneSampleAlternativeMethod, ks_onesample};

use crate::time::Instant;

/// Gaps kept for the test: the most recent ones, about 10 s of sending at 400 packets/s.
pub const SEND_GAPS_KEPT: usize = 4096;

/// Fewer gaps than this make no verdict (the test has little power below it).
pub const SEND_GAPS_FOR_VERDICT: usize = 200;

/// The significance level: a schedule whose gaps have a p-value below it fails.
pub const SEND_TIMING_ALPHA: f64 = 0.01;

/// The moments packets left, as gaps between them (bounded: the last [`SEND_GAPS_KEPT`]).
#[derive(Debug, Clone, Default)]
pub struct SendTiming {
    gaps: VecDeque<f64>,
    last: Option<Instant>,
    packets: u64,
    /// The rate the gaps were recorded under; a new rate starts the record afresh.
    rate_per_s: f64,
}

/// What the test says of the gaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SendVerdict {
    /// Fewer than [`SEND_GAPS_FOR_VERDICT`] gaps, or no positive rate.
    TooFew,
    /// p ≥ [`SEND_TIMING_ALPHA`].
    Passes,
    /// p < [`SEND_TIMING_ALPHA`]: the gaps are not Exp(rate).
    Fails,
}

impl SendVerdict {
    /// A short label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            SendVerdict::TooFew => "too_few",
            SendVerdict::Passes => "passes",
            SendVerdict::Fails => "fails",
        }
    }
}

/// The test of the recent gaps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SendTimingReport {
    /// Packets recorded since start (all rates).
    pub packets: u64,
    /// Gaps the test used.
    pub gaps: usize,
    /// The rate tested against: λ_P + λ_L + λ_D, per second.
    pub rate_per_s: f64,
    /// The rate the gaps show (1 / their mean); 0 without gaps.
    pub measured_rate_per_s: f64,
    /// The KS statistic D and its asymptotic two-sided p-value; `None` without a verdict.
    pub ks_statistic: Option<f64>,
    pub p_value: Option<f64>,
    pub verdict: SendVerdict,
}

impl SendTiming {
    /// Records that a packet left at `at`, sent under a schedule of `rate_per_s` packets per
    /// second in all. A change of rate (a new consensus) forgets the gaps recorded before.
    pub fn sent(&mut self, at: Instant, rate_per_s: f64) {
        self.packets += 1;
        if rate_per_s != self.rate_per_s {
            self.rate_per_s = rate_per_s;
            self.gaps.clear();
            self.last = None;
        }
        if let Some(last) = self.last.replace(at) {
            if self.gaps.len() == SEND_GAPS_KEPT {
                self.gaps.pop_front();
            }
            self.gaps
                .push_back(at.saturating_duration_since(last).as_secs_f64());
        }
    }

    /// Forgets the gaps (the link went down: its gap says nothing of the schedule).
    pub fn restart(&mut self) {
        self.gaps.clear();
        self.last = None;
    }

    /// Gaps held now.
    pub fn gaps(&self) -> usize {
        self.gaps.len()
    }

    /// The KS test of the recorded gaps against Exp(the rate they were sent under). Sorts a
    /// copy of the gaps: call it when a report is wanted, not per packet.
    pub fn report(&self) -> SendTimingReport {
        let n = self.gaps.len();
        let mean = if n == 0 {
            0.0
        } else {
            self.gaps.iter().sum::<f64>() / n as f64
        };
        let mut report = SendTimingReport {
            packets: self.packets,
            gaps: n,
            rate_per_s: self.rate_per_s,
            measured_rate_per_s: if mean > 0.0 { 1.0 / mean } else { 0.0 },
            ks_statistic: None,
            p_value: None,
            verdict: SendVerdict::TooFew,
        };
        if n < SEND_GAPS_FOR_VERDICT {
            return report;
        }
        let Ok(exp) = Exp::new(self.rate_per_s) else {
            return report;
        };
        let Ok((d, p)) = ks_onesample(
            self.gaps.iter().copied().collect(),
            &exp,
            KSOneSampleAlternativeMethod::TwoSidedAsymptotic,
            NaNPolicy::Error,
        ) else {
            return report;
        };
        report.ks_statistic = Some(d);
        report.p_value = Some(p);
        report.verdict = if p >= SEND_TIMING_ALPHA {
            SendVerdict::Passes
        } else {
            SendVerdict::Fails
        };
        report
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;
    use rand_distr::{Distribution, Exp as ExpSampler};

    use super::*;

    /// Records `gaps` (seconds) as packets sent at their running sums.
    fn recorded(gaps: impl IntoIterator<Item = f64>, rate: f64) -> SendTiming {
        let mut timing = SendTiming::default();
        let mut at = Instant::ZERO;
        timing.sent(at, rate);
        for g in gaps {
            at = at + Duration::from_secs_f64(g);
            timing.sent(at, rate);
        }
        timing
    }

    #[test]
    fn poisson_sends_pass_at_their_rate_and_fail_at_another() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let exp = ExpSampler::new(400.0).unwrap();
        let gaps: Vec<f64> = (0..3000).map(|_| exp.sample(&mut rng)).collect();
        let at_rate = recorded(gaps.iter().copied(), 400.0).report();
        assert_eq!(at_rate.verdict, SendVerdict::Passes, "{at_rate:?}");
        assert_eq!(at_rate.gaps, 3000);
        assert!((at_rate.measured_rate_per_s - 400.0).abs() < 20.0);
        // The same gaps judged against a rate 15% off.
        let off = recorded(gaps.iter().copied(), 460.0).report();
        assert_eq!(off.verdict, SendVerdict::Fails, "{off:?}");
    }

    /// What a late session thread does to the schedule: every tick that fell while it was
    /// busy for 1 ms leaves when it is done, so short gaps vanish and bunches appear.
    #[test]
    fn sends_held_back_by_a_busy_thread_fail() {
        let mut rng = ChaCha20Rng::seed_from_u64(8);
        let exp = ExpSampler::new(400.0).unwrap();
        let mut timing = SendTiming::default();
        let (mut due, mut free_at) = (0.0f64, 0.0f64);
        for _ in 0..3000 {
            due += exp.sample(&mut rng);
            let leaves = due.max(free_at);
            timing.sent(Instant::ZERO + Duration::from_secs_f64(leaves), 400.0);
            // Each packet leaves after 1 ms of building the next.
            free_at = leaves + 0.001;
        }
        let report = timing.report();
        assert_eq!(report.verdict, SendVerdict::Fails, "{report:?}");
    }

    #[test]
    fn too_few_gaps_or_no_rate_give_no_verdict() {
        let few = recorded(std::iter::repeat_n(0.01, SEND_GAPS_FOR_VERDICT - 1), 100.0);
        assert_eq!(few.report().verdict, SendVerdict::TooFew);
        let no_rate = recorded(std::iter::repeat_n(0.01, 1000), 0.0);
        assert_eq!(no_rate.report().verdict, SendVerdict::TooFew);
    }

    #[test]
    fn a_new_rate_or_a_restart_forgets_the_gaps() {
        let mut timing = recorded(std::iter::repeat_n(0.01, 500), 100.0);
        assert_eq!(timing.gaps(), 500);
        timing.sent(Instant::ZERO + Duration::from_secs(10), 200.0);
        assert_eq!(timing.gaps(), 0);
        timing.sent(Instant::ZERO + Duration::from_secs(11), 200.0);
        assert_eq!(timing.gaps(), 1);
        timing.restart();
        assert_eq!(timing.gaps(), 0);
        assert_eq!(timing.report().packets, 503);
    }

    proptest! {
        /// However packets are timed (out of order included), the record stays within its
        /// bound and the report is well formed.
        #[test]
        fn the_record_is_bounded_and_the_report_well_formed(
            times in proptest::collection::vec(0u64..10_000_000_000, 0..6000),
            rate in 0.0f64..1000.0,
        ) {
            let mut timing = SendTiming::default();
            for &t in &times {
                timing.sent(Instant::ZERO + Duration::from_nanos(t), rate);
            }
            prop_assert!(timing.gaps() <= SEND_GAPS_KEPT);
            prop_assert_eq!(timing.gaps(), times.len().saturating_sub(1).min(SEND_GAPS_KEPT));
            let r = timing.report();
            prop_assert_eq!(r.packets, times.len() as u64);
            if let (Some(d), Some(p)) = (r.ks_statistic, r.p_value) {
                prop_assert!((0.0..=1.0).contains(&d));
                prop_assert!((0.0..=1.0).contains(&p));
                prop_assert_ne!(r.verdict, SendVerdict::TooFew);
            } else {
                prop_assert_eq!(r.verdict, SendVerdict::TooFew);
            }
        }
    }
}
