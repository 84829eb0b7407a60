"""`RunSettings`: a training run's settings, each checked once by its owner and passed down typed.

`vitcrs.train` builds them from the composed configuration (`RunSettings.check`, on its plain nodes) before
anything is downloaded, loaded or written; everything after takes them: the LightningModule (`model`, `crs`,
`optim`), the Trainer (`trainer`), the record (`vitcrs.callbacks.describe_run`) and the resume check
(`vitcrs.resume.run_settings`). A bad setting is a ConfigError naming its key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitcrs.crs import CRSConfig
from vitcrs.data import VisionDataModule, build_datamodule
from vitcrs.errors import check_bool, check_int
from vitcrs.models import (
    Architecture,
    ModelFamily,
    OptimConfig,
    check_architecture,
    model_family,
    model_label,
)
from vitcrs.trainer import TrainerSettings

MAX_SEED = 2**32 - 1  # the largest seed Lightning's seed_everything takes (numpy's limit)


def model_data(
    family: ModelFamily, model: Mapping[str, Any], data: Mapping[str, Any], batch_indices: bool = False
) -> tuple[VisionDataModule, Architecture]:
    """The checked (unprepared) data module of the `data` node for the network of the `model` node (of
    `family`), and that network's Architecture, read without weights and checked against the images' side
    (`check_architecture`). batch_indices: as `build_datamodule`. Training's and the fidelity meter's."""
    datamodule = build_datamodule(data, family.inputs(model), batch_indices)
    arch = family.meta_architecture(model, datamodule.num_classes)
    check_architecture(arch, int(datamodule.image_size))
    return datamodule, arch


@dataclass(frozen=True)
class RunSettings:
    """What one training run is, checked (`check`).

    seed: seeds Python/NumPy/torch/workers and CRS sampling (seed + rank); model: the `model` node (plain),
    built by `family`, recorded as `model_label`; crs: the sampling settings in effect
    (`CRSConfig.in_effect`: those that change nothing at their defaults); optim, trainer: their nodes, typed;
    datamodule: the checked, unprepared data module of the `data` node for this model; arch: the network's
    `Architecture` (read without loading weights); run_dir: where the run writes; ckpt_path: the checkpoint
    to resume from as given (`last`, a path, or None); allow_crs_change: resuming with other crs settings.
    """

    seed: int
    model: dict[str, Any]
    family: ModelFamily
    model_label: str
    crs: CRSConfig
    optim: OptimConfig
    trainer: TrainerSettings
    datamodule: VisionDataModule
    arch: Architecture
    run_dir: Path
    ckpt_path: str | None
    allow_crs_change: bool

    @classmethod
    def check(cls, config: Mapping[str, Any], model_choice: str | None = None) -> RunSettings:
        """The settings of a composed configuration (`config`: its plain, resolved nodes), each checked by its
        owner, then against each other (the sampled ops and the architecture, the optimizer and the trainer).
        `model_choice`: the conf/model option chosen, which names a random-init model in records."""
        seed = check_int("seed", config["seed"], 0, MAX_SEED, "seed=1")
        model = dict(config["model"]) if isinstance(config["model"], Mapping) else config["model"]
        family = model_family(model)
        # the settings in effect: those that change nothing at their defaults are put at them, so the model,
        # its checkpoints and the record say what runs
        crs = CRSConfig.from_settings(config["crs"], model.get("attn_implementation")).in_effect()
        optim = OptimConfig.from_settings(config["optim"])
        trainer = TrainerSettings.check(config["trainer"], config.get("callbacks"), config.get("logger"))
        optim.check_in_backward(
            trainer.trainer.get("accumulate_grad_batches"), trainer.trainer.get("gradient_clip_val"),
            trainer.precision, trainer.processes, trainer.fidelity_every,
        )  # fmt: skip
        datamodule, arch = model_data(family, model, config["data"], batch_indices=crs.prob == "sample_cache")
        crs.check_sampled(arch, datamodule.image_size, datamodule.batch_size)
        allow = check_bool("allow_crs_change", config.get("allow_crs_change", False))
        label = model_label(model, model_choice)
        ckpt_path = config.get("ckpt_path")
        return cls(
            seed, model, family, label, crs, optim, trainer, datamodule, arch, Path(config["run_dir"]),
            ckpt_path, allow,
        )  # fmt: skip

    @property
    def attn_implementation(self) -> str:
        return self.model.get("attn_implementation", "eager")
