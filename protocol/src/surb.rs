//! Single-use reply blocks (SURBs).
//!
//! A client builds a [`ReplyBlock`] over `[L1', L2', L3', its gateway]` addressed to itself and
//! keeps the matching [`ReplyKey`]. Whoever holds the block (an exit answering a stream, or the
//! exit acknowledging a fragment: a SURB-ACK) can send exactly one packet back without learning
//! who the client is. The client finds the key by the [`SurbId`] its gateway hands over, and
//! [`ReplyKey::open`] both decrypts and authenticates the reply (Lioness garbles any change,
//! and Sphinx's zero prefix then fails to verify).
//!
//! We use sphinx-packet's single-seed SURBs (version 260): the block carries only the last
//! hop's payload seed, so a holder learns nothing that would let it read other layers. The
//! blocks are built by [`crate::sphinx_builder`] (one key derivation per block) and parsed
//! into sphinx-packet's `SURB`, which relays and holders use unchanged.

use std::fmt;
use std::time::Duration;

use rand::CryptoRng;
use sphinx_packet::payload::Payload;
use sphinx_packet::surb::{SURB, SurbReplyRecovery};
use zeroize::Zeroizing;

use crate::packet::{Address, Packet, RouteHop, SurbId, sphinx_delays};
use crate::sphinx_builder;
use crate::{ADDRESS_LEN, Error, HEADER_SIZE, PAYLOAD_SIZE, PLAINTEXT_SIZE, Result};

const SEED_LEN: usize = sphinx_packet::constants::PAYLOAD_KEY_SEED_SIZE;

/// Bytes of an encoded [`ReplyBlock`]: key epoch, header, first hop, one payload seed.
pub const REPLY_BLOCK_LEN: usize = 4 + REPLY_BLOCK_BODY_LEN;
/// Bytes of an encoded [`ReplyBlock`] without its key epoch: header, first hop, one seed.
pub const REPLY_BLOCK_BODY_LEN: usize = HEADER_SIZE + ADDRESS_LEN + SEED_LEN;

/// A single-use reply block, as its holder sees it.
pub struct ReplyBlock {
    /// The epoch whose Sphinx keys the block was built with; the reply's frames carry it.
    key_epoch: u32,
    surb: SURB,
}

impl fmt::Debug for ReplyBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplyBlock")
            .field("key_epoch", &self.key_epoch)
            .finish_non_exhaustive()
    }
}

/// What a holder sends when it uses a reply block.
#[derive(Debug)]
pub struct Reply {
    /// The relay to hand the packet to.
    pub first_hop: Address,
    /// The epoch of the keys the packet was built for.
    pub key_epoch: u32,
    pub packet: Packet,
}

impl ReplyBlock {
    /// The epoch whose keys the block uses.
    pub fn key_epoch(&self) -> u32 {
        self.key_epoch
    }

    /// The first relay of the reply route.
    pub fn first_hop(&self) -> Address {
        Address(self.surb.first_hop().to_bytes())
    }

    /// Seals `plaintext` into a reply packet. Consumes the block: it is single-use.
    pub fn use_block(self, plaintext: &[u8]) -> Result<Reply> {
        if plaintext.len() > PLAINTEXT_SIZE {
            return Err(Error::TooLong {
                what: "reply plaintext",
                len: plaintext.len(),
                max: PLAINTEXT_SIZE,
            });
        }
        let first_hop = self.first_hop();
        let key_epoch = self.key_epoch;
        let (packet, _) = self
            .surb
            .use_surb(plaintext, PAYLOAD_SIZE)
            .map_err(|e| Error::Build(e.to_string()))?;
        Ok(Reply {
            first_hop,
            key_epoch,
            packet: Packet::from_slice(&packet.to_bytes())?,
        })
    }

