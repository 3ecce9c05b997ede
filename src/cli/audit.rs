//! `p0-relay audit`: the audit trail in ID order, as text for people or JSON lines for log
//! shippers (`--follow` goes on printing what commits, so a shipper resumes with `--since`
//! the last ID it saw), and `audit verify`, which recomputes every seal. Reading needs only
//! the config's `store:` and `audit:` sections (or `--db` and `P0_RELAY_AUDIT_KEY`).

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use super::{AuditCommand, fail, json_safe, named_store, on_store, terminal_safe};
use crate::config::{AuditSettings, Settings};
use crate::env::Env;
use crate::store::audit::{AuditRow, Body, Start};
use crate::store::{self, StoreHandle};

/// How many events one read takes.
const PAGE: usize = 1000;
/// How often `--follow` looks for new events.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// What `audit` was asked.
#[derive(clap::Args)]
pub(crate) struct Ask {
    /// The store (a SQLite file or a postgres:// URL), instead of the one the config names.
    #[arg(long, global = true, value_name = "PATH|URL")]
    pub db: Option<String>,
    /// Only events after this ID (the last one a shipper saw); for `verify`, from the seal
    /// before it.
    #[arg(long, global = true, value_name = "ID")]
    pub since: Option<i64>,
    /// Only events up to this time (RFC 3339, e.g. 2026-12-01T00:00:00Z).
    #[arg(long, value_name = "TIME", value_parser = humantime::parse_rfc3339_weak)]
    pub until: Option<SystemTime>,
    /// Go on printing events as they commit.
    #[arg(long)]
    pub follow: bool,
    /// One JSON object a line, as stored.
    #[arg(long)]
    pub json: bool,
}

pub(super) fn audit(config: &Path, env: &Env, ask: Ask, command: Option<AuditCommand>) -> ExitCode {
    // The store `--db` names with the key from the environment, or the config's.
    let located = match &ask.db {
        Some(db) => named_store(db)
            .and_then(|(location, windows)| Ok((location, windows, AuditSettings::from_env(env)?))),
        None => Settings::load_audit(config, env).map(|(store, audit)| {
            let windows = store.windows();
            (store.location, windows, audit)
        }),
    };
    let (location, windows, settings) = match located {
        Ok(x) => x,
        Err(errors) => return fail(&errors),
    };
    on_store(&location, windows, async |store| match command {
        Some(AuditCommand::Verify) => verify(store, &settings, ask.since).await,
        None => print(store, &ask).await,
    })
}

/// Prints the events after `--since`, up to `--until`; with `--follow`, goes on.
async fn print(store: &StoreHandle, ask: &Ask) -> ExitCode {
    let until_ms = ask.until.map(|t| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    });
    let mut after = ask.since.unwrap_or(0);
    let mut out = std::io::stdout().lock();
    loop {
        let rows = match store.audit_events(after, PAGE).await {
            Ok(rows) => rows,
            Err(e) => return fail(&[e.to_string()]),
        };
        for row in &rows {
            // In ID order, up to the first event written after `--until`: a shipper that goes
            // on with `--since` the last ID printed misses none (one a relay with a slower
            // clock stamped earlier may come after it).
            if until_ms.is_some_and(|until| row.at_ms > until) {
                return ExitCode::SUCCESS;
            }
            after = row.id;
            let line = match ask.json {
                true => json_safe(&row.body).into_owned(),
                false => text(row),
            };
            // A reader that went away (a closed pipe) ends the command quietly.
            if writeln!(out, "{line}").is_err() {
                return ExitCode::SUCCESS;
            }
        }
        if out.flush().is_err() {
            return ExitCode::SUCCESS;
        }
        if rows.len() == PAGE {
            continue;
        }
        let past_until = until_ms.is_some_and(|until| store::now_ms() > until);
        if !ask.follow || past_until {
            return ExitCode::SUCCESS;
        }
        tokio::time::sleep(FOLLOW_POLL).await;
    }
}

/// An event as a line of text: its ID, time, event and outcome, then each field it has.
fn text(row: &AuditRow) -> String {
    let Ok(b) = serde_json::from_str::<Body>(&row.body) else {
        return terminal_safe(&format!("{} (unreadable) {}", row.id, row.body)).into_owned();
    };
    let a = &b.about;
    let mut line = format!("{} {} {} {}", b.id, b.time, b.event.as_str(), b.outcome);
    let job = b.job_id.map(|j| j.to_string());
    let status = b.status.map(|s| s.to_string());
    let covers = b.covers.as_ref().map(|c| format!("{}..={}", c.from, c.to));
    let fields = [
        ("job", &job),
        ("source", &a.source),
        ("rule", &a.rule),
        ("actor", &a.actor),
        ("action", &a.action),
        ("org", &a.org),
        ("request", &a.request_id),
        ("subject", &a.subject),
        ("status", &status),
        ("operator", &b.operator),
        ("covers", &covers),
        ("reason", &b.reason),
        ("detail", &b.detail),
    ];
    for (name, value) in fields {
        if let Some(v) = value {
            line.push_str(&format!(" {name}={v:?}"));
        }
    }
    terminal_safe(&line).into_owned()
}

/// Recomputes every seal (from the one before `--since`); exit 1 naming the first problem.
async fn verify(store: &StoreHandle, settings: &AuditSettings, since: Option<i64>) -> ExitCode {
    let start = match since {
        None => Start::First,
        Some(id) => match store.seal_before(id).await {
            Ok(Some(seal)) => Start::After(seal),
            Ok(None) => Start::First,
            Err(e) => return fail(&[e.to_string()]),
        },
    };
    let found = match store.verify(settings.key.as_ref(), start).await {
        Ok(found) => found,
        Err(e) => return fail(&[e.to_string()]),
    };
    if let Some(problem) = &found.problem {
        return fail(&[format!("the audit trail does not verify: {problem}")]);
    }
    if found.events == 0 {
        println!("no audit events");
        return ExitCode::SUCCESS;
    }
    let keyed = match settings.key {
        Some(_) => "keyed",
        None => "unkeyed",
    };
    println!(
        "verified {} events from {} ({} {keyed} seals){}; {} not sealed yet",
        found.events,
        found.from.unwrap_or(1),
        found.seals,
        found
            .sealed_through
            .map_or(String::new(), |to| format!(", sealed through {to}")),
        found.unsealed
    );
    ExitCode::SUCCESS
}
