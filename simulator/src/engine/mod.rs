//! The discrete-event engine: calendar queues under a virtual clock, driving the protocol's
//! cover schedulers, path selector and delay sampler.
//!
//! Time is whole nanoseconds. Within one queue, events at the same instant run in the order
//! they were scheduled (a sequence number breaks ties); a packet the senders emit runs before
//! a hop due at the same instant. Every random choice comes from ChaCha20 streams derived from
//! the seed, so one seed gives one run. Separate streams serve the senders' traffic and
//! paths, the hops' delays, the choice of corrupt relays, the choice of measured messages and
//! the ticket draws: changing the adversary or the ticket rate leaves the traffic exactly as
//! it was, so sweeps over those compare like with like.

mod observer;
mod senders;

use std::sync::mpsc;

use murmur_protocol::delay::ExpDelay;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::anonymity::{Pool, Tracker};
use crate::queue::EventQueue;
use crate::report::{MessageRow, MixRow, RunResult, Summary};
use crate::scenario::{Loaded, Scenario};
use crate::topology::{Directory, Path, Paths, Topology};
use crate::{Error, Result};
use observer::{HoldFrom, Known, Observer, Op, ReadFrom};
use senders::{Emitted, Inbox, MessageInfo, Record, Senders};

/// No message (a cover packet), and no slot (a packet no corrupt mix holds).
const NONE: u32 = u32::MAX;

/// How often (in events) the progress callback runs.
const PROGRESS_EVERY: u64 = 1 << 16;

/// Batches in flight between two threads: enough that neither waits on the other's
/// scheduling, few enough that the one ahead stays within a few megabytes.
const BATCHES_IN_FLIGHT: usize = 8;

/// The adversary's operations per batch.
const OPS_PER_BATCH: usize = 8192;

/// RNG streams derived from the seed.
const STREAM_TRAFFIC: u64 = 0;
const STREAM_ADVERSARY: u64 = 1;
const STREAM_MEASURE: u64 = 2;
const STREAM_TICKETS: u64 = 3;
const STREAM_DIRECTORY: u64 = 4;
const STREAM_TRACKED: u64 = 5;
const STREAM_HOPS: u64 = 6;

/// A packet in the mixes. It travels inside its event, so a hop touches no other memory
/// that grows with the packets in flight.
#[derive(Debug, Clone, Copy)]
struct Flight {
    /// Sender id (a client, or a mix sending a loop).
    origin: u32,
    /// Its message's slot in [`Network::live`], or [`NONE`] for cover.
    msg: u32,
    /// Its slot in the observer's held distributions while corrupt mixes hold it, or [`NONE`].
    held: u32,
    path: Path,
    hop: u8,
}

/// A real message on its way.
#[derive(Debug, Clone, Copy)]
struct Live {
    sender: u32,
    info: MessageInfo,
    sent: u64,
}

/// Where a packet arriving at a mix comes from.
#[derive(Debug, Clone, Copy)]
enum Source {
    /// Its sender's gateway: the adversary knows this distribution.
    Entry(Known),
    /// Honest mix `m`: the pool's mixture.
    Honest(u16),
    /// A corrupt mix, which linked it (its distribution is in the packet's slot).
    Corrupt,
}

