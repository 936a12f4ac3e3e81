//! The authority's prober: tests every relay it holds a descriptor of, each round, before it
//! votes (see `murmur_protocol::directory::prober` for the card relays learn it from).
//!
//! A round for one relay: dial its mix address; run the Noise XK handshake against the link
//! key its descriptor claims (a relay that cannot prove it, or cannot be reached, fails the
//! round); send `packets` Sphinx packets routed through the relay and back to the prober's
//! own Sphinx address, with zero hop delay, so the time until the last one returns measures
//! what the relay's pipeline carries; count what comes back within the timeout. The result
//! goes to the authority state (`crate::probes`), which turns history into votes.
//!
//! The prober's own listener takes relay links like a relay does: a handshake slot capped
//! in total and under a deadline, an idle timeout, and only packets that open under the
//! prober's Sphinx key and name an outstanding test count; anything else is dropped and
//! counted.
//!
//! What a relay can do against it: test packets end at the prober, so a relay that knows the
//! prober's address can forward those and drop the rest. Clients' own loops (their suspect
//! list) catch that; the prober bounds what a relay gets for claiming, not for behaving.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use murmur_protocol::directory::prober::{ProberCard, SignedProberCard};
use murmur_protocol::directory::{DIRECTORY_SCHEMA, IdentityKey};
use murmur_protocol::frame::Frame;
use murmur_protocol::link::{LinkSecret, SEALED_FRAME_LEN, Transport};
use murmur_protocol::packet::{
    Address, HopOutput, OpenedPacket, RouteHop, SurbId, build_packet_with_envelope,
};
use murmur_protocol::payload::Content;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::authority::ProbeTarget;
use crate::daemon::Ctx;
use crate::link_io::{accept_handshake, dial_handshake, take};
use crate::metrics::PROBES;
use crate::probes::ProbeRound;
use crate::unix_now;

/// Relay links the prober's listener holds at once.
const MAX_INBOUND_LINKS: usize = 1024;

/// The prober's keys, fresh each start (relays fetch the new card).
pub struct ProberKeys {
    link: LinkSecret,
    sphinx: StaticSecret,
    address: [u8; 32],
}

impl ProberKeys {
    pub fn generate() -> ProberKeys {
        let mut rng = rand::rng();
        ProberKeys {
            link: LinkSecret::generate(&mut rng),
            sphinx: StaticSecret::random_from_rng(&mut rng),
            address: rand::random(),
        }
    }

    /// The card relays are given, signed by the authority.
    pub fn card(
        &self,
        authority: &ed25519_dalek::SigningKey,
        listen: SocketAddr,
    ) -> murmur_protocol::Result<SignedProberCard> {
        let card = ProberCard {
            schema: DIRECTORY_SCHEMA,
            authority: IdentityKey::of(authority),
            address: self.address,
            sphinx_key: PublicKey::from(&self.sphinx).to_bytes(),
            listen,
            link_key: self.link.public(),
            published: unix_now(),
        };
        SignedProberCard::sign(&card, authority)
    }

    fn hop(&self) -> RouteHop {
        RouteHop {
            address: Address(self.address),
            sphinx_key: PublicKey::from(&self.sphinx),
        }
    }
}

/// Test packets in flight: which round each belongs to.
#[derive(Default)]
struct Outstanding {
    rounds: Mutex<HashMap<SurbId, Arc<Returns>>>,
}

/// The arrival times of one round's packets.
#[derive(Default)]
struct Returns {
    at: Mutex<Vec<Instant>>,
    arrived: tokio::sync::Notify,
}

impl Outstanding {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SurbId, Arc<Returns>>> {
        self.rounds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a returned test packet; false if it is not one of ours (or came twice).
    fn returned(&self, id: &SurbId) -> bool {
        let Some(round) = self.lock().remove(id) else {
            return false;
        };
        round
            .at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Instant::now());
        round.arrived.notify_one();
        true
    }
}

/// Runs the prober's listener on `listener` and a round of tests every interval, until
/// `token` is cancelled.
pub(crate) fn start(
    ctx: Arc<Ctx>,
    keys: Arc<ProberKeys>,
    listener: TcpListener,
    token: CancellationToken,
    tracker: &TaskTracker,
) {
    let outstanding = Arc::new(Outstanding::default());
    tracker.spawn(listen(
        ctx.clone(),
        keys.clone(),
        listener,
        outstanding.clone(),
        token.clone(),
        tracker.clone(),
    ));
    tracker.spawn(rounds(ctx, keys, outstanding, token));
}

