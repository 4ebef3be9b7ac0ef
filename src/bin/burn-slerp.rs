//! `burn-slerp`: merge two checkpoint files by SLERP from the command line.
//!
//! ```text
//! burn-slerp merge A B -o OUT [-t 0.5 | --recipe recipe.json] [--device flex|ndarray|wgpu]
//!                      [--granularity tensor|row] [--mergekit] [--out-dtype f32|f16|bf16]
//!                      [--union | --intersection] [--base BASE] [--tokenizer-source a|b]
//!                      [--dry-run] [--report report.json] [--quiet]
//! burn-slerp mean A B [C …] -o OUT [--weights 0.5,0.3,0.2] [--device …] [--out-dtype …]
//!                     [--method karcher|mergekit-karcher|multislerp|nuslerp|linear] [--base BASE]
//!                     [--union | --intersection] [--dry-run] [--report report.json] [--quiet]
//! burn-slerp yaml recipe.yml OUT [--exact] [--device …] [--dry-run] [--report …] [--quiet]
//! burn-slerp inspect A [B]
//! ```
//!
//! A and B are `.safetensors` files, Hugging Face model folders (one `model.safetensors`,
//! sharded safetensors, `pytorch_model.bin` alone or sharded), PyTorch files (`.bin`, `.pt`,
//! `.pth`), `.bpk` burnpack files, or models in the local Hugging Face cache (`org/name`,
//! `org/name@revision`); OUT is a `.safetensors` or `.bpk` file, or a folder (a loadable model
//! folder when an input is one).
//!
//! Exit codes: 0 success, 1 merge, input or I/O error, 2 usage error, 130 interrupted.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use burn::config::Config;
use burn::tensor::Device;
use burn_slerp::checkpoint::{
    CheckpointError, FileMerge, FilePlan, OutDType, Pairing, Progress, TokenizerSource,
    compare_files, inspect, shapes,
};
use burn_slerp::mergekit::{YamlResult, plan_yaml, yaml_files};
use burn_slerp::{Granularity, MeanMethod, SlerpConfig, SphericalMean};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "burn-slerp",
    version,
    about = "Merge two checkpoints by spherical linear interpolation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Merge A and B (files, model folders, hub-cache names) into OUT, one tensor at a time.
    Merge {
        /// The checkpoint at t = 0.
        a: PathBuf,
        /// The checkpoint at t = 1.
        b: PathBuf,
        /// The merged checkpoint: `.safetensors`, `.bpk`, or a folder for a sharded checkpoint.
        #[arg(short, long)]
        output: PathBuf,
        /// Interpolation factor in [0, 1].
        #[arg(short, long, conflicts_with = "recipe", value_parser = factor, allow_negative_numbers = true)]
        t: Option<f64>,
        /// A JSON recipe (a `SlerpConfig`, schedule included).
        #[arg(long)]
        recipe: Option<PathBuf>,
        /// Where the arithmetic runs.
        #[arg(long, value_enum, default_value_t = DeviceArg::Flex)]
        device: DeviceArg,
        /// One angle per tensor, or per row.
        #[arg(long, value_enum)]
        granularity: Option<GranularityArg>,
        /// mergekit-compatible: lerp whenever |cos| > 0.9995.
        #[arg(long)]
        mergekit: bool,
        /// dtype of merged float tensors (default: A's).
        #[arg(long, value_enum)]
        out_dtype: Option<OutDTypeArg>,
        /// Copy tensors present in one input only from that input.
        #[arg(long, conflicts_with = "intersection")]
        union: bool,
        /// Write only the tensors present in both inputs.
        #[arg(long)]
        intersection: bool,
        /// Check everything and print the plan; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Write the merge report as JSON to this file.
        #[arg(long)]
        report: Option<PathBuf>,
        /// A base checkpoint: task-vector SLERP, `base + slerp(A − base, B − base, t)`.
        #[arg(long)]
        base: Option<PathBuf>,
        /// Whose tokenizer files a model-folder output gets.
        #[arg(long, value_enum, default_value_t = TokenizerArg::A)]
        tokenizer_source: TokenizerArg,
        /// Print nothing but errors.
        #[arg(short, long)]
        quiet: bool,
    },
    /// The weighted spherical mean of two or more checkpoints into OUT, one tensor at a time.
    Mean {
        /// The checkpoints (files, model folders, hub-cache names); the first gives the
        /// structure, the integer tensors and the model files.
        #[arg(required = true, num_args = 2..)]
        inputs: Vec<PathBuf>,
        /// One weight per checkpoint, comma-separated (`0.5,0.3,0.2`); equal weights by default.
        #[arg(long, value_delimiter = ',')]
        weights: Option<Vec<f64>>,
        /// The member of the SLERP family to compute.
        #[arg(long, value_enum, default_value_t = MeanArg::Karcher)]
        method: MeanArg,
        /// A base checkpoint: the mean of the task vectors `input − base`, plus the base.
        #[arg(long)]
        base: Option<PathBuf>,
        /// The merged checkpoint: `.safetensors`, `.bpk`, or a folder.
        #[arg(short, long)]
        output: PathBuf,
        /// Where the arithmetic runs.
        #[arg(long, value_enum, default_value_t = DeviceArg::Flex)]
        device: DeviceArg,
        /// dtype of merged float tensors (default: the first input's).
        #[arg(long, value_enum)]
        out_dtype: Option<OutDTypeArg>,
        /// Copy tensors present in one of the first two inputs only from that input.
        #[arg(long, conflicts_with = "intersection")]
        union: bool,
        /// Write only the tensors present in every input.
        #[arg(long)]
        intersection: bool,
        /// Check everything and print the tensors to average; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Write what the mean computed per tensor as JSON to this file.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Whose tokenizer files a model-folder output gets: the first input's or the second's.
        #[arg(long, value_enum, default_value_t = TokenizerArg::A)]
        tokenizer_source: TokenizerArg,
        /// Print nothing but errors.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Merge as a mergekit YAML recipe (`merge_method: slerp`) says, as `mergekit-yaml` 0.1.5
    /// does: `burn-slerp yaml recipe.yml OUT`.
    Yaml {
        /// The mergekit recipe.
        recipe: PathBuf,
        /// The merged model: a folder (a model folder when the base model is one), or a
        /// `.safetensors` / `.bpk` file.
        output: PathBuf,
        /// burn-slerp's exact SLERP (no 0.9995 threshold; a zero tensor lerps) instead of
        /// mergekit's numerics.
        #[arg(long)]
        exact: bool,
        /// Where the arithmetic runs.
        #[arg(long, value_enum, default_value_t = DeviceArg::Flex)]
        device: DeviceArg,
        /// Check everything and print the resolved plan; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Write the merge report as JSON to this file.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Print nothing but errors.
        #[arg(short, long)]
        quiet: bool,
    },
    /// List a checkpoint's tensors; with B, how the two pair up and the angles between them.
    Inspect {
        /// A checkpoint.
        a: PathBuf,
        /// A second checkpoint to pair with the first.
        b: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    Flex,
    Ndarray,
    Wgpu,
}

#[derive(Clone, Copy, ValueEnum)]
enum GranularityArg {
    Tensor,
    Row,
}

/// The member of the SLERP family `mean` computes.
#[derive(Clone, Copy, ValueEnum)]
enum MeanArg {
    /// The weighted Karcher mean, to convergence.
    Karcher,
    /// mergekit's `karcher` (equal weights, 10 steps, tol 1e-5).
    MergekitKarcher,
    /// mergekit's `multislerp` (weights normalised, eps 1e-8).
    Multislerp,
    /// mergekit's `nuslerp` of two checkpoints at t = w₂/(w₁ + w₂).
    Nuslerp,
    /// The weighted linear mean.
    Linear,
}

fn method_of(arg: MeanArg) -> MeanMethod {
    match arg {
        MeanArg::Karcher => MeanMethod::Karcher,
        MeanArg::MergekitKarcher => MeanMethod::MergekitKarcher {
            max_iter: 10,
            tol: 1e-5,
        },
        MeanArg::Multislerp => MeanMethod::Multislerp {
            normalize_weights: true,
            eps: 1e-8,
        },
        MeanArg::Nuslerp => MeanMethod::Nuslerp,
        MeanArg::Linear => MeanMethod::Linear,
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum TokenizerArg {
    A,
    B,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutDTypeArg {
    F32,
    F16,
    Bf16,
}

/// `-t`: a number in [0, 1]; anything else is a usage error (exit code 2).
fn factor(text: &str) -> Result<f64, String> {
    let t: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))?;
    if t.is_finite() && (0.0..=1.0).contains(&t) {
        Ok(t)
    } else {
        Err(format!("{t} is not in [0, 1]"))
    }
}

/// A failure: the message and the exit code.
struct Failure(String, u8);

impl Failure {
    /// Standard output was closed (`burn-slerp inspect … | head`): stop quietly.
    fn closed_pipe() -> Self {
        Failure(String::new(), 0)
    }
}

/// Writes to standard output; a closed pipe ends the command quietly instead of panicking.
fn print(text: std::fmt::Arguments<'_>) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match out.write_fmt(text) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(Failure::closed_pipe()),
        Err(e) => Err(Failure(format!("standard output: {e}"), 1)),
        Ok(()) => Ok(()),
    }
}

/// Writes a line to standard error, best effort: a closed standard error stops nothing.
macro_rules! note {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

macro_rules! out {
    ($($arg:tt)*) => {
        print(format_args!("{}\n", format_args!($($arg)*)))?
    };
}

impl From<CheckpointError> for Failure {
    fn from(e: CheckpointError) -> Self {
        // 128 + SIGINT, as a shell reports a command stopped by Ctrl-C.
        let code = if matches!(e, CheckpointError::Interrupted) {
            130
        } else {
            1
        };
        Failure(e.to_string(), code)
    }
}

/// Ctrl-C (SIGINT) and SIGTERM. Before the output is first written (while inputs are opened
/// and checked and the merge is planned) they end the process at once with exit code 130:
/// nothing exists to clean up. Once writing has begun they stop the merge at the next tensor,
/// which removes the partial output; a second signal then ends the process at once.
mod interrupt {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    #[cfg(unix)]
    static FLAG: std::sync::atomic::AtomicPtr<AtomicBool> =
        std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

    /// Whether the output may have been written to.
    #[cfg(unix)]
    static WRITING: AtomicBool = AtomicBool::new(false);

    #[cfg(unix)]
    extern "C" fn on_signal(signal: libc::c_int) {
        use std::sync::atomic::Ordering;
        if !WRITING.load(Ordering::SeqCst) {
            // SAFETY: `_exit` is async-signal-safe, and nothing has been written.
            unsafe { libc::_exit(130) };
        }
        let flag = FLAG.load(Ordering::SeqCst);
        if !flag.is_null() {
            // SAFETY: the pointer comes from a leaked `Arc` and is never freed.
            unsafe { (*flag).store(true, Ordering::SeqCst) };
        }
        // SAFETY: `signal` is async-signal-safe; back to the default action for the next one.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    }

    /// From now on a signal stops the merge at the next tensor instead of ending the process.
    pub(crate) fn writing() {
        #[cfg(unix)]
        WRITING.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The flag the signals set, with the handlers installed.
    pub(crate) fn flag() -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(false));
        #[cfg(unix)]
        {
            use std::sync::atomic::Ordering;
            let leaked = Arc::into_raw(Arc::clone(&flag)).cast_mut();
            FLAG.store(leaked, Ordering::SeqCst);
            let handler = on_signal as extern "C" fn(libc::c_int);
            // SAFETY: the handler only stores to atomics and calls `signal`.
            unsafe {
                libc::signal(libc::SIGINT, handler as libc::sighandler_t);
                libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
            }
        }
        flag
    }
}

fn device(arg: DeviceArg) -> Result<Device, Failure> {
    match arg {
        DeviceArg::Flex => Ok(Device::flex()),
        #[cfg(feature = "ndarray")]
        #[allow(deprecated)]
        DeviceArg::Ndarray => Ok(Device::ndarray()),
        #[cfg(feature = "wgpu")]
        DeviceArg::Wgpu => Ok(Device::wgpu(Default::default())),
        #[allow(unreachable_patterns)]
        _ => Err(Failure(
            "this build has no such device: rebuild with `--features cli,ndarray` or \
             `--features cli,wgpu`"
                .into(),
            2,
        )),
    }
}

/// The progress callback of a file merge: a bar on a terminal, a line per tensor otherwise,
/// nothing when quiet; and the bar, to clear at the end.
fn progress_reporter(
    tensors: usize,
    quiet: bool,
) -> (
    impl FnMut(Progress<'_>) + Send + 'static,
    Option<indicatif::ProgressBar>,
) {
    let started = std::time::Instant::now();
    let terminal = std::io::stderr().is_terminal();
    let bar = (!quiet && terminal).then(|| {
        // The length is set by the first tensor written: merged and copied ones alike.
        let bar = indicatif::ProgressBar::new(tensors as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} tensors, {msg} [{elapsed} < {eta}]",
            )
            .expect("a valid template"),
        );
        bar
    });
    let mut bytes = 0usize;
    let shown = bar.clone();
    let progress = move |p: Progress<'_>| {
        bytes += p.bytes;
        if let Some(bar) = &shown {
            let rate = bytes as f64 / started.elapsed().as_secs_f64().max(1e-9) / 1e6;
            bar.set_message(format!("{:.1} MB, {rate:.0} MB/s", bytes as f64 / 1e6));
            bar.set_length(p.total as u64);
            bar.set_position(p.done as u64);
        } else if !quiet {
            // Progress is best effort: a closed standard error does not stop the merge.
            let _ = writeln!(
                std::io::stderr(),
                "[{}/{}] {} ({} bytes)",
                p.done,
                p.total,
                p.name,
                p.bytes
            );
        }
    };
    (progress, bar)
}

