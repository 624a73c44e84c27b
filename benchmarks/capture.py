"""Attention capture cost: (a) capture of every layer's last-row attention to the image vs (b) a plain SDPA
forward vs (c) eager ``output_attentions=True`` (the foil). LLaVA, hidden 256, 8 layers, 576 image tokens,
~650-token prompt, CPU, 1 thread. Prints median wall times and peak-memory increments, and the ratios.

Targets: (a)/(b) <= 1.2 wall and <= 1.1 peak memory.
Run: python benchmarks/capture.py [--rounds 30]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import GPU_PROXY, PeakMemory, bench_inputs, bench_model, interleaved, median, peak_in_fresh_process, setup_threads  # noqa: E402

from hf_vgrefine.attention import capture_image_attention  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--regime", choices=("cpu", "gpu-proxy"), default="cpu",
                    help="gpu-proxy: the host-bound CPU shape of a 7B model on a GPU (28 layers x 28 heads, 137 tokens)")
    ap.add_argument("--mem-variant", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    setup_threads()
    model = bench_model(**GPU_PROXY) if args.regime == "gpu-proxy" else bench_model()
    inputs = bench_inputs(model)
    T = inputs["input_ids"].shape[1]

    def plain():
        with torch.no_grad():
            model(**inputs)

    def capture():
        capture_image_attention(model, inputs, query="last")

    def eager():
        model.set_attn_implementation({"text_config": "eager"})
        try:
            with torch.no_grad():
                model(**inputs, output_attentions=True)
        finally:
            model.set_attn_implementation({"text_config": "sdpa"})

    variants = {"plain_sdpa": plain, "capture": capture, "eager_output_attentions": eager}
    if args.mem_variant:
        with PeakMemory() as pm:
            variants[args.mem_variant]()
        print(f"MEM {pm.extra_mib} {pm.total_mib}")
        return
    times = interleaved(variants, rounds=args.rounds)
    mem = {name: peak_in_fresh_process(__file__, name, ["--regime", args.regime]) for name in variants}
    tc = model.config.text_config
    print(f"model ({args.regime}): LLaVA text hidden {tc.hidden_size}, {tc.num_hidden_layers} layers, "
          f"{tc.num_attention_heads} heads; prompt {T} tokens; CPU, "
          f"{torch.get_num_threads()} thread(s); {args.rounds} interleaved rounds")
    for name in variants:
        print(f"  {name:24s} median {median(times[name]) * 1e3:8.1f} ms   min {min(times[name]) * 1e3:8.1f} ms   "
              f"peak +{mem[name][0]:7.1f} MiB (process peak {mem[name][1]:7.1f} MiB)")
    b = median(times["plain_sdpa"])
    print(f"RATIO wall (a) capture / (b) plain = {median(times['capture']) / b:.3f}   (target <= 1.2)")
    print(f"RATIO wall (c) eager / (b) plain   = {median(times['eager_output_attentions']) / b:.3f}")
    pb = mem["plain_sdpa"]
    for tag, name, target in (("(a)/(b)", "capture", "   (target <= 1.1)"), ("(c)/(b)", "eager_output_attentions", "")):
        print(f"RATIO peak memory {tag} increment = {mem[name][0] / max(pb[0], 1e-9):.3f}   "
              f"process peak = {mem[name][1] / pb[1]:.3f}{target}")


if __name__ == "__main__":
    main()
