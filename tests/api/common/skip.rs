//! Tests that need a tool CI installs (a Docker engine, PostgreSQL, promtool, curl, ...): with
//! CI set, its absence fails the test; elsewhere the test skips, and every skip is listed after
//! the run's summary, so "ok" never hides a test that did nothing. Shared by the integration
//! suite and the library's store tests.
#![allow(dead_code)]

use std::io::Write;
use std::sync::{Mutex, Once};

static SKIPPED: Mutex<Vec<String>> = Mutex::new(Vec::new());
static REPORT: Once = Once::new();

/// Whether the tests run in CI, where nothing may be skipped.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
}

/// `missing` (a tool or service) is not here: in CI a failure; elsewhere the running test is
/// recorded as skipped and the caller returns.
pub fn skip(missing: &str) {
    assert!(
        !in_ci(),
        "{missing}: required in CI (.ci/run installs or starts it)"
    );
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    eprintln!("{missing}: skipped (CI runs it)");
    if let Ok(mut skipped) = SKIPPED.lock() {
        skipped.push(format!("{test}: {missing}"));
    }
    REPORT.call_once(|| {
        // SAFETY: `report` is an `extern "C"` function that catches nothing and cannot unwind:
        // it only formats and writes to stderr, ignoring errors.
        unsafe {
            libc::atexit(report);
        }
    });
}

/// Lists the skipped tests after the test binary's summary (it runs as the process exits).
extern "C" fn report() {
    let mut skipped = SKIPPED.lock().map(|s| s.clone()).unwrap_or_default();
    if skipped.is_empty() {
        return;
    }
    skipped.sort();
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "\nSKIPPED: {} of the tests counted as passed above did not run here (CI runs them):",
        skipped.len()
    );
    for s in skipped {
        let _ = writeln!(err, "  {s}");
    }
}
