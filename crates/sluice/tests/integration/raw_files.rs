//! The filesystem connector's `raw` format: each line is the value of the table's one STRING
//! or BYTES column, read in pieces by several workers and written back line for line.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::run_cli as run;

/// 30 K lines of every shape (commas, quotes, braces, unicode, empty) over 64 KB pieces read by
/// two workers: the lines written back are the input's, each once; a JSON copy with each
/// line's length agrees; a table of two columns is refused, naming the rule.
#[test]
fn raw_lines_round_trip_over_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.txt");
    let shapes = [
        "a,b,c",
        "\"quoted\"",
        "{\"json\": 1}",
        "汉字 ✓",
        "",
        "  padded  ",
    ];
    let lines: Vec<String> = (0..30_000)
        .map(|i| format!("{i}:{}", shapes[i % shapes.len()]))
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let (out, lengths) = (dir.path().join("out"), dir.path().join("lengths"));
    let script = format!(
        "CREATE TABLE src (line STRING)
           WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'raw',
             'source.split-size' = '64kb');
         CREATE TABLE copy (line STRING)
           WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'raw');
         CREATE TABLE lengths (line STRING, n INT)
           WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json');
         INSERT INTO copy SELECT line FROM src;
         INSERT INTO lengths SELECT line, CHAR_LENGTH(line) FROM src;",
        input.display(),
        out.display(),
        lengths.display()
    );
    let (ok, stderr) = run(dir.path(), &script, 2, Duration::from_secs(60));
    assert!(ok, "{stderr}");
    let mut written: BTreeMap<String, i64> = BTreeMap::new();
    for entry in std::fs::read_dir(&out).unwrap() {
        let path = entry.unwrap().path();
        assert!(
            path.extension().is_some_and(|e| e == "txt"),
            "{}",
            path.display()
        );
        for l in std::fs::read_to_string(&path).unwrap().lines() {
            *written.entry(l.to_string()).or_default() += 1;
        }
    }
    let expected: BTreeMap<String, i64> = lines.iter().map(|l| (l.clone(), 1)).collect();
    assert_eq!(written.len(), expected.len());
    assert!(written == expected, "the raw copy differs from the input");
    let rows = crate::common::committed_rows(&lengths, |_| {});
    assert_eq!(rows.values().sum::<i64>(), lines.len() as i64);
    for row in rows.keys() {
        let v: serde_json::Value = serde_json::from_str(row).unwrap();
        let line = v["line"].as_str().unwrap();
        assert_eq!(v["n"].as_i64(), Some(line.chars().count() as i64), "{row}");
        assert!(expected.contains_key(line), "{row}");
    }

    let script = format!(
        "CREATE TABLE src (a STRING, b STRING)
           WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'raw');
         CREATE TABLE o (a STRING) WITH ('connector' = 'blackhole');
         INSERT INTO o SELECT a FROM src;",
        input.display()
    );
    let (ok, stderr) = run(dir.path(), &script, 1, Duration::from_secs(30));
    assert!(
        !ok && stderr
            .contains("format 'raw' reads and writes a table of one STRING or BYTES column"),
        "{stderr}"
    );
}
