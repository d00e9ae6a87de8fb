#!/usr/bin/env python
"""Benchmark bigltr.ops.maxnorm_ against torch.renorm_ and the official code's boolean-indexing MaxNorm.

Not a test. Examples:
    python tools/bench_maxnorm.py                                  # GPU if there is one, else CPU (torch path)
    python tools/bench_maxnorm.py --device cuda --markdown --json maxnorm_gpu.json
    python tools/bench_maxnorm.py --device cpu --sizes 1000x2048 --dtype float32
    TRITON_INTERPRET=1 python tools/bench_maxnorm.py --device cpu --backends torch,triton --sizes 1000x2048

Per size, dtype and case ("mix": radius = median row norm, about half the rows clipped; "all": every row
clipped) it times each of these, every run starting from the same unprojected weight (restored outside the
timed region):
    ours[torch], ours[triton]   bigltr.ops.maxnorm_ with that backend
    renorm_                     weight.renorm_(2, 0, radius) (same semantics for tau=1, but scales by r/(norm+1e-7))
    official                    the official code's MaxNorm_via_PGD step (boolean indexing, tau=1)
    copy                        dst.copy_(src) of the same number of bytes: the device's copy bandwidth
Timing. CPU: wall clock of one call, median of --repeats runs after --warmup. CUDA: K launches on K distinct
weight buffers (K = --launches, default clamp(1 GiB / weight bytes, 2, 16)) are captured in one CUDA graph;
before each replay (untimed) the K buffers are re-filled from the pristine weight and a 256 MB write flushes
L2; CUDA events time the replay; time per launch = replay time / K, median of --repeats replays. An impl that
cannot be captured (it syncs with the host, like the official code's boolean indexing) is timed the same way
but with K eager launches between the events instead of a replay (column "timing": graph or eager; eager
times include Python launch overhead, about 0.06 ms a Triton launch, so they overstate small kernels).
The first H100 run (CUDA events around one launch) had fp32 times above copy bandwidth: its fp32 reference
renormed the pristine weight in place, so later runs found few rows to clip (fixed, and now asserted).
The graph also keeps the host's launch overhead out of the times.
Columns: eff GB/s = (read the whole weight + write the clipped rows) / time, the op's minimal traffic;
2x GB/s = (read + write the whole weight) / time; %copy = eff GB/s / copy GB/s; x renorm and x official =
their time / ours (> 1: ours is faster); maxdiff = max |result - fp32 renorm_ result, cast to the dtype|
(renorm_ divides by norm + 1e-7, so ~1e-7 relative differences are expected in fp32; one ulp in bf16/fp16).

Needs the package installed (``pip install -e .`` or ``make venv`` in the repository root).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch

from bigltr.ops import maxnorm_, sgd_maxnorm_

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INTERP_MAX_ELEMS = 4_000_000  # Triton's interpreter on CPU: only small sizes (it takes seconds per call)


def official_pgd(weight: torch.Tensor, thresh: float) -> None:
    """The official repo's MaxNorm_via_PGD step for tau=1, reduced to its tensor operations."""
    norms = torch.norm(weight, dim=1)
    idx = norms > thresh
    weight[idx] = weight[idx] / norms[idx].unsqueeze(1) * thresh


def _ref_f64(w: torch.Tensor, radius: float, tau: float):
    """float64 reference of maxnorm_'s default (exact) projection onto {||w||^tau <= radius}: rows with
    ||w|| > radius^(1/tau) scaled by radius^(1/tau) / ||w||. Returns (expected values, clipped-row mask)."""
    w64 = w.double()
    n = torch.linalg.vector_norm(w64, dim=1)
    r = radius ** (1.0 / tau)
    clip = n > r
    scale = torch.where(clip, r / torch.where(clip, n, torch.ones_like(n)), torch.ones_like(n))
    return w64 * scale.unsqueeze(1), clip


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    fi = torch.finfo(dtype)
    _, e = torch.frexp(x.abs())  # |x| = m * 2**e, m in [0.5, 1)
    mant = round(-torch.log2(torch.tensor(fi.eps)).item())
    return torch.ldexp(torch.ones_like(x), e - 1 - mant).clamp_min(fi.tiny * fi.eps)


