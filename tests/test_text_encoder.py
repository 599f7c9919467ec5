"""FrozenOpenCLIPEmbedder on a tiny randomly initialised open_clip text tower (no downloads)."""

import logging
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from ldm.checkpoint import save_safetensors
from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder

TINY_CONFIG = {"embed_dim": 32, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def embedders():
    torch.manual_seed(0)
    last = FrozenOpenCLIPEmbedder(model_config=TINY_CONFIG, layer="last")
    penultimate = FrozenOpenCLIPEmbedder(model_config=TINY_CONFIG, layer="penultimate")
    penultimate.model.load_state_dict(last.model.state_dict())
    return last, penultimate


def manual_hidden_states(model, tokens, n_blocks):
    """Token + position embedding, the first ``n_blocks`` open_clip residual blocks (causal mask), ln_final."""
    x = model.token_embedding(tokens) + model.positional_embedding
    for block in list(model.transformer.resblocks)[:n_blocks]:
        x = block(x, attn_mask=model.attn_mask)
    return model.ln_final(x)


def test_output_shape_and_batch(embedders):
    last, _ = embedders
    for prompts in (["a photo of a cat"], ["a", "b c", "a painting of a dog in the snow"]):
        z = last.encode(prompts)
        assert z.shape == (len(prompts), 77, 64) and z.dtype == torch.float32
        assert torch.isfinite(z).all()
    torch.testing.assert_close(last(["a dog"]), last.encode(["a dog"]))
    assert last.width == 64
    # per-prompt results do not depend on the rest of the batch
    torch.testing.assert_close(last.encode(["x", "a dog"])[1], last.encode(["a dog"])[0], atol=1e-5, rtol=1e-5)


def test_last_and_penultimate_match_open_clip_modules(embedders):
    last, penultimate = embedders
    prompts = ["a photograph of an astronaut riding a horse", ""]
    tokens = last.tokenize(prompts)
    with torch.no_grad():
        z_last, z_pen = last.encode(prompts), penultimate.encode(prompts)
        model = last.model
        # "last" is open_clip's own transformer forward (all blocks) then ln_final
        x = model.token_embedding(tokens) + model.positional_embedding
        reference_last = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        reference_pen = manual_hidden_states(model, tokens, n_blocks=1)
    torch.testing.assert_close(z_last, reference_last, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z_last, manual_hidden_states(model, tokens, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z_pen, reference_pen, atol=1e-5, rtol=1e-5)
    assert (z_last - z_pen).abs().max() > 1e-2


def test_causal_mask_is_applied(embedders):
    last, _ = embedders
    # token i only sees tokens <= i: a different ending leaves the shared prefix's states unchanged
    a, b = last.encode(["a red cube on a table", "a red cube in space"])
    torch.testing.assert_close(a[:4], b[:4], atol=1e-5, rtol=1e-5)  # <sot> a red cube
    assert (a[4] - b[4]).abs().max() > 1e-3


def test_frozen_and_stays_in_eval(embedders):
    last, _ = embedders
    assert all(not p.requires_grad for p in last.parameters())
    assert not last.training and not last.model.training
    wrapper = nn.Module()
    wrapper.cond_stage_model = last
    wrapper.train()
    assert not last.training and not any(m.training for m in last.modules())
    z = last.encode(["a cat"])
    assert not z.requires_grad and z.grad_fn is None
    unfrozen = FrozenOpenCLIPEmbedder(model_config=TINY_CONFIG, freeze=False)
    unfrozen.train()
    assert unfrozen.training and all(p.requires_grad for p in unfrozen.parameters())
    assert unfrozen.encode(["a cat"]).requires_grad


def test_frozen_parts_of_a_trained_tower_get_no_gradient():
    """``frozen_parts: [token_embedding]``: the vocabulary table stays as built while the transformer trains."""
    tower = FrozenOpenCLIPEmbedder(model_config=TINY_CONFIG, freeze=False, frozen_parts=["token_embedding"])
    trainable = {name for name, p in tower.named_parameters() if p.requires_grad}
    assert "model.token_embedding.weight" not in trainable
    assert "model.positional_embedding" in trainable and any(".transformer." in name for name in trainable)
    tower.encode(["a red circle"]).square().sum().backward()
    assert tower.model.token_embedding.weight.grad is None
    assert tower.model.transformer.resblocks[0].attn.in_proj_weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"no part 'token_embeddings'.*'token_embedding'"):
        FrozenOpenCLIPEmbedder(model_config=TINY_CONFIG, freeze=False, frozen_parts=["token_embeddings"])


def test_tokens_and_empty_prompt(embedders):
    last, _ = embedders
    import open_clip

    tokens = last.tokenize(["", "a cat"])
    assert torch.equal(tokens, open_clip.tokenize(["", "a cat"]))
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    assert tokens[0, :2].tolist() == [SOT, EOT] and tokens[0, 2:].abs().sum() == 0
    assert tokens[1, 0] == SOT and tokens[1, 3] == EOT and tokens[1, 4:].abs().sum() == 0
    z = last.encode([""])
    assert z.shape == (1, 77, 64) and torch.isfinite(z).all()
    torch.testing.assert_close(last.encode(""), z)
    with pytest.raises(ValueError, match="empty list"):
        last.encode([])


def test_long_prompt_truncated_with_one_warning(embedders, caplog):
    last, _ = embedders
    long = " ".join(["cat"] * 100)  # 100 BPE tokens + <sot> + <eot> = 102 > 77: 25 dropped
    with caplog.at_level(logging.WARNING, logger="ldm.modules.encoders.modules"):
        z = last.encode([long, "a dog", long])
    records = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "2 of 3 prompt(s)" in message and "50 token(s) dropped" in message and "25, 25" in message
    tokens = last.tokenize([long])
    assert tokens[0, 0] == SOT and tokens[0, -1] == EOT and (tokens[0] != 0).all()
    assert z.shape == (3, 77, 64)
    # the kept part is what the first 75 words give
    truncated = " ".join(["cat"] * 75)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm.modules.encoders.modules"):
        torch.testing.assert_close(last.encode([truncated])[0], z[0], atol=1e-5, rtol=1e-5)
    assert not [r for r in caplog.records if "truncated" in r.getMessage()]


def test_shorter_max_length(embedders):
    last, _ = embedders
    short = FrozenOpenCLIPEmbedder(model_config=TINY_CONFIG, max_length=16)
    short.model.load_state_dict(last.model.state_dict())
    z = short.encode(["a cat"])
    assert z.shape == (1, 16, 64)
    # causal attention: the first 16 positions are the same as with the full context
    torch.testing.assert_close(z[0], last.encode(["a cat"])[0, :16], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="max_length"):
        FrozenOpenCLIPEmbedder(model_config=TINY_CONFIG, max_length=78)


def test_bad_arguments():
    with pytest.raises(ValueError, match="layer"):
        FrozenOpenCLIPEmbedder(model_config=TINY_CONFIG, layer="pooled")
    with pytest.raises(ValueError, match="text_cfg"):
        FrozenOpenCLIPEmbedder(model_config={"embed_dim": 32})
    with pytest.raises(ValueError, match="unsupported key"):
        FrozenOpenCLIPEmbedder(model_config={**TINY_CONFIG, "depth": 3})
    with pytest.raises(ValueError, match="CLIPTextCfg"):
        FrozenOpenCLIPEmbedder(model_config={"text_cfg": {**TINY_CONFIG["text_cfg"], "n_layers": 2}})
    with pytest.raises(ValueError, match="vocab"):
        FrozenOpenCLIPEmbedder(model_config={"text_cfg": {**TINY_CONFIG["text_cfg"], "vocab_size": 1000}})


def test_state_dict_is_sd2_cond_stage_layout(embedders):
    last, _ = embedders
    wrapper = nn.Module()
    wrapper.cond_stage_model = last
    keys = set(wrapper.state_dict())
    for key in (
        "cond_stage_model.model.token_embedding.weight",
        "cond_stage_model.model.positional_embedding",
        "cond_stage_model.model.ln_final.weight",
        "cond_stage_model.model.ln_final.bias",
        "cond_stage_model.model.text_projection",
        "cond_stage_model.model.logit_scale",
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
        "cond_stage_model.model.transformer.resblocks.1.mlp.c_proj.weight",
    ):
        assert key in keys, key
    assert all(k.startswith("cond_stage_model.model.") for k in keys)
    assert not any(".visual." in k for k in keys)
    assert not hasattr(last.model, "visual")
    # 2 blocks x 12 tensors + token emb, pos emb, ln_final x2, text_projection, logit_scale
    assert len(keys) == 2 * 12 + 6


@pytest.mark.parametrize("prefix", ["model.", "cond_stage_model.model.", ""])
def test_weights_file_round_trip(embedders, tmp_path, prefix):
    last, _ = embedders
    state = {prefix + k: v for k, v in last.model.state_dict().items()}
    if prefix == "cond_stage_model.model.":  # a whole-pipeline checkpoint: the UNet keys are ignored
        state["model.diffusion_model.out.2.bias"] = torch.zeros(4)
    path = tmp_path / "text.safetensors"
    save_safetensors(path, state)
    loaded = FrozenOpenCLIPEmbedder(model_config=TINY_CONFIG, weights_path=path)
    prompts = ["a cat", ""]
    torch.testing.assert_close(loaded.encode(prompts), last.encode(prompts), atol=0, rtol=0)
    # a torch.save file works too (weights_only load)
    pt_path = tmp_path / "text.pt"
    torch.save({"state_dict": {"cond_stage_model.model." + k: v for k, v in last.model.state_dict().items()}}, pt_path)
    loaded = FrozenOpenCLIPEmbedder(model_config=TINY_CONFIG, weights_path=pt_path)
    torch.testing.assert_close(loaded.encode(prompts), last.encode(prompts), atol=0, rtol=0)


def test_weights_file_that_does_not_fit(tmp_path, embedders):
    last, _ = embedders
    path = tmp_path / "bad.safetensors"
    state = dict(last.model.state_dict())
    del state["ln_final.bias"]
    save_safetensors(path, state)
    with pytest.raises(ValueError, match="missing"):
        FrozenOpenCLIPEmbedder(model_config=TINY_CONFIG, weights_path=path)
    with pytest.raises(FileNotFoundError):
        FrozenOpenCLIPEmbedder(model_config=TINY_CONFIG, weights_path=tmp_path / "absent.safetensors")


def test_tokenizer_vocabulary_ships_with_open_clip():
    import open_clip
    from open_clip.tokenizer import default_bpe

    assert os.path.isfile(default_bpe())
    assert os.path.dirname(os.path.abspath(default_bpe())) == os.path.dirname(os.path.abspath(open_clip.__file__))


def test_pretrained_path_offline_fails_fast_with_a_clear_error(tmp_path):
    # Fresh interpreter with an empty Hugging Face cache and offline mode: SD 2's real loading path
    # (create_model_and_transforms with the laion2b tag) must fail before building the model.
    code = (
        "from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder\n"
        "try:\n"
        "    FrozenOpenCLIPEmbedder(arch='ViT-H-14', version='laion2b_s32b_b79k')\n"
        "except RuntimeError as error:\n"
        "    print('RuntimeError:', error)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
               XDG_CACHE_HOME=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "RuntimeError: could not load open_clip weights ViT-H-14/laion2b_s32b_b79k" in result.stdout
    assert "weights_path" in result.stdout
