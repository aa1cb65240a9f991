//! Integration tests: one binary, one module per area.

mod caption;
mod ckpt;
mod cli;
mod curation;
mod fixtures_chain;
mod generate;
mod gpu_script;
mod run;
mod sample;
mod toy;
mod train;
