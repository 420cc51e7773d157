"""Faults at the edges of layerkit (issue 14, points 6, 7 and 9): plugins that squat names or
exit while loading, weights that were flipped, truncated or given as the wrong kind of path,
output permissions, and image readers that clipped 16-bit PNGs or ignored gaps in a sequence.

Every refusal is one line naming the file or plugin; every test also checks that nothing
else changed (the other plugins, the tensors, the frames).
"""

from __future__ import annotations

import importlib
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch

from layerkit import hookimpl
from layerkit import registry as registry_module
from layerkit.errors import LayerkitError
from layerkit.io.video import png_sequence, read_video, unit_float
from layerkit.io.weights import CHECKSUM_KEY, load_weights, read_metadata, save_fp16_copy, save_weights
from layerkit.registry import STRICT_ENV, PluginInfo, Registry


def _one_line(message: str, *names: str) -> str:
    assert "\n" not in message and "Traceback" not in message, message
    for name in names:
        assert name in message, (name, message)
    return message


# ======================================================================================
# plugins: names are never taken silently
# ======================================================================================
@pytest.fixture(autouse=False)
def lenient(monkeypatch):
    monkeypatch.delenv(STRICT_ENV, raising=False)


def _plugin(module: str, **components: list[tuple]) -> ModuleType:
    """A plugin module named ``module`` registering ``kind=[(name, target, kwargs), ...]``."""
    plugin = ModuleType(module)
    for kind, entries in components.items():
        hook = registry_module.KINDS[kind]

        def impl(register, _entries=entries):
            for name, target, kwargs in _entries:
                register(name, target, **kwargs)

        impl.__name__ = hook
        setattr(plugin, hook, hookimpl(impl))
    return plugin


def _third_party(registry: Registry, name: str, dist: str, plugin: ModuleType) -> PluginInfo:
    info = PluginInfo(name=name, distribution=dist, version="1.0", module=plugin.__name__)
    return registry.add_plugin(plugin, name, info=info)


def _first_party(registry: Registry) -> None:
    import layerkit_plugins.lora
    import layerkit_plugins.toy

    info = PluginInfo(name="toy", distribution="layerkit", version="0.1.0", module="layerkit_plugins.toy")
    assert registry.add_plugin(layerkit_plugins.toy, "toy", info=info).error is None
    registry.add_plugin(layerkit_plugins.lora, "lora")


FIRST_PARTY_TARGET = "layerkit_plugins.toy.backbone:ToyDiT"


@pytest.mark.parametrize("squatter_first", [True, False], ids=["squatter-loads-first", "squatter-loads-last"])
@pytest.mark.parametrize("override", [False, True], ids=["plain", "override"])
def test_a_first_party_name_is_never_taken_over(lenient, squatter_first, override):
    squatter = _plugin(
        "squatter_pkg",
        backbone=[("toy.dit", "squatter_pkg:Evil", {"override": override})],
        adapter=[("squat.adapter", "squatter_pkg:Adapter", {})],
    )
    registry = Registry()
    if squatter_first:
        _third_party(registry, "squatter", "squatter-dist", squatter)
        _first_party(registry)
    else:
        _first_party(registry)
        _third_party(registry, "squatter", "squatter-dist", squatter)

    error = registry.plugins["squatter"].error
    assert error is not None
    _one_line(error, "squatter-dist", "'layerkit'", "toy.dit", "cannot be taken over")
    assert ("override=True" in error) == override
    # layerkit's own backbone is untouched, and the squatter is rolled back whole
    component = registry.get("backbone", "toy.dit")
    assert component.plugin == "toy" and component.target == FIRST_PARTY_TARGET
    assert registry.names("backbone") == ["toy.dit"] and registry.names("adapter") == ["lora"]
    assert registry.plugins["toy"].error is None and registry.plugins["lora"].error is None
    assert [p.name for p in registry.failures()] == ["squatter"]
    rows = {row["name"]: row for row in registry.describe()}
    assert rows["squatter"]["backbones"] == [] and rows["squatter"]["adapters"] == []
    assert rows["toy"]["conflicts"] == []


