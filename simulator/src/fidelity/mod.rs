//! Fidelity mode: the code that ships, on real packets, under the engine's virtual clock.
//!
//! Every client is a [`ClientSession`] with its own [`Payer`] (its own pot), behind a gateway
//! that keeps a [`Tab`] for it, charges each frame it forwards or delivers and credits the
//! tickets the client pays it with. Every relay takes the real Sphinx step
//! ([`murmur_protocol::testkit::Relay`], i.e. [`murmur_protocol::hop::process`]): replay
//! filter, payment envelope, ticket slot. The exit is the real [`ExitSession`]; behind it a
//! simulated web server answers each request with the configured page after a delay (the
//! simulated world, not a stand-in for Murmur code). Links have latency and loss
//! ([`net::LinkModel`]). Time is the calendar queue's, in nanoseconds; every session and the
//! exit sleep until their own `poll_timeout`.
//!
//! The adversary watches the same packets. Each mix's pool is an [`anonymity::Pool`] as in
//! the fast mode, fed by the packets the relay actually holds: a packet takes its pool's
//! mixture when it leaves an honest mix, keeps its own distribution through a corrupt one,
//! and becomes its sender's point when a corrupt mix reads a ticket in its envelope slot (the
//! ticket names its pot, and the adversary is granted the pot's owner, the worst case the fast
//! mode also assumes). The figures are taken as real data packets reach the exit.

pub mod net;
pub mod report;
pub mod web;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use murmur_protocol::control::Control;
use murmur_protocol::cover::RelayLoopCover;
use murmur_protocol::delay::ExpDelay;
use murmur_protocol::directory::path::{PathRules, PathSelector};
use murmur_protocol::directory::synthetic::SyntheticKeys;
use murmur_protocol::directory::{Consensus, IdentityKey, LAYERS};
use murmur_protocol::envelope::Envelope;
use murmur_protocol::exit::{ExitConfig, ExitSession};
use murmur_protocol::frame::Frame;
use murmur_protocol::hop::HopError;
use murmur_protocol::packet::{Address, Packet, SurbId, build_packet_with_envelope};
use murmur_protocol::payer::{Payer, PayerConfig};
use murmur_protocol::payload::Content;
use murmur_protocol::session::{ClientSession, SessionConfig, SessionStats};
use murmur_protocol::tab::{Tab, TabConfig, Verdict};
use murmur_protocol::testkit::{Landing, Relay};
use murmur_protocol::time::Instant;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::anonymity::{Dist, Pool, Tracker};
use crate::engine::{observer, secs, stream};
use crate::queue::EventQueue;
use crate::scenario::Loaded;
use crate::topology::{Directory, Topology};
use crate::{Error, Result};

use net::{End, LinkModel};
use report::{Counts, FidelityResult, MessageRow, RelayRow};
use web::Web;

/// RNG streams, apart from the fast mode's (which use 0 to 5).
const STREAM_ADVERSARY: u64 = 1;
const STREAM_DIRECTORY: u64 = 4;
const STREAM_NETWORK: u64 = 16;
const STREAM_CLIENTS: u64 = 17;
const STREAM_TRAFFIC: u64 = 18;
const STREAM_RELAYS: u64 = 19;
const STREAM_MEASURE: u64 = 20;

/// Unix time at virtual time zero (tickets carry issue and expiry times).
const UNIX_START: u64 = 1_800_000_000;

/// After `duration_s`, no page starts; the run goes on up to this long for the pages that
/// started in the window to finish.
const DRAIN: Duration = Duration::from_secs(120);

/// Replay tags each relay remembers (its filter's capacity; 10⁻⁹ false positives).
const REPLAY_CAPACITY: u64 = 1 << 22;

/// Packets on links and in mixes at once; a packet beyond is dropped and counted.
const MAX_IN_FLIGHT: usize = 1 << 22;

/// How often the exit's reply-block stock is sampled.
const SAMPLE_EVERY: u64 = 1_000_000_000;

/// How often (in events) the progress callback runs.
const PROGRESS_EVERY: u64 = 1 << 14;

#[derive(Debug, Clone, Copy)]
enum Ev {
    /// A packet or frame reaches the end of its link.
    Arrive(u32),
    /// A packet's delay at its mix is over.
    Depart(u32),
    /// A client session's `poll_timeout` is due.
    Client(u32),
    /// The exit's `poll_timeout` is due.
    Exit,
    /// A client's application starts its next page load or download.
    Start(u32),
    /// The web server has the answer to a page ready.
    Served(u32),
    /// A mix's loop cover is due.
    MixLoop(u16),
    /// The exit's reply-block stock is sampled.
    Sample,
}

