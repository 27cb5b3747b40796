"""Every trainer resumes bit-identically after SIGKILL (GRPO and PPO have theirs in tests/algorithms): the
killed-and-resumed run ends with the same adapters, heads and metrics as an uninterrupted one."""

import pytest
import torch

from ..algorithms.helpers import cli, kill_after_checkpoint, metrics, same_adapters, summary

CASES = {  # name: (recipe, overrides, adapters, deterministic metric keys)
    "dpo": ("recipes/dpo_tiny.yaml", ["train.steps=40", "data.num_pairs=64", "train.eval_pairs=16",
                                      "train.batch_size=8"],
            ["policy"], ("loss", "grad_norm", "rewards/margin", "rewards/accuracy")),
    "reward_model": ("recipes/rm_tiny.yaml", ["train.steps=40", "data.num_pairs=64", "train.eval_pairs=16",
                                              "train.batch_size=8"],
                     ["reward"], ("loss", "accuracy", "grad_norm")),
    "reward_model_ppo_m": ("recipes/rm_tiny.yaml", ["train.steps=12", "data.num_pairs=32", "train.eval_pairs=8",
                                                    "train.batch_size=8", "train.confidence_pairs=true"],
                           ["reward"], ("loss", "accuracy", "grad_norm")),
    "reward_model_ratings": ("recipes/rm_ratings_tiny.yaml", ["train.steps=12", "train.batch_size=8",
                                                              "train.eval_pairs=8"],
                             ["reward"], ("loss", "rank_accuracy", "mae/correctness", "grad_norm")),
    "sft": ("recipes/sft_tiny.yaml", ["train.steps=40", "train.batch_size=8"], ["policy"],
            ("loss", "token_acc", "grad_norm", "lr")),
    # the preference family shares DPO's loop; each has its own loss, data path (KTO) and reference use
    **{a: (f"recipes/{a}_tiny.yaml", ["train.steps=12", "data.num_pairs=48", "train.eval_pairs=16",
                                      "train.batch_size=8"], ["policy"], ("loss", "grad_norm", *keys))
       for a, keys in (("orpo", ("nll/chosen", "log_odds_ratio")), ("simpo", ("rewards/margin",)),
                       ("kto", ("kl", "rewards/desirable")), ("tdpo", ("kl/rejected", "rewards/margin")))},
    # the listwise objectives on the same loop, over ranked lists
    **{a: (f"recipes/{a}_tiny.yaml", ["train.steps=12", "train.num_lists=48", "train.eval_lists=8",
                                      "train.batch_size=4"], ["policy"], ("loss", "grad_norm", "ranking_accuracy",
                                                                          "nll/best"))
       for a in ("pro", "rrhf")},
    # ReMax, REINFORCE++, RAFT and SuperHF run on GRPO's sampling loop (GRPO's resume test is in algorithms/)
    **{a: (f"recipes/{r}.yaml", ["train.steps=12", "train.prompts_per_step=8"], ["policy"],
           ("loss", "grad_norm", "reward", key))
       for a, r, key in (("remax", "remax_tiny", "reward_greedy"), ("reinforce_pp", "reinforcepp_tiny", "reward_kl"),
                         ("raft", "raft_tiny", "kept"), ("superhf", "superhf_tiny", "kl"))},
    "pfppo": ("recipes/pfppo_tiny.yaml", ["train.steps=12", "train.prompts_per_step=8"], ["policy", "value"],
              ("loss", "grad_norm", "reward", "filter/score_kept_mean", "value_loss")),
    "essa": ("recipes/es_tiny.yaml", ["train.generations=12", "train.population_size=4",
                                      "train.prompts_per_generation=8", "eval.batch_size=8"],
             ["policy"], ("fitness/mean", "fitness/std", "update_norm", "theta_norm", "sigma")),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, name):
    recipe, extra, adapters, keys = CASES[name]
    args = [recipe, *extra, "train.checkpoint_every=2", "eval.num_examples=8", "threads=1"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    cli("run", *args, f"output_dir={full}")
    last = next(int(a.split("=")[1]) for a in extra if a.startswith(("train.steps=", "train.generations=")))
    kill_after_checkpoint(args, killed, "step_000004", f"step_{last:06d}")
    p = cli("run", str(killed))
    assert "resumed from" in p.stderr and "taking over the stale lock" in p.stderr
    for a in adapters:
        assert same_adapters(full, killed, a), a
    heads = full / "adapters" / "heads.safetensors"
    if heads.exists():
        from safetensors.torch import load_file

        ha, hb = load_file(str(heads)), load_file(str(killed / "adapters" / "heads.safetensors"))
        assert ha.keys() == hb.keys() and all(torch.equal(ha[k], hb[k]) for k in ha)
    ma, mb = metrics(full), metrics(killed)
    assert [r["step"] for r in mb] == [r["step"] for r in ma]
    for ra, rb in zip(ma, mb):
        assert {k: ra.get(k) for k in keys} == {k: rb.get(k) for k in keys}
    assert summary(full)["final"] == summary(killed)["final"]
