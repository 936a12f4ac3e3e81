//! Relay-to-relay links: Noise XK over TCP, one fixed-size sealed frame per message.
//!
//! Outbound, one connection per peer with a bounded queue. The dialer knows the listener's link
//! key from the consensus and runs the XK handshake (48 bytes out, 48 in, 64 out) under a
//! deadline; a listener that cannot prove that key gets no frame, is counted
//! (`wrong_key`) and retried with exponential backoff. Then every frame goes out sealed, in
//! batches of what is already queued, one write per batch. A peer idle for a while is closed.
//!
//! Inbound, every connection passes the listener's [`Gate`] (a handshake slot, capped per
//! address and in total, for at most the handshake deadline), then must prove a link key that
//! belongs to a relay of the current or the previous consensus, else it is closed before any
//! frame is read. An established link holds a slot of its own; a key holds at most
//! [`MAX_LINKS_PER_KEY`] of them (a relay that reconnects replaces its oldest), and a link that
//! brings no frame for `link_idle_timeout` is closed. A frame that fails to decrypt or to
//! decode closes its link (the stream can no longer be trusted) and is counted.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use murmur_directory::link_io::{accept_handshake, dial_handshake};
use murmur_protocol::directory::prober::ProberCard;
use murmur_protocol::directory::{Consensus, Epoch};
use murmur_protocol::frame::{FRAME_LEN, Frame};
use murmur_protocol::link::{LinkPublic, LinkSecret, SEALED_FRAME_LEN, Transport};
use murmur_protocol::packet::Address;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admit::Gate;
use crate::metrics::{self as m, drop_packet};
use crate::pipeline::{Inbound, Submitter};

/// Where relays are and which link keys they hold, from the current consensus.
#[derive(Default, Debug)]
pub struct Routes {
    pub mix_addrs: HashMap<Address, SocketAddr>,
    /// Each relay's link key: the only key a link to it accepts from its listener.
    pub link_keys: HashMap<Address, LinkPublic>,
    /// Layer-1 mixes: the only relays a gateway forwards client packets to.
    pub layer1: HashSet<Address>,
    /// The layer-1 mixes of the consensus before, for clients that still hold it.
    previous_layer1: HashSet<Address>,
    /// The epoch of the consensus these routes came from.
    epoch: Option<Epoch>,
    previous_epoch: Option<Epoch>,
    current_keys: HashSet<LinkPublic>,
    previous_keys: HashSet<LinkPublic>,
    /// The authorities' probers (from their signed cards): they may link to us to test us,
    /// and we deliver their test packets to them like to any next hop.
    probers: Vec<ProberCard>,
}

impl Routes {
    /// The routes of `consensus`, taking over from `previous` (the routes in force until now).
    pub fn follow(previous: &Routes, consensus: &Consensus) -> Routes {
        let mut routes = Routes {
            epoch: Some(consensus.epoch),
            ..Routes::default()
        };
        for r in &consensus.relays {
            routes.mix_addrs.insert(r.address(), r.addresses.mix);
            routes.link_keys.insert(r.address(), r.link_key);
            routes.current_keys.insert(r.link_key);
            if r.layer == Some(1) {
                routes.layer1.insert(r.address());
            }
        }
        // Relays of the previous consensus may still link to us: one that holds an older
        // consensus than ours still routes through us, and a relay that changed its key
        // still dials with the old one until it restarts. A consensus applied again for the
        // same epoch keeps the one before.
        if previous.epoch == Some(consensus.epoch) {
            routes.previous_keys = previous.previous_keys.clone();
            routes.previous_layer1 = previous.previous_layer1.clone();
            routes.previous_epoch = previous.previous_epoch;
        } else {
            routes.previous_keys = previous.current_keys.clone();
            routes.previous_layer1 = previous.layer1.clone();
            routes.previous_epoch = previous.epoch;
        }
        routes.set_probers(previous.probers.clone());
        routes
    }

    /// Whether these routes came from a consensus (none has been applied yet otherwise).
    pub fn has_consensus(&self) -> bool {
        self.epoch.is_some()
    }

    /// Whether a gateway may pass a client's packet to `next_hop`, built for the keys of
    /// `key_epoch` (the epoch of the consensus the client routed it by). Clients and relays
    /// fetch each consensus on their own schedules, so near an epoch's start a client may
    /// hold the consensus before ours ([`FirstHop::Allowed`] by its layer 1) or the one after
    /// ([`FirstHop::Ahead`]: ours cannot tell yet).
    pub fn first_hop(&self, next_hop: &Address, key_epoch: Epoch) -> FirstHop {
        let Some(epoch) = self.epoch else {
            return FirstHop::Ahead;
        };
        if self.layer1.contains(next_hop)
            || (self.previous_epoch == Some(key_epoch) && self.previous_layer1.contains(next_hop))
        {
            FirstHop::Allowed
        } else if epoch.checked_add(1) == Some(key_epoch) {
            FirstHop::Ahead
        } else {
            FirstHop::Refused
        }
    }

