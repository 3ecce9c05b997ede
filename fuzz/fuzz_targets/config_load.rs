//! `relay.yaml` text through the real loader (`config::Settings::from_text`: YAML, `${VAR}`
//! expansion, validation of every key). Checks: no panic, whatever the text; errors name the
//! file; what loads is usable (a worker pool and a connection cap of at least one).
#![no_main]

use std::collections::HashMap;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use p0_relay::config::Settings;
use p0_relay::config::env::Env;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let vars: HashMap<String, String> = [
        ("P0_ORG_ID", "acme"),
        ("P0_API_TOKEN", "t"),
        ("P0_RELAY_DB", "/fuzz/relay.db"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let env = Env::default().overlay(&vars);
    let file = Path::new("/fuzz/relay.yaml");
    match Settings::from_text(file, text, &env) {
        Ok(s) => {
            assert!(s.p0.concurrency >= 1);
            assert!(s.inbound.max_connections >= 1);
        }
        Err(errors) => {
            assert!(!errors.is_empty());
            for e in errors {
                assert!(e.starts_with("/fuzz/relay.yaml: "), "{e}");
            }
        }
    }
});
