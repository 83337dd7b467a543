//! Reading a block's weights by their HF names: shapes checked, progress reported by bytes read, each
//! weight stored on the device as the model's format and kernels want it.

use std::ops::Range;

use burn::tensor::Device;

use crate::error::{Error, Result};
use crate::gpu::{Kernels, Linear, Rows, WeightDtype, WeightsHost};
use crate::load::{Progress, StoredRows, WeightSet};

/// Rows read at a time from a large tensor: 64 MiB as f32.
pub(crate) const SLICE_BYTES: usize = 64 << 20;

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

    /// The format a weight made of the rows of `names` is stored in: the model's, but for a K-quant model
    /// (q4k, q5k, q6k), which keeps a GGUF file's `Q4_K` / `Q5_K` / `Q6_K` blocks as they are and stores a tensor of
    /// another quantised ggml type in that type's nearest format (q8 holds Q8_0 exactly, q5 Q5_0, q4 Q4_0):
    /// a `Q4_K_M` or `Q5_K_M` file mixes them. `rebuilt`: the weight is made from the values (cut across its
    /// blocks, as the shared experts' down projection is cut by columns), so no block can be copied, and a
    /// quantised file's values go to q8 rather than being rounded to 4 or 5 bits a second time. Rows
    /// reordered or joined are not rebuilt ([`linear_rows`](Self::linear_rows)). Float tensors (safetensors, F32 / F16 / BF16 GGUF) are
    /// quantised to the model's format.
    pub(crate) fn format_for(&self, names: &[&str], rebuilt: bool) -> WeightDtype {
        if !self.dtype.is_k_quant() {
            return self.dtype;
        }
        let stored: Vec<WeightDtype> = names
            .iter()
            .filter_map(|n| self.set.ggml_type(n))
            .map(|t| t.nearest_format())
            .filter(|f| f.is_packed() && *f != WeightDtype::F16)
            .collect();
        if rebuilt && !stored.is_empty() {
            return WeightDtype::Q8;
        }
        // Parts stored in different formats (one weight joining tensors of two types) take the most precise.
        stored
            .into_iter()
            .max_by(|a, b| a.bits().total_cmp(&b.bits()))
            .unwrap_or(self.dtype)
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
        let named: Vec<&str> = names.iter().map(String::as_str).collect();
        let (dtype, device) = (self.format_for(&named, false), self.device);
        let mut parts = Vec::new();
        // A slice of rows at a time (whole packing tasks of 64 outputs), released once packed: the host
        // holds one slice of the checkpoint, however large the part (V2-Lite's head is 420 MB of bf16).
        let step = (SLICE_BYTES / (cols * 4).max(1)).max(64) / 64 * 64;
        for range in Linear::part_rows(names.len() * each, cols, dtype, self.kernels) {
            let mut host = WeightsHost::new(dtype, [1, cols, range.len()]);
            for start in range.clone().step_by(step) {
                let end = (start + step).min(range.end);
                let rows = self.stacked(names, each, cols, start..end).await?;
                push_outputs(&mut host, start - range.start..end - range.start, &rows)?;
            }
            parts.push(host.upload([cols, range.len()], device));
        }
        Ok(Linear::from_parts(parts, self.kernels))
    }

    /// A projection whose output `j` is row `order[j].1` of the tensor `sources[order[j].0]` (each
    /// `(name, rows)`, 2-D, `cols` wide): rows reordered (rope's pairs) or joined (the attention's query and
    /// kv_a, which read the same input). Whole rows move, so a quantised file's blocks are kept as they are.
    pub(crate) async fn linear_rows(
        &mut self,
        sources: &[(String, usize)],
        cols: usize,
        order: &[(usize, usize)],
    ) -> Result<Linear> {
        let named: Vec<&str> = sources.iter().map(|(n, _)| n.as_str()).collect();
        let (dtype, kernels, device) = (self.format_for(&named, false), self.kernels, self.device);
        let mut stored = Vec::with_capacity(sources.len());
        for (name, rows) in sources {
            stored.push(self.stored(name, [*rows, cols], 0..*rows).await?);
        }
        let whole: Vec<Rows<'_>> = stored.iter().map(StoredRows::rows).collect();
        let mut parts = Vec::new();
        for range in Linear::part_rows(order.len(), cols, dtype, kernels) {
            // Runs of consecutive rows of one source, in output order.
            let mut runs: Vec<(usize, Range<usize>)> = Vec::new();
            for &(source, row) in &order[range.clone()] {
                match runs.last_mut() {
                    Some((s, rows)) if *s == source && rows.end == row => rows.end += 1,
                    _ => runs.push((source, row..row + 1)),
                }
            }
            let rows: Vec<Rows<'_>> = runs
                .iter()
                .map(|(s, r)| whole[*s].slice(r.start * cols..r.end * cols))
                .collect();
            let mut host = WeightsHost::new(dtype, [1, cols, range.len()]);
            finite(host.push(&rows), &stored)?;
            parts.push(host.upload([cols, range.len()], device));
        }
        Ok(Linear::from_parts(parts, kernels))
    }
}

/// Adds the matrix whose HF rows are `parts` to `host`; a value that is not finite is an error naming its
/// file, tensor and index.
pub(crate) fn push(host: &mut WeightsHost, parts: &[StoredRows<'_>]) -> Result<()> {
    let rows: Vec<Rows<'_>> = parts.iter().map(StoredRows::rows).collect();
    finite(host.push(&rows), parts)
}

/// Adds the matrix made of columns `columns` of each row of `stored` (rows `width` wide) to `host`, the
/// stored blocks as they are: an expert cut out of the shared experts' down projection.
///
/// # Panics
/// When the columns do not start and end on a block of the stored type.
pub(crate) fn push_columns(
    host: &mut WeightsHost,
    stored: &StoredRows<'_>,
    width: usize,
    columns: Range<usize>,
) -> Result<()> {
    let whole = stored.rows();
    let rows: Vec<Rows<'_>> = (0..whole.len() / width.max(1))
        .map(|r| whole.slice(r * width + columns.start..r * width + columns.end))
        .collect();
    finite(host.push(&rows), std::slice::from_ref(stored))
}

/// [`push`] of outputs `outputs` of a one-matrix weight ([`WeightsHost::push_outputs`]).
fn push_outputs(host: &mut WeightsHost, outputs: Range<usize>, parts: &[StoredRows<'_>]) -> Result<()> {
    let rows: Vec<Rows<'_>> = parts.iter().map(StoredRows::rows).collect();
    finite(host.push_outputs(outputs, &rows), parts)
}

/// `Ok` when the packer found every value finite, else the error naming the first that is not.
fn finite(ok: bool, parts: &[StoredRows<'_>]) -> Result<()> {
    if ok {
        return Ok(());
    }
    for p in parts {
        p.check_finite()?;
    }
    Err(Error::InvalidArgument("a weight holds a non-finite value".into()))
}