def selfcheck(device: str, backends) -> bool:
    """Correctness sweep of maxnorm_ on this device (odd shapes, long rows, strided views, dtypes, tau, tensor
    radius, empty shard) against a float64 reference; also checks that a tensor radius causes no host sync."""
    gen = torch.Generator(device=device).manual_seed(1234)
    ok = True
    n_cases = 0
    shapes = [(37, 129), (1, 1), (5, 3000), (300, 200), (1000, 2048), (64, 5000), (3, 70000)]
    if device == "cpu":
        shapes = shapes[:4]  # the interpreter is slow
    for backend in backends:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for m, n in shapes:
                for view in ("contig", "colslice", "transposed", "rowstep_colstep"):
                    for tau in ((1.0, 2.0, 0.5) if view == "contig" else (1.0,)):
                        if view == "contig":
                            base = torch.randn(m, n, device=device, generator=gen).to(dtype)
                            w = base
                        elif view == "colslice":
                            base = torch.randn(m, n + 9, device=device, generator=gen).to(dtype)
                            w = base[:, 4 : 4 + n]
                        elif view == "transposed":
                            base = torch.randn(n, m, device=device, generator=gen).to(dtype)
                            w = base.t()
                        else:
                            base = torch.randn(2 * m, 2 * n + 3, device=device, generator=gen).to(dtype)
                            w = base[1::2, 3::2]
                        w.mul_(torch.rand(m, 1, device=device, generator=gen).to(dtype) + 0.5)
                        before = base.clone()
                        inside = torch.zeros(base.shape, dtype=torch.bool, device=device)
                        if view == "contig":
                            inside[:] = True
                        elif view == "colslice":
                            inside[:, 4 : 4 + n] = True
                        elif view == "transposed":
                            inside[:] = True
                        else:
                            inside[1::2, 3::2] = True
                        # radius halfway between two row norms near the median (about half the rows clipped),
                        # and rows within 1e-5 of it are not judged: fp32 and fp64 may classify them differently
                        norms = torch.linalg.vector_norm(w.double(), dim=1).sort().values
                        k = max(m // 2 - 1, 0)
                        mid = (norms[k] + norms[k + 1]) / 2 if m > 1 else norms[0] / 2
                        radius = float(mid**tau)
                        expected, clip = _ref_f64(w, radius, tau)
                        n_tau = torch.linalg.vector_norm(w.double(), dim=1) ** tau
                        judged = ((n_tau - radius).abs() > 1e-5 * radius).unsqueeze(1)
                        w_in = w.clone()
                        r_arg = torch.tensor(radius, device=device) if (m + n) % 2 else radius
                        maxnorm_(w, r_arg, tau=tau, backend=backend)
                        lim = 8 * max(1.0, tau) if dtype == torch.float32 else 0.51
                        if dtype == torch.float32 and backend == "torch" and view != "contig":
                            # torch reduces a strided row sequentially: error grows like sqrt(n)
                            lim = max(8.0, 0.5 * n**0.5) * max(1.0, tau)
                        err_ulp = (w.double() - expected).abs() / _ulp(expected, dtype)
                        err = (err_ulp * judged).max().item()
                        keep = ~clip & judged.squeeze(1)
                        same_unclipped = torch.equal(w[keep], w_in[keep])
                        outside_ok = torch.equal(base[~inside], before[~inside])
                        n_cases += 1
                        if not (err <= lim and same_unclipped and outside_ok):
                            ok = False
                            print(f"SELFCHECK FAIL {backend} {dtype} {m}x{n} {view} tau={tau}: err {err:.2f} ulp "
                                  f"(limit {lim}), unclipped rows same {same_unclipped}, outside same {outside_ok}")
        empty = torch.empty(0, 2048, device=device)
        maxnorm_(empty, 1.0, backend=backend)
        if device == "cuda":
            # a 0-d device radius must not synchronise with the host
            w = torch.randn(300, 2048, device=device)
            r = torch.tensor(40.0, device=device)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                maxnorm_(w, r, backend=backend)
            except RuntimeError as exc:
                ok = False
                print(f"SELFCHECK FAIL {backend}: host sync with a tensor radius: {exc}")
            finally:
                torch.cuda.set_sync_debug_mode("default")
    # fused SGD + MaxNorm against torch.optim.SGD then maxnorm_ (fp32, 3 steps, momentum and weight decay)
    sgd_shapes = [(37, 129), (1000, 2048), (64, 5000)] if device == "cuda" else [(37, 129), (5, 1100)]
    for backend in backends:
        for m, n in sgd_shapes:
            w0 = torch.randn(m, n, device=device, generator=gen)
            radius = float(torch.linalg.vector_norm(w0, dim=1).median())
            p = torch.nn.Parameter(w0.clone())
            opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=5e-4)
            w, buf = w0.clone(), torch.zeros_like(w0)
            for step in range(3):
                g = torch.randn(m, n, device=device, generator=gen)
                p.grad = g.clone()
                opt.step()
                maxnorm_(p.data, radius, backend="torch")
                sgd_maxnorm_(w, g, buf, lr=0.1, radius=radius, momentum=0.9, weight_decay=5e-4,
                             first_step=step == 0, backend=backend)
            n_cases += 1
            err_w = ((w - p.detach()).abs() / (1e-6 + p.detach().abs())).max().item()
            err_b = ((buf - opt.state[p]["momentum_buffer"]).abs()).max().item()
            if not (torch.allclose(w, p.detach(), rtol=1e-5, atol=1e-6)
                    and torch.allclose(buf, opt.state[p]["momentum_buffer"], rtol=1e-5, atol=1e-6)):
                ok = False
                print(f"SELFCHECK FAIL sgd_maxnorm_ {backend} {m}x{n}: weight rel err {err_w:.2e}, "
                      f"buffer err {err_b:.2e}")
    print(f"selfcheck on {device}, backends {list(backends)}: {n_cases} cases, {'PASS' if ok else 'FAIL'}")
    return ok


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", default=None, help="comma list of torch,triton (default: cuda both; cpu torch, "
                   "plus triton when TRITON_INTERPRET=1)")
    p.add_argument("--sizes", default="1000x2048,8142x2048,100000x2048", help="comma list of ROWSxCOLS")
    p.add_argument("--dtype", default="float32,bfloat16", help="comma list of " + ",".join(DTYPES))
    p.add_argument("--cases", default="mix,all", help="mix (about half the rows clipped) and/or all (every row)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (CUDA: graph replays) per measurement, "
                   "median (default cuda 25, cpu 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default cuda 5, cpu 1); on CUDA "
                   "each is K eager launches, before the capture")
    p.add_argument("--launches", type=int, default=None, metavar="K", help="CUDA: launches (distinct buffers) per "
                   "graph replay (default clamp(1 GiB / weight bytes, 2, 16))")
    p.add_argument("--no-baselines", action="store_true", help="skip renorm_ and official (quicker)")
    p.add_argument("--sgd", action="store_true", help="also time the fused sgd_maxnorm_ against torch.optim.SGD "
                   "followed by maxnorm_ (mix case)")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); on a shared, loaded "
                   "machine --threads 1 avoids stalls of several ms per op in OpenMP barriers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--selfcheck", action="store_true", help="first run a correctness sweep on the device "
                   "(exit status 1 if it fails)")
    p.add_argument("--selfcheck-only", action="store_true", help="run the correctness sweep and no timings")
    return p.parse_args(argv)


