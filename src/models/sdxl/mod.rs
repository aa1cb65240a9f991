//! SDXL in candle with LDM/sgm single-file key names (reference/sdxl.md).

pub mod tokenizer;
