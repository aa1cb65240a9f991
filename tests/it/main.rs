//! Integration tests: one binary, one module per area.

mod curation;
mod sample;
mod train;
