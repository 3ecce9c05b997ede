//! p0-relay turns webhooks from incident, alerting and code-hosting tools (PagerDuty, Opsgenie,
//! GitHub, Alertmanager, Grafana, incident.io, Jira Service Management, or any sender a mapping
//! file describes) into access decisions in P0.
//!
//! The path of one webhook, in module order: `server` accepts the connection, `receiver`
//! reads the body, `verify` checks its signature, `mapping` (pure) turns it into proposals,
//! `policy` (pure) into decisions, `store` commits them durably before the sender hears 202,
//! and `worker` delivers them through `p0`, paced by `ratelimit`, counted in `metrics`.
//! Once P0 has answered, `answers` tells the asker where they asked.

pub mod answers;
pub mod app;
pub mod claims;
pub mod cli;
pub mod config;
pub mod domain;
pub mod env;
pub mod health;
pub mod mapping;
pub mod memory;
pub mod metrics;
pub mod oncall;
pub mod p0;
pub mod policy;
pub mod providers;
pub mod ratelimit;
pub mod receiver;
pub mod retry;
pub mod secret;
pub mod server;
pub mod store;
pub mod supervise;
pub mod verify;
pub mod worker;
