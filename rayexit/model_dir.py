"""The model directory: the hand-off between every stage, read and written here only.

    config.json         a transformers config of model_type `rayexit-multi-exit` (rayexit.models.hf):
                        the backbone's config nested under `backbone`, task, heads, id2label/label2id.
                        Directories written before it hold the backbone's own config here; both load.
    model.safetensors   backbone and exit heads (safetensors only; nothing is unpickled)
    tokenizer files
    rayexit.json        task, labels, head type, pooling, exit policy and thresholds
    training.json       settings, data, seconds and per-epoch metrics of the run that made it

Every write builds the whole directory beside its target and renames it in, so a reader sees
the old directory or the new one, never a mix.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import PretrainedConfig

from rayexit import integrity
from rayexit.errors import RayexitError
from rayexit.files import replace_dir, staging_dir, write_json
from rayexit.models.encoder import ExitConfig, load_tokenizer
from rayexit.models.hf import MultiExitConfig
from rayexit.policy import ExitPolicy
from rayexit.reading import one_line

EXIT_CONFIG_FILE = "rayexit.json"
WEIGHTS_FILE = "model.safetensors"
TRAINING_FILE = "training.json"
LEFT_BEHIND = ("trial_points.json", ".is_checkpoint", ".metadata.pkl")  # Ray bookkeeping, not model files


def check_output_dir(path: str | Path) -> Path:
    """The folder a model directory may be written to: new, empty, holding only a tokenizer's files
    (saved first, as transformers users do), or a model directory to replace. Called before
    training as well as at the write, so a bad --output costs nothing."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise RayexitError(f"{target}: is a file; the output must be a folder (new, or a rayexit model directory)")
    if target.is_dir() and not (target / EXIT_CONFIG_FILE).exists():
        foreign = sorted(p.name for p in target.iterdir() if not _is_tokenizer_file(p.name))
        if foreign:
            raise RayexitError(f"{target}: exists and is not a rayexit model directory (it holds "
                               f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); choose a new folder")
    return target


def _is_tokenizer_file(name: str) -> bool:
    """A file `tokenizer.save_pretrained` writes (BERT, BPE and SentencePiece tokenizers)."""
    return name.startswith(("tokenizer", "special_tokens_map", "vocab.", "merges.", "added_tokens", "spiece.",
                            "sentencepiece", "chat_template"))


