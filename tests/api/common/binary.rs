//! The real binary as a separate process (for tests where a process must die or where its
//! whole output is inspected), the command line run to completion, and the tools CI installs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::*;

/// The real binary, started as a separate process (for tests where a process must die or
/// where its whole output is inspected).
pub struct BinRelay {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
    /// Its store, read behind its back to tell when it has handled its input.
    pub store: StoreAt,
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl BinRelay {
    /// Starts `p0-relay serve` with `config` and `vars`, and waits until it is ready.
    // The child is reaped by `wait` or, failing that, by `Drop`.
    #[allow(clippy::zombie_processes)]
    pub async fn start(
        config: &Path,
        vars: &HashMap<String, String>,
        log: PathBuf,
        extra_args: &[&str],
    ) -> BinRelay {
        let port = free_port();
        let text = std::fs::read_to_string(config).unwrap();
        let text = text.replace("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{port}"));
        std::fs::write(config, text).unwrap();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_p0-relay"))
            .env_clear()
            .envs(vars)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .args(extra_args)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start p0-relay");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let http = client();
        for _ in 0..200 {
            if let Ok(r) = http.get(format!("http://{addr}/readyz")).send().await
                && r.status().is_success()
            {
                return BinRelay {
                    child,
                    addr,
                    log,
                    store: store_at(config, vars),
                };
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "relay did not become ready: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    pub fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    pub async fn post(&self, hook: &Hook) -> (u16, Value) {
        answer(send(&client(), &format!("http://{}", self.addr), hook).await).await
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait(mut self) -> Option<i32> {
        for _ in 0..400 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("relay did not exit");
    }
}

/// Where the store `config` names is, read with `vars`.
fn store_at(config: &Path, vars: &HashMap<String, String>) -> StoreAt {
    let env = p0_relay::config::env::Env::default().overlay(vars);
    match p0_relay::config::Settings::load_store(config, &env)
        .expect("the config names a store")
        .location
    {
        p0_relay::store::StoreLocation::Sqlite(path) => StoreAt::Sqlite(path),
        p0_relay::store::StoreLocation::Postgres(pg) => StoreAt::Postgres(pg.to_string()),
    }
}

impl Drop for BinRelay {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a `p0-relay` command to completion with only `vars` in its environment.
pub fn run_cli(args: &[&str], vars: &HashMap<String, String>) -> (Option<i32>, String) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_p0-relay"))
        .current_dir(repo())
        .env_clear()
        .envs(vars)
        .args(args)
        .output()
        .expect("run p0-relay");
    (
        o.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// Runs a tool that CI installs in `dir`: whether it succeeded and what it printed. Elsewhere,
/// `None` when it is missing (the test is skipped); in CI a missing tool fails the test.
pub fn ci_tool(cmd: &str, args: &[&str], dir: &Path) -> Option<(bool, String)> {
    match std::process::Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
    {
        Ok(o) => Some((
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )),
        Err(e) => {
            super::skip::skip(&format!("{cmd} ({e})"));
            None
        }
    }
}
