//! Integration tests: one binary, one module per area.

mod curation;
mod generate;
mod sample;
