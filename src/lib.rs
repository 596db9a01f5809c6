//! enkf-dnn: training the Yegenoglu et al. (2020) network with the Ensemble Kalman Filter.
//!
//! Layout: [`data`] reads IDX files, [`model`] describes the network and its parameter
//! layout, [`backend`] is the seam that [`cpu`] and [`gpu`] fulfil, [`enkf`] holds the
//! update rules written once over that seam, [`train`] the training loop and outputs.

#![warn(missing_docs)]

pub mod backend;
pub mod cpu;
pub mod data;
pub mod dist;
pub mod enkf;
pub mod error;
pub mod gpu;
pub mod io;
pub mod model;
pub mod train;

pub use error::{Error, Result};
pub mod app;
pub mod cli;
pub mod plot;
pub mod reproduce;
pub mod run_dir;
pub mod signals;
pub mod stdout;
