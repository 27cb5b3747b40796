"""Pre-train the built-in tiny model on the arithmetic task until it is *partly* right.

    .venv/bin/python scripts/build_tiny.py [--out lowalign/assets/tiny] [--seed 0]

Trains from scratch on training-split problems (loss on the answer tokens only) and stops at the first
evaluation whose greedy held-out accuracy lands in [--lo, --hi], so alignment has room to show.
Writes config, safetensors weights, tokenizer files and BUILD.md (command + measured accuracy).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lowalign.tasks.arithmetic import ArithmeticTask, is_correct
from lowalign.tiny import TINY_DIR, byte_tokenizer, tiny_config


def encode_batch(tok, rows):
    ids, labels = [], []
    for r in rows:
        p = tok(r["prompt"], add_special_tokens=False).input_ids
        c = tok(r["answer"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        ids.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(map(len, ids))
    pad = lambda x, v: x + [v] * (width - len(x))  # right padding for teacher forcing
    return (
        torch.tensor([pad(x, tok.pad_token_id) for x in ids]),
        torch.tensor([pad(y, -100) for y in labels]),
        torch.tensor([pad([1] * len(x), 0) for x in ids]),
    )


@torch.no_grad()
def greedy_accuracy(model, tok, rows, max_new_tokens=6):
    model.eval()
    enc = tok([r["prompt"] for r in rows], add_special_tokens=False, padding=True, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    texts = tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    model.train()
    return sum(is_correct(t, r["answer"]) for t, r in zip(texts, rows)) / len(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(TINY_DIR))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lo", type=float, default=0.22)
    ap.add_argument("--hi", type=float, default=0.40)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-steps", type=int, default=20000)
    ap.add_argument("--eval-every", type=int, default=50)
    args = ap.parse_args()

    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    tok = byte_tokenizer()
    task = ArithmeticTask()
    model = LlamaForCausalLM(tiny_config())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    eval_rows = task.eval_rows(512)
    t0, acc = time.time(), 0.0
    for step in range(1, args.max_steps + 1):
        ids, labels, mask = encode_batch(tok, task.train_rows(args.batch, seed=args.seed * 1_000_003 + step))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, step / 200)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.eval_every == 0:
            acc = greedy_accuracy(model, tok, eval_rows)
            print(f"step {step:5d}  loss {loss.item():.4f}  held-out greedy acc {acc:.3f}  "
                  f"({time.time() - t0:.0f}s)", flush=True)
            if args.lo <= acc <= args.hi:
                break
    else:
        raise SystemExit(f"never reached accuracy in [{args.lo}, {args.hi}] (last {acc:.3f})")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    full = greedy_accuracy(model, tok, task.eval_rows())
    n_params = sum(p.numel() for p in model.parameters())
    (out / "BUILD.md").write_text(
        "# builtin:tiny\n\n"
        f"Rebuild: `.venv/bin/python scripts/build_tiny.py --seed {args.seed} --lo {args.lo} --hi {args.hi} "
        f"--batch {args.batch} --lr {args.lr} --eval-every {args.eval_every}`\n\n"
        f"- parameters: {n_params:,}\n- pre-training steps: {step}\n"
        f"- greedy accuracy on 512 held-out problems at stop: {acc:.3f}\n"
        f"- greedy accuracy on all {len(task.eval_rows())} held-out problems: {full:.3f}\n"
        f"- build time: {time.time() - t0:.0f}s on the machine that built it\n"
    )
    (out / "build_info.json").write_text(json.dumps(
        {"steps": step, "heldout_acc_512": acc, "heldout_acc_all": full, "params": n_params}, indent=1))
    print(f"saved to {out}: {n_params:,} params, held-out greedy acc {full:.3f}")


if __name__ == "__main__":
    main()
