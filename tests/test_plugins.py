"""The plugin system as a third party meets it.

- the example package (examples/layerkit-plugin-example) installs into a fresh virtual
  environment, shows up in ``layerkit plugins --json`` and trains;
- a broken plugin (import error, raising hook) is listed with its error while the others keep
  working, and ``LAYERKIT_STRICT_PLUGINS=1`` makes it fatal with one line;
- listing plugins and ``--help`` import no model code;
- every hook is documented and implemented;
- unknown component names fail with one line listing the available names.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from layerkit import hookimpl, hookspecs
from layerkit.errors import LayerkitError
from layerkit.registry import KINDS, STRICT_ENV, Registry

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "layerkit-plugin-example"
EXAMPLE_SRC = EXAMPLE / "src"
FIRST_PARTY = ("layered", "lora", "shapes", "toy")
HEAVY = ("torch", "diffusers", "transformers", "lightning", "peft", "hydra")

# a 2-layer DiT on 4 frames of 16x16: a two-step run takes seconds on a CPU
SMALL = [
    "backbone.hidden=32", "backbone.heads=2", "backbone.layers=2", "backbone.sample_size=16",
    "data.num_frames=4", "data.height=16", "data.width=16", "data.size=16", "train.batch_size=2",
]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {STRICT_ENV, "PYTHONPATH"}}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def _run(argv: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300):
    return subprocess.run(argv, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout)


def _example_version() -> str:
    match = re.search(r'^version\s*=\s*"([^"]+)"', (EXAMPLE / "pyproject.toml").read_text(), re.M)
    assert match, "the example's pyproject.toml has no version"
    return match.group(1)


def _plugins_json(proc: subprocess.CompletedProcess) -> dict[str, dict]:
    assert proc.returncode == 0, proc.stderr
    return {row["name"]: row for row in json.loads(proc.stdout)["plugins"]}


# ----------------------------------------------------------------------------------------
# the example package, installed as a user would
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def example_venv(tmp_path_factory) -> Path:
    """A venv (seeing the system site-packages, so layerkit and torch) with the example installed.

    The venv is made ``--without-pip``: its python runs the system's pip and setuptools from
    the system site-packages. A venv seeded by ensurepip gets the bundled setuptools, which
    shadows the system one and (before setuptools 70.1, without ``wheel``) cannot build a
    wheel offline with ``--no-build-isolation``.
    """
    root = tmp_path_factory.mktemp("example-venv")
    venv = root / "venv"
    made = _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], cwd=root)
    if made.returncode != 0:
        pytest.skip(f"cannot create a virtual environment offline: {made.stderr.strip()[-300:]}")
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    probe = _run([str(python), "-c", textwrap.dedent("""
        import setuptools  # before pip: pip imports the stdlib distutils setuptools replaces
        import pip
        major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
        assert (major, minor) >= (61, 0), f"setuptools {setuptools.__version__} < 61"
        if (major, minor) < (70, 1):
            import wheel  # bdist_wheel lives in the wheel package before setuptools 70.1
        import layerkit
    """)], cwd=root)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"pip/setuptools cannot build the example offline in a venv: {last}")
    # build from a copy: an in-tree build would leave build/ and *.egg-info in the repository
    source = root / "layerkit-plugin-example"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__"))
    installed = _run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                      "--disable-pip-version-check", "-q", str(source)], cwd=root)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return python


def test_example_plugin_is_listed_from_its_distribution(example_venv, tmp_path):
    plugins = _plugins_json(_run([str(example_venv), "-m", "layerkit.cli", "plugins", "--json"], cwd=tmp_path))
    row = plugins["example"]
    assert row["distribution"] == "layerkit-plugin-example"
    assert row["version"] == _example_version()
    assert row["module"] == "layerkit_example"
    assert row["adapters"] == ["example.frame_gain"]
    assert row["config_dirs"] == ["pkg://layerkit_example.conf"]
    assert row["error"] is None
    for name in FIRST_PARTY:  # the first-party plugins are still there, beside it
        assert plugins[name]["error"] is None

    # the installed package is the wheel (the YAML came with it), and listing imports no model code
    probe = _run([str(example_venv), "-c", textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from layerkit import cli
        cli.main(["plugins"])
        import layerkit_example
        yaml = Path(layerkit_example.__file__).parent / "conf" / "adapter" / "frame_gain.yaml"
        print(json.dumps({{"heavy": [m for m in {HEAVY!r} if m in sys.modules],
                           "prefix": sys.prefix, "file": layerkit_example.__file__, "yaml": yaml.is_file()}}))
    """)], cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    assert "example  (layerkit-plugin-example" in probe.stdout
    facts = json.loads(probe.stdout.strip().splitlines()[-1])
    assert facts["heavy"] == []
    assert Path(facts["file"]).is_relative_to(Path(facts["prefix"]))
    assert facts["yaml"]


