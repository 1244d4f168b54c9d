//! Connector options follow their declarations: defaults, type checks, sides, and the error for
//! an option nothing declares.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use sluice_common::ChangeBatch;
use sluice_connectors::{open_sink, open_source, ConnectorSpec, Options, Poll};

fn spec(options: &[(&str, &str)]) -> ConnectorSpec {
    ConnectorSpec {
        table: "t".into(),
        schema: Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, true)])),
        options: options
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        partitioned_by: vec![],
        read_columns: None,
        decode_ahead: false,
        whole_files: false,
        sink_instance: 0,
        metadata: vec![],
        primary_key: vec![],
    }
}

fn source_error(options: &[(&str, &str)]) -> String {
    match open_source(&spec(options), 0, 1) {
        Ok(_) => panic!("{options:?} opened"),
        Err(e) => e.to_string(),
    }
}

fn sink_error(options: &[(&str, &str)]) -> String {
    match open_sink(&spec(options), 0, 1) {
        Ok(_) => panic!("{options:?} opened"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn values_are_checked_against_their_declared_type() {
    let cases: [(&[(&str, &str)], &str); 6] = [
        (
            &[("connector", "datagen"), ("rows-per-second", "fast")],
            "option 'rows-per-second' = 'fast' must be a number of at least 0",
        ),
        (
            &[("connector", "datagen"), ("fields.id.kind", "counter")],
            "option 'fields.id.kind' = 'counter' is not supported (use 'random', 'sequence')",
        ),
        (
            &[("connector", "nexmark"), ("nexmark.table", "bids")],
            "option 'nexmark.table' = 'bids' is not supported (use 'person', 'auction', 'bid')",
        ),
        (
            &[("connector", "datagen"), ("number-of-rows", "-1")],
            "option 'number-of-rows' = '-1' is not a whole number of at least 0",
        ),
        // A sink-side option of a table read as a source is not read, but still checked.
        (
            &[
                ("connector", "filesystem"),
                ("path", "/tmp"),
                ("format", "json"),
                ("sink.rolling-policy.file-size", "big"),
            ],
            "option 'sink.rolling-policy.file-size' = 'big' is not a size",
        ),
        // Options every source table takes, read by the planner and engine.
        (
            &[
                ("connector", "datagen"),
                ("scan.watermark.idle-timeout", "soon"),
            ],
            "option 'scan.watermark.idle-timeout' = 'soon' is not a duration",
        ),
    ];
    for (options, want) in cases {
        let e = source_error(options);
        assert!(
            e.contains("table 't'") && e.contains(want),
            "{options:?}: {e}"
        );
    }
}

#[test]
fn options_of_the_other_side_are_accepted_and_unknown_ones_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    // A table written by one statement and read by another carries both sides' options.
    let both = [
        ("connector", "filesystem"),
        ("path", path),
        ("format", "json"),
        ("json.ignore-parse-errors", "true"),
        ("source.monitor-interval", "1 s"),
        ("sink.rolling-policy.file-size", "1mb"),
        ("sink.publish-on-stop", "true"),
    ];
    open_source(&spec(&both), 0, 1).unwrap();
    open_sink(&spec(&both), 0, 1).unwrap().finish().unwrap();

    let e = sink_error(&[
        ("connector", "filesystem"),
        ("path", path),
        ("format", "json"),
        ("sink.rolling-policy.file-szie", "1mb"),
    ]);
    assert!(
        e.contains("unknown option 'sink.rolling-policy.file-szie' (did you mean 'sink.rolling-policy.file-size'?) for connector 'filesystem' sinks"),
        "{e}"
    );
    let e = source_error(&[
        ("connector", "datagen"),
        ("fields.id.kind", "random"),
        ("fields.id.mn", "1"),
    ]);
    assert!(
        e.contains("unknown option 'fields.id.mn' (did you mean 'fields.id.min'?)"),
        "{e}"
    );
    let e = source_error(&[("connector", "pulsar")]);
    assert!(
        e.contains("unknown connector 'pulsar' (available: filesystem,"),
        "{e}"
    );
    assert!(source_error(&[("connector", "print")]).contains("can only be written to"));
    assert!(sink_error(&[("connector", "nexmark")]).contains("can only be read"));
}

#[test]
fn defaults_come_from_the_declaration() {
    // datagen: 100-character strings, sequences from 0, `rows-per-second` 10000 (paced, so only
    // the bounded count is checked here).
    let s = ConnectorSpec {
        schema: Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("s", DataType::Utf8, false),
        ])),
        ..spec(&[
            ("connector", "datagen"),
            ("number-of-rows", "3"),
            ("rows-per-second", "0"),
            ("fields.id.kind", "sequence"),
        ])
    };
    let mut r = open_source(&s, 0, 1).unwrap();
    let mut rows = vec![];
    loop {
        match r.poll(100).unwrap() {
            Poll::Batch { batch, .. } => rows.push(batch),
            Poll::Finished => break,
            _ => {}
        }
    }
    let batch = arrow::compute::concat_batches(&rows[0].schema(), &rows).unwrap();
    let ids = batch
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap();
    assert_eq!(ids.values().to_vec(), vec![0, 1, 2]);
    let s = batch
        .column(1)
        .as_any()
        .downcast_ref::<arrow::array::StringArray>()
        .unwrap();
    assert!(s.iter().all(|v| v.unwrap().len() == 100));
}

#[test]
#[should_panic(expected = "reads option 'no.such', which it does not declare")]
fn reading_an_undeclared_option_is_a_bug_caught_in_tests() {
    let mut opts = Options::new(&spec(&[("connector", "datagen")]), false).unwrap();
    let _ = opts.get("no.such");
}

/// Without checkpoints, a part file that has been open for the rollover interval is closed and
/// the next rows go to a new one.
#[test]
fn a_sink_rolls_its_file_after_the_rollover_interval() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(&[
        ("connector", "filesystem"),
        ("path", dir.path().to_str().unwrap()),
        ("format", "json"),
        ("sink.rolling-policy.rollover-interval", "20 ms"),
    ]);
    let mut w = open_sink(&s, 0, 1).unwrap();
    let batch = |v: i64| {
        ChangeBatch::inserts(
            RecordBatch::try_new(s.schema.clone(), vec![Arc::new(Int64Array::from(vec![v]))])
                .unwrap(),
        )
    };
    w.write(&batch(1)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    // Written into the old file, which is then past its interval and rolled.
    w.write(&batch(2)).unwrap();
    w.write(&batch(3)).unwrap();
    w.finish().unwrap();
    let mut files: Vec<(String, String)> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_str().unwrap().to_string(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    assert_eq!(
        files,
        vec![
            (
                "part-0-0.json".to_string(),
                "{\"id\":1}\n{\"id\":2}\n".to_string()
            ),
            ("part-0-1.json".to_string(), "{\"id\":3}\n".to_string()),
        ]
    );
}
