"""The single entry point behind the CLI and notebooks: resolve config, validate, load once, run."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lowalign import config as C
from lowalign.algorithms import algorithms, data_kind, train_configs
from lowalign.distributed import SINGLE, Dist, world_size
from lowalign.runtime import (
    PHASES,
    Checkpointer,
    RunDir,
    RunInterrupted,
    RunLock,
    check_output_dir,
    check_writable,
    interrupted_message,
    peak_memory_bytes,
    seed_everything,
)


@dataclass
class RunContext:
    """What an algorithm receives: config, the model bundle, data, run dir and checkpointer."""

    cfg: C.RunConfig
    bundle: object
    data: object
    run_dir: RunDir
    checkpointer: Checkpointer
    console: object
    resumed_state: dict | None = None  # the checkpoint's state.json (+ "extra") when resuming
    dist: Dist = SINGLE  # this process's rank among torchrun's (one process: rank 0 of 1)
    on_resumed: object = None  # called with the step once a resume has loaded its checkpoint (or found none)


def check_config(cfg: C.RunConfig) -> None:
    """The checks that need more than the config layer: reward functions import, the backend exists, the
    algorithm's own cross-field rules, and the model's config.json (architecture, tokenizer size, LoRA
    targets: ``auto`` is resolved here, in place). Runs before any model loads or any directory is created."""
    from lowalign.models import check_model
    from lowalign.rewards import import_reward
    from lowalign.trackers import check_backends

    for i, r in enumerate(cfg.rewards):
        if r.fn is not None:
            import_reward(r.fn, f"rewards[{i}].fn")
        if r.dpo_adapter is not None:
            if cfg.algorithm != "ppo":
                raise C.ConfigError(f"rewards[{i}].dpo_adapter: a per-token reward (RTO) is for algorithm: ppo, not "
                                    f"'{cfg.algorithm}'")
            C.saved_adapter_dir(r.dpo_adapter, f"rewards[{i}].dpo_adapter")
    if cfg.model.backend == "unsloth":
        from lowalign.bundle import check_unsloth_available

        check_unsloth_available()
    algo = algorithms()[cfg.algorithm]
    if cfg.data.pairs_as_feedback and data_kind(cfg) != "feedback":
        raise C.ConfigError(f"data.pairs_as_feedback: '{cfg.algorithm}' reads {data_kind(cfg)}, not unpaired feedback "
                            "rows (it is for algorithm: kto)")
    if algo.check is not None:
        algo.check(cfg)
    _check_soup(cfg.reference_soup)
    _check_reward_attributes(cfg.rewards)
    check_backends(cfg.logging)
    if cfg.profile_memory:
        from lowalign.bundle import resolve_device
        from lowalign.runtime import check_profile_memory

        check_profile_memory(resolve_device(cfg.model.device))
    check_model(cfg)


def _check_reward_attributes(specs) -> None:
    """``attribute_weights`` name outputs of the reward run's head (its reward_meta.json, no weights)."""
    import json

    for i, r in enumerate(specs):
        if r.attribute_weights is None:
            continue
        root = Path(r.path) / "adapters" if (Path(r.path) / "adapters").is_dir() else Path(r.path)
        f = root / "reward_meta.json"
        if not f.exists():
            raise C.ConfigError(f"rewards[{i}].path: no reward_meta.json in {root} (not a reward_model run)")
        names = json.loads(f.read_text()).get("attributes") or []
        unknown = sorted(set(r.attribute_weights) - set(names))
        if len(names) < 2 or unknown:
            raise C.ConfigError(f"rewards[{i}].attribute_weights: {unknown or sorted(r.attribute_weights)} are not "
                                f"attributes of the reward model in {r.path} (it has {names})")


