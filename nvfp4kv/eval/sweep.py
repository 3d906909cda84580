"""Run a sweep: every (task x KV config) cell for one model, resumable, into one run directory.

``python -m experiments.run +sweep=<name>`` composes a Hydra config (configs/) and calls
:func:`run_sweep`. The order of work is chosen so that mistakes cost seconds, not hours, and so
that a refused run leaves no trace:

1. **Plan** (:mod:`nvfp4kv.eval.plan`): validate everything that can be checked without the
   model (KV configs, task names and data, the model's location, the output directory).
2. **Identity** (:mod:`nvfp4kv.eval.identity`): a new run writes ``identity.json`` once; a
   resume must match it (and every finished cell must match its task and KV config), or it is
   refused before anything is written. Only then does ``run.log`` open.
3. **Load the model once** (:mod:`nvfp4kv.eval.loaded_model`) and check every KV format
   against its head_dim.
4. **Run the cells** of this shard. A cell whose JSON already exists is skipped (resume). Each
   finished cell is written atomically (samples, then the cell JSON as the commit marker).
5. **Rebuild the report** (results.csv, table.md, plots) from all cell files, under the run
   lock, also when a cell fails, so the run directory always shows what is done.

Stop reasons (finished / failed / interrupted / refused) go to ``run.log``; failures propagate,
so the CLI exits non-zero (a failed cell or a failed report is never exit 0).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import logging
import math
import shlex
import signal
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from nvfp4kv import results
from nvfp4kv.errors import ConfigError, DatasetNotFoundError, NVFP4KVError
from nvfp4kv.eval import identity as ident
from nvfp4kv.eval.loaded_model import (  # noqa: F401  (re-exported: the sweep's model API)
    _MODEL_CACHE,
    bits_per_element,
    check_block_sizes,
    check_model_fits,
    get_model,
    head_dim,
)
from nvfp4kv.eval.plan import (  # noqa: F401  (re-exported: configs, tests and notebooks use these)
    CONFIG_DIR,
    REPO_ROOT,
    RUNNER_TASK_KEYS,
    TASK_KIND_MODULES,
    TASK_VALIDATORS,
    SweepPlan,
    TaskPlan,
    _default_data_dir,
    available_kv_configs,
    available_sweeps,
    missing_sweep_message,
    plan_sweep,
    register_resolvers,
    resolve_config,
    resolve_runner,
)
from nvfp4kv.eval.rundir import locked, run_log

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- identity
def _hydra_overrides() -> list[str] | None:
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:  # pragma: no cover
        return None
    if not HydraConfig.initialized():
        return None
    return list(HydraConfig.get().overrides.task)


def _command(overrides: list[str] | None) -> str | None:
    return None if overrides is None else "python -m experiments.run " + " ".join(shlex.quote(o) for o in overrides)


def _existing_cells(plan: SweepPlan, model: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(cell id, stored cell, expected cell config) for every cell of this plan already on disk."""
    found = []
    for task in plan.tasks:
        for label, kv in plan.kvs.items():
            cid = results.cell_id(model, task.name, label)
            existing = results.read_cell(plan.run_dir, cid)
            if existing is not None:
                found.append((cid, existing, ident.cell_config(task, kv)))
    return found


