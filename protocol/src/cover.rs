//! Loopix cover-traffic schedulers, sans-IO.
//!
//! Every stream is a Poisson process: exponential gaps at a published rate. The driver (the
//! client, a relay, or the simulator under virtual time) asks when the next event is due
//! ([`ClientCover::poll_timeout`]), sleeps until then, and asks what to send
//! ([`ClientCover::poll_transmit`]). Nothing here reads a clock; randomness comes from the
//! caller's RNG, so a seeded RNG reproduces a schedule exactly.
//!
//! The client's send stream (λ_P) is the heart of it: each tick sends the next queued real
//! packet if there is one, otherwise a cover packet. An observer sees the same Poisson stream
//! whether or not the client has anything to say; real traffic only changes what is inside.
//!
//! Each stream's next due time is computed from the previous *due* time, not from when the
//! driver got round to polling, so a driver that wakes late does not slow the process down.

use std::collections::VecDeque;

use rand::Rng;
use rand_distr::{Distribution, Exp};

use crate::time::Instant;
use crate::{Error, Result};

/// A Poisson process: exponential gaps with a rate in events per second. Rate zero never fires.
#[derive(Debug, Clone, Copy)]
pub struct PoissonProcess {
    rate: f64,
    /// `None` when the rate is zero.
    exp: Option<Exp<f64>>,
}

impl PoissonProcess {
    /// A process with `rate` events per second (finite and ≥ 0).
    pub fn new(rate: f64) -> Result<Self> {
        if !rate.is_finite() || rate < 0.0 {
            return Err(Error::CoverRate(rate.to_string()));
        }
        if rate == 0.0 {
            return Ok(PoissonProcess { rate, exp: None });
        }
        let exp = Exp::new(rate).map_err(|_| Error::CoverRate(rate.to_string()))?;
        Ok(PoissonProcess {
            rate,
            exp: Some(exp),
        })
    }

    /// Events per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// The event after one at `now`: `now` plus an exponential gap; `None` if the rate is zero.
    pub fn next_after<R: Rng + ?Sized>(&self, now: Instant, rng: &mut R) -> Option<Instant> {
        let exp = self.exp.as_ref()?;
        // Gaps are whole nanoseconds; an Exp sample is finite and non-negative, and a gap
        // past u64 nanoseconds (584 years) saturates to the end of time.
        let gap_ns = (exp.sample(rng) * 1e9).round();
        let gap_ns = if gap_ns < u64::MAX as f64 {
            gap_ns as u64
        } else {
            u64::MAX
        };
        Some(Instant::from_nanos(now.as_nanos().saturating_add(gap_ns)))
    }
}

/// One stream of a Poisson schedule with its next due time.
#[derive(Debug, Clone, Copy)]
struct Stream {
    process: PoissonProcess,
    next: Option<Instant>,
}

impl Stream {
    fn start<R: Rng + ?Sized>(rate: f64, now: Instant, rng: &mut R) -> Result<Self> {
        let process = PoissonProcess::new(rate)?;
        Ok(Stream {
            process,
            next: process.next_after(now, rng),
        })
    }

    /// If due at `now`, moves to the following event and returns true.
    fn fire_if_due<R: Rng + ?Sized>(&mut self, now: Instant, rng: &mut R) -> bool {
        match self.next {
            Some(due) if due <= now => {
                self.next = self.process.next_after(due, rng);
                true
            }
            _ => false,
        }
    }
}

/// The client's cover rates, per second (published in the directory so all clients look alike).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClientRates {
    /// λ_P: the send stream (real packet if one is queued, otherwise cover).
    pub lambda_p: f64,
    /// λ_L: loop cover (comes back to the client).
    pub lambda_l: f64,
    /// λ_D: drop cover (discarded by a random relay).
    pub lambda_d: f64,
}

/// What a client sends at one tick of its schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEmission<T> {
    /// A send-stream tick with a real packet queued: send it.
    Real(T),
    /// A send-stream tick with nothing queued: send a cover packet in its place.
    SendCover,
    /// A loop cover packet (λ_L).
    Loop,
    /// A drop cover packet (λ_D).
    Drop,
}

impl<T> ClientEmission<T> {
    /// True for every emission except a real packet.
    pub fn is_cover(&self) -> bool {
        !matches!(self, ClientEmission::Real(_))
    }
}

