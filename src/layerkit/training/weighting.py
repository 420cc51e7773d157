"""The diffusion loss's target for the scheduler's prediction type, and its weightings over
timesteps (``train.loss_weighting``); no torch at import, so that ``layerkit.checks`` can name the
choices before anything loads."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from layerkit.errors import LayerkitError

if TYPE_CHECKING:
    import torch

#: ``train.loss_weighting``: the weight w(t) each timestep's error in the clean sample x0 gets
LOSS_WEIGHTINGS = ("none", "min_snr", "snr_plus_one", "truncated_snr")


def prediction_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
                      timesteps: torch.Tensor) -> torch.Tensor:
    """What a denoiser trained under ``scheduler`` predicts from ``latents`` noised with ``noise``
    at ``timesteps``: the noise (``epsilon``), the velocity (``v_prediction``: at a zero-terminal-SNR
    schedule's last step, -x0) or the clean latents (``sample``)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise LayerkitError(f"the scheduler's prediction_type '{kind}' is not one of epsilon, v_prediction, sample.")


def timestep_weights(scheduler: Any, timesteps: torch.Tensor, weighting: str, gamma: float = 5.0) -> torch.Tensor:
    """Factors [B] on the backbone's own loss so that the error in x0 at timestep t weighs w(t).

    With SNR(t) = alpha_bar / (1 - alpha_bar), the plain losses weigh the x0 error by SNR
    (epsilon prediction), SNR + 1 (v prediction) or 1 (sample prediction); each weighting sets w:

    - ``none``: the prediction type's own (factor 1);
    - ``min_snr``: w = min(SNR, gamma), Min-SNR-gamma (Hang et al., 2023, sec. 3.4), diffusers'
      ``--snr_gamma``: no timestep dominates, the nearly clean ones less than under epsilon;
    - ``snr_plus_one``: w = SNR + 1 (Salimans & Ho, 2022, sec. 4), the v-prediction loss: an
      epsilon model also learns what the noisiest steps decide (under epsilon their x0 error
      weighs SNR, 0.005 at SD's last step);
    - ``truncated_snr``: w = max(SNR, 1) (Salimans & Ho, 2022, sec. 4).

    The weighting changes which timesteps training spends its capacity on, not what the model is
    asked to predict (the minimiser at each t is the same conditional mean), so the sampler needs
    no change. The factors are not normalised: ``snr_plus_one`` for an epsilon model averages about
    60 over t on SD's schedules and reaches hundreds at the last steps, which scales the logged
    loss and, with ``trainer.gradient_clip_val``, how often gradients are clipped. Computed in
    float64 on the CPU, returned in float32 on the timesteps' device.
    """
    import torch

    alphas = scheduler.alphas_cumprod.detach().cpu().double()[timesteps.detach().cpu().long()]
    snr = alphas / (1 - alphas)
    kind = scheduler.config.prediction_type
    native = snr if kind == "epsilon" else snr + 1 if kind == "v_prediction" else torch.ones_like(snr)
    if weighting == "none":
        return torch.ones(len(snr), dtype=torch.float32, device=timesteps.device)
    if weighting == "min_snr":
        wanted = snr.clamp(max=gamma)
    elif weighting == "snr_plus_one":
        wanted = snr + 1
    elif weighting == "truncated_snr":
        wanted = snr.clamp(min=1.0)
    else:
        raise LayerkitError(f"unknown loss weighting '{weighting}'; expected one of: {', '.join(LOSS_WEIGHTINGS)}.")
    return (wanted / native).float().to(timesteps.device)


def segment_loss_weights(value: Any) -> dict[str, float]:
    """``train.segment_loss_weights`` checked: a mapping of packed segment names (a task's layers,
    e.g. LayerFlow's foreground, alpha, background, blended) to non-negative loss weights; segments
    it leaves out weigh 1. Empty or null: every segment weighs 1."""
    if value is None:
        return {}
    items = getattr(value, "items", None)
    if items is None:
        raise LayerkitError(f"train.segment_loss_weights must map segment names to weights, e.g. "
                            f"{{foreground: 2, alpha: 2}}; got {value!r}.")
    out: dict[str, float] = {}
    for name, weight in items():
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0:
            raise LayerkitError(f"train.segment_loss_weights.{name} must be a number >= 0; got {weight!r}.")
        out[str(name)] = float(weight)
    return out


def check_segment_names(weights: dict[str, float], known: tuple[str, ...] | list[str]) -> None:
    """A name in ``train.segment_loss_weights`` that the task never packs is an error (a typo would
    otherwise weigh nothing)."""
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise LayerkitError(f"train.segment_loss_weights names {', '.join(map(repr, unknown))}, which this task does "
                            f"not pack; its segments are {', '.join(map(repr, known))}.")


def segment_frame_weights(weights: dict[str, float], packed: Any, layout: Any,
                          known: tuple[str, ...] = ()) -> torch.Tensor:
    """The loss weight [f] of each latent frame of a packed batch: its segment's in ``weights``
    (1 when not named). Names are checked against ``known`` (the task's ``segment_names``) or, when
    the task does not say, against this batch's segments."""
    import torch

    names = [segment.name for segment in packed.segments]
    check_segment_names(weights, known or names)
    return torch.cat([torch.full((n,), weights.get(name, 1.0)) for name, n in zip(names, layout.lengths, strict=True)])


def region_weights(region: torch.Tensor, windows: list[tuple[int, int]], latent_shape: tuple[int, ...],
                   weight: float) -> torch.Tensor:
    """Loss factors [B, 1, f, h, w] from a pixel-space loss region [B, F, H, W] in [0, 1]:
    ``1 + weight * r``, r the region's maximum over each latent element's pixels (the pixel frames
    ``windows[k]`` of latent frame k, and its cell of H/h x W/w pixels), so every latent value that
    sees any of the region counts more.

    A small object's shape lives in a few latent values (a 12-px sprite of a 32x32 frame in 3 x 3 of
    8 x 8); its loss is a small share of an unweighted mean. The factor moves capacity to them, as a
    masked diffusion loss does for a subject (e.g. Break-A-Scene, Avrahami et al., 2023).
    """
    return (1.0 + weight * latent_max(region, windows, latent_shape).clamp(0, 1)).unsqueeze(1)


def latent_max(region: torch.Tensor, windows: list[tuple[int, int]], latent_shape: tuple[int, ...]) -> torch.Tensor:
    """A pixel-space map [B, F, H, W] -> [B, f, h, w]: its maximum over each latent element's
    pixels (the pixel frames ``windows[k]`` of latent frame k, and its cell of H/h x W/w pixels)."""
    import torch
    import torch.nn.functional as F

    f, h, w = latent_shape[2:]
    if len(windows) != f:
        raise LayerkitError(f"the latent layout has {len(windows)} frame windows but the latents have {f} frames.")
    frames = torch.stack([region[:, a:z].amax(dim=1) for a, z in windows], dim=1)  # [B, f, H, W]
    return F.adaptive_max_pool2d(frames.float(), (h, w))
