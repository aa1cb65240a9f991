//! `eps2v ckpt …`: inspect and check single-file SDXL checkpoints.
//!
//! `info` describes any readable safetensors file: family, the UNet / VAE /
//! text-encoder configs inferred from its shapes (with the source of what
//! shapes cannot tell) or why they cannot be inferred, prediction type
//! (marker keys / modelspec metadata), ZTSNR, stored dtypes, tensor and
//! parameter counts per component, the size `sample` draws at by default
//! ([`crate::pipeline::size::native_size`]) and the SHA-256 / A1111 AutoV2
//! hash; it fails only on files it cannot read. `check` refuses anything eps2v cannot
//! load, with the precise reason (family, the key or shape that breaks an
//! inference rule, parts that do not fit, keys that do not match), and scans
//! every weight for NaN/inf. Problems are [`crate::Error::Model`] (exit 2).
//! `mark` writes a copy with the prediction markers a model trained
//! elsewhere lacks (tensors byte for byte, other metadata kept).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::error::IoContext;
use crate::models::sdxl::checkpoint::{
    Checkpoint, CheckpointInfo, ConfigStatus, Family, Prediction, META_RESOLUTION,
};
use crate::models::sdxl::infer::{self, TextPair};
use crate::models::sdxl::{UNetConfig, VaeConfig};
use crate::pipeline::size::native_size_from;
use crate::{Error, Result};

/// What `sample` draws at when no `--size` is given, and where that comes
/// from; `None` for a file without an inferable UNet.
struct DefaultSize {
    size: (u32, u32),
    source: String,
    warnings: Vec<String>,
}

fn default_size(info: &CheckpointInfo) -> Option<DefaultSize> {
    let name = info.unet.inferred()?.name.unwrap_or("custom");
    let mut warnings = Vec::new();
    let (size, from_meta) = native_size_from(&info.metadata, name, &mut warnings);
    Some(DefaultSize {
        size,
        source: if from_meta {
            META_RESOLUTION.to_string()
        } else {
            format!("the {name} UNet config")
        },
        warnings,
    })
}

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
    /// Family, inferred configs, prediction type, ZTSNR, dtypes, counts per component, hashes.
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
    /// Refuse files eps2v cannot load (with the reason), scan every weight for NaN / inf, then print `info`.
    #[command(after_help = "Example:\n  eps2v ckpt check merged_model.safetensors")]
    Check {
        /// A single-file .safetensors checkpoint.
        file: PathBuf,
    },
    /// Write a copy of an SDXL checkpoint with the prediction markers that ComfyUI, A1111 and Forge read: the `v_pred` and `ztsnr` keys and `modelspec.prediction_type` (kohya sd-scripts trains v-pred with --v_parameterization --zero_terminal_snr but writes only `modelspec.prediction_type`, which they do not read, so its output samples as eps there). Every tensor is copied byte for byte; other metadata is kept.
    #[command(
        after_help = "Examples:\n  eps2v ckpt mark kohya_out.safetensors --prediction v --ztsnr --out kohya_out-v-ztsnr.safetensors\n  eps2v ckpt mark model.safetensors --prediction eps --out model-eps.safetensors"
    )]
    Mark(MarkArgs),
}

/// `eps2v ckpt mark FILE --prediction v|eps [--ztsnr] --out OUT`
#[derive(Debug, Args)]
pub struct MarkArgs {
    /// A single-file SDXL .safetensors checkpoint (or UNet).
    pub file: PathBuf,
    /// What the model predicts: v (v-prediction) or eps (epsilon; drops the markers).
    #[arg(long, value_parser = parse_mark_prediction)]
    pub prediction: String,
    /// The model was trained on the zero-terminal-SNR schedule (v only): adds the `ztsnr` key.
    #[arg(long)]
    pub ztsnr: bool,
    /// Only the metadata, no marker keys (for tools that choke on extra keys; ComfyUI/A1111/Forge then sample it as eps).
    #[arg(long)]
    pub no_markers: bool,
    /// Also write OUT's stem .yaml: A1111's v-prediction config, which A1111 prefers to the keys (v only).
    #[arg(long)]
    pub a1111_yaml: bool,
    /// Output file: a new file, never FILE itself.
    #[arg(long)]
    pub out: PathBuf,
}

