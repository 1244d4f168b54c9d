//! Every `SET 'key' = 'value'` option Sluice knows, declared once with its type, default and
//! doc. An unknown key is an error naming it (with the closest known key); Flink's well-known
//! keys that Sluice does not implement are accepted with a warning, so Flink scripts still run.

use std::collections::BTreeMap;
use std::time::Duration;

use sluice_common::{Error, Result};

/// The type of an option's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `'1 s'`, `'500 ms'`, `'10 min'`.
    Duration,
    Bool,
    /// A whole number of at least 1.
    Count,
    /// A whole number of at least 0.
    Number,
    Text,
}

/// One option.
pub struct Setting {
    pub key: &'static str,
    pub kind: Kind,
    /// The value used when the option is not set, as text (`None`: off or required elsewhere).
    pub default: Option<&'static str>,
    pub doc: &'static str,
}

/// The options Sluice implements.
pub const SETTINGS: &[Setting] = &[
    Setting {
        key: "sluice.epoch-length",
        kind: Kind::Duration,
        default: Some("50 ms"),
        doc: "processing time per epoch: the granularity of progress tracking and checkpoints",
    },
    Setting {
        key: "sluice.memory.limit",
        kind: Kind::Text,
        default: Some("80% of the machine's memory"),
        doc: "the most memory the job may use (resident, as '4gb'): past it the job fails, naming the operator with the largest state and where the most rows wait in flight, instead of the system killing it",
    },
    Setting {
        key: "table.exec.mini-batch.size",
        kind: Kind::Count,
        default: Some("8192"),
        doc: "rows per source batch; 1 gives every input row its own changes",
    },
    Setting {
        key: "table.exec.state.ttl",
        kind: Kind::Duration,
        default: None,
        doc: "regular joins drop rows not written for this long (processing time)",
    },
    Setting {
        key: "table.exec.emit.early-fire.enabled",
        kind: Kind::Bool,
        default: Some("false"),
        doc: "emit partial window results every early-fire delay",
    },
    Setting {
        key: "table.exec.emit.early-fire.delay",
        kind: Kind::Duration,
        default: None,
        doc: "how often early firing emits",
    },
    Setting {
        key: "table.exec.emit.allow-lateness",
        kind: Kind::Duration,
        default: None,
        doc: "keep fired windows this long (event time) so late rows update them",
    },
    Setting {
        key: "execution.checkpointing.interval",
        kind: Kind::Duration,
        default: None,
        doc: "take a checkpoint this often (off when unset)",
    },
    Setting {
        key: "execution.checkpointing.dir",
        kind: Kind::Text,
        default: None,
        doc: "where checkpoints go: a directory or an s3:// URL",
    },
    Setting {
        key: "execution.checkpointing.num-retained",
        kind: Kind::Count,
        default: Some("1"),
        doc: "completed checkpoints kept",
    },
    Setting {
        key: "execution.checkpointing.tolerable-failed-checkpoints",
        kind: Kind::Number,
        default: Some("3"),
        doc: "consecutive failed checkpoints before the job fails",
    },
    Setting {
        key: "execution.checkpointing.snapshot-compression",
        kind: Kind::Bool,
        default: Some("false"),
        doc: "LZ4-compress state snapshots",
    },
    Setting {
        key: "execution.state-recovery.path",
        kind: Kind::Text,
        default: None,
        doc: "restore this checkpoint at start",
    },
    Setting {
        key: "sluice.state-recovery.allow-changed-sources",
        kind: Kind::Bool,
        default: Some("false"),
        doc: "restore a checkpoint although a source's identity (path, topic, seed) changed since: its offsets then apply to the new input (as Flink's allowNonRestoredState, a deliberate override)",
    },
    Setting {
        key: "s3.endpoint",
        kind: Kind::Text,
        default: None,
        doc: "S3-compatible endpoint for checkpoints",
    },
    Setting {
        key: "s3.access-key",
        kind: Kind::Text,
        default: None,
        doc: "S3 access key",
    },
    Setting {
        key: "s3.secret-key",
        kind: Kind::Text,
        default: None,
        doc: "S3 secret key",
    },
    Setting {
        key: "s3.region",
        kind: Kind::Text,
        default: None,
        doc: "S3 region",
    },
    Setting {
        key: "s3.path.style.access",
        kind: Kind::Bool,
        default: Some("false"),
        doc: "path-style S3 requests",
    },
    Setting {
        key: "s3.allow-http",
        kind: Kind::Bool,
        default: Some("false"),
        doc: "allow plain HTTP to the S3 endpoint",
    },
];

