"""Tiny random LLaVA + real processor saved to a folder (for the Med-VQA harness tests).

Uses ``hf_vgrefine.testing`` (``build_tiny_model`` / ``tiny_processor``) when available, otherwise an
equivalent local builder. The LM-head rows of the tokens "A"–"D", "yes", "no" are scaled up so that a
random model mostly answers with an option letter (responses still depend on image and prompt).
"""

from __future__ import annotations

import os

import torch

ANSWER_TOKENS = ["A", "B", "C", "D", "yes", "no"]

_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _local_builders():
    import string

    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    special = ["<pad>", "<s>", "</s>", "<unk>"]
    words = (list(string.ascii_uppercase) + list(string.ascii_lowercase) + list("0123456789.,:;?!()'\"-/")
             + "the is are yes no what which answer option letter given choices directly user assistant".split())
    vocab = {t: i for i, t in enumerate(special)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    for i in range(len(vocab), 320):
        vocab[f"<extra_{i}>"] = i
    vocab["<image>"], vocab["<|user|>"], vocab["<|assistant|>"] = 300, 304, 305
    vocab = {k: v for k, v in vocab.items() if not (k.startswith("<extra_") and v in (300, 304, 305))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                      pad_token="<pad>", additional_special_tokens=["<image>", "<|user|>", "<|assistant|>"])
    ip = tf.LlavaImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, do_pad=True)
    proc = tf.LlavaProcessor(image_processor=ip, tokenizer=fast, patch_size=7, vision_feature_select_strategy="default",
                             num_additional_image_tokens=1, chat_template=_TEMPLATE)
    torch.manual_seed(0)
    vc = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=28, patch_size=7, projection_dim=32)
    tc = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=320, max_position_embeddings=2048, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)
    cfg = tf.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=300, image_seq_length=16,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = tf.LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()
    return model, proc


def build_model_and_processor():
    """(model, processor) in memory: tiny LLaVA (CLIP 28 px / patch 7 → 16 image tokens)."""
    try:
        from hf_vgrefine.testing import build_tiny_model, tiny_processor

        model, proc = build_tiny_model("llava", seed=0).model, tiny_processor("llava")
    except (ImportError, AttributeError, TypeError):
        model, proc = _local_builders()
    ids = proc.tokenizer.convert_tokens_to_ids(ANSWER_TOKENS)
    with torch.no_grad():
        w = model.get_output_embeddings().weight
        w[ids] *= 6.0
    return model, proc


def save_tiny_llava(path: str | os.PathLike) -> str:
    """Save the tiny model and its processor to ``path`` (load back with the Auto classes)."""
    model, proc = build_model_and_processor()
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return os.fspath(path)


def load_tiny_llava(path: str | os.PathLike):
    """(model, processor) through ``AutoModelForImageTextToText`` / ``AutoProcessor``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
