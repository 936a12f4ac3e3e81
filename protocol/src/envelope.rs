//! The per-hop payment envelope: one ticket slot per hop, readable only by its hop, bound to
//! its packet, and checked hop by hop like a Sphinx header (design: `docs/payment-envelope.md`).
//!
//! # Layout and processing
//!
//! An envelope is [`ENVELOPE_LEN`] = 640 bytes: [`ENVELOPE_SLOTS`] = 4 slots of [`SLOT_LEN`] =
//! 160 bytes, one per Sphinx hop of a route `[L1, L2, L3, final]`. Hop *i* derives its
//! [`EnvelopeKey`] from the packet's replay tag at that hop (`HKDF-SHA256(ikm = tag, info =
//! "murmur/envelope/v1")` → a ChaCha20 key and an HMAC-SHA256 key), then ([`peel_in_place`]):
//!
//! 1. XORs the envelope followed by [`SLOT_LEN`] zero bytes with its keystream (800 bytes,
//!    ChaCha20, zero nonce: each key is used for one envelope);
//! 2. reads slot 0 as `content (144) | mac (16)` and checks `mac = HMAC(content | next)[..16]`,
//!    where `next` is the other slots followed by the last [`SLOT_LEN`] bytes of step 1 (the
//!    "filler"): exactly the envelope it will forward. The MAC covers everything later hops
//!    will see, so a change anywhere in a hop's input fails that hop's check, and a hop that
//!    alters its own output is caught by the next honest hop (Sphinx's nested MACs);
//! 3. forwards `next`: the same length, so a hop's position in the route does not show.
//!
//! The sender builds it backwards from the last hop ([`build_envelope`]), precomputing the
//! fillers as Sphinx does for its routing information. A route of fewer than four hops pads
//! the last hop's unused slots with random bytes, so every envelope on a link, at any
//! position, looks random.
//!
//! # Slot content
//!
//! `flag (1) | ticket (136) | zero (7)`. Flag 0: no ticket (all 143 bytes after it zero);
//! flag 1: a [`SlotTicket`] with the pot's Ed25519 signature; flag 2: a [`SlotTicket`] whose
//! 64 signature bytes are the pot owner's chain co-signature ([`CoSignature`]) instead; any
//! other flag or non-zero padding is an error. Paid and unpaid, cover and real packets carry
//! envelopes of the same size that look alike.
//!
//! **Flag 2, for a hop that settles on a chain.** The chain pays a ticket on its pot owner's
//! secp256k1 co-signature and never checks the Ed25519 signature (the EVM cannot afford to).
//! A slot has 7 bytes to spare, not the 64 a co-signature needs beside the signature, and
//! growing every slot would grow every frame, cover included, on every network. So a payer
//! that pays a hop on the chain puts the co-signature where the signature goes, and that hop
//! checks the co-signature (it recovers to the pot's owner, as the contract will check)
//! where it would have checked the signature. The ticket's identity ([`Ticket::digest`])
//! does not cover the signature, so it is the same ticket either way.
//!
//! A [`SlotTicket`] is a [`Ticket`] without the fields the hop supplies itself (its identity as
//! the recipient and the commitment it published), with 32-bit times:
//!
//! | offset | bytes | field |
//! |---:|---:|---|
//! | 0 | 32 | `pot` |
//! | 32 | 8 | `face_value`, big-endian |
//! | 40 | 8 | `win_ratio`, big-endian |
//! | 48 | 16 | `nonce` |
//! | 64 | 4 | `issued`, Unix seconds, big-endian |
//! | 68 | 4 | `expiry`, Unix seconds, big-endian |
//! | 72 | 64 | `signature` over the full ticket ([`Ticket::verify_signature`]) |
//!
//! # Who enforces the MAC
//!
//! A SURB reply is sent by an exit that does not know the reply route's keys, so it cannot
//! build an envelope: it sends [`Envelope::random`]. Each forward hop learns from the
//! Sphinx-authenticated delay field whether to enforce the MAC
//! ([`crate::packet::HopOutput::Forward`]'s `envelope_authenticated`): packets from
//! [`crate::packet::build_packet`] and its siblings say yes on every hop, reply blocks say no.
//! With `authenticated == false`, [`Envelope::peel`] never fails: it reads no ticket and
//! still transforms the bytes (decrypt, shift, filler), so a hop's input and output envelopes
//! are as unlinkable as for a forward packet.
//!
//! The final hop has no delay field, so it cannot be told. It always peels with
//! `authenticated == true` and treats a failure as "unpaid", not as a reason to drop the
//! packet (a SURB reply reaches its gateway with a random envelope).
//!
//! Trade-off: the flag is visible only to the hop that decrypts the header, never on the
//! wire, but a corrupt mix learns whether a packet is a SURB reply (the Sphinx header already
//! shows a SURB reply's final hop its destination). The alternative — every reply block
//! carrying a 640-byte envelope prepared by the client — would make a block 1040 bytes
//! instead of 400 and cut the blocks a forward packet can carry from 4 to 1.

