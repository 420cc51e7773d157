"""Copy toy LayerAnimate files into the committed model folder, stored in fp16 (run in fp32).

    python -m layerkit_plugins.layeranimate.toy.export base runs/toy_layeranimate/base0 runs/toy_layeranimate/base_unet
    python -m layerkit_plugins.layeranimate.toy.export stage layeranimate runs/toy_layeranimate/layeranimate

``base VAE_FOLDER RUN``: the folder ``layerkit toy-layeranimate-vae`` wrote (VAE, random frozen
encoders, Resampler, the untrained UNet) with the UNet replaced by the base stage's trained one (the
run's ``weights.safetensors``: its EMA) -> ``toy/weights/base/``, every tensor in fp16, plus
``base.json`` (steps, loss, time, config). ``stage NAME RUN``: a ``layerkit train`` run ->
``toy/weights/NAME.safetensors`` and ``NAME.json``. Later stages train from the committed files, so
what is committed is exactly what was trained and evaluated.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from layerkit.errors import LayerkitError
from layerkit.io.weights import load_weights, save_fp16_copy
from layerkit.runs import run_summary

WEIGHTS = Path(__file__).resolve().parent / "weights"
REPO = Path(__file__).resolve().parents[4]  # the repository: summaries name paths relative to it
PREFIX = "backbone.denoiser."


def export_base(folder: Path, run: Path, dst: Path) -> None:
    from layerkit_plugins.tooncrafter.unet import ToonCrafterUNet

    state = {k[len(PREFIX):]: v for k, v in load_weights(run / "weights.safetensors").items() if k.startswith(PREFIX)}
    unet = ToonCrafterUNet.from_pretrained(str(folder / "unet"))
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LayerkitError(f"{run} does not hold a whole toy UNet: {len(missing)} missing, {len(unexpected)} "
                            f"unexpected keys (e.g. {(missing or unexpected)[:2]}).")
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        shutil.copytree(folder, stage / "base", ignore=shutil.ignore_patterns("unet"))
        unet.save_pretrained(str(stage / "base" / "unet"))
        target = dst / "base"
        if target.exists():
            shutil.rmtree(target)
        for path in sorted((stage / "base").rglob("*")):
            if path.is_dir():
                continue
            out = target / path.relative_to(stage / "base")
            out.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".safetensors":
                save_fp16_copy(path, out)
            else:
                shutil.copy2(path, out)
    (dst / "base.json").write_text(json.dumps(run_summary(run, REPO), indent=1, default=str))


def export_stage(name: str, run: Path, dst: Path) -> None:
    save_fp16_copy(run / "weights.safetensors", dst / f"{name}.safetensors")
    (dst / f"{name}.json").write_text(json.dumps(run_summary(run, REPO), indent=1, default=str))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["base", "stage"])
    parser.add_argument("sources", type=Path, nargs=2, help="base: VAE_FOLDER RUN; stage: NAME RUN")
    parser.add_argument("--to", type=Path, default=WEIGHTS)
    args = parser.parse_args(argv)
    if args.what == "base":
        export_base(args.sources[0], args.sources[1], args.to)
    else:
        export_stage(str(args.sources[0]), args.sources[1], args.to)
    print(f"wrote {args.what} into {args.to}")


if __name__ == "__main__":
    main()
