"""Trace generation fanned out over a real local Ray cluster (2 CPUs, started here) equals the
single-process run record by record; a shard whose worker is killed mid-shard is retried by Ray
and resumes its folder, losing and duplicating nothing."""

import dataclasses
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from generation import fanout, main_job
from generation.traces import tracegen
from jaxroute import trace, traceset
from jaxroute.errors import InputError

ray = pytest.importorskip("ray")

SPEC = fanout.GeneratorSpec(models=("tinylm:small", "tinylm:large"), verifier="rule",
                            gen=tracegen.GenConfig(chunk=4, seed=3, **main_job.GEN_CONFIG))
PROVENANCE = {"task": "fan-out test"}


def _problems(n: int):
    return main_job.problems_and_splits({"train": n // 2, "cal": n // 4, "test": n - n // 2 -
                                         n // 4}, 3)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process run of the same set: the reference."""
    problems, splits = _problems(16)
    out = tmp_path_factory.mktemp("single")
    fanout.generate(SPEC, problems, splits, out, PROVENANCE)
    return traceset.load_trace_set(out)


def _assert_equal_sets(out: Path, single, n_shards: int):
    manifest, records = traceset.load_trace_set(out)
    ref_manifest, ref = single
    same, identical, worst = traceset.compare_records(records, ref)
    print(f"{same}/{len(ref)} records equal to the single-process run ({n_shards} shards on "
          f"Ray; {identical} bit-identical, largest float gap {worst:.1e})")
    assert manifest.to_json()["models"] == ref_manifest.to_json()["models"]
    assert manifest.provenance["last_run"]["shards"] == n_shards


def test_a_single_process_with_other_batches_differs_only_in_float_bits(single, tmp_path):
    """The yardstick for the Ray run: one process, batches of 16 instead of 4."""
    problems, splits = _problems(16)
    spec = fanout.GeneratorSpec(SPEC.models, dataclasses.replace(SPEC.gen, chunk=16),
                                SPEC.verifier)
    fanout.generate(spec, problems, splits, tmp_path, PROVENANCE)
    same, identical, worst = traceset.compare_records(traceset.load_trace_set(tmp_path)[1], single[1])
    print(f"--chunk=16 against --chunk=4 in one process: {same}/16 equal, {identical} "
          f"bit-identical, largest float gap {worst:.1e}")
    assert same == 16


def test_two_shards_on_ray_equal_the_single_process_run(cluster, single, tmp_path):
    problems, splits = _problems(16)
    summary = fanout.generate_on_ray(SPEC, problems, splits, tmp_path, PROVENANCE, 2)
    assert summary.written == 16 and not summary.failed
    _assert_equal_sets(tmp_path, single, 2)
    # Each shard holds exactly its hash share, and a re-run resumes: nothing is generated again.
    for i in range(2):
        _, recs = traceset.load_trace_set(fanout.shard_folder(tmp_path, i, 2))
        assert {tracegen.shard_of(r["problem_id"], 2) for r in recs} == {i}
    again = fanout.generate_on_ray(SPEC, problems, splits, tmp_path, PROVENANCE, 2)
    assert again.written == 0 and not again.failed
    _assert_equal_sets(tmp_path, single, 2)


def test_a_shard_no_node_can_place_is_an_error_not_a_wait(cluster, tmp_path):
    problems, splits = _problems(4)
    for resources, what in (({"num_gpus": 1}, "1 GPUs"), ({"num_cpus": 3}, "3 CPUs")):
        with pytest.raises(InputError, match=f"asks for {what} but no node"):
            fanout.generate_on_ray(SPEC, problems, splits, tmp_path, PROVENANCE, 2,
                                   shard_resources=resources)
    # vLLM models on a cluster without GPUs: no GPU asked (vLLM's CPU build).
    spec = fanout.GeneratorSpec(("vllm:a", "vllm:b"), options=(("tensor_parallel_size", 2),))
    assert fanout._placeable(ray, spec, {"num_gpus": None})["num_gpus"] == 0


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_loses_and_duplicates_nothing(cluster, single, tmp_path):
    problems, splits = _problems(16)
    shard = fanout.shard_folder(tmp_path, 0, 2)
    killed = []

    def kill_mid_shard():
        """SIGKILL shard 0's worker (the pid in its folder lock) once a chunk is written."""
        deadline = time.time() + 300
        while time.time() < deadline:
            path = shard / trace.TREES
            if path.exists() and path.read_text().count("\n") >= 1:
                pid = int((shard / ".lock").read_text().split()[0])
                os.kill(pid, signal.SIGKILL)
                killed.append(path.read_text().count("\n"))
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_mid_shard)
    killer.start()
    summary = fanout.generate_on_ray(SPEC, problems, splits, tmp_path, PROVENANCE, 2,
                                     max_retries=2)
    killer.join()
    size = sum(tracegen.shard_of(p.problem_id, 2) == 0 for p in problems)
    assert killed and 0 < killed[0] < size, (killed, size)  # died with part of its shard written
    print(f"shard 0's worker killed with {killed[0]} records written; Ray retried it")
    assert summary.written == 16 - killed[0]  # the retry wrote only what was missing
    _assert_equal_sets(tmp_path, single, 2)


def _cost(tokens):
    return {"cost": {"output_tokens": tokens}}


def test_tree_tokens_and_the_paper_scale_estimate_by_hand():
    # One problem, one root of 3 steps (10, 20, 30 tokens); the large model's continuations
    # from steps 0, 1, 2 write 60, 40, 20 tokens; solo solutions 60 (small) and 60 (large).
    rec = {"solo": [_cost(60), _cost(60)],
           "roots": [{"steps": [{**_cost(n), "branches": {"1": _cost(b)}}
                                for n, b in ((10, 60), (20, 40), (30, 20))]}]}
    t = fanout.tree_tokens([rec])
    assert (t["small"], t["large"], t["steps"]) == (60, 120, 3)
    assert t["formula_large"] == 60 * (3 + 1) / 2 == t["large"]  # equal steps: formula exact
    e = fanout.paper_scale_estimate(100, 4, "gsm8k", params=(1e9, 5e9), measured_ratio=1.5)
    l_small, l_large = 0.973e12 / 2e9, 4.42e12 / 1e10
    assert e["small_tokens"] == pytest.approx(100 * l_small)
    assert e["large_tokens"] == pytest.approx(100 * l_large * 2.5 * 1.5)
    for gpu, rate in fanout.DECODE_TOKENS_PER_S.items():
        assert e[f"gpu_hours {gpu}"] == pytest.approx(
            (e["small_tokens"] + e["large_tokens"]) / rate / 3600)


def test_merge_refuses_duplicates_and_foreign_ids_and_keeps_the_problem_order(single, tmp_path):
    problems, _ = _problems(16)
    manifest, recs = single
    shard = {"manifest": manifest.to_json(), "written": 0, "failed": [], "reasons": {},
             "requests": []}
    # Shards hand records back in any order; the set is written in the problem order.
    last = fanout.merge_in_order([dict(shard, index=0, records=recs[8:][::-1]),
                                  dict(shard, index=1, records=recs[:8])], problems, tmp_path)
    assert last["shards"] == 2 and last["written"] == 0
    assert [r["problem_id"] for r in traceset.load_trace_set(tmp_path)[1]] == \
        [r["problem_id"] for r in recs]
    with pytest.raises(InputError, match="shards 0 and 1: duplicate problem_id"):
        fanout.merge_in_order([dict(shard, index=0, records=recs[:2]),
                               dict(shard, index=1, records=recs[1:3])], problems, tmp_path)
    with pytest.raises(InputError, match="not one of this run's problems"):
        fanout.merge_in_order([dict(shard, index=0, records=recs[:2])], problems[2:], tmp_path)
    renamed = dataclasses.replace(manifest, feature_names=manifest.feature_names[::-1])
    with pytest.raises(InputError, match="shard 1: manifest differs from shard 0's"):
        fanout.merge_in_order([dict(shard, index=0, records=recs[:8]),
                               dict(shard, index=1, records=recs[8:],
                                    manifest=renamed.to_json())], problems, tmp_path)
    # An --out holding another set (other settings) is refused, and kept as it was.
    other = dataclasses.replace(manifest, provenance={**manifest.provenance, "task": "other"})
    before = (tmp_path / trace.TREES).read_text()
    with pytest.raises(FileExistsError, match="other settings"):
        fanout.merge_in_order([dict(shard, index=0, records=recs, manifest=other.to_json())],
                              problems, tmp_path)
    assert (tmp_path / trace.TREES).read_text() == before


def test_without_ray_installed_fanning_out_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(InputError, match=r"pip install 'jaxroute\[ray\]'"):
        fanout.generate_on_ray(SPEC, [], {}, Path("unused"), PROVENANCE, 2)
