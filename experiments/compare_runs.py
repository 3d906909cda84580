"""Check that two runs hold the same records: ``python -m experiments.compare_runs RUN_A RUN_B``.

Exit 0 when every cell's metrics and per-sample records are identical (run ids, timestamps and
wall times aside), 1 otherwise, listing the differences. CI uses it to show that the smoke sweep
run through ``hydra/launcher=submitit_local`` (cells as separate jobs, one run dir) equals the
in-process run.
"""

from __future__ import annotations

import argparse
import sys

from nvfp4kv.analysis.same_records import record_differences


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("--metrics-rel-tol", type=float, default=0.0,
                        help="let cell aggregates differ by this relative amount (samples stay exact); "
                             "for runs of different harness versions, e.g. 1e-12")
    args = parser.parse_args(argv)
    differences = record_differences(args.run_a, args.run_b, metrics_rel_tol=args.metrics_rel_tol)
    if differences:
        print(f"records differ between {args.run_a} and {args.run_b}:", *differences, sep="\n  ", file=sys.stderr)
        return 1
    print(f"identical records: {args.run_a} == {args.run_b}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