/// `--prediction` of `ckpt mark`: `v` or `eps`, from any name `sample`
/// takes (`epsilon`, `v_prediction`, …).
fn parse_mark_prediction(s: &str) -> std::result::Result<String, String> {
    s.parse::<crate::diffusion::Prediction>()
        .map(|p| p.to_string())
        .map_err(|e| e.to_string())
}

/// What `ckpt mark` wrote.
#[derive(Debug, serde::Serialize)]
pub struct MarkReport {
    /// What FILE was read as (`epsilon`, `v`, with ` + ztsnr`).
    pub before: String,
    /// The written file's warnings as eps2v reads it back (e.g. v in the
    /// metadata only, with `--no-markers`).
    pub warnings: Vec<String>,
    /// The files written (the checkpoint, and the yaml when asked).
    pub written: Vec<PathBuf>,
    /// `v` or `epsilon`, as the written file reads back.
    pub prediction: String,
    /// ZTSNR, as the written file reads back.
    pub ztsnr: bool,
    /// The marker keys the written file holds.
    pub markers: Vec<String>,
}

/// Run `ckpt mark`: refuse what cannot be marked before writing anything.
pub fn mark(a: &MarkArgs) -> Result<MarkReport> {
    let v = a.prediction == "v";
    if a.ztsnr && !v {
        return Err(Error::config(
            "ckpt mark --ztsnr: zero terminal SNR goes with v-prediction (an eps model cannot predict at SNR 0); use --prediction v",
        ));
    }
    if a.a1111_yaml && !v {
        return Err(Error::config(format!(
            "ckpt mark {}",
            crate::train::export::A1111_YAML_EPS
        )));
    }
    crate::models::sdxl::checkpoint::check_safetensors_name("ckpt mark --out", &a.out)?;
    let yaml_path = a.out.with_extension("yaml");
    if !a.a1111_yaml && yaml_path.exists() {
        return Err(Error::config(format!(
            "ckpt mark --out {}: {} exists beside it, and A1111 reads that yaml instead of the marker keys; remove it{}",
            a.out.display(),
            yaml_path.display(),
            if v { ", or replace it with --a1111-yaml" } else { "" }
        )));
    }
    if crate::atomic::same_file(&a.out, &a.file) {
        return Err(Error::config(format!(
            "ckpt mark --out {}: that is FILE itself; write a new file (eps2v never replaces its input)",
            a.out.display()
        )));
    }
    // A file already there may be an earlier mark or another model: a
    // new file, as the help says (symlink_metadata: a broken link too).
    if std::fs::symlink_metadata(&a.out).is_ok() {
        return Err(Error::config(format!(
            "ckpt mark --out {}: exists; give a new file name, or remove it first",
            a.out.display()
        )));
    }
    let ckpt = Checkpoint::open(&a.file)?;
    ckpt.require_sdxl_family()?;
    let before = ckpt.prediction();
    if matches!(before.prediction, Prediction::Edm | Prediction::EdmV) {
        return Err(Error::config(format!(
            "ckpt mark {}: an EDM model ({}); its keys set its sampling, and marking it discrete v or eps would drop them",
            a.file.display(),
            before.source
        )));
    }
    let yaml = if a.a1111_yaml {
        let cfg = ckpt.infer_unet_config()?.config;
        Some(crate::train::export::a1111_v_yaml(&cfg).map_err(|e| {
            Error::config(format!(
                "ckpt mark --a1111-yaml {}: {e}; drop --a1111-yaml",
                a.file.display()
            ))
        })?)
    } else {
        None
    };
    let opts = crate::train::export::marked(
        v,
        a.ztsnr,
        !a.no_markers,
        None,
        std::collections::BTreeMap::new(),
    );
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).at(dir)?;
    }
    ckpt.save_with(&a.out, &Default::default(), &opts)?;
    let mut written = vec![a.out.clone()];
    if let Some(text) = yaml {
        crate::pipeline::sample::write_atomic(&yaml_path, text.as_bytes())?;
        written.push(yaml_path);
    }
    let back = Checkpoint::open(&a.out)?;
    let p = back.prediction();
    Ok(MarkReport {
        before: format!(
            "{}{}",
            before.prediction.name(),
            if before.ztsnr { " + ztsnr" } else { "" }
        ),
        warnings: p.warnings.clone(),
        written,
        prediction: p.prediction.name().to_string(),
        ztsnr: p.ztsnr,
        markers: back
            .entries()
            .keys()
            .filter(|k| crate::models::sdxl::checkpoint::is_marker_key(k))
            .cloned()
            .collect(),
    })
}

