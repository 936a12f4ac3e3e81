//! The one step every relay takes for every Sphinx packet, whoever drives it: the relay's
//! worker threads, the in-process test networks and the benches (and the simulator, once it
//! processes packets).
//!
//! ```text
//! open (DH + header MAC) → replay check-and-insert → process (blinding + Lioness)
//!   → peel the payment envelope (keyed by the replay tag) → this hop's ticket slot
//! ```
//!
//! [`process`] does it in that order, so a replayed or forged packet costs one
//! Diffie–Hellman and nothing more. The caller owns the replay state ([`ReplayCheck`]: a
//! [`ReplayFilter`], or a closure over the relay's persistent tag set) and decides what a
//! ticket is worth; the step only reads the slot and, given this relay as the [`Payee`], turns
//! it into the full [`Ticket`] ([`Processed::ticket`]).
//!
//! # The final-hop rule
//!
//! A forward hop learns from its Sphinx-authenticated delay field whether the sender built the
//! packet's envelope ([`crate::packet::HopOutput::Forward`]'s `envelope_authenticated`): a hop
//! told yes drops a packet whose envelope layer fails ([`HopError::Envelope`]). The last hop
//! has no delay field and cannot tell a client's envelope from the random one an exit sends
//! with a reply ([`crate::envelope`]), so it always tries the MAC and treats a failure as
//! "no ticket", never as a reason to drop what it delivers.

use std::time::Duration;

use crate::Error;
use crate::directory::IdentityKey;
use crate::envelope::{Envelope, EnvelopeKey, SlotTicket};
use crate::packet::{Address, FinalDelivery, HopOutput, OpenedPacket, Packet, ReplayTag};
use crate::replay::ReplayFilter;
use crate::ticket::Ticket;

pub use crate::packet::StaticSecret;

/// Why a hop refused a packet. Each variant is the hop's verdict on its input; the wrapped
/// [`Error`] says what exactly was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HopError {
    /// The packet has the wrong length, a non-canonical group element, or a header MAC that
    /// does not verify under this hop's key (tampered, or sealed for another relay or epoch).
    #[error("the packet does not open under this hop's key: {0}")]
    Open(Error),
    /// The packet's replay tag was seen before under this key: a replay (or a false positive
    /// of the filter, which the sender's retransmission repairs).
    #[error("the packet was seen before under this key (a replay)")]
    Replay,
    /// The header verified but its layer cannot be removed (malformed routing information, a
    /// foreign Sphinx version).
    #[error("the packet's layer cannot be processed: {0}")]
    Process(Error),
    /// A forward hop told to enforce the payment envelope found its layer altered (by an
    /// earlier hop), belonging to another packet, or with a malformed slot.
    #[error("the packet's payment envelope fails this hop's check: {0}")]
    Envelope(Error),
}

impl HopError {
    /// A short stable label for metrics (`dropped{reason="..."}`); the same labels the
    /// relay used before the step moved here.
    pub fn label(&self) -> &'static str {
        match self {
            HopError::Open(e) | HopError::Process(e) | HopError::Envelope(e) => e.label(),
            HopError::Replay => "replay",
        }
    }
}

/// The replay tags a hop has seen under one Sphinx key.
pub trait ReplayCheck {
    /// Records `tag`; `true` if it was (probably) seen before, and the packet must be dropped.
    fn check_and_insert(&mut self, tag: &ReplayTag) -> bool;
}

impl ReplayCheck for ReplayFilter {
    fn check_and_insert(&mut self, tag: &ReplayTag) -> bool {
        ReplayFilter::check_and_insert(self, tag)
    }
}

/// A closure that records a tag and says whether it was seen: a relay's persistent tag set
/// behind a lock, or a test's "never seen".
impl<F: FnMut(&ReplayTag) -> bool> ReplayCheck for F {
    fn check_and_insert(&mut self, tag: &ReplayTag) -> bool {
        self(tag)
    }
}

