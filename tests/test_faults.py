"""Faults a user meets, as a table: bad values fail with one sentence before anything loads and
leave nothing on disk; no data lost (overwrite moves aside, convert refuses); a run owns its
folder; interrupted traces restart; finished runs say so; every bad checkpoint is one sentence; a
damaged last.ckpt falls back to the previous one; resume is bit-exact."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY, TINY_SAMPLE
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file, save_file

from layerkit.cli import main
from layerkit.errors import LayerkitError
from layerkit.training.run import train

BAD_VALUES = [
    ("sample", "sampler.steps=-5", "sampler.steps is -5; expected a whole number from 1 to 1000"),
    ("sample", "sampler.steps=0", "sampler.steps is 0; expected a whole number from 1 to 1000"),
    ("sample", "sampler.steps=ten", "sampler.steps is 'ten'; expected a whole number"),
    ("sample", "sampler.steps=3000", "sampler.steps is 3000; expected a whole number from 1 to 1000"),
    ("sample", "sampler.guidance_scale=abc", "sampler.guidance_scale is 'abc'"),
    ("sample", "sampler.height=100000", "sampler.height is 100000; expected a whole number from 8 to 8192"),
    ("sample", "fps=0", "fps is 0; expected a number above 0.0"),
    ("sample", "rgba_format=avi", "rgba_format is 'avi'; expected one of mov, webm, png"),
    ("sample", "dtype=fp8", "dtype is 'fp8'"),
    ("sample", "device=gpu", "device is 'gpu'; expected auto, cpu, cuda or cuda:N"),
    ("sample", "+inputs.num_samples=0", "inputs.num_samples is 0"),
    ("sample", "+inputs.split=train", "inputs.split is 'train'; expected one of val, test"),
    ("sample", "threads=0", "threads is 0"),
    ("sample", "+inputs.blended=/nonexistent/scene.mp4", "input 'blended' file '/nonexistent/scene.mp4' does not exist"),
    ("sample", "+inputs.blend=scene", "takes no input inputs.blend; its inputs are"),
    ("sample", "+inputs.blend=x.mp4", "takes no input inputs.blend; its inputs are"),
    ("sample", "+inputs.blended=/nonexistent/folder", "input 'blended' file or folder '/nonexistent/folder' does not exist"),
    ("train", "trainer.max_steps=-3", "trainer.max_steps is -3; expected a whole number of at least 1"),
    ("train", "train.batch_size=0", "train.batch_size is 0; expected a whole number of at least 1"),
    ("train", "optim.lr=-1", "optim.lr is -1; expected a number above 0.0"),
    ("train", "optim.betas=[0.9]", "optim.betas is [0.9]; expected two numbers in [0, 1)"),
    ("train", "train.ema_decay=1.0", "train.ema_decay is 1.0"),
    ("train", "train.checkpoint_every=0", "train.checkpoint_every is 0"),
    ("train", "train.given_latents=both", "train.given_latents is 'both'; expected one of sampled, clip"),
    ("train", "train.loss_weighting=loud", "train.loss_weighting is 'loud'; expected one of none, min_snr"),
    ("train", "train.snr_gamma=0", "train.snr_gamma is 0; expected a number above 0.0"),
    ("train", "+train.segment_loss_weights.alpha=-1", "train.segment_loss_weights.alpha must be a number >= 0; got -1"),
    ("train", "train.segment_loss_weights=3", "train.segment_loss_weights must map segment names to weights"),
    ("train", "train.region_loss_weight=-2", "train.region_loss_weight is -2; expected a number at least 0.0"),
]


@pytest.mark.parametrize(("command", "override", "message"), BAD_VALUES,
                         ids=[f"{c}:{o}" for c, o, _ in BAD_VALUES])
def test_bad_values_fail_in_one_sentence_and_write_nothing(command, override, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([command, override, f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("layerkit: error: ") and message in err and "\n" not in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", [".", "..", "/", "HOME"])
def test_output_dir_that_holds_the_working_directory_is_refused(where, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    where = str(Path.home()) if where == "HOME" else where
    assert main(["sample", f"output_dir={where}"]) == 2
    assert "choose a folder of its own" in capsys.readouterr().err


def test_unwritable_output_dir_fails_before_compute(capsys):
    assert main(["sample", "output_dir=/proc/layerkit-never"]) == 2
    assert "cannot be written" in capsys.readouterr().err


def test_too_large_a_size_is_refused_with_an_estimate(capsys, tmp_path):
    assert main(["sample", "sampler.height=4096", "sampler.width=4096", f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert "GiB" in err and "free" in err and not (tmp_path / "o").exists()


#: refusals that must come before torch is imported (issue 13: each under 2 s; torch's import alone
#: takes about 2.6 s on the 2-core CI machine)
EARLY = [
    ["sample", "sampler.steps=-5"],
    ["sample", "+inputs.blend=x.mp4"],
    ["sample", "+inputs.blended=/nonexistent/folder"],
    ["sample", "+experiment=toy_layeranimate", "+inputs.demo=/nonexistent/folder"],
    ["sample", "+experiment=toy_transparent", "+inputs.imag=x.png"],
    ["sample", "device=cpu", "sampler.height=4096", "sampler.width=4096"],
    ["train", "optim.lr=-1"],
]


@pytest.mark.parametrize("argv", EARLY, ids=[" ".join(a) for a in EARLY])
def test_refusals_come_before_torch_is_imported(argv, tmp_path):
    import subprocess
    import sys

    code = ("import sys; from layerkit.cli import main; rc = main(sys.argv[1:]); "
            "assert rc == 2, rc; assert 'torch' not in sys.modules, 'torch was imported'")
    run = subprocess.run([sys.executable, "-c", code, *argv, f"output_dir={tmp_path / 'o'}"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr.startswith("layerkit: error: ") and run.stderr.count("\n") == 1, run.stderr
    assert not (tmp_path / "o").exists()


def test_every_task_declares_its_inputs_as_its_class_does():
    """What a task registers (``inputs=``, ``files=``: checked before torch) is what it takes."""
    from layerkit.registry import get_registry

    registry = get_registry()
    for name in registry.names("task"):
        component = registry.get("task", name)
        if component.first_party:
            assert component.inputs is not None, f"task {name} declares no inputs="
        if component.inputs is None:
            continue
        task = component.resolve()
        task = task() if not isinstance(task, type) else task
        assert tuple(task.input_keys) == component.inputs, name
        assert tuple(task.file_keys) == (component.files or ()), name


def test_a_comma_in_a_prompt_says_how_to_quote_it(capsys):
    assert main(["config", "sample", "+inputs.prompt=a red circle, moving left"]) == 2
    assert "must be quoted" in capsys.readouterr().err
    assert main(["config", "sample", "+inputs.prompt='a red circle, moving left'"]) == 0


def test_overwrite_moves_the_old_folder_aside_and_loses_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["sample", "+experiment=toy_layered", *TINY_SAMPLE, f"output_dir={out}"]) == 2
    assert "overwrite=true" in capsys.readouterr().err
    assert main(["sample", "+experiment=toy_layered", *TINY_SAMPLE, f"output_dir={out}", "overwrite=true"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("out.replaced-")]
    assert len(aside) == 1 and (aside[0] / "notes.txt").read_text() == "mine"
    assert (out / "record.json").is_file() and not (out / "notes.txt").exists()
    assert "was moved to" in capsys.readouterr().err


def test_convert_refuses_an_existing_target_and_its_own_source(tmp_path, capsys):
    src = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, src)
    dst = tmp_path / "model.safetensors"
    dst.write_bytes(b"keep me")
    assert main(["convert", str(src), str(dst)]) == 2
    assert "--overwrite" in capsys.readouterr().err and dst.read_bytes() == b"keep me"
    assert main(["convert", str(src), str(src)]) == 2
    assert "is the source itself" in capsys.readouterr().err
    assert main(["convert", str(src), str(dst), "--overwrite"]) == 0
    assert torch.equal(load_file(dst)["w"], torch.ones(2))


# -- training runs and their folders ------------------------------------------------------------
BASE = ["+experiment=toy_layered", *TINY, "data.size=6", "trainer.max_steps=8", "train.checkpoint_every=2",
        "train.ema_decay=0.9", "threads=1"]


class Kill(Callback):
    """Stops the run as a kill would, after the optimiser step ``at`` (its checkpoint, if any, written)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.at:
            raise KeyboardInterrupt


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "weights.safetensors")