/// Open `file` and refuse it, with the precise reason, unless it is an
/// SDXL checkpoint (or UNet) whose every config can be inferred, whose parts
/// fit together and whose keys all match those configs.
fn open_checked(file: &PathBuf) -> Result<Checkpoint> {
    let ckpt = Checkpoint::open(file)?;
    let family = ckpt.require_sdxl_family()?;
    let unet = ckpt.infer_unet_config()?.config;
    let vae = match ckpt.vae_prefix() {
        Some(_) => Some(ckpt.infer_vae_config()?.config),
        None => None,
    };
    let text = if family == Family::Sdxl {
        Some(ckpt.infer_text_configs()?.config)
    } else {
        None
    };
    infer::check_compatible(&unet, text.as_ref(), vae.as_ref())
        .map_err(|e| Error::model(format!("{}: {e}", file.display())))?;
    ckpt.check_sdxl(&unet, vae.as_ref())?;
    // Weights the model commands cannot read (fp8, integer quantization):
    // the finite scan skips them, and `sample` / `train` refuse them.
    if let Some((key, e)) = ckpt.entries().iter().find(|(k, e)| {
        !matches!(e.dtype.as_str(), "F16" | "BF16" | "F32" | "F64")
            && !crate::models::sdxl::checkpoint::is_marker_key(k)
            && !crate::models::sdxl::checkpoint::is_ignored_key(k)
            && [
                "model.diffusion_model.",
                "conditioner.embedders.",
                "first_stage_model.",
            ]
            .iter()
            .any(|p| k.starts_with(p))
    }) {
        return Err(Error::model(format!(
            "{}: {key} is stored as {}; eps2v loads F16, BF16 and F32 weights (an fp8 or quantized release?): convert the file to f16 or bf16 first",
            file.display(),
            e.dtype
        )));
    }
    Ok(ckpt)
}

/// The config lines of a component: name, summary and source, or why not.
fn config_lines<T>(
    o: &mut String,
    label: &str,
    status: &ConfigStatus<T>,
    hidden: &str,
    summary: impl Fn(&T) -> String,
) {
    match status {
        ConfigStatus::Absent => {}
        ConfigStatus::Failed { reason } => {
            let _ = writeln!(o, "{label:<12}cannot infer: {reason}");
        }
        ConfigStatus::Inferred(i) => {
            let _ = writeln!(
                o,
                "{label:<12}{} (inferred from shapes; {})",
                i.name.unwrap_or("custom"),
                i.hidden.describe(hidden)
            );
            let _ = writeln!(o, "{:<12}{}", "", summary(&i.config));
            for w in &i.warnings {
                let _ = writeln!(o, "{:<12}warning: {w}", "");
            }
        }
    }
}

