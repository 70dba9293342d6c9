"""Contention benchmark: every adapter method alone and beside a busy 2-thread torch process, in one run.

    python -m benchmarks.contention                          # 8 adapters × 32 layers, every method, alone + shared
    python -m benchmarks.contention --layers 8 --methods ctm:rank=16,knots --threads 2
    python -m benchmarks.contention --code .bench/before --label before --save .bench/contention/before.json
    python -m benchmarks.contention --before .bench/contention/before.json --write-docs     # and show it alongside

The adapters are benchmarks/scale.py's (Llama-7B-shaped, rank 16, bf16, cached in .bench/scale/). Each merge
runs in a fresh subprocess and reports the wall time of ``run_merge`` itself (imports excluded) and its CPU
time. "Shared" runs the same merge while a neighbour process (started and stopped by this benchmark) runs a
2-thread 512×512 float32 matmul loop, as another engineer's torch job would; the neighbour's matmuls per second
alone and beside the merges are reported too, so a merge that only looks fast by starving it would show.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.docs import write_section
from benchmarks.scale import generate, peak_rss_gib

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("task_arithmetic:rank=16,cat,mtc:rank=16,ctm:rank=16,core_space,knots,tsv,iso_c,iso_cts,linear_factors")

NEIGHBOUR = r"""
import signal, sys, time, torch
torch.set_num_threads(2)
a, b = torch.randn(512, 512), torch.randn(512, 512)
count, start = 0, time.perf_counter()
def stop(*_):
    print(count / (time.perf_counter() - start), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
while True:
    a @ b
    count += 1
"""


class Neighbour:
    """The 2-thread matmul loop, as a context manager; ``rate`` is its matmuls/s once stopped."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", NEIGHBOUR], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        time.sleep(1.0)  # let it reach its steady state
        return self

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        self.rate = float(out.strip().splitlines()[-1])


def child(args) -> dict:
    if args.code:  # another copy of the package (e.g. the old code), ahead of this checkout
        sys.path.insert(0, str(Path(args.code).resolve()))
    import yaml

    from lowrank_methods.engine import run_merge
    from lowrank_methods.recipe import parse_recipe

    recipe = parse_recipe(yaml.safe_dump({"merge_method": args.method, "models": [{"model": d} for d in args.dirs],
                                          "parameters": json.loads(args.params), "dtype": "float32"}))
    extra = {"threads": args.threads} if args.threads is not None else {}  # absent: the engine's default
    cpu0, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    report = run_merge(recipe, args.out, device=args.device, quiet=True, write_card=False, overwrite=True, **extra)
    seconds, cpu1 = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    import lowrank_methods.engine

    return {"seconds": seconds, "cpu_s": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime,
            "rss_gib": peak_rss_gib(), "modules": report.summary()["modules"], "engine": lowrank_methods.engine.__file__}


def run_child(method: str, params: dict, dirs: list[Path], out: Path, *, threads, device: str, timeout: float,
              env: dict[str, str], code: str | None) -> dict | None:
    cmd = [sys.executable, "-m", "benchmarks.contention", "--child", f"--method={method}", f"--out={out}",
           f"--params={json.dumps(params)}", f"--device={device}", *[f"--dir={d}" for d in dirs]]
    if threads is not None:
        cmd.append(f"--threads={threads}")
    if code:
        cmd.append(f"--code={code}")
    try:
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, **env})
    except subprocess.TimeoutExpired:
        return None  # reported as "> timeout"
    if result.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def parse_methods(text: str) -> list[tuple[str, str, dict]]:
    out = []
    for spec in filter(None, text.split(",")):
        method, _, rest = spec.partition(":")
        params = dict(kv.split("=") for kv in rest.split(";") if kv)
        params = {k: json.loads(v) if v[:1].isdigit() or v[:1] in "-[{" else v for k, v in params.items()}
        out.append((f"{method} {' '.join(f'{k}={v}' for k, v in params.items())}".strip(), method, params))
    return out