def test_resume_is_bit_exact_after_kills_at_several_steps_and_during_a_checkpoint_write(tmp_path, monkeypatch):
    reference = train([*BASE, f"output_dir={tmp_path / 'a'}"])
    run = tmp_path / "b"
    for at in (3, 5):  # mid-epoch (3 batches per epoch), between checkpoints
        with pytest.raises(KeyboardInterrupt):
            train([*BASE, f"output_dir={run}"], callbacks=[Kill(at)])

    from layerkit.training import checkpoint as ckpt

    original = ckpt.AtomicCheckpointIO.save_checkpoint

    def dies_mid_write(self, checkpoint, path, storage_options=None):
        if checkpoint["global_step"] == 6:  # the new file half-written, the old one still in place
            Path(path).with_name(".last.ckpt.partial").write_bytes(b"PK\x03\x04half")
            raise KeyboardInterrupt
        return original(self, checkpoint, path, storage_options)

    monkeypatch.setattr(ckpt.AtomicCheckpointIO, "save_checkpoint", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        train([*BASE, f"output_dir={run}"])
    monkeypatch.setattr(ckpt.AtomicCheckpointIO, "save_checkpoint", original)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    train([*BASE, f"output_dir={run}"])
    a, b = _weights(reference), _weights(run)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    record = json.loads((run / "record.json").read_text())
    assert record["global_step"] == 8 and record["resumed_from"].endswith("last.ckpt")
    steps = [line.split(",")[1] for line in (run / "logs" / "metrics.csv").read_text().splitlines()[1:] if line]
    assert steps and not list((run / "logs").glob("metrics.part*.csv")), "the log continues, merged"


def test_a_cached_run_resumed_after_a_kill_draws_as_the_uninterrupted_one(tmp_path):
    """``train.cache_latents``: the resumed run's cache starts empty and refills, drawing no random
    number (the posterior's mode), so its noise and timesteps are the uninterrupted run's; its
    latents may differ from the cached ones only by the float rounding of the batch each was
    encoded in. A cache that drew its latents (the training flag left on) fails the bound."""
    cached = ["+experiment=toy_layerflow_stage1", "data.size=6", "train.batch_size=2", "trainer.max_steps=8",
              "train.checkpoint_every=2", "train.compile=false", "threads=1"]  # CogVideoX's sampling VAE
    reference = train([*cached, f"output_dir={tmp_path / 'a'}"])
    run = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        train([*cached, f"output_dir={run}"], callbacks=[Kill(5)])  # epoch 2 of 3 batches: cache hits lost
    train([*cached, f"output_dir={run}"])
    a, b = _weights(reference), _weights(run)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)
    first = json.loads((reference / "record.json").read_text())["latent_cache"]
    resumed = json.loads((run / "record.json").read_text())
    assert resumed["global_step"] == 8 and resumed["resumed_from"].endswith("checkpoints/last.ckpt")
    assert first["passes_encoded"] > 0 and resumed["latent_cache"]["passes_encoded"] > 0, (first, resumed)


