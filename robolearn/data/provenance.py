"""Where each episode of a store came from, and what the store as a whole may claim about it.

Why this exists: a store used to record how it was collected only in its root ``source`` attribute, written once
when it was created. Appending demonstrations made with other settings (``expert.noise=0.3`` into a store collected
clean, another checkpoint, other environment overrides) left that attribute claiming the first settings for every
episode. Now:

- every writer that knows (``robolearn collect``, teleop) records each episode's **provenance** in its per-episode
  attributes (:meth:`EpisodeStore.episode_attrs`): ``source`` (``scripted`` | ``policy`` | ``teleop`` |
  ``intervention``) and, as they apply, ``noise``, ``policy``, ``policy_type``, ``policy_sha256`` and
  ``env_config_changes`` (the environment settings that differ from the store's root ``env_config``, which stays
  the environment the store was created for). Other attributes (``expert``, ``seed``, ``success``, times) are
  facts of one episode, not part of how it was made: the expert is the task's, and the task must match anyway;
- episodes written before that (no ``source`` in their attributes) are taken to be what the root ``source`` says
  -- the only claim anything ever made about them -- and are given that claim as their own attributes as soon as
  an episode with its own provenance joins them (:func:`backfill`), so the claim is never lost;
- the root ``source`` then summarises: unchanged while every episode agrees with it, ``{"kind": "mixed",
  "sources": [...distinct provenances...]}`` once they differ (:func:`root_summary`).

A teleop store's root says only ``{"kind": "teleop"}``: teleop records every episode itself, so an episode without
attributes in such a store was appended by something else and is *unknown*, never assumed to be teleoperated.

Pure functions over JSON-able dicts (no zarr here): the store calls them when it appends, ``collect`` when it checks
an append, ``robolearn data info`` when it describes a store.
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Mapping, Sequence

# Per-episode attribute keys that say how an episode was made (expert, seed, success, times... are facts of one
# episode).
PROVENANCE_KEYS = ("source", "noise", "bias", "policy", "policy_type", "policy_sha256", "env_config_changes")

# Settings compared before an append, in the words the ``collect`` command line uses.
_SETTING_NAMES = {"source": "source", "noise": "expert.noise", "bias": "expert.bias", "policy": "policy"}


def root_to_provenance(root_source: Any) -> dict[str, Any]:
    """What a store's root ``source`` attribute claims about an episode that carries no provenance of its own."""
    if not isinstance(root_source, Mapping):
        return {}
    prov = _root_claim(root_source)
    if prov and root_source.get("env_config_changes"):
        prov["env_config_changes"] = dict(root_source["env_config_changes"])
    return prov


def _root_claim(root_source: Mapping[str, Any]) -> dict[str, Any]:
    kind = root_source.get("kind")
    if kind == "scripted_expert":
        out: dict[str, Any] = {"source": "scripted"}
        if root_source.get("noise") is not None:
            out["noise"] = float(root_source["noise"])
        if root_source.get("bias"):
            out["bias"] = float(root_source["bias"])
        return out
    if kind == "policy":
        out = {"source": "policy"}
        for src, dst in (("checkpoint", "policy"), ("policy_type", "policy_type"), ("sha256", "policy_sha256")):
            if root_source.get(src) is not None:
                out[dst] = root_source[src]
        return out
    if kind in (None, "teleop", "mixed"):  # teleop records its own episodes; "mixed" claims nothing per episode
        return {}
    return {"source": str(kind)}


