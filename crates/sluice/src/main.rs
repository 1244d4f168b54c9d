//! The `sluice` command: run streaming SQL scripts, and the Double-11 demo.

mod bench;
mod demo;
mod latency;
mod logging;
mod progress;
mod table_output;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use sluice_engine::{JobOptions, JobSummary};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Streaming SQL: Flink-compatible SQL compiled to incremental dataflows"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How log lines on stderr look: `text`, or `json` (one object per line, for collectors).
    /// `SLUICE_LOG` sets the levels (`info` by default).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: logging::LogFormat,
}

/// `sluice run`.
#[derive(clap::Args)]
struct RunArgs {
    /// The SQL script.
    file: PathBuf,
    /// Worker threads in this process.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Number of processes in the cluster (each runs the same command).
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// This process's index, 0-based.
    #[arg(long, default_value_t = 0)]
    process_id: usize,
    /// A file with one host:port per line, one line per process.
    #[arg(long)]
    hosts: Option<PathBuf>,
    /// Ignore existing checkpoints and start from the beginning of the input.
    #[arg(long)]
    fresh: bool,
    /// Restore this checkpoint (a `chk-...` folder in the checkpoint directory) instead of
    /// the newest one.
    #[arg(long)]
    from_checkpoint: Option<String>,
    /// The status line while the job runs: `auto` redraws it on a terminal and logs it every
    /// 10 s elsewhere, `always` shows it every second, `never` prints nothing until the end.
    #[arg(long, value_enum, default_value = "auto")]
    progress: progress::Mode,
}

#[derive(Subcommand)]
enum Command {
    /// Run a script of SQL statements (SET, CREATE TABLE/VIEW, INSERT INTO, SELECT) as one job.
    Run(RunArgs),
    /// Print the streaming plan of a script without running it: every node with its changelog,
    /// partitioning, state and the physical decisions that apply (as `EXPLAIN` in a script).
    Explain {
        /// The SQL script.
        file: PathBuf,
    },
    /// Measure throughput on the built-in generators (use a release build): the engine-core
    /// scenarios, `sluice bench nexmark` for the Nexmark queries, `sluice bench latency`.
    Bench {
        /// `core` (default), `nexmark`, `latency` (end-to-end latency of Nexmark q1 and q3
        /// at half of their measured capacity, 10 s per setting, batches of 1024 and 8192 rows),
        /// or `kafka-latency` (produce-to-sink latency through a Kafka topic, `--kafka`).
        #[arg(default_value = "core")]
        suite: String,
        /// Events per run.
        #[arg(long, default_value_t = 10_000_000)]
        events: u64,
        /// Worker counts to measure, comma-separated.
        #[arg(long, default_value = "1,2", value_delimiter = ',')]
        workers: Vec<usize>,
        /// Runs per measurement; the median is reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Only these benchmarks, comma-separated.
        #[arg(long)]
        only: Option<String>,
        /// Also write one JSON line per result to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Compare with the JSON lines of an earlier run: flag results more than 10% slower.
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// `kafka-latency`: the brokers, and a fresh topic to produce into and read back.
        #[arg(long)]
        kafka: Option<String>,
        #[arg(long, default_value = "sluice-latency")]
        topic: String,
        /// `kafka-latency`: events per second, and for how long.
        #[arg(long, default_value_t = 100_000.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
    /// Run one pipeline of `sluice serve` (the server starts it; not meant to be run by hand).
    #[command(hide = true)]
    Worker(worker::WorkerArgs),
    /// Start the platform server: tenants, pipelines and materialized views, over the
    /// Postgres wire protocol and REST.
    Serve(sluice_server::ServeArgs),
    /// Run the Double-11 sales dashboard on built-in generated orders.
    Demo {
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        seconds: Option<u64>,
        /// Worker threads.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Show the live big screen in the browser instead: starts the platform server with the
        /// demo (as `sluice serve --demo`) and prints the screen's address.
        #[arg(long)]
        web: bool,
        /// With --web: the HTTP port.
        #[arg(long, default_value_t = 8080)]
        http_port: u16,
        /// With --web: the Postgres wire port.
        #[arg(long, default_value_t = 5433)]
        pg_port: u16,
        /// With --web: where the server keeps its data.
        #[arg(long, default_value = "./sluice-demo-data")]
        data_dir: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = logging::init(cli.log_format) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Run(args) => match run(args) {
            // Stopped by a signal before the input ended: 128 + the signal, as shells report.
            Ok(Some(signal)) => return ExitCode::from(128 + signal as u8),
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        },
        Command::Worker(args) => match worker::run(args) {
            Ok(Some(signal)) => return ExitCode::from(128 + signal as u8),
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        },
        Command::Serve(args) => sluice_server::serve(args),
        Command::Demo {
            web: true,
            http_port,
            pg_port,
            data_dir,
            ..
        } => sluice_server::serve(sluice_server::ServeArgs {
            data_dir,
            listen: "127.0.0.1".into(),
            pg_port,
            http_port,
            max_parallelism: None,
            tls_cert: None,
            tls_key: None,
            require_tls: false,
            catalog: None,
            lease_seconds: 10,
            demo: true,
        }),
        Command::Demo {
            seconds, workers, ..
        } => demo::run(seconds, workers),
        Command::Explain { file } => explain(file),
        Command::Bench { suite, workers, .. } if suite == "latency" => {
            latency::run(&workers, 0.5, 10.0, &[1024, 8192])
        }
        Command::Bench {
            suite,
            workers,
            kafka,
            topic,
            rate,
            seconds,
            ..
        } if suite == "kafka-latency" => match kafka {
            None => Err("'sluice bench kafka-latency' needs --kafka <brokers>".to_string()),
            Some(servers) => workers.iter().try_for_each(|w| {
                latency::run_kafka(&servers, &format!("{topic}-{w}"), rate, seconds, *w)
            }),
        },
        Command::Bench {
            suite,
            events,
            workers,
            runs,
            only,
            json,
            baseline,
            ..
        } => bench::run(&suite, events, &workers, runs, only, json, baseline),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!("{message}");
            ExitCode::FAILURE
        }
    }
}

