"""Peak memory of one PPO step: four roles on one shared base vs four separately loaded models.

    .venv/bin/python benchmarks/ppo_memory.py                          # Qwen2.5-0.5B shape, random weights
    .venv/bin/python benchmarks/ppo_memory.py --layers 4 --quantization nf4

A Qwen2-style model (the Qwen2.5-0.5B configuration by default: vocabulary 151936, hidden 896, 24 layers,
tied embeddings; random weights, since no model hub is reachable) and a reward_model run for it are made
once. Then each setup runs in a fresh process:

* ``shared``: lowalign's way. One ``ModelBundle``; policy and value adapters, the reward adapter + head and
  the reference (adapters off) are roles of the one base.
* ``four copies``: what a naive setup does. Policy, critic, reward model and reference are four separately
  loaded models (each its own ``ModelBundle``), with the same adapters and heads.

Both run the very same ``lowalign.algorithms.ppo.ppo_step`` (generation, reward scoring, reference and
value passes, one PPO epoch with backward and optimizer step); only the ``Roles`` mapping differs. Peak
memory is the peak during the PPO step, with everything loaded (the peak is reset after loading: CUDA
``reset_peak_memory_stats`` / Linux ``clear_refs``), above the process's memory before any model loaded:
CUDA allocated memory on a GPU, RSS on CPU. The checkpoint is saved in the compute dtype (bf16 on a GPU,
fp32 on CPU), and on CPU every loaded model's weights are made resident in private memory (see
``resident``), in both setups alike, so RSS counts what a GPU would hold. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                  tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6)


def _status(key: str) -> int:
    from lowalign.runtime import proc_status

    return proc_status(key)


def _memory_now() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else _status("VmRSS")


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def _peak() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _status("VmHWM")


def prepare(work: Path, layers: int) -> None:
    """The model directory (random weights, byte tokenizer) and a reward_model run directory for it."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from lowalign.bundle import ModelBundle
    from lowalign.config import LoraConfig, ModelConfig
    from lowalign.tiny import wide_tokenizer

    torch.manual_seed(0)
    cfg = Qwen2Config(**{**QWEN25_05B, "num_hidden_layers": layers}, pad_token_id=0, eos_token_id=1,
                      bos_token_id=None)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32  # what ModelConfig(dtype=auto) uses
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)  # saved in the compute dtype: no cast on load
    model.save_pretrained(work / "model")
    wide_tokenizer(cfg.vocab_size).save_pretrained(work / "model")
    del model
    b = ModelBundle.load(ModelConfig(name_or_path=str(work / "model"), device="cpu"))
    b.add_adapter("reward", LoraConfig())
    b.add_head("reward", 1)
    d = work / "rm" / "adapters"
    b.save_adapter("reward", d / "reward")
    b.save_heads(d / "heads.safetensors")
    (d / "reward_meta.json").write_text(json.dumps({"adapter": "reward", "weights": None}))


def resident(bundle):
    """Give every base weight its own memory, as on a GPU. On CPU transformers maps a checkpoint saved in
    the compute dtype lazily: only pages a forward reads become resident (a reward or value model that
    never reads the lm_head would hold almost none of its tied embedding), and loading one file four times
    would share one set of pages; neither is what four models cost on a GPU."""
    with torch.no_grad():
        for p in bundle.base.parameters():
            p.data = p.data.clone()
    return bundle


