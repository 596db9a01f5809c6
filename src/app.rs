//! What the `train` and `bench` commands do, with typed errors (`main.rs` only adds
//! context). Backend selection lives here: [`dispatch`] runs a generic job on the CPU or
//! CUDA backend.

use crate::backend::{Backend, BackendKind, MathMode};
use crate::cpu::CpuBackend;
use crate::data::DataSplit;
use crate::run_dir::{check_output_file, Existing, RunDir};
use crate::train::gradient::{GradConfig, GradientTrainer};
use crate::train::optim::Optimizer;
use crate::train::stats::{StatsSink, StatsWriter};
use crate::train::{MetricsRow, Observer, TrainConfig, Trainer};
use crate::{Error, Result};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

mod bench;
pub use bench::{bench_command, bench_table, layer_table, median, BenchRow, BenchSpec, LayerTime};

/// A job generic over the backend.
pub trait BackendJob {
    /// What the job returns.
    type Output;
    /// Runs the job on `backend`; `desc` says which backend was chosen and why.
    fn run<B: Backend>(self, backend: &B, desc: &str) -> Result<Self::Output>;
    /// Checks, before any work, that the job fits on the GPU (device memory).
    fn check_cuda(&self, _backend: &crate::gpu::CudaBackend) -> Result<()> {
        Ok(())
    }
}

/// The backend `kind` resolves to on this machine, with a line saying why.
pub fn resolve_backend(kind: BackendKind) -> Result<(BackendKind, String)> {
    match kind {
        BackendKind::Cpu => Ok((BackendKind::Cpu, "cpu (requested)".into())),
        BackendKind::Cuda => match crate::gpu::CudaBackend::probe() {
            Ok(desc) => Ok((BackendKind::Cuda, desc)),
            Err(why) => Err(Error::Cuda(format!(
                "--backend cuda was requested but no GPU is usable: {}",
                why.trim_start_matches("CUDA backend: ")
            ))),
        },
        BackendKind::Auto => match crate::gpu::CudaBackend::probe() {
            Ok(desc) => Ok((BackendKind::Cuda, desc)),
            Err(why) => Ok((
                BackendKind::Cpu,
                format!(
                    "cpu (no usable GPU: {})",
                    why.trim_start_matches("CUDA backend: ")
                ),
            )),
        },
    }
}

/// Runs `job` on the backend `kind` resolves to. Returns the job's output and a
/// description of the backend used.
pub fn dispatch<J: BackendJob>(
    kind: BackendKind,
    math: MathMode,
    job: J,
) -> Result<(J::Output, String)> {
    run_opened(open_backend(kind, math)?, math, job)
}

/// Runs `job` on an opened backend (after its GPU memory check); returns its output and
/// the backend's description.
pub fn run_opened<J: BackendJob>(
    opened: Opened,
    math: MathMode,
    job: J,
) -> Result<(J::Output, String)> {
    match opened {
        Opened::Cuda(backend, desc) => {
            job.check_cuda(&backend)?;
            Ok((job.run(&*backend, &desc)?, desc))
        }
        Opened::Cpu(desc) => {
            // Which GEMM the CPU products use (`--blas`) belongs to the description.
            let desc = format!("{desc}, GEMM: {}", crate::cpu::blas::describe());
            Ok((job.run(&CpuBackend { math }, &desc)?, desc))
        }
    }
}

/// A backend opened for a run, with the line saying which and why.
pub enum Opened {
    /// The CPU backend (requested, or `auto` without a usable GPU).
    Cpu(String),
    /// The CUDA backend (device 0; on a sharded run the rank's device).
    Cuda(Box<crate::gpu::CudaBackend>, String),
}

