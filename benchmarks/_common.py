"""Shared helpers for the benchmark scripts: the benchmark-sized tiny LLaVA, timing and peak memory."""

from __future__ import annotations

import gc
import sys
import os
import statistics
import time

import torch


# The host-bound CPU stand-in for a 7B model on a GPU (issue "GPU regime"): 28 layers x 28 heads (4 KV) like
# Qwen2-7B, tiny width, an 8x8 image (56 px, patch 7): 137-token prompts. Per-layer Python and every extra model
# call cost as much here as the math, as they do for a 7B prefill on a GPU.
GPU_PROXY = dict(layers=28, hidden=112, heads=28, kv_heads=4, intermediate=224, vision_size=56)


def bench_model(layers: int = 8, hidden: int = 256, heads: int = 8, kv_heads: int = 8, dtype=torch.float32,
                vision_size: int = 168, device: str = "cpu", intermediate: int | None = None, vocab: int | None = None):
    """LLaVA with a 24x24 = 576-token image grid (tiny CLIP: 168 px, patch 7) and the given text size.

    ``intermediate``/``vocab`` default to 4*hidden / 320 for small models and 2.7*hidden / 32000 from
    hidden 1024 on; HuatuoGPT-Vision-7B's Qwen2-7B text model is hidden 3584, 28 layers, 28 heads (4 KV),
    intermediate 18944, vocab 152064."""
    import transformers as tf

    torch.manual_seed(0)
    vc = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             image_size=vision_size, patch_size=7, projection_dim=32)
    if intermediate is None:
        intermediate = hidden * 4 if hidden < 1024 else int(hidden * 2.7)
    if vocab is None:
        vocab = 32000 if hidden >= 1024 else 320
    tc = tf.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                        vocab_size=vocab, max_position_embeddings=4096,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = tf.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=300, image_seq_length=(vision_size // 7) ** 2,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    with torch.device(device):   # initialise the random weights on the target device (a 7B shape: seconds on a GPU)
        model = tf.LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model.eval().to(device)


def bench_inputs(model, batch: int = 1, text_tokens: int = 70, seed: int = 0, device: str = "cpu",
                 generic: bool = False):
    """Prompt of ~650 tokens: 3 prefix tokens, 576 image tokens, ``text_tokens`` question tokens.

    Same ``seed`` → same image (and same ids up to the image end) whatever ``text_tokens`` is.
    ``generic=True``: the same ``text_tokens`` tokens after the image in every sample (a generic prompt)."""
    g = torch.Generator().manual_seed(seed)
    side = model.config.vision_config.image_size
    n = (side // 7) ** 2
    if generic:   # one generic prompt text for every sample
        tail = torch.randint(4, 290, (text_tokens,), generator=g).tolist()
        rows = [[1, 5, 6] + [300] * n + tail for _ in range(batch)]
    else:         # question prompts of different lengths (left padding in a batch)
        rows = [[1, 5, 6] + [300] * n + torch.randint(4, 290, (text_tokens + 3 * b,), generator=g).tolist()
                for b in range(batch)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(batch, T, dtype=torch.long)
    mask = torch.zeros(batch, T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.tensor(r)
        mask[b, T - len(r):] = 1
    # the image depends on ``seed`` only, so a generic prompt built with the same seed shares the image
    pix = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(10_000 + seed)).to(model.dtype)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "pixel_values": pix.to(device)}


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak memory of a block above the memory in use when it starts (MiB).

    CPU: resets the kernel's peak-RSS counter (``/proc/self/clear_refs``) and reads ``VmHWM``; CUDA:
    ``torch.cuda.max_memory_allocated``.
    """

    def __init__(self, device: str = "cpu"):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start = _rss_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _rss_kb("VmHWM") * 1024
        self.total_mib = peak / 2**20
        self.extra_mib = max(peak - self.start, 0) / 2**20
        return False


def interleaved(variants: dict, rounds: int = 30, warmup: int = 3, device: str = "cpu") -> dict:
    """Run each variant round-robin; returns name -> list of times (s): wall time, or with ``BENCH_CLOCK=thread``
    on the CPU the calling thread's CPU time (steadier on a shared machine; with one torch thread the model
    runs in the calling thread)."""
    clock = time.thread_time if os.environ.get("BENCH_CLOCK") == "thread" and device == "cpu" else time.perf_counter
    times = {k: [] for k in variants}
    for i in range(warmup + rounds):
        for name, fn in variants.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = clock()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(clock() - t0)
    return times


def median(xs):
    return statistics.median(xs)


def setup_threads():
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    from transformers.utils import logging

    logging.set_verbosity_error()


def peak_in_fresh_process(script: str, variant: str, extra_args=()) -> tuple[float, float]:
    """Run ``script --mem-variant VARIANT`` in a fresh interpreter; returns (increment MiB, process peak MiB).

    A fresh process per variant keeps the allocator's cached blocks of one variant from hiding the
    next one's allocations. The script prints ``MEM <extra_mib> <total_mib>`` for that variant.
    """
    import subprocess

    out = subprocess.run([sys.executable, script, "--mem-variant", variant, *extra_args], capture_output=True,
                         text=True, check=True).stdout
    line = [x for x in out.splitlines() if x.startswith("MEM ")][-1].split()
    return float(line[1]), float(line[2])