def _check_soup(dirs: list[str]) -> None:
    """The adapters of a reference soup average element-wise: same rank and target modules (their
    adapter_config.json files, before any weights load)."""
    import json

    shapes = []
    for i, d in enumerate(dirs):
        f = Path(d).expanduser() / "adapter_config.json"
        if not f.exists():
            raise C.ConfigError(f"reference_soup[{i}]: no adapter_config.json in {d}")
        c = json.loads(f.read_text())
        shapes.append((c.get("r"), sorted(c.get("target_modules") or [])))
        if shapes[i] != shapes[0]:
            raise C.ConfigError(f"reference_soup[{i}]: rank {shapes[i][0]} on {shapes[i][1]} does not match "
                                f"reference_soup[0] (rank {shapes[0][0]} on {shapes[0][1]}); a soup averages "
                                "adapters of one shape")  # config.json only: a skeleton on the meta device, no weights


def config_from_dict(raw: dict, overrides=None) -> C.RunConfig:
    """Parse (config layer, with the algorithm registry) and check (:func:`check_config`) a recipe."""
    cfg = C.from_dict(raw, overrides, train_configs=train_configs())
    check_config(cfg)
    return cfg


def load_config(path, overrides=None) -> C.RunConfig:
    return config_from_dict(C.load_raw(path), overrides)


def resolve_config(config, overrides=None) -> tuple[C.RunConfig, str]:
    """Returns the validated config and a short name for the run directory."""
    overrides = list(overrides or [])
    if isinstance(config, C.RunConfig):
        cfg = config_from_dict(dataclasses.asdict(config), overrides)
        return cfg, cfg.algorithm
    if isinstance(config, dict):
        return config_from_dict(config, overrides), config.get("algorithm", "run")
    p = Path(config)
    if p.is_dir():  # a run directory: resume it with its own resolved config
        if not (p / "config.yaml").exists():
            raise C.ConfigError(f"{p} is a directory without config.yaml (not a lowalign run directory)")
        cfg = config_from_dict(C.load_raw(p / "config.yaml"), [f"output_dir={p}", "resume=true", *overrides])
        return cfg, p.name
    return load_config(p, overrides), p.stem


def load_data(cfg: C.RunConfig, tokenizer):
    """Prompt rows (or the built-in task) for most algorithms; for preference algorithms with a file or
    hub source, the validated pairs or KTO's feedback rows (``tokenizer``, the run's, renders chat templates
    and measures lengths)."""
    from lowalign.data import PromptData, is_builtin, load_prompt_data

    builtin = is_builtin(cfg.data)
    kind = data_kind(cfg)
    if kind == "ratings" and builtin:
        raise C.ConfigError("train.attributes: names the score columns of a rating file; set data.path (the "
                            "built-in task has no rating file: scripts/make_rating_file.py writes one)")
    if kind in ("preferences", "feedback", "ratings") and not builtin:
        from functools import partial

        from lowalign.preference import load_file_feedback, load_file_pairs, load_file_ratings

        n_eval = getattr(cfg.train, "eval_pairs", None) or getattr(cfg.train, "eval_lists", 500)
        load = {"preferences": load_file_pairs, "feedback": load_file_feedback,
                "ratings": partial(load_file_ratings, columns=getattr(cfg.train, "attributes", []))}[kind]
        return PromptData(None, [], None, pairs=load(cfg.data, tokenizer, cfg.seed, n_eval))
    return load_prompt_data(cfg.data, cfg.seed, cfg.eval.num_examples)


def calibration_texts(cfg: C.RunConfig, data) -> list[str]:
    """``model.gptq_rows`` training prompts (as the run renders them), each followed by its answer when the data
    has one: what GPTQ calibrates an nf4 base on. Deterministic in the config, so a resumed run, ``bon`` and
    ``export`` find the same cached calibration."""
    n = cfg.model.gptq_rows
    if data.task is not None:
        rows = data.batch(0, n, cfg.seed)
    elif data.train_rows:
        rows = data.train_rows[:n]
    else:  # preference and feedback files: their prompts and chosen (or rated) replies
        rows = [{"prompt": r["prompt"], "answer": r.get("chosen", r.get("completion"))} for r in data.pairs.train[:n]]
    return [r["prompt"] + (str(r["answer"]) if r.get("answer") is not None else "") for r in rows]


