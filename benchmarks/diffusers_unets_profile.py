"""Where the time of a temporal-only train step goes: ours against diffusers, same weights.

    python benchmarks/diffusers_unets_profile.py --models animatediff --threads 1
    python benchmarks/diffusers_unets_profile.py --quick          # the test: seconds

The companion of `benchmarks/diffusers_unets.py` (same models, inputs and step) for a time
ratio close to 1: it splits the step and names what differs. Per model:

- phases: forward (recording gradients, with the MSE loss) and backward, alternating ours /
  diffusers for `--rounds` rounds, medians in ms;
- backward nodes: CPU time per step of each autograd node kind under `torch.profiler`
  (ours' `unets.lean_ops` functions stand where diffusers has several plain nodes);
- ops: self CPU time per step of each aten op, the largest differences first (the profiler's
  own per-op cost inflates ops called often, so read these against the phases);
- lean ops, what if: our step with one `unets.lean_ops` function replaced by the plain
  autograd it stands for (more memory kept for backward), against our step as it is,
  alternating; a ratio below 1 means the plain version is faster;
- fixed cost of a lean op call: forward + backward on 4x4 tensors, lean against plain, so
  the difference is the Python and autograd bookkeeping each call adds.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common
from benchmarks import diffusers_unets as pair


def _plain_geglu_linear(x: torch.Tensor, proj: nn.Linear, linear: nn.Linear) -> torch.Tensor:
    value, gate = proj(x).chunk(2, dim=-1)
    return linear(value * F.gelu(gate))


def _plain_norm_silu_conv(norm: nn.GroupNorm, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
                          stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (1, 1),
                          dropout: float = 0.0) -> torch.Tensor:
    act = F.silu(norm(x))
    if dropout > 0:
        act = F.dropout(act, float(dropout), training=True)
    return F.conv2d(act, weight, bias, stride, padding)


# The plain autograd each lean op stands for (`unets.lean_ops`), as `unets.diffusers_layers`
# calls it.
PLAIN_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "geglu_linear": _plain_geglu_linear,
    "lean_conv": lambda conv, x: conv(x),
    "norm_silu_conv": _plain_norm_silu_conv,
}


@contextlib.contextmanager
def plain_op(name: str) -> Iterator[None]:
    """`unets.diffusers_layers.<name>` replaced by the plain autograd version inside."""
    from unets import diffusers_layers

    lean = getattr(diffusers_layers, name)
    setattr(diffusers_layers, name, PLAIN_OPS[name])
    try:
        yield
    finally:
        setattr(diffusers_layers, name, lean)


def _loss_fn(model: nn.Module, is_ours: bool, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
             kind: str) -> Callable[[], torch.Tensor]:
    their_cond = cond.repeat_interleave(x.shape[2], 0) if kind == "animatediff" else cond
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device)
    pair._temporal_only(model, is_ours)

    def loss() -> torch.Tensor:
        for p in model.parameters():
            p.grad = None
        out = model(x, t, cond=cond) if is_ours else model(x, t, encoder_hidden_states=their_cond).sample
        return F.mse_loss(out.float(), target)
    return loss


def _per_step(fn: Callable[[], Any], steps: int) -> tuple[dict[str, float], dict[str, float]]:
    """(self CPU ms per step by op, CPU ms per step by backward node kind) over `steps` calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    ops: dict[str, float] = collections.Counter()
    nodes: dict[str, float] = collections.Counter()
    for event in prof.key_averages():
        ops[event.key] += event.self_cpu_time_total / steps / 1e3
        if event.key.startswith("autograd::engine::evaluate_function: "):
            nodes[event.key.split(": ", 1)[1]] += event.cpu_time_total / steps / 1e3
    return ops, nodes


