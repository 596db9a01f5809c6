//! Device memory of a training run, estimated before anything large is allocated, so that
//! an ensemble too large for the GPU is refused with the largest J that fits instead of a
//! driver error in the middle of the run.
//!
//! What the trainer (`crate::train::Trainer`) keeps on the device, in elements
//! (J members, P weights, b images of a mini-batch, m = 10·b, N test images):
//! - the ensemble U: J·P f32;
//! - per mini-batch size b in use (the full batch and, once an epoch reaches it, the tail
//!   of N_train mod B images), an `EnkfWorkspace` plus the trainer's G, x and y:
//!   - A = ΠG and X (J·m f64 each), C and L (m² f64 each);
//!   - the apply phase, by [`ApplyOrder::cheapest`]: member order S in f64 and f32
//!     (J² each) and a copy of U (J·P f32); parameter order X and A in f32 (J·m each)
//!     and T (m·P f32);
//!   - G (J·m f32), the images (b·784 f32), the one-hot targets (m f32);
//! - the test set (N·784 f32) and its logits (N·10 f32), the mean weights (P f32), the
//!   mini-batch logits of the mean network (m f32), and for `--eval last` a 1 × J
//!   selector; `--eval ensemble` adds up to 16 Mi f32 of outputs per test chunk;
//! - a reserve for what is not ours to count: cuBLAS and cuSOLVER workspaces (cuSOLVER's
//!   potrf on m × m is a few MB, cuBLAS keeps up to 32 MiB per handle on Hopper), the
//!   loaded kernel modules, and the driver's 2 MiB allocation granularity.
//!
//! Under Algorithm 1 (`--adaptation adaptive`) J moves during the run, so the check is
//! made at the largest J it can reach, max(J, b_u), plus the peak of a resize: the new
//! ensemble is built while the old one is still alive (see [`resize_bytes`]). With
//! `--on-failure resample` the same second J × P copy is counted at every J, Algorithm 1
//! or not: `resample_members` copies the J − f successful rows and draws f fresh ones
//! beside U, and the first failed member must not run the device out of memory.

use crate::enkf::ApplyOrder;
use crate::model::{CLASSES, IMG_PIXELS};
use crate::train::{Accelerator, Adaptation, EvalMode, FailurePolicy, Observations, TrainConfig};
use crate::{Error, Result};

use super::{cuda_err, CudaBackend};

/// Fixed part of the reserve: library workspaces and module images (256 MiB).
const RESERVE_FIXED: u64 = 256 << 20;
/// Proportional part of the reserve: allocation rounding, 1/64 of the counted bytes.
const RESERVE_FRACTION: u64 = 64;
/// Floats of the largest ensemble-evaluation output chunk (as in `Trainer::evaluate`).
const ENSEMBLE_EVAL_CHUNK: u64 = 16 << 20;

/// The sizes that decide a training run's device memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainShape {
    /// Ensemble size J: the largest the run can reach (max(J, b_u) under Algorithm 1).
    pub members: usize,
    /// Weights per member P.
    pub params: usize,
    /// Images of each mini-batch size the run uses (one or two sizes, none zero).
    pub batches: Vec<usize>,
    /// Test images N.
    pub test_images: usize,
    /// Whether the evaluation scores the last member (a 1 × J selector).
    pub eval_last: bool,
    /// Whether the evaluation runs the whole ensemble over the test set.
    pub eval_ensemble: bool,
    /// Whether the run builds a second J × P ensemble beside U at some point: Algorithm
    /// 1's resizes, or `--on-failure resample` (see [`resize_bytes`]).
    pub second_ensemble: bool,
    /// Perturbed observations upload J × m f64 of noise at every update (a temporary
    /// beside the workspace).
    pub observations: Observations,
    /// Whether the update is the member-space Tikhonov one (its J × P anomalies and J × J
    /// systems replace the apply buffers; see [`tikhonov_workspace_bytes`]).
    pub tikhonov: bool,
    /// Whether Nesterov momentum keeps the previous J × P ensemble beside U.
    pub momentum: bool,
    /// Whether the update is the transform one (an m × J f64 buffer and vectors more per
    /// workspace, `TransformBuffers::bytes`).
    pub transform: bool,
    /// The network's sizes per image.
    pub net: NetShape,
    /// The run's `apply_order` ([`ApplyOrder::Auto`]: the cheaper per mini-batch size).
    pub apply_order: ApplyOrder,
}

/// What the memory of a run depends on in its network, per image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetShape {
    /// Input values (784 for MNIST).
    pub inputs: usize,
    /// Outputs (10 classes).
    pub outputs: usize,
    /// Scratch row length of a layer-spec network's forward pass
    /// ([`crate::gpu::spec_plan::SpecPlan::max_len`]; 0 for the fused paper networks,
    /// which keep their activations in shared memory).
    pub spec_len: usize,
}

