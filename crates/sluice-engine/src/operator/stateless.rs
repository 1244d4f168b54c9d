//! Stateless operators: projection, filter and window assignment, all vectorized.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, TimestampMillisecondArray, UInt32Array,
};
use arrow::datatypes::{SchemaRef, TimestampMillisecondType};
use sluice_common::{ChangeBatch, Error, Result};
use sluice_sql::{PhysExpr, WindowKind};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;

use crate::runtime::control::JobControl;
use crate::runtime::{Event, EventBuilder, EventStream};

/// Applies `f` to each batch; watermarks pass through, re-labelled as this worker's.
pub fn map_batches<'scope, F>(
    stream: EventStream<'scope>,
    name: &str,
    control: Arc<JobControl>,
    mut f: F,
) -> EventStream<'scope>
where
    F: FnMut(&ChangeBatch) -> Result<Option<ChangeBatch>> + 'static,
{
    let operator: std::rc::Rc<str> = name.into();
    stream.unary::<EventBuilder, _, _, _>(Pipeline, name, move |_cap, info| {
        let _ = info;
        move |input, output| {
            let _running = crate::runtime::panics::in_operator(&operator);
            input.for_each(|cap, data| match data {
                Event::Data(d) => {
                    if control.failed() {
                        return;
                    }
                    match f(&d.batch) {
                        Ok(Some(out)) if out.num_rows() > 0 => {
                            output.session(&cap).give_container(&mut Event::data(out))
                        }
                        Ok(_) => {}
                        Err(e) => control.fail(e),
                    }
                }
                Event::Watermark { .. } => output.session(&cap).give_container(data),
                Event::Empty => {}
            });
        }
    })
}

/// Evaluates an expression over a batch into an array.
pub fn evaluate(expr: &PhysExpr, batch: &ChangeBatch) -> Result<ArrayRef> {
    expr.evaluate(&batch.data)
        .and_then(|v| v.into_array(batch.num_rows()))
        .map_err(|e| Error::Runtime(format!("evaluating {expr}: {}", e.strip_backtrace())))
}

/// Projection.
pub fn project(batch: &ChangeBatch, exprs: &[PhysExpr], schema: &SchemaRef) -> Result<ChangeBatch> {
    let columns = exprs
        .iter()
        .map(|e| evaluate(e, batch))
        .collect::<Result<Vec<_>>>()?;
    Ok(batch.with_columns(schema.clone(), columns)?)
}

/// Filter: rows where the predicate is true (NULL counts as false).
pub fn filter(batch: &ChangeBatch, predicate: &PhysExpr) -> Result<ChangeBatch> {
    let mask = evaluate(predicate, batch)?;
    let mask = mask
        .as_any()
        .downcast_ref::<BooleanArray>()
        .ok_or_else(|| Error::Runtime(format!("WHERE condition {predicate} is not a BOOLEAN")))?;
    let cleaned;
    let mask = if mask.null_count() > 0 {
        cleaned = arrow::compute::prep_null_mask_filter(mask);
        &cleaned
    } else {
        mask
    };
    if mask.true_count() == batch.num_rows() {
        return Ok(batch.clone());
    }
    Ok(batch.filter(mask)?)
}

/// Appends `window_start`, `window_end`, `window_time` (end - 1 ms); HOP and CUMULATE emit one
/// copy of a row per window it falls in. Rows with a NULL time are dropped, as in Flink, and
/// counted in `null_times`.
pub fn assign_windows(
    batch: &ChangeBatch,
    time: &PhysExpr,
    kind: WindowKind,
    schema: &SchemaRef,
    null_times: &std::sync::atomic::AtomicU64,
) -> Result<ChangeBatch> {
    let t = sluice_common::time::to_millis(&evaluate(time, batch)?)?;
    let t = t.as_primitive::<TimestampMillisecondType>();
    if t.null_count() > 0 {
        null_times.fetch_add(t.null_count() as u64, std::sync::atomic::Ordering::Relaxed);
    }
    let mut rows = Vec::with_capacity(t.len());
    let mut starts = Vec::with_capacity(t.len());
    let mut ends = Vec::with_capacity(t.len());
    for i in 0..t.len() {
        if t.is_null(i) {
            continue;
        }
        let ts = t.value(i);
        match kind {
            WindowKind::Tumble { size, offset } => {
                let start = (ts - offset).div_euclid(size) * size + offset;
                rows.push(i as u32);
                starts.push(start);
                ends.push(start + size);
            }
            WindowKind::Hop { size, slide } => {
                let last_start = ts.div_euclid(slide) * slide;
                let mut start = last_start - size + slide;
                while start <= last_start {
                    rows.push(i as u32);
                    starts.push(start);
                    ends.push(start + size);
                    start += slide;
                }
            }
            WindowKind::Session { gap } => {
                // A session of its own; the aggregation above merges overlapping ones.
                rows.push(i as u32);
                starts.push(ts);
                ends.push(ts + gap);
            }
            WindowKind::Cumulate { step, size } => {
                let start = ts.div_euclid(size) * size;
                let mut end = ts.div_euclid(step) * step + step;
                while end <= start + size {
                    rows.push(i as u32);
                    starts.push(start);
                    ends.push(end);
                    end += step;
                }
            }
        }
    }
    let times: Vec<i64> = ends.iter().map(|e| e - 1).collect();
    let base = if rows.len() == t.len() && rows.iter().enumerate().all(|(i, r)| *r as usize == i) {
        batch.clone()
    } else {
        batch.take(&UInt32Array::from(rows))?
    };
    let mut columns = base.data.columns().to_vec();
    for v in [starts, ends, times] {
        columns.push(Arc::new(TimestampMillisecondArray::from(v)) as ArrayRef);
    }
    Ok(base.with_columns(schema.clone(), columns)?)
}