def profile_model(kind: str, *, frames: int, side: int, rounds: int, top: int) -> dict[str, Any]:
    theirs, ours, cond_dim = pair.build_pair(kind, "tiny")
    theirs, ours = theirs.eval(), ours.eval()
    x, t, cond = pair._inputs(kind, cond_dim, batch=1, frames=frames, side=side, device=torch.device("cpu"))
    losses = {"ours": _loss_fn(ours, True, x, t, cond, kind), "diffusers": _loss_fn(theirs, False, x, t, cond, kind)}
    for loss in losses.values():  # warm-up
        loss().backward()
    times: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(rounds):
        for who, loss in losses.items():
            start = time.perf_counter()
            value = loss()
            middle = time.perf_counter()
            value.backward()
            times[f"{who}_forward"].append(middle - start)
            times[f"{who}_backward"].append(time.perf_counter() - middle)
    phases = {key: statistics.median(values) * 1e3 for key, values in times.items()}
    profiled = {who: _per_step(lambda loss=loss: loss().backward(), max(2, rounds // 3))
                for who, loss in losses.items()}
    ops = {who: profiled[who][0] for who in losses}
    nodes = {who: profiled[who][1] for who in losses}

    def table(per: dict[str, dict[str, float]], order: Callable[[str], float]) -> list[dict[str, Any]]:
        keys = sorted(set(per["ours"]) | set(per["diffusers"]), key=order)[:top]
        return [{"name": k, "ours_ms": per["ours"].get(k, 0.0), "diffusers_ms": per["diffusers"].get(k, 0.0),
                 "difference_ms": per["ours"].get(k, 0.0) - per["diffusers"].get(k, 0.0)} for k in keys]

    what_if = []
    step = pair.side_steps(ours, True, x, t, cond, kind, torch.float32)["train"]
    step()
    for name in PLAIN_OPS:
        ab: dict[str, list[float]] = {"lean": [], "plain": []}
        for index in range(rounds):
            for which in ("lean", "plain") if index % 2 == 0 else ("plain", "lean"):
                with plain_op(name) if which == "plain" else contextlib.nullcontext():
                    start = time.perf_counter()
                    step()
                    ab[which].append(time.perf_counter() - start)
        lean_ms, plain_ms = (statistics.median(ab[k]) * 1e3 for k in ("lean", "plain"))
        what_if.append({"lean_op": name, "as_is_ms": lean_ms, "plain_ms": plain_ms, "plain_over_as_is": plain_ms / lean_ms})
    return {
        "model": kind, "shape": f"1x4x{frames}x{side}x{side}", "rounds": rounds, "phases_ms": phases,
        "nodes": table(nodes, lambda k: -(nodes["ours"].get(k, 0.0) + nodes["diffusers"].get(k, 0.0))),
        "ops": table(ops, lambda k: -abs(ops["ours"].get(k, 0.0) - ops["diffusers"].get(k, 0.0))),
        "what_if": what_if,
    }


def fixed_costs(calls: int) -> list[dict[str, Any]]:
    """Each lean op's forward + backward against its plain autograd on tensors so small that
    the kernels cost next to nothing: the Python and autograd bookkeeping a call adds (us)."""
    from unets import lean_ops

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1).requires_grad_(False)
    trained = nn.Conv2d(4, 4, 3, padding=1)
    norm, proj, linear = nn.GroupNorm(2, 4), nn.Linear(4, 16), nn.Linear(8, 4)
    x = torch.randn(1, 4, 4, 4, requires_grad=True)
    tokens = torch.randn(2, 4, 4, requires_grad=True)
    cases = {
        "lean_conv": (lambda: lean_ops.lean_conv(conv, x), lambda: PLAIN_OPS["lean_conv"](conv, x)),
        "norm_silu_conv": (lambda: lean_ops.norm_silu_conv(norm, x, trained.weight, trained.bias),
                           lambda: _plain_norm_silu_conv(norm, x, trained.weight, trained.bias)),
        "geglu_linear": (lambda: lean_ops.geglu_linear(tokens, proj, linear),
                         lambda: _plain_geglu_linear(tokens, proj, linear)),
    }
    rows = []
    for name, (lean, plain) in cases.items():
        times: dict[str, list[float]] = {"lean": [], "plain": []}
        for _ in range(calls):
            for which, fn in (("lean", lean), ("plain", plain)):
                start = time.perf_counter()
                fn().sum().backward()
                times[which].append(time.perf_counter() - start)
        lean_us, plain_us = (statistics.median(times[k]) * 1e6 for k in ("lean", "plain"))
        rows.append({"lean_op": name, "lean_us": lean_us, "plain_us": plain_us, "extra_us": lean_us - plain_us})
    return rows


def report(results: Sequence[dict[str, Any]], overhead: Sequence[dict[str, Any]], env: dict[str, Any]) -> str:
    lines = ["# Ours vs diffusers: where the temporal-only train step's time goes", "",
             common.environment_markdown(env), ""]
    for result in results:
        p = result["phases_ms"]
        lines += [f"## {result['model']} tiny, {result['shape']}, {result['rounds']} rounds", "",
                  "| phase | ours ms | diffusers ms | ratio |", "|---|---|---|---|"]
        for phase in ("forward", "backward"):
            lines.append(f"| {phase} | {p['ours_' + phase]:.2f} | {p['diffusers_' + phase]:.2f} | "
                         f"{p['ours_' + phase] / p['diffusers_' + phase]:.3f} |")
        total = {who: p[f"{who}_forward"] + p[f"{who}_backward"] for who in ("ours", "diffusers")}
        lines += [f"| step | {total['ours']:.2f} | {total['diffusers']:.2f} | {total['ours'] / total['diffusers']:.3f} |",
                  "", "Backward nodes (CPU ms per step under the profiler):", "",
                  common.markdown_table(result["nodes"], ("name", "ours_ms", "diffusers_ms", "difference_ms")), "",
                  "Ops, largest differences (self CPU ms per step under the profiler):", "",
                  common.markdown_table(result["ops"], ("name", "ours_ms", "diffusers_ms", "difference_ms")), "",
                  "Lean ops, what if (our step with one of them as plain autograd):", "",
                  common.markdown_table(result["what_if"], ("lean_op", "as_is_ms", "plain_ms", "plain_over_as_is")),
                  ""]
    lines += ["## Fixed cost of a lean op call (forward + backward on 4x4 tensors, us)", "",
              common.markdown_table(overhead, ("lean_op", "lean_us", "plain_us", "extra_us")), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 frames at 8x8, 2 rounds (the test)")
    parser.add_argument("--models", nargs="+", default=["animatediff", "modelscope"],
                        choices=["modelscope", "animatediff"])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--side", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--top", type=int, default=15, help="rows of the node and op tables")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    for name in ("frames", "side", "rounds", "top"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.quick:
        args.frames, args.side, args.rounds = 4, 8, 2
    common.configure_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [profile_model(kind, frames=args.frames, side=args.side, rounds=args.rounds, top=args.top)
               for kind in args.models]
    overhead = fixed_costs(50 if args.quick else 2000)
    device = torch.device("cpu")
    stem = common.output_stem(args.out, "diffusers-unets-profile", device)
    env = common.environment(device)
    common.write_json({"environment": env, "results": results, "fixed_costs": overhead}, stem.with_suffix(".json"))
    stem.with_suffix(".md").write_text(report(results, overhead, env))
    pair.logger.info("wrote %s.{json,md}", stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
