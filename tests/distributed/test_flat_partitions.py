"""optim.flat.PartitionedMuonClip on hand-made ZeRO layouts equals optim.MuonClip on the whole model.

No DeepSpeed here: the layouts are built the way ZeRO builds them. Stage 1/2: a group's parameters
flattened, concatenated, padded and cut into N equal partitions (so matrices cross partition
boundaries mid-row). Stage 3: every parameter cut into ceil(numel / N) pieces, rank r's pieces
concatenated. 1 and 2 gloo ranks; 4 steps of a 2-layer MLA + MoE model (3-D experts) whose heads
clip (low tau); every rank feeds its partition the same gradients MuonClip sees. Checked: every
parameter and every optimizer state after each step (1e-6 absolute), and the clipped-head counts;
again with tiny all-to-all buckets; and, on ZeRO-3's layout, that the Muon exchange receives no
more bytes than optim.distributed.orthogonalize_ does on FSDP2's Shard(0) layout.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from torch.distributed.tensor import Shard

import optim.distributed as od
from _spawn import spawn
from optim import MuonClip, muon_param_groups
from optim.flat import Fragment, Partition, PartitionedMuonClip

STEPS, TAU = 4, 0.05  # the model's max logit starts near 0.08: heads clip from step 1
KW = dict(lr=0.02, weight_decay=0.1, ns_dtype=torch.float32, ns_backend="torch")


def _model(odd: bool = True):
    """Odd sizes on purpose: kv_a_proj_with_mqa has 23 rows and the experts are 3, so ZeRO's even
    cuts fall mid-row and mid-expert. ``odd=False``: every matrix and expert stack halves evenly."""
    from kimi_train.model import KimiForCausalLM, load_model_config

    torch.manual_seed(0)
    return KimiForCausalLM(load_model_config(
        "tiny", hidden_size=64, num_hidden_layers=2, n_routed_experts=3 if odd else 4, num_experts_per_tok=2,
        moe_intermediate_size=32, intermediate_size=96, kv_lora_rank=15 if odd else 16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, max_logits_chunk=16))


def _layout(names, shapes, world: int, stage: int) -> tuple[int, list[list[Fragment]]]:
    """(partition length, every rank's fragments) of one group, as ZeRO stage ``stage`` lays it out."""
    numels = [math.prod(shapes[n]) for n in names]
    frags: list[list[Fragment]] = [[] for _ in range(world)]
    if stage == 3:
        pieces = [-(-n // world) for n in numels]
        for r in range(world):
            flat = 0
            for name, numel, piece in zip(names, numels, pieces):
                count = min(piece, numel - r * piece)
                if count > 0:
                    frags[r].append(Fragment(name, r * piece, flat, count))
                flat += piece
        return sum(pieces), frags
    length = -(-sum(numels) // world)
    start = 0
    for name, numel in zip(names, numels):
        for r in range(world):
            lo, hi = max(start, r * length), min(start + numel, (r + 1) * length)
            if lo < hi:
                frags[r].append(Fragment(name, lo - start, lo - r * length, hi - lo))
        start += numel
    return length, frags


def _flat(tensors: dict[str, torch.Tensor], frags: list[Fragment], length: int) -> torch.Tensor:
    out = torch.zeros(length)
    for f in frags:
        out[f.flat_start:f.flat_start + f.numel] = tensors[f.name].reshape(-1)[f.param_start:f.param_start + f.numel]
    return out


def _run(world: int, rank: int, stage: int) -> None:
    ref_model, model = _model(), _model()
    ref = MuonClip(muon_param_groups(ref_model), attention_layers=ref_model.attention_layers(), tau=TAU, **KW)
    opt = PartitionedMuonClip(muon_param_groups(model), attention_layers=model.attention_layers(), tau=TAU,
                              process_group=dist.group.WORLD if world > 1 else None, **KW)
    names_by_group = [list(g["param_names"]) for g in opt.param_groups]
    params = dict(model.named_parameters())
    partitions = []
    for i, names in enumerate(names_by_group):  # what ZeRO does: the groups now hold flat partitions
        length, frags = _layout(names, opt.shapes, world, stage)
        flat = _flat({n: params[n].detach() for n in names}, frags[rank], length)
        opt.param_groups[i]["params"] = [flat]
        partitions.append(Partition(flat, i, frags, rank))
    opt.set_partitions(partitions)
    if world > 1:  # some fragment of this rank starts or ends inside a row
        assert any((f.param_start % opt.shapes[f.name][-1]) or ((f.param_start + f.numel) % opt.shapes[f.name][-1])
                   for part in partitions for f in part.local if len(opt.shapes[f.name]) > 1)
    adamw_names = [n for grp in opt.param_groups if not grp["use_muon"] for n in grp["param_names"]]
    ref_params = dict(ref_model.named_parameters())
    torch_params = [torch.nn.Parameter(ref_params[n].detach().clone()) for n in adamw_names]  # AdamW's own oracle
    torch_adamw = torch.optim.AdamW(torch_params, lr=KW["lr"], weight_decay=KW["weight_decay"], betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(1)
    clipped = 0
    for step in range(STEPS):
        batch = torch.randint(0, 256, (4, 17), generator=g)
        loss = F.cross_entropy(ref_model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        model(batch[:, :-1])  # the same max-logit records (the weights are equal)
        grads = {n: p.grad for n, p in ref_model.named_parameters()}
        for part in partitions:
            part.tensor.grad = _flat(grads, part.local, part.tensor.numel())
        for tp, n in zip(torch_params, adamw_names):
            tp.grad = grads[n].clone()
        ref.step()
        torch_adamw.step()
        for tp, n in zip(torch_params, adamw_names):
            torch.testing.assert_close(ref_params[n].detach(), tp.detach(), rtol=0, atol=1e-6)
        ref.zero_grad(set_to_none=True)
        opt.prepare_qk_clip()
        opt.step()
        stats = opt.finish_qk_clip()
        assert stats["clipped_heads_per_layer"] == ref.last_stats["clipped_heads_per_layer"], step
        clipped += stats["clipped_heads"]
        want = {n: p.detach() for n, p in ref_model.named_parameters()}
        for part in partitions:
            torch.testing.assert_close(part.tensor, _flat(want, part.local, part.tensor.numel()), rtol=0, atol=1e-6,
                                       msg=lambda m: f"stage {stage} rank {rank} step {step}: weights: {m}")
            key = "momentum_buffer" if opt.param_groups[part.group]["use_muon"] else "exp_avg_sq"
            state = {f.name: ref.state[ref_params[f.name]][key] for f in part.local}
            torch.testing.assert_close(opt.state[part.tensor][key], _flat(state, part.local, part.tensor.numel()),
                                       rtol=0, atol=1e-6)
        with torch.no_grad():  # the model follows its masters (what ZeRO's copy to the working weights does)
            for n, p in model.named_parameters():
                p.copy_(want[n])
    assert clipped > 0  # QK-Clip is exercised


def _worker(rank: int, world: int, stage: int) -> None:
    torch.manual_seed(0)
    _run(world, rank, stage)
    od.BUCKET_NUMEL = 500  # many buckets, two in flight, experts split across buckets: the same maths
    _run(world, rank, stage)
    if stage == 3:
        _bytes_at_most_orthogonalize(rank, world)


def _bytes_at_most_orthogonalize(rank: int, world: int) -> None:
    """On ZeRO-3's layout the Muon exchange receives at most what orthogonalize_ receives for the
    same matrices sharded Shard(0) (FSDP2's layout), and the step is the same. Even sizes: with 3
    experts FSDP2's dim-0 chunks keep every expert whole while ZeRO-3's flat cut splits one."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    model = _model(odd=False)
    (group,) = [g for g in muon_param_groups(model) if g["use_muon"]]
    named = dict(zip(group["param_names"], group["params"]))
    grads = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, (n, p) in enumerate(named.items())}
    opt = PartitionedMuonClip([group], process_group=dist.group.WORLD, **KW)
    length, frags = _layout(list(named), opt.shapes, world, 3)
    part = Partition(_flat({n: p.detach() for n, p in named.items()}, frags[rank], length), 0, frags, rank)
    opt.param_groups[0]["params"] = [part.tensor]
    opt.set_partitions([part])
    part.tensor.grad = _flat(grads, part.local, length)
    mesh = init_device_mesh("cpu", (world,))
    sharded = [torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)])) for p in named.values()]
    for p, g in zip(sharded, grads.values()):
        p.grad = distribute_tensor(g, mesh, [Shard(0)])
    fsdp = MuonClip(sharded, **KW)
    received = []
    for step in (opt.step, fsdp.step):
        od.comm_stats.reset()
        step()
        received.append(od.comm_stats.bytes_recv)
    assert 0 < received[0] <= received[1], received
    full = {n: p.full_tensor() for n, p in zip(named, sharded)}
    torch.testing.assert_close(part.tensor, _flat(full, part.local, length), rtol=0, atol=1e-6)


def test_one_partition_equals_muonclip():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: 2 threads on 2 shared cores make each one ~100x slower
    try:
        _run(1, 0, stage=1)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("stage", [1, 3])
def test_two_ranks_zero_layouts_equal_muonclip(stage):
    spawn(_worker, 2, stage)


def test_muon_group_refuses_a_vector():
    with pytest.raises(ValueError, match="Muon groups take 2-D or 3-D matrices"):
        PartitionedMuonClip([{"params": [torch.nn.Parameter(torch.zeros(3))], "param_names": ["b"], "use_muon": True}])