impl Default for NetShape {
    /// The paper's networks on MNIST.
    fn default() -> Self {
        NetShape {
            inputs: IMG_PIXELS,
            outputs: CLASSES,
            spec_len: 0,
        }
    }
}

impl NetShape {
    /// The sizes of `net` on inputs of `inputs` values.
    pub fn of(net: &crate::model::Net) -> NetShape {
        match net.spec() {
            Some(spec) => NetShape {
                inputs: spec.input().len(),
                outputs: spec.outputs(),
                spec_len: crate::gpu::spec_plan::SpecPlan::of(spec).max_len,
            },
            None => NetShape::default(),
        }
    }

    /// Bytes of the two scratch buffers of a layer-spec forward pass over `members` ×
    /// `images` (what `SpecPlan::scratch_len` allocates; 0 for the fused networks).
    pub fn scratch_bytes(&self, members: usize, images: usize) -> u64 {
        8 * crate::gpu::spec_plan::scratch_len(self.spec_len, members, images) as u64
    }
}

impl TrainShape {
    /// The shape of a run of `cfg` on `n_train` training and `n_test` test images (after
    /// any limits). The tail mini-batch (n_train mod B images) is counted only when the
    /// run's iterations reach it. Under Algorithm 1 the members are the largest J the run
    /// can reach, max(J, b_u), and the tail is counted when r = 1 would reach it (r may
    /// shrink to 1, and a run capped by `iterations` then sees more mini-batches).
    pub fn of(cfg: &TrainConfig, n_train: usize, n_test: usize) -> TrainShape {
        let adaptive = cfg.adaptation == Adaptation::Adaptive;
        let full = cfg.batch.min(n_train).max(1);
        let mut batches = vec![full];
        let tail = n_train % cfg.batch;
        let n_batches = n_train.div_ceil(cfg.batch);
        let fewest_repetitions = if adaptive { 1 } else { cfg.repetitions };
        if n_train > cfg.batch
            && tail != 0
            && cfg.total_iterations(n_train) > (n_batches - 1) * fewest_repetitions
        {
            batches.push(tail);
        }
        let members = if adaptive {
            cfg.members.max(cfg.adapt_max_members)
        } else {
            cfg.members
        };
        TrainShape {
            members,
            params: cfg.net().n_params(),
            batches,
            test_images: n_test,
            eval_last: cfg.eval.contains(&EvalMode::Last),
            eval_ensemble: cfg.eval.contains(&EvalMode::Ensemble),
            second_ensemble: adaptive || cfg.on_failure == FailurePolicy::Resample,
            observations: cfg.observations,
            tikhonov: cfg.tikhonov > 0.0,
            momentum: cfg.accelerator == Accelerator::Nesterov,
            transform: cfg.update == crate::enkf::UpdateRule::Transform,
            net: NetShape::of(&cfg.net()),
            apply_order: cfg.apply_order,
        }
    }

    /// The same shape with another ensemble size.
    pub fn with_members(&self, members: usize) -> TrainShape {
        TrainShape {
            members,
            ..self.clone()
        }
    }
}

/// Estimated device memory of a run, in bytes, by what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryEstimate {
    /// The ensemble U (J × P f32).
    pub ensemble: u64,
    /// EnKF workspaces and the trainer's G, x, y, for every mini-batch size.
    pub workspaces: u64,
    /// Test set, logits, mean weights and evaluation temporaries.
    pub evaluation: u64,
    /// Library workspaces, modules and allocation rounding.
    pub reserve: u64,
}

impl MemoryEstimate {
    /// Sum of all parts, in bytes.
    pub fn total(&self) -> u64 {
        self.ensemble + self.workspaces + self.evaluation + self.reserve
    }
}

/// Bytes of one EnKF workspace plus the trainer's per-batch buffers, for `members` (J),
/// `params` (P) and a mini-batch of `batch` images (m = 10·batch) of the paper's networks.
pub fn workspace_bytes(members: usize, params: usize, batch: usize) -> u64 {
    workspace_bytes_of(
        members,
        params,
        batch,
        NetShape::default(),
        false,
        ApplyOrder::Auto,
    )
}

/// The largest J of the Tikhonov update on the CUDA backend: its J × J system goes to
/// cuSOLVER's 32-bit `potrf`/`potrs` (and a cuBLAS copy of its diagonal), whose offsets
/// reach J² − 1 ≤ 2³¹ − 1.
pub const TIKHONOV_MAX_MEMBERS: usize = 46_340;

/// As [`workspace_bytes`] for the member-space Tikhonov update, whose buffers
/// (`EnkfWorkspace::tikhonov_bytes`: E, J × J systems) replace the apply buffers.
pub fn tikhonov_workspace_bytes(members: usize, params: usize, batch: usize) -> u64 {
    workspace_bytes_of(
        members,
        params,
        batch,
        NetShape::default(),
        true,
        ApplyOrder::Auto,
    )
}

