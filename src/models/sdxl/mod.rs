//! SDXL in candle with LDM/sgm single-file key names (reference/sdxl.md).

pub mod clip;
pub mod prompt;
pub mod tokenizer;
