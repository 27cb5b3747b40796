"""Rollout speed: completions per second of HF ``generate`` on the shared base with the policy LoRA unmerged.

    python benchmarks/bench_rollout.py                                  # Qwen2.5-0.5B shape, bf16, 8x8x256
    python benchmarks/bench_rollout.py --size 1.5b --quantization nf4 --variants dynamic static_compiled

A random-weight model with a real configuration's sizes (no hub here) and the character-level wide tokenizer
is built once; the policy adapter is added through ``ModelBundle`` (LoRA on every projection, its B matrices
made non-zero so the adapter really changes the output). Each variant runs in a fresh process (clean peak
memory, no compiled state shared), generates ``prompts x generations`` completions of exactly
``--new-tokens`` tokens (EOS suppressed, so every variant does the same work), once to warm up (compilation)
and ``--reps`` times timed. Variants:

* ``dynamic``: what ``lowalign.generation.generate`` does today (``DynamicCache``, eager).
* ``static``: a preallocated ``StaticCache``, eager.
* ``static_compiled``: ``StaticCache`` and transformers' compiled decode step (torch.compile,
  ``reduce-overhead``: CUDA graphs).

``lowalign`` and ``lowalign_repeated`` (below) also run on the random-weight model, with its character
prompts.

With ``--model PATH`` (a real model directory, e.g. SmolLM2-135M-Instruct converted from its GGUF, or
``package:smollm2-135m-instruct``) the prompts are the built-in arithmetic task's chat prompts and three more
variants run (``--variants plain plain_lora lowalign``; the baseline column is then ``plain_lora``):

* ``plain``: transformers ``generate`` on the model as loaded, no adapter (each prompt repeated per completion).
* ``plain_lora``: the same with a peft LoRA (the same r16 adapter) unmerged: what a user's loop does.
* ``lowalign``: ``lowalign.generation.generate`` as the trainers call it (row-seeded sampler; each prompt's
  prefill computed once and its KV cache shared by the group's completions).
* ``lowalign_repeated``: the same with each prompt's KV cache repeated to its group's rows (what the rollout
  did before ``GroupedPrompt``: every decode step's attention reads the prompt once per row).
* ``lowalign_hf``: the same with ``engine="hf"`` (transformers' ``generate`` on every row's prompt).

``--shots N`` puts N worked examples ("Example: what is 3 + 13? Answer: 16.") before each question: few-shot
prompts, where the prompt is most of what the decode steps attend to.

    python benchmarks/bench_rollout.py --model package:smollm2-135m-instruct --new-tokens 16 \
        --variants plain plain_lora lowalign lowalign_hf
    python benchmarks/bench_rollout.py --model package:smollm2-135m-instruct --new-tokens 16 --reps 1 \
        --variants lowalign --profile        # where a rollout's time goes, by op and shape
    python benchmarks/bench_rollout.py --model package:smollm2-135m-instruct --new-tokens 32 --shots 30 \
        --variants lowalign lowalign_repeated  # ~600-token prompts: the prompt's keys once per group or per row

Greedy completions of each variant are compared with the baseline's token by token. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {  # the published configurations' numbers (Qwen2.5 family): random weights, same cost
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
}
VARIANTS = ("dynamic", "static", "static_compiled", "plain", "plain_lora", "lowalign", "lowalign_repeated",
            "lowalign_hf")


def build_model(size: str, out: Path) -> Path:
    """Save a random-weight model of ``size`` (in the compute dtype) and the wide tokenizer to ``out``."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from lowalign.tiny import wide_tokenizer

    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    cfg = Qwen2Config(**SIZES[size], max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(out)
    wide_tokenizer(cfg.vocab_size).save_pretrained(out)
    return out


def prompts(n: int, chars: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "sum", "of", "the", "numbers", "is", "what", "compute"]
    out = []
    for _ in range(n):
        s = ""
        while len(s) < chars:
            s += rng.choice(words) + " "
        out.append(s[:chars])
    return out


def _randomize_lora_b(model) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p))


def load_policy(model_dir: Path, quantization: str, dtype: str = "auto"):
    from lowalign.bundle import ModelBundle
    from lowalign.config import LoraConfig, ModelConfig

    b = ModelBundle.load(ModelConfig(name_or_path=str(model_dir), quantization=quantization, dtype=dtype,
                                     gradient_checkpointing=True))
    torch.manual_seed(0)  # PEFT draws lora_A from the global generator
    b.add_adapter("policy", LoraConfig(r=16, alpha=32))
    _randomize_lora_b(b.base)
    return b


