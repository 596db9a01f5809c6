//! File formats: `.npy` arrays.

pub mod npy;