/// Flink options Sluice accepts without acting on them, each with what Sluice does instead.
pub const FLINK_ONLY: &[(&str, &str)] = &[
    ("parallelism.default", "use --workers and --processes"),
    (
        "table.exec.resource.default-parallelism",
        "use --workers and --processes",
    ),
    ("pipeline.name", "jobs are named by their script"),
    (
        "execution.runtime-mode",
        "Sluice runs every job as a stream; bounded inputs end it",
    ),
    (
        "table.exec.mini-batch.enabled",
        "Sluice always processes batches (see 'table.exec.mini-batch.size')",
    ),
    (
        "table.exec.mini-batch.allow-latency",
        "rows never wait for a batch to fill",
    ),
    (
        "table.optimizer.agg-phase-strategy",
        "aggregation is planned by Sluice",
    ),
    (
        "table.optimizer.distinct-agg.split.enabled",
        "DISTINCT aggregates share state by Sluice's own plan",
    ),
    (
        "table.optimizer.reuse-sub-plan-enabled",
        "shared sub-plans are always reused",
    ),
    (
        "table.optimizer.reuse-source-enabled",
        "scans of one table always share a reader",
    ),
    (
        "table.exec.source.idle-timeout",
        "set 'scan.watermark.idle-timeout' on the table",
    ),
    ("table.exec.sink.not-null-enforcer", "not enforced"),
    (
        "table.exec.sink.upsert-materialize",
        "not needed: sinks receive the exact changelog",
    ),
    ("table.local-time-zone", "timestamps are UTC"),
    (
        "table.dynamic-table-options.enabled",
        "table hints (`/*+ OPTIONS(...) */`) are not supported yet: a script with one is an error at the hint",
    ),
    ("table.exec.state.ttl.enabled", "set 'table.exec.state.ttl'"),
    (
        "execution.checkpointing.mode",
        "checkpoints are always exactly-once",
    ),
    ("execution.checkpointing.timeout", "not enforced"),
    ("execution.checkpointing.min-pause", "not enforced"),
    (
        "execution.checkpointing.max-concurrent-checkpoints",
        "one checkpoint at a time",
    ),
    (
        "execution.checkpointing.externalized-checkpoint-retention",
        "retained checkpoints are kept ('execution.checkpointing.num-retained')",
    ),
    (
        "state.backend.type",
        "state is in memory, checkpointed to 'execution.checkpointing.dir'",
    ),
    (
        "state.backend.incremental",
        "checkpoints are incremental where state allows",
    ),
    ("state.checkpoints.dir", "set 'execution.checkpointing.dir'"),
    (
        "pipeline.auto-watermark-interval",
        "watermarks follow every batch",
    ),
    (
        "sql-client.execution.result-mode",
        "SELECT prints its changelog",
    ),
    ("sql-client.verbose", "not used"),
    (
        "restart-strategy.type",
        "a failed job exits; run it again to restore from its checkpoint",
    ),
];

/// Checks one `SET`: a known option with a valid value passes (`None`), a Flink-only option
/// passes with a warning, anything else is an error naming the key.
pub fn check(key: &str, value: &str) -> Result<Option<String>> {
    if let Some(s) = SETTINGS.iter().find(|s| s.key == key) {
        let ok = match s.kind {
            Kind::Duration => {
                sluice_common::time::parse_duration_ms(value).is_some_and(|ms| ms >= 0)
            }
            Kind::Bool => matches!(value.trim().to_ascii_lowercase().as_str(), "true" | "false"),
            Kind::Count => value.trim().parse::<u64>().is_ok_and(|n| n >= 1),
            Kind::Number => value.trim().parse::<u64>().is_ok(),
            Kind::Text => true,
        };
        if !ok {
            let wanted = match s.kind {
                Kind::Duration => "a duration such as '1 s' or '500 ms'",
                Kind::Bool => "'true' or 'false'",
                Kind::Count => "a whole number of at least 1",
                Kind::Number => "a whole number",
                Kind::Text => "text",
            };
            return Err(Error::plan(format!(
                "SET '{key}' = '{value}': the value must be {wanted}"
            )));
        }
        return Ok(None);
    }
    if let Some((_, instead)) = FLINK_ONLY.iter().find(|(k, _)| *k == key) {
        return Ok(Some(format!(
            "SET '{key}' is a Flink option Sluice does not act on ({instead})"
        )));
    }
    let known = SETTINGS
        .iter()
        .map(|s| s.key)
        .chain(FLINK_ONLY.iter().map(|(k, _)| *k));
    let hint = sluice_common::text::closest(key, known)
        .map(|k| format!("; did you mean '{k}'?"))
        .unwrap_or_default();
    Err(Error::plan(format!(
        "SET '{key}': unknown option{hint} (the options are listed in docs/configuration.md)"
    )))
}

