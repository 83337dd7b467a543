//! Reading a block's weights by their HF names: shapes checked, progress reported by bytes read, each
//! weight stored on the device as the model's format and kernels want it.

use std::ops::Range;

use burn::tensor::Device;

use crate::error::{Error, Result};
use crate::gpu::{Kernels, Linear, Rows, WeightDtype, WeightsHost};
use crate::load::{Progress, StoredRows, WeightSet};

/// Reads tensors by HF name, checking shapes, and reports progress by bytes read.
pub(crate) struct Reader<'a> {
    pub(crate) set: &'a WeightSet,
    /// How weights are stored, what runs them and where.
    pub(crate) dtype: WeightDtype,
    pub(crate) kernels: Kernels,
    pub(crate) device: &'a Device,
    pub(crate) done: u64,
    pub(crate) total: u64,
    pub(crate) progress: &'a mut dyn FnMut(Progress),
}

impl<'a> Reader<'a> {
    pub(crate) fn advance(&mut self, bytes: u64) {
        self.done += bytes;
        (self.progress)(Progress {
            loaded: self.done.min(self.total),
            total: self.total,
        });
    }

    /// The whole tensor `name` as f32.
    pub(crate) async fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.set.read(name, shape).await?.data;
        self.advance(self.set.byte_len(name));
        Ok(t)
    }

    /// Appends rows `rows` of the 2-D tensor `name` (`[out, in]`) as f32 to `out`.
    pub(crate) async fn append(
        &mut self,
        name: &str,
        shape: [usize; 2],
        rows: Range<usize>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let part = self.set.byte_len(name) * rows.len() as u64 / shape[0].max(1) as u64;
        self.set.append_rows(name, &shape, rows, out).await?;
        self.advance(part);
        Ok(())
    }

    /// Rows `rows` of the 2-D tensor `name` (`[out, in]`) as the file stores them.
    pub(crate) async fn stored(&mut self, name: &str, shape: [usize; 2], rows: Range<usize>) -> Result<StoredRows<'a>> {
        let part = self.set.byte_len(name) * rows.len() as u64 / shape[0].max(1) as u64;
        let set = self.set;
        let stored = set.stored_rows(name, &shape, rows).await?;
        self.advance(part);
        Ok(stored)
    }

    /// Rows `rows` of `names` stacked along their rows (each `[each, cols]`; e.g. gate_proj then up_proj), as
    /// stored, in order.
    pub(crate) async fn stacked(
        &mut self,
        names: &[String],
        each: usize,
        cols: usize,
        rows: Range<usize>,
    ) -> Result<Vec<StoredRows<'a>>> {
        let mut out = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let own = i * each..(i + 1) * each;
            let (start, end) = (rows.start.max(own.start), rows.end.min(own.end));
            if start < end {
                out.push(
                    self.stored(name, [each, cols], start - own.start..end - own.start)
                        .await?,
                );
            }
        }
        Ok(out)
    }

    /// A projection from the rows of `names` stacked (`[each, cols]` each), read and stored a part at a time.
    pub(crate) async fn linear(&mut self, names: &[String], each: usize, cols: usize) -> Result<Linear> {
        let (dtype, device) = (self.dtype, self.device);
        let mut parts = Vec::new();
        for range in Linear::part_rows(names.len() * each, cols, dtype, self.kernels) {
            let rows = self.stacked(names, each, cols, range.clone()).await?;
            let mut host = WeightsHost::new(dtype, [1, cols, range.len()]);
            push(&mut host, &rows)?;
            drop(rows);
            parts.push(host.upload([cols, range.len()], device));
        }
        Ok(Linear::from_parts(parts, self.kernels))
    }
}

/// Adds the matrix whose HF rows are `parts` to `host`; a value that is not finite is an error naming its
/// file, tensor and index.
pub(crate) fn push(host: &mut WeightsHost, parts: &[StoredRows<'_>]) -> Result<()> {
    let rows: Vec<Rows<'_>> = parts.iter().map(StoredRows::rows).collect();
    if host.push(&rows) {
        return Ok(());
    }
    for p in parts {
        p.check_finite()?;
    }
    Err(Error::InvalidArgument("a weight holds a non-finite value".into()))
}
