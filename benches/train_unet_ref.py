"""PyTorch reference for benches/train_unet.rs: the toy SDXL UNet
(`UNetConfig::tiny()`) built with diffusers' `UNet2DConditionModel`, trained
one AdamW step at a time on CPU with the same batch, shapes and thread count;
prints one JSON line with median forward / backward / optimizer / step times
(ms), the parameter count and peak RSS (MB, ru_maxrss; includes the torch and
diffusers imports).

Mapping of `UNetConfig::tiny()` (model_channels 32, channel_mult [1, 2, 4],
num_res_blocks 2, transformer_depth [0, 1, 1], middle depth 1,
num_head_channels 16, context_dim 64, pooled_dim 32, num_groups 8) onto
diffusers' SDXL layout (diffusers `stable-diffusion-xl-base-1.0/unet/config.json`
at small widths):
- block_out_channels = 32 * [1, 2, 4] = (32, 64, 128), layers_per_block 2;
- down blocks (DownBlock2D, CrossAttnDownBlock2D, CrossAttnDownBlock2D),
  up blocks mirrored, mid UNetMidBlock2DCrossAttn; transformer_layers_per_block
  (1, 1, 1) (level 0 has no transformer; the middle uses the last entry, 1);
- attention_head_dim = heads per level = width / 16 = (2, 4, 8) (diffusers
  names the head count `attention_head_dim` in the SDXL config);
- cross_attention_dim 64, use_linear_projection True, GEGLU feed-forward
  (diffusers' default for these blocks), norm_num_groups 8, norm_eps 1e-5
  (transformer GroupNorm eps 1e-6 is diffusers' fixed value, as sgm);
- addition_embed_type "text_time", addition_time_embed_dim 256,
  projection_class_embeddings_input_dim = 32 + 6 * 256 = 1568;
- time embedding: Timesteps(32, flip_sin_to_cos=True, freq_shift=0) and a
  128-d TimestepEmbedding, like sgm's time_embed with model_channels 32.
The only structural difference: diffusers applies the SiLU before each
ResBlock's time projection inside every block, eps2v once for all blocks
(same maths, same parameters).

Batch (as benches/train_unet.rs): 8 latents of 4x32x32 (256x256 images),
77 context tokens of width 64, pooled (8, 32), size conditioning 256x256,
per-sample timesteps, MSE against a random target, AdamW(lr 1e-4), f32.
"""


import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from torch_timing import setup, time_training

BATCH = 8
LATENT = 32
TOKENS = 77
CONTEXT = 64
POOLED = 32


def tiny_unet():
    return UNet2DConditionModel(
        sample_size=LATENT,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=(32, 64, 128),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 1),
        attention_head_dim=(2, 4, 8),
        cross_attention_dim=CONTEXT,
        use_linear_projection=True,
        norm_num_groups=8,
        norm_eps=1e-5,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=POOLED + 6 * 256,
    )


def main():
    args = setup()
    net = tiny_unet()
    params = sum(p.numel() for p in net.parameters())
    x = torch.randn(BATCH, 4, LATENT, LATENT)
    target = torch.randn(BATCH, 4, LATENT, LATENT)
    t = torch.linspace(0, 999, BATCH)
    ctx = torch.randn(BATCH, TOKENS, CONTEXT)
    pooled = torch.randn(BATCH, POOLED)
    px = float(LATENT * 8)
    time_ids = torch.tensor([[px, px, 0.0, 0.0, px, px]] * BATCH)
    cond = {"text_embeds": pooled, "time_ids": time_ids}

    def loss():
        out = net(x, t, encoder_hidden_states=ctx, added_cond_kwargs=cond).sample
        return F.mse_loss(out, target)

    time_training(net.parameters(), loss, args.steps, params=params)


if __name__ == "__main__":
    main()
