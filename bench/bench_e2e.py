#!/usr/bin/env python3
"""End-to-end speed of the adaskip runtime, its skipping strategies and HF transformers, side by
side in one run: `adaskip bench e2e` (adaskip/benchmarks/e2e.py) with this script's defaults:
the JSON (and the plot next to it) goes to bench/results/e2e-<config>-<device>-<date>.json on a
GPU, nowhere on a CPU unless --out is given.

    python bench/bench_e2e.py [--config llama-3.1-8b] [--contexts 8192,32768] [--budgets 8,16] [--out FILE]

On a CPU machine the defaults shrink to a tiny config (a smoke run, not a performance figure).
"""
from __future__ import annotations

import argparse

import torch
from common import RESULTS  # also puts the checkout on sys.path

from adaskip.benchmarks import e2e, report
from adaskip.benchmarks.common import output_path, write_json


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    e2e.add_arguments(p)
    args = p.parse_args(argv)
    try:
        result = e2e.run(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"adaskip: {e}") from None
    prefix = e2e.result_prefix(result)
    # A GPU run is a measurement worth keeping: into bench/results by default. A CPU run is not.
    out = output_path(args.out, args.out_dir, prefix, result["device"],
                      RESULTS if torch.cuda.is_available() else None)
    if out is not None and args.plot:
        result["plot"] = str(report.plot(result, out.with_suffix(".png")))
    print()
    print(report.markdown_tables(result))
    if out is not None:
        write_json(out, result)


if __name__ == "__main__":
    main()
