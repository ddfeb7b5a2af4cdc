#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgcrew_fuzz::task_payload(data));
