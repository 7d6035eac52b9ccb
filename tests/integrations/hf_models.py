"""Whole tiny models of every MoE family of the installed transformers, moe_kernels against
transformers' eager experts: the same logits and the same gradients of every parameter.

``hf_families.py`` checks each experts module alone; this builds the family's language model
(its text model where the family is multimodal: the experts live there), shrunk to two layers of
width 32 with 4 experts of width 24, in float32 and eval mode, and runs it twice on the same
tokens: once with transformers' eager experts, once with moe_kernels (the PyTorch path). Each
family runs in a forked child process with a time limit, and is sized on the meta device before
anything is allocated, so one family that builds a large model or hangs cannot stop the sweep.

    python -m tests.integrations.hf_models                    # every family, a line each
    python -m tests.integrations.hf_models qwen3_moe gpt_oss  # some of them
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import multiprocessing
import time
import traceback
import warnings
from dataclasses import dataclass
from unittest import mock

import torch

import moe_kernels.integrations.huggingface as mk_hf

from .hf_families import SIZES, discover

SMALL = {
    **SIZES,
    # the layers, their attention and the vocabulary
    "num_hidden_layers": 2,
    "num_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "vocab_size": 128,
    "unpadded_vocab_size": 128,
    "max_position_embeddings": 128,
    "rotary_dim": 8,
    "swa_head_dim": 8,
    "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 4,
    "num_sliding_attention_heads": 4,
    # latent attention (DeepSeek-V2 and after) and its sparse indexer
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "o_lora_rank": 16,
    "o_groups": 2,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "qk_head_dim": 16,
    "v_head_dim": 8,
    "index_head_dim": 8,
    "index_n_heads": 2,
    "index_num_heads": 2,
    "index_topk": 4,
    # linear attention and state-space layers
    "linear_num_heads": 4,
    "linear_head_dim": 8,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "mamba_num_heads": 4,
    "mamba_head_dim": 8,
    "mamba_n_heads": 4,
    "mamba_d_head": 8,
    "mamba_d_state": 8,
    "mamba_dt_rank": 8,
    "ssm_state_size": 8,
    "n_groups": 1,
    "attn_layer_period": 2,
    "attn_layer_offset": 0,
    "expert_layer_period": 2,
    "expert_layer_offset": 1,
    # routing: every layer MoE, top-2 of 4 in one group
    "first_k_dense_replace": 0,
    "num_dense_layers": 1,
    "moe_layer_start_index": 1,
    "moe_layer_end_index": 1,
    "moe_k": 2,
    "moe_topk": 2,
    "top_k_experts": 2,
    "num_experts_per_token": 2,
    "n_group": 1,
    "topk_group": 1,
    "num_expert_group": 1,
    "zero_expert_num": 2,
    # shared experts and the dense layers' widths
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "moe_num_shared_experts": 1,
    "shared_expert_intermediate_size": 24,
    "shared_experts_intermediate_size": 24,
    "shared_intermediate_size": 24,
    "moe_shared_expert_intermediate_size": 24,
    "share_expert_dim": 24,
    "expert_ffn_hidden_size": 24,
    "ffn_hidden_size": 48,
    "dense_intermediate_size": 48,
    "first_dense_intermediate_size": 48,
    "mlp_only_intermediate_size": 48,
    # per-layer inputs and n-gram embeddings
    "hidden_size_per_layer_input": 8,
    "vocab_size_per_layer_input": 128,
    "hc_lowrank": 16,
    "ple_embed_dim": 16,
    "ngram_vocab_size_base": 256,
}
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")
MAX_PARAMETERS = 3_000_000
TIMEOUT_S = 120.0
BATCH, SEQUENCE = 2, 8
# Largest difference allowed, relative to the largest value of the tensor (at least 1): float32
# rounding through two layers. The Triton kernels compute the activations' derivatives with their
# own formulas (GELU-tanh's tanh from exp), which moves gradients by up to ~3e-5.
TOLERANCE = {"torch": 1e-5, "triton": 1e-4}
# Sizes a family's config validates against others (its own error says so).
OVERRIDES = {
    "deepseek_ocr2": {"mlp_layer_types": ["sparse", "sparse"]},
    "lfm2_moe": {"layer_types": ["full_attention", "conv"]},
    "gemma4": {"enable_moe_block": True},
    "diffusion_gemma": {"enable_moe_block": True},
    "flint": {"mlp_only_layers": []},
    "kolibri1_1": {"head_dim": 16, "mlp_only_layers": [], "index_layers": [1]},
    "ernie4_5_vl_moe": {"rope_parameters": {"mrope_section": [1, 1, 2]}},
    "glm4v_moe": {"head_dim": 16, "rope_parameters": {"mrope_section": [2, 1, 1]}},
    "granitemoehybrid": {"mamba_n_heads": 8, "layer_types": ["full_attention", "linear_attention"]},
    "mistral4": {"head_dim": 16},
    "step3p7": {"sliding_window": 4},
    "qwen4_exp": {
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 8,
        "indexer_budget": 4,
        "indexer_compress_ratio": 2,
    },
    "glm5_next": {"index_kpool": 4},
    "zaya": {"num_experts_per_tok": 1},
    "hy_v4_vl": {"mrope_section": [2, 1, 1]},
}


@dataclass
class ModelResult:
    family: str
    status: str  # "equal", "fallback" (equal, through transformers' grouped_mm), "differs", "not built"
    detail: str = ""
    seconds: float = 0.0
    activations: str = ""  # those moe_ffn computed for the model's experts


def tiny_configs(family: str):
    """The family's text config made small, in the ways worth trying, best first: built with
    ``SMALL``'s sizes (those it has) and the family's ``OVERRIDES``, so that what it derives from
    them (per-layer lists, head counts) follows, with its per-layer lists cut to the layers kept,
    then without them; then its defaults with the sizes set afterwards (a config that validates
    its sizes against each other may only accept them that way)."""
    import transformers

    default = transformers.CONFIG_MAPPING[_config_family(family)]()
    default = default.get_text_config() if hasattr(default, "get_text_config") else default
    values = default.to_dict()
    sizes = {key: _sized(values[key], value) for key, value in SMALL.items() if key in values}
    if "kv_lora_rank" in values:  # latent attention expands its keys to every head
        sizes["num_key_value_heads"] = SMALL["num_attention_heads"]
    sizes |= {
        key: {**values[key], **value} if isinstance(value, dict) else value
        for key, value in OVERRIDES.get(family, {}).items()
    }
    layers = values.get("num_hidden_layers")
    per_layer = {
        key: _kept_layers(value)
        for key, value in values.items()
        if isinstance(value, list) and layers and len(value) == layers and key not in sizes
    }
    for given in ({**sizes, **per_layer}, sizes, {}):
        try:
            config = type(default)(**given)
        except Exception as error:  # noqa: BLE001 - a config that derives its lists may refuse them
            yield ValueError(f"{type(default).__name__} refuses {sorted(given)}: {type(error).__name__}: {error}")
            continue
        for key, value in {**sizes, **(per_layer if not given else {})}.items():  # what it did not take
            _set(config, key, value)
        for key in TOKEN_IDS:
            ids = getattr(config, key, None)
            if isinstance(ids, int) and ids >= SMALL["vocab_size"]:
                _set(config, key, TOKEN_IDS.index(key))
            elif isinstance(ids, list):
                _set(config, key, [i % SMALL["vocab_size"] for i in ids])
        yield config


def _sized(default, size):
    """``size`` in the shape of the default: one per modality where the default is a list (Ernie-4.5-VL's
    expert counts), each mode's own where it is a dict of modes."""
    if isinstance(default, list | tuple):
        return [size] * len(default)
    if isinstance(default, dict):
        return {mode: _sized(value, size) for mode, value in default.items()}
    return size