def test_example_plugin_trains_in_its_venv(example_venv, tmp_path):
    out = tmp_path / "run"
    proc = _run([str(example_venv), "-m", "layerkit.cli", "train", "+experiment=toy_layered",
                 "+adapter@adapters.gain=frame_gain", "trainable=[]", "trainer.max_steps=2", *SMALL,
                 f"output_dir={out}"], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors import safe_open

    with safe_open(str(out / "weights.safetensors"), "pt") as f:
        keys = list(f.keys())
        delta = f.get_tensor("adapters.gain.delta") if "adapters.gain.delta" in keys else None
        config = json.loads(f.metadata()["layerkit_config"])
    assert keys == ["adapters.gain.delta"], keys  # trainable=[]: only the adapter trains
    assert delta is not None and delta.shape == (12,)  # toy.dit's latent channels
    assert delta.abs().sum() > 0  # zero-initialised, moved by two optimizer steps
    assert config["adapters"]["gain"]["name"] == "example.frame_gain"


# ----------------------------------------------------------------------------------------
# the example adapter, in-process
# ----------------------------------------------------------------------------------------
@pytest.fixture
def example_module(monkeypatch):
    if importlib.util.find_spec("layerkit_example") is None:
        monkeypatch.syspath_prepend(str(EXAMPLE_SRC))
    import layerkit_example

    return layerkit_example


def test_frame_gain_starts_as_identity_respects_scale_and_detaches_exactly(example_module):
    import torch
    from layerkit_example.adapter import FrameGainAdapter
    from torch import nn

    from layerkit.protocols import Backbone

    class Denoiser(nn.Module):  # [B, F, C, H, W] -> (same,), as diffusers' return_dict=False
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3, 3)

        def forward(self, x):
            return (self.proj(x.movedim(2, -1)).movedim(-1, 2),)

    class Tiny(Backbone):
        latent_channels = 3

        def __init__(self) -> None:
            super().__init__()
            self.denoiser = Denoiser()

    torch.manual_seed(0)
    backbone = Tiny().requires_grad_(False)
    x = torch.randn(2, 4, 3, 5, 5)
    base = backbone.denoiser(x)[0]
    before = {k: v.clone() for k, v in backbone.denoiser.state_dict().items()}

    adapter = FrameGainAdapter(scale=0.5)
    adapter.name = "gain"
    adapter.attach(backbone)
    assert adapter.attached and list(adapter.adapter_state_dict()) == ["delta"]
    torch.testing.assert_close(backbone.denoiser(x)[0], base, rtol=0, atol=0)  # zero init: identity

    with torch.no_grad():
        adapter.delta.copy_(torch.tensor([1.0, -1.0, 2.0]))
    expected = base * (1 + 0.5 * torch.tensor([1.0, -1.0, 2.0]).view(1, 1, 3, 1, 1))
    torch.testing.assert_close(backbone.denoiser(x)[0], expected)
    with backbone.context.use(batch_size=2, num_frames=4, scales={"gain": torch.tensor([1.0, 0.0])}):
        out = backbone.denoiser(x)[0]
    torch.testing.assert_close(out[0], expected[0])
    torch.testing.assert_close(out[1], base[1])  # per-sample scale 0: untouched

    backbone.denoiser(x)[0].sum().backward()
    assert adapter.delta.grad is not None and adapter.delta.grad.abs().sum() > 0

    adapter.detach(backbone)
    assert not adapter.attached and not backbone.denoiser._forward_hooks
    torch.testing.assert_close(backbone.denoiser(x)[0], base, rtol=0, atol=0)
    after = backbone.denoiser.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    wrong = FrameGainAdapter(channels=4)
    wrong.attach(backbone)
    with pytest.raises(LayerkitError, match="4 channels"):
        backbone.denoiser(x)
    wrong.detach(backbone)
    assert not backbone.denoiser._forward_hooks

    fresh = FrameGainAdapter(channels=3)
    fresh.load_adapter_state_dict(adapter.adapter_state_dict())
    assert torch.equal(fresh.delta, adapter.delta)


