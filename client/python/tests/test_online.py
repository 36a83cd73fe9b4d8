"""Online compaction: a text read under a cache cap, compacted repeatedly through the real server."""
import json

import numpy as np

from kvcompact.eval import online


def test_capped_read_compacts_repeatedly_and_stays_under_the_cap(server_address, tmp_path, data_dir):
    online.main(["--server", server_address, "--out", str(tmp_path), "--data", data_dir, "--tokens", "400",
                 "--cap", "160", "--recent", "48", "--chunk", "32", "--query-window", "96"])
    result = json.load(open(tmp_path / "online.json"))
    reads = {r["policy"]: r for r in result["reads"]}
    assert set(reads) == {"full", "am", "streaming_llm"}
    for r in reads.values():
        assert len(r["nll"]) == 399 and np.all(np.isfinite(r["nll"]))
    assert reads["full"]["compactions"] == 0 and reads["full"]["max_entries_per_head"] == 400
    for policy in ("am", "streaming_llm"):
        r = reads[policy]
        assert r["compactions"] >= 3, r
        assert r["max_entries_per_head"] <= 160
        # After each compaction: 4 sinks + half of the span + the 48 recent entries.
        assert all(e < 160 - 32 for e in r["entries_after"]), r["entries_after"]
    assert reads["am"]["entries_after"] == reads["streaming_llm"]["entries_after"]
    # Tokens read before the first compaction see the same cache in every policy.
    np.testing.assert_allclose(reads["am"]["nll"][:150], reads["full"]["nll"][:150], rtol=1e-5, atol=1e-5)
    assert "| am |" in open(tmp_path / "online.md").read()
