//! Tikhonov-regularised EKI (Chada, Stuart, Tong 2020) in member space.
//!
//! The prior N(0, τI) (τ = σ²/λ) enters as P extra observations: the forward map is
//! Ĝ(u) = [G(u); u], the data ŷ = [y; 0], the noise Γ̂ = diag(γI_m, τI_P). Formed
//! directly, the update would need a (m + P)² system (P = 18,050 for the paper's net).
//! With E = ΠU (J × P), A = ΠG and D = y1ᵀ − G (J × m), the batch update
//! ΔU = D̂ (ÂᵀÂ/J + Γ̂)⁻¹ ÂᵀE/J, Â = [A, E], D̂ = [D, −U], turns by the push-through
//! identity (ÂᵀÂ/J + Γ̂)⁻¹Âᵀ = Γ̂⁻¹Âᵀ (ÂΓ̂⁻¹Âᵀ/J + I)⁻¹ into J × J algebra:
//!
//! ```text
//! M = I + (A Aᵀ/γ + E Eᵀ/τ) / J            (J × J, symmetric positive definite)
//! N = (D Aᵀ/γ − U Eᵀ/τ) / J,  U Eᵀ = E Eᵀ + 1 (E ū)ᵀ
//! U ← U + (N M⁻¹) E
//! ```
//!
//! Costs: E Eᵀ (2·J²·P f32) and the apply (2·J²·P f32), as the member-space order of
//! the plain update plus one Gram matrix; J³/3 for the Cholesky factor of M; the
//! P-sized system is never formed. E Eᵀ and E ū are f32 products (cuBLAS SGEMM on the
//! GPU), added into the f64 systems by `add_scaled_f32_f64`.

use crate::backend::{Backend, Trans};
use crate::Result;

/// Device buffers of the member-space Tikhonov update for J members and P weights.
pub(super) struct TikhonovBuffers<B: Backend> {
    /// Prior variance τ of every weight.
    pub prior_variance: f64,
    /// Anomalies E = ΠU, J × P.
    e32: B::F32,
    /// Ensemble mean ū, P.
    mean32: B::F32,
    /// Ones, J: the rank-one terms.
    ones32: B::F32,
    /// E Eᵀ, J × J.
    k32: B::F32,
    /// E ū, J.
    v32: B::F32,
    /// M, J × J (overwritten by its factor).
    m64: B::F64,
    /// N, then N M⁻¹, J × J.
    n64: B::F64,
    /// N M⁻¹ in f32, J × J.
    s32: B::F32,
}

impl<B: Backend> TikhonovBuffers<B> {
    /// Buffers for `members` × `params` ensembles with prior variance `prior_variance`.
    pub fn new(backend: &B, members: usize, params: usize, prior_variance: f64) -> Result<Self> {
        let (j, p) = (members, params);
        Ok(TikhonovBuffers {
            prior_variance,
            e32: backend.zeros_f32(j * p)?,
            mean32: backend.zeros_f32(p)?,
            ones32: backend.upload_f32(&vec![1.0; j])?,
            k32: backend.zeros_f32(j * j)?,
            v32: backend.zeros_f32(j)?,
            m64: backend.zeros_f64(j * j)?,
            n64: backend.zeros_f64(j * j)?,
            s32: backend.zeros_f32(j * j)?,
        })
    }

    /// Device bytes of these buffers (for the memory check).
    pub fn bytes(members: usize, params: usize) -> u64 {
        let (j, p) = (members as u64, params as u64);
        4 * (j * p + p + 2 * j + 2 * j * j) + 8 * (2 * j * j)
    }

    /// `u += N M⁻¹ E` (module docs) from A and D (`a64`, `d64`, J × m each) for
    /// (J, P, m), with the data's noise variance `gamma` and the prior's `tau` (both
    /// already divided by the step Δt by the caller).
    ///
    /// Errors: the backend's; [`crate::error::LinalgError::NotPositiveDefinite`] when M
    /// cannot be factorised (u is then unchanged).
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &mut self,
        backend: &B,
        a64: &B::F64,
        d64: &B::F64,
        u: &mut B::F32,
        (j, p, m): (usize, usize, usize),
        gamma: f64,
        tau: f64,
    ) -> Result<()> {
        let jf = j as f64;
        // E = U − 1ūᵀ.
        backend.row_mean(u, j, p, &mut self.mean32)?;
        backend.copy_f32(u, &mut self.e32)?;
        backend.gemm_f32(
            Trans::No,
            Trans::No,
            j,
            p,
            1,
            -1.0,
            &self.ones32,
            &self.mean32,
            1.0,
            &mut self.e32,
        )?;
        // K = E Eᵀ and v = E ū.
        backend.gemm_f32(
            Trans::No,
            Trans::Yes,
            j,
            j,
            p,
            1.0,
            &self.e32,
            &self.e32,
            0.0,
            &mut self.k32,
        )?;
        backend.gemm_f32(
            Trans::No,
            Trans::No,
            j,
            1,
            p,
            1.0,
            &self.e32,
            &self.mean32,
            0.0,
            &mut self.v32,
        )?;
        // M = I + A Aᵀ/(Jγ) + K/(Jτ).
        backend.gemm_f64(
            Trans::No,
            Trans::Yes,
            j,
            j,
            m,
            1.0 / (jf * gamma),
            a64,
            a64,
            0.0,
            &mut self.m64,
        )?;
        backend.add_scaled_f32_f64(&self.k32, 1.0 / (jf * tau), &mut self.m64)?;
        backend.add_diagonal_f64(&mut self.m64, j, 1.0)?;
        // N = D Aᵀ/(Jγ) − (K + 1vᵀ)/(Jτ).
        backend.gemm_f64(
            Trans::No,
            Trans::Yes,
            j,
            j,
            m,
            1.0 / (jf * gamma),
            d64,
            a64,
            0.0,
            &mut self.n64,
        )?;
        backend.add_scaled_f32_f64(&self.k32, -1.0 / (jf * tau), &mut self.n64)?;
        // The rank-one term 1 (E ū)ᵀ: formed exactly in f32 (each entry is one v_k times
        // 1) in the scratch S, then added like K.
        backend.gemm_f32(
            Trans::No,
            Trans::No,
            j,
            j,
            1,
            1.0,
            &self.ones32,
            &self.v32,
            0.0,
            &mut self.s32,
        )?;
        backend.add_scaled_f32_f64(&self.s32, -1.0 / (jf * tau), &mut self.n64)?;
        // N ← N M⁻¹ (M symmetric), then U += (N M⁻¹) E.
        backend.block_cholesky_solve_f64(&mut self.m64, 1, j, &mut self.n64, j)?;
        backend.f64_to_f32(&self.n64, &mut self.s32)?;
        backend.gemm_f32(
            Trans::No,
            Trans::No,
            j,
            p,
            j,
            1.0,
            &self.s32,
            &self.e32,
            1.0,
            u,
        )
    }
}
