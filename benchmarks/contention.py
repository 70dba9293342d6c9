"""Contention benchmark: every adapter method alone and beside a busy 2-thread torch process, in one run.

    python -m benchmarks.contention                          # 8 adapters × 32 layers, every method, alone + shared
    python -m benchmarks.contention --layers 8 --methods ctm:rank=16,knots --threads 2
    python -m benchmarks.contention --code .bench/before --label before --save .bench/contention/before.json
    python -m benchmarks.contention --before .bench/contention/before.json --write-docs     # and show it alongside

The adapters are benchmarks/synthetic.py's (Llama-7B-shaped, rank 16, bf16, cached in .bench/scale/). Each merge
runs in a fresh subprocess and reports the wall time of ``run_merge`` itself (imports excluded) and its CPU
time. "Shared" runs the same merge while a neighbour process (started and stopped by this benchmark) runs a
2-thread 512×512 float32 matmul loop, as another engineer's torch job would; the neighbour's matmuls per second
alone and beside the merges are reported too, so a merge that only looks fast by starving it would show.

The machine may be shared with other people's jobs: before each merge the benchmark waits (``--wait-quiet``)
until other processes use under 0.15 of a core, measures how much CPU they used during the merge, and
measures a merge again (``--retries``) when it was more than a tenth of a core; what stays skewed is marked †.
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
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from benchmarks.docs import write_section
from benchmarks.scale import peak_rss_gib
from benchmarks.synthetic import write_adapters

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("task_arithmetic:rank=16,cat,mtc:rank=16,ctm:rank=16,core_space,knots,tsv,iso_c,iso_cts,linear_factors")

NEIGHBOUR = r"""
import signal, sys, time, torch
torch.set_num_threads(2)
a, b = torch.randn(512, 512), torch.randn(512, 512)
count = 0
def sample(*_):
    print(count, time.perf_counter(), flush=True)
signal.signal(signal.SIGUSR1, sample)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("ready", flush=True)
while True:
    a @ b
    count += 1
"""


class Neighbour:
    """The 2-thread matmul loop, as a context manager. ``busy`` accumulates its matmuls and seconds while merges
    run beside it (``measured`` brackets them), so ``rate()`` is its throughput beside the merges."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", NEIGHBOUR], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        time.sleep(1.0)  # let it reach its steady state
        self.busy = [0, 0.0]
        return self

    def sample(self) -> tuple[int, float]:
        self.proc.send_signal(signal.SIGUSR1)
        count, at = self.proc.stdout.readline().split()
        return int(count), float(at)

    @contextmanager
    def measured(self):
        c0, t0 = self.sample()
        yield
        c1, t1 = self.sample()
        self.busy = [self.busy[0] + c1 - c0, self.busy[1] + t1 - t0]

    def rate(self) -> float:
        return self.busy[0] / self.busy[1] if self.busy[1] else float("nan")

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.communicate(timeout=30)


def child(args) -> dict:
    if args.code:  # another copy of the package (e.g. the old code), ahead of this checkout
        sys.path.insert(0, str(Path(args.code).resolve()))
    import tempfile

    import yaml

    from lowrank_methods import load_recipe, run_merge  # the public API: the same in an older copy of the package

    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        yaml.safe_dump({"merge_method": args.method, "models": [{"model": d} for d in args.dirs],
                        "parameters": json.loads(args.params), "dtype": "float32"}, f)
    recipe = load_recipe(f.name)
    os.unlink(f.name)
    extra = {"threads": args.threads} if args.threads is not None else {}  # absent: the engine's default
    cpu0, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    report = run_merge(recipe, args.out, device=args.device, quiet=True, write_card=False, overwrite=True, **extra)
    seconds, cpu1 = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    import lowrank_methods

    whole = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": seconds, "process_cpu_s": whole.ru_utime + whole.ru_stime, "cpu_s": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime,
            "rss_gib": peak_rss_gib(), "modules": report.summary()["modules"], "package": lowrank_methods.__file__}


