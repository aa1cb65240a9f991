//! Integration tests: one binary, one module per area.

mod cli;
mod curation;
mod fixtures_chain;
mod sample;
