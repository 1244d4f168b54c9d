//! The changelog batch: Arrow rows, each tagged with a change kind.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, Int8Array, StringArray, UInt32Array};
use arrow::compute::{concat_batches, filter_record_batch, take_record_batch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;

/// The last column of a batch read from a changelog format: each row's [`Op`] as Int8.
pub const OP_COLUMN: &str = "__op";

/// The field of [`OP_COLUMN`].
pub fn op_field() -> Field {
    Field::new(OP_COLUMN, DataType::Int8, false)
}

/// `schema` with every column nullable: the rows of an upsert table as they arrive, where a
/// delete holds only its key's columns.
pub fn all_nullable(schema: &Schema) -> SchemaRef {
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
    ))
}

/// The kind of change a row carries, with Flink's short names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i8)]
pub enum Op {
    /// `+I`: a new row.
    Insert = 0,
    /// `-U`: the old value of an updated row.
    UpdateBefore = 1,
    /// `+U`: the new value of an updated row.
    UpdateAfter = 2,
    /// `-D`: a row removed.
    Delete = 3,
}

impl Op {
    /// Decodes the stored byte.
    pub fn from_i8(v: i8) -> Op {
        match v {
            1 => Op::UpdateBefore,
            2 => Op::UpdateAfter,
            3 => Op::Delete,
            _ => Op::Insert,
        }
    }

    /// `+1` for rows that add to a result, `-1` for rows that retract.
    pub fn sign(self) -> i64 {
        match self {
            Op::Insert | Op::UpdateAfter => 1,
            Op::UpdateBefore | Op::Delete => -1,
        }
    }

    /// Flink's short name, as printed in the `op` column.
    pub fn short_name(self) -> &'static str {
        match self {
            Op::Insert => "+I",
            Op::UpdateBefore => "-U",
            Op::UpdateAfter => "+U",
            Op::Delete => "-D",
        }
    }
}

/// A batch of rows with their change kinds. `ops == None` means every row is `+I`.
#[derive(Clone, Debug)]
pub struct ChangeBatch {
    pub data: RecordBatch,
    pub ops: Option<Int8Array>,
}

impl ChangeBatch {
    /// An append-only batch: every row is an insert.
    pub fn inserts(data: RecordBatch) -> Self {
        ChangeBatch { data, ops: None }
    }

    /// A batch whose rows carry the given change kinds.
    pub fn with_ops(data: RecordBatch, ops: Vec<Op>) -> Self {
        debug_assert_eq!(data.num_rows(), ops.len());
        if ops.iter().all(|op| *op == Op::Insert) {
            return ChangeBatch::inserts(data);
        }
        let ops = Int8Array::from_iter_values(ops.into_iter().map(|op| op as i8));
        ChangeBatch {
            data,
            ops: Some(ops),
        }
    }

    /// Number of rows.
    pub fn num_rows(&self) -> usize {
        self.data.num_rows()
    }

    /// The schema of the data rows (without the change kind).
    pub fn schema(&self) -> SchemaRef {
        self.data.schema()
    }

    /// The change kind of row `i`.
    #[inline]
    pub fn op(&self, i: usize) -> Op {
        match &self.ops {
            None => Op::Insert,
            Some(ops) => Op::from_i8(ops.value(i)),
        }
    }

    /// True when every row is an insert.
    pub fn is_append_only(&self) -> bool {
        self.ops.is_none()
    }

    /// Keeps the rows where `mask` is true.
    pub fn filter(&self, mask: &BooleanArray) -> Result<ChangeBatch, ArrowError> {
        let data = filter_record_batch(&self.data, mask)?;
        let ops = match &self.ops {
            None => None,
            Some(ops) => Some(
                arrow::compute::filter(ops, mask)?
                    .as_any()
                    .downcast_ref::<Int8Array>()
                    .cloned()
                    .expect("int8"),
            ),
        };
        Ok(ChangeBatch { data, ops })
    }

    /// Gathers the rows at `indices`.
    /// Rows `offset..offset + len` (zero-copy).
    pub fn slice(&self, offset: usize, len: usize) -> ChangeBatch {
        ChangeBatch {
            data: self.data.slice(offset, len),
            ops: self.ops.as_ref().map(|o| o.slice(offset, len)),
        }
    }

    pub fn take(&self, indices: &UInt32Array) -> Result<ChangeBatch, ArrowError> {
        let data = take_record_batch(&self.data, indices)?;
        let ops = match &self.ops {
            None => None,
            Some(ops) => Some(
                arrow::compute::take(ops, indices, None)?
                    .as_any()
                    .downcast_ref::<Int8Array>()
                    .cloned()
                    .expect("int8"),
            ),
        };
        Ok(ChangeBatch { data, ops })
    }

    /// Replaces the data columns, keeping the change kinds (for projections).
    pub fn with_columns(
        &self,
        schema: SchemaRef,
        columns: Vec<ArrayRef>,
    ) -> Result<ChangeBatch, ArrowError> {
        let options =
            arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(self.num_rows()));
        let data = RecordBatch::try_new_with_options(schema, columns, &options)?;
        Ok(ChangeBatch {
            data,
            ops: self.ops.clone(),
        })
    }

    /// A source's batch whose last column, [`OP_COLUMN`], holds each row's change kind (as
    /// changelog formats decode), as a change batch of the other columns.
    pub fn from_op_column(batch: RecordBatch) -> Result<ChangeBatch, ArrowError> {
        let last = batch.num_columns().checked_sub(1).filter(|i| {
            batch.schema().field(*i).name() == OP_COLUMN
                && batch.column(*i).data_type() == &DataType::Int8
        });
        let Some(last) = last else {
            return Err(ArrowError::SchemaError(format!(
                "internal: a changelog source's batch has no trailing '{OP_COLUMN}' column"
            )));
        };
        let ops = batch
            .column(last)
            .as_any()
            .downcast_ref::<Int8Array>()
            .expect("checked to be Int8")
            .clone();
        let mut data = batch;
        data.remove_column(last);
        if ops.values().iter().all(|op| *op == Op::Insert as i8) {
            return Ok(ChangeBatch::inserts(data));
        }
        Ok(ChangeBatch {
            data,
            ops: Some(ops),
        })
    }

    /// Concatenates batches of one schema.
    pub fn concat(schema: &SchemaRef, batches: &[ChangeBatch]) -> Result<ChangeBatch, ArrowError> {
        let data = concat_batches(schema, batches.iter().map(|b| &b.data))?;
        if batches.iter().all(|b| b.ops.is_none()) {
            return Ok(ChangeBatch::inserts(data));
        }
        let mut ops = Vec::with_capacity(data.num_rows());
        for b in batches {
            for i in 0..b.num_rows() {
                ops.push(b.op(i));
            }
        }
        Ok(ChangeBatch::with_ops(data, ops))
    }

    /// The rows with a leading `op` column holding `+I`/`-U`/`+U`/`-D`, for display.
    pub fn with_op_column(&self) -> Result<RecordBatch, ArrowError> {
        let ops: StringArray = (0..self.num_rows())
            .map(|i| Some(self.op(i).short_name()))
            .collect();
        let mut fields = vec![Arc::new(Field::new("op", DataType::Utf8, false))];
        fields.extend(self.data.schema().fields().iter().cloned());
        let mut columns: Vec<ArrayRef> = vec![Arc::new(ops)];
        columns.extend(self.data.columns().iter().cloned());
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
    }
}
