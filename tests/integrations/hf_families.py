"""Every MoE family of the installed transformers whose experts go through its experts interface,
checked against moe_kernels: served and equal to transformers' eager experts, or falling back
with a warning (and then equal too, through transformers' grouped_mm).

Families are discovered, not listed: every ``transformers.models.<family>.modeling_<family>``
class decorated with ``use_experts_implementation`` (it gains ``_apply_gate``). Each experts
module is built alone from its family's config, shrunk (width 32, 4 experts of width 24, top 2),
in float32, and run on random tokens, routes and weights: outputs and the gradients of the tokens,
the routing weights and every parameter against the eager forward: exactly what the integration
replaces, every experts class of a family included. ``hf_models.py`` then checks each family's
whole tiny model (logits and every parameter's gradient).

    python -m tests.integrations.hf_families --out docs/hf_families.md   # both sweeps, the table
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import moe_kernels.integrations.huggingface as mk_hf

SIZES = {
    "hidden_size": 32,
    "moe_hidden_size": 32,
    "intermediate_size": 48,
    "moe_intermediate_size": 24,
    "expert_intermediate_size": 24,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
}
TOKENS, TOP_K = 7, 2
TOLERANCE = dict(atol=1e-5, rtol=1e-4)


@dataclass
class Result:
    family: str
    experts: str
    status: str  # "served", "fallback", "mismatch" (or an error of ours) or "not built"
    detail: str = ""


def discover() -> list[tuple[str, type]]:
    """``(family, experts class)`` for every experts class of the installed transformers."""
    from transformers import models

    found = []
    for info in pkgutil.iter_modules(models.__path__):
        try:
            module = importlib.import_module(f"transformers.models.{info.name}.modeling_{info.name}")
        except Exception:  # noqa: BLE001 - a family whose optional dependencies are missing
            continue
        for cls in vars(module).values():
            if inspect.isclass(cls) and cls.__module__ == module.__name__ and hasattr(cls, "_apply_gate"):
                found.append((info.name, cls))
    return sorted(found, key=lambda pair: (pair[0], pair[1].__name__))


def _configs(family: str):
    """The family's config objects, text configs first, each shrunk to ``SIZES``."""
    import transformers

    module = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
    classes = [
        c
        for c in vars(module).values()
        if inspect.isclass(c) and issubclass(c, transformers.PretrainedConfig) and c.__module__ == module.__name__
    ]
    configs = []
    for cls in sorted(classes, key=lambda c: "Text" not in c.__name__):
        try:
            config = cls()
        except Exception:  # noqa: BLE001 - a config that needs arguments: try the others
            continue
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        defaults = config.to_dict()
        for key, value in SIZES.items():
            if key in defaults:
                if isinstance(defaults[key], list | tuple):  # one value per modality (Ernie-4.5-VL)
                    value = [value] * len(defaults[key])
                try:
                    setattr(config, key, value)
                except Exception:  # noqa: BLE001 - a per-layer attribute: left as it is
                    pass
        configs.append(config)
    return configs


def build(family: str, cls: type) -> torch.nn.Module:
    """A tiny float32 ``cls`` from its family's config (``ValueError`` saying why if none builds)."""
    parameters = inspect.signature(cls.__init__).parameters
    extra = {"layer_idx": 0} if "layer_idx" in parameters else {}
    if "intermediate_size" in parameters:  # given by the parent block (one per modality: Ernie-4.5-VL)
        extra["intermediate_size"] = SIZES["moe_intermediate_size"]
    errors = []
    for config in _configs(family):
        try:
            experts = cls(config, **extra)
        except Exception as error:  # noqa: BLE001 - recorded: the next config may do
            errors.append(f"{type(config).__name__}: {type(error).__name__}: {error}")
            continue
        if sum(p.numel() for p in experts.parameters()) > 2_000_000:
            errors.append(f"{type(config).__name__}: not shrunk by {sorted(SIZES)}")
            continue
        torch.manual_seed(0)
        with torch.no_grad():
            for p in experts.parameters():
                p.normal_(0, 0.3)
        return experts.float().train()
    raise ValueError("; ".join(errors) or "no config of the family builds without arguments")


def _run(experts, implementation: str, x, index, weights):
    experts.config._experts_implementation = implementation
    experts.zero_grad(set_to_none=True)
    x, weights = x.clone().requires_grad_(), weights.clone().requires_grad_()
    y = experts(x, index, weights)
    y.backward(_grad_of(y))
    grads = {name: p.grad for name, p in experts.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, weights.grad, grads


def _grad_of(y: torch.Tensor) -> torch.Tensor:
    return torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y).cos()


