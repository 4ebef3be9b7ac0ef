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
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use burn::config::Config;
use burn::tensor::Device;
use burn_slerp::checkpoint::{
    CheckpointError, FileMerge, FilePlan, OutDType, Pairing, Progress, TokenizerSource,
    compare_files, inspect, shapes, write_report,
};
use burn_slerp::mergekit::{plan_yaml, recipe_models, yaml_files};
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
            interrupt::exit_code()
        } else {
            1
        };
        Failure(e.to_string(), code)
    }
}

/// SIGINT (Ctrl-C), SIGTERM and SIGHUP, on every Unix. Before the output is first written
/// (while inputs are opened and checked and the merge is planned) they end the process at once
/// with exit code 128 + the signal's number: nothing exists to clean up. Once writing has begun
/// the first one stops the merge at the next block of values, which removes the partial output,
/// and further ones are ignored until that cleanup is done; the exit code is the same.
mod interrupt {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

    #[cfg(unix)]
    static FLAG: std::sync::atomic::AtomicPtr<AtomicBool> =
        std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

    /// Whether the output may have been written to.
    #[cfg(unix)]
    static WRITING: AtomicBool = AtomicBool::new(false);

    /// The first signal received (SIGINT when the cancellation came from elsewhere).
    static SIGNAL: AtomicI32 = AtomicI32::new(0);

    #[cfg(unix)]
    extern "C" fn on_signal(signal: libc::c_int) {
        let _ = SIGNAL.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
        if !WRITING.load(Ordering::SeqCst) {
            // SAFETY: `_exit` is async-signal-safe, and nothing has been written.
            unsafe { libc::_exit(128 + signal) };
        }
        let flag = FLAG.load(Ordering::SeqCst);
        if !flag.is_null() {
            // SAFETY: the pointer comes from a leaked `Arc` and is never freed.
            unsafe { (*flag).store(true, Ordering::SeqCst) };
        }
    }

    /// From now on a signal stops the merge at the next block instead of ending the process.
    pub(crate) fn writing() {
        #[cfg(unix)]
        WRITING.store(true, Ordering::SeqCst);
    }

    /// The exit code of an interrupted command: 128 + the signal's number.
    pub(crate) fn exit_code() -> u8 {
        match SIGNAL.load(Ordering::SeqCst) {
            signal @ 1..=127 => (128 + signal) as u8,
            _ => 130,
        }
    }

    /// The flag the signals set, with the handlers installed.
    pub(crate) fn flag() -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(false));
        #[cfg(unix)]
        {
            let leaked = Arc::into_raw(Arc::clone(&flag)).cast_mut();
            FLAG.store(leaked, Ordering::SeqCst);
            // SAFETY: a zeroed `sigaction` is a valid starting value; the handler only
            // touches atomics and calls `_exit`. Every handled signal is blocked while the
            // handler runs; `SA_RESTART` resumes interrupted reads and writes.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                    libc::sigaddset(&mut action.sa_mask, signal);
                }
                for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                    libc::sigaction(signal, &action, std::ptr::null_mut());
                }
            }
        }
        flag
    }
}

/// Shows Hub downloads as they happen: a bar per file (bytes) on a terminal, a line per file
/// otherwise, nothing when quiet.
fn show_downloads(quiet: bool) {
    use burn_slerp::checkpoint::hub::{DownloadEvent, set_download_progress};
    if quiet {
        return;
    }
    let terminal = std::io::stderr().is_terminal();
    let bar: std::sync::Mutex<Option<indicatif::ProgressBar>> = std::sync::Mutex::new(None);
    set_download_progress(move |event| {
        let mut bar = bar.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            DownloadEvent::Start {
                repo,
                file,
                size,
                from,
            } => {
                if terminal {
                    let shown = indicatif::ProgressBar::new(size);
                    shown.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} [{eta}]",
                        )
                        .expect("a valid template"),
                    );
                    shown.set_message(format!("{repo}/{file}"));
                    shown.set_position(from);
                    *bar = Some(shown);
                } else {
                    let resumed = if from > 0 {
                        format!(", resuming at {from}")
                    } else {
                        String::new()
                    };
                    note!("downloading {repo}/{file} ({size} bytes{resumed})");
                }
            }
            DownloadEvent::Progress { done, .. } => {
                if let Some(shown) = &*bar {
                    shown.set_position(done);
                }
            }
            DownloadEvent::Done { repo, file } => {
                if let Some(shown) = bar.take() {
                    shown.finish_and_clear();
                }
                note!("downloaded {repo}/{file}");
            }
            _ => {}
        }
    });
}

/// What comes before a merge is planned from the models named `specs`: with `--dry-run`, what
/// would be downloaded from the Hub (those neither on disk nor in the cache), printed, and
/// `true` when anything is missing (the merge cannot be planned without it); otherwise the
/// downloads' progress is shown as they happen.
fn before_planning(
    specs: impl IntoIterator<Item = String>,
    dry_run: bool,
    quiet: bool,
) -> Result<bool, Failure> {
    if !dry_run {
        show_downloads(quiet);
        return Ok(false);
    }
    let mut missing = false;
    for spec in specs {
        let Some(list) = burn_slerp::checkpoint::hub::plan_download(&spec)? else {
            continue;
        };
        missing |= !list.files.is_empty();
        out!(
            "{} at {}: {} files to download, {} bytes",
            list.repo,
            list.commit,
            list.files.len(),
            list.bytes()
        );
        for (file, size) in &list.files {
            out!("  {file}  {size} bytes");
        }
        for file in &list.cached {
            out!("  {file}  (in the cache)");
        }
    }
    if missing {
        out!("nothing was downloaded (--dry-run); the merge is planned once the files are here");
    }
    Ok(missing)
}