use std::fmt;

use chacha20::ChaCha20;
use chacha20::cipher::{KeyIvInit, StreamCipher};
use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use rand::CryptoRng;
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::directory::IdentityKey;
use crate::packet::ReplayTag;
use crate::ticket::{CoSignature, Ticket};
use crate::{Error, Result};

/// Slots in every envelope: one per hop of a `[L1, L2, L3, final]` route.
pub const ENVELOPE_SLOTS: usize = 4;

/// Bytes of one slot: content and MAC.
pub const SLOT_LEN: usize = 160;

/// Bytes of an envelope.
pub const ENVELOPE_LEN: usize = ENVELOPE_SLOTS * SLOT_LEN;

/// Bytes of a slot's MAC (HMAC-SHA256 truncated).
pub const SLOT_MAC_LEN: usize = 16;

/// Bytes of a slot's content: flag, ticket or zeros, zero padding.
pub const SLOT_CONTENT_LEN: usize = SLOT_LEN - SLOT_MAC_LEN;

/// Bytes of an encoded [`SlotTicket`].
pub const SLOT_TICKET_LEN: usize = 32 + 8 + 8 + 16 + 4 + 4 + 64;

/// Flag byte of a slot without a ticket.
pub const FLAG_EMPTY: u8 = 0;

/// Flag byte of a slot with a ticket signed with Ed25519.
pub const FLAG_TICKET: u8 = 1;

/// Flag byte of a slot with a ticket that carries the pot owner's chain co-signature in its
/// signature's place.
pub const FLAG_COSIGNED_TICKET: u8 = 2;

/// HKDF `info` of the envelope keys.
const KEY_INFO: &[u8] = b"murmur/envelope/v1";

/// Keystream a hop applies: the envelope and one slot of filler.
const STREAM_LEN: usize = ENVELOPE_LEN + SLOT_LEN;

/// Each key encrypts one envelope, so the nonce can be fixed.
const NONCE: [u8; 12] = [0; 12];

/// ChaCha20 key bytes.
const CIPHER_KEY_LEN: usize = 32;

/// HMAC-SHA256 key bytes: one SHA-256 block, so HMAC uses it as is.
const MAC_KEY_LEN: usize = 64;

// The flag byte and a ticket fit in a slot's content.
const _: () = assert!(SLOT_TICKET_LEN < SLOT_CONTENT_LEN);
// HKDF-SHA256 expands to at most 255 · 32 bytes.
const _: () = assert!(CIPHER_KEY_LEN + MAC_KEY_LEN <= 255 * 32);

/// One hop's envelope keys, derived from the packet's replay tag at that hop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct EnvelopeKey {
    cipher: [u8; CIPHER_KEY_LEN],
    mac: [u8; MAC_KEY_LEN],
}

impl fmt::Debug for EnvelopeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EnvelopeKey(<redacted>)")
    }
}

impl EnvelopeKey {
    /// `HKDF-SHA256(salt = none, ikm = tag, info = "murmur/envelope/v1")`: 32 bytes of
    /// ChaCha20 key, then 64 bytes of HMAC-SHA256 key.
    pub fn from_replay_tag(tag: &ReplayTag) -> Self {
        let mut okm = [0u8; CIPHER_KEY_LEN + MAC_KEY_LEN];
        // Cannot fail: the output is far below HKDF's limit (asserted above).
        let _ = Hkdf::<Sha256>::new(None, &tag.0).expand(KEY_INFO, &mut okm);
        let mut key = EnvelopeKey {
            cipher: [0; CIPHER_KEY_LEN],
            mac: [0; MAC_KEY_LEN],
        };
        key.cipher.copy_from_slice(&okm[..CIPHER_KEY_LEN]);
        key.mac.copy_from_slice(&okm[CIPHER_KEY_LEN..]);
        okm.zeroize();
        key
    }

