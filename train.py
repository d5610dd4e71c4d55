"""Train one OISA stage, or EEMC (the Ref-AVS baseline), on a streamed data mixture, on one process or many.

    accelerate launch train.py --config configs/stage4_omniavs.json --model M --output-dir O --data omniavs=ROOT
        [--max-steps N] [--resume] [--merge] [--push-to-hub REPO]
    accelerate launch train.py --config configs/refavs_eemc.json --model EEMC --output-dir O --data refavs=ROOT

The run's config file (configs/*.json) names the model family it trains (`model_type`) and sets what trains (OISA:
LoRA on the LLM, the adapter and mask head in full; EEMC: the parameters its `train_parameters` name), the optimiser,
batch sizes and the mixture; `--data NAME=ROOT` says where each of its datasets lives. Checkpoints go to
O/checkpoint-N (model, optimizer, scheduler, RNG and data position) and `--resume` continues from the latest; the
final model goes to O/final, or O/final-merged with `--merge` (LoRA folded into the weights, ready for the next
stage). The accelerate configs in configs/accelerate/ give DDP, FSDP and DeepSpeed ZeRO-1.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from accelerate import PartialState

import processing_oisa  # noqa: F401  (registers the processor)
from modeling_oisa import MissingCheckpointError, OisaCheckpointError, resolve_model_name
from oisa_training.loop import STATE_FILE, StageConfig, train
from processing_oisa.data.errors import OisaDataError
from processing_oisa.media import OisaInputError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config file (configs/*.json)")
    parser.add_argument(
        "--model", required=True, help="checkpoint to start from (folder, Hub id or oisa-tiny-synthetic)"
    )
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--data", action="append", default=[], metavar="NAME=ROOT", help="root of a mixture dataset")
    parser.add_argument("--max-steps", type=int, help="optimizer steps (default: the config's epochs)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    parser.add_argument("--merge", action="store_true", help="fold LoRA into the weights of the final model")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the final model and processor")
    parser.add_argument("--cpu", action="store_true", help="train on CPU in float32 (the default without a GPU)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not only its message")
    return parser.parse_args(argv)


def publish(final: Path, repo_id: str, config: StageConfig, base_model: str, data_roots: dict[str, str]) -> None:
    """The same upload as `oisa push`: remote code, processor and a model card from the fine-tune template."""
    from oisa_hub_cards.publish import publish_checkpoint

    steps = json.loads((final / STATE_FILE).read_text())["step"]
    run = config.model_type if config.stage is None else f"stage {config.stage}"
    training = f"{run}, {steps} optimizer steps on {', '.join(sorted(data_roots))}"
    publish_checkpoint(final, repo_id, base_model=base_model, training=training)


def main(argv: list[str] | None = None) -> int:
    """Trains one run; returns 0, or 2 for bad input (one line naming the file and the problem)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        run(args)
    except (OisaDataError, OisaInputError, OisaCheckpointError, MissingCheckpointError) as error:
        if args.debug:
            raise
        logging.getLogger("train").error("train.py: %s", error)
        return 2
    return 0


def run(args: argparse.Namespace) -> None:
    data_roots = dict(item.split("=", 1) for item in args.data)
    if not args.cpu and not torch.cuda.is_available():
        # a stage's bf16 autocast and data workers are for GPUs: on a CPU they only cost time
        logging.getLogger("train").warning("no GPU here: training on the CPU in float32, as with --cpu")
        args.cpu = True
    config = StageConfig.from_file(args.config)
    model_path = resolve_model_name(args.model)
    final = train(
        config,
        model_path,
        args.output_dir,
        data_roots,
        max_steps=args.max_steps,
        resume=args.resume,
        merge=args.merge,
        full_model=args.push_to_hub is not None,
        cpu=args.cpu,
    )
    if args.push_to_hub and PartialState().is_main_process:
        publish(final, args.push_to_hub, config, model_path, data_roots)
    logging.getLogger("train").info("final model in %s", final)


if __name__ == "__main__":
    sys.exit(main())