/// A job's options, typed: parsed once from its `SET`s, where the engine and the command read
/// them. Each value was checked against [`SETTINGS`] when it was set; parsing checks the
/// combinations (an interval without a directory) and keys set past the planner.
#[derive(Clone, Debug, PartialEq)]
pub struct JobConfig {
    /// `sluice.epoch-length`.
    pub epoch_length: Duration,
    /// `sluice.memory.limit` in bytes; `None`: 80% of the machine's memory.
    pub memory_limit: Option<u64>,
    /// `table.exec.mini-batch.size`: rows per source batch.
    pub batch_rows: usize,
    /// `table.exec.state.ttl` (`None` when unset or 0).
    pub state_ttl: Option<Duration>,
    /// `execution.checkpointing.*`: `None` when checkpointing is off.
    pub checkpoint: Option<CheckpointOptions>,
    /// `sluice.state-recovery.allow-changed-sources`.
    pub allow_changed_sources: bool,
}

/// `execution.checkpointing.*` and `execution.state-recovery.path`.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointOptions {
    pub interval: Duration,
    /// A directory or an `s3://` URL.
    pub dir: String,
    pub retained: usize,
    /// Consecutive failed checkpoints tolerated before the job fails.
    pub tolerable_failures: usize,
    /// LZ4-compress state snapshots.
    pub compression: bool,
    /// Restore this checkpoint at start.
    pub recovery_path: Option<String>,
}

/// Rows per source batch unless `table.exec.mini-batch.size` says otherwise.
pub const DEFAULT_BATCH_ROWS: usize = 8192;
/// Processing time per epoch unless `sluice.epoch-length` says otherwise.
pub const DEFAULT_EPOCH: Duration = Duration::from_millis(50);

/// Typed reads of `SET` values, with errors that name the key and the value.
struct Reader<'a>(&'a BTreeMap<String, String>);

impl Reader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.trim())
    }

    fn wrong(key: &str, v: &str, wanted: &str) -> Error {
        Error::plan(format!("'{key}' = '{v}' must be {wanted}"))
    }

    fn duration(&self, key: &str) -> Result<Option<Duration>> {
        self.get(key)
            .map(|v| {
                sluice_common::time::parse_duration_ms(v)
                    .filter(|ms| *ms >= 0)
                    .map(|ms| Duration::from_millis(ms as u64))
                    .ok_or_else(|| Self::wrong(key, v, "a duration such as '1 s' or '500 ms'"))
            })
            .transpose()
    }

    fn number(&self, key: &str, least: u64) -> Result<Option<u64>> {
        self.get(key)
            .map(|v| {
                v.parse::<u64>()
                    .ok()
                    .filter(|n| *n >= least)
                    .ok_or_else(|| {
                        Self::wrong(key, v, &format!("a whole number of at least {least}"))
                    })
            })
            .transpose()
    }

    fn flag(&self, key: &str) -> Result<bool> {
        match self.get(key).map(|v| v.to_ascii_lowercase()) {
            None => Ok(false),
            Some(v) if v == "true" => Ok(true),
            Some(v) if v == "false" => Ok(false),
            Some(v) => Err(Self::wrong(key, &v, "'true' or 'false'")),
        }
    }
}

/// `table.exec.emit.*`: how the windows of a statement emit, from the settings in force where
/// the statement is planned.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EmitOptions {
    /// `table.exec.emit.early-fire.delay`, when early firing is enabled.
    pub early_fire: Option<Duration>,
    /// `table.exec.emit.allow-lateness`.
    pub allow_lateness: Duration,
}

impl EmitOptions {
    pub fn parse(settings: &BTreeMap<String, String>) -> Result<EmitOptions> {
        let r = Reader(settings);
        let early_fire = if r.flag("table.exec.emit.early-fire.enabled")? {
            let delay = r.duration("table.exec.emit.early-fire.delay")?.ok_or_else(|| {
                Error::plan("'table.exec.emit.early-fire.enabled' is true but 'table.exec.emit.early-fire.delay' is not set (for example '1 s')")
            })?;
            if delay.is_zero() {
                return Err(Error::plan(
                    "'table.exec.emit.early-fire.delay' must be positive",
                ));
            }
            Some(delay)
        } else {
            None
        };
        Ok(EmitOptions {
            early_fire,
            allow_lateness: r
                .duration("table.exec.emit.allow-lateness")?
                .unwrap_or_default(),
        })
    }
}

