"""Write the analysis notebooks from the cell sources below (run: ``python notebooks/_build.py``).

Notebooks are generated rather than hand-edited so that they stay small, reviewable in diffs
and free of outputs: the source of truth is this file, and the committed ``.ipynb`` files are
its output. Each notebook's first code cell holds its parameters (tagged ``parameters`` for
papermill); the results path defaults to ``$NVFP4KV_RESULTS`` or the newest sweep run.
``tests/test_notebooks.py`` checks that the committed notebooks match this file and run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

Cell = tuple[str, str]

OVERVIEW: list[Cell] = [
    ("md", """\
# 01 · Overview: how much accuracy does the KV format cost?

Loads the newest sweep (or the one named below), shows every task's accuracy per KV format with
Δ vs BF16 and **paired** 95% confidence intervals (every format answers the same questions, so
per-question differences are bootstrapped; McNemar's exact test gives the p-value), and plots
accuracy against KV memory (bits per element).

Change `RESULTS` to a run directory, a parent of several runs (they are merged), or a glob;
the default is `$NVFP4KV_RESULTS`, else the newest run under `results/runs/`."""),
    ("code", """\
%matplotlib inline
from IPython.display import Markdown, display

from nvfp4kv import analysis as A

RESULTS = A.default_results_path()  # $NVFP4KV_RESULTS, else the newest run under results/runs
BASELINE = "bf16"
N_BOOT = 2000  # paired-bootstrap resamples
EXPORT_DIR = None  # e.g. "results/tables" to write headline.{md,csv,tex}
print(f"results: {RESULTS}")"""),
    ("md", "## What is in these results"),
    ("code", """\
df = A.load_results(RESULTS)
df.groupby(["run_id", "model"])[["task", "kv"]].agg(lambda s: ", ".join(sorted(set(s))))"""),
    ("md", """\
## Headline: Δ vs BF16 with 95% CIs

One row per task (its primary metric) and format. `CI` says how the interval was computed:
`paired-bootstrap` from per-sample records, or `unpaired-normal` from the two standard errors
when a row has no per-sample records."""),
    ("code", """\
samples = A.load_samples(RESULTS)
cmp = A.compare(df, baseline=BASELINE, samples=samples, n_boot=N_BOOT)
headline = A.headline_table(cmp, baseline=BASELINE)
display(Markdown(A.to_markdown(headline)))"""),
    ("code", "A.plot_accuracy(df)"),
    ("md", """\
## Accuracy against memory

Δ vs BF16 in accuracy points over the KV cache's bits per element (log scale): BF16 16, FP8 8,
NVFP4 4.5 (4-bit codes + one FP8 scale per 16 values). Points near 0 at fewer bits are the win."""),
    ("code", "A.plot_delta_vs_bits(cmp, baseline=BASELINE)"),
    ("md", """\
## Fidelity diagnostics

Metrics that are not task accuracies (KL to the BF16 cache's next-token distribution, top-1
agreement, SQNR of K and V, attention-output error), when the sweep ran the `fidelity` task."""),
    ("code", """\
fidelity = cmp[~cmp["metric"].map(A.is_accuracy_metric)]
if fidelity.empty:
    print("No fidelity metrics in these results.")
else:
    table = fidelity.pivot_table(index=["model", "task", "metric"], columns="kv", values="value")
    display(table[[kv for kv in A.kv_order(fidelity) if kv in table.columns]].round(4))"""),
    ("md", "## Export"),
    ("code", """\
if EXPORT_DIR:
    A.to_markdown(headline, f"{EXPORT_DIR}/headline.md")
    A.to_csv(headline, f"{EXPORT_DIR}/headline.csv")
    A.to_latex(headline, f"{EXPORT_DIR}/headline.tex", caption="Accuracy by KV format", label="tab:kv")
    print(f"wrote {EXPORT_DIR}/headline.{{md,csv,tex}}")
else:
    print(A.to_latex(headline.head(6)))"""),
]

ERROR_ANATOMY: list[Cell] = [
    ("md", """\
# 02 · Error anatomy: where each KV format loses precision, on real K/V

Captures the **real** post-RoPE keys and values that attention consumes in the embedded model
(SmolLM2-135M-Instruct, 30 layers, 3 KV heads, head_dim 64) on a few hundred tokens of essay text,
round-trips them through each KV format (its own `quantize`/`dequantize`, one dynamic global
scale per layer for K and for V, as a single prefill write to the cache does), and shows

1. the distribution of the element errors per format,
2. SQNR per layer and per KV head, for K and V separately,
3. why keys and values behave differently: the per-channel magnitude of K and V.

Runs on CPU in well under a minute (model load ~1 s once converted, one forward pass)."""),
    ("code", """\
%matplotlib inline
import math

import numpy as np
import pandas as pd
import torch
from IPython.display import display
from matplotlib.figure import Figure

from nvfp4kv import analysis as A
from nvfp4kv.formats import available_formats, get_format
from nvfp4kv.metrics.capture import capture_attention
from nvfp4kv.metrics.layer_error import layer_errors, roundtrip
from nvfp4kv.metrics.text import essay_tokens
from nvfp4kv.models import ModelSpec, load_model

N_TOKENS = 256  # tokens of essay text in the captured forward (a multiple of 64: KIVI token groups)
FORMATS = ["fp8_e4m3", "nvfp4", "fp4_mx_block16", "mxfp4", "int4"]  # those registered are used
LAYER = None  # layer for the channel plots; None = the layer whose keys have the strongest outlier channel
RESULTS = A.default_results_path(required=False)  # optional: a sweep with fidelity per-layer SQNR
_ = torch.manual_seed(0)"""),
    ("md", "## Capture K/V from one forward pass"),
    ("code", """\
bundle = load_model(ModelSpec(device="cpu"))
ids = essay_tokens(bundle.tokenizer, N_TOKENS)
with capture_attention(bundle.model) as records, torch.no_grad():
    bundle.model(input_ids=torch.tensor([ids]), use_cache=False)
captured = dict(records)
layers = sorted(captured)
formats = {name: get_format(name) for name in FORMATS if name in available_formats()}
group = math.lcm(*(f.token_group for f in formats.values()))
T = (N_TOKENS // group) * group
K = torch.stack([captured[l].k[0, :, :T].float() for l in layers])  # [layer, head, token, dim]
V = torch.stack([captured[l].v[0, :, :T].float() for l in layers])
print(f"{len(layers)} layers, K/V {tuple(K.shape[1:])} per layer; formats: {', '.join(formats)}")"""),
    ("md", """\
## 1 · Error distribution

For every element, `|x̂ - x|` relative to the RMS of its layer's tensor, on a log scale. Elements
a format reproduces exactly are counted in the legend (they have no place on a log axis). FP8 E4M3
keeps 3 mantissa bits, E2M1 one, and INT4 is a uniform 16-level grid per group; the right tail is
where a block's scale, set by its largest element, leaves the other elements a coarse grid."""),
    ("code", """\
def roundtrip_layers(fmt, x):
    \"\"\"Each layer through the format separately (one dynamic global scale per layer).\"\"\"
    return torch.stack([roundtrip(fmt, x[i][None])[0] for i in range(x.shape[0])])

recon = {name: {"k": roundtrip_layers(fmt, K), "v": roundtrip_layers(fmt, V)} for name, fmt in formats.items()}

fig = Figure(figsize=(11, 3.8), layout="constrained")
axes = fig.subplots(1, 2, sharey=True)
bins = np.linspace(-6, 1, 71)
for ax, (kind, x) in zip(axes, (("k", K), ("v", V))):
    rms = x.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    for name in formats:
        err = ((recon[name][kind] - x).abs() / rms).flatten().numpy()
        exact = float((err == 0).mean())
        ax.hist(np.log10(err[err > 0]), bins=bins, histtype="step", lw=1.4, density=True,
                label=f"{name} (exact {exact:.0%})")
    ax.set_title(f"{kind.upper()}: element error / layer RMS")
    ax.set_xlabel("log10 |x̂ - x| / rms(x)")
    ax.legend(fontsize=7)
axes[0].set_ylabel("density")
fig"""),
    ("md", """\
## 2 · SQNR per layer and KV head

`sqnr_db = 10 log10(Σx² / Σ(x - x̂)²)` per layer × KV head over all captured tokens (from
`nvfp4kv.metrics.layer_error`, the code the sweep's `fidelity` task uses), and
`attn_rel_err`: the relative error of the attention output when only K (or only V) is quantized.
Each bit of mantissa is worth ~6 dB."""),
    ("code", """\
head_dim = K.shape[-1]
rows = []
for name, fmt in formats.items():
    for row in layer_errors(captured, fmt, fmt):
        rows.append({"kv": name, "bits_per_element": fmt.bits_per_element(head_dim), "model": bundle.name, **row})
per_layer = pd.DataFrame(rows).astype({"sqnr_db": float})
summary = per_layer.pivot_table(index="kv", columns="kind", values=["sqnr_db", "attn_rel_err"], aggfunc="mean")
display(summary.loc[A.kv_order(per_layer)].round(3))
A.plot_layer_sqnr(per_layer)"""),
    ("code", """\
fig = Figure(figsize=(10, 3.6), layout="constrained")
ax = fig.subplots()
for i, name in enumerate(A.kv_order(per_layer)):
    sub = per_layer[per_layer["kv"] == name].groupby(["kind", "layer"])["sqnr_db"].mean()
    ax.plot(sub["k"].index, sub["k"].values, "-", color=f"C{i}", label=f"{name} K")
    ax.plot(sub["v"].index, sub["v"].values, "--", color=f"C{i}", label=f"{name} V")
ax.set_xlabel("layer")
ax.set_ylabel("SQNR (dB, mean over heads)")
ax.set_title("SQNR by layer: keys solid, values dashed")
ax.legend(fontsize=7, ncol=len(formats))
fig"""),
    ("md", """\
## 3 · Why keys and values differ: outlier channels

Keys of many LLMs carry a few channels (head_dim coordinates) whose magnitude is far above the
rest on *every* token; values do not. A block-scaled format shares one scale among 16 (NVFP4,
block-16 FP4) or 32 (MXFP4) consecutive channels of a token, so a block holding an outlier channel
gets a large scale and its other channels a coarse grid. KIVI's INT4 quantizes keys per channel
for this reason. Below: per-channel max |x| over tokens and heads, and `max / median` of those
per-channel maxima per layer (how dominant the strongest channel is)."""),
    ("code", """\
def channel_amax(x):  # [layer, head, token, dim] -> [layer, dim]
    return x.abs().amax(dim=(1, 2))

k_amax, v_amax = channel_amax(K), channel_amax(V)
k_ratio = (k_amax.amax(dim=1) / k_amax.median(dim=1).values).numpy()
v_ratio = (v_amax.amax(dim=1) / v_amax.median(dim=1).values).numpy()
layer = int(np.argmax(k_ratio)) if LAYER is None else LAYER

fig = Figure(figsize=(12, 3.6), layout="constrained")
ax1, ax2, ax3 = fig.subplots(1, 3, width_ratios=[2, 2, 1.6])
channels = np.arange(K.shape[-1])
ax1.bar(channels, k_amax[layer].numpy(), color="C3")
ax1.set_title(f"layer {layers[layer]}: K per-channel max |k|")
ax2.bar(channels, v_amax[layer].numpy(), color="C0")
ax2.set_title(f"layer {layers[layer]}: V per-channel max |v|")
for ax in (ax1, ax2):
    ax.set_xlabel("channel (head_dim index)")
    for edge in range(16, K.shape[-1], 16):
        ax.axvline(edge - 0.5, color="grey", lw=0.6, ls=":")  # NVFP4 block boundaries
ax3.semilogy(layers, k_ratio, "C3-", label="K")
ax3.semilogy(layers, v_ratio, "C0--", label="V")
ax3.set_xlabel("layer")
ax3.set_title("max / median channel amax")
ax3.legend()
fig"""),
    ("code", """\
head = 0
fig = Figure(figsize=(11, 3.4), layout="constrained")
axes = fig.subplots(1, 2)
for ax, (kind, x) in zip(axes, (("K", K), ("V", V))):
    image = ax.imshow(x[layer, head].abs().T.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_title(f"|{kind}|, layer {layers[layer]}, head {head}: channels x tokens")
    ax.set_xlabel("token")
    ax.set_ylabel("channel")
    fig.colorbar(image, ax=ax, shrink=0.85)
fig"""),
    ("md", """\
What the outlier structure costs each format. Two columns to read:

- **SQNR K − V**: how much more a format loses on keys than on values *as tensors*. Each block of
  16 (NVFP4, block-16 FP4) or 32 (MXFP4) channels of a token takes its scale from its largest
  channel, so a block holding an outlier channel leaves its other channels a coarse grid; an FP8
  block scale (NVFP4) follows the block maximum more closely than a power-of-two one (MXFP4,
  block-16 FP4). KIVI's INT4 lays K and V out differently (keys per channel over groups of
  tokens, values per token), so its gap also reflects that choice.
- **attention error K / V**: the relative error of the attention output when only K (or only V)
  is quantized. The same tensor SQNR can cost more on keys: a key error shifts the logits
  `q·k / sqrt(d)` before the softmax, and the large key channels are where queries put their
  weight, while a value error is averaged by the attention weights."""),
    ("code", """\
tensor = per_layer.groupby(["kv", "kind"])[["sqnr_db", "attn_rel_err"]].mean().unstack()
gap = pd.DataFrame({
    "SQNR K (dB)": tensor[("sqnr_db", "k")], "SQNR V (dB)": tensor[("sqnr_db", "v")],
    "SQNR K - V (dB)": tensor[("sqnr_db", "k")] - tensor[("sqnr_db", "v")],
    "attention error K / V": tensor[("attn_rel_err", "k")] / tensor[("attn_rel_err", "v")],
})
gap.loc[A.kv_order(per_layer)].round(2)"""),
    ("md", "## The sweep's own per-layer SQNR (if the results include the fidelity task)"),
    ("code", """\
sweep_layers = A.load_per_layer(RESULTS) if RESULTS is not None else pd.DataFrame()
if sweep_layers.empty:
    print("No per-layer fidelity rows in the results; run a sweep with the fidelity task to compare.")
else:
    display(A.plot_layer_sqnr(sweep_layers))"""),
]

LONG_CONTEXT: list[Cell] = [
    ("md", """\
# 03 · Long context: retrieval over context length × needle depth

Pass-key retrieval is where a lossy KV cache should fail first: the answer is one sentence
stored thousands of tokens earlier and read back through the cache at every decode step. This
notebook reads the retrieval grids (`extra["grid"]` of each retrieval cell) and the per-trial
samples of a sweep, and shows accuracy per format over context length × depth, with **paired**
Δ vs BF16 per context length (every format sees identical prompts)."""),
    ("code", """\
%matplotlib inline
import pandas as pd
from IPython.display import Markdown, display

from nvfp4kv import analysis as A
from nvfp4kv.stats import format_delta

RESULTS = A.default_results_path()  # $NVFP4KV_RESULTS, else the newest run under results/runs
BASELINE = "bf16"
TASK = None  # a retrieval task name to restrict to (None: every task with a grid)
METRIC = "acc"  # the per-trial metric the grid aggregates
N_BOOT = 2000
print(f"results: {RESULTS}")"""),
    ("code", """\
grid = A.load_grid(RESULTS)
if TASK is not None:
    grid = grid[grid["task"] == TASK]
if grid.empty:
    raise ValueError(f"{RESULTS} holds no retrieval grid; run a sweep that includes the passkey task "
                     "(e.g. python -m experiments.run +sweep=long_context) or set TASK to one that has a grid.")
trials = grid.groupby(["model", "task", "kv"])["n"].sum().rename("trials")
trials.to_frame()"""),
    ("md", "## Accuracy per context length × depth"),
    ("code", "A.plot_retrieval_heatmaps(grid)"),
    ("code", """\
table = grid.pivot_table(index=["model", "task", "kv"], columns="context_len", values="acc", aggfunc="mean")
table = table.reindex(sorted(table.index, key=lambda i: A.kv_order(grid).index(i[2])))
table.round(3)"""),
    ("md", """\
## Accuracy vs context length

Pooled over depths; bands are Wilson 95% intervals for each format on its own. Whether two
formats differ is answered by the paired table below, not by overlapping bands."""),
    ("code", "A.plot_retrieval_by_length(grid)"),
    ("md", "## Paired Δ vs BF16 per context length and per depth"),
    ("code", """\
samples = A.load_samples(RESULTS)
tasks = sorted(grid["task"].unique())


def paired(by):
    \"\"\"Paired Δ vs the baseline per value of ``by``, in accuracy points, as a Markdown table.\"\"\"
    frames = [A.paired_by(samples, by, baseline=BASELINE, task=t, metric=METRIC, n_boot=N_BOOT) for t in tasks]
    out = pd.concat(frames, ignore_index=True)
    return pd.DataFrame({
        "model": out["model"], "task": out["task"], "kv": out["kv"], by: out[by],
        "acc %": 100 * out["value"], f"{BASELINE} acc %": 100 * out["baseline_value"],
        "Δ points [95% CI]": [format_delta(100 * d, 100 * lo, 100 * hi, 1)
                              for d, lo, hi in zip(out["delta"], out["ci_low"], out["ci_high"])],
        "p (McNemar)": out["p_mcnemar"], "paired trials": out["n"],
    })


display(Markdown(A.to_markdown(paired("context_len"), floatfmt=".3g")))"""),
    ("code", "display(Markdown(A.to_markdown(paired(\"depth\"), floatfmt=\".3g\")))"),
]

NOTEBOOKS: dict[str, list[Cell]] = {
    "01_overview.ipynb": OVERVIEW,
    "02_error_anatomy.ipynb": ERROR_ANATOMY,
    "03_long_context.ipynb": LONG_CONTEXT,
}


def build(cells: list[Cell]) -> nbformat.NotebookNode:
    """A notebook without outputs; the first code cell is tagged ``parameters``."""
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    tagged = False
    for index, (kind, source) in enumerate(cells):
        if kind == "md":
            cell = new_markdown_cell(source)
        else:
            cell = new_code_cell(source)
            if not tagged:
                cell.metadata["tags"] = ["parameters"]
                tagged = True
        cell["id"] = f"c{index:02d}"  # stable ids: rebuilding changes nothing unless the sources do
        nb.cells.append(cell)
    return nb


def render(name: str) -> str:
    """The exact text of a committed notebook."""
    return nbformat.writes(build(NOTEBOOKS[name]))


def main(argv: list[str]) -> int:
    """Write the notebooks; with ``--check``, only report whether the committed ones are current."""
    stale = []
    for name in NOTEBOOKS:
        path = HERE / name
        text = render(name)
        if "--check" in argv:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print(f"out of date (run python notebooks/_build.py): {', '.join(stale)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
