//! Control messages between a client and its gateway, carried in [`crate::frame::Frame::Control`].
//!
//! `Hello` opens a session: the client names the 32-byte address its SURBs deliver to. Control
//! messages travel inside the client's Noise link to its gateway, and the address is
//! [`crate::link::session_address`] of the client's link key: the gateway refuses a hello whose
//! address the key it just saw proven does not own, so an address is no bearer token and
//! knowing one gives nothing.
//!
//! The gateway is paid in-band: the client sends `Payment` tickets (the gateway knows who the
//! client is anyway, so the ticket travels whole, not compacted); the gateway keeps a
//! [`crate::tab::Tab`] and answers a ticket it will not count with `PaymentRefused`, and a
//! client too far in arrears with `Cutoff`, before it stops serving it.
//!
//! # Encoding
//!
//! `"MMC1" | kind:u8 | body`, integers big-endian. The kind names both the message and the
//! layout of its body, and every body has one fixed length: a later layout of a message gets a
//! new kind, so an older peer refuses it by kind ([`Error::ControlKind`]) rather than
//! misreading it. A body of any other length is refused ([`Error::ControlLength`]).
//!
//! | kind | message | body |
//! |---:|---|---|
//! | 1 | `Hello` (client → gateway) | address: 32 |
//! | 2 | `Welcome` (gateway → client) | queued: u32 |
//! | 3 | `Payment` (client → gateway) | ticket: 209 ([`crate::ticket`]'s encoding) |
//! | 4 | `PaymentRefused` (gateway → client) | reason: u8 (see [`refusal`]) |
//! | 5 | `Cutoff` (gateway → client) | empty |
//! | 6 | `CosignedPayment` (client → gateway) | ticket: 209, then the pot owner's co-signature: 64 ([`CoSignature`]) |
//!
//! A client paying a gateway that settles on a chain sends `CosignedPayment` (kind 6); a
//! gateway that settles at the embedded ledger accepts either and ignores the co-signature.

use crate::packet::Address;
use crate::ticket::{COSIGNATURE_LEN, CoSignature, TICKET_LEN, Ticket};
use crate::{ADDRESS_LEN, Error, Result};

const MAGIC: &[u8; 4] = b"MMC1";
const HEAD_LEN: usize = MAGIC.len() + 1;
const KIND_HELLO: u8 = 1;
const KIND_WELCOME: u8 = 2;
const KIND_PAYMENT: u8 = 3;
const KIND_PAYMENT_REFUSED: u8 = 4;
const KIND_CUTOFF: u8 = 5;
const KIND_COSIGNED_PAYMENT: u8 = 6;
/// Bytes of a `CosignedPayment`'s body.
const COSIGNED_PAYMENT_LEN: usize = TICKET_LEN + COSIGNATURE_LEN;

/// A control message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    /// Client → gateway: open (or resume) the session for `address`.
    Hello { address: Address },
    /// Gateway → client: the session is open; `queued` deliveries were waiting in its inbox.
    Welcome { queued: u32 },
    /// Client → gateway: a ticket made out to the gateway, paying for the frames it forwards
    /// and delivers for this client.
    Payment { ticket: Ticket },
    /// Gateway → client: the last ticket was not counted, for `reason` (a [`refusal`] code;
    /// unknown codes are kept as they are, so a newer gateway's reasons still decode).
    PaymentRefused { reason: u8 },
    /// Gateway → client: arrears passed the gateway's limit and it stops serving this client.
    /// The client should top up its pot or pick another gateway.
    Cutoff,
    /// Client → gateway: a [`Control::Payment`] with the pot owner's co-signature, which a
    /// gateway that settles on a chain needs to redeem the ticket there.
    CosignedPayment {
        ticket: Ticket,
        cosignature: CoSignature,
    },
}

/// The reason codes of [`Control::PaymentRefused`].
pub mod refusal {
    use crate::Error;

