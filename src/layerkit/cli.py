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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train from a composed config (layerkit train +experiment=NAME ...)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p = sub.add_parser("sample", help="sample from a composed config (layerkit sample [+experiment=NAME] ...)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p = sub.add_parser("demo", help="the embedded default: shapes data, a tiny model trained a few steps, samples written")
    p.add_argument("overrides", nargs="*", help="overrides for both steps, e.g. output_dir=DIR trainer.max_steps=20")
    p = sub.add_parser("plugins", help="list installed plugins and what they register, one line each")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = sub.add_parser("experiments", help="list experiments (+experiment=NAME) and task configs, one line each")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = sub.add_parser("config", help="print the composed config")
    p.add_argument("primary", choices=["train", "sample"])
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p = sub.add_parser("convert", help="convert a pickled checkpoint to safetensors (read with weights_only=True)")
    p.add_argument("source")
    p.add_argument("target")
    return parser


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


def _demo(overrides: Sequence[str]) -> int:
    from pathlib import Path

    from layerkit.runs import default_output_dir
    from layerkit.sampling.run import sample
    from layerkit.training.run import train

    rest = [o for o in overrides if not o.startswith("output_dir=")]
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")]
    root = Path(given[-1]) if given else default_output_dir("demo")
    train_dir = train(["+experiment=toy_layered", f"output_dir={root / 'train'}", *rest])
    out = sample(["+experiment=toy_layered", f"weights={train_dir / 'weights.safetensors'}",
                  f"output_dir={root / 'samples'}", *[o for o in rest if not o.startswith("trainer.")]])
    print(f"trained weights: {train_dir / 'weights.safetensors'}")
    print(f"samples: {out}")
    return 0


def _convert(source: str, target: str) -> int:
    from layerkit.io.weights import load_weights, save_weights

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
        if args.command == "train":
            from layerkit.training.run import train

            print(f"output_dir: {train(args.overrides)}")
            return 0
        if args.command == "sample":
            from layerkit.sampling.run import sample

            print(f"output_dir: {sample(args.overrides)}")
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
            return _convert(args.source, args.target)
        parser.print_help()
        return 0
    except LayerkitError as exc:
        print(f"layerkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layerkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
