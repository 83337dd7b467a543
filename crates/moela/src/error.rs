//! The one error type of the engine. Every message names the file, tensor, field or limit at fault.

use std::path::PathBuf;

/// Everything that can go wrong in moela, with enough context to fix it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// config.json is not valid JSON or has a field of the wrong type.
    #[error("{file}: {message}")]
    ConfigParse {
        /// The file (usually config.json).
        file: String,
        /// What is wrong.
        message: String,
    },
    /// A config field has a value moela does not support.
    #[error("config.json: unsupported {field} = {value}: {hint}")]
    Unsupported {
        /// The field name as spelled in config.json.
        field: String,
        /// The value found.
        value: String,
        /// What is supported instead.
        hint: String,
    },
    /// A config field is inconsistent with another or out of range.
    #[error("config.json: invalid {field}: {message}")]
    InvalidConfig {
        /// The field name.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A weight file (safetensors or GGUF) is corrupt, truncated or has a bad header.
    #[error("{file}: {message}")]
    Weights {
        /// The file.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// A tensor the model needs is absent from every weight file.
    #[error("missing tensor {tensor} (looked in {files})")]
    MissingTensor {
        /// The HF tensor name.
        tensor: String,
        /// The files searched.
        files: String,
    },
    /// A tensor has a shape different from what config.json implies.
    #[error("{file}: tensor {tensor} has shape {found:?}, expected {expected:?} from config.json")]
    ShapeMismatch {
        /// The file holding the tensor.
        file: String,
        /// The HF tensor name.
        tensor: String,
        /// The shape in the file.
        found: Vec<usize>,
        /// The shape implied by the config.
        expected: Vec<usize>,
    },
    /// A tensor has a dtype moela cannot convert.
    #[error("{file}: tensor {tensor} has unsupported dtype {dtype} (supported: BF16, F16, F32)")]
    DType {
        /// The file.
        file: String,
        /// The HF tensor name.
        tensor: String,
        /// The dtype found.
        dtype: String,
    },
    /// The tokenizer or its config could not be loaded or used.
    #[error("{file}: {message}")]
    Tokenizer {
        /// tokenizer.json or tokenizer_config.json.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// The chat template failed to render.
    #[error("chat template (tokenizer_config.json): {0}")]
    Template(String),
    /// A limit was exceeded: context length, token ids, sizes.
    #[error("{0}")]
    Limit(String),
    /// A bad argument from the caller (sampling options, token ids, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No GPU adapter, or the device failed.
    #[error("GPU: {0}")]
    Device(String),
}

/// Result with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
