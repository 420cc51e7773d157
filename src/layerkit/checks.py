"""Checks of a composed config that run before any heavy import or model load.

Every bad value fails here, in well under two seconds, with one sentence naming the key, the value
and what is allowed, and nothing is written: ``layerkit train`` and ``layerkit sample`` call
:func:`check_config` right after composing. Components check their own options when they are
built; this module knows only the keys of the primary configs (``conf/train.yaml``,
``conf/sample.yaml``) and the trainer's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from layerkit.errors import LayerkitError
from layerkit.training.weighting import LOSS_WEIGHTINGS, segment_loss_weights

MAX_STEPS_SAMPLING = 1000   # a scheduler's training timesteps; more sampling steps than that mean nothing
RGBA_FORMATS = ("mov", "webm", "png")
#: an ``inputs.*`` value ending so names a file: it must exist (checked before torch is imported;
#: the task's own ``file_keys`` are checked again once it is built)
MEDIA_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif", ".png", ".jpg", ".jpeg", ".webp", ".tif",
                  ".tiff", ".npz", ".yaml", ".yml")
DTYPE_NAMES = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")


def _show(value: Any) -> str:
    return f"'{value}'" if isinstance(value, str) else str(value)


def _fail(key: str, value: Any, expected: str) -> LayerkitError:
    return LayerkitError(f"{key} is {_show(value)}; expected {expected}.")


def _whole(key: str, value: Any, low: int, high: int | None = None, *, null: bool = False) -> None:
    if value is None and null:
        return
    span = f"from {low} to {high}" if high is not None else f"of at least {low}"
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise _fail(key, value, f"a whole number {span}" + (" (or null)" if null else ""))


def _number(key: str, value: Any, low: float, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False, null: bool = False) -> None:
    if value is None and null:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            high is None or (value < high if high_open else value <= high))
    if not ok:
        lo = f"{'above' if low_open else 'at least'} {low}"
        hi = "" if high is None else f" and {'below' if high_open else 'at most'} {high}"
        raise _fail(key, value, f"a number {lo}{hi}" + (" (or null)" if null else ""))


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise _fail(key, value, "one of " + ", ".join(allowed))


def _get(cfg: DictConfig, dotted: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False, None
        node = node.get(part)
    return True, node


def _rules_common() -> list[tuple[str, Callable[[str, Any], None]]]:
    return [
        ("seed", lambda k, v: _whole(k, v, 0)),
        ("threads", lambda k, v: None if v == "auto" else _whole(k, v, 1, 512)),
    ]


def _rules_sample() -> list[tuple[str, Callable[[str, Any], None]]]:
    return [
        ("sampler.steps", lambda k, v: _whole(k, v, 1, MAX_STEPS_SAMPLING)),
        ("sampler.guidance_scale", lambda k, v: _number(k, v, 0.0, 100.0)),
        ("sampler.guidance_rescale", lambda k, v: _number(k, v, 0.0, 1.0)),
        ("sampler.guidance_interval", _interval),
        ("sampler.num_frames", lambda k, v: _whole(k, v, 1, 1024, null=True)),
        ("sampler.height", lambda k, v: _whole(k, v, 8, 8192, null=True)),
        ("sampler.width", lambda k, v: _whole(k, v, 8, 8192, null=True)),
        ("fps", lambda k, v: _number(k, v, 0.0, 1000.0, low_open=True)),
        ("rgba_format", lambda k, v: _choice(k, v, RGBA_FORMATS)),
        ("dtype", lambda k, v: _choice(k, v, DTYPE_NAMES)),
        ("device", lambda k, v: None if isinstance(v, str) and (v in ("auto", "cpu", "cuda", "mps") or (
            v.startswith("cuda:") and v[5:].isdigit())) else (_ for _ in ()).throw(
            _fail(k, v, "auto, cpu, cuda or cuda:N"))),
        ("inputs.num_samples", lambda k, v: _whole(k, v, 1, 4096)),
        ("inputs.split", lambda k, v: _choice(k, v, ("val", "test"))),  # held-out shapes clips
    ]


def _rules_train() -> list[tuple[str, Callable[[str, Any], None]]]:
    return [
        ("trainer.max_steps", lambda k, v: _whole(k, v, 1)),
        ("trainer.accumulate_grad_batches", lambda k, v: _whole(k, v, 1)),
        ("trainer.gradient_clip_val", lambda k, v: _number(k, v, 0.0, null=True)),
        ("trainer.log_every_n_steps", lambda k, v: _whole(k, v, 1)),
        ("train.batch_size", lambda k, v: _whole(k, v, 1)),
        ("train.num_workers", lambda k, v: _whole(k, v, 0, 256)),
        ("train.prompt_dropout", lambda k, v: _number(k, v, 0.0, 1.0)),
        ("train.ema_decay", lambda k, v: _number(k, v, 0.0, 1.0, high_open=True)),
        ("train.checkpoint_every", lambda k, v: _whole(k, v, 1)),
        ("train.given_latents", lambda k, v: _choice(k, v, ("sampled", "clip"))),
        ("train.loss_weighting", lambda k, v: _choice(k, v, LOSS_WEIGHTINGS)),
        ("train.snr_gamma", lambda k, v: _number(k, v, 0.0, low_open=True)),
        ("train.segment_loss_weights", lambda k, v: segment_loss_weights(v)),
        ("train.region_loss_weight", lambda k, v: _number(k, v, 0.0)),
        ("optim.lr", lambda k, v: _number(k, v, 0.0, 10.0, low_open=True)),
        ("optim.weight_decay", lambda k, v: _number(k, v, 0.0)),
        ("optim.eps", lambda k, v: _number(k, v, 0.0, 1.0, low_open=True)),
        ("optim.warmup_steps", lambda k, v: _whole(k, v, 0)),
        ("optim.warmup_ratio", lambda k, v: _number(k, v, 0.0, 1.0, high_open=True)),
        ("optim.betas", _betas),
    ]


def _interval(key: str, value: Any) -> None:
    """null, or [low, high] timesteps with 0 <= low < high."""
    if value is None:
        return
    values = list(value) if hasattr(value, "__iter__") and not isinstance(value, str) else None
    if (values is None or len(values) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                      for v in values) or not 0 <= values[0] < values[1]):
        raise _fail(key, value, "null or [low, high], timesteps with 0 <= low < high")


def _betas(key: str, value: Any) -> None:
    values = list(value) if hasattr(value, "__iter__") and not isinstance(value, str) else None
    if values is None or len(values) != 2:
        raise _fail(key, value, "two numbers in [0, 1)")
    for i, beta in enumerate(values):
        _number(f"{key}[{i}]", beta, 0.0, 1.0, high_open=True)


def check_output_location(path: Path) -> None:
    """The output folder must be a folder of its own (not the working directory or one holding it)
    in a place this process can write; checked before any compute."""
    resolved = path.expanduser().resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve() or resolved.parent == resolved:
        raise LayerkitError(f"output_dir '{path}' is the working directory, a folder above it, the home folder or "
                            "the root; choose a folder of its own for the run, e.g. output_dir=runs/NAME.")
    if resolved.exists() and not resolved.is_dir():
        raise LayerkitError(f"output_dir '{path}' exists and is a file, not a directory.")
    probe = resolved
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise LayerkitError(f"output_dir '{path}' cannot be created: '{probe}' is a file.")
    try:  # the real test (permission bits say nothing for root, read-only mounts, /proc)
        import tempfile

        os.rmdir(tempfile.mkdtemp(prefix=".layerkit-probe-", dir=probe))
    except OSError as exc:
        raise LayerkitError(f"output_dir '{path}' cannot be written: nothing can be created in '{probe}' "
                            f"({exc.strerror or type(exc).__name__}).") from None


def check_config(primary: str, cfg: DictConfig) -> None:
    """Fail on the first bad value of ``cfg`` (a composed ``train`` or ``sample`` config)."""
    rules = _rules_common() + (_rules_train() if primary == "train" else _rules_sample())
    for key, rule in rules:
        present, value = _get(cfg, key)
        if present:
            rule(key, value)
    if primary == "sample":
        frames, height, width = (_get(cfg, f"sampler.{k}")[1] for k in ("num_frames", "height", "width"))
        samples = _get(cfg, "inputs.num_samples")[1] or 1
        if frames and height and width and frames * height * width * samples > 1024 * 1024 * 1024:
            raise LayerkitError(f"sampler.num_frames x height x width x inputs.num_samples is {frames} x {height} x "
                                f"{width} x {samples} pixels, more than any video model here can hold; ask for less.")
        inputs = cfg.get("inputs")
        for key, value in (inputs.items() if isinstance(inputs, DictConfig) else []):
            if isinstance(value, str) and Path(value).suffix.lower() in MEDIA_SUFFIXES and \
                    not Path(value).expanduser().exists():
                raise LayerkitError(f"input '{key}' file '{value}' does not exist.")
        if runs_on_cpu(str(cfg.get("device", "auto"))):  # a GPU's free memory needs torch: checked later
            check_memory(cfg, "cpu", available_ram())
    if cfg.get("output_dir"):
        check_output_location(Path(str(cfg.output_dir)))


def check_inputs(cfg: DictConfig, registry: Any) -> None:
    """Unknown ``inputs.*`` keys and missing input files fail before any model loads. A task that
    declared its ``inputs=`` and ``files=`` at registration is checked from the registry alone
    (no torch, no import of its module); another is built to ask it (the same checks run again
    inside ``Sampler.samples``)."""
    from layerkit.config import params

    inputs = params(cfg.get("inputs"))
    component = registry.get("task", str(cfg.task.name))
    if component.inputs is not None:
        task: Any = _Declared(component.name, component.inputs, component.files or ())
    else:
        task = registry.build("task", cfg.task.name, **params(cfg.task))
    check_input_keys(task, inputs)
    for key in getattr(task, "file_keys", ()):
        value = inputs.get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().exists():
            kind = "file" if Path(value).suffix else "file or folder"
            raise LayerkitError(f"input '{key}' {kind} '{value}' does not exist.")


class _Declared:
    """What :func:`check_input_keys` reads of a task, from its registration."""

    def __init__(self, name: str, input_keys: tuple[str, ...], file_keys: tuple[str, ...]) -> None:
        self.name, self.input_keys, self.file_keys = name, input_keys, file_keys


def check_input_keys(task: Any, inputs: dict[str, Any]) -> None:
    """Every ``inputs.*`` key must be one ``task`` takes (``Task.input_keys``)."""
    unknown = sorted(set(inputs) - set(task.input_keys))
    if unknown:
        raise LayerkitError(f"task '{task.name}' takes no input {', '.join('inputs.' + k for k in unknown)}; "
                            f"its inputs are {', '.join('inputs.' + k for k in task.input_keys)}.")


def memory_estimate(cfg: DictConfig) -> int | None:
    """Bytes a sampling run needs at least for its outputs and decoder activations: the decoded
    layers in fp32 (4 layers x 4 channels per pixel of every frame) plus about 1 KiB per pixel of 8
    frames at a time (a video VAE decoder's widest full-resolution activations). A floor, not a
    promise: the model itself comes on top. None when the size is not set."""
    s = cfg.get("sampler") or {}
    if not (s.get("num_frames") and s.get("height") and s.get("width")):
        return None
    samples = int((cfg.get("inputs") or {}).get("num_samples", 1) or 1)
    frames, pixels = int(s["num_frames"]), int(s["height"]) * int(s["width"])
    return samples * frames * pixels * 4 * 4 * 4 + min(frames, 8) * pixels * 1024


def check_memory(cfg: DictConfig, device_type: str, free: int | None) -> None:
    """Refuse a size whose :func:`memory_estimate` exceeds ``free`` bytes of ``device_type``."""
    estimate = memory_estimate(cfg)
    if estimate is None or not free or estimate <= free:
        return
    s, samples = cfg.sampler, int((cfg.get("inputs") or {}).get("num_samples", 1) or 1)
    raise LayerkitError(f"sampling {samples} x {s.num_frames} frames of {s.height} x {s.width} needs at least "
                        f"{estimate / 2**30:.1f} GiB on {device_type} (outputs and decoder activations), and "
                        f"{free / 2**30:.1f} GiB are free; ask for fewer frames, a smaller size or fewer samples.")


def available_ram() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), None elsewhere."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def runs_on_cpu(device: str) -> bool:
    """Whether a ``device`` setting means the CPU, told without importing torch: ``cpu``, or
    ``auto`` on a machine with no NVIDIA driver loaded."""
    if device == "cpu":
        return True
    return device == "auto" and not Path("/proc/driver/nvidia/version").exists() and not Path("/dev/nvidia0").exists()


def apply_threads(setting: Any = "auto") -> None:
    """Set torch's threads from :func:`thread_count`, except that an ``OMP_NUM_THREADS`` the user
    set is left alone when neither ``LAYERKIT_THREADS`` nor an explicit ``threads=N`` asks otherwise."""
    if os.environ.get("OMP_NUM_THREADS") and not os.environ.get("LAYERKIT_THREADS") and setting in (None, "auto"):
        return
    import torch

    torch.set_num_threads(thread_count(setting))


def thread_count(setting: Any = "auto") -> int:
    """Torch threads: ``LAYERKIT_THREADS`` or the ``threads`` setting; ``auto`` takes the cores this
    process may use less the machine's current load (1-minute average), at least 1, so a busy
    machine is not thrashed (docs/benchmarks.md, benchmarks/bench_threads.py)."""
    env = os.environ.get("LAYERKIT_THREADS")
    if env:
        if not env.isdigit() or int(env) < 1:
            raise LayerkitError(f"LAYERKIT_THREADS is '{env}'; expected a whole number of at least 1.")
        return int(env)
    if setting not in (None, "auto"):
        return int(setting)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return max(1, min(cores, cores - int(round(load))))
