//! `p0-relay health`: asks a running relay whether it is ready (`/readyz`), for container
//! health checks: exit 0 when it is, 1 with the reason on one line otherwise.

use std::path::Path;
use std::process::ExitCode;

use super::block_on;
use crate::config::Settings;
use crate::env::Env;
use crate::providers::http;

/// Where a relay's own readiness is asked: the listen address from the config, on loopback
/// when it listens on every address.
fn readiness_url(settings: &Settings) -> String {
    let mut addr = settings.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let scheme = if settings.inbound.tls.is_some() {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{addr}/readyz")
}

pub(super) fn health(
    config: &Path,
    env: &Env,
    url: Option<String>,
    timeout: std::time::Duration,
) -> ExitCode {
    // The relay's own address comes from its config; it is asked over loopback and is sent
    // nothing secret, so its certificate (often issued for another name) is not verified.
    // A URL given on the command line is verified as usual.
    let (url, own) = match url {
        Some(u) => (u, false),
        None => match Settings::load(config, env) {
            Ok(s) => (readiness_url(&s), true),
            Err(errors) => {
                say!(
                    "not ready: cannot read the relay's address: {}",
                    errors.join("; ")
                );
                return ExitCode::FAILURE;
            }
        },
    };
    let result = block_on(ask_ready(&url, own, timeout)).and_then(|r| r);
    match result {
        Ok(warnings) if warnings.is_empty() => {
            say!("ready: {url}");
            ExitCode::SUCCESS
        }
        Ok(warnings) => {
            say!("ready: {url} (warning: {})", warnings.join("; "));
            ExitCode::SUCCESS
        }
        Err(why) => {
            say!("not ready: {why}");
            ExitCode::FAILURE
        }
    }
}

/// `Ok` with the relay's warnings when `url` answers 200 with `"ready": true`; otherwise why
/// not, in one line.
async fn ask_ready(
    url: &str,
    own: bool,
    timeout: std::time::Duration,
) -> Result<Vec<String>, String> {
    let client = http::client(timeout)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .tls_danger_accept_invalid_certs(own);
    let response = http::build(client)?
        .get(url)
        .send()
        .await
        .map_err(|e| format!("{url}: {}", http::unanswered(&e)))?;
    let http::Answer { status, body, .. } = http::Answer::read(response).await;
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let lines = |key: &str| -> Vec<String> {
        answer[key]
            .as_array()
            .map(|list| {
                list.iter()
                    .filter_map(|p| p.as_str())
                    .map(|p| p.replace('\n', " "))
                    .collect()
            })
            .unwrap_or_default()
    };
    if status.is_success() && answer["ready"] == true {
        return Ok(lines("warnings"));
    }
    let problems = lines("problems");
    if problems.is_empty() {
        Err(format!("{url} answered {status}"))
    } else {
        Err(format!("{url} answered {status}: {}", problems.join("; ")))
    }
}