#[derive(Debug, Clone, Copy, Default)]
struct MixStats {
    /// Pool size integrated over the measured window (packets × ns).
    area: f64,
    last: u64,
    arrivals: u64,
    max_pool: u32,
    pool: u32,
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
///
/// Three threads share the work. The senders (every client's schedule and the paths it draws)
/// depend on nothing the network does, so they run ahead and stream their packets in time
/// order; the network (this thread) merges them with its own hop events; the observer
/// applies the network's pool operations a batch behind. Each is a deterministic function of
/// its input stream, so the result does not depend on how the threads are scheduled.
pub fn run(loaded: &Loaded, seed: u64, progress: &mut dyn FnMut(f64)) -> Result<RunResult> {
    let s = &loaded.scenario;
    let topo = Topology::new(s, &mut stream(seed, STREAM_ADVERSARY));
    let directory = Directory::generate(s, &mut stream(seed, STREAM_DIRECTORY));
    let paths = Paths::new(&directory, &topo)?;
    let params = directory.consensus.params;
    let senders = Senders::new(loaded, seed, &topo, &paths, params)?;
    let (tracker, pools) = observer(s, seed, topo.senders(), &topo.corrupt_mix);
    let dim = tracker.dim() as u64;
    let mut network = Network::new(
        s,
        seed,
        &topo,
        params.mean_hop_delay(),
        senders.messages_per_s(),
    )?;
    std::thread::scope(|scope| {
        let (records_tx, records_rx) = mpsc::sync_channel(BATCHES_IN_FLIGHT);
        let (empty_records_tx, empty_records_rx) = mpsc::channel();
        let senders = std::thread::Builder::new()
            .name("sim-senders".into())
            .spawn_scoped(scope, move || senders.run(records_tx, empty_records_rx))
            .map_err(|e| Error::Thread("senders", format!("did not start: {e}")))?;
        let observer = if s.measure.anonymity {
            let (ops_tx, ops_rx) = mpsc::sync_channel(BATCHES_IN_FLIGHT);
            let (empty_ops_tx, empty_ops_rx) = mpsc::channel();
            network.to_observer = Some(ToObserver {
                ops: ops_tx,
                empty: empty_ops_rx,
            });
            let observer = Observer::new(tracker, pools);
            Some(
                std::thread::Builder::new()
                    .name("sim-observer".into())
                    .spawn_scoped(scope, move || observer.run(ops_rx, empty_ops_tx))
                    .map_err(|e| Error::Thread("observer", format!("did not start: {e}")))?,
            )
        } else {
            None
        };
        let mut inbox = Inbox::new(records_rx, empty_records_tx);
        let ran = network.run(&mut inbox, progress);
        // Hanging up stops the senders (they run ahead) and lets the observer finish.
        drop(inbox);
        network.flush_ops();
        network.to_observer = None;
        let counters = senders.join().map_err(|_| thread_panicked("senders"))?;
        let rows = match observer {
            Some(o) => o.join().map_err(|_| thread_panicked("observer"))?,
            None => Vec::new(),
        };
        ran?;
        Ok(network.finish(s, seed, (counters.real, counters.cover), rows, dim))
    })
}

fn thread_panicked(which: &'static str) -> Error {
    Error::Thread(which, "panicked".into())
}

/// Takes the full `batch` to send, leaving in its place one the other side sent back emptied
/// (or a new one): the batches go round between two threads instead of being allocated.
fn take_batch<T>(batch: &mut Vec<T>, empty: &mpsc::Receiver<Vec<T>>, capacity: usize) -> Vec<T> {
    let next = empty
        .try_recv()
        .unwrap_or_else(|_| Vec::with_capacity(capacity));
    std::mem::replace(batch, next)
}

/// The network's line to the observer thread: full batches out, emptied ones back.
struct ToObserver {
    ops: mpsc::SyncSender<Vec<Op>>,
    empty: mpsc::Receiver<Vec<Op>>,
}

/// The mixes: every packet's hops, and what each mix's pool holds.
struct Network<'a> {
    scenario: &'a Scenario,
    topo: &'a Topology,
    warmup: u64,
    end: u64,
    track: bool,
    queue: EventQueue<Flight>,
    events: u64,
    rng: ChaCha20Rng,
    ticket_rng: ChaCha20Rng,
    delay: ExpDelay,
    stats: Vec<MixStats>,
    live: Vec<Live>,
    free_live: Vec<u32>,
    free_held: Vec<u32>,
    held_slots: u32,
    outstanding: u64,
    latencies: Vec<f64>,
    network_latency_sum: f64,
    ops: Vec<Op>,
    to_observer: Option<ToObserver>,
}

impl<'a> Network<'a> {
    fn new(
        s: &'a Scenario,
        seed: u64,
        topo: &'a Topology,
        mean_hop_delay: std::time::Duration,
        messages_per_s: f64,
    ) -> Result<Self> {
        Ok(Network {
            scenario: s,
            topo,
            warmup: s.warmup_ns(),
            end: s.duration_ns(),
            track: s.measure.anonymity,
            queue: EventQueue::new(
                bucket_width(hop_event_rate(s, topo, messages_per_s)),
                queue_horizon(s),
            ),
            events: 0,
            rng: stream(seed, STREAM_HOPS),
            ticket_rng: stream(seed, STREAM_TICKETS),
            delay: ExpDelay::with_mean(mean_hop_delay)?,
            stats: vec![MixStats::default(); topo.mixes()],
            live: Vec::new(),
            free_live: Vec::new(),
            free_held: Vec::new(),
            held_slots: 0,
            outstanding: 0,
            latencies: Vec::new(),
            network_latency_sum: 0.0,
            ops: Vec::new(),
            to_observer: None,
        })
    }

