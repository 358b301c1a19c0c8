//! The `ledgerline` binary: parses the command line, sets up logging, runs the command.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use ledgerline::config::{Cli, LogFormat};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    // Colours only for a person: a log file or collector would get escape codes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(ledgerline::progress::log_writer);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    ledgerline::cli::run(cli).await
}
