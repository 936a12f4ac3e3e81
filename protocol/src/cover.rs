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
use std::time::Duration;

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

impl ClientRates {
    /// λ_P + λ_L + λ_D: the three streams are independent Poisson processes, so what they
    /// send together is one at this rate.
    pub fn total(&self) -> f64 {
        self.lambda_p + self.lambda_l + self.lambda_d
    }
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

/// Which of a [`Pacer`]'s stocks a built packet goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stock {
    /// A real packet, for the next λ_P tick.
    Real,
    /// A drop-cover packet: for a λ_P tick with no real packet, or a λ_D tick.
    Drop,
    /// A loop-cover packet, for a λ_L tick.
    Loop,
}

/// What a [`Pacer`] lacks, most urgent first: cover before real, so that a tick always finds
/// a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PacerWants {
    pub drops: usize,
    pub loops: usize,
    /// Fewer real packets wait for a tick than the real stock holds ([`PACER_REAL_SPAN`]).
    pub real: bool,
    /// No drop cover is left: the next tick without a real packet would find nothing.
    pub none_left: bool,
}

impl PacerWants {
    /// The stock to fill next, if any: drop cover first (every tick must find a packet, and
    /// a drop costs a sixth of a real packet with its reply blocks, so a builder that cannot
    /// keep up sends fewer real packets rather than leave ticks empty), then a real packet,
    /// then loop cover.
    pub fn next(&self) -> Option<Stock> {
        if self.drops > 0 {
            return Some(Stock::Drop);
        }
        if self.real {
            return Some(Stock::Real);
        }
        (self.loops > 0).then_some(Stock::Loop)
    }
}

/// One round of filling a [`Pacer`]'s stocks: what to build next, and at most the stocks'
/// capacity in all, so a round ends even when nothing can be built.
///
/// ```ignore
/// let mut fill = StockFill::new(&pacer);
/// while let Some(stock) = fill.next(pacer.wants()) {
///     match build(stock) {
///         Some(packet) => pacer.push(stock, packet),
///         None if fill.nothing_built(stock) => {} // no message waits: cover may
///         None => break,                           // no route for cover now
///     }
/// }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct StockFill {
    budget: usize,
    /// A real packet was asked for and none was built: no message waits.
    no_message: bool,
}

impl StockFill {
    /// A round for `pacer`.
    pub fn new<F>(pacer: &Pacer<F>) -> Self {
        StockFill {
            budget: pacer.capacity(),
            no_message: false,
        }
    }

    /// The stock to build for next, given what the pacer lacks now; `None` when the round
    /// is over.
    pub fn next(&mut self, wants: PacerWants) -> Option<Stock> {
        self.budget = self.budget.checked_sub(1)?;
        let wants = PacerWants {
            real: wants.real && !self.no_message,
            ..wants
        };
        wants.next()
    }

    /// Nothing could be built for `stock`; whether the round goes on. For a real packet it
    /// does (no message waits, and none is asked for again this round); for cover it ends
    /// (no route now).
    pub fn nothing_built(&mut self, stock: Stock) -> bool {
        self.no_message |= stock == Stock::Real;
        stock == Stock::Real
    }
}

/// Counters of a [`Pacer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PacerStats {
    /// Packets sent, by what they were built as.
    pub real: u64,
    pub drops: u64,
    pub loops: u64,
    /// Loop ticks that found no loop and sent a drop-cover packet in its place (the
    /// observer cannot tell them apart; the loop is simply not measured).
    pub loops_as_drops: u64,
    /// Ticks that found every stock empty: nothing was sent, a gap in the schedule.
    pub missed: u64,
}

/// How far ahead a [`Pacer`]'s cover stocks reach: the ticks of this long. The builder
/// must not drain them while it builds a real packet and its reply blocks (about 1.2 ms) or
/// waits to be scheduled: with 10 ms, a devnet on a loaded 2-core machine found no packet
/// at one tick in ten, and the gaps failed the KS test.
pub const PACER_STOCK_SPAN: Duration = Duration::from_millis(50);

/// Most packets of one kind a [`Pacer`] keeps built.
pub const PACER_MAX_STOCK: usize = 64;

/// Real packets a [`Pacer`] keeps built, at least. One is not enough: a tick that comes
/// sooner after the last than building a packet and its reply blocks takes (a sixth of λ_P
/// ticks at 100/s on the 2-core machine) would find none and send cover while data waits;
/// two cost a message one tick's wait more before it leaves.
pub const PACER_REAL_STOCK: usize = 2;