def load_bundle(cfg: C.RunConfig, tokenizer, data, console=None):
    """The run's base, once (:meth:`ModelBundle.load`), with its nf4 weights calibrated when
    ``model.gptq_rows`` asks for it (after ``prepare_prompts``)."""
    from lowalign.bundle import ModelBundle

    with PHASES.phase("load"):
        bundle = ModelBundle.load(cfg.model, tokenizer=tokenizer)
    if cfg.model.gptq_rows:
        with PHASES.phase("calibration"):  # a phase of its own: the planner plans it apart (its Hessians)
            info = bundle.calibrate_nf4(calibration_texts(cfg, data))
        if console is not None:
            how = "cached" if info["cached"] else "computed"
            console.print(f"model: nf4 weights calibrated with GPTQ on {info['tokens']} tokens "
                          f"({cfg.model.gptq_rows} prompts; {info['layers']} linears, {how}: {info['path']})")
    return bundle


def run_root(path) -> Path | None:
    """The run directory (the one holding ``config.yaml``) that ``path`` is, or that ``path`` is a checkpoint
    of (``checkpoints/step_N``); None for anything else (a bare saved adapter folder)."""
    p = Path(path).expanduser()
    if (p / "config.yaml").is_file():
        return p
    if (p / "adapters").is_dir() and (p.parent.parent / "config.yaml").is_file():
        return p.parent.parent
    return None


def calibrate_as_run(bundle, root: Path) -> None:
    """Give ``bundle`` (an nf4 base, adapters not yet attached) the GPTQ-calibrated 4-bit weights the run at
    ``root`` trained against (``model.gptq_rows``): from the cache, or calibrated again on the same texts."""
    from lowalign.data import prepare_prompts

    cfg = config_from_dict(C.load_raw(root / "config.yaml"))
    data = load_data(cfg, bundle.tokenizer)
    prepare_prompts(data, bundle.tokenizer, cfg.data)
    bundle.calibrate_nf4(calibration_texts(cfg, data))


def resolve_memory(cfg: C.RunConfig, device: str, world: int = 1, console=None) -> None:
    """Fill in ``train.micro_batch_size: auto`` and ``model.gradient_checkpointing: auto`` (in place) from the
    planner and the memory budget, and say what was chosen; before any weights load. Nothing fitting is a
    ConfigError naming the smallest setting's peak."""
    from lowalign.planner import fit_memory

    if C.AUTO not in (getattr(cfg.train, "micro_batch_size", None), cfg.model.gradient_checkpointing):
        return
    fit = fit_memory(cfg, device, world)
    fit.fill(cfg)
    if console is not None:
        console.print(fit.describe())


# Fields a resume may change (prefixes end in '.'): what to log, evaluate and keep, how long to run, memory and
# threads. Anything else changes what the checkpoint holds (shapes: model, lora), the data or the objective, or
# is restored from the checkpoint and would be silently ignored (the optimizer and its schedule).
RESUME_FREE = ("description", "output_dir", "resume", "threads", "profile_memory", "eval.", "logging.",
               "train.steps", "train.generations", "train.max_time_s", "train.log_every", "train.checkpoint_every",
               "train.keep_checkpoints", "train.micro_batch_size", "train.memory_budget",
               "train.reference_cache_dir", "model.gradient_checkpointing")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(cfg: C.RunConfig, stored: C.RunConfig) -> dict[str, tuple]:
    """Fields where a resume's config differs from the run's ``config.yaml``: ``{key: (old, new)}``, only ones a
    resume may change (:data:`RESUME_FREE`); any other difference is a ``ConfigError`` naming it, raised before
    any model loads or any file changes."""
    new, old = _flat(C.to_dict(cfg)), _flat(C.to_dict(stored))
    diff = {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}
    refused = [k for k in diff if not any(k == f or (f.endswith(".") and k.startswith(f)) for f in RESUME_FREE)]
    if refused:
        shown = "; ".join(f"{k}: {diff[k][0]!r} in the run, {diff[k][1]!r} now" for k in refused[:4])
        why = ("the optimizer and its schedule are restored from the checkpoint, so a new value would be ignored"
               if all(k.startswith("train.optim.") for k in refused) else
               "it changes what the checkpoint holds (model, adapter shapes), the data or the objective")
        free = ", ".join(f.rstrip(".") + (".*" if f.endswith(".") else "") for f in RESUME_FREE[3:])
        raise C.ConfigError(f"resume: cannot change {', '.join(refused)} ({shown}): {why}. Drop the override, or "
                            f"start a new run from this one's adapter (lora.init_from=<run>/adapters/policy). A "
                            f"resume may change: {free}")
    return diff


