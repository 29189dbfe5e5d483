"""locattn on a real diffusers pipeline, zero model code: PixArt-Sigma built from small configs (random weights,
no downloads), its transformer compiled with one line and a policy that keeps the first 20% of steps dense:

    pipe.transformer = torch.compile(pipe.transformer, backend="locattn",
                                     options={"policy": "examples/policies/pixart.toml"})

Prints the explain table (each site's phases), the time per denoising step against ``torch.compile`` default
(dense phase and sparse phase apart; the two variants' timed runs alternate), Dynamo compiles after the warm-up
calls (0: switching phase does not recompile) and the image's difference from the ``torch.compile`` default
pipeline (random weights: the number says how far the local pattern moves this model's output, not image
quality).

    python examples/diffusers_pipeline.py                 # 1024x1024 (64x64 tokens), 20 steps
    python examples/diffusers_pipeline.py --quick         # 384x384, 5 steps: what the test suite runs

Components: ``PixArtTransformer2DModel`` (``--layers`` blocks, ``--heads`` x ``--head-dim``),
``AutoencoderKL`` (4 blocks: 8x downsampling, no mid-block attention), ``T5EncoderModel`` (1 layer) with a
word-level tokenizer built in code (``tokenizers``), ``DPMSolverMultistepScheduler`` (diffusers' default).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import locattn  # noqa: E402

POLICY = os.path.join(HERE, "policies", "pixart.toml")
WORDS = "a an the photo painting of cat dog fox red blue green small large in on with under sky sea".split()


def tiny_tokenizer(max_length: int):
    """A T5-like tokenizer (word level, ``</s>`` appended, ``<pad>`` = 0) built in code: no vocab files."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>", model_max_length=max_length)


def build_pipeline(size: int, layers: int, heads: int, head_dim: int, text_len: int, seed: int = 0):
    """``PixArtSigmaPipeline`` for ``size`` x ``size`` images from small configs, random weights."""
    import diffusers
    import transformers

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(text_len)
    text_encoder = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)).eval()
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), mid_block_add_attention=False).eval()
    transformer = diffusers.PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=layers,
        cross_attention_dim=heads * head_dim, caption_channels=32, sample_size=size // 8, norm_num_groups=8,
        use_additional_conditions=False).eval()
    pipe = diffusers.PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                         transformer=transformer, scheduler=diffusers.DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, args, steps: int):
    """One pipeline call: the final latents, the decoded image ``[H, W, 3]`` in [0, 1], and ``(seconds,
    timestep)`` of every denoising step but the first (step ``i`` runs from the end of step ``i - 1``; step 0
    also encodes the prompt). PixArt's pipeline reports steps through ``callback(step, timestep, latents)``."""
    stamps = []
    with torch.no_grad():
        latents = pipe(args.prompt, num_inference_steps=steps, height=args.size, width=args.size,
                       max_sequence_length=args.text_len, clean_caption=False, use_resolution_binning=False,
                       output_type="latent", generator=torch.Generator().manual_seed(args.seed),
                       callback=lambda i, t, _lat: stamps.append((time.perf_counter(), int(t)))).images
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        image = pipe.image_processor.postprocess(image, output_type="pt")[0].permute(1, 2, 0)
    steps_s = [(b[0] - a[0], b[1]) for a, b in zip(stamps, stamps[1:])]
    return latents, image, steps_s


def transformer_inputs(pipe, args):
    """The arguments of the transformer's first call: ``(positional, keyword)``."""
    seen = {}

    def hook(_mod, pos, kwargs):
        seen.setdefault("kw", (pos, dict(kwargs)))

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(args.prompt, num_inference_steps=1, height=args.size, width=args.size, max_sequence_length=args.text_len,
                 clean_caption=False, use_resolution_binning=False, output_type="latent",
                 generator=torch.Generator().manual_seed(args.seed))
    finally:
        handle.remove()
    return seen["kw"]


def compiles() -> int:
    """Frames Dynamo has compiled so far (first compiles and recompiles)."""
    return torch._dynamo.utils.counters["frames"]["total"]


