//! `eps2v ckpt …`: inspect and check single-file SDXL checkpoints.
//!
//! `info` prints family, prediction type (marker keys / modelspec metadata),
//! ZTSNR, stored dtypes, tensor and parameter counts per component and the
//! SHA-256 / A1111 AutoV2 hash, after checking the UNet and VAE keys against
//! the matching named config. `check` also scans every weight for NaN/inf.
//! Any problem is a [`crate::Error::Model`] (exit code 2).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::models::sdxl::checkpoint::{Checkpoint, CheckpointInfo, Family};
use crate::{Error, Result};

/// Arguments of `eps2v ckpt`.
#[derive(Debug, Args)]
pub struct CkptArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: CkptCommand,
}

/// `ckpt` subcommands.
#[derive(Debug, Subcommand)]
pub enum CkptCommand {
    /// Family, prediction type, ZTSNR, dtypes, counts per component, hashes.
    #[command(
        after_help = "Examples:\n  eps2v ckpt info sd_xl_base_1.0.safetensors\n  eps2v --json ckpt info model.safetensors --no-hash"
    )]
    Info {
        /// A single-file .safetensors checkpoint.
        file: PathBuf,
        /// Skip the SHA-256 / AutoV2 hash (it reads the whole file).
        #[arg(long)]
        no_hash: bool,
    },
    /// Like `info`, and also scan every weight for NaN / infinite values.
    #[command(after_help = "Example:\n  eps2v ckpt check merged_model.safetensors")]
    Check {
        /// A single-file .safetensors checkpoint.
        file: PathBuf,
    },
}

/// Open `file` and check its keys against the named config its widths match.
fn open_checked(file: &PathBuf) -> Result<Checkpoint> {
    let ckpt = Checkpoint::open(file)?;
    let family = ckpt.family();
    if !matches!(family, Family::Sdxl | Family::SdxlUnet) {
        return Err(Error::model(format!(
            "{}: not an SDXL checkpoint: this looks like {}; eps2v needs a single-file SDXL checkpoint (model.diffusion_model.*, conditioner.embedders.*, first_stage_model.*)",
            file.display(),
            family.describe()
        )));
    }
    let (_, unet) = ckpt.detect_unet_config().ok_or_else(|| {
        Error::model(format!(
            "{}: the UNet widths match no known config (sdxl_base, tiny); is this an SDXL base-architecture model?",
            file.display()
        ))
    })?;
    let vae = ckpt.detect_vae_config().map(|(_, c)| c);
    ckpt.check_sdxl(&unet, vae.as_ref())?;
    Ok(ckpt)
}

fn format_info(info: &CheckpointInfo) -> String {
    let mut o = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(o, "file        {} ({} bytes)", info.path, info.file_bytes);
    let _ = writeln!(
        o,
        "family      {} (unet config {}, vae config {})",
        info.family.name(),
        info.unet_config.as_deref().unwrap_or("-"),
        info.vae_config.as_deref().unwrap_or("-")
    );
    let _ = writeln!(
        o,
        "prediction  {} ({})",
        info.prediction.prediction.name(),
        info.prediction.source
    );
    let _ = writeln!(
        o,
        "ztsnr       {}",
        if info.prediction.ztsnr { "yes" } else { "no" }
    );
    let dtypes: Vec<String> = info
        .dtypes
        .iter()
        .map(|(d, n)| format!("{d}:{n}"))
        .collect();
    let _ = writeln!(o, "dtypes      {}", dtypes.join(" "));
    let _ = writeln!(
        o,
        "tensors     {} ({} parameters)",
        info.tensors, info.parameters
    );
    let _ = writeln!(
        o,
        "{:<14} {:>8} {:>15}  dtypes",
        "component", "tensors", "parameters"
    );
    for c in &info.components {
        let d: Vec<String> = c.dtypes.iter().map(|(d, n)| format!("{d}:{n}")).collect();
        let _ = writeln!(
            o,
            "{:<14} {:>8} {:>15}  {}",
            c.name,
            c.tensors,
            c.parameters,
            d.join(" ")
        );
    }
    if let (Some(sha), Some(a)) = (&info.sha256, &info.autov2) {
        let _ = writeln!(o, "sha256      {sha}");
        let _ = writeln!(o, "autov2      {a}");
    }
    for w in &info.prediction.warnings {
        let _ = writeln!(o, "warning     {w}");
    }
    o
}

/// Run `eps2v ckpt …`; returns the exit code.
pub fn run(args: CkptArgs, json: bool) -> Result<i32> {
    let (ckpt, hash, scan) = match &args.command {
        CkptCommand::Info { file, no_hash } => (open_checked(file)?, !no_hash, false),
        CkptCommand::Check { file } => (open_checked(file)?, true, true),
    };
    if scan {
        ckpt.check_finite("")?;
    }
    let info = ckpt.info(hash)?;
    let text = if json {
        serde_json::to_string_pretty(&info)? + "\n"
    } else {
        format_info(&info)
    };
    // A closed pipe (`| head`) is not an error.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::io("<stdout>", e)),
        _ => Ok(0),
    }
}
