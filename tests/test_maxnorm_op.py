"""Tests for bigltr.ops.maxnorm_ (both backends; Triton runs in its interpreter, TRITON_INTERPRET=1 from conftest).

Inputs are fresh random data on every run. Each test prints its seed (pytest shows it for a failing test) and
puts it in assertion messages; rerun a failure with MAXNORM_TEST_SEED=<seed>.
The reference is an independent float64 row loop in numpy.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
import time

import numpy as np
import pytest
import torch

from bigltr.ops import flat_row_sumsq, flat_rows_scale_, maxnorm_, maxnorm_scales

HAVE_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# allowed error, in units in the last place of the exact (float64) result. bf16/fp16: the op rounds once, to
# nearest, from an fp32 value a few fp32 ulps off, so half an ulp plus ~0.001 (this catches truncation, which
# Triton's interpreter does by default for fp32 -> bf16). fp32: the summed squares, sqrt, power, division and
# product each add error, the power in the scale multiplying the norm's: the exact rule divides by ||w|| (power 1;
# measured <= 3.2 ulp), the official one by ||w||**(tau*tau) (measured 6.3 ulp at tau*tau = 2).
MAX_ULPS = {torch.float32: 8, torch.bfloat16: 0.51, torch.float16: 0.51}


def max_ulps(dtype: torch.dtype, tau: float, projection: str = "exact") -> float:
    power = tau * tau if projection == "official" else 1.0
    return MAX_ULPS[dtype] * max(1.0, power) if dtype == torch.float32 else MAX_ULPS[dtype]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@pytest.fixture
def gen():
    seed = int(os.environ.get("MAXNORM_TEST_SEED", time.time_ns() % 2**31))
    print(f"MAXNORM_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


def _seed(gen: torch.Generator) -> str:
    return f"(seed {gen.initial_seed()}; rerun with MAXNORM_TEST_SEED={gen.initial_seed()})"


def reference(w: torch.Tensor, radius: float, tau: float, projection: str = "exact") -> tuple[np.ndarray, np.ndarray]:
    """float64 row loop, independent of the op: returns (expected values, clipped-row mask).
    exact: onto the ball {||w||**tau <= radius}; official: ShadeAlsha/LTR-weight-balancing's MaxNorm_via_PGD.PGD
    (n = ||w||**tau; rows with n > radius are multiplied by radius / n**tau)."""
    out = w.double().numpy().copy()
    clipped = np.zeros(out.shape[0], dtype=bool)
    for i in range(out.shape[0]):
        norm = math.sqrt(float(np.dot(out[i], out[i])))
        if projection == "exact":
            if norm > radius ** (1 / tau):
                out[i] *= radius ** (1 / tau) / norm
                clipped[i] = True
        elif norm**tau > radius:
            out[i] *= radius / (norm**tau) ** tau
            clipped[i] = True
    return out, clipped


def ulp(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """One unit in the last place of `dtype` at |x| (subnormal spacing near zero)."""
    fi = torch.finfo(dtype)
    mant = round(-math.log2(fi.eps))
    _, e = np.frexp(np.abs(x))  # |x| = m * 2**e, m in [0.5, 1)
    return np.maximum(np.ldexp(1.0, e - 1 - mant), fi.tiny * fi.eps)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


def make_case(gen, m: int, n: int, dtype: torch.dtype, tau: float):
    """A weight whose rows are a random mix of: clipped, inside the ball, zero, and (tau in {1, 2}) exactly at
    the radius. Norm ratios keep a >= 2.5% margin from the radius so fp32 and float64 always agree on which
    rows are clipped; rows at the radius are built from +-0.5 entries so their norm is exact in every dtype."""
    k = max(kk for kk in (1, 4, 9, 16) if kk <= max(n, 1))
    edge = 0.5 * math.sqrt(k)  # exact norm of an at-the-radius row
    radius = float(np.float32(edge**tau))  # exact for tau in {1, 2}
    kind = torch.randint(0, 4, (m,), generator=gen)  # 0 clipped, 1 inside, 2 zero, 3 at the radius
    if tau not in (1.0, 2.0):
        kind[kind == 3] = 1
    w = torch.randn(m, n, generator=gen, dtype=torch.float64)
    w /= w.norm(dim=1, keepdim=True).clamp_min(1e-30)
    u = torch.rand(m, generator=gen, dtype=torch.float64)
    ratio = torch.where(kind == 0, 1.1 + 3.0 * u, 0.05 + 0.9 * u)  # ||w|| / edge
    w *= (edge * ratio).unsqueeze(1)
    w[kind == 2] = 0.0
    for i in torch.nonzero(kind == 3).flatten().tolist():
        w[i] = 0.0
        cols = torch.randperm(n, generator=gen)[:k]
        w[i, cols] = 0.5 * (torch.randint(0, 2, (k,), generator=gen, dtype=torch.float64) * 2 - 1)
    return w.to(dtype), radius, kind


def check(out: torch.Tensor, w_in: torch.Tensor, radius: float, tau: float, gen, what: str = "",
          projection: str = "exact"):
    """Compare `out` (the op's result) with the float64 reference computed from `w_in` (a copy of the input)."""
    ref, clipped = reference(w_in, radius, tau, projection)
    got = out.double().numpy()
    err_ulps = np.abs(got - ref) / ulp(ref, out.dtype)
    worst = float(err_ulps.max()) if err_ulps.size else 0.0
    limit = max_ulps(out.dtype, tau, projection)
    assert worst <= limit, f"{what}: max error {worst:.2f} ulp > {limit} {_seed(gen)}"
    keep = torch.from_numpy(~clipped)
    assert torch.equal(bits(out[keep]), bits(w_in[keep])), f"{what}: an unclipped row changed {_seed(gen)}"
    assert not torch.isnan(out).any(), f"{what}: NaN in output {_seed(gen)}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", [(37, 129), (1, 1), (5, 3000), (300, 200)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_float64_reference(gen, backend, dtype, shape):
    w, radius, kind = make_case(gen, *shape, dtype, 1.0)
    out = w.clone()
    ret = maxnorm_(out, radius, backend=backend)
    assert ret is out
    check(out, w, radius, 1.0, gen, f"{backend} {dtype} {shape}")
    # the projection lands on the sphere: clipped rows have norm == radius up to rounding of the dtype
    norms = out.double().norm(dim=1)
    tol = 4 * torch.finfo(dtype).eps * radius
    assert bool((norms <= radius + tol).all()), f"a row is still outside the ball {_seed(gen)}"
    assert bool((norms[kind == 2] == 0).all()), f"a zero row changed {_seed(gen)}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("tau", [0.5, 1.0, 1.5, 2.0])
@pytest.mark.parametrize("projection", ["exact", "official"])
@pytest.mark.parametrize("shape", [(61, 77), (5, 1100)], ids=lambda s: f"{s[0]}x{s[1]}")  # 1100: two-pass kernel
def test_tau_and_projection_rules(gen, backend, dtype, tau, projection, shape):
    """Both rules against the float64 reference, rows below / above / at the radius and zero rows, with a float and
    a tensor radius. The exact rule lands every clipped row on the sphere
    ||w|| = radius**(1/tau), i.e. ||w||**tau = radius."""
    w, radius, kind = make_case(gen, *shape, dtype, tau)
    out = w.clone()
    maxnorm_(out, radius, tau=tau, projection=projection, backend=backend)
    what = f"{backend} {projection} tau={tau}"
    check(out, w, radius, tau, gen, what, projection)
    # a tensor radius (radius**(1/tau) then computed in fp32 on its device, with no host sync)
    by_tensor = maxnorm_(w.clone(), torch.tensor(radius), tau=tau, projection=projection, backend=backend)
    check(by_tensor, w, radius, tau, gen, what + " tensor radius", projection)
    if projection == "exact":
        norms = out.double().norm(dim=1)
        tol = 4 * torch.finfo(dtype).eps
        assert bool((norms**tau <= radius * (1 + tau * tol)).all()), f"{what}: a row outside the ball {_seed(gen)}"
        on = torch.from_numpy(reference(w, radius, tau)[1])
        torch.testing.assert_close(norms[on], torch.full_like(norms[on], radius ** (1 / tau)), rtol=tol, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_rules_agree_bitwise_at_tau_1(gen, backend, dtype):
    """At tau = 1 both rules are the plain projection: same bits as each other and, on the torch path, as the
    formula this op used before the rules existed (w * where(||w|| > r, r / ||w||, 1), fp32, one rounding)."""
    w, radius, _ = make_case(gen, 45, 130, dtype, 1.0)
    exact = maxnorm_(w.clone(), radius, projection="exact", backend=backend)
    official = maxnorm_(w.clone(), radius, tau=1, projection="official", backend=backend)
    assert torch.equal(bits(exact), bits(official)), f"{backend}: the rules differ at tau=1 {_seed(gen)}"
    if backend == "torch":
        w32 = w.float()
        n = torch.linalg.vector_norm(w32, dim=1)
        before = (w32 * torch.where(n > radius, radius / n, 1.0).unsqueeze(1)).to(dtype)
        assert torch.equal(bits(exact), bits(before)), f"tau=1 result changed {_seed(gen)}"


def test_official_rule_matches_the_official_code(gen):
    """The official repo's PGD step (utils/regularizers.py, MaxNorm_via_PGD.PGD), reduced to its tensor operations,
    against projection="official"; and how far it is from the exact projection at tau = 1.5."""
    tau, w = 1.5, torch.randn(100, 64, generator=gen) * torch.linspace(0.2, 2.0, 100).unsqueeze(1)
    n0 = w.norm(dim=1)
    radius = float(n0.min() + 0.1 * (n0.max() - n0.min()))
    official = w.clone()
    n = (torch.linalg.norm(official, ord=2, dim=1) ** tau).unsqueeze(-1)
    idx = (n > radius).squeeze()
    official[idx] = official[idx] * (radius / n[idx].squeeze() ** tau).unsqueeze(-1)
    ours = maxnorm_(w.clone(), radius, tau=tau, projection="official", backend="torch")
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-6)
    exact = maxnorm_(w.clone(), radius, tau=tau, backend="torch")
    print(f"tau=1.5: max |exact - official| = {float((exact - official).abs().max()):.3g}, "
          f"row norms after: exact max {float(exact.norm(dim=1).max()):.4f} (radius**(1/tau) = "
          f"{radius ** (1 / tau):.4f}), official max {float(official.norm(dim=1).max()):.4f}")
    assert float((exact - official).abs().max()) > 1e-2  # the rules really differ for tau != 1


def _strided(kind: str, m: int, n: int, dtype):
    """Return (base storage filled with a sentinel, 2-D view of shape (m, n) into it)."""
    if kind == "colslice":
        base = torch.full((m, n + 60), -777.0, dtype=dtype)
        return base, base[:, 3 : 3 + n]
    if kind == "transposed":
        base = torch.full((n, m), -777.0, dtype=dtype)
        return base, base.t()
    if kind == "rowstep_colstep":
        base = torch.full((3 * m, 2 * n + 5), -777.0, dtype=dtype)
        return base, base[1::3, 5::2]
    raise AssertionError(kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["colslice", "transposed", "rowstep_colstep"])
def test_strided_views_edit_in_place(gen, backend, dtype, kind):
    m, n = 43, 47
    w, radius, _ = make_case(gen, m, n, dtype, 1.0)
    base, view = _strided(kind, m, n, dtype)
    view.copy_(w)
    mask_base, mask_view = _strided(kind, m, n, torch.float32)  # the same slicing, applied to a mask
    mask_base.zero_()
    mask_view.fill_(1.0)
    inside = mask_base.bool()
    before = bits(base).clone()

    maxnorm_(view, radius, backend=backend)

    assert torch.equal(bits(base)[~inside], before[~inside]), f"{kind}: an element outside the view changed"
    check(view.clone(), w, radius, 1.0, gen, f"{backend} {kind}")  # the result sits in the original storage


@pytest.mark.parametrize("backend", BACKENDS)
def test_radius_as_tensor_and_edge_radii(gen, backend):
    w, radius, kind = make_case(gen, 50, 33, torch.float32, 1.0)
    by_float = maxnorm_(w.clone(), radius, backend=backend)
    for r in (torch.tensor(radius), torch.tensor(radius, dtype=torch.float64), torch.tensor([radius])):
        by_tensor = maxnorm_(w.clone(), r, backend=backend)
        assert torch.equal(by_tensor, by_float), f"tensor radius {r.dtype} {tuple(r.shape)} differs {_seed(gen)}"
    # radius 0 zeroes every row; zero rows stay zero (no 0/0 NaN)
    zeroed = maxnorm_(w.clone(), 0.0, backend=backend)
    assert torch.equal(zeroed, torch.zeros_like(w))
    # an infinite radius changes nothing
    assert torch.equal(bits(maxnorm_(w.clone(), math.inf, backend=backend)), bits(w))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 7), (0, 0), (4, 0)])
