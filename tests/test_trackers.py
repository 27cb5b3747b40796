"""Metric backends: a real TensorBoard event file read back, its rewind on resume, wandb offline, and
config errors for unknown or missing backends."""

import pytest

from lowalign.config import ConfigError
from lowalign.trackers import TensorBoardTracker, check_backends

from .algorithms.helpers import cli, metrics

pytest.importorskip("tensorboard")


def read_scalars(directory) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_file_holds_every_logged_scalar(tmp_path):
    d = tmp_path / "run"
    cli("run", "grpo_tiny", "train.steps=3", "eval.num_examples=20", "train.checkpoint_every=0",
        "logging.backends=[jsonl, tensorboard]", "logging.report=false", f"output_dir={d}")
    assert list((d / "tensorboard").glob("events.out.tfevents.*"))
    got = read_scalars(d / "tensorboard")
    rows = metrics(d)
    for key in ("reward", "loss", "grad_norm", "rewards/correctness_reward", "entropy"):
        assert got[key] == pytest.approx({r["step"]: r[key] for r in rows}, rel=1e-6), key
    assert not (d / "report").exists()


def test_tensorboard_rewind_drops_steps_a_killed_run_logged_after_its_checkpoint(tmp_path):
    t = TensorBoardTracker(tmp_path)
    t.rewind(0)
    for step in range(1, 5):
        t.log(step, {"loss": float(step)})
    t.close()
    t = TensorBoardTracker(tmp_path)  # the resumed process: checkpoint at step 2
    t.rewind(2)
    for step in (3, 4):
        t.log(step, {"loss": 10.0 * step})
    t.close()
    assert read_scalars(tmp_path / "tensorboard")["loss"] == {1: 1.0, 2: 2.0, 3: 30.0, 4: 40.0}


def test_wandb_offline_run_is_written_in_the_run_directory(tmp_path):
    pytest.importorskip("wandb")
    d = tmp_path / "run"
    cli("run", "grpo_tiny", "train.steps=2", "eval.num_examples=20", "train.checkpoint_every=0",
        "logging.backends=[jsonl, wandb]", "logging.report=false", f"output_dir={d}",
        env={"WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"})
    run_id = (d / "wandb_id.txt").read_text().strip()
    files = list((d / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    history = [{i.key or "/".join(i.nested_key): i.value_json for i in rec.history.item}
               for rec in wandb_records(files[0]) if rec.WhichOneof("record_type") == "history"]
    assert [int(h["_step"]) for h in history] == [1, 2]
    for h, r in zip(history, metrics(d)):
        assert float(h["loss"]) == pytest.approx(r["loss"], rel=1e-6)


def wandb_records(path):
    """The protobuf records of a ``.wandb`` file: a 7-byte header (":W&B", magic, version), then LevelDB-log
    framing (32 KiB blocks; each chunk: crc32c, length, type 1 full / 2 first / 3 middle / 4 last)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def test_unknown_backend_is_a_config_error_naming_it(capsys):
    from lowalign.cli import main

    assert main(["validate", "grpo_tiny", "logging.backends=[jsonl, tensorbord]"]) == 2
    err = capsys.readouterr().err
    assert "logging.backends[1]: unknown backend 'tensorbord'" in err and "Did you mean 'tensorboard'" in err


def test_a_backend_whose_package_is_missing_fails_before_the_model_loads(monkeypatch):
    import lowalign.trackers as T
    from lowalign.config import LoggingConfig

    monkeypatch.setitem(T.PACKAGES, "wandb", "surely_not_installed_pkg")
    with pytest.raises(ConfigError, match=r"logging.backends\[1\]: 'wandb' needs the surely_not_installed_pkg"):
        check_backends(LoggingConfig(backends=["jsonl", "wandb"]))
