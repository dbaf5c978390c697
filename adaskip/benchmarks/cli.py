"""`adaskip bench kernels|e2e|speculative`: adaskip.cli calls `register(subparsers)`."""
from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUT_DIR = Path("bench/results")


def register(subparsers) -> argparse.ArgumentParser:
    """Adds `bench` with `kernels`, `e2e` and `speculative` under it; each sets `func` to its command."""
    from . import e2e, kernels, speculative

    bench = subparsers.add_parser("bench", help="speed benchmarks: kernels, end to end",
                                  description="Speed benchmarks. Results go to JSON (and a PNG plot for e2e): "
                                  "--out FILE, or a dated name in --out-dir (default ./bench/results).")
    sub = bench.add_subparsers(dest="bench_command", metavar="{kernels,e2e,speculative}", required=True)
    k = sub.add_parser("kernels", help="microbenchmarks of adaskip.ops against the copy-bandwidth ceiling",
                       description=kernels.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kernels.add_arguments(k)
    k.set_defaults(func=cmd_kernels)
    e = sub.add_parser("e2e", help="TTFT / TPOT of the full model, every strategy and budget, the ideal, and "
                       "HF transformers", description=e2e.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    e2e.add_arguments(e)
    e.set_defaults(func=cmd_e2e)
    s = sub.add_parser("speculative", help="lossless decoding's cost: draft and verify rounds against the full "
                       "model's step, and the acceptance that breaks even", description=speculative.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    speculative.add_arguments(s)
    s.set_defaults(func=cmd_speculative)
    return bench


def check_out(args) -> None:
    """Refuses, before any measurement, an --out that is a folder or whose folder cannot be made,
    and an --out-dir that is a file; makes the folder."""
    if args.out is not None:
        flag, path, folder = "--out", Path(args.out).expanduser(), Path(args.out).expanduser().parent
        if path.is_dir():
            raise ValueError(f"adaskip: --out {args.out} is a folder; expected a file name (or use --out-dir)")
    else:
        flag, path = "--out-dir", Path(args.out_dir or DEFAULT_OUT_DIR).expanduser()
        folder = path
        if path.exists() and not path.is_dir():
            raise ValueError(f"adaskip: --out-dir {path} is a file; expected a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, no permission
        raise ValueError(f"adaskip: {flag} {path}: cannot create the folder {folder} ({e.strerror or e})") from None


def _out_path(args, prefix: str, device: str) -> Path:
    from .common import output_path

    return output_path(args.out, args.out_dir, prefix, device, DEFAULT_OUT_DIR)


def cmd_kernels(args) -> dict:
    from . import kernels
    from .._util import write_json
    from .common import provenance

    check_out(args)
    started = provenance(getattr(args, "argv", None))  # the code that runs, before anything is written
    result = {**kernels.run(args), **started}
    print(f"wrote {write_json(_out_path(args, kernels.result_prefix(args), result['device']), result)}")
    return result


def cmd_e2e(args) -> dict:
    from . import e2e, report
    from .._util import write_json
    from .common import provenance

    check_out(args)
    started = provenance(getattr(args, "argv", None))  # the code that runs, before anything is written
    result = {**e2e.run(args), **started}
    out = _out_path(args, e2e.result_prefix(result), result["device"])
    if args.plot:
        result["plot"] = str(report.plot(result, out.with_suffix(".png")))
    print()
    print(report.markdown_tables(result))
    print(f"wrote {write_json(out, result)}")
    return result


def cmd_speculative(args) -> dict:
    from . import speculative
    from .._util import write_json
    from .common import provenance

    check_out(args)
    started = provenance(getattr(args, "argv", None))  # the code that runs, before anything is written
    result = {**speculative.run(args), **started}
    print()
    print(speculative.markdown_table(result))
    print(f"wrote {write_json(_out_path(args, speculative.result_prefix(result), result['device']), result)}")
    return result