/// How far ahead a [`Pacer`]'s real stock reaches beyond [`PACER_REAL_STOCK`]: the λ_P
/// ticks of this long. At λ_P = 400/s on the 2-core machine, with the whole local network
/// on its cores, the session thread waited to be scheduled longer than two ticks (5 ms) at
/// about one tick in ten, and each such tick went as cover while a download's data waited
/// (0.86-0.89 of its λ_P bound with two packets, 0.90-1.0 with eight). The cost is bounded:
/// a message that finds the stock full of a bulk transfer's packets leaves at most this
/// much later; when nothing waits the stock is empty and a message leaves at the next tick.
pub const PACER_REAL_SPAN: Duration = Duration::from_millis(20);

/// The client's send schedule kept apart from the work of building packets: the three
/// Loopix streams of [`ClientCover`], fed from small stocks of packets built ahead
/// (real packets for [`PACER_REAL_SPAN`] of λ_P's ticks, at least [`PACER_REAL_STOCK`];
/// drop and loop cover for [`PACER_STOCK_SPAN`] of their ticks, at least 4 drops and 1
/// loop). A tick only takes a built packet, so the
/// moments packets leave stay exactly the Poisson schedule whatever building costs, as long
/// as whoever builds keeps the stocks filled ([`Pacer::wants`]).
///
/// The driver runs it on a thread of its own that does nothing else; the session builds
/// what it [`wants`](Pacer::wants) on another.
#[derive(Debug, Clone)]
pub struct Pacer<F> {
    cover: ClientCover<F>,
    drops: VecDeque<F>,
    loops: VecDeque<F>,
    drop_stock: usize,
    loop_stock: usize,
    real_stock: usize,
    /// Packets being built for each stock elsewhere ([`Pacer::promise`]), counted as there.
    promised: Promised,
    stats: PacerStats,
    /// λ_P + λ_L + λ_D.
    rate_per_s: f64,
}

/// Packets promised to each of a [`Pacer`]'s stocks.
#[derive(Debug, Clone, Copy, Default)]
struct Promised {
    real: usize,
    drops: usize,
    loops: usize,
}

impl Promised {
    fn of(&mut self, stock: Stock) -> &mut usize {
        match stock {
            Stock::Real => &mut self.real,
            Stock::Drop => &mut self.drops,
            Stock::Loop => &mut self.loops,
        }
    }
}

impl<F> Pacer<F> {
    /// A schedule at `rates` from `now`.
    pub fn new<R: Rng + ?Sized>(rates: ClientRates, now: Instant, rng: &mut R) -> Result<Self> {
        let (drop_stock, loop_stock, real_stock) = Self::stocks_for(rates);
        Ok(Pacer {
            cover: ClientCover::new(rates, now, rng)?,
            drops: VecDeque::new(),
            loops: VecDeque::new(),
            drop_stock,
            loop_stock,
            real_stock,
            promised: Promised::default(),
            stats: PacerStats::default(),
            rate_per_s: rates.total(),
        })
    }

    /// Drop cover, loop cover and real packets kept built at `rates`.
    fn stocks_for(rates: ClientRates) -> (usize, usize, usize) {
        let stock = |rate: f64, span: Duration, least: usize| {
            // Rates are finite (checked by `ClientCover::new`); the cast saturates.
            ((rate * span.as_secs_f64()).ceil() as usize).clamp(least, PACER_MAX_STOCK)
        };
        (
            stock(rates.lambda_p + rates.lambda_d, PACER_STOCK_SPAN, 4),
            stock(rates.lambda_l, PACER_STOCK_SPAN, 1),
            stock(rates.lambda_p, PACER_REAL_SPAN, PACER_REAL_STOCK),
        )
    }

    /// New rates from `now` (a new consensus); the stocks stay.
    pub fn set_rates<R: Rng + ?Sized>(
        &mut self,
        rates: ClientRates,
        now: Instant,
        rng: &mut R,
    ) -> Result<()> {
        let mut cover = ClientCover::new(rates, now, rng)?;
        while let Some(real) = self.cover.queue.pop_front() {
            cover.push_real(real);
        }
        self.cover = cover;
        self.rate_per_s = rates.total();
        (self.drop_stock, self.loop_stock, self.real_stock) = Self::stocks_for(rates);
        Ok(())
    }

    /// Ticks per second in all: λ_P + λ_L + λ_D.
    pub fn rate_per_s(&self) -> f64 {
        self.rate_per_s
    }

