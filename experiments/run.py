"""Run a sweep: ``python -m experiments.run +sweep=<name> [overrides]``.

The sweep is *appended* (``+sweep=``) because configs/config.yaml has no default sweep. Examples::

    python -m experiments.run +sweep=smoke
    python -m experiments.run +sweep=gsm8k model=llama31_8b_instruct limit=200
    python -m experiments.run +sweep=mmlu model=local model.name_or_path=/models/x kvs.nvfp4.residual_length=64
    python -m experiments.run +sweep=gsm8k run_dir=results/runs/gsm8k/<id>    # resume
    python -m experiments.run -m +sweep=gsm8k model=llama31_8b_instruct,qwen3_8b   # multirun
    python -m experiments.run -m +sweep=gsm8k hydra/launcher=slurm ...   # SLURM (hydra-submitit-launcher)

Results land in ``run_dir`` (default ``results/runs/<sweep>/<timestamp>-<random>``); see
nvfp4kv/eval/sweep.py for what a run does and nvfp4kv/results.py for the files it writes.

A bad value fails before torch or lm-eval are imported: Hydra composes the config through the
schemas of :mod:`nvfp4kv.config` (a wrong type, a value outside a closed choice, an unknown key),
then :func:`nvfp4kv.config.check.check_config` checks ranges and KV format names. Either way the
error is one line on stderr naming the key and the allowed values, exit code 2 (``debug=true`` or
``HYDRA_FULL_ERROR=1``: with the traceback). Only then is the sweep runner imported.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig

from nvfp4kv.config.check import check_config, describe_error, resolve_config  # torch-free
from nvfp4kv.config.resolvers import missing_sweep_message
from nvfp4kv.errors import NVFP4KVError

#: flags with which Hydra does not run the task (help, config printing, shell completion)
_NO_RUN_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc",
                 "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"}
_SWEEP_OVERRIDE = re.compile(r"^\+{0,2}sweep(@[^=]*)?=")


def _sweep_given(argv: list[str]) -> bool:
    """Whether the command line selects a sweep, or asks Hydra for something other than a run.

    Checked before Hydra starts: Hydra would otherwise create the run directory and then fail on
    the unresolvable ``${sweep.name}`` with a long traceback instead of the list of sweeps.
    """
    if any(arg.split("=", 1)[0] in _NO_RUN_FLAGS for arg in argv):
        return True
    return any(_SWEEP_OVERRIDE.match(arg) for arg in argv)


#: ``../configs`` as an absolute path: Hydra resolves a relative config_path against the *module*
#: when run.py is imported (tests, other scripts), where ``configs`` is not a package.
CONFIG_PATH = str(Path(__file__).resolve().parents[1] / "configs")


#: exit codes: 0 finished, 1 a cell or the report failed, 2 a user error (bad config, missing data,
#: refused resume), 130 interrupted (resume with the command run.log prints)
EXIT_FAILED, EXIT_USER_ERROR, EXIT_INTERRUPTED = 1, 2, 130


@hydra.main(config_path=CONFIG_PATH, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    debug = bool(cfg.get("debug", False))
    try:
        check_config(resolve_config(cfg))  # cheap, before torch: a bad value costs a second
        from nvfp4kv.eval.sweep import run_sweep  # imports torch, transformers (lm-eval: per task kind)

        run_dir = run_sweep(cfg)
    except NVFP4KVError as err:  # user-actionable: one line naming the fix, no traceback
        if debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted: finished cells are kept; run.log in the run directory says how to resume.",
              file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception:  # a bug or a failed cell/report: the traceback is the useful part
        traceback.print_exc()
        sys.exit(EXIT_FAILED)
    print(f"results: {run_dir}")


def _debug_requested(argv: list[str]) -> bool:
    return any(arg.lstrip("+") in ("debug=true", "debug=True") for arg in argv)


def cli(argv: list[str] | None = None) -> None:
    """``python -m experiments.run``: Hydra's run, with composition errors (a bad override, a config
    that does not exist) as one line and exit code 2 instead of Hydra's report and exit code 1."""
    argv = sys.argv[1:] if argv is None else argv
    if not _sweep_given(argv):
        print(missing_sweep_message(), file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    user_full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises composition errors instead of printing them
    try:
        main()
    except Exception as err:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if not isinstance(err, (HydraException, OmegaConfBaseException)) or user_full_error:
            raise
        if _debug_requested(argv):
            traceback.print_exc()
        print(f"error: {describe_error(err)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    finally:
        if not user_full_error:
            os.environ.pop("HYDRA_FULL_ERROR", None)


if __name__ == "__main__":
    cli()
