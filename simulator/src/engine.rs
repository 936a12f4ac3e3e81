//! The discrete-event engine: an event heap under a virtual clock, driving the protocol's
//! cover schedulers and delay sampler.
//!
//! Time is whole nanoseconds. Events at the same instant run in the order they were scheduled
//! (a sequence number breaks ties), and every random choice comes from ChaCha20 streams derived
//! from the seed, so one seed gives one run. Separate streams serve the traffic and timing,
//! the choice of corrupt relays, the choice of measured messages and the ticket draws: changing
//! the adversary or the ticket rate leaves the traffic exactly as it was, so sweeps over those
//! compare like with like.

use murmur_protocol::cover::{
    ClientCover, ClientEmission, ClientRates, PoissonProcess, RelayLoopCover,
};
use murmur_protocol::delay::ExpDelay;
use murmur_protocol::directory::NetworkParams;
use murmur_protocol::time::Instant;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::Result;
use crate::anonymity::{Dist, Pool, Tracker};
use crate::queue::EventQueue;
use crate::report::{MessageRow, MixRow, RunResult, Summary};
use crate::scenario::{Loaded, Scenario, TrafficModel, load_trace};
use crate::topology::{Directory, Path, Paths, Topology};

/// No message (a cover packet).
const NO_MESSAGE: u32 = u32::MAX;

/// How often (in events) the progress callback runs.
const PROGRESS_EVERY: u64 = 1 << 16;

/// RNG streams derived from the seed.
const STREAM_TRAFFIC: u64 = 0;
const STREAM_ADVERSARY: u64 = 1;
const STREAM_MEASURE: u64 = 2;
const STREAM_TICKETS: u64 = 3;
const STREAM_DIRECTORY: u64 = 4;
const STREAM_TRACKED: u64 = 5;

#[derive(Debug, Clone, Copy)]
enum Ev {
    /// A client's cover schedule is due.
    Client(u32),
    /// A client's next Poisson message.
    Traffic(u32),
    /// The next message of the trace.
    Trace,
    /// A packet's delay at its current mix is over.
    Hop(u32),
    /// A mix's loop schedule is due.
    RelayLoop(u32),
}

#[derive(Debug)]
struct Packet {
    /// Sender id (a client, or a mix sending a loop).
    origin: u32,
    msg: u32,
    path: Path,
    hop: u8,
    /// Its own distribution while it sits in a corrupt mix.
    dist: Option<Dist>,
}

#[derive(Debug, Clone, Copy)]
struct Message {
    sender: u32,
    created: u64,
    sent: u64,
    in_window: bool,
    measured: bool,
}

/// Where an arriving packet's sender distribution comes from.
enum Source {
    /// The packet carries it.
    Own(Option<Dist>),
    /// It just left this honest mix: the pool's mixture.
    Pool(usize),
}

#[derive(Debug, Clone, Copy, Default)]
struct MixStats {
    /// Pool size integrated over the measured window (packets × ns).
    area: f64,
    last: u64,
    arrivals: u64,
    max_pool: u32,
}

#[derive(Debug, Default)]
struct Counters {
    real: u64,
    cover: u64,
}

/// One simulation in progress.
struct Sim<'a> {
    loaded: &'a Loaded,
    topo: Topology,
    paths: Paths<'a>,
    /// The rates the directory publishes: the schedules run on these, as a client's would.
    params: NetworkParams,
    warmup: u64,
    end: u64,
    track: bool,
    /// Which senders the distributions cover.
    tracker: Tracker,
    queue: EventQueue<Ev>,
    events: u64,
    rng: ChaCha20Rng,
    measure_rng: ChaCha20Rng,
    ticket_rng: ChaCha20Rng,
    delay: ExpDelay,
    clients: Vec<Option<ClientCover<u32>>>,
    traffic: Option<PoissonProcess>,
    trace: Vec<(u64, u32)>,
    trace_next: usize,
    relay_loops: Vec<RelayLoopCover>,
    pools: Vec<Pool>,
    stats: Vec<MixStats>,
    packets: Vec<Packet>,
    free: Vec<u32>,
    messages: Vec<Message>,
    outstanding: u64,
    counters: Counters,
    latencies: Vec<f64>,
    network_latency_sum: f64,
    rows: Vec<MessageRow>,
}

