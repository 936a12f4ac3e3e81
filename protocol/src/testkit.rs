//! Pieces shared by the in-process networks that drive this crate under a virtual clock:
//! the virtual-time pair test (`tests/pair.rs`) and the simulator's fidelity mode. Nothing
//! here is a stand-in for the protocol: a [`Relay`] takes the real [`hop::process`] step and
//! says where the packet goes next, decoding what a final hop reads as the exit or a mix
//! would.

use std::time::Duration;

use crate::envelope::{Envelope, SlotTicket};
use crate::hop::{self, Action, HopError, HopKey, StaticSecret};
use crate::packet::{Address, Packet, SurbId, recover_plaintext};
use crate::payload::Content;
use crate::replay::ReplayFilter;
use crate::{PAYLOAD_SIZE, Result};

/// Where a packet a relay accepted goes next.
pub enum Landing {
    /// Hold it for `delay`, then hand it and its peeled envelope to `next_hop`.
    Forward {
        next_hop: Address,
        delay: Duration,
        packet: Packet,
        envelope: Envelope,
    },
    /// Deliver the payload to `destination`, a client behind this relay (a gateway): a reply,
    /// a SURB-ACK or a loop, still sealed for the client.
    Deliver {
        destination: Address,
        surb_id: SurbId,
        payload: Box<[u8; PAYLOAD_SIZE]>,
    },
    /// This relay is the packet's destination (an exit, or a relay's own loop or drop
    /// cover): what it reads.
    Final(Content),
}

/// One relay of an in-process network: its Sphinx key and its replay filter.
pub struct Relay {
    address: Address,
    sphinx: StaticSecret,
    seen: ReplayFilter,
}

/// What a relay did with a packet it accepted: where it goes, and the ticket its slot held.
pub struct Stepped {
    pub landing: Landing,
    pub slot: Option<SlotTicket>,
}

impl Relay {
    /// A relay at `address` holding `sphinx`, remembering up to `replay_capacity` tags at a
    /// false-positive rate of 10⁻⁹.
    pub fn new(address: Address, sphinx: StaticSecret, replay_capacity: u64) -> Result<Relay> {
        Ok(Relay {
            address,
            sphinx,
            seen: ReplayFilter::new(replay_capacity, 1e-9)?,
        })
    }

    /// The relay's address.
    pub fn address(&self) -> Address {
        self.address
    }

    /// The relay's step on a packet ([`hop::process`], delays clamped to `max_delay`), and
    /// where it lands. A payload addressed to this relay that does not decode is an error
    /// labelled `final_payload` (an honest network has none).
    pub fn step(
        &mut self,
        packet: &Packet,
        envelope: Envelope,
        max_delay: Duration,
    ) -> std::result::Result<Stepped, HopError> {
        let key = HopKey {
            sphinx: &self.sphinx,
            max_delay,
        };
        let processed = hop::process(key, packet, envelope, &mut self.seen)?;
        let landing = match processed.action {
            Action::Forward {
                next_hop,
                delay,
                packet,
                envelope,
                ..
            } => Landing::Forward {
                next_hop,
                delay,
                packet,
                envelope,
            },
            Action::Deliver(d) if d.destination == self.address => {
                let content = recover_plaintext(&d.payload[..])
                    .and_then(|p| Content::decode(&p))
                    .map_err(HopError::Process)?;
                Landing::Final(content)
            }
            Action::Deliver(d) => Landing::Deliver {
                destination: d.destination,
                surb_id: d.surb_id,
                payload: d.payload,
            },
        };
        Ok(Stepped {
            landing,
            slot: processed.slot,
        })
    }
}
