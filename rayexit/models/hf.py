"""What makes a rayexit model directory a Hugging Face citizen: its config class and model base.

`config.json` of a model directory is a `MultiExitConfig` (model_type `rayexit-multi-exit`): the
backbone's own config nested under `backbone`, the task, the head layout and `id2label` /
`label2id`. Once rayexit is imported, `AutoConfig.from_pretrained(folder)` gives that config and
`AutoModel` / `AutoModelForSequenceClassification` / `AutoModelForTokenClassification` give the
multi-exit model with its trained weights. Without rayexit imported, transformers does not know
the model type and `AutoConfig` raises, instead of building a randomly initialised BERT and
dropping every `backbone.`-prefixed tensor as it did when `config.json` was the backbone's own.

Loading and saving still go through `rayexit.model_dir.ModelDir` (digests, strict keys and
shapes, safetensors only): the model classes route `from_pretrained` / `save_pretrained` there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from rayexit.errors import RayexitError

MODEL_TYPE = "rayexit-multi-exit"
BACKBONE_KEY = "backbone"


def backbone_config_from_dict(data: dict[str, Any]) -> PretrainedConfig:
    """A backbone's config (BERT, RoBERTa, ...) from its `config.json` contents."""
    data = dict(data)
    model_type = data.pop("model_type", None)
    if not isinstance(model_type, str) or not model_type:
        raise RayexitError(f"config.json `{BACKBONE_KEY}`: no model_type; expected an encoder's config (bert, ...)")
    if model_type == MODEL_TYPE:
        raise RayexitError(f"config.json `{BACKBONE_KEY}`: a {MODEL_TYPE} config cannot be its own backbone")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, TypeError) as exc:
        raise RayexitError(f"config.json `{BACKBONE_KEY}`: unreadable {model_type} config ({exc})") from None


class MultiExitConfig(PretrainedConfig):
    """A multi-exit encoder: the backbone's config plus what the exit heads need to be built.

    The exit policy and training record stay in `rayexit.json`; this holds only what a
    transformers user looks for (model type, labels) and what shapes the weights.
    """

    model_type = MODEL_TYPE

    # A custom __init__ (not dataclass fields) so one class serves transformers 4.x and 5.x.
    def __init__(
        self,
        backbone: PretrainedConfig | dict[str, Any] | None = None,
        task: str = "sequence",
        head: str = "pooler",
        pooling: str = "cls",
        dropout: float = 0.1,
        **kwargs: Any,
    ) -> None:
        if isinstance(backbone, dict):
            backbone = backbone_config_from_dict(backbone)
        self.backbone = backbone
        self.task = task
        self.head = head
        self.pooling = pooling
        self.dropout = dropout
        super().__init__(**kwargs)

    @classmethod
    def describing(cls, backbone_config: PretrainedConfig, exit_config) -> MultiExitConfig:
        """The config of a model with this backbone and this `ExitConfig` (labels in order)."""
        labels = list(exit_config.labels)
        return cls(
            backbone=backbone_config,
            task=exit_config.task,
            head=exit_config.head,
            pooling=exit_config.pooling,
            dropout=exit_config.dropout,
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            architectures=[_ARCHITECTURES.get(exit_config.task, "MultiExitEncoder")],
        )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if isinstance(self.backbone, PretrainedConfig):
            # What the backbone's own config.json would hold (its differences from the defaults).
            backbone = self.backbone.to_diff_dict()
            backbone.pop("transformers_version", None)
            out[BACKBONE_KEY] = backbone
        return out

    def labels(self) -> list[str]:
        """Labels in index order, from `id2label`."""
        id2label = self.id2label or {}
        return [id2label[i] for i in sorted(id2label)]


_ARCHITECTURES = {"sequence": "MultiExitForSequenceClassification", "token": "MultiExitForTokenClassification"}