/// Where a packet in flight is going.
enum To {
    /// A client's frame to its gateway.
    Gateway { client: u32, frame: Frame },
    /// A packet to a relay.
    Relay {
        relay: u16,
        packet: Packet,
        envelope: Envelope,
    },
    /// A packet held at mix `at` until its delay ends, then sent to `next`.
    Held {
        at: u16,
        next: u16,
        packet: Packet,
        envelope: Envelope,
    },
    /// A delivery from the gateway to its client.
    Client {
        client: u32,
        surb_id: SurbId,
        payload: Box<[u8; murmur_protocol::PAYLOAD_SIZE]>,
    },
}

/// A packet in flight, with what the simulator knows of it (the truth) and what the
/// adversary makes of it.
struct Flight {
    to: To,
    /// The sender id of whoever made the packet (client, mix or the exit).
    sender: u32,
    /// When it left its sender.
    sent: u64,
    /// The adversary's distribution of its sender, as it left its last relay.
    dist: Option<Dist>,
}

/// What a relay is in the simulated network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// A mix by simulator mix id (layer · mixes_per_layer + index).
    Mix(u16),
    Gateway(u32),
    Exit,
}

struct RelayNode {
    relay: Relay,
    identity: IdentityKey,
    commitment: Option<[u8; 32]>,
    price: u64,
    role: Role,
    counts: RelayRow,
}

struct ClientNode {
    session: ClientSession,
    rng: ChaCha20Rng,
    gateway: u16,
    tab: Tab,
    /// The earliest wake-up scheduled for the session.
    wake: Option<u64>,
    /// Stats at the start of the measured window.
    at_warmup: Option<SessionStats>,
}

/// One fidelity simulation in progress.
struct World<'a> {
    loaded: &'a Loaded,
    consensus: Arc<Consensus>,
    topo: Topology,
    links: LinkModel,
    queue: EventQueue<Ev>,
    events: u64,
    warmup: u64,
    end: u64,
    hard_end: u64,
    max_delay: Duration,
    net_rng: ChaCha20Rng,
    relay_rng: ChaCha20Rng,
    measure_rng: ChaCha20Rng,
    relays: Vec<RelayNode>,
    by_address: BTreeMap<Address, u16>,
    /// Mix id → relay index.
    mix_relay: Vec<u16>,
    exit_relay: u16,
    clients: Vec<ClientNode>,
    client_by_address: HashMap<Address, u32>,
    /// Pot → the client that pays from it (what the adversary is granted).
    pot_owner: HashMap<IdentityKey, u32>,
    exit: ExitSession,
    exit_wake: Option<u64>,
    web: Web,
    mix_loops: Vec<RelayLoopCover>,
    loop_delay: ExpDelay,
    flights: Vec<Option<Flight>>,
    free: Vec<u32>,
    tracker: Tracker,
    track: bool,
    pools: Vec<Pool>,
    counts: Counts,
    messages: Vec<MessageRow>,
    /// The packet the exit is handling now, for the web server's bookkeeping.
    at_exit: Option<(u32, u64)>,
}

fn ns_of(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn unix_at(t: u64) -> u64 {
    UNIX_START + t / 1_000_000_000
}

fn sim_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Input(format!("fidelity: {what}: {e}"))
}

/// Runs a scenario in fidelity mode with `seed`; `progress` hears the fraction done.
pub fn run(loaded: &Loaded, seed: u64, progress: &mut dyn FnMut(f64)) -> Result<FidelityResult> {
    let mut world = World::new(loaded, seed)?;
    world.start()?;
    world.run(progress)?;
    Ok(world.finish(seed))
}

