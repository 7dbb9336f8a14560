//! Biplane resource model.
