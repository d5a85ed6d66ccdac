"""Humpback's follow-ups on tiny (followups.py): each one end to end, started from a finished Humpback run, which it
reads by hash and never changes. Notebook 08 runs the three beside the notebooks' own tiny run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from humpback_nb import followups
from humpback_nb.config import with_overrides
from humpback_nb.pipeline import open_run
from humpback_nb.run import RunFiles

pytestmark = pytest.mark.slow
METHODS = tuple(followups.VARIANT_SETTINGS)


def manifests(folder) -> dict[str, dict]:
    """Every stage manifest of a run folder, by stage."""
    return {path.stem: yaml.safe_load(path.read_text()) for path in (folder / "stages").glob("*.yaml")}


@pytest.fixture(scope="module")
def follow_ups(finished_tiny_run):
    """(Humpback run, {method: its follow-up's run folder}) as notebook 08 left them."""
    folders = {m: followups.variant_folder(finished_tiny_run, m) for m in METHODS}
    missing = [m for m, folder in folders.items() if not RunFiles(folder).path("summary").is_file()]
    assert not missing, f"notebook 08 did not finish the follow-ups {missing}"
    return finished_tiny_run, folders


@pytest.mark.parametrize("method", METHODS)
def test_each_follow_up_runs_end_to_end_on_tiny_beside_humpback(follow_ups, method):
    humpback, folders = follow_ups
    folder = open_run(folders[method])
    assert folder.config().variant.method == method
    assert all(row["state"] == "done" for row in folder.status())
    files = folder.files
    result = files.analysis("variant")
    others = list(followups.compared_with(folder.config().curate.iterations))
    assert result["method"] == method and result["compared_with"] == others
    assert set(result["heldout"]["differences"]) == {f"{method} - {name}" for name in others}
    for difference in result["heldout"]["differences"].values():
        low, high = difference["interval"]
        assert low <= difference["difference"] <= high
    assert set(result["win_rates"]) == {f"{method}_vs_{name}" for name in followups.judged_against(2)}
    assert result["judge_check"] is not None
    pairs = files.variant_pairs()
    assert pairs and len(pairs) == files.train_log(method)["examples"] - (
        0 if method == "alpagasus" else len(files.seed_pairs("train")))
    if method == "alpagasus":  # the seed pairs its rating kept, each at or above the threshold
        seed = {p["id"] for p in files.seed_pairs("train")}
        k = files.variant_report()["k"]  # variant.threshold, or the lowest score of the share kept (variant.top_share)
        assert all(p["id"] in seed and p["score"] >= k for p in pairs)
    else:  # A(1)_k's instructions (bft) or Kun's selection, each with its rewrite and the segment it came from
        candidates = {c["id"]: c for c in files.candidates()}
        assert all(p["original"] == candidates[p["id"]]["output"] and p["output"].strip() for p in pairs)
        if method == "bft":
            assert [p["id"] for p in pairs] == [p["id"] for p in files.curated(1).records
                                                if p["id"] in {q["id"] for q in pairs}]
        else:
            assert {s["sees"] for s in files.scores("m0_instructions")} == {"instruction"}


@pytest.mark.parametrize("method", METHODS)
def test_a_follow_up_started_from_a_finished_run_trains_only_its_own_models(follow_ups, method):
    humpback, folders = follow_ups
    folder = folders[method]
    ours, theirs = manifests(folder), manifests(humpback)
    linked = {name for name, manifest in ours.items() if manifest.get("linked_from")}
    own = {"variant_pairs", method, "variant_eval", "summary"} | ({"kun_rate"} if method == "kun" else set())
    assert set(ours) == linked | own and not linked & own
    assert linked == set(theirs) - {"summary"}  # every stage Humpback's run has done, but its summary, is shared
    for name in linked:  # the same manifest, the same files
        assert {k: v for k, v in ours[name].items() if k != "linked_from"} == theirs[name]
        for path in ours[name]["files"]:
            inner = [path] if (humpback / path).is_file() else [
                os.path.join(path, p) for p in ours[name]["files"][path]["folder"]]
            assert all(os.path.samefile(humpback / p, folder / p) for p in inner)
    here, there = RunFiles(folder), RunFiles(humpback)
    trained_here = [m["model"] for m in here.model_manifests()
                    if not (there.path("model_manifest", m["model"]).is_file()
                            and os.path.samefile(here.path("model_manifest", m["model"]),
                                                 there.path("model_manifest", m["model"])))]
    assert trained_here == [method]
    assert all(not m.get("linked_from") for m in theirs.values())  # Humpback's run is as it was: its own
    assert all(row["state"] == "done" for row in open_run(humpback).status())


def test_status_shows_which_stages_a_follow_up_took_from_the_humpback_run(follow_ups):
    humpback, folders = follow_ups
    shown = subprocess.run([sys.executable, "-m", "humpback_nb.cli", "status", "--run-dir", str(folders["bft"])],
                           capture_output=True, text=True, check=True).stdout
    lines = {line.split()[0]: line for line in shown.splitlines()[1:] if line.startswith("  ") and
             not line.startswith("    ")}
    assert f"[linked from {humpback}]" in lines["m0"] and "done" in lines["m0"]
    assert "linked from" not in lines["variant_pairs"] and "linked from" not in lines["bft"]


def test_only_the_stages_made_with_the_same_settings_are_linked(finished_tiny_run, tmp_path):
    """Linking goes by hash: with another learning rate every stage that trains, or reads a trained model, is not
    taken, and runs again; the data stages are."""
    config = open_run(finished_tiny_run).config()
    changed = with_overrides(config, {"train.learning_rate": 3e-4})
    folder = open_run(tmp_path / "other", changed)
    (tmp_path / "other").mkdir()
    folder.set_config(changed)
    assert folder.link_from(finished_tiny_run, changed) == ["seed", "segments"]
    assert folder.link_from(finished_tiny_run, changed) == []  # what the folder has is its own
    assert all(row["state"] == ("done" if row["stage"] in ("seed", "segments") else "pending")
               for row in folder.status(changed))