    /// What the stocks lack, counting the packets promised to them as there.
    pub fn wants(&self) -> PacerWants {
        let p = self.promised;
        PacerWants {
            drops: self.drop_stock.saturating_sub(self.drops.len() + p.drops),
            loops: self.loop_stock.saturating_sub(self.loops.len() + p.loops),
            real: self.cover.queued() + p.real < self.real_stock,
            none_left: self.drops.is_empty() && p.drops == 0,
        }
    }

    /// A packet for `stock` is being built elsewhere (on a worker thread): [`Self::wants`]
    /// counts it as there until it is [`fulfilled`](Self::fulfil) or the promise is
    /// [`broken`](Self::break_promise), so whoever fills the stocks does not build it twice.
    pub fn promise(&mut self, stock: Stock) {
        *self.promised.of(stock) += 1;
    }

    /// A promised packet will not come (its build failed).
    pub fn break_promise(&mut self, stock: Stock) {
        let n = self.promised.of(stock);
        *n = n.saturating_sub(1);
    }

    /// Packets promised and not yet pushed, in all.
    pub fn promised(&self) -> usize {
        self.promised.real + self.promised.drops + self.promised.loops
    }

    /// Packets the stocks hold when full: drop cover, loop cover and real.
    pub fn capacity(&self) -> usize {
        self.drop_stock + self.loop_stock + self.real_stock
    }

    /// A promised packet, built: into its stock, and the promise kept.
    pub fn fulfil(&mut self, stock: Stock, packet: F) {
        self.break_promise(stock);
        self.push(stock, packet);
    }

    /// Adds a built packet to its stock. A stock already full takes it anyway (the builder
    /// asked before it was filled); it is at most one over.
    pub fn push(&mut self, stock: Stock, packet: F) {
        match stock {
            Stock::Real => self.cover.push_real(packet),
            Stock::Drop => self.drops.push_back(packet),
            Stock::Loop => self.loops.push_back(packet),
        }
    }

