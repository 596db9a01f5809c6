//! MNIST-style IDX data sets. TODO(helper): implement.

/// A data-set fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Placeholder.
    #[error("todo")]
    Todo,
}
