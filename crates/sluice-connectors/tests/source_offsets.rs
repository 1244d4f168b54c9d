//! Sources resume from recorded offsets: what was read before plus what is read after equals
//! one uninterrupted read, with no row missing or repeated.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{DataType, Field, Int64Type, Schema};
use sluice_connectors::prefetch::Prefetched;
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
        read_columns: None,
        decode_ahead: false,
        whole_files: false,
        sink_instance: 0,
        metadata: vec![],
        primary_key: vec![],
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

/// Opens worker 0's reader of one, directly or on a fetcher thread.
fn open(spec: &ConnectorSpec, fetcher: bool) -> Box<dyn SourceReader> {
    let r = open_source(spec, 0, 1).unwrap();
    if fetcher {
        Box::new(Prefetched::new(r, &spec.table))
    } else {
        r
    }
}

/// Stopping after some batches and resuming from the offsets recorded then reads every row
/// once, whether the readers run on the worker or on a fetcher thread (which reads ahead: its
/// offsets must be those of the batches handed over, not of what it has read).
fn resumes(spec: ConnectorSpec, rows: usize) {
    for (fetcher, ahead) in [(false, false), (true, false), (true, true)] {
        let spec = ConnectorSpec {
            decode_ahead: ahead,
            ..spec.clone()
        };
        resumes_with(&spec, rows, fetcher);
    }
}

