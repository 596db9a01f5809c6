//! Gradient optimizers as PyTorch defines them (`torch.optim.SGD`, `torch.optim.Adam`,
//! single-tensor CPU path, no weight decay), on a flat f32 parameter vector.
//!
//! Arithmetic is f32 with the hyper-parameters rounded to f32, as PyTorch does for
//! float32 parameters; per-step scalars (Adam's bias corrections) are computed in f64
//! as Python does, then rounded.

use crate::backend::check_len;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// How a run trains the network.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    /// The Ensemble Kalman Filter (no gradients).
    #[default]
    Enkf,
    /// Stochastic gradient descent with momentum (backpropagation).
    Sgd,
    /// Adam (backpropagation).
    Adam,
}

impl Optimizer {
    /// Default learning rate: SGD 0.1 (the paper), Adam 1e-3 (PyTorch); `None` for EnKF.
    pub fn default_lr(self) -> Option<f64> {
        match self {
            Optimizer::Enkf => None,
            Optimizer::Sgd => Some(Sgd::DEFAULT_LR),
            Optimizer::Adam => Some(Adam::DEFAULT_LR),
        }
    }
}

/// SGD with momentum, `torch.optim.SGD(params, lr, momentum)` (dampening 0, no Nesterov,
/// no weight decay). Per element, with g the gradient:
/// step 1: `buf = g`; later steps: `buf = momentum · buf + g`; then `p −= lr · buf`.
/// With momentum 0 the buffer is skipped: `p −= lr · g`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sgd {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor μ.
    pub momentum: f64,
    /// Momentum buffer (P values; empty until the first step).
    pub buf: Vec<f32>,
}

impl Sgd {
    /// The paper's learning rate.
    pub const DEFAULT_LR: f64 = 0.1;
    /// The paper's momentum.
    pub const DEFAULT_MOMENTUM: f64 = 0.9;

    /// An optimizer with an empty momentum buffer. Errors: [`Error::Config`] unless
    /// `lr` is finite and > 0 and `momentum` is in [0, 1).
    pub fn new(lr: f64, momentum: f64) -> Result<Self> {
        check_lr(lr)?;
        if !(0.0..1.0).contains(&momentum) {
            return Err(Error::Config(format!(
                "momentum = {momentum}: must be in [0, 1)"
            )));
        }
        Ok(Sgd {
            lr,
            momentum,
            buf: Vec::new(),
        })
    }

    /// One update of `params` (P) with `grad` (P). Errors: [`Error::Shape`] when the
    /// lengths differ (or differ from the first step's).
    pub fn step(&mut self, params: &mut [f32], grad: &[f32]) -> Result<()> {
        check_len("Sgd::step grad", grad.len(), params.len())?;
        let lr = self.lr as f32;
        if self.momentum == 0.0 {
            for (p, &g) in params.iter_mut().zip(grad) {
                *p += -lr * g;
            }
            return Ok(());
        }
        let mu = self.momentum as f32;
        if self.buf.is_empty() {
            self.buf = grad.to_vec();
        } else {
            check_len("Sgd::step momentum buffer", self.buf.len(), params.len())?;
            for (b, &g) in self.buf.iter_mut().zip(grad) {
                *b = *b * mu + g;
            }
        }
        for (p, &b) in params.iter_mut().zip(&self.buf) {
            *p += -lr * b;
        }
        Ok(())
    }
}

/// Adam, `torch.optim.Adam(params, lr, betas=(β₁, β₂), eps)` (no AMSGrad, no weight
/// decay). Per element at step t (counted from 1), with g the gradient:
/// `m = m + (1−β₁)(g − m)` (PyTorch's `lerp`), `v = β₂ v + (1−β₂) g²`,
/// `p −= (lr / (1−β₁ᵗ)) · m / (√v / √(1−β₂ᵗ) + ε)`, i.e. `p −= lr · m̂ / (√v̂ + ε)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Adam {
    /// Learning rate.
    pub lr: f64,
    /// Decay of the first moment, β₁.
    pub beta1: f64,
    /// Decay of the second moment, β₂.
    pub beta2: f64,
    /// ε added to the denominator.
    pub eps: f64,
    /// First-moment estimate m (P values; empty until the first step).
    pub m: Vec<f32>,
    /// Second-moment estimate v (P values; empty until the first step).
    pub v: Vec<f32>,
    /// Steps taken so far.
    pub t: u64,
}

impl Adam {
    /// PyTorch's default learning rate.
    pub const DEFAULT_LR: f64 = 1e-3;
    /// PyTorch's default β₁.
    pub const DEFAULT_BETA1: f64 = 0.9;
    /// PyTorch's default β₂.
    pub const DEFAULT_BETA2: f64 = 0.999;
    /// PyTorch's default ε.
    pub const DEFAULT_EPS: f64 = 1e-8;

    /// Adam with PyTorch's default betas and ε. Errors: [`Error::Config`] unless `lr`
    /// is finite and > 0.
    pub fn new(lr: f64) -> Result<Self> {
        Self::with_params(
            lr,
            Self::DEFAULT_BETA1,
            Self::DEFAULT_BETA2,
            Self::DEFAULT_EPS,
        )
    }

