//! lb (in progress).