/// Opens the backend `kind` resolves to on this machine, with math mode `math`: the GPU
/// is opened once ([`crate::gpu::CudaBackend::open`]), not probed and then opened again.
///
/// Errors: [`Error::Cuda`] when `--backend cuda` was asked for and no GPU is usable.
pub fn open_backend(kind: BackendKind, math: MathMode) -> Result<Opened> {
    let gpu = match kind {
        BackendKind::Cpu => return Ok(Opened::Cpu("cpu (requested)".into())),
        _ => crate::gpu::CudaBackend::open(math),
    };
    match (gpu, kind) {
        (Ok((be, desc)), _) => Ok(Opened::Cuda(Box::new(be), desc)),
        (Err(why), BackendKind::Cuda) => Err(Error::Cuda(format!(
            "--backend cuda was requested but no GPU is usable: {}",
            why.trim_start_matches("CUDA backend: ")
        ))),
        (Err(why), _) => Ok(Opened::Cpu(format!(
            "cpu (no usable GPU: {})",
            why.trim_start_matches("CUDA backend: ")
        ))),
    }
}

/// The backend of one rank of a sharded run: one GPU per rank
/// ([`crate::dist::rank_device`] of its node-local rank), every rank on a GPU or, with
/// `auto`, every rank on the CPU as soon as one has no usable GPU (the ranks agree in
/// one sum). The sums of the update travel device to device through NCCL where every
/// rank can use it ([`crate::gpu::CudaBackend::attach_nccl`]), else through the host
/// (download, MPI allreduce, upload), which any MPI does.
///
/// Errors: [`Error::Cuda`] with `--backend cuda` when this rank or another has no usable
/// GPU (every rank errs, none waits); the transport's.
pub fn open_rank_backend(
    kind: BackendKind,
    math: MathMode,
    comm: &dyn crate::dist::Comm,
) -> Result<Opened> {
    if kind == BackendKind::Cpu {
        return Ok(Opened::Cpu("cpu (requested)".into()));
    }
    let (rank, ranks) = (comm.rank(), comm.size());
    let local = crate::dist::local_rank();
    let gpu = crate::gpu::CudaBackend::device_count().and_then(|n| {
        let d = crate::dist::rank_device(local, rank, n);
        crate::gpu::CudaBackend::open_device(d, math).map(|(be, desc)| {
            let local = local.map_or("not given".to_string(), |l| l.to_string());
            let desc =
                format!("{desc}; rank {rank} of {ranks} (local rank {local}) on device {d} of {n}");
            (be, desc)
        })
    });
    let any_failed = crate::train::ranks::any_rank(comm, gpu.is_err())?;
    match (gpu, kind, any_failed) {
        (Ok((be, desc)), _, false) => {
            // Every rank is on a GPU: the sums go through NCCL where all can use it.
            let sums = be.attach_nccl(comm)?;
            Ok(Opened::Cuda(
                Box::new(be),
                format!("{desc}; sums through {sums}"),
            ))
        }
        (Err(why), BackendKind::Cuda, _) => Err(Error::Cuda(format!(
            "--backend cuda was requested but rank {rank} of {ranks} has no usable GPU: {}",
            why.trim_start_matches("CUDA backend: ")
        ))),
        (Ok(_), BackendKind::Cuda, true) => Err(Error::Cuda(format!(
            "--backend cuda was requested but another rank than {rank} (of {ranks}) has no \
             usable GPU (see its error)"
        ))),
        (Err(why), _, _) => Ok(Opened::Cpu(format!(
            "cpu (no usable GPU on rank {rank} of {ranks}: {}; every rank uses the CPU)",
            why.trim_start_matches("CUDA backend: ")
        ))),
        (Ok(_), _, true) => Ok(Opened::Cpu(format!(
            "cpu (another rank than {rank} of {ranks} has no usable GPU; every rank uses the CPU)"
        ))),
    }
}

