//! The integration suite, one binary (each file a module, so the crate is linked once): the
//! real relay started on port 0 against a fake P0 and fake providers, the CLI run as a user
//! runs it, several relays on one PostgreSQL, and property tests. `cargo test --test api
//! <module>` runs one part (`sources`, `many_relays`, ...).

mod common;

mod audit;
mod bindings;
mod cli;
mod container;
mod deploy;
mod durability;
mod end_to_end;
mod ended;
mod grants;
mod hostile;
mod kubernetes;
mod listeners;
mod load;
mod many_relays;
mod oncall;
mod operations;
mod properties;
mod replay;
mod secrets;
mod sources;
