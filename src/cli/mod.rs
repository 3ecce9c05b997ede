//! The `p0-relay` command line, a file per command: `serve`, `check` and `test`, `explain`,
//! `health`, `jobs`, `audit`. Each command loads the config the same way and reports problems naming
//! the file, rule and field. Everything it prints passes through `terminal_safe` (or
//! `json_safe`, in `safe`): text from senders, P0 and mapping files never reaches a terminal
//! with its control characters raw.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::Settings;
use crate::env::Env;
use crate::mapping::MappingSet;
use crate::store::{self, StoreHandle, StoreLocation, Windows};

/// `println!` for the command line: the line is printed through `terminal_safe`.
macro_rules! say {
    ($($arg:tt)*) => {
        println!("{}", $crate::cli::terminal_safe(&format!($($arg)*)))
    };
}

mod audit;
mod check;
mod explain;
mod health;
mod jobs;
mod safe;
mod serve;

pub use safe::{json_safe, terminal_safe};

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
    /// Print the audit trail in order (text, or one JSON object a line with --json); `verify`
    /// recomputes its seals.
    #[command(args_conflicts_with_subcommands = false)]
    Audit {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        ask: audit::Ask,
        #[command(subcommand)]
        command: Option<AuditCommand>,
    },
}

#[derive(Subcommand, Clone, Copy)]
pub(crate) enum AuditCommand {
    /// Recompute every seal; exit 1 naming the first event changed, removed or inserted since
    /// it was sealed (with P0_RELAY_AUDIT_KEY, keyed seals too).
    Verify,
}

#[derive(Subcommand)]
pub(crate) enum JobsCommand {
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
        Command::Serve { config, dry_run } => serve::serve(&config.config, env, dry_run),
        Command::Check { config } => check::check(&config.config, &env),
        Command::Test { config, mappings } => check::test(&config.config, &env, &mappings),
        Command::Explain {
            config,
            source,
            headers,
            at,
            payload,
        } => explain::explain(&config.config, &env, &source, &headers, at, &payload),
        Command::Health {
            config,
            url,
            timeout,
        } => health::health(&config.config, &env, url, timeout),
        Command::Jobs {
            config,
            db,
            command,
        } => jobs::jobs(&config.config, &env, db, command),
        Command::Audit {
            config,
            ask,
            command,
        } => audit::audit(&config.config, &env, ask, command),
    }
}

pub(crate) fn fail(errors: &[String]) -> ExitCode {
    for e in errors {
        // Some errors (YAML's) show the offending lines: keep their line breaks.
        let lines: Vec<Cow<'_, str>> = e.split('\n').map(terminal_safe).collect();
        eprintln!("error: {}", lines.join("\n"));
    }
    let unset = |e: &String| e.contains("environment variable") && e.contains("is not set");
    if errors.iter().any(unset) {
        eprintln!(
            "note: set the variables the config names, or read them from a file with --env-file FILE (`--env-file demo.env` for the demo)"
        );
    }
    ExitCode::FAILURE
}

pub(crate) fn load(config: &Path, env: &Env) -> Result<(Settings, MappingSet), Vec<String>> {
    let settings = Settings::load(config, env)?;
    let mappings = MappingSet::load(&settings.mappings_dir, env, &settings.defaults)?;
    Ok((settings, mappings))
}

/// The config and every mapping file, enabled or not (for `check` and `test`).
pub(crate) fn load_every(config: &Path, env: &Env) -> Result<(Settings, MappingSet), Vec<String>> {
    let settings = Settings::load(config, env)?;
    let mappings = MappingSet::load_every(&settings.mappings_dir, env, &settings.defaults)?;
    Ok((settings, mappings))
}

/// Runs `work` on a runtime of its own (one thread): the commands that ask a store or a
/// relay; an error to print when none can start.
pub(crate) fn block_on<F: Future>(work: F) -> Result<F::Output, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map(|rt| rt.block_on(work))
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

/// Runs `work` on the store at `location`, opened for inspection (a SQLite file must be there
/// already: reading never creates one), then closes it with its writer drained.
pub(crate) fn on_store(
    location: &StoreLocation,
    windows: Windows,
    work: impl AsyncFnOnce(&StoreHandle) -> ExitCode,
) -> ExitCode {
    if let StoreLocation::Sqlite(path) = location
        && !path.exists()
    {
        return fail(&[format!("{}: no store here yet", path.display())]);
    }
    let ran = block_on(async {
        let (store, writer) = match store::inspect(location, windows).await {
            Ok(s) => s,
            Err(e) => return fail(&[format!("{location}: {e}")]),
        };
        let code = work(&store).await;
        drop(store);
        writer.join().await;
        code
    });
    ran.unwrap_or_else(|e| fail(&[e]))
}

/// The store `--db` names, and the windows a relay keeps by default (a week's dedup window):
/// reading needs no config.
pub(crate) fn named_store(db: &str) -> Result<(StoreLocation, Windows), Vec<String>> {
    let location = StoreLocation::parse("--db", db, Path::new(".")).map_err(|e| vec![e])?;
    let windows = Windows {
        dedup: Duration::from_secs(7 * 86_400),
        coalesce: Duration::from_secs(600),
    };
    Ok((location, windows))
}

/// A time as the command line shows it (RFC 3339, to the second).
pub(crate) fn time(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}