def provenance_to_root(prov: Mapping[str, Any]) -> dict[str, Any]:
    """The root ``source`` attribute for a store whose episodes all share ``prov`` (the format collect writes)."""
    source = prov.get("source")
    if source == "scripted":
        out: dict[str, Any] = {"kind": "scripted_expert", "noise": prov.get("noise"), "bias": prov.get("bias")}
    elif source == "policy":
        out = {"kind": "policy", "checkpoint": prov.get("policy"), "policy_type": prov.get("policy_type"),
               "sha256": prov.get("policy_sha256")}
    else:
        out = {"kind": source, **{k: v for k, v in prov.items() if k not in ("source", "env_config_changes")}}
    out = {k: v for k, v in out.items() if v is not None}
    if prov.get("env_config_changes"):
        out["env_config_changes"] = dict(prov["env_config_changes"])
    return out


def episode_provenance(entry: Mapping[str, Any] | None, root_source: Any) -> dict[str, Any]:
    """An episode's provenance: its own (when its attributes say ``source``), else what the root claims.
    ``{}`` when nothing is known."""
    entry = entry or {}
    if "source" in entry:
        return {k: entry[k] for k in PROVENANCE_KEYS if k in entry}
    prov = root_to_provenance(root_source)
    if prov and entry.get("env_config_changes"):
        prov["env_config_changes"] = dict(entry["env_config_changes"])
    return prov


def backfill(entries: Sequence[Mapping[str, Any] | None], root_source: Any) -> list[dict[str, Any]]:
    """Entries with the root's claim written into those that carry no provenance (other keys kept), so the claim
    survives the root becoming a summary. Entries the root says nothing about stay as they are."""
    claim = root_to_provenance(root_source)
    out = []
    for e in entries:
        e = dict(e or {})
        if claim and "source" not in e:
            e = {**claim, **e}
        out.append(e)
    return out


def _key(prov: Mapping[str, Any]) -> str:
    return json.dumps(prov, sort_keys=True, default=str)


