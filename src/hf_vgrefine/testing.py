"""Tiny random-weight VLMs of every supported family, with local tokenizers and real HF processors.

Used by the test-suite, the benchmarks and the offline demo: no hub access is ever needed. Every
builder returns a model in ``eval()`` mode built with ``Model._from_config`` (random weights, seeded);
processors are real transformers processor classes around a word-level tokenizer built in memory.

Shared text size (unless overridden): hidden 64, 2 layers, 4 query heads, 2 KV heads (GQA), vocab 320.
Fixed ids: pad 0, bos 1, eos 2, unk 3, boi 297, eoi 298, image 300, video 301, vision_start 302,
vision_end 303.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch

PAD, BOS, EOS, UNK = 0, 1, 2, 3
BOI, EOI, IMAGE, VIDEO, VSTART, VEND = 297, 298, 300, 301, 302, 303
IMG_BREAK, IMG_END = 312, 313       # Mistral 3 / Pixtral row break and image end (hand-built ids; the tiny
                                    # vocabulary keeps its filler tokens there, the reference model's tokenizer)
VOCAB_SIZE = 320

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "paligemma", "internvl", "llava_onevision", "mistral3",
            "qwen3_5", "qwen3_5_moe")
# Qwen-VL-style inputs (flattened patches + image_grid_thw, <|vision_start|> ... <|vision_end|>, mm_token_type_ids)
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "qwen3_5_moe")

_SPECIAL = {
    PAD: "<pad>", BOS: "<s>", EOS: "</s>", UNK: "<unk>",
    BOI: "<start_of_image>", EOI: "<end_of_image>", IMAGE: "<image>", VIDEO: "<|video_pad|>",
    VSTART: "<|vision_start|>", VEND: "<|vision_end|>",
    304: "<|user|>", 305: "<|assistant|>", 306: "<|im_start|>", 307: "<|im_end|>",
    308: "<start_of_turn>", 309: "<end_of_turn>",
}

# Words for the in-memory vocabulary (ids 4..296); unknown words map to <unk>.
_BASE_WORDS = (
    list(string.ascii_uppercase) + list(string.ascii_lowercase) + list("0123456789") + list(".,:;?!()'\"-/")
    + """the a an is are there in of on this image picture question answer using single word or phrase
    Write Answer Is Does Can What Which write general description yes no what which where left right upper lower abnormality lesion present
    visible show shown see seen contain contains can does do be found any sign region structure brain
    liver lung kidney heart with from to and at by for it that option letter given choices directly
    user assistant system you your bright dark spot normal abnormal""".split()
)


def tiny_tokenizer(extra_words: list[str] | None = None):
    """Word-level ``PreTrainedTokenizerFast`` with the fixed special-token ids above (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in _SPECIAL.items()}
    words = list(dict.fromkeys(_BASE_WORDS + list(extra_words or [])))
    next_id = 4
    for w in words:
        if w in vocab:
            continue
        while next_id in _SPECIAL:
            next_id += 1
        if next_id >= BOI:
            raise ValueError(f"tiny vocabulary is full ({BOI - 4} words); drop some of extra_words")
        vocab[w] = next_id
        next_id += 1
    for i in range(VOCAB_SIZE):  # fill holes so that every id decodes
        if i not in vocab.values():
            vocab[f"<extra_{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=[t for i, t in sorted(_SPECIAL.items()) if i > UNK],
        padding_side="left",
    )
    return fast


_LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{{ '\\n' }}"
    "{% else %}<|assistant|>\n{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{{ '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><image><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _text_config(**over):
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=2048,
               pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    cfg.update(over)
    return cfg


@dataclass
class TinyVLM:
    """A tiny model plus the sizes needed to build inputs by hand."""

    family: str
    model: torch.nn.Module
    image_size: int = 28      # vision tower input side (LLaVA / Gemma3 / LLaVA-NeXT)
    patch_size: int = 7


