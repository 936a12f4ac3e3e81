#![doc = include_str!("../README.md")]

pub mod board;
mod builders;
pub mod cli;
pub mod control;
pub mod driver;
#[doc(hidden)]
pub mod fuzz_entry;
pub mod gateway;
pub mod guard_file;
pub mod http;
pub mod proxy;
pub mod socks;
pub mod status;
pub mod stream;
pub mod wallet;
