//! `r2scp`: train, evaluate and ablate R2ScP; benchmark its ops.
//!
//! Every failure ends with one line `error: ...` on stderr and a non-zero exit status
//! (2 for command-line errors, 1 otherwise); panics are reported the same way.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, Parser, Subcommand, ValueEnum};

use r2scp::data::MissingType;
use r2scp::trainer::ablate::{self, AblateOptions, Study};
use r2scp::trainer::checkpoint::one_line;
use r2scp::trainer::optim::Decay;
use r2scp::trainer::{evaluate_checkpoint, format_table1, train, RunOptions, TrainConfig};

/// The most `--threads` accepted: more threads than this only cost their start-up time
/// (100,000 took 92 s to spawn before the pool gave up).
const MAX_THREADS: usize = 1024;

#[derive(Parser, Debug)]
#[command(
    name = "r2scp",
    version,
    about = "R2ScP (Retrieving to Recover): missing-modality audio-visual QA on candle",
    long_about = "R2ScP (Retrieving to Recover): missing-modality audio-visual question answering.\n\n\
                  `r2scp train` with no arguments generates the built-in synthetic data set, trains both \
                  stages, evaluates, and writes runs/<name>/ (checkpoint, metrics.jsonl, report.md, plots)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train both stages, evaluate on the test split and write runs/<name>/.
    Train(TrainArgs),
    /// Evaluate a checkpoint on the test split and print the Table 1 layout.
    Eval(EvalArgs),
    /// Run the ablations (Table 2, Table 3, n, k, missing rate) and write one report.
    Ablate(AblateArgs),
    /// Benchmark the fused ops against their references.
    Bench(BenchArgs),
    /// Time every device path of cosine_topk on this GPU and write its dispatch table.
    Tune(TuneArgs),
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum DeviceArg {
    /// CPU (deterministic for a fixed --threads).
    Cpu,
    /// CUDA device 0 (needs a build with `--features cuda`).
    Cuda,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum MissingArg {
    Audio,
    Visual,
    Mixed,
}

/// Options shared by `train` and `ablate`: the config file and per-option overrides.
#[derive(Args, Debug, Default, Clone)]
struct ConfigArgs {
    /// TOML file with options (keys as in `TrainConfig`, tables [stage1], [stage2], [model],
    /// [synthetic]); flags given on the command line override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Train on pre-extracted MUSIC-AVQA features in DIR (avqa-{train,val,test}.json plus
    /// per-video .npy files) instead of the built-in synthetic set.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Seed of everything: synthetic data, initialisation, data order, missing masks, dropout.
    #[arg(long)]
    seed: Option<u64>,
    /// Stage I (expert pre-training) epochs.
    #[arg(long, value_name = "N")]
    epochs1: Option<usize>,
    /// Stage II (expert mixing) maximum epochs.
    #[arg(long, value_name = "N")]
    epochs2: Option<usize>,
    /// Stage I peak learning rate.
    #[arg(long, value_name = "LR")]
    lr1: Option<f64>,
    /// Stage II peak learning rate.
    #[arg(long, value_name = "LR")]
    lr2: Option<f64>,
    /// Training batch size.
    #[arg(long, value_name = "B")]
    batch_size: Option<usize>,
    /// Early-stopping patience of stage II in epochs (0 = off).
    #[arg(long, value_name = "N")]
    patience: Option<usize>,
    /// Learning-rate decay after warmup.
    #[arg(long, value_enum)]
    decay: Option<Decay>,
    /// AdamW weight decay.
    #[arg(long, value_name = "W")]
    weight_decay: Option<f64>,
    /// lambda: weight of the ranking loss L_rank+ + L_rank- (Eq. 15).
    #[arg(long, value_name = "L")]
    lambda: Option<f64>,
    /// Margin of the ranking hinges (Eq. 13-14).
    #[arg(long, value_name = "M")]
    margin: Option<f64>,
    /// Train without the ranking loss (Table 3).
    #[arg(long)]
    no_rank_loss: bool,
    /// Skip stage I; stage II trains every parameter from scratch (Table 3).
    #[arg(long)]
    no_stage1: bool,
    /// Skip stage II; predict with the stage-I experts' heads (Table 3).
    #[arg(long)]
    no_stage2: bool,
    /// Disable cross-modal retrieval (CMR): a missing modality becomes learned null tokens.
    #[arg(long)]
    no_retrieval: bool,
    /// Disable context-aware adaptive purification (CAP).
    #[arg(long)]
    no_cap: bool,
    /// Retrieve as the paper does (cross-modal key search, plain mean of Eq. 4), without
    /// the default safeguards (same-view search, similarity softmax, reliability gate,
    /// router statistics).
    #[arg(long)]
    paper_retrieval: bool,
    /// Purify as the paper's Eq. 5-8 as first implemented here (dissonance against H_avl,
    /// straight-through gate on, scoring gradients reaching the recovered tokens, no
    /// detection loss), instead of the default CAP.
    #[arg(long)]
    paper_cap: bool,
    /// n: candidates retrieved per missing modality.
    #[arg(long, short = 'n', value_name = "N")]
    n: Option<usize>,
    /// k: CAP purification budget (tokens replaced).
    #[arg(long, short = 'k', value_name = "K")]
    k: Option<usize>,
    /// Training missing rate eta in [0, 1].
    #[arg(long, value_name = "ETA")]
    missing_rate: Option<f32>,
    /// Training missing type.
    #[arg(long, value_enum)]
    missing_type: Option<MissingArg>,
    /// Model width D.
    #[arg(long, value_name = "D")]
    dim: Option<usize>,
    /// Synthetic set: number of training clips (memory-bank size).
    #[arg(long, value_name = "N")]
    train_clips: Option<usize>,
}

impl ConfigArgs {
    /// The config file (or defaults) with the flags applied on top.
    fn resolve(&self) -> Result<TrainConfig> {
        let mut c = match &self.config {
            Some(p) => TrainConfig::from_toml_file(p)?,
            None => TrainConfig::default(),
        };
        if let Some(v) = &self.data {
            c.data = Some(v.clone());
        }
        macro_rules! set {
            ($field:expr, $flag:expr) => {
                if let Some(v) = $flag {
                    $field = v;
                }
            };
        }
        set!(c.seed, self.seed);
        set!(c.stage1.epochs, self.epochs1);
        set!(c.stage2.epochs, self.epochs2);
        set!(c.stage1.lr, self.lr1);
        set!(c.stage2.lr, self.lr2);
        set!(c.batch_size, self.batch_size);
        set!(c.stage2.patience, self.patience);
        set!(c.decay, self.decay);
        set!(c.weight_decay, self.weight_decay);
        set!(c.lambda_rank, self.lambda);
        set!(c.margin, self.margin);
        set!(c.model.n_retrieved, self.n);
        set!(c.model.k_purge, self.k);
        set!(c.missing_rate, self.missing_rate);
        set!(c.model.dim, self.dim);
        set!(c.synthetic.n_train_clips, self.train_clips);
        if let Some(m) = self.missing_type {
            c.missing_type = match m {
                MissingArg::Audio => MissingType::Audio,
                MissingArg::Visual => MissingType::Visual,
                MissingArg::Mixed => MissingType::Mixed,
            };
        }
        if self.no_rank_loss {
            c.rank_loss = false;
        }
        if self.no_stage1 {
            c.stage1_enabled = false;
        }
        if self.no_stage2 {
            c.stage2_enabled = false;
        }
        if self.no_retrieval {
            c.model.use_retrieval = false;
        }
        if self.no_cap {
            c.model.use_cap = false;
        }
        if self.paper_retrieval {
            c.model.recovery = r2scp::model::RecoveryConfig::paper();
        }
        if self.paper_cap {
            c.model.cap = r2scp::model::CapSettings::paper();
        }
        c.apply_seed();
        c.absolute_paths()?;
        c.validate()?;
        Ok(c)
    }
}

/// Options of the machine, shared by the commands that compute.
#[derive(Args, Debug, Clone)]
struct MachineArgs {
    /// Compute device.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// CPU threads (sets RAYON_NUM_THREADS); results are deterministic for a fixed count.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// No progress bars or per-epoch lines.
    #[arg(long, short = 'q')]
    quiet: bool,
}

#[derive(Args, Debug)]
struct TrainArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    #[command(flatten)]
    machine: MachineArgs,
    /// Run name: outputs go to <runs-dir>/<name>/ (default: derived from the seed and
    /// the switches, e.g. `train-s0`, then `train-s0-2`, ... if taken).
    #[arg(long)]
    name: Option<String>,
    /// Directory holding the runs.
    #[arg(long, default_value = "runs", value_name = "DIR")]
    runs_dir: PathBuf,
    /// Continue an interrupted run <runs-dir>/<name>/ from its last checkpoint, with its
    /// saved configuration (other training options are ignored).
    #[arg(long)]
    resume: bool,
    /// Replace an existing run of the same name: its outputs are deleted first. Only a
    /// directory r2scp created as a run (it holds the `.r2scp-run` marker) is replaced;
    /// anything else is refused and left as it is.
    #[arg(long, conflicts_with = "resume")]
    force: bool,
}

