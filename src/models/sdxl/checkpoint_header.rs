//! The safetensors layer of [`super`]: dtype sizes and names, the
//! bounds-checked header parse (every tensor's byte range against its
//! dtype × shape and the file end; the header length against the file size
//! and [`super::MAX_HEADER_BYTES`]), and the NaN/inf scan of raw tensor
//! bytes.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::DType;
use serde::{Deserialize, Serialize};

use super::MAX_HEADER_BYTES;
use crate::{Error, Result};

/// Bytes per element of a safetensors dtype string.
pub(super) fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "F8_E4M3" | "F8_E5M2" | "F8_E8M0" | "I8" | "U8" | "BOOL" => 1,
        _ => return None,
    })
}

/// candle dtype of a floating-point safetensors dtype we convert from.
pub(super) fn float_dtype(dtype: &str) -> Option<DType> {
    Some(match dtype {
        "F64" => DType::F64,
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        _ => return None,
    })
}

/// safetensors dtype string of a candle dtype we can write.
pub(super) fn st_dtype_name(dtype: DType) -> Option<&'static str> {
    Some(match dtype {
        DType::F64 => "F64",
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::I64 => "I64",
        DType::U32 => "U32",
        DType::U8 => "U8",
        _ => return None,
    })
}

/// One tensor of the file: dtype, shape and absolute byte range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorEntry {
    /// safetensors dtype string (`F16`, `BF16`, `F32`, `F8_E4M3`…).
    pub dtype: String,
    /// Shape (PyTorch layout).
    pub shape: Vec<usize>,
    /// Absolute start offset in the file.
    #[serde(skip)]
    pub start: usize,
    /// Absolute end offset in the file (exclusive).
    #[serde(skip)]
    pub end: usize,
}

impl TensorEntry {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

pub(super) type Parsed = (BTreeMap<String, TensorEntry>, BTreeMap<String, String>);

/// Parse and bounds-check a safetensors header over the whole file `bytes`.
pub(super) fn parse_header(path: &Path, bytes: &[u8]) -> Result<Parsed> {
    let p = path.display();
    let file_len = bytes.len() as u64;
    if file_len < 8 {
        return Err(Error::model(format!(
            "{p}: file is truncated ({file_len} bytes): a safetensors file starts with an 8-byte header length; re-download it"
        )));
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[..8]);
    let n = u64::from_le_bytes(len8);
    if n > MAX_HEADER_BYTES {
        return Err(Error::model(format!(
            "{p}: bad safetensors header: declared header length {n} bytes exceeds the {MAX_HEADER_BYTES}-byte limit; the file is corrupt or not a safetensors file"
        )));
    }
    if n > file_len - 8 {
        return Err(Error::model(format!(
            "{p}: file is truncated: the header declares {n} bytes but only {} follow; re-download it",
            file_len - 8
        )));
    }
    // n ≤ file_len − 8 ≤ usize::MAX here (the bytes are in memory).
    let data_start = 8 + n as usize;
    let header = &bytes[8..data_start];
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header)
        .map_err(|e| {
            Error::model(format!(
                "{p}: bad safetensors header: invalid JSON ({e}); the file is corrupt or not a safetensors file"
            ))
        })?;
    let mut entries = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (key, value) in map {
        if key == "__metadata__" {
            // String to string, as the format (and every loader) has it.
            let serde_json::Value::Object(m) = value else {
                return Err(Error::model(format!(
                    "{p}: bad safetensors header: __metadata__ is not an object of strings"
                )));
            };
            for (k, v) in m {
                let serde_json::Value::String(s) = v else {
                    return Err(Error::model(format!(
                        "{p}: bad safetensors header: __metadata__.{k} is not a string"
                    )));
                };
                metadata.insert(k, s);
            }
            continue;
        }
        let raw: RawEntry = serde_json::from_value(value).map_err(|e| {
            Error::model(format!(
                "{p}: bad safetensors header: entry {key}: {e}; the file is corrupt"
            ))
        })?;
        let size = dtype_size(&raw.dtype).ok_or_else(|| {
            Error::model(format!(
                "{p}: bad safetensors header: tensor {key} has unknown dtype {}",
                raw.dtype
            ))
        })?;
        let nbytes = raw
            .shape
            .iter()
            .try_fold(size as u64, |acc, &d| acc.checked_mul(d as u64));
        let [begin, end] = raw.data_offsets;
        // Both must be known and equal: an overflowing shape product and a
        // reversed range are both None, and must not pass as "equal".
        let range = end.checked_sub(begin);
        if nbytes.is_none() || nbytes != range {
            return Err(Error::model(format!(
                "{p}: bad safetensors header: tensor {key} ({} {:?}) has byte range {begin}..{end} of the wrong size",
                raw.dtype, raw.shape
            )));
        }
        let abs_end = (data_start as u64).checked_add(end);
        if abs_end.is_none_or(|e| e > file_len) {
            return Err(Error::model(format!(
                "{p}: file is truncated: tensor {key} ends at byte {} but the file has {file_len} bytes; re-download or re-save it",
                data_start as u64 + end.min(u64::MAX - data_start as u64)
            )));
        }
        entries.insert(
            key,
            TensorEntry {
                dtype: raw.dtype,
                shape: raw.shape,
                start: data_start + begin as usize,
                end: data_start + end as usize,
            },
        );
    }
    // The tensors tile the data from its start to the end of the file, as
    // the safetensors loaders require: overlapping or aliased ranges would
    // have a save write the same bytes many times over, and count them as
    // parameters.
    let mut ranges: Vec<(usize, usize, &str)> = entries
        .iter()
        .map(|(k, e)| (e.start, e.end, k.as_str()))
        .collect();
    ranges.sort();
    let mut at = data_start;
    for (start, end, key) in ranges {
        if start != at {
            return Err(Error::model(format!(
                "{p}: bad safetensors header: tensor {key}'s bytes start at {} where the previous tensor's end at {}: {} ranges; the file is corrupt or was not written by a safetensors writer",
                start - data_start,
                at - data_start,
                if start < at { "overlapping" } else { "a gap between" },
            )));
        }
        at = end;
    }
    if at as u64 != file_len {
        return Err(Error::model(format!(
            "{p}: bad safetensors header: {} bytes after the last tensor; the file is corrupt or was not written by a safetensors writer",
            file_len - at as u64
        )));
    }
    Ok((entries, metadata))
}

/// Index of the first NaN/±inf element in raw little-endian float bytes
/// (exponent bits all ones), or `None`. Non-float dtypes are never flagged.
pub(super) fn first_non_finite(dtype: &str, bytes: &[u8]) -> Option<usize> {
    match dtype {
        "F16" => bytes
            .chunks_exact(2)
            .position(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7C00 == 0x7C00),
        "BF16" => bytes
            .chunks_exact(2)
            .position(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7F80 == 0x7F80),
        "F32" => bytes
            .chunks_exact(4)
            .position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
        "F64" => bytes.chunks_exact(8).position(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            !f64::from_le_bytes(a).is_finite()
        }),
        _ => None,
    }
}
