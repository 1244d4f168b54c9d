//! Helpers the keyed operators (joins, Top-N, OVER, temporal joins) share: Arrow row-format
//! converters for keys, sort keys and whole rows; key bytes and key groups of a batch; and the
//! pieces of their snapshots.

use arrow::array::ArrayRef;
use arrow::compute::SortOptions;
use arrow::datatypes::{Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, Rows, SortField};
use datafusion_common::hash_utils::create_hashes;
use sluice_common::{ChangeBatch, Error, Result};
use sluice_sql::{PhysExpr, SortKey};

use crate::dataflow::{key_hash_state, KEY_GROUPS};
use crate::stateless::evaluate;

fn data_type(e: &PhysExpr, schema: &Schema) -> Result<arrow::datatypes::DataType> {
    e.data_type(schema)
        .map_err(|e| Error::plan(e.strip_backtrace()))
}

/// Row format of the values of `exprs` (keys), compared for equality.
pub fn key_converter(exprs: &[PhysExpr], schema: &Schema) -> Result<RowConverter> {
    Ok(RowConverter::new(key_fields(exprs, schema)?)?)
}

/// The row-format fields of key expressions (for a [`sluice_state::GroupTable`]).
pub fn key_fields(exprs: &[PhysExpr], schema: &Schema) -> Result<Vec<SortField>> {
    exprs
        .iter()
        .map(|e| Ok(SortField::new(data_type(e, schema)?)))
        .collect()
}

/// Row format whose byte order is the SQL order of `order`.
pub fn sort_converter(order: &[SortKey], schema: &Schema) -> Result<RowConverter> {
    let fields = order
        .iter()
        .map(|k| {
            Ok(SortField::new_with_options(
                data_type(&k.expr, schema)?,
                SortOptions {
                    descending: !k.asc,
                    nulls_first: k.nulls_first,
                },
            ))
        })
        .collect::<Result<_>>()?;
    Ok(RowConverter::new(fields)?)
}

/// Row format of whole rows of `schema`.
pub fn row_converter(schema: &Schema) -> Result<RowConverter> {
    Ok(RowConverter::new(
        schema
            .fields()
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect(),
    )?)
}

/// Evaluates key expressions over a batch.
pub fn key_arrays(exprs: &[PhysExpr], batch: &ChangeBatch) -> Result<Vec<ArrayRef>> {
    exprs.iter().map(|e| evaluate(e, batch)).collect()
}

/// The key group of every row, from the same hash the exchange routes by.
pub fn key_groups(arrays: &[ArrayRef], rows: usize) -> Result<Vec<u16>> {
    let mut hashes = vec![0u64; rows];
    if !arrays.is_empty() {
        create_hashes(arrays, &key_hash_state(), &mut hashes)
            .map_err(|e| Error::Runtime(e.strip_backtrace()))?;
    }
    Ok(hashes.iter().map(|h| (h % KEY_GROUPS) as u16).collect())
}

/// Each row's key bytes; without key columns (a global partition) every key is empty.
pub fn key_bytes(rows: &Rows, no_columns: bool, n: usize) -> Vec<&[u8]> {
    if no_columns {
        return vec![&[]; n];
    }
    (0..n).map(|i| rows.row(i).data()).collect()
}

/// Checks that a snapshot batch has the layout this operator writes.
pub fn check_layout(batch: &RecordBatch, expected: &SchemaRef, what: &str) -> Result<()> {
    if batch.schema().fields() != expected.fields() {
        return Err(Error::Runtime(format!(
            "checkpoint: a {what} snapshot has an unexpected layout"
        )));
    }
    Ok(())
}

/// The first batch of an Arrow IPC stream (rows a snapshot keeps whole).
pub fn ipc_batch(bytes: &[u8]) -> Result<Option<RecordBatch>> {
    let mut r = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)?;
    Ok(r.next().transpose()?)
}

/// The rows of `batch` whose key (by `keys`) falls in a key group `owns` accepts.
pub fn owned_rows(
    batch: &RecordBatch,
    keys: &[PhysExpr],
    owns: &dyn Fn(u16) -> bool,
) -> Result<Option<RecordBatch>> {
    let arrays = key_arrays(keys, &ChangeBatch::inserts(batch.clone()))?;
    let groups = key_groups(&arrays, batch.num_rows())?;
    let mine: Vec<u32> = (0..batch.num_rows() as u32)
        .filter(|r| owns(groups[*r as usize]))
        .collect();
    if mine.is_empty() {
        return Ok(None);
    }
    Ok(Some(arrow::compute::take_record_batch(
        batch,
        &arrow::array::UInt32Array::from(mine),
    )?))
}

/// The columns of two inputs side by side, as a join's condition sees them.
pub fn side_by_side(left: &Schema, right: &Schema) -> SchemaRef {
    std::sync::Arc::new(Schema::new(
        left.fields()
            .iter()
            .chain(right.fields().iter())
            .cloned()
            .collect::<Vec<_>>(),
    ))
}
