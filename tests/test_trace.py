"""Trace-tree format: round trip, validation errors that name file/record/field, torn lines, packing."""

import copy
import json

import numpy as np
import pytest

from jaxroute import accounting, durable, synthetic, trace, traceset
from jaxroute.errors import InputError


@pytest.fixture(scope="module")
def small_set():
    return synthetic.generate(synthetic.SyntheticConfig(num_problems=40, roots_per_problem=2))


def test_round_trip_and_pack(tmp_path, small_set):
    manifest, problems = small_set
    traceset.write_trace_set(tmp_path, manifest, problems)
    m2, p2 = traceset.load_trace_set(tmp_path)
    assert m2.to_json() == json.loads(json.dumps(manifest.to_json())) and p2 == problems
    packed = trace.pack(m2, p2)
    assert packed.features.shape[:2] == (40, 2)
    assert packed.features.shape[-1] == len(manifest.feature_names)
    # Step lengths and costs agree with the records.
    p = problems[3]
    seg = p["roots"][1]
    assert packed.seg_len[3, 1] == len(seg["steps"])
    np.testing.assert_allclose(packed.step_cost[3, 1, 0], seg["steps"][0]["cost"]["flops"] / 1e12,
                               rtol=1e-6)
    assert packed.solo_correct[3, 1] == p["solo"][1]["correct"]
    assert manifest.synthetic


def test_usd_cost_model_uses_prices():
    model = trace.ModelInfo("m", 1e9, price_input=0.4, price_cached_input=0.1, price_output=1.6)
    c = {"flops": 0.0, "input_tokens": 1000, "cached_input_tokens": 400, "output_tokens": 200}
    usd = (600 * 0.4 + 400 * 0.1 + 200 * 1.6) / 1e6
    assert accounting.cost_of(c, model, "usd_cents") == pytest.approx(100 * usd)
    with pytest.raises(ValueError, match="cost_model"):
        accounting.cost_of(c, model, "euros")


def corrupt(tmp_path, manifest, problems, edit):
    bad = json.loads(json.dumps(problems))
    edit(bad)
    (tmp_path / "trees.jsonl").write_text("".join(json.dumps(p) + "\n" for p in bad))
    durable.atomic_write_text(tmp_path / "manifest.json", json.dumps(manifest.to_json()))


@pytest.mark.parametrize("edit,pattern", [
    (lambda b: b[2].pop("split"), r"line 3 \(problem 'synthetic-0-000002'\): missing field 'split'"),
    (lambda b: b[0]["roots"][0]["steps"][1]["features"].pop(),
     r"line 1 .*roots\[0\]\.steps\[1\]: field 'features' must be 5 finite numbers"),
    (lambda b: b[1]["roots"][0]["steps"][0]["cost"].update(flops=float("nan")),
     r"line 2 .*steps\[0\]\.cost: field 'flops'"),
    (lambda b: b[4]["roots"][0]["steps"][0]["branches"].pop("1"),
     r"line 5 .*branches\[1\]: missing escalation branch to model 1"),
    (lambda b: b[0].update(split="dev"), r"field 'split' must be one of"),
    (lambda b: b[1].update(problem_id=b[0]["problem_id"]), r"line 2: duplicate problem_id"),
    # Finite in JSON, but beyond float32 once packed (decision 77).
    (lambda b: b[3]["roots"][0]["steps"][0]["features"].__setitem__(0, 1e39),
     r"line 4 .*steps\[0\]: field 'features' must be 5 finite numbers of magnitude"),
    (lambda b: b[2]["roots"][0]["steps"][0]["cost"].update(flops=1e300),
     r"line 3 .*steps\[0\]\.cost: field 'flops'"),
    (lambda b: b[2]["solo"][0]["cost"].update(output_tokens=10**20),
     r"line 3 .*solo\[0\]\.cost: field 'output_tokens'"),
])
def test_errors_name_file_record_and_field(tmp_path, small_set, edit, pattern):
    manifest, problems = small_set
    corrupt(tmp_path, manifest, problems, edit)
    with pytest.raises(trace.TraceFormatError, match=pattern) as err:
        traceset.load_trace_set(tmp_path)
    assert "trees.jsonl" in str(err.value)