def check(family: str, cls: type) -> Result:
    """Build ``cls`` tiny and compare moe_kernels (PyTorch path) with transformers' eager experts."""
    name = mk_hf.register(backend="torch")
    try:
        experts = build(family, cls)
    except ValueError as error:
        return Result(family, cls.__name__, "not built", str(error))
    E = experts.num_experts
    x = torch.randn(TOKENS, SIZES["hidden_size"], generator=torch.Generator().manual_seed(0))
    errors = []
    for k in (TOP_K, 1):  # some modules take one route per row, of weight 1 (Ergo's projections)
        generator = torch.Generator().manual_seed(k)
        index = torch.rand(TOKENS, E, generator=generator).argsort(1)[:, :k]
        weights = torch.rand(TOKENS, k, generator=generator) if k > 1 else torch.ones(TOKENS, 1)
        try:
            want = _run(experts, "eager", x, index, weights)
            break
        except Exception as error:  # noqa: BLE001 - a module called otherwise than (tokens, index, weights)
            errors.append(f"k={k}: {type(error).__name__}: {error}")
    else:
        return Result(family, cls.__name__, "not built", f"its eager forward failed: {'; '.join(errors)}")
    mk_hf._warned.discard(type(experts))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            got = _run(experts, name, x, index, weights)
        except Exception as error:  # noqa: BLE001 - recorded as a failure of ours
            return Result(family, cls.__name__, "mismatch", f"{type(error).__name__}: {error}")
    fallback = [str(w.message) for w in caught if "moe_kernels does not run" in str(w.message)]
    try:
        for label, a, b in zip(("output", "d tokens", "d routing weights"), got[:3], want[:3]):
            if b is not None:  # a module that takes unit weights does not differentiate them
                torch.testing.assert_close(a, b, **TOLERANCE, msg=lambda m, label=label: f"{label}: {m}")
        assert got[3].keys() == want[3].keys(), f"gradients of {sorted(got[3])} vs {sorted(want[3])}"
        for param in want[3]:
            torch.testing.assert_close(got[3][param], want[3][param], **TOLERANCE, msg=lambda m, p=param: f"d {p}: {m}")
    except AssertionError as error:
        return Result(family, cls.__name__, "mismatch", str(error).splitlines()[0])
    if fallback:
        return Result(family, cls.__name__, "fallback", fallback[0].split(": ", 1)[1])
    return Result(family, cls.__name__, "served")


def table(results: list[Result], models: list | None = None) -> str:
    """The markdown table of ``results`` (and of ``hf_models``' whole-model ``models``, if given)."""
    import transformers

    counts = {status: sum(r.status == status for r in results) for status in ("served", "fallback", "mismatch")}
    families = {r.family for r in results}
    served = families - {r.family for r in results if r.status != "served"}
    by_family = {m.family: m for m in models or []}
    lines = [
        f"# Hugging Face MoE families on moe_kernels (transformers {transformers.__version__})",
        "",
        "Generated by `python -m tests.integrations.hf_families --out docs/hf_families.md`: every experts",
        "class of the installed transformers that goes through its experts interface, built tiny in float32",
        "and compared with transformers' eager experts (outputs, and gradients of the tokens, the routing",
        "weights and every expert parameter). *served*: moe_kernels computes it; *fallback*: it warns and",
        "runs transformers' grouped_mm instead (the reason given); *not built*: this sweep could not make",
        "a tiny instance from the family's default config.",
        "",
        "*Whole model*: the family's language model (its text model if multimodal) built with two layers",
        "of width 32 and 4 experts of width 24, in float32 and eval mode, run on the same tokens with",
        "transformers' eager experts and with moe_kernels: *equal* when the logits and the gradients of",
        "every parameter agree to float32 rounding and moe_kernels computed its experts (`python -m",
        "tests.integrations.hf_models` runs this part alone; with `--backend triton` the experts run",
        "through the Triton kernels, on CPU through the interpreter: 71 of 72 equal there too, to 2e-5",
        "of each tensor's scale). *activation*: what moe_kernels read from the experts module and ran.",
        "",
        f"{len(served)} of {len(families)} families served (every experts class of theirs); of the "
        f"{len(results)} experts classes, {counts['served']} served, {counts['fallback']} fallback, "
        f"{counts['mismatch']} mismatch, {len(results) - sum(counts.values())} not built.",
    ]
    if models:
        equal = sum(m.status == "equal" for m in models)
        lines += ["", f"Whole models: {equal} of {len(models)} families equal to eager with moe_kernels serving them."]
    lines += [
        "",
        "| family | experts class | experts module | whole model | activation | why |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        model = by_family.get(r.family)
        details = (r.detail, model.detail if model and model.status != "equal" else "")
        why = "; ".join(d for d in dict.fromkeys(details) if d)
        status, activations = (model.status, model.activations) if model else ("", "")
        why = why.replace("|", "/")[:160]
        lines.append(f"| {r.family} | `{r.experts}` | {r.status} | {status} | {activations} | {why} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[Result]:
    from .hf_models import sweep

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here (else print it)")
    p.add_argument("--no-models", action="store_true", help="check the experts modules only, not whole models")
    args = p.parse_args(argv)
    results = []
    for family, cls in discover():
        results.append(check(family, cls))
        print(f"{family:24s} {cls.__name__:36s} {results[-1].status} {results[-1].detail[:80]}", flush=True)
    models = None
    if not args.no_models:
        print("whole models:", flush=True)
        models = sweep(
            sorted({r.family for r in results}), report=lambda m: print(f"{m.family:24s} {m.status}", flush=True)
        )
    text = table(results, models)
    if args.out is None:
        print(text)
    else:
        args.out.write_text(text)
    return results


if __name__ == "__main__":
    main()
