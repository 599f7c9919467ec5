"""FrozenCLIPEmbedder (SD 1's conditioner) against transformers' CLIPTextModel and CLIPTokenizer, offline.

The references are built here without any download: a tiny random ``CLIPTextModel`` (quick GELU, like OpenAI's
ViT-L/14) and a ``CLIPTokenizer`` whose vocab.json / merges.txt are written from the BPE file that open_clip
ships (the same OpenAI vocabulary Hugging Face's files hold; :func:`ldm.interop.diffusers.write_clip_tokenizer_files`).
"""

import copy
import json

import pytest
import torch
from torch import nn

from ldm.checkpoint import save_safetensors
from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder, hf_text_state_dict

transformers = pytest.importorskip("transformers")

WIDTH, LAYERS, HEADS = 32, 2, 4
# quick_gelu is left out on purpose: FrozenCLIPEmbedder defaults it to True (OpenAI CLIP)
TINY_CONFIG = {"embed_dim": 16, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": WIDTH, "heads": HEADS,
                                             "layers": LAYERS}}
SOT, EOT = 49406, 49407
PROMPTS = ["a photograph of an astronaut riding a horse", "", "it's 4k, don't stop!! (masterpiece)"]
SD1_PREFIX = "cond_stage_model.transformer."


def hf_config(**overrides):
    config = dict(vocab_size=49408, hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, max_position_embeddings=77, hidden_act="quick_gelu")
    return transformers.CLIPTextConfig(**{**config, **overrides})


def sd1_keys(hf_model):
    """``CLIPTextModel`` keys as an SD 1 file has them: ``text_model.*`` (transformers 5 drops that level in
    memory, transformers 4 has it), without the ``position_ids`` buffer."""
    keys = (k if k.startswith("text_model.") else "text_model." + k for k in hf_model.state_dict())
    return {k for k in keys if not k.endswith("position_ids")}


def sd1_state_dict(hf_model, prefix=SD1_PREFIX, position_ids=True):
    """The HF model's weights as in an SD 1 checkpoint (``<prefix>text_model.*``), ``position_ids`` optional."""
    state = {}
    for key, value in hf_model.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        state[prefix + key] = value.clone()
    state[prefix + "text_model.embeddings.position_ids"] = torch.arange(77)[None]  # persistent in old versions
    if not position_ids:
        state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    return state


def into_hf_model(state_dict, hf_model):
    """Strictly load our ``transformer.text_model.*`` keys into a ``CLIPTextModel`` of either transformers major."""
    nested = hasattr(hf_model, "text_model")
    renamed = {("text_model." if nested else "") + k[len("transformer.text_model."):]: v for k, v in state_dict.items()}
    missing, unexpected = hf_model.load_state_dict(renamed, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)


def final_layer_norm(hf_model):
    return getattr(hf_model, "text_model", hf_model).final_layer_norm


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(hf_config()).eval()
    with torch.no_grad():  # LayerNorms start at (1, 0): randomise them so a swapped norm cannot go unnoticed
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """transformers' CLIPTokenizer on vocab.json + merges.txt written from open_clip's bundled BPE file
    (:func:`ldm.interop.diffusers.write_clip_tokenizer_files`, the way OpenAI's tokenizer builds its vocabulary)."""
    from ldm.interop.diffusers import write_clip_tokenizer_files

    folder = tmp_path_factory.mktemp("clip-tokenizer")
    write_clip_tokenizer_files(folder)
    assert len(json.loads((folder / "vocab.json").read_text(encoding="utf-8"))) == 49408
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder))
    assert tokenizer.pad_token_id == EOT  # as openai/clip-vit-large-patch14's tokenizer
    return tokenizer