#[derive(Args, Debug)]
struct EvalArgs {
    /// Run directory (runs/<name>) or its checkpoint/ directory.
    #[arg(long, value_name = "DIR")]
    checkpoint: PathBuf,
    #[command(flatten)]
    machine: MachineArgs,
    /// Print the results as JSON instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct AblateArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    #[command(flatten)]
    machine: MachineArgs,
    /// Number of seeds (0, 1, ..., N-1 added to --seed); results are averaged.
    #[arg(long, default_value_t = 1, value_name = "N")]
    seeds: usize,
    /// Smaller data set and fewer epochs (a smoke run of every study).
    #[arg(long)]
    quick: bool,
    /// Studies to run (comma-separated): table2, strategy, n, k, rate.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = Study::ALL)]
    only: Vec<Study>,
    /// Output directory (report.md, results.json, plots/, one run per variant).
    #[arg(long, default_value = "runs/ablate", value_name = "DIR")]
    out: PathBuf,
}

/// Options of `r2scp tune`.
#[derive(Args, Debug)]
struct TuneArgs {
    /// Device whose paths are timed (only CUDA devices have a dispatch table).
    #[arg(long, value_enum, default_value_t = DeviceArg::Cuda)]
    device: DeviceArg,
    /// The GPU lane's smaller grid (bf16 and f32, D 256 and 1024, B 1, 8, 16, 64, 1024).
    #[arg(long)]
    quick: bool,
    /// Time budget in seconds: cells left when it is spent keep the default rule.
    #[arg(long, default_value_t = 180, value_name = "S")]
    budget_s: u64,
    /// Where to write the table (default: $R2SCP_DISPATCH_TABLE, else the user's cache
    /// directory, r2scp/dispatch/<gpu>-sm<cc>.json). An existing file is replaced only if it
    /// is a dispatch table.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short = 'q')]
    quiet: bool,
}

