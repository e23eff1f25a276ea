"""Peer for benchmarks/dist_optim_bench.py: torchtitan 0.3.0's DistMuon on CPU gloo ranks.

    from benchmarks.peers import torchtitan_dist_muon as tt
    ok, why = tt.available()          # (False, "skipped: ...") when torchtitan is missing
    step = tt.build_step(named_params, mesh, lr=0.02, weight_decay=0.1)
    ... set every p.grad (DTensor, same placements as p) ...
    step()                            # one DistMuon step, params updated in place

Install: ``pip install torchtitan==0.3.0 --no-deps``; ``torchtitan.distributed`` also imports
spmd_types and tyro at import time, so add ``pip install --no-deps spmd-types tyro
docstring-parser typeguard`` (all pure python). Never let pip touch torch.

What is configured, and why
---------------------------
``torchtitan.distributed.flex_shard.build_dist_muon`` with one parameter group:

- 2-D matrices: ``ComputeLayout({axis: Owned()})``: torchtitan's owner-computes layout (what
  its Kimi K2.5 recipe uses for every single 2-D matrix). Each matrix's Shard(0) row blocks go
  by one packed all-to-all to one owner rank, which runs Newton-Schulz on the whole matrix; a
  second all-to-all returns the rows. Owners are picked by torchtitan's LPT balancer on the NS
  flop count, cumulatively across buckets.
- 3-D expert stacks [E, n, m] sharded Shard(0) on E: ``ComputeLayout({axis: Shard(0)})``
  (the recipe's ``per_expert`` layout). Storage is already compute-ready (every rank holds
  whole experts), so they need no communication and are NS'd locally as a batch.
- Buckets (``BucketConfig``): one per transformer layer, as the recipe does (it pairs MoE
  layers; our layers are small, so one each). A layer is the name prefix up to its first
  integer component (``layers.3.attn.q.weight`` -> ``layers.3``); names without one
  (e.g. top-level experts) form buckets of their own in order, ``fallback_bucket_size`` at a
  time. The runtime keeps 2 pipeline slots: bucket k+1's storage->compute all-to-all is
  enqueued while bucket k computes, and a layer's local experts are NS'd before waiting
  for its all-to-all. On CPU every "stream" is synchronous (gloo collectives block), so that
  overlap does not exist here; ``layers_per_bucket`` (default 1) changes the grouping: 1, 2
  and 6 layers per bucket were within noise of each other on the shared 2-core box.
  Experts need no owner, so the owner balancer ignores their NS cost; with E divisible by
  the ranks every rank holds the same number of experts anyway.
- Hyper-parameters: ``momentum`` and ``nesterov`` as given; ``ns_coefficients=(3.4445,
  -4.7750, 2.0315)`` (Keller Jordan, torchtitan's default), ``ns_steps`` as given,
  ``adjust_lr_fn="match_rms_adamw"`` (update scale 0.2*sqrt(max(n, m)), per expert matrix
  for 3-D stacks), ``weight_decay`` decoupled as W <- W (1 - lr wd), ``eps=1e-7`` (default),
  ``foreach`` unset (DistMuon rejects it).

Maths differences from our optim.Muon that could not be removed
---------------------------------------------------------------
- Momentum is an EMA: M <- mu M + (1 - mu) G, U = (1 - mu) G + mu M (Nesterov via lerp),
  where optim.Muon keeps a plain sum M <- mu M + G, U = G + mu M. With M_ema = (1 - mu)
  M_sum, U_ema = (1 - mu) U_sum exactly; NS divides by the Frobenius norm first, so the
  update is the same up to rounding and the eps below. (The momentum buffer holds (1 - mu)
  times our values; compare updates, not buffers.)
- NS always runs in bf16 (``_zeropower_via_newtonschulz`` casts to bfloat16 unconditionally);
  ``ns_dtype`` other than bf16 is refused here rather than silently ignored.
- Normalisation: X / max(||X||_F, 1e-7), the norm taken on the bf16 copy; optim.Muon
  divides by (||X||_F + eps). Irrelevant unless an update is ~0.
- The NS step is the same polynomial written with addmm/baddbmm (A = X X^T;
  B = b A + c A A; X <- a X + B X), on the wide orientation (tall matrices transposed);
  bf16 rounding order differs from our kernels, so results agree to bf16 noise, not bitwise.
(optim.Muon as of this file's writing; it was being rewritten at the time.)

Verified (scratch script, 2 and 4 gloo ranks, 2 steps, 2-D incl. uneven 66x64 / 130x48 and
3-D incl. E=6 on 4 ranks, against plain-sum momentum + Keller NS on the full tensors):
with torchtitan's NS swapped for an fp32 one (test only) max |W - W_ref| = 3.4e-8; as shipped
(bf16 NS) vs a bf16 reference 1.2e-3 on updates of ~2e-2, the same size as the gap between
two bf16 NS runs on U and on (1 - mu) U (2-4% relative).

Shims (applied only while DistMuon is being constructed; site-packages is never edited)
--------------------------------------------------------------------------------------
1. ``DistMuon._validate_parameter_storage`` raises unless the local shards live on CUDA.
   Wrapped: when the original raises and every local shard is on one CPU device, return that
   device. Only __init__ calls it.
2. ``torch.cpu.Stream`` takes only ``priority``, but the runtime creates its transfer stream
   with ``Stream(device=..., priority=0)``. Replaced, during construction only, by a subclass
   that drops ``device``. (Only created once, in ``reserve_buffers`` at construction.)
3. Not a monkeypatch: DistMuon needs a DeviceMesh with named axes (``ComputeLayout`` names
   mesh axes); the bench's ``init_device_mesh("cpu", (world,))`` has none. For such a mesh a
   named 1-D mesh over the same process group is built (``DeviceMesh.from_group``) and
   DistMuon gets alias DTensor parameters on it that share each parameter's local storage
   (in-place updates land in the caller's parameters); ``step()`` hands the caller's grads
   to the aliases by reference (no copy). With a named mesh the caller's parameters are
   used directly.
Everything else DistMuon touches at step time (torch.cpu.current_stream/stream/Event,
Stream.wait_stream/wait_event, gloo all_to_all_single with split sizes, an int64 all_gather
for the cross-rank plan check at construction) works on CPU as shipped.
"""

