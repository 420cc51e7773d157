"""Copy toy LayerFlow files into the committed model directory, stored in fp16 (run in fp32).

    python -m layerkit_plugins.layerflow.toy.export base runs/toy_layerflow/base
    python -m layerkit_plugins.layerflow.toy.export pretrained runs/toy_layerflow/base_t2v
    python -m layerkit_plugins.layerflow.toy.export stage1 runs/toy_layerflow/stage1

``base``: a diffusers-format directory written by ``toy.train_vae`` (transformer/ vae/
text_encoder/ tokenizer/ scheduler/) -> ``toy/weights/``, every safetensors tensor in fp16.
``vae``: the same directory's ``vae/`` alone (and its ``vae_training.json``): a decoder-only run
(``toy-layerflow-vae --parts decoder``) after the base pretraining, which ``base`` would undo by
writing the run's seeded transformer over the pretrained one.
``pretrained``: the ``layerkit train +experiment=toy_layerflow_base`` run (plain text-to-video on
blended clips) -> ``toy/weights/transformer/`` (its denoiser's weights as the diffusers-format
transformer stage 1 starts from, fp16) and ``toy/weights/base_t2v.json``.
``stageN``: a ``layerkit train`` run directory -> ``toy/weights/stageN.safetensors`` (its
``weights.safetensors`` in fp16, metadata kept) and ``toy/weights/stageN.json`` (steps, loss,
seconds, the resolved config) for the model card. Later stages train from these committed
files, so what is committed is exactly what was trained and evaluated.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from layerkit.io.weights import save_fp16_copy
from layerkit.runs import run_summary

WEIGHTS = Path(__file__).resolve().parent / "weights"

REPO = Path(__file__).resolve().parents[4]  # the repository: summaries name paths relative to it

to_fp16 = save_fp16_copy


#: the sub-folders of a diffusers-format toy model directory that ``base`` exports
BASE_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


def export_base(src: Path, dst: Path, parts: tuple[str, ...] = BASE_PARTS) -> None:
    for sub in parts:
        if (dst / sub).exists():
            shutil.rmtree(dst / sub)
        for path in sorted((src / sub).rglob("*")):
            if path.is_dir():
                continue
            target = dst / sub / path.relative_to(src / sub)
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".safetensors":
                to_fp16(path, target)
            else:
                shutil.copy2(path, target)
    if (src / "vae_training.json").is_file():
        shutil.copy2(src / "vae_training.json", dst / "vae_training.json")


DENOISER = "backbone.denoiser."


def export_pretrained(run: Path, dst: Path) -> None:
    """The base run's denoiser (EMA) as ``dst/transformer`` in diffusers format: the pretrained
    text-to-video transformer stage 1 fine-tunes. Every key of the folder's transformer must be
    replaced (one sentence otherwise), so a run of another geometry cannot be half-exported."""
    from layerkit.errors import LayerkitError
    from layerkit.io.weights import load_weights, save_weights

    state = load_weights(run / "weights.safetensors")
    denoiser = {k[len(DENOISER):]: v for k, v in state.items() if k.startswith(DENOISER)}
    target = dst / "transformer" / "diffusion_pytorch_model.safetensors"
    current = load_weights(target)
    if set(denoiser) != set(current) or any(denoiser[k].shape != current[k].shape for k in current):
        raise LayerkitError(f"{run}/weights.safetensors does not hold a denoiser of {target}'s layout "
                            f"({len(set(current) - set(denoiser))} keys missing, {len(set(denoiser) - set(current))} "
                            "unexpected, or other shapes); it was not exported.")
    trained_on = _trained_config(run)
    if trained_on is not None:  # same keys and shapes can still mean another geometry (4 x 32 heads or 8 x 16)
        mine = _config(dst / "transformer" / "config.json")
        differ = sorted(k for k in set(trained_on) | set(mine) if trained_on.get(k) != mine.get(k))
        if differ:
            raise LayerkitError(f"{run} was trained on a transformer whose config.json differs from "
                                f"{dst / 'transformer' / 'config.json'} in {', '.join(differ)}; it was not exported.")
    summary = json.dumps(run_summary(run, REPO), indent=1, default=str)  # before anything is written
    save_weights(target, {k: v.to(torch.float16).contiguous() for k, v in denoiser.items()})
    partial = dst / ".base_t2v.json.partial"
    partial.write_text(summary)
    partial.replace(dst / "base_t2v.json")


def _config(path: Path) -> dict:
    """A diffusers config.json without its bookkeeping keys (``_diffusers_version``, ...)."""
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def _trained_config(run: Path) -> dict | None:
    """The config.json of the transformer the run trained (its recorded ``backbone.path``), or None
    when the run does not record one that still exists."""
    from layerkit.io.weights import read_metadata

    path = ((read_metadata(run / "weights.safetensors").get("layerkit_config") or {}).get("backbone") or {}).get("path")
    config = Path(str(path)) / "transformer" / "config.json" if path else None
    return _config(config) if config is not None and config.is_file() else None


def export_stage(name: str, run: Path, dst: Path) -> None:
    to_fp16(run / "weights.safetensors", dst / f"{name}.safetensors")
    (dst / f"{name}.json").write_text(json.dumps(run_summary(run, REPO), indent=1, default=str))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["base", "vae", "pretrained", "stage1", "stage2", "stage3"])
    parser.add_argument("source", type=Path)
    parser.add_argument("--to", type=Path, default=WEIGHTS)
    args = parser.parse_args(argv)
    if args.what in ("base", "vae"):
        if not (args.source / "vae" / "config.json").is_file():
            parser.exit(2, f"error: '{args.source}' holds no vae/ folder (a toy-layerflow-vae --out folder).\n")
        export_base(args.source, args.to, ("vae",) if args.what == "vae" else BASE_PARTS)
    elif args.what == "pretrained":
        from layerkit.errors import LayerkitError

        try:
            export_pretrained(args.source, args.to)
        except (LayerkitError, FileNotFoundError) as error:
            parser.exit(2, f"error: {error}\n")
    else:
        export_stage(args.what, args.source, args.to)
    print(f"wrote {args.what} into {args.to}")


if __name__ == "__main__":
    main()