class ModelDir:
    """One model directory on disk."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"ModelDir({str(self.path)!r})"

    # -- reading ---------------------------------------------------------------------------------

    def exit_config(self) -> ExitConfig:
        path = self.path / EXIT_CONFIG_FILE
        if not path.is_file():
            raise RayexitError(
                f"{self.path}: not a rayexit model directory (no {EXIT_CONFIG_FILE}); "
                "train one with `rayexit train` or pass a folder it wrote"
            )
        data = integrity.read_record(path)  # bounded; binary, deep or damaged-digest files refused
        try:
            config = ExitConfig.from_dict(data)
        except (TypeError, ValueError, AttributeError) as exc:
            raise RayexitError(f"{path}: unreadable exit config ({one_line(exc)})") from None
        except RayexitError as exc:  # a hand-edited field (e.g. a policy threshold): say which file
            raise RayexitError(f"{path}: {exc}") from None
        integrity.check_exit_config(config, path)
        return config

    @property
    def task(self) -> str:
        return self.exit_config().task

    def training(self) -> dict[str, Any] | None:
        path = self.path / TRAINING_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def load_model(self, expected_task: str | None = None, dtype: Any = None):
        """The multi-exit model this directory holds, in eval mode; refuses another task's.

        `dtype`: None is float32; `auto` the dtype the weights were saved in (a model saved in
        bfloat16 comes back in bfloat16, as `from_pretrained(dtype="auto")` does in transformers);
        else a torch dtype or its name.
        """
        from rayexit.models.hf import _torch_dtype
        from rayexit.tasks import task_named

        chosen = None if dtype in (None, "auto") else _torch_dtype(dtype)  # refused before the folder is read

        if expected_task is not None:
            task_named(expected_task)  # a misspelt task is named with the valid ones, before the folder is read
        exit_config = self.exit_config()
        if expected_task is not None and exit_config.task != expected_task:
            raise RayexitError(f"{self.path}: holds a {exit_config.task!r} model, expected {expected_task!r}")
        model_class = task_named(exit_config.task).model_class()
        model = model_class(self._backbone(exit_config), exit_config)
        saved = self._load_weights(model)
        if dtype == "auto":
            chosen = saved
        if chosen is not None and chosen != torch.float32:
            model = model.to(dtype=chosen)
        return model.eval()

    def load_tokenizer(self):
        return load_tokenizer(self.path)

    def _backbone(self, exit_config: ExitConfig) -> torch.nn.Module:
        from transformers import AutoConfig, AutoModel

        integrity.check_files(self.path, [integrity.BACKBONE_CONFIG], EXIT_CONFIG_FILE)
        path = self.path / integrity.BACKBONE_CONFIG
        try:
            config = AutoConfig.from_pretrained(str(self.path))
        except Exception as exc:
            raise RayexitError(f"{path}: unreadable config ({one_line(exc)})") from None
        if isinstance(config, MultiExitConfig):
            _check_agrees(config, exit_config, path)
            config = config.backbone
        # else: written before config.json named the multi-exit model; it is the backbone's own
        return AutoModel.from_config(config, attn_implementation="sdpa")

    def _load_weights(self, model: torch.nn.Module) -> torch.dtype:
        return load_weights(model, self.path)

    # -- writing ---------------------------------------------------------------------------------

    @classmethod
    def write(
        cls, path: str | Path, model, tokenizer=None, training: dict[str, Any] | None = None
    ) -> ModelDir:
        """Write `model` (and its tokenizer and training record) as a whole new directory.

        Without `tokenizer`, the tokenizer files already at `path` are kept (a model saved back
        where it was loaded from, or beside a tokenizer saved first); nothing else of the old
        folder is: its training record described other weights.
        """
        target = check_output_dir(path)
        with staging_dir(target) as staging:
            MultiExitConfig.describing(model.backbone.config, model.exit_config).save_pretrained(staging)
            state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
            save_file(_untie(state), staging / WEIGHTS_FILE, metadata={"format": "pt"})
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            elif target.is_dir():
                for old in target.iterdir():
                    if old.is_file() and _is_tokenizer_file(old.name):
                        shutil.copy2(old, staging / old.name)
            if training is not None:
                write_json(staging / TRAINING_FILE, training)
            _write_record(staging, model.exit_config)
            replace_dir(staging, target)
        return cls(target)

    def with_policy(self, policy: ExitPolicy, target: str | Path, record: dict[str, Any] | None = None) -> ModelDir:
        """A copy of this directory at `target` whose saved policy is `policy` (an export).

        `record` (what chose the policy and the figures behind it) is kept under
        `extra.policy_choice`, so the directory says why it holds these thresholds.
        """
        exit_config = self.exit_config()
        policy.check_task(exit_config.task)
        exit_config.policy = policy
        if record is not None:
            exit_config.extra["policy_choice"] = record
        target = Path(target)
        if target.resolve() == self.path.resolve():
            with staging_dir(target) as staging:
                shutil.copytree(self.path, staging, dirs_exist_ok=True)
                _write_record(staging, exit_config)
                replace_dir(staging, target)
            return self
        with staging_dir(target) as staging:
            shutil.copytree(self.path, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*LEFT_BEHIND))
            _write_record(staging, exit_config)
            replace_dir(staging, target)
        return ModelDir(target)


def read_exit_config(directory: str | Path) -> ExitConfig:
    return ModelDir(directory).exit_config()


def load_weights(model: torch.nn.Module, directory: str | Path) -> torch.dtype:
    """Load the directory's weights into `model` (checked); returns the dtype they were saved in."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise RayexitError(f"{directory}: missing {WEIGHTS_FILE}")
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise RayexitError(f"{path}: unreadable weights ({one_line(exc)})") from None
    integrity.check_files(directory, [WEIGHTS_FILE], EXIT_CONFIG_FILE)
    state = integrity.check_state(state, model, path)  # strict: every key, every shape, finite
    integrity.check_max_length(model.exit_config.max_length, model.backbone, Path(directory) / EXIT_CONFIG_FILE)
    model.load_state_dict(state, strict=False)  # strict already; derived buffers may be absent
    return saved_dtype(state)


def saved_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype of saved weights: the one they all share, else float32 (a mixed save)."""
    kinds = {tensor.dtype for tensor in state.values() if tensor.is_floating_point()}
    return kinds.pop() if len(kinds) == 1 else torch.float32


def _check_agrees(config: MultiExitConfig, exit_config: ExitConfig, path: Path) -> None:
    """config.json and rayexit.json describe one model: the same task, heads and labels in the same order."""
    if not isinstance(config.backbone, PretrainedConfig):
        raise RayexitError(f"{path}: no `backbone` config; expected the encoder's config nested under `backbone`")
    for field in ("task", "head", "pooling"):
        here, there = getattr(config, field), getattr(exit_config, field)
        if here != there:
            raise RayexitError(f"{path}: {field} {here!r}, but {EXIT_CONFIG_FILE} says {there!r}")
    if config.labels() != exit_config.labels:
        raise RayexitError(
            f"{path}: id2label {config.labels()[:5]!r} differs from the labels in {EXIT_CONFIG_FILE} "
            f"{exit_config.labels[:5]!r}; expected the same labels in the same order"
        )


def _write_record(staging: Path, exit_config: ExitConfig) -> None:
    """rayexit.json, written last so that it records the digest of every file beside it."""
    (staging / EXIT_CONFIG_FILE).unlink(missing_ok=True)
    write_json(staging / EXIT_CONFIG_FILE, integrity.with_digests(exit_config.to_dict(), staging))


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage; give every tensor its own."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        ptr = tensor.data_ptr()
        out[key] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out