def _config_family(family: str) -> str:
    """The config mapping's name for a model family (a family may use another family's config)."""
    import transformers

    if family in transformers.CONFIG_MAPPING:
        return family
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    for cls in vars(module).values():
        config_class = getattr(cls, "config_class", None)
        if inspect.isclass(cls) and config_class is not None and config_class.model_type:
            return config_class.model_type
    raise ValueError(f"no config for {family}")


def _model_class(family: str, text) -> type:
    """The class of the family's language model for ``text`` (its config): the causal LM auto
    class lists, else the family's own class built from it (a causal LM before a bare model)."""
    import transformers
    from transformers.models.auto import modeling_auto

    kind = type(text).model_type
    for mapping in (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, modeling_auto.MODEL_MAPPING_NAMES):
        if kind in mapping:
            return getattr(transformers, mapping[kind])
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    classes = [
        c
        for c in vars(module).values()
        if inspect.isclass(c)
        and issubclass(c, transformers.PreTrainedModel)
        and getattr(c, "config_class", None) is type(text)
    ]
    if not classes:
        raise ValueError(f"no model class takes {type(text).__name__} ({kind})")
    return min(classes, key=lambda c: ("CausalLM" not in c.__name__, len(c.__name__)))


def _kept_layers(per_layer: list) -> list:
    """The entries of two layers: the first, and the first that differs from it (so a model whose
    first layers are dense keeps one of its MoE layers)."""
    other = next((entry for entry in per_layer if entry != per_layer[0]), per_layer[-1])
    return [per_layer[0], other][: SMALL["num_hidden_layers"]]


