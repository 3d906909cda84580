"""Offline model sources: download (faked), assemble in part order, verify, convert (faked), record.

Nothing here touches the network: chunk wheels are built in tmp_path around a tiny GGUF written
with the gguf package, and the pip step is replaced by a copy from that directory.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from nvfp4kv import model_sources as ms
from nvfp4kv.model_sources import download, pipeline
from nvfp4kv.errors import ConfigError
from nvfp4kv.models import ModelSpec, resolve_path

gguf = pytest.importorskip("gguf")

N_PARTS = 11  # > 9, so part10/part11 would land before part2 under a lexicographic sort
VERSION = "0.1.0"
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"


def _tiny_gguf(path: Path) -> bytes:
    """A valid GGUF with two F32 tensors and one Q8_0 tensor (a llama-like naming)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_embedding_length(32)
    writer.add_context_length(64)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((16, 32)).astype(np.float32)
    writer.add_tensor("token_embd.weight", gguf.quants.quantize(emb, gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(32).astype(np.float32))
    writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def _wheel(directory: Path, n: int, payload: bytes, member: str | None = None) -> Path:
    mod = f"fakemodel_part{n}"
    path = directory / f"{mod}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{mod}/__init__.py", "")
        zf.writestr(member or f"{mod}/data/part{n}.bin", payload)  # unpadded: part9 < part10 numerically only
        zf.writestr(f"{mod}-{VERSION}.dist-info/METADATA", f"Name: fakemodel-part{n}\nVersion: {VERSION}\n")
    return path


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    """A registered fake source, its prebuilt wheels, a recording downloader and converter."""
    blob = _tiny_gguf(tmp_path / "tiny.gguf")
    cut = np.linspace(0, len(blob), N_PARTS + 1).astype(int)
    parts = [blob[cut[i]:cut[i + 1]] for i in range(N_PARTS)]
    index = tmp_path / "index"
    index.mkdir()
    for n, payload in enumerate(parts, start=1):
        _wheel(index, n, payload)
    source = ms.ChunkedGGUFSource(
        name="fake-model", hub_id="fake-org/Fake-Model", description="test source",
        package_template="fakemodel-part{n}", version=VERSION, n_parts=N_PARTS,
        gguf_filename="fake.gguf", sha256=hashlib.sha256(blob).hexdigest(), gguf_bytes=len(blob),
        tensor_types={"F32": 2, "Q8_0": 1}, label="fake-model-gguf-q8_0",
    )
    monkeypatch.setitem(ms.SOURCES, source.name, source)
    monkeypatch.setenv(ms.MODEL_CACHE_ENV, str(tmp_path / "cache"))
    calls: dict[str, list] = {"download": [], "convert": []}

    def downloader(requirements, dest):
        calls["download"].append(list(requirements))
        for req in requirements:
            n = int(re.search(r"part(\d+)==", req).group(1))
            (dest / f"fakemodel_part{n}-{VERSION}-py3-none-any.whl").write_bytes(
                (index / f"fakemodel_part{n}-{VERSION}-py3-none-any.whl").read_bytes())

    def converter(gguf_path, out):
        calls["convert"].append(gguf_path)
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
        return {"method": "fake", "dtype": "bfloat16"}

    class Fake:
        pass

    f = Fake()
    f.source, f.blob, f.parts, f.index, f.calls = source, blob, parts, index, calls
    f.downloader, f.converter = downloader, converter
    f.root = tmp_path / "cache" / source.name
    f.run = lambda **kw: ms.fetch(source.name, downloader=downloader, converter=converter, log=None, **kw)
    return f


def test_fetch_assembles_in_numeric_part_order_and_records_provenance(fake) -> None:
    prov = fake.run()
    gguf_path = fake.root / "fake.gguf"
    assert gguf_path.read_bytes() == fake.blob  # part10, part11 after part9
    assert [p["part"] for p in prov["source"]["parts"]] == list(range(1, N_PARTS + 1))
    assert fake.calls["download"] == [[f"fakemodel-part{n}=={VERSION}" for n in range(1, N_PARTS + 1)]]
    assert len(fake.calls["convert"]) == 1

    assert prov["status"] == "complete"
    assert prov["gguf"]["sha256"] == fake.source.sha256 and prov["gguf"]["verified"] is True
    assert prov["gguf"]["tensor_types"] == {"F32": 2, "Q8_0": 1}
    assert prov["gguf"]["architecture"] == "llama" and prov["gguf"]["layers"] == 1
    assert prov["weight_quantization"] == "GGUF Q8_0 (F32: 2, Q8_0: 1), dequantized to bfloat16"
    assert prov["hub_equivalent"] == "fake-org/Fake-Model"
    assert prov["source"]["packages"][9] == f"fakemodel-part10=={VERSION}"
    part = prov["source"]["parts"][0]
    assert part["member"] == "fakemodel_part1/data/part1.bin"
    assert part["member_sha256"] == hashlib.sha256(fake.parts[0]).hexdigest()
    assert set(prov["versions"]) >= {"python", "torch", "transformers", "gguf"}
    assert {"download_s", "assemble_s", "convert_s"} <= set(prov["timings_s"])

    hf = fake.root / "fake-model-gguf-q8_0"  # named after the label: results from the dir name the quantization
    assert json.loads((fake.root / "provenance.json").read_text()) == prov
    assert json.loads((hf / ms.HF_PROVENANCE_FILE).read_text()) == prov
    assert not list(fake.root.glob(".convert-*")) and not list(fake.root.glob("*.partial"))


