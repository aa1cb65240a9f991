//! Atomic single-file safetensors writing (temp file + fsync + rename) with
//! per-tensor dtype conversion, marker keys and metadata.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::{dtype_size, float_dtype, st_dtype_name, MARKER_V_PRED, MARKER_ZTSNR};
use crate::error::IoContext;
use crate::{Error, Result};

/// How to write a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct SaveOptions {
    /// Store every floating-point tensor in this dtype (F16, BF16 or F32);
    /// `None` keeps each tensor's dtype.
    pub dtype: Option<DType>,
    /// Write the `v_pred` marker key (any existing marker is dropped otherwise).
    pub v_pred: bool,
    /// Write the `ztsnr` marker key.
    pub ztsnr: bool,
    /// Metadata to add or override (e.g. `modelspec.prediction_type`).
    pub metadata: BTreeMap<String, String>,
}

/// Between the target's name and the writer's pid in the temporary file a
/// save goes through (`.<name>.tmp-<pid>`, renamed over `<name>` when
/// complete).
const PARTIAL: &str = ".tmp-";

/// Refuse to write a checkpoint under a name other than `*.safetensors`:
/// A1111, Forge and ComfyUI open other extensions (`.ckpt`, `.pt`, none)
/// as pickles, and eps2v refuses to load those. `what` names the flag or
/// key.
pub fn check_safetensors_name(what: &str, path: &Path) -> Result<()> {
    let ok = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if ok {
        return Ok(());
    }
    Err(Error::config(format!(
        "{what} {}: checkpoints are written as .safetensors (UIs open other extensions as pickles); name it NAME.safetensors",
        path.display()
    )))
}

/// Whether `file_name` is the temporary file of a save by any process:
/// what a save killed mid-write leaves behind.
pub fn is_partial_save(file_name: &str) -> bool {
    file_name.starts_with('.')
        && file_name
            .rsplit_once(PARTIAL)
            .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// Remove from `dir` the temporary files that killed saves left
/// ([`is_partial_save`]); with `of`, only those of saves of the file named
/// `of`. A missing folder has none. Returns how many were removed.
pub fn remove_partial_saves(dir: &Path, of: Option<&str>) -> Result<usize> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    let prefix = of.map(|name| format!(".{name}{PARTIAL}"));
    let mut n = 0;
    for e in rd {
        let e = e.at(dir)?;
        let name = e.file_name().to_string_lossy().into_owned();
        if is_partial_save(&name)
            && prefix.as_ref().is_none_or(|p| name.starts_with(p.as_str()))
            && !written_by_another_live_process(&name)
            && e.file_type().at(e.path())?.is_file()
        {
            std::fs::remove_file(e.path()).at(e.path())?;
            n += 1;
        }
    }
    Ok(n)
}

/// Whether the save behind a temporary file is another process that is
/// still running (two merges to one `--out`: the second must not unlink
/// the first's file mid-write). Linux only (`/proc`); elsewhere every
/// such file counts as left by a killed save.
fn written_by_another_live_process(file_name: &str) -> bool {
    let Some(pid) = file_name
        .rsplit_once(PARTIAL)
        .and_then(|(_, p)| p.parse::<u32>().ok())
    else {
        return false;
    };
    pid != std::process::id()
        && cfg!(target_os = "linux")
        && Path::new("/proc").join(pid.to_string()).exists()
}

pub(super) enum Source<'a> {
    Raw {
        dtype: &'a str,
        shape: &'a [usize],
        bytes: &'a [u8],
    },
    Tensor(Tensor),
    Lazy(LazyTensor<'a>),
}

/// A tensor computed only when it is written (streaming saves, e.g. merges:
/// peak memory is one tensor per input, not whole models).
pub struct LazyTensor<'a> {
    /// dtype of the produced tensor (the stored one unless
    /// [`SaveOptions::dtype`] converts it).
    pub dtype: DType,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Computes it.
    pub produce: Box<dyn Fn() -> Result<Tensor> + 'a>,
}