def run_variants(pipe, transformer, args) -> tuple[dict, dict]:
    """Both variants compiled side by side (``torch.compile`` default and locattn with the policy), each warmed
    up by a 1-step call (its compile), then ``--repeats`` rounds of one timed ``--steps`` run per variant,
    alternating (so machine-load drift hits both alike). Dynamo keeps one cache entry per backend: switching
    variant or phase must not compile again. Returns (outputs, results) per variant."""
    torch._dynamo.reset()
    compiled = {"inductor": torch.compile(transformer),
                # the one line this example is about:
                "locattn": torch.compile(transformer, backend="locattn", options={"policy": args.policy})}
    results = {name: {"step_s": [], "total_s": [], "counters": {}} for name in compiled}
    outputs = {}
    for name, module in compiled.items():
        pipe.transformer = module
        t0 = time.perf_counter()
        generate(pipe, args, 1)
        results[name]["warmup_s"] = time.perf_counter() - t0
    before = compiles()
    for _ in range(args.repeats):
        for name, module in compiled.items():
            pipe.transformer = module
            locattn.reset_counters()
            t0 = time.perf_counter()
            latents, image, steps = generate(pipe, args, args.steps)
            results[name]["total_s"].append(time.perf_counter() - t0)
            results[name]["step_s"] += steps
            for k, v in locattn.counters().items():
                acc = results[name]["counters"].setdefault(k, {})
                for kk, n in v.items():
                    acc[kk] = acc.get(kk, 0) + n
            outputs[name] = (latents, image)
    after = compiles()
    pipe.transformer = transformer
    for r in results.values():
        r["compiles_after_warmup"] = after - before
        r["total_s"] = statistics.median(r["total_s"])
    return outputs, results, compiled


def _like(ts: torch.Tensor, value: float) -> torch.Tensor:
    """A timestep tensor like ``ts`` holding ``value``, strides included (the pipeline passes an expanded one,
    stride 0; another stride would be another Dynamo guard, i.e. a compile)."""
    if ts.dim() and all(st == 0 for st in ts.stride()):
        return ts.new_full((1,) * ts.dim(), value).expand(ts.shape)
    return torch.full_like(ts, value)


def time_calls(compiled: dict, inputs, args, t_dense: float, t_sparse: float) -> dict:
    """The transformer alone, one call per denoising step, with the pipeline's own arguments: ``--calls`` calls
    per variant and phase, the variants alternating call by call (load drift on a shared machine hits both
    alike). Median seconds per call."""
    pos, kwargs = inputs
    out = {name: {} for name in compiled}
    with torch.no_grad():
        for phase, t in (("dense", t_dense), ("sparse", t_sparse)):
            kw = {**kwargs, "timestep": _like(kwargs["timestep"], t)}
            times = {name: [] for name in compiled}
            for _ in range(args.calls):
                for name, module in compiled.items():
                    t0 = time.perf_counter()
                    module(*pos, **kw)
                    times[name].append(time.perf_counter() - t0)
            for name in compiled:
                out[name][phase] = statistics.median(times[name])
    return out


def _median(xs):
    return statistics.median(xs) if xs else None