def busy_cpu_s() -> float:
    """CPU seconds spent by everything on the machine (all cores, not idle or waiting for I/O) since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_quiet(neighbour: "Neighbour | None", minutes: float, window: float = 5.0) -> float:
    """Wait (up to ``minutes``) until other processes use under 0.15 of a core over ``window`` seconds: on a
    machine shared with other people's test runs a time measured under their load is worthless. Returns the
    seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < 60 * minutes:
        busy0, own0 = busy_cpu_s(), resource.getrusage(resource.RUSAGE_SELF)
        theirs0 = process_cpu_s(neighbour.proc.pid) if neighbour else 0.0
        time.sleep(window)
        own1 = resource.getrusage(resource.RUSAGE_SELF)
        foreign = (busy_cpu_s() - busy0 - (process_cpu_s(neighbour.proc.pid) - theirs0 if neighbour else 0.0)
                   - (own1.ru_utime + own1.ru_stime - own0.ru_utime - own0.ru_stime))
        if foreign < 0.15 * window:
            break
    return time.perf_counter() - start


def run_child(method: str, params: dict, dirs: list[Path], out: Path, *, threads, device: str, timeout: float,
              env: dict[str, str], code: str | None, neighbour: "Neighbour | None" = None) -> dict | None:
    """One merge in a fresh process; ``foreign_cpu_s`` is the CPU time other processes (not it, not this
    benchmark, not the neighbour) used meanwhile: anything but ~0 means someone else's job skewed the time."""
    cmd = [sys.executable, "-m", "benchmarks.contention", "--child", f"--method={method}", f"--out={out}",
           f"--params={json.dumps(params)}", f"--device={device}", *[f"--dir={d}" for d in dirs]]
    if threads is not None:
        cmd.append(f"--threads={threads}")
    if code:
        cmd.append(f"--code={code}")
    busy0, own0 = busy_cpu_s(), resource.getrusage(resource.RUSAGE_SELF)
    theirs0 = process_cpu_s(neighbour.proc.pid) if neighbour else 0.0
    try:
        with neighbour.measured() if neighbour else nullcontext():
            result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                                    env={**os.environ, **env})
    except subprocess.TimeoutExpired:
        return None  # reported as "> timeout"
    if result.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{result.stderr[-3000:]}")
    r = json.loads(result.stdout.strip().splitlines()[-1])
    own1 = resource.getrusage(resource.RUSAGE_SELF)
    theirs = (process_cpu_s(neighbour.proc.pid) - theirs0) if neighbour else 0.0
    r["foreign_cpu_s"] = round(busy_cpu_s() - busy0 - r["process_cpu_s"] - theirs
                               - (own1.ru_utime + own1.ru_stime - own0.ru_utime - own0.ru_stime), 2)
    return r


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
    p.add_argument("--timeout", type=float, default=600, help="seconds before a merge is stopped and reported as >")
    p.add_argument("--shared-timeout", type=float, default=None, help="the same beside the neighbour (default: --timeout)")
    p.add_argument("--wait-quiet", type=float, default=20, metavar="MINUTES",
                   help="before each merge wait up to this long for other processes to go quiet (0: don't)")
    p.add_argument("--retries", type=int, default=2, help="times a merge skewed by foreign load is measured again")
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
    p.add_argument("--render", default=None, metavar="JSON",
                   help="measure nothing: show (and with --write-docs write) a run saved by --save")
    p.add_argument("--also", action="append", default=[], metavar="JSON",
                   help="other saved runs (other --threads, --env or --code) shown in a second table")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    run = json.loads(Path(args.render).read_text()) if args.render else measure_run(args, argv)
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(json.dumps(run, indent=1))
    before = json.loads(Path(args.before).read_text()) if args.before else None
    table = render(run, before, [json.loads(Path(a).read_text()) for a in args.also])
    print(table)
    if args.write_docs:
        write_section("contention", f"## Contention: merging beside another torch process\n\n{ABOUT}\n\n{table}")


