#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| murmur_ledger::fuzz_entry::ledger_config(data));