def test_manifest_errors(tmp_path, small_set):
    manifest, problems = small_set
    traceset.write_trace_set(tmp_path, manifest, problems)
    d = manifest.to_json()
    d["schema_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(trace.TraceFormatError, match="schema_version 99"):
        traceset.load_trace_set(tmp_path)
    with pytest.raises(trace.TraceFormatError, match="not found"):
        traceset.load_trace_set(tmp_path / "nope")


@pytest.mark.parametrize("write, pattern", [
    (lambda p: p.write_text("[1, 2]"), r"manifest.json: expected a JSON object, got list"),
    (lambda p: p.write_bytes(b"\xff\xfe{}"), r"manifest.json: not UTF-8"),
])
def test_a_manifest_that_is_not_a_manifest_names_its_file(tmp_path, small_set, write, pattern):
    manifest, problems = small_set
    traceset.write_trace_set(tmp_path, manifest, problems[:3])
    write(tmp_path / "manifest.json")
    with pytest.raises(trace.TraceFormatError, match=pattern):
        traceset.load_trace_set(tmp_path)


@pytest.mark.parametrize("field, value", [("params", -1.0), ("price_output", float("nan")),
                                          ("price_input", 1e300)])
def test_manifest_prices_and_params_are_validated(tmp_path, small_set, field, value):
    manifest, problems = small_set
    traceset.write_trace_set(tmp_path, manifest, problems[:3])
    d = manifest.to_json()
    d["models"][1][field] = value
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(trace.TraceFormatError, match=rf"models\[1\]\.{field} must be"):
        traceset.load_trace_set(tmp_path)


def test_non_utf8_records_name_file_and_line(tmp_path, small_set):
    manifest, problems = small_set
    traceset.write_trace_set(tmp_path, manifest, problems[:3])
    with open(tmp_path / "trees.jsonl", "ab") as f:
        f.write(b'{"problem_id": "\xff"}\n')
    with pytest.raises(trace.TraceFormatError, match=r"trees.jsonl: line 4: not UTF-8"):
        traceset.load_trace_set(tmp_path)


def test_repair_drops_torn_invalid_and_duplicate_records(tmp_path, small_set):
    manifest, problems = small_set
    traceset.write_trace_set(tmp_path, manifest, problems[:4])
    path = tmp_path / "trees.jsonl"
    durable.append_records(path, problems[2:6])  # a second writer appended 2 and 3 again
    with open(path, "ab") as f:
        f.write(b'{"problem_id": "x", "broken": \n')  # invalid JSON
        f.write(json.dumps(problems[6])[:40].encode())  # torn
    report = traceset.repair(tmp_path)
    assert report["kept"] == 6 and len(report["duplicates"]) == 2
    assert len(report["invalid"]) == 1 and report["torn_bytes"] == 40
    _, loaded = traceset.load_trace_set(tmp_path)
    assert [p["problem_id"] for p in loaded] == [p["problem_id"] for p in problems[:6]]
    assert (tmp_path / "trees.jsonl.bak").exists()


def test_missing_splits_are_refused_before_any_work(small_set):
    manifest, problems = small_set
    only_train = [dict(p, split="train") for p in problems]
    packed = trace.pack(manifest, only_train)
    with pytest.raises(trace.TraceFormatError, match=r"split\(s\) \['cal'\]"):
        packed.require_splits("train", "cal")
    assert packed.fingerprint() != trace.pack(manifest, problems).fingerprint()
    assert packed.fingerprint() == trace.pack(manifest, only_train).fingerprint()


def test_torn_last_line_is_reported_and_repaired(tmp_path, small_set):
    manifest, problems = small_set
    traceset.write_trace_set(tmp_path, manifest, problems[:5])
    path = tmp_path / "trees.jsonl"
    durable.append_records(path, problems[5:7])
    with open(path, "a") as f:
        f.write(json.dumps(problems[7])[:50])  # a crash mid-write
    with pytest.raises(trace.TraceFormatError, match="line 8: truncated last line"):
        traceset.load_trace_set(tmp_path)
    assert durable.repair_tail(path) == 50
    _, loaded = traceset.load_trace_set(tmp_path)
    assert [p["problem_id"] for p in loaded] == [p["problem_id"] for p in problems[:7]]


def test_three_model_trees_pack_their_intermediate_segments():
    manifest, problems = synthetic.generate(synthetic.three_model_config(num_problems=6))
    packed = trace.pack(manifest, problems)
    # Every root step has a model-1 segment child; leaves (model 2) are inline.
    for i, p in enumerate(problems):
        steps = p["roots"][0]["steps"]
        children = packed.branch_seg[i, 0, : len(steps), 1]
        assert np.all(children >= 1)
        for t, c in enumerate(children):
            seg = steps[t]["branches"]["1"]
            assert packed.seg_model[i, c] == 1 and packed.seg_len[i, c] == len(seg["steps"])
            assert packed.branch_correct[i, 0, t, 2] == steps[t]["branches"]["2"]["correct"]


@pytest.mark.parametrize("num_models,roots", [(2, 1), (3, 2)])
def test_streamed_packing_equals_packing_everything_at_once(num_models, roots):
    """Packing in chunks (then padding and concatenating) gives the same arrays as one `pack`
    of the whole list, including the fill values of padded segments and steps."""
    cfg = (synthetic.three_model_config(num_problems=53, roots_per_problem=roots, seed=4)
           if num_models == 3 else
           synthetic.SyntheticConfig(num_problems=53, roots_per_problem=roots, seed=4))
    manifest, problems = synthetic.generate(cfg)
    whole = trace.pack(manifest, problems, "mflops")
    for chunk in (1, 7, 53, 100):
        streamed = trace.pack_stream(manifest, iter(problems), "mflops", chunk=chunk)
        for name, a, b in zip(trace.PackedTrees._fields, whole, streamed, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape, (name, chunk)
            np.testing.assert_array_equal(a, b, err_msg=f"{name}, chunk {chunk}")
    # Chunks of one problem differ in shape, so concat must have padded them.
    shapes = {trace.pack(manifest, [p]).step_cost.shape[1:] for p in problems}
    assert len(shapes) > 1
    m, packed = synthetic.generate_packed(cfg, "mflops", chunk=10)
    assert m == manifest and packed.fingerprint() == whole.fingerprint()


def test_pack_stream_refuses_nothing_and_bad_chunks():
    manifest, problems = synthetic.generate(synthetic.SyntheticConfig(num_problems=3))
    with pytest.raises(ValueError, match="no problems"):
        trace.pack_stream(manifest, iter([]))
    with pytest.raises(ValueError, match="chunk"):
        trace.pack_stream(manifest, iter(problems), chunk=0)


def test_repair_refuses_when_most_records_fail_the_same_check(tmp_path, small_set):
    """Regression: after a manifest edit (a model added) repair reported "kept 0 … invalid
    records" and emptied trees.jsonl; a second run overwrote the backup with the empty file."""
    manifest, problems = small_set
    traceset.write_trace_set(tmp_path, manifest, problems[:6])
    before = (tmp_path / "trees.jsonl").read_bytes()
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["models"].append(dict(m["models"][-1], name="another"))  # three models now
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    for _ in range(2):
        with pytest.raises(traceset.RepairRefused, match=r"6 of 6 records fail the same check"):
            traceset.repair(tmp_path)
        assert (tmp_path / "trees.jsonl").read_bytes() == before  # nothing changed
        assert not list(tmp_path.glob("trees.jsonl.bak*"))
    report = traceset.repair(tmp_path, force=True)  # asked for: drops them, keeps a backup
    assert report["kept"] == 0 and (tmp_path / "trees.jsonl.bak").read_bytes() == before


def test_repair_never_overwrites_a_backup_and_keeps_a_whole_last_record(tmp_path, small_set):
    manifest, problems = small_set
    traceset.write_trace_set(tmp_path, manifest, problems[:3])
    path = tmp_path / "trees.jsonl"
    with open(path, "ab") as f:
        f.write(json.dumps(problems[3]).encode())  # whole, but without its newline
    # The loader keeps a whole last record; only a torn one is an error.
    _, loaded = traceset.load_trace_set(tmp_path)
    assert [p["problem_id"] for p in loaded] == [p["problem_id"] for p in problems[:4]]
    first = path.read_bytes()
    report = traceset.repair(tmp_path)
    assert report["kept"] == 4 and report["torn_bytes"] == 0
    assert (tmp_path / "trees.jsonl.bak").read_bytes() == first
    with open(path, "ab") as f:
        f.write(b'{"problem_id": "torn", "roo')  # now a torn one
    second = path.read_bytes()
    with pytest.raises(trace.TraceFormatError, match="launch.repair --traces="):
        traceset.load_trace_set(tmp_path)
    report = traceset.repair(tmp_path)
    assert report["kept"] == 4 and report["torn_bytes"] > 0
    assert (tmp_path / "trees.jsonl.bak").read_bytes() == first  # the first backup is intact
    assert (tmp_path / "trees.jsonl.bak.1").read_bytes() == second
    assert durable.repair_tail(path) == 0  # nothing left to cut


def _strict(text: str):
    """Parse as any strict JSON parser would (no NaN or Infinity)."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))


@pytest.mark.parametrize("edit, where", [
    (lambda p: p.update(roots=[5]), ".roots[0]: expected an object, got int"),
    (lambda p: p["roots"][0]["steps"][0]["branches"].update({"1": "x"}),
     ".roots[0].steps[0].branches[1]: expected an object, got str"),
    (lambda p: p.update(solo=[3, 4]), ".solo[0]: expected an object, got int"),
])
def test_a_record_part_that_is_not_an_object_is_one_clear_error(tmp_path, small_set, edit,
                                                                where):
    """Regression: a root that was not an object crashed loading and repair with
    `AttributeError: 'int' object has no attribute 'get'` (repair repaired nothing)."""
    manifest, problems = small_set
    bad = json.loads(json.dumps(problems[0]))
    bad["problem_id"] = "bad"
    edit(bad)
    traceset.write_trace_set(tmp_path, manifest, problems[:5])
    with open(tmp_path / trace.TREES, "a") as f:
        f.write(json.dumps(bad) + "\n")
    with pytest.raises(trace.TraceFormatError, match=r"line 6 \(problem 'bad'\)" + where.replace(
            "[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        traceset.load_trace_set(tmp_path)
    report = traceset.repair(tmp_path, force=True)
    assert report["kept"] == 5 and len(report["invalid"]) == 1
    assert len(traceset.load_trace_set(tmp_path)[1]) == 5


def test_repair_splits_lines_only_at_newlines(tmp_path, small_set):
    """Regression: repair split lines at "\\r" too and dropped a record the loader accepts
    (kept 159 of 160): "\\r" is JSON whitespace inside a record."""
    manifest, problems = small_set
    traceset.write_trace_set(tmp_path, manifest, problems[:8])
    path = tmp_path / trace.TREES
    lines = path.read_text().splitlines(keepends=True)
    lines[3] = lines[3].replace('{"problem_id"', '{\r "problem_id"', 1)
    path.write_text("".join(lines), newline="")
    assert len(traceset.load_trace_set(tmp_path)[1]) == 8  # the loader accepts it
    report = traceset.repair(tmp_path)
    assert report["kept"] == 8 and report["invalid"] == []


def test_errors_quote_a_bounded_prefix_of_a_huge_id_and_long_lines_are_refused(tmp_path,
                                                                               small_set):
    """Regression: error messages quoted a whole problem_id (a 1 GB id wrote 1 GB to stderr).
    Messages quote at most `errors.QUOTE_CHARS` characters of it; a line longer than
    `traceset.MAX_RECORD_BYTES` is refused without being read whole."""
    manifest, problems = small_set
    traceset.write_trace_set(tmp_path, manifest, problems[:3])
    dup = json.loads(json.dumps(problems[0]))
    big = "x" * 2_000_000
    dup["problem_id"] = big
    with open(tmp_path / trace.TREES, "a") as f:
        f.write(json.dumps(dup) + "\n" + json.dumps(dup) + "\n")
    with pytest.raises(trace.TraceFormatError) as e:
        traceset.load_trace_set(tmp_path)
    assert "duplicate problem_id" in str(e.value) and len(str(e.value)) < 400
    assert "2000000 characters" in str(e.value)
    bad = json.loads(json.dumps(problems[1]))
    bad["problem_id"], bad["split"] = big, big
    traceset.write_trace_set(tmp_path, manifest, problems[:3])
    with open(tmp_path / trace.TREES, "a") as f:
        f.write(json.dumps(bad) + "\n")
    with pytest.raises(trace.TraceFormatError) as e:
        traceset.load_trace_set(tmp_path)
    assert "field 'split'" in str(e.value) and len(str(e.value)) < 600
    with open(tmp_path / trace.TREES, "w") as f:
        f.write(" " * (traceset.MAX_RECORD_BYTES + 10) + "\n")
    with pytest.raises(trace.TraceFormatError, match="line 1 is longer than"):
        traceset.load_trace_set(tmp_path)


def test_strict_json_round_trips_non_finite_numbers():
    """Files the project writes for others (router.json, report tables) are strict JSON: NaN
    and ±Infinity become strings, and `durable.read_json` gives the floats back."""
    obj = {"a": float("nan"), "b": [float("inf"), -np.inf, np.float32("nan"), 1.5, 2],
           "c": {"d": None, "e": "text", "f": True}}
    text = durable.strict_json(obj, indent=1)
    loaded = _strict(text)
    assert loaded["a"] == "NaN" and loaded["b"][:3] == ["Infinity", "-Infinity", "NaN"]
    back = durable.read_json(text)
    assert np.isnan(back["a"]) and back["b"][0] == np.inf and back["b"][1] == -np.inf
    assert np.isnan(back["b"][2]) and back["b"][3:] == [1.5, 2] and back["c"] == obj["c"]
    assert durable.read_json('{"x": NaN}')["x"] != durable.read_json('{"x": NaN}')["x"]


def test_compare_records_allows_float_rounding_and_nothing_else():
    a = {"problem_id": "p", "roots": [{"text": "1 + 2 = 3", "ids": [4, 5], "ok": True,
                                       "features": [0.5, -2.25, 7.0]}]}
    rounded = copy.deepcopy(a)
    rounded["roots"][0]["features"] = [0.5 + 3e-7, -2.25 - 1e-6, 7.0]
    assert traceset.compare_records([a], [a]) == (1, 1, 0.0)
    same, identical, gap = traceset.compare_records([rounded], [a])
    assert (same, identical) == (1, 0) and gap == pytest.approx(1e-6 / 2.25, rel=1e-3)
    for path, value in ((("text",), "1 + 2 = 4"), (("ids",), [4, 6]), (("ok",), False),
                        (("features",), [0.5, -2.25, 7.001])):
        bad = copy.deepcopy(a)
        bad["roots"][0][path[0]] = value
        with pytest.raises(InputError, match=f"roots\\[0\\]\\.{path[0]}"):
            traceset.compare_records([bad], [a])
    with pytest.raises(InputError, match="other problems or another order"):
        traceset.compare_records([a, rounded], [rounded, dict(a, problem_id="q")])