def test_empty_shards(backend, shape):
    w = torch.empty(shape)
    assert maxnorm_(w, 1.0, backend=backend) is w
    assert maxnorm_(w, torch.tensor(1.0), backend=backend) is w


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warns about NaN arithmetic inside the interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_triton_does_not_write_unclipped_rows(gen, dtype):
    """Poison: unclipped rows hold a signaling-NaN payload, which any arithmetic write (x * 1.0) would turn into
    a quiet NaN. The Triton kernel must leave those rows' bits alone (the torch path, which multiplies every row
    by its scale, does not promise this for NaN rows)."""
    w, radius, kind = make_case(gen, 40, 70, dtype, 1.0)
    snan = {torch.float32: 0x7F800001, torch.bfloat16: 0x7F81}[dtype]
    poisoned = torch.full((w.shape[1],), snan, dtype=INT_VIEW[dtype]).view(dtype)
    rows = torch.arange(0, w.shape[0], 3)
    w[rows] = poisoned
    out = w.clone()
    maxnorm_(out, radius, backend="triton")
    assert torch.equal(bits(out[rows]), bits(w[rows])), f"the kernel wrote to an unclipped (NaN) row {_seed(gen)}"
    rest = torch.ones(w.shape[0], dtype=torch.bool)
    rest[rows] = False
    check(out[rest], w[rest], radius, 1.0, gen, "poisoned")


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_requiring_grad(backend):
    p = torch.nn.Parameter(torch.full((6, 4), 2.0))  # every row has norm 4
    version = p._version
    assert maxnorm_(p, 1.0, backend=backend) is p
    assert p.grad_fn is None and p.requires_grad
    assert p._version > version, "autograd's version counter must see the in-place edit"
    torch.testing.assert_close(p.detach().norm(dim=1), torch.ones(6))