    /// Encodes the block in exactly [`REPLY_BLOCK_LEN`] bytes.
    pub fn to_bytes(&self) -> [u8; REPLY_BLOCK_LEN] {
        let mut out = [0u8; REPLY_BLOCK_LEN];
        out[..4].copy_from_slice(&self.key_epoch.to_be_bytes());
        out[4..].copy_from_slice(&self.body_bytes());
        out
    }

    /// Decodes a block, refusing any other length or a malformed header.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != REPLY_BLOCK_LEN {
            return Err(Error::ReplyBlock(format!(
                "{} bytes; a reply block has {REPLY_BLOCK_LEN}",
                bytes.len()
            )));
        }
        let mut epoch = [0u8; 4];
        epoch.copy_from_slice(&bytes[..4]);
        Self::from_body(u32::from_be_bytes(epoch), &bytes[4..])
    }

    /// The block without its key epoch, in exactly [`REPLY_BLOCK_BODY_LEN`] bytes: for a list
    /// of blocks that says their epoch once.
    pub fn body_bytes(&self) -> [u8; REPLY_BLOCK_BODY_LEN] {
        let mut out = [0u8; REPLY_BLOCK_BODY_LEN];
        let surb = self.surb.to_bytes();
        // A single-seed SURB always serialises to header + address + one seed.
        let n = surb.len().min(REPLY_BLOCK_BODY_LEN);
        out[..n].copy_from_slice(&surb[..n]);
        out
    }

    /// Decodes [`Self::body_bytes`] of a block for `key_epoch`, refusing any other length or a
    /// malformed header.
    pub fn from_body(key_epoch: u32, body: &[u8]) -> Result<Self> {
        if body.len() != REPLY_BLOCK_BODY_LEN {
            return Err(Error::ReplyBlock(format!(
                "{} bytes; a reply block without its epoch has {REPLY_BLOCK_BODY_LEN}",
                body.len()
            )));
        }
        let surb = SURB::from_bytes(body).map_err(|e| Error::ReplyBlock(e.to_string()))?;
        Ok(ReplyBlock { key_epoch, surb })
    }
}

/// What the client keeps to read the reply to one of its blocks.
pub struct ReplyKey {
    recovery: SurbReplyRecovery,
}

impl fmt::Debug for ReplyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReplyKey(<redacted>)")
    }
}

impl ReplyKey {
    /// Decrypts a reply's payload, as delivered by the gateway, and checks it is authentic.
    pub fn open(&self, payload: &[u8]) -> Result<Vec<u8>> {
        let sealed = Payload::from_bytes(payload).map_err(|_| Error::ReplyNotAuthentic)?;
        self.recovery
            .recover_plaintext(sealed)
            .map_err(|_| Error::ReplyNotAuthentic)
    }

    /// The identifier the reply arrives under.
    pub fn surb_id(&self) -> SurbId {
        *self.recovery.identifier()
    }
}

/// Builds a reply block over `route` (ending at the client's gateway), addressed to
/// `client` there. Returns the block to hand out and the key to keep, found later by its id.
pub fn build_reply_block<R: CryptoRng + ?Sized>(
    rng: &mut R,
    route: &[RouteHop],
    delays: &[Duration],
    client: Address,
    key_epoch: u32,
) -> Result<(ReplyBlock, ReplyKey)> {
    let mut surb_id: SurbId = [0; crate::SURB_ID_LEN];
    // A zero identifier is reserved ("no SURB"); redraw until non-zero (2^-128 per draw).
    while surb_id == [0; crate::SURB_ID_LEN] {
        rng.fill_bytes(&mut surb_id);
    }
    build_reply_block_with_id(rng, route, delays, client, key_epoch, surb_id)
}

