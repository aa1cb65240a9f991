//! Model implementations with native checkpoint key names.

pub mod sdxl;