def _legacy_run_id(cells: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> str | None:
    ids = {c.get("run_id") for _, c, _ in cells if c.get("run_id")}
    return sorted(ids)[0] if ids else None


def open_run(plan: SweepPlan, overrides: list[str] | None, provenance: Mapping[str, Any]) -> str:
    """Create the run's identity, or check a resume against it; returns the run id to use.

    Every check runs before anything is written, so a refused run changes no byte of its run
    directory. The identity is created under the run lock: shards starting together agree on one.
    """
    fields = ident.identity_fields(plan, provenance)
    command = _command(overrides)
    model = plan.model_spec.display_name
    if not plan.run_dir.exists():
        plan.run_dir.mkdir(parents=True, exist_ok=True)
    with locked(plan.run_dir):
        stored = ident.read_identity(plan.run_dir)
        cells = _existing_cells(plan, model)
        allowed: list[str] = []
        if stored is not None:
            allowed = ident.check_resume(stored, fields, plan.allow_identity_change, plan.run_dir)
        for cid, existing, expected in cells:
            ident.check_cell(existing, expected, cid, plan.run_dir)
        if stored is None:
            run_id = _legacy_run_id(cells) or plan.run_id
            plan_for_id = dataclasses.replace(plan, run_id=run_id)
            results.atomic_write_json(plan.run_dir / ident.IDENTITY_FILE, ident.new_identity(plan_for_id, fields, overrides))
            _write_sweep_yaml(plan, command)
            return run_id
        ident.record_resume(plan.run_dir, fields, allowed, overrides)
        return str(stored["run_id"])


def _write_sweep_yaml(plan: SweepPlan, command: str | None) -> None:
    header = "# Resolved sweep config of the invocation that created this run (identity.json has its identity).\n"
    if command is not None:
        header += f"# command: {command}\n"
    text = header + OmegaConf.to_yaml(OmegaConf.create(results.jsonable(plan.config)))
    results.atomic_write_text(plan.run_dir / "sweep.yaml", text)


# ---------------------------------------------------------------------------- cells
def _metric_dict(metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, m in metrics.items():
        value = getattr(m, "value", m)
        out[str(name)] = {
            "value": None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value),
            "stderr": None if getattr(m, "stderr", None) is None else float(m.stderr),
            "n": None if getattr(m, "n", None) is None else int(m.n),
        }
    return out


def _decorate_samples(samples: list[dict[str, Any]], task: str, kv: str, model: str,
                      run_id: str) -> list[dict[str, Any]]:
    """Add the keys RESULTS_LAYOUT promises: paired statistics match on (task, doc_id) within one run_id."""
    out = []
    for index, sample in enumerate(samples):
        record = {"doc_id": sample.get("doc_id", index), "task": task, "kv": kv, "model": model, "run_id": run_id}
        record.update({k: v for k, v in sample.items() if k not in record})
        record.setdefault("metrics", {})
        out.append(record)
    return out


@dataclass
class CellOutcome:
    cell_id: str
    status: str  # "done" | "skipped" | "failed"
    wall_s: float = 0.0
    error: str | None = None


def run_cell(plan: SweepPlan, bundle: Any, task: TaskPlan, label: str, provenance: Mapping[str, Any]) -> CellOutcome:
    """Run one cell (or skip it when its JSON exists) and write its files atomically."""
    kv = plan.kvs[label]
    cid = results.cell_id(bundle.name, task.name, label)
    expected = ident.cell_config(task, kv)
    existing = results.read_cell(plan.run_dir, cid)
    if existing is not None:  # written by another shard since open_run checked, or checked there
        ident.check_cell(existing, expected, cid, plan.run_dir)
        log.info("skip %s (already done)", cid)
        return CellOutcome(cid, "skipped")
    runner = resolve_runner(task.kind)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    log.info("start %s", cid)
    tic = time.perf_counter()
    outcome = runner(dict(task.config), bundle, kv, limit=task.limit, seed=plan.seed, progress=plan.progress)
    wall = time.perf_counter() - tic
    cell = {
        "cell_id": cid, "run_id": plan.run_id, "sweep": plan.sweep_name,
        "model": bundle.name, "task": task.name, "task_kind": task.kind, "kv": label,
        "kv_label": kv.label, "kv_config": kv.to_dict(), "bits_per_element": bits_per_element(kv, bundle.model),
        "engine": plan.engine.get("name", "none"), "engine_notes": plan.engine_notes.get(label, []),
        "task_config": task.config, "limit": task.limit, "seed": plan.seed,
        "model_spec": dataclasses.asdict(plan.model_spec), "device": str(getattr(bundle.model, "device", "")),
        "model_source": getattr(bundle, "source_info", None), "data": task.data, "config": plan.config,
        **provenance, "started": started, "wall_s": round(wall, 3),
        "metrics": _metric_dict(outcome.metrics), "n_samples": len(outcome.samples),
        "extra": outcome.extra, "cell_config": expected,
    }
    samples = _decorate_samples(list(outcome.samples), task.name, label, bundle.name, plan.run_id)
    results.write_cell(plan.run_dir, cell, samples)
    summary = ", ".join(f"{k}={v['value']:.4g}" for k, v in list(cell["metrics"].items())[:3] if v["value"] is not None)
    log.info("end %s in %.1f s: %s", cid, wall, summary)
    return CellOutcome(cid, "done", wall)


def shard_cells(plan: SweepPlan) -> list[tuple[TaskPlan, str]]:
    """This shard's cells: every ``num_shards``-th (task, kv) pair, in plan order."""
    cells = [(task, label) for task in plan.tasks for label in plan.kvs]
    return [cell for i, cell in enumerate(cells) if i % plan.num_shards == plan.shard]


def _report(plan: SweepPlan) -> None:
    from nvfp4kv.analysis import report  # records -> analysis -> results.csv, table.md, plots/

    title = f"{plan.sweep_name}: {plan.run_id}"
    with locked(plan.run_dir):  # shards finishing together: the last one sees every cell
        paths = report.write_report(plan.run_dir, baseline=plan.baseline, title=title)
    log.info("report: %s", ", ".join(str(p.relative_to(plan.run_dir)) for p in paths.values()))


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """A cluster scheduler stops a job with SIGTERM: treat it like Ctrl-C, so the stop is logged."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def resume_command(plan: SweepPlan, overrides: list[str] | None) -> str:
    """The command that resumes this run: the same overrides with ``run_dir`` pinned."""
    kept = [o for o in (overrides or [f"+sweep={plan.sweep_name}"]) if not o.startswith("run_dir=")]
    return _command([*kept, f"run_dir={plan.run_dir}"]) or ""


def run_sweep(cfg: DictConfig | Mapping[str, Any], overrides: list[str] | None = None) -> Path:
    """Run (or resume) a sweep; returns its run directory. See the module docstring for the steps."""
    from tqdm.auto import tqdm

    overrides = overrides if overrides is not None else _hydra_overrides()
    plan = plan_sweep(cfg)
    provenance = ident.collect_provenance()
    plan.run_id = open_run(plan, overrides, provenance)
    with run_log(plan.run_dir), _sigterm_as_interrupt():
        log.info("run %s (shard %d/%d) in %s", plan.run_id, plan.shard, plan.num_shards, plan.run_dir)
        if overrides is not None:
            log.info("command: %s", _command(overrides))
        outcomes: list[CellOutcome] = []
        stop = "failed"
        try:
            bundle = get_model(plan.model_spec)
            check_block_sizes(plan.kvs, bundle.model)
            cells = shard_cells(plan)
            bar = tqdm(cells, desc=f"sweep {plan.sweep_name}", unit="cell")
            for task, label in bar:
                bar.set_postfix_str(f"{task.name} / {label}")
                outcomes.append(_run_one(plan, bundle, task, label, provenance))
            bar.close()
            failed = [o for o in outcomes if o.status == "failed"]
            _report(plan)
            if failed:
                raise RuntimeError(
                    f"{len(failed)} cell(s) failed: " + "; ".join(f"{o.cell_id}: {o.error}" for o in failed)
                    + f". Finished cells are kept; fix the cause and resume with: {resume_command(plan, overrides)}"
                )
            stop = "finished"
        except KeyboardInterrupt:
            stop = "interrupted"
            log.error("interrupted; finished cells are kept. Resume with: %s", resume_command(plan, overrides))
            _report_quietly(plan)
            raise
        except NVFP4KVError as err:
            stop = "refused"
            log.error("refused: %s", err)
            raise
        except Exception as err:
            log.error("failed: %s: %s. Resume with: %s", type(err).__name__, err, resume_command(plan, overrides))
            _report_quietly(plan)
            raise
        finally:
            done = sum(o.status == "done" for o in outcomes)
            skipped = sum(o.status == "skipped" for o in outcomes)
            log.info("stop: %s (%d cells computed, %d already done, %d failed) -> %s", stop, done, skipped,
                     sum(o.status == "failed" for o in outcomes), plan.run_dir)
    return plan.run_dir


def _run_one(plan: SweepPlan, bundle: Any, task: TaskPlan, label: str, provenance: Mapping[str, Any]) -> CellOutcome:
    try:
        return run_cell(plan, bundle, task, label, provenance)
    except (ConfigError, DatasetNotFoundError):  # a config problem hits every cell: stop
        raise
    except Exception as err:
        cid = results.cell_id(bundle.name, task.name, label)
        if plan.fail_fast:
            raise
        log.exception("cell %s failed; continuing (fail_fast=false)", cid)
        return CellOutcome(cid, "failed", error=f"{type(err).__name__}: {err}")


def _report_quietly(plan: SweepPlan) -> None:
    """After a failure: rebuild the report of what is done, without masking the original error."""
    try:
        _report(plan)
    except Exception:
        log.exception("could not rebuild the report in %s", plan.run_dir)
