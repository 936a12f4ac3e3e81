//! Sphinx packets: building them over a route, and processing one hop.
//!
//! Every packet is [`PACKET_SIZE`] bytes: a 348-byte Sphinx header and a 2048-byte payload.
//! A hop first *opens* a packet ([`OpenedPacket::open`]): one Diffie–Hellman and the header MAC.
//! Only then is the replay tag trustworthy, so the driver checks it against its
//! [`crate::replay::ReplayFilter`] before paying for the rest ([`OpenedPacket::process`]):
//! blinding (the second scalar multiplication) and the Lioness pass over the payload.
//!
//! # The envelope flag in the delay field
//!
//! Each forward hop's delay (nanoseconds, inside the MAC-protected routing information) also
//! carries one bit for the payment envelope ([`crate::envelope`]): its lowest bit says whether
//! the sender built a valid envelope for the packet, so the hop must enforce the envelope's
//! MAC ([`HopOutput::Forward::envelope_authenticated`]). Packets from [`build_packet`] and its
//! siblings set it on every hop (their senders know every hop's keys); reply blocks
//! ([`crate::surb`]) clear it, because the exit that uses a block cannot build an envelope for
//! hops it does not know. The bit costs at most 1 ns of delay; [`HopOutput`] reports the delay
//! with the bit cleared.

use std::fmt;
use std::time::Duration;

use rand::CryptoRng;
use sphinx_packet::header::SphinxHeader;
use sphinx_packet::header::delays::Delay;
use sphinx_packet::header::shared_secret::ExpandedSharedSecret;
use sphinx_packet::payload::Payload;
use sphinx_packet::version::CURRENT_VERSION;
use sphinx_packet::{ProcessedPacketData, SphinxPacket};
pub use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::envelope::{Envelope, EnvelopeKey, SlotTicket, build_envelope};
use crate::sphinx_builder;
use crate::{
    ADDRESS_LEN, Error, HEADER_SIZE, MAX_ROUTE_LEN, PACKET_SIZE, PAYLOAD_SIZE, PLAINTEXT_SIZE,
    Result, SURB_ID_LEN,
};

/// Where a Sphinx hop sends a packet: a relay's identity, or a client's address at its gateway.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Address(pub [u8; ADDRESS_LEN]);

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Eight hex digits are enough to tell relays apart in logs.
        write!(f, "Address(")?;
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

/// The identifier a final hop reads in the clear; for SURBs it finds the reply's keys.
pub type SurbId = [u8; SURB_ID_LEN];

/// The 32-byte tag derived from a packet's shared secret at a hop: the same packet
/// always gives the same tag at the same key, so a hop can refuse to process it twice.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplayTag(pub [u8; 32]);

impl fmt::Debug for ReplayTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReplayTag({:02x}{:02x}…)", self.0[0], self.0[1])
    }
}

/// One hop of a route: where it is and the Sphinx key it holds for the packet's epoch.
#[derive(Clone, Debug)]
pub struct RouteHop {
    pub address: Address,
    pub sphinx_key: PublicKey,
}

/// A packet's bytes; always exactly [`PACKET_SIZE`] long.
#[derive(Clone, PartialEq, Eq)]
pub struct Packet(Box<[u8; PACKET_SIZE]>);

impl Packet {
    /// Wraps bytes, refusing any other length.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        let array: [u8; PACKET_SIZE] = bytes.try_into().map_err(|_| Error::PacketLength {
            got: bytes.len(),
            expected: PACKET_SIZE,
        })?;
        Ok(Packet(Box::new(array)))
    }

    pub fn as_bytes(&self) -> &[u8; PACKET_SIZE] {
        &self.0
    }

    fn from_sphinx(packet: &SphinxPacket) -> Result<Self> {
        Packet::from_slice(&packet.to_bytes())
    }
}

impl fmt::Debug for Packet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Packet({} bytes)", PACKET_SIZE)
    }
}

/// The lowest bit of a forward hop's delay in nanoseconds: set when the packet's payment
/// envelope was built by a sender who knew every hop's keys, so the hop enforces its MAC.
const ENVELOPE_AUTHENTICATED_BIT: u64 = 1;

