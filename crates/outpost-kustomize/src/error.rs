//! What can go wrong while rendering, always naming the file and the field.

/// A render failure. `file` is the path of the kustomization or resource file at fault,
/// `field` the field in it (`patches[1].target`, `document 2`), `reason` what is wrong and,
/// where there is one, what to do instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A kustomization field outpost deliberately does not implement.
    #[error("{file}: field `{field}` is not supported by outpost's Kustomize engine ({hint})")]
    Unsupported { file: String, field: String, hint: String },
    /// A value that is missing, malformed or contradicts the tree.
    #[error("{file}: field `{field}`: {reason}")]
    Invalid {
        file: String,
        field: String,
        reason: String,
    },
    /// A file or directory that cannot be read.
    #[error("{path}: {reason}")]
    Read { path: String, reason: String },
}

impl Error {
    pub(crate) fn invalid(file: &str, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            file: file.to_string(),
            field: field.into(),
            reason: reason.into(),
        }
    }
    pub(crate) fn read(path: &str, reason: impl Into<String>) -> Self {
        Error::Read {
            path: path.to_string(),
            reason: reason.into(),
        }
    }
    /// The file the error is about.
    pub fn file(&self) -> &str {
        match self {
            Error::Unsupported { file, .. } | Error::Invalid { file, .. } => file,
            Error::Read { path, .. } => path,
        }
    }
    /// The field the error is about (empty for unreadable files).
    pub fn field(&self) -> &str {
        match self {
            Error::Unsupported { field, .. } | Error::Invalid { field, .. } => field,
            Error::Read { .. } => "",
        }
    }
}
