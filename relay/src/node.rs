//! One running relay: listeners, the Sphinx pipeline, the delay queue and the roles.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use ed25519_dalek::SigningKey;
use murmur_ledger::SettlementChoice;
use murmur_ledger::client::LedgerClient;
use murmur_protocol::admission::Limits;
use murmur_protocol::directory::{
    Consensus, DIRECTORY_SCHEMA, Descriptor, Epoch, EpochKey as PublishedKey, IdentityKey,
    RelayAddresses, Roles, UnixTime,
};
use murmur_protocol::frame::Frame;
use murmur_protocol::link::{LinkPublic, LinkSecret};
use murmur_protocol::packet::{Address, recover_plaintext};
use murmur_protocol::payload::Content;
use murmur_protocol::tab::{TabBookConfig, TabConfig};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::time::DelayQueue;

use crate::admit::{Gate, GateLimits};
use crate::config::{Config, Role};
use crate::error::{Error, Result};
use crate::exit::Exit;
use crate::gateway::{Billing, Gateway};
use crate::keys::{KeyRing, ReplaySizing};
use crate::links::{LinkListener, Links, Routes, serve_inbound};
use crate::loops::{self, Outstanding};
use crate::metrics::{self as m, drop_packet};
use crate::payments::{Payments, PaymentsParams, run_pot_refresher, run_redeemer};
use crate::pipeline::{Pipeline, PipelineConfig, Processed};

/// A relay with its listeners bound and its tasks running.
pub struct Node {
    config: Config,
    identity: SigningKey,
    link_key: Arc<LinkSecret>,
    keys: Arc<KeyRing>,
    payments: Option<Arc<Payments>>,
    links: Arc<Links>,
    gateway: Option<Arc<Gateway>>,
    exit: Option<Arc<Exit>>,
    loops: Arc<Outstanding>,
    consensus: RwLock<Option<Arc<Consensus>>>,
    mix_addr: SocketAddr,
    client_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    pipeline: std::sync::Mutex<Option<Pipeline>>,
}

