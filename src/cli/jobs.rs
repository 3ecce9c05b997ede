//! `p0-relay jobs`: lists and shows stored decisions, and replays dead letters, on the store
//! the config names (or `--db`), without touching what relays running on it have in flight.
//! Reading a store needs only the config's `store:` section.

use std::path::Path;
use std::process::ExitCode;

use super::{JobsCommand, fail, json_safe, named_store, on_store, time};
use crate::config::Settings;
use crate::domain::printable;
use crate::env::Env;
use crate::store::{
    JobDetail, JobSummary, ListFilter, Replay, Replayed, State, StoreError, StoreHandle,
};

pub(super) fn jobs(config: &Path, env: &Env, db: Option<String>, command: JobsCommand) -> ExitCode {
    let located = match db {
        Some(db) => named_store(&db),
        None => Settings::load_store(config, env).map(|store| {
            let windows = store.windows();
            (store.location, windows)
        }),
    };
    match located {
        Ok((location, windows)) => on_store(&location, windows, async |s| run(s, command).await),
        Err(errors) => fail(&errors),
    }
}

async fn run(store: &StoreHandle, command: JobsCommand) -> ExitCode {
    let done = match command {
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
            store.list(filter).await.map(|rows| list(&rows, json))
        }
        JobsCommand::Show { id } => store.show(id).await.map(|found| match found {
            None => say!("no job {id}"),
            Some(d) => show(&d),
        }),
        JobsCommand::Replay { id, dead } => return replay(store, id, dead).await,
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&[e.to_string()]),
    }
}

/// The decisions as a table, each column as wide as its longest value (or one JSON object a
/// line).
fn list(rows: &[JobSummary], json: bool) {
    if json {
        for r in rows {
            println!(
                "{}",
                json_safe(&serde_json::to_string(r).unwrap_or_default())
            );
        }
        return;
    }
    let header = [
        "ID", "STATE", "ACTION", "ORG", "REQUEST", "EXP", "TRY", "SOURCE", "UPDATED", "SUBJECT",
        "LAST",
    ];
    let cells: Vec<[String; 11]> = rows.iter().map(cells).collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    say!("{}", line(&header.map(str::to_owned), &widths));
    for row in &cells {
        say!("{}", line(row, &widths));
    }
}

fn cells(r: &JobSummary) -> [String; 11] {
    let last = match (r.last_status, &r.last_error) {
        (Some(s), Some(e)) => format!("{s} {e}"),
        (Some(s), None) => s.to_string(),
        (None, Some(e)) => e.clone(),
        (None, None) => String::new(),
    };
    [
        r.id.to_string(),
        r.state.clone(),
        r.action.clone(),
        r.org.clone(),
        r.request_id.clone(),
        r.expiration.clone().unwrap_or_else(|| "-".into()),
        r.attempts.to_string(),
        r.source.clone(),
        time(r.updated_at_ms),
        r.subject
            .as_deref()
            .map(printable)
            .unwrap_or_else(|| "-".into()),
        last,
    ]
}

/// One table line: numbers right-aligned, text left-aligned, the last column as it is.
fn line(cells: &[String; 11], widths: &[usize; 11]) -> String {
    let mut out = Vec::with_capacity(cells.len());
    for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
        let pad = w.saturating_sub(cell.chars().count());
        out.push(match i {
            10 => cell.clone(),
            0 | 6 => format!("{}{cell}", " ".repeat(pad)),
            _ => format!("{cell}{}", " ".repeat(pad)),
        });
    }
    out.join("  ").trim_end().to_owned()
}

/// One decision: what it is, its on-call check, its delivery, its attempts and answers back.
fn show(d: &JobDetail) {
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
    history(d);
}

/// A decision's attempts and its answers back.
fn history(d: &JobDetail) {
    let status = |s: Option<u16>| s.map(|s| s.to_string()).unwrap_or_else(|| "-".into());
    say!("history:");
    for a in &d.attempts {
        say!(
            "  {}  {:<12} status {:<4} {:>5} ms  {}",
            time(a.at_ms),
            a.result,
            status(a.status),
            a.duration_ms,
            a.error.as_deref().unwrap_or("")
        );
    }
    if d.attempts.is_empty() {
        say!("  (no attempts yet)");
    }
    if !d.answers.is_empty() {
        say!("answers back:");
    }
    for a in &d.answers {
        say!(
            "  {} {:<9} {:<8} {:<9} tries {:<3} status {:<4} {}  {}",
            a.id,
            a.via,
            a.kind,
            a.state,
            a.attempts,
            status(a.last_status),
            time(a.updated_at_ms),
            a.last_error
                .as_deref()
                .map(printable)
                .unwrap_or_else(|| printable(&a.body))
        );
    }
}

async fn replay(store: &StoreHandle, id: Option<i64>, dead: bool) -> ExitCode {
    let which = match (id, dead) {
        (Some(id), false) => Replay::One(id),
        (None, true) => Replay::AllDead,
        _ => return fail(&["name a job ID or --dead".into()]),
    };
    match store.replay(which, &operator()).await {
        Ok(replayed) => replay_report(&replayed, id),
        Err(e) => fail(&[StoreError::to_string(&e)]),
    }
}

/// Who runs this command, for the audit trail: the OS user by name and ID (from
/// `/etc/passwd`), and who became them through sudo.
fn operator() -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(uid) = std::fs::metadata("/proc/self").map(|m| m.uid()) else {
        return std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    };
    let name = std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|passwd| {
            passwd.lines().find_map(|line| {
                let mut fields = line.split(':');
                let name = fields.next()?;
                (fields.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
            })
        });
    let mut who = match name {
        Some(name) => format!("{name} (uid {uid})"),
        None => format!("uid {uid}"),
    };
    // Said by sudo only when it made this process root: anyone else can set the variable.
    if uid == 0
        && let Ok(by) = std::env::var("SUDO_USER")
    {
        who.push_str(&format!(", through sudo by {by}"));
    }
    who
}

/// What `jobs replay` says, and its exit code: a named job left where it was (a later
/// decision on its request overtook it, or its subject ended) is a failure (exit 1); with
/// `--dead`, those left are listed.
fn replay_report(replayed: &Replayed, named: Option<i64>) -> ExitCode {
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
