//! File formats: `.npy` arrays.

pub mod npy;
pub mod safetensors;
