//! The `p0-relay` command line: `serve`, `check`, `test`, `explain`, `jobs` and `health`. Each
//! command loads the config the same way and reports problems naming the file, rule and field.
//! Everything it prints passes through `terminal_safe` (or `json_safe`): text from senders, P0
//! and mapping files never reaches a terminal with its control characters raw.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use clap::{Args, Parser, Subcommand};

use crate::app::{Options, Relay};
use crate::config::Settings;
use crate::domain::printable;
use crate::env::Env;
use crate::mapping::{Input, MappingSet, cases};
use crate::store::{self, ListFilter, Replay, Replayed, State, StoreLocation, Windows};

/// `println!` for this module: the line is printed through `terminal_safe`.
macro_rules! say {
    ($($arg:tt)*) => {
        println!("{}", terminal_safe(&format!($($arg)*)))
    };
}

#[derive(Parser)]
#[command(
    name = "p0-relay",
    version,
    about = "Turns webhooks from incident, alerting and code-hosting tools into P0 access decisions"
)]
struct Cli {
    /// Read `KEY=VALUE` lines from this file for `${VAR}` references (the environment wins).
    #[arg(long, global = true, value_name = "FILE")]
    env_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct ConfigArg {
    /// The relay's config file.
    #[arg(long, short, default_value = "relay.yaml")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay.
    Serve {
        #[command(flatten)]
        config: ConfigArg,
        /// Record and log every decision, call nothing upstream (needs no P0 token).
        #[arg(long)]
        dry_run: bool,
    },
    /// Validate the config and every mapping; exit 1 on any problem.
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Run the test cases written in mapping files. Each case sees the mapping file's own
    /// defaults and its `env:` only, never this process's environment, so it passes or fails
    /// the same on every machine. To see how this deployment's settings decide a payload, use
    /// `explain` with the deployment's environment; `check` prints its grant policy.
    Test {
        #[command(flatten)]
        config: ConfigArg,
        /// Sources (or mapping files) to test; all when none are named.
        mappings: Vec<String>,
    },
    /// Show the decision for a payload and why each rule did or did not match.
    Explain {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        source: String,
        /// A header as `Name: value`; repeatable.
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        /// Check signed timestamps as if it were this Unix time (for a captured delivery).
        #[arg(long, value_name = "UNIX_SECONDS")]
        at: Option<i64>,
        payload: PathBuf,
    },
    /// Ask a running relay whether it is ready (`/readyz`); exit 0 when it is, 1 otherwise
    /// with the reason on one line. For container health checks.
    Health {
        #[command(flatten)]
        config: ConfigArg,
        /// The readiness URL; by default the config's listen address on loopback
        /// (`http://127.0.0.1:8080/readyz`, `https://` when the relay serves TLS).
        #[arg(long)]
        url: Option<String>,
        /// How long to wait for the answer.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Inspect stored decisions and replay dead letters.
    Jobs {
        #[command(flatten)]
        config: ConfigArg,
        /// The store (a SQLite file or a postgres:// URL), instead of the one the config names.
        #[arg(long, global = true, value_name = "PATH|URL")]
        db: Option<String>,
        #[command(subcommand)]
        command: JobsCommand,
    },
}

#[derive(Subcommand)]
enum JobsCommand {
    /// List decisions, newest first.
    List {
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        source: Option<String>,
        /// Only decisions asked on this subject (an incident or alert ID, a GitHub issue as
        /// `<repository id>#<number>`).
        #[arg(long)]
        subject: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// The full history of one decision and its delivery.
    Show { id: i64 },
    /// Queue a dead (or rejected) decision again.
    Replay {
        id: Option<i64>,
        /// Every dead letter.
        #[arg(long, conflicts_with = "id")]
        dead: bool,
    },
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = match &cli.env_file {
        Some(path) => match Env::with_file(path) {
            Ok(env) => env,
            Err(e) => return fail(&[e]),
        },
        None => Env::process(),
    };
    match cli.command {
        Command::Serve { config, dry_run } => serve(&config.config, env, dry_run),
        Command::Check { config } => check(&config.config, &env),
        Command::Test { config, mappings } => test(&config.config, &env, &mappings),
        Command::Explain {
            config,
            source,
            headers,
            at,
            payload,
        } => explain(&config.config, &env, &source, &headers, at, &payload),
        Command::Health {
            config,
            url,
            timeout,
        } => health(&config.config, &env, url, timeout),
        Command::Jobs {
            config,
            db,
            command,
        } => jobs(&config.config, &env, db, command),
    }
}

fn fail(errors: &[String]) -> ExitCode {
    for e in errors {
        // Some errors (YAML's) show the offending lines: keep their line breaks.
        let lines: Vec<Cow<'_, str>> = e.split('\n').map(terminal_safe).collect();
        eprintln!("error: {}", lines.join("\n"));
    }
    ExitCode::FAILURE
}

/// True for characters a terminal acts on or hides rather than shows: control characters
/// (C0, DEL, C1) and the invisible format characters that reorder or hide text (bidirectional
/// overrides and isolates, zero-width characters, the byte-order mark, tags).
fn hidden_or_control(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{61c}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{206f}'
                | '\u{feff}'
                | '\u{fff9}'..='\u{fffb}'
                | '\u{e0000}'..='\u{e007f}'
        )
}

/// `text` made safe to print: the characters `hidden_or_control` names written as escapes
/// (`\n`, `\r`, `\t`, else `\u{1b}`). Everything else (any script, emoji, backslashes, so
/// regexes read as written) is shown as it is.
pub fn terminal_safe(text: &str) -> Cow<'_, str> {
    if !text.chars().any(hidden_or_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if hidden_or_control(c) => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Serialized JSON made safe to print: the characters `hidden_or_control` names (which can
/// only occur inside its strings) written as `\uXXXX` escapes; the value is unchanged.
pub fn json_safe(json: &str) -> Cow<'_, str> {
    if !json.chars().any(hidden_or_control) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if hidden_or_control(c) {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
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

fn load(config: &Path, env: &Env) -> Result<(Settings, MappingSet), Vec<String>> {
    let settings = Settings::load(config, env)?;
    let mappings = MappingSet::load(&settings.mappings_dir, env, &settings.defaults)?;
    Ok((settings, mappings))
}

fn serve(config: &Path, env: Env, dry_run: bool) -> ExitCode {
    let settings = match Settings::load(config, &env) {
        Ok(s) => s,
        Err(errors) => return fail(&errors),
    };
    init_logs(settings.log_json);
    let runtime = match tokio::runtime::Runtime::new() {
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

/// The config and every mapping file, enabled or not (for `check` and `test`).
fn load_every(config: &Path, env: &Env) -> Result<(Settings, MappingSet), Vec<String>> {
    let settings = Settings::load(config, env)?;
    let mappings = MappingSet::load_every(&settings.mappings_dir, env, &settings.defaults)?;
    Ok((settings, mappings))
}

fn check(config: &Path, env: &Env) -> ExitCode {
    let (settings, mappings) = match load_every(config, env) {
        Ok(x) => x,
        Err(errors) => return fail(&errors),
    };
    for w in crate::config::audit(&settings, &mappings) {
        say!("warning: {w}");
    }
    let problems = crate::config::problems(&settings, &mappings);
    if !problems.is_empty() {
        return fail(&problems);
    }
    if settings.p0.token.is_none() {
        say!("note: p0.token is empty: `serve` will need --dry-run or P0_API_TOKEN");
    }
    let backend = if settings.store.location.is_postgres() {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    say!("store: {} ({backend})", settings.store.location);
    for (source, m) in &mappings.mappings {
        say!(
            "ok: {source} ({}, verified by {})",
            m.file.display(),
            m.verifier.scheme()
        );
    }
    for (source, m) in &mappings.disabled {
        say!(
            "ok: {source} ({}, verified by {}; not enabled, syntax checked)",
            m.file.display(),
            m.verifier.scheme()
        );
    }
    // The grant policy in effect, one line per rule that may approve: who, through which
    // on-call check and its pinned scope, how fresh, how long.
    for m in mappings.mappings.values() {
        for line in m.policy() {
            say!("policy: {line}");
        }
    }
    say!(
        "{}: valid, {} mapping(s)",
        config.display(),
        mappings.mappings.len()
    );
    ExitCode::SUCCESS
}

fn test(config: &Path, env: &Env, names: &[String]) -> ExitCode {
    let (settings, mappings) = match load_every(config, env) {
        Ok(x) => x,
        Err(errors) => return fail(&errors),
    };
    let wanted: Vec<String> = names
        .iter()
        .map(|n| {
            Path::new(n)
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or(n)
                .to_owned()
        })
        .collect();
    for w in &wanted {
        if !mappings.mappings.contains_key(w) && !mappings.disabled.contains_key(w) {
            return fail(&[format!(
                "no mapping named `{w}` in {}",
                settings.mappings_dir.display()
            )]);
        }
    }
    let (mut passed, mut failed) = (0, 0);
    // Sources not enabled are tested too: every case sees only its own `env:`.
    let every = mappings.mappings.iter().chain(mappings.disabled.iter());
    for (source, mapping) in every {
        if !wanted.is_empty() && !wanted.contains(source) {
            continue;
        }
        for result in cases::run(mapping, &settings.defaults) {
            match &result.failure {
                None => {
                    passed += 1;
                    say!("ok   {}: {}", result.source, result.name);
                }
                Some(why) => {
                    failed += 1;
                    say!("FAIL {}: {}: {why}", result.source, result.name);
                }
            }
        }
    }
    say!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn explain(
    config: &Path,
    env: &Env,
    source: &str,
    headers: &[String],
    at: Option<i64>,
    payload: &Path,
) -> ExitCode {
    let (settings, mappings) = match load(config, env) {
        Ok(x) => x,
        Err(errors) => return fail(&errors),
    };
    let Some(mapping) = mappings.get(source) else {
        if ["yaml", "yml"]
            .iter()
            .any(|ext| mappings.dir.join(format!("{source}.{ext}")).is_file())
        {
            return fail(&[format!(
                "source `{source}` is not enabled: add it to P0_RELAY_SOURCES (relay.yaml `sources`)"
            )]);
        }
        let known: Vec<&String> = mappings.mappings.keys().collect();
        return fail(&[format!(
            "no mapping for source `{source}` (known: {known:?})"
        )]);
    };
    let mut map = HeaderMap::new();
    for h in headers {
        let Some((k, v)) = h.split_once(':') else {
            return fail(&[format!("--header `{h}`: write it as `Name: value`")]);
        };
        match (
            HeaderName::from_bytes(k.trim().as_bytes()),
            HeaderValue::from_str(v.trim()),
        ) {
            (Ok(k), Ok(v)) => {
                map.append(k, v);
            }
            _ => return fail(&[format!("--header `{h}`: not a valid header")]),
        }
    }
    let text = match std::fs::read(payload) {
        Ok(t) => t,
        Err(e) => return fail(&[format!("{}: {e}", payload.display())]),
    };
    let body: serde_json::Value = match serde_json::from_slice(&text) {
        Ok(v) => v,
        Err(e) => return fail(&[format!("{}: not JSON: {e}", payload.display())]),
    };
    let input = Input {
        headers: &map,
        body: &body,
    };
    let (verdict, trace) = mapping.explain(input, Some(std::time::SystemTime::now()));
    say!("source:   {source} ({})", mapping.file.display());
    let now = at.unwrap_or_else(crate::verify::unix_now);
    match mapping.verifier.verify_at(&map, &text, now) {
        Ok(v) => say!("verified: {v}"),
        // The refusal names headers from the mapping file, never the request's values.
        Err(e) => say!(
            "verified: NO, {e} ({}): a live relay answers 401",
            mapping.verifier.scheme()
        ),
    }
    let delivery = mapping.dedup_key(input, &text);
    say!("delivery: {}", delivery);
    for t in &trace {
        let mark = if t.matched { "MATCH" } else { "no   " };
        say!("  {mark} rule `{}`: {}", t.rule, t.detail);
    }
    say!("decision: {}", cases::describe(&verdict));
    if let crate::mapping::Verdict::Decided { elements, .. } = &verdict {
        for e in elements {
            say!(
                "  element {} ({} decision(s)), stored as delivery {}",
                e.key,
                e.decisions,
                crate::mapping::element_key(&delivery, &e.key)
            );
        }
    }
    if let crate::mapping::Verdict::Decided { binding, .. } = &verdict {
        match &binding.subject {
            Some(s) => say!("subject:  {}", printable(s)),
            None => say!("subject:  none (a later subject end cannot revoke these)"),
        }
        if let Some(reply) = &binding.reply {
            let on = match &reply.comment {
                Some(c) => format!(", reacting on comment {}", printable(c)),
                None => String::new(),
            };
            say!(
                "answer:   through {} on the subject{on}, once P0 has answered",
                reply.via
            );
        }
        if let (Some(subject), true) = (&binding.subject, binding.ends_subject) {
            say!(
                "ends subject: revokes every request approved under `{}` (source {source}) and not yet revoked",
                printable(subject)
            );
            for line in would_revoke(&settings, source, subject) {
                say!("  {line}");
            }
        }
        if let Some(gate) = &binding.gate {
            let asked = match settings.answers.api(gate.via()) {
                Some(api) => format!("asks {}", api.url),
                None => format!("has no {} API token: `serve` refuses to start", gate.via()),
            };
            say!(
                "on call:  the worker checks before P0 is called ({asked}): {}",
                gate.describe()
            );
        }
    }
    ExitCode::SUCCESS
}

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

fn health(config: &Path, env: &Env, url: Option<String>, timeout: std::time::Duration) -> ExitCode {
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
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
        .and_then(|rt| rt.block_on(ask_ready(&url, own, timeout)));
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
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(timeout)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .tls_danger_accept_invalid_certs(own)
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    let response = http.get(url).send().await.map_err(|e| {
        let kind = if e.is_timeout() {
            "no answer in time"
        } else if e.is_connect() {
            "cannot connect"
        } else {
            "request failed"
        };
        format!("{url}: {kind}")
    })?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
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

/// What ending `subject` would revoke now, as the store (if there is one yet) sees it.
fn would_revoke(settings: &Settings, source: &str, subject: &str) -> Vec<String> {
    let location = &settings.store.location;
    if let StoreLocation::Sqlite(path) = location
        && !path.exists()
    {
        return vec!["(no store yet: nothing approved under it)".into()];
    }
    let windows = Windows {
        dedup: settings.store.dedup_window,
        coalesce: settings.store.coalesce_window,
    };
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return Vec::new();
    };
    runtime.block_on(async {
        let (store, writer) = match store::inspect(location, windows).await {
            Ok(s) => s,
            Err(e) => return vec![format!("(cannot read the store: {e})")],
        };
        let filter = ListFilter {
            source: Some(source.to_owned()),
            subject: Some(subject.to_owned()),
            limit: 1000,
            ..ListFilter::default()
        };
        let rows = store.list(filter).await.unwrap_or_default();
        drop(store);
        writer.join().await;
        // Newest first: the first job seen per request is its latest under this subject.
        let mut seen = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for r in rows {
            if !seen.insert((r.org.clone(), r.request_id.clone())) {
                continue;
            }
            let live = matches!(
                r.state.as_str(),
                "pending" | "sending" | "succeeded" | "dry_run"
            );
            if r.action == "approve" && live {
                out.push(format!(
                    "would revoke {} in org {} (approved by job {}, {})",
                    r.request_id, r.org, r.id, r.state
                ));
            }
        }
        if out.is_empty() {
            out.push("(nothing approved under it is still granted)".into());
        }
        out
    })
}

fn time(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn jobs(config: &Path, env: &Env, db: Option<String>, command: JobsCommand) -> ExitCode {
    let (location, windows) = match db {
        Some(text) => match StoreLocation::parse("--db", &text, Path::new(".")) {
            Ok(l) => (
                l,
                Windows {
                    dedup: std::time::Duration::from_secs(7 * 86_400),
                    coalesce: std::time::Duration::from_secs(600),
                },
            ),
            Err(e) => return fail(&[e]),
        },
        None => match Settings::load(config, env) {
            Ok(s) => (
                s.store.location.clone(),
                Windows {
                    dedup: s.store.dedup_window,
                    coalesce: s.store.coalesce_window,
                },
            ),
            Err(errors) => return fail(&errors),
        },
    };
    if let StoreLocation::Sqlite(path) = &location
        && !path.exists()
    {
        return fail(&[format!("{}: no store here yet", path.display())]);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&[format!("cannot start the runtime: {e}")]),
    };
    runtime.block_on(async {
        let (store, writer) = match store::inspect(&location, windows).await {
            Ok(s) => s,
            Err(e) => return fail(&[format!("{location}: {e}")]),
        };
        let code = jobs_command(&store, command).await;
        drop(store);
        writer.join().await;
        code
    })
}

async fn jobs_command(store: &store::StoreHandle, command: JobsCommand) -> ExitCode {
    let result = match command {
        JobsCommand::List {
            state,
            source,
            subject,
            limit,
            json,
        } => {
            let state = match state.as_deref().map(|s| (s, State::parse(s))) {
                None => None,
                Some((_, Some(s))) => Some(s),
                Some((s, None)) => {
                    return fail(&[format!(
                        "--state `{s}`: one of pending, sending, succeeded, rejected, dead, dry_run"
                    )]);
                }
            };
            let filter = ListFilter {
                state,
                source,
                subject,
                limit,
            };
            store.list(filter).await.map(|rows| {
                if json {
                    for r in rows {
                        println!("{}", json_safe(&serde_json::to_string(&r).unwrap_or_default()));
                    }
                } else {
                    say!(
                        "{:>6}  {:<9}  {:<7}  {:<12}  {:<24}  {:<5}  {:>3}  {:<10}  {:<20}  {:<24}  LAST",
                        "ID", "STATE", "ACTION", "ORG", "REQUEST", "EXP", "TRY", "SOURCE", "UPDATED",
                        "SUBJECT"
                    );
                    for r in rows {
                        let last = match (r.last_status, &r.last_error) {
                            (Some(s), Some(e)) => format!("{s} {e}"),
                            (Some(s), None) => s.to_string(),
                            (None, Some(e)) => e.clone(),
                            (None, None) => String::new(),
                        };
                        say!(
                            "{:>6}  {:<9}  {:<7}  {:<12}  {:<24}  {:<5}  {:>3}  {:<10}  {:<20}  {:<24}  {last}",
                            r.id,
                            r.state,
                            r.action,
                            r.org,
                            r.request_id,
                            r.expiration.as_deref().unwrap_or("-"),
                            r.attempts,
                            r.source,
                            time(r.updated_at_ms),
                            r.subject.as_deref().map(printable).unwrap_or_else(|| "-".into())
                        );
                    }
                }
            })
        }
        JobsCommand::Show { id } => store.show(id).await.map(|found| match found {
            None => say!("no job {id}"),
            Some(d) => {
                let j = &d.job;
                say!(
                    "job {}: {} {} in org {} ({})",
                    j.id,
                    j.action,
                    j.request_id,
                    j.org,
                    j.state
                );
                if let Some(e) = &j.expiration {
                    say!("  expiration: {e}");
                }
                if let Some(s) = &j.subject {
                    say!("  subject:    {}", printable(s));
                }
                if let Some(by) = j.ended_by {
                    say!("  bound:      revoked because delivery {by} ended its subject");
                }
                if let Some(gate) = &d.gate {
                    let asked = serde_json::from_str::<crate::domain::Gate>(gate)
                        .map(|g| g.describe())
                        .unwrap_or_else(|_| printable(gate));
                    say!("  on call:    checked before P0 is called: {asked}");
                    match &d.evidence {
                        Some(e) => say!("  evidence:   {e}"),
                        None => say!("  evidence:   (not checked yet)"),
                    }
                }
                say!("  attempts:   {}", j.attempts);
                say!("  created:    {}", time(j.created_at_ms));
                if j.state == "pending" {
                    say!("  next try:   {}", time(j.next_attempt_at_ms));
                }
                if let Some(e) = &j.last_error {
                    say!("  last error: {e}");
                }
                let dl = &d.delivery;
                say!(
                    "delivery {}: source {}, key {}, received {}, rule `{}`, actor {}",
                    dl.id,
                    dl.source,
                    dl.dedup_key,
                    time(dl.received_at_ms),
                    dl.rule,
                    dl.actor.as_deref().unwrap_or("-")
                );
                say!("history:");
                for a in &d.attempts {
                    say!(
                        "  {}  {:<12} status {:<4} {:>5} ms  {}",
                        time(a.at_ms),
                        a.result,
                        a.status
                            .map(|s| s.to_string())
                            .unwrap_or_else(|| "-".into()),
                        a.duration_ms,
                        a.error.as_deref().unwrap_or("")
                    );
                }
                if d.attempts.is_empty() {
                    say!("  (no attempts yet)");
                }
                if !d.answers.is_empty() {
                    say!("answers back:");
                    for a in &d.answers {
                        say!(
                            "  {} {:<9} {:<8} {:<9} tries {:<3} status {:<4} {}  {}",
                            a.id,
                            a.via,
                            a.kind,
                            a.state,
                            a.attempts,
                            a.last_status
                                .map(|s| s.to_string())
                                .unwrap_or_else(|| "-".into()),
                            time(a.updated_at_ms),
                            a.last_error
                                .as_deref()
                                .map(printable)
                                .unwrap_or_else(|| printable(&a.body))
                        );
                    }
                }
            }
        }),
        JobsCommand::Replay { id, dead } => {
            let which = match (id, dead) {
                (Some(id), false) => Replay::One(id),
                (None, true) => Replay::AllDead,
                _ => return fail(&["name a job ID or --dead".into()]),
            };
            match store.replay(which).await {
                Ok(replayed) => return replay_said(&replayed, id),
                Err(e) => Err(e),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&[e.to_string()]),
    }
}

/// What `jobs replay` says, and its exit code: a named job left where it was (a later
/// decision on its request overtook it, or its subject ended) is a failure (exit 1); with
/// `--dead`, those left are listed.
fn replay_said(replayed: &Replayed, named: Option<i64>) -> ExitCode {
    for o in &replayed.overtaken {
        let (job, by) = (o.job, o.by);
        if o.by_action == o.action {
            say!(
                "job {job} ({}) not replayed: job {by} is a later {} of the same request; replay job {by} if that is the decision to send",
                o.action,
                o.by_action
            );
        } else {
            say!(
                "job {job} ({}) not replayed: job {by}, a later {} of the same request, would be undone by it",
                o.action,
                o.by_action
            );
        }
    }
    for (id, reason) in &replayed.ended {
        say!("job {id} (approve) not replayed: {reason}");
    }
    let left = !replayed.overtaken.is_empty() || !replayed.ended.is_empty();
    if !replayed.queued.is_empty() {
        say!(
            "queued again: {:?}; a running relay picks them up within a second",
            replayed.queued
        );
    } else if !left {
        say!("nothing to replay (only dead or rejected jobs can be replayed)");
    }
    match named {
        Some(_) if left => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_safe_escapes_what_a_terminal_would_act_on() {
        assert_eq!(terminal_safe("req-1 Jörg 🚀"), "req-1 Jörg 🚀");
        assert_eq!(
            terminal_safe("a\u{1b}[2J\r\n\t\\S+\u{9b}\u{202e}\u{7f}\u{e0041}"),
            "a\\u{1b}[2J\\r\\n\\t\\S+\\u{9b}\\u{202e}\\u{7f}\\u{e0041}"
        );
    }

    #[test]
    fn json_safe_keeps_the_value() {
        let value = serde_json::json!({ "e": "\u{1b}]0;x\u{7}\u{85}\u{202e}\u{e0041}\\\"" });
        let text = serde_json::to_string(&value).unwrap();
        let safe = json_safe(&text);
        assert!(!safe.chars().any(hidden_or_control), "{safe}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&safe).unwrap(),
            value
        );
    }
}