/// What a hop needs to process packets under one of its Sphinx keys.
#[derive(Clone, Copy)]
pub struct HopKey<'a> {
    /// The hop's Sphinx secret for the packet's key epoch.
    pub sphinx: &'a StaticSecret,
    /// Forward delays the header asks for above this are clamped to it.
    pub max_delay: Duration,
}

/// This relay as the recipient of the tickets its slots carry: its identity and the payment
/// commitment it published for the key's epoch (a slot leaves both out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Payee {
    pub identity: IdentityKey,
    pub commitment: [u8; 32],
}

/// What the hop does with the packet.
#[derive(Debug)]
pub enum Action {
    /// Hold the packet for `delay`, then send it and its peeled envelope to `next_hop`.
    Forward {
        next_hop: Address,
        delay: Duration,
        /// The header asked for more than [`HopKey::max_delay`].
        delay_clamped: bool,
        packet: Packet,
        /// The payment envelope with this hop's layer peeled.
        envelope: Envelope,
    },
    /// This hop is the packet's last: deliver the payload.
    Deliver(FinalDelivery),
}

/// A packet this hop accepted.
#[derive(Debug)]
pub struct Processed {
    pub action: Action,
    /// The ticket the sender put in this hop's slot, if any.
    pub slot: Option<SlotTicket>,
}

impl Processed {
    /// The full ticket in this hop's slot, made out to `payee`. Its signature verifies only if
    /// the payer signed it for that identity and commitment ([`Ticket::verify_signature`]).
    pub fn ticket(&self, payee: &Payee) -> Option<Ticket> {
        self.slot
            .map(|slot| slot.into_ticket(payee.identity, payee.commitment))
    }
}

