//! Minimal `.npy` (format 1.0) reader and writer for 1-D and 2-D little-endian f32/f64 arrays.