    fn cipher(&self) -> ChaCha20 {
        ChaCha20::new(&self.cipher.into(), &NONCE.into())
    }

    fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as KeyInit>::new(&self.mac.into())
    }

    /// The whole keystream: the envelope's part and the filler.
    fn keystream(&self) -> [u8; STREAM_LEN] {
        let mut out = [0u8; STREAM_LEN];
        self.cipher().apply_keystream(&mut out);
        out
    }

    /// The truncated MAC of a slot's content and the envelope that follows it.
    fn tag(&self, content: &[u8], next: &[u8]) -> [u8; SLOT_MAC_LEN] {
        let mut mac = self.mac();
        mac.update(content);
        mac.update(next);
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; SLOT_MAC_LEN];
        out.copy_from_slice(&full[..SLOT_MAC_LEN]);
        out
    }

    /// Whether `tag` is the MAC of `content | next` (constant time).
    fn verify(&self, content: &[u8], next: &[u8], tag: &[u8]) -> bool {
        let mut mac = self.mac();
        mac.update(content);
        mac.update(next);
        mac.verify_truncated_left(tag).is_ok()
    }
}

/// A ticket as a slot carries it: [`Ticket`] without `recipient` and `commitment` (the hop
/// supplies both), with 32-bit times. See the module documentation for the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlotTicket {
    pub pot: IdentityKey,
    pub face_value: u64,
    pub win_ratio: u64,
    pub nonce: [u8; 16],
    /// Unix seconds.
    pub issued: u32,
    /// Unix seconds.
    pub expiry: u32,
    /// The pot's Ed25519 signature, or its owner's co-signature (see `signed_by`).
    pub signature: [u8; 64],
    /// What `signature` holds.
    pub signed_by: SlotSignature,
}

/// What a [`SlotTicket`]'s 64 signature bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SlotSignature {
    /// The pot's Ed25519 signature ([`Ticket::verify_signature`]); slot flag 1.
    Ed25519,
    /// The pot owner's chain co-signature ([`CoSignature`]); slot flag 2.
    CoSignature,
}