def default_launches(weight_bytes: int) -> int:
    """K for the CUDA timing: about 1 GiB of distinct buffers per replay, at least 2 and at most 16 launches."""
    return max(2, min(16, 2**30 // max(weight_bytes, 1)))


class CpuTimer:
    """Median wall time of one op(0) call over repeats, each run after restore() (untimed)."""

    mode = "wall"

    def __init__(self, repeats: int, warmup: int):
        self.repeats, self.warmup = repeats, warmup

    def __call__(self, op, k: int = 1, restore=None, name: str = "") -> tuple[float, str]:
        times = []
        for i in range(self.warmup + self.repeats):
            if restore is not None:
                restore()
            t0 = time.perf_counter()
            op(0)
            t = time.perf_counter() - t0
            if i >= self.warmup:
                times.append(t)
        return statistics.median(times), self.mode


class CudaGraphTimer:
    """Time per launch of op(i), i = 0..k-1 (k distinct buffers), from one CUDA graph holding all k launches.

    Each replay is preceded, outside the timed region, by restore() and an L2 flush. If the op syncs with the host
    or its capture fails, the same is timed with k eager launches between the events (mode "eager")."""

    def __init__(self, repeats: int, warmup: int):
        self.repeats, self.warmup = repeats, warmup
        # 256 MB of writes evicts any GPU L2 (50-60 MB on H100/H200), so small weights are not timed hot
        self.flush_buf = torch.empty(64 * 2**20, dtype=torch.float32, device="cuda")

    @staticmethod
    def _syncs(op) -> str | None:
        """Run op(0) with torch's sync debug mode set to error: the reason if it syncs with the host."""
        torch.cuda.synchronize()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sync debug mode is a prototype feature"
            torch.cuda.set_sync_debug_mode("error")
            try:
                op(0)
            except RuntimeError as exc:
                return f"syncs with the host ({str(exc).splitlines()[0][:80]})"
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        return None

    @staticmethod
    def _capture(op, k: int):
        """(graph, None) or (None, why not)."""
        cur = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(cur)
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g, stream=side):
                for i in range(k):
                    op(i)
        except Exception as exc:  # noqa: BLE001 - any capture failure means: time it eagerly
            g = None  # free the failed graph (not `del`: g is returned below)
            torch.cuda.set_stream(cur)  # a failed capture_end leaves the capture stream current
            torch.cuda.synchronize()
            return None, f"capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"
        torch.cuda.set_stream(cur)
        return g, None

    def __call__(self, op, k: int, restore=None, name: str = "") -> tuple[float, str]:
        for _ in range(max(1, self.warmup)):  # compiles the Triton kernels, creates optimizer state
            if restore is not None:
                restore()
            for i in range(k):
                op(i)
        torch.cuda.synchronize()
        why = self._syncs(op)
        graph = None
        if why is None:
            if restore is not None:
                restore()
            graph, why = self._capture(op, k)
        if graph is None:
            print(f"  ({name}: {why}; timed with {k} eager launches)", file=sys.stderr)
        times = []
        for r in range(1 + self.repeats):  # the first replay (graph upload) is not counted
            if restore is not None:
                restore()
            self.flush_buf.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            if graph is not None:
                graph.replay()
            else:
                for i in range(k):
                    op(i)
            end.record()
            end.synchronize()
            if r > 0:
                times.append(start.elapsed_time(end) / 1e3 / k)
        mode = "graph" if graph is not None else "eager"
        del graph
        return statistics.median(times), mode


def make_weight(m: int, n: int, dtype: torch.dtype, device: str, gen: torch.Generator) -> torch.Tensor:
    """Gaussian rows with norms spread over about [0.5, 1.5] x sqrt(n): a realistic mix of long and short rows."""
    w = torch.randn(m, n, device=device, generator=gen)
    w *= torch.empty(m, 1, device=device).uniform_(0.5, 1.5, generator=gen)
    return w.to(dtype)


def bench_one(m, n, dtype, case, backends, timer, args, gen):
    device = args.device
    cuda = device == "cuda"
    pristine = make_weight(m, n, dtype, device, gen)
    norms = torch.linalg.vector_norm(pristine, dim=1, dtype=torch.float32)
    # the setup may sync: a Python float radius is what the trainer passes too
    radius = float(norms.median()) if case == "mix" else 0.5 * float(norms.min())
    n_clip = int((norms > radius).sum())
    esize = pristine.element_size()
    bytes_min = m * n * esize + n_clip * n * esize  # read all + write clipped rows
    bytes_2x = 2 * m * n * esize
    # CUDA: k distinct buffers, one per launch of a replay (see CudaGraphTimer); CPU: one
    k = (args.launches or default_launches(m * n * esize)) if cuda else 1
    work = [torch.empty_like(pristine) for _ in range(k)]

    def restore():
        for w in work:
            w.copy_(pristine)

    restore()
    label = f"{m}x{n} {str(dtype).removeprefix('torch.')} {case}"

    # correctness reference: torch.renorm_ in fp32 (for bf16/fp16 a renorm in the dtype itself rounds twice).
    # copy=True: for fp32, .float() would return pristine itself and renorm_ would project it in place, so every
    # fp32 run would start from an already projected weight (few rows left to clip: too-fast, unphysical times)
    expected = pristine.to(torch.float32, copy=True).renorm_(2, 0, radius).to(dtype)
    dst = [torch.empty_like(pristine) for _ in range(k)]
    src = work if cuda else [pristine]  # CUDA: k distinct sources too; their contents do not matter
    t_copy, copy_mode = timer(lambda i: dst[i].copy_(src[i]), k, None, f"copy {label}")
    copy_gbs = bytes_2x / t_copy / 1e9
    dst = None  # free the copy targets; `del` would unbind a name the lambda above closes over

    impls = {}
    for b in backends:
        if b == "triton" and device == "cpu" and m * n > INTERP_MAX_ELEMS:
            print(f"  (skip ours[triton] at {m}x{n} on CPU: the interpreter is too slow for it)", file=sys.stderr)
            continue
        impls[f"ours[{b}]"] = (lambda i, b=b: maxnorm_(work[i], radius, backend=b))
    if not args.no_baselines:
        impls["renorm_"] = lambda i: work[i].renorm_(2, 0, radius)
        impls["official"] = lambda i: official_pgd(work[i], radius)

    n_clip_now = int((torch.linalg.vector_norm(pristine, dim=1, dtype=torch.float32) > radius).sum())
    assert n_clip_now == n_clip, f"the pristine weight changed: {n_clip_now} rows above the radius, was {n_clip}"
    results = {}
    for name, fn in impls.items():
        t, mode = timer(fn, k, restore, f"{name} {label}")
        # every buffer holds the result of the last run from the pristine weight
        maxdiff = max(float((w.float() - expected.float()).abs().max()) for w in work)
        results[name] = {"time_s": t, "maxdiff": maxdiff, "timing": mode}

    base = {"size": f"{m}x{n}", "dtype": str(dtype).removeprefix("torch."), "case": case,
            "clipped_pct": 100.0 * n_clip / m, "launches": k}
    rows = []
    for name, r in results.items():
        t = r["time_s"]
        rows.append({
            **base, "impl": name, "timing": r["timing"], "ms": t * 1e3,
            "eff_gbs": bytes_min / t / 1e9, "gbs_2x": bytes_2x / t / 1e9,
            "pct_copy": 100.0 * (bytes_min / t / 1e9) / copy_gbs,
            "x_renorm": results["renorm_"]["time_s"] / t if "renorm_" in results else None,
            "x_official": results["official"]["time_s"] / t if "official" in results else None,
            "maxdiff": r["maxdiff"],
        })
    rows.append({**base, "impl": "copy", "timing": copy_mode, "ms": t_copy * 1e3, "eff_gbs": copy_gbs,
                 "gbs_2x": copy_gbs, "pct_copy": 100.0, "x_renorm": None, "x_official": None, "maxdiff": None})
    pristine = work = src = expected = None  # free before empty_cache (closures hold these names)
    if cuda:
        torch.cuda.empty_cache()
    return rows


def bench_sgd(m, n, dtype, backends, timer, args, gen):
    """Fused sgd_maxnorm_ vs torch.optim.SGD(momentum=0.9, weight_decay=5e-4).step() then maxnorm_.
    Minimal traffic of one step: read weight, grad, buffer; write weight, buffer (5 tensors).
    On CUDA each of the k launches has its own weight, grad, momentum buffer (and optimizer)."""
    device = args.device
    cuda = device == "cuda"
    pristine = make_weight(m, n, dtype, device, gen)
    radius = float(torch.linalg.vector_norm(pristine, dim=1, dtype=torch.float32).median())
    esize = pristine.element_size()
    k = (args.launches or default_launches(m * n * esize)) if cuda else 1
    grads = [(0.01 * torch.randn(m, n, device=device, generator=gen)).to(dtype) for _ in range(k)]
    bytes_min = 5 * pristine.numel() * esize
    work = [torch.empty_like(pristine) for _ in range(k)]

    def restore():  # the weights; momentum buffers just keep evolving (their values do not change the timing)
        for w in work:
            w.copy_(pristine)

    restore()
    label = f"{m}x{n} {str(dtype).removeprefix('torch.')}"
    times = {}
    params = [torch.nn.Parameter(w) for w in work]  # each shares its work buffer's storage
    for p, g in zip(params, grads):
        p.grad = g
    opts = [torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=5e-4) for p in params]
    for b in backends:
        if b == "triton" and device == "cpu" and m * n > INTERP_MAX_ELEMS:
            continue

        def unfused(i, b=b):
            opts[i].step()
            maxnorm_(work[i], radius, backend=b)

        name = f"SGD.step + ours[{b}]"
        times[name] = timer(unfused, k, restore, f"{name} {label}")
    opts = params = None  # (rebound, not deleted: the closure unfused() names opts)
    bufs = [torch.zeros_like(pristine) for _ in range(k)]
    for b in backends:
        if b == "triton" and device == "cpu" and m * n > INTERP_MAX_ELEMS:
            continue
        name = f"sgd_maxnorm_[{b}]"
        times[name] = timer(
            lambda i, b=b: sgd_maxnorm_(work[i], grads[i], bufs[i], lr=0.1, radius=radius, momentum=0.9,
                                        weight_decay=5e-4, backend=b), k, restore, f"{name} {label}")
    rows = []
    for name, (t, mode) in times.items():
        # fused rows: speed-up over the unfused pair with the same backend
        b = name[name.index("[") + 1 : -1]
        base = times.get(f"SGD.step + ours[{b}]")
        rows.append({"size": f"{m}x{n}", "dtype": str(dtype).removeprefix("torch."), "impl": name, "timing": mode,
                     "launches": k, "ms": t * 1e3, "eff_gbs": bytes_min / t / 1e9,
                     "x_unfused": base[0] / t if base else None})
    pristine = work = grads = bufs = None  # free before empty_cache (closures hold these names)
    if cuda:
        torch.cuda.empty_cache()
    return rows


