//! The EnKF update rules, written once over [`crate::backend::Backend`]. TODO(helper).