def test_example_registers_through_a_lazy_target(example_module):
    registry = Registry()
    info = registry.add_plugin(example_module, "example")
    assert info.error is None and info.components == {"adapter": ["example.frame_gain"]}
    assert registry.get("adapter", "example.frame_gain").target == "layerkit_example.adapter:FrameGainAdapter"
    assert registry.config_dirs == ["pkg://layerkit_example.conf"]
    yaml = EXAMPLE_SRC / "layerkit_example" / "conf" / "adapter" / "frame_gain.yaml"
    assert "name: example.frame_gain" in yaml.read_text()


# ----------------------------------------------------------------------------------------
# broken plugins
# ----------------------------------------------------------------------------------------
class _RaisingPlugin:
    """Registers a backbone, then fails in a later hook: the backbone must be rolled back."""

    @hookimpl
    def register_backbones(self, register):
        register("raising.backbone", "nowhere:Nothing")

    @hookimpl
    def register_adapters(self, register):
        raise RuntimeError("boom in register_adapters")


def test_a_raising_hook_is_recorded_and_rolled_back_in_process(monkeypatch):
    monkeypatch.delenv(STRICT_ENV, raising=False)
    import layerkit_plugins.lora
    import layerkit_plugins.toy

    registry = Registry()
    registry.add_plugin(layerkit_plugins.toy, "toy")
    info = registry.add_plugin(_RaisingPlugin(), "raising")
    registry.add_plugin(layerkit_plugins.lora, "lora")

    assert info.error == "RuntimeError: boom in register_adapters"
    assert [p.name for p in registry.failures()] == ["raising"]
    assert "raising.backbone" not in registry.names("backbone")
    assert registry.names("backbone") == ["toy.dit"] and registry.names("adapter") == ["lora"]
    rows = {row["name"]: row for row in registry.describe()}
    assert rows["raising"]["error"] and rows["raising"]["backbones"] == []
    assert rows["toy"]["error"] is None and rows["lora"]["error"] is None
    with pytest.raises(LayerkitError, match="available backbones: toy.dit"):
        registry.get("backbone", "raising.backbone")

    monkeypatch.setenv(STRICT_ENV, "1")
    with pytest.raises(LayerkitError) as err:
        Registry().add_plugin(_RaisingPlugin(), "raising")
    message = str(err.value)
    assert "'raising'" in message and "boom" in message and STRICT_ENV in message
    assert "\n" not in message


def _fake_site(root: Path) -> Path:
    """A directory for PYTHONPATH with two installed-looking plugin distributions:
    ``broken`` (its module does not exist) and ``raising`` (its hook raises)."""
    site = root / "site"
    for dist, entry in (("broken_plugin", "broken = layerkit_no_such_module_xyz"),
                        ("raising_plugin", "raising = layerkit_raising_plugin")):
        info = site / f"{dist}-0.1.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[layerkit]\n{entry}\n")
    (site / "layerkit_raising_plugin.py").write_text(textwrap.dedent("""
        from layerkit import hookimpl

        @hookimpl
        def register_adapters(register):
            raise RuntimeError("raising plugin says no")
    """))
    return site


