//! Relay loop cover (Loopix λ_M): the relay sends packets through all three layers back to
//! itself. They make the relay's output look busy when it is not, and a loop that does not
//! return reveals a relay that drops packets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant as StdInstant};

use murmur_protocol::cover::RelayLoopCover;
use murmur_protocol::delay::ExpDelay;
use murmur_protocol::directory::Consensus;
use murmur_protocol::directory::path::{PathRules, PathSelector};
use murmur_protocol::frame::Frame;
use murmur_protocol::packet::{Address, RouteHop, SurbId, build_packet_with_envelope};
use murmur_protocol::payload::Content;
use murmur_protocol::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::keys::KeyRing;
use crate::links::Links;
use crate::metrics as m;

/// Loops in flight at once; more are not sent until some return or expire.
const MAX_OUTSTANDING: usize = 10_000;

/// Loops sent and not yet back.
#[derive(Default)]
pub struct Outstanding {
    sent: Mutex<HashMap<SurbId, StdInstant>>,
}

impl Outstanding {
    /// Whether `id` is one of our loops coming back; counts it if so.
    pub fn returned(&self, id: &SurbId) -> bool {
        let sent = self.sent.lock().ok().and_then(|mut s| s.remove(id));
        match sent {
            Some(at) => {
                metrics::counter!(m::LOOPS, "result" => "returned").increment(1);
                metrics::histogram!("murmur_relay_loop_seconds").record(at.elapsed().as_secs_f64());
                true
            }
            None => false,
        }
    }

    fn expire(&self, older_than: Duration) {
        if let Ok(mut s) = self.sent.lock() {
            let before = s.len();
            s.retain(|_, at| at.elapsed() < older_than);
            let lost = before - s.len();
            if lost > 0 {
                metrics::counter!(m::LOOPS, "result" => "lost").increment(lost as u64);
            }
        }
    }
}

/// Sends loops at the consensus's λ_M until shutdown.
pub async fn run(
    me: Address,
    keys: Arc<KeyRing>,
    links: Arc<Links>,
    consensus: impl Fn() -> Option<Arc<Consensus>>,
    outstanding: Arc<Outstanding>,
    rules: PathRules,
    shutdown: CancellationToken,
) {
    let origin = StdInstant::now();
    let now = || Instant::from_elapsed(origin.elapsed());
    // ThreadRng is not Send: take it afresh where needed, never across an await.
    let mut cover: Option<(f64, RelayLoopCover)> = None;
    loop {
        let Some(c) = consensus() else {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
            }
        };
        let rate = c.params.lambda_m;
        if cover.as_ref().is_none_or(|(r, _)| *r != rate) {
            cover = RelayLoopCover::new(rate, now(), &mut rand::rng())
                .ok()
                .map(|s| (rate, s));
        }
        let wait = cover
            .as_ref()
            .and_then(|(_, s)| s.poll_timeout())
            .map_or(Duration::from_secs(1), |t| {
                t.saturating_duration_since(now())
            })
            .min(Duration::from_secs(1));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let Some((_, schedule)) = cover.as_mut() else {
            continue;
        };
        let mean = c.params.mean_hop_delay();
        outstanding.expire(mean * 60 + Duration::from_secs(30));
        let mut rng = rand::rng();
        while schedule.poll_transmit(now(), &mut rng) {
            send_loop(me, &keys, &links, &c, &outstanding, &mut rng, mean, rules);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn send_loop(
    me: Address,
    keys: &KeyRing,
    links: &Arc<Links>,
    consensus: &Consensus,
    outstanding: &Outstanding,
    rng: &mut rand::rngs::ThreadRng,
    mean_delay: Duration,
    rules: PathRules,
) {
    if outstanding
        .sent
        .lock()
        .map_or(true, |s| s.len() >= MAX_OUTSTANDING)
    {
        return;
    }
    let epoch = consensus.epoch;
    let Some(my_key) = keys.get(epoch) else {
        return;
    };
    let selector = PathSelector::new(consensus, rules);
    let avoid: Vec<_> = consensus
        .relay(&murmur_protocol::directory::IdentityKey(me.0))
        .into_iter()
        .collect();
    let Ok(path) = selector.mix_path(rng, &avoid) else {
        metrics::counter!(m::LOOPS, "result" => "no_path").increment(1);
        return;
    };
    let mut route = Vec::with_capacity(4);
    for r in path {
        match r.route_hop(epoch) {
            Ok(h) => route.push(h),
            Err(_) => return,
        }
    }
    route.push(RouteHop {
        address: me,
        sphinx_key: my_key.public,
    });
    let Ok(delay) = ExpDelay::with_mean(mean_delay) else {
        return;
    };
    let delays = delay.sample_n(rng, route.len());
    let mut id: SurbId = rand::random();
    id[0] |= 1; // never the all-zero "no SURB" id
    let Ok(content) = Content::Cover.encode() else {
        return;
    };
    // Loop cover pays no one: an envelope with every slot empty, which each hop verifies
    // like a client's (so cover and real packets look alike to the mixes too).
    let slots = vec![None; route.len()];
    let Ok((packet, envelope)) =
        build_packet_with_envelope(rng, &route, &delays, me, id, &content, &slots)
    else {
        return;
    };
    if let Ok(mut s) = outstanding.sent.lock() {
        s.insert(id, StdInstant::now());
    }
    metrics::counter!(m::LOOPS, "result" => "sent").increment(1);
    links.send(
        route[0].address,
        &Frame::Packet {
            key_epoch: epoch,
            packet,
            envelope,
        },
        None,
    );
}
