#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| murmur_client::fuzz_entry::client_config(data));
