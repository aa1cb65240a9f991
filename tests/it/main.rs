//! Integration tests: one binary, one module per area.

mod caption;
mod ckpt;
mod curation;
mod sample;
mod toy;