def hf_ids(tokenizer, prompts, max_length=77):
    """SD 1's FrozenCLIPEmbedder.forward tokenization."""
    return tokenizer(list(prompts), truncation=True, max_length=max_length, padding="max_length",
                     return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def embedder(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("sd1") / "text.safetensors"
    save_safetensors(path, sd1_state_dict(hf_model))
    return FrozenCLIPEmbedder(model_config=TINY_CONFIG, weights_path=path)


def test_state_dict_keys_are_sd1_layout(embedder, hf_model):
    keys = set(embedder.state_dict())
    assert keys == {"transformer." + k for k in sd1_keys(hf_model)}
    assert len(keys) == LAYERS * 16 + 4  # per layer q/k/v/out (w, b), 2 norms, fc1, fc2; 2 embeddings, final norm
    wrapper = nn.Module()
    wrapper.cond_stage_model = embedder
    assert set(wrapper.state_dict()) == {SD1_PREFIX + k for k in sd1_keys(hf_model)}
    # the same shapes as the HF tensors, and no open_clip-only tensors left
    reference = sd1_state_dict(hf_model, prefix="transformer.", position_ids=False)
    assert {k: tuple(v.shape) for k, v in embedder.state_dict().items()} == {k: tuple(v.shape) for k, v in reference.items()}
    assert not hasattr(embedder.model, "text_projection") and not hasattr(embedder.model, "logit_scale")
    # the q/k/v slices are copies, so safetensors (which refuses shared memory) can write them
    q, k = (embedder.state_dict()[f"transformer.text_model.encoder.layers.0.self_attn.{n}_proj.weight"] for n in "qk")
    assert q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_encode_matches_transformers_last_hidden_state(embedder, hf_model, hf_tokenizer, attn):
    reference_model = transformers.CLIPTextModel._from_config(hf_config(), attn_implementation=attn).eval()
    reference_model.load_state_dict(hf_model.state_dict())
    with torch.no_grad():
        expected = reference_model(hf_ids(hf_tokenizer, PROMPTS)).last_hidden_state
        z = embedder.encode(PROMPTS)
    assert z.shape == (3, 77, WIDTH) and z.dtype == torch.float32
    torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-5)
    # the padding is part of the context: every one of the 77 positions matches, not only the prompt's
    assert (z[1, 2:] - z[1, 1]).abs().max() > 1e-3  # positions differ although all pad tokens are <end>


def test_penultimate_is_diffusers_clip_skip_1(hf_model, hf_tokenizer, embedder, tmp_path):
    path = tmp_path / "text.safetensors"
    save_safetensors(path, sd1_state_dict(hf_model))
    penultimate = FrozenCLIPEmbedder(model_config=TINY_CONFIG, weights_path=path, layer="penultimate")
    with torch.no_grad():
        # diffusers' encode_prompt with clip_skip=1: hidden_states[-(clip_skip + 1)], then final_layer_norm
        hidden = hf_model(hf_ids(hf_tokenizer, PROMPTS), output_hidden_states=True).hidden_states
        expected = final_layer_norm(hf_model)(hidden[-2])
        z = penultimate.encode(PROMPTS)
    torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-5)
    assert (z - embedder.encode(PROMPTS)).abs().max() > 1e-2


@pytest.mark.parametrize("prefix", [SD1_PREFIX, "transformer.", ""])
@pytest.mark.parametrize("position_ids", [True, False])
def test_weights_file_layouts(hf_model, embedder, tmp_path, prefix, position_ids):
    state = sd1_state_dict(hf_model, prefix=prefix, position_ids=position_ids)
    if prefix == SD1_PREFIX:  # a whole SD 1 checkpoint: UNet / autoencoder keys are ignored
        state["model.diffusion_model.out.2.bias"] = torch.zeros(4)
        state["first_stage_model.decoder.conv_out.bias"] = torch.zeros(3)
    if prefix == "":  # a CLIPModel file: vision tower and projections are ignored
        state["vision_model.post_layernorm.bias"] = torch.zeros(8)
        state["text_projection.weight"] = torch.zeros(16, WIDTH)
        state["logit_scale"] = torch.tensor(2.6)
    path = tmp_path / "text.safetensors"
    save_safetensors(path, state)
    loaded = FrozenCLIPEmbedder(model_config=TINY_CONFIG, weights_path=path)
    torch.testing.assert_close(loaded.encode(PROMPTS), embedder.encode(PROMPTS), atol=0, rtol=0)
    # a torch.save checkpoint (Lightning's "state_dict" level) loads the same
    pt_path = tmp_path / "text.ckpt"
    torch.save({"state_dict": state}, pt_path)
    loaded = FrozenCLIPEmbedder(model_config=TINY_CONFIG, weights_path=pt_path)
    torch.testing.assert_close(loaded.encode(PROMPTS), embedder.encode(PROMPTS), atol=0, rtol=0)


