"""``layeranimate.i2v`` and ``layeranimate.interpolate``: LayerAnimate's tasks (sec. 4), the
tooncrafter keyframe tasks with layers.

A sample follows ``schema.py`` (video, prompt, fps, mode, keyframes, per-layer masks on the
keyframes, validity, static flags, motion scores, trajectory maps, sketches). The packed batch is
the keyframe task's (one segment, the keyframes given per sample, so a batch may mix the two
modes as the authors' training does 50/50); the layer inputs travel in ``Packed.extras`` to the
``layeranimate.layer_controlnet`` control.

Sampling inputs: ``inputs.demo`` (a folder laid out like the authors' demos, or one of their demo
yaml files; see ``demo.py``), or with no input held-out shapes-world clips (their ground truth
scores the result) with ``inputs.controls``: ``all`` (every control on every layer, the default),
``one`` (one control per layer drawn 20/40/40 as in training, the same draw for a seed), or one
control's name (``motion_score``, ``trajectory``, ``sketch``) on every layer. Outputs: the video, and per valid layer a preview of
its region as assigned to the frames and of its control (trajectory heat map, sketch, or the motion
score as a grey level).
"""

from __future__ import annotations

from typing import Any

import torch

from layerkit.errors import LayerkitError
from layerkit_plugins.layeranimate import FILE_KEYS, INPUT_KEYS
from layerkit_plugins.tooncrafter.task import KeyframeTask


