"""QLoRA over several processes with FSDP2 (or DDP): every linear of a Llama-architecture model NF4
with a LoRA adapter, the NF4 base sharded by rows across ranks, PagedAdamW on the sharded adapters,
a sharded checkpoint (torch.distributed.checkpoint) at the end.

  torchrun --nproc-per-node 2 examples/fsdp_qlora.py --backend gloo          # CPUs
  torchrun --nproc-per-node 8 examples/fsdp_qlora.py --backend nccl          # GPUs, one per rank

The model here is a small random Llama built from a config (nothing is downloaded); with a real
checkpoint, build the model on each rank (or on the meta device), load it, call apply_qlora, then
fully_shard exactly as below.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from transformers import LlamaConfig, LlamaForCausalLM

import nf4lora as nl


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    ap.add_argument("--mode", choices=["fsdp", "ddp"], default="fsdp")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--checkpoint", default=None, help="directory for a sharded DCP checkpoint")
    args = ap.parse_args()

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.backend == "nccl" \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    cfg = LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.hidden * 2,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)  # every rank builds the same base weights and adapters
    model = LlamaForCausalLM(cfg)
    nl.apply_qlora(model, "all-linear", r=8, lora_alpha=16)
    model.to(device)

    if args.mode == "fsdp":
        for layer in model.model.layers:  # one all-gather per decoder layer
            fully_shard(layer)
        fully_shard(model)
    else:
        model = DistributedDataParallel(model)  # NF4 base replicated, adapters' grads all-reduced
    opt = nl.PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    nf4 = [m.weight for m in model.modules() if isinstance(m, nl.QLoRALinear)]
    local = sum((w._local_tensor if hasattr(w, "_local_tensor") else w).nbytes for w in nf4)
    if rank == 0:
        print(f"{args.mode} over {world} ranks: NF4 bytes on this rank {local / 2**20:.2f} MiB")

    g = torch.Generator().manual_seed(1 + rank)  # each rank its own data
    for step in range(args.steps):
        ids = torch.randint(0, cfg.vocab_size, (4, 64), generator=g).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if rank == 0:
            print(f"step {step + 1}: loss {loss.item():.4f}")

    if args.checkpoint and args.mode == "fsdp":
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=args.checkpoint)
        if rank == 0:
            print(f"sharded checkpoint written to {args.checkpoint}")
    # DDP's reducer holds the process group: let it go first, or gloo's destructor can deadlock at
    # interpreter exit (a gloo worker thread waiting for the GIL while holding the group's lock).
    del model, opt
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