/// The seed's random stream number `stream`.
pub(crate) fn stream(seed: u64, stream: u64) -> ChaCha20Rng {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// Nanoseconds to seconds.
pub(crate) fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Runs a scenario with `seed`; `progress` hears the fraction of simulated time done.
pub fn run(loaded: &Loaded, seed: u64, progress: &mut dyn FnMut(f64)) -> Result<RunResult> {
    let s = &loaded.scenario;
    let topo = Topology::new(s, &mut stream(seed, STREAM_ADVERSARY));
    let directory = Directory::generate(s, &mut stream(seed, STREAM_DIRECTORY));
    let paths = Paths::new(&directory, &topo)?;
    let mut sim = Sim::new(loaded, seed, topo, paths, directory.consensus.params)?;
    sim.start()?;
    sim.run(progress)?;
    Ok(sim.finish(seed))
}

impl<'a> Sim<'a> {
    fn new(
        loaded: &'a Loaded,
        seed: u64,
        topo: Topology,
        paths: Paths<'a>,
        params: NetworkParams,
    ) -> Result<Self> {
        let s = &loaded.scenario;
        let track = s.measure.anonymity;
        let (tracker, pools) = observer(s, seed, topo.senders(), &topo.corrupt_mix);
        let trace = match (s.traffic.model, &s.traffic.file) {
            (TrafficModel::Trace, Some(file)) => {
                load_trace(&loaded.base_dir.join(file), s.network.clients)?
            }
            _ => Vec::new(),
        };
        let traffic = match s.traffic.messages_per_s {
            Some(rate) if s.traffic.model == TrafficModel::Poisson => {
                Some(PoissonProcess::new(rate)?)
            }
            _ => None,
        };
        Ok(Sim {
            loaded,
            warmup: s.warmup_ns(),
            end: s.duration_ns(),
            track,
            tracker,
            queue: EventQueue::new(bucket_width(s, &trace, &topo), queue_horizon(s)),
            events: 0,
            rng: stream(seed, STREAM_TRAFFIC),
            measure_rng: stream(seed, STREAM_MEASURE),
            ticket_rng: stream(seed, STREAM_TICKETS),
            delay: ExpDelay::with_mean(params.mean_hop_delay())?,
            paths,
            params,
            clients: Vec::new(),
            traffic,
            trace,
            trace_next: 0,
            relay_loops: Vec::new(),
            stats: vec![MixStats::default(); topo.mixes()],
            pools,
            topo,
            packets: Vec::new(),
            free: Vec::new(),
            messages: Vec::new(),
            outstanding: 0,
            counters: Counters::default(),
            latencies: Vec::new(),
            network_latency_sum: 0.0,
            rows: Vec::new(),
        })
    }

    fn push(&mut self, t: u64, ev: Ev) {
        self.queue.push(t, ev);
    }

    /// Starts every schedule at time zero.
    fn start(&mut self) -> Result<()> {
        let p = self.params;
        let zero = Instant::ZERO;
        if self.loaded.scenario.rates.cover {
            let rates = ClientRates {
                lambda_p: p.lambda_p,
                lambda_l: p.lambda_l,
                lambda_d: p.lambda_d,
            };
            for c in 0..self.topo.clients {
                let cover = ClientCover::new(rates, zero, &mut self.rng)?;
                if let Some(t) = cover.poll_timeout() {
                    self.push(t.as_nanos(), Ev::Client(c));
                }
                self.clients.push(Some(cover));
            }
            for m in 0..self.topo.mixes() {
                let loops = RelayLoopCover::new(p.lambda_m, zero, &mut self.rng)?;
                if let Some(t) = loops.poll_timeout() {
                    self.push(t.as_nanos(), Ev::RelayLoop(m as u32));
                }
                self.relay_loops.push(loops);
            }
        }
        if let Some(p) = self.traffic {
            for c in 0..self.topo.clients {
                if let Some(t) = p.next_after(zero, &mut self.rng) {
                    self.push_traffic(t, c);
                }
            }
        }
        if let Some(&(t, _)) = self.trace.first() {
            self.push(t, Ev::Trace);
        }
        Ok(())
    }

    fn push_traffic(&mut self, t: Instant, c: u32) {
        if t.as_nanos() < self.end {
            self.push(t.as_nanos(), Ev::Traffic(c));
        }
    }

    fn run(&mut self, progress: &mut dyn FnMut(f64)) -> Result<()> {
        while let Some((t, ev)) = self.queue.pop() {
            // Past the end, only the measured messages still in flight keep the run going
            // (cover keeps flowing so they leave their queues and pools as they would).
            if t >= self.end && self.outstanding == 0 {
                break;
            }
            self.events += 1;
            if self.events.is_multiple_of(PROGRESS_EVERY) {
                progress((t as f64 / self.end as f64).min(1.0));
            }
            match ev {
                Ev::Client(c) => self.client_due(c, t)?,
                Ev::Traffic(c) => {
                    self.new_message(c, t)?;
                    if let Some(p) = self.traffic {
                        let next = p.next_after(Instant::from_nanos(t), &mut self.rng);
                        if let Some(next) = next {
                            self.push_traffic(next, c);
                        }
                    }
                }
                Ev::Trace => {
                    if let Some(&(_, c)) = self.trace.get(self.trace_next) {
                        self.new_message(c, t)?;
                    }
                    self.trace_next += 1;
                    match self.trace.get(self.trace_next) {
                        Some(&(next, _)) if next < self.end => self.push(next, Ev::Trace),
                        _ => {}
                    }
                }
                Ev::Hop(id) => self.hop_done(id, t),
                Ev::RelayLoop(m) => {
                    let now = Instant::from_nanos(t);
                    while self.relay_loops[m as usize].poll_transmit(now, &mut self.rng) {
                        self.count(false, t);
                        self.inject(self.topo.mix_sender(m as usize), NO_MESSAGE, t)?;
                    }
                    if let Some(next) = self.relay_loops[m as usize].poll_timeout() {
                        self.push(next.as_nanos(), Ev::RelayLoop(m));
                    }
                }
            }
        }
        progress(1.0);
        Ok(())
    }

    fn count(&mut self, real: bool, t: u64) {
        if (self.warmup..self.end).contains(&t) {
            if real {
                self.counters.real += 1;
            } else {
                self.counters.cover += 1;
            }
        }
    }

    /// A real message exists: it waits for a send tick, or leaves at once without cover.
    fn new_message(&mut self, c: u32, t: u64) -> Result<()> {
        let in_window = (self.warmup..self.end).contains(&t);
        let m = &self.loaded.scenario.measure;
        let measured = in_window
            && self.track
            && (m.sample >= 1.0 || self.measure_rng.random::<f64>() < m.sample);
        let id = self.messages.len() as u32;
        self.messages.push(Message {
            sender: c,
            created: t,
            sent: t,
            in_window,
            measured,
        });
        self.outstanding += u64::from(in_window);
        match self.clients.get_mut(c as usize).and_then(Option::as_mut) {
            Some(cover) => {
                cover.push_real(id);
                Ok(())
            }
            None => self.send_real(id, t),
        }
    }

    fn send_real(&mut self, id: u32, t: u64) -> Result<()> {
        let msg = &mut self.messages[id as usize];
        msg.sent = t;
        let sender = msg.sender;
        self.count(true, t);
        self.inject(sender, id, t)
    }

    /// Runs client `c`'s cover schedule (the protocol's) for everything due at `t`.
    fn client_due(&mut self, c: u32, t: u64) -> Result<()> {
        let Some(mut cover) = self.clients[c as usize].take() else {
            return Ok(());
        };
        let now = Instant::from_nanos(t);
        let mut sent = Ok(());
        while let Some(emission) = cover.poll_transmit(now, &mut self.rng) {
            sent = match emission {
                ClientEmission::Real(id) => self.send_real(id, t),
                ClientEmission::SendCover | ClientEmission::Loop | ClientEmission::Drop => {
                    self.count(false, t);
                    self.inject(c, NO_MESSAGE, t)
                }
            };
            if sent.is_err() {
                break;
            }
        }
        if let Some(next) = cover.poll_timeout() {
            self.push(next.as_nanos(), Ev::Client(c));
        }
        self.clients[c as usize] = Some(cover);
        sent
    }

    /// A packet leaves its sender (through its gateway, which forwards at once) into layer 1.
    fn inject(&mut self, origin: u32, msg: u32, t: u64) -> Result<()> {
        let client = origin < self.topo.clients;
        let gateway = client.then(|| self.topo.gateway_of(origin));
        let path = self.paths.choose(&mut self.rng, gateway)?;
        let entry = match gateway {
            None => Dist::Point(origin),
            Some(g) => {
                if self.loaded.scenario.adversary.global_passive
                    || self.topo.corrupt_gateway[g as usize]
                {
                    Dist::Point(origin)
                } else {
                    let (lo, hi) = self.topo.clients_of(g);
                    Dist::Uniform { lo, hi }
                }
            }
        };
        let packet = Packet {
            origin,
            msg,
            path,
            hop: 0,
            dist: None,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.packets[id as usize] = packet;
                id
            }
            None => {
                self.packets.push(packet);
                (self.packets.len() - 1) as u32
            }
        };
        self.enter(id, Source::Own(Some(entry)), t);
        Ok(())
    }

    /// Integrates mix `m`'s pool size up to `t` (call before every change).
    fn touch(&mut self, m: usize, t: u64) {
        let s = &mut self.stats[m];
        let clamp = |x: u64| x.clamp(self.warmup, self.end);
        s.area += f64::from(self.pools[m].len()) * (clamp(t) - clamp(s.last)) as f64;
        s.last = t;
    }

    /// Packet `id` arrives at the mix of its current hop.
    fn enter(&mut self, id: u32, source: Source, t: u64) {
        let p = &self.packets[id as usize];
        let m = p.path[p.hop as usize] as usize;
        let origin = p.origin;
        self.touch(m, t);
        if self.topo.corrupt_mix[m] {
            // The mix links this packet's in and out: it keeps its own distribution, unless a
            // ticket for this hop names the pot that paid, and so the sender.
            let ticketed = origin < self.topo.clients
                && self.loaded.scenario.tickets.rate > 0.0
                && self.ticket_rng.random::<f64>() < self.loaded.scenario.tickets.rate;
            let dist = if !self.track {
                None
            } else if ticketed {
                Some(Dist::Point(origin))
            } else {
                match source {
                    Source::Own(d) => d,
                    Source::Pool(from) => self.pools[from].snapshot(),
                }
            };
            self.packets[id as usize].dist = dist;
            self.pools[m].add_dist(&Dist::Point(origin), &self.tracker);
        } else {
            match source {
                Source::Own(Some(d)) => self.pools[m].add_dist(&d, &self.tracker),
                Source::Own(None) => self.pools[m].add_dist(&Dist::Point(origin), &self.tracker),
                Source::Pool(from) => {
                    let (to, from) = two_mut(&mut self.pools, m, from);
                    to.add_pool(from);
                }
            }
        }
        let s = &mut self.stats[m];
        s.max_pool = s.max_pool.max(self.pools[m].len());
        if (self.warmup..self.end).contains(&t) {
            s.arrivals += 1;
        }
        let delay = u64::try_from(self.delay.sample(&mut self.rng).as_nanos()).unwrap_or(u64::MAX);
        self.push(t.saturating_add(delay), Ev::Hop(id));
    }

    /// Packet `id`'s delay at its current mix is over: on to the next layer, or out.
    fn hop_done(&mut self, id: u32, t: u64) {
        let p = &mut self.packets[id as usize];
        let m = p.path[p.hop as usize] as usize;
        p.hop += 1;
        let source = if self.topo.corrupt_mix[m] {
            Source::Own(p.dist.take())
        } else {
            Source::Pool(m)
        };
        let last = p.hop as usize >= self.topo.layers;
        self.touch(m, t);
        if last {
            self.deliver(id, &source, t);
            self.free.push(id);
        } else {
            // The next mix reads this pool's mixture before the packet's departure is recorded.
            self.enter(id, source, t);
        }
        self.pools[m].depart();
    }

    /// Packet `id` left the last layer (to the exit, or back to a gateway).
    fn deliver(&mut self, id: u32, source: &Source, t: u64) {
        let msg_id = self.packets[id as usize].msg;
        let Some(msg) = self.messages.get(msg_id as usize).copied() else {
            return;
        };
        if !msg.in_window {
            return;
        }
        self.outstanding -= 1;
        let latency = secs(t - msg.created);
        self.latencies.push(latency);
        self.network_latency_sum += secs(t - msg.sent);
        if !msg.measured {
            return;
        }
        let anonymity = match source {
            Source::Own(Some(d)) => self.tracker.of_dist(d),
            Source::Own(None) => None,
            Source::Pool(m) => self.pools[*m].anonymity(&self.tracker),
        };
        self.rows.push(MessageRow {
            message: msg_id,
            sender: msg.sender,
            created_s: secs(msg.created),
            sent_s: secs(msg.sent),
            delivered_s: secs(t),
            latency_s: latency,
            entropy_bits: anonymity.map(|a| a.entropy_bits),
            min_entropy_bits: anonymity.map(|a| a.min_entropy_bits),
            anonymity_set: anonymity.map(|a| a.set_size),
        });
    }

    fn finish(mut self, seed: u64) -> RunResult {
        for m in 0..self.topo.mixes() {
            self.touch(m, self.end);
        }
        let s = &self.loaded.scenario;
        let window = (self.end - self.warmup) as f64;
        let mixes: Vec<MixRow> = (0..self.topo.mixes())
            .map(|m| MixRow {
                mix: m as u32,
                layer: self.topo.layer_of(m) as u32 + 1,
                corrupt: self.topo.corrupt_mix[m],
                mean_pool: self.stats[m].area / window,
                max_pool: self.stats[m].max_pool,
                arrivals_per_s: self.stats[m].arrivals as f64 / secs(self.end - self.warmup),
            })
            .collect();
        let summary = Summary::new(
            s,
            seed,
            self.events,
            &mut self.latencies,
            self.network_latency_sum,
            &self.rows,
            &mixes,
            (self.counters.real, self.counters.cover),
            if self.track {
                self.tracker.dim() as u64
            } else {
                0
            },
        );
        RunResult {
            summary,
            messages: self.rows,
            latencies: self.latencies,
            mixes,
        }
    }
}

