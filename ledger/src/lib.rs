#![doc = include_str!("../README.md")]

// Without the `server` feature (on by default) the crate is what a payer or a payee of the
// ledger needs, and no more: the signed requests and answers, `Settlement` and
// `LedgerClient`; the embedded ledger (redb), its HTTP server, config and command line are
// the feature's.

pub mod answer;
pub mod choice;
#[cfg(feature = "server")]
pub mod cli;
pub mod client;
#[cfg(feature = "server")]
pub mod config;
pub mod error;
#[cfg(feature = "server")]
#[doc(hidden)]
pub mod fuzz_entry;
#[cfg(feature = "server")]
pub mod guard;
#[cfg(feature = "server")]
pub mod ledger;
#[cfg(feature = "server")]
pub mod metrics;
pub mod records;
pub mod request;
#[cfg(feature = "server")]
mod server;
mod settlement;

pub use answer::ErrorBody;
pub use choice::{ChainSection, SettlementChoice};
#[cfg(feature = "server")]
pub use config::Config;
pub use error::{Error, Refusal, Result};
#[cfg(feature = "server")]
pub use ledger::{Audit, Ledger, Params};
/// Seconds since the Unix epoch by this machine's clock (the daemons' clock helper).
pub use murmur_service::unix_now;
pub use records::{Account, Pot, Redemption, Transfer};
#[cfg(feature = "server")]
pub use server::{MAX_REQUEST_BYTES, run, serve};
pub use settlement::Settlement;
