"""Batch invariance (issue 11 item 4): a sequence's quantized codes, scales, log-likelihoods and
greedy tokens do not depend on its batch neighbours or its (left) padding.

Three levels:

1. **The cache** (exact, every format, scale policy, window and read mode): the same K/V rows
   written as one left-padded batch (``set_padding``) or one by one give bit-identical codes,
   scales, sinks, pending tokens and reads, at the prefill and over decode steps.
2. **The lm-eval model on a tiny random Llama** (exact): ``KVQuantLM`` batched (``batch_size=4``)
   and one by one give bit-identical log-likelihoods (every loglikelihood mode), greedy tokens
   (``generate_until``) and cached codes, *given a row-invariant matrix multiply*
   (:class:`RowInvariantLinear`). Why that condition: MKL's fp32 GEMM on a CPU rounds a row
   differently depending on how many rows it multiplies at once (measured on this machine with
   torch 2.13 / MKL 2024.2: a row computed alone (GEMV) differs from the same row among 2-15
   rows, which differs again from larger batches; with 2 threads a 1536->576 projection still
   changes up to 129 rows). Likewise SDPA: on some CPUs (AMD EPYC, torch 2.13, 2026-12-05) a
   query among masked pad keys rounds its softmax differently from the same query alone (7e-9
   after one layer), so the attention is also taken one query at a time over exactly the keys
   its mask lets it see. That is below the harness; with each row multiplied on its own,
   everything the harness does (padding, masks, positions, the cache) is bit-identical.
3. **The embedded SmolLM2** (fp32, 30 layers): exact with the row-invariant GEMM, as above; with
   MKL's own GEMM (what a sweep runs) batched and one-by-one log-likelihoods differ by the GEMM's
   last-bit rounding, carried through 30 layers and *amplified by the KV format* wherever it
   moves a K/V value across one of the format's rounding boundaries. Measured on this machine
   (2026-12-02, the 12 test requests, summed log-likelihood of continuations of up to 5 tokens,
   batch 4 vs 1): max |difference| 0.0049 with bf16 KV, 0.0002 nvfp4, 0.036 fp8_e4m3, 0.17 int4
   (KIVI: a flipped min/max moves a whole 32-token group); greedy flags and generations identical.
   The test bounds bf16 and nvfp4 by ``GEMM_LOGPROB_TOLERANCE``.

``first_batch`` is the documented exception: one scale from the real tokens of every row of the
first forward (vLLM's ``calculate_kv_scales`` saw a whole batch), so a row's codes depend on
which rows came first; padding is still kept out of it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from torch.overrides import TorchFunctionMode

from nvfp4kv.cache import KVCacheConfig, cache_kwarg_name, make_cache
from nvfp4kv.cache.cache import QuantizedKVCache
from nvfp4kv.eval.lm import KVQuantLM
from nvfp4kv.testing import tiny_llama

#: |batched - one-by-one| of a summed log-likelihood on SmolLM2 fp32 with the real CPU GEMM and
#: bf16 / nvfp4 KV (measured max 0.0049 / 0.0002 on this machine: GEMM rounding, module docstring)
GEMM_LOGPROB_TOLERANCE = 0.05

H, D = 2, 32
LENGTHS = [9, 40, 23, 1]

#: (label, KVCacheConfig kwargs): every format, mixed K/V, windows, read modes
FORMATS = [
    ("bf16", dict(k_format="bf16", v_format="bf16")),
    ("fp8", dict(k_format="fp8_e4m3", v_format="fp8_e4m3")),
    ("fp8_head", dict(k_format="fp8_e4m3", v_format="fp8_e4m3", k_options={"scaling": "head"})),
    ("nvfp4", dict(k_format="nvfp4", v_format="nvfp4")),
    ("mxfp4", dict(k_format="mxfp4", v_format="mxfp4")),
    ("fp4_mx_block16", dict(k_format="fp4_mx_block16", v_format="fp4_mx_block16")),
    ("int4", dict(k_format="int4", v_format="int4", k_options={"group_size": 8})),
    ("int2", dict(k_format="int2", v_format="int2", k_options={"group_size": 8})),
    ("k_fp8_v_nvfp4", dict(k_format="fp8_e4m3", v_format="nvfp4")),
    ("nvfp4_res", dict(k_format="nvfp4", v_format="nvfp4", residual_length=5)),
    ("nvfp4_sink_res", dict(k_format="nvfp4", v_format="nvfp4", sink_tokens=4, residual_length=5)),
    ("int4_sink_res", dict(k_format="int4", v_format="int2", sink_tokens=3, residual_length=4,
                           k_options={"group_size": 8})),
    ("nvfp4_quantized", dict(k_format="nvfp4", v_format="nvfp4", read_mode="quantized")),
    ("nvfp4_kcenter", dict(k_format="nvfp4", v_format="nvfp4", k_center=True)),
    ("int4_kcenter_sink_res", dict(k_format="int4", v_format="nvfp4", k_center=True, sink_tokens=3, residual_length=4,
                                   k_options={"group_size": 8})),
    ("int2_raw_fresh", dict(k_format="int2", v_format="int4", read_mode="raw_fresh", k_options={"group_size": 8})),
]
STATIC = {0: (0.004, 0.002), 1: (0.003, 0.005)}
#: every scale policy but first_batch (checkpoint: the static policy with the same numbers is what
#: the checkpoint policy stores; the model-level test reads real checkpoint tensors)
POLICIES = [
    ("prefill", {}),
    ("dynamic", dict(scale_policy="dynamic")),
    ("static", dict(scale_policy="static", static_scales=STATIC)),
    ("unit", dict(scale_policy="unit")),
]


def _config(fmt: dict, policy: dict) -> KVCacheConfig:
    return KVCacheConfig(**{**fmt, **policy})


# ---------------------------------------------------------------------------- 1. the cache
def _rows(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(1, H, n, D, generator=g) * (1 + 3 * i) for i, n in enumerate(LENGTHS)]
    values = [torch.randn(1, H, n, D, generator=g) * (2 - i / 2) for i, n in enumerate(LENGTHS)]
    steps = [(torch.randn(len(LENGTHS), H, 1, D, generator=g) * 4, torch.randn(len(LENGTHS), H, 1, D, generator=g))
             for _ in range(19)]
    return keys, values, steps


def _left_pad(rows: list[torch.Tensor], fill: float = 1e4) -> torch.Tensor:
    """Pads hold a huge value: if a pad reached any scale or group the codes would change."""
    t = max(r.shape[2] for r in rows)
    return torch.cat([torch.cat([torch.full((1, H, t - r.shape[2], D), fill), r], dim=2) for r in rows])


def real_state(stream, b: int, pad: int) -> dict[str, torch.Tensor]:
    """What row ``b`` (with ``pad`` left pad tokens) really stores, pads cut off."""
    if stream.row_by_row:
        return real_state(stream._rows[b], 0, 0)
    out: dict[str, torch.Tensor] = {}
    row = slice(b, b + 1)
    if stream.sink is not None:
        out["sink"] = stream.sink[row, :, pad:]
    lead = max(pad - stream.n_sink, 0)
    for name, part in (stream.parts or {}).items():
        rows_per_token = part.shape[2] // stream.n_packed
        assert lead == 0 or rows_per_token == 1, "a padded token-group format must be stored row by row"
        out[f"parts.{name}"] = part[row, :, lead * rows_per_token:]
    if stream.pending is not None:
        out["pending"] = stream.pending[row, :, max(pad - stream.n_sink - stream.n_packed, 0):]
    if stream.scale is not None:
        out["scale"] = stream.scale[row] if stream.scale.shape[0] > 1 else stream.scale[:1]
    if stream.scale_record is not None:
        record = stream.scale_record[row] if stream.scale_record.shape[0] > 1 else stream.scale_record[:1]
        out["scale_record"] = record[:, :, lead:]
    return out


def assert_same_state(batched, alone, b: int, pad: int, where: str) -> None:
    got, want = real_state(batched, b, pad), real_state(alone, 0, 0)
    assert got.keys() == want.keys(), where
    for name in want:
        assert torch.equal(got[name], want[name]), f"{where}: {name}"


def _write(config: KVCacheConfig, keys, values, steps, batched: bool):
    """(caches, reads): reads[b] = what attention got for row b at each write, pads cut off."""
    pads = [max(LENGTHS) - n for n in LENGTHS]
    if batched:
        cache = QuantizedKVCache(config)
        cache.set_padding(pads)
        outs = [cache.update(_left_pad(keys), _left_pad(values), 0)]
        outs += [cache.update(k, v, 0) for k, v in steps]
        reads = [[(k[b : b + 1, :, pads[b]:], v[b : b + 1, :, pads[b]:]) for k, v in outs] for b in range(len(LENGTHS))]
        return [cache], reads
    caches, reads = [], []
    for b in range(len(LENGTHS)):
        cache = QuantizedKVCache(config)
        outs = [cache.update(keys[b], values[b], 0)]
        outs += [cache.update(k[b : b + 1], v[b : b + 1], 0) for k, v in steps]
        caches.append(cache)
        reads.append(outs)
    return caches, reads


@pytest.mark.parametrize("policy_label,policy", POLICIES, ids=[p for p, _ in POLICIES])
@pytest.mark.parametrize("label,fmt", FORMATS, ids=[f for f, _ in FORMATS])
def test_the_cache_stores_and_reads_each_row_of_a_padded_batch_as_it_would_alone(label, fmt, policy_label, policy):
    config = _config(fmt, policy)
    keys, values, steps = _rows()
    (batched,), batched_reads = _write(config, keys, values, steps, batched=True)
    alone, alone_reads = _write(config, keys, values, steps, batched=False)
    pads = [max(LENGTHS) - n for n in LENGTHS]
    for b in range(len(LENGTHS)):
        for i, ((kb, vb), (ka, va)) in enumerate(zip(batched_reads[b], alone_reads[b])):
            assert torch.equal(kb, ka) and torch.equal(vb, va), f"row {b}, write {i}: reads differ"
        layer_b, layer_a = batched.layers[0], alone[b].layers[0]
        assert_same_state(layer_b.k_stream, layer_a.k_stream, b, pads[b], f"row {b} K")
        assert_same_state(layer_b.v_stream, layer_a.v_stream, b, pads[b], f"row {b} V")


def test_per_request_scales_are_per_row_and_ignore_pads():
    keys, values, steps = _rows()
    config = KVCacheConfig(k_format="nvfp4", v_format="fp8_e4m3", v_options={"scaling": "head"})
    (batched,), _ = _write(config, keys, values, steps, batched=True)
    layer = batched.layers[0]
    assert layer.k_stream.scale.shape == (len(LENGTHS), 1, 1, 1)
    assert layer.v_stream.scale.shape == (len(LENGTHS), H, 1, 1)
    # without set_padding the pads (1e4) would be real tokens and set the scale of every short row
    unannounced = QuantizedKVCache(config)
    unannounced.update(_left_pad(keys), _left_pad(values), 0)
    assert not torch.equal(unannounced.layers[0].k_stream.scale, layer.k_stream.scale)


def test_a_batch_of_one_unpadded_row_is_stored_exactly_as_before():
    """No padding, one row: the per-row machinery reduces to the old per-tensor computation."""
    keys, values, _ = _rows()
    cache = QuantizedKVCache(KVCacheConfig(k_format="nvfp4", v_format="nvfp4"))
    cache.set_padding([0])
    cache.update(keys[1], values[1], 0)
    stream = cache.layers[0].k_stream
    assert stream.pads is None and not stream.row_by_row
    assert torch.equal(stream.scale, stream.fmt.global_scale(keys[1]).float().reshape(1, 1, 1, 1))


def test_first_batch_is_batch_wide_by_definition_and_still_ignores_pads():
    keys, values, steps = _rows()
    config = KVCacheConfig(k_format="nvfp4", v_format="nvfp4", scale_policy="first_batch")
    (batched,), _ = _write(config, keys, values, steps, batched=True)
    scale = batched.layers[0].k_stream.scale
    everything = torch.cat(keys, dim=2)  # every row's real tokens, no pad
    assert torch.equal(scale, batched.layers[0].k_stream.fmt.global_scale(everything).float().reshape(1, 1, 1, 1))
    alone, _ = _write(config, keys, values, steps, batched=False)  # each cache its own store: per request
    assert not torch.equal(scale, alone[0].layers[0].k_stream.scale)
    # the same holds row by row (a sink makes a padded batch be stored per row)
    (rowwise,), _ = _write(KVCacheConfig(k_format="nvfp4", v_format="nvfp4", scale_policy="first_batch",
                                          sink_tokens=2), keys, values, steps, batched=True)
    assert rowwise.layers[0].k_stream.row_by_row
    sinkless = torch.cat([k[:, :, 2:] for k in keys], dim=2)
    assert torch.equal(rowwise.layers[0].k_stream._rows[0].scale,
                       rowwise.layers[0].k_stream.fmt.global_scale(sinkless).float().reshape(1, 1, 1, 1))


def test_padding_follows_rows_through_select_and_reorder():
    keys, values, steps = _rows()
    pads = [max(LENGTHS) - n for n in LENGTHS]
    for extra in ({}, {"sink_tokens": 3}):  # batched layout, and row by row
        config = KVCacheConfig(k_format="nvfp4", v_format="int4", scale_policy="dynamic", residual_length=2, **extra)
        (batched,), _ = _write(config, keys, values, steps[:3], batched=True)
        alone, _ = _write(config, keys, values, steps[:3], batched=False)
        batched.batch_select_indices(torch.tensor([2, 0, 0]))
        batched.reorder_cache(torch.tensor([1, 0, 2]))  # rows now come from (0, 2, 0)
        assert batched.pads == (pads[0], pads[2], pads[0])
        step = torch.randn(3, H, 1, D)
        step[2] = step[0]
        batched.update(step, step, 0)
        alone[0].update(step[:1], step[:1], 0)
        alone[2].update(step[1:2], step[1:2], 0)
        for b, source in enumerate((0, 2, 0)):
            for stream in ("k_stream", "v_stream"):
                assert_same_state(getattr(batched.layers[0], stream), getattr(alone[source].layers[0], stream), b,
                                  batched.pads[b], f"{extra} row {b} {stream}")


def test_set_padding_is_refused_on_a_cache_that_holds_tokens():
    keys, values, _ = _rows()
    cache = QuantizedKVCache(KVCacheConfig(k_format="nvfp4", v_format="nvfp4"))
    cache.update(keys[0], values[0], 0)
    with pytest.raises(ValueError, match="empty cache"):
        cache.set_padding([1])


# ---------------------------------------------------------------------------- 2. the lm, tiny model
def _attention_row_by_row(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                          enable_gqa=False):
    """``F.scaled_dot_product_attention`` for one query at a time over exactly the keys it may
    see (masked keys are dropped, not given -inf), so a row's result does not depend on how many
    pads or neighbours share the call. The mask still decides which keys those are: a harness mask
    that let a pad in would change the result."""
    assert dropout_p == 0.0
    batch, heads, n_query, dim = query.shape
    if key.shape[1] != heads:
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
    n_key = key.shape[2]
    allowed = torch.ones(1, 1, n_query, n_key, dtype=torch.bool)
    if is_causal:
        allowed = allowed & torch.ones(n_query, n_key, dtype=torch.bool).tril(n_key - n_query)
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            allowed = allowed & (attn_mask > torch.finfo(attn_mask.dtype).min / 2)
            bias = attn_mask
    allowed = allowed.expand(batch, heads, n_query, n_key)
    scale = dim**-0.5 if scale is None else scale
    out = torch.zeros(batch, heads, n_query, value.shape[-1], dtype=query.dtype)
    for b in range(batch):
        for h in range(heads):
            for i in range(n_query):
                keys = allowed[b, h, i].nonzero().flatten()
                if keys.numel() == 0:
                    continue
                scores = (key[b, h, keys] @ query[b, h, i].clone()) * scale
                if bias is not None:
                    scores = scores + bias.expand(batch, heads, n_query, n_key)[b, h, i, keys]
                out[b, h, i] = scores.softmax(-1) @ value[b, h, keys]
    return out


class RowInvariantLinear(TorchFunctionMode):
    """``F.linear`` computed one row at a time (each row a fresh 1-D GEMV) and attention one query
    at a time over only its visible keys, so a row's result does not depend on how many rows or
    pads share the call: the CPU kernels' only batch dependence."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            flat = x.reshape(-1, x.shape[-1])
            rows = [F.linear(flat[i].clone(), weight, bias) for i in range(flat.shape[0])]
            return torch.stack(rows).reshape(*x.shape[:-1], weight.shape[0])
        if func is F.scaled_dot_product_attention:
            return _attention_row_by_row(*args, **kwargs)
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoTokenizer

    from nvfp4kv.models import resolve_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_path("embedded:smollm2-135m-instruct"))
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256)
    return model, tokenizer


