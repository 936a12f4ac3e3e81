//! The frame: the one unit on every Murmur link, relay↔relay TCP and client↔gateway WebSocket.
//!
//! Every frame is exactly [`FRAME_LEN`] bytes whatever it carries, cover and real alike, so an
//! observer of a link learns only how many frames crossed it.
//!
//! ```text
//! 0       1      2        4
//! version kind   reserved body (zero-padded to FRAME_LEN)
//!   Packet   key_epoch:u32 packet:2396 envelope:640                relay → relay
//!   Forward  next_hop:32 key_epoch:u32 packet:2396 envelope:640    client → gateway
//!   Deliver  surb_id:16 payload:2048                               gateway → client
//!   Control  len:u16 bytes                                         either way
//! ```
//! Integers are big-endian. Reserved and padding bytes must be zero: anything else is refused,
//! so a frame has exactly one encoding. Version 2 added the payment envelope
//! ([`crate::envelope`]) beside every packet; the version byte lets a later wire format (link
//! encryption) be told apart and refused cleanly by older peers.

use crate::envelope::{ENVELOPE_LEN, Envelope};
use crate::packet::{Address, Packet, SurbId};
use crate::{ADDRESS_LEN, Error, PACKET_SIZE, PAYLOAD_SIZE, Result, SURB_ID_LEN};

/// The wire version this build speaks.
pub const FRAME_VERSION: u8 = 2;

const PREFIX_LEN: usize = 4;

/// Bytes of every frame.
pub const FRAME_LEN: usize = PREFIX_LEN + ADDRESS_LEN + 4 + PACKET_SIZE + ENVELOPE_LEN;

/// The most bytes a control frame carries.
pub const MAX_CONTROL_LEN: usize = FRAME_LEN - PREFIX_LEN - 2;

const KIND_PACKET: u8 = 1;
const KIND_FORWARD: u8 = 2;
const KIND_DELIVER: u8 = 3;
const KIND_CONTROL: u8 = 4;

/// A decoded frame.
#[derive(Clone, PartialEq, Eq)]
pub enum Frame {
    /// A Sphinx packet for the receiving relay, sealed with its key for `key_epoch`, and its
    /// payment envelope.
    Packet {
        key_epoch: u32,
        packet: Packet,
        envelope: Envelope,
    },
    /// From a client to its gateway: pass `packet` and its envelope on to `next_hop` (a
    /// layer-1 mix).
    Forward {
        next_hop: Address,
        key_epoch: u32,
        packet: Packet,
        envelope: Envelope,
    },
    /// From a gateway to a client: a final-hop payload that arrived for it.
    Deliver {
        surb_id: SurbId,
        payload: Box<[u8; PAYLOAD_SIZE]>,
    },
    /// A session message (hello, payment, ...), at most [`MAX_CONTROL_LEN`] bytes.
    Control(Vec<u8>),
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Frame::Packet { key_epoch, .. } => write!(f, "Frame::Packet(epoch {key_epoch})"),
            Frame::Forward {
                next_hop,
                key_epoch,
                ..
            } => write!(f, "Frame::Forward({next_hop:?}, epoch {key_epoch})"),
            Frame::Deliver { .. } => write!(f, "Frame::Deliver"),
            Frame::Control(b) => write!(f, "Frame::Control({} bytes)", b.len()),
        }
    }
}

