//! The projected parse (`mapping::projection`: each mapping builds only the parts of a body
//! its paths read) on arbitrary bytes, against the full parse. Checks: no panic; a body is
//! accepted exactly when it is JSON within the depth limit, wherever the nesting is; every
//! shipped mapping decides the same and derives the same dedup key on the projected document
//! as on the whole one.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use p0_relay::mapping::Input;
use p0_relay::mapping::projection::Projection;
use serde_json::Value;

const DEPTH: usize = 64;

fuzz_target!(|data: &[u8]| {
    let (headers, bytes) = common::split_request(data);
    let full = serde_json::from_slice::<Value>(bytes)
        .ok()
        .filter(|v| common::depth(v) <= DEPTH);
    assert_eq!(
        Projection::full().parse(bytes, DEPTH).ok(),
        full,
        "the full projection is serde_json's reading"
    );
    for (source, mapping) in &common::mappings().mappings {
        let projected = mapping.projection().parse(bytes, DEPTH);
        assert_eq!(projected.is_ok(), full.is_some(), "{source}: accepted differently");
        let (Ok(projected), Some(full)) = (projected, &full) else {
            continue;
        };
        let on = |body| Input {
            headers: &headers,
            body,
        };
        assert_eq!(
            mapping.decide(on(&projected), None),
            mapping.decide(on(full), None),
            "{source}: decides differently on the projected document"
        );
        assert_eq!(
            mapping.dedup_key(on(&projected), bytes),
            mapping.dedup_key(on(full), bytes),
            "{source}: another dedup key"
        );
    }
});