SGD_COLUMNS = [("size", "size", "{}"), ("dtype", "dtype", "{}"), ("impl", "impl", "{}"), ("ms", "ms", "{:.3f}"),
               ("eff_gbs", "eff GB/s (5 tensors)", "{:.1f}"), ("x_unfused", "x unfused", "{:.2f}")]


COLUMNS = [("size", "size", "{}"), ("dtype", "dtype", "{}"), ("case", "case", "{}"),
           ("clipped_pct", "clipped %", "{:.0f}"), ("impl", "impl", "{}"), ("ms", "ms", "{:.3f}"),
           ("eff_gbs", "eff GB/s", "{:.1f}"), ("gbs_2x", "2x GB/s", "{:.1f}"), ("pct_copy", "%copy", "{:.0f}"),
           ("x_renorm", "x renorm", "{:.2f}"), ("x_official", "x official", "{:.2f}"), ("maxdiff", "maxdiff", "{:.2e}")]


def fmt(row, key, spec):
    v = row[key]
    return "-" if v is None else spec.format(v)


def with_timing(columns, after="impl"):
    """The columns with a "timing" column (graph / eager) after `after`: CUDA tables only."""
    i = [k for k, _, _ in columns].index(after) + 1
    return columns[:i] + [("timing", "timing", "{}")] + columns[i:]


