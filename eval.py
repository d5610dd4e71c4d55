"""
Evaluates OISA on OmniAVS or Ref-AVS, or EEMC (the Ref-AVS baseline) on Ref-AVS, sharded across processes with
Accelerate, and resumable:

    accelerate launch eval.py --model M --dataset omniavs --data-root D --out OUT [--splits test] [--profile fixed]
    accelerate launch eval.py --model EEMC --dataset refavs --data-root D --out OUT [--batch-size 4]

OISA's expressions are shared out by video; EEMC's in the batches the original evaluates them in (4 expressions of
one split in metadata.csv order; under `release` a result depends on which rows share its batch), whole batches to a
process. Each process appends one JSON line per expression to OUT/results-<rank>.jsonl as soon as it is scored;
running the same command again skips what is done. The main process then writes OUT/metrics.json and OUT/results.md
and prints the table; with `--card DIR` it also writes DIR/README.md, a model card holding these results
(`--card-template` oisa-1b, oisa-tiny-synthetic, fine-tune or refavs-eemc; by default fine-tune for OISA and
refavs-eemc for EEMC; `--card-field NAME=VALUE` for the template's fields).

Several processes on a machine without GPUs (Accelerate's `--cpu` launcher starts a single process unless mpirun is
set up, huggingface/accelerate#2741; this goes through torchrun and gloo instead):

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 eval.py ...
"""

import argparse
import gc
import logging
import os
import platform
import sys
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from tqdm.auto import tqdm
from transformers import AutoConfig

from modeling_oisa import MissingCheckpointError, OisaCheckpointError, resolve_model_name
from modeling_oisa.allocator import reuse_freed_memory
from oisa_evaluation.refavs_eemc import (
    EEMC_MODEL_TYPE,
    RELEASE_BATCH_SIZE,
    eemc_run_identity,
    evaluate_batch,
    limited_batches,
    load_eemc_evaluator,
)
from oisa_evaluation.report import compute_metrics, write_report
from oisa_evaluation.results import ResultWriter, check_output, claim_output, read_results, results_path
from oisa_evaluation.runner import (
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
from oisa_hub_cards.model_card import TEMPLATES, parse_card_fields, render_model_card
from oisa_hub_cards.publish import FAMILIES
from processing_oisa.data.errors import OisaDataError
from processing_oisa.media import OisaInputError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder, Hub id or oisa-tiny-synthetic")
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--data-root", required=True, type=Path, help="the dataset's root folder")
    parser.add_argument("--splits", nargs="+", help="default: test (OmniAVS); test_s test_u test_n (Ref-AVS)")
    parser.add_argument("--out", required=True, type=Path, help="output folder; a rerun into it resumes")
    parser.add_argument("--profile", choices=PROFILES, help="override the checkpoint's behaviour switches")
    parser.add_argument("--skip-bad", action="store_true", help="skip (and count) records the readers reject")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="OISA: answer length, as evaluate.py")
    parser.add_argument(
        "--batch-size",
        type=int,
        help=f"EEMC: expressions per forward (default {RELEASE_BATCH_SIZE}, the original's; under the release profile "
        "a result depends on its batch)",
    )
    parser.add_argument("--limit", type=int, help="evaluate only the first N expressions")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="auto: bfloat16 on GPUs and on CPUs with bfloat16 matrix units (AMX, avx512_bf16), float32 elsewhere",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not only its message")
    parser.add_argument(
        "--card", type=Path, metavar="DIR", help="also write DIR/README.md, a model card with the results"
    )
    parser.add_argument(
        "--card-template",
        help=f"the card's template: {', '.join(TEMPLATES)} or a template file (default: the model family's, fine-tune "
        "for OISA, refavs-eemc for EEMC)",
    )
    parser.add_argument(
        "--card-field", action="append", default=[], metavar="NAME=VALUE", help="a template field, VALUE read as YAML"
    )
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    args.model = resolve_model_name(args.model)
    return args


def card_fields(args: argparse.Namespace, splits: list[str]) -> dict[str, Any]:
    """The card fields this run knows before it evaluates; `--card-field` overrides them."""
    model_name = Path(args.model).name
    fields: dict[str, Any] = {
        # a local folder's path means nothing on the Hub: `--card-field repo_id=owner/name` names the published repo
        "repo_id": model_name if Path(args.model).exists() else args.model,
        "model_name": model_name,
        # the checkpoint's own config: `--profile` changes only how this run behaves
        "config": AutoConfig.from_pretrained(args.model).to_dict(),
        "eval_split": ", ".join(splits),
    }
    if args.limit is not None:
        fields["eval_note"] = f"only the first {args.limit} expressions, --limit"
    return {**fields, **parse_card_fields(args.card_field)}