def build_tiny_model(family: str, seed: int = 0, attn_implementation: str = "sdpa", **text_over) -> TinyVLM:
    """Random-weight tiny model of ``family`` (one of ``FAMILIES``); ``text_over`` overrides text config."""
    import transformers as tf

    torch.manual_seed(seed)
    if family in ("llava", "llava_next"):
        vision_size = text_over.pop("vision_image_size", 28)
        vc = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=vision_size, patch_size=7, projection_dim=32)
        tc = tf.LlamaConfig(**_text_config(**text_over))
        if family == "llava":
            cfg = tf.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE,
                                 image_seq_length=(vision_size // 7) ** 2, vision_feature_layer=-1,
                                 vision_feature_select_strategy="default")
            model = tf.LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
        else:
            s = vision_size
            cfg = tf.LlavaNextConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE,
                                     image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
                                     vision_feature_layer=-1, vision_feature_select_strategy="default",
                                     image_seq_length=(s // 7) ** 2)
            model = tf.LlavaNextForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
            with torch.no_grad():
                model.model.image_newline.normal_(std=1.0)
        return TinyVLM(family, model.eval(), image_size=vision_size, patch_size=7)
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}
        tc = _text_config(rope_parameters=rope, **text_over)
        ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND)
        if family == "qwen2_vl":
            vc = dict(depth=1, embed_dim=32, hidden_size=tc["hidden_size"], num_heads=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
            classes, patch = (tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration), 14
        elif family == "qwen2_5_vl":
            vc = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=tc["hidden_size"],
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1])
            classes, patch = (tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration), 14
        else:
            tc.setdefault("head_dim", tc["hidden_size"] // tc["num_attention_heads"])
            vc = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=tc["hidden_size"],
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0])
            classes, patch = (tf.Qwen3VLConfig, tf.Qwen3VLForConditionalGeneration), 16
        cfg = classes[0](text_config=tc, vision_config=vc, **ids)
        model = classes[1]._from_config(cfg, attn_implementation=attn_implementation)
        return TinyVLM(family, model.eval(), image_size=0, patch_size=patch)
    if family in ("qwen3_5", "qwen3_5_moe"):
        return _tiny_qwen3_5(family, attn_implementation, text_over)
    if family == "gemma3":
        over = dict(head_dim=16, sliding_window=512, query_pre_attn_scalar=16)
        over.update(text_over)
        tc = tf.Gemma3TextConfig(**_text_config(**over))
        vc = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=28, patch_size=7)
        cfg = tf.Gemma3Config(text_config=tc, vision_config=vc, mm_tokens_per_image=4,
                              boi_token_index=BOI, eoi_token_index=EOI, image_token_index=IMAGE)
        model = tf.Gemma3ForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
        with torch.no_grad():  # random init leaves the projector at zero: images would be ignored
            torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.5)
        return TinyVLM(family, model.eval(), image_size=28, patch_size=7)
    if family == "paligemma":
        over = dict(head_dim=16)
        over.update(text_over)
        tc = tf.GemmaConfig(**_text_config(**over))
        vc = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=28, patch_size=7)
        cfg = tf.PaliGemmaConfig(text_config=tc, vision_config=vc, image_token_id=IMAGE, projection_dim=tc.hidden_size)
        model = tf.PaliGemmaForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
        return TinyVLM(family, model.eval(), image_size=28, patch_size=7)
    if family == "internvl":
        tc = tf.Qwen2Config(**_text_config(**text_over))
        vc = tf.InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=[28, 28], patch_size=[7, 7])
        cfg = tf.InternVLConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE, downsample_ratio=0.5,
                                image_seq_length=4)
        model = tf.InternVLForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
        return TinyVLM(family, model.eval(), image_size=28, patch_size=7)
    if family == "llava_onevision":  # SigLIP tower (no CLS), anyres pinpoints, high-res grid capped at 2 tiles
        s = 28
        tc = tf.Qwen2Config(**_text_config(**text_over))
        vc = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=s, patch_size=7)
        cfg = tf.LlavaOnevisionConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE, vision_feature_layer=-1,
                                      vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_2",
                                      image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]])
        model = tf.LlavaOnevisionForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
        with torch.no_grad():
            model.model.image_newline.normal_(std=1.0)
        return TinyVLM(family, model.eval(), image_size=s, patch_size=7)
    if family == "mistral3":  # Pixtral tower, 7-px patches merged 2x2: one token per 14 px
        tc = tf.MistralConfig(**_text_config(head_dim=16, **text_over))
        vc = tf.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    head_dim=16, image_size=112, patch_size=7)
        cfg = tf.Mistral3Config(vision_config=vc, text_config=tc, image_token_id=IMAGE, spatial_merge_size=2,
                                vision_feature_layer=-1)
        model = tf.Mistral3ForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
        return TinyVLM(family, model.eval(), image_size=112, patch_size=7)
    raise ValueError(f"unknown tiny family {family!r}; choose one of {FAMILIES}")