def print_table(rows, markdown: bool, columns=COLUMNS, n_text_cols=5):
    cells = [[fmt(r, k, s) for k, _, s in columns] for r in rows]
    heads = [h for _, h, _ in columns]
    if markdown:
        print("| " + " | ".join(heads) + " |")
        print("|" + "|".join("---" if i < n_text_cols else "---:" for i in range(len(heads))) + "|")
        for c in cells:
            print("| " + " | ".join(c) + " |")
        return
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    print("  ".join(h.rjust(w) for h, w in zip(heads, widths)))
    for c in cells:
        print("  ".join(x.rjust(w) for x, w in zip(c, widths)))


def main(argv=None):
    args = parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible")
    interp = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    if args.backends is None:
        backends = ["torch", "triton"] if device == "cuda" or interp else ["torch"]
    else:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if device == "cpu" and "triton" in backends and not interp:
        sys.exit("triton on CPU needs TRITON_INTERPRET=1 in the environment (set before Python starts)")
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (25 if device == "cuda" else 3)
    warmup = args.warmup if args.warmup is not None else (5 if device == "cuda" else 1)
    sizes = [tuple(int(x) for x in s.lower().split("x")) for s in args.sizes.split(",") if s.strip()]
    dtypes = [DTYPES[d.strip()] for d in args.dtype.split(",") if d.strip()]
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if device == "cuda":
        dev_name = torch.cuda.get_device_name()
    else:
        dev_name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    print(f"torch {torch.__version__}, triton {triton_version}, device: {dev_name}, "
          f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!s}")
    print(f"backends {backends}, repeats {repeats} (median) after {warmup} warm-up, seed {args.seed}")
    if device == "cuda":
        print(f"CUDA timing: one CUDA graph of K launches on K distinct buffers (K = "
              f"{args.launches or 'clamp(1 GiB / weight bytes, 2, 16)'}), buffers restored and L2 flushed before "
              f"each replay (untimed), time per launch = replay / K; 'eager' rows: K eager launches (not capturable)")
    sys.stdout.flush()

    if args.selfcheck or args.selfcheck_only:
        t0 = time.perf_counter()
        passed = selfcheck(device, backends)
        print(f"selfcheck took {time.perf_counter() - t0:.1f} s")
        sys.stdout.flush()
        if args.selfcheck_only:
            sys.exit(0 if passed else 1)
    else:
        passed = True

    gen = torch.Generator(device=device).manual_seed(args.seed)
    if args.launches is not None and args.launches < 1:
        sys.exit("--launches must be >= 1")
    timer = CudaGraphTimer(repeats, warmup) if device == "cuda" else CpuTimer(repeats, warmup)
    columns, sgd_columns, n_text = COLUMNS, SGD_COLUMNS, 0
    if device == "cuda":
        columns, sgd_columns, n_text = with_timing(COLUMNS), with_timing(SGD_COLUMNS), 1
    rows = []
    t_start = time.perf_counter()
    for m, n in sizes:
        for dtype in dtypes:
            for case in cases:
                rows += bench_one(m, n, dtype, case, backends, timer, args, gen)
    print_table(rows, args.markdown, columns, 5 + n_text)
    sgd_rows = []
    if args.sgd:
        for m, n in sizes:
            for dtype in dtypes:
                sgd_rows += bench_sgd(m, n, dtype, backends, timer, args, gen)
        print()
        print_table(sgd_rows, args.markdown, sgd_columns, 3 + n_text)
    print(f"total bench time {time.perf_counter() - t_start:.1f} s")
    if args.json:
        meta = {"torch": torch.__version__, "triton": triton_version, "device": dev_name, "repeats": repeats,
                "warmup": warmup, "backends": backends, "argv": sys.argv,
                "timing": "cuda_graph_k_launches" if device == "cuda" else "cpu_wall_clock"}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "selfcheck_passed": passed, "rows": rows, "sgd_rows": sgd_rows}, f, indent=1)
    if not passed:
        sys.exit(1)


if __name__ == "__main__":
    main()