/// The adversary's tracker over `senders` senders (exact or sampled as the scenario says) and
/// one pool per mix, tracking distributions at the honest ones.
pub(crate) fn observer(
    s: &Scenario,
    seed: u64,
    senders: usize,
    corrupt_mix: &[bool],
) -> (Tracker, Vec<Pool>) {
    let tracker = if s.measure.samples(senders) {
        let k = s.measure.tracked_senders as usize;
        Tracker::sampled(senders, k, &mut stream(seed, STREAM_TRACKED))
    } else {
        Tracker::exact(senders)
    };
    let track = s.measure.anonymity;
    let pools = corrupt_mix
        .iter()
        .map(|&corrupt| Pool::new(tracker.dim(), track && !corrupt))
        .collect();
    (tracker, pools)
}

/// Events a calendar-queue bucket should hold: sorting a bucket costs log₂ of this per event,
/// but fewer, fuller buckets keep the tails that pushes append to in the cache.
const EVENTS_PER_BUCKET: f64 = 256.0;

/// A calendar-queue bucket width that holds [`EVENTS_PER_BUCKET`] events: the expected event
/// rate is one per packet per hop, one per packet sent, and one per message created.
fn bucket_width(s: &Scenario, trace: &[(u64, u32)], topo: &Topology) -> u64 {
    let r = &s.rates;
    let clients = f64::from(s.network.clients);
    let messages = match s.traffic.messages_per_s {
        Some(rate) => clients * rate,
        None => trace.len() as f64 / s.duration_s,
    };
    let cover = if r.cover {
        clients * (r.lambda_p + r.lambda_l + r.lambda_d) + topo.mixes() as f64 * r.lambda_m
    } else {
        messages
    };
    let events_per_s = messages + cover * (1.0 + topo.layers as f64);
    let width_s = EVENTS_PER_BUCKET / events_per_s.max(1e-6);
    (width_s * 1e9).clamp(1e3, 1e12) as u64
}

/// How far ahead the calendar queue's ring should reach: eight mean intervals of the most
/// frequent events, a hop's delay and (with cover) a client's next send, so that almost every
/// event lands in the ring rather than the far heap. Message creations (one pending per
/// client, far apart) may still wait in the heap; they are few.
fn queue_horizon(s: &Scenario) -> u64 {
    let r = &s.rates;
    let mut mean_s = 1.0 / r.mu.max(1e-9);
    let client = r.lambda_p + r.lambda_l + r.lambda_d;
    if r.cover && client > 0.0 {
        mean_s = mean_s.max(1.0 / client);
    }
    (8.0 * mean_s * 1e9).clamp(1e6, 1e13) as u64
}

/// Two distinct elements of a slice, mutably and immutably.
fn two_mut<T>(v: &mut [T], a: usize, b: usize) -> (&mut T, &T) {
    if a < b {
        let (lo, hi) = v.split_at_mut(b);
        (&mut lo[a], &hi[0])
    } else {
        let (lo, hi) = v.split_at_mut(a);
        (&mut hi[0], &lo[b])
    }
}
