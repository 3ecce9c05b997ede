//! A mapping file's text through the real loader (`mapping::from_text`: YAML, `${VAR}`
//! expansion, compilation of every JSONPath, regex and policy), then its own test cases run
//! (`mapping::cases::run`). Checks: no panic, whatever the text; errors name the file.
#![no_main]

mod common;

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use p0_relay::mapping::{cases, from_text};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = common::env();
    let defaults = common::defaults();
    let file = Path::new("/fuzz/mappings/custom.yaml");
    match from_text("custom", file, text, &env, &defaults) {
        Ok(mapping) => {
            for case in cases::run(&mapping, &env, &defaults) {
                let _ = case.failure;
            }
        }
        Err(errors) => {
            assert!(!errors.is_empty());
            for e in errors {
                assert!(e.starts_with("/fuzz/mappings/custom.yaml: "), "{e}");
            }
        }
    }
});
