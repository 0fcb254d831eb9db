"""Training run configuration: one YAML file per stage, loaded into these dataclasses.

A run file maps 1:1 onto `TrainConfig` (sections `model`, `data`, `loss`, `optim`, `train`, `log`).
`key=value` overrides on the command line address nested keys with dots
(`optim.lr=3e-4`, `data.tasks.i2t=2`). An unknown key anywhere is an error that lists the valid
ones, and values are converted to the field's type (so `1e-4`, which YAML 1.1 reads as a string,
is a float here).

Stages (spec §12.3, Table 1):

- `vae`: train the KL autoencoder on the data's images (a new image domain); writes `vae.safetensors`.
- `pretrain`: MAR pre-training, text-to-image only (loss weights U:G:E = 0:1:0), constant LR.
- `align`: MAR ↔ LLM alignment with the LLM frozen (projections and MAR trained), cosine LR.
- `joint`: continued joint training, LLM unfrozen, all three tasks (0.01:1:1), cosine LR.
- `sft`: the same objective as `joint` on curated data with a lower LR.

The stage picks the trainer (`vae` trains the autoencoder, every other stage trains the UniPic
model with a frozen VAE); everything else (tasks, weights, freezing, schedule) is spelled out in
the file, so a run file reads as the complete recipe.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unipic.api import UserError

STAGES = ("vae", "pretrain", "align", "joint", "sft")
TASKS = ("t2i", "i2t", "edit")

# A few prompts of every GenEval-analogue category, for the periodic sample grids.
DEFAULT_SAMPLE_PROMPTS = [
    "a photo of a circle",
    "a photo of a red square",
    "a photo of three stars",
    "a photo of a triangle left of a cross",
    "a photo of a blue diamond and a yellow circle",
    "a photo of a green square and a white star",
]


@dataclass
class ModelConfig:
    """Where the weights start and which parts train."""

    init_from: str = "unipic1-tiny"  # preset name, unipic model folder, or a previous run's out_dir (its final/)
    init_vae_from: str | None = None  # vae.safetensors of a `stage: vae` run (or that run's out_dir)
    tokenizer: str = "auto"  # auto | byte | world | a folder with a tokenizer (auto: the folder's, or by preset)
    world_vocab_size: int = 512  # size of the byte-level BPE trained on world text (tokenizer: world)
    freeze_vae: bool = True  # must stay true outside `stage: vae` (the released VAE is never trained)
    freeze_llm: bool = False
    freeze_mar: bool = False  # the whole MAR incl. the diffusion head
    freeze_mar_decoder: bool = False  # decoder_embed/blocks/norm, mask token, decoder + diffusion position tables
    grad_checkpointing: bool = False  # MAR blocks and LLM layers recompute activations in backward
    vae_init_logvar: float | None = -6.0  # stage vae from a preset: start the posterior log-variance here
    # Set the model's edit_source_through_llm (instruction first; x_con reads the source rows' LLM
    # states); null keeps the starting model's (false for presets and the upstream release).
    edit_source_through_llm: bool | None = None
    # True: give the model its edit_keep_mask head (needs edit_source_through_llm): the edit sampler
    # keeps the cells it marks at the source's tokens; edit batches train it and keep those cells
    # visible. Null keeps the starting model's (research/shapes-model-notebook.md, "Seventeenth session").
    edit_keep_mask: bool | None = None
    # Preset only: nested changes to its architecture, e.g. {vae: {embed_dim: 32}, mar: {encoder_depth: 4}}.
    architecture: dict[str, Any] = field(default_factory=dict)
    # Sampling defaults the saved model gets (its config.json "sampling"), e.g. {num_iter: 16}. The
    # run sets image_size and understanding_image_size to data.image_size unless given here; the
    # resolved mapping is what --print-config shows and config.yaml records.
    sampling: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Where examples come from and how batches are formed."""

    source: str = "world"  # world (Shapes-world streams) | folder (the `unipic data export` layout)
    folders: dict[str, str] = field(default_factory=dict)  # source: folder — {task: DIR with data.jsonl}
    world_seed: int = 0  # world streams: example i of a task is a pure function of (world_seed, i)
    image_size: int = 128  # training side S in pixels (a multiple of 16)
    batch_size: int = 8  # examples per process and micro-batch (all of one task)
    tasks: dict[str, int] = field(default_factory=lambda: {"t2i": 1})  # round-robin repeat counts; 0 = unused
    unconditional_prob: float = 0.1  # t2i prompt dropout to the CFG prompt (spec §12.2)
    edit_repeat_prob: float = 0.0  # edit examples replaced by (source, "Repeat this image.", source)
    max_text_tokens: int = 256  # longer captions/questions/answers/instructions are truncated
    vae_crop: int = 0  # stage vae: train on random crops of this side (multiple of 16; 0 = whole images)
    world_pool: int = 0  # source world: 0 = endless stream; N = examples 0..N-1 of each task, repeated
    cache_latents: bool = True  # finite data (a world pool or folders): VAE-encode each image once
    world_layout: str = "random"  # source world, t2i: random (the world's scenes) | canonical (one scene per text)
    i2t_questions: int = 1  # source world: question-answer turns per understanding image (the first as evaluated)
    i2t_kinds: list[str] = field(default_factory=list)  # source world: question kinds to ask (empty = all five)
    edit_kinds: list[str] = field(default_factory=list)  # source world: edit kinds to draw (empty = all five)
    edit_placement: str = "random"  # source world: where added and moved objects go: random | fixed (a function of the source scene)


