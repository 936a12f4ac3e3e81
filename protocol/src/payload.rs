//! What a packet carries once the last hop has removed every layer.
//!
//! One kind byte, then the content. A forward data packet carries the fragment and a
//! SURB-ACK (a [`ReplyBlock`] the receiver uses to acknowledge it); a reply packet, and a
//! forward packet whose message needs no acknowledgement (reply blocks and acks alone),
//! carries a fragment only; an acknowledgement and cover carry nothing. Sphinx pads every payload to
//! the same size, so none of this is visible on the wire.

use crate::fragment::{FRAGMENT_HEADER_LEN, Fragment};
use crate::surb::{REPLY_BLOCK_LEN, ReplyBlock};
use crate::{Error, PLAINTEXT_SIZE, Result};

const KIND_DATA_WITH_ACK: u8 = 1;
const KIND_DATA: u8 = 2;
const KIND_ACK: u8 = 3;
const KIND_COVER: u8 = 4;

/// Fragment data bytes in a forward packet (after the kind byte, SURB-ACK and fragment header).
pub const FORWARD_FRAGMENT_DATA_LEN: usize =
    PLAINTEXT_SIZE - 1 - REPLY_BLOCK_LEN - FRAGMENT_HEADER_LEN;

/// Fragment data bytes in a packet without a SURB-ACK (replies, and forward packets whose
/// message needs no acknowledgement).
pub const REPLY_FRAGMENT_DATA_LEN: usize = PLAINTEXT_SIZE - 1 - FRAGMENT_HEADER_LEN;

/// The plaintext content of a packet.
#[derive(Debug)]
pub enum Content {
    /// A fragment of a message, with the block to acknowledge it by (forward packets).
    DataWithAck { ack: ReplyBlock, fragment: Fragment },
    /// A fragment of a message (replies, and forward messages needing no acknowledgement).
    Data { fragment: Fragment },
    /// An acknowledgement; the SURB id it arrived under says what it acknowledges.
    Ack,
    /// Cover traffic: read and discarded.
    Cover,
}

impl Content {
    /// A data packet's SURB-ACK (if it has one) and fragment; `None` for an acknowledgement
    /// or cover.
    pub fn into_data(self) -> Option<(Option<ReplyBlock>, Fragment)> {
        match self {
            Content::DataWithAck { ack, fragment } => Some((Some(ack), fragment)),
            Content::Data { fragment } => Some((None, fragment)),
            Content::Ack | Content::Cover => None,
        }
    }