async fn rounds(
    ctx: Arc<Ctx>,
    keys: Arc<ProberKeys>,
    outstanding: Arc<Outstanding>,
    token: CancellationToken,
) {
    let p = ctx.config.probe.clone();
    let slots = Arc::new(Semaphore::new(p.concurrency));
    let mut next_full_round = Instant::now();
    loop {
        // A full round every interval; in between, relays that just uploaded their first
        // descriptor are tested at once, so a new relay is in the next vote.
        let full = Instant::now() >= next_full_round;
        if full {
            next_full_round = Instant::now() + p.interval;
        }
        let targets = ctx.lock().probe_targets(unix_now(), !full);
        // Spread a full round over half the interval, so the relays (and this process) see a
        // steady trickle of tests rather than a burst every interval.
        let spacing = if full && !targets.is_empty() {
            (p.interval / 2) / u32::try_from(targets.len()).unwrap_or(u32::MAX)
        } else {
            Duration::ZERO
        };
        let mut tasks = tokio::task::JoinSet::new();
        for target in targets {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let (ctx, keys, outstanding) = (ctx.clone(), keys.clone(), outstanding.clone());
            let (packets, timeout) = (p.packets, p.timeout);
            tasks.spawn(async move {
                let round = probe(keys, &outstanding, &target, packets, timeout).await;
                let label = match (round.handshake, round.passes()) {
                    (false, _) => "unreachable",
                    (true, false) => "lost",
                    (true, true) => "passed",
                };
                ctx.metrics.inc(PROBES, label);
                ctx.lock().record_probe(&target.identity, round);
                drop(slot);
            });
            if !spacing.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(spacing) => {}
                    () = token.cancelled() => return,
                }
            }
            if token.is_cancelled() {
                return;
            }
        }
        while tasks.join_next().await.is_some() {}
        let wait = next_full_round.saturating_duration_since(Instant::now());
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = ctx.new_relay.notified() => {}
            () = token.cancelled() => return,
        }
    }
}

/// One round of tests of one relay.
async fn probe(
    keys: Arc<ProberKeys>,
    outstanding: &Outstanding,
    target: &ProbeTarget,
    packets: u32,
    timeout: Duration,
) -> ProbeRound {
    let deadline = tokio::time::Instant::now() + timeout;
    let linked = tokio::time::timeout_at(deadline, async {
        let mut stream = TcpStream::connect(target.mix).await.ok()?;
        let _ = stream.set_nodelay(true);
        let transport = dial_handshake(&mut stream, &keys.link, &target.link_key)
            .await
            .ok()?;
        Some((stream, transport))
    })
    .await;
    let Ok(Some((mut stream, mut transport))) = linked else {
        return ProbeRound::unreachable();
    };
    let returns = Arc::new(Returns::default());
    // Building the packets is CPU work (two Sphinx hops each): off the runtime's workers,
    // which carry everyone's I/O.
    let built = {
        let (keys, target) = (keys.clone(), target.clone());
        tokio::task::spawn_blocking(move || {
            let sealed = keys.test_packets(&target, packets, &mut transport);
            (sealed, transport)
        })
        .await
    };
    let Ok((Some((bytes, ids)), _transport)) = built else {
        return ProbeRound::unreachable();
    };
    let sent = u32::try_from(ids.len()).unwrap_or(u32::MAX);
    {
        let mut rounds = outstanding.lock();
        for id in ids {
            rounds.insert(id, returns.clone());
        }
    }
    let first_send = Instant::now();
    let wrote = tokio::time::timeout_at(deadline, stream.write_all(&bytes)).await;
    if !matches!(wrote, Ok(Ok(()))) {
        forget(outstanding, &returns);
        return ProbeRound {
            handshake: true,
            sent,
            returned: 0,
            rate: None,
        };
    }
    loop {
        let back = returns.at.lock().map_or(0, |a| a.len());
        if back >= sent as usize {
            break;
        }
        if tokio::time::timeout_at(deadline, returns.arrived.notified())
            .await
            .is_err()
        {
            break;
        }
    }
    forget(outstanding, &returns);
    let at = returns.at.lock().map(|a| a.clone()).unwrap_or_default();
    let returned = u32::try_from(at.len()).unwrap_or(u32::MAX);
    let rate = at.iter().max().map(|last| {
        let secs = last
            .saturating_duration_since(first_send)
            .as_secs_f64()
            .max(1e-3);
        (f64::from(returned) / secs).min(f64::from(u32::MAX)) as u32
    });
    ProbeRound {
        handshake: true,
        sent,
        returned,
        rate,
    }
}