CONTEXTS = ["The quick brown fox", "Question: what is two plus two?\nAnswer:", "A", "Once upon a time, in a land far away, there"]
CONTINUATIONS = [" jumps", " four and five", " B C D E F", " lived"]


def _lm(tiny, kv, batch_size, mode="decode_faithful") -> KVQuantLM:
    model, tokenizer = tiny
    return KVQuantLM(pretrained=model, tokenizer=tokenizer, kv=kv, batch_size=batch_size, loglikelihood_mode=mode,
                     progress=False, share_prefill=False, max_length=128)


def _requests(lm: KVQuantLM) -> list:
    pairs = [(c, x) for c in CONTEXTS for x in CONTINUATIONS[:2]] + list(zip(CONTEXTS, CONTINUATIONS))
    return [((c, x), *lm._encode_pair(c, x)) for c, x in pairs]


def _generate(lm: KVQuantLM) -> list[str]:
    requests = [Instance("generate_until", {}, (c, {"until": ["\n\n\n"], "max_gen_toks": 6}), i)
                for i, c in enumerate(CONTEXTS)]
    return lm.generate_until(requests, disable_tqdm=True)


MODEL_CONFIGS = [
    *[(label, fmt) for label, fmt in FORMATS if label not in ("fp8_head", "nvfp4_quantized", "int2_raw_fresh")],
    ("nvfp4_dynamic", dict(k_format="nvfp4", v_format="nvfp4", scale_policy="dynamic")),
    ("fp8_static", dict(k_format="fp8_e4m3", v_format="nvfp4", scale_policy="static", static_scales=STATIC)),
    ("nvfp4_unit", dict(k_format="nvfp4", v_format="nvfp4", scale_policy="unit")),
]


