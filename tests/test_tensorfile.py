"""Reading and writing .safetensors tensor by tensor (lib_mos.tensorfile): the files are the ones
safetensors writes and reads, errors name the file and key, and loading a checkpoint peaks at the
model plus about one tensor (no memory map, no whole state dict)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lib_mos.files import atomic_save_safetensors, write_safetensors_streaming
from lib_mos.tensorfile import TensorFile, write_tensor

REPO = Path(__file__).resolve().parents[1]


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {
        "f64": torch.randn(3, generator=gen, dtype=torch.float64),
        "f32": torch.randn(4, 5, generator=gen),
        "f16": torch.randn(2, 3, generator=gen).half(),
        "bf16": torch.randn(7, 3, generator=gen).bfloat16(),
        "i64": torch.arange(5),
        "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "i16": torch.arange(-3, 4, dtype=torch.int16),
        "i8": torch.arange(-4, 5, dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    if hasattr(torch, "float8_e4m3fn"):
        out["f8"] = torch.randn(5, generator=gen).to(torch.float8_e4m3fn)
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.dim() else a.float(),
                                                                    b.view(torch.uint8) if b.dim() else b.float())


def test_written_files_read_the_same_with_safetensors(tmp_path: Path) -> None:
    tensors = _tensors()
    meta = {"lib_mos.sd1_config": json.dumps({"a": 1}), "note": "ünïcode"}
    path = write_safetensors_streaming(tmp_path / "x.safetensors",
                                       [(k, v.dtype, v.shape, v) for k, v in tensors.items()], metadata=meta)
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    assert all(_same(loaded[k], v) for k, v in tensors.items())
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata() == meta
        assert _same(fh.get_tensor("bf16"), tensors["bf16"])
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert header_len % 8 == 0  # the data starts aligned
    with TensorFile(path) as tf:
        assert tf.metadata == meta and set(tf.keys()) == set(tensors)
        assert all(_same(tf.read(k), v) for k, v in tensors.items())


def test_reads_what_safetensors_writes(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "s.safetensors"), metadata={"m": "1"})
    raw = (tmp_path / "s.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    order = [k for k in json.loads(raw[8:8 + n]) if k != "__metadata__"]
    with TensorFile(tmp_path / "s.safetensors") as tf:
        assert tf.keys() == order and tf.metadata == {"m": "1"}
        assert tf.shape("i32") == (2, 3) and tf.dtype("bf16") == torch.bfloat16 and "f32" in tf
        assert all(_same(tf.read(k), v) for k, v in tensors.items())
        assert torch.equal(tf.read("f16", torch.float32), tensors["f16"].float())
    save_file({"a": torch.ones(2)}, str(tmp_path / "plain.safetensors"))  # no __metadata__
    with TensorFile(tmp_path / "plain.safetensors") as tf:
        assert tf.metadata == {} and tf.keys() == ["a"]


def test_read_into_parameters_of_any_dtype_and_layout(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "s.safetensors"))
    with TensorFile(tmp_path / "s.safetensors") as tf:
        same = torch.nn.Parameter(torch.zeros(4, 5))  # the direct path: its own memory is filled
        ptr = same.data_ptr()
        tf.read_into("f32", same)
        assert torch.equal(same, tensors["f32"]) and same.data_ptr() == ptr and same.requires_grad
        half = torch.zeros(4, 5, dtype=torch.float16)
        tf.read_into("f32", half)
        assert torch.equal(half, tensors["f32"].half())
        strided = torch.zeros(5, 4).t()  # not contiguous: copied through a temporary
        tf.read_into("f32", strided)
        assert torch.equal(strided, tensors["f32"])
        bf = torch.zeros(7, 3, dtype=torch.float32)
        tf.read_into("bf16", bf)
        assert torch.equal(bf, tensors["bf16"].float())
        scalar = torch.zeros(())
        tf.read_into("scalar", scalar)
        assert scalar.item() == 2.5
        with pytest.raises(ValueError, match=r"s\.safetensors: key 'f32' has shape \[4, 5\], expected \[5, 4\]"):
            tf.read_into("f32", torch.zeros(5, 4))


def test_pass_through_with_copy_raw_and_callables(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "s.safetensors"))
    with TensorFile(tmp_path / "s.safetensors") as tf:
        entries = [(k, tf.dtype(k), tf.shape(k), lambda f, k=k: tf.copy_raw(k, f)) for k in tf]
        entries.append(("cast", torch.float16, (4, 5), lambda f: write_tensor(f, tf.read("f32", torch.float16))))
        out = write_safetensors_streaming(tmp_path / "copy.safetensors", entries)
    loaded = load_file(str(out))
    assert all(_same(loaded[k], v) for k, v in tensors.items())
    assert torch.equal(loaded["cast"], tensors["f32"].half())


def test_a_source_writing_the_wrong_size_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "bad.safetensors"
    entries = [("ok", torch.float32, (2,), torch.ones(2)), ("short", torch.float32, (3,), lambda f: f.write(b"\0" * 8))]
    with pytest.raises(ValueError, match=r"'short' wrote 8 bytes, expected 12"):
        write_safetensors_streaming(target, entries)
    assert list(tmp_path.iterdir()) == []

    def boom(f):
        f.write(b"\0" * 4)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_safetensors_streaming(target, [("x", torch.float32, (1,), boom)])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"'t' is \[3\], its entry says \[2\]"):
        write_safetensors_streaming(target, [("t", torch.float32, (2,), torch.ones(3))])
    with pytest.raises(TypeError, match="str to str"):
        write_safetensors_streaming(target, [], metadata={"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_existing_files_are_kept_unless_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "x.safetensors"
    write_safetensors_streaming(target, [("a", torch.float32, (1,), torch.ones(1))])
    with pytest.raises(FileExistsError, match=r"x\.safetensors"):
        write_safetensors_streaming(target, [("a", torch.float32, (1,), torch.zeros(1))])
    write_safetensors_streaming(target, [("a", torch.bfloat16, (1,), torch.zeros(1))], overwrite=True)
    assert load_file(str(target))["a"].dtype == torch.bfloat16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


def test_atomic_save_streams_and_keeps_its_rules(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    path = atomic_save_safetensors({"t": base.t(), "i": torch.arange(3)}, tmp_path / "a.safetensors",
                                   metadata={"k": "v"})
    with safe_open(str(path), framework="pt") as fh:
        assert torch.equal(fh.get_tensor("t"), base.t()) and fh.metadata() == {"k": "v"}
    with pytest.raises(RuntimeError, match="share memory"):
        atomic_save_safetensors({"a": base, "b": base[1]}, tmp_path / "b.safetensors")
    rows = atomic_save_safetensors({"r0": base[0], "r2": base[2]}, tmp_path / "rows.safetensors")  # disjoint views
    assert torch.equal(load_file(str(rows))["r2"], base[2])
    with pytest.raises(ValueError, match="meta device"):
        atomic_save_safetensors({"m": torch.empty(2, device="meta")}, tmp_path / "c.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "rows.safetensors"]


def test_broken_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        TensorFile(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x02}q\x00" * 10)  # a pickle
    with pytest.raises(ValueError, match=r"junk\.safetensors: not a readable \.safetensors file"):
        TensorFile(junk)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    with pytest.raises(ValueError, match=r"short\.safetensors: not a readable"):
        TensorFile(short)
    listing = tmp_path / "list.safetensors"
    listing.write_bytes(struct.pack("<Q", 2) + b"[]")
    with pytest.raises(ValueError, match="not a JSON object"):
        TensorFile(listing)

    good = tmp_path / "good.safetensors"
    save_file({"a": torch.ones(4), "b": torch.ones(8)}, str(good))
    raw = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[:-4])
    with pytest.raises(ValueError, match=r"cut\.safetensors: truncated: key 'b'"):
        TensorFile(cut)
    with TensorFile(good) as tf, pytest.raises(ValueError, match=r"good\.safetensors: no key 'x'"):
        tf.read("x")

    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["a"]["data_offsets"] = [0, 12]
    body = json.dumps(header).encode()
    offsets = tmp_path / "offsets.safetensors"
    offsets.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
    with pytest.raises(ValueError, match=r"offsets\.safetensors: key 'a' has data_offsets \[0, 12\]"):
        TensorFile(offsets)
    header["a"] = {"dtype": "X9", "shape": [4], "data_offsets": [0, 16]}
    body = json.dumps(header).encode()
    offsets.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
    with pytest.raises(ValueError, match="key 'a' has dtype 'X9'"):
        TensorFile(offsets)


# ------------------------------------------------------------------------------------- peak memory
# A loader in a fresh process: its peak resident memory while loading, over what it held before,
# must stay within the model it builds plus two of the largest tensor (one read, one being cast)
# and a margin. A memory-mapped read (safe_open) or a whole state dict adds the file on top, which
# these checkpoints make larger than the margin: 320 MB (SD1) and 400 MB (SDXL) in float32.
_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from lib_mos.models import sd1, sdxl
    from lib_mos.models.clip_tokenizer import load_clip_tokenizer
    from lib_mos.tensorfile import TensorFile

    path, family, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
    module = sd1 if family == "sd1" else sdxl
    load_clip_tokenizer()  # imports, the tokenizer and a meta build before the baseline
    (sd1.build_sd15_skeleton if family == "sd1" else sdxl.build_sdxl_skeleton)()

    def status(field):
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))

    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current resident size
    baseline = status("VmRSS")
    model = module.load_checkpoint(path, dtype=dtype)
    peak = status("VmHWM")
    modules = [model.unet, model.text_encoder] if family == "sd1" else [model.unet, model.text_root]
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    with TensorFile(path) as tf:
        largest = max(max(tf.nbytes(k) for k in tf.keys()), max(t.nbytes for t in tensors))
        file_bytes = sum(tf.nbytes(k) for k in tf.keys())
    print(json.dumps({"baseline": baseline, "peak": peak, "model": sum(t.nbytes for t in tensors),
                      "largest": largest, "file": file_bytes}))
""")
_MARGIN = 64 * 2**20


