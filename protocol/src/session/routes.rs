//! Paths and packets: mix routes that avoid suspects, sealing a packet with its payment
//! envelope, and the two kinds of cover (drop and loop).

use std::time::Duration;

use rand::{CryptoRng, Rng, RngExt};

use super::{ClientSession, SessionError};
use crate::cover::{ClientCover, ClientRates};
use crate::delay::ExpDelay;
use crate::directory::path::ExitTarget;
use crate::directory::{ConsensusRelay, Epoch, IdentityKey, NetworkParams};
use crate::envelope::SlotTicket;
use crate::frame::Frame;
use crate::packet::{Address, RouteHop, SurbId, build_packet_with_envelope};
use crate::payload::Content;
use crate::time::Instant;

/// A packet chosen and waiting for its send tick.
pub struct Queued {
    pub(super) job: SealJob,
}

/// A packet whose every choice is made (route, delays, destination, content, tickets) and
/// that only needs its Sphinx header and envelope built: the one costly step, which needs
/// nothing of the session, so a driver can run it on another core
/// ([`crate::session::ClientSession::build_ahead_job`]).
#[derive(Debug, Clone)]
pub struct SealJob {
    route: Vec<RouteHop>,
    delays: Vec<Duration>,
    destination: Address,
    surb_id: SurbId,
    plaintext: Vec<u8>,
    slots: Vec<Option<SlotTicket>>,
    key_epoch: Epoch,
}

impl SealJob {
    /// Builds the packet and wraps it for the gateway. Fails only on a shape the session
    /// never makes (a route longer than the envelope, a payload too large): a bug.
    pub fn build<R: CryptoRng + ?Sized>(self, rng: &mut R) -> crate::Result<Frame> {
        let next_hop = self
            .route
            .first()
            .map(|h| h.address)
            .ok_or_else(|| crate::Error::Path("a packet with an empty route".into()))?;
        let (packet, envelope) = build_packet_with_envelope(
            rng,
            &self.route,
            &self.delays,
            self.destination,
            self.surb_id,
            &self.plaintext,
            &self.slots,
        )?;
        Ok(Frame::Forward {
            next_hop,
            key_epoch: self.key_epoch,
            packet,
            envelope,
        })
    }
}

/// The cover schedules and delay distribution the published parameters ask for.
pub(super) fn schedules<R: Rng + ?Sized>(
    p: &NetworkParams,
    now: Instant,
    rng: &mut R,
) -> super::Result<(ClientCover<Queued>, ExpDelay)> {
    let params = |e: crate::Error| SessionError::Params(e.to_string());
    let cover = ClientCover::new(
        ClientRates {
            lambda_p: p.lambda_p,
            lambda_l: p.lambda_l,
            lambda_d: p.lambda_d,
        },
        now,
        rng,
    )
    .map_err(params)?;
    Ok((
        cover,
        ExpDelay::with_mean(p.mean_hop_delay()).map_err(params)?,
    ))
}

impl ClientSession {
    /// A fresh `[L1, L2, L3]` avoiding the gateway, `also` and suspected relays; the hops
    /// and who they are.
    pub(super) fn mix_route<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        also: Option<&ConsensusRelay>,
    ) -> crate::Result<(Vec<RouteHop>, Vec<IdentityKey>)> {
        let suspects = self.suspected();
        let selector = self.selector().excluding(&suspects);
        let mut avoid = vec![&self.gateway];
        avoid.extend(also);
        let epoch = self.consensus.epoch;
        let path = selector.mix_path(rng, &avoid)?;
        let hops = path
            .iter()
            .map(|r| r.route_hop(epoch))
            .collect::<crate::Result<_>>()?;
        Ok((hops, path.iter().map(|r| r.identity).collect()))
    }

    /// A packet over `route` (whose hops are `payees`), its hops paid, ready to be built
    /// and wrapped for the gateway.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn seal<R: CryptoRng + ?Sized>(
        &mut self,
        rng: &mut R,
        now: Instant,
        route: Vec<RouteHop>,
        payees: &[IdentityKey],
        delays: Vec<Duration>,
        destination: Address,
        surb_id: SurbId,
        content: &Content,
    ) -> crate::Result<SealJob> {
        // Encoded before paying: a content that cannot be encoded pays no one.
        let plaintext = content.encode()?;
        let slots = self.pay_hops(payees, now, rng);
        Ok(SealJob {
            route,
            delays,
            destination,
            surb_id,
            plaintext,
            slots,
            key_epoch: self.consensus.epoch,
        })
    }

    /// Drop cover: a full-route packet to a random exit, which discards it.
    pub(super) fn drop_cover<R: CryptoRng + ?Sized>(
        &mut self,
        now: Instant,
        rng: &mut R,
    ) -> crate::Result<SealJob> {
        let selector = self.selector();
        let target = selector.choose_exit(rng, ExitTarget::HostPort(443), &[&self.gateway]);
        let last = match target {
            Ok(r) => r.clone(),
            Err(_) => self.gateway.clone(),
        };
        let (mut route, mut payees) = self.mix_route(rng, Some(&last))?;
        route.push(last.route_hop(self.consensus.epoch)?);
        payees.push(last.identity);
        let delays = self.delay.sample_n(rng, route.len());
        self.seal(
            rng,
            now,
            route,
            &payees,
            delays,
            last.address(),
            [0; 16],
            &Content::Cover,
        )
    }

    /// A fresh SURB identifier: tagged ([`crate::delivery`]) if the session has tag keys.
    pub(super) fn mint_surb_id<R: CryptoRng + ?Sized>(&self, rng: &mut R) -> SurbId {
        match &self.config.delivery_tags {
            Some(tags) => tags.mint(rng),
            None => loop {
                let id: SurbId = rng.random();
                if id != [0; crate::SURB_ID_LEN] {
                    return id;
                }
            },
        }
    }

    /// Loop cover: a packet through the mixes back to this client via its gateway.
    pub(super) fn loop_cover<R: CryptoRng + ?Sized>(
        &mut self,
        now: Instant,
        rng: &mut R,
    ) -> crate::Result<SealJob> {
        let (mut route, mut payees) = self.mix_route(rng, None)?;
        route.push(self.gateway.route_hop(self.consensus.epoch)?);
        payees.push(self.gateway.identity);
        let delays = self.delay.sample_n(rng, route.len());
        let id = self.mint_surb_id(rng);
        let job = self.seal(
            rng,
            now,
            route,
            &payees,
            delays,
            self.config.address,
            id,
            &Content::Cover,
        )?;
        self.loops.insert(id, now);
        Ok(job)
    }

    /// When the oldest loop still out is counted missing.
    pub(super) fn loop_deadline(&self) -> Option<Instant> {
        self.loops
            .values()
            .min()
            .map(|sent| *sent + self.config.loop_timeout)
    }

    /// Counts loops not back within `loop_timeout` missing.
    pub(super) fn expire_loops(&mut self, now: Instant) {
        let timeout = self.config.loop_timeout;
        let before = self.loops.len();
        self.loops
            .retain(|_, sent| now.saturating_duration_since(*sent) < timeout);
        self.stats.loops_missing += (before - self.loops.len()) as u64;
    }
}
