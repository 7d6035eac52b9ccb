"""A routing defined here alone, with no file of the package touched: the plug-in point of
``Router``. Each token goes to ``k`` experts drawn at random (distinct, from a generator the router
owns, so both backends draw the same), weighted by its softmax scores of those experts; the
layer trains with it through the Triton kernels and the PyTorch path."""

import pytest
import torch

import moe_kernels as mk
from moe_kernels import dispatch, reference
from tests.moe_kernels.helpers import BACKENDS, DEVICE


class RandomRouter(mk.Router):
    """Each token to ``top_k`` distinct experts drawn at random; weights from the router's scores."""

    def __init__(self, dim: int, num_experts: int, top_k: int, seed: int = 0):
        super().__init__(dim, num_experts, top_k)
        self.generator = torch.Generator().manual_seed(seed)

    def route(self, tokens: torch.Tensor, logits: torch.Tensor, backend: str) -> mk.Routed:
        draws = torch.rand(tokens.shape[0], self.num_experts, generator=self.generator)
        experts = draws.argsort(dim=1)[:, : self.top_k].to(tokens.device)
        weights = torch.softmax(logits.float(), dim=-1).gather(1, experts)  # differentiable in the router
        return mk.Routed(
            dispatch.by_token(experts, weights, self.num_experts, backend),
            record=lambda: (experts, weights),
        )


def _layer(backend: str) -> mk.MoE:
    torch.manual_seed(0)
    return mk.MoE(16, 24, 4, router=RandomRouter(16, 4, 2), num_shared_experts=1, backend=backend).to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_new_router_runs_forward_and_backward_as_the_reference(backend):
    layer = _layer(backend)
    recorded = []
    layer.on_route = lambda experts, weights: recorded.append((experts, weights))
    x = torch.randn(2, 7, 16, device=DEVICE, requires_grad=True)
    y = layer(x)
    (experts, weights), tokens = recorded[0], x.reshape(-1, 16)
    want = reference.moe_ffn(tokens, weights, experts, layer.w_in, layer.w_out) + layer.shared(tokens)
    torch.testing.assert_close(y.reshape(-1, 16), want, atol=1e-5, rtol=1e-5)
    assert layer.aux_loss.item() == 0.0  # no loss of its own
    assert layer.expert_counts.tolist() == torch.bincount(experts.reshape(-1), minlength=4).tolist()
    params = [x, *layer.parameters()]
    got = torch.autograd.grad(y.square().sum(), params, retain_graph=True)  # the weights' graph is shared
    expected = torch.autograd.grad(want.square().sum(), params)
    for g, w in zip(got, expected):
        torch.testing.assert_close(g.reshape(w.shape), w, atol=1e-4, rtol=1e-4)


def test_a_new_router_trains_a_layer_on_both_backends_alike():
    """Twenty AdamW steps on a regression target: the loss falls, and the Triton kernels and the
    PyTorch path take the same steps (the same draws, the same updates up to rounding)."""
    target = torch.nn.Linear(16, 16).to(DEVICE).requires_grad_(False)
    x = torch.randn(64, 16, device=DEVICE)
    losses = {}
    for backend in BACKENDS:
        layer = _layer(backend)
        optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2)
        losses[backend] = []
        for _ in range(20):
            loss = (layer(x) - target(x)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[backend].append(loss.item())
        assert losses[backend][-1] < 0.5 * losses[backend][0]
    if len(BACKENDS) == 2:
        torch.testing.assert_close(torch.tensor(losses["triton"]), torch.tensor(losses["torch"]), atol=1e-4, rtol=1e-3)
