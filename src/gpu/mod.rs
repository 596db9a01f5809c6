//! The CUDA backend. TODO: next issue.