    /// When the next tick is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.cover.poll_timeout()
    }

    /// The packet to send for a tick due at or before `now`, if any. Call until `None`.
    pub fn poll_transmit<R: Rng + ?Sized>(&mut self, now: Instant, rng: &mut R) -> Option<F> {
        loop {
            let emission = self.cover.poll_transmit(now, rng)?;
            let packet = match emission {
                ClientEmission::Real(p) => {
                    self.stats.real += 1;
                    Some(p)
                }
                ClientEmission::SendCover | ClientEmission::Drop => {
                    let p = self.drops.pop_front();
                    self.stats.drops += u64::from(p.is_some());
                    p
                }
                ClientEmission::Loop => match self.loops.pop_front() {
                    Some(p) => {
                        self.stats.loops += 1;
                        Some(p)
                    }
                    None => {
                        let p = self.drops.pop_front();
                        self.stats.loops_as_drops += u64::from(p.is_some());
                        p
                    }
                },
            };
            match packet {
                Some(p) => return Some(p),
                None => self.stats.missed += 1,
            }
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> PacerStats {
        self.stats
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

    /// With its stocks kept full, a pacer sends at exactly the ticks of the plain schedule of
    /// the same seed: what it sends comes from its stocks, never from building at the tick.
    #[test]
    fn a_stocked_pacer_keeps_the_schedule_of_its_seed() {
        let r = rates(50.0, 2.0, 3.0);
        let end = Instant::from_nanos(20 * SECOND);
        let mut rng_a = ChaCha20Rng::seed_from_u64(11);
        let mut plain = ClientCover::<u32>::new(r, Instant::ZERO, &mut rng_a).unwrap();
        let expected: Vec<Instant> = drive(&mut plain, &mut rng_a, end)
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        let mut rng_b = ChaCha20Rng::seed_from_u64(11);
        let mut pacer = Pacer::<u32>::new(r, Instant::ZERO, &mut rng_b).unwrap();
        // Cover stocks refilled after every tick; a real packet only every third round, as
        // data comes.
        let fill = |pacer: &mut Pacer<u32>, round: u32| {
            let w = pacer.wants();
            for _ in 0..w.drops {
                pacer.push(Stock::Drop, 0);
            }
            for _ in 0..w.loops {
                pacer.push(Stock::Loop, 0);
            }
            if w.real && round.is_multiple_of(3) {
                pacer.push(Stock::Real, round);
            }
        };
        fill(&mut pacer, 0);
        let mut sent = Vec::new();
        let mut round = 0;
        while let Some(t) = pacer.poll_timeout().filter(|t| *t <= end) {
            while pacer.poll_transmit(t, &mut rng_b).is_some() {
                sent.push(t);
            }
            round += 1;
            fill(&mut pacer, round);
        }
        assert_eq!(sent, expected);
        let stats = pacer.stats();
        assert_eq!(stats.missed, 0);
        assert!(
            stats.real > 100 && stats.drops > 100 && stats.loops > 10,
            "{stats:?}"
        );
    }

    /// The real stock reaches `PACER_REAL_SPAN` of λ_P's ticks (eight at 400/s), never fewer
    /// than `PACER_REAL_STOCK`, and follows new rates.
    #[test]
    fn the_real_stock_reaches_a_span_of_ticks() {
        let mut rng = ChaCha20Rng::seed_from_u64(13);
        let real_wanted = |pacer: &Pacer<u32>| {
            let mut p = pacer.clone();
            let mut n = 0;
            while p.wants().real {
                p.push(Stock::Real, 0);
                n += 1;
            }
            n
        };
        let mut pacer = Pacer::<u32>::new(rates(400.0, 2.0, 2.0), Instant::ZERO, &mut rng).unwrap();
        assert_eq!(real_wanted(&pacer), 8);
        pacer
            .set_rates(rates(100.0, 2.0, 2.0), Instant::ZERO, &mut rng)
            .unwrap();
        assert_eq!(real_wanted(&pacer), PACER_REAL_STOCK);
        pacer
            .set_rates(rates(1.0, 1.0, 1.0), Instant::ZERO, &mut rng)
            .unwrap();
        assert_eq!(real_wanted(&pacer), PACER_REAL_STOCK);
    }

    #[test]
    fn an_empty_pacer_counts_its_missed_ticks_and_a_loop_tick_takes_a_drop() {
        let mut rng = ChaCha20Rng::seed_from_u64(12);
        let mut pacer = Pacer::<u32>::new(rates(0.0, 5.0, 0.0), Instant::ZERO, &mut rng).unwrap();
        assert_eq!(pacer.wants().next(), Some(Stock::Drop), "cover first");
        assert_eq!(pacer.capacity(), 4 + 1 + PACER_REAL_STOCK);
        let first = pacer.poll_timeout().unwrap();
        assert_eq!(pacer.poll_transmit(first, &mut rng), None);
        assert_eq!(pacer.stats().missed, 1);
        pacer.push(Stock::Drop, 7);
        let second = pacer.poll_timeout().unwrap();
        assert_eq!(pacer.poll_transmit(second, &mut rng), Some(7));
        assert_eq!(pacer.stats().loops_as_drops, 1);
        assert!((pacer.rate_per_s() - 5.0).abs() < 1e-12);
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

        /// A filler that builds elsewhere and promises what it builds never builds more than
        /// the stocks hold: `wants` counts promised packets as there, whether they are
        /// fulfilled, broken or still on their way, in any order.
        #[test]
        fn promised_packets_count_as_stocked(
            steps in proptest::collection::vec((0u8..3, 0u8..3), 1..200),
        ) {
            let mut rng = ChaCha20Rng::seed_from_u64(5);
            let mut pacer = Pacer::<u32>::new(rates(400.0, 2.0, 2.0), Instant::ZERO, &mut rng).unwrap();
            let capacity = pacer.capacity();
            let mut on_the_way: Vec<Stock> = Vec::new();
            for (action, which) in steps {
                match action {
                    // Fill as a driver does: promise what the pacer wants.
                    0 => {
                        let mut fill = StockFill::new(&pacer);
                        while let Some(stock) = fill.next(pacer.wants()) {
                            pacer.promise(stock);
                            on_the_way.push(stock);
                        }
                    }
                    // A build lands or fails, not necessarily the oldest.
                    _ if on_the_way.is_empty() => {}
                    1 => {
                        let stock = on_the_way.remove(usize::from(which) % on_the_way.len());
                        pacer.fulfil(stock, 0);
                    }
                    _ => {
                        let stock = on_the_way.remove(usize::from(which) % on_the_way.len());
                        pacer.break_promise(stock);
                    }
                }
                prop_assert_eq!(pacer.promised(), on_the_way.len());
                let held = pacer.drops.len() + pacer.loops.len() + pacer.cover.queued();
                prop_assert!(held + pacer.promised() <= capacity, "{held} + {} > {capacity}", pacer.promised());
            }
            // Every promise kept: none left.
            while let Some(stock) = on_the_way.pop() {
                pacer.fulfil(stock, 0);
            }
            prop_assert_eq!(pacer.promised(), 0);
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