    /// A reason this build does not name.
    pub const OTHER: u8 = 0;
    /// The ticket did not decode.
    pub const MALFORMED: u8 = 1;
    /// The ticket is made out to another relay.
    pub const WRONG_RECIPIENT: u8 = 2;
    /// The ticket had expired.
    pub const EXPIRED: u8 = 3;
    /// The ticket's issue time is in the future.
    pub const NOT_YET_VALID: u8 = 4;
    /// The signature does not verify.
    pub const FORGED: u8 = 5;
    /// The ticket is worth less than the gateway asks for.
    pub const TOO_SMALL: u8 = 6;
    /// The pot already paid with this nonce.
    pub const REPLAYED: u8 = 7;
    /// The pot's usable amount does not cover the face value.
    pub const POT_CANNOT_COVER: u8 = 8;
    /// The ticket names a commitment the gateway does not (or no longer) accept.
    pub const UNKNOWN_COMMITMENT: u8 = 9;
    /// The gateway settles on a chain and the ticket came without its pot owner's
    /// co-signature, or with one that is not the owner's.
    pub const COSIGNATURE: u8 = 10;

    /// The code for a ticket check's error ([`crate::ticket::Ticket::check_for_recipient`]
    /// and decoding). Nonce reuse, the pot's cover and the commitment need the gateway's
    /// state: it sends [`REPLAYED`], [`POT_CANNOT_COVER`] or [`UNKNOWN_COMMITMENT`] itself.
    pub fn for_error(e: &Error) -> u8 {
        match e {
            Error::TicketLength { .. } | Error::TicketVersion(..) => MALFORMED,
            Error::TicketWrongRecipient { .. } => WRONG_RECIPIENT,
            Error::TicketExpired { .. } => EXPIRED,
            Error::TicketNotYetValid { .. } => NOT_YET_VALID,
            Error::TicketForged => FORGED,
            Error::TicketValue { .. } => TOO_SMALL,
            Error::TicketRevealMismatch => UNKNOWN_COMMITMENT,
            _ => OTHER,
        }
    }

    /// A short stable label for a reason code, for logs and metrics.
    pub fn label(reason: u8) -> &'static str {
        match reason {
            MALFORMED => "malformed",
            WRONG_RECIPIENT => "wrong_recipient",
            EXPIRED => "expired",
            NOT_YET_VALID => "not_yet_valid",
            FORGED => "forged",
            TOO_SMALL => "too_small",
            REPLAYED => "replayed",
            POT_CANNOT_COVER => "pot_cannot_cover",
            UNKNOWN_COMMITMENT => "unknown_commitment",
            COSIGNATURE => "cosignature",
            _ => "other",
        }
    }
}

