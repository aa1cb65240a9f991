//! A training step's gradients with the UNet's activations kept only at
//! block boundaries, each block's forward recomputed during the backward
//! ("gradient checkpointing", sd-scripts' `--gradient_checkpointing`,
//! OneTrainer's and diffusers' option of the same name).
//!
//! Why: candle's autograd keeps every input of every op of the graph until
//! the backward ends, so a whole-UNet training step at 1024² did not fit in
//! the 139 GiB of the lent H200 (`benches/gpu/results/`). Here the forward
//! runs block by block (every `input_blocks.N`, the middle block, every
//! `output_blocks.N`), each block's graph dropped as soon as its output is
//! taken (detached); only the block inputs stay. The backward then walks
//! the blocks in reverse: it runs a block's forward again from its kept
//! input (made a `Var`), and takes `Σ out · ∂L/∂out` backward, which gives
//! the block's parameter gradients and `∂L/∂input` for the block before it
//! (and, through the skip connections, for the input block whose output an
//! output block concatenates). So at most one block's graph exists at a
//! time, at the cost of a second forward of the blocks the gradient goes
//! through. The time and label embeddings feed every ResBlock: their
//! gradient is summed over the blocks and taken through the embedding MLPs
//! at the end.
//!
//! A block that has nothing trainable in it or before it (the frozen start
//! of a partial finetune) is neither recomputed nor differentiated. Only
//! the gradients of the given `vars` are kept (candle's backward also
//! computes ones for frozen weights and block inputs; the plain path keeps
//! those until the step ends). Same gradients as `forward` + `backward` up
//! to the order of floating-point sums (tested on the tiny UNet).

use candle_core::backprop::GradStore;
use candle_core::{Module, Result, Tensor, Var};

use super::UNet;

