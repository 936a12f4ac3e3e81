#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| murmur_directory::fuzz_entry::signature_upload(data));