def test_second_run_does_no_work(fake, monkeypatch) -> None:
    first = fake.run()
    mtime = (fake.root / "fake.gguf").stat().st_mtime_ns

    def boom(*a, **k):  # pragma: no cover - reaching it is the failure
        raise AssertionError("no work expected")

    monkeypatch.setattr(pipeline, "sha256_file", boom)
    monkeypatch.setattr(pipeline, "assemble", boom)
    second = ms.fetch(fake.source.name, downloader=boom, converter=boom, log=None)
    assert second == first
    assert (fake.root / "fake.gguf").stat().st_mtime_ns == mtime


def test_resume_downloads_only_missing_wheels(fake) -> None:
    wheels = fake.root / "wheels"
    wheels.mkdir(parents=True)
    for n in (1, 2, 10):
        (wheels / f"fakemodel_part{n}-{VERSION}-py3-none-any.whl").write_bytes(
            (fake.index / f"fakemodel_part{n}-{VERSION}-py3-none-any.whl").read_bytes())
    (wheels / f"fakemodel_part3-{VERSION}-py3-none-any.whl").write_bytes(b"PK\x03\x04 truncated")
    fake.run(convert=False)
    (requested,) = fake.calls["download"]
    assert requested == [f"fakemodel-part{n}=={VERSION}" for n in range(3, N_PARTS + 1) if n != 10]
    assert (fake.root / "fake.gguf").read_bytes() == fake.blob


def test_existing_gguf_skips_download_and_conversion_runs_once(fake) -> None:
    fake.run(convert=False)
    assert json.loads((fake.root / "provenance.json").read_text())["status"] == "assembled"
    prov = fake.run()  # the GGUF matches: no download, just the conversion
    assert len(fake.calls["download"]) == 1 and len(fake.calls["convert"]) == 1
    assert prov["status"] == "complete" and "download_s" not in prov["timings_s"]
    # a lost provenance.json with the converted dir still there: keep the conversion? No record,
    # so it converts again (it cannot know which GGUF made it)
    (fake.root / "provenance.json").unlink()
    fake.run()
    assert len(fake.calls["convert"]) == 2 and len(fake.calls["download"]) == 1


def test_complete_conversion_survives_a_hash_upgrade(fake, monkeypatch) -> None:
    """A run made before the hash was committed is upgraded to verified without reconverting."""
    unpinned = ms.ChunkedGGUFSource(**{**fake.source.__dict__, "sha256": None, "gguf_bytes": None})
    monkeypatch.setitem(ms.SOURCES, fake.source.name, unpinned)
    prov = fake.run()
    assert prov["gguf"]["verified"] is False and prov["gguf"]["expected_sha256"] is None
    monkeypatch.setitem(ms.SOURCES, fake.source.name, fake.source)
    prov = fake.run()
    assert prov["gguf"]["verified"] is True and prov["gguf"]["expected_sha256"] == fake.source.sha256
    assert len(fake.calls["convert"]) == 1 and len(fake.calls["download"]) == 1