impl SlotTicket {
    /// The slot form of `ticket`; [`Error::TicketTimeRange`] if a time is past `u32::MAX`
    /// seconds (the year 2106).
    pub fn from_ticket(ticket: &Ticket) -> Result<SlotTicket> {
        let seconds = |field: &'static str, value: u64| {
            u32::try_from(value).map_err(|_| Error::TicketTimeRange { field, value })
        };
        Ok(SlotTicket {
            pot: ticket.pot,
            face_value: ticket.face_value,
            win_ratio: ticket.win_ratio,
            nonce: ticket.nonce,
            issued: seconds("issue time", ticket.issued)?,
            expiry: seconds("expiry", ticket.expiry)?,
            signature: ticket.signature,
            signed_by: SlotSignature::Ed25519,
        })
    }

    /// The slot form of `ticket` for a hop that settles on a chain: the co-signature in the
    /// signature's place (slot flag 2).
    pub fn cosigned(ticket: &Ticket, cosignature: CoSignature) -> Result<SlotTicket> {
        Ok(SlotTicket {
            signature: cosignature.0,
            signed_by: SlotSignature::CoSignature,
            ..SlotTicket::from_ticket(ticket)?
        })
    }

    /// The co-signature this slot carries in its signature's place, if it is flag 2.
    pub fn cosignature(&self) -> Option<CoSignature> {
        (self.signed_by == SlotSignature::CoSignature).then_some(CoSignature(self.signature))
    }

    /// The full ticket, with the hop's own identity and published commitment filled in. Its
    /// signature verifies iff the payer signed it for that recipient and commitment. For a
    /// co-signed slot the ticket's `signature` holds the co-signature, so it does not verify:
    /// check [`SlotTicket::cosignature`] instead.
    pub fn into_ticket(self, recipient: IdentityKey, commitment: [u8; 32]) -> Ticket {
        Ticket {
            pot: self.pot,
            recipient,
            face_value: self.face_value,
            win_ratio: self.win_ratio,
            nonce: self.nonce,
            issued: u64::from(self.issued),
            expiry: u64::from(self.expiry),
            commitment,
            signature: self.signature,
        }
    }

    /// The fixed [`SLOT_TICKET_LEN`]-byte encoding.
    pub fn encode(&self) -> [u8; SLOT_TICKET_LEN] {
        let mut out = [0u8; SLOT_TICKET_LEN];
        let mut at = 0;
        for field in [
            &self.pot.0[..],
            &self.face_value.to_be_bytes(),
            &self.win_ratio.to_be_bytes(),
            &self.nonce,
            &self.issued.to_be_bytes(),
            &self.expiry.to_be_bytes(),
            &self.signature,
        ] {
            out[at..at + field.len()].copy_from_slice(field);
            at += field.len();
        }
        out
    }

    /// Decodes the fixed encoding, as a ticket signed with Ed25519 (the slot's flag says which
    /// it is); every byte string of that length is a slot ticket (the signature is checked
    /// later, on the full ticket).
    pub fn decode(bytes: &[u8; SLOT_TICKET_LEN]) -> SlotTicket {
        let mut at = 0;
        let mut take = |n: usize| {
            let field = &bytes[at..at + n];
            at += n;
            field
        };
        let mut pot = [0u8; 32];
        pot.copy_from_slice(take(32));
        let mut u64_field = [0u8; 8];
        u64_field.copy_from_slice(take(8));
        let face_value = u64::from_be_bytes(u64_field);
        u64_field.copy_from_slice(take(8));
        let win_ratio = u64::from_be_bytes(u64_field);
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(take(16));
        let mut u32_field = [0u8; 4];
        u32_field.copy_from_slice(take(4));
        let issued = u32::from_be_bytes(u32_field);
        u32_field.copy_from_slice(take(4));
        let expiry = u32::from_be_bytes(u32_field);
        let mut signature = [0u8; 64];
        signature.copy_from_slice(take(64));
        SlotTicket {
            pot: IdentityKey(pot),
            face_value,
            win_ratio,
            nonce,
            issued,
            expiry,
            signature,
            signed_by: SlotSignature::Ed25519,
        }
    }
}

/// A slot's content: the flag, the ticket if any, zero padding.
pub fn encode_slot_content(ticket: Option<&SlotTicket>) -> [u8; SLOT_CONTENT_LEN] {
    let mut out = [0u8; SLOT_CONTENT_LEN];
    if let Some(ticket) = ticket {
        out[0] = match ticket.signed_by {
            SlotSignature::Ed25519 => FLAG_TICKET,
            SlotSignature::CoSignature => FLAG_COSIGNED_TICKET,
        };
        out[1..1 + SLOT_TICKET_LEN].copy_from_slice(&ticket.encode());
    }
    out
}

/// Reads a slot's content: [`Error::EnvelopeFlag`] for an unknown flag,
/// [`Error::EnvelopePadding`] for non-zero bytes where zeros belong.
pub fn decode_slot_content(content: &[u8; SLOT_CONTENT_LEN]) -> Result<Option<SlotTicket>> {
    let (ticket, padding) = match content[0] {
        FLAG_EMPTY => (None, &content[1..]),
        flag @ (FLAG_TICKET | FLAG_COSIGNED_TICKET) => {
            let mut bytes = [0u8; SLOT_TICKET_LEN];
            bytes.copy_from_slice(&content[1..1 + SLOT_TICKET_LEN]);
            let signed_by = if flag == FLAG_TICKET {
                SlotSignature::Ed25519
            } else {
                SlotSignature::CoSignature
            };
            (
                Some(SlotTicket {
                    signed_by,
                    ..SlotTicket::decode(&bytes)
                }),
                &content[1 + SLOT_TICKET_LEN..],
            )
        }
        flag => return Err(Error::EnvelopeFlag(flag)),
    };
    if padding.iter().any(|&b| b != 0) {
        return Err(Error::EnvelopePadding);
    }
    Ok(ticket)
}