/// Sets the size of the global rayon pool once (later calls are ignored).
pub fn set_threads(threads: Option<usize>) {
    if let Some(n) = threads {
        // An error means the pool already exists (tests, a second call): keep it.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
}

/// Loads the data set of a configuration, applying the train/test limits.
/// Only the first `--train-limit` / `--test-limit` images are read and decompressed
/// ([`crate::data::load_dir_limited`]): memory and time follow the limits, not the
/// files' headers.
/// A NumPy data set (`--data-npy`) is read whole and then cut to the limits.
pub fn load_data(cfg: &TrainConfig) -> Result<DataSplit> {
    if let Some(paths) = &cfg.data_npy {
        return crate::data::npy::load(paths, cfg.train_limit, cfg.test_limit);
    }
    Ok(crate::data::load_dir_limited(
        &cfg.data,
        cfg.train_limit,
        cfg.test_limit,
    )?)
}

/// What a finished training run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Every metrics row.
    pub rows: Vec<MetricsRow>,
    /// The backend used, in words.
    pub backend: String,
    /// Seconds per phase.
    pub times: crate::train::PhaseTimes,
    /// Iterations run.
    pub iterations: usize,
    /// Classes or real targets: how the test columns read.
    pub task: crate::data::Task,
    /// This process's rank in a run sharded over ranks (0 otherwise); rank 0 reports.
    pub rank: usize,
}

struct TrainJob<'a> {
    cfg: &'a TrainConfig,
    data: &'a DataSplit,
    resume: Option<&'a Path>,
    /// The ranks the ensemble is sharded over (one: not sharded).
    comm: &'a dyn crate::dist::Comm,
}

impl BackendJob for TrainJob<'_> {
    type Output = (Vec<MetricsRow>, crate::train::PhaseTimes);
    fn check_cuda(&self, be: &crate::gpu::CudaBackend) -> Result<()> {
        // A rank of a sharded run holds its shard of the members.
        let shard = crate::dist::Shard::of(self.cfg.members, self.comm.rank(), self.comm.size())?;
        let mut local = self.cfg.clone();
        local.members = shard.count;
        be.check_train_fits(&local, self.data.train.len(), self.data.test.len())
    }
    fn run<B: Backend>(self, backend: &B, desc: &str) -> Result<Self::Output> {
        let cfg = self.cfg;
        let comm = self.comm;
        let mut trainer = match (self.resume, comm.size() > 1) {
            (Some(path), false) => Trainer::resume(backend, cfg, self.data, path)?,
            (None, false) => Trainer::new(backend, cfg, self.data)?,
            (Some(path), true) => Trainer::resume_on_ranks(backend, cfg, self.data, path, comm)?,
            (None, true) => Trainer::new_on_ranks(backend, cfg, self.data, comm)?,
        };
        if comm.rank() != 0 {
            // The other ranks of a sharded run compute and checkpoint their shards; rank
            // 0 writes every output.
            let rows = trainer.run(&mut ())?;
            if cfg.out.is_some() {
                // Rank 0 computes the mean for mean.npy only when it writes outputs; the
                // others join that one collective then, and only then.
                trainer.mean_host()?;
            }
            if let Some(path) = &cfg.save_ensemble {
                // Every rank writes its rows of the one file (a collective).
                trainer.save_ensemble(path)?;
            }
            return Ok((rows, trainer.times.clone()));
        }
        let start = RunStart {
            total: trainer.total_iterations(),
            iteration: trainer.iteration(),
            members: trainer.members(),
            rows: trainer.rows(),
            adaptive_log: trainer.adaptive_log(),
        };
        let desc = match comm.size() {
            1 => desc.to_string(),
            n => format!("{desc}, sharded over {n} ranks"),
        };
        let mut out = RunOutput::create(cfg, start, self.data, &backend.name(), &desc)?;
        if let Some(dir) = &cfg.out {
            let writer = match self.resume {
                Some(_) => StatsWriter::append(dir, cfg.hist_every)?,
                None => StatsWriter::create(dir, cfg.hist_every)?,
            };
            trainer.set_stats(StatsSink::spawn(writer, cfg.net()));
        }
        let result = trainer.run(&mut out);
        out.finish(result.is_ok());
        let stats = trainer.take_stats().map(StatsSink::finish);
        let rows = result?;
        stats.transpose()?;
        if let Some(dir) = &cfg.out {
            let mean = trainer.mean_host()?;
            let p = cfg.net().n_params();
            crate::io::npy::write_f32(&dir.join("mean.npy"), &[p], &mean)?;
            crate::io::safetensors::write_net(&dir.join("model.safetensors"), &cfg.net(), &mean)?;
        }
        if let Some(path) = &cfg.save_ensemble {
            trainer.save_ensemble(path)?;
        }
        Ok((rows, trainer.times.clone()))
    }
}

