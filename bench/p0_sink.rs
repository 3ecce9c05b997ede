//! A stand-in P0 for the load benchmark: answers 200 at once to every POST and counts the
//! calls and distinct decisions (`GET /count`). Usage: `p0_sink ADDR`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::Uri;
use axum::routing::{get, post};

#[derive(Default)]
struct Seen {
    calls: u64,
    distinct: HashSet<String>,
    first: Option<Instant>,
    last: Option<Instant>,
}

type Shared = Arc<Mutex<Seen>>;

async fn call(State(seen): State<Shared>, uri: Uri) -> &'static str {
    if let Ok(mut s) = seen.lock() {
        let now = Instant::now();
        s.calls += 1;
        s.distinct.insert(uri.path().to_owned());
        s.first.get_or_insert(now);
        s.last = Some(now);
    }
    "{}"
}

async fn count(State(seen): State<Shared>) -> String {
    let s = seen.lock().map(|s| {
        let span = match (s.first, s.last) {
            (Some(a), Some(b)) => (b - a).as_secs_f64(),
            _ => 0.0,
        };
        format!("{} {} {span:.3}", s.calls, s.distinct.len())
    });
    s.unwrap_or_default()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4010".into());
    let seen: Shared = Arc::default();
    let app = Router::new()
        .route("/count", get(count))
        .fallback(post(call))
        .with_state(seen);
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("p0_sink: cannot listen on {addr}: {e} (is another one running?)");
            std::process::exit(1);
        }
    };
    if let Err(e) = axum::serve(listener, app).await {
        eprintln!("p0_sink: {e}");
        std::process::exit(1);
    }
}
