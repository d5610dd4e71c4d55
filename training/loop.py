"""
The training loop of `train.py`: run configs, data mixtures, Accelerate, checkpoints that resume exactly. What depends
on the model family (OISA, EEMC) comes from its `TrainingFamily`.
"""

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DeepSpeedPlugin,
    DistributedDataParallelKwargs,
    DistributedType,
    FullyShardedDataParallelPlugin,
    gather_object,
    set_seed,
)
from peft import PeftModel
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoProcessor, get_scheduler

from modeling_oisa import OisaCheckpointError
from processing_oisa.data.mixture import MixtureSource, SampleBuilder, build_training_stream

from .family import TrainingFamily
from .oisa_family import SAMPLE_BUILDERS, OisaTraining
from .refavs_eemc_family import RefAvsEemcTraining
from .stage_config import StageConfig


logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
# where `Accelerator.save_state` writes the first object registered for checkpointing: the run's `TrainingProgress`
PROGRESS_FILE = "custom_checkpoint_0.pkl"

# the model families `train` trains, by the name a run config gives (`StageConfig.model_type`)
FAMILIES: dict[str, TrainingFamily] = {family.name: family for family in (OisaTraining(), RefAvsEemcTraining())}
# OISA's formats stay importable from here
__all__ = ["FAMILIES", "SAMPLE_BUILDERS", "STATE_FILE", "StageConfig", "TrainingProgress", "train"]


def training_family(config: StageConfig, model_path: str) -> TrainingFamily:
    """The family the run config names, after checking that the checkpoint is of it."""
    if config.model_type not in FAMILIES:
        raise ValueError(f"model_type {config.model_type!r} is not one of the families that train, {sorted(FAMILIES)}.")
    family = FAMILIES[config.model_type]
    model_type = AutoConfig.from_pretrained(model_path).model_type
    if model_type not in family.model_types:
        raise OisaCheckpointError(
            f"{model_path}: a {model_type} checkpoint, but the run config trains {config.model_type} models "
            f"(its model_type); use a config of that family"
        )
    return family


def build_sources(
    family: TrainingFamily, config: StageConfig, data_roots: dict[str, str], processor, profile: str
) -> list[MixtureSource]:
    """The mixture's datasets, each read from the root given with `--data NAME=ROOT`."""
    sources = []
    for entry in config.mixture:
        name, data_format = entry["name"], entry["format"]
        if name not in data_roots:
            raise ValueError(f"The mixture needs `--data {name}=ROOT` (format {data_format}).")
        if data_format not in family.readers:
            raise ValueError(
                f"Source {name!r} has format {data_format!r}, which has no training reader for {family.name} yet; the "
                f"formats that train are {sorted(family.readers)}."
            )
        records = family.readers[data_format](data_roots[name], split=entry.get("split", "train"))
        build = family.sample_builder(data_format, processor, config, profile)
        sources.append(MixtureSource(name=name, records=records, build_sample=build, weight=entry.get("weight")))
    return sources


@dataclass
class TrainingProgress:
    """
    How far a run got: its optimizer steps and the items each process drew from the stream. Registered with
    `Accelerator.register_for_checkpointing`, so `save_state` writes it into every checkpoint and `load_state`
    restores it.
    """

    step: int = 0
    samples_seen_per_process: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.step = state_dict["step"]
        self.samples_seen_per_process = state_dict["samples_seen_per_process"]


def _latest_checkpoint(output_dir: Path) -> Path | None:
    """The last `checkpoint-N` of `output_dir`, if any; refuses one without the progress `save_state` writes."""
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    if not checkpoints:
        return None
    latest = checkpoints[-1]
    if not (latest / PROGRESS_FILE).is_file():
        raise OisaCheckpointError(
            f"{latest} holds no training progress ({PROGRESS_FILE}, written by `Accelerator.save_state`): it is not a "
            f"checkpoint of this train.py (those of older versions kept it in {STATE_FILE}) and cannot resume; train "
            "the stage again without --resume."
        )
    return latest


def _save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int) -> None:
    """
    `Accelerator.save_state` (model, optimizer, scheduler, RNG states and the registered `TrainingProgress`) into a
    temporary folder, then renamed: a checkpoint is never half-written.
    """
    final = output_dir / f"checkpoint-{step}"
    temporary = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(temporary, final)
    accelerator.wait_for_everyone()