def test_a_second_run_into_a_busy_folder_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".layerkit.lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                                    "started": "now"}))
    with pytest.raises(LayerkitError, match=rf"in use by another layerkit run \(pid {os.getpid()} on "):
        train([*BASE, "trainer.max_steps=2", f"output_dir={out}"])
    assert sorted(p.name for p in out.iterdir()) == [".layerkit.lock"]


def test_a_run_that_fails_before_its_first_step_leaves_no_folder_behind(tmp_path):
    """The trainer's logger makes logs/ before the first step; a failure there leaves nothing (the
    folder the run created, and the empty folders in it, are removed); a folder that was there
    before is kept."""

    class Boom(Callback):
        def on_train_start(self, trainer, pl_module):
            raise LayerkitError("boom before the first step.")

    out = tmp_path / "new" / "run"
    with pytest.raises(LayerkitError, match="boom before the first step"):
        train([*BASE, "trainer.max_steps=2", f"output_dir={out}"], callbacks=[Boom()])
    assert list(tmp_path.iterdir()) == []
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(LayerkitError, match="boom before the first step"):
        train([*BASE, "trainer.max_steps=2", f"output_dir={mine}"], callbacks=[Boom()])
    assert mine.is_dir()


def test_a_killed_runs_lock_and_traces_do_not_block_the_same_command(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "logs").mkdir(parents=True)
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / ".last.ckpt.partial").write_bytes(b"half")
    dead = 2**22 + 12345  # no such process
    (out / ".layerkit.lock").write_text(json.dumps({"pid": dead, "host": os.uname().nodename, "started": "then"}))
    train([*BASE, "trainer.max_steps=2", f"output_dir={out}"])
    assert (out / "weights.safetensors").is_file() and not (out / ".layerkit.lock").exists()


