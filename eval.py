"""
Evaluates OISA on OmniAVS or Ref-AVS, sharded across processes with Accelerate, and resumable:

    accelerate launch eval.py --model M --dataset omniavs --data-root D --out OUT [--splits test] [--profile fixed]

Each process appends one JSON line per expression to OUT/results-<rank>.jsonl as soon as it is scored; running the
same command again skips what is done. The main process then writes OUT/metrics.json and OUT/results.md and prints
the table.

Several processes on a machine without GPUs (Accelerate's `--cpu` launcher starts a single process unless mpirun is
set up, huggingface/accelerate#2741; this goes through torchrun and gloo instead):

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 eval.py ...
"""

import argparse
import logging
import os
from datetime import timedelta
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from tqdm.auto import tqdm

from processing_oisa.eval_report import compute_metrics, write_report
from processing_oisa.eval_results import ResultWriter, check_output, claim_output, read_results, results_path
from processing_oisa.evaluation import (
    DATASETS,
    DEFAULT_SPLITS,
    PROFILES,
    evaluate_group,
    load_segmenter,
    load_tasks,
    run_identity,
    shard,
    video_groups,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub id")
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--data-root", required=True, type=Path, help="the dataset's root folder")
    parser.add_argument("--splits", nargs="+", help="default: test (OmniAVS); test_s test_u test_n (Ref-AVS)")
    parser.add_argument("--out", required=True, type=Path, help="output folder; a rerun into it resumes")
    parser.add_argument("--profile", choices=PROFILES, help="override the checkpoint's behaviour switches")
    parser.add_argument("--skip-bad", action="store_true", help="skip (and count) records the readers reject")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="answer length, as evaluate.py")
    parser.add_argument("--limit", type=int, help="evaluate only the first N expressions")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # the barrier after the loop waits for the slowest shard, which can outlast the default 30-minute timeout
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=12))])
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        # without this, every process would take itself for the only one and evaluate everything
        raise SystemExit(
            f"eval.py was launched as {launched} processes but Accelerate sees {accelerator.num_processes}; on a "
            "machine without GPUs, set ACCELERATE_USE_CPU=1 (see the docstring)"
        )
    splits = args.splits or DEFAULT_SPLITS[args.dataset]
    tasks = load_tasks(args.dataset, args.data_root, splits, skip_bad=args.skip_bad, limit=args.limit)
    segmenter = load_segmenter(args.model, accelerator.device, profile=args.profile, max_new_tokens=args.max_new_tokens)
    identity = run_identity(args.model, args.dataset, args.data_root, segmenter)
    if accelerator.is_main_process:
        claim_output(args.out, identity)
    accelerator.wait_for_everyone()
    check_output(args.out, identity)

    done = read_results(args.out)
    groups = shard(video_groups(tasks.tasks), accelerator.process_index, accelerator.num_processes)
    todo = [[task for task in group if task.key not in done] for group in groups]
    todo = [group for group in todo if group]
    progress = tqdm(
        total=sum(len(group) for group in todo),
        desc=f"process 0 of {accelerator.num_processes}",
        unit="expr",
        disable=not accelerator.is_main_process,
    )
    with ResultWriter(results_path(args.out, accelerator.process_index)) as writer, progress:
        for group in todo:
            for line in evaluate_group(segmenter, group):
                writer.write(line)
                progress.update()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        metrics = compute_metrics(tasks, read_results(args.out), identity)
        label = f"{Path(args.model).name} ({segmenter.model.config.profile})"
        print(write_report(args.out, metrics, label))
    accelerator.end_training()


if __name__ == "__main__":
    main()
