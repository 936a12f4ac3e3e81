#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| murmur_protocol::fuzz_entry::http_connect(data));