def foreign_load() -> dict:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "pytest_processes": sum("pytest" in line for line in ps)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--methods", default=METHODS, help="comma list of method[:k=v;k=v]")
    p.add_argument("--modes", default="alone,shared")
    p.add_argument("--threads", type=int, default=None, help="passed to run_merge (absent: the engine's default)")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE set for the merge subprocesses")
    p.add_argument("--device", default="cpu")
    p.add_argument("--code", default=None, help="directory holding another lowrank_methods package to run instead "
                   "(e.g. the old code: git archive HEAD lowrank_methods | tar -x -C .bench/before)")
    p.add_argument("--timeout", type=float, default=300, help="seconds before a merge is stopped and reported as >")
    p.add_argument("--label", default="after")
    p.add_argument("--save", default=None, help="write the measurements as JSON here")
    p.add_argument("--before", default=None, help="JSON saved by an earlier --save (the old code), shown alongside")
    p.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    # child mode
    p.add_argument("--child", action="store_true")
    p.add_argument("--method")
    p.add_argument("--out")
    p.add_argument("--dir", dest="dirs", action="append")
    p.add_argument("--params", default="{}")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return

    load_before = foreign_load()
    print(f"load before the run: {load_before}", flush=True)
    dirs = generate(ROOT / ".bench" / "scale" / f"{args.adapters}x{args.layers}" / "adapters", args.adapters, args.layers)
    work = ROOT / ".bench" / "contention"
    env = dict(kv.split("=", 1) for kv in args.env)
    modes = args.modes.split(",")
    methods = parse_methods(args.methods)
    t0 = time.perf_counter()
    rows: dict[str, dict] = {label: {"method": method} for label, method, _ in methods}

    def measure(mode: str):
        for label, method, params in methods:
            r = run_child(method, params, dirs, work / f"out-{method}", threads=args.threads, device=args.device,
                          timeout=args.timeout, env=env, code=args.code)
            rows[label][mode] = r
            shown = f"{r['seconds']:.1f} s (cpu {r['cpu_s']:.1f} s)" if r else f"> {args.timeout:.0f} s"
            print(f"{mode:6s} {label:24s} {shown}", flush=True)

    rates = {}
    if "alone" in modes:
        measure("alone")
    if "shared" in modes:
        with Neighbour() as n:  # its own rate alone, as the baseline
            time.sleep(5)
        rates["neighbour_alone"] = n.rate
        with Neighbour() as n:
            measure("shared")
        rates["neighbour_shared"] = n.rate
    run = {"label": args.label, "adapters": args.adapters, "layers": args.layers, "threads": args.threads,
           "code": args.code,
           "env": env, "command": "python -m benchmarks.contention " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}",
           "date": time.strftime("%Y-%m-%d %H:%M"), "load_before": load_before, "load_after": foreign_load(),
           "minutes": (time.perf_counter() - t0) / 60, "timeout": args.timeout, "rates": rates,
           "rows": list(rows.values()), "labels": list(rows)}
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(json.dumps(run, indent=1))
    before = json.loads(Path(args.before).read_text()) if args.before else None
    table = render(run, before)
    print(table)
    if args.write_docs:
        write_section("contention", f"## Contention: merging beside another torch process\n\n{table}")


def _cell(r: dict | None, timeout: float) -> str:
    return f"{r['seconds']:.1f}" if r else f"> {timeout:.0f}"


def _ratio(row: dict, timeout: float) -> str:
    alone, shared = row.get("alone"), row.get("shared")
    if not alone:
        return ""
    if not shared:
        return f"> {timeout / alone['seconds']:.1f}×"
    return f"{shared['seconds'] / alone['seconds']:.2f}×"


def describe(run: dict) -> str:
    env = " ".join(f"{k}={v}" for k, v in run["env"].items())
    return (f"`{(env + ' ') if env else ''}{run['command']}` ({run['date']}, {run['machine']}, "
            f"{run['minutes']:.1f} min; load average before {run['load_before']['loadavg']}, "
            f"{run['load_before']['pytest_processes']} pytest processes; neighbour "
            + (f"{run['rates']['neighbour_alone']:.0f} matmul/s alone, {run['rates']['neighbour_shared']:.0f} "
               "beside the merges)" if run["rates"] else "not run)"))


def render(run: dict, before: dict | None = None) -> str:
    lines = [f"{run['adapters']} adapters × {run['layers']} Llama-7B-shaped layers (benchmarks/scale.py's, rank 16, bf16), "
             "merged in float32. Each merge is a fresh process; seconds are `run_merge`'s wall time. *Shared*: beside "
             "a 2-thread torch process running a 512×512 matmul loop. CPU s = user + system seconds of the merge.", ""]
    head = "| method |"
    if before:
        head += " before: alone (s) | before: shared (s) | before: ratio |"
    head += " alone (s) | CPU s | shared (s) | ratio | peak RSS alone (GiB) |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    prior = {r["method"] + label: r for label, r in zip(before["labels"], before["rows"])} if before else {}
    for label, row in zip(run["labels"], run["rows"]):
        cells = [label]
        if before:
            b = prior.get(row["method"] + label, {})
            cells += [_cell(b.get("alone"), before["timeout"]) if "alone" in b else "–",
                      _cell(b.get("shared"), before["timeout"]) if "shared" in b else "–", _ratio(b, before["timeout"])]
        a = row.get("alone")
        cells += [_cell(a, run["timeout"]) if "alone" in row else "–", f"{a['cpu_s']:.1f}" if a else "",
                  _cell(row.get("shared"), run["timeout"]) if "shared" in row else "–", _ratio(row, run["timeout"]),
                  f"{a['rss_gib']:.2f}" if a else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Command: {describe(run)}."]
    if before:
        lines += [f"Before (the old engine, measured first): {describe(before)}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
