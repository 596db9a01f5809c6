//! The `enkf-dnn` command. Parsing is in `enkf_dnn::cli`, the work in `enkf_dnn::app`;
//! this file only adds error context.

use anyhow::Context;
use clap::Parser;
use enkf_dnn::app;
use enkf_dnn::cli::{Cli, Command};
use enkf_dnn::run_dir::Existing;
use enkf_dnn::train::PartialConfig;

fn main() {
    if let Err(err) = run() {
        // A run stopped by a signal ends with the shell's code for that signal (130 for
        // Ctrl-C, 143 for SIGTERM, 138 for SIGUSR1), after saying how to resume.
        let code = match err.downcast_ref::<enkf_dnn::Error>() {
            Some(enkf_dnn::Error::Interrupted { exit_code, .. }) => *exit_code,
            _ => 1,
        };
        eprintln!("Error: {}", chain(&err));
        std::process::exit(code);
    }
}

/// The error and its causes joined by ": ", a cause left out where the message before it
/// already ends with it (typed errors often quote their source).
fn chain(err: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut last = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !last.ends_with(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        last = text;
    }
    out
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The CPU products are loaded only by the commands that compute; `plot` does none,
    // so a --blas given to it is refused rather than ignored.
    match &cli.command {
        Command::Plot(_) if cli.blas != enkf_dnn::cpu::blas::BlasChoice::Auto => {
            anyhow::bail!("--blas: plot does no matrix products; leave --blas out")
        }
        Command::Plot(_) => {}
        _ => {
            enkf_dnn::cpu::blas::select(cli.blas)?;
        }
    }
    match cli.command {
        Command::Train(args) => {
            let file = match &args.config {
                Some(path) => {
                    let (p, warnings) = PartialConfig::from_file(path)
                        .with_context(|| format!("reading config file {}", path.display()))?;
                    for w in warnings {
                        eprintln!("warning: {w}");
                    }
                    p
                }
                None => PartialConfig::default(),
            };
            if let (Some(dir), Some(out)) = (&args.resume, &args.out) {
                if dir != out {
                    anyhow::bail!(
                        "--resume {} continues the run in that folder; --out {} names another \
                         (leave --out out, or copy the folder)",
                        dir.display(),
                        out.display()
                    );
                }
            }
            let (base, resume) = match &args.resume {
                Some(dir) => {
                    let path = enkf_dnn::train::checkpoint::path_in(dir);
                    if !path.exists() {
                        anyhow::bail!(
                            "--resume {}: the folder holds no {} (a run writes one with \
                             --checkpoint-every N, every N iterations and at its end, and when a \
                             signal stops it; a run without one cannot be continued)",
                            dir.display(),
                            enkf_dnn::train::checkpoint::FILE_NAME
                        );
                    }
                    let (state, _) = enkf_dnn::train::checkpoint::read(&path)
                        .with_context(|| format!("reading the checkpoint in {}", dir.display()))?;
                    let mut base =
                        PartialConfig::from_json(&state.config.to_file_json()?.to_string())?.0;
                    base.out = Some(dir.clone());
                    (base, Some((path, state.config)))
                }
                None => (PartialConfig::default(), None),
            };
            let cfg = base
                .overlay(&file)
                .overlay(&args.to_partial())
                .resolve()
                .context("checking the configuration")?;
            // Before anything is loaded or written: what the resumed run may change.
            if let Some((path, old)) = &resume {
                enkf_dnn::train::resume::check_resume_config(old, &cfg)
                    .with_context(|| format!("resuming from {}", path.display()))?;
            }
            let resume = resume.map(|(path, _)| path);
            let existing = match (&resume, args.overwrite) {
                (Some(_), _) => Existing::Resume,
                (None, true) => Existing::Overwrite,
                (None, false) => Existing::Refuse,
            };
            let summary =
                app::train_command(&cfg, resume.as_deref(), existing).context("training")?;
            if summary.rank != 0 {
                // The other ranks of a sharded run: rank 0 reports.
                return Ok(());
            }
            let last = summary.rows.iter().rev().find(|r| r.test_error.is_some());
            if let Some(r) = last {
                enkf_dnn::outln!(
                    "final {} after {} iterations in {:.1} s on {}",
                    summary.task.score_text(
                        r.test_error.unwrap_or(f64::NAN),
                        r.test_loss.unwrap_or(f64::NAN)
                    ),
                    summary.iterations,
                    r.elapsed_s,
                    summary.backend
                )?;
            }
            let t = &summary.times;
            let n = summary.iterations.max(1) as f64;
            if cfg.optimizer == enkf_dnn::train::optim::Optimizer::Enkf {
                enkf_dnn::outln!(
                    "per iteration: forward {:.1} ms, update {:.1} ms, scoring {:.1} ms, other {:.1} ms; evaluations {:.1} s in total",
                    1e3 * t.forward / n,
                    1e3 * t.update / n,
                    1e3 * t.train_score / n,
                    1e3 * t.other / n,
                    t.eval
                )?;
            } else {
                enkf_dnn::outln!(
                    "per iteration: backprop {:.1} ms, optimizer step {:.2} ms, statistics {:.2} ms; evaluations {:.1} s in total",
                    1e3 * t.forward / n,
                    1e3 * t.update / n,
                    1e3 * t.other / n,
                    t.eval
                )?;
            }
            if let Some(dir) = &cfg.out {
                enkf_dnn::outln!("wrote {}", dir.display())?;
            }
        }
        Command::Reproduce(args) => {
            enkf_dnn::reproduce::run(args.experiment, &args.to_options())
                .with_context(|| format!("reproducing {}", args.experiment.name()))?;
            enkf_dnn::outln!("wrote {}", args.out.display())?;
        }
        Command::Plot(args) => {
            enkf_dnn::reproduce::plot_dir(&args.dir)
                .with_context(|| format!("plotting {}", args.dir.display()))?;
        }
        Command::Bench(args) if args.sharded => bench_sharded(&args)?,
        Command::Bench(args) => {
            if let Some(path) = &args.csv {
                enkf_dnn::run_dir::check_output_file("--csv", path)?;
            }
            let net = args.net()?;
            if args.iters == 0 {
                anyhow::bail!("bench: --iters 0: at least one timed iteration is needed");
            }
            let backend = args.backend;
            app::set_threads(args.threads);
            let dir = args
                .data
                .clone()
                .unwrap_or_else(enkf_dnn::data::default_mnist_dir);
            let data = enkf_dnn::data::load_dir(&dir)
                .with_context(|| format!("loading {}", dir.display()))?;
            let spec = app::BenchSpec {
                members: args.members.clone(),
                net,
                update: args.update,
                iters: args.iters,
                warmup: args.warmup,
                data,
            };
            let (rows, desc) =
                app::bench_command(backend, args.math, &spec).context("benchmark")?;
            enkf_dnn::outln!(
                "backend: {desc}; update rule {:?}, B = 64, median of {} runs",
                args.update,
                spec.iters
            )?;
            enkf_dnn::out!("{}", app::bench_table(&rows))?;
            enkf_dnn::out!("{}", app::layer_table(&rows))?;
            if let Some(path) = &args.csv {
                let mut w = csv::Writer::from_path(path)
                    .with_context(|| format!("creating {}", path.display()))?;
                for r in &rows {
                    w.serialize(r)?;
                }
                w.flush()?;
            }
        }
    }
    Ok(())
}