/// Names the temporaries of stopped runs that the merge removed before it began.
fn removed_notes(removed: &[PathBuf]) {
    for path in removed {
        let _ = writeln!(
            std::io::stderr(),
            "note: removed {}, the partial output of a run that was stopped",
            path.display()
        );
    }
}

/// A fault injected for tests through `BURN_SLERP_FAULT` (see `docs/testing.md`): after the
/// given number of tensors is written, `panic:N` panics and `pause:N:FILE` says `paused` on
/// standard error and waits until FILE exists or the command is interrupted (60 s at most).
fn injected_fault(done: usize, cancel: &std::sync::atomic::AtomicBool) {
    let Ok(fault) = std::env::var("BURN_SLERP_FAULT") else {
        return;
    };
    let mut parts = fault.splitn(3, ':');
    let (kind, after) = (parts.next(), parts.next().and_then(|n| n.parse().ok()));
    if after != Some(done) {
        return;
    }
    match kind {
        Some("panic") => panic!("fault injected after {done} tensors"),
        Some("pause") => {
            let go = parts.next().map(PathBuf::from);
            let _ = writeln!(std::io::stderr(), "paused after {done} tensors");
            let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while std::time::Instant::now() < until
                && !cancel.load(std::sync::atomic::Ordering::SeqCst)
                && !go.as_ref().is_some_and(|g| g.exists())
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        _ => {}
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
    cancel: &Arc<AtomicBool>,
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
    let cancel = Arc::clone(cancel);
    let progress = move |p: Progress<'_>| {
        injected_fault(p.done, &cancel);
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
            if before_planning(recipe_models(&recipe)?, dry_run, quiet)? {
                return Ok(());
            }
            let plan = plan_yaml(&recipe, exact)?;
            if let Some(path) = &report {
                plan.check_side_output(path, &output)?;
            }
            if dry_run {
                print(format_args!("{plan}"))?;
                return Ok(());
            }
            for w in &plan.warnings {
                note!("warning: {w}");
            }
            let started = std::time::Instant::now();
            let is_mean = plan.is_mean();
            let (progress, bar) = progress_reporter(plan.tensors.len(), quiet, &cancel);
            interrupt::writing();
            let result = yaml_files(plan, &output, device, Some(cancel), progress);
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            let written = result?;
            removed_notes(&written.removed);
            for w in &written.warnings {
                note!("warning: {w}");
            }
            let (json, done) = if is_mean {
                let stats = &written.means;
                (
                    serde_json::to_string_pretty(stats).expect("statistics serialise") + "\n",
                    format!("averaged {} tensors", stats.len()),
                )
            } else {
                let report = &written.report;
                (
                    report.to_json(),
                    format!(
                        "merged {} tensors ({} parameters)",
                        report.summary.tensors, report.summary.params
                    ),
                )
            };
            if let Some(path) = report {
                write_report(&path, json.as_bytes())?;
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
            options.cancel = Some(Arc::clone(&cancel));
            let named = inputs.iter().chain(&options.base);
            if before_planning(named.map(|p| p.display().to_string()), dry_run, quiet)? {
                return Ok(());
            }
            let plan = FilePlan::mean(&inputs, &mean, &output, &options)?;
            if let Some(path) = &report {
                plan.check_side_output(path)?;
            }
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
            let (progress, bar) = progress_reporter(plan.len(), quiet, &cancel);
            interrupt::writing();
            let result = plan.write(progress);
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            let written = result?;
            removed_notes(&written.removed);
            let stats = written.means;
            if let Some(path) = report {
                let json = serde_json::to_string_pretty(&stats).expect("statistics serialise");
                write_report(&path, (json + "\n").as_bytes())?;
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
            options.cancel = Some(Arc::clone(&cancel));
            options.base = base;
            options.tokenizer_source = tokenizer_of(tokenizer_source);
            let named = [&a, &b].into_iter().chain(&options.base);
            if before_planning(named.map(|p| p.display().to_string()), dry_run, quiet)? {
                return Ok(());
            }
            let plan = FilePlan::merge(&a, &b, &output, &options)?;
            if let Some(path) = &report {
                plan.check_side_output(path)?;
            }
            if dry_run {
                print(format_args!("{}", plan.summary()))?;
                return Ok(());
            }
            for w in plan.warnings() {
                note!("warning: {w}");
            }
            let started = std::time::Instant::now();
            let (progress, bar) = progress_reporter(plan.len(), quiet, &cancel);
            interrupt::writing();
            let result = plan.write(progress);
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            let written = result?;
            removed_notes(&written.removed);
            let result = written.report;
            if let Some(path) = report {
                write_report(&path, result.to_json().as_bytes())?;
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
    burn_slerp::checkpoint::handle_bus_errors();
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
