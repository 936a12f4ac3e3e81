//! Paying relays: tickets in each packet's envelope for the hops it crosses, and in-band
//! payments to the gateway for the frames it handles.

use std::collections::VecDeque;

use rand::CryptoRng;

use super::ClientSession;
use crate::control::Control;
use crate::directory::{IdentityKey, UnixTime};
use crate::envelope::SlotTicket;
use crate::frame::Frame;
use crate::payer::{PayeeInfo, Payer};
use crate::time::Instant;

/// The payer and what it needs from outside: the wall clock, and the control frames for the
/// gateway it produced.
pub(super) struct Payment {
    pub(super) payer: Payer,
    /// Unix time at `anchor` on the session's clock (the driver reports both).
    anchor: Instant,
    unix_at_anchor: UnixTime,
    /// Payments for the gateway, sent before the next packet (by the next
    /// [`ClientSession::poll_transmit`]: they are due at once).
    to_gateway: VecDeque<Frame>,
}

impl Payment {
    fn unix_now(&self, now: Instant) -> UnixTime {
        self.unix_at_anchor
            .saturating_add(now.saturating_duration_since(self.anchor).as_secs())
    }
}

impl ClientSession {
    /// Pays relays with `payer` from now on. `unix_now` is the wall-clock time (Unix seconds)
    /// at `now`: tickets carry issue and expiry times.
    pub fn set_payer(&mut self, payer: Payer, now: Instant, unix_now: UnixTime) {
        self.payment = Some(Payment {
            payer,
            anchor: now,
            unix_at_anchor: unix_now,
            to_gateway: VecDeque::new(),
        });
    }

    /// What the ledger says of the pot now (see [`Payer::set_pot`]), and the wall clock at
    /// `now`.
    pub fn set_pot(&mut self, balance: u64, face_cap: u64, now: Instant, unix_now: UnixTime) {
        if let Some(p) = &mut self.payment {
            p.payer.set_pot(balance, face_cap);
            p.anchor = now;
            p.unix_at_anchor = unix_now;
        }
    }

    /// The payer, if the session pays.
    pub fn payer(&self) -> Option<&Payer> {
        self.payment.as_ref().map(|p| &p.payer)
    }

    /// Ends paying and hands back the payer, with what it still owes each relay, for the
    /// client's next session. Payments for this session's gateway not yet sent are dropped
    /// with it (its gateway is being left).
    pub fn take_payer(&mut self) -> Option<Payer> {
        self.payment.take().map(|p| p.payer)
    }

    /// A payment for the gateway waiting to go out.
    pub(super) fn queued_gateway_payment(&mut self) -> Option<Frame> {
        self.payment.as_mut()?.to_gateway.pop_front()
    }

    /// Records one frame the gateway handles for this session and queues its payment if one
    /// is due.
    pub(super) fn gateway_frame<R: CryptoRng + ?Sized>(&mut self, now: Instant, rng: &mut R) {
        self.stats.gateway_frames += 1;
        let Some(p) = &mut self.payment else {
            return;
        };
        let gateway = &self.gateway;
        p.payer.carried(gateway.identity, 1);
        let Some(commitment) = gateway.payment_commitment(self.consensus.epoch) else {
            return;
        };
        let unix_now = p.unix_now(now);
        if let Some(ticket) =
            p.payer
                .gateway_payment(&PayeeInfo::of(gateway, commitment), unix_now, rng)
        {
            self.stats.gateway_tickets += 1;
            let payment = match p.payer.cosign(&ticket, gateway.chain_address.as_ref()) {
                Some(cosignature) => Control::CosignedPayment {
                    ticket,
                    cosignature,
                },
                None => Control::Payment { ticket },
            };
            p.to_gateway.push_back(Frame::Control(payment.encode()));
        }
    }

    /// Records that each of `relays` carried one packet (a reply or acknowledgement that
    /// came back over them).
    pub(super) fn carried(&mut self, relays: &[IdentityKey]) {
        if let Some(p) = &mut self.payment {
            for r in relays {
                p.payer.carried(*r, 1);
            }
        }
    }

    /// The envelope slots for a packet over `route` whose hops are `payees`: every hop but
    /// the gateway carried one packet, and gets a ticket if one is due.
    pub(super) fn pay_hops<R: CryptoRng + ?Sized>(
        &mut self,
        payees: &[IdentityKey],
        now: Instant,
        rng: &mut R,
    ) -> Vec<Option<SlotTicket>> {
        let Some(p) = &mut self.payment else {
            return vec![None; payees.len()];
        };
        let epoch = self.consensus.epoch;
        let unix_now = p.unix_now(now);
        let mut slots = Vec::with_capacity(payees.len());
        for id in payees {
            let relay = self.consensus.relay(id);
            let commitment = relay.and_then(|r| r.payment_commitment(epoch));
            let (Some(relay), Some(commitment)) = (relay, commitment) else {
                slots.push(None);
                continue;
            };
            if relay.identity == self.gateway.identity {
                slots.push(None);
                continue;
            }
            p.payer.carried(relay.identity, 1);
            let ticket = p
                .payer
                .ticket_for(&PayeeInfo::of(relay, commitment), unix_now, rng)
                .and_then(|t| match p.payer.cosign(&t, relay.chain_address.as_ref()) {
                    Some(c) => SlotTicket::cosigned(&t, c).ok(),
                    None => SlotTicket::from_ticket(&t).ok(),
                });
            self.stats.hop_tickets += u64::from(ticket.is_some());
            slots.push(ticket);
        }
        slots
    }
}