/// `bench --sharded`: the sharded update's time per -J over the MPI ranks of this run.
#[cfg(feature = "mpi")]
fn bench_sharded(args: &enkf_dnn::cli::BenchArgs) -> anyhow::Result<()> {
    use enkf_dnn::dist::Comm;
    if args.backend == enkf_dnn::backend::BackendKind::Cuda || args.net.is_some() {
        anyhow::bail!(
            "bench --sharded times the CPU update of the paper's network: --backend cuda and \
             --net are not taken with it"
        );
    }
    app::set_threads(args.threads);
    let comm = enkf_dnn::dist::mpi_comm::MpiComm::init()?;
    let p = enkf_dnn::model::Net::new(Default::default(), Default::default()).n_params();
    for &j in &args.members {
        let t = enkf_dnn::enkf::dist::bench_sharded(
            &comm,
            j,
            p,
            args.update,
            (args.warmup, args.iters),
        )?;
        let n = t.len();
        let median = app::median(t);
        if comm.rank() == 0 {
            let bytes = enkf_dnn::enkf::dist::exchanged_bytes(args.update, p, 640);
            enkf_dnn::outln!(
                "J = {j} over {} ranks ({} threads each): update {median:.2} ms (median of {}), \
                 {:.1} MB exchanged per rank and update",
                comm.size(),
                rayon::current_num_threads(),
                n,
                bytes as f64 / 1e6
            )?;
        }
    }
    Ok(())
}

/// `bench --sharded` needs the MPI build.
#[cfg(not(feature = "mpi"))]
fn bench_sharded(_args: &enkf_dnn::cli::BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!(
        "bench --sharded runs over MPI ranks: build with `cargo build --release --features \
         mpi` (OpenMPI: Debian libopenmpi-dev openmpi-bin libclang-dev) and start it with \
         mpirun -np N"
    )
}