def hybrid_layer_types(n: int) -> list[str]:
    """Layer kinds of the tiny Qwen 3.5 models: linear attention (Gated DeltaNet) at the even layers, full softmax
    attention at the odd ones, the last layer always full (``["linear_attention", "full_attention"]`` for 2 layers,
    ``[..., "full_attention", "full_attention"]`` for 3): layer 1 is full attention at every depth."""
    kinds = ["linear_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    kinds[-1] = "full_attention"
    return kinds


def _tiny_qwen3_5(family: str, attn_implementation: str, text_over: dict) -> TinyVLM:
    """Qwen 3.5 (dense / MoE): Qwen3-VL's vision tower (16-px patches, 2x2 merge) and a hybrid text decoder
    (:func:`hybrid_layer_types`), partial interleaved M-RoPE (half of the 32-dim heads rotate)."""
    import transformers as tf

    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3], "mrope_interleaved": True,
            "partial_rotary_factor": 0.5}
    n = text_over.pop("num_hidden_layers", 2)
    over = dict(head_dim=32, rope_parameters=rope, num_hidden_layers=n, layer_types=hybrid_layer_types(n),
                linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                linear_num_value_heads=4)
    if family == "qwen3_5_moe":
        over.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
        over.pop("intermediate_size", None)
    over.update(text_over)
    tc = _text_config(**over)
    if family == "qwen3_5_moe":
        tc.pop("intermediate_size")
    vc = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=tc["hidden_size"],
              patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64)
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    classes = ((tf.Qwen3_5Config, tf.Qwen3_5ForConditionalGeneration) if family == "qwen3_5" else
               (tf.Qwen3_5MoeConfig, tf.Qwen3_5MoeForConditionalGeneration))
    cfg = classes[0](text_config=tc, vision_config=vc, **ids)
    model = classes[1]._from_config(cfg, attn_implementation=attn_implementation)
    return TinyVLM(family, model.eval(), image_size=0, patch_size=16)


def _qwen_hw(tiny: TinyVLM, grid: tuple[int, int]) -> tuple[int, int]:
    return grid[0] * 2, grid[1] * 2


