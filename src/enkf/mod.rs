//! The EnKF update rules, written once over [`crate::backend::Backend`].
//!
//! Shapes: J members, P weights, B images, m = 10·B observations.
//! U (J × P f32, row j = member j), G (J × B × 10 = J × m f32, column i = 10·d + k),
//! y (m one-hot f32). Covariances divide by J, Γ = γI. A = ΠG is G centred over members
//! and D = y1ᵀ − G the innovations (J × m each, f64). Because A is centred,
//! cov(U, G) = (ΠU)ᵀA/J = UᵀA/J: U itself never needs centring.
//!
//! The rules end in the same shape, `U ← U + X (AᵀU) / J` with X (J × m) computed from
//! G alone (the "gain" phase, all small f64 work; the batch and sequential rules hand
//! the apply phase X and A in whitened form, "Bounded factors" below):
//!
//! - [`UpdateRule::Batch`], one ensemble Kalman inversion step: C = AᵀA/J + γI (m × m),
//!   K = C⁻¹ Dᵀ (m × J), X = Kᵀ = D C⁻¹ (one dense Cholesky solve with J right-hand sides).
//! - [`UpdateRule::Sequential`], the authors' algorithm, in exact two-product form. The
//!   literal rule runs B Kalman steps with the outputs G computed once: for d = 1..B,
//!   with A_d, D_d the 10 columns of image d,
//!   C_d = A_dᵀA_d/J + γI (10 × 10), B_d = D_d C_d⁻¹ (J × 10, i.e. K_dᵀ), and
//!
//!   ```text
//!   W_d = A_dᵀ U_{d−1} / J          (10 × P)
//!   U_d = U_{d−1} + B_d W_d
//!   ```
//!
//!   Unrolling U_{d−1} = U₀ + Σ_{e<d} B_e W_e inside W_d gives
//!
//!   ```text
//!   W_d = A_dᵀU₀/J + Σ_{e<d} (A_dᵀB_e/J) W_e .
//!   ```
//!
//!   Stack Z = A = [A_1 … A_B], Bm = [B_1 … B_B] (J × m), W = [W_1; …; W_B] (m × P),
//!   and let L (m × m) be strictly block-lower-triangular (10 × 10 blocks) with
//!   L_de = A_dᵀB_e/J for e < d. The recursion is W = ZᵀU₀/J + L W, i.e.
//!   (I − L) W = ZᵀU₀/J, and U_B = U₀ + Σ_e B_e W_e = U₀ + Bm W, so
//!
//!   ```text
//!   U_B = U₀ + [Bm (I − L)⁻¹] (Zᵀ U₀) / J ,      X = Bm (I − L)⁻¹ .
//!   ```
//!
//!   The blocks C_d − γI are the diagonal blocks of AᵀA/J, and L is the strictly
//!   block-lower part of AᵀBm/J, so the gain phase is: C = AᵀA/J (m × m), C += γI,
//!   block-diagonal Cholesky solve turning D into Bm, Lfull = AᵀBm/J, T = I − L, and
//!   X = Bm T⁻¹ by a unit-lower solve from the right (J × m², cheap).
//!
//! - [`UpdateRule::Transform`], the square-root update (ETKI): the batch rule's mean with
//!   anomalies transformed by T^{1/2} instead of T; X from one m × m eigendecomposition
//!   (see [`transform`]).
//!
//! Tikhonov-regularised EKI ([`EnkfWorkspace::with_tikhonov`], batch rule) adds the
//! prior as P observations and is solved in member space, J × J (see `tikhonov.rs`): its
//! apply phase replaces the one below.
//!
//! The "apply" phase `U += X (AᵀU)/J` is two large products. Two associations are
//! exact in exact arithmetic ([`ApplyOrder`]): through parameter space,
//! T = AᵀU/J (m × P) then U += X T, 4·m·J·P flops; or through member space,
//! S = I + X Aᵀ/J (J × J, f64, then f32) and U ← S U, 2·J²·P flops (f32) + 2·J²·m (f64,
//! counted twice), written into a second J × P buffer that then becomes U (a GEMM cannot
//! write its own operand). The workspace picks
//! the cheaper by that count (member space wins up to J ≈ 1200 for m = 640,
//! P = 18,050), and member space whenever J ≤ m, where it is also the accurate one
//! (see [`ApplyOrder::cheapest`]).
//!
//! Bounded factors. Any X Aᵀ = (X M)(A M⁻ᵀ)ᵀ for an invertible m × m M, and the apply
//! phase rounds its factors to f32: on a badly scaled ensemble (large weights, C
//! spanning many decades) X = D C⁻¹ is of size |D|/γ along C's small eigenvalues and
//! the f32 rounding of AᵀE/J, which mixes every direction, is amplified by it (measured
//! on a real run: the mean step 2.5 % off and the network broken; README, "How the
//! update works"). So the gain hands the apply whitened factors: with the Cholesky
//! factor C = L Lᵀ (the batch rule; the sequential rule's blocks C_d = L_d L_dᵀ), Ã =
//! A L⁻ᵀ has ÃᵀÃ/J = I − γC⁻¹ (columns of norm ≤ √J) and X̃ = X L, for the batch rule
//! D̃ = D L⁻ᵀ, is bounded by |D|/√γ. The sequential recursion keeps its form in these
//! variables: L̃ = L_b⁻¹ L L_b is the strictly block-lower part of ÃᵀD̃/J and X̃ =
//! D̃ (I − L̃)⁻¹ (`rule_gain`). The flops are the unwhitened gain's (one triangular
//! solve on A replaces the second one on D; README "How the update works" has the time). The transform rule balances its
//! factors in the eigenbasis of C ([`transform::TransformBuffers::balanced_factors`]).
//!
//! Sharded over ranks (members split into contiguous blocks, [`dist`]): every product
//! over members above is a sum of per-rank products, so the ranks add up 1ᵀD (for the
//! global centring of A), AᵀA, AᵀBm and AᵀU, and each applies U_r += X_r T to its own
//! rows (parameter-space order; the member-space S = XAᵀ would need every rank's A).

