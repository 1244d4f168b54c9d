//! Exactly-once output for systems whose writes cannot wait for a checkpoint inside a
//! transaction of their own (Kafka's can, but only once the checkpoint commits; NATS and Redis
//! have none that spans it): each checkpoint's output is staged durably beside the checkpoints
//! when it is sealed, and written once the checkpoint commits. A crash between the two leaves
//! the staged output for the next run, which writes it again in a way the system makes
//! idempotent (a transaction marker, message ids, an epoch marker).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sluice_common::{Error, Result};

use crate::Staging;

/// One writer's staged output, items of `T` per checkpoint.
pub struct Staged<T> {
    table: String,
    /// Names are `<prefix><worker>-e<epoch>`.
    prefix: String,
    worker: usize,
    staging: Option<Arc<dyn Staging>>,
    /// Items since the last sealed checkpoint, and those sealed but not yet written.
    pending: Vec<T>,
    sealed: BTreeMap<u64, Vec<T>>,
    /// Checkpoints written at the last commit: their staged files stay until the next one, so
    /// that a crash right after finds them (and the system's marker says they are done).
    written: Vec<u64>,
}

impl<T: Serialize + DeserializeOwned> Staged<T> {
    /// The staged output of `table`'s writer; `connector` and `instance` (which of the job's
    /// INSERTs into the table) make the names unique.
    pub fn new(connector: &str, table: &str, instance: usize) -> Self {
        Staged {
            table: table.to_string(),
            prefix: format!("{connector}-{table}-{instance}-w"),
            worker: 0,
            staging: None,
            pending: vec![],
            sealed: BTreeMap::new(),
            written: vec![],
        }
    }

    pub fn set_staging(&mut self, staging: Arc<dyn Staging>) {
        self.staging = Some(staging);
    }

    fn staging(&self) -> Result<Arc<dyn Staging>> {
        self.staging
            .clone()
            .ok_or_else(|| Error::connector(&self.table, "exactly-once needs checkpoint staging"))
    }

    fn name(&self, worker: usize, epoch: u64) -> String {
        format!("{}{worker}-e{epoch:020}", self.prefix)
    }

    /// Items to write with the next sealed checkpoint.
    pub fn push(&mut self, items: impl IntoIterator<Item = T>) {
        self.pending.extend(items);
    }

    /// The items not sealed yet (a job without checkpoints writes them at its end).
    pub fn take_pending(&mut self) -> Vec<T> {
        std::mem::take(&mut self.pending)
    }

    /// At the start of a run as worker `worker` of `workers`: the staged checkpoints of this
    /// worker and of the earlier workers it replaces, oldest first. Those of committed
    /// checkpoints (up to `committed`) go to `replay(earlier worker, epoch, items)`, which
    /// writes them unless the system shows they were; those of checkpoints never committed are
    /// dropped (their rows come again from the sources). Either way the staged file goes.
    pub fn settle(
        &mut self,
        committed: Option<u64>,
        worker: usize,
        workers: usize,
        mut replay: impl FnMut(usize, u64, Vec<T>) -> Result<()>,
    ) -> Result<()> {
        self.worker = worker;
        let staging = self.staging()?;
        for (old, files) in crate::staged_checkpoints(&*staging, &self.prefix, worker, workers)? {
            for (epoch, name) in files {
                if committed.is_some_and(|c| epoch <= c) {
                    let bytes = staging.get(&name)?;
                    let items: Vec<T> = serde_json::from_slice(&bytes).map_err(|e| {
                        Error::connector(&self.table, format!("staged output {name}: {e}"))
                    })?;
                    replay(old, epoch, items)?;
                }
                staging.remove(&name)?;
            }
        }
        Ok(())
    }

    /// Seals the pending items as checkpoint `epoch`'s, staged durably.
    pub fn seal(&mut self, epoch: u64) -> Result<()> {
        let items = std::mem::take(&mut self.pending);
        let bytes =
            serde_json::to_vec(&items).map_err(|e| Error::connector(&self.table, e.to_string()))?;
        self.staging()?.put(&self.name(self.worker, epoch), bytes)?;
        self.sealed.insert(epoch, items);
        Ok(())
    }

    /// Checkpoint `epoch` committed: the sealed checkpoints it covers, oldest first, each to
    /// `write(worker, epoch, items)`; then the staged files of the previous commit go.
    pub fn commit(
        &mut self,
        epoch: u64,
        mut write: impl FnMut(usize, u64, &[T]) -> Result<()>,
    ) -> Result<()> {
        let due: Vec<u64> = self.sealed.range(..=epoch).map(|(e, _)| *e).collect();
        if due.is_empty() {
            return Ok(());
        }
        for e in &due {
            let items = self.sealed.remove(e).expect("listed above");
            write(self.worker, *e, &items)?;
        }
        let staging = self.staging()?;
        for e in std::mem::take(&mut self.written) {
            staging.remove(&self.name(self.worker, e))?;
        }
        self.written = due;
        Ok(())
    }
}