@pytest.mark.parametrize("label,kv", MODEL_CONFIGS, ids=[label for label, _ in MODEL_CONFIGS])
def test_kvquantlm_batched_equals_one_by_one_bit_for_bit(tiny, label, kv):
    config = KVCacheConfig(**kv)
    with RowInvariantLinear():
        one = _lm(tiny, config, 1)
        many = _lm(tiny, config, 4)
        assert many._loglikelihood_tokens(_requests(many)) == one._loglikelihood_tokens(_requests(one))
        assert many.stats["prefill_forwards"] < one.stats["prefill_forwards"]  # it did batch
        assert _generate(many) == _generate(one)


@pytest.mark.parametrize("mode", ["all_quantized", "raw_prefill"])
def test_single_forward_modes_are_batch_invariant(tiny, mode):
    config = KVCacheConfig(k_format="int4", v_format="nvfp4", k_options={"group_size": 8}, residual_length=3)
    with RowInvariantLinear():
        one, many = _lm(tiny, config, 1, mode), _lm(tiny, config, 3, mode)
        assert many._loglikelihood_tokens(_requests(many)) == one._loglikelihood_tokens(_requests(one))
        assert many.stats["single_forwards"] < one.stats["single_forwards"]


def test_the_checkpoint_policy_is_batch_invariant(tiny, tmp_path):
    from safetensors.torch import save_file

    save_file({f"model.layers.{i}.self_attn.{w}_proj.{w}_scale": torch.tensor(s)
               for i, pair in STATIC.items() for w, s in zip("kv", pair)}, str(tmp_path / "scales.safetensors"))
    config = KVCacheConfig(k_format="fp8_e4m3", v_format="nvfp4", scale_policy="checkpoint",
                           checkpoint_scales=str(tmp_path))
    with RowInvariantLinear():
        one, many = _lm(tiny, config, 1), _lm(tiny, config, 4)
        assert many._loglikelihood_tokens(_requests(many)) == one._loglikelihood_tokens(_requests(one))