    fn run(&mut self, inbox: &mut Inbox, progress: &mut dyn FnMut(f64)) -> Result<()> {
        loop {
            // The senders' record goes first at equal times.
            let record = inbox.peek()?.copied();
            let hop_at = self.queue.peek_time();
            let (t, record) = match (record, hop_at) {
                (Some(r), Some(h)) if r.t <= h => (r.t, Some(r)),
                (Some(r), None) => (r.t, Some(r)),
                (_, Some(h)) => (h, None),
                (None, None) => break,
            };
            // Past the end, only the measured messages still in flight keep the run going
            // (cover keeps flowing so they leave their queues and pools as they would).
            if t >= self.end && self.outstanding == 0 {
                break;
            }
            if let Some(record) = record {
                inbox.take();
                self.events += u64::from(record.new_event);
                self.sent(record);
            } else {
                let Some((t, flight)) = self.queue.pop() else {
                    break;
                };
                self.events += 1;
                self.hop_done(flight, t);
            }
            if self.events.is_multiple_of(PROGRESS_EVERY) {
                progress((t as f64 / self.end as f64).min(1.0));
            }
        }
        progress(1.0);
        Ok(())
    }

    /// One record of the senders' stream.
    fn sent(&mut self, record: Record) {
        let t = record.t;
        match record.what {
            Emitted::Nothing => {}
            Emitted::Created => self.outstanding += 1,
            Emitted::Packet { origin, path, msg } => {
                let msg = match msg {
                    None => NONE,
                    Some(info) => {
                        let live = Live {
                            sender: origin,
                            info,
                            sent: t,
                        };
                        match self.free_live.pop() {
                            Some(slot) => {
                                self.live[slot as usize] = live;
                                slot
                            }
                            None => {
                                self.live.push(live);
                                (self.live.len() - 1) as u32
                            }
                        }
                    }
                };
                let entry = match (origin < self.topo.clients).then(|| self.topo.gateway_of(origin))
                {
                    Some(g)
                        if !self.scenario.adversary.global_passive
                            && !self.topo.corrupt_gateway[g as usize] =>
                    {
                        let (lo, hi) = self.topo.clients_of(g);
                        Known::Uniform { lo, hi }
                    }
                    _ => Known::Point(origin),
                };
                let flight = Flight {
                    origin,
                    msg,
                    held: NONE,
                    path,
                    hop: 0,
                };
                self.enter(flight, Source::Entry(entry), t);
            }
        }
    }

    fn op(&mut self, op: Op) {
        self.ops.push(op);
        if self.ops.len() >= OPS_PER_BATCH {
            self.flush_ops();
        }
    }

    /// Hands the observer the operations so far.
    fn flush_ops(&mut self) {
        let Some(ToObserver { ops: to, empty }) = &self.to_observer else {
            self.ops.clear();
            return;
        };
        if self.ops.is_empty() {
            return;
        }
        if to
            .send(take_batch(&mut self.ops, empty, OPS_PER_BATCH))
            .is_err()
        {
            // The observer is gone (it only stops when this side hangs up); the rows it
            // would have filled are lost with it, which `run` reports as a panic.
            self.to_observer = None;
        }
    }

    /// Integrates mix `m`'s pool size up to `t` (call before every change).
    fn touch(&mut self, m: usize, t: u64) {
        let (warmup, end) = (self.warmup, self.end);
        let s = &mut self.stats[m];
        let clamp = |x: u64| x.clamp(warmup, end);
        s.area += f64::from(s.pool) * (clamp(t) - clamp(s.last)) as f64;
        s.last = t;
    }

    /// The packet arrives at the mix of its current hop.
    fn enter(&mut self, mut f: Flight, source: Source, t: u64) {
        let m = f.path[f.hop as usize] as usize;
        let origin = f.origin;
        self.touch(m, t);
        if self.topo.corrupt_mix[m] {
            // The mix links this packet's in and out: it keeps its own distribution, unless a
            // ticket for this hop names the pot that paid, and so the sender.
            let ticketed = origin < self.topo.clients
                && self.scenario.tickets.rate > 0.0
                && self.ticket_rng.random::<f64>() < self.scenario.tickets.rate;
            if self.track {
                if f.held == NONE {
                    f.held = self.free_held.pop().unwrap_or_else(|| {
                        self.held_slots += 1;
                        self.held_slots - 1
                    });
                }
                let from = match (ticketed, source) {
                    (true, _) => HoldFrom::Known(Known::Point(origin)),
                    (false, Source::Entry(k)) => HoldFrom::Known(k),
                    (false, Source::Honest(from)) => HoldFrom::Pool(from),
                    (false, Source::Corrupt) => HoldFrom::Kept,
                };
                self.op(Op::Hold { slot: f.held, from });
            }
        } else if self.track {
            let op = match source {
                Source::Entry(d) => Op::Add { m: m as u16, d },
                Source::Honest(from) => Op::Mix { m: m as u16, from },
                Source::Corrupt => {
                    let slot = std::mem::replace(&mut f.held, NONE);
                    self.release_held(slot);
                    Op::AddHeld {
                        m: m as u16,
                        slot,
                        origin,
                    }
                }
            };
            self.op(op);
        }
        let in_window = (self.warmup..self.end).contains(&t);
        let s = &mut self.stats[m];
        s.pool += 1;
        s.max_pool = s.max_pool.max(s.pool);
        s.arrivals += u64::from(in_window);
        let delay = u64::try_from(self.delay.sample(&mut self.rng).as_nanos()).unwrap_or(u64::MAX);
        self.queue.push(t.saturating_add(delay), f);
    }