def test_hash_mismatch_names_the_fix_and_leaves_no_gguf(fake, monkeypatch) -> None:
    bad = ms.ChunkedGGUFSource(**{**fake.source.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(ms.SOURCES, bad.name, bad)
    with pytest.raises(ms.FetchError, match=r"expected 0{64}: .*delete .*wheels and rerun") as info:
        fake.run()
    assert fake.source.sha256 in str(info.value) and "\n" not in str(info.value)
    assert not (fake.root / "fake.gguf").exists() and not list(fake.root.glob("*.partial"))


def test_swapped_part_contents_fail_the_hash(fake, tmp_path) -> None:
    for n, m in ((9, 10), (10, 9)):  # wheel 9 carries part 10's bytes and vice versa
        _wheel(fake.index, n, fake.parts[m - 1])
    with pytest.raises(ms.FetchError, match="sha256"):
        fake.run()


def test_wrong_part_member_is_rejected(fake) -> None:
    _wheel(fake.index, 4, fake.parts[3], member="fakemodel_part4/data/part5.bin")
    with pytest.raises(ms.FetchError, match="part05.bin|layout changed"):
        fake.run()


def test_pip_failure_is_one_line_naming_the_fix(monkeypatch, tmp_path) -> None:
    def fail(cmd, **kw):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=(
            "WARNING: Retrying ...\nERROR: Could not find a version that satisfies the requirement x==1\n"))

    monkeypatch.setattr(download.subprocess, "run", fail)
    with pytest.raises(ms.FetchError, match="PyPI is reachable") as info:
        ms.pip_download(["x==1"], tmp_path)
    assert "Could not find a version" in str(info.value) and "\n" not in str(info.value)


def test_inspect_and_independent_decode_check(fake, tmp_path) -> None:
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "tiny.gguf"
    info = ms.inspect_gguf(path)
    assert info["tensor_types"] == {"F32": 2, "Q8_0": 1} and info["q_heads"] == 2 and info["kv_heads"] == 1
    reader = gguf.GGUFReader(str(path))
    t = {x.name: x for x in reader.tensors}["token_embd.weight"]
    emb = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).to(torch.bfloat16)
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file({"model.embed_tokens.weight": emb}, str(hf / "model.safetensors"))
    assert ms.check_against_gguf(path, hf) == {"token_embd.weight (Q8_0) -> model.embed_tokens.weight": "exact"}
    save_file({"model.embed_tokens.weight": emb + 1}, str(hf / "model.safetensors"))
    with pytest.raises(ms.FetchError, match="independent decode"):
        ms.check_against_gguf(path, hf)


def test_offline_name_resolution(fake) -> None:
    with pytest.raises(ConfigError, match=r"python -m experiments.fetch_model fake-model"):
        resolve_path("offline:fake-model")
    with pytest.raises(ConfigError, match="known: "):
        resolve_path("offline:nope")
    fake.run()
    assert resolve_path("offline:fake-model") == str(fake.root / "fake-model-gguf-q8_0")
    assert ModelSpec("offline:fake-model").display_name == "fake-model-gguf-q8_0"
    summary = ms.source_summary(ms.read_provenance(resolve_path("offline:fake-model")))
    assert summary["gguf_tensor_types"] == {"F32": 2, "Q8_0": 1} and summary["gguf_sha256"] == fake.source.sha256


def test_broken_source_is_refused_and_warns(fake, monkeypatch) -> None:
    broken = ms.ChunkedGGUFSource(**{**fake.source.__dict__, "usable": False, "warning": "damaged weights"})
    monkeypatch.setitem(ms.SOURCES, broken.name, broken)
    with pytest.raises(ms.FetchError, match="damaged weights.*--allow-broken"):
        fake.run()
    fake.run(allow_broken=True)
    with pytest.warns(UserWarning, match="damaged weights"):
        resolve_path("offline:fake-model")


def test_cli(fake, capsys) -> None:
    from experiments import fetch_model

    assert fetch_model.main(["--list"]) == 0
    assert "fake-model" in capsys.readouterr().out
    assert fetch_model.main(["no-such-model"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Unknown offline model 'no-such-model'") and "\n" not in err


def test_cache_dir_overrides(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(ms.MODEL_CACHE_ENV, raising=False)
    monkeypatch.setenv("NVFP4KV_CACHE_DIR", str(tmp_path / "c"))
    assert ms.model_cache_dir("m") == tmp_path / "c" / "models" / "m"
    monkeypatch.setenv(ms.MODEL_CACHE_ENV, str(tmp_path / "mc"))
    assert ms.model_cache_dir("m") == tmp_path / "mc" / "m"
    assert ms.model_cache_dir("m", tmp_path / "x") == tmp_path / "x"


def test_committed_sources_and_configs() -> None:
    qwen = ms.SOURCES["qwen2.5-coder-1.5b-instruct"]
    assert re.fullmatch(r"[0-9a-f]{64}", qwen.sha256) and qwen.usable and qwen.n_parts == 22
    assert qwen.tensor_types == {"Q4_K": 169, "F32": 141, "Q6_K": 29}
    assert "q4_k-q6_k" in qwen.label and "Q4_K/Q6_K" in qwen.weight_quantization
    small = ms.SOURCES["qwen2.5-coder-0.5b-instruct"]
    assert not small.usable and "chance" in small.warning and small.label.endswith("BROKEN")
    assert re.fullmatch(r"[0-9a-f]{64}", small.sha256)

    big_cfg = (CONFIG_DIR / "qwen25_coder_1p5b.yaml").read_text()
    assert "\nname_or_path: Qwen/Qwen2.5-Coder-1.5B-Instruct\n" in big_cfg
    assert "offline:qwen2.5-coder-1.5b-instruct" in big_cfg and "Q4_K" in big_cfg
    small_cfg = (CONFIG_DIR / "qwen25_coder_0p5b.yaml").read_text()
    assert "BROKEN" in small_cfg and "chance" in small_cfg