class LayerAnimateTask(KeyframeTask):
    input_keys = INPUT_KEYS
    file_keys = FILE_KEYS

    def __init__(self, mode: str = "i2v", capacity: int = 4, fps: float | None = None, default_seed: int = 0,
                 num_samples: int = 1, previews: bool = True) -> None:
        super().__init__(mode=mode, fps=fps, default_seed=default_seed, num_samples=num_samples)
        self.name = f"layeranimate.{mode}"
        self.capacity, self.previews = int(capacity), bool(previews)

    def sample_inputs(self, inputs: dict[str, Any], *, height: int, width: int, num_frames: int) -> list[dict[str, Any]]:
        n = int(inputs.get("num_samples", self.num_samples))
        if n < 1:
            raise LayerkitError(f"inputs.num_samples must be at least 1; got {n}.")
        if inputs.get("demo"):
            from layerkit_plugins.layeranimate.demo import read_demo

            sample = read_demo(inputs["demo"], root=inputs.get("demo_root"), height=height, width=width,
                               num_frames=num_frames)
            if sample["layer_validity"].shape[0] != self.capacity:
                raise LayerkitError(f"the demo has a layer capacity of {sample['layer_validity'].shape[0]}; this "
                                    f"task's is {self.capacity} (task.capacity).")
            if inputs.get("prompt"):
                sample["prompt"] = str(inputs["prompt"])
            if inputs.get("fps") is not None:
                sample["fps"] = float(inputs["fps"])
            sample.pop("sampling", None)
            sample.pop("negative_prompt", None)
            sample["notes"] = [f"inputs.demo: {inputs['demo']} ({sample['mode']})"]
            return [sample for _ in range(n)]
        if inputs.get("prompt"):
            raise LayerkitError("layeranimate animates layers: give inputs.demo=DIR (a folder laid out like the "
                                "authors' demos) with the prompt, or no input for held-out shapes-world clips.")
        from layerkit.data.shapes import ShapesConfig, seed_for
        from layerkit_plugins.layeranimate.controls import CONTROL_PROBS, CONTROLS, keep_one_control
        from layerkit_plugins.layeranimate.shapes import shapes_layeranimate_sample

        controls = str(inputs.get("controls", "all"))
        if controls not in ("all", "one", *CONTROLS):
            raise LayerkitError(f"inputs.controls is '{controls}'; expected all, one or one of {', '.join(CONTROLS)}.")
        seed = int(inputs.get("seed", self.default_seed))
        config = ShapesConfig(num_frames=num_frames, height=height, width=width)
        out = []
        for i in range(n):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + i)
            sample = shapes_layeranimate_sample(seed_for("test", seed, i), mode=self.mode, generator=generator,
                                                capacity=self.capacity, config=config)
            if controls == "one":
                picks = torch.multinomial(torch.as_tensor(CONTROL_PROBS, dtype=torch.float64), self.capacity,
                                          replacement=True, generator=generator).tolist()
                sample = keep_one_control(sample, tuple(CONTROLS[p] for p in picks))
            elif controls != "all":
                sample = keep_one_control(sample, (controls,) * self.capacity)
            if self.fps is not None or inputs.get("fps") is not None:
                sample["fps"] = float(inputs.get("fps", self.fps))
            out.append(sample)
        return out

    def unpack(self, decoded: dict[str, torch.Tensor], batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        outputs = super().unpack(decoded, batch)
        if not self.previews or "layer_masks" not in batch:
            return outputs
        from layerkit_plugins.layeranimate.layers import layer_regions

        for i, out in enumerate(outputs):
            f = out["video"].shape[0]
            regions = (layer_regions(batch["keyframes"][i], batch["layer_masks"][i]) + 1) / 2  # [N, K, 3, H, W]
            for n in range(regions.shape[0]):
                if not bool(batch["layer_validity"][i][n]):
                    continue
                static = bool(batch["layer_static"][i][n])
                region = torch.zeros(f, *regions.shape[2:])
                region[0] = regions[n, 0]
                if regions.shape[1] > 1 and batch["mode"][i] == "interpolate":
                    region[-1] = regions[n, -1]
                if static:  # repeated over the frames (motion-based assignment), as the model sees it
                    half = f // 2 if batch["mode"][i] == "interpolate" else f
                    region[:half] = regions[n, 0]
                    region[half:] = regions[n, -1]
                out[f"layer{n}_region"] = region
                out[f"layer{n}_control"] = control_preview(batch, i, n, f)
        return outputs


    def evaluate_samples(self, outputs: list[dict[str, torch.Tensor]],
                         batch: dict[str, Any]) -> list[dict[str, float]] | None:
        """Each sample's figures (``evaluate.per_sample_rows``); the batch's motion correlations are
        in :meth:`evaluate` only."""
        if not batch.get("ground_truth"):
            return None
        from layerkit_plugins.layeranimate.evaluate import per_sample_rows

        return per_sample_rows(outputs, batch)

    def evaluate(self, outputs: list[dict[str, torch.Tensor]], batch: dict[str, Any]) -> dict[str, float] | None:
        """Shapes-world figures (when the samples came from the shapes world): see ``evaluate.py``."""
        if not batch.get("ground_truth"):
            return None
        from layerkit_plugins.layeranimate.evaluate import evaluate_layers

        return evaluate_layers(outputs, batch)


def control_preview(batch: dict[str, Any], i: int, n: int, num_frames: int) -> torch.Tensor:
    """[F, 3, H, W] in [0, 1]: the layer's trajectory heat map (red) over its sketch, or its motion
    score as a grey level when it has neither."""
    traj = batch["trajectory"][i][n].float()  # [F, 3, H, W]: heat map in [-1, 1], offsets
    sketch = batch["sketch"][i][n].float()  # [F, 3, H, W] in [0, 1], white = none
    heat = ((traj[:, :1] + 1) / 2).clamp(0, 1)
    preview = sketch.clone()
    if bool((traj[:, 0] > -1).any()):
        preview = preview * (1 - heat) + heat * torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    elif bool((sketch > 0.99).all()):
        score = float(batch["motion_scores"][i][n])
        preview = torch.full_like(sketch, max(score, 0.0))
    return preview.clamp(0, 1)


def i2v_task(**kwargs: Any) -> LayerAnimateTask:
    return LayerAnimateTask(mode="i2v", **kwargs)


def interpolate_task(**kwargs: Any) -> LayerAnimateTask:
    return LayerAnimateTask(mode="interpolate", **kwargs)