/// [`build_reply_block`] with the identifier the reply arrives under chosen by the caller
/// (a client's tagged identifier, [`crate::delivery`]).
pub fn build_reply_block_with_id<R: CryptoRng + ?Sized>(
    rng: &mut R,
    route: &[RouteHop],
    delays: &[Duration],
    client: Address,
    key_epoch: u32,
    surb_id: SurbId,
) -> Result<(ReplyBlock, ReplyKey)> {
    // The exit that uses the block cannot build a payment envelope for hops it does not
    // know: tell every hop not to enforce one.
    let delays = sphinx_delays(route, delays, false)?;
    if surb_id == [0; crate::SURB_ID_LEN] {
        return Err(Error::Build(
            "a reply block needs a non-zero identifier to find its key by".into(),
        ));
    }
    // Built as sphinx-packet's single-seed SURB (version 260), from one key derivation.
    let (secrets, header) = sphinx_builder::build(rng, route, &delays, client, surb_id)?;
    let build_error = |e: sphinx_packet::Error| Error::Build(e.to_string());
    // The block: the header, its first hop, and the seed for the layer its user adds.
    let mut block = Zeroizing::new(Vec::with_capacity(REPLY_BLOCK_LEN));
    block.extend_from_slice(&header);
    if let Some(first) = route.first() {
        block.extend_from_slice(&first.address.0);
    }
    // The key: the identifier and every hop's seed, to take the reply's layers off.
    let mut recovery = Zeroizing::new(surb_id.to_vec());
    for hop in &secrets.hops {
        recovery.extend_from_slice(&hop.payload_seed());
    }
    if let Some(last) = secrets.hops.last() {
        block.extend_from_slice(&last.payload_seed());
    }
    let surb = SURB::from_bytes(&block).map_err(build_error)?;
    let recovery = SurbReplyRecovery::from_bytes(&recovery).map_err(build_error)?;
    Ok((ReplyBlock { key_epoch, surb }, ReplyKey { recovery }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{HopOutput, OpenedPacket, PublicKey, StaticSecret};
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn encoded_length_is_fixed() {
        assert_eq!(REPLY_BLOCK_LEN, 400);
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let s = StaticSecret::random_from_rng(&mut rng);
        let route = vec![RouteHop {
            address: Address([1; 32]),
            sphinx_key: PublicKey::from(&s),
        }];
        let (block, _) =
            build_reply_block(&mut rng, &route, &[Duration::ZERO], Address([2; 32]), 7).unwrap();
        let bytes = block.to_bytes();
        let again = ReplyBlock::from_bytes(&bytes).unwrap();
        assert_eq!(again.to_bytes(), bytes);
        assert_eq!(again.key_epoch(), 7);
        assert!(ReplyBlock::from_bytes(&bytes[1..]).is_err());
    }

    #[test]
    fn forged_reply_is_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let secrets: Vec<_> = (0..2)
            .map(|_| StaticSecret::random_from_rng(&mut rng))
            .collect();
        let route: Vec<_> = secrets
            .iter()
            .enumerate()
            .map(|(i, s)| RouteHop {
                address: Address([i as u8; 32]),
                sphinx_key: PublicKey::from(s),
            })
            .collect();
        let (block, key) =
            build_reply_block(&mut rng, &route, &[Duration::ZERO; 2], Address([9; 32]), 1).unwrap();
        let reply = block.use_block(b"answer").unwrap();
        let mut bytes = reply.packet.as_bytes().to_vec();
        for secret in &secrets {
            match OpenedPacket::open(&bytes, secret)
                .unwrap()
                .process(Duration::MAX)
                .unwrap()
            {
                HopOutput::Forward { packet, .. } => bytes = packet.as_bytes().to_vec(),
                HopOutput::Final(d) => {
                    assert_eq!(d.surb_id, key.surb_id());
                    let mut forged = d.payload.clone();
                    forged[100] ^= 1;
                    assert_eq!(key.open(&forged[..]), Err(Error::ReplyNotAuthentic));
                    assert_eq!(key.open(&d.payload[..]).unwrap(), b"answer");
                    return;
                }
            }
        }
        panic!("never reached the final hop");
    }
}