impl<'a> World<'a> {
    fn new(loaded: &'a Loaded, seed: u64) -> Result<World<'a>> {
        let s = &loaded.scenario;
        let topo = Topology::new(s, &mut stream(seed, STREAM_ADVERSARY));
        let (consensus, keys) =
            Directory::generate_with_keys(s, &mut stream(seed, STREAM_DIRECTORY));
        let consensus = Arc::new(consensus);
        let epoch = consensus.epoch;
        // Mix ids in the selector's order, as the fast mode numbers them.
        let selector = PathSelector::new(&consensus, PathRules::default());
        let mut mix_of: BTreeMap<IdentityKey, u16> = BTreeMap::new();
        for layer in 0..LAYERS {
            for (i, r) in selector.layer(layer + 1).iter().enumerate() {
                mix_of.insert(
                    r.identity,
                    (layer * topo.mixes_per_layer as usize + i) as u16,
                );
            }
        }
        let mut mix_relay = vec![0u16; topo.mixes()];
        let mut relays = Vec::with_capacity(consensus.relays.len());
        let mut by_address = BTreeMap::new();
        let mut gateways = Vec::new();
        let mut exit_relay = None;
        for (i, (r, k)) in consensus.relays.iter().zip(keys).enumerate() {
            let index = u16::try_from(i).map_err(|e| sim_err("relays", e))?;
            let role = if let Some(&m) = mix_of.get(&r.identity) {
                *mix_relay
                    .get_mut(m as usize)
                    .ok_or_else(|| sim_err("mixes", "a mix id outside the network"))? = index;
                Role::Mix(m)
            } else if r.roles.gateway {
                gateways.push(index);
                Role::Gateway(gateways.len() as u32 - 1)
            } else {
                exit_relay = Some(index);
                Role::Exit
            };
            let SyntheticKeys { sphinx, .. } = k;
            by_address.insert(r.address(), index);
            relays.push(RelayNode {
                relay: Relay::new(r.address(), sphinx, REPLAY_CAPACITY)
                    .map_err(|e| sim_err("replay filter", e))?,
                identity: r.identity,
                commitment: r.payment_commitment(epoch),
                price: r.price_per_packet,
                role,
                counts: RelayRow::default(),
            });
        }
        let exit_relay = exit_relay.ok_or_else(|| sim_err("directory", "no exit"))?;
        if gateways.len() != topo.gateways as usize || mix_of.len() != topo.mixes() {
            return Err(sim_err(
                "directory",
                "does not match the scenario's network",
            ));
        }
        let mut client_rng = stream(seed, STREAM_CLIENTS);
        let payer_config = PayerConfig {
            packets_per_ticket: s.streams.packets_per_ticket,
            ..PayerConfig::default()
        };
        let mut clients = Vec::with_capacity(topo.clients as usize);
        let mut client_by_address = HashMap::new();
        let mut pot_owner = HashMap::new();
        for c in 0..topo.clients {
            let mut rng = ChaCha20Rng::seed_from_u64(client_rng.random());
            let address = Address(rng.random());
            let gateway = gateways[topo.gateway_of(c) as usize];
            let gw_identity = relays[gateway as usize].identity;
            let mut session = ClientSession::new(
                SessionConfig::new(address),
                consensus.clone(),
                gw_identity,
                Instant::ZERO,
                &mut rng,
            )
            .map_err(|e| sim_err("client session", e))?;
            let pot = SigningKey::from_bytes(&rng.random());
            let payer = Payer::new(pot, payer_config, 1 << 50).map_err(|e| sim_err("payer", e))?;
            pot_owner.insert(payer.pot(), c);
            session.set_payer(payer, Instant::ZERO, UNIX_START);
            let price = relays[gateway as usize].price;
            clients.push(ClientNode {
                session,
                rng,
                gateway,
                tab: Tab::new(TabConfig::for_price(price)).map_err(|e| sim_err("tab", e))?,
                wake: None,
                at_warmup: None,
            });
            client_by_address.insert(address, c);
        }
        let exit_policy = consensus.relays[exit_relay as usize].exit_policy.clone();
        let exit = ExitSession::new(ExitConfig::new(exit_policy), client_rng.random());
        let track = s.measure.anonymity;
        // Senders: clients, mixes (their loops), then the exit (its replies).
        let senders = topo.senders() + 1;
        let (tracker, pools) = observer(s, seed, senders, &topo.corrupt_mix);
        let links = LinkModel::new(&s.links);
        let params = consensus.params;
        let warmup = s.warmup_ns();
        let end = s.duration_ns();
        let width = queue_width(s);
        let horizon = (8.0 * (1.0 / params.lambda_p).max(1.0 / params.mu) * 1e9
            + 8.0 * links.max_ns())
        .clamp(1e6, 1e13) as u64;
        Ok(World {
            loaded,
            topo,
            links,
            queue: EventQueue::new(width, horizon),
            events: 0,
            warmup,
            end,
            hard_end: end.saturating_add(ns_of(DRAIN)),
            max_delay: Duration::from_millis(params.max_hop_delay_ms),
            net_rng: stream(seed, STREAM_NETWORK),
            relay_rng: stream(seed, STREAM_RELAYS),
            measure_rng: stream(seed, STREAM_MEASURE),
            web: Web::new(&s.streams, stream(seed, STREAM_TRAFFIC)),
            relays,
            by_address,
            mix_relay,
            exit_relay,
            clients,
            client_by_address,
            pot_owner,
            exit,
            exit_wake: None,
            mix_loops: Vec::new(),
            loop_delay: ExpDelay::with_mean(params.mean_hop_delay())
                .map_err(|e| sim_err("delays", e))?,
            flights: Vec::new(),
            free: Vec::new(),
            tracker,
            track,
            pools,
            counts: Counts::default(),
            messages: Vec::new(),
            at_exit: None,
            consensus,
        })
    }

    fn start(&mut self) -> Result<()> {
        let p = self.consensus.params;
        for m in 0..self.topo.mixes() {
            let loops = RelayLoopCover::new(p.lambda_m, Instant::ZERO, &mut self.relay_rng)
                .map_err(|e| sim_err("mix loops", e))?;
            if let Some(t) = loops.poll_timeout() {
                self.queue.push(t.as_nanos(), Ev::MixLoop(m as u16));
            }
            self.mix_loops.push(loops);
        }
        for c in 0..self.topo.clients {
            self.schedule_client(c, 0);
            if let Some(t) = self.web.first_start(c, self.end) {
                self.queue.push(t, Ev::Start(c));
            }
        }
        self.queue.push(self.warmup, Ev::Sample);
        Ok(())
    }

    fn run(&mut self, progress: &mut dyn FnMut(f64)) -> Result<()> {
        while let Some((t, ev)) = self.queue.pop() {
            if t >= self.hard_end || (t >= self.end && self.web.resolved()) {
                break;
            }
            self.events += 1;
            if self.events.is_multiple_of(PROGRESS_EVERY) {
                progress((t as f64 / self.end as f64).min(1.0));
            }
            if t >= self.warmup && self.counts.window_started.is_none() {
                self.counts.window_started = Some(t);
                for c in &mut self.clients {
                    c.at_warmup = Some(c.session.stats());
                }
            }
            match ev {
                Ev::Arrive(f) => self.arrive(f, t),
                Ev::Depart(f) => self.depart(f, t),
                Ev::Client(c) => self.client_due(c, t),
                Ev::Exit => {
                    if self.exit_wake == Some(t) {
                        self.exit_wake = None;
                        self.exit.handle_timeout(Instant::from_nanos(t));
                        self.drive_exit(t);
                    }
                }
                Ev::Start(c) => self.start_stream(c, t),
                Ev::Served(page) => {
                    self.web.served(page);
                    self.serve_reads(t);
                    self.drive_exit(t);
                }
                Ev::MixLoop(m) => self.mix_loop(m, t)?,
                Ev::Sample => {
                    if t < self.end {
                        self.web.sample_stock(&self.exit);
                        self.queue.push(t + SAMPLE_EVERY, Ev::Sample);
                    }
                }
            }
        }
        progress(1.0);
        Ok(())
    }

    fn in_window(&self, t: u64) -> bool {
        (self.warmup..self.end).contains(&t)
    }

    /// Puts a flight on the queue to arrive (or, for a held packet, depart) at `t`.
    fn launch(&mut self, t: u64, flight: Flight) {
        if self.flights.len() - self.free.len() >= MAX_IN_FLIGHT {
            self.counts.dropped_in_flight_cap += 1;
            return;
        }
        let held = matches!(flight.to, To::Held { .. });
        let id = match self.free.pop() {
            Some(id) => {
                self.flights[id as usize] = Some(flight);
                id
            }
            None => {
                self.flights.push(Some(flight));
                (self.flights.len() - 1) as u32
            }
        };
        self.queue
            .push(t, if held { Ev::Depart(id) } else { Ev::Arrive(id) });
    }

    fn take(&mut self, id: u32) -> Option<Flight> {
        let f = self.flights.get_mut(id as usize)?.take();
        if f.is_some() {
            self.free.push(id);
        }
        f
    }

    /// Sends over the link `from → to` starting at `t`: lost, or arriving after its latency.
    fn send(&mut self, from: End, to: End, t: u64, flight: Flight) {
        let relays = self.relays.len() as u64;
        self.counts.link_crossings += 1;
        match self.links.cross(from, to, relays, &mut self.net_rng) {
            Some(ns) => self.launch(t.saturating_add(ns), flight),
            None => self.counts.link_losses += 1,
        }
    }

    fn relay_index(&self, address: &Address) -> Option<u16> {
        self.by_address.get(address).copied()
    }

    fn arrive(&mut self, id: u32, t: u64) {
        let Some(flight) = self.take(id) else { return };
        let Flight {
            to,
            sender,
            sent,
            dist,
        } = flight;
        match to {
            To::Gateway { client, frame } => self.at_gateway(client, frame, sent, t),
            To::Relay {
                relay,
                packet,
                envelope,
            } => self.at_relay(relay, packet, envelope, sender, sent, dist, t),
            To::Client {
                client,
                surb_id,
                payload,
            } => {
                let Some(c) = self.clients.get_mut(client as usize) else {
                    return;
                };
                c.session.handle_delivery(
                    surb_id,
                    &payload[..],
                    Instant::from_nanos(t),
                    &mut c.rng,
                );
                self.drive_client(client, t);
            }
            To::Held { .. } => {}
        }
    }

    /// A client's frame reaches its gateway: charged to its tab, and a packet passed on to
    /// its first mix, a payment credited.
    fn at_gateway(&mut self, client: u32, frame: Frame, sent: u64, t: u64) {
        let Some(c) = self.clients.get_mut(client as usize) else {
            return;
        };
        let gateway = c.gateway;
        match frame {
            Frame::Forward {
                next_hop,
                packet,
                envelope,
                ..
            } => {
                // Charged as the gateway charges a client's own frames, before it serves them.
                if c.tab.charge_or_refuse(1) == Verdict::Cutoff {
                    self.counts.gateway_cutoff_verdicts += 1;
                }
                self.relays[gateway as usize].counts.gateway_frames += 1;
                let Some(next) = self.relay_index(&next_hop) else {
                    self.counts.error("gateway_unknown_next_hop");
                    return;
                };
                let dist = self.entry_dist(client);
                let flight = Flight {
                    to: To::Relay {
                        relay: next,
                        packet,
                        envelope,
                    },
                    sender: client,
                    sent,
                    dist,
                };
                self.send(End::Relay(gateway), End::Relay(next), t, flight);
            }
            Frame::Control(bytes) => {
                let node = &self.relays[gateway as usize];
                match Control::decode(&bytes) {
                    Ok(Control::Payment { ticket }) => {
                        let ok = ticket
                            .check_for_recipient(&node.identity, unix_at(t), 1)
                            .is_ok();
                        let value = ticket.expected_value();
                        let counts = &mut self.relays[gateway as usize].counts;
                        counts.tickets += 1;
                        if ok {
                            counts.paid_value += value;
                            c.tab.credit(value);
                        } else {
                            counts.tickets_refused += 1;
                            if c.tab.refused_ticket() == Verdict::Cutoff {
                                self.counts.gateway_cutoff_verdicts += 1;
                            }
                        }
                    }
                    Ok(_) => self.counts.error("gateway_unexpected_control"),
                    Err(_) => self.counts.error("gateway_bad_control"),
                }
            }
            _ => self.counts.error("gateway_unexpected_frame"),
        }
    }

    /// What the adversary knows of a packet leaving `client`'s gateway.
    fn entry_dist(&self, client: u32) -> Option<Dist> {
        if !self.track {
            return None;
        }
        let g = self.topo.gateway_of(client);
        let adv = &self.loaded.scenario.adversary;
        Some(
            if adv.global_passive || self.topo.corrupt_gateway[g as usize] {
                Dist::Point(client)
            } else {
                let (lo, hi) = self.topo.clients_of(g);
                Dist::Uniform { lo, hi }
            },
        )
    }

    /// A packet reaches relay `r`, which takes its Sphinx step.
    #[allow(clippy::too_many_arguments)]
    fn at_relay(
        &mut self,
        r: u16,
        packet: Packet,
        envelope: Envelope,
        sender: u32,
        sent: u64,
        dist: Option<Dist>,
        t: u64,
    ) {
        let max_delay = self.max_delay;
        let Some(node) = self.relays.get_mut(r as usize) else {
            return;
        };
        let stepped = match node.relay.step(&packet, envelope, max_delay) {
            Ok(s) => s,
            Err(HopError::Replay) => {
                node.counts.replays += 1;
                return;
            }
            Err(e) => {
                node.counts.errors += 1;
                self.counts.error(e.label());
                return;
            }
        };
        node.counts.carried += 1;
        // Mixes' loops are the relays' own cover: no client pays for them.
        let mix_loop = sender >= self.topo.clients && sender < self.topo.senders() as u32;
        node.counts.client_carried += u64::from(!mix_loop);
        let window = (self.warmup..self.end).contains(&t);
        if window {
            node.counts.carried_in_window += 1;
        }
        let role = node.role;
        // The ticket in this hop's slot: checked as the relay would, then counted as paid.
        let mut pot = None;
        if let (Some(slot), Some(commitment)) = (stepped.slot, node.commitment) {
            let ticket = slot.into_ticket(node.identity, commitment);
            node.counts.tickets += 1;
            if ticket
                .check_for_recipient(&node.identity, unix_at(t), 1)
                .is_ok()
            {
                node.counts.paid_value += ticket.expected_value();
                pot = Some(ticket.pot);
            } else {
                node.counts.tickets_refused += 1;
            }
        }
        match stepped.landing {
            Landing::Forward {
                next_hop,
                delay,
                packet,
                envelope,
            } => {
                let Some(next) = self.relay_index(&next_hop) else {
                    self.counts.error("unknown_next_hop");
                    return;
                };
                let dist = match role {
                    Role::Mix(m) => self.enter_pool(m, sender, dist, pot, t),
                    _ => dist,
                };
                let flight = Flight {
                    to: To::Held {
                        at: r,
                        next,
                        packet,
                        envelope,
                    },
                    sender,
                    sent,
                    dist,
                };
                self.launch(t.saturating_add(ns_of(delay)), flight);
            }
            Landing::Deliver {
                destination,
                surb_id,
                payload,
            } => {
                let Some(&client) = self.client_by_address.get(&destination) else {
                    self.counts.error("deliver_unknown_client");
                    return;
                };
                let Some(c) = self.clients.get_mut(client as usize) else {
                    return;
                };
                if c.gateway != r {
                    self.counts.error("deliver_wrong_gateway");
                    return;
                }
                if c.tab.charge(1) == Verdict::Cutoff {
                    self.counts.gateway_cutoff_verdicts += 1;
                }
                self.relays[r as usize].counts.gateway_frames += 1;
                let flight = Flight {
                    to: To::Client {
                        client,
                        surb_id,
                        payload,
                    },
                    sender,
                    sent,
                    dist: None,
                };
                self.send(End::Relay(r), End::Client(client), t, flight);
            }
            Landing::Final(Content::Cover) => self.counts.cover_delivered += 1,
            Landing::Final(content) => match (role, content.into_data()) {
                (Role::Exit, Some((ack, fragment))) => {
                    self.measure(sender, sent, dist.as_ref(), t);
                    self.at_exit = Some((sender, sent));
                    self.exit
                        .handle_packet(Instant::from_nanos(t), ack, fragment);
                    self.drive_exit(t);
                    self.at_exit = None;
                }
                _ => self.counts.error("final_unexpected_content"),
            },
        }
    }

    /// A packet enters mix `m`'s pool; the distribution it carries through the mix (its own
    /// through a corrupt mix, the sender's point if that mix read a ticket from the sender's
    /// pot; the pool's mixture on leaving an honest mix, taken at departure).
    fn enter_pool(
        &mut self,
        m: u16,
        sender: u32,
        dist: Option<Dist>,
        pot: Option<IdentityKey>,
        t: u64,
    ) -> Option<Dist> {
        let corrupt = self.topo.corrupt_mix[m as usize];
        let client_packet = sender < self.topo.clients;
        if corrupt && client_packet {
            self.counts.corrupt_client_packets += u64::from(self.in_window(t));
        }
        let owner = pot.and_then(|p| self.pot_owner.get(&p).copied());
        if corrupt
            && let Some(owner) = owner
            && self.in_window(t)
        {
            self.counts.corrupt_tickets += 1;
            self.counts.note_pot(owner);
        }
        let pool = &mut self.pools[m as usize];
        let point = Dist::Point(sender);
        pool.add_dist(dist.as_ref().unwrap_or(&point), &self.tracker);
        if !self.track {
            return None;
        }
        if !corrupt {
            // It takes the pool's mixture when it leaves.
            return None;
        }
        match owner {
            Some(owner) => {
                if self.in_window(t) && dist != Some(Dist::Point(owner)) {
                    self.counts.linked_by_ticket += 1;
                }
                Some(Dist::Point(owner))
            }
            None => dist,
        }
    }

    /// A packet's delay at its mix is over: it leaves (taking the pool's mixture if the mix
    /// is honest) for the next relay.
    fn depart(&mut self, id: u32, t: u64) {
        let Some(flight) = self.take(id) else { return };
        let To::Held {
            at,
            next,
            packet,
            envelope,
        } = flight.to
        else {
            return;
        };
        let mut dist = flight.dist;
        if let Role::Mix(m) = self.relays[at as usize].role {
            let pool = &mut self.pools[m as usize];
            if !self.topo.corrupt_mix[m as usize] && pool.tracks() {
                dist = pool.snapshot();
            }
            pool.depart();
        }
        let out = Flight {
            to: To::Relay {
                relay: next,
                packet,
                envelope,
            },
            sender: flight.sender,
            sent: flight.sent,
            dist,
        };
        self.send(End::Relay(at), End::Relay(next), t, out);
    }

    /// A real packet reached the exit: its latency and, if sampled, its sender anonymity as
    /// the adversary sees it leave the last mix.
    fn measure(&mut self, sender: u32, sent: u64, dist: Option<&Dist>, t: u64) {
        if !self.in_window(sent) || sender >= self.topo.clients {
            return;
        }
        self.counts.network_latency.push(secs(t - sent));
        let sample = self.loaded.scenario.measure.sample;
        if !self.track || (sample < 1.0 && self.measure_rng.random::<f64>() >= sample) {
            return;
        }
        // The observer sees it reach the exit, where no reply ends: not the exit's own.
        let anonymity = dist
            .map(|d| self.tracker.excluding(d, self.exit_sender()))
            .and_then(|d| self.tracker.of_dist(&d));
        self.messages.push(MessageRow {
            sender,
            sent_s: secs(sent),
            at_exit_s: secs(t),
            entropy_bits: anonymity.map(|a| a.entropy_bits),
            min_entropy_bits: anonymity.map(|a| a.min_entropy_bits),
            anonymity_set: anonymity.map(|a| a.set_size),
        });
    }

    /// A client session's wake-up.
    fn client_due(&mut self, client: u32, t: u64) {
        let Some(c) = self.clients.get_mut(client as usize) else {
            return;
        };
        if c.wake != Some(t) {
            return;
        }
        c.wake = None;
        c.session.handle_timeout(Instant::from_nanos(t));
        self.drive_client(client, t);
    }

    /// Schedules the client's next wake-up if it is earlier than the one scheduled.
    fn schedule_client(&mut self, client: u32, t: u64) {
        let Some(c) = self.clients.get_mut(client as usize) else {
            return;
        };
        if let Some(next) = c.session.poll_timeout() {
            // An overdue deadline is due now (the queue takes nothing in the past).
            let next = next.as_nanos().max(t);
            if c.wake.is_none_or(|w| next < w) {
                c.wake = Some(next);
                self.queue.push(next, Ev::Client(client));
            }
        }
    }

    /// After any input: the session's frames go out, its events reach the application, and
    /// the application writes what it has; until nothing moves.
    fn drive_client(&mut self, client: u32, t: u64) {
        let now = Instant::from_nanos(t);
        loop {
            let mut frames = Vec::new();
            {
                let Some(c) = self.clients.get_mut(client as usize) else {
                    return;
                };
                while let Some(frame) = c.session.poll_transmit(now, &mut c.rng) {
                    frames.push(frame);
                }
            }
            for frame in frames {
                let gateway = self.clients[client as usize].gateway;
                let flight = Flight {
                    to: To::Gateway { client, frame },
                    sender: client,
                    sent: t,
                    dist: None,
                };
                self.send(End::Client(client), End::Relay(gateway), t, flight);
            }
            let Some(c) = self.clients.get_mut(client as usize) else {
                return;
            };
            let wrote = self.web.app_events(client, &mut c.session, t);
            if let Some(next) = self.web.take_next_start(client) {
                self.queue.push(next, Ev::Start(client));
            }
            if !wrote {
                break;
            }
        }
        self.schedule_client(client, t);
    }

    /// The client's application starts a page load or download.
    fn start_stream(&mut self, client: u32, t: u64) {
        let end = self.end;
        let Some(c) = self.clients.get_mut(client as usize) else {
            return;
        };
        let window = (self.warmup..self.end).contains(&t);
        if let Some(next) = self
            .web
            .start(client, &mut c.session, &mut c.rng, t, end, window)
        {
            self.queue.push(next, Ev::Start(client));
        }
        self.drive_client(client, t);
    }

    /// The exit's events go to the web server, its replies onto links; until nothing moves.
    fn drive_exit(&mut self, t: u64) {
        let now = Instant::from_nanos(t);
        loop {
            let mut progressed = false;
            while let Some(event) = self.exit.poll_event() {
                progressed = true;
                if let Some((page, delay)) =
                    self.web.exit_event(&mut self.exit, event, t, self.at_exit)
                {
                    self.queue.push(t.saturating_add(delay), Ev::Served(page));
                }
            }
            self.serve_reads(t);
            while let Some(reply) = self.exit.poll_transmit(now) {
                progressed = true;
                let Some(first) = self.relay_index(&reply.first_hop) else {
                    self.counts.error("reply_unknown_first_hop");
                    continue;
                };
                let envelope = Envelope::random(&mut self.relay_rng);
                let flight = Flight {
                    to: To::Relay {
                        relay: first,
                        packet: reply.packet,
                        envelope,
                    },
                    sender: self.exit_sender(),
                    sent: t,
                    dist: self.track.then(|| Dist::Point(self.exit_sender())),
                };
                self.counts.replies_sent += u64::from(self.in_window(t));
                self.send(End::Relay(self.exit_relay), End::Relay(first), t, flight);
            }
            if !progressed {
                break;
            }
        }
        let window = self.in_window(t);
        self.web.watch_stock(&self.exit, t, window);
        if let Some(next) = self.exit.poll_timeout() {
            let next = next.as_nanos().max(t);
            if self.exit_wake.is_none_or(|w| next < w) {
                self.exit_wake = Some(next);
                self.queue.push(next, Ev::Exit);
            }
        }
    }

    fn serve_reads(&mut self, t: u64) {
        self.web.serve_reads(&mut self.exit, t);
    }

    fn exit_sender(&self) -> u32 {
        self.topo.senders() as u32
    }

    /// Mix `m`'s loop cover: a real packet over a fresh path back to itself.
    fn mix_loop(&mut self, m: u16, t: u64) -> Result<()> {
        let now = Instant::from_nanos(t);
        let Some(r) = self.mix_relay.get(m as usize).copied() else {
            return Ok(());
        };
        let mut due = 0;
        if let Some(loops) = self.mix_loops.get_mut(m as usize) {
            while loops.poll_transmit(now, &mut self.relay_rng) {
                due += 1;
            }
        }
        for _ in 0..due {
            self.send_mix_loop(m, r, t)?;
        }
        if let Some(next) = self
            .mix_loops
            .get(m as usize)
            .and_then(RelayLoopCover::poll_timeout)
        {
            self.queue.push(next.as_nanos(), Ev::MixLoop(m));
        }
        Ok(())
    }

    fn send_mix_loop(&mut self, m: u16, r: u16, t: u64) -> Result<()> {
        let consensus = self.consensus.clone();
        let me = &consensus.relays[r as usize];
        let selector = PathSelector::new(&consensus, PathRules::default());
        let path = selector
            .mix_path(&mut self.relay_rng, &[me])
            .map_err(|e| sim_err("mix loop path", e))?;
        let epoch = consensus.epoch;
        let mut route = Vec::with_capacity(LAYERS + 1);
        for hop in path.iter().chain(std::iter::once(&me)) {
            route.push(hop.route_hop(epoch).map_err(|e| sim_err("route", e))?);
        }
        let delays = self.loop_delay.sample_n(&mut self.relay_rng, route.len());
        let payload = Content::Cover
            .encode()
            .map_err(|e| sim_err("loop payload", e))?;
        // Its hops enforce the envelope: an empty one, built with the packet.
        let (packet, envelope) = build_packet_with_envelope(
            &mut self.relay_rng,
            &route,
            &delays,
            me.address(),
            SurbId::default(),
            &payload,
            &vec![None; route.len()],
        )
        .map_err(|e| sim_err("loop packet", e))?;
        let Some(first) = self.relay_index(&route[0].address) else {
            return Ok(());
        };
        let sender = self.topo.mix_sender(m as usize);
        let flight = Flight {
            to: To::Relay {
                relay: first,
                packet,
                envelope,
            },
            sender,
            sent: t,
            dist: self.track.then_some(Dist::Point(sender)),
        };
        self.counts.mix_loops_sent += 1;
        self.send(End::Relay(r), End::Relay(first), t, flight);
        Ok(())
    }

    fn finish(mut self, seed: u64) -> FidelityResult {
        let relays: Vec<RelayRow> = self
            .relays
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let mut row = node.counts.clone();
                row.relay = i as u32;
                // What the payers counted for this relay and paid it in tickets.
                for c in &self.clients {
                    if let Some(a) = c.session.payer().and_then(|p| p.account(&node.identity)) {
                        row.payer_counted += a.packets;
                        row.issued_value = row
                            .issued_value
                            .saturating_add(u64::try_from(a.issued).unwrap_or(u64::MAX));
                    }
                }
                row.price = node.price;
                (row.role, row.layer, row.corrupt) = match node.role {
                    Role::Mix(m) => (
                        "mix",
                        self.topo.layer_of(m as usize) as u32 + 1,
                        self.topo.corrupt_mix[m as usize],
                    ),
                    Role::Gateway(g) => ("gateway", 0, self.topo.corrupt_gateway[g as usize]),
                    Role::Exit => ("exit", 0, false),
                };
                row
            })
            .collect();
        let stats: Vec<(SessionStats, SessionStats)> = self
            .clients
            .iter()
            .map(|c| (c.at_warmup.unwrap_or_default(), c.session.stats()))
            .collect();
        let pages = self.web.take_rows();
        let w = &self.web.counts;
        let skipped = w.skipped_busy + w.skipped_full + w.open_refused;
        let mut result = report::summarize(
            self.loaded,
            seed,
            self.events,
            &mut self.counts,
            &stats,
            relays,
            pages,
            std::mem::take(&mut self.messages),
            if self.track {
                self.tracker.dim() as u64
            } else {
                0
            },
            self.web.stock_figures(),
        );
        result.summary.pages_skipped = skipped;
        result
    }
}

/// A calendar-queue bucket width for the fidelity mode's event rate: per client packet, one
/// link arrival per hop and one departure per mix; replies and session wake-ups about as
/// many again.
fn queue_width(s: &crate::scenario::Scenario) -> u64 {
    let r = &s.rates;
    let clients = f64::from(s.network.clients);
    let packets = clients * (r.lambda_p + r.lambda_l + r.lambda_d)
        + f64::from(s.network.layers * s.network.mixes_per_layer) * r.lambda_m;
    let events_per_s = packets * 16.0;
    ((64.0 / events_per_s.max(1e-6)) * 1e9).clamp(1e3, 1e12) as u64
}

pub use report::FidelitySummary;