    /// Encodes the content; errors if it does not fit one packet.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(PLAINTEXT_SIZE);
        match self {
            Content::DataWithAck { ack, fragment } => {
                out.push(KIND_DATA_WITH_ACK);
                out.extend_from_slice(&ack.to_bytes());
                fragment.encode_into(&mut out);
            }
            Content::Data { fragment } => {
                out.push(KIND_DATA);
                fragment.encode_into(&mut out);
            }
            Content::Ack => out.push(KIND_ACK),
            Content::Cover => out.push(KIND_COVER),
        }
        if out.len() > PLAINTEXT_SIZE {
            return Err(Error::TooLong {
                what: "packet content",
                len: out.len(),
                max: PLAINTEXT_SIZE,
            });
        }
        Ok(out)
    }

    /// Decodes a packet's plaintext. Refuses what [`Content::encode`] would not write, so
    /// every decoded content re-encodes to the same bytes: a plaintext longer than
    /// [`PLAINTEXT_SIZE`] ([`Error::ContentLength`]), and bytes after an `Ack` or `Cover`
    /// ([`Error::ContentTrailing`]).
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > PLAINTEXT_SIZE {
            return Err(Error::ContentLength {
                len: bytes.len(),
                max: PLAINTEXT_SIZE,
            });
        }
        let Some((&kind, rest)) = bytes.split_first() else {
            return Err(Error::Truncated {
                what: "packet content",
                needed: 1,
                got: 0,
            });
        };
        let empty = |content: Content| {
            if rest.is_empty() {
                Ok(content)
            } else {
                Err(Error::ContentTrailing {
                    what: if kind == KIND_ACK {
                        "acknowledgement"
                    } else {
                        "cover"
                    },
                    len: rest.len(),
                })
            }
        };
        match kind {
            KIND_DATA_WITH_ACK => {
                if rest.len() < REPLY_BLOCK_LEN {
                    return Err(Error::Truncated {
                        what: "SURB-ACK",
                        needed: REPLY_BLOCK_LEN,
                        got: rest.len(),
                    });
                }
                let (ack, fragment) = rest.split_at(REPLY_BLOCK_LEN);
                Ok(Content::DataWithAck {
                    ack: ReplyBlock::from_bytes(ack)?,
                    fragment: Fragment::decode(fragment)?,
                })
            }
            KIND_DATA => Ok(Content::Data {
                fragment: Fragment::decode(rest)?,
            }),
            KIND_ACK => empty(Content::Ack),
            KIND_COVER => empty(Content::Cover),
            other => Err(Error::ContentKind(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(FORWARD_FRAGMENT_DATA_LEN, 1618);
        assert_eq!(REPLY_FRAGMENT_DATA_LEN, 2018);
        let full = Content::Data {
            fragment: Fragment {
                message_id: 1,
                index: 0,
                count: 1,
                data: vec![0; REPLY_FRAGMENT_DATA_LEN],
            },
        };
        assert_eq!(full.encode().unwrap().len(), PLAINTEXT_SIZE);
        let over = Content::Data {
            fragment: Fragment {
                message_id: 1,
                index: 0,
                count: 1,
                data: vec![0; REPLY_FRAGMENT_DATA_LEN + 1],
            },
        };
        assert!(over.encode().is_err());
    }

    #[test]
    fn unknown_and_truncated_are_errors() {
        assert_eq!(
            Content::decode(&[]).unwrap_err().label(),
            "content_malformed"
        );
        assert_eq!(Content::decode(&[99]).unwrap_err(), Error::ContentKind(99));
        assert!(matches!(
            Content::decode(&[KIND_DATA_WITH_ACK, 0, 0]),
            Err(Error::Truncated { .. })
        ));
        assert!(matches!(Content::decode(&[KIND_COVER]), Ok(Content::Cover)));
    }

    /// The fuzz finding of 2026-12-01 (`fuzz/corpus/content/`): a plaintext longer than one
    /// packet carries decoded, and then did not encode.
    #[test]
    fn what_does_not_fit_a_packet_is_refused() {
        let mut long = vec![KIND_DATA, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1];
        long.resize(PLAINTEXT_SIZE + 1, 0);
        let err = Content::decode(&long).unwrap_err();
        assert_eq!(
            err,
            Error::ContentLength {
                len: PLAINTEXT_SIZE + 1,
                max: PLAINTEXT_SIZE
            }
        );
        assert_eq!(err.label(), "content_malformed");
        long.pop();
        let full = Content::decode(&long).unwrap();
        assert_eq!(full.encode().unwrap(), long);
    }

    /// An acknowledgement or cover is its kind byte alone: anything after it is refused, so
    /// the decoded value re-encodes to the same bytes.
    #[test]
    fn ack_and_cover_carry_nothing_after_their_kind() {
        for (kind, what) in [(KIND_ACK, "acknowledgement"), (KIND_COVER, "cover")] {
            let decoded = Content::decode(&[kind]).unwrap();
            assert_eq!(decoded.encode().unwrap(), [kind]);
            assert_eq!(
                Content::decode(&[kind, 0]).unwrap_err(),
                Error::ContentTrailing { what, len: 1 }
            );
            assert_eq!(
                Content::decode(&[kind, 1, 2, 3]).unwrap_err().label(),
                "content_malformed"
            );
        }
    }
}