@pytest.mark.parametrize("order", [("alpha", "beta"), ("beta", "alpha")])
def test_a_name_claimed_twice_fails_when_looked_up_naming_both_distributions(lenient, order):
    plugins = {
        "alpha": _plugin(
            "alpha_pkg", backbone=[("shared.net", "alpha_pkg:Net", {}), ("alpha.net", "alpha_pkg:A", {})]
        ),
        "beta": _plugin(
            "beta_pkg", backbone=[("shared.net", "beta_pkg:Net", {}), ("beta.net", "beta_pkg:B", {})]
        ),
    }
    registry = Registry()
    _first_party(registry)
    for name in order:
        assert _third_party(registry, name, f"{name}-dist", plugins[name]).error is None

    for call in (
        lambda: registry.get("backbone", "shared.net"),
        lambda: registry.build("backbone", "shared.net"),
    ):
        with pytest.raises(LayerkitError) as err:
            call()
        _one_line(str(err.value), "backbone 'shared.net'", "'alpha-dist'", "'beta-dist'", "override=True")
    # listed, not hidden: the name shows with its conflict under both plugins
    assert "shared.net" in registry.names("backbone")
    for name in ("alpha", "beta"):
        listed = {c.name: c.description for _, c in registry.plugin_components(name)}
        assert listed["shared.net"].startswith("conflict: backbone 'shared.net'")
        notes = {row["name"]: row for row in registry.describe()}[name]["conflicts"]
        assert len(notes) == 1 and "alpha-dist" in notes[0] and "beta-dist" in notes[0]
    # everything else of both plugins, and layerkit's own, works
    assert registry.get("backbone", "alpha.net").target == "alpha_pkg:A"
    assert registry.get("backbone", "beta.net").target == "beta_pkg:B"
    assert registry.get("backbone", "toy.dit").target == FIRST_PARTY_TARGET
    assert not registry.failures()


@pytest.mark.parametrize("order", [("plain", "replacer"), ("replacer", "plain")])
def test_override_replaces_a_third_party_registration_in_any_order(lenient, order):
    plugins = {
        "plain": _plugin("plain_pkg", adapter=[("shared.adapter", "plain_pkg:Adapter", {})]),
        "replacer": _plugin(
            "replacer_pkg", adapter=[("shared.adapter", "replacer_pkg:Adapter", {"override": True})]
        ),
    }
    registry = Registry()
    for name in order:
        assert _third_party(registry, name, f"{name}-dist", plugins[name]).error is None
    assert registry.get("adapter", "shared.adapter").target == "replacer_pkg:Adapter"
    assert [c.plugin for _, c in registry.plugin_components("replacer")] == ["replacer"]
    assert registry.plugin_components("plain") == []  # the replaced one is not listed as provided
    rows = {row["name"]: row for row in registry.describe()}
    _one_line(rows["plain"]["conflicts"][0], "replaced by plugin 'replacer'", "replacer-dist")
    _one_line(rows["replacer"]["conflicts"][0], "replaces", "'plain'", "plain-dist")

    # the replacer going away (it failed later) gives the name back to the other plugin
    registry._fail(registry.plugins["replacer"], RuntimeError("gone"))
    assert registry.get("adapter", "shared.adapter").target == "plain_pkg:Adapter"


def test_two_overrides_of_one_name_are_a_conflict(lenient):
    registry = Registry()
    for name in ("one", "two"):
        _third_party(
            registry,
            name,
            f"{name}-dist",
            _plugin(f"{name}_pkg", task=[("shared.task", f"{name}_pkg:T", {"override": True})]),
        )
    with pytest.raises(LayerkitError) as err:
        registry.get("task", "shared.task")
    _one_line(str(err.value), "'one-dist'", "'two-dist'", "all with override=True")


def test_strict_mode_makes_a_conflict_a_load_error(monkeypatch):
    monkeypatch.setenv(STRICT_ENV, "1")
    registry = Registry()
    _third_party(registry, "one", "one-dist", _plugin("one_pkg", task=[("shared.task", "one_pkg:T", {})]))
    with pytest.raises(LayerkitError) as err:
        _third_party(registry, "two", "two-dist", _plugin("two_pkg", task=[("shared.task", "two_pkg:T", {})]))
    _one_line(str(err.value), "plugin 'two' failed to load", "one-dist", "two-dist", STRICT_ENV)
    assert registry.get("task", "shared.task").target == "one_pkg:T"  # the failed plugin was rolled back