    /// Puts the authorities' probers in force (replacing the ones before). A prober's
    /// address never shadows a relay of the consensus.
    pub fn set_probers(&mut self, probers: Vec<ProberCard>) {
        for old in std::mem::take(&mut self.probers) {
            let address = old.sphinx_address();
            if self.link_keys.get(&address) == Some(&old.link_key) {
                self.mix_addrs.remove(&address);
                self.link_keys.remove(&address);
            }
        }
        for card in &probers {
            let address = card.sphinx_address();
            if !self.link_keys.contains_key(&address) {
                self.mix_addrs.insert(address, card.listen);
                self.link_keys.insert(address, card.link_key);
            }
        }
        self.probers = probers;
    }

    /// Whether a dialer proving `key` may link to this relay: it belongs to a relay of the
    /// current or the previous consensus.
    pub fn allows(&self, key: &LinkPublic) -> bool {
        self.current_keys.contains(key)
            || self.previous_keys.contains(key)
            || self.probers.iter().any(|p| p.link_key == *key)
    }
}

/// What a gateway's routes say of a client's first hop ([`Routes::first_hop`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstHop {
    /// A layer-1 mix of our consensus, or of the one before for a packet built by it.
    Allowed,
    /// Built for the epoch after ours: the client holds a consensus we have not fetched.
    Ahead,
    /// Not a layer-1 mix of any consensus the client could hold.
    Refused,
}

