"""Expressions per second of eval.py with the tiny model on a synthetic OmniAVS set, 1 process against 2.

The baseline of the ratios is the 1-process run with the default number of threads, in the same invocation. "Wall"
counts the whole command (start-up, model loading, metrics); "loop" the slowest process's inference and scoring.
On CPU, two processes go through torchrun and gloo (eval.py's docstring), each on one thread. Each configuration runs
`--repeats` times, interleaved with the others so that background load spreads over all; medians are printed.

    python benchmarks/eval_throughput.py [--videos 16] [--max-new-tokens 8] [--repeats 3]
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
from transformers import AutoModel, AutoProcessor

from oisa_cli.main import main as oisa_main
from processing_oisa.data.synthetic import make_synthetic_dataset


EVAL_SCRIPT = Path(__file__).resolve().parents[1] / "eval.py"


def seg_checkpoint(folder: Path) -> Path:
    """The tiny random model pushed to answer `[SEG]`, so that every expression runs the mask head."""
    oisa_main(["tiny-random", str(folder / "random")])
    model = AutoModel.from_pretrained(folder / "random", dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[model.config.seg_token_id] += 50.0
    model.save_pretrained(folder / "seg")
    AutoProcessor.from_pretrained(folder / "random").save_pretrained(folder / "seg")
    return folder / "seg"


def run(processes: int, threads: int | None, eval_args: list[str], out: Path) -> tuple[float, float, int]:
    """(wall seconds, slowest process's loop seconds, expressions) of one eval.py run."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if processes == 1:
        command = [sys.executable, str(EVAL_SCRIPT)]
    else:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if not torch.cuda.is_available():
            env["ACCELERATE_USE_CPU"] = "1"
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), str(EVAL_SCRIPT),
        ]
    start = time.perf_counter()
    subprocess.run([*command, *eval_args, "--out", str(out)], env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    loop = 0.0
    for path in out.glob("results-*.jsonl"):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        loop = max(loop, sum(line["seconds"] for line in lines))
    return wall, loop, json.loads((out / "metrics.json").read_text())["num_expressions"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp())
    checkpoint = seg_checkpoint(workdir)
    data = workdir / "omniavs"
    make_synthetic_dataset(data, "omniavs", num_videos=args.videos, seed=0)
    eval_args = ["--model", str(checkpoint), "--dataset", "omniavs", "--data-root", str(data),
                 "--max-new-tokens", str(args.max_new_tokens)]
    configurations = [
        ("1 process", 1, None),
        ("1 process, 1 thread", 1, 1),
        ("2 processes, 1 thread each", 2, 1),
    ]
    timings: dict[str, list[tuple[float, float, int]]] = {name: [] for name, _, _ in configurations}
    for _ in range(args.repeats):
        for name, processes, threads in configurations:
            out = workdir / "out"
            timings[name].append(run(processes, threads, eval_args, out))
            shutil.rmtree(out)
    rows = [
        (name, median(t[0] for t in runs), median(t[1] for t in runs), runs[0][2]) for name, runs in timings.items()
    ]
    base_wall, base_loop = rows[0][3] / rows[0][1], rows[0][3] / rows[0][2]
    print(f"eval.py, tiny OISA on {rows[0][3]} synthetic OmniAVS expressions ({args.videos} videos of 8 frames at "
          f"96x128), {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads by default), "
          f"median of {args.repeats} runs")
    print(f"{'run':28s} {'wall s':>7s} {'expr/s':>7s} {'ratio':>6s} {'loop s':>7s} {'expr/s':>7s} {'ratio':>6s}")
    for name, wall, loop, count in rows:
        print(f"{name:28s} {wall:7.1f} {count / wall:7.2f} {count / wall / base_wall:6.2f} "
              f"{loop:7.1f} {count / loop:7.2f} {count / loop / base_loop:6.2f}")


if __name__ == "__main__":
    main()
