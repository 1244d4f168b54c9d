//! Windowed aggregations: rows partitioned before window assignment, and HOP windows sliced
//! into panes.

use sluice_sql::StreamNode;

use crate::operator::stateless::{assign_windows, filter, map_batches, project};
use crate::runtime::{DataflowScope, EventStream};

use super::*;
pub(crate) use sluice_sql::optimize::windows::{hop_slices, keys_below_window, window_copies};

/// Builds the chain [`keys_below_window`] found (projections and filters over a window
/// assignment, top first), with the rows partitioned by `keys` before the assignment. Not
/// shared with other plans: elsewhere the same nodes are built without the exchange. With
/// `pane`, the HOP assignment gives each row its pane, a tumbling window of that length
/// (see [`hop_slices`]).
pub(crate) fn build_window_chain<'scope>(
    scope: DataflowScope<'scope>,
    chain: &[&StreamNode],
    keys: Vec<sluice_sql::PhysExpr>,
    pane: Option<i64>,
    ctx: &BuildContext,
    reuse: &Reuse<'scope>,
) -> EventStream<'scope> {
    let Some((
        StreamNode::WindowAssign {
            input,
            time,
            kind,
            schema,
        },
        above,
    )) = chain.split_last()
    else {
        unreachable!("a window chain ends at the window assignment")
    };
    let (time, schema) = (time.clone(), schema.clone());
    let metrics = ctx.metrics.clone();
    let kind = match pane {
        Some(size) => sluice_sql::WindowKind::Tumble { size, offset: 0 },
        None => *kind,
    };
    let mut stream = map_batches(
        ctx.exchange(build(scope, input, ctx, reuse), keys, "WindowAssign"),
        "WindowAssign",
        ctx.control.clone(),
        move |b| assign_windows(b, &time, kind, &schema, &metrics.null_time_rows_dropped).map(Some),
    );
    for node in above.iter().rev() {
        stream = match node {
            StreamNode::Project { exprs, schema, .. } => {
                let (exprs, schema) = (exprs.clone(), schema.clone());
                map_batches(stream, "Project", ctx.control.clone(), move |b| {
                    project(b, &exprs, &schema).map(Some)
                })
            }
            StreamNode::Filter { predicate, .. } => {
                let predicate = predicate.clone();
                map_batches(stream, "Filter", ctx.control.clone(), move |b| {
                    filter(b, &predicate).map(Some)
                })
            }
            _ => unreachable!("a window chain holds projections and filters"),
        };
    }
    stream
}