CODE_CONFIGS = [(label, kv) for label, kv in MODEL_CONFIGS if label in ("nvfp4", "int4_sink_res", "nvfp4_dynamic")]


@pytest.mark.parametrize("label,kv", CODE_CONFIGS, ids=[label for label, _ in CODE_CONFIGS])
def test_the_codes_a_model_writes_are_the_same_batched_and_alone(tiny, label, kv):
    model, tokenizer = tiny
    config = KVCacheConfig(**kv)
    prompts = [tokenizer(c)["input_ids"] for c in CONTEXTS]
    length = max(len(p) for p in prompts)
    pads = [length - len(p) for p in prompts]
    ids = torch.tensor([[0] * pad + p for pad, p in zip(pads, prompts)])
    mask = torch.tensor([[0] * pad + [1] * len(p) for pad, p in zip(pads, prompts)])
    with RowInvariantLinear(), torch.no_grad():
        batched = make_cache(model, config)
        batched.set_padding(pads)
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
              **{cache_kwarg_name(model): batched})
        for b, prompt in enumerate(prompts):
            alone = make_cache(model, config)
            model(input_ids=torch.tensor([prompt]), **{cache_kwarg_name(model): alone})
            for layer_b, layer_a in zip(batched.layers, alone.layers):
                assert_same_state(layer_b.k_stream, layer_a.k_stream, b, pads[b], f"{label} row {b} K")
                assert_same_state(layer_b.v_stream, layer_a.v_stream, b, pads[b], f"{label} row {b} V")


