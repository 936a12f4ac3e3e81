#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| murmur_relay::fuzz_entry::relay_config(data));