#[derive(Args, Debug)]
struct BenchArgs {
    #[command(subcommand)]
    which: BenchCommand,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Cosine top-n retrieval (CMR): fused op vs. its reference.
    Retrieve(r2scp::bench::retrieve::Args),
    /// CAP ops (dissonance top-k, gather-inject): fused ops vs. their references.
    Cap(r2scp::bench::cap::Args),
}

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("error: internal error: {}{at}", one_line(&msg));
    }));
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
            let text = e.to_string();
            let first = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid arguments");
            let first = first.trim_start_matches("error: ");
            eprintln!("error: {} (see --help)", one_line(first));
            return ExitCode::from(2);
        }
    };
    match std::panic::catch_unwind(|| dispatch(cli)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {}", error_line(&e));
            ExitCode::from(1)
        }
        Err(_) => ExitCode::from(101),
    }
}

/// The error chain as one line: each cause's text, any backtrace in it cut off (candle
/// appends one to its errors' text when `RUST_BACKTRACE` is set, and it survives in errors
/// that were turned into strings), newlines collapsed, joined by `": "`.
fn error_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| match c.downcast_ref::<candle_core::Error>() {
            Some(ce) => r2scp::io::candle_text(ce),
            None => c.to_string(),
        })
        .map(|t| one_line(without_backtrace(&t)))
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(": ")
}