def _ms(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="384x384, 1 layer, 5 steps (the test suite's run)")
    ap.add_argument("--size", type=int, default=1024, help="image height and width (tokens: (size/16)^2)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--text-len", type=int, default=16)
    ap.add_argument("--policy", default=POLICY)
    ap.add_argument("--prompt", default="a photo of a red fox in the sea")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per variant, alternating (--quick: 1)")
    ap.add_argument("--calls", type=int, default=7, help="transformer calls timed per variant and phase (--quick: 2)")
    ap.add_argument("--out", default=None, help="JSON results (default benchmarks/out/diffusers_pipeline[_quick].json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.steps, args.layers, args.heads, args.head_dim, args.repeats, args.calls = \
            384, 5, 1, 2, 32, 1, 2

    load0 = os.getloadavg()
    pipe = build_pipeline(args.size, args.layers, args.heads, args.head_dim, args.text_len, args.seed)
    transformer = pipe.transformer
    tokens = (args.size // 16) ** 2
    print(f"PixArtSigmaPipeline {args.size}x{args.size} ({tokens} tokens), {args.layers} layer(s), "
          f"{args.heads}x{args.head_dim} heads, {args.steps} steps, policy {os.path.relpath(args.policy)}; "
          f"{torch.get_num_threads()} threads, load {load0[0]:.2f}")

    inputs = transformer_inputs(pipe, args)
    report = locattn.explain(transformer, *inputs[0], **inputs[1], policy=args.policy)
    print(report)

    images, results, compiled = run_variants(pipe, transformer, args)
    lo, hi = locattn.Policy.coerce(args.policy).timestep_rules[0].timesteps   # the dense range
    dense_t = lo
    before = compiles()
    calls = time_calls(compiled, inputs, args, t_dense=(lo + hi) / 2, t_sparse=lo / 2)
    assert compiles() == before, "timing the transformer alone compiled again"

    (lat_l, img_l), (lat_i, img_i) = images["locattn"], images["inductor"]
    diff = (img_l.double() - img_i.double()).abs()
    mse = float(diff.square().mean())
    image_diff = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                  "psnr_db": 10 * math.log10(1.0 / mse) if mse > 0 else float("inf"),
                  "latents_rel_l2": float((lat_l - lat_i).double().norm() / lat_i.double().norm())}
    print(f"\n{'variant':<10} {'warm-up s':>9} {'total s':>8} {'ms/step dense phase':>20} "
          f"{'ms/step sparse phase':>21}   (medians over {args.repeats} run(s) each, alternating)")
    for name, r in results.items():
        dense = [s * 1e3 for s, t in r["step_s"] if t >= dense_t]
        sparse = [s * 1e3 for s, t in r["step_s"] if t < dense_t]
        r["median_ms_dense_phase"], r["median_ms_sparse_phase"] = _median(dense), _median(sparse)
        print(f"{name:<10} {r['warmup_s']:9.1f} {r['total_s']:8.2f} {_ms(r['median_ms_dense_phase']):>20} "
              f"{_ms(r['median_ms_sparse_phase']):>21}")
    print(f"Dynamo compiles after the warm-up calls (both variants, every phase): "
          f"{results['locattn']['compiles_after_warmup']}")
    speed = {k: results["inductor"][k] / results["locattn"][k] for k in ("median_ms_dense_phase",
             "median_ms_sparse_phase", "total_s") if results["locattn"][k] and results["inductor"][k]}
    print("pipeline: locattn speed vs torch.compile default: " + ", ".join(
        f"{k.replace('median_ms_', '')} {v:.2f}x" for k, v in speed.items()))
    print(f"transformer alone, median of {args.calls} calls per variant and phase, alternating: "
          + "; ".join(f"{ph} phase {calls['inductor'][ph] * 1e3:.1f} ms (torch.compile) vs "
                      f"{calls['locattn'][ph] * 1e3:.1f} ms (locattn): "
                      f"{calls['inductor'][ph] / calls['locattn'][ph]:.2f}x" for ph in ("dense", "sparse")))
    print(f"output vs torch.compile default (dense): final latents relative L2 {image_diff['latents_rel_l2']:.3g}; "
          f"image max abs {image_diff['max_abs']:.3g}, mean abs {image_diff['mean_abs']:.3g}, PSNR "
          f"{image_diff['psnr_db']:.1f} dB (pixels in [0, 1])")
    load1 = os.getloadavg()
    print(f"load average {load0[0]:.2f} at start, {load1[0]:.2f} at end")

    out = args.out or os.path.join(os.path.dirname(HERE), "benchmarks", "out",
                                   "diffusers_pipeline_quick.json" if args.quick else "diffusers_pipeline.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    meta = {"args": vars(args), "tokens": tokens, "load_start": load0, "load_end": load1, "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "command": "python examples/diffusers_pipeline.py" + (" --quick" if args.quick else "")}
    with open(out, "w") as f:
        json.dump({"meta": meta, "explain": report.rows(), "variants": results, "speedup": speed, "calls_s": calls,
                   "image_diff": image_diff}, f,
                  indent=1, default=str)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
