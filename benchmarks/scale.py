"""Scale benchmark: Llama-7B-shaped LoRA adapters merged by our methods and by PEFT, in one run.

    python -m benchmarks.scale                       # 8 adapters, 32 layers, our methods + PEFT svd on 1 layer
    python -m benchmarks.scale --adapters 4 --methods task_arithmetic --peft-layers 1 --write-docs

Each merge runs in a fresh subprocess, which reports its wall time and peak RSS (ru_maxrss). The
adapters (benchmarks/synthetic.py: rank 16, bfloat16, decaying spectra, partly shared subspaces) are generated
once into .bench/ and reused. PEFT's add_weighted_adapter needs the base model in memory and a dense SVD per
module, so it runs on the first `--peft-layers` decoder layers and its time is extrapolated ×32/layers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.docs import write_section
from benchmarks.synthetic import RANK, write_adapters

ROOT = Path(__file__).resolve().parents[1]


def slice_layers(dirs: list[Path], root: Path, n_layers: int) -> list[Path]:
    """The same adapters restricted to the first n_layers (for PEFT, which needs the base model in memory)."""
    from safetensors.torch import load_file, save_file

    out = []
    for d in dirs:
        s = root / d.name
        if not (s / "adapter_model.safetensors").exists():
            keep = {k: v for k, v in load_file(str(d / "adapter_model.safetensors")).items()
                    if int(k.split(".layers.")[1].split(".")[0]) < n_layers}
            s.mkdir(parents=True, exist_ok=True)
            save_file(keep, str(s / "adapter_model.safetensors"), metadata={"format": "pt"})
            (s / "adapter_config.json").write_text((d / "adapter_config.json").read_text())
        out.append(s)
    return out


def peak_rss_gib() -> float:
    """This process's peak resident set (VmHWM): unlike ru_maxrss it starts afresh at exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# -- children (run in fresh processes) ------------------------------------------------------------------
def child_ours(args) -> dict:
    import yaml

    from lowrank_methods.pipeline.engine import run_merge
    from lowrank_methods.pipeline.recipe import parse_recipe

    params = json.loads(args.params)
    recipe = parse_recipe(yaml.safe_dump({"merge_method": args.method, "models": [{"model": d} for d in args.dirs],
                                          "parameters": params, "dtype": "float32"}))
    start = time.perf_counter()
    report = run_merge(recipe, args.out, device=args.device, quiet=True, write_card=False, overwrite=True)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rss_gib": peak_rss_gib(),
            "summary": report.summary()}


def child_peft(args) -> dict:
    import transformers
    from peft import PeftModel

    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers,
                                      num_attention_heads=32, vocab_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    names = [f"a{i}" for i in range(len(args.dirs))]
    model = PeftModel.from_pretrained(model, args.dirs[0], adapter_name=names[0])
    for name, d in zip(names[1:], args.dirs[1:]):
        model.load_adapter(d, adapter_name=name)
    start = time.perf_counter()
    model.add_weighted_adapter(names, [1.0] * len(names), "merged", combination_type=args.method, svd_rank=RANK,
                               svd_full_matrices=False, density=0.2 if "ties" in args.method else None)
    seconds = time.perf_counter() - start
    model.save_pretrained(args.out, selected_adapters=["merged"])
    return {"seconds": seconds, "rss_gib": peak_rss_gib()}


def relative_error(dirs: list[Path], merged: Path, n_layers: int) -> float:
    """max over modules of ‖ΔW_merged − Σ_t ΔW_t‖_F / ‖Σ_t ΔW_t‖_F on the first n_layers (dense, float64)."""
    from lowrank_methods.formats.peft import AdapterSource

    sources = [AdapterSource.open(d) for d in dirs]
    out = AdapterSource.open(merged)
    worst = 0.0
    for module in out.modules:
        if int(module.split(".layers.")[1].split(".")[0]) >= n_layers:
            continue
        exact = sum(s.read_module(module, torch.float64).dense() for s in sources)
        got = out.read_module(module, torch.float64).dense()
        worst = max(worst, float((got - exact).norm() / exact.norm()))
    return worst


