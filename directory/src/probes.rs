//! What an authority remembers of its tests of each relay, and how that becomes its vote:
//! whether the relay is in, its measured weight and its performance score. Sans-IO: the
//! prober (`crate::prober`) runs the tests and reports each round here.

use std::collections::VecDeque;

use murmur_protocol::directory::{Measurement, PERFORMANCE_SCALE};

/// One round of tests of one relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeRound {
    /// The relay completed the Noise handshake with the link key its descriptor claims.
    pub handshake: bool,
    /// Test packets sent through it.
    pub sent: u32,
    /// Test packets that came back to the prober.
    pub returned: u32,
    /// Packets per second it carried in this round: returned packets over the time from the
    /// first send to the last return (`None` if none came back).
    pub rate: Option<u32>,
}

impl ProbeRound {
    /// A round in which the relay could not be reached or did not prove its key.
    pub fn unreachable() -> ProbeRound {
        ProbeRound {
            handshake: false,
            sent: 0,
            returned: 0,
            rate: None,
        }
    }

    /// Whether this round on its own passes: handshake, and at least half the packets back.
    pub fn passes(&self) -> bool {
        self.handshake && self.sent > 0 && self.returned.saturating_mul(2) >= self.sent
    }
}

/// The rules that turn history into a vote.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProbeRules {
    /// Rounds kept.
    pub history: usize,
    /// Per mille of recent test packets that must have come back.
    pub min_performance: u16,
    /// The weight of a relay nobody measured.
    pub unmeasured_weight: u32,
}

/// One relay's recent rounds.
#[derive(Clone, Debug, Default)]
pub struct ProbeHistory {
    rounds: VecDeque<ProbeRound>,
    /// Whether any round ever passed (relays that never did are evicted first when the
    /// authority's descriptor store is full).
    pub ever_passed: bool,
    /// Rounds unreachable in a row, and full rounds still to skip before the next test: a
    /// relay that cannot be reached is tested after 1, 2, 4, ... up to [`MAX_BACKOFF_ROUNDS`]
    /// rounds, so a flood of descriptors for relays nobody runs cannot crowd out the tests of
    /// real ones.
    failures_in_a_row: u32,
    skip: u32,
}

/// The most full rounds a failing relay waits between tests.
pub const MAX_BACKOFF_ROUNDS: u32 = 16;

impl ProbeHistory {
    /// Adds a round, forgetting the oldest beyond `keep`.
    pub fn record(&mut self, round: ProbeRound, keep: usize) {
        self.ever_passed |= round.passes();
        // Only relays that cannot even be reached back off: one that completes the handshake
        // is a running relay, and is tested every round so it is back as soon as it carries
        // packets again.
        if round.handshake {
            self.failures_in_a_row = 0;
            self.skip = 0;
        } else {
            self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
            self.skip = (1u32 << self.failures_in_a_row.min(5))
                .saturating_sub(1)
                .min(MAX_BACKOFF_ROUNDS);
        }
        self.rounds.push_back(round);
        while self.rounds.len() > keep.max(1) {
            self.rounds.pop_front();
        }
    }

    /// Whether this full round should test the relay (counting down its backoff if not).
    pub fn due(&mut self) -> bool {
        if self.skip == 0 {
            return true;
        }
        self.skip -= 1;
        false
    }

    /// Whether the latest round passed.
    pub fn passing(&self) -> bool {
        self.latest().is_some_and(ProbeRound::passes)
    }

    /// The latest round.
    pub fn latest(&self) -> Option<&ProbeRound> {
        self.rounds.back()
    }

    /// Per mille of the packets sent in the kept rounds that came back; a round in which
    /// the relay was unreachable counts as all of a round's packets lost.
    pub fn performance(&self, packets_per_round: u32) -> u16 {
        let (mut sent, mut back) = (0u64, 0u64);
        for r in &self.rounds {
            if r.handshake {
                sent += u64::from(r.sent);
                back += u64::from(r.returned.min(r.sent));
            } else {
                sent += u64::from(packets_per_round.max(1));
            }
        }
        if sent == 0 {
            return 0;
        }
        u16::try_from(back * u64::from(PERFORMANCE_SCALE) / sent).unwrap_or(PERFORMANCE_SCALE)
    }