def test_fsdp2_style_dtensor(tmp_path):
    """A DTensor with whole rows per rank (FSDP2's Shard(0)) is projected through its local shard; a DTensor
    that splits rows across ranks is refused. One-process gloo group, so it runs anywhere."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        full = torch.full((6, 4), 2.0)
        rows = distribute_tensor(full.clone(), mesh, [Shard(0)])
        assert maxnorm_(rows, 1.0) is rows
        torch.testing.assert_close(rows.full_tensor().norm(dim=1), torch.ones(6))
        cols = distribute_tensor(full.clone(), mesh, [Shard(1)])
        with pytest.raises(ValueError, match="rows must be whole"):
            maxnorm_(cols, 1.0)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors(backend):
    w = torch.randn(4, 5)
    with pytest.raises(ValueError, match="2-D"):
        maxnorm_(torch.randn(2, 3, 4), 1.0, backend=backend)
    with pytest.raises(ValueError, match="2-D"):
        maxnorm_(torch.randn(5), 1.0, backend=backend)
    with pytest.raises(ValueError, match="radius must be >= 0"):
        maxnorm_(w, -1.0, backend=backend)
    with pytest.raises(ValueError, match="radius must be >= 0"):
        maxnorm_(w, float("nan"), backend=backend)
    with pytest.raises(ValueError, match="radius must be >= 0"):
        maxnorm_(w, torch.tensor(-0.5), backend=backend)
    with pytest.raises(ValueError, match="one element"):
        maxnorm_(w, torch.ones(2), backend=backend)
    with pytest.raises(TypeError, match="radius"):
        maxnorm_(w, "1.0", backend=backend)
    with pytest.raises(TypeError, match="floating"):
        maxnorm_(torch.ones(4, 5, dtype=torch.int32), 1.0, backend=backend)
    with pytest.raises(ValueError, match="tau"):
        maxnorm_(w, 1.0, tau=0.0, backend=backend)
    with pytest.raises(ValueError, match="zero stride"):
        maxnorm_(torch.randn(1, 5).expand(4, 5), 1.0, backend=backend)
    with pytest.raises(ValueError, match="unknown backend"):
        maxnorm_(w, 1.0, backend="cuda")
    with pytest.raises(ValueError, match="unknown projection"):
        maxnorm_(w, 1.0, projection="paper", backend=backend)


@needs_triton
def test_triton_errors(monkeypatch):
    with pytest.raises(TypeError, match="triton backend supports"):
        maxnorm_(torch.randn(3, 4, dtype=torch.float64), 1.0, backend="triton")
    # the torch path also takes fp64 (accumulating in fp64)
    w64 = torch.randn(3, 4, dtype=torch.float64) * 10
    maxnorm_(w64, 1.0, backend="torch")
    torch.testing.assert_close(w64.norm(dim=1), torch.ones(3, dtype=torch.float64))
    from bigltr.ops import maxnorm_triton

    monkeypatch.setattr(maxnorm_triton, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        maxnorm_(torch.randn(3, 4), 1.0, backend="triton")


def test_import_and_torch_path_without_triton(monkeypatch):
    """`import bigltr.ops` must not import triton; auto on CPU takes the torch path; forcing triton explains."""
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    for name in ("bigltr.ops", "bigltr.ops.maxnorm", "bigltr.ops.maxnorm_triton"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    ops = importlib.import_module("bigltr.ops")
    w = torch.full((3, 4), 1.0)
    ops.maxnorm_(w, 1.0)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(3))
    with pytest.raises(RuntimeError, match="needs the triton package"):
        ops.maxnorm_(w, 1.0, backend="triton")


# ---- sgd_maxnorm_: one SGD step then the projection, fused on the Triton path ----

SGD_CONFIGS = {
    "momentum_wd": dict(momentum=0.9, weight_decay=5e-4),
    "dampening": dict(momentum=0.9, dampening=0.1),
    "nesterov_wd": dict(momentum=0.9, weight_decay=1e-3, nesterov=True),
    "plain_wd": dict(weight_decay=5e-4),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(SGD_CONFIGS))
@pytest.mark.parametrize("shape", [(37, 129), (5, 1100)], ids=lambda s: f"{s[0]}x{s[1]}")  # 1100: two-pass kernel
def test_sgd_maxnorm_matches_torch_sgd_then_maxnorm(gen, backend, config, shape):
    from bigltr.ops import sgd_maxnorm_

    hyper = SGD_CONFIGS[config]
    w0 = torch.randn(*shape, generator=gen)
    radius = float(w0.norm(dim=1).median())
    p = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([p], lr=0.1, **hyper)
    w, buf = w0.clone(), torch.full_like(w0, float("nan"))  # the first step must ignore the buffer's content
    for step in range(3):
        g = torch.randn(*shape, generator=gen)
        p.grad = g.clone()
        opt.step()
        maxnorm_(p.data, radius, backend="torch")
        sgd_maxnorm_(w, g, buf if hyper.get("momentum") else None, lr=0.1, radius=radius, first_step=step == 0,
                     backend=backend, **hyper)
        msg = f"{backend} {config} step {step} {_seed(gen)}"
        torch.testing.assert_close(w, p.detach(), rtol=1e-5, atol=1e-6, msg=msg)
        if hyper.get("momentum"):
            torch.testing.assert_close(buf, opt.state[p]["momentum_buffer"], rtol=1e-5, atol=1e-6, msg=msg)
    assert bool((w.norm(dim=1) <= radius * (1 + 1e-5)).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("projection", ["exact", "official"])
@pytest.mark.parametrize("shape", [(37, 129), (5, 1100)], ids=lambda s: f"{s[0]}x{s[1]}")  # 1100: two-pass kernel
def test_sgd_maxnorm_projection_rules(gen, backend, projection, shape):
    """The fused step with tau != 1 under both rules equals torch.optim.SGD then maxnorm_ (torch path, already
    checked against the float64 reference above)."""
    from bigltr.ops import sgd_maxnorm_

    tau = 1.5
    w0 = torch.randn(*shape, generator=gen)
    radius = float(w0.norm(dim=1).median()) ** tau
    p = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=5e-4)
    w, buf = w0.clone(), torch.zeros_like(w0)
    for step in range(2):
        g = torch.randn(*shape, generator=gen)
        p.grad = g.clone()
        opt.step()
        maxnorm_(p.data, radius, tau=tau, projection=projection, backend="torch")
        sgd_maxnorm_(w, g, buf, lr=0.1, radius=radius, momentum=0.9, weight_decay=5e-4, first_step=step == 0,
                     tau=tau, projection=projection, backend=backend)
        torch.testing.assert_close(w, p.detach(), rtol=1e-5, atol=1e-6, msg=f"{backend} step {step} {_seed(gen)}")


@needs_triton
@pytest.mark.parametrize("shape", [(40, 70), (6, 1100)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_sgd_maxnorm_bf16_backends_agree(gen, shape):
    """bf16 weight and buffer: both backends compute in fp32 and round once, so they agree to within one ulp."""
    from bigltr.ops import sgd_maxnorm_

    w0 = torch.randn(*shape, generator=gen).to(torch.bfloat16)
    g = torch.randn(*shape, generator=gen).to(torch.bfloat16)
    b0 = torch.randn(*shape, generator=gen).to(torch.bfloat16)
    radius = float(w0.float().norm(dim=1).median())
    out = {}
    for backend in ("torch", "triton"):
        w, b = w0.clone(), b0.clone()
        sgd_maxnorm_(w, g, b, lr=0.5, radius=radius, momentum=0.9, weight_decay=1e-2, backend=backend)
        out[backend] = (w, b)
    for i in range(2):
        diff = (bits(out["torch"][i]).int() - bits(out["triton"][i]).int()).abs().max().item()
        assert diff <= 1, f"{'weight' if i == 0 else 'buffer'} differs by {diff} ulp between backends {_seed(gen)}"


def test_sgd_maxnorm_errors():
    from bigltr.ops import sgd_maxnorm_

    w, g = torch.randn(4, 5), torch.randn(4, 5)
    with pytest.raises(ValueError, match="momentum_buffer"):
        sgd_maxnorm_(w, g, lr=0.1, radius=1.0, momentum=0.9)
    with pytest.raises(ValueError, match="nesterov"):
        sgd_maxnorm_(w, g, torch.zeros(4, 5), lr=0.1, radius=1.0, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError, match="grad must be a tensor of the weight's shape"):
        sgd_maxnorm_(w, torch.randn(5, 4), lr=0.1, radius=1.0)
    with pytest.raises(ValueError, match="radius must be >= 0"):
        sgd_maxnorm_(w, g, lr=0.1, radius=-1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("tau", [1.0, 2.0, 1.5])
@pytest.mark.parametrize("projection", ["exact", "official"])
@pytest.mark.parametrize("shape", [(37, 19), (5, 300), (1, 7), (64, 3)])
def test_flat_partitions_match_the_float64_reference(gen, dtype, tau, projection, shape):
    """MaxNorm over flat 1-D slices (DeepSpeed ZeRO partitions): per-slice partial row sums of squares, added (what
    the all-reduce does), then every slice scaled in place. Same result as the float64 reference, unclipped rows
    bit for bit. Tilings: ZeRO's equal, padded partitions for 1-5 ranks (the last ones short or empty), and random
    cuts (inside rows, within one row, empty slices)."""
    m, n = shape
    w, radius, _ = make_case(gen, m, n, dtype, tau)
    numel = m * n
    tilings = []
    for ranks in (1, 2, 3, 5):
        part = -(-numel // ranks)
        tilings.append([(min(r * part, numel), min((r + 1) * part, numel)) for r in range(ranks)])
    bounds = [0, *sorted(torch.randint(0, numel + 1, (6,), generator=gen).tolist()), numel]
    tilings.append(list(zip(bounds[:-1], bounds[1:])))
    for tiling in tilings:
        out = w.clone()
        flat = out.view(-1)
        total = sum(flat_row_sumsq(flat[a:b], a, m, n) for a, b in tiling)
        scales = maxnorm_scales(total, torch.tensor(radius), tau=tau, projection=projection)
        for a, b in tiling:
            flat_rows_scale_(flat[a:b], a, n, scales)
        check(out, w, radius, tau, gen, f"{projection} {tuple(shape)} tiling {tiling}", projection)


def test_flat_row_sumsq_rejects_a_slice_outside_the_weight():
    with pytest.raises(ValueError, match="1-D slice"):
        flat_row_sumsq(torch.zeros(5), 8, 3, 4)
