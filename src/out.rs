//! The commands' answers on standard output. A reader that goes away before the end
//! (`ledgerline projections status | head -1`) ends the command quietly with status 141, as
//! a shell shows a process that SIGPIPE ended, where `println!` would panic (Rust ignores
//! SIGPIPE, so the write fails with `BrokenPipe` instead).

use std::io::Write;

/// The exit status of a command whose standard output's reader went away: 128 + SIGPIPE (13).
pub const BROKEN_PIPE_EXIT: i32 = 141;

/// `println!` for the commands' answers (see the module's note).
macro_rules! outln {
    () => {
        $crate::out::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::out::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for the commands' answers (see the module's note).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::out::write(format_args!($($arg)*))
    };
}

pub(crate) use {out, outln};

/// Writes `args` to standard output, for an answer that must not be lost quietly (a secret
/// shown once): the caller says what went.
pub fn try_write(args: std::fmt::Arguments<'_>) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_fmt(args).and_then(|()| stdout.flush())
}

/// Writes `args` to standard output; a reader that went away ends the process with
/// [`BROKEN_PIPE_EXIT`], any other failure with 2 and the cause on standard error.
pub fn write(args: std::fmt::Arguments<'_>) {
    match try_write(args) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            std::process::exit(BROKEN_PIPE_EXIT)
        }
        Err(e) => {
            eprintln!("error: writing to standard output: {e}");
            std::process::exit(2)
        }
    }
}
