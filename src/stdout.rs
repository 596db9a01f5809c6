//! Writing the command's results to standard output without panicking.
//!
//! `println!` panics when stdout cannot be written (a full disk behind `> FILE`,
//! `> /dev/full`, a pipe whose reader has gone). [`outln!`](crate::outln) and
//! [`out!`](crate::out) write the same text and return [`Error::Stdout`] instead, so the
//! command ends with an error message and exit status 1; the run's files are written by
//! then. A closed stdout (`>&-`) is not an error: the standard library discards the text.

use crate::{Error, Result};
use std::io::Write;

/// Writes `args` to stdout and flushes it.
///
/// Errors: [`Error::Stdout`] with the OS error (ENOSPC, EPIPE, …).
pub fn print(args: std::fmt::Arguments<'_>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.flush())
        .map_err(Error::Stdout)
}

/// As `println!`, returning [`crate::Result`] instead of panicking (see [`print`]).
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::stdout::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// As `print!`, returning [`crate::Result`] instead of panicking (see [`print`]).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::stdout::print(format_args!($($arg)*))
    };
}
