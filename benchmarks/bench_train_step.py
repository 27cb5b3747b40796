"""Where a GRPO training pass's time goes on a real model, and how far it is from the machine's matmul speed.

    python benchmarks/bench_train_step.py --model package:smollm2-135m-instruct
    python benchmarks/bench_train_step.py --model package:smollm2-135m-instruct --micro-batch 8 --checkpointing
    python benchmarks/bench_train_step.py --micro-batch 8 --checkpointing --new-tokens 128 --profile

One optimizer step of ``--completions`` rollout rows (the built-in task's chat prompts, completions of
``--new-tokens`` sampled tokens), micro-batches of ``--micro-batch`` rows, through the path the trainers take:
the backbone under the policy LoRA (``ModelBundle.hidden_states``), the fused log-prob of each completion token
(``lowalign.logprobs``, the lm_head never materialized), a policy-gradient loss, backward, AdamW. Timed
separately: forward (backbone + log-probs), backward, optimizer (median of ``--reps`` steps after a warm-up).

FLOPs are counted from the shapes (multiply-adds x 2): the forward's linear layers (every projection, LoRA
included) and the lm_head on the completion tokens, and attention's two products; the backward of a frozen base
computes gradients of activations only (the same FLOPs as the forward) plus the LoRA weights' gradients;
gradient checkpointing adds one forward. "achieved" is those FLOPs over the measured time; "matmul" is a plain
``torch.mm`` in the same process on the pass's largest linear shape (tokens x hidden @ hidden x intermediate) and
on the head's (completion tokens x hidden @ hidden x vocabulary): the ratio says how far the pass is from what
the CPU's matmul reaches on these shapes. Prints a markdown table.

Then the same step with the rows of each prompt sharing its forward (``lowalign.prompt_sharing``, what the GRPO
trainers do: one packed sequence per prompt in a micro-batch when that pays), alternating with the whole rows,
``--reps`` each: the step time of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def mm_gflops(m: int, k: int, n: int, seconds: float = 2.0) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(2):
        a @ b
    t0, it = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        a @ b
        it += 1
    return 2 * m * k * n * it / (time.perf_counter() - t0) / 1e9


def linear_macs(model) -> tuple[int, int]:
    """(multiply-adds per token of every linear layer in the blocks incl. LoRA, of the lm_head)."""
    blocks, head = 0, 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            if name.endswith("lm_head"):
                head += m.in_features * m.out_features
            else:
                blocks += m.in_features * m.out_features
    if head == 0:  # tied head: the embedding
        e = model.get_input_embeddings().weight
        head = e.shape[0] * e.shape[1]
    return blocks, head


def profile_step(step) -> None:
    """One step (whole rows) under torch.profiler: the top ops by self CPU time, and the share of aten::mm (the
    linear layers, forward and backward): what is left for everything else (attention, elementwise, autograd)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    print("\none step under torch.profiler (whole rows), ops by self CPU time:\n")
    print("| op | self s | share | calls |")
    print("|---|---|---|---|")
    for e in ops[:12]:
        print(f"| {e.key} | {e.self_cpu_time_total / 1e6:.2f} | {e.self_cpu_time_total / total * 100:.1f}% | "
              f"{e.count} |")
    mm = sum(e.self_cpu_time_total for e in ops if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    print(f"\nmatmuls (aten::mm, addmm, bmm): {mm / total * 100:.1f}% of the step's {total / 1e6:.2f} s of self "
          "time")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="package:smollm2-135m-instruct")
    ap.add_argument("--completions", type=int, default=64, help="rows per optimizer step (8 prompts x 8)")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile", action="store_true",
                    help="also one step under torch.profiler: the ops' self time, and matmul's share of it")
    args = ap.parse_args()

    from bench_rollout import chat_prompts

    from lowalign.bundle import ModelBundle
    from lowalign.config import LoraConfig, ModelConfig
    from lowalign.generation import encode_prompts
    from lowalign.logprobs import logprobs_from_hidden, token_logprobs
    from lowalign.prompt_sharing import completion_hidden_states

    b = ModelBundle.load(ModelConfig(name_or_path=args.model, gradient_checkpointing=args.checkpointing))
    torch.manual_seed(0)
    b.add_adapter("policy", LoraConfig(r=16, alpha=32))
    params = b.adapter_parameters("policy")
    opt = torch.optim.AdamW(params, lr=1e-5)
    prompts = chat_prompts(args.model, args.completions // 8)
    ids, mask = encode_prompts(b.tokenizer, prompts, b.device)
    ids, mask = ids.repeat_interleave(8, 0), mask.repeat_interleave(8, 0)
    g = torch.Generator().manual_seed(0)
    comp = torch.randint(100, b.base.config.vocab_size - 100, (ids.shape[0], args.new_tokens), generator=g)
    full = torch.cat([ids, comp], 1)
    fmask = torch.cat([mask, torch.ones_like(comp)], 1)
    tmask = torch.cat([torch.zeros_like(mask), torch.ones_like(comp)], 1)
    adv = torch.randn(ids.shape[0], 1, generator=g)
    b.base.train()

    P = ids.shape[1]

    def step(shared: bool = False) -> tuple[float, float, float]:
        fwd = bwd = 0.0
        for s in range(0, full.shape[0], args.micro_batch):
            sl = slice(s, s + args.micro_batch)
            t0 = time.perf_counter()
            with b.use("policy"):
                if shared:
                    h = completion_hidden_states(b, ids[sl], mask[sl], comp[sl], fmask[sl, P:])
                    lp = logprobs_from_hidden(b, h, full[sl], tmask[sl]).logps
                else:
                    lp = token_logprobs(b, full[sl], fmask[sl], tmask[sl]).logps
            loss = -(lp * adv[sl]).sum() / tmask.sum()
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            fwd, bwd = fwd + t1 - t0, bwd + t2 - t1
        t0 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return fwd, bwd, time.perf_counter() - t0

    step()  # warm-up
    runs = [step() for _ in range(args.reps)]
    fwd, bwd, optim = (statistics.median(r[i] for r in runs) for i in range(3))

    cfg = b.base.config
    blocks, head = linear_macs(b.base)
    tokens = int(fmask.sum())  # real tokens through the backbone (left padding is computed too: counted below)
    rows_tokens = full.numel()
    comp_tokens = int(tmask.sum())
    L, d = cfg.num_hidden_layers, cfg.hidden_size
    attn = 2 * 2 * full.shape[1] * d * L  # per token: q k^T and p v over the sequence (causal: ~half; counted full)
    f_fwd = 2 * (blocks + attn) * rows_tokens + 2 * head * comp_tokens
    f_bwd = f_fwd + 2 * sum(p.numel() for p in params) * rows_tokens  # activation grads + LoRA weight grads
    if args.checkpointing:
        f_bwd += f_fwd
    inter = getattr(cfg, "intermediate_size", 4 * d)
    mm_lin = mm_gflops(rows_tokens // (full.shape[0] // args.micro_batch), d, inter)
    mm_head = mm_gflops(comp_tokens // (full.shape[0] // args.micro_batch), d, cfg.vocab_size)
    ach_f, ach_b = f_fwd / fwd / 1e9, f_bwd / bwd / 1e9
    print(f"\n{args.model}: {full.shape[0]} rows x {full.shape[1]} tokens ({tokens} real, {comp_tokens} completion), "
          f"micro-batch {args.micro_batch}, checkpointing {'on' if args.checkpointing else 'off'}, LoRA r16 on "
          f"every projection, {torch.get_num_threads()} threads; median of {args.reps} steps\n")
    print("| phase | s per step | share | GFLOP | achieved GFLOP/s |")
    print("|---|---|---|---|---|")
    total = fwd + bwd + optim
    for name, t, f in (("forward (backbone + fused log-probs)", fwd, f_fwd), ("backward", bwd, f_bwd),
                       ("optimizer (AdamW)", optim, None)):
        print(f"| {name} | {t:.2f} | {t / total * 100:.0f}% | {'-' if f is None else f'{f / 1e9:.0f}'} | "
              f"{'-' if f is None else f'{f / t / 1e9:.1f}'} |")
    print(f"| step | {total:.2f} | 100% | {(f_fwd + f_bwd) / 1e9:.0f} | {(f_fwd + f_bwd) / total / 1e9:.1f} |")
    print(f"\nplain torch.mm in this process: {mm_lin:.1f} GFLOP/s on the micro-batch's largest linear shape "
          f"({rows_tokens // (full.shape[0] // args.micro_batch)} x {d} @ {d} x {inter}), {mm_head:.1f} GFLOP/s on "
          f"the head's ({comp_tokens // (full.shape[0] // args.micro_batch)} x {d} @ {d} x {cfg.vocab_size}).")
    print(f"achieved / matmul: forward {ach_f / mm_lin:.2f}, backward {ach_b / mm_lin:.2f}, step "
          f"{(f_fwd + f_bwd) / total / 1e9 / mm_lin:.2f}")

    if args.profile:
        profile_step(step)

    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.reps):
        for shared in (False, True):
            times[shared].append(sum(step(shared)))
    whole_s, shared_s = (statistics.median(times[k]) for k in (False, True))
    print(f"\nprompt sharing, alternating, median of {args.reps}:\n")
    print("| forward of the rows | s per step | vs whole |")
    print("|---|---|---|")
    print(f"| whole rows | {whole_s:.2f} | 1.00x |")
    print(f"| each prompt once per micro-batch | {shared_s:.2f} | {shared_s / whole_s:.2f}x |")


if __name__ == "__main__":
    main()