from __future__ import annotations

import contextlib
import glob
import re
from collections.abc import Callable, Iterator

import torch

TORCHTITAN_VERSION = "0.3.0"
_INSTALL_HINT = f"pip install torchtitan=={TORCHTITAN_VERSION} --no-deps"
_DEFAULT_AXIS = "dp_shard"  # torchtitan's MeshAxisName.DP_SHARD
_LAYER_RE = re.compile(r"^(.*?(?:^|\.)\d+)(?:\.|$)")


def available() -> tuple[bool, str]:
    """(True, "torchtitan X") when DistMuon can be imported, else (False, "skipped: why")."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("torchtitan")
        except PackageNotFoundError:
            return False, f"skipped: torchtitan not installed ({_INSTALL_HINT})"
        if found != TORCHTITAN_VERSION:
            return False, f"skipped: torchtitan {found} installed, this peer targets {TORCHTITAN_VERSION}"
        _flex_shard()
    except ImportError as e:
        return False, (
            f"skipped: torchtitan {TORCHTITAN_VERSION} is installed but flex_shard does not import ({e}); "
            "its import-time deps: pip install --no-deps spmd-types tyro docstring-parser typeguard"
        )
    return True, f"torchtitan {found} DistMuon"


def _flex_shard():
    from torchtitan.distributed.flex_shard import dist_muon, optimizer_reshard

    return dist_muon, optimizer_reshard


class _CpuStream(torch.cpu.Stream):
    """torch.cpu.Stream that accepts (and ignores) the ``device=`` CUDA streams take."""

    def __init__(self, device=None, priority: int = -1) -> None:
        super().__init__(priority=priority)


@contextlib.contextmanager
def _cpu_shims(dist_muon_mod) -> Iterator[None]:
    cls = dist_muon_mod.DistMuon
    original_validate = cls._validate_parameter_storage
    original_stream = torch.cpu.Stream

    def validate_parameter_storage(self) -> torch.device:
        try:
            return original_validate(self)
        except ValueError:
            devices = {p.to_local().device for g in self.param_groups for p in g["params"]}
            if len(devices) == 1 and next(iter(devices)).type == "cpu":
                return devices.pop()
            raise

    cls._validate_parameter_storage = validate_parameter_storage
    torch.cpu.Stream = _CpuStream
    try:
        yield
    finally:
        cls._validate_parameter_storage = original_validate
        torch.cpu.Stream = original_stream


def _named_mesh(mesh):
    """(mesh, axis name, needs_alias): a mesh DistMuon accepts (1-D, named axis)."""
    from torch.distributed.device_mesh import DeviceMesh

    if mesh.ndim != 1:
        raise ValueError(f"expected a 1-D DeviceMesh, got {mesh.ndim}-D")
    if mesh.mesh_dim_names:
        return mesh, mesh.mesh_dim_names[0], False
    named = DeviceMesh.from_group(mesh.get_group(), mesh.device_type, mesh=mesh.mesh, mesh_dim_names=(_DEFAULT_AXIS,))
    return named, _DEFAULT_AXIS, True


def _alias(p: torch.nn.Parameter, mesh) -> torch.nn.Parameter:
    """A DTensor parameter on ``mesh`` whose local shard IS p's local shard (same storage)."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        local = p.to_local()
        a = DTensor.from_local(local, mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    a = torch.nn.Parameter(a, requires_grad=p.requires_grad)
    if a.to_local().data_ptr() != local.data_ptr():
        raise RuntimeError("alias DTensor does not share the parameter's local storage")
    return a


def _buckets(names: list[str], layers_per_bucket: int, fallback_bucket_size: int) -> list[list[str]]:
    """Group names by layer (prefix up to the first integer component), in first-seen order."""
    layers: dict[str, list[str]] = {}
    loose: list[str] = []
    for n in names:
        m = _LAYER_RE.match(n)
        if m:
            layers.setdefault(m.group(1), []).append(n)
        else:
            loose.append(n)
    groups = list(layers.values())
    buckets = [sum(groups[i : i + layers_per_bucket], []) for i in range(0, len(groups), layers_per_bucket)]
    buckets += [loose[i : i + fallback_bucket_size] for i in range(0, len(loose), fallback_bucket_size)]
    return buckets


def build_step(
    named_params: list[tuple[str, torch.nn.Parameter]],
    mesh,
    *,
    lr: float,
    weight_decay: float,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_dtype: torch.dtype = torch.bfloat16,
    layers_per_bucket: int = 1,
    fallback_bucket_size: int = 6,
) -> Callable[[], None]:
    """Build torchtitan's DistMuon over ``named_params`` and return its step().

    ``named_params``: (fqn, nn.Parameter holding a Shard(0) DTensor on the 1-D CPU ``mesh``);
    2-D matrices get ``Owned()`` (owner computes the whole matrix), 3-D [E, n, m] expert
    stacks ``Shard(0)`` (whole experts, local). Grads must be set (DTensors, same layout)
    before each call. Collective: every rank builds and steps together. The returned
    function carries the optimizer as ``step.optimizer``.
    """
    ok, why = available()
    if not ok:
        raise RuntimeError(why)
    if ns_dtype != torch.bfloat16:
        raise ValueError(f"torchtitan {TORCHTITAN_VERSION} DistMuon always runs Newton-Schulz in bf16, not {ns_dtype}")
    from torch.distributed.tensor import DTensor, Shard

    dist_muon, reshard = _flex_shard()
    names = [n for n, _ in named_params]
    if len(set(names)) != len(names):
        raise ValueError("parameter names must be unique")
    dmesh, axis, needs_alias = _named_mesh(mesh)

    originals = [p for _, p in named_params]
    layouts = {}
    for name, p in named_params:
        if not isinstance(p, DTensor):
            raise TypeError(f"{name}: expected a DTensor parameter")
        if p.ndim == 2:
            layouts[name] = reshard.ComputeLayout(shardings_by_mesh_axis={axis: reshard.Owned()})
        elif p.ndim == 3:
            layouts[name] = reshard.ComputeLayout(shardings_by_mesh_axis={axis: Shard(0)})
        else:
            raise ValueError(f"{name}: Muon takes 2-D matrices or 3-D [E, n, m] stacks, got shape {tuple(p.shape)}")
    params = [_alias(p, dmesh) for p in originals] if needs_alias else originals
    buckets = [
        reshard.BucketConfig(patterns=tuple(glob.escape(n) for n in b), name=f"bucket{i}")
        for i, b in enumerate(_buckets(names, layers_per_bucket, fallback_bucket_size))
    ]
    with _cpu_shims(dist_muon):
        opt = dist_muon.build_dist_muon(
            [{"params": params, "param_names": names}],
            compute_sharding_by_fqn=layouts,
            bucket_configs=buckets,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=(3.4445, -4.7750, 2.0315),
            ns_steps=ns_steps,
            adjust_lr_fn="match_rms_adamw",
        )

    if needs_alias:
        pairs = list(zip(params, originals))

        def step() -> None:
            for a, p in pairs:
                a.grad = p.grad
            try:
                opt.step()
            finally:
                for a, _ in pairs:
                    a.grad = None

    else:

        def step() -> None:
            opt.step()

    step.optimizer = opt  # type: ignore[attr-defined]
    step.buckets = [list(b.patterns) for b in buckets]  # type: ignore[attr-defined]
    return step