@dataclass
class LossConfig:
    """Task loss weights (U:G:E = i2t:t2i:edit), the visual-feature gradient scale and VAE terms."""

    weights: dict[str, float] = field(default_factory=lambda: {"t2i": 1.0, "i2t": 0.01, "edit": 1.0})
    grad_scale: float = 0.1  # gradient scale on visual features entering the LLM (spec §10-11)
    token_probe: float = 0.0  # weight of a training-only linear regression of each hidden token from z
    object_weight: float = 0.0  # t2i/edit: extra diffusion-loss weight on object tokens (unlike the image's median token)
    edit_changed_weight: float = 0.0  # edit: extra diffusion-loss weight on target tokens unlike the source's
    object_readout: float = 0.0  # i2t, world data: weight of training-only read-outs of each object's shape and colour
    object_readout_cells: str = "centre"  # which cells loss.object_readout reads: centre (the object's centre cell) | covered (every cell its box alone covers)
    attend_named: float = 0.0  # i2t, world data: weight of the attention-supervision loss on one LLM head (see docs)
    attend_edit: float = 0.0  # edit, world data: weight of attention supervision from the image buffer rows to the named object's source rows
    edit_region_readout: float = 0.0  # edit, world data: weight of a training-only read-out, from each MAR decoder position, of whether the named object covers it
    # Where loss.edit_region_readout reads: decoder (each MAR decoder position's z) or source (the LLM's
    # final state of each source grid row; needs model.edit_source_through_llm, else no row sees the instruction)
    edit_region_at: str = "decoder"
    edit_keep: float = 1.0  # edit, world data, models with edit_keep_mask: weight of the keep head's cross-entropy
    edit_target_readout: float = 0.0  # edit, world data: weight of training-only read-outs, from each MAR decoder position, of where the edited object lies in the target and its shape and colour
    attend_layer: int = 1  # the LLM layer whose head 0 loss.attend_named and loss.attend_edit supervise
    attend_relation: float = 0.0  # i2t, world data: weight of relation turns' split supervision (head 0 on the first shape, head 1 on the second)
    relation_readout: float = 0.0  # i2t, world data: weight of a training-only read-out of each relation's order from its answer row
    relation_layer: int = -1  # the LLM layer whose output loss.relation_readout reads (-1: the final, normalised output)
    vae_l1: float = 1.0  # stage vae: per-pixel L1
    vae_l2: float = 1.0  # stage vae: per-pixel squared error
    vae_kl: float = 1e-6  # stage vae: KL (summed over latents, divided by pixel count: LDM's balance)
    vae_foreground: float = 0.0  # stage vae: extra L1/L2 weight on pixels unlike the image's median colour
    vae_palette: float = 0.0  # stage vae: cross-entropy of each pixel's nearest world colour (Shapes world)
    vae_latent_noise: float = 0.0  # stage vae: extra Gaussian noise on the decoder's latents, × their std


