"""EMA of weights: decay warm-up and averaging against an independent recurrence; swap in/out; checkpoints."""

import pytest
import torch
from torch import nn

from ldm.modules.ema import EMA, ema_decay


def small_model():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    model.register_buffer("running", torch.zeros(2, dtype=torch.float64))  # buffers are not averaged
    return model


def set_random_params(model, generator):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))


@pytest.mark.parametrize("decay", [0.9999, 0.9, 0.5])
def test_average_matches_independent_recurrence(decay):
    generator = torch.Generator().manual_seed(0)
    model = small_model()
    ema = EMA(model, decay=decay)
    stored_decay = float(torch.tensor(decay, dtype=torch.float32))  # SD keeps decay as a float32 buffer
    names = [n for n, _ in model.named_parameters()]
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(1, 31):
        set_random_params(model, generator)
        ema.update(model)
        d = min(stored_decay, (1.0 + step) / (10.0 + step))
        for n, p in model.named_parameters():
            expected[n] = d * expected[n] + (1.0 - d) * p.detach()
        assert int(ema.num_updates) == step
        assert ema.current_decay == pytest.approx(d, abs=1e-15)
    averaged = small_model()
    ema.copy_to(averaged)
    for n, p in averaged.named_parameters():
        torch.testing.assert_close(p, expected[n], atol=1e-12, rtol=1e-12)
    assert len(names) == 4


def test_warm_up_closed_form_for_a_constant_target():
    # shadow_n - p = (shadow_0 - p) * prod_{k<=n} d_k, d_k = min(decay, (1+k)/(10+k))
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.99)
    with torch.no_grad():
        model.weight.fill_(3.0)
    product = 1.0
    for k in range(1, 201):
        ema.update(model)
        product *= min(0.99, (1 + k) / (10 + k))
        shadow = ema.weight.item()
        assert shadow == pytest.approx(3.0 + (1.0 - 3.0) * product, abs=1e-12)
    assert ema_decay(0.99, 1) == pytest.approx(2 / 11)
    assert ema_decay(0.99, 10_000) == 0.99


def test_constant_decay_without_warm_up():
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9, use_num_updates=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    d = float(torch.tensor(0.9, dtype=torch.float32))  # the float32 buffer's value, as in SD
    for n in range(1, 6):
        ema.update(model)
        assert ema.weight.item() == pytest.approx(1 - d**n, abs=1e-12)
        assert ema.current_decay == d
    assert int(ema.num_updates) == -1


def test_swap_in_and_restore():
    generator = torch.Generator().manual_seed(1)
    model = small_model()
    ema = EMA(model, decay=0.5)
    set_random_params(model, generator)
    ema(model)  # SD's LitEma call style
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    shadow = {n: ema.get_buffer(n.replace(".", "")).clone() for n in raw}
    assert any(not torch.equal(raw[n], shadow[n]) for n in raw)
    with ema.average_parameters(model):
        for n, p in model.named_parameters():
            assert torch.equal(p, shadow[n])
    for n, p in model.named_parameters():
        assert torch.equal(p, raw[n])
    with pytest.raises(RuntimeError, match="boom"):
        with ema.average_parameters(model):
            raise RuntimeError("boom")
    for n, p in model.named_parameters():
        assert torch.equal(p, raw[n])
    # store / restore by hand
    ema.store(model.parameters())
    ema.copy_to(model)
    ema.restore(model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, raw[n])
    with pytest.raises(ValueError, match="store"):
        ema.restore(model.parameters())


def test_frozen_parameters_not_tracked_and_mismatch_is_reported():
    model = small_model()
    model[0].weight.requires_grad_(False)
    ema = EMA(model)
    assert "0weight" not in dict(ema.named_buffers())
    assert set(ema.m_name2s_name) == {"0.bias", "2.weight", "2.bias"}
    other = nn.Sequential(nn.Linear(3, 4)).double()
    with pytest.raises(ValueError, match="does not match"):
        ema.update(other)
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.5)


def test_checkpoint_holds_raw_and_ema_weights_once_each():
    class Trainer(nn.Module):  # what a LightningModule holds
        def __init__(self):
            super().__init__()
            self.model = small_model()
            self.model_ema = EMA(self.model, decay=0.9)

    generator = torch.Generator().manual_seed(2)
    trainer = Trainer()
    for _ in range(3):
        set_random_params(trainer.model, generator)
        trainer.model_ema.update(trainer.model)
    state = trainer.state_dict()
    n_params = len(list(trainer.model.parameters()))
    model_keys = [k for k in state if k.startswith("model.")]
    ema_keys = [k for k in state if k.startswith("model_ema.")]
    assert len(model_keys) == n_params + 1  # + the model's own buffer
    # SD's layout: decay, num_updates and one shadow per parameter, named without dots
    assert sorted(ema_keys) == sorted(
        ["model_ema.decay", "model_ema.num_updates", "model_ema.0weight", "model_ema.0bias", "model_ema.2weight",
         "model_ema.2bias"]
    )
    assert state["model_ema.num_updates"].item() == 3
    restored = Trainer()
    restored.load_state_dict(state)
    assert int(restored.model_ema.num_updates) == 3
    for k in state:
        assert torch.equal(restored.state_dict()[k], state[k])
    # training resumes identically
    set_random_params(trainer.model, generator)
    restored.model.load_state_dict(trainer.model.state_dict())
    trainer.model_ema.update(trainer.model)
    restored.model_ema.update(restored.model)
    for k, v in trainer.model_ema.state_dict().items():
        assert torch.equal(restored.model_ema.state_dict()[k], v)
    # a temporary store() never ends up in a checkpoint
    trainer.model_ema.store(trainer.model.parameters())
    assert set(trainer.state_dict()) == set(state)


def test_shadows_follow_module_device_and_dtype():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.5)
    ema = ema.double()
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # float32 params into float64 shadows
    assert ema.weight.dtype == torch.float64