impl JobConfig {
    /// Parses `settings` (the script's `SET`s, as text). An unknown key, or a value of the
    /// wrong type, is an error naming the key.
    pub fn parse(settings: &BTreeMap<String, String>) -> Result<JobConfig> {
        for (key, value) in settings {
            check(key, value)?;
        }
        let r = Reader(settings);
        let epoch_length = r.duration("sluice.epoch-length")?.unwrap_or(DEFAULT_EPOCH);
        if !(Duration::from_millis(1)..=Duration::from_secs(10)).contains(&epoch_length) {
            return Err(Error::plan(format!(
                "'sluice.epoch-length' = '{}' must be a duration between 1 ms and 10 s",
                r.get("sluice.epoch-length").unwrap_or_default()
            )));
        }
        let memory_limit = r
            .get("sluice.memory.limit")
            .map(|v| {
                sluice_common::text::memory_size(v)
                    .filter(|n| *n > 0)
                    .ok_or_else(|| {
                        Error::plan(format!(
                            "'sluice.memory.limit' = '{v}' is not a size such as '4gb' or '512mb'"
                        ))
                    })
            })
            .transpose()?;
        let checkpoint = match r.duration("execution.checkpointing.interval")? {
            None if r.get("execution.checkpointing.dir").is_some() => {
                return Err(Error::plan("'execution.checkpointing.dir' is set but 'execution.checkpointing.interval' is not (for example '1 s')"));
            }
            None => None,
            Some(interval) => {
                if interval.is_zero() {
                    return Err(Reader::wrong(
                        "execution.checkpointing.interval",
                        r.get("execution.checkpointing.interval")
                            .unwrap_or_default(),
                        "a positive duration such as '1 s'",
                    ));
                }
                let dir = r.get("execution.checkpointing.dir").ok_or_else(|| {
                    Error::plan("'execution.checkpointing.interval' is set but 'execution.checkpointing.dir' is not: say where checkpoints go")
                })?;
                Some(CheckpointOptions {
                    interval,
                    dir: dir.to_string(),
                    retained: r
                        .number("execution.checkpointing.num-retained", 1)?
                        .unwrap_or(1) as usize,
                    tolerable_failures: r
                        .number("execution.checkpointing.tolerable-failed-checkpoints", 0)?
                        .unwrap_or(3) as usize,
                    compression: r.flag("execution.checkpointing.snapshot-compression")?,
                    recovery_path: r.get("execution.state-recovery.path").map(str::to_string),
                })
            }
        };
        Ok(JobConfig {
            epoch_length,
            memory_limit,
            batch_rows: r
                .number("table.exec.mini-batch.size", 1)?
                .map_or(DEFAULT_BATCH_ROWS, |n| n as usize),
            state_ttl: r.duration("table.exec.state.ttl")?.filter(|d| !d.is_zero()),
            checkpoint,
            allow_changed_sources: r.flag("sluice.state-recovery.allow-changed-sources")?,
        })
    }
}

/// The table of `docs/configuration.md` that lists the options, generated from [`SETTINGS`]
/// (a test keeps the file equal to it).
pub fn options_markdown() -> String {
    let kind = |k: Kind| match k {
        Kind::Duration => "duration",
        Kind::Bool => "bool",
        Kind::Count => "count",
        Kind::Number => "number",
        Kind::Text => "text",
    };
    let mut md = String::from("| option | type | default | what it does |\n|---|---|---|---|\n");
    for s in SETTINGS {
        let default = s.default.map_or("—".to_string(), |d| format!("`{d}`"));
        md.push_str(&format!(
            "| `{}` | {} | {default} | {} |\n",
            s.key,
            kind(s.kind),
            s.doc
        ));
    }
    md
}