/// A client's three Loopix streams and its queue of real packets waiting for a send tick.
///
/// `T` is whatever the driver queues: built packets for the real client, packet ids for the
/// simulator. The queue is FIFO and unbounded here; the driver bounds it (backpressure) by
/// watching [`ClientCover::queued`].
#[derive(Debug, Clone)]
pub struct ClientCover<T> {
    send: Stream,
    loops: Stream,
    drops: Stream,
    queue: VecDeque<T>,
}

impl<T> ClientCover<T> {
    /// Starts the three streams at `now`.
    pub fn new<R: Rng + ?Sized>(rates: ClientRates, now: Instant, rng: &mut R) -> Result<Self> {
        Ok(ClientCover {
            send: Stream::start(rates.lambda_p, now, rng)?,
            loops: Stream::start(rates.lambda_l, now, rng)?,
            drops: Stream::start(rates.lambda_d, now, rng)?,
            queue: VecDeque::new(),
        })
    }

    /// Queues a real packet for the next send tick.
    pub fn push_real(&mut self, item: T) {
        self.queue.push_back(item);
    }

    /// Real packets waiting for a send tick.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// When the next emission is due (`None` if every rate is zero).
    pub fn poll_timeout(&self) -> Option<Instant> {
        [self.send.next, self.loops.next, self.drops.next]
            .into_iter()
            .flatten()
            .min()
    }

    /// The next emission due at or before `now`, if any. Call until it returns `None`, then
    /// sleep until [`ClientCover::poll_timeout`]. When several are due, the earliest goes
    /// first (ties: send, loop, drop).
    pub fn poll_transmit<R: Rng + ?Sized>(
        &mut self,
        now: Instant,
        rng: &mut R,
    ) -> Option<ClientEmission<T>> {
        let due = self.poll_timeout().filter(|due| *due <= now)?;
        if self.send.next == Some(due) && self.send.fire_if_due(now, rng) {
            return Some(match self.queue.pop_front() {
                Some(item) => ClientEmission::Real(item),
                None => ClientEmission::SendCover,
            });
        }
        if self.loops.next == Some(due) && self.loops.fire_if_due(now, rng) {
            return Some(ClientEmission::Loop);
        }
        if self.drops.fire_if_due(now, rng) {
            return Some(ClientEmission::Drop);
        }
        None
    }
}

/// A relay's loop cover (λ_M): loops the relay sends through the network to itself.
#[derive(Debug, Clone, Copy)]
pub struct RelayLoopCover {
    stream: Stream,
}

impl RelayLoopCover {
    /// Starts the stream at `now` with `lambda_m` loops per second.
    pub fn new<R: Rng + ?Sized>(lambda_m: f64, now: Instant, rng: &mut R) -> Result<Self> {
        Ok(RelayLoopCover {
            stream: Stream::start(lambda_m, now, rng)?,
        })
    }