fn format_info(info: &CheckpointInfo, size: Option<&DefaultSize>) -> String {
    let mut o = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(o, "file        {} ({} bytes)", info.path, info.file_bytes);
    let _ = writeln!(
        o,
        "family      {} ({})",
        info.family.name(),
        info.family_description
    );
    config_lines(
        &mut o,
        "unet",
        &info.unet,
        "GroupNorm groups and head width",
        UNetConfig::summary,
    );
    config_lines(
        &mut o,
        "vae",
        &info.vae,
        "GroupNorm groups and scale factor",
        VaeConfig::summary,
    );
    config_lines(
        &mut o,
        "text",
        &info.text,
        "heads and activations",
        |t: &TextPair| format!("CLIP-L {}; bigG {}", t.clip_l.summary(), t.clip_g.summary()),
    );
    if matches!(info.unet, ConfigStatus::Absent) {
        let _ = writeln!(
            o,
            "prediction  n/a (no model.diffusion_model.* UNet in this file)"
        );
    } else {
        let _ = writeln!(
            o,
            "prediction  {} ({})",
            info.prediction.prediction.name(),
            info.prediction.source
        );
        let _ = writeln!(
            o,
            "ztsnr       {}",
            match (info.prediction.ztsnr, info.prediction.prediction) {
                (false, _) => "no",
                // A stray marker: samplers use the plain schedule (warned).
                (true, Prediction::Epsilon) =>
                    "no (a ztsnr marker is there, ignored on an epsilon model)",
                (true, _) => "yes",
            }
        );
    }
    if let Some(s) = size {
        let _ = writeln!(
            o,
            "size        {}x{} (sample's default; from {})",
            s.size.0, s.size.1, s.source
        );
    }
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
    let size_warnings = size.iter().flat_map(|s| &s.warnings);
    for w in info.prediction.warnings.iter().chain(size_warnings) {
        let _ = writeln!(o, "warning     {w}");
    }
    o
}

/// Run `eps2v ckpt …`; returns the exit code.
/// Run `ckpt mark` and print what it wrote.
fn run_mark(a: &MarkArgs, json: bool) -> Result<i32> {
    let r = mark(a)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "ckpt mark: {} (was {}; now prediction {}, ztsnr {}, marker keys: {})",
            r.written
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" + "),
            r.before,
            r.prediction,
            if r.ztsnr { "yes" } else { "no" },
            if r.markers.is_empty() {
                "none".to_string()
            } else {
                r.markers.join(", ")
            }
        );
        for w in &r.warnings {
            println!("warning     {w}");
        }
    }
    Ok(0)
}

pub fn run(args: CkptArgs, json: bool) -> Result<i32> {
    let (ckpt, hash, scan) = match &args.command {
        CkptCommand::Mark(a) => return run_mark(a, json),
        // `info` describes any readable safetensors file.
        CkptCommand::Info { file, no_hash } => (Checkpoint::open(file)?, !no_hash, false),
        CkptCommand::Check { file } => (open_checked(file)?, true, true),
    };
    if scan {
        ckpt.check_finite("")?;
    }
    let info = ckpt.info(hash)?;
    let size = default_size(&info);
    // What `check` found beyond `info`: what the file lacks for which
    // commands (an error has exited by now).
    let mut notes: Vec<&str> = Vec::new();
    if scan {
        if ckpt.vae_prefix().is_none() {
            notes.push("no VAE in this file: `sample`, `generate` and `train` need one baked in; `merge` and `ckpt` work without");
        }
        if info.family == Family::SdxlUnet {
            notes.push("no text encoders in this file: `sample`, `generate` and `train` need a full checkpoint; `merge` and `ckpt` work without");
        }
    }
    let text = if json {
        let mut v = serde_json::to_value(&info)?;
        v["default_size"] = match &size {
            Some(s) => serde_json::json!({
                "width": s.size.0,
                "height": s.size.1,
                "source": s.source,
                "warnings": s.warnings,
            }),
            None => serde_json::Value::Null,
        };
        if scan {
            v["check"] = serde_json::json!({
                "ok": true,
                "checked": "SDXL layout and shapes as loaders expect, every float tensor finite",
                "notes": notes,
            });
        }
        serde_json::to_string_pretty(&v)? + "\n"
    } else if scan {
        // What `check` checked, beyond what `info` shows.
        format_info(&info, size.as_ref())
            + "check       ok: SDXL layout and shapes as loaders expect, every float tensor finite (no NaN or ±inf)\n"
            + &notes
                .iter()
                .map(|n| format!("check       {n}\n"))
                .collect::<String>()
    } else {
        format_info(&info, size.as_ref())
    };
    // A closed pipe (`| head`) is not an error.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::io("<stdout>", e)),
        _ => Ok(0),
    }
}

#[cfg(test)]
#[path = "ckpt_tests.rs"]
mod tests;
