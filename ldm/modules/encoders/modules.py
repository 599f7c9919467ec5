"""Text encoders that turn prompts into the UNet's cross-attention context.

``FrozenOpenCLIPEmbedder`` is Stable Diffusion 2's conditioner: the text tower of an open_clip CLIP model, kept
as ``self.model`` (the CLIP module with ``visual`` removed), so its state dict is SD 2's
``cond_stage_model.model.*`` layout when the embedder is registered as ``cond_stage_model``.
"""

from __future__ import annotations

import logging
import os
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
        if weights_path is not None:
            from ldm.checkpoint import load_into, load_state_dict

            load_into(model, _text_state_dict(load_state_dict(weights_path)), what=f"open_clip text tower ({weights_path})")

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
        if freeze:
            self.freeze()

    @staticmethod
    def _load_pretrained(arch: str, version: Optional[str], device: torch.device) -> nn.Module:
        """SD 2's path: ``open_clip.create_model_and_transforms(arch, pretrained=version)``, visual deleted."""
        if not version:
            raise ValueError("FrozenOpenCLIPEmbedder: give version (pretrained tag), weights_path or model_config")
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

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """[B, max_length] token ids (start, BPE tokens, end, zero padding); long prompts truncated, logged once."""
        tokenizer = get_tokenizer()
        lengths = [len(tokenizer.encode(text)) + 2 for text in texts]  # + start/end tokens
        dropped = [n - self.max_length for n in lengths if n > self.max_length]
        if dropped:
            logger.warning(
                "%d of %d prompt(s) longer than %d tokens were truncated: %d token(s) dropped (%s per prompt)",
                len(dropped), len(texts), self.max_length, sum(dropped), ", ".join(map(str, dropped)),
            )
        return tokenizer(list(texts), context_length=self.max_length)

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
            raise ValueError("FrozenOpenCLIPEmbedder.encode: empty list of prompts")
        if not all(isinstance(t, str) for t in texts):
            raise ValueError(f"FrozenOpenCLIPEmbedder.encode expects strings, got {[type(t).__name__ for t in texts]}")
        tokens = self.tokenize(texts).to(self.model.token_embedding.weight.device)
        return self.encode_with_transformer(tokens)

    def forward(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        return self.encode(texts)
