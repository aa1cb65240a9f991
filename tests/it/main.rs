//! Integration tests: one binary, one module per area.

mod ckpt;
mod curation;
mod sample;
