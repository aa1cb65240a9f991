"""PyTorch / diffusers side of the device benchmark (benches/gpu/run.sh).

Builds diffusers' SDXL modules from explicit configs (no hub access: the
lent GPU machine reaches no network), loads the random single-file
checkpoint written by `eps2v gpu-bench weights` through diffusers' own
single-file converters (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`), so the key
mapping is checked independently of ours, and measures what
`eps2v gpu-bench run` measures:

1. the UNet on the same inputs (`io.safetensors`) in f32 (TF32 off) and in
   the bench dtype, and the relative L2 errors of our saved outputs
   (`unet_out.safetensors`) against them, plus the UNet call's median time;
2. `StableDiffusionXLPipeline` (SDPA attention, Euler, CFG 7, SDXL's zeroed
   uncond = `force_zeros_for_empty_prompt`, our default too) at the bench
   size, steps and batch sizes (`num_images_per_prompt`), after a 2-step
   warm-up;
3. one training step (MSE, `torch.optim.AdamW(lr 1e-5, wd 0.01)`, fused on
   CUDA; weights and activations in the bench dtype) with `out`+`OUT08`
   (diffusers `conv_norm_out`, `conv_out`, `up_blocks.2.resnets.2`) and
   with the whole UNet trainable: median forward / backward / optimizer /
   step times after one warm-up step, `torch.cuda.max_memory_allocated`
   from after loading (the text encoders and VAE are freed first, as ours).

Tokenizers: HF `vocab.json` / `merges.txt` built from open_clip's BPE file
(fixtures/tokenizer/bpe_simple_vocab_16e6.txt.gz), the same construction as
open_clip's SimpleTokenizer, so both CLIP tokenizers work offline.

Writes one JSON file (`--out`); on failure, `{"error": ...}` with the
traceback, and exit status 1.
"""

import argparse
import gc
import gzip
import json
import math
import os
import statistics
import sys
import time
import traceback

PROMPT = "a photo of a red circle on a blue background, high quality"  # = gpubench::run::PROMPT
CFG_SCALE = 7.0


def parse():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--ours", help="unet_out.safetensors of `gpu-bench run`")
    ap.add_argument("--variant", default="full", choices=["full", "tiny"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    ap.add_argument("--size", default="1024x1024")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=120.0, help="sampling budget (s)")
    ap.add_argument("--train-budget-s", type=float, default=30.0, help="per training selection (s)")
    ap.add_argument("--vocab", default="fixtures/tokenizer/bpe_simple_vocab_16e6.txt.gz")
    ap.add_argument("--work", default="/tmp/eps2v-gpubench-ref")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    ap.add_argument("--out", required=True)
    return ap.parse_args()


def log(t0, msg):
    print(f"[{time.perf_counter() - t0:7.1f}s] torch: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Configs (must match eps2v's UNetConfig / VaeConfig / TextConfigs).


def unet_config(variant, sample_size):
    if variant == "full":  # diffusers stable-diffusion-xl-base-1.0/unet/config.json
        widths, depth, heads, ctx, pooled, groups = (320, 640, 1280), (1, 2, 10), (5, 10, 20), 2048, 1280, 32
    else:  # UNetConfig::tiny(), as benches/train_unet_ref.py
        widths, depth, heads, ctx, pooled, groups = (32, 64, 128), (1, 1, 1), (2, 4, 8), 64, 32, 8
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=widths,
        layers_per_block=2,
        transformer_layers_per_block=depth,
        attention_head_dim=heads,
        cross_attention_dim=ctx,
        use_linear_projection=True,
        norm_num_groups=groups,
        norm_eps=1e-5,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=pooled + 6 * 256,
    )


def vae_config(variant):
    ch, groups = (128, 32) if variant == "full" else (16, 8)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[ch, 2 * ch, 4 * ch, 4 * ch],
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=groups,
        act_fn="silu",
        scaling_factor=0.13025,
        force_upcast=True,
    )


def clip_configs(variant):
    from transformers import CLIPTextConfig

    common = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5,
                  bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    if variant == "full":
        l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768, **common)
        g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=20, hidden_act="gelu", projection_dim=1280, **common)
    else:  # TextConfigs::tiny()
        l = CLIPTextConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, hidden_act="quick_gelu", projection_dim=32, **common)
        g = CLIPTextConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, hidden_act="gelu", projection_dim=32, **common)
    return l, g