/// A frame on its way out, with when its packet arrived (for the hold-time histogram).
struct Outgoing {
    frame: Box<[u8; FRAME_LEN]>,
    received: Option<Instant>,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// An outbound link with nothing to send for this long is closed. Listeners close idle inbound
/// links only later (`mixing.link_idle_timeout`, 10 minutes by default), so a link normally
/// ends on the side that knows whether another frame is coming.
pub const IDLE_CLOSE: Duration = Duration::from_secs(300);
/// A peer that takes no bytes for this long is dropped (its queue would only fill).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Frames sealed and written at once.
const BATCH: usize = 64;
/// Bytes read from an inbound link at once: 10 sealed frames (at most 16 MiB over 512 links).
/// Must hold at least one sealed frame.
const READ_BUFFER: usize = 32 * 1024;
const _: () = assert!(READ_BUFFER >= SEALED_FRAME_LEN);
/// Established inbound links one key may hold. A relay opens one link to each peer, but it
/// reconnects after a restart or a network break while its old link may still look open here,
/// so a new link replaces the key's oldest rather than being refused.
pub const MAX_LINKS_PER_KEY: usize = 4;
/// How often an inbound link checks that its dialer's key is still in the consensus.
const KEY_RECHECK: Duration = Duration::from_secs(10);

/// Outbound links to other relays.
pub struct Links {
    routes: Arc<RwLock<Routes>>,
    local: Arc<LinkSecret>,
    handshake_timeout: Duration,
    /// Each peer task has a generation, so a task that ends removes only its own entry.
    peers: Mutex<HashMap<Address, (u64, mpsc::Sender<Outgoing>)>>,
    next_generation: AtomicU64,
    peer_queue: usize,
    /// Raised when something here learned that a newer consensus is out (a client's packet
    /// was built by it): the directory follower then fetches without waiting for its tick.
    consensus_wanted: tokio::sync::Notify,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Links {
    /// Links that prove `local` to their listeners and finish each handshake within
    /// `handshake_timeout`.
    pub fn new(
        routes: Arc<RwLock<Routes>>,
        local: Arc<LinkSecret>,
        peer_queue: usize,
        handshake_timeout: Duration,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Arc<Links> {
        Arc::new(Links {
            routes,
            local,
            handshake_timeout,
            peers: Mutex::new(HashMap::new()),
            next_generation: AtomicU64::new(0),
            peer_queue,
            consensus_wanted: tokio::sync::Notify::new(),
            shutdown,
            tracker,
        })
    }

    /// The current routes.
    pub fn routes(&self) -> &Arc<RwLock<Routes>> {
        &self.routes
    }

    /// Asks the directory follower for the newest consensus now (see
    /// [`Links::consensus_wanted`]). Requests made before it next listens count as one.
    pub fn want_consensus(&self) {
        self.consensus_wanted.notify_one();
    }

    /// Resolves once a newer consensus was asked for ([`Links::want_consensus`]).
    pub async fn consensus_wanted(&self) {
        self.consensus_wanted.notified().await;
    }

    /// Where `to` listens and the key it must prove, if it is in the consensus.
    fn peer(&self, to: &Address) -> Option<(SocketAddr, LinkPublic)> {
        let r = self.routes.read().ok()?;
        Some((*r.mix_addrs.get(to)?, *r.link_keys.get(to)?))
    }

    /// Queues `frame` for `to`. Drops (counted) if `to` is unknown or its queue is full.
    pub fn send(self: &Arc<Self>, to: Address, frame: &Frame, received: Option<Instant>) -> bool {
        let Some((addr, key)) = self.peer(&to) else {
            drop_packet("unknown_next_hop");
            return false;
        };
        let Ok(bytes) = frame.encode() else {
            drop_packet("encode_failed");
            return false;
        };
        let tx = {
            let Ok(mut peers) = self.peers.lock() else {
                return false;
            };
            match peers.get(&to) {
                Some((_, tx)) if !tx.is_closed() => tx.clone(),
                _ => {
                    let (tx, rx) = mpsc::channel(self.peer_queue);
                    let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
                    peers.insert(to, (generation, tx.clone()));
                    let links = self.clone();
                    self.tracker.spawn(async move {
                        links.peer_task(to, (addr, key), generation, rx).await
                    });
                    tx
                }
            }
        };
        match tx.try_send(Outgoing {
            frame: bytes,
            received,
        }) {
            Ok(()) => true,
            Err(_) => {
                drop_packet("peer_queue_full");
                false
            }
        }
    }

    /// Connects to `addr` and proves that its listener holds `key`.
    async fn dial(
        &self,
        addr: SocketAddr,
        key: &LinkPublic,
    ) -> Result<(TcpStream, Transport), &'static str> {
        let mut stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await
        {
            Ok(Ok(s)) => s,
            _ => return Err("connect"),
        };
        let _ = stream.set_nodelay(true);
        let handshake = dial_handshake(&mut stream, &self.local, key);
        match tokio::time::timeout(self.handshake_timeout, handshake).await {
            Ok(Ok(transport)) => Ok((stream, transport)),
            Ok(Err(reason)) => Err(reason),
            Err(_) => Err("handshake_timeout"),
        }
    }

    /// Sleeps `backoff` (unless shutting down) and doubles it; false on shutdown.
    async fn back_off(&self, backoff: &mut Duration) -> bool {
        let slept = tokio::select! {
            _ = self.shutdown.cancelled() => false,
            _ = tokio::time::sleep(*backoff) => true,
        };
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
        slept
    }

    async fn peer_task(
        self: Arc<Self>,
        to: Address,
        (mut addr, mut key): (SocketAddr, LinkPublic),
        generation: u64,
        mut rx: mpsc::Receiver<Outgoing>,
    ) {
        let mut backoff = MIN_BACKOFF;
        let mut pending: Option<Outgoing> = None;
        // Reused for every batch: frames are sealed in place, not allocated one by one.
        let mut sealed = vec![0u8; BATCH * SEALED_FRAME_LEN];
        let mut sent: Vec<Option<Instant>> = Vec::with_capacity(BATCH);
        let mut probe = [0u8; 1];
        'connect: loop {
            if self.shutdown.is_cancelled() {
                break;
            }
            // The relay may have moved or changed its key in a newer consensus.
            if let Some(now) = self.peer(&to) {
                (addr, key) = now;
            }
            let dialed = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                r = self.dial(addr, &key) => r,
            };
            let (stream, mut transport) = match dialed {
                Ok(link) => link,
                Err(reason) => {
                    metrics::counter!(m::LINK_DIAL_FAILURES, "reason" => reason).increment(1);
                    if reason == "wrong_key" {
                        // Relay addresses are public (the consensus lists them).
                        tracing::warn!(
                            peer = ?to, %addr, expected = %key,
                            "relay link refused: the listener cannot prove the link key the \
                             consensus lists; no frame sent, backing off {backoff:?}"
                        );
                    } else {
                        tracing::debug!(peer = ?to, %addr, reason, "relay link failed; backing off {backoff:?}");
                    }
                    // Frames that waited through the backoff are stale only if the queue filled.
                    if !self.back_off(&mut backoff).await {
                        break;
                    }
                    continue;
                }
            };
            metrics::counter!(m::LINK_CONNECTS).increment(1);
            let up = Instant::now();
            let (mut reader, mut writer) = stream.into_split();
            let closed = 'link: loop {
                let first = match pending.take() {
                    Some(o) => o,
                    None => tokio::select! {
                        _ = self.shutdown.cancelled() => break 'connect,
                        r = tokio::time::timeout(IDLE_CLOSE, rx.recv()) => match r {
                            Ok(Some(o)) => o,
                            Ok(None) => break 'connect,
                            Err(_) => {
                                metrics::counter!(m::LINKS_CLOSED, "direction" => "outbound", "reason" => "idle").increment(1);
                                break 'connect;
                            }
                        },
                        // A listener never sends after the handshake: this is its close (it
                        // restarted, or does not know our key yet). Noticed here, the next
                        // frame goes out on a new link instead of into a dead socket.
                        r = reader.read(&mut probe) => break 'link match r {
                            Ok(n) if n > 0 => "unexpected_bytes",
                            _ => "closed_by_peer",
                        },
                    },
                };
                // Seal what is already queued behind it, then write it all at once.
                sent.clear();
                let mut len = 0;
                let mut next = Some(first);
                while let Some(out) = next {
                    match transport.seal(&out.frame[..], &mut sealed[len..len + SEALED_FRAME_LEN]) {
                        Ok(n) if n == SEALED_FRAME_LEN => {
                            len += n;
                            sent.push(out.received);
                        }
                        // Cannot happen (every frame has one length); never send a short one.
                        _ => drop_packet("link_seal_failed"),
                    }
                    next = if sent.len() < BATCH {
                        rx.try_recv().ok()
                    } else {
                        None
                    };
                }
                let written = tokio::select! {
                    _ = self.shutdown.cancelled() => break 'connect,
                    r = tokio::time::timeout(WRITE_TIMEOUT, writer.write_all(&sealed[..len])) => r,
                };
                let failed = match written {
                    Ok(Ok(())) => None,
                    Ok(Err(_)) => Some("write_failed"),
                    Err(_) => Some("write_timeout"),
                };
                if let Some(reason) = failed {
                    // Some of the batch may have arrived; re-sending it would only meet the
                    // next hop's replay filter.
                    for _ in 0..sent.len() {
                        drop_packet("link_write_failed");
                    }
                    break 'link reason;
                }
                let now = Instant::now();
                metrics::counter!(m::PACKETS_FORWARDED).increment(sent.len() as u64);
                for received in sent.iter().flatten() {
                    metrics::histogram!(m::HOLD_SECONDS)
                        .record(now.saturating_duration_since(*received).as_secs_f64());
                }
            };
            metrics::counter!(m::LINKS_CLOSED, "direction" => "outbound", "reason" => closed)
                .increment(1);
            tracing::debug!(peer = ?to, %addr, reason = closed, "relay link closed");
            // A link that ends soon after it came up (a listener that does not know our key
            // yet closes it at once) is retried with backoff, not in a tight loop.
            if up.elapsed() < MAX_BACKOFF {
                if !self.back_off(&mut backoff).await {
                    break;
                }
            } else {
                backoff = MIN_BACKOFF;
            }
        }
        if let Ok(mut peers) = self.peers.lock()
            && peers.get(&to).is_some_and(|(g, _)| *g == generation)
        {
            peers.remove(&to);
        }
    }
}

