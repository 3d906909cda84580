"""Model loading: the real ``from_pretrained`` path on local files, and clear errors."""

from __future__ import annotations

import pytest
import torch

from nvfp4kv.errors import ConfigError
from nvfp4kv.models import EMBEDDED_NAME, ModelSpec, load_model, resolve_dtype, resolve_device
from nvfp4kv.testing import tiny_llama


def test_display_names() -> None:
    assert ModelSpec().display_name == "smollm2-135m-instruct"
    assert ModelSpec("meta-llama/Llama-3.1-8B-Instruct").display_name == "Llama-3.1-8B-Instruct"
    assert ModelSpec("/x/y/", label="mine").display_name == "mine"


def test_bad_dtype_and_device_name_the_fix() -> None:
    with pytest.raises(ConfigError, match="model.dtype"):
        resolve_dtype("float8")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="model.device=cpu"):
            resolve_device("cuda:0")


def test_unknown_embedded_name() -> None:
    with pytest.raises(ConfigError, match=EMBEDDED_NAME):
        load_model(ModelSpec("embedded:gpt-5"))


def test_offline_hub_id_fails_with_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="local HF directory"):
        load_model(ModelSpec("nvfp4kv-test/definitely-not-a-model", device="cpu"))


def test_loads_local_directory_through_from_pretrained(tmp_path, monkeypatch) -> None:
    """The same code path a hub id takes, on a local directory (the offline path users configure)."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = tiny_llama()
    model.save_pretrained(tmp_path)
    vocab = {f"t{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t2").save_pretrained(tmp_path)

    bundle = load_model(ModelSpec(str(tmp_path), dtype="float32", device="cpu"))
    assert bundle.name == tmp_path.name
    assert bundle.tokenizer.pad_token == "t2"
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(bundle.model(ids).logits, model(ids).logits)
