"""What an encoder's own files say about how it was trained, read before it is loaded.

Two facts decide the out-of-the-box settings (`rayexit.tasks.Task.default_settings`):

- the pooling its sentence representation was trained with: a sentence-transformers folder
  names it (`modules.json` -> the Pooling module's `config.json`); a rayexit model directory
  records the pooling its backbone was fine-tuned under;
- whether its pooler (BERT's dense + tanh over the first token) was ever trained. BERT-base's
  was, by next-sentence prediction, so its first token is a sentence summary; MiniLM and other
  distilled or sentence-embedding models keep a pooler whose bias is still exactly zero, which
  is how transformers initialises it and what no optimiser step leaves behind. A random
  initialised encoder looks the same, and so does a checkpoint without pooler weights.

Only file contents are read (JSON and one tensor of the safetensors), nothing is unpickled and
no model is built; a hub name is looked up through transformers' cache (downloading where a hub
is reachable: the same files `from_pretrained` fetches next).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from rayexit.config import POOLINGS
from rayexit.reading import read_text

log = logging.getLogger(__name__)

# an encoder's own checkpoint, a task model's (BertFor...), a rayexit model directory's backbone
POOLER_BIAS_KEYS = (
    "pooler.dense.bias", "bert.pooler.dense.bias", "roberta.pooler.dense.bias", "backbone.pooler.dense.bias"
)
JSON_LIMIT = 1 << 20  # these JSON files are a few hundred bytes

# sentence-transformers' Pooling modes (the boolean each older config sets) -> what rayexit's exit heads do
_ST_MODES = {
    "cls": ("pooling_mode_cls_token", "cls"),
    "mean": ("pooling_mode_mean_tokens", "mean"),
    # the mean scaled by sqrt(length): same direction, so the mean is the nearest
    "mean_sqrt_len": ("pooling_mode_mean_sqrt_len_tokens", "mean"),
    "weightedmean": ("pooling_mode_weightedmean_tokens", "mean"),
    # rayexit has neither max nor last-token pooling; the mean, like them, reads every token,
    # while the first token was not trained to summarise anything
    "max": ("pooling_mode_max_tokens", "mean"),
    "lasttoken": ("pooling_mode_lasttoken", "mean"),
}


@dataclass(frozen=True)
class BackboneFacts:
    """What the files of one encoder said; `None` where they said nothing."""

    name: str
    pooling: str | None = None  # from a sentence-transformers Pooling config or a rayexit model directory
    pooling_source: str = ""  # which file said so
    trained_pooler: bool | None = None  # None: no pooler weights found (or unreadable)
    rayexit_model: bool = False  # a rayexit model directory: its pooling is what its exits were trained with


def describe_backbone(name_or_path: str) -> BackboneFacts:
    """The facts above for a local folder, a rayexit model directory or a hub name."""
    from rayexit.data.packaged import resolve_model_name
    from rayexit.model_dir import EXIT_CONFIG_FILE

    resolved = resolve_model_name(name_or_path)
    pooling, source = _rayexit_pooling(resolved), EXIT_CONFIG_FILE
    rayexit_model = pooling is not None
    if not rayexit_model:
        pooling, source = _sentence_transformers_pooling(resolved)
    return BackboneFacts(resolved, pooling, source, _pooler_trained(resolved), rayexit_model)


def _file(name_or_path: str, filename: str) -> Path | None:
    """`filename` of a local folder, or of a hub repository through transformers' cache."""
    folder = Path(name_or_path)
    if folder.is_dir():
        path = folder / filename
        return path if path.is_file() else None
    try:
        from transformers.utils import cached_file

        found = cached_file(
            name_or_path, filename, _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except (OSError, ValueError):  # not a hub name, hub unreachable and nothing cached, ...
        return None
    return Path(found) if found else None


def _json(path: Path | None) -> dict | list | None:
    if path is None:
        return None
    try:
        return json.loads(read_text(path, max_file=JSON_LIMIT))
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s); its pooling is not used", path, exc)
        return None


def _rayexit_pooling(resolved: str) -> str | None:
    from rayexit.model_dir import EXIT_CONFIG_FILE

    record = _json(Path(resolved) / EXIT_CONFIG_FILE) if (Path(resolved) / EXIT_CONFIG_FILE).is_file() else None
    if isinstance(record, dict) and record.get("task") == "sequence" and record.get("pooling") in POOLINGS:
        return record["pooling"]
    return None


def _sentence_transformers_pooling(resolved: str) -> tuple[str | None, str]:
    modules = _json(_file(resolved, "modules.json"))
    if not isinstance(modules, list):
        return None, ""
    pooling = [m for m in modules if isinstance(m, dict) and str(m.get("type", "")).endswith(".Pooling")]
    if not pooling or not pooling[0].get("path"):
        return None, ""
    where = f"{pooling[0]['path']}/config.json"
    config = _json(_file(resolved, where))
    mode = _pooling_mode(config) if isinstance(config, dict) else None
    if mode is None:
        return None, ""
    return _ST_MODES[mode][1], f"its sentence-transformers {where} (mode {mode})"


def _pooling_mode(config: dict) -> str | None:
    """The Pooling module's mode: newer configs may name it, older ones set one boolean per mode."""
    named = config.get("pooling_mode")
    if isinstance(named, str) and named in _ST_MODES:
        return named
    chosen = [mode for mode, (key, _) in _ST_MODES.items() if config.get(key) is True]
    if not chosen:
        return None
    # Several modes concatenate their vectors; a head reads one: the first mean-like one if any.
    return next((m for m in chosen if m in ("mean", "mean_sqrt_len", "weightedmean")), chosen[0])


def _pooler_trained(resolved: str) -> bool | None:
    """Whether the checkpoint's pooler bias moved from its zero initialisation; None if it has none."""
    weights = _file(resolved, "model.safetensors")
    if weights is None:
        index = _json(_file(resolved, "model.safetensors.index.json"))
        weight_map = index.get("weight_map", {}) if isinstance(index, dict) else {}
        shard = next((weight_map[k] for k in POOLER_BIAS_KEYS if k in weight_map), None)
        weights = _file(resolved, shard) if isinstance(shard, str) else None
    if weights is None:
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as handle:
            key = next((k for k in POOLER_BIAS_KEYS if k in handle.keys()), None)
            if key is None:
                return None
            return bool(handle.get_tensor(key).abs().sum() > 0)
    except (OSError, ValueError, RuntimeError) as exc:  # a damaged file is refused later, with its name
        log.warning("%s: could not read the pooler's weights (%s)", weights, exc)
        return None