    /// The median of the rates measured in the kept rounds (0 if none).
    pub fn measured_rate(&self) -> u32 {
        let mut rates: Vec<u32> = self.rounds.iter().filter_map(|r| r.rate).collect();
        rates.sort_unstable();
        rates
            .get(rates.len().saturating_sub(1) / 2)
            .copied()
            .unwrap_or(0)
    }

    /// This authority's measurement of the relay if it votes for it: the latest round
    /// passed and the recent performance reaches the rules' minimum. The weight is the
    /// measured rate, never above the relay's `claimed` bandwidth.
    pub fn vote(
        &self,
        rules: &ProbeRules,
        packets_per_round: u32,
        claimed: u32,
    ) -> Option<Measurement> {
        if !self.latest().is_some_and(ProbeRound::passes) {
            return None;
        }
        let performance = self.performance(packets_per_round);
        if performance < rules.min_performance {
            return None;
        }
        Some(Measurement {
            weight: self.measured_rate().min(claimed),
            performance,
        })
    }
}

/// The measurement an authority that does not test relays votes: the small unmeasured
/// weight (never above the claim), and no performance information.
pub fn unmeasured(rules: &ProbeRules, claimed: u32) -> Measurement {
    Measurement {
        weight: rules.unmeasured_weight.min(claimed),
        performance: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: ProbeRules = ProbeRules {
        history: 8,
        min_performance: 500,
        unmeasured_weight: 20,
    };

    fn round(returned: u32, rate: u32) -> ProbeRound {
        ProbeRound {
            handshake: true,
            sent: 16,
            returned,
            rate: (returned > 0).then_some(rate),
        }
    }

    #[test]
    fn a_relay_that_drops_everything_is_out_at_once_and_back_once_it_recovers() {
        let mut h = ProbeHistory::default();
        for _ in 0..8 {
            h.record(round(16, 900), RULES.history);
        }
        let m = h.vote(&RULES, 16, u32::MAX).unwrap();
        assert_eq!((m.weight, m.performance), (900, 1000));
        // Handshakes still complete, every packet vanishes: out at the next vote.
        h.record(round(0, 0), RULES.history);
        assert_eq!(h.vote(&RULES, 16, u32::MAX), None);
        for _ in 0..7 {
            h.record(round(0, 0), RULES.history);
        }
        assert_eq!(h.performance(16), 0);
        // It comes back: in again once half of the kept rounds' packets came back.
        let mut rounds_to_return = 0;
        while h.vote(&RULES, 16, u32::MAX).is_none() {
            h.record(round(16, 900), RULES.history);
            rounds_to_return += 1;
            assert!(rounds_to_return <= 8);
        }
        assert_eq!(rounds_to_return, 4);
    }

    #[test]
    fn a_claim_never_lifts_the_weight_above_what_was_measured() {
        let mut h = ProbeHistory::default();
        h.record(round(16, 300), 8);
        assert_eq!(h.vote(&RULES, 16, u32::MAX).unwrap().weight, 300);
        assert_eq!(
            h.vote(&RULES, 16, 100).unwrap().weight,
            100,
            "nor above the claim"
        );
        assert_eq!(unmeasured(&RULES, u32::MAX).weight, 20);
    }

    #[test]
    fn unreachable_rounds_count_as_lost_packets_and_history_is_bounded() {
        let mut h = ProbeHistory::default();
        h.record(round(16, 100), 4);
        h.record(ProbeRound::unreachable(), 4);
        assert_eq!(h.performance(16), 500);
        assert_eq!(h.vote(&RULES, 16, 1000), None, "the latest round failed");
        for _ in 0..100 {
            h.record(ProbeRound::unreachable(), 4);
        }
        assert_eq!(h.rounds.len(), 4);
        assert!(h.ever_passed);
    }

    #[test]
    fn a_relay_that_keeps_failing_is_tested_less_and_less_often() {
        let mut h = ProbeHistory::default();
        let mut tested_at = Vec::new();
        for full_round in 0..64 {
            if h.due() {
                tested_at.push(full_round);
                h.record(ProbeRound::unreachable(), 8);
            }
        }
        let gaps: Vec<_> = tested_at.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(&gaps[..5], &[2, 4, 8, 16, 17]);
        assert!(gaps.iter().all(|&g| g <= MAX_BACKOFF_ROUNDS + 1));
        // One pass and it is tested every round again.
        h.skip = 0;
        h.record(round(16, 10), 8);
        assert!(h.due() && h.due());
    }
}