def _set(config, key: str, value) -> None:
    try:
        if getattr(config, key) != value:
            setattr(config, key, value)
    except Exception:  # noqa: BLE001 - a derived or read-only attribute: left as it is
        pass


def build(family: str, config) -> torch.nn.Module:
    """The family's float32 language model for ``config`` (its text model if the family is
    multimodal), in eval mode; ``ValueError`` if it is too large or has no experts module."""
    factory = _model_class(family, config)
    with torch.device("meta"):  # sized before anything is allocated
        sized = factory._from_config(config)
    parameters = sum(p.numel() for p in sized.parameters())
    if parameters > MAX_PARAMETERS:
        raise ValueError(f"{type(sized).__name__} keeps {parameters:,} parameters after shrinking")
    torch.manual_seed(0)
    model = factory._from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random routers leave correction biases at zero: give them values
        for name, buffer in model.named_buffers():
            if "e_score_correction_bias" in name:
                buffer.uniform_(-0.1, 0.1)
    if not any(hasattr(module, "_apply_gate") for module in model.modules()):
        raise ValueError(f"{type(model).__name__} has no experts module left after shrinking")
    return model.eval()


def tiny_model(family: str, ids: torch.Tensor) -> tuple[torch.nn.Module, tuple]:
    """The first of ``tiny_configs``' models that builds and runs with eager experts, and its
    eager outputs; ``ValueError`` with every reason if none does."""
    errors = []
    for config in tiny_configs(family):
        try:
            if isinstance(config, Exception):
                raise config
            model = build(family, config)
            return model, _outputs(model, "eager", ids)
        except Exception as error:  # noqa: BLE001 - recorded: the next config may do
            errors.append(f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
    raise ValueError(" / ".join(dict.fromkeys(errors)))


def _outputs(model, implementation: str, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits (or the last hidden state of a model without a head) and every parameter's gradient
    of a fixed function of them."""
    model.set_experts_implementation(implementation)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids)
    logits = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    weight = torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view_as(logits).cos()
    (logits * weight).sum().backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def _differences(got: tuple, want: tuple) -> dict[str, float]:
    """The largest difference of the logits and of each gradient, relative to the tensor's own
    scale (an embedding's gradient sums many terms of magnitude 100: 1e-5 there is rounding)."""
    pairs = {"logits": (got[0], want[0])} | {f"d {name}": (got[1][name], want[1][name]) for name in want[1]}
    return {
        label: ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item() if a.numel() else 0.0
        for label, (a, b) in pairs.items()
    }


def check(family: str, backend: str = "torch") -> ModelResult:
    """Build ``family``'s tiny model and compare moe_kernels (``moe_ffn``'s ``backend``: on CPU,
    ``"triton"`` runs the kernels through the interpreter) with transformers' eager experts."""
    start = time.perf_counter()
    name = mk_hf.register(backend=backend)
    ids = torch.randint(3, SMALL["vocab_size"], (BATCH, SEQUENCE), generator=torch.Generator().manual_seed(1))
    try:
        model, want = tiny_model(family, ids)
    except Exception as error:  # noqa: BLE001 - recorded: the family's default config does not shrink
        return ModelResult(family, "not built", str(error), time.perf_counter() - start)
    mk_hf._warned.clear()  # warned once per class: a process that ran it before would not say it again
    served = []  # the experts calls moe_ffn computed (a model that never reaches them proves nothing)
    counted = functools.partial(_counted, mk_hf.moe_ffn, served)
    with warnings.catch_warnings(record=True) as caught, mock.patch.object(mk_hf, "moe_ffn", counted):
        warnings.simplefilter("always")
        try:
            got = _outputs(model, name, ids)
        except Exception as error:  # noqa: BLE001 - a failure of ours
            return ModelResult(family, "differs", f"{type(error).__name__}: {error}", time.perf_counter() - start)
    fallback = [str(w.message) for w in caught if "moe_kernels does not run" in str(w.message)]
    seconds = time.perf_counter() - start
    if got[1].keys() != want[1].keys():
        return ModelResult(family, "differs", f"gradients of {sorted(got[1])} vs {sorted(want[1])}", seconds)
    differences = _differences(got, want)
    worst = max(differences, key=differences.get)
    if differences[worst] > TOLERANCE[backend]:
        return ModelResult(family, "differs", f"{worst}: {differences[worst]:.1e} of its scale", seconds)
    if fallback:
        return ModelResult(family, "fallback", fallback[0].split(": ", 1)[1], seconds)
    if not served:
        return ModelResult(family, "differs", "equal, but its experts never ran through moe_ffn", seconds)
    detail = f"{len(served)} experts calls served, {len(want[1])} gradients, differences <= {differences[worst]:.0e}"
    return ModelResult(family, "equal", detail, seconds, ", ".join(dict.fromkeys(served)))


def _counted(moe_ffn, calls: list, *args, **kwargs):
    calls.append(kwargs.get("activation"))
    return moe_ffn(*args, **kwargs)


def _child(family: str, backend: str, queue) -> None:
    torch.set_num_threads(1)  # the sweep runs one family per core
    warnings.filterwarnings("ignore")  # transformers' notes on slow CPU fallbacks, once per family
    try:
        result = check(family, backend)
    except BaseException as error:  # noqa: BLE001 - reported to the parent, never lost
        result = ModelResult(family, "not built", "".join(traceback.format_exception_only(error)).strip())
    queue.put(result)


def sweep(
    families: list[str], workers: int = 2, timeout_s: float = TIMEOUT_S, backend: str = "torch", report=None
) -> list[ModelResult]:
    """``check`` each family in a forked child (``workers`` at a time), killed after ``timeout_s``."""
    context = multiprocessing.get_context("fork")
    pending, running, results = list(families), {}, {}
    while pending or running:
        while pending and len(running) < workers:
            family = pending.pop(0)
            queue = context.Queue()
            process = context.Process(target=_child, args=(family, backend, queue), daemon=True)
            process.start()
            running[family] = (process, queue, time.perf_counter())
        time.sleep(0.05)
        for family, (process, queue, started) in list(running.items()):
            result = None
            if not queue.empty():
                result = queue.get()
            elif not process.is_alive():
                result = ModelResult(family, "not built", f"its process died (exit code {process.exitcode})")
            elif time.perf_counter() - started > timeout_s:
                process.kill()
                result = ModelResult(family, "not built", f"timed out after {timeout_s:.0f} s")
            if result is not None:
                process.join(timeout=5)
                del running[family]
                results[family] = result
                if report is not None:
                    report(result)
    return [results[family] for family in families]


def families() -> list[str]:
    return sorted({family for family, _ in discover()})


def main(argv: list[str] | None = None) -> list[ModelResult]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("families", nargs="*", help="families to check (default: every one discovered)")
    p.add_argument("--workers", type=int, default=2, help="families checked at once (default 2)")
    p.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per family (default %(default)s)")
    p.add_argument(
        "--backend",
        choices=("torch", "triton"),
        default="torch",
        help="moe_ffn's backend (triton: the kernels, through the interpreter on CPU tensors)",
    )
    args = p.parse_args(argv)

    def report(r: ModelResult) -> None:
        print(f"{r.family:24s} {r.status:9s} {r.seconds:5.1f}s {r.detail[:100]}", flush=True)

    results = sweep(args.families or families(), args.workers, args.timeout, args.backend, report)
    counts = {s: sum(r.status == s for r in results) for s in ("equal", "fallback", "differs", "not built")}
    print(", ".join(f"{n} {s}" for s, n in counts.items()))
    return results


if __name__ == "__main__":
    main()
