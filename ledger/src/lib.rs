#![doc = include_str!("../README.md")]

pub mod answer;
pub mod cli;
pub mod client;
pub mod config;
pub mod error;
#[doc(hidden)]
pub mod fuzz_entry;
pub mod guard;
pub mod ledger;
pub mod metrics;
pub mod request;
mod server;
mod settlement;

pub use config::Config;
pub use error::{Error, Refusal, Result};
pub use ledger::{Account, Audit, Ledger, Params, Pot, Redemption, Transfer};
/// Seconds since the Unix epoch by this machine's clock (the directory's clock helper).
pub use murmur_directory::unix_now;
pub use server::{ErrorBody, MAX_REQUEST_BYTES, run, serve};
pub use settlement::Settlement;
