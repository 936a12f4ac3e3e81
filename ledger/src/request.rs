//! Signed requests: every request that moves money is signed by the key whose money it moves.
//!
//! A [`Signed`] request carries its signer, a timestamp, a random nonce, the operation and an
//! Ed25519 signature over a canonical, domain-separated message:
//!
//! ```text
//! "murmur/ledger/v1\0" ‖ operation name ‖ 0x00 ‖ signer (32) ‖ timestamp (8, BE) ‖ nonce (16)
//!     ‖ the operation's fields, fixed width (u64 big-endian, keys 32 bytes, a ticket its
//!       209-byte encoding)
//! ```
//!
//! The ledger refuses a timestamp further than its `request_window` from its clock, and
//! remembers each `(signer, nonce)` it decided until the window has passed, so a captured
//! request cannot be played again. JSON carries keys, nonces, signatures and tickets as
//! lower-case hex; the signature covers the values, not the JSON text.

use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey};
use murmur_protocol::directory::{IdentityKey, UnixTime};
use murmur_protocol::ticket::Ticket;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::records::{Pot, Redemption, Transfer};
use crate::{Refusal, Result};

const DOMAIN: &[u8] = b"murmur/ledger/v1\0";

/// An operation that moves money, as a [`Signed`] request carries it.
pub trait Operation:
    Clone + fmt::Debug + PartialEq + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// Its name: in the signed message, the route (`POST /v1/{NAME}`) and the metrics.
    const NAME: &'static str;
    /// What the ledger answers when it carries the operation out.
    type Output: Clone + fmt::Debug + Serialize + DeserializeOwned + Send + 'static;
    /// Appends the operation's fields, fixed width, to the signed message.
    fn write_fields(&self, out: &mut Vec<u8>);
}

/// Move `balance + escrow` from the signer's account into `pot` (creating it). Anyone may
/// fund any pot; only the pot's key can warn and withdraw.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fund {
    #[serde(with = "hex::key")]
    pub pot: IdentityKey,
    /// Added to the pot's balance, which pays winning tickets.
    pub balance: u64,
    /// Added to the pot's escrow, which an overdraft burns.
    pub escrow: u64,
}

/// Start the notice period for withdrawing `amount` from the signer's pot (replacing any
/// earlier warning and restarting its clock; 0 cancels).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Warn {
    pub amount: u64,
}

/// Move `amount` of what was warned from the signer's pot back to the signer's account, once
/// the notice period is over (balance first, then escrow).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Withdraw {
    pub amount: u64,
}

/// Redeem a winning ticket; the signer must be its recipient, and is paid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redeem {
    #[serde(with = "hex::ticket")]
    pub ticket: Ticket,
    /// The recipient's secret whose hash is the ticket's commitment.
    #[serde(with = "hex::bytes")]
    pub reveal: [u8; 32],
}

impl Operation for Fund {
    const NAME: &'static str = "fund";
    type Output = Transfer;
    fn write_fields(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.pot.0);
        out.extend_from_slice(&self.balance.to_be_bytes());
        out.extend_from_slice(&self.escrow.to_be_bytes());
    }
}

impl Operation for Warn {
    const NAME: &'static str = "warn";
    type Output = Pot;
    fn write_fields(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.amount.to_be_bytes());
    }
}

impl Operation for Withdraw {
    const NAME: &'static str = "withdraw";
    type Output = Transfer;
    fn write_fields(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.amount.to_be_bytes());
    }
}

impl Operation for Redeem {
    const NAME: &'static str = "redeem";
    type Output = Redemption;
    fn write_fields(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.ticket.encode());
        out.extend_from_slice(&self.reveal);
    }
}

/// An operation signed by the key whose money it moves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signed<T> {
    #[serde(with = "hex::key")]
    pub signer: IdentityKey,
    /// Unix seconds by the signer's clock.
    pub timestamp: UnixTime,
    /// Random; with the signer, identifies the request for replay protection.
    #[serde(with = "hex::bytes")]
    pub nonce: [u8; 16],
    pub op: T,
    #[serde(with = "hex::bytes")]
    pub signature: [u8; 64],
}

impl<T: Operation> Signed<T> {
    /// Signs `op` with `key` at `now`, with a fresh random nonce.
    pub fn new(op: T, key: &SigningKey, now: UnixTime) -> Self {
        Self::with_nonce(op, key, now, rand::random())
    }

    /// Signs `op` with `key` at `now` with the given nonce (which must not repeat).
    pub fn with_nonce(op: T, key: &SigningKey, now: UnixTime, nonce: [u8; 16]) -> Self {
        let mut req = Signed {
            signer: IdentityKey::of(key),
            timestamp: now,
            nonce,
            op,
            signature: [0; 64],
        };
        req.signature = key.sign(&req.message()).to_bytes();
        req
    }

    /// The canonical message the signature covers.
    pub fn message(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(DOMAIN.len() + T::NAME.len() + 57 + 256);
        out.extend_from_slice(DOMAIN);
        out.extend_from_slice(T::NAME.as_bytes());
        out.push(0);
        out.extend_from_slice(&self.signer.0);
        out.extend_from_slice(&self.timestamp.to_be_bytes());
        out.extend_from_slice(&self.nonce);
        self.op.write_fields(&mut out);
        out
    }

    /// Checks the signature (strict Ed25519): [`Refusal::BadSignature`] otherwise.
    pub fn verify(&self) -> Result<()> {
        let bad = || {
            Refusal::BadSignature.because(format!(
                "the {} request's signature is not {}'s",
                T::NAME,
                self.signer
            ))
        };
        let key = self.signer.verifying_key().map_err(|_| bad())?;
        key.verify_strict(&self.message(), &Signature::from_bytes(&self.signature))
            .map_err(|_| bad())
    }
}