impl Control {
    /// The canonical encoding (see the module documentation).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        match self {
            Control::Hello { address } => {
                out.push(KIND_HELLO);
                out.extend_from_slice(&address.0);
            }
            Control::Welcome { queued } => {
                out.push(KIND_WELCOME);
                out.extend_from_slice(&queued.to_be_bytes());
            }
            Control::Payment { ticket } => {
                out.push(KIND_PAYMENT);
                out.extend_from_slice(&ticket.encode());
            }
            Control::PaymentRefused { reason } => {
                out.push(KIND_PAYMENT_REFUSED);
                out.push(*reason);
            }
            Control::Cutoff => out.push(KIND_CUTOFF),
            Control::CosignedPayment {
                ticket,
                cosignature,
            } => {
                out.push(KIND_COSIGNED_PAYMENT);
                out.extend_from_slice(&ticket.encode());
                out.extend_from_slice(&cosignature.0);
            }
        }
        out
    }

    /// Decodes one message; refuses a wrong magic, an unknown kind, and a body of the wrong
    /// length for its kind, each with its own error. A `Payment`'s ticket is decoded but its
    /// signature is not checked.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let Some((head, body)) = bytes.split_first_chunk::<HEAD_LEN>() else {
            return Err(Error::Truncated {
                what: "control message",
                needed: HEAD_LEN,
                got: bytes.len(),
            });
        };
        let [m0, m1, m2, m3, kind] = *head;
        if [m0, m1, m2, m3] != *MAGIC {
            return Err(Error::ControlMagic);
        }
        match kind {
            KIND_HELLO => Ok(Control::Hello {
                address: Address(fixed::<ADDRESS_LEN>("hello", body)?),
            }),
            KIND_WELCOME => Ok(Control::Welcome {
                queued: u32::from_be_bytes(fixed("welcome", body)?),
            }),
            KIND_PAYMENT => Ok(Control::Payment {
                ticket: Ticket::decode(&fixed::<TICKET_LEN>("payment", body)?)?,
            }),
            KIND_PAYMENT_REFUSED => {
                let [reason] = fixed("payment-refused", body)?;
                Ok(Control::PaymentRefused { reason })
            }
            KIND_CUTOFF => {
                fixed::<0>("cutoff", body)?;
                Ok(Control::Cutoff)
            }
            KIND_COSIGNED_PAYMENT => {
                let body = fixed::<COSIGNED_PAYMENT_LEN>("cosigned-payment", body)?;
                let (ticket, cosignature) = body.split_at(TICKET_LEN);
                let mut co = [0u8; COSIGNATURE_LEN];
                co.copy_from_slice(cosignature);
                Ok(Control::CosignedPayment {
                    ticket: Ticket::decode(ticket)?,
                    cosignature: CoSignature(co),
                })
            }
            other => Err(Error::ControlKind(other)),
        }
    }
}

