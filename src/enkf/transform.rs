//! The ensemble transform Kalman inversion (ETKI; the square-root filter of Bishop,
//! Etherton, Majumdar 2001 and Wang, Bishop 2004 as EnsembleKalmanProcesses'
//! `TransformInversion` applies it), in the gain/apply form of the other rules.
//!
//! With E = ΠU, A = ΠG (J × m), d̄ = y − ḡ and covariances over J, the transform update
//! moves the mean as the Kalman update and the anomalies by the symmetric square root of
//! T = (I + AAᵀ/(Jγ))⁻¹ (J × J): U ← 1ū'ᵀ + T^{1/2} E, ū' = ū + Eᵀ T A d̄ /(Jγ). Since A
//! is centred (1ᵀA = 0), T1 = 1 and the whole update is U ← S U with
//! S − I = 1 wᵀ + (T^{1/2} − I), w = A C⁻¹ d̄ / J, C = AᵀA/J + γI. Through the eigen-
//! decomposition C = Qᵀ diag(μ) Q (m × m, μ ≥ γ) the J × J functions become m × m ones:
//! T^{1/2} − I = A Qᵀ diag(φ) Q Aᵀ / J with φ(μ) = −1 / (γ q (1 + q)), q = √(μ/γ)
//! (the limit of (1/√(1+s) − 1)/(sγ) at s = μ/γ − 1, free of cancellation). So S − I =
//! X Aᵀ / J with
//!
//! ```text
//! X = 1 (C⁻¹ d̄)ᵀ + A Qᵀ diag(φ) Q       (J × m)
//! ```
//!
//! and the apply phase is the batch rule's. The deterministic batch update has
//! X = 1 (C⁻¹ d̄)ᵀ − A C⁻¹: the same mean, anomalies shrunk by T instead of T^{1/2}.
//! Costs: the batch rule's plus one m × m symmetric eigendecomposition (cuSOLVER
//! `syevd`; on the CPU Householder + QL, about a second at m = 640) and two 2·J·m²
//! products; linear in J, the observations enter only through m.

use crate::backend::{Backend, Trans};
use crate::Result;

/// The f32 factors of the parameter-order apply (`rows` × m in f64: A in `a64`, X in
/// `x64`) into `a32` and `x32`, and how the two GEMMs T = op(a32)·E/J, E += op(x32)·T
/// take them: with `balanced` (the transform rule's buffers after its gain; `c64` holds
/// Q) the bounded factors of [`TransformBuffers::balanced_factors`], m × rows, read
/// transposed; without, A and X rounded as they are. One process and ranks alike.
///
/// Errors: the backend's.
#[allow(clippy::too_many_arguments)]
pub(crate) fn apply_factors<B: Backend>(
    backend: &B,
    balanced: Option<&mut TransformBuffers<B>>,
    a64: &B::F64,
    x64: &B::F64,
    c64: &B::F64,
    dims: (usize, usize),
    a32: &mut B::F32,
    x32: &mut B::F32,
) -> Result<(Trans, Trans)> {
    match balanced {
        Some(t) => {
            t.balanced_factors(backend, a64, x64, c64, dims, a32, x32)?;
            Ok((Trans::No, Trans::Yes))
        }
        None => {
            backend.f64_to_f32(x64, x32)?;
            backend.f64_to_f32(a64, a32)?;
            Ok((Trans::Yes, Trans::No))
        }
    }
}

/// The transform update's extra buffers for J members and m observations.
pub struct TransformBuffers<B: Backend> {
    /// Ones, J.
    ones: B::F64,
    /// d̄ = mean innovation, then Q d̄ scaled, m.
    dbar: B::F64,
    /// Q d̄, m.
    t1: B::F64,
    /// C⁻¹ d̄, m.
    r: B::F64,
    /// Q Aᵀ, scaled by φ: m × J (then the balanced apply's factors, one after the other).
    y: B::F64,
    /// √max(μ, γ) of the last gain's C = Qᵀ diag(μ) Q (m), for [`Self::balanced_factors`].
    sqrt_mu: Vec<f64>,
}

impl<B: Backend> TransformBuffers<B> {
    /// Buffers for `members` (J) and `obs` (m).
    pub fn new(backend: &B, members: usize, obs: usize) -> Result<Self> {
        let mut ones = backend.zeros_f64(members)?;
        backend.add_scaled_f32_f64(&backend.upload_f32(&vec![1.0; members])?, 1.0, &mut ones)?;
        Ok(TransformBuffers {
            ones,
            dbar: backend.zeros_f64(obs)?,
            t1: backend.zeros_f64(obs)?,
            r: backend.zeros_f64(obs)?,
            y: backend.zeros_f64(obs * members)?,
            sqrt_mu: Vec::new(),
        })
    }

    /// Device bytes of these buffers.
    pub fn bytes(members: usize, obs: usize) -> u64 {
        8 * (members as u64 + 3 * obs as u64 + (obs * members) as u64)
    }

