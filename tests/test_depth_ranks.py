"""depth_rank_pattern (lora/depth.py): PEFT's rank_pattern from a per-depth schedule, the trainable-
parameter report, apply_qlora and PEFT honouring the pattern, bad schedules and unnumbered models."""
import copy

import pytest
import torch

import nf4lora as nl
from model_utils import tiny_llama
from nf4lora.nn import QLoRALinear

TM = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama6():
    return tiny_llama(layers=6, hidden=64, inter=128)


def layer_of(name):
    return int(name.split("layers.")[1].split(".")[0])


def test_default_schedule_by_thirds(llama6):
    pattern, report = nl.depth_rank_pattern(llama6, TM)
    assert len(pattern) == 18
    for name, rank in pattern.items():
        assert llama6.get_submodule(name) is not None  # full names
        assert rank == {0: 4, 1: 4, 2: 8, 3: 8, 4: 16, 5: 16}[layer_of(name)], name
    assert report.layer_ranks == {0: 4, 1: 4, 2: 8, 3: 8, 4: 16, 5: 16}
    # q (64 -> 64), v (64 -> 32: 2 kv heads of 16), down (128 -> 64), summed over layers
    per_layer = (64 + 64) + (64 + 32) + (128 + 64)
    assert report.params == 2 * per_layer * (4 + 8 + 16)
    assert report.uniform_params == 6 * per_layer * 8 and report.uniform_r == 8
    assert report.modules == 18 and report.ratio == pytest.approx(56 / 48)
    assert "18 modules" in str(report)


def test_callable_and_custom_list(llama6):
    pattern, _ = nl.depth_rank_pattern(llama6, ["q_proj"], schedule=lambda f: 2 if f <= 0.5 else 6)
    assert [pattern[f"model.layers.{i}.self_attn.q_proj"] for i in range(6)] == [2, 2, 2, 6, 6, 6]
    pattern, report = nl.depth_rank_pattern(llama6, ["q_proj"], schedule=[(0.2, 1), (1.0, 3)], r=2)
    assert [pattern[f"model.layers.{i}.self_attn.q_proj"] for i in range(6)] == [1, 3, 3, 3, 3, 3]
    assert report.uniform_params == 6 * 2 * 128


def test_apply_qlora_and_peft_give_each_layer_its_rank(llama6):
    from peft import LoraConfig, get_peft_model
    pattern, report = nl.depth_rank_pattern(llama6, TM, r=8)
    model = nl.apply_qlora(copy.deepcopy(llama6), TM, r=8, rank_pattern=pattern)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QLoRALinear)}
    assert sorted(layers) == sorted(pattern)
    for name, layer in layers.items():
        assert layer.r == pattern[name], name
        assert layer.lora_A_weight.shape[0] == layer.lora_B_weight.shape[1] == pattern[name]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == report.params

    peft_model = get_peft_model(copy.deepcopy(llama6), LoraConfig(r=8, target_modules=TM, rank_pattern=pattern))
    peft_ranks = {n.replace("base_model.model.", ""): m.r["default"]
                  for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "r")}
    assert peft_ranks == pattern
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == report.params


def test_layers_pattern_and_stacks():
    """GPT-2 style names (h.<i>) found by the default patterns; two numbered stacks each get the
    whole schedule over their own depth."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

    class TwoStacks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Module()
            self.enc.h = torch.nn.ModuleList(Block() for _ in range(3))
            self.dec = torch.nn.Module()
            self.dec.layers = torch.nn.ModuleList(Block() for _ in range(6))

    pattern, report = nl.depth_rank_pattern(TwoStacks(), ["proj"])
    assert [pattern[f"enc.h.{i}.proj"] for i in range(3)] == [4, 8, 16]
    assert [pattern[f"dec.layers.{i}.proj"] for i in range(6)] == [4, 4, 8, 8, 16, 16]
    assert report.params == 16 * (2 * 28 + 28)
    custom = torch.nn.Module()
    custom.stages = torch.nn.ModuleList(Block() for _ in range(2))
    pattern, _ = nl.depth_rank_pattern(custom, ["proj"], schedule=[(0.5, 1), (1.0, 2)], layers_pattern="stages")
    assert pattern == {"stages.0.proj": 1, "stages.1.proj": 2}


@pytest.mark.parametrize("schedule,match", [
    ([(2 / 3, 8), (1 / 3, 4), (1.0, 16)], "increase"), ([(0.5, 4), (0.5, 8), (1.0, 16)], "increase"),
    ([(0.5, 0), (1.0, 8)], "rank"), ([(0.5, -2), (1.0, 8)], "rank"), ([(0.5, 2.5), (1.0, 8)], "rank"),
    ([(0.0, 4), (1.0, 8)], r"\(0, 1\]"), ([(0.5, 4), (1.5, 8)], r"\(0, 1\]"), ([(-0.1, 4), (1.0, 8)], r"\(0, 1\]"),
    ([(float("nan"), 4), (1.0, 8)], r"\(0, 1\]"), ([(0.5, 4), (0.9, 8)], "last schedule bound"),
    ([], "empty"), ([(1.0,)], "pairs"), ("thirds", "schedule must be"), (8, "schedule must be"),
])
def test_bad_schedules_rejected_before_the_model(schedule, match):
    class Untouchable(torch.nn.Module):
        def named_modules(self, *a, **k):
            raise AssertionError("the model was read before the schedule was checked")

    with pytest.raises(ValueError, match=match):
        nl.depth_rank_pattern(Untouchable(), TM, schedule=schedule)


def test_bad_callable_rank_and_r(llama6):
    with pytest.raises(ValueError, match="schedule"):
        nl.depth_rank_pattern(llama6, TM, schedule=lambda f: 0)
    with pytest.raises(ValueError, match="r must be"):
        nl.depth_rank_pattern(llama6, TM, r=0)


def test_unnumbered_model_and_no_match_are_clear_errors(llama6):
    flat = torch.nn.Sequential()
    flat.add_module("q_proj", torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="no layer number"):
        nl.depth_rank_pattern(flat, ["q_proj"])
    with pytest.raises(ValueError, match="lm_head.*no layer number"):
        nl.depth_rank_pattern(llama6, ["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="matched no module"):
        nl.depth_rank_pattern(llama6, ["nope_proj"])