    /// When the next loop is due (`None` if the rate is zero).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.stream.next
    }

    /// True if a loop is due at or before `now` (and moves on to the next one). Call until it
    /// returns false.
    pub fn poll_transmit<R: Rng + ?Sized>(&mut self, now: Instant, rng: &mut R) -> bool {
        self.stream.fire_if_due(now, rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    const SECOND: u64 = 1_000_000_000;

    fn rates(p: f64, l: f64, d: f64) -> ClientRates {
        ClientRates {
            lambda_p: p,
            lambda_l: l,
            lambda_d: d,
        }
    }

    /// Runs a client schedule until `end`, returning (time, emission) pairs.
    fn drive(
        cover: &mut ClientCover<u32>,
        rng: &mut ChaCha20Rng,
        end: Instant,
    ) -> Vec<(Instant, ClientEmission<u32>)> {
        let mut out = Vec::new();
        while let Some(t) = cover.poll_timeout().filter(|t| *t <= end) {
            while let Some(e) = cover.poll_transmit(t, rng) {
                out.push((t, e));
            }
        }
        out
    }

    #[test]
    fn bad_rates_are_refused_and_zero_never_fires() {
        assert_eq!(
            PoissonProcess::new(-1.0).err(),
            Some(Error::CoverRate("-1".into()))
        );
        assert!(PoissonProcess::new(f64::NAN).is_err());
        assert!(PoissonProcess::new(f64::INFINITY).is_err());
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let zero = PoissonProcess::new(0.0).unwrap();
        assert_eq!(zero.next_after(Instant::ZERO, &mut rng), None);
        let mut cover =
            ClientCover::<u32>::new(rates(0.0, 0.0, 0.0), Instant::ZERO, &mut rng).unwrap();
        cover.push_real(1);
        assert_eq!(cover.poll_timeout(), None);
        assert_eq!(
            cover.poll_transmit(Instant::from_nanos(u64::MAX), &mut rng),
            None
        );
    }

    #[test]
    fn stream_rates_match_their_parameters() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let mut cover =
            ClientCover::<u32>::new(rates(4.0, 1.0, 0.5), Instant::ZERO, &mut rng).unwrap();
        let secs = 5_000;
        let out = drive(&mut cover, &mut rng, Instant::from_nanos(secs * SECOND));
        let count = |f: fn(&ClientEmission<u32>) -> bool| {
            out.iter().filter(|(_, e)| f(e)).count() as f64 / secs as f64
        };
        // Poisson counts: sd of the rate estimate is sqrt(rate/secs); allow 5 sd.
        for (rate, measured) in [
            (4.0, count(|e| *e == ClientEmission::SendCover)),
            (1.0, count(|e| *e == ClientEmission::Loop)),
            (0.5, count(|e| *e == ClientEmission::Drop)),
        ] {
            let sd = (rate / secs as f64).sqrt();
            assert!((measured - rate).abs() < 5.0 * sd, "{measured} vs {rate}");
        }
    }

    #[test]
    fn relay_loops_fire_at_their_rate() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let mut loops = RelayLoopCover::new(2.0, Instant::ZERO, &mut rng).unwrap();
        let end = Instant::from_nanos(2_000 * SECOND);
        let mut n = 0u32;
        while let Some(t) = loops.poll_timeout().filter(|t| *t <= end) {
            while loops.poll_transmit(t, &mut rng) {
                n += 1;
            }
        }
        // 4000 expected, sd 63.
        assert!((n as i64 - 4000).abs() < 320, "{n}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Real traffic never changes what an observer sees: the emission times are the same
        /// with or without queued packets, real packets leave in order on send ticks only,
        /// and each leaves at the first send tick after it was queued.
        #[test]
        fn real_traffic_does_not_change_the_schedule(
            seed in any::<u64>(),
            lp in 0.1f64..20.0,
            ll in 0.0f64..5.0,
            ld in 0.0f64..5.0,
            queued in 0u32..50,
        ) {
            let end = Instant::from_nanos(20 * SECOND);
            let mut rng_a = ChaCha20Rng::seed_from_u64(seed);
            let mut a = ClientCover::<u32>::new(rates(lp, ll, ld), Instant::ZERO, &mut rng_a).unwrap();
            let mut rng_b = ChaCha20Rng::seed_from_u64(seed);
            let mut b = ClientCover::<u32>::new(rates(lp, ll, ld), Instant::ZERO, &mut rng_b).unwrap();
            for i in 0..queued {
                b.push_real(i);
            }
            let out_a = drive(&mut a, &mut rng_a, end);
            let out_b = drive(&mut b, &mut rng_b, end);
            prop_assert_eq!(out_a.len(), out_b.len());
            let mut expect = 0u32;
            for ((ta, ea), (tb, eb)) in out_a.iter().zip(&out_b) {
                prop_assert_eq!(ta, tb);
                prop_assert!(ea.is_cover());
                match eb {
                    ClientEmission::Real(i) => {
                        prop_assert_eq!(ea, &ClientEmission::SendCover);
                        prop_assert_eq!(*i, expect);
                        expect += 1;
                    }
                    ClientEmission::SendCover => {
                        // Cover on a send tick only when the queue was empty.
                        prop_assert_eq!(expect, queued);
                        prop_assert_eq!(ea, eb);
                    }
                    other => prop_assert_eq!(ea, other),
                }
            }
        }

        /// Emissions come out in time order, never before they are due, never after `now`.
        #[test]
        fn emissions_are_ordered_and_never_early(seed in any::<u64>(), late_ns in 0u64..2_000_000_000) {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let mut cover = ClientCover::<u32>::new(rates(3.0, 1.0, 1.0), Instant::ZERO, &mut rng).unwrap();
            let mut last_due = Instant::ZERO;
            for _ in 0..50 {
                let due = cover.poll_timeout().unwrap();
                prop_assert!(due >= last_due);
                last_due = due;
                // A driver that wakes late still gets every due emission, one at a time.
                let now = Instant::from_nanos(due.as_nanos() + late_ns);
                if let Some(before) = due.as_nanos().checked_sub(1) {
                    prop_assert!(cover.poll_transmit(Instant::from_nanos(before), &mut rng).is_none());
                }
                let mut n = 0;
                while cover.poll_transmit(now, &mut rng).is_some() {
                    n += 1;
                }
                prop_assert!(n >= 1);
                prop_assert!(cover.poll_timeout().unwrap() > now);
            }
        }
    }
}