def chat_prompts(model: str, n: int) -> list[str]:
    """The built-in arithmetic task's first ``n`` training prompts in ``model``'s chat template."""
    from lowalign.api import config_from_dict, load_data
    from lowalign.data import prepare_prompts
    from lowalign.models import load_tokenizer, resolve_path

    cfg = config_from_dict({"algorithm": "grpo", "model": {"name_or_path": model}, "data": {"chat_template": True}})
    data = load_data(cfg, None)
    prepare_prompts(data, load_tokenizer(resolve_path(model)), cfg.data)
    return [r["prompt"] for r in data.batch(0, n, cfg.seed)]


def lowalign_run(b, texts: list[str], variant: str, args) -> tuple:
    """(generate(sample: bool) -> completion ids, rows) through ``lowalign.generation.generate`` as the
    trainers call it (row-seeded sampler), for the ``lowalign*`` variants."""
    from lowalign.generation import GroupedPrompt, generate, row_seed

    if variant == "lowalign_repeated":
        GroupedPrompt.applies = staticmethod(lambda config: False)
    seeds = [row_seed(0, i) for i in range(len(texts) * args.generations)]

    def run(sample: bool):
        with b.use("policy"):
            return generate(b, texts, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                            num_generations=args.generations, do_sample=sample, row_seeds=seeds if sample else None,
                            engine="hf" if variant == "lowalign_hf" else "lowalign").completion_ids
    return run, len(texts) * args.generations


def real_worker(variant: str, args) -> tuple:
    """(generate(sample: bool) -> completion ids, rows) for the ``--model`` variants."""
    from lowalign.generation import encode_prompts
    from lowalign.models import resolve_path, resolve_target_modules

    texts = chat_prompts(args.model, args.prompts)
    if args.shots:
        shots = "".join(f"Example: what is {i} + {2 * i + 7}? Answer: {3 * i + 7}.\n" for i in range(args.shots))
        texts = [t.replace("What is", shots + "What is", 1) for t in texts]
    if variant.startswith("lowalign"):
        b = load_policy(Path(resolve_path(args.model)), args.quantization, args.dtype)
        return lowalign_run(b, texts, variant, args)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lowalign.models import load_tokenizer

    path = resolve_path(args.model)
    tok = load_tokenizer(path)
    tok.padding_side = "left"
    dtype = torch.float32 if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if variant == "plain_lora":
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=resolve_target_modules(
            model, "auto"), task_type="CAUSAL_LM")).eval()
        _randomize_lora_b(model)
    ids, mask = encode_prompts(tok, texts, model.device)
    ids, mask = ids.repeat_interleave(args.generations, 0), mask.repeat_interleave(args.generations, 0)

    def run(sample: bool):
        s = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=None) if sample else dict(
            do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id, use_cache=True, **s)[:, ids.shape[1]:]
    return run, ids.shape[0]


def _log(*a) -> None:
    print(f"[{time.strftime('%X')}]", *a, file=sys.stderr, flush=True)