/// Runs `enkf-dnn train` with a resolved configuration; with `resume`, continues from
/// that checkpoint file. `existing` says what to do with a run already in `cfg.out`
/// ([`Existing::Resume`] is required with `resume`).
///
/// Before any data is loaded: the output folder is locked for the life of the run and
/// checked (an earlier run in it refused unless `existing` says otherwise, files
/// writable), `--save-ensemble`'s path is checked, and the ensemble's memory is compared
/// with what the machine (CPU) or the device (GPU) has. SIGINT, SIGTERM and SIGUSR1
/// write a checkpoint (when `out` is set) and return [`Error::Interrupted`] with the
/// command that resumes.
///
/// Errors: [`Error::Config`] for a contradiction between `resume` and `existing`, an
/// output folder in use or holding a run, too little memory; whatever loading, training
/// and writing return.
pub fn train_command(
    cfg: &TrainConfig,
    resume: Option<&Path>,
    existing: Existing,
) -> Result<TrainSummary> {
    match (resume.is_some(), existing == Existing::Resume) {
        (true, false) => {
            return Err(Error::Config(
                "--overwrite and --resume contradict each other: a resumed run keeps its files"
                    .into(),
            ))
        }
        (false, true) => {
            return Err(Error::Config(
                "resuming needs the checkpoint to resume from (--resume DIR)".into(),
            ))
        }
        _ => {}
    }
    if existing == Existing::Overwrite && cfg.out.is_none() {
        return Err(Error::Config(
            "--overwrite replaces the run in the --out folder, but no --out was given".into(),
        ));
    }
    set_threads(cfg.threads);
    let world = crate::dist::world()?;
    let result = train_in_world(cfg, resume, existing, world.comm());
    match &result {
        // Every rank stops at the same iteration on a signal (the ranks agree on it).
        Err(Error::Interrupted { .. }) | Ok(_) => {}
        // A failure on one rank: the others may wait in a collective.
        Err(e) => {
            if world.comm().size() > 1 {
                eprintln!(
                    "rank {} of {}: {e}; stopping every rank",
                    world.comm().rank(),
                    world.comm().size()
                );
            }
            world.abort(1)
        }
    }
    result
}

/// [`train_command`] on the ranks of `comm` (one: a one-process run): rank 0 locks and
/// writes the output folder, the others wait for it (a failure there stops every rank).
fn train_in_world(
    cfg: &TrainConfig,
    resume: Option<&Path>,
    existing: Existing,
    comm: &dyn crate::dist::Comm,
) -> Result<TrainSummary> {
    let ranks = comm.size();
    if ranks > 1 {
        crate::train::ranks::check_config(cfg, ranks)?;
    }
    let lock = match (&cfg.out, comm.rank()) {
        (Some(dir), 0) => RunDir::open(dir, existing).map(Some),
        _ => Ok(None),
    };
    if ranks > 1 && crate::train::ranks::any_rank(comm, lock.is_err())? && lock.is_ok() {
        return Err(Error::Config(
            "rank 0 could not open the output folder (see its error)".into(),
        ));
    }
    let _lock = lock?;
    if let Some(path) = &cfg.save_ensemble {
        check_output_file("--save-ensemble", path)?;
    }
    let opened = match ranks {
        1 => open_backend(cfg.backend, cfg.math)?,
        _ => open_rank_backend(cfg.backend, cfg.math, comm)?,
    };
    if cfg.optimizer == Optimizer::Enkf {
        // Each rank holds its shard of the members.
        let shard = crate::dist::Shard::of(cfg.members, comm.rank(), ranks)?;
        let mut local = cfg.clone();
        local.members = shard.count;
        check_memory_before_loading(&local, &opened)?;
    }
    let data = load_data(cfg)?;
    if cfg.optimizer != Optimizer::Enkf {
        return gradient_command(cfg, &data, opened);
    }
    crate::signals::install();
    let job = TrainJob {
        cfg,
        data: &data,
        resume,
        comm,
    };
    let ((rows, times), backend) = run_opened(opened, cfg.math, job)?;
    let iterations = rows.last().map_or(0, |r| r.iteration);
    Ok(TrainSummary {
        rows,
        backend,
        times,
        iterations,
        task: data.task,
        rank: comm.rank(),
    })
}