fn workspace_bytes_of(
    members: usize,
    params: usize,
    batch: usize,
    net: NetShape,
    tikhonov: bool,
    order: ApplyOrder,
) -> u64 {
    let (j, p, b) = (members as u64, params as u64, batch as u64);
    let m = b * net.outputs as u64;
    // A, X (J × m) and C, L (m × m), f64.
    let gain = 8 * (2 * j * m + 2 * m * m);
    let order = match order {
        ApplyOrder::Auto => ApplyOrder::cheapest(members, params, batch * net.outputs),
        o => o,
    };
    let apply = match order {
        _ if tikhonov => {
            crate::enkf::EnkfWorkspace::<crate::cpu::CpuBackend>::tikhonov_bytes(members, params)
        }
        // S in f64 and f32 (J × J), copy of U (J × P f32).
        ApplyOrder::Members => 8 * j * j + 4 * j * j + 4 * j * p,
        // X, A in f32 (J × m), T (m × P f32).
        _ => 4 * (2 * j * m + m * p),
    };
    // G (J × m), images (b × inputs), targets (m), f32.
    let trainer = 4 * (j * m + b * net.inputs as u64 + m);
    // The apply's centring: ones (J) and the mean (P), f32.
    let centre = crate::enkf::centring_bytes(members, params);
    gain + apply + trainer + centre
}

/// Estimated device memory of a training run of `shape` (see the module docs).
pub fn estimate(shape: &TrainShape) -> MemoryEstimate {
    let (j, p, n) = (
        shape.members as u64,
        shape.params as u64,
        shape.test_images as u64,
    );
    let (inputs, outputs) = (shape.net.inputs as u64, shape.net.outputs as u64);
    // U, and the momentum's previous ensemble.
    let ensemble = 4 * j * p * (1 + u64::from(shape.momentum));
    let workspaces: u64 = shape
        .batches
        .iter()
        .map(|&b| {
            let transform = if shape.transform {
                crate::enkf::transform::TransformBuffers::<crate::cpu::CpuBackend>::bytes(
                    shape.members,
                    b * shape.net.outputs,
                )
            } else {
                0
            };
            workspace_bytes_of(
                shape.members,
                shape.params,
                b,
                shape.net,
                shape.tikhonov,
                shape.apply_order,
            ) + transform
        })
        .sum();
    let largest_batch = shape.batches.iter().copied().max().unwrap_or(0);
    let noise = match shape.observations {
        Observations::Exact => 0,
        Observations::Perturbed => 8 * j * largest_batch as u64 * outputs,
    };
    // A layer-spec network's forward scratch, kept at the largest pass the run makes:
    // the ensemble on a mini-batch, the mean network on the test set, the ensemble on a
    // chunk of test images (`--eval ensemble`).
    let eval_chunk = (ENSEMBLE_EVAL_CHUNK as usize / (shape.members * shape.net.outputs).max(1))
        .clamp(1, shape.test_images.max(1));
    let mut scratch = shape
        .net
        .scratch_bytes(shape.members, largest_batch)
        .max(shape.net.scratch_bytes(1, shape.test_images));
    if shape.eval_ensemble {
        scratch = scratch.max(shape.net.scratch_bytes(shape.members, eval_chunk));
    }
    let workspaces = workspaces + noise + scratch;
    let mut evaluation = 4 * (n * inputs + n * outputs + p);
    evaluation += 4 * largest_batch as u64 * outputs;
    if shape.eval_last {
        evaluation += 4 * j;
    }
    if shape.eval_ensemble {
        // The chunk of outputs plus that chunk's images.
        evaluation += 4 * ENSEMBLE_EVAL_CHUNK.max(j * outputs) + 4 * n * inputs;
    }
    let counted = ensemble + workspaces + evaluation;
    MemoryEstimate {
        ensemble,
        workspaces,
        evaluation,
        reserve: RESERVE_FIXED + counted / RESERVE_FRACTION,
    }
}

/// Extra bytes while the ensemble of `shape` (J = `shape.members`, the largest size it
/// reaches) is rebuilt beside U: Algorithm 1's `resize::add_members` builds the new
/// J × P ensemble from the old (J − v) × P one and v fresh rows, all alive at once, and
/// `drop_members` the new (J − v) × P beside the old J × P; `resize::resample_members`
/// copies the J − f successful rows and draws f fresh ones. Each is at most one more
/// J × P f32 than the steady state counted by [`estimate`].
pub fn resize_bytes(shape: &TrainShape) -> u64 {
    4 * shape.members as u64 * shape.params as u64
}

/// Peak device bytes of a run of `shape`: [`estimate`], plus [`resize_bytes`] when the
/// run builds a second ensemble (`shape.second_ensemble`: Algorithm 1 or resampling).
pub fn peak_bytes(shape: &TrainShape) -> u64 {
    let second = if shape.second_ensemble {
        resize_bytes(shape)
    } else {
        0
    };
    estimate(shape).total() + second
}

