"""Family-adapter base class: where the image tokens are, what grid they form, where the decoder is.

Conventions (used by the whole package):

* positions index the (left-)padded ``input_ids`` row, ``[0, T)``;
* an image's grid tokens are listed row-major: token ``k`` of an ``R x C`` grid is cell
  ``(k // C, k % C)``, flat index ``row * C + col``;
* ``ImageSpan.end`` is the first position after the image's last placeholder token (``v_end``); the
  "post-image" query rows of the study are ``[v_end, T)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ImageSpan:
    """One image block of one sample.

    ``positions``: LongTensor ``[rows * cols]``, row-major grid-token positions (newline tokens and
    other non-grid placeholders excluded). ``start``/``end``: ``[start, end)`` covers every
    placeholder token of the image (for Qwen ``end`` is the ``<|vision_end|>`` position).
    """

    start: int
    end: int
    rows: int
    cols: int
    positions: torch.Tensor
    image_index: int = 0
    block: str = "grid"
    extra_positions: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return self.rows * self.cols


class UnsupportedModelError(ValueError):
    """Raised for a model the package cannot work with: its image does not enter the decoder's self-attention as
    placeholder tokens (cross-attention, encoder-decoder, no image token), with the reason."""


class FamilyAdapter:
    """Base class. Subclasses set ``model_types`` and implement ``image_spans`` and ``token_grid``."""

    model_types: tuple[str, ...] = ()
    family: str = ""
    # True: generate's prefill passes 1-D ``position_ids`` (cumsum of the mask) that a plain forward must
    # receive explicitly to be identical; False: the model derives positions itself (Qwen M-RoPE).
    explicit_position_ids: bool = True
    # True: token_grid reproduces the processor's exact transform; False: the generic adapter (token level; at
    # most an approximate stretch grid).
    exact_geometry: bool = True
    # True: the image tokens attend to the prompt text after them (PaliGemma's prefix-LM mask), so their keys
    # depend on the question: an image prefix cannot be shared between prompts with different text (VGRefine's
    # generic tail packed behind the question, the search's cached prefixes); those paths run full forwards.
    prefix_lm: bool = False
    # True: the decoder caches the keys/values its attention function receives, so a recorded question prefill
    # can be replayed into the generation cache (VGRefine's share_prefix); False: the answer prefill runs in full.
    can_replay_prefix: bool = True

    def __init__(self, model):
        self.model = model
        self.config = model.config
        self.text_config = self.config.get_text_config(decoder=True)

    # ----------------------------------------------------------------- decoder structure
    @property
    def decoder_layers(self):
        """The text decoder's layer list (v5 layout ``model.model.language_model.layers``, v4 fallbacks)."""
        for path in ("model.language_model.layers", "language_model.model.layers", "model.layers",
                     "language_model.layers"):
            obj = self.model
            try:
                for part in path.split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                continue
            if isinstance(obj, torch.nn.ModuleList):
                return obj
        raise AttributeError(f"cannot find the text decoder layers of {type(self.model).__name__}")

    @property
    def attention_layers(self) -> list[int]:
        """Indices of the decoder layers whose softmax attention goes through the attention registry (every layer,
        except in hybrid models whose linear-attention / recurrent layers have no attention map to read or block)."""
        cached = getattr(self, "_attention_layers", None)
        if cached is None:
            from .generic import layer_attention

            cached = self._attention_layers = [i for i, layer in enumerate(self.decoder_layers)
                                               if layer_attention(layer) is not None]
        return cached

    @property
    def hybrid(self) -> bool:
        """True when some decoder layers are linear-attention / recurrent layers (Qwen 3.5's Gated DeltaNet): their
        state carries every earlier token and no attention mask reaches them, so a token cannot be hidden from
        later rows there. VGRefine then runs the generic prompt as its own pass (no tail packed behind the question)
        and prefills the answer in full (no shared prefix); the knockout search runs full forwards."""
        return len(self.attention_layers) < self.num_layers

    @property
    def sparse_attention(self) -> bool:
        """True for DeepSeek sparse attention (DSA: Mistral Large 4, GLM-5): an indexer picks ``index_topk`` keys per
        query row from the model's own causal mask, before the attention function runs. A row packed behind the
        question would pick among the question's tokens that the package hides from it, and a replayed prefix
        lacks the indexer's key cache, so VGRefine runs the generic prompt in its own pass and prefills the answer
        in full (results equal ``share_prefix=False``)."""
        cached = getattr(self, "_sparse_attention", None)
        if cached is None:
            from .generic import layer_attention

            topk = getattr(self.text_config, "index_topk", None)
            cached = self._sparse_attention = bool(isinstance(topk, int) and topk > 0) or any(
                hasattr(a, "indexer") for a in (layer_attention(l) for l in self.decoder_layers) if a is not None)
        return cached

    @property
    def short_convolutions(self) -> bool:
        """True when decoder layers mix neighbouring tokens outside attention (Inkling's short causal convolutions
        over keys, values and the residual stream): no attention mask reaches them, and their state lives in the
        cache beside the keys/values."""
        cached = getattr(self, "_short_convolutions", None)
        if cached is None:
            cached = self._short_convolutions = any(isinstance(m, torch.nn.Conv1d)
                                                    for layer in self.decoder_layers for m in layer.modules())
        return cached

    @property
    def prefix_paths_exact(self) -> bool:
        """Whether VGRefine's prefix paths — the generic tail packed behind the question, the answer prefill resumed
        from the triage pass, the search's cached prefix — equal full forwards. False for hybrid decoders, sparse
        attention and short convolutions (see :attr:`hybrid`, :attr:`sparse_attention`, :attr:`short_convolutions`):
        those models run the plain path, with the same results as ``share_prefix=False``."""
        return not (self.hybrid or self.sparse_attention or self.short_convolutions)

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def num_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.text_config, "num_key_value_heads", None) or self.num_heads)

    @property
    def image_token_id(self) -> int:
        tid = getattr(self.config, "image_token_id", None)
        if tid is None:
            tid = getattr(self.config, "image_token_index", None)
        if tid is None:
            raise ValueError(f"{type(self.config).__name__} has no image_token_id; cannot locate image tokens")
        return int(tid)

    def position_ids(self, inputs: dict) -> torch.Tensor:
        """Position ids of ``inputs`` as the model's prefill uses them, ``[..., B, T]`` (leading axes for
        multi-axis RoPE). Default: ``generate``'s 1-D positions (count of real tokens − 1, pads → 0)."""
        mask = inputs.get("attention_mask")
        ids = inputs["input_ids"]
        if mask is None:
            return torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
        return (mask.long().cumsum(-1) - 1).clamp_min(0)

    def text_attn_target(self, name: str):
        """Argument for ``set_attn_implementation`` that switches only the text decoder to ``name``."""
        return {"text_config": name}

    def vision_encoder(self):
        """``(parent, attribute)`` of the vision encoder module the image tokens are computed from (its output is
        reused by a prefix replay), or ``None`` where there is none to find."""
        for path in ("model.vision_tower", "model.visual", "model.vision_model", "vision_tower", "visual"):
            *parents, name = path.split(".")
            parent = self.model
            for part in parents:
                parent = getattr(parent, part, None)
            if isinstance(getattr(parent, name, None), torch.nn.Module):
                return parent, name
        return None

    # ----------------------------------------------------------------- image tokens
    def image_runs(self, input_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
        """Per sample, the ``[start, end)`` runs of consecutive image-placeholder ids."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        is_img = (input_ids == self.image_token_id).to(torch.int8)
        out = []
        for row in is_img:
            d = torch.diff(torch.nn.functional.pad(row, (1, 1)))
            starts = (d == 1).nonzero().flatten().tolist()
            ends = (d == -1).nonzero().flatten().tolist()
            out.append(list(zip(starts, ends)))
        return out

    def image_spans(self, inputs: dict) -> list[list[ImageSpan]]:
        """Per sample (batch order), per image (sequence order): its :class:`ImageSpan`."""
        raise NotImplementedError

    def token_grid(self, processor, image_size: tuple[int, int], span: ImageSpan | None = None,
                   inputs: dict | None = None):
        """:class:`hf_vgrefine.geometry.TokenGrid` of an image of original ``image_size=(W, H)`` pixels."""
        raise NotImplementedError

    def image_placeholder(self, processor) -> str:
        """The string the chat template emits for an image (expanded by the processor)."""
        tok = getattr(processor, "image_token", None)
        if not tok:
            raise ValueError(f"{type(processor).__name__} has no image_token; pass generic_inputs explicitly")
        return tok

    def image_suffix_text(self, processor) -> str:
        """Text the processor inserts after the expanded image tokens (none for most families)."""
        return ""

    def prompt_end_text(self, processor) -> str:
        """Text the processor appends at the end of every prompt (none for most families)."""
        return ""

    # ----------------------------------------------------------------- re-batching
    _ID_DERIVED = {"mm_token_type_ids": torch.int32, "token_type_ids": torch.long}

    def id_derived(self, input_ids: torch.Tensor, like: dict, appended: int = 0) -> dict:
        """Inputs that are functions of ``input_ids`` (image-token type ids), for the keys present in ``like``.
        ``appended``: how many of the last tokens are answer tokens appended after the prompt (PaliGemma marks
        them as its causal suffix)."""
        out = {}
        for key, dtype in self._ID_DERIVED.items():
            if key in like:
                out[key] = (input_ids == self.image_token_id).to(like[key].dtype if torch.is_tensor(like[key]) else dtype)
        return out

    def image_content(self, inputs: dict, b: int) -> dict:
        """The image inputs that define sample ``b``'s image, without batch padding (cache keys and
        same-image checks). Default: :meth:`select_images` of ``[b]``."""
        return self.select_images(inputs, [b])

    def spans_from_runs(self, inputs, make) -> list[list[ImageSpan]]:
        """Per sample, ``make(sample, index, start, end)`` for each image-token run ``[start, end)``; a clear error
        when the batch holds no image tokens."""
        runs = self.image_runs(inputs["input_ids"])
        self._require_images(runs)
        return [[make(b, i, s, e) for i, (s, e) in enumerate(sample)] for b, sample in enumerate(runs)]

    def square_grid_spans(self, inputs, side: int, later_block: str = "grid") -> list[list[ImageSpan]]:
        """Spans of a family whose every image block is ``side x side`` tokens in row-major order; the first
        block of a sample is ``"grid"``, later ones ``later_block`` (Gemma 3's pan-and-scan crops)."""
        def span(b, i, s, e):
            if e - s != side * side:
                several_images_check(b, e - s, side * side)
                raise ValueError(f"sample {b}: image run of {e - s} tokens, expected {side * side} "
                                 f"(grid {side}x{side})")
            return ImageSpan(s, e, side, side, torch.arange(s, e), image_index=i, block="grid" if i == 0 else later_block)
        return self.spans_from_runs(inputs, span)

    def per_image_rows(self, key: str, inputs: dict) -> list[int] | None:
        """Rows of input ``key`` per image when that tensor is not batch-major (images' patches flattened into
        one tensor), else ``None``. Families with such inputs override this."""
        return None

    # inputs that are model inputs by name but not image inputs of a sample
    _NOT_IMAGE_INPUTS = ("input_ids", "attention_mask", "labels")

    def select_images(self, inputs: dict, samples: list[int]) -> dict:
        """Image inputs (pixel values and their side tensors) of ``samples`` (one image per sample), in order:
        batch-major tensors are indexed by sample, flattened ones sliced with :meth:`per_image_rows`."""
        B = inputs["input_ids"].shape[0]
        out = {}
        for key, val in inputs.items():
            # labels: text targets some processors return (PaliGemma's prompt labels), not image inputs
            if key in self._NOT_IMAGE_INPUTS or key in self._ID_DERIVED or not torch.is_tensor(val):
                continue
            counts = self.per_image_rows(key, inputs)
            if counts is not None:
                if len(counts) != B:
                    raise ValueError(f"one image per sample is required ({key} holds {len(counts)} images for a "
                                     f"batch of {B})")
                starts = [0]
                for c in counts:
                    starts.append(starts[-1] + c)
                out[key] = torch.cat([val[starts[b]:starts[b + 1]] for b in samples])
            elif val.shape[0] == B:
                out[key] = val[samples]
            else:
                raise ValueError(f"cannot split input {key!r} of shape {tuple(val.shape)} per sample "
                                 f"(batch {B}); pass one image per sample")
        return out

    # forward arguments that are never the prompt's model inputs (generation state, targets, embeddings)
    _NOT_PROMPT_INPUTS = frozenset({"past_key_values", "cache", "mm_encoder_outputs", "inputs_embeds", "labels",
                                    "cache_position", "position_ids", "use_cache", "logits_to_keep",
                                    "output_attentions", "output_hidden_states", "return_dict", "kwargs"})

    @property
    def model_input_keys(self) -> frozenset:
        """Names of the prompt's model inputs (``input_ids``, ``attention_mask``, pixel values and their side
        tensors): the keyword arguments of the model's ``forward`` less generation state and targets."""
        keys = getattr(self, "_model_input_keys", None)
        if keys is None:
            import inspect

            params = inspect.signature(self.model.forward).parameters
            keys = self._model_input_keys = frozenset(params) - self._NOT_PROMPT_INPUTS
        return keys

    def side_input(self, inputs: dict, key: str, why: str) -> list:
        """``inputs[key]`` as a nested list (a small host copy), or a clear error naming ``why`` it is needed."""
        val = inputs.get(key)
        if val is None:
            raise ValueError(f"{self.family or type(self).__name__} inputs need {key} ({why})")
        return torch.as_tensor(val).tolist()

    def _require_images(self, runs):
        if not any(runs):
            raise ValueError(
                f"no image tokens (id {self.image_token_id}) in input_ids: build the inputs with the model's "
                "processor and an image (one image per prompt), e.g. processor(images=img, text=prompt)")


def several_images_check(sample: int, run_len: int, per_image: int) -> None:
    """Raise a clear error when an image-token run holds several images (adjacent images merge into one run)."""
    for extra in (0, 1):  # LLaVA's "full" feature strategy keeps one CLS token per image
        k, r = divmod(run_len, per_image + extra)
        if k >= 2 and r == 0:
            raise ValueError(f"sample {sample}: the prompt holds {k} images ({run_len} image tokens = {k} x "
                             f"{per_image + extra}); attention capture, grounding and VGRefine take exactly one image "
                             "per prompt: give each sample one image (one {'type': 'image'} entry, one image in images=)")