/// One hop's step on `packet` and its payment `envelope` (see the module documentation).
///
/// The replay tag goes into `replay` as soon as the header verifies, before the rest of the
/// work: a packet refused later (a forward hop's envelope that fails) stays refused if it
/// comes again.
pub fn process(
    key: HopKey<'_>,
    packet: &Packet,
    mut envelope: Envelope,
    replay: &mut impl ReplayCheck,
) -> Result<Processed, HopError> {
    let opened = OpenedPacket::open(packet.as_bytes(), key.sphinx).map_err(HopError::Open)?;
    let tag = opened.replay_tag();
    if replay.check_and_insert(&tag) {
        return Err(HopError::Replay);
    }
    let envelope_key = EnvelopeKey::from_replay_tag(&tag);
    match opened.process(key.max_delay).map_err(HopError::Process)? {
        HopOutput::Forward {
            next_hop,
            delay,
            delay_clamped,
            envelope_authenticated,
            packet,
        } => {
            let slot = envelope
                .peel_in_place(&envelope_key, envelope_authenticated)
                .map_err(HopError::Envelope)?;
            Ok(Processed {
                action: Action::Forward {
                    next_hop,
                    delay,
                    delay_clamped,
                    packet,
                    envelope,
                },
                slot,
            })
        }
        HopOutput::Final(delivery) => {
            // The final-hop rule: an envelope that fails here is a reply's random one, unpaid.
            let slot = envelope.peel_in_place(&envelope_key, true).ok().flatten();
            Ok(Processed {
                action: Action::Deliver(delivery),
                slot,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::tests::keyed_route;
    use crate::packet::{RouteHop, SurbId, build_packet_with_envelope, recover_plaintext};
    use crate::surb::build_reply_block_with_id;
    use crate::ticket::TicketFields;
    use ed25519_dalek::SigningKey;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha20Rng;

    /// A packet over `route` with `delays`, to address 0, with no tickets.
    fn unpaid_packet(
        rng: &mut ChaCha20Rng,
        route: &[RouteHop],
        delays: &[Duration],
    ) -> (Packet, Envelope) {
        let slots = vec![None; route.len()];
        let to = Address([0; 32]);
        build_packet_with_envelope(rng, route, delays, to, [0; 16], b"x", &slots).unwrap()
    }

    fn key(sphinx: &StaticSecret) -> HopKey<'_> {
        HopKey {
            sphinx,
            max_delay: Duration::from_secs(60),
        }
    }

    fn never_seen(_: &ReplayTag) -> bool {
        false
    }

    /// A ticket really signed for `payee`, in its slot form.
    fn signed_slot(rng: &mut ChaCha20Rng, payer: &SigningKey, payee: &Payee) -> SlotTicket {
        let fields = TicketFields {
            recipient: payee.identity,
            face_value: 1_000,
            win_ratio: u64::MAX / 4,
            nonce: rng.random(),
            issued: 1_800_000_000,
            expiry: 1_800_003_600,
            commitment: payee.commitment,
        };
        SlotTicket::from_ticket(&Ticket::sign(fields, payer)).unwrap()
    }

    #[test]
    fn each_hop_forwards_with_its_delay_and_takes_its_own_ticket() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let (route, secrets) = keyed_route(&mut rng, 4);
        let payees: Vec<Payee> = (0..4u8)
            .map(|i| Payee {
                identity: IdentityKey([i + 1; 32]),
                commitment: [i + 100; 32],
            })
            .collect();
        let payer = SigningKey::from_bytes(&[7; 32]);
        let slots: Vec<Option<SlotTicket>> = payees
            .iter()
            .map(|p| Some(signed_slot(&mut rng, &payer, p)))
            .collect();
        let delays = [3, 5, 7, 0].map(Duration::from_millis);
        let destination = Address([9; 32]);
        let (mut packet, mut envelope) = build_packet_with_envelope(
            &mut rng,
            &route,
            &delays,
            destination,
            [4; 16],
            b"through four hops",
            &slots,
        )
        .unwrap();
        for (i, secret) in secrets.iter().enumerate() {
            let mut filter = ReplayFilter::new(100, 1e-6).unwrap();
            let out = process(key(secret), &packet, envelope.clone(), &mut filter).unwrap();
            assert_eq!(out.slot, slots[i]);
            let ticket = out.ticket(&payees[i]).unwrap();
            ticket.verify_signature().unwrap();
            // Another relay's identity does not make its ticket valid.
            assert!(
                out.ticket(&payees[(i + 1) % 4])
                    .unwrap()
                    .verify_signature()
                    .is_err()
            );
            match out.action {
                Action::Forward {
                    next_hop,
                    delay,
                    delay_clamped,
                    packet: p,
                    envelope: e,
                } => {
                    assert!(i < 3);
                    assert_eq!(next_hop, route[i + 1].address);
                    assert_eq!(delay, delays[i]);
                    assert!(!delay_clamped);
                    (packet, envelope) = (p, e);
                }
                Action::Deliver(d) => {
                    assert_eq!(i, 3);
                    assert_eq!(d.destination, destination);
                    assert_eq!(d.surb_id, [4; 16]);
                    assert_eq!(
                        recover_plaintext(&d.payload[..]).unwrap(),
                        b"through four hops"
                    );
                }
            }
        }
    }

    #[test]
    fn a_replay_is_refused_after_one_open() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let (route, secrets) = keyed_route(&mut rng, 2);
        let (packet, envelope) = unpaid_packet(&mut rng, &route, &[Duration::ZERO; 2]);
        let mut filter = ReplayFilter::new(100, 1e-6).unwrap();
        assert!(process(key(&secrets[0]), &packet, envelope.clone(), &mut filter).is_ok());
        let again = process(key(&secrets[0]), &packet, envelope, &mut filter);
        assert_eq!(again.as_ref().err(), Some(&HopError::Replay));
        assert_eq!(again.err().map(|e| e.label()), Some("replay"));
        assert_eq!(filter.len(), 1);
    }

    #[test]
    fn a_foreign_key_fails_to_open_and_records_no_tag() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let (route, _) = keyed_route(&mut rng, 2);
        let (packet, envelope) = unpaid_packet(&mut rng, &route, &[Duration::ZERO; 2]);
        let other = StaticSecret::random_from_rng(&mut rng);
        let mut recorded = 0;
        let mut count = |_: &ReplayTag| {
            recorded += 1;
            false
        };
        let err = process(key(&other), &packet, envelope, &mut count).unwrap_err();
        assert_eq!(err, HopError::Open(Error::HeaderMac));
        assert_eq!(err.label(), "header_mac");
        assert_eq!(recorded, 0, "a tag before the MAC verified means nothing");
    }

    #[test]
    fn a_forward_hop_drops_an_altered_envelope_but_remembers_the_packet() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let (route, secrets) = keyed_route(&mut rng, 3);
        let (packet, envelope) = unpaid_packet(&mut rng, &route, &[Duration::ZERO; 3]);
        let mut bytes = *envelope.as_bytes();
        bytes[200] ^= 1;
        let mut filter = ReplayFilter::new(100, 1e-6).unwrap();
        let err = process(
            key(&secrets[0]),
            &packet,
            Envelope::from_bytes(bytes),
            &mut filter,
        )
        .unwrap_err();
        assert_eq!(err, HopError::Envelope(Error::EnvelopeMac));
        assert_eq!(err.label(), "envelope_mac");
        // The honest envelope cannot be sent after it: the packet is spent at this hop.
        let again = process(key(&secrets[0]), &packet, envelope, &mut filter);
        assert_eq!(again.err(), Some(HopError::Replay));
    }

    /// A reply over a reply block carries the exit's random envelope: no forward hop enforces
    /// it, and the last hop delivers it unpaid.
    #[test]
    fn a_reply_with_a_random_envelope_is_delivered_unpaid() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let (route, secrets) = keyed_route(&mut rng, 4);
        let client = Address([0xc1; 32]);
        let id: SurbId = [8; 16];
        let delays = [2, 4, 6, 0].map(Duration::from_millis);
        let (block, reply_key) =
            build_reply_block_with_id(&mut rng, &route, &delays, client, 1, id).unwrap();
        let reply = block.use_block(b"an answer").unwrap();
        assert_eq!(reply.first_hop, route[0].address);
        let (mut packet, mut envelope) = (reply.packet, Envelope::random(&mut rng));
        for (i, secret) in secrets.iter().enumerate() {
            let out = process(key(secret), &packet, envelope, &mut never_seen).unwrap();
            assert_eq!(out.slot, None);
            match out.action {
                Action::Forward {
                    next_hop,
                    delay,
                    packet: p,
                    envelope: e,
                    ..
                } => {
                    assert_eq!(next_hop, route[i + 1].address);
                    assert_eq!(delay, delays[i]);
                    (packet, envelope) = (p, e);
                }
                Action::Deliver(d) => {
                    assert_eq!(i, 3);
                    assert_eq!((d.destination, d.surb_id), (client, id));
                    assert_eq!(reply_key.open(&d.payload[..]).unwrap(), b"an answer");
                    return;
                }
            }
        }
        panic!("the reply never reached its last hop");
    }

    #[test]
    fn delays_above_the_hops_maximum_are_clamped() {
        let mut rng = ChaCha20Rng::seed_from_u64(6);
        let (route, secrets) = keyed_route(&mut rng, 2);
        let (packet, envelope) = unpaid_packet(
            &mut rng,
            &route,
            &[Duration::from_secs(100), Duration::ZERO],
        );
        let short = HopKey {
            sphinx: &secrets[0],
            max_delay: Duration::from_secs(2),
        };
        let out = process(short, &packet, envelope, &mut never_seen).unwrap();
        let Action::Forward {
            delay,
            delay_clamped,
            ..
        } = out.action
        else {
            panic!("a two-hop packet's first hop forwards");
        };
        assert_eq!((delay, delay_clamped), (Duration::from_secs(2), true));
    }
}
