//! Control messages between a client and its gateway, carried in [`crate::frame::Frame::Control`].
//!
//! `Hello` opens a session: the client names the 32-byte address its SURBs deliver to. The
//! address is random per client and known only to the client and its gateway (it travels
//! inside Sphinx headers, readable only by the gateway at the final hop), so it works as a
//! bearer token for the session.

use crate::packet::Address;
use crate::{ADDRESS_LEN, Error, Result};

const MAGIC: &[u8; 4] = b"MMC1";
const KIND_HELLO: u8 = 1;
const KIND_WELCOME: u8 = 2;

/// A control message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    /// Client → gateway: open (or resume) the session for `address`.
    Hello { address: Address },
    /// Gateway → client: the session is open; `queued` deliveries were waiting in its inbox.
    Welcome { queued: u32 },
}

impl Control {
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
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let truncated = |needed| Error::Truncated {
            what: "control message",
            needed,
            got: bytes.len(),
        };
        if bytes.len() < MAGIC.len() + 1 {
            return Err(truncated(MAGIC.len() + 1));
        }
        if &bytes[..4] != MAGIC {
            return Err(Error::ContentKind(bytes[0]));
        }
        let body = &bytes[5..];
        match bytes[4] {
            KIND_HELLO => {
                let address: [u8; ADDRESS_LEN] =
                    body.try_into().map_err(|_| truncated(5 + ADDRESS_LEN))?;
                Ok(Control::Hello {
                    address: Address(address),
                })
            }
            KIND_WELCOME => {
                let q: [u8; 4] = body.try_into().map_err(|_| truncated(9))?;
                Ok(Control::Welcome {
                    queued: u32::from_be_bytes(q),
                })
            }
            other => Err(Error::ContentKind(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(address: [u8; 32], queued: u32) {
            for c in [Control::Hello { address: Address(address) }, Control::Welcome { queued }] {
                prop_assert_eq!(Control::decode(&c.encode()).unwrap(), c);
            }
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Control::decode(&bytes);
        }
    }
}
