"""Shared helpers for the core tests: build a layer with every parameter randomised, and
compare two computations on outputs and on every gradient (scattermoe style).

Shapes follow the package legend: T tokens, D model dim, E experts, K experts per token.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Hypothesis keeps no example database: it would write .hypothesis/ into the working directory.
settings.register_profile("dualroute", database=None)
settings.load_profile("dualroute")

from dualroute.layer import MoEConfig, MoELayer
from dualroute.routing import RouterOptions

@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one intra-op thread and restore the count afterwards. Tiny models gain nothing
    from a second thread, and on a busy shared machine waiting OpenMP threads make small ops slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# (atol, rtol) by dtype: float64 is compared almost bit for bit, float32 to rounding.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5)}


def make_layer(
    *,
    dim: int = 6,
    hidden: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    bias_scale: float = 0.5,
    router: RouterOptions | None = None,
    **cfg,
) -> MoELayer:
    """An eval-mode layer whose parameters AND correction-bias buffers are all random.

    Expert biases start at zero and correction biases at zero; randomising them makes
    their gradients (and their effect on selection) visible to the tests.
    """
    torch.manual_seed(seed)
    layer = MoELayer(MoEConfig(dim=dim, hidden=hidden, router=router or RouterOptions(), **cfg))
    return randomise(layer, seed, bias_scale).to(dtype).eval()


def randomise(layer: MoELayer, seed: int, bias_scale: float) -> MoELayer:
    """Every parameter of ``layer`` random (scale 0.5), and its correction-bias buffers (``bias_scale``)."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        for name in ("expert_bias_E", "group_bias_G"):
            buf = getattr(layer.router, name)
            if buf is not None:
                buf.copy_(torch.randn(buf.shape, generator=gen) * bias_scale)
    return layer


def random_input(*shape: int, dtype: torch.dtype = torch.float64, seed: int = 123) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).requires_grad_(True)


def output_and_grads(module: torch.nn.Module, x: torch.Tensor, fn) -> tuple[torch.Tensor, dict]:
    """Run ``fn(x) -> y``, backprop a fixed random cotangent; return y and every gradient.

    The result maps ``"input"`` and each parameter name to its gradient (None if unused).
    A random cotangent (not ``y.sum()``) makes every output element matter.
    """
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    gen = torch.Generator().manual_seed(7)
    cotangent = torch.randn(y.shape, generator=gen).to(y.dtype)
    params = dict(module.named_parameters())
    grads = torch.autograd.grad(y, [x, *params.values()], cotangent, allow_unused=True)
    return y.detach(), dict(zip(["input", *params], grads))


def assert_same_grads(got: dict, want: dict, dtype: torch.dtype) -> None:
    """Same keys; unused (None) on one side must be None or exactly zero on the other."""
    atol, rtol = TOL[dtype]
    assert got.keys() == want.keys()
    for name in want:
        g, w = got[name], want[name]
        if g is None or w is None:
            other = w if g is None else g
            assert other is None or torch.count_nonzero(other) == 0, f"grad of {name}: one side unused"
            continue
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m: f"grad of {name}: {m}")


def fast(layer: MoELayer):
    return lambda x: layer(x)[0]


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _in_a_temporary_directory(tmp_path, monkeypatch):
    """Every test runs in its own empty working directory: no test reads or writes the clone (a
    ``runs/`` left there by ``dualroute train`` must not change what the tests see)."""
    monkeypatch.chdir(tmp_path)
    yield