def tiny_inputs(tiny: TinyVLM, prompt_lengths: list[int], grids: list[tuple[int, int]] | None = None,
                seed: int = 0) -> dict:
    """Hand-built left-padded batch: one image per sample, ``prompt_lengths[b]`` text tokens after it.

    ``grids[b] = (rows, cols)`` of LLM image tokens (Qwen families: any even-free size; LLaVA-NeXT:
    an original image size (H, W) in pixels instead). Returns model kwargs incl. ``attention_mask``.
    """
    g = torch.Generator().manual_seed(seed)
    fam, B = tiny.family, len(prompt_lengths)
    rows_ids, extras = [], {}
    if fam == "llava":
        n = (tiny.image_size // tiny.patch_size) ** 2
        extras["pixel_values"] = torch.randn(B, 3, tiny.image_size, tiny.image_size, generator=g)
        img = [[IMAGE] * n for _ in range(B)]
        pre = [[BOS, 310, 311]] * B
    elif fam == "gemma3":
        n = tiny.model.config.mm_tokens_per_image
        extras["pixel_values"] = torch.randn(B, 3, tiny.image_size, tiny.image_size, generator=g)
        img = [[BOI] + [IMAGE] * n + [EOI] for _ in range(B)]
        pre = [[BOS, 308, 310]] * B
    elif fam == "paligemma":  # the processor's layout: image tokens, <bos>, prompt (prefix-LM)
        n = (tiny.image_size // tiny.patch_size) ** 2
        extras["pixel_values"] = torch.randn(B, 3, tiny.image_size, tiny.image_size, generator=g)
        img = [[IMAGE] * n + [BOS] for _ in range(B)]
        pre = [[]] * B
    elif fam == "internvl":  # <img> + tiles x 4 tokens + </img>; grids[b] = (tiles,): 1, or k tiles + a thumbnail
        per_tile = (tiny.image_size // tiny.patch_size // 2) ** 2
        tiles = [t[0] for t in grids] if grids else [1] * B
        extras["pixel_values"] = torch.randn(sum(tiles), 3, tiny.image_size, tiny.image_size, generator=g)
        img = [[BOI] + [IMAGE] * (per_tile * t) + [EOI] for t in tiles]
        pre = [[BOS, 310, 311]] * B
    elif fam == "mistral3":  # grids[b] = (rows, cols) of tokens; rows of [IMG] x cols + [IMG_BREAK], last [IMG_END]
        grids = grids or [(3, 4)] * B
        f = tiny.patch_size * tiny.model.config.spatial_merge_size
        hmax, wmax = max(r for r, _ in grids) * f, max(c for _, c in grids) * f
        pix = torch.zeros(B, 3, hmax, wmax)
        for b, (r, c) in enumerate(grids):
            pix[b, :, :r * f, :c * f] = torch.randn(3, r * f, c * f, generator=g)
        extras["pixel_values"] = pix
        extras["image_sizes"] = torch.tensor([[r * f, c * f] for r, c in grids])
        img = [sum(([IMAGE] * c + [IMG_BREAK] for _ in range(r)), [])[:-1] + [IMG_END] for r, c in grids]
        pre = [[BOS, 310, 311]] * B
    elif fam in ("llava_next", "llava_onevision"):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        sizes = grids or [(40, 70)] * B
        cfg = tiny.model.config
        counts, pix = [], []
        for hw in sizes:
            n_patches = image_size_to_num_patches(hw, cfg.image_grid_pinpoints, tiny.image_size)
            pix.append(torch.randn(n_patches, 3, tiny.image_size, tiny.image_size, generator=g))
            counts.append(_llava_next_token_count(tiny, hw))
        maxp = max(p.shape[0] for p in pix)
        extras["pixel_values"] = torch.stack([torch.cat([p, p.new_zeros(maxp - p.shape[0], *p.shape[1:])]) for p in pix])
        extras["image_sizes"] = torch.tensor(sizes)
        img = [[IMAGE] * c for c in counts]
        pre = [[BOS, 310, 311]] * B
    else:
        grids = grids or [(4, 4)] * B
        patch = tiny.patch_size
        pv, thw, img = [], [], []
        for r, c in grids:
            h, w = _qwen_hw(tiny, (r, c))
            pv.append(torch.randn(h * w, 3 * 2 * patch * patch, generator=g))
            thw.append([1, h, w])
            img.append([VSTART] + [IMAGE] * (r * c) + [VEND])
        extras["pixel_values"] = torch.cat(pv)
        extras["image_grid_thw"] = torch.tensor(thw)
        pre = [[BOS, 306, 310]] * B
    for b in range(B):
        text = torch.randint(4, 290, (prompt_lengths[b],), generator=g).tolist()
        rows_ids.append(pre[b] + img[b] + text)
    T = max(len(r) for r in rows_ids)
    input_ids = torch.full((B, T), PAD, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for b, r in enumerate(rows_ids):
        input_ids[b, T - len(r):] = torch.tensor(r)
        attention_mask[b, T - len(r):] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask, **extras}
    if fam in QWEN_FAMILIES:
        out["mm_token_type_ids"] = (input_ids == IMAGE).int()
    if fam == "gemma3":
        out["token_type_ids"] = (input_ids == IMAGE).long()
    if fam == "paligemma":  # 0: bidirectional prefix (image + prompt), as the processor returns at inference
        out["token_type_ids"] = torch.zeros_like(input_ids)
    return out


def _llava_next_token_count(tiny: TinyVLM, hw: tuple[int, int]) -> int:
    from .adapters.llava_next import anyres_max_patches, llava_next_highres_shape

    cfg = tiny.model.config
    base = (tiny.image_size // tiny.patch_size) ** 2
    cap = anyres_max_patches(getattr(cfg, "vision_aspect_ratio", None))
    rows, cols = llava_next_highres_shape(hw, cfg.image_grid_pinpoints, tiny.image_size, tiny.patch_size, cap)
    return base + rows * (cols + 1)


def tiny_processor(family: str, extra_words: list[str] | None = None, **image_kwargs):
    """Real HF processor for a tiny ``family`` model (LLaVA, LLaVA-NeXT, Qwen2/2.5-VL, Qwen 3.5, PaliGemma, InternVL,
    LLaVA-OneVision) built locally (the Qwen, InternVL and OneVision processors need torchvision for their video
    processor class check: without it they raise ``RuntimeError``).

    ``image_kwargs`` go to the image processor (e.g. ``do_pad=True``, ``size=...``).
    """
    import transformers as tf

    tok = tiny_tokenizer(extra_words)
    if family == "llava":
        kw = dict(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, do_pad=True)
        kw.update(image_kwargs)
        ip = tf.LlavaImageProcessor(**kw)
        return tf.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=7, vision_feature_select_strategy="default",
                                 num_additional_image_tokens=1, chat_template=_LLAVA_TEMPLATE)
    if family == "llava_next":
        kw = dict(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                  image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]])
        kw.update(image_kwargs)
        ip = tf.LlavaNextImageProcessor(**kw)
        return tf.LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=7,
                                     vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                     chat_template=_LLAVA_TEMPLATE)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        kw = dict(size={"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 36})
        kw.update(image_kwargs)
        ip = tf.Qwen2VLImageProcessor(**kw)
        tok.image_token = "<image>"
        tok.image_token_id = IMAGE
        cls = tf.Qwen2VLProcessor if family == "qwen2_vl" else tf.Qwen2_5_VLProcessor
        try:
            return cls(image_processor=ip, tokenizer=tok, video_processor=None, chat_template=_QWEN_TEMPLATE)
        except AttributeError as e:  # transformers 5.x resolves the video processor class through torchvision
            raise RuntimeError(f"{cls.__name__} cannot be built without torchvision in this environment ({e}); "
                               "use the image processor alone (Qwen2VLImageProcessor) and hand-built ids") from e
    if family in ("qwen3_5", "qwen3_5_moe"):   # Qwen3VLProcessor around Qwen2VLImageProcessorPil, 16-px patches
        kw = dict(patch_size=16, merge_size=2, temporal_patch_size=2,
                  size={"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 36})
        kw.update(image_kwargs)
        ip = tf.Qwen2VLImageProcessorPil(**kw)
        tok.image_token, tok.image_token_id = "<image>", IMAGE
        try:
            return tf.Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=None,
                                       chat_template=_QWEN_TEMPLATE)
        except AttributeError as e:  # transformers 5.x resolves the video processor class through torchvision
            raise RuntimeError(f"Qwen3VLProcessor cannot be built without torchvision in this environment ({e}); "
                               "use the image processor alone (Qwen2VLImageProcessorPil) and hand-built ids") from e
    if family == "paligemma":
        kw = dict(size={"height": 28, "width": 28})
        kw.update(image_kwargs)
        ip = tf.SiglipImageProcessorPil(**kw)
        ip.image_seq_length = 16
        tok.image_token, tok.image_token_id = "<image>", IMAGE
        return tf.PaliGemmaProcessor(image_processor=ip, tokenizer=tok, chat_template=_LLAVA_TEMPLATE)
    if family in ("internvl", "llava_onevision"):
        if family == "internvl":
            kw = dict(size={"height": 28, "width": 28}, crop_to_patches=True, min_patches=1, max_patches=4)
            kw.update(image_kwargs)
            ip = tf.GotOcr2ImageProcessorPil(**kw)
            tok.start_image_token, tok.end_image_token, tok.context_image_token = (
                _SPECIAL[BOI], _SPECIAL[EOI], _SPECIAL[IMAGE])
            tok.start_image_token_id, tok.end_image_token_id, tok.context_image_token_id = BOI, EOI, IMAGE
            tok.video_token = _SPECIAL[VIDEO]
            cls, extra = tf.InternVLProcessor, dict(image_seq_length=4)
        else:
            kw = dict(size={"height": 28, "width": 28}, image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56]],
                      do_pad=True)
            kw.update(image_kwargs)
            ip = tf.LlavaOnevisionImageProcessorPil(**kw)
            cls, extra = tf.LlavaOnevisionProcessor, dict(num_image_tokens=16, vision_aspect_ratio="anyres_max_2",
                                                          vision_feature_select_strategy="full")
        try:
            return cls(image_processor=ip, tokenizer=tok, video_processor=None, chat_template=_LLAVA_TEMPLATE, **extra)
        except AttributeError as e:  # transformers 5.x resolves the video processor class through torchvision
            raise RuntimeError(f"{cls.__name__} cannot be built without torchvision in this environment ({e}); "
                               "use the image processor alone and hand-built ids") from e
    raise ValueError(f"no tiny processor for {family!r}; available: llava, llava_next, qwen2_vl, qwen2_5_vl, "
                     "qwen3_5, qwen3_5_moe, paligemma, internvl, llava_onevision")