fn out_dtype_of(arg: Option<OutDTypeArg>) -> Option<OutDType> {
    arg.map(|d| match d {
        OutDTypeArg::F32 => OutDType::F32,
        OutDTypeArg::F16 => OutDType::F16,
        OutDTypeArg::Bf16 => OutDType::BF16,
    })
}

fn pairing_of(union: bool, intersection: bool) -> Pairing {
    if union {
        Pairing::Union
    } else if intersection {
        Pairing::Intersection
    } else {
        Pairing::Strict
    }
}

fn tokenizer_of(arg: TokenizerArg) -> TokenizerSource {
    match arg {
        TokenizerArg::A => TokenizerSource::A,
        TokenizerArg::B => TokenizerSource::B,
    }
}

fn run(cli: Cli, cancel: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Result<(), Failure> {
    match cli.command {
        Command::Yaml {
            recipe,
            output,
            exact,
            device: device_arg,
            dry_run,
            report,
            quiet,
        } => {
            let device = device(device_arg)?;
            let plan = plan_yaml(&recipe, exact)?;
            if dry_run {
                print(format_args!("{plan}"))?;
                return Ok(());
            }
            for w in &plan.warnings {
                note!("warning: {w}");
            }
            let started = std::time::Instant::now();
            let (progress, bar) = progress_reporter(plan.tensors.len(), quiet);
            interrupt::writing();
            let result = yaml_files(plan, &output, device, Some(cancel), progress);
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            let (json, done) = match result? {
                YamlResult::Slerp(report) => (
                    report.to_json(),
                    format!(
                        "merged {} tensors ({} parameters)",
                        report.summary.tensors, report.summary.params
                    ),
                ),
                YamlResult::Mean(stats) => (
                    serde_json::to_string_pretty(&stats).expect("statistics serialise") + "\n",
                    format!("averaged {} tensors", stats.len()),
                ),
            };
            if let Some(path) = report {
                std::fs::write(&path, json)
                    .map_err(|e| Failure(format!("{}: {e}", path.display()), 1))?;
            }
            if !quiet {
                note!(
                    "{done} into {} in {:.2} s",
                    output.display(),
                    started.elapsed().as_secs_f64()
                );
            }
            Ok(())
        }
        Command::Mean {
            inputs,
            weights,
            method,
            base,
            output,
            device: device_arg,
            out_dtype,
            union,
            intersection,
            dry_run,
            report,
            tokenizer_source,
            quiet,
        } => {
            let weights = weights.unwrap_or_else(|| vec![1.0; inputs.len()]);
            let mean = SphericalMean::new(weights)
                .map_err(|e| Failure(e.to_string(), 2))?
                .with_method(method_of(method));
            let mut options = FileMerge::new(SlerpConfig::new(0.5), device(device_arg)?);
            options.base = base;
            options.pairing = pairing_of(union, intersection);
            options.out_dtype = out_dtype_of(out_dtype);
            options.tokenizer_source = tokenizer_of(tokenizer_source);
            options.cancel = Some(cancel);
            let plan = FilePlan::mean(&inputs, &mean, &output, &options)?;
            if dry_run {
                let averaged = plan.averaged();
                out!(
                    "{} float tensors averaged over {} checkpoints (weights {:?}):",
                    averaged.len(),
                    inputs.len(),
                    mean.weights()
                );
                for (name, shape, dtype) in &averaged {
                    out!("{name}  {dtype}  {shape:?}");
                }
                return Ok(());
            }
            let started = std::time::Instant::now();
            let (progress, bar) = progress_reporter(plan.len(), quiet);
            interrupt::writing();
            let result = plan.write(progress);
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            let stats = result?.means;
            if let Some(path) = report {
                let json = serde_json::to_string_pretty(&stats).expect("statistics serialise");
                std::fs::write(&path, json + "\n")
                    .map_err(|e| Failure(format!("{}: {e}", path.display()), 1))?;
            }
            if !quiet {
                note!(
                    "averaged {} tensors of {} checkpoints into {} in {:.2} s",
                    stats.len(),
                    inputs.len(),
                    output.display(),
                    started.elapsed().as_secs_f64()
                );
            }
            Ok(())
        }
        Command::Inspect { a, b } => {
            let list = inspect(&a)?;
            let total: usize = list
                .iter()
                .map(|(_, _, s)| s.iter().product::<usize>())
                .sum();
            for (name, dtype, shape) in &list {
                out!("{name}  {dtype}  {shape:?}");
            }
            out!("{} tensors, {total} parameters", list.len());
            if let Some(b) = b {
                let (sa, sb) = (shapes(&a)?, shapes(&b)?);
                let only_a: Vec<&String> = sa.keys().filter(|k| !sb.contains_key(*k)).collect();
                let only_b: Vec<&String> = sb.keys().filter(|k| !sa.contains_key(*k)).collect();
                let differ: Vec<&String> = sa
                    .iter()
                    .filter(|(k, s)| sb.get(*k).is_some_and(|t| t != *s))
                    .map(|(k, _)| k)
                    .collect();
                out!(
                    "pairing with {}: {} in both, {} only in A {:?}, {} only in B {:?}, {} with different shapes {:?}",
                    b.display(),
                    sa.len() - only_a.len(),
                    only_a.len(),
                    only_a,
                    only_b.len(),
                    only_b,
                    differ.len(),
                    differ
                );
                let report = compare_files(&a, &b, &Device::flex())?;
                let summary = &report.summary;
                let fixed = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.4}"));
                out!(
                    "angles over {} float tensors: theta min/median/max {}/{}/{} rad; mean cos {}",
                    summary.tensors,
                    fixed(summary.theta_min),
                    fixed(summary.theta_median),
                    fixed(summary.theta_max),
                    summary.mean_cos.map_or("-".into(), |c| format!("{c:.6}"))
                );
                for w in &report.warnings {
                    out!("warning: {w}");
                }
            }
            Ok(())
        }
        Command::Merge {
            a,
            b,
            output,
            t,
            recipe,
            device: device_arg,
            granularity,
            mergekit,
            out_dtype,
            union,
            intersection,
            dry_run,
            report,
            base,
            tokenizer_source,
            quiet,
        } => {
            let mut config = match (&recipe, t) {
                (Some(path), _) => SlerpConfig::load(path)
                    .map_err(|e| Failure(format!("{}: {e}", path.display()), 1))?,
                (None, Some(t)) => SlerpConfig::new(t),
                (None, None) => {
                    return Err(Failure("give the factor with -t or a --recipe".into(), 2));
                }
            };
            if let Some(g) = granularity {
                config.granularity = match g {
                    GranularityArg::Tensor => Granularity::Tensor,
                    GranularityArg::Row => Granularity::Row,
                };
            }
            if mergekit {
                config.dot_threshold = Some(0.9995);
            }
            let mut options = FileMerge::new(config, device(device_arg)?);
            options.pairing = pairing_of(union, intersection);
            options.out_dtype = out_dtype_of(out_dtype);
            options.cancel = Some(cancel);
            options.base = base;
            options.tokenizer_source = tokenizer_of(tokenizer_source);
            let plan = FilePlan::merge(&a, &b, &output, &options)?;
            if dry_run {
                print(format_args!("{}", plan.summary()))?;
                return Ok(());
            }
            for w in plan.warnings() {
                note!("warning: {w}");
            }
            let started = std::time::Instant::now();
            let (progress, bar) = progress_reporter(plan.len(), quiet);
            interrupt::writing();
            let result = plan.write(progress);
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            let result = result?.report;
            if let Some(path) = report {
                std::fs::write(&path, result.to_json())
                    .map_err(|e| Failure(format!("{}: {e}", path.display()), 1))?;
            }
            if !quiet {
                for w in &result.warnings {
                    note!("warning: {w}");
                }
                note!(
                    "merged {} tensors ({} parameters) into {} in {:.2} s",
                    result.summary.tensors,
                    result.summary.params,
                    output.display(),
                    started.elapsed().as_secs_f64()
                );
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    // First of all, so that a signal at any point ends the command the same way.
    let cancel = interrupt::flag();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match run(cli, cancel) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(message, code)) => {
            if !message.is_empty() {
                let _ = writeln!(std::io::stderr(), "error: {message}");
            }
            ExitCode::from(code)
        }
    }
}
