//! Reading and parsing a webhook body (`receiver::body::read` and `parse`): JSON or GitHub's
//! form-encoded `payload`, under a size limit and a nesting-depth limit. The first byte picks
//! the content type and the depth limit, the second the size limit. Checks: no panic; a body is
//! read whole exactly when it fits; a parsed document never nests deeper than the limit, equals
//! serde_json's reading of the same bytes, and every JSON document within the limit is read.
#![no_main]

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, header};
use libfuzzer_sys::fuzz_target;
use p0_relay::receiver::body;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let [flags, size, bytes @ ..] = data else {
        return;
    };
    let form = flags & 1 == 1;
    let max_depth = usize::from(flags >> 1);
    let max_bytes = usize::from(size >> 1) * 16;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(if form {
            "application/x-www-form-urlencoded"
        } else {
            "application/json"
        }),
    );
    if size & 1 == 1 {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    }

    let read = runtime().block_on(body::read(
        &headers,
        Body::from(bytes.to_vec()),
        max_bytes,
        Duration::from_secs(5),
    ));
    match &read {
        Ok(got) => {
            assert!(bytes.len() <= max_bytes);
            assert_eq!(&got[..], bytes);
        }
        Err(_) => assert!(
            bytes.len() > max_bytes,
            "a body within the limit was refused"
        ),
    }

    let parsed = body::parse(&headers, bytes, max_depth);
    if let Ok(v) = &parsed {
        assert!(common::depth(v) <= max_depth, "nests deeper than the limit");
    }
    if !form {
        let reference: Result<serde_json::Value, _> = serde_json::from_slice(bytes);
        match (&parsed, reference) {
            (Ok(v), Ok(r)) => assert_eq!(v, &r),
            (Ok(_), Err(e)) => panic!("accepted what serde_json refuses: {e}"),
            (Err(e), Ok(r)) => assert!(
                common::depth(&r) > max_depth,
                "refused a document within the depth limit: {e}"
            ),
            (Err(_), Err(_)) => {}
        }
    }
});