def distinct(provs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Distinct provenances in order of first appearance."""
    seen: dict[str, dict[str, Any]] = {}
    for p in provs:
        seen.setdefault(_key(p), dict(p))
    return list(seen.values())


def root_summary(entries: Sequence[Mapping[str, Any] | None], root_source: Any) -> dict[str, Any] | None:
    """The root ``source`` the store should hold for these episode entries, or None to leave it as it is.

    Mixed episodes -> ``{"kind": "mixed", "sources": [...]}``. Episodes that agree -> the root is left alone when
    it agrees with them (it may say more, e.g. the checkpoint path), replaced when it is absent, "mixed" (after a
    drop) or contradicts them (e.g. a store created by a run that kept no episode). No known provenance -> None.
    """
    provs = [episode_provenance(e, root_source) for e in entries]
    if not provs or not any(provs):
        return None
    kinds = distinct(provs)
    if len(kinds) > 1:
        summary = {"kind": "mixed", "sources": kinds,
                   "see": "per-episode attributes (EpisodeStore.episode_attrs, robolearn data info)"}
        return None if isinstance(root_source, Mapping) and _key(root_source) == _key(summary) else summary
    only = kinds[0]
    kind = root_source.get("kind") if isinstance(root_source, Mapping) else None
    if kind is None or kind == "mixed":
        return provenance_to_root(only)
    claim = root_to_provenance(root_source)
    if not claim:  # a teleop root: it claims nothing about single episodes
        return None
    agrees = all(only.get(k) == v for k, v in claim.items() if k != "env_config_changes") and \
        (only.get("env_config_changes") or None) == (claim.get("env_config_changes") or None)
    return None if agrees else provenance_to_root(only)


def env_changes(env_config: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of ``env_config`` that differ from ``base`` (a key absent on one side counts as None)."""
    keys = sorted(set(env_config) | set(base))
    return {k: env_config.get(k) for k in keys if env_config.get(k) != base.get(k)}


def rebase(entries: Sequence[Mapping[str, Any]], env_config: Mapping[str, Any],
           new_base: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Entries whose ``env_config_changes`` are relative to ``env_config``, made relative to ``new_base`` (for a
    merge, whose store takes the first source's environment)."""
    out = []
    for e in entries:
        e = dict(e)
        full = {**dict(env_config), **dict(e.get("env_config_changes") or {})}
        changes = env_changes(full, new_base)
        e.pop("env_config_changes", None)
        if changes:
            e["env_config_changes"] = changes
        out.append(e)
    return out


# ----------------------------------------------------------------------------------------- checking an append
def _setting_diffs(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The settings (provenance keys) in which ``old`` and ``new`` differ; keys one side lacks are not compared,
    except the source itself."""
    if not old:  # nothing is known about those episodes: nothing to contradict
        return []
    if old.get("source") != new.get("source"):
        return ["source"]
    if new.get("source") == "policy":
        if old.get("policy_sha256") and new.get("policy_sha256"):
            return [] if old["policy_sha256"] == new["policy_sha256"] else ["policy"]
        return [] if old.get("policy") == new.get("policy") else ["policy"]
    out = []
    for k in ("noise", "policy"):
        if k in old and k in new and old[k] != new[k]:
            out.append(k)
    if new.get("source") == "scripted" and _bias(old) != _bias(new):
        out.append("bias")
    return out


def _bias(prov: Mapping[str, Any]) -> float:
    """A scripted episode's ``expert.bias``: recorded only when set, so one without it had none."""
    return float(prov.get("bias") or 0.0)


def append_mismatches(entries: Sequence[Mapping[str, Any] | None], root_source: Any,
                      root_env_config: Mapping[str, Any] | None, new: Mapping[str, Any],
                      new_env_config: Mapping[str, Any] | None) -> tuple[int, list[dict[str, Any]]]:
    """How appending episodes of provenance ``new`` (recorded in ``new_env_config``) would mix a store whose
    committed episodes have ``entries``: the number of its episodes made otherwise, and one item per differing
    setting, ``{"setting", "store": [(value, episodes), ...], "new": value}`` (none when all would agree).
    ``root_env_config`` None: the store does not record its environment (written by another tool), so it is not
    compared."""
    found: dict[str, dict[str, Any]] = {}
    differing = 0
    for e in entries:
        prov = episode_provenance(e, root_source)
        names = [_SETTING_NAMES[k] for k in _setting_diffs(prov, new)]
        if root_env_config is not None and new_env_config is not None:
            full = {**dict(root_env_config), **dict(prov.get("env_config_changes") or {})}
            names += [f"env.{k}" for k in env_changes(new_env_config, full)]
        differing += bool(names)
        for name in names:
            item = found.setdefault(name, {"setting": name, "store": {}, "new": _value(name, new, new_env_config)})
            value = json.dumps(_value(name, prov, {**dict(root_env_config or {}),
                                                   **dict(prov.get("env_config_changes") or {})}), default=str)
            item["store"][value] = item["store"].get(value, 0) + 1
    out = []
    for item in found.values():
        item["store"] = [(json.loads(v), n) for v, n in item["store"].items()]
        out.append(item)
    return differing, out


def _value(name: str, prov: Mapping[str, Any], env: Mapping[str, Any] | None) -> Any:
    if name.startswith("env."):
        return (env or {}).get(name[4:])
    key = {v: k for k, v in _SETTING_NAMES.items()}[name]
    if key == "bias" and prov.get("source") == "scripted":
        return _bias(prov)
    return prov.get(key)


def mismatch_message(path: Any, n_episodes: int, differing: int, mismatches: Sequence[Mapping[str, Any]],
                     new_flag: str) -> str:
    """The refusal ``collect`` prints: the store, each setting with the store's value(s) and the new one, and the
    ways on."""
    parts = []
    for m in mismatches:
        old = m["store"]
        if len(old) == 1:
            shown = _show(old[0][0])
        else:
            shown = ", ".join(f"{_show(v)} ({n} episode{'s' if n != 1 else ''})" for v, n in old)
        parts.append(f"{m['setting']} is {shown} in the store but {_show(m['new'])} in this run")
    which = (f"its {n_episodes} episode{'s were' if n_episodes != 1 else ' was'}" if differing == n_episodes
             else f"{differing} of its {n_episodes} episodes {'were' if differing != 1 else 'was'}")
    return (f"cannot append to {path}: {which} recorded with other settings ({'; '.join(parts)}). One store should hold demonstrations made one way: collect "
            f"into another store ({new_flag}), or pass append_mismatch=allow to mix them on purpose (each "
            f"episode then records its own settings; robolearn data info lists them)")


def _show(v: Any) -> str:
    if v is None:
        return "unset"
    return repr(v) if isinstance(v, str) else json.dumps(v, default=str)


# ----------------------------------------------------------------------------------------- describing a store
def source_groups(entries: Sequence[Mapping[str, Any] | None], root_source: Any) -> list[dict[str, Any]]:
    """Episodes grouped by provenance, in order of first appearance: ``{"provenance", "episodes" (count),
    "indices" (e.g. "0-2,5"), "successes" (count, or None when the episodes do not say)}``."""
    groups: dict[str, dict[str, Any]] = {}
    for i, e in enumerate(entries):
        prov = episode_provenance(e, root_source)
        g = groups.setdefault(_key(prov), {"provenance": prov, "list": [], "successes": 0, "known": 0})
        g["list"].append(i)
        if isinstance(e, Mapping) and isinstance(e.get("success"), bool):
            g["known"] += 1
            g["successes"] += int(e["success"])
    out = []
    for g in groups.values():
        out.append({"provenance": g["provenance"], "episodes": len(g["list"]), "indices": _ranges(g["list"]),
                    "successes": g["successes"] if g["known"] == len(g["list"]) else None})
    return out


def describe(prov: Mapping[str, Any]) -> str:
    """One provenance in words: ``scripted expert, noise 0.3, env clearance=0.002``."""
    if not prov:
        return "unknown (no source recorded)"
    source = prov.get("source")
    if source == "scripted":
        text = "scripted expert"
        if prov.get("noise") is not None:
            text += f", noise {prov['noise']:g}"
        if prov.get("bias"):
            text += f", bias {prov['bias']:g}"
    elif source == "policy":
        text = f"policy {prov.get('policy')}" + (f" ({prov['policy_type']})" if prov.get("policy_type") else "")
    else:
        text = str(source) + (f", policy {prov['policy']}" if prov.get("policy") else "")
    changes = prov.get("env_config_changes")
    if changes:
        text += ", env " + " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in changes.items())
    return text


def source_lines(groups: Sequence[Mapping[str, Any]]) -> list[str]:
    """``robolearn data info``'s lines for the groups of :func:`source_groups` (none for an empty store)."""
    if not groups:
        return []

    def line(g: Mapping[str, Any]) -> str:
        ok = f", {g['successes']} successful" if g.get("successes") is not None else ""
        return f"{describe(g['provenance'])}{ok}"

    if len(groups) == 1:
        return [f"source    {line(groups[0])} (all {groups[0]['episodes']} episodes)"]
    labels = [f"episodes {g['indices']} ({g['episodes']})" for g in groups]
    width = max(len(label) for label in labels)
    return [f"sources   MIXED: {len(groups)} kinds of episodes (per-episode attributes)"] + [
        f"  {label:<{width}}  {line(g)}" for label, g in zip(labels, groups)]


def _ranges(indices: Sequence[int]) -> str:
    parts: list[str] = []
    start = prev = None
    for i in list(indices) + [None]:  # type: ignore[list-item]
        if start is not None and (i is None or i != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if i is not None:
            if start is None:
                start = i
            prev = i
    return ",".join(parts)


def store_sources(store: Any) -> list[dict[str, Any]]:
    """:func:`source_groups` of an open store's committed episodes (``robolearn data info``)."""
    return source_groups(store.all_episode_attrs(), store.attrs.get("source"))
