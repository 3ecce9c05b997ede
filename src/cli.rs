//! The `p0-relay` command line: `serve`, `check`, `test`, `explain` and `jobs`. Each command
//! loads the config the same way and reports problems naming the file, rule and field.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use clap::{Args, Parser, Subcommand};

use crate::app::{Options, Relay};
use crate::config::Settings;
use crate::config::env::Env;
use crate::domain::printable;
use crate::mapping::{Input, MappingSet, cases};
use crate::store::{self, ListFilter, Replay, State, StoreLocation, Windows};

#[derive(Parser)]
#[command(
    name = "p0-relay",
    version,
    about = "Turns PagerDuty, Opsgenie and GitHub webhooks into P0 access decisions"
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
    /// Run the test cases written in mapping files.
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
        payload: PathBuf,
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
        /// Only decisions asked on this subject (an incident or alert ID, `owner/repo#12`).
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
            payload,
        } => explain(&config.config, &env, &source, &headers, &payload),
        Command::Jobs {
            config,
            db,
            command,
        } => jobs(&config.config, &env, db, command),
    }
}

fn fail(errors: &[String]) -> ExitCode {
    for e in errors {
        eprintln!("error: {e}");
    }
    ExitCode::FAILURE
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
        relay.wait().await;
        ExitCode::SUCCESS
    })
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

fn check(config: &Path, env: &Env) -> ExitCode {
    let (settings, mappings) = match load(config, env) {
        Ok(x) => x,
        Err(errors) => return fail(&errors),
    };
    for w in crate::config::audit(&settings, &mappings) {
        println!("warning: {w}");
    }
    if settings.p0.token.is_none() {
        println!("note: p0.token is empty: `serve` will need --dry-run or P0_API_TOKEN");
    }
    let backend = if settings.store.location.is_postgres() {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    println!("store: {} ({backend})", settings.store.location);
    for (source, m) in &mappings.mappings {
        println!(
            "ok: {source} ({}, verified by {})",
            m.file.display(),
            m.verifier.scheme()
        );
    }
    println!(
        "{}: valid, {} mapping(s)",
        config.display(),
        mappings.mappings.len()
    );
    ExitCode::SUCCESS
}

fn test(config: &Path, env: &Env, names: &[String]) -> ExitCode {
    let (settings, mappings) = match load(config, env) {
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
        if !mappings.mappings.contains_key(w) {
            return fail(&[format!(
                "no mapping named `{w}` in {}",
                settings.mappings_dir.display()
            )]);
        }
    }
    let (mut passed, mut failed) = (0, 0);
    for (source, mapping) in &mappings.mappings {
        if !wanted.is_empty() && !wanted.contains(source) {
            continue;
        }
        for result in cases::run(mapping, env, &settings.defaults) {
            match &result.failure {
                None => {
                    passed += 1;
                    println!("ok   {}: {}", result.source, result.name);
                }
                Some(why) => {
                    failed += 1;
                    println!("FAIL {}: {}: {why}", result.source, result.name);
                }
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn explain(config: &Path, env: &Env, source: &str, headers: &[String], payload: &Path) -> ExitCode {
    let (settings, mappings) = match load(config, env) {
        Ok(x) => x,
        Err(errors) => return fail(&errors),
    };
    let Some(mapping) = mappings.get(source) else {
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
    println!("source:   {source} ({})", mapping.file.display());
    println!("delivery: {}", mapping.dedup_key(input, &text));
    for t in &trace {
        let mark = if t.matched { "MATCH" } else { "no   " };
        println!("  {mark} rule `{}`: {}", t.rule, t.detail);
    }
    println!("decision: {}", cases::describe(&verdict));
    if let crate::mapping::Verdict::Decided { binding, .. } = &verdict {
        match &binding.subject {
            Some(s) => println!("subject:  {}", printable(s)),
            None => println!("subject:  none (a later subject end cannot revoke these)"),
        }
        if let Some(reply) = &binding.reply {
            let on = match &reply.comment {
                Some(c) => format!(", reacting on comment {}", printable(c)),
                None => String::new(),
            };
            println!(
                "answer:   through {} on the subject{on}, once P0 has answered",
                reply.via
            );
        }
        if let (Some(subject), true) = (&binding.subject, binding.ends_subject) {
            println!(
                "ends subject: revokes every request approved under `{}` (source {source}) and not yet revoked",
                printable(subject)
            );
            for line in would_revoke(&settings, source, subject) {
                println!("  {line}");
            }
        }
    }
    ExitCode::SUCCESS
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
                        println!("{}", serde_json::to_string(&r).unwrap_or_default());
                    }
                } else {
                    println!(
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
                        println!(
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
            None => println!("no job {id}"),
            Some(d) => {
                let j = &d.job;
                println!(
                    "job {}: {} {} in org {} ({})",
                    j.id, j.action, j.request_id, j.org, j.state
                );
                if let Some(e) = &j.expiration {
                    println!("  expiration: {e}");
                }
                if let Some(s) = &j.subject {
                    println!("  subject:    {}", printable(s));
                }
                if let Some(by) = j.ended_by {
                    println!("  bound:      revoked because delivery {by} ended its subject");
                }
                println!("  attempts:   {}", j.attempts);
                println!("  created:    {}", time(j.created_at_ms));
                if j.state == "pending" {
                    println!("  next try:   {}", time(j.next_attempt_at_ms));
                }
                if let Some(e) = &j.last_error {
                    println!("  last error: {e}");
                }
                let dl = &d.delivery;
                println!(
                    "delivery {}: source {}, key {}, received {}, rule `{}`, actor {}",
                    dl.id,
                    dl.source,
                    dl.dedup_key,
                    time(dl.received_at_ms),
                    dl.rule,
                    dl.actor.as_deref().unwrap_or("-")
                );
                println!("history:");
                for a in &d.attempts {
                    println!(
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
                    println!("  (no attempts yet)");
                }
                if !d.answers.is_empty() {
                    println!("answers back:");
                    for a in &d.answers {
                        println!(
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
            store.replay(which).await.map(|ids| {
                if ids.is_empty() {
                    println!("nothing to replay (only dead or rejected jobs can be replayed)");
                } else {
                    println!(
                        "queued again: {ids:?}; a running relay picks them up within a second"
                    );
                }
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&[e.to_string()]),
    }
}