def default_output_dir(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def init_distributed():
    """torchrun sets WORLD_SIZE/RANK: join the process group (gloo on CPU, NCCL on GPUs)."""
    import os

    world = world_size()
    if world <= 1:
        return SINGLE
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), world, torch.device("cuda", torch.cuda.current_device()) if cuda else "cpu")


def check_world(cfg: C.RunConfig, world: int) -> None:
    """Under ``torchrun``: the algorithm runs data-parallel and its step batch splits evenly over ranks."""
    if world <= 1:
        return
    field = algorithms()[cfg.algorithm].shards
    if field is None:
        raise C.ConfigError(f"algorithm: '{cfg.algorithm}' runs in one process only (not under torchrun with "
                            f"{world} processes)")
    n = getattr(cfg.train, field)
    if n % world:
        raise C.ConfigError(f"train.{field}: {n} does not split over {world} processes (torchrun "
                            f"--nproc_per_node); use a multiple of {world}")


def run(config, overrides=None, *, quiet: bool = False) -> dict:
    from rich.console import Console

    t0 = time.time()
    cfg, name = resolve_config(config, overrides)  # validate before joining any process group
    check_world(cfg, world_size())  # before joining: every process fails alike
    dist = init_distributed()
    console = Console(stderr=True, quiet=quiet or not dist.main)
    if cfg.resume and not cfg.output_dir:
        raise C.ConfigError("resume: true needs output_dir (the run directory to continue)")
    out = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(name)
    if not cfg.resume and (out / "checkpoints" / "latest").exists():
        raise C.ConfigError(f"output_dir: {out} already holds a run; pass resume=true or a new output_dir")
    check_output_dir(out)  # a user's own non-empty folder is never written into
    changes = None
    if cfg.resume and (out / "config.yaml").exists():  # before anything loads: a resume cannot break the run
        changes = resume_changes(cfg, config_from_dict(C.load_raw(out / "config.yaml")))
        if _describe(changes):
            console.print("resume: " + _describe(changes), soft_wrap=True)
    if dist.world > 1 and not cfg.output_dir:  # every rank must name the same directory: rank 0's clock
        out = Path(_broadcast_text(str(out)))
    cfg.output_dir = str(out)
    check_writable(out)
    lock = RunLock(out)
    if dist.main:
        lock.check()  # before any model work: another live run may own this directory
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)

    from lowalign.data import prepare_prompts
    from lowalign.models import load_tokenizer, resolve_path

    algo = algorithms()[cfg.algorithm]
    tok = load_tokenizer(resolve_path(cfg.model.name_or_path, cfg.model.gguf_file, console),
                         cfg.model.trust_remote_code)  # once per run
    data = load_data(cfg, tok)  # before any model work
    if algo.check_data is not None:
        algo.check_data(cfg, data)
    if cfg.rewards and data.pairs is None:
        from lowalign.rewards import RewardSources

        RewardSources(cfg.rewards, checker=data.checker).probe(data.batch(0, 2, cfg.seed))
    if isinstance(cfg.lora.target_modules, list):
        console.print(f"lora: target modules {cfg.lora.target_modules}")

    for note in prepare_prompts(data, tok, cfg.data):  # chat templates and prompt lengths: before any weights
        console.print(f"[yellow]data:[/] {note}")
    from lowalign.bundle import resolve_device

    device = resolve_device(cfg.model.device)
    resolve_memory(cfg, device.type, dist.world, console)
    PHASES.start(device, cfg.profile_memory)
    bundle = load_bundle(cfg, tok, data, console)  # phases "load" and "calibration"
    fresh = not out.exists()  # the run directory is created only once everything before it worked
    run_dir = RunDir(out, writer=dist.main)
    console.print(f"[bold]lowalign[/] {cfg.algorithm} -> run directory [cyan]{out}[/]")
    if dist.world > 1:
        console.print(f"data parallel: {dist.world} processes, {_effective_batch(cfg, dist.world)}")
    try:
        if dist.main:
            lock.acquire(console)
        resolved = C.to_dict(cfg)
        if changes is None:
            run_dir.write_config(resolved)
        if dist.main:
            from lowalign.trackers import open_trackers

            run_dir.trackers = open_trackers(cfg.logging, out, resolved)
        ctx = RunContext(cfg, bundle, data, run_dir, Checkpointer(run_dir), console, dist=dist)
        if changes is not None:  # config.yaml changes only once the checkpoint has loaded
            ctx.on_resumed = lambda step: run_dir.write_config(resolved, _history(step, changes))
        summary = algo.train(ctx)
        if dist.world > 1:
            summary["world_size"] = dist.world
            summary["ranks_identical"] = _ranks_identical(bundle, dist)
    except BaseException as e:
        PHASES.stop()
        for t in run_dir.trackers:
            t.close()
        lock.release()
        if fresh and dist.main and not run_dir.metrics_path.exists():  # a failed start leaves nothing behind
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        if isinstance(e, KeyboardInterrupt) and not isinstance(e, RunInterrupted):
            raise RunInterrupted(interrupted_message(out)) from None
        raise
    summary["wall_time_s"] = round(time.time() - t0, 2)
    summary["peak_memory_bytes"] = peak_memory_bytes(bundle.device)
    if PHASES.enabled:
        summary["memory_by_phase"] = PHASES.summary()
        PHASES.stop()
    if bundle.device.type == "cuda":  # torch's own figures, next to the bundle's memory report
        summary["peak_memory_reserved_bytes"] = int(torch.cuda.max_memory_reserved(bundle.device))
        summary["cuda_allocated_bytes"] = int(torch.cuda.memory_allocated(bundle.device))
    summary["output_dir"] = str(out)
    run_dir.write_json("summary.json", summary)
    for t in run_dir.trackers:
        t.finish(summary)
    lock.release()
    print_summary(console, summary)
    if cfg.logging.report and dist.main:
        _write_report(console, out)
    return summary


