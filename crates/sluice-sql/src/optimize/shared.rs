//! Shared sub-plans (Flink's `table.optimizer.reuse-sub-plan-enabled`, always on): sub-plans that
//! are equal, operators, expressions, schemas and tables alike ([`StreamNode`]'s `Eq` and
//! `Hash`), are computed once per worker however many places read them. A self-join of one
//! windowed aggregation (Nexmark q5) aggregates once. A sub-plan that calls a volatile function
//! (`RAND()`, `UUID()`) is never shared: two copies of it give different rows.

use std::collections::{BTreeMap, HashMap};

use crate::plan::StreamNode;

/// Whether `node`'s sub-plan may be computed once and shared.
pub fn shareable(node: &StreamNode) -> bool {
    !node.calls_volatile()
}

/// How many places read each shareable sub-plan of `roots` (inputs of a sub-plan counted once
/// per place its reader appears).
pub fn reads<'a>(
    roots: impl IntoIterator<Item = &'a StreamNode>,
) -> HashMap<&'a StreamNode, usize> {
    fn count<'a>(node: &'a StreamNode, reads: &mut HashMap<&'a StreamNode, usize>) {
        if shareable(node) {
            *reads.entry(node).or_default() += 1;
        }
        for i in node.inputs() {
            count(i, reads);
        }
    }
    let mut reads = HashMap::new();
    for r in roots {
        count(r, &mut reads);
    }
    reads
}

/// Shared scans: tables that several scans read with different columns, and the columns one
/// shared reader keeps for all of them (sorted positions in the table's schema; `None`, all).
/// Each scan then keeps its own columns from the shared reader's rows. (A scan that carries its
/// source rows for a late-data sink reads on its own.)
pub fn scan_columns<'a>(
    roots: impl IntoIterator<Item = &'a StreamNode>,
) -> HashMap<String, Option<Vec<usize>>> {
    type Projections<'a> = BTreeMap<String, Vec<&'a Option<Vec<usize>>>>;
    fn collect<'a>(n: &'a StreamNode, out: &mut Projections<'a>) {
        if let StreamNode::Scan {
            table,
            projection,
            carry_source_row: false,
            ..
        } = n
        {
            out.entry(table.name.clone()).or_default().push(projection);
        }
        n.inputs().into_iter().for_each(|i| collect(i, out));
    }
    let mut by_table = Projections::new();
    for r in roots {
        collect(r, &mut by_table);
    }
    let mut scans = HashMap::new();
    for (name, projections) in by_table {
        if projections.iter().all(|p| *p == projections[0]) {
            continue;
        }
        // The union of their columns (`None`: one of them reads all).
        let union = projections.iter().try_fold(vec![], |mut u, p| {
            u.extend(p.as_ref()?);
            Some(u)
        });
        scans.insert(
            name,
            union.map(|mut u| {
                u.sort_unstable();
                u.dedup();
                u
            }),
        );
    }
    scans
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_query(sql: &str) -> StreamNode {
        crate::plan_script(sql).unwrap().pipelines[0].query.clone()
    }

    const TABLE: &str = "CREATE TABLE t (k BIGINT, v BIGINT) WITH ('connector' = 'datagen');";

    #[test]
    fn equal_sub_plans_are_found_and_different_ones_are_not() {
        let q = first_query(&format!(
            "{TABLE} SELECT a.k, a.s, b.s FROM (SELECT k, SUM(v) AS s FROM t GROUP BY k) a \
             JOIN (SELECT k, SUM(v) AS s FROM t GROUP BY k) b ON a.k = b.k"
        ));
        let found = reads([&q]);
        let aggregates: Vec<_> = found
            .iter()
            .filter(|(n, _)| matches!(n, StreamNode::Aggregate { .. }))
            .collect();
        assert_eq!(
            aggregates.len(),
            1,
            "one aggregation, read twice: {aggregates:?}"
        );
        assert_eq!(*aggregates[0].1, 2);

        let q = first_query(&format!(
            "{TABLE} SELECT a.k, a.s, b.s FROM (SELECT k, SUM(v) AS s FROM t GROUP BY k) a \
             JOIN (SELECT k, MAX(v) AS s FROM t GROUP BY k) b ON a.k = b.k"
        ));
        let found = reads([&q]);
        assert_eq!(
            found
                .keys()
                .filter(|n| matches!(n, StreamNode::Aggregate { .. }))
                .count(),
            2,
            "SUM and MAX differ"
        );
    }

    #[test]
    fn scans_of_one_table_with_other_columns_share_a_reader_of_their_union() {
        let plan = crate::plan_script(&format!(
            "{TABLE} CREATE TABLE u (k BIGINT, a BIGINT, b BIGINT, c BIGINT) WITH ('connector' = 'datagen');\n\
             SELECT k, a FROM u; SELECT k, c FROM u; SELECT k, v FROM t; SELECT v, k FROM t;"
        ))
        .unwrap();
        let scans = scan_columns(plan.pipelines.iter().map(|p| &p.query));
        assert_eq!(scans.get("u"), Some(&Some(vec![0, 1, 3])), "{scans:?}");
        assert_eq!(
            scans.get("t"),
            None,
            "both read k and v: nothing to share: {scans:?}"
        );
    }

    #[test]
    fn volatile_sub_plans_are_never_shared() {
        let q = first_query(&format!(
            "{TABLE} SELECT a.r, b.r FROM (SELECT k, RAND() AS r FROM t) a \
             JOIN (SELECT k, RAND() AS r FROM t) b ON a.k = b.k"
        ));
        let found = reads([&q]);
        fn volatile_nodes(n: &StreamNode, out: &mut usize) {
            *out += usize::from(n.calls_volatile());
            n.inputs().into_iter().for_each(|i| volatile_nodes(i, out));
        }
        let mut volatile = 0;
        volatile_nodes(&q, &mut volatile);
        assert!(volatile >= 2, "both RAND() projections are in the plan");
        assert!(found.keys().all(|n| !n.calls_volatile()), "{found:?}");
        assert_eq!(
            found
                .iter()
                .filter(|(n, _)| matches!(n, StreamNode::Scan { .. }))
                .map(|(_, reads)| *reads)
                .collect::<Vec<_>>(),
            vec![2],
            "the scan below them is shared"
        );
    }
}
