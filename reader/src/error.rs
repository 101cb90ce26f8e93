//! Reader errors, by what the caller should do about them, and their one mapping to gRPC
//! statuses. Internal causes are logged here and never sent to clients.

use flare_storage_common::tonic::{Code, Status};
use tracing::error;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is wrong; `field` names the offending request field.
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("permission denied: {0}")]
    PermissionDenied(&'static str),
    #[error("{0}")]
    FailedPrecondition(String),
    /// The command lost every race with concurrent commands on the same data; retrying it
    /// completes it.
    #[error("{0}; retry the command")]
    Aborted(&'static str),
    /// The cache did not take a write the command needs; retrying the command completes it.
    #[error("the message cache is unavailable; retry the command")]
    CacheUnavailable,
    /// A store failed; the call may succeed if retried.
    #[error("failed to query the message store")]
    Store(#[from] sqlx::Error),
    /// MongoDB failed; the call may succeed if retried.
    #[error("failed to query the message store")]
    Mongo(#[from] mongodb::error::Error),
    /// The export directory could not be written or read (full, unmounted…).
    #[error("the export directory is not usable; retry later")]
    ExportDirectory,
    /// Configuration guarantees a database; kept so no path can panic.
    #[error("no message database is configured")]
    NoDatabase,
    /// A command's task ended without an answer (it panicked).
    #[error("the command was interrupted; retry the command")]
    Interrupted,
    /// A stored message could not be decoded.
    #[error("stored message {message_id} is unreadable")]
    Corrupt { message_id: String },
}

impl Error {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { field, reason: reason.into() }
    }

    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Aborted(_) => Code::Aborted,
            Error::CacheUnavailable | Error::ExportDirectory => Code::Unavailable,
            Error::Store(
                sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_),
            ) => Code::Unavailable,
            Error::Mongo(cause) if crate::store::mongo::unreachable(cause) => Code::Unavailable,
            Error::Store(_) | Error::Mongo(_) | Error::Corrupt { .. } | Error::NoDatabase | Error::Interrupted => {
                Code::Internal
            }
        }
    }

    /// The underlying cause, for logs.
    pub fn cause(&self) -> String {
        match self {
            Error::Store(cause) => cause.to_string(),
            Error::Mongo(cause) => cause.to_string(),
            other => other.to_string(),
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let code = error.code();
        match &error {
            Error::Store(_) | Error::Mongo(_) => error!(error = %error.cause(), "store query failed"),
            Error::Corrupt { message_id } => error!(message_id, "stored message payload does not decode"),
            _ => {}
        }
        Status::new(code, error.to_string())
    }
}