    /// X (into `x64`, which holds the innovations D on entry) from A (`a64`) and
    /// C = AᵀA/J + γI (`c64`, overwritten by its eigenvectors), for (rows, m) and the
    /// noise variance `gamma` (module docs). `rows` = J in one process; a rank of a
    /// sharded run passes its J_r rows of A, D and X, and the mean innovation d̄ over
    /// every rank's members as `dbar` (`None`: d̄ = Dᵀ1/rows from these rows). Row j of
    /// X depends on the members only through d̄ and C, so the rows are the one-process
    /// run's.
    ///
    /// Errors: the backend's, and the eigendecomposition's.
    #[allow(clippy::too_many_arguments)]
    pub fn gain(
        &mut self,
        backend: &B,
        a64: &B::F64,
        x64: &mut B::F64,
        c64: &mut B::F64,
        (j, m): (usize, usize),
        gamma: f64,
        dbar: Option<&[f64]>,
    ) -> Result<()> {
        match dbar {
            Some(d) => backend.write_f64(d, &mut self.dbar)?,
            // d̄ = Dᵀ 1 / J.
            None => backend.gemm_f64(
                Trans::Yes,
                Trans::No,
                m,
                1,
                j,
                1.0 / j as f64,
                x64,
                &self.ones,
                0.0,
                &mut self.dbar,
            )?,
        }
        let mu = backend.sym_eigen_f64(c64, m)?;
        // C⁻¹ = Qᵀ diag(1/μ) Q; φ as in the module docs (μ ≥ γ up to rounding).
        let inv: Vec<f64> = mu.iter().map(|&u| 1.0 / u.max(gamma)).collect();
        let phi: Vec<f64> = mu
            .iter()
            .map(|&u| {
                let q = (u / gamma).max(1.0).sqrt();
                -1.0 / (gamma * q * (1.0 + q))
            })
            .collect();
        // r = C⁻¹ d̄ = Qᵀ diag(1/μ) Q d̄.
        backend.gemm_f64(
            Trans::No,
            Trans::No,
            m,
            1,
            m,
            1.0,
            c64,
            &self.dbar,
            0.0,
            &mut self.t1,
        )?;
        backend.scale_rows_f64(&mut self.t1, m, 1, &inv)?;
        backend.gemm_f64(
            Trans::Yes,
            Trans::No,
            m,
            1,
            m,
            1.0,
            c64,
            &self.t1,
            0.0,
            &mut self.r,
        )?;
        // X = (Q Aᵀ)ᵀ diag(φ) Q + 1 rᵀ.
        backend.gemm_f64(
            Trans::No,
            Trans::Yes,
            m,
            j,
            m,
            1.0,
            c64,
            a64,
            0.0,
            &mut self.y,
        )?;
        backend.scale_rows_f64(&mut self.y, m, j, &phi)?;
        backend.gemm_f64(Trans::Yes, Trans::No, j, m, m, 1.0, &self.y, c64, 0.0, x64)?;
        backend.gemm_f64(
            Trans::No,
            Trans::No,
            j,
            m,
            1,
            1.0,
            &self.ones,
            &self.r,
            1.0,
            x64,
        )?;
        self.sqrt_mu = mu.iter().map(|&u| u.max(gamma).sqrt()).collect();
        Ok(())
    }

    /// The factors of the parameter-order apply in the eigenbasis of the last gain's C,
    /// each scaled to O(1): X Aᵀ = X̃ Ãᵀ with Ãᵀ = diag(1/√μ) Q Aᵀ into `at32` and X̃ᵀ =
    /// diag(√μ) Q Xᵀ into `xt32` (both m × J, f32; `c64` holds Q from [`Self::gain`]).
    ///
    /// Why: on a badly scaled ensemble (large weights, C spanning many decades) X has
    /// entries up to |d̄|/γ along C's small eigenvalues, and the f32 rounding of AᵀE/J
    /// (which mixes every direction) is amplified by them; measured on a real run, the
    /// mean step came out 2.5 % off the f64 one and the network broke (REPRODUCTION.md,
    /// the ETKI tail jump). Here Ã's columns have norm ≤ √J, X̃'s are bounded by
    /// |d̄|/√γ and √J (module docs: X = 1 rᵀ + A Qᵀ diag(φ) Q), so the f32 products
    /// round relative to bounded factors, as the member order's S = I + XAᵀ/J does.
    /// Q is orthogonal, so the product is the same in exact arithmetic.
    ///
    /// Errors: the backend's.
    #[allow(clippy::too_many_arguments)]
    pub fn balanced_factors(
        &mut self,
        backend: &B,
        a64: &B::F64,
        x64: &B::F64,
        c64: &B::F64,
        (j, m): (usize, usize),
        at32: &mut B::F32,
        xt32: &mut B::F32,
    ) -> Result<()> {
        let inv: Vec<f64> = self.sqrt_mu.iter().map(|v| 1.0 / v).collect();
        backend.gemm_f64(
            Trans::No,
            Trans::Yes,
            m,
            j,
            m,
            1.0,
            c64,
            a64,
            0.0,
            &mut self.y,
        )?;
        backend.scale_rows_f64(&mut self.y, m, j, &inv)?;
        backend.f64_to_f32(&self.y, at32)?;
        backend.gemm_f64(
            Trans::No,
            Trans::Yes,
            m,
            j,
            m,
            1.0,
            c64,
            x64,
            0.0,
            &mut self.y,
        )?;
        backend.scale_rows_f64(&mut self.y, m, j, &self.sqrt_mu)?;
        backend.f64_to_f32(&self.y, xt32)
    }
}