/// Sphinx's delays for `route`: every forward hop's carries `envelope_authenticated` in its
/// lowest bit (see the module documentation).
pub(crate) fn sphinx_delays(
    route: &[RouteHop],
    delays: &[Duration],
    envelope_authenticated: bool,
) -> Result<Vec<Delay>> {
    if route.is_empty() || route.len() > MAX_ROUTE_LEN || delays.len() != route.len() {
        return Err(Error::RouteShape {
            hops: route.len(),
            delays: delays.len(),
            max: MAX_ROUTE_LEN,
        });
    }
    Ok(delays
        .iter()
        .map(|d| {
            let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
            Delay::new_from_nanos(if envelope_authenticated {
                nanos | ENVELOPE_AUTHENTICATED_BIT
            } else {
                nanos & !ENVELOPE_AUTHENTICATED_BIT
            })
        })
        .collect())
}

/// Builds a packet that crosses `route` and is delivered to `destination` at its last hop.
///
/// `delays[i]` is how long hop `i` holds the packet; the last hop delivers it and ignores its
/// delay. All randomness (the packet's ephemeral key) comes from `rng`. Every hop is told to
/// enforce the packet's payment envelope: a packet sent through mixes that check envelopes
/// needs one, from [`build_packet_with_envelope`] (or [`build_packet_with_tags`] and
/// [`build_envelope`]).
pub fn build_packet<R: CryptoRng + ?Sized>(
    rng: &mut R,
    route: &[RouteHop],
    delays: &[Duration],
    destination: Address,
    surb_id: SurbId,
    plaintext: &[u8],
) -> Result<Packet> {
    let (packet, _) = build(rng, route, delays, destination, surb_id, plaintext, false)?;
    Ok(packet)
}

/// A packet and what its sender needs to build the packet's payment envelope.
#[derive(Debug)]
pub struct BuiltPacket {
    pub packet: Packet,
    /// Each hop's replay tag, in route order: the tag [`OpenedPacket::replay_tag`] gives at
    /// that hop, from which both the hop and the sender derive its [`EnvelopeKey`].
    pub hop_tags: Vec<ReplayTag>,
}

/// [`build_packet`], also returning every hop's replay tag. They come from the derivation
/// that built the packet ([`crate::sphinx_builder`]), so they cost nothing more.
pub fn build_packet_with_tags<R: CryptoRng + ?Sized>(
    rng: &mut R,
    route: &[RouteHop],
    delays: &[Duration],
    destination: Address,
    surb_id: SurbId,
    plaintext: &[u8],
) -> Result<BuiltPacket> {
    let (packet, hop_tags) = build(rng, route, delays, destination, surb_id, plaintext, true)?;
    Ok(BuiltPacket { packet, hop_tags })
}

/// Builds a packet and its payment envelope: `slots[i]` is hop `i`'s ticket, or `None`.
/// Routes of 1 to [`crate::envelope::ENVELOPE_SLOTS`] hops; `slots` has one entry per hop.
#[allow(clippy::too_many_arguments)]
pub fn build_packet_with_envelope<R: CryptoRng + ?Sized>(
    rng: &mut R,
    route: &[RouteHop],
    delays: &[Duration],
    destination: Address,
    surb_id: SurbId,
    plaintext: &[u8],
    slots: &[Option<SlotTicket>],
) -> Result<(Packet, Envelope)> {
    // Refuse a shape the envelope cannot carry before paying for the packet.
    if slots.len() != route.len() || route.len() > crate::envelope::ENVELOPE_SLOTS {
        return Err(Error::EnvelopeShape {
            keys: route.len(),
            slots: slots.len(),
            max: crate::envelope::ENVELOPE_SLOTS,
        });
    }
    let built = build_packet_with_tags(rng, route, delays, destination, surb_id, plaintext)?;
    let keys: Vec<EnvelopeKey> = built
        .hop_tags
        .iter()
        .map(EnvelopeKey::from_replay_tag)
        .collect();
    let envelope = build_envelope(rng, &keys, slots)?;
    Ok((built.packet, envelope))
}