def worker(variant: str, args) -> dict:
    from lowalign.generation import encode_prompts

    _log(variant, "loading")
    if args.model:
        return timed(variant, args, *real_worker(variant, args), cuda=torch.cuda.is_available())
    b = load_policy(Path(args.work) / args.size, args.quantization)
    if variant.startswith("lowalign"):  # the random model's character prompts, lowalign's rollout
        return timed(variant, args, *lowalign_run(b, prompts(args.prompts, args.prompt_chars), variant, args),
                     cuda=b.device.type == "cuda")
    tok, model = b.tokenizer, b.causal_lm
    ids, mask = encode_prompts(tok, prompts(args.prompts, args.prompt_chars), b.device)
    ids, mask = ids.repeat_interleave(args.generations, 0), mask.repeat_interleave(args.generations, 0)
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id,
              eos_token_id=tok.eos_token_id, use_cache=True)
    if variant != "dynamic":
        kw["cache_implementation"] = "static"
        kw["disable_compile"] = variant == "static"
    model.eval()
    cuda = b.device.type == "cuda"

    def run(sample: bool):
        s = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=None) if sample else dict(
            do_sample=False, temperature=None, top_p=None, top_k=None)
        with b.use("policy"), torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, **kw, **s)[:, ids.shape[1]:]

    return timed(variant, args, run, ids.shape[0], cuda)


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def profile_rollout(variant: str, run) -> None:
    """One more sampled rollout under torch.profiler, to stderr: the ops by self time and input shapes (a
    matmul's GFLOP/s is 2 m k n over its time per call), and the machine's memory bandwidth (a 512 MiB copy),
    against which a decode step that reads every weight once can be set."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run(True)
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40, max_shapes_column_width=60)
    by_name = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40)
    a = torch.ones(128 * 2**20)  # touched: untouched pages would all read the one zero page
    b = torch.empty_like(a)
    b.copy_(a)
    t0 = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    gbs = 5 * 2 * a.numel() * 4 / (time.perf_counter() - t0) / 1e9
    _log(variant, f"one rollout under torch.profiler:\n{table}\nby op:\n{by_name}\n"
                  f"memory bandwidth (512 MiB copy, read + write): {gbs:.1f} GB/s")


def timed(variant: str, args, run, rows: int, cuda: bool) -> dict:
    """Warm up, time ``--reps`` sampled rollouts, save the greedy completions for the comparison."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    run(True)  # warm-up: compilation, cache allocation
    sync()
    warm = time.perf_counter() - t0
    _log(variant, f"warm-up {warm:.1f} s")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ts = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        out = run(True)
        sync()
        ts.append(time.perf_counter() - t0)
        _log(variant, f"rollout {ts[-1]:.2f} s")
    assert out.shape == (rows, args.new_tokens), out.shape
    if args.profile:
        profile_rollout(variant, run)
    greedy = run(False)
    np_ = Path(args.work) / f"greedy_{variant}.pt"
    torch.save(greedy.cpu(), np_)
    med = sorted(ts)[len(ts) // 2]
    return {"variant": variant, "warmup_s": round(warm, 2), "s": round(med, 3), "all_s": [round(t, 3) for t in ts],
            "completions_per_s": rows / med, "tokens_per_s": rows * args.new_tokens / med,
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mib(),
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="0.5b", choices=sorted(SIZES))
    ap.add_argument("--model", default=None, help="a real model (directory, .gguf, package:...) instead of --size")
    ap.add_argument("--quantization", default="none", choices=["none", "nf4", "int8"])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--prompt-chars", type=int, default=256, help="prompt length (1 token per character)")
    ap.add_argument("--shots", type=int, default=0, help="--model: worked examples before each question")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="--model: the weights' dtype (auto: lowalign's default, float32 on a CPU)")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--work", default=None, help="folder for the model (kept; default: a temporary folder)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--profile", action="store_true",
                    help="each variant also profiles one rollout (ops by shape, to stderr) and measures the memory "
                         "bandwidth")
    ap.add_argument("--variant-timeout", type=float, default=300, help="give up on a variant after this long")
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory()
        args.work = tmp.name
    if args.model is None:
        build_model(args.size, Path(args.work) / args.size)
    else:
        from lowalign.models import resolve_path

        resolve_path(args.model)  # convert a GGUF once, before the workers
    rows = []
    for v in args.variants:
        cmd = [sys.executable, __file__, "--worker", v] + [a for a in sys.argv[1:] if a != "--worker"]
        cmd += ["--work", args.work] if "--work" not in sys.argv else []
        try:  # the worker's log goes straight to our stderr
            p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO, timeout=args.variant_timeout)
        except subprocess.TimeoutExpired:
            rows.append({"variant": v, "error": f"over {args.variant_timeout} s"})
            continue
        if p.returncode != 0:
            rows.append({"variant": v, "error": f"exit {p.returncode} (see the log)"})
            continue
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    anchor = "plain_lora" if args.model else "dynamic"
    ref = Path(args.work) / f"greedy_{anchor}.pt"
    base = next((r for r in rows if r["variant"] == anchor and "error" not in r), None)
    dev = next((r["device"] for r in rows if "device" in r), "?")
    what = (f"{args.model}, chat prompts of the arithmetic task{f' with {args.shots} examples' if args.shots else ''}"
            if args.model else
            f"Qwen2.5-{args.size} shape, random weights, {args.prompt_chars}-token prompts")
    print(f"\n{dev}; {what}; quantization {args.quantization}, LoRA r16 unmerged; {args.prompts} prompts x "
          f"{args.generations} generations, {args.new_tokens} new tokens; median of {args.reps}\n")
    print(f"| variant | s per rollout | completions/s | tokens/s | vs {anchor} | peak MiB | warm-up s "
          f"| greedy = {anchor} |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | failed: {r['error']} | | | | | | |")
            continue
        same = "-"
        if ref.exists() and (Path(args.work) / f"greedy_{r['variant']}.pt").exists():
            a, b = torch.load(ref), torch.load(Path(args.work) / f"greedy_{r['variant']}.pt")
            same = f"{(a == b).float().mean().item() * 100:.1f}% of tokens" if a.shape == b.shape else "shape differs"
        sp = f"{base['s'] / r['s']:.2f}x" if base else "-"
        pk = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        print(f"| {r['variant']} | {r['s']:.2f} | {r['completions_per_s']:.1f} | {r['tokens_per_s']:.0f} | {sp} | {pk} "
              f"| {r['warmup_s']} | {same} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