def test_broken_plugins_are_listed_and_the_rest_keeps_working(tmp_path):
    env = _env(PYTHONPATH=str(_fake_site(tmp_path)))
    cli = [sys.executable, "-m", "layerkit.cli"]

    plugins = _plugins_json(_run([*cli, "plugins", "--json"], cwd=tmp_path, env=env))
    broken, raising = plugins["broken"], plugins["raising"]
    assert broken["distribution"] == "broken-plugin" and broken["version"] == "0.1"
    assert broken["error"].startswith("ModuleNotFoundError:") and "layerkit_no_such_module_xyz" in broken["error"]
    assert raising["error"] == "RuntimeError: raising plugin says no" and raising["adapters"] == []
    for name in FIRST_PARTY:
        assert plugins[name]["error"] is None, plugins[name]
    assert plugins["lora"]["adapters"] == ["lora"] and plugins["toy"]["backbones"] == ["toy.dit"]

    text = _run([*cli, "plugins"], cwd=tmp_path, env=env)
    assert text.returncode == 0 and "FAILED TO LOAD: ModuleNotFoundError" in text.stdout

    # the working plugins still compose a run (registry lookups validate every name)
    config = _run([*cli, "config", "train", "+adapter@adapters.l=lora"], cwd=tmp_path, env=env)
    assert config.returncode == 0, config.stderr
    assert "name: toy.dit" in config.stdout and "name: lora" in config.stdout

    strict = _run([*cli, "plugins", "--json"], cwd=tmp_path, env={**env, STRICT_ENV: "1"})
    assert strict.returncode != 0 and strict.stdout == ""
    lines = strict.stderr.strip().splitlines()
    assert len(lines) == 1, strict.stderr
    assert lines[0].startswith("layerkit: error: plugin 'broken' failed to load (ModuleNotFoundError")
    assert "Traceback" not in strict.stderr