    /// Adam with every hyper-parameter given. Errors: [`Error::Config`] unless `lr` is
    /// finite and > 0, both betas are in [0, 1) and `eps` ≥ 0.
    pub fn with_params(lr: f64, beta1: f64, beta2: f64, eps: f64) -> Result<Self> {
        check_lr(lr)?;
        for (name, b) in [("beta1", beta1), ("beta2", beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::Config(format!("{name} = {b}: must be in [0, 1)")));
            }
        }
        if !(eps >= 0.0 && eps.is_finite()) {
            return Err(Error::Config(format!(
                "eps = {eps}: must be finite and ≥ 0"
            )));
        }
        Ok(Adam {
            lr,
            beta1,
            beta2,
            eps,
            m: Vec::new(),
            v: Vec::new(),
            t: 0,
        })
    }

    /// The f32 scalars of step `self.t` (t ≥ 1), each computed in f64 and rounded once:
    /// shared by [`Adam::step`] and the CUDA twin (`adam_step_f32`), so both round alike.
    pub fn scalars(&self) -> AdamScalars {
        let t = i32::try_from(self.t).unwrap_or(i32::MAX);
        let bc1 = 1.0 - self.beta1.powi(t);
        AdamScalars {
            step_size: (self.lr / bc1) as f32,
            bc2_sqrt: ((1.0 - self.beta2.powi(t)).sqrt()) as f32,
            w1: (1.0 - self.beta1) as f32,
            b2: self.beta2 as f32,
            w2: (1.0 - self.beta2) as f32,
            eps: self.eps as f32,
        }
    }

    /// One update of `params` (P) with `grad` (P). Errors: [`Error::Shape`] when the
    /// lengths differ (or differ from the first step's).
    pub fn step(&mut self, params: &mut [f32], grad: &[f32]) -> Result<()> {
        check_len("Adam::step grad", grad.len(), params.len())?;
        if self.m.is_empty() {
            self.m = vec![0.0; params.len()];
            self.v = vec![0.0; params.len()];
        }
        check_len("Adam::step first moment", self.m.len(), params.len())?;
        check_len("Adam::step second moment", self.v.len(), params.len())?;
        self.t += 1;
        let k = self.scalars();
        for (((p, &g), m), v) in params
            .iter_mut()
            .zip(grad)
            .zip(self.m.iter_mut())
            .zip(self.v.iter_mut())
        {
            // torch.lerp with weight < 0.5: start + weight · (end − start).
            *m += k.w1 * (g - *m);
            *v = *v * k.b2 + k.w2 * g * g;
            let denom = v.sqrt() / k.bc2_sqrt + k.eps;
            // addcdiv: p + value · m / denom, evaluated left to right as ATen does.
            *p += -k.step_size * *m / denom;
        }
        Ok(())
    }
}

/// The per-step scalars of an Adam update, see [`Adam::scalars`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamScalars {
    /// lr / (1 − β₁ᵗ).
    pub step_size: f32,
    /// √(1 − β₂ᵗ).
    pub bc2_sqrt: f32,
    /// 1 − β₁.
    pub w1: f32,
    /// β₂.
    pub b2: f32,
    /// 1 − β₂.
    pub w2: f32,
    /// ε.
    pub eps: f32,
}

/// A gradient optimizer chosen at run time.
#[derive(Debug, Clone, PartialEq)]
pub enum GradOptimizer {
    /// SGD with momentum.
    Sgd(Sgd),
    /// Adam.
    Adam(Adam),
}

impl GradOptimizer {
    /// Builds the optimizer `kind` with learning rate `lr` (its default when `None`)
    /// and, for SGD, `momentum`. Errors: [`Error::Config`] for [`Optimizer::Enkf`] (not
    /// a gradient method) or an invalid hyper-parameter.
    pub fn new(kind: Optimizer, lr: Option<f64>, momentum: f64) -> Result<Self> {
        match kind {
            Optimizer::Enkf => Err(Error::Config(
                "optimizer 'enkf' has no gradient step; choose sgd or adam".into(),
            )),
            Optimizer::Sgd => Ok(GradOptimizer::Sgd(Sgd::new(
                lr.unwrap_or(Sgd::DEFAULT_LR),
                momentum,
            )?)),
            Optimizer::Adam => Ok(GradOptimizer::Adam(Adam::new(
                lr.unwrap_or(Adam::DEFAULT_LR),
            )?)),
        }
    }

    /// One update of `params` (P) with `grad` (P); see [`Sgd::step`], [`Adam::step`].
    pub fn step(&mut self, params: &mut [f32], grad: &[f32]) -> Result<()> {
        match self {
            GradOptimizer::Sgd(o) => o.step(params, grad),
            GradOptimizer::Adam(o) => o.step(params, grad),
        }
    }
}

fn check_lr(lr: f64) -> Result<()> {
    if lr > 0.0 && lr.is_finite() {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "learning rate = {lr}: must be finite and > 0"
        )))
    }
}
