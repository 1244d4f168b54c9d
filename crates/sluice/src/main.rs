//! The `sluice` command: run streaming SQL scripts, and the Double-11 demo.

mod bench;
mod demo;
mod latency;
mod table_output;

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
}

#[derive(Subcommand)]
enum Command {
    /// Run a script of SQL statements (SET, CREATE TABLE/VIEW, INSERT INTO, SELECT) as one job.
    Run {
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
    },
    /// Measure throughput on the built-in generators (use a release build): the engine-core
    /// scenarios, `sluice bench nexmark` for the Nexmark queries, `sluice bench latency`.
    Bench {
        /// `core` (default), `nexmark`, or `latency` (end-to-end latency of Nexmark q1 and q3
        /// at half of their measured capacity, 10 s per setting, batches of 1024 and 8192 rows).
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
    },
    /// Run the Double-11 sales dashboard on built-in generated orders.
    Demo {
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        seconds: Option<u64>,
        /// Worker threads.
        #[arg(long, default_value_t = 2)]
        workers: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            file,
            workers,
            processes,
            process_id,
            hosts,
            fresh,
            from_checkpoint,
        } => run(
            file,
            workers,
            processes,
            process_id,
            hosts,
            fresh,
            from_checkpoint,
        ),
        Command::Demo { seconds, workers } => demo::run(seconds, workers),
        Command::Bench { suite, workers, .. } if suite == "latency" => {
            latency::run(&workers, 0.5, 10.0, &[1024, 8192])
        }
        Command::Bench {
            suite,
            events,
            workers,
            runs,
            only,
            json,
            baseline,
        } => bench::run(&suite, events, &workers, runs, only, json, baseline),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(
    file: PathBuf,
    workers: usize,
    processes: usize,
    process_id: usize,
    hosts: Option<PathBuf>,
    fresh: bool,
    from_checkpoint: Option<String>,
) -> Result<(), String> {
    let sql = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    let mut plan = sluice_sql::plan_script(&sql).map_err(|e| format!("{}: {e}", file.display()))?;
    for warning in &plan.warnings {
        eprintln!("warning: {}: {warning}", file.display());
    }
    if let Some(path) = from_checkpoint {
        plan.settings
            .insert("execution.state-recovery.path".into(), path);
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
            if process_id >= processes {
                return Err(format!(
                    "--process-id {process_id} must be below --processes {processes}"
                ));
            }
            Some(list)
        }
    };
    let printer = Arc::new(table_output::TablePrinter::default());
    let metrics = sluice_engine::JobMetrics::new();
    // Ctrl-C stops the job gracefully: sources stop, sinks publish, the summary is printed.
    let on_interrupt = metrics.clone();
    let _ = ctrlc::set_handler(move || {
        eprintln!("\nstopping (Ctrl-C again to abort)...");
        if on_interrupt.is_cancelled() {
            std::process::exit(130);
        }
        on_interrupt.cancel();
    });
    let options = JobOptions {
        workers,
        process: process_id,
        hosts,
        select_output: Some(printer.clone()),
        metrics,
        fresh,
        sequential_sources: false,
    };
    let summary = sluice_engine::run(plan, options).map_err(|e| e.to_string())?;
    printer.finish();
    print_summary(&summary);
    Ok(())
}

fn print_summary(s: &JobSummary) {
    let secs = s.elapsed.as_secs_f64();
    eprintln!("---- job finished in {secs:.3} s");
    for (table, n) in &s.rows_read {
        eprintln!("rows read     {table:<24} {n}");
    }
    for (sink, n) in &s.rows_written {
        eprintln!("rows written  {sink:<24} {n}");
    }
    eprintln!("late rows dropped           {}", s.late_rows_dropped);
    if s.null_time_rows_dropped > 0 {
        eprintln!(
            "rows without event time     {} (dropped by windows, as in Flink)",
            s.null_time_rows_dropped
        );
    }
    eprintln!("records skipped             {}", s.records_skipped);
    if s.checkpoints > 0 {
        eprintln!(
            "checkpoints committed       {} (last {} bytes; snapshots took {} ms of worker time in all)",
            s.checkpoints, s.checkpoint_bytes, s.snapshot_ms
        );
    }
    if s.state_groups > 0 {
        eprintln!(
            "state at end of input       {} groups, {} bytes",
            s.state_groups, s.state_bytes
        );
    }
    let total = s.total_read();
    if secs > 0.0 {
        eprintln!(
            "throughput                  {:.0} rows/s",
            total as f64 / secs
        );
    }
}