/// `sluice explain FILE`: the plan of every INSERT and SELECT of the script.
fn explain(file: PathBuf) -> Result<(), String> {
    let sql = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    let plan = sluice_sql::plan_script(&sql).map_err(|e| format!("{}: {e}", file.display()))?;
    for warning in &plan.warnings {
        tracing::warn!("{}: {warning}", file.display());
    }
    let mut all = plan.explained.clone();
    all.extend(plan.pipelines.iter().cloned());
    if all.is_empty() {
        return Err(format!(
            "{}: the script has no INSERT INTO or SELECT statement to explain",
            file.display()
        ));
    }
    print!("{}", sluice_sql::plan::explain::explain_pipelines(&all));
    Ok(())
}

fn run(
    RunArgs {
        file,
        workers,
        processes,
        process_id,
        hosts,
        fresh,
        from_checkpoint,
        progress,
    }: RunArgs,
) -> Result<Option<i32>, String> {
    check_cluster_size(workers, processes, process_id)?;
    if fresh && from_checkpoint.is_some() {
        return Err(
            "--fresh starts over and --from-checkpoint restores a checkpoint: give one of them"
                .into(),
        );
    }
    let sql = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    sluice_common::secrets::hide(sluice_common::secrets::secret_values(&sql));
    let mut plan = sluice_sql::plan_script(&sql).map_err(|e| format!("{}: {e}", file.display()))?;
    for warning in &plan.warnings {
        tracing::warn!("{}: {warning}", file.display());
    }
    if let Some(path) = from_checkpoint {
        plan.settings
            .insert("execution.state-recovery.path".into(), path);
    }
    if !plan.explained.is_empty() {
        print!(
            "{}",
            sluice_sql::plan::explain::explain_pipelines(&plan.explained)
        );
        if plan.pipelines.is_empty() {
            return Ok(None);
        }
    }
    if plan.pipelines.is_empty() {
        return Err(format!(
            "{}: the script has no INSERT INTO or SELECT statement to run",
            file.display()
        ));
    }
    let hosts = match hosts {
        None if processes > 1 => {
            return Err("--processes > 1 needs --hosts FILE (one host:port per line)".into())
        }
        None => None,
        Some(path) => {
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let list: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from)
                .collect();
            if list.len() != processes {
                return Err(format!(
                    "{}: lists {} hosts but --processes is {processes}",
                    path.display(),
                    list.len()
                ));
            }
            Some(list)
        }
    };
    let printer = Arc::new(table_output::TablePrinter::default());
    let metrics = sluice_engine::JobMetrics::new();
    let checkpointing = plan
        .settings
        .contains_key("execution.checkpointing.interval");
    let control = sluice_engine::JobControl::new();
    let stopped_by = stop_on_signals(control.clone(), checkpointing)?;
    let options = JobOptions {
        workers,
        process: process_id,
        hosts,
        select_output: Some(printer.clone()),
        metrics,
        control,
        fresh,
        sequential_sources: false,
        operator_busy: false,
        count_rows: false,
    };
    let status = progress::Progress::start(progress, options.metrics.clone());
    let analyzed: Vec<sluice_sql::Pipeline> = plan
        .pipelines
        .iter()
        .filter(|p| p.analyze)
        .cloned()
        .collect();
    let job_metrics = options.metrics.clone();
    let summary = sluice_engine::run(plan, options);
    drop(status);
    let summary = summary.map_err(|e| e.to_string())?;
    printer.finish();
    if !analyzed.is_empty() {
        print!(
            "{}",
            sluice_sql::plan::explain::explain_analyzed(&analyzed, &job_metrics.node_rows())
        );
        let _ = std::io::Write::flush(&mut std::io::stdout());
    }
    print_summary(&summary);
    let signal = stopped_by.load(std::sync::atomic::Ordering::SeqCst);
    if signal == 0 {
        return Ok(None);
    }
    eprintln!(
        "stopped by {} before the input ended: {}",
        signal_name(signal),
        if checkpointing {
            "the final checkpoint holds where it stopped; run the same command to continue"
        } else {
            "output not published (without checkpoints, 'sink.publish-on-stop' = 'true' publishes it)"
        }
    );
    Ok(Some(signal))
}