/// The table of `docs/configuration.md` that lists [`FLINK_ONLY`].
pub fn flink_only_markdown() -> String {
    let mut md = String::from("| Flink option | what Sluice does instead |\n|---|---|\n");
    for (key, instead) in FLINK_ONLY {
        md.push_str(&format!("| `{key}` | {instead} |\n"));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::{check, EmitOptions, JobConfig};

    fn parse(pairs: &[(&str, &str)]) -> sluice_common::Result<JobConfig> {
        JobConfig::parse(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn emit_options_need_a_delay_when_early_firing_is_on() {
        let emit = |pairs: &[(&str, &str)]| {
            EmitOptions::parse(
                &pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        assert_eq!(emit(&[]).unwrap(), EmitOptions::default());
        let on = emit(&[
            ("table.exec.emit.early-fire.enabled", "TRUE"),
            ("table.exec.emit.early-fire.delay", "2 s"),
            ("table.exec.emit.allow-lateness", "1 min"),
        ])
        .unwrap();
        assert_eq!(on.early_fire.unwrap().as_millis(), 2_000);
        assert_eq!(on.allow_lateness.as_secs(), 60);
        let off = emit(&[("table.exec.emit.early-fire.delay", "2 s")]).unwrap();
        assert_eq!(off.early_fire, None, "a delay alone does not turn it on");
        let e = emit(&[("table.exec.emit.early-fire.enabled", "true")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'table.exec.emit.early-fire.delay' is not set"),
            "{e}"
        );
    }

    #[test]
    fn the_job_config_is_typed_with_defaults_and_names_bad_keys() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.epoch_length, super::DEFAULT_EPOCH);
        assert_eq!(c.batch_rows, super::DEFAULT_BATCH_ROWS);
        assert_eq!(
            (c.memory_limit, c.state_ttl, &c.checkpoint),
            (None, None, &None)
        );
        let c = parse(&[
            ("sluice.epoch-length", "20 ms"),
            ("sluice.memory.limit", "2gb"),
            ("table.exec.state.ttl", "1 h"),
            ("execution.checkpointing.interval", "1 s"),
            ("execution.checkpointing.dir", "/tmp/ck"),
            ("execution.checkpointing.snapshot-compression", "TRUE"),
        ])
        .unwrap();
        assert_eq!(c.epoch_length.as_millis(), 20);
        assert_eq!(c.memory_limit, Some(2 << 30));
        assert_eq!(c.state_ttl.unwrap().as_secs(), 3600);
        let ck = c.checkpoint.unwrap();
        assert_eq!((ck.interval.as_secs(), ck.dir.as_str()), (1, "/tmp/ck"));
        assert!(ck.compression);
        assert_eq!((ck.retained, ck.tolerable_failures), (1, 3));
        for (pairs, needle) in [
            (
                &[("sluice.epoch-lenght", "20 ms")][..],
                "did you mean 'sluice.epoch-length'",
            ),
            (
                &[("sluice.epoch-length", "1 min")][..],
                "between 1 ms and 10 s",
            ),
            (
                &[("sluice.memory.limit", "lots")][..],
                "'sluice.memory.limit' = 'lots'",
            ),
            (
                &[("execution.checkpointing.dir", "/tmp/ck")][..],
                "'execution.checkpointing.interval' is not",
            ),
            (
                &[("execution.checkpointing.interval", "1 s")][..],
                "'execution.checkpointing.dir' is not",
            ),
        ] {
            let e = parse(pairs).unwrap_err().to_string();
            assert!(e.contains(needle), "{pairs:?}: {e}");
        }
    }

    #[test]
    fn unknown_keys_are_errors_and_flink_only_keys_warn() {
        assert!(check("a", "b")
            .unwrap_err()
            .to_string()
            .contains("'a': unknown option"));
        let e = check("table.exec.state.tl", "1 h").unwrap_err().to_string();
        assert!(e.contains("did you mean 'table.exec.state.ttl'"), "{e}");
        assert!(check("table.exec.state.ttl", "1 h").unwrap().is_none());
        let e = check("table.exec.state.ttl", "forever")
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be a duration"), "{e}");
        assert!(check("table.exec.mini-batch.size", "0").is_err());
        let w = check("parallelism.default", "4").unwrap().unwrap();
        assert!(w.contains("--workers"), "{w}");
    }

    /// The options tables of docs/configuration.md are generated from the registry: the file
    /// must hold exactly what [`super::options_markdown`] and [`super::flink_only_markdown`]
    /// give (`SLUICE_BLESS=1` rewrites it).
    #[test]
    fn the_docs_list_every_option_as_declared() {
        sluice_common::text::check_generated_sections(
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/configuration.md"),
            "config.rs",
            &[
                ("options", super::options_markdown()),
                ("Flink-only options", super::flink_only_markdown()),
            ],
        );
    }
}
