"""transformers' Trainer over a model from apply_qlora with PagedAdamW and a scheduler: 10 steps,
a checkpoint at step 5, and a run resumed from it ends with the same adapter as the uninterrupted
one (so TRL's SFTTrainer, a Trainer, works the same way)."""
import pytest
import torch

import nf4lora as nl
from model_utils import VOCAB, tiny_llama

transformers = pytest.importorskip("transformers")


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=40, seq=8):
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, VOCAB, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train(out_dir, max_steps, resume=None):
    model = tiny_llama(seed=0)
    nl.apply_qlora(model, "all-linear", r=4, lora_alpha=8, lora_dropout=0.1)
    model.train()
    opt = nl.PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 20)
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=4, save_steps=5,
        logging_steps=1, report_to=[], seed=11, data_seed=11, use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(),
                                   optimizers=(opt, sched))
    trainer.train(resume_from_checkpoint=resume)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return lora, losses, opt


def test_trainer_checkpoint_and_resume(tmp_path):
    full, full_losses, _ = _train(tmp_path / "full", 10)
    assert len(full_losses) == 10 and all(l == l for l in full_losses)
    ckpt = tmp_path / "full" / "checkpoint-5"
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "model.safetensors").is_file()
    resumed, resumed_losses, opt = _train(tmp_path / "again", 10, resume=str(ckpt))
    # the resumed optimizer continued from the checkpointed state (step counts 10, not 5)
    assert all(st["step"] == 10 for st in opt.state.values())
    assert resumed_losses[-5:] == full_losses[-5:]
    assert set(resumed) == set(full) and len(full) > 0
    for name, want in full.items():
        assert torch.equal(resumed[name], want), name
