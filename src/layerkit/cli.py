"""The ``layerkit`` command. Imports stay light until a command runs (``--help`` is fast)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from layerkit import __version__
from layerkit.errors import LayerkitError

OVERRIDES_HELP = "Hydra overrides, e.g. +experiment=NAME backbone.path=DIR output_dir=DIR trainer.max_steps=10"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerkit",
        description="Layer-aware video generation: train and sample layered, decomposed, controlled and transparent video.",
    )
    parser.add_argument("--version", action="version", version=f"layerkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show third-party warnings and progress bars (hidden by default when they carry no action)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    listing = ("`layerkit experiments` lists the experiments (+experiment=NAME) and tasks (task=NAME), one line "
               "each; `layerkit config train|sample OVERRIDES` prints the composed config. A value with a comma is "
               "quoted for Hydra: \"+inputs.prompt='a red circle, moving left'\".")
    p = sub.add_parser("train", help="train from a composed config (layerkit train +experiment=NAME ...)",
                       epilog=listing)
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p = sub.add_parser("sample", help="sample from a composed config (layerkit sample [+experiment=NAME] ...)",
                       epilog=listing)
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p = sub.add_parser("demo", help="the embedded default: shapes data, a tiny model trained a few steps, samples written")
    p.add_argument("overrides", nargs="*", help="overrides for both steps, e.g. output_dir=DIR trainer.max_steps=20")
    p = sub.add_parser("plugins", help="list installed plugins and what they register, one line each")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = sub.add_parser("experiments", help="list experiments (+experiment=NAME) and task configs, one line each")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = sub.add_parser("config", help="print the composed config")
    p.add_argument("primary", choices=["train", "sample", "curate"])
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p = sub.add_parser("convert", help="convert a pickled checkpoint to safetensors (read with weights_only=True)")
    p.add_argument("source")
    p.add_argument("target")
    p.add_argument("--overwrite", action="store_true", help="replace an existing target (never the source)")
    return parser


#: third-party warnings that carry no action for a layerkit user (shown with -v)
QUIET_WARNINGS = (
    r".*module\(s\) in eval mode at the start of training.*",
    r".*isinstance\(treespec, LeafSpec\).*",
    r".*does not have many workers which may be a bottleneck.*",
    r".*is smaller than the logging interval.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*GPU available but not used.*",
    r".*The `srun` command is available on your system but is not used.*",
    r".*torch.cuda.amp.* is deprecated.*",
    r".*`resume_download` is deprecated.*",
    r".*Precision .* is not supported by the model summary.*",
    r".*should be kept in float32.*",
    r".*Already found a `peft_config` attribute in the model.*",  # layerkit's LoRA adapters are several, by design
)


def quiet(verbose: bool) -> None:
    """Hide warnings and bars of libraries that carry no action for the user (``-v`` shows them);
    layerkit's own progress goes to stderr either way."""
    if verbose:
        return
    import logging
    import os
    import warnings

    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _quiet_libraries() -> None:
    """diffusers' and transformers' own loggers and weight-loading bars (imported here: every
    model family needs them, and the config was checked before)."""
    import importlib

    for module in ("diffusers", "transformers"):
        try:
            lib = importlib.import_module(module)
            lib.utils.logging.set_verbosity_error()
            lib.utils.logging.disable_progress_bar()
        except (ImportError, AttributeError):
            continue


def _plugins(as_json: bool) -> int:
    from layerkit.registry import get_registry

    registry = get_registry()
    rows = registry.describe()
    if as_json:
        print(json.dumps({"plugins": rows, "config_dirs": registry.config_dirs}, indent=2))
        return 0
    for row in rows:
        head = f"{row['name']}  ({row['distribution'] or '?'} {row['version'] or ''})".rstrip()
        print(head)
        if row["error"]:
            print(f"  FAILED TO LOAD: {row['error']}")
            continue
        for kind, component in registry.plugin_components(row["name"]):
            line = f"  {kind} {component.name}"
            print(f"{line}: {component.description}" if component.description else line)
        for path in row["config_dirs"]:
            print(f"  configs: {path}")
        for conflict in row.get("conflicts") or []:
            print(f"  CONFLICT: {conflict}")
    return 0


