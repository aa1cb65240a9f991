//! Library error type.
//!
//! Every error names the file / key / record it is about and, where there is
//! one, what to do about it (see DESIGN.md §5). `anyhow` is used only in
//! `main.rs` and `cli/`; library code returns [`Error`].
//!
//! Exit codes: an error that stops a command maps to 2 ([`Error::exit_code`]),
//! an interruption (SIGINT / SIGTERM honoured at a safe point,
//! [`Error::Interrupted`]) to 130 like a shell's Ctrl-C; per-item failures
//! are not errors at this level — stages record them in the manifest and
//! report them in their `*Report`, and the CLI exits with 1.

use std::path::{Path, PathBuf};

/// Exit code of a command stopped by SIGINT / SIGTERM: 128 + SIGINT, what
/// a shell reports for a Ctrl-C'd process.
pub const INTERRUPTED_EXIT: i32 = 130;

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can stop a stage or a command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O failure on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A configuration or usage problem (bad flag value, bad TOML field…).
    #[error("{0}")]
    Config(String),
    /// A model / checkpoint problem: missing keys, wrong shapes, bad header…
    #[error("{0}")]
    Model(String),
    /// A manifest (SQLite) problem.
    #[error("manifest {path}: {msg}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },
    /// An image that could not be decoded or processed.
    #[error("{path}: {msg}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },
    /// A tensor operation failed (shape mismatch, unsupported dtype…).
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
    /// SQLite failure outside a specific manifest context.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// JSON (de)serialisation failure.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// Stopped by SIGINT / SIGTERM at a safe point, with what was kept and
    /// how to go on (exit code 130).
    #[error("{0}")]
    Interrupted(String),
    /// Anything else, with context already in the message.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// Wrap an I/O error with the path it happened on.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// A configuration / usage error.
    pub fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }

    /// A model / checkpoint error.
    pub fn model(msg: impl Into<String>) -> Self {
        Error::Model(msg.into())
    }

    /// Process exit code when this error stops a command: 130 for
    /// [`Error::Interrupted`] (128 + SIGINT, what a shell reports for
    /// Ctrl-C), else 2 (usage / config / model / environment). Exit code 1
    /// is reserved for "the stage ran but some items failed", which is not
    /// an `Error`.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Interrupted(_) => INTERRUPTED_EXIT,
            _ => 2,
        }
    }
}

/// `" (relative paths are from the current folder, CWD)"` for a relative
/// `path`, else nothing: for "no such file" messages.
pub fn relative_to_cwd(path: &Path) -> String {
    if path.is_absolute() {
        return String::new();
    }
    match std::env::current_dir() {
        Ok(cwd) => format!(
            " (relative paths are from the current folder, {})",
            cwd.display()
        ),
        Err(_) => String::new(),
    }
}

/// Extension to attach a path to `std::io::Result`s.
pub trait IoContext<T> {
    /// Attach `path` to the error.
    fn at(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