pub mod dist;
pub mod dist_resize;
mod reference;
pub mod resize;
mod tikhonov;
pub mod transform;

pub use reference::{batch_reference, sequential_literal};

use crate::backend::{Backend, Trans};
use crate::model::CLASSES;
use crate::{Error, Result};
use rand_distr::{Distribution, StandardNormal};

/// Which EnKF update to apply per mini-batch.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum UpdateRule {
    /// The authors' rule: one Kalman step per image, with the outputs computed once
    /// (applied in exact closed form, see the module docs).
    #[default]
    Sequential,
    /// One ensemble Kalman inversion step with all 10·B outputs at once.
    Batch,
    /// The ensemble transform Kalman inversion (ETKI, a square-root update): the mean
    /// moves as in `Batch`, the anomalies by the symmetric square root of the J × J
    /// transform (see [`transform`]); deterministic, exact posterior covariance in the
    /// linear-Gaussian case.
    Transform,
}

/// Association of the final product `U += X (AᵀU) / J` (see the module docs): the
/// `apply_order` setting of a run (`--apply-order`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum ApplyOrder {
    /// Pick the cheaper of the two by counting flops for the workspace's (J, P, m).
    #[default]
    Auto,
    /// T = AᵀU/J (m × P), then U += X T.
    Params,
    /// S = I + X Aᵀ/J (J × J), then U ← S U (into a second J × P buffer that becomes U).
    Members,
}

impl ApplyOrder {
    /// The setting's name (`auto`, `params`, `members`), as `--apply-order` takes it.
    pub fn name(self) -> &'static str {
        match self {
            ApplyOrder::Auto => "auto",
            ApplyOrder::Params => "params",
            ApplyOrder::Members => "members",
        }
    }

    /// The order for J members, P weights and m observations (never `Auto`).
    ///
    /// `Members` whenever J ≤ m: then C + γI has m − J + 1 eigenvalues equal to γ, X is
    /// of size |D|/γ and cancels in X Aᵀ, which only the member order forms in f64
    /// (and for P ≥ m it is also no dearer). Otherwise the cheaper by flop count:
    /// `Params` 4·m·J·P; `Members` 2·J²·P + 2·2·J²·m (the J × J product is f64, counted
    /// twice).
    pub fn cheapest(members: usize, params: usize, obs: usize) -> ApplyOrder {
        if members <= obs {
            return ApplyOrder::Members;
        }
        let (j, p, m) = (members as f64, params as f64, obs as f64);
        let via_params = 4.0 * m * j * p;
        let via_members = 2.0 * j * j * p + 4.0 * j * j * m;
        if via_members < via_params {
            ApplyOrder::Members
        } else {
            ApplyOrder::Params
        }
    }
}