/// A message body as staged: UTF-8 text is kept as a JSON string (as readable, and as small,
/// as the text), other bytes (an Avro record) as an array of numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payload(pub Vec<u8>);

impl std::ops::Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl Serialize for Payload {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) => s.serialize_str(text),
            Err(_) => s.serialize_bytes(&self.0),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Payload {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Payload;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or an array of bytes")
            }
            fn visit_str<E>(self, v: &str) -> std::result::Result<Payload, E> {
                Ok(Payload(v.as_bytes().to_vec()))
            }
            fn visit_string<E>(self, v: String) -> std::result::Result<Payload, E> {
                Ok(Payload(v.into_bytes()))
            }
            fn visit_bytes<E>(self, v: &[u8]) -> std::result::Result<Payload, E> {
                Ok(Payload(v.to_vec()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Payload, A::Error> {
                let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(b) = seq.next_element::<u8>()? {
                    bytes.push(b);
                }
                Ok(Payload(bytes))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A change batch as staged: Arrow IPC (with the change kinds as a column), in base64.
#[derive(Clone, Debug)]
pub struct IpcBatch(pub sluice_common::ChangeBatch);

impl Serialize for IpcBatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use base64::Engine;
        use serde::ser::Error as _;
        let b = &self.0;
        let ops =
            arrow::array::Int8Array::from_iter_values((0..b.num_rows()).map(|i| b.op(i) as i8));
        let mut fields: Vec<_> = b.data.schema().fields().iter().cloned().collect();
        fields.push(std::sync::Arc::new(sluice_common::changelog::op_field()));
        let mut columns = b.data.columns().to_vec();
        columns.push(std::sync::Arc::new(ops));
        let data = arrow::record_batch::RecordBatch::try_new(
            std::sync::Arc::new(arrow::datatypes::Schema::new(fields)),
            columns,
        )
        .map_err(S::Error::custom)?;
        let mut bytes = vec![];
        {
            let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut bytes, &data.schema())
                .map_err(S::Error::custom)?;
            w.write(&data).map_err(S::Error::custom)?;
            w.finish().map_err(S::Error::custom)?;
        }
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }
}

impl<'de> serde::Deserialize<'de> for IpcBatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use base64::Engine;
        use serde::de::Error as _;
        let text = String::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(D::Error::custom)?;
        let mut reader =
            arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
                .map_err(D::Error::custom)?;
        let batch = reader
            .next()
            .ok_or_else(|| D::Error::custom("a staged batch without rows"))?
            .map_err(D::Error::custom)?;
        sluice_common::ChangeBatch::from_op_column(batch)
            .map(IpcBatch)
            .map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::Payload;

    #[test]
    fn change_batches_stage_as_ipc() {
        use arrow::array::Int64Array;
        use arrow::datatypes::{DataType, Field, Schema};
        use sluice_common::{ChangeBatch, Op};
        let schema = std::sync::Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, true)]));
        let data = arrow::record_batch::RecordBatch::try_new(
            schema,
            vec![std::sync::Arc::new(Int64Array::from(vec![
                Some(1),
                None,
                Some(3),
            ]))],
        )
        .unwrap();
        let batch =
            ChangeBatch::with_ops(data.clone(), vec![Op::Insert, Op::Delete, Op::UpdateAfter]);
        let json = serde_json::to_string(&vec![super::IpcBatch(batch)]).unwrap();
        let back: Vec<super::IpcBatch> = serde_json::from_str(&json).unwrap();
        assert_eq!(back[0].0.data, data);
        let ops: Vec<Op> = (0..3).map(|i| back[0].0.op(i)).collect();
        assert_eq!(ops, vec![Op::Insert, Op::Delete, Op::UpdateAfter]);
    }

    #[test]
    fn payloads_stage_as_text_or_bytes() {
        let items = vec![
            (Some(Payload(b"{\"a\":1}".to_vec())), None),
            (None, Some(Payload(vec![0, 0xFF, 7]))),
        ];
        let json = serde_json::to_string(&items).unwrap();
        assert_eq!(json, r#"[["{\"a\":1}",null],[null,[0,255,7]]]"#);
        let back: Vec<(Option<Payload>, Option<Payload>)> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, items);
    }
}
