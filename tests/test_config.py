"""Config composition: the default experiment and the experiment a user names."""

from __future__ import annotations

from layerkit.config import compose


def test_default_experiment_applies_only_when_none_is_named(registry):
    cfg = compose("sample", ["default_experiment=toy_layered"], registry)
    assert cfg.sampler.guidance_scale == 3.0  # set by toy_layered
    # a named experiment replaces the default one, which is never composed
    cfg = compose("sample", ["default_experiment=does_not_exist", "+experiment=toy_layered"], registry)
    assert cfg.sampler.guidance_scale == 3.0
    cfg = compose("sample", ["default_experiment=null"], registry)
    assert cfg.sampler.guidance_scale == 5.0
