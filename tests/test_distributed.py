"""QLoRA under PyTorch's distributed engine, on the CPU: 2 processes on gloo, launched by the test
(tests/dist_workers.py). A tiny Llama with every linear QLoRA, NF4 codes seeded with NaN-looking
byte runs; FSDP2 (fully_shard per decoder layer and at the root) and DDP each train 5 steps with
PagedAdamW on half of every batch per rank and must match one process on the whole batch."""
import json

import pytest
import torch
import torch.distributed as dist

import dist_workers as W
from numerics import rel_err

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


@pytest.fixture(scope="module")
def reference():
    return W.single_process()


def _assert_same_training(run, ref, tol=1e-5):
    for got, want in zip(run["losses"], ref["losses"]):
        assert abs(got - want) <= tol * abs(want), (run["losses"], ref["losses"])
    assert set(run["lora"]) == set(ref["lora"])
    for name, want in ref["lora"].items():
        assert rel_err(run["lora"][name], want) <= tol, name


def _whole_nf4_bytes(ref):
    return sum(ts[0].numel() + ts[1].numel() * ts[1].element_size() for ts in ref["nf4"].values())


def test_fsdp2_matches_one_process(reference, tmp_path):
    runs = W.launch(W.fsdp_run, str(tmp_path))
    for run in runs:
        _assert_same_training(run, reference)
        # the all-gathered NF4 weights are the unsharded ones bit for bit (NaN-looking runs included)
        assert run["gathered_equal"]
        # each rank holds half of the codes and block scales
        assert run["local_nf4_bytes"] * 2 == _whole_nf4_bytes(reference)
    # the full state dict gathered from the shards is the one-process model's, in bitsandbytes' keys
    full, want = runs[0]["full_state_dict"], reference["state_dict"]
    assert set(full) == set(want)
    for k, v in want.items():
        if k.endswith("bitsandbytes__nf4"):  # sharded: padded to a fixed width with spaces
            assert json.loads(bytes(full[k].tolist())) == json.loads(bytes(v.tolist())), k
        elif ".lora_" in k:
            assert rel_err(full[k], v) <= 1e-5, k
        else:
            assert torch.equal(full[k], v), k


def test_fsdp2_sharded_checkpoint_resumes(reference, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    first = W.launch(W.fsdp_run, str(tmp_path), save_at=3, ckpt_dir=ckpt)
    # a fresh 2-rank run from other random weights: base, adapters and optimizer state from the
    # sharded checkpoint, then steps 4 and 5
    resumed = W.launch(W.fsdp_run, str(tmp_path), resume_from=ckpt, start=3)
    for a, b in zip(first, resumed):
        assert b["gathered_equal"]  # the NF4 base came back from the checkpoint bit for bit
        assert b["losses"] == a["losses"][3:]
        for name, want in a["lora"].items():
            assert torch.equal(b["lora"][name], want), name


def test_ddp_matches_one_process(reference, tmp_path):
    runs = W.launch(W.ddp_run, str(tmp_path))
    for run in runs:
        _assert_same_training(run, reference)
        for name, want in reference["nf4"].items():  # the frozen NF4 base is untouched
            assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                       for a, b in zip(run["nf4"][name], want)), name
