//! `eps2v tokenize "prompt" [--encoder l|g]`: print the CLIP token ids of a
//! prompt, chunked and weighted as A1111 does (see
//! [`crate::models::sdxl::prompt`]), as JSON on stdout.
//!
//! Output: `{"prompt", "encoder", "token_count", "chunks": [{"ids": [77],
//! "weights": [77]}]}`; CLIP-L rows are padded with EOS 49407, bigG rows
//! with 0 after the first EOS.

use crate::models::sdxl::prompt::tokenize_prompt;
use crate::models::sdxl::tokenizer::{ClipTokenizer, Padding};

/// Which text encoder's ids to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EncoderArg {
    /// CLIP-L (text encoder 1): padding with EOS 49407.
    L,
    /// OpenCLIP bigG (text encoder 2): padding with 0.
    G,
}

/// Arguments of `eps2v tokenize`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  eps2v tokenize \"1girl, solo, (red circle:1.2), [blue background]\"\n  eps2v tokenize \"masterpiece BREAK 1girl\" --encoder g"
)]
pub struct TokenizeArgs {
    /// The prompt, in A1111 syntax (`(word:1.2)`, `(word)`, `[word]`, `BREAK`).
    pub prompt: String,
    /// Which encoder's padding to use.
    #[arg(long, value_enum, default_value = "l")]
    pub encoder: EncoderArg,
}

/// One chunk as printed.
#[derive(Debug, serde::Serialize)]
struct ChunkOut {
    ids: Vec<u32>,
    weights: Vec<f64>,
}

/// The printed report.
#[derive(Debug, serde::Serialize)]
struct TokenizeOut<'a> {
    prompt: &'a str,
    encoder: &'static str,
    token_count: usize,
    chunks: Vec<ChunkOut>,
}

/// Run `tokenize`; always prints JSON. Returns the exit code.
pub fn run(args: &TokenizeArgs) -> anyhow::Result<i32> {
    let tok = ClipTokenizer::new()?;
    let t = tokenize_prompt(&tok, &args.prompt)?;
    let (padding, encoder) = match args.encoder {
        EncoderArg::L => (Padding::Eos, "l"),
        EncoderArg::G => (Padding::Zero, "g"),
    };
    let out = TokenizeOut {
        prompt: &args.prompt,
        encoder,
        token_count: t.token_count,
        chunks: t
            .chunks
            .iter()
            .map(|c| ChunkOut {
                ids: c.ids(padding),
                weights: c.multipliers.clone(),
            })
            .collect(),
    };
    println!("{}", serde_json::to_string(&out)?);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    #[test]
    fn parses_encoder_flag() {
        let cli =
            Cli::try_parse_from(["eps2v", "tokenize", "a cat", "--encoder", "g"]).expect("parse");
        #[allow(irrefutable_let_patterns)]
        let Command::Tokenize(a) = cli.command
        else {
            panic!("expected the tokenize command")
        };
        assert_eq!(a.prompt, "a cat");
        assert_eq!(a.encoder, EncoderArg::G);
        assert!(Cli::try_parse_from(["eps2v", "tokenize", "x", "--encoder", "h"]).is_err());
    }
}