/// The largest ensemble size J ≥ 2 whose [`peak_bytes`] fits in `free_bytes` (for
/// Algorithm 1: the largest J it may grow to), or None when not even J = 2 fits.
/// Bisection over J: the estimate grows with J except for a small drop where the apply
/// phase switches from member to parameter order (J ≈ 1200 for the paper's net), which
/// only matters on a device with less than ~0.5 GB free.
pub fn largest_members(shape: &TrainShape, free_bytes: u64) -> Option<usize> {
    let fits = |j: usize| peak_bytes(&shape.with_members(j)) <= free_bytes;
    if !fits(2) {
        return None;
    }
    let mut lo = 2usize; // fits
    let mut hi = 4usize;
    while fits(hi) {
        lo = hi;
        hi = hi.checked_mul(2)?;
    }
    // fits(lo), !fits(hi)
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(lo)
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// The error for a run of `shape` that needs more than `free` of `total` bytes, naming
/// each part and the largest J that fits.
pub fn too_large(shape: &TrainShape, free: u64, total: u64) -> Error {
    let e = estimate(shape);
    let advice = match largest_members(shape, free) {
        Some(j) => format!("the largest ensemble that fits is J = {j} (--members {j})"),
        None => "not even J = 2 fits; free GPU memory (other processes) first".to_string(),
    };
    let second = if shape.second_ensemble {
        format!(
            ", the second copy of U that resampling failed members builds {:.2} GiB",
            gib(resize_bytes(shape))
        )
    } else {
        String::new()
    };
    Error::Cuda(format!(
        "J = {} members need about {:.2} GiB of device memory (ensemble U {:.2} GiB{second}, \
         EnKF workspaces {:.2} GiB, test set and evaluation {:.2} GiB, library reserve {:.2} \
         GiB) but only {:.2} GiB of {:.2} GiB are free: {advice}",
        shape.members,
        gib(peak_bytes(shape)),
        gib(e.ensemble),
        gib(e.workspaces),
        gib(e.evaluation),
        gib(e.reserve),
        gib(free),
        gib(total)
    ))
}

/// The error for a run under Algorithm 1 whose largest ensemble, `shape.members` =
/// max(J, b_u) with J = `initial_members`, needs more than `free` of `total` bytes at the
/// peak of a resize; it names the parts and the largest upper bound b_u that fits.
pub fn adaptive_too_large(
    shape: &TrainShape,
    initial_members: usize,
    free: u64,
    total: u64,
) -> Error {
    let e = estimate(shape);
    let advice = match largest_members(shape, free) {
        Some(j) if initial_members > j => format!(
            "the largest ensemble Algorithm 1 may reach is J = {j} \
             (--adapt-max-members {j} and --members at most {j})"
        ),
        Some(j) => {
            format!("the largest upper bound that fits is b_u = {j} (--adapt-max-members {j})")
        }
        None => "not even J = 2 fits; free GPU memory (other processes) first".to_string(),
    };
    Error::Cuda(format!(
        "the adaptive schedule (Algorithm 1) may grow the ensemble to its upper bound \
         J = {} members (the larger of --members {initial_members} and --adapt-max-members), \
         which needs about {:.2} GiB of device memory at the peak of a resize (ensemble U \
         {:.2} GiB and the resize's second copy {:.2} GiB, EnKF workspaces {:.2} GiB, test set \
         and evaluation {:.2} GiB, library reserve {:.2} GiB) but only {:.2} GiB of {:.2} GiB \
         are free: {advice}",
        shape.members,
        gib(peak_bytes(shape)),
        gib(e.ensemble),
        gib(resize_bytes(shape)),
        gib(e.workspaces),
        gib(e.evaluation),
        gib(e.reserve),
        gib(free),
        gib(total)
    ))
}

/// Whether a run of `cfg` on `n_train` training and `n_test` test images fits in `free` of
/// `total` device bytes: the [`estimate`] of its J, or under Algorithm 1 the
/// [`peak_bytes`] of the largest J it can reach, max(J, b_u).
///
/// Errors: [`Error::Cuda`] from [`too_large`] (fixed J) or [`adaptive_too_large`]
/// (the adaptive upper bound does not fit).
pub fn train_fits(
    cfg: &TrainConfig,
    n_train: usize,
    n_test: usize,
    free: u64,
    total: u64,
) -> Result<()> {
    let shape = TrainShape::of(cfg, n_train, n_test);
    let adaptive = cfg.adaptation == Adaptation::Adaptive;
    if shape.tikhonov && shape.members > TIKHONOV_MAX_MEMBERS {
        return Err(Error::Config(format!(
            "tikhonov = {} on the CUDA backend supports J ≤ {TIKHONOV_MAX_MEMBERS} (its J × J \
             Cholesky uses cuSOLVER's 32-bit entry points, offsets up to J² − 1); this run \
             reaches J = {} (members{}); use fewer members or the CPU backend",
            cfg.tikhonov,
            shape.members,
            if adaptive {
                " or adapt_max_members"
            } else {
                ""
            }
        )));
    }
    if peak_bytes(&shape) <= free {
        Ok(())
    } else if adaptive {
        Err(adaptive_too_large(&shape, cfg.members, free, total))
    } else {
        Err(too_large(&shape, free, total))
    }
}

impl CudaBackend {
    /// Free and total device memory in bytes (`cuMemGetInfo`).
    ///
    /// Errors: [`Error::Cuda`] when the driver query fails.
    pub fn memory_info(&self) -> Result<(u64, u64)> {
        let (free, total) = self
            .ctx
            .mem_get_info()
            .map_err(cuda_err("querying free device memory"))?;
        Ok((free as u64, total as u64))
    }

    /// Checks that a training run of `shape` fits in the device's free memory.
    ///
    /// Errors: [`Error::Cuda`] with the estimate by part and the largest J that fits
    /// (see [`too_large`]); driver query failures.
    pub fn check_fits(&self, shape: &TrainShape) -> Result<()> {
        let (free, total) = self.memory_info()?;
        if peak_bytes(shape) <= free {
            Ok(())
        } else {
            Err(too_large(shape, free, total))
        }
    }

    /// Checks that a run of `cfg` on `n_train` training and `n_test` test images (after
    /// limits) fits in the device's free memory (see [`train_fits`]: under Algorithm 1 at
    /// the largest J it can reach, max(J, b_u)). Call before `Trainer::new`.
    ///
    /// Errors: as [`train_fits`]; driver query failures.
    pub fn check_train_fits(&self, cfg: &TrainConfig, n_train: usize, n_test: usize) -> Result<()> {
        let (free, total) = self.memory_info()?;
        train_fits(cfg, n_train, n_test, free, total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::PartialConfig;

    const P: usize = 18_050;

    fn shape(members: usize, batches: Vec<usize>) -> TrainShape {
        TrainShape {
            members,
            params: P,
            batches,
            test_images: 10_000,
            eval_last: false,
            eval_ensemble: false,
            second_ensemble: false,
            observations: Observations::Exact,
            tikhonov: false,
            momentum: false,
            transform: false,
            net: NetShape::default(),
            apply_order: ApplyOrder::Auto,
        }
    }

    /// A layer-spec network counts its inputs, outputs and the forward pass's two
    /// scratch buffers at the largest pass.
    #[test]
    fn layer_spec_networks_count_their_sizes_and_scratch() {
        let layers = crate::model::spec::parse_short(
            "conv2d(32,3,padding=1) relu maxpool2d(2) flatten linear(5)",
        )
        .unwrap();
        let input = crate::model::spec::Shape::Image { c: 3, h: 32, w: 32 };
        let spec = crate::model::spec::NetSpec::build(&layers, input, 5).unwrap();
        let net = NetShape::of(&crate::model::Net::from_spec(std::sync::Arc::new(spec)));
        assert_eq!((net.inputs, net.outputs), (3 * 32 * 32, 5));
        assert_eq!(
            net.spec_len,
            32 * 32 * 32,
            "the conv output before the pool"
        );
        let paper = crate::model::Net::new(
            crate::model::Arch::Paper,
            crate::model::Activation::Logistic,
        );
        assert_eq!(NetShape::of(&paper), NetShape::default());
        let plain = shape(100, vec![64]);
        let s = TrainShape {
            net,
            ..plain.clone()
        };
        let test_pass = crate::gpu::spec_plan::scratch_len(net.spec_len, 1, 10_000);
        let batch_pass = crate::gpu::spec_plan::scratch_len(net.spec_len, 100, 64);
        // Both passes fill a block up to the scratch target here.
        assert_eq!(test_pass, batch_pass);
        assert!(test_pass <= crate::gpu::spec_plan::SCRATCH_TARGET);
        let m = 64 * 5;
        let j = 100u64;
        // Workspaces: the same formula with m = 64·5 and 3·32·32 inputs, plus scratch.
        let gain = 8 * (2 * j * m + 2 * m * m);
        let apply = 8 * j * j + 4 * j * j + 4 * j * P as u64;
        let trainer = 4 * (j * m + 64 * 3 * 32 * 32 + m);
        let centre = 4 * (j + P as u64);
        assert_eq!(
            estimate(&s).workspaces,
            gain + apply + trainer + centre + 8 * test_pass as u64
        );
        assert_eq!(
            estimate(&s).evaluation,
            4 * (10_000 * 3 * 32 * 32 + 10_000 * 5 + P as u64 + 64 * 5)
        );
    }

    #[test]
    fn tikhonov_and_momentum_count_their_buffers() {
        let s = shape(2000, vec![64]);
        let (j, p) = (2000u64, P as u64);
        let tik = TrainShape {
            tikhonov: true,
            ..s.clone()
        };
        // E (J × P f32), ū, two J-vectors (ones, v) and K, S (J × J) in f32; M, N in f64.
        let tik_apply = 4 * (j * p + p + 2 * j + 2 * j * j) + 8 * (2 * j * j);
        let plain_apply = match ApplyOrder::cheapest(2000, P, 640) {
            ApplyOrder::Members => 12 * j * j + 4 * j * p,
            _ => 4 * (2 * j * 640 + 640 * p),
        };
        assert_eq!(
            estimate(&tik).workspaces,
            estimate(&s).workspaces - plain_apply + tik_apply
        );
        let mom = TrainShape {
            momentum: true,
            ..s.clone()
        };
        assert_eq!(estimate(&mom).ensemble, 2 * estimate(&s).ensemble);
        let tr = TrainShape {
            transform: true,
            ..s.clone()
        };
        // Ones (J), three m-vectors and Q Aᵀ (m × J), f64.
        assert_eq!(
            estimate(&tr).workspaces,
            estimate(&s).workspaces + 8 * (j + 3 * 640 + 640 * j)
        );
    }

    /// A forced `apply_order` is what the estimate counts: at J = 5000 (auto: the
    /// parameter order) `members` holds S in f64 and f32 (J × J) and a copy of U instead
    /// of X, A (J × m) and T (m × P), f32.
    #[test]
    fn a_forced_apply_order_counts_its_own_buffers() {
        let s = shape(5000, vec![64]);
        let (j, p, m) = (5000u64, P as u64, 640u64);
        let members = TrainShape {
            apply_order: ApplyOrder::Members,
            ..s.clone()
        };
        let params = TrainShape {
            apply_order: ApplyOrder::Params,
            ..s.clone()
        };
        assert_eq!(estimate(&params), estimate(&s));
        assert_eq!(
            estimate(&members).workspaces,
            estimate(&s).workspaces - 4 * (2 * j * m + m * p) + 12 * j * j + 4 * j * p
        );
    }

    #[test]
    fn workspace_counts_every_buffer_of_the_parameter_order() {
        // J = 5000 > m = 640 and flop count picks the parameter order.
        assert_eq!(ApplyOrder::cheapest(5000, P, 640), ApplyOrder::Params);
        let (j, p, m) = (5000u64, P as u64, 640u64);
        let want = 8 * (2 * j * m + 2 * m * m) // a64, x64, c64, l64
            + 4 * (2 * j * m + m * p)            // x32, a32, t32
            + 4 * (j * m + 64 * 784 + m) // g, x, y
            + 4 * (j + p); // the centring's ones and mean
        assert_eq!(workspace_bytes(5000, P, 64), want);
    }

    #[test]
    fn workspace_counts_every_buffer_of_the_member_order() {
        assert_eq!(ApplyOrder::cheapest(256, P, 640), ApplyOrder::Members);
        let (j, p, m) = (256u64, P as u64, 640u64);
        let want = 8 * (2 * j * m + 2 * m * m)
            + 12 * j * j
            + 4 * j * p
            + 4 * (j * m + 64 * 784 + m)
            + 4 * (j + p);
        assert_eq!(workspace_bytes(256, P, 64), want);
    }

    #[test]
    fn estimate_at_j_5000_is_the_ensemble_plus_small_parts() {
        let e = estimate(&shape(5000, vec![64, 32]));
        assert_eq!(e.ensemble, 4 * 5000 * P as u64); // 361 MB
        assert_eq!(
            e.workspaces,
            workspace_bytes(5000, P, 64) + workspace_bytes(5000, P, 32)
        );
        assert_eq!(e.evaluation, 4 * (10_000 * 794 + P as u64 + 640));
        assert_eq!(
            e.reserve,
            RESERVE_FIXED + (e.ensemble + e.workspaces + e.evaluation) / 64
        );
        // About 0.88 GB in all (U 361 MB, workspaces 212 MB, test set 32 MB, reserve
        // 278 MB): far below any data-centre GPU.
        assert!(e.total() > 850_000_000 && e.total() < 920_000_000, "{e:?}");
    }

    #[test]
    fn j_50000_fits_an_h200_and_the_largest_j_is_consistent() {
        let s = shape(50_000, vec![64, 32]);
        let e = estimate(&s);
        assert!(
            e.total() < 10 << 30,
            "J = 50000 should need < 10 GiB: {e:?}"
        );
        let free = 139u64 << 30;
        let j = largest_members(&s, free).expect("fits");
        assert!(estimate(&s.with_members(j)).total() <= free);
        assert!(estimate(&s.with_members(j + 1)).total() > free);
        // Dominated by U (4·P bytes per member) plus G and the f64 gain matrices.
        assert!(j > 1_000_000 && j < 2_100_000, "{j}");
    }

    #[test]
    fn too_large_names_the_largest_j_that_fits() {
        let s = shape(100_000, vec![64]);
        let free = 4u64 << 30;
        let Error::Cuda(msg) = too_large(&s, free, 8 << 30) else {
            panic!("not a CUDA error");
        };
        let j = largest_members(&s, free).expect("fits");
        assert!(msg.contains(&format!("J = {j} (--members {j})")), "{msg}");
        assert!(msg.contains("J = 100000 members"), "{msg}");
        assert!(largest_members(&s, 1 << 20).is_none());
    }

    fn adaptive_cfg(members: usize, upper: usize, iterations: Option<usize>) -> TrainConfig {
        let mut cfg = PartialConfig {
            members: Some(members),
            iterations,
            adaptation: Some(Adaptation::Adaptive),
            adapt_min_members: Some(2),
            adapt_max_members: Some(upper),
            ..Default::default()
        }
        .resolve()
        .expect("config");
        cfg.validate().expect("valid");
        cfg.repetitions = 8;
        cfg
    }

    #[test]
    fn adaptive_shape_is_sized_for_the_upper_bound() {
        let cfg = adaptive_cfg(1000, 10_000, Some(20));
        assert_eq!(TrainShape::of(&cfg, 60_000, 10_000).members, 10_000);
        // Started above b_u, the ensemble can only shrink: J itself is the largest.
        assert_eq!(
            TrainShape::of(&adaptive_cfg(12_000, 10_000, Some(20)), 60_000, 100).members,
            12_000
        );
        let mut fixed = cfg.clone();
        fixed.adaptation = Adaptation::Fixed;
        assert_eq!(TrainShape::of(&fixed, 60_000, 10_000).members, 1000);
        // 937·8 − 1 iterations with r = 8 stop before the 32-image tail; r may drop to 1
        // under Algorithm 1, and then 937 batches are done long before the cap.
        let cap = Some(937 * 8 - 1);
        fixed.iterations = cap;
        assert_eq!(TrainShape::of(&fixed, 60_000, 100).batches, [64]);
        assert_eq!(
            TrainShape::of(&adaptive_cfg(1000, 10_000, cap), 60_000, 100).batches,
            [64, 32]
        );
    }

    #[test]
    fn perturbed_observations_count_their_noise() {
        let s = shape(5000, vec![64]);
        let perturbed = TrainShape {
            observations: Observations::Perturbed,
            ..s.clone()
        };
        assert_eq!(
            estimate(&perturbed).workspaces,
            estimate(&s).workspaces + 8 * 5000 * 640
        );
    }

    #[test]
    fn adaptive_peak_counts_a_second_ensemble_during_a_resize() {
        let s = shape(10_000, vec![64]);
        let copying = TrainShape {
            second_ensemble: true,
            ..s.clone()
        };
        assert_eq!(peak_bytes(&s), estimate(&s).total());
        assert_eq!(
            peak_bytes(&copying),
            estimate(&s).total() + 4 * 10_000 * P as u64
        );
        let free = 4u64 << 30;
        let fixed = largest_members(&s, free).expect("fits");
        let grown = largest_members(&copying, free).expect("fits");
        assert!(peak_bytes(&copying.with_members(grown)) <= free);
        assert!(peak_bytes(&copying.with_members(grown + 1)) > free);
        // The resize copy is the size of U, the largest part: far fewer members fit.
        assert!(grown < fixed * 3 / 4, "{grown} vs {fixed}");
    }

    #[test]
    fn resampling_failed_members_counts_a_second_ensemble_at_fixed_j() {
        // A fixed-J run with --on-failure resample copies U when a member fails: the J
        // the check advises must leave room for that copy, or the first failure runs
        // the device out of memory mid-run.
        let base = PartialConfig {
            members: Some(10_000),
            iterations: Some(20),
            ..Default::default()
        };
        let error = base.clone().resolve().expect("config");
        let resample = PartialConfig {
            on_failure: Some(FailurePolicy::Resample),
            ..base
        }
        .resolve()
        .expect("config");
        let plain = TrainShape::of(&error, 60_000, 10_000);
        let copying = TrainShape::of(&resample, 60_000, 10_000);
        assert!(!plain.second_ensemble && copying.second_ensemble);
        assert_eq!(
            peak_bytes(&copying),
            peak_bytes(&plain) + 4 * 10_000 * P as u64
        );
        // Free memory between the two peaks: the erroring run fits, the resampling
        // one is refused, naming the copy and a J whose peak with the copy fits.
        let free = peak_bytes(&plain) + 2 * 10_000 * P as u64;
        train_fits(&error, 60_000, 10_000, free, 8 * free).expect("fits without the copy");
        let Err(Error::Cuda(msg)) = train_fits(&resample, 60_000, 10_000, free, 8 * free) else {
            panic!("the resampling run must not fit");
        };
        assert!(msg.contains("resampling"), "{msg}");
        let j = largest_members(&copying, free).expect("fits");
        assert!(msg.contains(&format!("--members {j}")), "{msg}");
        assert!(peak_bytes(&copying.with_members(j)) <= free);
        assert!(peak_bytes(&copying.with_members(j + 1)) > free);
    }

    #[test]
    fn adaptive_run_is_refused_when_its_upper_bound_does_not_fit() {
        // 4 GiB free: J = 1000 fits easily, b_u = 10^6 (72 GB of U alone) does not.
        let (free, total) = (4u64 << 30, 8u64 << 30);
        let cfg = adaptive_cfg(1000, 1_000_000, Some(20));
        let mut fixed = cfg.clone();
        fixed.adaptation = Adaptation::Fixed;
        train_fits(&fixed, 60_000, 10_000, free, total).expect("J = 1000 fits 4 GiB");
        let Err(Error::Cuda(msg)) = train_fits(&cfg, 60_000, 10_000, free, total) else {
            panic!("b_u = 10^6 must not fit 4 GiB");
        };
        let s = TrainShape::of(&cfg, 60_000, 10_000);
        let j = largest_members(&s, free).expect("fits");
        assert!(msg.contains("upper bound"), "{msg}");
        assert!(msg.contains("J = 1000000 members"), "{msg}");
        assert!(
            msg.contains(&format!("b_u = {j} (--adapt-max-members {j})")),
            "{msg}"
        );
        // A J that does not fit by itself is named too.
        let big = adaptive_cfg(1_000_000, 1_000_000, Some(20));
        let Err(Error::Cuda(msg)) = train_fits(&big, 60_000, 10_000, free, total) else {
            panic!("J = 10^6 must not fit 4 GiB");
        };
        assert!(msg.contains(&format!("--members at most {j}")), "{msg}");
        // The upper bound the message names does fit.
        let ok = adaptive_cfg(1000, j, Some(20));
        train_fits(&ok, 60_000, 10_000, free, total).expect("the advised b_u fits");
    }

    /// The Tikhonov update's J × J Cholesky is refused on the CUDA backend above
    /// J = 46,340 (cuSOLVER's 32-bit offsets reach J² − 1), by its own message before
    /// the memory estimate, and also when only Algorithm 1's upper bound is above it.
    #[test]
    fn tikhonov_is_refused_above_the_32_bit_cholesky_limit() {
        let tik = |members: usize, adapt: Option<usize>| {
            let mut cfg = match adapt {
                Some(upper) => adaptive_cfg(members, upper, Some(20)),
                None => {
                    let mut c = adaptive_cfg(members, members, Some(20));
                    c.adaptation = Adaptation::Fixed;
                    c
                }
            };
            (cfg.tikhonov, cfg.update) = (0.5, crate::enkf::UpdateRule::Batch);
            cfg
        };
        let huge = u64::MAX / 2;
        for cfg in [tik(46_341, None), tik(1000, Some(46_341))] {
            let Err(Error::Config(msg)) = train_fits(&cfg, 60_000, 10_000, huge, huge) else {
                panic!("J = 46,341 must be refused for tikhonov");
            };
            assert!(
                msg.contains("tikhonov = 0.5") && msg.contains("J ≤ 46340"),
                "{msg}"
            );
            assert!(msg.contains("J = 46341"), "{msg}");
        }
        train_fits(&tik(46_340, None), 60_000, 10_000, huge, huge).expect("J = 46,340");
        let mut plain = tik(46_341, None);
        plain.tikhonov = 0.0;
        train_fits(&plain, 60_000, 10_000, huge, huge).expect("no limit without tikhonov");
        assert!(TIKHONOV_MAX_MEMBERS * TIKHONOV_MAX_MEMBERS <= i32::MAX as usize);
        assert!((TIKHONOV_MAX_MEMBERS + 1).pow(2) > i32::MAX as usize);
    }

    #[test]
    fn shape_counts_the_tail_batch_only_when_reached() {
        let cfg = |iterations: Option<usize>| {
            PartialConfig {
                members: Some(10),
                iterations,
                ..Default::default()
            }
            .resolve()
            .expect("config")
        };
        // 60,000 images, B = 64: 938 batches, the last of 32 images, reached after 937·8.
        assert_eq!(TrainShape::of(&cfg(None), 60_000, 10_000).batches, [64, 32]);
        assert_eq!(TrainShape::of(&cfg(Some(20)), 60_000, 10_000).batches, [64]);
        assert_eq!(
            TrainShape::of(&cfg(Some(937 * 8 + 1)), 60_000, 100).batches,
            [64, 32]
        );
        assert_eq!(TrainShape::of(&cfg(None), 40, 10).batches, [40]);
        assert_eq!(TrainShape::of(&cfg(None), 640, 10).batches, [64]);
    }
}