/// The relay-link listener: who may connect, and for how long a link may stay quiet.
pub struct LinkListener {
    gate: Gate,
    routes: Arc<RwLock<Routes>>,
    local: Arc<LinkSecret>,
    idle_timeout: Duration,
    by_key: Arc<Mutex<ByKey>>,
}

impl LinkListener {
    /// A listener proving `local`, admitting through `gate` the relays `routes` allows.
    pub fn new(
        gate: Gate,
        routes: Arc<RwLock<Routes>>,
        local: Arc<LinkSecret>,
        idle_timeout: Duration,
    ) -> LinkListener {
        LinkListener {
            gate,
            routes,
            local,
            idle_timeout,
            by_key: Arc::default(),
        }
    }

    /// The listener's side of the XK handshake, then the check that the dialer's key belongs
    /// to a relay of the consensus. The error is the refusal's metric label.
    async fn handshake(&self, stream: &mut TcpStream) -> Result<Transport, &'static str> {
        let transport = accept_handshake(stream, &self.local).await?;
        if !self.allows(&transport.remote()) {
            return Err("unknown_link_key");
        }
        Ok(transport)
    }

    fn allows(&self, key: &LinkPublic) -> bool {
        self.routes.read().is_ok_and(|r| r.allows(key))
    }

    /// One accepted connection, from its handshake to its close.
    async fn serve(
        &self,
        mut stream: TcpStream,
        peer: SocketAddr,
        slot: murmur_protocol::admission::Slot,
        submit: Submitter,
        shutdown: CancellationToken,
    ) {
        let admitted = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = self.gate.handshake(peer, slot, self.handshake(&mut stream)) => r,
        };
        // Refused: counted by the gate; dropping the stream closes it before any frame is read.
        let Some((transport, established)) = admitted else {
            return;
        };
        let held = ByKey::register(&self.by_key, transport.remote());
        let closed = self
            .read_frames(stream, transport, &submit, &held.replaced, &shutdown)
            .await;
        if let Some(reason) = closed {
            metrics::counter!(m::LINKS_CLOSED, "direction" => "inbound", "reason" => reason)
                .increment(1);
        }
        drop(held);
        self.gate.closed(established);
    }

    /// Reads sealed frames into the pipeline until the link ends; why it ended (`None` at
    /// shutdown).
    async fn read_frames(
        &self,
        mut stream: TcpStream,
        mut transport: Transport,
        submit: &Submitter,
        replaced: &CancellationToken,
        shutdown: &CancellationToken,
    ) -> Option<&'static str> {
        // One read system call brings in many messages, each opened straight from this buffer
        // (no copy into a message buffer first).
        let mut buf = vec![0u8; READ_BUFFER];
        let (mut start, mut end) = (0, 0);
        let mut frame = vec![0u8; FRAME_LEN];
        let key = transport.remote();
        let mut checked = Instant::now();
        loop {
            while end - start >= SEALED_FRAME_LEN {
                let sealed = &buf[start..start + SEALED_FRAME_LEN];
                start += SEALED_FRAME_LEN;
                if transport.open(sealed, &mut frame).is_err() {
                    return Some("link_decrypt");
                }
                let received = Instant::now();
                if received.saturating_duration_since(checked) >= KEY_RECHECK {
                    if !self.allows(&key) {
                        return Some("key_retired");
                    }
                    checked = received;
                }
                // Under a flood, a frame costs the relay the AEAD and nothing more.
                if submit.drop_if_full() {
                    continue;
                }
                match Frame::decode(&frame) {
                    Ok(Frame::Packet {
                        key_epoch,
                        packet,
                        envelope,
                    }) => submit.submit(Inbound {
                        key_epoch,
                        packet,
                        envelope,
                        received,
                    }),
                    Ok(_) => drop_packet("unexpected_frame"),
                    Err(e) => {
                        drop_packet(e.label());
                        return Some("bad_frame");
                    }
                }
            }
            // Keep the start of the next message and read the rest behind it.
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
            let read = tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = replaced.cancelled() => return Some("replaced"),
                r = tokio::time::timeout(self.idle_timeout, stream.read(&mut buf[end..])) => r,
            };
            match read {
                Err(_) => return Some("idle_timeout"),
                Ok(Ok(0)) | Ok(Err(_)) => return Some("eof"),
                Ok(Ok(n)) => end += n,
            }
        }
    }
}

