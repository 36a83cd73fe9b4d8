"""The evaluation harness end to end on a tiny setting: real model, real server, report files."""
import json

import numpy as np
import pytest

from kvcompact.eval import quality


def test_harness_writes_report_json_and_plots(server_address, tmp_path, data_dir):
    quality.main(["--server", server_address, "--out", str(tmp_path), "--data", data_dir, "--articles", "1",
                  "--questions", "1", "--max-context", "256", "--answer-tokens", "12", "--ratios", "4",
                  "--methods", "am", "am:ridge=1e-3,queries=context", "am:queries=repeat+self_study", "h2o", "summary", "--needle-lengths", "256", "--needle-depths", "0.5"])
    result = json.load(open(tmp_path / "results.json"))
    methods = {r["method"] for r in result["rows"]}
    assert {"am", "am:ridge=1e-3,queries=context", "am:queries=repeat+self_study", "h2o", "summary", "no_context", "full"} <= methods
    quality_rows = [r for r in result["rows"] if r["task"] == "quality" and r["method"] == "am"]
    assert quality_rows and all(np.isfinite(r["value"]) for r in quality_rows)
    assert all(0 < r["entries"] for r in quality_rows)
    # AM fits repeat-prefill + self-study queries by default (captured on the client, timed); baselines use the prefill's.
    assert all(r["capture_seconds"] > 0 for r in quality_rows)
    assert all(r["capture_seconds"] == 0 for r in result["rows"] if r["method"] == "h2o")
    report = open(tmp_path / "report.md").read()
    assert "Change in log-perplexity" in report and "| am |" in report
    assert "Reference-query capture" in report
    # The summarization baseline replaces the context by a prefill of the model's own summary.
    summary = [r for r in result["rows"] if r["task"] == "quality" and r["method"] == "summary"]
    assert summary and all(np.isfinite(r["value"]) and r["compact_seconds"] > 0 for r in summary)
    full_entries = int(summary[0]["item"].split("(")[1].split(" tokens")[0]) * 30 * 3  # context x layers x KV heads
    assert all(0 < r["entries"] < full_entries for r in summary)
    assert "Summarization baseline" in report
    assert (tmp_path / "quality_logppl.png").stat().st_size > 1000


def test_merge_writes_one_report_from_several_runs(tmp_path):
    rows = [{"task": "quality", "item": "a", "method": m, "ratio": r, "value": v, "attn_error": 0.1,
             "compact_seconds": 1.0, "entries": 10, "capture_seconds": 0.0}
            for m, r, v in (("am", 10, 0.5), ("h2o", 10, 0.7), ("no_context", 0, 0.9), ("no_context", 0, 0.9))]
    # Each run also measured the no-context reference: the merge counts it once.
    for name, part in (("one", [rows[0], rows[2]]), ("two", [rows[1], rows[3]])):
        (tmp_path / name).mkdir()
        json.dump({"args": {"methods": [part[0]["method"]], "ratios": [10], "argv": ["--methods", part[0]["method"]],
                            "backend": "cpu"}, "wall_seconds": 60, "rows": part},
                  open(tmp_path / name / "results.json", "w"))
    out = tmp_path / "merged"
    quality.main(["--merge", str(tmp_path / "one" / "results.json"), str(tmp_path / "two" / "results.json"),
                  "--out", str(out)])
    report = open(out / "report.md").read()
    assert report.count("Command: `python -m kvcompact.eval.quality") == 2
    assert "| am | +0.500 |" in report and "| h2o | +0.700 |" in report
    assert len(json.load(open(out / "results.json"))["rows"]) == 3


def word_count(text):
    return len(text.split())


def test_fact_items_ask_one_stated_fact_with_distractors_in_and_out_of_the_document():
    from kvcompact.eval import facts

    for family in facts.FAMILIES:
        for seed in range(4):
            item = facts.make_item(seed, family, 300, word_count)
            assert 300 <= word_count(item.document) <= 480, family  # whole facts, each with its filler
            right, *others = item.candidates
            assert len(item.candidates) == 6 and len(set(item.candidates)) == 6
            assert right in item.document
            inside = [c for c in others if c in item.document]
            assert len(inside) >= 2, (family, others)  # two stated for other facts (three never stated)
            assert item.lead and item.question.endswith("?") and 0 <= item.depth <= 1
        assert facts.make_item(1, family, 300, word_count) == facts.make_item(1, family, 300, word_count)


def test_harness_runs_dense_fact_retrieval(server_address, tmp_path, data_dir):
    quality.main(["--server", server_address, "--out", str(tmp_path), "--data", data_dir, "--articles", "0",
                  "--facts", "1", "--facts-families", "ledger", "--facts-lengths", "200", "--ratios", "4",
                  "--methods", "am:queries=repeat_detail", "h2o", "--needle-lengths"])
    rows = json.load(open(tmp_path / "results.json"))["rows"]
    for task in ("facts", "facts_logp"):
        got = {r["method"] for r in rows if r["task"] == task}
        assert got == {"full", "no_context", "am:queries=repeat_detail", "h2o"}, got
    assert all(r["value"] in (0.0, 1.0) for r in rows if r["task"] == "facts")
    assert all(r["value"] == 0 for r in rows if r["task"] == "facts_logp" and r["method"] == "full")
    assert all(np.isfinite(r["value"]) for r in rows)
    report = open(tmp_path / "report.md").read()
    assert "Dense-fact retrieval accuracy" in report and "log-probability against the full context" in report


def test_probe_finds_every_run_of_tokens_that_spells_the_span():
    from kvcompact.eval.probe import span_positions

    pieces = ["The", " key", " is", " ", "4", "8", "2", ".", " 48", "2", " is", " 4", "82", "1"]
    assert span_positions(pieces, "482") == [4, 5, 6, 8, 9, 11, 12]
    assert span_positions(pieces, "4821") == [11, 12, 13]
    assert span_positions(pieces, "999") == []


def test_protected_numbers_are_the_digit_tokens_least_predictable_first():
    from types import SimpleNamespace

    from kvcompact.eval.quality import SINK_TOKENS, Prefix, protected_positions

    words = ["<s>", "a", "b", "c", "The", " key", " is", " 7", "1", "4", " and", " 2", "0", " done"]

    class Tok:
        def decode(self, ids):
            return "".join(words[i] for i in ids)

    surprisal = np.array([0, 1, 1, 1, 5, 2, 1, 9.0, 2.5, 2.0, 1, 3.0, 0.5, 1])
    prefix = Prefix(SimpleNamespace(tokenizer=Tok()), list(range(len(words))), None, 0, surprisal=surprisal)
    assert SINK_TOKENS == 4
    assert protected_positions(prefix, "numbers", budget=20, share=0.5).tolist() == [7, 8, 9, 11, 12]
    # Whole numbers, the least predictable first, within the cap: "714" (3 tokens) fits 3, "20" does not join.
    assert protected_positions(prefix, "numbers", budget=6, share=0.5).tolist() == [7, 8, 9]
    assert protected_positions(prefix, "numbers", budget=4, share=0.5).tolist() == [11, 12]
    # With the two tokens that name each number ("key is").
    assert protected_positions(prefix, "numbers", budget=20, share=0.5, before=2).tolist() == [5, 6, 7, 8, 9, 10, 11, 12]
    with pytest.raises(ValueError, match="only 'numbers'"):
        protected_positions(prefix, "names", budget=6, share=0.5)