def test_transformers5_in_memory_keys():
    # transformers 5 keeps CLIPTextModel's tensors without the text_model. level
    state = {"embeddings.token_embedding.weight": torch.zeros(1), "embeddings.position_ids": torch.zeros(1),
             "final_layer_norm.bias": torch.zeros(1), "vision_model.x": torch.zeros(1)}
    assert set(hf_text_state_dict(state)) == {"transformer.text_model.embeddings.token_embedding.weight",
                                              "transformer.text_model.final_layer_norm.bias"}


@pytest.mark.parametrize("position_ids", [True, False])
def test_load_state_dict_inside_a_diffusion_model(hf_model, embedder, position_ids):
    fresh = FrozenCLIPEmbedder(model_config=TINY_CONFIG)
    wrapper = nn.Module()
    wrapper.cond_stage_model = fresh
    wrapper.other = nn.Linear(2, 2)
    state = sd1_state_dict(hf_model, position_ids=position_ids)
    state.update({"other." + k: v for k, v in wrapper.other.state_dict().items()})
    result = wrapper.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(fresh.encode(PROMPTS), embedder.encode(PROMPTS), atol=0, rtol=0)
    # strict loading still notices a missing tensor
    del state[SD1_PREFIX + "text_model.final_layer_norm.bias"]
    with pytest.raises(RuntimeError, match="Missing key"):
        wrapper.load_state_dict(state, strict=True)


def test_sd1_file_round_trips(embedder, hf_model, hf_tokenizer, tmp_path):
    # our state dict -> safetensors -> a new embedder: same outputs
    wrapper = nn.Module()
    wrapper.cond_stage_model = embedder
    path = tmp_path / "sd1.safetensors"
    save_safetensors(path, wrapper.state_dict())
    again = FrozenCLIPEmbedder(model_config=TINY_CONFIG, weights_path=path)
    torch.testing.assert_close(again.encode(PROMPTS), embedder.encode(PROMPTS), atol=0, rtol=0)
    for key, value in hf_text_state_dict(wrapper.state_dict()).items():
        torch.testing.assert_close(again.state_dict()[key], value, atol=0, rtol=0)
    # ... and into transformers' CLIPTextModel, which then gives our outputs
    other = transformers.CLIPTextModel(hf_config()).eval()
    into_hf_model(embedder.state_dict(), other)
    with torch.no_grad():
        expected = other(hf_ids(hf_tokenizer, PROMPTS)).last_hidden_state
    torch.testing.assert_close(embedder.encode(PROMPTS), expected, atol=1e-5, rtol=1e-5)
    for key, value in hf_model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value, atol=0, rtol=0)


def test_wrong_file_names_the_keys(hf_model, embedder, tmp_path):
    state = sd1_state_dict(hf_model)
    del state[SD1_PREFIX + "text_model.final_layer_norm.bias"]
    path = tmp_path / "missing.safetensors"
    save_safetensors(path, state)
    with pytest.raises(ValueError, match=r"1 missing \['transformer.text_model.final_layer_norm.bias'\]"):
        FrozenCLIPEmbedder(model_config=TINY_CONFIG, weights_path=path)
    # a deeper model's file: the extra layer is unexpected
    deeper = transformers.CLIPTextModel(hf_config(num_hidden_layers=LAYERS + 1))
    save_safetensors(path, sd1_state_dict(deeper))
    with pytest.raises(ValueError, match=r"unexpected \['transformer.text_model.encoder.layers.2"):
        FrozenCLIPEmbedder(model_config=TINY_CONFIG, weights_path=path)
    # a wider model's file: shapes named
    wider = transformers.CLIPTextModel(hf_config(hidden_size=2 * WIDTH, intermediate_size=8 * WIDTH))
    save_safetensors(path, sd1_state_dict(wider))
    with pytest.raises(ValueError, match=r"shape mismatches \['transformer.text_model.embeddings"):
        FrozenCLIPEmbedder(model_config=TINY_CONFIG, weights_path=path)
    # an SD 2 file (open_clip layout) is not an SD 1 file
    sd2 = FrozenOpenCLIPEmbedder(model_config={**TINY_CONFIG, "quick_gelu": True})
    save_safetensors(path, {"cond_stage_model.model." + k: v for k, v in sd2.model.state_dict().items()})
    with pytest.raises(ValueError, match=r"missing \['transformer.text_model"):
        FrozenCLIPEmbedder(model_config=TINY_CONFIG, weights_path=path)