/// Established inbound links by their dialer's key.
#[derive(Default)]
struct ByKey {
    next_id: u64,
    links: HashMap<LinkPublic, Vec<(u64, CancellationToken)>>,
}

/// One established inbound link in [`ByKey`]; dropping it takes it out.
struct KeyedLink {
    registry: Arc<Mutex<ByKey>>,
    key: LinkPublic,
    id: u64,
    /// Cancelled when a newer link of the same key replaces this one.
    replaced: CancellationToken,
}

fn lock(m: &Mutex<ByKey>) -> MutexGuard<'_, ByKey> {
    // The map stays consistent even if a holder panicked.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ByKey {
    /// Registers a new link of `key`, closing the key's oldest beyond [`MAX_LINKS_PER_KEY`].
    fn register(registry: &Arc<Mutex<ByKey>>, key: LinkPublic) -> KeyedLink {
        let mut r = lock(registry);
        let id = r.next_id;
        r.next_id += 1;
        let replaced = CancellationToken::new();
        let held = r.links.entry(key).or_default();
        while held.len() >= MAX_LINKS_PER_KEY {
            let (_, oldest) = held.remove(0);
            oldest.cancel();
        }
        held.push((id, replaced.clone()));
        KeyedLink {
            registry: registry.clone(),
            key,
            id,
            replaced,
        }
    }
}

impl Drop for KeyedLink {
    fn drop(&mut self) {
        let mut r = lock(&self.registry);
        if let Some(held) = r.links.get_mut(&self.key) {
            held.retain(|(id, _)| *id != self.id);
            if held.is_empty() {
                r.links.remove(&self.key);
            }
        }
    }
}