#[cfg(test)]
thread_local! {
    /// Calls of [`UNet::loss_and_grads_recomputed`] on this thread (for
    /// tests that check a caller took this path).
    pub(crate) static CALLS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl UNet {
    /// `loss_of(forward(x, timesteps, context, y))` and the gradients of
    /// `vars` (only those: a [`GradStore`] keyed like `loss.backward()`'s),
    /// with the activations of one block at a time (see the module docs).
    /// `context` must not need a gradient (frozen text encoders).
    pub fn loss_and_grads_recomputed(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        y: &Tensor,
        vars: &[Var],
        loss_of: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, GradStore)> {
        #[cfg(test)]
        CALLS.with(|c| c.set(c.get() + 1));
        self.check_inputs(x, timesteps, context, y)?;
        if context.track_op() {
            candle_core::bail!(
                "unet: gradient checkpointing needs a frozen text context (text encoders not trained)"
            );
        }
        let dtype = self.dtype();
        let mut total = GradStore::default();
        let keep = |g: &mut GradStore, total: &mut GradStore| -> Result<()> {
            for v in vars {
                if let Some(gr) = g.remove(v.as_tensor()).map(|t| t.detach()) {
                    let sum = match total.remove(v.as_tensor()) {
                        Some(acc) => (acc + gr)?,
                        None => gr,
                    };
                    total.insert(v.as_tensor(), sum);
                }
            }
            Ok(())
        };

        // The embeddings, with their (small) graph kept; the blocks see a
        // leaf in their place.
        let emb_act = self.embedding(timesteps, y)?;
        let emb_var = if emb_act.track_op() {
            Some(Var::from_tensor(&emb_act.detach())?)
        } else {
            None
        };
        let emb_in = emb_var
            .as_ref()
            .map_or_else(|| emb_act.clone(), |v| v.as_tensor().clone());
        let ctx = context.to_dtype(dtype)?.detach();

        // Forward: every stage's input (an output stage's without its skip)
        // and whether the stage has anything trainable.
        let blocks: Vec<&super::Block> = self
            .input_blocks
            .iter()
            .chain(self.middle_block.iter())
            .chain(self.output_blocks.iter())
            .collect();
        let n_in = self.input_blocks.len();
        let first_out = blocks.len() - self.output_blocks.len();
        // Output stage `s` concatenates the output of input stage `skip_of(s)`.
        let skip_of = |s: usize| n_in - 1 - (s - first_out);
        let mut inputs: Vec<Option<Tensor>> = Vec::with_capacity(blocks.len());
        let mut outputs_in: Vec<Tensor> = Vec::with_capacity(n_in);
        let mut tracked: Vec<bool> = Vec::with_capacity(blocks.len());
        let mut h = x.to_dtype(dtype)?.detach();
        for (s, block) in blocks.iter().enumerate() {
            inputs.push(Some(h.clone()));
            let inp = if s >= first_out {
                Tensor::cat(&[&h, &outputs_in[skip_of(s)]], 1)?
            } else {
                h.clone()
            };
            let out = block.forward(&inp, &emb_in, &ctx)?;
            tracked.push(out.track_op());
            h = out.detach();
            if s < n_in {
                outputs_in.push(h.clone());
            }
        }

        // The head and the loss, then backward into the last stage.
        let head_in = Var::from_tensor(&h)?;
        let out = self
            .out_conv
            .forward(&self.out_norm.forward_silu(head_in.as_tensor())?)?;
        let loss = loss_of(&out)?;
        let mut g = loss.backward()?;
        // Every gradient taken out is detached: candle leaves a Var's
        // gradient tracked when the op that made it read tracked tensors,
        // and the next stage's backward would run through that graph.
        let mut g_out = g.remove(head_in.as_tensor()).map(|t| t.detach());
        keep(&mut g, &mut total)?;
        drop(g);

        // Backward through the stages, recomputing each.
        let mut skip_grads: Vec<Option<Tensor>> = vec![None; n_in];
        let mut emb_grad: Option<Tensor> = None;
        let add = |a: Option<Tensor>, b: Option<Tensor>| -> Result<Option<Tensor>> {
            Ok(match (a, b) {
                (Some(a), Some(b)) => Some((a + b)?),
                (a, b) => a.or(b),
            })
        };
        for s in (0..blocks.len()).rev() {
            let before = tracked[..s].iter().any(|&t| t);
            if !tracked[s] && !before {
                break;
            }
            if s < n_in {
                g_out = add(g_out, skip_grads[s].take())?;
            }
            let Some(grad) = g_out.take() else {
                // Nothing after this stage depends on it.
                continue;
            };
            let leaf = |t: &Tensor| -> Result<Option<Var>> {
                Ok(if before {
                    Some(Var::from_tensor(t)?)
                } else {
                    None
                })
            };
            // Each kept input is used once: freed as the walk passes it,
            // and the skips once the output stages are done.
            let Some(kept) = inputs[s].take() else {
                candle_core::bail!("unet: stage {s}'s kept input was already used");
            };
            if s < first_out {
                outputs_in.clear();
            }
            let h_var = leaf(&kept)?;
            let h_in = h_var.as_ref().map_or(kept, |v| v.as_tensor().clone());
            // The skip's gradient only matters when its source stage or
            // one before it trains.
            let skip_var = if s >= first_out && tracked[..=skip_of(s)].iter().any(|&t| t) {
                Some(Var::from_tensor(&outputs_in[skip_of(s)])?)
            } else {
                None
            };
            let inp = if s >= first_out {
                let skip = skip_var
                    .as_ref()
                    .map_or_else(|| outputs_in[skip_of(s)].clone(), |v| v.as_tensor().clone());
                Tensor::cat(&[&h_in, &skip], 1)?
            } else {
                h_in
            };
            let out = blocks[s].forward(&inp, &emb_in, &ctx)?;
            let mut g = (out * &grad)?.sum_all()?.backward()?;
            drop(grad);
            g_out = h_var
                .as_ref()
                .and_then(|v| g.remove(v.as_tensor()))
                .map(|t| t.detach());
            if let Some(v) = &skip_var {
                let i = skip_of(s);
                let gs = g.remove(v.as_tensor()).map(|t| t.detach());
                skip_grads[i] = add(skip_grads[i].take(), gs)?;
            }
            if let Some(v) = &emb_var {
                emb_grad = add(emb_grad, g.remove(v.as_tensor()).map(|t| t.detach()))?;
            }
            keep(&mut g, &mut total)?;
        }

        // The embedding MLPs.
        if let Some(eg) = emb_grad {
            let mut g = (emb_act * eg)?.sum_all()?.backward()?;
            keep(&mut g, &mut total)?;
        }
        Ok((loss, total))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};
    use candle_nn::{VarBuilder, VarMap};

    use crate::models::sdxl::{build_y, SizeCond, UNet, UNetConfig, UNET_PREFIX};

    /// The same loss and gradients as `forward` + `backward`: with every
    /// parameter trainable, and with only the last output block and the
    /// head (the rest frozen, so the recompute stops early).
    #[test]
    fn recomputed_gradients_match_the_plain_backward() -> candle_core::Result<()> {
        let cfg = UNetConfig::tiny();
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let unet = UNet::new(vb.pp(UNET_PREFIX), &cfg).map_err(candle_core::Error::wrap)?;
        crate::models::sdxl::init_params(&varmap, 3).map_err(candle_core::Error::wrap)?;
        let all: Vec<(String, Var)> = varmap.data().lock().unwrap().clone().into_iter().collect();

        let b = 2;
        let x = crate::nn::kernels::test_util::rand(&[b, 4, 16, 16], 1, DType::F32)?;
        let target = crate::nn::kernels::test_util::rand(&[b, 4, 16, 16], 2, DType::F32)?;
        let t = Tensor::new(&[999f32, 10.0], &dev)?;
        let ctx = crate::nn::kernels::test_util::rand(&[b, 5, cfg.context_dim], 3, DType::F32)?;
        let pooled = crate::nn::kernels::test_util::rand(&[b, cfg.pooled_dim], 4, DType::F32)?;
        let y = build_y(&pooled, &[SizeCond::inference(128.0, 128.0); 2])?;
        let loss_of = |out: &Tensor| (out - &target)?.sqr()?.mean_all();

        let check = |unet: &UNet, vars: &[Var]| -> candle_core::Result<()> {
            let want_loss = loss_of(&unet.forward(&x, &t, &ctx, &y)?)?;
            let want = want_loss.backward()?;
            let (loss, got) = unet.loss_and_grads_recomputed(&x, &t, &ctx, &y, vars, &loss_of)?;
            let (a, e) = (loss.to_scalar::<f32>()?, want_loss.to_scalar::<f32>()?);
            assert!((a - e).abs() <= 1e-6 * e.abs(), "loss {a} vs {e}");
            for v in vars {
                let (Some(g), Some(w)) = (got.get(v.as_tensor()), want.get(v.as_tensor())) else {
                    panic!("a gradient is missing");
                };
                let d = (g - w)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let m = w.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(d <= 1e-4 * m.max(1e-6), "{d} vs max {m}");
            }
            assert_eq!(got.get_ids().count(), vars.len(), "only the given vars");
            Ok(())
        };
        let vars: Vec<Var> = all.iter().map(|(_, v)| v.clone()).collect();
        check(&unet, &vars)?;

        // Freeze all but the last output block and the head: a UNet whose
        // other weights are plain tensors.
        let outputs: usize = cfg.num_res_blocks.iter().map(|n| n + 1).sum();
        let last = format!("output_blocks.{}.", outputs - 1);
        let trainable = |k: &str| k.contains(&last) || k.contains(".out.");
        let mut part = Vec::new();
        let map: std::collections::HashMap<String, Tensor> = all
            .iter()
            .map(|(k, v)| {
                let t = if trainable(k) {
                    part.push(v.clone());
                    v.as_tensor().clone()
                } else {
                    v.as_tensor().detach().copy().unwrap()
                };
                (k.clone(), t)
            })
            .collect();
        let vb = VarBuilder::from_tensors(map, DType::F32, &dev);
        let partial = UNet::new(vb.pp(UNET_PREFIX), &cfg).map_err(candle_core::Error::wrap)?;
        assert!(!part.is_empty() && part.len() < vars.len());
        check(&partial, &part)
    }
}