/// Most worker threads a process may run, and most processes in a cluster.
const MAX_WORKERS: usize = 512;
const MAX_PROCESSES: usize = 256;

fn check_cluster_size(workers: usize, processes: usize, process_id: usize) -> Result<(), String> {
    if workers == 0 || workers > MAX_WORKERS {
        return Err(format!(
            "--workers {workers}: give between 1 and {MAX_WORKERS} worker threads per process (this machine has {} cores)",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ));
    }
    if processes == 0 || processes > MAX_PROCESSES {
        return Err(format!(
            "--processes {processes}: give between 1 and {MAX_PROCESSES} processes"
        ));
    }
    if process_id >= processes {
        return Err(format!(
            "--process-id {process_id} must be below --processes {processes}"
        ));
    }
    Ok(())
}

/// How long a stopping job may take before it is ended: with checkpoints, time for the final
/// one; without, time for the sinks to close.
const STOP_GRACE_WITH_CHECKPOINTS: std::time::Duration = std::time::Duration::from_secs(60);
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// SIGINT (Ctrl-C) and SIGTERM stop the job gracefully: sources stop, a final checkpoint is
/// taken where checkpoints are on, the summary is printed. A job that has not stopped within
/// the grace period, or a second signal, ends the process at once. Returns where the signal
/// that stopped the job is recorded (0: none).
fn stop_on_signals(
    control: Arc<sluice_engine::JobControl>,
    checkpointing: bool,
) -> Result<Arc<std::sync::atomic::AtomicI32>, String> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    use std::sync::atomic::Ordering;
    let stopped_by = Arc::new(std::sync::atomic::AtomicI32::new(0));
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| format!("could not install the signal handlers: {e}"))?;
    let record = stopped_by.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if record.swap(signal, Ordering::SeqCst) != 0 {
                    eprintln!("\n{}: aborting", signal_name(signal));
                    std::process::exit(128 + signal);
                }
                let grace = if checkpointing {
                    STOP_GRACE_WITH_CHECKPOINTS
                } else {
                    STOP_GRACE
                };
                eprintln!(
                    "\n{}: stopping (again to abort; ended anyway in {} s)...",
                    signal_name(signal),
                    grace.as_secs()
                );
                control.cancel();
                let _ = std::thread::Builder::new()
                    .name("stop-deadline".into())
                    .spawn(move || {
                        std::thread::sleep(grace);
                        eprintln!(
                            "error: the job did not stop within {} s of {}: ended",
                            grace.as_secs(),
                            signal_name(signal)
                        );
                        std::process::exit(128 + signal);
                    });
            }
        })
        .map_err(|e| format!("could not start the signal thread: {e}"))?;
    Ok(stopped_by)
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        signal_hook::consts::SIGINT => "SIGINT",
        signal_hook::consts::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// The run summary on stderr; with `--log-format json`, one log object per line, so that
/// everything on stderr parses.
fn print_summary(s: &JobSummary) {
    let mut lines: Vec<String> = vec![];
    let secs = s.elapsed.as_secs_f64();
    lines.push(format!("---- job finished in {secs:.3} s"));
    for (table, n) in &s.rows_read {
        lines.push(format!("rows read     {table:<24} {n}"));
    }
    for (sink, n) in &s.rows_written {
        lines.push(format!("rows written  {sink:<24} {n}"));
    }
    lines.push(format!(
        "late rows dropped           {}",
        s.late_rows_dropped
    ));
    if s.null_time_rows_dropped > 0 {
        lines.push(format!(
            "rows without event time     {} (dropped by windows, as in Flink)",
            s.null_time_rows_dropped
        ));
    }
    lines.push(format!("records skipped             {}", s.records_skipped));
    if s.checkpoints > 0 {
        lines.push(format!(
            "checkpoints committed       {} (last {} bytes; snapshots took {} ms of worker time in all)",
            s.checkpoints, s.checkpoint_bytes, s.snapshot_ms
        ));
    }
    if s.state_groups > 0 {
        lines.push(format!(
            "state at end of input       {} groups, {} bytes",
            s.state_groups, s.state_bytes
        ));
    }
    let total = s.total_read();
    if secs > 0.0 {
        lines.push(format!(
            "throughput                  {:.0} rows/s",
            total as f64 / secs
        ));
    }
    for line in lines {
        if logging::json() {
            tracing::info!(target: "sluice::summary", "{line}");
        } else {
            eprintln!("{line}");
        }
    }
}