def _engine_on_cpu(accelerator: Accelerator) -> None:
    """
    Runs an FSDP or DeepSpeed accelerate config on CPU processes (gloo). accelerate (1.16) takes either engine only for
    GPU-like devices and, with `cpu=True`, would run DDP under the config without a word. This sets the state as
    `AcceleratorState` does on GPUs, from the same plugin; from there accelerate's own code prepares (FSDP2's
    `fully_shard`, `deepspeed.initialize`), clips, saves and gathers. docs/training-distributed.md says what ran where.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables `accelerate launch` sets from the config
        if plugin.fsdp_version != 2:
            raise ValueError("On CPU processes only FSDP2 runs (`fsdp_version: 2` in the accelerate config).")
        accelerator.state.fsdp_plugin = plugin
        engine = DistributedType.FSDP
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        plugin = DeepSpeedPlugin()  # the config's `deepspeed_config`, from the variables `accelerate launch` sets
        plugin.set_mixed_precision(accelerator.mixed_precision)
        plugin.select(_from_accelerator_state=True)
        accelerator.state.deepspeed_plugins = plugin
        engine = DistributedType.DEEPSPEED
    else:
        return
    accelerator.state.distributed_type = engine
    PartialState._shared_state["distributed_type"] = engine


def train(
    config: StageConfig,
    model_path: str,
    output_dir: str | Path,
    data_roots: dict[str, str],
    max_steps: int | None = None,
    resume: bool = False,
    merge: bool = False,
    full_model: bool = False,
    cpu: bool = False,
) -> Path:
    """
    Runs one stage; returns the folder of the final model (merged when `merge`). `full_model` refuses, before any
    training, a stage whose final model would be a PEFT adapter (`train.py --push-to-hub` publishes full models).
    """
    output_dir = Path(output_dir)
    accelerator = Accelerator(
        mixed_precision="no" if cpu else config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with="tensorboard",
        project_dir=str(output_dir),
        cpu=cpu,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if cpu and accelerator.num_processes > 1:
        _engine_on_cpu(accelerator)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        # otherwise every process would take itself for the only one and train on the same data
        raise RuntimeError(
            f"Launched as {launched} processes but Accelerate sees {accelerator.num_processes}; on a machine without "
            "GPUs launch with `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N train.py --cpu`."
        )
    family = training_family(config, model_path)
    checkpoint = _latest_checkpoint(output_dir) if resume else None
    set_seed(config.seed)
    processor = AutoProcessor.from_pretrained(model_path)
    model = family.build_model(config, model_path, processor)
    profile = config.profile or model.config.profile
    if full_model and not merge and isinstance(model, PeftModel):
        # unmerged, the final model is saved as a PEFT adapter, which AutoModel cannot load from the Hub
        raise ValueError(
            "--push-to-hub publishes a full model: this stage trains through PEFT (LoRA or new token rows), so add "
            "--merge"
        )

    sources = build_sources(family, config, data_roots, processor, profile)
    records = sum(len(source.records) for source in sources)
    global_batch = config.per_device_batch_size * accelerator.num_processes * config.gradient_accumulation_steps
    total_steps = max_steps or config.max_steps or max(math.ceil(config.epochs * records / global_batch), 1)

    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=math.ceil(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # the stage config sets the batch and the clipping: `prepare` gets no data loader to read the batch from, and
        # DeepSpeed clips inside its step (`clip_grad_norm_` then only reports the norm)
        deepspeed_config = accelerator.state.deepspeed_plugin.deepspeed_config
        deepspeed_config["train_micro_batch_size_per_gpu"] = config.per_device_batch_size
        deepspeed_config["gradient_clipping"] = config.max_grad_norm or 0.0
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # FSDP replaces the parameters by sharded ones (DTensors): clip those
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if accelerator.distributed_type == DistributedType.FSDP:
        # as DDP's `find_unused_parameters`: a trainable part that one process's samples leave unused (the audio
        # projector without audio) still joins the gradient reduction, with zeros, instead of desynchronising it
        model.set_reduce_scatter_unused_params(True)
    sharded = sum(isinstance(parameter, DTensor) for parameter in model.parameters())
    logger.info(
        "distributed: %s, %d processes; model %s, %d of %d parameters sharded",
        accelerator.distributed_type.value,
        accelerator.num_processes,
        type(model).__name__,
        sharded,
        len(list(model.parameters())),
    )

    progress = TrainingProgress()
    accelerator.register_for_checkpointing(progress)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        logger.info("resumed from %s at step %d", checkpoint, progress.step)

    # accelerate's `skip_first_batches` would build (decode, collate) every skipped sample: the stream skips its items
    stream = build_training_stream(
        sources,
        config.seed,
        accelerator.process_index,
        accelerator.num_processes,
        config.shuffle_buffer,
        skip_per_process=progress.samples_seen_per_process,
    )
    builder = SampleBuilder(sources, family.collator(processor))
    loader = DataLoader(
        stream,
        batch_size=config.per_device_batch_size,
        collate_fn=builder,
        num_workers=0 if cpu else config.num_workers,
        # its own generator: the seed its iterator draws would otherwise shift the RNG states `load_state` restored
        generator=torch.Generator().manual_seed(config.seed),
    )

    tracked = {"model_type": config.model_type, "total_steps": total_steps}
    if config.stage is not None:
        tracked["stage"] = config.stage
    accelerator.init_trackers("oisa", config=tracked)
    progress_bar = tqdm(
        total=total_steps, initial=progress.step, disable=not accelerator.is_local_main_process, desc="training"
    )
    family.train_mode(model)
    started, samples_since_log, bad_samples, loss_history = time.perf_counter(), 0, 0, []
    # the losses of the optimizer steps since the last log line, which reports their means
    window: dict[str, list[torch.Tensor]] = {name: [] for name in family.logged_losses}
    failed_in_a_row, last_batch = 0, None
    # the `source:index` keys this process drew since the last log line
    drawn: list[str] = []
    for batch in loader:
        progress.samples_seen_per_process += config.per_device_batch_size
        bad_samples += int(batch.pop("num_bad_samples"))
        drawn.extend(batch.pop("sample_keys"))
        usable = "input_ids" in batch
        failed_in_a_row = 0 if usable else failed_in_a_row + 1
        if failed_in_a_row >= 50:
            raise RuntimeError(f"The last {failed_in_a_row} batches had no usable sample; see the warnings above.")
        if not usable and (accelerator.num_processes == 1 or last_batch is None):
            continue
        # with several processes every one must take part in each step: a rank whose batch was all bad repeats its
        # last batch with a zero loss
        batch = {key: value.to(accelerator.device) for key, value in batch.items()} if usable else last_batch
        last_batch = batch
        with accelerator.accumulate(model):
            output = model(**batch)
            accelerator.backward(output.loss if usable else output.loss * 0.0)
            if accelerator.sync_gradients and config.max_grad_norm is not None:
                accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        samples_since_log += batch["input_ids"].shape[0] if usable else 0
        if not accelerator.sync_gradients:
            continue
        progress.step += 1
        progress_bar.update(1)
        for name in family.logged_losses:
            if getattr(output, name, None) is not None:
                window[name].append(getattr(output, name).detach().float())
        if progress.step % config.logging_steps == 0 or progress.step == total_steps:
            elapsed = time.perf_counter() - started
            logs = {
                f"loss/{name}": accelerator.reduce(torch.stack(values).mean(), reduction="mean").item()
                for name, values in window.items()
                if values
            }
            window = {name: [] for name in family.logged_losses}
            logs.update(
                {
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_second": samples_since_log * accelerator.num_processes / elapsed,
                    "bad_samples": bad_samples,
                }
            )
            if torch.cuda.is_available():
                logs["memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            accelerator.log(logs, step=progress.step)
            losses = {key: value for key, value in logs.items() if key.startswith("loss/")}
            # every process's drawn samples, in process order, so that the data each step saw can be checked
            loss_history.append({"step": progress.step, **losses, "samples_per_process": gather_object([drawn])})
            drawn = []
            progress_bar.set_postfix(loss=f"{logs['loss/loss']:.4f}")
            logger.info("step %d: %s", progress.step, ", ".join(f"{key} {value:.4g}" for key, value in logs.items()))
            started, samples_since_log = time.perf_counter(), 0
        if progress.step % config.save_steps == 0 and progress.step < total_steps:
            _save_checkpoint(accelerator, output_dir, progress.step)
        if progress.step >= total_steps:
            break
    progress_bar.close()

    final_dir = output_dir / ("final-merged" if merge else "final")
    total_bad_samples = int(accelerator.reduce(torch.tensor(bad_samples, device=accelerator.device), reduction="sum"))
    if accelerator.distributed_type == DistributedType.FSDP:
        # the sharded model cannot be merged or saved as it is: every process takes part in gathering its full state
        # dict, which the main process loads into an unsharded copy
        full_state = accelerator.get_state_dict(model)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(model)
        if accelerator.distributed_type == DistributedType.FSDP:
            trained = family.build_model(config, model_path, processor)
            trained.load_state_dict(full_state)
        trained = family.final_model(trained, merge)
        trained.save_pretrained(final_dir)
        processor.save_pretrained(final_dir)
        (final_dir / STATE_FILE).write_text(
            json.dumps(
                {
                    "step": progress.step,
                    "num_processes": accelerator.num_processes,
                    "distributed_type": accelerator.distributed_type.value,
                    "bad_samples": total_bad_samples,
                    "log_history": loss_history,
                },
                indent=1,
            )
        )
    accelerator.wait_for_everyone()
    # the DDP wrapper goes while the process group is still registered: freed after `end_training`, its reducer would
    # run the gloo group's destructor holding the GIL that the group's worker thread may need to finish the last
    # barrier (a deadlock seen once, a two-process run hanging at exit)
    del model
    accelerator.free_memory()
    accelerator.end_training()
    return final_dir