class MultiExitPreTrainedModel(PreTrainedModel):
    """transformers' model base for the multi-exit encoders (`rayexit.models.encoder.MultiExitEncoder`).

    The subclasses are built from a backbone module and an `ExitConfig`, as before; this base
    gives them a `config`, the `Auto*` registration and `from_pretrained` / `save_pretrained`
    that read and write through `ModelDir`.
    """

    config_class = MultiExitConfig
    base_model_prefix = BACKBONE_KEY
    main_input_name = "input_ids"
    task = ""  # "" loads a directory of either task (AutoModel); subclasses refuse the other one

    def init_weights(self) -> None:
        # transformers' post_init would re-initialise every submodule, the pretrained backbone
        # included (it dispatches into nested PreTrainedModels); heads initialise themselves.
        return None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *model_args: Any, **kwargs: Any):
        """Load a rayexit model directory through `ModelDir` (digests and strict keys checked).

        Takes what `AutoModel.from_pretrained` passes along (config, hub options left at their
        defaults, `dtype`); anything that would change what is loaded is refused by name.
        """
        from rayexit.model_dir import ModelDir

        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        kwargs.pop("config", None)  # AutoModel's copy of config.json; ModelDir reads and checks its own
        ignored = {"trust_remote_code", "adapter_kwargs", "_from_auto", "revision", "local_files_only", "cache_dir"}
        refused = sorted(k for k, v in kwargs.items() if k not in ignored and v not in (None, False, {}))
        if model_args or refused:
            named = ", ".join(refused) or f"{len(model_args)} positional argument(s)"
            raise RayexitError(f"{cls.__name__}.from_pretrained: unsupported option(s) {named} for a rayexit model")
        path = Path(pretrained_model_name_or_path)
        if not path.is_dir():
            raise RayexitError(
                f"{pretrained_model_name_or_path}: not a local folder; rayexit model directories load from disk "
                "(download one first, e.g. `hf download NAME --local-dir DIR`)"
            )
        return ModelDir(path).load_model(expected_task=cls.task or None, dtype=dtype)

    def save_pretrained(self, save_directory: str | Path, tokenizer=None, training: dict | None = None, **kwargs: Any):
        """Write the model directory atomically (see `rayexit.model_dir.ModelDir.write`)."""
        from rayexit.model_dir import ModelDir

        # what rayexit always does (safetensors, one file) is accepted when asked for; the opposite is refused
        if kwargs.get("safe_serialization") is True:
            del kwargs["safe_serialization"]
        kwargs.pop("max_shard_size", None)  # one weights file, whatever its size
        unknown = sorted(k for k, v in kwargs.items() if v not in (None, False) and k != "is_main_process")
        if kwargs.get("safe_serialization") is False:
            unknown.append("safe_serialization=False (rayexit writes safetensors only)")
        if unknown:
            raise RayexitError(f"save_pretrained: unsupported option(s) {', '.join(unknown)} for a rayexit model")
        ModelDir.write(save_directory, self, tokenizer, training)

    @classmethod
    def _from_config(cls, config: MultiExitConfig, **kwargs: Any):
        """`AutoModel.from_config`: a new model (random backbone and heads) of the config's shape."""
        from transformers import AutoModel

        from rayexit.models.encoder import ExitConfig
        from rayexit.tasks import task_named

        if cls.task and config.task != cls.task:
            raise RayexitError(f"config: task {config.task!r}, but {cls.__name__} is a {cls.task!r} model")
        exit_config = ExitConfig(
            task=config.task, labels=config.labels(), head=config.head, pooling=config.pooling, dropout=config.dropout
        )
        backbone = AutoModel.from_config(config.backbone, attn_implementation=kwargs.pop("attn_implementation", "sdpa"))
        return task_named(config.task).model_class()(backbone, exit_config)


DTYPE_NAMES = ("float32", "float16", "bfloat16")


def _torch_dtype(dtype: Any):
    import torch

    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPE_NAMES:
        return getattr(torch, dtype.removeprefix("torch."))
    raise RayexitError(f"dtype: got {dtype!r}, expected \"auto\", one of {', '.join(DTYPE_NAMES)} or a torch "
                       "floating-point dtype")


def register() -> None:
    """Make `AutoConfig` / `AutoModel*` know `rayexit-multi-exit` (idempotent; runs on import of rayexit)."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification

    from rayexit.models.encoder import MultiExitEncoder
    from rayexit.models.sequence import MultiExitForSequenceClassification
    from rayexit.models.token import MultiExitForTokenClassification

    AutoConfig.register(MODEL_TYPE, MultiExitConfig, exist_ok=True)
    AutoModel.register(MultiExitConfig, MultiExitEncoder, exist_ok=True)
    AutoModelForSequenceClassification.register(MultiExitConfig, MultiExitForSequenceClassification, exist_ok=True)
    AutoModelForTokenClassification.register(MultiExitConfig, MultiExitForTokenClassification, exist_ok=True)