fn build<R: CryptoRng + ?Sized>(
    rng: &mut R,
    route: &[RouteHop],
    delays: &[Duration],
    destination: Address,
    surb_id: SurbId,
    plaintext: &[u8],
    with_tags: bool,
) -> Result<(Packet, Vec<ReplayTag>)> {
    if plaintext.len() > PLAINTEXT_SIZE {
        return Err(Error::TooLong {
            what: "packet plaintext",
            len: plaintext.len(),
            max: PLAINTEXT_SIZE,
        });
    }
    let delays = sphinx_delays(route, delays, true)?;
    // One derivation serves the header, the payload and the envelope's tags.
    let (secrets, header) = sphinx_builder::build(rng, route, &delays, destination, surb_id)?;
    let seeds = Zeroizing::new(
        secrets
            .hops
            .iter()
            .map(|h| h.payload_seed())
            .collect::<Vec<_>>(),
    );
    let payload = Payload::encapsulate_message(plaintext, &seeds[..], PAYLOAD_SIZE)
        .map_err(|e| Error::Build(e.to_string()))?;
    let mut bytes = [0u8; PACKET_SIZE];
    bytes[..HEADER_SIZE].copy_from_slice(&header);
    bytes[HEADER_SIZE..].copy_from_slice(payload.as_bytes());
    let tags = if with_tags {
        secrets.hops.iter().map(|h| h.replay_tag()).collect()
    } else {
        Vec::new()
    };
    Ok((Packet(Box::new(bytes)), tags))
}

/// A packet whose header MAC verified under this hop's key; its replay tag is now meaningful.
pub struct OpenedPacket {
    header: SphinxHeader,
    payload: Payload,
    secret: ExpandedSharedSecret,
}

impl OpenedPacket {
    /// Parses `bytes` and checks the header MAC under `key` (one X25519 and one HMAC).
    pub fn open(bytes: &[u8], key: &StaticSecret) -> Result<Self> {
        if bytes.len() != PACKET_SIZE {
            return Err(Error::PacketLength {
                got: bytes.len(),
                expected: PACKET_SIZE,
            });
        }
        let (header_bytes, payload_bytes) = bytes.split_at(HEADER_SIZE);
        // X25519 ignores the top bit of a point, so a flipped top bit would leave the MAC
        // valid: refuse non-canonical encodings so every header bit is authenticated.
        if !is_canonical_point(&header_bytes[..32]) {
            return Err(Error::NonCanonicalElement);
        }
        let header =
            SphinxHeader::from_bytes(header_bytes).map_err(|e| Error::Routing(e.to_string()))?;
        let secret = header.compute_expanded_shared_secret(key);
        header
            .ensure_header_integrity(&secret)
            .map_err(|_| Error::HeaderMac)?;
        let payload =
            Payload::from_bytes(payload_bytes).map_err(|e| Error::Payload(e.to_string()))?;
        Ok(OpenedPacket {
            header,
            payload,
            secret,
        })
    }

    /// The tag that identifies this packet at this key.
    pub fn replay_tag(&self) -> ReplayTag {
        ReplayTag(*self.secret.replay_tag())
    }

    /// Removes this hop's layer. Forward delays are clamped to `max_delay`.
    pub fn process(self, max_delay: Duration) -> Result<HopOutput> {
        let packet = SphinxPacket {
            header: self.header,
            payload: self.payload,
        };
        let processed = packet
            .process_with_expanded_secret(&self.secret)
            .map_err(|e| Error::Routing(e.to_string()))?;
        if processed.version != CURRENT_VERSION {
            return Err(Error::Routing(format!(
                "Sphinx version {} is not the one Murmur uses ({})",
                processed.version.value(),
                CURRENT_VERSION.value()
            )));
        }
        match processed.data {
            ProcessedPacketData::ForwardHop {
                next_hop_packet,
                next_hop_address,
                delay,
            } => {
                let raw = delay.to_nanos();
                let requested = Duration::from_nanos(raw & !ENVELOPE_AUTHENTICATED_BIT);
                Ok(HopOutput::Forward {
                    next_hop: Address(next_hop_address.to_bytes()),
                    delay: requested.min(max_delay),
                    delay_clamped: requested > max_delay,
                    envelope_authenticated: raw & ENVELOPE_AUTHENTICATED_BIT != 0,
                    packet: Packet::from_sphinx(&next_hop_packet)?,
                })
            }
            ProcessedPacketData::FinalHop {
                destination,
                identifier,
                payload,
            } => {
                let bytes = payload.into_bytes();
                let payload: Box<[u8; PAYLOAD_SIZE]> = bytes
                    .into_boxed_slice()
                    .try_into()
                    .map_err(|_| Error::Payload("final payload has the wrong size".into()))?;
                Ok(HopOutput::Final(FinalDelivery {
                    destination: Address(destination.as_bytes()),
                    surb_id: identifier,
                    payload,
                }))
            }
        }
    }
}