impl ProberKeys {
    /// One round's test packets for `target`: `packets` Sphinx packets routed through it and
    /// back to the prober, each sealed on `transport`, concatenated; and their ids. Public
    /// for the measurement-cost benchmark.
    pub fn test_packets(
        &self,
        target: &ProbeTarget,
        packets: u32,
        transport: &mut Transport,
    ) -> Option<(Vec<u8>, Vec<SurbId>)> {
        let route = [
            RouteHop {
                address: Address(target.identity.0),
                sphinx_key: PublicKey::from(target.sphinx_key),
            },
            self.hop(),
        ];
        let delays = [Duration::ZERO; 2];
        let content = Content::Cover.encode().ok()?;
        let mut rng = rand::rng();
        let mut sealed = Vec::with_capacity(packets as usize * SEALED_FRAME_LEN);
        let mut ids = Vec::with_capacity(packets as usize);
        for _ in 0..packets {
            let mut id: SurbId = rand::random();
            id[0] |= 1;
            let (packet, envelope) = build_packet_with_envelope(
                &mut rng,
                &route,
                &delays,
                Address(self.address),
                id,
                &content,
                &[None, None],
            )
            .ok()?;
            let frame = Frame::Packet {
                key_epoch: target.key_epoch,
                packet,
                envelope,
            }
            .encode()
            .ok()?;
            sealed.extend_from_slice(&transport.seal_frame(&frame).ok()?[..]);
            ids.push(id);
        }
        Some((sealed, ids))
    }

    /// The id of a test packet a relay delivered in `frame` (an opened frame), if it is one
    /// addressed to this prober. Public for the benchmark.
    pub fn returned_id(&self, frame: &[u8]) -> Option<SurbId> {
        let Ok(Frame::Packet { packet, .. }) = Frame::decode(frame) else {
            return None;
        };
        let opened = OpenedPacket::open(packet.as_bytes(), &self.sphinx).ok()?;
        match opened.process(Duration::ZERO) {
            Ok(HopOutput::Final(delivery)) if delivery.destination.0 == self.address => {
                Some(delivery.surb_id)
            }
            _ => None,
        }
    }

    /// The prober's link key (for the benchmark's relay side).
    pub fn link_public(&self) -> murmur_protocol::link::LinkPublic {
        self.link.public()
    }

    /// The prober's link secret (for the benchmark's handshake).
    pub fn link_secret(&self) -> &LinkSecret {
        &self.link
    }
}

/// Drops a round's ids that never came back.
fn forget(outstanding: &Outstanding, returns: &Arc<Returns>) {
    outstanding.lock().retain(|_, r| !Arc::ptr_eq(r, returns));
}

/// Accepts relay links delivering test packets.
async fn listen(
    ctx: Arc<Ctx>,
    keys: Arc<ProberKeys>,
    listener: TcpListener,
    outstanding: Arc<Outstanding>,
    token: CancellationToken,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(MAX_INBOUND_LINKS));
    let handshake_timeout = ctx.config.probe.timeout;
    let idle = ctx.config.probe.interval * 2 + handshake_timeout;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = token.cancelled() => return,
        };
        let Ok((mut stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            ctx.metrics.inc(PROBES, "inbound_full");
            continue;
        };
        let (ctx, keys, outstanding, token) = (
            ctx.clone(),
            keys.clone(),
            outstanding.clone(),
            token.clone(),
        );
        tracker.spawn(async move {
            let _slot = slot;
            let handshake =
                tokio::time::timeout(handshake_timeout, accept_handshake(&mut stream, &keys.link))
                    .await;
            let Ok(Ok(mut transport)) = handshake else {
                ctx.metrics.inc(PROBES, "inbound_handshake");
                return;
            };
            loop {
                let read = tokio::select! {
                    r = tokio::time::timeout(idle, take::<SEALED_FRAME_LEN, _>(&mut stream)) => r,
                    () = token.cancelled() => return,
                };
                let Ok(Ok(sealed)) = read else {
                    return;
                };
                let Ok(frame) = transport.open_frame(&sealed) else {
                    ctx.metrics.inc(PROBES, "inbound_bad_frame");
                    return;
                };
                if !take_packet(&keys, &outstanding, &frame[..]) {
                    ctx.metrics.inc(PROBES, "inbound_not_ours");
                }
            }
        });
    }
}

/// Opens a frame a relay delivered; whether it was one of our outstanding test packets.
fn take_packet(keys: &ProberKeys, outstanding: &Outstanding, frame: &[u8]) -> bool {
    keys.returned_id(frame)
        .is_some_and(|id| outstanding.returned(&id))
}