def _experiments(as_json: bool) -> int:
    """Every experiment and task config on the search path, with the first line of its comment."""
    from layerkit.config import list_group
    from layerkit.registry import get_registry

    registry = get_registry()
    groups = {group: list_group(group, registry) for group in ("experiment", "task")}
    if as_json:
        print(json.dumps(groups, indent=2))
        return 0
    for group, entries in groups.items():
        print(f"{group}s:" if group == "experiment" else "tasks (task=NAME):")
        width = max((len(n) for n in entries), default=0)
        for name, about in entries.items():
            print(f"  {name:<{width}}  {about}".rstrip())
    return 0


DEMO_STEPS = 20
DEMO_ABOUT = """\
What the demo did: it continued the committed toy LayerFlow (a tiny CogVideoX trained in LayerFlow's
three stages on the shapes world, see docs/toy_layerflow.md) for {steps} steps of stage 3 with
`layerkit train`, then sampled {n} held-out shapes-world prompts with the weights it wrote.
Each sample folder holds what LayerFlow generates from one prompt: the transparent foreground
(foreground.mov, RGBA ProRes 4444), its alpha matte, the clean background and the blended scene;
preview.png shows them side by side, record.json the figures (colour and shape correct, alpha IoU).
"""


def _demo(overrides: Sequence[str]) -> int:
    """The embedded default end to end in well under a minute on 2 CPU cores: a short training
    run from the committed toy weights (training works, resumably, into its own folder), then
    sampling with what it wrote (samples worth looking at, not the noise of a model trained from
    scratch for seconds)."""
    from pathlib import Path

    from layerkit.runs import default_output_dir
    from layerkit.sampling.run import sample
    from layerkit.training.run import train

    rest = [o for o in overrides if not o.startswith("output_dir=")]
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")]
    root = Path(given[-1]) if given else default_output_dir("demo")
    steps = next((int(o.split("=", 1)[1]) for o in rest if o.startswith("trainer.max_steps=")), DEMO_STEPS)
    n = next((int(o.split("=", 1)[1]) for o in rest if o.startswith("+inputs.num_samples=")), 4)
    experiment = "+experiment=toy_layerflow_stage3"
    print(f"layerkit demo: training {steps} steps from the committed toy LayerFlow ...", file=sys.stderr)
    train_dir = train([experiment, "init_from=[${layerflow.stage1_weights},${layerflow.stage2_weights},${weights}]",
                       f"trainer.max_steps={steps}", f"train.checkpoint_every={steps}", f"output_dir={root / 'train'}",
                       *[o for o in rest if not o.startswith(("+inputs.", "sampler."))]])
    print(f"layerkit demo: sampling {n} held-out prompts ...", file=sys.stderr)
    out = sample([experiment, f"weights={train_dir / 'weights.safetensors'}", f"output_dir={root / 'samples'}",
                  f"+inputs.num_samples={n}",
                  *[o for o in rest if not o.startswith(("trainer.", "train.", "optim.", "+inputs.num_samples="))]])
    print(DEMO_ABOUT.format(steps=steps, n=n), file=sys.stderr)
    metrics = json.loads((out / "record.json").read_text()).get("metrics") or {}
    shown = [f"{name} {metrics[key]:.2f}" for key, name in (("colour_correct", "colour correct"),
             ("shape_correct", "shape correct"), ("alpha_iou", "alpha IoU"), ("compositing_error", "compositing error"))
             if isinstance(metrics.get(key), float)]
    if shown:
        print(f"On these {n} prompts: {', '.join(shown)} (the model card's table: 16 prompts, toy_layerflow.md).",
              file=sys.stderr)
    print(f"trained weights: {train_dir / 'weights.safetensors'}")
    print(f"samples: {out}")
    return 0


