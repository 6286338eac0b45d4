"""Which WebUI runs the extension (`lib_mos.hosts`), and what the extension does in one it does not
support yet: it says so in the console and the UI, hooks nothing, and leaves generations alone."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lib_mos import hosts
from lib_mos.concepts import synthetic
from lib_mos.concepts.files import write_concept
from lib_mos.models import sd1

ROOT = Path(__file__).resolve().parents[1]

# what each host has, as read in its source (docs/host.md; docs/forge.md for both Forges)
A1111_MODULES = {"modules", "modules.sd_hijack", "modules.textual_inversion.textual_inversion", "ldm"}
FORGE_MODULES = {"modules", "modules.sd_hijack", "modules.textual_inversion.textual_inversion", "modules_forge",
                 "backend"}
CLASSIC_MODULES = {"modules", "modules.sd_hijack", "modules.textual_inversion.textual_inversion", "modules_forge",
                   "ldm_patched", "ldm"}


@pytest.mark.parametrize(("present", "expected"), [
    (A1111_MODULES, hosts.A1111),
    (FORGE_MODULES, hosts.FORGE),
    (CLASSIC_MODULES, hosts.FORGE_CLASSIC),
    ({"modules"}, hosts.UNKNOWN),
    (set(), hosts.UNKNOWN),
])
def test_each_host_is_told_apart_by_what_it_can_import(present, expected):
    """Forge keeps A1111's `modules`: a check of A1111's markers alone would call it A1111."""
    assert hosts.detect(present.__contains__) is expected


def test_the_double_is_detected_as_the_webui_it_imitates():
    assert hosts.detect() is hosts.A1111


def test_the_message_names_the_host_and_says_what_works():
    text = hosts.unsupported_message(hosts.UNKNOWN)
    assert "an unknown WebUI" in text and "AUTOMATIC1111" in text and "modules_forge" in text
    training = hosts.tab_message(hosts.FORGE, "training")
    assert "training tab does not run in Forge" in training and "python -m lib_mos train" in training
    fusion = hosts.tab_message(hosts.FORGE, "fusion")
    assert "fusion tab does not run in Forge" in fusion and "gradio 4" in fusion and "python -m lib_mos fuse" in fusion


def test_every_supported_host_has_a_row_of_host_glue_with_every_function():
    """A host is one row: a `scripts/mos_host_<name>.py` with the same functions as A1111's."""
    import ast

    def functions(path: Path) -> set[str]:
        """Public functions and UPPER_CASE constants."""
        tree = ast.parse(path.read_text())
        return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")} | {
            t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
            if isinstance(t, ast.Name) and t.id.isupper()}

    reference = functions(ROOT / "scripts" / "mos_host_a1111.py")
    assert {"unet_of", "alias_embeddings", "call_rows", "text_encoders", "AND_PARTS_APART"} <= reference
    for host in hosts.HOSTS:
        if host.supported:
            row = ROOT / "scripts" / f"mos_host_{host.name.replace('-', '_')}.py"
            assert functions(row) >= reference, (host.name, reference - functions(row))


@pytest.fixture
def unknown_host(monkeypatch):
    """The process looks like no WebUI we know (the double's A1111 markers not counted), and the
    host layer is detected anew, as in a fresh WebUI process."""
    monkeypatch.setattr(hosts, "HOSTS", tuple(h for h in hosts.HOSTS if h is not hosts.A1111))
    _forget_script_modules()
    yield
    _forget_script_modules()  # the next test detects its own host, and no script keeps this one's


def _forget_script_modules() -> None:
    """Drop the scripts' modules cached by `lib_mos.files.import_sibling` (each holds the host
    layer it was loaded with)."""
    for key in [k for k in sys.modules if k.startswith("_mix_of_show_scripts.")]:
        del sys.modules[key]


def test_in_an_unsupported_host_the_extension_says_so_and_hooks_nothing(unknown_host, tmp_path, tiny_checkpoint,
                                                                          capfd):
    from host_harness import HostHarness

    from modules import script_callbacks, shared

    harness = HostHarness(tmp_path, tiny_checkpoint, extensions=[str(ROOT)])
    try:
        err = capfd.readouterr().err
        assert err.count("Mix-of-Show does not run in an unknown WebUI yet") == 1, err
        # no callback of ours: nothing runs inside the host's sampler or adds routes
        ours = [c for cbs in script_callbacks.callback_map.values() for c in cbs if "mix_of_show" in (c.name or "")]
        assert ours == []
        # each tab holds only the message
        tabs = {elem_id: block for block, _, elem_id in harness.ui_tabs}
        for elem_id in ("mos_fusion", "mos_train"):
            texts = [getattr(c, "value", "") for c in tabs[elem_id].blocks.values()]
            assert any("does not run in an unknown WebUI" in str(t) for t in texts), elem_id
            assert not any(type(c).__name__ in ("Button", "Dropdown") for c in tabs[elem_id].blocks.values())

        # concept tokens stay text: no binding, nothing in the infotext
        model = sd1.load_checkpoint(tiny_checkpoint)
        concept = synthetic.random_concept(model, ("<cat1>", "<cat2>"), seed=4, name="cat")
        write_concept(concept, Path(shared.cmd_opts.lora_dir) / "cat.safetensors")
        res = harness.txt2img("a photo of <cat1> <cat2>", steps=1)
        assert len(res.images) == 1 and "Mix-of-Show" not in res.info

        # the dropdown refuses with the same sentence, the API's script_args layout unchanged
        args = harness.script_args("Mix-of-Show", '{"regions": [{"prompt": "a cat", "box": [0, 0, 1, 1]}]}')
        with pytest.raises(RuntimeError, match="does not run in an unknown WebUI yet"):
            harness.txt2img("a photo", script_args=args, steps=1)
    finally:
        harness.close()


def test_callbacks_are_registered_with_a_name_only_where_the_host_takes_one():
    """A1111 v1.10.1's `script_callbacks.on_…(callback, name=None)`; Forge Classic's older ones take
    the callback alone, and a name there fails the script's import (seen in the real one)."""
    from lib_mos.files import import_sibling

    mos_host = import_sibling(str(ROOT / "scripts" / "mos_generation.py"), "mos_host")
    seen = []
    mos_host.register(lambda callback, name=None: seen.append((callback, name)), print, "mix_of_show")
    mos_host.register(lambda callback: seen.append((callback, None)), len, "mix_of_show")
    assert seen == [(print, "mix_of_show"), (len, None)]


def test_tables_start_with_one_empty_row_only_under_gradio_4(monkeypatch):
    """Forge's gradio 4 fails the whole page on a table built with no row (seen in the real Forge);
    A1111's gradio 3.41 shows such a table as empty, which the fusion tab's browser test expects."""
    from lib_mos.files import import_sibling

    mos_host = import_sibling(str(ROOT / "scripts" / "mos_generation.py"), "mos_host")
    monkeypatch.setattr(mos_host.gr, "__version__", "4.40.0")
    assert mos_host.table_rows_at_least() == 1
    monkeypatch.setattr(mos_host.gr, "__version__", "3.41.2")
    assert mos_host.table_rows_at_least() == 0
