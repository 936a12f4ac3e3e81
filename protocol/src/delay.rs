//! Per-hop delays drawn from an exponential distribution.
//!
//! The sender draws each hop's delay and writes it into the Sphinx header, so the relay
//! only obeys it (clamped). We sample ourselves, with an RNG the caller passes in, because
//! sphinx-packet's own sampler uses the thread RNG and the simulator must reproduce runs.

use std::time::Duration;

use rand::Rng;
use rand_distr::{Distribution, Exp};

use crate::{Error, Result};

/// Exp(1/mean) over durations; a zero mean gives zero delays.
#[derive(Debug, Clone, Copy)]
pub struct ExpDelay {
    mean: Duration,
    /// `None` when the mean is zero.
    exp: Option<Exp<f64>>,
}

impl ExpDelay {
    /// A distribution with the given mean (1/μ).
    pub fn with_mean(mean: Duration) -> Result<Self> {
        if mean.is_zero() {
            return Ok(ExpDelay { mean, exp: None });
        }
        let rate = 1.0 / mean.as_secs_f64();
        let exp = Exp::new(rate).map_err(|_| Error::DelayMean(mean))?;
        Ok(ExpDelay {
            mean,
            exp: Some(exp),
        })
    }

    /// The mean delay.
    pub fn mean(&self) -> Duration {
        self.mean
    }

    /// One sample.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> Duration {
        match &self.exp {
            None => Duration::ZERO,
            // An Exp sample is finite and non-negative; try_from guards the absurd tail.
            Some(exp) => Duration::try_from_secs_f64(exp.sample(rng)).unwrap_or(Duration::MAX),
        }
    }

    /// `n` samples, one per hop.
    pub fn sample_n<R: Rng + ?Sized>(&self, rng: &mut R, n: usize) -> Vec<Duration> {
        (0..n).map(|_| self.sample(rng)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn zero_mean_gives_zero() {
        let d = ExpDelay::with_mean(Duration::ZERO).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        assert!(d.sample_n(&mut rng, 10).iter().all(|x| x.is_zero()));
    }

    #[test]
    fn sample_mean_is_close_to_the_mean_and_seeded_runs_repeat() {
        let d = ExpDelay::with_mean(Duration::from_millis(50)).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let samples = d.sample_n(&mut rng, 20_000);
        let mean = samples.iter().map(|s| s.as_secs_f64()).sum::<f64>() / samples.len() as f64;
        // Standard error of the mean is 0.05/sqrt(20000) = 0.35 ms: allow 5 sigma.
        assert!((mean - 0.05).abs() < 0.00177, "mean {mean}");
        let mut again = ChaCha20Rng::seed_from_u64(7);
        assert_eq!(samples, d.sample_n(&mut again, 20_000));
    }
}