def test_a_finished_run_rerun_says_so_and_keeps_its_log(tmp_path, capsys):
    out = tmp_path / "run"
    train([*BASE, "trainer.max_steps=2", "trainer.log_every_n_steps=1", f"output_dir={out}"])
    log = (out / "logs" / "metrics.csv").read_text()
    record = (out / "record.json").read_text()
    capsys.readouterr()
    train([*BASE, "trainer.max_steps=2", "trainer.log_every_n_steps=1", f"output_dir={out}"])
    assert "holds a finished run (step 2 of 2)" in capsys.readouterr().err
    assert (out / "logs" / "metrics.csv").read_text() == log and (out / "record.json").read_text() == record
    # raising max_steps trains on from the checkpoint, the log continued
    train([*BASE, "trainer.max_steps=4", "trainer.log_every_n_steps=1", f"output_dir={out}"])
    assert json.loads((out / "record.json").read_text())["global_step"] == 4
    rows = (out / "logs" / "metrics.csv").read_text().splitlines()
    assert rows[: len(log.splitlines())] == log.splitlines() and len(rows) > len(log.splitlines())


def _bad_checkpoints(tmp_path: Path, good: Path) -> dict[str, tuple[Path, str]]:
    data = good.read_bytes()
    cases = {}
    (tmp_path / "empty.ckpt").write_bytes(b"")
    cases["empty"] = (tmp_path / "empty.ckpt", "is empty")
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (tmp_path / "truncated.ckpt", "is damaged or truncated")
    save_file({"w": torch.ones(1)}, str(tmp_path / "weights.safetensors"))
    cases["safetensors"] = (tmp_path / "weights.safetensors", "give it as init_from= or weights=")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    torch.save({"state_dict": {}, "global_step": 1, "x": Evil()}, tmp_path / "evil.ckpt")
    cases["pickle"] = (tmp_path / "evil.ckpt", "holds pickled code, which layerkit never runs")
    wrong = torch.load(good, weights_only=True)
    key = next(iter(wrong["state_dict"]))
    wrong["state_dict"][key] = torch.zeros(3, 3, 3)
    torch.save(wrong, tmp_path / "wrong.ckpt")
    cases["wrong shape"] = (tmp_path / "wrong.ckpt", f"'{key}' has shape (3, 3, 3)")
    cases["directory"] = (tmp_path, "is a directory")
    cases["missing"] = (tmp_path / "nope.ckpt", "does not exist")
    return cases


def test_every_bad_resume_checkpoint_is_one_sentence(tmp_path):
    good_run = train([*BASE, "trainer.max_steps=2", f"output_dir={tmp_path / 'good'}"])
    for name, (path, message) in _bad_checkpoints(tmp_path / "bad", good_run / "checkpoints" / "last.ckpt").items() \
            if (tmp_path / "bad").mkdir() is None else {}:
        out = tmp_path / f"run-{name.replace(' ', '-')}"
        with pytest.raises(LayerkitError, match=re.escape(message)) as info:
            train([*BASE, "trainer.max_steps=2", f"resume={path}", f"output_dir={out}"])
        assert "\n" not in str(info.value) and "weights_only=False" not in str(info.value), name
        assert not (out / "weights.safetensors").exists()


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train([*BASE, f"output_dir={out}"], callbacks=[Kill(5)])
    last = out / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert torch.load(out / "checkpoints" / "previous.ckpt", weights_only=True)["global_step"] == 2
    last.write_bytes(last.read_bytes()[:1000])  # truncated on disk
    capsys.readouterr()
    train([*BASE, f"output_dir={out}"])
    assert "Resuming from" in capsys.readouterr().err and "previous.ckpt" in \
        json.loads((out / "record.json").read_text())["resumed_from"]
    # with no good checkpoint left: one sentence, and resume=false starts over
    shutil.rmtree(out)
    with pytest.raises(KeyboardInterrupt):
        train([*BASE, f"output_dir={out}"], callbacks=[Kill(3)])
    for f in (out / "checkpoints").glob("*.ckpt"):
        f.write_bytes(b"")
    with pytest.raises(LayerkitError, match="cannot resume: .* Pass resume=false"):
        train([*BASE, f"output_dir={out}"])
    train([*BASE, "trainer.max_steps=2", "resume=false", f"output_dir={out}"])
