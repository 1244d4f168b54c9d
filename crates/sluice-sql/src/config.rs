//! Every `SET 'key' = 'value'` option Sluice knows, declared once with its type, default and
//! doc. An unknown key is an error naming it (with the closest known key); Flink's well-known
//! keys that Sluice does not implement are accepted with a warning, so Flink scripts still run.

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
    use super::check;

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
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/configuration.md");
        let mut doc = std::fs::read_to_string(path).unwrap();
        let mut stale = vec![];
        for (name, fresh) in [
            ("options", super::options_markdown()),
            ("Flink-only options", super::flink_only_markdown()),
        ] {
            let begin = format!("<!-- generated from config.rs: {name} -->\n");
            let start = doc.find(&begin).expect("the begin marker") + begin.len();
            let end = start + doc[start..].find("<!-- end -->").expect("the end marker");
            if doc[start..end] != fresh {
                stale.push(name);
                doc.replace_range(start..end, &fresh);
            }
        }
        if !stale.is_empty() {
            if std::env::var_os("SLUICE_BLESS").is_some() {
                std::fs::write(path, doc).unwrap();
            } else {
                panic!("docs/configuration.md lists other {stale:?} than config.rs declares; run this test with SLUICE_BLESS=1 to regenerate it");
            }
        }
    }
}