@dataclass
class OptimConfig:
    """AdamW, warm-up + constant/cosine LR, clipping and EMA (spec §12.3)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-15
    weight_decay: float = 0.02  # biases, 1-D tensors and the diffusion head never decay
    schedule: str = "cosine"  # constant | cosine (after warm-up)
    warmup_ratio: float = 0.05  # fraction of max_steps with a linear warm-up from 0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    ema_decay: float = 0.0  # 0 = no EMA; the final model folder holds the EMA weights when on


@dataclass
class LoopConfig:
    """Length, precision and checkpointing of the run."""

    max_steps: int = 100  # optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step
    mixed_precision: str = "no"  # no | bf16 | fp16 (passed to accelerate)
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end and on SIGTERM/SIGINT)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    num_threads: int = 0  # torch CPU threads per process (0: torch's default)


@dataclass
class LogConfig:
    """Progress bar, metrics, plots, sample grids and evaluation during training."""

    every: int = 10  # steps per metrics.csv row (losses averaged over the window)
    plot_every: int = 100  # steps between loss.png refreshes (also at the end)
    progress: bool = True  # tqdm bar on the main process
    sample_every: int = 0  # steps between sample grids in samples/ (0: off; also at the end when on)
    sample_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_SAMPLE_PROMPTS))
    sample_steps: int = 8  # MAR reveal steps for samples
    sample_head_steps: int = 25  # diffusion-head steps for samples
    sample_cfg: float = 3.0
    eval_every: int = 0  # steps between quick evaluations (0: off; also at the end when on)
    eval_per_kind: int = 2  # evaluation prompts/questions/edits per category


@dataclass
class TrainConfig:
    """A complete training run (one stage)."""

    stage: str = "pretrain"  # vae | pretrain | align | joint | sft
    out_dir: str = "runs/unnamed"
    seed: int = 0  # model init, masking, diffusion noise, dropout, prompt dropout (per rank and step)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> None:
        """Raise UserError naming the key, the bad value and the fix."""
        _one_of("stage", self.stage, STAGES)
        _one_of("data.source", self.data.source, ("world", "folder"))
        _one_of("optim.schedule", self.optim.schedule, ("constant", "cosine"))
        _one_of("train.mixed_precision", self.train.mixed_precision, ("no", "bf16", "fp16"))
        _one_of("model.tokenizer", self.model.tokenizer, ("auto", "byte", "world"), allow_path=True)
        for name, mapping in (("data.tasks", self.data.tasks), ("loss.weights", self.loss.weights),
                              ("data.folders", self.data.folders)):
            unknown = sorted(set(mapping) - set(TASKS))
            if unknown:
                raise UserError(f"{name}: unknown task(s) {unknown}; valid tasks: {list(TASKS)}")
        if any(n < 0 for n in self.data.tasks.values()) or not any(self.data.tasks.values()):
            raise UserError(f"data.tasks={self.data.tasks} needs non-negative repeat counts with at least one > 0")
        for task in self.active_tasks:
            if self.stage != "vae" and task not in self.loss.weights:
                raise UserError(f"data.tasks uses {task!r} but loss.weights has no weight for it; add loss.weights.{task}")
            if self.data.source == "folder" and task not in self.data.folders:
                raise UserError(f"data.source=folder uses task {task!r}; give its folder as data.folders.{task}=DIR")
        from unipic.world.questions import QUESTION_KINDS

        unknown = sorted(set(self.data.i2t_kinds) - set(QUESTION_KINDS))
        if unknown:
            raise UserError(f"data.i2t_kinds: unknown kind(s) {unknown}; valid kinds: {list(QUESTION_KINDS)}")
        for key in ("object_weight", "edit_changed_weight", "object_readout", "attend_named", "attend_edit",
                    "edit_region_readout", "edit_keep", "edit_target_readout", "attend_relation", "relation_readout"):
            if getattr(self.loss, key) < 0:
                raise UserError(f"loss.{key} must be >= 0, got {getattr(self.loss, key)}")
        if self.loss.object_readout_cells not in ("centre", "covered"):
            raise UserError("loss.object_readout_cells must be 'centre' or 'covered', "
                            f"got {self.loss.object_readout_cells!r}")
        if self.loss.edit_region_at not in ("decoder", "source"):
            raise UserError(f"loss.edit_region_at must be 'decoder' or 'source', got {self.loss.edit_region_at!r}")
        from unipic.world.spec import EDIT_KINDS

        unknown = sorted(set(self.data.edit_kinds) - set(EDIT_KINDS))
        if unknown:
            raise UserError(f"data.edit_kinds: unknown kind(s) {unknown}; valid kinds: {list(EDIT_KINDS)}")
        from unipic.world.edits import PLACEMENTS

        if self.data.edit_placement not in PLACEMENTS:
            raise UserError(f"data.edit_placement must be one of {list(PLACEMENTS)}, got {self.data.edit_placement!r}")
        if self.data.source == "folder":
            # These read the world's scene (its objects, each question's named objects); folder rows
            # hold an image and one question, so the options would silently do nothing.
            for key, value, off in (("data.i2t_questions", self.data.i2t_questions, 1),
                                    ("loss.object_readout", self.loss.object_readout, 0),
                                    ("loss.attend_named", self.loss.attend_named, 0),
                                    ("data.edit_kinds", self.data.edit_kinds, []),
                                    ("data.edit_placement", self.data.edit_placement, "random"),
                                    ("loss.attend_edit", self.loss.attend_edit, 0),
                                    ("loss.edit_region_readout", self.loss.edit_region_readout, 0),
                                    ("loss.edit_target_readout", self.loss.edit_target_readout, 0),
                                    ("loss.attend_relation", self.loss.attend_relation, 0),
                                    ("loss.relation_readout", self.loss.relation_readout, 0)):
                if value != off:
                    raise UserError(f"{key}={value} needs data.source=world (it reads the world's scenes); "
                                    f"set {key}={off} for folder data")
        if self.data.image_size <= 0 or self.data.image_size % 16:
            raise UserError(f"data.image_size={self.data.image_size} must be a positive multiple of 16")
        from unipic.world.examples import LAYOUTS

        if self.data.world_layout not in LAYOUTS:
            raise UserError(f"data.world_layout={self.data.world_layout!r} must be one of {', '.join(LAYOUTS)}")
        crop = self.data.vae_crop
        if crop and (crop < 0 or crop % 16 or crop > self.data.image_size):
            raise UserError(f"data.vae_crop={crop} must be 0 or a multiple of 16 up to data.image_size")
        for key in ("data.batch_size", "data.i2t_questions", "train.max_steps", "train.grad_accum", "train.keep_checkpoints", "log.every"):
            section, name = key.split(".")
            if getattr(getattr(self, section), name) < 1:
                raise UserError(f"{key}={getattr(getattr(self, section), name)} must be at least 1")
        for key in ("data.unconditional_prob", "data.edit_repeat_prob", "optim.warmup_ratio", "optim.min_lr_ratio"):
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            if not 0.0 <= value <= 1.0:
                raise UserError(f"{key}={value} must be in [0, 1]")
        if not 0.0 <= self.optim.ema_decay < 1.0:
            raise UserError(f"optim.ema_decay={self.optim.ema_decay} must be in [0, 1) (0 turns EMA off)")
        if self.optim.lr <= 0:
            raise UserError(f"optim.lr={self.optim.lr} must be positive")
        if self.train.mixed_precision == "fp16" and not _has_gpu():
            raise UserError("train.mixed_precision=fp16 needs a GPU; use bf16 (or no) on the CPU")
        from unipic.unipic1.settings import SamplingConfig

        unknown = sorted(set(self.model.sampling) - {f.name for f in dataclasses.fields(SamplingConfig)})
        if unknown:
            raise UserError(f"model.sampling: unknown key(s) {unknown}; valid keys: "
                            f"{sorted(f.name for f in dataclasses.fields(SamplingConfig))}")
        if self.stage != "vae" and not self.model.freeze_vae:
            raise UserError("model.freeze_vae=false is only allowed in stage vae; the VAE stays frozen in "
                            "every model stage (train a VAE with `stage: vae` and load it with model.init_vae_from)")

    def model_sampling(self) -> dict[str, Any]:
        """The sampling defaults this run writes into the model: `model.sampling` over the trained size."""
        return {"image_size": self.data.image_size, "understanding_image_size": self.data.image_size,
                **self.model.sampling}

    @property
    def active_tasks(self) -> list[str]:
        """Tasks with a positive repeat count, in canonical order."""
        return [t for t in TASKS if self.data.tasks.get(t, 0) > 0]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        data = self.to_dict()
        data["optim"]["betas"] = list(data["optim"]["betas"])
        return yaml.safe_dump(data, sort_keys=False)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _one_of(key: str, value: str, choices: tuple[str, ...], allow_path: bool = False) -> None:
    if value in choices or (allow_path and Path(str(value)).exists()):
        return
    extra = " or an existing folder" if allow_path else ""
    raise UserError(f"{key}={value!r} must be one of {list(choices)}{extra}")


# ---------------------------------------------------------------------------------------------
# Loading: YAML + overrides → dataclasses, with type conversion and unknown-key errors
# ---------------------------------------------------------------------------------------------


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a run YAML (or start from the defaults when `path` is None) and apply `key=value` overrides.

    Raises:
        UserError: unreadable file, unknown key (the valid ones are listed), bad value or override.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise UserError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UserError(f"{path}: expected a mapping of config keys at the top level")
        data = loaded or {}
    for item in overrides:
        apply_override(data, item)
    if not data:
        # Defaults alone would train 100 steps of an untrained preset into ./runs/unnamed.
        where = f"{path} sets no keys" if path is not None else "no run file and no overrides"
        raise UserError(f"{where}: a run must say what it trains (at least stage: and out_dir:); "
                        "start from one of configs/shapes/*.yaml")
    config = from_dict(TrainConfig, data, "config")
    config.validate()
    config.model.sampling = config.model_sampling()  # explicit: printed and saved with the run
    return config


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in the nested dict `data` (value parsed as YAML: numbers, lists, null, ...)."""
    if "=" not in item:
        raise UserError(f"override {item!r} must look like key=value, e.g. optim.lr=3e-4")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise UserError(f"override {item!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"override {item!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls, data: Any, where: str):
    """Build dataclass `cls` from a dict; unknown keys are an error listing the valid ones."""
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    return cls(**kwargs)


def _convert(hint: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type (nested dataclasses, Optional, dict/list/tuple, scalars)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if origin is dict:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a mapping, got {value!r}")
        return {str(k): _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UserError(f"{where} must have {len(args)} items, got {value!r}")
            return tuple(_convert(a, v, where) for a, v in zip(args, value))
        item = args[0] if args else Any
        converted = [_convert(item, v, where) for v in value]
        return tuple(converted) if origin is tuple else converted
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise UserError(f"{where} must be true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise UserError(f"{where} must be a number, got {value!r}")
        try:
            number = float(value) if hint is float else _to_int(value)
        except (TypeError, ValueError):
            raise UserError(f"{where} must be {'a number' if hint is float else 'an integer'}, got {value!r}") from None
        return number
    if hint is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value


def _to_int(value: Any) -> int:
    if isinstance(value, str):
        value = float(value) if any(c in value for c in ".eE") else int(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    return int(value)
