"""Each episode's source, and a root ``source`` that never claims one setting for episodes made with another."""
from __future__ import annotations

import zarr
from datagen import make_episode

from robolearn.data import EpisodeStore, merge_stores, provenance, source_lines, store_sources

NOISY = {"kind": "scripted_expert", "noise": 0.3}
CLEAN = {"source": "scripted", "noise": 0.0}


def test_an_episode_of_another_source_makes_the_root_say_mixed_and_keeps_every_claim(store_factory):
    store = store_factory(lengths=(4, 5), attrs={"source": NOISY})  # as collect wrote before episodes had sources
    store.append_episode(make_episode(3, seed=9), attrs={**CLEAN, "seed": 9, "success": True})
    # The root's claim about the first two episodes now lives with them; the root lists both settings.
    assert store.all_episode_attrs()[:2] == [{"source": "scripted", "noise": 0.3}] * 2
    root = store.attrs["source"]
    assert root["kind"] == "mixed" and root["sources"] == [{"source": "scripted", "noise": 0.3}, CLEAN]
    groups = store_sources(store)
    assert [(g["indices"], g["episodes"], g["successes"]) for g in groups] == [("0-1", 2, None), ("2", 1, 1)]
    lines = source_lines(groups)
    assert lines[0].startswith("sources   MIXED: 2 kinds") and "noise 0.3" in lines[1] and "noise 0," in lines[2]
    # Dropping the noisy episodes leaves a store whose root says what is left.
    store.drop_episodes([0, 1])
    assert store.attrs["source"] == {"kind": "scripted_expert", "noise": 0.0}
    assert source_lines(store_sources(store)) == ["source    scripted expert, noise 0, 1 successful (all 1 episodes)"]


def test_a_store_whose_creator_kept_nothing_takes_its_first_episodes_source(store_factory):
    store = store_factory(lengths=(), attrs={"source": NOISY})
    store.append_episode(make_episode(3, seed=0), attrs={**CLEAN, "seed": 0})
    assert store.attrs["source"] == {"kind": "scripted_expert", "noise": 0.0}


def test_a_killed_append_does_not_leave_the_root_claiming_its_source(store_factory):
    store = store_factory(lengths=(), attrs={"source": {"kind": "scripted_expert", "noise": 0.0}})
    store.append_episode(make_episode(3, seed=0), attrs={**CLEAN, "seed": 0})
    path = store.path
    store.close()
    # What a writer killed before its commit leaves: the next episode's attributes and the root that counts it.
    entries = [{**CLEAN, "seed": 0}, {"source": "scripted", "noise": 0.3, "seed": 1}]
    root = zarr.open_group(str(path), mode="r+")
    root["meta"].attrs["episode_attrs"] = entries
    root.attrs["source"] = provenance.root_summary(entries, None)
    assert EpisodeStore.open(path).attrs["source"]["kind"] == "mixed"  # readers change nothing
    with EpisodeStore.open(path, mode="a") as again:
        assert again.attrs["source"] == {"kind": "scripted_expert", "noise": 0.0}
        assert again.all_episode_attrs() == [{**CLEAN, "seed": 0}]


def test_merge_keeps_each_source_stores_settings_with_its_episodes(tmp_path, store_factory):
    a = store_factory(lengths=(4,), name="a.zarr", attrs={"source": {"kind": "scripted_expert", "noise": 0.0}})
    b = store_factory(lengths=(3, 5), name="b.zarr", attrs={"source": NOISY})
    b.update_attrs({"env_config": {"a": 2}})  # recorded in another environment than a's {"a": 1}
    a.close()
    b.close()
    with merge_stores([a.path, b.path], tmp_path / "ab.zarr") as merged:
        assert merged.env_config == {"a": 1}
        assert merged.all_episode_attrs() == [
            CLEAN, *[{"source": "scripted", "noise": 0.3, "env_config_changes": {"a": 2}}] * 2]
        assert merged.attrs["source"]["kind"] == "mixed"
        assert "env a=2" in source_lines(store_sources(merged))[2]


def test_append_mismatches_name_each_setting_with_the_stores_values():
    entries = [CLEAN, CLEAN, {"source": "scripted", "noise": 0.3}, {"source": "teleop", "device": "keyboard"}]
    differing, found = provenance.append_mismatches(
        entries, None, {"clearance": 0.001}, {"source": "scripted", "noise": 0.3}, {"clearance": 0.002})
    assert differing == 4  # every episode differs in the clearance
    by_name = {m["setting"]: m for m in found}
    assert by_name["expert.noise"]["store"] == [(0.0, 2)] and by_name["expert.noise"]["new"] == 0.3
    assert by_name["source"]["store"] == [("teleop", 1)]
    assert by_name["env.clearance"]["store"] == [(0.001, 4)]
    text = provenance.mismatch_message("s.zarr", 4, differing, found, "out=t.zarr")
    assert "cannot append to s.zarr: its 4 episodes were recorded with other settings" in text
    assert "expert.noise is 0.0 in the store but 0.3 in this run" in text
    assert "source is 'teleop' in the store but 'scripted'" in text and "append_mismatch=allow" in text
    assert provenance.append_mismatches(entries[:2], None, None, CLEAN, {"x": 1}) == (0, [])
    # Policies are told apart by their weights' digest; the message shows the checkpoints.
    ran = {"kind": "policy", "checkpoint": "/runs/a/latest", "policy_type": "diffusion", "sha256": "aa"}
    new = {"source": "policy", "policy": "/runs/b/latest", "policy_type": "diffusion", "policy_sha256": "bb"}
    _, found = provenance.append_mismatches([{}], ran, None, new, None)
    assert found == [{"setting": "policy", "store": [("/runs/a/latest", 1)], "new": "/runs/b/latest"}]
    assert provenance.append_mismatches([{}], ran, None, {**new, "policy_sha256": "aa"}, None) == (0, [])


def test_expert_bias_is_a_setting_recorded_only_when_set():
    biased = {"source": "scripted", "noise": 0.0, "bias": 2.0}
    assert provenance.describe(biased) == "scripted expert, noise 0, bias 2"
    assert provenance.describe(CLEAN) == "scripted expert, noise 0"
    root = provenance.provenance_to_root(biased)
    assert root == {"kind": "scripted_expert", "noise": 0.0, "bias": 2.0}
    assert provenance.root_to_provenance(root) == biased
    assert "bias" not in provenance.provenance_to_root(CLEAN)  # clean stores' attributes are what they were
    # a scripted episode without the key had no bias: appending biased episodes to it names the setting
    _, found = provenance.append_mismatches([CLEAN], None, None, biased, None)
    assert found == [{"setting": "expert.bias", "store": [(0.0, 1)], "new": 2.0}]
    assert provenance.append_mismatches([biased], None, None, biased, None) == (0, [])
