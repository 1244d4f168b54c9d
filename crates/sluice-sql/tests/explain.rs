//! Planner golden tests: the `EXPLAIN` text of each script in `tests/explain/` (after the tables
//! of `_tables.sql`) and of each Nexmark query in `benchmarks/queries/nexmark/` must equal its `.plan`
//! file. After a planner change, `SLUICE_BLESS=1` rewrites the files: review their diff as the
//! change's effect on plans.

use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/explain")
}

/// The plan of `sql`, as `EXPLAIN` prints it (or the planning error).
fn explained(sql: &str) -> String {
    match sluice_sql::plan_script(sql) {
        Ok(plan) => {
            let mut all = plan.explained.clone();
            all.extend(plan.pipelines.iter().cloned());
            sluice_sql::plan::explain::explain_pipelines(&all)
        }
        Err(e) => format!("error: {e}\n"),
    }
}

/// Compares `text` with the golden file `name.plan`, or writes it when blessing.
fn compare(name: &str, text: &str, stale: &mut Vec<String>) {
    let path = dir().join(format!("{name}.plan"));
    let golden = std::fs::read_to_string(&path).unwrap_or_default();
    if golden != text {
        if std::env::var_os("SLUICE_BLESS").is_some() {
            std::fs::write(&path, text).unwrap();
        } else {
            stale.push(format!("--- {name}.plan\n{golden}\n+++ now\n{text}"));
        }
    }
}

#[test]
fn plans_equal_their_golden_files() {
    let tables = std::fs::read_to_string(dir().join("_tables.sql")).unwrap();
    let mut stale = vec![];
    let mut scripts: Vec<PathBuf> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql") && !p.ends_with("_tables.sql"))
        .collect();
    scripts.sort();
    assert!(scripts.len() >= 10, "the plan shapes: {scripts:?}");
    for script in scripts {
        let sql = std::fs::read_to_string(&script).unwrap();
        let name = script.file_stem().unwrap().to_string_lossy().to_string();
        let text = explained(&format!("{tables}\n{sql}"));
        assert!(!text.starts_with("error"), "{name}: {text}");
        compare(&name, &text, &mut stale);
    }
    let nexmark = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../benchmarks/queries/nexmark");
    let ddl = std::fs::read_to_string(nexmark.join("ddl.sql"))
        .unwrap()
        .replace("{events}", "1000");
    for q in 0..=22 {
        let sql = std::fs::read_to_string(nexmark.join(format!("q{q}.sql")))
            .unwrap()
            .replace("{out}", "/tmp/sluice-explain-out");
        let text = explained(&format!("{ddl}\n{sql}"));
        compare(&format!("nexmark-q{q}"), &text, &mut stale);
    }
    assert!(
        stale.is_empty(),
        "plans differ from their golden files (SLUICE_BLESS=1 rewrites them):\n{}",
        stale.join("\n")
    );
}

/// What the golden files show, checked against the plans' facts independently of the text:
/// each rule fires where its conditions hold, and only there.
#[test]
fn rules_fire_where_they_apply() {
    let tables = std::fs::read_to_string(dir().join("_tables.sql")).unwrap();
    let plan = |name: &str| {
        let sql = std::fs::read_to_string(dir().join(format!("{name}.sql"))).unwrap();
        explained(&format!("{tables}\n{sql}"))
    };
    let hop = plan("hop_slicing");
    assert!(
        hop.contains("rule hop-slicing: panes of 10 s merged into windows of 1 min"),
        "{hop}"
    );
    assert!(hop.contains("rule pre-partition"), "{hop}");
    let tumble = plan("tumble_prepartition");
    assert!(tumble.contains("rule pre-partition"), "{tumble}");
    assert!(!tumble.contains("hop-slicing"), "{tumble}");
    let group = plan("group_aggregate");
    assert!(group.contains("changelog=[I,UB,UA,D]"), "{group}");
    assert!(group.contains("Rules applied: none"), "{group}");
    let join = plan("regular_join_fusion");
    // The filter and projection below the join share no call: nothing to fuse.
    assert!(!join.contains("filter-project-fusion"), "{join}");
    let fusion = plan("filter_project_fusion");
    assert!(
        fusion.contains("rule filter-project-fusion: the filter and this projection run as one step; once per row: [upper(item@1)]"),
        "{fusion}"
    );
    assert!(
        join.contains("unbounded unless 'table.exec.state.ttl'"),
        "{join}"
    );
    let shared = plan("shared_sub_plan");
    assert!(
        shared.contains("rule shared-sub-plan: computed once per worker, read 2 times"),
        "{shared}"
    );
    // An EXPLAIN statement is planned but not run.
    let sql = format!(
        "{tables}\n{}",
        std::fs::read_to_string(dir().join("explain_statement.sql")).unwrap()
    );
    let job = sluice_sql::plan_script(&sql).unwrap();
    assert!(job.pipelines.is_empty() && job.explained.len() == 1);
    // EXPLAIN ANALYZE runs its statement: it stays among the pipelines, marked.
    let job = sluice_sql::plan_script(&format!("{tables}\nEXPLAIN ANALYZE SELECT * FROM orders;"))
        .unwrap();
    assert!(job.explained.is_empty() && job.pipelines.len() == 1 && job.pipelines[0].analyze);
}