/// Bytes of memory available to new allocations on this machine (`MemAvailable` of
/// `/proc/meminfo`), where known.
pub fn host_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The part of an EnKF run's memory known before any data is read (the ensemble, the
/// workspaces of one full mini-batch, a resize's or resample's second ensemble), against
/// the device's free memory (GPU) or `available` host bytes (CPU): a J far too large is
/// refused before the data is loaded, with the largest J that fits.
///
/// Errors: [`Error::Cuda`] (GPU) or [`Error::Config`] (CPU) with the sizes and advice.
pub fn check_memory_before_loading(cfg: &TrainConfig, opened: &Opened) -> Result<()> {
    let batch_images = cfg.train_limit.map_or(cfg.batch, |n| n.min(cfg.batch));
    let shape = crate::gpu::TrainShape::of(cfg, batch_images, 0);
    match opened {
        Opened::Cuda(be, _) => be.check_fits(&shape),
        Opened::Cpu(_) => match host_available_bytes() {
            Some(avail) => host_fits(&shape, avail),
            None => Ok(()),
        },
    }
}

/// Whether the ensemble and EnKF workspaces of `shape` fit in `available` bytes of host
/// memory (see [`check_memory_before_loading`]).
///
/// Errors: [`Error::Config`] naming J, the bytes needed by part, the bytes available and
/// about the largest J that fits.
pub fn host_fits(shape: &crate::gpu::TrainShape, available: u64) -> Result<()> {
    use crate::gpu::memory::{estimate, resize_bytes};
    let need = |s: &crate::gpu::TrainShape| {
        let e = estimate(s);
        let second = if s.second_ensemble {
            resize_bytes(s)
        } else {
            0
        };
        e.ensemble + e.workspaces + second
    };
    let total = need(shape);
    if total <= available {
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    // The need grows with J (up to the small drop where the apply order switches).
    let (mut lo, mut hi) = (1usize, shape.members);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if need(&shape.with_members(mid)) <= available {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let advice = if lo >= 2 {
        format!("the largest ensemble that fits is about J = {lo} (--members {lo})")
    } else {
        "not even J = 2 fits".to_string()
    };
    let e = estimate(shape);
    Err(Error::Config(format!(
        "J = {} members need at least {:.2} GiB of memory on the CPU backend (ensemble U \
         {:.2} GiB, EnKF workspaces {:.2} GiB{}) but this machine has {:.2} GiB available: \
         {advice}",
        shape.members,
        gib(total),
        gib(e.ensemble),
        gib(e.workspaces),
        if shape.second_ensemble {
            format!(", second ensemble {:.2} GiB", gib(resize_bytes(shape)))
        } else {
            String::new()
        },
        gib(available)
    )))
}

/// SGD / Adam by backpropagation: same data, network, initialisation, seed and outputs as
/// an EnKF run. `--backend cuda` runs on the GPU (an error when none is usable), `auto`
/// on the GPU when [`crate::gpu::CudaBackend::open`] succeeds, else on the CPU.
fn gradient_command(cfg: &TrainConfig, data: &DataSplit, opened: Opened) -> Result<TrainSummary> {
    let gcfg = GradConfig::from_train(cfg, cfg.optimizer, cfg.lr, cfg.momentum, cfg.hist_every);
    match opened {
        Opened::Cuda(be, desc) => {
            let trainer = GradientTrainer::on(*be, &gcfg, data)?;
            run_gradient(cfg, &gcfg, data, trainer, desc)
        }
        Opened::Cpu(desc) => {
            let trainer = GradientTrainer::new(&gcfg, data)?;
            run_gradient(cfg, &gcfg, data, trainer, desc)
        }
    }
}

/// The body of [`gradient_command`] on either backend.
fn run_gradient<B: Backend>(
    cfg: &TrainConfig,
    gcfg: &GradConfig,
    data: &DataSplit,
    mut trainer: GradientTrainer<'_, B>,
    desc: String,
) -> Result<TrainSummary> {
    let start = RunStart {
        total: gcfg.total_iterations(data.train.len()),
        iteration: 0,
        members: 1,
        rows: &[],
        adaptive_log: &[],
    };
    let mut out = RunOutput::create(cfg, start, data, &trainer.device_name(), &desc)?;
    let mut stats = match &cfg.out {
        Some(dir) => Some(StatsWriter::create(dir, cfg.hist_every)?),
        None => None,
    };
    let result = trainer.run(&mut out, stats.as_mut());
    out.finish(result.is_ok());
    let rows = result?;
    if let Some(w) = stats.as_mut() {
        w.flush()?;
    }
    if let Some(dir) = &cfg.out {
        crate::io::npy::write_f32(
            &dir.join("mean.npy"),
            &[cfg.net().n_params()],
            trainer.weights(),
        )?;
        crate::io::safetensors::write_net(
            &dir.join("model.safetensors"),
            &cfg.net(),
            trainer.weights(),
        )?;
    }
    let g = &trainer.times;
    let times = crate::train::PhaseTimes {
        forward: g.backprop,
        update: g.step,
        train_score: 0.0,
        eval: g.eval,
        other: g.stats,
    };
    let iterations = rows.last().map_or(0, |r| r.iteration);
    Ok(TrainSummary {
        rows,
        backend: desc,
        times,
        iterations,
        task: data.task,
        rank: 0,
    })
}

/// Writes metrics.csv, adaptive.csv and config.json, and shows progress.
struct RunOutput {
    csv: Option<(csv::Writer<std::fs::File>, PathBuf)>,
    adaptive: Option<(csv::Writer<std::fs::File>, PathBuf)>,
    bar: Option<indicatif::ProgressBar>,
    last_test: Option<f64>,
    task: crate::data::Task,
}

impl RunOutput {
    fn create(
        cfg: &TrainConfig,
        start: RunStart<'_>,
        data: &DataSplit,
        backend: &str,
        desc: &str,
    ) -> Result<Self> {
        let total = start.total;
        let (csv, adaptive) = match &cfg.out {
            Some(dir) => {
                write_config_json(&dir.join("config.json"), cfg, total, data, backend)?;
                let path = dir.join("metrics.csv");
                // A resumed run rewrites the rows of its first part, then appends.
                let mut w = csv::Writer::from_path(&path).map_err(|e| Error::csv(&path, e))?;
                for row in start.rows {
                    w.serialize(row).map_err(|e| Error::csv(&path, e))?;
                }
                w.flush().map_err(|e| Error::io(&path, e))?;
                let adaptive = if cfg.adaptation == crate::train::Adaptation::Adaptive {
                    // The header is written here, so that a run without any decision
                    // still has one; rows never write it (has_headers(false)).
                    let apath = dir.join("adaptive.csv");
                    let mut a = csv::WriterBuilder::new()
                        .has_headers(false)
                        .from_path(&apath)
                        .map_err(|e| Error::csv(&apath, e))?;
                    a.write_record([
                        "iteration",
                        "previous_error",
                        "error",
                        "members",
                        "repetitions",
                        "remaining_iterations",
                    ])
                    .map_err(|e| Error::csv(&apath, e))?;
                    for row in start.adaptive_log {
                        a.serialize(row).map_err(|e| Error::csv(&apath, e))?;
                    }
                    a.flush().map_err(|e| Error::io(&apath, e))?;
                    Some((a, apath))
                } else {
                    None
                };
                (Some((w, path)), adaptive)
            }
            None => (None, None),
        };
        eprintln!(
            "enkf-dnn {}: J = {}, P = {}, {} iterations{} with the {} ({} train / {} test images from {}), backend {desc}",
            env!("CARGO_PKG_VERSION"),
            start.members,
            cfg.net().n_params(),
            total,
            if start.iteration > 0 { format!(" (resuming after {})", start.iteration) } else { String::new() },
            cfg.method_name(),
            data.train.len(),
            data.test.len(),
            data.dir.display(),
        );
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total as u64);
            let style = indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} it  {per_sec}  eta {eta}  {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_position(start.iteration as u64);
            bar
        });
        Ok(RunOutput {
            csv,
            adaptive,
            bar,
            last_test: None,
            task: data.task,
        })
    }

    /// Ends the progress bar: filled when the run `completed`, else left at the
    /// iteration reached (a stop or an error).
    fn finish(&mut self, completed: bool) {
        if let Some(bar) = &self.bar {
            if completed {
                bar.finish();
            } else {
                bar.abandon();
            }
        }
    }

    fn log(&self, line: String) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }
}

