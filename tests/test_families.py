"""The protocols carry all three method families: each mock goes through the real
LightningModule (a real Trainer step) and the real sampling loop."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import TINY
from mock_families import MockPlugin

from layerkit.config import compose, to_plain
from layerkit.errors import LayerkitError
from layerkit.pipeline import add_control_inputs, build_parts, encode_packed, make_step, predict, reimposed
from layerkit.sampling.loop import SamplerOptions, denoise, stack_conditions
from layerkit.training.data import LayerkitDataModule
from layerkit.training.module import LayerkitModule


def _setup(registry, *overrides, training=True):
    registry.add_plugin(MockPlugin(), "mock")
    cfg = compose("train", ["+experiment=toy_layered", *TINY, *overrides], registry)
    parts = build_parts(cfg, registry, training=training)
    return cfg, parts


def _fit_one_step(cfg, parts, registry, tmp_path, steps=1):
    data = LayerkitDataModule(cfg, registry, prepares=[c.prepare for c in parts.controls.values()])
    module = LayerkitModule(parts, to_plain(cfg))
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    changed = {n for n, p in module.named_parameters() if p.requires_grad and not torch.equal(before[n], p)}
    return module, data, changed


def _batch(data, parts):
    data.collate = parts.task.collate
    loader = data.train_dataloader()
    return next(iter(loader))


def _call(parts, packed, latents, t, cond):
    return predict(parts, packed, make_step(packed, latents, t, cond))


# -- LayerFlow: sequence packing, given sub-clips clean and out of the loss --------------------
def test_sequence_packing_given_clips_clean_and_out_of_loss(registry, tmp_path):
    cfg, parts = _setup(registry, "task=layered_decompose")
    module, data, changed = _fit_one_step(cfg, parts, registry, tmp_path)
    assert changed, "a training step must update the trainable weights"
    batch = _batch(data, parts)
    packed = parts.task.pack(batch, training=True)
    assert [s.name for s in packed.segments] == ["foreground", "alpha", "background", "blended"]
    assert packed.given.shape == (2, 16), "given per pixel frame"
    assert packed.given[:, 12:].all() and not packed.given[:, :12].any()
    assert packed.prompts[0][0].startswith("0, ") and packed.prompts[0][2].startswith("2, ")
    # a prompt left out stays "" (no index prefix): the backbone's unconditional text for that block
    assert parts.task.prompt_blocks({**batch, "background_prompt": [""] * 2}, 0)[1] == ""

    # the loss ignores the given clip: a model output that is wrong only there costs nothing
    latents, layout = encode_packed(parts.backbone, packed, training=True)
    given = reimposed(parts.backbone, layout)
    assert layout.lengths == [4, 4, 4, 4] and given[:, 12:].all() and not given[:, :12].any()
    calls = []

    def fake_predict(noisy, timesteps, cond):
        calls.append(noisy.clone())
        target = module.scheduler.get_velocity(latents, noise_holder[0], timesteps)
        out = target.clone()
        out[:, :, 12:] += 100.0  # garbage only on the given frames
        return out

    noise_holder = []
    real_randn = torch.randn_like
    torch.manual_seed(0)

    def randn_like(x, *a, **k):
        noise = real_randn(x, *a, **k)
        noise_holder.append(noise)
        return noise

    parts.backbone.predict = fake_predict
    torch.randn_like = randn_like
    try:
        module.prompt_dropout = 0.0
        loss = module.diffusion_loss(batch)
    finally:
        torch.randn_like = real_randn
        del parts.backbone.predict
    assert float(loss) < 1e-10
    # the given clip entered the denoiser clean (never noised)
    assert torch.allclose(calls[0][:, :, 12:], latents[:, :, 12:])

    # sampling: the given clip is re-imposed every step and comes back unchanged
    parts.backbone.eval()
    out = denoise(parts, parts.task.pack(batch, training=False), SamplerOptions(steps=3, guidance_scale=2.0,
                  progress=False), generator=torch.Generator().manual_seed(0)).latents
    assert torch.equal(out[:, :, 12:], latents[:, :, 12:])
    assert not torch.equal(out[:, :, :12], latents[:, :, :12])


# -- LayerAnimate: ControlNet-like per-layer features fused with a validity mask ----------------
def test_layer_controlnet_and_masked_fusion(registry, tmp_path):
    cfg, parts = _setup(
        registry,
        "data.num_sprites=2",
        "+controls.layers={name: mock.layer_controlnet, capacity: 4}",
        "+adapters.layers={name: mock.layer_fusion, channels: 8}",
    )
    fusion, control = parts.adapters["layers"], parts.controls["layers"]
    # zero-initialised fusion output: step 1 trains it, step 2 reaches the control encoder
    module, data, changed = _fit_one_step(cfg, parts, registry, tmp_path, steps=2)
    assert any(n.startswith("controls.layers.encoder") for n in changed), "the control encoder trains"
    assert any(n.startswith("adapters.layers.out") for n in changed), "the fusion's zero-init output trains"

    batch = _batch(data, parts)
    assert batch["layer_masks_padded"].shape[1] == 4
    assert batch["layer_validity"][0].tolist() == [True, True, True, False]  # 3 layers padded to 4
    packed = add_control_inputs(parts.task.pack(batch, training=True), batch, parts.controls)
    cond = parts.backbone.encode_prompt_blocks(packed.prompts)
    latents, _ = encode_packed(parts.backbone, packed, training=True)
    t = torch.tensor([500, 500])
    torch.nn.init.normal_(fusion.out.weight, std=0.5)
    with torch.no_grad():
        base = _call(parts, packed, latents, t, cond)
        # a padded layer's content has no influence ...
        packed.extras["layer_masks_padded"][:, 3] = 1.0
        assert torch.allclose(_call(parts, packed, latents, t, cond), base, atol=1e-6)
        # ... a valid layer's does
        packed.extras["layer_masks_padded"][:, 1] = 1 - packed.extras["layer_masks_padded"][:, 1]
        assert not torch.allclose(_call(parts, packed, latents, t, cond), base, atol=1e-4)
    parts.backbone.eval()
    out = denoise(parts, packed, SamplerOptions(steps=2, guidance_scale=3.0, progress=False),
                  generator=torch.Generator().manual_seed(0)).latents
    assert out.shape == latents.shape and torch.isfinite(out).all()
    assert control.capacity == 4


def test_control_sees_each_guidance_half_with_its_own_conditioning(registry):
    """The loop's CFG step == a hand-written reference that runs the ControlNet-like control and the
    denoiser on the unconditional and the conditional rows separately, each with its own text."""
    cfg, parts = _setup(registry, "data.num_sprites=2", "+controls.layers={name: mock.layer_controlnet}",
                        "+adapters.layers={name: mock.layer_fusion}", training=False)
    torch.manual_seed(0)
    torch.nn.init.normal_(parts.adapters["layers"].out.weight, std=0.5)
    data = LayerkitDataModule(cfg, registry, prepares=[c.prepare for c in parts.controls.values()])
    batch = _batch(data, parts)
    packed = add_control_inputs(parts.task.pack(batch, training=False), batch, parts.controls)
    backbone = parts.backbone.eval()
    with torch.no_grad():
        cond = backbone.encode_conditions(packed)
        uncond = backbone.negative_conditions(packed, cond, "")
        x = torch.randn(2, backbone.latent_channels, 16, 8, 8)
        t = torch.tensor([700, 700])
        both = stack_conditions(uncond, cond, 2)
        ours = predict(parts, packed, make_step(packed, torch.cat([x, x]), torch.cat([t, t]), both, copies=2))
        halves = [_call(parts, packed, x, t, c) for c in (uncond, cond)]  # the reference: one half at a time
    assert (ours - torch.cat(halves)).abs().max().item() <= 1e-5
    assert not torch.allclose(halves[0], halves[1], atol=1e-4), "the halves differ: the control read their text"


def test_an_adapter_reading_what_no_control_provides_is_refused(registry):
    with pytest.raises(LayerkitError, match=r"adapter 'layers' reads 'layer_features', which no control provides"):
        _setup(registry, "+adapters.layers={name: mock.layer_fusion}")


# -- Layer-Animate RGBA: an attention processor reading another frame's keys and values ---------
def test_inter_frame_attention_processor(registry, tmp_path):
    cfg, parts = _setup(registry, "+adapters.ifa={name: mock.inter_frame}", "trainable=[]")
    adapter = parts.adapters["ifa"]
    trainable = {n for n, p in parts.backbone.named_parameters() if p.requires_grad}
    assert trainable == set(), "the backbone stays frozen"
    assert {n for n, p in adapter.named_parameters() if p.requires_grad} == {"to_q.weight", "to_out.weight", "to_out.bias"}

    module, data, changed = _fit_one_step(cfg, parts, registry, tmp_path)
    assert changed and all(n.startswith("adapters.ifa.") for n in changed)

    batch = _batch(data, parts)
    packed = parts.task.pack(batch, training=True)
    cond = parts.backbone.encode_prompt_blocks(packed.prompts)
    latents, _ = encode_packed(parts.backbone, packed, training=True)
    t = torch.tensor([300, 300])
    with torch.no_grad():
        torch.nn.init.zeros_(adapter.to_out.weight)
        torch.nn.init.zeros_(adapter.to_out.bias)
        with_zero = _call(parts, packed, latents, t, cond)
        adapter.detach(parts.backbone)
        plain = _call(parts, packed, latents, t, cond)
        assert torch.equal(with_zero, plain), "zero-initialised W_O' leaves the backbone exactly as it was"
        adapter.attach_again = adapter.attach(parts.backbone)
        torch.nn.init.normal_(adapter.to_out.weight, std=0.2)
        ref = _call(parts, packed, latents, t, cond)
        # frame 0 now depends on the middle frame (index f // 2 = 8 of 16 latent frames)
        moved = latents.clone()
        moved[:, :, 8] += 1.0
        changed_out = _call(parts, packed, moved, t, cond)
    assert not torch.allclose(changed_out[:, :, 0], ref[:, :, 0], atol=1e-5)
    parts.backbone.eval()
    out = denoise(parts, packed, SamplerOptions(steps=2, guidance_scale=1.0, progress=False),
                  generator=torch.Generator().manual_seed(0)).latents
    assert torch.isfinite(out).all()


# -- LayerFlow Motion LoRA: a peft LoRA whose scale is set per sample in one batch --------------
def test_lora_per_sample_scale(registry, tmp_path):
    cfg, parts = _setup(
        registry,
        "+adapter@adapters.motion=lora",
        "adapters.motion.rank=4",
        "adapters.motion.blocks=transformer_blocks",
        "adapters.motion.every=2",
        "adapters.motion.offset=1",
        "trainable=[]",
        "+task.scale_from.motion=is_static",
    )
    lora = parts.adapters["motion"]
    names = [n for n, p in parts.backbone.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and "transformer_blocks.1." in n for n in names)

    backbone = parts.backbone
    packed_data = LayerkitDataModule(cfg, registry)
    batch = _batch(packed_data, parts)
    batch["is_static"] = torch.tensor([True, False])
    packed = parts.task.pack(batch, training=True)
    assert packed.scales["motion"].tolist() == [1.0, 0.0]
    for p in lora.lora_parameters().values():
        torch.nn.init.normal_(p, std=0.3)
    cond = backbone.encode_prompt_blocks(packed.prompts)
    latents, _ = encode_packed(backbone, packed, training=True)
    t = torch.tensor([400, 400])
    with torch.no_grad():
        mixed = _call(parts, packed, latents, t, cond)
        packed.scales["motion"] = torch.tensor([1.0, 1.0])
        full = _call(parts, packed, latents, t, cond)
        lora.detach(backbone)
        base = _call(parts, packed, latents, t, cond)
    assert torch.allclose(mixed[0], full[0], atol=1e-6), "scale 1 row = LoRA on"
    assert torch.allclose(mixed[1], base[1], atol=1e-6), "scale 0 row = base model"
    assert not torch.allclose(full[1], base[1], atol=1e-4)

    # and through the real training module, with per-sample scales from the batch
    cfg, parts = _setup(registry, "+adapter@adapters.motion=lora", "trainable=[]",
                        "+task.scale_from.motion=static")
    # the shapes world marks static layers; use the background's flag as the sample flag
    data = LayerkitDataModule(cfg, registry, collate=parts.task.collate)
    module = LayerkitModule(parts, to_plain(cfg))
    batch = next(iter(data.train_dataloader()))
    batch["static"] = torch.tensor([1.0, 0.0])
    loss = module.diffusion_loss(batch)
    loss.backward()
    grads = [p.grad for p in parts.adapters["motion"].lora_parameters().values() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