    fn release_held(&mut self, slot: u32) {
        if slot != NONE {
            self.free_held.push(slot);
        }
    }

    /// The packet's delay at its current mix is over: on to the next layer, or out.
    fn hop_done(&mut self, mut f: Flight, t: u64) {
        let m = f.path[f.hop as usize] as usize;
        f.hop += 1;
        let corrupt = self.topo.corrupt_mix[m];
        let source = if corrupt {
            Source::Corrupt
        } else {
            Source::Honest(m as u16)
        };
        self.touch(m, t);
        if f.hop as usize >= self.topo.layers {
            self.deliver(f, source, t);
        } else {
            // The next mix reads this pool's mixture before the packet's departure is recorded.
            self.enter(f, source, t);
        }
        let s = &mut self.stats[m];
        s.pool = s.pool.saturating_sub(1);
        if self.track && !corrupt {
            self.op(Op::Depart { m: m as u16 });
        }
    }

    /// The packet left the last layer (to the exit, or back to a gateway).
    fn deliver(&mut self, f: Flight, source: Source, t: u64) {
        self.release_held(f.held);
        let Some(&live) = self.live.get(f.msg as usize) else {
            return;
        };
        self.free_live.push(f.msg);
        let msg = live.info;
        if !msg.in_window {
            return;
        }
        self.outstanding -= 1;
        let latency = secs(t - msg.created);
        self.latencies.push(latency);
        self.network_latency_sum += secs(t - live.sent);
        if !msg.measured {
            return;
        }
        let from = match source {
            Source::Honest(m) => ReadFrom::Pool(m),
            Source::Corrupt | Source::Entry(_) => ReadFrom::Held(f.held),
        };
        let row = MessageRow {
            message: msg.id,
            sender: live.sender,
            created_s: secs(msg.created),
            sent_s: secs(live.sent),
            delivered_s: secs(t),
            latency_s: latency,
            entropy_bits: None,
            min_entropy_bits: None,
            anonymity_set: None,
        };
        self.op(Op::Measure {
            row: Box::new(row),
            from,
        });
    }

    fn finish(
        mut self,
        s: &Scenario,
        seed: u64,
        packets: (u64, u64),
        rows: Vec<MessageRow>,
        tracked: u64,
    ) -> RunResult {
        for m in 0..self.topo.mixes() {
            self.touch(m, self.end);
        }
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
            &rows,
            &mixes,
            packets,
            if self.track { tracked } else { 0 },
        );
        RunResult {
            summary,
            messages: rows,
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

/// A calendar-queue bucket width that holds [`EVENTS_PER_BUCKET`] of `events_per_s`.
fn bucket_width(events_per_s: f64) -> u64 {
    let width_s = EVENTS_PER_BUCKET / events_per_s.max(1e-6);
    (width_s * 1e9).clamp(1e3, 1e12) as u64
}

/// Messages created per second.
fn message_rate(s: &Scenario, trace: &[(u64, u32)]) -> f64 {
    match s.traffic.messages_per_s {
        Some(rate) => f64::from(s.network.clients) * rate,
        None => trace.len() as f64 / s.duration_s,
    }
}

/// Packets sent per second, cover included.
fn packet_rate(s: &Scenario, messages: f64, mixes: usize) -> f64 {
    let r = &s.rates;
    if r.cover {
        f64::from(s.network.clients) * (r.lambda_p + r.lambda_l + r.lambda_d)
            + mixes as f64 * r.lambda_m
    } else {
        messages
    }
}

/// The senders' events per second: one per message created, one per packet sent.
fn sender_event_rate(s: &Scenario, trace: &[(u64, u32)], topo: &Topology) -> f64 {
    let messages = message_rate(s, trace);
    messages + packet_rate(s, messages, topo.mixes())
}

/// The network's events per second: one per packet per hop.
fn hop_event_rate(s: &Scenario, topo: &Topology, messages_per_s: f64) -> f64 {
    packet_rate(s, messages_per_s, topo.mixes()) * topo.layers as f64
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
