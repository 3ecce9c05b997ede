//! Black-box test harness, by concern: the relay in process on port 0 against a fake P0 with a
//! fresh store (`relay`), webhooks as each provider sends them (`hooks`), the fakes the relay
//! calls (`providers`) and the API descriptions they are checked against (`contracts`), the
//! real binary and command line (`binary`), faults injected into the store (`faults`),
//! PostgreSQL (`pg`), and tests skipped for a missing tool (`skip`).
#![allow(dead_code)]

pub mod binary;
pub mod contracts;
pub mod faults;
pub mod hooks;
pub mod pg;
pub mod providers;
pub mod relay;
pub mod skip;

pub use binary::*;
pub use contracts::*;
pub use faults::*;
pub use hooks::*;
pub use providers::*;
pub use relay::*;