ABOUT = """\
On a shared machine a merge must not fall over when another process is busy. On the CPU the engine merges
`--threads` modules at once (default: the cores this process may run on), each with ONE torch intra-op thread
(lowrank_methods/pipeline/threads.py): a module's linear algebra is many small ops (QR/SVD of ≤ Σr-wide cores, HOOI
iterations), and with intra-op parallelism each is an OpenMP region whose threads wait for each other, so a
descheduled thread stalls them all. Results reach the writer in plan order and the output is byte-identical
for every `--threads`.

*Before* is the engine as it was before that change (commit 25a1c6a: one module at a time with torch's default
intra-op threads), run from a copy: `git archive 25a1c6a lowrank_methods | tar -x -C .bench/before`, then
`--code .bench/before`. What the tables show: beside the neighbour the old engine lost 4× to over 26× (every
tiny op waited for a descheduled OpenMP thread); the new one gets its fair core and runs about 2× slower, and
alone it is faster too, since intra-op threads gained nothing on these ops (old engine, OMP_NUM_THREADS=1 ≈
new `--threads 1` ≈ the old default alone) while two modules at once use both cores. `--threads 3` on 2 cores
only takes a larger share from the neighbour; OMP_WAIT_POLICY=PASSIVE (threads sleep instead of spinning)
makes the old engine slower still. The neighbour's own throughput drops beside any merge, more beside the new
engine (to about a fifth, against a third beside the old one, in the runs below) since the merge now keeps its
core busy instead of stalling: the neighbour has the very problem fixed here (a 2-thread OpenMP loop over small
matmuls), and two one-thread workers are the fair share of a 2-core machine."""


def measure_run(args, argv) -> dict:
    load_before = foreign_load()
    print(f"load before the run: {load_before}", flush=True)
    dirs = write_adapters(ROOT / ".bench" / "scale" / f"{args.adapters}x{args.layers}" / "adapters", args.adapters,
                          args.layers)
    work = ROOT / ".bench" / "contention"
    env = dict(kv.split("=", 1) for kv in args.env)
    modes = args.modes.split(",")
    methods = parse_methods(args.methods)
    t0 = time.perf_counter()
    rows: dict[str, dict] = {label: {"method": method} for label, method, _ in methods}

    timeouts = {"alone": args.timeout, "shared": args.shared_timeout or args.timeout}

    def measure(mode: str, neighbour=None):
        for label, method, params in methods:
            for attempt in range(1 + args.retries):  # a merge someone else's job skewed is measured again
                waited = wait_quiet(neighbour, args.wait_quiet) if args.wait_quiet else 0.0
                r = run_child(method, params, dirs, work / f"out-{method}", threads=args.threads, device=args.device,
                              timeout=timeouts[mode], env=env, code=args.code, neighbour=neighbour)
                if r is None or not tainted(r):
                    break
                print(f"{mode:6s} {label:24s} {r['seconds']:.1f} s under foreign load "
                      f"({r['foreign_cpu_s']:.1f} CPU s), measuring again", flush=True)
            if r is not None:
                r |= {"attempts": attempt + 1, "waited_s": round(waited, 1)}
            rows[label][mode] = r
            shown = (f"{r['seconds']:.1f} s (cpu {r['cpu_s']:.1f} s, foreign cpu {r['foreign_cpu_s']:.1f} s)" if r
                     else f"> {timeouts[mode]:.0f} s")
            print(f"{mode:6s} {label:24s} {shown}", flush=True)

    rates = {}
    if "alone" in modes:
        measure("alone")
    if "shared" in modes:
        with Neighbour() as n:
            if args.wait_quiet:
                wait_quiet(n, args.wait_quiet)
            with n.measured():  # its own rate alone, as the baseline
                time.sleep(10)
            rates["neighbour_alone"] = n.rate()
            n.busy = [0, 0.0]
            measure("shared", n)
            rates["neighbour_shared"] = n.rate()
    run = {"label": args.label, "adapters": args.adapters, "layers": args.layers, "threads": args.threads,
           "code": args.code,
           "env": env, "command": "python -m benchmarks.contention " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}",
           "date": time.strftime("%Y-%m-%d %H:%M"), "load_before": load_before, "load_after": foreign_load(),
           "minutes": (time.perf_counter() - t0) / 60, "timeouts": timeouts, "rates": rates,
           "rows": list(rows.values()), "labels": list(rows)}
    return run


def _cell(row: dict, mode: str, run: dict) -> str:
    if mode not in row:
        return "–"
    r = row[mode]
    return (f"{r['seconds']:.1f}" + ("†" if tainted(r) else "")) if r else f"> {_timeouts(run)[mode]:.0f}"


def tainted(r: dict) -> bool:
    """Other processes used more than a tenth of a core (and 2 CPU s) during this merge."""
    return r.get("foreign_cpu_s", 0) > max(2.0, 0.1 * r["seconds"])


def _timeouts(run: dict) -> dict:
    return run.get("timeouts") or {"alone": run["timeout"], "shared": run["timeout"]}


