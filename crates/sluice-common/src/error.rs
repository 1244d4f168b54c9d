//! The error type shared by the Sluice libraries.

use std::path::PathBuf;

/// Result alias used across Sluice.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, each variant naming the user's mistake where there is one.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The SQL text does not parse; `line` and `column` are 1-based.
    #[error("SQL syntax error at line {line}, column {column}: {message}")]
    Syntax {
        line: u64,
        column: u64,
        message: String,
    },
    /// The SQL parses but cannot be planned (unknown name, type mismatch, unsupported shape).
    #[error("{0}")]
    Plan(String),
    /// A connector option is missing, unknown or has a bad value.
    #[error("table '{table}': {message}")]
    Connector { table: String, message: String },
    /// Reading or writing a file failed.
    #[error("{}: {}", path.display(), plain_io(source))]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A record in an input could not be decoded.
    #[error("{location}: {message}")]
    BadRecord { location: String, message: String },
    /// An Arrow kernel failed.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// The running job failed.
    #[error("{0}")]
    Runtime(String),
}

impl Error {
    /// A planning error with a message.
    pub fn plan(message: impl Into<String>) -> Self {
        Error::Plan(message.into())
    }

    /// A connector configuration error for `table`.
    pub fn connector(table: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Connector {
            table: table.into(),
            message: message.into(),
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// What an I/O error means, in words (the system's own text in parentheses).
fn plain_io(e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    let meaning = match e.kind() {
        K::NotFound => "no such file or directory",
        K::PermissionDenied => "permission denied",
        K::NotADirectory => "a part of this path is a file where a directory was expected",
        K::IsADirectory => "this is a directory where a file was expected",
        K::StorageFull => "the disk is full",
        K::AlreadyExists => "it already exists",
        K::ReadOnlyFilesystem => "the file system is read-only",
        _ => return e.to_string(),
    };
    format!("{meaning} ({e})")
}