/// Payments redeemed on the chain of `[payments.chain]`: the chain settlement checks each
/// ticket's co-signature, reads pots and redeems winners.
#[cfg(feature = "chain")]
async fn start_chain_payments(
    config: &Config,
    identity: &SigningKey,
    state_dir: &std::path::Path,
    keys: &Arc<KeyRing>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<Arc<Payments>> {
    let section = config.payments.chain.as_ref().ok_or_else(|| {
        Error::Ledger("payments.settlement = \"chain\" needs [payments.chain]".into())
    })?;
    let chain = crate::chain::connect(section, identity).await?;
    let params = PaymentsParams::from_config(config, IdentityKey::of(identity));
    let payments =
        Arc::new(Payments::open(state_dir, params, keys.clone())?.with_cosignatures(chain.clone()));
    tracker.spawn(run_redeemer(
        payments.clone(),
        chain.clone(),
        identity.clone(),
        config.payments.redeem_interval,
        shutdown.clone(),
    ));
    tracker.spawn(run_pot_refresher(
        payments.clone(),
        chain.clone(),
        shutdown.clone(),
    ));
    tracing::info!(
        rpc_url = %section.rpc_url,
        contract = %section.contract,
        wallet = ?chain.address_of(&IdentityKey::of(identity)),
        "taking payments, redeemed on the chain"
    );
    Ok(payments)
}

/// Without the `chain` feature, `settlement = "chain"` cannot be served.
#[cfg(not(feature = "chain"))]
async fn start_chain_payments(
    _config: &Config,
    _identity: &SigningKey,
    _state_dir: &std::path::Path,
    _keys: &Arc<KeyRing>,
    _tracker: &TaskTracker,
    _shutdown: &CancellationToken,
) -> Result<Arc<Payments>> {
    Err(Error::Ledger(
        "payments.settlement = \"chain\" needs a murmur-relay built with the `chain` feature \
         (cargo build --release -p murmur-relay --features chain)"
            .into(),
    ))
}

impl Node {
    /// Opens state, binds listeners and starts every task. Stops when `shutdown` fires;
    /// then call [`Node::join`].
    pub async fn start(
        config: Config,
        identity: SigningKey,
        shutdown: CancellationToken,
    ) -> Result<Arc<Node>> {
        let state_dir = config.resolve(&config.relay.state_dir);
        std::fs::create_dir_all(&state_dir).map_err(|source| Error::State {
            path: state_dir.clone(),
            source,
        })?;
        let keys = Arc::new(KeyRing::open(
            &state_dir,
            ReplaySizing {
                capacity: config.mixing.replay_capacity,
                fp_rate: config.mixing.replay_fp_rate,
            },
        )?);
        let link_path = config.resolve(&config.relay.link_key);
        let link_key = Arc::new(
            murmur_directory::keys::load_or_create_link(&link_path).map_err(|e| Error::Key {
                path: link_path.clone(),
                reason: e.to_string(),
            })?,
        );
        let tracker = TaskTracker::new();
        let payments = match &config.payments.ledger {
            _ if config.payments.settlement == SettlementChoice::Chain => Some(
                start_chain_payments(&config, &identity, &state_dir, &keys, &tracker, &shutdown)
                    .await?,
            ),
            Some(url) => {
                let params = PaymentsParams::from_config(&config, IdentityKey::of(&identity));
                let payments = Arc::new(Payments::open(&state_dir, params, keys.clone())?);
                let ledger_key = config
                    .payments
                    .ledger_identity()
                    .map_err(Error::Ledger)?
                    .ok_or_else(|| Error::Ledger("payments.ledger_key is not set".into()))?;
                let ledger = LedgerClient::new(url, ledger_key, config.payments.ledger_timeout)
                    .map_err(|e| Error::Ledger(e.to_string()))?;
                tracker.spawn(run_redeemer(
                    payments.clone(),
                    ledger.clone(),
                    identity.clone(),
                    config.payments.redeem_interval,
                    shutdown.clone(),
                ));
                tracker.spawn(run_pot_refresher(
                    payments.clone(),
                    ledger,
                    shutdown.clone(),
                ));
                tracing::info!(ledger = %url, %ledger_key, "taking payments");
                Some(payments)
            }
            None => None,
        };
        let routes = Arc::new(RwLock::new(Routes::default()));
        let links = Links::new(
            routes.clone(),
            link_key.clone(),
            config.mixing.peer_queue,
            config.mixing.handshake_timeout,
            shutdown.clone(),
            tracker.clone(),
        );
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Listen { addr, source })
        };
        let mix_listener = bind(config.listen.mix).await?;
        let mix_addr = mix_listener.local_addr().map_err(|source| Error::Listen {
            addr: config.listen.mix,
            source,
        })?;
        let (release_tx, release_rx) = mpsc::channel(config.mixing.input_queue);
        let pipeline = Pipeline::start(
            PipelineConfig {
                workers: config.mixing.workers,
                input_queue: config.mixing.input_queue,
                max_hop_delay: config.mixing.max_hop_delay,
            },
            keys.clone(),
            payments.clone(),
            release_tx,
        )
        .map_err(|source| Error::State {
            path: state_dir.clone(),
            source,
        })?;
        let m = &config.mixing;
        let gate = Gate::new(
            "mix",
            GateLimits {
                handshake: Limits {
                    total: m.max_handshakes,
                    per_address: m.max_handshakes_per_address,
                },
                // No per-address cap once a relay proved its key: relays may share an
                // address (a test network on one host); the per-key cap bounds each.
                established: Limits {
                    total: m.max_inbound_connections,
                    per_address: m.max_inbound_connections,
                },
                handshake_timeout: m.handshake_timeout,
            },
        );
        tracker.spawn(serve_inbound(
            mix_listener,
            LinkListener::new(gate, routes, link_key.clone(), m.link_idle_timeout),
            pipeline.submitter(),
            shutdown.clone(),
            tracker.clone(),
        ));
        let (gateway, client_addr) = if config.has(Role::Gateway) {
            let listener = bind(config.listen.client).await?;
            let addr = listener.local_addr().map_err(|source| Error::Listen {
                addr: config.listen.client,
                source,
            })?;
            let billing = payments.clone().map(|payments| Billing {
                payments,
                keys: keys.clone(),
                tabs: TabBookConfig {
                    window: config.gateway.tab_window,
                    grace_per_address: config.gateway.grace_per_address,
                    ..TabBookConfig::for_tab(TabConfig::for_price(config.relay.price_per_packet))
                },
            });
            let gw = Gateway::new(
                config.gateway.clone(),
                link_key.clone(),
                links.clone(),
                billing,
            );
            tracker.spawn(
                gw.clone()
                    .serve(listener, shutdown.clone(), tracker.clone()),
            );
            (Some(gw), Some(addr))
        } else {
            (None, None)
        };
        let exit = if config.has(Role::Exit) {
            Some(Exit::new(
                config.exit_policy()?,
                config.exit.clone(),
                links.clone(),
                shutdown.clone(),
                tracker.clone(),
            ))
        } else {
            None
        };
        let node = Arc::new(Node {
            config,
            identity,
            link_key,
            keys,
            payments,
            links,
            gateway,
            exit,
            loops: Arc::new(Outstanding::default()),
            consensus: RwLock::new(None),
            mix_addr,
            client_addr,
            shutdown,
            tracker,
            pipeline: std::sync::Mutex::new(Some(pipeline)),
        });
        let router = node.clone();
        node.tracker
            .spawn(async move { router.route(release_rx).await });
        let weak = Arc::downgrade(&node);
        node.tracker.spawn(loops::run(
            node.address(),
            node.keys.clone(),
            node.links.clone(),
            move || weak.upgrade().and_then(|n| n.consensus()),
            node.loops.clone(),
            murmur_protocol::directory::path::PathRules {
                distinct_subnets: node.config.mixing.distinct_subnets,
                ..Default::default()
            },
            node.shutdown.clone(),
        ));
        Ok(node)
    }

    /// This relay's Sphinx address.
    pub fn address(&self) -> Address {
        Address(self.identity.verifying_key().to_bytes())
    }

    /// This relay's identity.
    pub fn identity(&self) -> IdentityKey {
        IdentityKey::of(&self.identity)
    }

    /// The public half of the relay's link key, as its descriptor publishes it.
    pub fn link_public(&self) -> LinkPublic {
        self.link_key.public()
    }

    /// The relay-link address actually bound.
    pub fn mix_addr(&self) -> SocketAddr {
        self.mix_addr
    }

    /// The client WebSocket address actually bound, for gateways.
    pub fn client_addr(&self) -> Option<SocketAddr> {
        self.client_addr
    }

    /// The gateway role, for gateways.
    pub fn gateway(&self) -> Option<&Arc<Gateway>> {
        self.gateway.as_ref()
    }

    /// The Sphinx keys held.
    pub fn keys(&self) -> &Arc<KeyRing> {
        &self.keys
    }

    /// Ticket acceptance and redemption, if the relay takes payments (`payments.ledger`).
    pub fn payments(&self) -> Option<&Arc<Payments>> {
        self.payments.as_ref()
    }

    /// The consensus in force, if any.
    pub fn consensus(&self) -> Option<Arc<Consensus>> {
        self.consensus.read().ok().and_then(|c| c.clone())
    }

    /// Makes sure Sphinx keys exist for `epoch` and the next one; drops keys past the grace.
    pub fn rotate_keys(&self, epoch: Epoch) -> Result<()> {
        let oldest = epoch.saturating_sub(self.config.grace_epochs());
        if let Some(exit) = &self.exit {
            exit.set_oldest_epoch(oldest);
        }
        self.keys.rotate(&mut rand::rng(), epoch, oldest)
    }

    /// The descriptor to upload: current and next epoch keys, addresses, roles, policy.
    pub fn descriptor(&self, epoch: Epoch, now: UnixTime) -> Result<Descriptor> {
        let sphinx_keys = [epoch, epoch.saturating_add(1)]
            .into_iter()
            .filter_map(|e| self.keys.get(e))
            .map(|k| PublishedKey {
                epoch: k.epoch,
                key: k.public.to_bytes(),
                payment_commitment: k.payment_commitment(),
            })
            .collect();
        Ok(Descriptor {
            schema: DIRECTORY_SCHEMA,
            identity: self.identity(),
            family: self.config.relay.family.clone(),
            family_members: self
                .config
                .family_members()
                .map_err(|reason| Error::Config {
                    path: "relay.family_members".into(),
                    reason,
                })?
                .into_iter()
                .filter(|m| *m != self.identity())
                .collect(),
            addresses: RelayAddresses {
                mix: self.config.listen.advertise_mix.unwrap_or(self.mix_addr),
                client: self
                    .client_addr
                    .map(|a| self.config.listen.advertise_client.unwrap_or(a)),
            },
            roles: Roles {
                gateway: self.config.has(Role::Gateway),
                mix: self.config.has(Role::Mix),
                exit: self.config.has(Role::Exit),
            },
            link_key: self.link_key.public(),
            sphinx_keys,
            exit_policy: self.config.exit_policy()?,
            price_per_packet: self.config.relay.price_per_packet,
            bandwidth: self.config.relay.bandwidth,
            chain_address: self.chain_address(),
            published: now,
        })
    }

    /// Where this relay is paid on a chain: its chain wallet's address, when it redeems
    /// there (payers co-sign tickets naming it).
    fn chain_address(&self) -> Option<murmur_protocol::directory::ChainAddress> {
        #[cfg(feature = "chain")]
        if self.config.payments.settlement == murmur_ledger::SettlementChoice::Chain {
            return Some(crate::chain::address_of(&self.identity));
        }
        None
    }

    /// Puts a verified consensus in force: where relays are, which are layer 1, which link
    /// keys they prove (this and the previous consensus's relays may link to us).
    pub fn apply_consensus(&self, consensus: Arc<Consensus>) {
        if let Ok(mut current) = self.links.routes().write() {
            *current = Routes::follow(&current, &consensus);
        }
        if let Ok(mut c) = self.consensus.write() {
            *c = Some(consensus);
        }
    }

    /// Resolves once something in this relay asked for a newer consensus than it holds (a
    /// gateway's client built packets by it).
    pub async fn consensus_wanted(&self) {
        self.links.consensus_wanted().await;
    }

    /// Puts the authorities' probers in force (see [`Routes::set_probers`]).
    pub fn set_probers(&self, cards: Vec<murmur_protocol::directory::prober::ProberCard>) {
        if let Ok(mut routes) = self.links.routes().write() {
            routes.set_probers(cards);
        }
    }

    /// Holds forwarded packets for their delay and dispatches final-hop packets.
    async fn route(self: Arc<Self>, mut released: mpsc::Receiver<Processed>) {
        let mut held: DelayQueue<(Address, Frame, Instant)> = DelayQueue::new();
        let max_held = self.config.mixing.max_held_packets;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                p = released.recv() => match p {
                    None => return,
                    Some(Processed::Forward { next_hop, key_epoch, packet, envelope, received, release_at }) => {
                        let frame = Frame::Packet { key_epoch, packet, envelope };
                        if release_at <= Instant::now() {
                            self.links.send(next_hop, &frame, Some(received));
                        } else if held.len() >= max_held {
                            drop_packet("held_limit");
                        } else {
                            held.insert_at((next_hop, frame, received), release_at.into());
                        }
                        metrics::gauge!(m::QUEUE_DEPTH, "queue" => "held").set(held.len() as f64);
                    }
                    Some(Processed::Final { delivery, .. }) => self.final_hop(delivery),
                },
                Some(expired) = std::future::poll_fn(|cx| held.poll_expired(cx)), if !held.is_empty() => {
                    let (next_hop, frame, received) = expired.into_inner();
                    self.links.send(next_hop, &frame, Some(received));
                }
            }
        }
    }

    fn final_hop(&self, delivery: murmur_protocol::packet::FinalDelivery) {
        if delivery.destination != self.address() {
            match &self.gateway {
                Some(gw) => gw.deliver(delivery),
                None => drop_packet("not_a_gateway"),
            }
            return;
        }
        let content = recover_plaintext(&delivery.payload[..]).and_then(|p| Content::decode(&p));
        match content {
            Ok(Content::Cover) => {
                if !self.loops.returned(&delivery.surb_id) {
                    metrics::counter!(m::FINAL_DELIVERED, "to" => "drop_cover").increment(1)
                }
            }
            Ok(content) => match (content.into_data(), &self.exit) {
                (Some((ack, fragment)), Some(exit)) => exit.on_packet(ack, fragment),
                (Some(_), None) => drop_packet("not_an_exit"),
                (None, _) => drop_packet("unexpected_content"),
            },
            Err(e) => drop_packet(e.label()),
        }
    }

    /// Waits for every task and thread to finish after shutdown.
    pub async fn join(&self) {
        self.tracker.close();
        self.tracker.wait().await;
        let pipeline = self.pipeline.lock().ok().and_then(|mut p| p.take());
        if let Some(p) = pipeline {
            let _ = tokio::task::spawn_blocking(move || p.shutdown()).await;
        }
    }
}
