#![doc = include_str!("../README.md")]

pub mod authority;
pub mod cli;
pub mod client;
pub mod config;
mod daemon;
pub mod error;
#[doc(hidden)]
pub mod fuzz_entry;
pub mod link_io;
pub mod metrics;
pub mod prober;
pub mod probes;
mod server;
pub mod storage;

use std::time::{SystemTime, UNIX_EPOCH};

use murmur_protocol::directory::{DocumentSignature, Epoch};
use serde::{Deserialize, Serialize};

pub use config::Config;
pub use daemon::{run, serve};
pub use error::{Error, Result};
/// Key files, shared by every daemon; here too so the authority's users find them.
pub use murmur_service::keys;
/// The daemons' clock helper; here too for the clients of this crate that use it with
/// [`client::DirectoryClient`].
pub use murmur_service::unix_now;
pub use server::{MAX_DESCRIPTOR_BYTES, MAX_SIGNATURE_BYTES, MAX_VOTE_BYTES};

/// What `POST /v1/signature` carries: an authority's signature on its consensus for `epoch`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureUpload {
    pub epoch: Epoch,
    pub signature: DocumentSignature,
}

/// Milliseconds since the Unix epoch by this machine's clock.
pub(crate) fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