def test_tokens_equal_transformers_clip_tokenizer(hf_tokenizer, embedder):
    prompts = [
        "",
        "a photo of a cat",
        "A Photograph of an ASTRONAUT riding a horse, trending on ArtStation!!",
        "  two   spaces\tand\nnew line  ",
        "it's 1024x768 (4k), don't stop; what's up? !!! ??? ...",
        "café crème brûlée, naïve résumé, Ünïcödé ÅNGSTRÖM",
        "日本語のテキスト and emoji 🐱🚀",
        " ".join(["cat"] * 100),  # 102 tokens: truncated to <sot> + 75 + <eot>
        "a " * 74 + "b",  # 75 BPE tokens: exactly fills the context, nothing padded
        "x" * 300,
    ]
    ours = embedder.tokenize(prompts)
    expected = hf_ids(hf_tokenizer, prompts)
    assert ours.dtype == torch.long and ours.shape == (len(prompts), 77)
    assert torch.equal(ours, expected)
    assert ours[0].tolist() == [SOT] + [EOT] * 76  # the empty prompt: SD 1's unconditional tokens
    assert ours[1, 6:].eq(EOT).all() and ours[8, -1] == EOT and ours[8, -2] != EOT
    # "!" alone is id 0, which open_clip also uses as padding: it must survive
    bang = embedder.tokenize(["wow!~"])[0]
    assert bang.tolist() == hf_ids(hf_tokenizer, ["wow!~"])[0].tolist() and bang[2] == 0
    short = FrozenCLIPEmbedder(model_config=TINY_CONFIG, max_length=16)
    assert torch.equal(short.tokenize(prompts), hf_ids(hf_tokenizer, prompts, max_length=16))


def test_tokens_differ_from_transformers5_only_by_ftfy(hf_tokenizer, embedder):
    # open_clip (like transformers 4's CLIPTokenizer that SD 1 ran) cleans text with ftfy; transformers 5's does not
    import ftfy

    prompts = ["“curly quotes” and ‘single’", "ﬁne ligature", "fish &amp; chips"]
    ours = embedder.tokenize(prompts)
    assert not torch.equal(ours, hf_ids(hf_tokenizer, prompts))
    assert torch.equal(ours, hf_ids(hf_tokenizer, [ftfy.fix_text(p) for p in prompts]))


def test_frozen_defaults_and_structure(embedder):
    assert all(not p.requires_grad for p in embedder.parameters()) and not embedder.training
    wrapper = nn.Module()
    wrapper.cond_stage_model = embedder
    wrapper.train()
    assert not embedder.training
    # OpenAI CLIP's quick GELU unless the config says otherwise
    assert type(embedder.model.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    gelu = FrozenCLIPEmbedder(model_config={**TINY_CONFIG, "quick_gelu": False})
    assert type(gelu.model.transformer.resblocks[0].mlp.gelu).__name__ == "GELU"
    assert embedder.width == WIDTH
    # a copy (EMA, Lightning) keeps speaking the SD 1 layout, both ways
    clone = copy.deepcopy(embedder)
    assert set(clone.state_dict()) == set(embedder.state_dict())
    clone.load_state_dict(embedder.state_dict())
    torch.testing.assert_close(clone.encode(PROMPTS), embedder.encode(PROMPTS), atol=0, rtol=0)


def test_unfrozen_state_dict_and_training(hf_model, embedder):
    trainable = FrozenCLIPEmbedder(model_config=TINY_CONFIG, freeze=False)
    trainable.load_state_dict(embedder.state_dict())
    trainable.train()
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())
    assert trainable.encode(["a cat"]).requires_grad
    assert not any(v.requires_grad for v in trainable.state_dict().values())


def test_bad_arguments():
    with pytest.raises(ValueError, match="give version"):
        FrozenCLIPEmbedder()  # no weights, no config, no pretrained tag: never a silent download
    with pytest.raises(ValueError, match="layer"):
        FrozenCLIPEmbedder(model_config=TINY_CONFIG, layer="hidden")
    # a tower that transformers' CLIPTextModel cannot express
    with pytest.raises(ValueError, match="Hugging Face CLIPTextModel counterpart"):
        FrozenCLIPEmbedder(model_config={"text_cfg": {**TINY_CONFIG["text_cfg"], "ls_init_value": 0.1}})
