//! The key/shape lists a model requests, and the comparison of a file with
//! them: module constructors run on a shape-only `VarBuilder` backend
//! ([`record_shapes`], no weight memory), so validation can never drift
//! from the modules.

use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::Serialize;

use crate::models::sdxl::{UNet, UNetConfig, Vae, VaeConfig, UNET_PREFIX};
use crate::{Error, Result};

/// A shape that differs from what the model expects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShapeMismatch {
    /// The key.
    pub key: String,
    /// Shape the model needs.
    pub expected: Vec<usize>,
    /// Shape in the file.
    pub found: Vec<usize>,
}

/// Result of comparing a file against the keys a model requests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Validation {
    /// Expected keys absent from the file.
    pub missing: Vec<String>,
    /// Keys under the component prefix the model does not use (ignore list excluded).
    pub unexpected: Vec<String>,
    /// Keys present with another shape.
    pub mismatched: Vec<ShapeMismatch>,
}

fn list_some(keys: &[String]) -> String {
    let shown: Vec<&str> = keys.iter().take(5).map(String::as_str).collect();
    let more = keys.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{} … and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

impl Validation {
    /// No problems at all.
    pub fn is_ok(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }

    /// Merge another component's validation into this one.
    pub fn extend(&mut self, other: Validation) {
        self.missing.extend(other.missing);
        self.unexpected.extend(other.unexpected);
        self.mismatched.extend(other.mismatched);
    }

    /// One error naming every kind of problem, or `Ok` (`what` names the model, e.g. "sdxl_base UNet").
    pub fn into_result(self, path: &Path, what: &str) -> Result<()> {
        if self.is_ok() {
            return Ok(());
        }
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            parts.push(format!(
                "missing {} key{} ({})",
                self.missing.len(),
                if self.missing.len() == 1 { "" } else { "s" },
                list_some(&self.missing)
            ));
        }
        if !self.mismatched.is_empty() {
            let shown: Vec<String> = self
                .mismatched
                .iter()
                .take(5)
                .map(|m| format!("{} expected {:?} found {:?}", m.key, m.expected, m.found))
                .collect();
            parts.push(format!(
                "{} tensor{} with the wrong shape ({}{})",
                self.mismatched.len(),
                if self.mismatched.len() == 1 { "" } else { "s" },
                shown.join("; "),
                if self.mismatched.len() > 5 {
                    "; …"
                } else {
                    ""
                }
            ));
        }
        if !self.unexpected.is_empty() {
            parts.push(format!(
                "{} unexpected key{} ({})",
                self.unexpected.len(),
                if self.unexpected.len() == 1 { "" } else { "s" },
                list_some(&self.unexpected)
            ));
        }
        Err(Error::model(format!(
            "{}: does not match the {what}: {}; is this a complete SDXL checkpoint of that size? (pruned, damaged or a different architecture)",
            path.display(),
            parts.join("; ")
        )))
    }
}

/// Does a file shape satisfy an expected shape? VAE mid-attention 1×1 conv
/// weights may be stored as matrices (`[c, c]` for `[c, c, 1, 1]`).
pub(crate) fn shape_ok(key: &str, expected: &[usize], found: &[usize]) -> bool {
    expected == found
        || (key.contains(".attn_1.")
            && expected.len() == 4
            && expected[2..] == [1, 1]
            && found == &expected[..2])
}

// ---------------------------------------------------------------------------
// Shape-only VarBuilder backend.

struct Recorder<'a>(&'a Mutex<Vec<(String, Vec<usize>)>>);

impl SimpleBackend for Recorder<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("shape recorder lock poisoned".into()))?
            .push((name.to_string(), s.dims().to_vec()));
        // A zero-stride broadcast of one scalar: no memory for any shape.
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("shape recorder: {name} requested without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// Run a module constructor on a shape-only backend (no weight memory) and
/// return every `(key, shape)` it requested, in request order.
pub fn record_shapes<T>(
    build: impl FnOnce(VarBuilder) -> Result<T>,
) -> Result<Vec<(String, Vec<usize>)>> {
    let seen = Mutex::new(Vec::new());
    {
        let vb = VarBuilder::from_backend(Box::new(Recorder(&seen)), DType::F32, Device::Cpu);
        build(vb)?;
    }
    seen.into_inner()
        .map_err(|_| Error::Other("shape recorder lock poisoned".into()))
}

/// The SDXL base key/shape list, enumerated from the sgm architecture by
/// fixtures/scripts/gen_keys_shapes.py and committed as a fixture.
const SDXL_KEYS_SHAPES: &str = include_str!("../../../fixtures/sdxl_keys_shapes.tsv");

/// Keys and shapes of the two SDXL base text encoders (`conditioner.embedders.*`)
/// from the reference list; used to validate full-size files until the text
/// encoder modules can be recorded with [`record_shapes`].
pub fn sdxl_text_encoder_keys() -> Vec<(String, Vec<usize>)> {
    SDXL_KEYS_SHAPES
        .lines()
        .filter(|l| l.starts_with("conditioner.embedders."))
        .filter_map(|l| {
            let (key, shape) = l.split_once('\t')?;
            let dims = shape
                .trim()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .split(',')
                .filter(|d| !d.trim().is_empty())
                .map(|d| d.trim().parse::<usize>().ok())
                .collect::<Option<Vec<_>>>()?;
            Some((key.to_string(), dims))
        })
        .collect()
}

/// Keys and shapes of a UNet with `cfg` under `model.diffusion_model.`.
pub fn unet_expected_keys(cfg: &UNetConfig) -> Result<Vec<(String, Vec<usize>)>> {
    record_shapes(|vb| UNet::new(vb.pp(UNET_PREFIX), cfg))
}

/// Keys and shapes of a VAE with `cfg` under `prefix` (`first_stage_model` or "").
pub fn vae_expected_keys(cfg: &VaeConfig, prefix: &str) -> Result<Vec<(String, Vec<usize>)>> {
    record_shapes(|vb| {
        let vb = if prefix.is_empty() { vb } else { vb.pp(prefix) };
        Vae::new(vb, cfg)
    })
}
