"""Turn a pytest-benchmark JSON file into a Markdown table of medians and ratios.

    python benchmarks/report.py RESULTS.json [--baseline reference]

Benchmarks are grouped by their ``group``; within a group each row is one
``extra_info["impl"]`` with its median, interquartile range and the speed-up
over the group's baseline, all from the same run. The header names the machine.
"""
import argparse
import json
import platform
from collections import defaultdict


def machine_line(info: dict) -> str:
    """One line naming the machine and versions, from pytest-benchmark's machine_info."""
    cpu = info.get("cpu", {}).get("brand_raw") or platform.processor() or "unknown CPU"
    return f"{cpu}, {info.get('cpu', {}).get('count', '?')} logical cores, Python {info.get('python_version', '?')}"


def markdown(data: dict, default_baseline: str = "reference") -> str:
    """The Markdown table for a loaded pytest-benchmark JSON document."""
    groups = defaultdict(dict)
    baselines = {}
    for bench in data["benchmarks"]:
        extra = bench.get("extra_info", {})
        groups[bench["group"]][extra.get("impl", bench["name"])] = bench["stats"]
        baselines[bench["group"]] = extra.get("baseline", default_baseline)
    lines = [
        f"Machine: {machine_line(data.get('machine_info', {}))}; {data.get('datetime', '')}",
        "",
        "| case | implementation | median ms | IQR ms | speed-up vs baseline |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for group in sorted(groups):
        impls = groups[group]
        base = impls.get(baselines[group])
        for impl, stats in impls.items():
            ratio = f"{base['median'] / stats['median']:.1f}x" if base else "n/a"
            lines.append(
                f"| {group} | {impl} | {stats['median'] * 1e3:.2f} | {stats['iqr'] * 1e3:.2f} | {ratio} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json_file")
    parser.add_argument("--baseline", default="reference")
    args = parser.parse_args()
    with open(args.json_file) as fh:
        print(markdown(json.load(fh), args.baseline))


if __name__ == "__main__":
    main()