def _ratio(row: dict, run: dict) -> str:
    alone, shared = row.get("alone"), row.get("shared")
    if not alone or "shared" not in row:
        return ""
    if not shared:
        return f"> {_timeouts(run)['shared'] / alone['seconds']:.0f}×"
    return f"{shared['seconds'] / alone['seconds']:.2f}×"


def foreign_total(run: dict) -> float:
    return sum(r[m].get("foreign_cpu_s", 0) for r in run["rows"] for m in ("alone", "shared") if r.get(m))


def describe(run: dict) -> str:
    env = " ".join(f"{k}={v}" for k, v in run["env"].items())
    return (f"`{(env + ' ') if env else ''}{run['command']}` ({run['date']}, {run['machine']}, "
            f"{run['minutes']:.1f} min; load average before {run['load_before']['loadavg']}, "
            f"{run['load_before']['pytest_processes']} pytest processes; other processes used "
            f"{max(0.0, foreign_total(run)):.1f} CPU s during the merges; neighbour "
            + (f"{run['rates']['neighbour_alone']:.0f} matmul/s alone, {run['rates']['neighbour_shared']:.0f} "
               "beside the merges)" if run["rates"] else "not run)"))


def setting(run: dict) -> str:
    parts = ["old engine" if run.get("code") else "new engine"]
    parts += [f"--threads {run['threads']}" if run.get("threads") else "default threads"] if not run.get("code") else []
    parts += [f"{k}={v}" for k, v in run["env"].items()]
    return ", ".join(parts)


def render(run: dict, before: dict | None = None, also: list[dict] = ()) -> str:
    lines = [f"{run['adapters']} adapters × {run['layers']} Llama-7B-shaped layers (benchmarks/synthetic.py's, rank 16, bf16), "
             "merged in float32. Each merge is a fresh process; seconds are `run_merge`'s wall time. *Shared*: beside "
             "a 2-thread torch process running a 512×512 matmul loop. CPU s = user + system seconds of the merge.", ""]
    head = "| method |"
    if before:
        head += " before: alone (s) | before: shared (s) | before: ratio |"
    head += " alone (s) | CPU s | shared (s) | ratio |" + (" peak RSS alone, before → after (GiB) |" if before
                                                             else " peak RSS alone (GiB) |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    prior = {r["method"] + label: r for label, r in zip(before["labels"], before["rows"])} if before else {}
    for label, row in zip(run["labels"], run["rows"]):
        cells = [label]
        if before:
            b = prior.get(row["method"] + label, {})
            cells += [_cell(b, "alone", before), _cell(b, "shared", before), _ratio(b, before)]
        a = row.get("alone")
        rss = f"{a['rss_gib']:.2f}" if a else ""
        if before and (prior.get(row["method"] + label) or {}).get("alone"):
            rss = f"{prior[row['method'] + label]['alone']['rss_gib']:.2f} → {rss}"
        cells += [_cell(row, "alone", run), f"{a['cpu_s']:.1f}" if a else "", _cell(row, "shared", run),
                  _ratio(row, run), rss]
        lines.append("| " + " | ".join(cells) + " |")
    if any(tainted(r) for x in (run, before) if x for row in x["rows"] for r in (row.get("alone"), row.get("shared")) if r):
        lines += ["", "† other processes (not the merge, not the neighbour) used over a tenth of a core during that merge: "
                  "its time is inflated by someone else's job."]
    lines += ["", f"Command: {describe(run)}."]
    if before:
        lines += ["", f"Before (the old engine, measured first): {describe(before)}."]
    if also:
        lines += ["", "Other settings, same adapters:", "",
                  "| setting | method | alone (s) | CPU s | shared (s) | ratio |", "|---|---|---|---|---|---|"]
        for other in also:
            for label, row in zip(other["labels"], other["rows"]):
                a = row.get("alone")
                lines.append(f"| {setting(other)} | {label} | {_cell(row, 'alone', other)} | "
                             f"{a['cpu_s']:.1f} | " if a else
                             f"| {setting(other)} | {label} | {_cell(row, 'alone', other)} | | ")
                lines[-1] += f"{_cell(row, 'shared', other)} | {_ratio(row, other)} |"
        lines += ["", "Commands: " + "; ".join(f"`{o['command']}` ({o['date']}, load average before "
                                               f"{o['load_before']['loadavg']}, other processes used "
                                               f"{max(0.0, foreign_total(o)):.1f} CPU s)" for o in also) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
