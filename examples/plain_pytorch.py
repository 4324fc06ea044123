"""Distil a student from a logitcache cache in plain PyTorch: no Trainer, cache -> loss -> optimizer step.

    python examples/plain_pytorch.py CACHE_DIR STUDENT_DIR --steps 20
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from logitcache import KDCollator, LogitCacheDataset
from logitcache.losses import FusedLoss, ce_kd_loss


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache_dir")
    parser.add_argument("student_dir")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.student_dir)
    model = AutoModelForCausalLM.from_pretrained(args.student_dir)
    ds = LogitCacheDataset(args.cache_dir, tokenizer, max_length=512, batch_size=args.batch_size)
    # Padding is masked out of every loss, so any id pads.
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, collate_fn=KDCollator(pad_token_id=0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    spec = FusedLoss("uld", weight=1.0)  # ULD works whatever the student's tokenizer

    model.train()
    step, epoch = 0, 0
    while step < args.steps:
        ds.set_epoch(epoch)  # a new shuffle each pass over the cache
        for batch in loader:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, ce, kd = ce_kd_loss(logits, batch["labels"], batch["teacher_logprobs"], batch["teacher_ids"],
                                      batch["kd_mask"], spec)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % 5 == 0 or step == 1 or step == args.steps:
                print(f"step {step}: loss {loss.item():.4f} (ce {ce.item():.4f}, kd {kd.item():.4f})", flush=True)
            if step == args.steps:
                break
        epoch += 1


if __name__ == "__main__":
    main()