fn resumes_with(spec: &ConnectorSpec, rows: usize, fetcher: bool) {
    let all = read(&mut open(spec, fetcher), None, rows);
    assert!(
        all.len() > 1000,
        "the input is large enough to stop in the middle"
    );
    for polls in [1, 3, 7] {
        let mut first = open(spec, fetcher);
        let mut got = read(&mut first, Some(polls), rows);
        let offsets = first.offsets();
        let mut second = open(spec, fetcher);
        second.seek(&offsets).unwrap();
        got.extend(read(&mut second, None, rows));
        let (mut a, mut b) = (got.clone(), all.clone());
        a.sort();
        b.sort();
        let present: std::collections::HashSet<_> = a.iter().collect();
        let missing: Vec<_> = b.iter().filter(|x| !present.contains(x)).take(5).collect();
        let doubled: Vec<_> = a
            .windows(2)
            .filter(|w| w[0] == w[1])
            .map(|w| w[0])
            .take(5)
            .collect();
        assert!(
            a == b,
            "stopping after {polls} polls (fetcher thread: {fetcher}, pieces decoded ahead: {}) and resuming from {offsets:?}: {} rows instead of {}; missing {missing:?}, repeated {doubled:?}",
            spec.decode_ahead,
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

/// Ids and names of every row, read by `workers` readers (each to its end).
fn read_all(spec: &ConnectorSpec, workers: usize) -> Vec<(i64, String)> {
    let mut out = vec![];
    for w in 0..workers {
        let mut r = open_source(spec, w, workers).unwrap();
        loop {
            match r.poll(7).unwrap() {
                Poll::Batch { batch, .. } => {
                    let names = batch.column(1).as_string::<i32>();
                    for (i, id) in ids(&batch).into_iter().enumerate() {
                        out.push((id, names.value(i).to_string()));
                    }
                }
                Poll::SplitDone { .. } | Poll::Idle => {}
                Poll::Finished => break,
            }
        }
    }
    out.sort();
    out
}

#[test]
fn files_read_in_pieces_give_every_record_once() {
    // Names with commas, doubled quotes and line ends inside quotes (CSV), escapes (JSON).
    // Enough rows for several pieces of the smallest split size (64 KB).
    let rows: Vec<(i64, String)> = (0..12_000)
        .map(|i| {
            let name = match i % 7 {
                0 => format!("plain {i}"),
                1 => format!("two\nlines {i}"),
                2 => format!("say \"hi\", {i}"),
                3 => format!("\n\"\n{i}\n"),
                4 => "x".repeat(i as usize % 37),
                // A quote inside an unquoted field is a character like any other.
                5 => format!("{i}\" screen"),
                _ => format!("{i}"),
            };
            (i, name)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let csv: String = rows
        .iter()
        .map(|(i, n)| {
            if n.contains([',', '\n']) || n.starts_with('"') || n.is_empty() {
                format!("{i},\"{}\"\n", n.replace('"', "\"\""))
            } else {
                format!("{i},{n}\n")
            }
        })
        .collect();
    let json: String = rows
        .iter()
        .map(|(i, n)| format!("{}\n", serde_json::json!({"id": i, "name": n})))
        .collect();
    let csv_path = dir.path().join("rows.csv");
    let json_path = dir.path().join("rows.json");
    std::fs::write(&csv_path, &csv).unwrap();
    std::fs::write(&json_path, &json).unwrap();
    let fields = || {
        vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
        ]
    };
    for (path, format) in [(&csv_path, "csv"), (&json_path, "json")] {
        let path = path.display().to_string();
        // Odd sizes put the piece boundaries anywhere in a record.
        for size in ["64kb", "65537", "65543", "70001", "99999", "1mb"] {
            for ahead in [false, true] {
                let mut s = spec(
                    &[
                        ("connector", "filesystem"),
                        ("path", &path),
                        ("format", format),
                        ("source.split-size", size),
                    ],
                    fields(),
                );
                s.decode_ahead = ahead;
                for workers in [1, 2, 3] {
                    let got = read_all(&s, workers);
                    assert!(
                        got == rows,
                        "{format} in pieces of {size} bytes on {workers} workers (decoded ahead: {ahead}): {} rows, first difference {:?}",
                        got.len(),
                        got.iter().zip(&rows).find(|(a, b)| a != b)
                    );
                }
                // One reader hands the rows over in file order (one watermark split).
                let in_order = read(&mut open_source(&s, 0, 1).unwrap(), None, 7);
                assert!(
                    in_order.windows(2).all(|w| w[0] < w[1]),
                    "{format} in pieces of {size} bytes (decoded ahead: {ahead}) out of order"
                );
            }
        }
    }
}

#[test]
fn pieces_resume_on_another_worker_count_and_refuse_another_size() {
    let dir = tempfile::tempdir().unwrap();
    let csv: String = (0..30_000).map(|i| format!("{i},\"n,{i}\"\n")).collect();
    std::fs::write(dir.path().join("big.csv"), csv).unwrap();
    let path = dir.path().display().to_string();
    let fields = vec![
        Field::new("id", DataType::Int64, false),
        Field::new("name", DataType::Utf8, true),
    ];
    let sized = |size: &str| {
        spec(
            &[
                ("connector", "filesystem"),
                ("path", &path),
                ("format", "csv"),
                ("source.split-size", size),
            ],
            fields.clone(),
        )
    };
    let s = sized("64kb");
    resumes(s.clone(), 50);
    // Two workers read part of their pieces; three workers go on from their offsets.
    let mut got = vec![];
    let mut offsets = BTreeMap::new();
    for w in 0..2 {
        let mut r = open_source(&s, w, 2).unwrap();
        got.extend(read(&mut r, Some(5 + 9 * w), 50));
        offsets.extend(r.offsets());
    }
    assert!(
        offsets.keys().any(|k| k.contains("#bytes=")),
        "the file was read in pieces: {offsets:?}"
    );
    for w in 0..3 {
        let mut r = open_source(&s, w, 3).unwrap();
        r.seek(&offsets).unwrap();
        got.extend(read(&mut r, None, 50));
    }
    got.sort();
    assert_eq!(got, (0..30_000).collect::<Vec<i64>>());
    // Other pieces cannot say which rows were read.
    let err = open_source(&sized("96kb"), 0, 1)
        .unwrap()
        .seek(&offsets)
        .unwrap_err();
    assert!(err.to_string().contains("source.split-size"), "{err}");
    let err = open_source(&sized("2 parsecs"), 0, 1).err().unwrap();
    assert!(
        err.to_string()
            .contains("'source.split-size' = '2 parsecs'"),
        "{err}"
    );
    // Tiny pieces crawled (each costs an open and a search): refused, naming the minimum.
    let err = open_source(&sized("1b"), 0, 1).err().unwrap();
    assert!(
        err.to_string().contains("'source.split-size'") && err.to_string().contains("64kb"),
        "{err}"
    );
}

#[test]
fn columns_the_job_does_not_read_are_not_decoded() {
    let dir = tempfile::tempdir().unwrap();
    // `score` of row 2 is not a number: only decoding it would fail.
    std::fs::write(dir.path().join("t.csv"), "1,a,10,x\n2,b,oops,y\n3,c,30,z\n").unwrap();
    std::fs::write(
        dir.path().join("t.json"),
        "{\"id\":1,\"name\":\"a\",\"score\":10,\"tag\":\"x\"}\n{\"id\":2,\"name\":\"b\",\"score\":\"oops\",\"tag\":\"y\"}\n",
    )
    .unwrap();
    for (file, format, rows) in [("t.csv", "csv", 3), ("t.json", "json", 2)] {
        let path = dir.path().join(file).display().to_string();
        let mut s = spec(
            &[
                ("connector", "filesystem"),
                ("path", &path),
                ("format", format),
            ],
            vec![
                Field::new("id", DataType::Int64, false),
                Field::new("name", DataType::Utf8, true),
                Field::new("score", DataType::Int64, true),
                // Not nullable: decoded even when not asked for.
                Field::new("tag", DataType::Utf8, false),
            ],
        );
        s.read_columns = Some(vec![0, 1]);
        let mut r = open_source(&s, 0, 1).unwrap();
        let mut batches = vec![];
        loop {
            match r.poll(100).unwrap() {
                Poll::Batch { batch, .. } => batches.push(batch),
                Poll::SplitDone { .. } | Poll::Idle => {}
                Poll::Finished => break,
            }
        }
        let b = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
        assert_eq!(b.num_rows(), rows, "{format}");
        assert_eq!(
            b.schema().fields().len(),
            4,
            "{format}: the table's columns"
        );
        assert_eq!(ids(&b), (1..=rows as i64).collect::<Vec<_>>(), "{format}");
        assert_eq!(b.column(1).as_string::<i32>().value(1), "b", "{format}");
        assert_eq!(
            b.column(2).null_count(),
            rows,
            "{format}: score is not read"
        );
        assert_eq!(b.column(3).as_string::<i32>().value(1), "y", "{format}");
        // Asked for, the bad value is an error naming the file.
        s.read_columns = None;
        let mut r = open_source(&s, 0, 1).unwrap();
        let err = loop {
            match r.poll(100) {
                Err(e) => break e,
                Ok(Poll::Finished) => panic!("{format}: the bad score was not reported"),
                Ok(_) => {}
            }
        };
        assert!(err.to_string().contains(file), "{format}: {err}");
    }
}

#[test]
fn the_pieces_of_a_file_are_one_watermark_split() {
    // A worker's pieces of one file are read one after another as one split: the split does
    // not end (releasing the watermark to the other files') between two of them.
    let dir = tempfile::tempdir().unwrap();
    for f in 0..3 {
        let rows: String = (0..20_000)
            .map(|i| format!("{},x{i}\n", f * 100_000 + i))
            .collect();
        std::fs::write(dir.path().join(format!("f{f}.csv")), rows).unwrap();
    }
    let path = dir.path().display().to_string();
    let s = spec(
        &[
            ("connector", "filesystem"),
            ("path", &path),
            ("format", "csv"),
            ("source.split-size", "64kb"),
        ],
        vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
        ],
    );
    for (worker, workers) in [(0, 1), (1, 2)] {
        let mut r = open_source(&s, worker, workers).unwrap();
        // The file each split's rows came from, and the splits that ended.
        let mut files: BTreeMap<usize, std::collections::BTreeSet<i64>> = BTreeMap::new();
        let mut ended = vec![];
        loop {
            match r.poll(64).unwrap() {
                Poll::Batch { split, batch } => {
                    assert!(!ended.contains(&split), "rows after split {split} ended");
                    let e = files.entry(split).or_default();
                    e.extend(ids(&batch).iter().map(|id| id / 100_000));
                }
                Poll::SplitDone { split } => ended.push(split),
                Poll::Idle => {}
                Poll::Finished => break,
            }
        }
        assert_eq!(files.len(), 3, "one split per file: {files:?}");
        assert!(files.values().all(|f| f.len() == 1), "{files:?}");
        ended.sort();
        assert_eq!(ended, files.keys().copied().collect::<Vec<_>>());
    }
}

/// A fetcher thread hands a reading error to the worker as it would have met it: the file and
/// line of the bad record, after the good batches before it.
#[test]
fn a_fetcher_thread_reports_the_bad_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut json: String = (0..300).map(|i| format!("{{\"id\": {i}}}\n")).collect();
    json.push_str("{\"id\": oops}\n");
    std::fs::write(dir.path().join("in.json"), json).unwrap();
    let path = dir.path().display().to_string();
    let spec = spec(
        &[
            ("connector", "filesystem"),
            ("path", &path),
            ("format", "json"),
        ],
        vec![Field::new("id", DataType::Int64, false)],
    );
    let mut r = open(&spec, true);
    let mut rows = 0;
    let error = loop {
        match r.poll(100) {
            Ok(Poll::Batch { batch, .. }) => rows += batch.num_rows(),
            Ok(Poll::Finished) => panic!("the bad record was not reported"),
            Ok(_) => {}
            Err(e) => break e.to_string(),
        }
    };
    assert!(
        error.contains("in.json") && error.contains("301"),
        "{error}"
    );
    assert_eq!(rows, 300);
    assert!(matches!(r.poll(100), Ok(Poll::Finished)));
}

/// A bad record in a piece decoded ahead on another thread is reported when its turn comes,
/// after every good row before it, with its file and line.
#[test]
fn a_bad_record_in_a_piece_decoded_ahead_names_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut json: String = (0..20_000).map(|i| format!("{{\"id\": {i}}}\n")).collect();
    json.push_str("{\"id\": oops}\n");
    json.extend((0..500).map(|i| format!("{{\"id\": {i}}}\n")));
    std::fs::write(dir.path().join("in.json"), json).unwrap();
    let path = dir.path().display().to_string();
    let mut spec = spec(
        &[
            ("connector", "filesystem"),
            ("path", &path),
            ("format", "json"),
            ("source.split-size", "64kb"),
        ],
        vec![Field::new("id", DataType::Int64, false)],
    );
    spec.decode_ahead = true;
    for fetcher in [false, true] {
        let mut r = open(&spec, fetcher);
        let mut ids = vec![];
        let error = loop {
            match r.poll(100) {
                Ok(Poll::Batch { batch, .. }) => ids.extend(self::ids(&batch)),
                Ok(Poll::Finished) => panic!("the bad record was not reported"),
                Ok(_) => {}
                Err(e) => break e.to_string(),
            }
        };
        assert!(
            error.contains("in.json") && error.contains("20001"),
            "{error}"
        );
        // Rows before the bad one's batch were all handed over, in order.
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]) && ids.len() >= 19_900,
            "{}",
            ids.len()
        );
    }
}