/// Buffers of the apply phase, for the chosen association.
enum ApplyBuffers<B: Backend> {
    /// X and A in f32 (J × m each) and T = AᵀU/J (m × P).
    Params {
        x32: B::F32,
        a32: B::F32,
        t32: B::F32,
    },
    /// S = I + X Aᵀ/J in f64 and f32 (J × J each) and the second J × P buffer.
    Members {
        s64: B::F64,
        s32: B::F32,
        u_copy: B::F32,
    },
    /// The member-space Tikhonov update (see [`tikhonov`]; the batch rule only).
    Tikhonov(Box<tikhonov::TikhonovBuffers<B>>),
}

/// Preallocated device buffers for one (J, P, B); reallocate when J changes.
///
/// Memory (elements): 2·J·m + 2·m² f64, plus 2·J·m + m·P f32 (parameter-space order)
/// or 2·J² mixed + J·P f32 (member-space order).
pub struct EnkfWorkspace<B: Backend> {
    members: usize,
    params: usize,
    batch: usize,
    /// Outputs per image (10 classes for the paper's networks); m = batch · outputs.
    outputs: usize,
    order: ApplyOrder,
    /// A = ΠG, J × m (whitened, Ã, by the batch and sequential gains).
    a64: B::F64,
    /// D = y1ᵀ − G, then D̃ (whitened), then X̃; J × m.
    x64: B::F64,
    /// C = AᵀA/J + γI, m × m (overwritten by the solve).
    c64: B::F64,
    /// L̃full = ÃᵀD̃/J, then I − L̃; m × m (sequential rule only).
    l64: B::F64,
    apply: ApplyBuffers<B>,
    /// Noise variance γ/Δt of the last gain (the Tikhonov apply reads it).
    gamma: f64,
    /// Step Δt of the last gain.
    dt: f64,
    /// The transform update's buffers (allocated on its first gain).
    transform: Option<transform::TransformBuffers<B>>,
    /// Whether the last gain was the transform one (its parameter-order apply then runs
    /// in the eigenbasis of C, [`transform::TransformBuffers::balanced_factors`]).
    balanced: bool,
    /// The apply phase's centring: ones (J) and the members' mean (P), f32.
    centre: Centring<B>,
}

/// Bytes of the apply phase's centring buffers for J members of P weights (the memory
/// check counts them).
pub fn centring_bytes(members: usize, params: usize) -> u64 {
    Centring::<crate::cpu::CpuBackend>::bytes(members, params)
}

/// The apply phase works on the anomalies E = U − 1ūᵀ, not on U: ΔU = X Aᵀ E / J (Aᵀ1 =
/// 0), but formed from U in f32 the product carries the rounding of Σ_j a_j u_j ≈
/// eps·J·|a|·|ū|, which swamps the true Σ_j a_j e_j once the members sit close to a
/// large mean (a trained ensemble), and X (large at small γ) turns it into a jump of
/// every member. So U is centred in place before the products (u − ū of nearby values is
/// exact) and the mean added back after them (one rounding, as any update of U).
/// `tests/enkf_rules.rs::a_large_mean_and_a_tiny_spread_update_in_either_order`.
pub(crate) struct Centring<B: Backend> {
    ones32: B::F32,
    mean32: B::F32,
}

impl<B: Backend> Centring<B> {
    /// Buffers for `rows` members of `params` weights.
    pub(crate) fn new(backend: &B, rows: usize, params: usize) -> Result<Self> {
        Ok(Centring {
            ones32: backend.upload_f32(&vec![1.0; rows])?,
            mean32: backend.zeros_f32(params)?,
        })
    }

    /// The mean buffer, for a caller that forms the mean itself (over every rank).
    pub(crate) fn mean_mut(&mut self) -> &mut B::F32 {
        &mut self.mean32
    }

