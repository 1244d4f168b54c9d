//! Logging: the engine reports through `tracing` (restores, damaged checkpoints, commits at
//! the end, lost peers), and the command prints it on stderr: plain lines, with warnings and
//! errors marked, or one JSON object per line (`--log-format json`) for the platform to collect.
//! `SLUICE_LOG` sets the levels, as `info` (the default), `warn`, or `sluice_engine=debug`.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;

/// How log lines look.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `warning: ...`, `error: ...`, and informational lines as they are.
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, target and the message with its fields.
    Json,
}

static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether log lines are JSON (reports on stderr then go through the log too).
pub fn json() -> bool {
    JSON.load(std::sync::atomic::Ordering::Relaxed)
}

/// Installs the logger for this process; an invalid `SLUICE_LOG` is an error naming it.
pub fn init(format: LogFormat) -> Result<(), String> {
    JSON.store(
        format == LogFormat::Json,
        std::sync::atomic::Ordering::Relaxed,
    );
    // The AMQP client logs every refused request as an error, including the probe that tells
    // a RabbitMQ stream from a queue; the connector reports real failures itself, with their
    // table and option (`SLUICE_LOG=info,lapin=debug` shows the client's own lines).
    let levels = std::env::var("SLUICE_LOG").unwrap_or_else(|_| "info,lapin=off".into());
    let filter: Targets = levels
        .parse()
        .map_err(|e| format!("SLUICE_LOG='{levels}': {e}"))?;
    let layer = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(|| Redacting(std::io::stderr()))
            .event_format(Plain)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(|| Redacting(std::io::stderr()))
            .json()
            .flatten_event(true)
            .boxed(),
    };
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .try_init();
    installed.map_err(|e| format!("cannot install the logger: {e}"))
}

/// Stderr with the secrets the process hides ([`sluice_common::secrets::hide`]) replaced: the
/// logger writes each line whole, so a secret is never split between writes.
struct Redacting(std::io::Stderr);

impl std::io::Write for Redacting {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let shown = sluice_common::secrets::redacted(&text);
        self.0.write_all(shown.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Plain lines: the message and its fields, after `error: ` or `warning: ` for those levels.
struct Plain;

impl<S, N> FormatEvent<S, N> for Plain
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        match *event.metadata().level() {
            Level::ERROR => write!(writer, "error: ")?,
            Level::WARN => write!(writer, "warning: ")?,
            Level::INFO => {}
            Level::DEBUG => write!(writer, "debug: ")?,
            Level::TRACE => write!(writer, "trace: ")?,
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}