# ----------------------------------------------------------------------------------------
# the command stays light
# ----------------------------------------------------------------------------------------
def test_help_and_plugin_listing_import_no_model_code(tmp_path):
    code = textwrap.dedent(f"""
        import contextlib, io, json, sys
        from layerkit import cli
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli.main(["plugins", "--json"]) == 0
            assert cli.main(["plugins"]) == 0
            try:
                cli.main(["--help"])
            except SystemExit as exc:
                assert exc.code == 0
        print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
    """)
    proc = _run([sys.executable, "-c", code], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []

    helped = _run([sys.executable, "-m", "layerkit.cli", "--help"], cwd=tmp_path)
    assert helped.returncode == 0 and "plugins" in helped.stdout and "train" in helped.stdout


# ----------------------------------------------------------------------------------------
# hooks: documented and implemented
# ----------------------------------------------------------------------------------------
#: hooks no first-party plugin nor the example implements yet, and where they are exercised
NOT_YET_IMPLEMENTED: dict[str, str] = {}  # hook name -> why no plugin implements it yet


def _hookspecs() -> dict[str, types.FunctionType]:
    return {name: fn for name, fn in vars(hookspecs).items() if hasattr(fn, "layerkit_spec")}


def test_every_hook_is_documented():
    specs = _hookspecs()
    assert set(specs) == {*KINDS.values(), "register_config_dirs"}  # the registry calls every hook
    undocumented = [name for name, fn in specs.items() if not (fn.__doc__ or "").strip()]
    assert not undocumented, f"hooks without a docstring: {undocumented}"
    readme = (EXAMPLE / "README.md").read_text()
    missing = [name for name in specs if f"`{name}`" not in readme]
    assert not missing, f"hooks missing from {EXAMPLE / 'README.md'}: {missing}"


def test_every_hook_is_implemented_by_a_plugin(example_module, monkeypatch):
    monkeypatch.delenv(STRICT_ENV, raising=False)
    registry = Registry().load_entry_points()
    if "example" not in registry.plugins:
        registry.add_plugin(example_module, "example")
    assert not registry.failures(), [(p.name, p.error) for p in registry.failures()]

    implemented = {name: sorted(impl.plugin_name for impl in getattr(registry.pm.hook, name).get_hookimpls())
                   for name in _hookspecs()}
    unimplemented = sorted(name for name, plugins in implemented.items() if not plugins)
    unexpected = [name for name in unimplemented if name not in NOT_YET_IMPLEMENTED]
    assert not unexpected, f"hooks no plugin implements: {unexpected} (implementations: {implemented})"
    assert "example" in implemented["register_adapters"] and "example" in implemented["register_config_dirs"]

    # a hook nobody implements yet still works end to end (register -> lookup -> build)
    class ControlPlugin:
        @hookimpl
        def register_controls(self, register):
            register("mock.control", lambda **kw: ("built", kw), description="a test control")

    info = registry.add_plugin(ControlPlugin(), "mock_controls")
    assert info.error is None and "mock.control" in registry.names("control")
    assert registry.build("control", "mock.control", backbone=None, size=2) == ("built", {"backbone": None, "size": 2})


# ----------------------------------------------------------------------------------------
# unknown names
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def installed_registry() -> Registry:
    previous = os.environ.pop(STRICT_ENV, None)
    try:
        return Registry().load_entry_points()
    finally:
        if previous is not None:
            os.environ[STRICT_ENV] = previous


@pytest.mark.parametrize(
    ("overrides", "head", "names"),
    [
        (["backbone.name=nope"], "unknown backbone 'nope'; available backbones: ", ["toy.dit"]),
        (["task.name=nope"], "unknown task 'nope'; available tasks: ", ["layered", "transparent.i2v"]),
        (["data.name=nope"], "unknown dataset 'nope'; available datasets: ", ["shapes"]),
        (["+adapters.a.name=nope"], "unknown adapter 'nope'; available adapters: ", ["lora"]),
        (["backbone=nope"], "Could not find 'backbone/nope'; available: ", ["toy_dit"]),
        (["+adapter@adapters.a=nope"], "Could not find 'adapter/nope'; available: ", ["lora"]),
    ],
)
def test_unknown_names_fail_with_the_available_ones(installed_registry, overrides, head, names):
    from layerkit.config import compose

    with pytest.raises(LayerkitError) as err:
        compose("train", overrides, installed_registry)
    message = str(err.value)
    assert head in message and "\n" not in message
    available = message.split(head, 1)[1]
    assert all(name in available for name in names), message


def test_unknown_config_option_lists_only_options(installed_registry):
    from layerkit.config import compose

    with pytest.raises(LayerkitError) as err:
        compose("train", ["backbone=nope"], installed_registry)
    assert "provider=" not in str(err.value) and "path=" not in str(err.value)


def test_a_misspelt_hook_is_an_error(monkeypatch):
    monkeypatch.delenv(STRICT_ENV, raising=False)

    class Typo:
        @hookimpl
        def register_adaptor(self, register):
            register("typo.adapter", "nowhere:Nothing")

    info = Registry().add_plugin(Typo(), "typo")
    assert info.error and "register_adaptor" in info.error


def test_a_bad_hook_signature_fails_on_one_line(monkeypatch):
    monkeypatch.setenv(STRICT_ENV, "1")

    class BadSignature:
        @hookimpl
        def register_adapters(self, reg):
            reg("bad.adapter", "nowhere:Nothing")

    with pytest.raises(LayerkitError) as err:
        Registry().add_plugin(BadSignature(), "bad")
    assert "'bad'" in str(err.value) and "\n" not in str(err.value)