/// An envelope's bytes; always exactly [`ENVELOPE_LEN`] long.
#[derive(Clone, PartialEq, Eq)]
pub struct Envelope(Box<[u8; ENVELOPE_LEN]>);

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Envelope({ENVELOPE_LEN} bytes)")
    }
}

/// What a hop reads from an envelope, and what it forwards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peeled {
    /// This hop's ticket, if the sender put one in its slot.
    pub ticket: Option<SlotTicket>,
    /// The envelope for the next hop.
    pub next: Envelope,
}

impl Envelope {
    /// Wraps bytes, refusing any other length.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        let array: [u8; ENVELOPE_LEN] = bytes.try_into().map_err(|_| Error::EnvelopeLength {
            got: bytes.len(),
            expected: ENVELOPE_LEN,
        })?;
        Ok(Envelope(Box::new(array)))
    }

    /// Wraps an array.
    pub fn from_bytes(bytes: [u8; ENVELOPE_LEN]) -> Self {
        Envelope(Box::new(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; ENVELOPE_LEN] {
        &self.0
    }

    /// Random bytes: what a sender that cannot build an envelope (an exit using a reply
    /// block) sends. Indistinguishable from a built envelope without the hops' keys.
    pub fn random<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut bytes = Box::new([0u8; ENVELOPE_LEN]);
        rng.fill_bytes(&mut bytes[..]);
        Envelope(bytes)
    }

    /// Reads this hop's slot and returns it with the envelope for the next hop (see
    /// [`peel_in_place`], which does the same without allocating).
    pub fn peel(&self, key: &EnvelopeKey, authenticated: bool) -> Result<Peeled> {
        let mut next = self.clone();
        let ticket = next.peel_in_place(key, authenticated)?;
        Ok(Peeled { ticket, next })
    }

    /// [`peel_in_place`] on this envelope's bytes.
    pub fn peel_in_place(
        &mut self,
        key: &EnvelopeKey,
        authenticated: bool,
    ) -> Result<Option<SlotTicket>> {
        peel_in_place(&mut self.0, key, authenticated)
    }
}

/// Peels one hop's layer off `envelope`, leaving the envelope for the next hop in its place,
/// and returns this hop's ticket.
///
/// With `authenticated`, a MAC that does not verify is [`Error::EnvelopeMac`] (drop the
/// packet: the envelope was altered, belongs to another packet, or was never built for this
/// route), and a slot that verifies but does not decode is [`Error::EnvelopeFlag`] or
/// [`Error::EnvelopePadding`]. Without it, this never fails and reads no ticket. The bytes are
/// transformed either way, also on error.
pub fn peel_in_place(
    envelope: &mut [u8; ENVELOPE_LEN],
    key: &EnvelopeKey,
    authenticated: bool,
) -> Result<Option<SlotTicket>> {
    let mut cipher = key.cipher();
    cipher.apply_keystream(&mut envelope[..]);
    let mut slot = [0u8; SLOT_LEN];
    slot.copy_from_slice(&envelope[..SLOT_LEN]);
    envelope.copy_within(SLOT_LEN.., 0);
    let filler = &mut envelope[ENVELOPE_LEN - SLOT_LEN..];
    filler.fill(0);
    // The cipher continues where the envelope's part of the keystream ended.
    cipher.apply_keystream(filler);
    if !authenticated {
        return Ok(None);
    }
    let (content, tag) = slot.split_at(SLOT_CONTENT_LEN);
    if !key.verify(content, &envelope[..], tag) {
        return Err(Error::EnvelopeMac);
    }
    let mut content_bytes = [0u8; SLOT_CONTENT_LEN];
    content_bytes.copy_from_slice(content);
    decode_slot_content(&content_bytes)
}

fn xor(into: &mut [u8], with: &[u8]) {
    for (a, b) in into.iter_mut().zip(with) {
        *a ^= b;
    }
}