impl Frame {
    /// Encodes into a fresh buffer of [`FRAME_LEN`] bytes.
    pub fn encode(&self) -> Result<Box<[u8; FRAME_LEN]>> {
        let mut out = Box::new([0u8; FRAME_LEN]);
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// Encodes into `out`, overwriting all of it.
    pub fn encode_into(&self, out: &mut [u8; FRAME_LEN]) -> Result<()> {
        out.fill(0);
        out[0] = FRAME_VERSION;
        out[1] = match self {
            Frame::Packet { .. } => KIND_PACKET,
            Frame::Forward { .. } => KIND_FORWARD,
            Frame::Deliver { .. } => KIND_DELIVER,
            Frame::Control(_) => KIND_CONTROL,
        };
        let body = &mut out[PREFIX_LEN..];
        match self {
            Frame::Packet {
                key_epoch,
                packet,
                envelope,
            } => {
                body[..4].copy_from_slice(&key_epoch.to_be_bytes());
                body[4..4 + PACKET_SIZE].copy_from_slice(packet.as_bytes());
                body[4 + PACKET_SIZE..4 + PACKET_SIZE + ENVELOPE_LEN]
                    .copy_from_slice(envelope.as_bytes());
            }
            Frame::Forward {
                next_hop,
                key_epoch,
                packet,
                envelope,
            } => {
                const AT: usize = ADDRESS_LEN + 4;
                body[..ADDRESS_LEN].copy_from_slice(&next_hop.0);
                body[ADDRESS_LEN..AT].copy_from_slice(&key_epoch.to_be_bytes());
                body[AT..AT + PACKET_SIZE].copy_from_slice(packet.as_bytes());
                body[AT + PACKET_SIZE..].copy_from_slice(envelope.as_bytes());
            }
            Frame::Deliver { surb_id, payload } => {
                body[..SURB_ID_LEN].copy_from_slice(surb_id);
                body[SURB_ID_LEN..SURB_ID_LEN + PAYLOAD_SIZE].copy_from_slice(&payload[..]);
            }
            Frame::Control(data) => {
                if data.len() > MAX_CONTROL_LEN {
                    out.fill(0);
                    return Err(Error::TooLong {
                        what: "control message",
                        len: data.len(),
                        max: MAX_CONTROL_LEN,
                    });
                }
                // MAX_CONTROL_LEN < 2^16, so the length fits.
                let len = data.len() as u16;
                body[..2].copy_from_slice(&len.to_be_bytes());
                body[2..2 + data.len()].copy_from_slice(data);
            }
        }
        Ok(())
    }

    /// Decodes one frame of exactly [`FRAME_LEN`] bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != FRAME_LEN {
            return Err(Error::FrameLength {
                got: bytes.len(),
                expected: FRAME_LEN,
            });
        }
        if bytes[0] != FRAME_VERSION {
            return Err(Error::FrameVersion(bytes[0], FRAME_VERSION));
        }
        if bytes[2..PREFIX_LEN] != [0, 0] {
            return Err(Error::FramePadding("reserved header"));
        }
        let body = &bytes[PREFIX_LEN..];
        let epoch_at =
            |at: usize| u32::from_be_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
        let zero_tail = |from: usize| {
            if body[from..].iter().all(|&b| b == 0) {
                Ok(())
            } else {
                Err(Error::FramePadding("padding"))
            }
        };
        match bytes[1] {
            KIND_PACKET => {
                const END: usize = 4 + PACKET_SIZE + ENVELOPE_LEN;
                zero_tail(END)?;
                Ok(Frame::Packet {
                    key_epoch: epoch_at(0),
                    packet: Packet::from_slice(&body[4..4 + PACKET_SIZE])?,
                    envelope: Envelope::from_slice(&body[4 + PACKET_SIZE..END])?,
                })
            }
            KIND_FORWARD => {
                const AT: usize = ADDRESS_LEN + 4;
                let mut next_hop = [0u8; ADDRESS_LEN];
                next_hop.copy_from_slice(&body[..ADDRESS_LEN]);
                Ok(Frame::Forward {
                    next_hop: Address(next_hop),
                    key_epoch: epoch_at(ADDRESS_LEN),
                    packet: Packet::from_slice(&body[AT..AT + PACKET_SIZE])?,
                    envelope: Envelope::from_slice(&body[AT + PACKET_SIZE..])?,
                })
            }
            KIND_DELIVER => {
                zero_tail(SURB_ID_LEN + PAYLOAD_SIZE)?;
                let mut surb_id = [0u8; SURB_ID_LEN];
                surb_id.copy_from_slice(&body[..SURB_ID_LEN]);
                let mut payload = Box::new([0u8; PAYLOAD_SIZE]);
                payload.copy_from_slice(&body[SURB_ID_LEN..SURB_ID_LEN + PAYLOAD_SIZE]);
                Ok(Frame::Deliver { surb_id, payload })
            }
            KIND_CONTROL => {
                let len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                if len > MAX_CONTROL_LEN {
                    return Err(Error::TooLong {
                        what: "control message",
                        len,
                        max: MAX_CONTROL_LEN,
                    });
                }
                zero_tail(2 + len)?;
                Ok(Frame::Control(body[2..2 + len].to_vec()))
            }
            other => Err(Error::FrameKind(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        assert_eq!(FRAME_LEN, 3076);
        let f = Frame::Control(b"hi".to_vec()).encode().unwrap();
        assert_eq!(
            &f[..8],
            &[FRAME_VERSION, KIND_CONTROL, 0, 0, 0, 2, b'h', b'i']
        );
    }

    #[test]
    fn malformed_frames_are_refused_with_distinct_errors() {
        let good = Frame::Control(vec![1, 2, 3]).encode().unwrap();
        assert!(matches!(
            Frame::decode(&good[1..]),
            Err(Error::FrameLength { .. })
        ));
        let mut bad = good.clone();
        bad[0] = 9;
        assert_eq!(
            Frame::decode(&bad[..]),
            Err(Error::FrameVersion(9, FRAME_VERSION))
        );
        let mut bad = good.clone();
        bad[1] = 77;
        assert_eq!(Frame::decode(&bad[..]), Err(Error::FrameKind(77)));
        let mut bad = good.clone();
        bad[3] = 1;
        assert_eq!(
            Frame::decode(&bad[..]),
            Err(Error::FramePadding("reserved header"))
        );
        let mut bad = good.clone();
        bad[FRAME_LEN - 1] = 1;
        assert_eq!(Frame::decode(&bad[..]), Err(Error::FramePadding("padding")));
        let mut bad = good;
        bad[4] = 0xff;
        assert!(matches!(
            Frame::decode(&bad[..]),
            Err(Error::TooLong { .. })
        ));
        assert!(
            Frame::Control(vec![0; MAX_CONTROL_LEN + 1])
                .encode()
                .is_err()
        );
        assert!(Frame::Control(vec![0; MAX_CONTROL_LEN]).encode().is_ok());
    }
}