    /// u ← u + sign · 1 cᵀ with c the mean buffer (u rows × params).
    pub(crate) fn shift(
        &self,
        backend: &B,
        u: &mut B::F32,
        (rows, params): (usize, usize),
        sign: f32,
    ) -> Result<()> {
        backend.gemm_f32(
            Trans::No,
            Trans::No,
            rows,
            params,
            1,
            sign,
            &self.ones32,
            &self.mean32,
            1.0,
            u,
        )
    }

    /// Bytes of these buffers.
    pub(crate) fn bytes(rows: usize, params: usize) -> u64 {
        4 * (rows + params) as u64
    }
}

/// The data misfits Φ_j = |d_j|² / (2γ) of innovation rows `x64` (rows × m), on the
/// host: the data-misfit controller's input (one process and each rank's rows).
pub(crate) fn misfits_of<B: Backend>(
    backend: &B,
    x64: &B::F64,
    rows: usize,
    m: usize,
    gamma: f64,
) -> Result<Vec<f64>> {
    let mut phi = backend.row_sq_norms_f64(x64, rows, m)?;
    phi.iter_mut().for_each(|v| *v /= 2.0 * gamma);
    Ok(phi)
}

/// The transform update is deterministic: perturbed observations with it are an error
/// (one process and ranks, checked before any work).
pub(crate) fn no_perturbed_transform(rule: UpdateRule, noise: Option<&[f64]>) -> Result<()> {
    if rule == UpdateRule::Transform && noise.is_some() {
        return Err(Error::Config(
            "the transform update is deterministic: it takes no perturbed observations \
             (use --observations exact)"
                .into(),
        ));
    }
    Ok(())
}

impl<B: Backend> EnkfWorkspace<B> {
    /// Workspace for `members` × `params` ensembles and mini-batches of `batch` images,
    /// with the cheaper [`ApplyOrder`].
    ///
    /// Errors: [`Error::Config`] when `members < 2` or `params` or `batch` is 0;
    /// allocation failures of the backend.
    pub fn new(backend: &B, members: usize, params: usize, batch: usize) -> Result<Self> {
        Self::with_order(backend, members, params, batch, ApplyOrder::Auto)
    }

    /// As [`EnkfWorkspace::new`] for networks of `outputs` values per image (the classes
    /// or regression targets of the data; the sequential rule's blocks are that size).
    /// Errors: as [`EnkfWorkspace::new`], and `outputs` = 0.
    pub fn with_outputs(
        backend: &B,
        members: usize,
        params: usize,
        batch: usize,
        outputs: usize,
    ) -> Result<Self> {
        Self::with_outputs_and_order(backend, members, params, batch, outputs, ApplyOrder::Auto)
    }

    /// As [`EnkfWorkspace::with_outputs`] with the association of the apply phase given
    /// (a run's `apply_order`; [`ApplyOrder::Auto`] picks by flop count).
    /// Errors: as [`EnkfWorkspace::with_outputs`].
    pub fn with_outputs_and_order(
        backend: &B,
        members: usize,
        params: usize,
        batch: usize,
        outputs: usize,
        order: ApplyOrder,
    ) -> Result<Self> {
        Self::build(backend, members, params, batch, outputs, order, None)
    }

    /// As [`EnkfWorkspace::new`] with a forced association of the apply phase (for tests
    /// and benchmarks; [`ApplyOrder::Auto`] picks by flop count).
    pub fn with_order(
        backend: &B,
        members: usize,
        params: usize,
        batch: usize,
        order: ApplyOrder,
    ) -> Result<Self> {
        Self::build(backend, members, params, batch, CLASSES, order, None)
    }

    /// As [`EnkfWorkspace::with_outputs`] for Tikhonov-regularised EKI with the prior
    /// N(0, `prior_variance` · I) as P extra observations, solved in member space (see
    /// [`tikhonov`]; [`UpdateRule::Batch`] only). Errors: as
    /// [`EnkfWorkspace::with_outputs`], and a `prior_variance` that is not positive and
    /// finite.
    pub fn with_tikhonov(
        backend: &B,
        members: usize,
        params: usize,
        batch: usize,
        outputs: usize,
        prior_variance: f64,
    ) -> Result<Self> {
        if !(prior_variance.is_finite() && prior_variance > 0.0) {
            return Err(Error::Config(format!(
                "the Tikhonov prior variance must be positive and finite, got {prior_variance}"
            )));
        }
        Self::build(
            backend,
            members,
            params,
            batch,
            outputs,
            ApplyOrder::Members,
            Some(prior_variance),
        )
    }