impl Observer for RunOutput {
    fn on_row(&mut self, row: &MetricsRow, total: usize) -> Result<()> {
        if let Some((w, path)) = &mut self.csv {
            w.serialize(row).map_err(|e| Error::csv(path.clone(), e))?;
            if row.test_error.is_some() {
                w.flush().map_err(|e| Error::io(path.clone(), e))?;
            }
        }
        if let Some(err) = row.test_error {
            self.last_test = Some(err);
            self.log(format!(
                "iteration {:>6}/{total}  J {:>5}  r {}  {}  train loss {:.4}  {:.1} s",
                row.iteration,
                row.members,
                row.repetitions,
                self.task.score_text(err, row.test_loss.unwrap_or(f64::NAN)),
                row.train_loss,
                row.elapsed_s
            ));
        }
        if let Some(bar) = &self.bar {
            bar.set_length(total as u64);
            bar.set_position(row.iteration as u64);
            if let Some(err) = self.last_test {
                bar.set_message(self.task.score_text(err, err));
            }
        }
        Ok(())
    }

    fn on_adapt(&mut self, row: &crate::train::adaptive::AdaptiveLogRow) -> Result<()> {
        if let Some((w, path)) = &mut self.adaptive {
            w.serialize(row).map_err(|e| Error::csv(path.clone(), e))?;
            w.flush().map_err(|e| Error::io(path.clone(), e))?;
        }
        self.log(format!(
            "adaptive: iteration {}: test error {:.2} % → {:.2} %: J = {}, r = {}, {} iterations left",
            row.iteration, row.previous_error, row.error, row.members, row.repetitions, row.remaining_iterations
        ));
        Ok(())
    }

