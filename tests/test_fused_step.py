"""The optimizer step inside backward (diffusion.fused_step, trainer.optimizer_in_backward):
the same AdamW update, the same checkpoint format in both directions, refusals of what cannot
work with it, and non-finite gradients caught before they reach the weights."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from diffusion.config import ConfigError, RunConfig, TrainerConfig
from diffusion.config_io import apply_overrides
from diffusion.fused_step import AdamWInBackward, check_trainer_support, fused_adamw
from diffusion.presets import get_preset
from diffusion.run import resume_conflicts
from diffusion.trainer import NonFiniteLossError
from tests.test_trainer import Videos, make_diffusion, make_trainer, run

# The trainer's schedule and weight decay; the options fused training accepts.
FUSED_OK = {"gradient_accumulate_every": 1, "max_grad_norm": None, "weight_decay": 0.05, "warmup_steps": 2,
            "lr_schedule": "cosine", "min_lr_ratio": 0.1, "train_num_steps": 5, "save_and_sample_every": 100}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def assert_close_weights(a: nn.Module, b: nn.Module, atol: float = 1e-6):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=atol, rtol=0, msg=key)


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.SiLU(), nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 3))


# --- the optimizer on its own ----------------------------------------------------------

@settings(max_examples=15, deadline=None)
@given(steps=st.integers(1, 4), lr=st.floats(1e-4, 1e-1), weight_decay=st.floats(0.0, 0.5),
       beta2=st.floats(0.9, 0.999), seed=st.integers(0, 2**16))
def test_same_update_as_adamw_with_a_changing_learning_rate(steps, lr, weight_decay, beta2, seed):
    plain_net, fused_net = small_net(seed), small_net(seed)
    options = {"lr": lr, "betas": (0.9, beta2), "weight_decay": weight_decay}
    plain = torch.optim.AdamW(plain_net.parameters(), **options)
    fused = AdamWInBackward(list(fused_net.parameters()), **options)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.randn(4, 5, generator=gen)
        for opt in (plain, fused):
            opt.param_groups[0]["lr"] = lr * (step + 1) / steps
        plain_net(x).square().mean().backward()
        norm = float(nn.utils.clip_grad_norm_(plain_net.parameters(), float("inf")))
        plain.step()
        plain.zero_grad(set_to_none=True)
        with fused.backward_steps():
            fused_net(x).square().mean().backward()
        report = fused.report()
        assert report.updated == 6 and report.skipped == 0 and report.non_finite is None
        assert report.grad_norm == pytest.approx(norm, rel=1e-5)
        assert all(p.grad is None for p in fused_net.parameters())  # freed as applied
    assert_close_weights(plain_net, fused_net)


@pytest.mark.parametrize("options", [{}, {"amsgrad": True}, {"maximize": True}])
def test_direct_update_after_the_first_and_adamw_for_other_options(options):
    """The first update of a parameter is AdamW's own (it creates the state); later ones are
    the written-out arithmetic, except for options it does not cover: equal either way."""
    plain_net, fused_net = small_net(3), small_net(3)
    plain = torch.optim.AdamW(plain_net.parameters(), lr=1e-2, weight_decay=0.1, **options)
    fused = AdamWInBackward(list(fused_net.parameters()), lr=1e-2, weight_decay=0.1, **options)
    singles = [single for _, _, single in fused._single.values()]
    calls = []

    def counted(step):
        def run():
            calls.append(1)
            return step()
        return run

    for single in singles:
        single.step = counted(single.step)
    for _ in range(3):
        x = torch.randn(4, 5)
        plain.zero_grad(set_to_none=True)
        plain_net(x).square().mean().backward()
        plain.step()
        with fused.backward_steps():
            fused_net(x).square().mean().backward()
    assert len(calls) == (6 if not options else 18)
    assert_close_weights(plain_net, fused_net)


def test_state_dict_is_adamw_format_both_ways():
    plain_net, fused_net = small_net(), small_net()
    plain = torch.optim.AdamW(plain_net.parameters(), lr=1e-2, weight_decay=0.1)
    fused = AdamWInBackward(list(fused_net.parameters()), lr=1e-2, weight_decay=0.1)
    x = torch.randn(4, 5)
    plain_net(x).sum().backward()
    plain.step()
    with fused.backward_steps():
        fused_net(x).sum().backward()
    a, b = plain.state_dict(), fused.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a["state"][key][name], b["state"][key][name], atol=1e-7, rtol=0)
    # Each loads the other's state and both then continue identically.
    plain.load_state_dict(b)
    fused.load_state_dict(a)
    for step in range(2):
        y = torch.randn(4, 5)
        plain.zero_grad(set_to_none=True)
        plain_net(y).sum().backward()
        plain.step()
        with fused.backward_steps():
            fused_net(y).sum().backward()
    assert_close_weights(plain_net, fused_net)


def test_backward_outside_the_block_only_accumulates():
    net = small_net()
    before = copy.deepcopy(net.state_dict())
    opt = fused_adamw(net, list(net.parameters()), lr=1e-2)
    net(torch.randn(2, 5)).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert_close_weights(net, small_net(), atol=0)
    net.load_state_dict(before)
    with opt.backward_steps():  # stale gradients are dropped, not applied
        pass
    assert all(p.grad is None for p in net.parameters())
    opt.remove_hooks()
    with opt.backward_steps():
        net(torch.randn(2, 5)).sum().backward()
    assert opt.report().updated == 0 and all(p.grad is not None for p in net.parameters())


def test_non_finite_gradient_stops_the_updates_of_that_step():
    net = small_net()
    opt = fused_adamw(net, list(net.parameters()), lr=1e-2)
    # Backward reaches the last layer first: poison the first layer's weight, so the later
    # layers are updated and this one and the rest are not.
    first = net[0].weight
    handle = first.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    with opt.backward_steps():
        net(torch.randn(2, 5)).sum().backward()
    report = opt.report()
    assert report.non_finite == "0.weight"
    assert report.updated + report.skipped == 6 and report.skipped >= 1
    assert torch.equal(first, before["0.weight"]) and torch.isfinite(first).all()
    for name, p in net.named_parameters():
        assert torch.isfinite(p).all(), name
        assert p.grad is None
    handle.remove()


def test_gradient_accumulated_twice_is_refused():
    net = small_net()
    opt = AdamWInBackward(list(net.parameters()), lr=1e-2)
    with pytest.raises(RuntimeError, match="twice in one backward"), opt.backward_steps():
        net(torch.randn(2, 5)).sum().backward()
        net(torch.randn(2, 5)).sum().backward()


def test_names_must_match_the_parameters():
    with pytest.raises(ValueError, match="each of the 6 parameters, got 1"):
        AdamWInBackward(list(small_net().parameters()), names=["a"])


# --- the config and the trainer -------------------------------------------------------

@pytest.mark.parametrize(("override", "named"), [
    ({"gradient_accumulate_every": 2}, "trainer.gradient_accumulate_every=1"),
    ({"max_grad_norm": 1.0}, "trainer.max_grad_norm=null"),
    ({"parallel": "ddp"}, "trainer.parallel='ddp'"),
    ({"parallel": "fsdp"}, "trainer.parallel='fsdp'"),
])
def test_config_refuses_what_needs_every_gradient(override, named):
    options = {"gradient_accumulate_every": 1, "max_grad_norm": None, **override}
    with pytest.raises(ConfigError, match="trainer.optimizer_in_backward=true") as err:
        TrainerConfig(optimizer_in_backward=True, **options)
    assert named in str(err.value)
    TrainerConfig(optimizer_in_backward=False, **options)  # fine without it


def debug_run(*overrides: str) -> RunConfig:
    base = ["trainer.gradient_accumulate_every=1", "trainer.max_grad_norm=null"]
    return RunConfig.from_dict(apply_overrides(get_preset("debug"), [*base, *overrides]))


def test_set_from_the_command_line_form():
    assert debug_run("trainer.optimizer_in_backward=true").trainer.optimizer_in_backward is True
    assert debug_run().trainer.optimizer_in_backward is False
    with pytest.raises(ConfigError, match="gradient_accumulate_every=1 \\(got 4\\)"):
        debug_run("trainer.optimizer_in_backward=true", "trainer.gradient_accumulate_every=4")
    with pytest.raises(TypeError, match="optimizer_in_backward"):
        TrainerConfig(optimizer_in_backward=1, gradient_accumulate_every=1)


def test_runtime_refusals_name_both_settings():
    with pytest.raises(ValueError, match="trainer.amp=true.*trainer.optimizer_in_backward"):
        check_trainer_support(loss_scaling=True, world_size=1)
    with pytest.raises(ValueError, match="2 processes.*trainer.optimizer_in_backward"):
        check_trainer_support(loss_scaling=False, world_size=2)
    check_trainer_support(loss_scaling=False, world_size=1)


def test_resuming_may_switch_it_on_or_off():
    assert resume_conflicts(debug_run(), debug_run("trainer.optimizer_in_backward=true")) == []


def test_trainer_steps_equal_the_plain_ones(tmp_path):
    plain = make_trainer(tmp_path / "plain", **FUSED_OK)
    fused = make_trainer(tmp_path / "fused", optimizer_in_backward=True, **FUSED_OK)
    assert isinstance(fused.opt, AdamWInBackward) and not isinstance(plain.opt, AdamWInBackward)
    plain_records, fused_records = [], []
    plain.train(log_fn=plain_records.append)
    fused.train(log_fn=fused_records.append)
    assert [r["lr"] for r in plain_records] == [r["lr"] for r in fused_records]
    assert len({r["lr"] for r in fused_records}) > 2  # warm-up and decay were applied
    for a, b in zip(plain_records, fused_records):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert_close_weights(plain.model, fused.model)
    assert_close_weights(plain.ema_model, fused.ema_model)  # EMA updated after the step, as before
    assert all(p.grad is None for p in fused.model.parameters())


@pytest.mark.parametrize("first_fused", [False, True])
def test_checkpoint_resumes_with_the_option_switched(tmp_path, first_fused):
    reference = make_trainer(tmp_path / "reference", **FUSED_OK)
    run(reference)
    options = {**FUSED_OK, "save_and_sample_every": 3}
    first = make_trainer(tmp_path / "run", optimizer_in_backward=first_fused, **{**options, "train_num_steps": 3})
    run(first)
    assert first.step == 3
    resumed = make_trainer(tmp_path / "run", diffusion=make_diffusion(seed=99), resume=True,
                           optimizer_in_backward=not first_fused, **options)
    assert resumed.step == 3 and isinstance(resumed.opt, AdamWInBackward) == (not first_fused)
    run(resumed)
    assert resumed.step == 5
    assert_close_weights(resumed.model, reference.model)


def test_trainer_refuses_the_default_accumulation(tmp_path):
    with pytest.raises(ValueError, match="gradient_accumulate_every=1 \\(got 2\\)"):
        make_trainer(tmp_path, optimizer_in_backward=True, max_grad_norm=None)


def test_non_finite_gradient_stops_the_trainer_without_saving(tmp_path):
    trainer = make_trainer(tmp_path, Videos(), optimizer_in_backward=True, **{**FUSED_OK, "save_and_sample_every": 2})
    trainer.train_num_steps = 2
    run(trainer)
    weight = trainer.model.denoise_fn.inp.weight
    weight.register_hook(lambda grad: grad * float("inf"))
    trainer.train_num_steps = 4
    with pytest.raises(NonFiniteLossError, match=r"gradient of denoise_fn\.inp\.weight is not finite at step 2 "
                                                 r"\(optimizer_in_backward: \d+ parameters were already updated"):
        trainer.train()
    assert torch.isfinite(weight).all()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]
    assert all(p.grad is None for p in trainer.model.parameters())
