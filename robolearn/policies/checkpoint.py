"""Checkpoint folders: safetensors weights, YAML config, JSON normalizer and version — no pickle.

Layout of a checkpoint folder::

    model.safetensors   weights for inference (the EMA weights when given), normalizer buffers included
    config.yaml         {"policy": resolved policy config (what load_policy rebuilds from), "run": caller's config}
    normalizer.json     Normalizer.to_dict(): human-readable statistics (also in the weights)
    version.json        {"robolearn": version, "format": FORMAT_VERSION, "policy_type": ...}
    extra.json          the caller's ``extra`` metadata (step, epoch, metrics), when given
    ...                 anything ``write_extra(tmp_folder)`` puts there (e.g. the lead's train_state.pt)

The folder is written under a temporary sibling name and renamed into place, so a crash leaves either the
old checkpoint or the new one, never half of one. Overwriting an existing checkpoint moves the old one aside
first and deletes it only after the new one is in place.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import robolearn
from robolearn.data.normalizer import Normalizer
from robolearn.policies.base import ChunkPolicy
from robolearn.policies.factory import ConfigError, make_policy

FORMAT_VERSION = 1
WEIGHTS, CONFIG, NORMALIZER, VERSION, EXTRA = (
    "model.safetensors", "config.yaml", "normalizer.json", "version.json", "extra.json"
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the folder, file or key at fault."""


def save_policy(
    policy: ChunkPolicy,
    folder: str | os.PathLike,
    config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    *,
    ema_state_dict: Mapping[str, torch.Tensor] | None = None,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``policy`` as a checkpoint folder at ``folder`` (atomically) and return its path.

    ``config``: the caller's full run config, saved under ``run`` for provenance (load ignores it).
    ``extra``: JSON-able metadata. ``ema_state_dict``: weights to save instead of ``policy``'s own (an EMA
    copy of the same architecture). ``write_extra(tmp)``: writes more files into the folder before the rename.
    """
    folder = Path(folder)
    state = _unwrap_ema(ema_state_dict) if ema_state_dict is not None else policy.state_dict()
    own = policy.state_dict()
    if set(state) != set(own):
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise CheckpointError(f"ema_state_dict does not match the policy: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}

    policy_cfg = dict(policy.config)
    policy_cfg["sampler"] = dict(policy.sampler_config)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"policy_type": policy.policy_type})
        with open(tmp / CONFIG, "w") as f:
            yaml.safe_dump({"policy": policy_cfg, "run": _jsonable(dict(config or {}))}, f, sort_keys=False)
        (tmp / NORMALIZER).write_text(json.dumps(policy.normalizer.to_dict(), indent=1))
        version = {"robolearn": robolearn.__version__, "format": FORMAT_VERSION, "policy_type": policy.policy_type}
        (tmp / VERSION).write_text(json.dumps(version, indent=1))
        if extra is not None:
            (tmp / EXTRA).write_text(json.dumps(_jsonable(dict(extra)), indent=1))
        if write_extra is not None:
            write_extra(tmp)
        for p in tmp.iterdir():  # contents durable before the rename makes them visible
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _unwrap_ema(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept ``torch.optim.swa_utils.AveragedModel(policy).state_dict()`` too: drop its ``n_averaged``
    counter and ``module.`` prefix."""
    keys = [k for k in state if k != "n_averaged"]
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: state[k] for k in keys}
    return dict(state)


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def _read_config(folder: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    folder = _check_folder(folder)
    path = folder / CONFIG
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("policy"), dict):
        raise CheckpointError(f"{path} has no 'policy' mapping (is it a robolearn checkpoint?)")
    return path, data


def read_checkpoint_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The resolved policy config of a checkpoint (``config.yaml``'s ``policy`` section)."""
    return _read_config(folder)[1]["policy"]


def read_run_config(folder: str | os.PathLike) -> dict[str, Any]:
    """What the training run said about itself (``config.yaml``'s ``run`` section: task, env_config, ...);
    ``{}`` when the checkpoint was saved without one."""
    path, data = _read_config(folder)
    run = data.get("run") or {}
    if not isinstance(run, dict):
        raise CheckpointError(f"{path}: 'run' is not a mapping")
    return run


def _check_folder(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    for name in (WEIGHTS, CONFIG, NORMALIZER, VERSION):
        if not (folder / name).is_file():
            raise CheckpointError(f"checkpoint {folder} is missing {name}")
    return folder


def load_policy(
    folder: str | os.PathLike, expected_type: str | None = None, *, map_location: str | torch.device = "cpu"
) -> ChunkPolicy:
    """Rebuild a policy from a checkpoint folder and load its weights (in eval mode).

    ``expected_type`` ("diffusion" | "flow"): refuse a checkpoint of another policy type.
    """
    folder = _check_folder(folder)
    try:
        version = json.loads((folder / VERSION).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{folder / VERSION} is not valid JSON: {e}") from None
    if not isinstance(version, dict) or version.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{folder / VERSION}: checkpoint format {version!r} is not {FORMAT_VERSION}")
    cfg = read_checkpoint_config(folder)
    ptype = cfg.get("type")
    if ptype != version.get("policy_type"):
        raise CheckpointError(f"{folder}: config.yaml says policy type {ptype!r} but version.json says "
                              f"{version.get('policy_type')!r}")
    if expected_type is not None and ptype != expected_type:
        raise CheckpointError(f"checkpoint {folder} holds a {ptype!r} policy, expected {expected_type!r}")
    try:
        normalizer = Normalizer.from_dict(json.loads((folder / NORMALIZER).read_text()))
    except (json.JSONDecodeError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{folder / NORMALIZER} is not a valid normalizer: {e}") from None
    try:
        policy = make_policy(cfg, normalizer=normalizer)
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / CONFIG}: cannot build the policy: {e}") from None
    try:
        state = load_file(str(folder / WEIGHTS), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{folder / WEIGHTS} cannot be read: {e}") from None
    own = policy.state_dict()
    for k in set(own) - set(state):  # checkpoints written before the normalizer held constant dimensions
        if k.startswith("normalizer.") and k.endswith("__hold"):
            state[k] = own[k]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{folder / WEIGHTS} does not match the config: missing keys {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                              f"{'...' if len(unexpected) > 5 else ''}")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{folder / WEIGHTS}: key {k!r} has shape {tuple(state[k].shape)}, "
                                  f"the config builds {tuple(v.shape)}")
    policy.load_state_dict(state, strict=True)
    return policy.to(map_location).eval()