@pytest.fixture(scope="module")
def big_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SD1 and SDXL topologies wide enough that the file outweighs the margin (fp32, ~0.3-0.4 GB)."""
    from lib_mos.models import sd1, sdxl

    folder = tmp_path_factory.mktemp("big")
    cfg1 = sd1.SD1Config(model_channels=96, context_dim=128, text_heads=2, text_layers=4, text_intermediate=512)
    with torch.random.fork_rng(devices=[]):
        model1 = sd1.SD1Model(unet=sd1.build_unet(cfg1), text_encoder=sd1.build_text_encoder(cfg1),
                              tokenizer=None, alphas_cumprod=sd1.sd1_alphas_cumprod(), config=cfg1)
        out = {"sd1": sd1.save_checkpoint(model1, folder / "sd1.safetensors")}
        del model1
        cfg2 = sdxl.SDXLConfig(model_channels=64, head_channels=16, te1_width=64, te1_layers=2, te1_heads=4,
                               te1_intermediate=128, te2_width=128, te2_layers=2, te2_heads=4, te2_intermediate=256,
                               size_features=8)
        model2 = sdxl.SDXLModel(unet=sdxl.build_unet(cfg2), text_root=sdxl.build_text_encoders(cfg2),
                                tokenizer=None, alphas_cumprod=sd1.sd1_alphas_cumprod(), config=cfg2)
        out["sdxl"] = sdxl.save_checkpoint(model2, folder / "sdxl.safetensors")
    return out


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-memory reset")
@pytest.mark.parametrize(("family", "dtype"), [("sd1", "float32"), ("sd1", "bfloat16"), ("sdxl", "bfloat16")])
def test_loading_peaks_at_the_model_plus_about_one_tensor(big_checkpoints, family, dtype):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(big_checkpoints[family]), family, dtype],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    grew = m["peak"] - m["baseline"]
    allowed = m["model"] + 2 * m["largest"] + _MARGIN
    assert m["file"] > 2 * m["largest"] + _MARGIN  # a loader holding the file as well would fail
    mb = {k: round(v / 2**20) for k, v in m.items()}
    assert grew <= allowed, f"grew {grew / 2**20:.0f} MB while loading, allowed {allowed / 2**20:.0f} MB: {mb}"
