"""Checkpoint folders for every registered policy kind: safetensors weights, YAML config, JSON normalizer and
version -- no pickle.

Layout of a checkpoint folder::

    model.safetensors   weights for inference (the EMA weights when given); a wrapper's own weights only
    config.yaml         {"policy": the kind's config (what loading rebuilds from), "run": the caller's config,
                         "base": {"path", "sha256"} for a wrapper: its base checkpoint, relative to this folder}
    normalizer.json     Normalizer.to_dict(): human-readable statistics (base families; also in the weights)
    version.json        {"robolearn": version, "format": FORMAT_VERSION, "policy_type": ..., "module": ...}
    extra.json          the caller's ``extra`` metadata (step, epoch, metrics), when given
    ...                 anything ``write_extra(tmp_folder)`` puts there (e.g. the trainer's train_state.pt)

The folder is written under a temporary sibling name (``.NAME.tmp-<hex>``) and renamed into place, so a crash
leaves either the old checkpoint or the new one, never half of one. Overwriting an existing checkpoint moves the
old one aside first (``.NAME.old-<hex>``) and deletes it only after the new one is in place; removing one
(:func:`remove_checkpoint`) renames it to ``.NAME.del-<hex>`` before deleting it.

A writer holds a shared ``flock`` on the parent folder itself while it writes (no lock file; the kernel drops the
lock when the process dies, SIGKILL included). :func:`clean_stale_writes` takes it exclusively, without waiting:
when it gets it, no writer is alive there, so every hidden folder of those three kinds was left by a killed one --
a temporary is deleted; a moved-aside checkpoint whose name is free is renamed back (the overwrite never
finished), otherwise deleted. A complete checkpoint is never deleted. Every :func:`save_policy` first does this
for its folder; on a file system that cannot lock directories nothing is cleaned.

A wrapper names its base by path and content: the SHA-256 of the base folder's weights, config, normalizer and
version files (:func:`checkpoint_digest`). A base that was deleted, moved or retrained since is refused when
the wrapper loads, with both paths in the message. Checkpoints written before the registry (format 1 without
``module``) load unchanged: their ``policy_type`` is one of the base families.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import robolearn
from robolearn.data.normalizer import Normalizer
from robolearn.policies.config import ConfigError
from robolearn.policies.folders import (CONFIG, EXTRA, NORMALIZER, VERSION, WEIGHTS,  # noqa: F401 (re-exported)
                                       CheckpointError, checkpoint_folder)
from robolearn.policies.registry import policy_class

FORMAT_VERSION = 1
_DIGESTED = (WEIGHTS, CONFIG, NORMALIZER, VERSION)
_MAX_DEPTH = 8  # wrappers of wrappers of ...


# ---------------------------------------------------------------------------------------------- saving
def save_policy(
    policy: Any,
    folder: str | os.PathLike,
    config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    *,
    ema_state_dict: Mapping[str, torch.Tensor] | None = None,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``policy`` (any registered kind) as a checkpoint folder at ``folder`` (atomically); return its path.

    ``config``: the caller's full run config, saved under ``run`` for provenance (load ignores it).
    ``extra``: JSON-able metadata. ``ema_state_dict``: weights to save instead of ``policy``'s own (an EMA
    copy of the same architecture). ``write_extra(tmp)``: writes more files into the folder before the rename.
    A wrapper's base must have been loaded from (or saved as) a checkpoint folder that is unchanged since.
    """
    folder = Path(folder)
    own = policy.checkpoint_state()
    state = _unwrap_ema(ema_state_dict) if ema_state_dict is not None else own
    if set(state) != set(own):
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise CheckpointError(f"ema_state_dict does not match the policy: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    for k, t in tensors.items():  # a diverged model must not become the newest checkpoint
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"cannot save {folder}: tensor {k!r} holds NaN or inf (did training diverge?); "
                                  f"the checkpoints already written are left as they are")
    doc: dict[str, Any] = {"policy": dict(policy.checkpoint_config()), "run": _jsonable(dict(config or {}))}
    if getattr(policy, "wraps_base", False):
        doc["base"] = _base_reference(policy.base, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_writes(folder.parent)  # what writers killed here left: before this write, never during it
    with writing_checkpoints(folder.parent):
        tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            save_file(tensors, str(tmp / WEIGHTS), metadata={"policy_type": policy.policy_type})
            with open(tmp / CONFIG, "w") as f:
                yaml.safe_dump(doc, f, sort_keys=False)
            if not getattr(policy, "wraps_base", False):
                (tmp / NORMALIZER).write_text(json.dumps(policy.normalizer.to_dict(), indent=1))
            version = {"robolearn": robolearn.__version__, "format": FORMAT_VERSION,
                       "policy_type": policy.policy_type, "module": type(policy).__module__}
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
            if old is not None:  # renamed before deleting: a kill mid-delete leaves a .del-, never a partial .old-
                _trash(old, folder.name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


# ------------------------------------------------------------------------------------- writers, live and dead
_LEFT_BEHIND = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|del)-[0-9a-f]{8}$")


@contextlib.contextmanager
def _flock(folder: Path, operation: int) -> Iterator[bool | None]:
    """``flock`` on the folder itself, released on leaving (or by the kernel when the process dies). Yields True
    when held, False when another process holds a conflicting lock (a ``LOCK_NB`` request), None when the folder
    cannot be locked (a file system without ``flock`` on directories): then nothing is held."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, operation)
            held: bool | None = True
        except BlockingIOError:
            held = False
        except OSError:
            held = None
        yield held
    finally:
        os.close(fd)


@contextlib.contextmanager
def writing_checkpoints(parent: str | os.PathLike) -> Iterator[None]:
    """Hold while writing, moving or removing checkpoints in ``parent``: a shared lock on the folder, which tells
    :func:`clean_stale_writes` that a writer is alive there. Any number of writers may hold it at once."""
    with _flock(Path(parent), fcntl.LOCK_SH):
        yield


@contextlib.contextmanager
def no_checkpoint_writers(parent: str | os.PathLike) -> Iterator[bool | None]:
    """Hold ``parent`` so that no checkpoint write starts there, if no writer is at work now (no waiting). Yields
    True when held, False when a live writer is at work, None when the file system cannot lock the folder."""
    with _flock(Path(parent), fcntl.LOCK_EX | fcntl.LOCK_NB) as held:
        yield held


def clean_stale_writes(parent: str | os.PathLike, *, held: bool = False) -> list[str] | None:
    """Undo what checkpoint writers killed in ``parent`` left there: delete their temporary folders
    (``.NAME.tmp-<hex>``) and interrupted removals (``.NAME.del-<hex>``); rename a moved-aside checkpoint
    (``.NAME.old-<hex>``) back to NAME when NAME is free (its overwrite never finished), else delete it.

    Returns what was done, one line each; None, touching nothing, when a writer is alive in ``parent`` or the
    folder cannot be locked. ``held``: the caller already holds :func:`no_checkpoint_writers` on ``parent``.
    """
    parent = Path(parent)
    if not held:
        if not parent.is_dir():
            return []
        with no_checkpoint_writers(parent) as free:
            return clean_stale_writes(parent, held=True) if free else None
    try:
        entries = sorted(os.listdir(parent))
    except FileNotFoundError:
        return []
    done: list[str] = []
    for entry in entries:
        m = _LEFT_BEHIND.match(entry)
        path = parent / entry
        if m is None or path.is_symlink() or not path.is_dir():
            continue
        name, kind = m["name"], m["kind"]
        if not _looks_like_checkpoint_write(path):
            continue  # a folder of that shape that a checkpoint writer did not make: not ours to touch
        if kind == "old" and not os.path.lexists(parent / name):
            os.rename(path, parent / name)
            done.append(f"restored the checkpoint {name} from {entry} (a killed overwrite had moved it aside)")
            continue
        if kind == "old":
            _trash(path, name)
        else:
            shutil.rmtree(path, ignore_errors=True)
        done.append({"tmp": f"removed the unfinished checkpoint write {entry}",
                     "old": f"removed {entry}, the previous {name} (its overwrite was killed after replacing it)",
                     "del": f"removed {entry} (a removal of the checkpoint {name} that was killed)"}[kind])
    return done


def _looks_like_checkpoint_write(path: Path) -> bool:
    """An empty folder (a writer killed right after making it) or one holding checkpoint files."""
    try:
        names = set(os.listdir(path))
    except OSError:
        return False
    return not names or bool(names & {WEIGHTS, CONFIG, NORMALIZER, VERSION, EXTRA})


def _trash(path: Path, name: str) -> None:
    """Delete ``path`` after renaming it ``.NAME.del-<hex>`` (what :func:`clean_stale_writes` removes)."""
    trash = path.parent / f".{name}.del-{uuid.uuid4().hex[:8]}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_checkpoint(folder: str | os.PathLike) -> None:
    """Delete a checkpoint folder all at once: renamed to ``.NAME.del-<hex>`` and then deleted, so a kill in
    between leaves a hidden folder (which :func:`clean_stale_writes` removes), never a part of one under NAME."""
    folder = Path(folder)
    with writing_checkpoints(folder.parent):
        _trash(folder, folder.name)


def _base_reference(base: Any, folder: Path) -> dict[str, Any]:
    where = getattr(base, "checkpoint_path", None)
    if not where:
        raise CheckpointError(f"cannot save {folder}: its base policy was not loaded from a checkpoint folder "
                              f"(save the base with save_policy and load it with load_policy first)")
    base_folder = Path(where)
    if not base_folder.is_dir():
        raise CheckpointError(f"cannot save {folder}: its base checkpoint {base_folder} no longer exists")
    loaded = getattr(base, "checkpoint_stamp", None)
    if loaded is not None and loaded != _stamp(base_folder):
        raise CheckpointError(f"cannot save {folder}: its base checkpoint {base_folder} changed on disk after it "
                              f"was loaded (reload it)")
    digest = checkpoint_digest(base_folder)
    rel = os.path.relpath(base_folder.resolve(), folder.resolve())
    return {"path": rel, "sha256": digest}


def _stamp(folder: Path) -> list[tuple[str, int, int]]:
    """Size and modification time of the digested files: a cheap "changed since loading?" (the digest itself
    reads every byte of the weights, so it is computed only when a wrapper is saved or loaded)."""
    out = []
    for name in _DIGESTED:
        st = (folder / name).stat() if (folder / name).is_file() else None
        out.append((name, st.st_size if st else -1, st.st_mtime_ns if st else -1))
    return out


def checkpoint_digest(folder: str | os.PathLike) -> str:
    """SHA-256 over the files that define a checkpoint's policy (weights, config, normalizer, version)."""
    h = hashlib.sha256()
    for name in _DIGESTED:
        path = Path(folder) / name
        if not path.is_file():
            continue
        h.update(name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


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


# ---------------------------------------------------------------------------------------------- reading
def _read_config(folder: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    folder = checkpoint_folder(folder)
    if not folder.is_dir():
        _restore_moved_aside(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(f"checkpoint {folder} is missing {CONFIG}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}): is it a "
                              f"binary file?") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("policy"), dict):
        raise CheckpointError(f"{path} has no 'policy' mapping (is it a robolearn checkpoint?)")
    return path, data


def _restore_moved_aside(folder: Path) -> None:
    """An overwrite killed between moving the old checkpoint aside and renaming the new one into place leaves the
    complete old one as ``.NAME.old-<hex>``: a reader puts that one (and only it) back, when no writer is alive."""
    import warnings

    try:
        aside = sorted(e for e in os.listdir(folder.parent) if e.startswith(f".{folder.name}.old-")
                       and _LEFT_BEHIND.match(e) and (folder.parent / e / WEIGHTS).is_file())
    except OSError:
        return
    if not aside:
        return
    with no_checkpoint_writers(folder.parent) as free:
        if not free or folder.exists():
            return
        try:
            os.rename(folder.parent / aside[-1], folder)
        except OSError as e:
            raise CheckpointError(f"checkpoint folder {folder} does not exist; its previous copy waits as "
                                  f"{folder.parent / aside[-1]} (an overwrite was killed) and could not be put "
                                  f"back ({e.strerror or e}): rename it to {folder.name}") from None
    warnings.warn(f"restored the checkpoint {folder} from {aside[-1]} (a killed overwrite had moved it aside)",
                  stacklevel=3)


def read_checkpoint_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The policy config of a checkpoint (``config.yaml``'s ``policy`` section)."""
    return _read_config(folder)[1]["policy"]


def read_run_config(folder: str | os.PathLike, _depth: int = 0) -> dict[str, Any]:
    """What the training run said about itself (``config.yaml``'s ``run`` section: task, env_config, ...);
    a wrapper's own entries over its base's (so a residual over a push_t policy is a push_t policy);
    ``{}`` when the checkpoint was saved without one."""
    path, data = _read_config(folder)
    run = data.get("run") or {}
    if not isinstance(run, dict):
        raise CheckpointError(f"{path}: 'run' is not a mapping")
    if data.get("base") is not None:
        if _depth >= _MAX_DEPTH:
            raise CheckpointError(f"{folder}: wrappers nest deeper than {_MAX_DEPTH} (a cycle of base paths?)")
        base = _resolve_base(Path(folder), data["base"], check_digest=False)
        run = {**read_run_config(base, _depth + 1), **run}
    return run


def _read_version(folder: Path) -> dict[str, Any]:
    try:
        version = json.loads((folder / VERSION).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{folder / VERSION} is not valid JSON: {e}") from None
    if not isinstance(version, dict) or version.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{folder / VERSION}: checkpoint format {version!r} is not {FORMAT_VERSION}")
    return version


def _resolve_base(folder: Path, ref: Any, *, check_digest: bool = True) -> Path:
    where = folder / CONFIG
    if not isinstance(ref, dict) or not isinstance(ref.get("path"), str) or not isinstance(ref.get("sha256"), str):
        raise CheckpointError(f"{where}: 'base' must hold the base checkpoint's 'path' and 'sha256'")
    base = (folder / ref["path"]).resolve()
    if base == folder.resolve():
        raise CheckpointError(f"{where}: the base of checkpoint {folder} is the checkpoint itself")
    if not base.is_dir():
        raise CheckpointError(f"checkpoint {folder} wraps the base checkpoint {base}, which does not exist "
                              f"(deleted or moved? the wrapper needs it)")
    if check_digest:
        digest = checkpoint_digest(base)
        if digest != ref["sha256"]:
            raise CheckpointError(f"checkpoint {folder} was made over base checkpoint {base} with content "
                                  f"{ref['sha256'][:12]}, but {base} now holds {digest[:12]}: the base changed "
                                  f"(retrained or replaced) since the wrapper was saved")
    return base


def load_policy(
    folder: str | os.PathLike, expected_type: str | None = None, *, map_location: str | torch.device = "cpu",
    _depth: int = 0,
) -> Any:
    """Load any registered kind of policy from a checkpoint folder (in eval mode); a wrapper loads its base too.

    ``expected_type``: refuse a checkpoint of another policy type (e.g. ``"diffusion"``).
    """
    folder = checkpoint_folder(folder)
    path, doc = _read_config(folder)
    for name in (WEIGHTS, VERSION):
        if not (folder / name).is_file():
            raise CheckpointError(f"checkpoint {folder} is missing {name}")
    version = _read_version(folder)
    cfg = doc["policy"]
    ptype = cfg.get("type")
    if ptype != version.get("policy_type"):
        raise CheckpointError(f"{folder}: config.yaml says policy type {ptype!r} but version.json says "
                              f"{version.get('policy_type')!r}")
    if expected_type is not None and ptype != expected_type:
        raise CheckpointError(f"checkpoint {folder} holds a {ptype!r} policy, expected {expected_type!r}")
    try:
        cls = policy_class(str(ptype), version.get("module"))
    except KeyError as e:
        raise CheckpointError(f"{folder}: {e.args[0]}") from None
    base = normalizer = None
    if getattr(cls, "wraps_base", False):
        if _depth >= _MAX_DEPTH:
            raise CheckpointError(f"{folder}: wrappers nest deeper than {_MAX_DEPTH} (a cycle of base paths?)")
        base = load_policy(_resolve_base(folder, doc.get("base")), map_location=map_location, _depth=_depth + 1)
    else:
        normalizer = _read_normalizer(folder)
    try:
        policy = cls.from_checkpoint(cfg, normalizer=normalizer, base=base)
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot build the policy: {e}") from None
    _load_weights(policy, folder, map_location)
    policy.checkpoint_path = str(folder.resolve())
    policy.checkpoint_stamp = _stamp(folder)
    return policy.to(map_location).eval()


def _read_normalizer(folder: Path) -> Normalizer:
    path = folder / NORMALIZER
    if not path.is_file():
        raise CheckpointError(f"checkpoint {folder} is missing {NORMALIZER}")
    try:
        return Normalizer.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a valid normalizer: {e}") from None


def _load_weights(policy: Any, folder: Path, map_location: str | torch.device) -> None:
    try:
        state = load_file(str(folder / WEIGHTS), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{folder / WEIGHTS} cannot be read: {e}") from None
    own = policy.checkpoint_state()
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
    for k in own:  # in the model's order: the message names the first tensor that is not finite
        t = state[k]
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            counts = ((int(torch.isnan(t).sum()), "NaN"), (int(torch.isinf(t).sum()), "inf"))
            what = " and ".join(f"{n} {kind} value{'s' if n != 1 else ''}" for n, kind in counts if n)
            raise CheckpointError(f"{folder / WEIGHTS}: tensor {k!r} holds {what} (of {t.numel()}): the weights "
                                  f"are not finite (did training diverge before this checkpoint was saved?)")
    policy.load_checkpoint_state(state)
