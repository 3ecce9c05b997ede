//! The ceiling for the load benchmark: a bare axum server that answers 202 to every webhook
//! without reading, verifying or storing anything. Usage: `ceiling ADDR`.

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8090".into());
    let app = Router::new().route(
        "/webhooks/{source}",
        post(|| async { (StatusCode::ACCEPTED, "{}") }),
    );
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