/// A filter and the projection above it, fused by the plan's filter-project-fusion rule
/// ([`sluice_sql::optimize::fusion`]): the calls both make are evaluated once per batch,
/// before the filter, and both read them as columns.
pub struct FilterProject {
    fusion: sluice_sql::optimize::fusion::Fusion,
    schema: SchemaRef,
}

impl FilterProject {
    pub fn new(fusion: sluice_sql::optimize::fusion::Fusion, schema: SchemaRef) -> Self {
        FilterProject { fusion, schema }
    }

    /// Filters and projects one batch.
    pub fn apply(&self, batch: &ChangeBatch) -> Result<ChangeBatch> {
        let f = &self.fusion;
        let mut columns = batch.data.columns().to_vec();
        for e in &f.shared {
            columns.push(evaluate(e, batch)?);
        }
        let extended = batch.with_columns(f.extended.clone(), columns)?;
        project(&filter(&extended, &f.predicate)?, &f.exprs, &self.schema)
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::StringArray;
    use arrow::record_batch::RecordBatch;
    use sluice_sql::StreamNode;

    use super::*;

    /// Nexmark q21's shape: the regex of the WHERE is shared with the SELECT's CASE, and the
    /// fused operator gives what the filter and then the projection give, row for row. A call
    /// guarded by a CASE in the WHERE is not shared.
    #[test]
    fn a_filter_and_its_projection_share_calls() {
        let ddl = "CREATE TABLE bid (channel STRING, url STRING) WITH ('connector' = 'datagen');
            CREATE TABLE out1 (channel STRING, id STRING) WITH ('connector' = 'blackhole');";
        let job = sluice_sql::plan_script(&format!(
            "{ddl}\nINSERT INTO out1 SELECT channel,
               CASE WHEN lower(channel) = 'apple' THEN '0'
                    ELSE REGEXP_EXTRACT(url, '(&|^)channel_id=([^&]*)', 2) END
             FROM bid
             WHERE REGEXP_EXTRACT(url, '(&|^)channel_id=([^&]*)', 2) IS NOT NULL
                OR lower(channel) = 'apple';"
        ))
        .unwrap();
        let node = &job.pipelines[0].query;
        let StreamNode::Project {
            input,
            exprs,
            schema,
        } = node
        else {
            panic!("not a projection");
        };
        let StreamNode::Filter {
            input: below,
            predicate,
        } = input.as_ref()
        else {
            panic!("not a filter below the projection");
        };
        let fusion = sluice_sql::optimize::fusion::fuse(node)
            .unwrap()
            .expect("a shared call");
        let fused = FilterProject::new(fusion, schema.clone());
        let channel = StringArray::from(vec![
            Some("Apple"),
            Some("channel-7"),
            Some("channel-8"),
            None,
            Some("apple"),
        ]);
        let url = StringArray::from(vec![
            Some("https://x/apple/item.htm"),
            Some("https://x/a/b?query=1&channel_id=7"),
            Some("https://x/a/b?query=1"),
            Some("https://x/?channel_id=9&z=1"),
            None,
        ]);
        let batch = ChangeBatch::inserts(
            RecordBatch::try_new(below.schema(), vec![Arc::new(channel), Arc::new(url)]).unwrap(),
        );
        let want = project(&filter(&batch, predicate).unwrap(), exprs, schema).unwrap();
        let got = fused.apply(&batch).unwrap();
        assert_eq!(got.data, want.data);
        assert_eq!(got.ops, want.ops);
        // Apple, channel_id=7, apple (`?channel_id=` does not follow `&` or the start).
        assert_eq!(got.num_rows(), 3);
    }
}