    fn on_resample(&mut self, iteration: usize, count: usize) -> Result<()> {
        self.log(format!(
            "iteration {iteration}: {count} members had non-finite outputs and were resampled"
        ));
        Ok(())
    }
}

impl TrainConfig {
    fn method_name(&self) -> String {
        match self.optimizer {
            Optimizer::Enkf => format!("EnKF, {:?} rule", self.update).to_lowercase(),
            other => format!("{other:?} by backpropagation").to_lowercase(),
        }
    }
}

/// Where a run starts: what metrics.csv and the log need to know.
struct RunStart<'a> {
    total: usize,
    iteration: usize,
    members: usize,
    rows: &'a [MetricsRow],
    adaptive_log: &'a [crate::train::adaptive::AdaptiveLogRow],
}

/// Writes the resolved configuration plus what describes the run (program, version,
/// backend, P, total iterations). The file reads back as a `--config`.
fn write_config_json(
    path: &Path,
    cfg: &TrainConfig,
    total: usize,
    data: &DataSplit,
    backend: &str,
) -> Result<()> {
    let mut v = cfg.to_file_json()?;
    if let serde_json::Value::Object(m) = &mut v {
        m.insert("program".into(), "enkf-dnn".into());
        m.insert("version".into(), env!("CARGO_PKG_VERSION").into());
        m.insert("backend_used".into(), backend.into());
        m.insert("params".into(), cfg.net().n_params().into());
        m.insert("iterations_total".into(), total.into());
        m.insert(
            "data_used".into(),
            serde_json::json!({ "train_images": data.train.len(), "test_images": data.test.len() }),
        );
    }
    let text = serde_json::to_string_pretty(&v)?;
    crate::io::atomic_write(path, text.as_bytes())
}