def run_child(kind: str, method: str, dirs: list[Path], out: Path, **extra) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.scale", f"--child={kind}", f"--method={method}", f"--out={out}",
           *[f"--dir={d}" for d in dirs], *[f"--{k}={v}" for k, v in extra.items()]]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{kind} {method} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--methods", default="task_arithmetic:rank=16,cat")
    p.add_argument("--peft", default="svd", help="comma list of PEFT combination types ('' to skip)")
    p.add_argument("--peft-layers", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", default=str(ROOT / ".bench" / "scale"))
    p.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    p.add_argument("--max-rss-gib", type=float, default=None,
                   help="fail if any of our merges peaks above this resident memory (the memory bound under test)")
    # child mode
    p.add_argument("--child", choices=["ours", "peft"])
    p.add_argument("--method")
    p.add_argument("--out")
    p.add_argument("--dir", dest="dirs", action="append")
    p.add_argument("--params", default="{}")
    args = p.parse_args(argv)
    if args.child:
        torch.set_num_threads(torch.get_num_threads())
        print(json.dumps(child_ours(args) if args.child == "ours" else child_peft(args)))
        return

    work = Path(args.work) / f"{args.adapters}x{args.layers}"
    t0 = time.perf_counter()
    dirs = write_adapters(work / "adapters", args.adapters, args.layers)
    size = sum((d / "adapter_model.safetensors").stat().st_size for d in dirs)
    print(f"{args.adapters} adapters × {args.layers} layers, {size / 1e6:.0f} MB of safetensors "
          f"(generated/cached in {time.perf_counter() - t0:.0f} s)", flush=True)
    rows = []
    for spec in filter(None, args.methods.split(",")):
        method, _, rest = spec.partition(":")
        params = dict(kv.split("=") for kv in rest.split(";") if kv)
        params = {k: json.loads(v) if v[:1].isdigit() or v[:1] in "-[{" else v for k, v in params.items()}
        out = work / f"out-{method}"
        r = run_child("ours", method, dirs, out, params=json.dumps(params), device=args.device)
        err = relative_error(dirs, out, args.peft_layers) if method in ("task_arithmetic", "mtc", "cat") else None
        rows.append({"method": f"{method} {json.dumps(params) if params else ''}".strip(), "layers": args.layers,
                     "seconds": r["seconds"], "rss_gib": r["rss_gib"], "full_model_s": r["seconds"], "error": err})
        print(rows[-1], flush=True)
    peft_dirs = slice_layers(dirs, work / f"slice{args.peft_layers}", args.peft_layers) if args.peft else []
    for combo in filter(None, args.peft.split(",")):
        out = work / f"out-peft-{combo}"
        r = run_child("peft", combo, peft_dirs, out, layers=args.peft_layers)
        err = relative_error(peft_dirs, out / "merged", args.peft_layers) if combo == "svd" else None
        scale = args.layers / args.peft_layers
        rows.append({"method": f"PEFT add_weighted_adapter {combo}", "layers": args.peft_layers, "seconds": r["seconds"],
                     "rss_gib": r["rss_gib"], "full_model_s": r["seconds"] * scale, "error": err})
        print(rows[-1], flush=True)
    table = render(rows, args, size)
    print(table)
    if args.write_docs:
        write_docs(table)
    over = [r for r in rows if args.max_rss_gib and not r["method"].startswith("PEFT") and r["rss_gib"] > args.max_rss_gib]
    if over:
        sys.exit(f"peak RSS above {args.max_rss_gib} GiB: " + ", ".join(f"{r['method']} {r['rss_gib']:.2f} GiB" for r in over))


def render(rows: list[dict], args, size: int) -> str:
    peft = next((r for r in rows if r["method"].startswith("PEFT") and "svd" == r["method"].split()[-1]), None)
    lines = [f"{args.adapters} adapters × {args.layers} Llama-7B-shaped layers (q,k,v,o 4096², gate/up 11008×4096, "
             f"down 4096×11008), rank {RANK}, bf16: {size / 1e6:.0f} MB of safetensors; {torch.get_num_threads()} CPU threads.",
             "", "| method | layers run | time (s) | whole model (s) | peak RSS (GiB) | rel. error vs exact (layer 0) | speed-up vs PEFT svd |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{peft['full_model_s'] / r['full_model_s']:.0f}×" if peft and not r["method"].startswith("PEFT") else ""
        err = f"{r['error']:.4f}" if r["error"] is not None else ""
        extrapolated = f"{r['full_model_s']:.1f}" + (" (extrapolated)" if r["layers"] != args.layers else "")
        lines.append(f"| {r['method']} | {r['layers']} | {r['seconds']:.2f} | {extrapolated} | {r['rss_gib']:.2f} | {err} | {ratio} |")
    return "\n".join(lines)


def write_docs(table: str) -> None:
    command = "python -m benchmarks.scale " + " ".join(sys.argv[1:])
    write_section("scale", f"## Scale: Llama-7B-shaped adapters\n\nCommand: `{command}`\n\n{table}")


if __name__ == "__main__":
    main()