/// `text` up to the first line of a printed backtrace: a `stack backtrace:` header, or a
/// frame line `<n>: <symbol>` followed by its `at <file>:<line>` line (std's format).
fn without_backtrace(text: &str) -> &str {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let is_frame = |i: usize| {
        let t = lines[i].trim_start();
        let numbered = t
            .split_once(": ")
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        numbered
            && lines
                .get(i + 1)
                .is_none_or(|next| next.trim_start().starts_with("at "))
    };
    let mut end = 0;
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        if i > 0 && (t.starts_with("stack backtrace:") || is_frame(i)) {
            break;
        }
        end += line.len();
    }
    &text[..end]
}

fn setup(m: &MachineArgs) -> Result<Device> {
    if let Some(t) = m.threads {
        if !(1..=MAX_THREADS).contains(&t) {
            bail!("--threads {t}: expected 1 to {MAX_THREADS}");
        }
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .map_err(|e| anyhow::anyhow!("--threads {t}: cannot start the thread pool: {e}"))?;
    }
    match m.device {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda => {
            if !cfg!(feature = "cuda") {
                bail!("--device cuda: this binary was built without the `cuda` feature (cargo build --release --features cuda)");
            }
            Device::new_cuda(0).context("opening CUDA device 0")
        }
    }
}

/// Runs the subcommand the command line chose.
fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => cmd_train(a),
        Command::Eval(a) => cmd_eval(a),
        Command::Ablate(a) => cmd_ablate(a),
        Command::Bench(b) => match b.which {
            BenchCommand::Retrieve(a) => r2scp::bench::retrieve::compare(&a),
            BenchCommand::Cap(a) => r2scp::bench::cap::compare(&a),
        },
        Command::Tune(a) => cmd_tune(a),
    }
}

/// `r2scp tune`: the cosine_topk dispatch table of CUDA device 0.
fn cmd_tune(a: TuneArgs) -> Result<()> {
    if a.device != DeviceArg::Cuda {
        bail!("tune --device cpu: nothing to tune (dispatch tables choose among CUDA paths); expected --device cuda");
    }
    if a.budget_s == 0 {
        bail!("--budget-s 0: expected at least 1 second");
    }
    tune_cuda(a)
}

#[cfg(not(feature = "cuda"))]
fn tune_cuda(_: TuneArgs) -> Result<()> {
    bail!("tune --device cuda: this binary was built without the `cuda` feature (cargo build --release --features cuda)")
}

#[cfg(feature = "cuda")]
fn tune_cuda(a: TuneArgs) -> Result<()> {
    use r2scp::retrieve::cosine_topk::{dispatch, tune};
    let dev = Device::new_cuda(0).context("opening CUDA device 0")?;
    let Device::Cuda(cuda) = &dev else {
        bail!("tune: CUDA device 0 did not open as a CUDA device");
    };
    let gpu = dispatch::gpu_of(cuda)?;
    let out = match a.out.clone().or_else(|| dispatch::table_path(&gpu)) {
        Some(p) => p,
        None => bail!("tune: no cache directory (HOME unset); pass --out FILE"),
    };
    let mut opts = if a.quick {
        tune::TuneOptions::quick()
    } else {
        tune::TuneOptions::full()
    };
    opts.budget = std::time::Duration::from_secs(a.budget_s);
    let bar = r2scp::trainer::progress::EpochBar::new(opts.cells() as u64, "tune", !a.quiet);
    let table = tune::tune(&dev, &opts, |_, _, line| bar.step(|| line.to_string()))?;
    bar.finish();
    dispatch::save_table(&table, &out).map_err(|e| anyhow::anyhow!("tune: {e}"))?;
    println!("{}", table.markdown());
    println!(
        "tune: {} of {} cells measured; table written to {}",
        table.cells.len(),
        opts.cells(),
        out.display()
    );
    Ok(())
}

fn default_name(c: &TrainConfig) -> String {
    let mut s = format!("train-s{}", c.seed);
    for (off, tag) in [
        (!c.model.use_retrieval, "noret"),
        (!c.model.use_cap, "nocap"),
        (!c.rank_loss, "norank"),
        (!c.stage1_enabled, "nos1"),
        (!c.stage2_enabled, "nos2"),
        (
            c.model.use_retrieval && c.model.recovery.is_paper(),
            "paper",
        ),
        (c.model.use_cap && c.model.cap.is_paper(), "papercap"),
    ] {
        if off {
            s.push('-');
            s.push_str(tag);
        }
    }
    if c.data.is_some() {
        s.push_str("-avqa");
    }
    s
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.starts_with('.')
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        bail!("--name {name:?}: use letters, digits, '-', '_' or '.' (not starting with '.')");
    }
    Ok(())
}

