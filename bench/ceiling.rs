//! The ceiling for the load benchmark: a bare axum server that answers 202 to every webhook
//! without reading, verifying or storing anything. Usage: `ceiling ADDR`.
//!
//! `ceiling ADDR floor SECRET` is the floor under any relay instead: it reads each body,
//! checks its `X-Hub-Signature-256` (HMAC-SHA256 with SECRET, constant-time) and checks that it
//! is JSON, then answers 202 (401 or 400 otherwise). It stores nothing: it is the work no
//! relay can skip before it may answer, measured on the same machine in the same run.

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8090".into());
    let app = match (args.next().as_deref(), args.next()) {
        (None, _) => Router::new().route(
            "/webhooks/{source}",
            post(|| async { (StatusCode::ACCEPTED, "{}") }),
        ),
        (Some("floor"), Some(secret)) => Router::new().route(
            "/webhooks/{source}",
            post(move |headers: HeaderMap, body: Bytes| {
                let status = floor(secret.as_bytes(), &headers, &body);
                async move { (status, "{}") }
            }),
        ),
        _ => {
            eprintln!("usage: ceiling ADDR [floor SECRET]");
            std::process::exit(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ceiling: cannot listen on {addr}: {e} (is another one running?)");
            std::process::exit(1);
        }
    };
    if let Err(e) = axum::serve(listener, app).await {
        eprintln!("ceiling: {e}");
        std::process::exit(1);
    }
}

/// 202 when `body` carries a valid GitHub signature and is JSON.
fn floor(secret: &[u8], headers: &HeaderMap, body: &[u8]) -> StatusCode {
    let signature = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("sha256="))
        .and_then(|v| hex::decode(v).ok());
    let Some(signature) = signature else {
        return StatusCode::UNAUTHORIZED;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return StatusCode::UNAUTHORIZED;
    };
    mac.update(body);
    if mac.verify_slice(&signature).is_err() {
        return StatusCode::UNAUTHORIZED;
    }
    // As the relay does: UTF-8 checked for the whole body once, then the JSON syntax.
    let Ok(text) = std::str::from_utf8(body) else {
        return StatusCode::BAD_REQUEST;
    };
    match serde_json::from_str::<serde::de::IgnoredAny>(text) {
        Ok(_) => StatusCode::ACCEPTED,
        Err(_) => StatusCode::BAD_REQUEST,
    }
}