    fn build(
        backend: &B,
        members: usize,
        params: usize,
        batch: usize,
        outputs: usize,
        order: ApplyOrder,
        prior_variance: Option<f64>,
    ) -> Result<Self> {
        if members < 2 || params == 0 || batch == 0 || outputs == 0 {
            return Err(Error::Config(format!(
                "EnKF needs at least 2 members, 1 weight, 1 image per batch and 1 output; \
                 got {members} members, {params} weights, batch {batch}, {outputs} outputs"
            )));
        }
        let m = batch * outputs;
        let order = match order {
            ApplyOrder::Auto => ApplyOrder::cheapest(members, params, m),
            o => o,
        };
        let apply = match (prior_variance, order) {
            (Some(tau), _) => ApplyBuffers::Tikhonov(Box::new(tikhonov::TikhonovBuffers::new(
                backend, members, params, tau,
            )?)),
            (None, ApplyOrder::Members) => ApplyBuffers::Members {
                s64: backend.zeros_f64(members * members)?,
                s32: backend.zeros_f32(members * members)?,
                u_copy: backend.zeros_f32(members * params)?,
            },
            (None, _) => ApplyBuffers::Params {
                x32: backend.zeros_f32(members * m)?,
                a32: backend.zeros_f32(members * m)?,
                t32: backend.zeros_f32(m * params)?,
            },
        };
        Ok(EnkfWorkspace {
            members,
            params,
            batch,
            outputs,
            order,
            a64: backend.zeros_f64(members * m)?,
            x64: backend.zeros_f64(members * m)?,
            c64: backend.zeros_f64(m * m)?,
            l64: backend.zeros_f64(m * m)?,
            apply,
            gamma: 0.0,
            dt: 1.0,
            transform: None,
            balanced: false,
            centre: Centring::new(backend, members, params)?,
        })
    }

    /// Ensemble size J this workspace was built for.
    pub fn members(&self) -> usize {
        self.members
    }

    /// The association of the apply phase in use (never [`ApplyOrder::Auto`];
    /// [`ApplyOrder::Members`] for the Tikhonov update).
    pub fn order(&self) -> ApplyOrder {
        self.order
    }

    /// Device bytes of the Tikhonov update's buffers for J members and P weights
    /// (what [`EnkfWorkspace::with_tikhonov`] holds instead of the apply buffers).
    pub fn tikhonov_bytes(members: usize, params: usize) -> u64 {
        tikhonov::TikhonovBuffers::<B>::bytes(members, params)
    }

    /// One EnKF update of u (members × params) given outputs g (members × batch × 10)
    /// and one-hot y (batch·10): [`EnkfWorkspace::gain`] then [`EnkfWorkspace::apply`].
    ///
    /// Errors: [`Error::Shape`] on buffer lengths, [`Error::Config`] on a negative or
    /// non-finite `gamma`, [`crate::error::LinalgError::NotPositiveDefinite`] when a
    /// C + γI block cannot be factorised (u is then unchanged).
    pub fn update(
        &mut self,
        backend: &B,
        rule: UpdateRule,
        gamma: f64,
        u: &mut B::F32,
        g: &B::F32,
        y: &B::F32,
    ) -> Result<()> {
        self.gain(backend, rule, gamma, g, y)?;
        self.apply(backend, u)
    }

    /// The small f64 phase: computes A = ΠG and X (J × m each, see the module docs)
    /// from g (members × batch × 10) and y (batch · 10). Errors as
    /// [`EnkfWorkspace::update`].
    pub fn gain(
        &mut self,
        backend: &B,
        rule: UpdateRule,
        gamma: f64,
        g: &B::F32,
        y: &B::F32,
    ) -> Result<()> {
        self.gain_perturbed(backend, rule, gamma, g, y, None)
    }

