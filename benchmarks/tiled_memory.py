"""Peak memory and time of translating one large image untiled vs tiled (`pipeline.translate --tile`).

    python benchmarks/tiled_memory.py [--size 1024x768] [--tiles 256,128] [--generator resnet_9blocks]
                                      [--ngf 64] [--device auto] [--json out.json] [--smoke]

Each case runs in its own process, so its peak is its own: peak RSS (CPU) above the process's RSS once the
generator and the image are loaded, and on CUDA `torch.cuda.max_memory_allocated` of the forward pass. The
generator is a freshly initialised one of the given architecture (memory and time do not depend on the weights).
Every tiled row also reports its largest difference from the untiled output (in [-1, 1]). Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from _report import run_child, write_json

ROOT = Path(__file__).resolve().parent.parent


def _rss_gb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def child(args: argparse.Namespace) -> None:
    """One case in this process: prints a JSON row; saves the output for the comparison."""
    import torch

    from pipeline.gan.networks import build_generator, use_group_kernel_instance_norm
    from pipeline.infer.generators import PaddedGenerator, required_multiple
    from pipeline.infer.translate import select_device, translate_tiled

    device = select_device(args.device)
    torch.manual_seed(0)
    net = build_generator(args.generator, ngf=args.ngf, init_gain=0.3).eval()
    if device.type == "cpu":
        use_group_kernel_instance_norm(net)  # The kernel translate uses on CPU.
    net = net.to(device)
    width, height = map(int, args.size.split("x"))
    x = torch.rand(3, height, width, generator=torch.Generator().manual_seed(1)) * 2 - 1
    multiple = required_multiple(args.generator)
    base = _rss_gb()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with torch.no_grad():
        if args.case_tile:
            out = next(translate_tiled(net, multiple, [("x", x)], device, args.case_tile))[1]
        else:
            out = PaddedGenerator(net, multiple)(x[None].to(device))[0].float().cpu()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    row = {"size": args.size, "generator": args.generator, "ngf": args.ngf, "device": device.type,
           "mode": "tiled" if args.case_tile else "untiled", "tile": args.case_tile, "seconds": seconds,
           "peak_rss_gb": peak, "added_rss_gb": peak - base}
    if device.type == "cuda":
        row["cuda_peak_gb"] = (torch.cuda.max_memory_allocated() - cuda_base) / 2**30
    torch.save(out, args.case_out)
    print(json.dumps(row))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1024x768", help="WIDTHxHEIGHT of the image")
    parser.add_argument("--tiles", default="256,128")
    parser.add_argument("--generator", default="resnet_9blocks")
    parser.add_argument("--ngf", type=int, default=64)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "tiled_memory.json")
    parser.add_argument("--smoke", action="store_true", help="a tiny case (CI)")
    parser.add_argument("--case-tile", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--case-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.tiles, args.ngf, args.generator = "100x70", "32", 4, "resnet_6blocks"
    if args.case_tile is not None:
        child(args)
        return 0

    import torch

    rows = []
    outputs = {}
    with __import__("tempfile").TemporaryDirectory() as tmp:
        for tile in [0, *map(int, args.tiles.split(","))]:
            out = Path(tmp) / f"out-{tile}.pt"
            cmd = [sys.executable, __file__, "--size", args.size, "--generator", args.generator, "--ngf",
                   str(args.ngf), "--device", args.device, "--case-tile", str(tile), "--case-out", str(out)]
            proc = run_child(cmd, cwd=ROOT)
            if proc.returncode != 0:
                raise SystemExit(f"case tile={tile} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            outputs[tile] = torch.load(out)
            if tile:
                row["max_abs_diff"] = (outputs[tile] - outputs[0]).abs().max().item()
            rows.append(row)
    untiled = rows[0]
    print(f"{args.generator} ngf {args.ngf}, one {args.size} image on {untiled['device']}:")
    print(f"{'mode':>14}{'seconds':>9}{'peak RSS':>10}{'added':>8}" + ("   CUDA peak" if "cuda_peak_gb" in untiled
                                                                         else "") + "  max |diff|")
    for row in rows:
        mode = f"tile {row['tile']}" if row["tile"] else "untiled"
        cuda = f"{row['cuda_peak_gb']:>9.2f} GB" if "cuda_peak_gb" in row else ""
        diff = f"{row['max_abs_diff']:.1e}" if "max_abs_diff" in row else "-"
        print(f"{mode:>14}{row['seconds']:>9.1f}{row['peak_rss_gb']:>8.2f}GB{row['added_rss_gb']:>6.2f}GB{cuda}"
              f"  {diff}")
    write_json(args.json, {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