/// `body` as exactly `N` bytes, or [`Error::ControlLength`] naming the message `kind`.
fn fixed<const N: usize>(kind: &'static str, body: &[u8]) -> Result<[u8; N]> {
    body.try_into().map_err(|_| Error::ControlLength {
        kind,
        got: body.len(),
        expected: N,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::IdentityKey;
    use crate::ticket::{TicketFields, commitment_of};
    use ed25519_dalek::SigningKey;
    use proptest::prelude::*;

    fn ticket() -> Ticket {
        Ticket::sign(
            TicketFields {
                recipient: IdentityKey([6; 32]),
                face_value: 1_000,
                win_ratio: u64::MAX / 4,
                nonce: [7; 16],
                issued: 1_000,
                expiry: 4_600,
                commitment: commitment_of(&[8; 32]),
            },
            &SigningKey::from_bytes(&[5; 32]),
        )
    }

    #[test]
    fn layouts_are_fixed() {
        assert_eq!(
            Control::Hello {
                address: Address([9; 32])
            }
            .encode(),
            [b"MMC1".as_slice(), &[1], &[9; 32]].concat()
        );
        assert_eq!(
            Control::Welcome { queued: 258 }.encode(),
            b"MMC1\x02\x00\x00\x01\x02"
        );
        let t = ticket();
        let payment = Control::Payment { ticket: t }.encode();
        assert_eq!(payment.len(), 5 + TICKET_LEN);
        assert_eq!(&payment[..5], b"MMC1\x03");
        assert_eq!(&payment[5..], &t.encode());
        assert_eq!(
            Control::PaymentRefused {
                reason: refusal::REPLAYED
            }
            .encode(),
            b"MMC1\x04\x07"
        );
        assert_eq!(Control::Cutoff.encode(), b"MMC1\x05");
        let cosigned = Control::CosignedPayment {
            ticket: t,
            cosignature: CoSignature([0xab; COSIGNATURE_LEN]),
        }
        .encode();
        assert_eq!(cosigned.len(), 5 + 209 + 64);
        assert_eq!(&cosigned[..5], b"MMC1\x06");
        assert_eq!(&cosigned[5..5 + TICKET_LEN], &t.encode());
        assert_eq!(&cosigned[5 + TICKET_LEN..], &[0xab; COSIGNATURE_LEN]);
    }

    #[test]
    fn decoding_refuses_wrong_lengths_kinds_and_magic() {
        let all = [
            Control::Hello {
                address: Address([1; 32]),
            },
            Control::Welcome { queued: 3 },
            Control::Payment { ticket: ticket() },
            Control::PaymentRefused { reason: 200 },
            Control::Cutoff,
            Control::CosignedPayment {
                ticket: ticket(),
                cosignature: CoSignature([0xc5; COSIGNATURE_LEN]),
            },
        ];
        for (c, name) in all.iter().zip([
            "hello",
            "welcome",
            "payment",
            "payment-refused",
            "cutoff",
            "cosigned-payment",
        ]) {
            let bytes = c.encode();
            assert_eq!(Control::decode(&bytes).as_ref(), Ok(c));
            let body = bytes.len() - HEAD_LEN;
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(
                Control::decode(&longer),
                Err(Error::ControlLength {
                    kind: name,
                    got: body + 1,
                    expected: body
                })
            );
            if body > 0 {
                assert_eq!(
                    Control::decode(&bytes[..bytes.len() - 1]),
                    Err(Error::ControlLength {
                        kind: name,
                        got: body - 1,
                        expected: body
                    })
                );
            }
        }
        assert_eq!(Control::decode(b"MMC1\x07"), Err(Error::ControlKind(7)));
        assert_eq!(Control::decode(b"MMC1\x00"), Err(Error::ControlKind(0)));
        assert_eq!(Control::decode(b"MMC2\x05"), Err(Error::ControlMagic));
        assert_eq!(
            Control::decode(b"MMC1"),
            Err(Error::Truncated {
                what: "control message",
                needed: 5,
                got: 4
            })
        );
        // A payment's ticket of another version is refused by the ticket decoder.
        let mut bytes = Control::Payment { ticket: ticket() }.encode();
        bytes[5] = 9;
        assert_eq!(Control::decode(&bytes), Err(Error::TicketVersion(9, 1)));
        let mut bytes = Control::CosignedPayment {
            ticket: ticket(),
            cosignature: CoSignature([1; COSIGNATURE_LEN]),
        }
        .encode();
        bytes[5] = 9;
        assert_eq!(Control::decode(&bytes), Err(Error::TicketVersion(9, 1)));
        // A co-signature alone, or a ticket without one, under kind 6.
        let mut only_cosignature = b"MMC1\x06".to_vec();
        only_cosignature.extend_from_slice(&[1; COSIGNATURE_LEN]);
        assert_eq!(
            Control::decode(&only_cosignature),
            Err(Error::ControlLength {
                kind: "cosigned-payment",
                got: COSIGNATURE_LEN,
                expected: COSIGNED_PAYMENT_LEN
            })
        );
        let mut ticket_only = b"MMC1\x06".to_vec();
        ticket_only.extend_from_slice(&ticket().encode());
        assert!(matches!(
            Control::decode(&ticket_only),
            Err(Error::ControlLength {
                got: TICKET_LEN,
                ..
            })
        ));
        for e in [
            Error::ControlMagic,
            Error::ControlKind(9),
            Error::ControlLength {
                kind: "cutoff",
                got: 1,
                expected: 0,
            },
        ] {
            assert_eq!(e.label(), "control_malformed");
        }
    }

    #[test]
    fn refusal_codes_name_the_ticket_checks() {
        assert_eq!(refusal::for_error(&Error::TicketForged), refusal::FORGED);
        assert_eq!(
            refusal::for_error(&Error::TicketExpired { expiry: 1, now: 2 }),
            refusal::EXPIRED
        );
        assert_eq!(refusal::for_error(&Error::NoExit), refusal::OTHER);
        assert_eq!(
            refusal::label(refusal::POT_CANNOT_COVER),
            "pot_cannot_cover"
        );
        assert_eq!(refusal::label(250), "other");
        assert_eq!(refusal::label(refusal::COSIGNATURE), "cosignature");
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(c) = Control::decode(&bytes) {
                prop_assert_eq!(c.encode(), bytes);
            }
        }
    }
}