def hardware(accelerator: Accelerator) -> str:
    """The processes and the device each ran on, for the card."""
    if accelerator.device.type == "cuda":
        device = torch.cuda.get_device_name(accelerator.device)
    else:
        device = f"CPU ({platform.processor() or platform.machine()})"
    return f"{accelerator.num_processes} process(es), each on {device}"


def main(argv: list[str] | None = None) -> int:
    """Evaluates; returns 0, 2 for bad input (one line naming the file and the problem) or 3 when nothing scored."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        return evaluate(parse_args(argv))
    except (OisaDataError, OisaInputError, OisaCheckpointError, MissingCheckpointError) as error:
        if debug:
            raise
        logging.getLogger("eval").error("eval.py: %s", error)
        return 2


def evaluate(args: argparse.Namespace) -> int:
    reuse_freed_memory()
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
    model_type = AutoConfig.from_pretrained(args.model).model_type
    is_eemc = model_type == EEMC_MODEL_TYPE
    fields: dict[str, Any] = {}
    if args.card is not None:
        args.card_template = args.card_template or FAMILIES.get(model_type, FAMILIES["oisa"]).default_template
        fields = card_fields(args, list(splits))
        # a bad template or a missing field fails now rather than after the evaluation
        render_model_card(args.card_template, None, **fields)
    if is_eemc and args.dataset != "refavs":
        raise OisaInputError(f"{args.model}: EEMC, the Ref-AVS baseline, evaluates on --dataset refavs only")
    if not is_eemc and args.batch_size is not None:
        raise OisaInputError("--batch-size is for EEMC; OISA evaluates the expressions of one video together")
    # EEMC forms its batches from every expression before --limit cuts, so that a batch keeps its composition
    limit = None if is_eemc else args.limit
    tasks = load_tasks(args.dataset, args.data_root, splits, skip_bad=args.skip_bad, limit=limit)
    if is_eemc:
        evaluator = load_eemc_evaluator(
            args.model,
            accelerator.device,
            profile=args.profile,
            dtype=args.dtype,
            batch_size=args.batch_size or RELEASE_BATCH_SIZE,
        )
        identity = eemc_run_identity(args.model, args.dataset, args.data_root, evaluator)
        model = evaluator.model
        # the batches are formed before they are shared out: under `release` a result depends on its batch
        tasks, groups = limited_batches(tasks, evaluator.batch_size, args.limit)

        def run_group(group):
            return evaluate_batch(evaluator, group)

    else:
        segmenter = load_segmenter(
            args.model, accelerator.device, profile=args.profile, max_new_tokens=args.max_new_tokens, dtype=args.dtype
        )
        identity = run_identity(args.model, args.dataset, args.data_root, segmenter)
        model = segmenter.model
        groups = video_groups(tasks.tasks)

        def run_group(group):
            return evaluate_group(segmenter, group)

    # the modules, the model and the tasks live until the end: the garbage collector leaves them out of its passes
    gc.freeze()
    if accelerator.is_main_process:
        claim_output(args.out, identity)
    accelerator.wait_for_everyone()
    check_output(args.out, identity)

    done = read_results(args.out)
    pending = {task.key for task in tasks.tasks} - set(done)
    groups = shard(groups, accelerator.process_index, accelerator.num_processes)
    if is_eemc:
        # a batch runs whole while any of its expressions is pending, so that each keeps the batch it is scored in
        todo = [group for group in groups if any(task.key in pending for task in group)]
    else:
        todo = [[task for task in group if task.key in pending] for group in groups]
        todo = [group for group in todo if group]
    progress = tqdm(
        total=sum(task.key in pending for group in todo for task in group),
        desc=f"process 0 of {accelerator.num_processes}",
        unit="expr",
        disable=not accelerator.is_main_process,
    )
    with ResultWriter(results_path(args.out, accelerator.process_index)) as writer, progress:
        for group in todo:
            for line in run_group(group):
                if line["key"] in pending:
                    writer.write(line)
                    progress.update()

    accelerator.wait_for_everyone()
    status = 0
    if accelerator.is_main_process:
        metrics = compute_metrics(tasks, read_results(args.out), identity)
        label = f"{Path(args.model).name} ({model.config.profile})"
        print(write_report(args.out, metrics, label))
        if metrics["num_scored"] == 0:
            # every expression failed: a report of nothing is no result
            logging.getLogger("eval").error("eval.py: no expression could be scored; see %s", args.out)
            status = 3
        if args.card is not None:
            run_fields = {"eval_date": date.today().isoformat(), "eval_hardware": hardware(accelerator)}
            card = render_model_card(args.card_template, metrics, **{**run_fields, **fields})
            args.card.mkdir(parents=True, exist_ok=True)
            card.save(args.card / "README.md")
            print(f"model card: {args.card / 'README.md'}")
    accelerator.end_training()
    return status


if __name__ == "__main__":
    sys.exit(main())