def _describe(changes: dict) -> str:
    """What a resume changed, as ``key old -> new, ...`` (the resume flag and the directory itself left out)."""
    return ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items() if k not in ("resume", "output_dir"))


def _history(step: int, changes: dict) -> str:
    what = _describe(changes)
    return f"at step {step} on {time.strftime('%Y-%m-%d %H:%M:%S')}" + (f": {what}" if what else "")


def _write_report(console, out: Path) -> None:
    """``<run>/report``: the run is saved already, so a report that cannot be drawn is a warning, not a
    failed run (``lowalign report`` draws it again)."""
    from lowalign.report import write_report

    try:
        path = write_report([out])
    except Exception as e:  # noqa: BLE001 (the run's results are on disk; say what failed and go on)
        console.print(f"[yellow]report: could not write it ({type(e).__name__}: {e}); the run's results are "
                      f"saved: `lowalign report {out}` retries[/]")
        return
    console.print(f"report: {path}")


def complete(model: str, prompts: list[str], *, adapter: str | None = None, n: int = 1, temperature: float = 1.0,
             max_new_tokens: int = 16, seed: int = 0, quantization: str | None = None,
             device: str = "auto", chat: bool = False) -> list[list[str]]:
    """``n`` completions of each prompt from ``model`` (a hub id, local directory or builtin), with a trained
    policy adapter when ``adapter`` names one (a run directory, one of its checkpoints, or a saved PEFT adapter
    folder); greedy at ``temperature=0``; ``chat=True`` sends each prompt as a user message through the
    tokenizer's chat template (an instruct model, as ``data.chat_template: true`` does in a run). Loads the
    model on each call: for looking at a few completions in a notebook.

    ``quantization``: None (the default) loads the base as the adapter's run did (``model.quantization`` of its
    ``config.yaml``, and an nf4 base with the GPTQ calibration of ``model.gptq_rows``), else "none" when the
    adapter comes without a run; "none" / "nf4" / "int8" choose (an nf4 base of a calibrated run is still the
    calibrated one: plain rounding is not the model the adapter learned on)."""
    from lowalign.bundle import ModelBundle, saved_lora_config
    from lowalign.generation import generate
    from lowalign.models import load_tokenizer, resolve_path

    adir = root = None
    if adapter is not None:
        adir = next((d for d in (Path(adapter) / "adapters" / "policy", Path(adapter))
                     if (d / "adapter_config.json").exists()), None)
        if adir is None:
            raise C.ConfigError(f"adapter: no saved adapter (adapter_config.json) in {adapter} or its adapters/policy")
        root = run_root(adapter)
    trained = C.build(C.ModelConfig, C.load_raw(root / "config.yaml").get("model") or {}, "model") \
        if root is not None else None
    if quantization is None:
        quantization = trained.quantization if trained is not None else "none"
    gptq = quantization == "nf4" and trained is not None and trained.quantization == "nf4" and trained.gptq_rows
    mc = C.build(C.ModelConfig, {"name_or_path": model, "quantization": quantization, "device": device}, "model")
    if n < 1 or temperature < 0:
        raise C.ConfigError("n must be >= 1 and temperature >= 0")
    bundle = ModelBundle.load(mc, tokenizer=load_tokenizer(resolve_path(model), False))
    if gptq:
        calibrate_as_run(bundle, root)
    role = "reference"
    if adir is not None:
        bundle.add_adapter("policy", saved_lora_config(adir), init_from=str(adir))
        role = "policy"
    if chat:
        prompts = [bundle.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                        add_generation_prompt=True) for p in prompts]
    seed_everything(seed)
    with bundle.use(role), bundle.eval_mode():
        texts = generate(bundle, list(prompts), max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                         temperature=temperature or 1.0, num_generations=n).texts
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def _broadcast_text(text: str) -> str:
    import torch.distributed as dist

    obj = [text]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