    /// Members × m values per member for one update of this workspace.
    pub fn innovation_len(&self) -> usize {
        self.members * self.batch * self.outputs
    }

    /// As [`EnkfWorkspace::gain`], with perturbed observations when `noise` is given
    /// (the stochastic EnKF): member j's targets are y + η_j, `noise` holding the η_j row
    /// by row (J × m, drawn N(0, γ) by the caller), added to the innovations D before
    /// the solves. Errors: as [`EnkfWorkspace::update`], [`Error::Shape`] for a `noise`
    /// of another length than [`EnkfWorkspace::innovation_len`].
    pub fn gain_perturbed(
        &mut self,
        backend: &B,
        rule: UpdateRule,
        gamma: f64,
        g: &B::F32,
        y: &B::F32,
        noise: Option<&[f64]>,
    ) -> Result<()> {
        self.innovate(backend, g, y)?;
        self.solve(backend, rule, gamma, 1.0, noise)
    }

    /// First half of [`EnkfWorkspace::gain`]: A = ΠG and the innovations D = y1ᵀ − G
    /// from g (members × batch × outputs) and y (batch · outputs). Errors:
    /// [`Error::Shape`] on buffer lengths.
    pub fn innovate(&mut self, backend: &B, g: &B::F32, y: &B::F32) -> Result<()> {
        let (j, m) = (self.members, self.batch * self.outputs);
        crate::backend::check_len("EnKF outputs g", backend.len_f32(g), j * m)?;
        crate::backend::check_len("EnKF targets y", backend.len_f32(y), m)?;
        backend.center_and_innovate(g, y, j, m, &mut self.a64, &mut self.x64)
    }

    /// The data misfits Φ_j = |y − g_j|² / (2γ) of the innovations of the last
    /// [`EnkfWorkspace::innovate`] (the data-misfit controller's input), on the host.
    pub fn misfits(&self, backend: &B, gamma: f64) -> Result<Vec<f64>> {
        misfits_of(
            backend,
            &self.x64,
            self.members,
            self.batch * self.outputs,
            gamma,
        )
    }

    /// Second half of [`EnkfWorkspace::gain`], after [`EnkfWorkspace::innovate`]: the
    /// step Δt = `dt` scales the noise to Γ/Δt (and a Tikhonov prior to τ/Δt); `noise`
    /// as in [`EnkfWorkspace::gain_perturbed`] (drawn with variance γ/Δt by the caller).
    /// Errors: as [`EnkfWorkspace::gain_perturbed`]; [`Error::Config`] for a `dt` that
    /// is not positive and finite, or the sequential rule on a Tikhonov workspace.
    pub fn solve(
        &mut self,
        backend: &B,
        rule: UpdateRule,
        gamma: f64,
        dt: f64,
        noise: Option<&[f64]>,
    ) -> Result<()> {
        let (j, m) = (self.members, self.batch * self.outputs);
        if !(gamma.is_finite() && gamma >= 0.0) {
            return Err(Error::Config(format!(
                "gamma must be finite and non-negative, got {gamma}"
            )));
        }
        if !(dt.is_finite() && dt > 0.0) {
            return Err(Error::Config(format!(
                "the step dt must be positive and finite, got {dt}"
            )));
        }
        no_perturbed_transform(rule, noise)?;
        self.balanced = false;
        let gamma = gamma / dt;
        let inv_j = 1.0 / j as f64;
        if let Some(eta) = noise {
            crate::backend::check_len("EnKF observation perturbations", eta.len(), j * m)?;
            backend.add_host_f64(eta, &mut self.x64)?;
        }
        if let ApplyBuffers::Tikhonov(_) = self.apply {
            if rule != UpdateRule::Batch {
                return Err(Error::Config(
                    "the Tikhonov update is built for update = batch only (the sequential \
                     rule has no prior block); use --update batch"
                        .into(),
                ));
            }
            if gamma <= 0.0 {
                return Err(Error::Config(format!(
                    "the Tikhonov update needs a positive gamma, got {gamma}"
                )));
            }
            (self.gamma, self.dt) = (gamma, dt);
            return Ok(());
        }
        let bufs = GainBufs {
            a64: &mut self.a64,
            x64: &mut self.x64,
            c64: &mut self.c64,
            l64: &mut self.l64,
        };
        let dims = (j, self.batch, self.outputs);
        rule_gain(backend, rule, bufs, dims, inv_j, gamma, &mut |_| Ok(()))?;
        if rule == UpdateRule::Transform {
            if self.transform.is_none() {
                self.transform = Some(transform::TransformBuffers::new(backend, j, m)?);
            }
            if let Some(t) = &mut self.transform {
                t.gain(
                    backend,
                    &self.a64,
                    &mut self.x64,
                    &mut self.c64,
                    (j, m),
                    gamma,
                    None,
                )?;
                self.balanced = true;
            }
        }
        Ok(())
    }