class _BaseOops(BaseException):
    pass


RAISED = [
    pytest.param(
        lambda: SystemExit(3), "SystemExit: 3 (the plugin exited while loading)", id="SystemExit(3)"
    ),
    pytest.param(
        lambda: SystemExit(), "SystemExit: None (the plugin exited while loading)", id="SystemExit()"
    ),
    pytest.param(
        lambda: SystemExit("bye now"),
        "SystemExit: bye now (the plugin exited while loading)",
        id="SystemExit(str)",
    ),
    pytest.param(lambda: _BaseOops("odd"), "_BaseOops: odd", id="BaseException"),
    pytest.param(lambda: GeneratorExit(), "GeneratorExit", id="GeneratorExit"),
    pytest.param(
        lambda: RuntimeError("multi\nline\nmessage."), "RuntimeError: multi line message", id="RuntimeError"
    ),
]


def _entry_point(name: str, value: str, dist: str, load) -> SimpleNamespace:
    return SimpleNamespace(
        name=name, value=value, dist=SimpleNamespace(metadata={"Name": dist}, version="1.0"), load=load
    )


def _with_entry_points(monkeypatch, *extra) -> None:
    real = list(importlib.metadata.entry_points(group=registry_module.ENTRY_POINT_GROUP))
    monkeypatch.setattr(registry_module.metadata, "entry_points", lambda group: [*extra, *real])


@pytest.mark.parametrize(("make", "expected"), RAISED)
@pytest.mark.parametrize("where", ["import", "hook"])
def test_anything_a_plugin_raises_is_contained_and_listed(lenient, monkeypatch, make, expected, where):
    def load():
        if where == "import":
            raise make()
        return _raising_hook_plugin(make)

    _with_entry_points(monkeypatch, _entry_point("aaa_bad", "bad_pkg", "bad-dist", load))
    registry = Registry().load_entry_points()
    info = registry.plugins["aaa_bad"]
    assert info.error == expected
    assert info.distribution == "bad-dist" and info.components == {}
    assert "bad.backbone" not in registry.names("backbone")
    assert [p.name for p in registry.failures()] == ["aaa_bad"]  # every other plugin loaded
    assert registry.get("backbone", "toy.dit").target == FIRST_PARTY_TARGET


def _raising_hook_plugin(make) -> ModuleType:
    plugin = _plugin("bad_pkg", backbone=[("bad.backbone", "bad_pkg:B", {})])

    @hookimpl
    def register_adapters(register):
        raise make()

    plugin.register_adapters = register_adapters
    return plugin


def test_a_module_calling_sys_exit_at_import_is_contained_and_strict_mode_says_one_line(
    monkeypatch, tmp_path
):
    monkeypatch.delenv(STRICT_ENV, raising=False)
    (tmp_path / "layerkit_exits_at_import.py").write_text("import sys\nsys.exit(7)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = _entry_point(
        "exits",
        "layerkit_exits_at_import",
        "exits-dist",
        lambda: importlib.import_module("layerkit_exits_at_import"),
    )
    _with_entry_points(monkeypatch, ep)
    registry = Registry().load_entry_points()
    assert registry.plugins["exits"].error == "SystemExit: 7 (the plugin exited while loading)"
    assert [p.name for p in registry.failures()] == ["exits"]
    assert "layerkit_exits_at_import" not in sys.modules

    monkeypatch.setenv(STRICT_ENV, "1")
    with pytest.raises(LayerkitError) as err:
        Registry().load_entry_points()
    _one_line(str(err.value), "plugin 'exits' failed to load (SystemExit: 7", STRICT_ENV)


@pytest.mark.parametrize("where", ["import", "hook"])
def test_a_keyboard_interrupt_still_stops_the_program(lenient, monkeypatch, where):
    def load():
        if where == "import":
            raise KeyboardInterrupt
        return _raising_hook_plugin(KeyboardInterrupt)

    _with_entry_points(monkeypatch, _entry_point("ctrl_c", "ctrl_c_pkg", "ctrl-c-dist", load))
    with pytest.raises(KeyboardInterrupt):
        Registry().load_entry_points()


