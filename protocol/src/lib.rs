#![doc = include_str!("../README.md")]

pub mod admission;
pub mod control;
pub mod cover;
pub mod delay;
pub mod delivery;
pub mod directory;
pub mod envelope;
pub mod error;
pub mod exit;
pub mod fragment;
pub mod frame;
#[doc(hidden)]
pub mod fuzz_entry;
pub mod hop;
pub mod http_connect;
pub mod link;
pub mod packet;
pub mod payer;
pub mod payload;
pub mod replay;
pub mod send_timing;
pub mod session;
pub mod socks;
mod sphinx_builder;
pub mod stream;
pub mod surb;
pub mod tab;
pub mod testkit;
pub mod ticket;
pub mod time;

pub use error::{Error, Result};

/// Bytes of Sphinx payload in every packet on the network, cover and real alike (as Nym).
pub const PAYLOAD_SIZE: usize = 2048;

/// Bytes of a Sphinx header (sphinx-packet 0.8, up to 5 hops).
pub const HEADER_SIZE: usize = sphinx_packet::header::HEADER_SIZE;

/// Bytes of one Sphinx packet: header and payload.
pub const PACKET_SIZE: usize = HEADER_SIZE + PAYLOAD_SIZE;

/// Plaintext bytes a packet carries once Sphinx has taken its padding overhead.
pub const PLAINTEXT_SIZE: usize = PAYLOAD_SIZE - sphinx_packet::payload::PAYLOAD_OVERHEAD_SIZE;

/// The most hops a Sphinx route can have.
pub const MAX_ROUTE_LEN: usize = sphinx_packet::constants::MAX_PATH_LENGTH;

/// Bytes of a node or client address inside a Sphinx header.
pub const ADDRESS_LEN: usize = sphinx_packet::constants::NODE_ADDRESS_LENGTH;

/// Bytes of the identifier a final hop reads in the clear (used to find a SURB's keys).
pub const SURB_ID_LEN: usize = sphinx_packet::constants::IDENTIFIER_LENGTH;
