//! ledgerline: an audit-first, event-sourced backend. The service library: the ledger store,
//! the HTTP API, the CLI and the wiring, so that tests can start the app in-process.
#![forbid(unsafe_code)]

pub mod aggregate_locks;
pub mod api;
pub mod app;
pub mod auditor;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod db;
pub mod keys;
pub mod ledger;
pub mod metrics;
pub mod out;
pub mod progress;