/// Builds an envelope for a route whose hops have `keys` (in route order, from the packet's
/// replay tags: [`crate::packet::build_packet_with_tags`]); hop `i` reads `slots[i]`.
/// Routes of 1 to [`ENVELOPE_SLOTS`] hops, with exactly one slot per hop
/// ([`Error::EnvelopeShape`] otherwise). `rng` pads the slots a shorter route leaves unused.
pub fn build_envelope<R: CryptoRng + ?Sized>(
    rng: &mut R,
    keys: &[EnvelopeKey],
    slots: &[Option<SlotTicket>],
) -> Result<Envelope> {
    let hops = keys.len();
    if hops == 0 || hops > ENVELOPE_SLOTS || slots.len() != hops {
        return Err(Error::EnvelopeShape {
            keys: hops,
            slots: slots.len(),
            max: ENVELOPE_SLOTS,
        });
    }
    let streams: Vec<[u8; STREAM_LEN]> = keys.iter().map(EnvelopeKey::keystream).collect();

    // The filler the last hop finds at the end of its envelope: what hops 0..hops-1 appended,
    // as the hops after each transformed it (Sphinx's filler, slot by slot).
    let mut filler = [0u8; ENVELOPE_LEN - SLOT_LEN];
    let mut filler_len = 0;
    for stream in &streams[..hops - 1] {
        filler_len += SLOT_LEN;
        xor(
            &mut filler[..filler_len],
            &stream[STREAM_LEN - filler_len..],
        );
    }

    // The last hop's envelope: its slot (below), random bytes in the slots a shorter route
    // leaves unused, then the filler.
    let mut env = [0u8; ENVELOPE_LEN];
    let pad_end = ENVELOPE_LEN - filler_len;
    rng.fill_bytes(&mut env[SLOT_LEN..pad_end]);
    env[pad_end..].copy_from_slice(&filler[..filler_len]);

    for (i, (stream, key)) in streams.iter().zip(keys).enumerate().rev() {
        if i + 1 < hops {
            // `env` is hop i+1's envelope, which hop i forwards after its shift: hop i's
            // slots 1.. are its slots 0..n-2, encrypted under hop i's keystream.
            env.copy_within(..ENVELOPE_LEN - SLOT_LEN, SLOT_LEN);
            xor(&mut env[SLOT_LEN..], &stream[SLOT_LEN..ENVELOPE_LEN]);
        }
        // What hop i will forward, which its MAC covers.
        let mut next = [0u8; ENVELOPE_LEN];
        next[..ENVELOPE_LEN - SLOT_LEN].copy_from_slice(&env[SLOT_LEN..]);
        xor(
            &mut next[..ENVELOPE_LEN - SLOT_LEN],
            &stream[SLOT_LEN..ENVELOPE_LEN],
        );
        next[ENVELOPE_LEN - SLOT_LEN..].copy_from_slice(&stream[ENVELOPE_LEN..]);
        let content = encode_slot_content(slots[i].as_ref());
        let tag = key.tag(&content, &next);
        env[..SLOT_CONTENT_LEN].copy_from_slice(&content);
        env[SLOT_CONTENT_LEN..SLOT_LEN].copy_from_slice(&tag);
        xor(&mut env[..SLOT_LEN], &stream[..SLOT_LEN]);
    }
    Ok(Envelope::from_bytes(env))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::ticket::{TicketFields, commitment_of};
    use ed25519_dalek::SigningKey;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha20Rng;

    fn keys(rng: &mut ChaCha20Rng, n: usize) -> Vec<EnvelopeKey> {
        (0..n)
            .map(|_| {
                let mut tag = [0u8; 32];
                rng.fill_bytes(&mut tag);
                EnvelopeKey::from_replay_tag(&ReplayTag(tag))
            })
            .collect()
    }

    fn slot_ticket(seed: u8) -> SlotTicket {
        SlotTicket {
            pot: IdentityKey([seed; 32]),
            face_value: 1_000 + u64::from(seed),
            win_ratio: u64::MAX / 3,
            nonce: [seed ^ 0x55; 16],
            issued: 1_700_000_000,
            expiry: 1_700_003_600,
            signature: [seed.wrapping_add(1); 64],
            signed_by: if seed % 3 == 2 {
                SlotSignature::CoSignature
            } else {
                SlotSignature::Ed25519
            },
        }
    }

    #[test]
    fn sizes_are_as_designed() {
        assert_eq!(ENVELOPE_LEN, 640);
        assert_eq!(SLOT_TICKET_LEN, 136);
        assert_eq!(SLOT_CONTENT_LEN, 144);
    }

    #[test]
    fn every_hop_reads_its_slot_for_every_route_length() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        for hops in 1..=ENVELOPE_SLOTS {
            let keys = keys(&mut rng, hops);
            let slots: Vec<_> = (0..hops)
                .map(|i| (i % 2 == 0).then(|| slot_ticket(i as u8)))
                .collect();
            let mut env = build_envelope(&mut rng, &keys, &slots).unwrap();
            for (key, slot) in keys.iter().zip(&slots) {
                let peeled = env.peel(key, true).unwrap();
                assert_eq!(&peeled.ticket, slot, "{hops} hops");
                let mut in_place = env.clone();
                assert_eq!(in_place.peel_in_place(key, true).unwrap(), *slot);
                assert_eq!(in_place, peeled.next);
                env = peeled.next;
            }
        }
    }

    #[test]
    fn the_slot_codec_is_strict() {
        let t = slot_ticket(7);
        let content = encode_slot_content(Some(&t));
        assert_eq!(content[0], FLAG_TICKET);
        assert_eq!(&content[1..33], &[7; 32]);
        assert_eq!(decode_slot_content(&content), Ok(Some(t)));
        assert_eq!(decode_slot_content(&[0; SLOT_CONTENT_LEN]), Ok(None));
        let mut bad = content;
        bad[0] = 3;
        assert_eq!(decode_slot_content(&bad), Err(Error::EnvelopeFlag(3)));
        // Flag 2: the same bytes, the signature's place holding a co-signature.
        let mut cosigned = content;
        cosigned[0] = FLAG_COSIGNED_TICKET;
        let read = decode_slot_content(&cosigned).unwrap().unwrap();
        assert_eq!(read.signed_by, SlotSignature::CoSignature);
        assert_eq!(read.cosignature(), Some(CoSignature(t.signature)));
        assert_eq!(encode_slot_content(Some(&read)), cosigned);
        assert_eq!(t.cosignature(), None);
        let mut bad = cosigned;
        bad[SLOT_CONTENT_LEN - 3] = 9;
        assert_eq!(decode_slot_content(&bad), Err(Error::EnvelopePadding));
        let mut bad = content;
        bad[SLOT_CONTENT_LEN - 1] = 1;
        assert_eq!(decode_slot_content(&bad), Err(Error::EnvelopePadding));
        let mut bad = [0; SLOT_CONTENT_LEN];
        bad[5] = 1;
        assert_eq!(decode_slot_content(&bad), Err(Error::EnvelopePadding));
        assert_eq!(SlotTicket::decode(&t.encode()), t);
        assert_eq!(
            Error::EnvelopeFlag(3).label(),
            Error::EnvelopePadding.label()
        );
        assert_eq!(Error::EnvelopeMac.label(), "envelope_mac");
    }

    #[test]
    fn a_slot_ticket_becomes_the_signed_ticket_at_its_recipient() {
        let payer = SigningKey::from_bytes(&[1; 32]);
        let me = IdentityKey([2; 32]);
        let commitment = commitment_of(&[3; 32]);
        let fields = TicketFields {
            recipient: me,
            face_value: 5_000,
            win_ratio: u64::MAX / 10,
            nonce: [4; 16],
            issued: 1_700_000_000,
            expiry: u64::from(u32::MAX),
            commitment,
        };
        let ticket = Ticket::sign(fields, &payer);
        let slot = SlotTicket::from_ticket(&ticket).unwrap();
        let back = slot.into_ticket(me, commitment);
        assert_eq!(back, ticket);
        back.verify_signature().unwrap();
        // For another recipient or commitment, the signature does not verify.
        assert_eq!(
            slot.into_ticket(IdentityKey([9; 32]), commitment)
                .verify_signature(),
            Err(Error::TicketForged)
        );
        assert_eq!(
            slot.into_ticket(me, [0; 32]).verify_signature(),
            Err(Error::TicketForged)
        );
        let late = Ticket::sign(
            TicketFields {
                expiry: u64::from(u32::MAX) + 1,
                ..fields
            },
            &payer,
        );
        assert_eq!(
            SlotTicket::from_ticket(&late),
            Err(Error::TicketTimeRange {
                field: "expiry",
                value: u64::from(u32::MAX) + 1
            })
        );
    }

    #[test]
    fn a_cosigned_slot_is_the_same_ticket_with_the_cosignature_in_the_signatures_place() {
        let payer = SigningKey::from_bytes(&[1; 32]);
        let me = IdentityKey([2; 32]);
        let commitment = commitment_of(&[3; 32]);
        let ticket = Ticket::sign(
            TicketFields {
                recipient: me,
                face_value: 5_000,
                win_ratio: u64::MAX / 10,
                nonce: [4; 16],
                issued: 1_700_000_000,
                expiry: 1_700_009_000,
                commitment,
            },
            &payer,
        );
        let co = CoSignature([0x77; 64]);
        let slot = SlotTicket::cosigned(&ticket, co).unwrap();
        assert_eq!(slot.cosignature(), Some(co));
        let content = encode_slot_content(Some(&slot));
        assert_eq!(content[0], FLAG_COSIGNED_TICKET);
        let read = decode_slot_content(&content).unwrap().unwrap();
        assert_eq!(read, slot);
        let back = read.into_ticket(me, commitment);
        assert_eq!(back.digest(), ticket.digest());
        assert_eq!(back.signature, co.0);
        assert_eq!(back.verify_signature(), Err(Error::TicketForged));
        // Through a built envelope, each hop reads its own kind of slot.
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let keys = keys(&mut rng, 3);
        let plain = SlotTicket::from_ticket(&ticket).unwrap();
        let slots = [Some(slot), Some(plain), None];
        let mut env = build_envelope(&mut rng, &keys, &slots).unwrap();
        for (key, want) in keys.iter().zip(&slots) {
            let peeled = env.peel(key, true).unwrap();
            assert_eq!(&peeled.ticket, want);
            env = peeled.next;
        }
    }

    #[test]
    fn a_flipped_bit_fails_the_mac_and_unauthenticated_peeling_never_fails() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let keys = keys(&mut rng, 4);
        let slots = [Some(slot_ticket(1)), None, Some(slot_ticket(3)), None];
        let env = build_envelope(&mut rng, &keys, &slots).unwrap();
        for bit in (0..ENVELOPE_LEN * 8).step_by(37) {
            let mut bytes = *env.as_bytes();
            bytes[bit / 8] ^= 1 << (bit % 8);
            let tampered = Envelope::from_bytes(bytes);
            assert_eq!(tampered.peel(&keys[0], true), Err(Error::EnvelopeMac));
            let loose = tampered.peel(&keys[0], false).unwrap();
            assert_eq!(loose.ticket, None);
        }
        // Another packet's key fails; without authentication, it still transforms.
        let other = &keys[1];
        assert_eq!(env.peel(other, true), Err(Error::EnvelopeMac));
        let peeled = env.peel(other, false).unwrap();
        assert_ne!(peeled.next, env);
    }

    #[test]
    fn shape_errors() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let five = keys(&mut rng, 5);
        for (k, s) in [(0, 0), (5, 5), (2, 3), (3, 2)] {
            let slots = vec![None; s];
            assert_eq!(
                build_envelope(&mut rng, &five[..k], &slots),
                Err(Error::EnvelopeShape {
                    keys: k,
                    slots: s,
                    max: ENVELOPE_SLOTS
                })
            );
        }
        assert_eq!(
            Envelope::from_slice(&[0; ENVELOPE_LEN - 1]),
            Err(Error::EnvelopeLength {
                got: ENVELOPE_LEN - 1,
                expected: ENVELOPE_LEN
            })
        );
    }

    #[test]
    fn keys_depend_on_the_tag() {
        let a = EnvelopeKey::from_replay_tag(&ReplayTag([1; 32]));
        let b = EnvelopeKey::from_replay_tag(&ReplayTag([1; 32]));
        let c = EnvelopeKey::from_replay_tag(&ReplayTag([2; 32]));
        assert_eq!(a.cipher, b.cipher);
        assert_eq!(a.mac, b.mac);
        assert_ne!(a.cipher, c.cipher);
        assert_ne!(&a.cipher[..], &a.mac[..32]);
        assert_eq!(format!("{a:?}"), "EnvelopeKey(<redacted>)");
    }
}
