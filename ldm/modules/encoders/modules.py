"""Text encoders that turn prompts into the UNet's cross-attention context.

``FrozenOpenCLIPEmbedder`` is Stable Diffusion 2's conditioner: the text tower of an open_clip CLIP model, kept
as ``self.model`` (the CLIP module with ``visual`` removed), so its state dict is SD 2's
``cond_stage_model.model.*`` layout when the embedder is registered as ``cond_stage_model``.

``FrozenCLIPEmbedder`` is Stable Diffusion 1's conditioner: OpenAI's CLIP ViT-L/14 text encoder, which SD 1 ran
through Hugging Face transformers. It computes with the same open_clip tower (``ViT-L-14-quickgelu``) and speaks
SD 1's ``cond_stage_model.transformer.text_model.*`` state-dict layout, so transformers is not needed.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

logger = logging.getLogger(__name__)

# A stub for CLIP's vision tower: open_clip always builds one, we delete it at once (only text is used).
_STUB_VISION_CFG = {"image_size": 8, "layers": 1, "width": 64, "head_width": 64, "patch_size": 8}
_CLIP_KWARGS = ("quick_gelu", "init_logit_scale", "init_logit_bias", "nonscalar_logit_scale")
_tokenizer = None


def _open_clip():
    import open_clip

    return open_clip


def get_tokenizer():
    """open_clip's BPE tokenizer (its vocabulary ships inside the package: no download). Built once."""
    global _tokenizer
    if _tokenizer is None:
        _tokenizer = _open_clip().SimpleTokenizer()
    return _tokenizer


class AbstractEncoder(nn.Module):
    """A conditioner: ``encode(inputs) -> context``."""

    def encode(self, *args, **kwargs):
        raise NotImplementedError


def build_text_clip(model_config: Mapping[str, Any]) -> nn.Module:
    """An open_clip ``CLIP`` with random weights built from ``model_config``, its vision tower deleted.

    ``model_config`` is open_clip's model config (``{"embed_dim": D, "text_cfg": {...}}``, as in
    ``open_clip.get_model_config(arch)``); ``vision_cfg`` is ignored. Nothing is downloaded.
    """
    if not isinstance(model_config, Mapping) or "text_cfg" not in model_config:
        raise ValueError(f"model_config must be a mapping with a 'text_cfg' entry, got {model_config!r}")
    config = dict(model_config)
    text_cfg = dict(config.pop("text_cfg"))
    config.pop("vision_cfg", None)
    if config.pop("custom_text", False) or text_cfg.get("hf_model_name"):
        raise ValueError("only open_clip's built-in text transformer is supported (no custom_text / hf_model_name)")
    embed_dim = config.pop("embed_dim", text_cfg.get("width", 512))
    unknown = sorted(set(config) - set(_CLIP_KWARGS))
    if unknown:
        raise ValueError(f"model_config: unsupported key(s) {unknown}; accepted: embed_dim, text_cfg, {list(_CLIP_KWARGS)}")
    open_clip = _open_clip()
    try:
        model = open_clip.CLIP(embed_dim, vision_cfg=dict(_STUB_VISION_CFG), text_cfg=text_cfg, **config)
    except TypeError as error:  # an unknown text_cfg field: name it instead of a dataclass trace
        raise ValueError(f"model_config.text_cfg is not a valid open_clip CLIPTextCfg: {error}") from error
    del model.visual
    return model


