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
"""

from __future__ import annotations

import re
import sys
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig

from nvfp4kv.errors import NVFP4KVError
from nvfp4kv.eval.sweep import missing_sweep_message, run_sweep

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


if __name__ == "__main__":
    if not _sweep_given(sys.argv[1:]):
        print(missing_sweep_message(), file=sys.stderr)
        sys.exit(2)
    main()
