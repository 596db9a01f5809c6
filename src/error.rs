//! The library's error type. Each subsystem has its own small enum; [`Error`] wraps them.

use std::path::PathBuf;

/// Every error the library returns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or validating a data set.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// A small dense system could not be solved.
    #[error(transparent)]
    Linalg(#[from] LinalgError),
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A buffer or file has the wrong shape.
    #[error("shape mismatch in {what}: expected {expected}, found {found}")]
    Shape {
        /// What was being checked.
        what: String,
        /// The expected shape, in words.
        expected: String,
        /// The shape found.
        found: String,
    },
    /// The CUDA backend failed (library missing, kernel failed to load, launch error).
    #[error("CUDA backend: {0}")]
    Cuda(String),
    /// An `.npy` file could not be read or written.
    #[error("{path}: {msg}")]
    Npy {
        /// The file.
        path: PathBuf,
        /// What was wrong with it.
        msg: String,
    },
    /// Any other I/O failure, with the file it concerned.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Members produced non-finite outputs and `--on-failure error` is in force.
    #[error(
        "iteration {iteration}: {failed} of {members} members produced non-finite outputs \
         (use --on-failure resample to redraw them, or lower sigma)"
    )]
    MembersFailed {
        /// The iteration whose forward pass failed.
        iteration: usize,
        /// Members with a non-finite output.
        failed: usize,
        /// Ensemble size.
        members: usize,
    },
    /// Under `--on-failure resample`, fewer than two members had finite outputs, so
    /// there is no Gaussian to redraw the others from.
    #[error(
        "{}{failed} of {members} members produced non-finite outputs: fewer than 2 are left \
         to resample the failed ones from (lower sigma, raise gamma, or enlarge the ensemble)",
        .iteration.map_or(String::new(), |i| format!("iteration {i}: "))
    )]
    TooFewToResample {
        /// The iteration whose forward pass failed, when known.
        iteration: Option<usize>,
        /// Members with a non-finite output.
        failed: usize,
        /// Ensemble size.
        members: usize,
    },
    /// A checkpoint is corrupt or belongs to another run.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// The run was stopped by a signal (Ctrl-C, SIGTERM, SIGUSR1: [`crate::signals`]).
    #[error("stopped by {signal} at iteration {iteration}; {resume}")]
    Interrupted {
        /// Updates done when the run stopped.
        iteration: usize,
        /// The signal's name.
        signal: &'static str,
        /// The exit code the program ends with (128 + the signal number).
        exit_code: i32,
        /// How to continue.
        resume: String,
    },
    /// Writing CSV output failed (see [`Error::csv`] for the form that names the file).
    #[error("CSV output: {0}")]
    Csv(#[from] csv::Error),
    /// A file's content is not what its format requires (a CSV or JSON file that does
    /// not parse, or holds no rows where rows are needed).
    #[error("{path}: {msg}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong, with the line or record where known.
        msg: String,
    },
    /// The command's results could not be written to standard output.
    #[error("writing to standard output: {0} (is its disk full, or was the pipe closed?)")]
    Stdout(#[source] std::io::Error),
    /// Writing or reading JSON failed.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl Error {
    /// Wraps an I/O error with the path it concerned.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A CSV error on the file `path`: [`Error::Io`] (keeping the OS error, e.g. ENOSPC)
    /// when the file could not be read or written, else [`Error::Parse`] with the
    /// record and field the reader names.
    pub fn csv(path: impl Into<PathBuf>, e: csv::Error) -> Self {
        let path = path.into();
        let msg = e.to_string();
        match e.into_kind() {
            csv::ErrorKind::Io(source) => Error::Io { path, source },
            _ => Error::Parse { path, msg },
        }
    }
}

/// A dense solve failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LinalgError {
    /// Cholesky factorisation met a non-positive pivot.
    #[error(
        "matrix block {block} (size {size}) is not positive definite: pivot {pivot} is {value:e}; \
         raise gamma or the ensemble size"
    )]
    NotPositiveDefinite {
        /// Index of the diagonal block that failed (0 when the matrix is one block).
        block: usize,
        /// Block size.
        size: usize,
        /// Index of the failing pivot inside the block.
        pivot: usize,
        /// The pivot's value (NaN when the backend cannot report it).
        value: f64,
    },
    /// The solve produced a non-finite value.
    #[error("solve produced a non-finite value at index {index}")]
    NonFinite {
        /// Flat index of the first non-finite value.
        index: usize,
    },
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
