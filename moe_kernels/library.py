"""One autograd definition serving both ways of calling a custom op.

Each op is a ``torch.library.custom_op`` (opaque to ``torch.compile`` and ``torch.export``, with a
fake implementation for shapes). ``register_autograd`` makes ``torch.ops.moe_kernels.<op>``
differentiable, but the ``autograd.Function`` that custom ops build for it has no
``setup_context``, so ``torch.func`` transforms refuse it. The public Python API therefore calls
the op through an ``autograd.Function`` in the ``setup_context`` style, built here from the very
same two functions (and, with grad mode off, calls the op directly).
"""

from __future__ import annotations

from typing import Callable

import torch


def differentiable(op, setup_context: Callable, backward: Callable) -> Callable:
    """Register ``setup_context``/``backward`` as ``op``'s autograd; return ``apply(*args)``,
    which runs ``op(*args)`` through an ``autograd.Function`` with that same autograd."""
    op.register_autograd(backward, setup_context=setup_context)
    namespace, name = op._qualname.split("::")
    overload = getattr(getattr(torch.ops, namespace), name).default  # what torch.compile traces

    def forward(*args):
        return overload(*args)

    function = type(name.title().replace("_", "") + "Function", (torch.autograd.Function,), {
        "__doc__": f"``{op._qualname}`` as an ``autograd.Function`` (see ``moe_kernels.library``).",
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
    })

    def apply(*args):
        # With grad mode off there is nothing to record, and torch.compile cannot trace an
        # autograd.Function there (torch 2.13): call the op itself.
        if torch.is_grad_enabled():
            return function.apply(*args)
        return overload(*args)

    apply.__doc__ = f"Run ``{op._qualname}``, differentiably when grad mode is on."
    return apply