def _convert(source: str, target: str, overwrite: bool = False) -> int:
    from pathlib import Path

    from layerkit.io.weights import load_weights, save_weights

    src, dst = Path(source), Path(target)
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise LayerkitError(f"convert: the target '{target}' is the source itself; choose another target file.")
    if dst.is_dir():
        raise LayerkitError(f"convert: the target '{target}' is a directory; give a file name ending in .safetensors.")
    if dst.exists() and not overwrite:
        raise LayerkitError(f"convert: the target '{target}' exists; pass --overwrite to replace it.")
    if dst.suffix != ".safetensors":
        raise LayerkitError(f"convert: the target '{target}' must end in .safetensors.")
    state = load_weights(source, allow_pickle=True)
    save_weights(target, state)
    print(f"wrote {target} ({len(state)} tensors)")
    return 0


BUILTIN = ("train", "sample", "demo", "plugins", "experiments", "config", "convert")


def _plugin_command(argv: Sequence[str]) -> int | None:
    """Run a subcommand a plugin registered (``register_commands``), or None when ``argv``
    names none. A plugin command's ``main(argv)`` receives the arguments after its name."""
    if not argv or argv[0].startswith("-") or argv[0] in BUILTIN:
        return None
    from layerkit.registry import get_registry

    registry = get_registry()
    if argv[0] not in registry.components["command"]:
        return None
    main = registry.get("command", argv[0]).resolve()
    return int(main(list(argv[1:])) or 0)


def _plugin_commands_help() -> str:
    try:
        from layerkit.registry import get_registry

        commands = get_registry().components["command"]
    except Exception:  # a broken plugin never breaks --help
        return ""
    if not commands:
        return ""
    width = max(len(n) for n in commands)
    rows = [f"  {name:<{width}}  {c.description}".rstrip() for name, c in sorted(commands.items())]
    return "plugin commands:\n" + "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `layerkit config ... | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in ("-v", "--verbose") for a in argv[:1])
    if verbose:
        argv = argv[1:]
    quiet(verbose)
    try:
        ran = _plugin_command(argv)
    except LayerkitError as exc:
        print(f"layerkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layerkit: interrupted", file=sys.stderr)
        return 130
    if ran is not None:
        return ran
    parser = _parser()
    if any(a in ("-h", "--help") for a in argv[:1]) or not argv:
        parser.epilog = _plugin_commands_help() or None
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    args = parser.parse_args(argv)
    try:
        if args.command == "plugins":
            return _plugins(args.json)
        if args.command == "experiments":
            return _experiments(args.json)
        if args.command in ("train", "sample"):
            from layerkit.checks import check_config
            from layerkit.config import compose
            from layerkit.registry import get_registry

            registry = get_registry()
            cfg = compose(args.command, args.overrides, registry)
            if args.command == "sample":
                from layerkit.checks import check_inputs

                check_inputs(cfg, registry)  # unknown inputs and missing files, before any model loads
            check_config(args.command, cfg)  # every bad value fails here, before torch or a model loads
            if args.command == "train":
                from layerkit.training.run import train

                if not verbose:
                    _quiet_libraries()
                print(f"output_dir: {train(args.overrides, registry=registry, cfg=cfg)}")
            else:
                from layerkit.sampling.run import sample

                if not verbose:
                    _quiet_libraries()
                print(f"output_dir: {sample(args.overrides, registry=registry, cfg=cfg)}")
            return 0
        if args.command == "demo":
            return _demo(args.overrides)
        if args.command == "config":
            from omegaconf import OmegaConf

            from layerkit.config import compose
            from layerkit.registry import get_registry

            print(OmegaConf.to_yaml(compose(args.primary, args.overrides, get_registry())))
            return 0
        if args.command == "convert":
            return _convert(args.source, args.target, args.overwrite)
        parser.print_help()
        return 0
    except LayerkitError as exc:
        print(f"layerkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = "; rerun the same command to resume from its last checkpoint" if args.command == "train" else ""
        print(f"layerkit: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