    /// The large phase: `u += X (Aᵀu) / J` with X and A from the last
    /// [`EnkfWorkspace::gain`] (a no-op before the first). `u`: members × params.
    ///
    /// Errors: [`Error::Shape`] when u has the wrong length.
    pub fn apply(&mut self, backend: &B, u: &mut B::F32) -> Result<()> {
        let (j, p, m) = (self.members, self.params, self.batch * self.outputs);
        crate::backend::check_len("EnKF ensemble u", backend.len_f32(u), j * p)?;
        let inv_j = 1.0 / j as f64;
        match &mut self.apply {
            ApplyBuffers::Params { x32, a32, t32 } => {
                // The transform rule's factors in the eigenbasis of C after its gain,
                // the other rules' X and A as they are ([`transform::apply_factors`]).
                let balanced = if self.balanced {
                    self.transform.as_mut()
                } else {
                    None
                };
                let (ta, tx) = transform::apply_factors(
                    backend,
                    balanced,
                    &self.a64,
                    &self.x64,
                    &self.c64,
                    (j, m),
                    a32,
                    x32,
                )?;
                // E = U − 1ūᵀ in place ([`Centring`]), T = AᵀE/J (m × P), E += X T, then
                // U = E + 1ūᵀ.
                backend.row_mean(u, j, p, self.centre.mean_mut())?;
                self.centre.shift(backend, u, (j, p), -1.0)?;
                backend.gemm_f32(ta, Trans::No, m, p, j, inv_j as f32, a32, u, 0.0, t32)?;
                backend.gemm_f32(tx, Trans::No, j, p, m, 1.0, x32, t32, 1.0, u)?;
                self.centre.shift(backend, u, (j, p), 1.0)?;
            }
            // No gain yet (γ is set by the first): nothing to apply.
            ApplyBuffers::Tikhonov(_) if self.gamma == 0.0 => {}
            ApplyBuffers::Tikhonov(t) => {
                let tau = t.prior_variance / self.dt;
                t.apply(backend, &self.a64, &self.x64, u, (j, p, m), self.gamma, tau)?;
            }
            ApplyBuffers::Members { s64, s32, u_copy } => {
                // S = I + X Aᵀ/J (J × J, f64, rounded once to f32), then the new U = S U
                // into the second buffer, which becomes U (a GEMM cannot write its own
                // operand; swapping saves copying U first).
                backend.gemm_f64(
                    Trans::No,
                    Trans::Yes,
                    j,
                    j,
                    m,
                    inv_j,
                    &self.x64,
                    &self.a64,
                    0.0,
                    s64,
                )?;
                backend.add_diagonal_f64(s64, j, 1.0)?;
                backend.f64_to_f32(s64, s32)?;
                // S 1 = 1: the new U = S E + 1ūᵀ, E = U − 1ūᵀ ([`Centring`]).
                backend.row_mean(u, j, p, self.centre.mean_mut())?;
                self.centre.shift(backend, u, (j, p), -1.0)?;
                backend.gemm_f32(Trans::No, Trans::No, j, p, j, 1.0, s32, u, 0.0, u_copy)?;
                std::mem::swap(u, u_copy);
                self.centre.shift(backend, u, (j, p), 1.0)?;
            }
        }
        Ok(())
    }
}

/// One-hot targets: `labels` (batch) → y (batch · `classes`), y[b·classes + labels[b]] = 1.
///
/// # Panics
/// If a label is not below `classes` (the data reader validates labels).
pub fn one_hot(labels: &[u8], classes: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; labels.len() * classes];
    for (b, &l) in labels.iter().enumerate() {
        let l = l as usize;
        assert!(l < classes, "label {l} of image {b} is not below {classes}");
        y[b * classes + l] = 1.0;
    }
    y
}

