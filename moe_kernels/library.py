"""The ops as ``torch.library`` custom ops, with one autograd definition for both ways of calling
them and a direct path for plain eager calls.

Each op is a ``torch.library.custom_op`` (opaque to ``torch.compile`` and ``torch.export``, with a
fake implementation for shapes). ``register_autograd`` makes ``torch.ops.moe_kernels.<op>``
differentiable, but the ``autograd.Function`` that custom ops build for it has no
``setup_context``, so ``torch.func`` transforms refuse it. The public Python API therefore calls
the op through an ``autograd.Function`` in the ``setup_context`` style, built here from the very
same two functions.

Going through the dispatcher costs host time, about 0.07 ms per op call on a 2-core CPU
(``benchmarks/host_overhead.py``), and host time is what bounds small batches on a GPU.
``CustomOp`` therefore calls the Python implementation itself when nothing in the dispatcher
could act on the call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def dispatch_free(args: tuple) -> bool:
    """Whether calling an op's implementation directly does exactly what the dispatcher would:
    nothing for autograd to record (grad mode off, or no input requiring grad: the dispatch's
    integer tables), no ``torch.compile``/``torch.export``/``jit.trace`` trace, no functorch
    transform, no dispatch or torch-function mode, no profiler (which labels the op), and only
    plain tensors (no subclass such as DTensor or FakeTensor)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch._C._are_functorch_transforms_active() or is_in_torch_dispatch_mode():
        return False
    if torch._C._is_torch_function_mode_enabled() or torch.autograd._profiler_enabled():
        return False
    tensors = [arg for arg in args if isinstance(arg, torch.Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(type(t) in _PLAIN_TENSORS for t in tensors)


class CustomOp:
    """``fn`` registered as the custom op ``name`` (mutating none of its inputs).

    Calling it runs ``fn`` directly where ``dispatch_free`` allows, else the registered op.
    ``custom_op`` is the ``torch.library.CustomOpDef`` (for ``opcheck`` and ``register_*``).
    """

    def __init__(self, name: str, fn: Callable):
        self.name, self.impl = name, fn
        self.custom_op = torch.library.custom_op(name, fn, mutates_args=())
        namespace, op_name = name.split("::")
        self.overload = getattr(getattr(torch.ops, namespace), op_name).default  # what torch.compile traces
        self.fake: Callable | None = None
        functools.update_wrapper(self, fn)

    def register_fake(self, fn: Callable) -> Callable:
        """Register ``fn`` as the op's fake (shape) implementation: what compile and export
        trace, and what meta tensors run."""
        self.fake = fn
        return self.custom_op.register_fake(fn)

    def __call__(self, *args):
        if any(isinstance(arg, torch.Tensor) and arg.is_meta for arg in args):
            # Meta tensors hold shapes but no values (a model built on the meta device, say):
            # the fake implementation says what the op returns.
            return self.fake(*args)
        if dispatch_free(args):
            return self.impl(*args)
        return self.overload(*args)


def custom_op(name: str) -> Callable[[Callable], CustomOp]:
    """Decorator: ``@custom_op("moe_kernels::name")`` over the op's Python implementation."""
    return functools.partial(CustomOp, name)


def gradients(inputs: type[tuple], **grads: torch.Tensor | None) -> tuple:
    """What an op's autograd backward returns, one entry per input of the op in its schema's
    order (``inputs``, a NamedTuple of them): the gradients named in ``grads``, ``None`` for the
    rest."""
    unknown = set(grads) - set(inputs._fields)
    if unknown:
        raise TypeError(f"{inputs.__name__} has no inputs {sorted(unknown)}")
    return tuple(grads.get(name) for name in inputs._fields)


def differentiable(op: CustomOp, setup_context: Callable, backward: Callable) -> Callable:
    """Register ``setup_context``/``backward`` as ``op``'s autograd; return ``apply(*args)``,
    which runs ``op(*args)`` through an ``autograd.Function`` with that same autograd."""
    op.custom_op.register_autograd(backward, setup_context=setup_context)
    name = op.name.split("::")[1]

    def forward(*args):
        return op(*args)

    function = type(
        name.title().replace("_", "") + "Function",
        (torch.autograd.Function,),
        {
            "__doc__": f"``{op.name}`` as an ``autograd.Function`` (see ``moe_kernels.library``).",
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
        },
    )

    def apply(*args):
        # With grad mode off there is nothing to record, and torch.compile cannot trace an
        # autograd.Function there (torch 2.13): call the op itself.
        if torch.is_grad_enabled():
            return function.apply(*args)
        return op(*args)

    apply.__doc__ = f"Run ``{op.name}``, differentiably when grad mode is on."
    return apply