def test_batch_size_auto_is_accepted(tiny):
    config = KVCacheConfig(k_format="nvfp4", v_format="nvfp4")
    with RowInvariantLinear():
        auto, one = _lm(tiny, config, "auto"), _lm(tiny, config, 1)
        auto.max_batch_size = 4  # probing starts here (64 by default)
        requests = _requests(auto)
        assert auto._loglikelihood_tokens(requests) == one._loglikelihood_tokens(requests)


# ---------------------------------------------------------------------------- 3. SmolLM2
@pytest.fixture(scope="module")
def smollm2():
    from nvfp4kv.models import load_model

    bundle = load_model({"device": "cpu"})
    return copy.deepcopy(bundle.model).float(), bundle.tokenizer


def _smol_pair(smollm2, kv):
    model, tokenizer = smollm2
    return [KVQuantLM(pretrained=model, tokenizer=tokenizer, kv=kv, batch_size=size, progress=False,
                      share_prefill=False) for size in (4, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("kv", ["nvfp4", "k=int4;v=nvfp4;sink_tokens=2;residual_length=3"])
def test_smollm2_batched_equals_one_by_one_given_a_row_invariant_gemm(smollm2, kv):
    """The real model, every layer, exact: only the GEMM is made row-invariant."""
    with RowInvariantLinear():
        many, one = _smol_pair(smollm2, kv)
        assert many._loglikelihood_tokens(_requests(many)) == one._loglikelihood_tokens(_requests(one))
        assert _generate(many) == _generate(one)


@pytest.mark.slow
@pytest.mark.parametrize("kv", ["bf16", "nvfp4"])
def test_smollm2_with_the_real_gemm_stays_within_the_documented_tolerance(smollm2, kv):
    """With MKL's own GEMM (what a sweep runs): log-likelihoods within GEMM_LOGPROB_TOLERANCE,
    the same greedy flags, and the same generations on these prompts."""
    many, one = _smol_pair(smollm2, kv)
    a, b = many._loglikelihood_tokens(_requests(many)), one._loglikelihood_tokens(_requests(one))
    assert max(abs(x - y) for (x, _), (y, _) in zip(a, b)) <= GEMM_LOGPROB_TOLERANCE
    assert [g for _, g in a] == [g for _, g in b]
    assert _generate(many) == _generate(one)
