"""Two-process (gloo, CPU) training runs for tests/test_distributed.py, and the single-process run
they are compared with. Each worker builds the same tiny QLoRA Llama (seeded), trains a few steps
with PagedAdamW on its half of every batch, and writes what the test checks to out_dir/rank{r}.pt.
Spawned processes import this module, so it holds only top-level functions."""
import os
import socket
import sys

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from model_utils import VOCAB, tiny_llama  # noqa: E402

STEPS = 5
BATCH, SEQ = 4, 8
LR = 1e-2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(worker, out_dir, world_size=2, **kwargs):
    """Run worker(rank, world_size, out_dir, **kwargs) in world_size fresh processes (gloo) and
    return what each rank saved."""
    port = free_port()
    mp.start_processes(_entry, args=(worker, world_size, port, out_dir, kwargs), nprocs=world_size,
                       join=True, start_method="spawn")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(world_size)]


def _entry(rank, worker, world_size, port, out_dir, kwargs):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = worker(rank, world_size, **kwargs)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ the model, the data
def nan_pattern_codes(model):
    """Put runs of 0x7F / 0xFF code bytes (what a bf16/fp16 view would read as NaN) into every NF4
    weight, so a path that canonicalizes NaN bit patterns would change them."""
    import nf4lora as nl
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nl.QLoRALinear):
                p = m.weight.packed
                p[: p.numel() // 8] = 0xFF
                p[p.numel() // 2: p.numel() // 2 + 64] = 0x7F


def build_model(seed=0, dora=False):
    """A tiny Llama (hidden 64, 2 layers), every linear QLoRA (r=4), adapters non-zero."""
    import nf4lora as nl
    model = tiny_llama(layers=2, hidden=64, inter=128, seed=seed)
    nl.apply_qlora(model, "all-linear", r=4, lora_alpha=8, init_lora_weights=False, use_dora=dora)
    nan_pattern_codes(model)
    model.train()
    return model


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return ids


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss


def lora_state(model):
    """Trainable parameters, whole (a DTensor is gathered), by name."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def nf4_state(model):
    """Each NF4 weight's inner tensors (whole), by layer name."""
    import nf4lora as nl
    return {n: [t.clone() for t in m.weight.tensors()] + [m.weight.offset]
            for n, m in model.named_modules() if isinstance(m, nl.QLoRALinear)}


def optimizer(model):
    import nf4lora as nl
    return nl.PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)


# ------------------------------------------------------------------------------ runs
def single_process(steps=STEPS):
    """The reference: one process, the whole batch each step."""
    torch.set_num_threads(1)
    model = build_model()
    opt = optimizer(model)
    losses = []
    for step in range(steps):
        loss = loss_of(model, batch(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "lora": lora_state(model), "nf4": nf4_state(model),
            "state_dict": {k: v.clone() for k, v in model.state_dict().items()}}


def _half(ids, rank, world_size):
    per = ids.shape[0] // world_size
    return ids[rank * per:(rank + 1) * per]


def _mean_loss(loss):
    import torch.distributed as dist
    t = loss.detach().clone()
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def _shard(model):
    from torch.distributed.fsdp import fully_shard
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def fsdp_run(rank, world_size, steps=STEPS, save_at=None, ckpt_dir=None, resume_from=None,
             start=0):
    """FSDP2 over the tiny model; optionally a DCP checkpoint after step `save_at`, or resume from
    one and run steps start..steps-1."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import nf4lora as nl
    # A resumed run starts from other random weights: everything must come from the checkpoint.
    model = build_model(seed=0 if resume_from is None else 7)
    original = nf4_state(build_model())
    _shard(model)
    opt = optimizer(model)
    out = {"rank": rank}
    local = {n: m.weight._local_tensor for n, m in model.named_modules()
             if isinstance(m, nl.QLoRALinear)}
    out["local_nf4_bytes"] = sum(t.packed.numel() + t.absmax.numel() * t.absmax.element_size()
                                 for t in local.values())
    if resume_from is not None:
        msd, osd = get_state_dict(model, opt)
        dcp.load({"model": msd, "optim": osd}, checkpoint_id=resume_from)
        set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    # The all-gathered NF4 weights against the unsharded originals, bit for bit.
    from torch.distributed.fsdp import FSDPModule
    groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in groups:
        m.unshard()
    gathered = nf4_state(model)
    for m in groups:
        m.reshard()
    out["gathered_equal"] = all(
        all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
            for a, b in zip(gathered[n], original[n])) for n in original)
    losses = []
    for step in range(start, steps):
        loss = loss_of(model, _half(batch(step), rank, world_size))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(_mean_loss(loss))
        if save_at is not None and step + 1 == save_at:
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt_dir)
    out["losses"] = losses
    out["lora"] = lora_state(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out["full_state_dict"] = {k: v.clone() for k, v in full.items()} if rank == 0 else None
    return out


def ddp_run(rank, world_size, steps=STEPS):
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = build_model()
    ddp = DDP(model)
    opt = optimizer(model)
    losses = []
    for step in range(steps):
        loss = loss_of(ddp, _half(batch(step), rank, world_size))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(_mean_loss(loss))
    return {"losses": losses, "lora": lora_state(model), "nf4": nf4_state(model)}