def _effective_batch(cfg: C.RunConfig, world: int) -> str:
    """One line: the step batch, and each rank's share of it."""
    field = algorithms()[cfg.algorithm].shards
    n = getattr(cfg.train, field)
    per = f"{n // world} per process"
    mb = getattr(cfg.train, "micro_batch_size", 0)
    mb = mb if isinstance(mb, int) else 0
    return f"train.{field} = {n} per step ({per}{f', micro-batches of {mb}' if mb else ''})"


def _ranks_identical(bundle, dist) -> bool:
    """Whether every rank ends with bit-identical trainable weights (adapters and heads): a checksum per
    rank, gathered."""
    params = [p for p in bundle.base.parameters() if p.requires_grad] + \
             [p for h in bundle.heads.values() for p in h.parameters()]
    flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in params]) if params else torch.zeros(1)
    idx = torch.arange(1, flat.numel() + 1, dtype=torch.float64)
    mine = torch.stack([flat.sum(), (flat * idx).sum(), (flat * flat).sum()])
    every = dist.gather(mine[None].to(dist.device)).cpu()
    return bool((every == every[0]).all())


def print_summary(console, summary: dict) -> None:
    from rich.table import Table

    t = Table(title="lowalign results")
    t.add_column("metric")
    t.add_column("baseline", justify="right")
    t.add_column("final", justify="right")
    keys = [k for k in summary.get("final", {}) if isinstance(summary["final"].get(k), (int, float))]
    for k in keys:
        b = summary.get("baseline", {}).get(k)
        t.add_row(k, "-" if b is None else f"{b:.4g}", f"{summary['final'][k]:.4g}")
    t.add_row("wall time (s)", "", f"{summary['wall_time_s']:.1f}")
    t.add_row("peak memory (MiB)", "", f"{summary['peak_memory_bytes'] / 2**20:.0f}")
    console.print(t)
    phases = summary.get("memory_by_phase")
    if phases:
        console.print("peak memory by phase (MiB): " + ", ".join(
            f"{k} {v:.0f}" for k, v in sorted(phases["peak_mib"].items(), key=lambda kv: -kv[1]))
            + f"; after load {phases['after_load_mib']:.0f}")
    console.print(f"run directory: {summary['output_dir']} (summary.json, metrics.jsonl, adapters/)")