def _text_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """The CLIP text weights from an SD 2 checkpoint, an embedder state dict or a full open_clip checkpoint."""
    state_dict = dict(state_dict)
    for prefix in ("cond_stage_model.model.", "model.", "module."):
        if any(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            break
    return {k: v for k, v in state_dict.items() if not k.startswith("visual.")}


class FrozenOpenCLIPEmbedder(AbstractEncoder):
    """Per-token hidden states of an open_clip text transformer (SD 2's text conditioner).

    Args:
        arch: open_clip architecture name (``ViT-H-14`` for SD 2).
        version: open_clip ``pretrained`` tag (``laion2b_s32b_b79k``); used only when neither ``model_config``
            nor ``weights_path`` is given, and then it downloads the weights (needs internet or a warm cache).
        device: where the model lives (tokens follow the parameters' device at call time).
        max_length: tokens per prompt (<= the model's context length; 77 for CLIP).
        freeze: no gradients and always in eval mode.
        frozen_parts: when ``freeze`` is false, parts of the open_clip model kept without gradients, by attribute
            name (``["token_embedding"]``: a randomly initialised tower's 49408-row vocabulary table is most of its
            parameters, and the optimizer and EMA would pay for every row each step though a dataset's captions use
            a few dozen).
        layer: ``"last"`` (all blocks) or ``"penultimate"`` (all but the last block, as SD 2), then ``ln_final``.
        model_config: open_clip model config (``{"embed_dim": 32, "text_cfg": {...}}``) to build a randomly
            initialised text tower without any download (tests, training from scratch).
        weights_path: a local weights file (``.safetensors`` first, else ``torch.load(weights_only=True)``)
            holding the text weights: SD 2 ``cond_stage_model.model.*``, an embedder state dict, or a full
            open_clip checkpoint (``visual.*`` dropped). The architecture is ``model_config`` or ``arch``'s
            built-in open_clip config.

    ``encode(texts) -> [B, max_length, width]``. ``encode([""])`` is the unconditional (empty prompt) context.
    """

    LAYERS = ("last", "penultimate")

    def __init__(
        self,
        arch: str = "ViT-H-14",
        version: Optional[str] = "laion2b_s32b_b79k",
        device: Union[str, torch.device, None] = "cpu",
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "last",
        model_config: Optional[Mapping[str, Any]] = None,
        weights_path: Optional[Union[str, os.PathLike]] = None,
        frozen_parts: Sequence[str] = (),
    ):
        super().__init__()
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {list(self.LAYERS)}, got {layer!r}")
        device = torch.device(device if device is not None else "cpu")
        if model_config is not None:
            model = build_text_clip(model_config)
        elif weights_path is not None:
            config = _open_clip().get_model_config(arch)
            if config is None:
                raise ValueError(
                    f"unknown open_clip architecture {arch!r}; pass model_config=... or one of "
                    f"{_open_clip().list_models()}"
                )
            model = build_text_clip(config)
        else:
            model = self._load_pretrained(arch, version, device)
        model = self._prepare_model(model)

        context_length = model.positional_embedding.shape[0]
        if not 2 <= max_length <= context_length:
            raise ValueError(f"max_length must be in [2, {context_length}] (the model's context length), got {max_length}")
        tokenizer = get_tokenizer()
        if model.token_embedding.num_embeddings < tokenizer.vocab_size:
            raise ValueError(
                f"text_cfg.vocab_size {model.token_embedding.num_embeddings} is smaller than the tokenizer's "
                f"vocabulary ({tokenizer.vocab_size})"
            )
        self.model = model.to(device)
        self.arch = arch
        self.version = version
        self.device = device
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = self.LAYERS.index(layer)  # blocks skipped at the end
        self.freeze_model = freeze
        if weights_path is not None:
            self.load_weights(weights_path)
        if freeze:
            self.freeze()
        for name in frozen_parts:
            part = getattr(self.model, name, None)
            if not isinstance(part, (nn.Module, nn.Parameter)):
                parts = [*dict(self.model.named_children()), *dict(self.model.named_parameters(recurse=False))]
                raise ValueError(f"frozen_parts: the text tower has no part {name!r}; it has {sorted(parts)}")
            part.requires_grad_(False)

    def _prepare_model(self, model: nn.Module) -> nn.Module:
        """The freshly built open_clip text CLIP, before it is stored as ``self.model`` (subclasses adapt it)."""
        return model

    def load_weights(self, weights_path: Union[str, os.PathLike]) -> None:
        """Strictly load the text weights from a local file (the layouts ``weights_path`` accepts)."""
        from ldm.checkpoint import load_into, load_state_dict

        load_into(self.model, _text_state_dict(load_state_dict(weights_path)), what=f"open_clip text tower ({weights_path})")

    @staticmethod
    def _load_pretrained(arch: str, version: Optional[str], device: torch.device) -> nn.Module:
        """SD 2's path: ``open_clip.create_model_and_transforms(arch, pretrained=version)``, visual deleted."""
        if not version:
            raise ValueError("give version (open_clip pretrained tag), weights_path or model_config")
        try:
            model, _, _ = _open_clip().create_model_and_transforms(arch, device=torch.device("cpu"), pretrained=version)
        except Exception as error:
            raise RuntimeError(
                f"could not load open_clip weights {arch}/{version} ({error}). Without internet, pass "
                "weights_path=<local .safetensors> (or model_config=... for a randomly initialised text tower)."
            ) from error
        del model.visual
        return model.to(device)

    @property
    def width(self) -> int:
        """Feature size of the returned hidden states (the UNet's ``context_dim``)."""
        return self.model.ln_final.weight.shape[0]

    def freeze(self) -> None:
        """No gradients, eval mode (dropout off) for good."""
        self.freeze_model = True
        for param in self.parameters():
            param.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenOpenCLIPEmbedder":
        # A frozen encoder stays in eval mode whatever the surrounding module (e.g. Lightning) asks.
        return super().train(False if self.freeze_model else mode)

    # What fills the positions after <end_of_text>: open_clip's 0 (SD 2); SD 1's Hugging Face tokenizer repeats
    # <end_of_text> instead, and with causal attention those positions are part of the context the UNet sees.
    PAD_WITH_EOT = False

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """[B, max_length] token ids: start, BPE tokens, end, padding (0, or end tokens with ``PAD_WITH_EOT``).

        Prompts longer than ``max_length - 2`` BPE tokens keep their first ones and still end in the end token
        (open_clip's and Hugging Face's truncation agree); the truncation is logged once per call.
        """
        tokenizer = get_tokenizer()
        lengths = [len(tokenizer.encode(text)) + 2 for text in texts]  # + start/end tokens
        dropped = [n - self.max_length for n in lengths if n > self.max_length]
        if dropped:
            logger.warning(
                "%d of %d prompt(s) longer than %d tokens were truncated: %d token(s) dropped (%s per prompt)",
                len(dropped), len(texts), self.max_length, sum(dropped), ", ".join(map(str, dropped)),
            )
        tokens = tokenizer(list(texts), context_length=self.max_length)
        if self.PAD_WITH_EOT:
            # by length, not by looking for zeros: 0 is also the real token "!"
            kept = torch.tensor(lengths).clamp(max=self.max_length)
            padding = torch.arange(self.max_length)[None, :] >= kept[:, None]
            tokens = tokens.masked_fill(padding, tokenizer.eot_token_id)
        return tokens

    def encode_with_transformer(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] -> hidden states [B, L, width] after ``len(blocks) - layer_idx`` blocks and ``ln_final``."""
        model = self.model
        length = tokens.shape[1]
        x = model.token_embedding(tokens) + model.positional_embedding[:length].to(model.token_embedding.weight.dtype)
        attn_mask = model.attn_mask
        if attn_mask is not None:
            attn_mask = attn_mask[:length, :length]
        blocks = model.transformer.resblocks
        blocks = blocks[: len(blocks) - self.layer_idx]
        batch_first = getattr(model.transformer, "batch_first", False)  # open_clip < 2.23 is sequence-first
        if not batch_first:
            x = x.transpose(0, 1)
        for block in blocks:
            x = block(x, attn_mask=attn_mask)
        if not batch_first:
            x = x.transpose(0, 1)
        return model.ln_final(x)

    def encode(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        """Prompts -> context [B, max_length, width] on the model's device."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError(f"{type(self).__name__}.encode: empty list of prompts")
        if not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{type(self).__name__}.encode expects strings, got {[type(t).__name__ for t in texts]}")
        tokens = self.tokenize(texts).to(self.model.token_embedding.weight.device)
        return self.encode_with_transformer(tokens)

    def forward(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        return self.encode(texts)


# SD 1's text encoder layout: ``cond_stage_model.transformer`` was transformers' CLIPTextModel, whose weights sit
# under ``text_model.`` (transformers 4.x; transformers 5 drops that level in memory but still reads and writes it).
HF_TEXT_PREFIX = "transformer.text_model."
_HF_POSITION_IDS = "embeddings.position_ids"  # a buffer in older transformers, saved in many SD 1 files: ignored
# open_clip name -> Hugging Face name, outside the blocks
_HF_TOP_NAMES = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
# open_clip name -> Hugging Face name, inside block N (transformer.resblocks.N. -> encoder.layers.N.)
_HF_BLOCK_NAMES = {
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# nn.MultiheadAttention packs the q, k, v projections, in this order, as the rows of one in_proj matrix
_HF_PACKED = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}
_QKV = ("q", "k", "v")
# In open_clip's CLIP but not in transformers' CLIPTextModel (the projection lives in CLIPModel): dropped
_NOT_IN_HF_TEXT = ("text_projection", "logit_scale", "logit_bias")


def hf_text_names(open_clip_name: str) -> tuple:
    """Hugging Face ``CLIPTextModel`` names (without ``text_model.``) of one open_clip text-tower tensor.

    One name, or three (q, k, v) for a packed attention ``in_proj``. ``KeyError`` when there is no counterpart.
    """
    if open_clip_name in _HF_TOP_NAMES:
        return (_HF_TOP_NAMES[open_clip_name],)
    match = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", open_clip_name)
    if match is None:
        raise KeyError(open_clip_name)
    layer, rest = f"encoder.layers.{match.group(1)}.", match.group(2)
    if rest in _HF_PACKED:
        return tuple(f"{layer}self_attn.{name}_proj.{_HF_PACKED[rest]}" for name in _QKV)
    module, _, tensor = rest.rpartition(".")
    if module not in _HF_BLOCK_NAMES or tensor not in ("weight", "bias"):
        raise KeyError(open_clip_name)
    return (f"{layer}{_HF_BLOCK_NAMES[module]}.{tensor}",)


def hf_text_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """The CLIP text weights of an SD 1 checkpoint or a Hugging Face CLIP file, keyed as
    ``FrozenCLIPEmbedder.state_dict()`` (``transformer.text_model.*``).

    Accepts ``cond_stage_model.transformer.text_model.*`` (SD 1), ``transformer.text_model.*`` (an embedder),
    ``text_model.*`` (a ``CLIPTextModel`` or ``CLIPModel`` file; ``vision_model.*`` and the projections are
    dropped) and transformers 5's in-memory ``CLIPTextModel`` keys (``embeddings.*``, ``encoder.*``,
    ``final_layer_norm.*``). ``embeddings.position_ids`` is dropped: positions are always ``0 .. L-1``.
    """
    state_dict = dict(state_dict)
    for prefix in ("cond_stage_model.transformer.text_model.", "transformer.text_model.", "text_model.", ""):
        text = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if prefix == "":  # bare keys: only the CLIPTextModel's own top-level modules
            text = {k: v for k, v in text.items() if k.split(".", 1)[0] in ("embeddings", "encoder", "final_layer_norm")}
        if text:
            break
    return {HF_TEXT_PREFIX + k: v for k, v in text.items() if k != _HF_POSITION_IDS}


class FrozenCLIPEmbedder(FrozenOpenCLIPEmbedder):
    """SD 1's text conditioner: OpenAI CLIP ViT-L/14's per-token hidden states, computed with open_clip.

    SD 1 ran ``transformers.CLIPTextModel`` (``openai/clip-vit-large-patch14``) and used
    ``last_hidden_state``: token + position embedding, the causal transformer over all ``max_length`` positions,
    ``final_layer_norm``. That network is open_clip's ``ViT-L-14-quickgelu`` text tower (quick GELU,
    ``x * sigmoid(1.702 x)``), which this class runs, so transformers is not needed.

    Two things make it SD 1's rather than SD 2's embedder:

    * **Tokens**: SD 1's tokenizer (Hugging Face ``CLIPTokenizer``, ``padding="max_length"``) pads with the end
      token 49407, not 0; the ids are ``<start>``, at most ``max_length - 2`` BPE tokens, ``<end>``, then ``<end>``
      repeated; a longer prompt keeps its first ``max_length - 2`` BPE tokens. The vocabulary is the same
      (OpenAI's BPE). Text cleaning is open_clip's: ``ftfy.fix_text``, HTML unescaping, whitespace, lower case,
      as in OpenAI's tokenizer and transformers 4's ftfy-based ``CLIPTokenizer`` that SD 1 ran. transformers 5's
      ``CLIPTokenizer`` skips ftfy, so where ftfy changes a prompt (curly quotes, ligatures, ``&amp;``,
      mojibake) its ids differ from these; on anything ftfy leaves alone they are equal.
    * **State dict**: keys are SD 1's, ``transformer.text_model.*`` (``cond_stage_model.transformer.text_model.*``
      inside the diffusion model), exactly transformers' ``CLIPTextModel`` names, both ways: ``state_dict()``
      writes them and ``load_state_dict()`` reads them (``embeddings.position_ids`` is accepted and ignored,
      never required). The open_clip tower stays at ``self.model``; the names are translated by state-dict hooks:

      ``self.model.*`` (open_clip) -> ``transformer.text_model.*`` (SD 1 / Hugging Face):

      - ``token_embedding.weight`` -> ``embeddings.token_embedding.weight``
      - ``positional_embedding`` -> ``embeddings.position_embedding.weight``
      - ``transformer.resblocks.N.`` -> ``encoder.layers.N.``, and inside a block: ``ln_1`` -> ``layer_norm1``,
        ``attn.in_proj_{weight,bias}`` (rows q, k, v) -> ``self_attn.{q,k,v}_proj.{weight,bias}``,
        ``attn.out_proj`` -> ``self_attn.out_proj``, ``ln_2`` -> ``layer_norm2``, ``mlp.c_fc`` -> ``mlp.fc1``,
        ``mlp.c_proj`` -> ``mlp.fc2``
      - ``ln_final`` -> ``final_layer_norm``

      open_clip's ``text_projection`` and ``logit_scale`` are deleted (SD 1 files have no projection). The q/k/v
      tensors in ``state_dict()`` are copies (slices of ``in_proj`` would share memory, which safetensors refuses).

    Args:
        arch: open_clip architecture whose config builds the tower when ``model_config`` is not given.
        version: an open_clip ``pretrained`` tag (``"openai"`` is SD 1's CLIP), used only when neither
            ``model_config`` nor ``weights_path`` is given; it downloads. Default ``None``: nothing is ever
            downloaded (a Hugging Face name such as ``openai/clip-vit-large-patch14`` is not a tag).
        device, max_length, freeze, frozen_parts: as :class:`FrozenOpenCLIPEmbedder`.
        layer: ``"last"`` (SD 1: ``last_hidden_state``) or ``"penultimate"``: the hidden state after all but the
            last block, then ``final_layer_norm``; this is "CLIP skip 2" in A1111 and ``clip_skip=1`` in diffusers
            (``hidden_states[-2]`` then ``final_layer_norm``). (SD 2's repo's ``layer="hidden"`` skips the norm:
            not offered.)
        model_config: open_clip model config for a randomly initialised tower (tests); ``"quick_gelu"`` defaults
            to ``True`` here (OpenAI CLIP's activation, transformers' ``hidden_act="quick_gelu"``). The tower must have transformers' structure
            (no layer scale, no extra norms): anything without a Hugging Face name is a ``ValueError``.
        weights_path: a local file with the text weights in any layout :func:`hf_text_state_dict` accepts (an
            SD 1 checkpoint, a ``CLIPTextModel`` / ``CLIPModel`` file), loaded strictly: a wrong file is a
            ``ValueError`` naming the first missing / unexpected keys.

    ``encode(texts) -> [B, max_length, width]`` (width 768 for ViT-L/14).
    """

    PAD_WITH_EOT = True

    def __init__(
        self,
        arch: str = "ViT-L-14-quickgelu",
        version: Optional[str] = None,
        device: Union[str, torch.device, None] = "cpu",
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "last",
        model_config: Optional[Mapping[str, Any]] = None,
        weights_path: Optional[Union[str, os.PathLike]] = None,
        frozen_parts: Sequence[str] = (),
    ):
        if isinstance(model_config, Mapping) and "quick_gelu" not in model_config:
            model_config = {**model_config, "quick_gelu": True}  # OpenAI CLIP's activation unless told otherwise
        super().__init__(arch=arch, version=version, device=device, max_length=max_length, freeze=freeze,
                         layer=layer, model_config=model_config, weights_path=weights_path, frozen_parts=frozen_parts)

    def _prepare_model(self, model: nn.Module) -> nn.Module:
        for name in _NOT_IN_HF_TEXT:
            if getattr(model, name, None) is not None:
                delattr(model, name)
        unmapped, names = [], {}
        for key in model.state_dict():
            try:
                names[key] = hf_text_names(key)
            except KeyError:
                unmapped.append(key)
        if unmapped:
            raise ValueError(
                f"{type(self).__name__}: this open_clip text tower has tensors without a Hugging Face CLIPTextModel "
                f"counterpart {unmapped[:8]} (layer scale, extra norms or a custom block in text_cfg?)"
            )
        self._hf_names = names  # open_clip key -> its Hugging Face name(s); fixed with the architecture
        # Here rather than after super().__init__(): weights_path is loaded inside it, through these hooks. On
        # this module, not on self.model, so the names come out right wherever the embedder is registered.
        self._register_state_dict_hook(_to_hf_layout)
        self._register_load_state_dict_pre_hook(_from_hf_layout, with_module=True)
        return model

    def load_weights(self, weights_path: Union[str, os.PathLike]) -> None:
        """Strictly load the text weights from a local file (layouts: :func:`hf_text_state_dict`)."""
        from ldm.checkpoint import load_into, load_state_dict

        what = f"CLIP text encoder, SD 1 / Hugging Face layout ({weights_path})"
        load_into(self, hf_text_state_dict(load_state_dict(weights_path)), what=what)


def _to_hf_layout(module: FrozenCLIPEmbedder, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict hook: ``<prefix>model.*`` (open_clip) -> ``<prefix>transformer.text_model.*``, in place."""
    ours = prefix + "model."
    for key in [k for k in state_dict if k.startswith(ours)]:
        names = module._hf_names.get(key[len(ours):])
        if names is None:  # cannot happen after _prepare_model; leave anything unknown visible
            continue
        value = state_dict.pop(key)
        parts = value.chunk(len(names), dim=0) if len(names) > 1 else (value,)
        for name, part in zip(names, parts):
            state_dict[prefix + HF_TEXT_PREFIX + name] = part.clone() if len(names) > 1 else part


def _from_hf_layout(module: FrozenCLIPEmbedder, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: ``<prefix>transformer.text_model.*`` -> ``<prefix>model.*``, in place.

    A tensor whose Hugging Face names are not all present is left alone, so strict loading reports it.
    """
    theirs = prefix + HF_TEXT_PREFIX
    state_dict.pop(theirs + _HF_POSITION_IDS, None)
    for key, names in module._hf_names.items():
        sources = [theirs + name for name in names]
        if all(source in state_dict for source in sources):
            parts = [state_dict.pop(source) for source in sources]
            state_dict[prefix + "model." + key] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
