//! The senders: every client's cover schedule, queue and messages, and the mixes' loop
//! schedules. Nothing here depends on the network (a client's schedule and queue are its own,
//! and a path is drawn when a packet leaves), so the senders run on their own thread ahead of
//! the network and hand it their packets in time order ([`Emitted`]).

use std::sync::mpsc::{Receiver, SyncSender};

use murmur_protocol::cover::{
    ClientCover, ClientEmission, ClientRates, PoissonProcess, RelayLoopCover,
};
use murmur_protocol::directory::NetworkParams;
use murmur_protocol::time::Instant;
use rand::RngExt;
use rand_chacha::ChaCha20Rng;

use crate::queue::EventQueue;
use crate::scenario::{Loaded, TrafficModel, load_trace};
use crate::topology::{Path, Paths, Topology};
use crate::{Error, Result};

use super::{
    STREAM_MEASURE, STREAM_TRAFFIC, bucket_width, message_rate, queue_horizon, sender_event_rate,
    stream, take_batch,
};

/// Records per batch handed to the network (a batch is ~100 KB).
pub(super) const BATCH: usize = 2048;

/// A real message, as it travels in its packet.
#[derive(Debug, Clone, Copy)]
pub(super) struct MessageInfo {
    pub id: u32,
    pub created: u64,
    /// Created in the measured window: its latency counts, and the run waits for it.
    pub in_window: bool,
    /// Its sender entropy is computed on delivery.
    pub measured: bool,
}

/// What one of the senders' events did.
#[derive(Debug, Clone, Copy)]
pub(super) enum Emitted {
    /// Nothing the network sees (a message outside the window joined a queue).
    Nothing,
    /// A message was created in the measured window: the run lasts until it is delivered.
    Created,
    /// A packet left `origin` (a client, or a mix's loop) on `path`.
    Packet {
        origin: u32,
        path: Path,
        /// `None` for cover.
        msg: Option<MessageInfo>,
    },
}

/// One entry of the senders' stream, in time order.
#[derive(Debug, Clone, Copy)]
pub(super) struct Record {
    pub t: u64,
    /// The first record of one of the senders' events (the run counts events).
    pub new_event: bool,
    pub what: Emitted,
}

#[derive(Debug, Clone, Copy)]
enum Ev {
    /// A client's cover schedule is due.
    Client(u32),
    /// A client's next Poisson message.
    Traffic(u32),
    /// The next message of the trace.
    Trace,
    /// A mix's loop schedule is due.
    RelayLoop(u32),
}

/// Packets sent in the measured window.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Counters {
    pub real: u64,
    pub cover: u64,
}

/// Every sender of one run.
pub(super) struct Senders<'a> {
    loaded: &'a Loaded,
    topo: &'a Topology,
    paths: &'a Paths<'a>,
    warmup: u64,
    end: u64,
    track: bool,
    queue: EventQueue<Ev>,
    rng: ChaCha20Rng,
    measure_rng: ChaCha20Rng,
    /// One per client when cover is on (each queues its real messages for a send tick);
    /// empty without cover, when a message leaves at once.
    clients: Vec<ClientCover<MessageInfo>>,
    traffic: Option<PoissonProcess>,
    trace: Vec<(u64, u32)>,
    trace_next: usize,
    relay_loops: Vec<RelayLoopCover>,
    messages: u32,
    counters: Counters,
    out: Vec<Record>,
}

impl<'a> Senders<'a> {
    /// Every schedule started at time zero.
    pub fn new(
        loaded: &'a Loaded,
        seed: u64,
        topo: &'a Topology,
        paths: &'a Paths<'a>,
        params: NetworkParams,
    ) -> Result<Self> {
        let s = &loaded.scenario;
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
        let mut senders = Senders {
            loaded,
            topo,
            paths,
            warmup: s.warmup_ns(),
            end: s.duration_ns(),
            track: s.measure.anonymity,
            queue: EventQueue::new(
                bucket_width(sender_event_rate(s, &trace, topo)),
                queue_horizon(s),
            ),
            rng: stream(seed, STREAM_TRAFFIC),
            measure_rng: stream(seed, STREAM_MEASURE),
            clients: Vec::new(),
            traffic,
            trace,
            trace_next: 0,
            relay_loops: Vec::new(),
            messages: 0,
            counters: Counters::default(),
            out: Vec::with_capacity(BATCH),
        };
        senders.start(params)?;
        Ok(senders)
    }

    /// Messages the scenario creates per second.
    pub fn messages_per_s(&self) -> f64 {
        message_rate(&self.loaded.scenario, &self.trace)
    }