def bytes_to_unicode():
    """GPT-2 / CLIP byte-to-unicode table (the usual construction)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizers(vocab_gz, work):
    from transformers import CLIPTokenizer

    lines = gzip.open(vocab_gz).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(work, exist_ok=True)
    vf, mf = os.path.join(work, "vocab.json"), os.path.join(work, "merges.txt")
    with open(vf, "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(mf, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(vf, mf, model_max_length=77), CLIPTokenizer(vf, mf, pad_token="!", model_max_length=77)


def load_into(model, sd, what):
    # transformers 5 dropped the `text_model.` level of CLIPTextModel's keys
    # that diffusers' converters still write (4.x keeps it): match the model.
    keys = set(model.state_dict().keys())
    fixed = {}
    for k, v in sd.items():
        if k not in keys and k.startswith("text_model.") and k[len("text_model.") :] in keys:
            k = k[len("text_model.") :]
        elif k not in keys and "text_model." + k in keys:
            k = "text_model." + k
        fixed[k] = v
    missing, unexpected = model.load_state_dict(fixed, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"{what}: missing {missing[:8]} ({len(missing)}), unexpected {unexpected[:8]} ({len(unexpected)})")


def build(args, dev, t0):
    """diffusers / transformers modules in f32 on `dev`, weights from the checkpoint."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sf
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    w, h = (int(v) for v in args.size.lower().split("x"))
    sd = load_file(args.model, device=str(dev))
    log(t0, f"read {len(sd)} tensors")
    with torch.device(dev):
        unet = UNet2DConditionModel(**unet_config(args.variant, h // 8))
        vae = AutoencoderKL(**vae_config(args.variant))
        cl, cg = clip_configs(args.variant)
        te1 = CLIPTextModel(cl)
        te2 = CLIPTextModelWithProjection(cg)
    load_into(unet, sf.convert_ldm_unet_checkpoint(sd, dict(unet.config)), "unet")
    load_into(vae, sf.convert_ldm_vae_checkpoint(sd, dict(vae.config)), "vae")
    load_into(te1, sf.convert_ldm_clip_checkpoint(sd), "text_encoder")
    load_into(te2, sf.convert_open_clip_checkpoint(te2, sd, prefix="conditioner.embedders.1.model."), "text_encoder_2")
    del sd
    gc.collect()
    for m in (unet, vae, te1, te2):
        m.eval().requires_grad_(False)
    return unet, vae, te1, te2


def sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------


def unet_check(args, dev, dt, unet, t0):
    import torch
    from safetensors.torch import load_file

    io = load_file(args.inputs)
    io = {k: v.to(dev) for k, v in io.items()}

    def call(d, io=io):
        with torch.no_grad():
            return unet(
                io["x"].to(d),
                io["timesteps"],
                encoder_hidden_states=io["context"].to(d),
                added_cond_kwargs={"text_embeds": io["pooled"].to(d), "time_ids": io["time_ids"].to(d)},
            ).sample.float()

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref32 = call(torch.float32)
    unet.to(dt)
    ref = call(dt)
    times = []
    for _ in range(3):
        sync(dev)
        t = time.perf_counter()
        call(dt)
        sync(dev)
        times.append((time.perf_counter() - t) * 1e3)
    out = {"forward_ms": statistics.median(times), "finite": bool(torch.isfinite(ref).all())}
    try:  # a breakdown that fails must not cost the timings below
        t = time.perf_counter()
        out["profile"] = profile_call(lambda: call(dt), unet, dev)
        out["profiled_ms"] = (time.perf_counter() - t) * 1e3
    except Exception:
        out["profile_error"] = traceback.format_exc()
        log(t0, "profile failed:\n" + out["profile_error"])
    # The largest sampling batch's UNet call (two rows per image with CFG),
    # timed and profiled as above: where a bigger batch's time goes.
    rows = 2 * max([int(b) for b in args.batches.split(",") if b] or [1])
    base = io["x"].shape[0]
    if rows > base and rows % base == 0:
        try:
            wide_io = {k: torch.cat([v] * (rows // base)) for k, v in io.items()}
            call(dt, wide_io)
            times = []
            for _ in range(3):
                sync(dev)
                t = time.perf_counter()
                call(dt, wide_io)
                sync(dev)
                times.append((time.perf_counter() - t) * 1e3)
            wide = {"rows": rows, "forward_ms": statistics.median(times)}
            t = time.perf_counter()
            wide["profile"] = profile_call(lambda: call(dt, wide_io), unet, dev)
            wide["profiled_ms"] = (time.perf_counter() - t) * 1e3
            out["wide"] = wide
            del wide_io
        except Exception:
            out["wide_error"] = traceback.format_exc()
            log(t0, "wide call failed:\n" + out["wide_error"])
    if args.ours and os.path.exists(args.ours):
        ours = {k: v.to(dev) for k, v in load_file(args.ours).items()}

        def rel(a, b):
            a, b = a.double(), b.double()
            return ((a - b).norm() / b.norm()).item()

        r = {"ref_vs_ref_f32": rel(ref, ref32)}
        od = ours.get(f"out_{args.dtype}")
        if od is not None:
            r["ours_vs_ref"] = rel(od, ref)
            r["ours_vs_ref_f32"] = rel(od, ref32)
            out["max_abs_ours_vs_ref"] = (od - ref).abs().max().item()
        if "out_f32" in ours:
            r["ours_f32_vs_ref_f32"] = rel(ours["out_f32"], ref32)
        out["rel_l2"] = r
        log(t0, f"unet rel. L2 errors {r}")
    return out


def profile_call(fn, unet, dev):
    """Run `fn` once with diffusers' modules and ops of the kinds that
    `eps2v` times (src/nn/profile.rs) each timed between device
    synchronisations, under the same names; rows are inclusive, as ours.
    Returns [{name, calls, ms}]."""
    import torch
    import torch.nn.functional as F

    table = {}

    def add(name, ms):
        calls, total = table.get(name, (0, 0.0))
        table[name] = (calls + 1, total + ms)

    def kind(m):
        n = type(m).__name__
        if n == "ResnetBlock2D":
            return "unet resblock"
        if n == "Transformer2DModel":
            return "unet spatial transformer"
        if n == "Attention":
            return "unet cross-attention" if getattr(m, "is_cross_attention", False) else "unet self-attention"
        if n == "FeedForward":
            return "unet feed-forward"
        if n == "Downsample2D":
            return "unet downsample"
        if n == "Upsample2D":
            return "unet upsample"
        if n == "GEGLU":
            return "_geglu"  # minus its projection: "op geglu"
        if isinstance(m, torch.nn.Conv2d):
            return "op conv2d"
        if isinstance(m, torch.nn.Linear):
            return "op linear"
        if isinstance(m, torch.nn.GroupNorm):
            return "op group_norm"
        if isinstance(m, torch.nn.LayerNorm):
            return "op layer_norm"
        return None

    starts, hooks = {}, []

    def pre(mod, args):
        sync(dev)
        starts[id(mod)] = time.perf_counter()

    def post(name):
        def hook(mod, args, output):
            sync(dev)
            add(name, (time.perf_counter() - starts[id(mod)]) * 1e3)

        return hook

    for m in unet.modules():
        name = kind(m)
        if name is not None:
            hooks.append(m.register_forward_pre_hook(pre))
            hooks.append(m.register_forward_hook(post(name)))
        if type(m).__name__ == "GEGLU":
            hooks.append(m.proj.register_forward_hook(post("_geglu_proj")))

    def timed(name, f):
        def wrapper(*a, **k):
            sync(dev)
            t = time.perf_counter()
            r = f(*a, **k)
            sync(dev)
            add(name, (time.perf_counter() - t) * 1e3)
            return r

        return wrapper

    sdpa, interpolate = F.scaled_dot_product_attention, F.interpolate
    F.scaled_dot_product_attention = timed("op attention", sdpa)
    F.interpolate = timed("op upsample", interpolate)
    try:
        fn()
    finally:
        F.scaled_dot_product_attention, F.interpolate = sdpa, interpolate
        for h in hooks:
            h.remove()
    # The GEGLU projection's pre-hook is the Linear's own ("op linear").
    if "_geglu" in table:
        calls, total = table.pop("_geglu")
        proj = table.pop("_geglu_proj", (0, 0.0))[1]
        table["op geglu"] = (calls, total - proj)
    return [{"name": k, "calls": c, "ms": ms} for k, (c, ms) in sorted(table.items())]


def sample_timings(args, dev, dt, unet, vae, te1, te2, t0):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    tok1, tok2 = tokenizers(args.vocab, args.work)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
    )
    unet.set_attn_processor(AttnProcessor2_0())
    for m in (vae, te1, te2):
        m.to(dt)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
        unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    w, h = (int(v) for v in args.size.lower().split("x"))

    def run(steps, batch):
        g = torch.Generator(device=dev).manual_seed(0)
        return pipe(prompt=PROMPT, height=h, width=w, num_inference_steps=steps, guidance_scale=CFG_SCALE,
                    num_images_per_prompt=batch, generator=g, output_type="pil").images

    run(2, 1)
    rows = []
    start = time.perf_counter()
    per_image = None
    for b in [int(x) for x in args.batches.split(",") if x]:
        spent = time.perf_counter() - start
        expected = per_image * b if per_image else 0.0
        if spent + expected > args.budget_s:  # as ours: skip a batch that would end past the budget
            rows.append({"batch": b, "steps": args.steps, "seconds": None, "seconds_per_image": None,
                         "skipped": f"sampling budget: {spent:.0f} s spent + {expected:.0f} s expected > {args.budget_s} s"})
            continue
        log(t0, f"sample batch {b}")
        sync(dev)
        t = time.perf_counter()
        images = run(args.steps, b)
        sync(dev)
        s = time.perf_counter() - t
        per_image = s / len(images)
        rows.append({"batch": b, "steps": args.steps, "seconds": s, "seconds_per_image": per_image})
    del pipe
    return rows


def selects(name, trainable):
    if trainable == "full":
        return True
    return name.startswith(("conv_norm_out.", "conv_out.", "up_blocks.2.resnets.2."))


def train_timings(args, dev, dt, unet, t0):
    import torch
    import torch.nn.functional as F

    w, h = (int(v) for v in args.size.lower().split("x"))
    cfg = unet.config
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, 4, h // 8, w // 8, generator=g).to(dev, dt)
    target = torch.randn(1, 4, h // 8, w // 8, generator=g).to(dev)
    ctx = torch.randn(1, 77, cfg.cross_attention_dim, generator=g).to(dev, dt)
    pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * 256
    pooled = torch.randn(1, pooled_dim, generator=g).to(dev, dt)
    time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).to(dev, dt)
    t = torch.tensor([499.0], device=dev)  # = Batch::random's 999·1/2
    unet.train()
    rows = []
    for trainable in ("out+OUT08", "full"):
        log(t0, f"training step, {trainable} trainable")
        try:
            params = []
            for n, p in unet.named_parameters():
                p.requires_grad_(selects(n, trainable))
                p.grad = None
                if p.requires_grad:
                    params.append(p)
            opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=dev.type == "cuda")
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            fw, bw, op, st = [], [], [], []
            warmup = None
            start = time.perf_counter()
            for i in range(args.train_steps + 1):
                if i > 0 and time.perf_counter() - start > args.train_budget_s:
                    break  # as ours: no step starts past the budget
                sync(dev)
                a = time.perf_counter()
                out = unet(x, t, encoder_hidden_states=ctx,
                           added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
                loss = F.mse_loss(out.float(), target)
                sync(dev)
                b = time.perf_counter()
                loss.backward()
                sync(dev)
                c = time.perf_counter()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync(dev)
                d = time.perf_counter()
                times = ((b - a) * 1e3, (c - b) * 1e3, (d - c) * 1e3, (d - a) * 1e3)
                if i == 0:
                    warmup = times
                else:
                    for lst, v in zip((fw, bw, op, st), times):
                        lst.append(v)
            timed = len(st)
            if timed == 0:  # only the warm-up fitted: report it
                fw, bw, op, st = ([v] for v in warmup)
            row = {
                "trainable": trainable,
                "params": sum(p.numel() for p in params),
                "forward_ms": statistics.median(fw),
                "backward_ms": statistics.median(bw),
                "optimizer_ms": statistics.median(op),
                "step_ms": statistics.median(st),
                "steps": timed,
                "loss": loss.item(),
                "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None,
                "error": None,
            }
            if dev.type == "cpu":
                import resource

                row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
            del opt
        except Exception as e:  # out of memory: record and go on, as ours
            row = {"trainable": trainable, "error": f"{type(e).__name__}: {e}"}
        rows.append(row)
        for p in unet.parameters():
            p.grad = None
    return rows


def finite(v):
    """`v` with every non-finite float as None: strict JSON (serde_json refuses NaN)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite(x) for x in v]
    return v


def dump(report, path):
    """Write `report` atomically (after every section: a run cut short keeps what it measured)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(finite(report), f, indent=1, allow_nan=False)
    os.replace(tmp, path)


def main():
    args = parse()
    t0 = time.perf_counter()
    report = {}
    try:
        import diffusers
        import torch

        if args.threads > 0:
            torch.set_num_threads(args.threads)
        dev = torch.device(args.device)
        dt = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
        report.update({
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "device": str(dev),
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "dtype": args.dtype,
        })
        log(t0, f"torch {torch.__version__}, diffusers {diffusers.__version__}, {report['gpu'] or 'cpu'}")
        t = time.perf_counter()
        unet, vae, te1, te2 = build(args, dev, t0)
        sync(dev)
        report["load_seconds"] = time.perf_counter() - t
        log(t0, "unet check")
        report["unet_check"] = unet_check(args, dev, dt, unet, t0)
        dump(report, args.out)
        report["sample"] = sample_timings(args, dev, dt, unet, vae, te1, te2, t0)
        dump(report, args.out)
        del vae, te1, te2
        report["train"] = train_timings(args, dev, dt, unet, t0)
        report["seconds"] = time.perf_counter() - t0
        status = 0
    except Exception:
        report["error"] = traceback.format_exc()
        print(report["error"], file=sys.stderr)
        status = 1
    dump(report, args.out)
    sys.exit(status)


if __name__ == "__main__":
    main()