/// Hex in JSON: keys, nonces, signatures and tickets.
pub(crate) mod hex {
    use std::borrow::Cow;

    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Lower-case hex.
    pub fn encode(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Exactly `N` bytes from `2N` hex digits.
    pub fn decode<const N: usize>(s: &str) -> Option<[u8; N]> {
        let s = s.as_bytes();
        if s.len() != 2 * N {
            return None;
        }
        let nibble = |c: u8| {
            char::from(c)
                .to_digit(16)
                .and_then(|d| u8::try_from(d).ok())
        };
        let mut out = [0u8; N];
        for (byte, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
            *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
        }
        Some(out)
    }

    fn text<'de, D: Deserializer<'de>>(d: D) -> Result<Cow<'de, str>, D::Error> {
        <Cow<'de, str>>::deserialize(d)
    }

    pub mod bytes {
        use super::*;

        pub fn serialize<S: Serializer, const N: usize>(
            b: &[u8; N],
            s: S,
        ) -> Result<S::Ok, S::Error> {
            s.serialize_str(&encode(b))
        }

        pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
            d: D,
        ) -> Result<[u8; N], D::Error> {
            let s = text(d)?;
            decode(&s).ok_or_else(|| D::Error::custom(format!("expected {} hex digits", 2 * N)))
        }
    }

    pub mod key {
        use murmur_protocol::directory::IdentityKey;

        use super::*;

        pub fn serialize<S: Serializer>(k: &IdentityKey, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(&k.to_hex())
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<IdentityKey, D::Error> {
            IdentityKey::from_hex(&text(d)?).map_err(D::Error::custom)
        }
    }

    pub mod ticket {
        use murmur_protocol::ticket::{TICKET_LEN, Ticket};

        use super::*;

        pub fn serialize<S: Serializer>(t: &Ticket, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(&encode(&t.encode()))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Ticket, D::Error> {
            let bytes: [u8; TICKET_LEN] = decode(&text(d)?).ok_or_else(|| {
                D::Error::custom(format!("a ticket is {} hex digits", 2 * TICKET_LEN))
            })?;
            Ticket::decode(&bytes).map_err(D::Error::custom)
        }
    }
}

#[cfg(test)]
mod tests {
    use murmur_protocol::ticket::{TicketFields, commitment_of};

    use super::*;

    fn ticket(payer: &SigningKey, recipient: &SigningKey) -> Ticket {
        Ticket::sign(
            TicketFields {
                recipient: IdentityKey::of(recipient),
                face_value: 100,
                win_ratio: u64::MAX,
                nonce: [1; 16],
                issued: 10,
                expiry: 20,
                commitment: commitment_of(&[2; 32]),
            },
            payer,
        )
    }

    #[test]
    fn requests_round_trip_through_json_and_verify() {
        let (a, b) = (
            SigningKey::from_bytes(&[1; 32]),
            SigningKey::from_bytes(&[2; 32]),
        );
        let fund = Signed::new(
            Fund {
                pot: IdentityKey::of(&b),
                balance: 5,
                escrow: 10,
            },
            &a,
            1000,
        );
        let json = serde_json::to_string(&fund).unwrap();
        assert!(json.contains(&IdentityKey::of(&b).to_hex()), "{json}");
        let back: Signed<Fund> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, fund);
        back.verify().unwrap();

        let redeem = Signed::new(
            Redeem {
                ticket: ticket(&a, &b),
                reveal: [2; 32],
            },
            &b,
            1000,
        );
        let json = serde_json::to_string(&redeem).unwrap();
        let back: Signed<Redeem> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, redeem);
        back.verify().unwrap();
    }

    #[test]
    fn any_changed_field_breaks_the_signature() {
        let a = SigningKey::from_bytes(&[1; 32]);
        let req = Signed::new(Warn { amount: 7 }, &a, 1000);
        req.verify().unwrap();
        let mut other = req.clone();
        other.op.amount = 8;
        assert_eq!(
            other.verify().unwrap_err().refusal(),
            Some(Refusal::BadSignature)
        );
        let mut other = req.clone();
        other.timestamp += 1;
        assert!(other.verify().is_err());
        let mut other = req.clone();
        other.nonce[0] ^= 1;
        assert!(other.verify().is_err());
        let mut other = req.clone();
        other.signer = IdentityKey::of(&SigningKey::from_bytes(&[3; 32]));
        assert!(other.verify().is_err());
        // The same fields under another operation's name are another message.
        let withdraw = Signed {
            signer: req.signer,
            timestamp: req.timestamp,
            nonce: req.nonce,
            op: Withdraw { amount: 7 },
            signature: req.signature,
        };
        assert!(withdraw.verify().is_err());
    }

    #[test]
    fn json_refuses_unknown_fields_and_bad_hex() {
        let a = SigningKey::from_bytes(&[1; 32]);
        let req = Signed::new(Warn { amount: 7 }, &a, 1000);
        let mut v: serde_json::Value = serde_json::to_value(&req).unwrap();
        v["colour"] = serde_json::json!(1);
        assert!(serde_json::from_value::<Signed<Warn>>(v).is_err());
        let mut v: serde_json::Value = serde_json::to_value(&req).unwrap();
        v["nonce"] = serde_json::json!("zz");
        assert!(serde_json::from_value::<Signed<Warn>>(v).is_err());
        assert_eq!(hex::decode::<2>("0aff"), Some([10, 255]));
        assert_eq!(hex::decode::<2>("0af"), None);
        assert_eq!(hex::decode::<1>("+f"), None);
    }
}
