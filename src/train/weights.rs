//! The UNet's weights during training, by checkpoint key, and the UNet
//! built over them with only the selected blocks trainable.
//!
//! Frozen parameters are plain (detached) tensors: candle's backprop then
//! computes no gradient for them and the optimizer holds no state for them,
//! so training `out` + `OUT08` of SDXL costs a fraction of the full run's
//! memory (measured by `--bench train_blocks`). Trainable ones are `Var`s
//! whose storage the store shares, so what the optimizer updates in place is
//! what the next stage, the evaluation sampler and the export see.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::blocks::BlockSet;
use crate::models::sdxl::checkpoint::{unet_expected_keys, Checkpoint};
use crate::models::sdxl::{UNet, UNetConfig, UNET_PREFIX};
use crate::{Error, Result};

/// Every UNet weight by full checkpoint key (`model.diffusion_model.…`), f32.
pub struct UNetWeights {
    cfg: UNetConfig,
    map: BTreeMap<String, Tensor>,
    device: Device,
}

/// A UNet for one stage: the module and its trainable parameters by key.
pub struct StageUNet {
    /// The UNet (trainable blocks are `Var`s, the rest plain tensors).
    pub unet: UNet,
    /// Trainable parameters, sorted by key.
    pub vars: Vec<(String, Var)>,
}

/// Hands out the store's tensors to a `VarBuilder`; the `Var`s it makes are
/// collected in `vars` (shared, since the builder owns the backend).
struct StoreBackend<'a> {
    map: &'a BTreeMap<String, Tensor>,
    trainable: &'a BlockSet,
    vars: Arc<Mutex<Vec<(String, Var)>>>,
}

impl SimpleBackend for StoreBackend<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.dims() != s.dims() {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            });
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self
            .map
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            })?
            .detach()
            .to_dtype(dtype)?
            .to_device(dev)?;
        if !self.trainable.contains_key(name) {
            return Ok(t);
        }
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        self.vars
            .lock()
            .map_err(|_| candle_core::Error::Msg("weight store lock poisoned".into()))?
            .push((name.to_string(), var));
        Ok(out)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }
}

impl UNetWeights {
    /// Read every UNet tensor of `ckpt` (checked against `cfg`) as f32 on `device`.
    pub fn from_checkpoint(ckpt: &Checkpoint, cfg: &UNetConfig, device: &Device) -> Result<Self> {
        let expected = unet_expected_keys(cfg)?;
        ckpt.validate(&expected, UNET_PREFIX)
            .into_result(ckpt.path(), "UNet config")?;
        let map = expected
            .iter()
            .map(|(k, _)| Ok((k.clone(), ckpt.tensor(k, DType::F32, device)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            map,
            device: device.clone(),
        })
    }

    /// A store over given tensors (tests, models built from scratch).
    pub fn from_map(
        cfg: &UNetConfig,
        map: BTreeMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let expected = unet_expected_keys(cfg)?;
        for (k, shape) in &expected {
            match map.get(k) {
                Some(t) if t.dims() == shape.as_slice() => {}
                Some(t) => {
                    return Err(Error::model(format!(
                        "unet weights: {k} has shape {:?}, the config needs {shape:?}",
                        t.dims()
                    )))
                }
                None => return Err(Error::model(format!("unet weights: missing {k}"))),
            }
        }
        Ok(Self {
            cfg: cfg.clone(),
            map,
            device: device.clone(),
        })
    }

    /// The UNet config.
    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    /// Every key, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    /// The current value of `key`.
    pub fn get(&self, key: &str) -> Option<&Tensor> {
        self.map.get(key)
    }

    /// Every weight (current values; trainable ones share the `Var`s' storage).
    pub fn map(&self) -> &BTreeMap<String, Tensor> {
        &self.map
    }

    /// Build the UNet of a stage: parameters in `trainable` become fresh
    /// `Var`s (initialised from the current values, which the store then
    /// shares), the others detached tensors.
    pub fn build(&mut self, trainable: &BlockSet) -> Result<StageUNet> {
        trainable.check_exists(self.keys())?;
        let made = Arc::new(Mutex::new(Vec::new()));
        let unet = {
            let backend = StoreBackend {
                map: &self.map,
                trainable,
                vars: made.clone(),
            };
            let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, self.device.clone());
            UNet::new(vb.pp(UNET_PREFIX), &self.cfg)?
        };
        let mut vars = std::mem::take(
            &mut *made
                .lock()
                .map_err(|_| Error::Other("weight store lock poisoned".into()))?,
        );
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (k, v) in &vars {
            self.map.insert(k.clone(), v.as_tensor().clone());
        }
        Ok(StageUNet { unet, vars })
    }

    /// Set every parameter that `trainable` leaves frozen and `ema` holds
    /// (an earlier stage trained it) to its EMA value; returns how many.
    /// The export writes the EMA, so a later stage then trains around, and
    /// its evaluations judge, the weights the checkpoint will hold.
    pub fn freeze_at_ema(
        &mut self,
        trainable: &BlockSet,
        ema: &BTreeMap<String, Tensor>,
    ) -> Result<usize> {
        let mut n = 0;
        for (k, t) in ema {
            if !trainable.contains_key(k) && self.map.contains_key(k) {
                self.map.insert(k.clone(), t.detach().copy()?);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Overwrite the values of `vars` (and the store) from `values` by key
    /// (rollback, resume). Keys not in `values` keep their value.
    pub fn restore(
        &mut self,
        vars: &[(String, Var)],
        values: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        for (k, v) in vars {
            if let Some(t) = values.get(k) {
                v.set(&t.to_dtype(v.dtype())?.to_device(v.device())?)?;
            }
        }
        for (k, t) in values {
            if !vars.iter().any(|(vk, _)| vk == k) {
                let cur = self.map.get(k).ok_or_else(|| {
                    Error::model(format!("restore: {k} is not a weight of this UNet"))
                })?;
                if cur.dims() != t.dims() {
                    return Err(Error::model(format!(
                        "restore: {k} has shape {:?}, saved {:?}",
                        cur.dims(),
                        t.dims()
                    )));
                }
                self.map
                    .insert(k.clone(), t.to_dtype(DType::F32)?.to_device(&self.device)?);
            }
        }
        Ok(())
    }
}