/// Accepts relay links and feeds their packets to the pipeline.
pub async fn serve_inbound(
    listener: TcpListener,
    links: LinkListener,
    submit: Submitter,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let links = Arc::new(links);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Refused (counted): dropping the stream closes it.
        let Some(slot) = links.gate.admit(peer) else {
            continue;
        };
        let (links, submit, shutdown) = (links.clone(), submit.clone(), shutdown.clone());
        tracker.spawn(async move { links.serve(stream, peer, slot, submit, shutdown).await });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admit::GateLimits;
    use crate::metrics::test_counter;
    use murmur_protocol::PACKET_SIZE;
    use murmur_protocol::admission::Limits;
    use murmur_protocol::directory::NetworkParams;
    use murmur_protocol::directory::synthetic::{self, SyntheticKeys, SyntheticNetwork};
    use murmur_protocol::envelope::Envelope;
    use murmur_protocol::link::{DIALER_HELLO_LEN, Dialer, LinkKind, Listener};
    use murmur_protocol::packet::Packet;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha20Rng;

    const EPOCH: Epoch = 5;

    /// One mix per layer, each with its link secret.
    fn network(seed: u64) -> (Consensus, Vec<SyntheticKeys>) {
        synthetic::generate(
            &mut ChaCha20Rng::seed_from_u64(seed),
            &SyntheticNetwork {
                mixes_per_layer: 1,
                gateways: 0,
                exits: 0,
                params: NetworkParams::nym_like(),
                epoch: EPOCH,
            },
        )
    }

    /// A frame that decodes (its packet is random, so a pipeline would drop it).
    fn frame(rng: &mut ChaCha20Rng) -> Frame {
        let mut bytes = vec![0u8; PACKET_SIZE];
        rng.fill_bytes(&mut bytes);
        bytes[31] &= 0x7f;
        Frame::Packet {
            key_epoch: EPOCH,
            packet: Packet::from_slice(&bytes).unwrap(),
            envelope: Envelope::random(rng),
        }
    }

    fn refused(reason: &str) -> f64 {
        test_counter(
            m::CONNECTIONS_REFUSED,
            &format!("listener=\"mix\",reason=\"{reason}\""),
        )
    }

    fn closed(reason: &str) -> f64 {
        test_counter(
            m::LINKS_CLOSED,
            &format!("direction=\"inbound\",reason=\"{reason}\""),
        )
    }

    #[test]
    fn keys_of_the_previous_consensus_stay_allowed_for_one_change() {
        let (c1, k1) = network(3);
        let (mut c2, k2) = network(4);
        c2.epoch = EPOCH + 1;
        let (mut c3, _) = network(5);
        c3.epoch = EPOCH + 2;
        let (old, new) = (k1[0].link.public(), k2[0].link.public());
        let r1 = Routes::follow(&Routes::default(), &c1);
        assert!(r1.allows(&old) && !r1.allows(&new));
        assert_eq!(r1.link_keys.get(&c1.relays[0].address()), Some(&old));
        let r2 = Routes::follow(&r1, &c2);
        assert!(
            r2.allows(&old) && r2.allows(&new),
            "grace across one change"
        );
        let again = Routes::follow(&r2, &c2);
        assert!(
            again.allows(&old),
            "the same consensus again keeps the one before"
        );
        let r3 = Routes::follow(&again, &c3);
        assert!(!r3.allows(&old), "two changes later the old key is gone");
        assert!(r3.allows(&new));
        assert!(!r3.allows(&LinkSecret::from_bytes([9; 32]).public()));
    }

    /// Near an epoch's start a client may hold the consensus before the gateway's or the one
    /// after it: a packet to a layer-1 mix of the client's consensus is neither refused nor
    /// let through to a relay that is layer 1 in no consensus the client could hold.
    #[test]
    fn a_first_hop_is_judged_by_the_consensus_the_client_built_it_with() {
        let (c1, _) = network(3);
        let (mut c2, _) = network(4);
        c2.epoch = EPOCH + 1;
        let in_layer = |c: &Consensus, layer: u8| {
            c.relays
                .iter()
                .find(|r| r.layer == Some(layer))
                .unwrap()
                .address()
        };
        let (old, new) = (in_layer(&c1, 1), in_layer(&c2, 1));
        assert_ne!(old, new);
        assert_eq!(
            Routes::default().first_hop(&old, EPOCH),
            FirstHop::Ahead,
            "no consensus yet: wait for one"
        );
        let r1 = Routes::follow(&Routes::default(), &c1);
        assert_eq!(r1.first_hop(&old, EPOCH), FirstHop::Allowed);
        assert_eq!(r1.first_hop(&in_layer(&c1, 2), EPOCH), FirstHop::Refused);
        assert_eq!(
            r1.first_hop(&new, EPOCH + 1),
            FirstHop::Ahead,
            "the client fetched the next consensus first"
        );
        assert_eq!(r1.first_hop(&new, EPOCH + 2), FirstHop::Refused);
        assert_eq!(r1.first_hop(&new, EPOCH), FirstHop::Refused);

        let r2 = Routes::follow(&r1, &c2);
        assert_eq!(r2.first_hop(&new, EPOCH + 1), FirstHop::Allowed);
        assert_eq!(
            r2.first_hop(&old, EPOCH),
            FirstHop::Allowed,
            "the client still holds the consensus before"
        );
        assert_eq!(
            r2.first_hop(&old, EPOCH + 1),
            FirstHop::Refused,
            "built by the new consensus, in which it is no layer-1 mix"
        );
        let again = Routes::follow(&r2, &c2);
        assert_eq!(again.first_hop(&old, EPOCH), FirstHop::Allowed);
        let mut c3 = c2.clone();
        c3.epoch = EPOCH + 2;
        let r3 = Routes::follow(&again, &c3);
        assert_eq!(r3.first_hop(&old, EPOCH), FirstHop::Refused);
    }

    /// The consensus lists relay X at an address where an impostor listens with another key:
    /// the dialer refuses it (counted, retried with backoff) and never sends it a frame, while
    /// the genuine relay Y gets its frame.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_listener_that_cannot_prove_the_consensus_key_gets_no_frame() {
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        let (mut consensus, keys) = network(1);
        let (x, y, me) = (0, 1, 2);
        let impostor = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let genuine = TcpListener::bind("127.0.0.1:0").await.unwrap();
        consensus.relays[x].addresses.mix = impostor.local_addr().unwrap();
        consensus.relays[y].addresses.mix = genuine.local_addr().unwrap();
        let routes = Arc::new(RwLock::new(Routes::follow(&Routes::default(), &consensus)));
        let shutdown = CancellationToken::new();
        let links = Links::new(
            routes,
            Arc::new(keys[me].link.clone()),
            16,
            Duration::from_secs(2),
            shutdown.clone(),
            TaskTracker::new(),
        );
        let wrong_before = test_counter(m::LINK_DIAL_FAILURES, "reason=\"wrong_key\"");

        let impostor_key = LinkSecret::generate(&mut rng);
        let seen = tokio::spawn(async move {
            let (mut connections, mut extra) = (0, 0);
            let until = tokio::time::Instant::now() + Duration::from_millis(1500);
            while let Ok(Ok((mut s, _))) = tokio::time::timeout_at(until, impostor.accept()).await {
                connections += 1;
                let mut hello = [0u8; DIALER_HELLO_LEN];
                s.read_exact(&mut hello).await.unwrap();
                // The first message is for X's key: the impostor cannot even read it...
                assert!(
                    Listener::accept(LinkKind::Relay, &impostor_key, &hello, &mut rand::rng())
                        .is_err()
                );
                // ...so it answers what it can: a well-formed answer of another handshake.
                let (_, its_hello) = Dialer::start(
                    LinkKind::Relay,
                    &impostor_key,
                    &impostor_key.public(),
                    &mut rand::rng(),
                )
                .unwrap();
                let (_, answer) =
                    Listener::accept(LinkKind::Relay, &impostor_key, &its_hello, &mut rand::rng())
                        .unwrap();
                s.write_all(&answer).await.unwrap();
                let mut rest = Vec::new();
                let _ = tokio::time::timeout(Duration::from_millis(300), s.read_to_end(&mut rest))
                    .await;
                extra += rest.len();
            }
            (connections, extra)
        });
        let y_key = keys[y].link.clone();
        let me_public = keys[me].link.public();
        let delivered = tokio::spawn(async move {
            let (mut s, _) = genuine.accept().await.unwrap();
            let mut t = accept_handshake(&mut s, &y_key).await.unwrap();
            assert_eq!(
                t.remote(),
                me_public,
                "the listener learns the dialer's key"
            );
            let mut sealed = vec![0u8; SEALED_FRAME_LEN];
            s.read_exact(&mut sealed).await.unwrap();
            t.open_frame(&sealed).unwrap()
        });

        let f = frame(&mut rng);
        assert!(links.send(consensus.relays[x].address(), &f, None));
        assert!(links.send(consensus.relays[y].address(), &f, None));
        assert_eq!(*delivered.await.unwrap(), *f.encode().unwrap());
        let (connections, extra) = seen.await.unwrap();
        let wrong = test_counter(m::LINK_DIAL_FAILURES, "reason=\"wrong_key\"") - wrong_before;
        eprintln!(
            "impostor: {connections} handshakes attempted in 1.5 s, {extra} bytes received \
             beyond the dialer's first messages; wrong_key failures counted: {wrong}"
        );
        assert!(connections >= 2, "the dialer retries, with backoff");
        assert_eq!(
            extra, 0,
            "the impostor got more than the first handshake message"
        );
        assert!(wrong >= 1.0, "wrong_key counted");
        shutdown.cancel();
    }

    struct Served {
        addr: SocketAddr,
        packets: crossbeam_channel::Receiver<Inbound>,
        keys: Vec<SyntheticKeys>,
        shutdown: CancellationToken,
    }

    impl Served {
        /// Relay 0 of a network listening with these timeouts; packets go to `packets`.
        async fn start(handshake_timeout: Duration, idle: Duration) -> Served {
            let (consensus, keys) = network(2);
            let routes = Arc::new(RwLock::new(Routes::follow(&Routes::default(), &consensus)));
            let gate = Gate::new(
                "mix",
                GateLimits {
                    handshake: Limits {
                        total: 8,
                        per_address: 8,
                    },
                    established: Limits {
                        total: 16,
                        per_address: 16,
                    },
                    handshake_timeout,
                },
            );
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (submit, packets) = Submitter::for_test(64);
            let shutdown = CancellationToken::new();
            let local = Arc::new(keys[0].link.clone());
            tokio::spawn(serve_inbound(
                listener,
                LinkListener::new(gate, routes, local, idle),
                submit,
                shutdown.clone(),
                TaskTracker::new(),
            ));
            Served {
                addr,
                packets,
                keys,
                shutdown,
            }
        }

        /// A link to the listener proving `local`.
        async fn dial(&self, local: &LinkSecret) -> (TcpStream, Transport) {
            let mut s = TcpStream::connect(self.addr).await.unwrap();
            let t = dial_handshake(&mut s, local, &self.keys[0].link.public())
                .await
                .unwrap();
            (s, t)
        }

        /// Packets submitted within `within`.
        fn received(&self, within: Duration) -> usize {
            let mut n = 0;
            while self.packets.recv_timeout(within).is_ok() {
                n += 1;
            }
            n
        }
    }

    async fn send(s: &mut TcpStream, t: &mut Transport, f: &Frame) {
        let sealed = t.seal_frame(&f.encode().unwrap()).unwrap();
        // The listener may have closed already.
        let _ = s.write_all(&sealed[..]).await;
    }

    /// Whether the other side closes `s` (EOF or reset) within `within`.
    async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 64];
        loop {
            match tokio::time::timeout(within, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_relays_of_the_consensus_get_frames_in_and_bad_links_are_closed() {
        let mut rng = ChaCha20Rng::seed_from_u64(12);
        let handshake_timeout = Duration::from_millis(400);
        let idle = Duration::from_millis(600);
        let net = Served::start(handshake_timeout, idle).await;
        let before: Vec<f64> = ["unknown_link_key", "link_handshake", "handshake_timeout"]
            .iter()
            .map(|r| refused(r))
            .collect();
        let closed_before: Vec<f64> = ["link_decrypt", "idle_timeout", "replaced"]
            .iter()
            .map(|r| closed(r))
            .collect();

        // A relay of the consensus: its frames go in.
        let (mut s, mut t) = net.dial(&net.keys[1].link).await;
        for _ in 0..3 {
            send(&mut s, &mut t, &frame(&mut rng)).await;
        }
        assert_eq!(net.received(Duration::from_millis(500)), 3);

        // A fresh key completes Noise (the dialer's side ends with its own last message), then
        // sends valid frames: closed, and none goes in.
        let outsider = LinkSecret::generate(&mut rng);
        let (mut o, mut ot) = net.dial(&outsider).await;
        for _ in 0..3 {
            send(&mut o, &mut ot, &frame(&mut rng)).await;
        }
        assert!(closed_within(&mut o, Duration::from_secs(2)).await);
        assert_eq!(net.received(Duration::from_millis(200)), 0);

        // Garbage instead of a handshake.
        let mut g = TcpStream::connect(net.addr).await.unwrap();
        let _ = g.write_all(&[0x47; 100]).await;
        assert!(closed_within(&mut g, Duration::from_secs(2)).await);

        // Silence: closed by the handshake deadline, not before.
        let started = Instant::now();
        let mut quiet = TcpStream::connect(net.addr).await.unwrap();
        assert!(closed_within(&mut quiet, Duration::from_secs(3)).await);
        let waited = started.elapsed();
        assert!(
            waited >= handshake_timeout - Duration::from_millis(50),
            "{waited:?}"
        );

        // A frame that does not decrypt closes the link; nothing goes in.
        let (mut d, mut dt) = net.dial(&net.keys[2].link).await;
        let mut sealed = dt.seal_frame(&frame(&mut rng).encode().unwrap()).unwrap();
        sealed[1000] ^= 1;
        d.write_all(&sealed[..]).await.unwrap();
        assert!(closed_within(&mut d, Duration::from_secs(2)).await);
        assert_eq!(net.received(Duration::from_millis(200)), 0);

        // An established link that brings nothing is closed after the idle timeout.
        let started = Instant::now();
        let (mut i, _it) = net.dial(&net.keys[2].link).await;
        assert!(closed_within(&mut i, Duration::from_secs(3)).await);
        assert!(started.elapsed() >= idle - Duration::from_millis(50));

        // One key opens more links than allowed: its oldest is closed, the others serve.
        let mut held = Vec::new();
        for _ in 0..=MAX_LINKS_PER_KEY {
            held.push(net.dial(&net.keys[2].link).await);
            // In order: the oldest is the first registered.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(closed_within(&mut held[0].0, Duration::from_secs(2)).await);
        for (s, t) in &mut held[1..] {
            send(s, t, &frame(&mut rng)).await;
        }
        assert_eq!(net.received(Duration::from_millis(300)), MAX_LINKS_PER_KEY);

        let after: Vec<f64> = ["unknown_link_key", "link_handshake", "handshake_timeout"]
            .iter()
            .map(|r| refused(r))
            .collect();
        let closed_after: Vec<f64> = ["link_decrypt", "idle_timeout", "replaced"]
            .iter()
            .map(|r| closed(r))
            .collect();
        for (i, reason) in ["unknown_link_key", "link_handshake", "handshake_timeout"]
            .iter()
            .enumerate()
        {
            assert!(after[i] - before[i] >= 1.0, "{reason} not counted");
        }
        for (i, reason) in ["link_decrypt", "idle_timeout", "replaced"]
            .iter()
            .enumerate()
        {
            assert!(
                closed_after[i] - closed_before[i] >= 1.0,
                "{reason} not counted"
            );
        }
        // The first link has been quiet since its frames: it is closed too by now or soon,
        // which the idle test covers; here only the frames it brought matter.
        drop(s);
        net.shutdown.cancel();
    }
}
