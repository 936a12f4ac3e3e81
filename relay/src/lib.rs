#![doc = include_str!("../README.md")]

pub mod admit;
#[cfg(feature = "chain")]
pub mod chain;
pub mod cli;
pub mod config;
pub mod error;
pub mod exit;
#[doc(hidden)]
pub mod fuzz_entry;
pub mod gateway;
pub mod inbox;
pub mod keys;
pub mod links;
pub mod loops;
pub mod metrics;
pub mod node;
pub mod payments;
pub mod pipeline;

pub use config::Config;
pub use error::{Error, Result};
pub use node::Node;