fn cmd_train(a: TrainArgs) -> Result<()> {
    let device = setup(&a.machine)?;
    let (cfg, run_dir) = if a.resume {
        let name = match &a.name {
            Some(n) => n.clone(),
            None => latest_run(&a.runs_dir)?,
        };
        check_name(&name)?;
        (TrainConfig::default(), a.runs_dir.join(name))
    } else {
        let cfg = a.cfg.resolve()?;
        let name = match &a.name {
            Some(n) => n.clone(),
            None => {
                // first free name: train-s0, train-s0-2, train-s0-3, ...
                let base = default_name(&cfg);
                let mut name = base.clone();
                let mut i = 2;
                while !a.force && a.runs_dir.join(&name).exists() {
                    name = format!("{base}-{i}");
                    i += 1;
                }
                name
            }
        };
        check_name(&name)?;
        (cfg, a.runs_dir.join(&name))
    };
    let opts = RunOptions {
        resume: a.resume,
        force: a.force,
        quiet: a.machine.quiet,
        device,
        ..RunOptions::new(&run_dir)
    };
    let summary = train(&cfg, &opts)?;
    if !a.machine.quiet {
        println!("\n{}", format_table1(&summary.test));
        println!(
            "run directory: {} (report.md, metrics.jsonl, plots/, checkpoint/) in {:.0}s",
            run_dir.display(),
            summary.secs
        );
    }
    Ok(())
}

/// The most recently modified run directory holding a checkpoint.
fn latest_run(runs_dir: &Path) -> Result<String> {
    let rd = std::fs::read_dir(runs_dir).with_context(|| {
        format!(
            "--resume without --name: cannot read {}",
            runs_dir.display()
        )
    })?;
    let mut best: Option<(std::time::SystemTime, String)> = None;
    for e in rd.flatten() {
        let st = e.path().join("checkpoint").join("state.json");
        if let Ok(m) = st.metadata().and_then(|m| m.modified()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if best.as_ref().is_none_or(|(t, _)| m > *t) {
                best = Some((m, name));
            }
        }
    }
    best.map(|b| b.1).ok_or_else(|| {
        anyhow::anyhow!(
            "--resume without --name: no run with a checkpoint under {}",
            runs_dir.display()
        )
    })
}

fn cmd_eval(a: EvalArgs) -> Result<()> {
    let device = setup(&a.machine)?;
    let ev = evaluate_checkpoint(&a.checkpoint, &device)?;
    if let Some(w) = &ev.warning {
        eprintln!("warning: {}", one_line(w));
    }
    let (st, rows) = (ev.state, ev.rows);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if !st.finished {
        println!(
            "note: the run is not finished (stage {}, epoch {}); evaluating its last checkpoint",
            st.stage.number(),
            st.epoch
        );
    }
    println!("Test accuracy (%) of {}:\n", a.checkpoint.display());
    print!("{}", format_table1(&rows));
    Ok(())
}

fn cmd_ablate(a: AblateArgs) -> Result<()> {
    let device = setup(&a.machine)?;
    if a.seeds == 0 {
        bail!("--seeds 0: expected at least 1");
    }
    let base = a.cfg.resolve()?;
    let last = (a.seeds as u64 - 1)
        .checked_add(base.seed)
        .filter(|&s| s <= i64::MAX as u64)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--seed {} with --seeds {}: the last seed would pass {} (2^63 - 1, the largest \
                 integer config.toml holds)",
                base.seed,
                a.seeds,
                i64::MAX
            )
        })?;
    let opts = AblateOptions {
        out_dir: a.out.clone(),
        seeds: (base.seed..=last).collect(),
        quick: a.quick,
        studies: a.only.clone(),
        quiet: a.machine.quiet,
        device,
    };
    let report = ablate::run_studies(&base, &opts)?;
    println!("{}", report.display());
    Ok(())
}