/// Whether 32 bytes are the canonical encoding of an X25519 u-coordinate (below 2^255 − 19).
fn is_canonical_point(bytes: &[u8]) -> bool {
    let Some(&top) = bytes.get(31) else {
        return false;
    };
    if top & 0x80 != 0 {
        return false;
    }
    // Values in [2^255 − 19, 2^255) are non-canonical: top byte 0x7f, bytes 30..1 all 0xff
    // and the low byte ≥ 0xed.
    let all_ff = bytes[1..31].iter().all(|&b| b == 0xff);
    !(top == 0x7f && all_ff && bytes[0] >= 0xed)
}

/// What a hop does with a packet.
#[derive(Debug)]
pub enum HopOutput {
    /// Hold the packet for `delay`, then send it to `next_hop`.
    Forward {
        next_hop: Address,
        delay: Duration,
        /// The header asked for more than the hop's maximum.
        delay_clamped: bool,
        /// The sender built this packet's payment envelope for every hop, so this hop peels it
        /// with the MAC enforced ([`crate::envelope::Envelope::peel`]); false for SURB replies.
        envelope_authenticated: bool,
        packet: Packet,
    },
    /// This hop is the last: deliver the payload.
    Final(FinalDelivery),
}

/// The output of a final hop.
pub struct FinalDelivery {
    /// The destination written by the sender: the exit itself, or a client behind a gateway.
    pub destination: Address,
    /// Read in the clear; a SURB's identifier, or zero.
    pub surb_id: SurbId,
    /// The payload with every hop's layer removed. A forward packet's is plaintext
    /// ([`recover_plaintext`]); a SURB reply's is still sealed for the SURB's creator.
    pub payload: Box<[u8; PAYLOAD_SIZE]>,
}

impl fmt::Debug for FinalDelivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FinalDelivery")
            .field("destination", &self.destination)
            .finish_non_exhaustive()
    }
}

