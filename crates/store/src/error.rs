//! The error type of the storage layer. Driver errors are turned into text here so no
//! driver type crosses the trait; the HTTP layer logs them and answers a generic 5xx.

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("already exists")]
    Conflict,
    /// The database cannot be reached or is busy beyond the timeout: worth retrying.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Anything else the database reported.
    #[error("database error: {0}")]
    Database(String),
    /// A request or configuration the store cannot accept.
    #[error("{0}")]
    Invalid(String),
}

pub type StoreResult<T> = Result<T, StoreError>;
