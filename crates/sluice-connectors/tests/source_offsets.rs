//! Sources resume from recorded offsets: what was read before plus what is read after equals
//! one uninterrupted read, with no row missing or repeated.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{DataType, Field, Int64Type, Schema};
use sluice_connectors::{open_source, ConnectorSpec, Poll, SourceReader};

fn spec(options: &[(&str, &str)], fields: Vec<Field>) -> ConnectorSpec {
    ConnectorSpec {
        table: "t".into(),
        schema: Arc::new(Schema::new(fields)),
        options: options
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        partitioned_by: vec![],
    }
}

fn ids(batch: &RecordBatch) -> Vec<i64> {
    batch
        .column(0)
        .as_primitive::<Int64Type>()
        .values()
        .to_vec()
}

/// Reads `polls` batches (or everything, when `None`).
fn read(r: &mut Box<dyn SourceReader>, polls: Option<usize>, rows: usize) -> Vec<i64> {
    let mut out = vec![];
    let mut n = 0;
    loop {
        if polls.is_some_and(|p| n >= p) {
            return out;
        }
        match r.poll(rows).unwrap() {
            Poll::Batch { batch, .. } => {
                out.extend(ids(&batch));
                n += 1;
            }
            Poll::SplitDone { .. } | Poll::Idle => {}
            Poll::Finished => return out,
        }
    }
}

fn resumes(spec: ConnectorSpec, rows: usize) {
    let all = read(&mut open_source(&spec, 0, 1).unwrap(), None, rows);
    assert!(
        all.len() > 1000,
        "the input is large enough to stop in the middle"
    );
    for polls in [1, 3, 7] {
        let mut first = open_source(&spec, 0, 1).unwrap();
        let mut got = read(&mut first, Some(polls), rows);
        let offsets = first.offsets();
        let mut second = open_source(&spec, 0, 1).unwrap();
        second.seek(&offsets).unwrap();
        got.extend(read(&mut second, None, rows));
        let (mut a, mut b) = (got.clone(), all.clone());
        a.sort();
        b.sort();
        let missing: Vec<_> = b.iter().filter(|x| !a.contains(x)).take(5).collect();
        let doubled: Vec<_> = a
            .windows(2)
            .filter(|w| w[0] == w[1])
            .map(|w| w[0])
            .take(5)
            .collect();
        assert!(
            a == b,
            "stopping after {polls} polls and resuming from {offsets:?}: {} rows instead of {}; missing {missing:?}, repeated {doubled:?}",
            a.len(),
            b.len()
        );
    }
}

#[test]
fn json_and_csv_files_resume_from_their_offsets() {
    let dir = tempfile::tempdir().unwrap();
    for (name, start) in [("a", 0), ("b", 10_000)] {
        let json: String = (start..start + 700)
            .map(|i| format!("{{\"id\": {i}, \"name\": \"n{i}\"}}\n"))
            .collect();
        std::fs::write(dir.path().join(format!("{name}.json")), json).unwrap();
        let csv: String = (start..start + 700)
            .map(|i| format!("{i},n{i}\n"))
            .collect();
        std::fs::create_dir_all(dir.path().join("csv")).unwrap();
        std::fs::write(dir.path().join("csv").join(format!("{name}.csv")), csv).unwrap();
    }
    let fields = || {
        vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
        ]
    };
    let path = dir.path().display().to_string();
    resumes(
        spec(
            &[
                ("connector", "filesystem"),
                ("path", &path),
                ("format", "json"),
            ],
            fields(),
        ),
        128,
    );
    let csv = dir.path().join("csv").display().to_string();
    resumes(
        spec(
            &[
                ("connector", "filesystem"),
                ("path", &csv),
                ("format", "csv"),
            ],
            fields(),
        ),
        128,
    );
}

#[test]
fn generators_resume_and_refuse_another_worker_count() {
    let fields = vec![
        Field::new("order_id", DataType::Int64, false),
        Field::new("amount", DataType::Float64, false),
    ];
    let s = spec(
        &[
            ("connector", "ecommerce"),
            ("rows-per-second", "0"),
            ("number-of-rows", "5000"),
        ],
        fields,
    );
    resumes(s.clone(), 256);
    let mut r = open_source(&s, 0, 2).unwrap();
    read(&mut r, Some(2), 256);
    let offsets = r.offsets();
    let err = open_source(&s, 0, 3).unwrap().seek(&offsets).unwrap_err();
    assert!(err.to_string().contains("worker count"), "{err}");
}
