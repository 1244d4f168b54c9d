//! Helpers the keyed operators (joins, Top-N, OVER, temporal joins) share: Arrow row-format
//! converters for keys, sort keys and whole rows; key bytes and key groups of a batch; and the
//! pieces of their snapshots.

use arrow::array::{ArrayRef, AsArray};
use arrow::compute::SortOptions;
use arrow::datatypes::{Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, Rows, SortField};
use datafusion_common::hash_utils::create_hashes;
use sluice_common::{ChangeBatch, Error, Result};
use sluice_sql::{PhysExpr, SortKey};

use crate::operator::stateless::evaluate;
use crate::runtime::{key_hash_state, KEY_GROUPS};

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

/// A timestamp column of `batch` as milliseconds since the epoch, nulls as `None`.
pub fn event_times(batch: &RecordBatch, column: usize) -> Result<Vec<Option<i64>>> {
    let millis = sluice_common::time::to_millis(batch.column(column))?;
    Ok(millis
        .as_primitive::<arrow::datatypes::TimestampMillisecondType>()
        .iter()
        .collect())
}

/// Decodes snapshot bytes with `decode`, turning a panic of the decoding library into an error.
/// The bytes passed their checksum, so this is a second line: arrow-ipc panics on some malformed
/// schemas and arrow-row on cut rows, where a checkpoint must fail with an error instead.
pub fn guarded<T>(what: &str, decode: impl FnOnce() -> Result<T>) -> Result<T> {
    crate::runtime::panics::quietly(decode).unwrap_or_else(|panic| {
        Err(Error::Runtime(format!(
            "checkpoint: a corrupt {what} snapshot ({panic})"
        )))
    })
}

/// Checks an Arrow IPC stream's framing: every message's metadata parses and its body lies
/// within the bytes. (arrow-ipc allocates the body length a message declares before reading
/// it, so a damaged length would ask for gigabytes.)
fn check_ipc_framing(bytes: &[u8]) -> Result<()> {
    let corrupt = || Error::Runtime("checkpoint: a corrupt Arrow IPC snapshot".into());
    let word = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let mut at = 0usize;
    while let Some(mut len) = word(at) {
        at += 4;
        if len == -1 {
            // The continuation marker, then the metadata length.
            len = word(at).ok_or_else(corrupt)?;
            at += 4;
        }
        let len = usize::try_from(len).map_err(|_| corrupt())?;
        if len == 0 {
            break;
        }
        let meta = bytes.get(at..at + len).ok_or_else(corrupt)?;
        let message = arrow::ipc::root_as_message(meta).map_err(|_| corrupt())?;
        at += len;
        let body = usize::try_from(message.bodyLength()).map_err(|_| corrupt())?;
        if body > bytes.len() - at {
            return Err(corrupt());
        }
        at += body;
    }
    Ok(())
}

/// The first batch of an Arrow IPC stream (rows a snapshot keeps whole).
pub fn ipc_batch(bytes: &[u8]) -> Result<Option<RecordBatch>> {
    check_ipc_framing(bytes)?;
    guarded("Arrow IPC", || {
        let mut r = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)?;
        Ok(r.next().transpose()?)
    })
}

/// Checks that restored rows decode with `converter`, so that no later use of them panics.
pub fn check_rows<'a>(
    converter: &RowConverter,
    rows: impl Iterator<Item = &'a [u8]>,
    what: &str,
) -> Result<()> {
    let parser = converter.parser();
    let rows: Vec<&[u8]> = rows.collect();
    for chunk in rows.chunks(4096) {
        guarded(what, || {
            converter.convert_rows(chunk.iter().map(|r| parser.parse(r)))?;
            Ok(())
        })?;
    }
    Ok(())
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
