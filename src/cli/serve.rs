//! `p0-relay serve`: the relay until SIGTERM or Ctrl-C, its exit status saying whether a
//! part of it failed.

use std::path::Path;
use std::process::ExitCode;

use super::fail;
use crate::app::{Options, Relay};
use crate::config::Settings;
use crate::env::Env;

pub(super) fn serve(config: &Path, env: Env, dry_run: bool) -> ExitCode {
    let settings = match Settings::load(config, &env) {
        Ok(s) => s,
        Err(errors) => return fail(&errors),
    };
    init_logs(settings.log_json);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(crate::memory::on_thread_park)
        .build();
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => return fail(&[format!("cannot start the runtime: {e}")]),
    };
    runtime.block_on(async move {
        let opts = Options {
            dry_run,
            panic_in: injected_fault(),
            ..Options::default()
        };
        let relay = match Relay::start(settings, env, opts).await {
            Ok(r) => r,
            Err(e) => return fail(&[format!("{e:#}")]),
        };
        let token = relay.shutdown_token();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("stopping: no new webhooks; finishing calls in flight");
            token.cancel();
        });
        // A part of the relay that failed has been logged; the exit status says so too.
        match relay.wait().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(failure) => fail(&[format!("the relay stopped because {failure}")]),
        }
    })
}

/// Debug builds only (the test suite's): `P0_RELAY_TEST_PANIC_IN=<component>` makes that part
/// of the relay panic as it starts, to test supervision end to end. Release builds ignore it.
fn injected_fault() -> Option<&'static str> {
    if !cfg!(debug_assertions) {
        return None;
    }
    let name = std::env::var("P0_RELAY_TEST_PANIC_IN").ok()?;
    Some(Box::leak(name.into_boxed_str()))
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}
