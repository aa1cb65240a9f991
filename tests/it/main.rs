//! Integration tests: one binary, one module per area.

mod caption;
mod curation;
mod sample;