/// Save tensors produced one at a time, in key order (atomic: temp file +
/// rename), with marker keys and metadata from `opts`.
pub fn save_lazy(
    path: impl AsRef<Path>,
    tensors: Vec<(String, LazyTensor<'_>)>,
    opts: &SaveOptions,
) -> Result<()> {
    let items = tensors
        .into_iter()
        .filter(|(k, _)| k != MARKER_V_PRED && k != MARKER_ZTSNR)
        .map(|(k, t)| (k, Source::Lazy(t)))
        .collect();
    write_checkpoint(path.as_ref(), items, opts, &opts.metadata)
}

/// The little-endian bytes of `t` stored as `dtype`. Storing a tensor as
/// f16 that does not fit (|x| > 65504 becomes ±inf) is an error naming
/// `key`: the file would hold infinities every loader refuses or samples
/// as NaN.
fn tensor_bytes(key: &str, t: &Tensor, dtype: DType) -> Result<Vec<u8>> {
    let (from, original) = (t.dtype(), t);
    let t = t.to_device(&Device::Cpu)?.to_dtype(dtype)?.flatten_all()?;
    Ok(match dtype {
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => {
            let v = t.to_vec1::<half::f16>()?;
            if from != DType::F16 {
                if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                    // NaN or ±inf before the cast: no dtype saves it.
                    let was = original
                        .flatten_all()?
                        .get(i)?
                        .to_dtype(DType::F32)?
                        .to_device(&Device::Cpu)?
                        .to_scalar::<f32>()?;
                    if !was.is_finite() {
                        return Err(Error::model(format!(
                            "save: {key} holds {was} (element {i}) before it is stored: what produced it is broken (a corrupt input, a diverged training); nothing was written"
                        )));
                    }
                    return Err(Error::model(format!(
                        "save: {key} does not fit in f16 (element {i} is {was}, which becomes {}; f16 holds |x| ≤ 65504): save as bf16 or f32 (train --save-dtype bf16, merge --dtype bf16)",
                        v[i]
                    )));
                }
            }
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F64 => t
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::I64 => t
            .to_vec1::<i64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::U32 => t
            .to_vec1::<u32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::U8 => t.to_vec1::<u8>()?,
        other => {
            return Err(Error::model(format!(
                "save: cannot store dtype {other:?} in safetensors"
            )))
        }
    })
}

/// Save named tensors as a single-file checkpoint (atomic: temp file +
/// rename), with marker keys and metadata from `opts`.
pub fn save_tensors(
    path: impl AsRef<Path>,
    tensors: &[(String, Tensor)],
    opts: &SaveOptions,
) -> Result<()> {
    let items = tensors
        .iter()
        .filter(|(k, _)| k != MARKER_V_PRED && k != MARKER_ZTSNR)
        .map(|(k, t)| (k.clone(), Source::Tensor(t.clone())))
        .collect();
    write_checkpoint(path.as_ref(), items, opts, &opts.metadata)
}

pub(super) fn write_checkpoint(
    path: &Path,
    mut items: Vec<(String, Source<'_>)>,
    opts: &SaveOptions,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    if let Some(d) = opts.dtype {
        if !matches!(d, DType::F16 | DType::BF16 | DType::F32) {
            return Err(Error::config(format!(
                "save: storage dtype must be f16, bf16 or f32, not {d:?}"
            )));
        }
    }
    for (flag, key) in [(opts.v_pred, MARKER_V_PRED), (opts.ztsnr, MARKER_ZTSNR)] {
        if flag {
            // The community convention: an empty tensor (`torch.tensor([])`).
            items.push((
                key.to_string(),
                Source::Raw {
                    dtype: "F32",
                    shape: &[0],
                    bytes: &[],
                },
            ));
        }
    }
    items.sort_by(|a, b| a.0.cmp(&b.0));

    // Resolve every item's stored dtype, shape and size.
    struct Planned {
        dtype: String,
        shape: Vec<usize>,
        nbytes: usize,
    }
    let mut plan = Vec::with_capacity(items.len());
    for (key, src) in &items {
        let (dtype, shape) = match src {
            Source::Raw { dtype, shape, .. } => {
                let keep = float_dtype(dtype).is_none() || shape.iter().product::<usize>() == 0;
                let d = match (opts.dtype, keep) {
                    (Some(d), false) => st_dtype_name(d).unwrap_or("F32").to_string(),
                    _ => dtype.to_string(),
                };
                (d, shape.to_vec())
            }
            Source::Tensor(t) => {
                let d = match (opts.dtype, t.dtype().is_float()) {
                    (Some(d), true) => d,
                    _ => t.dtype(),
                };
                let name = st_dtype_name(d).ok_or_else(|| {
                    Error::model(format!("save: tensor {key} has unsupported dtype {d:?}"))
                })?;
                (name.to_string(), t.dims().to_vec())
            }
            Source::Lazy(l) => {
                let d = match (opts.dtype, l.dtype.is_float()) {
                    (Some(d), true) => d,
                    _ => l.dtype,
                };
                let name = st_dtype_name(d).ok_or_else(|| {
                    Error::model(format!("save: tensor {key} has unsupported dtype {d:?}"))
                })?;
                (name.to_string(), l.shape.clone())
            }
        };
        let size = dtype_size(&dtype)
            .ok_or_else(|| Error::model(format!("save: tensor {key} has unknown dtype {dtype}")))?;
        plan.push(Planned {
            nbytes: shape.iter().product::<usize>() * size,
            dtype,
            shape,
        });
    }

    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).map_err(Error::from)?,
        );
    }
    let mut offset = 0usize;
    for ((key, _), p) in items.iter().zip(&plan) {
        header.insert(
            key.clone(),
            serde_json::json!({
                "dtype": p.dtype,
                "shape": p.shape,
                "data_offsets": [offset, offset + p.nbytes],
            }),
        );
        offset += p.nbytes;
    }
    let mut header = serde_json::to_vec(&header)?;
    while header.len() % 8 != 0 {
        header.push(b' ');
    }

    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::config(format!("save: {} is not a file path", path.display())))?;
    // What a killed save of this file left (a full-size checkpoint each
    // time: an export or a merge killed by a preemption or a second Ctrl-C).
    remove_partial_saves(dir, Some(name))?;
    let tmp = dir.join(format!(".{name}{PARTIAL}{}", std::process::id()));
    let result = (|| -> Result<()> {
        let file = File::create(&tmp).at(&tmp)?;
        let mut w = BufWriter::with_capacity(8 << 20, file);
        w.write_all(&(header.len() as u64).to_le_bytes()).at(&tmp)?;
        w.write_all(&header).at(&tmp)?;
        for ((key, src), p) in items.iter().zip(&plan) {
            match src {
                Source::Raw { dtype, bytes, .. } if *dtype == p.dtype => {
                    w.write_all(bytes).at(&tmp)?;
                }
                Source::Raw {
                    dtype,
                    shape,
                    bytes,
                } => {
                    let from = float_dtype(dtype).ok_or_else(|| {
                        Error::model(format!("save: cannot convert {key} from {dtype}"))
                    })?;
                    let t = Tensor::from_raw_buffer(bytes, from, shape, &Device::Cpu)?;
                    let to = float_dtype(&p.dtype).unwrap_or(DType::F32);
                    w.write_all(&tensor_bytes(key, &t, to)?).at(&tmp)?;
                }
                Source::Tensor(t) => {
                    let to = float_dtype(&p.dtype).unwrap_or(t.dtype());
                    w.write_all(&tensor_bytes(key, t, to)?).at(&tmp)?;
                }
                Source::Lazy(l) => {
                    let t = (l.produce)()?;
                    if t.dims() != l.shape.as_slice() {
                        return Err(Error::model(format!(
                            "save: {key} was announced as {:?} but produced {:?}",
                            l.shape,
                            t.dims()
                        )));
                    }
                    let to = float_dtype(&p.dtype).unwrap_or(t.dtype());
                    w.write_all(&tensor_bytes(key, &t, to)?).at(&tmp)?;
                }
            }
        }
        let file = w
            .into_inner()
            .map_err(|e| Error::io(&tmp, e.into_error()))?;
        file.sync_all().at(&tmp)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).at(path)
}
