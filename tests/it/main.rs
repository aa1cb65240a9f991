//! Integration tests: one binary, one module per area.

mod curation;
mod gpu_script;
mod sample;
