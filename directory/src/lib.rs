#![doc = include_str!("../README.md")]

pub mod authority;
pub mod cli;
pub mod client;
pub mod config;
mod daemon;
pub mod error;
#[doc(hidden)]
pub mod fuzz_entry;
pub mod http;
pub mod keys;
pub mod link_io;
pub mod metrics;
pub mod prober;
pub mod probes;
pub mod rate;
mod server;
pub mod storage;

use std::time::{SystemTime, UNIX_EPOCH};

use murmur_protocol::directory::{DocumentSignature, Epoch, UnixTime};
use serde::{Deserialize, Serialize};

pub use config::Config;
pub use daemon::{run, serve};
pub use error::{Error, Result};
pub use http::{HttpLimits, RefusalCounter, serve_until};
pub use server::{MAX_DESCRIPTOR_BYTES, MAX_SIGNATURE_BYTES, MAX_VOTE_BYTES};

/// What `POST /v1/signature` carries: an authority's signature on its consensus for `epoch`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureUpload {
    pub epoch: Epoch,
    pub signature: DocumentSignature,
}

/// Seconds since the Unix epoch by this machine's clock (0 if the clock is before 1970).
pub fn unix_now() -> UnixTime {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
