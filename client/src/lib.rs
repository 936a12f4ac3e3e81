#![doc = include_str!("../README.md")]

pub mod cli;
pub mod driver;
#[doc(hidden)]
pub mod fuzz_entry;
pub mod gateway;
pub mod http;
pub mod proxy;
pub mod socks;
pub mod stream;
pub mod wallet;