def worker(setup: str, work: Path, args) -> dict:
    from lowalign.algorithms.common import POLICY, make_optimizer
    from lowalign.algorithms.ppo import PPOState, Roles, add_critic, param_groups, ppo_step
    from lowalign.api import config_from_dict
    from lowalign.bundle import ModelBundle
    from lowalign.config import load_raw
    from lowalign.data import load_prompt_data
    from lowalign.losses.ppo import RunningMoments
    from lowalign.rewards import RewardSources

    cfg = config_from_dict(load_raw(REPO / "recipes" / "ppo_tiny.yaml"), [
        f"model.name_or_path={work / 'model'}", f"model.quantization={args.quantization}",
        f"train.prompts_per_step={args.batch}", f"train.max_new_tokens={args.new_tokens}", "train.ppo_epochs=1",
        "train.num_mini_batches=1", "train.critic=separate",
        f"rewards=[{{adapter: reward, path: '{work / 'rm'}'}}]"])
    data = load_prompt_data(cfg.data, cfg.seed, 8)
    cuda = torch.cuda.is_available()
    start = _memory_now()
    t0 = time.time()
    if setup == "shared":
        b = resident(ModelBundle.load(cfg.model))
        b.add_adapter(POLICY, cfg.lora)
        vparams = add_critic(b, cfg)
        b.load_reward("reward", work / "rm")
        roles, reward_bundle = Roles.shared(b, "separate"), b
        bases = 1
    else:  # four models, each loaded from disk, each with only its own role's adapter and head
        pb, vb, rb, refb = (resident(ModelBundle.load(cfg.model)) for _ in range(4))
        pb.add_adapter(POLICY, cfg.lora)
        vparams = add_critic(vb, cfg)
        rb.load_reward("reward", work / "rm")
        roles, reward_bundle, b = Roles(pb, vb, refb, "separate"), rb, pb
        bases = 4
    rewards = RewardSources(cfg.rewards, scorer=reward_bundle.score_attributes)
    groups = param_groups(b, cfg, vparams)
    opt, sched = make_optimizer(groups, cfg.train.optim, 1)
    state = PPOState(cfg.train.kl_coef, RunningMoments())
    for bb in {id(x): x for x in (roles.policy, roles.value, roles.reference, reward_bundle)}.values():
        bb.base.train()
    gc.collect()
    loaded = _memory_now() - start
    _reset_peak()  # the step's peak, everything loaded (loading transients are not the question here)
    t1 = time.time()
    m = ppo_step(cfg, data, roles, 0, opt, sched, rewards, state, [p for g in groups for p in g["params"]])
    peak = _peak() - start
    return {"setup": setup, "bases_loaded": bases, "loaded_bytes": loaded, "peak_bytes": peak,
            "load_s": round(t1 - t0, 1),
            "step_s": round(time.time() - t1, 1), "time": {k: v for k, v in m.items() if k.startswith("time/")},
            "completion_length": m["completion_length"], "device": "cuda" if cuda else "cpu"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24, help="transformer layers (24: Qwen2.5-0.5B)")
    ap.add_argument("--quantization", default="none", choices=["none", "nf4", "int8"])
    ap.add_argument("--batch", type=int, default=4, help="prompts per PPO step")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--worker", choices=["shared", "four"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.work), args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args.layers)
        rows = []
        for setup in ("shared", "four"):
            cmd = [sys.executable, __file__, "--worker", setup, "--work", str(work), "--layers", str(args.layers),
                   "--quantization", args.quantization, "--batch", str(args.batch),
                   "--new-tokens", str(args.new_tokens)]
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if p.returncode != 0:
                raise SystemExit(f"{setup} failed:\n{p.stderr[-3000:]}")
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    shared, four = rows
    print(f"Qwen2-style, vocab {QWEN25_05B['vocab_size']}, hidden {QWEN25_05B['hidden_size']}, {args.layers} layers, "
          f"quantization {args.quantization}, {args.batch} prompts x {args.new_tokens} new tokens, "
          f"device {shared['device']}\n")
    mem = "RSS" if shared["device"] == "cpu" else "CUDA allocated"
    print(f"| setup | base copies | {mem} after loading, MiB | peak {mem} in the PPO step, MiB | load s | step s "
          "| peak vs four copies |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'shared (lowalign)' if r['setup'] == 'shared' else 'four separate models'} | {r['bases_loaded']} "
              f"| {r['loaded_bytes'] / 2**20:.0f} | {r['peak_bytes'] / 2**20:.0f} | {r['load_s']} | {r['step_s']} | "
              f"{r['peak_bytes'] / four['peak_bytes']:.2f}x |")

if __name__ == "__main__":
    main()
