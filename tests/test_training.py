"""Training for real: checkpoints without the frozen base, kill -9 and resume, 2-process DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY, run_cli
from safetensors.torch import load_file

from layerkit.io.weights import read_metadata
from layerkit.training.run import train

LORA_ONLY = ["+adapter@adapters.style=lora", "adapters.style.rank=2", "trainable=[]"]


def test_checkpoint_holds_trainable_weights_optimizer_and_config(registry, tmp_path):
    out = train(["+experiment=toy_layered", *TINY, *LORA_ONLY, "trainer.max_steps=2",
                 "train.checkpoint_every=1", f"output_dir={tmp_path / 'run'}"], registry=registry)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)  # plain data, no pickled objects
    keys = list(ckpt["state_dict"])
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), "never the frozen base model"
    assert ckpt["global_step"] == 2
    assert ckpt["optimizer_states"][0]["state"], "optimiser state is kept for resuming"
    assert ckpt["layerkit_config"]["adapters"]["style"]["rank"] == 2

    weights = load_file(str(out / "weights.safetensors"))
    assert set(weights) == set(keys)
    assert read_metadata(out / "weights.safetensors")["layerkit_config"]["seed"] == 0
    record = json.loads((out / "record.json").read_text())
    assert record["global_step"] == 2 and record["versions"]["torch"]
    assert "weights.safetensors" in record["files"]
    exported = load_file(str(out / "export" / "style.diffusers.safetensors"))
    assert exported and all(k.startswith("transformer.") and ".lora_" in k for k in exported)


def test_optimizer_sees_trainable_parameters_only(registry, tmp_path):
    from layerkit.config import compose, to_plain
    from layerkit.pipeline import build_parts
    from layerkit.training.module import LayerkitModule

    cfg = compose("train", ["+experiment=toy_layered", *TINY, *LORA_ONLY], registry)
    module = LayerkitModule(build_parts(cfg, registry, training=True), to_plain(cfg))
    optimizer = module.configure_optimizers()
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert in_optimizer == trainable
    assert len(trainable) < sum(1 for _ in module.parameters())


def test_learning_rate_schedule_warms_up_decays_and_is_checkpointed(registry, tmp_path):
    out = train(["+experiment=toy_layered", *TINY, *LORA_ONLY, "trainer.max_steps=4", "optim.lr=1e-3",
                 "optim.scheduler=cosine", "optim.warmup_steps=2", "train.checkpoint_every=1",
                 f"output_dir={tmp_path / 'run'}"], registry=registry)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    (schedule,) = ckpt["lr_schedulers"]
    assert schedule["last_epoch"] == 4
    assert schedule["_last_lr"][0] == pytest.approx(0.0, abs=1e-12)  # cosine reaches 0 at max_steps

    import lightning as L

    from layerkit.config import compose, to_plain
    from layerkit.pipeline import build_parts
    from layerkit.training.module import LayerkitModule

    cfg = compose("train", ["+experiment=toy_layered", *TINY, *LORA_ONLY, "optim.lr=1e-3",
                            "optim.scheduler=cosine", "optim.warmup_steps=2"], registry)
    module = LayerkitModule(build_parts(cfg, registry, training=True), to_plain(cfg))
    module.trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    found = module.configure_optimizers()
    optimizer, scheduler = found["optimizer"], found["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:3] == pytest.approx([0.0, 5e-4, 1e-3])
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5] > 0.0


def test_schedule_added_on_resume_starts_at_the_step_reached(registry, tmp_path):
    run = tmp_path / "run"
    common = ["+experiment=toy_layered", *TINY, *LORA_ONLY, "optim.lr=1e-3", "train.checkpoint_every=1",
              f"output_dir={run}"]
    train([*common, "trainer.max_steps=2"], registry=registry)  # no schedule: none saved
    out = train([*common, "trainer.max_steps=4", "optim.scheduler=linear"], registry=registry)
    (schedule,) = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["lr_schedulers"]
    assert schedule["last_epoch"] == 4
    assert schedule["_last_lr"][0] == pytest.approx(0.0, abs=1e-12)  # linear: 0 at step 4, not 5e-4

    out = train([*common, "trainer.max_steps=5"], registry=registry)  # and back to a constant rate
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["lr_schedulers"] == [] and ckpt["global_step"] == 5
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1e-3)


def test_unknown_learning_rate_schedule_is_one_sentence(registry, tmp_path):
    from layerkit.errors import LayerkitError

    with pytest.raises(LayerkitError, match="optim.scheduler is 'wavy'; expected one of: linear, cosine"):
        train(["+experiment=toy_layered", *TINY, *LORA_ONLY, "trainer.max_steps=1", "optim.scheduler=wavy",
               f"output_dir={tmp_path / 'run'}"], registry=registry)
    assert not (tmp_path / "run" / "weights.safetensors").exists()


@pytest.mark.parametrize(("value", "backend"), [(False, None), ("False", None), (None, None), ("0", None),
                                              ("no", None), (True, "inductor"), ("1", "inductor"), ("yes", "inductor"),
                                              ("Inductor", "inductor"), ("eager", "eager"), ("AOT_EAGER", "aot_eager")])
def test_compile_values_read_as_a_user_means_them(value, backend):
    from layerkit.training.module import _compile_backend

    assert _compile_backend(value) == backend


def test_compiled_denoiser_trains_and_its_weights_keep_their_names(registry, tmp_path, monkeypatch):
    """train.compile compiles the denoiser in place (nn.Module.compile): the run trains, and its
    weights and checkpoint carry the names an eager run writes (no '_orig_mod.'). The eager
    backend runs the same dynamo capture as inductor without the C++ build (seconds, not a minute)."""
    from layerkit.errors import LayerkitError

    common = ["+experiment=toy_layered", *TINY, "trainable=[transformer_blocks.0]", "trainer.max_steps=2",
              "train.checkpoint_every=1"]
    compiled = train([*common, "train.compile=eager", f"output_dir={tmp_path / 'compiled'}"], registry=registry)
    plain = train([*common, f"output_dir={tmp_path / 'plain'}"], registry=registry)
    weights, reference = load_file(str(compiled / "weights.safetensors")), load_file(str(plain / "weights.safetensors"))
    assert weights and set(weights) == set(reference)
    ckpt = torch.load(compiled / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(ckpt["state_dict"]) == set(weights) and ckpt["global_step"] == 2
    assert json.loads((compiled / "record.json").read_text())["config"]["train"]["compile"] == "eager"
    from layerkit.config import compose, to_plain
    from layerkit.pipeline import build_parts
    from layerkit.training.module import LayerkitModule

    cfg = compose("train", [*common, "train.compile=eager"], registry)
    module = LayerkitModule(build_parts(cfg, registry, training=True), to_plain(cfg))
    assert getattr(module.backbone.denoiser, "_compiled_call_impl", None) is None
    module.on_train_start()  # what fit (and a resumed fit) calls before the first step
    assert module.backbone.denoiser._compiled_call_impl is not None, "the denoiser itself is compiled"
    assert set(module.trainable_state_dict()) == set(weights), "the names weights.safetensors holds"
    with pytest.raises(LayerkitError, match="train.compile is 'fastest'; expected true, false or a torch.compile backend"):
        train([*common, "train.compile=fastest", f"output_dir={tmp_path / 'bad'}"], registry=registry)
    monkeypatch.setenv("PATH", str(tmp_path))  # no C++ compiler for inductor: one sentence, before any step
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(LayerkitError, match="needs a C\\+\\+ compiler"):
        train([*common, "train.compile=true", f"output_dir={tmp_path / 'nocxx'}"], registry=registry)
    assert not (tmp_path / "nocxx").exists(), "checked before the run folder is made"


def test_kill_and_resume_continues_the_same_run(tmp_path):
    out = tmp_path / "run"
    args = ["train", "+experiment=toy_layered", *TINY, "trainer.max_steps=12", "train.checkpoint_every=1",
            f"output_dir={out}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "layerkit.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = out / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    step = 0
    while time.time() < deadline and proc.poll() is None:
        if last.is_file():
            try:
                step = torch.load(last, weights_only=True)["global_step"]
            except Exception:
                step = 0
            if step >= 2:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= step < 12, f"the run should be killed mid-way (got step {step})"
    assert not (out / "weights.safetensors").exists()

    # the same command again resumes from output_dir/checkpoints/last.ckpt
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((out / "record.json").read_text())
    assert record["global_step"] == 12
    assert record["resumed_from"].endswith("last.ckpt")
    killed_at = step
    metrics = (out / "logs" / "metrics.csv").read_text().splitlines()
    assert metrics, "the log continues"
    assert killed_at < record["global_step"]


def test_ddp_two_processes_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    result = run_cli("train", "+experiment=toy_layered", *TINY, "trainer=ddp", "trainer.accelerator=cpu",
                     "trainer.devices=2", "trainer.max_steps=2", "trainer.precision=32-true",
                     "train.checkpoint_every=1", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "record.json").read_text())
    assert record["world_size"] == 2 and record["global_step"] == 2
    # one run, one folder: no last-v1.ckpt (previous.ckpt is the fallback kept beside last.ckpt)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt", "previous.ckpt"]
    siblings = [p for p in tmp_path.iterdir() if p.name != "ddp"]
    assert siblings == [], "one output directory for both processes"


def test_stages_chain_through_init_from_even_under_a_lora(registry, tmp_path):
    """Stage 1 fine-tunes a block; stage 2 wraps that block in a LoRA and starts from stage 1."""
    from layerkit.config import compose, to_plain
    from layerkit.pipeline import build_parts, load_trainable_state
    from layerkit.training.module import LayerkitModule

    first = train(["+experiment=toy_layered", *TINY, "trainable=[transformer_blocks.1.]", "trainer.max_steps=1",
                   f"output_dir={tmp_path / 's1'}"], registry=registry)
    stage1 = load_file(str(first / "weights.safetensors"))
    key = "backbone.denoiser.transformer_blocks.1.attn1.to_q.weight"
    assert key in stage1

    cfg = compose("train", ["+experiment=toy_layered", *TINY, *LORA_ONLY,
                            f"init_from=[{first / 'weights.safetensors'}]"], registry)
    parts = build_parts(cfg, registry, training=True)
    module = LayerkitModule(parts, to_plain(cfg))
    loaded = load_trainable_state(module, first / "weights.safetensors", parts=parts)
    wrapped = key.replace("to_q.weight", "to_q.base_layer.weight")
    assert wrapped in loaded and torch.equal(module.state_dict()[wrapped], stage1[key])


# -- the loss's weighting over timesteps (train.loss_weighting) ----------------------------------
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_timestep_weights_give_each_timestep_its_x0_weight(kind):
    """factor x the prediction type's own x0 weight (SNR, SNR + 1, 1) = the weighting's w(t)."""
    from diffusers import DDIMScheduler

    from layerkit.training.module import timestep_weights

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=kind)
    t = torch.tensor([0, 100, 500, 999])
    a = scheduler.alphas_cumprod[t].double()
    snr = a / (1 - a)
    native = {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[kind]
    wanted = {"none": native, "min_snr": snr.clamp(max=5.0), "snr_plus_one": snr + 1,
              "truncated_snr": snr.clamp(min=1.0)}
    for name, w in wanted.items():
        factor = timestep_weights(scheduler, t, name, gamma=5.0)
        assert factor.dtype == torch.float32 and factor.shape == (4,)
        assert torch.allclose(factor.double() * native, w, rtol=1e-5), name
    if kind == "epsilon":  # the v-prediction loss of an epsilon model: 1 / alpha_bar
        assert torch.allclose(timestep_weights(scheduler, t, "snr_plus_one").double(), 1 / a, rtol=1e-5)


def _module_and_batch(registry, overrides: list[str]):
    """The toy_layered module (LoRA only, no prompt dropout) with ``overrides`` and its first batch."""
    from layerkit.config import compose, to_plain
    from layerkit.pipeline import build_parts
    from layerkit.training.data import LayerkitDataModule
    from layerkit.training.module import LayerkitModule

    cfg = compose("train", ["+experiment=toy_layered", *TINY, *LORA_ONLY, "train.prompt_dropout=0", *overrides],
                  registry)
    parts = build_parts(cfg, registry, training=True)
    module = LayerkitModule(parts, to_plain(cfg))
    data = LayerkitDataModule(cfg, registry, prepares=[])
    data.collate = parts.task.collate
    return module, next(iter(data.train_dataloader()))


def test_segment_loss_weights_weigh_each_layers_frames_and_a_wrong_name_is_one_sentence(registry):
    """train.segment_loss_weights: the loss with weights w is sum_i w_i x (the loss with segment i
    alone weighted 1, the others 0), at the same timesteps and noise; a name the task does not
    pack, or a negative weight, is one sentence."""
    from layerkit.errors import LayerkitError

    def loss(weights: dict[str, float]) -> float:
        module, batch = _module_and_batch(registry, [f"+train.segment_loss_weights.{k}={v}" for k, v in weights.items()])
        torch.manual_seed(0)
        return float(module.diffusion_loss(batch, timesteps=torch.tensor([300, 700]),
                                           generator=torch.Generator().manual_seed(1)).detach())

    names = ["foreground", "alpha", "background", "blended"]
    alone = {n: loss({m: float(m == n) for m in names}) for n in names}
    assert all(v > 0 for v in alone.values())
    assert loss({}) == pytest.approx(sum(alone.values()), rel=1e-4)
    wanted = {"foreground": 3.0, "alpha": 2.0}
    assert loss(wanted) == pytest.approx(sum(alone[n] * wanted.get(n, 1.0) for n in names), rel=1e-4)
    with pytest.raises(LayerkitError, match="train.segment_loss_weights names 'fg', which this task does not pack; "
                                            "its segments are 'foreground', 'alpha'"):
        loss({"fg": 2.0})
    with pytest.raises(LayerkitError, match="train.segment_loss_weights.alpha must be a number >= 0; got -1"):
        loss({"alpha": -1})


def test_segment_loss_weights_are_checked_against_every_segment_the_task_may_pack():
    """A weight on the frame-0 copy (packed by fg2bg and bg2fg only) weighs those batches and leaves a
    generate batch at 1, instead of failing at whichever step first draws generate; a typo is refused
    when the module is built (the task's segment_names), not at a training step."""
    from layerkit_plugins.layered.task import FIRST, LayeredTask

    from layerkit.data.shapes import ShapesConfig, collate_layered, make_sample
    from layerkit.errors import LayerkitError
    from layerkit.training.weighting import check_segment_names, segment_frame_weights

    task = LayeredTask(prepend_first_frame=["fg2bg"], train_modes={"generate": 1})
    assert task.segment_names == ("foreground", "alpha", "background", "blended", FIRST)
    assert LayeredTask().segment_names == ("foreground", "alpha", "background", "blended")
    check_segment_names({FIRST: 2.0}, task.segment_names)
    packed = task.pack(collate_layered([make_sample(1, ShapesConfig(num_frames=4, height=16, width=16))]),
                       training=True)  # generate: no frame-0 copy
    layout = SimpleNamespace(lengths=[1, 1, 1, 1])
    assert segment_frame_weights({FIRST: 2.0}, packed, layout, task.segment_names).tolist() == [1.0] * 4
    with pytest.raises(LayerkitError, match="names 'first_frame', which this task does not pack"):
        segment_frame_weights({FIRST: 2.0}, packed, layout)  # a task that does not say: this batch's segments
    with pytest.raises(LayerkitError, match="names 'fg', which this task does not pack; its segments are 'foreground'"):
        check_segment_names({"fg": 2.0}, task.segment_names)


def test_segment_loss_weights_null_clears_an_experiments_weights(registry):
    """The toy LayerFlow's stage 1 weighs foreground and alpha 3; ``=null`` weighs every segment 1
    again (``={}`` is merged into the experiment's weights by Hydra: the comment in train.yaml)."""
    from layerkit.config import compose

    base = ["+experiment=toy_layerflow_stage1"]
    assert dict(compose("train", base, registry).train.segment_loss_weights) == {"foreground": 3, "alpha": 3}
    assert compose("train", [*base, "train.segment_loss_weights=null"], registry).train.segment_loss_weights is None
    assert dict(compose("train", [*base, "train.segment_loss_weights={}"], registry).train.segment_loss_weights) \
        == {"foreground": 3, "alpha": 3}  # what the comment warns of


def test_region_weights_pool_the_region_to_each_latent_element():
    """1 + w x the region's maximum over each latent element's pixel frames and 4 x 4 cell."""
    from layerkit.errors import LayerkitError
    from layerkit.training.weighting import region_weights

    region = torch.zeros(2, 8, 16, 16)
    region[0, 5, 4:6, 9:10] = 0.5           # one pixel block in frame 5: latent frame 1, cell (1, 2)
    factor = region_weights(region, [(0, 4), (4, 8)], (2, 8, 2, 4, 4), 3.0)
    assert factor.shape == (2, 1, 2, 4, 4)
    wanted = torch.ones(2, 1, 2, 4, 4)
    wanted[0, 0, 1, 1, 2] = 2.5
    assert torch.equal(factor, wanted)
    with pytest.raises(LayerkitError, match="the latent layout has 3 frame windows but the latents have 2 frames"):
        region_weights(region, [(0, 2), (2, 4), (4, 8)], (2, 8, 2, 4, 4), 3.0)


def test_region_loss_weight_adds_the_sprites_loss_and_needs_a_region(registry, monkeypatch):
    """train.region_loss_weight w: the loss is L0 + w x L_region at the same timesteps and noise
    (linear in w, the added part positive); the layered task's region is the sprite's matte behind
    every segment; a task that marks none is one sentence."""
    from layerkit.errors import LayerkitError

    def loss(w: float, module_batch=None) -> float:
        module, batch = module_batch or _module_and_batch(registry, [f"train.region_loss_weight={w}"])
        torch.manual_seed(0)
        return float(module.diffusion_loss(batch, timesteps=torch.tensor([300, 700]),
                                           generator=torch.Generator().manual_seed(1)).detach())

    l0, l1, l3 = loss(0.0), loss(1.0), loss(3.0)
    assert l1 > l0 and l3 - l0 == pytest.approx(3 * (l1 - l0), rel=1e-4)

    module, batch = _module_and_batch(registry, ["train.region_loss_weight=2"])
    packed = module.task.pack(batch, training=True)
    alpha = batch["foreground_alpha"][:, :, 0]
    assert packed.loss_region.shape == (alpha.shape[0], packed.num_frames, *alpha.shape[2:])
    assert torch.equal(packed.loss_region[:, : alpha.shape[1]], alpha.clamp(0, 1))
    assert module.task.pack(batch, training=False).loss_region is None
    module.task.train_modes, module.task.prepend_first_frame = {"bg2fg": 1.0}, {"bg2fg"}  # with the frame-0 copy
    packed = module.task.pack(batch, training=True)
    assert [s.name for s in packed.segments][0] != "foreground" and packed.segments[0].num_frames == 1
    f = alpha.shape[1]
    assert packed.loss_region.shape[1] == 1 + f * (len(packed.segments) - 1)
    assert torch.equal(packed.loss_region[:, 0], alpha[:, 0].clamp(0, 1))
    for k in range(len(packed.segments) - 1):  # every layer's segment gets the whole matte
        assert torch.equal(packed.loss_region[:, 1 + k * f: 1 + (k + 1) * f], alpha.clamp(0, 1))
    module.task.train_modes, module.task.prepend_first_frame = {}, set()
    monkeypatch.setattr(type(module.task), "loss_region", staticmethod(lambda batch, segments: None))
    with pytest.raises(LayerkitError, match="train.region_loss_weight is 2.0, but this training batch of task '.*' "
                                            "has no loss region"):
        loss(2.0, (module, batch))
    monkeypatch.setattr(type(module.task), "marks_loss_region", False)  # a task that marks none: at build time
    with pytest.raises(LayerkitError, match="train.region_loss_weight is 2.0, but task '.*' marks no loss region"):
        _module_and_batch(registry, ["train.region_loss_weight=2"])


def test_loss_weighting_scales_each_samples_loss_and_a_wrong_name_is_one_sentence(registry):
    """Two samples at t = 50 and 900: the losses of two weightings give each sample's error, which
    then predict the losses of the other two weightings (a factor on the wrong axis would not)."""
    from layerkit.config import compose, to_plain
    from layerkit.errors import LayerkitError
    from layerkit.pipeline import build_parts
    from layerkit.training.module import LayerkitModule, timestep_weights

    t = torch.tensor([50, 900])
    losses, factors = {}, {}
    for weighting, gamma in (("none", 5.0), ("min_snr", 0.5), ("truncated_snr", 5.0), ("min_snr", 3.0)):
        module, batch = _module_and_batch(registry, [f"train.loss_weighting={weighting}", f"train.snr_gamma={gamma}"])
        torch.manual_seed(0)
        key = (weighting, gamma)
        losses[key] = float(module.diffusion_loss(batch, timesteps=t, generator=torch.Generator().manual_seed(1)).detach())
        factors[key] = timestep_weights(module.scheduler, t, weighting, gamma=gamma).double()
    first, second, *others = factors
    system = torch.stack([factors[first], factors[second]])
    per_sample = torch.linalg.solve(system, torch.tensor([losses[first], losses[second]], dtype=torch.float64))
    assert (per_sample > 0).all()
    for key in others:
        assert not torch.allclose(factors[key], factors[first]), key
        assert losses[key] == pytest.approx(float(factors[key] @ per_sample), rel=1e-3), key

    for bad, message, extra in (
        ("loud", "train.loss_weighting is 'loud'; expected one of: none, min_snr", []),
        ("min_snr", "train.snr_gamma must be above 0; got 0.0", []),
        # the toy's schedule ends at SNR 0, where an epsilon model's x0 error counts nothing
        ("min_snr", "cannot weigh the last step of a zero-terminal-SNR schedule for an epsilon model",
         ["+backbone.prediction_type=epsilon", "train.snr_gamma=5"]),
    ):
        cfg = compose("train", ["+experiment=toy_layered", *TINY, *LORA_ONLY, f"train.loss_weighting={bad}",
                                "train.snr_gamma=0", *extra], registry)
        with pytest.raises(LayerkitError, match=message):
            LayerkitModule(build_parts(cfg, registry, training=True), to_plain(cfg))
