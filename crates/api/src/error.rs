//! Validation errors: every problem in an input, each with its document, resource and field
//! path.

use std::fmt;

/// One problem in an input.
///
/// `document` is the 0-based position of the document among the non-empty documents of the
/// input (YAML documents separated by `---`, elements of a JSON array, or `items` of a
/// `List`). **Display prints it 1-based** ("document 1" is the first document), as people
/// count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// 0-based document index (printed 1-based).
    pub document: usize,
    /// The document's `kind` when it could be read.
    pub kind: Option<String>,
    /// The resource's effective namespace when its name could be read.
    pub namespace: Option<String>,
    /// `metadata.name` when it could be read.
    pub name: Option<String>,
    /// Field path inside the document, e.g. `spec.rules[2].backendRefs[0].weight`; empty for
    /// the whole document.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}", self.document + 1)?;
        match (&self.kind, &self.name) {
            (Some(kind), Some(name)) => {
                let ns = self
                    .namespace
                    .as_deref()
                    .unwrap_or(crate::meta::DEFAULT_NAMESPACE);
                write!(f, " ({kind} {ns}/{name})")?;
            }
            (Some(kind), None) => write!(f, " ({kind})")?,
            (None, _) => {}
        }
        if self.path.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for ValidationError {}

/// Every problem found in an input (never empty when returned as an error).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ValidationErrors(pub Vec<ValidationError>);

impl ValidationErrors {
    /// The errors.
    pub fn errors(&self) -> &[ValidationError] {
        &self.0
    }
    /// Number of errors.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for ValidationErrors {
    /// One error per line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

impl IntoIterator for ValidationErrors {
    type Item = ValidationError;
    type IntoIter = std::vec::IntoIter<ValidationError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}