/// Strips Sphinx's padding from a fully unwrapped forward payload.
pub fn recover_plaintext(payload: &[u8]) -> Result<Vec<u8>> {
    Payload::from_bytes(payload)
        .and_then(Payload::recover_plaintext)
        .map_err(|e| Error::Payload(e.to_string()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    /// A route of `hops` relays with fresh Sphinx keys, at addresses 1, 2, ...
    pub(crate) fn keyed_route(
        rng: &mut ChaCha20Rng,
        hops: usize,
    ) -> (Vec<RouteHop>, Vec<StaticSecret>) {
        let secrets: Vec<StaticSecret> = (0..hops)
            .map(|_| StaticSecret::random_from_rng(&mut *rng))
            .collect();
        let route = secrets
            .iter()
            .enumerate()
            .map(|(i, s)| RouteHop {
                address: Address([i as u8 + 1; ADDRESS_LEN]),
                sphinx_key: PublicKey::from(s),
            })
            .collect();
        (route, secrets)
    }

    #[test]
    fn canonical_point_check() {
        let mut p = [0u8; 32];
        assert!(is_canonical_point(&p));
        p[31] = 0x80;
        assert!(!is_canonical_point(&p));
        let mut q = [0xffu8; 32];
        q[31] = 0x7f;
        q[0] = 0xec; // 2^255 - 20: canonical
        assert!(is_canonical_point(&q));
        q[0] = 0xed; // p itself
        assert!(!is_canonical_point(&q));
    }

    #[test]
    fn four_hop_packet_reaches_its_destination_with_the_written_delays() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let (route, secrets) = keyed_route(&mut rng, 4);
        let delays = [10, 20, 30, 40].map(Duration::from_millis);
        let dest = Address([9; ADDRESS_LEN]);
        let mut packet =
            build_packet(&mut rng, &route, &delays, dest, [0; 16], b"hello mixnet").unwrap();
        for (i, secret) in secrets.iter().enumerate() {
            let opened = OpenedPacket::open(packet.as_bytes(), secret).unwrap();
            match opened.process(Duration::from_secs(10)).unwrap() {
                HopOutput::Forward {
                    next_hop,
                    delay,
                    delay_clamped,
                    envelope_authenticated,
                    packet: next,
                } => {
                    assert!(i < 3);
                    assert!(envelope_authenticated);
                    assert_eq!(next_hop, route[i + 1].address);
                    assert_eq!(delay, delays[i]);
                    assert!(!delay_clamped);
                    packet = next;
                }
                HopOutput::Final(delivery) => {
                    assert_eq!(i, 3);
                    assert_eq!(delivery.destination, dest);
                    assert_eq!(
                        recover_plaintext(&delivery.payload[..]).unwrap(),
                        b"hello mixnet"
                    );
                }
            }
        }
    }

    #[test]
    fn delays_are_clamped() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let (route, secrets) = keyed_route(&mut rng, 2);
        let delays = [Duration::from_secs(100), Duration::ZERO];
        let packet =
            build_packet(&mut rng, &route, &delays, Address([0; 32]), [0; 16], b"x").unwrap();
        let out = OpenedPacket::open(packet.as_bytes(), &secrets[0])
            .unwrap()
            .process(Duration::from_secs(2))
            .unwrap();
        let HopOutput::Forward {
            delay,
            delay_clamped,
            ..
        } = out
        else {
            panic!("expected forward");
        };
        assert_eq!(delay, Duration::from_secs(2));
        assert!(delay_clamped);
    }

    #[test]
    fn wrong_key_and_wrong_length_are_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let (route, _) = keyed_route(&mut rng, 3);
        let packet = build_packet(
            &mut rng,
            &route,
            &[Duration::ZERO; 3],
            Address([0; 32]),
            [0; 16],
            b"x",
        )
        .unwrap();
        let other = StaticSecret::random_from_rng(&mut rng);
        assert!(matches!(
            OpenedPacket::open(packet.as_bytes(), &other),
            Err(Error::HeaderMac)
        ));
        assert!(matches!(
            OpenedPacket::open(&packet.as_bytes()[1..], &other),
            Err(Error::PacketLength { .. })
        ));
    }

    #[test]
    fn an_envelope_needs_a_slot_per_hop_and_at_most_four_hops() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let (route, _) = keyed_route(&mut rng, 5);
        let build = |rng: &mut ChaCha20Rng, hops: usize, slots: usize| {
            build_packet_with_envelope(
                rng,
                &route[..hops],
                &vec![Duration::ZERO; hops],
                Address([0; 32]),
                [0; 16],
                b"",
                &vec![None; slots],
            )
        };
        for (hops, slots) in [(5, 5), (3, 2), (3, 4)] {
            assert_eq!(
                build(&mut rng, hops, slots).err(),
                Some(Error::EnvelopeShape {
                    keys: hops,
                    slots,
                    max: 4
                })
            );
        }
        let (_, envelope) = build(&mut rng, 4, 4).unwrap();
        assert_eq!(envelope.as_bytes().len(), crate::envelope::ENVELOPE_LEN);
    }

    #[test]
    fn oversize_plaintext_and_bad_routes_are_errors() {
        let mut rng = ChaCha20Rng::seed_from_u64(6);
        let (route, _) = keyed_route(&mut rng, 6);
        let too_long = vec![0u8; PLAINTEXT_SIZE + 1];
        assert!(matches!(
            build_packet(
                &mut rng,
                &route[..4],
                &[Duration::ZERO; 4],
                Address([0; 32]),
                [0; 16],
                &too_long
            ),
            Err(Error::TooLong { .. })
        ));
        assert!(matches!(
            build_packet(
                &mut rng,
                &route,
                &[Duration::ZERO; 6],
                Address([0; 32]),
                [0; 16],
                b""
            ),
            Err(Error::RouteShape { .. })
        ));
        assert!(matches!(
            build_packet(
                &mut rng,
                &route[..3],
                &[Duration::ZERO; 2],
                Address([0; 32]),
                [0; 16],
                b""
            ),
            Err(Error::RouteShape { .. })
        ));
        let max = vec![7u8; PLAINTEXT_SIZE];
        assert!(
            build_packet(
                &mut rng,
                &route[..4],
                &[Duration::ZERO; 4],
                Address([0; 32]),
                [0; 16],
                &max
            )
            .is_ok()
        );
    }
}