    fn start(&mut self, p: NetworkParams) -> Result<()> {
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
                    self.queue.push(t.as_nanos(), Ev::Client(c));
                }
                self.clients.push(cover);
            }
            for m in 0..self.topo.mixes() {
                let loops = RelayLoopCover::new(p.lambda_m, zero, &mut self.rng)?;
                if let Some(t) = loops.poll_timeout() {
                    self.queue.push(t.as_nanos(), Ev::RelayLoop(m as u32));
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
            self.queue.push(t, Ev::Trace);
        }
        Ok(())
    }

    /// Runs the schedules, handing `to_network` batches of records in time order, until they
    /// end or the network stops listening. Returns what was sent in the measured window.
    pub fn run(
        mut self,
        to_network: SyncSender<Result<Vec<Record>>>,
        empty: Receiver<Vec<Record>>,
    ) -> Counters {
        while let Some((t, ev)) = self.queue.pop() {
            let first = self.out.len();
            if let Err(e) = self.event(t, ev) {
                // The network stops at the error; whether it still listens does not matter.
                let _ = to_network.send(Err(e));
                return self.counters;
            }
            match self.out.get_mut(first) {
                Some(record) => record.new_event = true,
                None => self.out.push(Record {
                    t,
                    new_event: true,
                    what: Emitted::Nothing,
                }),
            }
            if self.out.len() >= BATCH {
                let full = take_batch(&mut self.out, &empty, BATCH);
                if to_network.send(Ok(full)).is_err() {
                    // The network has what it needs.
                    return self.counters;
                }
            }
        }
        if !self.out.is_empty() {
            let _ = to_network.send(Ok(std::mem::take(&mut self.out)));
        }
        self.counters
    }

    fn event(&mut self, t: u64, ev: Ev) -> Result<()> {
        match ev {
            Ev::Client(c) => self.client_due(c, t),
            Ev::Traffic(c) => {
                self.new_message(c, t)?;
                if let Some(p) = self.traffic
                    && let Some(next) = p.next_after(Instant::from_nanos(t), &mut self.rng)
                {
                    self.push_traffic(next, c);
                }
                Ok(())
            }
            Ev::Trace => {
                if let Some(&(_, c)) = self.trace.get(self.trace_next) {
                    self.new_message(c, t)?;
                }
                self.trace_next += 1;
                match self.trace.get(self.trace_next) {
                    Some(&(next, _)) if next < self.end => self.queue.push(next, Ev::Trace),
                    _ => {}
                }
                Ok(())
            }
            Ev::RelayLoop(m) => {
                let now = Instant::from_nanos(t);
                let sender = self.topo.mix_sender(m as usize);
                while self.relay_loops[m as usize].poll_transmit(now, &mut self.rng) {
                    self.count(false, t);
                    self.send(sender, None, t)?;
                }
                if let Some(next) = self.relay_loops[m as usize].poll_timeout() {
                    self.queue.push(next.as_nanos(), Ev::RelayLoop(m));
                }
                Ok(())
            }
        }
    }

    fn push_traffic(&mut self, t: Instant, c: u32) {
        if t.as_nanos() < self.end {
            self.queue.push(t.as_nanos(), Ev::Traffic(c));
        }
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
        let info = MessageInfo {
            id: self.messages,
            created: t,
            in_window,
            measured,
        };
        self.messages = self
            .messages
            .checked_add(1)
            .ok_or_else(|| Error::Input("more than 2³² messages in one run".into()))?;
        if in_window {
            self.out.push(Record {
                t,
                new_event: false,
                what: Emitted::Created,
            });
        }
        match self.clients.get_mut(c as usize) {
            Some(cover) => {
                cover.push_real(info);
                Ok(())
            }
            None => {
                self.count(true, t);
                self.send(c, Some(info), t)
            }
        }
    }

    /// Runs client `c`'s cover schedule (the protocol's) for everything due at `t`.
    fn client_due(&mut self, c: u32, t: u64) -> Result<()> {
        let now = Instant::from_nanos(t);
        loop {
            let Some(cover) = self.clients.get_mut(c as usize) else {
                return Ok(());
            };
            let Some(emission) = cover.poll_transmit(now, &mut self.rng) else {
                if let Some(next) = cover.poll_timeout() {
                    self.queue.push(next.as_nanos(), Ev::Client(c));
                }
                return Ok(());
            };
            let msg = match emission {
                ClientEmission::Real(info) => Some(info),
                ClientEmission::SendCover | ClientEmission::Loop | ClientEmission::Drop => None,
            };
            self.count(msg.is_some(), t);
            self.send(c, msg, t)?;
        }
    }

    /// A packet leaves `origin` (through its gateway, which forwards at once) into layer 1.
    fn send(&mut self, origin: u32, msg: Option<MessageInfo>, t: u64) -> Result<()> {
        let gateway = (origin < self.topo.clients).then(|| self.topo.gateway_of(origin));
        let path = self.paths.choose(&mut self.rng, gateway)?;
        self.out.push(Record {
            t,
            new_event: false,
            what: Emitted::Packet { origin, path, msg },
        });
        Ok(())
    }
}

/// The network's end of the senders' stream: one record at a time, in time order.
pub(super) struct Inbox {
    from_senders: Receiver<Result<Vec<Record>>>,
    empty: std::sync::mpsc::Sender<Vec<Record>>,
    batch: Vec<Record>,
    next: usize,
    ended: bool,
}

impl Inbox {
    pub fn new(
        from_senders: Receiver<Result<Vec<Record>>>,
        empty: std::sync::mpsc::Sender<Vec<Record>>,
    ) -> Inbox {
        Inbox {
            from_senders,
            empty,
            batch: Vec::new(),
            next: 0,
            ended: false,
        }
    }

    /// The next record, waiting for the senders if they have not produced it yet; `None`
    /// once they have ended.
    pub fn peek(&mut self) -> Result<Option<&Record>> {
        while self.next >= self.batch.len() {
            if self.ended {
                return Ok(None);
            }
            match self.from_senders.recv() {
                Ok(Ok(batch)) => {
                    let mut used = std::mem::replace(&mut self.batch, batch);
                    used.clear();
                    // The senders reuse it; if they have ended, it is dropped.
                    let _ = self.empty.send(used);
                    self.next = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => self.ended = true,
            }
        }
        Ok(self.batch.get(self.next))
    }

    /// Takes the record [`Inbox::peek`] showed.
    pub fn take(&mut self) {
        self.next += 1;
    }
}
