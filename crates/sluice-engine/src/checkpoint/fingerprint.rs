//! What a checkpoint must match to restore: the plan's structure, and the identity of each
//! source's input.

use std::collections::BTreeMap;

use sluice_sql::{JobPlan, SinkTarget, StreamNode};

/// A structural fingerprint of a plan: operators, schemas and aggregate calls. A checkpoint
/// restores only into a plan with the same fingerprint.
pub fn fingerprint(plan: &JobPlan) -> String {
    fn node(n: &StreamNode, out: &mut String) {
        let fields = |s: &arrow::datatypes::SchemaRef| {
            s.fields()
                .iter()
                .map(|f| format!("{}:{}", f.name(), f.data_type()))
                .collect::<Vec<_>>()
                .join(",")
        };
        match n {
            StreamNode::Scan { table, schema, .. } => {
                out.push_str(&format!("scan({};{})", table.name, fields(schema)))
            }
            StreamNode::Values { rows } => out.push_str(&format!("values({})", rows.num_rows())),
            StreamNode::Project { input, schema, .. } => {
                node(input, out);
                out.push_str(&format!("project({})", fields(schema)));
            }
            StreamNode::Filter { input, .. } => {
                node(input, out);
                out.push_str("filter");
            }
            StreamNode::Union { inputs, .. } => {
                inputs.iter().for_each(|i| node(i, out));
                out.push_str(&format!("union({})", inputs.len()));
            }
            StreamNode::WindowAssign { input, kind, .. } => {
                node(input, out);
                out.push_str(&format!("window({kind:?})"));
            }
            StreamNode::Aggregate {
                input,
                aggs,
                window,
                schema,
                ..
            } => {
                node(input, out);
                let calls: Vec<String> = aggs
                    .iter()
                    .map(|a| {
                        format!(
                            "{:?}{}:{}",
                            a.func,
                            if a.distinct { "d" } else { "" },
                            a.output_type
                        )
                    })
                    .collect();
                let window = match window {
                    sluice_sql::AggWindow::None => "none".to_string(),
                    sluice_sql::AggWindow::Assigned { .. } => "assigned".to_string(),
                    sluice_sql::AggWindow::Session { gap, .. } => format!("session{gap}"),
                };
                out.push_str(&format!(
                    "aggregate({};{};{})",
                    calls.join(","),
                    window,
                    fields(schema)
                ));
            }
            StreamNode::Join {
                left,
                right,
                kind,
                left_keys,
                bound,
                schema,
                ..
            } => {
                node(left, out);
                node(right, out);
                out.push_str(&format!(
                    "join({kind:?};{};{bound:?};{})",
                    left_keys.len(),
                    fields(schema)
                ));
            }
            StreamNode::Rank {
                input,
                partition,
                limit,
                mode,
                schema,
                ..
            } => {
                node(input, out);
                out.push_str(&format!(
                    "rank({};{limit};{mode:?};{})",
                    partition.len(),
                    fields(schema)
                ));
            }
            StreamNode::TemporalJoin {
                left,
                right,
                kind,
                schema,
                ..
            } => {
                node(left, out);
                node(right, out);
                out.push_str(&format!("temporal({kind:?};{})", fields(schema)));
            }
            StreamNode::LookupJoin {
                input,
                dim,
                kind,
                schema,
                ..
            } => {
                node(input, out);
                node(dim, out);
                out.push_str(&format!("lookup({kind:?};{})", fields(schema)));
            }
            StreamNode::Over {
                input,
                partition,
                aggs,
                frame,
                schema,
                ..
            } => {
                node(input, out);
                let calls: Vec<String> = aggs.iter().map(|a| format!("{:?}", a.func)).collect();
                out.push_str(&format!(
                    "over({};{};{frame:?};{})",
                    partition.len(),
                    calls.join(","),
                    fields(schema)
                ));
            }
        }
    }
    // The version of how plans become operators: sub-plans and scans built once and shared
    // (2026-12) changed which operators hold state, so older checkpoints do not fit; v3: HOP
    // window aggregations keep panes, not windows.
    let mut out = String::from("operators v3;");
    for p in &plan.pipelines {
        node(&p.query, &mut out);
        match &p.sink {
            SinkTarget::Table(t) => out.push_str(&format!("->{}|", t.name)),
            SinkTarget::Select { index } => out.push_str(&format!("->select{index}|")),
        }
    }
    // FNV-1a: stable across builds, unlike the standard library's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in out.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// What identifies the input of each source table of a plan: its connector and the options
/// its connector declares as identity (a path, made absolute; a generator's seed and fields).
pub fn source_identities(plan: &JobPlan) -> BTreeMap<String, String> {
    source_identities_at(plan, None)
}

/// [`source_identities`] of a job that runs in folder `base` (relative paths start there).
pub fn source_identities_at(
    plan: &JobPlan,
    base: Option<&std::path::Path>,
) -> BTreeMap<String, String> {
    fn walk(n: &StreamNode, base: Option<&std::path::Path>, out: &mut BTreeMap<String, String>) {
        if let StreamNode::Scan { table, .. } = n {
            out.insert(
                table.name.clone(),
                sluice_connectors::options::source_identity_at(&table.options, base),
            );
        }
        for i in n.inputs() {
            walk(i, base, out);
        }
    }
    let mut out = BTreeMap::new();
    for p in &plan.pipelines {
        walk(&p.query, base, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    /// A generator's identity covers what changes its rows: the Nexmark stream it reads and the
    /// event count that interleaves the streams; datagen's field options; not its rate.
    #[test]
    fn a_generated_source_is_identified_by_what_makes_its_rows() {
        let plan = |options: &str| {
            let sql = format!(
                "CREATE TABLE s (id BIGINT) WITH ('connector' = 'datagen'{options});
                 SELECT * FROM s;"
            );
            super::source_identities(&sluice_sql::plan_script(&sql).unwrap())
        };
        let base = plan(", 'fields.id.max' = '1'");
        assert_eq!(base, plan(", 'fields.id.max' = '1'"));
        assert_eq!(
            base,
            plan(", 'fields.id.max' = '1', 'rows-per-second' = '5'")
        );
        assert_ne!(base, plan(", 'fields.id.max' = '2'"));
        assert_ne!(
            base,
            plan(", 'fields.id.max' = '1', 'number-of-rows' = '10'")
        );
        let nexmark = |table: &str, events: u64| {
            let sql = format!(
                "CREATE TABLE t (auction BIGINT) WITH ('connector' = 'nexmark', 'nexmark.table' = '{table}', 'nexmark.events' = '{events}');
                 SELECT * FROM t;"
            );
            super::source_identities(&sluice_sql::plan_script(&sql).unwrap())
        };
        assert_eq!(nexmark("bid", 1000), nexmark("bid", 1000));
        assert_ne!(nexmark("bid", 1000), nexmark("auction", 1000));
        assert_ne!(nexmark("bid", 1000), nexmark("bid", 2000));
    }
}