/// Initial ensemble: members × params, i.i.d. N(0, sigma²) drawn in row-major order from
/// rng (f64 standard normals scaled by `sigma`, then rounded to f32).
pub fn init_ensemble<R: rand::Rng>(
    rng: &mut R,
    members: usize,
    params: usize,
    sigma: f64,
) -> Vec<f32> {
    (0..members * params)
        .map(|_| {
            let z: f64 = StandardNormal.sample(rng);
            (sigma * z) as f32
        })
        .collect()
}

/// The buffers of [`rule_gain`]: A (rows × m, centred outputs; whitened in place by the
/// batch and sequential rules), X (rows × m: the innovations in, the gain rows out), C
/// and L (m × m scratch).
pub(crate) struct GainBufs<'a, B: Backend> {
    pub a64: &'a mut B::F64,
    pub x64: &'a mut B::F64,
    pub c64: &'a mut B::F64,
    pub l64: &'a mut B::F64,
}

/// The m × m part of the update shared by the one-process workspace and the sharded one:
/// C = AᵀA/J, then `sum` (the sharded update adds the other ranks' parts there; a no-op
/// on one process), + γI; then, by rule, in whitened form (module docs, "Bounded
/// factors"): with the (block) Cholesky factor C = L Lᵀ (batch, one block) or C_d =
/// L_d L_dᵀ (sequential, blocks of `outputs`), A ← Ã = A L⁻ᵀ and D ← D̃ = D L⁻ᵀ; the batch
/// rule's X̃ is D̃, the sequential rule's X̃ = D̃ (I − L̃)⁻¹ with L̃ the strictly
/// block-lower part of ÃᵀD̃/J, summed by `sum` too. Then X̃ Ãᵀ = X Aᵀ. For the transform
/// rule only C is formed and A stays as it is (its caller goes on from both).
/// `dims`: (rows of A and X on this process, batch, outputs); m = batch · outputs;
/// `inv_j` = 1 / the global ensemble size.
pub(crate) fn rule_gain<B: Backend>(
    backend: &B,
    rule: UpdateRule,
    bufs: GainBufs<'_, B>,
    dims: (usize, usize, usize),
    inv_j: f64,
    gamma: f64,
    sum: &mut dyn FnMut(&mut B::F64) -> Result<()>,
) -> Result<()> {
    let GainBufs { a64, x64, c64, l64 } = bufs;
    let (rows, batch, outputs) = dims;
    let m = batch * outputs;
    // C = AᵀA/J + γI (m × m). The sequential rule reads only its 10 × 10 diagonal
    // blocks; the full product costs 2·m²·J, small against the apply phase.
    backend.gemm_f64(Trans::Yes, Trans::No, m, m, rows, inv_j, a64, a64, 0.0, c64)?;
    sum(c64)?;
    backend.add_diagonal_f64(c64, m, gamma)?;
    match rule {
        UpdateRule::Transform => {}
        UpdateRule::Batch => {
            // X̃ = D̃ = D L⁻ᵀ, Ã = A L⁻ᵀ: X̃ Ãᵀ = D C⁻¹ Aᵀ.
            backend.block_cholesky_whiten_f64(c64, 1, m, x64, a64, rows)?;
        }
        UpdateRule::Sequential => {
            // D̃ = [D_d L_d⁻ᵀ]_d, Ã = [A_d L_d⁻ᵀ]_d.
            backend.block_cholesky_whiten_f64(c64, batch, outputs, x64, a64, rows)?;
            // L̃full = ÃᵀD̃/J, then T̃ = I − (strictly block-lower part).
            backend.gemm_f64(Trans::Yes, Trans::No, m, m, rows, inv_j, a64, x64, 0.0, l64)?;
            sum(l64)?;
            backend.unit_block_lower_f64(l64, m, outputs)?;
            // X̃ = D̃ T̃⁻¹.
            backend.solve_unit_lower_right_f64(l64, m, x64, rows)?;
        }
    }
    Ok(())
}