def test_a_lazy_target_exiting_on_import_is_one_sentence(lenient, tmp_path, monkeypatch):
    (tmp_path / "layerkit_exits_on_build.py").write_text("raise SystemExit(5)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry()
    _third_party(
        registry,
        "late",
        "late-dist",
        _plugin("late_pkg", backbone=[("late.net", "layerkit_exits_on_build:Net", {})]),
    )
    with pytest.raises(LayerkitError) as err:
        registry.build("backbone", "late.net")
    _one_line(str(err.value), "backbone 'late.net'", "plugin 'late'", "SystemExit: 5")


def test_layerkit_plugins_lists_a_squatter_and_an_exiting_plugin_and_goes_on(tmp_path):
    """As installed packages: a distribution whose plugin sorts first registers ``toy.dit``
    with override=True, another calls ``sys.exit`` at import."""
    site = tmp_path / "site"
    for dist, entry in (
        ("aaa_squatter", "aaa = layerkit_squatter_xyz"),
        ("exiting_plugin", "exiting = layerkit_exit_xyz"),
        ("toy_again", "toy = layerkit_squatter_xyz"),
    ):
        info = site / f"{dist}-0.1.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: 0.1\n"
        )
        (info / "entry_points.txt").write_text(f"[layerkit]\n{entry}\n")
    (site / "layerkit_squatter_xyz.py").write_text(
        textwrap.dedent("""
        from layerkit import hookimpl

        @hookimpl
        def register_backbones(register):
            register("toy.dit", "layerkit_squatter_xyz:Evil", "not the real one", override=True)
    """)
    )
    (site / "layerkit_exit_xyz.py").write_text("raise SystemExit(0)\n")
    env = {k: v for k, v in os.environ.items() if k not in {STRICT_ENV, "PYTHONPATH"}}
    env.update(PYTHONPATH=str(site), PYTHONUNBUFFERED="1")
    cli = [sys.executable, "-m", "layerkit.cli"]

    proc = subprocess.run(
        [*cli, "plugins", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    rows = {row["name"]: row for row in json.loads(proc.stdout)["plugins"]}
    squatter = rows["aaa"]
    assert squatter["distribution"] == "aaa-squatter" and squatter["backbones"] == []
    _one_line(squatter["error"], "'aaa-squatter'", "'layerkit'", "toy.dit", "cannot be taken over")
    assert rows["exiting"]["error"] == "SystemExit: 0 (the plugin exited while loading)"
    # layerkit's own 'toy' keeps its plugin name and its backbone; the second 'toy' is refused
    assert rows["toy"]["distribution"] == "layerkit" and rows["toy"]["backbones"] == ["toy.dit"]
    assert rows["toy"]["error"] is None
    _one_line(rows["toy (toy-again)"]["error"], "plugin name 'toy'", "'toy-again'", "'layerkit'")
    assert all(
        row["error"] is None
        for name, row in rows.items()
        if name not in {"aaa", "exiting", "toy (toy-again)"}
    )

    text = subprocess.run(
        [*cli, "plugins"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert text.returncode == 0, text.stderr
    assert (
        "FAILED TO LOAD: SystemExit: 0" in text.stdout
        and "FAILED TO LOAD: LayerkitError: plugin 'aaa'" in text.stdout
    )


# ======================================================================================
# weights: checksums, paths, layouts, modes
# ======================================================================================
def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(4, 3, generator=g),
        "b.half": torch.randn(5, generator=g).to(torch.bfloat16),
        "c.index": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d.scalar": torch.tensor(2.5),
        "e.mask": torch.tensor([True, False, True]),
    }


def _data_start(path: Path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def _flip(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(sorted(a)) == list(sorted(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def test_save_weights_stores_a_checksum_and_loads_unchanged(tmp_path):
    state = _state()
    path = save_weights(
        tmp_path / "w.safetensors", state, metadata={"layerkit_config": {"seed": 1}, "note": "x"}
    )
    meta = read_metadata(path)
    assert set(meta) == {"layerkit_config", "note", CHECKSUM_KEY} and meta["layerkit_config"] == {"seed": 1}
    assert len(str(meta[CHECKSUM_KEY])) == 64
    _assert_same(load_weights(path), state)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no partial left behind


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("bit", [0, 7])
def test_a_flipped_bit_in_the_data_is_caught(tmp_path, where, bit):
    path = save_weights(tmp_path / "w.safetensors", _state())
    start, end = _data_start(path), path.stat().st_size
    _flip(path, {"first": start, "middle": (start + end) // 2, "last": end - 1}[where], bit)
    with pytest.raises(LayerkitError) as err:
        load_weights(path)
    _one_line(str(err.value), str(path), "corrupt", CHECKSUM_KEY)


def test_a_changed_checksum_is_caught(tmp_path):
    path = save_weights(tmp_path / "w.safetensors", _state())
    text = path.read_bytes()
    digest = read_metadata(path)[CHECKSUM_KEY].encode()
    forged = digest[:-1] + (b"0" if digest[-1:] != b"0" else b"1")
    path.write_bytes(text.replace(digest, forged))
    with pytest.raises(LayerkitError, match="corrupt"):
        load_weights(path)


def test_third_party_files_without_a_checksum_load_as_before(tmp_path):
    from safetensors.torch import save_file

    state = _state()
    path = tmp_path / "other.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    _assert_same(load_weights(path), state)


def test_fp16_copies_keep_metadata_and_verify(tmp_path):
    src = save_weights(tmp_path / "w.safetensors", _state(), metadata={"layerkit_config": {"seed": 1}})
    dst = save_fp16_copy(src, tmp_path / "copy" / "w16.safetensors")
    copy = load_weights(dst)
    assert copy["a.weight"].dtype == torch.float16 and copy["c.index"].dtype == torch.int64
    assert copy["b.half"].dtype == torch.float16 and copy["e.mask"].dtype == torch.bool
    torch.testing.assert_close(copy["a.weight"].float(), _state()["a.weight"], atol=1e-2, rtol=1e-2)
    meta = read_metadata(dst)
    assert meta["layerkit_config"] == {"seed": 1} and meta[CHECKSUM_KEY] != read_metadata(src)[CHECKSUM_KEY]
    _flip(dst, _data_start(dst))
    with pytest.raises(LayerkitError, match="corrupt"):
        load_weights(dst)
    _flip(src, _data_start(src))  # a corrupt source is not copied
    with pytest.raises(LayerkitError, match="corrupt"):
        save_fp16_copy(src, tmp_path / "again.safetensors")
    assert not (tmp_path / "again.safetensors").exists()


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_weights_get_the_mode_of_any_other_output(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        weights = save_weights(tmp_path / "weights.safetensors", _state())
        other = tmp_path / "record.json"
        other.write_text("{}")
        copy = save_fp16_copy(weights, tmp_path / "w16.safetensors")
    finally:
        os.umask(old)
    assert (weights.stat().st_mode & 0o777) == mode == (other.stat().st_mode & 0o777)
    assert (copy.stat().st_mode & 0o777) == mode


def _bad_path(kind: str, tmp_path: Path, suffix: str) -> Path:
    good = tmp_path / f"good{suffix}"
    if suffix == ".safetensors":
        save_weights(good, _state())
    else:
        torch.save(_state(), good)
    path = tmp_path / f"bad{suffix}"
    if kind == "directory":
        path.mkdir()
    elif kind == "symlink loop":
        os.symlink(tmp_path / f"loop{suffix}", path)
        os.symlink(path, tmp_path / f"loop{suffix}")
    elif kind == "broken symlink":
        os.symlink(tmp_path / "gone", path)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "header only":
        path.write_bytes(good.read_bytes()[:7])
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("missing", "does not exist"),
        ("directory", "is a directory"),
        ("symlink loop", "is a symlink loop"),
        ("broken symlink", "is a broken symlink"),
        ("empty", "is empty"),
        ("truncated", "truncated or corrupt"),
        ("header only", "truncated or corrupt"),
    ],
)
def test_a_bad_weights_path_is_one_sentence_saying_what_it_is(tmp_path, suffix, kind, says):
    path = _bad_path(kind, tmp_path, suffix)
    with pytest.raises(LayerkitError) as err:
        load_weights(path, allow_pickle=True)
    message = _one_line(str(err.value), str(path), says)
    assert message.endswith(".") and message.count(". ") == 0
    if kind != "missing":
        assert "does not exist" not in message


@pytest.mark.parametrize(
    ("layout", "unwrapped"),
    [
        pytest.param(lambda s: s, True, id="flat"),
        pytest.param(lambda s: {"state_dict": s, "epoch": 3, "optimizer_states": []}, True, id="lightning"),
        pytest.param(
            lambda s: {
                "module": s,
                "iteration": 1000,
                "buffer_names": [],
                "optimizer": None,
                "ds_version": "0.14.0",
            },
            True,
            id="sat-deepspeed",
        ),
        pytest.param(lambda s: {"module": s}, True, id="sat-module-only"),
        pytest.param(lambda s: {"module": s, "stray": torch.zeros(1)}, False, id="module-beside-a-tensor"),
    ],
)
def test_pickled_layouts_unwrap_to_the_state_dict(tmp_path, layout, unwrapped):
    state = _state()
    path = tmp_path / "model_states.pt"
    torch.save(layout(state), path)
    if unwrapped:
        _assert_same(load_weights(path, allow_pickle=True), state)
    else:
        with pytest.raises(LayerkitError) as err:
            load_weights(path, allow_pickle=True)
        _one_line(str(err.value), str(path), "flat mapping")


def test_a_flat_state_with_a_tensor_named_module_is_not_unwrapped(tmp_path):
    state = {"module": torch.ones(2), "other": torch.zeros(3)}
    torch.save(state, tmp_path / "m.pt")
    _assert_same(load_weights(tmp_path / "m.pt", allow_pickle=True), state)


# ======================================================================================
# readers: 16-bit PNGs and numbered sequences
# ======================================================================================
def _png16(path: Path, array: np.ndarray, color_type: int, trns: bytes | None = None) -> Path:
    """A 16-bit PNG written byte by byte (colour type 0 grey, 2 RGB, 4 grey+alpha, 6 RGBA)."""
    h, w = array.shape[:2]
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
    if trns is not None:
        data += chunk(b"tRNS", trns)
    path.write_bytes(data + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def _to8(v: np.ndarray) -> np.ndarray:
    return np.round(v.astype(np.float64) * 255 / 65535).astype(np.int64)


GREY = np.array([[0, 257, 1000, 32896], [40000, 60000, 50000, 65535]], np.uint16)


@pytest.mark.parametrize(
    ("color_type", "make", "channels"),
    [
        pytest.param(0, lambda g: g, 3, id="grey16"),
        pytest.param(4, lambda g: np.stack([g, g[::-1]], -1), 4, id="grey16+alpha"),
        pytest.param(2, lambda g: np.stack([g, g // 2, 65535 - g], -1), 3, id="rgb16"),
        pytest.param(6, lambda g: np.stack([g, g // 2, 65535 - g, g[::-1]], -1), 4, id="rgba16"),
    ],
)
def test_16_bit_pngs_keep_their_depth(tmp_path, color_type, make, channels):
    wide = make(GREY)
    path = _png16(tmp_path / "image.png", wide, color_type)
    frames = read_video(path).frames
    assert frames.shape == (1, 2, 4, channels) and frames.dtype == np.uint16
    expected = wide if wide.ndim == 3 else np.repeat(wide[..., None], 3, -1)
    if color_type == 4:  # grey + alpha -> grey repeated, alpha kept
        expected = np.concatenate([np.repeat(expected[..., :1], 3, -1), expected[..., 1:]], -1)
    assert np.array_equal(frames[0], expected)  # every 16-bit value as written
    assert np.allclose(unit_float(frames)[0], expected / 65535)
    eight = read_video(path, bits=8).frames  # 8 bits only when asked: scaled, never clipped
    assert eight.dtype == np.uint8 and np.abs(eight[0].astype(np.int64) - _to8(expected)).max() == 0
    assert eight[0, 0, 0, 0] == 0 and eight[0, 1, 3, 0] == 255 and len(np.unique(eight[0, ..., 0])) == 8


def test_a_16_bit_grey_png_keeps_its_transparent_level(tmp_path):
    frames = read_video(_png16(tmp_path / "t.png", GREY, 0, trns=struct.pack(">H", 1000))).frames
    assert frames.shape == (1, 2, 4, 4) and frames.dtype == np.uint16
    assert frames[0, 0, 2, 3] == 0 and (np.delete(frames[0, ..., 3].ravel(), 2) == 65535).all()


def test_a_sequence_mixing_8_and_16_bit_frames_is_read_at_16_bits(tmp_path):
    from PIL import Image

    root = tmp_path / "seq"
    root.mkdir()
    Image.fromarray(np.full((2, 4, 3), 128, np.uint8)).save(root / "f_1.png")
    _png16(root / "f_2.png", np.stack([GREY, GREY, GREY], -1), 2)
    frames = read_video(root).frames
    assert frames.dtype == np.uint16 and (frames[0] == 128 * 257).all() and np.array_equal(frames[1, ..., 0], GREY)


def test_deep_video_keeps_its_depth(tmp_path):
    from layerkit.io.video import write_video

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 16, 16, 4), dtype=np.uint8)
    frames[..., :3] = np.clip(frames[..., :3] // 32 * 32 + 16, 0, 255)  # flat enough for ProRes to keep
    video = read_video(write_video(tmp_path / "a.mov", frames, fps=8))  # ProRes 4444: 10 bits per channel
    assert video.frames.dtype == np.uint16 and video.frames.shape == (2, 16, 16, 4)
    eight = read_video(tmp_path / "a.mov", bits=8).frames
    assert eight.dtype == np.uint8 and np.array_equal(eight, (unit_float(video.frames) * 255 + 0.5).astype(np.uint8))
    assert np.abs(eight[..., 3].astype(int) - frames[..., 3]).max() <= 2


def test_8_bit_images_read_as_before(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for mode, shape in (("L", (5, 6)), ("RGB", (5, 6, 3)), ("RGBA", (5, 6, 4))):
        array = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(array, mode).save(tmp_path / f"{mode}.png")
        with Image.open(tmp_path / f"{mode}.png") as im:
            before = np.asarray(im.convert("RGBA" if mode == "RGBA" else "RGB"))
        assert np.array_equal(read_video(tmp_path / f"{mode}.png").frames[0], before)


def _sequence(root: Path, names: list[str]) -> Path:
    from PIL import Image

    root.mkdir()
    for i, name in enumerate(names):
        Image.fromarray(np.full((4, 4, 3), 10 * (i + 1), np.uint8)).save(root / name)
    return root


@pytest.mark.parametrize(
    ("names", "gap"),
    [
        (
            ["frame_0001.png", "frame_0003.png"],
            "frame 2 is missing between 'frame_0001.png' and 'frame_0003.png'",
        ),
        (["f0.png", "f1.png", "f5.png", "f6.png"], "frames 2 to 4 are missing between 'f1.png' and 'f5.png'"),
        (["frame_1.png", "frame_2.png", "frame_4.png", "frame_9.png"], "frame 3 is missing"),
    ],
)
def test_a_gapped_png_sequence_is_refused_unless_asked(tmp_path, names, gap):
    root = _sequence(tmp_path / "seq", names)
    with pytest.raises(LayerkitError) as err:
        read_video(root)
    _one_line(str(err.value), str(root), gap, "allow_gaps=True")
    video = read_video(root, allow_gaps=True)
    assert video.num_frames == len(names)
    assert [int(f[0, 0, 0]) for f in video.frames] == [10 * (i + 1) for i in range(len(names))]


def test_png_sequences_are_read_in_number_order_and_up_to_max_frames(tmp_path):
    consecutive = _sequence(tmp_path / "ok", [f"frame_{i:04d}.png" for i in range(5, 9)])
    assert read_video(consecutive).num_frames == 4
    # unpadded numbers: frame_10 comes after frame_9, not after frame_1
    names = [f"frame_{i}.png" for i in range(1, 12)]
    video = read_video(_sequence(tmp_path / "unpadded", names))
    assert [int(f[0, 0, 0]) for f in video.frames] == [10 * i for i in range(1, 12)]
    # a gap after the frames read does not matter
    gapped = _sequence(tmp_path / "late-gap", ["a_1.png", "a_2.png", "a_3.png", "a_7.png"])
    assert read_video(gapped, max_frames=3).num_frames == 3
    with pytest.raises(LayerkitError, match="frames 4 to 6 are missing"):
        read_video(gapped, max_frames=4)
    # names without one numbered pattern are read by name, as before
    free = _sequence(tmp_path / "free", ["b.png", "a.png", "c.png"])
    assert [p.name for p in png_sequence(free)] == ["a.png", "b.png", "c.png"]
    assert read_video(free).num_frames == 3


def test_a_video_path_that_is_a_symlink_loop_says_so(tmp_path):
    os.symlink(tmp_path / "b.mp4", tmp_path / "a.mp4")
    os.symlink(tmp_path / "a.mp4", tmp_path / "b.mp4")
    with pytest.raises(LayerkitError) as err:
        read_video(tmp_path / "a.mp4")
    _one_line(str(err.value), "a.mp4", "is a symlink loop")
    with pytest.raises(LayerkitError, match="does not exist"):
        read_video(tmp_path / "missing.mp4")


def test_model_image_inputs_keep_16_bits(tmp_path):
    """The image inputs of the tasks (transparent's RGBA image, ToonCrafter's keyframes) read
    16-bit PNGs at their depth, not clipped to white as Pillow's conversion does."""
    from layerkit_plugins.tooncrafter.task import read_frame
    from layerkit_plugins.transparent.task import read_rgba_image

    grey = np.tile(np.linspace(0, 65535, 8).astype(np.uint16), (8, 1))
    path = _png16(tmp_path / "grey.png", grey, 0)
    frame = read_frame(path, 8, 8, "first_frame")
    assert torch.allclose(frame[0], torch.from_numpy(grey / 65535).float(), atol=1e-6)
    rgba = _png16(tmp_path / "rgba.png", np.stack([grey, grey, grey, grey[:, ::-1]], -1)[:4], 6)  # 8 wide, 4 high
    image, note = read_rgba_image(rgba, 8, 8)
    assert image.shape == (4, 8, 8) and note == "inputs.image: 8x4 scaled to 8x4 and padded to 8x8"
    assert (image[3, :2] == 0).all() and (image[3, -2:] == 0).all()  # transparent borders, nothing cut
    assert torch.allclose(image[0, 2:6], torch.from_numpy(grey[:4] / 65535).float(), atol=1e-6)


def test_a_gapped_png_clip_in_an_rgba_folder_is_refused(tmp_path):
    from layerkit_plugins.transparent.data import RGBAFolder
    from PIL import Image

    clip = tmp_path / "data" / "clip"
    clip.mkdir(parents=True)
    for i in (1, 2, 4):
        Image.fromarray(np.full((8, 8, 4), 200, np.uint8)).save(clip / f"frame_{i:04d}.png")
    (tmp_path / "data" / "clip.txt").write_text("a clip")
    with pytest.raises(LayerkitError, match="frame 3 is missing"):
        RGBAFolder(str(tmp_path / "data"), num_frames=2, height=8, width=8)
    assert len(RGBAFolder(str(tmp_path / "data"), num_frames=2, height=8, width=8, allow_gaps=True)) == 1


def test_layeranimate_demo_keyframes_keep_16_bit_depth(tmp_path):
    """A 16-bit keyframe of a LayerAnimate demo folder is read at its depth (not cut to 8 bits) and
    transformed as the 8-bit file of the same picture is (the authors' PIL path)."""
    from layerkit_plugins.layeranimate.demo import _open, transform_image, transform_mask

    ramp = (np.linspace(0, 65535, 64 * 48).reshape(48, 64) // 7 * 7).astype(np.uint16)
    deep = np.stack([ramp, ramp[::-1], 65535 - ramp], -1)
    image = _open(_png16(tmp_path / "deep.png", deep, 2), "RGB")
    assert isinstance(image, torch.Tensor) and image.dtype == torch.float32
    eight = np.round(deep / 257).astype(np.uint8)
    from PIL import Image

    Image.fromarray(eight).save(tmp_path / "eight.png")
    shallow = _open(tmp_path / "eight.png", "RGB")
    a, b = transform_image(image, 32, 32), transform_image(shallow, 32, 32)
    assert a.shape == b.shape == (3, 32, 32)
    assert (a - b).abs().max() < 0.02, "the same picture, whatever its depth"
    assert not torch.allclose(a * 255, (a * 255).round(), atol=1e-3), "finer than 8-bit steps"
    mask = transform_mask(_open(_png16(tmp_path / "mask.png", deep[..., 0], 0), "L"), 32, 32)
    assert mask.shape == (1, 32, 32) and set(mask.unique().tolist()) <= {0.0, 1.0}
